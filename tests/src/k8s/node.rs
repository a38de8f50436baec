//! The cluster tier's node: containerd + runc, CNI (bridge, host-local, loopback), a registry, the
//! kubelet, kube-proxy and the cluster DNS ([`super::services`]), in a network namespace created here.
//!
//! Layout, and why:
//! - `ip netns add walt-<pid>-<n>`: the node's network namespace. The control plane also runs in
//!   it (the API server must reach the kubelet at the node address, pods must reach the API server).
//!   The node address is 10.200.0.2 on a bridge device `walt0`, pods get 10.244.0.0/24 on `cni0`:
//!   these addresses exist only inside the namespace, which has no default route: nothing in it
//!   can send traffic elsewhere (its one other route, the Services' ClusterIPs onto the bridge, is
//!   there for host-network pods: kube-proxy translates those addresses to the node's own). The API server and the registry listen inside it (the registry on
//!   every address of the namespace, so pods also reach it at the node address) and are bridged
//!   to the same port on the host's 127.0.0.1 (socat through a Unix socket), so one URL works from
//!   the host and the node.
//! - containerd, the kubelet and the pods' sandboxes share a private mount namespace (held by a
//!   `sleep` process): their mounts (overlay roots, volumes, pod network namespace files, on a
//!   tmpfs over `/run/netns`) never appear on the host and vanish with it. In it, the six kernel
//!   sysctls the kubelet insists on (`vm.overcommit_memory`, `kernel.panic`…) are shown with the
//!   values it wants: otherwise it would rewrite these machine-wide settings of a shared machine.
//! - Pods live under the cgroup `/walt-<pid>-<n>` of every cgroup v1 hierarchy (cgroupfs driver;
//!   this machine has no systemd); cleanup kills what is left there.
//! - Images: a registry (Debian `docker-registry`) inside the namespace; the pause image is built
//!   here from Debian's busybox-static ([`super::images`]) and pushed there, never pulled from
//!   the internet.
//! - A second node (opt-in, [`super::SecondNode`]) is the same parts again in a namespace of its
//!   own, `walt-<pid>-<n>`, plugged into the first node's bridge `walt0` by a veth pair: address
//!   10.200.0.3, pods 10.244.1.0/24, a route each way between the two pod networks. It runs no
//!   control plane, registry or DNS: it reaches the first node's (API server, registry, CoreDNS
//!   behind the `kube-dns` Service) at the first node's address, and its own kube-proxy routes
//!   ClusterIPs for its pods.

use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::{Cluster, Error, SERVICE_CIDR, free_port, images, services};
use crate::process::{Daemon, Lifetime, pid_alive, stop_pid};
use crate::wait::Wait;

/// The node's name in Kubernetes.
pub const NODE_NAME: &str = "walt-node";
/// The node's address (inside its network namespace only).
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
/// The pod network (inside the node's network namespace only).
pub const POD_CIDR: &str = "10.244.0.0/24";
/// The second node's name in Kubernetes (opt-in, [`super::SecondNode`]).
pub const SECOND_NODE_NAME: &str = "walt-node-2";
/// The second node's address, on the first node's bridge.
pub const SECOND_NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 3);
/// The second node's pod network.
pub const SECOND_POD_CIDR: &str = "10.244.1.0/24";
/// The lab network's bridge, in the first node's namespace.
const BRIDGE: &str = "walt0";
/// Where Debian's containernetworking-plugins live.
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";

/// The sysctls the kubelet wants (see module docs), with their values.
const KUBELET_SYSCTLS: [(&str, &str); 6] = [
    ("vm/overcommit_memory", "1"),
    ("vm/panic_on_oom", "0"),
    ("kernel/panic", "10"),
    ("kernel/panic_on_oops", "1"),
    ("kernel/keys/root_maxkeys", "1000000"),
    ("kernel/keys/root_maxbytes", "25000000"),
];

/// The node registry `127.0.0.1:PORT` (as the host and the node see it) as pods see it: `NODE_IP:PORT`.
pub fn registry_for_pods(registry: &str) -> String {
    let port = registry.rsplit_once(':').map_or(registry, |(_, port)| port);
    format!("{NODE_IP}:{port}")
}

/// Checks that this machine can run the cluster tier; the error says what is missing.
pub fn check_available() -> Result<(), Error> {
    if !nix::unistd::Uid::effective().is_root() {
        return Err(Error::Unavailable(
            "the kubelet, containerd and network namespaces need root".into(),
        ));
    }
    let mut missing = Vec::new();
    for program in [
        "/usr/bin/containerd",
        "/usr/sbin/runc",
        "/usr/bin/containerd-shim-runc-v2",
        "/usr/bin/docker-registry",
        "/usr/bin/skopeo",
        "/usr/bin/socat",
        "/usr/bin/nsenter",
        "/usr/bin/unshare",
        "/bin/busybox",
        "/usr/sbin/iptables",
        "/usr/sbin/iptables-save",
        "/usr/sbin/iptables-restore",
    ] {
        if !Path::new(program).exists() {
            missing.push(program.to_string());
        }
    }
    for plugin in ["bridge", "host-local", "loopback"] {
        let path = Path::new(CNI_BIN_DIR).join(plugin);
        if !path.exists() {
            missing.push(path.display().to_string());
        }
    }
    if !missing.is_empty() {
        return Err(Error::Prerequisite(format!(
            "{} not found: install the Debian packages containerd runc containernetworking-plugins \
             docker-registry skopeo socat busybox-static iptables (.ci/install-deps)",
            missing.join(", ")
        )));
    }
    for controller in ["cpu", "cpuacct", "cpuset", "memory", "pids"] {
        if !cgroup_v1_dir(controller).exists() && !cgroup_v2_has(controller) {
            return Err(Error::Unavailable(format!(
                "the kubelet needs the {controller} cgroup controller, which is not mounted"
            )));
        }
    }
    Ok(())
}

fn cgroup_v1_dir(controller: &str) -> PathBuf {
    Path::new("/sys/fs/cgroup").join(controller)
}

fn cgroup_v2_has(controller: &str) -> bool {
    std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
        .is_ok_and(|c| c.split_whitespace().any(|x| x == controller))
}

fn run(program: &str, args: &[&str]) -> Result<String, Error> {
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| Error::io(format!("run {program}"), e))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(Error::Command {
            command: format!("{program} {}", args.join(" ")),
            message: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

fn write(path: &Path, contents: &str) -> Result<(), Error> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(format!("create {}", parent.display()), e))?;
    }
    std::fs::write(path, contents).map_err(|e| Error::io(format!("write {}", path.display()), e))
}

/// Where a node sits on the lab network and what it registers as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Place {
    /// Its name in Kubernetes.
    pub name: String,
    /// Its address.
    pub ip: Ipv4Addr,
    /// Its pods' network.
    pub pod_cidr: String,
    /// The CPU its kubelet is built for (see [`super::SecondNode::architecture`]).
    pub architecture: images::Arch,
}

impl Place {
    /// The first node: it hosts the control plane, the registry and the cluster DNS.
    pub fn first() -> Place {
        Place {
            name: NODE_NAME.into(),
            ip: NODE_IP,
            pod_cidr: POD_CIDR.into(),
            architecture: images::Arch::host(),
        }
    }

    /// The second node, of the CPU `architecture`.
    pub fn second(architecture: images::Arch) -> Place {
        Place {
            name: SECOND_NODE_NAME.into(),
            ip: SECOND_NODE_IP,
            pod_cidr: SECOND_POD_CIDR.into(),
            architecture,
        }
    }

    /// Whether this is the first node.
    pub fn is_first(&self) -> bool {
        self.name == NODE_NAME
    }

    /// The name of one of this node's processes (log file, process list): the first node's keep
    /// their plain names, another node's carry its name.
    pub fn component(&self, base: &str) -> String {
        if self.is_first() {
            base.to_owned()
        } else {
            format!("{base}-{}", self.name)
        }
    }

    /// Where this node reaches what listens on the first node's namespace (API server, registry):
    /// its loopback for the first node itself, the first node's address for another one.
    pub fn first_node_address(&self) -> Ipv4Addr {
        if self.is_first() {
            Ipv4Addr::LOCALHOST
        } else {
            NODE_IP
        }
    }
}

/// The `ip` commands that give a node its network (pure): the first node gets the bridge and its
/// address in `netns`; another node gets a veth pair from the first node's namespace `first`
/// (one end on the bridge, the other its `eth0` with its address) and a route each way between
/// the two pod networks. Each gets a route for the Services' ClusterIPs onto its link: the
/// namespace has no default route, and a connection from the node's own network (a host-network
/// pod's, such as the boot service's to the API server's ClusterIP) is refused by the route lookup
/// ("Network is unreachable") before kube-proxy's rules could translate its destination.
pub(crate) fn network_commands(place: &Place, netns: &str, first: Option<&str>) -> Vec<Vec<String>> {
    let ip = format!("{}/24", place.ip);
    let lines: Vec<String> = match first {
        None => vec![
            format!("-n {netns} link set lo up"),
            format!("-n {netns} link add {BRIDGE} type bridge"),
            format!("-n {netns} addr add {ip} dev {BRIDGE}"),
            format!("-n {netns} link set {BRIDGE} up"),
            format!("-n {netns} route add {SERVICE_CIDR} dev {BRIDGE}"),
        ],
        Some(first) => {
            // Interface names have at most 15 bytes: named after the address's last byte.
            let veth = format!("walt-to-{}", place.ip.octets()[3]);
            vec![
                format!("-n {netns} link set lo up"),
                format!("-n {first} link add {veth} type veth peer name eth0 netns {netns}"),
                format!("-n {first} link set {veth} master {BRIDGE}"),
                format!("-n {first} link set {veth} up"),
                format!("-n {netns} addr add {ip} dev eth0"),
                format!("-n {netns} link set eth0 up"),
                format!("-n {netns} route add {POD_CIDR} via {NODE_IP}"),
                format!("-n {first} route add {} via {}", place.pod_cidr, place.ip),
                format!("-n {netns} route add {SERVICE_CIDR} dev eth0"),
            ]
        }
    };
    lines
        .iter()
        .map(|line| line.split(' ').map(str::to_owned).collect())
        .collect()
}

/// A node of a cluster-tier [`Cluster`].
#[derive(Debug)]
pub struct Node {
    place: Place,
    dir: PathBuf,
    netns: String,
    /// The first node's registry port (every node pulls from it).
    registry_port: u16,
    /// The pause image (pushed by the first node's start).
    pause: Option<String>,
    /// Holds the node's mount namespace; stopped last.
    holder: Option<Daemon>,
    keep: bool,
}

impl Node {
    /// Creates the first node's network namespace and mount namespace holder.
    pub(crate) fn prepare(cluster_dir: &Path, lifetime: Lifetime) -> Result<Node, Error> {
        Node::prepare_at(cluster_dir, Place::first(), None, lifetime)
    }

    /// Creates another node's network namespace, joined to `first`'s bridge, and its mount
    /// namespace holder. It pulls from `first`'s registry.
    pub(crate) fn prepare_joining(
        cluster_dir: &Path,
        place: Place,
        first: &Node,
        lifetime: Lifetime,
    ) -> Result<Node, Error> {
        Node::prepare_at(cluster_dir, place, Some(first), lifetime)
    }

    fn prepare_at(
        cluster_dir: &Path,
        place: Place,
        first: Option<&Node>,
        lifetime: Lifetime,
    ) -> Result<Node, Error> {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let netns = format!("walt-{}-{n}", std::process::id());
        let dir = cluster_dir.join(node_dir_name(&place));
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        let registry_port = match first {
            Some(first) => first.registry_port,
            None => free_port()?,
        };
        let mut node = Node {
            dir,
            netns: netns.clone(),
            registry_port,
            pause: None,
            holder: None,
            keep: false,
            place,
        };
        std::fs::write(cluster_dir.join(node.place.component("netns")), &netns)
            .map_err(|e| Error::io("record the network namespace name", e))?;
        run("ip", &["netns", "add", &netns])?;
        for args in network_commands(&node.place, &netns, first.map(Node::netns)) {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run("ip", &args)?;
        }
        if let Some(first) = first {
            // Traffic between the two pod networks crosses both namespaces (a pod's namespace
            // sets forwarding only in its own node's, once its first pod starts).
            for namespace in [first.netns(), netns.as_str()] {
                enable_forwarding(namespace)?;
            }
        }
        // The mount namespace holder (see module docs): private mounts, its own /run/netns,
        // and the sysctl values the kubelet checks.
        let sysctl_dir = node.dir.join("sysctl");
        let mut script = String::from("set -e; mount -t tmpfs -o mode=755 walt-netns /run/netns; ");
        for (key, value) in KUBELET_SYSCTLS {
            let file = sysctl_dir.join(key.replace('/', "."));
            write(&file, &format!("{value}\n"))?;
            script += &[
                "mount --bind -o ro ",
                &file.to_string_lossy(),
                " /proc/sys/",
                key,
                "; ",
            ]
            .concat();
        }
        script.push_str("echo ready; exec sleep 2147483647");
        let mut holder = Command::new("nsenter");
        holder.arg(format!("--net=/run/netns/{netns}")).args([
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
        ]);
        let holder_name = node.place.component("node-namespace");
        let log = cluster_dir.join("logs").join(format!("{holder_name}.log"));
        std::fs::create_dir_all(cluster_dir.join("logs"))
            .map_err(|e| Error::io(format!("create {}/logs", cluster_dir.display()), e))?;
        let daemon = Daemon::spawn(&holder_name, holder, &log, lifetime)?;
        std::fs::write(node.dir.join("holder.pid"), daemon.pid().to_string())
            .map_err(|e| Error::io("record the namespace holder PID", e))?;
        node.holder = Some(daemon);
        Wait::new("the node mount namespace to be set up", Duration::from_secs(10))
            .every(Duration::from_millis(20))
            .until(|| {
                if crate::process::log_tail(&log, 5).contains("ready") {
                    return Ok(true);
                }
                match node.holder.as_mut().and_then(Daemon::exited) {
                    Some(status) => Err(format!("its holder exited ({status})")),
                    None => Ok(false),
                }
            })
            .map_err(|e| Error::NotReady {
                component: "node mount namespace".into(),
                reason: e.or_timed_out(|message| message),
                log: log.display().to_string(),
                tail: crate::process::log_tail(&log, 20),
            })?;
        Ok(node)
    }

    /// The node address.
    pub fn ip(&self) -> Ipv4Addr {
        self.place.ip
    }

    /// The node's name in Kubernetes.
    pub fn name(&self) -> &str {
        &self.place.name
    }

    /// Where it sits on the lab network and what it registers as.
    pub(crate) fn place(&self) -> &Place {
        &self.place
    }

    /// The API server's URL as this node reaches it.
    pub(crate) fn api_server(&self, cluster: &Cluster) -> String {
        let port = cluster.server().rsplit_once(':').map_or("", |(_, port)| port);
        format!("https://{}:{port}", self.place.first_node_address())
    }

    /// The network namespace name.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// `127.0.0.1:PORT` of the node's registry (host and node).
    pub fn registry(&self) -> String {
        format!("127.0.0.1:{}", self.registry_port)
    }

    /// `NODE_IP:PORT`: the same registry as pods reach it (it listens on every address of the node's
    /// namespace, which exist only there).
    pub fn registry_for_pods(&self) -> String {
        registry_for_pods(&self.registry())
    }

    fn holder_pid(&self) -> u32 {
        self.holder.as_ref().map_or(0, Daemon::pid)
    }

    /// A command run in the node's network namespace (control plane, registry, CoreDNS).
    pub(crate) fn command(&self, program: &Path) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/run/netns/{}", self.netns))
            .arg("--")
            .arg(program);
        command
    }

    /// A command run in the node's network and mount namespaces (containerd, kubelet).
    pub(crate) fn node_command(&self, program: &str) -> Command {
        let pid = self.holder_pid();
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/proc/{pid}/ns/net"))
            .arg(format!("--mount=/proc/{pid}/ns/mnt"))
            .arg("--")
            .arg(program);
        command
    }

    /// Makes `port` on the node's 127.0.0.1 reachable at the same port on the host's 127.0.0.1.
    pub(crate) fn bridge_to_host(
        &self,
        cluster: &Cluster,
        name: &str,
        port: u16,
        lifetime: Lifetime,
    ) -> Result<(), Error> {
        let socket = self.dir.join(format!("{name}.sock"));
        let mut inside = Command::new("nsenter");
        inside
            .arg(format!("--net=/run/netns/{}", self.netns))
            .args(["--", "socat"])
            .arg(format!("UNIX-LISTEN:{},fork,unlink-early", socket.display()))
            .arg(format!("TCP:127.0.0.1:{port}"));
        cluster.spawn(&format!("{name}-node"), inside, lifetime)?;
        Wait::new(
            &format!("{} to appear", socket.display()),
            Duration::from_secs(10),
        )
        .every(Duration::from_millis(10))
        .until(|| socket.exists())
        .map_err(|e| cluster.not_ready(&format!("{name}-node"), e.to_string()))?;
        let mut outside = Command::new("socat");
        outside
            .arg(format!("TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr"))
            .arg(format!("UNIX-CONNECT:{}", socket.display()));
        cluster.spawn(&format!("{name}-host"), outside, lifetime)
    }

    /// Starts the registry, pushes the pause image, starts containerd and the kubelet, and
    /// waits for the node to be Ready.
    pub(crate) fn start(
        &mut self,
        cluster: &Cluster,
        lifetime: Lifetime,
        timeout: Duration,
    ) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        let pause = self.start_registry(cluster, lifetime, deadline)?;
        self.pause = Some(pause.clone());
        self.start_kubelet(cluster, &pause, lifetime, deadline)
    }

    /// Starts another node (prepared with [`Node::prepare_joining`]): containerd, the kubelet and
    /// kube-proxy, with the first node's registry and pause image, and waits for it to be Ready.
    pub(crate) fn start_joining(
        &self,
        cluster: &Cluster,
        first: &Node,
        lifetime: Lifetime,
        timeout: Duration,
    ) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        let pause = first.pause.clone().ok_or_else(|| {
            cluster.not_ready(
                &self.place.component("kubelet"),
                "the first node has not pushed the pause image yet".into(),
            )
        })?;
        self.start_kubelet(cluster, &pause, lifetime, deadline)
    }

    /// The registry in the node's namespace, bridged to the host; pushes the pause image and
    /// returns its reference.
    fn start_registry(
        &self,
        cluster: &Cluster,
        lifetime: Lifetime,
        deadline: Instant,
    ) -> Result<String, Error> {
        // Registry, in the node's namespace, bridged to the host.
        let registry_config = self.dir.join("registry.yml");
        write(
            &registry_config,
            &format!(
                "version: 0.1\nlog: {{level: warn}}\nstorage: {{filesystem: {{rootdirectory: {}}}, \
                 delete: {{enabled: true}}}}\nhttp: {{addr: 0.0.0.0:{}}}\n",
                self.dir.join("registry").display(),
                self.registry_port
            ),
        )?;
        let mut registry = self.command(Path::new("/usr/bin/docker-registry"));
        registry.arg("serve").arg(&registry_config);
        cluster.spawn("registry", registry, lifetime)?;
        self.bridge_to_host(cluster, "registry-bridge", self.registry_port, lifetime)?;
        let registry = self.registry();
        images::wait_for_registry(&registry, deadline)?;
        let pause = images::push_busybox(
            &registry,
            "walt/pause:1",
            images::Arch::Amd64,
            &["/bin/sleep", "2147483647"],
            &self.dir.join("images"),
        )?;
        Ok(pause)
    }

    // Long by design: containerd's, the CNI's and the kubelet's configuration files written
    // out in full, read top to bottom in the order the parts start.
    /// containerd, the kubelet (the cluster DNS before it on the first node) and kube-proxy; waits
    /// until the node is Ready.
    fn start_kubelet(
        &self,
        cluster: &Cluster,
        pause: &str,
        lifetime: Lifetime,
        deadline: Instant,
    ) -> Result<(), Error> {
        let place = &self.place;
        let registry = self.registry();
        // Where this node reaches the registry (the same images by the same names on every node).
        let registry_endpoint = format!("{}:{}", place.first_node_address(), self.registry_port);
        // containerd with its own root, state and socket; CRI with cgroupfs and our CNI config.
        let containerd_dir = self.dir.join("containerd");
        let socket = containerd_dir.join("containerd.sock");
        let cni_conf_dir = self.dir.join("cni/net.d");
        write(
            &cni_conf_dir.join("10-walt.conflist"),
            &format!(
                r#"{{"cniVersion": "1.0.0", "name": "walt", "plugins": [
  {{"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
    "ipam": {{"type": "host-local", "ranges": [[{{"subnet": "{pod_cidr}"}}]],
              "routes": [{{"dst": "0.0.0.0/0"}}], "dataDir": "{ipam}"}}}}
]}}
"#,
                pod_cidr = place.pod_cidr,
                ipam = self.dir.join("cni/ipam").display()
            ),
        )?;
        let config = containerd_dir.join("config.toml");
        write(
            &config,
            &format!(
                r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"
[debug]
  address = ""
  level = "info"
[metrics]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  restrict_oom_score_adj = true
  enable_selinux = false
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = "/usr/sbin/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni_conf}"
  [plugins."io.containerd.grpc.v1.cri".registry.mirrors."{registry}"]
    endpoint = ["http://{registry_endpoint}"]
"#,
                root = containerd_dir.join("root").display(),
                state = containerd_dir.join("state").display(),
                socket = socket.display(),
                pause = pause,
                cni_bin = CNI_BIN_DIR,
                cni_conf = cni_conf_dir.display(),
                registry = registry,
                registry_endpoint = registry_endpoint,
            ),
        )?;
        let containerd_name = place.component("containerd");
        let mut containerd = self.node_command("/usr/bin/containerd");
        containerd.arg("--config").arg(&config);
        cluster.spawn(&containerd_name, containerd, lifetime)?;
        Wait::new(
            &format!("{} to appear", socket.display()),
            deadline.saturating_duration_since(Instant::now()),
        )
        .every(Duration::from_millis(50))
        .until(|| -> Result<bool, Error> {
            if socket.exists() {
                return Ok(true);
            }
            cluster.check_alive(&containerd_name)?;
            Ok(false)
        })
        .map_err(|e| e.or_timed_out(|message| cluster.not_ready(&containerd_name, message)))?;

        // kubelet: client certificate (Node authorizer), serving certificate from our CA.
        let ca = super::pki::Ca::load(&cluster.dir().join("pki"))?;
        let node_user = format!("system:node:{}", place.name);
        let client = ca.issue(
            &place.component("kubelet-client"),
            &node_user,
            &["system:nodes"],
            &[],
            &[],
        )?;
        let serving = ca.issue(
            &place.component("kubelet-serving"),
            &place.name,
            &[],
            &[&place.name],
            &[std::net::IpAddr::V4(place.ip)],
        )?;
        let kubelet_dir = self.dir.join("kubelet");
        let kubeconfig = kubelet_dir.join("kubelet.kubeconfig");
        std::fs::create_dir_all(&kubelet_dir)
            .map_err(|e| Error::io(format!("create {}", kubelet_dir.display()), e))?;
        super::kubeconfig::write(
            &kubeconfig,
            &self.api_server(cluster),
            &ca.cert_pem()?,
            &client,
            &node_user,
        )?;
        let kubelet_config = kubelet_dir.join("config.yaml");
        write(
            &kubelet_config,
            &format!(
                r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: {node_ip}
port: 10250
readOnlyPort: 0
healthzPort: 0
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
  x509: {{clientCAFile: {ca}}}
authorization: {{mode: Webhook}}
tlsCertFile: {tls_cert}
tlsPrivateKeyFile: {tls_key}
cgroupDriver: cgroupfs
cgroupRoot: /{cgroup}
cgroupsPerQOS: true
enforceNodeAllocatable: [pods]
failSwapOn: false
failCgroupV1: false
containerRuntimeEndpoint: unix://{socket}
podCIDR: {pod_cidr}
podLogsDir: {pod_logs}
clusterDomain: {cluster_domain}
clusterDNS: [{cluster_dns}]
resolvConf: ""
oomScoreAdj: 0
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {{memory.available: "50Mi", nodefs.available: "1%", nodefs.inodesFree: "1%", imagefs.available: "1%"}}
maxPods: 50
registerNode: true
"#,
                node_ip = place.ip,
                pod_cidr = place.pod_cidr,
                ca = ca.cert_path().display(),
                tls_cert = serving.cert.display(),
                tls_key = serving.key.display(),
                cgroup = self.netns,
                socket = socket.display(),
                pod_logs = self.dir.join("pod-logs").display(),
                cluster_domain = services::CLUSTER_DOMAIN,
                cluster_dns = services::CLUSTER_DNS_IP,
            ),
        )?;
        let kubelet_binary = if place.architecture == images::Arch::host() {
            cluster.binaries().kubelet.clone().ok_or_else(|| {
                Error::Unavailable(format!(
                    "no kubelet in {}: build it with tests/k8s/build.sh or put it there",
                    cluster.binaries().dir.display()
                ))
            })?
        } else {
            super::binaries::kubelet_for(place.architecture.oci_name())?
        };
        let mut kubelet = self.node_command(&kubelet_binary.to_string_lossy());
        kubelet
            .arg(format!("--config={}", kubelet_config.display()))
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!("--root-dir={}", kubelet_dir.join("root").display()))
            .arg(format!("--cert-dir={}", kubelet_dir.join("pki").display()))
            .arg(format!("--hostname-override={}", place.name))
            .arg(format!("--node-ip={}", place.ip))
            .arg("--v=1");
        // The cluster DNS first: pods that start find Services by name. kube-proxy once the node
        // exists (it reads its Node); no pod can start before the node is Ready anyway.
        let services_dir = self.dir.join("services");
        let services = services::ServiceContext {
            cluster,
            node: self,
            dir: &services_dir,
            lifetime,
            deadline,
        };
        if place.is_first() {
            // One cluster DNS: every node's pods reach it through the `kube-dns` Service.
            services::start_dns(&services)?;
        }
        create_cgroups(&self.netns)?;
        let kubelet_name = place.component("kubelet");
        cluster.spawn(&kubelet_name, kubelet, lifetime)?;
        cluster.wait_for(
            &kubelet_name,
            deadline,
            &[
                "wait",
                "--for=condition=Ready",
                &format!("node/{}", place.name),
                "--timeout=5s",
            ],
        )?;
        services::start_proxy(&services)?;
        Ok(())
    }

    /// Leaves the node running (`cargo xtask cluster up`).
    pub(crate) fn keep(mut self) {
        self.keep = true;
        if let Some(holder) = self.holder.take() {
            holder.keep_running();
        }
    }

    /// Kills what is left of the node (pods, shims) and removes its namespaces and cgroups.
    /// Called after the daemons are stopped.
    pub(crate) fn cleanup(&self) {
        if self.keep {
            return;
        }
        cleanup_leftovers(&self.dir, &self.netns);
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Kills every process left in the node's network namespace, mount namespace and cgroups, then
/// removes the cgroups and the network namespace. Safe to call more than once.
pub(crate) fn cleanup_leftovers(node_dir: &Path, netns: &str) {
    let holder = std::fs::read_to_string(node_dir.join("holder.pid"))
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
        .filter(|p| pid_alive(*p));
    let netns_inode = std::fs::metadata(format!("/run/netns/{netns}"))
        .map(|m| m.ino())
        .ok();
    let mntns_inode = holder
        .and_then(|pid| std::fs::metadata(format!("/proc/{pid}/ns/mnt")).ok())
        .map(|m| m.ino());
    let me = std::process::id();
    // Pods first (their cgroups), then whatever shares the node's namespaces (shims, holder).
    for round in 0..3 {
        let mut pids = cgroup_pids(netns);
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for entry in entries.flatten() {
                let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                if pid == me {
                    continue;
                }
                let inode = |ns: &str| {
                    std::fs::metadata(format!("/proc/{pid}/ns/{ns}"))
                        .map(|m| m.ino())
                        .ok()
                };
                let in_net = netns_inode.is_some() && inode("net") == netns_inode;
                let in_mnt = mntns_inode.is_some() && inode("mnt") == mntns_inode;
                if in_net || in_mnt {
                    pids.push(pid);
                }
            }
        }
        if pids.is_empty() {
            break;
        }
        let grace = if round == 0 {
            Duration::from_secs(5)
        } else {
            Duration::ZERO
        };
        for pid in pids {
            stop_pid(pid, grace);
        }
    }
    remove_cgroups(netns);
    let _ = Command::new("ip").args(["netns", "delete", netns]).output();
}

/// The node's directory under the cluster's: `node` for the first, `node-<name>` for another.
pub(crate) fn node_dir_name(place: &Place) -> String {
    if place.is_first() {
        "node".into()
    } else {
        format!("node-{}", place.name)
    }
}

/// Turns IPv4 forwarding on in the network namespace `netns` (a per-namespace setting).
fn enable_forwarding(netns: &str) -> Result<(), Error> {
    run(
        "nsenter",
        &[
            &format!("--net=/run/netns/{netns}"),
            "--",
            "sh",
            "-c",
            "echo 1 > /proc/sys/net/ipv4/ip_forward",
        ],
    )
    .map(drop)
}

/// Creates the node's cgroup (`/<name>` in every hierarchy): the kubelet requires its cgroup
/// root to exist. A new cpuset cgroup starts with no CPUs and memory nodes: copy the parent's.
fn create_cgroups(name: &str) -> Result<(), Error> {
    let root = Path::new("/sys/fs/cgroup");
    let hierarchies: Vec<PathBuf> = if root.join("cgroup.controllers").exists() {
        vec![root.to_path_buf()]
    } else {
        std::fs::read_dir(root)
            .map_err(|e| Error::io("list /sys/fs/cgroup", e))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.join("cgroup.procs").exists())
            .collect()
    };
    for hierarchy in hierarchies {
        let dir = hierarchy.join(name);
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("create the cgroup {}", dir.display()), e))?;
        for file in ["cpuset.cpus", "cpuset.mems"] {
            if let Ok(value) = std::fs::read_to_string(hierarchy.join(file)) {
                std::fs::write(dir.join(file), value.trim())
                    .map_err(|e| Error::io(format!("write {}", dir.join(file).display()), e))?;
            }
        }
    }
    Ok(())
}

fn cgroup_dirs(name: &str) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") {
        for entry in entries.flatten() {
            let dir = entry.path().join(name);
            if dir.is_dir() {
                dirs.push(dir);
            }
        }
    }
    let v2 = Path::new("/sys/fs/cgroup").join(name);
    if v2.join("cgroup.procs").exists() {
        dirs.push(v2);
    }
    dirs
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&entry.path(), out);
            }
        }
    }
}

fn cgroup_pids(name: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for root in cgroup_dirs(name) {
        let mut all = Vec::new();
        walk(&root, &mut all);
        for dir in all {
            if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                pids.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
            }
        }
    }
    pids.sort_unstable();
    pids.dedup();
    pids
}

fn remove_cgroups(name: &str) {
    for root in cgroup_dirs(name) {
        let mut all = Vec::new();
        walk(&root, &mut all);
        // Children before parents.
        for dir in all.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn joined(commands: &[Vec<String>]) -> Vec<String> {
        commands.iter().map(|c| c.join(" ")).collect()
    }

    #[test]
    fn the_first_node_gets_the_bridge_and_its_address() {
        assert_eq!(
            joined(&network_commands(&Place::first(), "walt-1-0", None)),
            [
                "-n walt-1-0 link set lo up",
                "-n walt-1-0 link add walt0 type bridge",
                "-n walt-1-0 addr add 10.200.0.2/24 dev walt0",
                "-n walt-1-0 link set walt0 up",
                "-n walt-1-0 route add 10.96.0.0/16 dev walt0",
            ]
        );
    }

    #[test]
    fn a_second_node_joins_the_bridge_with_routes_between_the_pod_networks() {
        let place = Place::second(images::Arch::Arm64);
        let commands = joined(&network_commands(&place, "walt-1-1", Some("walt-1-0")));
        for wanted in [
            "-n walt-1-0 link add walt-to-3 type veth peer name eth0 netns walt-1-1",
            "-n walt-1-0 link set walt-to-3 master walt0",
            "-n walt-1-1 addr add 10.200.0.3/24 dev eth0",
            "-n walt-1-1 route add 10.244.0.0/24 via 10.200.0.2",
            "-n walt-1-0 route add 10.244.1.0/24 via 10.200.0.3",
            "-n walt-1-1 route add 10.96.0.0/16 dev eth0",
        ] {
            assert!(
                commands.iter().any(|c| c == wanted),
                "{wanted} missing from {commands:#?}"
            );
        }
        assert!(
            commands.iter().all(|c| c.split(' ').all(|word| word.len() <= 15)),
            "interface names fit in 15 bytes: {commands:#?}"
        );
    }

    #[test]
    fn only_other_nodes_rename_their_processes_and_reach_the_first_by_its_address() {
        let first = Place::first();
        let second = Place::second(images::Arch::Arm64);
        assert_eq!(
            (first.component("kubelet"), second.component("kubelet")),
            ("kubelet".to_owned(), "kubelet-walt-node-2".to_owned())
        );
        assert_eq!(first.first_node_address(), Ipv4Addr::LOCALHOST);
        assert_eq!(second.first_node_address(), NODE_IP);
        assert_eq!(
            (node_dir_name(&first), node_dir_name(&second)),
            ("node".to_owned(), "node-walt-node-2".to_owned())
        );
    }
}
