//! `node shell`, `node run`, `node proxy`: SSH to nodes through the operator's gateway, each
//! with a ShellSession that authorizes one key for one node, deleted when the plugin is done.

use std::path::{Path, PathBuf};

use kube::api::PostParams;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use walt_crds::{BootMode, Gateway, ShellSession, ShellSessionSpec};

use crate::cluster::Ctx;
use crate::describe::{node_phase, node_ready};
use crate::error::{Error, Op, Result};
use crate::gateway;
use crate::resolve::{name_of, node_set};
use crate::session::{self, Created};
use crate::ssh::{Ssh, ephemeral_key, public_line, shell_join};
use crate::watch::interruptible;

/// WalT's warning for volatile nodes.
pub const VOLATILE_NOTE: &str = "Note: changes outside /persist will be lost on next node reboot.";

fn require_ready(node: &walt_crds::Node) -> Result<()> {
    if node_ready(node) {
        return Ok(());
    }
    let name = name_of(node);
    let phase = node_phase(node);
    let hint = match phase.as_str() {
        "Unreachable" => format!(
            "the operator cannot reach it; see `kubectl walt node show {name}`, then `kubectl walt node reboot {name}` or power-cycle it"
        ),
        _ => format!("wait until it has booted: `kubectl walt node wait {name}`"),
    };
    Err(Error::NotReady {
        node: name,
        phase,
        hint,
    })
}

async fn permissions(ctx: &Ctx) -> Result<()> {
    ctx.require(&[
        ("create", "walt.dev", "shellsessions", None, &ctx.namespace),
        ("delete", "walt.dev", "shellsessions", None, &ctx.namespace),
    ])
    .await
}

/// Waits for a node session to run and returns its gateway.
async fn gateway_of(ctx: &Ctx, created: &Created, node: &str) -> Result<Gateway> {
    let session = created
        .follow(ctx, &format!("opening a session on {node}:"), &|s| {
            session::running(s) && s.status.as_ref().is_some_and(|st| st.gateway.is_some())
        })
        .await?;
    session
        .status
        .and_then(|s| s.gateway)
        .ok_or_else(|| Error::Failed("the session runs but names no gateway".into()))
}

/// `node shell NODE [-- CMD]`
pub async fn shell(ctx: &Ctx, node_name: &str, command: &[String]) -> Result<i32> {
    let node = ctx.get_node(node_name).await?;
    require_ready(&node)?;
    permissions(ctx).await?;
    let key = ephemeral_key()?;
    let spec = ShellSessionSpec {
        node: Some(node_name.to_string()),
        public_key: Some(public_line(&key)?),
        ..session::spec_defaults()
    };
    let created = session::create(ctx, node_name, spec).await?;
    let outcome = interruptible(async {
        let gw = gateway_of(ctx, &created, node_name).await?;
        let connection = gateway::connect(ctx, &gw).await?;
        let (stream, _forward) = connection.into_parts();
        let ssh = Ssh::connect(stream, &gw.user, &key).await?;
        if command.is_empty() && node.spec.boot_mode == BootMode::Volatile {
            eprintln!("{VOLATILE_NOTE}");
        }
        let cmd = (!command.is_empty()).then(|| shell_join(command));
        let status = ssh.interactive(cmd.as_deref()).await?;
        ssh.close().await;
        Ok(status as i32)
    })
    .await;
    created.delete(ctx).await;
    outcome
}

/// `node run NODES -- CMD…`: the command runs on all nodes at once; the first non-zero exit
/// status (in node order) is the plugin's.
pub async fn run(ctx: &Ctx, set: &str, command: &[String]) -> Result<i32> {
    let nodes = node_set(ctx, set).await?;
    for node in &nodes {
        require_ready(node)?;
    }
    permissions(ctx).await?;
    let key = ephemeral_key()?;
    let line = public_line(&key)?;
    let cmd = shell_join(command);
    let mut created = Vec::new();
    for node in &nodes {
        let name = name_of(node);
        let spec = ShellSessionSpec {
            node: Some(name.clone()),
            public_key: Some(line.clone()),
            ..session::spec_defaults()
        };
        match session::create(ctx, &name, spec).await {
            Ok(c) => created.push((name, c)),
            Err(e) => {
                for (_, c) in &created {
                    c.delete(ctx).await;
                }
                return Err(e);
            }
        }
    }
    let runs = created.iter().map(|(name, c)| {
        let (key, cmd) = (&key, &cmd);
        async move {
            let gw = gateway_of(ctx, c, name).await?;
            let (stream, _forward) = gateway::connect(ctx, &gw).await?.into_parts();
            let ssh = Ssh::connect(stream, &gw.user, key).await?;
            let status = ssh.run_prefixed(name, cmd).await?;
            ssh.close().await;
            Ok::<u32, Error>(status)
        }
    });
    let outcome = interruptible(async { Ok(futures::future::join_all(runs).await) }).await;
    for (_, c) in &created {
        c.delete(ctx).await;
    }
    let results = outcome?;
    let mut code = 0;
    let mut failures = Vec::new();
    for ((name, _), result) in created.iter().zip(results) {
        match result {
            Ok(0) => {}
            Ok(status) => {
                if code == 0 {
                    code = status as i32;
                }
            }
            Err(e) => failures.push(format!("{name}: {e}")),
        }
    }
    if !failures.is_empty() {
        return Err(Error::Failed(failures.join("\n")));
    }
    Ok(code)
}

/// The public key OpenSSH will offer: `--public-key`, else the first of the usual files.
pub fn user_public_key(explicit: Option<&Path>) -> Result<String> {
    let candidates: Vec<PathBuf> = if let Some(p) = explicit {
        vec![p.to_path_buf()]
    } else {
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
        ["id_ed25519.pub", "id_ecdsa.pub", "id_rsa.pub"]
            .iter()
            .map(|f| home.join(".ssh").join(f))
            .collect()
    };
    for path in &candidates {
        if let Ok(text) = std::fs::read_to_string(path) {
            let line = text
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or_default()
                .trim()
                .to_string();
            russh::keys::PublicKey::from_openssh(&line).map_err(|e| {
                Error::Invalid(format!("{} is not an OpenSSH public key ({e})", path.display()))
            })?;
            return Ok(line);
        }
    }
    Err(Error::Invalid(format!(
        "no public key found ({}): give one with --public-key FILE, or make one with `ssh-keygen -t ed25519`",
        candidates
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )))
}

/// `node proxy NODE`: stdin/stdout ↔ the gateway, for OpenSSH's `ProxyCommand`. OpenSSH logs in
/// to the gateway with the user's own key as the session's SSH user: `--login %r` makes the
/// session carry the name OpenSSH uses. Nothing but SSH bytes goes to stdout.
pub async fn proxy(ctx: &Ctx, node_arg: &str, public_key: Option<&Path>, login: Option<&str>) -> Result<i32> {
    let node_name = node_arg.strip_prefix("walt-").unwrap_or(node_arg);
    let node = ctx.get_node(node_name).await?;
    require_ready(&node)?;
    let key_line = user_public_key(public_key)?;
    permissions(ctx).await?;
    let spec = ShellSessionSpec {
        node: Some(node_name.to_string()),
        public_key: Some(key_line),
        ..session::spec_defaults()
    };
    let created = match login {
        Some(name) => {
            let mut s = ShellSession::new(name, spec);
            s.metadata.labels = Some(
                [(
                    "app.kubernetes.io/created-by".to_string(),
                    "kubectl-walt".to_string(),
                )]
                .into(),
            );
            ctx.sessions()
                .create(&PostParams::default(), &s)
                .await
                .map_err(|e| {
                    Error::api(
                        Op::named(
                            "create",
                            "shell session",
                            "shellsessions.walt.dev",
                            name,
                            &ctx.namespace,
                        ),
                        e,
                    )
                })?;
            Created {
                name: name.to_string(),
                namespace: ctx.namespace.clone(),
            }
        }
        None => session::create(ctx, node_name, spec).await?,
    };
    let outcome = interruptible(async {
        let gw = gateway_of(ctx, &created, node_name).await?;
        if login.is_some_and(|l| l != gw.user) {
            return Err(Error::Failed(format!(
                "the gateway expects the SSH user {:?} for this session, not {:?}: this operator names gateway users itself",
                gw.user,
                login.unwrap_or_default()
            )));
        }
        if login.is_none() {
            eprintln!("kubectl walt: session ready; log in to the gateway as {:?}", gw.user);
        }
        let (mut stream, _forward) = gateway::connect(ctx, &gw).await?.into_parts();
        let mut stdin = tokio::io::stdin();
        let mut stdout = tokio::io::stdout();
        let (mut read_half, mut write_half) = tokio::io::split(&mut stream);
        let upstream = async {
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                let n = stdin.read(&mut buf).await?;
                if n == 0 {
                    write_half.shutdown().await?;
                    return Ok::<(), std::io::Error>(());
                }
                write_half.write_all(&buf[..n]).await?;
            }
        };
        let downstream = async {
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                let n = read_half.read(&mut buf).await?;
                if n == 0 {
                    return Ok::<(), std::io::Error>(());
                }
                stdout.write_all(&buf[..n]).await?;
                stdout.flush().await?;
            }
        };
        // The connection is over when the gateway closes its side; the end of stdin only
        // half-closes ours (OpenSSH may still be reading).
        tokio::pin!(upstream, downstream);
        let mut upstream_done = false;
        loop {
            tokio::select! {
                r = &mut upstream, if !upstream_done => {
                    r.map_err(Error::io("relaying stdin to the gateway"))?;
                    upstream_done = true;
                }
                r = &mut downstream => {
                    r.map_err(Error::io("relaying the gateway to stdout"))?;
                    break;
                }
            }
        }
        Ok(0)
    })
    .await;
    created.delete(ctx).await;
    outcome
}
