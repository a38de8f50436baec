//! Test images built WITHOUT walt's code: Debian's `busybox-static` root filesystems, `umoci` to make
//! layers, `skopeo` to push them; and the same tools as independent checkers of what walt pushed.
//!
//! ```no_run
//! use walt_tests::{images, registry::Registry};
//! let registry = Registry::start().unwrap();
//! // A one-layer busybox image (amd64), pushed as 127.0.0.1:PORT/lab/busybox:1; returns its manifest digest.
//! let layout = images::OciLayout::busybox(images::Arch::Amd64).unwrap();   // tag "base"
//! // A second layer: add, modify and delete files (umoci computes whiteouts).
//! layout.add_layer("base", "v2", |root| {
//!     std::fs::write(root.join("etc/hello"), "hi\n")?;
//!     std::fs::remove_dir_all(root.join("usr/share"))?;
//!     Ok(())
//! }).unwrap();
//! layout.set_label("v2", "walt.node.models", "rpi-b,pc-x86-64").unwrap();
//! let digest = layout.push("v2", &registry, "lab/busybox:1").unwrap();
//! // Check what someone pushed: skopeo copy + umoci unpack into a fresh dir, then compare trees.
//! let dir = tempfile::tempdir().unwrap();
//! let rootfs = images::skopeo_umoci_unpack(&registry, "lab/busybox:1", dir.path()).unwrap();
//! ```
//!
//! The `.deb`s are cached under [`cache_dir`] (`$WALT_CACHE`, else `~/.cache/walt`).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};
use sha2::Digest as _;

use crate::registry::Registry;
use crate::{FixtureError, require_tool, run, run_stdout};

/// A CPU architecture of test images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// x86-64 (`amd64`).
    Amd64,
    /// 64-bit ARM (`arm64`), runs here through qemu-user.
    Arm64,
}

impl Arch {
    /// The Debian and OCI name: `amd64` or `arm64`.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }
}

/// Where downloaded packages are cached: `$WALT_CACHE`, else `~/.cache/walt`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("WALT_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".cache/walt")
}

/// The cached `busybox-static_*_<arch>.deb` (see [`debian_deb`]).
pub fn busybox_deb(arch: Arch) -> Result<PathBuf, FixtureError> {
    debian_deb("busybox-static", arch)
}

/// The cached `<package>_*_<arch>.deb` (downloaded with `apt-get download` on first use; for arm64 the
/// architecture is added with `dpkg --add-architecture arm64` and `apt-get update` when missing).
pub fn debian_deb(package: &str, arch: Arch) -> Result<PathBuf, FixtureError> {
    let dir = cache_dir().join("debs");
    std::fs::create_dir_all(&dir).map_err(|e| FixtureError::io(&format!("creating {}", dir.display()), e))?;
    if let Some(found) = find_deb(&dir, package, arch)? {
        return Ok(found);
    }
    require_tool("apt-get", "apt")?;
    if arch == Arch::Arm64 {
        let foreign = run_stdout(Command::new("dpkg").arg("--print-foreign-architectures"))?;
        if !foreign.lines().any(|l| l.trim() == "arm64") {
            run(Command::new("dpkg").args(["--add-architecture", "arm64"]))?;
            run(Command::new("apt-get").args(["update", "-qq"]))?;
        }
    }
    // Download into a private dir first, then move: concurrent tests never see a partial file.
    let staging = tempfile::Builder::new()
        .prefix(".download-")
        .tempdir_in(&dir)
        .map_err(|e| FixtureError::io("creating a download dir", e))?;
    let wanted = format!("{package}:{}", arch.name());
    if run(Command::new("apt-get")
        .arg("download")
        .arg(&wanted)
        .current_dir(staging.path()))
    .is_err()
    {
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        run(Command::new("apt-get")
            .arg("download")
            .arg(&wanted)
            .current_dir(staging.path()))?;
    }
    let downloaded = find_deb(staging.path(), package, arch)?
        .ok_or_else(|| FixtureError::Failed(format!("apt-get download {wanted} produced no .deb")))?;
    let target = dir.join(downloaded.file_name().unwrap_or_default());
    std::fs::rename(&downloaded, &target)
        .map_err(|e| FixtureError::io("placing the .deb in the cache", e))?;
    Ok(target)
}

fn find_deb(dir: &Path, package: &str, arch: Arch) -> Result<Option<PathBuf>, FixtureError> {
    let (prefix, suffix) = (format!("{package}_"), format!("_{}.deb", arch.name()));
    let entries =
        std::fs::read_dir(dir).map_err(|e| FixtureError::io(&format!("listing {}", dir.display()), e))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(&prefix) && name.ends_with(&suffix) {
            return Ok(Some(entry.path()));
        }
    }
    Ok(None)
}

/// Makes a busybox root filesystem in `dest` (created if needed): `/bin/busybox` of `arch`, a symlink for
/// every applet (`/bin/sh`, `/sbin/init`, …), the usual top directories, `/etc/passwd`, `/etc/group`,
/// `/etc/inittab`. Owned by root.
pub fn busybox_rootfs(arch: Arch, dest: &Path) -> Result<(), FixtureError> {
    require_tool("dpkg-deb", "dpkg")?;
    require_tool("busybox", "busybox-static")?;
    let deb = busybox_deb(arch)?;
    std::fs::create_dir_all(dest)
        .map_err(|e| FixtureError::io(&format!("creating {}", dest.display()), e))?;
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(dest))?;
    for dir in [
        "bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "tmp", "root", "run", "var/log",
    ] {
        let path = dest.join(dir);
        std::fs::create_dir_all(&path)
            .map_err(|e| FixtureError::io(&format!("creating {}", path.display()), e))?;
    }
    set_mode(&dest.join("tmp"), 0o1777)?;
    set_mode(&dest.join("root"), 0o700)?;
    // The host's busybox (same Debian version) lists the applets; the image's binary may be foreign.
    let applets = run_stdout(Command::new("busybox").arg("--list-full"))?;
    for applet in applets.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let link = dest.join(applet);
        if applet == "bin/busybox" || link.symlink_metadata().is_ok() {
            continue;
        }
        std::os::unix::fs::symlink("/bin/busybox", &link)
            .map_err(|e| FixtureError::io(&format!("linking {}", link.display()), e))?;
    }
    write_file(
        &dest.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
        0o644,
    )?;
    write_file(&dest.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n", 0o644)?;
    write_file(
        &dest.join("etc/inittab"),
        "::sysinit:/bin/mkdir -p /run/walt\n::shutdown:/bin/sync\n",
        0o644,
    )?;
    Ok(())
}

/// Adds WalT's init ("advanced") image shell scripts to a root filesystem: executable
/// `/bin/walt-image-shell-start` (execs `/sbin/init`, busybox init) and `/bin/walt-image-shell-shutdown`.
pub fn install_walt_init_scripts(rootfs: &Path) -> Result<(), FixtureError> {
    write_file(
        &rootfs.join("bin/walt-image-shell-start"),
        "#!/bin/sh\nexec /sbin/init\n",
        0o755,
    )?;
    write_file(
        &rootfs.join("bin/walt-image-shell-shutdown"),
        "#!/bin/sh\necho walt-image-shell-shutdown ran > /run/walt-image-shell-shutdown.done\nsync\n",
        0o755,
    )?;
    Ok(())
}

/// A Debian bookworm root filesystem (debootstrap `minbase` plus `systemd`, `systemd-sysv`,
/// `openssh-server`; about 250 MB) for `arch`, built once from this machine's apt mirror and cached
/// under [`cache_dir`]`/rootfs/` as a tarball and as an unpacked directory (use it read-only, e.g. as
/// an overlay lower dir, or copy it). Cold: about 2.5 minutes (amd64) or 6 (arm64, under qemu-user).
pub fn debian_systemd_rootfs(arch: Arch) -> Result<PathBuf, FixtureError> {
    let dir = cache_dir().join("rootfs");
    std::fs::create_dir_all(&dir).map_err(|e| FixtureError::io(&format!("creating {}", dir.display()), e))?;
    let name = format!("debian-bookworm-systemd-{}", arch.name());
    let unpacked = dir.join(&name);
    if unpacked.join("usr/lib/systemd/systemd").exists() {
        return Ok(unpacked);
    }
    let tarball = dir.join(format!("{name}.tar"));
    let scratch = |what: &str| {
        tempfile::tempdir_in(&dir)
            .map_err(|e| FixtureError::io(&format!("creating a {what} dir in {}", dir.display()), e))
    };
    if !tarball.exists() {
        require_tool("debootstrap", "debootstrap")?;
        let build = scratch("debootstrap")?;
        let target = build.path().join("root");
        run(Command::new("nice")
            .args(["-n", "19", "debootstrap"])
            .arg(format!("--arch={}", arch.name()))
            .args([
                "--variant=minbase",
                "--include=systemd,systemd-sysv,openssh-server",
                "bookworm",
            ])
            .arg(&target)
            .arg(debian_mirror()))?;
        let partial = build.path().join("rootfs.tar");
        run(Command::new("tar")
            .arg("--numeric-owner")
            .arg("-C")
            .arg(&target)
            .arg("-cf")
            .arg(&partial)
            .arg("."))?;
        std::fs::rename(&partial, &tarball)
            .map_err(|e| FixtureError::io(&format!("moving the tarball to {}", tarball.display()), e))?;
    }
    let staging = scratch("staging")?;
    run(Command::new("tar")
        .arg("--numeric-owner")
        .arg("-C")
        .arg(staging.path())
        .arg("-xf")
        .arg(&tarball))?;
    let staged = staging.keep();
    if std::fs::rename(&staged, &unpacked).is_err() {
        // Another process unpacked it meanwhile.
        let _ = std::fs::remove_dir_all(&staged);
    }
    Ok(unpacked)
}

/// The Debian mirror apt uses on this machine (else deb.debian.org).
pub fn debian_mirror() -> String {
    let mut sources = String::new();
    for file in ["/etc/apt/sources.list.d/debian.sources", "/etc/apt/sources.list"] {
        sources.push_str(&std::fs::read_to_string(file).unwrap_or_default());
    }
    sources
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .flat_map(str::split_whitespace)
        .find(|word| word.starts_with("http") && word.ends_with("/debian"))
        .unwrap_or("http://deb.debian.org/debian")
        .to_owned()
}

fn write_file(path: &Path, content: &str, mode: u32) -> Result<(), FixtureError> {
    std::fs::write(path, content).map_err(|e| FixtureError::io(&format!("writing {}", path.display()), e))?;
    set_mode(path, mode)
}

fn set_mode(path: &Path, mode: u32) -> Result<(), FixtureError> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| FixtureError::io(&format!("chmod {}", path.display()), e))
}

/// An OCI image layout on disk (in a temporary directory), edited with `umoci`, pushed with `skopeo`.
/// Tags name images inside the layout (e.g. `base`, `v2`).
#[derive(Debug)]
pub struct OciLayout {
    dir: tempfile::TempDir,
    path: PathBuf,
}

impl OciLayout {
    /// An empty layout (`umoci init`).
    pub fn new() -> Result<Self, FixtureError> {
        require_tool("umoci", "umoci")?;
        require_tool("skopeo", "skopeo")?;
        let dir = tempfile::Builder::new()
            .prefix("walt-oci-layout-")
            .tempdir()
            .map_err(|e| FixtureError::io("creating a layout dir", e))?;
        let path = dir.path().join("layout");
        let layout = OciLayout { dir, path };
        run(Command::new("umoci")
            .arg("init")
            .arg("--layout")
            .arg(layout.path()))?;
        Ok(layout)
    }

    /// A layout whose tag `base` is a one-layer busybox image of `arch` (see [`busybox_rootfs`]).
    pub fn busybox(arch: Arch) -> Result<Self, FixtureError> {
        let layout = Self::new()?;
        layout.new_image("empty", arch)?;
        layout.add_layer("empty", "base", |root| {
            busybox_rootfs(arch, root).map_err(std::io::Error::other)
        })?;
        Ok(layout)
    }

    /// A layout whose tag `base` is busybox with WalT's init scripts and the label
    /// `walt.node.models=<models>` (e.g. `"rpi-b,pc-x86-64"`).
    pub fn walt_busybox(arch: Arch, models: &str) -> Result<Self, FixtureError> {
        let layout = Self::new()?;
        layout.new_image("empty", arch)?;
        layout.add_layer("empty", "base", |root| {
            busybox_rootfs(arch, root).map_err(std::io::Error::other)?;
            install_walt_init_scripts(root).map_err(std::io::Error::other)
        })?;
        layout.set_label("base", "walt.node.models", models)?;
        Ok(layout)
    }

    /// The layout directory (`oci:<path>:<tag>` for skopeo, `<path>:<tag>` for umoci).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The temporary directory holding the layout (and scratch files).
    pub fn scratch_dir(&self) -> &Path {
        self.dir.path()
    }

    fn image(&self, tag: &str) -> String {
        format!("{}:{tag}", self.path().display())
    }

    /// Creates an image with no layers under `tag`, for `linux/<arch>` (`umoci new` + `umoci config`).
    pub fn new_image(&self, tag: &str, arch: Arch) -> Result<(), FixtureError> {
        run(Command::new("umoci")
            .arg("new")
            .arg("--image")
            .arg(self.image(tag)))?;
        run(Command::new("umoci")
            .arg("config")
            .arg("--image")
            .arg(self.image(tag))
            .args(["--os", "linux", "--architecture", arch.name()]))?;
        Ok(())
    }

    /// Unpacks `from` (`umoci unpack`), lets `change` edit the root filesystem (its argument), and stores
    /// the result as a new layer on top, tagged `to` (`umoci repack`: deletions become whiteouts).
    pub fn add_layer(
        &self,
        from: &str,
        to: &str,
        change: impl FnOnce(&Path) -> std::io::Result<()>,
    ) -> Result<(), FixtureError> {
        let bundle = tempfile::Builder::new()
            .prefix("walt-bundle-")
            .tempdir()
            .map_err(|e| FixtureError::io("creating a bundle dir", e))?;
        let bundle_path = bundle.path().join("bundle");
        run(Command::new("umoci")
            .arg("unpack")
            .arg("--image")
            .arg(self.image(from))
            .arg(&bundle_path))?;
        change(&bundle_path.join("rootfs"))
            .map_err(|e| FixtureError::io(&format!("changing the root filesystem of {from} for {to}"), e))?;
        run(Command::new("umoci")
            .arg("repack")
            .arg("--image")
            .arg(self.image(to))
            .arg(&bundle_path))?;
        Ok(())
    }

    /// Adds a layer holding a copy of `source` (copied with `cp -a` over the root filesystem).
    pub fn add_layer_from_dir(&self, from: &str, to: &str, source: &Path) -> Result<(), FixtureError> {
        self.add_layer(from, to, |root| {
            crate::copy_tree(source, root).map_err(std::io::Error::other)
        })
    }

    /// Sets a label on the image `tag` (in place).
    pub fn set_label(&self, tag: &str, key: &str, value: &str) -> Result<(), FixtureError> {
        self.configure(tag, &[&format!("--config.label={key}={value}")])
    }

    /// Runs `umoci config --image <layout>:<tag> <args…>` (in place), e.g. `["--config.cmd=/bin/sh"]`.
    pub fn configure(&self, tag: &str, args: &[&str]) -> Result<(), FixtureError> {
        run(Command::new("umoci")
            .arg("config")
            .arg("--image")
            .arg(self.image(tag))
            .args(args))?;
        Ok(())
    }

    /// Appends a hand-made layer (the raw tar bytes, stored uncompressed with media type
    /// `application/vnd.oci.image.layer.v1.tar`, or gzip-compressed when `gzip`) on top of `from`, tagged
    /// `to`. For layers umoci would not make: malicious paths, escaping links, odd entries.
    pub fn append_raw_layer(
        &self,
        from: &str,
        to: &str,
        layer_tar: &[u8],
        gzip: bool,
    ) -> Result<(), FixtureError> {
        let diff_id = sha256_digest(layer_tar);
        let (blob, media_type) = if gzip {
            use std::io::Write as _;
            let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            encoder
                .write_all(layer_tar)
                .map_err(|e| FixtureError::io("gzip", e))?;
            (
                encoder.finish().map_err(|e| FixtureError::io("gzip", e))?,
                "application/vnd.oci.image.layer.v1.tar+gzip",
            )
        } else {
            (layer_tar.to_vec(), "application/vnd.oci.image.layer.v1.tar")
        };
        let layer_digest = self.write_blob(&blob)?;
        let manifest_desc = self.index_entry(from)?;
        let mut manifest = self.read_json_blob(desc_digest(&manifest_desc)?)?;
        let config_digest = manifest["config"]["digest"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let mut config = self.read_json_blob(&config_digest)?;
        config["rootfs"]["diff_ids"]
            .as_array_mut()
            .ok_or_else(|| FixtureError::Failed("config without rootfs.diff_ids".into()))?
            .push(json!(diff_id));
        if let Some(history) = config["history"].as_array_mut() {
            history.push(json!({"created_by": "walt-tests append_raw_layer"}));
        }
        let config_bytes = serde_json::to_vec(&config).map_err(|e| FixtureError::Failed(e.to_string()))?;
        let new_config_digest = self.write_blob(&config_bytes)?;
        manifest["config"]["digest"] = json!(new_config_digest);
        manifest["config"]["size"] = json!(config_bytes.len());
        manifest["layers"]
            .as_array_mut()
            .ok_or_else(|| FixtureError::Failed("manifest without layers".into()))?
            .push(json!({"mediaType": media_type, "digest": layer_digest, "size": blob.len()}));
        let manifest_bytes =
            serde_json::to_vec(&manifest).map_err(|e| FixtureError::Failed(e.to_string()))?;
        let manifest_digest = self.write_blob(&manifest_bytes)?;
        self.set_index_entry(
            to,
            json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest, "size": manifest_bytes.len()}),
        )
    }

    /// Makes `to` an image index (multi-arch) over the images `tags` (each entry gets its config's platform).
    pub fn make_index(&self, tags: &[&str], to: &str) -> Result<(), FixtureError> {
        let mut manifests = Vec::new();
        for tag in tags {
            let mut desc = self.index_entry(tag)?;
            let manifest = self.read_json_blob(desc_digest(&desc)?)?;
            let config = self.read_json_blob(manifest["config"]["digest"].as_str().unwrap_or_default())?;
            if let Some(map) = desc.as_object_mut() {
                map.remove("annotations");
                map.insert(
                    "platform".into(),
                    json!({"architecture": config["architecture"], "os": config["os"]}),
                );
            }
            manifests.push(desc);
        }
        let index = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests});
        let bytes = serde_json::to_vec(&index).map_err(|e| FixtureError::Failed(e.to_string()))?;
        let digest = self.write_blob(&bytes)?;
        self.set_index_entry(
            to,
            json!({"mediaType": "application/vnd.oci.image.index.v1+json", "digest": digest, "size": bytes.len()}),
        )
    }

    /// Pushes `tag` to `registry` as `repository_and_tag` (`skopeo copy --all`, plain HTTP, with the
    /// registry's credentials if any); returns the pushed manifest (or index) digest.
    pub fn push(
        &self,
        tag: &str,
        registry: &Registry,
        repository_and_tag: &str,
    ) -> Result<String, FixtureError> {
        let digest_file = self.scratch_dir().join(format!("pushed-{}", std::process::id()));
        let mut command = Command::new("skopeo");
        command
            .args(["copy", "--all", "--dest-tls-verify=false", "--digestfile"])
            .arg(&digest_file);
        if let Some(creds) = registry.skopeo_creds() {
            command.arg("--dest-creds").arg(creds);
        }
        command
            .arg(format!("oci:{}", self.image(tag)))
            .arg(format!("docker://{}", registry.reference(repository_and_tag)));
        run(&mut command)?;
        let digest = std::fs::read_to_string(&digest_file)
            .map_err(|e| FixtureError::io("reading skopeo's digest file", e))?;
        let _ = std::fs::remove_file(&digest_file);
        Ok(digest.trim().to_owned())
    }

    /// The manifest digest of `tag` in this layout.
    pub fn digest(&self, tag: &str) -> Result<String, FixtureError> {
        Ok(desc_digest(&self.index_entry(tag)?)?.to_owned())
    }

    /// Unpacks `tag` with `umoci unpack` into `dest/bundle`; returns `dest/bundle/rootfs`.
    pub fn umoci_unpack(&self, tag: &str, dest: &Path) -> Result<PathBuf, FixtureError> {
        let bundle = dest.join("bundle");
        run(Command::new("umoci")
            .arg("unpack")
            .arg("--image")
            .arg(self.image(tag))
            .arg(&bundle))?;
        Ok(bundle.join("rootfs"))
    }

    /// Writes a blob into `blobs/sha256/`; returns its digest.
    pub fn write_blob(&self, bytes: &[u8]) -> Result<String, FixtureError> {
        let digest = sha256_digest(bytes);
        let path = self
            .path()
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"));
        std::fs::write(&path, bytes)
            .map_err(|e| FixtureError::io(&format!("writing {}", path.display()), e))?;
        Ok(digest)
    }

    /// Reads a JSON blob (manifest, config, index) by digest.
    pub fn read_json_blob(&self, digest: &str) -> Result<Value, FixtureError> {
        let path = self
            .path()
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"));
        let bytes =
            std::fs::read(&path).map_err(|e| FixtureError::io(&format!("reading {}", path.display()), e))?;
        serde_json::from_slice(&bytes).map_err(|e| FixtureError::Failed(format!("{}: {e}", path.display())))
    }

    fn read_index(&self) -> Result<Value, FixtureError> {
        let path = self.path().join("index.json");
        let bytes = std::fs::read(&path).map_err(|e| FixtureError::io("reading index.json", e))?;
        serde_json::from_slice(&bytes).map_err(|e| FixtureError::Failed(format!("index.json: {e}")))
    }

    /// The `index.json` descriptor of `tag`.
    pub fn index_entry(&self, tag: &str) -> Result<Value, FixtureError> {
        let index = self.read_index()?;
        index["manifests"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
            .cloned()
            .ok_or_else(|| FixtureError::Failed(format!("no tag {tag} in layout {}", self.path().display())))
    }

    fn set_index_entry(&self, tag: &str, mut descriptor: Value) -> Result<(), FixtureError> {
        let mut index = self.read_index()?;
        descriptor["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
        let manifests = index["manifests"]
            .as_array_mut()
            .ok_or_else(|| FixtureError::Failed("index.json without manifests".into()))?;
        manifests.retain(|m| m["annotations"]["org.opencontainers.image.ref.name"] != tag);
        manifests.push(descriptor);
        let bytes = serde_json::to_vec(&index).map_err(|e| FixtureError::Failed(e.to_string()))?;
        std::fs::write(self.path().join("index.json"), bytes)
            .map_err(|e| FixtureError::io("writing index.json", e))
    }
}

fn desc_digest(desc: &Value) -> Result<&str, FixtureError> {
    desc["digest"]
        .as_str()
        .ok_or_else(|| FixtureError::Failed(format!("descriptor without digest: {desc}")))
}

/// `sha256:<hex>` of bytes.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

fn skopeo_src(command: &mut Command, registry: &Registry) {
    command.arg("--src-tls-verify=false");
    if let Some(creds) = registry.skopeo_creds() {
        command.arg("--src-creds").arg(creds);
    }
}

/// Independent checker: `skopeo copy docker://<registry>/<repository_and_tag_or_digest>` into a fresh OCI
/// layout under `dest`, then `umoci unpack` it into `dest/bundle`; returns `dest/bundle/rootfs`.
/// `repository_and_tag_or_digest` is `repo:tag` or `repo@sha256:…`.
pub fn skopeo_umoci_unpack(
    registry: &Registry,
    repository_and_tag_or_digest: &str,
    dest: &Path,
) -> Result<PathBuf, FixtureError> {
    require_tool("skopeo", "skopeo")?;
    require_tool("umoci", "umoci")?;
    let layout = dest.join("layout");
    let mut command = Command::new("skopeo");
    command.arg("copy");
    skopeo_src(&mut command, registry);
    command
        .arg(format!(
            "docker://{}",
            registry.reference(repository_and_tag_or_digest)
        ))
        .arg(format!("oci:{}:checked", layout.display()));
    run(&mut command)?;
    let bundle = dest.join("bundle");
    run(Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:checked", layout.display()))
        .arg(&bundle))?;
    Ok(bundle.join("rootfs"))
}

/// Independent checker: the raw manifest (or index) as the registry serves it (`skopeo inspect --raw`).
pub fn skopeo_inspect_raw(
    registry: &Registry,
    repository_and_tag_or_digest: &str,
) -> Result<Value, FixtureError> {
    skopeo_inspect(registry, repository_and_tag_or_digest, "--raw")
}

/// Independent checker: the image config (`skopeo inspect --config`): labels, `rootfs.diff_ids`, history.
pub fn skopeo_inspect_config(
    registry: &Registry,
    repository_and_tag_or_digest: &str,
) -> Result<Value, FixtureError> {
    skopeo_inspect(registry, repository_and_tag_or_digest, "--config")
}

/// Independent checker: `skopeo inspect --format TEMPLATE` (e.g. `{{.Digest}} {{.Architecture}}`), trimmed.
pub fn skopeo_inspect_format(
    registry: &Registry,
    repository_and_tag_or_digest: &str,
    template: &str,
) -> Result<String, FixtureError> {
    Ok(
        skopeo_inspect_text(registry, repository_and_tag_or_digest, &["--format", template])?
            .trim()
            .to_owned(),
    )
}

fn skopeo_inspect_text(registry: &Registry, reference: &str, args: &[&str]) -> Result<String, FixtureError> {
    require_tool("skopeo", "skopeo")?;
    let mut command = Command::new("skopeo");
    command.arg("inspect").args(args).arg("--tls-verify=false");
    if let Some(creds) = registry.skopeo_creds() {
        command.arg("--creds").arg(creds);
    }
    command.arg(format!("docker://{}", registry.reference(reference)));
    run_stdout(&mut command)
}

fn skopeo_inspect(registry: &Registry, reference: &str, what: &str) -> Result<Value, FixtureError> {
    let out = skopeo_inspect_text(registry, reference, &[what])?;
    serde_json::from_str(&out)
        .map_err(|e| FixtureError::Failed(format!("skopeo inspect {what} {reference}: {e}: {out}")))
}
