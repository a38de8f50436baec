//! Release archives of the `kubectl walt` plugin (`cargo xtask dist`), as kubectl users expect them: one
//! `kubectl-walt_<version>_linux_<arch>.tar.gz` per architecture (the static musl binary built by
//! [`image_build::build_static`], `LICENSE`, `README.md`), a `SHA256SUMS` file (`sha256sum -c` reads it)
//! and a krew plugin manifest `walt.yaml` whose platforms point at the archives under a base URL.
//!
//! The archives are reproducible: entries in a fixed order, owned by root, dated `SOURCE_DATE_EPOCH`
//! (else 0), gzip without a timestamp.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest as _, Sha256};

use crate::deploy::repo_root;
use crate::image_build::{self, Arch, BuildProfile};

/// Name of the plugin binary (kubectl finds `kubectl-walt` on PATH as `kubectl walt`).
pub const PLUGIN_BINARY: &str = "kubectl-walt";
/// The plugin's name in krew (`kubectl krew install walt`).
pub const KREW_NAME: &str = "walt";
/// Where the archives are downloaded from by default: the GitHub release of the version.
pub const DEFAULT_BASE_URL: &str = "https://github.com/walt-dev/walt/releases/download/v{version}";
/// Files of the repository shipped next to the binary.
const DOC_FILES: [&str; 2] = ["LICENSE", "README.md"];

/// Errors of `cargo xtask dist`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Building the binary failed.
    #[error("building {PLUGIN_BINARY} for {arch}: {source}")]
    Build {
        /// The architecture.
        arch: &'static str,
        /// The cause.
        #[source]
        source: image_build::Error,
    },
    /// A file could not be read or written.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The krew manifest could not be written as YAML.
    #[error("writing the krew manifest: {0}")]
    Yaml(#[from] Box<serde_saphyr::SerializeError>),
    /// Bad options.
    #[error("{0}")]
    Usage(String),
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_owned();
    move |source| Error::Io { action, path, source }
}

/// What `cargo xtask dist` makes.
#[derive(Debug, Clone)]
pub struct Options {
    /// Output directory (created).
    pub out_dir: PathBuf,
    /// Version in file names (`0.1.0`) and, with a `v`, in the krew manifest.
    pub version: String,
    /// URL the archives are published under; `{version}` is replaced.
    pub base_url: String,
    /// Architectures.
    pub arches: Vec<Arch>,
    /// The cargo profile of the binaries: `release` ships; `dist-check` checks the packaging quickly.
    pub profile: BuildProfile,
}

/// One archive made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Archive {
    /// Its architecture.
    pub arch: Arch,
    /// Its file name.
    pub name: String,
    /// Its path.
    pub path: PathBuf,
    /// Its SHA-256 (hex).
    pub sha256: String,
    /// Its size in bytes.
    pub size: u64,
}

/// What was made.
#[derive(Debug, Clone)]
pub struct Dist {
    /// The archives, in the order of [`Options::arches`].
    pub archives: Vec<Archive>,
    /// `SHA256SUMS`.
    pub sums: PathBuf,
    /// The krew manifest.
    pub krew_manifest: PathBuf,
}

/// `kubectl-walt_<version>_linux_<arch>.tar.gz`.
pub fn archive_name(version: &str, arch: Arch) -> String {
    format!("{PLUGIN_BINARY}_{version}_linux_{}.tar.gz", arch.name())
}

/// The version of the workspace (what `kubectl-walt --version` prints).
pub fn workspace_version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// `base_url` with `{version}` replaced and no trailing slash; refuses one that is not http(s) or file.
pub fn resolve_base_url(base_url: &str, version: &str) -> Result<String, Error> {
    let url = base_url.replace("{version}", version);
    if !["https://", "http://", "file://"]
        .iter()
        .any(|scheme| url.starts_with(scheme))
    {
        return Err(Error::Usage(format!(
            "--base-url `{base_url}` must start with https://, http:// or file://"
        )));
    }
    Ok(url.trim_end_matches('/').to_owned())
}

/// The lines of `SHA256SUMS` (`<hex>  <name>`, as `sha256sum` writes and `sha256sum -c` reads), sorted by name.
pub fn sha256sums(archives: &[Archive]) -> String {
    let mut lines: Vec<(&str, String)> = archives
        .iter()
        .map(|archive| {
            (
                archive.name.as_str(),
                format!("{}  {}\n", archive.sha256, archive.name),
            )
        })
        .collect();
    lines.sort();
    lines.into_iter().map(|(_, line)| line).collect()
}

/// A krew plugin manifest (krew.googlecontainertools.github.com/v1alpha2, kind Plugin), in krew's field order.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct KrewPlugin {
    /// Always `krew.googlecontainertools.github.com/v1alpha2`.
    api_version: &'static str,
    /// Always `Plugin`.
    kind: &'static str,
    /// The plugin's name.
    metadata: KrewMetadata,
    /// Version, descriptions and one platform per archive.
    spec: KrewSpec,
}

/// `metadata` of a krew manifest.
#[derive(Debug, Serialize)]
struct KrewMetadata {
    /// The name `kubectl krew install` takes.
    name: &'static str,
}

/// `spec` of a krew manifest.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct KrewSpec {
    /// `v` and the workspace version.
    version: String,
    /// The project's page.
    homepage: &'static str,
    /// One line for `kubectl krew search`.
    short_description: &'static str,
    /// What the plugin does.
    description: &'static str,
    /// One per archive.
    platforms: Vec<KrewPlatform>,
}

/// A platform of a krew manifest: which machines it is for and where its archive is.
#[derive(Debug, Serialize)]
struct KrewPlatform {
    /// `matchLabels` on `os` and `arch`.
    selector: KrewSelector,
    /// Where the archive is downloaded from.
    uri: String,
    /// The archive's sha256 (hex).
    sha256: String,
    /// The binary inside the archive kubectl runs.
    bin: &'static str,
    /// The files of the archive krew installs.
    files: Vec<KrewFile>,
}

/// A label selector on `os` and `arch`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct KrewSelector {
    /// `os` and `arch` labels.
    match_labels: std::collections::BTreeMap<&'static str, &'static str>,
}

/// A file krew copies out of the archive.
#[derive(Debug, Serialize)]
struct KrewFile {
    /// Path inside the archive.
    from: &'static str,
    /// Where it goes in the plugin's directory.
    to: &'static str,
}

fn krew_platform(archive: &Archive, base_url: &str) -> KrewPlatform {
    KrewPlatform {
        selector: KrewSelector {
            match_labels: [("os", "linux"), ("arch", archive.arch.name())]
                .into_iter()
                .collect(),
        },
        uri: format!("{base_url}/{}", archive.name),
        sha256: archive.sha256.clone(),
        bin: PLUGIN_BINARY,
        files: std::iter::once(PLUGIN_BINARY)
            .chain(DOC_FILES)
            .map(|from| KrewFile { from, to: "." })
            .collect(),
    }
}

/// The krew plugin manifest (`apiVersion: krew.googlecontainertools.github.com/v1alpha2`, kind Plugin)
/// naming each archive under `base_url` with its sha256.
pub fn krew_manifest(version: &str, base_url: &str, archives: &[Archive]) -> Result<String, Error> {
    let manifest = KrewPlugin {
        api_version: "krew.googlecontainertools.github.com/v1alpha2",
        kind: "Plugin",
        metadata: KrewMetadata { name: KREW_NAME },
        spec: KrewSpec {
            version: format!("v{version}"),
            homepage: "https://github.com/walt-dev/walt",
            short_description: "WalT testbed workflows on Kubernetes",
            description: "Drive the walt operator: open a root shell inside an OS image (arm64 too) and save\n\
                          it as a new image, open an SSH shell on a lab node, save a running node's changes,\n\
                          and list, clone and manage images and nodes.\n",
            platforms: archives.iter().map(|a| krew_platform(a, base_url)).collect(),
        },
    };
    serde_saphyr::to_string(&manifest).map_err(|e| Error::Yaml(Box::new(e)))
}

fn mtime() -> u64 {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(0)
}

/// Writes `out` as a gzip tar of `entries` (name in the archive, file, mode), reproducibly.
pub fn write_tar_gz(out: &Path, entries: &[(&str, PathBuf, u32)]) -> Result<(), Error> {
    let file = std::fs::File::create(out).map_err(io("creating", out))?;
    let gzip = flate2::GzBuilder::new().write(file, flate2::Compression::best());
    let mut builder = tar::Builder::new(gzip);
    for (name, path, mode) in entries {
        let data = std::fs::read(path).map_err(io("reading", path))?;
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(*mode);
        header.set_mtime(mtime());
        header.set_uid(0);
        header.set_gid(0);
        header.set_entry_type(tar::EntryType::Regular);
        builder
            .append_data(&mut header, name, data.as_slice())
            .map_err(io("archiving into", out))?;
    }
    let gzip = builder.into_inner().map_err(io("finishing", out))?;
    let mut file = gzip.finish().map_err(io("finishing", out))?;
    file.flush().map_err(io("writing", out))?;
    Ok(())
}

/// SHA-256 (hex) and size of a file.
pub fn sha256_file(path: &Path) -> Result<(String, u64), Error> {
    let bytes = std::fs::read(path).map_err(io("reading", path))?;
    Ok((hex::encode(Sha256::digest(&bytes)), bytes.len() as u64))
}

fn package(options: &Options, arch: Arch) -> Result<Archive, Error> {
    let binary = image_build::build_static_with(arch, PLUGIN_BINARY, PLUGIN_BINARY, options.profile)
        .map_err(|source| Error::Build {
            arch: arch.name(),
            source,
        })?;
    let root = repo_root();
    let mut entries = vec![(PLUGIN_BINARY, binary, 0o755)];
    entries.extend(DOC_FILES.map(|name| (name, root.join(name), 0o644)));
    let name = archive_name(&options.version, arch);
    let path = options.out_dir.join(&name);
    write_tar_gz(&path, &entries)?;
    let (sha256, size) = sha256_file(&path)?;
    Ok(Archive {
        arch,
        name,
        path,
        sha256,
        size,
    })
}

/// Builds the archives, `SHA256SUMS` and the krew manifest into [`Options::out_dir`].
pub fn dist(options: &Options) -> Result<Dist, Error> {
    if options.arches.is_empty() {
        return Err(Error::Usage("no architecture to build".into()));
    }
    let base_url = resolve_base_url(&options.base_url, &options.version)?;
    std::fs::create_dir_all(&options.out_dir).map_err(io("creating", &options.out_dir))?;
    let archives = options
        .arches
        .iter()
        .map(|arch| package(options, *arch))
        .collect::<Result<Vec<_>, _>>()?;
    let sums = options.out_dir.join("SHA256SUMS");
    std::fs::write(&sums, sha256sums(&archives)).map_err(io("writing", &sums))?;
    let krew_manifest_path = options.out_dir.join(format!("{KREW_NAME}.yaml"));
    std::fs::write(
        &krew_manifest_path,
        krew_manifest(&options.version, &base_url, &archives)?,
    )
    .map_err(io("writing", &krew_manifest_path))?;
    Ok(Dist {
        archives,
        sums,
        krew_manifest: krew_manifest_path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn string(text: &str) -> Value {
        Value::String(text.to_owned())
    }

    fn archive(arch: Arch, sha: &str) -> Archive {
        Archive {
            arch,
            name: archive_name("1.2.3", arch),
            path: PathBuf::from("/x"),
            sha256: sha.into(),
            size: 1,
        }
    }

    #[test]
    fn archive_names_follow_the_kubectl_plugin_convention() {
        assert_eq!(
            archive_name("0.1.0", Arch::Amd64),
            "kubectl-walt_0.1.0_linux_amd64.tar.gz"
        );
        assert_eq!(
            archive_name("0.1.0", Arch::Arm64),
            "kubectl-walt_0.1.0_linux_arm64.tar.gz"
        );
    }

    #[test]
    fn base_urls_get_the_version_and_lose_the_trailing_slash() {
        assert_eq!(
            resolve_base_url(DEFAULT_BASE_URL, "0.1.0").expect("valid"),
            "https://github.com/walt-dev/walt/releases/download/v0.1.0"
        );
        assert_eq!(
            resolve_base_url("file:///srv/dist/", "1").expect("valid"),
            "file:///srv/dist"
        );
        let error = resolve_base_url("ftp://x", "1").unwrap_err().to_string();
        assert!(error.contains("https://"), "{error}");
    }

    #[test]
    fn sums_are_in_sha256sum_format_sorted_by_name() {
        let sums = sha256sums(&[archive(Arch::Arm64, "bb"), archive(Arch::Amd64, "aa")]);
        assert_eq!(
            sums,
            "aa  kubectl-walt_1.2.3_linux_amd64.tar.gz\nbb  kubectl-walt_1.2.3_linux_arm64.tar.gz\n"
        );
    }

    #[test]
    fn the_krew_manifest_names_each_archive_with_its_sha256() {
        let archives = [archive(Arch::Amd64, "aa"), archive(Arch::Arm64, "bb")];
        let text = krew_manifest("1.2.3", "https://dl.example/v1.2.3", &archives).expect("yaml");
        let manifest: Value = serde_saphyr::from_str(&text).expect("parses");
        assert_eq!(
            manifest["apiVersion"],
            string("krew.googlecontainertools.github.com/v1alpha2")
        );
        assert_eq!(manifest["kind"], string("Plugin"));
        assert_eq!(manifest["metadata"]["name"], string("walt"));
        assert_eq!(manifest["spec"]["version"], string("v1.2.3"));
        let platforms = manifest["spec"]["platforms"].as_array().expect("platforms");
        assert_eq!(platforms.len(), 2);
        for (platform, (arch, sha)) in platforms.iter().zip([("amd64", "aa"), ("arm64", "bb")]) {
            assert_eq!(platform["selector"]["matchLabels"]["os"], string("linux"));
            assert_eq!(platform["selector"]["matchLabels"]["arch"], string(arch));
            assert_eq!(
                platform["uri"],
                string(&format!(
                    "https://dl.example/v1.2.3/kubectl-walt_1.2.3_linux_{arch}.tar.gz"
                ))
            );
            assert_eq!(platform["sha256"], string(sha));
            assert_eq!(platform["bin"], string("kubectl-walt"));
        }
    }

    #[test]
    fn archives_are_reproducible() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("f");
        std::fs::write(&file, b"content").expect("write");
        let entries = [("f", file.clone(), 0o644)];
        let (a, b) = (dir.path().join("a.tar.gz"), dir.path().join("b.tar.gz"));
        write_tar_gz(&a, &entries).expect("a");
        std::thread::sleep(std::time::Duration::from_millis(1100));
        write_tar_gz(&b, &entries).expect("b");
        assert_eq!(sha256_file(&a).expect("a").0, sha256_file(&b).expect("b").0);
    }
}
