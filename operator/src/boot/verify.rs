//! Whether a node booted the image it was served (pure): the digest whose root the boot service
//! mounted for it must be the one the booted node reports (its boot notification, read from the
//! `/etc/walt/image-digest` of the root it booted). Only then is the booted image a fact.

use super::state::BootRecord;

/// `ImageVerified=True`: the mounted and the reported digests agree.
pub const VERIFIED: &str = "Verified";
/// `ImageVerified=False`: the node reported another digest than the one mounted for it.
pub const DIGEST_MISMATCH: &str = "DigestMismatch";
/// `ImageVerified=False`: the node notified its boot without saying which image.
pub const NOT_REPORTED: &str = "DigestNotReported";
/// `ImageVerified=False`: its root was mounted, no boot notification yet.
pub const NOT_NOTIFIED: &str = "BootNotNotified";
/// `ImageVerified=False`: the boot service has mounted no root for it.
pub const NOT_SERVED: &str = "NotServed";

/// The verdict on a device's latest boot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Verdict {
    /// The digest booted, when verified.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// One of the reasons above.
    pub reason: &'static str,
    /// For people.
    pub message: String,
}

impl Verdict {
    /// Whether the booted image is verified.
    pub fn verified(&self) -> bool {
        self.reason == VERIFIED
    }
}

/// Judges a device's boot record (pure).
pub fn verify(record: &BootRecord) -> Verdict {
    let verdict = |digest: Option<&str>, reason, message: String| Verdict {
        digest: digest.map(str::to_string),
        reason,
        message,
    };
    let Some(mounted) = record.mounted.as_deref() else {
        return verdict(
            None,
            NOT_SERVED,
            format!(
                "no root was mounted for {} yet (not booted from walt's boot service)",
                record.mac
            ),
        );
    };
    if !record.notified {
        return verdict(
            None,
            NOT_NOTIFIED,
            format!("root {mounted} mounted; no boot notification yet"),
        );
    }
    match record.reported.as_deref() {
        Some(reported) if reported == mounted => verdict(
            Some(mounted),
            VERIFIED,
            format!("served {mounted} and the node reports booting it"),
        ),
        Some(reported) => verdict(
            None,
            DIGEST_MISMATCH,
            format!(
                "served {mounted} but the node reports booting {reported} (a stale mount, or an image that fakes walt's files)"
            ),
        ),
        None => verdict(
            None,
            NOT_REPORTED,
            format!(
                "served {mounted}; the node notified its boot without its image digest (its walt-init is not walt's)"
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(mounted: Option<&str>, notified: bool, reported: Option<&str>) -> BootRecord {
        BootRecord {
            mac: "52:54:00:00:00:01".into(),
            served: mounted.map(str::to_string),
            mounted: mounted.map(str::to_string),
            notified,
            reported: reported.map(str::to_string),
            ..BootRecord::default()
        }
    }

    #[test]
    fn only_agreeing_digests_verify() {
        let ok = verify(&record(Some("sha256:a"), true, Some("sha256:a")));
        assert!(ok.verified());
        assert_eq!(ok.digest.as_deref(), Some("sha256:a"));
        let mismatch = verify(&record(Some("sha256:a"), true, Some("sha256:b")));
        assert_eq!(mismatch.reason, DIGEST_MISMATCH);
        assert!(mismatch.message.contains("sha256:b"), "{}", mismatch.message);
        assert_eq!(mismatch.digest, None);
        assert_eq!(verify(&record(Some("sha256:a"), true, None)).reason, NOT_REPORTED);
        assert_eq!(
            verify(&record(Some("sha256:a"), false, None)).reason,
            NOT_NOTIFIED
        );
        assert_eq!(verify(&record(None, true, Some("sha256:a"))).reason, NOT_SERVED);
    }

    #[test]
    fn a_new_mount_forgets_the_previous_boots_report() {
        use crate::boot::state::Served;
        let entry =
            |protocol: &'static str, path: &str, digest: &str, reported: Option<&str>, at_ms| Served {
                at_ms,
                protocol,
                mac: Some("52:54:00:00:00:01".into()),
                client: "10.0.0.10".into(),
                path: path.into(),
                digest: Some(digest.into()),
                refused: None,
                reported: reported.map(str::to_string),
                tenant: None,
            };
        let mut record = BootRecord::default();
        record.apply(&entry(
            "nfs-mount",
            "/var/lib/walt/nodes/vm1/fs",
            "sha256:a",
            None,
            1,
        ));
        record.apply(&entry(
            "boot-notification",
            "booted",
            "sha256:a",
            Some("sha256:a"),
            2,
        ));
        assert!(verify(&record).verified());
        assert!(record.up);
        record.apply(&entry(
            "boot-notification",
            "disconnected",
            "sha256:a",
            Some("sha256:a"),
            3,
        ));
        assert!(!record.up);
        record.apply(&entry(
            "nfs-mount",
            "/var/lib/walt/nodes/vm1/fs",
            "sha256:b",
            None,
            4,
        ));
        assert_eq!(
            verify(&record).reason,
            NOT_NOTIFIED,
            "the new boot is not verified by the old report"
        );
        record.apply(&entry(
            "boot-notification",
            "booted",
            "sha256:b",
            Some("sha256:b"),
            5,
        ));
        assert_eq!(verify(&record).digest.as_deref(), Some("sha256:b"));
        let mut refused = entry("nfs-mount", "/x", "sha256:c", None, 6);
        refused.refused = Some("no".into());
        record.apply(&refused);
        assert_eq!(
            record.mounted.as_deref(),
            Some("sha256:b"),
            "a refusal changes nothing"
        );
    }
}
