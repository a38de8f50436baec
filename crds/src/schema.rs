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
