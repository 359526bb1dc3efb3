//! App Mesh `appmesh.k8s.aws/v1beta2` VirtualNode: its listeners' TLS
//! (mode and the client SANs it accepts) and its backends' client policies
//! (the server SANs it pins).
//!
//! - A listener becomes an inbound port (`protocol`, `mode`) and a rule of
//!   one native ALLOW policy: the SANs of `validation.subjectAlternativeNames`
//!   as principals (DNS SANs only with `--allow-dns-san NAME`, which also
//!   opts the port into DNS-SAN client certificates).
//! - A backend's (or `backendDefaults`') `clientPolicy.tls.validation`
//!   SANs become an `outbound.servers` rule whose `identities` are exactly
//!   those SANs: the server's SPIFFE ID is checked **in the handshake**,
//!   before any request is sent (App Mesh's Envoy did the same). A DNS SAN
//!   (an ACM PCA or file certificate) becomes an `allow_dns_san_servers`
//!   name of the rule when `--allow-dns-san NAME` names it, and is left
//!   out and reported otherwise. A backend's addresses come from
//!   `--address ns/name=CIDR`; the defaults apply to every other meshed
//!   destination.

use serde::Deserialize;
use serde_json::json;

use super::{ImportError, ImportOptions, Imported, Note, NoteKind, Object, Target};

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Spec {
    #[serde(default)]
    listeners: Vec<Listener>,
    #[serde(default)]
    backends: Vec<BackendEntry>,
    #[serde(default)]
    backend_defaults: Option<ClientPolicyHolder>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Listener {
    port_mapping: PortMapping,
    #[serde(default)]
    tls: Option<ListenerTls>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PortMapping {
    port: u16,
    protocol: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListenerTls {
    mode: String,
    #[serde(default)]
    validation: Option<Validation>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Validation {
    #[serde(default)]
    subject_alternative_names: Option<Sans>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Sans {
    #[serde(rename = "match")]
    matcher: SanMatch,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SanMatch {
    exact: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct BackendEntry {
    virtual_service: VirtualServiceBackend,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct VirtualServiceBackend {
    #[serde(default)]
    virtual_service_ref: Option<Ref>,
    #[serde(default, rename = "virtualServiceARN")]
    virtual_service_arn: Option<String>,
    #[serde(default)]
    client_policy: Option<ClientPolicy>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Ref {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ClientPolicyHolder {
    #[serde(default)]
    client_policy: Option<ClientPolicy>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ClientPolicy {
    #[serde(default)]
    tls: Option<ClientTls>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ClientTls {
    #[serde(default = "enforce_default")]
    enforce: bool,
    #[serde(default)]
    ports: Vec<u16>,
    validation: Validation,
}

fn enforce_default() -> bool {
    true
}

pub(crate) fn import(objects: &[Object], options: &ImportOptions) -> Result<Imported, ImportError> {
    let mut out = Imported::default();
    for o in objects {
        if o.kind != "VirtualNode" {
            out.report.push(Note {
                at: o.at(),
                kind: NoteKind::NotImported,
                text: format!(
                    "{} carries no authorization (App Mesh authorizes with VirtualNode TLS only)",
                    o.kind
                ),
            });
            continue;
        }
        let spec: Spec = o.parse(&o.value.get("spec").cloned().unwrap_or_default())?;
        virtual_node(o, &spec, options, &mut out)?;
    }
    Ok(out)
}

fn virtual_node(
    o: &Object,
    spec: &Spec,
    options: &ImportOptions,
    out: &mut Imported,
) -> Result<(), ImportError> {
    let name = super::policy_name(&["appmesh", o.ns(), &o.name]);
    let mut rules = Vec::new();
    let mut ports = Vec::new();
    for (i, l) in spec.listeners.iter().enumerate() {
        let at = format!("{}: spec.listeners[{i}]", o.at());
        let port = l.port_mapping.port;
        let protocol = match l.port_mapping.protocol.as_str() {
            "http" => "http",
            "http2" => "http2",
            "grpc" => "grpc",
            "tcp" => "opaque",
            other => {
                return Err(ImportError {
                    at: format!("{at}.portMapping.protocol"),
                    message: format!(
                        "{other:?} is not an App Mesh protocol (http, http2, grpc, tcp)"
                    ),
                });
            }
        };
        let mut port_cfg = json!({"port": port, "protocol": protocol});
        let rule_name = format!("listener-{port}");
        let mode = l.tls.as_ref().map_or("DISABLED", |t| t.mode.as_str());
        match mode {
            "DISABLED" | "PERMISSIVE" => {
                port_cfg["mode"] = json!("permissive");
                rules.push(json!({"name": rule_name, "from": {"unauthenticated": true}, "to": {"ports": [port]}}));
                out.report.push(Note {
                    at,
                    kind: NoteKind::Mapped,
                    text: format!("port {port} ({mode}): permissive, any client (App Mesh did not authenticate plaintext clients)"),
                });
            }
            "STRICT" => {
                port_cfg["mode"] = json!("strict");
                let sans = l
                    .tls
                    .as_ref()
                    .and_then(|t| t.validation.as_ref())
                    .and_then(|v| v.subject_alternative_names.as_ref());
                match sans {
                    None => {
                        rules.push(json!({"name": rule_name, "to": {"ports": [port]}}));
                        out.report.push(Note {
                            at,
                            kind: NoteKind::Mapped,
                            text: format!("port {port} (STRICT, no SAN list): any authenticated SPIFFE workload of the trust bundle; clients without a certificate, which App Mesh admitted without `validation`, are refused (narrower)"),
                        });
                    }
                    Some(s) => {
                        let mut principals = Vec::new();
                        for san in &s.matcher.exact {
                            match super::principal_of_san(options, san) {
                                Ok(p) => {
                                    if p.starts_with("dns:") {
                                        port_cfg["allow_dns_san_clients"] = json!(true);
                                    }
                                    principals.push(p);
                                }
                                Err(e) => out.report.push(Note {
                                    at: format!("{at}.tls.validation.subjectAlternativeNames"),
                                    kind: NoteKind::NotImported,
                                    text: e,
                                }),
                            }
                        }
                        if principals.is_empty() {
                            out.report.push(Note {
                                at,
                                kind: NoteKind::NotImported,
                                text: format!(
                                    "port {port}: no SAN could be imported: the port admits nothing"
                                ),
                            });
                        } else {
                            out.report.push(Note {
                                at,
                                kind: NoteKind::Mapped,
                                text: format!("port {port} (STRICT): clients whose certificate names one of {}", principals.join(", ")),
                            });
                            rules.push(json!({"name": rule_name, "from": {"principals": principals}, "to": {"ports": [port]}}));
                        }
                    }
                }
            }
            other => {
                return Err(ImportError {
                    at: format!("{at}.tls.mode"),
                    message: format!("{other:?} is not a TLS mode (STRICT, PERMISSIVE, DISABLED)"),
                });
            }
        }
        ports.push(port_cfg);
    }
    let mut servers = Vec::new();
    for (i, b) in spec.backends.iter().enumerate() {
        let at = format!("{}: spec.backends[{i}].virtualService", o.at());
        let vs = &b.virtual_service;
        let Some(tls) = vs.client_policy.as_ref().and_then(|c| c.tls.as_ref()) else {
            continue;
        };
        let key = match (&vs.virtual_service_ref, &vs.virtual_service_arn) {
            (Some(r), _) => format!("{}/{}", r.namespace.as_deref().unwrap_or(o.ns()), r.name),
            (None, Some(arn)) => arn.clone(),
            (None, None) => {
                return Err(ImportError {
                    at,
                    message: "a backend names neither virtualServiceRef nor virtualServiceARN"
                        .into(),
                });
            }
        };
        let Some(cidrs) = options.addresses.get(&key) else {
            out.report.push(Note {
                at,
                kind: NoteKind::NotImported,
                text: format!("backend {key}: its SAN pinning needs the backend's addresses: pass `--address {key}=CIDR[,CIDR...]` (its Service's cluster IP and pod IPs); without them the backend defaults, or `unknown_server: deny`, decide"),
            });
            continue;
        };
        if let Some(rule) = server_rule(&at, &key, tls, Some(cidrs), options, out) {
            servers.push(rule);
        }
    }
    if let Some(tls) = spec
        .backend_defaults
        .as_ref()
        .and_then(|d| d.client_policy.as_ref())
        .and_then(|c| c.tls.as_ref())
    {
        let at = format!("{}: spec.backendDefaults.clientPolicy.tls", o.at());
        if let Some(rule) = server_rule(&at, "every other backend", tls, None, options, out) {
            servers.push(rule);
        }
    }
    let mut config = serde_json::Map::new();
    if !ports.is_empty() {
        config.insert("inbound".into(), json!({"ports": ports}));
    }
    if !servers.is_empty() {
        config.insert("outbound".into(), json!({"servers": servers}));
    }
    out.report.push(Note {
        at: o.at(),
        kind: NoteKind::Mapped,
        text: format!(
            "policy {name} (ALLOW, {} rules), {} inbound ports, {} outbound server rules",
            rules.len(),
            ports.len(),
            servers.len()
        ),
    });
    out.targets.push(Target {
        workload: format!("VirtualNode {}/{}", o.ns(), o.name),
        file_stem: super::policy_name(&[o.ns(), &o.name]),
        policies: json!({"policies": [{"name": name, "action": "ALLOW", "rules": rules}]}),
        config,
    });
    Ok(())
}

/// An `outbound.servers` rule pinning exactly the client policy's SANs
/// (DNS SANs only those the user opted into by name).
fn server_rule(
    at: &str,
    what: &str,
    tls: &ClientTls,
    cidrs: Option<&Vec<ipnet::IpNet>>,
    options: &ImportOptions,
    out: &mut Imported,
) -> Option<serde_json::Value> {
    let Some(sans) = &tls.validation.subject_alternative_names else {
        out.report.push(Note {
            at: at.to_owned(),
            kind: NoteKind::NotImported,
            text: format!("{what}: no SAN list (App Mesh then checked the service-discovery DNS name, which is not a SPIFFE identity): the servers' identities must be configured by hand"),
        });
        return None;
    };
    let mut ids = Vec::new();
    let mut dns = Vec::new();
    for san in &sans.matcher.exact {
        match super::principal_of_san(options, san) {
            Ok(p) => match p.strip_prefix("dns:") {
                Some(name) => dns.push(name.to_owned()),
                None => ids.push(p),
            },
            Err(e) => out.report.push(Note {
                at: at.to_owned(),
                kind: NoteKind::NotImported,
                text: format!("{what}: SAN {e}"),
            }),
        }
    }
    if ids.is_empty() && dns.is_empty() {
        return None;
    }
    let mut rule = json!({});
    if !ids.is_empty() {
        rule["identities"] = json!(ids);
    }
    if !dns.is_empty() {
        rule["allow_dns_san_servers"] = json!(dns);
    }
    if let Some(c) = cidrs {
        rule["cidrs"] = json!(c.iter().map(ToString::to_string).collect::<Vec<_>>());
    }
    if !tls.ports.is_empty() {
        rule["ports"] = json!(tls.ports);
    }
    let named: Vec<String> = ids
        .iter()
        .cloned()
        .chain(dns.iter().map(|d| format!("DNS SAN {d}")))
        .collect();
    let mut text = format!(
        "{what}: outbound server rule, the server must present one of {} (checked in the handshake)",
        named.join(", ")
    );
    if !tls.enforce {
        text.push_str(
            "; `enforce: false` is not honoured: Rampart always speaks mTLS to meshed destinations",
        );
    }
    out.report.push(Note {
        at: at.to_owned(),
        kind: NoteKind::Mapped,
        text,
    });
    Some(rule)
}
