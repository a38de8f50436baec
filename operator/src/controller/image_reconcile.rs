//! Image reconcile: dereference (the lab reference) → resolve at the
//! registry → status (pure, in [`super::image`]).
//!
//! The registry is asked again every `--resolve-interval` (tags move); a
//! failure keeps the last known facts and says why in `Ready=False`.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use walt_crds::{Image, ImageStatus, Platform, condition_types, find_condition};

use super::context::Context;
use super::error::{Error, Result};
use super::image::{ImageFacts, failed_status, lab_reference, ready_status};
use crate::oci::{ClientOptions, Credentials, RegistryClient, ResolvedImage};

/// How soon an Image whose reference is invalid is looked at again (the
/// object changing wakes it earlier).
const INVALID_RETRY: Duration = Duration::from_mins(10);

/// The registry client for the lab registry: its credentials, plain HTTP
/// when `--registry-plain-http`.
pub(super) fn registry_client(context: &Context) -> Result<RegistryClient> {
    let host = &context.config.registry_host;
    let credentials = match &context.config.registry_credentials {
        Some(credentials) => {
            Credentials::default().with_basic(host, &credentials.username, &credentials.password)
        }
        None => Credentials::default(),
    };
    let insecure_registries = if context.config.args.registry_plain_http {
        vec![host.clone()]
    } else {
        Vec::new()
    };
    RegistryClient::new(ClientOptions {
        credentials,
        insecure_registries,
    })
    .map_err(|error| Error::Registry(format!("creating the client of the lab registry {host}: {error}")))
}

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
    let client = registry_client(&context)?;
    let resolved = client.resolve(&reference, wanted_platform(&image).as_ref()).await;
    let status = match resolved {
        Ok(resolved) => ready_status(&image, &reference, &facts_of(resolved), Timestamp::now()),
        Err(error) => {
            let (reason, message) = match image.spec.source.as_deref() {
                Some(source) => (
                    "SourceNotSupported",
                    format!(
                        "{reference} cannot be resolved ({error}), and cloning spec.source {source} into it is not supported yet: copy it there yourself (e.g. `skopeo copy docker://{source} docker://{reference}`)"
                    ),
                ),
                None => ("ResolveFailed", format!("resolving {reference}: {error}")),
            };
            let status = failed_status(&image, Some(&reference), reason, &message, Timestamp::now());
            let was_failing = image
                .status
                .as_ref()
                .and_then(|status| find_condition(&status.conditions, condition_types::READY))
                .is_some_and(|ready| ready.status == "False" && ready.message == message);
            if !was_failing {
                context
                    .event(&*image, EventType::Warning, reason, "Resolve", message)
                    .await;
            }
            status
        }
    };
    if !same_status(image.status.as_ref(), &status) {
        context.apply_status(&images, &name, &status).await?;
        if let Some(digest) = status.digest.as_deref()
            && image.status.as_ref().and_then(|old| old.digest.as_deref()) != Some(digest)
            && find_condition(&status.conditions, condition_types::READY)
                .is_some_and(|ready| ready.status == "True")
        {
            context
                .event(
                    &*image,
                    EventType::Normal,
                    "Resolved",
                    "Resolve",
                    format!("{reference} is {digest}"),
                )
                .await;
        }
    }
    Ok(Action::requeue(interval))
}
