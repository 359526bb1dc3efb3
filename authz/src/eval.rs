//! Native rule evaluation: does one compiled rule match one connection or
//! request? Allocation-free except for percent-encoded query parameters
//! named in `when` conditions. A mismatch names the field that failed, which
//! is what `explain` reports.

use std::borrow::Cow;

use crate::compile::{CRule, DataTable, MethodSet, PathSet, PrincipalSet, method_bit};
use crate::explain::Miss;
use crate::model::{
    AuthKey, ConditionSubject, DataKey, HostPattern, TemplateSegment, ValueMatcher, split_host_port,
};
use crate::request::grpc_service;
use crate::{ConnectionInfo, RequestInfo};

/// Which side of the decision a rule is on: decides how a rule with HTTP
/// conditions reads a connection that is not HTTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    /// ALLOW and AUDIT: HTTP conditions on a bare connection do not match.
    Admit,
    /// DENY: HTTP conditions on a bare connection are taken as matched, so a
    /// DENY rule can never be bypassed by not speaking HTTP.
    Refuse,
}

impl CRule {
    /// `Ok` when the rule matches.
    pub fn check(
        &self,
        conn: &ConnectionInfo<'_>,
        req: Option<&RequestInfo<'_>>,
        side: Side,
    ) -> Result<(), Miss> {
        if req.is_none() && self.needs_http && side == Side::Admit {
            return Err(Miss::NotHttp);
        }
        self.check_source(conn, side, |t| t.matches(conn, req))?;
        self.check_port(conn)?;
        match req {
            Some(req) => self.check_http(conn, req),
            None => Ok(()),
        }
    }

    /// Whether some request on `conn` could match this ALLOW rule: its
    /// source and port conditions match, and its HTTP conditions are taken
    /// as satisfiable (a `from_data` table keyed by a request attribute:
    /// some entry admits the peer). Never false for a connection one of
    /// whose requests the rule would match (`reach`).
    pub(crate) fn may_match_some_request(&self, conn: &ConnectionInfo<'_>) -> bool {
        self.check_source(conn, Side::Admit, |t| t.may_match(conn))
            .is_ok()
            && self.check_port(conn).is_ok()
    }

    /// Whether this DENY rule matches every request on `conn`: it has no
    /// HTTP condition and its source and port conditions match. Never true
    /// for a connection one of whose requests would escape it (`reach`).
    pub(crate) fn matches_every_request(&self, conn: &ConnectionInfo<'_>) -> bool {
        // A `from_data` table keyed by a request attribute misses here
        // (no request), which reads as "some request may escape".
        !self.needs_http && self.check(conn, None, Side::Refuse).is_ok()
    }

    fn check_port(&self, conn: &ConnectionInfo<'_>) -> Result<(), Miss> {
        if let Some(ports) = &self.ports
            && !ports.contains(&conn.dest_port)
        {
            return Err(Miss::Port);
        }
        if self.not_ports.contains(&conn.dest_port) {
            return Err(Miss::NotPort);
        }
        Ok(())
    }

    /// The `from` conditions; `data` decides a `from_data` table.
    fn check_source(
        &self,
        conn: &ConnectionInfo<'_>,
        side: Side,
        data: impl FnOnce(&DataTable) -> bool,
    ) -> Result<(), Miss> {
        if conn.is_authenticated() {
            // A peer known only by DNS SANs (an ingress admitted by
            // `allow_dns_san_clients`) is not a mesh workload: only a rule
            // that names it (a `dns:` principal) admits it. A rule without
            // principals means any workload, and widening it silently when
            // a port opts in would open the port to every DNS certificate
            // the mesh CA ever issued. DENY rules still apply to it.
            if conn.peer.is_none()
                && side == Side::Admit
                && self.principals.is_none()
                && self.from_data.is_none()
            {
                return Err(Miss::Principal);
            }
            if let Some(set) = &self.principals
                && !set.matches(conn)
            {
                return Err(Miss::Principal);
            }
            if let Some(set) = &self.not_principals
                && set.matches(conn)
            {
                return Err(Miss::NotPrincipal);
            }
            if let Some(table) = &self.from_data
                && !data(table)
            {
                return Err(Miss::PrincipalFromData);
            }
        } else if !self.unauthenticated {
            return Err(Miss::Unauthenticated);
        }
        if let Some(cidrs) = &self.source_cidrs
            && !cidrs.iter().any(|n| n.contains(&conn.source))
        {
            return Err(Miss::SourceCidr);
        }
        if self
            .not_source_cidrs
            .iter()
            .any(|n| n.contains(&conn.source))
        {
            return Err(Miss::NotSourceCidr);
        }
        Ok(())
    }

    fn check_http(&self, conn: &ConnectionInfo<'_>, req: &RequestInfo<'_>) -> Result<(), Miss> {
        if let Some(hosts) = &self.hosts
            && !hosts.iter().any(|h| host_matches(h, req.authority))
        {
            return Err(Miss::Host);
        }
        if self
            .not_hosts
            .iter()
            .any(|h| host_matches(h, req.authority))
        {
            return Err(Miss::NotHost);
        }
        if let Some(m) = &self.methods
            && !m.contains(req.method)
        {
            return Err(Miss::Method);
        }
        if let Some(m) = &self.not_methods
            && m.contains(req.method)
        {
            return Err(Miss::NotMethod);
        }
        if let Some(p) = &self.paths
            && !p.matches(req.path)
        {
            return Err(Miss::Path);
        }
        if let Some(p) = &self.not_paths
            && p.matches(req.path)
        {
            return Err(Miss::NotPath);
        }
        if let Some(services) = &self.grpc_services {
            match req.grpc_method {
                Some(m) if services.contains(grpc_service(m)) => {}
                Some(_) | None => return Err(Miss::GrpcService),
            }
        }
        if let Some(methods) = &self.grpc_methods {
            match req.grpc_method {
                Some(m) if methods.contains(m) => {}
                Some(_) | None => return Err(Miss::GrpcMethod),
            }
        }
        for (i, cond) in self.when.iter().enumerate() {
            let hit = match &cond.subject {
                ConditionSubject::Header(name) => {
                    let values = req.headers.get_all(name).iter().map(|v| v.as_bytes());
                    value_matches(&cond.matcher, values)
                }
                ConditionSubject::Query(name) => {
                    let values = query_values(req.query.unwrap_or(""), name);
                    query_matches(&cond.matcher, values)
                }
                ConditionSubject::Auth(key) => auth_matches(&cond.matcher, key, conn.jwt),
            };
            if hit == cond.invert {
                return Err(Miss::When(i));
            }
        }
        Ok(())
    }
}

impl PrincipalSet {
    /// Whether the authenticated peer matches (its SPIFFE ID or a DNS SAN).
    pub fn matches(&self, conn: &ConnectionInfo<'_>) -> bool {
        // `*` is any SPIFFE workload; a DNS-only peer must be named by a
        // `dns:` pattern.
        if self.any && conn.peer.is_some() {
            return true;
        }
        if let Some(id) = conn.peer {
            let s = id.as_str();
            if self.exact.contains(s)
                || self.trust_domains.contains(id.trust_domain().as_str())
                || self.prefixes.iter().any(|p| s.starts_with(&**p))
            {
                return true;
            }
        }
        for name in conn.peer_dns {
            let name = name.strip_suffix('.').unwrap_or(name);
            if self.dns.contains(name) {
                return true;
            }
            if name.bytes().any(|b| b.is_ascii_uppercase())
                && self.dns.iter().any(|d| d.eq_ignore_ascii_case(name))
            {
                return true;
            }
            if self
                .dns_suffixes
                .iter()
                .any(|suf| name.len() > suf.len() && ends_with_ignore_case(name, suf))
            {
                return true;
            }
        }
        false
    }
}

impl DataTable {
    /// Whether some request could find the peer in the table: the entry
    /// without a key, or any entry when keyed by a request attribute.
    fn may_match(&self, conn: &ConnectionInfo<'_>) -> bool {
        match self.key {
            None => self.table.get("").is_some_and(|set| set.matches(conn)),
            Some(_) => self.table.values().any(|set| set.matches(conn)),
        }
    }

    fn matches(&self, conn: &ConnectionInfo<'_>, req: Option<&RequestInfo<'_>>) -> bool {
        let key = match (self.key, req) {
            (None, _) => "",
            (Some(DataKey::GrpcMethod), Some(r)) => match r.grpc_method {
                Some(m) => m,
                None => return false,
            },
            (Some(DataKey::GrpcService), Some(r)) => match r.grpc_method {
                Some(m) => grpc_service(m),
                None => return false,
            },
            (Some(DataKey::Path), Some(r)) => r.path,
            (Some(DataKey::Method), Some(r)) => r.method.as_str(),
            (Some(_), None) => return false,
        };
        match self.table.get(key) {
            Some(set) => set.matches(conn),
            None => false,
        }
    }
}

impl MethodSet {
    fn contains(&self, m: &http::Method) -> bool {
        match method_bit(m) {
            Some(bit) => self.bits & bit != 0,
            None => self.extension.iter().any(|e| e == m),
        }
    }
}

impl PathSet {
    fn matches(&self, path: &str) -> bool {
        self.any
            || self.exact.contains(path)
            || self
                .exact_ignore_case
                .iter()
                .any(|e| e.eq_ignore_ascii_case(path))
            || self.prefixes.iter().any(|(p, ic)| {
                if *ic {
                    starts_with_ignore_case(path, p)
                } else {
                    path.starts_with(&**p)
                }
            })
            || self
                .templates
                .iter()
                .any(|(t, ic)| template_matches(t, path.strip_prefix('/'), *ic))
            || self.regexes.iter().any(|r| r.is_match(path.as_bytes()))
    }
}

/// Matches template segments against the rest of a path (`None` once every
/// segment is consumed).
fn template_matches(pat: &[TemplateSegment], rest: Option<&str>, ignore_case: bool) -> bool {
    fn next(s: &str) -> (&str, Option<&str>) {
        match s.split_once('/') {
            Some((seg, rest)) => (seg, Some(rest)),
            None => (s, None),
        }
    }
    match (pat.split_first(), rest) {
        (None, None) => true,
        (None, Some(_)) => false,
        (Some((TemplateSegment::Many, tail)), r) => {
            template_matches(tail, r, ignore_case)
                || match r {
                    Some(s) => template_matches(pat, next(s).1, ignore_case),
                    None => false,
                }
        }
        (Some(_), None) => false,
        (Some((TemplateSegment::One, tail)), Some(s)) => {
            let (seg, r) = next(s);
            !seg.is_empty() && template_matches(tail, r, ignore_case)
        }
        (Some((TemplateSegment::Literal(lit), tail)), Some(s)) => {
            let (seg, r) = next(s);
            let same = if ignore_case {
                seg.eq_ignore_ascii_case(lit)
            } else {
                seg == lit
            };
            same && template_matches(tail, r, ignore_case)
        }
    }
}

fn starts_with_ignore_case(s: &str, prefix: &str) -> bool {
    s.len() >= prefix.len() && s.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
}

fn ends_with_ignore_case(s: &str, suffix: &str) -> bool {
    s.len() >= suffix.len()
        && s.as_bytes()[s.len() - suffix.len()..].eq_ignore_ascii_case(suffix.as_bytes())
}

/// Host patterns compare case-insensitively, ignoring a trailing dot; a
/// pattern without a port matches any port, so `host:80` cannot slip past a
/// DENY on `host`.
fn host_matches(p: &HostPattern, authority: &str) -> bool {
    let (host, port) = split_host_port(authority);
    let host = host.strip_suffix('.').unwrap_or(host);
    if let Some(want) = p.port {
        match port.and_then(|s| s.parse::<u16>().ok()) {
            Some(got) if got == want => {}
            Some(_) | None => return false,
        }
    }
    if p.suffix {
        p.name.is_empty() || (host.len() > p.name.len() && ends_with_ignore_case(host, &p.name))
    } else {
        host.eq_ignore_ascii_case(&p.name)
    }
}

fn value_matches<'v>(m: &ValueMatcher, mut values: impl Iterator<Item = &'v [u8]>) -> bool {
    match m {
        ValueMatcher::Present => values.next().is_some(),
        ValueMatcher::Absent => values.next().is_none(),
        ValueMatcher::Exact(s) => values.any(|v| v == s.as_bytes()),
        ValueMatcher::Prefix(s) => values.any(|v| v.starts_with(s.as_bytes())),
        ValueMatcher::Suffix(s) => values.any(|v| v.ends_with(s.as_bytes())),
        ValueMatcher::Regex(r) => values.any(|v| r.regex.is_match(v)),
    }
}

/// A `request.auth` attribute of the verified claims (none without a
/// verified token): strings, or each string of a list, as Istio reads them.
fn auth_matches(m: &ValueMatcher, key: &AuthKey, jwt: Option<&serde_json::Value>) -> bool {
    fn strings(v: Option<&serde_json::Value>) -> impl Iterator<Item = &[u8]> {
        let items: &[serde_json::Value] = match v {
            Some(serde_json::Value::Array(a)) => a,
            Some(other) => std::slice::from_ref(other),
            None => &[],
        };
        items.iter().filter_map(|x| x.as_str()).map(str::as_bytes)
    }
    let Some(claims) = jwt else {
        return value_matches(m, std::iter::empty());
    };
    match key {
        AuthKey::Principal => {
            let part = |k: &str| claims.get(k).and_then(serde_json::Value::as_str);
            match part("iss") {
                Some(iss) => {
                    let p = format!("{iss}/{}", part("sub").unwrap_or(""));
                    value_matches(m, std::iter::once(p.as_bytes()))
                }
                None => value_matches(m, std::iter::empty()),
            }
        }
        AuthKey::Audiences => value_matches(m, strings(claims.get("aud"))),
        AuthKey::Presenter => value_matches(m, strings(claims.get("azp"))),
        AuthKey::Claim(path) => {
            let mut at = Some(claims);
            for k in path {
                at = at.and_then(|v| v.get(k.as_str()));
            }
            value_matches(m, strings(at))
        }
    }
}

fn query_matches<'v>(m: &ValueMatcher, mut values: impl Iterator<Item = Cow<'v, str>>) -> bool {
    match m {
        ValueMatcher::Present => values.next().is_some(),
        ValueMatcher::Absent => values.next().is_none(),
        ValueMatcher::Exact(s) => values.any(|v| v == s.as_str()),
        ValueMatcher::Prefix(s) => values.any(|v| v.starts_with(s.as_str())),
        ValueMatcher::Suffix(s) => values.any(|v| v.ends_with(s.as_str())),
        ValueMatcher::Regex(r) => values.any(|v| r.regex.is_match(v.as_bytes())),
    }
}

/// The decoded values of every query parameter called `name`.
fn query_values<'q>(query: &'q str, name: &'q str) -> impl Iterator<Item = Cow<'q, str>> + 'q {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .filter_map(move |pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode_component(k) == name).then(|| decode_component(v))
        })
}

/// `application/x-www-form-urlencoded` decoding of one component: `+` is a
/// space, `%XX` a byte; invalid UTF-8 is replaced. Borrows when nothing is
/// encoded.
pub(crate) fn decode_component(s: &str) -> Cow<'_, str> {
    if !s.contains(['%', '+']) {
        return Cow::Borrowed(s);
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}
