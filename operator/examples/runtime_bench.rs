//! Benchmarks of the image shell runtime, side by side with the reference
//! tools, in one run each (root needed):
//!
//! ```text
//! cargo run --release -p walt-operator --example runtime_bench -- warm-start
//! ```
//!
//! `warm-start`: time from starting the command to the shell's first prompt,
//! `walt-operator shell` vs `podman run --rm -it --network none` (runc) of the
//! same busybox root, native (amd64) and emulated (arm64, qemu-user). Prints
//! the median of several runs of each and the ratio walt / podman.
#![allow(clippy::unwrap_used)] // a benchmark that cannot set up stops

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const RUNS: usize = 7;

fn main() {
    let what = std::env::args().nth(1).unwrap_or_default();
    if what == "warm-start" {
        warm_start();
    } else {
        eprintln!("usage: runtime_bench warm-start");
        std::process::exit(2);
    }
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

fn cache_dir() -> PathBuf {
    std::env::var_os("WALT_CACHE").map_or_else(
        || PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into())).join(".cache/walt"),
        PathBuf::from,
    )
}

/// A busybox root for `arch` (Debian's busybox-static, downloaded once).
fn busybox_rootfs(arch: &str, dir: &Path) {
    let debs = cache_dir().join("debs");
    fs::create_dir_all(&debs).unwrap();
    let find = || {
        fs::read_dir(&debs)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                let name = p.file_name().unwrap_or_default().to_string_lossy().into_owned();
                name.starts_with("busybox-static_") && name.ends_with(&format!("_{arch}.deb"))
            })
    };
    let deb = find().unwrap_or_else(|| {
        run(Command::new("apt-get")
            .args(["download", &format!("busybox-static:{arch}")])
            .current_dir(&debs));
        find().expect("busybox-static .deb")
    });
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(dir));
    for sub in [
        "usr/bin", "usr/sbin", "sbin", "root", "etc", "proc", "sys", "dev", "tmp", "run",
    ] {
        fs::create_dir_all(dir.join(sub)).unwrap();
    }
    for applet in run(Command::new("busybox").arg("--list-full")).lines() {
        let link = dir.join(applet);
        if !applet.is_empty() && fs::symlink_metadata(&link).is_err() {
            symlink("/bin/busybox", &link).unwrap();
        }
    }
    fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
}

/// Starts `command` on a new PTY and returns the time until `prompt` shows,
/// then ends the shell with `exit`.
fn time_to_prompt(command: &mut Command, prompt: &str) -> Duration {
    let pty = nix::pty::openpty(None, None).expect("openpty");
    let start = Instant::now();
    let mut child: Child = command
        .stdin(Stdio::from(pty.slave.try_clone().unwrap()))
        .stdout(Stdio::from(pty.slave.try_clone().unwrap()))
        .stderr(Stdio::from(pty.slave))
        .spawn()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    let mut master = fs::File::from(pty.master);
    let output = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&output);
    let mut reader = master.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut buffer = [0u8; 4096];
        while let Ok(n) = reader.read(&mut buffer) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&buffer[..n]);
        }
    });
    let elapsed = loop {
        if String::from_utf8_lossy(&output.lock().unwrap()).contains(prompt) {
            break start.elapsed();
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "{command:?} exited ({status}) before its prompt: {}",
                String::from_utf8_lossy(&output.lock().unwrap())
            );
        }
        assert!(
            start.elapsed() < Duration::from_mins(1),
            "no prompt from {command:?}"
        );
        std::thread::sleep(Duration::from_micros(500));
    };
    master.write_all(b"exit\r").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    elapsed
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

/// podman with runc, no network, its own storage and config (see
/// MACHINE-NOTES), so nothing of the machine's podman setup is touched.
struct Podman {
    dir: tempfile::TempDir,
}

impl Podman {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("containers.conf"),
            "[containers]\ndefault_ulimits = [\"nofile=20000:20000\", \"nproc=4096:4096\"]\nnetns = \"none\"\n\
             [engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n",
        )
        .unwrap();
        Self { dir }
    }

    fn command(&self) -> Command {
        let mut command = Command::new("podman");
        command
            .env("CONTAINERS_CONF", self.dir.path().join("containers.conf"))
            .arg("--root")
            .arg(self.dir.path().join("root"))
            .arg("--runroot")
            .arg(self.dir.path().join("runroot"))
            .args(["--storage-driver", "overlay", "--cgroup-manager", "cgroupfs"]);
        command
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.command().args(["system", "reset", "--force"]).output();
    }
}

fn walt_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("WALT_OPERATOR_BIN") {
        return PathBuf::from(bin);
    }
    // The example lives in target/<profile>/examples/: the binary is one up.
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    dir.join("walt-operator")
}

fn warm_start() {
    let work = tempfile::tempdir().unwrap();
    let walt = walt_binary();
    assert!(
        walt.is_file(),
        "{} is missing: cargo build --release -p walt-operator",
        walt.display()
    );
    let podman = Podman::new();
    println!("warm start to first prompt, median of {RUNS} runs (busybox root, cache hot)");
    println!("{:<10} {:>12} {:>12} {:>8}", "image", "walt", "podman", "ratio");
    for arch in ["amd64", "arm64"] {
        let rootfs = work.path().join(format!("rootfs-{arch}"));
        busybox_rootfs(arch, &rootfs);
        let cache = work.path().join(format!("cache-{arch}"));
        let walt_command = || {
            let mut command = Command::new(&walt);
            command
                .args(["shell", "--mode", "basic", "--rootfs"])
                .arg(&rootfs)
                .arg("--cache-dir")
                .arg(&cache);
            command
        };
        let podman_command = || {
            let mut command = podman.command();
            command
                .args([
                    "run",
                    "--rm",
                    "-it",
                    "--network",
                    "none",
                    "--arch",
                    arch,
                    "--rootfs",
                ])
                .arg(format!("{}:O", rootfs.display()))
                .arg("/bin/sh");
            command
        };
        // One untimed run each warms the page cache and podman's storage.
        time_to_prompt(&mut walt_command(), "# ");
        time_to_prompt(&mut podman_command(), "# ");
        let mut walt_times = Vec::new();
        let mut podman_times = Vec::new();
        for _ in 0..RUNS {
            walt_times.push(time_to_prompt(&mut walt_command(), "# "));
            podman_times.push(time_to_prompt(&mut podman_command(), "# "));
        }
        let (w, p) = (median(walt_times), median(podman_times));
        println!(
            "{:<10} {:>9.1} ms {:>9.1} ms {:>7.2}x",
            if arch == "amd64" { "amd64" } else { "arm64 (qemu)" },
            w.as_secs_f64() * 1000.0,
            p.as_secs_f64() * 1000.0,
            w.as_secs_f64() / p.as_secs_f64()
        );
    }
}
