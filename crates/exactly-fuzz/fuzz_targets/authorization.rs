//! Arbitrary bytes as the `authorization` header of a public call, against a node with tokens:
//! the decision (Bearer or Basic, digest lookup, scope) must refuse or admit, never panic, and
//! admit only the configured token or the issued one (an issued `read` token).
#![no_main]

use std::sync::OnceLock;

use exactly_node::auth::{IssuedSet, Need, Tokens};
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

fn issued() -> &'static IssuedSet {
    static ISSUED: OnceLock<IssuedSet> = OnceLock::new();
    ISSUED.get_or_init(|| {
        let token = exactly_core::access::IssuedToken {
            name: "issued".into(),
            sha256: exactly_client::token::digest("exa_fuzz_issued"),
            scopes: vec![exactly_core::access::Scope::Read],
            issued_at_ms: 1,
            issued_by: "root".into(),
            expires_at_ms: Some(2_000_000_000_000),
        };
        IssuedSet::from_state(&[("issued".to_string(), token)].into_iter().collect())
    })
}

fuzz_target!(|data: &[u8]| {
    for need in [
        Need::Open,
        Need::Submit,
        Need::Read,
        Need::Operate,
        Need::Admin,
    ] {
        if let Ok(Some(credential)) = tokens().admit(issued(), 1_000, Some(data), None, need) {
            assert!(credential.name == "fuzz" || credential.name == "issued");
            assert!(need != Need::Operate && need != Need::Admin);
            assert!(credential.name == "fuzz" || need != Need::Submit);
        }
    }
});
