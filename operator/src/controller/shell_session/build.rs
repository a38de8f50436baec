//! ShellSession controller.
//!
//! - **Image shells** (`spec.image`): a shell pod runs `walt-operator shell`
//!   on the Image's exact digest (user-namespaced with `hostUsers: false`
//!   where the cluster supports it, else privileged; its layer cache on the
//!   cluster node). The plugin attaches to its TTY. On exit the runtime pushes
//!   the changes **by digest** (under a session-scoped scratch tag
//!   `shell-<uid>`, never the image's own tag) and writes its result to
//!   `/dev/termination-log`. The operator reads it, deletes the pod, and waits
//!   in `AwaitingDecision` for `spec.saveAs` or `spec.discard`; after the
//!   decision timeout it keeps the digest in `status.result` and moves no tag
//!   (phase `Expired`). On `saveAs` it tags the target, creates or updates the
//!   Image, and the Node controller reboots the nodes that boot it.
//! - **Node shells** (`spec.node`): the session's `publicKey` is authorized
//!   at the operator's SSH gateway for that node while the session runs;
//!   revoked when it ends, at `ttl`, or after `idleTimeout`.
//!
//! The pure part is here: pod building, result parsing and [`next_step`],
//! the state machine, all unit-tested.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use serde::Deserialize;
use walt_crds::runtime::OWNER_NAME_LABEL;
use walt_crds::{
    Changes, ImageShellMode, ShellMode, ShellSession, ShellSessionPhase, ShellSessionStatus,
    runtime_namespace,
};

use super::{READY, reasons};
use crate::controller::config::LayerCache;
pub use crate::controller::shared::pods::CACHE_DIR;
pub use crate::controller::shared::pods::runtimes_support_user_namespaces;
use crate::controller::shared::pods::{RuntimePod, emulated_on, pinned_to, prefer_architecture, runtime_pod};
use crate::controller::shared::runtime::owner_labels;

/// Label naming the ShellSession a pod belongs to.
pub const SESSION_LABEL: &str = "walt.dev/shell-session";

/// Name of the shell pod of a session.
pub fn shell_pod_name(session: &str) -> String {
    format!("walt-shell-{session}")
}

/// The scratch tag a session's changes are pushed under (by digest; the
/// image's own tags never move before the user decides).
pub fn scratch_tag(session: &ShellSession) -> String {
    let uid = session.uid().unwrap_or_default();
    let short: String = uid.chars().filter(char::is_ascii_alphanumeric).take(12).collect();
    format!("shell-{short}")
}

/// What a shell pod needs beyond the session.
#[derive(Clone, Debug)]
pub struct ShellPodInputs<'a> {
    /// Image of the pod (the walt-operator image).
    pub runtime_image: &'a str,
    /// Exact image to open: `repository@sha256:…`.
    pub image_reference: &'a str,
    /// Where the changes are pushed: `repository:shell-…`.
    pub commit_to: &'a str,
    /// Registry host spoken to over plain HTTP, if any.
    pub insecure_registry: Option<&'a str>,
    /// Run in a user namespace (`hostUsers: false`) instead of privileged.
    pub user_namespaces: bool,
    /// Where the layer cache lives.
    pub cache: &'a LayerCache,
    /// Whether the namespace has the registry credentials Secret to mount.
    pub registry_credentials: bool,
    /// The image's CPU (its platform), when known: the pod prefers cluster nodes of that CPU.
    pub image_architecture: Option<&'a str>,
    /// The cluster node the pod must run on: a pod made again after a loss goes where the changes are.
    pub cluster_node: Option<&'a str>,
}

/// Builds the shell pod of an image shell (pure): walt's runtime pod ([`runtime_pod`]) running
/// `walt-operator shell` on a TTY.
pub fn build_shell_pod(session: &ShellSession, inputs: &ShellPodInputs<'_>) -> Pod {
    let name = session.name_any();
    let mode = match session.spec.mode {
        ShellMode::Auto => "auto",
        ShellMode::Init => "init",
        ShellMode::Basic => "basic",
    };
    let mut args = vec![
        "shell".to_owned(),
        "--image".to_owned(),
        inputs.image_reference.to_owned(),
        "--mode".to_owned(),
        mode.to_owned(),
        "--commit-to".to_owned(),
        inputs.commit_to.to_owned(),
        "--cache-dir".to_owned(),
        CACHE_DIR.to_owned(),
    ];
    if let Some(host) = inputs.insecure_registry {
        args.extend(["--insecure-registry".to_owned(), host.to_owned()]);
    }
    // A cache on the cluster node outlives the pod: the changes are kept there under the session's
    // uid, for a pod made again after this one is lost.
    if let (LayerCache::HostPath(_), Some(uid)) = (inputs.cache, session.uid()) {
        args.extend(["--keep-changes-as".to_owned(), uid]);
    }
    // In the tenant's runtime namespace, with the session's owner labels (owner references cannot
    // cross namespaces).
    let mut labels = owner_labels("ShellSession", session);
    labels.insert(SESSION_LABEL.to_owned(), labels[OWNER_NAME_LABEL].clone());
    runtime_pod(&RuntimePod {
        name: shell_pod_name(&name),
        namespace: session.namespace().map(|namespace| runtime_namespace(&namespace)),
        labels,
        owner: None,
        container: "shell",
        args,
        tty: true,
        runtime_image: inputs.runtime_image,
        user_namespaces: inputs.user_namespaces,
        cache: inputs.cache,
        registry_credentials: inputs.registry_credentials,
        affinity: match inputs.cluster_node {
            Some(node) => Some(pinned_to(node)),
            None => prefer_architecture(inputs.image_architecture),
        },
    })
}

/// The shell runtime's result (its termination message, JSON).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShellOutcome {
    /// Digest of the pushed manifest, when there were changes to commit.
    #[serde(default)]
    pub digest: Option<String>,
    /// Where it was pushed.
    #[serde(default)]
    pub reference: Option<String>,
    /// What changed.
    #[serde(default)]
    pub summary: Changes,
    /// Whether qemu-user ran the image.
    #[serde(default)]
    pub emulated: bool,
    /// `init` or `basic`.
    #[serde(default)]
    pub mode: Option<String>,
    /// Exit code of the user's shell.
    #[serde(default)]
    pub exit_code: i32,
    /// The runtime was stopped (the pod evicted or deleted) and kept the changes on the cluster node
    /// for the session's next shell pod (`--keep-changes-as`): nothing was committed.
    #[serde(default)]
    pub kept: bool,
}

impl ShellOutcome {
    /// The mode as the API writes it.
    pub fn image_shell_mode(&self) -> Option<ImageShellMode> {
        match self.mode.as_deref() {
            Some("init") => Some(ImageShellMode::Init),
            Some("basic") => Some(ImageShellMode::Basic),
            _ => None,
        }
    }
}

/// How a shell pod ended, read from its status (pure).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodEnd {
    /// Still starting (image pull, scheduling).
    Starting,
    /// The shell runs.
    Running,
    /// The runtime ended and reported its result.
    Finished(ShellOutcome),
    /// The pod failed without a usable result: why.
    Failed(String),
    /// The pod was stopped or killed under the shell (evicted, deleted, out of memory), not ended by
    /// the user nor failed by the runtime: why. The changes may be kept (see [`recover_lost_pod`]).
    Lost(String),
}

/// Exit code of a process killed by `SIGKILL` (an out-of-memory kill, a container stopped past its
/// grace period).
const KILLED: i32 = 128 + 9;

/// Reads a shell pod's state (pure).
pub fn pod_end(pod: &Pod) -> PodEnd {
    let status = pod.status.clone().unwrap_or_default();
    let container = status.container_statuses.as_ref().and_then(|all| all.first());
    if let Some(terminated) = container
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.terminated.as_ref())
    {
        let message = terminated.message.clone().unwrap_or_default();
        let last_line = message
            .lines()
            .rev()
            .find(|line| line.trim_start().starts_with('{'));
        return match last_line.map(serde_json::from_str::<ShellOutcome>) {
            Some(Ok(outcome)) if outcome.kept => {
                PodEnd::Lost("the shell pod was stopped (evicted or deleted)".into())
            }
            Some(Ok(outcome)) => PodEnd::Finished(outcome),
            _ if terminated.exit_code == KILLED => PodEnd::Lost(format!(
                "the shell pod was killed ({})",
                terminated.reason.clone().unwrap_or_else(|| "SIGKILL".into())
            )),
            _ => PodEnd::Failed(format!(
                "the shell pod ended (exit code {}, reason {}) without a result{}",
                terminated.exit_code,
                terminated.reason.clone().unwrap_or_else(|| "unknown".into()),
                if message.trim().is_empty() {
                    String::new()
                } else {
                    format!(": {}", message.trim())
                }
            )),
        };
    }
    if let Some(waiting) = container
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.waiting.as_ref())
    {
        let reason = waiting.reason.clone().unwrap_or_default();
        if matches!(
            reason.as_str(),
            "ErrImagePull"
                | "ImagePullBackOff"
                | "InvalidImageName"
                | "CreateContainerConfigError"
                | "CreateContainerError"
        ) {
            return PodEnd::Failed(format!(
                "the shell pod cannot start: {reason}: {}",
                waiting.message.clone().unwrap_or_default()
            ));
        }
    }
    match status.phase.as_deref() {
        Some("Running") => PodEnd::Running,
        // The kubelet evicts a pod under node pressure and keeps it, failed, with this reason.
        Some("Failed") if status.reason.as_deref() == Some("Evicted") => PodEnd::Lost(format!(
            "the shell pod was evicted: {}",
            status.message.unwrap_or_default()
        )),
        Some("Failed") => PodEnd::Failed(format!(
            "the shell pod failed: {}",
            status
                .message
                .unwrap_or_else(|| status.reason.unwrap_or_default())
        )),
        _ => PodEnd::Starting,
    }
}

/// What the image shell controller must do next (pure decision).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing to do until something changes (or `recheck` passes).
    Wait {
        /// When to look again.
        recheck: Option<Duration>,
    },
    /// Another shell, copy or save runs on the image: wait for it.
    WaitForImage {
        /// Who holds the image.
        holder: String,
    },
    /// Create the shell pod.
    CreatePod,
    /// The pod is scheduled but not running yet: record where, and whether emulated, so the plugin
    /// tells the user and attaches as soon as the container runs (the kubelet reports it running
    /// only on its next look at its containers, up to a second later).
    MarkScheduled,
    /// The pod runs: report Running.
    MarkRunning,
    /// The shell ended: record the outcome, delete the pod, await the decision.
    Record(ShellOutcome),
    /// The shell ended with no change: Discarded, delete the pod.
    NothingChanged(ShellOutcome),
    /// The pod failed: Failed with this message, delete the pod.
    Fail(String),
    /// The pod was lost under a running shell (evicted, deleted, killed): why
    /// ([`recover_lost_pod`] decides what follows).
    Lost(String),
    /// Make the shell pod again on `cluster_node`, where the changes are kept, after losing it (why).
    RestartPod {
        /// The cluster node whose walt cache holds the changes.
        cluster_node: String,
        /// What happened to the pod before.
        why: String,
    },
    /// Save the pushed digest as this image name.
    Save(String),
    /// The user decided to save as `image`, which another shell or save holds: wait for it.
    WaitForSaveTarget {
        /// The name the changes are saved as.
        image: String,
        /// Who holds it.
        holder: String,
    },
    /// Drop the changes.
    Discard,
    /// TTL or decision timeout: end, keeping the digest and moving no tag.
    Expire(String),
    /// The session is over: make sure the pod is gone.
    Cleanup,
}

/// A decided save waits while another shell or save holds the name it writes (pure): `save_as_holder` is
/// that holder (see [`crate::controller::shared::lock`]: a shell's `saveAs` name is claimed too).
pub fn wait_for_save_target(step: Step, save_as_holder: Option<&str>) -> Step {
    match (step, save_as_holder) {
        (Step::Save(image), Some(holder)) => Step::WaitForSaveTarget {
            image,
            holder: holder.to_owned(),
        },
        (step, _) => step,
    }
}

/// How many times a session's shell pod is made again after being lost.
pub const MAX_POD_RESTARTS: u32 = 3;

/// What follows a shell pod lost under a running shell (pure): made again on the cluster node that
/// keeps the changes, when the layer cache (where they are) outlives pods, the node is known and
/// fewer than [`MAX_POD_RESTARTS`] were made; else `Failed`, saying what happened to the changes.
pub fn recover_lost_pod(step: Step, status: &ShellSessionStatus, changes_outlive_pods: bool) -> Step {
    let Step::Lost(why) = step else {
        return step;
    };
    let restarts = status.pod_restarts.unwrap_or(0);
    match &status.cluster_node {
        Some(node) if changes_outlive_pods && restarts < MAX_POD_RESTARTS => Step::RestartPod {
            cluster_node: node.clone(),
            why,
        },
        Some(node) if changes_outlive_pods => Step::Fail(format!(
            "{why}, after {restarts} restarts: the session gives up; its changes stay in the walt cache of cluster node {node} for an hour, not saved"
        )),
        _ if changes_outlive_pods => Step::Fail(format!(
            "{why} before it ran anywhere known: the changes could not be found again"
        )),
        _ => Step::Fail(format!(
            "{why}: the changes were in the pod's own layer cache (emptyDir, the operator's --shell-cache) and went with it"
        )),
    }
}

/// Decides the next step of an image shell (pure).
///
/// `pod` is the session's pod if it exists, `holder` the other object that
/// holds the image right now (see [`crate::controller::shared::lock`]), `now` the current time.
pub fn next_step(
    session: &ShellSession,
    pod: Option<&Pod>,
    holder: Option<&str>,
    ttl: Duration,
    decision_timeout: Duration,
    now: Timestamp,
) -> Step {
    let status = session.status.clone().unwrap_or_default();
    if status.phase.is_finished() {
        return Step::Cleanup;
    }
    let age = session
        .creation_timestamp()
        .map(|created| now.duration_since(created.0).unsigned_abs())
        .unwrap_or_default();
    if status.phase == ShellSessionPhase::AwaitingDecision {
        if session.spec.discard {
            return Step::Discard;
        }
        if let Some(name) = &session.spec.save_as {
            return Step::Save(name.clone());
        }
        let waited = status
            .completion_time
            .map(|ended| now.duration_since(ended.0).unsigned_abs())
            .unwrap_or_default();
        if waited >= decision_timeout {
            return Step::Expire(format!(
                "no decision within {}: the changes stay at digest {} and no tag moved",
                walt_crds::format_duration(decision_timeout),
                status.result.and_then(|r| r.digest).unwrap_or_default()
            ));
        }
        return Step::Wait {
            recheck: Some(decision_timeout.saturating_sub(waited)),
        };
    }
    if age >= ttl {
        return Step::Expire(format!(
            "the session reached its ttl ({})",
            walt_crds::format_duration(ttl)
        ));
    }
    let until_ttl = Some(ttl.saturating_sub(age));
    match pod {
        None => match status.phase {
            ShellSessionPhase::Pending | ShellSessionPhase::Starting => match holder {
                Some(holder) => Step::WaitForImage {
                    holder: holder.to_owned(),
                },
                None => Step::CreatePod,
            },
            // The pod vanished under a running session (evicted, deleted, its node drained or lost).
            _ => Step::Lost("the shell pod disappeared before reporting a result".into()),
        },
        Some(pod) => match pod_end(pod) {
            PodEnd::Starting if status.cluster_node.is_none() && scheduled(pod) => Step::MarkScheduled,
            PodEnd::Starting => Step::Wait { recheck: until_ttl },
            // A pod made again after a loss reports Running once more (its Ready condition says so).
            PodEnd::Running if status.phase == ShellSessionPhase::Running && !restarting(&status) => {
                Step::Wait { recheck: until_ttl }
            }
            PodEnd::Running => Step::MarkRunning,
            PodEnd::Finished(outcome) if outcome.digest.is_none() => Step::NothingChanged(outcome),
            PodEnd::Finished(outcome) => Step::Record(outcome),
            PodEnd::Failed(message) => Step::Fail(message),
            PodEnd::Lost(message) => Step::Lost(message),
        },
    }
}

/// Whether the scheduler placed the pod on a cluster node (pure).
fn scheduled(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|spec| spec.node_name.as_deref())
        .is_some_and(|node| !node.is_empty())
}

/// Whether the session's shell pod is being made again after a loss (pure): its Ready condition.
fn restarting(status: &ShellSessionStatus) -> bool {
    status
        .conditions
        .iter()
        .any(|c| c.type_ == READY && c.reason == reasons::SHELL_POD_LOST)
}

/// What a user is told when an image shell starts (pure): whether it runs emulated and which shell it is.
/// Known as soon as the pod is scheduled, long before the runtime reports it at the end of the shell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShellAtStart {
    /// `Some(true)` when the image's CPU differs from the cluster node's (qemu-user runs it);
    /// `None` when either architecture is unknown.
    pub emulated: Option<bool>,
    /// `Init` or `Basic`: the session's explicit choice, else what the image's layers say.
    pub mode: Option<ImageShellMode>,
}

/// Compares the Image's platform with the architecture of the cluster node the shell pod runs on
/// ([`emulated_on`]) and resolves `mode: Auto`.
pub fn shell_at_start(
    session_mode: &ShellMode,
    image: Option<&walt_crds::ImageStatus>,
    cluster_node: Option<&k8s_openapi::api::core::v1::Node>,
) -> ShellAtStart {
    let image_architecture = image
        .and_then(|status| status.platform.as_ref())
        .map(|platform| platform.architecture.as_str())
        .filter(|architecture| !architecture.is_empty());
    let emulated = emulated_on(image_architecture, cluster_node);
    let mode = match session_mode {
        ShellMode::Init => Some(ImageShellMode::Init),
        ShellMode::Basic => Some(ImageShellMode::Basic),
        ShellMode::Auto => image.and_then(|status| status.shell_mode),
    };
    ShellAtStart { emulated, mode }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::shared::pods::cluster_node_of;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use walt_crds::{ShellResult, ShellSessionSpec, ShellSessionStatus};

    const HOUR: Duration = Duration::from_hours(1);

    fn image_status(architecture: &str, mode: Option<ImageShellMode>) -> walt_crds::ImageStatus {
        walt_crds::ImageStatus {
            platform: Some(walt_crds::Platform {
                os: "linux".into(),
                architecture: architecture.into(),
                variant: None,
            }),
            shell_mode: mode,
            ..walt_crds::ImageStatus::default()
        }
    }

    #[test]
    fn the_start_of_a_shell_says_whether_it_is_emulated_and_which_shell() {
        let arm = image_status("arm64", Some(ImageShellMode::Init));
        let amd = cluster_node_of("n1", "amd64");
        assert_eq!(
            shell_at_start(&ShellMode::Auto, Some(&arm), Some(&amd)),
            ShellAtStart {
                emulated: Some(true),
                mode: Some(ImageShellMode::Init)
            }
        );
        let native = image_status("amd64", Some(ImageShellMode::Init));
        assert_eq!(
            shell_at_start(&ShellMode::Basic, Some(&native), Some(&amd)),
            ShellAtStart {
                emulated: Some(false),
                mode: Some(ImageShellMode::Basic)
            }
        );
        // Unknown either side: no claim either way.
        assert_eq!(shell_at_start(&ShellMode::Auto, Some(&arm), None).emulated, None);
        assert_eq!(
            shell_at_start(&ShellMode::Auto, None, Some(&amd)),
            ShellAtStart {
                emulated: None,
                mode: None
            }
        );
    }

    fn session() -> ShellSession {
        let mut session = ShellSession::new(
            "s1",
            ShellSessionSpec {
                image: Some("debian".into()),
                ..ShellSessionSpec::default()
            },
        );
        session.metadata.namespace = Some("alice".into());
        session.metadata.uid = Some("0a1b2c3d-4e5f-6789-abcd-ef0123456789".into());
        session.metadata.creation_timestamp = Some(Time(Timestamp::from_second(1_000).expect("time")));
        session
    }

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(second).expect("time")
    }

    fn inputs(cache: &LayerCache, user_namespaces: bool) -> ShellPodInputs<'_> {
        ShellPodInputs {
            runtime_image: "reg.lab/walt/operator:1",
            image_reference: "reg.lab/alice/debian@sha256:abc",
            commit_to: "reg.lab/alice/debian:shell-0a1b2c3d4e5f",
            insecure_registry: None,
            user_namespaces,
            cache,
            registry_credentials: false,
            image_architecture: Some("arm64"),
            cluster_node: None,
        }
    }

    fn pod_with(status: serde_json::Value) -> Pod {
        let cache = LayerCache::EmptyDir;
        let mut pod = build_shell_pod(&session(), &inputs(&cache, false));
        pod.status = Some(serde_json::from_value(status).expect("pod status"));
        pod
    }

    fn terminated(message: &str, exit_code: i32) -> Pod {
        pod_with(serde_json::json!({
            "phase": if exit_code == 0 { "Succeeded" } else { "Failed" },
            "containerStatuses": [{"name": "shell", "ready": false, "restartCount": 0, "image": "x", "imageID": "y",
                "state": {"terminated": {"exitCode": exit_code, "reason": "Completed", "message": message}}}]
        }))
    }

    #[test]
    fn user_namespaced_pod() {
        let cache = LayerCache::HostPath("/var/lib/walt/cache".into());
        let pod = build_shell_pod(&session(), &inputs(&cache, true));
        assert_eq!(pod.name_any(), "walt-shell-s1");
        crate::controller::shared::runtime::assert_placed_for(
            &pod.metadata,
            "walt-run-alice",
            "ShellSession",
            &session(),
        );
        assert_eq!(pod.labels()[SESSION_LABEL], "s1");
        let spec = pod.spec.expect("spec");
        assert_eq!(spec.host_users, Some(false));
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        assert_eq!(
            spec.affinity,
            prefer_architecture(Some("arm64")),
            "an arm64 image's shell prefers arm64 cluster nodes"
        );
        let container = &spec.containers[0];
        assert_eq!((container.tty, container.stdin), (Some(true), Some(true)));
        let security = container.security_context.clone().expect("security context");
        assert_eq!(security.privileged, None);
        assert!(
            security
                .capabilities
                .expect("caps")
                .add
                .expect("add")
                .contains(&"SYS_ADMIN".to_owned())
        );
        assert_eq!(
            container.args.clone().expect("args").join(" "),
            "shell --image reg.lab/alice/debian@sha256:abc --mode auto --commit-to \
             reg.lab/alice/debian:shell-0a1b2c3d4e5f --cache-dir /var/cache/walt \
             --keep-changes-as 0a1b2c3d-4e5f-6789-abcd-ef0123456789"
        );
        let volume = &spec.volumes.expect("volumes")[0];
        assert_eq!(
            volume.host_path.clone().expect("hostPath").path,
            "/var/lib/walt/cache"
        );
    }

    #[test]
    fn a_pod_made_again_goes_to_the_node_that_keeps_the_changes() {
        let cache = LayerCache::HostPath("/var/lib/walt/cache".into());
        let mut again = inputs(&cache, true);
        again.cluster_node = Some("worker-1");
        let spec = build_shell_pod(&session(), &again).spec.expect("spec");
        assert_eq!(spec.affinity, Some(pinned_to("worker-1")));
        // With an emptyDir cache nothing outlives the pod: no changes are kept.
        let cache = LayerCache::EmptyDir;
        let spec = build_shell_pod(&session(), &inputs(&cache, true))
            .spec
            .expect("spec");
        let args = spec.containers[0].args.clone().expect("args");
        assert!(!args.contains(&"--keep-changes-as".to_owned()), "{args:?}");
    }

    #[test]
    fn privileged_pod_when_no_user_namespaces() {
        let cache = LayerCache::EmptyDir;
        let pod = build_shell_pod(&session(), &inputs(&cache, false));
        let spec = pod.spec.expect("spec");
        assert_eq!(spec.host_users, None);
        assert_eq!(
            spec.containers[0]
                .security_context
                .clone()
                .expect("sc")
                .privileged,
            Some(true)
        );
        assert!(spec.volumes.expect("volumes")[0].empty_dir.is_some());
    }

    #[test]
    fn scratch_tag_comes_from_the_uid() {
        assert_eq!(scratch_tag(&session()), "shell-0a1b2c3d4e5f");
    }

    #[test]
    fn termination_message_is_parsed() {
        let message = r#"{"digest":"sha256:d1","reference":"r:shell-x","summary":{"added":2,"modified":1,"deleted":3,"bytes":10},"emulated":true,"architecture":"arm64","mode":"init","exitCode":0}"#;
        let PodEnd::Finished(outcome) = pod_end(&terminated(message, 0)) else {
            panic!("not finished")
        };
        assert_eq!(outcome.digest.as_deref(), Some("sha256:d1"));
        assert_eq!(outcome.summary.deleted, 3);
        assert!(outcome.emulated);
        assert_eq!(outcome.image_shell_mode(), Some(ImageShellMode::Init));
        let PodEnd::Failed(why) = pod_end(&terminated("mount: permission denied", 1)) else {
            panic!("not failed")
        };
        assert!(
            why.contains("without a result: mount: permission denied"),
            "{why}"
        );
    }

    #[test]
    fn pull_errors_fail_the_session() {
        let pod = pod_with(
            serde_json::json!({"phase": "Pending", "containerStatuses": [{"name": "shell",
            "ready": false, "restartCount": 0, "image": "x", "imageID": "",
            "state": {"waiting": {"reason": "ImagePullBackOff", "message": "not found"}}}]}),
        );
        assert!(matches!(pod_end(&pod), PodEnd::Failed(why) if why.contains("ImagePullBackOff")));
    }

    #[test]
    fn lifecycle() {
        let mut s = session();
        let now = at(1_100);
        assert_eq!(next_step(&s, None, None, HOUR, HOUR, now), Step::CreatePod);
        assert_eq!(
            next_step(&s, None, Some("NodeSave/save1"), HOUR, HOUR, now),
            Step::WaitForImage {
                holder: "NodeSave/save1".into()
            }
        );
        let running = pod_with(serde_json::json!({"phase": "Running"}));
        assert_eq!(
            next_step(&s, Some(&running), None, HOUR, HOUR, now),
            Step::MarkRunning
        );
        s.status = Some(ShellSessionStatus {
            phase: ShellSessionPhase::Running,
            ..ShellSessionStatus::default()
        });
        assert!(matches!(
            next_step(&s, Some(&running), None, HOUR, HOUR, now),
            Step::Wait { .. }
        ));
        let done = terminated(
            r#"{"digest":"sha256:d1","summary":{"added":1},"mode":"basic","exitCode":0}"#,
            0,
        );
        assert!(
            matches!(next_step(&s, Some(&done), None, HOUR, HOUR, now), Step::Record(o) if o.digest.is_some())
        );
        let unchanged = terminated(r#"{"digest":null,"mode":"basic","exitCode":0}"#, 0);
        assert!(matches!(
            next_step(&s, Some(&unchanged), None, HOUR, HOUR, now),
            Step::NothingChanged(_)
        ));
        assert!(matches!(
            next_step(&s, None, None, HOUR, HOUR, now),
            Step::Lost(_)
        ));
        // Past the ttl.
        assert!(matches!(
            next_step(&s, Some(&running), None, HOUR, HOUR, at(1_000 + 3_600)),
            Step::Expire(_)
        ));
    }

    #[test]
    fn a_scheduled_pod_is_recorded_once_before_it_runs() {
        let mut s = session();
        s.status = Some(ShellSessionStatus {
            phase: ShellSessionPhase::Starting,
            pod: Some("walt-shell-s".into()),
            ..ShellSessionStatus::default()
        });
        let now = at(1_100);
        let pending = pod_with(serde_json::json!({"phase": "Pending"}));
        assert!(
            matches!(
                next_step(&s, Some(&pending), None, HOUR, HOUR, now),
                Step::Wait { .. }
            ),
            "not scheduled yet: nothing to say"
        );
        let mut scheduled = pending.clone();
        scheduled.spec.get_or_insert_default().node_name = Some("worker-1".into());
        assert_eq!(
            next_step(&s, Some(&scheduled), None, HOUR, HOUR, now),
            Step::MarkScheduled
        );
        if let Some(status) = s.status.as_mut() {
            status.cluster_node = Some("worker-1".into());
        }
        assert!(
            matches!(
                next_step(&s, Some(&scheduled), None, HOUR, HOUR, now),
                Step::Wait { .. }
            ),
            "recorded: the kubelet's report of the running container is next"
        );
        let running = pod_with(serde_json::json!({"phase": "Running"}));
        assert_eq!(
            next_step(&s, Some(&running), None, HOUR, HOUR, now),
            Step::MarkRunning
        );
    }

    #[test]
    fn a_pod_stopped_killed_or_evicted_under_the_shell_is_lost_not_failed() {
        let kept = terminated(
            r#"{"digest":null,"mode":"basic","exitCode":129,"kept":true}"#,
            129,
        );
        assert!(matches!(pod_end(&kept), PodEnd::Lost(why) if why.contains("stopped")));
        let killed = terminated("", 137);
        assert!(matches!(pod_end(&killed), PodEnd::Lost(why) if why.contains("killed")));
        let evicted = pod_with(serde_json::json!({"phase": "Failed", "reason": "Evicted",
            "message": "The node was low on resource: ephemeral-storage."}));
        assert!(
            matches!(pod_end(&evicted), PodEnd::Lost(why) if why.contains("evicted") && why.contains("ephemeral"))
        );
        // A runtime that failed by itself (its own words, its own exit code) is not a loss.
        let failed = terminated("walt-operator: registry unreachable", 1);
        assert!(matches!(pod_end(&failed), PodEnd::Failed(_)));
    }

    #[test]
    fn a_lost_pod_is_made_again_where_the_changes_are_until_the_limit() {
        let lost = || Step::Lost("the shell pod was evicted".into());
        let mut status = ShellSessionStatus {
            phase: ShellSessionPhase::Running,
            cluster_node: Some("worker-1".into()),
            ..ShellSessionStatus::default()
        };
        assert_eq!(
            recover_lost_pod(lost(), &status, true),
            Step::RestartPod {
                cluster_node: "worker-1".into(),
                why: "the shell pod was evicted".into()
            }
        );
        let Step::Fail(why) = recover_lost_pod(lost(), &status, false) else {
            panic!("an emptyDir cache cannot give the changes back")
        };
        assert!(why.contains("emptyDir") && why.contains("went with it"), "{why}");
        status.pod_restarts = Some(MAX_POD_RESTARTS);
        let Step::Fail(why) = recover_lost_pod(lost(), &status, true) else {
            panic!("no end to restarts")
        };
        assert!(
            why.contains("worker-1") && why.contains("after 3 restarts"),
            "{why}"
        );
        status.cluster_node = None;
        assert!(matches!(recover_lost_pod(lost(), &status, true), Step::Fail(_)));
        // Other steps pass through.
        assert_eq!(recover_lost_pod(Step::CreatePod, &status, true), Step::CreatePod);
    }

    #[test]
    fn a_pod_made_again_is_marked_running_again() {
        let mut s = session();
        let running = pod_with(serde_json::json!({"phase": "Running"}));
        s.status = Some(ShellSessionStatus {
            phase: ShellSessionPhase::Running,
            conditions: vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
                type_: READY.into(),
                status: "False".into(),
                reason: reasons::SHELL_POD_LOST.into(),
                message: "evicted".into(),
                last_transition_time: Time(at(1_000)),
                observed_generation: None,
            }],
            ..ShellSessionStatus::default()
        });
        assert_eq!(
            next_step(&s, Some(&running), None, HOUR, HOUR, at(1_100)),
            Step::MarkRunning
        );
    }

    #[test]
    fn decision() {
        let mut s = session();
        s.status = Some(ShellSessionStatus {
            phase: ShellSessionPhase::AwaitingDecision,
            completion_time: Some(Time(at(2_000))),
            result: Some(ShellResult {
                image: None,
                digest: Some("sha256:d1".into()),
            }),
            ..ShellSessionStatus::default()
        });
        assert_eq!(
            next_step(&s, None, None, HOUR, HOUR, at(2_100)),
            Step::Wait {
                recheck: Some(Duration::from_secs(3_500))
            }
        );
        let Step::Expire(why) = next_step(&s, None, None, HOUR, HOUR, at(5_600)) else {
            panic!("no expiry")
        };
        assert!(why.contains("sha256:d1") && why.contains("no tag moved"), "{why}");
        s.spec.save_as = Some("debian:v2".into());
        assert_eq!(
            next_step(&s, None, None, HOUR, HOUR, at(2_100)),
            Step::Save("debian:v2".into())
        );
        s.spec.save_as = None;
        s.spec.discard = true;
        assert_eq!(next_step(&s, None, None, HOUR, HOUR, at(2_100)), Step::Discard);
        assert_eq!(
            wait_for_save_target(Step::Save("x".into()), Some("NodeSave/s1")),
            Step::WaitForSaveTarget {
                image: "x".into(),
                holder: "NodeSave/s1".into()
            }
        );
        assert_eq!(
            wait_for_save_target(Step::Save("x".into()), None),
            Step::Save("x".into())
        );
        assert_eq!(
            wait_for_save_target(Step::Discard, Some("NodeSave/s1")),
            Step::Discard
        );
        s.status.as_mut().expect("status").phase = ShellSessionPhase::Saved;
        assert_eq!(next_step(&s, None, None, HOUR, HOUR, at(2_100)), Step::Cleanup);
    }

    #[test]
    fn user_namespaces_need_every_runtime_to_say_so() {
        use k8s_openapi::api::core::v1::{Node, NodeRuntimeHandler, NodeRuntimeHandlerFeatures, NodeStatus};
        let node = |user_namespaces: Option<bool>| Node {
            status: Some(NodeStatus {
                runtime_handlers: user_namespaces.map(|supported| {
                    vec![NodeRuntimeHandler {
                        name: Some(String::new()),
                        features: Some(NodeRuntimeHandlerFeatures {
                            user_namespaces: Some(supported),
                            ..NodeRuntimeHandlerFeatures::default()
                        }),
                    }]
                }),
                ..NodeStatus::default()
            }),
            ..Node::default()
        };
        assert!(runtimes_support_user_namespaces(&[
            node(Some(true)),
            node(Some(true))
        ]));
        assert!(!runtimes_support_user_namespaces(&[node(Some(true)), node(None)]));
        assert!(!runtimes_support_user_namespaces(&[node(Some(false))]));
        assert!(!runtimes_support_user_namespaces(&[]));
    }
}
