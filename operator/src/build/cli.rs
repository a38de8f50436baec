//! `walt-operator build`: build an image from a Dockerfile on this host.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use super::executor::{BuildRequest, build};
use crate::runtime::cli::{NetworkChoice, report_result, write_termination_log};
use crate::runtime::image::RegistryAccess;
use crate::runtime::root::Network;

/// Arguments of `walt-operator build`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The build context: the directory `COPY` and `ADD` read from (`.dockerignore` honoured).
    #[arg(long, value_name = "DIR", required_unless_present = "context_tar")]
    pub context: Option<PathBuf>,
    /// The build context as a tar archive instead: a file, or `-` for standard input (how build pods
    /// get it from `kubectl walt image build`). It is unpacked under the cache directory; `RUN` steps
    /// then get an empty standard input, as with `docker build`.
    #[arg(long, value_name = "FILE|-", conflicts_with = "context")]
    pub context_tar: Option<PathBuf>,
    /// The Dockerfile, relative to the context unless absolute (default: `Dockerfile`, else
    /// `Containerfile`).
    #[arg(long, short = 'f', value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// A build argument (`NAME=value`) for an `ARG` (repeat).
    #[arg(long = "build-arg", value_name = "NAME=VALUE")]
    pub build_args: Vec<String>,
    /// The image to push (by digest) and tag: `registry/repository[:tag]`.
    #[arg(long, value_name = "REF")]
    pub to: String,
    /// Build this stage (`FROM … AS name`) instead of the last.
    #[arg(long, value_name = "STAGE")]
    pub target: Option<String>,
    /// The platform of base images that have several, and of `FROM scratch` (`linux/arm64`).
    #[arg(long)]
    pub platform: Option<String>,
    /// Network of `RUN` steps: host (the caller's, in a cluster the pod's) or none (loopback only).
    #[arg(long, value_enum, default_value_t = NetworkChoice::Host)]
    pub network: NetworkChoice,
    /// Run every step, ignoring the step cache.
    #[arg(long)]
    pub no_cache: bool,
    /// Registry host (`host:port`) spoken to over plain HTTP (repeat).
    #[arg(long)]
    pub insecure_registry: Vec<String>,
    /// Docker `config.json` with registry credentials (default: `$REGISTRY_AUTH_FILE`,
    /// `$DOCKER_CONFIG/config.json` or `~/.docker/config.json` when present).
    #[arg(long)]
    pub registry_auth_file: Option<PathBuf>,
    /// The walt cache: layer cache, step cache and session directories (on a real filesystem).
    #[arg(long, env = "WALT_CACHE", default_value_os_t = crate::runtime::cli::default_cache_dir())]
    pub cache_dir: PathBuf,
}

/// Parses `NAME=VALUE` build args.
pub fn parse_build_args(values: &[String]) -> Result<BTreeMap<String, String>, String> {
    let mut args = BTreeMap::new();
    for value in values {
        let Some((name, text)) = value.split_once('=') else {
            return Err(format!("--build-arg {value}: expected NAME=VALUE"));
        };
        if name.is_empty() {
            return Err(format!("--build-arg {value}: the name is empty"));
        }
        args.insert(name.to_owned(), text.to_owned());
    }
    Ok(args)
}

/// Runs `walt-operator build …`: prints the step log, then reports the result as one JSON line (in a
/// pod, in its termination log; see [`report_result`]).
pub fn run(args: &Args) -> Result<i32, Box<dyn std::error::Error + Send + Sync>> {
    let (context_dir, _unpacked) = context_dir(args)?;
    let request = BuildRequest {
        context_dir,
        dockerfile: args.file.clone(),
        build_args: parse_build_args(&args.build_args)?,
        target: args.to.clone(),
        target_stage: args.target.clone(),
        platform: args.platform.clone(),
        access: RegistryAccess {
            insecure_registries: args.insecure_registry.clone(),
            auth_file: args.registry_auth_file.clone(),
        },
        cache_dir: args.cache_dir.clone(),
        network: match args.network {
            NetworkChoice::Host => Network::Host,
            NetworkChoice::None => Network::None,
        },
        no_cache: args.no_cache,
    };
    let result = match build(&request) {
        Ok(result) => result,
        Err(error) => {
            // The pod's termination message says why, whatever the log holds (the error itself is
            // said on stderr by the caller, so a failed write here adds nothing to say).
            let _ = write_termination_log(&format!("walt-operator: {error}"));
            return Err(error.into());
        }
    };
    report_result(&serde_json::to_string(&result)?, &mut std::io::stdout().lock())?;
    Ok(0)
}

/// Why a context archive could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ContextTarError {
    /// Reading or unpacking failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// An entry would land outside the context directory.
    #[error("the context archive holds {0:?}, which points outside the context: refused")]
    Escapes(String),
}

/// The context directory: `--context`, or `--context-tar` unpacked into a temporary directory under
/// the cache (removed when the returned guard drops).
fn context_dir(args: &Args) -> Result<(PathBuf, Option<tempfile::TempDir>), ContextTarError> {
    let Some(archive) = &args.context_tar else {
        return Ok((args.context.clone().unwrap_or_default(), None));
    };
    let parent = args.cache_dir.join("build-contexts");
    std::fs::create_dir_all(&parent).map_err(|source| ContextTarError::Io {
        what: format!("creating {}", parent.display()),
        source,
    })?;
    let dir = tempfile::Builder::new()
        .prefix("context-")
        .tempdir_in(&parent)
        .map_err(|source| ContextTarError::Io {
            what: format!("creating a directory in {}", parent.display()),
            source,
        })?;
    let (files, bytes) = if archive.as_os_str() == "-" {
        let counts = unpack_context(std::io::stdin().lock(), dir.path())?;
        // What the client sent is read: RUN steps get an empty input, as with `docker build`.
        let null = std::fs::File::open("/dev/null").map_err(|source| ContextTarError::Io {
            what: "opening /dev/null".into(),
            source,
        })?;
        nix::unistd::dup2_stdin(&null).map_err(|errno| ContextTarError::Io {
            what: "closing the standard input".into(),
            source: errno.into(),
        })?;
        counts
    } else {
        let file = std::fs::File::open(archive).map_err(|source| ContextTarError::Io {
            what: format!("opening {}", archive.display()),
            source,
        })?;
        unpack_context(std::io::BufReader::new(file), dir.path())?
    };
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(
        stdout,
        "{} {files} files, {bytes} bytes",
        walt_crds::image_build::CONTEXT_RECEIVED
    );
    let _ = stdout.flush();
    Ok((dir.path().to_path_buf(), Some(dir)))
}

/// Unpacks a tar archive of a build context into `dir` (modes and times kept, owners not: `COPY
/// --chown` decides those); returns the number of entries and the bytes of file content. The archive
/// ends at its end-of-archive blocks: the writer need not close the stream.
pub fn unpack_context(reader: impl std::io::Read, dir: &Path) -> Result<(u64, u64), ContextTarError> {
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    let unreadable = |source| ContextTarError::Io {
        what: "reading the context archive".into(),
        source,
    };
    let (mut files, mut bytes) = (0, 0);
    for entry in archive.entries().map_err(unreadable)? {
        let mut entry = entry.map_err(unreadable)?;
        let path = entry.path().map_err(unreadable)?.display().to_string();
        let size = entry.size();
        if !entry.unpack_in(dir).map_err(|source| ContextTarError::Io {
            what: format!("unpacking {path} of the context archive"),
            source,
        })? {
            return Err(ContextTarError::Escapes(path));
        }
        files += 1;
        bytes += size;
    }
    Ok((files, bytes))
}

#[cfg(test)]
mod tests {
    use super::{ContextTarError, parse_build_args, unpack_context};

    fn archive(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, data) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o640);
            header.set_entry_type(tar::EntryType::Regular);
            // `set_path` refuses `..`: write the name bytes as a hostile client would.
            header.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
            header.set_cksum();
            builder.append(&header, *data).unwrap();
        }
        builder.into_inner().unwrap()
    }

    #[test]
    fn a_context_archive_is_unpacked_and_may_not_escape() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = archive(&[
            ("Dockerfile", b"FROM scratch\n".as_slice()),
            ("src/a.txt", b"a".as_slice()),
        ]);
        // Trailing data after the end-of-archive blocks is not read.
        bytes.extend_from_slice(b"not read");
        assert_eq!(unpack_context(bytes.as_slice(), dir.path()).unwrap(), (2, 14));
        assert_eq!(std::fs::read(dir.path().join("src/a.txt")).unwrap(), b"a");
        let mode = std::fs::metadata(dir.path().join("Dockerfile"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o640);
        let hostile = archive(&[("../escape", b"x".as_slice())]);
        let refused = unpack_context(hostile.as_slice(), dir.path());
        assert!(matches!(refused, Err(ContextTarError::Escapes(_))), "{refused:?}");
        assert!(!dir.path().parent().unwrap().join("escape").exists());
    }

    #[test]
    fn build_args() {
        let args = parse_build_args(&["A=1".into(), "B=x=y".into(), "C=".into()]).unwrap();
        assert_eq!(args["A"], "1");
        assert_eq!(args["B"], "x=y");
        assert_eq!(args["C"], "");
        assert!(
            parse_build_args(&["A".into()])
                .unwrap_err()
                .contains("NAME=VALUE")
        );
        assert!(parse_build_args(&["=1".into()]).is_err());
    }
}
