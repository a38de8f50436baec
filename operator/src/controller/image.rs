//! Image controller.
//!
//! Dereference `spec.reference` (or the default `<lab registry>/<namespace>/
//! <name>:<tag>`), clone `spec.source` into it when set and not there yet,
//! resolve it to its digest, platform, labels, layers and size, and report:
//! `Ready=True` with those facts, or `Ready=False` with the registry's own
//! answer (reason `ResolveFailed`, `SourceFailed`, `InvalidReference`…).
//! Tags move, so every Image is resolved again every `--resolve-interval`.
//!
//! `shellMode` (Init/Basic) is decided by peeking at the image's layers for
//! WalT's two executable scripts (top layer first, whiteouts honoured), once
//! per digest; the shell runtime decides again at start in `Auto` mode.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use walt_crds::{
    CloneProgress, ConditionStatus, Image, ImageName, ImageShellMode, ImageStatus, Platform, condition_types,
    new_condition, set_condition, short_digest,
};

use super::error::{Error, Result};
use crate::runtime::changes::human_bytes;

/// Label of the node models an image boots (WalT).
pub const NODE_MODELS_LABEL: &str = "walt.node.models";
/// Annotation that asks for an immediate re-resolve (its value changes
/// each time; the operator sets it after moving the image's tag).
pub const RESOLVE_ANNOTATION: &str = "walt.dev/resolve-requested";

/// Annotation a user (`kubectl walt image squash`) sets to ask for the image's layers to be squashed
/// into one; its value (when it was asked, RFC 3339) changes with each request.
pub const SQUASH_REQUESTED_ANNOTATION: &str = "walt.dev/squash-requested-at";
/// Annotation the operator sets to the [`SQUASH_REQUESTED_ANNOTATION`] value it has handled (done or
/// refused: the Events say which), so each request runs once.
pub const SQUASH_HANDLED_ANNOTATION: &str = "walt.dev/squash-handled-at";

/// The squash request not handled yet, if any (pure).
pub fn pending_squash_request(image: &Image) -> Option<String> {
    let annotations = image.annotations();
    let requested = annotations.get(SQUASH_REQUESTED_ANNOTATION)?.trim();
    let handled = annotations
        .get(SQUASH_HANDLED_ANNOTATION)
        .map(|value| value.trim());
    (!requested.is_empty() && handled != Some(requested)).then(|| requested.to_owned())
}

/// What the registry says about an image.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ImageFacts {
    /// Manifest digest.
    pub digest: String,
    /// Its platform.
    pub platform: Platform,
    /// Its config labels.
    pub labels: BTreeMap<String, String>,
    /// Number of layers.
    pub layers: u32,
    /// Compressed layers + config, in bytes.
    pub size: u64,
    /// Init or basic, when known.
    pub shell_mode: Option<ImageShellMode>,
}

/// The lab reference of an Image: `spec.reference`, else the default
/// `<lab registry>/<namespace>/<name>:<tag>` (pure).
pub fn lab_reference(image: &Image, lab_registry: &str) -> Result<String> {
    if let Some(reference) = image.spec.reference.as_deref().filter(|r| !r.trim().is_empty()) {
        return Ok(reference.trim().to_owned());
    }
    let name = ImageName::from_object_name(&image.name_any()).map_err(|error| {
        Error::Invalid(format!(
            "{error}; the Image object name must be an image name (`name`, or `name.tag` for `name:tag`), or set spec.reference"
        ))
    })?;
    Ok(name.default_reference(lab_registry, &image.namespace().unwrap_or_default()))
}

/// Node models from the `walt.node.models` label (comma list, pure).
pub fn node_models(labels: &BTreeMap<String, String>) -> Vec<String> {
    labels
        .get(NODE_MODELS_LABEL)
        .map(|models| {
            models
                .split(',')
                .map(str::trim)
                .filter(|model| !model.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// The status of a resolved Image (pure). Conditions of `previous` keep their
/// transition times when unchanged.
pub fn ready_status(image: &Image, reference: &str, facts: &ImageFacts, now: Timestamp) -> ImageStatus {
    let mut conditions = image.status.clone().unwrap_or_default().conditions;
    set_condition(
        &mut conditions,
        new_condition(
            condition_types::READY,
            ConditionStatus::True,
            "Resolved",
            format!(
                "{reference} is {} ({}/{}, {} layers)",
                facts.digest, facts.platform.os, facts.platform.architecture, facts.layers
            ),
            image.metadata.generation,
            Time(now),
        ),
    );
    ImageStatus {
        observed_generation: image.metadata.generation,
        reference: Some(reference.to_owned()),
        digest: Some(facts.digest.clone()),
        short_digest: Some(short_digest(&facts.digest).to_owned()),
        platform: Some(facts.platform.clone()),
        node_models: node_models(&facts.labels),
        shell_mode: facts.shell_mode,
        layers: Some(facts.layers),
        size: Some(facts.size),
        // The record of the last clone stays: where the content came from.
        clone: image.status.as_ref().and_then(|status| status.clone.clone()),
        conditions,
    }
}

/// The status of an Image while `spec.source` is copied into `reference` (pure): `Ready=False` with
/// reason `Cloning` and how far the copy is, in the condition and in `clone`.
pub fn cloning_status(
    image: &Image,
    reference: &str,
    source: &str,
    progress: &CloneProgress,
    now: Timestamp,
) -> ImageStatus {
    let message = format!(
        "copying {source} to {reference}: {} of {} blobs, {} of {}",
        progress.copied_blobs,
        progress.total_blobs,
        human_bytes(progress.copied_bytes),
        human_bytes(progress.total_bytes)
    );
    let mut status = failed_status(image, Some(reference), CLONING_REASON, &message, now);
    status.clone = Some(progress.clone());
    status
}

/// Ready=False reason while a clone runs (the plugin waits through it).
pub const CLONING_REASON: &str = "Cloning";

/// The status of an Image that could not be resolved (pure): the last known
/// facts stay (nodes keep booting the last digest), `Ready=False` carries the
/// reason and the registry's answer.
pub fn failed_status(
    image: &Image,
    reference: Option<&str>,
    reason: &str,
    message: &str,
    now: Timestamp,
) -> ImageStatus {
    let mut status = image.status.clone().unwrap_or_default();
    status.observed_generation = image.metadata.generation;
    if let Some(reference) = reference {
        if status.reference.as_deref() != Some(reference) {
            // A different place: the old facts describe another image.
            status = ImageStatus {
                conditions: status.conditions,
                observed_generation: status.observed_generation,
                ..ImageStatus::default()
            };
        }
        status.reference = Some(reference.to_owned());
    }
    set_condition(
        &mut status.conditions,
        new_condition(
            condition_types::READY,
            ConditionStatus::False,
            reason,
            message,
            image.metadata.generation,
            Time(now),
        ),
    );
    status
}

/// `repository@digest` of a resolved Image, from its status (pure).
pub fn pinned_reference_of(image: &Image) -> Option<String> {
    let status = image.status.as_ref()?;
    let digest = status.digest.as_deref()?;
    let reference = status.reference.as_deref()?;
    Some(super::node::pinned_reference(reference, digest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use walt_crds::{ImageSpec, find_condition};

    fn image(name: &str, reference: Option<&str>) -> Image {
        let mut image = Image::new(
            name,
            ImageSpec {
                reference: reference.map(str::to_owned),
                ..ImageSpec::default()
            },
        );
        image.metadata.namespace = Some("alice".into());
        image.metadata.generation = Some(3);
        image
    }

    fn facts() -> ImageFacts {
        ImageFacts {
            digest: "sha256:0123456789abcdef0123".into(),
            platform: Platform {
                os: "linux".into(),
                architecture: "arm64".into(),
                variant: Some("v8".into()),
            },
            labels: BTreeMap::from([(NODE_MODELS_LABEL.to_owned(), "rpi-3-b, rpi-4-b,".to_owned())]),
            layers: 3,
            size: 1234,
            shell_mode: Some(ImageShellMode::Init),
        }
    }

    #[test]
    fn a_squash_request_is_pending_until_its_value_is_handled() {
        let mut image = image("rpi", None);
        assert_eq!(pending_squash_request(&image), None);
        image
            .annotations_mut()
            .insert(SQUASH_REQUESTED_ANNOTATION.into(), "2026-11-22T10:00:00Z".into());
        assert_eq!(
            pending_squash_request(&image).as_deref(),
            Some("2026-11-22T10:00:00Z")
        );
        image
            .annotations_mut()
            .insert(SQUASH_HANDLED_ANNOTATION.into(), "2026-11-22T10:00:00Z".into());
        assert_eq!(pending_squash_request(&image), None);
        image
            .annotations_mut()
            .insert(SQUASH_REQUESTED_ANNOTATION.into(), "2026-11-22T11:00:00Z".into());
        assert_eq!(
            pending_squash_request(&image).as_deref(),
            Some("2026-11-22T11:00:00Z")
        );
    }

    #[test]
    fn default_and_explicit_references() {
        assert_eq!(
            lab_reference(&image("debian", None), "127.0.0.1:5000").expect("valid"),
            "127.0.0.1:5000/alice/debian:latest"
        );
        assert_eq!(
            lab_reference(&image("debian.v2", None), "reg.lab/walt").expect("valid"),
            "reg.lab/walt/alice/debian:v2"
        );
        assert_eq!(
            lab_reference(&image("x", Some("other.lab/y:1")), "reg").expect("valid"),
            "other.lab/y:1"
        );
        let error = lab_reference(&image("default", None), "reg").unwrap_err();
        assert!(matches!(error, Error::Invalid(_)));
    }

    #[test]
    fn ready_status_reports_the_facts() {
        let status = ready_status(
            &image("debian", None),
            "r/alice/debian:latest",
            &facts(),
            Timestamp::UNIX_EPOCH,
        );
        assert_eq!(status.digest.as_deref(), Some("sha256:0123456789abcdef0123"));
        assert_eq!(status.short_digest.as_deref(), Some("0123456789ab"));
        assert_eq!(status.node_models, ["rpi-3-b", "rpi-4-b"]);
        assert_eq!(status.layers, Some(3));
        assert_eq!(status.observed_generation, Some(3));
        assert_eq!(status.shell_mode, Some(ImageShellMode::Init));
        let ready = find_condition(&status.conditions, "Ready").expect("Ready");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("True", "Resolved")
        );
    }

    #[test]
    fn failure_keeps_the_last_digest_of_the_same_reference() {
        let mut img = image("debian", None);
        img.status = Some(ready_status(&img, "r/a:latest", &facts(), Timestamp::UNIX_EPOCH));
        let status = failed_status(
            &img,
            Some("r/a:latest"),
            "ResolveFailed",
            "503 Service Unavailable",
            Timestamp::UNIX_EPOCH,
        );
        assert_eq!(status.digest.as_deref(), Some("sha256:0123456789abcdef0123"));
        let ready = find_condition(&status.conditions, "Ready").expect("Ready");
        assert_eq!(
            (ready.status.as_str(), ready.message.as_str()),
            ("False", "503 Service Unavailable")
        );
        let moved = failed_status(
            &img,
            Some("r/b:latest"),
            "ResolveFailed",
            "404",
            Timestamp::UNIX_EPOCH,
        );
        assert_eq!(moved.digest, None);
        assert_eq!(moved.reference.as_deref(), Some("r/b:latest"));
    }
}
