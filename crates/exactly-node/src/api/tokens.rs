//! The Tokens service: bearer tokens issued, revoked and listed through the API (see
//! `exactly_core::access` and `auth.rs`). The edge checks what only this node knows (whether it
//! has authentication on, the names and digests of its configured tokens); apply checks the
//! rest, against the tokens the cluster issued.

use std::sync::Arc;

use exactly_core::access::{IssuedToken, Scope, TokenGrant};
use exactly_core::Proposal;
use exactly_proto::v1 as pb;
use exactly_proto::v1::tokens_server::Tokens;
use tonic::{Request, Response, Status};

use super::consistency::{before_read, stamped};
use super::status_of;
use crate::auth::TokenSet;
use crate::node::Node;

pub struct TokensService {
    pub node: Node,
    pub tokens: Arc<TokenSet>,
}

fn info_of(t: &IssuedToken) -> pb::TokenInfo {
    pb::TokenInfo {
        name: t.name.clone(),
        scopes: t.scopes.iter().map(Scope::to_string).collect(),
        issued_at_ms: t.issued_at_ms,
        issued_by: t.issued_by.clone(),
        expires_at_ms: t.expires_at_ms.unwrap_or(0),
        source: "api".into(),
    }
}

/// The grant a request asks for, checked as apply will check it, plus what only this node knows.
pub(crate) fn grant_of(
    request: pb::IssueTokenRequest,
    configured: &crate::auth::Tokens,
    now_ms: u64,
) -> Result<TokenGrant, Status> {
    if !configured.enabled() {
        return Err(Status::failed_precondition(
            "this node has no [[tokens]] in its configuration, so it admits every caller and \
             issued tokens would mean nothing: configure an admin token first (see README, \
             Security)",
        ));
    }
    let sha256: [u8; 32] = request.sha256.as_slice().try_into().map_err(|_| {
        Status::invalid_argument(format!(
            "sha256 must be the 32 bytes of the token's SHA-256 digest, not {} bytes",
            request.sha256.len()
        ))
    })?;
    let scopes = request
        .scopes
        .iter()
        .map(|s| s.parse::<Scope>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|why| Status::invalid_argument(format!("scope {why}")))?;
    let expires_at_ms = match request.expires_at_ms {
        0 => None,
        at if at <= now_ms => {
            return Err(Status::invalid_argument(format!(
                "expires_at_ms {at} is past (now {now_ms})"
            )))
        }
        at => Some(at),
    };
    let grant = TokenGrant {
        name: request.name,
        sha256,
        scopes,
        expires_at_ms,
    };
    grant.check().map_err(Status::invalid_argument)?;
    if configured.named(&grant.name).is_some() {
        return Err(Status::already_exists(format!(
            "a configured token is named {:?}",
            grant.name
        )));
    }
    if configured.has_digest(&grant.sha256) {
        return Err(Status::already_exists(
            "a configured token has the same secret",
        ));
    }
    Ok(grant)
}

#[tonic::async_trait]
impl Tokens for TokensService {
    async fn issue(
        &self,
        request: Request<pb::IssueTokenRequest>,
    ) -> Result<Response<pb::TokenInfo>, Status> {
        let by = crate::auth::actor(&request);
        let grant = grant_of(
            request.into_inner(),
            &self.tokens.current(),
            crate::node::wall_ms(),
        )?;
        let name = grant.name.clone();
        let (issued, index) = self.node.ask_as(by, Proposal::issue_token(grant)).await?;
        issued.map_err(|why| status_of("token", &why))?;
        let info = self
            .node
            .read(|t| t.issued_tokens().get(&name).map(info_of))
            .ok_or_else(|| {
                Status::unavailable(format!(
                    "token {name:?} was issued at log index {index}, but this node has not \
                     applied it yet: list the tokens in a moment"
                ))
            })?;
        Ok(stamped(Response::new(info), index))
    }

    async fn revoke(
        &self,
        request: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        let by = crate::auth::actor(&request);
        let name = request.into_inner().name;
        exactly_core::access::check_token_name(&name).map_err(Status::invalid_argument)?;
        if self.tokens.current().named(&name).is_some() {
            return Err(Status::failed_precondition(format!(
                "{name:?} is a configured token: remove it from the nodes' tokens file (they \
                 reload it) to revoke it"
            )));
        }
        let (revoked, index) = self.node.ask_as(by, Proposal::revoke_token(name)).await?;
        revoked.map_err(|why| status_of("token", &why))?;
        Ok(stamped(Response::new(pb::RevokeTokenResponse {}), index))
    }

    async fn list(
        &self,
        request: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        let at = before_read(&self.node, &request).await?;
        let mut tokens: Vec<pb::TokenInfo> = self
            .tokens
            .current()
            .credentials()
            .iter()
            .map(|c| pb::TokenInfo {
                name: c.name.clone(),
                scopes: c.scopes.iter().map(Scope::to_string).collect(),
                source: "config".into(),
                ..Default::default()
            })
            .collect();
        self.node
            .read(|t| tokens.extend(t.issued_tokens().values().map(info_of)));
        Ok(stamped(
            Response::new(pb::ListTokensResponse { tokens }),
            at,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TokenConfig;

    fn configured(names: &[(&str, &str)]) -> crate::auth::Tokens {
        let list: Vec<TokenConfig> = names
            .iter()
            .map(|(name, secret)| TokenConfig {
                name: name.to_string(),
                sha256: exactly_client::token::digest_hex(secret),
                scopes: vec!["admin".into()],
            })
            .collect();
        crate::auth::Tokens::from_config(&list).unwrap()
    }

    fn request(
        name: &str,
        secret: &str,
        scopes: &[&str],
        expires_at_ms: u64,
    ) -> pb::IssueTokenRequest {
        pb::IssueTokenRequest {
            name: name.into(),
            sha256: exactly_client::token::digest(secret).to_vec(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            expires_at_ms,
        }
    }

    /// Every malformed request gets its own status, before anything is proposed.
    #[test]
    fn requests_are_checked_at_the_edge() {
        let root = configured(&[("root", "s-root")]);
        let now = 1_000;
        let grant = grant_of(
            request("ci", "s-ci", &["submit:emails", "read"], 0),
            &root,
            now,
        )
        .unwrap();
        assert_eq!(
            grant.scopes,
            vec![Scope::Submit(Some("emails".into())), Scope::Read]
        );
        assert_eq!(grant.expires_at_ms, None);
        let later = grant_of(request("ci", "s-ci", &["read"], 5_000), &root, now).unwrap();
        assert_eq!(later.expires_at_ms, Some(5_000));

        let code = |r: pb::IssueTokenRequest, t: &crate::auth::Tokens| {
            grant_of(r, t, now).unwrap_err().code()
        };
        use tonic::Code;
        let open = crate::auth::Tokens::default();
        assert_eq!(
            code(request("ci", "s", &["read"], 0), &open),
            Code::FailedPrecondition
        );
        let mut short = request("ci", "s", &["read"], 0);
        short.sha256.truncate(3);
        assert_eq!(code(short, &root), Code::InvalidArgument);
        assert_eq!(
            code(request("ci", "s", &["write"], 0), &root),
            Code::InvalidArgument
        );
        assert_eq!(
            code(request("ci", "s", &[], 0), &root),
            Code::InvalidArgument
        );
        assert_eq!(
            code(request("c i", "s", &["read"], 0), &root),
            Code::InvalidArgument
        );
        assert_eq!(
            code(request("ci", "s", &["read"], now), &root),
            Code::InvalidArgument
        );
        assert_eq!(
            code(request("root", "s", &["read"], 0), &root),
            Code::AlreadyExists
        );
        assert_eq!(
            code(request("ci", "s-root", &["read"], 0), &root),
            Code::AlreadyExists
        );
    }
}
