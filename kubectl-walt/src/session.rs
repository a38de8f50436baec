//! Shell sessions the plugin creates: creation, following the status while the operator starts
//! them (with the operator's events as progress), and cleanup on every exit path.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use walt_crds::{ShellSession, ShellSessionPhase, ShellSessionSpec};

use crate::cluster::{Ctx, event_time, tick};
use crate::error::{Error, Op, Result};
use crate::format::clock;
use crate::resolve::name_of;
use crate::watch::LiveLine;

/// A spec with the API's defaults (`ShellSessionSpec::default()` has empty durations, which the
/// API server refuses; serde's defaults are the API's).
pub fn spec_defaults() -> ShellSessionSpec {
    ShellSessionSpec {
        idle_timeout: walt_crds::shell_session::DEFAULT_IDLE_TIMEOUT.to_string(),
        ttl: walt_crds::shell_session::DEFAULT_TTL.to_string(),
        ..ShellSessionSpec::default()
    }
}

/// A ShellSession the plugin created, deleted by [`Created::delete`] on every path out.
#[derive(Debug)]
pub struct Created {
    /// The session's name.
    pub name: String,
    /// The namespace.
    pub namespace: String,
}

/// Creates a ShellSession with a generated name (`<target>-shell-xxxxx`).
pub async fn create(ctx: &Ctx, target: &str, spec: ShellSessionSpec) -> Result<Created> {
    let mut session = ShellSession::new("", spec);
    session.metadata.name = None;
    session.metadata.generate_name = Some(format!("{}-shell-", target.replace('.', "-")));
    session.metadata.labels = Some(
        [(
            "app.kubernetes.io/created-by".to_string(),
            "kubectl-walt".to_string(),
        )]
        .into(),
    );
    let created = ctx
        .sessions()
        .create(&PostParams::default(), &session)
        .await
        .map_err(|e| {
            Error::api(
                Op::collection(
                    "create",
                    "shell session",
                    "shellsessions.walt.dev",
                    &ctx.namespace,
                ),
                e,
            )
        })?;
    Ok(Created {
        name: name_of(&created),
        namespace: ctx.namespace.clone(),
    })
}

impl Created {
    /// Reads the session.
    pub async fn get(&self, ctx: &Ctx) -> Result<ShellSession> {
        self.get_once(ctx).await.map_err(|e| self.get_error(e))
    }

    /// Reads the session, riding out an API server that does not answer (a restart, a network blip) for
    /// up to [`OUTAGE_GRACE`], saying so on `line`; a refusal fails at once.
    pub async fn get_through_outages(&self, ctx: &Ctx, line: &mut LiveLine) -> Result<ShellSession> {
        let since = Instant::now();
        loop {
            match self.get_once(ctx).await {
                Ok(session) => return Ok(session),
                Err(error) if may_pass(&error) && since.elapsed() < OUTAGE_GRACE => {
                    line.show(&format!(
                        "the cluster's API server does not answer ({error}); trying again ({})",
                        clock(since.elapsed())
                    ));
                    tick().await;
                }
                Err(error) => return Err(self.get_error(error)),
            }
        }
    }

    async fn get_once(&self, ctx: &Ctx) -> std::result::Result<ShellSession, kube::Error> {
        ctx.sessions().get(&self.name).await
    }

    fn get_error(&self, e: kube::Error) -> Error {
        Error::api(
            Op::named(
                "get",
                "shell session",
                "shellsessions.walt.dev",
                &self.name,
                &self.namespace,
            ),
            e,
        )
    }

    /// Sets fields of the spec (`saveAs`, `discard`).
    pub async fn patch_spec(&self, ctx: &Ctx, spec: serde_json::Value) -> Result<()> {
        ctx.sessions()
            .patch(
                &self.name,
                &PatchParams::default(),
                &Patch::Merge(&serde_json::json!({"spec": spec})),
            )
            .await
            .map_err(|e| {
                Error::api(
                    Op::named(
                        "patch",
                        "shell session",
                        "shellsessions.walt.dev",
                        &self.name,
                        &self.namespace,
                    ),
                    e,
                )
            })?;
        Ok(())
    }

    /// Deletes the session (best effort: the operator's TTL is the safety net), saying so if
    /// it fails.
    pub async fn delete(&self, ctx: &Ctx) {
        match ctx.sessions().delete(&self.name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => eprintln!(
                "warning: could not delete shell session {}: {e}; the operator removes it when its TTL ends (or: kubectl delete shellsession {} -n {})",
                self.name, self.name, self.namespace
            ),
        }
    }

    /// Follows the session until `done` says so, showing the phase and the operator's events
    /// (pulls, unpacking, emulation) on a status line. A finished phase that `done` did not
    /// accept is an error with the session's own reason.
    pub async fn follow(
        &self,
        ctx: &Ctx,
        what: &str,
        done: &dyn Fn(&ShellSession) -> bool,
    ) -> Result<ShellSession> {
        let start = Instant::now();
        let mut line = LiveLine::stderr();
        let mut seen_events: HashSet<String> = HashSet::new();
        let mut last_event = String::new();
        let mut changes = crate::cluster::changes_of(ctx.sessions(), &self.name);
        loop {
            let session = self.get_through_outages(ctx, &mut line).await?;
            if done(&session) {
                line.finish();
                return Ok(session);
            }
            let status = session.status.clone().unwrap_or_default();
            if status.phase.is_finished() {
                line.finish();
                return Err(Error::Failed(format!(
                    "the shell session {} ended ({:?}): {}",
                    self.name,
                    status.phase,
                    failure_reason(&session)
                )));
            }
            // The operator's events (and the shell pod's, in the runtime namespace) say what is
            // happening right now.
            let mut events = ctx
                .events_for(&session.metadata.uid.clone().unwrap_or_default())
                .await;
            if let Some(pod) = shell_pod(ctx, &session)
                && let Some(uid) = pod_uid(ctx, &pod).await
            {
                events.extend(ctx.events_in(&pod.namespace, &uid).await);
            }
            events.sort_by_key(event_time);
            for event in events {
                let key =
                    event.metadata.name.clone().unwrap_or_default() + &event.count.unwrap_or(1).to_string();
                if seen_events.insert(key)
                    && let Some(message) = event.message.clone()
                {
                    last_event = message;
                }
            }
            let phase = format!("{:?}", status.phase);
            let detail = if last_event.is_empty() {
                String::new()
            } else {
                format!(": {last_event}")
            };
            line.show(&format!("{what} {phase}{detail}  ({})", clock(start.elapsed())));
            crate::cluster::next_change(&mut changes).await;
        }
    }
}

/// How long the plugin rides out an API server that does not answer while a session goes on: longer than
/// an API server's restart, short enough that a cluster gone for good is said.
pub const OUTAGE_GRACE: Duration = Duration::from_mins(2);

/// Whether an API error may pass by itself (pure): the API server unreachable, restarting, or answering
/// 5xx/429. A refusal (another 4xx) or a malformed answer stays.
pub fn may_pass(error: &kube::Error) -> bool {
    match error {
        kube::Error::Api(status) => status.code >= 500 || status.code == 429,
        kube::Error::HyperError(_) | kube::Error::Service(_) | kube::Error::UpgradeConnection(_) => true,
        _ => false,
    }
}

/// A pod walt runs for the tenant (a shell pod, a build pod): its name and namespace, as the
/// object's status names them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuntimePod {
    /// The pod's namespace: the tenant's runtime namespace (`walt-run-<namespace>`).
    pub namespace: String,
    /// The pod's name.
    pub name: String,
}

impl RuntimePod {
    /// The pod a status names (pure): `pod` in `pod_namespace`, else in `fallback` (where an
    /// operator that wrote no `podNamespace` put it). `None` while the status names no pod.
    pub fn named(
        pod: Option<&String>,
        pod_namespace: Option<&String>,
        fallback: impl FnOnce() -> String,
    ) -> Option<RuntimePod> {
        Some(RuntimePod {
            name: pod?.clone(),
            namespace: pod_namespace.cloned().unwrap_or_else(fallback),
        })
    }

    /// Attaches to the pod with `params`, in its own namespace; `what` names it in errors
    /// (`attachment to the shell pod`).
    pub async fn attach(
        &self,
        ctx: &Ctx,
        params: &kube::api::AttachParams,
        what: &'static str,
    ) -> Result<kube::api::AttachedProcess> {
        ctx.pods_in(&self.namespace)
            .attach(&self.name, params)
            .await
            .map_err(|e| {
                Error::api(
                    Op::named("create", what, "pods/attach", &self.name, &self.namespace),
                    e,
                )
            })
    }

    /// Attaches to the pod's TTY (its PID 1's terminal), in its own namespace.
    pub async fn attach_tty(&self, ctx: &Ctx) -> Result<kube::api::AttachedProcess> {
        self.attach(
            ctx,
            &kube::api::AttachParams::interactive_tty(),
            "attachment to the shell pod",
        )
        .await
    }

    /// The pod, when it exists and can be read.
    pub async fn get(&self, ctx: &Ctx) -> Option<k8s_openapi::api::core::v1::Pod> {
        ctx.pods_in(&self.namespace).get_opt(&self.name).await.ok()?
    }
}

/// The shell pod of a session, from its status (pure): `status.pod` in `status.podNamespace`, else
/// (an operator from before runtime namespaces said none) in the tenant's runtime namespace.
pub fn shell_pod(ctx: &Ctx, session: &ShellSession) -> Option<RuntimePod> {
    shell_pod_of(&ctx.namespace, session)
}

/// The uid of a shell pod, when it exists and can be read.
async fn pod_uid(ctx: &Ctx, pod: &RuntimePod) -> Option<String> {
    pod.get(ctx).await?.metadata.uid
}

/// [`shell_pod`] for the tenant namespace `namespace` (pure).
pub fn shell_pod_of(namespace: &str, session: &ShellSession) -> Option<RuntimePod> {
    let status = session.status.as_ref()?;
    RuntimePod::named(status.pod.as_ref(), status.pod_namespace.as_ref(), || {
        walt_crds::runtime_namespace(namespace)
    })
}

/// The message of the latest condition that is not True, for failed sessions.
pub fn failure_reason(session: &ShellSession) -> String {
    session
        .status
        .as_ref()
        .and_then(|s| {
            s.conditions
                .iter()
                .rev()
                .find(|c| c.status != "True" || c.type_ == "Complete")
        })
        .map_or_else(
            || format!("see `kubectl describe shellsession {}`", name_of(session)),
            |c| format!("{} ({})", c.message, c.reason),
        )
}

/// Whether the session is running (and, for image shells, has its pod).
pub fn running(session: &ShellSession) -> bool {
    session
        .status
        .as_ref()
        .is_some_and(|s| s.phase == ShellSessionPhase::Running)
}

/// Whether an image shell's pod may be attached to (pure): the session runs, or its pod is scheduled
/// and starting. The operator records where a pod was scheduled before the kubelet reports its
/// container running (the kubelet sees a started container on its next look, up to a second later),
/// so the plugin tries to attach from then on and the prompt comes as soon as the shell runs.
pub fn attachable(session: &ShellSession) -> bool {
    session.status.as_ref().is_some_and(|s| {
        s.pod.is_some()
            && (s.phase == ShellSessionPhase::Running
                || (s.phase == ShellSessionPhase::Starting && s.cluster_node.is_some()))
    })
}

/// Sessions made by the plugin for a target, oldest first (for messages about busy images).
pub async fn sessions_on_image(ctx: &Ctx, image: &str) -> Vec<ShellSession> {
    let list = ctx
        .sessions()
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default();
    list.into_iter()
        .filter(|s| s.spec.image.as_deref() == Some(image))
        .filter(|s| s.status.as_ref().is_none_or(|st| !st.phase.is_finished()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use walt_crds::{ShellSessionSpec, ShellSessionStatus};

    #[test]
    fn the_shell_pod_is_in_the_runtime_namespace_the_status_names() {
        let mut session = ShellSession::new("s1", ShellSessionSpec::default());
        assert_eq!(shell_pod_of("alice", &session), None, "no status yet");
        session.status = Some(ShellSessionStatus {
            pod: Some("walt-shell-s1".into()),
            pod_namespace: Some("walt-run-alice".into()),
            ..ShellSessionStatus::default()
        });
        assert_eq!(
            shell_pod_of("alice", &session),
            Some(RuntimePod {
                namespace: "walt-run-alice".into(),
                name: "walt-shell-s1".into()
            })
        );
        if let Some(status) = session.status.as_mut() {
            status.pod_namespace = None;
        }
        let pod = shell_pod_of(
            "a-very-long-tenant-name-that-does-not-fit-the-prefix-of-63-char",
            &session,
        )
        .expect("a pod");
        assert_eq!(
            pod.namespace,
            walt_crds::runtime_namespace("a-very-long-tenant-name-that-does-not-fit-the-prefix-of-63-char")
        );
        assert_eq!(pod.namespace.len(), 63);
    }
}
