//! Arbitrary entries applied to the state machine: the bytes are read as a sequence of
//! postcard-encoded `Request`s (what a log entry carries), each applied at the next index to one
//! table, whose invariants must hold after every one. Apply must never panic, whatever a
//! leader committed.
#![no_main]

use exactly_core::{JobTable, Request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut table = JobTable::new();
    let mut rest = data;
    let mut index = 0u64;
    while let Ok((request, tail)) = postcard::take_from_bytes::<Request>(rest) {
        index += 1;
        let _ = table.apply(index, request);
        if let Err(broken) = table.check_invariants() {
            panic!("invariant broken after entry {index}: {broken}");
        }
        if tail.len() == rest.len() {
            break;
        }
        rest = tail;
    }
});
