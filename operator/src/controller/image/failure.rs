//! Why an Image is not `Ready` (or a squash did not happen): one error type for the kind, each
//! variant carrying its source, its reason constant and how soon to try again.

use std::time::Duration;

use walt_crds::image::reasons;

use crate::controller::shared::error::Error;

/// How soon an Image whose reference or pull Secret is wrong is looked at again (the object
/// changing wakes it earlier).
pub const INVALID_RETRY: Duration = Duration::from_mins(10);
/// How soon a failed clone is tried again (blobs already copied are not copied twice).
pub const CLONE_RETRY: Duration = Duration::from_secs(30);

/// Why an Image could not be resolved, cloned or squashed.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// `spec.reference` (or the name) does not make a usable reference.
    #[error("{0}")]
    InvalidReference(#[source] Error),
    /// The pull Secret could not be read.
    #[error("reading Secret {namespace}/{name} (spec.pullSecretRef): {source}")]
    PullSecretUnreadable {
        /// The Image's namespace.
        namespace: String,
        /// The Secret's name.
        name: String,
        /// The API error.
        source: kube::Error,
    },
    /// The pull Secret does not exist.
    #[error(
        "Secret {namespace}/{name} (spec.pullSecretRef) does not exist: create it with `kubectl -n {namespace} create secret docker-registry {name} --docker-server=… --docker-username=… --docker-password=…`"
    )]
    PullSecretNotFound {
        /// The Image's namespace.
        namespace: String,
        /// The Secret's name.
        name: String,
    },
    /// The pull Secret has no Docker config.
    #[error(
        "Secret {namespace}/{name} (spec.pullSecretRef) has no `.dockerconfigjson` key: it must be of type kubernetes.io/dockerconfigjson"
    )]
    PullSecretWithoutConfig {
        /// The Image's namespace.
        namespace: String,
        /// The Secret's name.
        name: String,
    },
    /// The pull Secret's Docker config is not usable.
    #[error("Secret {namespace}/{name} (spec.pullSecretRef): {source}")]
    PullSecretInvalid {
        /// The Image's namespace.
        namespace: String,
        /// The Secret's name.
        name: String,
        /// What is wrong with it.
        source: crate::oci::Error,
    },
    /// `spec.source` could not be resolved.
    #[error("cloning spec.source {upstream}: {source}")]
    SourceFailed {
        /// `spec.source`.
        upstream: String,
        /// The source registry's answer.
        source: crate::oci::Error,
    },
    /// Copying `spec.source` into the lab registry failed.
    #[error("copying {upstream} to {reference}: {source} (nothing was tagged; it is retried)")]
    CloneFailed {
        /// `spec.source`.
        upstream: String,
        /// The lab reference.
        reference: String,
        /// The registry's answer.
        source: crate::oci::Error,
    },
    /// The lab registry did not resolve the reference.
    #[error("resolving {reference}: {source}")]
    ResolveFailed {
        /// The lab reference.
        reference: String,
        /// The registry's answer (shared with the reconcile's observations).
        source: std::sync::Arc<crate::oci::Error>,
    },
    /// The reference is pinned by digest: there is no tag to move after a squash.
    #[error("{reference} cannot be squashed in place: {source}")]
    SquashPinned {
        /// The lab reference.
        reference: String,
        /// Why it has no tag.
        source: crate::runtime::image::ImageError,
    },
    /// Squashing (writing the one layer and its manifest) failed.
    #[error("squashing {reference}: {source} (the tag was not moved)")]
    SquashFailed {
        /// The lab reference.
        reference: String,
        /// The registry's answer.
        source: crate::oci::Error,
    },
    /// The squashed image was pushed, but its tag did not move.
    #[error("squashed into {pushed}, but moving tag {tag} failed: {source}")]
    SquashTagFailed {
        /// The squashed image, by digest.
        pushed: String,
        /// The tag that did not move.
        tag: String,
        /// The registry's answer.
        source: crate::oci::Error,
    },
    /// The reference or source is outside what the Image's namespace may use in the lab registry.
    #[error("{}", .0.message)]
    RegistryPathForbidden(crate::controller::shared::registry_paths::Refusal),
}

impl Failure {
    /// The condition and Event reason of this failure.
    pub fn reason(&self) -> &'static str {
        match self {
            Failure::InvalidReference(_) => reasons::INVALID_REFERENCE,
            Failure::PullSecretUnreadable { .. } => reasons::PULL_SECRET_UNREADABLE,
            Failure::PullSecretNotFound { .. } => reasons::PULL_SECRET_NOT_FOUND,
            Failure::PullSecretWithoutConfig { .. } | Failure::PullSecretInvalid { .. } => {
                reasons::PULL_SECRET_INVALID
            }
            Failure::SourceFailed { .. } => reasons::SOURCE_FAILED,
            Failure::CloneFailed { .. } => reasons::CLONE_FAILED,
            Failure::ResolveFailed { .. } => reasons::RESOLVE_FAILED,
            Failure::RegistryPathForbidden(_) => reasons::REGISTRY_PATH_FORBIDDEN,
            Failure::SquashPinned { .. } | Failure::SquashFailed { .. } | Failure::SquashTagFailed { .. } => {
                reasons::SQUASH_FAILED
            }
        }
    }

    /// How soon to look again: slowly when the user must change something, soon for a clone
    /// (it resumes), at the resolve interval for the registry.
    pub fn retry(&self, resolve_interval: Duration) -> Duration {
        match self {
            Failure::InvalidReference(_)
            | Failure::PullSecretUnreadable { .. }
            | Failure::PullSecretNotFound { .. }
            | Failure::PullSecretWithoutConfig { .. }
            | Failure::PullSecretInvalid { .. }
            | Failure::RegistryPathForbidden(_) => INVALID_RETRY,
            Failure::SourceFailed { .. } | Failure::CloneFailed { .. } => CLONE_RETRY,
            Failure::ResolveFailed { .. }
            | Failure::SquashPinned { .. }
            | Failure::SquashFailed { .. }
            | Failure::SquashTagFailed { .. } => resolve_interval,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry_error() -> crate::oci::Error {
        crate::oci::Error::Internal("503 Service Unavailable".into())
    }

    #[test]
    fn each_failure_has_its_reason_and_its_retry() {
        let interval = Duration::from_mins(5);
        let missing = Failure::PullSecretNotFound {
            namespace: "alice".into(),
            name: "hub".into(),
        };
        assert_eq!(missing.reason(), reasons::PULL_SECRET_NOT_FOUND);
        assert_eq!(missing.retry(interval), INVALID_RETRY);
        assert!(
            missing
                .to_string()
                .contains("kubectl -n alice create secret docker-registry hub"),
            "the message says what to do: {missing}"
        );
        let clone = Failure::CloneFailed {
            upstream: "docker.io/x:1".into(),
            reference: "lab/alice/x:1".into(),
            source: registry_error(),
        };
        assert_eq!(clone.reason(), reasons::CLONE_FAILED);
        assert_eq!(clone.retry(interval), CLONE_RETRY);
        assert!(clone.to_string().contains("nothing was tagged"));
        let resolve = Failure::ResolveFailed {
            reference: "lab/alice/x:1".into(),
            source: std::sync::Arc::new(registry_error()),
        };
        assert_eq!(resolve.reason(), reasons::RESOLVE_FAILED);
        assert_eq!(resolve.retry(interval), interval);
        assert!(
            std::error::Error::source(&resolve).is_some(),
            "the registry's error is kept as the source"
        );
    }
}
