//! Why a NodeSave waits, fails or was cancelled: one error type for the kind, each variant with its
//! source, its reason constant ([`super::reasons`]), whether waiting can help (the save waits
//! instead of failing) and whether running it again can help (the save is retried).

use walt_crds::{ImageNameError, NodePhase};

use super::reasons;
use crate::controller::shared::error::Error;
use crate::controller::shared::node_access::{NoRoute, ssh_reason, ssh_reason_or};
use crate::ssh::SshError;
use crate::ssh::save::SaveError;

/// Why a NodeSave cannot start, or did not finish.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// `spec.image` is not an image name.
    #[error("{0}")]
    InvalidImageName(#[source] ImageNameError),
    /// A `spec.exclude` pattern is not a regular expression (the message names it).
    #[error("{0}")]
    InvalidExclude(String),
    /// The Node does not exist in the save's namespace.
    #[error("Node {namespace}/{node} not found: a save reads a Node of its own namespace")]
    NodeNotFound {
        /// The save's namespace.
        namespace: String,
        /// `spec.node`.
        node: String,
    },
    /// The target image exists and `overwrite` is false.
    #[error("image {image} exists: set spec.overwrite: true to replace it, or save under another name")]
    ImageExists {
        /// `spec.image`.
        image: String,
    },
    /// The Node has not booted a known image yet.
    #[error(
        "Node {namespace}/{node} has not booted a known image yet (status.bootedImage is empty): wait until it is Ready"
    )]
    NodeNotBooted {
        /// The save's namespace.
        namespace: String,
        /// `spec.node`.
        node: String,
    },
    /// The Node is not Ready.
    #[error("Node {namespace}/{node} is {phase:?}, not Ready: the save starts once it is Ready")]
    NodeNotReady {
        /// The save's namespace.
        namespace: String,
        /// `spec.node`.
        node: String,
        /// Its phase.
        phase: NodePhase,
    },
    /// Another shell or save holds the target image.
    #[error(
        "image {image} is busy: {holder} holds it (one shell or save at a time per image); this save starts after it"
    )]
    ImageBusy {
        /// `spec.image`.
        image: String,
        /// Who holds it.
        holder: String,
    },
    /// The node has no route the operator may use (its Device not lent, its pod not running…).
    #[error("{0}")]
    NoRoute(#[source] NoRoute),
    /// No Image holds the image the node booted any more.
    #[error("Node {node} booted image {base}, which no Image holds any more")]
    BaseImageNotFound {
        /// `spec.node`.
        node: String,
        /// The booted image's name.
        base: String,
    },
    /// The image the node booted has no usable reference.
    #[error("{0}")]
    BaseImageInvalid(#[source] Error),
    /// The target Image has no usable reference.
    #[error("{0}")]
    TargetInvalid(#[source] Error),
    /// The base is outside what the namespace may read, or the target outside what it may write, in
    /// the lab registry.
    #[error("{}", .0.message)]
    RegistryPathForbidden(crate::controller::shared::registry_paths::Refusal),
    /// The target image is pinned by digest: there is no tag to move.
    #[error("image {image} is at {reference}, which cannot be tagged ({source}): save under another name")]
    ImageReferencePinned {
        /// `spec.image`.
        image: String,
        /// Its reference.
        reference: String,
        /// Why it has no tag.
        source: Box<crate::runtime::image::ImageError>,
    },
    /// The API server failed: the reconcile is retried with backoff.
    #[error(transparent)]
    Api(#[from] Error),
    /// Connecting to the node failed.
    #[error("{0}")]
    Connect(#[source] Box<SshError>),
    /// The node's files cannot be saved as they are.
    #[error("{0}")]
    NotSaveable(#[source] Box<SshError>),
    /// The operator has no usable registry client.
    #[error("{0}")]
    RegistryUnavailable(#[source] Error),
    /// The image the node booted cannot be read from the registry.
    #[error("the image the node booted ({reference}) cannot be read: {source}")]
    BaseImageUnavailable {
        /// Its pinned reference.
        reference: String,
        /// The registry's answer.
        source: Box<crate::oci::Error>,
    },
    /// Reading the node or pushing the layer failed.
    #[error("{0}")]
    Transfer(#[source] Box<SaveError>),
    /// Pushed by digest, but the tag did not move.
    #[error("pushed {pushed} but tagging it failed: {source}")]
    TagFailed {
        /// The pushed image, by digest.
        pushed: String,
        /// The registry's answer.
        source: Box<crate::oci::Error>,
    },
    /// The tag moved, but the Image object could not be updated.
    #[error("the tag moved, but updating the Image failed: {0}")]
    ImageUpdateFailed(#[source] Error),
    /// The NodeSave was deleted meanwhile (what was left behind is said).
    #[error("the NodeSave was deleted {0}")]
    Cancelled(String),
    /// Another writer decided about the NodeSave while this run went on (it ended it, or another run
    /// took it over: [`super::decide::after_refusal`]): this run stops, having moved no tag.
    #[error("this run of the save stopped ({0}); it moved no tag")]
    Overtaken(String),
    /// A retryable failure, retried until the budget ran out.
    #[error("{last} (gave up after {attempts} attempts)")]
    GaveUp {
        /// How many times the save ran.
        attempts: u32,
        /// The last failure.
        last: Box<Failure>,
    },
}

impl Failure {
    /// The condition and Event reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Failure::InvalidImageName(_) | Failure::TargetInvalid(_) => reasons::INVALID_IMAGE_NAME,
            Failure::InvalidExclude(_) => reasons::INVALID_EXCLUDE,
            Failure::NodeNotFound { .. } => reasons::NODE_NOT_FOUND,
            Failure::ImageExists { .. } => reasons::IMAGE_EXISTS,
            Failure::NodeNotBooted { .. } => reasons::NODE_NOT_BOOTED,
            Failure::NodeNotReady { .. } => reasons::NODE_NOT_READY,
            Failure::ImageBusy { .. } => reasons::IMAGE_BUSY,
            Failure::NoRoute(no_route) if no_route.is_transient() => reasons::NODE_NOT_READY,
            Failure::NoRoute(no_route) => no_route.reason(),
            Failure::BaseImageNotFound { .. } => reasons::BASE_IMAGE_NOT_FOUND,
            Failure::BaseImageInvalid(_) => reasons::BASE_IMAGE_INVALID,
            Failure::ImageReferencePinned { .. } => reasons::IMAGE_REFERENCE_PINNED,
            Failure::RegistryPathForbidden(_) => {
                crate::controller::shared::registry_paths::REGISTRY_PATH_FORBIDDEN
            }
            Failure::Api(error) => error.metric_label(),
            Failure::Connect(error) => ssh_reason(error),
            Failure::NotSaveable(_) => reasons::NODE_NOT_SAVEABLE,
            Failure::RegistryUnavailable(_) => reasons::REGISTRY_UNAVAILABLE,
            Failure::BaseImageUnavailable { .. } => reasons::BASE_IMAGE_UNAVAILABLE,
            Failure::Transfer(error) => match error.as_ref() {
                SaveError::Node(error) => ssh_reason_or(error, reasons::NODE_FAILED),
                SaveError::Registry(_) => reasons::PUSH_FAILED,
                SaveError::Internal(_) => reasons::INTERNAL_ERROR,
            },
            Failure::TagFailed { .. } => reasons::TAG_FAILED,
            Failure::ImageUpdateFailed(_) => reasons::IMAGE_UPDATE_FAILED,
            Failure::Cancelled(_) | Failure::Overtaken(_) => reasons::CANCELLED,
            Failure::GaveUp { last, .. } => last.reason(),
        }
    }

    /// Whether waiting can help (the node booting or becoming Ready, the image freed, a pod or a
    /// binding on its way): the save waits in `Pending` instead of failing.
    pub fn is_transient(&self) -> bool {
        match self {
            Failure::NodeNotBooted { .. } | Failure::NodeNotReady { .. } | Failure::ImageBusy { .. } => true,
            Failure::NoRoute(no_route) => no_route.is_transient(),
            _ => false,
        }
    }

    /// Whether running the save again may succeed: the registry failed in a way that may pass.
    pub fn is_retryable(&self) -> bool {
        match self {
            Failure::BaseImageUnavailable { source, .. } | Failure::TagFailed { source, .. } => {
                source.is_transient()
            }
            Failure::Transfer(error) => {
                matches!(error.as_ref(), SaveError::Registry(error) if error.is_transient())
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ssh::NodeTarget;

    fn target() -> NodeTarget {
        NodeTarget {
            user: "root".into(),
            host: "127.0.0.1".into(),
            port: 1,
        }
    }

    #[test]
    fn node_failures_are_named_by_what_happened() {
        let refused = Failure::Transfer(Box::new(SaveError::Node(SshError::Refused { target: target() })));
        assert_eq!(refused.reason(), "ConnectionRefused");
        let unreachable = Failure::Connect(Box::new(SshError::Unreachable {
            target: target(),
            reason: "timeout".into(),
        }));
        assert_eq!(unreachable.reason(), "Unreachable");
        let push = Failure::Transfer(Box::new(SaveError::Registry(crate::oci::Error::Internal(
            "x".into(),
        ))));
        assert_eq!(push.reason(), reasons::PUSH_FAILED);
        assert!(!push.is_retryable(), "an internal error does not pass by itself");
    }

    #[test]
    fn waiting_failures_are_transient_and_the_others_are_not() {
        let not_ready = Failure::NodeNotReady {
            namespace: "alice".into(),
            node: "rpi1".into(),
            phase: NodePhase::Rebooting,
        };
        assert!(not_ready.is_transient());
        let pod = Failure::NoRoute(NoRoute::PodNotReady { node: "v1".into() });
        assert!(pod.is_transient());
        assert_eq!(pod.reason(), reasons::NODE_NOT_READY);
        let exists = Failure::ImageExists { image: "x".into() };
        assert!(!exists.is_transient());
        assert!(exists.to_string().contains("overwrite: true"), "{exists}");
    }

    #[test]
    fn giving_up_keeps_the_last_reason_and_counts_the_attempts() {
        let last = Failure::TagFailed {
            pushed: "lab/alice/x@sha256:a".into(),
            source: Box::new(crate::oci::Error::Internal("503".into())),
        };
        let gave_up = Failure::GaveUp {
            attempts: 6,
            last: Box::new(last),
        };
        assert_eq!(gave_up.reason(), reasons::TAG_FAILED);
        assert!(
            gave_up.to_string().ends_with("(gave up after 6 attempts)"),
            "{gave_up}"
        );
    }
}
