#!/usr/bin/env python3
"""Writes the committed seed corpus (small hand-made valid inputs) of every fuzz target under seeds/.
Run from fuzz/: python3 make-seeds.py (needs the zstd program)."""
import gzip, io, json, os, subprocess, tarfile

def tar(entries, fmt=tarfile.PAX_FORMAT):
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as t:
        for e in entries:
            info = tarfile.TarInfo(e["name"])
            info.mtime = 1_700_000_000
            info.mode = e.get("mode", 0o644)
            info.type = e.get("type", tarfile.REGTYPE)
            info.linkname = e.get("link", "")
            info.pax_headers = e.get("pax", {})
            data = e.get("data", b"")
            info.size = len(data) if info.type == tarfile.REGTYPE else 0
            t.addfile(info, io.BytesIO(data) if info.type == tarfile.REGTYPE else None)
    return out.getvalue()

DIR, SYM, LNK, CHR = tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE
# An OCI layer: a directory, a file, a hard link, a symlink, a whiteout and an opaque directory.
layer = tar([
    {"name": "etc/", "type": DIR, "mode": 0o755},
    {"name": "etc/conf", "data": b"hello\n"},
    {"name": "etc/conf2", "type": LNK, "link": "etc/conf"},
    {"name": "etc/localtime", "type": SYM, "link": "/usr/share/zoneinfo/UTC"},
    {"name": "etc/.wh.old", "data": b""},
    {"name": "var/", "type": DIR, "mode": 0o755},
    {"name": "var/cache/", "type": DIR, "mode": 0o700},
    {"name": "var/cache/.wh..wh..opq", "data": b""},
    {"name": "usr/bin/tool", "data": b"#!/bin/sh\n", "mode": 0o755,
     "pax": {"SCHILY.xattr.user.note": "kept"}},
])
lower = tar([
    {"name": "etc/", "type": DIR, "mode": 0o755},
    {"name": "etc/old", "data": b"gone"},
    {"name": "var/cache/", "type": DIR},
    {"name": "var/cache/stale", "data": b"hidden"},
    {"name": "bin/sh", "data": b"ELF"},
])

def write(target, name, data):
    os.makedirs(target, exist_ok=True)
    with open(os.path.join(target, name), "wb") as f:
        f.write(data)

zstd = subprocess.run(["zstd", "-q", "-c"], input=layer, stdout=subprocess.PIPE, check=True).stdout
write("seeds/unpack_layer", "plain", b"\x00" + layer)
write("seeds/unpack_layer", "gzip-here", b"\x01" + layer)
write("seeds/unpack_layer", "zstd-here", b"\x02" + layer)
write("seeds/unpack_layer", "gzip-blob", b"\x03" + gzip.compress(layer, mtime=0))
write("seeds/unpack_layer", "zstd-blob", b"\x04" + zstd)
write("seeds/unpack_layer", "apply", b"\x80" + layer)

# What a node sends: GNU tar of an upper dir (whiteouts as char 0:0, opaque as an xattr, ctime), busybox ustar.
node = tar([
    {"name": "./", "type": DIR, "mode": 0o755},
    {"name": "./etc/", "type": DIR, "mode": 0o755,
     "pax": {"SCHILY.xattr.trusted.overlay.opaque": "y", "ctime": "1700000100.5"}},
    {"name": "./etc/hostname", "data": b"rpi3-01\n", "pax": {"ctime": "1700000200"}},
    {"name": "./etc/gone", "type": CHR},
    {"name": "./etc/gone2", "type": LNK, "link": "./etc/gone"},
    {"name": "./var/log/", "type": DIR},
    {"name": "./var/log/syslog", "data": b"noise"},
    {"name": "./root/.profile", "data": b"export A=1\n"},
])
busybox = tar([
    {"name": "etc/", "type": DIR, "mode": 0o755},
    {"name": "etc/motd", "data": b"hi\n"},
    {"name": "etc/gone", "type": CHR},
], fmt=tarfile.USTAR_FORMAT)
write("seeds/filter_change_set", "gnu", b"\x00" + node)
write("seeds/filter_change_set", "gnu-changed-since", b"\x02" + node)
write("seeds/filter_change_set", "busybox-detected-opaque", b"\x05" + busybox)

write("seeds/squash", "two-layers", lower + b"WALTLAYR" + layer)
write("seeds/squash", "one-layer", layer)

manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": "sha256:" + "a" * 64, "size": 512},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": "sha256:" + "b" * 64, "size": 1024}]}
index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [
    {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:" + "c" * 64, "size": 400,
     "platform": {"os": "linux", "architecture": "amd64"}},
    {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:" + "d" * 64, "size": 400,
     "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}}]}
config = {"architecture": "arm64", "os": "linux", "config": {"Labels": {"walt.node.models": "rpi-3-b"}},
          "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "e" * 64]}, "history": []}
docker = {"auths": {"registry.lab:5000": {"auth": "dXNlcjpwYXNz"}, "ghcr.io": {"registrytoken": "t"},
                    "quay.io": {"username": "u", "password": "p"}}}
for name, doc in [("manifest.json", manifest), ("index.json", index), ("config.json", config),
                  ("docker-config.json", docker)]:
    write("seeds/oci_manifest", name, json.dumps(doc, indent=1).encode())
write("seeds/oci_manifest", "platform", b"linux/arm/v7")

for i, name in enumerate(["rpi-debian", "rpi-debian:v2", "busybox:latest", "a", "x" * 60]):
    write("seeds/image_name", f"name{i}", name.encode())
for i, s in enumerate(["rpi3-01,rpi3-02", "all", " a , a ,,b ", "vnode-1"]):
    write("seeds/node_set", f"set{i}", s.encode())
for i, s in enumerate(["\n", "my-image\n", "rpi-debian\ny\n", "Bad Name\nok-name:v2\nyes\n", "", "bb\nn\nbb\ny\n"]):
    write("seeds/dialogue", f"answers{i}", s.encode())

# Dockerfiles for `walt image build`: stages, directives, continuations, JSON and shell forms, flags,
# variables, and what is refused (ONBUILD, heredocs, RUN --mount, ADD of URLs).
dockerfiles = {
    "simple": "FROM debian:bookworm\nRUN apt-get update && apt-get install -y curl\nCMD [\"bash\"]\n",
    "multi-stage": "ARG BASE=busybox\nFROM ${BASE}:latest AS build\nWORKDIR /src\nCOPY --chmod=755 . .\n"
                   "RUN make\n\nFROM --platform=linux/arm64 scratch\nCOPY --from=build /src/out /bin/app\n"
                   "ENTRYPOINT [\"/bin/app\"]\n",
    "escape-directive": "# escape=`\nFROM busybox\nRUN echo one `\n  # a comment inside\n  two\n"
                        "ENV A=\"x y\" B=${A:-default} C=${A:+alt}\nLABEL walt.node.models=\"rpi-3-b,pc-x86-64\"\n",
    "continuations": "FROM busybox\nRUN a \\\n\n  b \\\n  c\nUSER 1000:1000\nEXPOSE 22/tcp 80\n"
                     "STOPSIGNAL SIGTERM\nVOLUME [\"/data\"]\nSHELL [\"/bin/sh\", \"-ec\"]\n",
    "healthcheck": "FROM busybox\nHEALTHCHECK --interval=5m30s --timeout=3s --retries=2 CMD wget -q localhost\n"
                   "HEALTHCHECK NONE\nARG A\nCOPY \"a b\" 'c' /dest/\nADD --chown=1:1 x.tar /\n",
    "refused": "FROM busybox\nONBUILD RUN x\nRUN <<EOF\nhi\nEOF\nRUN --mount=type=cache,target=/x y\n"
               "ADD https://example.org/x /x\n",
    "no-from": "RUN echo before FROM\n",
    "required-variable": "FROM busybox\nENV X=${MISSING:?set MISSING} Y=$A Z=\"${A}\\$literal\"\n",
}
for name, text in dockerfiles.items():
    write("seeds/dockerfile", name, text.encode())
