//! Small OCI images built here from Debian's busybox-static (amd64 from the host, arm64 from the
//! `busybox-static:arm64` package), pushed to a registry with `skopeo` (an independent tool).
//! The cluster tier's pause image is one of them: nothing is pulled from the internet.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use flate2::Compression;
use flate2::write::GzEncoder;
use sha2::{Digest as _, Sha256};

use super::Error;
use crate::wait::{Poll, Wait};

/// CPU architecture of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// x86-64 (this machine).
    Amd64,
    /// 64-bit ARM (runs here under qemu-user emulation through binfmt_misc).
    Arm64,
}

impl Arch {
    /// This machine's CPU.
    pub fn host() -> Arch {
        if cfg!(target_arch = "aarch64") {
            Arch::Arm64
        } else {
            Arch::Amd64
        }
    }

    /// The OCI name.
    pub fn oci_name(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }
}

/// The cache directory (`${WALT_CACHE:-${XDG_CACHE_HOME:-~/.cache}/walt}`).
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("WALT_CACHE").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map_or_else(
            || PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache"),
            PathBuf::from,
        );
    base.join("walt")
}

fn command_output(command: &mut Command, what: &str) -> Result<String, Error> {
    let output = command
        .output()
        .map_err(|e| Error::io(format!("run {what}"), e))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(Error::Command {
            command: what.to_string(),
            message: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

/// The static busybox binary for `arch`: the host's `/bin/busybox`, or the arm64 one extracted
/// (once, into the cache) from Debian's `busybox-static:arm64` package.
pub fn busybox_binary(arch: Arch) -> Result<PathBuf, Error> {
    match arch {
        Arch::Amd64 => Ok(PathBuf::from("/bin/busybox")),
        Arch::Arm64 => {
            let dir = cache_dir().join("debs/busybox-static-arm64");
            let binary = dir.join("root/bin/busybox");
            if binary.exists() {
                return Ok(binary);
            }
            std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
            command_output(
                Command::new("apt-get")
                    .args(["download", "busybox-static:arm64"])
                    .current_dir(&dir),
                "apt-get download busybox-static:arm64 (needs `dpkg --add-architecture arm64 && \
                 apt-get update`, done by .ci/install-deps)",
            )?;
            let deb = std::fs::read_dir(&dir)
                .map_err(|e| Error::io(format!("list {}", dir.display()), e))?
                .flatten()
                .map(|e| e.path())
                .find(|p| p.extension().is_some_and(|x| x == "deb"))
                .ok_or_else(|| Error::Command {
                    command: "apt-get download busybox-static:arm64".into(),
                    message: format!("no .deb in {}", dir.display()),
                })?;
            command_output(
                Command::new("dpkg-deb").arg("-x").arg(&deb).arg(dir.join("root")),
                "dpkg-deb -x busybox-static:arm64",
            )?;
            Ok(binary)
        }
    }
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn tar_error(e: std::io::Error) -> Error {
    Error::io("write an image layer", e)
}

/// A gzip-compressed layer with busybox at `/bin/busybox`, its applets as symlinks, and the
/// usual empty directories. Returns (compressed, uncompressed digest).
fn busybox_layer(busybox: &Path) -> Result<(Vec<u8>, String), Error> {
    let applets = command_output(Command::new("/bin/busybox").arg("--list"), "/bin/busybox --list")?;
    let mut builder = tar::Builder::new(Vec::new());
    let header = |kind: tar::EntryType, mode: u32, size: u64| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h
    };
    for dir in [
        "bin", "dev", "etc", "proc", "root", "sys", "tmp", "var", "usr", "usr/bin", "sbin",
    ] {
        let mut h = header(
            tar::EntryType::Directory,
            if dir == "tmp" { 0o1777 } else { 0o755 },
            0,
        );
        builder
            .append_data(&mut h, format!("{dir}/"), std::io::empty())
            .map_err(tar_error)?;
    }
    let binary = std::fs::read(busybox).map_err(|e| Error::io(format!("read {}", busybox.display()), e))?;
    let mut h = header(tar::EntryType::Regular, 0o755, binary.len() as u64);
    builder
        .append_data(&mut h, "bin/busybox", binary.as_slice())
        .map_err(tar_error)?;
    let passwd = b"root:x:0:0:root:/root:/bin/sh\n";
    let mut h = header(tar::EntryType::Regular, 0o644, passwd.len() as u64);
    builder
        .append_data(&mut h, "etc/passwd", &passwd[..])
        .map_err(tar_error)?;
    for applet in applets
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "busybox")
    {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        builder
            .append_link(&mut h, format!("bin/{applet}"), "busybox")
            .map_err(tar_error)?;
    }
    let tar = builder.into_inner().map_err(tar_error)?;
    let diff_id = format!("sha256:{}", sha256_hex(&tar));
    let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
    gz.write_all(&tar).map_err(tar_error)?;
    Ok((gz.finish().map_err(tar_error)?, diff_id))
}

fn put_blob(layout: &Path, data: &[u8]) -> Result<(String, usize), Error> {
    let hex = sha256_hex(data);
    let path = layout.join("blobs/sha256").join(&hex);
    std::fs::write(&path, data).map_err(|e| Error::io(format!("write {}", path.display()), e))?;
    Ok((format!("sha256:{hex}"), data.len()))
}

/// Builds a busybox image for `arch` with command `cmd` as an OCI layout under `work_dir`, pushes
/// it to `registry` (plain HTTP) as `name` (`repo:tag`) with skopeo, and returns the full
/// reference `registry/name`.
pub fn push_busybox(
    registry: &str,
    name: &str,
    arch: Arch,
    cmd: &[&str],
    work_dir: &Path,
) -> Result<String, Error> {
    let busybox = busybox_binary(arch)?;
    let layout = work_dir.join(format!("{}-{}", name.replace(['/', ':'], "_"), arch.oci_name()));
    let _ = std::fs::remove_dir_all(&layout);
    std::fs::create_dir_all(layout.join("blobs/sha256"))
        .map_err(|e| Error::io(format!("create {}", layout.display()), e))?;
    let (layer, diff_id) = busybox_layer(&busybox)?;
    let (layer_digest, layer_size) = put_blob(&layout, &layer)?;
    let config = serde_json::json!({
        "architecture": arch.oci_name(),
        "os": "linux",
        "config": {"Cmd": cmd, "Env": ["PATH=/bin:/sbin:/usr/bin"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": "walt-tests: busybox-static from Debian"}],
    });
    let (config_digest, config_size) = put_blob(&layout, config.to_string().as_bytes())?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": layer_digest, "size": layer_size}],
    });
    let (manifest_digest, manifest_size) = put_blob(&layout, manifest.to_string().as_bytes())?;
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": manifest_digest, "size": manifest_size,
                       "annotations": {"org.opencontainers.image.ref.name": "latest"}}],
    });
    for (file, text) in [
        ("index.json", index.to_string()),
        ("oci-layout", r#"{"imageLayoutVersion":"1.0.0"}"#.to_string()),
    ] {
        let path = layout.join(file);
        std::fs::write(&path, text).map_err(|e| Error::io(format!("write {}", path.display()), e))?;
    }
    let reference = format!("{registry}/{name}");
    command_output(
        Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:latest", layout.display()))
            .arg(format!("docker://{reference}")),
        &format!("skopeo copy oci:{} docker://{reference}", layout.display()),
    )?;
    Ok(reference)
}

/// Waits until the registry at `registry` (`host:port`) answers `GET /v2/` with 200.
pub fn wait_for_registry(registry: &str, deadline: Instant) -> Result<(), Error> {
    Wait::new(
        &format!("{registry} to answer GET /v2/ with 200"),
        deadline.saturating_duration_since(Instant::now()),
    )
    .every(Duration::from_millis(50))
    .until(|| match probe(registry) {
        Ok(true) => Poll::Ready(()),
        Ok(false) => Poll::Pending("GET /v2/ did not answer 200".to_string()),
        Err(e) => Poll::Pending(e.to_string()),
    })
    .map_err(|e| Error::NotReady {
        component: "registry".into(),
        reason: e.to_string(),
        log: "logs/registry.log".into(),
        tail: String::new(),
    })
}

fn probe(registry: &str) -> std::io::Result<bool> {
    let mut stream = TcpStream::connect(registry)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(stream, "GET /v2/ HTTP/1.0\r\nHost: {registry}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response.starts_with("HTTP/1.1 200") || response.starts_with("HTTP/1.0 200"))
}

/// Makes arm64 binaries run here through qemu-user (binfmt_misc, kernel-wide): mounts
/// binfmt_misc if needed and enables Debian's `qemu-aarch64` handler unless it is already on.
pub fn ensure_arm64_emulation() -> Result<(), Error> {
    let root = Path::new("/proc/sys/fs/binfmt_misc");
    if !root.join("status").exists() {
        command_output(
            Command::new("mount")
                .args(["-t", "binfmt_misc", "binfmt_misc"])
                .arg(root),
            "mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc",
        )?;
    }
    let handler = root.join("qemu-aarch64");
    let enabled =
        |path: &Path| std::fs::read_to_string(path).is_ok_and(|s| s.lines().next() == Some("enabled"));
    if enabled(&handler) {
        return Ok(());
    }
    command_output(
        Command::new("update-binfmts").args(["--enable", "qemu-aarch64"]),
        "update-binfmts --enable qemu-aarch64 (needs the Debian packages qemu-user-static and \
         binfmt-support)",
    )?;
    if enabled(&handler) {
        Ok(())
    } else {
        Err(Error::Prerequisite(format!(
            "{} is not enabled after update-binfmts --enable qemu-aarch64",
            handler.display()
        )))
    }
}
