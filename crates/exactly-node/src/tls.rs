//! Mutual TLS on the peer port (`[peer-tls]`): who may speak to a node as a node.
//!
//! Every node holds a certificate from the cluster's CA that names its node id
//! (`exactly_client::certs`). The peer listener takes only connections that present one, and
//! dials its peers presenting its own and accepting only theirs: a Raft RPC goes to
//! `node-<target>.exactly`, so a connection to a reused address reaches the node it meant or
//! none. Inside the service ([`crate::internal`]) the certificate's node id is the sender: a
//! Raft message must come from the leader or candidate it names, a vote from a voter, a
//! forwarded write from a member (and a renewal or registration from the node it is about), a
//! join from the id it asks for.

use std::path::Path;

use exactly_client::certs::{node_id_of_name, node_name, PEER_NAME};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};
use x509_parser::extensions::GeneralName;

use crate::config::PeerTlsConfig;

/// A node's loaded peer TLS material. Cheap to clone.
#[derive(Clone)]
pub struct PeerTls {
    ca: Certificate,
    identity: Identity,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerTls")
    }
}

fn read(what: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("peer-tls.{what}: cannot read {}: {e}", path.display()))
}

/// The certificates of a PEM bundle, DER-encoded.
fn pem_certificates(pem: &[u8]) -> Vec<Vec<u8>> {
    x509_parser::pem::Pem::iter_from_buffer(pem)
        .filter_map(Result::ok)
        .filter(|p| p.label == "CERTIFICATE")
        .map(|p| p.contents)
        .collect()
}

impl PeerTls {
    /// Reads the files and checks that the certificate is node `node_id`'s: a node started with
    /// another node's certificate would be refused by every peer, or worse, speak as it.
    pub fn load(config: &PeerTlsConfig, node_id: u64) -> Result<Self, String> {
        let ca = read("ca", &config.ca)?;
        let cert = read("cert", &config.cert)?;
        let key = read("key", &config.key)?;
        if pem_certificates(&ca).is_empty() {
            return Err(format!(
                "peer-tls.ca: no PEM certificate in {}",
                config.ca.display()
            ));
        }
        let Some(leaf) = pem_certificates(&cert).into_iter().next() else {
            return Err(format!(
                "peer-tls.cert: no PEM certificate in {}",
                config.cert.display()
            ));
        };
        match node_id_of_der(&leaf) {
            Some(id) if id == node_id => {}
            Some(id) => {
                return Err(format!(
                    "peer-tls.cert: {} is node {id}'s certificate, this is node {node_id}",
                    config.cert.display()
                ))
            }
            None => {
                return Err(format!(
                    "peer-tls.cert: {} names no node (expected {}; see `exactly cert node`)",
                    config.cert.display(),
                    node_name(node_id)
                ))
            }
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let (from, until) = validity_secs(&leaf)
            .ok_or_else(|| format!("peer-tls.cert: cannot read {}", config.cert.display()))?;
        match expiry_check(from, until, now) {
            Err(why) => return Err(format!("peer-tls.cert: {}: {why}", config.cert.display())),
            Ok(Some(warning)) => {
                tracing::warn!(cert = %config.cert.display(), "{warning}");
            }
            Ok(None) => {}
        }
        if !String::from_utf8_lossy(&key).contains("PRIVATE KEY") {
            return Err(format!(
                "peer-tls.key: no PEM private key in {}",
                config.key.display()
            ));
        }
        Ok(Self {
            ca: Certificate::from_pem(ca),
            identity: Identity::from_pem(cert, key),
        })
    }

    /// The peer listener's TLS: this node's certificate, and a client certificate from the
    /// cluster CA required of every connection.
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity.clone())
            .client_ca_root(self.ca.clone())
    }

    /// TLS for dialing node `target` (its certificate must name it), or any node of the
    /// cluster when the id at that address is not known (joining, forwarding to a leader known
    /// by address).
    pub fn client(&self, target: Option<u64>) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(self.ca.clone())
            .identity(self.identity.clone())
            .domain_name(target.map_or_else(|| PEER_NAME.to_string(), node_name))
    }
}

/// Days before its expiry from which a node warns at start that its certificate needs renewing.
pub const CERT_EXPIRY_WARN_DAYS: i64 = 30;

/// A DER certificate's validity, in Unix seconds.
fn validity_secs(der: &[u8]) -> Option<(i64, i64)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let v = cert.validity();
    Some((v.not_before.timestamp(), v.not_after.timestamp()))
}

/// What to do with a certificate valid from `from` to `until` at `now` (Unix seconds): refuse
/// it if it is not valid now (every peer would refuse the handshake), warn when fewer than
/// [`CERT_EXPIRY_WARN_DAYS`] days are left.
pub fn expiry_check(from: i64, until: i64, now: i64) -> Result<Option<String>, String> {
    if now < from {
        return Err(format!(
            "not valid yet (from {from}, now {now}, Unix seconds; is this machine's clock right?)"
        ));
    }
    if now > until {
        return Err(format!(
            "expired {} days ago; issue a new one with `exactly cert node`",
            (now - until) / 86_400
        ));
    }
    let left = (until - now) / 86_400;
    Ok((left < CERT_EXPIRY_WARN_DAYS).then(|| {
        format!(
            "the node certificate expires in {left} days: issue a new one with `exactly cert \
             node` and restart the node with it before then"
        )
    }))
}

/// The node id a DER certificate names: exactly one `node-<id>.exactly` among its subject
/// alternative names (several different ids name none).
pub fn node_id_of_der(der: &[u8]) -> Option<u64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let mut ids = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => node_id_of_name(dns),
            _ => None,
        });
    let first = ids.next()?;
    ids.all(|id| id == first).then_some(first)
}

/// The node id of the certificate the sender of `request` presented (TLS verified it against
/// the cluster CA before the request got here); `None` on a plaintext connection.
pub fn sender<T>(request: &tonic::Request<T>) -> Option<u64> {
    let certs = request.peer_certs()?;
    node_id_of_der(certs.first()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use exactly_client::certs::{issue_node, new_ca};

    fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// A node loads its own certificate, and refuses another node's, a CA in its place, and
    /// missing or empty files, each with a message that names the file.
    #[test]
    fn a_node_loads_only_its_own_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let ca = new_ca(1).unwrap();
        let two = issue_node(&ca, 2, 1).unwrap();
        let config = PeerTlsConfig {
            ca: write(dir.path(), "ca.pem", &ca.cert),
            cert: write(dir.path(), "node-2.pem", &two.cert),
            key: write(dir.path(), "node-2.key", &two.key),
        };
        PeerTls::load(&config, 2).unwrap();
        let err = PeerTls::load(&config, 3).unwrap_err();
        assert!(
            err.contains("node 2's certificate, this is node 3"),
            "{err}"
        );

        let ca_as_cert = PeerTlsConfig {
            cert: config.ca.clone(),
            ..config.clone()
        };
        let err = PeerTls::load(&ca_as_cert, 2).unwrap_err();
        assert!(err.contains("names no node"), "{err}");

        let empty = PeerTlsConfig {
            key: write(dir.path(), "empty", ""),
            ..config.clone()
        };
        let err = PeerTls::load(&empty, 2).unwrap_err();
        assert!(err.contains("peer-tls.key: no PEM private key"), "{err}");

        let missing = PeerTlsConfig {
            ca: dir.path().join("nope.pem"),
            ..config
        };
        let err = PeerTls::load(&missing, 2).unwrap_err();
        assert!(err.contains("peer-tls.ca: cannot read"), "{err}");
    }

    /// A certificate not valid now is refused with what to do; one close to its end is taken
    /// with a warning; one with time left is just taken.
    #[test]
    fn expiry_is_refused_or_warned_about() {
        let day = 86_400;
        let now = 1_000 * day;
        assert_eq!(expiry_check(now - day, now + 365 * day, now), Ok(None));
        let warning = expiry_check(now - day, now + 29 * day, now)
            .unwrap()
            .unwrap();
        assert!(warning.contains("expires in 29 days"), "{warning}");
        assert!(expiry_check(now - day, now + 30 * day, now)
            .unwrap()
            .is_none());
        let expired = expiry_check(now - 10 * day, now - 2 * day, now).unwrap_err();
        assert!(expired.contains("expired 2 days ago"), "{expired}");
        let early = expiry_check(now + day, now + 2 * day, now).unwrap_err();
        assert!(early.contains("not valid yet"), "{early}");
    }

    #[test]
    fn a_node_certificate_names_its_id() {
        let ca = new_ca(1).unwrap();
        let der = |pem: &str| pem_certificates(pem.as_bytes()).remove(0);
        assert_eq!(
            node_id_of_der(&der(&issue_node(&ca, 7, 1).unwrap().cert)),
            Some(7)
        );
        assert_eq!(node_id_of_der(&der(&ca.cert)), None);
        assert_eq!(node_id_of_der(b"garbage"), None);
    }
}
