//! Fuzz target: switchboard::fuzzing::relay.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    switchboard::fuzzing::relay(data);
});
