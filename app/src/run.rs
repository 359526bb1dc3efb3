//! The assembly of a running sidecar: from a validated [`Config`] to an
//! identity source, the central-management hooks, the policy watcher and
//! the bound data plane, served until a shutdown future completes, then
//! drained. [`run`] is `rampart run` (a process of its own: exit code,
//! runtime, global logging and metrics); [`Sidecar`] is the same assembly
//! for a caller that owns its runtime (tests, benches, the demo).

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use rampart_proxy::probe::AppProbes;

use crate::config::{Config, ConfigError, LogFormat};

/// Exit code for configuration errors (EX_USAGE, as sysexits.h).
pub const EXIT_CONFIG: u8 = 64;

/// A sidecar that could not start (after its configuration was accepted).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The tokio runtime could not be built.
    #[error("building the runtime")]
    Runtime(#[source] std::io::Error),
    /// The metrics recorder could not be installed.
    #[error("metrics: {0}")]
    Metrics(String),
    /// The identity source could not start.
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityStartError),
    /// Central management could not start.
    #[error(transparent)]
    Central(#[from] crate::central::CentralStartError),
    /// A listener could not be bound.
    #[error(transparent)]
    Bind(#[from] rampart_proxy::server::BindError),
    /// The trace exporter could not start.
    #[error("tracing: {0}")]
    Tracing(String),
    /// A discovery source could not start.
    #[error("discovery: {0}")]
    Discovery(#[from] rampart_discovery::StartError),
}

/// Runs `rampart run` with the configuration file at `path` and the app
/// probes `app_probes` (JSON, as injection writes them; empty for none)
/// until SIGTERM or SIGINT; returns the process exit code (64 for a
/// configuration error, printed with the file, line, column and field of
/// every problem).
pub fn run(path: &Path, app_probes: &str) -> Result<std::process::ExitCode, StartError> {
    let invalid = |e: &dyn std::fmt::Display| {
        eprintln!("rampart: invalid configuration:\n{e}");
        Ok(std::process::ExitCode::from(EXIT_CONFIG))
    };
    let sidecar = match Config::load(path).and_then(Sidecar::new) {
        Ok(s) => s,
        Err(e) => return invalid(&e),
    };
    let sidecar = match AppProbes::parse(app_probes) {
        Ok(p) => sidecar.with_app_probes(p),
        Err(e) => return invalid(&e),
    };
    let cfg = sidecar.config();
    let logging = init_logging(cfg);
    let rt = if cfg.runtime.workers == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cfg.runtime.workers)
            .enable_all()
            .build()
    }
    .map_err(StartError::Runtime)?;
    let render = install_metrics(cfg)?;
    let telemetry = Telemetry { render, logging };
    rt.block_on(sidecar.serve(telemetry, shutdown_signal()))?;
    Ok(std::process::ExitCode::SUCCESS)
}

/// A sidecar whose configuration and initial policies were accepted, not
/// yet started.
#[derive(Debug)]
pub struct Sidecar {
    cfg: Config,
    authorizer: Option<rampart_authz::Authorizer>,
    app_probes: Arc<AppProbes>,
}

/// What the admin API serves beside the data plane's own state: the
/// metrics text and the log filter. Process-wide in `rampart run`
/// ([`run`] installs them); [`Telemetry::local`] for a sidecar sharing its
/// process with others.
pub struct Telemetry {
    /// Renders `/metrics`.
    pub render: rampart_proxy::admin::MetricsRender,
    /// `/logging`: reads and changes the log filter.
    pub logging: Arc<dyn rampart_proxy::admin::LogControl>,
}

impl Telemetry {
    /// For a sidecar that does not own its process: `/metrics` says so and
    /// `/logging` refuses changes (the host owns the global subscriber).
    pub fn local() -> Telemetry {
        Telemetry {
            render: Arc::new(|| "# metrics are owned by the host process\n".to_owned()),
            logging: Arc::new(HostLog),
        }
    }
}

impl Sidecar {
    /// Loads the initial policies of `cfg` (a policy file that does not
    /// compile is a configuration error, as at `rampart run`).
    pub fn new(cfg: Config) -> Result<Sidecar, ConfigError> {
        let authorizer = cfg.initial_policies()?;
        Ok(Sidecar {
            cfg,
            authorizer,
            app_probes: Arc::new(AppProbes::default()),
        })
    }

    /// The app's probes the admin server runs for the kubelet (none by
    /// default).
    pub fn with_app_probes(mut self, probes: AppProbes) -> Sidecar {
        self.app_probes = Arc::new(probes);
        self
    }

    /// The configuration it runs.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Starts the identity source and central management, binds every
    /// listener and serves until `shutdown` completes, then drains. Must
    /// run inside a tokio runtime.
    pub async fn serve(
        self,
        telemetry: Telemetry,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), StartError> {
        let Sidecar {
            cfg,
            authorizer,
            app_probes,
        } = self;
        // The configuration names key files but never holds key material.
        let config_json = serde_json::to_string(&cfg).unwrap_or_default();
        tracing::info!(config = %config_json, "effective configuration");
        let (mut plan, store) = crate::identity::start(&cfg, authorizer).await?;
        let central_status = crate::central::start(&cfg, &mut plan, &store)?;
        // RequestAuthentication keys at http:// URIs: fetched off the
        // request path into the cache every (re)load shares.
        if let Some(istio) = plan.authorizer.current().authorizer.istio()
            && !istio.jwks_uris().is_empty()
        {
            let tls = jwks_tls(&cfg, istio.jwks_uris())?;
            rampart_central::jwks::spawn(
                istio.jwks_uris().to_vec(),
                istio.jwks_cache().clone(),
                rampart_central::jwks::DEFAULT_REFRESH,
                tls,
            );
        }
        // Istio resources from the Kubernetes API: a worker of their own
        // puts each set in force (none is until the first lists load), and
        // follows the policy files too.
        let from_api = cfg
            .inbound
            .istio
            .as_ref()
            .is_some_and(|i| i.kubernetes.is_some());
        if from_api {
            crate::istio_kube::spawn(cfg.clone(), plan.authorizer.clone());
        }
        // With a bundle, the policy files are the fallback until the first
        // bundle: a reload must not replace a bundle in force.
        if (!cfg.inbound.policies.is_empty() || cfg.inbound.istio.is_some())
            && cfg.inbound.bundle.is_none()
            && !from_api
        {
            let for_loader = cfg.clone();
            let loader: rampart_proxy::policy::PolicyLoader =
                Arc::new(move || for_loader.authorizer().map_err(|e| e.to_string()));
            tokio::spawn(rampart_proxy::policy::watch(
                cfg.policy_files(),
                rampart_proxy::policy::DEFAULT_POLL_INTERVAL,
                cfg.inbound.policy_budget,
                loader,
                plan.authorizer.clone(),
            ));
        }
        let tracing = match &cfg.tracing {
            None => None,
            Some(t) => {
                // Validated with the configuration.
                let settings = t.to_proxy().map_err(StartError::Tracing)?;
                let started = rampart_proxy::trace::Tracing::start(
                    &settings,
                    tokio::runtime::Handle::current(),
                )
                .map_err(|e| StartError::Tracing(e.to_string()))?;
                tracing::info!(endpoint = %settings.otlp_endpoint, "trace export on");
                Some(Arc::new(started))
            }
        };
        plan.observe.tracing = tracing.clone();
        plan.discovery = rampart_discovery::start(&cfg.discovery, &plan.trust_domain)?;
        let hooks = rampart_proxy::admin::AdminHooks {
            render: telemetry.render,
            config_json: serde_json::to_string_pretty(&cfg)
                .unwrap_or(config_json)
                .into(),
            logging: telemetry.logging,
            central_status,
            app_probes,
        };
        let bound = rampart_proxy::bind(plan, store.subscribe(), hooks)?;
        bound.run(shutdown).await;
        if let Some(t) = tracing {
            // The last export runs on this runtime: wait for it off its thread.
            let _ = tokio::task::spawn_blocking(move || t.shutdown()).await;
        }
        drop(store);
        Ok(())
    }
}

/// The TLS client for RequestAuthentication keys at `uris`: `None` unless
/// one is `https://`, then verified against `inbound.istio.jwks_ca_file`
/// (default: the system bundle).
pub(crate) fn jwks_tls(
    cfg: &Config,
    uris: &[String],
) -> Result<Option<rampart_central::http_fetch::ClientTlsProvider>, crate::central::CentralStartError>
{
    if !uris.iter().any(|u| u.starts_with("https://")) {
        return Ok(None);
    }
    let ca = cfg
        .inbound
        .istio
        .as_ref()
        .and_then(|i| i.jwks_ca_file.clone())
        .unwrap_or_else(|| rampart_central::jwks::SYSTEM_CA_FILE.into());
    let client = rampart_central::jwks::https_client(&ca).map_err(|message| {
        crate::central::CentralStartError::Field {
            field: "inbound.istio.jwks_ca_file".into(),
            message,
        }
    })?;
    Ok(Some(client))
}

/// Installs the process's metrics recorder when `admin.metrics` is on;
/// returns what renders `/metrics`.
fn install_metrics(cfg: &Config) -> Result<rampart_proxy::admin::MetricsRender, StartError> {
    if !cfg.admin.metrics {
        // No recorder: every metric call is a no-op (the `metrics` crate's
        // default), which is what the metrics-off benchmark measures.
        return Ok(Arc::new(|| {
            "# metrics are turned off (admin.metrics: false)\n".to_owned()
        }));
    }
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&[
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            2.5, 5.0, 10.0,
        ])
        .map_err(|e| StartError::Metrics(format!("buckets: {e}")))?
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(
                rampart_proxy::metrics::HTTP_DURATION.to_owned(),
            ),
            &rampart_proxy::metrics::HTTP_DURATION_BUCKETS_MS,
        )
        .map_err(|e| StartError::Metrics(format!("buckets: {e}")))?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder)
        .map_err(|e| StartError::Metrics(format!("installing the recorder: {e}")))?;
    // `build_recorder` spawns no upkeep: without it, histogram samples pile
    // up until a scrape drains them (issue 19, R2: ~19 bytes per request
    // with nobody scraping). A thread, so that it runs whatever the runtime.
    let upkeep = handle.clone();
    spawn_upkeep(METRICS_UPKEEP_INTERVAL, move || upkeep.run_upkeep())
        .map_err(|e| StartError::Metrics(format!("starting the upkeep thread: {e}")))?;
    rampart_proxy::metrics::describe();
    rampart_discovery::metrics::describe();
    rampart_identity::metrics::describe();
    crate::metrics::describe();
    Ok(Arc::new(move || handle.render()))
}

/// How often the metrics recorder drains histogram samples into their
/// buckets (metrics-exporter-prometheus's own default for its upkeep task).
pub const METRICS_UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs `upkeep` every `every` on a thread of its own, for the life of the
/// process.
pub fn spawn_upkeep(
    every: std::time::Duration,
    upkeep: impl Fn() + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("rampart-metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(every);
                upkeep();
            }
        })
}

fn init_logging(cfg: &Config) -> Arc<ReloadableLog> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    // The filter was validated with the rest of the configuration.
    let filter = tracing_subscriber::EnvFilter::try_new(&cfg.log.level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let registry = tracing_subscriber::registry().with(filter);
    match cfg.log.format {
        LogFormat::Text => registry.with(fmt).init(),
        LogFormat::Json => registry.with(fmt.json()).init(),
    }
    Arc::new(ReloadableLog {
        handle,
        current: std::sync::Mutex::new(cfg.log.level.clone()),
    })
}

/// The log filter, changeable at runtime through the admin API.
struct ReloadableLog {
    handle: tracing_subscriber::reload::Handle<
        tracing_subscriber::EnvFilter,
        tracing_subscriber::Registry,
    >,
    current: std::sync::Mutex<String>,
}

impl rampart_proxy::admin::LogControl for ReloadableLog {
    fn current(&self) -> String {
        // Poisoning needs a panic while holding the lock, which only clones.
        self.current.lock().map(|c| c.clone()).unwrap_or_default()
    }

    fn set(&self, filter: &str) -> Result<(), String> {
        let f = tracing_subscriber::EnvFilter::try_new(filter).map_err(|e| e.to_string())?;
        self.handle.reload(f).map_err(|e| e.to_string())?;
        if let Ok(mut c) = self.current.lock() {
            *c = filter.to_owned();
        }
        Ok(())
    }
}

/// The log filter of a process that hosts several sidecars: not theirs.
struct HostLog;

impl rampart_proxy::admin::LogControl for HostLog {
    fn current(&self) -> String {
        "(owned by the host process)".to_owned()
    }

    fn set(&self, _filter: &str) -> Result<(), String> {
        Err("the log filter belongs to the host process".to_owned())
    }
}

/// Completes on the first SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// R2: the recorder's upkeep runs on a timer, with nobody scraping.
    /// (That memory then stays flat is measured, not tested: the
    /// `rampart-bench unscraped` mode.)
    #[test]
    fn the_metrics_upkeep_runs_on_a_timer_without_scrapes() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (h, r) = (handle.clone(), runs.clone());
        spawn_upkeep(Duration::from_millis(20), move || {
            h.run_upkeep();
            r.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        })
        .unwrap();
        metrics::with_local_recorder(&recorder, || {
            for i in 0..10_000 {
                metrics::histogram!("rampart_test_duration").record(f64::from(i));
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while runs.load(std::sync::atomic::Ordering::SeqCst) < 3 {
            assert!(Instant::now() < deadline, "the upkeep never ran");
            std::thread::sleep(Duration::from_millis(10));
        }
        let text = handle.render();
        assert!(text.contains("rampart_test_duration_count 10000"), "{text}");
    }
}
