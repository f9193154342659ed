//! `decide` allocates nothing: a counting global allocator sees zero allocations across
//! thousands of decisions covering every reason code, nor across ext_authz route matches of
//! paths that need no normalising.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
// A counting global allocator is unsafe by nature: it forwards to the system allocator.
#![expect(unsafe_code, reason = "a counting GlobalAlloc must implement an unsafe trait")]

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tollgate_core::engine::{NoUsage, Request, decide};

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: defers every operation to the system allocator unchanged; it only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn decide_never_allocates() {
    let snapshot = common::verified(&common::example_data(), 1);
    let store = tollgate_sidecar::usage::UsageStore::new();
    let requests = [
        Request { account: "acme", feature: "sso", user: Some("alice"), region: Some("eu"), device: Some("laptop-alice"), amount: None },
        Request { account: "acme", feature: "export", user: Some("carol"), ..Request::default() },
        Request { account: "acme", feature: "export", user: Some("dave"), ..Request::default() },
        Request { account: "acme", feature: "export", user: Some("zoe"), ..Request::default() },
        Request { account: "acme", feature: "export", device: Some("phone"), ..Request::default() },
        Request { account: "acme", feature: "ai_assistant", ..Request::default() },
        Request { account: "acme", feature: "api", amount: Some(10), ..Request::default() },
        Request { account: "hooli", feature: "api", amount: Some(5000), ..Request::default() },
        Request { account: "hooli", feature: "sso", ..Request::default() },
        Request { account: "stark", feature: "sms_alerts", region: Some("us"), ..Request::default() },
        Request { account: "globex", feature: "reports", ..Request::default() },
        Request { account: "initech", feature: "reports", ..Request::default() },
        Request { account: "nobody", feature: "reports", ..Request::default() },
        Request { account: "acme", feature: "nope", ..Request::default() },
        Request { account: "umbrella", feature: "uploads", amount: Some(60), ..Request::default() },
    ];
    let now = tollgate_core::period::parse_rfc3339("2026-11-28T12:00:00Z").unwrap();
    let mut reasons = std::collections::HashSet::new();
    // Warm up anything lazily initialised outside the engine.
    for request in &requests {
        reasons.insert(decide(snapshot.data(), request, now, &store).reason);
    }
    COUNTING.store(true, Ordering::SeqCst);
    for _ in 0..1000 {
        for request in &requests {
            std::hint::black_box(decide(snapshot.data(), std::hint::black_box(request), now, &NoUsage));
            std::hint::black_box(decide(snapshot.data(), request, now, &store));
        }
        // ext_authz's route match: normalising a path that needs no change borrows it.
        for path in ["/settings/sso", "/reports/2026/q3?year=2026", "/api/v2/items", "/unrouted"] {
            let normalized = tollgate_sidecar::route_path::normalize(std::hint::black_box(path)).unwrap();
            std::hint::black_box(tollgate_sidecar::protocols::route_feature(snapshot.data(), &normalized));
        }
    }
    COUNTING.store(false, Ordering::SeqCst);
    assert_eq!(ALLOCATIONS.load(Ordering::SeqCst), 0, "decide or the route match allocated");
    assert!(reasons.len() >= 12, "the requests cover the reason codes: {reasons:?}");
}
