//! Regression guard for the relay's hot path, in counts rather than times:
//! heap allocations per relayed message, measured with a counting global
//! allocator around a real server on loopback.
//!
//! Times are too noisy to guard in CI on a shared machine; an allocation
//! count is exact and moves only when the code does. The clients here are
//! blocking `std` sockets on their own threads writing pre-encoded frames
//! into reused buffers, so (after the handshake) every allocation counted
//! during the measured window is the server's.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use stats_alloc::{INSTRUMENTED_SYSTEM, StatsAlloc};
use switchboard::{Hub, Limits};

// The workspace forbids `unsafe`, so the counting allocator comes from
// `stats_alloc` (the system allocator with relaxed atomic counters).
#[global_allocator]
static GLOBAL: &StatsAlloc<std::alloc::System> = &INSTRUMENTED_SYSTEM;

fn allocations_so_far() -> u64 {
    let stats = GLOBAL.stats();
    (stats.allocations + stats.reallocations) as u64
}

/// Messages per measured round; large enough that per-round costs (a
/// buffer growing once, a timer registration) vanish in the average.
const MESSAGES: u64 = 20_000;
/// Messages written before the receiver is read, so the server sees
/// batches the way it does under load (several frames per read).
const BATCH: u64 = 50;

fn handshake(addr: SocketAddr, target: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).expect("connect to the test server");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    stream.set_nodelay(true).expect("nodelay");
    let request = format!(
        "GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).expect("send upgrade");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).expect("read upgrade answer");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "upgrade refused: {head}");
    stream
}

/// A masked client text frame (RFC 6455 §5.2) for payloads under 126 bytes.
fn masked_text(payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut frame = vec![0x81, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// Reads `count` unmasked server text frames of exactly `expected` bytes
/// each into a reused buffer.
fn read_frames(stream: &mut TcpStream, count: u64, expected: &[u8], buffer: &mut [u8]) {
    let frame_len = 2 + expected.len();
    for _ in 0..count {
        stream
            .read_exact(&mut buffer[..frame_len])
            .expect("read a relayed frame");
        assert_eq!(buffer[0], 0x81, "a final text frame");
        assert_eq!(usize::from(buffer[1]), expected.len(), "payload length");
        assert_eq!(&buffer[2..frame_len], expected, "payload bytes");
    }
}

/// Relays `rounds` of `MESSAGES` from `/ws?id=1` to `/ws?id=2`, returning
/// the allocations counted per message in the last round (the first ones
/// warm up buffers and the registry).
fn allocations_per_relayed_message(addr: SocketAddr, rounds: u32) -> f64 {
    let mut receiver = handshake(addr, "/ws?id=2");
    let mut sender = handshake(addr, "/ws?id=1");
    let frame = masked_text(br#"{"targets":[2],"payload":{"n":12345}}"#);
    let expected = br#"{"n":12345}"#;
    let mut buffer = vec![0u8; 256];
    // The 101 can reach us before the ID is registered (a send to an ID
    // not yet there is dropped as offline), so probe until one arrives.
    receiver
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("probe timeout");
    let arrived = (0..50).any(|_| {
        sender.write_all(&frame).expect("write a probe");
        receiver
            .read_exact(&mut buffer[..2 + expected.len()])
            .is_ok()
    });
    assert!(arrived, "no probe was relayed from id 1 to id 2 within 5 s");
    // A probe that arrived late is still in flight: wait it out and
    // discard it so the measured rounds read whole frames.
    std::thread::sleep(Duration::from_millis(300));
    receiver.set_nonblocking(true).expect("nonblocking");
    while receiver.read(&mut buffer).is_ok_and(|n| n > 0) {}
    receiver.set_nonblocking(false).expect("blocking");
    receiver
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    let mut batch = Vec::with_capacity(frame.len() * BATCH as usize);
    for _ in 0..BATCH {
        batch.extend_from_slice(&frame);
    }
    let mut per_message = f64::NAN;
    for _ in 0..rounds {
        let before = allocations_so_far();
        for _ in 0..MESSAGES / BATCH {
            sender.write_all(&batch).expect("write a batch");
            read_frames(&mut receiver, BATCH, expected, &mut buffer);
        }
        let counted = allocations_so_far() - before;
        per_message = counted as f64 / MESSAGES as f64;
    }
    per_message
}

#[test]
fn relay_allocations_per_message_stay_bounded() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // The default rate limit (10,000 messages a second) would refuse part
    // of a round; this test counts the relay's work, not the limiter's.
    let hub = Hub::new(Limits {
        max_message_rate: 0,
        ..Limits::default()
    });
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = runtime.spawn(switchboard::serve_with(
        listener,
        switchboard::app(hub.clone()),
        hub,
        async {
            let _ = stopped.await;
        },
        Duration::from_secs(5),
    ));

    let per_message = std::thread::spawn(move || allocations_per_relayed_message(addr, 3))
        .join()
        .expect("client thread");
    let _ = stop.send(());
    let _ = runtime.block_on(server);

    eprintln!("relay: {per_message:.3} allocations per relayed message");
    // Measured: see BOUND's comment. The bound is the measured value plus
    // slack for the tokio scheduler's occasional growth, not a target.
    assert!(
        per_message <= BOUND,
        "the relay now allocates {per_message:.3} times per message (bound {BOUND}); \
         find the new allocation on the hot path (e.g. with a heap profiler) or, if it is \
         deliberate, raise BOUND with the measurement in its comment"
    );
}

/// Allocations per relayed message (allocations + reallocations, server
/// and runtime together): measured 9.240 on 2026-12-03, identical over
/// three runs (2-core VM, 3 rounds of 20,000, 50 frames per write). The
/// count is deterministic for this pattern; the slack covers the tokio
/// scheduler's queues growing at a different moment. Lower it whenever the
/// hot path loses an allocation.
const BOUND: f64 = 9.5;
