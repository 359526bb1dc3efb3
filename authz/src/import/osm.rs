//! OSM `policy.openservicemesh.io/v1alpha1` IngressBackend: which sources
//! an ingress may reach a backend from.
//!
//! As OSM's documentation reads it: an `http` backend admits the listed
//! `Service` or `IPRange` sources (plaintext, from their addresses); an
//! `https` backend admits clients whose certificate names an
//! `AuthenticatedPrincipal`, and, when `Service` or `IPRange` sources are
//! listed too, only from those addresses. A `kind: Service` source is
//! resolved with [`ImportOptions::addresses`] (`--address ns/name=CIDR`):
//! OSM read the Service's endpoints from the API server, which the importer
//! does not do.

use serde::Deserialize;
use serde_json::json;

use super::{ImportError, ImportOptions, Imported, Note, NoteKind, Object, Target};

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Spec {
    backends: Vec<Backend>,
    #[serde(default)]
    sources: Vec<SourceRef>,
    #[serde(default)]
    matches: Option<serde_yaml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Backend {
    name: String,
    port: Port,
    #[serde(default)]
    tls: Option<Tls>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Port {
    number: u16,
    protocol: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Tls {
    #[serde(default)]
    skip_client_cert_validation: bool,
    #[serde(default)]
    sni_hosts: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SourceRef {
    kind: String,
    name: String,
    #[serde(default)]
    namespace: Option<String>,
}

pub(crate) fn import(
    objects: &[Object],
    options: &ImportOptions,
    out: &mut Imported,
) -> Result<(), ImportError> {
    for o in objects.iter().filter(|o| o.kind == "IngressBackend") {
        let spec: Spec = o.parse(&o.value.get("spec").cloned().unwrap_or_default())?;
        ingress_backend(o, &spec, options, out);
    }
    Ok(())
}

fn ingress_backend(o: &Object, spec: &Spec, options: &ImportOptions, out: &mut Imported) {
    let note = |out: &mut Imported, kind, text: String| {
        out.report.push(Note {
            at: o.at(),
            kind,
            text,
        })
    };
    if spec.matches.is_some() {
        note(
            out,
            NoteKind::NotImported,
            "`matches` (HTTP routes of an IngressBackend) is not imported, so neither is the IngressBackend: without its routes it would admit more".into(),
        );
        return;
    }
    // Addresses from IPRange and resolved Service sources; principals from
    // AuthenticatedPrincipal sources.
    let mut cidrs: Vec<String> = Vec::new();
    let mut address_sources = 0;
    let mut principals: Vec<String> = Vec::new();
    let mut dns = false;
    for (i, s) in spec.sources.iter().enumerate() {
        let at = format!("{}: spec.sources[{i}]", o.at());
        let mut skip = |text: String| {
            out.report.push(Note {
                at: at.clone(),
                kind: NoteKind::NotImported,
                text,
            })
        };
        match s.kind.as_str() {
            "IPRange" => {
                address_sources += 1;
                match s.name.parse::<ipnet::IpNet>() {
                    Ok(n) => cidrs.push(n.to_string()),
                    Err(_) => match s.name.parse::<std::net::IpAddr>() {
                        Ok(ip) => cidrs.push(ipnet::IpNet::from(ip).to_string()),
                        Err(_) => skip(format!("{:?} is not an IP range", s.name)),
                    },
                }
            }
            "Service" => {
                address_sources += 1;
                let key = format!("{}/{}", s.namespace.as_deref().unwrap_or(o.ns()), s.name);
                match options.addresses.get(&key) {
                    Some(nets) => {
                        cidrs.extend(nets.iter().map(ToString::to_string));
                        out.report.push(Note {
                            at: at.clone(),
                            kind: NoteKind::Mapped,
                            text: format!("Service {key} as the addresses given with --address"),
                        });
                    }
                    None => skip(format!(
                        "Service {key}: the importer does not read the API server; pass its endpoints' addresses with `--address {key}=CIDR[,CIDR...]` (for example from `kubectl get endpointslices -n {} -l kubernetes.io/service-name={}`), or list the ingress pods' range as an IPRange",
                        s.namespace.as_deref().unwrap_or(o.ns()),
                        s.name
                    )),
                }
            }
            "AuthenticatedPrincipal" => match super::principal_of_san(options, &s.name) {
                Ok(p) => {
                    dns |= p.starts_with("dns:");
                    principals.push(p);
                }
                Err(e) => skip(e),
            },
            other => skip(format!("source kind {other:?} is unknown")),
        }
    }
    for b in &spec.backends {
        let at = format!("{}: backend {}", o.at(), b.name);
        let mut rule = serde_json::Map::new();
        let mut port_cfg = json!({"port": b.port.number});
        let mut how;
        match b.port.protocol.as_str() {
            "http" => {
                if cidrs.is_empty() {
                    out.report.push(Note {
                        at,
                        kind: NoteKind::NotImported,
                        text: "an http backend admits Service and IPRange sources only, and none could be imported: it admits nothing".into(),
                    });
                    continue;
                }
                rule.insert(
                    "from".into(),
                    json!({"unauthenticated": true, "source_cidrs": cidrs}),
                );
                port_cfg["mode"] = json!("permissive");
                how = "plaintext from the source addresses (port in permissive mode)".to_owned();
                if !principals.is_empty() {
                    how.push_str("; AuthenticatedPrincipal sources do not apply to http backends (OSM) and are not used");
                }
            }
            "https" => {
                if principals.is_empty() {
                    out.report.push(Note {
                        at,
                        kind: NoteKind::NotImported,
                        text: "an https backend needs an AuthenticatedPrincipal source, and none could be imported: it admits nothing".into(),
                    });
                    continue;
                }
                let mut from = json!({"principals": principals});
                if address_sources > 0 {
                    if cidrs.is_empty() {
                        out.report.push(Note {
                            at,
                            kind: NoteKind::NotImported,
                            text: "its Service/IPRange sources bound the clients' addresses, and none could be imported: it admits nothing".into(),
                        });
                        continue;
                    }
                    from["source_cidrs"] = json!(cidrs);
                }
                rule.insert("from".into(), from);
                port_cfg["mode"] = json!("strict");
                if dns {
                    port_cfg["allow_dns_san_clients"] = json!(true);
                }
                how = "mTLS clients with the AuthenticatedPrincipal names".to_owned();
                if address_sources > 0 {
                    how.push_str(", from the source addresses");
                }
                if dns {
                    how.push_str(" (DNS SANs accepted on this port by --allow-dns-san)");
                }
                if let Some(tls) = &b.tls {
                    if tls.skip_client_cert_validation {
                        how.push_str("; skipClientCertValidation is not honoured: Rampart always validates the client certificate against the trust bundle (narrower)");
                    }
                    if tls.sni_hosts.is_some() {
                        how.push_str("; sniHosts is not checked (the SNI an ingress sends is not an identity)");
                    }
                }
            }
            other => {
                out.report.push(Note {
                    at,
                    kind: NoteKind::NotImported,
                    text: format!("backend protocol {other:?} (OSM ingress speaks http or https)"),
                });
                continue;
            }
        }
        rule.insert(
            "name".into(),
            json!(super::policy_name(&[&o.name, &b.name])),
        );
        rule.insert("to".into(), json!({"ports": [b.port.number]}));
        let name = super::policy_name(&["osm", o.ns(), &o.name, &b.name]);
        let policy =
            json!({"name": name, "action": "ALLOW", "ports": [b.port.number], "rules": [rule]});
        out.report.push(Note {
            at,
            kind: NoteKind::Mapped,
            text: format!(
                "policy {name} (ALLOW) on port {} for the sidecar of Service {}/{}: {how}",
                b.port.number,
                o.ns(),
                b.name
            ),
        });
        let stem = super::policy_name(&[o.ns(), &b.name, "ingress"]);
        let target = match out.targets.iter_mut().position(|t| t.file_stem == stem) {
            Some(i) => &mut out.targets[i],
            None => {
                out.targets.push(Target {
                    workload: format!("Service {}/{}", o.ns(), b.name),
                    file_stem: stem,
                    policies: json!({"policies": []}),
                    config: serde_json::Map::new(),
                });
                let last = out.targets.len() - 1;
                &mut out.targets[last]
            }
        };
        if let Some(list) = target.policies["policies"].as_array_mut() {
            list.push(policy);
        }
        let inbound = target
            .config
            .entry("inbound")
            .or_insert_with(|| json!({"ports": []}));
        if let Some(ports) = inbound["ports"].as_array_mut() {
            merge_port(ports, port_cfg);
        }
    }
}

/// Adds a port entry, or merges it into the entry of the same port: two
/// IngressBackends on one port need what both need (plaintext if either
/// takes it, DNS-SAN clients if either names one).
fn merge_port(ports: &mut Vec<serde_json::Value>, new: serde_json::Value) {
    let Some(old) = ports.iter_mut().find(|p| p["port"] == new["port"]) else {
        ports.push(new);
        return;
    };
    if new["mode"] == "permissive" {
        old["mode"] = json!("permissive");
    }
    if new["allow_dns_san_clients"] == true {
        old["allow_dns_san_clients"] = json!(true);
    }
}
