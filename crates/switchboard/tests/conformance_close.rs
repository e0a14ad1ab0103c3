//! Conformance suite, the closing handshake (RFC 6455 §5.5.1, §7): the
//! ground of Autobahn|Testsuite section 7, spoken in raw bytes to `/echo`.
//!
//! docs/conformance.md ("Close handling") has the rules: which codes are
//! echoed, which fail the connection and with what, and who closes TCP.

mod common;
mod raw;

use std::time::{Duration, Instant};

use common::TestServer;
use raw::*;
use switchboard::{CloseCode, Limits};

const FIN: u8 = 0x80;
const CONT: u8 = 0x0;
const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;

async fn echo(server: &TestServer) -> RawWs {
    RawWs::connect(server.addr, "/echo").await
}

/// The close codes a peer may send (RFC 6455 §7.4.1, §7.4.2 and the IANA
/// registry), as documented by `CloseCode::is_valid_on_wire`: 1000-1003,
/// 1007-1014 and 3000-4999.
fn valid_on_the_wire(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Sends a close frame with `payload` and returns the server's close frame
/// payload, after which TCP must be closed.
async fn close_reply(server: &TestServer, payload: &[u8]) -> Vec<u8> {
    let mut ws = echo(server).await;
    ws.send(&masked(FIN | CLOSE, payload)).await;
    let frame = ws.read_frame().await;
    assert_eq!(
        (frame.fin, frame.rsv, frame.opcode, frame.masked),
        (true, 0, CLOSE, false),
        "a close frame answers a close frame: {frame:?}"
    );
    ws.expect_eof().await;
    frame.payload
}

/// Autobahn 7.3.1: a close frame without a payload is answered with a close
/// frame without a payload (no status to echo), then the server closes TCP.
#[tokio::test]
async fn a_close_without_payload_is_answered_without_payload() {
    let server = TestServer::start().await;
    assert_eq!(close_reply(&server, b"").await, Vec::<u8>::new());
    server
        .eventually("the connection is gone", |hub| hub.live_connections() == 0)
        .await;
}

/// Autobahn 7.1.1, 7.3.3-7.3.5: 1000 with no reason, with a reason, with a
/// 123-byte reason (the most a control frame holds): 1000 comes back. The
/// server echoes the code with an empty reason.
#[tokio::test]
async fn a_close_1000_is_echoed_with_or_without_a_reason() {
    let server = TestServer::start().await;
    let long = "r".repeat(123);
    let multibyte = "κόσμε".repeat(11); // 121 bytes
    for reason in ["", "Hello World!", long.as_str(), multibyte.as_str()] {
        let reply = close_reply(&server, &close_payload(1000, reason)).await;
        assert_eq!(reply, vec![0x03, 0xE8], "reason {reason:?}");
    }
    // 7.1.1: a message, then the close: the echo, then the close.
    let mut ws = echo(&server).await;
    let mut wire = masked(FIN | TEXT, b"Hello World!");
    wire.extend(masked(FIN | CLOSE, &close_payload(1000, "")));
    ws.send(&wire).await;
    ws.expect_frame(TEXT, b"Hello World!").await;
    assert_eq!(ws.expect_close_frame().await.0, 1000);
}

/// Autobahn 7.7.x: every close code a peer may send is echoed as it is.
#[tokio::test]
async fn valid_close_codes_are_echoed() {
    let server = TestServer::start().await;
    let codes = [
        1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999, 4000,
        4001, 4999,
    ];
    for code in codes {
        assert!(valid_on_the_wire(code) && CloseCode(code).is_valid_on_wire());
        let reply = close_reply(&server, &close_payload(code, "reason")).await;
        assert_eq!(reply, code.to_be_bytes().to_vec(), "close code {code}");
    }
}

/// Autobahn 7.9.x and 7.13.x: codes that may not appear on the wire fail
/// the connection with 1002.
#[tokio::test]
async fn invalid_close_codes_are_closed_with_1002() {
    let server = TestServer::start().await;
    let codes = [
        0, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65_535,
    ];
    for code in codes {
        assert!(!valid_on_the_wire(code) && !CloseCode(code).is_valid_on_wire());
        let reply = close_reply(&server, &close_payload(code, "")).await;
        assert_eq!(reply.get(..2), Some(&[0x03, 0xEA][..]), "close code {code}");
    }
}

/// The wire validity documented by `CloseCode::is_valid_on_wire` is the
/// registry's, for every code.
#[test]
fn close_code_validity_matches_the_documented_set() {
    for code in 0..=u16::MAX {
        assert_eq!(
            CloseCode(code).is_valid_on_wire(),
            valid_on_the_wire(code),
            "close code {code}"
        );
    }
}

/// Autobahn 7.3.2: a close payload of one byte (half a code) is a protocol
/// error.
#[tokio::test]
async fn a_close_payload_of_one_byte_is_closed_with_1002() {
    let server = TestServer::start().await;
    for byte in [0x00, 0x03, 0xE8] {
        let reply = close_reply(&server, &[byte]).await;
        assert_eq!(reply.get(..2), Some(&[0x03, 0xEA][..]), "byte {byte:#x}");
    }
}

/// Autobahn 7.3.6: a 124-byte reason makes a 126-byte control frame: 1002.
#[tokio::test]
async fn a_close_reason_over_123_bytes_is_closed_with_1002() {
    let server = TestServer::start().await;
    let reply = close_reply(&server, &close_payload(1000, &"r".repeat(124))).await;
    assert_eq!(reply.get(..2), Some(&[0x03, 0xEA][..]));
}

/// Autobahn 7.5.1: a close reason that is not UTF-8 fails with 1007.
#[tokio::test]
async fn a_close_reason_that_is_not_utf8_is_closed_with_1007() {
    let server = TestServer::start().await;
    for reason in [
        &b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80\x65\x64\x69\x74\x65\x64"[..],
        b"\xff",
        b"cut \xe2\x82",
        b"\xc0\x80",
    ] {
        let mut payload = 1000u16.to_be_bytes().to_vec();
        payload.extend_from_slice(reason);
        let reply = close_reply(&server, &payload).await;
        assert_eq!(reply.get(..2), Some(&[0x03, 0xEF][..]), "{reason:?}");
    }
}

/// Autobahn 7.1.2-7.1.4: after the client's close, nothing it sends is
/// answered — not a second close, not a ping, not a message — whether it
/// comes in the same write or later.
#[tokio::test]
async fn frames_after_the_clients_close_are_ignored() {
    let server = TestServer::start().await;
    for after in [
        masked(FIN | CLOSE, &close_payload(1000, "")),
        masked(FIN | PING, b"ping after close"),
        masked(FIN | TEXT, b"text after close"),
        masked(TEXT, b"fragment after close"),
        // Even a broken frame: no 1002, the close already happened.
        masked(FIN | 0x3, b"reserved opcode after close"),
    ] {
        let mut ws = echo(&server).await;
        let mut wire = masked(FIN | CLOSE, &close_payload(1000, ""));
        wire.extend_from_slice(&after);
        ws.send(&wire).await;
        assert_eq!(ws.expect_close_frame().await.0, 1000, "{after:?}");
    }
    // Sent a moment later, after the server's close is on its way.
    let mut ws = echo(&server).await;
    ws.send(&masked(FIN | CLOSE, &close_payload(1000, "")))
        .await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    // The server may have closed already; the write may fail.
    let _ =
        tokio::io::AsyncWriteExt::write_all(&mut ws.stream, &masked(FIN | TEXT, b"too late")).await;
    assert_eq!(ws.expect_close_frame().await.0, 1000);
}

/// Autobahn 7.1.5: a fragment, the close, the rest of the message: the
/// close is answered, the unfinished message is dropped.
#[tokio::test]
async fn a_close_in_the_middle_of_a_fragmented_message_is_answered() {
    let server = TestServer::start().await;
    let mut ws = echo(&server).await;
    let mut wire = masked(TEXT, b"fragment1");
    wire.extend(masked(FIN | CLOSE, &close_payload(1000, "")));
    wire.extend(masked(FIN | CONT, b"fragment2"));
    ws.send(&wire).await;
    assert_eq!(ws.expect_close_frame().await.0, 1000);
}

/// RFC 6455 §7.1.1: after answering the client's close, the server closes
/// TCP first — the client does not have to.
#[tokio::test]
async fn the_server_closes_tcp_after_the_close_handshake() {
    let server = TestServer::start().await;
    let mut ws = echo(&server).await;
    ws.send(&masked(FIN | TEXT, b"hello")).await;
    ws.expect_frame(TEXT, b"hello").await;
    let started = Instant::now();
    ws.send(&masked(FIN | CLOSE, &close_payload(1000, "")))
        .await;
    assert_eq!(ws.expect_close_frame().await.0, 1000);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "EOF came {:?} after the close",
        started.elapsed()
    );
    server
        .eventually("the connection is gone", |hub| hub.live_connections() == 0)
        .await;
}

/// RFC 6455 §7.1.7: failing the connection (here for a reserved opcode) is
/// a close frame, then closing TCP — the server does not wait for the
/// client's close, even with a long `close_timeout`.
#[tokio::test]
async fn after_a_protocol_error_the_server_closes_tcp_without_waiting() {
    let server = TestServer::with_limits(Limits {
        close_timeout: Duration::from_secs(30),
        ..Limits::default()
    })
    .await;
    let mut ws = echo(&server).await;
    let started = Instant::now();
    ws.send(&masked(FIN | 0x3, b"")).await;
    assert_eq!(ws.expect_close_frame().await.0, 1002);
    assert!(started.elapsed() < Duration::from_secs(2));
}

/// A close the server starts (here: shutdown, 1001) is a handshake: the
/// server waits for the client's close, then closes TCP; a client that
/// never answers is cut off after `close_timeout`.
#[tokio::test]
async fn a_server_initiated_close_waits_for_the_clients_close() {
    for answer in [true, false] {
        let server = TestServer::with_limits(Limits {
            close_timeout: Duration::from_millis(500),
            ..Limits::default()
        })
        .await;
        let mut ws = echo(&server).await;
        ws.send(&masked(FIN | TEXT, b"hi")).await;
        ws.expect_frame(TEXT, b"hi").await;
        let shutdown = tokio::spawn(server.shutdown());
        let frame = ws.read_frame().await;
        assert_eq!(
            frame.close().0,
            1001,
            "server shutdown is 1001 (going away)"
        );
        let started = Instant::now();
        if answer {
            // Pings and messages after the server's close are not answered.
            ws.send(&masked(FIN | PING, b"after the server's close"))
                .await;
            ws.send(&masked(FIN | CLOSE, &close_payload(1001, "")))
                .await;
            ws.expect_eof().await;
            assert!(
                started.elapsed() < Duration::from_millis(400),
                "{:?}",
                started.elapsed()
            );
        } else {
            ws.expect_eof().await;
            assert!(
                started.elapsed() >= Duration::from_millis(300),
                "cut off after close_timeout, not before: {:?}",
                started.elapsed()
            );
        }
        shutdown.await.expect("shutdown task");
    }
}

/// Everything queued before the close — a large echo, then the close
/// frame — reaches the client whole, even when the client sends something
/// after its close (a pong crossing the close, say) that the server no
/// longer reads.
#[tokio::test]
async fn an_echo_queued_before_the_close_is_delivered_whole() {
    let server = TestServer::with_limits(Limits {
        max_message_size: 16 << 20,
        max_frame_size: 16 << 20,
        ..Limits::default()
    })
    .await;
    // A client with a small, fixed receive buffer: most of the echo waits
    // in the server's socket buffer, not in the client's.
    let mut ws = RawWs::connect_with_recv_buffer(server.addr, "/echo", 64 * 1024).await;
    let message: Vec<u8> = (0..8usize << 20)
        .map(|i| (i * 31 + i / 4096) as u8)
        .collect();
    let mut wire = masked(FIN | BINARY, &message);
    wire.extend(masked(FIN | CLOSE, &close_payload(1000, "")));
    ws.send(&wire).await;
    // Not reading yet: the echo fills the socket buffers. A late frame
    // arrives after the server took the close.
    tokio::time::sleep(Duration::from_millis(300)).await;
    ws.send(&masked(FIN | PONG, b"late")).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let echoed = ws
        .try_read_frame(Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("the 8 MiB echo queued before the close was cut: {e}"));
    assert_eq!(
        (echoed.opcode, echoed.payload.len()),
        (BINARY, message.len())
    );
    assert!(echoed.payload == message);
    let close = ws
        .try_read_frame(Duration::from_secs(5))
        .await
        .unwrap_or_else(|e| panic!("the close frame after the echo was lost: {e}"));
    assert_eq!(close.close().0, 1000);
}

/// The same after a protocol error: the client that keeps sending after
/// its bad frame still gets everything queued before it, then the 1002.
#[tokio::test]
async fn a_failure_close_after_a_large_echo_is_delivered() {
    let server = TestServer::with_limits(Limits {
        max_message_size: 16 << 20,
        max_frame_size: 16 << 20,
        ..Limits::default()
    })
    .await;
    let mut ws = RawWs::connect_with_recv_buffer(server.addr, "/echo", 64 * 1024).await;
    let message: Vec<u8> = (0..8usize << 20)
        .map(|i| (i * 17 + i / 999) as u8)
        .collect();
    let mut wire = masked(FIN | BINARY, &message);
    wire.extend(masked(FIN | 0x3, b"reserved opcode"));
    ws.send(&wire).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A client streaming on, unaware yet of the failure.
    ws.send(&masked(FIN | TEXT, b"still sending")).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let echoed = ws
        .try_read_frame(Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("the 8 MiB echo queued before the failure was cut: {e}"));
    assert!(echoed.payload == message);
    let close = ws
        .try_read_frame(Duration::from_secs(5))
        .await
        .unwrap_or_else(|e| panic!("the 1002 close frame was lost: {e}"));
    assert_eq!(close.close().0, 1002);
}
