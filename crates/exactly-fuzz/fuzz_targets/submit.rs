//! Arbitrary bytes as a public Submit request: prost decoding, then every check a job meets at
//! a node's edge (`job_from_pb`: limits, known kinds, times, names, keys, labels) must refuse or
//! accept, never panic; an accepted job passes the state machine's own validation too.
#![no_main]

use std::sync::OnceLock;

use exactly_node::api::convert::job_from_pb;
use exactly_node::NodeConfig;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fn setup() -> &'static (NodeConfig, exactly_handlers::Registry) {
    static SETUP: OnceLock<(NodeConfig, exactly_handlers::Registry)> = OnceLock::new();
    SETUP.get_or_init(|| {
        (
            NodeConfig::default(),
            exactly_handlers::Registry::with_builtins(),
        )
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(request) = exactly_proto::v1::SubmitRequest::decode(data) else {
        return;
    };
    let (config, registry) = setup();
    for (i, spec) in request.jobs.into_iter().enumerate() {
        if let Ok(job) = job_from_pb(
            config,
            registry,
            1_700_000_000_000,
            &format!("jobs[{i}]"),
            spec,
        ) {
            assert!(exactly_core::state::validate_new_job(&job).is_ok());
        }
    }
});
