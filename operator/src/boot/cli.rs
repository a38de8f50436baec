//! `walt-operator boot-server`: serves network boot (DHCP, TFTP, HTTP, NFSv3) to a set of devices,
//! each bound by MAC address to an image.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::{TcpListener, UdpSocket};

use super::dhcp::{self, Mode, Network};
use super::nfs::{self, Ports};
use super::state::{BadMac, Binding, BootState, Mac};
use super::view::{ImageView, ViewError};
use crate::oci::{LayerCache, Platform};
use crate::overlay::OpaqueXattr;
use crate::runtime::cli::default_cache_dir;
use crate::runtime::image::RegistryAccess;

/// Arguments of `walt-operator boot-server`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A device to boot, `mac=…,ip=…,name=…,model=…,image=…` (repeat). `image` is a registry
    /// reference (pulled by digest into the layer cache); `rootfs=DIR` serves an unpacked root
    /// instead (for tests and debugging).
    #[arg(long = "device", required = true)]
    pub devices: Vec<String>,
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
    /// The walt cache (layer cache).
    #[arg(long, env = "WALT_CACHE", default_value_os_t = default_cache_dir())]
    pub cache_dir: PathBuf,
}

/// Errors of starting the boot service.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A `--device` value is malformed.
    #[error("--device {0:?}: {1} (expected mac=…,ip=…,name=…,model=…,image=REF or rootfs=DIR)")]
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
}

/// An image source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A registry reference.
    Image(String),
    /// An unpacked root directory.
    Rootfs(PathBuf),
}

/// Parses `mac=…,ip=…,name=…,model=…,image=…|rootfs=…`.
pub fn parse_device(text: &str) -> Result<DeviceArg, BootError> {
    let bad = |why: &str| BootError::Device(text.to_string(), why.to_string());
    let mut fields = std::collections::HashMap::new();
    for part in text.split(',') {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| bad("a field is not key=value"))?;
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
    Ok(DeviceArg {
        mac: get("mac")?.parse()?,
        ip: get("ip")?.parse().map_err(|_| bad("ip is not an IPv4 address"))?,
        name: name.to_string(),
        model: get("model")?.to_string(),
        source,
    })
}

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

/// Pulls and indexes the devices' images.
pub async fn load_bindings(args: &Args) -> Result<Vec<Binding>, BootError> {
    let devices: Vec<DeviceArg> = args
        .devices
        .iter()
        .map(|d| parse_device(d))
        .collect::<Result<_, _>>()?;
    let mut bindings = Vec::new();
    for device in &devices {
        let view = load(device, args).await?;
        tracing::info!(mac = %device.mac, name = %device.name, digest = view.digest(), inodes = view.len(), "image indexed");
        bindings.push(Binding {
            mac: device.mac,
            ip: device.ip,
            hostname: device.name.clone(),
            model: device.model.clone(),
            view,
        });
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

/// Runs the boot service until SIGTERM or SIGINT.
pub fn run(args: &Args) -> Result<i32, Box<dyn std::error::Error + Send + Sync>> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .try_init();
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
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(BootError::Runtime)?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        Ok::<_, BootError>(())
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
    }
}
