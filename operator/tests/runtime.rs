//! Component tests of the image shell runtime, with real parts: the real
//! `walt-operator shell` binary driven through a PTY, real overlayfs,
//! namespaces, qemu-user through binfmt_misc, busybox and Debian root
//! filesystems. They run as root.
#![allow(clippy::unwrap_used)] // a failed step is a failed test

use std::fs;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use walt_tests::bounds::{BOUNDED_CAPS, assert_bounded};
use walt_tests::wait::{Wait, WaitError};

/// The binary under test (`WALT_OPERATOR_BIN` overrides Cargo's, e.g. to
/// test a copy while others rebuild the shared target dir).
fn bin() -> String {
    std::env::var("WALT_OPERATOR_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_walt-operator").to_string())
}

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the runtime tests need root (mounts, namespaces): run them as root (cargo xtask test does)"
    );
}

fn require_command(name: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(name).is_file()));
    assert!(
        found,
        "`{name}` is missing: apt-get install -y --no-install-recommends {package}"
    );
}

fn require_arm64_emulation() {
    let entry = fs::read_to_string("/proc/sys/fs/binfmt_misc/qemu-aarch64").unwrap_or_default();
    assert!(
        entry.starts_with("enabled") && entry.contains("flags: PF"),
        "arm64 emulation is not enabled: apt-get install qemu-user-static binfmt-support; \
         mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc; \
         update-binfmts --enable qemu-aarch64"
    );
}

fn cache_dir() -> PathBuf {
    std::env::var_os("WALT_CACHE").map_or_else(
        || PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into())).join(".cache/walt"),
        PathBuf::from,
    )
}

fn run(command: &mut Command) -> String {
    let output = command.output().unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Debian's busybox-static for `arch`, downloaded once into the cache.
fn busybox_deb(arch: &str) -> PathBuf {
    let debs = cache_dir().join("debs");
    fs::create_dir_all(&debs).unwrap();
    let find = || {
        fs::read_dir(&debs)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                name.starts_with("busybox-static_") && name.ends_with(&format!("_{arch}.deb"))
            })
    };
    if let Some(deb) = find() {
        return deb;
    }
    if arch != "amd64" {
        let foreign = run(Command::new("dpkg").arg("--print-foreign-architectures"));
        if !foreign.lines().any(|l| l == arch) {
            run(Command::new("dpkg").args(["--add-architecture", arch]));
            run(Command::new("apt-get").args(["update", "-q"]));
        }
    }
    run(Command::new("apt-get")
        .args(["download", &format!("busybox-static:{arch}")])
        .current_dir(&debs));
    find().expect("apt-get download busybox-static gave no .deb")
}

/// A busybox root filesystem for `arch` in `dir`.
fn busybox_rootfs(arch: &str, dir: &Path) {
    let deb = busybox_deb(arch);
    fs::create_dir_all(dir).unwrap();
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(dir));
    for sub in ["usr/bin", "usr/sbin", "sbin", "root", "etc", "var/lib/data"] {
        fs::create_dir_all(dir.join(sub)).unwrap();
    }
    // The applet links, listed by the host's busybox (same Debian version).
    let list = run(Command::new("busybox").arg("--list-full"));
    for applet in list.lines().filter(|l| !l.is_empty()) {
        let link = dir.join(applet);
        if fs::symlink_metadata(&link).is_err() {
            symlink("/bin/busybox", &link).unwrap();
        }
    }
    fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    fs::write(dir.join("etc/group"), "root:x:0:\ntty:x:5:\n").unwrap();
    fs::write(dir.join("etc/lower-file"), "from the lower layer\n").unwrap();
    fs::write(dir.join("var/lib/data/one"), "1\n").unwrap();
    fs::write(dir.join("var/lib/data/two"), "2\n").unwrap();
}

/// Adds WalT's init-mode scripts and a busybox inittab to a root.
fn add_busybox_init(dir: &Path) {
    fs::write(
        dir.join("bin/walt-image-shell-start"),
        "#!/bin/sh\necho $$ > /start-pid\nexec /sbin/init\n",
    )
    .unwrap();
    fs::write(
        dir.join("bin/walt-image-shell-shutdown"),
        "#!/bin/sh\necho walt-shutdown-ran > /dev/console\necho shutdown > /shutdown-ran\nexec /bin/busybox poweroff\n",
    )
    .unwrap();
    for script in ["walt-image-shell-start", "walt-image-shell-shutdown"] {
        fs::set_permissions(dir.join("bin").join(script), fs::Permissions::from_mode(0o755)).unwrap();
    }
    fs::write(
        dir.join("etc/inittab"),
        "::sysinit:/bin/echo walt-init-booted\n::shutdown:/bin/echo walt-init-stopping\n",
    )
    .unwrap();
}

/// Whether a process named `name` runs among the descendants of `ancestor` (read from `/proc`).
fn runs_below(ancestor: u32, name: &str) -> bool {
    let parent_of = |pid: u32| -> Option<u32> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // `pid (comm) state ppid …`: comm may hold spaces, so read after its closing parenthesis.
        stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
    };
    let Ok(entries) = fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|entry| {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            return false;
        };
        if !fs::read_to_string(entry.path().join("comm")).is_ok_and(|c| c.trim() == name) {
            return false;
        }
        let mut current = pid;
        for _ in 0..16 {
            match parent_of(current) {
                Some(parent) if parent == ancestor => return true,
                Some(parent) if parent > 1 => current = parent,
                _ => return false,
            }
        }
        false
    })
}

/// The caller's side of a PTY with the runtime on the other side.
struct Session {
    master: fs::File,
    slave_path: PathBuf,
    output: Arc<Mutex<Vec<u8>>>,
    /// Set by the reader thread once the terminal has nothing more to give (every writer gone).
    drained: Arc<std::sync::atomic::AtomicBool>,
    child: Child,
    seen: usize,
}

impl Session {
    fn start(args: &[&str]) -> Self {
        Self::start_with(Command::new(bin()).arg("shell").args(args))
    }

    fn start_with(command: &mut Command) -> Self {
        let pty = nix::pty::openpty(
            Some(&nix::pty::Winsize {
                ws_row: 40,
                ws_col: 100,
                ws_xpixel: 0,
                ws_ypixel: 0,
            }),
            None,
        )
        .expect("openpty");
        let slave: OwnedFd = pty.slave;
        let slave_path = nix::unistd::ttyname(&slave).expect("ttyname of the test PTY");
        let child = command
            .stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave))
            .spawn()
            .expect("start walt-operator shell");
        let master = fs::File::from(pty.master);
        let output = Arc::new(Mutex::new(Vec::new()));
        let reader = master.try_clone().unwrap();
        let mut terminal = master.try_clone().unwrap();
        let sink = Arc::clone(&output);
        let drained = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let done = Arc::clone(&drained);
        std::thread::spawn(move || {
            let mut reader = reader;
            let mut buffer = [0u8; 8192];
            let mut answered = 0;
            while let Ok(n) = reader.read(&mut buffer) {
                if n == 0 {
                    break;
                }
                let mut output = sink.lock().unwrap();
                output.extend_from_slice(&buffer[..n]);
                // Answer cursor position queries (ESC [ 6 n, which busybox's line editor sends
                // after each prompt) as a real terminal does: a shell left waiting for the answer
                // can take the next typed line for it.
                let asked = output.windows(4).filter(|w| w == b"\x1b[6n").count();
                for _ in answered..asked {
                    let _ = terminal.write_all(b"\x1b[1;1R");
                }
                answered = asked;
            }
            done.store(true, std::sync::atomic::Ordering::Release);
        });
        Self {
            master,
            slave_path,
            output,
            drained,
            child,
            seen: 0,
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap()).into_owned()
    }

    /// Waits until `pattern` appears after what earlier expects consumed.
    fn expect(&mut self, pattern: &str, timeout: Duration) -> String {
        // The reader thread may not have taken the runtime's last words from the terminal yet
        // when its exit is seen: an exit fails the wait only once they were read.
        let mut exit_seen: Option<std::time::Instant> = None;
        let found = Wait::new(&format!("{pattern:?} to be printed"), timeout)
            .every(Duration::from_millis(20))
            .until(|| {
                let text = self.text();
                if let Some(found) = text[self.seen.min(text.len())..].find(pattern) {
                    let end = self.seen + found + pattern.len();
                    let chunk = text[self.seen..end].to_string();
                    self.seen = end;
                    return Ok(Some(chunk));
                }
                match self.child.try_wait() {
                    Ok(Some(status)) => {
                        let seen = *exit_seen.get_or_insert_with(std::time::Instant::now);
                        if self.last_words_read(seen) {
                            Err(format!("the runtime exited ({status})"))
                        } else {
                            Ok(None)
                        }
                    }
                    _ => Ok(None),
                }
            });
        found.unwrap_or_else(|e| {
            if matches!(e, WaitError::Stopped { .. }) {
                // Its last words.
                std::thread::sleep(Duration::from_millis(200));
            }
            panic!("{e}; output:\n{}", self.text())
        })
    }

    /// Whether everything the exited runtime wrote has been read: the terminal was drained, or 2 s
    /// went by since the exit was seen (a process left holding the terminal keeps it open).
    fn last_words_read(&self, exit_seen: std::time::Instant) -> bool {
        self.drained.load(std::sync::atomic::Ordering::Acquire)
            || exit_seen.elapsed() > Duration::from_secs(2)
    }

    fn send(&mut self, line: &str) {
        self.master.write_all(line.as_bytes()).unwrap();
        self.master.write_all(b"\r").unwrap();
    }

    /// Runs `command` in the shell and returns its output (between markers).
    fn run(&mut self, command: &str) -> String {
        self.send(&format!("{command}; echo __DONE$((1+1))__"));
        let chunk = self.expect("__DONE2__", Duration::from_mins(1));
        // The echoed command line comes first, then the output.
        let chunk = strip_escapes(&chunk.replace('\r', ""));
        let echoed = chunk.rfind("__DONE$((1+1))__").map_or(0, |i| i);
        chunk[echoed..]
            .split_once('\n')
            .map_or(String::new(), |(_, rest)| {
                rest.replace("__DONE2__", "").trim().to_string()
            })
    }

    /// Waits for the runtime to exit; returns its exit code and the JSON
    /// result line.
    fn finish(mut self) -> (i32, serde_json::Value, String) {
        let status = Wait::new("the runtime to exit", Duration::from_mins(2))
            .every(Duration::from_millis(50))
            .until(|| self.child.try_wait().unwrap())
            .unwrap_or_else(|e| panic!("{e}; output:\n{}", self.text()));
        let exited = std::time::Instant::now();
        while !self.last_words_read(exited) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let text = self.text();
        let line = text
            .lines()
            .rev()
            .find(|l| l.trim_start().starts_with('{'))
            .unwrap_or_else(|| panic!("no JSON result line in:\n{text}"));
        let value: serde_json::Value = serde_json::from_str(line.trim()).expect("result is JSON");
        (status.code().unwrap_or(-1), value, text)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `text` without terminal escape sequences (CSI: `ESC [ … final byte`).
fn strip_escapes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Nothing of a session may stay mounted or running.
fn assert_nothing_left(marker: &str) {
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(marker), "mounts left behind:\n{mounts}");
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmdline) = fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            assert!(!cmdline.contains(marker), "process left running: {cmdline}");
        }
    }
}

#[test]
fn basic_shell_amd64_namespaces_terminal_and_exit_status() {
    require_root();
    require_command("dpkg-deb", "dpkg");
    let work = tempfile::tempdir().unwrap();
    let rootfs = work.path().join("rootfs");
    busybox_rootfs("amd64", &rootfs);
    let cache = work.path().join("cache");
    let mut session = Session::start(&[
        "--rootfs",
        rootfs.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
    ]);
    session.expect(
        "Note: this is a limited virtual environment (with just the shell process).",
        Duration::from_secs(30),
    );
    assert_eq!(session.run("hostname"), "image-shell");
    assert_eq!(
        session.run("echo $$"),
        "1",
        "the basic shell is PID 1 of its own pid namespace"
    );
    assert_eq!(
        session.run("stty size"),
        "40 100",
        "the PTY has the caller's size"
    );
    assert_eq!(
        session.run("tty"),
        "/dev/pts/0",
        "the shell's terminal comes from the container's devpts"
    );
    let devices = session.run("ls /dev");
    for device in [
        "null", "zero", "full", "random", "urandom", "tty", "ptmx", "pts", "shm",
    ] {
        assert!(
            devices.split_whitespace().any(|d| d == device),
            "/dev lacks {device}: {devices}"
        );
    }
    let mounts = session.run("cat /proc/mounts");
    assert!(
        mounts.contains("/sys sysfs ro") || mounts.contains(" /sys sysfs ro,"),
        "{mounts}"
    );
    assert!(mounts.contains(" /tmp tmpfs rw"), "{mounts}");
    assert!(mounts.contains(" /run tmpfs rw"), "{mounts}");
    assert!(session.run("cat /etc/resolv.conf | wc -l").parse::<u32>().is_ok());
    let processes = session.run("ps | wc -l").parse::<u32>().unwrap_or(99);
    assert!(processes < 6, "only the shell runs ({processes} lines of ps)");
    assert_eq!(
        session.run("echo hello > /root/hello && cat /root/hello"),
        "hello"
    );
    // Window size changes follow (what a terminal emulator does: resize, SIGWINCH).
    run(Command::new("stty")
        .arg("-F")
        .arg(&session.slave_path)
        .args(["rows", "50", "cols", "120"]));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(session.child.id() as i32),
        nix::sys::signal::Signal::SIGWINCH,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        session.run("stty size"),
        "50 120",
        "the shell's PTY follows the caller's size"
    );
    // Ctrl-C reaches the shell's foreground job, not the runtime. It becomes SIGINT only once the
    // shell has run the line (its line editor turns ISIG off and reads Ctrl-C as a byte until then,
    // on the inner PTY the runtime relays to): wait until `sleep` runs under the runtime.
    session.send("sleep 100");
    Wait::new("the shell to run `sleep 100`", Duration::from_secs(30))
        .every(Duration::from_millis(20))
        .until(|| runs_below(session.child.id(), "sleep"))
        .unwrap_or_else(|e| panic!("{e}:\n{}", session.text()));
    // Whatever the test itself was started with (a background job of a script ignores SIGINT), the
    // image's shell has default signal actions: one Ctrl-C stops the job.
    session.master.write_all(b"\x03").unwrap();
    Wait::new("Ctrl-C to stop `sleep`", Duration::from_secs(10))
        .every(Duration::from_millis(20))
        .until(|| !runs_below(session.child.id(), "sleep"))
        .unwrap_or_else(|e| panic!("{e}:\n{}", session.text()));
    assert_eq!(session.run("echo still-here"), "still-here");
    session.send("exit 7");
    let (code, result, text) = session.finish();
    assert_eq!(code, 7, "the runtime exits with the shell's status:\n{text}");
    assert_eq!(result["mode"], "basic");
    assert_eq!(result["emulated"], false);
    assert_eq!(result["architecture"], "amd64");
    assert_eq!(
        result["summary"]["added"], 1,
        "only /root/hello was added: {result}"
    );
    assert!(text.contains("Changes: 1 added, 0 modified, 0 deleted"), "{text}");
    assert_nothing_left(cache.to_str().unwrap());
}

/// Checks the words and status (`…; echo rc=$?`) of a command the seccomp filter refuses:
/// `EPERM`, status 1. `unshare -U` (a user namespace, where the image's root would hold every
/// capability) is one: without the filter it works, creating a user namespace needs no capability.
fn assert_refused(output: &str, what: &str) {
    assert!(
        output.contains("Operation not permitted") && output.ends_with("rc=1"),
        "{what} must be refused (EPERM): {output}"
    );
}

/// Checks busybox `insmod`'s words: refused for want of `CAP_SYS_MODULE` (`EPERM`, checked before
/// the module is read: without the bound the junk module would get "invalid module format"); on a
/// kernel built without module support (`/proc/modules` absent, like this development VM's) every
/// caller gets `ENOSYS` first, and the refusal is all that can be checked.
fn assert_module_refused(insmod: &str) {
    assert!(
        insmod.contains("insmod: can't insert"),
        "insmod must fail: {insmod}"
    );
    if Path::new("/proc/modules").exists() {
        assert!(
            insmod.contains("not permitted"),
            "init_module must be refused (EPERM): {insmod}"
        );
    }
}

/// The block device holding the host's `/` (major, minor), or the first the kernel lists.
fn host_block_device() -> (u64, u64) {
    use std::os::unix::fs::MetadataExt as _;
    let root = fs::metadata("/").unwrap().dev();
    let (major, minor) = (nix::sys::stat::major(root), nix::sys::stat::minor(root));
    let listed: Vec<String> = fs::read_dir("/sys/dev/block")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if listed.contains(&format!("{major}:{minor}")) {
        return (major, minor);
    }
    let first = listed.first().expect("the host has a block device");
    let (major, minor) = first.split_once(':').unwrap();
    (major.parse().unwrap(), minor.parse().unwrap())
}

#[test]
fn image_shell_root_cannot_become_root_on_the_host() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let rootfs = work.path().join("rootfs");
    busybox_rootfs("amd64", &rootfs);
    add_script(
        &rootfs,
        "bin/try-node",
        "#!/bin/sh\nmknod $1/node $2 $3 $4 && echo made\nhead -c 512 $1/node | wc -c\nrm -f $1/node\n",
    );
    let cache = work.path().join("cache");
    let (major, minor) = host_block_device();
    // The runtime is started holding a descriptor of the host's `/` (fd 7, not close-on-exec), as
    // a careless caller could: it must not reach the image, where `cd /proc/$$/fd/7` would be a
    // way out of the root.
    let mut session = Session::start_with(
        Command::new("sh")
            .args(["-c", "exec 7</ && exec \"$0\" \"$@\""])
            .arg(bin())
            .args([
                "shell",
                "--rootfs",
                rootfs.to_str().unwrap(),
                "--cache-dir",
                cache.to_str().unwrap(),
            ]),
    );
    session.expect("Note: this is a limited", Duration::from_secs(30));
    assert_eq!(session.run("id -u"), "0", "the shell is root in the image");
    assert_eq!(
        session.run("[ -e /proc/$$/fd/7 ] && ls /proc/$$/fd/7/ | head -3 || echo closed"),
        "closed",
        "the runtime's descriptor of the host's / reached the shell"
    );
    assert_bounded(&session.run("cat /proc/$$/status"), "the shell");
    assert_bounded(&session.run("cat /proc/self/status"), "a program it runs");
    // No descriptor of the runtime's (a directory of the host would be a way out): the terminal,
    // and what the shell opened itself in the image's /dev.
    let fds = session.run("for f in /proc/$$/fd/*; do readlink $f; done");
    assert!(
        fds.lines()
            .all(|target| ["/dev/pts/0", "/dev/tty"].contains(&target)),
        "the shell's descriptors: {fds:?}"
    );
    // Mount: no CAP_SYS_ADMIN.
    let mounted = session.run("mkdir -p /tmp/m && mount -t tmpfs none /tmp/m 2>&1; echo rc=$?");
    assert!(
        mounted.ends_with("rc=255") || mounted.ends_with("rc=1"),
        "mount must fail: {mounted}"
    );
    assert!(
        mounted.contains("denied") || mounted.contains("not permitted"),
        "{mounted}"
    );
    assert!(!session.run("cat /proc/mounts").contains(" /tmp/m "));
    // Device nodes: mknod works (package scripts need it), opening what it made does not,
    // wherever the image can write (the overlay root, /tmp, /run, /dev): the host's disk, and
    // /dev/full's numbers, a device anyone may read, so that only `nodev` can be what stops it.
    for dir in ["/root", "/tmp", "/run", "/dev"] {
        for (kind, major, minor) in [("b", major, minor), ("c", 1, 7)] {
            let read = session.run(&format!("/bin/try-node {dir} {kind} {major} {minor}"));
            assert!(read.starts_with("made"), "mknod in {dir}: {read}");
            assert!(
                read.contains("Permission denied"),
                "the node {kind} {major}:{minor} made in {dir} opened: {read}"
            );
            assert!(
                read.ends_with('0'),
                "nothing read through the node in {dir}: {read}"
            );
        }
    }
    assert_eq!(
        session.run("head -c 512 /dev/full | wc -c"),
        "512",
        "the runtime's own /dev/full works"
    );
    // /dev is the runtime's own set: the harmless host devices, the console (the shell's own
    // PTY), its devpts; no disk, no kmsg, no mem.
    assert_eq!(
        session.run("echo $(ls -A /dev)"),
        "console core fd full null ptmx pts random shm stderr stdin stdout tty urandom zero",
        "/dev holds only the runtime's devices"
    );
    assert!(
        session
            .run("echo $(ls /dev/pts)")
            .split_whitespace()
            .all(|n| n == "ptmx" || n.parse::<u32>().is_ok())
    );
    // Kernel memory and modules: no CAP_SYS_RAWIO, no CAP_SYS_MODULE.
    // The host kernel's knobs in /proc (sysctls such as core_pattern or modprobe, which name a
    // program the host runs as root) are read-only: /proc/sys checks uid 0, not capabilities. The
    // write puts back the value read, so that nothing would change even if it went through.
    let sysctl = session.run(
        "cat /proc/sys/kernel/printk_ratelimit > /tmp/v; (cat /tmp/v > /proc/sys/kernel/printk_ratelimit) 2>&1",
    );
    assert!(sysctl.contains("Read-only file system"), "{sysctl}");
    // Host-wide state in /proc is masked (timers of every process on the host, kernel memory).
    assert_eq!(session.run("wc -c < /proc/timer_list"), "0");
    // Modules: no CAP_SYS_MODULE.
    assert_module_refused(&session.run("echo junk > /tmp/x.ko; insmod /tmp/x.ko 2>&1"));
    // A user namespace (every capability inside it, and the kernel's namespace-only code): the
    // seccomp filter.
    assert_refused(&session.run("unshare -U true 2>&1; echo rc=$?"), "unshare -U");
    session.send("exit");
    let (code, result, text) = session.finish();
    assert_eq!(code, 0, "{text}");
    // The runtime's report says it too.
    assert_eq!(result["privileges"]["capBnd"], BOUNDED_CAPS, "{result}");
    assert_eq!(result["privileges"]["noNewPrivs"], true, "{result}");
    assert_eq!(result["privileges"]["seccompFilter"], true, "{result}");
    assert_eq!(
        result["privileges"]["capabilities"].as_array().map(Vec::len),
        Some(14)
    );
    assert_eq!(result["summary"]["added"], 0, "{result}");
    assert_nothing_left(cache.to_str().unwrap());
}

/// Writes an executable script at `relative` under `root`.
fn add_script(root: &Path, relative: &str, text: &str) {
    let path = root.join(relative);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(&path, text).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
}

/// The classic chroot escape (perl, as Debian's minbase has it): chroot into a subdirectory while
/// the working directory stays outside it, climb with `..` past the new root, chroot there. Says
/// whether it left the jail (the image's `/etc` is seen again) and whether the host file `$1` is
/// seen.
const ESCAPE_SCRIPT: &str = r#"#!/usr/bin/perl
mkdir "/jail";
chroot "/jail" or die "chroot /jail: $!";
chdir ".." for 1 .. 64;
chroot "." or die "chroot .: $!";
print -e "/etc/debian_version" ? "left-the-jail " : "in-the-jail ";
print -e $ARGV[0] ? "host-visible\n" : "host-hidden\n";
rmdir "/jail";
"#;

/// A basic shell (no network) in the Debian image with `script` at `path` in a layer on top, its cache in
/// `work/cache`, at its prompt, its bounds checked.
fn debian_shell_with_script(work: &Path, path: &str, script: &str) -> Session {
    let debian = debian_systemd_rootfs("amd64");
    let tools = work.join("tools");
    add_script(&tools, path, script);
    let cache = work.join("cache");
    let mut session = Session::start(&[
        "--rootfs",
        tools.to_str().unwrap(),
        "--rootfs",
        debian.to_str().unwrap(),
        "--mode",
        "basic",
        "--network",
        "none",
        "--cache-dir",
        cache.to_str().unwrap(),
    ]);
    session.expect("Note: this is a limited", Duration::from_mins(1));
    session.expect("# ", Duration::from_mins(1));
    assert_bounded(&session.run("cat /proc/$$/status"), "the Debian shell");
    session
}

#[test]
fn a_chroot_escape_from_an_image_shell_stays_in_the_image() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    // A file outside the image root, on the host (the pod's root in a cluster).
    let marker = work.path().join("outside-the-image");
    fs::write(&marker, "host\n").unwrap();
    let cache = work.path().join("cache");
    let mut session = debian_shell_with_script(work.path(), "usr/local/bin/escape", ESCAPE_SCRIPT);
    // The classic escape works (CAP_SYS_CHROOT is kept: it leaves the jail, back at the top of
    // the image) and finds no way above the image root: pivot_root and the old root detached,
    // nothing of the host left in the mount namespace.
    assert_eq!(
        session.run(&format!("/usr/local/bin/escape {}", marker.display())),
        "left-the-jail host-hidden"
    );
    session.send("exit");
    let (code, result, text) = session.finish();
    assert_eq!(code, 0, "{text}");
    assert_eq!(result["privileges"]["capBnd"], BOUNDED_CAPS, "{result}");
    assert_nothing_left(cache.to_str().unwrap());
}

/// Makes each system call given as `name=number` with harmless arguments (a null pointer where one
/// is read: the kernel would answer `EFAULT`, the filter answers first) and prints `name: ok` or
/// `name: <the error's words>`. Perl as Debian's minbase has it.
const SYSCALL_SCRIPT: &str = r#"#!/usr/bin/perl
my %args = (
    keyctl => [0, -3, 0],                # KEYCTL_GET_KEYRING_ID of the session keyring
    add_key => ["user", "walt", "x", 1, -3],
    bpf => [0, 0, 0],                    # BPF_MAP_CREATE
    perf_event_open => [0, 0, -1, -1, 0],
    userfaultfd => [1],                  # UFFD_USER_MODE_ONLY: allowed unprivileged by the kernel
    io_uring_setup => [1, 0],
    unshare => [0x10000000],             # CLONE_NEWUSER
    setns => [-1, 0],
    clone3 => [0, 0],
    personality => [0x0040000],          # ADDR_NO_RANDOMIZE
    kexec_load => [0, 0, 0, 0],
    open_by_handle_at => [-1, 0, 0],
);
for (@ARGV) {
    my ($name, $number) = split /=/;
    my $ret = syscall($number, @{$args{$name}});
    print "$name: ", ($ret == -1 ? "$!" : "ok"), "\n";
}
"#;

/// The x86_64 numbers of the calls [`SYSCALL_SCRIPT`] makes (the kernel's `syscall_64.tbl`).
const X86_64_CALLS: [(&str, u32); 12] = [
    ("keyctl", 250),
    ("add_key", 248),
    ("bpf", 321),
    ("perf_event_open", 298),
    ("userfaultfd", 323),
    ("io_uring_setup", 425),
    ("unshare", 272),
    ("setns", 308),
    ("clone3", 435),
    ("personality", 135),
    ("kexec_load", 246),
    ("open_by_handle_at", 304),
];

/// A Debian image's root meets walt's seccomp filter: keyrings, eBPF, perf events, userfaultfd,
/// io_uring, namespaces, kexec, handles and unsafe personalities are refused with `EPERM`
/// (`clone3` with `ENOSYS`), most of which the kernel would grant it or answer otherwise (`EFAULT`
/// for the null pointers) without the filter; and ordinary work goes on: dpkg builds and installs
/// a package (fork/exec of its helpers, threads of its xz compressor), files are copied, owned and
/// removed, devices made, sort runs threads.
#[test]
fn image_shell_root_meets_the_seccomp_filter_and_ordinary_work_goes_on() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let mut session = debian_shell_with_script(work.path(), "usr/local/bin/syscalls", SYSCALL_SCRIPT);
    let calls: Vec<String> = X86_64_CALLS
        .iter()
        .map(|(name, number)| format!("{name}={number}"))
        .collect();
    let answers = session.run(&format!("/usr/local/bin/syscalls {}", calls.join(" ")));
    let expected: Vec<String> = X86_64_CALLS
        .iter()
        .map(|(name, _)| {
            let words = if *name == "clone3" {
                "Function not implemented"
            } else {
                "Operation not permitted"
            };
            format!("{name}: {words}")
        })
        .collect();
    assert_eq!(answers, expected.join("\n"), "each call's answer");
    // util-linux: a user namespace, and the namespaces it would open the way to.
    assert_refused(&session.run("unshare -U true 2>&1; echo rc=$?"), "unshare -U");
    assert_refused(
        &session.run("unshare -U -r -m -p -f true 2>&1; echo rc=$?"),
        "unshare -Urmpf",
    );
    // ASLR off (ADDR_NO_RANDOMIZE): an unsafe personality.
    assert_refused(&session.run("setarch -R true 2>&1; echo rc=$?"), "setarch -R");
    // Ordinary work: a package built and installed by dpkg (dpkg-deb compresses with xz threads,
    // dpkg forks its maintainer scripts), files copied, owned, removed, a device made.
    let dpkg = session.run(
        "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
         && mkdir -p /tmp/p/DEBIAN /tmp/p/usr/share/walt-probe && echo probe > /tmp/p/usr/share/walt-probe/file \
         && printf 'Package: walt-probe\\nVersion: 1\\nArchitecture: all\\nMaintainer: walt <walt@example.org>\\nDescription: probe\\n' > /tmp/p/DEBIAN/control \
         && printf '#!/bin/sh\\necho postinst-ran > /tmp/postinst\\n' > /tmp/p/DEBIAN/postinst && chmod 755 /tmp/p/DEBIAN/postinst \
         && dpkg-deb -Zxz -b /tmp/p /tmp/probe.deb >/dev/null && dpkg -i /tmp/probe.deb >/dev/null \
         && dpkg-query -W -f '${Status}\\n' walt-probe && cat /tmp/postinst /usr/share/walt-probe/file \
         && dpkg -r walt-probe >/dev/null && echo removed",
    );
    assert_eq!(
        dpkg, "install ok installed\npostinst-ran\nprobe\nremoved",
        "{dpkg}"
    );
    assert_eq!(
        session.run(
            "cp -a /usr/share/doc /tmp/doc && chown -R 1000:1000 /tmp/doc && chmod -R g+w /tmp/doc \
             && mknod /tmp/null c 1 3 && rm -rf /tmp/doc /tmp/null && echo files-ok"
        ),
        "files-ok"
    );
    // Threads: coreutils' sort sorts in threads past 128k lines (glibc tries clone3 first, refused
    // with ENOSYS, and falls back to clone).
    assert_eq!(
        session.run("seq 300000 | sort -n -r --parallel=4 -S 64M | head -1"),
        "300000"
    );
    session.send("exit");
    let (code, result, text) = session.finish();
    assert_eq!(code, 0, "{text}");
    assert_eq!(result["privileges"]["seccompFilter"], true, "{result}");
    assert_nothing_left(cache.to_str().unwrap());
}

#[test]
fn arm64_image_runs_emulated_with_cpuinfo() {
    require_root();
    require_arm64_emulation();
    let work = tempfile::tempdir().unwrap();
    let rootfs = work.path().join("rootfs");
    busybox_rootfs("arm64", &rootfs);
    fs::write(
        rootfs.join("etc/cpuinfo"),
        "processor\t: 0\nmodel name\t: walt-test-cpu\n",
    )
    .unwrap();
    let cache = work.path().join("cache");
    let mut session = Session::start(&[
        "--rootfs",
        rootfs.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
    ]);
    session.expect("Note: this is a limited", Duration::from_secs(30));
    assert_eq!(session.run("uname -m"), "aarch64");
    assert!(session.run("cat /proc/cpuinfo").contains("walt-test-cpu"));
    assert_bounded(&session.run("cat /proc/$$/status"), "the emulated shell");
    assert_module_refused(&session.run("echo junk > /tmp/x.ko; insmod /tmp/x.ko 2>&1"));
    // qemu-user passes unshare to the host kernel, where the filter refuses it. qemu itself runs
    // under the filter and works: its threads (created with clone3, refused, then clone) included.
    assert_refused(&session.run("unshare -U true 2>&1; echo rc=$?"), "unshare -U");
    session.send("exit");
    let (code, result, _) = session.finish();
    assert_eq!(code, 0);
    assert_eq!(result["emulated"], true);
    assert_eq!(result["architecture"], "arm64");
    assert_eq!(
        result["summary"]["added"], 0,
        "cpuinfo binding and mount points are not changes: {result}"
    );
    assert_nothing_left(cache.to_str().unwrap());
}

#[test]
fn init_mode_runs_start_script_as_pid1_and_shutdown_at_exit() {
    require_root();
    require_arm64_emulation();
    let work = tempfile::tempdir().unwrap();
    let rootfs = work.path().join("rootfs");
    busybox_rootfs("arm64", &rootfs);
    add_busybox_init(&rootfs);
    let cache = work.path().join("cache");
    let console = work.path().join("console.log");
    let mut session = Session::start(&[
        "--rootfs",
        rootfs.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
        "--console-log",
        console.to_str().unwrap(),
    ]);
    session.expect(
        "Note: the OS was started in a virtual environment.",
        Duration::from_secs(30),
    );
    assert_eq!(
        // The shell may be up before the (emulated) start script wrote its marker.
        session.run("until [ -e /start-pid ]; do sleep 0.1; done; cat /start-pid"),
        "1",
        "the start script ran as PID 1"
    );
    // (Under emulation the command line starts with qemu's binfmt interpreter.)
    let init = session.run("cat /proc/1/cmdline | tr '\\0' ' '");
    assert!(init.trim().ends_with("/sbin/init"), "PID 1 exec'd init: {init}");
    assert_bounded(&session.run("cat /proc/1/status"), "init (PID 1)");
    assert_bounded(&session.run("cat /proc/$$/status"), "the shell in init mode");
    assert_eq!(session.run("echo $container"), "walt");
    assert_eq!(session.run("uname -m"), "aarch64");
    session.send("exit");
    let (code, result, text) = session.finish();
    assert_eq!(code, 0, "{text}");
    assert_eq!(result["mode"], "init");
    let log = fs::read_to_string(&console).unwrap();
    assert!(log.contains("walt-init-booted"), "init booted: {log}");
    assert!(
        log.contains("walt-shutdown-ran"),
        "the shutdown script ran: {log}"
    );
    assert!(
        log.contains("walt-init-stopping"),
        "init ran its shutdown actions: {log}"
    );
    // The start and shutdown markers are the only changes.
    assert_eq!(result["summary"]["added"], 2, "{result}");
    assert_nothing_left(cache.to_str().unwrap());
}

#[test]
fn change_summary_counts_lower_layer_directory_deleted_and_recreated() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let base = work.path().join("base");
    busybox_rootfs("amd64", &base);
    let top = work.path().join("top");
    fs::create_dir_all(top.join("etc")).unwrap();
    fs::write(top.join("etc/top-file"), "top\n").unwrap();
    let cache = work.path().join("cache");
    let mut session = Session::start(&[
        "--rootfs",
        top.to_str().unwrap(),
        "--rootfs",
        base.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
    ]);
    session.expect("Note: this is a limited", Duration::from_secs(30));
    assert_eq!(
        session.run("cat /etc/top-file /etc/lower-file"),
        "top\nfrom the lower layer"
    );
    session.run("echo new > /etc/new-file");
    session.run("echo changed >> /etc/lower-file");
    session.run("rm /etc/top-file");
    session.run("rm -r /var/lib/data && mkdir /var/lib/data && echo 3 > /var/lib/data/three");
    assert_eq!(session.run("ls /var/lib/data"), "three");
    session.send("exit");
    let (code, result, text) = session.finish();
    assert_eq!(code, 0, "{text}");
    let summary = &result["summary"];
    assert_eq!(summary["added"], 2, "new-file and data/three: {summary}");
    assert_eq!(
        summary["modified"], 2,
        "lower-file and the recreated data dir: {summary}"
    );
    assert_eq!(summary["deleted"], 1, "top-file: {summary}");
}

#[test]
fn refusals_say_what_is_wrong() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    // No shell.
    let empty = work.path().join("empty");
    fs::create_dir_all(empty.join("etc")).unwrap();
    let output = Command::new(bin())
        .args(["shell", "--rootfs", empty.to_str().unwrap(), "--arch", "amd64"])
        .arg("--cache-dir")
        .arg(&cache)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("the image has no shell"), "{stderr}");
    // 128 layers.
    let mut command = Command::new(bin());
    command.arg("shell").arg("--cache-dir").arg(&cache);
    for index in 0..128 {
        let layer = work.path().join(format!("layer{index}"));
        fs::create_dir_all(&layer).unwrap();
        command.arg("--rootfs").arg(layer);
    }
    let output = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("128 layers") && stderr.contains("Squash"),
        "{stderr}"
    );
    // A missing capability.
    require_command("setpriv", "util-linux");
    let rootfs = work.path().join("rootfs");
    busybox_rootfs("amd64", &rootfs);
    let output = Command::new("setpriv")
        .args(["--bounding-set", "-sys_admin", "--inh-caps", "-sys_admin", "--"])
        .arg(bin())
        .args(["shell", "--rootfs", rootfs.to_str().unwrap()])
        .arg("--cache-dir")
        .arg(&cache)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("missing capability CAP_SYS_ADMIN"), "{stderr}");
    // Init mode without the scripts.
    let output = Command::new(bin())
        .args(["shell", "--mode", "init", "--rootfs", rootfs.to_str().unwrap()])
        .arg("--cache-dir")
        .arg(&cache)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("init mode needs executable /bin/walt-image-shell-start"),
        "{stderr}"
    );
}

/// Issue 17, a shell pod evicted: `--keep-changes-as ID` keeps the changes when the runtime is
/// stopped (SIGTERM, what the kubelet sends a pod being deleted), promptly even though a basic shell
/// (its PID namespace's init) ignores the hang-up; the result line says `kept` and nothing is
/// committed; the next run with the same ID continues on the changes, deletions included.
#[test]
fn a_stopped_runtime_keeps_the_changes_for_the_next_one() {
    require_root();
    require_command("dpkg-deb", "dpkg");
    let work = tempfile::tempdir().unwrap();
    let rootfs = work.path().join("rootfs");
    busybox_rootfs("amd64", &rootfs);
    let cache = work.path().join("cache");
    let args = [
        "--rootfs",
        rootfs.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
        "--keep-changes-as",
        "0a1b2c3d-session",
    ];
    let mut session = Session::start(&args);
    session.expect("Note: this is a limited", Duration::from_secs(30));
    session.run("echo kept > /root/kept; rm /etc/passwd");
    let stopped = std::time::Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(session.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    session.expect("the changes stay on this cluster node", Duration::from_secs(10));
    let status = session.child.wait().expect("the runtime ends");
    assert!(
        stopped.elapsed() < Duration::from_secs(10),
        "a stop must not wait for a shell that ignores the hang-up ({:?})",
        stopped.elapsed()
    );
    assert_ne!(status.code(), Some(0), "{status}");
    assert!(session.text().contains("\"kept\":true"), "{}", session.text());
    assert!(
        cache
            .join("sessions/kept-0a1b2c3d-session/upper/root/kept")
            .exists(),
        "the upper dir stays in the cache"
    );

    let mut again = Session::start(&args);
    again.expect("continuing on the changes", Duration::from_secs(30));
    again.expect("Note: this is a limited", Duration::from_secs(30));
    assert_eq!(again.run("cat /root/kept"), "kept");
    assert_eq!(again.run("test -e /etc/passwd || echo gone"), "gone");
    again.send("exit");
    let status = again.child.wait().expect("the runtime ends");
    assert!(status.success(), "{status}\n{}", again.text());
    assert!(!again.text().contains("\"kept\":true"), "an exit is not a stop");
    assert!(
        !cache.join("sessions/kept-0a1b2c3d-session").exists(),
        "a session the user ended leaves no directory behind"
    );
}

#[test]
fn killed_runtime_leaves_nothing_behind() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let rootfs = work.path().join("rootfs");
    busybox_rootfs("amd64", &rootfs);
    add_busybox_init(&rootfs);
    let cache = work.path().join("cache");
    let mut session = Session::start(&[
        "--rootfs",
        rootfs.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
    ]);
    session.expect("Note: the OS was started", Duration::from_secs(30));
    session.send("sleep 1000 &");
    session.run("true");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(session.child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let _ = session.child.wait();
    Wait::new(
        "nothing to be left after the runtime was killed",
        Duration::from_secs(10),
    )
    .every(Duration::from_millis(100))
    .until(|| std::panic::catch_unwind(|| assert_nothing_left(cache.to_str().unwrap())).is_ok())
    .unwrap();
}

/// A runtime killed in a pod (PID 1 of its PID namespace, as every runtime there) leaves its session
/// directory on the cluster node's cache: the next runtime removes it, since its lock is free, though
/// PID 1 runs.
#[test]
fn a_runtime_killed_as_pid_1_leaves_a_directory_the_next_one_removes() {
    require_root();
    require_command("unshare", "util-linux");
    let work = tempfile::tempdir().unwrap();
    let rootfs = work.path().join("rootfs");
    busybox_rootfs("amd64", &rootfs);
    let cache = work.path().join("cache");
    let sessions = cache.join("sessions");
    let mut killed = Session::start_with(
        Command::new("unshare")
            .args(["--pid", "--fork", "--kill-child", "--"])
            .arg(bin())
            .args(["shell", "--rootfs", rootfs.to_str().unwrap()])
            .args(["--cache-dir", cache.to_str().unwrap()]),
    );
    killed.expect("Note: this is a limited", Duration::from_secs(30));
    killed.run("echo changed > /root/changed");
    // unshare's child gets SIGKILL when unshare dies (--kill-child): nothing runs its cleanup.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(killed.child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let _ = killed.child.wait();
    let left_by_pid_1 = || -> Vec<String> {
        fs::read_dir(&sessions)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|entry| entry.file_name().to_string_lossy().into_owned())
                    .filter(|name| name.starts_with("1-"))
                    .collect()
            })
            .unwrap_or_default()
    };
    Wait::new("the killed runtime to be gone", Duration::from_secs(10))
        .every(Duration::from_millis(100))
        .until(|| std::panic::catch_unwind(|| assert_nothing_left(rootfs.to_str().unwrap())).is_ok())
        .unwrap();
    let left = left_by_pid_1();
    assert_eq!(left.len(), 2, "its directory and lock file stay: {left:?}");

    let mut next = Session::start(&[
        "--rootfs",
        rootfs.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
    ]);
    next.expect("Note: this is a limited", Duration::from_secs(30));
    assert_eq!(
        left_by_pid_1(),
        Vec::<String>::new(),
        "the next runtime removed them"
    );
    next.send("exit");
    let (code, _, text) = next.finish();
    assert_eq!(code, 0, "{text}");
    let rest: Vec<_> = fs::read_dir(&sessions)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        rest.is_empty(),
        "a runtime that ends leaves nothing in the cache's sessions: {rest:?}"
    );
}

#[test]
fn runs_inside_a_user_namespace_with_userxattr() {
    require_root();
    require_command("unshare", "util-linux");
    let work = tempfile::tempdir().unwrap();
    let base = work.path().join("base");
    busybox_rootfs("amd64", &base);
    let cache = work.path().join("cache");
    let mut session = Session::start_with(
        Command::new("unshare")
            .args(["--user", "--map-root-user", "--"])
            .arg(bin())
            .args([
                "shell",
                "--rootfs",
                base.to_str().unwrap(),
                "--cache-dir",
                cache.to_str().unwrap(),
            ]),
    );
    session.expect("Note: this is a limited", Duration::from_secs(30));
    assert_eq!(session.run("hostname"), "image-shell");
    // Bounded there too (the runtime holds every capability of its user namespace).
    assert_bounded(
        &session.run("cat /proc/$$/status"),
        "the shell in a user namespace",
    );
    // /sys is the caller's, bound (sysfs cannot be mounted from a user namespace that does not own
    // the network namespace): read-only, the caller's mounts below it (cgroups) included.
    let writable = session.run("grep ' /sys' /proc/mounts | grep -v ' ro,'; true");
    assert_eq!(writable, "", "writable mounts under /sys");
    assert!(
        session
            .run("grep -c ' /sys/' /proc/mounts")
            .parse::<u32>()
            .unwrap()
            > 0
    );
    session.run("rm -r /var/lib/data && mkdir /var/lib/data && echo 3 > /var/lib/data/three");
    assert_eq!(
        session.run("ls /var/lib/data"),
        "three",
        "deleting a lower directory works (userxattr)"
    );
    session.send("exit");
    let (code, result, text) = session.finish();
    assert_eq!(code, 0, "{text}");
    assert_eq!(
        result["summary"]["modified"], 1,
        "the recreated directory is opaque: {result}"
    );
}

/// The Debian bookworm systemd root of `arch` (built once with debootstrap, cached: see
/// `walt_tests::images::debian_systemd_rootfs`).
fn debian_systemd_rootfs(arch: &str) -> PathBuf {
    let arch = match arch {
        "arm64" => walt_tests::images::Arch::Arm64,
        _ => walt_tests::images::Arch::Amd64,
    };
    walt_tests::images::debian_systemd_rootfs(arch).unwrap_or_else(|e| panic!("{e}"))
}

/// A top layer with WalT's init-mode scripts for a systemd image.
fn walt_systemd_scripts(dir: &Path) {
    // /bin is a link to usr/bin in the image: put the scripts behind it.
    fs::create_dir_all(dir.join("usr/bin")).unwrap();
    fs::write(
        dir.join("usr/bin/walt-image-shell-start"),
        "#!/bin/sh\nexec /sbin/init\n",
    )
    .unwrap();
    fs::write(
        dir.join("usr/bin/walt-image-shell-shutdown"),
        "#!/bin/sh\nexec systemctl poweroff\n",
    )
    .unwrap();
    for script in ["walt-image-shell-start", "walt-image-shell-shutdown"] {
        fs::set_permissions(
            dir.join("usr/bin").join(script),
            fs::Permissions::from_mode(0o755),
        )
        .unwrap();
    }
}

fn systemd_image_boots_services(arch: &str) {
    require_root();
    if arch != "amd64" {
        require_arm64_emulation();
    }
    let debian = debian_systemd_rootfs(arch);
    let work = tempfile::tempdir().unwrap();
    let scripts = work.path().join("scripts");
    walt_systemd_scripts(&scripts);
    let cache = work.path().join("cache");
    let console = work.path().join("console.log");
    let mut session = Session::start(&[
        "--rootfs",
        scripts.to_str().unwrap(),
        "--rootfs",
        debian.to_str().unwrap(),
        "--network",
        "none",
        "--cache-dir",
        cache.to_str().unwrap(),
        "--console-log",
        console.to_str().unwrap(),
    ]);
    session.expect(
        "Note: the OS was started in a virtual environment.",
        Duration::from_mins(1),
    );
    session.expect("# ", Duration::from_mins(1));
    // systemctl fails until systemd's bus is up, then says "starting" until the boot ends.
    let state = session.run(
        "for i in $(seq 300); do s=$(systemctl is-system-running 2>&1); case $s in running|degraded) break;; esac; sleep 1; done; echo $s",
    );
    assert!(
        state.ends_with("running") || state.ends_with("degraded"),
        "systemctl is-system-running said {state:?}; console:\n{}",
        fs::read_to_string(&console).unwrap_or_default()
    );
    assert_eq!(session.run("systemctl is-active ssh"), "active");
    assert_bounded(&session.run("cat /proc/1/status"), "systemd (PID 1)");
    assert_bounded(
        &session.run("cat /proc/$(systemctl show -p MainPID --value ssh)/status"),
        "sshd started by systemd",
    );
    assert_eq!(session.run("echo $container"), "walt");
    assert_eq!(
        session.run("uname -m"),
        if arch == "amd64" { "x86_64" } else { "aarch64" }
    );
    session.send("exit");
    let (code, result, text) = session.finish();
    assert_eq!(code, 0, "{text}");
    assert_eq!(result["mode"], "init");
    assert_eq!(result["emulated"], arch != "amd64");
    assert_nothing_left(cache.to_str().unwrap());
}

#[test]
fn debian_systemd_amd64_init_mode_starts_services() {
    systemd_image_boots_services("amd64");
}

#[test]
fn debian_systemd_arm64_init_mode_starts_services() {
    systemd_image_boots_services("arm64");
}

// ---------------------------------------------------------------------------
// Images from a real registry (fixtures of walt-tests: Debian's docker-registry
// on 127.0.0.1, images built with umoci and pushed with skopeo).

use walt_tests::images::{self, Arch, OciLayout};
use walt_tests::registry::Registry;

/// An arm64 busybox image with a second layer that has a directory and files
/// to change, pushed as `repository_and_tag`.
fn push_arm64_test_image(registry: &Registry, repository_and_tag: &str) {
    let layout = OciLayout::busybox(Arch::Arm64).unwrap();
    layout
        .add_layer("base", "v1", |root| {
            fs::create_dir_all(root.join("var/lib/data"))?;
            fs::write(root.join("var/lib/data/one"), "1\n")?;
            fs::write(root.join("var/lib/data/two"), "2\n")?;
            fs::write(root.join("etc/lower-file"), "from the lower layer\n")?;
            fs::write(root.join("etc/to-delete"), "bye\n")?;
            Ok(())
        })
        .unwrap();
    layout.push("v1", registry, repository_and_tag).unwrap();
}

#[test]
fn arm64_image_changes_are_committed_reopened_and_checked_by_skopeo_umoci() {
    require_root();
    require_arm64_emulation();
    let registry = Registry::start().unwrap();
    push_arm64_test_image(&registry, "lab/shell:1");
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let base = registry.reference("lab/shell:1");
    let target = registry.reference("lab/shell:2");
    let common = [
        "--insecure-registry".to_string(),
        registry.host(),
        "--cache-dir".to_string(),
        cache.to_str().unwrap().to_string(),
    ];
    let mut args = vec!["--image", &base, "--commit-to", &target];
    args.extend(common.iter().map(String::as_str));
    let mut session = Session::start(&args);
    session.expect(
        "Note: this is a limited virtual environment",
        Duration::from_mins(1),
    );
    assert_eq!(session.run("uname -m"), "aarch64");
    session.run("echo new > /etc/new-file");
    session.run("echo changed >> /etc/lower-file");
    session.run("rm /etc/to-delete");
    session.run("rm -r /var/lib/data && mkdir /var/lib/data && echo 3 > /var/lib/data/three");
    session.run("mkdir -p /opt/empty");
    session.send("exit");
    let (code, result, text) = session.finish();
    assert_eq!(code, 0, "{text}");
    assert_eq!(result["emulated"], true);
    assert_eq!(result["reference"], target.as_str());
    let digest = result["digest"].as_str().expect("a digest").to_string();
    assert!(digest.starts_with("sha256:"), "{result}");
    assert!(text.contains("Saved "), "{text}");

    // Reopen the committed image: exactly that state.
    let mut args = vec!["--image", &target];
    args.extend(common.iter().map(String::as_str));
    let mut session = Session::start(&args);
    session.expect("Note: this is a limited", Duration::from_mins(1));
    assert_eq!(session.run("cat /etc/new-file"), "new");
    assert_eq!(
        session.run("cat /etc/lower-file"),
        "from the lower layer\nchanged"
    );
    assert_eq!(
        session.run("[ -e /etc/to-delete ] && echo present || echo absent"),
        "absent"
    );
    assert_eq!(
        session.run("ls /var/lib/data"),
        "three",
        "the recreated directory hides the lower one"
    );
    assert_eq!(
        session.run("[ -d /opt/empty ] && echo dir"),
        "dir",
        "empty directories are kept"
    );
    session.send("exit");
    let (code, result, _) = session.finish();
    assert_eq!(code, 0);
    assert_eq!(
        result["summary"]["added"], 0,
        "nothing changed this time: {result}"
    );

    // Independent checkers agree: skopeo + umoci see the same tree and digest.
    let check = tempfile::tempdir().unwrap();
    let rootfs = images::skopeo_umoci_unpack(&registry, "lab/shell:2", check.path()).unwrap();
    assert_eq!(fs::read_to_string(rootfs.join("etc/new-file")).unwrap(), "new\n");
    assert_eq!(
        fs::read_to_string(rootfs.join("etc/lower-file")).unwrap(),
        "from the lower layer\nchanged\n"
    );
    assert!(!rootfs.join("etc/to-delete").exists());
    let data: Vec<String> = fs::read_dir(rootfs.join("var/lib/data"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(data, ["three"]);
    assert!(rootfs.join("opt/empty").is_dir());
    assert!(
        rootfs.join("bin/busybox").is_file(),
        "the base layers are there too"
    );
    let inspected = run(Command::new("skopeo")
        .args(["inspect", "--tls-verify=false"])
        .arg(format!("docker://{target}")));
    let inspected: serde_json::Value = serde_json::from_str(&inspected).unwrap();
    assert_eq!(
        inspected["Digest"].as_str(),
        Some(digest.as_str()),
        "the tag points at the pushed digest"
    );
    assert_eq!(inspected["Architecture"], "arm64");
    assert_nothing_left(cache.to_str().unwrap());
}

#[test]
fn init_mode_image_from_registry() {
    require_root();
    require_arm64_emulation();
    let registry = Registry::start().unwrap();
    let layout = OciLayout::walt_busybox(Arch::Arm64, "rpi-b").unwrap();
    layout.push("base", &registry, "lab/walt-busybox:1").unwrap();
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let reference = registry.reference("lab/walt-busybox:1");
    let host = registry.host();
    let mut session = Session::start(&[
        "--image",
        &reference,
        "--insecure-registry",
        &host,
        "--cache-dir",
        cache.to_str().unwrap(),
    ]);
    session.expect(
        "Note: the OS was started in a virtual environment.",
        Duration::from_mins(1),
    );
    let init = session.run("cat /proc/1/cmdline | tr '\\0' ' '");
    assert!(
        init.trim().ends_with("/sbin/init"),
        "PID 1 is the OS init: {init}"
    );
    assert_eq!(session.run("uname -m"), "aarch64");
    session.send("exit");
    let (code, result, text) = session.finish();
    assert_eq!(code, 0, "{text}");
    assert_eq!(result["mode"], "init");
    assert_nothing_left(cache.to_str().unwrap());
}

#[test]
fn non_linux_image_is_refused() {
    require_root();
    let registry = Registry::start().unwrap();
    let layout = OciLayout::busybox(Arch::Amd64).unwrap();
    layout.configure("base", &["--os", "windows"]).unwrap();
    layout.push("base", &registry, "lab/windows:1").unwrap();
    let work = tempfile::tempdir().unwrap();
    let output = Command::new(bin())
        .args([
            "shell",
            "--image",
            &registry.reference("lab/windows:1"),
            "--insecure-registry",
            &registry.host(),
        ])
        .arg("--cache-dir")
        .arg(work.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("the image is for the windows operating system"),
        "{stderr}"
    );
}

/// The disk of the shell's upper dir (on the layer cache's volume) fills while the user writes: the
/// user's command fails with the kernel's own words, the shell goes on, and the changes that fit are
/// committed and pushed (the commit streams the upper dir to the registry and needs no free space);
/// nothing of the session is left mounted or running.
#[test]
fn a_full_upper_dir_fails_the_users_write_not_the_session_and_commits_what_fit() {
    require_root();
    let registry = Registry::start().unwrap();
    OciLayout::busybox(Arch::Amd64)
        .unwrap()
        .push("base", &registry, "lab/full:1")
        .unwrap();
    let work = tempfile::tempdir().unwrap();
    let disk = walt_tests::tmpfs::Tmpfs::mount(&work.path().join("cache"), 32 << 20).expect("a 32 MiB tmpfs");
    let cache = disk.path().to_str().unwrap().to_string();
    let base = registry.reference("lab/full:1");
    let target = registry.reference("lab/full:2");
    let args = [
        "--image",
        &base,
        "--commit-to",
        &target,
        "--insecure-registry",
        &registry.host(),
        "--cache-dir",
        &cache,
    ];
    let mut session = Session::start(&args);
    session.expect("Note: this is a limited", Duration::from_mins(1));
    session.run("echo kept > /etc/kept");
    let said = session.run("dd if=/dev/zero of=/root/big bs=1M count=64; echo status=$?");
    assert!(
        said.contains("No space left on device") && said.contains("status=1"),
        "the user's write fails with the kernel's words: {said}"
    );
    assert_eq!(session.run("cat /etc/kept"), "kept", "the shell goes on");
    session.send("exit");
    let (code, result, text) = session.finish();
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("Saved "), "{text}");
    let check = tempfile::tempdir().unwrap();
    let rootfs = images::skopeo_umoci_unpack(&registry, "lab/full:2", check.path()).unwrap();
    assert_eq!(fs::read_to_string(rootfs.join("etc/kept")).unwrap(), "kept\n");
    let big = fs::metadata(rootfs.join("root/big"))
        .expect("the part of the file that fit")
        .len();
    assert!(
        big > 0 && big < 32 << 20,
        "the committed file holds what fit: {big} bytes; {result}"
    );
    // The test's own tmpfs is mounted at the cache dir: nothing may stay mounted below it.
    assert_nothing_left(&format!("{cache}/"));
}
