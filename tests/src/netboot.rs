//! Network boot fixtures: a Debian kernel and an initramfs that mounts its root over NFSv3, a WalT
//! image with the boot layout (`/boot/<model>/` with `start.ipxe` for PCs or `start.uboot` for arm64
//! boards, the kernel and the initramfs; `/bin/walt-init` stacking the RAM overlay at the WalT path),
//! a lab network (a bridge and a tap in a network namespace the test creates) and VM nodes
//! (`qemu-system-x86_64 -accel tcg` whose iPXE ROM, or `qemu-system-aarch64 -accel tcg` whose U-Boot,
//! boots from the network like a real device).
//!
//! The VMs are powered by walt's own `walt-operator vm` (what a VM node's pod runs: its tap on the
//! bridge, qemu's command line), so every test that boots one proves the operator's VM boots.
//! Nothing else here uses walt's code: the image is built with `umoci` ([`crate::images::OciLayout`]),
//! the kernel is Debian's (`apt-get download`), the initramfs is a `newc` cpio written here.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::images::{Arch, busybox_rootfs, cache_dir};
use crate::operator::operator_binary;
use crate::process::{Daemon, Lifetime};
use crate::registry::Registry;
use crate::{FixtureError, require_tool, run, run_stdout};

/// The model of the VM nodes (WalT's name for PCs).
pub const MODEL: &str = "pc-x86-64";
/// The model of the arm64 VM nodes (WalT's name for 64-bit ARM qemu VMs).
pub const MODEL_ARM64: &str = "qemu-arm-64";

/// The model of the VM nodes of `arch`.
pub fn model_of(arch: Arch) -> &'static str {
    match arch {
        Arch::Amd64 => MODEL,
        Arch::Arm64 => MODEL_ARM64,
    }
}

/// The serial console the kernel of a VM of `arch` writes to (the PC's UART, the `virt` board's PL011).
fn console_of(arch: Arch) -> &'static str {
    match arch {
        Arch::Amd64 => "ttyS0",
        Arch::Arm64 => "ttyAMA0",
    }
}

/// What the image prints on the serial console once it has booted (then the host name, the
/// kernel's uptime).
pub const BOOTED_MARKER: &str = "WALT-NODE-BOOTED";

/// Kernel modules the initramfs loads (with their dependencies): the NIC's bus (PCI on the PC,
/// virtio-mmio on the arm64 `virt` board, where `walt-operator vm` plugs it), the NIC, the NFS
/// client, overlay.
fn modules_of(arch: Arch) -> [&'static str; 4] {
    let bus = match arch {
        Arch::Amd64 => "virtio_pci",
        Arch::Arm64 => "virtio_mmio",
    };
    [bus, "virtio_net", "nfsv3", "overlay"]
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> FixtureError + '_ {
    move |e| FixtureError::io(what, e)
}

/// A Debian kernel package, unpacked (cached under [`cache_dir`]`/netboot/`).
#[derive(Debug, Clone)]
pub struct DebianKernel {
    /// Its CPU.
    pub arch: Arch,
    /// The kernel release (`6.1.0-57-amd64`).
    pub release: String,
    /// The unpacked package.
    pub root: PathBuf,
}

impl DebianKernel {
    /// The `vmlinuz`.
    pub fn vmlinuz(&self) -> PathBuf {
        self.root.join(format!("boot/vmlinuz-{}", self.release))
    }

    /// The module files to load, dependencies first (`modprobe --show-depends` on the package).
    pub fn modules(&self, names: &[&str]) -> Result<Vec<PathBuf>, FixtureError> {
        let mut out: Vec<PathBuf> = Vec::new();
        for name in names {
            let listing = run_stdout(Command::new("modprobe").arg("-d").arg(&self.root).args([
                "-S",
                &self.release,
                "--show-depends",
                name,
            ]))?;
            for line in listing.lines() {
                let Some(path) = line.trim().strip_prefix("insmod ") else {
                    continue;
                };
                let path = PathBuf::from(path.split_whitespace().next().unwrap_or_default());
                if !out.contains(&path) {
                    out.push(path);
                }
            }
        }
        Ok(out)
    }
}

/// Debian's current amd64 kernel ([`debian_kernel_for`]).
pub fn debian_kernel() -> Result<DebianKernel, FixtureError> {
    debian_kernel_for(Arch::Amd64)
}

/// Debian's current kernel of `arch` (`linux-image-<arch>`'s dependency), downloaded and unpacked
/// once; `depmod` is run on it so that the module dependencies are known.
pub fn debian_kernel_for(arch: Arch) -> Result<DebianKernel, FixtureError> {
    require_tool("apt-get", "apt")?;
    require_tool("dpkg-deb", "dpkg")?;
    require_tool("depmod", "kmod")?;
    let meta = format!("linux-image-{0}:{0}", arch.name());
    let depends = run_stdout(Command::new("apt-cache").args(["depends", &meta]))?;
    let package = depends
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-"))
        .ok_or_else(|| {
            FixtureError::Failed(format!("apt-cache depends {meta} names no kernel: {depends}"))
        })?;
    let package = package
        .strip_suffix(&format!(":{}", arch.name()))
        .unwrap_or(package)
        .to_string();
    let release = package.trim_start_matches("linux-image-").to_string();
    let dir = cache_dir().join("netboot").join(&package);
    let root = dir.join("root");
    if !root
        .join("lib/modules")
        .join(&release)
        .join("modules.dep")
        .is_file()
    {
        std::fs::create_dir_all(&dir).map_err(io("creating the kernel cache dir"))?;
        run(Command::new("apt-get")
            .args(["download", &format!("{package}:{}", arch.name())])
            .current_dir(&dir))?;
        let deb = std::fs::read_dir(&dir)
            .map_err(io("listing the kernel cache dir"))?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .ok_or_else(|| FixtureError::Failed(format!("apt-get download {package} left no .deb")))?;
        let staging = dir.join("staging");
        let _ = std::fs::remove_dir_all(&staging);
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&staging))?;
        run(Command::new("depmod").arg("-b").arg(&staging).arg(&release))?;
        let _ = std::fs::remove_file(&deb);
        std::fs::rename(&staging, &root).map_err(io("placing the unpacked kernel"))?;
    }
    Ok(DebianKernel { arch, release, root })
}

/// A `newc` cpio archive (the initramfs format), written entry by entry.
#[derive(Debug, Default)]
pub struct Cpio {
    bytes: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        let _ = write!(self.bytes, "070701");
        for field in fields {
            let _ = write!(self.bytes, "{field:08x}");
        }
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }

    /// A directory.
    pub fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, (0, 0), &[]);
    }

    /// A regular file.
    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | mode, (0, 0), data);
    }

    /// A character device.
    pub fn char_device(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020_600, (major, minor), &[]);
    }

    /// The archive, gzip-compressed, with its trailer.
    pub fn finish(mut self) -> Result<Vec<u8>, FixtureError> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&self.bytes)
            .map_err(io("compressing the initramfs"))?;
        gz.finish().map_err(io("compressing the initramfs"))
    }
}

/// The initramfs `/init`: loads the modules, configures `eth0` from the kernel's `ip=` (iPXE fills
/// it from its DHCP lease; a default route when the lease names a router), mounts `nfsroot=` read-only over NFSv3/TCP (through the server's
/// portmapper, like WalT nodes do) and hands over to the image's `/bin/walt-init`.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod /lib/modules/$m || echo "walt-initrd: insmod $m failed"; done
ipcfg=""; nfsroot=""
for arg in $(cat /proc/cmdline); do
  case "$arg" in ip=*) ipcfg="${arg#ip=}";; nfsroot=*) nfsroot="${arg#nfsroot=}";; esac
done
client=$(echo "$ipcfg" | cut -d: -f1); server=$(echo "$ipcfg" | cut -d: -f2)
gateway=$(echo "$ipcfg" | cut -d: -f3)
mask=$(echo "$ipcfg" | cut -d: -f4); host=$(echo "$ipcfg" | cut -d: -f5)
for i in $(seq 1 50); do [ -e /sys/class/net/eth0 ] && break; sleep 0.1; done
ifconfig lo 127.0.0.1 up
ifconfig eth0 "$client" netmask "$mask" up
# The lab network's router, when its DHCP names one (the way back to the cluster's pods).
[ -n "$gateway" ] && route add default gw "$gateway"
hostname "$host"
echo "walt-initrd: mounting $nfsroot"
if ! mount -t nfs -o ro,vers=3,proto=tcp,mountproto=tcp,nolock,addr=$server,mountaddr=$server "$nfsroot" /newroot; then
  echo "walt-initrd: NFS mount of $nfsroot failed"; exec sh
fi
mount --move /dev /newroot/dev
umount /proc /sys
exec switch_root /newroot /bin/walt-init
"#;

/// Debian's static busybox of `arch`: the host's for amd64, else from `busybox-static:<arch>`.
fn busybox_binary(arch: Arch) -> Result<Vec<u8>, FixtureError> {
    if arch == Arch::Amd64 {
        require_tool("busybox", "busybox-static")?;
        return std::fs::read("/bin/busybox").map_err(io("reading /bin/busybox"));
    }
    let unpacked = tempfile::tempdir().map_err(io("creating a dir for busybox"))?;
    run(Command::new("dpkg-deb")
        .arg("-x")
        .arg(crate::images::busybox_deb(arch)?)
        .arg(unpacked.path()))?;
    std::fs::read(unpacked.path().join("bin/busybox")).map_err(io("reading busybox"))
}

/// Builds the initramfs of [`INIT`] with Debian's static busybox and the kernel's modules.
pub fn initramfs(kernel: &DebianKernel) -> Result<Vec<u8>, FixtureError> {
    let busybox = busybox_binary(kernel.arch)?;
    let mut cpio = Cpio::default();
    for dir in ["bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules"] {
        cpio.dir(dir);
    }
    cpio.char_device("dev/console", 5, 1);
    cpio.file("bin/busybox", 0o755, &busybox);
    cpio.file("init", 0o755, INIT.as_bytes());
    let mut order = String::new();
    for module in kernel.modules(&modules_of(kernel.arch))? {
        let name = module
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| FixtureError::Failed(format!("module path {} has no name", module.display())))?;
        let data = std::fs::read(&module).map_err(io("reading a kernel module"))?;
        cpio.file(&format!("lib/modules/{name}"), 0o644, &data);
        order.push_str(&name);
        order.push('\n');
    }
    cpio.file("modules.order", 0o644, order.as_bytes());
    cpio.finish()
}

/// A plain `walt-init` for the reference servers of the benchmarks (walt's boot service serves its
/// own in the node's top layer; images carry none): a RAM overlay (upper dir at the WalT path
/// `/run/walt/rootfs/mnt/fs_rw`) over the read-only NFS root, then `/sbin/init`.
const PLAIN_WALT_INIT: &str = r"#!/bin/sh
mount -t proc proc /proc
mount -t tmpfs -o mode=755 tmpfs /run
mkdir -p /run/walt/rootfs/mnt/fs_rw /run/walt/rootfs/mnt/fs_work
mount -t overlay overlay -o lowerdir=/,upperdir=/run/walt/rootfs/mnt/fs_rw,workdir=/run/walt/rootfs/mnt/fs_work /mnt
mount --move /run /mnt/run
mount --move /dev /mnt/dev
umount /proc
cd /mnt
pivot_root . mnt
exec chroot . /sbin/init
";

/// The arm64 image's boot script (U-Boot fills in the variables from its DHCP lease: `hostname`,
/// `ethaddr` the MAC, `gatewayip` when the lease names a router), made a uImage script with
/// `mkimage`. The kernel is Debian's uncompressed arm64 `Image`; `booti` takes the initramfs's
/// address and size and the device tree qemu gave U-Boot.
const START_UBOOT: &str = "\
setenv bootargs \"console=ttyAMA0 quiet ip=${ipaddr}:${serverip}:${gatewayip}:${netmask}:${hostname}:eth0:off \
nfsroot=${serverip}:/var/lib/walt/nodes/${ethaddr}/fs\"
tftpboot ${kernel_addr_r} vmlinuz
tftpboot ${ramdisk_addr_r} initrd.img
booti ${kernel_addr_r} ${ramdisk_addr_r}:${filesize} ${fdtcontroladdr}
";

/// `script` as a uImage script (what U-Boot's `source` runs), made with U-Boot's `mkimage`.
fn uboot_script(script: &str) -> Result<Vec<u8>, FixtureError> {
    require_tool("mkimage", "u-boot-tools")?;
    let dir = tempfile::tempdir().map_err(io("creating a dir for mkimage"))?;
    let (text, image) = (dir.path().join("script"), dir.path().join("script.uimg"));
    std::fs::write(&text, script).map_err(io("writing the boot script"))?;
    run(Command::new("mkimage")
        .args([
            "-A",
            "arm64",
            "-O",
            "linux",
            "-T",
            "script",
            "-C",
            "none",
            "-n",
            "walt boot",
        ])
        .arg("-d")
        .arg(&text)
        .arg(&image))?;
    std::fs::read(&image).map_err(io("reading the uImage script"))
}

/// The image's boot script (iPXE fills in the variables from its DHCP lease).
const START_IPXE: &str = "#!ipxe\n\
kernel vmlinuz console=ttyS0 quiet ip=${ip}:${next-server}:${gateway}:${netmask}:${hostname}:eth0:off \
nfsroot=${next-server}:/var/lib/walt/nodes/${mac}/fs\n\
initrd initrd.img\n\
boot\n";

/// Makes a WalT image root for VM nodes of the kernel's CPU in `dest`: busybox, an init that prints
/// [`BOOTED_MARKER`] (with the host name, the uptime and the digest in `/etc/walt/image-digest`) and
/// writes `/run/uptime-ready`, and `/boot/<model>/` ([`model_of`]) with the kernel, the initramfs and
/// the boot script, `start.ipxe` (amd64) or `start.uboot` (arm64), the kernel reached through a
/// relative symlink, as WalT images do. Like a WalT image, it has no `walt-init`: the server adds it
/// (see [`add_plain_walt_init`] for servers that do not).
pub fn vm_image_root(dest: &Path, kernel: &DebianKernel) -> Result<(), FixtureError> {
    let arch = kernel.arch;
    busybox_rootfs(arch, dest)?;
    let boot = dest.join("boot").join(model_of(arch));
    for dir in [boot.as_path(), &dest.join("mnt"), &dest.join("etc/init.d")] {
        std::fs::create_dir_all(dir).map_err(io("creating image dirs"))?;
    }
    let write = |path: PathBuf, data: &[u8], mode: u32| -> Result<(), FixtureError> {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::write(&path, data).map_err(io("writing an image file"))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).map_err(io("chmod"))
    };
    let vmlinuz = std::fs::read(kernel.vmlinuz()).map_err(io("reading the kernel"))?;
    write(
        dest.join(format!("boot/vmlinuz-{}", kernel.release)),
        &vmlinuz,
        0o644,
    )?;
    std::os::unix::fs::symlink(format!("../vmlinuz-{}", kernel.release), boot.join("vmlinuz"))
        .map_err(io("linking the kernel"))?;
    write(boot.join("initrd.img"), &initramfs(kernel)?, 0o644)?;
    match arch {
        Arch::Amd64 => write(boot.join("start.ipxe"), START_IPXE.as_bytes(), 0o644)?,
        Arch::Arm64 => write(boot.join("start.uboot"), &uboot_script(START_UBOOT)?, 0o644)?,
    }
    write(
        dest.join("etc/inittab"),
        format!(
            "::sysinit:/etc/init.d/rcS\n{}::respawn:/bin/sh\n",
            console_of(arch)
        )
        .as_bytes(),
        0o644,
    )?;
    let rcs = format!(
        "#!/bin/sh\nmount -t proc proc /proc\nmount -t sysfs sys /sys\n\
         mkdir -p /run/sshd /var/log\n\
         [ -x /usr/sbin/sshd ] && /usr/sbin/sshd -f /etc/ssh/sshd_config -E /run/sshd.log\n\
         echo booted > /run/uptime-ready\n\
         echo \"{BOOTED_MARKER} $(hostname) $(cut -d' ' -f1 /proc/uptime) $(cat /etc/walt/image-digest 2>/dev/null)\"\n"
    );
    write(dest.join("etc/init.d/rcS"), rcs.as_bytes(), 0o755)
}

/// Makes the VM nodes' image root in `root`: [`vm_image_root`] with Debian's current kernel and the
/// host's `sshd` ([`install_host_sshd`]) with a host key of its own and no authorized key (the boot
/// service serves the device's).
pub fn vm_node_os_root(root: &Path) -> Result<(), FixtureError> {
    vm_node_os_root_for(root, Arch::Amd64)
}

/// [`vm_node_os_root`] for VM nodes of `arch`: Debian's kernel and OpenSSH server of that CPU
/// ([`install_sshd`]).
pub fn vm_node_os_root_for(root: &Path, arch: Arch) -> Result<(), FixtureError> {
    let kernel = debian_kernel_for(arch)?;
    vm_image_root(root, &kernel)?;
    install_sshd(root, arch, None)
}

/// An OCI layout holding `root` as the one-layer image `vm`, labelled for [`MODEL`] (what a lab
/// image says it boots on).
pub fn vm_node_os_image(root: &Path) -> Result<crate::images::OciLayout, FixtureError> {
    vm_node_os_image_for(root, Arch::Amd64)
}

/// [`vm_node_os_image`] of `arch`, labelled for its model ([`model_of`]).
pub fn vm_node_os_image_for(root: &Path, arch: Arch) -> Result<crate::images::OciLayout, FixtureError> {
    let layout = crate::images::OciLayout::new()?;
    layout.new_image("empty", arch)?;
    layout.add_layer_from_dir("empty", "vm", root)?;
    layout.set_label("vm", "walt.node.models", model_of(arch))?;
    Ok(layout)
}

/// Adds [`PLAIN_WALT_INIT`] to an image root, for servers that do not add their own (the
/// benchmarks' `dnsmasq` + `nfs-ganesha` reference).
pub fn add_plain_walt_init(root: &Path) -> Result<(), FixtureError> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = root.join("bin/walt-init");
    std::fs::write(&path, PLAIN_WALT_INIT).map_err(io("writing walt-init"))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).map_err(io("chmod"))
}

/// A lab network: a network namespace the test creates, holding a bridge ([`LAB_BRIDGE`],
/// `10.123.N.1/24`, where the boot service listens) VM nodes plug their taps into. Deleted on drop.
#[derive(Debug)]
pub struct LabNetwork {
    /// The namespace name.
    pub netns: String,
    /// The boot server's address on the bridge.
    pub server: std::net::Ipv4Addr,
    /// Whether the namespace is this network's (deleted on drop) or a cluster node's (only the
    /// bridge is deleted).
    owns_netns: bool,
}

/// The bridge of a [`LabNetwork`].
pub const LAB_BRIDGE: &str = "br0";

impl LabNetwork {
    /// Creates the namespace, the bridge and loopback.
    pub fn create(index: u8) -> Result<Self, FixtureError> {
        require_tool("ip", "iproute2")?;
        let netns = format!("wnb-{}-{index}", std::process::id());
        let server = std::net::Ipv4Addr::new(10, 123, index, 1);
        run(Command::new("ip").args(["netns", "add", &netns]))?;
        let net = LabNetwork {
            netns,
            server,
            owns_netns: true,
        };
        net.ip(&["link", "set", "lo", "up"])?;
        net.add_bridge()?;
        Ok(net)
    }

    /// A lab network attached to a cluster-tier node: the bridge in the node's network namespace
    /// `netns` ([`crate::k8s::Cluster::node_netns`]), so that the node's host-network pods (the boot
    /// service, VM nodes) are on it, and the node routes between it and the pod network.
    pub fn on_cluster_node(netns: &str, index: u8) -> Result<Self, FixtureError> {
        require_tool("ip", "iproute2")?;
        let net = LabNetwork {
            netns: netns.to_owned(),
            server: std::net::Ipv4Addr::new(10, 123, index, 1),
            owns_netns: false,
        };
        net.add_bridge()?;
        Ok(net)
    }

    fn add_bridge(&self) -> Result<(), FixtureError> {
        self.ip(&["link", "add", LAB_BRIDGE, "type", "bridge"])?;
        self.ip(&["addr", "add", &format!("{}/24", self.server), "dev", LAB_BRIDGE])?;
        self.ip(&["link", "set", LAB_BRIDGE, "up"])
    }

    fn ip(&self, args: &[&str]) -> Result<(), FixtureError> {
        run(Command::new("ip").args(["-n", &self.netns]).args(args)).map(|_| ())
    }

    /// The address of the `n`-th device of this network (`10.123.N.(10+n)`).
    pub fn device_ip(&self, n: u8) -> std::net::Ipv4Addr {
        let o = self.server.octets();
        std::net::Ipv4Addr::new(o[0], o[1], o[2], 10 + n)
    }
}

impl Drop for LabNetwork {
    fn drop(&mut self) {
        let args = if self.owns_netns {
            vec!["netns", "del", &self.netns]
        } else {
            vec!["-n", &self.netns, "link", "del", LAB_BRIDGE]
        };
        let _ = Command::new("ip").args(args).status();
    }
}

/// A VM node on a lab network: `walt-operator vm --accel tcg` (qemu-system-x86_64, or
/// qemu-system-aarch64 with `--arch arm64`, on a tap of the lab bridge), powered on to network boot
/// (its NIC's iPXE ROM, or U-Boot), serial console (its standard output, as in a VM node pod's log)
/// in a file. Powered off on drop.
#[derive(Debug)]
pub struct VmNode {
    daemon: Daemon,
    console: PathBuf,
    powered_on: Instant,
}

impl VmNode {
    /// Powers on a VM with `mac` on `net`'s bridge; its console goes to `dir/console-<mac>.log`.
    pub fn power_on(net: &LabNetwork, mac: &str, dir: &Path) -> Result<Self, FixtureError> {
        Self::start(net, mac, dir, false, Arch::Amd64)
    }

    /// [`Self::power_on`], a VM of `arch` (`walt-operator vm --arch`).
    pub fn power_on_arch(net: &LabNetwork, mac: &str, dir: &Path, arch: Arch) -> Result<Self, FixtureError> {
        Self::start(net, mac, dir, false, arch)
    }

    /// [`Self::power_on`], a VM that restarts when its system reboots (a reboot over SSH
    /// network-boots it again, its console file goes on) instead of powering off.
    pub fn power_on_rebootable(net: &LabNetwork, mac: &str, dir: &Path) -> Result<Self, FixtureError> {
        Self::start(net, mac, dir, true, Arch::Amd64)
    }

    fn start(
        net: &LabNetwork,
        mac: &str,
        dir: &Path,
        reboots: bool,
        arch: Arch,
    ) -> Result<Self, FixtureError> {
        let mut args: Vec<String> = ["vm", "--mac", mac, "--bridge", LAB_BRIDGE]
            .into_iter()
            .chain(["--memory", "512Mi", "--cpus", "1", "--accel", "tcg"])
            .chain(["--arch", arch.name()])
            // A clock far in the past: only the boot service's clock sync sets it right.
            .chain(["--rtc-base", "2001-01-01T00:00:00"])
            .map(str::to_owned)
            .collect();
        if !reboots {
            args.push("--exit-on-reboot".to_owned());
        }
        Self::run_operator_vm(net, &args, mac, dir)
    }

    /// Powers on the VM of a VM node pod: runs its `walt-operator` arguments (`vm --mac MAC
    /// --bridge …`, as the operator wrote them) in `net`, as the kubelet would run the container on
    /// the cluster node holding the lab bridge.
    pub fn power_on_as_pod(net: &LabNetwork, pod_args: &[String], dir: &Path) -> Result<Self, FixtureError> {
        let mac = pod_args
            .iter()
            .skip_while(|a| *a != "--mac")
            .nth(1)
            .ok_or_else(|| FixtureError::Failed(format!("no --mac in the pod's arguments {pod_args:?}")))?;
        Self::run_operator_vm(net, pod_args, mac, dir)
    }

    fn run_operator_vm(
        net: &LabNetwork,
        args: &[String],
        mac: &str,
        dir: &Path,
    ) -> Result<Self, FixtureError> {
        if args.windows(2).any(|pair| pair == ["--arch", "arm64"]) {
            require_tool("qemu-system-aarch64", "qemu-system-arm")?;
            if !Path::new(UBOOT_ARM64).is_file() {
                return Err(FixtureError::Failed(format!(
                    "{UBOOT_ARM64} is missing: apt-get install u-boot-qemu"
                )));
            }
        } else {
            require_tool("qemu-system-x86_64", "qemu-system-x86")?;
        }
        let console = dir.join(format!("console-{}.log", mac.replace(':', "")));
        // A new console for every power-on: an old marker must not count.
        let _ = std::fs::remove_file(&console);
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &net.netns])
            .arg(operator_binary())
            .args(args);
        let powered_on = Instant::now();
        let daemon = Daemon::spawn(&format!("vm {mac}"), command, &console, Lifetime::Test)
            .map_err(|e| FixtureError::Failed(e.to_string()))?;
        Ok(VmNode {
            daemon,
            console,
            powered_on,
        })
    }

    /// The serial console so far.
    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// Waits for `text` on the console; returns the time since power-on.
    pub fn wait_console(&mut self, text: &str, within: Duration) -> Result<Duration, FixtureError> {
        let deadline = Instant::now() + within;
        loop {
            if self.console().contains(text) {
                return Ok(self.powered_on.elapsed());
            }
            if let Some(status) = self.daemon.exited() {
                return Err(FixtureError::Failed(format!(
                    "the VM (walt-operator vm) exited ({status}) before {text:?}; console:\n{}\n{}",
                    self.console(),
                    self.daemon.log_tail(20)
                )));
            }
            if Instant::now() > deadline {
                return Err(FixtureError::Failed(format!(
                    "{text:?} not on the console within {within:?}; console:\n{}",
                    self.console()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The time since power-on.
    pub fn since_power_on(&self) -> Duration {
        self.powered_on.elapsed()
    }
}

/// A host executable and the shared libraries it links (`ldd`), the dynamic loader included: what
/// an image needs to run a copy of it.
pub fn with_libraries(binary: &Path) -> Result<Vec<PathBuf>, FixtureError> {
    require_tool("ldd", "libc-bin")?;
    let libraries = run_stdout(Command::new("ldd").arg(binary))?;
    let mut files = vec![binary.to_path_buf()];
    for line in libraries.lines() {
        let path = line
            .split("=>")
            .nth(1)
            .unwrap_or(line)
            .split_whitespace()
            .next()
            .unwrap_or_default();
        if path.starts_with('/') {
            files.push(PathBuf::from(path));
        }
    }
    Ok(files)
}

/// Copies the host's OpenSSH server (Debian's `openssh-server`) and the libraries it links into an
/// image root, with a host key of its own, a configuration for root logins by key and, when given,
/// `authorized_key` for root: the VM node serves SSH like a WalT node.
pub fn install_host_sshd(dest: &Path, authorized_key: Option<&str>) -> Result<(), FixtureError> {
    install_sshd(dest, Arch::Amd64, authorized_key)
}

/// The Debian packages holding the host's `sshd` and the libraries it links (`dpkg -S` of each
/// file `ldd` names, under `/usr` too: Debian 12 registers some libraries there only).
fn sshd_packages() -> Result<Vec<String>, FixtureError> {
    let mut packages = vec!["openssh-server".to_owned()];
    for file in with_libraries(Path::new("/usr/sbin/sshd"))?.iter().skip(1) {
        let usr = Path::new("/usr").join(file.strip_prefix("/").unwrap_or(file));
        let owner = [file.as_path(), usr.as_path()].into_iter().find_map(|path| {
            run_stdout(Command::new("dpkg").arg("-S").arg(path))
                .ok()
                .and_then(|out| out.split(':').next().map(str::trim).map(str::to_owned))
        });
        let owner = owner.ok_or_else(|| {
            FixtureError::Failed(format!("dpkg -S names no package holding {}", file.display()))
        })?;
        if !packages.contains(&owner) {
            packages.push(owner);
        }
    }
    Ok(packages)
}

/// Installs Debian's OpenSSH server of `arch` in an image root, as [`install_host_sshd`] does: for
/// amd64 the host's `sshd` and its libraries, for another CPU Debian's `openssh-server` of that CPU
/// and the packages of the libraries the host's links (the same Debian release links the same ones),
/// downloaded with `apt-get download` ([`crate::images::debian_deb`]) and unpacked.
pub fn install_sshd(dest: &Path, arch: Arch, authorized_key: Option<&str>) -> Result<(), FixtureError> {
    require_tool("sshd", "openssh-server")?;
    require_tool("ssh-keygen", "openssh-client")?;
    if arch == Arch::Amd64 {
        for file in with_libraries(Path::new("/usr/sbin/sshd"))? {
            let target = dest.join(file.strip_prefix("/").unwrap_or(&file));
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(io("creating a library dir"))?;
            }
            std::fs::copy(&file, &target).map_err(io("copying sshd or a library"))?;
        }
    } else {
        for package in sshd_packages()? {
            let deb = crate::images::debian_deb(&package, arch)?;
            run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(dest))?;
        }
    }
    for dir in ["etc/ssh", "root/.ssh", "var/empty", "lib64"] {
        std::fs::create_dir_all(dest.join(dir)).map_err(io("creating ssh dirs"))?;
    }
    let key = dest.join("etc/ssh/ssh_host_ed25519_key");
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key))?;
    std::fs::write(
        dest.join("etc/ssh/sshd_config"),
        "HostKey /etc/ssh/ssh_host_ed25519_key\nPermitRootLogin prohibit-password\nUsePAM no\n\
         StrictModes no\nPidFile /run/sshd.pid\nAuthorizedKeysFile /root/.ssh/authorized_keys\n",
    )
    .map_err(io("writing sshd_config"))?;
    if let Some(key) = authorized_key {
        std::fs::write(dest.join("root/.ssh/authorized_keys"), format!("{key}\n"))
            .map_err(io("writing authorized_keys"))?;
    }
    let passwd = dest.join("etc/passwd");
    let mut users = std::fs::read_to_string(&passwd).map_err(io("reading passwd"))?;
    users.push_str("sshd:x:100:65534::/run/sshd:/usr/sbin/nologin\n");
    std::fs::write(&passwd, users).map_err(io("writing passwd"))
}

/// A running boot server, stopped on drop.
pub struct BootServer {
    daemon: Daemon,
    journal: PathBuf,
}

impl BootServer {
    /// Starts `walt-operator boot-server` in `net`'s namespace (images pulled over the host network
    /// from `registry`), with its journal and cache in `dir`, and waits until it listens.
    ///
    /// # Panics
    /// When it does not start (test helper).
    pub fn start(net: &LabNetwork, dir: &Path, registry: Option<&Registry>, extra: &[String]) -> BootServer {
        let mut with_netns = vec!["--netns".to_string(), net.netns.clone()];
        with_netns.extend_from_slice(extra);
        Self::start_with(dir, registry, &with_netns, &[])
    }

    /// Starts `walt-operator boot-server` with `args` and `env` (no network namespace unless `args`
    /// names one), its journal and cache in `dir`, and waits until it listens.
    ///
    /// # Panics
    /// When it does not start (test helper).
    pub fn start_with(
        dir: &Path,
        registry: Option<&Registry>,
        args: &[String],
        env: &[(&str, &Path)],
    ) -> BootServer {
        Self::spawn(Command::new(operator_binary()), dir, registry, args, env)
    }

    /// [`Self::start_with`] run whole inside `net`'s namespace (`ip netns exec`), for
    /// `--from-cluster`, which does not enter a namespace itself: the API server and the registry
    /// are reached through [`Forward::into_netns`].
    ///
    /// # Panics
    /// When it does not start (test helper).
    pub fn start_in(
        net: &LabNetwork,
        dir: &Path,
        registry: Option<&Registry>,
        args: &[String],
        env: &[(&str, &Path)],
    ) -> BootServer {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &net.netns]).arg(operator_binary());
        Self::spawn(command, dir, registry, args, env)
    }

    fn spawn(
        mut command: Command,
        dir: &Path,
        registry: Option<&Registry>,
        args: &[String],
        env: &[(&str, &Path)],
    ) -> BootServer {
        let journal = dir.join("journal.jsonl");
        command.envs(env.iter().map(|(k, v)| (*k, *v)));
        command
            .arg("boot-server")
            .arg("--journal")
            .arg(&journal)
            .arg("--cache-dir")
            .arg(dir.join("cache"))
            .args(args);
        if let Some(registry) = registry {
            command.arg("--insecure-registry").arg(registry.host());
        }
        let log = dir.join("boot-server.log");
        let mut daemon =
            Daemon::spawn("boot-server", command, &log, Lifetime::Test).expect("start the boot server");
        let ready = crate::wait::Wait::new("the boot server to listen", Duration::from_mins(1))
            .every(Duration::from_millis(50))
            .until(|| {
                std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .contains("walt boot server ready")
            });
        if let Some(status) = daemon.exited() {
            panic!("the boot server exited ({status}): {}", daemon.log_tail(30));
        }
        ready.unwrap_or_else(|e| panic!("{e}: {}", daemon.log_tail(30)));
        BootServer { daemon, journal }
    }

    /// Its process ID (`walt-operator` itself: `--netns` enters the namespace in-process).
    pub fn pid(&self) -> u32 {
        self.daemon.pid()
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.daemon.log()).unwrap_or_default()
    }

    /// The journal entries (JSON lines).
    pub fn journal(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.journal)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for BootServer {
    fn drop(&mut self) {
        self.daemon.stop(Duration::from_secs(5));
    }
}

/// A TCP port forwarded across a network namespace boundary by `socat` (one connection per
/// `socat` child, each entering the other namespace), stopped on drop.
#[derive(Debug)]
pub struct Forward {
    _daemon: Daemon,
}

impl Forward {
    /// Makes the host's loopback `port` reachable at `127.0.0.1:port` inside `net` (the API
    /// server and the registry, for a process that runs whole in the lab namespace).
    ///
    /// # Errors
    /// When `socat` or `nsenter` is missing or cannot start.
    pub fn into_netns(net: &LabNetwork, port: u16, dir: &Path) -> Result<Self, FixtureError> {
        let host = format!("/proc/{}/ns/net", std::process::id());
        let inner = format!("exec nsenter --net={host} socat - TCP:127.0.0.1:{port}\n");
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &net.netns]);
        Self::start(command, port, &inner, &format!("in-{port}"), dir)
    }

    /// Makes `port` of `net`'s loopback reachable at the host's `127.0.0.1:host_port` (the boot
    /// records, for a process on the host).
    ///
    /// # Errors
    /// When `socat` is missing or cannot start.
    pub fn out_of_netns(
        net: &LabNetwork,
        port: u16,
        host_port: u16,
        dir: &Path,
    ) -> Result<Self, FixtureError> {
        let inner = format!("exec ip netns exec {} socat - TCP:127.0.0.1:{port}\n", net.netns);
        Self::start(
            Command::new("env"),
            host_port,
            &inner,
            &format!("out-{port}"),
            dir,
        )
    }

    fn start(
        mut command: Command,
        listen: u16,
        inner: &str,
        name: &str,
        dir: &Path,
    ) -> Result<Self, FixtureError> {
        use std::os::unix::fs::PermissionsExt as _;
        require_tool("socat", "socat")?;
        require_tool("nsenter", "util-linux")?;
        let script = dir.join(format!("forward-{name}.sh"));
        std::fs::write(&script, format!("#!/bin/sh\n{inner}")).map_err(io("writing a forward script"))?;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).map_err(io("chmod"))?;
        command
            .arg("socat")
            .arg(format!("TCP-LISTEN:{listen},bind=127.0.0.1,reuseaddr,fork"))
            .arg(format!("EXEC:{}", script.display()));
        let daemon = Daemon::spawn(
            &format!("forward {name}"),
            command,
            &dir.join(format!("forward-{name}.log")),
            Lifetime::Test,
        )
        .map_err(|e| FixtureError::Failed(e.to_string()))?;
        Ok(Forward { _daemon: daemon })
    }
}

/// A command run inside `net`'s namespace.
pub fn in_netns(net: &LabNetwork, program: &str) -> Command {
    let mut command = Command::new("ip");
    command.args(["netns", "exec", &net.netns, program]);
    command
}

/// Runs a command: (success, stdout + stderr).
///
/// # Panics
/// When it cannot start (test helper).
pub fn output(command: &mut Command) -> (bool, String) {
    let out = command.output().expect("run a client");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The reference boot servers from Debian, for benchmarks: `dnsmasq` (DHCP + TFTP) and
/// `nfs-ganesha` (a userspace NFSv3 server, VFS backend) with `rpcbind`, in `net`'s namespace.
/// Stopped on drop.
#[derive(Debug)]
pub struct ReferenceServers {
    daemons: Vec<Daemon>,
}

impl ReferenceServers {
    /// Serves `export` (an unpacked root) read-only over NFSv3/TCP at its own path, and, when
    /// `tftp_root` is given, DHCP for `(mac, ip, name)` with iPXE pointed at `start.ipxe` of
    /// `tftp_root`.
    pub fn start(
        net: &LabNetwork,
        dir: &Path,
        export: &Path,
        dhcp: Option<(&str, std::net::Ipv4Addr, &str, &Path)>,
    ) -> Result<Self, FixtureError> {
        require_tool("rpcbind", "rpcbind")?;
        require_tool("ganesha.nfsd", "nfs-ganesha")?;
        let spawn = |name: &str, program: &str, args: &[String]| -> Result<Daemon, FixtureError> {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", &net.netns, program]).args(args);
            Daemon::spawn(name, command, &dir.join(format!("{name}.log")), Lifetime::Test)
                .map_err(|e| FixtureError::Failed(e.to_string()))
        };
        let mut daemons = vec![spawn("rpcbind", "rpcbind", &["-f".into(), "-w".into()])?];
        std::thread::sleep(Duration::from_millis(300));
        let config = dir.join("ganesha.conf");
        std::fs::write(
            &config,
            format!(
                "NFS_CORE_PARAM {{ Protocols = 3; Enable_NLM = false; Enable_RQUOTA = false; NFS_Port = 2049; }}\n\
                 NFS_KRB5 {{ Active_krb5 = false; }}\n\
                 EXPORT {{ Export_Id = 1; Path = {0}; Pseudo = {0}; Access_Type = RO; Squash = No_Root_Squash;\n\
                 Protocols = 3; Transports = TCP; SecType = sys; FSAL {{ Name = VFS; }} }}\n\
                 LOG {{ Default_Log_Level = WARN; }}\n",
                export.display()
            ),
        )
        .map_err(io("writing ganesha.conf"))?;
        daemons.push(spawn(
            "ganesha",
            "ganesha.nfsd",
            &[
                "-F".into(),
                "-f".into(),
                config.display().to_string(),
                "-L".into(),
                dir.join("ganesha-own.log").display().to_string(),
                "-p".into(),
                dir.join("ganesha.pid").display().to_string(),
            ],
        )?);
        if let Some((mac, ip, name, tftp_root)) = dhcp {
            require_tool("dnsmasq", "dnsmasq-base")?;
            daemons.push(spawn(
                "dnsmasq",
                "dnsmasq",
                &[
                    "--no-daemon".into(),
                    "--conf-file=/dev/null".into(),
                    "--port=0".into(),
                    "--interface=br0".into(),
                    "--bind-interfaces".into(),
                    format!("--dhcp-range={ip},{ip},255.255.255.0,1h"),
                    format!("--dhcp-host={mac},{ip},{name}"),
                    "--enable-tftp".into(),
                    format!("--tftp-root={}", tftp_root.display()),
                    "--dhcp-match=set:ipxe,175".into(),
                    "--dhcp-boot=tag:ipxe,start.ipxe".into(),
                    "--dhcp-option=encap:175,176,1".into(),
                    format!("--dhcp-leasefile={}", dir.join("dnsmasq.leases").display()),
                    format!("--pid-file={}", dir.join("dnsmasq.pid").display()),
                ],
            )?);
        }
        // ganesha takes a few seconds to register with rpcbind and leave its grace period.
        std::thread::sleep(Duration::from_secs(3));
        Ok(ReferenceServers { daemons })
    }
}

impl Drop for ReferenceServers {
    fn drop(&mut self) {
        for daemon in self.daemons.iter_mut().rev() {
            daemon.stop(Duration::from_secs(5));
        }
    }
}

/// The files of the cluster tier's VM node image ([`crate::lab::ensure_vm_node_image`]): the
/// static `walt-operator` at `/usr/bin` (a VM node pod runs `walt-operator vm`) and the host's
/// Debian `qemu-system-x86_64` (amd64 VM nodes) and `qemu-system-aarch64` (arm64 VM nodes) with what
/// they load at run time: their shared libraries, the x86 TCG accelerator module, their firmware
/// directories as `qemu-system-* -L help` lists them (the BIOS, the NICs' iPXE option ROMs; symbolic
/// links followed, as Debian links them across packages) and U-Boot for the arm64 board. Paths are
/// the host's, so qemu finds everything where it was built to look.
pub fn vm_node_image_files(operator: &Path) -> Result<Vec<crate::image_build::Entry>, FixtureError> {
    use crate::image_build::Entry;
    let mut files: Vec<(PathBuf, u32)> = Vec::new();
    let mut add = |file: PathBuf, mode: u32| {
        if !files.iter().any(|(f, _)| *f == file) {
            files.push((file, mode));
        }
    };
    for (program, package, modules) in QEMU_SYSTEMS {
        require_tool(program, package)?;
        let qemu = which(program)?;
        for file in with_libraries(&qemu)? {
            add(file, 0o755);
        }
        for module in modules {
            for file in with_libraries(&Path::new(QEMU_MODULE_DIR).join(module))? {
                add(file, 0o755);
            }
        }
        let data_dirs = run_stdout(Command::new(&qemu).args(["-L", "help"]))?;
        for dir in data_dirs.lines().map(str::trim).filter(|l| l.starts_with('/')) {
            let dir = std::fs::canonicalize(dir).map_err(io("resolving a qemu data directory"))?;
            for file in files_under(&dir)? {
                add(file, 0o644);
            }
        }
    }
    if !Path::new(UBOOT_ARM64).is_file() {
        return Err(FixtureError::Failed(format!(
            "{UBOOT_ARM64} is missing: apt-get install u-boot-qemu"
        )));
    }
    add(PathBuf::from(UBOOT_ARM64), 0o644);
    let mut entries = vec![Entry::dir("tmp", 0o1777)];
    let mut dirs = std::collections::BTreeSet::new();
    for path in
        std::iter::once(Path::new("/usr/bin/walt-operator")).chain(files.iter().map(|(f, _)| f.as_path()))
    {
        dirs.extend(
            path.ancestors()
                .skip(1)
                .filter(|d| *d != Path::new("/"))
                .map(Path::to_path_buf),
        );
    }
    entries.extend(dirs.iter().map(|d| Entry::dir(&relative(d), 0o755)));
    let read = |path: &Path| std::fs::read(path).map_err(io("reading a file of the VM node image"));
    entries.push(Entry::file("usr/bin/walt-operator", 0o755, read(operator)?));
    for (file, mode) in &files {
        entries.push(Entry::file(&relative(file), *mode, read(file)?));
    }
    Ok(entries)
}

/// The qemu programs VM nodes run, their Debian packages, and the modules each loads: Debian builds
/// x86's TCG as a module (KVM is built in); aarch64's TCG is built in.
const QEMU_SYSTEMS: [(&str, &str, &[&str]); 2] = [
    ("qemu-system-x86_64", "qemu-system-x86", &["accel-tcg-x86_64.so"]),
    ("qemu-system-aarch64", "qemu-system-arm", &[]),
];
/// Debian's U-Boot for qemu's arm64 `virt` board (`u-boot-qemu`), arm64 VM nodes' firmware.
pub const UBOOT_ARM64: &str = "/usr/lib/u-boot/qemu_arm64/u-boot.bin";
/// Where Debian's qemu loads its modules from.
const QEMU_MODULE_DIR: &str = "/usr/lib/x86_64-linux-gnu/qemu";

fn relative(path: &Path) -> String {
    path.strip_prefix("/").unwrap_or(path).display().to_string()
}

/// `program`'s path on `PATH`.
fn which(program: &str) -> Result<PathBuf, FixtureError> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
        .ok_or_else(|| FixtureError::Failed(format!("{program} is not on PATH")))
}

/// The files under `dir`, recursively, symbolic links followed.
fn files_under(dir: &Path) -> Result<Vec<PathBuf>, FixtureError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io("listing a qemu data directory"))? {
        let path = entry.map_err(io("listing a qemu data directory"))?.path();
        if path.is_dir() {
            out.extend(files_under(&path)?);
        } else if path.is_file() {
            out.push(path);
        }
    }
    Ok(out)
}
