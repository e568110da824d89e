//! `labelfool serve`: bind, load the models in the background (`/ready` turns 200 when done),
//! serve, and on SIGTERM/SIGINT turn `/ready` to 503, drain in-flight work for at most the grace,
//! answer what is left 503, and exit 0.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use super::Cli;
use crate::engine::Engine;
use crate::http::server::{listen, serve};
use crate::http::{AppState, router};
use crate::model::Catalog;

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on (default from the config: 127.0.0.1:8080).
    #[arg(long, env = "LABELFOOL_BIND")]
    pub bind: Option<SocketAddr>,
}

pub async fn run(cli: &Cli, args: &ServeArgs) -> anyhow::Result<ExitCode> {
    let mut config = super::load_config(cli)?;
    if let Some(bind) = args.bind {
        config.server.bind = bind;
    }
    config.check_exposure()?;
    if config.server.api_key.is_none() && !config.server.bind.ip().is_loopback() {
        tracing::warn!(bind = %config.server.bind, "serving WITHOUT an API key on a non-loopback address (server.allow_unauthenticated = true)");
    }
    fit_connections(&mut config.server);
    let config = Arc::new(config);
    let metrics = crate::telemetry::init_metrics();
    let remotes = Arc::new(crate::remote::Remotes::from_configs(&config.remotes).map_err(anyhow::Error::msg)?);
    let catalog = Catalog::from_config(&config)?;
    let (engine, startup) = Engine::start(&config, catalog)?;
    let listener = listen(config.server.bind, config.server.max_connections)
        .with_context(|| format!("cannot listen on {}", config.server.bind))?;
    let addr = listener.local_addr()?;
    let mut state = AppState::new(engine.clone(), config.clone(), metrics, remotes);
    if config.jobs.enabled {
        let jobs =
            crate::jobs::Jobs::start(engine.clone(), &config.jobs).await.context("cannot start the jobs store")?;
        if config.studies.enabled {
            state.studies = Some(crate::study::Studies::new(jobs.clone(), engine.clone()));
        }
        state.jobs = Some(jobs);
    }
    if let Some(probe_bind) = config.server.probe_bind {
        let probes = listen(probe_bind, PROBE_CONNECTIONS)
            .with_context(|| format!("cannot listen on {probe_bind} (server.probe_bind)"))?;
        // On stderr: stdout's first line is the main address, which scripts wait for.
        eprintln!("labelfool probes listening on http://{}", probes.local_addr()?);
        let app = crate::http::probe_router(state.clone());
        let probe_config = crate::config::ServerConfig {
            max_connections: PROBE_CONNECTIONS,
            header_read_timeout_ms: config.server.header_read_timeout_ms.min(PROBE_HEADER_TIMEOUT_MS),
            ..config.server.clone()
        };
        // Answers until the process exits: `/ready` says 503 while the main listener drains.
        tokio::spawn(async move { serve(probes, app, &probe_config, std::future::pending()).await });
    }
    let device = state.device.clone();
    tokio::task::spawn_blocking(move || match startup.wait() {
        Ok(info) => {
            let _ = device.set(info.device.clone());
            tracing::info!(device = %info.device, threads = info.threads, cuda = info.cuda_available, "models loaded; ready");
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot load the models; exiting");
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    });
    // Printed (not just logged) so that scripts and tests can wait for it.
    println!("labelfool listening on http://{addr}");
    tracing::info!(%addr, models = ?engine.catalog().names(), "listening");

    let grace = Duration::from_secs(config.server.shutdown_grace_secs);
    let delay = Duration::from_millis(config.server.shutdown_delay_ms);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let drain_engine = engine.clone();
    let app = router(state);
    let server_config = config.server.clone();
    let stop_accepting = async move {
        shutdown_signal().await;
        drain_engine.begin_drain();
        tracing::info!(
            delay_ms = delay.as_millis() as u64,
            grace_secs = grace.as_secs(),
            "shutdown requested: /ready is 503"
        );
        tokio::time::sleep(delay).await;
        tracing::info!("no longer accepting connections; draining in-flight work");
        let _ = stop_tx.send(());
    };
    let mut serving = tokio::spawn(async move { serve(listener, app, &server_config, stop_accepting).await });
    // Once shutdown starts, in-flight requests get `grace` to finish — a hard bound: then the
    // worker answers whatever it still holds with 503, those answers get a moment to be written,
    // and the process exits 0 (a shutdown that honours its grace is a clean one).
    let grace_over = async {
        let _ = stop_rx.await;
        tokio::time::sleep(grace).await;
    };
    let answered_by = tokio::select! {
        res = &mut serving => { res??; tokio::time::Instant::now() + ANSWER_WINDOW }
        _ = grace_over => {
            tracing::warn!("grace period over with requests still open: answering them 503");
            engine.abort();
            let by = tokio::time::Instant::now() + ANSWER_WINDOW;
            if tokio::time::timeout_at(by, &mut serving).await.is_err() {
                tracing::warn!("connections still open after the 503s; closing them");
            }
            by
        }
    };
    // One window for the answers and the worker together.
    let left = answered_by.saturating_duration_since(tokio::time::Instant::now());
    let worker_done = tokio::task::spawn_blocking(move || engine.shutdown_within(left)).await?;
    if !worker_done {
        // Returning would run libtorch's static destructors under the worker's running pass (a
        // crash at exit, seen under load); every answer has been given, so leave at once.
        tracing::warn!("the worker is still inside a pass; exiting without it");
        // SAFETY: _exit ends the process without running destructors; nothing is left to flush
        // (stderr is unbuffered, the listener is closed, every request has been answered).
        unsafe { libc::_exit(0) };
    }
    tracing::info!("bye");
    Ok(ExitCode::SUCCESS)
}

/// The probe listener's connections, and how long each may take to send its request.
const PROBE_CONNECTIONS: usize = 64;
const PROBE_HEADER_TIMEOUT_MS: u64 = 2_000;

/// Raises the open-files limit to its hard ceiling and keeps `max_connections` within it (a
/// container's `nofile` may be lower than the configured connections), leaving room for the
/// models, the jobs store and the probe listener.
fn fit_connections(server: &mut crate::config::ServerConfig) {
    const OTHER_FILES: u64 = 256;
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    let soft = unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
        lim.rlim_cur
    };
    let room =
        usize::try_from(soft.saturating_sub(OTHER_FILES + PROBE_CONNECTIONS as u64)).unwrap_or(usize::MAX).max(16);
    if server.max_connections > room {
        tracing::warn!(
            configured = server.max_connections,
            open_files = soft,
            using = room,
            "server.max_connections is over the open-files limit; using what fits"
        );
        server.max_connections = room;
    }
}

/// After the grace: how long the 503 answers may take to be written, and the worker to stop.
const ANSWER_WINDOW: Duration = Duration::from_secs(2);

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
