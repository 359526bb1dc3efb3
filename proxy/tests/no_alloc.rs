//! The inbound header rules cost no heap allocation per request in the
//! common case: identity headers found by comparing names in place, a
//! `Connection: keep-alive` that names nothing else, trailers without an
//! identity header. Counted with a global allocator, per thread: only the
//! allocations of the thread that runs the steps count, never those the
//! test harness (or another test) makes at the same moment on another
//! thread, however the machine's load interleaves them.

#![allow(
    unsafe_code,
    reason = "a counting global allocator wraps the system one (GlobalAlloc is unsafe)"
)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use rampart_proxy::config::XfccMode;
use rampart_proxy::detect::{Protocol, Verdict, classify};
use rampart_proxy::http::headers::{
    is_identity_header, remove_connection_named, remove_identity_headers, set_xfcc,
    strip_hop_by_hop,
};

struct Counting;

thread_local! {
    // `const`-initialized and without a destructor: reading it never
    // allocates, so the allocator may use it.
    static ALLOCS: Cell<usize> = const { Cell::new(0) };
}

/// Counts one allocation of the current thread (none once its
/// thread-locals are gone, at thread exit).
fn count() {
    let _ = ALLOCS.try_with(|n| n.set(n.get() + 1));
}

fn allocated() -> usize {
    ALLOCS.with(Cell::get)
}

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations(f: impl FnOnce()) -> usize {
    let before = allocated();
    f();
    allocated() - before
}

/// A request head as a client sends it, built before counting.
fn head() -> HeaderMap {
    let mut h = HeaderMap::with_capacity(16);
    for (k, v) in [
        ("host", "backend"),
        ("user-agent", "curl/8"),
        ("accept", "*/*"),
        ("connection", "keep-alive"),
        ("x-forwarded-client-cert", "By=forged"),
        ("x-custom-header-abcdefg", "1"),
    ] {
        h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
    }
    h
}

#[test]
fn the_header_rules_do_not_allocate_per_request() {
    let ours =
        HeaderValue::from_static("By=spiffe://example.org/b;Hash=00;URI=spiffe://example.org/a");
    let name = HeaderName::from_static("x-custom-header-abcdefg");
    for mode in [
        XfccMode::SanitizeSet,
        XfccMode::Sanitize,
        XfccMode::AppendForward,
    ] {
        let mut h = head();
        if mode == XfccMode::AppendForward {
            // Appending ours beside the client's own takes a slot in the
            // map's list of extra values: an allocation the sanitizing
            // modes (the default) never make.
            h.remove("x-forwarded-client-cert");
        }
        let n = [
            allocations(|| remove_connection_named(&mut h)),
            allocations(|| assert!(!is_identity_header(&name))),
            allocations(|| set_xfcc(mode, Some(&ours), &mut h)),
            allocations(|| strip_hop_by_hop(&mut h)),
        ];
        assert_eq!(n, [0; 4], "{mode:?}: allocations per step");
    }
    let mut trailers = HeaderMap::with_capacity(4);
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    let n = allocations(|| remove_identity_headers(&mut trailers, false));
    assert_eq!(n, 0, "trailers: {n} allocations");
    let n = allocations(|| {
        assert_eq!(
            classify(b"GET /data HTTP/1.1\r\nHost: x\r\n\r\n"),
            Verdict::Known(Protocol::Http1)
        );
    });
    assert_eq!(n, 0, "detection: {n} allocations");
}
