//! `walt-operator boot-server`: serves network boot (DHCP, TFTP, HTTP, NFSv3) to a set of devices,
//! each bound by MAC address to an image.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::{TcpListener, UdpSocket};

use super::dhcp::{self, Mode, Network};
use super::nfs::{self, Ports};
use super::node_layer::{self, HostKey, NodeFacts};
use super::persist::{PersistDir, PersistError, PersistOwner};
use super::state::{BadMac, Binding, BootState, Mac};
use super::view::{ImageView, ViewError};
use crate::oci::{LayerCache, Platform};
use crate::overlay::OpaqueXattr;
use crate::runtime::cli::default_cache_dir;
use crate::runtime::image::RegistryAccess;

/// Arguments of `walt-operator boot-server`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A device to boot, `mac=…,ip=…,name=…,model=…,image=…[,host-key=FILE][,tenant=T]` (repeat).
    /// `image` is a registry reference (pulled by digest into the layer cache); `rootfs=DIR` serves
    /// an unpacked root instead (for tests and debugging). `host-key` is the device's SSH host key
    /// (OpenSSH private key; its public key in `FILE.pub`), served in its top layer. `tenant` names
    /// whose `/persist` the device gets (`--persist-dir DIR/<name>/<tenant>`; default `default`).
    #[arg(long = "device", required_unless_present = "from_cluster")]
    pub devices: Vec<String>,
    /// Take the devices from the cluster instead of `--device`: the Devices with `firmware` and
    /// `mac` on `--network`, each serving the image (by digest) of the Node bound to it, kept up to
    /// date by watching Devices, Nodes and Images.
    #[arg(long, conflicts_with_all = ["devices", "netns"])]
    pub from_cluster: bool,
    /// The lab network served (`--from-cluster`): Devices whose `bootNetwork` is this name (`default`:
    /// also the Devices with none).
    #[arg(long, default_value = "default")]
    pub network: String,
    /// The most unregistered Devices the lab keeps (`--from-cluster`): a DHCP request from a MAC no
    /// Device claims is recorded as one (`unknown-<mac>`, no address, lent to nobody: it boots
    /// nothing) until this many exist; past it, requests are logged, not recorded (0: never record).
    #[arg(long, default_value_t = 64)]
    pub max_unknown_devices: usize,
    /// The namespace of the lab's catalog images (`--from-cluster`: a Node's image not in its own
    /// namespace is looked for there).
    #[arg(long, env = "WALT_CATALOG_NAMESPACE", default_value = "walt-catalog")]
    pub catalog_namespace: String,
    /// The lab's default image of a model, `MODEL=IMAGE` (repeat; `--from-cluster`): a device nobody
    /// registered whose model is MODEL (its iPXE user class `walt.node.MODEL` says it, or a lab admin
    /// wrote it in the recorded Device's `spec.model`) boots the catalog Image IMAGE, as on a WalT
    /// server, at an address of `--unregistered-addresses`.
    #[arg(long = "default-image", value_name = "MODEL=IMAGE", value_parser = crate::controller::boot_defaults::DefaultImages::parse_one)]
    pub default_images: Vec<(String, String)>,
    /// Addresses of this lab network lent to devices nobody registered, `FIRST-LAST` (`--from-cluster`;
    /// at most 4096): each recorded device gets one (`status.discovered.address`, kept until it is
    /// registered) and boots the default image of its model (`--default-image`). Unset: unregistered
    /// devices boot nothing.
    #[arg(long, value_name = "FIRST-LAST")]
    pub unregistered_addresses: Option<crate::controller::boot_defaults::AddressPool>,
    /// Devices' SSH host keys (`--from-cluster`): `DIR/<device>` (OpenSSH private key) and
    /// `DIR/<device>.pub`, served in each device's top layer when present and walt made the device
    /// no key of its own (see `--host-key-namespace`): a key a lab admin pinned in `spec.hostKey`.
    #[arg(long)]
    pub host_key_dir: Option<PathBuf>,
    /// The namespace of the Devices' host key Secrets (`--from-cluster`: the operator's, where it
    /// makes `walt-hostkey-<device>` for each network-booted Device): watched, each device served
    /// its own key. Unset: only `--host-key-dir`.
    #[arg(long, env = "WALT_HOST_KEY_NAMESPACE")]
    pub host_key_namespace: Option<String>,
    /// Root's `authorized_keys` for every node (the lab's node key: the operator's public key),
    /// served in each node's top layer. Unset: the image's own.
    #[arg(long, conflicts_with = "node_key")]
    pub authorized_keys: Option<PathBuf>,
    /// The lab's node key (the operator's private key, OpenSSH or PEM): its public key is served as
    /// root's `authorized_keys` (instead of `--authorized-keys`).
    #[arg(long)]
    pub node_key: Option<PathBuf>,
    /// Node API port (WalT's 12345: `sync_clock`; 0: none).
    #[arg(long, default_value_t = super::node_layer::RPC_PORT)]
    pub rpc_port: u16,
    /// Boot notification port (WalT's 12347; 0: none).
    #[arg(long, default_value_t = super::node_layer::NOTIFY_PORT)]
    pub notify_port: u16,
    /// Where to serve the boot records (`GET /boots`: per device, the digest served, mounted and
    /// reported, and the verdict), e.g. `127.0.0.1:9470`. Unset: not served.
    #[arg(long)]
    pub status_listen: Option<SocketAddr>,
    /// The address the service listens on (TFTP, HTTP, NFS) and gives as boot server: loopback, or
    /// the lab network address of this host (inside its network namespace).
    #[arg(long, default_value = "127.0.0.1")]
    pub listen: Ipv4Addr,
    /// NFS and MOUNT port (TCP and UDP).
    #[arg(long, default_value_t = 2049)]
    pub nfs_port: u16,
    /// Portmapper port (0: none; clients then need `port=` and `mountport=`).
    #[arg(long, default_value_t = 111)]
    pub portmap_port: u16,
    /// TFTP port (0: no TFTP).
    #[arg(long, default_value_t = 69)]
    pub tftp_port: u16,
    /// HTTP port (0: no HTTP).
    #[arg(long, default_value_t = 80)]
    pub http_port: u16,
    /// DHCP: authoritative for the lab network, proxy (boot information only), or off.
    #[arg(long, value_enum, default_value_t = Mode::Off)]
    pub dhcp: Mode,
    /// The lab network interface DHCP answers on (required unless `--dhcp off`).
    #[arg(long, required_if_eq_any = [("dhcp", "authoritative"), ("dhcp", "proxy")])]
    pub dhcp_interface: Option<String>,
    /// The lab network's mask (authoritative DHCP).
    #[arg(long, default_value = "255.255.255.0")]
    pub netmask: Ipv4Addr,
    /// The default route given to devices (authoritative DHCP; none by default).
    #[arg(long)]
    pub router: Option<Ipv4Addr>,
    /// DHCP lease time in seconds.
    #[arg(long, default_value_t = 86_400)]
    pub lease_secs: u32,
    /// Append what is served to whom to this file (JSON lines).
    #[arg(long)]
    pub journal: Option<PathBuf>,
    /// Registry host (`host:port`) spoken to over plain HTTP (repeat).
    #[arg(long)]
    pub insecure_registry: Vec<String>,
    /// Docker `config.json` with registry credentials.
    #[arg(long)]
    pub registry_auth_file: Option<PathBuf>,
    /// Enter this network namespace (a name under `/run/netns/`, or a path) once the images are
    /// pulled, before listening: images come over the host's network, devices are served on the lab
    /// network.
    #[arg(long)]
    pub netns: Option<PathBuf>,
    /// Serve each device a read-write `/persist` (WalT's persistent directory, kept across
    /// reboots): `DIR/<device>/<tenant>`, exported to the device alone at
    /// `/var/lib/walt/nodes/<mac|ip|hostname>/persist` (the tenant is the bound Node's namespace with
    /// `--from-cluster`; a device lent to another tenant gets that tenant's directory). Unset: no
    /// `/persist` (the node boots without it).
    #[arg(long, value_name = "DIR")]
    pub persist_dir: Option<PathBuf>,
    /// The most bytes of regular files one (device, tenant)'s `/persist` holds (writes past it get
    /// "quota exceeded"). Unset: the host filesystem's room.
    #[arg(long, value_name = "BYTES")]
    pub persist_quota: Option<u64>,
    /// The walt cache (layer cache).
    #[arg(long, env = "WALT_CACHE", default_value_os_t = default_cache_dir())]
    pub cache_dir: PathBuf,
}

/// Errors of starting the boot service.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A `--device` value is malformed.
    #[error(
        "--device {0:?}: {1} (expected mac=…,ip=…,name=…,model=…,image=REF or rootfs=DIR[,host-key=FILE])"
    )]
    Device(String, String),
    /// A MAC address is malformed.
    #[error(transparent)]
    Mac(#[from] BadMac),
    /// An image could not be pulled.
    #[error("pulling {0}: {1}")]
    Pull(String, String),
    /// An image could not be indexed.
    #[error("indexing {0}: {1}")]
    View(String, ViewError),
    /// A node's top layer could not be made.
    #[error("the top layer of {0}: {1}")]
    TopLayer(String, String),
    /// A key file could not be read.
    #[error("reading {0}: {1}")]
    KeyFile(PathBuf, std::io::Error),
    /// A persistent directory could not be prepared.
    #[error("the /persist of {0}: {1}")]
    Persist(String, PersistError),
    /// A socket could not be opened.
    #[error("listening on {0}: {1} (run inside the lab network namespace, as root for ports below 1024)")]
    Listen(String, std::io::Error),
    /// The runtime could not start.
    #[error("starting the runtime: {0}")]
    Runtime(std::io::Error),
}

/// A parsed `--device`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceArg {
    /// MAC address.
    pub mac: Mac,
    /// Address.
    pub ip: Ipv4Addr,
    /// Host name.
    pub name: String,
    /// Model.
    pub model: String,
    /// Where its image comes from.
    pub source: Source,
    /// Its SSH host key.
    pub host_key: Option<HostKeySource>,
    /// Whose `/persist` it gets: the device, while lent to a tenant (`None`: lent to nobody, no
    /// `/persist`).
    pub persist: Option<PersistOwner>,
}

/// Where a device's SSH host key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKeySource {
    /// An OpenSSH private key file, its public key beside it (`FILE.pub`).
    File(PathBuf),
    /// The key itself (from the cluster: the Device's host key Secret).
    Key(HostKey),
}

/// An image source.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Source {
    /// A registry reference.
    Image(String),
    /// An unpacked root directory.
    Rootfs(PathBuf),
}

/// Parses `mac=…,ip=…,name=…,model=…,image=…|rootfs=…`.
pub fn parse_device(text: &str) -> Result<DeviceArg, BootError> {
    const KNOWN: [&str; 8] = [
        "mac", "ip", "name", "model", "image", "rootfs", "host-key", "tenant",
    ];
    let bad = |why: &str| BootError::Device(text.to_string(), why.to_string());
    let mut fields = std::collections::HashMap::new();
    for part in text.split(',') {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| bad("a field is not key=value"))?;
        if !KNOWN.contains(&key.trim()) {
            return Err(bad(&format!("{key} is not a field")));
        }
        if fields.insert(key.trim(), value.trim()).is_some() {
            return Err(bad(&format!("{key} given twice")));
        }
    }
    let get = |key: &str| {
        fields
            .get(key)
            .copied()
            .filter(|v| !v.is_empty())
            .ok_or_else(|| bad(&format!("{key} is missing")))
    };
    let source = match (fields.get("image"), fields.get("rootfs")) {
        (Some(image), None) => Source::Image((*image).to_string()),
        (None, Some(dir)) => Source::Rootfs(PathBuf::from(dir)),
        _ => return Err(bad("exactly one of image= and rootfs= is needed")),
    };
    let name = get("name")?;
    let valid_name = name.len() <= 63 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if !valid_name {
        return Err(bad("name must be a host name (letters, digits, -)"));
    }
    let tenant = fields.get("tenant").copied().unwrap_or(DEFAULT_TENANT);
    let persist = PersistOwner::new(name, tenant).map_err(|e| bad(&e.to_string()))?;
    Ok(DeviceArg {
        mac: get("mac")?.parse()?,
        ip: get("ip")?.parse().map_err(|_| bad("ip is not an IPv4 address"))?,
        name: name.to_string(),
        model: get("model")?.to_string(),
        source,
        host_key: fields
            .get("host-key")
            .map(|file| HostKeySource::File(PathBuf::from(file))),
        persist: Some(persist),
    })
}

/// The tenant of a `--device` without `tenant=`.
pub const DEFAULT_TENANT: &str = "default";

async fn load(device: &DeviceArg, args: &Args) -> Result<Arc<ImageView>, BootError> {
    match &device.source {
        Source::Rootfs(dir) => {
            let shown = dir.display().to_string();
            let dirs = vec![dir.clone()];
            let view = tokio::task::spawn_blocking(move || {
                ImageView::build(&dirs, &format!("dir:{shown}"), OpaqueXattr::Trusted)
            })
            .await
            .map_err(|e| BootError::Runtime(std::io::Error::other(e)))?;
            view.map(Arc::new)
                .map_err(|e| BootError::View(dir.display().to_string(), e))
        }
        Source::Image(reference) => {
            let pull = |e: String| BootError::Pull(reference.clone(), e);
            let access = RegistryAccess {
                insecure_registries: args.insecure_registry.clone(),
                auth_file: args.registry_auth_file.clone(),
            };
            let client = access.client().map_err(|e| pull(e.to_string()))?;
            let cache = LayerCache::new(args.cache_dir.join("layers")).map_err(|e| pull(e.to_string()))?;
            let platform: Option<Platform> = None;
            let pulled = client
                .pull_image(&cache, reference, platform.as_ref())
                .await
                .map_err(|e| pull(e.to_string()))?;
            let digest = pulled.digest.clone();
            let view = tokio::task::spawn_blocking(move || {
                ImageView::build(&pulled.lower_dirs, &digest, OpaqueXattr::Trusted)
            })
            .await
            .map_err(|e| BootError::Runtime(std::io::Error::other(e)))?;
            view.map(Arc::new)
                .map_err(|e| BootError::View(reference.clone(), e))
        }
    }
}

fn dhcp_socket(interface: &str, port: u16) -> Result<UdpSocket, BootError> {
    let shown = format!("DHCP {interface}:{port}");
    let listen = |e: std::io::Error| BootError::Listen(shown.clone(), e);
    let socket = std::net::UdpSocket::bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port))
        .map_err(listen)?;
    socket.set_broadcast(true).map_err(listen)?;
    nix::sys::socket::setsockopt(
        &socket,
        nix::sys::socket::sockopt::BindToDevice,
        &std::ffi::OsString::from(interface),
    )
    .map_err(|e| listen(e.into()))?;
    socket.set_nonblocking(true).map_err(listen)?;
    UdpSocket::from_std(socket).map_err(listen)
}

/// Root's `authorized_keys` for the nodes: `--authorized-keys`, or the public key of `--node-key`.
fn authorized_keys(args: &Args) -> Result<Option<String>, BootError> {
    if let Some(path) = &args.authorized_keys {
        return read_key(path).map(Some);
    }
    let Some(path) = &args.node_key else {
        return Ok(None);
    };
    let key = crate::ssh::client::load_key_file(path)
        .map_err(|e| BootError::KeyFile(path.clone(), std::io::Error::other(e.to_string())))?;
    let public = key
        .public_key()
        .to_openssh()
        .map_err(|e| BootError::KeyFile(path.clone(), std::io::Error::other(e.to_string())))?;
    Ok(Some(format!("{public} walt-node-key\n")))
}

fn read_key(path: &std::path::Path) -> Result<String, BootError> {
    std::fs::read_to_string(path).map_err(|e| BootError::KeyFile(path.to_path_buf(), e))
}

/// The device's view: its image under its top layer (walt's node files, its keys, the digest).
fn node_view(
    device: &DeviceArg,
    image: Arc<ImageView>,
    args: &Args,
    authorized_keys: Option<&str>,
) -> Result<Arc<ImageView>, BootError> {
    let host_key = match &device.host_key {
        None => None,
        Some(HostKeySource::Key(key)) => Some(key.clone()),
        Some(HostKeySource::File(path)) => Some(HostKey {
            private: read_key(path)?,
            public: read_key(&path.with_extension("pub"))?,
        }),
    };
    let digest = image.digest().to_string();
    let facts = NodeFacts {
        server: args.listen,
        hostname: &device.name,
        mac: device.mac,
        model: &device.model,
        digest: &digest,
        authorized_keys,
        host_key: host_key.as_ref(),
    };
    let shown = device.name.clone();
    let entries =
        node_layer::entries(&facts).map_err(|e| BootError::TopLayer(shown.clone(), e.to_string()))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let view = ImageView::with_top_layer(image, &entries, &device.mac.to_string(), (now, 0))
        .map_err(|e| BootError::TopLayer(shown, e.to_string()))?;
    Ok(Arc::new(view))
}

/// Images indexed so far, by source: each image is pulled and indexed once while a device (or a
/// node still running on it) uses it.
#[derive(Debug, Default)]
pub struct ImageCache {
    images: std::collections::HashMap<Source, std::sync::Weak<ImageView>>,
}

impl ImageCache {
    /// The view of `device`'s image, pulled and indexed unless a live one exists.
    pub async fn image(&mut self, device: &DeviceArg, args: &Args) -> Result<Arc<ImageView>, BootError> {
        if let Some(image) = self.images.get(&device.source).and_then(std::sync::Weak::upgrade) {
            return Ok(image);
        }
        self.images.retain(|_, image| image.strong_count() > 0);
        let image = load(device, args).await?;
        tracing::info!(source = ?device.source, digest = image.digest(), inodes = image.len(), "image indexed");
        self.images.insert(device.source.clone(), Arc::downgrade(&image));
        Ok(image)
    }
}

/// The host key a device is served, as logged: the key's fingerprint, the file, or none (the
/// image's own).
fn host_key_shown(key: Option<&HostKeySource>) -> String {
    match key {
        None => "none (the image's own)".into(),
        Some(HostKeySource::File(path)) => path.display().to_string(),
        Some(HostKeySource::Key(key)) => crate::ssh::client::parse_public_key(&key.public).map_or_else(
            |e| e.to_string(),
            |public| crate::ssh::client::fingerprint(&public),
        ),
    }
}

/// The device's persistent directory under `--persist-dir` (made when missing), when both are set.
fn persist_dir(device: &DeviceArg, args: &Args) -> Result<Option<Arc<PersistDir>>, BootError> {
    let (Some(base), Some(owner)) = (&args.persist_dir, &device.persist) else {
        return Ok(None);
    };
    PersistDir::open(base, owner.clone(), args.persist_quota)
        .map(|dir| Some(Arc::new(dir)))
        .map_err(|e| BootError::Persist(device.name.clone(), e))
}

/// The binding of one device: its image (from `cache`) under its top layer.
pub async fn bind(device: &DeviceArg, args: &Args, cache: &mut ImageCache) -> Result<Binding, BootError> {
    let authorized_keys = authorized_keys(args)?;
    let image = cache.image(device, args).await?;
    let view = node_view(device, image, args, authorized_keys.as_deref())?;
    let persist = persist_dir(device, args)?;
    tracing::info!(
        mac = %device.mac,
        name = %device.name,
        digest = view.digest(),
        host_key = host_key_shown(device.host_key.as_ref()),
        persist = persist.as_ref().map_or("none".into(), |p| format!("{}/{}", p.owner().device, p.owner().tenant)),
        "device bound"
    );
    Ok(Binding {
        mac: device.mac,
        ip: device.ip,
        hostname: device.name.clone(),
        model: device.model.clone(),
        view,
        persist,
    })
}

/// Pulls and indexes the `--device`s' images (each image once), and gives each device its view: the
/// image under its top layer.
pub async fn load_bindings(args: &Args) -> Result<Vec<Binding>, BootError> {
    let devices: Vec<DeviceArg> = args
        .devices
        .iter()
        .map(|d| parse_device(d))
        .collect::<Result<_, _>>()?;
    let mut cache = ImageCache::default();
    let mut bindings = Vec::new();
    for device in &devices {
        bindings.push(bind(device, args, &mut cache).await?);
    }
    Ok(bindings)
}

/// Enters a network namespace (this thread, and the threads it starts from now on).
pub fn enter_netns(netns: &std::path::Path) -> Result<(), BootError> {
    let path = if netns.is_absolute() {
        netns.to_path_buf()
    } else {
        PathBuf::from("/run/netns").join(netns)
    };
    let shown = format!("network namespace {}", path.display());
    let file = std::fs::File::open(&path).map_err(|e| BootError::Listen(shown.clone(), e))?;
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| BootError::Listen(shown, e.into()))
}

/// Starts every server for `bindings`; returns once they listen (the tasks keep running on the
/// runtime).
pub async fn start(args: &Args, bindings: Vec<Binding>) -> Result<Arc<BootState>, BootError> {
    let state = Arc::new(
        BootState::new(bindings, args.journal.clone())
            .map_err(|e| BootError::Listen("the journal".into(), e))?,
    );
    let ip = IpAddr::V4(args.listen);
    let listen = |what: &str, port: u16| {
        let shown = format!("{what} {ip}:{port}");
        move |e| BootError::Listen(shown, e)
    };
    let ports = Ports { nfs: args.nfs_port };
    for port in [args.nfs_port, args.portmap_port].into_iter().filter(|p| *p != 0) {
        let tcp = TcpListener::bind((ip, port))
            .await
            .map_err(listen("NFS/TCP", port))?;
        let udp = UdpSocket::bind((ip, port))
            .await
            .map_err(listen("NFS/UDP", port))?;
        tokio::spawn(nfs::serve_tcp(tcp, state.clone(), ports));
        tokio::spawn(nfs::serve_udp(udp, state.clone(), ports));
    }
    for port in [args.rpc_port, args.notify_port].into_iter().filter(|p| *p != 0) {
        let listener = TcpListener::bind((ip, port))
            .await
            .map_err(listen("node services", port))?;
        tokio::spawn(super::services::serve(listener, state.clone()));
    }
    if let Some(address) = args.status_listen {
        let listener = TcpListener::bind(address)
            .await
            .map_err(|e| BootError::Listen(format!("status {address}"), e))?;
        tokio::spawn(super::http::serve_status(listener, state.clone()));
    }
    if args.tftp_port != 0 {
        let socket = UdpSocket::bind((ip, args.tftp_port))
            .await
            .map_err(listen("TFTP", args.tftp_port))?;
        tokio::spawn(super::tftp::serve(socket, ip, state.clone()));
    }
    if args.http_port != 0 {
        let listener = TcpListener::bind((ip, args.http_port))
            .await
            .map_err(listen("HTTP", args.http_port))?;
        tokio::spawn(super::http::serve(listener, state.clone()));
    }
    if let (Mode::Authoritative | Mode::Proxy, Some(interface)) = (args.dhcp, &args.dhcp_interface) {
        let network = Network {
            server: args.listen,
            netmask: args.netmask,
            router: args.router,
            lease_secs: args.lease_secs,
        };
        let mut ports = vec![67];
        if args.dhcp == Mode::Proxy {
            ports.push(4011);
        }
        for port in ports {
            let socket = dhcp_socket(interface, port)?;
            tokio::spawn(dhcp::serve(socket, args.dhcp, network.clone(), state.clone(), 68));
        }
    }
    Ok(state)
}

/// Logs to stderr (`RUST_LOG`, default `info`).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .try_init();
}

/// Waits for SIGTERM or SIGINT.
pub async fn terminated() -> Result<(), BootError> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(BootError::Runtime)?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}

/// Runs the boot service until SIGTERM or SIGINT.
pub fn run(args: &Args) -> Result<i32, Box<dyn std::error::Error + Send + Sync>> {
    init_tracing();
    let loader = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(BootError::Runtime)?;
    let bindings = loader.block_on(load_bindings(args))?;
    drop(loader);
    if let Some(netns) = &args.netns {
        enter_netns(netns)?;
    }
    let runtime = tokio::runtime::Runtime::new().map_err(BootError::Runtime)?;
    runtime.block_on(async {
        let state = start(args, bindings).await?;
        println!(
            "walt boot server ready: {} device(s) on {}",
            state.bindings().len(),
            args.listen
        );
        terminated().await
    })?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_arguments_parse_and_bad_ones_say_what_is_wrong() {
        let d = parse_device(
            "mac=52:54:00:00:00:01,ip=10.0.0.10,name=vm1,model=pc-x86-64,image=r:5000/a/b:latest",
        )
        .expect("parses");
        assert_eq!(d.mac.to_string(), "52:54:00:00:00:01");
        assert_eq!(d.source, Source::Image("r:5000/a/b:latest".into()));
        let err = parse_device("mac=52:54:00:00:00:01,ip=10.0.0.10,name=vm1,model=pc").expect_err("no image");
        assert!(
            err.to_string().contains("exactly one of image= and rootfs="),
            "{err}"
        );
        let err = parse_device("mac=52:54:00:00:00:01,ip=x,name=vm1,model=pc,rootfs=/r").expect_err("bad ip");
        assert!(err.to_string().contains("ip is not an IPv4 address"), "{err}");
        let err = parse_device("mac=1,ip=10.0.0.1,name=vm1,model=pc,rootfs=/r").expect_err("bad mac");
        assert!(err.to_string().contains("not a MAC address"), "{err}");
        let err = parse_device("mac=52:54:00:00:00:01,ip=10.0.0.1,name=a_b,model=pc,rootfs=/r")
            .expect_err("bad name");
        assert!(err.to_string().contains("host name"), "{err}");
        assert_eq!(
            d.persist,
            Some(PersistOwner::new("vm1", "default").expect("owner")),
            "a device's own /persist, for the default tenant"
        );
        let d = parse_device("mac=52:54:00:00:00:01,ip=10.0.0.1,name=vm1,model=pc,rootfs=/r,tenant=alice")
            .expect("parses");
        assert_eq!(d.persist.map(|p| p.tenant).as_deref(), Some("alice"));
        let err = parse_device("mac=52:54:00:00:00:01,ip=10.0.0.1,name=vm1,model=pc,rootfs=/r,tenant=..")
            .expect_err("bad tenant");
        assert!(
            err.to_string().contains("cannot name a persistent directory"),
            "{err}"
        );
    }
}
