//! The harness of the count guards (`allocations.rs`, `syscalls.rs`): a
//! real server on loopback in a runtime of its own, and clients on
//! blocking `std` sockets that write pre-encoded frames from reused
//! buffers, so that what is counted during a measured window is the
//! server's work.
//!
//! Three workloads, each in rounds of `MESSAGES` messages written `BATCH`
//! frames at a time, so the server sees batches the way it does under load
//! (several frames per read):
//! - relay: `/ws?id=1` sends `{"targets":[2],…}`, `/ws?id=2` reads;
//! - echo: one `/echo` connection sends and reads its frames back;
//! - fan-out: `/ws?id=1` sends one frame naming `FANOUT` receivers.

#![allow(dead_code, unreachable_pub, missing_docs)] // each test binary uses part of it

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use switchboard::{Hub, Limits};

/// Messages per measured round; large enough that per-round costs (a
/// buffer growing once, a timer registration) vanish in the average.
pub const MESSAGES: u64 = 20_000;
/// Messages written before the answers are read.
pub const BATCH: u64 = 50;
/// Receivers of the fan-out workload.
pub const FANOUT: u64 = 100;
/// The name of the server runtime's worker threads (the system-call guard
/// counts theirs only).
pub const SERVER_THREAD: &str = "sb-server";

/// A switchboard server (`switchboard::app`) on a loopback port, in a
/// two-worker runtime of its own; stopped when dropped.
pub struct Server {
    pub addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Server {
    pub fn start() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(SERVER_THREAD)
            .enable_all()
            .build()
            .expect("runtime");
        // The default rate limit (10,000 messages a second) would refuse
        // part of a round; these tests count the relay's work, not the
        // limiter's.
        let hub = Hub::new(Limits {
            max_message_rate: 0,
            ..Limits::default()
        });
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = runtime.spawn(switchboard::serve_with(
            listener,
            switchboard::app(hub.clone()),
            hub,
            async {
                let _ = stopped.await;
            },
            Duration::from_secs(5),
        ));
        Self {
            addr,
            runtime: Some(runtime),
            stop: Some(stop),
            task: Some(task),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let (Some(runtime), Some(task)) = (self.runtime.take(), self.task.take()) {
            let _ = runtime
                .block_on(async { tokio::time::timeout(Duration::from_secs(10), task).await });
            runtime.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

pub fn handshake(addr: SocketAddr, target: &str) -> TcpStream {
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

/// A masked client text frame (RFC 6455 §5.2), payloads up to 64 KiB.
pub fn masked_text(payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut frame = vec![0x81];
    if payload.len() < 126 {
        frame.push(0x80 | payload.len() as u8);
    } else {
        let len = u16::try_from(payload.len()).expect("a payload under 64 KiB");
        frame.push(0x80 | 126);
        frame.extend_from_slice(&len.to_be_bytes());
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// Reads `count` unmasked server text frames of exactly `expected` bytes
/// (under 126) each into a reused buffer.
pub fn read_frames(stream: &mut TcpStream, count: u64, expected: &[u8], buffer: &mut [u8]) {
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

/// `frame` repeated `BATCH` times, written with one `write_all`.
fn batch_of(frame: &[u8]) -> Vec<u8> {
    let mut batch = Vec::with_capacity(frame.len() * BATCH as usize);
    for _ in 0..BATCH {
        batch.extend_from_slice(frame);
    }
    batch
}

/// Sends `frame` from `sender` until `expected` arrives on every receiver
/// (an ID registers just after its 101, so the first sends may find it
/// offline), then lets late probes arrive and discards them, so that
/// measured rounds read whole frames.
fn probe(sender: &mut TcpStream, receivers: &mut [TcpStream], frame: &[u8], expected: &[u8]) {
    let mut buffer = vec![0u8; 256];
    for receiver in receivers.iter_mut() {
        receiver
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("probe timeout");
    }
    let arrived = (0..50).any(|_| {
        sender.write_all(frame).expect("write a probe");
        receivers.iter_mut().all(|receiver| {
            receiver
                .read_exact(&mut buffer[..2 + expected.len()])
                .is_ok()
        })
    });
    assert!(arrived, "no probe reached every receiver within 5 s");
    std::thread::sleep(Duration::from_millis(300));
    for receiver in receivers.iter_mut() {
        receiver.set_nonblocking(true).expect("nonblocking");
        while receiver.read(&mut buffer).is_ok_and(|n| n > 0) {}
        receiver.set_nonblocking(false).expect("blocking");
        receiver
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
    }
}

/// One of the workloads, connected and warmed up; `round` relays
/// `MESSAGES` messages.
pub enum Workload {
    Relay {
        sender: TcpStream,
        receiver: TcpStream,
        batch: Vec<u8>,
    },
    Echo {
        client: TcpStream,
        batch: Vec<u8>,
    },
    Fanout {
        sender: TcpStream,
        receivers: Vec<TcpStream>,
        batch: Vec<u8>,
    },
}

/// What every workload delivers: `{"n":12345}`.
pub const PAYLOAD: &[u8] = br#"{"n":12345}"#;

impl Workload {
    pub fn relay(addr: SocketAddr) -> Self {
        let mut receiver = handshake(addr, "/ws?id=2");
        let mut sender = handshake(addr, "/ws?id=1");
        let frame = masked_text(br#"{"targets":[2],"payload":{"n":12345}}"#);
        probe(
            &mut sender,
            std::slice::from_mut(&mut receiver),
            &frame,
            PAYLOAD,
        );
        Self::Relay {
            sender,
            receiver,
            batch: batch_of(&frame),
        }
    }

    pub fn echo(addr: SocketAddr) -> Self {
        let client = handshake(addr, "/echo");
        Self::Echo {
            client,
            batch: batch_of(&masked_text(PAYLOAD)),
        }
    }

    /// `/ws?id=1` sends to `/ws?id=100` … `/ws?id=199` in one frame.
    pub fn fanout(addr: SocketAddr) -> Self {
        let ids: Vec<String> = (100..100 + FANOUT).map(|id| id.to_string()).collect();
        let mut receivers: Vec<TcpStream> = ids
            .iter()
            .map(|id| handshake(addr, &format!("/ws?id={id}")))
            .collect();
        let mut sender = handshake(addr, "/ws?id=1");
        let frame = masked_text(
            format!(
                r#"{{"targets":[{}],"payload":{{"n":12345}}}}"#,
                ids.join(",")
            )
            .as_bytes(),
        );
        probe(&mut sender, &mut receivers, &frame, PAYLOAD);
        Self::Fanout {
            sender,
            receivers,
            batch: batch_of(&frame),
        }
    }

    /// Frames the server writes per message sent.
    pub fn deliveries_per_message(&self) -> u64 {
        match self {
            Self::Relay { .. } | Self::Echo { .. } => 1,
            Self::Fanout { .. } => FANOUT,
        }
    }

    /// Messages per round: `MESSAGES`, or a tenth of it for the fan-out,
    /// whose messages cost `FANOUT` deliveries each.
    pub fn messages_per_round(&self) -> u64 {
        match self {
            Self::Relay { .. } | Self::Echo { .. } => MESSAGES,
            Self::Fanout { .. } => MESSAGES / 10,
        }
    }

    /// Sends `messages` (a multiple of `BATCH`) and reads every delivery.
    pub fn round(&mut self, messages: u64) {
        let mut buffer = vec![0u8; 64 * 1024];
        for _ in 0..messages / BATCH {
            match self {
                Self::Relay {
                    sender,
                    receiver,
                    batch,
                } => {
                    sender.write_all(batch).expect("write a batch");
                    read_frames(receiver, BATCH, PAYLOAD, &mut buffer);
                }
                Self::Echo { client, batch } => {
                    client.write_all(batch).expect("write a batch");
                    read_frames(client, BATCH, PAYLOAD, &mut buffer);
                }
                Self::Fanout {
                    sender,
                    receivers,
                    batch,
                } => {
                    sender.write_all(batch).expect("write a batch");
                    for receiver in receivers.iter_mut() {
                        read_frames(receiver, BATCH, PAYLOAD, &mut buffer);
                    }
                }
            }
        }
    }
}
