//! Arbitrary text as a node's configuration file: parsing and validation (every key, the
//! tokens, the exposure check) must refuse with an error or accept, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = exactly_node::NodeConfig::from_toml(text) {
        let _ = config.validate();
    }
});
