//! Configuration of `walt-operator run`: flags (each also read from an
//! environment variable, for the chart), validated at startup with errors that
//! say what is wrong and what to do, and the Secrets they point to.

use std::net::SocketAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};

use super::shared::error::{Error, Result};

/// Where shell pods keep their content-addressed layer cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LayerCache {
    /// A directory on the cluster node, shared by the shell pods of that node.
    HostPath(String),
    /// A per-pod emptyDir (no sharing between pods).
    EmptyDir,
}

/// Whether shell pods run in a user namespace (`hostUsers: false`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum UserNamespaces {
    /// Use them when the API server (Kubernetes ≥ 1.33) and every node's container runtime support them
    /// (`status.runtimeHandlers[].features.userNamespaces`), else privileged.
    Auto,
    /// Always (`hostUsers: false`).
    Always,
    /// Never: shell pods run privileged.
    Never,
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Flags of `walt-operator run` (every one also has an environment variable).
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// The operator's own namespace: its leader Lease and its Secrets live there.
    #[arg(long, env = "WALT_NAMESPACE")]
    pub namespace: String,
    /// The lab registry, `HOST[:PORT][/PREFIX]`; images without an explicit
    /// `reference` live at `<lab registry>/<namespace>/<name>:latest`.
    #[arg(long, env = "WALT_LAB_REGISTRY")]
    pub lab_registry: String,
    /// Talk plain HTTP to the lab registry (a registry on loopback or inside the cluster).
    #[arg(long, env = "WALT_REGISTRY_PLAIN_HTTP", default_value_t = false, action = clap::ArgAction::Set)]
    pub registry_plain_http: bool,
    /// Registries (`HOST[:PORT]`, comma-separated) that Image `spec.source` references are cloned from
    /// over plain HTTP (a mirror on loopback or inside the cluster). Others are reached over HTTPS.
    #[arg(long, env = "WALT_PLAIN_HTTP_SOURCES", value_delimiter = ',')]
    pub plain_http_sources: Vec<String>,
    /// Secret (type kubernetes.io/dockerconfigjson, in --namespace) with the lab registry's credentials.
    #[arg(long, env = "WALT_REGISTRY_CREDENTIALS_SECRET")]
    pub registry_credentials_secret: Option<String>,
    /// Secret (in --namespace) of the lab registry's token issuer: `tls.key` (ECDSA P-256 private key
    /// whose certificate is the registry's `auth.token.rootcertbundle`) and `tenant-secret` (namespace
    /// credentials are derived from it). When set, every replica serves `GET /token` on
    /// --registry-token-addr and tenant namespaces get a credential of their own namespace only.
    #[arg(long, env = "WALT_REGISTRY_TOKEN_SECRET")]
    pub registry_token_secret: Option<String>,
    /// Where the registry token endpoint listens (with --registry-token-secret).
    #[arg(long, env = "WALT_REGISTRY_TOKEN_ADDR", default_value = "0.0.0.0:5002")]
    pub registry_token_addr: SocketAddr,
    /// How long a registry token lives.
    #[arg(long, env = "WALT_REGISTRY_TOKEN_LIFETIME", default_value = "5m", value_parser = parse_duration)]
    pub registry_token_lifetime: Duration,
    /// Secret (in --namespace) whose `ssh-privatekey` is the lab's node key: the key the operator
    /// and the gateway use to log in to nodes as root. Never shown to users.
    #[arg(long, env = "WALT_NODE_KEY_SECRET")]
    pub node_key_secret: String,
    /// Secret (in --namespace) holding the embedded registry's htpasswd (a registry without token auth).
    /// Given, the operator may create it and the registry credentials when they are missing (see
    /// --create-missing-secrets).
    #[arg(long, env = "WALT_REGISTRY_HTPASSWD_SECRET")]
    pub registry_htpasswd_secret: Option<String>,
    /// Create the Secrets named above when they are missing (never changing existing ones): a new node
    /// key, a new registry token key (certificate, tenant secret), random lab registry credentials when
    /// walt checks them (token issuer or htpasswd given), and their htpasswd. Turn off when an admin
    /// provides them (sealed-secrets, external-secrets): the operator then waits for them.
    #[arg(long, env = "WALT_CREATE_MISSING_SECRETS", default_value_t = true, action = clap::ArgAction::Set)]
    pub create_missing_secrets: bool,
    /// Container image of shell pods and virtual node pods (the walt-operator image).
    #[arg(long, env = "WALT_SHELL_IMAGE")]
    pub shell_image: String,
    /// Reconcile only this namespace (default: all namespaces). For single-tenant installs,
    /// and for tests that run several operators side by side.
    #[arg(long, env = "WALT_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,
    /// The read-only shared image catalog namespace (images every tenant may boot and shell from).
    #[arg(long, env = "WALT_CATALOG_NAMESPACE", default_value = "walt-catalog")]
    pub catalog_namespace: String,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "WALT_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,
    /// Address of the SSH gateway (node shells).
    #[arg(long, env = "WALT_GATEWAY_ADDR", default_value = "0.0.0.0:2222")]
    pub gateway_addr: SocketAddr,
    /// Name of the Service in front of the gateway (in --namespace), reported in ShellSession status.
    #[arg(long, env = "WALT_GATEWAY_SERVICE", default_value = "walt-gateway")]
    pub gateway_service: String,
    /// Port of that Service (what the plugin port-forwards to), reported in ShellSession status.
    #[arg(long, env = "WALT_GATEWAY_SERVICE_PORT", default_value_t = 22)]
    pub gateway_service_port: u16,
    /// Secret (in --namespace) whose `ssh-privatekey` is the gateway's SSH host key, the same in
    /// every replica. Without it each replica makes its own at startup (OpenSSH users then see
    /// a different host key per replica).
    #[arg(long, env = "WALT_GATEWAY_HOST_KEY_SECRET")]
    pub gateway_host_key_secret: Option<String>,
    /// Elect a leader through a Lease (turn off only for a single replica).
    #[arg(long, env = "WALT_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,
    /// Name of the leader Lease.
    #[arg(long, env = "WALT_LEASE_NAME", default_value = "walt-operator")]
    pub lease_name: String,
    /// How long the leader's Lease lasts without renewal, e.g. `15s`. The leader renews it every fifth
    /// of that; it steps down (exit 1) when it could not renew it for that long minus one renewal (the
    /// API server away, or unreachable from it), and another replica takes over after it. Raise it where
    /// the API server restarts take longer (a single control-plane node), so saves are not run again.
    #[arg(long, env = "WALT_LEASE_DURATION", default_value = "15s", value_parser = parse_positive_duration)]
    pub lease_duration: Duration,
    /// This replica's identity in the Lease (default: $POD_NAME, else the host name).
    #[arg(long, env = "WALT_IDENTITY")]
    pub identity: Option<String>,
    /// How often Images are resolved again (tags move), e.g. `10m`.
    #[arg(long, env = "WALT_RESOLVE_INTERVAL", default_value = "10m", value_parser = parse_duration)]
    pub resolve_interval: Duration,
    /// How often reachable physical nodes are probed over SSH, e.g. `1m`.
    #[arg(long, env = "WALT_PROBE_INTERVAL", default_value = "1m", value_parser = parse_duration)]
    pub probe_interval: Duration,
    /// Where each lab network's boot service serves its boot records: `NETWORK=http://HOST:PORT` (its
    /// `--status-listen`), or a bare URL for the `default` network; repeat, or separate with commas. A
    /// Node on a Device walt network-boots (`firmware` set) gets `bootedImage` only when the digest the
    /// boot service mounted is the one the node reports (condition `ImageVerified`). None for its
    /// network: `ImageVerified=Unknown` (BootServiceUnreachable).
    #[arg(long, env = "WALT_BOOT_STATUS_URL", value_delimiter = ',')]
    pub boot_status_url: Vec<String>,
    /// How long a network boot may take to send its boot notification before the watchdog retries it
    /// (WalT's 180 s).
    #[arg(long, env = "WALT_BOOT_TIMEOUT", default_value = "180s", value_parser = parse_duration)]
    pub boot_timeout: Duration,
    /// Retries of a network boot that sends no notification before giving up (WalT's 9).
    #[arg(long, env = "WALT_BOOT_RETRIES", default_value_t = crate::controller::node::netboot::BOOT_RETRIES)]
    pub boot_retries: u32,
    /// The lab networks VM nodes (`spec.virtual.kind: vm`) run on: `NETWORK=BRIDGE`, then the labels
    /// (`LABEL=VALUE`, separated by spaces) of the cluster nodes whose host network holds that
    /// bridge (the one the network's boot service serves), e.g. `default=br-lab
    /// kubernetes.io/hostname=lab-gw`; repeat, or separate networks with commas. A VM node's pod runs
    /// there, its tap plugged into the bridge. None for its Device's boot network: the VM node is
    /// refused (`VmNotConfigured`).
    #[arg(long, env = "WALT_VM_NETWORK", value_delimiter = ',')]
    pub vm_network: Vec<String>,
    /// Container image of VM node pods: `walt-operator` (which runs as `walt-operator vm`) with
    /// `qemu-system-x86_64` and its firmware (SeaBIOS, iPXE ROMs). None: VM nodes are refused
    /// (`VmNotConfigured`).
    #[arg(long, env = "WALT_VM_IMAGE")]
    pub vm_image: Option<String>,
    /// How VM nodes' CPUs run: `auto` (KVM where the cluster node's `/dev/kvm` opens, else TCG), `kvm`
    /// or `tcg`.
    #[arg(long, env = "WALT_VM_ACCEL", value_enum, default_value = "auto")]
    pub vm_accel: crate::runtime::vm::AccelChoice,
    /// How long an image shell waits for the user's decision before keeping the digest and moving no tag.
    #[arg(long, env = "WALT_DECISION_TIMEOUT", default_value = "1h", value_parser = parse_duration)]
    pub decision_timeout: Duration,
    /// Reach physical nodes through this command, e.g. a jump host: `ssh -W %h:%p jump`. It is split
    /// once, at startup, into a program and its arguments like a shell splits words (quotes work; `;`,
    /// pipes and `$` do not), and run without a shell; `%h` and `%p` become the node's address and
    /// port inside the argument that holds them. A command that cannot be split stops the operator.
    #[arg(long, env = "WALT_NODE_PROXY_COMMAND", value_parser = crate::ssh::ProxyCommand::parse)]
    pub node_proxy_command: Option<crate::ssh::ProxyCommand>,
    /// Longest `ttl` of a ShellSession, e.g. `12h`: a longer one is clamped to it, and its Ready
    /// condition says so (the chart's admission policy refuses it first).
    #[arg(long, env = "WALT_MAX_SESSION_TTL", default_value = "12h", value_parser = parse_duration)]
    pub max_session_ttl: Duration,
    /// Longest `idleTimeout` of a ShellSession, e.g. `1h`: a longer one is clamped to it, and its
    /// Ready condition says so (the chart's admission policy refuses it first).
    #[arg(long, env = "WALT_MAX_SESSION_IDLE_TIMEOUT", default_value = "1h", value_parser = parse_duration)]
    pub max_session_idle_timeout: Duration,
    /// Node saves running at once.
    #[arg(long, env = "WALT_MAX_CONCURRENT_SAVES", default_value_t = 2)]
    pub max_concurrent_saves: usize,
    /// How many times a node save is tried again after the registry failed in a way that may pass
    /// (unreachable, 5xx, 429, an upload it lost when it restarted); 0 fails at once.
    #[arg(long, env = "WALT_SAVE_RETRIES", default_value_t = 5)]
    pub save_retries: u32,
    /// The wait before the first retry of a node save; it doubles with each retry (5s: 5, 10, 20,
    /// 40, 80 s, about 2.5 minutes in all with the default 5 retries).
    #[arg(long, env = "WALT_SAVE_RETRY_DELAY", default_value = "5s", value_parser = parse_duration)]
    pub save_retry_delay: Duration,
    /// Reconciles running at once, per kind (bounds memory and API load with thousands of objects).
    #[arg(long, env = "WALT_MAX_CONCURRENT_RECONCILES", default_value_t = 32)]
    pub max_concurrent_reconciles: u16,
    /// How long one command on a node may run (a probe, a reboot, the plan of a save: its busybox
    /// opaque-directory listing too), e.g. `30s`; past it the command is abandoned and the Node or
    /// NodeSave says `CommandTimedOut`. A hung node then holds a worker for this long at most.
    #[arg(long, env = "WALT_NODE_COMMAND_TIMEOUT", default_value = "30s", value_parser = parse_positive_duration)]
    pub node_command_timeout: Duration,
    /// How many bytes of output one such command may send (stdout and stderr together), e.g. `4Mi`;
    /// past it the command is stopped and the Node or NodeSave says `OutputTooLarge`.
    #[arg(long, env = "WALT_NODE_OUTPUT_LIMIT", default_value = "4Mi", value_parser = parse_size)]
    pub node_output_limit: usize,
    /// How long a node save may go without a byte from the node, e.g. `1m`; past it the save fails
    /// (`NodeFailed`, "sent nothing for …") and frees its slot. Time spent pushing does not count.
    #[arg(long, env = "WALT_NODE_STALL_TIMEOUT", default_value = "1m", value_parser = parse_positive_duration)]
    pub node_stall_timeout: Duration,
    /// How long a registry may stay silent, e.g. `1m`: no answer to a request within it (its status
    /// and headers), no byte of an answer's body for it, or none of an upload taken for it; past it the
    /// request fails naming the registry and this bound (a node save tries again, see --save-retries).
    /// Time the registry spends receiving an upload that flows does not count.
    #[arg(long, env = "WALT_REGISTRY_TIMEOUT", default_value = "5m", value_parser = parse_positive_duration)]
    pub registry_timeout: Duration,
    /// Longest time one reconcile may take (an Image clone or squash runs inside one), e.g. `1h`;
    /// past it the reconcile is abandoned, counted as `error="timeout"`, and tried again with backoff.
    #[arg(long, env = "WALT_RECONCILE_TIMEOUT", default_value = "1h", value_parser = parse_positive_duration)]
    pub reconcile_timeout: Duration,
    /// Layer cache of shell pods: `hostPath:/DIR` (shared per cluster node) or `emptyDir`.
    #[arg(long, env = "WALT_SHELL_CACHE", default_value = "hostPath:/var/lib/walt/cache", value_parser = parse_layer_cache)]
    pub shell_cache: LayerCache,
    /// The ClusterRoles that make a user a tenant of a namespace (RoleBindings there to one of them):
    /// their subjects may attach to the namespace's shells in its runtime namespace (`walt-run-<ns>`).
    #[arg(
        long,
        env = "WALT_TENANT_ROLES",
        value_delimiter = ',',
        default_value = "admin,edit,walt-admin,walt-edit"
    )]
    pub tenant_roles: Vec<String>,
    /// The ClusterRole a runtime namespace's RoleBinding grants the tenant's users (get, list and
    /// watch pods, attach, read logs and events; never exec nor create): the chart's
    /// `<release>-session-attach`.
    #[arg(long, env = "WALT_SESSION_ATTACH_ROLE", default_value = "walt-session-attach")]
    pub session_attach_role: String,
    /// How often each runtime namespace is swept of the pods, Services and claims whose ShellSession
    /// or Node is gone (also at start, and whenever one of the tenant's ShellSessions or Nodes goes).
    #[arg(long, env = "WALT_RUNTIME_SWEEP_INTERVAL", default_value = "5m", value_parser = parse_positive_duration)]
    pub runtime_sweep_interval: Duration,
    /// User-namespaced shell pods (`hostUsers: false`).
    #[arg(long, env = "WALT_USER_NAMESPACES", value_enum, default_value = "auto")]
    pub user_namespaces: UserNamespaces,
    /// Log format.
    #[arg(long, env = "WALT_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// Parses `90s`, `10m`, `1h`, `2d` or a bare number of seconds.
pub fn parse_duration(text: &str) -> std::result::Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration: write e.g. 90s, 10m, 1h or 2d"))?;
    let seconds = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("`{text}` has an unknown unit `{unit}`: use s, m, h or d")),
    };
    Ok(Duration::from_secs(number * seconds))
}

/// [`parse_duration`], refusing zero (a bound of nothing would fail everything at once).
pub fn parse_positive_duration(text: &str) -> std::result::Result<Duration, String> {
    let duration = parse_duration(text)?;
    if duration.is_zero() {
        return Err(format!("`{text}` is zero: a bound must be at least 1s"));
    }
    Ok(duration)
}

/// Parses a size: a number of bytes, or with `Ki`, `Mi` or `Gi` (powers of 1024).
pub fn parse_size(text: &str) -> std::result::Result<usize, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: usize = number
        .parse()
        .map_err(|_| format!("`{text}` is not a size: write e.g. 65536, 64Ki, 4Mi or 1Gi"))?;
    let shift = match unit {
        "" => 0,
        "Ki" => 10,
        "Mi" => 20,
        "Gi" => 30,
        _ => return Err(format!("`{text}` has an unknown unit `{unit}`: use Ki, Mi or Gi")),
    };
    number
        .checked_mul(1 << shift)
        .filter(|&bytes| bytes > 0)
        .ok_or_else(|| format!("`{text}` is not a size between 1 byte and the machine's address space"))
}

impl Args {
    /// The leader election's timing: `--lease-duration`, renewed every fifth of it (at least 1 s).
    pub fn lease_timing(&self) -> super::leader::LeaseTiming {
        super::leader::LeaseTiming {
            lease_duration: self.lease_duration,
            retry_period: (self.lease_duration / 5).max(Duration::from_secs(1)),
        }
    }

    /// The bounds of every command on a node and of a save's transfer (see [`crate::ssh::ExecBounds`]).
    pub fn node_bounds(&self) -> crate::ssh::ExecBounds {
        crate::ssh::ExecBounds {
            command_timeout: self.node_command_timeout,
            output_limit: self.node_output_limit,
            stall_timeout: self.node_stall_timeout,
        }
    }
}

/// Parses `hostPath:/DIR` or `emptyDir`.
pub fn parse_layer_cache(text: &str) -> std::result::Result<LayerCache, String> {
    if text == "emptyDir" {
        return Ok(LayerCache::EmptyDir);
    }
    match text.strip_prefix("hostPath:") {
        Some(path) if path.starts_with('/') && path.len() > 1 => Ok(LayerCache::HostPath(path.to_owned())),
        _ => Err(format!(
            "`{text}` is not a layer cache: write `hostPath:/var/lib/walt/cache` or `emptyDir`"
        )),
    }
}

/// A user name and password for a registry.
#[derive(Clone, PartialEq, Eq)]
pub struct RegistryCredentials {
    /// User name.
    pub username: String,
    /// Password or token.
    pub password: String,
}

impl std::fmt::Debug for RegistryCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryCredentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Finds the credentials for `host` in a `.dockerconfigjson` document
/// (`{"auths": {"HOST": {"username", "password"} | {"auth": base64("u:p")}}}`), read by the OCI
/// module's parser. Returns `Ok(None)` when the document has no usable entry for `host`.
pub fn credentials_from_docker_config(document: &[u8], host: &str) -> Result<Option<RegistryCredentials>> {
    let all = crate::oci::Credentials::from_docker_config_json(document).map_err(|error| {
        Error::Invalid(format!(
            ".dockerconfigjson: {error}: create the Secret with `kubectl create secret docker-registry`"
        ))
    })?;
    match all.for_host(host) {
        oci_client::secrets::RegistryAuth::Basic(username, password) => {
            Ok(Some(RegistryCredentials { username, password }))
        }
        oci_client::secrets::RegistryAuth::Anonymous => Ok(None),
        oci_client::secrets::RegistryAuth::Bearer(_) => Err(Error::Invalid(format!(
            "the entry for registry {host} holds a token: shell and virtual node pods log in to the lab registry with a username and password"
        ))),
    }
}

/// The operator's resolved configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// The flags as given.
    pub args: Args,
    /// Host (and port) of the lab registry.
    pub registry_host: String,
    /// Path prefix under the lab registry (may be empty).
    pub registry_prefix: String,
    /// Lab registry credentials, if any.
    pub registry_credentials: Option<RegistryCredentials>,
    /// The registry token issuer (with --registry-token-secret).
    pub token_issuer: Option<std::sync::Arc<crate::oci::token_issuer::TokenIssuer>>,
    /// The lab's node private key (OpenSSH format).
    pub node_key: String,
    /// Its public half (`ssh-ed25519 AAAA…`), given to virtual nodes.
    pub node_public_key: String,
    /// This replica's identity in the Lease.
    pub identity: String,
    /// The gateway's host private key (OpenSSH format), when --gateway-host-key-secret names one.
    pub gateway_host_key: Option<String>,
}

/// Splits `HOST[:PORT][/PREFIX]`, refusing a scheme or an empty host.
pub fn split_registry(text: &str) -> Result<(String, String)> {
    if text.contains("://") {
        return Err(Error::Config(format!(
            "--lab-registry `{text}` must not carry a scheme: write HOST[:PORT][/PREFIX] (plain HTTP is --registry-plain-http)"
        )));
    }
    let (host, prefix) = text.split_once('/').unwrap_or((text, ""));
    if host.is_empty() {
        return Err(Error::Config(format!("--lab-registry `{text}` has no host")));
    }
    Ok((host.to_owned(), prefix.trim_matches('/').to_owned()))
}

impl Config {
    // Long by design: each setting and Secret read once, in the order `--help` lists them, each
    // with its own error message naming the flag and the fix.
    /// Resolves the flags: reads the Secrets they name, with startup errors
    /// that say which Secret or key is missing and how to create it.
    pub async fn load(args: Args, client: Client) -> Result<Self> {
        let (registry_host, registry_prefix) = split_registry(&args.lab_registry)?;
        let secrets: Api<Secret> = Api::namespaced(client, &args.namespace);
        let node_secret = read_secret(&secrets, &args.namespace, &args.node_key_secret, || {
            format!(
                "create it with `kubectl -n {} create secret generic {} --type=kubernetes.io/ssh-auth --from-file=ssh-privatekey=KEYFILE`",
                args.namespace, args.node_key_secret
            )
        })
        .await?;
        let node_key_bytes = secret_key(&node_secret, "ssh-privatekey").ok_or_else(|| {
            Error::Config(format!(
                "Secret {}/{} has no `ssh-privatekey` key: it must hold the lab's node private key (OpenSSH format)",
                args.namespace, args.node_key_secret
            ))
        })?;
        let node_key = String::from_utf8(node_key_bytes).map_err(|_| {
            Error::Config(format!(
                "`ssh-privatekey` of Secret {}/{} is not text (expected an OpenSSH private key)",
                args.namespace, args.node_key_secret
            ))
        })?;
        let node_public_key = russh::keys::decode_secret_key(&node_key, None)
            .map_err(|error| {
                Error::Config(format!(
                    "`ssh-privatekey` of Secret {}/{} is not a usable private key ({error}); it must be unencrypted",
                    args.namespace, args.node_key_secret
                ))
            })?
            .public_key()
            .to_openssh()
            .map_err(|error| Error::Config(format!("cannot encode the node public key: {error}")))?;
        let registry_credentials = match &args.registry_credentials_secret {
            None => None,
            Some(name) => {
                let secret = read_secret(&secrets, &args.namespace, name, || {
                    format!(
                        "create it with `kubectl -n {} create secret docker-registry {name} --docker-server={registry_host} --docker-username=… --docker-password=…`",
                        args.namespace
                    )
                })
                .await?;
                let document = secret_key(&secret, ".dockerconfigjson").ok_or_else(|| {
                    Error::Config(format!(
                        "Secret {}/{name} has no `.dockerconfigjson` key (expected type kubernetes.io/dockerconfigjson)",
                        args.namespace
                    ))
                })?;
                let credentials = credentials_from_docker_config(&document, &registry_host)
                    .map_err(|error| Error::Config(format!("Secret {}/{name}: {error}", args.namespace)))?;
                Some(credentials.ok_or_else(|| {
                    Error::Config(format!(
                        "Secret {}/{name} has no credentials for the lab registry {registry_host}",
                        args.namespace
                    ))
                })?)
            }
        };
        let gateway_host_key = match &args.gateway_host_key_secret {
            None => None,
            Some(name) => {
                let secret = read_secret(&secrets, &args.namespace, name, || {
                    format!(
                        "create it with `ssh-keygen -t ed25519 -N '' -f gateway_host_key && kubectl -n {} create secret generic {name} --type=kubernetes.io/ssh-auth --from-file=ssh-privatekey=gateway_host_key`",
                        args.namespace
                    )
                })
                .await?;
                let bytes = secret_key(&secret, "ssh-privatekey").ok_or_else(|| {
                    Error::Config(format!(
                        "Secret {}/{name} has no `ssh-privatekey` key: it must hold the gateway's host private key",
                        args.namespace
                    ))
                })?;
                let text = String::from_utf8(bytes).map_err(|_| {
                    Error::Config(format!(
                        "`ssh-privatekey` of Secret {}/{name} is not text",
                        args.namespace
                    ))
                })?;
                russh::keys::decode_secret_key(&text, None).map_err(|error| {
                    Error::Config(format!(
                        "`ssh-privatekey` of Secret {}/{name} is not a usable private key ({error}); it must be unencrypted",
                        args.namespace
                    ))
                })?;
                Some(text)
            }
        };
        let token_issuer =
            load_token_issuer(&secrets, &args, &registry_prefix, registry_credentials.as_ref()).await?;
        let identity = identity(&args);
        Ok(Self {
            args,
            registry_host,
            registry_prefix,
            registry_credentials,
            token_issuer,
            node_key,
            node_public_key,
            identity,
            gateway_host_key,
        })
    }

    /// The lab's ceilings on session lifetimes.
    pub fn session_limits(&self) -> super::shared::session::SessionLimits {
        super::shared::session::SessionLimits {
            max_ttl: self.args.max_session_ttl,
            max_idle_timeout: self.args.max_session_idle_timeout,
        }
    }

    /// The lab registry's per-tenant layout (who may read and write which path).
    pub fn lab_paths(&self) -> super::shared::registry_paths::LabPaths {
        super::shared::registry_paths::LabPaths::new(
            &self.registry_host,
            &self.registry_prefix,
            &self.args.catalog_namespace,
        )
    }

    /// The default lab reference of Image `namespace/name`:
    /// `<registry>[/<prefix>]/<namespace>/<name>:latest`.
    pub fn default_reference(&self, namespace: &str, name: &str) -> String {
        if self.registry_prefix.is_empty() {
            format!("{}/{namespace}/{name}:latest", self.registry_host)
        } else {
            format!(
                "{}/{}/{namespace}/{name}:latest",
                self.registry_host, self.registry_prefix
            )
        }
    }
}

/// The audience (`service`) of registry tokens: the registry's `auth.token.service`.
pub const REGISTRY_TOKEN_SERVICE: &str = "walt-registry";
/// The issuer of registry tokens: the registry's `auth.token.issuer`.
pub const REGISTRY_TOKEN_ISSUER: &str = "walt-operator";

/// The registry token issuer of `--registry-token-secret`, if set.
async fn load_token_issuer(
    secrets: &Api<Secret>,
    args: &Args,
    registry_prefix: &str,
    lab: Option<&RegistryCredentials>,
) -> Result<Option<std::sync::Arc<crate::oci::token_issuer::TokenIssuer>>> {
    let Some(name) = &args.registry_token_secret else {
        return Ok(None);
    };
    let namespace = &args.namespace;
    let secret = read_secret(secrets, namespace, name, || {
        format!(
            "create it with `openssl ecparam -name prime256v1 -genkey -noout -out tls.key && openssl req -x509 -new -key tls.key -subj /CN=walt-registry-token -days 3650 -out tls.crt && kubectl -n {namespace} create secret generic {name} --from-file=tls.key --from-file=tls.crt --from-literal=tenant-secret=$(openssl rand -hex 24)`"
        )
    })
    .await?;
    let text = |key: &str| {
        secret_key(&secret, key)
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .ok_or_else(|| Error::Config(format!("Secret {namespace}/{name} has no text key `{key}`")))
    };
    let issuer = crate::oci::token_issuer::TokenIssuer::new(crate::oci::token_issuer::IssuerConfig {
        key_pem: text("tls.key")?,
        tenant_secret: text("tenant-secret")?.trim().as_bytes().to_vec(),
        issuer: REGISTRY_TOKEN_ISSUER.to_owned(),
        service: REGISTRY_TOKEN_SERVICE.to_owned(),
        lab_credential: lab.map(|lab| (lab.username.clone(), lab.password.clone())),
        prefix: registry_prefix.to_owned(),
        catalog_namespace: args.catalog_namespace.clone(),
        lifetime: args.registry_token_lifetime,
    })
    .map_err(|error| Error::Config(format!("Secret {namespace}/{name}: {error}")))?;
    Ok(Some(std::sync::Arc::new(issuer)))
}

/// This replica's identity: --identity, else $POD_NAME, else the host name.
pub fn identity(args: &Args) -> String {
    args.identity
        .clone()
        .or_else(|| std::env::var("POD_NAME").ok())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_else(|| format!("walt-operator-{}", std::process::id()))
}

/// Reads a Secret, turning "not found" and "forbidden" into startup errors.
async fn read_secret(
    api: &Api<Secret>,
    namespace: &str,
    name: &str,
    hint: impl FnOnce() -> String,
) -> Result<Secret> {
    match api.get_opt(name).await {
        Ok(Some(secret)) => Ok(secret),
        Ok(None) => Err(Error::Config(format!(
            "Secret {namespace}/{name} not found: {}",
            hint()
        ))),
        Err(kube::Error::Api(status)) if status.code == 403 => Err(Error::Config(format!(
            "not allowed to read Secret {namespace}/{name} ({}): grant the operator's ServiceAccount `get` on secrets in {namespace}",
            status.message
        ))),
        Err(source) => Err(Error::kube(format!("reading Secret {namespace}/{name}"), source)),
    }
}

/// One key of a Secret's data, as bytes.
pub fn secret_key(secret: &Secret, key: &str) -> Option<Vec<u8>> {
    secret
        .data
        .as_ref()
        .and_then(|data| data.get(key))
        .map(|bytes| bytes.0.clone())
        .or_else(|| {
            secret
                .string_data
                .as_ref()
                .and_then(|data| data.get(key))
                .map(|text| text.as_bytes().to_vec())
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    #[test]
    fn durations() {
        assert!(
            parse_positive_duration("0s")
                .expect_err("zero")
                .contains("at least 1s")
        );
        assert_eq!(parse_positive_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_size("64Ki"), Ok(65536));
        assert_eq!(parse_size("4Mi"), Ok(4 << 20));
        assert_eq!(parse_size("100"), Ok(100));
        assert!(parse_size("0").is_err());
        assert!(parse_size("4MB").expect_err("unit").contains("Ki, Mi or Gi"));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_mins(10)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_hours(2)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert!(parse_duration("ten").unwrap_err().contains("not a duration"));
        assert!(parse_duration("5y").unwrap_err().contains("unknown unit `y`"));
    }

    #[test]
    fn layer_cache() {
        assert_eq!(parse_layer_cache("emptyDir"), Ok(LayerCache::EmptyDir));
        assert_eq!(
            parse_layer_cache("hostPath:/var/cache/walt"),
            Ok(LayerCache::HostPath("/var/cache/walt".into()))
        );
        assert!(parse_layer_cache("hostPath:relative").is_err());
    }

    #[test]
    fn registry_split() {
        assert_eq!(
            split_registry("127.0.0.1:5000").expect("valid"),
            ("127.0.0.1:5000".into(), String::new())
        );
        assert_eq!(
            split_registry("reg.lab:443/walt/").expect("valid"),
            ("reg.lab:443".into(), "walt".into())
        );
        let error = split_registry("http://x").unwrap_err().to_string();
        assert!(error.contains("must not carry a scheme"), "{error}");
    }

    #[test]
    fn docker_config_forms() {
        let plain = br#"{"auths":{"reg.lab:5000":{"username":"u","password":"p"}}}"#;
        let found = credentials_from_docker_config(plain, "reg.lab:5000").expect("parses");
        assert_eq!(
            found.map(|c| (c.username, c.password)),
            Some(("u".into(), "p".into()))
        );
        let encoded = format!(
            r#"{{"auths":{{"https://reg.lab":{{"auth":"{}"}}}}}}"#,
            base64::engine::general_purpose::STANDARD.encode("alice:s3:cret")
        );
        let found = credentials_from_docker_config(encoded.as_bytes(), "reg.lab").expect("parses");
        assert_eq!(found.map(|c| c.password), Some("s3:cret".into()));
        assert_eq!(
            credentials_from_docker_config(plain, "other").expect("parses"),
            None
        );
        assert!(credentials_from_docker_config(b"{}", "x").is_err());
    }

    #[test]
    fn credentials_debug_hides_the_password() {
        let credentials = RegistryCredentials {
            username: "u".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{credentials:?}").contains("hunter2"));
    }
}
