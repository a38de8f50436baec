//! One shell, copy or save at a time per image (WalT's rule), without any
//! in-memory lock: the holder is computed from the objects themselves, so it
//! survives operator restarts and leader changes.
//!
//! Among the unfinished ShellSessions (on `spec.image`) and NodeSaves (on
//! `spec.image`, the image they write) of one namespace that name the same
//! image, the oldest (creation time, then kind, then name) holds the image;
//! the others wait, with a condition naming the holder.

use k8s_openapi::jiff::Timestamp;

/// One object that wants an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    /// `ShellSession` or `NodeSave`.
    pub kind: &'static str,
    /// Object name.
    pub name: String,
    /// The Image object name it works on.
    pub image: String,
    /// Its creation time.
    pub created: Timestamp,
}

impl Claim {
    /// `Kind/name`, as shown to users.
    pub fn label(&self) -> String {
        format!("{}/{}", self.kind, self.name)
    }
}

/// Who holds `image` right now, if it is not `me` (pure).
/// `claims` are the unfinished objects of one namespace.
pub fn holder_other_than<'a>(
    claims: &'a [Claim],
    image: &str,
    me_kind: &str,
    me_name: &str,
) -> Option<&'a Claim> {
    let first = claims
        .iter()
        .filter(|claim| claim.image == image)
        .min_by(|a, b| (a.created, a.kind, &a.name).cmp(&(b.created, b.kind, &b.name)))?;
    (first.kind != me_kind || first.name != me_name).then_some(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(kind: &'static str, name: &str, image: &str, second: i64) -> Claim {
        Claim {
            kind,
            name: name.into(),
            image: image.into(),
            created: Timestamp::from_second(second).expect("time"),
        }
    }

    #[test]
    fn oldest_holds_and_others_wait() {
        let claims = [
            claim("ShellSession", "s1", "debian", 10),
            claim("NodeSave", "save1", "debian", 5),
            claim("NodeSave", "save2", "alpine", 1),
        ];
        assert_eq!(holder_other_than(&claims, "debian", "NodeSave", "save1"), None);
        assert_eq!(
            holder_other_than(&claims, "debian", "ShellSession", "s1").map(Claim::label),
            Some("NodeSave/save1".into())
        );
        assert_eq!(holder_other_than(&claims, "alpine", "NodeSave", "save2"), None);
        assert_eq!(holder_other_than(&claims, "ubuntu", "NodeSave", "x"), None);
    }

    #[test]
    fn ties_break_by_kind_then_name() {
        let claims = [
            claim("ShellSession", "b", "i", 1),
            claim("ShellSession", "a", "i", 1),
        ];
        assert_eq!(
            holder_other_than(&claims, "i", "ShellSession", "b").map(Claim::label),
            Some("ShellSession/a".into())
        );
    }
}
