//! The ext_authz client: asks an external authorizer about a request, in
//! Envoy's ext_authz gRPC v3 protocol (`envoy.service.auth.v3.Authorization/
//! Check`), and maps the answer to what Envoy's filter would do
//! ([`rampart_authz::external::ProviderVerdict`]).
//!
//! Envoy's rules, applied here: a `CheckResponse` whose `status.code` is OK
//! allows, with `ok_response.headers` set on the upstream request (or
//! appended, when `append` is true: "the append field ... defaults to false
//! when used in this message"), `headers_to_remove` removed and
//! `response_headers_to_add` added to the client's response. Any other code
//! refuses, with `denied_response`'s status (403 when unset), body and
//! headers. A failed or late call refuses with 403, unless the provider has
//! `failure_mode_allow_i_understand_the_risk` (Envoy's `failure_mode_allow`).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rampart_authz::external::{
    CheckAttributes, ExternalAuthorizer, ProviderFailure, ProviderVerdict,
};
use rampart_authz::model::ProviderName;
use rampart_authz::{DenyResponse, HttpEffects};
use tonic::transport::Channel;

use crate::metrics::CheckResult;
use crate::pb;

/// One external authorizer, as configured.
#[derive(Debug, Clone)]
pub struct ProviderConfig {
    /// The name CUSTOM policies use in `provider:`.
    pub name: ProviderName,
    /// `http://host:port` of the gRPC server (h2c; typically an OPA-Envoy
    /// sidecar on loopback).
    pub endpoint: http::Uri,
    /// Time limit of one check; past it the request is refused.
    pub timeout: Duration,
    /// Allow requests when the provider fails or times out. Weakens
    /// security: a provider outage opens everything it guards.
    pub failure_mode_allow_i_understand_the_risk: bool,
}

/// A provider's configuration the operator must fix.
#[derive(Debug, thiserror::Error)]
pub enum ProviderConfigError {
    /// Two providers with one name.
    #[error("ext_authz provider {0:?} is defined twice")]
    Duplicate(String),
    /// The endpoint cannot be used.
    #[error("ext_authz provider {name:?}: bad endpoint {endpoint:?}: {message}")]
    BadEndpoint {
        /// The provider.
        name: String,
        /// The endpoint.
        endpoint: String,
        /// Why.
        message: String,
    },
}

struct Provider {
    client: pb::authorization_client::AuthorizationClient<Channel>,
    timeout: Duration,
    fail_open: bool,
}

/// The configured external authorizers; cheap to clone, one HTTP/2
/// connection per provider, (re)connected lazily.
#[derive(Clone)]
pub struct ExtAuthzClients {
    providers: Arc<HashMap<ProviderName, Provider>>,
}

impl std::fmt::Debug for ExtAuthzClients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExtAuthzClients")
            .field("providers", &self.providers.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl ExtAuthzClients {
    /// Builds the clients; connects on first use. Must run inside a tokio
    /// runtime.
    pub fn new(configs: Vec<ProviderConfig>) -> Result<Self, ProviderConfigError> {
        let mut providers = HashMap::new();
        for c in configs {
            let name = c.name.as_str().to_owned();
            let bad = |message: String| ProviderConfigError::BadEndpoint {
                name: name.clone(),
                endpoint: c.endpoint.to_string(),
                message,
            };
            if c.endpoint.scheme_str() != Some("http") {
                return Err(bad("only http:// (h2c) endpoints are supported".into()));
            }
            let channel = tonic::transport::Endpoint::from(c.endpoint.clone())
                .connect_timeout(c.timeout)
                .tcp_nodelay(true)
                .connect_lazy();
            let provider = Provider {
                client: pb::authorization_client::AuthorizationClient::new(channel),
                timeout: c.timeout,
                fail_open: c.failure_mode_allow_i_understand_the_risk,
            };
            if providers.insert(c.name, provider).is_some() {
                return Err(ProviderConfigError::Duplicate(name));
            }
        }
        Ok(ExtAuthzClients {
            providers: Arc::new(providers),
        })
    }

    /// Asks `provider` about one request.
    pub async fn check_attributes(
        &self,
        provider: &ProviderName,
        attributes: CheckAttributes,
    ) -> ProviderVerdict {
        let Some(p) = self.providers.get(provider) else {
            tracing::warn!(provider = %provider, "policy names an unknown ext_authz provider");
            return ProviderVerdict::Failed(ProviderFailure::UnknownProvider);
        };
        let start = Instant::now();
        let mut client = p.client.clone();
        let mut request = tonic::Request::new(check_request(attributes));
        // Sent as `grpc-timeout`, so the provider can give up too; tonic
        // then cancels the call locally, which is the same timeout.
        request.set_timeout(p.timeout);
        let outcome = match tokio::time::timeout(p.timeout, client.check(request)).await {
            Err(_) => Err(ProviderFailure::Timeout),
            Ok(Err(status))
                if status.code() == tonic::Code::DeadlineExceeded
                    || start.elapsed() >= p.timeout =>
            {
                Err(ProviderFailure::Timeout)
            }
            Ok(Err(status)) => Err(ProviderFailure::Unavailable(format!(
                "{:?}: {}",
                status.code(),
                status.message()
            ))),
            Ok(Ok(resp)) => verdict(resp.into_inner()),
        };
        let seconds = start.elapsed().as_secs_f64();
        match outcome {
            Ok(v) => {
                let result = match &v {
                    ProviderVerdict::Allowed(_) => CheckResult::Allowed,
                    ProviderVerdict::Denied(_) | ProviderVerdict::Failed(_) => CheckResult::Denied,
                };
                crate::metrics::ext_authz_check(result, seconds);
                v
            }
            Err(failure) if p.fail_open => {
                crate::metrics::ext_authz_check(CheckResult::FailedOpen, seconds);
                tracing::warn!(provider = %provider, error = %failure, "ext_authz failed; allowed (failure mode allow)");
                ProviderVerdict::Allowed(HttpEffects::default())
            }
            Err(failure) => {
                let result = match failure {
                    ProviderFailure::Timeout => CheckResult::Timeout,
                    ProviderFailure::Unavailable(_)
                    | ProviderFailure::Malformed(_)
                    | ProviderFailure::UnknownProvider => CheckResult::Error,
                };
                crate::metrics::ext_authz_check(result, seconds);
                tracing::debug!(provider = %provider, error = %failure, "ext_authz failed; denied");
                ProviderVerdict::Failed(failure)
            }
        }
    }
}

impl ExternalAuthorizer for ExtAuthzClients {
    fn check(
        &self,
        provider: &ProviderName,
        attributes: CheckAttributes,
    ) -> Pin<Box<dyn Future<Output = ProviderVerdict> + Send + 'static>> {
        let this = self.clone();
        let provider = provider.clone();
        Box::pin(async move { this.check_attributes(&provider, attributes).await })
    }
}

/// The `CheckRequest` Envoy's filter would send for these attributes.
pub fn check_request(a: CheckAttributes) -> pb::CheckRequest {
    let peer =
        |addr: std::net::SocketAddr, principal: Option<String>| pb::attribute_context::Peer {
            address: Some(pb::Address {
                address: Some(pb::address::Address::SocketAddress(pb::SocketAddress {
                    address: addr.ip().to_string(),
                    port_specifier: Some(pb::socket_address::PortSpecifier::PortValue(u32::from(
                        addr.port(),
                    ))),
                })),
            }),
            principal: principal.unwrap_or_default(),
            ..Default::default()
        };
    pb::CheckRequest {
        attributes: Some(pb::AttributeContext {
            source: Some(peer(a.source, a.source_principal)),
            destination: Some(peer(a.destination, a.destination_principal)),
            request: Some(pb::attribute_context::Request {
                http: Some(pb::attribute_context::HttpRequest {
                    id: a.id,
                    method: a.method,
                    headers: a.headers.into_iter().collect(),
                    path: a.path,
                    host: a.host,
                    scheme: a.scheme,
                    // "query" and "fragment" are always empty; "size" is -1
                    // when unknown (Envoy's attribute_context.proto).
                    size: -1,
                    protocol: a.protocol,
                    ..Default::default()
                }),
            }),
            context_extensions: HashMap::new(),
        }),
    }
}

/// Envoy's reading of a `CheckResponse`.
pub fn verdict(resp: pb::CheckResponse) -> Result<ProviderVerdict, ProviderFailure> {
    let code = resp.status.as_ref().map_or(0, |s| s.code);
    if code == 0 {
        let mut effects = HttpEffects::default();
        if let Some(pb::check_response::HttpResponse::OkResponse(ok)) = resp.http_response {
            for h in ok.headers {
                let append = h.append.as_ref().is_some_and(|b| b.value);
                let pair = header(h)?;
                if append {
                    effects.request_headers_to_append.push(pair);
                } else {
                    effects.headers.push(pair);
                }
            }
            for name in ok.headers_to_remove {
                let n = http::HeaderName::from_bytes(name.as_bytes())
                    .map_err(|_| malformed("header name to remove", &name))?;
                effects.request_headers_to_remove.push(n);
            }
            for h in ok.response_headers_to_add {
                effects.response_headers_to_add.push(header(h)?);
            }
        }
        return Ok(ProviderVerdict::Allowed(effects));
    }
    let mut refusal = DenyResponse {
        status: http::StatusCode::FORBIDDEN,
        body: String::new(),
        headers: Vec::new(),
        dynamic_metadata: None,
    };
    if let Some(pb::check_response::HttpResponse::DeniedResponse(d)) = resp.http_response {
        if let Some(s) = d.status.filter(|s| s.code != 0) {
            refusal.status = u16::try_from(s.code)
                .ok()
                .and_then(|c| http::StatusCode::from_u16(c).ok())
                .ok_or_else(|| malformed("status", &s.code.to_string()))?;
        }
        refusal.body = d.body;
        for h in d.headers {
            refusal.headers.push(header(h)?);
        }
    }
    Ok(ProviderVerdict::Denied(refusal))
}

fn header(
    h: pb::HeaderValueOption,
) -> Result<(http::HeaderName, http::HeaderValue), ProviderFailure> {
    let hv = h.header.ok_or_else(|| malformed("header", "missing"))?;
    let name = http::HeaderName::from_bytes(hv.key.as_bytes())
        .map_err(|_| malformed("header name", &hv.key))?;
    let bytes = if hv.raw_value.is_empty() {
        hv.value.into_bytes()
    } else {
        hv.raw_value
    };
    let value = http::HeaderValue::from_bytes(&bytes)
        .map_err(|_| malformed("header value of", name.as_str()))?;
    Ok((name, value))
}

fn malformed(what: &str, value: &str) -> ProviderFailure {
    ProviderFailure::Malformed(format!("invalid {what} {value:?}"))
}
