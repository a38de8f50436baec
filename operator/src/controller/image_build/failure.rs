//! Why an ImageBuild failed, or could not go on yet: one error type for the kind, each variant with
//! its reason constant (from [`walt_crds::image_build::reasons`]) and whether and when to retry.

use std::time::Duration;

use walt_crds::image_build::reasons;

use crate::controller::shared::error::Error;

/// How soon tagging the built image is tried again after a registry failure (the pod and its result
/// are kept until it succeeds).
pub const SAVE_RETRY: Duration = Duration::from_secs(20);

/// Why a build failed (or, for [`Failure::SaveFailed`], has not finished yet).
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// `spec.image` exists and `spec.overwrite` is false.
    #[error(
        "image {image} exists: set spec.overwrite to replace it (`kubectl walt image build --overwrite`), or build under another name"
    )]
    ImageExists {
        /// The image name.
        image: String,
    },
    /// The target is outside the namespace's registry path.
    #[error("{}", .0.message)]
    RegistryPathForbidden(crate::controller::shared::registry_paths::Refusal),
    /// The tenant's runtime namespace, where build pods run, cannot be used: why, and what to do.
    #[error("{0}; no build pod was made")]
    RuntimeNamespaceRefused(String),
    /// A step (or the Dockerfile) failed: the build's own message, then the end of its output.
    #[error("{message}{}", output_suffix(.output))]
    BuildFailed {
        /// The build's message (`step 3/9 (Dockerfile line 7) RUN …: the command exited with status 1`).
        message: String,
        /// The last lines of its output.
        output: Vec<String>,
    },
    /// The build pod could not start, or failed without a message.
    #[error("the build pod failed: {0}; no tag moved")]
    PodFailed(String),
    /// The build pod disappeared before it reported a result.
    #[error(
        "the build pod disappeared before it reported a result (deleted, or its cluster node was lost); no tag moved"
    )]
    PodLost,
    /// Nothing was uploaded into the build pod in time.
    #[error(
        "no build context was uploaded within {}: the client that created this build went away; create a new build (`kubectl walt image build`); no tag moved",
        walt_crds::format_duration(*.0)
    )]
    ContextNotUploaded(Duration),
    /// The build reported no usable result.
    #[error("the build pod ended without a result it could be saved from: {0}; no tag moved")]
    NoResult(String),
    /// Tagging the built image (or updating its Image) failed; tried again.
    #[error("{0} (the built image is kept by digest; tagging it is retried)")]
    SaveFailed(#[source] Error),
}

fn output_suffix(output: &[String]) -> String {
    if output.is_empty() {
        "; no tag moved".to_owned()
    } else {
        format!("; no tag moved. Its last output:\n{}", output.join("\n"))
    }
}

impl Failure {
    /// The condition and Event reason of this failure.
    pub fn reason(&self) -> &'static str {
        match self {
            Failure::ImageExists { .. } => reasons::IMAGE_EXISTS,
            Failure::RegistryPathForbidden(_) => reasons::REGISTRY_PATH_FORBIDDEN,
            Failure::RuntimeNamespaceRefused(_) => reasons::RUNTIME_NAMESPACE_REFUSED,
            Failure::BuildFailed { .. } => reasons::BUILD_FAILED,
            Failure::PodFailed(_) | Failure::PodLost | Failure::NoResult(_) => reasons::POD_FAILED,
            Failure::ContextNotUploaded(_) => reasons::CONTEXT_NOT_UPLOADED,
            Failure::SaveFailed(_) => reasons::SAVE_FAILED,
        }
    }

    /// When to try again: `None` ends the build `Failed` (only a new ImageBuild can change the
    /// outcome); `Some` keeps it `Building` and looks again after that long.
    pub fn retry(&self) -> Option<Duration> {
        match self {
            Failure::SaveFailed(_) => Some(SAVE_RETRY),
            Failure::ImageExists { .. }
            | Failure::RegistryPathForbidden(_)
            | Failure::RuntimeNamespaceRefused(_)
            | Failure::BuildFailed { .. }
            | Failure::PodFailed(_)
            | Failure::PodLost
            | Failure::ContextNotUploaded(_)
            | Failure::NoResult(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_failure_has_its_reason_and_its_retry() {
        let exists = Failure::ImageExists { image: "app".into() };
        assert_eq!(exists.reason(), reasons::IMAGE_EXISTS);
        assert_eq!(exists.retry(), None);
        assert!(
            exists.to_string().contains("--overwrite"),
            "says what to do: {exists}"
        );
        let failed = Failure::BuildFailed {
            message: "step 3/4 (Dockerfile line 4) RUN exit 3: the command exited with status 3".into(),
            output: vec!["boom-output".into()],
        };
        assert_eq!(failed.reason(), reasons::BUILD_FAILED);
        assert_eq!(failed.retry(), None);
        assert!(
            failed
                .to_string()
                .ends_with("no tag moved. Its last output:\nboom-output"),
            "{failed}"
        );
        let save = Failure::SaveFailed(Error::Registry("503".into()));
        assert_eq!(save.reason(), reasons::SAVE_FAILED);
        assert_eq!(save.retry(), Some(SAVE_RETRY));
        assert!(
            std::error::Error::source(&save).is_some(),
            "the registry error is kept"
        );
        let refused =
            Failure::RuntimeNamespaceRefused("the namespace walt-run-alice exists but is not walt's".into());
        assert_eq!(
            (refused.reason(), refused.retry()),
            (reasons::RUNTIME_NAMESPACE_REFUSED, None)
        );
        let late = Failure::ContextNotUploaded(Duration::from_mins(5));
        assert_eq!(late.reason(), reasons::CONTEXT_NOT_UPLOADED);
        assert!(late.to_string().contains("within 5m0s"), "{late}");
    }
}
