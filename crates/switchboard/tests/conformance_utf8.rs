//! Conformance suite, UTF-8 (RFC 6455 §5.6, §8.1): the ground of
//! Autobahn|Testsuite section 6, spoken in raw bytes to `/echo`.
//!
//! Valid text is echoed unchanged however it is fragmented; invalid text
//! fails the connection with 1007, as soon as the fragment that makes it
//! invalid arrives. docs/conformance.md ("UTF-8") has the rules.

mod common;
mod raw;

use std::time::Duration;

use common::TestServer;
use raw::*;

const FIN: u8 = 0x80;
const CONT: u8 = 0x0;
const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;

/// "κόσμε", the Greek word of Markus Kuhn's UTF-8 test file that Autobahn
/// uses throughout section 6.
const KOSME: &[u8] = b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5";

async fn echo(server: &TestServer) -> RawWs {
    RawWs::connect(server.addr, "/echo").await
}

/// A message as masked frames of `fragment` payload bytes each.
fn fragments(opcode: u8, message: &[u8], fragment: usize) -> Vec<u8> {
    let pieces: Vec<&[u8]> = if message.is_empty() {
        vec![&[]]
    } else {
        message.chunks(fragment.max(1)).collect()
    };
    let mut wire = Vec::new();
    for (i, piece) in pieces.iter().enumerate() {
        let op = if i == 0 { opcode } else { CONT };
        let fin = if i + 1 == pieces.len() { FIN } else { 0 };
        wire.extend(masked(fin | op, piece));
    }
    wire
}

/// Valid UTF-8 (Autobahn 6.1, 6.2, 6.5-6.7, 6.9, 6.11, 6.22, 6.23): the
/// boundaries of every sequence length, noncharacters (valid UTF-8), the
/// replacement character and the byte-order mark.
fn valid_texts() -> Vec<(&'static str, Vec<u8>)> {
    let mut cases: Vec<(&'static str, Vec<u8>)> = vec![
        ("empty", b"".to_vec()),
        ("κόσμε", KOSME.to_vec()),
        (
            "Hello-µ@ßöäüàá-UTF-8!!",
            "Hello-µ@ßöäüàá-UTF-8!!".as_bytes().to_vec(),
        ),
        ("U+0000 NUL", b"\x00".to_vec()),
        ("U+007F", b"\x7f".to_vec()),
        ("U+0080, first 2-byte", b"\xc2\x80".to_vec()),
        ("U+07FF, last 2-byte", b"\xdf\xbf".to_vec()),
        ("U+0800, first 3-byte", b"\xe0\xa0\x80".to_vec()),
        ("U+D7FF, before the surrogates", b"\xed\x9f\xbf".to_vec()),
        ("U+E000, after the surrogates", b"\xee\x80\x80".to_vec()),
        ("U+FEFF, byte-order mark", b"\xef\xbb\xbf".to_vec()),
        ("U+FFFD, replacement character", b"\xef\xbf\xbd".to_vec()),
        ("U+FFFE, noncharacter", b"\xef\xbf\xbe".to_vec()),
        ("U+FFFF, last 3-byte", b"\xef\xbf\xbf".to_vec()),
        ("U+10000, first 4-byte", b"\xf0\x90\x80\x80".to_vec()),
        ("U+1FFFF, noncharacter", b"\xf0\x9f\xbf\xbf".to_vec()),
        ("U+1F600, emoji", "😀".as_bytes().to_vec()),
        ("U+10FFFF, last code point", b"\xf4\x8f\xbf\xbf".to_vec()),
    ];
    // Every sequence length mixed in one longer message.
    let mut mixed = Vec::new();
    for _ in 0..50 {
        mixed.extend_from_slice("aß€😀κόσμε\u{10FFFF}\u{FFFF}".as_bytes());
    }
    cases.push(("all lengths mixed, 1.6 KB", mixed));
    cases
}

/// Invalid UTF-8 (Autobahn 6.3, 6.8, 6.10, 6.12-6.21): each must fail the
/// connection with 1007.
fn invalid_texts() -> Vec<(&'static str, Vec<u8>)> {
    let with_kosme = |bad: &[u8]| {
        let mut v = KOSME.to_vec();
        v.extend_from_slice(bad);
        v.extend_from_slice(b"edited");
        v
    };
    vec![
        // 6.3.1: a surrogate inside otherwise valid text.
        ("κόσμε + U+D800 + edited", with_kosme(b"\xed\xa0\x80")),
        // Stray continuation bytes (6.12).
        ("lone 0x80", b"\x80".to_vec()),
        ("lone 0xBF", b"\xbf".to_vec()),
        ("0x80 0xBF", b"\x80\xbf".to_vec()),
        ("continuation after ASCII", b"ab\x80cd".to_vec()),
        ("all 64 continuation bytes", (0x80..=0xBFu8).collect()),
        // Lonely start bytes followed by a space (6.13).
        ("0xC0 then space", b"\xc0 ".to_vec()),
        ("0xDF then space", b"\xdf ".to_vec()),
        ("0xE0 then space", b"\xe0 ".to_vec()),
        ("0xEF then space", b"\xef ".to_vec()),
        ("0xF0 then space", b"\xf0 ".to_vec()),
        ("0xF7 then space", b"\xf7 ".to_vec()),
        // Sequences with the last continuation byte missing (6.14, 6.15).
        ("truncated 2-byte at the end", b"ab\xc2".to_vec()),
        ("truncated 3-byte at the end", b"ab\xe2\x82".to_vec()),
        ("truncated 4-byte at the end", b"ab\xf0\x9f\x98".to_vec()),
        ("truncated 3-byte in the middle", b"\xe2\x82ab".to_vec()),
        (
            "κόσμε with its last byte cut",
            KOSME[..KOSME.len() - 1].to_vec(),
        ),
        (
            "truncated sequences concatenated",
            b"\xc0\xe0\x80\xf0\x80\x80\xdf\xef\xbf\xf7\xbf\xbf".to_vec(),
        ),
        // Impossible bytes (6.16).
        ("0xFE", b"\xfe".to_vec()),
        ("0xFF", b"\xff".to_vec()),
        ("0xFE 0xFE 0xFF 0xFF", b"\xfe\xfe\xff\xff".to_vec()),
        // Overlong encodings (6.17-6.19).
        ("overlong NUL C0 80", b"\xc0\x80".to_vec()),
        ("overlong '/' C0 AF", b"\xc0\xaf".to_vec()),
        ("overlong C1 BF", b"\xc1\xbf".to_vec()),
        ("overlong NUL E0 80 80", b"\xe0\x80\x80".to_vec()),
        ("overlong '/' E0 80 AF", b"\xe0\x80\xaf".to_vec()),
        ("overlong E0 9F BF", b"\xe0\x9f\xbf".to_vec()),
        ("overlong NUL F0 80 80 80", b"\xf0\x80\x80\x80".to_vec()),
        ("overlong F0 8F BF BF", b"\xf0\x8f\xbf\xbf".to_vec()),
        ("overlong 5-byte NUL", b"\xf8\x80\x80\x80\x80".to_vec()),
        ("overlong 6-byte NUL", b"\xfc\x80\x80\x80\x80\x80".to_vec()),
        // UTF-16 surrogates, single and paired (6.20, 6.21).
        ("U+D800", b"\xed\xa0\x80".to_vec()),
        ("U+DB7F", b"\xed\xad\xbf".to_vec()),
        ("U+DB80", b"\xed\xae\x80".to_vec()),
        ("U+DBFF", b"\xed\xaf\xbf".to_vec()),
        ("U+DC00", b"\xed\xb0\x80".to_vec()),
        ("U+DF80", b"\xed\xbe\x80".to_vec()),
        ("U+DFFF", b"\xed\xbf\xbf".to_vec()),
        ("U+D800 U+DC00 pair", b"\xed\xa0\x80\xed\xb0\x80".to_vec()),
        ("U+DBFF U+DFFF pair", b"\xed\xaf\xbf\xed\xbf\xbf".to_vec()),
        // Beyond U+10FFFF, and 5- and 6-byte forms (6.8, 6.10, 6.11).
        ("U+110000 F4 90 80 80", b"\xf4\x90\x80\x80".to_vec()),
        ("F5 80 80 80", b"\xf5\x80\x80\x80".to_vec()),
        ("F7 BF BF BF", b"\xf7\xbf\xbf\xbf".to_vec()),
        ("5-byte F8 88 80 80 80", b"\xf8\x88\x80\x80\x80".to_vec()),
        (
            "6-byte FC 84 80 80 80 80",
            b"\xfc\x84\x80\x80\x80\x80".to_vec(),
        ),
        (
            "6-byte FD BF BF BF BF BF",
            b"\xfd\xbf\xbf\xbf\xbf\xbf".to_vec(),
        ),
    ]
}

#[test]
fn the_tables_are_what_they_claim() {
    for (name, bytes) in valid_texts() {
        assert!(std::str::from_utf8(&bytes).is_ok(), "{name}");
    }
    for (name, bytes) in invalid_texts() {
        assert!(std::str::from_utf8(&bytes).is_err(), "{name}");
    }
}

/// Autobahn 6.1, 6.2, 6.5-6.7, 6.9, 6.11, 6.22, 6.23: valid UTF-8 in one
/// frame, in fragments of one byte (6.2.3, 6.6.x), and cut into two
/// fragments at every byte position, is echoed unchanged.
#[tokio::test]
async fn valid_utf8_is_echoed_however_it_is_fragmented() {
    let server = TestServer::start().await;
    let mut ws = echo(&server).await;
    for (_, text) in valid_texts() {
        ws.send(&masked(FIN | TEXT, &text)).await;
        ws.expect_frame(TEXT, &text).await;
        if text.len() <= 64 {
            ws.send(&fragments(TEXT, &text, 1)).await;
            ws.expect_frame(TEXT, &text).await;
            for cut in 0..=text.len() {
                let mut wire = masked(TEXT, &text[..cut]);
                wire.extend(masked(FIN | CONT, &text[cut..]));
                ws.send(&wire).await;
                ws.expect_frame(TEXT, &text).await;
            }
        } else {
            ws.send(&fragments(TEXT, &text, 3)).await;
            ws.expect_frame(TEXT, &text).await;
        }
    }
    ws.close_normally().await;
}

/// A multi-byte character split across fragment boundaries, with a ping in
/// the middle of the character, is accepted (RFC 6455 §5.6: only the whole
/// message must be valid).
#[tokio::test]
async fn a_character_split_across_fragments_and_pings_is_accepted() {
    let server = TestServer::start().await;
    let mut ws = echo(&server).await;
    let text = "U+10FFFF:\u{10FFFF}, κόσμε".as_bytes();
    let at = 9; // the first byte of U+10FFFF
    let mut wire = masked(TEXT, &text[..at + 1]);
    wire.extend(masked(FIN | PING, b"mid-character"));
    wire.extend(masked(CONT, &text[at + 1..at + 2]));
    wire.extend(masked(CONT, &text[at + 2..at + 3]));
    wire.extend(masked(FIN | PONG, b""));
    wire.extend(masked(FIN | CONT, &text[at + 3..]));
    ws.send_in_chunks(&wire, 5, Duration::from_millis(1)).await;
    ws.expect_frame(PONG, b"mid-character").await;
    ws.expect_frame(TEXT, text).await;
    ws.close_normally().await;
}

/// Autobahn 6.3-6.21: each invalid sequence in a single text frame fails
/// the connection with 1007; nothing is echoed.
#[tokio::test]
async fn invalid_utf8_in_a_single_frame_is_closed_with_1007() {
    let server = TestServer::start().await;
    for (name, bytes) in invalid_texts() {
        let mut ws = echo(&server).await;
        ws.send(&masked(FIN | TEXT, &bytes)).await;
        let (code, reason) = ws.expect_close_frame().await;
        assert_eq!(code, 1007, "{name}: {reason}");
    }
}

/// Autobahn 6.3.2: invalid UTF-8 sent in fragments of one byte each (the
/// frames end inside characters) fails with 1007.
#[tokio::test]
async fn invalid_utf8_in_one_byte_fragments_is_closed_with_1007() {
    let server = TestServer::start().await;
    for (name, bytes) in invalid_texts() {
        let mut ws = echo(&server).await;
        ws.send(&fragments(TEXT, &bytes, 1)).await;
        let (code, reason) = ws.expect_close_frame().await;
        assert_eq!(code, 1007, "{name}: {reason}");
    }
}

/// The same bytes as binary are not text: echoed unchanged.
#[tokio::test]
async fn invalid_utf8_in_a_binary_message_is_echoed() {
    let server = TestServer::start().await;
    let mut ws = echo(&server).await;
    for (_, bytes) in invalid_texts() {
        ws.send(&masked(FIN | BINARY, &bytes)).await;
        ws.expect_frame(BINARY, &bytes).await;
    }
    ws.close_normally().await;
}

/// Fail fast (RFC 6455 §8.1, Autobahn 6.4.1 and 6.4.2): when a fragment
/// already makes the text invalid, the server closes with 1007 at once,
/// without waiting for the rest of the message — which is never sent here.
#[tokio::test]
async fn the_first_invalid_fragment_is_closed_with_1007_at_once() {
    let server = TestServer::start().await;
    let cases: &[(&str, &[&[u8]])] = &[
        // The first fragment alone is invalid.
        ("stray byte in fragment 1", &[b"ab\xffcd"]),
        ("surrogate in fragment 1", &[b"ok \xed\xa0\x80 more"]),
        ("overlong in fragment 1", &[b"\xc0\x80"]),
        // Fragment 1 ends in a prefix no continuation can make valid.
        ("fragment 1 ends in ED A0 (surrogate)", &[b"ab\xed\xa0"]),
        ("fragment 1 ends in F4 90 (> U+10FFFF)", &[b"ab\xf4\x90"]),
        ("fragment 1 ends in E0 80 (overlong)", &[b"ab\xe0\x80"]),
        ("fragment 1 ends in C0", &[b"ab\xc0"]),
        ("fragment 1 ends in F5", &[b"ab\xf5"]),
        // 6.4.1: valid, then a fragment with U+110000; the third never comes.
        ("6.4.1", &[KOSME, b"\xf4\x90\x80\x80"]),
        // 6.4.2: κόσμε + F4, then 90: invalid at the second fragment.
        (
            "6.4.2",
            &[b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xf4", b"\x90"],
        ),
        // A bad byte right after a character completed across fragments.
        (
            "bad byte after a split character",
            &[b"a\xe2\x82", b"\xac\xff"],
        ),
    ];
    for (name, pieces) in cases {
        let mut ws = echo(&server).await;
        for (i, piece) in pieces.iter().enumerate() {
            let op = if i == 0 { TEXT } else { CONT };
            ws.send(&masked(op, piece)).await; // never FIN
            if i + 1 < pieces.len() {
                // The valid prefix is accepted: nothing comes back yet.
                ws.expect_silence(Duration::from_millis(50)).await;
            }
        }
        let (code, reason) = ws.expect_close_frame().await;
        assert_eq!(code, 1007, "{name}: {reason}");
    }
}

/// A character left unfinished by the final fragment (an empty one, or one
/// with only ASCII after a truncated sequence) makes the message invalid.
#[tokio::test]
async fn a_character_unfinished_at_the_end_of_the_message_is_closed_with_1007() {
    let server = TestServer::start().await;
    for pieces in [
        &[&b"a\xe2\x82"[..], b""][..],
        &[b"a\xf0", b"\x9f", b"\x98"],
        &[b"a\xe2\x82", b"b"],
    ] {
        let mut ws = echo(&server).await;
        for (i, piece) in pieces.iter().enumerate() {
            let op = if i == 0 { TEXT } else { CONT };
            let fin = if i + 1 == pieces.len() { FIN } else { 0 };
            ws.send(&masked(fin | op, piece)).await;
        }
        let (code, reason) = ws.expect_close_frame().await;
        assert_eq!(code, 1007, "{pieces:?}: {reason}");
    }
}

/// Autobahn 6.4.3 and 6.4.4: one frame whose bytes arrive in three chunks,
/// the second holding the invalid sequence: 1007 comes after the second
/// chunk, before the third is sent (Autobahn's "strict" result).
#[tokio::test]
async fn invalid_utf8_in_a_frame_arriving_in_chunks_is_closed_with_1007() {
    let server = TestServer::start().await;
    for bad in [&b"\xf4\x90\x80\x80"[..], b"\xf4\x90"] {
        let mut message = KOSME.to_vec();
        let first = message.len();
        message.extend_from_slice(bad);
        let second = message.len();
        message.extend_from_slice(b"\x80\x80edited");
        let wire = masked(FIN | TEXT, &message);
        let header = wire.len() - message.len();
        let mut ws = echo(&server).await;
        ws.no_delay();
        ws.send(&wire[..header + first]).await;
        ws.expect_silence(Duration::from_millis(50)).await;
        ws.send(&wire[header + first..header + second]).await;
        let (code, reason) = ws.expect_close_frame().await;
        assert_eq!(code, 1007, "{bad:?}: {reason}");
    }
}

/// A case of a frame cut short: its name, the fragments sent whole before
/// it, the frame's first header byte, and the part of its payload sent.
type Cut = (&'static str, &'static [&'static [u8]], u8, &'static [u8]);

/// Fail fast inside a frame: a frame header announces more bytes than are
/// sent, and the bytes sent hold invalid UTF-8. The server closes with 1007
/// from what it has; the rest of the frame is never sent.
#[tokio::test]
async fn invalid_utf8_is_closed_with_1007_before_the_rest_of_its_frame_arrives() {
    let server = TestServer::start().await;
    // The tail that would follow; never sent.
    let tail = vec![b'x'; 2000];
    let cases: &[Cut] = &[
        (
            "6.4.3: U+110000 in one frame",
            &[],
            FIN | TEXT,
            b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xf4\x90\x80\x80",
        ),
        (
            "6.4.4: F4 90 at the end of what came",
            &[],
            FIN | TEXT,
            b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xf4\x90",
        ),
        ("a stray byte", &[], FIN | TEXT, b"ab\xffcd"),
        (
            "a surrogate cut after two bytes",
            &[],
            FIN | TEXT,
            b"ab\xed\xa0",
        ),
        ("a non-final first fragment", &[], TEXT, b"ab\xc0\x80"),
        ("a continuation", &[b"valid "], CONT, b"then \xff"),
        (
            "a continuation finishing a split character badly",
            &[b"a\xe2\x82"],
            CONT | FIN,
            b"\x41",
        ),
        (
            "a bad byte after a character split across fragments",
            &[b"a\xe2\x82"],
            CONT | FIN,
            b"\xac\xff",
        ),
        // Past the first 4 KiB the server checks, with a character split there.
        (
            "invalid after 5,000 valid bytes",
            &[],
            FIN | TEXT,
            &LONG_THEN_INVALID,
        ),
    ];
    for (name, before, first, sent) in cases {
        let mut ws = echo(&server).await;
        ws.no_delay();
        for (i, fragment) in before.iter().enumerate() {
            let op = if i == 0 { TEXT } else { CONT };
            ws.send(&masked(op, fragment)).await;
        }
        let mut payload = sent.to_vec();
        payload.extend_from_slice(&tail);
        let wire = masked(*first, &payload);
        let header = wire.len() - payload.len();
        ws.send(&wire[..header + sent.len()]).await;
        let (code, reason) = ws.expect_close_frame().await;
        assert_eq!(code, 1007, "{name}: {reason}");
    }
}

/// 2,000 three-byte characters, then a stray byte.
const LONG_THEN_INVALID: [u8; 6_001] = {
    let mut bytes = [0u8; 6_001];
    let mut i = 0;
    while i < 6_000 {
        bytes[i] = 0xE2;
        bytes[i + 1] = 0x82;
        bytes[i + 2] = 0xAC;
        i += 3;
    }
    bytes[6_000] = 0xFF;
    bytes
};

/// The same with valid text, cut anywhere — inside a character too — and
/// the rest sent after a pause: nothing is refused early, and the message
/// is echoed whole.
#[tokio::test]
async fn a_valid_frame_arriving_in_pieces_is_not_refused_early() {
    let server = TestServer::start().await;
    let mut message = Vec::new();
    for _ in 0..1500 {
        message.extend_from_slice(KOSME);
        message.extend_from_slice("\u{10348}".as_bytes());
    }
    let mut ws = echo(&server).await;
    ws.no_delay();
    for cut in [1, 2, 4_095, 4_097, 13_001] {
        for (first, fragments) in [(TEXT, 1), (TEXT, 2)] {
            let wire = if fragments == 1 {
                masked(FIN | first, &message)
            } else {
                let (a, b) = message.split_at(cut);
                let mut wire = masked(first, a);
                wire.extend(masked(FIN | CONT, b));
                wire
            };
            let at = cut.min(wire.len() - 1);
            ws.send(&wire[..at]).await;
            ws.expect_silence(Duration::from_millis(30)).await;
            ws.send(&wire[at..]).await;
            ws.expect_frame(TEXT, &message).await;
        }
    }
    ws.close_normally().await;
}
