//! Types shared by several kinds, and pure helpers on them (conditions, digests).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A reference to a Secret in the same namespace as the object that names it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretReference {
    /// Name of the Secret (same namespace).
    #[schemars(schema_with = "crate::schema::object_name")]
    pub name: String,
}

/// An image as it was at one moment: its name and the exact content (digest) it had.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageDigestRef {
    /// Image name (`name[:tag]`, the Image object it refers to).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Manifest digest (`sha256:…`) of that image at that moment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

/// What changed in a root file system (an overlay upper dir turned into a layer).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Changes {
    /// Files, directories and links that did not exist before.
    #[serde(default)]
    pub added: u64,
    /// Entries that existed before and were changed (content, metadata or type).
    #[serde(default)]
    pub modified: u64,
    /// Entries that were deleted (whiteouts in the layer).
    #[serde(default)]
    pub deleted: u64,
    /// Bytes of file content in the change (uncompressed).
    #[serde(default)]
    pub bytes: u64,
}

impl Changes {
    /// Whether nothing changed at all.
    pub fn is_empty(&self) -> bool {
        self.added == 0 && self.modified == 0 && self.deleted == 0
    }
}

/// Condition types used by walt resources.
pub mod condition_types {
    /// Image: the image is in the lab registry, inspected, usable by nodes and shells.
    pub const READY: &str = "Ready";
    /// Node: the operator reaches the node over SSH.
    pub const REACHABLE: &str = "Reachable";
    /// Node: the node has booted its image (the ready marker exists).
    pub const BOOTED: &str = "Booted";
    /// Node (network-booted devices): the digest walt's boot service mounted for the node is the one
    /// the booted node reports; `False` says why not (`DigestMismatch`, `BootNotNotified`, …).
    pub const IMAGE_VERIFIED: &str = "ImageVerified";
    /// Image: the last squash request (`kubectl walt image squash`) was carried out; `False` says why
    /// not (`SquashFailed`, `RegistryPathForbidden`: the image's reference is not the namespace's to write).
    pub const SQUASHED: &str = "Squashed";
    /// ShellSession / NodeSave: the work is finished (successfully or not; see the reason).
    pub const COMPLETE: &str = "Complete";
}

/// The `status` value of a condition (`True`, `False`, `Unknown`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditionStatus {
    /// The condition holds.
    True,
    /// The condition does not hold.
    False,
    /// Not known (yet).
    Unknown,
}

impl ConditionStatus {
    /// The string Kubernetes stores.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::True => "True",
            Self::False => "False",
            Self::Unknown => "Unknown",
        }
    }
}

impl From<bool> for ConditionStatus {
    fn from(value: bool) -> Self {
        if value { Self::True } else { Self::False }
    }
}

/// Builds a condition (pure: the caller passes the current time).
pub fn new_condition(
    type_: &str,
    status: ConditionStatus,
    reason: &str,
    message: impl Into<String>,
    observed_generation: Option<i64>,
    now: Time,
) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: status.as_str().to_owned(),
        reason: reason.to_owned(),
        message: message.into(),
        observed_generation,
        last_transition_time: now,
    }
}

/// The condition of that type, if present.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|condition| condition.type_ == type_)
}

/// Whether the condition of that type is present with status `True`.
pub fn is_condition_true(conditions: &[Condition], type_: &str) -> bool {
    find_condition(conditions, type_).is_some_and(|condition| condition.status == "True")
}

/// Sets a condition the way Kubernetes controllers do: replaces the condition of the
/// same type, but keeps its `lastTransitionTime` when the status did not change.
/// Returns whether anything changed (so callers can skip a no-op status patch).
pub fn set_condition(conditions: &mut Vec<Condition>, mut condition: Condition) -> bool {
    let Some(existing) = conditions
        .iter_mut()
        .find(|existing| existing.type_ == condition.type_)
    else {
        conditions.push(condition);
        return true;
    };
    if existing.status == condition.status {
        condition.last_transition_time = existing.last_transition_time.clone();
    }
    if *existing == condition {
        return false;
    }
    *existing = condition;
    true
}

/// Removes the condition of that type; returns whether it was there.
pub fn remove_condition(conditions: &mut Vec<Condition>, type_: &str) -> bool {
    let before = conditions.len();
    conditions.retain(|condition| condition.type_ != type_);
    conditions.len() != before
}

/// Number of hex digits [`short_digest`] keeps (like `docker images`).
pub const SHORT_DIGEST_LENGTH: usize = 12;

/// The short form of a digest for display: the first 12 hex digits without the
/// algorithm (`sha256:0123456789abcdef…` → `0123456789ab`). A string without
/// `algorithm:` is shortened as is; a short one is returned whole.
pub fn short_digest(digest: &str) -> &str {
    let hex = digest.split_once(':').map_or(digest, |(_, hex)| hex);
    hex.char_indices()
        .nth(SHORT_DIGEST_LENGTH)
        .map_or(hex, |(end, _)| &hex[..end])
}

/// Formats a duration for display the way Go and kubectl do (`1h2m3s`, `45s`,
/// `0s`); sub-second durations show milliseconds (`250ms`). Used for
/// `NodeSave.status.duration`.
pub fn format_duration(duration: std::time::Duration) -> String {
    let total = duration.as_secs();
    if total == 0 {
        let millis = duration.subsec_millis();
        return if millis == 0 {
            "0s".to_owned()
        } else {
            format!("{millis}ms")
        };
    }
    let (hours, minutes, seconds) = (total / 3600, total / 60 % 60, total % 60);
    if hours > 0 {
        format!("{hours}h{minutes}m{seconds}s")
    } else if minutes > 0 {
        format!("{minutes}m{seconds}s")
    } else {
        format!("{seconds}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(seconds: i64) -> Time {
        Time(Timestamp::from_second(seconds).expect("valid timestamp"))
    }

    #[test]
    fn durations_read_like_kubectl() {
        use std::time::Duration;
        assert_eq!(format_duration(Duration::ZERO), "0s");
        assert_eq!(format_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(format_duration(Duration::from_secs(45)), "45s");
        assert_eq!(format_duration(Duration::from_secs(72)), "1m12s");
        assert_eq!(format_duration(Duration::from_secs(3600 + 1)), "1h0m1s");
        assert_eq!(format_duration(Duration::from_secs(3723)), "1h2m3s");
    }

    #[test]
    fn short_digest_keeps_twelve_hex_digits() {
        assert_eq!(
            short_digest("sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"),
            "0123456789ab"
        );
        assert_eq!(short_digest("0123456789abcdef"), "0123456789ab");
        assert_eq!(short_digest("sha256:abc"), "abc");
        assert_eq!(short_digest(""), "");
    }

    #[test]
    fn set_condition_keeps_transition_time_when_status_is_unchanged() {
        let mut conditions = Vec::new();
        let first = new_condition("Ready", true.into(), "Pulled", "ok", Some(1), at(100));
        assert!(set_condition(&mut conditions, first.clone()));
        // Same status, new message and generation: the transition time stays.
        let again = new_condition("Ready", true.into(), "Pulled", "still ok", Some(2), at(200));
        assert!(set_condition(&mut conditions, again));
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].last_transition_time, at(100));
        assert_eq!(conditions[0].message, "still ok");
        assert_eq!(conditions[0].observed_generation, Some(2));
        // Nothing new: reports no change.
        let same = new_condition("Ready", true.into(), "Pulled", "still ok", Some(2), at(300));
        assert!(!set_condition(&mut conditions, same));
        // Status flips: the transition time moves.
        let flipped = new_condition("Ready", false.into(), "PullFailed", "gone", Some(2), at(400));
        assert!(set_condition(&mut conditions, flipped));
        assert_eq!(conditions[0].last_transition_time, at(400));
        assert!(!is_condition_true(&conditions, "Ready"));
        assert!(find_condition(&conditions, "Booted").is_none());
    }

    #[test]
    fn conditions_of_several_types_live_side_by_side() {
        let mut conditions = Vec::new();
        set_condition(
            &mut conditions,
            new_condition("Reachable", ConditionStatus::True, "SshOk", "", None, at(1)),
        );
        set_condition(
            &mut conditions,
            new_condition("Booted", ConditionStatus::Unknown, "Waiting", "", None, at(1)),
        );
        assert_eq!(conditions.len(), 2);
        assert!(is_condition_true(&conditions, "Reachable"));
        assert!(remove_condition(&mut conditions, "Reachable"));
        assert!(!remove_condition(&mut conditions, "Reachable"));
        assert_eq!(conditions.len(), 1);
    }
}
