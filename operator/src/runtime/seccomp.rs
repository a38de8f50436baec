//! The system calls the image's processes may not make: a seccomp filter, in the spirit of
//! Docker's and containerd's default profile, installed with the capability bounds (see
//! [`super::privileges`]) before every `execve` of image code.
//!
//! A **deny-list**, not an allow-list: images run systemd, apt, dpkg and anything their owners
//! install, and arm64 images run under qemu-user, whose own host system calls the filter sees. So
//! every call is allowed but those of [`REFUSED`], which reach kernel state the image's root must
//! not touch (keyrings, eBPF, perf, modules, kexec, mounts, namespaces, the clock, swap, reboot…),
//! many of which the kernel already refuses for want of a capability the bounds dropped: the filter
//! is the second wall, and the only one for the calls that need no capability at all (`keyctl`,
//! `unshare(CLONE_NEWUSER)`, `userfaultfd`, `io_uring`). A refused call fails with `EPERM` (`clone3`
//! with `ENOSYS`, so that libc falls back to `clone`, whose flags the filter can read); nothing is
//! ever killed.
//!
//! Every system-call ABI a process of the host can use is covered, each with its own numbers: on
//! x86_64 hosts the 64-bit one and i386 (32-bit programs, or `int 0x80` from a 64-bit one: without
//! its own list it would be a way around the filter), while the x32 ABI is refused whole (no image
//! is x32); on aarch64 hosts the 64-bit one and 32-bit Arm (AArch32 programs run natively where
//! the CPU can).
//!
//! The program is built here, a pure function of the table (tested by running it on a small BPF
//! interpreter); [`super::sys::install_seccomp_filter`] hands it to the kernel.

/// A system call's number on each ABI the filter covers (`None`: that ABI has no such call).
/// From the kernel's tables (`arch/x86/entry/syscalls/syscall_{64,32}.tbl`,
/// `include/uapi/asm-generic/unistd.h`, `arch/arm/tools/syscall.tbl`); the native ones are checked
/// against the libc crate's in the tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Numbers {
    /// x86_64 (64-bit).
    pub x86_64: Option<u32>,
    /// i386 (32-bit x86, on x86_64 hosts).
    pub i386: Option<u32>,
    /// aarch64 (64-bit Arm).
    pub aarch64: Option<u32>,
    /// 32-bit Arm EABI (on aarch64 hosts).
    pub arm: Option<u32>,
}

/// The numbers of one call on x86_64, i386, aarch64 and Arm; a negative number for none.
const fn numbers(x86_64: i32, i386: i32, aarch64: i32, arm: i32) -> Numbers {
    const fn some(number: i32) -> Option<u32> {
        if number < 0 { None } else { Some(number as u32) }
    }
    Numbers {
        x86_64: some(x86_64),
        i386: some(i386),
        aarch64: some(aarch64),
        arm: some(arm),
    }
}

/// The numbers of a call added after Linux 5.0, the same on every ABI but the x32 one.
const fn unified(number: i32) -> Numbers {
    numbers(number, number, number, number)
}

/// What the filter does with one system call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Refused with `EPERM`, whatever its arguments.
    Refuse,
    /// Refused with `ENOSYS`, as a kernel without the call would answer (callers fall back).
    Absent,
    /// Refused with `EPERM` when the low 32 bits of argument `arg` have any bit of `mask` set.
    RefuseFlags {
        /// The argument's index (0 = first).
        arg: u8,
        /// The bits that refuse it.
        mask: u32,
    },
    /// Refused with `EPERM` unless the low 32 bits of argument `arg` are one of `allowed`.
    RefuseUnless {
        /// The argument's index (0 = first).
        arg: u8,
        /// The values let through.
        allowed: &'static [u32],
    },
}

/// One system call of the deny-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// The call's name (as in `man 2`).
    pub name: &'static str,
    /// Its numbers.
    pub numbers: Numbers,
    /// What is refused.
    pub rule: Rule,
}

const fn refuse(name: &'static str, numbers: Numbers) -> Entry {
    Entry {
        name,
        numbers,
        rule: Rule::Refuse,
    }
}

/// The namespace flags of `clone` (`CLONE_NEWNS`, `NEWCGROUP`, `NEWUTS`, `NEWIPC`, `NEWUSER`,
/// `NEWPID`, `NEWNET`). `CLONE_NEWTIME` (0x80) is not among them: in `clone`'s flags those bits
/// are the exit signal.
pub const CLONE_NAMESPACES: u32 =
    0x0002_0000 | 0x0200_0000 | 0x0400_0000 | 0x0800_0000 | 0x1000_0000 | 0x2000_0000 | 0x4000_0000;

/// The namespace flags of `unshare`: those of `clone` and `CLONE_NEWTIME`.
pub const UNSHARE_NAMESPACES: u32 = CLONE_NAMESPACES | 0x80;

/// The `personality` values let through (Docker's): `PER_LINUX`, `PER_LINUX32`, `UNAME26`,
/// `UNAME26 | PER_LINUX32`, and `0xffffffff`, which only asks for the current one.
pub const SAFE_PERSONALITIES: [u32; 5] = [0x0, 0x8, 0x2_0000, 0x2_0008, 0xffff_ffff];

/// The deny-list. Each entry says why; see the module's doc for what is not here.
///
/// Allowed on purpose, although Docker's profile refuses some of them:
/// - `ptrace`, `process_vm_readv`/`writev`, `pidfd_getfd`, `kcmp`: since Linux 4.8 the kernel runs
///   the filter again after a tracer changes a call, so tracing cannot get round it; without
///   `CAP_SYS_PTRACE` (dropped) a process may trace only processes of its user holding no
///   capability it lacks: the image's own (debuggers and `strace` in images keep working). The
///   runtime's own process that prepares an image program holds more capabilities until the
///   filter is on (see [`super::privileges::bound_current_process`]), so it cannot be traced
///   before.
/// - `name_to_handle_at`: only makes a handle, harmless without `open_by_handle_at` (refused);
///   systemd uses it to find mount points.
/// - `adjtimex`: reading the clock's state (systemd and NTP tools do) is the common use; the
///   seccomp filter cannot see the `modes` field that makes it a write, and the kernel refuses
///   writes without `CAP_SYS_TIME` (dropped).
/// - `chroot` (`CAP_SYS_CHROOT` is kept, and the root is `pivot_root`ed with the old one detached:
///   there is nothing above the image to reach), `mknod` (package scripts need it; the image's
///   writable mounts are `nodev`), `sethostname`/`setdomainname` (the image's own UTS namespace),
///   `mbind`/`set_mempolicy`/`move_pages` (the kernel checks `CAP_SYS_NICE` itself for moving
///   others' pages), `fanotify_init` (without `CAP_SYS_ADMIN` only the limited unprivileged
///   mode, like inotify), `seccomp` (a filter the image adds can only refuse more).
pub const REFUSED: &[Entry] = &[
    // Keyrings are not namespaced: the image's root would reach the host's keys of its uid (and
    // the kernel's keyring code has a long record of privilege escalations).
    refuse("keyctl", numbers(250, 288, 219, 311)),
    refuse("add_key", numbers(248, 286, 217, 309)),
    refuse("request_key", numbers(249, 287, 218, 310)),
    // eBPF programs run in the host kernel; perf events observe the host's kernel and other
    // processes. Both are classic kernel attack surface; the kernel's sysctls may allow them to
    // unprivileged callers.
    refuse("bpf", numbers(321, 357, 280, 386)),
    refuse("perf_event_open", numbers(298, 336, 241, 364)),
    // Lets a process stop the kernel in the middle of a copy from user memory: the usual way to
    // win a kernel race in an exploit. Needs no capability.
    refuse("userfaultfd", numbers(323, 374, 282, 388)),
    // Kernel code: loading a new kernel, loading and removing modules (CAP_SYS_BOOT,
    // CAP_SYS_MODULE are dropped too).
    refuse("kexec_load", numbers(246, 283, 104, 347)),
    refuse("kexec_file_load", numbers(320, -1, 294, 401)),
    refuse("init_module", numbers(175, 128, 105, 128)),
    refuse("finit_module", numbers(313, 350, 273, 379)),
    refuse("delete_module", numbers(176, 129, 106, 129)),
    // Opening a file by handle skips the path walk, hence the mount namespace: the "shocker"
    // container escape (CAP_DAC_READ_SEARCH is dropped too). Making handles stays allowed.
    refuse("open_by_handle_at", numbers(304, 342, 265, 371)),
    // Profiling interface of the host kernel (removed in Linux 6.8).
    refuse("lookup_dcookie", numbers(212, 253, 18, 249)),
    // Mounts: the runtime prepared the image's mount namespace; the image changes nothing in it
    // (CAP_SYS_ADMIN is dropped; in a user namespace of its own it could mount again).
    refuse("mount", numbers(165, 21, 40, 21)),
    refuse("umount", numbers(-1, 22, -1, -1)),
    refuse("umount2", numbers(166, 52, 39, 52)),
    refuse("pivot_root", numbers(155, 217, 41, 218)),
    refuse("open_tree", unified(428)),
    refuse("move_mount", unified(429)),
    refuse("fsopen", unified(430)),
    refuse("fsconfig", unified(431)),
    refuse("fsmount", unified(432)),
    refuse("fspick", unified(433)),
    refuse("mount_setattr", unified(442)),
    // Swap and quotas are the host's (CAP_SYS_ADMIN).
    refuse("swapon", numbers(167, 87, 224, 87)),
    refuse("swapoff", numbers(168, 115, 225, 115)),
    refuse("quotactl", numbers(179, 131, 60, 131)),
    refuse("quotactl_fd", unified(443)),
    // Rebooting the host (in the image's PID namespace the kernel only ends its init, with
    // CAP_SYS_BOOT, which is dropped; the runtime ends the image its own way).
    refuse("reboot", numbers(169, 88, 142, 88)),
    // Process accounting writes host-wide records to a file (CAP_SYS_PACCT).
    refuse("acct", numbers(163, 51, 89, 51)),
    // The clock is the host's, not namespaced (CAP_SYS_TIME is dropped too); `adjtimex` stays
    // for reads, see above.
    refuse("settimeofday", numbers(164, 79, 170, 79)),
    refuse("stime", numbers(-1, 25, -1, -1)),
    refuse("clock_settime", numbers(227, 264, 112, 262)),
    refuse("clock_settime64", numbers(-1, 404, -1, 404)),
    refuse("clock_adjtime", numbers(305, 343, 266, 372)),
    refuse("clock_adjtime64", numbers(-1, 405, -1, 405)),
    // x86 I/O ports: direct hardware access (CAP_SYS_RAWIO).
    refuse("iopl", numbers(172, 110, -1, -1)),
    refuse("ioperm", numbers(173, 101, -1, -1)),
    // Loads an a.out library: obsolete, with a record of kernel bugs.
    refuse("uselib", numbers(134, 86, -1, 86)),
    // The host kernel's log (addresses, other tenants' devices); the kernel checks CAP_SYSLOG only
    // when `dmesg_restrict` is set.
    refuse("syslog", numbers(103, 103, 116, 103)),
    // io_uring: the largest source of kernel privilege escalations of recent years (Docker and
    // containerd refuse it too); programs fall back to ordinary calls.
    refuse("io_uring_setup", unified(425)),
    refuse("io_uring_enter", unified(426)),
    refuse("io_uring_register", unified(427)),
    // Namespaces: joining one (the image has descriptors of its own only, but a user namespace
    // of its own would give it every capability there and the kernel's namespace-only code paths).
    refuse("setns", numbers(308, 346, 268, 375)),
    Entry {
        name: "unshare",
        numbers: numbers(272, 310, 97, 337),
        rule: Rule::RefuseFlags {
            arg: 0,
            mask: UNSHARE_NAMESPACES,
        },
    },
    // `clone` stays for threads and fork; not into new namespaces. Its flags are the first
    // argument on every ABI covered.
    Entry {
        name: "clone",
        numbers: numbers(56, 120, 220, 120),
        rule: Rule::RefuseFlags {
            arg: 0,
            mask: CLONE_NAMESPACES,
        },
    },
    // `clone3`'s flags are in memory, which a filter cannot read: "not implemented", so that
    // glibc (threads, `posix_spawn`) falls back to `clone`, as under Docker.
    Entry {
        name: "clone3",
        numbers: unified(435),
        rule: Rule::Absent,
    },
    // Execution domains that weaken the process's own protections (`READ_IMPLIES_EXEC`,
    // `ADDR_NO_RANDOMIZE`, `MMAP_PAGE_ZERO`…); asking, Linux and 32-bit Linux stay.
    Entry {
        name: "personality",
        numbers: numbers(135, 136, 92, 136),
        rule: Rule::RefuseUnless {
            arg: 0,
            allowed: &SAFE_PERSONALITIES,
        },
    },
];

/// A system-call ABI: how a process calls the kernel (what `seccomp_data.arch` says).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abi {
    /// x86_64 (and x32, told apart by bit 30 of the number).
    X86_64,
    /// i386.
    I386,
    /// aarch64.
    Aarch64,
    /// 32-bit Arm EABI.
    Arm,
}

/// `AUDIT_ARCH_*` of `include/uapi/linux/audit.h`.
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const AUDIT_ARCH_I386: u32 = 0x4000_0003;
const AUDIT_ARCH_AARCH64: u32 = 0xc000_00b7;
const AUDIT_ARCH_ARM: u32 = 0x4000_0028;

/// `__X32_SYSCALL_BIT`: x32 calls are numbered from here on the x86_64 ABI.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

impl Abi {
    /// Its `AUDIT_ARCH_*` value.
    pub fn audit_arch(self) -> u32 {
        match self {
            Self::X86_64 => AUDIT_ARCH_X86_64,
            Self::I386 => AUDIT_ARCH_I386,
            Self::Aarch64 => AUDIT_ARCH_AARCH64,
            Self::Arm => AUDIT_ARCH_ARM,
        }
    }

    /// The number of a call on this ABI.
    pub fn number(self, numbers: Numbers) -> Option<u32> {
        match self {
            Self::X86_64 => numbers.x86_64,
            Self::I386 => numbers.i386,
            Self::Aarch64 => numbers.aarch64,
            Self::Arm => numbers.arm,
        }
    }
}

/// The ABIs processes of this build's architecture can call the kernel with, native first.
pub fn host_abis() -> &'static [Abi] {
    if cfg!(target_arch = "x86_64") {
        &[Abi::X86_64, Abi::I386]
    } else if cfg!(target_arch = "aarch64") {
        &[Abi::Aarch64, Abi::Arm]
    } else {
        &[]
    }
}

/// One classic BPF instruction (`struct sock_filter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Instruction {
    /// Operation.
    pub code: u16,
    /// Jump offset when the test holds.
    pub jt: u8,
    /// Jump offset when it does not.
    pub jf: u8,
    /// Operand.
    pub k: u32,
}

/// Instruction codes (`linux/bpf_common.h`): load a word of `seccomp_data`, conditional jumps
/// on a constant, return a constant.
pub const LOAD_WORD: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
/// `BPF_JMP | BPF_JEQ | BPF_K`.
pub const JUMP_EQUAL: u16 = 0x15;
/// `BPF_JMP | BPF_JGE | BPF_K`.
pub const JUMP_AT_LEAST: u16 = 0x35;
/// `BPF_JMP | BPF_JSET | BPF_K` (jumps when `A & k != 0`).
pub const JUMP_ANY_BIT: u16 = 0x45;
/// `BPF_RET | BPF_K`.
pub const RETURN: u16 = 0x06;

/// `SECCOMP_RET_ALLOW`.
pub const ALLOW: u32 = 0x7fff_0000;
/// `SECCOMP_RET_ERRNO`: fail the call with the errno in the low 16 bits.
const RET_ERRNO: u32 = 0x0005_0000;
/// `SECCOMP_RET_ERRNO | EPERM` (1).
pub const EPERM: u32 = RET_ERRNO + 1;
/// `SECCOMP_RET_ERRNO | ENOSYS` (38 on every ABI covered).
pub const ENOSYS: u32 = RET_ERRNO + 38;

/// Offsets in `struct seccomp_data`: the call's number, the ABI, and the low 32 bits of an
/// argument (every ABI covered is little-endian).
pub const NR_OFFSET: u32 = 0;
/// `seccomp_data.arch`.
pub const ARCH_OFFSET: u32 = 4;
/// The low word of `seccomp_data.args[arg]`.
pub const fn arg_low_offset(arg: u8) -> u32 {
    16 + 8 * arg as u32
}

/// Why no filter could be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FilterError {
    /// The build's architecture has no table.
    #[error(
        "no seccomp filter is defined for this architecture (walt's runtime supports x86_64 and aarch64)"
    )]
    UnsupportedArchitecture,
    /// A jump does not fit in an instruction (the table grew too large for its layout).
    #[error("the seccomp filter's jump from instruction {from} to {to} is longer than 255")]
    JumpTooFar {
        /// Where it jumps from.
        from: usize,
        /// Where to.
        to: usize,
    },
}

/// Where a jump goes: the next instruction or a label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Goto {
    Next,
    To(usize),
}

/// A program being written, with labels resolved at the end.
#[derive(Default)]
struct Assembler {
    /// Instructions, with their jump targets still labels.
    steps: Vec<(u16, Goto, Goto, u32)>,
    /// Each label's instruction index, once placed.
    labels: Vec<Option<usize>>,
}

impl Assembler {
    fn label(&mut self) -> usize {
        self.labels.push(None);
        self.labels.len() - 1
    }

    fn place(&mut self, label: usize) {
        self.labels[label] = Some(self.steps.len());
    }

    fn load(&mut self, offset: u32) {
        self.steps.push((LOAD_WORD, Goto::Next, Goto::Next, offset));
    }

    fn jump(&mut self, code: u16, k: u32, then: Goto, otherwise: Goto) {
        self.steps.push((code, then, otherwise, k));
    }

    fn ret(&mut self, value: u32) {
        self.steps.push((RETURN, Goto::Next, Goto::Next, value));
    }

    fn finish(self) -> Result<Vec<Instruction>, FilterError> {
        let offset = |from: usize, goto: Goto| -> Result<u8, FilterError> {
            let to = match goto {
                Goto::Next => return Ok(0),
                // Every label used is placed by the program's construction.
                Goto::To(label) => self.labels[label].unwrap_or(usize::MAX),
            };
            to.checked_sub(from + 1)
                .and_then(|distance| u8::try_from(distance).ok())
                .ok_or(FilterError::JumpTooFar { from, to })
        };
        self.steps
            .iter()
            .enumerate()
            .map(|(index, &(code, then, otherwise, k))| {
                Ok(Instruction {
                    code,
                    jt: offset(index, then)?,
                    jf: offset(index, otherwise)?,
                    k,
                })
            })
            .collect()
    }
}

/// The filter's program for a host whose processes use `abis` (see [`host_abis`]): the ABI
/// first, then one section per ABI with its numbers of [`REFUSED`]. A call of an ABI not listed
/// (none can reach the kernel from such a host) gets `ENOSYS`.
pub fn program(abis: &[Abi]) -> Result<Vec<Instruction>, FilterError> {
    if abis.is_empty() {
        return Err(FilterError::UnsupportedArchitecture);
    }
    let mut code = Assembler::default();
    code.load(ARCH_OFFSET);
    let sections: Vec<usize> = abis.iter().map(|_| code.label()).collect();
    for (abi, section) in abis.iter().zip(&sections) {
        code.jump(JUMP_EQUAL, abi.audit_arch(), Goto::To(*section), Goto::Next);
    }
    code.ret(ENOSYS);
    for (abi, section) in abis.iter().zip(sections) {
        code.place(section);
        abi_section(&mut code, *abi);
    }
    code.finish()
}

/// The checks of one ABI: the number against each entry, argument checks after, then the three
/// answers.
fn abi_section(code: &mut Assembler, abi: Abi) {
    let (refuse, absent, allow) = (code.label(), code.label(), code.label());
    code.load(NR_OFFSET);
    if abi == Abi::X86_64 {
        // The x32 ABI shares the x86_64 one, its numbers offset: refused whole rather than listed
        // twice (no image is x32; kernels without it answer the same).
        code.jump(JUMP_AT_LEAST, X32_SYSCALL_BIT, Goto::To(absent), Goto::Next);
    }
    let mut argument_checks = Vec::new();
    for entry in REFUSED {
        let Some(number) = abi.number(entry.numbers) else {
            continue;
        };
        let target = match entry.rule {
            Rule::Refuse => refuse,
            Rule::Absent => absent,
            Rule::RefuseFlags { .. } | Rule::RefuseUnless { .. } => {
                let check = code.label();
                argument_checks.push((check, entry.rule));
                check
            }
        };
        code.jump(JUMP_EQUAL, number, Goto::To(target), Goto::Next);
    }
    code.ret(ALLOW);
    for (check, rule) in argument_checks {
        code.place(check);
        match rule {
            Rule::RefuseFlags { arg, mask } => {
                code.load(arg_low_offset(arg));
                code.jump(JUMP_ANY_BIT, mask, Goto::To(refuse), Goto::To(allow));
            }
            Rule::RefuseUnless { arg, allowed } => {
                code.load(arg_low_offset(arg));
                for value in allowed {
                    code.jump(JUMP_EQUAL, *value, Goto::To(allow), Goto::Next);
                }
                code.ret(EPERM);
            }
            Rule::Refuse | Rule::Absent => {}
        }
    }
    code.place(refuse);
    code.ret(EPERM);
    code.place(absent);
    code.ret(ENOSYS);
    code.place(allow);
    code.ret(ALLOW);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the kernel hands the filter.
    #[derive(Debug, Clone, Copy, Default)]
    struct Call {
        nr: u32,
        arch: u32,
        args: [u64; 6],
    }

    /// Runs `program` on `call` as the kernel's classic BPF would (the instructions the program
    /// uses), returning the action.
    fn run(program: &[Instruction], call: Call) -> u32 {
        let word = |offset: u32| -> u32 {
            match offset {
                NR_OFFSET => call.nr,
                ARCH_OFFSET => call.arch,
                offset if offset >= 16 && (offset - 16) % 4 == 0 => {
                    let arg = call.args[((offset - 16) / 8) as usize];
                    if (offset - 16) % 8 == 0 {
                        arg as u32
                    } else {
                        (arg >> 32) as u32
                    }
                }
                _ => panic!("load at offset {offset}"),
            }
        };
        let (mut pc, mut accumulator) = (0usize, 0u32);
        loop {
            let instruction = program[pc];
            let (taken, jumps) = match instruction.code {
                LOAD_WORD => {
                    accumulator = word(instruction.k);
                    (false, false)
                }
                JUMP_EQUAL => (accumulator == instruction.k, true),
                JUMP_AT_LEAST => (accumulator >= instruction.k, true),
                JUMP_ANY_BIT => (accumulator & instruction.k != 0, true),
                RETURN => return instruction.k,
                other => panic!("unexpected instruction {other:#x}"),
            };
            pc += 1;
            if jumps {
                pc += usize::from(if taken { instruction.jt } else { instruction.jf });
            }
        }
    }

    fn call(abi: Abi, nr: u32, arg0: u64) -> Call {
        Call {
            nr,
            arch: abi.audit_arch(),
            args: [arg0, 0, 0, 0, 0, 0],
        }
    }

    fn hosts() -> [[Abi; 2]; 2] {
        [[Abi::X86_64, Abi::I386], [Abi::Aarch64, Abi::Arm]]
    }

    #[test]
    fn every_listed_call_is_refused_on_every_abi_that_has_it_and_nothing_is_killed() {
        for abis in hosts() {
            let program = program(&abis).unwrap();
            assert!(program.len() < 4096, "BPF_MAXINSNS");
            assert!(
                program
                    .iter()
                    .filter(|i| i.code == RETURN)
                    .all(|i| [ALLOW, EPERM, ENOSYS].contains(&i.k)),
                "only allow, EPERM and ENOSYS: never a kill"
            );
            for abi in abis {
                for entry in REFUSED {
                    let Some(nr) = abi.number(entry.numbers) else {
                        continue;
                    };
                    // The worst argument for each rule.
                    let (arg0, expected) = match entry.rule {
                        Rule::Refuse => (0, EPERM),
                        Rule::Absent => (0, ENOSYS),
                        Rule::RefuseFlags { mask, .. } => (u64::from(mask), EPERM),
                        Rule::RefuseUnless { .. } => (0x0040_0000, EPERM),
                    };
                    assert_eq!(
                        run(&program, call(abi, nr, arg0)),
                        expected,
                        "{} on {abi:?}",
                        entry.name
                    );
                }
            }
        }
    }

    #[test]
    fn namespaces_are_refused_but_threads_fork_and_harmless_unshares_are_not() {
        let new_user = 0x1000_0000u64;
        let thread = 0x003d_0f00u64; // CLONE_VM|FS|FILES|SIGHAND|THREAD|SYSVSEM|SETTLS|PARENT_SETTID|CHILD_CLEARTID
        let fork = 0x0120_0011u64; // CLONE_CHILD_SETTID|CLONE_CHILD_CLEARTID|SIGCHLD, glibc's fork
        for abis in hosts() {
            let program = program(&abis).unwrap();
            for abi in abis {
                let clone = abi.number(numbers_of("clone")).unwrap();
                let unshare = abi.number(numbers_of("unshare")).unwrap();
                assert_eq!(run(&program, call(abi, clone, new_user | 0x11)), EPERM);
                assert_eq!(run(&program, call(abi, clone, 0x2000_0000)), EPERM, "NEWPID");
                assert_eq!(run(&program, call(abi, clone, thread)), ALLOW);
                assert_eq!(run(&program, call(abi, clone, fork)), ALLOW);
                // 0x80 in clone is part of the exit signal, not CLONE_NEWTIME.
                assert_eq!(run(&program, call(abi, clone, 0x80)), ALLOW);
                assert_eq!(run(&program, call(abi, unshare, new_user)), EPERM);
                assert_eq!(run(&program, call(abi, unshare, 0x80)), EPERM, "NEWTIME");
                assert_eq!(run(&program, call(abi, unshare, 0x0002_0000)), EPERM, "NEWNS");
                assert_eq!(
                    run(&program, call(abi, unshare, 0x400 | 0x200)),
                    ALLOW,
                    "CLONE_FILES|CLONE_FS"
                );
            }
        }
    }

    #[test]
    fn only_safe_personalities_pass_and_clone3_is_absent() {
        for abis in hosts() {
            let program = program(&abis).unwrap();
            for abi in abis {
                let personality = abi.number(numbers_of("personality")).unwrap();
                for safe in SAFE_PERSONALITIES {
                    assert_eq!(run(&program, call(abi, personality, u64::from(safe))), ALLOW);
                }
                // ADDR_NO_RANDOMIZE, READ_IMPLIES_EXEC, MMAP_PAGE_ZERO.
                for unsafe_flags in [0x0004_0000, 0x0040_0000, 0x0010_0000, 0x0004_0008] {
                    assert_eq!(run(&program, call(abi, personality, unsafe_flags)), EPERM);
                }
                assert_eq!(run(&program, call(abi, 435, 0)), ENOSYS, "clone3");
            }
        }
    }

    #[test]
    fn ordinary_calls_pass_and_each_abi_is_read_with_its_own_numbers() {
        let program = program(&[Abi::X86_64, Abi::I386]).unwrap();
        // read, write, openat, execve, mmap, exit_group on x86_64.
        for nr in [0, 1, 257, 59, 9, 231] {
            assert_eq!(run(&program, call(Abi::X86_64, nr, 0)), ALLOW, "x86_64 {nr}");
        }
        // x86_64's keyctl (250) is i386's fadvise64: allowed there; i386's keyctl (288) is
        // refused (a 32-bit program, or `int 0x80` from a 64-bit one).
        assert_eq!(run(&program, call(Abi::X86_64, 250, 0)), EPERM);
        assert_eq!(run(&program, call(Abi::I386, 250, 0)), ALLOW);
        assert_eq!(run(&program, call(Abi::I386, 288, 0)), EPERM);
        // x32 (bit 30) refused whole, even read.
        assert_eq!(run(&program, call(Abi::X86_64, X32_SYSCALL_BIT, 0)), ENOSYS);
        // An ABI that cannot reach this host's kernel.
        assert_eq!(run(&program, call(Abi::Aarch64, 63, 0)), ENOSYS);
        let program = super::program(&[Abi::Aarch64, Abi::Arm]).unwrap();
        // read, write, openat, execve, mmap, exit_group on aarch64.
        for nr in [63, 64, 56, 221, 222, 94] {
            assert_eq!(run(&program, call(Abi::Aarch64, nr, 0)), ALLOW, "aarch64 {nr}");
        }
        assert_eq!(run(&program, call(Abi::Aarch64, 219, 0)), EPERM, "keyctl");
        assert_eq!(
            run(&program, call(Abi::Arm, 219, 0)),
            ALLOW,
            "Arm's 219 is mincore"
        );
        assert_eq!(run(&program, call(Abi::Arm, 311, 0)), EPERM, "Arm's keyctl");
        assert_eq!(run(&program, call(Abi::X86_64, 0, 0)), ENOSYS);
    }

    #[test]
    fn an_architecture_without_a_table_gets_no_filter_and_says_so() {
        assert_eq!(program(&[]), Err(FilterError::UnsupportedArchitecture));
        assert!(!host_abis().is_empty(), "walt builds for x86_64 and aarch64");
    }

    fn numbers_of(name: &str) -> Numbers {
        REFUSED
            .iter()
            .find(|entry| entry.name == name)
            .unwrap_or_else(|| panic!("{name} is not listed"))
            .numbers
    }

    /// The native column of the table is the libc crate's (the compat ones were checked against
    /// the kernel's tables when written).
    #[test]
    fn native_numbers_are_the_libc_crates() {
        let native = host_abis()[0];
        let mut checked = 0;
        macro_rules! same {
            ($($name:ident),* $(,)?) => {$(
                let name = stringify!($name).trim_start_matches("SYS_");
                assert_eq!(
                    native.number(numbers_of(name)),
                    Some(libc::$name as u32),
                    "{name}"
                );
                checked += 1;
            )*};
        }
        same!(
            SYS_keyctl,
            SYS_add_key,
            SYS_request_key,
            SYS_bpf,
            SYS_perf_event_open,
            SYS_userfaultfd,
            SYS_kexec_load,
            SYS_init_module,
            SYS_finit_module,
            SYS_delete_module,
            SYS_open_by_handle_at,
            SYS_lookup_dcookie,
            SYS_mount,
            SYS_umount2,
            SYS_pivot_root,
            SYS_open_tree,
            SYS_move_mount,
            SYS_fsopen,
            SYS_fsconfig,
            SYS_fsmount,
            SYS_fspick,
            SYS_mount_setattr,
            SYS_swapon,
            SYS_swapoff,
            SYS_quotactl,
            SYS_quotactl_fd,
            SYS_reboot,
            SYS_acct,
            SYS_settimeofday,
            SYS_clock_settime,
            SYS_clock_adjtime,
            SYS_syslog,
            SYS_io_uring_setup,
            SYS_io_uring_enter,
            SYS_io_uring_register,
            SYS_setns,
            SYS_unshare,
            SYS_clone,
            SYS_clone3,
            SYS_personality,
        );
        #[cfg(target_arch = "x86_64")]
        {
            same!(SYS_kexec_file_load, SYS_iopl, SYS_ioperm, SYS_uselib);
        }
        assert!(checked >= 40);
        // The ones this ABI lacks are absent from its column.
        for name in ["umount", "stime", "clock_settime64", "clock_adjtime64"] {
            assert_eq!(native.number(numbers_of(name)), None, "{name}");
        }
    }
}
