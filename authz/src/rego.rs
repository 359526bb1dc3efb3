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

use crate::model::{RegoVersion, ResultForm};
use crate::{ConnectionInfo, DenyResponse, HttpEffects, RequestInfo};

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
    query: Arc<str>,
    form: ResultForm,
    timeout: Duration,
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
    /// Compiles modules (`(name, source)`) and data documents. Errors name
    /// the module and say what is wrong; the configuration is at fault.
    pub fn new(
        modules: &[(String, String)],
        data: &[Value],
        version: RegoVersion,
        query: &str,
        form: ResultForm,
        timeout: Duration,
    ) -> Result<RegoEngine, String> {
        let mut engine = Engine::new();
        match version {
            RegoVersion::V0 => engine.set_rego_v0(true),
            RegoVersion::V1 => engine.set_rego_v0(false),
        }
        for (name, src) in modules {
            engine
                .add_policy(name.clone(), src.clone())
                .map_err(|e| format!("module {name}: {e}"))?;
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
        // refuses a query that names no rule, at load time rather than on the
        // first request.
        engine.set_input(regorus::Value::new_object());
        engine
            .eval_rule(query.to_owned())
            .map_err(|e| format!("query {query}: {e}"))?;
        Ok(RegoEngine {
            query: Arc::from(query),
            form,
            timeout,
            template: Mutex::new(engine),
            idle: Mutex::new(Vec::new()),
        })
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
            Some(req) => self.evaluate(crate::input::build_rego(conn, req)),
            None => RegoOutcome::NotHttp,
        }
    }

    /// Evaluates the query against an input document.
    pub(crate) fn evaluate(&self, input: regorus::Value) -> RegoOutcome {
        let mut engine = self.take();
        engine.set_input(input);
        let start = Instant::now();
        let result = engine.eval_rule(self.query.to_string());
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
        }))
    })
}

/// OPA-Envoy's result: `true`/`false`, or an object with a required boolean
/// `allowed` and optional `headers`, `response_headers_to_add`,
/// `request_headers_to_remove`, `http_status` (default 403) and `body`.
fn read_envoy(v: &Value) -> Result<RegoOutcome, String> {
    let obj = match v {
        Value::Bool(true) => return Ok(RegoOutcome::Allowed(None)),
        Value::Bool(false) => {
            return Ok(RegoOutcome::Denied(Box::new(DenyResponse {
                status: http::StatusCode::FORBIDDEN,
                body: String::new(),
                headers: Vec::new(),
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
    if allowed {
        let effects = HttpEffects {
            headers,
            response_headers_to_add: headers_of(obj.get("response_headers_to_add"))?,
            request_headers_to_remove: names_of(obj.get("request_headers_to_remove"))?,
            request_headers_to_append: Vec::new(),
        };
        let empty = effects.is_empty();
        return Ok(RegoOutcome::Allowed((!empty).then(|| Arc::new(effects))));
    }
    let status = match obj.get("http_status") {
        None => http::StatusCode::FORBIDDEN,
        Some(s) => s
            .as_u64()
            .and_then(|n| u16::try_from(n).ok())
            .and_then(|n| http::StatusCode::from_u16(n).ok())
            .ok_or_else(|| format!("http_status {s} is not a valid HTTP status"))?,
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
    })))
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
