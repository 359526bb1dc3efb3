//! Distributed tracing: one span per proxied HTTP request, exported over
//! OTLP/HTTP (protobuf) with the OpenTelemetry SDK.
//!
//! An inbound request continues the caller's context (W3C `traceparent`,
//! else B3: the single `b3` header or `x-b3-traceid`/`x-b3-spanid`/
//! `x-b3-sampled`) with a server span; an outbound request gets a client
//! span. Either way the request handed on carries the new span as its
//! parent: `traceparent` always, and B3 headers when the request came with
//! B3, so that an app (or the next sidecar) that continues the trace
//! nests under the sidecar's span. Sampling follows the caller's decision,
//! and otherwise `tracing.sampling` (a ratio of new traces).
//!
//! With tracing off (no `tracing` section) the request path checks one
//! `Option` and does nothing else. Spans are batched on the SDK's own
//! thread; the export itself runs on the proxy's runtime (hyper, HTTP/1.1),
//! so tracing adds no HTTP client stack of its own.

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt as _, TraceFlags, TraceId,
    TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider,
};

/// What `tracing` in the configuration says.
#[derive(Debug, Clone)]
pub struct TracingConfig {
    /// The OTLP/HTTP traces endpoint, e.g. `http://otel-collector:4318/v1/traces`.
    pub otlp_endpoint: http::Uri,
    /// `service.name` of the exported spans.
    pub service_name: String,
    /// The ratio of new traces (no sampled parent) that are recorded.
    pub sampling: f64,
    /// How often batched spans are sent.
    pub flush_interval: Duration,
}

/// Why tracing could not start. The configuration is at fault.
#[derive(Debug, thiserror::Error)]
pub enum TracingError {
    /// The endpoint is not an `http://` URL with a host.
    #[error("tracing.otlp_endpoint {0}: not an http:// URL with a host")]
    BadEndpoint(String),
    /// The exporter refused the configuration.
    #[error("tracing: {0}")]
    Exporter(String),
}

/// The tracer of a running sidecar.
#[derive(Debug)]
pub struct Tracing {
    provider: SdkTracerProvider,
    tracer: opentelemetry_sdk::trace::SdkTracer,
}

/// The propagation formats a request arrived with.
#[derive(Debug, Clone, Copy, Default)]
struct Formats {
    b3_single: bool,
    b3_multi: bool,
}

/// The span of one request; finished when its response head is known.
#[derive(Debug)]
pub struct RequestSpan {
    span: opentelemetry_sdk::trace::Span,
    formats: Formats,
}

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const B3: HeaderName = HeaderName::from_static("b3");
const B3_TRACE: HeaderName = HeaderName::from_static("x-b3-traceid");
const B3_SPAN: HeaderName = HeaderName::from_static("x-b3-spanid");
const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
const B3_PARENT: HeaderName = HeaderName::from_static("x-b3-parentspanid");

impl Tracing {
    /// Starts the exporter; `runtime` runs the export requests.
    pub fn start(
        cfg: &TracingConfig,
        runtime: tokio::runtime::Handle,
    ) -> Result<Tracing, TracingError> {
        use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
        let bad = || TracingError::BadEndpoint(cfg.otlp_endpoint.to_string());
        if cfg.otlp_endpoint.scheme_str() != Some("http") || cfg.otlp_endpoint.host().is_none() {
            return Err(bad());
        }
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(cfg.otlp_endpoint.to_string())
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_timeout(Duration::from_secs(10))
            .with_http_client(RuntimeClient { runtime })
            .build()
            .map_err(|e| TracingError::Exporter(e.to_string()))?;
        let batch = BatchConfigBuilder::default()
            .with_scheduled_delay(cfg.flush_interval)
            .build();
        let processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(batch)
            .build();
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(cfg.service_name.clone())
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                cfg.sampling,
            ))))
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("rampart");
        Ok(Tracing { provider, tracer })
    }

    /// Sends what is batched and stops the exporter (at shutdown).
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "trace export did not finish");
        }
    }

    /// A span for a request with `headers` (whose trace context it
    /// continues): a server span inbound, a client span outbound.
    pub fn request(
        &self,
        direction: crate::config::Direction,
        headers: &HeaderMap,
        method: &http::Method,
        path: &str,
    ) -> RequestSpan {
        let kind = match direction {
            crate::config::Direction::Inbound => SpanKind::Server,
            crate::config::Direction::Outbound => SpanKind::Client,
        };
        let (parent, formats) = extract(headers);
        let cx = match parent {
            Some(sc) => Context::new().with_remote_span_context(sc),
            None => Context::new(),
        };
        let name = direction.as_str();
        let span = self
            .tracer
            .span_builder(format!("{name} {method}"))
            .with_kind(kind)
            .with_attributes([
                KeyValue::new("http.request.method", method.to_string()),
                KeyValue::new("url.path", path.to_owned()),
            ])
            .start_with_context(&self.tracer, &cx);
        RequestSpan { span, formats }
    }
}

impl RequestSpan {
    /// Sets the headers of the request handed on so that the next hop's
    /// span is this span's child.
    pub fn inject(&self, headers: &mut HeaderMap) {
        let sc = self.span.span_context();
        if !sc.is_valid() {
            return;
        }
        let sampled = sc.trace_flags().is_sampled();
        let value = format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        );
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(TRACEPARENT, v);
        }
        if self.formats.b3_single {
            let b3 = format!("{}-{}-{}", sc.trace_id(), sc.span_id(), u8::from(sampled));
            if let Ok(v) = HeaderValue::from_str(&b3) {
                headers.insert(B3, v);
            }
        }
        if self.formats.b3_multi {
            let put = |headers: &mut HeaderMap, name: HeaderName, text: String| {
                if let Ok(v) = HeaderValue::from_str(&text) {
                    headers.insert(name, v);
                }
            };
            put(headers, B3_TRACE, sc.trace_id().to_string());
            put(headers, B3_SPAN, sc.span_id().to_string());
            put(headers, B3_SAMPLED, u8::from(sampled).to_string());
            // The parent of the next hop is this span itself.
            headers.remove(B3_PARENT);
        }
    }

    /// Ends the span with the response status and the peer's identity.
    pub fn finish(mut self, status: StatusCode, peer: Option<&str>) {
        self.span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status.as_u16()),
        ));
        if let Some(peer) = peer {
            self.span
                .set_attribute(KeyValue::new("peer.spiffe_id", peer.to_owned()));
        }
        if status.is_server_error() {
            self.span.set_status(Status::error(status.to_string()));
        }
        self.span.end();
    }
}

/// The caller's span context: `traceparent` first, then B3.
fn extract(headers: &HeaderMap) -> (Option<SpanContext>, Formats) {
    let formats = Formats {
        b3_single: headers.contains_key(B3),
        b3_multi: headers.contains_key(B3_TRACE),
    };
    let text = |name: &HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(sc) = text(&TRACEPARENT).and_then(parse_traceparent) {
        return (Some(sc), formats);
    }
    if let Some(sc) = text(&B3).and_then(parse_b3_single) {
        return (Some(sc), formats);
    }
    let multi = match (text(&B3_TRACE), text(&B3_SPAN)) {
        (Some(t), Some(s)) => remote(t, s, text(&B3_SAMPLED).map(|v| v == "1" || v == "true")),
        _ => None,
    };
    (multi, formats)
}

/// W3C Trace Context: `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`
/// (later versions may append fields, which are ignored).
fn parse_traceparent(value: &str) -> Option<SpanContext> {
    let mut parts = value.trim().split('-');
    let version = parts.next()?;
    let (trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?);
    if version.len() != 2 || version == "ff" || (version == "00" && parts.next().is_some()) {
        return None;
    }
    if trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
        return None;
    }
    let flags = u8::from_str_radix(flags, 16).ok()?;
    remote(trace, span, Some(flags & 1 == 1))
}

/// B3 single header: `<trace id>-<span id>[-<sampling>[-<parent id>]]`.
fn parse_b3_single(value: &str) -> Option<SpanContext> {
    let mut parts = value.trim().split('-');
    let (trace, span) = (parts.next()?, parts.next()?);
    let sampled = parts.next().map(|s| s == "1" || s == "d");
    remote(trace, span, sampled)
}

/// A remote context from hex IDs (a 64-bit B3 trace ID is left-padded).
fn remote(trace: &str, span: &str, sampled: Option<bool>) -> Option<SpanContext> {
    let hex = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit());
    if !(hex(trace) && hex(span)) || !(trace.len() == 16 || trace.len() == 32) || span.len() != 16 {
        return None;
    }
    let trace_id = TraceId::from_hex(&format!("{trace:0>32}")).ok()?;
    let span_id = SpanId::from_hex(span).ok()?;
    if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
        return None;
    }
    // No decision from the caller: the sampler decides (as for a new trace).
    let flags = match sampled {
        Some(true) => TraceFlags::SAMPLED,
        Some(false) | None => TraceFlags::default(),
    };
    Some(SpanContext::new(
        trace_id,
        span_id,
        flags,
        true,
        TraceState::default(),
    ))
}

/// The exporter's HTTP client: each export is a task on the proxy's
/// runtime (the SDK calls from its own thread), one HTTP/1.1 request.
#[derive(Debug)]
struct RuntimeClient {
    runtime: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for RuntimeClient {
    async fn send_bytes(
        &self,
        request: http::Request<bytes::Bytes>,
    ) -> Result<http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
        let task = self.runtime.spawn(post(request));
        task.await?
    }
}

async fn post(
    request: http::Request<bytes::Bytes>,
) -> Result<http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
    use http_body_util::BodyExt as _;
    let uri = request.uri().clone();
    let host = uri.host().ok_or("no host in the OTLP endpoint")?;
    let port = uri.port_u16().unwrap_or(80);
    let tcp = tokio::net::TcpStream::connect((host, port)).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let (mut parts, body) = request.into_parts();
    parts.uri = uri.path_and_query().map_or("/", |p| p.as_str()).parse()?;
    if let Ok(v) = HeaderValue::from_str(uri.authority().map_or(host, |a| a.as_str())) {
        parts.headers.insert(http::header::HOST, v);
    }
    let response = sender
        .send_request(http::Request::from_parts(
            parts,
            http_body_util::Full::new(body),
        ))
        .await?;
    let (parts, body) = response.into_parts();
    let body = http_body_util::Limited::new(body, 1024 * 1024)
        .collect()
        .await?
        .to_bytes();
    Ok(http::Response::from_parts(parts, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incoming_contexts_are_read() {
        let tp =
            parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(
            tp.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(tp.span_id().to_string(), "00f067aa0ba902b7");
        assert!(tp.is_sampled() && tp.is_remote());
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-zzf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad}");
        }
        let b3 = parse_b3_single("a3ce929d0e0e4736-00f067aa0ba902b7-0").unwrap();
        assert_eq!(
            b3.trace_id().to_string(),
            "0000000000000000a3ce929d0e0e4736"
        );
        assert!(!b3.is_sampled());
        let mut headers = HeaderMap::new();
        headers.insert(
            B3_TRACE,
            HeaderValue::from_static("4bf92f3577b34da6a3ce929d0e0e4736"),
        );
        headers.insert(B3_SPAN, HeaderValue::from_static("00f067aa0ba902b7"));
        headers.insert(B3_SAMPLED, HeaderValue::from_static("1"));
        let (sc, formats) = extract(&headers);
        assert!(sc.unwrap().is_sampled() && formats.b3_multi && !formats.b3_single);
    }
}
