//! `exactly cert`: the cluster CA, node certificates for the peer port's mutual TLS, server
//! certificates for the public port's TLS, client certificates, and revocation lists.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;
use exactly_client::certs::{
    issue_client, issue_node, issue_server, new_ca, revocation_list, valid_client_name,
    CertifiedKey,
};

use crate::UsageError;

#[derive(Subcommand, Debug, PartialEq)]
pub enum CertCommand {
    /// Make a new cluster CA: DIR/ca.pem (give it to every node) and DIR/ca.key (keep it
    /// offline; it signs node, server and client certificates and revocation lists).
    Ca {
        /// Where to write the files.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Days the CA is valid.
        #[arg(long, default_value_t = 3650)]
        days: u32,
        /// Replace files that exist.
        #[arg(long)]
        force: bool,
    },
    /// Issue node N's certificate with the CA in DIR: DIR/node-N.pem and DIR/node-N.key.
    Node {
        /// The directory of ca.pem and ca.key, where the node's files are written too.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Read ca.pem and ca.key from here instead of DIR (a read-only secret, say).
        #[arg(long, value_name = "DIR")]
        ca_dir: Option<PathBuf>,
        /// The node id the certificate names (the node's --node-id).
        #[arg(long)]
        node_id: u64,
        /// Days the certificate is valid (issue a new one and restart the node before then).
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Replace files that exist.
        #[arg(long)]
        force: bool,
    },
    /// Issue a certificate for the public port (`--api-tls-cert`/`--api-tls-key`) with the CA
    /// in DIR: DIR/NAME.pem and DIR/NAME.key. Clients trust it with `exactly --ca DIR/ca.pem`.
    Server {
        /// The directory of ca.pem and ca.key, where the files are written too.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Read ca.pem and ca.key from here instead of DIR.
        #[arg(long, value_name = "DIR")]
        ca_dir: Option<PathBuf>,
        /// A DNS name or IP address clients dial the node by (repeatable).
        #[arg(long = "name", required = true, value_name = "HOST")]
        names: Vec<String>,
        /// The files' base name.
        #[arg(long, default_value = "api")]
        file: String,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Replace files that exist.
        #[arg(long)]
        force: bool,
    },
    /// Issue a client certificate with the CA in DIR: DIR/client-NAME.pem and
    /// DIR/client-NAME.key. Nodes whose `[api-tls] client-ca` is this CA admit it with the
    /// scopes their `[[client-certs]]` give NAME; use it with `exactly --cert … --key …`.
    Client {
        /// The directory of ca.pem and ca.key, where the files are written too.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Read ca.pem and ca.key from here instead of DIR.
        #[arg(long, value_name = "DIR")]
        ca_dir: Option<PathBuf>,
        /// The client's name (letters, digits, '-', '_', '.'), as `[[client-certs]]` lists it.
        #[arg(long)]
        name: String,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Replace files that exist.
        #[arg(long)]
        force: bool,
    },
    /// Write DIR/crl.pem, the CA's certificate revocation list: what it listed before, plus
    /// the certificates given with --revoke. Nodes that name it (`[peer-tls] crl`,
    /// `[api-tls] crl`) refuse those certificates once they see the file change (within
    /// seconds, on connections already open too). Without --revoke: a fresh list (to start
    /// with, or to renew before --days run out).
    Crl {
        /// The directory of ca.pem and ca.key, where crl.pem is written too.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Read ca.pem and ca.key from here instead of DIR.
        #[arg(long, value_name = "DIR")]
        ca_dir: Option<PathBuf>,
        /// A certificate (PEM) to revoke (repeatable).
        #[arg(long, value_name = "CERT")]
        revoke: Vec<PathBuf>,
        /// Days until the list's next-update date.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
}

/// Reads the CA in `dir`.
fn read_ca(dir: &Path) -> anyhow::Result<CertifiedKey> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).with_context(|| {
            format!(
                "reading {} (make it with `exactly cert ca`)",
                path.display()
            )
        })
    };
    Ok(CertifiedKey {
        cert: read("ca.pem")?,
        key: read("ca.key")?,
    })
}

/// Writes `text` to `path` (mode `mode`), refusing to replace a file unless `force`.
fn write(path: &Path, text: &str, mode: u32, force: bool) -> anyhow::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).mode(mode);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let mut file = options.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            anyhow::Error::new(UsageError(format!(
                "{} exists; --force replaces it",
                path.display()
            )))
        } else {
            anyhow::Error::new(e).context(format!("writing {}", path.display()))
        }
    })?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

fn write_pair(
    dir: &Path,
    name: &str,
    pair: &CertifiedKey,
    force: bool,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}.key"));
    for path in [&cert, &key] {
        if !force && path.exists() {
            return Err(
                UsageError(format!("{} exists; --force replaces it", path.display())).into(),
            );
        }
    }
    write(&cert, &pair.cert, 0o644, force)?;
    write(&key, &pair.key, 0o600, force)?;
    Ok((cert, key))
}

pub fn run(command: &CertCommand) -> anyhow::Result<()> {
    match command {
        CertCommand::Ca { dir, days, force } => {
            let ca = new_ca(*days).map_err(|e| UsageError(e.to_string()))?;
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            let (cert, key) = write_pair(dir, "ca", &ca, *force)?;
            println!(
                "wrote {} and {} (valid {days} days)",
                cert.display(),
                key.display()
            );
        }
        CertCommand::Node {
            dir,
            ca_dir,
            node_id,
            days,
            force,
        } => {
            let ca = read_ca(ca_dir.as_ref().unwrap_or(dir))?;
            let node = issue_node(&ca, *node_id, *days).map_err(|e| UsageError(e.to_string()))?;
            let (cert, key) = write_pair(dir, &format!("node-{node_id}"), &node, *force)?;
            println!(
                "wrote {} and {} (valid {days} days); start the node with\n  \
                 --peer-tls-ca {} --peer-tls-cert {} --peer-tls-key {}",
                cert.display(),
                key.display(),
                ca_dir.as_ref().unwrap_or(dir).join("ca.pem").display(),
                cert.display(),
                key.display()
            );
        }
        CertCommand::Server {
            dir,
            ca_dir,
            names,
            file,
            days,
            force,
        } => {
            let plain = |c: char| c.is_ascii_alphanumeric() || "-_.".contains(c);
            if file.is_empty() || !file.chars().all(plain) || file.starts_with('.') {
                return Err(UsageError(format!(
                    "--file {file:?}: letters, digits, '-', '_' and '.' only"
                ))
                .into());
            }
            let ca = read_ca(ca_dir.as_ref().unwrap_or(dir))?;
            let server = issue_server(&ca, names, *days).map_err(|e| UsageError(e.to_string()))?;
            let (cert, key) = write_pair(dir, file, &server, *force)?;
            println!(
                "wrote {} and {} for {} (valid {days} days); start the node with\n  \
                 --api-tls-cert {} --api-tls-key {}\nand give clients --ca {}",
                cert.display(),
                key.display(),
                names.join(", "),
                cert.display(),
                key.display(),
                ca_dir.as_ref().unwrap_or(dir).join("ca.pem").display()
            );
        }
        CertCommand::Client {
            dir,
            ca_dir,
            name,
            days,
            force,
        } => {
            if !valid_client_name(name) {
                return Err(UsageError(format!(
                    "--name {name:?}: 1..=64 letters, digits, '-', '_' and '.', not starting \
                     with '.'"
                ))
                .into());
            }
            let ca = read_ca(ca_dir.as_ref().unwrap_or(dir))?;
            let client = issue_client(&ca, name, *days).map_err(|e| UsageError(e.to_string()))?;
            let (cert, key) = write_pair(dir, &format!("client-{name}"), &client, *force)?;
            println!(
                "wrote {} and {} for client {name} (valid {days} days); list it on the nodes:\n  \
                 [[client-certs]]\n  name = \"{name}\"\n  scopes = [\"submit\", \"read\"]\n\
                 and call with exactly --ca {} --cert {} --key {}",
                cert.display(),
                key.display(),
                ca_dir.as_ref().unwrap_or(dir).join("ca.pem").display(),
                cert.display(),
                key.display()
            );
        }
        CertCommand::Crl {
            dir,
            ca_dir,
            revoke,
            days,
        } => {
            let ca = read_ca(ca_dir.as_ref().unwrap_or(dir))?;
            let path = dir.join("crl.pem");
            let existing = match std::fs::read_to_string(&path) {
                Ok(text) => Some(text),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => {
                    return Err(anyhow::Error::new(e).context(format!("reading {}", path.display())))
                }
            };
            let mut certs = Vec::new();
            for cert in revoke {
                certs.push(
                    std::fs::read_to_string(cert)
                        .with_context(|| format!("reading {}", cert.display()))?,
                );
            }
            let (pem, count) = revocation_list(&ca, existing.as_deref(), &certs, *days)
                .map_err(|e| UsageError(e.to_string()))?;
            // Written whole under another name and renamed: a node never reads half a list.
            let partial = dir.join(".crl.pem.partial");
            write(&partial, &pem, 0o644, true)?;
            std::fs::rename(&partial, &path)
                .with_context(|| format!("writing {}", path.display()))?;
            println!(
                "wrote {} listing {count} revoked certificate(s), valid {days} days",
                path.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// `cert ca` then `cert node` write the four files (keys readable by the owner only), refuse
    /// to replace them without --force, and a node certificate needs the CA's files.
    #[test]
    fn writes_a_ca_and_node_certificates_and_replaces_nothing_by_default() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path().to_path_buf();
        let node = |force| CertCommand::Node {
            dir: dir.clone(),
            ca_dir: None,
            node_id: 2,
            days: 30,
            force,
        };
        let err = run(&node(false)).unwrap_err();
        assert!(format!("{err:#}").contains("exactly cert ca"), "{err:#}");
        let ca = |force| CertCommand::Ca {
            dir: dir.clone(),
            days: 30,
            force,
        };
        run(&ca(false)).unwrap();
        run(&node(false)).unwrap();
        for (name, mode) in [
            ("ca.pem", 0o644),
            ("ca.key", 0o600),
            ("node-2.pem", 0o644),
            ("node-2.key", 0o600),
        ] {
            let meta = std::fs::metadata(dir.join(name)).unwrap();
            assert_eq!(meta.permissions().mode() & 0o777, mode, "{name}");
        }
        let before = std::fs::read_to_string(dir.join("ca.key")).unwrap();
        for again in [ca(false), node(false)] {
            let err = run(&again).unwrap_err();
            assert!(err.is::<UsageError>(), "{err:#}");
        }
        assert_eq!(std::fs::read_to_string(dir.join("ca.key")).unwrap(), before);
        run(&node(true)).unwrap();
    }

    /// `cert client` writes a client's pair (a bad name is a usage error); `cert crl` starts an
    /// empty list and then adds each revoked certificate once.
    #[test]
    fn issues_client_certificates_and_revocation_lists() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path().to_path_buf();
        run(&CertCommand::Ca {
            dir: dir.clone(),
            days: 30,
            force: false,
        })
        .unwrap();
        let client = |name: &str| CertCommand::Client {
            dir: dir.clone(),
            ca_dir: None,
            name: name.into(),
            days: 30,
            force: false,
        };
        run(&client("web")).unwrap();
        let err = run(&client("../web")).unwrap_err();
        assert!(err.is::<UsageError>(), "{err:#}");
        let meta = std::fs::metadata(dir.join("client-web.key")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let crl = |revoke: Vec<PathBuf>| CertCommand::Crl {
            dir: dir.clone(),
            ca_dir: None,
            revoke,
            days: 30,
        };
        let listed = || {
            let pem = std::fs::read_to_string(dir.join("crl.pem")).unwrap();
            let der = x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
                .next()
                .unwrap()
                .unwrap()
                .contents;
            exactly_client::certs::revoked_serials(&der).unwrap()
        };
        run(&crl(vec![])).unwrap();
        assert!(listed().is_empty());
        let web = dir.join("client-web.pem");
        run(&crl(vec![web.clone()])).unwrap();
        run(&crl(vec![web.clone()])).unwrap();
        let serial =
            exactly_client::certs::serial_of_pem(&std::fs::read_to_string(&web).unwrap()).unwrap();
        assert_eq!(listed(), vec![serial]);
        let err = run(&crl(vec![dir.join("missing.pem")])).unwrap_err();
        assert!(format!("{err:#}").contains("missing.pem"), "{err:#}");
    }
}
