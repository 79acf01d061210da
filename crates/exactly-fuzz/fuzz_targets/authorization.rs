//! Arbitrary bytes as the `authorization` header of a public call, against a node with tokens:
//! the decision (Bearer or Basic, digest lookup, scope) must refuse or admit, never panic, and
//! admit only the configured token.
#![no_main]

use std::sync::OnceLock;

use exactly_node::auth::{Need, Tokens};
use exactly_node::config::TokenConfig;
use libfuzzer_sys::fuzz_target;

const SECRET: &str = "exa_fuzz";

fn tokens() -> &'static Tokens {
    static TOKENS: OnceLock<Tokens> = OnceLock::new();
    TOKENS.get_or_init(|| {
        Tokens::from_config(&[TokenConfig {
            name: "fuzz".into(),
            sha256: exactly_client::token::digest_hex(SECRET),
            scopes: vec!["read".into(), "submit:q".into()],
        }])
        .expect("a valid token")
    })
}

fuzz_target!(|data: &[u8]| {
    for need in [Need::Open, Need::Submit, Need::Read, Need::Operate, Need::Admin] {
        if let Ok(Some(credential)) = tokens().admit(Some(data), need) {
            assert_eq!(credential.name, "fuzz");
            assert!(need != Need::Operate && need != Need::Admin);
        }
    }
});
