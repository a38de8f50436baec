//! The walt container image, built without a Docker engine (`cargo xtask image build`).
//!
//! One image serves the operator, the shell pods, the virtual nodes and the binfmt agent: the static
//! (musl) `walt-operator` binary, the qemu-user interpreters the binfmt agent registers for foreign CPUs
//! (from Debian's `qemu-user-static` of the image's own architecture), the CA bundle for TLS registries and
//! a passwd entry for the non-root operator user. No shell, no package manager. Built for amd64 and arm64
//! (cross-compiled with clang and Debian's musl headers), written as an OCI image layout with one index,
//! and pushed with `skopeo copy --all --preserve-digests`, digests unchanged.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest as _, Sha256};

use crate::deploy::{cache_dir, repo_root, run, which};
use crate::registry_auth::{RegistryAuth, SkopeoSide};

/// Errors of the image build.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A helper failed (tool run, file access).
    #[error(transparent)]
    Deploy(#[from] crate::deploy::Error),
    /// The Rust target for an architecture is missing and could not be added.
    #[error(
        "the Rust target {target} is missing and `rustup target add {target}` failed:\n{detail}\n\
         (it downloads from the Rust distribution server; where that is unreachable, install the target from an offline rustup mirror)"
    )]
    MissingTarget {
        /// The target triple.
        target: String,
        /// What rustup said.
        detail: String,
    },
    /// A file the image needs is missing.
    #[error("{what} is missing at {path}: {hint}")]
    Missing {
        /// What.
        what: &'static str,
        /// Where it was expected.
        path: PathBuf,
        /// What to do.
        hint: &'static str,
    },
    /// Bad command-line input.
    #[error("{0}")]
    Usage(String),
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let to_error = crate::deploy::io(action, path);
    move |source| Error::Deploy(to_error(source))
}

fn spawn_error(tool: &str) -> impl FnOnce(std::io::Error) -> Error {
    let tool = tool.to_owned();
    move |source| Error::Deploy(crate::deploy::Error::Spawn { tool, source })
}

/// A CPU architecture the image is built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// x86-64.
    Amd64,
    /// 64-bit ARM.
    Arm64,
}

impl Arch {
    /// Both, in index order.
    pub const ALL: [Arch; 2] = [Arch::Amd64, Arch::Arm64];

    /// OCI / Debian name.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }

    /// Parses `amd64` / `arm64` (and the kernel's names).
    pub fn parse(text: &str) -> Result<Self, Error> {
        match text {
            "amd64" | "x86_64" => Ok(Arch::Amd64),
            "arm64" | "aarch64" => Ok(Arch::Arm64),
            other => Err(Error::Usage(format!(
                "unknown architecture {other:?}: use amd64 or arm64"
            ))),
        }
    }

    /// The Rust musl target.
    pub fn rust_target(self) -> &'static str {
        match self {
            Arch::Amd64 => "x86_64-unknown-linux-musl",
            Arch::Arm64 => "aarch64-unknown-linux-musl",
        }
    }

    /// The GNU triple prefix of Debian's musl directories.
    fn gnu(self) -> &'static str {
        match self {
            Arch::Amd64 => "x86_64",
            Arch::Arm64 => "aarch64",
        }
    }

    /// qemu interpreters of the foreign CPUs this architecture's image registers (names as in
    /// `walt-operator binfmt`): (file in Debian's package, name in the image).
    fn interpreters(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Arch::Amd64 => &[
                ("qemu-aarch64-static", "aarch64-binfmt-P"),
                ("qemu-arm-static", "arm-binfmt-P"),
            ],
            Arch::Arm64 => &[("qemu-x86_64-static", "x86_64-binfmt-P")],
        }
    }

    /// The architecture of this machine.
    pub fn host() -> Self {
        if cfg!(target_arch = "aarch64") {
            Arch::Arm64
        } else {
            Arch::Amd64
        }
    }
}

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Architectures (the index holds one manifest each).
    pub arches: Vec<Arch>,
    /// Where to write the OCI image layout.
    pub layout_dir: PathBuf,
    /// Tag inside the layout.
    pub tag: String,
    /// Cargo profile of the binaries (`release` ships; tests build `dist-check`).
    pub profile: BuildProfile,
}

/// One built platform image.
#[derive(Debug, Clone)]
pub struct PlatformImage {
    /// Architecture.
    pub arch: Arch,
    /// Manifest digest.
    pub manifest_digest: String,
    /// Bytes of the compressed layers (what a pull downloads).
    pub compressed_size: u64,
    /// Bytes of the unpacked files.
    pub unpacked_size: u64,
    /// Size of the walt-operator binary.
    pub binary_size: u64,
}

/// The built image.
#[derive(Debug, Clone)]
pub struct Built {
    /// The OCI image layout directory.
    pub layout_dir: PathBuf,
    /// The tag in the layout.
    pub tag: String,
    /// Digest of the index.
    pub index_digest: String,
    /// One entry per architecture.
    pub platforms: Vec<PlatformImage>,
}

fn ensure_rust_target(target: &str) -> Result<(), Error> {
    let installed = run(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if installed.lines().any(|line| line.trim() == target) {
        return Ok(());
    }
    eprintln!("image: adding the Rust target {target}");
    let output = Command::new("rustup")
        .args(["target", "add", target])
        .output()
        .map_err(spawn_error("rustup"))?;
    if output.status.success() {
        return Ok(());
    }
    Err(Error::MissingTarget {
        target: target.to_owned(),
        detail: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
    })
}

/// A clang wrapper compiling and linking for `arch` against Debian's musl (`musl-dev:<arch>`).
fn cross_cc(arch: Arch) -> Result<PathBuf, Error> {
    let gnu = arch.gnu();
    let include = PathBuf::from(format!("/usr/include/{gnu}-linux-musl"));
    if !include.join("stdlib.h").exists() {
        return Err(Error::Missing {
            what: "musl headers",
            path: include,
            hint: "install Debian's musl-dev for that architecture (apt-get install musl-dev musl-dev:arm64, after dpkg --add-architecture arm64)",
        });
    }
    if which("clang").is_none() {
        return Err(Error::Missing {
            what: "clang",
            path: "PATH".into(),
            hint: "apt-get install clang",
        });
    }
    let dir = cache_dir().join("cross");
    let sysroot = dir.join(format!("sysroot-{gnu}"));
    let usr = sysroot.join("usr");
    std::fs::create_dir_all(&usr).map_err(io("creating", &usr))?;
    for (link, target) in [
        ("include", include),
        ("lib", PathBuf::from(format!("/usr/lib/{gnu}-linux-musl"))),
    ] {
        let path = usr.join(link);
        if std::fs::read_link(&path).ok().as_deref() != Some(target.as_path()) {
            let _ = std::fs::remove_file(&path);
            std::os::unix::fs::symlink(&target, &path).map_err(io("linking", &path))?;
        }
    }
    if which("mold").is_none() {
        return Err(Error::Missing {
            what: "mold",
            path: "PATH".into(),
            hint: "apt-get install mold",
        });
    }
    let wrapper = dir.join(format!("{gnu}-linux-musl-cc"));
    // The host's GNU ld links only the host's architecture; mold links any, so the wrapper
    // picks it itself instead of relying on the caller's RUSTFLAGS. The flag is unused when
    // the wrapper only compiles C (the cc crate), hence the silenced warning.
    let script = format!(
        "#!/bin/sh\nexec clang --target={gnu}-linux-musl --sysroot={} -fuse-ld=mold -Wno-unused-command-line-argument \"$@\"\n",
        sysroot.display()
    );
    if std::fs::read_to_string(&wrapper).ok().as_deref() != Some(script.as_str()) {
        std::fs::write(&wrapper, &script).map_err(io("writing", &wrapper))?;
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))
            .map_err(io("chmod", &wrapper))?;
    }
    Ok(wrapper)
}

/// Cross-compiles the static `walt-operator` for `arch` (stripped); returns the binary's path.
pub fn build_binary(arch: Arch, profile: BuildProfile) -> Result<PathBuf, Error> {
    build_static_with(arch, "walt-operator", "walt-operator", profile)
}

/// The cargo profile of a static build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BuildProfile {
    /// `release`: optimized (thin LTO), what is shipped.
    #[default]
    Release,
    /// `dist-check` (Cargo.toml): unoptimized, no debug info, many codegen units: the same binary
    /// built in a fraction of the time, for tests of what is done with it (packaging, linking, the
    /// images the test tiers install). Never published.
    Check,
}

impl BuildProfile {
    /// The profile's name, as `cargo build --profile` takes it and as it names the output directory.
    pub fn name(self) -> &'static str {
        match self {
            BuildProfile::Release => "release",
            BuildProfile::Check => "dist-check",
        }
    }

    /// Parses `release` / `dist-check`.
    pub fn parse(text: &str) -> Result<Self, Error> {
        match text {
            "release" => Ok(BuildProfile::Release),
            "dist-check" => Ok(BuildProfile::Check),
            other => Err(Error::Usage(format!(
                "unknown build profile {other:?}: use release (what is shipped) or dist-check (tests)"
            ))),
        }
    }
}

/// Cross-compiles binary `bin` of workspace package `package` for `arch` as a static musl executable
/// (release, stripped, clang + Debian's musl); returns its path.
pub fn build_static(arch: Arch, package: &str, bin: &str) -> Result<PathBuf, Error> {
    build_static_with(arch, package, bin, BuildProfile::Release)
}

/// [`build_static`] with the cargo `profile` (stripped whichever it is).
pub fn build_static_with(
    arch: Arch,
    package: &str,
    bin: &str,
    profile: BuildProfile,
) -> Result<PathBuf, Error> {
    let target = arch.rust_target();
    ensure_rust_target(target)?;
    let cc = cross_cc(arch)?;
    let env_target = target.replace('-', "_");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let profile_name = profile.name();
    eprintln!("build: {bin} for {target} ({profile_name}, static)");
    let status = Command::new(cargo)
        .args([
            "build",
            "--profile",
            profile_name,
            "--locked",
            "-p",
            package,
            "--bin",
            bin,
            "--target",
            target,
        ])
        .env(format!("CARGO_TARGET_{}_LINKER", env_target.to_uppercase()), &cc)
        .env(format!("CC_{env_target}"), &cc)
        .env(
            format!("AR_{env_target}"),
            which("llvm-ar").unwrap_or_else(|| "ar".into()),
        )
        .env(
            format!(
                "CARGO_PROFILE_{}_STRIP",
                profile_name.replace('-', "_").to_uppercase()
            ),
            "symbols",
        )
        .current_dir(repo_root())
        .status()
        .map_err(spawn_error("cargo"))?;
    if !status.success() {
        return Err(Error::Usage(format!(
            "cargo build of {bin} for {target} failed ({status}); see its output above"
        )));
    }
    let binary = crate::deploy::target_dir()
        .join(target)
        .join(profile_name)
        .join(bin);
    if !binary.is_file() {
        return Err(Error::Missing {
            what: "the built binary",
            path: binary,
            hint: "cargo reported success: check CARGO_TARGET_DIR",
        });
    }
    Ok(binary)
}

/// Debian's qemu-user-static for `arch`, downloaded once (`apt-get download`) and unpacked in the cache.
fn qemu_dir(arch: Arch) -> Result<PathBuf, Error> {
    let root = cache_dir()
        .join("image")
        .join(format!("qemu-user-static-{}", arch.name()));
    let done = root.join(".unpacked");
    if done.exists() {
        return Ok(root.join("usr").join("bin"));
    }
    let debs = cache_dir().join("debs");
    std::fs::create_dir_all(&debs).map_err(io("creating", &debs))?;
    let wanted = "qemu-user-static_";
    let find = || -> Option<PathBuf> {
        std::fs::read_dir(&debs)
            .ok()?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| {
                let name = p
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                name.starts_with(wanted) && name.ends_with(&format!("_{}.deb", arch.name()))
            })
    };
    let deb = if let Some(deb) = find() {
        deb
    } else {
        {
            eprintln!(
                "image: downloading Debian's qemu-user-static:{} (once)",
                arch.name()
            );
            run(Command::new("apt-get")
                .args(["download", &format!("qemu-user-static:{}", arch.name())])
                .current_dir(&debs))
            .map_err(|error| {
                Error::Usage(format!(
                    "{error}\n(for arm64: dpkg --add-architecture arm64 && apt-get update)"
                ))
            })?;
            find().ok_or_else(|| Error::Missing {
                what: "the downloaded qemu-user-static package",
                path: debs.clone(),
                hint: "apt-get download printed success but left no .deb",
            })?
        }
    };
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).map_err(io("creating", &root))?;
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    std::fs::write(&done, "").map_err(io("writing", &done))?;
    Ok(root.join("usr").join("bin"))
}

/// A file of a layer (owned by root).
#[derive(Debug, Clone)]
pub struct Entry {
    path: String,
    mode: u32,
    data: Option<Vec<u8>>,
    link: Option<String>,
}

impl Entry {
    /// Its path (relative, no leading slash).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// A directory (`path` relative, no leading slash).
    pub fn dir(path: &str, mode: u32) -> Self {
        Entry {
            path: path.into(),
            mode,
            data: None,
            link: None,
        }
    }
    /// A regular file.
    pub fn file(path: &str, mode: u32, data: Vec<u8>) -> Self {
        Entry {
            path: path.into(),
            mode,
            data: Some(data),
            link: None,
        }
    }
    /// A symbolic link to `target`.
    pub fn symlink(path: &str, target: &str) -> Self {
        Entry {
            path: path.into(),
            mode: 0o777,
            data: None,
            link: Some(target.into()),
        }
    }
}

/// A written blob.
struct Blob {
    digest: String,
    size: u64,
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn write_blob(layout: &Path, bytes: &[u8]) -> Result<Blob, Error> {
    let hex = sha256_hex(bytes);
    let dir = layout.join("blobs").join("sha256");
    std::fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
    let path = dir.join(&hex);
    if !path.exists() {
        std::fs::write(&path, bytes).map_err(io("writing", &path))?;
    }
    Ok(Blob {
        digest: format!("sha256:{hex}"),
        size: bytes.len() as u64,
    })
}

/// A gzip-compressed tar layer, reproducible (fixed times and owners, sorted entries).
struct Layer {
    blob: Blob,
    diff_id: String,
    unpacked: u64,
}

fn write_layer(layout: &Path, mut entries: Vec<Entry>) -> Result<Layer, Error> {
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    let mut tar = tar::Builder::new(Vec::new());
    let mut unpacked = 0u64;
    for entry in &entries {
        let mut header = tar::Header::new_ustar();
        header.set_mode(entry.mode);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        let layer_path = layout.join("(layer)");
        let result = match (&entry.data, &entry.link) {
            (None, Some(target)) => {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_size(0);
                tar.append_link(&mut header, &entry.path, target)
            }
            (None, None) => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_size(0);
                tar.append_data(&mut header, format!("{}/", entry.path), std::io::empty())
            }
            (Some(data), _) => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_size(data.len() as u64);
                unpacked += data.len() as u64;
                tar.append_data(&mut header, &entry.path, data.as_slice())
            }
        };
        result.map_err(io("writing tar entry of", &layer_path))?;
    }
    let layer_path = layout.join("(layer)");
    let tar_bytes = tar
        .into_inner()
        .map_err(io("finishing the tar of", &layer_path))?;
    let diff_id = format!("sha256:{}", sha256_hex(&tar_bytes));
    let mut gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::best());
    gz.write_all(&tar_bytes).map_err(io("compressing", &layer_path))?;
    let compressed = gz.finish().map_err(io("compressing", &layer_path))?;
    Ok(Layer {
        blob: write_blob(layout, &compressed)?,
        diff_id,
        unpacked,
    })
}

const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(io("reading", path))
}

/// Builds one platform's image into the layout; returns its descriptor data.
fn build_platform(layout: &Path, arch: Arch, binary: &Path) -> Result<PlatformImage, Error> {
    let qemu = qemu_dir(arch)?;
    // Layer 1 (changes rarely): the base files and qemu interpreters.
    let mut base = vec![
        Entry::dir("etc", 0o755),
        Entry::dir("etc/ssl", 0o755),
        Entry::dir("etc/ssl/certs", 0o755),
        Entry::dir("tmp", 0o1777),
        Entry::dir("usr", 0o755),
        Entry::dir("usr/libexec", 0o755),
        Entry::dir("usr/libexec/qemu-binfmt", 0o755),
        Entry::dir("usr/local", 0o755),
        Entry::dir("usr/local/bin", 0o755),
        Entry::file(
            "etc/passwd",
            0o644,
            b"root:x:0:0:root:/root:/sbin/nologin\nwalt:x:65532:65532:walt:/tmp:/sbin/nologin\n".to_vec(),
        ),
        Entry::file("etc/group", 0o644, b"root:x:0:\nwalt:x:65532:\n".to_vec()),
        Entry::file("etc/nsswitch.conf", 0o644, b"hosts: files dns\n".to_vec()),
    ];
    let certs = Path::new("/etc/ssl/certs/ca-certificates.crt");
    if !certs.is_file() {
        return Err(Error::Missing {
            what: "the CA bundle",
            path: certs.into(),
            hint: "apt-get install ca-certificates",
        });
    }
    base.push(Entry::file(
        "etc/ssl/certs/ca-certificates.crt",
        0o644,
        read(certs)?,
    ));
    for (file, name) in arch.interpreters() {
        let path = qemu.join(file);
        if !path.is_file() {
            return Err(Error::Missing {
                what: "a qemu interpreter",
                path,
                hint: "the qemu-user-static package changed its layout",
            });
        }
        base.push(Entry::file(
            &format!("usr/libexec/qemu-binfmt/{name}"),
            0o755,
            read(&path)?,
        ));
    }
    let base_layer = write_layer(layout, base)?;
    // Layer 2: the binary.
    let binary_bytes = read(binary)?;
    let binary_size = binary_bytes.len() as u64;
    let app_layer = write_layer(
        layout,
        vec![Entry::file("usr/local/bin/walt-operator", 0o755, binary_bytes)],
    )?;
    let layers = [&base_layer, &app_layer];
    let version = env!("CARGO_PKG_VERSION");
    let config = serde_json::json!({
        "created": "1970-01-01T00:00:00Z",
        "architecture": arch.name(),
        "os": "linux",
        "config": {
            "Entrypoint": ["/usr/local/bin/walt-operator"],
            "Cmd": ["run"],
            "Env": ["PATH=/usr/local/bin", "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"],
            "WorkingDir": "/",
            "Labels": {
                "org.opencontainers.image.title": "walt",
                "org.opencontainers.image.description": "walt operator, shell runtime, virtual nodes and binfmt agent",
                "org.opencontainers.image.source": "https://github.com/walt-dev/walt",
                "org.opencontainers.image.version": version,
                "org.opencontainers.image.licenses": "Apache-2.0"
            }
        },
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>()},
        "history": [
            {"created": "1970-01-01T00:00:00Z", "created_by": "walt xtask image build: CA bundle, passwd, qemu-user interpreters"},
            {"created": "1970-01-01T00:00:00Z", "created_by": "walt xtask image build: walt-operator (static, musl)"}
        ]
    });
    let config_blob = write_blob(layout, &to_json(&config)?)?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": config_blob.digest, "size": config_blob.size},
        "layers": layers.iter().map(|l| serde_json::json!({
            "mediaType": LAYER_MEDIA_TYPE, "digest": l.blob.digest, "size": l.blob.size
        })).collect::<Vec<_>>(),
        "annotations": {"org.opencontainers.image.version": version}
    });
    let manifest_blob = write_blob(layout, &to_json(&manifest)?)?;
    Ok(PlatformImage {
        arch,
        manifest_digest: manifest_blob.digest,
        compressed_size: layers.iter().map(|l| l.blob.size).sum(),
        unpacked_size: layers.iter().map(|l| l.unpacked).sum(),
        binary_size,
    })
}

fn to_json(value: &serde_json::Value) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(value).map_err(|error| Error::Usage(format!("serializing JSON: {error}")))
}

/// Builds the image for every architecture into an OCI image layout (one index, tagged `tag`).
pub fn build(options: &BuildOptions) -> Result<Built, Error> {
    let layout = &options.layout_dir;
    let _ = std::fs::remove_dir_all(layout);
    std::fs::create_dir_all(layout).map_err(io("creating", layout))?;
    let mut platforms = Vec::new();
    let mut manifests = Vec::new();
    for &arch in &options.arches {
        let binary = build_binary(arch, options.profile)?;
        let image = build_platform(layout, arch, &binary)?;
        let manifest_path = layout
            .join("blobs")
            .join("sha256")
            .join(image.manifest_digest.trim_start_matches("sha256:"));
        let size = std::fs::metadata(&manifest_path)
            .map_err(io("reading", &manifest_path))?
            .len();
        manifests.push(serde_json::json!({
            "mediaType": MANIFEST_MEDIA_TYPE,
            "digest": image.manifest_digest,
            "size": size,
            "platform": {"architecture": arch.name(), "os": "linux"}
        }));
        platforms.push(image);
    }
    let index =
        serde_json::json!({"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": manifests});
    let index_blob = write_blob(layout, &to_json(&index)?)?;
    // The layout's own index.json points at the image index under the tag.
    let top = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": INDEX_MEDIA_TYPE,
        "manifests": [{
            "mediaType": INDEX_MEDIA_TYPE,
            "digest": index_blob.digest,
            "size": index_blob.size,
            "annotations": {"org.opencontainers.image.ref.name": options.tag}
        }]
    });
    let index_json = layout.join("index.json");
    std::fs::write(&index_json, to_json(&top)?).map_err(io("writing", &index_json))?;
    let oci_layout = layout.join("oci-layout");
    std::fs::write(&oci_layout, br#"{"imageLayoutVersion":"1.0.0"}"#).map_err(io("writing", &oci_layout))?;
    Ok(Built {
        layout_dir: layout.clone(),
        tag: options.tag.clone(),
        index_digest: index_blob.digest,
        platforms,
    })
}

/// Whether a registry host is plain HTTP by default (loopback).
pub fn is_loopback_registry(reference: &str) -> bool {
    let host = reference.split('/').next().unwrap_or_default();
    let name = host.rsplit_once(':').map_or(host, |(name, _)| name);
    name == "localhost" || name.starts_with("127.") || name == "[::1]"
}

/// Pushes the built index (and every manifest and blob, digests unchanged) to `reference`.
pub fn push(built: &Built, reference: &str, insecure: bool) -> Result<(), Error> {
    if reference.contains("://") || !reference.contains('/') {
        return Err(Error::Usage(format!(
            "{reference:?} is not an image reference: use REGISTRY/REPOSITORY:TAG, e.g. 127.0.0.1:5000/walt/operator:dev"
        )));
    }
    if which("skopeo").is_none() {
        return Err(Error::Missing {
            what: "skopeo",
            path: "PATH".into(),
            hint: "apt-get install skopeo",
        });
    }
    push_layout(
        &built.layout_dir,
        &built.tag,
        reference,
        insecure,
        &RegistryAuth::Anonymous,
    )
}

/// The tag of a reference (`latest` when none).
pub fn tag_of(reference: &str) -> String {
    let last = reference.rsplit('/').next().unwrap_or(reference);
    match last.split_once('@') {
        Some(_) => "latest".into(),
        None => last
            .split_once(':')
            .map_or_else(|| "latest".into(), |(_, tag)| tag.to_owned()),
    }
}

/// Human-readable size.
pub fn human(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / 1024.0 / 1024.0)
}

/// Writes a one-layer, one-platform image (e.g. a demo OS image) as an OCI image layout at `layout`
/// tagged `tag`, with `labels` in its config; returns the manifest digest.
pub fn write_simple_image(
    layout: &Path,
    tag: &str,
    arch: Arch,
    entries: Vec<Entry>,
    labels: &serde_json::Map<String, serde_json::Value>,
    entrypoint: &[&str],
    cmd: &[&str],
) -> Result<String, Error> {
    let _ = std::fs::remove_dir_all(layout);
    std::fs::create_dir_all(layout).map_err(io("creating", layout))?;
    let layer = write_layer(layout, entries)?;
    let config = serde_json::json!({
        "created": "1970-01-01T00:00:00Z",
        "architecture": arch.name(),
        "os": "linux",
        "config": {"Entrypoint": entrypoint, "Cmd": cmd, "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"], "Labels": labels},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "walt xtask lab: demo image"}]
    });
    let config_blob = write_blob(layout, &to_json(&config)?)?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": config_blob.digest, "size": config_blob.size},
        "layers": [{"mediaType": LAYER_MEDIA_TYPE, "digest": layer.blob.digest, "size": layer.blob.size}]
    });
    let manifest_blob = write_blob(layout, &to_json(&manifest)?)?;
    let top = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": INDEX_MEDIA_TYPE,
        "manifests": [{
            "mediaType": MANIFEST_MEDIA_TYPE,
            "digest": manifest_blob.digest,
            "size": manifest_blob.size,
            "platform": {"architecture": arch.name(), "os": "linux"},
            "annotations": {"org.opencontainers.image.ref.name": tag}
        }]
    });
    let index_json = layout.join("index.json");
    std::fs::write(&index_json, to_json(&top)?).map_err(io("writing", &index_json))?;
    let oci_layout = layout.join("oci-layout");
    std::fs::write(&oci_layout, br#"{"imageLayoutVersion":"1.0.0"}"#).map_err(io("writing", &oci_layout))?;
    Ok(manifest_blob.digest)
}

/// Pushes the image tagged `tag` in an OCI layout to `reference` with skopeo (digests preserved).
pub fn push_layout(
    layout: &Path,
    tag: &str,
    reference: &str,
    insecure: bool,
    auth: &RegistryAuth,
) -> Result<(), Error> {
    let mut command = Command::new("skopeo");
    command.args(["copy", "--all", "--preserve-digests", "--quiet"]);
    if insecure {
        command.arg("--dest-tls-verify=false");
    }
    command.args(auth.skopeo_arg(SkopeoSide::Destination));
    command
        .arg(format!("oci:{}:{tag}", layout.display()))
        .arg(format!("docker://{reference}"));
    run(&mut command)?;
    Ok(())
}
