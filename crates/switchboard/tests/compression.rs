//! permessage-deflate (RFC 7692) end to end, with a raw client that
//! compresses its own frames.

mod common;
mod raw;

use flate2::{Compress, Decompress, FlushCompress, FlushDecompress};
use raw::*;
use switchboard::{Compression, Limits};

use common::TestServer;

const OFFER: (&str, &str) = (
    "Sec-WebSocket-Extensions",
    "permessage-deflate; client_max_window_bits",
);

async fn server(compression: Compression) -> TestServer {
    TestServer::with_limits(Limits {
        compression,
        ..Limits::default()
    })
    .await
}

fn enabled() -> Compression {
    Compression {
        enabled: true,
        ..Compression::default()
    }
}

/// A client-side compressor (RFC 7692 §7.2.1): deflate, sync flush, strip
/// the 00 00 FF FF tail.
struct ClientDeflate(Compress);

impl ClientDeflate {
    fn new() -> Self {
        Self(Compress::new(flate2::Compression::default(), false))
    }

    fn compress(&mut self, input: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(input.len() + 64);
        let start = self.0.total_in();
        loop {
            let done = (self.0.total_in() - start) as usize;
            self.0
                .compress_vec(&input[done..], &mut out, FlushCompress::Sync)
                .expect("compress");
            if (self.0.total_in() - start) as usize == input.len() && out.len() < out.capacity() {
                break;
            }
            out.reserve(out.capacity());
        }
        assert!(out.ends_with(&[0, 0, 0xFF, 0xFF]));
        out.truncate(out.len() - 4);
        out
    }
}

fn inflate(inflater: &mut Decompress, data: &[u8]) -> Vec<u8> {
    let mut input = data.to_vec();
    input.extend_from_slice(&[0, 0, 0xFF, 0xFF]);
    let mut out = Vec::with_capacity(input.len() * 8 + 64);
    let start = inflater.total_in();
    loop {
        let done = (inflater.total_in() - start) as usize;
        inflater
            .decompress_vec(&input[done..], &mut out, FlushDecompress::Sync)
            .expect("server sent valid deflate data");
        if (inflater.total_in() - start) as usize == input.len() && out.len() < out.capacity() {
            return out;
        }
        out.reserve(out.capacity());
    }
}

async fn connect_compressed(server: &TestServer) -> (HttpResponse, RawWs) {
    try_upgrade(server.addr, "/echo", &[OFFER]).await
}

#[tokio::test]
async fn negotiates_only_when_enabled() {
    let on = server(enabled()).await;
    let (response, _ws) = connect_compressed(&on).await;
    assert_eq!(response.status, 101);
    assert_eq!(
        response.header("sec-websocket-extensions"),
        Some("permessage-deflate")
    );

    let off = server(Compression::default()).await;
    let (response, _ws) = connect_compressed(&off).await;
    assert_eq!(response.status, 101);
    assert_eq!(response.header("sec-websocket-extensions"), None);
}

#[tokio::test]
async fn compressed_messages_round_trip_with_context_takeover() {
    let server = server(enabled()).await;
    let (_, mut ws) = connect_compressed(&server).await;
    let mut deflate = ClientDeflate::new();
    let mut inflater = Decompress::new(false);
    for round in 0..3 {
        let text = format!("round {round}: {}", "all work and no play ".repeat(100));
        ws.send(&masked(0xC1, &deflate.compress(text.as_bytes())))
            .await;
        let echo = ws.read_frame().await;
        assert_eq!(echo.opcode, 0x1);
        assert_eq!(echo.rsv & 0x4, 0x4, "a long echo comes back compressed");
        assert!(
            echo.payload.len() < text.len() / 4,
            "{} bytes",
            echo.payload.len()
        );
        assert_eq!(inflate(&mut inflater, &echo.payload), text.as_bytes());
    }
    // Short messages travel uncompressed (below min_size), both ways.
    ws.send(&masked(0x81, b"hi")).await;
    let echo = ws.read_frame().await;
    assert_eq!((echo.rsv, echo.payload.as_slice()), (0, &b"hi"[..]));
}

#[tokio::test]
async fn a_fragmented_compressed_message_is_inflated_whole() {
    let server = server(enabled()).await;
    let (_, mut ws) = connect_compressed(&server).await;
    let text = "fragmented and compressed ".repeat(40);
    let packed = ClientDeflate::new().compress(text.as_bytes());
    let (a, b) = packed.split_at(packed.len() / 2);
    ws.send(&masked(0x41, a)).await; // text, RSV1, not final
    ws.send(&masked(0x80, b)).await; // continuation, final
    let echo = ws.read_frame().await;
    assert_eq!(
        inflate(&mut Decompress::new(false), &echo.payload),
        text.as_bytes()
    );
}

#[tokio::test]
async fn a_decompression_bomb_is_closed_with_1009() {
    let server = server(enabled()).await;
    let (_, mut ws) = connect_compressed(&server).await;
    // 8 MiB of zeros compress to a few KiB, well under the 64 KiB frame
    // limit; inflated they are far over the 64 KiB message limit.
    let bomb = ClientDeflate::new().compress(&vec![0u8; 8 << 20]);
    assert!(bomb.len() < 64 * 1024);
    ws.send(&masked(0xC2, &bomb)).await;
    let (code, reason) = ws.expect_close().await;
    assert_eq!(code, 1009, "{reason}");
}

#[tokio::test]
async fn invalid_deflate_data_is_closed_with_1007() {
    let server = server(enabled()).await;
    let (_, mut ws) = connect_compressed(&server).await;
    ws.send(&masked(0xC1, &[0xFF, 0xFF, 0xFF, 0xFF])).await;
    let (code, reason) = ws.expect_close().await;
    assert_eq!(code, 1007, "{reason}");
}

#[tokio::test]
async fn rsv1_is_a_protocol_error_without_the_extension_or_on_continuations() {
    let off = server(Compression::default()).await;
    let (_, mut ws) = connect_compressed(&off).await;
    ws.send(&masked(0xC1, b"x")).await;
    assert_eq!(ws.expect_close().await.0, 1002);

    let on = server(enabled()).await;
    let (_, mut ws) = connect_compressed(&on).await;
    ws.send(&masked(0x01, b"a")).await; // text, not final
    ws.send(&masked(0xC0, b"b")).await; // continuation with RSV1
    assert_eq!(ws.expect_close().await.0, 1002);

    let (_, mut ws) = connect_compressed(&on).await;
    ws.send(&masked(0xC9, b"")).await; // compressed ping
    assert_eq!(ws.expect_close().await.0, 1002);
}

#[tokio::test]
async fn invalid_utf8_inside_a_compressed_text_is_1007() {
    let server = server(enabled()).await;
    let (_, mut ws) = connect_compressed(&server).await;
    let packed = ClientDeflate::new().compress(&[0xC3, 0x28, 0xFF]);
    ws.send(&masked(0xC1, &packed)).await;
    assert_eq!(ws.expect_close().await.0, 1007);
}
