//! Rego policies evaluated in-process with `regorus`. Modules and data are
//! compiled once per load into a template engine; evaluations take an engine
//! from a small pool (cloning the template when the pool is empty) so a
//! policy is never re-parsed on the hot path. Every failure denies: an
//! evaluation error, a time-out, an undefined decision, or a result that is
//! not OPA-Envoy's shape (`SPECS.md` §7).

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use regorus::Engine;
use serde::Deserialize;
use serde_json::Value;

use crate::model::{RegoVersion, ResultForm, WithRequestBody};

mod builtins;
mod check;
mod depth;

use crate::{ConnectionInfo, DenyResponse, HttpEffects, RequestInfo};
pub use check::MissingBuiltin;
pub use depth::{MAX_REGO_NESTING, TooDeep, check_nesting};

/// One Rego module: its name (file) in errors, its source, its syntax.
#[derive(Debug, Clone)]
pub struct RegoModule {
    /// The file name, as errors report it.
    pub name: String,
    /// The source text.
    pub source: String,
    /// Rego v0 or v1 syntax.
    pub version: RegoVersion,
}

/// The package and rule Rampart adds when the decision path is a document
/// built from partial rules rather than one rule.
const DECISION_PACKAGE: &str = "__rampart_decision__";
const DECISION_RULE: &str = "result";

/// Every call in `modules` to a function that does not exist or is
/// refused, with its file, line and column.
pub fn missing_builtins(modules: &[RegoModule]) -> Vec<MissingBuiltin> {
    let modules: Vec<(String, String, RegoVersion)> = modules
        .iter()
        .map(|m| (m.name.clone(), m.source.clone(), m.version))
        .collect();
    let extensions: Vec<&str> = builtins::EXTENSIONS.iter().map(|(n, _)| *n).collect();
    check::missing_builtins(&modules, &extensions)
}

/// The package of a module (`envoy.authz`), `None` when it does not parse
/// (or nests deeper than [`MAX_REGO_NESTING`], which is not handed to the
/// parser; [`RegoEngine::new`] reports it).
pub fn package_of(name: &str, source: &str, version: RegoVersion) -> Option<String> {
    check_nesting(source, MAX_REGO_NESTING).ok()?;
    check::package_of(name, source, version)
}

/// Whether the data documents hold a value at `query` (`data.a.b`).
fn data_has(data: &[Value], query: &str) -> bool {
    let path: Vec<&str> = query.split('.').skip(1).collect();
    data.iter().any(|d| {
        let mut v = d;
        for p in &path {
            match v.get(p) {
                Some(next) => v = next,
                None => return false,
            }
        }
        true
    })
}

/// Default time limit for one Rego evaluation.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(100);

/// What one Rego evaluation decided.
#[derive(Debug)]
pub(crate) enum RegoOutcome {
    /// Allowed, possibly with header changes.
    Allowed(Option<Arc<HttpEffects>>),
    /// Refused, with the response to send.
    Denied(Box<DenyResponse>),
    /// Failed: error, undefined or malformed result.
    Error(String),
    /// Ran out of time.
    Timeout,
    /// Not an HTTP request (Rego policies need one).
    NotHttp,
}

/// A compiled Rego policy.
pub struct RegoEngine {
    /// The decision path as configured (`data.envoy.authz.allow`).
    query: Arc<str>,
    /// The rule evaluated for it: the query itself, or the rule Rampart
    /// adds whose value is the document at the query (partial rules).
    rule: Arc<str>,
    form: ResultForm,
    timeout: Duration,
    /// The policy's `with_request_body`.
    request_body: Option<WithRequestBody>,
    /// The policy's `include_peer_certificate`.
    peer_certificate: bool,
    template: Mutex<Engine>,
    idle: Mutex<Vec<Engine>>,
}

impl std::fmt::Debug for RegoEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegoEngine")
            .field("query", &self.query)
            .field("form", &self.form)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Keep at most this many idle engines per policy (about one per worker).
const MAX_IDLE: usize = 64;

impl RegoEngine {
    /// Compiles modules and data documents. Errors name the module and say
    /// what is wrong; the configuration is at fault. A module calling a
    /// function Rampart lacks is refused here, never at the first request.
    pub fn new(
        modules: &[RegoModule],
        data: &[Value],
        query: &str,
        form: ResultForm,
        timeout: Duration,
    ) -> Result<RegoEngine, String> {
        // Before any parse (the builtin check below parses too): regorus's
        // parser is exponential in nesting depth (depth.rs).
        for m in modules {
            check_nesting(&m.source, MAX_REGO_NESTING)
                .map_err(|e| format!("module {}:{e}", m.name))?;
        }
        let missing = missing_builtins(modules);
        if !missing.is_empty() {
            let lines: Vec<String> = missing.iter().map(ToString::to_string).collect();
            return Err(lines.join("\n"));
        }
        let mut engine = Engine::new();
        // OPA's default: a builtin that fails makes its call undefined, it
        // does not fail the evaluation (`--strict-builtin-errors` is off).
        engine.set_strict_builtin_errors(false);
        builtins::register(&mut engine)?;
        for m in modules {
            engine.set_rego_v0(m.version == RegoVersion::V0);
            engine
                .add_policy(m.name.clone(), m.source.clone())
                .map_err(|e| format!("module {}: {e}", m.name))?;
        }
        for d in data {
            let v = regorus::Value::deserialize(d).map_err(|e| format!("data: {e}"))?;
            engine.add_data(v).map_err(|e| format!("data: {e}"))?;
        }
        engine.set_execution_timer_config(regorus::utils::limits::ExecutionTimerConfig {
            limit: timeout,
            // Invariant: 32 is not zero.
            check_interval: NonZeroU32::new(32).expect("non-zero"),
        });
        // Evaluate once with an empty input: this compiles the modules and
        // refuses a query that names nothing, at load time rather than on
        // the first request.
        engine.set_input(regorus::Value::new_object());
        let rule = match engine.eval_rule(query.to_owned()) {
            Ok(_) => query.to_owned(),
            // Not one rule: a document built from partial rules
            // (`result.allowed = ...`, `result["headers"] := ...`) or a
            // package. OPA evaluates the whole document at the decision
            // path; so does a rule whose value is that document.
            Err(_) => {
                let wrapper = format!("package {DECISION_PACKAGE}\n\n{DECISION_RULE} := {query}\n");
                engine.set_rego_v0(false);
                engine
                    .add_policy(format!("{DECISION_PACKAGE}.rego"), wrapper)
                    .map_err(|e| format!("query {query}: {e}"))?;
                let rule = format!("data.{DECISION_PACKAGE}.{DECISION_RULE}");
                engine
                    .eval_rule(rule.clone())
                    .map_err(|e| format!("query {query}: {e}"))?;
                let plain: Vec<(String, String, RegoVersion)> = modules
                    .iter()
                    .map(|m| (m.name.clone(), m.source.clone(), m.version))
                    .collect();
                if !check::declares(&plain, query) && !data_has(data, query) {
                    return Err(format!("query {query}: no rule or document at this path"));
                }
                rule
            }
        };
        Ok(RegoEngine {
            query: Arc::from(query),
            rule: Arc::from(rule),
            form,
            timeout,
            request_body: None,
            peer_certificate: false,
            template: Mutex::new(engine),
            idle: Mutex::new(Vec::new()),
        })
    }

    /// The same policy, shown the request body as `with_request_body` says.
    pub fn with_request_body(self, body: Option<WithRequestBody>) -> Self {
        RegoEngine {
            request_body: body,
            ..self
        }
    }

    /// The policy's `with_request_body`.
    pub fn request_body(&self) -> Option<WithRequestBody> {
        self.request_body
    }

    /// The same policy, shown the peer certificate (`include_peer_certificate`).
    pub fn with_peer_certificate(self, include: bool) -> Self {
        RegoEngine {
            peer_certificate: include,
            ..self
        }
    }

    /// Whether the policy asks for the peer certificate.
    pub fn includes_peer_certificate(&self) -> bool {
        self.peer_certificate
    }

    /// The query, reported as the deciding "rule".
    pub(crate) fn query_name(&self) -> Arc<str> {
        self.query.clone()
    }

    pub(crate) fn check(
        &self,
        conn: &ConnectionInfo<'_>,
        req: Option<&RequestInfo<'_>>,
    ) -> RegoOutcome {
        match req {
            Some(req) => match crate::input::build_rego(conn, req) {
                Ok(input) => self.evaluate(input),
                // OPA-Envoy answers 400 without evaluating.
                Err(e) => RegoOutcome::Denied(Box::new(DenyResponse {
                    status: http::StatusCode::BAD_REQUEST,
                    body: format!("request parse error: {e}"),
                    headers: Vec::new(),
                    dynamic_metadata: None,
                })),
            },
            None => RegoOutcome::NotHttp,
        }
    }

    /// The whole document at the decision path for one input, as OPA's
    /// `POST /v1/data/<path>` returns it: `None` when it is undefined.
    /// For the differential tests against OPA and for explanations.
    pub fn evaluate_document(&self, input: &Value) -> Result<Option<Value>, String> {
        let input = regorus::Value::deserialize(input).map_err(|e| format!("input: {e}"))?;
        let mut engine = self.take();
        engine.set_input(input);
        let result = engine.eval_rule(self.rule.to_string());
        self.put_back(engine);
        match result {
            Ok(regorus::Value::Undefined) => Ok(None),
            Ok(v) => serde_json::to_value(&v)
                .map(Some)
                .map_err(|e| format!("result: {e}")),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Evaluates the query against an input document.
    pub(crate) fn evaluate(&self, input: regorus::Value) -> RegoOutcome {
        let mut engine = self.take();
        engine.set_input(input);
        let start = Instant::now();
        let result = engine.eval_rule(self.rule.to_string());
        let elapsed = start.elapsed();
        self.put_back(engine);
        match result {
            Ok(v) => self.read_result(&v),
            Err(e) if is_time_limit(e.chain()) || elapsed >= self.timeout => RegoOutcome::Timeout,
            Err(e) => RegoOutcome::Error(e.to_string()),
        }
    }

    fn take(&self) -> Engine {
        let pooled = match self.idle.lock() {
            Ok(mut idle) => idle.pop(),
            // A panic while holding the pool lock leaves only a Vec behind;
            // start again from the template.
            Err(poisoned) => poisoned.into_inner().pop(),
        };
        match pooled {
            Some(e) => e,
            None => match self.template.lock() {
                Ok(t) => t.clone(),
                Err(poisoned) => poisoned.into_inner().clone(),
            },
        }
    }

    fn put_back(&self, engine: Engine) {
        let mut idle = match self.idle.lock() {
            Ok(idle) => idle,
            Err(poisoned) => poisoned.into_inner(),
        };
        if idle.len() < MAX_IDLE {
            idle.push(engine);
        }
    }

    fn read_result(&self, v: &regorus::Value) -> RegoOutcome {
        match v {
            regorus::Value::Undefined => {
                return RegoOutcome::Error("decision is undefined".into());
            }
            // The common answer needs no JSON: a plain boolean means the
            // same in both result forms.
            regorus::Value::Bool(b) => return bool_outcome(*b),
            _ => {}
        }
        let json = match serde_json::to_value(v) {
            Ok(j) => j,
            Err(e) => return RegoOutcome::Error(format!("result: {e}")),
        };
        let read = match self.form {
            ResultForm::Envoy => read_envoy(&json),
            ResultForm::AnyTrue => read_any_true(&json),
        };
        match read {
            Ok(o) => o,
            Err(e) => RegoOutcome::Error(e),
        }
    }
}

/// Whether regorus stopped the evaluation at its execution timer. The
/// timer is cooperative: the interpreter checks it every few statements,
/// loop iterations and comprehension steps, so a runaway loop stops within
/// about the limit; one builtin call (a huge `numbers.range`, a regex on a
/// long string) runs to its end before the next check.
fn is_time_limit<'e>(
    mut causes: impl Iterator<Item = &'e (dyn std::error::Error + 'static)>,
) -> bool {
    causes.any(|c| {
        matches!(
            c.downcast_ref::<regorus::LimitError>(),
            Some(regorus::LimitError::TimeLimitExceeded { .. })
        )
    })
}

fn bool_outcome(allowed: bool) -> RegoOutcome {
    if allowed {
        RegoOutcome::Allowed(None)
    } else {
        RegoOutcome::Denied(Box::new(DenyResponse {
            status: http::StatusCode::FORBIDDEN,
            body: String::new(),
            headers: Vec::new(),
            dynamic_metadata: None,
        }))
    }
}

fn read_any_true(v: &Value) -> Result<RegoOutcome, String> {
    let allowed = match v {
        Value::Bool(b) => *b,
        Value::Object(m) => {
            let mut any = false;
            for (k, v) in m {
                match v {
                    Value::Bool(b) => any |= *b,
                    _ => return Err(format!("result field {k:?} is not a boolean")),
                }
            }
            any
        }
        _ => return Err("result is neither a boolean nor an object of booleans".into()),
    };
    Ok(if allowed {
        RegoOutcome::Allowed(None)
    } else {
        RegoOutcome::Denied(Box::new(DenyResponse {
            status: http::StatusCode::FORBIDDEN,
            body: String::new(),
            headers: Vec::new(),
            dynamic_metadata: None,
        }))
    })
}

/// The status codes of Envoy's `envoy.type.v3.StatusCode`: OPA-Envoy
/// refuses an `http_status` outside it (an error, so Envoy answers 403).
const ENVOY_STATUS_CODES: &[u16] = &[
    100, 200, 201, 202, 203, 204, 205, 206, 207, 208, 226, 300, 301, 302, 303, 304, 305, 307, 308,
    400, 401, 402, 403, 404, 405, 406, 407, 408, 409, 410, 411, 412, 413, 414, 415, 416, 417, 421,
    422, 423, 424, 426, 428, 429, 431, 500, 501, 502, 503, 504, 505, 506, 507, 508, 510, 511,
];

/// OPA-Envoy's result (`envoyauth/response.go`, read as its gRPC server
/// reads it): `true`/`false`, or an object with a required boolean
/// `allowed`; `headers` and `dynamic_metadata` either way; for an allowed
/// request `response_headers_to_add`, `request_headers_to_remove`,
/// `query_parameters_to_remove` and `query_parameters_to_set`; for a denied
/// one `http_status` (default 403) and `body`. A field of the wrong type is
/// an error (deny), as it is for the plugin; no field is ignored.
fn read_envoy(v: &Value) -> Result<RegoOutcome, String> {
    let obj = match v {
        Value::Bool(true) => return Ok(RegoOutcome::Allowed(None)),
        Value::Bool(false) => {
            return Ok(RegoOutcome::Denied(Box::new(DenyResponse {
                status: http::StatusCode::FORBIDDEN,
                body: String::new(),
                headers: Vec::new(),
                dynamic_metadata: None,
            })));
        }
        Value::Object(o) => o,
        _ => return Err("result must be a boolean or an object with `allowed`".into()),
    };
    let allowed = match obj.get("allowed") {
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err("result field `allowed` must be a boolean".into()),
        None => return Err("result object has no `allowed` field".into()),
    };
    let headers = headers_of(obj.get("headers"))?;
    let dynamic_metadata = match obj.get("dynamic_metadata") {
        None => None,
        Some(m @ Value::Object(_)) => Some(m.clone()),
        Some(_) => return Err("result field `dynamic_metadata` must be an object".into()),
    };
    if allowed {
        let effects = HttpEffects {
            headers,
            response_headers_to_add: headers_of(obj.get("response_headers_to_add"))?,
            request_headers_to_remove: names_of(obj.get("request_headers_to_remove"))?,
            request_headers_to_append: Vec::new(),
            query_parameters_to_remove: strings_of(
                obj.get("query_parameters_to_remove"),
                "query_parameters_to_remove",
            )?,
            query_parameters_to_set: query_set_of(obj.get("query_parameters_to_set"))?,
            dynamic_metadata,
        };
        let empty = effects.is_empty();
        return Ok(RegoOutcome::Allowed((!empty).then(|| Arc::new(effects))));
    }
    let status = match obj.get("http_status") {
        None => http::StatusCode::FORBIDDEN,
        Some(s) => s
            .as_u64()
            .and_then(|n| u16::try_from(n).ok())
            .filter(|n| ENVOY_STATUS_CODES.contains(n))
            .and_then(|n| http::StatusCode::from_u16(n).ok())
            .ok_or_else(|| format!("http_status {s} is not a status code Envoy can send"))?,
    };
    let body = match obj.get("body") {
        None => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err("result field `body` must be a string".into()),
    };
    Ok(RegoOutcome::Denied(Box::new(DenyResponse {
        status,
        body,
        headers,
        dynamic_metadata,
    })))
}

/// An array of strings (`query_parameters_to_remove`).
fn strings_of(v: Option<&Value>, field: &str) -> Result<Vec<String>, String> {
    match v {
        None => Ok(Vec::new()),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| format!("result field `{field}` must hold strings"))
            })
            .collect(),
        Some(_) => Err(format!(
            "result field `{field}` must be an array of strings"
        )),
    }
}

/// `query_parameters_to_set`: an object of name -> string or [string].
fn query_set_of(v: Option<&Value>) -> Result<Vec<(String, Vec<String>)>, String> {
    let obj = match v {
        None => return Ok(Vec::new()),
        Some(Value::Object(o)) => o,
        Some(_) => return Err("result field `query_parameters_to_set` must be an object".into()),
    };
    obj.iter()
        .map(|(k, v)| {
            let values = match v {
                Value::String(s) => vec![s.clone()],
                Value::Array(a) => a
                    .iter()
                    .map(|x| {
                        x.as_str().map(str::to_owned).ok_or_else(|| {
                            format!("query_parameters_to_set {k:?}: values must be strings")
                        })
                    })
                    .collect::<Result<_, _>>()?,
                _ => {
                    return Err(format!(
                        "query_parameters_to_set {k:?}: value must be a string or strings"
                    ));
                }
            };
            Ok((k.clone(), values))
        })
        .collect()
}

type HeaderList = Vec<(http::HeaderName, http::HeaderValue)>;

/// An object of name -> string or [string], or an array of such objects.
fn headers_of(v: Option<&Value>) -> Result<HeaderList, String> {
    let mut out = Vec::new();
    let objects: Vec<&serde_json::Map<String, Value>> = match v {
        None => return Ok(out),
        Some(Value::Object(o)) => vec![o],
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_object()
                    .ok_or_else(|| "headers array must hold objects".to_owned())
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err("headers must be an object or an array of objects".into()),
    };
    for o in objects {
        for (k, v) in o {
            let name = http::HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| format!("{k:?} is not a header name"))?;
            let values: Vec<&str> = match v {
                Value::String(s) => vec![s.as_str()],
                Value::Array(a) => a
                    .iter()
                    .map(|x| {
                        x.as_str()
                            .ok_or_else(|| format!("header {k:?}: values must be strings"))
                    })
                    .collect::<Result<_, _>>()?,
                _ => return Err(format!("header {k:?}: value must be a string or strings")),
            };
            for val in values {
                let hv = http::HeaderValue::from_str(val)
                    .map_err(|_| format!("header {k:?}: invalid value"))?;
                out.push((name.clone(), hv));
            }
        }
    }
    Ok(out)
}

fn names_of(v: Option<&Value>) -> Result<Vec<http::HeaderName>, String> {
    match v {
        None => Ok(Vec::new()),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .and_then(|s| http::HeaderName::from_bytes(s.as_bytes()).ok())
                    .ok_or_else(|| "request_headers_to_remove must hold header names".to_owned())
            })
            .collect(),
        Some(_) => Err("request_headers_to_remove must be an array".into()),
    }
}
