//! `walt-operator run`: the operator process. Startup order: logs → client →
//! configuration (clear errors, exit 2) → `/metrics` `/healthz` `/readyz` →
//! leader election → controllers. SIGTERM or SIGINT stops the controllers
//! gracefully and releases the Lease so another replica takes over at once.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use super::config::{Config, LogFormat};
use super::http::{Health, serve};
use super::leader::LeaderElector;
use super::metrics::Metrics;
use super::shared::clock::ApiClock;
use super::shared::context::Context;

pub use super::config::Args;

/// Runs the operator; returns the process exit code.
pub fn run(args: &Args) -> Result<i32, Box<dyn std::error::Error + Send + Sync>> {
    init_logs(args.log_format);
    // Before any thread exists: node saves run in this process too, and their 1–2 MiB buffers must
    // not pile up in per-thread arenas (see `ssh::heap`).
    crate::ssh::heap::return_freed_memory_promptly();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(run_async(args.clone()))
}

fn init_logs(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests running the operator in-process) is harmless.
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Cancels `token` on SIGTERM or SIGINT.
fn cancel_on_signals(token: CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = interrupt.recv() => tracing::info!("SIGINT: shutting down"),
        }
        token.cancel();
    });
    Ok(())
}

async fn run_async(args: Args) -> Result<i32, Box<dyn std::error::Error + Send + Sync>> {
    let shutdown = CancellationToken::new();
    cancel_on_signals(shutdown.clone())?;
    let client = kube::Client::try_default().await.map_err(|error| {
        format!(
            "cannot reach the Kubernetes API ({error}): run in a pod with a ServiceAccount, or set KUBECONFIG"
        )
    })?;
    let identity = super::config::identity(&args);
    if let Err(error) = super::bootstrap::ensure(client.clone(), &args, &identity).await {
        eprintln!("walt-operator run: {error}");
        return Ok(2);
    }
    let config = match Config::load(args, client.clone()).await {
        Ok(config) => Arc::new(config),
        Err(error) => {
            eprintln!("walt-operator run: {error}");
            return Ok(2);
        }
    };
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::new(metrics.clone()));
    let http_addr = serve(config.args.http_addr, health.clone(), shutdown.clone())
        .await
        .map_err(|error| format!("cannot listen on {} for /metrics: {error}", config.args.http_addr))?;
    tracing::info!(%http_addr, identity = %config.identity, "serving /metrics, /healthz, /readyz");

    // Every replica signs registry tokens (the key is shared).
    if let Some(issuer) = &config.token_issuer {
        let addr = config.args.registry_token_addr;
        let bound = crate::oci::token_issuer::serve(addr, issuer.clone(), shutdown.clone())
            .await
            .map_err(|error| format!("cannot listen on {addr} for registry tokens: {error}"))?;
        tracing::info!(%bound, key_id = %issuer.key_id(), "serving registry tokens on GET /token");
    }

    // Session lifetimes follow the API server's clock, whatever this host's says.
    let clock = Arc::new(ApiClock::default());
    super::shared::clock::update(&client, &clock).await;
    tokio::spawn(super::shared::clock::track(
        client.clone(),
        clock.clone(),
        shutdown.clone(),
    ));

    // Every replica serves the gateway (its Service may route to any of them).
    let gateway_stop = shutdown.child_token();
    let (gateway_addr, _authorizations) = super::gateway::start(
        client.clone(),
        config.clone(),
        clock.clone(),
        gateway_stop.clone(),
    )
    .await?;
    tracing::info!(%gateway_addr, "SSH gateway ready");

    let mut elector = config.args.leader_election.then(|| {
        LeaderElector::new(
            client.clone(),
            &config.args.namespace,
            &config.args.lease_name,
            &config.identity,
            config.args.lease_timing(),
        )
    });
    if let Some(elector) = elector.as_mut() {
        tracing::info!(lease = %config.args.lease_name, "waiting to become the leader");
        if !elector.acquire(&shutdown).await {
            return Ok(0);
        }
    }
    metrics.leader.set(1);
    health.set_ready(true);

    let context = Arc::new(Context::new(client, config.clone(), metrics.clone(), clock));
    let controllers_stop = shutdown.child_token();
    let controllers = tokio::spawn(super::run_controllers(context, controllers_stop.clone()));
    let mut exit_code = 0;
    if let Some(elector) = elector.as_mut() {
        if let Err(error) = elector.keep(&shutdown).await {
            // Another replica may lead now: stop at once, let the pod restart.
            tracing::error!(%error, "lost leadership: stopping");
            exit_code = 1;
        }
    } else {
        shutdown.cancelled().await;
    }
    health.set_ready(false);
    controllers_stop.cancel();
    if let Err(error) = controllers.await {
        tracing::error!(%error, "controllers panicked");
        exit_code = 1;
    }
    metrics.leader.set(0);
    gateway_stop.cancel();
    if let Some(elector) = elector.as_mut()
        && exit_code == 0
        && let Err(error) = elector.release().await
    {
        tracing::warn!(%error, "could not release the leader Lease");
    }
    tracing::info!("stopped");
    Ok(exit_code)
}
