//! Regression guard for the message hot path, in counts rather than times:
//! heap allocations per message relayed, echoed and fanned out, measured
//! with a counting global allocator around a real server on loopback
//! (`counted/`: blocking clients writing pre-encoded frames from reused
//! buffers, so every allocation counted in a measured window is the
//! server's).
//!
//! Times are too noisy to guard in CI on a shared machine; an allocation
//! count is exact and moves only when the code does.

mod counted;

use counted::{Server, Workload};
use stats_alloc::{INSTRUMENTED_SYSTEM, StatsAlloc};

// The workspace forbids `unsafe`, so the counting allocator comes from
// `stats_alloc` (the system allocator with relaxed atomic counters).
#[global_allocator]
static GLOBAL: &StatsAlloc<std::alloc::System> = &INSTRUMENTED_SYSTEM;

fn allocations_so_far() -> u64 {
    let stats = GLOBAL.stats();
    (stats.allocations + stats.reallocations) as u64
}

/// Runs `rounds` rounds of `workload` and returns the allocations counted
/// per message in the last one (the first ones warm up buffers and the
/// registry).
fn allocations_per_message(workload: &mut Workload, rounds: u32) -> f64 {
    let messages = workload.messages_per_round();
    let mut per_message = f64::NAN;
    for _ in 0..rounds {
        let before = allocations_so_far();
        workload.round(messages);
        let counted = allocations_so_far() - before;
        per_message = counted as f64 / messages as f64;
    }
    per_message
}

/// Measures `workload` on a fresh server and checks the count against
/// `bound`. The three workloads run as one test, one after the other: the
/// allocator's counters are global, so two measured windows must not
/// overlap.
fn measure(name: &str, connect: fn(std::net::SocketAddr) -> Workload, bound: f64) {
    let server = Server::start();
    let addr = server.addr;
    let per_message = std::thread::spawn(move || {
        let mut workload = connect(addr);
        allocations_per_message(&mut workload, 3)
    })
    .join()
    .expect("client thread");
    drop(server);
    eprintln!("{name}: {per_message:.3} allocations per message");
    assert!(
        per_message <= bound,
        "{name} now allocates {per_message:.3} times per message (bound {bound}); find the new \
         allocation on the hot path (e.g. with a heap profiler: heaptrack on this test) or, if \
         it is deliberate, raise the bound with the measurement in its comment"
    );
}

#[test]
fn hot_path_allocations_per_message_stay_bounded() {
    measure("relay", Workload::relay, RELAY_BOUND);
    measure("echo", Workload::echo, ECHO_BOUND);
    measure("fan-out", Workload::fanout, FANOUT_BOUND);
}

/// Allocations per relayed message (allocations + reallocations, server
/// and runtime together; 3 rounds of 20,000, 50 frames per write), on a
/// 2-core VM:
/// - 9.240 before the immediate path (2026-12-03), identical over three
///   runs: the boxed `on_message` and `Backend::send` futures, the report
///   `Vec`, the `Arc<Envelope>`, two target `Vec`s, an `Arc<str>` per
///   target, the payload copy and its `Bytes` header, and the mailbox's
///   and the writer's queues growing again for every message or two;
/// - 2.240 after (`Handler::on_message_now`, `Backend::immediate`,
///   `TargetName`, `runtime::wakes`): the payload copy, its shared
///   `Bytes` header on the first clone, and the queues, which now grow
///   once per read instead of once per message;
/// - 1.240 with the payload copied into one allocation that holds its
///   reference count too (`protocol::shared_copy`): the `Bytes` header
///   made on the first clone is gone;
/// - 1.140 with the writer's emptied queue buffer kept as a per-thread
///   spare (`runtime::writer`) and the read's last frame taking the whole
///   read buffer instead of splitting it (`runtime::reader`).
///
/// The slack covers the queues growing at a different moment (when the
/// recipient takes its frames in two goes instead of one). Lower it
/// whenever the hot path loses an allocation.
const RELAY_BOUND: f64 = 1.3;

/// Allocations per echoed message, same pattern: 0.140, identical over
/// three runs (7 per batch of 50: the read buffer and its shared header,
/// the writer's queue growing to 50 frames); 2.140 with every message
/// going through the boxed `on_message` future (measured with
/// `on_message_now` disabled). 0.040 with the writer's queue buffer
/// reused from the thread's spare and the read buffer not made shared (2
/// per batch of 50: the read buffer, and once in a while the queue).
const ECHO_BOUND: f64 = 0.1;

/// Allocations per message to 100 receivers (2,000 messages per round):
/// 36.05 to 36.07 over three runs, 0.36 per delivery: the target lists
/// and the duplicate check growing to 100 IDs (about 17), and each
/// receiver's mailbox and writer queues growing once per batch (about
/// 20); 175.8 through `on_message` (an `Arc<str>` per target, a report,
/// the receivers woken, and their queues grown, once per message).
/// 35.06 with the payload's shared copy in one allocation (it was two);
/// 25.05 with the writers' emptied queue buffers reused from the thread's
/// spare; 15.05 with the target lists and the duplicate check sized once
/// from a count of the list's commas.
const FANOUT_BOUND: f64 = 17.0;
