//! Kubeconfig files with embedded certificates (portable: copy them anywhere).

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use super::Error;
use super::pki::CertFiles;

fn read(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|e| Error::io(format!("read {}", path.display()), e))
}

/// Writes a kubeconfig at `path` for `server`, trusting `ca_pem`, authenticating with `client`.
pub fn write(path: &Path, server: &str, ca_pem: &str, client: &CertFiles, user: &str) -> Result<(), Error> {
    let ca = STANDARD.encode(ca_pem);
    let cert = STANDARD.encode(read(&client.cert)?);
    let key = STANDARD.encode(read(&client.key)?);
    let text = format!(
        "apiVersion: v1
kind: Config
clusters:
- name: walt
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: {user}
  user:
    client-certificate-data: {cert}
    client-key-data: {key}
contexts:
- name: {user}@walt
  context:
    cluster: walt
    user: {user}
    namespace: default
current-context: {user}@walt
"
    );
    std::fs::write(path, text).map_err(|e| Error::io(format!("write {}", path.display()), e))
}
