//! `walt-operator shell …`: a root shell inside an OS image.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use super::changes::ChangeSummary;
use super::image::{self, RegistryAccess};
use super::kept::{self, KeptSession};
use super::root::{self, Network};
use super::session::{self, ModeChoice, ShellRequest};

/// Arguments of `walt-operator shell`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Image to open (`registry/repository:tag` or `…@sha256:…`), pulled
    /// through the layer cache.
    #[arg(long, required_unless_present = "rootfs")]
    pub image: Option<String>,
    /// Open unpacked layer directories instead of an image (repeat; top layer
    /// first). Changes are summarized but cannot be committed.
    #[arg(long, conflicts_with = "image")]
    pub rootfs: Vec<PathBuf>,
    /// init: the OS init as PID 1 (needs WalT's two scripts); basic: the shell
    /// alone; auto: init when the image has the scripts.
    #[arg(long, value_enum, default_value_t = ModeChoice::Auto)]
    pub mode: ModeChoice,
    /// On exit, push the changes as one layer on top of the image, by
    /// digest, and tag this reference (`registry/repository[:tag]`).
    #[arg(long, requires = "image")]
    pub commit_to: Option<String>,
    /// Registry host (`host:port`) spoken to over plain HTTP (repeat).
    #[arg(long)]
    pub insecure_registry: Vec<String>,
    /// Docker `config.json` with registry credentials (default:
    /// `$REGISTRY_AUTH_FILE`, `$DOCKER_CONFIG/config.json` or
    /// `~/.docker/config.json` when present).
    #[arg(long)]
    pub registry_auth_file: Option<PathBuf>,
    /// Pick this platform (`linux/arm64`) from a multi-arch image.
    #[arg(long)]
    pub platform: Option<String>,
    /// The image's CPU architecture, for `--rootfs` (default: read from its
    /// `/bin/sh`).
    #[arg(long)]
    pub arch: Option<String>,
    /// host: the network of the caller (the pod's, in a cluster); none: a new
    /// network namespace with loopback only.
    #[arg(long, value_enum, default_value_t = NetworkChoice::Host)]
    pub network: NetworkChoice,
    /// The walt cache: layer cache and session directories (on a real
    /// filesystem, not an overlay).
    #[arg(long, env = "WALT_CACHE", default_value_os_t = default_cache_dir())]
    pub cache_dir: PathBuf,
    /// Write PID 1's console (init mode) to this file.
    #[arg(long)]
    pub console_log: Option<PathBuf>,
    /// Seconds the shutdown script, then init, may take before being killed.
    #[arg(long, default_value_t = 30)]
    pub shutdown_timeout: u64,
    /// Keep the changes in the cache as session ID (a shell pod passes its session's uid): when this
    /// process is stopped (SIGTERM: the pod evicted or deleted) or killed, the changes stay in
    /// `<cache>/sessions/kept-ID` and the next run with the same ID continues on them; nothing is
    /// committed on a stop. Kept changes no run took for an hour are removed.
    #[arg(long, value_name = "ID")]
    pub keep_changes_as: Option<String>,
}

/// `--network` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NetworkChoice {
    /// The caller's network.
    Host,
    /// Loopback only.
    None,
}

/// `$HOME/.cache/walt`, else `/var/cache/walt` (`$WALT_CACHE` overrides it,
/// like for the test fixtures).
pub fn default_cache_dir() -> PathBuf {
    if let Some(home) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(home).join(".cache/walt");
    }
    PathBuf::from("/var/cache/walt")
}

/// The result line: the last line of stdout and `/dev/termination-log`.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ShellResult {
    /// Digest of the pushed manifest (`sha256:…`), when committed.
    pub digest: Option<String>,
    /// Reference tagged, when committed.
    pub reference: Option<String>,
    /// What changed.
    pub summary: ChangeSummary,
    /// Whether the image ran through qemu-user.
    pub emulated: bool,
    /// The image's architecture.
    pub architecture: String,
    /// `init` or `basic`.
    pub mode: session::Mode,
    /// The shell's exit code.
    pub exit_code: i32,
    /// The privileges the shell ran with: capability bounding set, effective set,
    /// `no_new_privs` (see [`super::privileges`]).
    pub privileges: Option<super::privileges::Bounds>,
    /// The shell was stopped with `--keep-changes-as`: nothing was committed, the changes are kept
    /// for the session's next shell pod.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub kept: bool,
}

/// Runs `walt-operator shell …`.
pub fn run(args: &Args) -> Result<i32, Box<dyn std::error::Error + Send + Sync>> {
    let kept = args
        .keep_changes_as
        .as_deref()
        .map(|id| KeptSession::open(&args.cache_dir, id, kept::TAKEOVER_WAIT))
        .transpose()?;
    let session_dir = match &kept {
        Some(kept) => kept.dir.clone(),
        None => new_session_dir(&args.cache_dir)?,
    };
    let mut guard = RemoveOnDrop(session_dir.clone());
    if kept.as_ref().is_some_and(|kept| kept.resumed) {
        println!(
            "walt: continuing on the changes this session's earlier shell pod left (it was stopped or lost)\r"
        );
    }
    let access = RegistryAccess {
        insecure_registries: args.insecure_registry.clone(),
        auth_file: args.registry_auth_file.clone(),
    };
    let pulled = match &args.image {
        Some(reference) => Some(image::pull(
            reference,
            args.platform.as_deref(),
            &access,
            &args.cache_dir,
            root::in_user_namespace(),
        )?),
        None => None,
    };
    let (lower_dirs, architecture, os) = match &pulled {
        Some(pulled) => (
            pulled.lower_dirs.clone(),
            Some(pulled.architecture.clone()),
            Some(pulled.os.clone()),
        ),
        None => (args.rootfs.clone(), args.arch.clone(), None),
    };
    let request = ShellRequest {
        lower_dirs,
        session_dir: session_dir.clone(),
        mode: args.mode,
        architecture,
        os,
        network: match args.network {
            NetworkChoice::Host => Network::Host,
            NetworkChoice::None => Network::None,
        },
        console_log: args.console_log.clone(),
        shutdown_timeout: Duration::from_secs(args.shutdown_timeout),
    };
    let inspection = session::inspect(&request)?;
    let outcome = session::run(&request, &inspection)?;
    let mut result = ShellResult {
        digest: None,
        reference: None,
        summary: outcome.summary,
        emulated: outcome.emulated,
        architecture: outcome.architecture.clone(),
        mode: outcome.mode,
        exit_code: outcome.exit_code,
        privileges: outcome.bounds.clone(),
        kept: false,
    };
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "\r\nChanges: {}", outcome.summary)?;
    result.kept = kept.is_some() && outcome.hung_up;
    if result.kept {
        // Stopped, not ended by the user: the session's next shell pod continues on the changes.
        writeln!(
            stdout,
            "walt: this shell pod is being stopped; the changes stay on this cluster node for the session's next shell pod"
        )?;
        guard.keep();
    } else if let (Some(target), Some(pulled)) = (&args.commit_to, &pulled) {
        writeln!(stdout, "Committing to {target}...")?;
        stdout.flush()?;
        let committed = image::commit(pulled, &outcome.upper_dir, target, &access)?;
        writeln!(stdout, "Saved {target} ({})", committed.pinned)?;
        result.digest = Some(committed.digest);
        result.reference = Some(target.clone());
    }
    let line = serde_json::to_string(&result)?;
    writeln!(stdout, "{line}")?;
    stdout.flush()?;
    let termination_log = std::path::Path::new("/dev/termination-log");
    if termination_log.exists() {
        let _ = std::fs::write(termination_log, &line);
    }
    drop(guard);
    Ok(outcome.exit_code)
}

pub(crate) fn new_session_dir(cache_dir: &std::path::Path) -> std::io::Result<PathBuf> {
    let sessions = cache_dir.join("sessions");
    std::fs::create_dir_all(&sessions)?;
    remove_stale_sessions(&sessions);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let dir = sessions.join(format!("{}-{nanos:x}", std::process::id()));
    std::fs::create_dir(&dir)?;
    Ok(dir)
}

/// Removes session directories left by runtimes that were killed (named
/// `<pid>-…`, that PID no longer running). Their mounts went with their mount
/// namespace; only the directories remain.
fn remove_stale_sessions(sessions: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(sessions) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.split('-').next().and_then(|pid| pid.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Removes the session directory (upper dir included) when the command ends, unless kept.
pub(crate) struct RemoveOnDrop(pub(crate) PathBuf);

impl RemoveOnDrop {
    /// Leaves the directory where it is.
    pub(crate) fn keep(&mut self) {
        self.0 = PathBuf::new();
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if !self.0.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
