//! One shell, copy or save at a time per image (WalT's rule), without any
//! in-memory lock: the holder is computed from the objects themselves, so it
//! survives operator restarts and leader changes.
//!
//! Among the unfinished ShellSessions (on `spec.image`) and NodeSaves (on
//! `spec.image`, the image they write) of one namespace that name the same
//! image, one that has already started holds the image, else the oldest
//! (creation time, then kind, then name); the others wait, with a condition
//! naming the holder. (Creation times have one-second steps: without the
//! "started first" rule, an object created in the same second as a running
//! one but with a smaller name would take the image from it.)
//!
//! An image ShellSession with `spec.saveAs` naming another image claims that
//! name too, as a claim that has not started: its save waits while a save
//! or shell that has started holds the name, and a save of that name created
//! after it waits for it. So two writers of one name (a NodeSave and a
//! shell's `saveAs`, two shells saving as one new name) take turns, and the
//! name ends at the digest of the last one.
//!
//! An unfinished ImageBuild claims the image it builds (`spec.image`), started
//! once its build pod exists (`Building`): a build waits while another writer
//! holds the name, and writers of the name created after it wait for it.

use k8s_openapi::jiff::Timestamp;
use kube::{Api, ResourceExt};
use walt_crds::{
    ImageBuild, ImageBuildPhase, ImageName, NodeSave, NodeSavePhase, ShellSession, ShellSessionPhase,
};

use super::context::Context;
use super::error::{KubeResultExt, Result};

/// One object that wants an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    /// `ShellSession`, `NodeSave` or `ImageBuild`.
    pub kind: &'static str,
    /// Object name.
    pub name: String,
    /// The Image object name it works on.
    pub image: String,
    /// Its creation time.
    pub created: Timestamp,
    /// Whether it has started working on the image (a NodeSave Running or
    /// Pushing, a ShellSession past Pending, an ImageBuild Building): it keeps
    /// the image until it ends.
    pub started: bool,
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
        .min_by(|a, b| {
            (!a.started, a.created, a.kind, &a.name).cmp(&(!b.started, b.created, b.kind, &b.name))
        })?;
    (first.kind != me_kind || first.name != me_name).then_some(first)
}

/// The Image object an image name (`name[:tag]`) lives in, if the name is valid.
fn image_object(image_name: &str) -> Option<String> {
    ImageName::parse(image_name).ok().map(|name| name.object_name())
}

/// The claims of unfinished NodeSaves (on the image they write), image
/// ShellSessions (on the image they open, and their `saveAs`) and ImageBuilds
/// (on the image they build) among `saves`, `sessions` and `builds`, pure.
/// Objects without a creation time (not stored yet) claim nothing.
pub fn claims_of(saves: &[NodeSave], sessions: &[ShellSession], builds: &[ImageBuild]) -> Vec<Claim> {
    let saves = saves.iter().filter_map(|save| {
        let finished = save
            .status
            .as_ref()
            .is_some_and(|status| status.phase.is_finished());
        (!finished).then_some(())?;
        Some(Claim {
            kind: "NodeSave",
            name: save.name_any(),
            image: image_object(&save.spec.image)?,
            created: save.creation_timestamp()?.0,
            started: save.status.as_ref().is_some_and(|status| {
                matches!(status.phase, NodeSavePhase::Running | NodeSavePhase::Pushing)
            }),
        })
    });
    let unfinished = sessions.iter().filter(|session| {
        !session
            .status
            .as_ref()
            .is_some_and(|status| status.phase.is_finished())
    });
    let targets = unfinished.clone().filter_map(|session| {
        let opened = image_object(session.spec.image.as_deref()?)?;
        let target = image_object(session.spec.save_as.as_deref()?)?;
        (target != opened).then_some(())?;
        Some(Claim {
            kind: "ShellSession",
            name: session.name_any(),
            image: target,
            created: session.creation_timestamp()?.0,
            started: false,
        })
    });
    let sessions = unfinished.filter_map(|session| {
        Some(Claim {
            kind: "ShellSession",
            name: session.name_any(),
            image: image_object(session.spec.image.as_deref()?)?,
            created: session.creation_timestamp()?.0,
            started: session
                .status
                .as_ref()
                .is_some_and(|status| status.phase != ShellSessionPhase::Pending),
        })
    });
    let builds = builds.iter().filter_map(|build| {
        let phase = build
            .status
            .as_ref()
            .map(|status| status.phase)
            .unwrap_or_default();
        (!phase.is_finished()).then_some(())?;
        Some(Claim {
            kind: "ImageBuild",
            name: build.name_any(),
            image: image_object(&build.spec.image)?,
            created: build.creation_timestamp()?.0,
            started: phase == ImageBuildPhase::Building,
        })
    });
    saves.chain(sessions).chain(targets).chain(builds).collect()
}

/// The current claims of `namespace` (lists its NodeSaves, ShellSessions and ImageBuilds).
pub async fn claims_in(context: &Context, namespace: &str) -> Result<Vec<Claim>> {
    let saves: Api<NodeSave> = Api::namespaced(context.client.clone(), namespace);
    let sessions: Api<ShellSession> = Api::namespaced(context.client.clone(), namespace);
    let params = kube::api::ListParams::default();
    let saves = saves
        .list(&params)
        .await
        .context(|| format!("listing the NodeSaves of {namespace}"))?;
    let sessions = sessions
        .list(&params)
        .await
        .context(|| format!("listing the ShellSessions of {namespace}"))?;
    let builds: Api<ImageBuild> = Api::namespaced(context.client.clone(), namespace);
    let builds = builds
        .list(&params)
        .await
        .context(|| format!("listing the ImageBuilds of {namespace}"))?;
    Ok(claims_of(&saves.items, &sessions.items, &builds.items))
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
            started: false,
        }
    }

    #[test]
    fn a_started_claim_keeps_the_image_from_older_or_smaller_ones() {
        let mut running = claim("NodeSave", "first", "x", 5);
        running.started = true;
        let claims = [
            claim("NodeSave", "again", "x", 5),
            running,
            claim("ShellSession", "s", "x", 1),
        ];
        assert_eq!(
            holder_other_than(&claims, "x", "NodeSave", "again").map(Claim::label),
            Some("NodeSave/first".into())
        );
        assert_eq!(holder_other_than(&claims, "x", "NodeSave", "first"), None);
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

    #[test]
    fn claims_from_objects() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        use walt_crds::{NodeSaveSpec, NodeSaveStatus, ShellSessionSpec, ShellSessionStatus};
        let created = Some(Time(Timestamp::from_second(7).expect("time")));
        let save = |name: &str, image: &str, phase: NodeSavePhase| {
            let mut save = NodeSave::new(
                name,
                NodeSaveSpec {
                    node: "n".into(),
                    image: image.into(),
                    ..NodeSaveSpec::default()
                },
            );
            save.metadata.creation_timestamp.clone_from(&created);
            save.status = Some(NodeSaveStatus {
                phase,
                ..NodeSaveStatus::default()
            });
            save
        };
        let session = |name: &str, image: Option<&str>, phase: ShellSessionPhase| {
            let mut session = ShellSession::new(
                name,
                ShellSessionSpec {
                    image: image.map(str::to_owned),
                    node: image.is_none().then(|| "n".to_owned()),
                    ..ShellSessionSpec::default()
                },
            );
            session.metadata.creation_timestamp.clone_from(&created);
            session.status = Some(ShellSessionStatus {
                phase,
                ..ShellSessionStatus::default()
            });
            session
        };
        let claims = claims_of(
            &[
                save("s1", "debian:v2", NodeSavePhase::Running),
                save("s2", "debian", NodeSavePhase::Succeeded),
            ],
            &[
                session("sh1", Some("debian"), ShellSessionPhase::Running),
                session("sh2", None, ShellSessionPhase::Running),
                session("sh3", Some("debian"), ShellSessionPhase::Saved),
            ],
            &[],
        );
        let labels: Vec<_> = claims.iter().map(|c| (c.label(), c.image.clone())).collect();
        assert_eq!(
            labels,
            [
                ("NodeSave/s1".to_owned(), "debian.v2".to_owned()),
                ("ShellSession/sh1".to_owned(), "debian".to_owned())
            ]
        );

        // A shell saving as another name claims that name too, as not started: a running save of
        // the name holds it from the shell; a save of the name not started yet waits for the shell.
        let mut shell = session("sh4", Some("debian"), ShellSessionPhase::AwaitingDecision);
        shell.spec.save_as = Some("debian:v2".into());
        let claims = claims_of(
            &[save("s1", "debian:v2", NodeSavePhase::Running)],
            &[shell.clone()],
            &[],
        );
        assert_eq!(
            holder_other_than(&claims, "debian.v2", "ShellSession", "sh4").map(Claim::label),
            Some("NodeSave/s1".into())
        );
        let mut later = save("s5", "debian:v2", NodeSavePhase::Pending);
        later.metadata.creation_timestamp = Some(Time(Timestamp::from_second(8).expect("time")));
        let claims = claims_of(&[later], &[shell.clone()], &[]);
        assert_eq!(
            holder_other_than(&claims, "debian.v2", "NodeSave", "s5").map(Claim::label),
            Some("ShellSession/sh4".into())
        );
        assert_eq!(
            holder_other_than(&claims, "debian.v2", "ShellSession", "sh4"),
            None
        );
        // Saving over the image it opened: one claim, the one it already has.
        shell.spec.save_as = Some("debian".into());
        assert_eq!(claims_of(&[], &[shell], &[]).len(), 1);
    }

    #[test]
    fn a_build_and_a_save_of_one_name_take_turns() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        use walt_crds::{ImageBuildSpec, ImageBuildStatus, NodeSaveSpec, NodeSaveStatus};
        let at = |second: i64| Some(Time(Timestamp::from_second(second).expect("time")));
        let build = |name: &str, image: &str, phase: Option<ImageBuildPhase>, second: i64| {
            let mut build = ImageBuild::new(
                name,
                ImageBuildSpec {
                    image: image.into(),
                    ..ImageBuildSpec::default()
                },
            );
            build.metadata.creation_timestamp = at(second);
            build.status = phase.map(|phase| ImageBuildStatus {
                phase,
                ..ImageBuildStatus::default()
            });
            build
        };
        let mut save = NodeSave::new(
            "s1",
            NodeSaveSpec {
                node: "n".into(),
                image: "app:v2".into(),
                ..NodeSaveSpec::default()
            },
        );
        save.metadata.creation_timestamp = at(5);
        // An older build not started yet holds the name; the save waits for it.
        let claims = claims_of(&[save.clone()], &[], &[build("b1", "app:v2", None, 1)]);
        assert_eq!(
            holder_other_than(&claims, "app.v2", "NodeSave", "s1").map(Claim::label),
            Some("ImageBuild/b1".into())
        );
        assert_eq!(holder_other_than(&claims, "app.v2", "ImageBuild", "b1"), None);
        // A running save keeps the name from a build created before it started.
        save.status = Some(NodeSaveStatus {
            phase: NodeSavePhase::Running,
            ..NodeSaveStatus::default()
        });
        let claims = claims_of(&[save.clone()], &[], &[build("b1", "app:v2", None, 1)]);
        assert_eq!(
            holder_other_than(&claims, "app.v2", "ImageBuild", "b1").map(Claim::label),
            Some("NodeSave/s1".into())
        );
        // A building build holds its name; finished builds and other names claim nothing here.
        let claims = claims_of(
            &[],
            &[],
            &[
                build("b2", "app:v2", Some(ImageBuildPhase::Building), 9),
                build("b3", "app:v2", Some(ImageBuildPhase::Pending), 2),
                build("b4", "app:v2", Some(ImageBuildPhase::Failed), 1),
                build("b5", "other", None, 1),
            ],
        );
        assert_eq!(
            holder_other_than(&claims, "app.v2", "ImageBuild", "b3").map(Claim::label),
            Some("ImageBuild/b2".into())
        );
        assert_eq!(claims.len(), 3, "b4 ended");
    }
}
