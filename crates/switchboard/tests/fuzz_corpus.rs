//! Replays the fuzzers' seed corpus (`fuzz/corpus/`) through the same entry
//! points on stable Rust, so every `cargo test` checks that none of the
//! known-interesting inputs panics. Coverage-guided runs: `fuzz/` and
//! docs/conformance.md.

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let mut count = 0;
    for entry in entries {
        let path = entry.expect("corpus entry").path();
        let data = std::fs::read(&path).expect("corpus file");
        run(&data);
        // Every prefix too: truncated input is the most common real case.
        for cut in (0..data.len()).step_by(data.len() / 64 + 1) {
            run(&data[..cut]);
        }
        count += 1;
    }
    assert!(
        count >= 5,
        "{target}: only {count} seed files in {}",
        dir.display()
    );
}

#[test]
fn frames_corpus() {
    replay("frames", switchboard::fuzzing::frames);
}

#[test]
fn relay_corpus() {
    replay("relay", switchboard::fuzzing::relay);
}

#[test]
fn handshake_corpus() {
    replay("handshake", switchboard::fuzzing::handshake);
}
