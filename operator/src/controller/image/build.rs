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
use walt_crds::{
    CloneProgress, ConditionStatus, Image, ImageShellMode, ImageStatus, Platform, condition_types,
    new_condition, set_condition, short_digest,
};

use kube::ResourceExt;

use crate::controller::shared::registry_paths::{Access, LabPaths, Refusal};
use crate::runtime::changes::human_bytes;

/// Label of the node models an image boots (WalT).
pub const NODE_MODELS_LABEL: &str = "walt.node.models";
/// The squash request not handled yet, if any (pure).
pub fn pending_squash_request(image: &Image) -> Option<String> {
    walt_crds::request::SQUASH.pending(&image.metadata)
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

/// The status after a squash request was handled (pure): the `Squashed` condition says whether it
/// was carried out, and why not.
pub fn squashed_status(
    image: &Image,
    done: bool,
    reason: &str,
    message: &str,
    now: Timestamp,
) -> ImageStatus {
    let mut status = image.status.clone().unwrap_or_default();
    let state = if done {
        ConditionStatus::True
    } else {
        ConditionStatus::False
    };
    set_condition(
        &mut status.conditions,
        new_condition(
            condition_types::SQUASHED,
            state,
            reason,
            message,
            image.metadata.generation,
            Time(now),
        ),
    );
    status
}

/// Whether the Image's registry paths are its namespace's to use (pure): `spec.reference` is read
/// (resolved, booted, shelled from); with `spec.source` the reference is also written (the clone
/// lands there) and the source is read. The refusal names the field and what to do.
pub fn path_refusal(image: &Image, reference: &str, paths: &LabPaths) -> Option<Refusal> {
    let namespace = image.namespace().unwrap_or_default();
    let mut checks = vec![(reference, Access::Read, "spec.reference")];
    if let Some(source) = image.spec.source.as_deref() {
        checks.push((source, Access::Read, "spec.source"));
        checks.push((
            reference,
            Access::Write,
            "spec.reference (where spec.source is cloned to)",
        ));
    }
    checks
        .into_iter()
        .find_map(|(reference, access, what)| paths.check(&namespace, reference, access, what).err())
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
