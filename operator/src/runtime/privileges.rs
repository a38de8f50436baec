//! The privileges the image's processes keep: a bounded capability set, `no_new_privs` and a
//! seccomp filter.
//!
//! Shell pods and virtual node pods are privileged (or user-namespaced) because the runtime needs
//! to mount and create namespaces; what runs *inside* — the image shell, PID 1 (the image's init,
//! systemd included), every SSH session of a virtual node, every build `RUN` step — must not be
//! root on the host. Before `execve` each of them:
//! - drops the capability **bounding set** to [`DEFAULT_CAPABILITIES`] (Docker's and
//!   containerd's default set), so no later `execve` (of a setuid or file-capability binary
//!   either) can regain another capability: no `CAP_SYS_ADMIN` (mount, pivot_root, namespaces
//!   with host reach), `CAP_SYS_MODULE` (load a kernel module), `CAP_SYS_RAWIO` (`/proc/kcore`,
//!   I/O ports), `CAP_SYS_PTRACE`, `CAP_NET_ADMIN`, `CAP_SYS_TIME`, `CAP_SYS_BOOT`…;
//! - clears the **ambient** set and sets **effective, permitted and inheritable** to that set
//!   (intersected with what the runtime itself holds: in a user-namespaced pod it may be less);
//! - sets **`no_new_privs`**, so setuid/setgid bits and file capabilities grant nothing (an image
//!   `su`/`sudo` run by a non-root user no longer elevates; root shells do not need them);
//! - installs the **seccomp filter** of [`super::seccomp`]: `keyctl`, `bpf`, `perf_event_open`,
//!   `userfaultfd`, `io_uring`, mounts, new namespaces (`unshare -U`, `clone(CLONE_NEWUSER)`),
//!   modules, kexec, the clock, swap, reboot… answer `EPERM` (`clone3` `ENOSYS`).
//!
//! `CAP_MKNOD` stays (images create device nodes in package scripts, and overlay whiteouts are
//! character devices): what keeps a created node harmless is that every filesystem the image can
//! write is mounted `nodev` (see [`super::root`]), so a block device of the host's disk made with
//! `mknod` cannot be opened.
//!
//! Init mode (the image's init as PID 1, systemd included) gets the same set: the runtime prepares
//! what systemd would otherwise mount itself with `CAP_SYS_ADMIN` (`/proc`, read-only `/sys`,
//! `/dev` with a new devpts and `/dev/shm`, tmpfs `/run` and `/tmp`, the `name=systemd` cgroup
//! on a tmpfs `/sys/fs/cgroup`), and Debian's systemd then boots its services (see
//! `operator/tests/runtime.rs`).

use serde::Serialize;

use super::sys;

/// A Linux capability, by number (`include/uapi/linux/capability.h`) and name (without `CAP_`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capability {
    /// The kernel's number.
    pub number: u8,
    /// The name without the `CAP_` prefix.
    pub name: &'static str,
}

/// Docker's and containerd's default set (moby `oci/caps/defaults.go`, containerd
/// `oci.DefaultCapabilities`): what an ordinary container's root keeps.
pub const DEFAULT_CAPABILITIES: [Capability; 14] = [
    Capability {
        number: 0,
        name: "CHOWN",
    },
    Capability {
        number: 1,
        name: "DAC_OVERRIDE",
    },
    Capability {
        number: 3,
        name: "FOWNER",
    },
    Capability {
        number: 4,
        name: "FSETID",
    },
    Capability {
        number: 5,
        name: "KILL",
    },
    Capability {
        number: 6,
        name: "SETGID",
    },
    Capability {
        number: 7,
        name: "SETUID",
    },
    Capability {
        number: 8,
        name: "SETPCAP",
    },
    Capability {
        number: 10,
        name: "NET_BIND_SERVICE",
    },
    Capability {
        number: 13,
        name: "NET_RAW",
    },
    Capability {
        number: 18,
        name: "SYS_CHROOT",
    },
    Capability {
        number: 27,
        name: "MKNOD",
    },
    Capability {
        number: 29,
        name: "AUDIT_WRITE",
    },
    Capability {
        number: 31,
        name: "SETFCAP",
    },
];

/// Every capability name the kernel knows (index = number), for reports.
const NAMES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// Errors of bounding a process's privileges.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    /// A `prctl` or `capset` call failed.
    #[error("bounding the image's privileges: {what}: {source}")]
    Sys {
        /// What was being done.
        what: String,
        /// The errno.
        source: nix::Error,
    },
    /// No seccomp filter could be built for this host.
    #[error("bounding the image's privileges: {0}")]
    Filter(#[from] super::seccomp::FilterError),
}

/// The capability sets of a process (bit `n` = capability number `n`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CapabilitySets {
    /// Effective.
    pub effective: u64,
    /// Permitted.
    pub permitted: u64,
    /// Inheritable.
    pub inheritable: u64,
}

/// The bit mask of `capabilities`.
pub fn mask(capabilities: &[Capability]) -> u64 {
    capabilities
        .iter()
        .fold(0, |mask, capability| mask | 1u64 << capability.number)
}

/// The mask the image's processes are bounded to.
pub fn default_mask() -> u64 {
    mask(&DEFAULT_CAPABILITIES)
}

/// The capability numbers to drop from the bounding set to keep only `keep` (every number the
/// 64-bit sets can hold; the kernel answers `EINVAL` past its last one).
pub fn bounding_drops(keep: u64) -> impl Iterator<Item = u8> {
    (0..64u8).filter(move |number| keep & (1u64 << number) == 0)
}

/// The sets a process holding `current` gets: each narrowed to `keep` (never widened: a runtime
/// that holds less, in a user-namespaced pod, passes on less).
pub fn narrowed(current: CapabilitySets, keep: u64) -> CapabilitySets {
    let kept = current.permitted & keep;
    CapabilitySets {
        effective: kept,
        permitted: kept,
        inheritable: kept,
    }
}

/// The names of the capabilities in `mask` (numbers the table lacks as `CAP_<n>`).
pub fn names(mask: u64) -> Vec<String> {
    (0..64u8)
        .filter(|number| mask & (1u64 << number) != 0)
        .map(|number| {
            NAMES
                .get(usize::from(number))
                .map_or_else(|| format!("{number}"), |name| (*name).to_owned())
        })
        .collect()
}

/// Bounds the calling process before it `execve`s an image program: bounding set to `keep`,
/// ambient cleared, `no_new_privs` set, the seccomp filter installed, then
/// effective/permitted/inheritable narrowed to `keep`.
/// Call it after the last step that needs more (mounts, `pivot_root`, `setns`) and before
/// switching to the image user (which needs `CAP_SETUID`/`CAP_SETGID`, kept).
///
/// The filter goes on while the process still holds more capabilities than the image's: until
/// then an image process cannot `ptrace` it (a tracee may not hold capabilities its tracer lacks),
/// so none can steer it past the filter. What the runtime does after it (`capset`, `setgroups`,
/// `setgid`, `setuid`, `chdir`, `close_range` or `fcntl`, `execve`; `sendmsg` and `_exit` when it
/// fails) is none of the calls the filter refuses.
pub fn bound_current_process(keep: u64) -> Result<(), PrivilegeError> {
    let filter = super::seccomp::program(super::seccomp::host_abis())?;
    let fail = |what: &str| {
        let what = what.to_owned();
        move |source| PrivilegeError::Sys { what, source }
    };
    for number in bounding_drops(keep) {
        match sys::drop_bounding_capability(number) {
            Ok(()) => {}
            // Past the kernel's last capability: so are all the next numbers.
            Err(nix::errno::Errno::EINVAL) => break,
            Err(error) => {
                return Err(fail(&format!("drop capability {number} from the bounding set"))(
                    error,
                ));
            }
        }
    }
    sys::clear_ambient_capabilities().map_err(fail("clear the ambient capabilities"))?;
    nix::sys::prctl::set_no_new_privs().map_err(fail("set no_new_privs"))?;
    sys::install_seccomp_filter(&filter).map_err(fail("install the seccomp filter"))?;
    let current = sys::capabilities().map_err(fail("read the capability sets"))?;
    sys::set_capabilities(narrowed(current, keep)).map_err(fail("set the capability sets"))?;
    Ok(())
}

/// What a process really runs with, as `/proc/PID/status` says: the runtime's report of the
/// bounds (the shell's result line, the virtual node's log).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Bounds {
    /// The bounding set's capability names.
    pub capabilities: Vec<String>,
    /// The bounding set as the kernel prints it (`CapBnd`, 16 hex digits).
    pub cap_bnd: String,
    /// The effective set (`CapEff`, 16 hex digits).
    pub cap_eff: String,
    /// Whether `no_new_privs` is set.
    pub no_new_privs: bool,
    /// Whether a seccomp filter is on (`Seccomp: 2`; see [`super::seccomp`] for walt's).
    pub seccomp_filter: bool,
}

impl std::fmt::Display for Bounds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "capabilities {} (CapBnd {}), no_new_privs {}, seccomp filter {}",
            self.capabilities.join(","),
            self.cap_bnd,
            if self.no_new_privs { "on" } else { "off" },
            if self.seccomp_filter {
                "on (keyctl, bpf, perf_event_open, userfaultfd, io_uring, mounts, new namespaces, \
                 modules, kexec, clock, swap, reboot refused)"
            } else {
                "off"
            }
        )
    }
}

/// Parses the `CapBnd`, `CapEff`, `NoNewPrivs` and `Seccomp` lines of a `/proc/PID/status` text
/// (no `Seccomp` line: a kernel without seccomp, no filter).
pub fn parse_status(status: &str) -> Option<Bounds> {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
    };
    let hex = |name: &str| field(name).and_then(|value| u64::from_str_radix(value, 16).ok());
    let bounding = hex("CapBnd")?;
    let effective = hex("CapEff")?;
    Some(Bounds {
        capabilities: names(bounding),
        cap_bnd: format!("{bounding:016x}"),
        cap_eff: format!("{effective:016x}"),
        no_new_privs: field("NoNewPrivs")? == "1",
        seccomp_filter: field("Seccomp") == Some("2"),
    })
}

/// The bounds of process `pid` (from `/proc/PID/status`), `None` when it is gone or unreadable.
pub fn observe(pid: nix::unistd::Pid) -> Option<Bounds> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .as_deref()
        .and_then(parse_status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_set_is_dockers_fourteen() {
        // What `grep CapBnd /proc/self/status` prints in a default Docker container.
        assert_eq!(default_mask(), 0xa804_25fb);
        assert_eq!(names(default_mask()).len(), 14);
        assert!(names(default_mask()).iter().all(|name| name != "SYS_ADMIN"));
    }

    #[test]
    fn every_other_capability_is_dropped_from_the_bounding_set() {
        let drops: Vec<u8> = bounding_drops(default_mask()).collect();
        for dangerous in [12, 16, 17, 19, 21, 22, 25, 39, 40] {
            assert!(
                drops.contains(&dangerous),
                "{} kept",
                NAMES[usize::from(dangerous)]
            );
        }
        for kept in DEFAULT_CAPABILITIES {
            assert!(!drops.contains(&kept.number), "{} dropped", kept.name);
        }
        assert_eq!(drops.len(), 64 - 14);
    }

    #[test]
    fn a_runtime_holding_less_passes_on_less_never_more() {
        let all = CapabilitySets {
            effective: u64::MAX >> 23,
            permitted: u64::MAX >> 23,
            inheritable: 0,
        };
        assert_eq!(narrowed(all, default_mask()).permitted, default_mask());
        assert_eq!(narrowed(all, default_mask()).inheritable, default_mask());
        let few = CapabilitySets {
            effective: 0b11,
            permitted: 0b11,
            inheritable: 0,
        };
        assert_eq!(
            narrowed(few, default_mask()),
            CapabilitySets {
                effective: 0b11,
                permitted: 0b11,
                inheritable: 0b11,
            }
        );
    }

    #[test]
    fn status_lines_give_the_bounds_and_missing_ones_give_none() {
        let status = "Name:\tsh\nCapInh:\t0000000000000000\nCapPrm:\t00000000a80425fb\n\
                      CapEff:\t00000000a80425fb\nCapBnd:\t00000000a80425fb\nCapAmb:\t0000000000000000\n\
                      NoNewPrivs:\t1\nSeccomp:\t2\nSeccomp_filters:\t1\n";
        let bounds = parse_status(status).unwrap();
        assert_eq!(bounds.cap_bnd, "00000000a80425fb");
        assert_eq!(bounds.cap_eff, "00000000a80425fb");
        assert!(bounds.no_new_privs);
        assert_eq!(bounds.capabilities[0], "CHOWN");
        assert!(bounds.to_string().contains("no_new_privs on"), "{bounds}");
        assert!(bounds.seccomp_filter);
        assert!(
            bounds.to_string().contains("seccomp filter on (keyctl,"),
            "{bounds}"
        );
        assert_eq!(parse_status("Name:\tsh\nCapBnd:\t000001ffffffffff\n"), None);
        let host =
            parse_status("CapEff:\t000001ffffffffff\nCapBnd:\t000001ffffffffff\nNoNewPrivs:\t0\n").unwrap();
        assert!(!host.no_new_privs);
        assert!(!host.seccomp_filter, "no Seccomp line: no filter");
        assert!(host.to_string().ends_with("seccomp filter off"), "{host}");
        assert_eq!(host.capabilities.len(), 41);
        assert_eq!(names(1 << 45), ["45"]);
    }
}
