//! Benchmarks of the image shell runtime, side by side with the reference
//! tools, in one run each (root needed):
//!
//! ```text
//! cargo run --release -p walt-operator --example runtime_bench -- warm-start
//! ```
//!
//! - `warm-start`: time from starting the command to the shell's first prompt,
//!   `walt-operator shell` vs `podman run --rm -it --network none` (runc) of
//!   the same busybox root, native (amd64) and emulated (arm64, qemu-user).
//! - `cold-start`: pull + unpack of a ~250 MB image (Debian with systemd and
//!   openssh-server) from a loopback registry with an empty cache, to the
//!   first prompt, vs `skopeo copy` + `umoci unpack` of the same image.
//! - `commit`: pushing the same change (64 MiB file + 1000 small files) as a
//!   new image to the loopback registry, vs `buildah commit` to it. Timed to
//!   the result each prints: walt from its `Committing to` line (the shell
//!   has exited) to its `Saved` line; buildah from its start to the last line
//!   it prints (its progress ends with writing the manifest). Also timed, to
//!   exit with cleanup: walt removes its session directory (upper dir
//!   included) after printing the result; buildah's counterpart is
//!   `buildah rm` of its working container.
//!
//! - `build`: `walt-operator build` vs `buildah bud --layers` + `buildah push` of the same Dockerfile (a
//!   Debian base, `dpkg -i` of a .deb from the context, `COPY` of 10,000 files, two `RUN`s), amd64 and
//!   arm64 (emulated), cold (empty caches) and warm (unchanged rebuild), one run each, with the size of
//!   the result (compressed layers).
//!
//! Each prints the median of several runs of each side and the ratio
//! walt / reference.
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
    match what.as_str() {
        "warm-start" => warm_start(),
        "cold-start" => cold_start(),
        "commit" => commit(),
        "build" => build(),
        _ => {
            eprintln!("usage: runtime_bench warm-start|cold-start|commit|build");
            std::process::exit(2);
        }
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
    time_to_prompt_then(command, prompt, &[], None).0
}

/// Times from one output line to another, and to the command's end.
struct Marks<'m> {
    /// Where timing starts (`Committing to`).
    start: &'m str,
    /// The result the user waits for (`Saved `).
    result: &'m str,
}

/// From [`Marks::start`] to [`Marks::result`] and to the command's end.
#[derive(Clone, Copy)]
struct MarkTimes {
    to_result: Duration,
    to_exit: Duration,
}

/// Like [`time_to_prompt`], then types `lines` (each answered by a prompt)
/// and `exit`; when `marks` are given, also returns the times from the start
/// mark appearing in the output to the result mark and to the command's end.
fn time_to_prompt_then(
    command: &mut Command,
    prompt: &str,
    lines: &[&str],
    marks: Option<&Marks>,
) -> (Duration, Option<MarkTimes>) {
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
    for (index, line) in lines.iter().enumerate() {
        let marker = format!("__step{index}__");
        master
            .write_all(format!("{line}; echo {marker}\r").as_bytes())
            .unwrap();
        let deadline = Instant::now() + Duration::from_mins(5);
        while String::from_utf8_lossy(&output.lock().unwrap())
            .matches(&marker)
            .count()
            < 2
        {
            assert!(Instant::now() < deadline, "{line} did not finish");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    master.write_all(b"exit\r").unwrap();
    let deadline = Instant::now() + Duration::from_mins(5);
    let mut start_seen: Option<Instant> = None;
    let mut result_seen: Option<Instant> = None;
    while child.try_wait().unwrap().is_none() {
        if let Some(marks) = marks {
            let text = String::from_utf8_lossy(&output.lock().unwrap()).into_owned();
            if start_seen.is_none() && text.contains(marks.start) {
                start_seen = Some(Instant::now());
            }
            if start_seen.is_some() && result_seen.is_none() && text.contains(marks.result) {
                result_seen = Some(Instant::now());
            }
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    let exited = Instant::now();
    // The last output may arrive together with the exit.
    std::thread::sleep(Duration::from_millis(50));
    let times = marks.map(|marks| {
        let text = String::from_utf8_lossy(&output.lock().unwrap()).into_owned();
        let (Some(start), true) = (start_seen, text.contains(marks.result)) else {
            panic!(
                "{command:?} did not print {:?} then {:?}: {text}",
                marks.start, marks.result
            );
        };
        MarkTimes {
            to_result: result_seen.unwrap_or(exited) - start,
            to_exit: exited - start,
        }
    });
    (elapsed, times)
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

fn report(title: &str, ours: Duration, theirs: Duration, reference: &str) {
    println!(
        "{title}: walt {:.2} s, {reference} {:.2} s, ratio {:.2}x",
        ours.as_secs_f64(),
        theirs.as_secs_f64(),
        ours.as_secs_f64() / theirs.as_secs_f64()
    );
}

fn timed(command: &mut Command) -> Duration {
    let start = Instant::now();
    run(command);
    start.elapsed()
}

/// The cached Debian systemd root of the runtime tests (built by them).
fn debian_rootfs() -> PathBuf {
    let dir = cache_dir().join("rootfs/debian-bookworm-systemd-amd64");
    assert!(
        dir.join("usr/lib/systemd/systemd").exists(),
        "{} is missing: run `cargo test -p walt-operator --test runtime debian_systemd_amd64` once (it builds it)",
        dir.display()
    );
    dir
}

const COLD_RUNS: usize = 3;

fn cold_start() {
    use walt_tests::images::{Arch, OciLayout};
    let walt = walt_binary();
    let registry = walt_tests::registry::Registry::start().unwrap();
    let layout = OciLayout::new().unwrap();
    layout.new_image("empty", Arch::Amd64).unwrap();
    layout
        .add_layer_from_dir("empty", "base", &debian_rootfs())
        .unwrap();
    layout.push("base", &registry, "lab/debian:1").unwrap();
    let reference = registry.reference("lab/debian:1");
    let work = tempfile::tempdir().unwrap();
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for run_index in 0..COLD_RUNS {
        let cache = work.path().join(format!("cache-{run_index}"));
        let mut command = Command::new(&walt);
        command
            .args([
                "shell",
                "--mode",
                "basic",
                "--image",
                &reference,
                "--insecure-registry",
                &registry.host(),
            ])
            .arg("--cache-dir")
            .arg(&cache);
        ours.push(time_to_prompt(&mut command, "# "));
        let _ = fs::remove_dir_all(&cache);
        let layout_dir = work.path().join(format!("layout-{run_index}"));
        let bundle = work.path().join(format!("bundle-{run_index}"));
        let copy = timed(
            Command::new("skopeo")
                .args(["copy", "--src-tls-verify=false"])
                .arg(format!("docker://{reference}"))
                .arg(format!("oci:{}:t", layout_dir.display())),
        );
        let unpack = timed(
            Command::new("umoci")
                .args(["unpack", "--image"])
                .arg(format!("{}:t", layout_dir.display()))
                .arg(&bundle),
        );
        theirs.push(copy + unpack);
        let _ = fs::remove_dir_all(&layout_dir);
        let _ = fs::remove_dir_all(&bundle);
    }
    println!(
        "cold start, median of {COLD_RUNS} runs (Debian bookworm + systemd + openssh-server, amd64, loopback registry)"
    );
    report(
        "pull + unpack (walt: to the first prompt)",
        median(ours),
        median(theirs),
        "skopeo copy + umoci unpack",
    );
}

const CHANGE: [&str; 3] = [
    "dd if=/dev/urandom of=/root/big bs=1M count=64 2>/dev/null",
    "mkdir -p /root/many",
    "for i in $(seq 1000); do echo $i > /root/many/$i; done",
];

fn commit() {
    use walt_tests::images::{Arch, OciLayout};
    let walt = walt_binary();
    let registry = walt_tests::registry::Registry::start().unwrap();
    let layout = OciLayout::busybox(Arch::Amd64).unwrap();
    layout.push("base", &registry, "lab/busybox:1").unwrap();
    let reference = registry.reference("lab/busybox:1");
    let work = tempfile::tempdir().unwrap();
    let podman = Podman::new();
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for run_index in 0..COLD_RUNS {
        let target = registry.reference(&format!("lab/walt-commit:{run_index}"));
        let mut command = Command::new(&walt);
        command
            .args([
                "shell",
                "--mode",
                "basic",
                "--image",
                &reference,
                "--insecure-registry",
                &registry.host(),
            ])
            .args(["--commit-to", &target])
            .arg("--cache-dir")
            .arg(work.path().join("cache"));
        let marks = Marks {
            start: "Committing to",
            result: "Saved ",
        };
        let (_, commit) = time_to_prompt_then(&mut command, "# ", &CHANGE, Some(&marks));
        ours.push(commit.unwrap());

        // buildah: the same change written into a working container, then
        // `buildah commit` straight to the registry.
        let buildah = || {
            let mut command = Command::new("buildah");
            command
                .env("CONTAINERS_CONF", podman.dir.path().join("containers.conf"))
                .arg("--root")
                .arg(podman.dir.path().join("root"))
                .arg("--runroot")
                .arg(podman.dir.path().join("runroot"))
                .args(["--storage-driver", "overlay"]);
            command
        };
        let container = run(buildah().args(["from", "--tls-verify=false", &reference]))
            .trim()
            .to_string();
        let mount = PathBuf::from(run(buildah().args(["mount", &container])).trim());
        let script = CHANGE
            .join("; ")
            .replace("/root", &mount.join("root").display().to_string());
        run(Command::new("sh").arg("-c").arg(&script));
        run(buildah().args(["umount", &container]));
        let target = registry.reference(&format!("lab/buildah-commit:{run_index}"));
        let mut times = timed_to_last_line(
            buildah()
                .args(["commit", "--tls-verify=false", &container])
                .arg(format!("docker://{target}")),
        );
        // Its cleanup, the counterpart of walt removing its session directory.
        times.to_exit += timed(buildah().args(["rm", &container]));
        theirs.push(times);
    }
    println!(
        "commit, median of {COLD_RUNS} runs (64 MiB file + 1000 small files on busybox, pushed to a loopback registry)"
    );
    let pick =
        |times: &[MarkTimes], field: fn(&MarkTimes) -> Duration| median(times.iter().map(field).collect());
    report(
        "commit + push, to the result (walt: `Committing to` -> `Saved` line; buildah: start -> its last output line)",
        pick(&ours, |t| t.to_result),
        pick(&theirs, |t| t.to_result),
        "buildah commit",
    );
    report(
        "commit + push + cleanup, to exit (walt removes its session directory after `Saved`; buildah: + `buildah rm`)",
        pick(&ours, |t| t.to_exit),
        pick(&theirs, |t| t.to_exit),
        "buildah commit",
    );
}

/// Runs `command` and times from its start to its last output line (what it
/// reports, on stdout or stderr) and to its exit.
fn timed_to_last_line(command: &mut Command) -> MarkTimes {
    use std::io::BufRead as _;
    fn last_line<R: Read + Send + 'static>(
        stream: R,
        start: Instant,
    ) -> std::thread::JoinHandle<(String, Instant)> {
        std::thread::spawn(move || {
            let mut text = String::new();
            let mut at = start;
            for line in std::io::BufReader::new(stream).lines().map_while(Result::ok) {
                if !line.trim().is_empty() {
                    at = Instant::now();
                }
                text.push_str(&line);
                text.push('\n');
            }
            (text, at)
        })
    }
    let start = Instant::now();
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    let stdout = last_line(child.stdout.take().unwrap(), start);
    let stderr = last_line(child.stderr.take().unwrap(), start);
    let status = child.wait().unwrap();
    let exited = Instant::now();
    let (out, out_at) = stdout.join().unwrap();
    let (err, err_at) = stderr.join().unwrap();
    assert!(status.success(), "{command:?} failed: {out}{err}");
    let last_at = out_at.max(err_at);
    assert!(last_at > start, "{command:?} printed nothing");
    MarkTimes {
        to_result: last_at - start,
        to_exit: exited - start,
    }
}

/// The cached Debian systemd root of the runtime tests for `arch` (built by them).
fn debian_rootfs_of(arch: &str) -> PathBuf {
    let dir = cache_dir().join(format!("rootfs/debian-bookworm-systemd-{arch}"));
    assert!(
        dir.join("usr/lib/systemd/systemd").exists(),
        "{} is missing: run `cargo test -p walt-operator --test runtime debian_systemd_{arch}` once (it builds it)",
        dir.display()
    );
    dir
}

/// Compressed size of an image's layers (from its manifest).
fn layers_size(reference: &str) -> u64 {
    let raw = run(Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{reference}")));
    walt_tests::build_bench::layers_bytes(&raw).unwrap()
}

fn build() {
    use walt_tests::images::{Arch, OciLayout};
    let walt = walt_binary();
    let registry = walt_tests::registry::Registry::start().unwrap();
    for (arch, name) in [(Arch::Amd64, "amd64"), (Arch::Arm64, "arm64")] {
        let layout = OciLayout::new().unwrap();
        layout.new_image("empty", arch).unwrap();
        layout
            .add_layer_from_dir("empty", "base", &debian_rootfs_of(name))
            .unwrap();
        layout
            .push("base", &registry, &format!("lab/debian-{name}:1"))
            .unwrap();
        let base = registry.reference(&format!("lab/debian-{name}:1"));
        let work = tempfile::tempdir().unwrap();
        let context = work.path().join("context");
        walt_tests::build_bench::write_context(&context, &base).unwrap();
        let cache = work.path().join("cache");
        let walt_target = registry.reference(&format!("lab/walt-{name}:1"));
        let walt_build = || {
            let mut command = Command::new(&walt);
            command
                .args([
                    "build",
                    "--network",
                    "none",
                    "--insecure-registry",
                    &registry.host(),
                    "--to",
                    &walt_target,
                ])
                .arg("--context")
                .arg(&context)
                .arg("--cache-dir")
                .arg(&cache);
            timed(&mut command)
        };
        let walt_cold = walt_build();
        let walt_warm = walt_build();
        let podman = Podman::new();
        let buildah_target = registry.reference(&format!("lab/buildah-{name}:1"));
        let buildah = || {
            let mut command = Command::new("buildah");
            command
                .env("CONTAINERS_CONF", podman.dir.path().join("containers.conf"))
                .arg("--root")
                .arg(podman.dir.path().join("root"))
                .arg("--runroot")
                .arg(podman.dir.path().join("runroot"))
                .args(["--storage-driver", "overlay"]);
            command
        };
        let buildah_build = || {
            let bud = timed(
                buildah()
                    .args([
                        "bud",
                        "--layers",
                        "--network",
                        "none",
                        "--tls-verify=false",
                        "--platform",
                    ])
                    .arg(format!("linux/{name}"))
                    .args(["-t", "walt-bench"])
                    .arg(&context),
            );
            let push = timed(
                buildah()
                    .args(["push", "--tls-verify=false", "walt-bench"])
                    .arg(format!("docker://{buildah_target}")),
            );
            bud + push
        };
        let buildah_cold = buildah_build();
        let buildah_warm = buildah_build();
        println!(
            "build, {name}{} (Debian bookworm base, dpkg -i, COPY of 10,000 files, 2 RUN):",
            if name == "arm64" { ", emulated" } else { "" }
        );
        report(
            "  cold (empty caches)",
            walt_cold,
            buildah_cold,
            "buildah bud + push",
        );
        report(
            "  warm (unchanged rebuild)",
            walt_warm,
            buildah_warm,
            "buildah bud + push",
        );
        println!(
            "  result size (compressed layers): walt {} bytes, buildah {} bytes",
            layers_size(&walt_target),
            layers_size(&buildah_target)
        );
        let _ = buildah().args(["rm", "--all"]).output();
        let _ = buildah().args(["rmi", "--all", "--force"]).output();
    }
}
