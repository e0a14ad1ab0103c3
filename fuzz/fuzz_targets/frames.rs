//! Fuzz target: switchboard::fuzzing::frames.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    switchboard::fuzzing::frames(data);
});
