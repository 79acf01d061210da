//! Arbitrary bytes as a snapshot received from a peer: `check_snapshot` (what a node runs
//! before openraft sees a snapshot) must refuse or accept, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use exactly_store::raft_types::{log_id, SnapshotMeta, StoredMembership};

fuzz_target!(|data: &[u8]| {
    let meta: SnapshotMeta = SnapshotMeta {
        last_log_id: Some(log_id(1, 1, 10)),
        last_membership: StoredMembership::default(),
    };
    let _ = exactly_store::check_snapshot(&meta, data);
});
