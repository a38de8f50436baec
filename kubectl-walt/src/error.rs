//! The plugin's errors: each names the resource involved and says what to do.

use std::fmt;

/// What the plugin was doing when the API refused or failed: turns a raw API error into a
/// message about *this* resource.
#[derive(Debug, Clone)]
pub struct Op {
    /// The verb, as RBAC spells it (get, list, create, patch, delete, watch).
    pub verb: &'static str,
    /// The user-facing kind, e.g. "node", "image", "shell session".
    pub kind: &'static str,
    /// The resource as RBAC spells it, e.g. "nodes.walt.dev", "pods/portforward".
    pub resource: &'static str,
    /// The object's name, if one.
    pub name: Option<String>,
    /// The namespace.
    pub namespace: String,
}

impl Op {
    /// An operation on a named object.
    pub fn named(
        verb: &'static str,
        kind: &'static str,
        resource: &'static str,
        name: &str,
        namespace: &str,
    ) -> Self {
        Op {
            verb,
            kind,
            resource,
            name: Some(name.to_string()),
            namespace: namespace.to_string(),
        }
    }

    /// An operation on a collection (list, watch, create without a name yet).
    pub fn collection(
        verb: &'static str,
        kind: &'static str,
        resource: &'static str,
        namespace: &str,
    ) -> Self {
        Op {
            verb,
            kind,
            resource,
            name: None,
            namespace: namespace.to_string(),
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            Some(name) => write!(
                f,
                "cannot {} {} {name:?} in namespace {:?}",
                self.verb, self.kind, self.namespace
            ),
            None => write!(
                f,
                "cannot {} {}s in namespace {:?}",
                self.verb, self.kind, self.namespace
            ),
        }
    }
}

/// Everything that can go wrong, with a message for a person.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No usable kubeconfig / context.
    #[error(
        "cannot connect to the cluster: {0}\n  Check KUBECONFIG or --kubeconfig, and --context (`kubectl config get-contexts` lists them)."
    )]
    Kubeconfig(String),
    /// The object does not exist.
    #[error("{kind} {name:?} not found in namespace {namespace:?}: {hint}")]
    NotFound {
        /// User-facing kind.
        kind: &'static str,
        /// Its name.
        name: String,
        /// Where we looked.
        namespace: String,
        /// What to do.
        hint: String,
    },
    /// RBAC refused.
    #[error(
        "forbidden: you may not {verb} {resource} in namespace {namespace:?} ({message}).\n  Ask your lab admin for a Role granting `{verb}` on `{resource}`; `kubectl auth can-i {verb} {resource} -n {namespace}` checks it."
    )]
    Forbidden {
        /// The RBAC verb.
        verb: String,
        /// The RBAC resource (with subresource).
        resource: String,
        /// The namespace.
        namespace: String,
        /// The API server's own words.
        message: String,
    },
    /// A node cannot be used yet.
    #[error("node {node:?} is not ready (phase {phase}): {hint}")]
    NotReady {
        /// The node.
        node: String,
        /// Its phase.
        phase: String,
        /// What to do.
        hint: String,
    },
    /// Bad input from the command line.
    #[error("{0}")]
    Invalid(String),
    /// The object already exists.
    #[error("{kind} {name:?} already exists in namespace {namespace:?}: {hint}")]
    AlreadyExists {
        /// User-facing kind.
        kind: &'static str,
        /// Its name.
        name: String,
        /// The namespace.
        namespace: String,
        /// What to do.
        hint: String,
    },
    /// Any other API failure, with what we were doing.
    #[error("{op}: {message}")]
    Api {
        /// What we were doing.
        op: Box<Op>,
        /// The API server's or the client's message.
        message: String,
    },
    /// The operator reported a failure.
    #[error("{0}")]
    Failed(String),
    /// Waiting took too long.
    #[error("timed out {0}")]
    Timeout(String),
    /// Local I/O (terminal, files).
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The SSH connection through the gateway.
    #[error("{0}")]
    Ssh(String),
    /// Ctrl-C.
    #[error("interrupted")]
    Interrupted,
    /// Printing resources.
    #[error("cannot format the output: {0}")]
    Output(String),
}

/// The plugin's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The process exit status for this error (130 for Ctrl-C, as shells do; 1 otherwise).
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Interrupted => 130,
            _ => 1,
        }
    }

    /// Wraps an I/O error with what we were doing.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }

    /// Turns an API error into a message about the operation `op`.
    pub fn api(op: Op, err: kube::Error) -> Error {
        match err {
            kube::Error::Api(status) => Self::from_status(op, status.code, &status.reason, &status.message),
            other => Error::Api {
                op: Box::new(op),
                message: other.to_string(),
            },
        }
    }

    /// Like [`Error::api`], from the parts of a Status.
    pub fn from_status(op: Op, code: u16, reason: &str, message: &str) -> Error {
        if code == 404 || reason == "NotFound" {
            if let Some(name) = op.name.clone() {
                return Error::NotFound {
                    kind: op.kind,
                    hint: not_found_hint(op.kind),
                    name,
                    namespace: op.namespace,
                };
            }
            if message.contains("the server could not find the requested resource") {
                return Error::Failed(format!(
                    "{op}: the walt API (group walt.dev) is not installed on this cluster.\n  Install the walt CRDs and operator (see the README), or check --context."
                ));
            }
        }
        if code == 403 || reason == "Forbidden" {
            return Error::Forbidden {
                verb: op.verb.to_string(),
                resource: op.resource.to_string(),
                namespace: op.namespace,
                message: message.to_string(),
            };
        }
        if code == 409
            && reason == "AlreadyExists"
            && let Some(name) = op.name.clone()
        {
            return Error::AlreadyExists {
                kind: op.kind,
                name,
                namespace: op.namespace,
                hint: "choose another name, or remove it first".into(),
            };
        }
        if code == 422 || reason == "Invalid" {
            return Error::Invalid(format!("{op}: the API server refused it: {message}"));
        }
        Error::Api {
            op: Box::new(op),
            message: if message.is_empty() {
                format!("HTTP {code} {reason}")
            } else {
                message.to_string()
            },
        }
    }
}

fn not_found_hint(kind: &str) -> String {
    match kind {
        "node" => "list the nodes with `kubectl walt node ls` (and check -n/--namespace)".into(),
        "image" => {
            "list the images with `kubectl walt image ls`, or clone one with `kubectl walt image clone`"
                .into()
        }
        other => format!("check the name and the namespace of the {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_found_names_the_resource_and_the_way_out() {
        let op = Op::named("get", "node", "nodes.walt.dev", "rpi9", "lab");
        let e = Error::from_status(op, 404, "NotFound", "nodes.walt.dev \"rpi9\" not found");
        assert_eq!(
            e.to_string(),
            "node \"rpi9\" not found in namespace \"lab\": list the nodes with `kubectl walt node ls` (and check -n/--namespace)"
        );
    }

    #[test]
    fn forbidden_names_the_permission() {
        let op = Op::collection("create", "shell session", "shellsessions.walt.dev", "bob");
        let e = Error::from_status(
            op,
            403,
            "Forbidden",
            "shellsessions.walt.dev is forbidden: User \"alice\" cannot create resource \"shellsessions\" in API group \"walt.dev\" in the namespace \"bob\"",
        );
        let text = e.to_string();
        assert!(
            text.starts_with("forbidden: you may not create shellsessions.walt.dev in namespace \"bob\"")
        );
        assert!(text.contains("User \"alice\" cannot create"));
        assert!(text.contains("kubectl auth can-i create shellsessions.walt.dev -n bob"));
    }

    #[test]
    fn missing_crds_are_explained() {
        let op = Op::collection("list", "node", "nodes.walt.dev", "default");
        let e = Error::from_status(
            op,
            404,
            "NotFound",
            "the server could not find the requested resource",
        );
        assert!(
            e.to_string()
                .contains("the walt API (group walt.dev) is not installed")
        );
    }

    #[test]
    fn exit_codes() {
        assert_eq!(Error::Interrupted.exit_code(), 130);
        assert_eq!(Error::Invalid("x".into()).exit_code(), 1);
    }
}
