//! Bearer tokens for the public API. A token is `exa_` and 64 hex digits (32 random bytes); a
//! node keeps only its SHA-256 digest (`[[tokens]] sha256 = "…"`), so its configuration file
//! reveals no token. `exactly token new` makes one; a client sends it as
//! `authorization: Bearer <token>` ([`crate::ClientOptions::token`]).

use sha2::{Digest, Sha256};

/// What every token starts with (so a leaked one is easy to recognise and search for).
pub const PREFIX: &str = "exa_";

/// A new random token.
pub fn generate() -> String {
    let bytes: [u8; 32] = rand::random();
    let mut token = String::with_capacity(PREFIX.len() + 64);
    token.push_str(PREFIX);
    for b in bytes {
        token.push_str(&format!("{b:02x}"));
    }
    token
}

/// The SHA-256 digest of a token, as a node stores and compares it.
pub fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// [`digest`] as 64 lowercase hex digits, as `[[tokens]] sha256` takes it.
pub fn digest_hex(token: &str) -> String {
    digest(token).iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses 64 hex digits into a digest.
pub fn parse_digest_hex(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_prefixed_and_their_digests_round_trip() {
        let (a, b) = (generate(), generate());
        assert_ne!(a, b);
        assert!(a.starts_with(PREFIX) && a.len() == PREFIX.len() + 64);
        assert_eq!(parse_digest_hex(&digest_hex(&a)), Some(digest(&a)));
        // The digest of the empty string, from any sha256sum.
        assert_eq!(
            digest_hex(""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(parse_digest_hex("00"), None);
        assert_eq!(parse_digest_hex(&"g".repeat(64)), None);
        assert_eq!(parse_digest_hex(&"é".repeat(32)), None);
    }
}
