//! Who may do what: the scopes of a credential and the rules for a token's name, shared by the
//! node's authorization layer and apply (which keeps the tokens issued through the API).
//!
//! Scopes: `submit` (Submit, any queue) or `submit:<queue>` (that queue only), `read` (Get,
//! List, Watch, dead letters, queues, schedules, status), `operate` (`read`, and Cancel,
//! Redrive, queue changes, schedule pause, Drain) and `admin` (everything: membership, Purge,
//! schedules, tokens).

use serde::{Deserialize, Serialize};

use crate::limits::{QUEUE_NAME_BYTES_MAX, TOKEN_NAME_BYTES_MAX, TOKEN_SCOPES_MAX};

/// One scope of a credential.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Scope {
    /// Submit to every queue (`None`) or to one.
    Submit(Option<String>),
    Read,
    Operate,
    Admin,
}

impl std::str::FromStr for Scope {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "submit" => Ok(Scope::Submit(None)),
            "read" => Ok(Scope::Read),
            "operate" => Ok(Scope::Operate),
            "admin" => Ok(Scope::Admin),
            other => match other.strip_prefix("submit:") {
                Some(queue) => {
                    check_scope_queue(queue).map_err(|why| format!("{other:?}: {why}"))?;
                    Ok(Scope::Submit(Some(queue.to_string())))
                }
                None => Err(format!(
                    "{other:?}: scopes are submit, submit:<queue>, read, operate and admin"
                )),
            },
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scope::Submit(None) => f.write_str("submit"),
            Scope::Submit(Some(queue)) => write!(f, "submit:{queue}"),
            Scope::Read => f.write_str("read"),
            Scope::Operate => f.write_str("operate"),
            Scope::Admin => f.write_str("admin"),
        }
    }
}

fn check_scope_queue(queue: &str) -> Result<(), String> {
    if queue.is_empty() || queue.len() > QUEUE_NAME_BYTES_MAX || queue.chars().any(char::is_control)
    {
        return Err(format!(
            "a queue name is 1..={QUEUE_NAME_BYTES_MAX} bytes without control characters"
        ));
    }
    Ok(())
}

impl Scope {
    /// Whether a scope read back from the log is one a request could have named (apply checks
    /// what it keeps; a `Submit(Some(""))` cannot come from [`str::parse`]).
    pub fn check(&self) -> Result<(), String> {
        match self {
            Scope::Submit(Some(queue)) => check_scope_queue(queue),
            _ => Ok(()),
        }
    }
}

/// Checks a credential's name: 1..=[`TOKEN_NAME_BYTES_MAX`] printable ASCII characters without
/// spaces (it appears in logs, refusals and the audit trail).
pub fn check_token_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > TOKEN_NAME_BYTES_MAX
        || !name.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(format!(
            "a token's name must be 1..={TOKEN_NAME_BYTES_MAX} printable ASCII characters \
             without spaces"
        ));
    }
    Ok(())
}

/// Checks a token's scope list: 1..=[`TOKEN_SCOPES_MAX`] valid scopes.
pub fn check_scopes(scopes: &[Scope]) -> Result<(), String> {
    if scopes.is_empty() || scopes.len() > TOKEN_SCOPES_MAX {
        return Err(format!(
            "a token needs 1..={TOKEN_SCOPES_MAX} scopes, not {}",
            scopes.len()
        ));
    }
    scopes.iter().try_for_each(Scope::check)
}

/// A bearer token issued through the API and kept in the replicated state: every node admits it
/// as soon as it has applied the entry, and none once it applied the revocation. Only the
/// SHA-256 digest of the token is kept; the token itself never reaches the cluster's log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedToken {
    pub name: String,
    pub sha256: [u8; 32],
    pub scopes: Vec<Scope>,
    /// Leader time of the entry that issued it.
    pub issued_at_ms: u64,
    /// The credential that issued it.
    pub issued_by: String,
    /// Wall-clock time (ms since the Unix epoch) after which nodes refuse it; `None`: never.
    pub expires_at_ms: Option<u64>,
}

/// A request to issue a token (see [`crate::Command::IssueToken`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenGrant {
    pub name: String,
    pub sha256: [u8; 32],
    pub scopes: Vec<Scope>,
    pub expires_at_ms: Option<u64>,
}

impl TokenGrant {
    /// Everything apply and the API edge both refuse.
    pub fn check(&self) -> Result<(), String> {
        check_token_name(&self.name)?;
        check_scopes(&self.scopes)?;
        if self.sha256 == [0; 32] {
            return Err("a token's SHA-256 digest cannot be all zeros".into());
        }
        Ok(())
    }
}

/// Scopes in words: `submit:emails, read`.
pub fn scopes_text(scopes: &[Scope]) -> String {
    scopes
        .iter()
        .map(Scope::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_parse_and_print_back() {
        for text in ["submit", "submit:emails", "read", "operate", "admin"] {
            let scope: Scope = text.parse().unwrap();
            assert_eq!(scope.to_string(), text);
            assert_eq!(scope.check(), Ok(()));
        }
        for bad in ["", "root", "submit:", "submit:\u{1b}[2J", "Read"] {
            assert!(bad.parse::<Scope>().is_err(), "{bad:?} was accepted");
        }
        let long = format!("submit:{}", "q".repeat(QUEUE_NAME_BYTES_MAX + 1));
        assert!(long.parse::<Scope>().is_err());
        assert!(Scope::Submit(Some(String::new())).check().is_err());
    }

    #[test]
    fn grants_are_checked_whole() {
        let grant = TokenGrant {
            name: "ci".into(),
            sha256: [7; 32],
            scopes: vec![Scope::Read],
            expires_at_ms: None,
        };
        assert_eq!(grant.check(), Ok(()));
        let with = |f: &dyn Fn(&mut TokenGrant)| {
            let mut g = grant.clone();
            f(&mut g);
            g.check()
        };
        assert!(with(&|g| g.name = String::new()).is_err());
        assert!(with(&|g| g.name = "has space".into()).is_err());
        assert!(with(&|g| g.name = "x".repeat(TOKEN_NAME_BYTES_MAX + 1)).is_err());
        assert!(with(&|g| g.scopes.clear()).is_err());
        assert!(with(&|g| g.scopes = vec![Scope::Read; TOKEN_SCOPES_MAX + 1]).is_err());
        assert!(with(&|g| g.sha256 = [0; 32]).is_err());
        assert_eq!(
            scopes_text(&[Scope::Submit(Some("emails".into())), Scope::Read]),
            "submit:emails, read"
        );
    }
}
