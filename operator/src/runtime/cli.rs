//! `walt-operator shell …`: a root shell inside an OS image.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use super::changes::ChangeSummary;
use super::image::{self, RegistryAccess};
use super::kept::{self, KeptSession};
use super::root::{self, Network};
use super::session::{self, ModeChoice, ShellRequest};
use super::session_dir::SessionDir;

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

/// The result line: in a pod, its termination log; elsewhere, the last line of stdout (see
/// [`report_result`]).
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
    // Dropped before `kept`: the directory goes before its lock is let go.
    let mut workdir = match &kept {
        Some(kept) => SessionDir::of_kept(kept.dir.clone()),
        None => SessionDir::create(&args.cache_dir).map_err(|error| {
            format!(
                "creating a session directory under {}: {error}",
                args.cache_dir.display()
            )
        })?,
    };
    let session_dir = workdir.path().to_path_buf();
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
        workdir.keep();
    } else if let (Some(target), Some(pulled)) = (&args.commit_to, &pulled) {
        writeln!(stdout, "Committing to {target}...")?;
        stdout.flush()?;
        let committed = image::commit(pulled, &outcome.upper_dir, target, &access)?;
        writeln!(stdout, "Saved {target} ({})", committed.pinned)?;
        result.digest = Some(committed.digest);
        result.reference = Some(target.clone());
    }
    report_result(&serde_json::to_string(&result)?, &mut stdout)?;
    drop(workdir);
    Ok(outcome.exit_code)
}

/// Where a pod's status reads what its container said last (the kubelet's default
/// `terminationMessagePath`; it exists in every container of a pod).
pub(crate) const TERMINATION_LOG: &str = "/dev/termination-log";

/// Reports a result line (JSON). In a pod it goes to its termination log, which the operator reads
/// from the pod's status; the person at the attached terminal already saw it said in words. Run
/// elsewhere (by hand, by a script), or when the termination log cannot be written (then said on
/// stderr), it is the last line of stdout.
pub(crate) fn report_result(line: &str, stdout: &mut impl Write) -> std::io::Result<()> {
    match write_termination_log(line) {
        Some(Ok(())) => return Ok(()),
        Some(Err(error)) => eprintln!("walt: could not write the result to {TERMINATION_LOG}: {error}"),
        None => {}
    }
    writeln!(stdout, "{line}")?;
    stdout.flush()
}

/// Writes `text` as the pod's termination message: `None` when not run in a pod (no termination log
/// to write), else how the write went.
pub(crate) fn write_termination_log(text: &str) -> Option<std::io::Result<()>> {
    let termination_log = std::path::Path::new(TERMINATION_LOG);
    termination_log
        .exists()
        .then(|| std::fs::write(termination_log, text))
}
