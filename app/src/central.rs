//! Central management wiring of a sidecar: starts the bundle poller
//! and feeds its `watch` channel into the proxy's policy cell, builds the
//! ext_authz clients for CUSTOM policies and the decision-log shipper, and
//! renders their state for the admin API's `/policy`. Everything here is
//! off the request path; the proxy only sees two trait objects
//! ([`rampart_proxy::config::CentralConfig`]) and the policy cell.

use std::sync::Arc;

use rampart_authz::central::bundle::BundleOptions;
use rampart_authz::central::decision_log::EntryContext;
use rampart_central::bundle_poller::{self, BundleSource, PolicyHandle};
use rampart_central::decision_logs::{self, DecisionLogConfig, DecisionLogger};
use rampart_central::ext_authz::{ExtAuthzClients, ProviderConfig};
use rampart_central::http_fetch::ClientTlsProvider;
use rampart_identity::store::IdentityStore;
use rampart_proxy::admin::CentralStatus;
use rampart_proxy::config::{ClientConfigId, ProxyConfig};
use rampart_proxy::policy::{PolicyCell, PolicyOrigin};

use crate::config::{Config, central_url};

/// Central management could not start. The configuration was validated as
/// a whole before, so these are checks repeated where the values are used.
#[derive(Debug, thiserror::Error)]
pub enum CentralStartError {
    /// A field holds a value the clients cannot use.
    #[error("field `{field}`: {message}")]
    Field {
        /// The field path, as in the configuration file.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// The ext_authz clients refused their configuration.
    #[error("ext_authz")]
    ExtAuthz(#[from] rampart_central::ext_authz::ProviderConfigError),
}

fn field(field: &str) -> impl FnOnce(String) -> CentralStartError + '_ {
    move |message| CentralStartError::Field {
        field: field.to_owned(),
        message,
    }
}

/// Starts what the configuration asks for and installs the request-path
/// hooks into `plan`. Returns the admin API's view, `None` when central
/// management is off. Must run inside the runtime.
pub fn start(
    cfg: &Config,
    plan: &mut ProxyConfig,
    store: &Arc<IdentityStore>,
) -> Result<Option<CentralStatus>, CentralStartError> {
    let bundle_cfg = cfg.inbound.bundle.as_ref();
    if bundle_cfg.is_none() && cfg.ext_authz.providers.is_empty() && cfg.decision_logs.is_none() {
        return Ok(None);
    }
    rampart_central::metrics::describe();
    // The central servers reached over https with their own identities
    // have a client configuration each ([`Config::central_tls_clients`]
    // lists them in this order); the others trust our trust domain.
    let any_in_td = plan.trust_domain_client();
    let own: Vec<ClientConfigId> = (0..plan.central.tls_clients.len())
        .filter_map(|i| plan.central_client(i))
        .collect();
    let mut own = own.into_iter();
    let mut tls_for = |url: &str, has_ids: bool| -> Option<ClientTlsProvider> {
        if !url.starts_with("https://") {
            return None;
        }
        let id = if has_ids { own.next()? } else { any_in_td };
        Some(tls_provider(store, id))
    };

    let policies = match bundle_cfg {
        None => None,
        Some(b) => {
            let tls = tls_for(&b.url, b.server_identities.is_some());
            let source = BundleSource {
                url: central_url(&b.url).map_err(field("inbound.bundle.url"))?,
                poll_interval: b.poll_interval,
                timeout: b.timeout,
                max_download_bytes: b.max_download_bytes,
                compile_timeout: cfg.inbound.policy_budget.time,
            };
            let verification = cfg
                .bundle_verification()
                .map_err(|(field, message)| CentralStartError::Field { field, message })?;
            let options = BundleOptions {
                authz: cfg.policy_options(),
                verification,
                query: b.query.clone(),
                ..BundleOptions::default()
            };
            // The fallback lives in the policy cell; the poller publishes
            // bundles only.
            let (handle, _task) = bundle_poller::spawn(source, options, tls, None);
            tokio::spawn(follow(handle.clone(), plan.authorizer.clone()));
            Some((b.url.clone(), handle))
        }
    };

    if !cfg.ext_authz.providers.is_empty() {
        let configs =
            cfg.ext_authz
                .providers
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let f = |name: &str| format!("ext_authz.providers[{i}].{name}");
                    Ok(ProviderConfig {
                        name: rampart_authz::model::ProviderName::try_from(p.name.clone())
                            .map_err(|message| CentralStartError::Field {
                                field: f("name"),
                                message,
                            })?,
                        endpoint: p.endpoint.parse().map_err(|e: http::uri::InvalidUri| {
                            CentralStartError::Field {
                                field: f("endpoint"),
                                message: e.to_string(),
                            }
                        })?,
                        timeout: p.timeout,
                        failure_mode_allow_i_understand_the_risk: p
                            .failure_mode_allow_i_understand_the_risk,
                    })
                })
                .collect::<Result<Vec<_>, CentralStartError>>()?;
        for p in configs
            .iter()
            .filter(|p| p.failure_mode_allow_i_understand_the_risk)
        {
            tracing::warn!(provider = %p.name, "ext_authz provider fails open: requests it guards are allowed when it is down");
        }
        plan.central.external = Some(Arc::new(ExtAuthzClients::new(configs)?));
    }

    let logger = match &cfg.decision_logs {
        None => None,
        Some(d) => {
            let tls = tls_for(&d.url, d.server_identities.is_some());
            let config = DecisionLogConfig {
                url: central_url(&d.url).map_err(field("decision_logs.url"))?,
                max_queued: d.max_queued,
                max_batch: d.max_batch,
                flush_interval: d.flush_interval,
                timeout: d.timeout,
            };
            let mut labels = serde_json::Map::new();
            labels.insert("version".into(), env!("CARGO_PKG_VERSION").into());
            for (k, v) in &d.labels {
                labels.insert(k.clone(), v.clone().into());
            }
            let context = EntryContext {
                labels,
                redact: d.redact.clone(),
            };
            let (mut logger, _task) = decision_logs::spawn(config, context, tls);
            if let Some((_, h)) = &policies {
                logger = logger.follow_bundle(h.clone());
            }
            plan.central.decision_log = Some(Arc::new(logger.clone()));
            Some((d.url.clone(), logger))
        }
    };

    Ok(Some(Arc::new(move || {
        status(policies.as_ref(), logger.as_ref())
    })))
}

/// Puts every bundle the poller publishes in force in the proxy's cell.
async fn follow(handle: PolicyHandle, cell: Arc<PolicyCell>) {
    let mut rx = handle.subscribe();
    while rx.changed().await.is_ok() {
        let Some(authorizer) = rx.borrow_and_update().clone() else {
            continue;
        };
        // The poller records the status before it publishes.
        let s = handle.status();
        cell.replace_from(
            (*authorizer).clone(),
            PolicyOrigin::Bundle {
                revision: s.revision.unwrap_or_default(),
                verified: s.verified,
            },
        );
    }
}

/// The client configuration `id` of the identity store, offering
/// HTTP/1.1 (the central clients send one request per connection) instead
/// of the mesh's `h2`. Read per connection, so rotated SVIDs are used.
fn tls_provider(store: &Arc<IdentityStore>, id: ClientConfigId) -> ClientTlsProvider {
    let rx = store.subscribe();
    Arc::new(move || {
        let configs = rx.borrow().clone()?;
        let mut c = (**id.of(&configs)).clone();
        c.alpn_protocols = vec![b"http/1.1".to_vec()];
        Some(Arc::new(c))
    })
}

fn status(
    policies: Option<&(String, PolicyHandle)>,
    logger: Option<&(String, DecisionLogger)>,
) -> serde_json::Value {
    let mut v = serde_json::json!({});
    if let Some((url, h)) = policies {
        let s = h.status();
        v["bundle"] = serde_json::json!({
            "url": url,
            "received": h.has_policy(),
            "revision": s.revision,
            "verified": s.verified,
            "last_error": s.last_error,
        });
    }
    if let Some((url, l)) = logger {
        let q = l.queue();
        v["decision_logs"] = serde_json::json!({
            "url": url,
            "queued": q.len(),
            "capacity": q.capacity(),
            "dropped": q.dropped(),
        });
    }
    v
}
