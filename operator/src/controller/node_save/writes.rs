//! The status writes of a running save task: each conditional on the version of the NodeSave the
//! task's last own write left (the first on the version its `Running` went onto), so the task's
//! writes go on from each other (its progress, `Pushing`, its end) while any other write in between
//! makes the next one refused; then the NodeSave is read again and [`after_refusal`] decides whether
//! the task writes again or stops.

use kube::{Api, ResourceExt};
use walt_crds::{NodeSave, NodeSaveStatus};

use super::decide::{Refusal, TaskWrite, after_refusal};
use crate::controller::shared::context::Context;
use crate::controller::shared::error::{Error, KubeResultExt};

/// How many times one write is made again on a NodeSave that keeps changing under it.
const ATTEMPTS: usize = 3;

/// Why a save task's status write was not made.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// Someone else decided meanwhile ([`Refusal::Stop`]): the task stops (why).
    #[error("{0}")]
    Overtaken(String),
    /// The API server could not be asked (the task decides whether that matters).
    #[error(transparent)]
    Api(#[from] Error),
}

/// The chain of one task's status writes (shared by the task and its progress reporter; one write
/// at a time).
#[derive(Debug)]
pub struct StatusWrites {
    state: tokio::sync::Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// The NodeSave as the last own write left it: the next write is conditional on its version.
    last: NodeSave,
    /// A status written since whose answer was lost (it may have landed).
    attempted: Option<NodeSaveStatus>,
}

impl StatusWrites {
    /// The chain going on from `written`, the NodeSave as the task's first status write left it.
    pub fn new(written: NodeSave) -> Self {
        Self {
            state: tokio::sync::Mutex::new(State {
                last: written,
                attempted: None,
            }),
        }
    }

    /// Writes `status` onto the version the last own write left; when another write came between,
    /// reads the NodeSave again and writes again or stops, as [`after_refusal`] decides.
    pub async fn write(
        &self,
        context: &Context,
        status: &NodeSaveStatus,
        write: TaskWrite,
    ) -> Result<(), Refused> {
        let mut state = self.state.lock().await;
        let namespace = state.last.namespace().unwrap_or_default();
        let name = state.last.name_any();
        let api: Api<NodeSave> = Api::namespaced(context.client.clone(), &namespace);
        for _ in 0..ATTEMPTS {
            match context.apply_status_of(&api, &state.last, status).await {
                Ok(written) => {
                    state.last = written;
                    state.attempted = None;
                    return Ok(());
                }
                Err(Error::Stale(_)) => {}
                Err(error) => {
                    state.attempted = Some(status.clone());
                    return Err(Refused::Api(error));
                }
            }
            let current = api
                .get_opt(&name)
                .await
                .context(|| format!("reading NodeSave {namespace}/{name} again"))?;
            let uid = state.last.uid().unwrap_or_default();
            let ours: Vec<&NodeSaveStatus> =
                state.last.status.iter().chain(state.attempted.as_ref()).collect();
            let refusal = after_refusal(&uid, &ours, status, current.as_ref(), write);
            tracing::info!(
                ?refusal,
                ?write,
                "a save's status write was refused: the NodeSave changed"
            );
            match (refusal, current) {
                (Refusal::Stop(why), _) => return Err(Refused::Overtaken(why)),
                (_, None) => return Err(Refused::Overtaken("the NodeSave was deleted".into())),
                (Refusal::Landed, Some(current)) => {
                    state.last = current;
                    state.attempted = None;
                    return Ok(());
                }
                (Refusal::WriteAgain, Some(current)) => state.last = current,
            }
        }
        Err(Refused::Overtaken(format!(
            "its status kept changing under this run's writes ({ATTEMPTS} refused in a row)"
        )))
    }
}
