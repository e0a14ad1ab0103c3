//! Conformance suite, RFC 6455 framing: the ground of Autobahn|Testsuite
//! sections 1 (framing), 2 (pings and pongs), 3 (reserved bits), 4
//! (opcodes), 5 (fragmentation), 9 (limits, bounded sizes) and 10 (misc),
//! spoken in raw bytes to `/echo`.
//!
//! UTF-8 (section 6) is in `conformance_utf8.rs`, close handling (section 7)
//! in `conformance_close.rs`, compression (12 and 13) in
//! `conformance_deflate.rs`. docs/conformance.md lists every case and the
//! behaviour the server must show.

mod common;
mod raw;

use std::time::Duration;

use common::TestServer;
use raw::*;
use switchboard::Limits;

const FIN: u8 = 0x80;
const RSV1: u8 = 0x40;
const RSV2: u8 = 0x20;
const RSV3: u8 = 0x10;
const CONT: u8 = 0x0;
const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;

/// How long "nothing arrives" is watched for.
const QUIET: Duration = Duration::from_millis(150);

/// Limits with room for the 16 MiB messages of Autobahn section 9.
fn big_limits() -> Limits {
    Limits {
        max_message_size: 16 << 20,
        max_frame_size: 16 << 20,
        ..Limits::default()
    }
}

async fn echo(server: &TestServer) -> RawWs {
    RawWs::connect(server.addr, "/echo").await
}

/// Sends `wire` on a fresh connection and returns the close code the server
/// fails the connection with, after checking that nothing came before the
/// close frame and that TCP was closed after it.
async fn fail_code(server: &TestServer, wire: &[u8]) -> u16 {
    let mut ws = echo(server).await;
    ws.send(wire).await;
    ws.expect_close_frame().await.0
}

/// A payload of `len` bytes: printable ASCII for text (valid UTF-8), every
/// byte value for binary.
fn payload(opcode: u8, len: usize) -> Vec<u8> {
    if opcode == TEXT {
        (0..len).map(|i| b'!' + (i % 94) as u8).collect()
    } else {
        (0..len).map(|i| (i * 7 + i / 256) as u8).collect()
    }
}

/// The length field a server header must use for `len` (RFC 6455 §5.2:
/// the minimal encoding).
fn expected_header(opcode: u8, len: usize) -> Vec<u8> {
    let mut head = vec![FIN | opcode];
    match len {
        n if n < 126 => head.push(n as u8),
        n if n <= 0xFFFF => {
            head.push(126);
            head.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            head.push(127);
            head.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    head
}

/// A message as masked frames of `fragment` payload bytes each.
fn fragments(opcode: u8, message: &[u8], fragment: usize) -> Vec<u8> {
    let pieces: Vec<&[u8]> = if message.is_empty() {
        vec![&[]]
    } else {
        message.chunks(fragment.max(1)).collect()
    };
    let mut wire = Vec::with_capacity(message.len() + pieces.len() * 14);
    for (i, piece) in pieces.iter().enumerate() {
        let op = if i == 0 { opcode } else { CONT };
        let fin = if i + 1 == pieces.len() { FIN } else { 0 };
        wire.extend(masked(fin | op, piece));
    }
    wire
}

// ---------------------------------------------------------------------------
// 1. Framing
// ---------------------------------------------------------------------------

/// Autobahn 1.1.1-1.1.7 and 1.2.1-1.2.7: every payload length around the
/// 7-, 16- and 64-bit length encodings, text and binary, echoed exactly,
/// with the minimal length encoding in the server's header.
#[tokio::test]
async fn payload_lengths_around_each_length_encoding_are_echoed() {
    let server = TestServer::start().await;
    let mut ws = echo(&server).await;
    for opcode in [TEXT, BINARY] {
        for len in [0, 1, 125, 126, 127, 128, 1000, 65_535, 65_536] {
            let message = payload(opcode, len);
            ws.send(&masked(FIN | opcode, &message)).await;
            let (frame, header) = ws.read_frame_and_header().await;
            assert_eq!(
                header,
                expected_header(opcode, len),
                "{len} bytes: minimal length encoding"
            );
            assert_eq!((frame.fin, frame.rsv, frame.masked), (true, 0, false));
            assert!(frame.payload == message, "{len}-byte payload differs");
        }
    }
    ws.close_normally().await;
}

/// Autobahn 9.1.x / 9.2.x (bounded): large single-frame messages up to
/// 16 MiB, the configured limit.
#[tokio::test]
async fn large_messages_up_to_16_mib_are_echoed() {
    let server = TestServer::with_limits(big_limits()).await;
    let mut ws = echo(&server).await;
    for (opcode, len) in [
        (BINARY, 1 << 18),
        (TEXT, 1 << 20),
        (BINARY, 4 << 20),
        (TEXT, 16 << 20),
        (BINARY, 16 << 20),
    ] {
        let message = payload(opcode, len);
        ws.send(&masked(FIN | opcode, &message)).await;
        ws.expect_frame(opcode, &message).await;
    }
    ws.close_normally().await;
}

/// Frames delivered one byte at a time (the 7-, 16- and 64-bit headers cut
/// everywhere), and Autobahn 1.1.8 / 1.2.8: 65,536 bytes in 997-byte chops.
#[tokio::test]
async fn frames_delivered_in_small_chunks_are_echoed() {
    let server = TestServer::with_limits(big_limits()).await;
    let mut ws = echo(&server).await;
    // A small frame, one byte per write.
    let small = payload(TEXT, 125);
    ws.send_in_chunks(&masked(FIN | TEXT, &small), 1, Duration::from_millis(1))
        .await;
    ws.expect_frame(TEXT, &small).await;
    // 16- and 64-bit headers byte by byte, then the payload at once.
    for len in [200, 70_000] {
        let message = payload(BINARY, len);
        let wire = masked(FIN | BINARY, &message);
        let header_len = if len <= 0xFFFF { 8 } else { 14 };
        ws.send_in_chunks(&wire[..header_len], 1, Duration::from_millis(1))
            .await;
        ws.send(&wire[header_len..]).await;
        ws.expect_frame(BINARY, &message).await;
    }
    // 997-byte chops of a large frame.
    for (opcode, len) in [(TEXT, 65_536), (BINARY, 65_536), (BINARY, 1 << 20)] {
        let message = payload(opcode, len);
        ws.send_in_chunks(&masked(FIN | opcode, &message), 997, Duration::ZERO)
            .await;
        ws.expect_frame(opcode, &message).await;
    }
    ws.close_normally().await;
}

/// Every mask is applied from the first payload byte; a zero mask is valid.
#[tokio::test]
async fn any_mask_key_is_accepted() {
    let server = TestServer::start().await;
    let mut ws = echo(&server).await;
    let message = payload(BINARY, 1031);
    for mask in [[0, 0, 0, 0], [0xFF; 4], [1, 2, 3, 4], [0x80, 0, 0x7F, 0xAA]] {
        ws.send(&frame(FIN | BINARY, Some(mask), &message)).await;
        ws.expect_frame(BINARY, &message).await;
    }
    ws.close_normally().await;
}

// ---------------------------------------------------------------------------
// 2. Pings and pongs
// ---------------------------------------------------------------------------

/// Autobahn 2.1-2.4 and 2.6: a ping is answered by a pong with the same
/// payload (0 to 125 bytes, text or binary, delivered whole or byte by
/// byte).
#[tokio::test]
async fn a_ping_gets_a_pong_with_the_identical_payload() {
    let server = TestServer::start().await;
    let mut ws = echo(&server).await;
    let binary: Vec<u8> = (0..125u8).map(|b| b.wrapping_mul(37)).collect();
    for payload in [
        &b""[..],
        b"Hello, world!",
        &[0x00, 0xFF, 0xFE, 0x80],
        &binary,
    ] {
        ws.send(&masked(FIN | PING, payload)).await;
        ws.expect_frame(PONG, payload).await;
    }
    ws.send_in_chunks(&masked(FIN | PING, &binary), 1, Duration::from_millis(1))
        .await;
    ws.expect_frame(PONG, &binary).await;
    ws.close_normally().await;
}

/// Autobahn 2.5: a control frame of more than 125 bytes is a protocol error.
#[tokio::test]
async fn a_ping_of_126_bytes_is_closed_with_1002() {
    let server = TestServer::start().await;
    assert_eq!(
        fail_code(&server, &masked(FIN | PING, &[b'p'; 126])).await,
        1002
    );
    // The same with the length's 16-bit form announcing 126..=65535 bytes.
    assert_eq!(
        fail_code(&server, &masked(FIN | PING, &[b'p'; 1000])).await,
        1002
    );
    // A pong too.
    assert_eq!(
        fail_code(&server, &masked(FIN | PONG, &[b'p'; 126])).await,
        1002
    );
}

/// Autobahn 2.7-2.9: unsolicited pongs are ignored; the connection goes on.
#[tokio::test]
async fn an_unsolicited_pong_is_ignored() {
    let server = TestServer::start().await;
    let mut ws = echo(&server).await;
    ws.send(&masked(FIN | PONG, b"")).await;
    ws.send(&masked(FIN | PONG, b"unsolicited pong payload"))
        .await;
    ws.expect_silence(QUIET).await;
    ws.send(&masked(FIN | PONG, b"unsolicited")).await;
    ws.send(&masked(FIN | PING, b"solicited")).await;
    ws.expect_frame(PONG, b"solicited").await;
    ws.send(&masked(FIN | TEXT, b"still echoing")).await;
    ws.expect_frame(TEXT, b"still echoing").await;
    ws.close_normally().await;
}

/// Autobahn 2.10 and 2.11: ten pings in a row (in one write, then in
/// chops) get ten pongs, in order.
#[tokio::test]
async fn ten_pings_get_ten_pongs_in_order() {
    let server = TestServer::start().await;
    let mut ws = echo(&server).await;
    for chop in [usize::MAX, 1, 7] {
        let mut wire = Vec::new();
        for i in 0..10 {
            wire.extend(masked(FIN | PING, format!("payload-{i}").as_bytes()));
        }
        ws.send_in_chunks(&wire, chop, Duration::ZERO).await;
        for i in 0..10 {
            ws.expect_frame(PONG, format!("payload-{i}").as_bytes())
                .await;
        }
    }
    ws.close_normally().await;
}

/// Replies keep the order of the requests: echo, pong, echo.
#[tokio::test]
async fn pongs_and_echoes_keep_their_order() {
    let server = TestServer::start().await;
    let mut ws = echo(&server).await;
    let mut wire = masked(FIN | TEXT, b"one");
    wire.extend(masked(FIN | PING, b"two"));
    wire.extend(masked(FIN | BINARY, b"three"));
    ws.send(&wire).await;
    ws.expect_frame(TEXT, b"one").await;
    ws.expect_frame(PONG, b"two").await;
    ws.expect_frame(BINARY, b"three").await;
    ws.close_normally().await;
}

/// Autobahn 5.1 and 5.2: control frames must not be fragmented.
#[tokio::test]
async fn a_fragmented_ping_or_pong_is_closed_with_1002() {
    let server = TestServer::start().await;
    for opcode in [PING, PONG] {
        let mut wire = masked(opcode, b"fragment1");
        wire.extend(masked(FIN | CONT, b"fragment2"));
        assert_eq!(fail_code(&server, &wire).await, 1002, "opcode {opcode:#x}");
        // The first frame alone is enough.
        assert_eq!(
            fail_code(&server, &masked(opcode, b"")).await,
            1002,
            "opcode {opcode:#x}"
        );
    }
}

// ---------------------------------------------------------------------------
// 3. Reserved bits
// ---------------------------------------------------------------------------

/// Autobahn 3.1-3.7: a frame with RSV1, RSV2 or RSV3 set (no extension
/// agreed) fails the connection with 1002. A message before it is echoed;
/// nothing sent after it is answered.
#[tokio::test]
async fn reserved_bits_without_an_extension_are_closed_with_1002() {
    let server = TestServer::start().await;
    for rsv in [
        RSV1,
        RSV2,
        RSV3,
        RSV1 | RSV2,
        RSV1 | RSV3,
        RSV2 | RSV3,
        RSV1 | RSV2 | RSV3,
    ] {
        for (opcode, body) in [
            (TEXT, b"Hello, world!".to_vec()),
            (BINARY, vec![0u8, 0xFF, 0x10]),
            (PING, b"ping".to_vec()),
            (PONG, Vec::new()),
            (CLOSE, close_payload(1000, "")),
        ] {
            let mut ws = echo(&server).await;
            let mut wire = masked(FIN | TEXT, b"before");
            wire.extend(masked(FIN | rsv | opcode, &body));
            wire.extend(masked(FIN | TEXT, b"after"));
            wire.extend(masked(FIN | PING, b"after"));
            ws.send(&wire).await;
            ws.expect_frame(TEXT, b"before").await;
            let (code, reason) = ws.expect_close_frame().await;
            assert_eq!(code, 1002, "rsv {rsv:#x}, opcode {opcode:#x}: {reason}");
        }
    }
}

/// Autobahn 3.3 / 3.4: the same with the bytes sent frame by frame and
/// octet by octet.
#[tokio::test]
async fn reserved_bits_are_refused_however_the_bytes_arrive() {
    let server = TestServer::start().await;
    for chop in [1, 3] {
        let mut ws = echo(&server).await;
        let mut wire = masked(FIN | TEXT, b"before");
        wire.extend(masked(FIN | RSV1 | RSV2 | TEXT, b"bad"));
        wire.extend(masked(FIN | PING, b""));
        ws.send_in_chunks(&wire, chop, Duration::ZERO).await;
        ws.expect_frame(TEXT, b"before").await;
        assert_eq!(ws.expect_close_frame().await.0, 1002, "chops of {chop}");
    }
}

// ---------------------------------------------------------------------------
// 4. Opcodes
// ---------------------------------------------------------------------------

/// Autobahn 4.1.1-4.2.5: reserved data opcodes 3-7 and control opcodes
/// 0xB-0xF, with and without payload, after a valid message, fail the
/// connection with 1002; the message before is echoed, the ping after is not
/// answered.
#[tokio::test]
async fn reserved_opcodes_are_closed_with_1002() {
    let server = TestServer::start().await;
    for opcode in (0x3..=0x7).chain(0xB..=0xF) {
        for body in [&b""[..], b"reserved opcode payload"] {
            // Alone.
            assert_eq!(
                fail_code(&server, &masked(FIN | opcode, body)).await,
                1002,
                "opcode {opcode:#x}"
            );
            // After a valid echo, followed by a ping.
            let mut ws = echo(&server).await;
            let mut wire = masked(FIN | TEXT, b"valid");
            wire.extend(masked(FIN | opcode, body));
            wire.extend(masked(FIN | PING, b"never answered"));
            ws.send(&wire).await;
            ws.expect_frame(TEXT, b"valid").await;
            assert_eq!(ws.expect_close_frame().await.0, 1002, "opcode {opcode:#x}");
        }
    }
    // Without FIN, too (a reserved opcode cannot start a fragmented message).
    assert_eq!(fail_code(&server, &masked(0x3, b"x")).await, 1002);
}

// ---------------------------------------------------------------------------
// 5. Fragmentation
// ---------------------------------------------------------------------------

/// Autobahn 5.3-5.5 and 5.6: text and binary in 2 and in many fragments,
/// 1-byte fragments, empty fragments; echoed as one message.
#[tokio::test]
async fn fragmented_messages_are_echoed_whole() {
    let server = TestServer::start().await;
    let mut ws = echo(&server).await;
    for opcode in [TEXT, BINARY] {
        let message = payload(opcode, 1000);
        for fragment in [500, 100, 7, 1] {
            ws.send(&fragments(opcode, &message, fragment)).await;
            ws.expect_frame(opcode, &message).await;
        }
    }
    // Empty fragments anywhere: first, middle, last.
    let mut wire = masked(TEXT, b"");
    wire.extend(masked(CONT, b"frag"));
    wire.extend(masked(CONT, b""));
    wire.extend(masked(CONT, b"ments"));
    wire.extend(masked(FIN | CONT, b""));
    ws.send(&wire).await;
    ws.expect_frame(TEXT, b"fragments").await;
    // An empty message in two empty fragments.
    let mut wire = masked(BINARY, b"");
    wire.extend(masked(FIN | CONT, b""));
    ws.send(&wire).await;
    ws.expect_frame(BINARY, b"").await;
    // Two fragments of one byte, in octet-wise and frame-wise chops
    // (Autobahn 5.4, 5.5).
    let two = fragments(TEXT, b"ab", 1);
    ws.send_in_chunks(&two, 1, Duration::from_millis(1)).await;
    ws.expect_frame(TEXT, b"ab").await;
    ws.send(&two[..7]).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    ws.send(&two[7..]).await;
    ws.expect_frame(TEXT, b"ab").await;
    ws.close_normally().await;
}

/// Autobahn 5.6-5.8 and 5.19-5.20: pings and pongs between fragments are
/// handled at once (the pong comes before the echo), with and without
/// payload, with pauses between the frames.
#[tokio::test]
async fn control_frames_between_fragments_are_answered_first() {
    let server = TestServer::start().await;
    let mut ws = echo(&server).await;
    // A ping with payload between two fragments.
    let mut wire = masked(TEXT, b"fragment1");
    wire.extend(masked(FIN | PING, b"ping payload"));
    wire.extend(masked(FIN | CONT, b"fragment2"));
    ws.send(&wire).await;
    ws.expect_frame(PONG, b"ping payload").await;
    ws.expect_frame(TEXT, b"fragment1fragment2").await;
    // A pong between fragments is ignored.
    let mut wire = masked(BINARY, b"frag1");
    wire.extend(masked(FIN | PONG, b"pong payload"));
    wire.extend(masked(FIN | CONT, b"frag2"));
    ws.send(&wire).await;
    ws.expect_frame(BINARY, b"frag1frag2").await;
    // Autobahn 5.19: two fragments, a ping, a pause, two fragments, a ping,
    // the final fragment. The first pong arrives before the message ends.
    ws.send(&masked(TEXT, b"fragment1")).await;
    ws.send(&masked(CONT, b"fragment2")).await;
    ws.send(&masked(FIN | PING, b"pongme 1!")).await;
    ws.expect_frame(PONG, b"pongme 1!").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    ws.send(&masked(CONT, b"fragment3")).await;
    ws.send(&masked(CONT, b"fragment4")).await;
    ws.send(&masked(FIN | PING, b"pongme 2!")).await;
    ws.expect_frame(PONG, b"pongme 2!").await;
    ws.send(&masked(FIN | CONT, b"fragment5")).await;
    ws.expect_frame(TEXT, b"fragment1fragment2fragment3fragment4fragment5")
        .await;
    // Everything byte by byte (Autobahn 5.20).
    let mut wire = masked(TEXT, b"frag");
    wire.extend(masked(FIN | PING, b"p"));
    wire.extend(masked(CONT, b"men"));
    wire.extend(masked(FIN | PONG, b"q"));
    wire.extend(masked(FIN | CONT, b"ts"));
    ws.send_in_chunks(&wire, 1, Duration::ZERO).await;
    ws.expect_frame(PONG, b"p").await;
    ws.expect_frame(TEXT, b"fragments").await;
    ws.close_normally().await;
}

/// Autobahn 5.9-5.14: a continuation frame with nothing to continue, final
/// or not, with payload or without, in one write or in chops, fails the
/// connection with 1002.
#[tokio::test]
async fn a_continuation_without_a_start_is_closed_with_1002() {
    let server = TestServer::start().await;
    for fin in [FIN, 0] {
        for chop in [usize::MAX, 1] {
            let mut wire = masked(fin | CONT, b"non-continuation payload");
            wire.extend(masked(FIN | TEXT, b"Hello, world!"));
            let mut ws = echo(&server).await;
            ws.send_in_chunks(&wire, chop, Duration::ZERO).await;
            assert_eq!(ws.expect_close_frame().await.0, 1002, "fin {fin:#x}");
        }
    }
}

/// Autobahn 5.15: a complete fragmented message, then an orphan
/// continuation: the message is echoed, then 1002; the text after it is not
/// echoed.
#[tokio::test]
async fn an_orphan_continuation_after_a_complete_message_is_closed_with_1002() {
    let server = TestServer::start().await;
    let mut ws = echo(&server).await;
    let mut wire = masked(TEXT, b"fragment1");
    wire.extend(masked(FIN | CONT, b"fragment2"));
    wire.extend(masked(CONT, b"fragment3"));
    wire.extend(masked(FIN | TEXT, b"fragment4"));
    ws.send(&wire).await;
    ws.expect_frame(TEXT, b"fragment1fragment2").await;
    assert_eq!(ws.expect_close_frame().await.0, 1002);
}

/// Autobahn 5.16 and 5.17: an orphan continuation (final or not) before a
/// fragmented message: 1002 at once, nothing echoed.
#[tokio::test]
async fn an_orphan_continuation_before_a_message_is_closed_with_1002() {
    let server = TestServer::start().await;
    for fin in [0, FIN] {
        let mut wire = Vec::new();
        for _ in 0..2 {
            wire.extend(masked(fin | CONT, b"fragment1"));
            wire.extend(masked(TEXT, b"fragment2"));
            wire.extend(masked(FIN | CONT, b"fragment3"));
        }
        assert_eq!(fail_code(&server, &wire).await, 1002, "fin {fin:#x}");
    }
}

/// Autobahn 5.18: a new data frame while a fragmented message is open
/// fails the connection with 1002 (text after text, binary after text, text
/// after binary, a final text in the middle).
#[tokio::test]
async fn a_new_message_inside_a_fragmented_one_is_closed_with_1002() {
    let server = TestServer::start().await;
    for (first, second) in [
        (TEXT, TEXT),
        (TEXT, FIN | TEXT),
        (TEXT, FIN | BINARY),
        (BINARY, BINARY),
        (BINARY, FIN | TEXT),
    ] {
        let mut wire = masked(first, b"fragment1");
        wire.extend(masked(second, b"fragment2"));
        assert_eq!(
            fail_code(&server, &wire).await,
            1002,
            "{first:#x} then {second:#x}"
        );
    }
}

// ---------------------------------------------------------------------------
// 9. Limits and volume (bounded)
// ---------------------------------------------------------------------------

/// Autobahn 9.7 / 9.8 (bounded): 1,000 small messages in one write all
/// come back, in order.
#[tokio::test]
async fn a_thousand_small_messages_in_one_write_are_echoed_in_order() {
    let server = TestServer::start().await;
    let mut ws = echo(&server).await;
    let mut wire = Vec::new();
    for i in 0..1000 {
        let opcode = if i % 2 == 0 { TEXT } else { BINARY };
        let message = format!("message {i:08}");
        assert_eq!(message.len(), 16);
        wire.extend(masked(FIN | opcode, message.as_bytes()));
    }
    ws.send(&wire).await;
    for i in 0..1000 {
        let opcode = if i % 2 == 0 { TEXT } else { BINARY };
        ws.expect_frame(opcode, format!("message {i:08}").as_bytes())
            .await;
    }
    ws.close_normally().await;
}

/// Autobahn 9.3 / 9.4 (bounded): a 1 MiB message in 4 KiB fragments (and
/// 4 MiB in 64 KiB fragments) comes back as one frame.
#[tokio::test]
async fn large_fragmented_messages_are_echoed_whole() {
    let server = TestServer::with_limits(big_limits()).await;
    let mut ws = echo(&server).await;
    for (opcode, len, fragment) in [
        (TEXT, 1 << 20, 4096),
        (BINARY, 1 << 20, 4096),
        (BINARY, 4 << 20, 64 * 1024),
        (TEXT, 1 << 20, 64),
    ] {
        let message = payload(opcode, len);
        ws.send(&fragments(opcode, &message, fragment)).await;
        ws.expect_frame(opcode, &message).await;
    }
    ws.close_normally().await;
}

/// Over the limits: a frame longer than `max_frame_size` is refused from
/// its header, a message longer than `max_message_size` when its fragments
/// add up to more; both with 1009 (RFC 6455 §7.4.1).
#[tokio::test]
async fn messages_over_the_limits_are_closed_with_1009() {
    let server = TestServer::with_limits(Limits {
        max_message_size: 100_000,
        max_frame_size: 60_000,
        ..Limits::default()
    })
    .await;
    // Only the header of a frame one byte over the limit.
    let mut header = vec![FIN | BINARY, 0x80 | 126];
    header.extend_from_slice(&60_001u16.to_be_bytes());
    header.extend_from_slice(&MASK);
    assert_eq!(fail_code(&server, &header).await, 1009);
    // A 64-bit length far over it.
    let mut header = vec![FIN | TEXT, 0x80 | 127];
    header.extend_from_slice(&(1u64 << 40).to_be_bytes());
    header.extend_from_slice(&MASK);
    assert_eq!(fail_code(&server, &header).await, 1009);
    // Fragments within the frame limit adding up to one byte over the
    // message limit.
    let message = payload(BINARY, 100_001);
    assert_eq!(
        fail_code(&server, &fragments(BINARY, &message, 50_000)).await,
        1009
    );
    // Exactly at the limits is fine.
    let mut ws = echo(&server).await;
    let message = payload(BINARY, 100_000);
    ws.send(&fragments(BINARY, &message, 60_000)).await;
    ws.expect_frame(BINARY, &message).await;
    ws.close_normally().await;
}

// ---------------------------------------------------------------------------
// 10. Miscellaneous
// ---------------------------------------------------------------------------

/// RFC 6455 §5.1: a client frame without the mask bit fails the connection
/// with 1002, whatever its opcode, also after valid frames.
#[tokio::test]
async fn an_unmasked_client_frame_is_closed_with_1002() {
    let server = TestServer::start().await;
    for (opcode, body) in [
        (TEXT, b"not masked".to_vec()),
        (BINARY, vec![1, 2, 3]),
        (PING, Vec::new()),
        (CLOSE, close_payload(1000, "")),
    ] {
        assert_eq!(
            fail_code(&server, &frame(FIN | opcode, None, &body)).await,
            1002,
            "opcode {opcode:#x}"
        );
    }
    // After a valid message, and as a continuation.
    let mut ws = echo(&server).await;
    let mut wire = masked(FIN | TEXT, b"masked");
    wire.extend(masked(TEXT, b"frag"));
    wire.extend(frame(FIN | CONT, None, b"ment"));
    ws.send(&wire).await;
    ws.expect_frame(TEXT, b"masked").await;
    assert_eq!(ws.expect_close_frame().await.0, 1002);
}

/// Autobahn 10.1.1: 65,536 bytes in 1,300-byte fragments.
#[tokio::test]
async fn a_message_auto_fragmented_at_1300_bytes_is_echoed() {
    let server = TestServer::start().await;
    let mut ws = echo(&server).await;
    let message = payload(TEXT, 65_536);
    ws.send(&fragments(TEXT, &message, 1300)).await;
    ws.expect_frame(TEXT, &message).await;
    ws.close_normally().await;
}

/// RFC 6455 §5.2: the payload length uses the minimal encoding and the
/// 64-bit form has its top bit clear; other encodings fail with 1002.
#[tokio::test]
async fn non_minimal_or_oversized_length_encodings_are_closed_with_1002() {
    let server = TestServer::start().await;
    // 5 bytes announced with the 16-bit form.
    let mut wire = vec![FIN | BINARY, 0x80 | 126, 0, 5];
    wire.extend_from_slice(&MASK);
    wire.extend_from_slice(&[1, 2, 3, 4, 5]);
    assert_eq!(fail_code(&server, &wire).await, 1002);
    // 200 bytes announced with the 64-bit form.
    let mut wire = vec![FIN | BINARY, 0x80 | 127];
    wire.extend_from_slice(&200u64.to_be_bytes());
    wire.extend_from_slice(&MASK);
    wire.extend_from_slice(&[0u8; 200]);
    assert_eq!(fail_code(&server, &wire).await, 1002);
    // The most significant bit of the 64-bit length set.
    let mut wire = vec![FIN | BINARY, 0x80 | 127];
    wire.extend_from_slice(&(1u64 << 63 | 10).to_be_bytes());
    wire.extend_from_slice(&MASK);
    assert_eq!(fail_code(&server, &wire).await, 1002);
}
