//! Explanations: which policy and rule decided, and why every other rule on
//! the port did not match. Used by `rampart policy explain` and the admin
//! API; never on the hot path.

use std::fmt;
use std::sync::Arc;

use crate::{Authorizer, ConnectionInfo, Decision, RequestInfo};

/// The field of a rule that did not match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Miss {
    /// The rule has HTTP conditions and the traffic is not HTTP.
    NotHttp,
    /// `from.principals`.
    Principal,
    /// `from.not_principals`.
    NotPrincipal,
    /// `from.principals_from_data`.
    PrincipalFromData,
    /// No authenticated peer and `from.unauthenticated` is not set.
    Unauthenticated,
    /// `from.source_cidrs`.
    SourceCidr,
    /// `from.not_source_cidrs`.
    NotSourceCidr,
    /// `to.ports`.
    Port,
    /// `to.not_ports`.
    NotPort,
    /// `to.hosts`.
    Host,
    /// `to.not_hosts`.
    NotHost,
    /// `to.methods`.
    Method,
    /// `to.not_methods`.
    NotMethod,
    /// `to.paths`.
    Path,
    /// `to.not_paths`.
    NotPath,
    /// `to.grpc_services`.
    GrpcService,
    /// `to.grpc_methods`.
    GrpcMethod,
    /// `when[i]`.
    When(usize),
}

impl fmt::Display for Miss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Miss::NotHttp => "the rule needs an HTTP request",
            Miss::Principal => "from.principals did not match the peer",
            Miss::NotPrincipal => "from.not_principals matched the peer",
            Miss::PrincipalFromData => "from.principals_from_data did not admit the peer",
            Miss::Unauthenticated => {
                "the peer is not authenticated (from.unauthenticated is false)"
            }
            Miss::SourceCidr => "from.source_cidrs did not contain the source address",
            Miss::NotSourceCidr => "from.not_source_cidrs contained the source address",
            Miss::Port => "to.ports did not contain the port",
            Miss::NotPort => "to.not_ports contained the port",
            Miss::Host => "to.hosts did not match the host",
            Miss::NotHost => "to.not_hosts matched the host",
            Miss::Method => "to.methods did not contain the method",
            Miss::NotMethod => "to.not_methods contained the method",
            Miss::Path => "to.paths did not match the path",
            Miss::NotPath => "to.not_paths matched the path",
            Miss::GrpcService => "to.grpc_services did not match (or not gRPC)",
            Miss::GrpcMethod => "to.grpc_methods did not match (or not gRPC)",
            Miss::When(i) => return write!(f, "when[{i}] did not hold"),
        };
        f.write_str(s)
    }
}

/// What happened to one rule (or Rego policy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It matched (for Rego: allowed).
    Matched,
    /// This field did not match.
    Missed(Miss),
    /// The policy has no rules, so it matches nothing.
    NoRules,
    /// The Rego policy refused.
    RegoDenied,
    /// The Rego policy failed.
    RegoError(String),
}

/// One line of an explanation.
#[derive(Debug, Clone)]
pub struct Step {
    /// The policy.
    pub policy: Arc<str>,
    /// The rule (the query for Rego), `None` for a policy without rules.
    pub rule: Option<Arc<str>>,
    /// What happened.
    pub outcome: Outcome,
}

/// A decision and the trace that led to it (not `Clone`: the decision may
/// hold a permit).
#[derive(Debug)]
pub struct Explanation {
    /// The decision, exactly as `check_request`/`check_connection` returns it.
    pub decision: Decision,
    /// Every rule of every policy on the port: dry-run, AUDIT, DENY, Rego,
    /// then ALLOW policies.
    pub steps: Vec<Step>,
    /// The external authorizer a CUSTOM policy would ask, with the policy
    /// and rule that matched: the sidecar waits for its answer, which
    /// `decision` (made without it) cannot know.
    pub would_ask: Option<crate::RuleRef>,
    /// The provider of `would_ask`.
    pub provider: Option<crate::model::ProviderName>,
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.provider, &self.would_ask) {
            (Some(p), Some(r)) => writeln!(
                f,
                "would ask provider {p} (CUSTOM policy {:?}, rule {:?}); its answer decides, and without it the request is {}",
                r.policy,
                r.rule,
                self.decision.explain()
            )?,
            _ => writeln!(f, "{}", self.decision.explain())?,
        }
        for s in &self.steps {
            let rule = s.rule.as_deref().unwrap_or("-");
            match &s.outcome {
                Outcome::Matched => writeln!(f, "  {} / {}: matched", s.policy, rule)?,
                Outcome::Missed(m) => writeln!(f, "  {} / {}: no match: {m}", s.policy, rule)?,
                Outcome::NoRules => writeln!(f, "  {}: has no rules, matches nothing", s.policy)?,
                Outcome::RegoDenied => writeln!(f, "  {} / {}: Rego refused", s.policy, rule)?,
                Outcome::RegoError(e) => {
                    writeln!(f, "  {} / {}: Rego failed: {e}", s.policy, rule)?
                }
            }
        }
        let notes = match &self.decision {
            Decision::Allow(p) => p.notes(),
            Decision::Deny(d) => &d.notes,
        };
        if let Some(a) = &notes.audit {
            writeln!(f, "  audit: {} / {}", a.policy, a.rule)?;
        }
        if let Some(a) = &notes.dry_run_denied_by {
            writeln!(f, "  dry run would deny: {} / {}", a.policy, a.rule)?;
        }
        Ok(())
    }
}

impl Authorizer {
    /// Decides like [`Authorizer::check_request`] (or `check_connection` when
    /// `req` is `None`) and explains every rule on the port.
    pub fn explain(&self, conn: &ConnectionInfo<'_>, req: Option<&RequestInfo<'_>>) -> Explanation {
        let decision = crate::decide::decide(&self.inner, conn, req);
        let steps = crate::decide::trace(&self.inner, conn, req);
        let consult = match req {
            Some(_) => match crate::decide::evaluate(&self.inner, conn, req) {
                crate::external::Evaluation::Consult(c) => Some(c),
                crate::external::Evaluation::Decided(_) => None,
            },
            None => None,
        };
        Explanation {
            decision,
            steps,
            would_ask: consult.as_ref().map(|c| crate::RuleRef {
                policy: Arc::from(c.policy()),
                rule: Arc::from(c.rule()),
            }),
            provider: consult.map(|c| c.provider().clone()),
        }
    }
}
