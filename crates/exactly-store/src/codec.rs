//! Persisted formats. Every value written by this crate starts with a format version byte, so a
//! later release can read old data or refuse it with a clear error instead of misreading it.
//!
//! - Structured values (log entries, vote, log ids, node id, incarnation, snapshot metadata and
//!   the snapshot body) are `[FORMAT][postcard]`. postcard round-trips every openraft 0.9.25
//!   type we store (the openraft storage suite checks it: openraft's types use no
//!   `skip_serializing_if`, `flatten` or untagged enums outside its compat module).
//! - Payloads are `[FORMAT][raw bytes]`: they are opaque, and skipping serde keeps them cheap.
//! - Keys that are indexes or job ids are big-endian `u64`, so sled's byte order is numeric order.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, Result};

/// The version of every persisted value. postcard is not self-describing, so any change to a
/// stored type is a new version:
/// - 1: the first.
/// - 2: `NodeEntry::renewed_index` and `Command::Expire(Expiry)` (an expiry names the renewal it
///   counted from). Data of version 1 is refused ("unknown format version 1"): there is no
///   migration before the formats are versioned per type (issue 14).
/// - 3: `Command::Audited`, `Response::Refused` and the audit trail in `JobTable`. Data of
///   versions 1 and 2 is refused the same way.
/// - 4: `Command::IssueToken`, `RevokeToken` and `Joined`, `Response::TokenChanged`, new
///   rejections, and the issued tokens in `JobTable`. Data of versions 1 to 3 is refused.
pub(crate) const FORMAT: u8 = 4;

/// Encodes `value` as `[FORMAT][postcard]`.
pub(crate) fn encode<T: Serialize + ?Sized>(what: &'static str, value: &T) -> Result<Vec<u8>> {
    postcard::to_extend(value, vec![FORMAT]).map_err(|e| Error::Encode {
        what,
        detail: e.to_string(),
    })
}

/// Returns the body of a versioned value, refusing unknown versions.
pub(crate) fn versioned_body<'a>(what: &'static str, bytes: &'a [u8]) -> Result<&'a [u8]> {
    match bytes.split_first() {
        Some((&FORMAT, body)) => Ok(body),
        Some((version, _)) => Err(Error::corrupt(
            what,
            format!("unknown format version {version}"),
        )),
        None => Err(Error::corrupt(what, "empty value")),
    }
}

/// Decodes a value written by [`encode`]. Trailing bytes are corruption, not ignored.
pub(crate) fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T> {
    let body = versioned_body(what, bytes)?;
    let (value, rest) = postcard::take_from_bytes(body).map_err(|e| Error::corrupt(what, e))?;
    if !rest.is_empty() {
        return Err(Error::corrupt(
            what,
            format!("{} trailing bytes", rest.len()),
        ));
    }
    Ok(value)
}

/// Frames raw bytes as `[FORMAT][bytes]`.
pub(crate) fn encode_raw(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + 1);
    out.push(FORMAT);
    out.extend_from_slice(bytes);
    out
}

/// The key of a log index or a job id.
pub(crate) fn u64_key(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

/// Reads a key written by [`u64_key`].
pub(crate) fn key_u64(what: &'static str, key: &[u8]) -> Result<u64> {
    <[u8; 8]>::try_from(key)
        .map(u64::from_be_bytes)
        .map_err(|_| Error::corrupt(what, format!("key of {} bytes, expected 8", key.len())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A value round-trips, and a wrong version, an empty value and trailing bytes are refused.
    #[test]
    fn versioned_values_round_trip_and_refuse_garbage() {
        let bytes = encode("test", &(7u64, "x".to_string())).unwrap();
        assert_eq!(bytes[0], FORMAT);
        let back: (u64, String) = decode("test", &bytes).unwrap();
        assert_eq!(back, (7, "x".to_string()));

        for version in [1, 99] {
            // 1: written before `NodeEntry::renewed_index`; refused, never misread.
            let mut wrong = bytes.clone();
            wrong[0] = version;
            let err = decode::<(u64, String)>("test", &wrong).unwrap_err();
            assert!(err.is_corruption());
            assert!(err
                .to_string()
                .contains(&format!("unknown format version {version}")));
        }
        assert!(decode::<u64>("test", &[]).unwrap_err().is_corruption());
        let mut long = bytes;
        long.push(0);
        assert!(decode::<(u64, String)>("test", &long)
            .unwrap_err()
            .is_corruption());
        assert_eq!(key_u64("k", &u64_key(42)).unwrap(), 42);
        assert!(key_u64("k", &[1, 2]).is_err());
    }
}
