//! `walt-operator vm`: a VM node's machine, what the VM node pod runs as its first process. It
//! plugs a tap into the lab network's bridge, then runs qemu on it: an amd64 VM is a PC
//! (`qemu-system-x86_64`) whose NIC's iPXE ROM network-boots from the boot service exactly like a lab
//! PC; an arm64 VM is a board (`qemu-system-aarch64 -machine virt`) whose U-Boot network-boots like a
//! lab board (the VM's MAC is its Device's).
//! The serial console is qemu's standard input and output: the pod's log (`kubectl walt node
//! console`), and typed input through an attach. The pure half ([`machine`], [`qemu_args`],
//! [`tap_name`], the quantity conversions) is what the tests and the operator share; the I/O half
//! ([`run`]) opens the tap, starts qemu and passes it the signals a pod receives.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::process::ExitStatus;

use crate::boot::state::Mac;

/// Where Debian's `u-boot-qemu` puts the U-Boot of qemu's arm64 `virt` machine (arm64 VMs' firmware).
pub const UBOOT_ARM64: &str = "/usr/lib/u-boot/qemu_arm64/u-boot.bin";

/// What machine a VM is: the CPU of the images it boots, which decides its qemu and its firmware.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum VmArch {
    /// A PC: `qemu-system-x86_64 -machine q35`, network-booted by its NIC's iPXE ROM.
    #[default]
    Amd64,
    /// An arm64 board: `qemu-system-aarch64 -machine virt`, network-booted by U-Boot
    /// ([`UBOOT_ARM64`], qemu's `-bios`): DHCP, then its boot script over TFTP.
    Arm64,
}

impl VmArch {
    /// The OCI name (`amd64`, `arm64`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Amd64 => "amd64",
            Self::Arm64 => "arm64",
        }
    }

    /// The qemu program that runs this machine.
    pub fn qemu(self) -> &'static str {
        match self {
            Self::Amd64 => "qemu-system-x86_64",
            Self::Arm64 => "qemu-system-aarch64",
        }
    }

    /// Rust's name of this CPU (`std::env::consts::ARCH`): KVM runs only a VM of the host's CPU.
    fn rust_arch(self) -> &'static str {
        match self {
            Self::Amd64 => "x86_64",
            Self::Arm64 => "aarch64",
        }
    }
}

/// How the VM's CPU runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AccelChoice {
    /// KVM when `/dev/kvm` can be opened, else TCG.
    Auto,
    /// KVM (hardware virtualization), required.
    Kvm,
    /// TCG (qemu's emulation: slower, works everywhere).
    Tcg,
}

/// The accelerator a VM runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization.
    Kvm,
    /// Emulation.
    Tcg,
}

impl Accel {
    /// qemu's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        }
    }
}

/// `walt-operator vm` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// MAC address of the VM's NIC: its Device's `spec.mac` (the boot service knows the VM by it).
    #[arg(long)]
    pub mac: String,
    /// The lab network's bridge the VM's NIC is plugged into (through a tap of its own).
    #[arg(long)]
    pub bridge: String,
    /// Memory of the VM, a Kubernetes quantity (`512Mi`, `1Gi`).
    #[arg(long, default_value = "512Mi")]
    pub memory: String,
    /// CPUs of the VM, a Kubernetes quantity (`1`, `1500m`: rounded up to whole CPUs).
    #[arg(long, default_value = "1")]
    pub cpus: String,
    /// `auto`: KVM when `/dev/kvm` can be opened and the VM's CPU is the host's, else TCG.
    #[arg(long, value_enum, default_value = "auto")]
    pub accel: AccelChoice,
    /// The VM's CPU: `amd64` (a PC, iPXE) or `arm64` (qemu's `virt` board, U-Boot).
    #[arg(long, value_enum, default_value = "amd64")]
    pub arch: VmArch,
    /// Power off when the guest reboots (qemu `-no-reboot`) instead of resetting and network-booting
    /// again like a device.
    #[arg(long)]
    pub exit_on_reboot: bool,
    /// The VM's clock at power-on (qemu's `-rtc base=`: `utc`, or a date such as
    /// `2001-01-01T00:00:00`).
    #[arg(long, default_value = "utc")]
    pub rtc_base: String,
    /// The qemu program (default: `qemu-system-x86_64` for amd64, `qemu-system-aarch64` for arm64).
    #[arg(long)]
    pub qemu: Option<String>,
    /// arm64: the U-Boot qemu loads as the board's firmware (`-bios`).
    #[arg(long, default_value = UBOOT_ARM64)]
    pub uboot: String,
}

/// Why a VM cannot be powered on.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `--mac` is not a MAC address.
    #[error("--mac {mac:?}: {reason}")]
    Mac {
        /// What was given.
        mac: String,
        /// The parser's words.
        reason: String,
    },
    /// `--memory` or `--cpus` is not a quantity walt understands.
    #[error("--{what} {given:?}: {reason}")]
    Quantity {
        /// `memory` or `cpus`.
        what: &'static str,
        /// What was given.
        given: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// KVM was required and cannot be used here.
    #[error("--accel kvm: KVM cannot run {arch} VMs here (no /dev/kvm, or another CPU): use --accel auto or tcg", arch = .0.as_str())]
    NoKvm(VmArch),
    /// A system call setting up the network failed.
    #[error("{what}: {source}")]
    Network {
        /// What was done.
        what: String,
        /// The kernel's answer.
        source: nix::Error,
    },
    /// qemu could not be started or waited for.
    #[error("running {program}: {source}")]
    Qemu {
        /// The program.
        program: String,
        /// The error.
        source: std::io::Error,
    },
}

/// The machine a VM node is (pure description; [`qemu_args`] turns it into qemu's command line).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Machine {
    /// The CPU, hence the board and its firmware.
    pub arch: VmArch,
    /// The NIC's MAC address.
    pub mac: Mac,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// CPUs.
    pub cpus: u32,
    /// How the CPU runs.
    pub accel: Accel,
    /// Power off instead of resetting on a guest reboot.
    pub exit_on_reboot: bool,
    /// qemu's `-rtc base=`.
    pub rtc_base: String,
    /// arm64: U-Boot, qemu's `-bios`.
    pub uboot: String,
}

/// The machine `args` describe (pure): `kvm_usable` says whether KVM can run a VM of `args.arch`
/// here (`/dev/kvm` opens and the host has that CPU).
pub fn machine(args: &Args, kvm_usable: bool) -> Result<Machine, VmError> {
    let mac = args.mac.parse::<Mac>().map_err(|e| VmError::Mac {
        mac: args.mac.clone(),
        reason: e.to_string(),
    })?;
    let accel = match (args.accel, kvm_usable) {
        (AccelChoice::Kvm, false) => return Err(VmError::NoKvm(args.arch)),
        (AccelChoice::Kvm | AccelChoice::Auto, true) => Accel::Kvm,
        (AccelChoice::Tcg, _) | (AccelChoice::Auto, false) => Accel::Tcg,
    };
    Ok(Machine {
        arch: args.arch,
        mac,
        memory_mib: mib_of(&args.memory)?,
        cpus: cpus_of(&args.cpus)?,
        accel,
        exit_on_reboot: args.exit_on_reboot,
        rtc_base: args.rtc_base.clone(),
        uboot: args.uboot.clone(),
    })
}

/// A Kubernetes quantity in `unit`s, rounded up and within `range` (pure): its number times the
/// factor of its suffix among `suffixes`.
fn whole_units(
    what: &'static str,
    quantity: &str,
    suffixes: &[(&str, f64)],
    unit: f64,
    range: std::ops::RangeInclusive<f64>,
    out_of_range: &'static str,
) -> Result<u64, VmError> {
    let refuse = |reason| VmError::Quantity {
        what,
        given: quantity.to_owned(),
        reason,
    };
    let trimmed = quantity.trim();
    let end = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, suffix) = trimmed.split_at(end);
    let number: f64 = number.parse().map_err(|_| refuse("not a number"))?;
    let factor = suffixes
        .iter()
        .find(|(name, _)| *name == suffix)
        .map(|(_, factor)| *factor)
        .ok_or_else(|| refuse("not a unit of that quantity"))?;
    let units = (number * factor / unit).ceil();
    if !range.contains(&units) {
        return Err(refuse(out_of_range));
    }
    Ok(units as u64)
}

const KI: f64 = 1024.0;

/// A memory quantity in MiB, rounded up (pure): `512Mi` → 512, `1Gi` → 1024, `1G` → 954, bytes.
pub fn mib_of(quantity: &str) -> Result<u64, VmError> {
    let suffixes = [
        ("", 1.0),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("Ki", KI),
        ("Mi", KI * KI),
        ("Gi", KI * KI * KI),
        ("Ti", KI * KI * KI * KI),
    ];
    whole_units(
        "memory",
        quantity,
        &suffixes,
        KI * KI,
        16.0..=KI * KI,
        "a VM has 16 MiB to 1 TiB of memory",
    )
}

/// A CPU quantity in whole CPUs, rounded up (pure): `1` → 1, `500m` → 1, `1500m` → 2.
pub fn cpus_of(quantity: &str) -> Result<u32, VmError> {
    whole_units(
        "cpus",
        quantity,
        &[("", 1.0), ("m", 1e-3)],
        1.0,
        1.0..=256.0,
        "a VM has 1 to 256 CPUs",
    )
    .map(|cpus| cpus as u32)
}

/// The tap of the VM with this MAC (pure): `wvm` and the MAC's 12 hex digits, the 15 characters an
/// interface name may have; one per VM, so two VMs on one cluster node never take each other's.
pub fn tap_name(mac: Mac) -> String {
    format!("wvm{}", mac.to_string().replace(':', ""))
}

/// How long a VM whose network boot found nothing waits before it tries again (SeaBIOS's
/// `reboot-timeout`), as a device's firmware retries: powered on before the boot service serves it
/// (its Device just bound), it would otherwise halt at "No bootable device" until the boot watchdog
/// power-cycles it (seen: 265 s to the first boot instead of 70 s on the cluster tier).
pub const BOOT_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

/// qemu's command line for `machine`, whose NIC is the open tap `tap_fd` (pure). The board comes
/// from the architecture: amd64, a q35 PC that boots from its NIC's iPXE ROM only and tries again
/// every [`BOOT_RETRY`] until it boots; arm64, qemu's `virt` board (GICv3 where it can: more than 8
/// CPUs) with U-Boot as its firmware, whose default boot ends with DHCP (U-Boot asks for about a
/// minute, then stops at its prompt, where the boot watchdog finds it) and a boot script over TFTP.
/// Both: a virtio NIC with the Device's MAC (arm64: on the board's virtio-mmio bus, as U-Boot
/// 2023.01's virtio PCI driver reads the MAC wrong, `52:52:52:52:52:52` for `52:54:00:…`); no
/// display, no monitor; the serial console on standard input and output (Ctrl-C goes to the guest,
/// not to qemu); the host's CPU under KVM (under TCG an arm64 VM is a Cortex-A57: no pointer
/// authentication to emulate); with `exit_on_reboot`, qemu exits on a guest reboot.
pub fn qemu_args(machine: &Machine, tap_fd: i32) -> Vec<String> {
    let mut args: Vec<String> = Vec::new();
    let mut push = |words: &[&str]| args.extend(words.iter().map(|w| (*w).to_owned()));
    let board = match machine.arch {
        VmArch::Amd64 => "q35",
        VmArch::Arm64 => "virt,gic-version=max",
    };
    push(&["-machine", board, "-accel", machine.accel.as_str()]);
    push(&[
        "-m",
        &machine.memory_mib.to_string(),
        "-smp",
        &machine.cpus.to_string(),
    ]);
    push(&["-display", "none", "-monitor", "none"]);
    match machine.arch {
        VmArch::Amd64 => push(&[
            "-boot",
            &format!("order=n,strict=on,reboot-timeout={}", BOOT_RETRY.as_millis()),
        ]),
        VmArch::Arm64 => push(&["-bios", &machine.uboot]),
    }
    push(&["-rtc", &format!("base={}", machine.rtc_base)]);
    push(&[
        "-chardev",
        "stdio,id=console,signal=off",
        "-serial",
        "chardev:console",
    ]);
    push(&["-netdev", &format!("tap,id=n0,fd={tap_fd}")]);
    let nic = match machine.arch {
        VmArch::Amd64 => "virtio-net-pci",
        VmArch::Arm64 => "virtio-net-device",
    };
    push(&["-device", &format!("{nic},netdev=n0,mac={}", machine.mac)]);
    match (machine.accel, machine.arch) {
        (Accel::Kvm, _) => push(&["-cpu", "host"]),
        (Accel::Tcg, VmArch::Arm64) => push(&["-cpu", "cortex-a57"]),
        (Accel::Tcg, VmArch::Amd64) => {}
    }
    if machine.exit_on_reboot {
        push(&["-no-reboot"]);
    }
    args
}

/// Whether KVM can run a VM of `arch` here: `/dev/kvm` opens and the host's CPU is `arch`.
fn kvm_usable(arch: VmArch) -> bool {
    std::env::consts::ARCH == arch.rust_arch()
        && std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok()
}

/// Opens the VM's tap, plugs it into `bridge` and sets it up.
fn plug(tap: &str, bridge: &str) -> Result<OwnedFd, VmError> {
    let network = |what: String| move |source| VmError::Network { what, source };
    let fd = super::sys::open_tap(tap).map_err(network(format!("creating the tap {tap} (/dev/net/tun)")))?;
    super::sys::add_to_bridge(bridge, tap)
        .map_err(network(format!("plugging {tap} into the bridge {bridge}")))?;
    super::sys::set_interface_up(tap).map_err(network(format!("setting {tap} up")))?;
    super::sys::clear_cloexec(fd.as_fd()).map_err(network(format!("handing {tap} to qemu")))?;
    Ok(fd)
}

/// Powers the VM on and runs it until it powers off; a SIGTERM or SIGINT (the pod deleted) is
/// passed to qemu, which powers the VM off. Returns qemu's exit code.
pub fn run(args: &Args) -> Result<i32, Box<dyn std::error::Error + Send + Sync>> {
    let machine = machine(args, kvm_usable(args.arch))?;
    let tap = tap_name(machine.mac);
    let fd = plug(&tap, &args.bridge)?;
    // The first console line says what powered on (the pod's log starts with it).
    eprintln!(
        "walt-operator vm: {} on {} (tap {tap}), {}, {} MiB, {} CPU, {}",
        machine.mac,
        args.bridge,
        machine.arch.as_str(),
        machine.memory_mib,
        machine.cpus,
        machine.accel.as_str()
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let qemu = args.qemu.as_deref().unwrap_or(machine.arch.qemu());
    let status = runtime.block_on(supervise(qemu, &qemu_args(&machine, fd.as_raw_fd())))?;
    drop(fd);
    Ok(status.code().unwrap_or(1))
}

/// Runs qemu, passing it SIGTERM and SIGINT, until it exits.
async fn supervise(program: &str, args: &[String]) -> Result<ExitStatus, VmError> {
    use tokio::signal::unix::{SignalKind, signal};
    let failed = |source| VmError::Qemu {
        program: program.to_owned(),
        source,
    };
    // Listening first: a pod deleted while qemu starts still powers it off.
    let mut terminate = signal(SignalKind::terminate()).map_err(failed)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(failed)?;
    let mut command = std::process::Command::new(program);
    command.args(args);
    super::sys::die_with_parent(&mut command);
    let mut child = tokio::process::Command::from(command).spawn().map_err(failed)?;
    loop {
        tokio::select! {
            status = child.wait() => return status.map_err(failed),
            _ = terminate.recv() => forward(&child, nix::sys::signal::Signal::SIGTERM),
            _ = interrupt.recv() => forward(&child, nix::sys::signal::Signal::SIGTERM),
        }
    }
}

fn forward(child: &tokio::process::Child, signal: nix::sys::signal::Signal) {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> Args {
        Args {
            mac: "52:54:00:12:34:56".into(),
            bridge: "br0".into(),
            memory: "512Mi".into(),
            cpus: "1".into(),
            accel: AccelChoice::Auto,
            exit_on_reboot: false,
            rtc_base: "utc".into(),
            arch: VmArch::Amd64,
            qemu: None,
            uboot: UBOOT_ARM64.into(),
        }
    }

    #[test]
    fn kvm_when_usable_else_tcg_and_kvm_required_where_there_is_none_is_refused() {
        assert_eq!(machine(&args(), true).map(|m| m.accel).ok(), Some(Accel::Kvm));
        assert_eq!(machine(&args(), false).map(|m| m.accel).ok(), Some(Accel::Tcg));
        let tcg = Args {
            accel: AccelChoice::Tcg,
            ..args()
        };
        assert_eq!(machine(&tcg, true).map(|m| m.accel).ok(), Some(Accel::Tcg));
        let kvm = Args {
            accel: AccelChoice::Kvm,
            ..args()
        };
        assert!(matches!(machine(&kvm, false), Err(VmError::NoKvm(VmArch::Amd64))));
        let arm_kvm = Args {
            arch: VmArch::Arm64,
            ..kvm
        };
        let refused = machine(&arm_kvm, false)
            .map(|_| ())
            .expect_err("no KVM for arm64 here");
        assert!(refused.to_string().contains("cannot run arm64 VMs"), "{refused}");
    }

    #[test]
    fn quantities_become_whole_mib_and_cpus() {
        assert_eq!(mib_of("512Mi").ok(), Some(512));
        assert_eq!(mib_of("1Gi").ok(), Some(1024));
        assert_eq!(mib_of("1G").ok(), Some(954));
        assert_eq!(mib_of("536870912").ok(), Some(512));
        assert!(mib_of("1Mi").is_err(), "too small to boot");
        assert!(mib_of("lots").is_err());
        assert!(mib_of("512MB").is_err());
        assert_eq!(cpus_of("1").ok(), Some(1));
        assert_eq!(cpus_of("500m").ok(), Some(1));
        assert_eq!(cpus_of("1500m").ok(), Some(2));
        assert!(cpus_of("0").is_err());
        assert!(cpus_of("2x").is_err());
    }

    #[test]
    fn a_vm_network_boots_from_its_nic_with_its_mac_and_its_console_on_stdio() {
        let machine = machine(&args(), false).expect("a machine");
        let line = qemu_args(&machine, 7).join(" ");
        assert_eq!(
            line,
            "-machine q35 -accel tcg -m 512 -smp 1 -display none -monitor none \
             -boot order=n,strict=on,reboot-timeout=5000 -rtc base=utc \
             -chardev stdio,id=console,signal=off -serial chardev:console -netdev tap,id=n0,fd=7 \
             -device virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56"
        );
        let kvm = Machine {
            accel: Accel::Kvm,
            exit_on_reboot: true,
            ..machine
        };
        let line = qemu_args(&kvm, 7).join(" ");
        assert!(
            line.contains("-accel kvm") && line.ends_with("-cpu host -no-reboot"),
            "{line}"
        );
    }

    #[test]
    fn an_arm64_vm_is_a_virt_board_whose_u_boot_network_boots_from_its_nic() {
        let arm = Args {
            arch: VmArch::Arm64,
            ..args()
        };
        let machine = machine(&arm, false).expect("a machine");
        let line = qemu_args(&machine, 7).join(" ");
        assert_eq!(
            line,
            "-machine virt,gic-version=max -accel tcg -m 512 -smp 1 -display none -monitor none \
             -bios /usr/lib/u-boot/qemu_arm64/u-boot.bin -rtc base=utc \
             -chardev stdio,id=console,signal=off -serial chardev:console -netdev tap,id=n0,fd=7 \
             -device virtio-net-device,netdev=n0,mac=52:54:00:12:34:56 -cpu cortex-a57"
        );
        assert!(!line.contains(" -boot "), "U-Boot retries DHCP itself: {line}");
        let kvm = Machine {
            accel: Accel::Kvm,
            exit_on_reboot: true,
            ..machine
        };
        assert!(
            qemu_args(&kvm, 7).join(" ").ends_with("-cpu host -no-reboot"),
            "KVM runs the host's CPU"
        );
        assert_eq!(VmArch::Arm64.qemu(), "qemu-system-aarch64");
        assert_eq!(VmArch::Amd64.qemu(), "qemu-system-x86_64");
    }

    #[test]
    fn each_vm_has_its_own_tap_within_the_kernels_name_length() {
        let mac: Mac = "52:54:00:12:34:56".parse().expect("a MAC");
        assert_eq!(tap_name(mac), "wvm525400123456");
        assert!(tap_name(mac).len() <= 15);
    }
}
