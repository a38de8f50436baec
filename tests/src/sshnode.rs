//! A real OpenSSH `sshd` node in network namespaces the fixture creates, like a WalT node.
//!
//! Layout of one node (all torn down by [`SshNode`]'s `Drop`, even on panic):
//! - two network namespaces, `wl-PID-K` (the "lab" side, where clients connect from) and
//!   `wn-PID-K` (the node), joined by a veth pair `10.200.N.1` (lab) ↔ `10.200.N.2` (node);
//!   nothing is added to the host's own network namespace;
//! - inside the node namespace, a private mount and PID namespace whose PID 1 is `sshd`;
//!   the node's root is an overlay (lower: a busybox-only rootfs, or the host root read-only for a node
//!   with GNU tar; upper: a tmpfs), mounted at `/run/walt-tests/NAME/root`, with `/proc`, `/dev`, and a
//!   tmpfs `/run` in which the overlay upper dir shows at the WalT path
//!   [`WALT_UPPER_DIR`] and `/run/uptime-ready` is written once the node has booted;
//! - `sshd` chroots every session into that root (`ChrootDirectory`), so a session sees the node's
//!   root exactly as a WalT node's shell would, and `internal-sftp` serves sftp.
//!
//! Reach the node with [`SshNode::connect`] (a TCP stream opened from a thread that joined the lab
//! namespace), [`SshNode::proxy_command`] (for OpenSSH's `ProxyCommand` or any tool that runs one),
//! or [`SshNode::ssh`] (an OpenSSH `ssh` command line, ready to run).
//!
//! Killing the node ([`SshNode::kill`]) kills every process in it at once (PID namespace), which is how
//! tests simulate a node that dies mid-save.

use std::fs;
use std::io::{self, Read as _};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::wait::Wait;

/// Where a WalT node keeps the writable upper dir of its root overlay.
pub const WALT_UPPER_DIR: &str = "/run/walt/rootfs/mnt/fs_rw";
/// The file a WalT node writes once it has booted.
pub const UPTIME_READY: &str = "/run/uptime-ready";

const RUN_DIR: &str = "/run/walt-tests";
const SSHD: &str = "/usr/sbin/sshd";
const BUSYBOX: &str = "/bin/busybox";

static NEXT_NODE: AtomicU32 = AtomicU32::new(0);

/// What can go wrong while building or using a node.
#[derive(Debug, thiserror::Error)]
pub enum SshNodeError {
    /// A program or privilege the fixture needs is missing.
    #[error("sshnode fixture: {0}")]
    Prerequisite(String),
    /// A setup step failed.
    #[error("sshnode fixture: {step}: {detail}")]
    Setup {
        /// What the fixture was doing.
        step: String,
        /// What happened (command output, OS error).
        detail: String,
    },
    /// A command run on the node over SSH failed.
    #[error("sshnode fixture: `{command}` on node {node} failed ({status}): {stderr}")]
    Remote {
        /// The node's name.
        node: String,
        /// The command.
        command: String,
        /// Its exit status.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
}

type Result<T> = std::result::Result<T, SshNodeError>;

fn setup_error(step: impl Into<String>, detail: impl std::fmt::Display) -> SshNodeError {
    SshNodeError::Setup {
        step: step.into(),
        detail: detail.to_string(),
    }
}

/// The lower (read-only) root of the node's overlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeRoot {
    /// A rootfs with busybox only (busybox `tar`, `find`, `sh`): no GNU tar, no `getfattr`.
    Busybox,
    /// The host's root, read-only: GNU tar, bash, attr tools.
    HostRoot,
}

/// Builds an [`SshNode`].
#[derive(Debug, Clone)]
pub struct SshNodeBuilder {
    root: NodeRoot,
    boot_script: Option<String>,
    upper_size: String,
}

impl SshNodeBuilder {
    /// A node whose overlay lower is `root`.
    pub fn new(root: NodeRoot) -> Self {
        Self {
            root,
            boot_script: None,
            upper_size: "2g".into(),
        }
    }

    /// A shell script run inside the node's root before `/run/uptime-ready` is written ("boot-time
    /// noise": a save in volatile mode must not pick up what it changes). The fixture waits one second
    /// after it, so file times tell boot-time changes from later ones.
    #[must_use]
    pub fn boot_script(mut self, script: impl Into<String>) -> Self {
        self.boot_script = Some(script.into());
        self
    }

    /// The size of the tmpfs holding the upper dir (`mount -o size=`), `2g` by default.
    #[must_use]
    pub fn upper_size(mut self, size: impl Into<String>) -> Self {
        self.upper_size = size.into();
        self
    }

    /// Creates the namespaces, the root overlay and starts `sshd`; returns once it accepts connections.
    pub fn start(self) -> Result<SshNode> {
        SshNode::start(&self)
    }
}

/// A network namespace the fixture created (deleted on drop).
#[derive(Debug)]
struct Netns {
    name: String,
}

impl Netns {
    fn create(name: &str) -> Result<Self> {
        run(
            "create a network namespace",
            Command::new("ip").args(["netns", "add", name]),
        )?;
        Ok(Self { name: name.into() })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// A running sshd node. Dropping it kills every process of the node and removes its namespaces and
/// files.
#[derive(Debug)]
pub struct SshNode {
    name: String,
    root_kind: NodeRoot,
    dir: PathBuf,
    address: Ipv4Addr,
    lab: Netns,
    node_netns: Netns,
    sshd: Option<Child>,
    host_public_key: String,
    client_public_key: String,
}

impl SshNode {
    /// A busybox-only node.
    pub fn busybox() -> Result<Self> {
        SshNodeBuilder::new(NodeRoot::Busybox).start()
    }

    /// A node whose root is the host's root (GNU tar, bash, getfattr).
    pub fn gnu() -> Result<Self> {
        SshNodeBuilder::new(NodeRoot::HostRoot).start()
    }

    fn start(builder: &SshNodeBuilder) -> Result<Self> {
        check_prerequisites()?;
        sweep_stale();
        let pid = std::process::id();
        let index = NEXT_NODE.fetch_add(1, Ordering::SeqCst);
        let name = format!("{pid}-{index}");
        let subnet = u8::try_from(index % 250 + 1).unwrap_or(1);
        let address = Ipv4Addr::new(10, 200, subnet, 2);
        let dir = Path::new(RUN_DIR).join(&name);
        let _ = fs::remove_dir_all(&dir);
        for sub in ["", "keys", "root", "fs"] {
            fs::create_dir_all(dir.join(sub))
                .map_err(|e| setup_error(format!("mkdir {}", dir.join(sub).display()), e))?;
        }
        // sshd's ChrootDirectory refuses a path with a group/world-writable component.
        for path in [Path::new(RUN_DIR), dir.as_path(), &dir.join("root")] {
            fs::set_permissions(path, fs::Permissions::from_mode(0o755))
                .map_err(|e| setup_error("chmod 0755", e))?;
        }
        fs::create_dir_all("/run/sshd").map_err(|e| setup_error("mkdir /run/sshd", e))?;

        let lab = Netns::create(&format!("wl-{name}"))?;
        let node_netns = Netns::create(&format!("wn-{name}"))?;
        let mut node = Self {
            name: name.clone(),
            root_kind: builder.root,
            dir: dir.clone(),
            address,
            lab,
            node_netns,
            sshd: None,
            host_public_key: String::new(),
            client_public_key: String::new(),
        };
        node.wire_network(subnet)?;
        node.make_keys()?;
        let lower = match builder.root {
            NodeRoot::Busybox => {
                let lower = dir.join("lower");
                make_busybox_rootfs(&lower)?;
                lower
            }
            NodeRoot::HostRoot => PathBuf::from("/"),
        };
        node.write_sshd_config()?;
        node.boot(&lower, builder)?;
        Ok(node)
    }

    fn wire_network(&self, subnet: u8) -> Result<()> {
        let lab = &self.lab.name;
        let node = &self.node_netns.name;
        run(
            "create the veth pair",
            Command::new("ip").args([
                "-n", lab, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", node,
            ]),
        )?;
        for (ns, host) in [(lab, 1), (node, 2)] {
            let cidr = format!("10.200.{subnet}.{host}/24");
            run(
                "address the veth",
                Command::new("ip").args(["-n", ns, "addr", "add", &cidr, "dev", "eth0"]),
            )?;
            run(
                "bring eth0 up",
                Command::new("ip").args(["-n", ns, "link", "set", "eth0", "up"]),
            )?;
            run(
                "bring lo up",
                Command::new("ip").args(["-n", ns, "link", "set", "lo", "up"]),
            )?;
        }
        Ok(())
    }

    fn make_keys(&mut self) -> Result<()> {
        let keys = self.dir.join("keys");
        for (file, comment) in [
            ("host_ed25519", "walt-test-node"),
            ("client_ed25519", "walt-test-client"),
        ] {
            generate_key(&keys.join(file), comment)?;
        }
        self.host_public_key = read_trimmed(&keys.join("host_ed25519.pub"))?;
        self.client_public_key = read_trimmed(&keys.join("client_ed25519.pub"))?;
        write(
            &keys.join("authorized_keys"),
            &format!("{}\n", self.client_public_key),
        )?;
        write(
            &keys.join("known_hosts"),
            &format!("{} {}\n", self.address, self.host_public_key),
        )?;
        Ok(())
    }

    fn write_sshd_config(&self) -> Result<()> {
        let keys = self.dir.join("keys");
        let config = format!(
            "Port 22\nListenAddress 0.0.0.0\nHostKey {host}\nPidFile none\nAuthorizedKeysFile {auth}\n\
             UsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nChrootDirectory {root}\nSubsystem sftp internal-sftp\n\
             AllowTcpForwarding yes\nX11Forwarding no\nPrintMotd no\nPrintLastLog no\nAcceptEnv LANG LC_* WALT_*\n\
             MaxStartups 100\nMaxSessions 100\nLogLevel VERBOSE\n",
            host = keys.join("host_ed25519").display(),
            auth = keys.join("authorized_keys").display(),
            root = self.dir.join("root").display(),
        );
        write(&self.dir.join("sshd_config"), &config)
    }

    fn boot(&mut self, lower: &Path, builder: &SshNodeBuilder) -> Result<()> {
        let d = self.dir.display().to_string();
        let boot = match &builder.boot_script {
            Some(script) => {
                write(&self.dir.join("boot.sh"), script)?;
                format!(
                    "cp {d}/boot.sh $R/run/walt-boot.sh && chroot $R /bin/sh /run/walt-boot.sh && rm $R/run/walt-boot.sh && sleep 1.1\n"
                )
            }
            None => String::new(),
        };
        let script = format!(
            "set -e\n\
             D={d}; R=$D/root\n\
             mount -t tmpfs -o size={size},mode=0755 walt-node-rw $D/fs\n\
             mkdir -p $D/fs/upper $D/fs/work\n\
             chmod 0755 $D/fs/upper\n\
             mount -t overlay walt-node-root -o lowerdir={lower},upperdir=$D/fs/upper,workdir=$D/fs/work $R\n\
             mount -t tmpfs -o mode=0755 walt-node-run $R/run\n\
             mkdir -p $R/run/walt/rootfs/mnt/fs_rw\n\
             mount --bind $D/fs/upper $R{upper}\n\
             mount -t proc proc $R/proc\n\
             mount --rbind /dev $R/dev\n\
             {boot}\
             date > $R{ready}\n\
             exec {SSHD} -D -E $D/sshd.log -f $D/sshd_config\n",
            size = builder.upper_size,
            lower = lower.display(),
            upper = WALT_UPPER_DIR,
            ready = UPTIME_READY,
        );
        let log =
            fs::File::create(self.dir.join("boot.log")).map_err(|e| setup_error("create boot.log", e))?;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.node_netns.name])
            .args([
                "unshare",
                "--mount",
                "--pid",
                "--fork",
                "--kill-child",
                "--propagation",
                "private",
            ])
            .args(["sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| setup_error("dup boot.log", e))?)
            .stderr(log)
            .spawn()
            .map_err(|e| setup_error("start the node (ip netns exec … unshare … sshd)", e))?;
        let booted = Wait::new("the node to accept SSH connections", Duration::from_secs(20))
            .every(Duration::from_millis(50))
            .until(|| {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!("the node exited while booting ({status})"));
                }
                Ok(self.log().contains("Server listening") && self.connect().is_ok())
            });
        self.sshd = Some(child);
        booted.map_err(|e| setup_error(e.to_string(), self.log()))
    }

    /// The node's name (unique on this machine while it runs).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Which lower root the node has.
    pub fn root_kind(&self) -> NodeRoot {
        self.root_kind
    }

    /// The node's address (inside the lab namespace; not routable from the host's namespace).
    pub fn address(&self) -> Ipv4Addr {
        self.address
    }

    /// The node's SSH port (22).
    pub fn port(&self) -> u16 {
        22
    }

    /// The name of the lab-side network namespace, from which the node is reachable.
    pub fn lab_netns(&self) -> &str {
        &self.lab.name
    }

    /// The node's host public key, an OpenSSH line (`ssh-ed25519 AAAA… comment`).
    pub fn host_public_key(&self) -> &str {
        &self.host_public_key
    }

    /// The private key (OpenSSH format, no passphrase) authorized as `root` on the node.
    pub fn client_key(&self) -> PathBuf {
        self.dir.join("keys/client_ed25519")
    }

    /// The public key matching [`Self::client_key`], an OpenSSH line.
    pub fn client_public_key(&self) -> &str {
        &self.client_public_key
    }

    /// A known_hosts file holding the node's address and host key.
    pub fn known_hosts(&self) -> PathBuf {
        self.dir.join("keys/known_hosts")
    }

    /// Authorizes one more public key (an OpenSSH line) as `root` on the node.
    pub fn authorize_key(&self, public_key: &str) -> Result<()> {
        let path = self.dir.join("keys/authorized_keys");
        let mut keys = fs::read_to_string(&path).map_err(|e| setup_error("read authorized_keys", e))?;
        keys.push_str(public_key.trim());
        keys.push('\n');
        write(&path, &keys)
    }

    /// Makes sshd run `command` for every session of every key authorized so far (OpenSSH's
    /// `command="…"` option in authorized_keys), whatever the client asked for (that is in
    /// `$SSH_ORIGINAL_COMMAND`): a node whose commands hang, flood or pass through a wrapper. The
    /// command must not hold a double quote.
    pub fn force_command(&self, command: &str) -> Result<()> {
        if command.contains('"') {
            return Err(setup_error(
                "force a command",
                format!("{command:?} holds a double quote: put it in a script on the node"),
            ));
        }
        let path = self.dir.join("keys/authorized_keys");
        let keys = fs::read_to_string(&path).map_err(|e| setup_error("read authorized_keys", e))?;
        let mut forced = String::new();
        for line in keys.lines().map(str::trim).filter(|line| !line.is_empty()) {
            forced.push_str("command=\"");
            forced.push_str(command);
            forced.push_str("\" ");
            forced.push_str(line);
            forced.push('\n');
        }
        write(&path, &forced)
    }

    /// What the node's boot script and sshd logged so far.
    pub fn log(&self) -> String {
        let boot = fs::read_to_string(self.dir.join("boot.log")).unwrap_or_default();
        let sshd = fs::read_to_string(self.dir.join("sshd.log")).unwrap_or_default();
        format!("{boot}{sshd}")
    }

    /// Opens a TCP connection to the node's sshd, from a thread that joined the lab namespace.
    pub fn connect(&self) -> io::Result<TcpStream> {
        connect_in_netns(
            &self.lab.name,
            SocketAddr::V4(SocketAddrV4::new(self.address, 22)),
        )
    }

    /// Like [`Self::connect`], as a tokio stream.
    pub async fn connect_async(&self) -> io::Result<tokio::net::TcpStream> {
        let netns = self.lab.name.clone();
        let target = SocketAddr::V4(SocketAddrV4::new(self.address, 22));
        let stream = tokio::task::spawn_blocking(move || connect_in_netns(&netns, target))
            .await
            .map_err(io::Error::other)??;
        stream.set_nonblocking(true)?;
        tokio::net::TcpStream::from_std(stream)
    }

    /// A command that connects its stdin/stdout to the node's sshd (OpenSSH `ProxyCommand`).
    pub fn proxy_command(&self) -> String {
        format!("ip netns exec {} socat - TCP:{}:22", self.lab.name, self.address)
    }

    /// OpenSSH `ssh` to `root@node`, with the client key, the pinned host key and the proxy command;
    /// append the remote command with `.arg(…)`.
    pub fn ssh(&self) -> Command {
        let mut command = Command::new("ssh");
        command
            .args([
                "-F",
                "/dev/null",
                "-o",
                "BatchMode=yes",
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "StrictHostKeyChecking=yes",
            ])
            .args(["-o", "LogLevel=ERROR", "-i"])
            .arg(self.client_key())
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", self.known_hosts().display()))
            .arg("-o")
            .arg(format!("ProxyCommand={}", self.proxy_command()))
            .arg(format!("root@{}", self.address));
        command
    }

    /// Runs a shell command on the node over SSH; returns its stdout, or an error with its stderr if
    /// it fails.
    pub fn run(&self, command: &str) -> Result<String> {
        let output: Output = self
            .ssh()
            .arg(command)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| setup_error("run ssh", e))?;
        if !output.status.success() {
            return Err(SshNodeError::Remote {
                node: self.name.clone(),
                command: command.into(),
                status: output.status.to_string(),
                stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Kills every process of the node at once (the node "dies"); its namespaces stay until drop.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.sshd.take() {
            // Killing the PID namespace's PID 1 (sshd, the child of `unshare --fork`) makes the
            // kernel kill everything else in the namespace. `--kill-child` covers the case where
            // only `unshare` gets killed.
            let init = fs::read_to_string(format!("/proc/{0}/task/{0}/children", child.id()))
                .ok()
                .and_then(|text| {
                    text.split_whitespace()
                        .next()
                        .and_then(|pid| pid.parse::<i32>().ok())
                });
            if let Some(pid) = init {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = child.kill();
            let _ = child.wait();
            if let Some(pid) = init {
                let _ = Wait::new(
                    &format!("the node's init ({pid}) to be gone"),
                    Duration::from_secs(5),
                )
                .every(Duration::from_millis(10))
                .until(|| !Path::new(&format!("/proc/{pid}")).exists());
            }
        }
    }

    /// Cuts (`up: false`) or restores (`up: true`) the node's network: its end of the veth pair goes
    /// down or up inside the node's namespace (the cable pulled and plugged back); its processes, files
    /// and address stay. For tests of a network cut in the middle of a transfer. A restored link is
    /// back when this returns: its sshd accepts a connection from the lab namespace again (the kernel
    /// brings a veth's carrier up asynchronously, and the peer's neighbour entry failed during the cut:
    /// for a second or two after `ip link set up`, connecting still gets "No route to host").
    pub fn set_link(&self, up: bool) -> Result<()> {
        self.switch_link(up)?;
        if !up {
            return Ok(());
        }
        Wait::new(
            "the node to accept SSH connections again",
            Duration::from_secs(30),
        )
        .every(Duration::from_millis(100))
        .until(|| Ok::<_, String>(self.connect().is_ok()))
        .map_err(|e| setup_error("restore the node's link", e))
    }

    fn switch_link(&self, up: bool) -> Result<()> {
        run(
            if up {
                "bring the node's link up"
            } else {
                "take the node's link down"
            },
            Command::new("ip").args([
                "-n",
                &self.node_netns.name,
                "link",
                "set",
                "eth0",
                if up { "up" } else { "down" },
            ]),
        )
        .map(drop)
    }

    /// Whether the node's processes still run.
    pub fn is_running(&mut self) -> bool {
        self.sshd
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }
}

impl Drop for SshNode {
    fn drop(&mut self) {
        self.kill();
        // The mounts lived in the node's private mount namespace: they went with its last process.
        // Give the kernel a moment to release them before removing the mount points.
        let _ = Wait::new("the node's directory to be removed", Duration::from_secs(1))
            .every(Duration::from_millis(20))
            .until(|| fs::remove_dir_all(&self.dir).is_ok());
        // The Netns fields delete both namespaces when they drop, after this.
    }
}

/// Opens a TCP connection from a thread that joined the network namespace `/run/netns/NAME`.
pub fn connect_in_netns(netns: &str, target: SocketAddr) -> io::Result<TcpStream> {
    let path = PathBuf::from("/run/netns").join(netns);
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let file = fs::File::open(&path)?;
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| io::Error::other(format!("setns into {}: {e}", path.display())))?;
                TcpStream::connect_timeout(&target, Duration::from_secs(5))
            })
            .join()
            .map_err(|_| io::Error::other("the thread that joined the namespace panicked"))?
    })
}

fn check_prerequisites() -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        return Err(SshNodeError::Prerequisite(
            "must run as root (network namespaces, mounts)".into(),
        ));
    }
    for (program, package) in [
        (SSHD, "openssh-server"),
        ("/usr/bin/ssh", "openssh-client"),
        ("/usr/bin/ssh-keygen", "openssh-client"),
        ("/usr/bin/socat", "socat"),
        (BUSYBOX, "busybox-static"),
        ("/usr/bin/unshare", "util-linux"),
    ] {
        if !Path::new(program).exists() {
            return Err(SshNodeError::Prerequisite(format!(
                "{program} is missing: apt-get install -y --no-install-recommends {package}"
            )));
        }
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Err(SshNodeError::Prerequisite(
            "`ip` is missing: apt-get install -y --no-install-recommends iproute2".into(),
        ));
    }
    Ok(())
}

/// Removes namespaces and directories left by test processes that died without dropping their nodes.
fn sweep_stale() {
    let alive = |name: &str| {
        name.split('-')
            .find(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()))
            .is_none_or(|pid| Path::new("/proc").join(pid).exists())
    };
    if let Ok(entries) = fs::read_dir("/run/netns") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if (name.starts_with("wl-") || name.starts_with("wn-")) && !alive(&name) {
                let _ = Command::new("ip")
                    .args(["netns", "del", &name])
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
    if let Ok(entries) = fs::read_dir(RUN_DIR) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !alive(&name) {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// Makes a busybox-only rootfs: busybox and its applet links, `/bin/bash` as a script that runs busybox's
/// shell (sshd runs root's login shell, `/bin/bash` on Debian), `/etc/passwd`, the usual dirs.
fn make_busybox_rootfs(root: &Path) -> Result<()> {
    for dir in [
        "bin", "sbin", "usr/bin", "usr/sbin", "etc", "root", "tmp", "dev", "proc", "run", "var", "home",
    ] {
        fs::create_dir_all(root.join(dir)).map_err(|e| setup_error("mkdir in the busybox rootfs", e))?;
    }
    fs::copy(BUSYBOX, root.join("bin/busybox")).map_err(|e| setup_error("copy busybox", e))?;
    run(
        "install busybox applets",
        Command::new("chroot")
            .arg(root)
            .args(["/bin/busybox", "--install", "-s"]),
    )?;
    // busybox has no `bash` applet: a two-line stand-in, so sshd can start root's login shell.
    write(&root.join("bin/bash"), "#!/bin/sh\nexec /bin/sh \"$@\"\n")?;
    fs::set_permissions(root.join("bin/bash"), fs::Permissions::from_mode(0o755))
        .map_err(|e| setup_error("chmod /bin/bash", e))?;
    write(&root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    write(&root.join("etc/group"), "root:x:0:\n")?;
    write(&root.join("etc/hostname"), "walt-busybox-node\n")?;
    fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777))
        .map_err(|e| setup_error("chmod /tmp", e))?;
    Ok(())
}

/// Makes an ed25519 key pair without passphrase at `path` (and `path.pub`) with OpenSSH's
/// `ssh-keygen`, an independent tool.
///
/// # Errors
/// When `ssh-keygen` is missing or fails.
pub fn generate_key(path: &Path, comment: &str) -> Result<()> {
    run(
        "generate an ed25519 key",
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
            .arg(path),
    )
    .map(drop)
}

/// [`generate_key`] as `dir/name` for tests and benchmarks: returns the private key's path.
///
/// # Panics
/// When `ssh-keygen` fails (install openssh-client).
pub fn keygen(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    generate_key(&path, name).unwrap_or_else(|e| panic!("{e}"));
    path
}

fn run(step: &str, command: &mut Command) -> Result<Output> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| setup_error(step, format!("{command:?}: {e}")))?;
    if !output.status.success() {
        return Err(setup_error(
            step,
            format!(
                "{command:?}: {}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        ));
    }
    Ok(output)
}

fn write(path: &Path, content: &str) -> Result<()> {
    fs::write(path, content).map_err(|e| setup_error(format!("write {}", path.display()), e))
}

fn read_trimmed(path: &Path) -> Result<String> {
    let mut text = String::new();
    fs::File::open(path)
        .and_then(|mut file| file.read_to_string(&mut text))
        .map_err(|e| setup_error(format!("read {}", path.display()), e))?;
    Ok(text.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(node: &SshNode) {
        let out = node.run("cat /run/uptime-ready >/dev/null && echo hello > /root/hello && ls -A /run/walt/rootfs/mnt/fs_rw/root | grep hello").unwrap();
        assert_eq!(out.trim(), "hello", "node log: {}", node.log());
        let proxied = node
            .ssh()
            .args(["-o", "RequestTTY=no", "exit 7"])
            .status()
            .unwrap();
        assert_eq!(proxied.code(), Some(7));
        let stream = node.connect().unwrap();
        let mut banner = [0u8; 7];
        std::io::Read::read_exact(&mut &stream, &mut banner).unwrap();
        assert_eq!(&banner, b"SSH-2.0");
    }

    #[test]
    fn busybox_node_boots_and_serves_ssh() {
        let node = SshNodeBuilder::new(NodeRoot::Busybox)
            .boot_script("echo boot > /etc/boot-noise")
            .start()
            .unwrap();
        check(&node);
        // busybox tar only: no GNU tar in the node.
        assert!(!node.run("tar --version").unwrap().contains("GNU tar"));
        let dir = node.dir.clone();
        drop(node);
        assert!(!dir.exists());
    }

    #[test]
    fn host_root_node_has_gnu_tar_and_dies_when_killed() {
        let mut node = SshNode::gnu().unwrap();
        check(&node);
        assert!(node.run("tar --version").unwrap().contains("GNU tar"));
        node.kill();
        assert!(!node.is_running());
        assert!(node.connect().is_err());
    }
}
