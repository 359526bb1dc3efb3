//! The decision procedure, in the order Istio users expect: dry-run and
//! AUDIT policies are noted; DENY rules refuse; Rego policies (Istio's
//! CUSTOM) refuse or pass with header changes; then, when any ALLOW policy
//! covers the port, a request must match one of its rules; when none does,
//! an allowing Rego policy allows; otherwise the default action decides.

use std::sync::Arc;

use crate::compile::{CKind, CNative, CPolicy, Compiled};
use crate::eval::Side;
use crate::explain::Miss;
use crate::external::{Consult, Evaluation};
use crate::rego::RegoOutcome;
use crate::{
    ConnectionInfo, Decision, DefaultAction, Denial, DenyReason, HttpEffects, Notes, Permit,
    RequestInfo, RuleRef,
};

pub(crate) fn decide(
    c: &Compiled,
    conn: &ConnectionInfo<'_>,
    req: Option<&RequestInfo<'_>>,
) -> Decision {
    let idx = c.port(conn.dest_port);
    let mut notes = Notes::default();
    for &i in &idx.dry_run {
        if notes.dry_run_denied_by.is_some() {
            break;
        }
        notes.dry_run_denied_by = dry_run(&c.policies[i as usize], conn, req);
    }
    for &i in &idx.audit {
        let p = &c.policies[i as usize];
        if let Some(rule) = first_match(p, conn, req, Side::Admit) {
            notes.audit = Some(RuleRef {
                policy: p.name.clone(),
                rule,
            });
            break;
        }
    }
    for &i in &idx.deny {
        let p = &c.policies[i as usize];
        if let Some(rule) = first_match(p, conn, req, Side::Refuse) {
            let mut d = Denial::new(DenyReason::DeniedByRule, Some(p.name.clone()));
            d.rule = Some(rule);
            d.notes = notes;
            return Decision::Deny(d);
        }
    }
    let mut rego_permit: Option<(Arc<str>, Arc<str>)> = None;
    let mut effects: Option<Arc<HttpEffects>> = None;
    for &i in &idx.rego {
        let p = &c.policies[i as usize];
        let CKind::Rego(engine) = &p.kind else {
            // Invariant: Compiled::index puts only Rego policies in `rego`.
            unreachable!("non-Rego policy in the Rego index")
        };
        match engine.check(conn, req) {
            RegoOutcome::Allowed(e) => {
                if rego_permit.is_none() {
                    rego_permit = Some((p.name.clone(), engine.query_name()));
                }
                if let Some(e) = e {
                    merge_effects(&mut effects, e);
                }
            }
            outcome @ (RegoOutcome::Denied(_)
            | RegoOutcome::Error(_)
            | RegoOutcome::Timeout
            | RegoOutcome::NotHttp) => {
                let mut d = rego_denial(p, engine.query_name(), outcome);
                d.notes = notes;
                return Decision::Deny(d);
            }
        }
    }
    if let Some(&first) = idx.allow.first() {
        for &i in &idx.allow {
            let p = &c.policies[i as usize];
            if let Some(rule) = first_match(p, conn, req, Side::Admit) {
                return Decision::Allow(Permit {
                    policy: p.name.clone(),
                    rule,
                    effects,
                    notes,
                    consulted: None,
                });
            }
        }
        let reason = if conn.is_authenticated() {
            DenyReason::NotAllowed
        } else {
            DenyReason::Unauthenticated
        };
        let mut d = Denial::new(reason, Some(c.policies[first as usize].name.clone()));
        d.notes = notes;
        return Decision::Deny(d);
    }
    if let Some((policy, rule)) = rego_permit {
        return Decision::Allow(Permit {
            policy,
            rule,
            effects,
            notes,
            consulted: None,
        });
    }
    // A DNS-only peer is not "any authenticated" workload (see `eval`).
    match (c.default, conn.peer.is_some()) {
        (DefaultAction::AllowAnyAuthenticated, true) => Decision::Allow(Permit {
            policy: Arc::from("default"),
            rule: Arc::from("allow_any_authenticated"),
            effects,
            notes,
            consulted: None,
        }),
        (DefaultAction::AllowAnyAuthenticated, false) => {
            let mut d = Denial::new(DenyReason::Unauthenticated, None);
            d.notes = notes;
            Decision::Deny(d)
        }
        (DefaultAction::Deny, _) => {
            let mut d = Denial::new(DenyReason::NoPolicy, None);
            d.notes = notes;
            Decision::Deny(d)
        }
    }
}

/// An in-process decision, turned into a [`Consult`] when it allows and a
/// CUSTOM policy matches. Without a request (an opaque connection), a CUSTOM
/// rule reads HTTP conditions as matched, like a DENY rule, and the
/// connection is refused: ext_authz is only spoken for HTTP.
pub(crate) fn evaluate(
    c: &Compiled,
    conn: &ConnectionInfo<'_>,
    req: Option<&RequestInfo<'_>>,
) -> Evaluation {
    let permit = match decide(c, conn, req) {
        Decision::Allow(p) => p,
        d @ Decision::Deny(_) => return Evaluation::Decided(d),
    };
    let side = match req {
        Some(_) => Side::Admit,
        None => Side::Refuse,
    };
    for &i in &c.port(conn.dest_port).custom {
        let p = &c.policies[i as usize];
        let Some(rule) = first_match(p, conn, req, side) else {
            continue;
        };
        let provider = match &p.kind {
            CKind::Native(n) => n.provider.clone(),
            CKind::Rego(_) => None,
        };
        // Invariant: the model requires `provider` on every CUSTOM policy,
        // and Compiled::index puts only CUSTOM policies in `custom`.
        let Some(provider) = provider else {
            unreachable!("CUSTOM policy without a provider")
        };
        if req.is_none() {
            let mut d = Denial::new(DenyReason::RequiresHttp, Some(p.name.clone()));
            d.rule = Some(rule);
            d.notes = permit.notes;
            return Evaluation::Decided(Decision::Deny(d));
        }
        return Evaluation::Consult(Consult {
            provider,
            policy: p.name.clone(),
            rule,
            permit,
        });
    }
    Evaluation::Decided(Decision::Allow(permit))
}

/// The name of the first matching rule of a native policy.
pub(crate) fn first_match(
    p: &CPolicy,
    conn: &ConnectionInfo<'_>,
    req: Option<&RequestInfo<'_>>,
    side: Side,
) -> Option<Arc<str>> {
    match &p.kind {
        CKind::Native(n) => first_native(n, conn, req, side),
        // Invariant: Compiled::index keeps Rego policies out of the native lists.
        CKind::Rego(_) => unreachable!("Rego policy in a native index"),
    }
}

fn first_native(
    n: &CNative,
    conn: &ConnectionInfo<'_>,
    req: Option<&RequestInfo<'_>>,
    side: Side,
) -> Option<Arc<str>> {
    let indexed: &[u32] = match conn.peer {
        Some(id) => n
            .by_principal
            .get(id.as_str())
            .map(Vec::as_slice)
            .unwrap_or(&[]),
        None => &[],
    };
    // Merge the two ascending candidate lists so the first rule in file order
    // wins, as if every rule had been tried.
    let (mut a, mut b) = (indexed.iter().peekable(), n.other.iter().peekable());
    loop {
        let next = match (a.peek(), b.peek()) {
            (Some(&&x), Some(&&y)) if x < y => a.next(),
            (Some(_), Some(_)) => b.next(),
            (Some(_), None) => a.next(),
            (None, Some(_)) => b.next(),
            (None, None) => return None,
        };
        if let Some(&i) = next {
            let rule = &n.rules[i as usize];
            if rule.check(conn, req, side).is_ok() {
                return Some(rule.name.clone());
            }
        }
    }
}

fn dry_run(
    p: &CPolicy,
    conn: &ConnectionInfo<'_>,
    req: Option<&RequestInfo<'_>>,
) -> Option<RuleRef> {
    let rule = match &p.kind {
        CKind::Native(n) => match n.action {
            crate::model::Action::Deny => first_native(n, conn, req, Side::Refuse)?,
            crate::model::Action::Allow => match first_native(n, conn, req, Side::Admit) {
                Some(_) => return None,
                None => Arc::from("no_rule_matched"),
            },
            // Invariant: the model refuses dry-run CUSTOM policies.
            crate::model::Action::Audit | crate::model::Action::Custom => return None,
        },
        CKind::Rego(engine) => match engine.check(conn, req) {
            RegoOutcome::Allowed(_) => return None,
            RegoOutcome::Denied(_)
            | RegoOutcome::Error(_)
            | RegoOutcome::Timeout
            | RegoOutcome::NotHttp => engine.query_name(),
        },
    };
    Some(RuleRef {
        policy: p.name.clone(),
        rule,
    })
}

fn rego_denial(p: &CPolicy, query: Arc<str>, outcome: RegoOutcome) -> Denial {
    let (reason, response, detail) = match outcome {
        RegoOutcome::Denied(r) => (DenyReason::RegoDenied, Some(r), None),
        RegoOutcome::Error(e) => (DenyReason::RegoError, None, Some(Arc::from(e))),
        RegoOutcome::Timeout => (DenyReason::RegoTimeout, None, None),
        RegoOutcome::NotHttp => (DenyReason::RequiresHttp, None, None),
        // Invariant: the caller only passes refusing outcomes.
        RegoOutcome::Allowed(_) => unreachable!("allowed outcome passed to rego_denial"),
    };
    let mut d = Denial::new(reason, Some(p.name.clone()));
    d.rule = Some(query);
    d.response = response;
    d.detail = detail;
    d
}

pub(crate) fn merge_effects(into: &mut Option<Arc<HttpEffects>>, e: Arc<HttpEffects>) {
    match into {
        None => *into = Some(e),
        Some(existing) => {
            let merged = Arc::make_mut(existing);
            merged.headers.extend(e.headers.iter().cloned());
            merged
                .response_headers_to_add
                .extend(e.response_headers_to_add.iter().cloned());
            merged
                .request_headers_to_remove
                .extend(e.request_headers_to_remove.iter().cloned());
            merged
                .request_headers_to_append
                .extend(e.request_headers_to_append.iter().cloned());
        }
    }
}

/// Why each rule of each policy on the port did or did not match, in
/// evaluation order (for `explain`).
pub(crate) fn trace(
    c: &Compiled,
    conn: &ConnectionInfo<'_>,
    req: Option<&RequestInfo<'_>>,
) -> Vec<crate::explain::Step> {
    use crate::explain::{Outcome, Step};
    let idx = c.port(conn.dest_port);
    let mut steps = Vec::new();
    let groups = [
        &idx.dry_run,
        &idx.audit,
        &idx.deny,
        &idx.rego,
        &idx.allow,
        &idx.custom,
    ];
    for group in groups {
        for &i in group {
            let p = &c.policies[i as usize];
            match &p.kind {
                CKind::Native(n) => {
                    let side = match n.action {
                        crate::model::Action::Deny => Side::Refuse,
                        crate::model::Action::Allow
                        | crate::model::Action::Audit
                        | crate::model::Action::Custom => Side::Admit,
                    };
                    if n.rules.is_empty() {
                        steps.push(Step {
                            policy: p.name.clone(),
                            rule: None,
                            outcome: Outcome::NoRules,
                        });
                    }
                    for rule in &n.rules {
                        let outcome = match rule.check(conn, req, side) {
                            Ok(()) => Outcome::Matched,
                            Err(m) => Outcome::Missed(m),
                        };
                        steps.push(Step {
                            policy: p.name.clone(),
                            rule: Some(rule.name.clone()),
                            outcome,
                        });
                    }
                }
                CKind::Rego(engine) => {
                    let outcome = match engine.check(conn, req) {
                        RegoOutcome::Allowed(_) => Outcome::Matched,
                        RegoOutcome::Denied(_) => Outcome::RegoDenied,
                        RegoOutcome::Error(e) => Outcome::RegoError(e),
                        RegoOutcome::Timeout => Outcome::RegoError("timeout".into()),
                        RegoOutcome::NotHttp => Outcome::Missed(Miss::NotHttp),
                    };
                    steps.push(Step {
                        policy: p.name.clone(),
                        rule: Some(engine.query_name()),
                        outcome,
                    });
                }
            }
        }
    }
    steps
}
