//! Certificates for the peer port's mutual TLS: a cluster CA, and one certificate per node that
//! names its node id. `exactly cert` writes them; `exactlyd` reads them (`[peer-tls]`).
//!
//! A node certificate's subject alternative names are `node-<id>.exactly` (who it is: a node
//! checks that the sender of every Raft message is the member it claims to be, and that a
//! joining node is the id it asks to join as) and `peer.exactly` (what a node dials when it
//! does not yet know the id at an address, as when joining). Both names are valid only under the
//! cluster's own CA, which every node trusts alone.

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SanType, SerialNumber,
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
    #[error(
        "client name {0:?}: 1..={CLIENT_NAME_BYTES_MAX} letters, digits, '-', '_' and '.', not \
         starting with '.'"
    )]
    ClientName(String),
    #[error("{0}")]
    Parse(String),
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

/// What a client certificate's subject alternative name starts with: the rest is the client's
/// name, which a node looks up in its `[[client-certs]]` for the scopes.
pub const CLIENT_URI_PREFIX: &str = "urn:exactly:client:";
/// Longest client name.
pub const CLIENT_NAME_BYTES_MAX: usize = 64;

/// Whether `name` may name a client certificate (and its files): 1..=64 of letters, digits,
/// `-`, `_` and `.`, not starting with `.`.
pub fn valid_client_name(name: &str) -> bool {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_.".contains(c);
    !name.is_empty()
        && name.len() <= CLIENT_NAME_BYTES_MAX
        && !name.starts_with('.')
        && name.chars().all(plain)
}

/// A client certificate for the public port (`[api-tls] client-ca`), signed by `ca`, valid for
/// `days`: it names the client `name` (a URI `urn:exactly:client:<name>` and the common name),
/// and is good for TLS client authentication only.
pub fn issue_client(ca: &CertifiedKey, name: &str, days: u32) -> Result<CertifiedKey, CertError> {
    if !valid_client_name(name) {
        return Err(CertError::ClientName(name.to_string()));
    }
    let mut params = CertificateParams::default();
    let uri = format!("{CLIENT_URI_PREFIX}{name}");
    params.subject_alt_names = vec![SanType::URI(uri.as_str().try_into()?)];
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    sign(ca, params, days)
}

/// The certificates of a PEM text, DER-encoded.
fn pem_blocks(pem: &str, label: &str) -> Vec<Vec<u8>> {
    x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .filter_map(Result::ok)
        .filter(|p| p.label == label)
        .map(|p| p.contents)
        .collect()
}

/// The serial number of the first certificate in `pem`, big-endian without leading zeros (as
/// [`revoked_serials`] gives them).
pub fn serial_of_pem(pem: &str) -> Result<Vec<u8>, CertError> {
    let der = pem_blocks(pem, "CERTIFICATE")
        .into_iter()
        .next()
        .ok_or_else(|| CertError::Parse("no PEM certificate".into()))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| CertError::Parse(format!("not a certificate: {e}")))?;
    Ok(cert.tbs_certificate.serial.to_bytes_be())
}

/// The serial numbers a CRL (one DER block) lists, big-endian without leading zeros.
pub fn revoked_serials(der: &[u8]) -> Result<Vec<Vec<u8>>, CertError> {
    let (_, crl) = x509_parser::parse_x509_crl(der)
        .map_err(|e| CertError::Parse(format!("not a CRL: {e}")))?;
    Ok(crl
        .iter_revoked_certificates()
        .map(|r| r.serial().to_bytes_be())
        .collect())
}

/// A certificate revocation list signed by `ca`, valid `days`: every certificate `existing` (a
/// CRL in PEM, this CA's earlier one) lists, plus the certificates (PEM) in `revoke`, with a CRL
/// number one above the existing one's. Returns the PEM and how many certificates it lists.
pub fn revocation_list(
    ca: &CertifiedKey,
    existing: Option<&str>,
    revoke: &[String],
    days: u32,
) -> Result<(String, usize), CertError> {
    if !(1..=3650).contains(&days) {
        return Err(CertError::Days(days));
    }
    let now = time::OffsetDateTime::now_utc();
    let mut revoked: Vec<RevokedCertParams> = Vec::new();
    let mut number: Vec<u8> = Vec::new();
    if let Some(pem) = existing {
        let der = pem_blocks(pem, "X509 CRL")
            .into_iter()
            .next()
            .ok_or_else(|| CertError::Parse("the existing CRL holds no PEM \"X509 CRL\"".into()))?;
        let (_, crl) = x509_parser::parse_x509_crl(&der)
            .map_err(|e| CertError::Parse(format!("the existing CRL: {e}")))?;
        number = crl
            .crl_number()
            .map(|n| n.to_bytes_be())
            .unwrap_or_default();
        for r in crl.iter_revoked_certificates() {
            revoked.push(RevokedCertParams {
                serial_number: SerialNumber::from_slice(&r.serial().to_bytes_be()),
                revocation_time: r.revocation_date.to_datetime(),
                reason_code: None,
                invalidity_date: None,
            });
        }
    }
    for pem in revoke {
        let serial = serial_of_pem(pem)?;
        let serial = SerialNumber::from_slice(&serial);
        if !revoked.iter().any(|r| r.serial_number == serial) {
            revoked.push(RevokedCertParams {
                serial_number: serial,
                revocation_time: now,
                reason_code: None,
                invalidity_date: None,
            });
        }
    }
    // The next CRL number: the existing one plus one (big-endian, carried).
    let mut next = number;
    let mut carry = true;
    for byte in next.iter_mut().rev() {
        if !carry {
            break;
        }
        (*byte, carry) = byte.overflowing_add(1);
    }
    if carry {
        next.insert(0, 1);
    }
    let params = CertificateRevocationListParams {
        this_update: now - time::Duration::hours(1),
        next_update: now + time::Duration::days(i64::from(days)),
        crl_number: SerialNumber::from_slice(&next),
        issuing_distribution_point: None,
        revoked_certs: revoked,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let ca_key = KeyPair::from_pem(&ca.key)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert, ca_key)?;
    let count = params.revoked_certs.len();
    Ok((params.signed_by(&issuer)?.pem()?, count))
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

    #[test]
    fn client_names_are_plain() {
        for good in ["web", "billing-app", "ci_runner.2", &"a".repeat(64)] {
            assert!(valid_client_name(good), "{good}");
        }
        for bad in ["", ".hidden", "a b", "a/b", "é", &"a".repeat(65)] {
            assert!(!valid_client_name(bad), "{bad}");
        }
        let ca = new_ca(30).unwrap();
        assert!(matches!(
            issue_client(&ca, "a/b", 30),
            Err(CertError::ClientName(_))
        ));
    }

    /// A CRL lists what it is asked to revoke, keeps what the earlier one listed (once), and
    /// counts up.
    #[test]
    fn a_revocation_list_grows_and_counts_up() {
        let ca = new_ca(30).unwrap();
        let (a, b) = (
            issue_node(&ca, 1, 30).unwrap(),
            issue_client(&ca, "web", 30).unwrap(),
        );
        let serial = |pem: &str| serial_of_pem(pem).unwrap();
        let der = |pem: &str| pem_blocks(pem, "X509 CRL").remove(0);
        let (empty, n) = revocation_list(&ca, None, &[], 30).unwrap();
        assert_eq!(n, 0);
        assert!(revoked_serials(&der(&empty)).unwrap().is_empty());
        let (one, n) =
            revocation_list(&ca, Some(&empty), std::slice::from_ref(&a.cert), 30).unwrap();
        assert_eq!(n, 1);
        assert_eq!(revoked_serials(&der(&one)).unwrap(), vec![serial(&a.cert)]);
        let (two, n) =
            revocation_list(&ca, Some(&one), &[a.cert.clone(), b.cert.clone()], 30).unwrap();
        assert_eq!(n, 2);
        let listed = revoked_serials(&der(&two)).unwrap();
        assert_eq!(listed, vec![serial(&a.cert), serial(&b.cert)]);
        let number = |pem: &str| {
            let d = der(pem);
            let (_, crl) = x509_parser::parse_x509_crl(&d).unwrap();
            crl.crl_number().unwrap().to_bytes_be()
        };
        assert_eq!(number(&empty), vec![1]);
        assert_eq!(number(&one), vec![2]);
        assert_eq!(number(&two), vec![3]);
        assert!(matches!(
            revocation_list(&ca, Some("not a crl"), &[], 30),
            Err(CertError::Parse(_))
        ));
    }
}
