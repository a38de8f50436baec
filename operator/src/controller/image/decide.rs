//! The pure decision of an Image reconcile: from the Image and what the reconcile has observed so
//! far (the lab registry's answer, whether a clone was tried, who holds the image), [`decide`]
//! says the next step. The reconcile ([`super::reconcile`]) performs it, records what it learned
//! in [`Observed`], and asks again until a step ends the reconcile.

use std::sync::Arc;

use walt_crds::Image;

use super::build::pending_squash_request;
use crate::oci::ResolvedImage;

/// What the lab registry answered for the Image's reference.
#[derive(Debug)]
pub enum Lookup {
    /// The reference resolved.
    Found(Box<ResolvedImage>),
    /// The registry does not have it.
    NotFound(Arc<crate::oci::Error>),
    /// The registry failed to answer.
    Failed(Arc<crate::oci::Error>),
}

impl From<Result<ResolvedImage, crate::oci::Error>> for Lookup {
    fn from(answer: Result<ResolvedImage, crate::oci::Error>) -> Self {
        match answer {
            Ok(resolved) => Lookup::Found(Box::new(resolved)),
            Err(error) if error.is_not_found() => Lookup::NotFound(Arc::new(error)),
            Err(error) => Lookup::Failed(Arc::new(error)),
        }
    }
}

/// The facts one reconcile has gathered so far.
#[derive(Debug, Default)]
pub struct Observed {
    /// The lab registry's answer (None: not asked yet, or asked again after a clone).
    pub lookup: Option<Lookup>,
    /// `spec.source` was already copied (or tried) in this reconcile.
    pub clone_tried: bool,
    /// Who holds the image (a shell, copy or save), once looked for: `Some(None)` is nobody.
    pub holder: Option<Option<String>>,
}

/// What the reconcile does next.
#[derive(Debug)]
pub enum Step<'a> {
    /// Ask the lab registry what the reference is.
    Resolve,
    /// Copy `spec.source` (this one) into the lab registry: the reference is not there yet.
    Clone(&'a str),
    /// The registry did not resolve the reference: `Ready=False` with its words.
    ReportResolveFailure(&'a Arc<crate::oci::Error>),
    /// A squash is requested: find out whether a shell, copy or save holds the image.
    FindHolder,
    /// A squash is requested but this holder works on the image: look again later.
    WaitForHolder(&'a str),
    /// Squash the image and move its tag, then mark this request handled.
    Squash {
        /// The resolved image.
        resolved: &'a ResolvedImage,
        /// The request annotation's value.
        request: String,
    },
    /// Write `Ready=True` with the facts of the resolved image.
    RecordReady(&'a ResolvedImage),
}

impl Step<'_> {
    /// The step's name and the digest it is about, for the log (a resolved image's whole
    /// manifest and config do not belong in every line).
    pub fn summary(&self) -> String {
        match self {
            Step::Resolve => "Resolve".into(),
            Step::Clone(source) => format!("Clone from {source}"),
            Step::ReportResolveFailure(error) => format!("ReportResolveFailure: {error}"),
            Step::FindHolder => "FindHolder".into(),
            Step::WaitForHolder(holder) => format!("WaitForHolder {holder}"),
            Step::Squash { resolved, .. } => format!("Squash {}", resolved.digest),
            Step::RecordReady(resolved) => format!("RecordReady {}", resolved.digest),
        }
    }
}

/// Decides the next step of `image`'s reconcile (pure).
pub fn decide<'a>(image: &'a Image, observed: &'a Observed) -> Step<'a> {
    let resolved = match &observed.lookup {
        None => return Step::Resolve,
        Some(Lookup::NotFound(error)) => {
            return match (image.spec.source.as_deref(), observed.clone_tried) {
                (Some(source), false) => Step::Clone(source),
                _ => Step::ReportResolveFailure(error),
            };
        }
        Some(Lookup::Failed(error)) => return Step::ReportResolveFailure(error),
        Some(Lookup::Found(resolved)) => resolved,
    };
    let Some(request) = pending_squash_request(image) else {
        return Step::RecordReady(resolved);
    };
    match &observed.holder {
        None => Step::FindHolder,
        Some(Some(holder)) => Step::WaitForHolder(holder),
        Some(None) => Step::Squash { resolved, request },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use walt_crds::ImageSpec;

    fn image(source: Option<&str>, squash: Option<&str>) -> Image {
        let mut image = Image::new(
            "debian",
            ImageSpec {
                source: source.map(str::to_owned),
                ..ImageSpec::default()
            },
        );
        if let Some(request) = squash {
            image.metadata.annotations.get_or_insert_default().insert(
                walt_crds::request::SQUASH.requested.to_owned(),
                request.to_owned(),
            );
        }
        image
    }

    fn resolved() -> ResolvedImage {
        ResolvedImage {
            registry: "127.0.0.1:5000".into(),
            repository: "lab/alice/debian".into(),
            digest: "sha256:abc".into(),
            index_digest: None,
            platform: crate::oci::Platform {
                os: "linux".into(),
                architecture: "arm64".into(),
                variant: None,
            },
            labels: std::collections::BTreeMap::new(),
            layers: Vec::new(),
            diff_ids: Vec::new(),
            size: 0,
            config: serde_json::Value::Null,
            config_digest: "sha256:def".into(),
            manifest: serde_json::Value::Null,
        }
    }

    fn found() -> Lookup {
        Lookup::Found(Box::new(resolved()))
    }

    fn not_found() -> Lookup {
        Lookup::NotFound(Arc::new(crate::oci::Error::Internal("404".into())))
    }

    #[test]
    fn first_the_registry_is_asked() {
        assert!(matches!(
            decide(&image(None, None), &Observed::default()),
            Step::Resolve
        ));
    }

    #[test]
    fn a_missing_image_with_a_source_is_cloned_once_then_reported() {
        let with_source = image(Some("docker.io/library/debian:12"), None);
        let missing = Observed {
            lookup: Some(not_found()),
            ..Observed::default()
        };
        assert!(matches!(
            decide(&with_source, &missing),
            Step::Clone("docker.io/library/debian:12")
        ));
        let after_clone = Observed {
            clone_tried: true,
            ..missing
        };
        assert!(matches!(
            decide(&with_source, &after_clone),
            Step::ReportResolveFailure(_)
        ));
        let without_source = Observed {
            lookup: Some(not_found()),
            ..Observed::default()
        };
        assert!(matches!(
            decide(&image(None, None), &without_source),
            Step::ReportResolveFailure(_)
        ));
    }

    #[test]
    fn a_registry_failure_is_reported_without_cloning() {
        let failed = Observed {
            lookup: Some(Lookup::Failed(Arc::new(crate::oci::Error::Internal(
                "503".into(),
            )))),
            ..Observed::default()
        };
        assert!(matches!(
            decide(&image(Some("docker.io/x:1"), None), &failed),
            Step::ReportResolveFailure(_)
        ));
    }

    #[test]
    fn a_resolved_image_is_recorded_ready() {
        let observed = Observed {
            lookup: Some(found()),
            ..Observed::default()
        };
        assert!(matches!(
            decide(&image(None, None), &observed),
            Step::RecordReady(resolved) if resolved.digest == "sha256:abc"
        ));
    }

    #[test]
    fn a_squash_waits_for_the_holder_then_runs() {
        let requested = image(None, Some("2026-12-05T10:00:00Z"));
        let mut observed = Observed {
            lookup: Some(found()),
            ..Observed::default()
        };
        assert!(matches!(decide(&requested, &observed), Step::FindHolder));
        observed.holder = Some(Some("ShellSession s1".into()));
        assert!(matches!(
            decide(&requested, &observed),
            Step::WaitForHolder("ShellSession s1")
        ));
        observed.holder = Some(None);
        assert!(matches!(
            decide(&requested, &observed),
            Step::Squash { request, .. } if request == "2026-12-05T10:00:00Z"
        ));
    }
}
