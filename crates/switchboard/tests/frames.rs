//! RFC 6455 framing on `/echo`, byte by byte: a hand-written client sends
//! well-formed and broken frames and checks the server's exact answer —
//! the echoed message, the pong, or the close code — and that TCP is
//! closed after a close frame.

mod common;
mod raw;

use common::*;
use raw::*;
use switchboard::{ErrorKind, Limits};

const FIN: u8 = 0x80;
const RSV1: u8 = 0x40;
const CONT: u8 = 0x0;
const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;

async fn echo_client(server: &TestServer) -> RawWs {
    RawWs::connect(server.addr, "/echo").await
}

/// Sends `bytes` on a fresh `/echo` connection and returns the close code the
/// server answers with (after which TCP must be closed).
async fn close_code_for(server: &TestServer, bytes: &[u8]) -> u16 {
    let mut ws = echo_client(server).await;
    ws.send(bytes).await;
    let (code, _reason) = ws.expect_close().await;
    server
        .eventually("the refused connection is gone", |hub| {
            hub.live_connections() == 0
        })
        .await;
    code
}

/// `Limits` is `#[non_exhaustive]`, so it cannot be built with a struct
/// literal outside its crate: start from the defaults and change fields.
fn limits_with(change: impl FnOnce(&mut Limits)) -> Limits {
    let mut limits = Limits::default();
    change(&mut limits);
    limits
}

#[tokio::test]
async fn a_fragmented_text_message_is_echoed_whole() {
    let server = TestServer::start().await;
    let mut ws = echo_client(&server).await;
    let text = "Hello, wörld ✓ in three fragments";
    let bytes = text.as_bytes();
    // Cut inside the two-byte 'ö' and inside the three-byte '✓': a fragment
    // may end in the middle of a character (RFC 6455 §5.6).
    let cut1 = text.find('ö').expect("ö") + 1;
    let cut2 = text.find('✓').expect("✓") + 2;
    ws.send(&masked(TEXT, &bytes[..cut1])).await;
    ws.send(&masked(CONT, &bytes[cut1..cut2])).await;
    // A control frame may come between fragments (§5.4); it is answered at once.
    ws.send(&masked(FIN | PING, b"between")).await;
    ws.send(&masked(FIN | CONT, &bytes[cut2..])).await;

    let pong = ws.read_frame().await;
    assert_eq!(
        pong,
        ServerFrame {
            fin: true,
            rsv: 0,
            opcode: PONG,
            masked: false,
            payload: b"between".to_vec()
        }
    );
    let echoed = ws.read_frame().await;
    assert_eq!(
        echoed,
        ServerFrame {
            fin: true,
            rsv: 0,
            opcode: TEXT,
            masked: false,
            payload: bytes.to_vec()
        },
        "one unfragmented, unmasked text frame with the whole message"
    );

    // A binary message in one frame comes back as binary.
    ws.send(&masked(FIN | BINARY, &[0, 1, 2, 255])).await;
    let echoed = ws.read_frame().await;
    assert_eq!(
        (echoed.opcode, echoed.payload),
        (BINARY, vec![0, 1, 2, 255])
    );
}

#[tokio::test]
async fn a_ping_is_answered_with_a_pong_carrying_the_same_payload() {
    let server = TestServer::start().await;
    let mut ws = echo_client(&server).await;
    let payload: Vec<u8> = (0u8..125).collect();
    ws.send(&masked(FIN | PING, &payload)).await;
    let pong = ws.read_frame().await;
    assert_eq!((pong.fin, pong.opcode, pong.masked), (true, PONG, false));
    assert_eq!(pong.payload, payload);

    ws.send(&masked(FIN | PING, b"")).await;
    let pong = ws.read_frame().await;
    assert_eq!((pong.opcode, pong.payload), (PONG, Vec::new()));

    // The connection still echoes afterwards.
    ws.send(&masked(FIN | TEXT, b"after pings")).await;
    let echoed = ws.read_frame().await;
    assert_eq!(
        (echoed.opcode, echoed.payload),
        (TEXT, b"after pings".to_vec())
    );
}

#[tokio::test]
async fn a_client_close_1000_is_echoed_and_tcp_is_closed() {
    let server = TestServer::start().await;
    let mut ws = echo_client(&server).await;
    ws.send(&masked(FIN | TEXT, b"before close")).await;
    assert_eq!(ws.read_frame().await.payload, b"before close".to_vec());

    ws.send(&masked(FIN | CLOSE, &close_payload(1000, "bye")))
        .await;
    let (code, _reason) = ws.expect_close().await;
    assert_eq!(code, 1000);
    server
        .eventually("the connection is gone", |hub| hub.live_connections() == 0)
        .await;

    // A close frame without a status gets an empty close frame back.
    let mut ws = echo_client(&server).await;
    ws.send(&masked(FIN | CLOSE, b"")).await;
    let frame = ws.read_frame().await;
    assert_eq!((frame.opcode, frame.payload), (CLOSE, Vec::new()));
    ws.expect_eof().await;
}

#[tokio::test]
async fn invalid_utf8_text_is_closed_with_1007() {
    let server = TestServer::start().await;
    assert_eq!(
        close_code_for(&server, &masked(FIN | TEXT, &[b'o', b'k', 0xC3, 0x28])).await,
        1007
    );
    // Refused in the first fragment already, without waiting for the end.
    assert_eq!(
        close_code_for(&server, &masked(TEXT, &[b'a', 0xFF, b'b'])).await,
        1007
    );
    assert_eq!(server.hub.metrics().errors(ErrorKind::InvalidUtf8), 2);
}

#[tokio::test]
async fn an_unmasked_client_frame_is_closed_with_1002() {
    let server = TestServer::start().await;
    assert_eq!(
        close_code_for(&server, &frame(FIN | TEXT, None, b"not masked")).await,
        1002
    );
    assert_eq!(server.hub.metrics().errors(ErrorKind::Protocol), 1);
}

#[tokio::test]
async fn reserved_opcodes_are_closed_with_1002() {
    let server = TestServer::start().await;
    // 0x3 is a reserved data opcode, 0xB a reserved control opcode.
    assert_eq!(
        close_code_for(&server, &masked(FIN | 0x3, b"x")).await,
        1002
    );
    assert_eq!(close_code_for(&server, &masked(FIN | 0xB, b"")).await, 1002);
    assert_eq!(server.hub.metrics().errors(ErrorKind::Protocol), 2);
}

#[tokio::test]
async fn a_reserved_bit_without_an_extension_is_closed_with_1002() {
    let server = TestServer::start().await;
    assert_eq!(
        close_code_for(&server, &masked(FIN | RSV1 | TEXT, b"compressed?")).await,
        1002
    );
    assert_eq!(
        close_code_for(&server, &masked(FIN | 0x10 | BINARY, b"rsv3")).await,
        1002
    );
}

#[tokio::test]
async fn a_continuation_without_a_start_is_closed_with_1002() {
    let server = TestServer::start().await;
    assert_eq!(
        close_code_for(&server, &masked(FIN | CONT, b"orphan")).await,
        1002
    );
}

#[tokio::test]
async fn a_close_payload_of_one_byte_is_closed_with_1002() {
    let server = TestServer::start().await;
    assert_eq!(
        close_code_for(&server, &masked(FIN | CLOSE, &[0x03])).await,
        1002
    );
}

#[tokio::test]
async fn close_code_1005_on_the_wire_is_closed_with_1002() {
    let server = TestServer::start().await;
    assert_eq!(
        close_code_for(&server, &masked(FIN | CLOSE, &close_payload(1005, ""))).await,
        1002
    );
    // 1006 and 1015 are reserved too; 999 is below the range.
    for code in [1006, 1015, 999] {
        assert_eq!(
            close_code_for(&server, &masked(FIN | CLOSE, &close_payload(code, ""))).await,
            1002,
            "close code {code}"
        );
    }
}

#[tokio::test]
async fn a_frame_over_max_frame_size_is_closed_with_1009() {
    let server = TestServer::start().await;
    assert_eq!(server.hub.limits().max_frame_size, 64 * 1024);
    // Only the header of a 65,537-byte frame: it is refused from the header,
    // before any payload is buffered.
    let mut header = vec![FIN | BINARY, 0x80 | 127];
    header.extend_from_slice(&(64u64 * 1024 + 1).to_be_bytes());
    header.extend_from_slice(&MASK);
    assert_eq!(close_code_for(&server, &header).await, 1009);
    assert_eq!(server.hub.metrics().errors(ErrorKind::MessageTooBig), 1);

    // A frame of exactly the limit is fine.
    let mut ws = echo_client(&server).await;
    let payload = vec![b'x'; 64 * 1024];
    ws.send(&masked(FIN | BINARY, &payload)).await;
    let echoed = ws.read_frame().await;
    assert_eq!(echoed.payload.len(), payload.len());
}

#[tokio::test]
async fn fragments_adding_up_to_more_than_max_message_size_are_closed_with_1009() {
    let limits = limits_with(|limits| {
        limits.max_message_size = 1000;
        limits.max_frame_size = 1000;
    });
    let server = TestServer::with_limits(limits).await;
    let mut ws = echo_client(&server).await;
    ws.send(&masked(TEXT, &[b'a'; 600])).await;
    ws.send(&masked(FIN | CONT, &[b'b'; 600])).await;
    let (code, _reason) = ws.expect_close().await;
    assert_eq!(code, 1009);
}
