//! Inbound HTTP, the way to the app: rewrites a permitted request's head
//! for the app (normalized path, app authority, Host, HTTP version,
//! hop-by-hop fields, XFCC, the permit's header effects) and hands it to
//! the `forward` stage, which sends it on the app pools; tunnel requests go
//! to the app on a connection of their own.

use http::header::{self, HeaderValue};
use http::uri::{PathAndQuery, Scheme};
use http::{Response, Uri, Version};
use http_body_util::Either;

use super::errors::LocalError;
use super::headers::{
    ORIG_PROTO, apply_request_effects, apply_response_effects, set_xfcc, strip_hop_by_hop,
};
use super::server::Handler;
use super::tunnel::Tunnel;
use super::{AppVersion, ProxyBody};
use crate::authz::PermittedRequest;
use crate::forward::AppRoute;

impl Handler {
    /// Sends a permitted request to the app, with `path` (the normalized
    /// path) when normalization rewrote it.
    pub(super) async fn forward(
        &self,
        mut permitted: PermittedRequest,
        path: Option<PathAndQuery>,
    ) -> Result<Response<ProxyBody>, LocalError> {
        let head = permitted.head();
        let connect = head.method == http::Method::CONNECT && head.version == Version::HTTP_11;
        let tunnel = if connect {
            Some(Tunnel::Connect)
        } else {
            Tunnel::of(&head.method, head.version, &head.headers)
        };
        let path = match path {
            Some(p) => Some(p),
            // Invariant: an origin-form request has a path (authorize
            // checked); CONNECT keeps its authority-form target.
            None => head.uri.path_and_query().cloned(),
        };
        if let Some(t) = tunnel {
            if !connect {
                permitted.head_mut().0.uri = Uri::from(path.ok_or(LocalError::NoPath)?);
            }
            return self.forward_tunnel(permitted, t).await;
        }
        let path = path.ok_or(LocalError::NoPath)?;
        let (parts, permit) = permitted.head_mut();
        // A Rego result's `query_parameters_to_remove` / `_to_set`.
        let path = match permit.effects().filter(|e| e.rewrites_query()) {
            Some(e) => PathAndQuery::try_from(e.rewrite_path_and_query(path.as_str()))
                .map_err(|_| LocalError::BadPath(rampart_authz::PathError::Empty))?,
            None => path,
        };
        let h = &mut parts.headers;
        strip_hop_by_hop(h);
        // An HTTP/2 request names its authority in the URI only; HTTP/1
        // needs it as Host.
        if !h.contains_key(header::HOST)
            && let Some(a) = parts.uri.authority()
            && let Ok(v) = HeaderValue::from_str(a.as_str())
        {
            h.insert(header::HOST, v);
        }
        set_xfcc(self.shared.config.inbound.xfcc, self.xfcc.as_ref(), h);
        apply_request_effects(permit, h);
        // Requests an outbound sidecar carried over HTTP/2 say what the
        // calling app spoke.
        let was_h1 = parts
            .headers
            .remove(ORIG_PROTO)
            .is_some_and(|v| v.as_bytes() == b"HTTP/1.1");
        let h2 = match self.conn.app_version {
            AppVersion::Http2 => true,
            AppVersion::Http1 => false,
            AppVersion::Http1ExceptGrpc => {
                parts.version == Version::HTTP_2 && !was_h1 && super::is_grpc(&parts.headers)
            }
        };
        let limits = &self.shared.config.limits;
        let route = if h2 {
            parts.version = Version::HTTP_2;
            // HTTP/2 carries the authority in the URI; a Host beside it
            // would disagree with it.
            parts.headers.remove(header::HOST);
            let mut uri = http::uri::Parts::default();
            uri.scheme = Some(Scheme::HTTP);
            uri.authority = Some(self.app_authority.clone());
            uri.path_and_query = Some(path);
            parts.uri = Uri::from_parts(uri).map_err(|_| LocalError::NoPath)?;
            AppRoute::Http2(&self.shared.http.h2)
        } else {
            parts.version = Version::HTTP_11;
            // Origin form, with the Host set above.
            parts.uri = Uri::from(path);
            AppRoute::Http1 {
                pool: &self.shared.http.app_links,
                app: self.conn.app,
                connect_timeout: limits.connect_timeout,
                idle_timeout: crate::http::pool::link_idle_timeout(limits),
            }
        };
        let timeout = limits.http_response_timeout;
        let (resp, permit) = crate::forward::request(route, permitted, timeout).await?;
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        apply_response_effects(&permit, &mut parts.headers);
        tracing::debug!(
            authz.policy = permit.policy(),
            authz.rule = permit.rule(),
            status = parts.status.as_u16(),
            "request forwarded"
        );
        Ok(Response::from_parts(parts, Either::Left(body)))
    }

    /// Sends a permitted tunnel request (upgrade or CONNECT; its URI
    /// already in origin or authority form) to the app on a connection of
    /// its own, and splices the two once the app switches.
    async fn forward_tunnel(
        &self,
        mut permitted: PermittedRequest,
        tunnel: Tunnel,
    ) -> Result<Response<ProxyBody>, LocalError> {
        if self.conn.app_version == AppVersion::Http2 {
            // An HTTP/2 app cannot take an HTTP/1.1 upgrade.
            return Err(LocalError::TunnelToHttp2App);
        }
        let (parts, permit) = permitted.head_mut();
        let downstream = parts
            .extensions
            .remove::<hyper::upgrade::OnUpgrade>()
            .ok_or(LocalError::NotUpgradable)?;
        tunnel.prepare_request(&mut parts.headers);
        set_xfcc(
            self.shared.config.inbound.xfcc,
            self.xfcc.as_ref(),
            &mut parts.headers,
        );
        apply_request_effects(permit, &mut parts.headers);
        tracing::debug!(
            tunnel = tunnel.label(),
            authz.policy = permit.policy(),
            "tunnel request permitted"
        );
        let limits = &self.shared.config.limits;
        let (resp, task) = crate::forward::app_tunnel(
            permitted,
            self.conn.app,
            &tunnel,
            downstream,
            limits.connect_timeout,
            limits.http_response_timeout,
        )
        .await?;
        tracing::debug!(
            tunnel = tunnel.label(),
            status = resp.status().as_u16(),
            "tunnel request forwarded"
        );
        if let Some(task) = task {
            self.tunnel.set(task);
        }
        Ok(resp)
    }
}
