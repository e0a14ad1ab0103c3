//! Fuzz target: switchboard::fuzzing::handshake.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    switchboard::fuzzing::handshake(data);
});
