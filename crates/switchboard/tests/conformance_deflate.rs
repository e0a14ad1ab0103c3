//! Conformance suite, compression: permessage-deflate (RFC 7692) on `/echo`,
//! the ground of Autobahn|Testsuite sections 12 and 13, spoken in raw bytes.
//!
//! The client writes its own handshake offers and compresses its own frames
//! with flate2; the server's replies are inflated here. What the server must
//! do is in docs/conformance.md ("Compression").

mod common;
mod raw;

use std::net::SocketAddr;
use std::time::Duration;

use common::TestServer;
use flate2::{Compress, Decompress, FlushCompress, FlushDecompress, Status};
use raw::*;
use switchboard::{Compression, Limits};

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

const EXTENSIONS: &str = "Sec-WebSocket-Extensions";

/// Replies of at least this many bytes come back compressed (the default
/// `compression.min_size`).
const MIN_COMPRESSED: usize = 256;

/// Autobahn 12.x / 13.x message sizes.
const AUTOBAHN_SIZES: [usize; 10] = [
    16, 64, 256, 1024, 4096, 8192, 16_384, 32_768, 65_536, 131_072,
];

fn enabled() -> Compression {
    Compression {
        enabled: true,
        ..Compression::default()
    }
}

/// Limits with `compression` and room for the largest Autobahn messages.
fn limits(compression: Compression) -> Limits {
    Limits {
        compression,
        max_message_size: 16 << 20,
        max_frame_size: 16 << 20,
        ..Limits::default()
    }
}

async fn server(compression: Compression) -> TestServer {
    TestServer::with_limits(limits(compression)).await
}

// ---------------------------------------------------------------------------
// The handshake: offers and the `Sec-WebSocket-Extensions` response.
// ---------------------------------------------------------------------------

/// One extension parameter: its name and its value, if it has one.
type Param = (String, Option<String>);

/// Splits `permessage-deflate; a; b=1` into its parameters.
fn parse_extension(value: &str) -> Vec<Param> {
    let mut parts = value.split(';').map(str::trim);
    assert_eq!(
        parts.next(),
        Some("permessage-deflate"),
        "the only extension the server may agree to is the one offered: {value:?}"
    );
    parts
        .map(|p| match p.split_once('=') {
            Some((n, v)) => (
                n.trim().to_owned(),
                Some(v.trim().trim_matches('"').to_owned()),
            ),
            None => (p.to_owned(), None),
        })
        .collect()
}

fn param<'a>(params: &'a [Param], name: &str) -> Option<Option<&'a str>> {
    params
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_deref())
}

fn bits(value: Option<&str>, name: &str) -> u8 {
    value
        .unwrap_or_else(|| panic!("{name} needs a value in a response"))
        .parse()
        .unwrap_or_else(|_| panic!("{name} is not a number"))
}

/// Opens `/echo` offering `offer`; returns the agreed parameters (`None`:
/// the extension was declined) and the connection.
async fn offer(addr: SocketAddr, offer: &str) -> (Option<Vec<Param>>, RawWs) {
    let (response, ws) = try_upgrade(addr, "/echo", &[(EXTENSIONS, offer)]).await;
    assert_eq!(
        response.status, 101,
        "an extension offer never fails the handshake"
    );
    (response.header(EXTENSIONS).map(parse_extension), ws)
}

/// The RFC 7692 rules a response must follow for a given offer; returns
/// every rule broken.
fn rfc_7692_violations(offer: &[Param], response: &[Param]) -> Vec<String> {
    let mut broken = Vec::new();
    let known = [
        "server_no_context_takeover",
        "client_no_context_takeover",
        "server_max_window_bits",
        "client_max_window_bits",
    ];
    for (i, (name, value)) in response.iter().enumerate() {
        if !known.contains(&name.as_str()) {
            broken.push(format!("§7: unknown parameter {name} in the response"));
        }
        if response[..i].iter().any(|(n, _)| n == name) {
            broken.push(format!("§7: {name} appears twice in the response"));
        }
        let takes_value = name.ends_with("window_bits");
        if takes_value != value.is_some() {
            broken.push(format!("§7.1: {name} with a wrong value form: {value:?}"));
        }
    }
    // §7.1.1.1: accepting server_no_context_takeover means naming it.
    if param(offer, "server_no_context_takeover").is_some()
        && param(response, "server_no_context_takeover").is_none()
    {
        broken.push("§7.1.1.1: server_no_context_takeover offered, not in the response".into());
    }
    // §7.1.2.1: "A server accepts an extension negotiation offer with this
    // parameter by including the server_max_window_bits extension parameter
    // in the extension negotiation response ... with the same or smaller
    // value as the offer."
    if let Some(offered) = param(offer, "server_max_window_bits") {
        let offered = bits(offered, "server_max_window_bits");
        match param(response, "server_max_window_bits") {
            None => broken.push(format!(
                "§7.1.2.1: server_max_window_bits={offered} offered and accepted, but the response does not name it"
            )),
            Some(v) => {
                let got = bits(v, "server_max_window_bits");
                if !(8..=offered).contains(&got) {
                    broken.push(format!(
                        "§7.1.2.1: server_max_window_bits={got} answers an offer of {offered}"
                    ));
                }
            }
        }
    } else if let Some(v) = param(response, "server_max_window_bits") {
        // §7.1.2.1 allows naming it unasked; it must still be 8..=15.
        let got = bits(v, "server_max_window_bits");
        if !(8..=15).contains(&got) {
            broken.push(format!("§7.1.2.1: server_max_window_bits={got}"));
        }
    }
    // §7.1.2.2: "If a received extension negotiation offer doesn't have the
    // client_max_window_bits extension parameter, the corresponding
    // extension negotiation response to the offer MUST NOT include" it.
    match (
        param(offer, "client_max_window_bits"),
        param(response, "client_max_window_bits"),
    ) {
        (None, Some(v)) => broken.push(format!(
            "§7.1.2.2: client_max_window_bits={} in the response, but the offer did not name it",
            v.unwrap_or("")
        )),
        (Some(offered), Some(v)) => {
            let got = bits(v, "client_max_window_bits");
            let limit = offered.map_or(15, |o| bits(Some(o), "client_max_window_bits"));
            if !(8..=limit).contains(&got) {
                broken.push(format!(
                    "§7.1.2.2: client_max_window_bits={got} answers an offer of {offered:?}"
                ));
            }
        }
        _ => {}
    }
    broken
}

/// The offer's parameters, parsed the same way as a response.
fn offer_params(offer: &str) -> Vec<Param> {
    parse_extension(offer)
}

/// A parameter a response is expected to carry: its name and value.
type Expected = (&'static str, Option<&'static str>);

#[tokio::test]
async fn common_offers_are_accepted_as_rfc_7692_says() {
    let server = server(enabled()).await;
    // (offer, the parameters the server answers with, given its defaults:
    // window 15 both ways, context takeover both ways).
    let cases: &[(&str, &[Expected])] = &[
        ("permessage-deflate", &[]),
        ("permessage-deflate; client_max_window_bits", &[]),
        (
            "permessage-deflate; server_no_context_takeover",
            &[("server_no_context_takeover", None)],
        ),
        (
            "permessage-deflate; client_no_context_takeover",
            &[("client_no_context_takeover", None)],
        ),
        (
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
            &[
                ("server_no_context_takeover", None),
                ("client_no_context_takeover", None),
            ],
        ),
        (
            "permessage-deflate; client_max_window_bits=9",
            &[("client_max_window_bits", Some("9"))],
        ),
        (
            "permessage-deflate; client_max_window_bits=12",
            &[("client_max_window_bits", Some("12"))],
        ),
        (
            "permessage-deflate; server_max_window_bits=10; client_max_window_bits",
            &[("server_max_window_bits", Some("10"))],
        ),
        (
            "permessage-deflate; server_no_context_takeover; server_max_window_bits=9; client_no_context_takeover; client_max_window_bits=9",
            &[
                ("server_no_context_takeover", None),
                ("client_no_context_takeover", None),
                ("server_max_window_bits", Some("9")),
                ("client_max_window_bits", Some("9")),
            ],
        ),
        // Quoted values are allowed (RFC 7692 §7.1.2.1 references the
        // quoted-string form of RFC 6455 §9.1).
        (
            "permessage-deflate; server_max_window_bits=\"11\"",
            &[("server_max_window_bits", Some("11"))],
        ),
    ];
    let mut problems = Vec::new();
    for (text, expected) in cases {
        let (agreed, mut ws) = offer(server.addr, text).await;
        let Some(agreed) = agreed else {
            problems.push(format!("{text:?}: declined"));
            continue;
        };
        for rule in rfc_7692_violations(&offer_params(text), &agreed) {
            problems.push(format!("{text:?}: {rule}"));
        }
        let mut got: Vec<(&str, Option<&str>)> = agreed
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_deref()))
            .collect();
        let mut want = expected.to_vec();
        got.sort_unstable();
        want.sort_unstable();
        if got != want {
            problems.push(format!("{text:?}: agreed {got:?}, expected {want:?}"));
        }
        // Compression really is on: a compressed message is understood.
        let window = param(&agreed, "client_max_window_bits")
            .map_or(15, |v| bits(v, "client_max_window_bits"));
        let message = text_of_len(300, 1);
        let packed = ClientDeflate::new(window, false).compress(message.as_bytes());
        ws.send(&masked(FIN | RSV1 | TEXT, &packed)).await;
        let reply = read_message(&mut ws, &mut Decompress::new(false)).await;
        assert_eq!(reply.payload, message.as_bytes(), "{text}");
        ws.close_normally().await;
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

/// The offers Autobahn's client sends in sections 12 and 13 (autobahn's
/// `PerMessageDeflateOffer`: `client_no_context_takeover;
/// client_max_window_bits` always, then what the case requests). 13.3 and
/// 13.5 offer only `server_max_window_bits=8`: see
/// `server_max_window_bits_8_is_declined_...` and docs/conformance.md.
#[tokio::test]
async fn the_offers_of_autobahn_sections_12_and_13_are_accepted() {
    let server = server(enabled()).await;
    let base = "permessage-deflate; client_no_context_takeover; client_max_window_bits";
    let cases = [
        ("12.x, 13.1", base.to_owned(), false),
        ("13.2", format!("{base}; server_no_context_takeover"), true),
        ("13.4", format!("{base}; server_max_window_bits=15"), false),
        (
            "13.6",
            format!("{base}; server_no_context_takeover; server_max_window_bits=15"),
            true,
        ),
        (
            "13.7",
            format!(
                "{base}; server_no_context_takeover; server_max_window_bits=8, \
                 {base}; server_no_context_takeover, {base}"
            ),
            true,
        ),
    ];
    for (case, text, server_reset) in cases {
        let (agreed, mut ws) = offer(server.addr, &text).await;
        let agreed = agreed.unwrap_or_else(|| panic!("Autobahn {case}: declined"));
        assert_eq!(
            param(&agreed, "server_no_context_takeover").is_some(),
            server_reset,
            "Autobahn {case}: {agreed:?}"
        );
        assert_eq!(
            param(&agreed, "client_no_context_takeover"),
            Some(None),
            "Autobahn {case}: {agreed:?}"
        );
        // The client resets its compressor after every message, as agreed.
        let mut deflate = ClientDeflate::new(15, true);
        let mut inflater = Decompress::new(false);
        for (i, size) in [16, 300, 4096, 65_536, 300].into_iter().enumerate() {
            let message = text_of_len(size, i as u64);
            ws.send(&masked(
                FIN | RSV1 | TEXT,
                &deflate.compress(message.as_bytes()),
            ))
            .await;
            let reply = if server_reset {
                read_message(&mut ws, &mut Decompress::new(false)).await
            } else {
                read_message(&mut ws, &mut inflater).await
            };
            assert!(reply.payload == message.as_bytes(), "Autobahn {case}");
        }
        ws.close_normally().await;
    }
}

#[tokio::test]
async fn server_max_window_bits_9_to_15_is_accepted_and_honoured() {
    let server = server(enabled()).await;
    let mut problems = Vec::new();
    for n in 9u8..=15 {
        let text = format!("permessage-deflate; server_max_window_bits={n}");
        let (agreed, mut ws) = offer(server.addr, &text).await;
        let agreed = agreed.unwrap_or_else(|| panic!("{text:?} declined"));
        for rule in rfc_7692_violations(&offer_params(&text), &agreed) {
            problems.push(format!("{text:?}: {rule}"));
        }
        // The server compresses within a 2^n window: data that repeats
        // itself at a distance just over 2^n inflates with a 2^n window.
        let message = repeats_beyond_window(n);
        ws.send(&masked(FIN | BINARY, &message)).await;
        let frame = ws.read_frame().await;
        assert_eq!((frame.opcode, frame.rsv), (BINARY, 4), "{text}: compressed");
        let (inflated, distance) = inflate_measuring_window(&frame.payload)
            .unwrap_or_else(|e| panic!("{text}: the reply does not decode: {e}"));
        assert_eq!(inflated, message, "{text}");
        assert!(
            distance <= 1 << n,
            "{text}: the reply refers {distance} bytes back, beyond its 2^{n} window"
        );
        ws.close_normally().await;
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

/// The window check above has teeth: the same data compressed with a 2^15
/// window refers back beyond 2^n, and the measuring decoder agrees with
/// flate2 on what the data is.
#[test]
fn the_window_check_detects_a_too_large_window() {
    for n in 9u8..=14 {
        let message = repeats_beyond_window(n);
        let packed = ClientDeflate::new(15, false).compress(&message);
        let (inflated, distance) = inflate_measuring_window(&packed).expect("decodes");
        assert_eq!(inflated, message);
        assert!(distance > 1 << n, "window {n}: {distance}");
        let (inflated, distance) =
            inflate_measuring_window(&ClientDeflate::new(n, false).compress(&message))
                .expect("decodes");
        assert_eq!(inflated, message);
        assert!(distance <= 1 << n, "window {n}: {distance}");
    }
    let text = text_of_len(50_000, 11);
    let packed = ClientDeflate::new(15, false).compress(text.as_bytes());
    assert_eq!(
        inflate_measuring_window(&packed).expect("decodes").0,
        inflate(&mut Decompress::new(false), &packed).expect("flate2 decodes")
    );
}

/// zlib cannot deflate with a 2^8 window, so the server accepts
/// `server_max_window_bits=8` (echoing it, RFC 7692 §7.1.2.1) and then
/// sends every message of that connection uncompressed, which the RFC
/// allows; it still inflates what the client compresses. Autobahn 13.3 and
/// 13.5 offer this.
#[tokio::test]
async fn server_max_window_bits_8_is_accepted_and_replies_go_uncompressed() {
    let server = server(enabled()).await;
    for text in [
        "permessage-deflate; server_max_window_bits=8",
        "permessage-deflate; server_no_context_takeover; server_max_window_bits=8",
    ] {
        let (agreed, mut ws) = offer(server.addr, text).await;
        let agreed = agreed.unwrap_or_else(|| panic!("{text}: declined"));
        assert!(
            agreed.contains(&("server_max_window_bits".to_owned(), Some("8".to_owned()))),
            "{text}: {agreed:?}"
        );
        // A long message goes back uncompressed (no RSV1).
        let message = text_of_len(1000, 2);
        ws.send(&masked(FIN | TEXT, message.as_bytes())).await;
        ws.expect_frame(TEXT, message.as_bytes()).await;
        // The client may still compress: the server inflates.
        let packed = ClientDeflate::new(15, false).compress(message.as_bytes());
        ws.send(&masked(FIN | RSV1 | TEXT, &packed)).await;
        ws.expect_frame(TEXT, message.as_bytes()).await;
    }
    // Offered with a fallback, the first acceptable offer is taken.
    let (agreed, _ws) = offer(
        server.addr,
        "permessage-deflate; server_no_context_takeover; server_max_window_bits=8, \
         permessage-deflate; server_no_context_takeover, permessage-deflate",
    )
    .await;
    assert_eq!(
        agreed,
        Some(vec![
            ("server_no_context_takeover".to_owned(), None),
            ("server_max_window_bits".to_owned(), Some("8".to_owned()))
        ])
    );
}

#[tokio::test]
async fn client_max_window_bits_is_named_only_when_offered() {
    let server = server(Compression {
        client_max_window_bits: 10,
        ..enabled()
    })
    .await;
    let mut problems = Vec::new();
    for (text, expected) in [
        ("permessage-deflate; client_max_window_bits", Some("10")),
        ("permessage-deflate; client_max_window_bits=12", Some("10")),
        ("permessage-deflate; client_max_window_bits=9", Some("9")),
        // Not offered: the server may not name it (§7.1.2.2), so the client
        // keeps its 2^15 window.
        ("permessage-deflate", None),
        ("permessage-deflate; server_no_context_takeover", None),
    ] {
        let (agreed, mut ws) = offer(server.addr, text).await;
        let agreed = agreed.unwrap_or_else(|| panic!("{text:?} declined"));
        for rule in rfc_7692_violations(&offer_params(text), &agreed) {
            problems.push(format!("{text:?}: {rule}"));
        }
        let got = param(&agreed, "client_max_window_bits").flatten();
        if got != expected {
            problems.push(format!(
                "{text:?}: client_max_window_bits {got:?}, expected {expected:?}"
            ));
        }
        // The client compresses with the window it was given (or 15).
        let window = got.map_or(15, |v| bits(Some(v), "client_max_window_bits"));
        let message = repeats_beyond_window(window.min(14));
        let packed = ClientDeflate::new(window, false).compress(&message);
        ws.send(&masked(FIN | RSV1 | BINARY, &packed)).await;
        let reply = read_message(&mut ws, &mut Decompress::new(false)).await;
        assert_eq!(reply.payload, message, "{text}");
        ws.close_normally().await;
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

#[tokio::test]
async fn bad_offers_are_declined_and_a_later_good_one_is_taken() {
    let server = server(enabled()).await;
    for text in [
        "permessage-deflate; bogus",
        "permessage-deflate; server_max_window_bits",
        "permessage-deflate; server_max_window_bits=16",
        "permessage-deflate; server_max_window_bits=7",
        "permessage-deflate; server_max_window_bits=010",
        "permessage-deflate; server_max_window_bits=abc",
        "permessage-deflate; client_max_window_bits=16",
        "permessage-deflate; client_no_context_takeover=1",
        "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
        "permessage-deflate; client_max_window_bits; client_max_window_bits=10",
        "x-webkit-deflate-frame",
    ] {
        let (agreed, mut ws) = offer(server.addr, text).await;
        assert_eq!(agreed, None, "{text:?} must be declined (RFC 7692 §5)");
        ws.send(&masked(FIN | TEXT, b"still a websocket")).await;
        ws.expect_frame(TEXT, b"still a websocket").await;
        ws.close_normally().await;
    }
    let (agreed, _ws) = offer(
        server.addr,
        "permessage-deflate; bogus, permessage-deflate; client_max_window_bits",
    )
    .await;
    assert_eq!(agreed, Some(Vec::new()));
    // Other extensions in the same header are skipped.
    let (agreed, _ws) = offer(
        server.addr,
        "x-webkit-deflate-frame, permessage-deflate; server_no_context_takeover",
    )
    .await;
    assert_eq!(
        agreed,
        Some(vec![("server_no_context_takeover".to_owned(), None)])
    );
    // Offers spread over two header lines are one list (RFC 6455 §9.1).
    let (response, _ws) = try_upgrade(
        server.addr,
        "/echo",
        &[
            (EXTENSIONS, "permessage-deflate; bogus"),
            (EXTENSIONS, "permessage-deflate; client_max_window_bits=11"),
        ],
    )
    .await;
    assert_eq!(response.status, 101);
    assert_eq!(
        response.header(EXTENSIONS).map(parse_extension),
        Some(vec![(
            "client_max_window_bits".to_owned(),
            Some("11".to_owned())
        )])
    );
}

#[tokio::test]
async fn without_compression_enabled_no_extension_is_agreed() {
    let server = server(Compression::default()).await;
    let (agreed, mut ws) = offer(server.addr, "permessage-deflate; client_max_window_bits").await;
    assert_eq!(agreed, None);
    ws.send(&masked(FIN | RSV1 | TEXT, b"x")).await;
    assert_eq!(ws.expect_close_frame().await.0, 1002);
}

// ---------------------------------------------------------------------------
// Compressed data.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn compressed_messages_of_autobahn_sizes_are_echoed() {
    let server = server(enabled()).await;
    for opcode in [TEXT, BINARY] {
        let (agreed, mut ws) =
            offer(server.addr, "permessage-deflate; client_max_window_bits").await;
        assert!(agreed.is_some());
        let mut deflate = ClientDeflate::new(15, false);
        let mut inflater = Decompress::new(false);
        for size in AUTOBAHN_SIZES {
            for round in 0..3u64 {
                let message = payload_of(opcode, size, round);
                ws.send(&masked(FIN | RSV1 | opcode, &deflate.compress(&message)))
                    .await;
                let reply = read_message(&mut ws, &mut inflater).await;
                assert_eq!(reply.opcode, opcode, "{size} bytes");
                assert_eq!(
                    reply.compressed,
                    size >= MIN_COMPRESSED,
                    "{size} bytes: replies of {MIN_COMPRESSED} bytes or more are compressed"
                );
                assert!(reply.payload == message, "{size} bytes, round {round}");
            }
        }
        ws.close_normally().await;
    }
}

/// With `min_size = 0` every reply is compressed, empty ones included
/// (RFC 7692 §7.2.3.6: an empty message is the byte 0x00), and the
/// compression context carries over between them.
#[tokio::test]
async fn with_min_size_0_even_empty_replies_are_compressed() {
    let server = server(Compression {
        min_size: 0,
        ..enabled()
    })
    .await;
    let (_, mut ws) = offer(server.addr, "permessage-deflate").await;
    let mut deflate = ClientDeflate::new(15, false);
    let mut inflater = Decompress::new(false);
    for size in [0, 1, 0, 0, 300, 0, 5000, 1] {
        let message = text_of_len(size, 12);
        ws.send(&masked(
            FIN | RSV1 | TEXT,
            &deflate.compress(message.as_bytes()),
        ))
        .await;
        let reply = read_message(&mut ws, &mut inflater).await;
        assert!(reply.compressed, "{size} bytes");
        assert_eq!(reply.payload, message.as_bytes(), "{size} bytes");
    }
    ws.close_normally().await;
}

#[tokio::test]
async fn fragmented_compressed_messages_are_echoed() {
    let server = server(enabled()).await;
    // Autobahn 12.x.11-18: messages auto-fragmented at these sizes.
    let cases = [
        (8192, 256),
        (16_384, 256),
        (65_536, 256),
        (131_072, 256),
        (131_072, 1024),
        (131_072, 4096),
        (131_072, 32_768),
    ];
    for opcode in [TEXT, BINARY] {
        let (_, mut ws) = offer(server.addr, "permessage-deflate").await;
        let mut deflate = ClientDeflate::new(15, false);
        let mut inflater = Decompress::new(false);
        for (size, fragment) in cases {
            let message = payload_of(opcode, size, 7);
            let packed = deflate.compress(&message);
            ws.send(&fragmented(opcode, true, &packed, fragment)).await;
            let reply = read_message(&mut ws, &mut inflater).await;
            assert_eq!(reply.opcode, opcode);
            assert!(reply.compressed);
            assert!(
                reply.payload == message,
                "{size} in {fragment}-byte fragments"
            );
        }
        ws.close_normally().await;
    }
}

#[tokio::test]
async fn uncompressed_messages_still_work_on_a_compressed_connection() {
    let server = server(enabled()).await;
    let (_, mut ws) = offer(server.addr, "permessage-deflate").await;
    let mut inflater = Decompress::new(false);
    for size in [0, 16, 255, 256, 5000] {
        let message = text_of_len(size, 3);
        ws.send(&masked(FIN | TEXT, message.as_bytes())).await;
        let reply = read_message(&mut ws, &mut inflater).await;
        assert_eq!(reply.compressed, size >= MIN_COMPRESSED, "{size}");
        assert_eq!(reply.payload, message.as_bytes());
    }
    // Uncompressed fragments (no RSV1 anywhere) too.
    let message = text_of_len(3000, 4);
    ws.send(&fragmented(TEXT, false, message.as_bytes(), 700))
        .await;
    let reply = read_message(&mut ws, &mut inflater).await;
    assert_eq!(reply.payload, message.as_bytes());
    // Pings are never compressed.
    ws.send(&masked(FIN | PING, &[7u8; 125])).await;
    ws.expect_frame(PONG, &[7u8; 125]).await;
    ws.close_normally().await;
}

#[tokio::test]
async fn with_server_no_context_takeover_each_reply_inflates_on_its_own() {
    // Asked for by the client ...
    let by_offer = server(enabled()).await;
    // ... or configured on the server.
    let by_config = server(Compression {
        server_no_context_takeover: true,
        ..enabled()
    })
    .await;
    for (addr, text) in [
        (
            by_offer.addr,
            "permessage-deflate; server_no_context_takeover",
        ),
        (by_config.addr, "permessage-deflate"),
    ] {
        let (agreed, mut ws) = offer(addr, text).await;
        let agreed = agreed.expect("accepted");
        assert_eq!(
            param(&agreed, "server_no_context_takeover"),
            Some(None),
            "{text}: agreed {agreed:?}"
        );
        let mut deflate = ClientDeflate::new(15, false);
        let message = text_of_len(4096, 5);
        let mut replies = Vec::new();
        for round in 0..4 {
            ws.send(&masked(
                FIN | RSV1 | TEXT,
                &deflate.compress(message.as_bytes()),
            ))
            .await;
            let frame = ws.read_frame().await;
            assert_eq!((frame.opcode, frame.rsv), (TEXT, 4), "{text}");
            // A FRESH inflater for every reply.
            let inflated = inflate(&mut Decompress::new(false), &frame.payload)
                .unwrap_or_else(|e| panic!("{text}, reply {round}: {e}"));
            assert_eq!(inflated, message.as_bytes());
            replies.push(frame.payload);
        }
        assert!(
            replies.windows(2).all(|w| w[0] == w[1]),
            "{text}: the same message compresses the same every time"
        );
        ws.close_normally().await;
    }
}

#[tokio::test]
async fn with_client_no_context_takeover_the_client_may_reset_its_compressor() {
    let server = server(enabled()).await;
    let (agreed, mut ws) = offer(
        server.addr,
        "permessage-deflate; client_no_context_takeover; client_max_window_bits=9",
    )
    .await;
    let agreed = agreed.expect("accepted");
    assert_eq!(param(&agreed, "client_no_context_takeover"), Some(None));
    let mut deflate = ClientDeflate::new(9, true);
    let mut inflater = Decompress::new(false);
    for size in [300, 300, 2000, 2000, 20_000] {
        let message = text_of_len(size, 6);
        ws.send(&masked(
            FIN | RSV1 | TEXT,
            &deflate.compress(message.as_bytes()),
        ))
        .await;
        let reply = read_message(&mut ws, &mut inflater).await;
        assert_eq!(reply.payload, message.as_bytes());
    }
    ws.close_normally().await;
}

#[tokio::test]
async fn the_examples_of_rfc_7692_section_7_2_3_are_understood() {
    let server = server(enabled()).await;
    let hello = b"Hello".to_vec();
    // §7.2.3.1: one compressed block, whole and fragmented.
    let (_, mut ws) = offer(server.addr, "permessage-deflate").await;
    let one_block = [0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];
    ws.send(&masked(FIN | RSV1 | TEXT, &one_block)).await;
    ws.expect_frame(TEXT, &hello).await;
    let (_, mut ws) = offer(server.addr, "permessage-deflate").await;
    let mut wire = masked(RSV1 | TEXT, &one_block[..3]);
    wire.extend(masked(FIN | CONT, &one_block[3..]));
    ws.send(&wire).await;
    ws.expect_frame(TEXT, &hello).await;
    // §7.2.3.2: the second message refers back to the first (context
    // takeover).
    let (_, mut ws) = offer(server.addr, "permessage-deflate").await;
    ws.send(&masked(FIN | RSV1 | TEXT, &one_block)).await;
    ws.expect_frame(TEXT, &hello).await;
    ws.send(&masked(FIN | RSV1 | TEXT, &[0xf2, 0x00, 0x11, 0x00, 0x00]))
        .await;
    ws.expect_frame(TEXT, &hello).await;
    // §7.2.3.3: a stored (uncompressed) DEFLATE block.
    let (_, mut ws) = offer(server.addr, "permessage-deflate").await;
    let stored = [
        0x00, 0x05, 0x00, 0xfa, 0xff, 0x48, 0x65, 0x6c, 0x6c, 0x6f, 0x00,
    ];
    ws.send(&masked(FIN | RSV1 | TEXT, &stored)).await;
    ws.expect_frame(TEXT, &hello).await;
    // §7.2.3.5: two DEFLATE blocks in one message.
    let (_, mut ws) = offer(server.addr, "permessage-deflate").await;
    let two_blocks = [
        0xf2, 0x48, 0x05, 0x00, 0x00, 0x00, 0xff, 0xff, 0xca, 0xc9, 0xc9, 0x07, 0x00,
    ];
    ws.send(&masked(FIN | RSV1 | TEXT, &two_blocks)).await;
    ws.expect_frame(TEXT, &hello).await;
    // §7.2.3.6: an empty message is the single byte 0x00.
    let (_, mut ws) = offer(server.addr, "permessage-deflate").await;
    ws.send(&masked(FIN | RSV1 | TEXT, &[0x00])).await;
    ws.expect_frame(TEXT, b"").await;
    ws.send(&masked(FIN | RSV1 | BINARY, &[0x00])).await;
    ws.expect_frame(BINARY, b"").await;
    ws.close_normally().await;
}

/// RFC 7692 §7.2.3.4: a sender may end a message with a block whose BFINAL
/// bit is set. The server runs on its own thread here, so that if it spins
/// on such a message the test fails by timeout instead of hanging.
#[tokio::test]
async fn a_deflate_block_with_bfinal_set_is_understood() {
    let addr = detached_server(limits(enabled()));
    let bfinal = [0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00, 0x00];
    // The example is valid: flate2 reads "Hello" and the end of the stream.
    let mut check = Decompress::new(false);
    let mut out = Vec::with_capacity(64);
    let status = check
        .decompress_vec(&bfinal, &mut out, FlushDecompress::Finish)
        .expect("the RFC example inflates");
    assert_eq!((status, out.as_slice()), (Status::StreamEnd, &b"Hello"[..]));

    let (_, mut ws) = offer(addr, "permessage-deflate; client_no_context_takeover").await;
    ws.send(&masked(FIN | RSV1 | TEXT, &bfinal)).await;
    let reply = ws.try_read_frame(Duration::from_secs(3)).await;
    let frame = reply.unwrap_or_else(|e| {
        panic!("a message ending in a BFINAL block (RFC 7692 §7.2.3.4) gets no echo: {e}")
    });
    assert_eq!(
        (frame.opcode, frame.payload.as_slice()),
        (TEXT, &b"Hello"[..])
    );
    // And the connection goes on (client_no_context_takeover: the next
    // message starts a fresh stream).
    ws.send(&masked(
        FIN | RSV1 | TEXT,
        &[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00],
    ))
    .await;
    let frame = ws
        .try_read_frame(Duration::from_secs(3))
        .await
        .expect("the next message is echoed");
    assert_eq!(
        (frame.opcode, frame.payload.as_slice()),
        (TEXT, &b"Hello"[..])
    );
}

#[tokio::test]
async fn compression_protocol_errors_have_their_close_codes() {
    let server = server(enabled()).await;
    let packed = ClientDeflate::new(15, false).compress(text_of_len(500, 8).as_bytes());
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        // RFC 7692 §6.1: RSV1 only on the first frame of a message.
        (
            "RSV1 on a continuation",
            {
                let mut w = masked(RSV1 | TEXT, &packed[..10]);
                w.extend(masked(FIN | RSV1 | CONT, &packed[10..]));
                w
            },
            1002,
        ),
        // §6.1: control frames are never compressed.
        ("RSV1 on a ping", masked(FIN | RSV1 | PING, b""), 1002),
        ("RSV1 on a pong", masked(FIN | RSV1 | PONG, b""), 1002),
        (
            "RSV1 on a close",
            masked(FIN | RSV1 | CLOSE, &close_payload(1000, "")),
            1002,
        ),
        // RSV2 and RSV3 mean nothing with permessage-deflate.
        ("RSV2 on text", masked(FIN | RSV2 | TEXT, b"x"), 1002),
        (
            "RSV3 on compressed text",
            masked(FIN | RSV1 | RSV3 | TEXT, &packed),
            1002,
        ),
        // §7.2.2 data that does not inflate; invalid UTF-8 once inflated.
        (
            "garbage deflate data",
            masked(FIN | RSV1 | BINARY, &[0xFF; 8]),
            1007,
        ),
        (
            "invalid UTF-8 inside compressed text",
            masked(
                FIN | RSV1 | TEXT,
                &ClientDeflate::new(15, false).compress(b"ok \xED\xA0\x80 surrogate"),
            ),
            1007,
        ),
    ];
    for (what, wire, code) in cases {
        let (_, mut ws) = offer(server.addr, "permessage-deflate").await;
        ws.send(&wire).await;
        let (got, reason) = ws.expect_close_frame().await;
        assert_eq!(got, code, "{what}: {reason}");
    }
}

#[tokio::test]
async fn a_decompression_bomb_is_closed_with_1009() {
    // Default limits: 64 KiB per message, inflated.
    let server = TestServer::with_limits(Limits {
        compression: enabled(),
        ..Limits::default()
    })
    .await;
    let (_, mut ws) = offer(server.addr, "permessage-deflate").await;
    let bomb = ClientDeflate::new(15, false).compress(&vec![b'a'; 8 << 20]);
    assert!(bomb.len() < 64 * 1024, "{} bytes", bomb.len());
    ws.send(&masked(FIN | RSV1 | TEXT, &bomb)).await;
    assert_eq!(ws.expect_close_frame().await.0, 1009);

    // Exactly the limit inflated is fine.
    let (_, mut ws) = offer(server.addr, "permessage-deflate").await;
    let exact = vec![b'a'; 64 * 1024];
    ws.send(&masked(
        FIN | RSV1 | TEXT,
        &ClientDeflate::new(15, false).compress(&exact),
    ))
    .await;
    let reply = read_message(&mut ws, &mut Decompress::new(false)).await;
    assert_eq!(reply.payload.len(), exact.len());
}

#[tokio::test]
async fn invalid_utf8_across_compressed_fragments_is_1007_by_the_end_of_the_message() {
    // Compressed text is checked once inflated, i.e. when the message is
    // complete (docs/conformance.md): the close comes at the latest after
    // the final fragment.
    let server = server(enabled()).await;
    let (_, mut ws) = offer(server.addr, "permessage-deflate").await;
    let mut message = text_of_len(400, 9).into_bytes();
    message.extend_from_slice(b"\xF4\x90\x80\x80 beyond U+10FFFF");
    let packed = ClientDeflate::new(15, false).compress(&message);
    let (a, b) = packed.split_at(packed.len() / 2);
    ws.send(&masked(RSV1 | TEXT, a)).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    ws.send(&masked(FIN | CONT, b)).await;
    assert_eq!(ws.expect_close_frame().await.0, 1007);
}

// ---------------------------------------------------------------------------
// Client side of the codec.
// ---------------------------------------------------------------------------

/// A client compressor (RFC 7692 §7.2.1): DEFLATE, sync flush, strip the
/// trailing 00 00 FF FF.
struct ClientDeflate {
    zlib: Compress,
    /// Reset after every message (client_no_context_takeover).
    reset_each: bool,
}

impl ClientDeflate {
    fn new(window_bits: u8, reset_each: bool) -> Self {
        Self {
            zlib: Compress::new_with_window_bits(
                flate2::Compression::default(),
                false,
                window_bits,
            ),
            reset_each,
        }
    }

    fn compress(&mut self, input: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(input.len() / 2 + 64);
        let start = self.zlib.total_in();
        for _ in 0..100_000 {
            let done = (self.zlib.total_in() - start) as usize;
            self.zlib
                .compress_vec(&input[done..], &mut out, FlushCompress::Sync)
                .expect("compress");
            if (self.zlib.total_in() - start) as usize == input.len() && out.len() < out.capacity()
            {
                if out.is_empty() {
                    // Nothing new since the last flush: an empty message is
                    // the byte 0x00 (RFC 7692 §7.2.3.6).
                    out.push(0x00);
                } else {
                    assert!(
                        out.ends_with(&[0, 0, 0xFF, 0xFF]),
                        "a sync flush ends the data"
                    );
                    out.truncate(out.len() - 4);
                }
                if self.reset_each {
                    self.zlib.reset();
                }
                return out;
            }
            out.reserve(out.capacity().max(64));
        }
        panic!("compressor made no progress");
    }
}

/// Inflates one server message (RFC 7692 §7.2.2): append 00 00 FF FF and
/// inflate with the connection's inflater.
fn inflate(inflater: &mut Decompress, payload: &[u8]) -> Result<Vec<u8>, String> {
    let mut input = payload.to_vec();
    input.extend_from_slice(&[0, 0, 0xFF, 0xFF]);
    let mut out = Vec::with_capacity(input.len() * 4 + 64);
    let start = inflater.total_in();
    for _ in 0..100_000 {
        let done = (inflater.total_in() - start) as usize;
        let status = inflater
            .decompress_vec(&input[done..], &mut out, FlushDecompress::Sync)
            .map_err(|e| e.to_string())?;
        if status == Status::StreamEnd {
            return Err("the server ended the DEFLATE stream (BFINAL)".into());
        }
        if (inflater.total_in() - start) as usize == input.len() && out.len() < out.capacity() {
            return Ok(out);
        }
        assert!(out.len() <= 64 << 20, "over 64 MiB inflated");
        out.reserve(out.capacity().max(64));
    }
    Err("inflater made no progress".into())
}

/// An independent DEFLATE decoder (RFC 1951, after zlib's `puff.c`) that
/// reports the longest back-reference distance a stream uses: the window
/// the sender really compressed with. (zlib-rs does not refuse distances
/// beyond the window it was given, so it cannot check this.) Decodes one
/// message from a fresh state: `payload` plus the 00 00 FF FF tail.
fn inflate_measuring_window(payload: &[u8]) -> Result<(Vec<u8>, usize), String> {
    let mut data = payload.to_vec();
    data.extend_from_slice(&[0, 0, 0xFF, 0xFF]);
    let mut bits = Bits {
        data: &data,
        pos: 0,
        buf: 0,
        cnt: 0,
    };
    let mut out = Vec::new();
    let mut max_distance = 0;
    for _ in 0..1_000_000 {
        let last = bits.take(1)? == 1;
        match bits.take(2)? {
            0 => {
                bits.buf = 0;
                bits.cnt = 0;
                let header = data
                    .get(bits.pos..bits.pos + 4)
                    .ok_or("stored block header cut")?;
                let len = usize::from(u16::from_le_bytes([header[0], header[1]]));
                let nlen = u16::from_le_bytes([header[2], header[3]]);
                if nlen != !(len as u16) {
                    return Err("stored block length check failed".into());
                }
                bits.pos += 4;
                let body = data
                    .get(bits.pos..bits.pos + len)
                    .ok_or("stored block cut")?;
                out.extend_from_slice(body);
                bits.pos += len;
            }
            1 => {
                let mut lengths = [8u8; 288];
                lengths[144..256].fill(9);
                lengths[256..280].fill(7);
                let lit = Huffman::new(&lengths)?;
                let dist = Huffman::new(&[5u8; 30])?;
                codes(&mut bits, &lit, &dist, &mut out, &mut max_distance)?;
            }
            2 => {
                let (lit, dist) = dynamic_tables(&mut bits)?;
                codes(&mut bits, &lit, &dist, &mut out, &mut max_distance)?;
            }
            _ => return Err("invalid block type 3".into()),
        }
        if last || (bits.pos == data.len() && bits.cnt < 8) {
            return Ok((out, max_distance));
        }
    }
    Err("too many blocks".into())
}

struct Bits<'a> {
    data: &'a [u8],
    pos: usize,
    buf: u32,
    cnt: u32,
}

impl Bits<'_> {
    fn take(&mut self, n: u32) -> Result<u32, String> {
        let mut val = self.buf;
        while self.cnt < n {
            let byte = *self.data.get(self.pos).ok_or("DEFLATE data ends early")?;
            self.pos += 1;
            val |= u32::from(byte) << self.cnt;
            self.cnt += 8;
        }
        self.buf = if n < 32 { val >> n } else { 0 };
        self.cnt -= n;
        Ok(val & ((1u32 << n) - 1))
    }
}

/// A canonical Huffman code: how many codes of each length, and the
/// symbols ordered by code.
struct Huffman {
    count: [u16; 16],
    symbol: Vec<u16>,
}

impl Huffman {
    fn new(lengths: &[u8]) -> Result<Self, String> {
        let mut count = [0u16; 16];
        for &l in lengths {
            count[usize::from(l)] += 1;
        }
        let mut offsets = [0u16; 16];
        for len in 1..15 {
            offsets[len + 1] = offsets[len] + count[len];
        }
        let mut symbol = vec![0u16; lengths.len()];
        for (sym, &l) in lengths.iter().enumerate() {
            if l != 0 {
                let at = &mut offsets[usize::from(l)];
                symbol[usize::from(*at)] = sym as u16;
                *at += 1;
            }
        }
        count[0] = 0;
        Ok(Self { count, symbol })
    }

    fn decode(&self, bits: &mut Bits<'_>) -> Result<usize, String> {
        let (mut code, mut first, mut index) = (0i32, 0i32, 0i32);
        for len in 1..16 {
            code |= bits.take(1)? as i32;
            let count = i32::from(self.count[len]);
            if code - count < first {
                return Ok(usize::from(self.symbol[(index + (code - first)) as usize]));
            }
            index += count;
            first = (first + count) << 1;
            code <<= 1;
        }
        Err("invalid Huffman code".into())
    }
}

fn dynamic_tables(bits: &mut Bits<'_>) -> Result<(Huffman, Huffman), String> {
    const ORDER: [usize; 19] = [
        16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15,
    ];
    let nlen = bits.take(5)? as usize + 257;
    let ndist = bits.take(5)? as usize + 1;
    let ncode = bits.take(4)? as usize + 4;
    let mut code_lengths = [0u8; 19];
    for &i in &ORDER[..ncode] {
        code_lengths[i] = bits.take(3)? as u8;
    }
    let lencode = Huffman::new(&code_lengths)?;
    let mut lengths = vec![0u8; nlen + ndist];
    let mut i = 0;
    while i < nlen + ndist {
        let sym = lencode.decode(bits)?;
        let (value, repeat) = match sym {
            0..=15 => (sym as u8, 1),
            16 => {
                let prev = *lengths[..i]
                    .last()
                    .ok_or("repeat with no previous length")?;
                (prev, 3 + bits.take(2)? as usize)
            }
            17 => (0, 3 + bits.take(3)? as usize),
            _ => (0, 11 + bits.take(7)? as usize),
        };
        if i + repeat > nlen + ndist {
            return Err("too many code lengths".into());
        }
        lengths[i..i + repeat].fill(value);
        i += repeat;
    }
    Ok((
        Huffman::new(&lengths[..nlen])?,
        Huffman::new(&lengths[nlen..])?,
    ))
}

fn codes(
    bits: &mut Bits<'_>,
    lit: &Huffman,
    dist: &Huffman,
    out: &mut Vec<u8>,
    max_distance: &mut usize,
) -> Result<(), String> {
    const LEN_BASE: [usize; 29] = [
        3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115,
        131, 163, 195, 227, 258,
    ];
    const LEN_EXTRA: [u32; 29] = [
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
    ];
    const DIST_BASE: [usize; 30] = [
        1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025, 1537,
        2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577,
    ];
    const DIST_EXTRA: [u32; 30] = [
        0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12,
        13, 13,
    ];
    for _ in 0..100_000_000 {
        let sym = lit.decode(bits)?;
        match sym {
            0..=255 => out.push(sym as u8),
            256 => return Ok(()),
            _ => {
                let l = sym - 257;
                if l >= 29 {
                    return Err("invalid length code".into());
                }
                let len = LEN_BASE[l] + bits.take(LEN_EXTRA[l])? as usize;
                let d = dist.decode(bits)?;
                if d >= 30 {
                    return Err("invalid distance code".into());
                }
                let distance = DIST_BASE[d] + bits.take(DIST_EXTRA[d])? as usize;
                if distance > out.len() {
                    return Err("distance before the start of the message".into());
                }
                *max_distance = (*max_distance).max(distance);
                for _ in 0..len {
                    out.push(out[out.len() - distance]);
                }
            }
        }
    }
    Err("block too long".into())
}

/// A reply as the client sees it, inflated if it was compressed.
struct Reply {
    opcode: u8,
    compressed: bool,
    payload: Vec<u8>,
}

/// Reads one whole message from the server (its frames are unmasked; RSV1
/// may be set on the first frame only, RSV2/3 never).
async fn read_message(ws: &mut RawWs, inflater: &mut Decompress) -> Reply {
    let first = ws.read_frame().await;
    assert!(!first.masked, "server frames are never masked");
    assert!(
        first.opcode == TEXT || first.opcode == BINARY,
        "expected a data frame, got {first:?}"
    );
    assert_eq!(first.rsv & 0b011, 0, "RSV2/RSV3 set by the server");
    let compressed = first.rsv & 0b100 != 0;
    let mut data = first.payload;
    let mut fin = first.fin;
    for _ in 0..100_000 {
        if fin {
            break;
        }
        let next = ws.read_frame().await;
        assert_eq!((next.opcode, next.rsv, next.masked), (CONT, 0, false));
        data.extend_from_slice(&next.payload);
        fin = next.fin;
    }
    assert!(fin, "unfinished message");
    let payload = if compressed {
        inflate(inflater, &data).unwrap_or_else(|e| panic!("the reply does not inflate: {e}"))
    } else {
        data
    };
    if first.opcode == TEXT {
        assert!(
            std::str::from_utf8(&payload).is_ok(),
            "text reply is not UTF-8"
        );
    }
    Reply {
        opcode: first.opcode,
        compressed,
        payload,
    }
}

/// A message split into masked frames of `fragment` payload bytes; RSV1 on
/// the first frame if `compressed`.
fn fragmented(opcode: u8, compressed: bool, payload: &[u8], fragment: usize) -> Vec<u8> {
    let pieces: Vec<&[u8]> = payload.chunks(fragment.max(1)).collect();
    let mut wire = Vec::with_capacity(payload.len() + pieces.len() * 14);
    for (i, piece) in pieces.iter().enumerate() {
        let mut first = if i == 0 { opcode } else { CONT };
        if i == 0 && compressed {
            first |= RSV1;
        }
        if i + 1 == pieces.len() {
            first |= FIN;
        }
        wire.extend(masked(first, piece));
    }
    wire
}

// ---------------------------------------------------------------------------
// Test data.
// ---------------------------------------------------------------------------

/// xorshift64: reproducible pseudo-random bytes.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Compressible UTF-8 text (JSON-ish, with multi-byte characters) of
/// exactly `len` bytes.
fn text_of_len(len: usize, seed: u64) -> String {
    let words = [
        "switchboard",
        "κόσμε",
        "echo",
        "frame",
        "😀",
        "deflate",
        "ß",
    ];
    let mut s = String::with_capacity(len + 32);
    let mut i = seed as usize;
    while s.len() < len {
        s.push_str(&format!(
            "{{\"id\":{i},\"word\":\"{}\"}},",
            words[i % words.len()]
        ));
        i += 1;
    }
    let mut end = len;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    while s.len() < len {
        s.push('x');
    }
    s
}

/// A text or binary payload of `len` bytes: text is JSON-ish, binary is
/// noise mixed with runs so that it compresses somewhat.
fn payload_of(opcode: u8, len: usize, seed: u64) -> Vec<u8> {
    if opcode == TEXT {
        return text_of_len(len, seed).into_bytes();
    }
    let noise = noise(seed, len);
    noise
        .iter()
        .enumerate()
        .map(|(i, b)| if (i / 64) % 2 == 0 { *b } else { (i % 7) as u8 })
        .collect()
}

/// Noise of just over 2^`window` bytes, three times: its only redundancy
/// lies beyond a 2^`window` window.
fn repeats_beyond_window(window: u8) -> Vec<u8> {
    let block = noise(u64::from(window), (1usize << window) + 256);
    let mut out = Vec::with_capacity(block.len() * 3);
    for _ in 0..3 {
        out.extend_from_slice(&block);
    }
    out
}

/// Starts a server on a thread and runtime of its own, never joined: a
/// server task that stops yielding cannot hang the test's runtime.
fn detached_server(limits: Limits) -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("server runtime");
        runtime.block_on(async move {
            let server = TestServer::with_limits(limits).await;
            tx.send(server.addr).expect("report the address");
            std::future::pending::<()>().await;
        });
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("the server thread starts")
}
