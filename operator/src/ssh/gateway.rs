//! The SSH gateway: users log in with their session's key; the gateway relays their session to the
//! node with the lab's node key, which never leaves the gateway.
//!
//! # For the operator
//! Create one [`Authorizations`] set, hand a clone to [`Gateway::new`], and keep the other clone:
//! ```no_run
//! # async fn example(node_key: russh::keys::PrivateKey, host_key: russh::keys::PrivateKey,
//! #                  user_key: russh::keys::PublicKey) -> Result<(), walt_operator::ssh::SshError> {
//! use std::time::{Duration, SystemTime};
//! use walt_operator::ssh::gateway::{Authorization, Authorizations, Gateway, GatewayConfig};
//! use walt_operator::ssh::HostKeyPolicy;
//!
//! let authorizations = Authorizations::new();
//! let gateway = Gateway::new(GatewayConfig::new(host_key, node_key), authorizations.clone());
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:2222").await.map_err(|e| walt_operator::ssh::SshError::Gateway(e.to_string()))?;
//! tokio::spawn(gateway.serve(listener));
//! // A ShellSession became Running:
//! authorizations.add(Authorization {
//!     session_id: "alice-shell-x7k2".into(),
//!     node: "root@192.168.152.10:22".parse()?,
//!     node_host_key: HostKeyPolicy::TrustOnFirstUse,
//!     public_key: user_key,
//!     expires_at: SystemTime::now() + Duration::from_secs(3600),
//! });
//! // The user runs `ssh -p 2222 alice-shell-x7k2@gateway`. When the session ends:
//! authorizations.remove("alice-shell-x7k2"); // live connections of that session are closed too
//! # Ok(()) }
//! ```
//! The SSH user name at the gateway is the session id (or, for ids `namespace/name`, the name:
//! see [`Authorizations::find`]). A connection is accepted only with the
//! session's public key, before its expiry; it is closed when the authorization is removed or
//! expires. Each connection's channels are relayed to that session's node only: session channels
//! (pty-req, shell, exec, the `sftp` subsystem, env vars from [`SAFE_ENV`], window-change, signals,
//! exit-status/exit-signal, EOF) and direct-tcpip forwards to the node's own address (or
//! `localhost`, meaning the node itself); everything else is refused. Idle connections are closed
//! after [`GatewayConfig::idle_timeout`]. One audit line per connection is logged (tracing target
//! `walt::audit`): session, key fingerprint, peer, node, start, end, bytes each way.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use russh::keys::{PrivateKey, PublicKey};
use russh::server::{self, Auth, ChannelOpenHandle, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{Channel, ChannelMsg, ChannelOpenFailure, client};

use super::SshError;
use super::client::{
    ClientConfig, HostKeyPolicy, NodeClient, NodeTarget, SSH_READ_BUFFER, Transport, fingerprint,
};

/// Environment variables a user may pass to the node (`SendEnv`); others are refused.
pub const SAFE_ENV: &[&str] = &[
    "LANG",
    "LANGUAGE",
    "TERM",
    "COLORTERM",
    "TZ",
    "EDITOR",
    "VISUAL",
    "PAGER",
];

fn env_is_safe(name: &str) -> bool {
    SAFE_ENV.contains(&name) || name.starts_with("LC_")
}

/// One session's right to reach one node through the gateway.
#[derive(Debug, Clone)]
pub struct Authorization {
    /// The session id; users log in to the gateway with it as the SSH user name.
    pub session_id: String,
    /// The node and the user to log in as there (`root@address:port`).
    pub node: NodeTarget,
    /// How the node's host key is checked (pinned from the Node's spec/status, or first use).
    pub node_host_key: HostKeyPolicy,
    /// The one public key that may log in for this session.
    pub public_key: PublicKey,
    /// When the authorization ends (connections are closed then).
    pub expires_at: SystemTime,
}

/// The live, shared set of authorizations: clone it freely, every clone sees the same set.
#[derive(Debug, Clone, Default)]
pub struct Authorizations {
    inner: Arc<RwLock<HashMap<String, Authorization>>>,
    activity: Arc<Mutex<HashMap<String, SystemTime>>>,
}

impl Authorizations {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the authorization of `authorization.session_id`.
    pub fn add(&self, authorization: Authorization) {
        if let Ok(mut map) = self.inner.write() {
            map.insert(authorization.session_id.clone(), authorization);
        }
    }

    /// Removes a session's authorization; its live connections are closed within a second.
    pub fn remove(&self, session_id: &str) -> Option<Authorization> {
        if let Ok(mut activity) = self.activity.lock() {
            activity.remove(session_id);
        }
        self.inner.write().ok().and_then(|mut map| map.remove(session_id))
    }

    /// Records that bytes went through a connection of the session just now (ignored once the
    /// session is removed).
    pub fn touch(&self, session_id: &str) {
        let present = self.inner.read().is_ok_and(|map| map.contains_key(session_id));
        if let (true, Ok(mut activity)) = (present, self.activity.lock()) {
            activity.insert(session_id.to_owned(), SystemTime::now());
        }
    }

    /// When bytes last went through a connection of the session here (within half a second), if
    /// ever since it was authorized.
    pub fn last_activity(&self, session_id: &str) -> Option<SystemTime> {
        self.activity
            .lock()
            .ok()
            .and_then(|activity| activity.get(session_id).copied())
    }

    /// The authorization of a session, if present and not expired.
    pub fn get(&self, session_id: &str) -> Option<Authorization> {
        let now = SystemTime::now();
        self.inner
            .read()
            .ok()
            .and_then(|map| map.get(session_id).cloned())
            .filter(|a| a.expires_at > now)
    }

    /// The authorization a user logging in as `user` with `key` gets: the session whose id is
    /// `user`, or whose id ends with `/user` (the operator keys sessions as `namespace/name`
    /// and users log in with the name), holding `key`, not expired. When two such sessions
    /// exist (same name and key in two namespaces) none is chosen: the gateway cannot tell
    /// which node is meant, and refuses rather than guess.
    pub fn find(&self, user: &str, key: &PublicKey) -> Option<Authorization> {
        let now = SystemTime::now();
        let map = self.inner.read().ok()?;
        if let Some(exact) = map.get(user) {
            return (exact.expires_at > now && exact.public_key.key_data() == key.key_data())
                .then(|| exact.clone());
        }
        let suffix = format!("/{user}");
        let mut found = map.values().filter(|a| {
            a.session_id.ends_with(&suffix) && a.expires_at > now && a.public_key.key_data() == key.key_data()
        });
        let first = found.next()?;
        found.next().is_none().then(|| first.clone())
    }

    /// [`Self::find`], waiting up to `catch_up` for the authorization to appear: a session the API
    /// already shows `Running` reaches this gateway through its own watch a moment later (more under
    /// load), and a user who connects in between must not be refused.
    pub async fn find_within(
        &self,
        user: &str,
        key: &PublicKey,
        catch_up: Duration,
    ) -> Option<Authorization> {
        let deadline = tokio::time::Instant::now() + catch_up;
        loop {
            if let Some(found) = self.find(user, key) {
                return Some(found);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(AUTHORIZATION_POLL).await;
        }
    }

    /// The session ids present (expired ones included).
    pub fn session_ids(&self) -> Vec<String> {
        self.inner
            .read()
            .map(|map| map.keys().cloned().collect())
            .unwrap_or_default()
    }
}

/// How long a login waits for its session's authorization to reach this gateway (its watch of
/// ShellSessions lags the API by a moment; a refused login costs about as much anyway).
const AUTHORIZATION_CATCH_UP: Duration = Duration::from_secs(3);

/// How often a waiting login looks again.
const AUTHORIZATION_POLL: Duration = Duration::from_millis(100);

/// The gateway's settings.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// The gateway's own host key (users pin it).
    pub host_key: PrivateKey,
    /// The lab's node key, used to log in to nodes.
    pub node_key: Arc<PrivateKey>,
    /// Connections with no traffic from the user for this long are closed.
    pub idle_timeout: Duration,
    /// How long connecting to a node may take.
    pub node_connect_timeout: Duration,
    /// How nodes are reached.
    pub node_transport: Transport,
}

impl GatewayConfig {
    /// Settings with a 30-minute idle timeout, 10 s node connect timeout, TCP to nodes.
    pub fn new(host_key: PrivateKey, node_key: PrivateKey) -> Self {
        Self {
            host_key,
            node_key: Arc::new(node_key),
            idle_timeout: Duration::from_mins(30),
            node_connect_timeout: Duration::from_secs(10),
            node_transport: Transport::Tcp,
        }
    }
}

/// The SSH gateway.
#[derive(Debug, Clone)]
pub struct Gateway {
    config: Arc<GatewayConfig>,
    russh: Arc<server::Config>,
    authorizations: Authorizations,
}

impl Gateway {
    /// A gateway that admits the sessions in `authorizations`.
    pub fn new(config: GatewayConfig, authorizations: Authorizations) -> Self {
        let russh = server::Config {
            keys: vec![config.host_key.clone()],
            inactivity_timeout: Some(config.idle_timeout),
            auth_rejection_time: Duration::from_millis(300),
            auth_rejection_time_initial: Some(Duration::from_millis(0)),
            methods: russh::MethodSet::from(&[russh::MethodKind::PublicKey][..]),
            window_size: 8 * 1024 * 1024,
            maximum_packet_size: 65535,
            nodelay: true,
            ..server::Config::default()
        };
        Self {
            config: Arc::new(config),
            russh: Arc::new(russh),
            authorizations,
        }
    }

    /// Accepts connections on `listener` until the task is dropped.
    pub async fn serve(self, listener: tokio::net::TcpListener) -> Result<(), SshError> {
        loop {
            let (stream, peer) = listener
                .accept()
                .await
                .map_err(|error| SshError::Gateway(format!("accepting a connection: {error}")))?;
            let _ = stream.set_nodelay(true);
            let gateway = self.clone();
            tokio::spawn(async move { gateway.serve_stream(stream, Some(peer)).await });
        }
    }

    /// Serves one user connection over any byte stream (a TCP stream, a port-forward…).
    pub async fn serve_stream<S>(&self, stream: S, peer: Option<SocketAddr>)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let stats = Arc::new(ConnectionStats::default());
        let handler = ConnectionHandler {
            gateway: self.clone(),
            peer,
            session: None,
            node: None,
            stats: stats.clone(),
            start: SystemTime::now(),
        };
        // Buffered reads: russh reads each packet with two unbuffered reads (see SSH_READ_BUFFER).
        let stream = tokio::io::BufReader::with_capacity(SSH_READ_BUFFER, stream);
        let running = match server::run_stream(self.russh.clone(), stream, handler).await {
            Ok(running) => running,
            Err(error) => {
                tracing::debug!(?peer, "gateway handshake failed: {error:?}");
                return;
            }
        };
        let handle = running.handle();
        let authorizations = self.authorizations.clone();
        let watched = stats.clone();
        // Close the connection when its authorization goes away or expires; record activity.
        let watcher = tokio::spawn(async move {
            let mut bytes_seen = 0;
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let session = watched.session.lock().ok().and_then(|s| s.clone());
                let bytes = watched.up.load(Ordering::Relaxed) + watched.down.load(Ordering::Relaxed);
                if let Some(session) = &session
                    && bytes != bytes_seen
                {
                    bytes_seen = bytes;
                    authorizations.touch(session);
                }
                if let Some(session) = session
                    && authorizations.get(&session).is_none()
                {
                    let _ = handle
                        .disconnect(
                            russh::Disconnect::ByApplication,
                            "the session ended or expired".into(),
                            "en".into(),
                        )
                        .await;
                    return;
                }
            }
        });
        let _ = running.await;
        watcher.abort();
        // A connection shorter than the watcher's period still counts as activity.
        let session = stats.session.lock().ok().and_then(|s| s.clone());
        if let Some(session) = session
            && stats.up.load(Ordering::Relaxed) + stats.down.load(Ordering::Relaxed) > 0
        {
            self.authorizations.touch(&session);
        }
    }
}

#[derive(Debug, Default)]
struct ConnectionStats {
    up: AtomicU64,
    down: AtomicU64,
    session: Mutex<Option<String>>,
}

struct ConnectionHandler {
    gateway: Gateway,
    peer: Option<SocketAddr>,
    session: Option<Authorization>,
    node: Option<Arc<NodeClient>>,
    stats: Arc<ConnectionStats>,
    start: SystemTime,
}

impl fmt::Debug for ConnectionHandler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionHandler")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl Drop for ConnectionHandler {
    fn drop(&mut self) {
        let Some(session) = &self.session else { return };
        let end = SystemTime::now();
        let seconds = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        };
        tracing::info!(
            target: "walt::audit",
            session = %session.session_id,
            key = %fingerprint(&session.public_key),
            peer = ?self.peer,
            node = %session.node,
            start = seconds(self.start),
            end = seconds(end),
            bytes_to_node = self.stats.up.load(Ordering::Relaxed),
            bytes_from_node = self.stats.down.load(Ordering::Relaxed),
            "gateway session ended"
        );
    }
}

impl ConnectionHandler {
    async fn matching(&self, user: &str, key: &PublicKey) -> Option<Authorization> {
        self.gateway
            .authorizations
            .find_within(user, key, AUTHORIZATION_CATCH_UP)
            .await
    }

    async fn node(&mut self) -> Result<Arc<NodeClient>, SshError> {
        if let Some(node) = &self.node
            && !node.is_closed()
        {
            return Ok(node.clone());
        }
        let session = self
            .session
            .as_ref()
            .ok_or_else(|| SshError::Gateway("channel before authentication".into()))?;
        let mut config = ClientConfig::new(
            (*self.gateway.config.node_key).clone(),
            session.node_host_key.clone(),
        );
        config.key = self.gateway.config.node_key.clone();
        config.connect_timeout = self.gateway.config.node_connect_timeout;
        config.transport = self.gateway.config.node_transport.clone();
        let node = Arc::new(NodeClient::connect(&session.node, &config).await?);
        self.node = Some(node.clone());
        Ok(node)
    }
}

impl server::Handler for ConnectionHandler {
    type Error = russh::Error;

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(if self.matching(user, offer.public_key).await.is_some() {
            Auth::Accept
        } else {
            Auth::reject()
        })
    }

    async fn auth_publickey(&mut self, user: &str, key: VerifiedPublicKey<'_>) -> Result<Auth, Self::Error> {
        let Some(authorization) = self.matching(user, key.public_key).await else {
            tracing::info!(target: "walt::audit", user, key = %fingerprint(key.public_key), peer = ?self.peer, "gateway login refused (no such running session, wrong key or expired)");
            return Ok(Auth::reject());
        };
        if let Ok(mut session) = self.stats.session.lock() {
            *session = Some(authorization.session_id.clone());
        }
        tracing::info!(target: "walt::audit", session = %authorization.session_id, key = %fingerprint(key.public_key), peer = ?self.peer, node = %authorization.node, "gateway session started");
        self.session = Some(authorization);
        Ok(Auth::Accept)
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let node = match self.node().await {
            Ok(node) => node,
            Err(error) => {
                tracing::warn!(peer = ?self.peer, "gateway: {error}");
                reply.reject(ChannelOpenFailure::ConnectFailed).await;
                return Ok(());
            }
        };
        let node_channel = match node.open_session().await {
            Ok(channel) => channel,
            Err(error) => {
                tracing::warn!(peer = ?self.peer, "gateway: {error}");
                reply.reject(ChannelOpenFailure::ConnectFailed).await;
                return Ok(());
            }
        };
        reply.accept().await;
        tokio::spawn(relay_session(
            channel,
            node_channel,
            session.handle(),
            self.stats.clone(),
        ));
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        originator_address: &str,
        originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(authorization) = &self.session else {
            reply.reject(ChannelOpenFailure::AdministrativelyProhibited).await;
            return Ok(());
        };
        let own = host_to_connect == authorization.node.host;
        let local = matches!(host_to_connect, "localhost" | "127.0.0.1" | "::1");
        if !own && !local {
            tracing::info!(target: "walt::audit", session = %authorization.session_id, host_to_connect, port_to_connect, "gateway refused a port forward to another host than the session's node");
            reply.reject(ChannelOpenFailure::AdministrativelyProhibited).await;
            return Ok(());
        }
        let Ok(node) = self.node().await else {
            reply.reject(ChannelOpenFailure::ConnectFailed).await;
            return Ok(());
        };
        match node
            .open_direct_tcpip(
                host_to_connect,
                port_to_connect,
                originator_address,
                originator_port,
            )
            .await
        {
            Ok(node_channel) => {
                reply.accept().await;
                tokio::spawn(relay_bytes(channel, node_channel, self.stats.clone()));
            }
            Err(_) => reply.reject(ChannelOpenFailure::ConnectFailed).await,
        }
        Ok(())
    }
}

/// Relays one session channel both ways, requests included.
async fn relay_session(
    user: Channel<Msg>,
    node: Channel<client::Msg>,
    handle: server::Handle,
    stats: Arc<ConnectionStats>,
) {
    let id = user.id();
    let (mut user_rx, user_tx) = user.split();
    let (mut node_rx, node_tx) = node.split();
    // want_reply flags of the requests forwarded to the node, in order (replies come in order).
    let pending: Arc<Mutex<VecDeque<bool>>> = Arc::default();
    let push = |pending: &Arc<Mutex<VecDeque<bool>>>, want: bool| {
        if let Ok(mut queue) = pending.lock() {
            queue.push_back(want);
        }
    };
    let upstream = {
        let pending = pending.clone();
        let handle = handle.clone();
        let stats = stats.clone();
        async move {
            while let Some(message) = user_rx.wait().await {
                let sent = match message {
                    ChannelMsg::Data { data } => {
                        stats.up.fetch_add(data.len() as u64, Ordering::Relaxed);
                        node_tx.data_bytes(data).await
                    }
                    ChannelMsg::Eof => node_tx.eof().await,
                    ChannelMsg::Close => {
                        let _ = node_tx.close().await;
                        break;
                    }
                    ChannelMsg::RequestPty {
                        want_reply,
                        term,
                        col_width,
                        row_height,
                        pix_width,
                        pix_height,
                        terminal_modes,
                    } => {
                        push(&pending, want_reply);
                        node_tx
                            .request_pty(
                                true,
                                &term,
                                col_width,
                                row_height,
                                pix_width,
                                pix_height,
                                &terminal_modes,
                            )
                            .await
                    }
                    ChannelMsg::RequestShell { want_reply } => {
                        push(&pending, want_reply);
                        node_tx.request_shell(true).await
                    }
                    ChannelMsg::Exec { want_reply, command } => {
                        push(&pending, want_reply);
                        node_tx.exec(true, command).await
                    }
                    ChannelMsg::RequestSubsystem { want_reply, name } if name == "sftp" => {
                        push(&pending, want_reply);
                        node_tx.request_subsystem(true, name).await
                    }
                    ChannelMsg::SetEnv {
                        want_reply,
                        variable_name,
                        variable_value,
                    } if env_is_safe(&variable_name) => {
                        push(&pending, want_reply);
                        node_tx.set_env(true, variable_name, variable_value).await
                    }
                    ChannelMsg::WindowChange {
                        col_width,
                        row_height,
                        pix_width,
                        pix_height,
                    } => {
                        node_tx
                            .window_change(col_width, row_height, pix_width, pix_height)
                            .await
                    }
                    ChannelMsg::Signal { signal } => node_tx.signal(signal).await,
                    ChannelMsg::RequestSubsystem { want_reply: true, .. }
                    | ChannelMsg::SetEnv { want_reply: true, .. }
                    | ChannelMsg::RequestX11 { want_reply: true, .. }
                    | ChannelMsg::AgentForward { want_reply: true } => {
                        let _ = handle.channel_failure(id).await;
                        Ok(())
                    }
                    _ => Ok(()),
                };
                if sent.is_err() {
                    break;
                }
            }
        }
    };
    let downstream = async move {
        while let Some(message) = node_rx.wait().await {
            let sent = match message {
                ChannelMsg::Data { data } => {
                    stats.down.fetch_add(data.len() as u64, Ordering::Relaxed);
                    user_tx.data_bytes(data).await
                }
                ChannelMsg::ExtendedData { data, ext } => {
                    stats.down.fetch_add(data.len() as u64, Ordering::Relaxed);
                    user_tx.extended_data_bytes(ext, data).await
                }
                ChannelMsg::Eof => user_tx.eof().await,
                ChannelMsg::ExitStatus { exit_status } => user_tx.exit_status(exit_status).await,
                ChannelMsg::ExitSignal {
                    signal_name,
                    core_dumped,
                    error_message,
                    lang_tag,
                } => {
                    let _ = handle
                        .exit_signal_request(id, signal_name, core_dumped, error_message, lang_tag)
                        .await;
                    Ok(())
                }
                ChannelMsg::Success | ChannelMsg::Failure => {
                    let success = matches!(message, ChannelMsg::Success);
                    let wanted = pending
                        .lock()
                        .ok()
                        .and_then(|mut queue| queue.pop_front())
                        .unwrap_or(false);
                    if wanted {
                        let _ = if success {
                            handle.channel_success(id).await
                        } else {
                            handle.channel_failure(id).await
                        };
                    }
                    Ok(())
                }
                ChannelMsg::Close => break,
                _ => Ok(()),
            };
            if sent.is_err() {
                break;
            }
        }
        let _ = user_tx.close().await;
    };
    tokio::join!(upstream, downstream);
}

/// Relays a forwarded TCP connection both ways.
async fn relay_bytes(user: Channel<Msg>, node: Channel<client::Msg>, stats: Arc<ConnectionStats>) {
    let (mut user_rx, user_tx) = user.split();
    let (mut node_rx, node_tx) = node.split();
    let up = {
        let stats = stats.clone();
        async move {
            while let Some(message) = user_rx.wait().await {
                let sent = match message {
                    ChannelMsg::Data { data } => {
                        stats.up.fetch_add(data.len() as u64, Ordering::Relaxed);
                        node_tx.data_bytes(data).await
                    }
                    ChannelMsg::Eof => node_tx.eof().await,
                    ChannelMsg::Close => break,
                    _ => Ok(()),
                };
                if sent.is_err() {
                    break;
                }
            }
            let _ = node_tx.close().await;
        }
    };
    let down = async move {
        while let Some(message) = node_rx.wait().await {
            let sent = match message {
                ChannelMsg::Data { data } => {
                    stats.down.fetch_add(data.len() as u64, Ordering::Relaxed);
                    user_tx.data_bytes(data).await
                }
                ChannelMsg::Eof => user_tx.eof().await,
                ChannelMsg::Close => break,
                _ => Ok(()),
            };
            if sent.is_err() {
                break;
            }
        }
        let _ = user_tx.close().await;
    };
    tokio::join!(up, down);
}

#[cfg(test)]
mod tests {
    use super::*;
    use russh::keys::ssh_key::private::Ed25519Keypair;

    fn key(seed: u8) -> PublicKey {
        PrivateKey::from(Ed25519Keypair::from_seed(&[seed; 32]))
            .public_key()
            .clone()
    }

    fn authorization(id: &str, seed: u8, node: &str) -> Authorization {
        Authorization {
            session_id: id.into(),
            node: node.parse().expect("node target"),
            node_host_key: HostKeyPolicy::TrustOnFirstUse,
            public_key: key(seed),
            expires_at: SystemTime::now() + Duration::from_mins(1),
        }
    }

    #[tokio::test]
    async fn a_login_waits_a_moment_for_its_session_to_reach_the_gateway() {
        let set = std::sync::Arc::new(Authorizations::new());
        let late = set.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            late.add(authorization("alice/s1", 1, "root@10.0.0.1:22"));
        });
        let found = set
            .find_within("s1", &key(1), Duration::from_secs(3))
            .await
            .expect("authorized within the catch-up");
        assert_eq!(found.session_id, "alice/s1");
        let started = tokio::time::Instant::now();
        assert!(
            set.find_within("s1", &key(2), Duration::from_millis(300))
                .await
                .is_none(),
            "a wrong key is refused once the catch-up is over"
        );
        assert!(started.elapsed() >= Duration::from_millis(300));
    }

    #[test]
    fn users_log_in_with_the_session_name_and_its_key_only() {
        let set = Authorizations::new();
        set.add(authorization("alice/s1", 1, "root@10.0.0.1:22"));
        set.add(authorization("plain", 2, "root@10.0.0.2:22"));
        let found = set.find("s1", &key(1)).expect("alice's session");
        assert_eq!(found.node.host, "10.0.0.1");
        assert!(set.find("s1", &key(2)).is_none(), "another key is refused");
        assert!(set.find("plain", &key(2)).is_some(), "an exact id works too");
        assert!(set.find("alice/s1", &key(1)).is_some());
        // The same name and key in two namespaces: which node is meant is unknown, refuse.
        set.add(authorization("bob/s1", 1, "root@10.0.0.3:22"));
        assert!(set.find("s1", &key(1)).is_none());
        set.remove("bob/s1");
        let mut expired = authorization("carol/s9", 3, "root@10.0.0.4:22");
        expired.expires_at = SystemTime::now() - Duration::from_secs(1);
        set.add(expired);
        assert!(set.find("s9", &key(3)).is_none(), "expired");
        assert_eq!(set.last_activity("alice/s1"), None);
        set.touch("alice/s1");
        assert!(set.last_activity("alice/s1").is_some());
        set.remove("alice/s1");
        assert_eq!(set.last_activity("alice/s1"), None, "forgotten with the session");
        set.touch("alice/s1");
        assert_eq!(
            set.last_activity("alice/s1"),
            None,
            "not recorded for a removed session"
        );
    }
}
