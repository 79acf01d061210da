//! Who may call what on the public port: bearer tokens (`[[tokens]]`, kept as SHA-256 digests),
//! their scopes, and the scope each gRPC method needs. The decisions are pure ([`Tokens::admit`],
//! [`need_of`], [`Credential::may_submit_to`]); [`AuthLayer`] only carries them out in front of
//! every public service.
//!
//! Scopes: `submit` (Submit, any queue) or `submit:<queue>` (that queue only), `read` (Get,
//! List, Watch, dead letters, queues, schedules, status), `operate` (`read`, and Cancel,
//! Redrive, queue changes, schedule pause, Drain) and `admin` (everything: membership, Purge,
//! schedules). With no `[[tokens]]` the port is open to anyone who reaches it (a loopback
//! cluster; see `secure-by-default` in README).

use std::collections::HashMap;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;

use crate::config::TokenConfig;

/// What a method needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Anyone who reaches the port: health, reflection, and (without `peer-listen`) the
    /// node-to-node service, which peers call without tokens.
    Open,
    Submit,
    Read,
    Operate,
    Admin,
}

impl Need {
    fn name(self) -> &'static str {
        match self {
            Need::Open => "none",
            Need::Submit => "submit",
            Need::Read => "read",
            Need::Operate => "operate",
            Need::Admin => "admin",
        }
    }
}

/// The scope a public gRPC method (its path, `/package.Service/Method`) needs. Unknown methods
/// need `admin`: a method added without a line here is closed, not open.
pub fn need_of(path: &str) -> Need {
    let Some((service, method)) = path.trim_start_matches('/').split_once('/') else {
        return Need::Admin;
    };
    match (service, method) {
        ("grpc.health.v1.Health", _)
        | ("grpc.reflection.v1.ServerReflection", _)
        | ("grpc.reflection.v1alpha.ServerReflection", _)
        | ("exactly.internal.v1.Internal", _) => Need::Open,
        ("exactly.v1.Jobs", "Submit") => Need::Submit,
        ("exactly.v1.Jobs", "Get" | "List" | "Watch") => Need::Read,
        ("exactly.v1.Jobs", "Cancel") => Need::Operate,
        ("exactly.v1.DeadLetters", "List") => Need::Read,
        ("exactly.v1.DeadLetters", "Redrive") => Need::Operate,
        ("exactly.v1.DeadLetters", "Purge") => Need::Admin,
        ("exactly.v1.Queues", "List") => Need::Read,
        ("exactly.v1.Queues", "Configure") => Need::Operate,
        ("exactly.v1.Schedules", "List") => Need::Read,
        ("exactly.v1.Schedules", "SetPaused") => Need::Operate,
        ("exactly.v1.Schedules", "Add" | "Remove") => Need::Admin,
        ("exactly.v1.Cluster", "Status") => Need::Read,
        ("exactly.v1.Cluster", "Drain") => Need::Operate,
        ("exactly.v1.Cluster", "Remove" | "Join" | "Audit") => Need::Admin,
        ("exactly.v1.Tokens", "Issue" | "Revoke" | "List") => Need::Admin,
        _ => Need::Admin,
    }
}

pub use exactly_core::access::Scope;

/// A caller the node recognised: its token's or client certificate's name (for logs and the
/// audit trail) and scopes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credential {
    pub name: String,
    pub scopes: Vec<Scope>,
    /// The SHA-256 of its token (of its certificate for a client certificate): what a long call
    /// (a Watch stream) is checked against again.
    pub digest: [u8; 32],
    /// A client certificate's serial number (`None` for a token): checked against the CRL.
    pub serial: Option<Vec<u8>>,
}

impl Credential {
    /// Whether these scopes cover a method's need (for Submit: to some queue; the handler then
    /// checks each job's queue with [`Credential::may_submit_to`]).
    pub fn allows(&self, need: Need) -> bool {
        self.scopes.iter().any(|scope| {
            matches!(
                (scope, need),
                (_, Need::Open)
                    | (Scope::Admin, _)
                    | (Scope::Operate, Need::Operate | Need::Read)
                    | (Scope::Read, Need::Read)
                    | (Scope::Submit(_), Need::Submit)
            )
        })
    }

    /// Whether this credential may submit to `queue`.
    pub fn may_submit_to(&self, queue: &str) -> bool {
        self.scopes.iter().any(|scope| match scope {
            Scope::Admin | Scope::Submit(None) => true,
            Scope::Submit(Some(only)) => only == queue,
            _ => false,
        })
    }
}

/// Why a request was turned away; nothing was done for it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("this cluster needs a token: send `authorization: Bearer <token>` (exactly --token, EXACTLY_TOKEN)")]
    Missing,
    #[error("the authorization header is not `Bearer <token>`")]
    Malformed,
    #[error("unknown token")]
    Unknown,
    #[error("client certificate {0:?} is not listed in this cluster's [[client-certs]]")]
    UnknownClient(String),
    #[error("client certificate {0:?} is revoked")]
    Revoked(String),
    #[error("the client certificate names no client (expected a URI urn:exactly:client:<name> or one common name)")]
    NamelessClient,
    #[error("token {0:?} expired")]
    Expired(String),
    #[error("{name:?} lacks the {need} scope this call needs")]
    Scope { name: String, need: &'static str },
}

impl Denied {
    pub fn status(&self) -> tonic::Status {
        match self {
            Denied::Scope { .. } => tonic::Status::permission_denied(self.to_string()),
            _ => tonic::Status::unauthenticated(self.to_string()),
        }
    }
}

/// Longest `authorization` header value looked at.
const AUTHORIZATION_BYTES_MAX: usize = 512;

/// The configured tokens, by digest, and the configured client certificates' scopes, by name.
#[derive(Debug, Default)]
pub struct Tokens {
    by_digest: HashMap<[u8; 32], Arc<Credential>>,
    clients: HashMap<String, Vec<Scope>>,
}

/// The client certificate a connection presented (verified against `[api-tls] client-ca` and
/// its CRL during the handshake), as far as admission needs it.
#[derive(Clone, Copy, Debug)]
pub struct ClientCert<'a> {
    /// The certificate, DER.
    pub der: &'a [u8],
}

/// A credential's scopes as configured; an error names `whose`.
fn parse_scopes(scopes: &[String], whose: &str) -> Result<Vec<Scope>, String> {
    scopes
        .iter()
        .map(|s| s.parse())
        .collect::<Result<Vec<Scope>, _>>()
        .map_err(|why| format!("{whose}: scope {why}"))
}

impl Tokens {
    /// From validated configuration (`NodeConfig::validate` checked digests and scopes).
    pub fn from_config(tokens: &[TokenConfig]) -> Result<Self, String> {
        let mut by_digest = HashMap::new();
        for t in tokens {
            let digest = exactly_client::token::parse_digest_hex(&t.sha256)
                .ok_or_else(|| format!("token {:?}: sha256 is not 64 hex digits", t.name))?;
            let scopes = parse_scopes(&t.scopes, &format!("token {:?}", t.name))?;
            let credential = Credential {
                name: t.name.clone(),
                scopes,
                digest,
                serial: None,
            };
            if by_digest.insert(digest, Arc::new(credential)).is_some() {
                return Err(format!(
                    "token {:?}: the same token is listed twice",
                    t.name
                ));
            }
        }
        Ok(Self {
            by_digest,
            clients: HashMap::new(),
        })
    }

    /// Adds the client certificates of validated configuration (`[[client-certs]]`).
    pub fn with_clients(
        mut self,
        clients: &[crate::config::ClientCertConfig],
    ) -> Result<Self, String> {
        for c in clients {
            let scopes = parse_scopes(&c.scopes, &format!("client certificate {:?}", c.name))?;
            if self.clients.insert(c.name.clone(), scopes).is_some() {
                return Err(format!("client certificate {:?}: listed twice", c.name));
            }
        }
        Ok(self)
    }

    /// Whether the port asks for credentials at all (tokens or client certificates).
    pub fn enabled(&self) -> bool {
        !self.by_digest.is_empty() || !self.clients.is_empty()
    }

    /// The credential a client certificate stands for, or why it is refused: it must name a
    /// client of `[[client-certs]]` and not be revoked (`revoked`: the CRL's serial numbers).
    fn client(
        &self,
        cert: ClientCert<'_>,
        revoked: &crate::tls::Revoked,
    ) -> Result<Credential, Denied> {
        let (name, serial) = crate::tls::client_of_der(cert.der).ok_or(Denied::NamelessClient)?;
        let scopes = self
            .clients
            .get(&name)
            .ok_or_else(|| Denied::UnknownClient(name.clone()))?;
        if revoked.contains(&serial) {
            return Err(Denied::Revoked(name));
        }
        use sha2::Digest;
        Ok(Credential {
            name,
            scopes: scopes.clone(),
            digest: sha2::Sha256::digest(cert.der).into(),
            serial: Some(serial),
        })
    }

    /// Whether `credential`, admitted earlier, would still be admitted for `need` at `now_ms`:
    /// its token is still configured or issued (and has not expired) with scopes that cover
    /// `need`. What a long call (a Watch stream) is checked against while it runs.
    pub fn still_admits(
        &self,
        issued: &IssuedSet,
        now_ms: u64,
        credential: &Credential,
        need: Need,
    ) -> bool {
        if credential.serial.is_some() {
            // A client certificate: its name still listed with scopes that cover `need` (the
            // CRL is checked by the caller, which holds it).
            return self.clients.get(&credential.name).is_some_and(|scopes| {
                Credential {
                    scopes: scopes.clone(),
                    ..credential.clone()
                }
                .allows(need)
            });
        }
        let current = match self.by_digest.get(&credential.digest) {
            Some(c) => Some(c),
            None => issued
                .by_digest
                .get(&credential.digest)
                .filter(|(_, expires)| !expires.is_some_and(|at| at <= now_ms))
                .map(|(c, _)| c),
        };
        current.is_some_and(|c| c.allows(need))
    }

    /// The configured token named `name`, if any.
    pub fn named(&self, name: &str) -> Option<&Arc<Credential>> {
        self.by_digest.values().find(|c| c.name == name)
    }

    /// Whether a configured token has this digest.
    pub fn has_digest(&self, digest: &[u8; 32]) -> bool {
        self.by_digest.contains_key(digest)
    }

    /// The configured tokens' credentials, by name.
    pub fn credentials(&self) -> Vec<Arc<Credential>> {
        let mut all: Vec<_> = self.by_digest.values().cloned().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Decides one request: the credential it carries (`None` when tokens are off, or for an
    /// open method called without one), or why it is refused. `authorization` is the header's
    /// raw value; `Basic` (any user name, the token as password) is accepted too, so that a
    /// browser can log in to the dashboard.
    /// Who `authorization` names and whether that covers `need`: a token of the configuration,
    /// else one of `issued` that has not expired by `now_ms` (wall clock). Without configured
    /// tokens everyone is admitted, issued tokens or not.
    /// A request without a token but on a connection that presented a client certificate is
    /// admitted as that certificate's client (`revoked` holds the CRL's serial numbers); a
    /// token, when sent, decides alone.
    pub fn admit(
        &self,
        issued: &IssuedSet,
        now_ms: u64,
        authorization: Option<&[u8]>,
        client_cert: Option<(ClientCert<'_>, &crate::tls::Revoked)>,
        need: Need,
    ) -> Result<Option<Arc<Credential>>, Denied> {
        if !self.enabled() {
            return Ok(None);
        }
        let Some(header) = authorization else {
            if need == Need::Open {
                return Ok(None);
            }
            let Some((cert, revoked)) = client_cert else {
                return Err(Denied::Missing);
            };
            let credential = self.client(cert, revoked)?;
            if !credential.allows(need) {
                return Err(Denied::Scope {
                    name: credential.name,
                    need: need.name(),
                });
            }
            return Ok(Some(Arc::new(credential)));
        };
        let token = bearer_or_basic(header).ok_or(Denied::Malformed)?;
        let digest = exactly_client::token::digest(&token);
        let credential = match self.by_digest.get(&digest) {
            Some(credential) => credential,
            None => {
                let (credential, expires_at_ms) =
                    issued.by_digest.get(&digest).ok_or(Denied::Unknown)?;
                if expires_at_ms.is_some_and(|at| at <= now_ms) {
                    return Err(Denied::Expired(credential.name.clone()));
                }
                credential
            }
        };
        if !credential.allows(need) {
            return Err(Denied::Scope {
                name: credential.name.clone(),
                need: need.name(),
            });
        }
        Ok(Some(credential.clone()))
    }
}

/// The token in `Bearer <token>` or `Basic base64(<user>:<token>)`.
/// The tokens issued through the API (kept in the replicated state), by digest, with their
/// expiry (ms since the Unix epoch).
#[derive(Debug, Default)]
pub struct IssuedSet {
    by_digest: HashMap<[u8; 32], (Arc<Credential>, Option<u64>)>,
}

impl IssuedSet {
    pub fn from_state(tokens: &exactly_store::IssuedTokens) -> Self {
        let by_digest = tokens
            .values()
            .map(|t| {
                let credential = Credential {
                    name: t.name.clone(),
                    scopes: t.scopes.clone(),
                    digest: t.sha256,
                    serial: None,
                };
                (t.sha256, (Arc::new(credential), t.expires_at_ms))
            })
            .collect();
        Self { by_digest }
    }
}

fn bearer_or_basic(header: &[u8]) -> Option<String> {
    if header.len() > AUTHORIZATION_BYTES_MAX {
        return None;
    }
    let header = std::str::from_utf8(header).ok()?.trim();
    let (scheme, rest) = header.split_once(' ')?;
    let rest = rest.trim();
    let token = if scheme.eq_ignore_ascii_case("bearer") {
        rest.to_string()
    } else if scheme.eq_ignore_ascii_case("basic") {
        use base64::Engine;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .ok()?;
        let text = String::from_utf8(decoded).ok()?;
        text.split_once(':')?.1.to_string()
    } else {
        return None;
    };
    (!token.is_empty()).then_some(token)
}

/// The tokens a node admits: those of its configuration and of its tokens file, read again
/// when the file changes (a token added or revoked without a restart). Cheap to share.
pub struct TokenSet {
    inline: Vec<TokenConfig>,
    clients: Vec<crate::config::ClientCertConfig>,
    /// The serial numbers of the client CRL (`[api-tls] crl`), as loaded last.
    revoked: Arc<crate::tls::Revoked>,
    file: Option<std::path::PathBuf>,
    current: std::sync::RwLock<(Arc<Tokens>, FileStamp)>,
    /// The issued tokens as this node last applied them.
    issued: std::sync::RwLock<Arc<IssuedSet>>,
}

/// (modified, length) of the tokens file when it was read.
type FileStamp = Option<(std::time::SystemTime, u64)>;

impl TokenSet {
    /// The tokens of a validated configuration.
    pub fn load(config: &crate::config::NodeConfig) -> Result<Arc<Self>, String> {
        let stamp = config
            .tokens_file
            .as_deref()
            .and_then(crate::tls::file_stamp);
        let all = config.all_tokens().map_err(|e| e.to_string())?;
        let tokens = Tokens::from_config(&all)?.with_clients(&config.client_certs)?;
        Ok(Arc::new(Self {
            inline: config.tokens.clone(),
            clients: config.client_certs.clone(),
            revoked: Default::default(),
            file: config.tokens_file.clone(),
            current: std::sync::RwLock::new((Arc::new(tokens), stamp)),
            issued: Default::default(),
        }))
    }

    /// Where the public port's TLS puts the client CRL's serial numbers.
    pub fn revoked(&self) -> Arc<crate::tls::Revoked> {
        self.revoked.clone()
    }

    /// The tokens in use now.
    pub fn current(&self) -> Arc<Tokens> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone()
    }

    /// [`Tokens::admit`] with the tokens in use now.
    /// [`Tokens::still_admits`] with the tokens as they are now. Without configured tokens
    /// every call is admitted, so nothing is taken back either.
    pub fn still_admits(&self, credential: &Credential, need: Need) -> bool {
        let config = self.current();
        if !config.enabled() {
            return true;
        }
        if credential
            .serial
            .as_ref()
            .is_some_and(|serial| self.revoked.contains(serial))
        {
            return false;
        }
        let issued = self
            .issued
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        config.still_admits(&issued, crate::node::wall_ms(), credential, need)
    }

    /// Replaces the issued tokens (what this node applied last).
    pub fn set_issued(&self, tokens: &exactly_store::IssuedTokens) {
        let set = Arc::new(IssuedSet::from_state(tokens));
        *self.issued.write().unwrap_or_else(|p| p.into_inner()) = set;
    }

    pub fn admit(
        &self,
        authorization: Option<&[u8]>,
        client_cert: Option<ClientCert<'_>>,
        need: Need,
    ) -> Result<Option<Arc<Credential>>, Denied> {
        let config = self.current();
        if !config.enabled() {
            return Ok(None);
        }
        let issued = self
            .issued
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let client_cert = client_cert.map(|cert| (cert, &*self.revoked));
        config.admit(
            &issued,
            crate::node::wall_ms(),
            authorization,
            client_cert,
            need,
        )
    }
}

impl crate::tls::Reload for TokenSet {
    /// Reads the tokens file again if it changed; a file that cannot be read, holds no token or
    /// an invalid one is refused and the tokens in use stay.
    fn reload_if_changed(&self) -> Result<bool, String> {
        let Some(path) = &self.file else {
            return Ok(false);
        };
        let now = crate::tls::file_stamp(path);
        if now == self.current.read().unwrap_or_else(|p| p.into_inner()).1 {
            return Ok(false);
        }
        let from_file = crate::config::read_tokens_file(path).map_err(|e| e.to_string())?;
        if from_file.is_empty() {
            return Err(format!("{} holds no [[tokens]]", path.display()));
        }
        let mut all = self.inline.clone();
        all.extend(from_file);
        crate::config::validate_tokens(&all).map_err(|e| e.to_string())?;
        let tokens = Tokens::from_config(&all)?.with_clients(&self.clients)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = (Arc::new(tokens), now);
        Ok(true)
    }

    fn what(&self) -> String {
        match &self.file {
            Some(path) => format!("tokens ({})", path.display()),
            None => "tokens".into(),
        }
    }
}

/// Puts [`Tokens::admit`] in front of a gRPC server's services: a refused request gets its
/// status at once (nothing reaches a handler), an admitted one carries its [`Credential`] in
/// the request's extensions.
#[derive(Clone)]
pub struct AuthLayer {
    pub tokens: Arc<TokenSet>,
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            tokens: self.tokens.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    tokens: Arc<TokenSet>,
}

impl<S, B> tower::Service<http::Request<B>> for Auth<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let need = need_of(request.uri().path());
        let header = request
            .headers()
            .get(http::header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        let certs = request
            .extensions()
            .get::<crate::tls::PeerCerts>()
            .and_then(|c| c.0.clone());
        let client_cert = certs
            .as_ref()
            .and_then(|c| c.first())
            .map(|der| ClientCert { der });
        match self.tokens.admit(header, client_cert, need) {
            Ok(credential) => {
                if let Some(credential) = credential {
                    request.extensions_mut().insert(credential);
                }
                Box::pin(self.inner.call(request))
            }
            Err(denied) => {
                tracing::debug!(path = request.uri().path(), %denied, "request refused");
                let response = denied.status().into_http();
                Box::pin(async move { Ok(response) })
            }
        }
    }
}

/// The name an operator's write is recorded under in the audit trail: the token's, or
/// `anonymous` on a port without tokens.
pub fn actor<T>(request: &tonic::Request<T>) -> String {
    credential_of(request).map_or_else(|| ANONYMOUS.to_string(), |c| c.name.clone())
}

/// The audit trail's name for a caller on a port without tokens.
pub const ANONYMOUS: &str = "anonymous";

/// The credential a request was admitted with (none when tokens are off).
pub fn credential_of<T>(request: &tonic::Request<T>) -> Option<&Arc<Credential>> {
    request.extensions().get::<Arc<Credential>>()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(list: &[(&str, &str, &[&str])]) -> Tokens {
        let config: Vec<TokenConfig> = list
            .iter()
            .map(|(name, token, scopes)| TokenConfig {
                name: name.to_string(),
                sha256: exactly_client::token::digest_hex(token),
                scopes: scopes.iter().map(|s| s.to_string()).collect(),
            })
            .collect();
        Tokens::from_config(&config).unwrap()
    }

    fn bearer(token: &str) -> Vec<u8> {
        format!("Bearer {token}").into_bytes()
    }

    impl Tokens {
        /// `admit` with no issued tokens.
        fn admit_plain(
            &self,
            authorization: Option<&[u8]>,
            need: Need,
        ) -> Result<Option<Arc<Credential>>, Denied> {
            self.admit(&IssuedSet::default(), 0, authorization, None, need)
        }
    }

    fn issued(list: &[(&str, &str, &[Scope], Option<u64>)]) -> IssuedSet {
        let tokens = list
            .iter()
            .map(|&(name, token, scopes, expires_at_ms)| {
                let t = exactly_core::access::IssuedToken {
                    name: name.into(),
                    sha256: exactly_client::token::digest(token),
                    scopes: scopes.to_vec(),
                    issued_at_ms: 1,
                    issued_by: "root".into(),
                    expires_at_ms,
                };
                (name.to_string(), t)
            })
            .collect();
        IssuedSet::from_state(&tokens)
    }

    /// An issued token is admitted with its own scopes until it expires; a configured token
    /// wins over an issued one; without configured tokens the port stays open, issued tokens
    /// or not.
    #[test]
    fn issued_tokens_are_admitted_until_they_expire() {
        let t = tokens(&[("root", "ta", &["admin"])]);
        let set = issued(&[
            ("ci", "tc", &[Scope::Read], None),
            ("temp", "tt", &[Scope::Operate], Some(5_000)),
        ]);
        let read = Need::Read;
        let name = |r: Result<Option<Arc<Credential>>, Denied>| r.unwrap().unwrap().name.clone();
        assert_eq!(
            name(t.admit(&set, 1_000, Some(&bearer("tc")), None, read)),
            "ci"
        );
        assert_eq!(
            t.admit(&set, 1_000, Some(&bearer("tc")), None, Need::Operate),
            Err(Denied::Scope {
                name: "ci".into(),
                need: "operate"
            })
        );
        assert_eq!(
            name(t.admit(&set, 4_999, Some(&bearer("tt")), None, read)),
            "temp"
        );
        assert_eq!(
            t.admit(&set, 5_000, Some(&bearer("tt")), None, read),
            Err(Denied::Expired("temp".into()))
        );
        assert_eq!(
            name(t.admit(&set, 9_000, Some(&bearer("ta")), None, read)),
            "root"
        );
        assert_eq!(
            t.admit(&set, 1_000, Some(&bearer("nope")), None, read),
            Err(Denied::Unknown)
        );
        let open = Tokens::default();
        assert_eq!(open.admit(&set, 1_000, None, None, Need::Admin), Ok(None));
    }

    /// A credential admitted earlier is taken back once its token is revoked (no longer issued),
    /// expires, or leaves the configuration; one that stays keeps its calls.
    #[test]
    fn admitted_credentials_are_checked_again() {
        let t = tokens(&[("root", "ta", &["admin"])]);
        let set = issued(&[
            ("ci", "tc", &[Scope::Read], None),
            ("temp", "tt", &[Scope::Read], Some(5_000)),
        ]);
        let admitted = |secret: &str| {
            t.admit(&set, 1_000, Some(&bearer(secret)), None, Need::Read)
                .unwrap()
                .unwrap()
        };
        let (ci, temp, root) = (admitted("tc"), admitted("tt"), admitted("ta"));
        assert!(t.still_admits(&set, 1_000, &ci, Need::Read));
        assert!(!t.still_admits(&set, 1_000, &ci, Need::Operate));
        assert!(t.still_admits(&set, 4_999, &temp, Need::Read));
        assert!(!t.still_admits(&set, 5_000, &temp, Need::Read));
        let revoked = issued(&[("temp", "tt", &[Scope::Read], Some(5_000))]);
        assert!(!t.still_admits(&revoked, 1_000, &ci, Need::Read));
        assert!(t.still_admits(&revoked, 1_000, &root, Need::Read));
        let reconfigured = tokens(&[("root", "new-secret", &["admin"])]);
        assert!(!reconfigured.still_admits(&set, 1_000, &root, Need::Read));
    }

    #[test]
    fn without_tokens_everything_is_open() {
        let t = Tokens::default();
        assert_eq!(t.admit_plain(None, Need::Admin), Ok(None));
        assert_eq!(t.admit_plain(Some(b"junk"), Need::Admin), Ok(None));
    }

    #[test]
    fn every_method_needs_its_scope() {
        let t = tokens(&[
            ("web", "tw", &["submit:emails", "read"]),
            ("ops", "to", &["operate"]),
            ("root", "ta", &["admin"]),
            ("feed", "ts", &["submit"]),
        ]);
        let table: &[(&str, &str, Result<(), &str>)] = &[
            ("tw", "/exactly.v1.Jobs/Submit", Ok(())),
            ("tw", "/exactly.v1.Jobs/Get", Ok(())),
            ("tw", "/exactly.v1.Jobs/Watch", Ok(())),
            ("tw", "/exactly.v1.Jobs/Cancel", Err("operate")),
            ("tw", "/exactly.v1.DeadLetters/Purge", Err("admin")),
            ("to", "/exactly.v1.Jobs/Cancel", Ok(())),
            ("to", "/exactly.v1.Jobs/List", Ok(())),
            ("to", "/exactly.v1.DeadLetters/Redrive", Ok(())),
            ("to", "/exactly.v1.Queues/Configure", Ok(())),
            ("to", "/exactly.v1.Cluster/Drain", Ok(())),
            ("to", "/exactly.v1.Jobs/Submit", Err("submit")),
            ("to", "/exactly.v1.Cluster/Remove", Err("admin")),
            ("to", "/exactly.v1.Schedules/Add", Err("admin")),
            ("to", "/exactly.v1.DeadLetters/Purge", Err("admin")),
            ("ts", "/exactly.v1.Jobs/Submit", Ok(())),
            ("ts", "/exactly.v1.Jobs/Get", Err("read")),
            ("ta", "/exactly.v1.Cluster/Join", Ok(())),
            ("to", "/exactly.v1.Cluster/Audit", Err("admin")),
            ("ta", "/exactly.v1.Jobs/Submit", Ok(())),
            ("ta", "/exactly.v1.Future/Thing", Ok(())),
            ("to", "/exactly.v1.Future/Thing", Err("admin")),
            ("ts", "/grpc.health.v1.Health/Check", Ok(())),
        ];
        for (token, path, expected) in table {
            let got = t.admit_plain(Some(&bearer(token)), need_of(path));
            match expected {
                Ok(()) => assert!(got.is_ok(), "{token} {path}: {got:?}"),
                Err(need) => assert!(
                    matches!(&got, Err(Denied::Scope { need: n, .. }) if n == need),
                    "{token} {path}: {got:?}"
                ),
            }
        }
    }

    #[test]
    fn missing_unknown_and_malformed_tokens_are_unauthenticated() {
        let t = tokens(&[("web", "secret", &["read"])]);
        let get = Need::Read;
        assert_eq!(t.admit_plain(None, get), Err(Denied::Missing));
        assert_eq!(t.admit_plain(None, Need::Open), Ok(None));
        assert_eq!(
            t.admit_plain(Some(&bearer("other")), get),
            Err(Denied::Unknown)
        );
        for bad in [
            &b"secret"[..],
            b"Bearer",
            b"Bearer ",
            b"Token secret",
            &[0xff, 0xfe],
        ] {
            assert_eq!(
                t.admit_plain(Some(bad), get),
                Err(Denied::Malformed),
                "{bad:?}"
            );
        }
        let long = bearer(&"x".repeat(AUTHORIZATION_BYTES_MAX));
        assert_eq!(t.admit_plain(Some(&long), get), Err(Denied::Malformed));
        assert_eq!(
            t.admit_plain(Some(&bearer("secret")), get)
                .unwrap()
                .unwrap()
                .name,
            "web"
        );
        assert_eq!(
            t.admit_plain(Some(b"bearer  secret "), get)
                .unwrap()
                .unwrap()
                .name,
            "web"
        );
        assert_eq!(
            Denied::Missing.status().code(),
            tonic::Code::Unauthenticated
        );
        let scope = t
            .admit_plain(Some(&bearer("secret")), Need::Admin)
            .unwrap_err();
        assert_eq!(scope.status().code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn a_browser_logs_in_with_basic_and_the_token_as_password() {
        let t = tokens(&[("web", "secret", &["read"])]);
        // base64("anyone:secret")
        let basic = b"Basic YW55b25lOnNlY3JldA==";
        assert_eq!(
            t.admit_plain(Some(basic), Need::Read)
                .unwrap()
                .unwrap()
                .name,
            "web"
        );
        assert_eq!(
            t.admit_plain(Some(b"Basic YW55b25lOnNlY3JldA"), Need::Read),
            Err(Denied::Malformed)
        );
    }

    #[test]
    fn submit_scopes_name_their_queues() {
        let web = Credential {
            name: "web".into(),
            scopes: vec!["submit:emails".parse().unwrap(), Scope::Read],
            digest: [1; 32],
            serial: None,
        };
        assert!(web.may_submit_to("emails"));
        assert!(!web.may_submit_to("billing"));
        let admin = Credential {
            name: "root".into(),
            scopes: vec![Scope::Admin],
            digest: [2; 32],
            serial: None,
        };
        assert!(admin.may_submit_to("billing"));
        let reader = Credential {
            name: "r".into(),
            scopes: vec![Scope::Read],
            digest: [3; 32],
            serial: None,
        };
        assert!(!reader.may_submit_to("emails"));
        assert!("submit:".parse::<Scope>().is_err());
        assert!("submit:a\u{1b}[31m".parse::<Scope>().is_err());
        assert!("write".parse::<Scope>().is_err());
    }

    #[test]
    fn config_errors_name_the_token() {
        let bad_digest = TokenConfig {
            name: "web".into(),
            sha256: "abc".into(),
            scopes: vec!["read".into()],
        };
        let err = Tokens::from_config(&[bad_digest]).unwrap_err();
        assert!(err.contains("\"web\"") && err.contains("64 hex"), "{err}");
        let twice = TokenConfig {
            name: "a".into(),
            sha256: exactly_client::token::digest_hex("t"),
            scopes: vec!["read".into()],
        };
        let mut again = twice.clone();
        again.name = "b".into();
        assert!(Tokens::from_config(&[twice, again])
            .unwrap_err()
            .contains("twice"));
    }

    /// A client certificate is a credential: its name (the `urn:exactly:client:` URI, else the
    /// common name) is looked up in `[[client-certs]]` for its scopes; an unlisted name, a
    /// revoked serial and a certificate that names nobody are refused; a token on the same
    /// request decides alone; an admitted certificate is refused again once revoked or
    /// unlisted.
    #[test]
    fn client_certificates_are_credentials() {
        use exactly_client::certs::{issue_client, issue_node, new_ca, serial_of_pem};
        let ca = new_ca(1).unwrap();
        let der = |pem: &str| {
            x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
                .next()
                .unwrap()
                .unwrap()
                .contents
        };
        let web = issue_client(&ca, "web", 1).unwrap().cert;
        let stranger = issue_client(&ca, "stranger", 1).unwrap().cert;
        let node = issue_node(&ca, 3, 1).unwrap().cert;
        let listed = |name: &str, scopes: &[&str]| crate::config::ClientCertConfig {
            name: name.into(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
        };
        let t = tokens(&[("root", "rootsecret", &["admin"])])
            .with_clients(&[
                listed("web", &["submit:emails", "read"]),
                listed("node-3.exactly", &["read"]),
            ])
            .unwrap();
        let revoked = crate::tls::Revoked::default();
        let admit = |pem: &str, header: Option<&[u8]>, need| {
            let der = der(pem);
            t.admit(
                &IssuedSet::default(),
                0,
                header,
                Some((ClientCert { der: &der }, &revoked)),
                need,
            )
        };
        let name = |r: Result<Option<Arc<Credential>>, Denied>| r.unwrap().unwrap().name.clone();
        assert_eq!(name(admit(&web, None, Need::Read)), "web");
        assert_eq!(name(admit(&web, None, Need::Submit)), "web");
        let credential = admit(&web, None, Need::Read).unwrap().unwrap();
        assert!(credential.may_submit_to("emails") && !credential.may_submit_to("billing"));
        assert_eq!(
            admit(&web, None, Need::Operate),
            Err(Denied::Scope {
                name: "web".into(),
                need: "operate"
            })
        );
        assert_eq!(
            admit(&stranger, None, Need::Read),
            Err(Denied::UnknownClient("stranger".into()))
        );
        // Without the URI, the common name: a node certificate is `node-3.exactly`.
        assert_eq!(name(admit(&node, None, Need::Read)), "node-3.exactly");
        assert_eq!(
            admit(&ca.cert, None, Need::Read),
            Err(Denied::UnknownClient("exactly cluster CA".into()))
        );
        // A token decides alone, whatever certificate the connection has.
        let root = bearer("rootsecret");
        assert_eq!(name(admit(&stranger, Some(&root), Need::Admin)), "root");
        assert_eq!(
            admit(&web, Some(&bearer("nope")), Need::Read),
            Err(Denied::Unknown)
        );
        // Revoked: refused at once, and an admitted credential is not admitted again.
        let set = TokenSet {
            inline: Vec::new(),
            clients: Vec::new(),
            revoked: Arc::new(crate::tls::Revoked::default()),
            file: None,
            current: std::sync::RwLock::new((
                Arc::new(
                    tokens(&[])
                        .with_clients(&[listed("web", &["read"])])
                        .unwrap(),
                ),
                None,
            )),
            issued: Default::default(),
        };
        assert!(set.still_admits(&credential, Need::Read));
        let serial = serial_of_pem(&web).unwrap();
        revoked.set(Arc::new([serial.clone()].into_iter().collect()));
        assert_eq!(
            admit(&web, None, Need::Read),
            Err(Denied::Revoked("web".into()))
        );
        set.revoked.set(Arc::new([serial].into_iter().collect()));
        assert!(!set.still_admits(&credential, Need::Read));
        // Unlisted after a reload: not admitted again either.
        let unlisted = tokens(&[("root", "rootsecret", &["admin"])]);
        assert!(!unlisted.still_admits(&IssuedSet::default(), 0, &credential, Need::Read));
        assert!(t.still_admits(&IssuedSet::default(), 0, &credential, Need::Read));
        assert!(!t.still_admits(&IssuedSet::default(), 0, &credential, Need::Operate));
        // Garbage is no certificate.
        let garbage = t.admit(
            &IssuedSet::default(),
            0,
            None,
            Some((ClientCert { der: b"garbage" }, &revoked)),
            Need::Read,
        );
        assert_eq!(garbage, Err(Denied::NamelessClient));
    }
}
