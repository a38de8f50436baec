//! Errors of the OCI engine: each says which registry / repository / layer, and what went wrong.

/// An error of the OCI engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image reference cannot be parsed.
    #[error(
        "invalid image reference {reference:?}: {reason} (expected e.g. registry.example:5000/lab/image:tag)"
    )]
    BadReference {
        /// The reference as given.
        reference: String,
        /// Why it is invalid.
        reason: String,
    },
    /// The registry refused or failed a request.
    #[error("registry {registry}, repository {repository}: {action} failed: {answer}")]
    Registry {
        /// Registry host.
        registry: String,
        /// Repository.
        repository: String,
        /// What was being done (`pulling manifest latest`, `uploading layer`, …).
        action: String,
        /// What the registry answered (status, message) or the transport error.
        answer: String,
        /// The registry said the manifest, blob or repository does not exist (HTTP 404, `MANIFEST_UNKNOWN`,
        /// `NAME_UNKNOWN`), as opposed to a refusal or a transport failure.
        not_found: bool,
        /// Trying again later may succeed: the registry could not be reached, answered 5xx or 429,
        /// or lost an upload session (restarted), as opposed to a refusal the request itself caused.
        transient: bool,
    },
    /// No image in an index for the wanted platform.
    #[error("{reference}: no image for platform {wanted} (the index has: {available})")]
    NoPlatform {
        /// The image reference.
        reference: String,
        /// The platform asked for.
        wanted: String,
        /// The platforms present.
        available: String,
    },
    /// Content whose media type we do not handle.
    #[error("{reference}: unsupported media type {media_type:?} for {what}")]
    UnsupportedMediaType {
        /// The image reference.
        reference: String,
        /// What had that type (manifest, layer …).
        what: String,
        /// The media type.
        media_type: String,
    },
    /// Downloaded content does not match its digest.
    #[error(
        "{reference}: {what} has digest {actual}, but {expected} was expected: refusing it (corrupt or tampered content)"
    )]
    DigestMismatch {
        /// The image reference.
        reference: String,
        /// What was checked (`layer sha256:…`, `diff_id of layer 2`, `config`).
        what: String,
        /// Expected digest.
        expected: String,
        /// Actual digest.
        actual: String,
    },
    /// A manifest or config that does not follow the spec.
    #[error("{reference}: invalid {what}: {reason}")]
    Invalid {
        /// The image reference.
        reference: String,
        /// What is invalid.
        what: String,
        /// Why.
        reason: String,
    },
    /// Invalid credentials input (Docker config JSON).
    #[error("invalid registry credentials: {0}")]
    Credentials(String),
    /// Converting changes to a layer, or a layer to a directory, failed.
    #[error("{context}: {source}")]
    Layer {
        /// Which image / layer.
        context: String,
        /// The conversion error.
        #[source]
        source: crate::overlay::Error,
    },
    /// Local I/O (layer cache, target directory).
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: String,
        /// The path concerned.
        path: std::path::PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A local disk filled up (`ENOSPC`): the layer cache, the target directory.
    #[error("{action} {path}: no space left on its disk (free space there, then try again): {detail}")]
    DiskFull {
        /// What was being done.
        action: String,
        /// The directory whose disk is full.
        path: std::path::PathBuf,
        /// The error as it came (which file).
        detail: String,
    },
    /// A worker task died (panic or cancellation).
    #[error("internal: {0}")]
    Internal(String),
}

impl Error {
    /// Whether the registry answered that what was asked for does not exist (a tag not pushed yet, a
    /// repository never created), which callers may fix by creating it.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Registry { not_found: true, .. })
    }

    /// Whether trying again later may succeed (see the `transient` field of [`Error::Registry`]).
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Registry { transient: true, .. })
    }

    /// Whether a local disk is full somewhere in this error's chain (`ENOSPC`).
    pub fn is_disk_full(&self) -> bool {
        matches!(self, Error::DiskFull { .. }) || chain_says_disk_full(self)
    }

    pub(crate) fn io(
        action: impl Into<String>,
        path: impl Into<std::path::PathBuf>,
        source: std::io::Error,
    ) -> Self {
        Error::Io {
            action: action.into(),
            path: path.into(),
            source,
        }
    }
}

/// Whether `error` or one of its sources is an I/O error `ENOSPC` (pure); an I/O error's own payload is
/// looked into too (`std::io::Error::source` skips it).
fn chain_says_disk_full(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(current) = next {
        if let Some(io) = current.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::StorageFull {
                return true;
            }
            if io.get_ref().is_some_and(|inner| chain_says_disk_full(inner)) {
                return true;
            }
        }
        next = current.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_is_found_under_the_layer_error() {
        let full = std::io::Error::from_raw_os_error(28);
        let wrapped = std::io::Error::other(Error::io("writing", "/cache/tmp/x", full));
        let layer = Error::Layer {
            context: "layer 1".into(),
            source: crate::overlay::Error::Tar {
                context: "unpacking bin/busybox".into(),
                source: wrapped,
            },
        };
        assert!(layer.is_disk_full(), "{layer}");
        let other = Error::io("writing", "/x", std::io::Error::from_raw_os_error(5));
        assert!(!other.is_disk_full());
    }
}
