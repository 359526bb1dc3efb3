//! External authorization (Istio's CUSTOM action): the part that needs no
//! network. A CUSTOM policy whose rule matches turns an in-process decision
//! into a [`Consult`]: "allowed, if provider X agrees". The proxy sends the
//! request's [`CheckAttributes`] to the provider through an
//! [`ExternalAuthorizer`] (Rampart's is the ext_authz gRPC client in the
//! `rampart` binary) and [`Consult::finish`] turns the provider's
//! [`ProviderVerdict`] into the final [`Decision`], applying the provider's
//! headers and status as Envoy's ext_authz filter does.
//!
//! Only requests that the in-process policies allow and that a CUSTOM rule
//! matches pay for the hop: a request the native policies refuse is refused
//! without asking (the outcome is the same as Istio's CUSTOM-first order, as
//! a CUSTOM verdict can only narrow what ALLOW and DENY admit).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use crate::model::ProviderName;
use crate::{
    ConnectionInfo, Decision, Denial, DenyReason, DenyResponse, HttpEffects, Permit, RequestInfo,
};

/// The result of evaluating a request in-process.
#[derive(Debug)]
pub enum Evaluation {
    /// The in-process policies decided alone.
    Decided(Decision),
    /// The in-process policies allow, and a CUSTOM policy matched: the
    /// provider decides.
    Consult(Consult),
}

/// A request that the in-process policies allow, pending an external
/// authorizer's verdict. Holds the [`Permit`] it will become.
#[derive(Debug)]
pub struct Consult {
    pub(crate) provider: ProviderName,
    pub(crate) policy: Arc<str>,
    pub(crate) rule: Arc<str>,
    pub(crate) permit: Permit,
}

impl Consult {
    /// The provider to ask.
    pub fn provider(&self) -> &ProviderName {
        &self.provider
    }

    /// The CUSTOM policy that matched.
    pub fn policy(&self) -> &str {
        &self.policy
    }

    /// Its rule that matched.
    pub fn rule(&self) -> &str {
        &self.rule
    }

    /// The final decision, given the provider's verdict. An allowing verdict
    /// adds the provider's header changes to the permit; a refusal carries
    /// the provider's status, body and headers; a failure refuses with 403
    /// (Envoy's default `status_on_error`).
    pub fn finish(self, verdict: ProviderVerdict) -> Decision {
        let (reason, response, detail) = match verdict {
            ProviderVerdict::Allowed(effects) => {
                let mut permit = self.permit;
                permit.consulted = Some(self.provider);
                if !effects.is_empty() {
                    crate::decide::merge_effects(&mut permit.effects, Arc::new(effects));
                }
                return Decision::Allow(permit);
            }
            ProviderVerdict::Denied(r) => (DenyReason::ProviderDenied, Some(Box::new(r)), None),
            ProviderVerdict::Failed(f) => {
                let reason = match f {
                    ProviderFailure::Timeout => DenyReason::ProviderTimeout,
                    ProviderFailure::Unavailable(_)
                    | ProviderFailure::Malformed(_)
                    | ProviderFailure::UnknownProvider => DenyReason::ProviderFailed,
                };
                (reason, None, Some(Arc::from(f.to_string())))
            }
        };
        let mut d = Denial::new(reason, Some(self.policy));
        d.rule = Some(self.rule);
        d.response = response;
        d.detail = detail;
        d.notes = self.permit.notes;
        Decision::Deny(d)
    }
}

/// What an external authorizer answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderVerdict {
    /// `OkHttpResponse`: go ahead, with these header changes.
    Allowed(HttpEffects),
    /// `DeniedHttpResponse`: answer the client with this.
    Denied(DenyResponse),
    /// No usable answer. Refuses (fail closed) unless the provider is
    /// configured to fail open, in which case the client answers `Allowed`.
    Failed(ProviderFailure),
}

/// Why an external authorizer gave no usable answer. The provider (or the
/// path to it) is at fault, except for `UnknownProvider` (the configuration).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderFailure {
    /// No answer within the configured timeout.
    #[error("the external authorizer did not answer in time")]
    Timeout,
    /// The call failed (connection refused, reset, gRPC error status).
    #[error("the external authorizer is unavailable: {0}")]
    Unavailable(String),
    /// The answer could not be understood (missing response, bad header).
    #[error("the external authorizer's answer is malformed: {0}")]
    Malformed(String),
    /// The policy names a provider that is not configured.
    #[error("the policy names an external authorizer that is not configured")]
    UnknownProvider,
}

/// Sends requests to external authorizers. Implemented by the `rampart`
/// binary's ext_authz client; the proxy holds one as a trait object.
pub trait ExternalAuthorizer: Send + Sync {
    /// Asks `provider` about one request. Never fails: failures are a
    /// [`ProviderVerdict::Failed`] (or `Allowed` for a provider configured to
    /// fail open), and the future completes within the provider's timeout.
    fn check(
        &self,
        provider: &ProviderName,
        attributes: CheckAttributes,
    ) -> Pin<Box<dyn Future<Output = ProviderVerdict> + Send + 'static>>;
}

/// The request attributes Envoy's ext_authz filter sends in a
/// `CheckRequest` (`SPECS.md` §6), owned so that the call can outlive the
/// borrowed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckAttributes {
    /// Where the request came from.
    pub source: SocketAddr,
    /// The peer's principal: URI SAN, else the first DNS SAN.
    pub source_principal: Option<String>,
    /// Where it was going.
    pub destination: SocketAddr,
    /// The sidecar's own SPIFFE ID.
    pub destination_principal: Option<String>,
    /// `x-request-id`, or empty.
    pub id: String,
    /// Request method.
    pub method: String,
    /// Headers, names lower-case, repeated headers joined with `,`, with
    /// the pseudo-headers and the `x-forwarded-client-cert` the sidecar
    /// sends upstream (what Envoy's filter sees after the connection manager).
    pub headers: Vec<(String, String)>,
    /// The request target as forwarded: normalized path plus query.
    pub path: String,
    /// `Host` or `:authority`.
    pub host: String,
    /// `http` or `https`.
    pub scheme: String,
    /// `HTTP/1.0`, `HTTP/1.1` or `HTTP/2`.
    pub protocol: String,
}

impl CheckAttributes {
    /// Collects the attributes of one request.
    pub fn new(conn: &ConnectionInfo<'_>, req: &RequestInfo<'_>) -> Self {
        let doc = crate::input::build(conn, req);
        let http = &doc["attributes"]["request"]["http"];
        let headers = http["headers"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_owned()))
                    .collect()
            })
            .unwrap_or_default();
        CheckAttributes {
            source: req.source,
            source_principal: crate::input::principal(conn).map(str::to_owned),
            destination: req.destination,
            destination_principal: req.local_identity.map(|id| id.as_str().to_owned()),
            id: http["id"].as_str().unwrap_or("").to_owned(),
            method: req.method.as_str().to_owned(),
            headers,
            path: http["path"].as_str().unwrap_or("").to_owned(),
            host: req.authority.to_owned(),
            scheme: req.scheme.to_owned(),
            protocol: req.protocol.as_str().to_owned(),
        }
    }
}

impl HttpEffects {
    /// Whether there is nothing to change.
    pub fn is_empty(&self) -> bool {
        self.headers.is_empty()
            && self.request_headers_to_append.is_empty()
            && self.response_headers_to_add.is_empty()
            && self.request_headers_to_remove.is_empty()
            && self.query_parameters_to_remove.is_empty()
            && self.query_parameters_to_set.is_empty()
            && self.dynamic_metadata.is_none()
    }

    /// Whether the query of the request sent upstream changes.
    pub fn rewrites_query(&self) -> bool {
        !self.query_parameters_to_remove.is_empty() || !self.query_parameters_to_set.is_empty()
    }

    /// The request target sent upstream: `path_and_query` with the query
    /// parameters removed and set as Envoy's ext_authz filter does (remove
    /// first, then set; a set parameter replaces every value of its name
    /// and is appended at the end). Names compare decoded; kept pairs keep
    /// their bytes; set pairs are form-encoded.
    pub fn rewrite_path_and_query(&self, path_and_query: &str) -> String {
        let (path, query) = match path_and_query.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path_and_query, None),
        };
        let drop: Vec<&str> = self
            .query_parameters_to_remove
            .iter()
            .map(String::as_str)
            .chain(self.query_parameters_to_set.iter().map(|(k, _)| k.as_str()))
            .collect();
        let mut pairs: Vec<String> = query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .filter(|p| !p.is_empty())
            .filter(|p| {
                let name = p.split_once('=').map_or(*p, |(n, _)| n);
                !drop.contains(&crate::eval::decode_component(name).as_ref())
            })
            .map(str::to_owned)
            .collect();
        for (k, values) in &self.query_parameters_to_set {
            for v in values {
                pairs.push(format!("{}={}", form_encode(k), form_encode(v)));
            }
        }
        if pairs.is_empty() {
            path.to_owned()
        } else {
            format!("{path}?{}", pairs.join("&"))
        }
    }
}

/// `application/x-www-form-urlencoded` for one name or value: unreserved
/// bytes as they are, everything else percent-encoded.
fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_are_removed_then_set() {
        let e = HttpEffects {
            query_parameters_to_remove: vec!["debug".into(), "a b".into()],
            query_parameters_to_set: vec![("user".into(), vec!["alice&bob".into(), "x".into()])],
            ..HttpEffects::default()
        };
        assert!(e.rewrites_query());
        assert_eq!(
            e.rewrite_path_and_query("/p?debug=1&keep=%2F&a+b=2&user=eve"),
            "/p?keep=%2F&user=alice%26bob&user=x"
        );
        let only_remove = HttpEffects {
            query_parameters_to_remove: vec!["debug".into()],
            ..HttpEffects::default()
        };
        assert_eq!(only_remove.rewrite_path_and_query("/p?debug"), "/p");
        assert!(!HttpEffects::default().rewrites_query());
    }
}
