//! The cluster's certificate authority and the certificates signed by it (ECDSA P-256, rcgen).

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType,
};

use super::Error;

const CA_COMMON_NAME: &str = "walt-test-ca";

/// A certificate and its key, as PEM files on disk.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// PEM certificate.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8).
    pub key: PathBuf,
}

/// The cluster CA, stored in a directory (`ca.crt`, `ca.key`) so that later runs
/// (`cargo xtask cluster kubeconfig USER`) can still sign client certificates.
#[derive(Debug)]
pub struct Ca {
    dir: PathBuf,
    key: KeyPair,
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, CA_COMMON_NAME);
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn write(path: &Path, contents: &str) -> Result<(), Error> {
    std::fs::write(path, contents).map_err(|e| Error::io(format!("write {}", path.display()), e))
}

fn pki_error(what: &str, e: &rcgen::Error) -> Error {
    Error::Pki(format!("{what}: {e}"))
}

impl Ca {
    /// Creates a new CA in `dir` (overwrites one that is there).
    pub fn create(dir: &Path) -> Result<Ca, Error> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        let key = KeyPair::generate().map_err(|e| pki_error("generate the CA key", &e))?;
        let cert = ca_params()
            .self_signed(&key)
            .map_err(|e| pki_error("self-sign the CA", &e))?;
        write(&dir.join("ca.crt"), &cert.pem())?;
        write(&dir.join("ca.key"), &key.serialize_pem())?;
        Ok(Ca {
            dir: dir.to_path_buf(),
            key,
        })
    }

    /// Loads the CA created earlier in `dir`.
    pub fn load(dir: &Path) -> Result<Ca, Error> {
        let key_path = dir.join("ca.key");
        let pem = std::fs::read_to_string(&key_path)
            .map_err(|e| Error::io(format!("read {}", key_path.display()), e))?;
        let key = KeyPair::from_pem(&pem).map_err(|e| pki_error("parse the CA key", &e))?;
        Ok(Ca {
            dir: dir.to_path_buf(),
            key,
        })
    }

    /// The CA certificate (PEM file).
    pub fn cert_path(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// The CA certificate, PEM text.
    pub fn cert_pem(&self) -> Result<String, Error> {
        let path = self.cert_path();
        std::fs::read_to_string(&path).map_err(|e| Error::io(format!("read {}", path.display()), e))
    }

    /// Signs a certificate for `common_name` in the `organizations` (Kubernetes: user and
    /// groups), valid for the given DNS names and IPs (serving) and/or as a client.
    /// Writes `<dir>/<file_stem>.crt` and `.key`.
    pub fn issue(
        &self,
        file_stem: &str,
        common_name: &str,
        organizations: &[&str],
        dns_names: &[&str],
        ips: &[IpAddr],
    ) -> Result<CertFiles, Error> {
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        // rcgen keeps one value per attribute type; a second organization (group) goes in under
        // the same OID (2.5.4.10) spelled as a custom type, which encodes identically.
        match organizations {
            [] => {}
            [one] => name.push(DnType::OrganizationName, *one),
            [one, two] => {
                name.push(DnType::OrganizationName, *one);
                name.push(DnType::CustomDnType(vec![2, 5, 4, 10]), *two);
            }
            more => {
                return Err(Error::Pki(format!(
                    "{common_name}: at most 2 groups per client certificate, got {}: {}",
                    more.len(),
                    more.join(", ")
                )));
            }
        }
        name.push(DnType::CommonName, common_name);
        params.distinguished_name = name;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let serving = !dns_names.is_empty() || !ips.is_empty();
        if serving {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        for dns in dns_names {
            let dns = (*dns)
                .try_into()
                .map_err(|e| pki_error(&format!("DNS name {dns}"), &e))?;
            params.subject_alt_names.push(SanType::DnsName(dns));
        }
        for ip in ips {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        let key = KeyPair::generate().map_err(|e| pki_error("generate a key", &e))?;
        let issuer = Issuer::new(ca_params(), &self.key);
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(|e| pki_error(&format!("sign the certificate of {common_name}"), &e))?;
        let files = CertFiles {
            cert: self.dir.join(format!("{file_stem}.crt")),
            key: self.dir.join(format!("{file_stem}.key")),
        };
        write(&files.cert, &cert.pem())?;
        write(&files.key, &key.serialize_pem())?;
        Ok(files)
    }
}

/// Writes a fresh key pair for signing service account tokens: `<dir>/sa.key`, `<dir>/sa.pub`.
pub fn service_account_key(dir: &Path) -> Result<(PathBuf, PathBuf), Error> {
    let key = KeyPair::generate().map_err(|e| pki_error("generate the service account key", &e))?;
    let private = dir.join("sa.key");
    let public = dir.join("sa.pub");
    write(&private, &key.serialize_pem())?;
    write(&public, &key.public_key_pem())?;
    Ok((private, public))
}
