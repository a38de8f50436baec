//! `walt-operator save …` and `walt-operator gateway …` (`vnode` lives in [`super::vnode`]).

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::SshError;
use super::client::{self, ClientConfig, HostKeyPolicy, NodeClient, NodeTarget, Transport};
use super::export::{self, ExportOptions, Progress};
use super::gateway::{Authorization, Authorizations, Gateway, GatewayConfig};
use super::save::{SaveOptions, SaveProgress, push_node_changes};
use crate::oci::{PushedImage, RegistryClient, ResolvedImage};
use crate::runtime::image::{RegistryAccess, split_target};

type CliError = Box<dyn std::error::Error + Send + Sync>;
type CliResult = Result<i32, CliError>;

/// How to reach a node (shared by `save` and `gateway`).
#[derive(Debug, clap::Args)]
pub struct NodeArgs {
    /// The node: USER@HOST[:PORT].
    #[arg(long, value_name = "USER@HOST[:PORT]")]
    pub node: NodeTarget,
    /// The private key to log in to the node with (unencrypted OpenSSH or PEM).
    #[arg(long, value_name = "KEY")]
    pub identity: PathBuf,
    /// known_hosts-style file: the node's key is checked against it, or recorded there on first
    /// contact. Without it (and without --host-key), the node's key is accepted and printed.
    #[arg(long, value_name = "FILE")]
    pub known_hosts: Option<PathBuf>,
    /// The node's host public key (an OpenSSH line, or a file holding one): only this key is accepted.
    #[arg(long, value_name = "KEY|FILE", conflicts_with = "known_hosts")]
    pub host_key: Option<String>,
    /// Reach the node through this command's stdin/stdout (like OpenSSH's ProxyCommand): split into
    /// a program and its arguments like a shell splits words, run without a shell; %h and %p are
    /// replaced by the host and port inside each argument.
    #[arg(long, value_name = "COMMAND", value_parser = client::ProxyCommand::parse)]
    pub proxy_command: Option<client::ProxyCommand>,
    /// Seconds to wait for the node's SSH session.
    #[arg(long, default_value_t = 10)]
    pub connect_timeout: u64,
    /// Seconds one command on the node may run (the probe of its tar and ready marker, the busybox
    /// opaque-directory listing); past it the command is abandoned.
    #[arg(long, default_value_t = 30)]
    pub command_timeout: u64,
    /// Seconds the node's change set may stop flowing before the save is abandoned.
    #[arg(long, default_value_t = 60)]
    pub stall_timeout: u64,
}

impl NodeArgs {
    fn host_key_policy(&self) -> Result<HostKeyPolicy, SshError> {
        if let Some(key) = &self.host_key {
            let line = if std::path::Path::new(key).is_file() {
                std::fs::read_to_string(key).map_err(|source| SshError::Io {
                    context: format!("reading host key file {key}"),
                    source,
                })?
            } else {
                key.clone()
            };
            return Ok(HostKeyPolicy::Pinned(client::parse_public_key(&line)?));
        }
        Ok(match &self.known_hosts {
            Some(path) => HostKeyPolicy::KnownHostsFile(path.clone()),
            None => HostKeyPolicy::TrustOnFirstUse,
        })
    }

    fn client_config(&self) -> Result<ClientConfig, SshError> {
        let mut config = ClientConfig::new(client::load_key_file(&self.identity)?, self.host_key_policy()?);
        config.connect_timeout = Duration::from_secs(self.connect_timeout);
        config.bounds.command_timeout = Duration::from_secs(self.command_timeout.max(1));
        config.bounds.stall_timeout = Duration::from_secs(self.stall_timeout.max(1));
        if let Some(command) = &self.proxy_command {
            config.transport = Transport::ProxyCommand(command.clone());
        }
        Ok(config)
    }
}

/// Arguments of `walt-operator save`.
#[derive(Debug, clap::Args)]
pub struct SaveArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// The image the node booted (the new image is this plus one layer).
    #[arg(long, value_name = "REF", required_unless_present = "change_set")]
    base: Option<String>,
    /// Where to push the new image (the tag moves only once everything is pushed).
    #[arg(long, value_name = "REF", required_unless_present = "change_set")]
    to: Option<String>,
    /// Registries reached over plain HTTP (repeatable).
    #[arg(long, value_name = "HOST[:PORT]")]
    insecure_registry: Vec<String>,
    /// The node's overlay upper dir.
    #[arg(long, default_value = export::WALT_UPPER_DIR)]
    upper_dir: String,
    /// Save every change in the upper dir, not only those made after the node booted
    /// (persistent boot mode).
    #[arg(long)]
    all_changes: bool,
    /// The file the node writes once booted (volatile mode saves only later changes).
    #[arg(long, default_value = export::WALT_READY_MARKER)]
    ready_marker: String,
    /// Paths never saved (WalT's defaults when not given; `--exclude ''` for none): regular
    /// expressions searched in /PATH; `$` anchors at the end, `^` at the start.
    #[arg(long, value_name = "PATTERN")]
    exclude: Vec<String>,
    /// Write the change set (an overlay-style tar) to this file instead of building an image
    /// (`-` for stdout).
    #[arg(long, value_name = "FILE")]
    change_set: Option<PathBuf>,
}

/// Arguments of `walt-operator gateway`: one session, for standalone use and tests.
#[derive(Debug, clap::Args)]
pub struct GatewayArgs {
    /// Where users connect.
    #[arg(long, default_value = "127.0.0.1:2222")]
    listen: String,
    /// The gateway's host private key (e.g. made with `ssh-keygen -t ed25519 -N '' -f FILE`).
    #[arg(long, value_name = "FILE")]
    host_key_file: PathBuf,
    /// The session id (the SSH user name at the gateway).
    #[arg(long, default_value = "session")]
    session: String,
    /// The user's public key file (OpenSSH line) that may log in.
    #[arg(long, value_name = "FILE")]
    authorized_key: PathBuf,
    /// How long the session stays authorized, in seconds.
    #[arg(long, default_value_t = 3600)]
    ttl: u64,
    /// Idle timeout in seconds.
    #[arg(long, default_value_t = 1800)]
    idle_timeout: u64,
    #[command(flatten)]
    node: NodeArgs,
}

fn runtime() -> Result<tokio::runtime::Runtime, SshError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|source| SshError::Io {
            context: "starting the async runtime".into(),
            source,
        })
}

pub(crate) fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .try_init();
}

/// Runs `walt-operator save …`.
pub fn run_save(args: &SaveArgs) -> CliResult {
    init_tracing();
    // Before the pipeline's threads exist: its 1–2 MiB buffers must not pile up in per-thread arenas.
    super::heap::return_freed_memory_promptly();
    runtime()?.block_on(save(args))
}

async fn save(args: &SaveArgs) -> CliResult {
    let config = args.node.client_config()?;
    let client = NodeClient::connect(&args.node.node, &config).await?;
    if matches!(config.host_key, HostKeyPolicy::TrustOnFirstUse) {
        eprintln!(
            "node {} presented host key {} (not checked: pass --known-hosts or --host-key to enforce it)",
            args.node.node,
            client::fingerprint(client.host_key())
        );
    }
    let exclude = if args.exclude.is_empty() {
        export::WALT_EXCLUDES.iter().map(|&p| p.to_owned()).collect()
    } else {
        args.exclude.iter().filter(|p| !p.is_empty()).cloned().collect()
    };
    let options = ExportOptions {
        upper_dir: args.upper_dir.clone(),
        ready_marker: (!args.all_changes).then(|| args.ready_marker.clone()),
        exclude,
    };
    let plan = export::plan(&client, &options).await?;
    eprintln!(
        "node {}: {} tar, {}",
        args.node.node,
        if plan.tar == export::NodeTar::Gnu {
            "GNU"
        } else {
            "busybox"
        },
        if plan.changed_since.is_some() {
            "changes made after boot"
        } else {
            "all changes"
        }
    );
    // Resolve the base (and reach the registry) before the node starts sending anything.
    let destination = match &args.change_set {
        Some(_) => None,
        None => Some(Destination::prepare(args).await?),
    };
    let started = Instant::now();
    let target = args.node.node.clone();
    let outcome: Result<(export::ChangeSummary, Option<PushedImage>), CliError> =
        match (&args.change_set, &destination) {
            (Some(path), _) => {
                let progress = Arc::new(Progress::default());
                let reader = export::start(&client, &plan, progress.clone()).await?;
                let reporter = {
                    let progress = progress.clone();
                    tokio::spawn(async move {
                        loop {
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            show_progress(SaveProgress::of(&progress), started);
                        }
                    })
                };
                let path = path.clone();
                let plan = plan.clone();
                let written =
                    tokio::task::spawn_blocking(move || -> Result<export::ChangeSummary, SshError> {
                        let io_error = |context: String| move |source| SshError::Io { context, source };
                        let output: Box<dyn std::io::Write> = if path.as_os_str() == "-" {
                            Box::new(std::io::stdout().lock())
                        } else {
                            Box::new(
                                std::fs::File::create(&path)
                                    .map_err(io_error(format!("creating {}", path.display())))?,
                            )
                        };
                        let output = std::io::BufWriter::with_capacity(256 * 1024, output);
                        export::filter_change_set(reader, output, &plan, &target, &progress)
                            .map_err(io_error(format!("saving the change set of node {target}")))
                    })
                    .await
                    .map_err(CliError::from)
                    .and_then(|summary| Ok((summary?, None)));
                reporter.abort();
                written
            }
            (None, Some(destination)) => {
                let options = SaveOptions {
                    repository: destination.repository.clone(),
                    compression: crate::oci::Compression::Gzip,
                    created_by: format!("walt node save {target}"),
                    progress_interval: Duration::from_secs(1),
                };
                push_node_changes(
                    &client,
                    &plan,
                    &destination.client,
                    &destination.base,
                    &options,
                    |progress| show_progress(progress, started),
                )
                .await
                .map(|saved| (saved.summary, Some(saved.pushed)))
                .map_err(CliError::from)
            }
            (None, None) => Err(format!(
                "saving node {}: give --base and --to (or --change-set FILE)",
                args.node.node
            )
            .into()),
        };
    client.close().await;
    let (summary, pushed) = outcome?;
    let saved_as = match (&pushed, &destination) {
        (Some(pushed), Some(destination)) => {
            // Only now, with the image complete in the registry, does the tag move.
            destination
                .client
                .tag(&destination.repository, &pushed.manifest_digest, &destination.tag)
                .await
                .map_err(|error| {
                    format!(
                        "node {} was saved as {} but tagging it {}:{} failed: {error}",
                        args.node.node, pushed.reference, destination.repository, destination.tag
                    )
                })?;
            format!(
                " as {}:{} ({}, layer {} bytes)",
                destination.repository, destination.tag, pushed.reference, pushed.layer_size
            )
        }
        _ => String::new(),
    };
    eprintln!(
        "\rsaved node {}{saved_as}: {} changed, {} deleted, {} opaque dirs, {} skipped, {} bytes in {:.1} s",
        args.node.node,
        summary.changed,
        summary.deleted,
        summary.opaque_dirs,
        summary.skipped,
        summary.bytes,
        started.elapsed().as_secs_f64()
    );
    if let Some(pushed) = &pushed {
        println!("{}", pushed.manifest_digest);
    }
    Ok(0)
}

/// Where `save` pushes the new image: the registry client, the resolved base, and the target.
struct Destination {
    client: RegistryClient,
    base: ResolvedImage,
    repository: String,
    tag: String,
}

impl Destination {
    async fn prepare(args: &SaveArgs) -> Result<Self, CliError> {
        let (Some(base), Some(to)) = (&args.base, &args.to) else {
            return Err(format!(
                "saving node {}: give --base REF and --to REF (or --change-set FILE)",
                args.node.node
            )
            .into());
        };
        let (repository, tag) = split_target(to)?;
        let access = RegistryAccess {
            insecure_registries: args.insecure_registry.clone(),
            auth_file: None,
        };
        let client = access.client()?;
        let base = client.resolve(base, None).await?;
        Ok(Self {
            client,
            base,
            repository,
            tag,
        })
    }
}

fn show_progress(progress: SaveProgress, started: Instant) {
    let mut stderr = std::io::stderr().lock();
    let _ = write!(
        stderr,
        "\r{:.1} MiB, {} files, {:.0} s   ",
        progress.bytes as f64 / 1_048_576.0,
        progress.files,
        started.elapsed().as_secs_f64()
    );
    let _ = stderr.flush();
}

/// Runs `walt-operator gateway …`.
pub fn run_gateway(args: &GatewayArgs) -> CliResult {
    init_tracing();
    runtime()?.block_on(gateway(args))
}

async fn gateway(args: &GatewayArgs) -> CliResult {
    let host_key = client::load_key_file(&args.host_key_file)?;
    let node_config = args.node.client_config()?;
    let user_key_text = std::fs::read_to_string(&args.authorized_key).map_err(|source| SshError::Io {
        context: format!("reading {}", args.authorized_key.display()),
        source,
    })?;
    let user_key = client::parse_public_key(&user_key_text)?;
    let mut config = GatewayConfig::new(host_key.clone(), (*node_config.key).clone());
    config.idle_timeout = Duration::from_secs(args.idle_timeout);
    config.node_transport = node_config.transport.clone();
    config.node_connect_timeout = node_config.connect_timeout;
    let authorizations = Authorizations::new();
    authorizations.add(Authorization {
        session_id: args.session.clone(),
        node: args.node.node.clone(),
        node_host_key: node_config.host_key.clone(),
        public_key: user_key,
        expires_at: SystemTime::now() + Duration::from_secs(args.ttl),
    });
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .map_err(|source| SshError::Io {
            context: format!("listening on {}", args.listen),
            source,
        })?;
    let public = host_key
        .public_key()
        .to_openssh()
        .map_err(|error| SshError::Gateway(error.to_string()))?;
    println!("gateway listening on {} host key {public}", args.listen);
    Gateway::new(config, authorizations).serve(listener).await?;
    Ok(0)
}
