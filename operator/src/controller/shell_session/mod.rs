//! ShellSession reconcile (leader only), through a finalizer so the shell
//! pod is gone whatever happens, deletion included. The gateway side of node
//! shells (authorizing the key) is in [`crate::controller::gateway`], run by every
//! replica from the phase written here.
//!
//! - Image shells: dereference the Image (tenant's, else the catalog's) →
//!   validate (resolved, fewer than 128 layers) → wait for the image (one
//!   shell, copy or save at a time, [`crate::controller::shared::lock`]) → the pure state
//!   machine [`next_step`] → apply (pod, status, Events).
//! - Node shells: dereference the Node → validate (`publicKey`, an address)
//!   → `Running` with `status.gateway` until `ttl` (then `Expired`).

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Api, ResourceExt};
use walt_crds::{
    ConditionStatus, ImageName, ShellResult, ShellSession, ShellSessionPhase, ShellSessionStatus,
    condition_types, runtime_namespace, short_digest,
};

pub mod build;
pub mod node_shell;
pub mod reasons;

use self::build::{
    MAX_POD_RESTARTS, ShellAtStart, ShellOutcome, ShellPodInputs, Step, build_shell_pod, next_step,
    recover_lost_pod, scratch_tag, shell_at_start, shell_pod_name, wait_for_save_target,
};
use crate::controller::config::LayerCache;
use crate::controller::shared::context::Context;
use crate::controller::shared::error::{Error, KubeResultExt, Result};
use crate::controller::shared::image_result;
use crate::controller::shared::lock::{Claim, holder_other_than};
use crate::controller::shared::lookup::find_image;
use crate::controller::shared::pods::{on_cluster_node, scheduled_on};
use crate::controller::shared::registry::{ensure_registry_secret, pinned_reference_of, repository_of};
use crate::controller::shared::registry_paths::{Access, REGISTRY_PATH_FORBIDDEN};
use crate::controller::shared::runtime::{delete, ensure_runtime_namespace, owned_by};
use crate::controller::shared::session::{Bounded, session_duration};
use walt_crds::image::MAX_SHELL_LAYERS;

/// Finalizer of ShellSessions: the shell pod is deleted before the session goes.
pub const FINALIZER: &str = "walt.dev/shell-session-cleanup";
/// How often a waiting session looks again (its holder ending does not wake it).
const WAIT_RETRY: Duration = Duration::from_secs(5);

/// Annotation of an Image saved by a ShellSession: the session's uid.
pub const SAVED_BY_ANNOTATION: &str = "walt.dev/saved-by-shell-session";

/// Condition type: the session is usable (the shell runs, or the gateway admits the key).
pub const READY: &str = condition_types::READY;

/// Reconciles one ShellSession.
pub async fn reconcile(session: Arc<ShellSession>, context: Arc<Context>) -> Result<Action> {
    let namespace = session.namespace().unwrap_or_default();
    let api: Api<ShellSession> = Api::namespaced(context.client.clone(), &namespace);
    finalizer(&api, FINALIZER, session, |event| async {
        match event {
            Finalizer::Apply(session) => apply(&session, &context).await,
            Finalizer::Cleanup(session) => cleanup(&session, &context).await,
        }
    })
    .await
    .map_err(Error::from)
}

/// The session is being deleted: its pod goes first (the gateway's watch
/// revokes a node shell as soon as the deletion starts).
async fn cleanup(session: &ShellSession, context: &Context) -> Result<Action> {
    if session.spec.image.is_some() {
        delete_pod(context, session).await?;
    }
    Ok(Action::await_change())
}

async fn apply(session: &ShellSession, context: &Context) -> Result<Action> {
    let status = session.status.clone().unwrap_or_default();
    if status.phase.is_finished() {
        if session.spec.image.is_some() {
            delete_pod(context, session).await?;
        }
        return Ok(Action::await_change());
    }
    let limits = context.config.session_limits();
    let ttl = match session_duration(&session.spec.ttl) {
        Ok(ttl) => Bounded::new(ttl, limits.max_ttl),
        Err(error) => {
            return end(
                context,
                session,
                status,
                ShellSessionPhase::Failed,
                reasons::INVALID_TTL,
                format!("spec.ttl: {error}"),
            )
            .await;
        }
    };
    if session.spec.node.is_some() {
        let lifetime = node_shell::Lifetime {
            ttl,
            max_idle_timeout: limits.max_idle_timeout,
        };
        node_shell::reconcile(session, context, status, lifetime).await
    } else {
        image_shell(session, context, status, ttl.value).await
    }
}

/// Sets a condition, stamped with the session's generation and now.
fn condition(
    status: &mut ShellSessionStatus,
    session: &ShellSession,
    type_: &str,
    state: ConditionStatus,
    reason: &str,
    message: impl Into<String>,
) {
    crate::controller::shared::context::set_condition_now(
        &mut status.conditions,
        session,
        type_,
        state,
        reason,
        message,
    );
}

/// Moves a status to a finished phase (pure): `Complete=True` with the
/// reason, `Ready=False`, the completion time `now`.
pub fn finish(
    status: &mut ShellSessionStatus,
    session: &ShellSession,
    phase: ShellSessionPhase,
    reason: &str,
    message: &str,
    now: Timestamp,
) {
    status.phase = phase;
    if status.completion_time.is_none() || phase != ShellSessionPhase::Expired {
        status.completion_time = Some(Time(now));
    }
    condition(status, session, READY, ConditionStatus::False, reason, message);
    condition(
        status,
        session,
        condition_types::COMPLETE,
        ConditionStatus::True,
        reason,
        message,
    );
}

async fn write_status(context: &Context, session: &ShellSession, status: ShellSessionStatus) -> Result<()> {
    let Some(status) = status_to_apply(session, status) else {
        return Ok(());
    };
    let api: Api<ShellSession> =
        Api::namespaced(context.client.clone(), &session.namespace().unwrap_or_default());
    context.apply_status_of(&api, session, &status).await?;
    Ok(())
}

/// The status the controller applies, or `None` when nothing changed (pure): stamped with the
/// generation, without `lastActivity`, which the gateway owns (its own field manager), so a
/// controller write never moves it back to what it read.
pub fn status_to_apply(session: &ShellSession, mut status: ShellSessionStatus) -> Option<ShellSessionStatus> {
    status.observed_generation = session.metadata.generation;
    status.last_activity = None;
    let mut current = session.status.clone();
    if let Some(current) = current.as_mut() {
        current.last_activity = None;
    }
    (current.as_ref() != Some(&status)).then_some(status)
}

/// Ends a session: status, then an Event.
async fn end(
    context: &Context,
    session: &ShellSession,
    mut status: ShellSessionStatus,
    phase: ShellSessionPhase,
    reason: &str,
    message: String,
) -> Result<Action> {
    finish(&mut status, session, phase, reason, &message, context.clock.now());
    write_status(context, session, status).await?;
    let kind = if phase == ShellSessionPhase::Failed {
        EventType::Warning
    } else {
        EventType::Normal
    };
    context.event(session, kind, reason, "End", message).await;
    Ok(Action::await_change())
}

// --------------------------------------------------------------- image shells

/// The last lines the shell pod wrote (its runtime's errors), before it is
/// deleted; None when there are none or they cannot be read.
async fn pod_log_tail(context: &Context, session: &ShellSession) -> Option<String> {
    let pods: Api<Pod> = Api::namespaced(context.client.clone(), &pod_namespace(session));
    let params = kube::api::LogParams {
        tail_lines: Some(5),
        limit_bytes: Some(2048),
        ..kube::api::LogParams::default()
    };
    let log = pods
        .logs(&shell_pod_name(&session.name_any()), &params)
        .await
        .ok()?;
    let lines: Vec<&str> = log
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect();
    (!lines.is_empty()).then(|| lines.join(" | "))
}

/// The namespace of a session's shell pod: its tenant's runtime namespace (pure).
fn pod_namespace(session: &ShellSession) -> String {
    runtime_namespace(&session.namespace().unwrap_or_default())
}

/// Deletes the session's shell pod (in its runtime namespace; a pod of that name left by a former
/// session of the same name is no one's, and goes too).
async fn delete_pod(context: &Context, session: &ShellSession) -> Result<()> {
    delete::<Pod>(
        context,
        &pod_namespace(session),
        &shell_pod_name(&session.name_any()),
    )
    .await
}

// Long by design: a dispatcher, one short arm per [`Step`] of the pure `next_step`; the decision
// itself lives there.
async fn image_shell(
    session: &ShellSession,
    context: &Context,
    mut status: ShellSessionStatus,
    ttl: Duration,
) -> Result<Action> {
    let namespace = session.namespace().unwrap_or_default();
    let name = session.name_any();
    let image_name = session.spec.image.clone().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(context.client.clone(), &pod_namespace(session));
    let pod = pods
        .get_opt(&shell_pod_name(&name))
        .await
        .context(|| format!("reading the shell pod of {name}"))?;
    // Only the pod made for this very session (owner labels, by uid) is read or attached to; one
    // left by a former session of the same name goes first.
    if pod
        .as_ref()
        .is_some_and(|pod| !owned_by(&pod.metadata, "ShellSession", session))
    {
        delete_pod(context, session).await?;
        return Ok(Action::requeue(Duration::from_secs(2)));
    }
    let claims = crate::controller::shared::lock::claims_in(context, &namespace).await?;
    let object = ImageName::parse(&image_name)
        .map(|n| n.object_name())
        .unwrap_or_default();
    let holder = holder_other_than(&claims, &object, "ShellSession", &name).map(Claim::label);
    let save_as_object = session
        .spec
        .save_as
        .as_deref()
        .and_then(|save_as| ImageName::parse(save_as).ok())
        .map(|save_as| save_as.object_name());
    let save_as_holder = save_as_object
        .as_deref()
        .and_then(|object| holder_other_than(&claims, object, "ShellSession", &name))
        .map(Claim::label);
    let changes_outlive_pods = matches!(context.config.args.shell_cache, LayerCache::HostPath(_));
    let step = recover_lost_pod(
        wait_for_save_target(
            next_step(
                session,
                pod.as_ref(),
                holder.as_deref(),
                ttl,
                context.config.args.decision_timeout,
                context.clock.now(),
            ),
            save_as_holder.as_deref(),
        ),
        &status,
        changes_outlive_pods,
    );
    tracing::debug!(?step, "image shell step");
    match step {
        Step::Wait { recheck } => Ok(recheck.map_or_else(Action::await_change, |after| {
            Action::requeue(after + Duration::from_secs(1))
        })),
        Step::WaitForImage { holder } => {
            status.phase = ShellSessionPhase::Pending;
            let message = format!(
                "{holder} works on image {image_name} (one shell, copy or save at a time per image): this shell starts when it ends"
            );
            condition(
                &mut status,
                session,
                READY,
                ConditionStatus::False,
                reasons::WAITING_FOR_IMAGE,
                message,
            );
            write_status(context, session, status).await?;
            Ok(Action::requeue(WAIT_RETRY))
        }
        Step::WaitForSaveTarget { image, holder } => {
            let message = format!(
                "{holder} works on image {image} (one shell, copy or save at a time per image): the changes are saved as {image} when it ends"
            );
            condition(
                &mut status,
                session,
                READY,
                ConditionStatus::False,
                reasons::WAITING_FOR_IMAGE,
                message,
            );
            write_status(context, session, status).await?;
            Ok(Action::requeue(WAIT_RETRY))
        }
        Step::CreatePod => create_pod(session, context, status, &image_name, None).await,
        // The lost pod's object is still there (evicted, or ended keeping the changes): it goes
        // first, the new one takes its name.
        Step::RestartPod { .. }
            if pod
                .as_ref()
                .is_some_and(|pod| pod.metadata.deletion_timestamp.is_some()) =>
        {
            Ok(Action::requeue(Duration::from_secs(2)))
        }
        Step::RestartPod { why, .. } if pod.is_some() => lost_pod_goes(context, session, status, &why).await,
        Step::RestartPod { cluster_node, why } => {
            let restart = Restart {
                cluster_node: &cluster_node,
                why: &why,
            };
            // The status first, on the version the loss was seen on: a decision made on a copy a
            // watch lagged behind (the shell had ended and been recorded) is refused there, before
            // any pod is made.
            let status = restarting_status(context, session, status, &restart).await?;
            create_pod(session, context, status, &image_name, Some(restart)).await
        }
        Step::MarkScheduled => mark_scheduled(session, context, status, pod.as_ref()).await,
        Step::MarkRunning => mark_running(session, context, status, pod.as_ref()).await,
        Step::Record(outcome) => record(session, context, status, &outcome).await,
        Step::NothingChanged(outcome) => {
            apply_outcome(&mut status, &outcome);
            let message = format!(
                "the shell ended (exit code {}) without changing image {image_name}",
                outcome.exit_code
            );
            end_with_pod(
                context,
                session,
                status,
                ShellSessionPhase::Discarded,
                reasons::NO_CHANGES,
                message,
            )
            .await
        }
        Step::Fail(message) | Step::Lost(message) => {
            let message = match pod_log_tail(context, session).await {
                Some(tail) => format!("{message}; its last words: {tail}"),
                None => message,
            };
            end_with_pod(
                context,
                session,
                status,
                ShellSessionPhase::Failed,
                reasons::SHELL_FAILED,
                message,
            )
            .await
        }
        Step::Save(target) => save(session, context, status, &target).await,
        Step::Discard => {
            let message = format!("the changes were discarded; image {image_name} was left as it was");
            end_with_pod(
                context,
                session,
                status,
                ShellSessionPhase::Discarded,
                reasons::DISCARDED,
                message,
            )
            .await
        }
        Step::Expire(message) => {
            end_with_pod(
                context,
                session,
                status,
                ShellSessionPhase::Expired,
                reasons::EXPIRED,
                message,
            )
            .await
        }
        Step::Cleanup => {
            delete_pod(context, session).await?;
            Ok(Action::await_change())
        }
    }
}

/// Ends a session whose pod is done: the pod goes first, then the status and the Event.
async fn end_with_pod(
    context: &Context,
    session: &ShellSession,
    status: ShellSessionStatus,
    phase: ShellSessionPhase,
    reason: &str,
    message: String,
) -> Result<Action> {
    delete_pod(context, session).await?;
    end(context, session, status, phase, reason, message).await
}

/// Where the shell pod was scheduled, the mode the user gets and whether it is emulated, into the
/// status; the cluster node, when it can be read.
async fn record_start(
    session: &ShellSession,
    context: &Context,
    status: &mut ShellSessionStatus,
    pod: Option<&Pod>,
) -> Result<(ShellAtStart, Option<k8s_openapi::api::core::v1::Node>)> {
    let namespace = session.namespace().unwrap_or_default();
    let image_name = session.spec.image.clone().unwrap_or_default();
    let image_status = find_image(context, &namespace, &image_name)
        .await?
        .and_then(|(image, _)| image.status);
    let cluster_node = scheduled_on(context, pod).await;
    let start = shell_at_start(&session.spec.mode, image_status.as_ref(), cluster_node.as_ref());
    status.emulated = start.emulated;
    status.mode = start.mode;
    status.cluster_node = pod
        .and_then(|pod| pod.spec.as_ref())
        .and_then(|spec| spec.node_name.clone());
    Ok((start, cluster_node))
}

/// The shell pod is scheduled and starting: where, and how, so the plugin can say it and attach as
/// soon as the container runs (the phase stays `Starting` until the kubelet reports it running).
async fn mark_scheduled(
    session: &ShellSession,
    context: &Context,
    mut status: ShellSessionStatus,
    pod: Option<&Pod>,
) -> Result<Action> {
    let (start, cluster_node) = record_start(session, context, &mut status, pod).await?;
    let message = format!(
        "shell pod {} of {} scheduled{}{}: starting",
        shell_pod_name(&session.name_any()),
        pod_namespace(session),
        on_cluster_node(cluster_node.as_ref()),
        emulation_note(start.emulated),
    );
    condition(
        &mut status,
        session,
        READY,
        ConditionStatus::False,
        reasons::POD_STARTING,
        message,
    );
    write_status(context, session, status).await?;
    Ok(Action::requeue(Duration::from_secs(30)))
}

/// The shell pod runs: `Running`, with the mode the user got and whether it is emulated.
async fn mark_running(
    session: &ShellSession,
    context: &Context,
    mut status: ShellSessionStatus,
    pod: Option<&Pod>,
) -> Result<Action> {
    let (start, cluster_node) = record_start(session, context, &mut status, pod).await?;
    let again = status.phase == ShellSessionPhase::Running;
    status.phase = ShellSessionPhase::Running;
    status.start_time.get_or_insert_with(|| Time(context.clock.now()));
    let message = running_message(
        &shell_pod_name(&session.name_any()),
        &pod_namespace(session),
        cluster_node.as_ref(),
        start.emulated,
    );
    let message = if again {
        format!("on the changes kept from the lost pod, {message}")
    } else {
        message
    };
    condition(
        &mut status,
        session,
        READY,
        ConditionStatus::True,
        reasons::SHELL_RUNNING,
        message.clone(),
    );
    write_status(context, session, status).await?;
    context
        .event(
            session,
            EventType::Normal,
            reasons::SHELL_RUNNING,
            "Start",
            message,
        )
        .await;
    Ok(Action::requeue(Duration::from_mins(1)))
}

/// The Ready condition's message of a running shell (pure): where it runs (pod, cluster node and
/// its CPU) and whether natively or through qemu-user.
pub fn running_message(
    pod: &str,
    runtime: &str,
    cluster_node: Option<&k8s_openapi::api::core::v1::Node>,
    emulated: Option<bool>,
) -> String {
    let node = on_cluster_node(cluster_node);
    let how = emulation_note(emulated);
    format!(
        "the shell runs in pod {pod} of {runtime}{node}{how}: attach with `kubectl walt image shell` or `kubectl attach -it -n {runtime} {pod}`"
    )
}

/// Whether the shell runs natively or through qemu-user, as the status messages say it (pure).
fn emulation_note(emulated: Option<bool>) -> &'static str {
    match emulated {
        Some(true) => ", emulated: the image is built for another CPU",
        Some(false) => ", native: the image is built for this CPU",
        None => "",
    }
}

/// Copies what the shell runtime reported into the status (pure).
pub fn apply_outcome(status: &mut ShellSessionStatus, outcome: &ShellOutcome) {
    status.changes = Some(outcome.summary.clone());
    status.emulated = Some(outcome.emulated);
    if let Some(mode) = outcome.image_shell_mode() {
        status.mode = Some(mode);
    }
    if let Some(digest) = &outcome.digest {
        status.result = Some(ShellResult {
            image: None,
            digest: Some(digest.clone()),
        });
    }
}

// A little long: the pod's inputs (registry credentials, user namespaces, the layer cache) are
// each gathered once here, right before the one apply.
async fn create_pod(
    session: &ShellSession,
    context: &Context,
    mut status: ShellSessionStatus,
    image_name: &str,
    restart: Option<Restart<'_>>,
) -> Result<Action> {
    let namespace = session.namespace().unwrap_or_default();
    let Some((image, from_catalog)) = find_image(context, &namespace, image_name).await? else {
        return end(
            context,
            session,
            status,
            ShellSessionPhase::Failed,
            reasons::IMAGE_NOT_FOUND,
            format!("image {image_name} not found in {namespace} nor in the shared catalog: clone it first (`kubectl walt image clone REF {image_name}`)"),
        )
        .await;
    };
    let image_status = image.status.clone().unwrap_or_default();
    if let Some(layers) = image_status.layers.filter(|layers| *layers >= MAX_SHELL_LAYERS) {
        return end(
            context,
            session,
            status,
            ShellSessionPhase::Failed,
            reasons::TOO_MANY_LAYERS,
            format!("image {image_name} has {layers} layers: a shell needs fewer than {MAX_SHELL_LAYERS}; squash it first (`kubectl walt image squash {image_name}`)"),
        )
        .await;
    }
    let Some(pinned) = pinned_reference_of(&image) else {
        status.phase = ShellSessionPhase::Pending;
        condition(
            &mut status,
            session,
            READY,
            ConditionStatus::False,
            reasons::IMAGE_NOT_READY,
            format!(
                "image {image_name} is not resolved yet (see its Ready condition): the shell starts once it is"
            ),
        );
        write_status(context, session, status).await?;
        return Ok(Action::requeue(WAIT_RETRY));
    };
    // Registry paths are per tenant: the pod reads the image (its namespace's or the catalog's)
    // and pushes into the namespace's own path, nowhere else.
    let paths = context.config.lab_paths();
    let own_repository = scratch_repository(
        context,
        &namespace,
        image_name,
        (!from_catalog).then_some(pinned.as_str()),
    )?;
    let commit_to = format!("{own_repository}:{}", scratch_tag(session));
    let allowed = paths
        .check(&namespace, &pinned, Access::Read, &format!("image {image_name}"))
        .and_then(|()| paths.check(&namespace, &commit_to, Access::Write, "the shell's changes"));
    if let Err(refusal) = allowed {
        return end(
            context,
            session,
            status,
            ShellSessionPhase::Failed,
            REGISTRY_PATH_FORBIDDEN,
            refusal.message,
        )
        .await;
    }
    let runtime = match ensure_runtime_namespace(context, &namespace).await {
        Ok(runtime) => runtime,
        Err(Error::Invalid(message)) => {
            return end(
                context,
                session,
                status,
                ShellSessionPhase::Failed,
                reasons::RUNTIME_NAMESPACE_REFUSED,
                message,
            )
            .await;
        }
        Err(error) => return Err(error),
    };
    let registry_credentials = ensure_registry_secret(context, &namespace, &runtime).await?;
    let registry_host = context.config.registry_host.clone();
    let inputs = ShellPodInputs {
        runtime_image: &context.config.args.shell_image,
        image_reference: &pinned,
        commit_to: &commit_to,
        insecure_registry: context
            .config
            .args
            .registry_plain_http
            .then_some(registry_host.as_str()),
        user_namespaces: crate::controller::shared::pods::user_namespaces(context).await,
        cache: &context.config.args.shell_cache,
        registry_credentials,
        image_architecture: image_status
            .platform
            .as_ref()
            .map(|platform| platform.architecture.as_str()),
        cluster_node: restart.as_ref().map(|restart| restart.cluster_node),
    };
    let pod = build_shell_pod(session, &inputs);
    let pods: Api<Pod> = Api::namespaced(context.client.clone(), &runtime);
    context.apply(&pods, &pod).await?;
    let pod_name = pod.name_any();
    if restart.is_some() {
        return Ok(Action::requeue(Duration::from_secs(10)));
    }
    status.phase = ShellSessionPhase::Starting;
    status.pod = Some(pod_name.clone());
    status.pod_namespace = Some(runtime.clone());
    let message = format!(
        "starting shell pod {pod_name} in {runtime} on {image_name} ({}, {})",
        short_digest(image_status.digest.as_deref().unwrap_or_default()),
        if inputs.user_namespaces {
            "user-namespaced"
        } else {
            "privileged"
        }
    );
    condition(
        &mut status,
        session,
        READY,
        ConditionStatus::False,
        reasons::POD_STARTING,
        message.clone(),
    );
    write_status(context, session, status).await?;
    context
        .event(session, EventType::Normal, reasons::POD_CREATED, "Start", message)
        .await;
    Ok(Action::requeue(Duration::from_secs(30)))
}

/// A shell pod made again after a loss: where, and why.
struct Restart<'a> {
    /// The cluster node keeping the changes.
    cluster_node: &'a str,
    /// What happened to the pod before.
    why: &'a str,
}

/// The message of a session whose shell pod is being made again (pure).
pub fn restart_message(why: &str, cluster_node: &str, restart: u32) -> String {
    format!(
        "{why}: a new shell pod continues on the changes kept on cluster node {cluster_node} (restart {restart} of {MAX_POD_RESTARTS}); `kubectl walt image shell` attaches to it"
    )
}

/// Records the loss of a shell pod whose object is still there, and deletes it (the next
/// reconcile makes the new pod).
async fn lost_pod_goes(
    context: &Context,
    session: &ShellSession,
    status: ShellSessionStatus,
    why: &str,
) -> Result<Action> {
    let message = format!("{why}: removing it to make a new one where the changes are");
    record_loss(context, session, status, message).await?;
    delete_pod(context, session).await?;
    Ok(Action::requeue(Duration::from_secs(2)))
}

/// Records that the shell pod is being made again (the session stays `Running`: the user's plugin
/// keeps waiting and attaches to the new pod); the status as written.
async fn restarting_status(
    context: &Context,
    session: &ShellSession,
    mut status: ShellSessionStatus,
    restart: &Restart<'_>,
) -> Result<ShellSessionStatus> {
    let count = status.pod_restarts.unwrap_or(0) + 1;
    status.pod_restarts = Some(count);
    let message = restart_message(restart.why, restart.cluster_node, count);
    record_loss(context, session, status, message).await
}

/// Writes `Ready=False` reason `ShellPodLost` with `message` (on the version decided on), then the
/// Warning Event; the status as written.
async fn record_loss(
    context: &Context,
    session: &ShellSession,
    mut status: ShellSessionStatus,
    message: String,
) -> Result<ShellSessionStatus> {
    condition(
        &mut status,
        session,
        READY,
        ConditionStatus::False,
        reasons::SHELL_POD_LOST,
        message.clone(),
    );
    write_status(context, session, status.clone()).await?;
    context
        .event(
            session,
            EventType::Warning,
            reasons::SHELL_POD_LOST,
            "Restart",
            message,
        )
        .await;
    Ok(status)
}

async fn record(
    session: &ShellSession,
    context: &Context,
    mut status: ShellSessionStatus,
    outcome: &ShellOutcome,
) -> Result<Action> {
    apply_outcome(&mut status, outcome);
    status.phase = ShellSessionPhase::AwaitingDecision;
    status.completion_time = Some(Time(context.clock.now()));
    let changes = &outcome.summary;
    let message = format!(
        "{} added, {} modified, {} deleted ({} bytes), pushed as {}; set spec.saveAs (an image name) or spec.discard: true (no decision within {}: the digest is kept, no tag moves)",
        changes.added,
        changes.modified,
        changes.deleted,
        changes.bytes,
        outcome.digest.as_deref().unwrap_or_default(),
        walt_crds::format_duration(context.config.args.decision_timeout)
    );
    condition(
        &mut status,
        session,
        READY,
        ConditionStatus::False,
        reasons::AWAITING_DECISION,
        message.clone(),
    );
    write_status(context, session, status).await?;
    delete_pod(context, session).await?;
    context
        .event(
            session,
            EventType::Normal,
            reasons::AWAITING_DECISION,
            "Commit",
            message,
        )
        .await;
    Ok(Action::requeue(context.config.args.decision_timeout))
}

/// Saves the pushed changes as image `target`: copies the manifest there (same registry: blobs
/// mounted, same digest), marks the Image saved (the Image controller resolves it again and the
/// Node controller reboots the nodes that boot it), and ends the session `Saved`.
async fn save(
    session: &ShellSession,
    context: &Context,
    mut status: ShellSessionStatus,
    target: &str,
) -> Result<Action> {
    let namespace = session.namespace().unwrap_or_default();
    let Some(digest) = status.result.as_ref().and_then(|result| result.digest.clone()) else {
        let message = "the session has no pushed digest to save".to_owned();
        return end(
            context,
            session,
            status,
            ShellSessionPhase::Failed,
            reasons::NO_DIGEST,
            message,
        )
        .await;
    };
    let target_name = match ImageName::parse(target) {
        Ok(name) => name,
        Err(error) => {
            let message = format!("spec.saveAs: {error}");
            return end(
                context,
                session,
                status,
                ShellSessionPhase::Failed,
                reasons::INVALID_IMAGE_NAME,
                message,
            )
            .await;
        }
    };
    let namespace_paths = context.config.lab_paths();
    let (target_reference, _) = image_result::target_reference(context, &namespace, &target_name).await?;
    if let Err(refusal) = namespace_paths.check(&namespace, &target_reference, Access::Write, "spec.saveAs") {
        return end(
            context,
            session,
            status,
            ShellSessionPhase::Failed,
            REGISTRY_PATH_FORBIDDEN,
            refusal.message,
        )
        .await;
    }
    let pushed = format!("{}@{digest}", source_repository(session, context).await?);
    image_result::copy_pushed(context, &pushed, &target_reference).await?;
    image_result::mark_image_updated(
        context,
        &namespace,
        &target_name.object_name(),
        &digest,
        (SAVED_BY_ANNOTATION, &session.uid().unwrap_or_default()),
    )
    .await?;
    let rebooting = image_result::nodes_booting(context, &namespace, &target_name).await?;
    status.result = Some(ShellResult {
        image: Some(target_name.to_string()),
        digest: Some(digest.clone()),
    });
    let message = image_result::saved_message("the changes are", &target_name, &digest, &rebooting);
    end(
        context,
        session,
        status,
        ShellSessionPhase::Saved,
        reasons::SAVED,
        message,
    )
    .await
}

/// Where the shell's changes are pushed: the repository of the namespace's own image
/// (`own_pinned`) when the namespace may write it, else the default lab repository of the image
/// name in the namespace's own path (a catalog image, or a reference outside the lab registry).
fn scratch_repository(
    context: &Context,
    namespace: &str,
    image_name: &str,
    own_pinned: Option<&str>,
) -> Result<String> {
    let paths = context.config.lab_paths();
    if let Some(pinned) = own_pinned
        && paths.check(namespace, pinned, Access::Write, "").is_ok()
    {
        return Ok(repository_of(pinned).to_owned());
    }
    let parsed = ImageName::parse(image_name).map_err(|error| Error::Invalid(error.to_string()))?;
    Ok(repository_of(&parsed.default_reference(&context.config.args.lab_registry, namespace)).to_owned())
}

/// Where the shell runtime pushed (see [`scratch_repository`]).
async fn source_repository(session: &ShellSession, context: &Context) -> Result<String> {
    let namespace = session.namespace().unwrap_or_default();
    let source_name = session.spec.image.clone().unwrap_or_default();
    let own_pinned = match find_image(context, &namespace, &source_name).await? {
        Some((image, false)) => pinned_reference_of(&image),
        _ => None,
    };
    scratch_repository(context, &namespace, &source_name, own_pinned.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use walt_crds::{Changes, ShellSessionSpec};

    #[test]
    fn the_controller_never_writes_the_gateways_activity_record() {
        let mut session = ShellSession::new("s", ShellSessionSpec::default());
        session.metadata.generation = Some(3);
        let activity = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::from_second(1_000).expect("time"),
        ));
        session.status = Some(ShellSessionStatus {
            phase: ShellSessionPhase::Running,
            observed_generation: Some(3),
            last_activity: activity.clone(),
            ..ShellSessionStatus::default()
        });
        let read = session.status.clone().unwrap_or_default();
        assert_eq!(status_to_apply(&session, read.clone()), None, "unchanged");
        let mut ended = read;
        ended.phase = ShellSessionPhase::Expired;
        let applied = status_to_apply(&session, ended).expect("changed");
        assert_eq!(applied.last_activity, None, "left to the gateway's field manager");
        assert_eq!(applied.observed_generation, Some(3));
    }

    #[test]
    fn finishing_sets_complete_and_clears_ready() {
        let session = ShellSession::new("s", ShellSessionSpec::default());
        let mut status = ShellSessionStatus {
            phase: ShellSessionPhase::Running,
            ..ShellSessionStatus::default()
        };
        finish(
            &mut status,
            &session,
            ShellSessionPhase::Expired,
            "TTLExpired",
            "the session reached its ttl",
            Timestamp::now(),
        );
        assert_eq!(status.phase, ShellSessionPhase::Expired);
        assert!(status.completion_time.is_some());
        let complete =
            walt_crds::find_condition(&status.conditions, condition_types::COMPLETE).expect("Complete");
        assert_eq!(
            (complete.status.as_str(), complete.reason.as_str()),
            ("True", "TTLExpired")
        );
        let ready = walt_crds::find_condition(&status.conditions, READY).expect("Ready");
        assert_eq!(ready.status, "False");
    }

    #[test]
    fn outcome_goes_to_status() {
        let mut status = ShellSessionStatus::default();
        apply_outcome(
            &mut status,
            &ShellOutcome {
                digest: Some("sha256:d1".into()),
                summary: Changes {
                    added: 2,
                    ..Changes::default()
                },
                emulated: true,
                mode: Some("init".into()),
                ..ShellOutcome::default()
            },
        );
        assert_eq!(status.changes.map(|c| c.added), Some(2));
        assert_eq!(status.emulated, Some(true));
        assert_eq!(status.mode, Some(walt_crds::ImageShellMode::Init));
        assert_eq!(status.result.and_then(|r| r.digest), Some("sha256:d1".into()));
    }

    #[test]
    fn a_running_shell_says_on_which_cluster_node_and_whether_natively() {
        let node = crate::controller::shared::pods::cluster_node_of("pi-1", "arm64");
        let native = running_message("walt-shell-s1", "walt-run-lab", Some(&node), Some(false));
        assert!(
            native.starts_with(
                "the shell runs in pod walt-shell-s1 of walt-run-lab on cluster node pi-1 (arm64), native: "
            ),
            "{native}"
        );
        let emulated = running_message("walt-shell-s1", "walt-run-lab", Some(&node), Some(true));
        assert!(
            emulated.contains("(arm64), emulated: the image is built for another CPU: attach with"),
            "{emulated}"
        );
        assert!(
            running_message("walt-shell-s1", "walt-run-lab", None, None)
                .starts_with("the shell runs in pod walt-shell-s1 of walt-run-lab: attach with "),
        );
    }
}
