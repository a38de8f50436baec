//! Requests users make through annotations: `kubectl walt node reboot` and `kubectl walt image squash`
//! set a `…-requested-at` annotation to a new value (when it was asked, RFC 3339); the operator sets the
//! matching `…-handled-at` annotation to the value it handled, so each request runs once. One type, used
//! by the plugin and the operator alike, so they never disagree on whether a request is still pending.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// A pair of annotations carrying one kind of request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestAnnotation {
    /// Set by the user to a new value for each request.
    pub requested: &'static str,
    /// Set by the operator to the requested value it has handled.
    pub handled: &'static str,
}

/// Rebooting a Node (`kubectl walt node reboot`).
pub const REBOOT: RequestAnnotation = RequestAnnotation {
    requested: "walt.dev/reboot-requested-at",
    handled: "walt.dev/reboot-handled-at",
};

/// Squashing an Image into one layer (`kubectl walt image squash`).
pub const SQUASH: RequestAnnotation = RequestAnnotation {
    requested: "walt.dev/squash-requested-at",
    handled: "walt.dev/squash-handled-at",
};

fn annotation<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.annotations
        .as_ref()
        .and_then(|annotations: &BTreeMap<String, String>| annotations.get(key))
        .map(|value| value.trim())
}

impl RequestAnnotation {
    /// The request not handled yet, if any (pure): a non-blank requested value that the handled
    /// annotation does not hold (both compared without surrounding spaces).
    pub fn pending(&self, meta: &ObjectMeta) -> Option<String> {
        let asked = annotation(meta, self.requested).filter(|value| !value.is_empty())?;
        (annotation(meta, self.handled) != Some(asked)).then(|| asked.to_owned())
    }

    /// Whether the request `value` has been handled.
    pub fn is_handled(&self, meta: &ObjectMeta, value: &str) -> bool {
        annotation(meta, self.handled) == Some(value.trim())
    }

    /// The merge patch that makes a new request with `value`.
    pub fn request_patch(&self, value: &str) -> serde_json::Value {
        serde_json::json!({"metadata": {"annotations": {self.requested: value}}})
    }

    /// The merge patch that records `value` as handled (the user's own annotation is left as it is).
    pub fn handled_patch(&self, value: &str) -> serde_json::Value {
        serde_json::json!({"metadata": {"annotations": {self.handled: value}}})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(pairs: &[(&str, &str)]) -> ObjectMeta {
        ObjectMeta {
            annotations: Some(
                pairs
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            ),
            ..ObjectMeta::default()
        }
    }

    #[test]
    fn a_request_is_pending_until_its_value_is_handled() {
        assert_eq!(REBOOT.pending(&ObjectMeta::default()), None);
        let asked = meta(&[(REBOOT.requested, "2026-11-22T10:00:00Z")]);
        assert_eq!(REBOOT.pending(&asked).as_deref(), Some("2026-11-22T10:00:00Z"));
        let handled = meta(&[
            (REBOOT.requested, "2026-11-22T10:00:00Z"),
            (REBOOT.handled, "2026-11-22T10:00:00Z"),
        ]);
        assert_eq!(REBOOT.pending(&handled), None, "handled: no second run");
        assert!(REBOOT.is_handled(&handled, "2026-11-22T10:00:00Z"));
        let again = meta(&[
            (REBOOT.requested, "2026-11-22T10:05:00Z"),
            (REBOOT.handled, "2026-11-22T10:00:00Z"),
        ]);
        assert_eq!(REBOOT.pending(&again).as_deref(), Some("2026-11-22T10:05:00Z"));
    }

    #[test]
    fn blanks_and_surrounding_spaces_are_read_alike_by_everyone() {
        assert_eq!(SQUASH.pending(&meta(&[(SQUASH.requested, "  ")])), None);
        let spaced = meta(&[(SQUASH.requested, " t1 "), (SQUASH.handled, "t1")]);
        assert_eq!(SQUASH.pending(&spaced), None);
        assert!(SQUASH.is_handled(&spaced, " t1"));
    }

    #[test]
    fn patches_name_the_right_annotation() {
        assert_eq!(
            SQUASH.request_patch("t")["metadata"]["annotations"][SQUASH.requested],
            "t"
        );
        assert_eq!(
            REBOOT.handled_patch("t")["metadata"]["annotations"][REBOOT.handled],
            "t"
        );
    }
}
