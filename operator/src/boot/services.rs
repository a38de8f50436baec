//! The node services a WalT image waits for while it boots, served by the boot service on WalT's
//! ports: the node API's `sync_clock` (TCP 12345, a `REQ_API_SESSION` of the `NSAPI`) and the boot
//! notification (TCP 12347, `REQ_NOTIFY_BOOTUP_STATUS`: the node holds the connection open while it
//! runs; ours also says which image it booted, `walt_image_id=<digest>`).
//!
//! Both speak WalT's line protocol: the first line names the request (its name or number).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use super::state::{self, BootState};

/// Longest line read from a node.
pub const MAX_LINE: usize = 4096;
/// Idle time before the first keepalive probe of a node's connection (WalT's 15 s).
const KEEPALIVE_IDLE: Duration = Duration::from_secs(15);
/// Between keepalive probes.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
/// How long a node may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A request named on the first line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// `REQ_API_SESSION` (10): remote procedure calls.
    ApiSession,
    /// `REQ_NOTIFY_BOOTUP_STATUS` (14): the node booted.
    NotifyBootup,
}

/// The request a first line names (WalT accepts the name or its number).
pub fn parse_request(line: &str) -> Option<Request> {
    match line.trim() {
        "REQ_API_SESSION" | "10" => Some(Request::ApiSession),
        "REQ_NOTIFY_BOOTUP_STATUS" | "14" => Some(Request::NotifyBootup),
        _ => None,
    }
}

/// A message of an API session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiMessage {
    /// `('API_CALL', 'name', args, kwargs)`.
    Call(String),
    /// `('CLOSE')` or `('CLOSE',)`.
    Close,
    /// Anything else.
    Unknown,
}

/// Parses one line of an API session (pure).
pub fn parse_api_message(line: &str) -> ApiMessage {
    let line = line.trim();
    if matches!(line, "('CLOSE')" | "('CLOSE',)") {
        return ApiMessage::Close;
    }
    let Some(rest) = line.strip_prefix("('API_CALL',") else {
        return ApiMessage::Unknown;
    };
    let rest = rest.trim_start();
    let Some(quote @ ('\'' | '"')) = rest.chars().next() else {
        return ApiMessage::Unknown;
    };
    let name: String = rest[1..].chars().take_while(|c| *c != quote).collect();
    let valid = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if valid {
        ApiMessage::Call(name)
    } else {
        ApiMessage::Unknown
    }
}

/// The answer line to a call (pure): `sync_clock` gets the time in seconds since the epoch; any
/// other call an exception naming it.
pub fn answer(call: &str, now_secs: u64) -> String {
    match call {
        "sync_clock" => format!("('RESULT', {now_secs})\n"),
        other => format!("('EXCEPTION', 'the walt boot service does not serve {other}')\n"),
    }
}

/// What a booted node said after `REQ_NOTIFY_BOOTUP_STATUS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// The digest it booted (`walt_image_id=<digest>`); `None`: it did not say (WalT's own
    /// notifier sends empty lines).
    pub image: Option<String>,
}

/// Parses the first line a node sends after its notification request (pure). A digest must look
/// like one (`algorithm:hex`), else it is taken as not said.
pub fn parse_notification(line: &str) -> Notification {
    let image = line
        .trim()
        .strip_prefix("walt_image_id=")
        .filter(|digest| is_digest(digest))
        .map(str::to_string);
    Notification { image }
}

fn is_digest(text: &str) -> bool {
    let Some((algorithm, hex)) = text.split_once(':') else {
        return false;
    };
    text.len() <= 200
        && !algorithm.is_empty()
        && algorithm
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'+' || b == b'.')
        && hex.len() >= 32
        && hex.bytes().all(|b| b.is_ascii_hexdigit())
}

async fn read_line<R: AsyncRead + Unpin>(reader: &mut BufReader<R>) -> std::io::Result<Option<String>> {
    let mut line = Vec::new();
    let n = (&mut *reader)
        .take(MAX_LINE as u64)
        .read_until(b'\n', &mut line)
        .await?;
    if n == 0 {
        return Ok(None);
    }
    Ok(Some(String::from_utf8_lossy(&line).into_owned()))
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Serves the node API and the boot notification on `listener` (either port: the first line says
/// which) until the task is dropped.
pub async fn serve(listener: TcpListener, state: Arc<BootState>) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            if let Err(error) = connection(stream, peer.ip(), &state).await {
                tracing::debug!(%peer, %error, "node service connection ended");
            }
        });
    }
}

async fn connection(stream: tokio::net::TcpStream, peer: IpAddr, state: &BootState) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    // A node that vanishes (powered off) sends nothing: keepalives find it gone.
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL);
    let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let first = tokio::time::timeout(REQUEST_TIMEOUT, read_line(&mut reader))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no request"))??;
    match first.as_deref().and_then(parse_request) {
        Some(Request::ApiSession) => api_session(&mut reader, &mut write, peer, state).await,
        Some(Request::NotifyBootup) => notification(&mut reader, &mut write, peer, state).await,
        None => Ok(()),
    }
}

async fn api_session<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    reader: &mut BufReader<R>,
    write: &mut W,
    peer: IpAddr,
    state: &BootState,
) -> std::io::Result<()> {
    // The API's name (`NSAPI` for nodes), then the server's version line.
    if read_line(reader).await?.is_none() {
        return Ok(());
    }
    write
        .write_all(format!("walt-boot-service {}\n", env!("CARGO_PKG_VERSION")).as_bytes())
        .await?;
    while let Some(line) = read_line(reader).await? {
        match parse_api_message(&line) {
            ApiMessage::Call(call) => {
                let binding = state.by_ip(peer);
                let mut served = state::served("node-api", binding.as_ref(), peer, &call);
                served.digest = None;
                state.record(served);
                write.write_all(answer(&call, now_secs()).as_bytes()).await?;
            }
            ApiMessage::Close => break,
            ApiMessage::Unknown => {}
        }
    }
    Ok(())
}

async fn notification<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    reader: &mut BufReader<R>,
    write: &mut W,
    peer: IpAddr,
    state: &BootState,
) -> std::io::Result<()> {
    write.write_all(b"OK\n").await?;
    // The first line confirms the boot (WalT's notifier sends an empty one; ours the digest).
    let Some(line) = read_line(reader).await? else {
        return Ok(());
    };
    let notified = parse_notification(&line);
    let binding = state.by_ip(peer);
    let mut booted = state::served("boot-notification", binding.as_ref(), peer, "booted");
    booted.reported = notified.image.clone();
    if binding.is_none() {
        booted.refused = Some("unknown device".into());
    }
    state.record(booted);
    // Held open while the node runs: its end is the node going down (or the network).
    while read_line(reader).await?.is_some() {}
    let mut down = state::served(
        "boot-notification",
        state.by_ip(peer).as_ref(),
        peer,
        "disconnected",
    );
    down.reported = notified.image;
    state.record(down);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_named_or_numbered() {
        assert_eq!(parse_request("REQ_API_SESSION\n"), Some(Request::ApiSession));
        assert_eq!(parse_request("10"), Some(Request::ApiSession));
        assert_eq!(
            parse_request("REQ_NOTIFY_BOOTUP_STATUS\n"),
            Some(Request::NotifyBootup)
        );
        assert_eq!(parse_request("14\r\n"), Some(Request::NotifyBootup));
        assert_eq!(parse_request("REQ_SQL_PROMPT"), None);
        assert_eq!(parse_request(""), None);
    }

    #[test]
    fn api_calls_parse_and_only_sync_clock_is_served() {
        assert_eq!(
            parse_api_message("('API_CALL', 'sync_clock', (), {})\n"),
            ApiMessage::Call("sync_clock".into())
        );
        assert_eq!(
            parse_api_message("('API_CALL', \"sync_clock\", (), {})"),
            ApiMessage::Call("sync_clock".into())
        );
        assert_eq!(parse_api_message("('CLOSE')\n"), ApiMessage::Close);
        assert_eq!(parse_api_message("('CLOSE',)"), ApiMessage::Close);
        assert_eq!(
            parse_api_message("('API_CALL', 'a b', (), {})"),
            ApiMessage::Unknown
        );
        assert_eq!(parse_api_message("garbage"), ApiMessage::Unknown);
        assert_eq!(answer("sync_clock", 1_700_000_000), "('RESULT', 1700000000)\n");
        assert!(answer("register_device", 0).starts_with("('EXCEPTION', "));
    }

    #[test]
    fn notifications_carry_a_digest_or_nothing() {
        let digest = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(
            parse_notification(&format!("walt_image_id={digest}\n")).image,
            Some(digest)
        );
        assert_eq!(parse_notification("\n").image, None, "WalT's own notifier");
        assert_eq!(parse_notification("walt_image_id=latest").image, None);
        assert_eq!(parse_notification("walt_image_id=sha256:xyz").image, None);
        assert_eq!(
            parse_notification(&format!("walt_image_id=sha256:{} x", "a".repeat(64))).image,
            None
        );
    }
}
