//! `walt-operator vnode`: the virtual node. Boots an OS image like a WalT node
//! ([`crate::runtime::node`]) and serves SSH itself (a russh server), running
//! every session inside the node: exec and shell, with a PTY when asked,
//! window changes, signals, exit status or signal, EOF, the `sftp` subsystem
//! when the image has an `sftp-server`. So any image can be a node, and node
//! save works against it (`tar` of the upper dir at WalT's path).
//!
//! Authentication: public keys listed in the authorized keys file, read again
//! at every login (so a changed file, like a Kubernetes downward-API volume,
//! takes effect without a restart). The node has one account: whatever the
//! user name, sessions run as root, like on WalT nodes.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use nix::sys::signal::Signal;
use russh::keys::ssh_key::{LineEnding, private::Ed25519Keypair};
use russh::keys::{PrivateKey, PublicKey};
use russh::server::{self, Auth, ChannelOpenHandle, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, ChannelMsg, Pty, Sig};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::SshError;
use super::client::{self, fingerprint};
use super::gateway::SAFE_ENV;
use crate::runtime::image::{self, RegistryAccess};
use crate::runtime::node::{self, ExecRequest, NodeExec, NodeSpec, ProcessEnd, StartedIo, WindowSize};
use crate::runtime::root;
use crate::runtime::session::ModeChoice;
use crate::runtime::session_dir::SessionDir;

type CliError = Box<dyn std::error::Error + Send + Sync>;

/// Arguments of `walt-operator vnode`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The image to boot (`registry/repository:tag` or `…@sha256:…`), pulled through the layer cache.
    #[arg(long, value_name = "REF")]
    pub image: String,
    /// The node's name (its hostname).
    #[arg(long)]
    pub name: String,
    /// OpenSSH `authorized_keys` file: the public keys that may log in (read again at every login).
    #[arg(long, value_name = "FILE")]
    pub authorized_keys: PathBuf,
    /// A directory bound on `/persist` inside the node (persistent storage).
    #[arg(long, value_name = "DIR")]
    pub persist: Option<PathBuf>,
    /// Where the SSH server listens.
    #[arg(long, default_value = "0.0.0.0:22", value_name = "ADDR")]
    pub listen: String,
    /// Registry host (`host:port`) spoken to over plain HTTP (repeat).
    #[arg(long, value_name = "HOST")]
    pub insecure_registry: Vec<String>,
    /// The SSH host private key (OpenSSH format). Created (ed25519, with FILE.pub) when the file does
    /// not exist; without this option, a new key is made at every boot. Its public key is printed.
    #[arg(long, value_name = "FILE")]
    pub host_key: Option<PathBuf>,
    /// Pick this platform (`linux/arm64`) from a multi-arch image.
    #[arg(long)]
    pub platform: Option<String>,
    /// init: WalT's init contract (the image's `/bin/walt-image-shell-start` as PID 1); basic: a
    /// keep-alive PID 1 only; auto: init when the image has WalT's scripts.
    #[arg(long, value_enum, default_value_t = ModeChoice::Auto)]
    pub mode: ModeChoice,
    /// The walt cache (layer cache and the node's state), on a real filesystem.
    #[arg(long, env = "WALT_CACHE", default_value = "/var/cache/walt")]
    pub cache_dir: PathBuf,
    /// Seconds the shutdown script, then init, may take on shutdown (SIGTERM).
    #[arg(long, default_value_t = 20)]
    pub shutdown_timeout: u64,
}

/// The first line printed once the node serves SSH (tests and tools wait for it).
pub const READY_LINE_PREFIX: &str = "vnode ready:";

/// Runs `walt-operator vnode …`: boots, serves SSH until SIGTERM (or until the node's PID 1
/// ends), then shuts the node down, leaving nothing mounted or running.
pub fn run(args: &Args) -> Result<i32, CliError> {
    super::cli::init_tracing();
    check_hostname(&args.name)?;
    // Fail early and clearly on the keys (the file is read again at every login).
    let keys = AuthorizedKeys::new(args.authorized_keys.clone());
    let count = keys.load()?.len();
    if count == 0 {
        eprintln!(
            "warning: {} holds no public key yet: nobody can log in until one is added",
            args.authorized_keys.display()
        );
    }
    let host_key = host_key(args.host_key.as_deref())?;
    std::fs::create_dir_all(&args.cache_dir).map_err(|error| {
        format!(
            "creating the cache directory {}: {error}",
            args.cache_dir.display()
        )
    })?;
    let state = SessionDir::create(&args.cache_dir).map_err(|error| {
        format!(
            "creating the node's state directory under {}: {error}",
            args.cache_dir.display()
        )
    })?;
    let session_dir = state.path().to_path_buf();
    let access = RegistryAccess {
        insecure_registries: args.insecure_registry.clone(),
        auth_file: None,
    };
    let pulled = image::pull(
        &args.image,
        args.platform.as_deref(),
        &access,
        &args.cache_dir,
        root::in_user_namespace(),
    )?;
    if let Some(persist) = &args.persist {
        std::fs::create_dir_all(persist)
            .map_err(|error| format!("creating the persist directory {}: {error}", persist.display()))?;
    }
    let spec = NodeSpec {
        lower_dirs: pulled.lower_dirs.clone(),
        architecture: Some(pulled.architecture.clone()),
        os: Some(pulled.os.clone()),
        session_dir: session_dir.clone(),
        hostname: args.name.clone(),
        persist: args.persist.clone(),
        mode: args.mode,
        shutdown_timeout: Duration::from_secs(args.shutdown_timeout),
    };
    let booted = node::boot(&spec)?;
    let supervisor = booted.supervisor;
    let inspection = booted.inspection.clone();
    eprintln!(
        "vnode {}: booted {} ({}, {}{}), PID 1 is {}",
        args.name,
        pulled.image.pinned_reference(),
        inspection.architecture,
        match inspection.mode {
            crate::runtime::session::Mode::Init => "init mode: the image's init",
            crate::runtime::session::Mode::Basic => "basic mode: keep-alive PID 1",
        },
        if inspection.emulated {
            ", through qemu-user"
        } else {
            ""
        },
        booted.init
    );
    if let Some(bounds) = crate::runtime::privileges::observe(booted.init) {
        eprintln!("vnode {}: the image's processes run with {bounds}", args.name);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|error| format!("starting the async runtime: {error}"))?;
    let server = Arc::new(ServerContext {
        keys,
        shell: inspection.shell.clone(),
    });
    let outcome = runtime.block_on(async move {
        let exec = NodeExec::start(booted)?;
        let served = serve(args, host_key, server, exec.clone()).await;
        exec.shutdown(Duration::from_secs(args.shutdown_timeout + 10))
            .await;
        served
    });
    runtime.shutdown_timeout(Duration::from_secs(2));
    node::wait_supervisor(supervisor, Duration::from_secs(args.shutdown_timeout + 15));
    let reason = outcome?;
    eprintln!("vnode {}: stopped ({reason})", args.name);
    Ok(0)
}

/// Listens, prints the ready line, serves until SIGTERM/SIGINT or the node stops.
async fn serve(
    args: &Args,
    host_key: PrivateKey,
    context: Arc<ServerContext>,
    exec: NodeExec,
) -> Result<String, CliError> {
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .map_err(|error| format!("listening on {}: {error}", args.listen))?;
    let address = listener
        .local_addr()
        .map_err(|error| format!("listening on {}: {error}", args.listen))?;
    let public = host_key
        .public_key()
        .to_openssh()
        .map_err(|error| SshError::Gateway(error.to_string()))?;
    println!(
        "{READY_LINE_PREFIX} {} listening on {address} host key {public}",
        args.name
    );
    let config = Arc::new(server::Config {
        keys: vec![host_key],
        methods: russh::MethodSet::from(&[russh::MethodKind::PublicKey][..]),
        auth_rejection_time: Duration::from_millis(300),
        auth_rejection_time_initial: Some(Duration::from_millis(0)),
        window_size: 8 * 1024 * 1024,
        maximum_packet_size: 65535,
        nodelay: true,
        keepalive_interval: Some(Duration::from_secs(30)),
        ..server::Config::default()
    });
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|error| format!("handling SIGTERM: {error}"))?;
    let accept = async {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let _ = stream.set_nodelay(true);
            let handler = Connection {
                context: context.clone(),
                exec: exec.clone(),
                peer: Some(peer),
            };
            let config = config.clone();
            tokio::spawn(async move {
                match server::run_stream(config, stream, handler).await {
                    Ok(running) => {
                        let _ = running.await;
                    }
                    Err(error) => tracing::debug!(%peer, "SSH handshake failed: {error:?}"),
                }
            });
        }
    };
    Ok(tokio::select! {
        () = accept => "the listener stopped".to_owned(),
        _ = terminate.recv() => "SIGTERM".to_owned(),
        _ = tokio::signal::ctrl_c() => "SIGINT".to_owned(),
        reason = exec.stopped() => reason,
    })
}

fn check_hostname(name: &str) -> Result<(), CliError> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !name.starts_with('-');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "--name {name:?}: a node name must be a valid hostname (letters, digits, '-', '.', at most 64 characters)"
        )
        .into())
    }
}

/// Loads the host key from `path`, or creates it there (ed25519, mode 0600) when the file does
/// not exist; without a path, a new key for this boot.
pub fn host_key(path: Option<&Path>) -> Result<PrivateKey, CliError> {
    if let Some(path) = path
        && path.exists()
    {
        return Ok(client::load_key_file(path)?);
    }
    let mut seed = [0u8; 32];
    getrandom(&mut seed).map_err(|error| format!("reading /dev/urandom for a host key: {error}"))?;
    let key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    if let Some(path) = path {
        let text = key
            .to_openssh(LineEnding::LF)
            .map_err(|error| format!("encoding the new host key: {error}"))?;
        write_private(path, text.as_bytes())
            .map_err(|error| format!("writing the new host key to {}: {error}", path.display()))?;
        // And the public key next to it, as ssh-keygen does (`--host-key FILE.pub` for `save`).
        let public = key
            .public_key()
            .to_openssh()
            .map_err(|error| format!("encoding the new host key: {error}"))?;
        let public_path = PathBuf::from(format!("{}.pub", path.display()));
        std::fs::write(&public_path, format!("{public}\n"))
            .map_err(|error| format!("writing {}: {error}", public_path.display()))?;
    }
    Ok(key)
}

fn getrandom(buffer: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read as _;
    std::fs::File::open("/dev/urandom")?.read_exact(buffer)
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)
}

/// The keys that may log in: an OpenSSH `authorized_keys` file, read at every login.
#[derive(Debug, Clone)]
pub struct AuthorizedKeys {
    path: PathBuf,
}

impl AuthorizedKeys {
    /// The keys of `path`.
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }

    /// Reads the file: one key per line (`[options] type base64 [comment]`); blank lines and `#`
    /// comments are skipped, so are lines that hold no key (with a warning).
    pub fn load(&self) -> Result<Vec<PublicKey>, SshError> {
        let text = std::fs::read_to_string(&self.path).map_err(|source| SshError::Io {
            context: format!(
                "reading the authorized keys file {} (give an OpenSSH authorized_keys file)",
                self.path.display()
            ),
            source,
        })?;
        Ok(text
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .filter_map(|line| {
                let key = parse_authorized_line(line);
                if key.is_none() {
                    tracing::warn!(file = %self.path.display(), line, "no public key on this line; ignored");
                }
                key
            })
            .collect())
    }

    /// Whether `key` is listed now.
    pub fn allows(&self, key: &PublicKey) -> bool {
        match self.load() {
            Ok(keys) => keys.iter().any(|k| k.key_data() == key.key_data()),
            Err(error) => {
                tracing::warn!("{error}");
                false
            }
        }
    }
}

/// The key of one `authorized_keys` line, skipping leading options.
fn parse_authorized_line(line: &str) -> Option<PublicKey> {
    if let Ok(key) = client::parse_public_key(line) {
        return Some(key);
    }
    // Options come first (`from="…",no-pty ssh-ed25519 AAAA… comment`): try from each field.
    let fields: Vec<&str> = line.split_whitespace().collect();
    (1..fields.len()).find_map(|start| client::parse_public_key(&fields[start..].join(" ")).ok())
}

/// What every connection shares.
#[derive(Debug)]
struct ServerContext {
    keys: AuthorizedKeys,
    /// The node's shell (`/bin/bash` or `/bin/sh`).
    shell: String,
}

struct Connection {
    context: Arc<ServerContext>,
    exec: NodeExec,
    peer: Option<std::net::SocketAddr>,
}

impl server::Handler for Connection {
    type Error = russh::Error;

    async fn auth_publickey_offered(
        &mut self,
        _user: &str,
        offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(if self.context.keys.allows(offer.public_key) {
            Auth::Accept
        } else {
            Auth::reject()
        })
    }

    async fn auth_publickey(&mut self, user: &str, key: VerifiedPublicKey<'_>) -> Result<Auth, Self::Error> {
        if self.context.keys.allows(key.public_key) {
            tracing::info!(user, key = %fingerprint(key.public_key), peer = ?self.peer, "login");
            Ok(Auth::Accept)
        } else {
            tracing::info!(user, key = %fingerprint(key.public_key), peer = ?self.peer, "login refused: key not in the authorized keys");
            Ok(Auth::reject())
        }
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        reply.accept().await;
        tokio::spawn(serve_channel(
            channel,
            self.exec.clone(),
            session.handle(),
            self.context.clone(),
        ));
        Ok(())
    }

    // Requests are answered here, where russh knows whether this very request wants a reply; the
    // channel's task acts on them.
    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _col_width: u32,
        _row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        variable_name: &str,
        _variable_value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if env_is_accepted(variable_name) {
            session.channel_success(channel)
        } else {
            session.channel_failure(channel)
        }
    }

    async fn shell_request(&mut self, channel: ChannelId, session: &mut Session) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        _data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if name == "sftp" {
            session.channel_success(channel)
        } else {
            session.channel_failure(channel)
        }
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        _single_connection: bool,
        _x11_auth_protocol: &str,
        _x11_auth_cookie: &str,
        _x11_screen_number: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(channel)
    }
}

fn env_is_accepted(name: &str) -> bool {
    SAFE_ENV.contains(&name) || name.starts_with("LC_")
}

/// Runs the `sftp-server` of the image, wherever distributions put it.
const SFTP_SCRIPT: &str = "for p in /usr/lib/openssh/sftp-server /usr/libexec/openssh/sftp-server \
/usr/libexec/sftp-server /usr/lib/ssh/sftp-server /usr/lib/sftp-server; do [ -x \"$p\" ] && exec \"$p\"; done; \
echo 'this node has no sftp-server: copy files with tar over ssh (or scp -O)' >&2; exit 127";

/// What a session channel asked for before starting its process.
#[derive(Debug, Default)]
struct SessionSetup {
    pty: Option<(String, WindowSize)>,
    env: Vec<String>,
}

/// Where the client's input goes.
enum Input {
    Pipe(Option<tokio::net::unix::pipe::Sender>),
    Pty(Arc<AsyncFd<OwnedFd>>),
}

struct Running {
    pid: i32,
    input: Input,
}

/// Serves one session channel: collects its setup, starts the process, relays input, window
/// changes and signals; the process's output and end are relayed by [`relay_output`].
async fn serve_channel(
    channel: Channel<Msg>,
    exec: NodeExec,
    handle: server::Handle,
    context: Arc<ServerContext>,
) {
    let id = channel.id();
    let (mut receiver, sender) = channel.split();
    let sender = Arc::new(sender);
    let mut setup = SessionSetup::default();
    let mut running: Option<Running> = None;
    while let Some(message) = receiver.wait().await {
        match message {
            ChannelMsg::RequestPty {
                term,
                col_width,
                row_height,
                pix_width,
                pix_height,
                ..
            } => {
                setup.pty = Some((term, window_size(col_width, row_height, pix_width, pix_height)));
            }
            ChannelMsg::SetEnv {
                variable_name,
                variable_value,
                ..
            } if env_is_accepted(&variable_name) => {
                setup.env.push(format!("{variable_name}={variable_value}"));
            }
            ChannelMsg::RequestShell { .. } if running.is_none() => {
                running = start(&exec, &context, &setup, None, id, &sender, &handle).await;
            }
            ChannelMsg::Exec { command, .. } if running.is_none() => {
                let command = String::from_utf8_lossy(&command).into_owned();
                running = start(&exec, &context, &setup, Some(command), id, &sender, &handle).await;
            }
            ChannelMsg::RequestSubsystem { name, .. } if name == "sftp" && running.is_none() => {
                let mut plain = SessionSetup {
                    pty: None,
                    env: setup.env.clone(),
                };
                std::mem::swap(&mut plain.pty, &mut setup.pty);
                running = start(
                    &exec,
                    &context,
                    &plain,
                    Some(SFTP_SCRIPT.to_owned()),
                    id,
                    &sender,
                    &handle,
                )
                .await;
            }
            ChannelMsg::Data { data } => {
                if let Some(running) = &mut running {
                    write_input(&mut running.input, &data).await;
                }
            }
            ChannelMsg::Eof => {
                // End of input: close the pipe. A terminal has no end of input (OpenSSH's sshd
                // ignores it too); the shell ends on `exit` or when the channel closes.
                if let Some(Running {
                    input: Input::Pipe(pipe),
                    ..
                }) = &mut running
                {
                    *pipe = None;
                }
            }
            ChannelMsg::WindowChange {
                col_width,
                row_height,
                pix_width,
                pix_height,
            } => {
                if let Some(Running {
                    input: Input::Pty(master),
                    ..
                }) = &running
                {
                    let size = window_size(col_width, row_height, pix_width, pix_height);
                    let _ = node::set_window_size(master.get_ref(), size);
                }
            }
            ChannelMsg::Signal { signal } => {
                if let (Some(running), Some(signal)) = (&running, signal_of(&signal)) {
                    exec.signal(running.pid, signal).await;
                }
            }
            ChannelMsg::Close => break,
            _ => {}
        }
    }
    // The client closed the channel: hang up what still runs, like a closed terminal.
    if let Some(running) = running {
        exec.signal(running.pid, Signal::SIGHUP).await;
    }
}

fn window_size(cols: u32, rows: u32, x_pixels: u32, y_pixels: u32) -> WindowSize {
    let clamp = |value: u32| u16::try_from(value).unwrap_or(u16::MAX);
    WindowSize {
        rows: clamp(rows),
        cols: clamp(cols),
        x_pixels: clamp(x_pixels),
        y_pixels: clamp(y_pixels),
    }
}

/// Starts the session's process; on failure, tells the client (stderr, exit status 127, close).
async fn start(
    exec: &NodeExec,
    context: &ServerContext,
    setup: &SessionSetup,
    command: Option<String>,
    id: ChannelId,
    sender: &Arc<russh::ChannelWriteHalf<Msg>>,
    handle: &server::Handle,
) -> Option<Running> {
    let shell = context.shell.clone();
    let name = shell.rsplit('/').next().unwrap_or("sh").to_owned();
    let args = match &command {
        // A login shell, as sshd starts it.
        None => vec![format!("-{name}")],
        Some(command) => vec![name, "-c".to_owned(), command.clone()],
    };
    let mut env = vec![
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
        "HOME=/root".to_owned(),
        "USER=root".to_owned(),
        "LOGNAME=root".to_owned(),
        format!("SHELL={shell}"),
    ];
    if let Some((term, _)) = &setup.pty {
        env.push(format!("TERM={term}"));
    }
    for variable in &setup.env {
        let name = variable.split('=').next().unwrap_or_default();
        env.retain(|existing| existing.split('=').next() != Some(name));
        env.push(variable.clone());
    }
    let request = ExecRequest {
        program: shell,
        args,
        env,
        cwd: "/root".to_owned(),
        pty: setup.pty.as_ref().map(|(_, size)| *size),
    };
    let started = match exec.exec(request).await {
        Ok(started) => started,
        Err(error) => {
            tracing::warn!("{error}");
            let message = format!("walt vnode: {error}\r\n");
            let _ = sender.extended_data_bytes(1, Bytes::from(message)).await;
            let _ = sender.eof().await;
            let _ = sender.exit_status(127).await;
            let _ = sender.close().await;
            return None;
        }
    };
    let pid = started.pid;
    let (input, outputs) = match started.io {
        StartedIo::Pty(master) => match node::async_fd(master) {
            Ok(master) => {
                let master = Arc::new(master);
                (Input::Pty(master.clone()), Outputs::Pty(master))
            }
            Err(error) => {
                tracing::warn!("PTY of process {pid}: {error}");
                exec.signal(pid, Signal::SIGKILL).await;
                return None;
            }
        },
        StartedIo::Pipes {
            stdin,
            stdout,
            stderr,
        } => {
            let pipes = (|| -> std::io::Result<_> {
                Ok((
                    tokio::net::unix::pipe::Sender::from_owned_fd(stdin)?,
                    tokio::net::unix::pipe::Receiver::from_owned_fd(stdout)?,
                    tokio::net::unix::pipe::Receiver::from_owned_fd(stderr)?,
                ))
            })();
            match pipes {
                Ok((stdin, stdout, stderr)) => (Input::Pipe(Some(stdin)), Outputs::Pipes(stdout, stderr)),
                Err(error) => {
                    tracing::warn!("pipes of process {pid}: {error}");
                    exec.signal(pid, Signal::SIGKILL).await;
                    return None;
                }
            }
        }
    };
    tokio::spawn(relay_output(
        outputs,
        started.end,
        id,
        sender.clone(),
        handle.clone(),
    ));
    Some(Running { pid, input })
}

async fn write_input(input: &mut Input, data: &[u8]) {
    match input {
        Input::Pipe(pipe) => {
            if let Some(writer) = pipe
                && writer.write_all(data).await.is_err()
            {
                // The process stopped reading (or ended): drop further input.
                *pipe = None;
            }
        }
        Input::Pty(master) => {
            let mut rest = data;
            while !rest.is_empty() {
                let Ok(mut guard) = master.writable().await else {
                    return;
                };
                match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), rest).map_err(std::io::Error::from))
                {
                    Ok(Ok(written)) => rest = &rest[written..],
                    Ok(Err(_)) => return,
                    Err(_would_block) => {}
                }
            }
        }
    }
}

/// The process's output side.
enum Outputs {
    Pty(Arc<AsyncFd<OwnedFd>>),
    Pipes(tokio::net::unix::pipe::Receiver, tokio::net::unix::pipe::Receiver),
}

/// How long a PTY's output is still read after its process ended (background processes may keep
/// the terminal open; OpenSSH's sshd closes such sessions too).
const PTY_DRAIN: Duration = Duration::from_secs(1);

/// Relays the output until the process ended and its output is drained, then sends EOF, the exit
/// status (or signal) and closes the channel.
async fn relay_output(
    outputs: Outputs,
    end: tokio::sync::oneshot::Receiver<ProcessEnd>,
    id: ChannelId,
    sender: Arc<russh::ChannelWriteHalf<Msg>>,
    handle: server::Handle,
) {
    let end = match outputs {
        Outputs::Pipes(stdout, stderr) => {
            // Like sshd: the session ends when the process ended AND its output pipes closed.
            let ((), (), end) = tokio::join!(
                pump_pipe(stdout, None, &sender),
                pump_pipe(stderr, Some(1), &sender),
                end
            );
            end.ok()
        }
        Outputs::Pty(master) => {
            let pump = pump_pty(&master, &sender);
            tokio::pin!(pump);
            let mut end = end;
            tokio::select! {
                () = &mut pump => end.await.ok(),
                ended = &mut end => {
                    let _ = tokio::time::timeout(PTY_DRAIN, pump).await;
                    ended.ok()
                }
            }
        }
    };
    let _ = sender.eof().await;
    match end {
        Some(ProcessEnd::Exited(code)) => {
            let _ = sender.exit_status(u32::try_from(code).unwrap_or(255)).await;
        }
        Some(ProcessEnd::Signaled { signal, core_dumped }) => {
            let _ = handle
                .exit_signal_request(id, sig_of(signal), core_dumped, String::new(), "en".into())
                .await;
        }
        None => {
            let _ = sender
                .extended_data_bytes(1, Bytes::from_static(b"walt vnode: the node stopped\r\n"))
                .await;
            let _ = sender.exit_status(255).await;
        }
    }
    let _ = sender.close().await;
}

async fn pump_pipe(
    mut pipe: tokio::net::unix::pipe::Receiver,
    extended: Option<u32>,
    sender: &russh::ChannelWriteHalf<Msg>,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = match pipe.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let data = Bytes::copy_from_slice(&buffer[..n]);
        let sent = match extended {
            Some(code) => sender.extended_data_bytes(code, data).await,
            None => sender.data_bytes(data).await,
        };
        if sent.is_err() {
            return;
        }
    }
}

async fn pump_pty(master: &AsyncFd<OwnedFd>, sender: &russh::ChannelWriteHalf<Msg>) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let Ok(mut guard) = master.readable().await else {
            return;
        };
        let n = match guard
            .try_io(|fd| nix::unistd::read(fd.get_ref(), &mut buffer).map_err(std::io::Error::from))
        {
            Err(_would_block) => continue,
            // EIO: every process closed the terminal.
            Ok(Ok(0) | Err(_)) => return,
            Ok(Ok(n)) => n,
        };
        if sender
            .data_bytes(Bytes::copy_from_slice(&buffer[..n]))
            .await
            .is_err()
        {
            return;
        }
    }
}

/// The signal an SSH `signal` request names.
fn signal_of(signal: &Sig) -> Option<Signal> {
    Some(match signal {
        Sig::ABRT => Signal::SIGABRT,
        Sig::ALRM => Signal::SIGALRM,
        Sig::FPE => Signal::SIGFPE,
        Sig::HUP => Signal::SIGHUP,
        Sig::ILL => Signal::SIGILL,
        Sig::INT => Signal::SIGINT,
        Sig::KILL => Signal::SIGKILL,
        Sig::PIPE => Signal::SIGPIPE,
        Sig::QUIT => Signal::SIGQUIT,
        Sig::SEGV => Signal::SIGSEGV,
        Sig::TERM => Signal::SIGTERM,
        Sig::USR1 => Signal::SIGUSR1,
        Sig::Custom(name) => format!("SIG{name}").parse().ok()?,
    })
}

/// The SSH name of a signal number (for exit-signal).
fn sig_of(signal: i32) -> Sig {
    match Signal::try_from(signal) {
        Ok(Signal::SIGABRT) => Sig::ABRT,
        Ok(Signal::SIGALRM) => Sig::ALRM,
        Ok(Signal::SIGFPE) => Sig::FPE,
        Ok(Signal::SIGHUP) => Sig::HUP,
        Ok(Signal::SIGILL) => Sig::ILL,
        Ok(Signal::SIGINT) => Sig::INT,
        Ok(Signal::SIGKILL) => Sig::KILL,
        Ok(Signal::SIGPIPE) => Sig::PIPE,
        Ok(Signal::SIGQUIT) => Sig::QUIT,
        Ok(Signal::SIGSEGV) => Sig::SEGV,
        Ok(Signal::SIGTERM) => Sig::TERM,
        Ok(Signal::SIGUSR1) => Sig::USR1,
        Ok(other) => Sig::Custom(other.as_str().trim_start_matches("SIG").to_owned()),
        Err(_) => Sig::Custom(signal.to_string()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn authorized_lines_with_options_and_comments() {
        let key = host_key(None).unwrap().public_key().to_openssh().unwrap();
        let key = format!("{key} alice@lab");
        let plain = parse_authorized_line(&key).unwrap();
        let with_options = parse_authorized_line(&format!("from=\"10.0.0.0/8\",no-pty {key}")).unwrap();
        assert_eq!(plain.key_data(), with_options.key_data());
        assert!(parse_authorized_line("no key here").is_none());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("authorized_keys");
        std::fs::write(&path, format!("# lab key\n\n{key}\ngarbage\n")).unwrap();
        let keys = AuthorizedKeys::new(path.clone());
        assert_eq!(keys.load().unwrap().len(), 1);
        assert!(keys.allows(&plain));
        // Read again at every check: an emptied file refuses the key at once.
        std::fs::write(&path, "").unwrap();
        assert!(!keys.allows(&plain));
        let missing = AuthorizedKeys::new(dir.path().join("missing"));
        assert!(
            missing
                .load()
                .unwrap_err()
                .to_string()
                .contains("authorized keys file")
        );
    }

    #[test]
    fn host_key_is_created_once_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/host_ed25519");
        let first = host_key(Some(&path)).unwrap();
        let again = host_key(Some(&path)).unwrap();
        assert_eq!(first.public_key().key_data(), again.public_key().key_data());
        let public = std::fs::read_to_string(dir.path().join("keys/host_ed25519.pub")).unwrap();
        assert_eq!(
            client::parse_public_key(&public).unwrap().key_data(),
            first.public_key().key_data()
        );
        let ephemeral = host_key(None).unwrap();
        assert_ne!(first.public_key().key_data(), ephemeral.public_key().key_data());
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn hostnames_and_signals() {
        assert!(check_hostname("vn1").is_ok());
        assert!(check_hostname("-x").is_err());
        assert!(check_hostname("a b").is_err());
        assert_eq!(signal_of(&Sig::INT), Some(Signal::SIGINT));
        assert_eq!(signal_of(&Sig::Custom("USR2".into())), Some(Signal::SIGUSR2));
        assert!(matches!(sig_of(Signal::SIGTERM as i32), Sig::TERM));
        assert!(matches!(sig_of(Signal::SIGUSR2 as i32), Sig::Custom(ref n) if n == "USR2"));
    }
}
