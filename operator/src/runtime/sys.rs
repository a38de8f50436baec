//! The few system calls the runtime needs that have no safe wrapper in nix:
//! a fork-like `clone` into new namespaces, `fork`, `_exit`, and the terminal
//! ioctls. Everything else goes through nix's safe API.
#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::sched::CloneFlags;
use nix::unistd::Pid;

/// What a fork-like call returned.
pub(crate) enum Forked {
    /// In the parent, with the child's PID (as the parent sees it).
    Parent(Pid),
    /// In the child.
    Child,
}

/// Number of threads of this process, from `/proc/self/status`.
pub(crate) fn thread_count() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Threads:"))
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(1)
}

/// Creates a child process in new namespaces (`flags`), like `fork` does, with
/// `SIGCHLD` sent to the parent when it ends.
///
/// The caller must be single-threaded (checked by the callers through
/// [`thread_count`]): the child continues on a copy of the caller's stack and
/// heap, and with other threads another thread could hold a lock (the
/// allocator's) that no one would release in the child.
pub(crate) fn clone_into_namespaces(flags: CloneFlags) -> nix::Result<Forked> {
    let raw_flags = flags.bits() as libc::c_ulong | libc::SIGCHLD as libc::c_ulong;
    // SAFETY: `clone` with a null stack pointer behaves like `fork`: the child
    // gets a copy-on-write copy of the address space and continues right here,
    // on its own copy of the stack. No pointer arguments are passed (parent_tid,
    // child_tid and tls are null and unused because the flags do not ask for
    // them). The single-thread precondition above makes the copied heap state
    // consistent.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone,
            raw_flags,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_void>(),
            0 as libc::c_ulong,
        )
    };
    match ret {
        -1 => Err(Errno::last()),
        0 => Ok(Forked::Child),
        pid => Ok(Forked::Parent(Pid::from_raw(pid as libc::pid_t))),
    }
}

/// `fork()`. Used by single-threaded callers (see [`clone_into_namespaces`]).
pub(crate) fn fork() -> nix::Result<Forked> {
    // SAFETY: glibc's fork resets the allocator's locks in the child, and the
    // callers are single-threaded, so the child may allocate; it only runs the
    // runtime's own code before `execve` or `_exit`.
    match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Parent { child } => Ok(Forked::Parent(child)),
        nix::unistd::ForkResult::Child => Ok(Forked::Child),
    }
}

/// Ends a forked child at once, without running the parent's exit handlers or
/// flushing buffers that belong to the parent.
pub(crate) fn exit_child(code: i32) -> ! {
    // SAFETY: `_exit` takes no pointers and never returns; skipping atexit
    // handlers is what a forked child needs.
    unsafe { libc::_exit(code) }
}

/// Puts every signal back to its default action in a process about to run the image's programs: an
/// ignored signal survives `execve`, so a runtime started with SIGINT ignored (a background job of a
/// script, `nohup`) would otherwise hand its shell a Ctrl-C that kills nothing.
pub(crate) fn default_signal_actions() -> nix::Result<()> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    for signal in Signal::iterator().filter(|s| !matches!(s, Signal::SIGKILL | Signal::SIGSTOP)) {
        // SAFETY: installing SIG_DFL runs no code of ours in a signal context; the previous action
        // is dropped, not called.
        unsafe { sigaction(signal, &default) }?;
    }
    Ok(())
}

/// Makes `tty` the controlling terminal of the calling session leader.
pub(crate) fn set_controlling_terminal(tty: BorrowedFd<'_>) -> nix::Result<()> {
    // SAFETY: TIOCSCTTY takes an integer argument (0: do not steal the
    // terminal from another session); `tty` is an open descriptor.
    let ret = unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCSCTTY, 0) };
    Errno::result(ret).map(drop)
}

/// The window size of terminal `tty`, or `None` when it is not a terminal.
pub(crate) fn window_size(tty: BorrowedFd<'_>) -> Option<libc::winsize> {
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` into the pointed-to struct,
    // which lives on our stack for the whole call.
    let ret = unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCGWINSZ, &raw mut size) };
    (ret == 0 && size.ws_row > 0 && size.ws_col > 0).then_some(size)
}

/// Sets the window size of terminal `tty` (sends SIGWINCH to its foreground
/// process group).
pub(crate) fn set_window_size(tty: BorrowedFd<'_>, size: &libc::winsize) -> nix::Result<()> {
    // SAFETY: TIOCSWINSZ reads one `winsize` from the pointed-to struct, which
    // outlives the call.
    let ret = unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCSWINSZ, std::ptr::from_ref(size)) };
    Errno::result(ret).map(drop)
}

/// Takes ownership of a descriptor the kernel just installed for us (received
/// with `SCM_RIGHTS`).
pub(crate) fn owned_fd(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` was installed in our table by `recvmsg` and nothing else
    // owns it; the returned `OwnedFd` becomes its only owner.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Registers an owned descriptor with the Tokio runtime.
pub(crate) fn register_async_fd(fd: OwnedFd) -> std::io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: `AsyncFd::register` requires that the descriptor stays open and
    // is not replaced while registered. The `AsyncFd` takes the `OwnedFd` by
    // value, so it is its only owner: nothing else can close or `dup2` over
    // it, and it is closed only after being deregistered, when the `AsyncFd`
    // drops.
    unsafe { tokio::io::unix::AsyncFd::register(fd) }.map_err(std::io::Error::from)
}

/// Unlocks the PTY whose master is `master` and returns its number (the
/// slave is `pts/<number>` of the same devpts instance).
pub(crate) fn pty_unlock_and_number(master: BorrowedFd<'_>) -> nix::Result<u32> {
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads one int from the pointer, which outlives the call.
    let ret = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &raw const unlock) };
    Errno::result(ret)?;
    let mut number: libc::c_uint = 0;
    // SAFETY: TIOCGPTN writes one unsigned int into the pointed-to variable.
    let ret = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTN, &raw mut number) };
    Errno::result(ret)?;
    Ok(number)
}

/// Sets `lo` up in the current network namespace (best effort: a namespace
/// without loopback still works for everything but local sockets).
pub(crate) fn set_loopback_up() {
    let _ = set_interface_up("lo");
}

/// A socket to pass interface ioctls through.
fn ioctl_socket() -> nix::Result<OwnedFd> {
    nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
}

/// An `ifreq` naming interface `name` (the kernel's limit, `IFNAMSIZ` - 1 bytes, is checked by the
/// callers' names: longer ones are cut and then not found).
fn ifreq_named(name: &str) -> libc::ifreq {
    // SAFETY: `ifreq` is plain old data; all-zero is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    let capacity = request.ifr_name.len() - 1;
    for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes().take(capacity)) {
        *slot = byte as libc::c_char;
    }
    request
}

/// Sets interface `name` up in the current network namespace.
pub(crate) fn set_interface_up(name: &str) -> nix::Result<()> {
    let socket = ioctl_socket()?;
    let mut request = ifreq_named(name);
    // SAFETY: SIOCGIFFLAGS fills the flags field of the `ifreq` we own.
    Errno::result(unsafe {
        libc::ioctl(
            socket.as_raw_fd(),
            libc::SIOCGIFFLAGS as libc::Ioctl,
            &raw mut request,
        )
    })?;
    // SAFETY: reading and writing the `ifru_flags` member of the union that
    // SIOCGIFFLAGS just filled.
    unsafe {
        request.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    // SAFETY: SIOCSIFFLAGS reads the `ifreq` we own.
    Errno::result(unsafe {
        libc::ioctl(
            socket.as_raw_fd(),
            libc::SIOCSIFFLAGS as libc::Ioctl,
            &raw mut request,
        )
    })
    .map(drop)
}

/// Opens a new tap interface `name` (`/dev/net/tun`, no packet information header): not
/// persistent, it goes when the last holder of the returned descriptor closes it (qemu, when the
/// VM powers off), so a killed VM leaves no interface behind.
pub(crate) fn open_tap(name: &str) -> nix::Result<OwnedFd> {
    let tun = nix::fcntl::open(
        "/dev/net/tun",
        nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    let mut request = ifreq_named(name);
    request.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads the `ifreq` we own (name and flags) and writes back the name.
    Errno::result(unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF as libc::Ioctl, &raw mut request) })?;
    Ok(tun)
}

/// `SIOCBRADDIF` (linux/sockios.h): add an interface to a bridge (what `brctl addif` does).
const SIOCBRADDIF: libc::Ioctl = 0x89a2;

/// Adds interface `port` to bridge `bridge` (both in the current network namespace).
pub(crate) fn add_to_bridge(bridge: &str, port: &str) -> nix::Result<()> {
    let port = std::ffi::CString::new(port).map_err(|_| Errno::EINVAL)?;
    // SAFETY: `if_nametoindex` reads the NUL-terminated name we own.
    let index = unsafe { libc::if_nametoindex(port.as_ptr()) };
    if index == 0 {
        return Err(Errno::last());
    }
    let socket = ioctl_socket()?;
    let mut request = ifreq_named(bridge);
    request.ifr_ifru.ifru_ifindex = index as libc::c_int;
    // SAFETY: SIOCBRADDIF reads the bridge name and the port's index from the `ifreq` we own.
    Errno::result(unsafe { libc::ioctl(socket.as_raw_fd(), SIOCBRADDIF, &raw mut request) }).map(drop)
}

/// Makes the program `command` starts die with this process (`PR_SET_PDEATHSIG`, SIGKILL): a VM's
/// qemu never outlives the `walt-operator vm` that started it, even when that one is killed.
pub(crate) fn die_with_parent(command: &mut std::process::Command) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: the closure runs between fork and exec; it only calls prctl(2), which is
    // async-signal-safe, and touches no memory shared with other threads.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Lets `fd` be inherited by programs this process executes (qemu takes its tap this way).
pub(crate) fn clear_cloexec(fd: BorrowedFd<'_>) -> nix::Result<()> {
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty())).map(drop)
}

/// Reads extended attribute `name` of `path` (not following a final symbolic
/// link) into `buffer`; returns its size, or `None` when absent or too large.
pub(crate) fn lgetxattr(path: &std::path::Path, name: &str, buffer: &mut [u8]) -> Option<usize> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: both strings are NUL-terminated and live across the call; the
    // kernel writes at most `buffer.len()` bytes into `buffer`.
    let size = unsafe {
        libc::lgetxattr(
            path.as_ptr(),
            name.as_ptr(),
            buffer.as_mut_ptr().cast::<libc::c_void>(),
            buffer.len(),
        )
    };
    usize::try_from(size).ok()
}

/// `prctl(PR_CAPBSET_DROP, number)`: removes one capability from the calling thread's bounding
/// set (`EINVAL` past the kernel's last capability).
pub(crate) fn drop_bounding_capability(number: u8) -> nix::Result<()> {
    // SAFETY: PR_CAPBSET_DROP takes one integer argument and no pointers.
    let ret = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(number), 0, 0, 0) };
    Errno::result(ret).map(drop)
}

/// `prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)`: empties the ambient set.
pub(crate) fn clear_ambient_capabilities() -> nix::Result<()> {
    // SAFETY: PR_CAP_AMBIENT_CLEAR_ALL takes integer arguments only (the unused ones must be 0).
    let ret = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    Errno::result(ret).map(drop)
}

/// `struct __user_cap_header_struct` of `linux/capability.h`.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// `struct __user_cap_data_struct` of `linux/capability.h` (two of them: capabilities 0–31,
/// then 32–63).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit sets in two [`CapData`].
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// The calling thread's capability sets (`capget`).
pub(crate) fn capabilities() -> nix::Result<super::privileges::CapabilitySets> {
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: version 3 makes the kernel write exactly two `CapData` into `data`, which lives on
    // our stack for the whole call; the header is read (and its version possibly rewritten).
    let ret = unsafe { libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr()) };
    Errno::result(ret)?;
    let join = |low: u32, high: u32| u64::from(low) | (u64::from(high) << 32);
    Ok(super::privileges::CapabilitySets {
        effective: join(data[0].effective, data[1].effective),
        permitted: join(data[0].permitted, data[1].permitted),
        inheritable: join(data[0].inheritable, data[1].inheritable),
    })
}

/// Sets the calling thread's capability sets (`capset`).
pub(crate) fn set_capabilities(sets: super::privileges::CapabilitySets) -> nix::Result<()> {
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let split = |set: u64| (set as u32, (set >> 32) as u32);
    let (effective, permitted, inheritable) = (
        split(sets.effective),
        split(sets.permitted),
        split(sets.inheritable),
    );
    let data = [
        CapData {
            effective: effective.0,
            permitted: permitted.0,
            inheritable: inheritable.0,
        },
        CapData {
            effective: effective.1,
            permitted: permitted.1,
            inheritable: inheritable.1,
        },
    ];
    // SAFETY: version 3 makes the kernel read exactly two `CapData` from `data`, which outlives
    // the call; pid 0 is the calling thread.
    let ret = unsafe { libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) };
    Errno::result(ret).map(drop)
}

/// Marks every descriptor from `first` up close-on-exec (`close_range` with
/// `CLOSE_RANGE_CLOEXEC`, Linux 5.11; `ENOSYS` before).
pub(crate) fn cloexec_from(first: u32) -> nix::Result<()> {
    // SAFETY: close_range takes integers only; with CLOSE_RANGE_CLOEXEC it closes nothing, so no
    // descriptor owned by other code of this process becomes invalid: it only sets a flag.
    let ret = unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, libc::CLOSE_RANGE_CLOEXEC) };
    Errno::result(ret).map(drop)
}

/// Sets `FD_CLOEXEC` on descriptor `fd` (an error when it is not open).
pub(crate) fn set_cloexec(fd: RawFd) -> nix::Result<()> {
    // SAFETY: F_SETFD takes an integer argument; on a descriptor that is not open the kernel
    // answers EBADF and nothing happens.
    let ret = unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    Errno::result(ret).map(drop)
}

/// Installs the seccomp filter `program` on the calling thread (`PR_SET_SECCOMP`,
/// `SECCOMP_MODE_FILTER`): from then on, and in everything it `execve`s or forks, every system
/// call goes through it. Needs `no_new_privs` (or `CAP_SYS_ADMIN`).
pub(crate) fn install_seccomp_filter(program: &[super::seccomp::Instruction]) -> nix::Result<()> {
    let mut filter: Vec<libc::sock_filter> = program
        .iter()
        .map(|instruction| libc::sock_filter {
            code: instruction.code,
            jt: instruction.jt,
            jf: instruction.jf,
            k: instruction.k,
        })
        .collect();
    let len = u16::try_from(filter.len()).map_err(|_| Errno::E2BIG)?;
    let mut fprog = libc::sock_fprog {
        len,
        filter: filter.as_mut_ptr(),
    };
    // SAFETY: `fprog` points at `len` instructions in `filter`, which outlives the call; the kernel
    // copies the program in and keeps no pointer to our memory. The remaining arguments are unused
    // by PR_SET_SECCOMP and passed as 0.
    let ret = unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::c_ulong::from(libc::SECCOMP_MODE_FILTER),
            &raw mut fprog,
            0,
            0,
        )
    };
    Errno::result(ret).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The filter on a real kernel, in a forked child (the test process keeps none): the calls
    /// that need no capability at all are refused with the filter's answers, ordinary ones work.
    /// The exit code says which check failed.
    #[test]
    fn the_installed_filter_refuses_keyctl_user_namespaces_and_clone3_on_this_kernel() {
        let program = super::super::seccomp::program(super::super::seccomp::host_abis()).unwrap();
        let errno = |ret: libc::c_long| if ret == -1 { Errno::last() as i32 } else { 0 };
        match fork().unwrap() {
            Forked::Child => {
                let code = (|| {
                    if nix::sys::prctl::set_no_new_privs().is_err()
                        || install_seccomp_filter(&program).is_err()
                    {
                        return 10;
                    }
                    // SAFETY: keyctl(KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0) takes
                    // integers only.
                    if errno(unsafe { libc::syscall(libc::SYS_keyctl, 0, -3, 0) }) != libc::EPERM {
                        return 11;
                    }
                    // SAFETY: unshare takes an integer.
                    if errno(unsafe { libc::syscall(libc::SYS_unshare, libc::CLONE_NEWUSER) }) != libc::EPERM
                    {
                        return 12;
                    }
                    // SAFETY: clone3 with a null argument and size 0 reads nothing (the filter
                    // answers before the kernel would).
                    if errno(unsafe { libc::syscall(libc::SYS_clone3, 0, 0) }) != libc::ENOSYS {
                        return 13;
                    }
                    // SAFETY: getppid takes nothing.
                    if errno(unsafe { libc::syscall(libc::SYS_getppid) }) != 0 {
                        return 14;
                    }
                    // SAFETY: unshare of the file table only: an integer; not a namespace.
                    if errno(unsafe { libc::syscall(libc::SYS_unshare, libc::CLONE_FILES) }) != 0 {
                        return 15;
                    }
                    0
                })();
                exit_child(code);
            }
            Forked::Parent(child) => {
                let status = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(status, nix::sys::wait::WaitStatus::Exited(child, 0));
            }
        }
    }
}
