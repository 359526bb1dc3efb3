//! The attribute tests an Istio rule compiles to, each one the Envoy
//! matcher Istio generates for it (pilot's `authz/model` generators and
//! `authz/matcher`), evaluated in-process against what the proxy knows.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::{ConnectionInfo, RequestInfo};

/// Envoy's `StringMatcher` as Istio builds it from a value with `*`.
#[derive(Debug, Clone)]
pub(crate) enum StrMatch {
    /// The whole string.
    Exact(Box<str>),
    /// Starts with.
    Prefix(Box<str>),
    /// Ends with.
    Suffix(Box<str>),
    /// `*`: Istio's regex `.+`, any non-empty string.
    NonEmpty,
    /// An anchored regular expression (namespaces, service accounts, ...).
    Regex(regex::Regex),
}

impl StrMatch {
    /// Istio's `StringMatcherWithPrefix(v, prefix)`: `*` any non-empty
    /// value, `*x` ends with `x` (with a prefix: `prefix.*x`), `x*` starts
    /// with `prefix+x`, otherwise exactly `prefix+v`.
    pub fn istio(v: &str, prefix: &str) -> Result<StrMatch, String> {
        Ok(if v == "*" {
            StrMatch::NonEmpty
        } else if let Some(rest) = v.strip_prefix('*') {
            if prefix.is_empty() {
                StrMatch::Suffix(rest.into())
            } else {
                StrMatch::regex(&format!(
                    "{}.*{}",
                    regex::escape(prefix),
                    regex::escape(rest)
                ))?
            }
        } else if let Some(rest) = v.strip_suffix('*') {
            StrMatch::Prefix(format!("{prefix}{rest}").into())
        } else {
            StrMatch::Exact(format!("{prefix}{v}").into())
        })
    }

    /// An anchored regular expression (Envoy's `safe_regex` matches the
    /// whole value).
    pub fn regex(pattern: &str) -> Result<StrMatch, String> {
        regex::Regex::new(&format!("^(?:{pattern})$"))
            .map(StrMatch::Regex)
            .map_err(|e| format!("bad pattern: {e}"))
    }

    pub fn matches(&self, s: &str) -> bool {
        match self {
            StrMatch::Exact(e) => s == &**e,
            StrMatch::Prefix(p) => s.starts_with(&**p),
            StrMatch::Suffix(x) => s.ends_with(&**x),
            StrMatch::NonEmpty => !s.is_empty(),
            StrMatch::Regex(r) => r.is_match(s),
        }
    }

    /// ASCII case-insensitive comparison (the patterns were lower-cased).
    fn matches_ignore_case(&self, s: &str) -> bool {
        match self {
            StrMatch::Exact(e) => s.eq_ignore_ascii_case(e),
            StrMatch::Prefix(p) => {
                s.len() >= p.len() && s.as_bytes()[..p.len()].eq_ignore_ascii_case(p.as_bytes())
            }
            StrMatch::Suffix(x) => {
                s.len() >= x.len()
                    && s.as_bytes()[s.len() - x.len()..].eq_ignore_ascii_case(x.as_bytes())
            }
            StrMatch::NonEmpty => !s.is_empty(),
            StrMatch::Regex(r) => r.is_match(&s.to_ascii_lowercase()),
        }
    }
}

/// Envoy's `HeaderMatcher` as Istio builds it (`matcher.HeaderMatcher`):
/// `*` is a presence match (an empty value counts), others as [`StrMatch`].
#[derive(Debug, Clone)]
pub(crate) enum HeaderMatch {
    Present,
    Str(StrMatch),
}

impl HeaderMatch {
    pub fn istio(v: &str) -> HeaderMatch {
        if v == "*" {
            return HeaderMatch::Present;
        }
        match StrMatch::istio(v, "") {
            Ok(m) => HeaderMatch::Str(m),
            // Invariant: without a prefix no regex is built.
            Err(_) => unreachable!("a header value pattern needs no regex"),
        }
    }

    fn matches(&self, value: Option<&str>) -> bool {
        match (self, value) {
            (_, None) => false,
            (HeaderMatch::Present, Some(_)) => true,
            (HeaderMatch::Str(m), Some(v)) => m.matches(v),
        }
    }
}

/// An Istio path pattern: a string match, or a template with `{*}` and
/// `{**}` turned into Envoy's `uri_template` (`*` one segment of path
/// characters, `**` any run of them and `/`, the last operator).
#[derive(Debug, Clone)]
pub(crate) struct PathMatch(StrMatch);

/// Envoy's `uri_template` glob for one segment (RFC 3986 pchar, no `*`).
const SEGMENT: &str = "[-._~%!$&'()+,;:@=a-zA-Z0-9]+";
/// Envoy's glob for `**`: the same characters and `/`, possibly none.
const REST: &str = "[-._~%!$&'()+,;:@=/a-zA-Z0-9]*";

impl PathMatch {
    pub fn istio(v: &str) -> Result<PathMatch, String> {
        if !(v.contains("{*}") || v.contains("{**}")) {
            return StrMatch::istio(v, "").map(PathMatch);
        }
        // Istio's CheckValidPathTemplate.
        let mut seen_rest = false;
        let mut pattern = String::new();
        let lead = v.starts_with('/');
        let trail = v.len() > 1 && v.ends_with('/');
        if lead {
            pattern.push('/');
        }
        let globs: Vec<&str> = v.trim_matches('/').split('/').collect();
        for (i, glob) in globs.iter().enumerate() {
            if i > 0 {
                pattern.push('/');
            }
            match *glob {
                "{*}" | "{**}" if seen_rest => {
                    return Err(format!("{v:?}: {{**}} is not the last operator"));
                }
                "{*}" => pattern.push_str(SEGMENT),
                "{**}" => {
                    seen_rest = true;
                    pattern.push_str(REST);
                }
                g if g.contains(['{', '}']) => {
                    return Err(format!(
                        "{v:?}: contains '{{' or '}}' beyond a supported path template"
                    ));
                }
                g if !g.is_empty() && !g.bytes().all(is_pchar) => {
                    return Err(format!("{v:?}: segment {g:?} is not a valid literal"));
                }
                g => pattern.push_str(&regex::escape(g)),
            }
        }
        if trail {
            pattern.push('/');
        }
        StrMatch::regex(&pattern).map(PathMatch)
    }

    fn matches(&self, path: &str) -> bool {
        self.0.matches(path)
    }
}

fn is_pchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~%!$&'()+,;:@=".contains(&b)
}

/// Which address an IP test reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IpAttr {
    /// `ipBlocks`, `source.ip`: the connection's peer address.
    Source,
    /// `remoteIpBlocks`, `remote.ip`: the original client (below).
    Remote,
    /// `destination.ip`.
    Destination,
}

/// One attribute test (one value of one key).
#[derive(Debug, Clone)]
pub(crate) enum Test {
    /// The peer's authenticated name (URI SAN, else DNS SANs), Envoy's
    /// `authenticated.principal_name`: never matches a plaintext peer.
    Principal(StrMatch),
    Ip(IpAttr, IpNet),
    DestPort(u16),
    Sni(StrMatch),
    /// A request header by lower-case name (`:method`, `:authority`,
    /// `:path` and `:scheme` read the request line).
    Header(Box<str>, HeaderMatch),
    Method(HeaderMatch),
    /// Case-insensitive, on the whole `:authority` (port included).
    Host(StrMatch),
    Path(PathMatch),
    /// `request.auth.principal` (`iss/sub`).
    RequestPrincipal {
        iss: StrMatch,
        sub: StrMatch,
    },
    /// A claim of the verified token (`aud`, `azp`, `claims[a][b]`): a
    /// string that matches, or a list with a string element that does.
    Claim(Vec<Box<str>>, StrMatch),
}

impl Test {
    /// Whether Istio calls this attribute "HTTP only" (it cannot be
    /// evaluated on a TCP filter chain).
    pub fn http_only(&self) -> bool {
        match self {
            Test::Principal(_) | Test::Ip(..) | Test::DestPort(_) | Test::Sni(_) => false,
            Test::Header(..)
            | Test::Method(_)
            | Test::Host(_)
            | Test::Path(_)
            | Test::RequestPrincipal { .. }
            | Test::Claim(..) => true,
        }
    }

    fn matches(&self, a: &Attrs<'_>) -> bool {
        match self {
            Test::Principal(m) => principal_names(a.conn).any(|n| m.matches(n)),
            Test::Ip(which, net) => a.ip(*which).is_some_and(|ip| net.contains(&ip)),
            Test::DestPort(p) => a.conn.dest_port == *p,
            Test::Sni(m) => a.conn.sni.is_some_and(|s| m.matches(s)),
            Test::Header(name, m) => match a.req {
                Some(r) => m.matches(header_value(r, name).as_deref()),
                None => false,
            },
            Test::Method(m) => a.req.is_some_and(|r| m.matches(Some(r.method.as_str()))),
            Test::Host(m) => a.req.is_some_and(|r| m.matches_ignore_case(r.authority)),
            Test::Path(m) => a.req.is_some_and(|r| m.matches(r.path)),
            // Envoy's metadata matcher misses when a claim is absent.
            Test::RequestPrincipal { iss, sub } => a.jwt.is_some_and(|j| {
                let claim = |k: &str| j.get(k).and_then(serde_json::Value::as_str);
                match (claim("iss"), claim("sub")) {
                    (Some(i), Some(s)) => iss.matches(i) && sub.matches(s),
                    _ => false,
                }
            }),
            Test::Claim(path, m) => a.jwt.is_some_and(|j| {
                let mut v = j;
                for k in path {
                    match v.get(&**k) {
                        Some(next) => v = next,
                        None => return false,
                    }
                }
                match v {
                    serde_json::Value::String(s) => m.matches(s),
                    serde_json::Value::Array(items) => items
                        .iter()
                        .any(|i| i.as_str().is_some_and(|s| m.matches(s))),
                    _ => false,
                }
            }),
        }
    }
}

/// One key of a rule: any of `values` (when there are some) and none of
/// `not_values`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Cond {
    pub values: Vec<Test>,
    pub not_values: Vec<Test>,
}

impl Cond {
    pub fn http_only(&self) -> bool {
        self.values
            .iter()
            .chain(&self.not_values)
            .any(Test::http_only)
    }

    pub fn matches(&self, a: &Attrs<'_>) -> bool {
        (self.values.is_empty() || self.values.iter().any(|t| t.matches(a)))
            && !self.not_values.iter().any(|t| t.matches(a))
    }
}

/// What a decision reads.
pub(crate) struct Attrs<'a> {
    pub conn: &'a ConnectionInfo<'a>,
    pub req: Option<&'a RequestInfo<'a>>,
    /// The verified JWT payload, when a RequestAuthentication accepted one.
    pub jwt: Option<&'a serde_json::Value>,
}

impl Attrs<'_> {
    fn ip(&self, which: IpAttr) -> Option<IpAddr> {
        match which {
            IpAttr::Source => Some(self.conn.source),
            // An Istio sidecar's inbound HTTP connection manager has
            // `use_remote_address: false` and no trusted hops, so Envoy
            // takes the last X-Forwarded-For address, else the peer's.
            IpAttr::Remote => Some(
                self.req
                    .and_then(|r| last_xff(r.headers))
                    .unwrap_or(self.conn.source),
            ),
            IpAttr::Destination => match self.req {
                Some(r) => Some(r.destination.ip()),
                None => self.conn.dest_ip,
            },
        }
    }
}

/// The names Envoy's `authenticated` principal matcher compares: the URI
/// SAN (the SPIFFE ID), else the DNS SANs; none for plaintext.
fn principal_names<'a>(conn: &'a ConnectionInfo<'a>) -> impl Iterator<Item = &'a str> + 'a {
    let uri = conn.peer.map(|p| p.as_str());
    let dns = match uri {
        Some(_) => None,
        None => Some(conn.peer_dns.iter().map(String::as_str)),
    };
    uri.into_iter().chain(dns.into_iter().flatten())
}

/// A header's values joined with `,`, as Envoy's header matchers see a
/// repeated header; pseudo-headers from the request line.
fn header_value(r: &RequestInfo<'_>, n: &str) -> Option<String> {
    if n.starts_with(':') {
        return match n {
            ":method" => Some(r.method.as_str().to_owned()),
            ":authority" => Some(r.authority.to_owned()),
            ":path" => Some(match r.query {
                Some(q) => format!("{}?{q}", r.path),
                None => r.path.to_owned(),
            }),
            ":scheme" => Some(r.scheme.to_owned()),
            _ => None,
        };
    }
    if n == "host" {
        return Some(r.authority.to_owned());
    }
    let mut values = r.headers.get_all(n).iter().peekable();
    values.peek()?;
    let joined: Vec<&str> = values.map(|v| v.to_str().unwrap_or("")).collect();
    Some(joined.join(","))
}

fn last_xff(headers: &http::HeaderMap) -> Option<IpAddr> {
    let last = headers.get_all("x-forwarded-for").iter().next_back()?;
    let s = last.to_str().ok()?;
    s.rsplit(',').next()?.trim().parse().ok()
}

/// Istio's `AddrStrToCidrRange`: an address is a /32 (or /128) network.
pub(crate) fn parse_cidr(v: &str) -> Result<IpNet, String> {
    if v.contains('/') {
        let net: IpNet = v
            .parse()
            .map_err(|_| format!("{v:?} is not an IP address or CIDR"))?;
        // Envoy matches on the masked network: 10.1.2.3/16 is 10.1.0.0/16.
        return Ok(net.trunc());
    }
    let ip: IpAddr = v
        .parse()
        .map_err(|_| format!("{v:?} is not an IP address or CIDR"))?;
    Ok(IpNet::from(ip))
}
