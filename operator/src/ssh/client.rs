//! The node client: an SSH connection from walt to a lab node (russh).
//!
//! The node's host key is either pinned ([`HostKeyPolicy::Pinned`]) or checked against a
//! known_hosts-style file where it is recorded on first contact and enforced afterwards
//! ([`HostKeyPolicy::KnownHostsFile`]). Connection errors say what happened: unreachable, refused,
//! authentication refused (with the key type offered), host key mismatch (with both fingerprints).

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::client;
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use russh::{ChannelMsg, Disconnect};
use tokio::io::{AsyncRead, AsyncWrite};

use super::SshError;

/// Ciphers offered to nodes, best first: AES-GCM before ChaCha20-Poly1305 (russh's first choice), since
/// bulk transfers (node save, the gateway's relay) spend their CPU in the cipher and AES-GCM is the
/// faster of the two with the AES instructions of today's CPUs (`openssl speed` here: 4.3 vs 3.4 GB/s);
/// nodes without it (old dropbear) still get the others.
const NODE_CIPHERS: &[russh::cipher::Name] = &[
    russh::cipher::AES_256_GCM,
    russh::cipher::CHACHA20_POLY1305,
    russh::cipher::AES_256_CTR,
    russh::cipher::AES_192_CTR,
    russh::cipher::AES_128_CTR,
];

/// Read buffer put under russh's transport (client and gateway): it reads packet by packet, unbuffered.
pub(crate) const SSH_READ_BUFFER: usize = 64 * 1024;

/// Any byte stream russh can run SSH over (a TCP stream, a proxy command's stdin/stdout…).
pub trait SshStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> SshStream for T {}

/// A boxed [`SshStream`].
pub type BoxedStream = Box<dyn SshStream>;

/// Opens the byte stream to a node's SSH port (`host`, `port`): used where the node is not reachable
/// with a plain TCP connection from here (a network namespace, a tunnel).
pub type Connector =
    Arc<dyn Fn(String, u16) -> Pin<Box<dyn Future<Output = io::Result<BoxedStream>> + Send>> + Send + Sync>;

/// How the client reaches the node's SSH port.
#[derive(Clone, Default)]
pub enum Transport {
    /// A TCP connection to `host:port`.
    #[default]
    Tcp,
    /// A command whose stdin/stdout carry the connection (OpenSSH's `ProxyCommand`), run as an
    /// argument list, never through a shell (see [`ProxyCommand`]).
    ProxyCommand(ProxyCommand),
    /// A custom connector.
    Connector(Connector),
}

/// Why a proxy command cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyCommandError {
    /// The text does not split into arguments the way a POSIX shell would (an unclosed quote, a
    /// trailing backslash).
    #[error(
        "the proxy command `{0}` cannot be split into arguments (an unclosed quote or a trailing backslash?): \
         write it as a program and its arguments, e.g. `ssh -W %h:%p jump`"
    )]
    Unsplittable(String),
    /// No program at all.
    #[error("the proxy command is empty: write a program and its arguments, e.g. `ssh -W %h:%p jump`")]
    Empty,
}

/// A proxy command (OpenSSH's `ProxyCommand`), split once into a program and its arguments the way
/// a POSIX shell splits words (quotes and backslashes; no expansion, no `;`, pipes or redirections:
/// those are plain characters of an argument). At connect time `%h` and `%p` are replaced with the
/// node's host and port inside each argument, so a host name is always data: it lands in the
/// argument that held `%h`, whatever characters it has, and no shell ever reads it. `%%` is a `%`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyCommand {
    argv: Vec<String>,
}

impl ProxyCommand {
    /// Splits `text` into a program and its arguments (pure).
    pub fn parse(text: &str) -> Result<Self, ProxyCommandError> {
        let argv = shlex::split(text).ok_or_else(|| ProxyCommandError::Unsplittable(text.to_owned()))?;
        if argv.is_empty() {
            return Err(ProxyCommandError::Empty);
        }
        Ok(Self { argv })
    }

    /// The program and its arguments for `host` and `port` (pure): `%h`, `%p` and `%%` replaced in
    /// each argument, never a new argument.
    pub fn argv_for(&self, host: &str, port: u16) -> Vec<String> {
        let port = port.to_string();
        self.argv
            .iter()
            .map(|argument| substitute(argument, host, &port))
            .collect()
    }
}

impl FromStr for ProxyCommand {
    type Err = ProxyCommandError;

    fn from_str(text: &str) -> Result<Self, ProxyCommandError> {
        Self::parse(text)
    }
}

/// `%h` → host, `%p` → port, `%%` → `%` in one argument; any other `%` stays (pure).
fn substitute(argument: &str, host: &str, port: &str) -> String {
    let mut out = String::with_capacity(argument.len());
    let mut chars = argument.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('h') => out.push_str(host),
            Some('p') => out.push_str(port),
            Some(other) if other != '%' => {
                out.push('%');
                out.push(other);
            }
            // `%%`, or a `%` that ends the argument.
            Some(_) | None => out.push('%'),
        }
    }
    out
}

impl fmt::Debug for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp => f.write_str("Tcp"),
            Self::ProxyCommand(command) => f.debug_tuple("ProxyCommand").field(command).finish(),
            Self::Connector(_) => f.write_str("Connector(..)"),
        }
    }
}

/// Where a node's SSH server is, and as whom to log in: `USER@HOST[:PORT]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeTarget {
    /// The user to log in as (`root` on WalT nodes).
    pub user: String,
    /// The node's host name or address.
    pub host: String,
    /// The node's SSH port.
    pub port: u16,
}

impl NodeTarget {
    /// The `host:port` (or `[host]:port`) name used in known_hosts files, like OpenSSH.
    pub fn known_hosts_name(&self) -> String {
        if self.port == 22 {
            self.host.clone()
        } else {
            format!("[{}]:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for NodeTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}:{}", self.user, self.host, self.port)
    }
}

impl FromStr for NodeTarget {
    type Err = SshError;

    fn from_str(text: &str) -> Result<Self, SshError> {
        let invalid = |why: &str| SshError::InvalidTarget {
            target: text.to_owned(),
            reason: why.to_owned(),
        };
        let (user, rest) = text.split_once('@').ok_or_else(|| invalid("no `USER@` part"))?;
        if user.is_empty() {
            return Err(invalid("the user is empty"));
        }
        let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
            let (host, after) = bracketed.split_once(']').ok_or_else(|| invalid("unclosed `[`"))?;
            match after.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None if after.is_empty() => (host, None),
                None => return Err(invalid("unexpected text after `]`")),
            }
        } else {
            match rest.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (rest, None),
            }
        };
        if host.is_empty() {
            return Err(invalid("the host is empty"));
        }
        let port = match port {
            Some(port) => port
                .parse::<u16>()
                .map_err(|_| invalid("the port is not a number between 1 and 65535"))?,
            None => 22,
        };
        if port == 0 {
            return Err(invalid("the port is not a number between 1 and 65535"));
        }
        Ok(Self {
            user: user.to_owned(),
            host: host.to_owned(),
            port,
        })
    }
}

/// How the node's host key is checked.
#[derive(Debug, Clone)]
pub enum HostKeyPolicy {
    /// Only this key is accepted.
    Pinned(PublicKey),
    /// A known_hosts-style file (`NAME KEYTYPE BASE64`, names as OpenSSH writes them, `[host]:port`
    /// for ports other than 22; hashed names are not read): the key found there for the node is
    /// enforced; when the node is not in the file, the key seen is accepted and appended to it.
    KnownHostsFile(PathBuf),
    /// Accept whatever key the node presents on first contact; [`NodeClient::host_key`] tells which
    /// one it was, for the caller to record (the operator stores it in the Node's status).
    TrustOnFirstUse,
}

/// Loads a private key (OpenSSH or PKCS#8 PEM, no passphrase) from a file.
pub fn load_key_file(path: &Path) -> Result<PrivateKey, SshError> {
    let text = std::fs::read_to_string(path).map_err(|source| SshError::KeyFile {
        path: path.to_owned(),
        reason: source.to_string(),
    })?;
    decode_key(text.as_bytes()).map_err(|error| match error {
        SshError::KeyBytes { reason } => SshError::KeyFile {
            path: path.to_owned(),
            reason,
        },
        other => other,
    })
}

/// Decodes a private key from bytes (the content of a key file, e.g. a Kubernetes Secret's value).
pub fn decode_key(bytes: &[u8]) -> Result<PrivateKey, SshError> {
    let text = std::str::from_utf8(bytes).map_err(|_| SshError::KeyBytes {
        reason: "not text (expected an OpenSSH or PEM private key)".into(),
    })?;
    russh::keys::decode_secret_key(text, None).map_err(|error| SshError::KeyBytes {
        reason: error.to_string(),
    })
}

/// Parses a public key written as an OpenSSH line (`ssh-ed25519 AAAA… [comment]`).
pub fn parse_public_key(line: &str) -> Result<PublicKey, SshError> {
    PublicKey::from_openssh(line.trim()).map_err(|error| SshError::PublicKey {
        key: line.chars().take(60).collect(),
        reason: error.to_string(),
    })
}

/// The SHA-256 fingerprint of a public key, as OpenSSH prints it (`SHA256:…`).
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// How to connect to a node.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The private key to log in with (the lab's node key).
    pub key: Arc<PrivateKey>,
    /// How the node's host key is checked.
    pub host_key: HostKeyPolicy,
    /// How long connecting, the SSH handshake and authentication may take together.
    pub connect_timeout: Duration,
    /// Send a keepalive when the node said nothing for this long; `keepalive_max` unanswered
    /// keepalives close the connection (a node that died is noticed).
    pub keepalive_interval: Duration,
    /// How many unanswered keepalives end the connection.
    pub keepalive_max: usize,
    /// How the node's SSH port is reached.
    pub transport: Transport,
    /// How long, and how much output, one command run to completion ([`NodeClient::exec`]: a
    /// probe, a reboot, a save's plan) and one streamed transfer may take.
    pub bounds: ExecBounds,
}

impl ClientConfig {
    /// A configuration with the key and host key policy, 10 s connect timeout, keepalive every 5 s
    /// (3 unanswered end the connection), TCP transport, the default [`ExecBounds`].
    pub fn new(key: PrivateKey, host_key: HostKeyPolicy) -> Self {
        Self {
            key: Arc::new(key),
            host_key,
            connect_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(5),
            keepalive_max: 3,
            transport: Transport::Tcp,
            bounds: ExecBounds::default(),
        }
    }
}

/// The bounds every command on a node runs under, so a node that hangs or floods costs a known,
/// small amount of time and memory and never holds the operator's workers for ever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecBounds {
    /// How long one command run to completion ([`NodeClient::exec`]) may take, from opening its
    /// channel to its exit; past it the command is abandoned (its channel closed).
    pub command_timeout: Duration,
    /// How many bytes of output (stdout and stderr together) one such command may send; past it
    /// the command is stopped (its channel closed) and nothing it sent is kept.
    pub output_limit: usize,
    /// How long a streamed transfer from the node (a save's tar) may go without a byte from the
    /// node; past it the transfer is abandoned. Time the operator spends pushing is not counted.
    pub stall_timeout: Duration,
}

/// Default of [`ExecBounds::command_timeout`].
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Default of [`ExecBounds::output_limit`] (4 MiB).
pub const DEFAULT_OUTPUT_LIMIT: usize = 4 << 20;
/// Default of [`ExecBounds::stall_timeout`].
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_mins(1);

impl Default for ExecBounds {
    fn default() -> Self {
        Self {
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            output_limit: DEFAULT_OUTPUT_LIMIT,
            stall_timeout: DEFAULT_STALL_TIMEOUT,
        }
    }
}

/// How a command is named in messages (pure): its first line, at most 60 characters.
pub fn command_summary(command: &str) -> String {
    let first = command.lines().next().unwrap_or_default().trim();
    let mut summary: String = first.chars().take(60).collect();
    if summary.len() < first.len() || command.trim().lines().nth(1).is_some() {
        summary.push('…');
    }
    summary
}

/// What a collected output may still take (pure): `Err` with the limit when `more` bytes on top
/// of `held` would pass it.
fn within_limit(held: usize, more: usize, limit: usize) -> Result<(), usize> {
    if held.saturating_add(more) > limit {
        Err(limit)
    } else {
        Ok(())
    }
}

/// What the host key check found, kept for the error message (russh only says "unknown key").
#[derive(Debug, Default)]
struct HostKeyVerdict {
    seen: Option<PublicKey>,
    mismatch: Option<(String, String)>,
    problem: Option<String>,
}

struct NodeHandler {
    target: NodeTarget,
    policy: HostKeyPolicy,
    verdict: Arc<Mutex<HostKeyVerdict>>,
}

impl NodeHandler {
    fn check(&self, presented: &PublicKey) -> Result<bool, String> {
        match &self.policy {
            HostKeyPolicy::Pinned(expected) => {
                if same_key(expected, presented) {
                    Ok(true)
                } else {
                    self.record_mismatch(expected, presented, "the pinned host key");
                    Ok(false)
                }
            }
            HostKeyPolicy::TrustOnFirstUse => Ok(true),
            HostKeyPolicy::KnownHostsFile(path) => {
                let name = self.target.known_hosts_name();
                match known_host(path, &name)? {
                    Some(expected) if same_key(&expected, presented) => Ok(true),
                    Some(expected) => {
                        self.record_mismatch(
                            &expected,
                            presented,
                            &format!("the key recorded in {}", path.display()),
                        );
                        Ok(false)
                    }
                    None => {
                        record_known_host(path, &name, presented)?;
                        tracing::info!(node = %name, fingerprint = %fingerprint(presented), file = %path.display(), "recorded the node's host key on first contact");
                        Ok(true)
                    }
                }
            }
        }
    }

    fn record_mismatch(&self, expected: &PublicKey, presented: &PublicKey, source: &str) {
        if let Ok(mut verdict) = self.verdict.lock() {
            verdict.mismatch = Some((
                format!("{} ({source})", fingerprint(expected)),
                fingerprint(presented),
            ));
        }
    }
}

fn same_key(a: &PublicKey, b: &PublicKey) -> bool {
    a.key_data() == b.key_data()
}

impl client::Handler for NodeHandler {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server_public_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let key = match server_public_key {
            PublicKeyOrCertificate::PublicKey { key, .. } => key.clone(),
            PublicKeyOrCertificate::Certificate(certificate) => {
                PublicKey::from(certificate.public_key().clone())
            }
        };
        let outcome = self.check(&key);
        if let Ok(mut verdict) = self.verdict.lock() {
            verdict.seen = Some(key);
            if let Err(problem) = &outcome {
                verdict.problem = Some(problem.clone());
            }
        }
        Ok(outcome.unwrap_or(false))
    }
}

/// Reads the key recorded for `name` in a known_hosts-style file (`None` when the file or the
/// name is absent).
fn known_host(path: &Path, name: &str) -> Result<Option<PublicKey>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => {
            return Err(format!(
                "cannot read known hosts file {}: {error}",
                path.display()
            ));
        }
    };
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with('@') {
            continue;
        }
        let Some((names, key)) = line.split_once(char::is_whitespace) else {
            continue;
        };
        if names.split(',').any(|candidate| candidate == name) {
            return PublicKey::from_openssh(key.trim())
                .map(Some)
                .map_err(|error| format!("{}:{}: not a public key: {error}", path.display(), number + 1));
        }
    }
    Ok(None)
}

fn record_known_host(path: &Path, name: &str, key: &PublicKey) -> Result<(), String> {
    use std::io::Write as _;
    let line = key
        .to_openssh()
        .map_err(|error| format!("cannot encode the host key: {error}"))?;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|error| format!("cannot write known hosts file {}: {error}", path.display()))?;
    writeln!(file, "{name} {line}")
        .map_err(|error| format!("cannot write known hosts file {}: {error}", path.display()))
}

async fn open_stream(target: &NodeTarget, transport: &Transport) -> io::Result<BoxedStream> {
    match transport {
        Transport::Tcp => {
            let stream = tokio::net::TcpStream::connect((target.host.as_str(), target.port)).await?;
            stream.set_nodelay(true)?;
            Ok(Box::new(stream))
        }
        Transport::Connector(connector) => connector(target.host.clone(), target.port).await,
        Transport::ProxyCommand(command) => {
            let argv = command.argv_for(&target.host, target.port);
            let (program, arguments) = argv
                .split_first()
                .ok_or_else(|| io::Error::other("the proxy command is empty"))?;
            let mut child = tokio::process::Command::new(program)
                .args(arguments)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()?;
            let stdin = child
                .stdin
                .take()
                .ok_or_else(|| io::Error::other("proxy command has no stdin"))?;
            let stdout = child
                .stdout
                .take()
                .ok_or_else(|| io::Error::other("proxy command has no stdout"))?;
            Ok(Box::new(ProxyStream {
                io: tokio::io::join(stdout, stdin),
                _child: child,
            }))
        }
    }
}

/// A proxy command's stdin/stdout as one stream; the command is killed when the stream is dropped.
struct ProxyStream {
    io: tokio::io::Join<tokio::process::ChildStdout, tokio::process::ChildStdin>,
    _child: tokio::process::Child,
}

impl AsyncRead for ProxyStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for ProxyStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The output of a command run to completion on a node.
#[derive(Debug, Clone, Default)]
pub struct ExecOutput {
    /// What the command wrote on stdout.
    pub stdout: Vec<u8>,
    /// What the command wrote on stderr.
    pub stderr: Vec<u8>,
    /// Its exit status (`None` if it was killed by a signal or the node said nothing).
    pub exit_status: Option<u32>,
    /// The signal that killed it, if any.
    pub exit_signal: Option<String>,
}

/// An authenticated SSH connection to a node.
pub struct NodeClient {
    handle: client::Handle<NodeHandler>,
    target: NodeTarget,
    host_key: PublicKey,
    bounds: ExecBounds,
}

impl fmt::Debug for NodeClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeClient")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl NodeClient {
    /// Connects to the node, checks its host key and logs in with the key.
    pub async fn connect(target: &NodeTarget, config: &ClientConfig) -> Result<Self, SshError> {
        let verdict = Arc::new(Mutex::new(HostKeyVerdict::default()));
        let handler = NodeHandler {
            target: target.clone(),
            policy: config.host_key.clone(),
            verdict: verdict.clone(),
        };
        let russh_config = Arc::new(client::Config {
            keepalive_interval: Some(config.keepalive_interval),
            keepalive_max: config.keepalive_max,
            nodelay: true,
            window_size: 8 * 1024 * 1024,
            maximum_packet_size: 65535,
            preferred: russh::Preferred {
                cipher: std::borrow::Cow::Borrowed(NODE_CIPHERS),
                ..russh::Preferred::default()
            },
            ..client::Config::default()
        });
        let timeout = config.connect_timeout;
        let attempt = async {
            let stream = open_stream(target, &config.transport).await.map_err(|source| {
                if source.kind() == io::ErrorKind::ConnectionRefused {
                    SshError::Refused {
                        target: target.clone(),
                    }
                } else {
                    SshError::Unreachable {
                        target: target.clone(),
                        reason: source.to_string(),
                    }
                }
            })?;
            // russh reads each packet with two unbuffered reads (length, then the rest): a read buffer
            // turns ~2 syscalls per 32 KiB packet into one per 64 KiB of stream.
            let stream = tokio::io::BufReader::with_capacity(SSH_READ_BUFFER, stream);
            let mut handle = client::connect_stream(russh_config, stream, handler)
                .await
                .map_err(|error| {
                    let verdict = verdict
                        .lock()
                        .map(|v| (v.mismatch.clone(), v.problem.clone()))
                        .unwrap_or_default();
                    match verdict {
                        (Some((expected, presented)), _) => SshError::HostKeyMismatch {
                            target: target.clone(),
                            expected,
                            presented,
                        },
                        (None, Some(problem)) => SshError::HostKeyCheck {
                            target: target.clone(),
                            reason: problem,
                        },
                        (None, None) => SshError::Handshake {
                            target: target.clone(),
                            reason: error.to_string(),
                        },
                    }
                })?;
            let hash = handle.best_supported_rsa_hash().await.ok().flatten().flatten();
            let auth = handle
                .authenticate_publickey(&target.user, PrivateKeyWithHashAlg::new(config.key.clone(), hash))
                .await
                .map_err(|error| SshError::Handshake {
                    target: target.clone(),
                    reason: format!("during authentication: {error}"),
                })?;
            if !auth.success() {
                return Err(SshError::AuthRefused {
                    target: target.clone(),
                    key_type: config.key.algorithm().to_string(),
                    fingerprint: fingerprint(config.key.public_key()),
                });
            }
            Ok(handle)
        };
        let handle = tokio::time::timeout(timeout, attempt)
            .await
            .map_err(|_| SshError::Unreachable {
                target: target.clone(),
                reason: format!("no SSH session within {} s", timeout.as_secs_f32()),
            })??;
        let host_key =
            verdict
                .lock()
                .ok()
                .and_then(|v| v.seen.clone())
                .ok_or_else(|| SshError::Handshake {
                    target: target.clone(),
                    reason: "the node presented no host key".into(),
                })?;
        Ok(Self {
            handle,
            target: target.clone(),
            host_key,
            bounds: config.bounds,
        })
    }

    /// The bounds this client's commands and transfers run under.
    pub fn bounds(&self) -> ExecBounds {
        self.bounds
    }

    /// The node this client is connected to.
    pub fn target(&self) -> &NodeTarget {
        &self.target
    }

    /// The host key the node presented (to record it after a trust-on-first-use contact).
    pub fn host_key(&self) -> &PublicKey {
        &self.host_key
    }

    /// The russh handle, to open channels (session, direct-tcpip) directly.
    pub fn handle(&self) -> &client::Handle<impl client::Handler> {
        &self.handle
    }

    /// Opens a session channel.
    pub async fn open_session(&self) -> Result<russh::Channel<client::Msg>, SshError> {
        self.handle
            .channel_open_session()
            .await
            .map_err(|error| self.lost(&error))
    }

    /// Opens a direct-tcpip channel from the node to `host:port` (a port forward).
    pub async fn open_direct_tcpip(
        &self,
        host: &str,
        port: u32,
        originator: &str,
        originator_port: u32,
    ) -> Result<russh::Channel<client::Msg>, SshError> {
        self.handle
            .channel_open_direct_tcpip(host, port, originator, originator_port)
            .await
            .map_err(|error| self.lost(&error))
    }

    /// Runs a command to completion and collects its output (for short outputs), within the
    /// client's [`ExecBounds`]: a command that runs longer than `command_timeout` fails with
    /// [`SshError::CommandTimedOut`], one that sends more than `output_limit` bytes with
    /// [`SshError::OutputTooLarge`]; either way its channel is closed.
    pub async fn exec(&self, command: &str) -> Result<ExecOutput, SshError> {
        let deadline = tokio::time::Instant::now() + self.bounds.command_timeout;
        let timed_out = || SshError::CommandTimedOut {
            target: self.target.clone(),
            command: command_summary(command),
            seconds: self.bounds.command_timeout.as_secs_f32(),
        };
        let mut channel = tokio::time::timeout_at(deadline, self.open_session())
            .await
            .map_err(|_| timed_out())??;
        let outcome = match tokio::time::timeout_at(deadline, self.collect(&mut channel, command)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(timed_out()),
        };
        if outcome.is_err() {
            // Stop the command on the node; a node that does not even take the close is left to
            // the connection's end.
            let _ = tokio::time::timeout(Duration::from_secs(1), channel.close()).await;
        }
        outcome
    }

    /// Starts `command` on an open channel and gathers what it says, up to the output limit.
    async fn collect(
        &self,
        channel: &mut russh::Channel<client::Msg>,
        command: &str,
    ) -> Result<ExecOutput, SshError> {
        channel
            .exec(true, command)
            .await
            .map_err(|error| self.lost(&error))?;
        let mut output = ExecOutput::default();
        let too_large = |limit: usize| SshError::OutputTooLarge {
            target: self.target.clone(),
            command: command_summary(command),
            limit,
        };
        while let Some(message) = channel.wait().await {
            match message {
                ChannelMsg::Data { data } => {
                    within_limit(
                        output.stdout.len() + output.stderr.len(),
                        data.len(),
                        self.bounds.output_limit,
                    )
                    .map_err(too_large)?;
                    output.stdout.extend_from_slice(&data);
                }
                ChannelMsg::ExtendedData { data, .. } => {
                    within_limit(
                        output.stdout.len() + output.stderr.len(),
                        data.len(),
                        self.bounds.output_limit,
                    )
                    .map_err(too_large)?;
                    output.stderr.extend_from_slice(&data);
                }
                ChannelMsg::ExitStatus { exit_status } => output.exit_status = Some(exit_status),
                ChannelMsg::ExitSignal { signal_name, .. } => {
                    output.exit_signal = Some(format!("{signal_name:?}"));
                }
                ChannelMsg::Failure => {
                    return Err(SshError::Remote {
                        target: self.target.clone(),
                        reason: format!("the node refused to run `{}`", command_summary(command)),
                    });
                }
                _ => {}
            }
        }
        Ok(output)
    }

    /// Whether the connection is closed.
    pub fn is_closed(&self) -> bool {
        self.handle.is_closed()
    }

    /// Closes the connection politely.
    pub async fn close(&self) {
        let _ = self.handle.disconnect(Disconnect::ByApplication, "", "en").await;
    }

    pub(crate) fn lost(&self, error: &russh::Error) -> SshError {
        SshError::ConnectionLost {
            target: self.target.clone(),
            reason: error.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt as _;

    #[test]
    fn commands_are_named_by_their_first_line_and_output_is_bounded() {
        assert_eq!(command_summary("cat /proc/uptime"), "cat /proc/uptime");
        assert_eq!(command_summary("cd /x || exit 3\nfind ."), "cd /x || exit 3…");
        let long = "x".repeat(100);
        assert_eq!(command_summary(&long).chars().count(), 61);
        assert_eq!(within_limit(10, 6, 16), Ok(()));
        assert_eq!(within_limit(10, 7, 16), Err(16));
        assert_eq!(within_limit(usize::MAX, 1, 16), Err(16));
    }

    #[test]
    fn a_proxy_command_is_split_once_and_the_host_fills_one_argument() {
        let command = ProxyCommand::parse("ip netns exec 'lab one' socat - TCP:%h:%p").expect("splits");
        assert_eq!(
            command.argv_for("10.0.0.5", 2222),
            [
                "ip",
                "netns",
                "exec",
                "lab one",
                "socat",
                "-",
                "TCP:10.0.0.5:2222"
            ]
        );
        let hostile = "x; touch /tmp/pwned $(id) `id` \"'";
        assert_eq!(
            ProxyCommand::parse("ssh -W %h:%p jump")
                .expect("splits")
                .argv_for(hostile, 22),
            ["ssh", "-W", &format!("{hostile}:22"), "jump"]
        );
        assert_eq!(
            ProxyCommand::parse("echo 100%% %x %")
                .expect("splits")
                .argv_for("h", 1),
            ["echo", "100%", "%x", "%"]
        );
    }

    #[test]
    fn a_proxy_command_that_cannot_be_split_is_refused_saying_so() {
        let error = ProxyCommand::parse("ssh -W '%h:%p jump").expect_err("unclosed quote");
        assert!(
            error.to_string().contains("cannot be split into arguments"),
            "{error}"
        );
        assert_eq!(ProxyCommand::parse("  "), Err(ProxyCommandError::Empty));
        assert!("ssh \"x".parse::<ProxyCommand>().is_err());
    }

    /// The attack of issue 15: a node address that is a shell command. The proxy command runs as an
    /// argument list: the address reaches it as one argument, and nothing it says is executed.
    #[tokio::test]
    async fn a_hostile_host_reaches_the_proxy_command_as_one_argument_and_runs_nothing() {
        let dir = tempfile::tempdir().expect("temp dir");
        let pwned = dir.path().join("pwned");
        let host = format!("x; touch {} #", pwned.display());
        let command =
            ProxyCommand::parse(r#"sh -c 'for a in "$@"; do printf "[%s]\n" "$a"; done' proxy %h %p"#)
                .expect("splits");
        let target = NodeTarget {
            user: "root".into(),
            host: host.clone(),
            port: 22,
        };
        let mut stream = open_stream(&target, &Transport::ProxyCommand(command))
            .await
            .expect("the proxy command starts");
        let mut seen = String::new();
        stream.read_to_string(&mut seen).await.expect("read its output");
        assert_eq!(seen, format!("[{host}]\n[22]\n"));
        assert!(!pwned.exists(), "the host name was executed");
    }
}
