//! Authorization for Rampart: decides whether a connection or a request may
//! proceed. A library with no knowledge of sockets or tokio; it sits between
//! `identity` (which authenticated the peer) and `forward` in the pipeline.
//!
//! The proxy can only forward when it holds a [`Permit`], and only this crate
//! can make one, so a skipped check is a compile error.
//!
//! Stages, one module each: [`model`] (the YAML format, validated while it is
//! read), [`load`] (files, errors with file/line/field), `compile` (matchers
//! built once), `eval` (native decisions, allocation-free), [`normalize`]
//! (request paths), [`rego`] (in-process Rego with OPA-Envoy's input from
//! [`input`]) and [`explain`] (why a decision was made).

#![forbid(unsafe_code)]

pub mod budget;
pub mod central;
pub mod explain;
pub mod external;
pub mod import;
pub mod input;
pub mod istio;
pub mod jose;
pub mod jwt;
pub mod load;
pub mod model;
pub mod normalize;
pub mod offline;
pub mod rego;

mod compile;
mod decide;
mod eval;
mod reach;
mod request;

pub use reach::RequestReach;

use std::net::IpAddr;
use std::sync::Arc;

use rampart_identity::SpiffeId;

pub use load::{LoadError, LoadErrors, Options, PolicyInfo};
pub use normalize::{NormalizeOptions, NormalizedPath, PathError, normalize_path};
pub use request::{HttpProtocol, RequestInfo, grpc_method_of};

/// What is known about an inbound connection when it is authorized.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionInfo<'a> {
    /// The authenticated peer's SPIFFE ID, `None` for plaintext sources and
    /// for certificates without a SPIFFE ID.
    pub peer: Option<&'a SpiffeId>,
    /// DNS SANs of the peer's verified certificate (ingress certificates),
    /// empty when there is none. A peer with DNS SANs is authenticated.
    pub peer_dns: &'a [String],
    /// The source address of the connection.
    pub source: IpAddr,
    /// The port the client asked for (the original destination port).
    pub dest_port: u16,
    /// The original destination address, when known (Istio's
    /// `destination.ip` on a TCP connection; requests carry their own).
    pub dest_ip: Option<IpAddr>,
    /// The TLS server name the client asked for (Istio's `connection.sni`).
    pub sni: Option<&'a str>,
    /// The claims of the request's verified JWT (set per request, after
    /// [`Authorizer::authenticate_request`]).
    pub jwt: Option<&'a serde_json::Value>,
    /// The request body read for the policies (`with_request_body`), set
    /// per request; `None` when no policy asked or the request has none.
    pub request_body: Option<BufferedBody<'a>>,
    /// The peer's leaf certificate as Envoy's `include_peer_certificate`
    /// shows it (URL-encoded PEM), when configured.
    pub peer_certificate: Option<&'a str>,
    /// The XFCC element the sidecar sends the app for this connection, when
    /// it made one ([`input::xfcc_element_with`]); else the input builds
    /// the default one.
    pub xfcc: Option<&'a str>,
}

/// A request body as read for the policies: at most `max_request_bytes`
/// of it, and whether there was more (Envoy's `x-envoy-auth-partial-body`).
#[derive(Debug, Clone, Copy)]
pub struct BufferedBody<'a> {
    /// The bytes the policies see.
    pub bytes: &'a [u8],
    /// Whether the body is longer than `bytes` (`allow_partial_message`).
    pub partial: bool,
    /// As bytes (`rawBody`) rather than as a string (`body`).
    pub pack_as_bytes: bool,
}

impl<'a> ConnectionInfo<'a> {
    /// A connection from `source` to `dest_port`, with an optional SPIFFE peer
    /// and no DNS SANs.
    pub fn new(peer: Option<&'a SpiffeId>, source: IpAddr, dest_port: u16) -> Self {
        ConnectionInfo {
            peer,
            peer_dns: &[],
            source,
            dest_port,
            dest_ip: None,
            sni: None,
            jwt: None,
            request_body: None,
            peer_certificate: None,
            xfcc: None,
        }
    }

    /// The same connection, with the XFCC element the app is sent.
    pub fn with_xfcc(self, xfcc: Option<&'a str>) -> Self {
        ConnectionInfo { xfcc, ..self }
    }

    /// The same request, with the body read for the policies.
    pub fn with_request_body(self, request_body: Option<BufferedBody<'a>>) -> Self {
        ConnectionInfo {
            request_body,
            ..self
        }
    }

    /// The same connection, with the peer certificate the input shows.
    pub fn with_peer_certificate(self, peer_certificate: Option<&'a str>) -> Self {
        ConnectionInfo {
            peer_certificate,
            ..self
        }
    }

    /// The same request, with the claims of its verified JWT.
    pub fn with_jwt(self, jwt: Option<&'a serde_json::Value>) -> Self {
        ConnectionInfo { jwt, ..self }
    }

    /// The same connection, with its original destination address.
    pub fn with_dest_ip(self, dest_ip: IpAddr) -> Self {
        ConnectionInfo {
            dest_ip: Some(dest_ip),
            ..self
        }
    }

    /// The same connection, with the TLS server name the client sent.
    pub fn with_sni(self, sni: Option<&'a str>) -> Self {
        ConnectionInfo { sni, ..self }
    }

    /// The same connection, with the peer certificate's DNS SANs.
    pub fn with_peer_dns(self, peer_dns: &'a [String]) -> Self {
        ConnectionInfo { peer_dns, ..self }
    }

    /// Whether the peer presented a verified certificate.
    pub fn is_authenticated(&self) -> bool {
        self.peer.is_some() || !self.peer_dns.is_empty()
    }
}

/// Proof that a connection or request was allowed, naming what allowed it.
///
/// Only this crate makes one (from a decision), and it is neither `Clone`
/// nor constructible elsewhere: one decision yields one permit, which the
/// proxy binds to the connection or request it was issued for.
#[derive(Debug)]
pub struct Permit {
    policy: Arc<str>,
    rule: Arc<str>,
    effects: Option<Arc<HttpEffects>>,
    notes: Notes,
    consulted: Option<model::ProviderName>,
}

impl Permit {
    /// The policy that allowed it.
    pub fn policy(&self) -> &str {
        &self.policy
    }
    /// The rule within the policy that allowed it (the query for Rego).
    pub fn rule(&self) -> &str {
        &self.rule
    }
    /// Header changes a Rego policy asked for, if any.
    pub fn effects(&self) -> Option<&HttpEffects> {
        self.effects.as_deref()
    }
    /// AUDIT and dry-run matches to log with this decision.
    pub fn notes(&self) -> &Notes {
        &self.notes
    }
    /// The external authorizer that agreed, when a CUSTOM policy applied.
    pub fn consulted(&self) -> Option<&model::ProviderName> {
        self.consulted.as_ref()
    }
}

/// Header changes requested by an allowing Rego policy (OPA-Envoy result) or
/// an external authorizer (ext_authz `OkHttpResponse`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HttpEffects {
    /// `headers`: added to (replacing in) the request sent upstream.
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
    /// `response_headers_to_add`: added to the response sent to the client.
    pub response_headers_to_add: Vec<(http::HeaderName, http::HeaderValue)>,
    /// `request_headers_to_remove`: removed from the request sent upstream.
    pub request_headers_to_remove: Vec<http::HeaderName>,
    /// ext_authz headers with `append: true`: appended to the request sent
    /// upstream, keeping values already there.
    pub request_headers_to_append: Vec<(http::HeaderName, http::HeaderValue)>,
    /// `query_parameters_to_remove`: query parameters (by decoded name)
    /// removed from the request sent upstream.
    pub query_parameters_to_remove: Vec<String>,
    /// `query_parameters_to_set`: query parameters set (replacing any of
    /// the same name) on the request sent upstream, in order.
    pub query_parameters_to_set: Vec<(String, Vec<String>)>,
    /// `dynamic_metadata`: recorded in the access and decision logs.
    pub dynamic_metadata: Option<serde_json::Value>,
}

/// A policy and rule, named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleRef {
    /// Policy name.
    pub policy: Arc<str>,
    /// Rule name.
    pub rule: Arc<str>,
}

/// Matches that did not change the decision but must be logged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Notes {
    /// The first AUDIT rule that matched.
    pub audit: Option<RuleRef>,
    /// A dry-run policy that would have refused: the DENY rule that matched,
    /// `no_rule_matched` for an ALLOW policy, or the query of a Rego policy.
    pub dry_run_denied_by: Option<RuleRef>,
}

/// Why something was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyReason {
    /// No policy covers the port and the default is deny.
    NoPolicy,
    /// ALLOW policies cover the port but no rule matched.
    NotAllowed,
    /// No authenticated peer, and the port requires one.
    Unauthenticated,
    /// A DENY rule matched.
    DeniedByRule,
    /// A Rego policy's result refused.
    RegoDenied,
    /// A Rego policy failed to evaluate (error, undefined or malformed
    /// result): fail closed.
    RegoError,
    /// A Rego policy ran out of time: fail closed.
    RegoTimeout,
    /// A Rego or CUSTOM policy covers the port but the traffic is not HTTP.
    RequiresHttp,
    /// The external authorizer of a CUSTOM policy refused.
    ProviderDenied,
    /// The external authorizer failed, or none was available: fail closed.
    ProviderFailed,
    /// The external authorizer did not answer in time: fail closed.
    ProviderTimeout,
}

impl DenyReason {
    /// A short, fixed label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::NoPolicy => "no_policy",
            DenyReason::NotAllowed => "not_allowed",
            DenyReason::Unauthenticated => "unauthenticated",
            DenyReason::DeniedByRule => "denied_by_rule",
            DenyReason::RegoDenied => "rego_denied",
            DenyReason::RegoError => "rego_error",
            DenyReason::RegoTimeout => "rego_timeout",
            DenyReason::RequiresHttp => "requires_http",
            DenyReason::ProviderDenied => "provider_denied",
            DenyReason::ProviderFailed => "provider_failed",
            DenyReason::ProviderTimeout => "provider_timeout",
        }
    }

    /// A sentence for explain output and 403 bodies.
    pub fn describe(self) -> &'static str {
        match self {
            DenyReason::NoPolicy => "no policy covers this port and the default action is deny",
            DenyReason::NotAllowed => "no ALLOW rule matched the request",
            DenyReason::Unauthenticated => "the peer is not authenticated and no rule admits it",
            DenyReason::DeniedByRule => "a DENY rule matched the request",
            DenyReason::RegoDenied => "the Rego policy refused the request",
            DenyReason::RegoError => "the Rego policy failed to evaluate (fail closed)",
            DenyReason::RegoTimeout => "the Rego policy timed out (fail closed)",
            DenyReason::RequiresHttp => {
                "a Rego or CUSTOM policy covers this port but the traffic is not HTTP"
            }
            DenyReason::ProviderDenied => "the external authorizer refused the request",
            DenyReason::ProviderFailed => {
                "the external authorizer failed or is not available (fail closed)"
            }
            DenyReason::ProviderTimeout => "the external authorizer timed out (fail closed)",
        }
    }
}

/// A refusal, naming the reason and the policy (and rule) that refused.
#[derive(Debug, Clone)]
pub struct Denial {
    /// Why.
    pub reason: DenyReason,
    /// The policy that refused, when one applied.
    pub policy: Option<Arc<str>>,
    /// The rule that refused (DENY rules, Rego queries).
    pub rule: Option<Arc<str>>,
    /// The response a Rego policy asked for, if any.
    pub response: Option<Box<DenyResponse>>,
    /// A failing Rego evaluation's message, for logs (not for clients).
    pub detail: Option<Arc<str>>,
    /// AUDIT and dry-run matches to log with this decision.
    pub notes: Notes,
}

impl Denial {
    /// The status to answer an HTTP request with: the Rego policy's
    /// `http_status`, else 403.
    pub fn http_status(&self) -> http::StatusCode {
        match &self.response {
            Some(r) => r.status,
            None => http::StatusCode::FORBIDDEN,
        }
    }

    /// A one-line, human-readable explanation naming the policy and rule.
    pub fn explain(&self) -> String {
        let mut s = String::from(self.reason.describe());
        if let Some(p) = &self.policy {
            s.push_str(&format!(" (policy {p:?}"));
            if let Some(r) = &self.rule {
                s.push_str(&format!(", rule {r:?}"));
            }
            s.push(')');
        }
        s
    }

    pub(crate) fn new(reason: DenyReason, policy: Option<Arc<str>>) -> Self {
        Denial {
            reason,
            policy,
            rule: None,
            response: None,
            detail: None,
            notes: Notes::default(),
        }
    }
}

/// The response a refusing Rego policy asked for (OPA-Envoy result).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DenyResponse {
    /// `http_status`, default 403.
    pub status: http::StatusCode,
    /// `body`, default empty.
    pub body: String,
    /// `headers`: added to the response sent to the client.
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
    /// `dynamic_metadata`: recorded in the access and decision logs.
    pub dynamic_metadata: Option<serde_json::Value>,
}

/// The outcome of an authorization check (not `Clone`: it may hold a
/// [`Permit`]).
#[derive(Debug)]
pub enum Decision {
    /// Go ahead, with proof.
    Allow(Permit),
    /// Refuse.
    Deny(Denial),
}

impl Decision {
    /// Whether this is [`Decision::Allow`].
    pub fn is_allowed(&self) -> bool {
        match self {
            Decision::Allow(_) => true,
            Decision::Deny(_) => false,
        }
    }

    /// The policy that decided, if any.
    pub fn policy(&self) -> Option<&str> {
        match self {
            Decision::Allow(p) => Some(p.policy()),
            Decision::Deny(d) => d.policy.as_deref(),
        }
    }

    /// The rule that decided, if any.
    pub fn rule(&self) -> Option<&str> {
        match self {
            Decision::Allow(p) => Some(p.rule()),
            Decision::Deny(d) => d.rule.as_deref(),
        }
    }

    /// The `dynamic_metadata` a Rego result asked for, for the logs.
    pub fn dynamic_metadata(&self) -> Option<&serde_json::Value> {
        match self {
            Decision::Allow(p) => p.effects().and_then(|e| e.dynamic_metadata.as_ref()),
            Decision::Deny(d) => d
                .response
                .as_ref()
                .and_then(|r| r.dynamic_metadata.as_ref()),
        }
    }

    /// A one-line, human-readable explanation naming the policy and rule.
    pub fn explain(&self) -> String {
        match self {
            Decision::Allow(p) => format!("allowed by policy {:?}, rule {:?}", p.policy, p.rule),
            Decision::Deny(d) => format!("denied: {}", d.explain()),
        }
    }
}

/// What to do on a port that no ALLOW (or Rego) policy covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DefaultAction {
    /// Refuse (the secure default).
    #[default]
    Deny,
    /// Allow any authenticated peer. The name says what it weakens.
    AllowAnyAuthenticated,
}

/// A compiled set of policies. Cheap to clone (shared); the proxy swaps an
/// `Arc<Authorizer>` on reload.
#[derive(Debug, Clone, Default)]
pub struct Authorizer {
    inner: Arc<compile::Compiled>,
    /// Istio resources, decided with Istio's semantics before the native
    /// policies (see [`Authorizer::with_istio`]).
    istio: Option<Arc<istio::IstioPolicies>>,
}

impl Authorizer {
    /// Builds an authorizer from a per-port list of allowed peer SPIFFE IDs:
    /// one ALLOW policy `port-<port>` with one rule `allowed_peers` per port
    /// (an empty list admits no one), compiled like any other policy
    /// ([`Authorizer::from_policies`]) and listed by [`Authorizer::policies`].
    pub fn from_port_allowlist(
        ports: impl IntoIterator<Item = (u16, Vec<SpiffeId>)>,
        default: DefaultAction,
    ) -> Self {
        let policies: Vec<model::Policy> = ports
            .into_iter()
            .map(|(port, ids)| model::Policy::port_allowlist(port, &ids))
            .collect();
        let options = Options {
            default_action: default,
            ..Options::default()
        };
        match Authorizer::from_policies(
            &policies,
            std::path::Path::new("<port allowlist>"),
            &options,
        ) {
            Ok(a) => a,
            // Invariant: native ALLOW policies of exact principals, one per
            // distinct port, always compile.
            Err(e) => unreachable!("port allowlist failed to compile: {e}"),
        }
    }

    /// Compiles policies built in code, with the validation and compilation
    /// of loaded ones; `origin` names them where a file name would go.
    pub fn from_policies(
        policies: &[model::Policy],
        origin: &std::path::Path,
        options: &Options,
    ) -> Result<Authorizer, LoadErrors> {
        Ok(Authorizer {
            inner: Arc::new(load::compile_built(policies, origin, options)?),
            istio: None,
        })
    }

    /// Loads, validates and compiles policy files. Any invalid entry rejects
    /// the whole set; every error found is reported.
    pub fn load<P: AsRef<std::path::Path>>(
        paths: &[P],
        options: &Options,
    ) -> Result<Authorizer, LoadErrors> {
        let compiled = load::load(paths, options)?;
        Ok(Authorizer {
            inner: Arc::new(compiled),
            istio: None,
        })
    }

    pub(crate) fn from_compiled(compiled: compile::Compiled) -> Self {
        Authorizer {
            inner: Arc::new(compiled),
            istio: None,
        }
    }

    /// Compiles policies from YAML text (`origin` names it in errors;
    /// relative module paths resolve against `base_dir`).
    pub fn from_yaml(
        origin: &str,
        yaml: &str,
        base_dir: &std::path::Path,
        options: &Options,
    ) -> Result<Authorizer, LoadErrors> {
        let compiled =
            load::load_texts(&[(origin.to_owned(), yaml.to_owned())], base_dir, options)?;
        Ok(Authorizer {
            inner: Arc::new(compiled),
            istio: None,
        })
    }

    /// Decides whether an opaque TCP connection may proceed. HTTP traffic is
    /// checked per request with [`Authorizer::check_request`] instead: rules
    /// with HTTP conditions never allow a bare connection, and DENY and
    /// CUSTOM rules with HTTP conditions refuse it (the conservative reading).
    pub fn check_connection(&self, conn: &ConnectionInfo<'_>) -> Decision {
        match self.evaluate(conn, None) {
            external::Evaluation::Decided(d) => d,
            // Invariant: evaluate never consults without a request.
            external::Evaluation::Consult(_) => unreachable!("consult without a request"),
        }
    }

    /// Whether any request from this connection's peer could be allowed on
    /// its port (see [`RequestReach`]): [`RequestReach::None`] only when
    /// none could, whatever the request; anything that depends on the
    /// request reads as possible. Asked of live HTTP connections when the
    /// policies are reloaded.
    pub fn request_reach(&self, conn: &ConnectionInfo<'_>) -> RequestReach {
        if self.istio.is_some() && self.inner.policies.is_empty() {
            // Istio resources alone decide: not analysed (see `reach`).
            return RequestReach::Possible;
        }
        // With Istio resources too, a request must pass both: the native
        // half refusing every request is enough.
        reach::reach(&self.inner, conn)
    }

    /// Decides whether an HTTP request may proceed, in-process only. A
    /// request that a CUSTOM policy sends to an external authorizer is
    /// refused here (`ProviderFailed`, fail closed): callers that support
    /// CUSTOM use [`Authorizer::evaluate_request`] or
    /// [`Authorizer::authorize_request`].
    pub fn check_request(&self, conn: &ConnectionInfo<'_>, req: &RequestInfo<'_>) -> Decision {
        match self.evaluate(conn, Some(req)) {
            external::Evaluation::Decided(d) => d,
            external::Evaluation::Consult(c) => c.finish(external::ProviderVerdict::Failed(
                external::ProviderFailure::UnknownProvider,
            )),
        }
    }

    /// Evaluates an HTTP request in-process: a decision, or a
    /// [`external::Consult`] naming the external authorizer that must agree.
    pub fn evaluate_request(
        &self,
        conn: &ConnectionInfo<'_>,
        req: &RequestInfo<'_>,
    ) -> external::Evaluation {
        self.evaluate(conn, Some(req))
    }

    /// Adds Istio resources ([`istio::IstioPolicies`]), decided with
    /// Istio's semantics. Without native policies they decide alone (the
    /// native default action is not used); with native policies a request
    /// must be allowed by both, so neither widens the other. Refused when
    /// both sets have CUSTOM policies (one external authorizer per request).
    pub fn with_istio(self, istio: istio::IstioPolicies) -> Result<Self, String> {
        let native_custom = self
            .inner
            .infos
            .iter()
            .any(|i| i.action == Some(model::Action::Custom));
        if native_custom && !istio.custom_providers().is_empty() {
            return Err(
                "native and Istio CUSTOM policies cannot both apply to one sidecar".to_owned(),
            );
        }
        Ok(Authorizer {
            istio: Some(Arc::new(istio)),
            ..self
        })
    }

    /// Authenticates a request's JWT by the RequestAuthentication rules in
    /// force: `Ok(None)` without a token (or without rules), `Err` (answer
    /// 401) for a token that does not verify.
    pub fn authenticate_request(
        &self,
        headers: &http::HeaderMap,
        query: Option<&str>,
    ) -> Result<Option<jwt::VerifiedJwt>, jwt::JwtError> {
        match self
            .istio
            .as_deref()
            .map(istio::IstioPolicies::request_authn)
        {
            Some(a) if !a.rules.is_empty() => {
                a.authenticate(headers, query, std::time::SystemTime::now())
            }
            Some(_) | None => Ok(None),
        }
    }

    /// The Istio resources in force, if any.
    pub fn istio(&self) -> Option<&istio::IstioPolicies> {
        self.istio.as_deref()
    }

    /// The mTLS mode an Istio PeerAuthentication of these policies gives
    /// inbound `port`; `None` when none applies (the configured mode holds).
    pub fn peer_mode(&self, port: u16) -> Option<istio::PeerMode> {
        self.istio.as_deref()?.peer_modes().mode(port)
    }

    fn evaluate(
        &self,
        conn: &ConnectionInfo<'_>,
        req: Option<&RequestInfo<'_>>,
    ) -> external::Evaluation {
        let Some(istio) = &self.istio else {
            return decide::evaluate(&self.inner, conn, req);
        };
        let first = istio.evaluate(conn, req, conn.jwt);
        if self.inner.policies.is_empty() {
            return first;
        }
        match first {
            d @ external::Evaluation::Decided(Decision::Deny(_)) => d,
            external::Evaluation::Decided(Decision::Allow(_)) => {
                decide::evaluate(&self.inner, conn, req)
            }
            // Invariant (with_istio): the native set has no CUSTOM policy,
            // so its evaluation never consults.
            external::Evaluation::Consult(c) => match decide::evaluate(&self.inner, conn, req) {
                external::Evaluation::Decided(Decision::Allow(_)) => {
                    external::Evaluation::Consult(c)
                }
                other => other,
            },
        }
    }

    /// Decides whether an HTTP request may proceed, asking `providers` when
    /// a CUSTOM policy applies. Completes without waiting when none does.
    pub async fn authorize_request(
        &self,
        conn: &ConnectionInfo<'_>,
        req: &RequestInfo<'_>,
        providers: &dyn external::ExternalAuthorizer,
    ) -> Decision {
        match self.evaluate_request(conn, req) {
            external::Evaluation::Decided(d) => d,
            external::Evaluation::Consult(c) => {
                let attributes = external::CheckAttributes::new(conn, req);
                let verdict = providers.check(c.provider(), attributes).await;
                c.finish(verdict)
            }
        }
    }

    /// The loaded policies, with content hashes (for the admin API).
    pub fn policies(&self) -> &[PolicyInfo] {
        &self.inner.infos
    }

    /// The path normalization options these policies were loaded with.
    pub fn normalize_options(&self) -> &NormalizeOptions {
        &self.inner.normalize
    }

    /// Whether a Rego policy on `port` asks for the request body, and how
    /// much of it: `None` (the common case) reads nothing.
    pub fn request_body(&self, port: u16) -> Option<model::WithRequestBody> {
        self.inner.port(port).request_body
    }

    /// Whether a Rego policy on `port` asks for the peer certificate
    /// (`include_peer_certificate`).
    pub fn include_peer_certificate(&self, port: u16) -> bool {
        self.inner.port(port).peer_certificate
    }
}

#[cfg(test)]
mod tests;
