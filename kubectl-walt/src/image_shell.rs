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
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Status;
use walt_crds::image::MAX_SHELL_LAYERS;

/// `image shell IMAGE`
pub async fn run(ctx: &Ctx, image: &str, mode: ShellModeArg) -> Result<i32> {
    let name = image_name(image)?;
    // The image, a shell already on it and the rights are asked at once (three round trips to the API
    // server in the time of one, before the prompt), then judged in this order.
    // Attaching to the shell pod needs no right here: it runs in the tenant's runtime namespace,
    // where the operator binds the attach role to whoever may use walt in this one.
    let (object_name, image_text) = (name.object_name(), name.to_string());
    let namespace = ctx.namespace.as_str();
    let needs = [
        ("create", "walt.dev", "shellsessions", None, namespace),
        ("patch", "walt.dev", "shellsessions", None, namespace),
    ];
    let (object, busy, allowed) = tokio::join!(
        ctx.get_image(&object_name, &image_text),
        session::sessions_on_image(ctx, &image_text),
        ctx.require(&needs),
    );
    let status = object?.status.unwrap_or_default();
    if let Some(layers) = status.layers.filter(|l| *l >= MAX_SHELL_LAYERS) {
        return Err(Error::Invalid(format!(
            "image {name} has {layers} layers: an image shell needs fewer than {MAX_SHELL_LAYERS}; squash it first (`kubectl walt image squash {name}`)"
        )));
    }
    if let Some(busy) = busy.first() {
        eprintln!(
            "Note: image {name} already has a shell session ({}); only one runs at a time, yours starts when it ends.",
            busy.metadata.name.clone().unwrap_or_default()
        );
    }
    allowed?;

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
    let architecture = status.platform.as_ref().map(|p| p.architecture.clone());
    let outcome = interruptible(Box::pin(shell_and_decide(
        ctx,
        &created,
        &name,
        architecture.as_deref(),
    )))
    .await;
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

async fn shell_and_decide(
    ctx: &Ctx,
    created: &Created,
    name: &ImageName,
    architecture: Option<&str>,
) -> Result<i32> {
    let session = created
        .follow(ctx, &format!("starting a shell in {name}:"), &|s| {
            session::attachable(s)
        })
        .await?;
    let status = session.status.clone().unwrap_or_default();
    let pod = session::shell_pod(ctx, &session)
        .ok_or_else(|| Error::Failed("the shell session runs but names no shell pod".into()))?;
    if let Some(note) = cpu_note(name, architecture, status.emulated) {
        eprintln!("{note}");
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
    attach_until_the_shell_ends(ctx, created, &pod).await?;

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

/// Attaches to the shell pod until the shell ends. When the connection is lost while the shell still
/// runs (an API server restart, a network blip), the shell goes on in its pod with the changes (a TTY
/// pod keeps its stdin open between attachments): the plugin attaches again, for up to
/// [`session::OUTAGE_GRACE`] without a connection; past it the session is given up (the caller deletes
/// it) rather than left behind.
async fn attach_until_the_shell_ends(ctx: &Ctx, created: &Created, pod: &session::RuntimePod) -> Result<()> {
    let mut said_ended = attach_once_started(ctx, created, pod).await? == Attachment::Exited;
    let mut detached_since = std::time::Instant::now();
    let mut running_checks = 0;
    let mut said_lost = false;
    let mut said_restart = None;
    loop {
        let session = created.get(ctx).await.ok();
        if let Some(words) = session
            .as_ref()
            .and_then(|session| restart_to_say(session, &mut said_restart))
        {
            eprintln!("walt: {words}");
        }
        let shell = match &session {
            Some(session) if session::attachable(session) => shell_container(ctx, pod).await,
            _ => ShellContainer::Unknown,
        };
        match after_attachment(
            session.as_ref().map(session::attachable),
            shell,
            running_checks,
            said_ended,
        ) {
            AfterAttachment::ShellEnded => return Ok(()),
            AfterAttachment::CheckAgain => running_checks += 1,
            AfterAttachment::Wait => {
                running_checks = 0;
                if session.is_none() && !said_lost {
                    said_lost = true;
                    eprintln!(
                        "walt: lost the connection to the cluster; your shell goes on in its pod with your changes: waiting to attach again…"
                    );
                }
            }
            AfterAttachment::Reattach => {
                running_checks = 0;
                // A shell that said it ended is followed silently (its pod still pushes, or was made
                // again after an eviction, which the operator's words above say).
                if !said_lost && !said_ended {
                    said_lost = true;
                    eprintln!(
                        "walt: lost the connection to your shell; it goes on in its pod with your changes: attaching again…"
                    );
                }
                let attached = std::time::Instant::now();
                let again = attach_again(ctx, created, pod, &mut said_restart).await;
                said_ended = matches!(again, Ok(Attachment::Exited));
                match again {
                    Err(Error::Interrupted) => return Err(Error::Interrupted),
                    // A connection that held a while counts as one: the next loss gets its own grace.
                    Ok(_) if attached.elapsed() > HELD => {
                        detached_since = std::time::Instant::now();
                        said_lost = false;
                    }
                    Ok(_) | Err(_) => {}
                }
                continue;
            }
        }
        if detached_since.elapsed() > session::OUTAGE_GRACE {
            return Err(Error::Failed(format!(
                "lost the connection to the shell for {} (session {} is still running): the session was deleted and the changes discarded",
                crate::format::clock(detached_since.elapsed()),
                created.name
            )));
        }
        crate::cluster::tick().await;
    }
}

/// The session's last shell pod restart, if any (pure): how many so far, and what to say. The
/// operator's words while it makes the pod again; once the new pod runs (a restart is quick, and can
/// happen between two looks) its condition says that, so the words come from the restart count.
fn pod_restart(session: &walt_crds::ShellSession) -> Option<(u32, String)> {
    let status = session.status.as_ref()?;
    let restarts = status.pod_restarts.filter(|restarts| *restarts > 0)?;
    let ready = walt_crds::find_condition(&status.conditions, walt_crds::condition_types::READY);
    let words = match ready {
        Some(ready) if ready.reason == "ShellPodLost" => ready.message.clone(),
        _ => format!(
            "the shell pod was lost (evicted, deleted or killed): a new shell pod continues on the changes kept on cluster node {} (restart {restarts})",
            status.cluster_node.as_deref().unwrap_or("?")
        ),
    };
    Some((restarts, words))
}

/// How long an attachment must have held to count as a connection (not a failed attempt).
const HELD: std::time::Duration = std::time::Duration::from_secs(5);

/// What the shell pod's container does, as far as the API says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ShellContainer {
    Running,
    Ended,
    Unknown,
}

/// What to do once an attachment to the shell pod ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AfterAttachment {
    /// The shell ended: go on to the changes.
    ShellEnded,
    /// The shell still runs: the connection was lost, attach again.
    Reattach,
    /// The container looks alive: look again once, since its end may not be in the API yet.
    CheckAgain,
    /// The API does not answer, or the operator has not caught up with the shell's end yet.
    Wait,
}

/// Looks that must find the container running before attaching again: after a lost connection, and
/// after an attachment closed as the shell's end (the kubelet reports a container's end up to a
/// second late, and a shell pod still pushes the changes after its shell; an evicted pod's runtime
/// also closes it so, and is made again).
const RUNNING_LOOKS_AFTER_LOSS: u32 = 1;
const RUNNING_LOOKS_AFTER_END: u32 = 4;

/// Decides after an attachment ended (pure): `session_running` is `None` when the API did not answer;
/// `running_checks` counts the looks in a row that found the container running; `said_ended`: the
/// attachment closed as the shell's end ([`Attachment::Exited`]).
fn after_attachment(
    session_running: Option<bool>,
    shell: ShellContainer,
    running_checks: u32,
    said_ended: bool,
) -> AfterAttachment {
    let looks = if said_ended {
        RUNNING_LOOKS_AFTER_END
    } else {
        RUNNING_LOOKS_AFTER_LOSS
    };
    match (session_running, shell) {
        (Some(false), _) => AfterAttachment::ShellEnded,
        // A shell that just exited may show as running until the kubelet reports it: more looks.
        (Some(true), ShellContainer::Running) if running_checks >= looks => AfterAttachment::Reattach,
        (Some(true), ShellContainer::Running) => AfterAttachment::CheckAgain,
        // No answer, or a container that ended before the operator moved the session on.
        (None, _) | (Some(true), ShellContainer::Ended | ShellContainer::Unknown) => AfterAttachment::Wait,
    }
}

/// The shell pod's container state, from the API.
async fn shell_container(ctx: &Ctx, pod: &session::RuntimePod) -> ShellContainer {
    let Some(found) = pod.get(ctx).await else {
        return ShellContainer::Unknown;
    };
    let state = found
        .status
        .and_then(|status| status.container_statuses)
        .and_then(|statuses| statuses.into_iter().next())
        .and_then(|status| status.state);
    match state {
        Some(state) if state.running.is_some() => ShellContainer::Running,
        Some(state) if state.terminated.is_some() => ShellContainer::Ended,
        _ => ShellContainer::Unknown,
    }
}

/// Attaches again after a lost connection, saying so in the terminal once attached. The pod may be
/// one the operator makes again meanwhile: the API server accepts an attachment before it reaches
/// the kubelet, so one asked for while the old pod goes can land in the new pod's shell as it
/// starts. The session is followed while attached, and such a restart said when it shows.
async fn attach_again(
    ctx: &Ctx,
    created: &Created,
    pod: &session::RuntimePod,
    said_restart: &mut Option<u32>,
) -> Result<Attachment> {
    let attached = pod.attach_tty(ctx).await?;
    if let Some(words) = new_restart(ctx, created, said_restart).await {
        eprintln!("walt: {words}");
    }
    eprintln!("walt: attached again to your shell (press Enter for a prompt)");
    let mut terminal = Terminal::enter()?;
    let outcome = tokio::select! {
        outcome = pump(attached, &mut terminal) => outcome,
        never = say_restarts_while_attached(ctx, created, said_restart) => match never {},
    };
    terminal.leave();
    outcome
}

/// How often an attached shell's session is looked at when its watch brings nothing.
const RESTART_LOOK: std::time::Duration = std::time::Duration::from_secs(5);

/// Says each restart of the shell pod while the terminal is attached (raw: a line of its own);
/// runs until dropped.
async fn say_restarts_while_attached(
    ctx: &Ctx,
    created: &Created,
    said_restart: &mut Option<u32>,
) -> std::convert::Infallible {
    let mut changes = crate::cluster::changes_of(ctx.sessions(), &created.name);
    loop {
        crate::cluster::next_change_within(&mut changes, RESTART_LOOK).await;
        if let Some(words) = new_restart(ctx, created, said_restart).await {
            eprint!("\r\nwalt: {words}\r\n");
        }
    }
}

/// Reads the session: the words of a shell pod restart not said yet (see [`restart_to_say`]).
async fn new_restart(ctx: &Ctx, created: &Created, said_restart: &mut Option<u32>) -> Option<String> {
    let session = created.get(ctx).await.ok()?;
    restart_to_say(&session, said_restart)
}

/// What to say of the session's shell pod restarts (pure): the words of a restart not said yet
/// (what ran in the old shell is gone, the files are not), recorded in `said`.
fn restart_to_say(session: &walt_crds::ShellSession, said: &mut Option<u32>) -> Option<String> {
    let (restart, words) = pod_restart(session)?;
    if *said == Some(restart) {
        return None;
    }
    *said = Some(restart);
    Some(words)
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

/// How often the first attachment is tried while the shell pod's container starts.
const ATTACH_RETRY: std::time::Duration = std::time::Duration::from_millis(50);
/// How many failed attachments pass between two looks at the session (is it still starting?).
const ATTACHES_PER_LOOK: u32 = 10;
/// How many looks at a session that says its pod runs, the attachment still refused, before giving up
/// (2 s: a kubelet that answers late, not a container that never will).
const LOOKS_ONCE_RUNNING: u32 = 4;

/// The first attachment to the shell pod, tried from the moment it is scheduled: the container takes
/// it as soon as it runs, where `kubectl run -it` waits for the kubelet to report the pod running (up
/// to a second later). Until then the attachment is refused (no such container yet: the API server
/// says so at once, or accepts it and ends it with that error), so it is tried again every
/// [`ATTACH_RETRY`], looking at the session now and then: a session that ended (its pod failed) says
/// why, a refusal of the user's rights stops at once. The terminal stays raw and its input read
/// throughout, so what the user types meanwhile waits for the shell (but for what reaches a refused
/// attachment in the milliseconds it lives).
async fn attach_once_started(ctx: &Ctx, created: &Created, pod: &session::RuntimePod) -> Result<Attachment> {
    let mut terminal = Terminal::enter()?;
    let outcome = attach_in(ctx, created, pod, &mut terminal).await;
    terminal.leave();
    outcome
}

/// [`attach_once_started`] on a terminal already set up.
async fn attach_in(
    ctx: &Ctx,
    created: &Created,
    pod: &session::RuntimePod,
    terminal: &mut Terminal,
) -> Result<Attachment> {
    let mut failures = 0u32;
    let mut looks_while_running = 0u32;
    loop {
        let error = match pod.attach_tty(ctx).await {
            Ok(attached) => match pump(attached, terminal).await? {
                Attachment::Refused(why) => Error::Failed(format!(
                    "the shell pod {} refused the attachment: {why}",
                    pod.name
                )),
                used => return Ok(used),
            },
            Err(error) => error,
        };
        failures += 1;
        if failures.is_multiple_of(ATTACHES_PER_LOOK) {
            let session = created.get(ctx).await?;
            match attach_retry(&error, &session, looks_while_running) {
                AttachRetry::Again { running } => looks_while_running += u32::from(running),
                AttachRetry::GiveUp => return Err(error),
                AttachRetry::Ended => {
                    return Err(Error::Failed(format!(
                        "the shell session {} ended before its shell ran: {}",
                        created.name,
                        session::failure_reason(&session)
                    )));
                }
            }
        } else if !attach_may_succeed_later(&error) {
            return Err(error);
        }
        tokio::time::sleep(ATTACH_RETRY).await;
    }
}

/// Whether a refused attachment may succeed once the container runs (pure): not when the user may
/// not attach or the cluster cannot be reached at all.
fn attach_may_succeed_later(error: &Error) -> bool {
    !matches!(error, Error::Forbidden { .. } | Error::Kubeconfig(_))
}

/// What follows a refused first attachment, given the session as it is now.
#[derive(Debug, PartialEq, Eq)]
enum AttachRetry {
    /// Try again (`running`: the session says its pod runs, which counts toward giving up).
    Again { running: bool },
    /// The session ended: say why.
    Ended,
    /// The refusal is for good: say it.
    GiveUp,
}

/// Decides after a refused first attachment (pure): again while the pod starts; a bounded number of
/// times once the session says it runs (a kubelet that answers late); never past a refusal for
/// good or an ended session.
fn attach_retry(error: &Error, session: &walt_crds::ShellSession, looks_while_running: u32) -> AttachRetry {
    let status = session.status.clone().unwrap_or_default();
    if status.phase.is_finished() {
        return AttachRetry::Ended;
    }
    if !attach_may_succeed_later(error) {
        return AttachRetry::GiveUp;
    }
    let running = session::running(session);
    if running && looks_while_running >= LOOKS_ONCE_RUNNING {
        return AttachRetry::GiveUp;
    }
    AttachRetry::Again { running }
}

/// The user's terminal while attached: raw, its input read on a thread of its own.
struct Terminal {
    raw: RawMode,
    _pump: StdinPump,
    input: tokio::sync::mpsc::Receiver<Vec<u8>>,
    input_open: bool,
}

impl Terminal {
    fn enter() -> Result<Terminal> {
        let raw = RawMode::enter()?;
        let (pump, input) = StdinPump::start();
        Ok(Terminal {
            raw,
            _pump: pump,
            input,
            input_open: true,
        })
    }

    /// Back to the terminal as it was, on a new line.
    fn leave(mut self) {
        self.raw.restore();
        println!();
    }
}

/// How an attachment ended.
#[derive(Debug, PartialEq, Eq)]
enum Attachment {
    /// The shell's terminal closed: the shell ended (with any status).
    Exited,
    /// The connection ended without saying the shell did (a lost connection, an API server restart).
    Lost,
    /// The attachment was accepted and then refused before anything came from the shell (the
    /// container does not run yet): why.
    Refused(String),
}

/// How an attachment ended, from the status that closed it (pure): a success, or the shell's own
/// non-zero exit, is the shell's end; a failure before the shell sent anything is a refusal (the
/// API server accepts the attachment, then says it found no running container); anything else, or
/// no status, a lost connection.
fn attachment_end(status: Option<&Status>, output_seen: bool) -> Attachment {
    let Some(status) = status else {
        return Attachment::Lost;
    };
    let shell_exit = status.reason.as_deref() == Some("NonZeroExitCode");
    match status.status.as_deref() {
        Some("Success") => Attachment::Exited,
        Some("Failure") if shell_exit => Attachment::Exited,
        Some("Failure") if !output_seen => Attachment::Refused(status.message.clone().unwrap_or_default()),
        _ => Attachment::Lost,
    }
}

/// Connects the terminal to an attachment until the shell ends or the connection is lost.
async fn pump(mut attached: kube::api::AttachedProcess, terminal: &mut Terminal) -> Result<Attachment> {
    let mut remote_in = attached
        .stdin()
        .ok_or_else(|| Error::Failed("the shell pod gave no stdin".into()))?;
    let mut remote_out = attached
        .stdout()
        .ok_or_else(|| Error::Failed("the shell pod gave no output stream".into()))?;
    // Ends when the connection does: kube's message loop stops on a lost connection without ending the
    // output stream (only its status sender goes), so the output alone would wait forever.
    let mut connection_ended = std::pin::pin!(
        attached
            .take_status()
            .ok_or_else(|| Error::Failed("the shell pod's attachment gave no status".into()))?
    );
    let mut resize = attached.terminal_size();
    let send_size = |resize: &mut Option<futures::channel::mpsc::Sender<kube::api::TerminalSize>>| {
        let (width, height) = crate::terminal::size();
        if let Some(tx) = resize.as_mut() {
            let _ = tx.try_send(kube::api::TerminalSize { width, height });
        }
    };
    send_size(&mut resize);

    let mut winch = signal(SignalKind::window_change()).ok();
    let mut term = signal(SignalKind::terminate()).ok();
    let mut hup = signal(SignalKind::hangup()).ok();
    let mut stdout = tokio::io::stdout();
    let mut buf = vec![0u8; 32 * 1024];
    let mut output_seen = false;
    let outcome = loop {
        tokio::select! {
            chunk = terminal.input.recv(), if terminal.input_open => if let Some(bytes) = chunk {
                if remote_in.write_all(&bytes).await.is_err() {
                    break Ok(Attachment::Lost);
                }
            } else {
                terminal.input_open = false;
                let _ = remote_in.shutdown().await;
            },
            Some(()) = async { winch.as_mut()?.recv().await } => send_size(&mut resize),
            Some(()) = async { term.as_mut()?.recv().await } => break Err(Error::Interrupted),
            Some(()) = async { hup.as_mut()?.recv().await } => break Err(Error::Interrupted),
            status = &mut connection_ended => {
                let end = attachment_end(status.as_ref(), output_seen);
                if !matches!(end, Attachment::Refused(_)) {
                    // What the shell printed last may still be in the stream (a shell that exited).
                    drain_output(&mut remote_out, &mut stdout).await;
                }
                break Ok(end);
            }
            read = remote_out.read(&mut buf) => match read {
                // The output ended: the status, which follows, says how.
                Ok(0) | Err(_) => {
                    let status = tokio::time::timeout(STATUS_AFTER_OUTPUT, &mut connection_ended).await;
                    break Ok(attachment_end(status.ok().flatten().as_ref(), output_seen));
                }
                Ok(n) => {
                    output_seen = true;
                    if stdout.write_all(&buf[..n]).await.is_err() {
                        break Ok(Attachment::Lost);
                    }
                    let _ = stdout.flush().await;
                }
            },
        }
    };
    drop(remote_in);
    attached.abort();
    outcome
}

/// How long the status of an attachment whose output ended is waited for (it follows at once).
const STATUS_AFTER_OUTPUT: std::time::Duration = std::time::Duration::from_millis(300);

/// Copies what is left in `remote_out` to `stdout`, for a moment at most (the connection has ended).
async fn drain_output(
    remote_out: &mut (impl tokio::io::AsyncRead + Unpin),
    stdout: &mut (impl tokio::io::AsyncWrite + Unpin),
) {
    let mut buf = vec![0u8; 32 * 1024];
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(300);
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, remote_out.read(&mut buf)).await {
        if n == 0 || stdout.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = stdout.flush().await;
}

/// What the user is told before the prompt about the CPU the shell runs on (pure): natively on a
/// cluster node of the image's CPU (which walt's shell pods prefer), or through qemu-user where no
/// such node could take it; nothing when the operator could not tell.
fn cpu_note(name: &ImageName, architecture: Option<&str>, emulated: Option<bool>) -> Option<String> {
    let architecture = architecture.filter(|a| !a.is_empty());
    match (emulated?, architecture) {
        (false, Some(architecture)) => Some(format!(
            "Note: {name} runs natively on a cluster node of its CPU ({architecture}), no emulation."
        )),
        (false, None) => Some(format!(
            "Note: {name} runs natively on its cluster node, no emulation."
        )),
        (true, Some(architecture)) => Some(format!(
            "Note: {name} is built for another CPU: it runs through qemu-user emulation (slower than native; no {architecture} cluster node could take it)."
        )),
        (true, None) => Some(format!(
            "Note: {name} is built for another CPU: it runs through qemu-user emulation (slower than native)."
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_user_is_told_whether_the_shell_runs_natively_or_emulated() {
        let name = image_name("demo-arm64").expect("an image name");
        assert_eq!(
            cpu_note(&name, Some("arm64"), Some(false)).as_deref(),
            Some("Note: demo-arm64 runs natively on a cluster node of its CPU (arm64), no emulation.")
        );
        let emulated = cpu_note(&name, Some("arm64"), Some(true)).expect("a note");
        assert!(
            emulated.starts_with(
                "Note: demo-arm64 is built for another CPU: it runs through qemu-user emulation (slower than native; no arm64 cluster node"
            ),
            "{emulated}"
        );
        assert_eq!(
            cpu_note(&name, Some("arm64"), None),
            None,
            "no claim when unknown"
        );
    }

    #[test]
    fn a_shell_that_ended_goes_on_to_the_changes_whatever_the_pod_says() {
        for shell in [
            ShellContainer::Running,
            ShellContainer::Ended,
            ShellContainer::Unknown,
        ] {
            assert_eq!(
                after_attachment(Some(false), shell, 0, false),
                AfterAttachment::ShellEnded
            );
        }
    }

    #[test]
    fn a_shell_pod_made_again_is_said_with_the_operators_words() {
        let mut session = walt_crds::ShellSession::new("s1", walt_crds::ShellSessionSpec::default());
        assert_eq!(pod_restart(&session), None);
        session.status = Some(walt_crds::ShellSessionStatus {
            phase: walt_crds::ShellSessionPhase::Running,
            pod_restarts: Some(1),
            conditions: vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
                type_: "Ready".into(),
                status: "False".into(),
                reason: "ShellPodLost".into(),
                message: "the shell pod was evicted: a new shell pod continues".into(),
                last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
                ),
                observed_generation: None,
            }],
            ..walt_crds::ShellSessionStatus::default()
        });
        assert_eq!(
            pod_restart(&session),
            Some((1, "the shell pod was evicted: a new shell pod continues".into()))
        );
        // Looked at only once the new pod runs: said from the count.
        let status = session.status.as_mut().expect("status");
        status.conditions[0].reason = "ShellRunning".into();
        status.conditions[0].message = "on the changes kept from the lost pod, the shell runs".into();
        status.cluster_node = Some("worker-1".into());
        let (restarts, words) = pod_restart(&session).expect("a restart");
        assert_eq!(restarts, 1);
        assert!(
            words.contains("a new shell pod continues on the changes kept on cluster node worker-1"),
            "{words}"
        );
        // Said once per restart, wherever it is seen first.
        let mut said = None;
        assert!(restart_to_say(&session, &mut said).is_some());
        assert_eq!(restart_to_say(&session, &mut said), None);
        session.status.as_mut().expect("status").pod_restarts = Some(2);
        assert!(restart_to_say(&session, &mut said).is_some());
    }

    #[test]
    fn a_shell_still_running_is_attached_again_after_a_second_look() {
        assert_eq!(
            after_attachment(Some(true), ShellContainer::Running, 0, false),
            AfterAttachment::CheckAgain,
            "its end may not be reported yet"
        );
        assert_eq!(
            after_attachment(Some(true), ShellContainer::Running, 1, false),
            AfterAttachment::Reattach
        );
    }

    #[test]
    fn an_api_that_does_not_answer_or_an_ended_container_is_waited_for() {
        assert_eq!(
            after_attachment(None, ShellContainer::Unknown, 3, false),
            AfterAttachment::Wait
        );
        assert_eq!(
            after_attachment(Some(true), ShellContainer::Ended, 1, false),
            AfterAttachment::Wait,
            "the operator has not caught up with the shell's end yet"
        );
    }

    fn session_in(phase: walt_crds::ShellSessionPhase) -> walt_crds::ShellSession {
        let mut session = walt_crds::ShellSession::new("s1", walt_crds::ShellSessionSpec::default());
        session.status = Some(walt_crds::ShellSessionStatus {
            phase,
            pod: Some("walt-shell-s1".into()),
            ..walt_crds::ShellSessionStatus::default()
        });
        session
    }

    #[test]
    fn a_shell_pod_is_attached_to_once_scheduled_not_once_reported_running() {
        use walt_crds::ShellSessionPhase::{Pending, Running, Starting};
        let mut starting = session_in(Starting);
        assert!(!session::attachable(&starting), "not scheduled yet");
        if let Some(status) = starting.status.as_mut() {
            status.cluster_node = Some("worker-1".into());
        }
        assert!(session::attachable(&starting));
        assert!(session::attachable(&session_in(Running)));
        assert!(!session::attachable(&session_in(Pending)));
    }

    #[test]
    fn a_refused_first_attachment_is_tried_again_while_the_pod_starts_and_not_forever() {
        use walt_crds::ShellSessionPhase::{Failed, Running, Starting};
        let not_yet = Error::Failed("container not found (\"shell\")".into());
        assert_eq!(
            attach_retry(&not_yet, &session_in(Starting), 0),
            AttachRetry::Again { running: false }
        );
        assert_eq!(
            attach_retry(&not_yet, &session_in(Running), LOOKS_ONCE_RUNNING - 1),
            AttachRetry::Again { running: true },
            "a kubelet that answers late"
        );
        assert_eq!(
            attach_retry(&not_yet, &session_in(Running), LOOKS_ONCE_RUNNING),
            AttachRetry::GiveUp
        );
        assert_eq!(attach_retry(&not_yet, &session_in(Failed), 0), AttachRetry::Ended);
        let forbidden = Error::Forbidden {
            verb: "create".into(),
            resource: "pods/attach".into(),
            namespace: "walt-run-lab".into(),
            message: "no".into(),
        };
        assert!(!attach_may_succeed_later(&forbidden));
        assert_eq!(
            attach_retry(&forbidden, &session_in(Starting), 0),
            AttachRetry::GiveUp
        );
    }

    fn status(outcome: &str, reason: Option<&str>, message: &str) -> Status {
        Status {
            status: Some(outcome.into()),
            reason: reason.map(str::to_owned),
            message: Some(message.into()),
            ..Status::default()
        }
    }

    #[test]
    fn an_attachment_refused_before_the_container_runs_is_told_from_a_shell_that_ended() {
        let not_running = status(
            "Failure",
            Some("InternalError"),
            "unable to upgrade connection: container shell not found in pod p_ns",
        );
        assert_eq!(
            attachment_end(Some(&not_running), false),
            Attachment::Refused("unable to upgrade connection: container shell not found in pod p_ns".into())
        );
        assert_eq!(
            attachment_end(Some(&not_running), true),
            Attachment::Lost,
            "the shell had answered: a failure now is a lost connection, not a refusal"
        );
        assert_eq!(
            attachment_end(Some(&status("Success", None, "")), true),
            Attachment::Exited
        );
        assert_eq!(
            attachment_end(Some(&status("Failure", Some("NonZeroExitCode"), "exit 1")), true),
            Attachment::Exited,
            "the shell's own non-zero exit is its end"
        );
        assert_eq!(attachment_end(None, true), Attachment::Lost);
        assert_eq!(attachment_end(None, false), Attachment::Lost);
    }
}
