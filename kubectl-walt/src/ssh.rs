//! The SSH client that talks to the walt gateway: an ephemeral key kept in memory, a PTY shell
//! with window changes, or a command whose output is prefixed per node.

use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

use russh::client::{self, Handle};
use russh::keys::{Algorithm, PrivateKey, PrivateKeyWithHashAlg, PublicKey};
use russh::{ChannelMsg, Disconnect};
use tokio::io::AsyncWriteExt;
use tokio::signal::unix::{SignalKind, signal};

use crate::error::{Error, Result};
use crate::format::{flush_prefixed, prefix_lines};
use crate::gateway::GatewayIo;
use crate::terminal::{RawMode, StdinPump};

/// A fresh Ed25519 key pair, never written anywhere.
pub fn ephemeral_key() -> Result<PrivateKey> {
    PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519)
        .map_err(|e| Error::Ssh(format!("cannot make a session key: {e}")))
}

/// The OpenSSH public key line of a key (`ssh-ed25519 AAAA… kubectl-walt`).
pub fn public_line(key: &PrivateKey) -> Result<String> {
    let mut public: PublicKey = key.public_key().clone();
    public.set_comment("kubectl-walt");
    public
        .to_openssh()
        .map_err(|e| Error::Ssh(format!("cannot encode the session key: {e}")))
}

/// Accepts the gateway's host key: the connection runs inside the API server's authenticated
/// channel (a port-forward), which already proves who is at the other end.
#[derive(Debug)]
struct GatewayClient;

impl client::Handler for GatewayClient {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        _key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

/// An authenticated SSH connection to the gateway.
pub struct Ssh {
    handle: Handle<GatewayClient>,
}

impl std::fmt::Debug for Ssh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ssh")
    }
}

impl Ssh {
    /// Speaks SSH over `stream` and logs in as `user` with `key`.
    pub async fn connect<S: GatewayIo + 'static>(stream: S, user: &str, key: &PrivateKey) -> Result<Ssh> {
        let config = Arc::new(client::Config {
            keepalive_interval: Some(Duration::from_secs(15)),
            keepalive_max: 4,
            ..client::Config::default()
        });
        let mut handle = client::connect_stream(config, stream, GatewayClient)
            .await
            .map_err(|e| Error::Ssh(format!("the SSH handshake with the walt gateway failed: {e}")))?;
        let auth = handle
            .authenticate_publickey(user, PrivateKeyWithHashAlg::new(Arc::new(key.clone()), None))
            .await
            .map_err(|e| Error::Ssh(format!("logging in to the walt gateway failed: {e}")))?;
        if !auth.success() {
            return Err(Error::Ssh(format!(
                "the walt gateway refused the session key for {user:?}: the session may have ended or expired; try again"
            )));
        }
        Ok(Ssh { handle })
    }

    /// An interactive shell (or `command`) with a PTY sized like the local terminal. Returns the
    /// remote exit status.
    pub async fn interactive(&self, command: Option<&str>) -> Result<u32> {
        let mut channel = self
            .handle
            .channel_open_session()
            .await
            .map_err(|e| Error::Ssh(format!("cannot open a session channel: {e}")))?;
        let (cols, rows) = crate::terminal::size();
        channel
            .request_pty(
                true,
                &crate::terminal::term(),
                u32::from(cols),
                u32::from(rows),
                0,
                0,
                &[],
            )
            .await
            .map_err(|e| Error::Ssh(format!("cannot get a terminal on the node: {e}")))?;
        match command {
            Some(cmd) => channel.exec(true, cmd).await,
            None => channel.request_shell(true).await,
        }
        .map_err(|e| Error::Ssh(format!("cannot start the shell: {e}")))?;

        let mut raw = RawMode::enter()?;
        let (_pump, mut input) = StdinPump::start();
        let mut winch = signal(SignalKind::window_change()).ok();
        let mut term = signal(SignalKind::terminate()).ok();
        let mut hup = signal(SignalKind::hangup()).ok();
        let mut stdout = tokio::io::stdout();
        let mut stderr = tokio::io::stderr();
        let mut status: Option<u32> = None;
        let mut input_open = true;
        loop {
            tokio::select! {
                chunk = input.recv(), if input_open => if let Some(bytes) = chunk {
                    if channel.data(&bytes[..]).await.is_err() {
                        break;
                    }
                } else {
                    input_open = false;
                    let _ = channel.eof().await;
                },
                Some(()) = async { winch.as_mut()?.recv().await } => {
                    let (cols, rows) = crate::terminal::size();
                    let _ = channel.window_change(u32::from(cols), u32::from(rows), 0, 0).await;
                }
                Some(()) = async { term.as_mut()?.recv().await } => {
                    raw.restore();
                    return Err(Error::Interrupted);
                }
                Some(()) = async { hup.as_mut()?.recv().await } => {
                    raw.restore();
                    return Err(Error::Interrupted);
                }
                msg = channel.wait() => match msg {
                    Some(ChannelMsg::Data { data }) => {
                        stdout.write_all(&data).await.map_err(Error::io("cannot write to the terminal"))?;
                        stdout.flush().await.map_err(Error::io("cannot write to the terminal"))?;
                    }
                    Some(ChannelMsg::ExtendedData { data, .. }) => {
                        stderr.write_all(&data).await.map_err(Error::io("cannot write to the terminal"))?;
                        stderr.flush().await.map_err(Error::io("cannot write to the terminal"))?;
                    }
                    Some(ChannelMsg::ExitStatus { exit_status }) => status = Some(exit_status),
                    Some(ChannelMsg::ExitSignal { .. }) => status = status.or(Some(255)),
                    Some(_) => {}
                    None => break,
                },
            }
        }
        raw.restore();
        status.ok_or_else(|| {
            Error::Ssh("the connection to the node was lost (no exit status came back)".into())
        })
    }

    /// Runs `command` without a PTY; every output line is prefixed with `name` (stdout lines to
    /// stdout, stderr lines to stderr). Returns the exit status.
    pub async fn run_prefixed(&self, name: &str, command: &str) -> Result<u32> {
        let mut channel = self
            .handle
            .channel_open_session()
            .await
            .map_err(|e| Error::Ssh(format!("{name}: cannot open a session channel: {e}")))?;
        channel
            .exec(true, command)
            .await
            .map_err(|e| Error::Ssh(format!("{name}: cannot run the command: {e}")))?;
        let _ = channel.eof().await;
        let (mut out_pending, mut err_pending) = (Vec::new(), Vec::new());
        let mut status = None;
        while let Some(msg) = channel.wait().await {
            match msg {
                ChannelMsg::Data { data } => emit(false, &prefix_lines(name, &mut out_pending, &data)),
                ChannelMsg::ExtendedData { data, .. } => {
                    emit(true, &prefix_lines(name, &mut err_pending, &data));
                }
                ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
                ChannelMsg::ExitSignal { signal_name, .. } => {
                    emit(true, &format!("{name}: killed by signal {signal_name:?}\n"));
                    status = status.or(Some(255));
                }
                _ => {}
            }
        }
        emit(false, &flush_prefixed(name, &mut out_pending));
        emit(true, &flush_prefixed(name, &mut err_pending));
        status.ok_or_else(|| {
            Error::Ssh(format!(
                "{name}: the connection was lost before the command ended"
            ))
        })
    }

    /// Says goodbye (best effort).
    pub async fn close(&self) {
        let _ = self.handle.disconnect(Disconnect::ByApplication, "", "en").await;
    }
}

/// Writes whole lines at once, so lines of parallel nodes never mix.
fn emit(to_stderr: bool, text: &str) {
    if text.is_empty() {
        return;
    }
    if to_stderr {
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(text.as_bytes());
        let _ = err.flush();
    } else {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
    }
}

/// Quotes arguments for a remote POSIX shell (SSH carries one command string).
pub fn shell_join(args: &[String]) -> String {
    if args.len() == 1 {
        // One argument: the user wrote a shell command line on purpose (`-- 'a | b'`).
        return args[0].clone();
    }
    args.iter()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_fresh_ed25519_openssh_lines() {
        let a = ephemeral_key().expect("key");
        let b = ephemeral_key().expect("key");
        let line = public_line(&a).expect("line");
        assert!(line.starts_with("ssh-ed25519 AAAA"), "{line}");
        assert!(line.ends_with(" kubectl-walt"));
        assert_ne!(line, public_line(&b).expect("line"));
    }

    #[test]
    fn remote_commands_are_quoted() {
        let args = |v: &[&str]| v.iter().map(|s| (*s).to_string()).collect::<Vec<_>>();
        assert_eq!(shell_join(&args(&["uname", "-a"])), "uname -a");
        assert_eq!(
            shell_join(&args(&["echo", "a b", "it's"])),
            "echo 'a b' 'it'\\''s'"
        );
        assert_eq!(
            shell_join(&args(&["cat /etc/os-release | head -1"])),
            "cat /etc/os-release | head -1"
        );
    }
}
