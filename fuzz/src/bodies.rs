//! The bodies of Rampart's fuzz targets: one plain function per parser,
//! taking arbitrary bytes. Each must never panic, and each checks the
//! parser's own invariants (an assertion failure is a finding).
//!
//! The libFuzzer targets in `fuzz/fuzz_targets/` call these, and so does a
//! normal `cargo test` (`tests/cli/fuzz_seeds.rs` in the root crate, over the
//! committed seeds in `fuzz/seeds/` plus proptest inputs), so the targets
//! cannot rot on the stable toolchain.

use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use rampart_authz::input::{parse_xfcc, xfcc_element};
use rampart_authz::normalize::{Backslash, EscapedSlash, Semicolon};
use rampart_authz::{ConnectionInfo, NormalizeOptions, Options, normalize_path};
use rampart_identity::{SpiffeId, TrustDomain};
use rampart_proxy::detect::{self, MAX_DETECT_BYTES, Protocol, Verdict};
use rampart_proxy::smuggling::SmugglingGuard;
use tokio::io::{AsyncRead, ReadBuf};

/// A target's body.
pub type Body = fn(&[u8]);

/// The targets, by name: the name of the `fuzz/fuzz_targets/` file and of
/// the `fuzz/seeds/` folder.
pub const TARGETS: &[(&str, Body)] = &[
    ("spiffe_id", spiffe_id),
    ("xfcc", xfcc),
    ("normalize_path", normalize),
    ("detect", detect),
    ("smuggling", smuggling),
    ("policy_file", policy_file),
    ("http_detect", http_detect),
    ("admin_inputs", admin_inputs),
];

/// SPIFFE ID and trust domain parsing: a parsed ID is canonical (it prints
/// as it was written and parses back to itself) and splits into its parts.
pub fn spiffe_id(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = SpiffeId::parse(s) {
        assert_eq!(id.as_str(), s, "a parsed ID is printed as written");
        let again = SpiffeId::parse(id.as_str()).expect("an ID's text parses");
        assert_eq!(again, id);
        let td = id.trust_domain();
        assert_eq!(
            SpiffeId::from_parts(td, id.path()).expect("parts rebuild the ID"),
            id
        );
        assert_eq!(id.is_trust_domain_id(), id.path().is_empty());
        assert!(s.starts_with(&td.id_string()));
    }
    if let Ok(td) = TrustDomain::parse(s) {
        let id = SpiffeId::parse(&td.id_string()).expect("a trust domain's ID parses");
        assert!(id.is_trust_domain_id());
    }
}

/// XFCC: the header parser never panics, and the element the inbound
/// sidecar writes reads back field for field whatever the peer's names
/// hold, so a name can never smuggle in a field of its own (`;URI=...`).
pub fn xfcc(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let _ = parse_xfcc(s);
    let names: Vec<String> = s.split('\n').map(str::to_owned).collect();
    let local = SpiffeId::parse("spiffe://example.org/app2").expect("valid ID");
    let conn = ConnectionInfo::new(None, "10.0.0.1".parse().expect("valid IP"), 8080)
        .with_peer_dns(&names);
    let element =
        xfcc_element(&conn, Some(&local), Some("00ff")).expect("a DNS peer is authenticated");
    let parsed = parse_xfcc(&element).unwrap_or_else(|e| panic!("{element:?}: {e}"));
    assert_eq!(parsed.len(), 1, "{element:?} split into several elements");
    // Envoy's default element is `By;Hash;URI`: a peer known only by DNS
    // names has an empty `URI` (as Envoy writes it) and no other field,
    // whatever those names hold.
    let want = vec![
        ("By".to_owned(), local.as_str().to_owned()),
        ("Hash".to_owned(), "00ff".to_owned()),
        ("URI".to_owned(), String::new()),
    ];
    assert_eq!(parsed[0], want, "{element:?}");
}

/// Path normalization: under every option set, a normalized path is
/// absolute, has no empty, `.` or `..` segment, and is a fixed point.
pub fn normalize(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let Ok(raw) = std::str::from_utf8(rest) else {
        return;
    };
    let opts = NormalizeOptions {
        escaped_slash: if flags & 1 == 0 {
            EscapedSlash::Reject
        } else {
            EscapedSlash::Decode
        },
        backslash: if flags & 2 == 0 {
            Backslash::Reject
        } else {
            Backslash::DecodeToSlash
        },
        semicolon: if flags & 4 == 0 {
            Semicolon::Reject
        } else {
            Semicolon::KeepLiteral
        },
    };
    let Ok(n) = normalize_path(raw, &opts) else {
        return;
    };
    let path: &str = &n.path;
    assert!(path.starts_with('/'), "{raw:?} -> {path:?}");
    assert!(
        !path.contains('?') && !path.contains('#'),
        "{raw:?} -> {path:?}"
    );
    if path != "/" {
        for seg in path[1..].split('/') {
            // A trailing slash leaves one empty last segment, nothing else may be empty.
            assert!(seg != "." && seg != "..", "{raw:?} -> {path:?}");
        }
        assert!(!path.contains("//"), "{raw:?} -> {path:?}");
    }
    if opts.backslash == Backslash::Reject {
        assert!(!path.contains('\\'), "{raw:?} -> {path:?}");
    }
    let target = n.path_and_query();
    let again = normalize_path(&target, &opts)
        .unwrap_or_else(|e| panic!("{raw:?} -> {target:?} is refused: {e}"));
    assert_eq!(
        &*again.path, path,
        "normalization is not idempotent for {raw:?}"
    );
    assert_eq!(again.query, n.query);
}

/// Protocol detection: a verdict, once reached, holds for every longer
/// prefix (up to the detection limit), and the limit always decides.
pub fn detect(data: &[u8]) {
    let data = &data[..data.len().min(MAX_DETECT_BYTES)];
    let mut decided: Option<(usize, Protocol)> = None;
    for end in 0..=data.len() {
        match (detect::classify(&data[..end]), decided) {
            (Verdict::Known(p), None) => decided = Some((end, p)),
            (Verdict::Known(p), Some((at, q))) => {
                assert_eq!(p, q, "{end} bytes say {p:?}, {at} bytes said {q:?}")
            }
            (Verdict::NeedMore, None) => {}
            (Verdict::NeedMore, Some((at, q))) => {
                panic!("{end} bytes need more, {at} bytes said {q:?}")
            }
        }
    }
    let mut full = data.to_vec();
    full.resize(MAX_DETECT_BYTES, b'a');
    assert!(
        matches!(detect::classify(&full), Verdict::Known(_)),
        "{MAX_DETECT_BYTES} bytes must decide"
    );
}

/// The HTTP/1 smuggling guard: whatever arrives, it only ever blanks bytes
/// (a `Transfer-Encoding` value beside a `Content-Length`) and never adds,
/// drops or reorders any, and how TCP split the stream does not change what
/// it lets through.
pub fn smuggling(data: &[u8]) {
    let Some((&seed, input)) = data.split_first() else {
        return;
    };
    // Head limit small enough to reach, as in the proxy's configuration.
    let max_head = 256 + usize::from(seed) * 16;
    let whole = run_guard(input, &[usize::MAX], 8192, max_head);
    assert_eq!(
        whole.len(),
        input.len(),
        "the guard changed the stream's length"
    );
    for (i, (a, b)) in input.iter().zip(&whole).enumerate() {
        assert!(a == b || *b == b' ', "byte {i} became {b:#x}, not a blank");
    }
    // The same bytes in small reads and small read buffers. Heads and
    // chunk lines longer than the limits are let through unexamined either
    // way (hyper refuses them), but where they may end depends on the
    // split, so only short streams must come out identical.
    let sizes: Vec<usize> = input
        .iter()
        .take(16)
        .map(|b| 1 + usize::from(*b % 23))
        .collect();
    let sizes = if sizes.is_empty() { vec![1] } else { sizes };
    let split = run_guard(input, &sizes, 1 + usize::from(seed % 61), max_head);
    assert_eq!(split.len(), input.len());
    if input.len() <= max_head.min(4096) {
        assert_eq!(
            split, whole,
            "the read pattern changed what the guard let through"
        );
    }
}

/// Policy files: any text either loads or is refused with an error that
/// names the file; nothing panics.
pub fn policy_file(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let dir = std::env::temp_dir();
    // Module and data file references resolve under a directory that has
    // none of them: they fail to load, they do not read arbitrary files.
    let base = dir.join("rampart-fuzz-no-such-dir");
    if let Err(e) = rampart_authz::Authorizer::from_yaml("fuzz.yaml", s, &base, &Options::default())
    {
        assert!(e.to_string().contains("fuzz.yaml"), "{e}");
    }
}

/// The HTTP-detect boundary (issue 19, F1): bytes that begin with what an
/// HTTP/1 server would take for a request line (after optional empty lines,
/// whatever the method's case or the version's digits) are never opaque,
/// however they continue and wherever the stream stops. An opaque verdict
/// would splice them, forged identity headers and all, to the app.
pub fn http_detect(data: &[u8]) {
    let data = &data[..data.len().min(MAX_DETECT_BYTES)];
    let Some(line_end) = request_line_end(data) else {
        return;
    };
    for end in line_end..=data.len() {
        let prefix = &data[..end];
        assert_ne!(
            detect::settle(prefix),
            Protocol::Opaque,
            "a request line then {:?} settled as opaque",
            String::from_utf8_lossy(&prefix[line_end..])
        );
        assert_ne!(
            detect::classify(prefix),
            Verdict::Known(Protocol::Opaque),
            "a request line classified as opaque"
        );
    }
}

/// Where a request line ends (after its LF) if `data` starts with one, by
/// an independent, deliberately lenient reading: empty lines, a method of
/// ASCII letters in any case, one space, a target without spaces or
/// controls, one space, `HTTP/` digit `.` digit, CRLF or LF.
fn request_line_end(data: &[u8]) -> Option<usize> {
    let mut i = 0;
    while data.get(i..i + 2) == Some(b"\r\n") {
        i += 2;
    }
    let method = data[i..]
        .iter()
        .take_while(|b| b.is_ascii_alphabetic())
        .count();
    if method == 0 || method > 16 {
        return None;
    }
    i += method;
    if data.get(i) != Some(&b' ') {
        return None;
    }
    i += 1;
    let target = data[i..]
        .iter()
        .take_while(|b| b.is_ascii_graphic())
        .count();
    if target == 0 {
        return None;
    }
    i += target;
    let rest = data.get(i..i + 10)?;
    let version_ok = rest.starts_with(b" HTTP/")
        && rest[6].is_ascii_digit()
        && rest[7] == b'.'
        && rest[8].is_ascii_digit();
    if !version_ok {
        return None;
    }
    i += 9;
    match (data.get(i), data.get(i + 1)) {
        (Some(b'\n'), _) => Some(i + 1),
        (Some(b'\r'), Some(b'\n')) => Some(i + 2),
        _ => None,
    }
}

/// The admin API's inputs (issue 19, S1): which paths answer clients outside
/// the pod (exactly the three probes, whatever else the path holds: a
/// query, a dot segment, a trailing slash, a case change is loopback-only),
/// and the app-probe JSON that injection writes, which must parse or be
/// refused without a panic.
pub fn admin_inputs(data: &[u8]) {
    use rampart_proxy::admin::Exposure;
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let probe = matches!(s, "/live" | "/ready" | "/metrics");
    assert_eq!(
        Exposure::of(s) == Exposure::Probe,
        probe,
        "{s:?} is exposed outside the pod"
    );
    let _ = rampart_proxy::probe::AppProbes::parse(s);
}

/// Feeds `input` through a guard in reads of `sizes` (cycled) into read
/// buffers of `buf` bytes; returns what the guard released.
fn run_guard(input: &[u8], sizes: &[usize], buf: usize, max_head: usize) -> Vec<u8> {
    let reader = Chunked {
        data: input,
        sizes,
        n: 0,
    };
    let mut guard = SmugglingGuard::new(reader, max_head);
    let mut cx = Context::from_waker(Waker::noop());
    let mut out = Vec::new();
    let mut storage = vec![0u8; buf];
    loop {
        let mut rb = ReadBuf::new(&mut storage);
        match Pin::new(&mut guard).poll_read(&mut cx, &mut rb) {
            Poll::Ready(Ok(())) if rb.filled().is_empty() => return out,
            Poll::Ready(Ok(())) => out.extend_from_slice(rb.filled()),
            Poll::Ready(Err(e)) => panic!("in-memory reads do not fail: {e}"),
            Poll::Pending => panic!("in-memory reads never wait"),
        }
    }
}

/// An in-memory stream that hands out its bytes in reads of set sizes.
struct Chunked<'a> {
    data: &'a [u8],
    sizes: &'a [usize],
    n: usize,
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let want = self.sizes[self.n % self.sizes.len()];
        self.n += 1;
        let take = want.min(buf.remaining()).min(self.data.len());
        let (now, rest) = self.data.split_at(take);
        buf.put_slice(now);
        self.data = rest;
        Poll::Ready(Ok(()))
    }
}
