//! Tokens issued and revoked through the API ([`Command::IssueToken`],
//! [`Command::RevokeToken`]), and the record of a node's admission ([`Command::Joined`]). All
//! three are applied only inside [`Command::Audited`], which names who asked.
//!
//! [`Command::IssueToken`]: crate::Command::IssueToken
//! [`Command::RevokeToken`]: crate::Command::RevokeToken
//! [`Command::Joined`]: crate::Command::Joined
//! [`Command::Audited`]: crate::Command::Audited

use super::JobTable;
use crate::access::{IssuedToken, TokenGrant};
use crate::command::{Effect, Rejection, Response};
use crate::limits::ISSUED_TOKENS_MAX;
use crate::records::Records;

impl<R: Records> JobTable<R> {
    /// Issues a token: refused whole if the grant is malformed, its name or digest is taken,
    /// it expired already (by the entry's leader time), or the cluster keeps the most it may.
    pub(super) fn issue_token(
        &mut self,
        grant: TokenGrant,
        by: &str,
        effects: &mut Vec<Effect>,
    ) -> Response {
        let result = self.try_issue_token(grant, by);
        if result.is_ok() {
            effects.push(Effect::TokensChanged);
        }
        Response::TokenChanged(result)
    }

    fn try_issue_token(&mut self, grant: TokenGrant, by: &str) -> Result<(), Rejection> {
        grant.check().map_err(Rejection::Invalid)?;
        if let Some(at) = grant.expires_at_ms {
            if at <= self.now_ms {
                return Err(Rejection::Invalid(format!(
                    "the token would expire at {at} ms, which is past (now {} ms)",
                    self.now_ms
                )));
            }
        }
        if self.tokens.contains_key(&grant.name) {
            return Err(Rejection::TokenExists(grant.name));
        }
        if self.tokens.values().any(|t| t.sha256 == grant.sha256) {
            return Err(Rejection::TokenDigestInUse);
        }
        if self.tokens.len() >= ISSUED_TOKENS_MAX {
            return Err(Rejection::TooManyTokens(ISSUED_TOKENS_MAX));
        }
        let TokenGrant {
            name,
            sha256,
            scopes,
            expires_at_ms,
        } = grant;
        self.tokens.insert(
            name.clone(),
            IssuedToken {
                name,
                sha256,
                scopes,
                issued_at_ms: self.now_ms,
                issued_by: by.to_string(),
                expires_at_ms,
            },
        );
        Ok(())
    }

    /// Revokes a token issued through the API.
    pub(super) fn revoke_token(&mut self, name: &str, effects: &mut Vec<Effect>) -> Response {
        Response::TokenChanged(match self.tokens.remove(name) {
            Some(_) => {
                effects.push(Effect::TokensChanged);
                Ok(())
            }
            None => Err(Rejection::UnknownToken(name.to_string())),
        })
    }

    /// The tokens issued through the API and not revoked (expired ones included), by name.
    pub fn issued_tokens(&self) -> &std::collections::BTreeMap<String, IssuedToken> {
        &self.tokens
    }

    /// The issued tokens' invariants: bounded, keyed by their names, valid, distinct digests.
    pub(super) fn check_tokens(&self) -> Result<(), String> {
        if self.tokens.len() > ISSUED_TOKENS_MAX {
            return Err(format!("{} issued tokens", self.tokens.len()));
        }
        let mut digests = std::collections::BTreeSet::new();
        for (name, token) in &self.tokens {
            if *name != token.name {
                return Err(format!("token {:?} kept under {name:?}", token.name));
            }
            crate::access::check_token_name(name)
                .map_err(|why| format!("token {name:?}: {why}"))?;
            crate::access::check_scopes(&token.scopes)
                .map_err(|why| format!("token {name:?}: {why}"))?;
            if !digests.insert(token.sha256) {
                return Err(format!("token {name:?} shares its digest"));
            }
        }
        Ok(())
    }
}
