//! `image shell IMAGE`: a ShellSession on the image, progress while its pod starts, the pod's TTY
//! in raw mode (window resizes included), then WalT's exit dialogue.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::signal::unix::{SignalKind, signal};
use walt_crds::{ImageName, ImageShellMode, ShellMode, ShellSession, ShellSessionPhase, ShellSessionSpec};

use crate::cli::ShellModeArg;
use crate::cluster::Ctx;
use crate::dialogue::{Decision, NameFacts, exit_dialogue};
use crate::error::{Error, Result};
use crate::format::{bytes, short_digest};
use crate::resolve::{image_name, list_nodes, nodes_booting};
use crate::session::{self, Created};
use crate::terminal::{RawMode, StdinPump};
use crate::watch::interruptible;
use walt_crds::image::MAX_SHELL_LAYERS;

/// `image shell IMAGE`
pub async fn run(ctx: &Ctx, image: &str, mode: ShellModeArg) -> Result<i32> {
    let name = image_name(image)?;
    let object = ctx.get_image(&name.object_name(), &name.to_string()).await?;
    let status = object.status.clone().unwrap_or_default();
    if let Some(layers) = status.layers.filter(|l| *l >= MAX_SHELL_LAYERS) {
        return Err(Error::Invalid(format!(
            "image {name} has {layers} layers: an image shell needs fewer than {MAX_SHELL_LAYERS}; squash it first (`kubectl walt image squash {name}`)"
        )));
    }
    if let Some(busy) = session::sessions_on_image(ctx, &name.to_string()).await.first() {
        eprintln!(
            "Note: image {name} already has a shell session ({}); only one runs at a time, yours starts when it ends.",
            busy.metadata.name.clone().unwrap_or_default()
        );
    }
    ctx.require(&[
        ("create", "walt.dev", "shellsessions", None, &ctx.namespace),
        ("patch", "walt.dev", "shellsessions", None, &ctx.namespace),
        ("create", "", "pods", Some("attach"), &ctx.namespace),
    ])
    .await?;

    let spec = ShellSessionSpec {
        image: Some(name.to_string()),
        mode: match mode {
            ShellModeArg::Auto => ShellMode::Auto,
            ShellModeArg::Init => ShellMode::Init,
            ShellModeArg::Basic => ShellMode::Basic,
        },
        ..session::spec_defaults()
    };
    let created = session::create(ctx, &name.object_name(), spec).await?;
    let outcome = interruptible(shell_and_decide(ctx, &created, &name)).await;
    if matches!(outcome, Err(Error::Interrupted)) {
        // Ctrl-C anywhere outside the shell itself discards, as WalT does.
        let _ = created
            .patch_spec(ctx, serde_json::json!({"discard": true}))
            .await;
        eprintln!("\nAborted: the changes were discarded.");
    }
    created.delete(ctx).await;
    outcome
}

async fn shell_and_decide(ctx: &Ctx, created: &Created, name: &ImageName) -> Result<i32> {
    let session = created
        .follow(ctx, &format!("starting a shell in {name}:"), &|s| {
            session::running(s) && s.status.as_ref().is_some_and(|st| st.pod.is_some())
        })
        .await?;
    let status = session.status.clone().unwrap_or_default();
    let pod = session::shell_pod(ctx, &session)
        .ok_or_else(|| Error::Failed("the shell session runs but names no shell pod".into()))?;
    if status.emulated == Some(true) {
        eprintln!(
            "Note: {name} is built for another CPU: it runs through qemu-user emulation (slower than native)."
        );
    }
    match status.mode {
        Some(ImageShellMode::Init) => {
            eprintln!("Note: this is an init shell: the image's init runs as PID 1 and its services start.");
        }
        Some(ImageShellMode::Basic) => {
            eprintln!("Note: this is a basic shell: only your shell process runs (no init, no services).");
        }
        None => {}
    }
    eprintln!("Type `exit` or Ctrl-D to leave; you will then choose what to do with your changes.");
    attach(ctx, &pod).await?;
    ensure_shell_ended(ctx, created).await?;

    let session = created
        .follow(ctx, "saving your changes:", &|s| {
            s.status.as_ref().is_some_and(|st| {
                matches!(
                    st.phase,
                    ShellSessionPhase::AwaitingDecision
                        | ShellSessionPhase::Discarded
                        | ShellSessionPhase::Saved
                )
            })
        })
        .await
        .map_err(|e| match e {
            Error::Failed(m) => Error::Failed(format!("{m}\n  Your changes could not be kept.")),
            other => other,
        })?;
    let status = session.status.clone().unwrap_or_default();
    let changes = status.changes.clone().unwrap_or_default();
    if status.phase == ShellSessionPhase::Discarded || changes.is_empty() {
        if status.phase == ShellSessionPhase::AwaitingDecision {
            created
                .patch_spec(ctx, serde_json::json!({"discard": true}))
                .await?;
        }
        println!("No changes: image {name} was left as it was.");
        return Ok(0);
    }
    println!(
        "Your changes: {} added, {} modified, {} deleted ({}).",
        changes.added,
        changes.modified,
        changes.deleted,
        bytes(changes.bytes)
    );
    let decision = ask(ctx, name).await?;
    match decision {
        Decision::Discard => {
            created
                .patch_spec(ctx, serde_json::json!({"discard": true}))
                .await?;
            println!("Discarded: image {name} was left as it was.");
            Ok(0)
        }
        Decision::SaveAs(target) => {
            created
                .patch_spec(ctx, serde_json::json!({"saveAs": target}))
                .await?;
            let done = created
                .follow(ctx, &format!("saving as {target}:"), &|s: &ShellSession| {
                    s.status
                        .as_ref()
                        .is_some_and(|st| st.phase == ShellSessionPhase::Saved)
                })
                .await?;
            let result = done.status.and_then(|s| s.result).unwrap_or_default();
            println!(
                "Saved as {}: {}",
                result.image.unwrap_or(target),
                result.digest.as_deref().map_or_else(|| "?".into(), short_digest)
            );
            Ok(0)
        }
    }
}

/// After the attachment ends: either the shell ended (the session leaves Running soon), or the
/// connection was lost while the shell still runs; then the session is given up (the caller
/// deletes it) rather than left behind.
async fn ensure_shell_ended(ctx: &Ctx, created: &Created) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        let session = created.get(ctx).await?;
        if !session::running(&session) {
            return Ok(());
        }
        crate::cluster::tick().await;
    }
    Err(Error::Failed(format!(
        "lost the connection to the shell (session {} is still running): the session was deleted and the changes discarded",
        created.name
    )))
}

/// Runs the dialogue on the real terminal (a blocking thread; Ctrl-C is handled by the caller).
async fn ask(ctx: &Ctx, name: &ImageName) -> Result<Decision> {
    let nodes = list_nodes(ctx).await.unwrap_or_default();
    let images = crate::resolve::list_images(ctx).await.unwrap_or_default();
    let existing: Vec<String> = images
        .iter()
        .map(|i| i.metadata.name.clone().unwrap_or_default())
        .collect();
    let image = name.to_string();
    tokio::task::spawn_blocking(move || {
        let validate = |n: &str| ImageName::parse(n).err().map(|e| e.to_string());
        let mut facts = |n: &str| match ImageName::parse(n) {
            Ok(parsed) => NameFacts {
                exists: existing.contains(&parsed.object_name()),
                booted_by: nodes_booting(&nodes, &parsed),
            },
            Err(_) => NameFacts::default(),
        };
        exit_dialogue(
            &image,
            &mut std::io::stdin().lock(),
            &mut std::io::stdout(),
            &validate,
            &mut facts,
        )
    })
    .await
    .map_err(|e| Error::Failed(format!("the dialogue failed: {e}")))?
    .map_err(Error::io("cannot read your answer"))
}

/// Attaches to the shell pod's TTY until the shell ends.
async fn attach(ctx: &Ctx, pod: &session::ShellPod) -> Result<()> {
    let mut attached = pod.attach_tty(ctx).await?;
    let mut remote_in = attached
        .stdin()
        .ok_or_else(|| Error::Failed("the shell pod gave no stdin".into()))?;
    let mut remote_out = attached
        .stdout()
        .ok_or_else(|| Error::Failed("the shell pod gave no output stream".into()))?;
    let mut resize = attached.terminal_size();
    let send_size = |resize: &mut Option<futures::channel::mpsc::Sender<kube::api::TerminalSize>>| {
        let (width, height) = crate::terminal::size();
        if let Some(tx) = resize.as_mut() {
            let _ = tx.try_send(kube::api::TerminalSize { width, height });
        }
    };
    send_size(&mut resize);

    let mut raw = RawMode::enter()?;
    let (_pump, mut input) = StdinPump::start();
    let mut winch = signal(SignalKind::window_change()).ok();
    let mut term = signal(SignalKind::terminate()).ok();
    let mut hup = signal(SignalKind::hangup()).ok();
    let mut stdout = tokio::io::stdout();
    let mut buf = vec![0u8; 32 * 1024];
    let mut input_open = true;
    let outcome = loop {
        tokio::select! {
            chunk = input.recv(), if input_open => if let Some(bytes) = chunk {
                if remote_in.write_all(&bytes).await.is_err() {
                    break Ok(());
                }
            } else {
                input_open = false;
                let _ = remote_in.shutdown().await;
            },
            Some(()) = async { winch.as_mut()?.recv().await } => send_size(&mut resize),
            Some(()) = async { term.as_mut()?.recv().await } => break Err(Error::Interrupted),
            Some(()) = async { hup.as_mut()?.recv().await } => break Err(Error::Interrupted),
            read = remote_out.read(&mut buf) => match read {
                Ok(0) | Err(_) => break Ok(()),
                Ok(n) => {
                    if stdout.write_all(&buf[..n]).await.is_err() {
                        break Ok(());
                    }
                    let _ = stdout.flush().await;
                }
            },
        }
    };
    raw.restore();
    drop(remote_in);
    attached.abort();
    println!();
    outcome
}
