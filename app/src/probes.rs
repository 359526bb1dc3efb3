//! Probe rewriting at injection: the app's HTTP, gRPC and TCP probes go to
//! the sidecar's admin port, which runs them against the app on loopback.
//!
//! Why: with the inbound rules in place, the kubelet's probe of an app port
//! is captured like any other inbound connection. On a port whose policy
//! requires mTLS the kubelet (which has no SVID) is refused, so the pod never
//! becomes Ready; a TCP probe would only test the sidecar's own listener.
//! As Istio does, each probe handler is replaced by an `httpGet` of
//! `/app-health/<container>/<livez|readyz|startupz>` on the admin port (which
//! `rampart init` never captures), and the original handlers travel to the
//! sidecar in its `RAMPART_APP_PROBES` environment variable: a JSON object
//! from that path to `{ "httpGet" | "grpc" | "tcpSocket": <handler>,
//! "timeoutSeconds": N }`, with named ports resolved to numbers. The admin
//! server (`rampart_proxy::probe`) reads it and forwards.
//!
//! Probes on ports the sidecar does not capture (excluded inbound ports),
//! probes of another host, and `exec` probes are left alone. Uninjection
//! puts every original handler back from the variable, in place.

use serde_yaml::{Mapping, Value};

use crate::inject::InjectError;

/// The sidecar's environment variable that carries the original probes.
pub const ENV_APP_PROBES: &str = "RAMPART_APP_PROBES";
/// Where the rewritten probes point on the admin port.
pub const PATH_PREFIX: &str = "/app-health/";

/// The probe kinds of a container, and the path segment each gets.
const KINDS: [(&str, &str); 3] = [
    ("livenessProbe", "livez"),
    ("readinessProbe", "readyz"),
    ("startupProbe", "startupz"),
];
/// The handlers that are forwarded (`exec` runs in the container itself).
const HANDLERS: [&str; 3] = ["httpGet", "grpc", "tcpSocket"];

/// Rewrites the probes of the pod's app containers (`spec.containers`) to
/// the admin port; returns the `RAMPART_APP_PROBES` value, or `None` when
/// no probe was rewritten.
pub fn rewrite(
    spec: &mut Mapping,
    admin_port: u16,
    excluded_inbound: &[u16],
    object: &str,
) -> Result<Option<String>, InjectError> {
    let mut originals = Mapping::new();
    let Some(Value::Sequence(containers)) = spec.get_mut("containers") else {
        return Ok(None);
    };
    for container in containers {
        let Value::Mapping(container) = container else {
            continue;
        };
        let name = container
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let ports = named_ports(container);
        for (kind, segment) in KINDS {
            let field = || format!("containers[{name}].{kind}");
            let Some(Value::Mapping(probe)) = container.get_mut(kind) else {
                continue;
            };
            let Some((handler, action)) = handler_of(probe) else {
                continue;
            };
            let Value::Mapping(action) = action else {
                return Err(bad(object, format!("{}.{handler}", field()), "a mapping"));
            };
            // A probe of another host does not enter the pod.
            if action.get("host").is_some_and(|h| !h.is_null()) {
                continue;
            }
            let port = resolve_port(action.get("port"), &ports).ok_or_else(|| {
                bad(
                    object,
                    format!("{}.{handler}.port", field()),
                    "a port number or a declared port name",
                )
            })?;
            if excluded_inbound.contains(&port) {
                continue;
            }
            // A serde_yaml mapping keeps the handler's key order (a
            // serde_json map would sort it), so uninjection restores it exactly.
            let mut original = action.clone();
            let named = action
                .get("port")
                .and_then(Value::as_str)
                .filter(|p| p.parse::<u16>().is_err());
            let port_name = named.map(str::to_string);
            original.insert(Value::String("port".to_string()), Value::from(port));
            let path = format!("{PATH_PREFIX}{name}/{segment}");
            let mut entry = Mapping::new();
            entry.insert(Value::String(handler.to_string()), Value::Mapping(original));
            // The kubelet's default (1 s) when the probe does not say.
            let timeout = probe
                .get("timeoutSeconds")
                .and_then(Value::as_u64)
                .unwrap_or(1);
            entry.insert(
                Value::String("timeoutSeconds".to_string()),
                Value::from(timeout),
            );
            // For uninjection, which puts the name back.
            if let Some(port_name) = port_name {
                entry.insert(
                    Value::String("portName".to_string()),
                    Value::String(port_name),
                );
            }
            originals.insert(Value::String(path.clone()), Value::Mapping(entry));
            let rewritten = map([
                ("path", Value::String(path)),
                ("port", Value::from(admin_port)),
                ("scheme", Value::String("HTTP".to_string())),
            ]);
            replace_handler(probe, handler, "httpGet", rewritten);
        }
    }
    if originals.is_empty() {
        return Ok(None);
    }
    let text = serde_json::to_string(&Value::Mapping(originals))
        .map_err(|_| bad(object, "containers".to_string(), "plain data (probes)"))?;
    Ok(Some(text))
}

/// Puts back the handlers [`rewrite`] replaced, from the
/// `RAMPART_APP_PROBES` value `probes`.
pub fn restore(spec: &mut Mapping, probes: &str, object: &str) -> Result<(), InjectError> {
    // JSON is YAML: read as YAML, the handlers keep their key order.
    let originals: Mapping = serde_yaml::from_str(probes).map_err(|e| InjectError::BadField {
        object: object.to_string(),
        field: format!("env {ENV_APP_PROBES} of the sidecar ({e})"),
        expected: "a JSON object of probes",
    })?;
    let Some(Value::Sequence(containers)) = spec.get_mut("containers") else {
        return Ok(());
    };
    for container in containers {
        let Value::Mapping(container) = container else {
            continue;
        };
        let name = container
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        for (kind, segment) in KINDS {
            let path = format!("{PATH_PREFIX}{name}/{segment}");
            let (Some(Value::Mapping(probe)), Some(Value::Mapping(original))) =
                (container.get_mut(kind), originals.get(path.as_str()))
            else {
                continue;
            };
            let Some((handler, Value::Mapping(action))) = original.iter().find_map(|(k, v)| {
                HANDLERS
                    .iter()
                    .find(|h| k.as_str() == Some(**h))
                    .map(|h| (*h, v))
            }) else {
                continue;
            };
            let mut action = action.clone();
            if let Some(port_name) = original.get("portName") {
                action.insert(Value::String("port".to_string()), port_name.clone());
            }
            let action = Value::Mapping(action);
            replace_handler(probe, "httpGet", handler, action);
        }
    }
    Ok(())
}

/// The probe's forwarded handler (`httpGet`, `grpc` or `tcpSocket`).
fn handler_of(probe: &Mapping) -> Option<(&'static str, &Value)> {
    HANDLERS
        .iter()
        .find_map(|h| probe.get(*h).map(|action| (*h, action)))
}

/// Replaces the `from` entry of `probe` with `to: value`, at the same
/// position, so that uninjection gives back the same key order.
fn replace_handler(probe: &mut Mapping, from: &str, to: &str, value: Value) {
    let old = std::mem::take(probe);
    for (key, v) in old {
        if key.as_str() == Some(from) {
            probe.insert(Value::String(to.to_string()), value.clone());
        } else {
            probe.insert(key, v);
        }
    }
}

/// The container's declared ports by name.
fn named_ports(container: &Mapping) -> Vec<(String, u16)> {
    let declared = container.get("ports").and_then(Value::as_sequence);
    declared
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let name = p.get("name")?.as_str()?.to_string();
            let number = u16::try_from(p.get("containerPort")?.as_u64()?).ok()?;
            Some((name, number))
        })
        .collect()
}

/// A probe's port: a number, or the name of a declared port.
fn resolve_port(port: Option<&Value>, named: &[(String, u16)]) -> Option<u16> {
    match port? {
        Value::Number(n) => n
            .as_u64()
            .and_then(|n| u16::try_from(n).ok())
            .filter(|p| *p > 0),
        Value::String(text) => match text.parse::<u16>() {
            Ok(p) if p > 0 => Some(p),
            _ => named.iter().find(|(n, _)| n == text).map(|(_, p)| *p),
        },
        _ => None,
    }
}

fn bad(object: &str, field: String, expected: &'static str) -> InjectError {
    InjectError::BadField {
        object: object.to_string(),
        field,
        expected,
    }
}

fn map<const N: usize>(pairs: [(&str, Value); N]) -> Value {
    Value::Mapping(
        pairs
            .into_iter()
            .map(|(k, v)| (Value::String(k.to_string()), v))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value as Json;

    fn spec(yaml: &str) -> Mapping {
        serde_yaml::from_str(yaml).unwrap()
    }

    const SPEC: &str = "containers:\n- name: app\n  ports:\n  - {name: http, containerPort: 8080}\n  readinessProbe:\n    httpGet: {path: /healthz, port: http, httpHeaders: [{name: X-Probe, value: '1'}]}\n    periodSeconds: 2\n  livenessProbe:\n    initialDelaySeconds: 3\n    grpc: {port: 9090, service: app}\n    timeoutSeconds: 4\n  startupProbe:\n    tcpSocket: {port: 7070}\n- name: side\n  livenessProbe:\n    exec: {command: [true]}\n";

    #[test]
    fn probes_go_to_the_admin_port_and_come_back_in_place() {
        let original = spec(SPEC);
        let mut s = original.clone();
        let env = rewrite(&mut s, 15000, &[], "Pod/p").unwrap().unwrap();
        let probes: Json = serde_json::from_str(&env).unwrap();
        assert_eq!(
            probes["/app-health/app/readyz"],
            serde_json::json!({"httpGet": {"path": "/healthz", "port": 8080, "httpHeaders": [{"name": "X-Probe", "value": "1"}]}, "timeoutSeconds": 1, "portName": "http"})
        );
        assert_eq!(
            probes["/app-health/app/livez"],
            serde_json::json!({"grpc": {"port": 9090, "service": "app"}, "timeoutSeconds": 4})
        );
        assert_eq!(
            probes["/app-health/app/startupz"]["tcpSocket"]["port"],
            7070
        );
        assert!(probes.get("/app-health/side/livez").is_none(), "exec stays");
        let live = &s["containers"][0]["livenessProbe"];
        let keys: Vec<_> = live
            .as_mapping()
            .unwrap()
            .keys()
            .map(|k| k.as_str().unwrap())
            .collect();
        assert_eq!(keys, ["initialDelaySeconds", "httpGet", "timeoutSeconds"]);
        assert_eq!(live["httpGet"]["path"], "/app-health/app/livez");
        assert_eq!(live["httpGet"]["port"], 15000);
        restore(&mut s, &env, "Pod/p").unwrap();
        assert_eq!(s, original);
    }

    #[test]
    fn excluded_ports_other_hosts_and_bad_ports() {
        let mut s = spec(
            "containers:\n- name: a\n  readinessProbe:\n    httpGet: {port: 8080}\n  livenessProbe:\n    httpGet: {port: 9, host: example.com}\n",
        );
        assert_eq!(rewrite(&mut s, 15000, &[8080], "Pod/p").unwrap(), None);
        let mut s = spec("containers:\n- name: a\n  readinessProbe:\n    httpGet: {port: web}\n");
        let err = rewrite(&mut s, 15000, &[], "Pod/p")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "Pod/p: field `containers[a].readinessProbe.httpGet.port` is not a port number or a declared port name"
        );
    }
}
