//! ImageBuild reconcile (leader only), through a finalizer so the build pod is gone whatever
//! happens: deleting the ImageBuild kills its pod, and no tag moves.
//!
//! A build pod is walt's runtime pod ([`crate::controller::shared::pods::runtime_pod`], isolated like
//! image shells, with the namespace's own registry credentials) running `walt-operator build
//! --context-tar -`, in the tenant's runtime namespace (`walt-run-<namespace>`,
//! [`crate::controller::shared::runtime`]) with the build's owner labels, like shell pods: the tenant's
//! namespace needs no pod rights and stays at Pod Security `baseline`. The client (`kubectl walt image
//! build`) attaches to it there (`status.podNamespace`) and writes the context as a tar archive on its
//! standard input. The build pushes by digest under a scratch tag `build-<uid>`
//! of the target's repository (checked against the namespace's registry path first); the reconcile
//! reads its progress from the pod's log into the status, and once it succeeded tags the result as
//! `spec.image` and creates or updates the Image, like every other image change
//! ([`crate::controller::shared::image_result`]). A failed build moves no tag.
//!
//! Shape: observe (the pod, its log) → the pure [`decide::decide`] → one arm per step → one status
//! write and an Event. Failures are [`failure::Failure`]s (reason and retry).

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::LogParams;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Api, ResourceExt};
use walt_crds::image_build::{LogProgress, reasons};
use walt_crds::{
    ConditionStatus, ImageBuild, ImageBuildPhase, ImageBuildResult, ImageBuildStatus, ImageName,
    condition_types, runtime_namespace, short_digest,
};

pub mod build;
pub mod decide;
pub mod failure;

use self::build::{
    BuildOutcome, BuildPodInputs, OWNER_KIND, build_architecture, build_emulated, build_pod, build_pod_name,
    pod_state, scratch_tag,
};
use self::decide::{Observed, PROGRESS_INTERVAL, Step, apply_progress, decide};
use self::failure::Failure;
use crate::controller::shared::context::Context;
use crate::controller::shared::error::{Error, KubeResultExt, Result};
use crate::controller::shared::image_result;
use crate::controller::shared::lock::{Claim, claims_in, holder_other_than};
use crate::controller::shared::lookup::images_for;
use crate::controller::shared::pods::scheduled_on;
use crate::controller::shared::registry::{ensure_registry_secret, repository_of};
use crate::controller::shared::registry_paths::Access;
use crate::controller::shared::runtime::{delete_within, ensure_runtime_namespace, owned_by};

/// Finalizer of ImageBuilds: the build pod is deleted before the build goes.
pub const FINALIZER: &str = "walt.dev/image-build-cleanup";
/// Annotation of an Image made by an ImageBuild: the build's uid.
pub const BUILT_BY_ANNOTATION: &str = "walt.dev/built-by-image-build";
/// How many lines of the build pod's log a reconcile reads.
const LOG_LINES: i64 = 200;
/// How often a build waiting for its image looks again (its holder ending does not wake it).
const IMAGE_WAIT_RETRY: Duration = Duration::from_secs(3);

/// Reconciles one ImageBuild.
pub async fn reconcile(build: Arc<ImageBuild>, context: Arc<Context>) -> Result<Action> {
    let namespace = build.namespace().unwrap_or_default();
    let api: Api<ImageBuild> = Api::namespaced(context.client.clone(), &namespace);
    finalizer(&api, FINALIZER, build, |event| async {
        match event {
            Finalizer::Apply(build) => apply(&build, &context).await,
            // Deleted (Ctrl-C in the plugin, or by hand): the pod is killed; nothing was tagged.
            Finalizer::Cleanup(build) => delete_pod(&context, &build, Some(1))
                .await
                .map(|()| Action::await_change()),
        }
    })
    .await
    .map_err(Error::from)
}

async fn apply(build: &ImageBuild, context: &Context) -> Result<Action> {
    let status = build.status.clone().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(context.client.clone(), &pod_namespace(build));
    let found = if status.phase.is_finished() {
        None
    } else {
        pods.get_opt(&build_pod_name(&build.name_any()))
            .await
            .context(|| format!("reading the build pod of {}", build.name_any()))?
    };
    // Only the pod made for this very build (owner labels, by uid) is read or attached to.
    let (pod, stale_pod) = match found {
        Some(pod) if !owned_by(&pod.metadata, OWNER_KIND, build) => (None, true),
        found => (found, false),
    };
    let state = pod.as_ref().map(|pod| pod_state(pod, Timestamp::now()));
    let log = match &state {
        Some(build::PodState::Running(_) | build::PodState::Failed(_) | build::PodState::Succeeded(_)) => {
            read_log(context, build).await
        }
        _ => None,
    };
    // Only a build about to start looks for another writer of its image.
    let holder = if pod.is_none() && status.phase == ImageBuildPhase::Pending {
        image_holder(build, context).await?
    } else {
        None
    };
    let observed = Observed {
        pod: state,
        stale_pod,
        log,
        holder,
    };
    let step = decide(build, &observed);
    tracing::debug!(?step, "image build step");
    let log = observed.log.unwrap_or_default();
    match step {
        Step::Cleanup => {
            delete_pod(context, build, None).await?;
            Ok(Action::await_change())
        }
        Step::RemoveStalePod => {
            delete_pod(context, build, Some(1)).await?;
            Ok(Action::requeue(Duration::from_secs(2)))
        }
        Step::Start => start(build, context, status).await,
        Step::WaitForImage(holder) => wait_for_image(build, context, status, &holder).await,
        Step::Wait(after) => Ok(Action::requeue(after)),
        Step::Progress => progress(build, context, status, &log, pod.as_ref()).await,
        Step::Save(outcome) => save(build, context, status, &outcome, &log, pod.as_ref()).await,
        Step::Fail(failure) => fail(build, context, status, &failure, &log).await,
    }
}

/// Who else holds the build's target image (`Kind/name`), if anyone (an invalid name holds
/// nothing: [`start`] refuses it).
async fn image_holder(build: &ImageBuild, context: &Context) -> Result<Option<String>> {
    let Ok(target) = ImageName::parse(&build.spec.image) else {
        return Ok(None);
    };
    let claims = claims_in(context, &build.namespace().unwrap_or_default()).await?;
    Ok(holder_other_than(&claims, &target.object_name(), "ImageBuild", &build.name_any()).map(Claim::label))
}

/// Another writer holds the target image: say so once (condition and Event), look again soon.
async fn wait_for_image(
    build: &ImageBuild,
    context: &Context,
    mut status: ImageBuildStatus,
    holder: &str,
) -> Result<Action> {
    let message = format!(
        "{holder} works on image {} (one shell, save or build at a time per image): this build starts when it ends",
        build.spec.image
    );
    let said = walt_crds::find_condition(&status.conditions, condition_types::COMPLETE)
        .is_some_and(|condition| condition.reason == reasons::IMAGE_BUSY && condition.message == message);
    if !said {
        complete(&mut status, build, false, reasons::IMAGE_BUSY, message.clone());
        write_status(context, build, status).await?;
        context
            .event(build, EventType::Normal, reasons::IMAGE_BUSY, "Wait", message)
            .await;
    }
    Ok(Action::requeue(IMAGE_WAIT_RETRY))
}

/// The end of the build pod's log (`None` when it cannot be read: progress just shows later).
async fn read_log(context: &Context, build: &ImageBuild) -> Option<LogProgress> {
    let pods: Api<Pod> = Api::namespaced(context.client.clone(), &pod_namespace(build));
    let params = LogParams {
        tail_lines: Some(LOG_LINES),
        limit_bytes: Some(64 * 1024),
        ..LogParams::default()
    };
    match pods.logs(&build_pod_name(&build.name_any()), &params).await {
        Ok(log) => Some(LogProgress::of(&log)),
        Err(error) => {
            tracing::debug!(%error, "cannot read the build pod's log yet");
            None
        }
    }
}

/// The cluster node `pod` is scheduled on.
fn node_name(pod: Option<&Pod>) -> Option<String> {
    pod?.spec.as_ref()?.node_name.clone()
}

/// The namespace of a build's pod: its tenant's runtime namespace (pure).
fn pod_namespace(build: &ImageBuild) -> String {
    runtime_namespace(&build.namespace().unwrap_or_default())
}

/// Deletes the build pod (in the runtime namespace; gone already is fine; a pod of that name left by
/// a former build of the same name is no one's, and goes too); `grace` seconds to stop, the pod's own
/// when `None`.
async fn delete_pod(context: &Context, build: &ImageBuild, grace: Option<u32>) -> Result<()> {
    delete_within::<Pod>(
        context,
        &pod_namespace(build),
        &build_pod_name(&build.name_any()),
        grace,
    )
    .await
}

/// Sets the `Complete` condition, stamped with the build's generation and now.
fn complete(
    status: &mut ImageBuildStatus,
    build: &ImageBuild,
    done: bool,
    reason: &str,
    message: impl Into<String>,
) {
    crate::controller::shared::context::set_condition_now(
        &mut status.conditions,
        build,
        condition_types::COMPLETE,
        ConditionStatus::from(done),
        reason,
        message,
    );
}

/// Writes the status when it changed, only onto the version of the build it was decided on (one
/// write per reconcile): a build another write overtook meanwhile (another replica, a watch lagging
/// behind) gets [`Error::Stale`], nothing of this decision is written and the reconcile decides again
/// on its current state. Of a finished build, a Stale after the tag moved means the next reconcile
/// finds the Image it wrote (`walt.dev/built-by`) and records the same result: the same digest, tagged
/// once more, never another one.
async fn write_status(context: &Context, build: &ImageBuild, mut status: ImageBuildStatus) -> Result<()> {
    status.observed_generation = build.metadata.generation;
    if build.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let api: Api<ImageBuild> =
        Api::namespaced(context.client.clone(), &build.namespace().unwrap_or_default());
    context.apply_status_of(&api, build, &status).await?;
    Ok(())
}

/// The target image name (the schema already checked it).
fn target_name(build: &ImageBuild) -> Result<ImageName> {
    ImageName::parse(&build.spec.image).map_err(|error| Error::Invalid(format!("spec.image: {error}")))
}

/// Checks the target (a new image, or `overwrite`; the namespace's own registry path), then creates
/// the build pod pushing into the target's repository under the build's scratch tag.
async fn start(build: &ImageBuild, context: &Context, mut status: ImageBuildStatus) -> Result<Action> {
    let namespace = build.namespace().unwrap_or_default();
    let target = target_name(build)?;
    let (reference, existing) = image_result::target_reference(context, &namespace, &target).await?;
    if existing.is_some() && !build.spec.overwrite {
        let failure = Failure::ImageExists {
            image: target.to_string(),
        };
        return fail(build, context, status, &failure, &LogProgress::default()).await;
    }
    let push_to = format!("{}:{}", repository_of(&reference), scratch_tag(build));
    let paths = context.config.lab_paths();
    let allowed = paths
        .check(&namespace, &reference, Access::Write, "spec.image")
        .and_then(|()| paths.check(&namespace, &push_to, Access::Write, "the build's result"));
    if let Err(refusal) = allowed {
        let failure = Failure::RegistryPathForbidden(refusal);
        return fail(build, context, status, &failure, &LogProgress::default()).await;
    }
    let runtime = match ensure_runtime_namespace(context, &namespace).await {
        Ok(runtime) => runtime,
        Err(Error::Invalid(message)) => {
            let failure = Failure::RuntimeNamespaceRefused(message);
            return fail(build, context, status, &failure, &LogProgress::default()).await;
        }
        Err(error) => return Err(error),
    };
    let registry_host = context.config.registry_host.clone();
    // The Images the Dockerfile's base may be, for the CPU the pod prefers (none read without one).
    let images = if build.spec.base_image.is_some() && build.spec.platform.is_none() {
        images_for(context, &namespace).await?
    } else {
        Vec::new()
    };
    let inputs = BuildPodInputs {
        runtime_image: &context.config.args.shell_image,
        push_to: &push_to,
        insecure_registry: context
            .config
            .args
            .registry_plain_http
            .then_some(registry_host.as_str()),
        user_namespaces: crate::controller::shared::pods::user_namespaces(context).await,
        cache: &context.config.args.shell_cache,
        registry_credentials: ensure_registry_secret(context, &namespace, &runtime).await?,
        architecture: build_architecture(&build.spec, &images),
    };
    let pod = build_pod(build, &inputs);
    let pods: Api<Pod> = Api::namespaced(context.client.clone(), &runtime);
    context.apply(&pods, &pod).await?;
    let pod_name = pod.name_any();
    status.phase = ImageBuildPhase::Building;
    status.pod = Some(pod_name.clone());
    status.pod_namespace = Some(runtime.clone());
    status.start_time = Some(Time(Timestamp::now()));
    let message = format!(
        "build pod {pod_name} in {runtime} ({}) waits for the build context on its standard input (`kubectl walt image build` sends it); the result becomes image {target}",
        if inputs.user_namespaces {
            "user-namespaced"
        } else {
            "privileged"
        }
    );
    complete(
        &mut status,
        build,
        false,
        reasons::WAITING_FOR_CONTEXT,
        message.clone(),
    );
    write_status(context, build, status).await?;
    context
        .event(build, EventType::Normal, reasons::POD_CREATED, "Start", message)
        .await;
    Ok(Action::requeue(PROGRESS_INTERVAL))
}

/// The build runs: what its log says goes into the status, and the cluster node its pod runs on.
async fn progress(
    build: &ImageBuild,
    context: &Context,
    mut status: ImageBuildStatus,
    log: &LogProgress,
    pod: Option<&Pod>,
) -> Result<Action> {
    apply_progress(&mut status, log);
    if let Some(node) = node_name(pod) {
        status.cluster_node = Some(node);
    }
    // The pod outlived a status write: it is this build's.
    status.phase = ImageBuildPhase::Building;
    status.pod = Some(build_pod_name(&build.name_any()));
    status.pod_namespace = Some(pod_namespace(build));
    if log.context_received {
        let message = format!(
            "building image {}: step {}",
            build.spec.image,
            status.step.as_deref().unwrap_or("1")
        );
        complete(&mut status, build, false, reasons::BUILDING, message);
    }
    write_status(context, build, status).await?;
    Ok(Action::requeue(PROGRESS_INTERVAL))
}

/// The build pushed its image by digest: tag it as `spec.image`, create or update the Image (the
/// nodes that boot it reboot), record the result, then delete the pod.
async fn save(
    build: &ImageBuild,
    context: &Context,
    mut status: ImageBuildStatus,
    outcome: &BuildOutcome,
    log: &LogProgress,
    pod: Option<&Pod>,
) -> Result<Action> {
    let namespace = build.namespace().unwrap_or_default();
    let target = target_name(build)?;
    let uid = build.uid().unwrap_or_default();
    apply_progress(&mut status, log);
    let (reference, existing) = image_result::target_reference(context, &namespace, &target).await?;
    let made_here = existing.as_ref().is_some_and(|image| {
        image.annotations().get(BUILT_BY_ANNOTATION).map(String::as_str) == Some(uid.as_str())
    });
    if existing.is_some() && !build.spec.overwrite && !made_here {
        let failure = Failure::ImageExists {
            image: target.to_string(),
        };
        return fail(build, context, status, &failure, log).await;
    }
    if let Err(refusal) =
        context
            .config
            .lab_paths()
            .check(&namespace, &reference, Access::Write, "spec.image")
    {
        return fail(
            build,
            context,
            status,
            &Failure::RegistryPathForbidden(refusal),
            log,
        )
        .await;
    }
    let pushed = format!("{}@{}", repository_of(&outcome.reference), outcome.digest);
    let tagged = async {
        image_result::copy_pushed(context, &pushed, &reference).await?;
        image_result::mark_image_updated(
            context,
            &namespace,
            &target.object_name(),
            &outcome.digest,
            (BUILT_BY_ANNOTATION, &uid),
        )
        .await?;
        image_result::nodes_booting(context, &namespace, &target).await
    }
    .await;
    let rebooting = match tagged {
        Ok(rebooting) => rebooting,
        Err(error) => return fail(build, context, status, &Failure::SaveFailed(error), log).await,
    };
    let cluster_node = scheduled_on(context, pod).await;
    if let Some(node) = node_name(pod) {
        status.cluster_node = Some(node);
    }
    status.phase = ImageBuildPhase::Succeeded;
    status.completion_time = Some(Time(Timestamp::now()));
    status.steps_done = Some(outcome.steps);
    status.steps_total = Some(outcome.steps);
    status.result = Some(ImageBuildResult {
        image: Some(target.to_string()),
        digest: Some(outcome.digest.clone()),
        short_digest: Some(short_digest(&outcome.digest).to_owned()),
        architecture: Some(outcome.architecture.clone()).filter(|a| !a.is_empty()),
        emulated: build_emulated(outcome, cluster_node.as_ref()),
        cached_steps: outcome.cached,
        layers_pushed: outcome.layers_pushed,
    });
    let message = image_result::saved_message("the build is", &target, &outcome.digest, &rebooting);
    complete(&mut status, build, true, reasons::BUILT, message.clone());
    write_status(context, build, status).await?;
    context
        .event(build, EventType::Normal, reasons::BUILT, "Save", message)
        .await;
    delete_pod(context, build, None).await?;
    Ok(Action::await_change())
}

/// A failure: a retryable one keeps the build going (`Complete=False` says why, looked at again); any
/// other ends it `Failed` (the pod goes; nothing was tagged).
async fn fail(
    build: &ImageBuild,
    context: &Context,
    mut status: ImageBuildStatus,
    failure: &Failure,
    log: &LogProgress,
) -> Result<Action> {
    apply_progress(&mut status, log);
    let message = failure.to_string();
    if let Some(after) = failure.retry() {
        complete(&mut status, build, false, failure.reason(), message.clone());
        write_status(context, build, status).await?;
        context
            .event(build, EventType::Warning, failure.reason(), "Save", message)
            .await;
        return Ok(Action::requeue(after));
    }
    status.phase = ImageBuildPhase::Failed;
    status.completion_time = Some(Time(Timestamp::now()));
    complete(&mut status, build, true, failure.reason(), message.clone());
    write_status(context, build, status).await?;
    context
        .event(build, EventType::Warning, failure.reason(), "End", message)
        .await;
    delete_pod(context, build, None).await?;
    Ok(Action::await_change())
}
