//! A real OCI registry (Debian's `docker-registry`, i.e. Distribution) on 127.0.0.1.
//!
//! ```no_run
//! let registry = walt_tests::registry::Registry::start().expect("registry");
//! let reference = registry.reference("lab/busybox:latest"); // "127.0.0.1:PORT/lab/busybox:latest"
//! // … push with skopeo (`--dest-tls-verify=false`) or with our engine (insecure host = registry.host()) …
//! drop(registry); // stops the process by PID, removes its storage
//! ```
//!
//! Each registry has its own config and storage in a temporary directory and a free port; it is plain HTTP.
//! It is stopped (SIGTERM, then SIGKILL) by PID when the [`Registry`] is dropped, even on panic.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::FixtureError;
use crate::wait::{Poll, Wait};

/// Basic-auth credentials the registry requires (htpasswd, bcrypt).
#[derive(Debug, Clone)]
pub struct BasicAuth {
    /// User name.
    pub username: String,
    /// Password.
    pub password: String,
}

/// A running `docker-registry` on 127.0.0.1; stopped on drop.
#[derive(Debug)]
pub struct Registry {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    auth: Option<BasicAuth>,
    token_auth: bool,
    /// The small tmpfs its storage lives on ([`Registry::start_with_storage_limit`]).
    disk: Option<crate::tmpfs::Tmpfs>,
}

/// Distribution's token authentication: the registry trusts JWTs signed by the key of `root_cert_pem`
/// and sends clients to `realm` for them.
#[derive(Debug, Clone)]
pub struct TokenAuth {
    /// The token endpoint's URL (`http://127.0.0.1:PORT/token`).
    pub realm: String,
    /// The `service` (token audience).
    pub service: String,
    /// The `issuer` the tokens must name.
    pub issuer: String,
    /// PEM certificate of the signing key (the registry's `rootcertbundle`).
    pub root_cert_pem: String,
}

/// A fresh ECDSA P-256 signing key and a self-signed certificate of it: (key PEM (PKCS#8), cert PEM).
pub fn token_signing_key() -> Result<(String, String), FixtureError> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| FixtureError::Failed(format!("generating a P-256 key: {e}")))?;
    let params = rcgen::CertificateParams::new(vec!["walt-registry-token".to_owned()])
        .map_err(|e| FixtureError::Failed(format!("certificate parameters: {e}")))?;
    let cert = params
        .self_signed(&key)
        .map_err(|e| FixtureError::Failed(format!("self-signing the token certificate: {e}")))?;
    Ok((key.serialize_pem(), cert.pem()))
}

impl Registry {
    /// Starts an anonymous (no auth) registry and waits until `GET /v2/` answers 200.
    pub fn start() -> Result<Self, FixtureError> {
        Self::launch(None, false)
    }

    /// Starts an anonymous registry whose storage is a tmpfs of `bytes` bytes, mounted here and
    /// unmounted when the registry is dropped (after it stopped): a registry whose disk fills up.
    /// Needs root.
    pub fn start_with_storage_limit(bytes: u64) -> Result<Self, FixtureError> {
        Self::launch_on(None, false, None, Some(bytes))
    }

    /// Starts a registry with token authentication (and its access log on): `GET /v2/` without a
    /// token answers 401 with a Bearer challenge naming `auth.realm`.
    pub fn start_with_token_auth(auth: &TokenAuth) -> Result<Self, FixtureError> {
        Self::launch_with(None, true, Some(auth))
    }

    /// Starts an anonymous registry that logs every request it serves (its access log, read with
    /// [`Registry::requests_to`]): to prove what was never asked of it.
    pub fn start_recording_requests() -> Result<Self, FixtureError> {
        Self::launch(None, true)
    }

    /// Where the registry's log ends now: pass it to [`Registry::requests_to`] to see only what came after.
    pub fn log_mark(&self) -> usize {
        self.log().len()
    }

    /// The request lines (`GET /v2/REPOSITORY/manifests/latest`…) the registry served for paths
    /// under `/v2/<repository_prefix>` after `mark` ([`Registry::log_mark`]), from its access log
    /// ([`Registry::start_recording_requests`]).
    pub fn requests_to(&self, repository_prefix: &str, mark: usize) -> Vec<String> {
        let needle = format!(" /v2/{repository_prefix}");
        self.log()
            .get(mark..)
            .unwrap_or_default()
            .lines()
            .filter(|line| line.contains(&needle))
            .map(str::to_owned)
            .collect()
    }

    /// Starts a registry that requires HTTP basic auth with these credentials; `GET /v2/` with
    /// them answers 200 before this returns, without them 401.
    pub fn start_with_basic_auth(username: &str, password: &str) -> Result<Self, FixtureError> {
        Self::launch(
            Some(BasicAuth {
                username: username.to_owned(),
                password: password.to_owned(),
            }),
            false,
        )
    }

    fn launch(auth: Option<BasicAuth>, access_log: bool) -> Result<Self, FixtureError> {
        Self::launch_with(auth, access_log, None)
    }

    fn launch_with(
        auth: Option<BasicAuth>,
        access_log: bool,
        token: Option<&TokenAuth>,
    ) -> Result<Self, FixtureError> {
        Self::launch_on(auth, access_log, token, None)
    }

    fn launch_on(
        auth: Option<BasicAuth>,
        access_log: bool,
        token: Option<&TokenAuth>,
        storage_limit: Option<u64>,
    ) -> Result<Self, FixtureError> {
        crate::require_tool("docker-registry", "docker-registry")?;
        let dir = tempfile::Builder::new()
            .prefix("walt-registry-")
            .tempdir()
            .map_err(|e| FixtureError::io("creating the registry's temporary directory", e))?;
        let port = free_port()?;
        let storage = dir.path().join("data");
        std::fs::create_dir_all(&storage).map_err(|e| FixtureError::io("creating registry storage", e))?;
        let disk = storage_limit
            .map(|bytes| crate::tmpfs::Tmpfs::mount(&storage, bytes))
            .transpose()?;
        let mut config = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: {}\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            !access_log,
            storage.display()
        );
        if let Some(auth) = &auth {
            let hash = bcrypt::hash(&auth.password, 5)
                .map_err(|e| FixtureError::Failed(format!("hashing the htpasswd password: {e}")))?;
            let htpasswd = dir.path().join("htpasswd");
            std::fs::write(&htpasswd, format!("{}:{hash}\n", auth.username))
                .map_err(|e| FixtureError::io("writing htpasswd", e))?;
            let _ = write!(
                config,
                "auth:\n  htpasswd:\n    realm: walt-test\n    path: {}\n",
                htpasswd.display()
            );
        }
        if let Some(token) = token {
            let bundle = dir.path().join("token-root.pem");
            std::fs::write(&bundle, &token.root_cert_pem)
                .map_err(|e| FixtureError::io("writing the token root certificate", e))?;
            let _ = write!(
                config,
                "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
                token.realm,
                token.service,
                token.issuer,
                bundle.display()
            );
        }
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).map_err(|e| FixtureError::io("writing registry config", e))?;
        let child = spawn(dir.path())?;
        let mut registry = Registry {
            child: Some(child),
            port,
            dir,
            auth,
            token_auth: token.is_some(),
            disk,
        };
        registry.wait_ready()?;
        Ok(registry)
    }

    fn wait_ready(&mut self) -> Result<(), FixtureError> {
        let mut child = self.child.take();
        let serving = Wait::new(
            &format!("docker-registry on {} to answer GET /v2/ with 200", self.host()),
            Duration::from_secs(20),
        )
        .every(Duration::from_millis(50))
        .until(|| {
            if let Some(child) = child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(format!("docker-registry exited with {status} before serving"));
            }
            let ready = if self.token_auth { 401 } else { 200 };
            Ok(match self.get_status("/v2/") {
                Ok(status) if status == ready => Poll::Ready(()),
                Ok(status) => Poll::Pending(format!("GET /v2/ answered {status}")),
                Err(e) => Poll::Pending(format!("GET /v2/: {e}")),
            })
        });
        self.child = child;
        serving.map_err(|e| FixtureError::Failed(format!("{e}; its log:\n{}", self.log())))
    }

    /// `127.0.0.1:PORT`: the registry host as it appears in image references.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The TCP port the registry listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT/<repository_and_tag>`, e.g. `reference("lab/busybox:1")`.
    pub fn reference(&self, repository_and_tag: &str) -> String {
        format!("{}/{repository_and_tag}", self.host())
    }

    /// The credentials this registry requires, if any.
    pub fn auth(&self) -> Option<&BasicAuth> {
        self.auth.as_ref()
    }

    /// A Docker `config.json` (also the content of a `kubernetes.io/dockerconfigjson` Secret) with this
    /// registry's credentials; `{"auths":{}}` for an anonymous registry.
    pub fn docker_config_json(&self) -> String {
        use base64::Engine as _;
        match &self.auth {
            None => "{\"auths\":{}}".to_owned(),
            Some(auth) => {
                let token = base64::engine::general_purpose::STANDARD
                    .encode(format!("{}:{}", auth.username, auth.password));
                serde_json::json!({"auths": {self.host(): {"auth": token}}}).to_string()
            }
        }
    }

    /// The `--creds user:password` / `--src-creds` / `--dest-creds` value for skopeo, if auth is on.
    pub fn skopeo_creds(&self) -> Option<String> {
        self.auth
            .as_ref()
            .map(|a| format!("{}:{}", a.username, a.password))
    }

    /// Where the registry keeps its data (`docker/registry/v2/…`).
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The uploads whose data the registry still holds (`<repository>/_uploads/<id>`, with its size): what a
    /// failed push left behind until the registry purges it. Empty once every push finished or was
    /// cancelled. (Distribution 2.8 writes a hash-state file of about 100 bytes back into a cancelled
    /// upload's directory as it closes it: no data, so not counted.)
    pub fn uploads_holding_data(&self) -> Vec<(String, u64)> {
        let repositories = self.storage_dir().join("docker/registry/v2/repositories");
        let mut held = Vec::new();
        let mut pending = vec![repositories.clone()];
        while let Some(dir) = pending.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if !path.is_dir() {
                    continue;
                }
                if entry.file_name() == "_uploads" {
                    for upload in std::fs::read_dir(&path).into_iter().flatten().flatten() {
                        let Ok(data) = std::fs::metadata(upload.path().join("data")) else {
                            continue;
                        };
                        let name = upload.path();
                        let name = name.strip_prefix(&repositories).unwrap_or(&name);
                        held.push((name.display().to_string(), data.len()));
                    }
                } else if !entry.file_name().to_string_lossy().starts_with('_') {
                    pending.push(path);
                }
            }
        }
        held.sort();
        held
    }

    /// Path of a blob's data file in the registry's storage (`sha256:…` digest).
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.storage_dir()
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2.min(hex.len())])
            .join(hex)
            .join("data")
    }

    /// Overwrites a stored blob's bytes (same length, bytes flipped) so the registry serves content that
    /// does not match its digest: for digest-verification tests. Distribution does not re-check on read.
    pub fn corrupt_blob(&self, digest: &str) -> Result<(), FixtureError> {
        let path = self.blob_path(digest);
        let mut bytes =
            std::fs::read(&path).map_err(|e| FixtureError::io(&format!("reading {}", path.display()), e))?;
        let middle = bytes.len() / 2;
        for byte in bytes.iter_mut().skip(middle).take(64) {
            *byte ^= 0x5a;
        }
        std::fs::write(&path, bytes).map_err(|e| FixtureError::io(&format!("writing {}", path.display()), e))
    }

    /// The registry's own log (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Sends `GET path` (with the registry's credentials when it has some) and returns the HTTP status.
    pub fn get_status(&self, path: &str) -> Result<u16, FixtureError> {
        self.get_status_with(path, self.auth.as_ref())
    }

    /// Sends `GET path` with the given credentials (or none) and returns the HTTP status.
    pub fn get_status_with(&self, path: &str, auth: Option<&BasicAuth>) -> Result<u16, FixtureError> {
        use base64::Engine as _;
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))
            .map_err(|e| FixtureError::io("connecting to the registry", e))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| FixtureError::io("setting a read timeout", e))?;
        let authorization = auth
            .map(|a| {
                format!(
                    "Authorization: Basic {}\r\n",
                    base64::engine::general_purpose::STANDARD
                        .encode(format!("{}:{}", a.username, a.password))
                )
            })
            .unwrap_or_default();
        write!(
            stream,
            "GET {path} HTTP/1.0\r\nHost: {}\r\n{authorization}\r\n",
            self.host()
        )
        .map_err(|e| FixtureError::io("sending a request to the registry", e))?;
        let mut head = [0u8; 12];
        stream
            .read_exact(&mut head)
            .map_err(|e| FixtureError::io("reading the registry's answer", e))?;
        std::str::from_utf8(&head[9..12])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                FixtureError::Failed(format!(
                    "bad HTTP status line {:?}",
                    String::from_utf8_lossy(&head)
                ))
            })
    }

    /// Kills the registry at once (SIGKILL), as a crash would: uploads in flight are cut. Its storage
    /// stays; [`Registry::restart`] serves it again on the same port.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes the registry (SIGSTOP): the kernel still accepts connections to it and takes the first
    /// bytes sent into its socket buffers, but it answers nothing, as a hung registry. [`Registry::thaw`]
    /// lets it go on; stopping it thaws it first.
    pub fn freeze(&self) -> Result<(), FixtureError> {
        self.signal(nix::sys::signal::Signal::SIGSTOP)
    }

    /// Lets a frozen registry ([`Registry::freeze`]) go on (SIGCONT).
    pub fn thaw(&self) -> Result<(), FixtureError> {
        self.signal(nix::sys::signal::Signal::SIGCONT)
    }

    fn signal(&self, signal: nix::sys::signal::Signal) -> Result<(), FixtureError> {
        let child = self
            .child
            .as_ref()
            .ok_or_else(|| FixtureError::Failed("the registry is not running".to_owned()))?;
        let pid = i32::try_from(child.id())
            .map_err(|_| FixtureError::Failed(format!("pid {} out of range", child.id())))?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal)
            .map_err(|e| FixtureError::io(&format!("sending {signal} to the registry"), e.into()))
    }

    /// The tmpfs its storage lives on, when started with [`Registry::start_with_storage_limit`].
    pub fn disk(&self) -> Option<&crate::tmpfs::Tmpfs> {
        self.disk.as_ref()
    }

    /// Starts the registry again (same config, port and storage) and waits until it serves.
    pub fn restart(&mut self) -> Result<(), FixtureError> {
        self.stop();
        self.child = Some(spawn(self.dir.path())?);
        self.wait_ready()
    }

    /// Stops the registry now (also done on drop).
    pub fn stop(&mut self) {
        // A frozen registry would not see SIGTERM.
        let _ = self.thaw();
        if let Some(mut child) = self.child.take() {
            crate::stop_child(&mut child);
        }
    }

    /// The directory holding config, storage and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
        // Unmounted (lazily) before the temporary directory is removed.
        if let Some(disk) = &mut self.disk {
            disk.unmount();
        }
    }
}

/// Starts `docker-registry serve DIR/config.yml`, logging (appending) to `DIR/registry.log`.
fn spawn(dir: &Path) -> Result<Child, FixtureError> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("registry.log"))
        .map_err(|e| FixtureError::io("opening the registry log", e))?;
    let log_err = log
        .try_clone()
        .map_err(|e| FixtureError::io("cloning registry log", e))?;
    Command::new("docker-registry")
        .arg("serve")
        .arg(dir.join("config.yml"))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .spawn()
        .map_err(|e| FixtureError::io("starting docker-registry", e))
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> Result<u16, FixtureError> {
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|e| FixtureError::io("finding a free port", e))?;
    let port = listener
        .local_addr()
        .map_err(|e| FixtureError::io("finding a free port", e))?
        .port();
    Ok(port)
}
