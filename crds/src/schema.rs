//! Schema pieces shared by the four kinds: the OpenAPI shapes and CEL rules
//! (`x-kubernetes-validations`) the API server enforces.
//!
//! Every rule carries a message a person understands; the same rules are
//! mirrored by the pure helpers in [`crate::image_name`] so clients can refuse
//! bad input before the API server does.

use schemars::{Schema, SchemaGenerator, json_schema};
use serde_json::{Value, json};

/// Longest image name (`name[:tag]`) accepted anywhere in the API.
pub const IMAGE_NAME_MAX_LENGTH: usize = 128;

/// CEL regular expression for an image name (`name[:tag]`), see [`crate::ImageName`].
pub const IMAGE_NAME_CEL_PATTERN: &str = "^[a-z0-9]([a-z0-9-]*[a-z0-9])?(:[a-z0-9]([a-z0-9-]*[a-z0-9])?)?$";

/// Message of the image name syntax rule.
pub const IMAGE_NAME_MESSAGE: &str = "must be an image name: lower-case letters, digits and '-' \
     (starting and ending with a letter or digit), optionally followed by ':tag' (same characters), \
     e.g. 'rpi-debian' or 'rpi-debian:v2'";

/// Message of the reserved image name rule.
pub const IMAGE_NAME_RESERVED_MESSAGE: &str = "the image name 'default' is reserved (it means the default image of the node model); choose another name";

/// Longest Kubernetes object name (DNS subdomain).
pub const OBJECT_NAME_MAX_LENGTH: usize = 253;

/// Message of the object-name rule (references to a Node).
pub const OBJECT_NAME_MESSAGE: &str = "must be the name of an object in the same namespace: \
     lower-case letters, digits, '-' and '.', starting and ending with a letter or digit";

/// CEL regular expression of a Kubernetes object name (RFC 1123 subdomain).
pub const OBJECT_NAME_CEL_PATTERN: &str =
    "^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

/// CEL regular expression of a duration as Go's `time.ParseDuration` writes it
/// (no sign: durations here are never negative).
pub const DURATION_CEL_PATTERN: &str = "^(0|([0-9]+([.][0-9]+)?(ns|us|µs|ms|s|m|h))+)$";

/// Message of the duration rule.
pub const DURATION_MESSAGE: &str = "must be a duration such as 90s, 30m, 8h or 1h30m";

/// Longest OpenSSH public key line accepted (an RSA 16384-bit key fits).
pub const PUBLIC_KEY_MAX_LENGTH: usize = 8192;

/// CEL regular expression of one OpenSSH public key line (`type base64 [comment]`).
pub const PUBLIC_KEY_CEL_PATTERN: &str = "^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp256|ecdsa-sha2-nistp384|\
ecdsa-sha2-nistp521|sk-ssh-ed25519@openssh.com|sk-ecdsa-sha2-nistp256@openssh.com) [A-Za-z0-9+/]+=*( .*)?$";

/// Message of the public key rule.
pub const PUBLIC_KEY_MESSAGE: &str = "must be one OpenSSH public key line, \
     e.g. 'ssh-ed25519 AAAAC3Nza... user@host' (the content of a .pub file)";

/// Most conditions one object carries.
pub const CONDITIONS_MAX_ITEMS: usize = 16;

/// One CEL rule as the API server reads it.
pub(crate) fn rule(rule: &str, message: &str) -> Value {
    json!({ "rule": rule, "message": message })
}

/// Adds CEL rules to a schema.
fn with_rules(mut schema: Schema, rules: Vec<Value>) -> Schema {
    schema.insert("x-kubernetes-validations".into(), Value::Array(rules));
    schema
}

/// An image name (`name[:tag]`, WalT's rule, `default` reserved).
pub(crate) fn image_name(_: &mut SchemaGenerator) -> Schema {
    with_rules(
        json_schema!({ "type": "string", "maxLength": IMAGE_NAME_MAX_LENGTH }),
        image_name_rules(),
    )
}

/// The CEL rules of an image name, on a string `self`.
pub(crate) fn image_name_rules() -> Vec<Value> {
    vec![
        rule(
            &format!("self.matches('{IMAGE_NAME_CEL_PATTERN}')"),
            IMAGE_NAME_MESSAGE,
        ),
        rule(
            "self != 'default' && !self.startsWith('default:')",
            IMAGE_NAME_RESERVED_MESSAGE,
        ),
    ]
}

/// The name of an object in the same namespace.
pub(crate) fn object_name(_: &mut SchemaGenerator) -> Schema {
    with_rules(
        json_schema!({ "type": "string", "maxLength": OBJECT_NAME_MAX_LENGTH }),
        vec![rule(
            &format!("self.matches('{OBJECT_NAME_CEL_PATTERN}')"),
            OBJECT_NAME_MESSAGE,
        )],
    )
}

/// A duration string (`30m`, `8h`).
pub(crate) fn duration(_: &mut SchemaGenerator) -> Schema {
    with_rules(
        json_schema!({ "type": "string", "maxLength": 64 }),
        vec![rule(
            &format!("self.matches('{DURATION_CEL_PATTERN}')"),
            DURATION_MESSAGE,
        )],
    )
}

/// One OpenSSH public key line.
pub(crate) fn public_key(_: &mut SchemaGenerator) -> Schema {
    with_rules(
        json_schema!({ "type": "string", "maxLength": PUBLIC_KEY_MAX_LENGTH }),
        vec![rule(
            &format!("self.matches('{PUBLIC_KEY_CEL_PATTERN}')"),
            PUBLIC_KEY_MESSAGE,
        )],
    )
}

/// A TCP port (1–65535).
pub(crate) fn tcp_port(_: &mut SchemaGenerator) -> Schema {
    with_rules(
        json_schema!({ "type": "integer", "format": "int32" }),
        vec![rule(
            "self >= 1 && self <= 65535",
            "must be a TCP port number between 1 and 65535",
        )],
    )
}

/// Standard conditions: a list keyed by `type` (server-side apply merges by type).
pub(crate) fn conditions(generator: &mut SchemaGenerator) -> Schema {
    let item = generator.subschema_for::<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>();
    json_schema!({
        "type": "array",
        "items": item,
        "maxItems": CONDITIONS_MAX_ITEMS,
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
    })
}

/// A resource quantity (`512Mi`, `2`): int-or-string. Explicitly not nullable:
/// kube marks defaulted int-or-string fields nullable, which would let `null`
/// through to clients that cannot read it.
pub(crate) fn quantity(_: &mut SchemaGenerator) -> Schema {
    json_schema!({ "x-kubernetes-int-or-string": true, "nullable": false })
}

/// Longest device address (a DNS name).
pub const HOST_MAX_LENGTH: usize = 253;

/// CEL regular expression of a host name or IPv4 address (RFC 1123 labels joined by dots): no port,
/// no space, no shell character.
pub const HOST_NAME_CEL_PATTERN: &str =
    "^[a-zA-Z0-9]([-a-zA-Z0-9]{0,61}[a-zA-Z0-9])?([.][a-zA-Z0-9]([-a-zA-Z0-9]{0,61}[a-zA-Z0-9])?)*$";

/// CEL regular expression of an IPv6 address (hex groups and at least two colons, an embedded
/// IPv4 allowed; no brackets, zone or port).
pub const IPV6_CEL_PATTERN: &str = "^[0-9a-fA-F]*:[0-9a-fA-F]*:[0-9a-fA-F:.]*$";

/// Message of the host rule.
pub const HOST_MESSAGE: &str = "must be a host name or an IP address, without port \
     (the port is spec.sshPort), spaces or other characters, e.g. 'rpi-01.lab', '192.0.2.11' or '2001:db8::11'";

/// CEL regular expression of a MAC address (lower-case, colon-separated).
pub const MAC_CEL_PATTERN: &str = "^[0-9a-f]{2}(:[0-9a-f]{2}){5}$";

/// Message of the MAC address rule.
pub const MAC_MESSAGE: &str = "must be a MAC address in lower case with colons, e.g. 'dc:a6:32:01:02:03'";

/// A host name or IP address (no port).
pub(crate) fn host(_: &mut SchemaGenerator) -> Schema {
    with_rules(
        json_schema!({ "type": "string", "minLength": 1, "maxLength": HOST_MAX_LENGTH }),
        vec![rule(
            &format!("self.matches('{HOST_NAME_CEL_PATTERN}') || self.matches('{IPV6_CEL_PATTERN}')"),
            HOST_MESSAGE,
        )],
    )
}

/// A MAC address.
pub(crate) fn mac(_: &mut SchemaGenerator) -> Schema {
    with_rules(
        json_schema!({ "type": "string", "maxLength": 17 }),
        vec![rule(&format!("self.matches('{MAC_CEL_PATTERN}')"), MAC_MESSAGE)],
    )
}

/// The name of a namespace (RFC 1123 label).
pub(crate) fn namespace_name(_: &mut SchemaGenerator) -> Schema {
    with_rules(
        json_schema!({ "type": "string", "maxLength": 63 }),
        vec![rule(
            "self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')",
            "must be a namespace name: lower-case letters, digits and '-', starting and ending with a letter or digit",
        )],
    )
}

/// Longest path inside a build context (Dockerfile, git sub-directory).
pub const CONTEXT_PATH_MAX_LENGTH: usize = 1024;

/// Message of the context path rule.
pub const CONTEXT_PATH_MESSAGE: &str = "must be a path relative to the build context, without '..' \
     (e.g. 'docker/Dockerfile.arm64')";

/// A path relative to a build context: not absolute, no `..` element.
pub(crate) fn context_path(_: &mut SchemaGenerator) -> Schema {
    with_rules(
        json_schema!({ "type": "string", "minLength": 1, "maxLength": CONTEXT_PATH_MAX_LENGTH }),
        vec![rule(
            "!self.startsWith('/') && !self.matches('(^|/)[.][.](/|$)')",
            CONTEXT_PATH_MESSAGE,
        )],
    )
}

/// CEL regular expression of a Dockerfile stage name (`FROM … AS name`) or `ARG` name.
pub const STAGE_NAME_CEL_PATTERN: &str = "^[A-Za-z_][A-Za-z0-9_.-]*$";

/// A Dockerfile stage name.
pub(crate) fn stage_name(_: &mut SchemaGenerator) -> Schema {
    with_rules(
        json_schema!({ "type": "string", "maxLength": 128 }),
        vec![rule(
            &format!("self.matches('{STAGE_NAME_CEL_PATTERN}')"),
            "must be the name of a stage of the Dockerfile (FROM … AS name): letters, digits, '_', '.' and '-', starting with a letter or '_'",
        )],
    )
}

/// CEL regular expression of an `ARG` name.
pub const ARG_NAME_CEL_PATTERN: &str = "^[A-Za-z_][A-Za-z0-9_]*$";

/// The name of a Dockerfile `ARG`.
pub(crate) fn arg_name(_: &mut SchemaGenerator) -> Schema {
    with_rules(
        json_schema!({ "type": "string", "maxLength": 128 }),
        vec![rule(
            &format!("self.matches('{ARG_NAME_CEL_PATTERN}')"),
            "must be the name of an ARG of the Dockerfile: letters, digits and '_', not starting with a digit",
        )],
    )
}

/// CEL regular expression of an OCI platform (`os/arch[/variant]`).
pub const PLATFORM_CEL_PATTERN: &str = "^[a-z0-9]+/[a-z0-9_]+(/[a-z0-9]+)?$";

/// An OCI platform as `docker build --platform` takes it.
pub(crate) fn platform(_: &mut SchemaGenerator) -> Schema {
    with_rules(
        json_schema!({ "type": "string", "maxLength": 64 }),
        vec![rule(
            &format!("self.matches('{PLATFORM_CEL_PATTERN}')"),
            "must be a platform OS/ARCH[/VARIANT], e.g. linux/arm64 or linux/arm/v7",
        )],
    )
}

/// A git commit (full SHA-1 or SHA-256 object name).
pub(crate) fn commit(_: &mut SchemaGenerator) -> Schema {
    with_rules(
        json_schema!({ "type": "string", "maxLength": 64 }),
        vec![rule(
            "self.matches('^([0-9a-f]{40}|[0-9a-f]{64})$')",
            "must be a full git commit id: 40 (SHA-1) or 64 (SHA-256) lower-case hex digits",
        )],
    )
}
