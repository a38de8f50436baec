//! Image reconcile: dereference (the lab reference) → clone `spec.source`
//! into it when the lab registry does not have it → resolve at the registry
//! (and, once per digest, the image-shell mode) → status (pure, in
//! [`build`]).
//!
//! The registry is asked again every `--resolve-interval` (tags move); a
//! failure keeps the last known facts and says why in `Ready=False`.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use walt_crds::{
    CloneProgress, Image, ImageShellMode, ImageStatus, Platform, condition_types, find_condition,
};

pub mod build;

use self::build::{ImageFacts, cloning_status, failed_status, pending_squash_request, ready_status};
use crate::controller::config::secret_key;
use crate::controller::shared::context::Context;
use crate::controller::shared::error::Result;
use crate::controller::shared::lock::claims_in;
use crate::controller::shared::registry::{lab_reference, registry_client, registry_client_with};
use crate::oci::{CommitOptions, CopyProgress, Credentials, RegistryClient, ResolvedImage};
use crate::runtime::changes::human_bytes;

/// How soon an Image whose reference is invalid is looked at again (the
/// object changing wakes it earlier).
const INVALID_RETRY: Duration = Duration::from_mins(10);
/// How soon a failed clone is tried again (blobs already copied are not copied twice).
const CLONE_RETRY: Duration = Duration::from_secs(30);

/// The facts the status needs, from what the registry answered (pure).
pub fn facts_of(resolved: ResolvedImage) -> ImageFacts {
    ImageFacts {
        digest: resolved.digest,
        platform: Platform {
            os: resolved.platform.os,
            architecture: resolved.platform.architecture,
            variant: resolved.platform.variant,
        },
        labels: resolved.labels,
        layers: u32::try_from(resolved.layers.len()).unwrap_or(u32::MAX),
        size: resolved.size,
        shell_mode: None,
    }
}

/// The platform an Image asks for, in the registry client's terms (pure).
fn wanted_platform(image: &Image) -> Option<crate::oci::Platform> {
    image.spec.platform.as_ref().map(|platform| crate::oci::Platform {
        os: platform.os.clone(),
        architecture: platform.architecture.clone(),
        variant: platform.variant.clone(),
    })
}

/// Whether two statuses say the same thing (condition times aside), so an
/// unchanged resolve writes nothing and does not wake the watch again.
fn same_status(old: Option<&ImageStatus>, new: &ImageStatus) -> bool {
    let Some(old) = old else { return false };
    let ready = |status: &ImageStatus| {
        find_condition(&status.conditions, condition_types::READY).map(|condition| {
            (
                condition.status.clone(),
                condition.reason.clone(),
                condition.message.clone(),
            )
        })
    };
    let strip = |status: &ImageStatus| ImageStatus {
        conditions: Vec::new(),
        ..status.clone()
    };
    strip(old) == strip(new) && ready(old) == ready(new)
}

/// Why a clone did not happen: a reason for `Ready=False` and a message a person can act on.
struct CloneFailure {
    reason: &'static str,
    message: String,
}

/// The credentials in the Image's `spec.pullSecretRef` (a `kubernetes.io/dockerconfigjson` Secret in the
/// Image's namespace), or none.
async fn source_credentials(
    image: &Image,
    context: &Context,
) -> std::result::Result<Credentials, CloneFailure> {
    let Some(secret_ref) = &image.spec.pull_secret_ref else {
        return Ok(Credentials::default());
    };
    let namespace = image.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(context.client.clone(), &namespace);
    let name = &secret_ref.name;
    let secret = secrets.get_opt(name).await.map_err(|error| CloneFailure {
        reason: "PullSecretUnreadable",
        message: format!("reading Secret {namespace}/{name} (spec.pullSecretRef): {error}"),
    })?;
    let Some(secret) = secret else {
        return Err(CloneFailure {
            reason: "PullSecretNotFound",
            message: format!(
                "Secret {namespace}/{name} (spec.pullSecretRef) does not exist: create it with `kubectl -n {namespace} create secret docker-registry {name} --docker-server=… --docker-username=… --docker-password=…`"
            ),
        });
    };
    let document = secret_key(&secret, ".dockerconfigjson").ok_or_else(|| CloneFailure {
        reason: "PullSecretInvalid",
        message: format!(
            "Secret {namespace}/{name} (spec.pullSecretRef) has no `.dockerconfigjson` key: it must be of type kubernetes.io/dockerconfigjson"
        ),
    })?;
    Credentials::from_docker_config_json(&document).map_err(|error| CloneFailure {
        reason: "PullSecretInvalid",
        message: format!("Secret {namespace}/{name} (spec.pullSecretRef): {error}"),
    })
}

/// How often the status of a running clone is written (at most).
const CLONE_PROGRESS_INTERVAL: Duration = Duration::from_secs(2);

// A little long: one clone, its progress reporter and its Events, kept together so the order
// of what the user sees (Cloning, progress, Cloned or the failure) reads in one place.
/// Copies `source` into `reference`, writing progress into the status while it runs.
async fn clone_source(
    image: &Image,
    context: &Context,
    client: &RegistryClient,
    source: &str,
    reference: &str,
) -> std::result::Result<CloneProgress, CloneFailure> {
    let namespace = image.namespace().unwrap_or_default();
    let name = image.name_any();
    let images: Api<Image> = Api::namespaced(context.client.clone(), &namespace);
    let resolved = client
        .resolve(source, wanted_platform(image).as_ref())
        .await
        .map_err(|error| CloneFailure {
            reason: "SourceFailed",
            message: format!("cloning spec.source {source}: {error}"),
        })?;
    context
        .event(
            image,
            EventType::Normal,
            "Cloning",
            "Clone",
            format!(
                "copying {source} ({}, {}/{}, {} layers, {}) to {reference}",
                resolved.digest,
                resolved.platform.os,
                resolved.platform.architecture,
                resolved.layers.len(),
                human_bytes(resolved.size)
            ),
        )
        .await;
    let started = std::time::Instant::now();
    let (sender, mut receiver) = tokio::sync::watch::channel(CopyProgress::default());
    let copy = client.copy_image(&resolved, reference, move |progress| {
        sender.send_replace(progress);
    });
    tokio::pin!(copy);
    let mut ticker = tokio::time::interval(CLONE_PROGRESS_INTERVAL);
    let to_status = |progress: CopyProgress| CloneProgress {
        source_digest: Some(resolved.digest.clone()),
        copied_bytes: progress.copied_bytes,
        total_bytes: progress.total_bytes,
        copied_blobs: progress.copied_blobs,
        total_blobs: progress.total_blobs,
    };
    let outcome = loop {
        tokio::select! {
            outcome = &mut copy => break outcome,
            _ = ticker.tick() => {
                if receiver.has_changed().unwrap_or(false) {
                    let progress = to_status(*receiver.borrow_and_update());
                    let status = cloning_status(image, reference, source, &progress, Timestamp::now());
                    if let Err(error) = context.apply_status(&images, &name, &status).await {
                        // Progress is informative: the copy goes on.
                        tracing::info!(%error, "writing clone progress");
                    }
                }
            }
        }
    };
    let digest = outcome.map_err(|error| CloneFailure {
        reason: "CloneFailed",
        message: format!("copying {source} to {reference}: {error} (nothing was tagged; it is retried)"),
    })?;
    let total = to_status(*receiver.borrow());
    context
        .event(
            image,
            EventType::Normal,
            "Cloned",
            "Clone",
            format!(
                "{source} copied to {reference} as {digest}: {} in {:.1} s",
                human_bytes(total.total_bytes),
                started.elapsed().as_secs_f64()
            ),
        )
        .await;
    Ok(CloneProgress {
        copied_bytes: total.total_bytes,
        copied_blobs: total.total_blobs,
        ..total
    })
}

/// Writes a `Ready=False` status (with an Event the first time this message appears).
async fn report_failure(
    image: &Image,
    context: &Context,
    reference: &str,
    reason: &str,
    message: String,
) -> Result<()> {
    let namespace = image.namespace().unwrap_or_default();
    let images: Api<Image> = Api::namespaced(context.client.clone(), &namespace);
    let status = failed_status(image, Some(reference), reason, &message, Timestamp::now());
    let was_failing = image
        .status
        .as_ref()
        .and_then(|status| find_condition(&status.conditions, condition_types::READY))
        .is_some_and(|ready| ready.status == "False" && ready.message == message);
    if !was_failing {
        context
            .event(image, EventType::Warning, reason, "Resolve", message)
            .await;
    }
    if !same_status(image.status.as_ref(), &status) {
        context.apply_status(&images, &image.name_any(), &status).await?;
    }
    Ok(())
}

/// How many digests' shell modes the operator remembers (a few hundred bytes each).
const SHELL_MODE_CACHE: usize = 20_000;

/// The image-shell mode of `resolved`: kept from the status when the digest did not change, else
/// remembered for the digest, else read from the layers (an unreadable answer leaves it unknown; the
/// shell decides at start).
async fn shell_mode(
    image: &Image,
    context: &Context,
    client: &RegistryClient,
    resolved: &ResolvedImage,
) -> Option<ImageShellMode> {
    let known = image
        .status
        .as_ref()
        .filter(|status| status.digest.as_deref() == Some(resolved.digest.as_str()))
        .and_then(|status| status.shell_mode);
    if known.is_some() {
        return known;
    }
    let remembered = context
        .shell_modes
        .lock()
        .ok()
        .and_then(|modes| modes.get(&resolved.digest).copied());
    if remembered.is_some() {
        return remembered;
    }
    let mode = match client.has_init_shell_mode(resolved).await {
        Ok(true) => ImageShellMode::Init,
        Ok(false) => ImageShellMode::Basic,
        Err(error) => {
            tracing::info!(%error, "image-shell mode left unknown");
            return None;
        }
    };
    if let Ok(mut modes) = context.shell_modes.lock() {
        if modes.len() >= SHELL_MODE_CACHE {
            modes.clear();
        }
        modes.insert(resolved.digest.clone(), mode);
    }
    Some(mode)
}

/// How soon a squash waiting for a shell or save on the image looks again.
const SQUASH_WAIT: Duration = Duration::from_secs(10);

/// Squashes `resolved` into one layer and moves the tag of `reference` to it; the message says what
/// happened (Ok) or what went wrong and that the tag did not move (Err).
async fn squash_and_tag(
    client: &RegistryClient,
    resolved: &ResolvedImage,
    reference: &str,
) -> std::result::Result<String, String> {
    let layers = resolved.layers.len();
    if layers <= 1 {
        return Ok(format!("{reference} has {layers} layer: nothing to squash"));
    }
    let (repository, tag) = crate::runtime::image::split_target(reference)
        .map_err(|error| format!("{reference} cannot be squashed in place: {error}"))?;
    let mut options = CommitOptions::new("walt image squash");
    options.comment = Some(format!(
        "{layers} layers of {} squashed into one",
        resolved.digest
    ));
    let pushed = client
        .squash(resolved, &repository, options)
        .await
        .map_err(|error| format!("squashing {reference}: {error} (the tag was not moved)"))?;
    client
        .tag(&repository, &pushed.manifest_digest, &tag)
        .await
        .map_err(|error| {
            format!(
                "squashed into {}, but moving tag {tag} failed: {error}",
                pushed.reference
            )
        })?;
    Ok(format!(
        "{layers} layers squashed into one: {reference} is now {} ({})",
        pushed.manifest_digest,
        human_bytes(pushed.layer_size)
    ))
}

/// Squashes the image into one layer and moves its tag, once per request; Events say what happened.
/// Returns when to look again if it must wait for a shell or a save.
async fn squash(
    image: &Image,
    context: &Context,
    client: &RegistryClient,
    resolved: &ResolvedImage,
    reference: &str,
    request: &str,
) -> Result<Option<Duration>> {
    let name = image.name_any();
    let holder = claims_in(context, &image.namespace().unwrap_or_default())
        .await?
        .into_iter()
        .find(|claim| claim.image == name);
    if let Some(holder) = holder {
        context
            .event(
                image,
                EventType::Normal,
                "SquashWaiting",
                "Squash",
                format!(
                    "waiting for {} to finish before squashing (one shell, save or squash per image)",
                    holder.label()
                ),
            )
            .await;
        return Ok(Some(SQUASH_WAIT));
    }
    let (event_type, reason, message) = match squash_and_tag(client, resolved, reference).await {
        Ok(message) => (EventType::Normal, "Squashed", message),
        Err(message) => (EventType::Warning, "SquashFailed", message),
    };
    context.event(image, event_type, reason, "Squash", message).await;
    context
        .mark_handled(image, walt_crds::request::SQUASH, request)
        .await?;
    Ok(None)
}

/// Reconciles one Image.
pub async fn reconcile(image: Arc<Image>, context: Arc<Context>) -> Result<Action> {
    let namespace = image.namespace().unwrap_or_default();
    let name = image.name_any();
    let images: Api<Image> = Api::namespaced(context.client.clone(), &namespace);
    let interval = context.config.args.resolve_interval;
    let reference = match lab_reference(&image, &context.config.args.lab_registry) {
        Ok(reference) => reference,
        Err(error) => {
            let status = failed_status(
                &image,
                None,
                "InvalidReference",
                &error.to_string(),
                Timestamp::now(),
            );
            if !same_status(image.status.as_ref(), &status) {
                context.apply_status(&images, &name, &status).await?;
            }
            return Ok(Action::requeue(INVALID_RETRY));
        }
    };
    let source_credentials = match source_credentials(&image, &context).await {
        Ok(credentials) => credentials,
        Err(failure) => {
            report_failure(&image, &context, &reference, failure.reason, failure.message).await?;
            return Ok(Action::requeue(INVALID_RETRY));
        }
    };
    let client = if image.spec.pull_secret_ref.is_none() {
        registry_client(&context)?
    } else {
        registry_client_with(&context, source_credentials)?
    };
    let (resolved, cloned) = match resolve_or_clone(&image, &context, &client, &reference).await? {
        Ok(found) => found,
        Err(retry) => return Ok(Action::requeue(retry)),
    };
    if let Some(request) = pending_squash_request(&image) {
        if let Some(wait) = squash(&image, &context, &client, &resolved, &reference, &request).await? {
            return Ok(Action::requeue(wait));
        }
        // The tag moved (or not): the handled annotation wakes this Image again to resolve it.
        return Ok(Action::requeue(interval));
    }
    record_ready(&image, &context, &client, &resolved, &reference, cloned).await?;
    Ok(Action::requeue(interval))
}

/// Resolves the Image at the lab registry; when it is not there and it has a `source`, clones it
/// first. A failure is reported on the Image; `Err` then says when to try again.
async fn resolve_or_clone(
    image: &Image,
    context: &Context,
    client: &RegistryClient,
    reference: &str,
) -> Result<std::result::Result<(ResolvedImage, Option<CloneProgress>), Duration>> {
    let platform = wanted_platform(image);
    let mut resolved = client.resolve(reference, platform.as_ref()).await;
    let mut cloned = None;
    if let (Err(error), Some(source)) = (&resolved, image.spec.source.as_deref())
        && error.is_not_found()
    {
        match clone_source(image, context, client, source, reference).await {
            Ok(record) => cloned = Some(record),
            Err(failure) => {
                report_failure(image, context, reference, failure.reason, failure.message).await?;
                return Ok(Err(CLONE_RETRY));
            }
        }
        resolved = client.resolve(reference, platform.as_ref()).await;
    }
    match resolved {
        Ok(resolved) => Ok(Ok((resolved, cloned))),
        Err(error) => {
            let message = format!("resolving {reference}: {error}");
            report_failure(image, context, reference, "ResolveFailed", message).await?;
            Ok(Err(context.config.args.resolve_interval))
        }
    }
}

/// Writes the `Ready` status of a resolved Image (its facts, its shell mode, the record of a clone
/// just made) when it says something new, with a `Resolved` Event when the digest moved.
async fn record_ready(
    image: &Image,
    context: &Context,
    client: &RegistryClient,
    resolved: &ResolvedImage,
    reference: &str,
    cloned: Option<CloneProgress>,
) -> Result<()> {
    let mut facts = facts_of(resolved.clone());
    facts.shell_mode = shell_mode(image, context, client, resolved).await;
    let mut status = ready_status(image, reference, &facts, Timestamp::now());
    if cloned.is_some() {
        // The record of this clone stays in the status (ready_status keeps the previous one).
        status.clone = cloned;
    }
    if same_status(image.status.as_ref(), &status) {
        return Ok(());
    }
    let images: Api<Image> = Api::namespaced(context.client.clone(), &image.namespace().unwrap_or_default());
    context.apply_status(&images, &image.name_any(), &status).await?;
    if image.status.as_ref().and_then(|old| old.digest.as_deref()) != Some(facts.digest.as_str()) {
        let note = format!("{reference} is {}", facts.digest);
        context
            .event(image, EventType::Normal, "Resolved", "Resolve", note)
            .await;
    }
    Ok(())
}
