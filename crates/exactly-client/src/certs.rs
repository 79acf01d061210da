//! Certificates for the peer port's mutual TLS: a cluster CA, and one certificate per node that
//! names its node id. `exactly cert` writes them; `exactlyd` reads them (`[peer-tls]`).
//!
//! A node certificate's subject alternative names are `node-<id>.exactly` (who it is: a node
//! checks that the sender of every Raft message is the member it claims to be, and that a
//! joining node is the id it asks to join as) and `peer.exactly` (what a node dials when it
//! does not yet know the id at an address, as when joining). Both names are valid only under the
//! cluster's own CA, which every node trusts alone.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// The name every node certificate carries besides its own.
pub const PEER_NAME: &str = "peer.exactly";

/// The name that identifies node `id` in its certificate.
pub fn node_name(id: u64) -> String {
    format!("node-{id}.exactly")
}

/// The node id a certificate name stands for (`node-<id>.exactly`), if it is one.
pub fn node_id_of_name(name: &str) -> Option<u64> {
    let id = name.strip_prefix("node-")?.strip_suffix(".exactly")?;
    if id.starts_with('0') || !id.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    id.parse().ok().filter(|&id| id > 0)
}

/// A certificate and its private key, both PEM.
#[derive(Clone, Debug)]
pub struct CertifiedKey {
    pub cert: String,
    pub key: String,
}

/// Why a certificate could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("node ids start at 1")]
    NodeId,
    #[error("validity must be 1..=3650 days, got {0}")]
    Days(u32),
    #[error("a server certificate needs 1..={SERVER_NAMES_MAX} names, got {0}")]
    Names(usize),
}

fn validity(params: &mut CertificateParams, days: u32) -> Result<(), CertError> {
    if !(1..=3650).contains(&days) {
        return Err(CertError::Days(days));
    }
    let now = time::OffsetDateTime::now_utc();
    // A little slack for clocks a few minutes behind the issuer's.
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(i64::from(days));
    Ok(())
}

/// A new cluster CA valid for `days`: it signs node certificates and nothing else.
pub fn new_ca(days: u32) -> Result<CertifiedKey, CertError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "exactly cluster CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut params, days)?;
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok(CertifiedKey {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// A certificate for node `node_id`, signed by `ca`, valid for `days`, usable as a TLS server
/// (other nodes dial it) and client (it dials them).
pub fn issue_node(ca: &CertifiedKey, node_id: u64, days: u32) -> Result<CertifiedKey, CertError> {
    if node_id == 0 {
        return Err(CertError::NodeId);
    }
    let name = node_name(node_id);
    let mut params = CertificateParams::new(vec![name.clone(), PEER_NAME.to_string()])?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    sign(ca, params, days)
}

/// Signs `params` with `ca` for `days`, with a new key.
fn sign(
    ca: &CertifiedKey,
    mut params: CertificateParams,
    days: u32,
) -> Result<CertifiedKey, CertError> {
    let ca_key = KeyPair::from_pem(&ca.key)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert, ca_key)?;
    validity(&mut params, days)?;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(CertifiedKey {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// Names of one server certificate, at most.
pub const SERVER_NAMES_MAX: usize = 32;

/// A certificate for a node's public port (`[api-tls]`), signed by `ca`, valid for `days`, for
/// the DNS names and IP addresses clients dial it by.
pub fn issue_server(
    ca: &CertifiedKey,
    names: &[String],
    days: u32,
) -> Result<CertifiedKey, CertError> {
    if names.is_empty() || names.len() > SERVER_NAMES_MAX {
        return Err(CertError::Names(names.len()));
    }
    let mut params = CertificateParams::new(names.to_vec())?;
    params
        .distinguished_name
        .push(DnType::CommonName, names[0].clone());
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    sign(ca, params, days)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_round_trip_and_refuse_look_alikes() {
        assert_eq!(node_id_of_name(&node_name(7)), Some(7));
        assert_eq!(node_id_of_name(&node_name(u64::MAX)), Some(u64::MAX));
        for bad in [
            "node-0.exactly",
            "node-07.exactly",
            "node-+7.exactly",
            "node-.exactly",
            "node-7.exactly.evil",
            "xnode-7.exactly",
            "peer.exactly",
            "node-99999999999999999999.exactly",
        ] {
            assert_eq!(node_id_of_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_ca_issues_node_certificates() {
        let ca = new_ca(30).unwrap();
        assert!(ca.cert.starts_with("-----BEGIN CERTIFICATE-----"));
        let node = issue_node(&ca, 3, 30).unwrap();
        assert!(node.cert.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(node.key.contains("PRIVATE KEY"));
        assert!(matches!(issue_node(&ca, 0, 30), Err(CertError::NodeId)));
        assert!(matches!(new_ca(0), Err(CertError::Days(0))));
        assert!(matches!(
            issue_node(&ca, 1, 4000),
            Err(CertError::Days(4000))
        ));
    }
}
