//! `rampart run`: loads the configuration, obtains the identity, binds the
//! listeners and serves until SIGTERM or SIGINT, then drains.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;

use crate::config::{Config, LogFormat};

/// Arguments of `rampart run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Configuration file (YAML).
    #[arg(long, short, env = "RAMPART_CONFIG")]
    pub config: PathBuf,
    /// The app's probes that the admin server runs for the kubelet, as
    /// injection writes them (JSON; see docs/kubernetes.md, "Probes").
    #[arg(
        long,
        env = "RAMPART_APP_PROBES",
        default_value = "",
        hide_default_value = true
    )]
    pub app_probes: String,
}

/// Exit code for configuration errors (EX_USAGE, as sysexits.h).
pub const EXIT_CONFIG: u8 = 64;

/// Runs the sidecar. Returns the process exit code.
pub fn run(args: RunArgs) -> anyhow::Result<std::process::ExitCode> {
    let cfg = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("rampart: invalid configuration:\n{e}");
            return Ok(std::process::ExitCode::from(EXIT_CONFIG));
        }
    };
    let authorizer = match cfg.initial_policies() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("rampart: invalid configuration:\n{e}");
            return Ok(std::process::ExitCode::from(EXIT_CONFIG));
        }
    };
    let app_probes = match rampart_proxy::probe::AppProbes::parse(&args.app_probes) {
        Ok(p) => Arc::new(p),
        Err(e) => {
            eprintln!("rampart: invalid configuration:\n{e}");
            return Ok(std::process::ExitCode::from(EXIT_CONFIG));
        }
    };
    let logging = init_logging(&cfg);
    let rt = if cfg.runtime.workers == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cfg.runtime.workers)
            .enable_all()
            .build()?
    };
    rt.block_on(serve(cfg, authorizer, logging, app_probes))?;
    Ok(std::process::ExitCode::SUCCESS)
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

async fn serve(
    cfg: Config,
    authorizer: Option<rampart_authz::Authorizer>,
    logging: Arc<ReloadableLog>,
    app_probes: Arc<rampart_proxy::probe::AppProbes>,
) -> anyhow::Result<()> {
    let render: Arc<dyn Fn() -> String + Send + Sync> = if cfg.admin.metrics {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
            .set_buckets(&[
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0, 10.0,
            ])
            .context("metrics buckets")?
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(
                    rampart_proxy::metrics::HTTP_DURATION.to_owned(),
                ),
                &rampart_proxy::metrics::HTTP_DURATION_BUCKETS_MS,
            )
            .context("metrics buckets")?
            .build_recorder();
        let handle = recorder.handle();
        metrics::set_global_recorder(recorder).context("installing the metrics recorder")?;
        rampart_proxy::metrics::describe();
        rampart_identity::metrics::describe();
        Arc::new(move || handle.render())
    } else {
        // No recorder: every metric call is a no-op (the `metrics` crate's
        // default), which is what the metrics-off benchmark measures.
        Arc::new(|| "# metrics are turned off (admin.metrics: false)\n".to_owned())
    };
    // The configuration names key files but never holds key material.
    let config_json = serde_json::to_string(&cfg).unwrap_or_default();
    tracing::info!(config = %config_json, "effective configuration");
    let (mut plan, store) = crate::identity::start(&cfg, authorizer).await?;
    let central_status = crate::central::start(&cfg, &mut plan, &store)?;
    // With a bundle, the policy files are the fallback until the first
    // bundle: a reload must not replace a bundle in force.
    if !cfg.inbound.policies.is_empty() && cfg.inbound.bundle.is_none() {
        let files = cfg.inbound.policies.clone();
        let for_loader = cfg.clone();
        let loader: rampart_proxy::policy::PolicyLoader =
            Box::new(move || for_loader.authorizer().map_err(|e| e.to_string()));
        tokio::spawn(rampart_proxy::policy::watch(
            files,
            rampart_proxy::policy::DEFAULT_POLL_INTERVAL,
            loader,
            plan.authorizer.clone(),
        ));
    }

    let hooks = rampart_proxy::admin::AdminHooks {
        render,
        config_json: serde_json::to_string_pretty(&cfg)
            .unwrap_or(config_json)
            .into(),
        logging,
        central_status,
        app_probes,
    };
    let bound = rampart_proxy::bind(plan, store.subscribe(), hooks)?;
    bound.run(shutdown_signal()).await;
    drop(store);
    Ok(())
}

pub(crate) async fn shutdown_signal() {
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
