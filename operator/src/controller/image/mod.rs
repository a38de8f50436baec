//! Image reconcile: dereference (the lab reference, the pull credentials) → the pure [`decide`]
//! (resolve; clone `spec.source` when the lab registry does not have it; squash on request, once
//! no shell, copy or save holds the image; record the facts) → perform the step → one status write
//! (the statuses are pure, in [`build`]). Failures are [`Failure`]s: each names its reason and how
//! soon to look again.
//!
//! The registry is asked again every `--resolve-interval` (tags move); a
//! failure keeps the last known facts and says why in `Ready=False`.
//!
//! Every status write is conditional on the version of the Image the decision was made on
//! ([`Context::apply_status_of`]); a clone's progress writes go on from the version of the last one
//! ([`follow_own_write`]), so they do not conflict with each other. An Image another write overtook
//! meanwhile (a watch lagging behind, a second replica, a save or build updating it) gets
//! [`Error::Stale`]: nothing of the stale decision is written and the reconcile decides again on the
//! current state. Mid-clone, that stops the copy (no tag moved: the manifest goes last); the next
//! clone finds the blobs already copied and does not send them again. After a squash, it leaves the
//! request unmarked: the next reconcile squashes again, which finds one layer and moves nothing.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use walt_crds::image::reasons;
use walt_crds::{
    CloneProgress, Image, ImageShellMode, ImageStatus, Platform, condition_types, find_condition,
};

pub mod build;
pub mod decide;
pub mod failure;

use self::build::{ImageFacts, cloning_status, failed_status, path_refusal, ready_status, squashed_status};
use self::decide::{Observed, Step, decide};
use self::failure::Failure;
use crate::controller::config::secret_key;
use crate::controller::shared::context::{Context, follow_own_write};
use crate::controller::shared::error::{Error, Result};
use crate::controller::shared::lock::claims_in;
use crate::controller::shared::registry::{lab_reference, registry_client, registry_client_with};
use crate::controller::shared::registry_paths::{Access, REGISTRY_PATH_FORBIDDEN};
use crate::oci::{CommitOptions, CopyProgress, Credentials, RegistryClient, ResolvedImage};
use crate::runtime::changes::human_bytes;

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

/// The credentials in the Image's `spec.pullSecretRef` (a `kubernetes.io/dockerconfigjson` Secret in the
/// Image's namespace), or none.
async fn source_credentials(image: &Image, context: &Context) -> std::result::Result<Credentials, Failure> {
    let Some(secret_ref) = &image.spec.pull_secret_ref else {
        return Ok(Credentials::default());
    };
    let namespace = image.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(context.client.clone(), &namespace);
    let name = secret_ref.name.clone();
    let secret = match secrets.get_opt(&name).await {
        Ok(Some(secret)) => secret,
        Ok(None) => return Err(Failure::PullSecretNotFound { namespace, name }),
        Err(source) => {
            return Err(Failure::PullSecretUnreadable {
                namespace,
                name,
                source,
            });
        }
    };
    let Some(document) = secret_key(&secret, ".dockerconfigjson") else {
        return Err(Failure::PullSecretWithoutConfig { namespace, name });
    };
    Credentials::from_docker_config_json(&document).map_err(|source| Failure::PullSecretInvalid {
        namespace,
        name,
        source,
    })
}

/// How often the status of a running clone is written (at most).
const CLONE_PROGRESS_INTERVAL: Duration = Duration::from_secs(2);

// A little long: one clone, its progress reporter and its Events, kept together so the order
// of what the user sees (Cloning, progress, Cloned or the failure) reads in one place.
/// Copies `source` into `reference`, writing progress into the status while it runs; each write is
/// conditional on the version the last one left (`image`'s resourceVersion follows them). An Image
/// written by anyone else meanwhile stops the copy: [`Error::Stale`] (the outer error).
async fn clone_source(
    image: &mut Image,
    context: &Context,
    client: &RegistryClient,
    source: &str,
    reference: &str,
) -> Result<std::result::Result<CloneProgress, Failure>> {
    let namespace = image.namespace().unwrap_or_default();
    let images: Api<Image> = Api::namespaced(context.client.clone(), &namespace);
    let resolved = match client.resolve(source, wanted_platform(image).as_ref()).await {
        Ok(resolved) => resolved,
        Err(error) => {
            return Ok(Err(Failure::SourceFailed {
                upstream: source.to_owned(),
                source: error,
            }));
        }
    };
    context
        .event(
            image,
            EventType::Normal,
            reasons::CLONING,
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
                    match context.apply_status_of(&images, image, &status).await {
                        Ok(written) => follow_own_write(image, &written),
                        // Dropping the copy abandons it before its manifest: no tag moved.
                        Err(stale @ Error::Stale(_)) => return Err(stale),
                        // Progress is informative: the copy goes on.
                        Err(error) => tracing::info!(%error, "writing clone progress"),
                    }
                }
            }
        }
    };
    let digest = match outcome {
        Ok(digest) => digest,
        Err(error) => {
            return Ok(Err(Failure::CloneFailed {
                upstream: source.to_owned(),
                reference: reference.to_owned(),
                source: error,
            }));
        }
    };
    let total = to_status(*receiver.borrow());
    context
        .event(
            image,
            EventType::Normal,
            reasons::CLONED,
            "Clone",
            format!(
                "{source} copied to {reference} as {digest}: {} in {:.1} s",
                human_bytes(total.total_bytes),
                started.elapsed().as_secs_f64()
            ),
        )
        .await;
    Ok(Ok(CloneProgress {
        copied_bytes: total.total_bytes,
        copied_blobs: total.total_blobs,
        ..total
    }))
}

/// Writes the `Ready=False` status of `failure` (with a Warning Event the first time this message
/// appears) and says when to look again. `reference` is the lab reference, when there is one.
async fn report_failure(
    image: &Image,
    context: &Context,
    reference: Option<&str>,
    failure: &Failure,
) -> Result<Action> {
    let namespace = image.namespace().unwrap_or_default();
    let images: Api<Image> = Api::namespaced(context.client.clone(), &namespace);
    let message = failure.to_string();
    let reason = failure.reason();
    let status = failed_status(image, reference, reason, &message, Timestamp::now());
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
        context.apply_status_of(&images, image, &status).await?;
    }
    Ok(Action::requeue(
        failure.retry(context.config.args.resolve_interval),
    ))
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
    let mode = match client
        .has_init_shell_mode(resolved, &context.shell_helper_layers)
        .await
    {
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
/// happened. On failure the tag did not move.
async fn squash_and_tag(
    client: &RegistryClient,
    resolved: &ResolvedImage,
    reference: &str,
) -> std::result::Result<String, Failure> {
    let layers = resolved.layers.len();
    if layers <= 1 {
        return Ok(format!("{reference} has {layers} layer: nothing to squash"));
    }
    let (repository, tag) =
        crate::runtime::image::split_target(reference).map_err(|source| Failure::SquashPinned {
            reference: reference.to_owned(),
            source,
        })?;
    let mut options = CommitOptions::new("walt image squash");
    options.comment = Some(format!(
        "{layers} layers of {} squashed into one",
        resolved.digest
    ));
    let pushed = client
        .squash(resolved, &repository, options)
        .await
        .map_err(|source| Failure::SquashFailed {
            reference: reference.to_owned(),
            source,
        })?;
    client
        .tag(&repository, &pushed.manifest_digest, &tag)
        .await
        .map_err(|source| Failure::SquashTagFailed {
            pushed: pushed.reference.clone(),
            tag: tag.clone(),
            source,
        })?;
    Ok(format!(
        "{layers} layers squashed into one: {reference} is now {} ({})",
        pushed.manifest_digest,
        human_bytes(pushed.layer_size)
    ))
}

/// Squashes the image into one layer and moves its tag, once per request (the request is marked
/// handled whatever happened); Events say what happened.
async fn squash(
    image: &Image,
    context: &Context,
    client: &RegistryClient,
    resolved: &ResolvedImage,
    reference: &str,
    request: &str,
) -> Result<()> {
    let namespace = image.namespace().unwrap_or_default();
    let allowed =
        context
            .config
            .lab_paths()
            .check(&namespace, reference, Access::Write, "squashing spec.reference");
    let (event_type, reason, message) = match allowed {
        Err(refusal) => (EventType::Warning, REGISTRY_PATH_FORBIDDEN, refusal.message),
        Ok(()) => match squash_and_tag(client, resolved, reference).await {
            Ok(message) => (EventType::Normal, reasons::SQUASHED, message),
            Err(failure) => (EventType::Warning, failure.reason(), failure.to_string()),
        },
    };
    let status = squashed_status(
        image,
        event_type == EventType::Normal,
        reason,
        &message,
        Timestamp::now(),
    );
    let images: Api<Image> = Api::namespaced(context.client.clone(), &namespace);
    context.apply_status_of(&images, image, &status).await?;
    context.event(image, event_type, reason, "Squash", message).await;
    context
        .mark_handled(image, walt_crds::request::SQUASH, request)
        .await?;
    Ok(())
}

/// Who holds the image (a shell, copy or save of its namespace), if anyone.
async fn holder_of(image: &Image, context: &Context) -> Result<Option<String>> {
    let name = image.name_any();
    let claims = claims_in(context, &image.namespace().unwrap_or_default()).await?;
    Ok(claims
        .into_iter()
        .find(|claim| claim.image == name)
        .map(|claim| claim.label()))
}

/// Says (an Event) that a squash waits for `holder`, and when to look again.
async fn wait_for_holder(image: &Image, context: &Context, holder: &str) -> Action {
    context
        .event(
            image,
            EventType::Normal,
            reasons::SQUASH_WAITING,
            "Squash",
            format!("waiting for {holder} to finish before squashing (one shell, save or squash per image)"),
        )
        .await;
    Action::requeue(SQUASH_WAIT)
}

/// Reconciles one Image: dereference (the lab reference, the pull credentials) → [`decide`] →
/// perform the step, until a step ends the reconcile with its one status write.
pub async fn reconcile(mut image: Arc<Image>, context: Arc<Context>) -> Result<Action> {
    let reference = match lab_reference(&image, &context.config.args.lab_registry) {
        Ok(reference) => reference,
        Err(error) => return report_failure(&image, &context, None, &Failure::InvalidReference(error)).await,
    };
    // Registry paths are per tenant: refused before any registry call (the admission policy
    // refuses them first; this holds when it was bypassed or the lab's layout changed).
    if let Some(refusal) = path_refusal(&image, &reference, &context.config.lab_paths()) {
        let failure = Failure::RegistryPathForbidden(refusal);
        return report_failure(&image, &context, Some(&reference), &failure).await;
    }
    let client = match source_credentials(&image, &context).await {
        Ok(_) if image.spec.pull_secret_ref.is_none() => registry_client(&context)?,
        Ok(credentials) => registry_client_with(&context, credentials)?,
        Err(failure) => return report_failure(&image, &context, Some(&reference), &failure).await,
    };
    let interval = context.config.args.resolve_interval;
    let platform = wanted_platform(&image);
    let mut observed = Observed::default();
    let mut cloned = None;
    loop {
        let step = decide(&image, &observed);
        tracing::debug!(step = step.summary(), "image step");
        match step {
            Step::Resolve => {
                observed.lookup = Some(client.resolve(&reference, platform.as_ref()).await.into());
            }
            Step::Clone(source) => {
                let source = source.to_owned();
                // The decision stays the one made on `image`; its version follows the clone's writes.
                let mut version = Image::clone(&image);
                let cloned_now = clone_source(&mut version, &context, &client, &source, &reference).await?;
                image = Arc::new(version);
                match cloned_now {
                    Ok(record) => cloned = Some(record),
                    Err(failure) => {
                        return report_failure(&image, &context, Some(&reference), &failure).await;
                    }
                }
                observed.clone_tried = true;
                observed.lookup = None;
            }
            Step::ReportResolveFailure(error) => {
                let failure = Failure::ResolveFailed {
                    reference: reference.clone(),
                    source: Arc::clone(error),
                };
                return report_failure(&image, &context, Some(&reference), &failure).await;
            }
            Step::FindHolder => observed.holder = Some(holder_of(&image, &context).await?),
            Step::WaitForHolder(holder) => return Ok(wait_for_holder(&image, &context, holder).await),
            Step::Squash { resolved, request } => {
                squash(&image, &context, &client, resolved, &reference, &request).await?;
                // The tag moved (or not): the handled annotation wakes this Image again to resolve it.
                return Ok(Action::requeue(interval));
            }
            Step::RecordReady(resolved) => {
                record_ready(&image, &context, &client, resolved, &reference, cloned).await?;
                return Ok(Action::requeue(interval));
            }
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
    context.apply_status_of(&images, image, &status).await?;
    if image.status.as_ref().and_then(|old| old.digest.as_deref()) != Some(facts.digest.as_str()) {
        let note = format!("{reference} is {}", facts.digest);
        context
            .event(image, EventType::Normal, reasons::RESOLVED, "Resolve", note)
            .await;
    }
    Ok(())
}
