//! NodeSave reconcile: dereference (the Node, the image it booted, the
//! target Image) → validate (pure, in [`build`]) → wait for the
//! image (see [`crate::controller::shared::lock`]) and a save slot → run the save as a tracked
//! task → tag, create or update the Image, count the nodes that reboot.
//!
//! The task lives in this process only. A NodeSave found `Running` or
//! `Pushing` with no task here (the operator restarted, or leadership moved)
//! is simply run again from the start: the tag only moves at the very end,
//! so an interrupted save never moved one, and pushing by digest is
//! idempotent.
//!
//! Every status write is conditional on the version of the NodeSave it was decided on. The
//! reconcile's (waiting, failing, `Running` at the start) on the version it read: refused
//! ([`Error::Stale`]), nothing is written, no task starts, and the NodeSave is decided again on its
//! current state. The task's (progress, `Pushing`, its end) on the version its own last write left
//! ([`writes::StatusWrites`]): another write in between gets the task's next write refused, the
//! NodeSave is read again and [`decide::after_refusal`] decides. A progress or `Pushing` write that
//! finds the save ended or taken over by another writer stops the task before its tag moves
//! ([`Failure::Overtaken`]: nothing more written, its slot freed; the reconcile, woken by that other
//! write, sees a task no more and decides on what it finds); one that finds only metadata changed
//! writes again. The end of a run is written onto any unfinished status, never over another end.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use walt_crds::{BootMode, Changes, Image, ImageName, Node, NodeSave, NodeSavePhase, Progress};

pub mod build;
pub mod decide;
pub mod failure;
pub mod reasons;
pub mod writes;

use self::build::{
    PROGRESS_INTERVAL, SaveOutcome, SaveTarget, failed_status, milestone_crossed, nodes_booting,
    pending_status, pushing_status, running_status, same_wait, succeeded_status,
};
use self::decide::{Step, TaskWrite, decide};
use self::failure::Failure;
use self::writes::{Refused, StatusWrites};
use crate::controller::shared::context::{Context, FIELD_MANAGER};
use crate::controller::shared::error::{Error, KubeResultExt, Result};
use crate::controller::shared::lock::{Claim, claims_in};
use crate::controller::shared::lookup::find_image;
use crate::controller::shared::node_access::{
    NoRoute, client_config, lent_device, node_device, node_target, vnode_pod,
};
use crate::controller::shared::registry::{
    NO_REBOOT_ANNOTATION, RESOLVE_ANNOTATION, lab_reference, pinned_reference, registry_client,
};
use crate::controller::shared::registry_paths::Access;
use crate::oci::RegistryClient;
use crate::ssh::export::{self, ExportOptions};
use crate::ssh::save::{NodeSaved, SaveOptions, SaveProgress, push_node_changes};
use crate::ssh::{ClientConfig, NodeClient, NodeTarget};

/// Annotation on an Image: the uid of the NodeSave that wrote its current
/// content. A save restarted after the operator died between updating the
/// Image and recording success recognizes its own Image (not "ImageExists").
pub const SAVED_BY_ANNOTATION: &str = "walt.dev/saved-by";

/// How soon a save that waits (slot, image, node) looks again.
const WAIT_RETRY: Duration = Duration::from_secs(5);

/// Everything a save task needs, found by the reconcile.
struct SaveJob {
    save: NodeSave,
    target: SaveTarget,
    /// `repository@digest` of the image the node booted.
    base_reference: String,
    /// Where the new image goes: repository and tag.
    repository: String,
    tag: String,
    ssh_target: NodeTarget,
    ssh_config: ClientConfig,
    export: ExportOptions,
    /// The nodes of the namespace (to count those that reboot).
    nodes: Vec<Node>,
    /// The task's status writes, going on from the version its `Running` went onto ([`start`]).
    writes: Arc<StatusWrites>,
}

/// Writes a status the reconcile decided on `save`, only onto that version of it ([`Error::Stale`]
/// otherwise); returns the NodeSave as written.
async fn write_status(
    context: &Context,
    save: &NodeSave,
    status: &walt_crds::NodeSaveStatus,
) -> Result<NodeSave> {
    let api: Api<NodeSave> = Api::namespaced(context.client.clone(), &save.namespace().unwrap_or_default());
    context.apply_status_of(&api, save, status).await
}

/// Writes a waiting status (only when it says something new).
async fn wait(context: &Context, save: &NodeSave, reason: &str, message: &str) -> Result<Action> {
    let status = pending_status(save, reason, message, Timestamp::now());
    if !same_wait(save.status.as_ref(), &status) {
        write_status(context, save, &status).await?;
        context
            .event(save, EventType::Normal, reason, "Wait", message.to_owned())
            .await;
    }
    Ok(Action::requeue(WAIT_RETRY))
}

/// Fails the save for good (the spec cannot change: a new NodeSave is needed).
async fn fail(context: &Context, save: &NodeSave, failure: &Failure) -> Result<Action> {
    let (reason, message) = (failure.reason(), failure.to_string());
    let status = failed_status(save, reason, &message, Timestamp::now());
    write_status(context, save, &status).await?;
    context
        .event(
            save,
            EventType::Warning,
            reason,
            "Save",
            format!("{message} (no tag was moved)"),
        )
        .await;
    Ok(Action::await_change())
}

/// Reconciles one NodeSave: dereference → [`decide`] → prepare and start the save task (its
/// status is written by [`wait`], [`fail`] or [`start`]; the task writes the rest).
pub async fn reconcile(save: Arc<NodeSave>, context: Arc<Context>) -> Result<Action> {
    let phase = save
        .status
        .as_ref()
        .map(|status| status.phase)
        .unwrap_or_default();
    if phase.is_finished() {
        return Ok(Action::await_change());
    }
    if context.saves.is_running(&save.uid().unwrap_or_default()) {
        // The task reports through the status; look again now and then in
        // case it died without a word (a panic frees its slot, and the next
        // look runs the save again).
        return Ok(Action::requeue(Duration::from_mins(1)));
    }
    let facts = Facts::read(&context, &save).await?;
    if let Some(refused) = facts.device_refused {
        // A physical node whose Device is not this namespace's (any more): refused before anything else.
        return fail(&context, &save, &Failure::NoRoute(refused)).await;
    }
    match decide(
        &save,
        facts.node.as_ref(),
        facts.other_image(&save),
        &facts.claims,
    ) {
        Step::Wait(failure) => wait(&context, &save, failure.reason(), &failure.to_string()).await,
        Step::Fail(failure) => fail(&context, &save, &failure).await,
        Step::Start(target) => {
            let Some(node) = &facts.node else {
                let gone = Failure::NodeNotFound {
                    namespace: save.namespace().unwrap_or_default(),
                    node: save.spec.node.clone(),
                };
                return fail(&context, &save, &gone).await;
            };
            let restarted = matches!(phase, NodeSavePhase::Running | NodeSavePhase::Pushing);
            start(&context, &save, node, target, facts.existing.as_ref(), restarted).await
        }
    }
}

/// What the decision needs to know, read from the API server.
struct Facts {
    node: Option<Node>,
    /// The Image the save would write, if it exists.
    existing: Option<Image>,
    /// The unfinished shells and saves of the namespace (who holds which image).
    claims: Vec<Claim>,
    /// Why the node's Device may not be used from this namespace, if so.
    device_refused: Option<NoRoute>,
}

impl Facts {
    async fn read(context: &Context, save: &NodeSave) -> Result<Self> {
        let namespace = save.namespace().unwrap_or_default();
        let node = Api::<Node>::namespaced(context.client.clone(), &namespace)
            .get_opt(&save.spec.node)
            .await
            .context(|| format!("reading Node {namespace}/{}", save.spec.node))?;
        let existing = match ImageName::parse(&save.spec.image)
            .ok()
            .map(|name| name.object_name())
        {
            Some(object) => Api::<Image>::namespaced(context.client.clone(), &namespace)
                .get_opt(&object)
                .await
                .context(|| format!("reading Image {namespace}/{object}"))?,
            None => None,
        };
        let claims = claims_in(context, &namespace).await?;
        let device_refused = match node.as_ref().filter(|node| node.spec.device.is_some()) {
            Some(node) => {
                let device = node_device(&context.client, node).await?;
                lent_device(node, device.as_ref())
                    .err()
                    .filter(|refused| !refused.is_transient())
            }
            None => None,
        };
        Ok(Self {
            node,
            existing,
            claims,
            device_refused,
        })
    }

    /// The existing Image, unless this very save wrote it (before a restart): then it is not
    /// "another" image.
    fn other_image(&self, save: &NodeSave) -> Option<&Image> {
        let uid = save.uid().unwrap_or_default();
        self.existing
            .as_ref()
            .filter(|image| image.annotations().get(SAVED_BY_ANNOTATION) != Some(&uid))
    }
}

/// Prepares the job, takes a save slot, records `Running` and starts the task.
async fn start(
    context: &Arc<Context>,
    save: &NodeSave,
    node: &Node,
    target: SaveTarget,
    existing: Option<&Image>,
    restarted: bool,
) -> Result<Action> {
    let mut job = match prepare(context, save, node, target, existing).await {
        Ok(job) => job,
        Err(Failure::Api(error)) => return Err(error),
        Err(failure) if failure.is_transient() => {
            return wait(context, save, failure.reason(), &failure.to_string()).await;
        }
        Err(failure) => return fail(context, save, &failure).await,
    };
    let Some(slot) = context.saves.try_start(&save.uid().unwrap_or_default()) else {
        let message = format!(
            "{} node saves are running (--max-concurrent-saves={}); this one starts when one ends",
            context.saves.limit(),
            context.saves.limit()
        );
        return wait(context, save, reasons::WAITING_FOR_SLOT, &message).await;
    };
    // Running is recorded before the task starts: from now on this save holds
    // its image (see lock.rs), whatever other saves are reconciled meanwhile.
    let started = running_status(save, &job.target, Progress::default(), Timestamp::now());
    let written = write_status(context, save, &started).await?;
    job.writes = Arc::new(StatusWrites::new(written));
    job.save.status = Some(started);
    let task_context = context.clone();
    tokio::spawn(async move {
        let _slot = slot;
        task_context.metrics.running_saves.inc();
        run(&task_context, job, restarted).await;
        task_context.metrics.running_saves.dec();
    });
    Ok(Action::await_change())
}

/// Finds the base image, where the new image goes, and how to reach the node.
async fn prepare(
    context: &Context,
    save: &NodeSave,
    node: &Node,
    target: SaveTarget,
    existing: Option<&Image>,
) -> std::result::Result<SaveJob, Failure> {
    let namespace = save.namespace().unwrap_or_default();
    let base_name = target.base.name.clone().unwrap_or_default();
    let base_digest = target.base.digest.clone().unwrap_or_default();
    let Some((base_image, _)) = find_image(context, &namespace, &base_name).await? else {
        return Err(Failure::BaseImageNotFound {
            node: node.name_any(),
            base: base_name,
        });
    };
    let base_lab_reference = base_image
        .status
        .as_ref()
        .and_then(|status| status.reference.clone())
        .map_or_else(
            || lab_reference(&base_image, &context.config.args.lab_registry),
            Ok,
        )
        .map_err(Failure::BaseImageInvalid)?;
    let base_reference = pinned_reference(&base_lab_reference, &base_digest);
    let target_image = existing.cloned().unwrap_or_else(|| {
        let mut image = Image::new(&target.image_object, walt_crds::ImageSpec::default());
        image.metadata.namespace = Some(namespace.clone());
        image
    });
    let reference =
        lab_reference(&target_image, &context.config.args.lab_registry).map_err(Failure::TargetInvalid)?;
    // Registry paths are per tenant: the base is read (its blobs mounted), the target written.
    let paths = context.config.lab_paths();
    paths
        .check(
            &namespace,
            &base_reference,
            Access::Read,
            &format!("the base image {base_name}"),
        )
        .and_then(|()| paths.check(&namespace, &reference, Access::Write, "spec.image"))
        .map_err(Failure::RegistryPathForbidden)?;
    let (repository, tag) =
        crate::runtime::image::split_target(&reference).map_err(|source| Failure::ImageReferencePinned {
            image: save.spec.image.clone(),
            reference: reference.clone(),
            source: Box::new(source),
        })?;
    let pod = vnode_pod(&context.client, node).await?;
    let device = node_device(&context.client, node).await?;
    let ssh_target = node_target(node, pod.as_ref(), device.as_ref()).map_err(Failure::NoRoute)?;
    let ssh_config = client_config(context, node, device.as_ref())?;
    let export = ExportOptions {
        upper_dir: node.spec.overlay.upper_dir.clone(),
        ready_marker: (node.spec.boot_mode == BootMode::Volatile)
            .then(|| node.spec.overlay.ready_marker.clone()),
        exclude: save.spec.exclude.clone(),
    };
    let nodes = Api::<Node>::namespaced(context.client.clone(), &namespace)
        .list(&ListParams::default())
        .await
        .context(|| format!("listing the Nodes of {namespace}"))?
        .items;
    Ok(SaveJob {
        save: save.clone(),
        target,
        base_reference,
        repository,
        tag,
        ssh_target,
        ssh_config,
        export,
        nodes,
        // Replaced once `Running` is written (the chain starts from that write).
        writes: Arc::new(StatusWrites::new(save.clone())),
    })
}

/// Runs one save to the end and records how it ended.
async fn run(context: &Arc<Context>, job: SaveJob, restarted: bool) {
    let mut save = job.save.clone();
    let note = if restarted {
        format!(
            "saving node {} as {} again from the start: the operator restarted during the previous run (no tag had moved)",
            save.spec.node, save.spec.image
        )
    } else {
        format!(
            "saving the changes of node {} as {} on top of {}",
            save.spec.node, save.spec.image, job.base_reference
        )
    };
    let reason = if restarted {
        reasons::RESTARTED
    } else {
        reasons::STARTED
    };
    context
        .event(&save, EventType::Normal, reason, "Save", note)
        .await;
    match execute_with_retries(context, &job, &mut save).await {
        Ok((outcome, rebooting)) => {
            context.metrics.saved_bytes.inc_by(outcome.layer_size);
            context.metrics.node_save_ended("succeeded");
            let status = succeeded_status(&save, &outcome, rebooting, Timestamp::now());
            let message = format!(
                "saved node {} as {} ({}, layer {} bytes){}",
                save.spec.node,
                save.spec.image,
                outcome.digest,
                outcome.layer_size,
                if rebooting > 0 {
                    format!("; {rebooting} node(s) that boot it reboot")
                } else {
                    String::new()
                }
            );
            record_end(context, &job, &status).await;
            context
                .event(&save, EventType::Normal, reasons::SAVED, "Save", message)
                .await;
        }
        Err(cancelled @ Failure::Cancelled(_)) => {
            tracing::info!(message = %cancelled, "node save cancelled");
            context.metrics.node_save_ended("cancelled");
        }
        Err(overtaken @ Failure::Overtaken(_)) => {
            // Nothing written: the status is the other writer's; the reconcile it woke decides.
            tracing::warn!(why = %overtaken, "node save stopped");
            context.metrics.node_save_ended("cancelled");
        }
        Err(failure) => {
            let (reason, message) = (failure.reason(), failure.to_string());
            tracing::warn!(reason, %message, "node save failed");
            context.metrics.node_save_ended("failed");
            let status = failed_status(&save, reason, &message, Timestamp::now());
            record_end(context, &job, &status).await;
            context
                .event(
                    &save,
                    EventType::Warning,
                    reason,
                    "Save",
                    format!("{message} (no tag was moved)"),
                )
                .await;
        }
    }
}

/// Runs the save, and runs it again from the start (after [`retry_delay`]) while it fails in a
/// way that may pass, up to `--save-retries`; each retry is an Event saying why. The base's blobs
/// are mounted, never sent; the new layer is read from the node and uploaded again by each attempt
/// (its digest is known only at its end). When the retries are used up, the failure names the
/// registry's words and the attempts.
async fn execute_with_retries(
    context: &Arc<Context>,
    job: &SaveJob,
    save: &mut NodeSave,
) -> std::result::Result<(SaveOutcome, usize), Failure> {
    let retries = context.config.args.save_retries;
    let first = context.config.args.save_retry_delay;
    let mut retry = 1;
    loop {
        let failure = match execute(context, job, save).await {
            Err(failure) if failure.is_retryable() => failure,
            other => return other,
        };
        let Some(delay) = retry_delay(retry, retries, first) else {
            return Err(Failure::GaveUp {
                attempts: retry,
                last: Box::new(failure),
            });
        };
        let note = format!(
            "{}: {failure}; trying again in {} s (retry {retry} of {retries})",
            failure.reason(),
            delay.as_secs()
        );
        tracing::warn!(%note, "node save will be retried");
        context
            .event(save, EventType::Warning, reasons::RETRYING, "Save", note)
            .await;
        tokio::time::sleep(delay).await;
        if !still_wanted(context, save).await {
            return Err(Failure::Cancelled("while it waited to retry".into()));
        }
        retry += 1;
    }
}

/// Writes the final status, retrying a little (the API server may be restarting):
/// a save left `Running` would run again. Never over another writer's end ([`TaskWrite::End`]).
async fn record_end(context: &Context, job: &SaveJob, status: &walt_crds::NodeSaveStatus) {
    let written = retry_api("recording the end of the save", || async {
        match job.writes.write(context, status, TaskWrite::End).await {
            Ok(()) => Ok(None),
            Err(Refused::Overtaken(why)) => Ok(Some(why)),
            Err(Refused::Api(error)) => Err(error),
        }
    })
    .await;
    match written {
        Ok(None) => {}
        Ok(Some(why)) => tracing::warn!(%why, "the end of this run of the save is not recorded"),
        Err(error) if is_gone(&error) => {}
        Err(error) => tracing::warn!(%error, "could not record the end of the save"),
    }
}

/// How many times a write to the API server that must not be lost is tried.
const API_ATTEMPTS: u32 = 6;

/// Runs an API write, trying again while it fails (2, 4, 6, 8, 10 s apart: about 30 s in all, for
/// an API server that restarts); an answer that the object is gone is final.
async fn retry_api<T, Fut>(what: &str, mut write: impl FnMut() -> Fut) -> Result<T>
where
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut attempt = 1;
    loop {
        match write().await {
            Err(error) if attempt < API_ATTEMPTS && !is_gone(&error) => {
                tracing::warn!(%error, attempt, what, "API write failed; trying again");
                tokio::time::sleep(Duration::from_secs(u64::from(attempt) * 2)).await;
                attempt += 1;
            }
            outcome => return outcome,
        }
    }
}

/// How long to wait before retry number `retry` (1-based) of a save, or `None` when the retries
/// are used up (pure): `first`, doubling each time, at most 5 minutes.
pub fn retry_delay(retry: u32, retries: u32, first: Duration) -> Option<Duration> {
    (retry >= 1 && retry <= retries).then(|| {
        first
            .saturating_mul(1_u32 << (retry - 1).min(16))
            .min(Duration::from_mins(5))
    })
}

/// Whether an API error says the NodeSave is gone.
fn is_gone(error: &Error) -> bool {
    matches!(error, Error::Kube { source: kube::Error::Api(status), .. } if status.code == 404)
}

/// Whether this very NodeSave (same uid) still exists and is not being deleted.
async fn still_wanted(context: &Context, save: &NodeSave) -> bool {
    let api: Api<NodeSave> = Api::namespaced(context.client.clone(), &save.namespace().unwrap_or_default());
    match api.get_opt(&save.name_any()).await {
        Ok(Some(current)) => current.uid() == save.uid() && current.metadata.deletion_timestamp.is_none(),
        Ok(None) => false,
        // Cannot tell: go on (the tag is what the user asked for).
        Err(_) => true,
    }
}

/// The save itself: connect, export, push by digest ([`transfer`]), then tag and update the Image
/// ([`publish`]).
async fn execute(
    context: &Arc<Context>,
    job: &SaveJob,
    save: &mut NodeSave,
) -> std::result::Result<(SaveOutcome, usize), Failure> {
    let client = NodeClient::connect(&job.ssh_target, &job.ssh_config)
        .await
        .map_err(|error| Failure::Connect(Box::new(error)))?;
    let transferred = transfer(context, job, save, &client).await;
    // The one place the connection ends, whatever the transfer did.
    client.close().await;
    let (registry, saved) = transferred?;
    publish(context, job, save, &registry, &saved).await
}

/// Plans the export, reads the base image, and streams the node's changes into the registry by
/// digest, reporting progress; stops early when the NodeSave is deleted meanwhile.
async fn transfer(
    context: &Arc<Context>,
    job: &SaveJob,
    save: &NodeSave,
    client: &NodeClient,
) -> std::result::Result<(RegistryClient, NodeSaved), Failure> {
    let plan = export::plan(client, &job.export)
        .await
        .map_err(|error| Failure::NotSaveable(Box::new(error)))?;
    let registry = registry_client(context).map_err(Failure::RegistryUnavailable)?;
    let base = registry
        .resolve(&job.base_reference, None)
        .await
        .map_err(|source| Failure::BaseImageUnavailable {
            reference: job.base_reference.clone(),
            source: Box::new(source),
        })?;
    let options = save_options(&save.spec, &job.repository);
    // Progress goes through a watch channel to a reporter that writes the
    // status at most every PROGRESS_INTERVAL (throttled patches).
    let (sender, receiver) = tokio::sync::watch::channel(SaveProgress::default());
    let stop = tokio_util::sync::CancellationToken::new();
    let done = tokio_util::sync::CancellationToken::new();
    let reporter = tokio::spawn(report_progress(
        context.clone(),
        Reporter {
            save: save.clone(),
            target: job.target.clone(),
            writes: job.writes.clone(),
        },
        receiver,
        stop.clone(),
        done.clone(),
    ));
    let push = push_node_changes(client, &plan, &registry, &base, &options, |progress| {
        sender.send_if_modified(|current| {
            let changed = *current != progress;
            *current = progress;
            changed
        });
    });
    // A NodeSave deleted while it runs (`kubectl walt node save` interrupted), or ended or taken
    // over by another writer, stops the transfer: dropping the push abandons the upload.
    let pushed = tokio::select! {
        pushed = push => Some(pushed),
        () = stop.cancelled() => None,
    };
    // The reporter ends between two writes (never amid one: the next write goes on from its answer).
    done.cancel();
    let stopped = reporter.await.ok().flatten();
    let Some(pushed) = pushed else {
        return Err(match stopped {
            Some(Refused::Overtaken(why)) => Failure::Overtaken(why),
            _ => Failure::Cancelled("while it ran".into()),
        });
    };
    let saved = pushed.map_err(|error| Failure::Transfer(Box::new(error)))?;
    Ok((registry, saved))
}

/// How the layer is written and pushed (pure).
fn save_options(spec: &walt_crds::NodeSaveSpec, repository: &str) -> SaveOptions {
    SaveOptions {
        repository: repository.to_owned(),
        compression: match spec.compression {
            walt_crds::Compression::Gzip => crate::oci::Compression::Gzip,
            walt_crds::Compression::Zstd => crate::oci::Compression::Zstd,
        },
        created_by: format!("walt node save {}", spec.node),
        progress_interval: Duration::from_secs(1),
    }
}

/// What the progress reporter writes about.
struct Reporter {
    save: NodeSave,
    target: SaveTarget,
    writes: Arc<StatusWrites>,
}

/// Writes the save's progress to its status (throttled) and an Event at each milestone, until `done`
/// (checked between writes, never amid one). Cancels `stop` and returns why when the NodeSave is gone
/// or another writer decided about it ([`Refused::Overtaken`]).
async fn report_progress(
    context: Arc<Context>,
    reporter: Reporter,
    mut receiver: tokio::sync::watch::Receiver<SaveProgress>,
    stop: tokio_util::sync::CancellationToken,
    done: tokio_util::sync::CancellationToken,
) -> Option<Refused> {
    let Reporter { save, target, writes } = reporter;
    let mut last_bytes = 0;
    loop {
        tokio::select! {
            changed = receiver.changed() => if changed.is_err() { return None },
            () = done.cancelled() => return None,
        }
        let now = *receiver.borrow_and_update();
        let progress = Progress {
            bytes: now.bytes,
            files: now.files,
        };
        let status = running_status(&save, &target, progress, Timestamp::now());
        match writes.write(&context, &status, TaskWrite::Progress).await {
            Err(Refused::Api(error)) if is_gone(&error) => {
                stop.cancel();
                return Some(Refused::Api(error));
            }
            Err(overtaken @ Refused::Overtaken(_)) => {
                stop.cancel();
                return Some(overtaken);
            }
            Err(error) => tracing::debug!(%error, "could not write the save's progress"),
            Ok(()) => {}
        }
        if let Some(milestone) = milestone_crossed(last_bytes, now.bytes) {
            let note = format!(
                "{} MiB, {} entries read from the node",
                milestone >> 20,
                now.files
            );
            context
                .event(&save, EventType::Normal, reasons::PROGRESS, "Save", note)
                .await;
        }
        last_bytes = now.bytes;
        tokio::select! {
            () = tokio::time::sleep(PROGRESS_INTERVAL) => {}
            () = done.cancelled() => return None,
        }
    }
}

/// With the whole image in the registry: records `Pushing`, moves the tag (only now), updates the
/// Image and counts the nodes that reboot.
async fn publish(
    context: &Arc<Context>,
    job: &SaveJob,
    save: &mut NodeSave,
    registry: &RegistryClient,
    saved: &NodeSaved,
) -> std::result::Result<(SaveOutcome, usize), Failure> {
    let progress = Progress {
        bytes: saved.progress.bytes,
        files: saved.progress.files,
    };
    let pushing = pushing_status(save, progress, Timestamp::now());
    save.status = Some(pushing.clone());
    match job.writes.write(context, &pushing, TaskWrite::Progress).await {
        Ok(()) => {}
        // Before the tag moves: what was pushed by digest stays untagged.
        Err(Refused::Overtaken(why)) => return Err(Failure::Overtaken(why)),
        Err(Refused::Api(error)) => tracing::warn!(%error, "could not record the Pushing phase"),
    }
    let note = format!(
        "read {} bytes, {} entries from the node; pushed {} by digest; moving tag {}",
        saved.progress.bytes, saved.progress.files, saved.pushed.reference, job.tag
    );
    context
        .event(save, EventType::Normal, reasons::PUSHED, "Save", note)
        .await;
    if !still_wanted(context, save).await {
        return Err(Failure::Cancelled(format!(
            "before the tag moved: {} stays untagged",
            saved.pushed.reference
        )));
    }
    registry
        .tag(&job.repository, &saved.pushed.manifest_digest, &job.tag)
        .await
        .map_err(|source| Failure::TagFailed {
            pushed: saved.pushed.reference.clone(),
            source: Box::new(source),
        })?;
    let rebooting = if job.target.exists && save.spec.reboot_nodes {
        nodes_booting(&job.nodes, &job.target.image_object)
    } else {
        0
    };
    // What the new layer says about the image-shell helpers was seen as it was written: the Image
    // controller (this process) takes it from here instead of streaming the layer back from the
    // registry to learn the shell mode (0.40-0.45 s of a 256 MiB save's time to the Image Ready).
    context
        .shell_helper_layers
        .record(&saved.pushed.layer_digest, saved.pushed.summary.shell_helpers);
    // The tag has moved: the Image must follow, even across an API server restart.
    let current: &NodeSave = save;
    retry_api("updating the Image", || {
        update_image(context, current, job, &saved.pushed.manifest_digest)
    })
    .await
    .map_err(Failure::ImageUpdateFailed)?;
    Ok((outcome_of(job, saved), rebooting))
}

/// What the status reports of a saved node (pure).
fn outcome_of(job: &SaveJob, saved: &NodeSaved) -> SaveOutcome {
    let summary = &saved.pushed.summary;
    SaveOutcome {
        reference: format!("{}:{}", job.repository, job.tag),
        digest: saved.pushed.manifest_digest.clone(),
        layer_digest: saved.pushed.layer_digest.clone(),
        layer_size: saved.pushed.layer_size,
        changes: Changes {
            added: summary.added,
            modified: summary.modified,
            deleted: summary.deleted,
            bytes: summary.bytes,
        },
    }
}

/// Creates the Image (new name) or marks it updated (overwrite): asks the
/// Image controller to resolve it again now, records which save wrote it,
/// and, with `rebootNodes: false`, tells the Node controller not to reboot
/// for this digest.
async fn update_image(context: &Context, save: &NodeSave, job: &SaveJob, digest: &str) -> Result<()> {
    let namespace = save.namespace().unwrap_or_default();
    let images: Api<Image> = Api::namespaced(context.client.clone(), &namespace);
    let mut annotations = serde_json::Map::new();
    annotations.insert(RESOLVE_ANNOTATION.into(), digest.into());
    annotations.insert(SAVED_BY_ANNOTATION.into(), save.uid().unwrap_or_default().into());
    if !save.spec.reboot_nodes {
        annotations.insert(NO_REBOOT_ANNOTATION.into(), digest.into());
    }
    let body = serde_json::json!({
        "apiVersion": "walt.dev/v1alpha1",
        "kind": "Image",
        "metadata": {"name": job.target.image_object, "annotations": annotations},
        "spec": {},
    });
    images
        .patch(
            &job.target.image_object,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
        .context(|| format!("updating Image {namespace}/{}", job.target.image_object))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_wait_longer_each_time_and_stop_at_the_budget() {
        let five = Duration::from_secs(5);
        assert_eq!(retry_delay(1, 5, five), Some(five));
        assert_eq!(retry_delay(2, 5, five), Some(Duration::from_secs(10)));
        assert_eq!(retry_delay(5, 5, five), Some(Duration::from_secs(80)));
        assert_eq!(retry_delay(6, 5, five), None, "budget used up");
        assert_eq!(retry_delay(1, 0, five), None, "no retries");
        assert_eq!(retry_delay(12, 20, five), Some(Duration::from_mins(5)), "capped");
    }
}
