//! Node save as a library: the node's change set, streamed once over SSH, becomes one layer pushed on
//! top of the image the node booted, **by digest** (no tag moves here). Both `walt-operator save` and
//! the NodeSave controller call [`push_node_changes`]; each moves its tag afterwards, only on success.
//!
//! Pipeline (one pass, no temporary file): node `tar` → [`export::RemoteTarReader`] →
//! [`export::filter_change_set`] (blocking thread) → [`export::change_set_pipe`] →
//! [`RegistryClient::push_on_top`] (compress, hash, chunked upload).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::export::{self, ChangeSummary, ExportPlan, Progress};
use super::{NodeClient, SshError};
use crate::oci::{ChangeSource, CommitOptions, Compression, PushedImage, RegistryClient, ResolvedImage};

/// How far a save is: a snapshot of [`Progress`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SaveProgress {
    /// Bytes received from the node so far.
    pub bytes: u64,
    /// Entries written to the change set so far.
    pub files: u64,
}

impl SaveProgress {
    /// The current values of shared counters.
    pub fn of(progress: &Progress) -> Self {
        Self {
            bytes: progress.bytes.load(Ordering::Relaxed),
            files: progress.files.load(Ordering::Relaxed),
        }
    }
}

/// What to build from the node's changes.
#[derive(Debug, Clone)]
pub struct SaveOptions {
    /// Where the new image goes: `registry/repository` (a tag there is ignored).
    pub repository: String,
    /// Layer compression.
    pub compression: Compression,
    /// The history entry's `created_by`.
    pub created_by: String,
    /// How often the progress callback is called while the save runs.
    pub progress_interval: Duration,
}

/// What a successful save pushed (by digest only).
#[derive(Debug, Clone)]
pub struct NodeSaved {
    /// What the change set held.
    pub summary: ChangeSummary,
    /// The new image.
    pub pushed: PushedImage,
    /// Final counters.
    pub progress: SaveProgress,
}

/// Why a save failed: the node side, or the registry side.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    /// The node (or the connection to it) failed: its error is the cause.
    #[error("{0}")]
    Node(#[from] SshError),
    /// The registry refused or failed the push.
    #[error("{0}")]
    Registry(#[from] crate::oci::Error),
    /// A worker thread of the pipeline died.
    #[error("node save pipeline: {0}")]
    Internal(String),
}

/// Streams the node's change set (per `plan`, from [`export::plan`]) into a new image = `base` + one
/// layer, pushed by digest to `options.repository`. Calls `on_progress` every
/// `options.progress_interval` while it runs (from this task: no `'static` needed). A node or
/// connection failure aborts the push, so nothing incomplete is ever pushed; no tag is moved.
pub async fn push_node_changes(
    client: &NodeClient,
    plan: &ExportPlan,
    registry: &RegistryClient,
    base: &ResolvedImage,
    options: &SaveOptions,
    mut on_progress: impl FnMut(SaveProgress) + Send,
) -> Result<NodeSaved, SaveError> {
    let progress = Arc::new(Progress::default());
    let reader = export::start(client, plan, progress.clone()).await?;
    let target = client.target().clone();
    let (mut writer, pipe) = export::change_set_pipe();
    let filtering = {
        let plan = plan.clone();
        let progress = progress.clone();
        tokio::task::spawn_blocking(move || -> Result<ChangeSummary, SshError> {
            let context = format!("saving the change set of node {target}");
            match export::filter_change_set(reader, &mut writer, &plan, &target, &progress) {
                Ok(summary) => {
                    writer
                        .finish(Ok(()))
                        .map_err(|source| SshError::Io { context, source })?;
                    Ok(summary)
                }
                Err(source) => {
                    let _ = writer.finish(Err(format!("{context}: {source}")));
                    Err(SshError::Io { context, source })
                }
            }
        })
    };
    let mut commit = CommitOptions::new(&options.created_by);
    commit.compression = options.compression;
    // The change set is already filtered (exclusions, ready time): the layer takes all of it.
    let push = registry.push_on_top(
        base,
        &options.repository,
        ChangeSource::TarStream(Box::new(pipe)),
        commit,
    );
    tokio::pin!(push);
    let mut ticker = tokio::time::interval(options.progress_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    let pushed = loop {
        tokio::select! {
            pushed = &mut push => break pushed,
            _ = ticker.tick() => on_progress(SaveProgress::of(&progress)),
        }
    };
    let filtered = filtering
        .await
        .map_err(|error| SaveError::Internal(format!("the change set filter thread died: {error}")))?;
    match (filtered, pushed) {
        (Ok(summary), Ok(pushed)) => {
            let progress = SaveProgress::of(&progress);
            on_progress(progress);
            Ok(NodeSaved {
                summary,
                pushed,
                progress,
            })
        }
        // The layer engine stopped reading: its error is the cause.
        (Err(SshError::Io { source, .. }), Err(error)) if source.kind() == std::io::ErrorKind::BrokenPipe => {
            Err(error.into())
        }
        // The node or the connection failed: that is the cause (the push was aborted).
        (Err(error), _) => Err(error.into()),
        (Ok(_), Err(error)) => Err(error.into()),
    }
}
