//! The one error type of the controllers. Each variant has a short, stable
//! [`Error::metric_label`], so `walt_reconcile_errors_total{error="…"}` tells
//! an operator at a glance what kind of trouble the controllers are in.

/// Everything that can make one reconcile fail.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request to the Kubernetes API server failed.
    #[error("Kubernetes API request failed while {action}: {source}")]
    Kube {
        /// What the controller was doing, e.g. "applying Pod walt-shell-x".
        action: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The object (or one it points to) is invalid: the user must fix it.
    #[error("{0}")]
    Invalid(String),
    /// An object the reconciled one refers to does not exist (yet).
    #[error("{kind} {namespace}/{name} not found{hint}")]
    Missing {
        /// Kind of the missing object.
        kind: &'static str,
        /// Namespace looked in.
        namespace: String,
        /// Name looked for.
        name: String,
        /// What to do about it, starting with ": " (or empty).
        hint: String,
    },
    /// The registry refused or failed a request.
    #[error("registry: {0}")]
    Registry(String),
    /// Talking to a node over SSH failed.
    #[error("node SSH: {0}")]
    Ssh(String),
    /// A finalizer could not be added or removed.
    #[error("finalizer: {0}")]
    Finalizer(String),
    /// (De)serializing an object failed.
    #[error("serialization of {what}: {source}")]
    Serialization {
        /// What was being (de)serialized.
        what: String,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
    /// The operator's own configuration is wrong (flags, env, Secrets).
    #[error("configuration: {0}")]
    Config(String),
    /// Leadership was lost or could not be kept.
    #[error("leader election: {0}")]
    Leadership(String),
    /// The object changed while this reconcile decided on an older copy of it (a status write with its
    /// resourceVersion was refused): nothing of the stale decision was written; it runs again on the new one.
    #[error("{0} changed meanwhile: deciding again on its current state")]
    Stale(String),
    /// A reconcile ran past `--reconcile-timeout` and was abandoned (it runs again with backoff).
    #[error(
        "the {kind} reconcile took longer than {seconds} s (--reconcile-timeout) and was abandoned; it runs again"
    )]
    TimedOut {
        /// The kind reconciled.
        kind: &'static str,
        /// The timeout, in seconds.
        seconds: u64,
    },
}

/// What a reconcile wrapped in [`kube::runtime::finalizer::finalizer`] returns: the reconcile's own
/// error as it was, else the finalizer's (adding or removing it failed).
impl From<kube::runtime::finalizer::Error<Error>> for Error {
    fn from(error: kube::runtime::finalizer::Error<Error>) -> Self {
        match error {
            kube::runtime::finalizer::Error::ApplyFailed(error)
            | kube::runtime::finalizer::Error::CleanupFailed(error) => error,
            other => Error::Finalizer(other.to_string()),
        }
    }
}

impl Error {
    /// Every value of [`Self::metric_label`], so the error counter starts at 0 for each instead
    /// of appearing at the first error (alerts on `rate()` then see the first one).
    pub const METRIC_LABELS: [&'static str; 11] = [
        "kube",
        "invalid",
        "missing",
        "registry",
        "ssh",
        "finalizer",
        "serialization",
        "config",
        "leadership",
        "timeout",
        "stale",
    ];

    /// Short, stable label of this error for metrics (`error="…"`).
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube { .. } => "kube",
            Error::Invalid(_) => "invalid",
            Error::Missing { .. } => "missing",
            Error::Registry(_) => "registry",
            Error::Ssh(_) => "ssh",
            Error::Finalizer(_) => "finalizer",
            Error::Serialization { .. } => "serialization",
            Error::Config(_) => "config",
            Error::Leadership(_) => "leadership",
            Error::TimedOut { .. } => "timeout",
            Error::Stale(_) => "stale",
        }
    }

    /// Builds an [`Error::Kube`] with what the controller was doing.
    pub fn kube(action: impl Into<String>, source: kube::Error) -> Self {
        Error::Kube {
            action: action.into(),
            source,
        }
    }

    /// True when retrying soon cannot help (the user must change something);
    /// such errors are retried slowly.
    pub fn is_permanent(&self) -> bool {
        matches!(self, Error::Invalid(_) | Error::Config(_))
    }
}

/// Result of the controllers.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Adds "while …" context to a kube result.
pub trait KubeResultExt<T> {
    /// Maps a [`kube::Error`] to [`Error::Kube`] saying what was being done.
    fn context(self, action: impl FnOnce() -> String) -> Result<T>;
}

impl<T> KubeResultExt<T> for std::result::Result<T, kube::Error> {
    fn context(self, action: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::kube(action(), source))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_stable_and_distinct() {
        let errors = [
            Error::Invalid("x".into()),
            Error::Missing {
                kind: "Image",
                namespace: "a".into(),
                name: "b".into(),
                hint: String::new(),
            },
            Error::Registry("x".into()),
            Error::Ssh("x".into()),
            Error::Finalizer("x".into()),
            Error::Config("x".into()),
            Error::Leadership("x".into()),
            Error::TimedOut {
                kind: "Node",
                seconds: 3600,
            },
        ];
        let labels: std::collections::BTreeSet<_> = errors.iter().map(Error::metric_label).collect();
        assert_eq!(labels.len(), errors.len());
        assert!(
            labels.iter().all(|label| Error::METRIC_LABELS.contains(label)),
            "{labels:?} are all pre-created"
        );
        assert!(Error::Invalid("x".into()).is_permanent());
        assert!(!Error::Registry("x".into()).is_permanent());
    }

    #[test]
    fn missing_message_names_the_object_and_the_fix() {
        let error = Error::Missing {
            kind: "Image",
            namespace: "alice".into(),
            name: "debian".into(),
            hint: ": create it with `kubectl walt image clone`".into(),
        };
        assert_eq!(
            error.to_string(),
            "Image alice/debian not found: create it with `kubectl walt image clone`"
        );
    }
}
