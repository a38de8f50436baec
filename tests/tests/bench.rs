//! Speed as users feel it (issue 20): `cargo xtask bench` runs this `#[ignore]`d test on the cluster
//! tier and prints a table (see `walt_tests::bench`). Everything is the real product, installed by its
//! chart with the lab's values (`walt_tests::lab::install_release`, as the journey does), and every
//! reference runs in the same run, on the same cluster, against the same image and node:
//!
//! 1. `kubectl walt image shell debian` until the shell answers, vs `kubectl run -it --rm` of the same
//!    image (a Debian bookworm of about 250 MB, the runtime tests' debootstrap root), pushed to the
//!    node's registry for the kubelet: cold (the image neither in walt's layer cache on the node nor in
//!    containerd) and warm.
//! 2. `kubectl walt node shell` of a virtual node booted from that image vs `ssh` straight to it (from
//!    the node's network namespace, with the node key).
//! 3. A save of 256 MiB of new files (64 × 4 MiB from /dev/urandom, made anew before each save):
//!    `kubectl walt node save` until the Image is Ready vs the bare `walt-operator save` (the same
//!    binary as in the walt image, run here against the same node and registry) and vs WalT's way
//!    (`ssh node tar > ar.tar`, `podman build` of `FROM base` + `ADD ar.tar /`, `podman push`).
//!
//! 4. `kubectl walt image build --from-dir` of the build benchmark's context (`walt_tests::build_bench`:
//!    a Debian base, `dpkg -i` of a .deb from the context, `COPY` of 10,000 files, two `RUN`s), amd64 and
//!    arm64 (emulated), cold (a new image, the base out of walt's layer cache) and warm (an unchanged
//!    rebuild, which must push nothing), vs `buildah bud --layers` + `buildah push` of the same context
//!    to the same lab registry (cold: an empty storage); the compressed size of both results.
//!
//! The operator's peak RSS is reset before and read after each of its saves and builds (`/proc/PID/clear_refs`).
//! `WALT_BENCH_REPS` sets the repetitions (default 3); orders alternate between repetitions.

use std::cell::Cell;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use walt_tests::bench::{self, Row};
use walt_tests::build_bench;
use walt_tests::deploy::run;
use walt_tests::image_build::{self, BuildProfile};
use walt_tests::images::{self, Arch, OciLayout};
use walt_tests::k8s::{Cluster, ClusterOptions, cluster_tier_skip_reason};
use walt_tests::lab::{self, Kube};
use walt_tests::pty::Pty;
use walt_tests::registry_auth::RegistryAuth;
use walt_tests::wait::{Poll, Wait};

const NS: &str = "bench";
const IMAGE: &str = "debian";
const NODE: &str = "vbench";
/// Where the chart's shell pods keep their layer cache on the node (`operator.shellCache`).
const SHELL_CACHE: &str = "/var/lib/walt/cache/layers";
/// The 256 MiB of changes a save carries, written anew before each save.
const CHANGES: &str = "rm -rf /root/bench && mkdir /root/bench && for i in $(seq 1 64); do \
                       head -c 4194304 /dev/urandom > /root/bench/f$i; done && sync";
/// The node's overlay upper dir (what WalT's server tars).
const UPPER_DIR: &str = "/run/walt/rootfs/mnt/fs_rw";

/// Removes `layers` (blob digests) from walt's layer cache on the node (the shell and build pods'
/// hostPath cache).
fn forget_layers(layers: &[String]) {
    for layer in layers {
        let hex = layer.trim_start_matches("sha256:");
        for sub in ["sha256", "sha256-userxattr"] {
            let dir = Path::new(SHELL_CACHE).join(sub).join(hex);
            if dir.exists() {
                std::fs::remove_dir_all(&dir)
                    .unwrap_or_else(|e| panic!("removing {} from walt's cache: {e}", dir.display()));
            }
        }
    }
}

/// Makes the next start cold for its whole path (both sides): what removing an image left is written
/// out (`sync`) and the page cache dropped (`/proc/sys/vm/drop_caches`), so the registry's blob is
/// read from disk too. Without it, on the development VM, unpacking the same 250 MB again grew
/// slower with each repetition whoever did it (walt's shell pull and unpack on a host 1.7, 4.2,
/// 6.4, 7.5 s; `tar -xzf` of the blob 1.4, 3.1, 4.8 s; after a drop 1.9–2.2 s and 1.55 s, steady),
/// which made the cold rows measure the machine's memory rather than the start.
fn settle_caches() {
    must(run(&mut Command::new("sync")), "sync");
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap_or_else(|e| {
        panic!("dropping the page cache (/proc/sys/vm/drop_caches; the bench runs as root): {e}")
    });
}

/// Runs `command` (under GNU time's `-f 'peak-rss-kib %M'`) to success: its time and peak RSS.
fn run_timed(command: &mut Command, what: &str) -> (f64, u64) {
    let started = Instant::now();
    let output = command.output().unwrap_or_else(|e| panic!("run {what}: {e}"));
    let took = started.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{what}: {stderr}{}",
        String::from_utf8_lossy(&output.stdout)
    );
    let peak = bench::time_peak_rss_kib(&stderr)
        .unwrap_or_else(|| panic!("GNU time printed no peak RSS for {what}:\n{stderr}"));
    (took, peak)
}

/// `/etc/netns/<netns>/`: files `ip netns exec` shows in place of `/etc`'s, here a resolv.conf naming
/// the cluster DNS so programs run in the node's namespace resolve Service names as pods do. Removed
/// on drop.
struct NetnsEtc(PathBuf);

impl Drop for NetnsEtc {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Bench {
    cluster: Cluster,
    kube: Kube,
    netns: String,
    work: tempfile::TempDir,
    /// The image as the kubelet pulls it (the node registry).
    run_image: String,
    /// Blob digests of the image's layers (walt's layer cache names them so).
    layers: Vec<String>,
    /// The image's config digest (containerd names the image by it too).
    config: String,
    node_key: PathBuf,
    auth_file: PathBuf,
    node_address: String,
    operator_bin: PathBuf,
    podman: Podman,
    counter: Cell<u32>,
    _etc: NetnsEtc,
}

/// `image` in the lab registry, as pods (and programs in the node's namespace) reach it.
fn lab_ref(image: &str) -> String {
    format!("{}/walt/{NS}/{image}:latest", lab::lab_registry_for_pods())
}

fn must(result: Result<String, walt_tests::deploy::Error>, what: &str) -> String {
    result.unwrap_or_else(|e| panic!("{what}: {e}"))
}

impl Bench {
    fn next(&self) -> u32 {
        let n = self.counter.get() + 1;
        self.counter.set(n);
        n
    }

    fn kubectl(&self, args: &[&str]) -> String {
        must(run(self.kube.kubectl().args(args)), &format!("kubectl {args:?}"))
    }

    fn walt(&self, args: &[&str]) -> Command {
        self.kube.walt(NS, args)
    }

    /// `program` run in the node's network namespace (pod and Service addresses, cluster DNS).
    fn in_netns(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.netns, program]);
        command
    }

    fn ssh(&self, tty: bool) -> Command {
        self.ssh_to(&self.node_address, tty)
    }

    /// `ssh root@<host>` from the node's network namespace with the node key.
    fn ssh_to(&self, host: &str, tty: bool) -> Command {
        let mut command = self.in_netns("ssh");
        if tty {
            command.arg("-tt");
        }
        command.arg("-i").arg(&self.node_key).args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            &format!("root@{host}"),
        ]);
        command
    }

    fn wait_gone(&self, what: &str, namespace: &str, selector: &[&str]) {
        Wait::new(what, Duration::from_mins(2))
            .every(Duration::from_millis(500))
            .until(|| {
                let mut args = vec!["get", "pods", "-n", namespace, "-o", "name", "--ignore-not-found"];
                args.extend_from_slice(selector);
                let left = run(self.kube.kubectl().args(&args)).unwrap_or_else(|e| e.to_string());
                if left.trim().is_empty() {
                    Poll::Ready(())
                } else {
                    Poll::Pending(left)
                }
            })
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Removes the image from walt's layer cache on the node (the shell pods' hostPath cache).
    fn forget_in_walt_cache(&self) {
        forget_layers(&self.layers);
        settle_caches();
    }

    /// Removes the image from the node's containerd (every name it has there), waiting for its
    /// content to be collected.
    fn forget_in_containerd(&self) {
        let socket = self.cluster.dir().join("node/containerd/containerd.sock");
        let ctr = |args: &[&str]| {
            let mut command = Command::new("ctr");
            command
                .arg("--address")
                .arg(&socket)
                .args(["-n", "k8s.io"])
                .args(args);
            must(run(&mut command), &format!("ctr {args:?}"))
        };
        // The containers of earlier `kubectl run` pods (deleted, not yet collected by the kubelet)
        // keep the image's unpacked layers, and its content with them: a "cold" pull then takes
        // milliseconds (seen: 24 ms). They have exited; they go first.
        let image = format!("/{NS}/{IMAGE}");
        let containers: Vec<String> = ctr(&["containers", "ls"])
            .lines()
            .skip(1)
            .filter_map(|line| {
                let mut columns = line.split_whitespace();
                let id = columns.next()?;
                columns.next().filter(|used| used.contains(&image))?;
                Some(id.to_owned())
            })
            .collect();
        if !containers.is_empty() {
            let mut args = vec!["containers", "rm"];
            args.extend(containers.iter().map(String::as_str));
            ctr(&args);
        }
        let names: Vec<String> = ctr(&["images", "ls", "-q"])
            .lines()
            .filter(|name| name.contains(&image) || name.contains(&self.config))
            .map(str::to_owned)
            .collect();
        if !names.is_empty() {
            let mut args = vec!["images", "rm", "--sync"];
            args.extend(names.iter().map(String::as_str));
            ctr(&args);
        }
        let left = ctr(&["images", "ls", "-q"]);
        assert!(!left.contains(&image), "containerd still has the image:\n{left}");
        let content = ctr(&["content", "ls", "-q"]);
        let kept: Vec<&String> = self
            .layers
            .iter()
            .filter(|layer| content.contains(layer.as_str()))
            .collect();
        assert!(
            kept.is_empty(),
            "containerd still holds the layers {kept:?} (a container or a lease keeps them): the cold reference would not pull"
        );
        settle_caches();
    }

    /// `kubectl walt image shell`: time until the shell answers; then exit, discarding the session.
    fn image_shell(&self, cold: bool) -> f64 {
        if cold {
            self.forget_in_walt_cache();
        }
        let (took, mut pty) =
            bench::time_to_answer(&self.walt(&["image", "shell", IMAGE]), Duration::from_mins(5))
                .unwrap_or_else(|e| panic!("{e}"));
        pty.send("exit\n");
        let ended = Wait::new("the image shell to end", Duration::from_mins(2))
            .every(Duration::from_millis(100))
            .until(|| {
                if let Some(code) = pty.try_wait() {
                    return Poll::Ready(code);
                }
                if pty.text().contains("Save as a new image") {
                    pty.send("\x04");
                    // Answered once: wait for the exit from now on.
                    let (code, _) = pty.wait_within(Duration::from_mins(1));
                    return Poll::Ready(code);
                }
                Poll::Pending("still running".to_owned())
            })
            .unwrap_or_else(|e| panic!("{e}:\n{}", pty.text()));
        assert_eq!(ended, 0, "kubectl walt image shell:\n{}", pty.text());
        self.wait_gone(
            "the shell pod to be deleted",
            &walt_crds::runtime_namespace(NS),
            &["-l", "walt.dev/shell-session"],
        );
        took.as_secs_f64()
    }

    /// `kubectl run -it --rm` of the same image with bash: time until the shell answers.
    fn kubectl_run(&self, cold: bool) -> f64 {
        if cold {
            self.forget_in_containerd();
        }
        let name = format!("bench-run-{}", self.next());
        let mut command = self.kube.kubectl();
        command.args([
            "-n",
            NS,
            "run",
            &name,
            "-it",
            "--rm",
            "--restart=Never",
            "--image",
            &self.run_image,
            "--command",
            "--",
            "bash",
        ]);
        let (took, mut pty) =
            bench::time_to_answer(&command, Duration::from_mins(5)).unwrap_or_else(|e| panic!("{e}"));
        pty.send("exit\n");
        let (code, shown) = pty.wait_within(Duration::from_mins(2));
        assert_eq!(code, 0, "kubectl run:\n{shown}");
        let events = self.kubectl(&[
            "get",
            "events",
            "-n",
            NS,
            "--field-selector",
            &format!("involvedObject.name={name}"),
            "-o",
            "jsonpath={range .items[*]}{.reason}: {.message}{\"\\n\"}{end}",
        ]);
        let pulled = events
            .lines()
            .find(|l| l.starts_with("Pulled:"))
            .unwrap_or("no Pulled event");
        assert_eq!(
            cold,
            !pulled.contains("already present"),
            "the kubelet pulled the image exactly when it was cold: {pulled}"
        );
        eprintln!(
            "bench:   kubectl run ({}): {pulled}",
            if cold { "cold" } else { "warm" }
        );
        self.wait_gone("the kubectl run pod to be deleted", NS, &[&name]);
        took.as_secs_f64()
    }

    fn node_shell(&self) -> f64 {
        let (took, mut pty) =
            bench::time_to_answer(&self.walt(&["node", "shell", NODE]), Duration::from_mins(2))
                .unwrap_or_else(|e| panic!("{e}"));
        pty.send("exit\n");
        let (code, shown) = pty.wait_within(Duration::from_mins(1));
        assert_eq!(code, 0, "kubectl walt node shell:\n{shown}");
        took.as_secs_f64()
    }

    fn ssh_shell(&self) -> f64 {
        let (took, mut pty) =
            bench::time_to_answer(&self.ssh(true), Duration::from_mins(2)).unwrap_or_else(|e| panic!("{e}"));
        pty.send("exit\n");
        let (code, shown) = pty.wait_within(Duration::from_mins(1));
        assert_eq!(code, 0, "ssh:\n{shown}");
        took.as_secs_f64()
    }

    /// New 256 MiB of changes on the node (not timed).
    fn change_node(&self) {
        let mut command = self.ssh(false);
        command.arg(CHANGES);
        must(run(&mut command), "writing 256 MiB on the node");
    }

    fn operators(&self) -> Vec<u32> {
        let pids = bench::processes("walt-operator", "run", &self.netns);
        assert!(
            !pids.is_empty(),
            "no walt-operator run process of this cluster found"
        );
        pids
    }

    /// `kubectl walt node save` until the Image is Ready (the plugin says `Saved` only once its Image
    /// shows the saved digest Ready: checked after the timing); the operators' peak RSS meanwhile.
    fn save_ours(&self) -> (f64, u64) {
        let target = format!("save-ours-{}", self.next());
        let operators = self.operators();
        for pid in &operators {
            bench::reset_peak_rss(*pid).unwrap_or_else(|e| panic!("{e}"));
        }
        let mut command = self.walt(&["node", "save", NODE, &target]);
        let started = Instant::now();
        let output = command.output().expect("run kubectl walt node save");
        let took = started.elapsed().as_secs_f64();
        let said = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "kubectl walt node save: {said}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let digest = said
            .lines()
            .find_map(|line| line.strip_prefix(&format!("Saved {NODE} as {target}: ")))
            .unwrap_or_else(|| panic!("no Saved line: {said}"));
        let image = self.kubectl(&[
            "get",
            "-n",
            NS,
            &format!("image.walt.dev/{target}"),
            "-o",
            "jsonpath={.status.digest} {.status.conditions[?(@.type==\"Ready\")].status}",
        ]);
        assert_eq!(
            image,
            format!("{digest} True"),
            "the Image when kubectl walt node save said: {said}"
        );
        let peak = operators
            .iter()
            .filter_map(|pid| bench::peak_rss_kib(*pid))
            .max()
            .unwrap_or_default();
        let durations = self.kubectl(&[
            "get",
            "nodesaves",
            "-n",
            NS,
            "-o",
            "jsonpath={range .items[*]}{.spec.image}={.status.duration}{\" \"}{end}",
        ]);
        let inside = durations
            .split_whitespace()
            .find_map(|pair| pair.strip_prefix(&format!("{target}=")))
            .unwrap_or("?")
            .to_owned();
        eprintln!("bench:   node save {target}: {took:.2} s to Ready, NodeSave duration {inside}");
        (took, peak)
    }

    /// The bare `walt-operator save` against the same node and registry; its peak RSS (GNU time).
    fn save_bare(&self) -> (f64, u64) {
        let target = format!("save-bare-{}", self.next());
        let mut command = self.in_netns("time");
        command
            .args(["-f", "peak-rss-kib %M"])
            .arg(&self.operator_bin)
            .args([
                "save",
                "--node",
                &format!("root@{}:22", self.node_address),
                "--identity",
            ])
            .arg(&self.node_key)
            .args([
                "--base",
                &lab_ref(IMAGE),
                "--to",
                &lab_ref(&target),
                "--insecure-registry",
                &lab::lab_registry_for_pods(),
            ])
            .env("REGISTRY_AUTH_FILE", &self.auth_file);
        let (took, peak) = run_timed(&mut command, "walt-operator save");
        eprintln!("bench:   walt-operator save {target}: {took:.2} s");
        (took, peak)
    }

    /// WalT's way: `ssh node tar > ar.tar; podman build; podman push`.
    fn save_podman(&self) -> f64 {
        let n = self.next();
        let context = self.work.path().join(format!("podman-{n}"));
        std::fs::create_dir_all(&context).expect("podman context dir");
        std::fs::write(
            context.join("Containerfile"),
            format!("FROM {}\nADD ar.tar /\n", lab_ref(IMAGE)),
        )
        .expect("Containerfile");
        let tag = format!("localhost/walt-bench:{n}");
        let started = Instant::now();
        let mut tar = self.in_netns("sh");
        // `ssh ARGS… 'tar …' > ar.tar`, the ssh arguments those of [`Bench::ssh`] (after `ip netns exec NS ssh`).
        tar.arg("-c")
            .arg(format!(
                "ssh \"$@\" 'tar -C {UPPER_DIR} -cf - .' > {}",
                context.join("ar.tar").display()
            ))
            .arg("sh")
            .args(self.ssh(false).get_args().skip(4));
        must(run(&mut tar), "ssh node tar > ar.tar");
        let tarred = started.elapsed().as_secs_f64();
        let mut build = self.podman.command(self);
        build
            .args(["build", "--pull=never", "-t", &tag, "-f"])
            .arg(context.join("Containerfile"))
            .arg(&context);
        must(run(&mut build), "podman build");
        let built = started.elapsed().as_secs_f64();
        let mut push = self.podman.command(self);
        push.args(["push", "--tls-verify=false", "--authfile"])
            .arg(&self.auth_file)
            .arg(&tag)
            .arg(format!("docker://{}", lab_ref(&format!("save-podman-{n}"))));
        must(run(&mut push), "podman push");
        let took = started.elapsed().as_secs_f64();
        eprintln!(
            "bench:   WalT's way: ssh tar {tarred:.2} s, podman build {:.2} s, podman push {:.2} s",
            built - tarred,
            took - built
        );
        let mut rmi = self.podman.command(self);
        rmi.args(["rmi", &tag]);
        let _ = run(&mut rmi);
        let _ = std::fs::remove_dir_all(&context);
        took
    }
}

/// The image build rows of one architecture: the benchmark's context (`walt_tests::build_bench`) on
/// the lab's Debian image of that architecture.
struct BuildCase {
    arch: Arch,
    /// The build context, shared by walt and buildah.
    context: PathBuf,
    /// The base's layer digests (removed from walt's layer cache before a cold build).
    base_layers: Vec<String>,
}

impl BuildCase {
    /// How the rows name the architecture.
    fn label(&self) -> &'static str {
        match self.arch {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64 (qemu)",
        }
    }
}

impl Bench {
    /// The build context for `arch` on the lab's Debian image of that CPU (amd64's is the bench's
    /// image; arm64's, the runtime tests' arm64 root, is pushed here as `debian-arm64`).
    fn build_case(&self, arch: Arch) -> BuildCase {
        let (base, base_layers) = if arch == Arch::Amd64 {
            (IMAGE.to_owned(), self.layers.clone())
        } else {
            let (layout, layers, _) = debian_layout(arch);
            let image = format!("{IMAGE}-{}", arch.name());
            push_to_lab(&self.kube, &layout, std::slice::from_ref(&image));
            (image, layers)
        };
        let context = self.work.path().join(format!("build-{}", arch.name()));
        build_bench::write_context(&context, &lab_ref(&base)).unwrap_or_else(|e| panic!("{e}"));
        BuildCase {
            arch,
            context,
            base_layers,
        }
    }

    /// `kubectl walt image build --from-dir` of the case's context as `image`: cold (the base removed
    /// from walt's layer cache on the node; `image` is new, so no step is in the cache) or warm (an
    /// unchanged rebuild of `image`, which must push nothing). Its time, and the operators' peak RSS.
    fn build_ours(&self, case: &BuildCase, image: &str, cold: bool) -> (f64, u64) {
        if cold {
            forget_layers(&case.base_layers);
            settle_caches();
        }
        let context = case.context.display().to_string();
        let mut args = vec!["image", "build", "--from-dir", &context];
        if !cold {
            args.extend(["--overwrite", "--yes"]);
        }
        args.push(image);
        let operators = self.reset_operators();
        let mut command = self.walt(&args);
        let started = Instant::now();
        let output = command.output().expect("run kubectl walt image build");
        let took = started.elapsed().as_secs_f64();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let said = || format!("{stdout}{}", String::from_utf8_lossy(&output.stderr));
        assert!(
            output.status.success(),
            "kubectl walt image build {image}:\n{}",
            said()
        );
        let built = build_bench::built(&stdout).unwrap_or_else(|| {
            panic!(
                "kubectl walt image build {image} said no `Built` line:\n{}",
                said()
            )
        });
        if cold {
            assert_eq!(
                built.cached,
                0,
                "a cold build of a new image took steps from the cache:\n{}",
                said()
            );
        } else {
            assert_eq!(
                built.layers_pushed,
                0,
                "an unchanged rebuild pushes nothing:\n{}",
                said()
            );
        }
        let peak = operators
            .iter()
            .filter_map(|pid| bench::peak_rss_kib(*pid))
            .max()
            .unwrap_or_default();
        // The plugin's own lines add the build's time as the ImageBuild records it (pod to result)
        // and where the time went as the plugin saw it (pod start, attach, upload, build, tagging).
        let line = stdout
            .lines()
            .rev()
            .find(|l| l.starts_with("Built "))
            .unwrap_or_default();
        let stderr = String::from_utf8_lossy(&output.stderr);
        let split = stderr
            .lines()
            .rev()
            .find(|l| l.starts_with("Time: "))
            .unwrap_or("(no Time line)");
        eprintln!(
            "bench:   kubectl walt image build ({}, {}): {took:.2} s; {line}; {split}",
            case.label(),
            if cold { "cold" } else { "warm" },
        );
        (took, peak)
    }

    /// `buildah bud --layers` (runc, no network) + `buildah push` of the case's context to `image` in
    /// the lab registry, in the node's network namespace (the lab registry by its Service name, over plain HTTP, with the
    /// lab credential; the base pulled from there), with `storage`'s storage (empty for a cold build):
    /// the time of both, and the larger peak RSS (GNU time).
    fn build_buildah(&self, case: &BuildCase, storage: &Podman, image: &str) -> (f64, u64) {
        let tag = format!("localhost/walt-bench-{}", case.arch.name());
        // `ip netns exec` mounts a sysfs of its own, without /sys/fs/cgroup, where runc looks for
        // cgroups: the cgroup2 hierarchy is mounted there first (in that command's own mount
        // namespace, gone with it).
        let timed = [
            "sh",
            "-c",
            "mount -t cgroup2 cgroup2 /sys/fs/cgroup && exec \"$@\"",
            "sh",
            "time",
            "-f",
            "peak-rss-kib %M",
            "buildah",
        ];
        let mut bud = storage.tool(self, &timed);
        bud.args([
            "bud",
            "--layers",
            "--network",
            "none",
            "--tls-verify=false",
            "--authfile",
        ])
        .arg(&self.auth_file)
        .args(["--platform", &format!("linux/{}", case.arch.name()), "-t", &tag])
        .arg(&case.context);
        let (built, bud_peak) = run_timed(&mut bud, "buildah bud");
        let mut push = storage.tool(self, &timed);
        push.args(["push", "--tls-verify=false", "--authfile"])
            .arg(&self.auth_file)
            .arg(&tag)
            .arg(format!("docker://{}", lab_ref(image)));
        let (pushed, push_peak) = run_timed(&mut push, "buildah push");
        eprintln!("bench:   buildah bud {built:.2} s + push {pushed:.2} s to {image}");
        (built + pushed, bud_peak.max(push_peak))
    }

    /// The compressed size of `image` in the lab registry (`skopeo inspect --raw`).
    fn image_bytes(&self, image: &str) -> u64 {
        let mut inspect = self.in_netns("skopeo");
        inspect
            .args(["inspect", "--raw", "--tls-verify=false", "--authfile"])
            .arg(&self.auth_file)
            .arg(format!("docker://{}", lab_ref(image)));
        let raw = must(run(&mut inspect), &format!("skopeo inspect of {image}"));
        build_bench::layers_bytes(&raw).unwrap_or_else(|| panic!("{image}: no layer sizes in {raw}"))
    }

    /// One repetition of the build rows of `case` (`cold`, `warm`: its rows), walt's builds first or
    /// buildah's: each a cold build to a new image, then an unchanged rebuild; buildah in a new storage
    /// dir, removed after. Records the result sizes of this repetition.
    fn build_rows(&self, case: &BuildCase, rows: &mut [Row], (cold, warm): (usize, usize), ours_first: bool) {
        let n = self.next();
        let arch = case.arch.name();
        let ours = format!("build-{arch}-{n}");
        let theirs = format!("buildah-{arch}-{n}");
        let walt_side = |rows: &mut [Row]| {
            for (row, is_cold) in [(cold, true), (warm, false)] {
                let (took, peak) = self.build_ours(case, &ours, is_cold);
                rows[row].ours.push(took);
                rows[row].operator_rss_kib = rows[row].operator_rss_kib.max(Some(peak));
            }
        };
        let buildah_side = |rows: &mut [Row]| {
            let storage = Podman::new(self.work.path().join(format!("buildah-{n}")));
            for row in [cold, warm] {
                if row == cold {
                    settle_caches();
                }
                let (took, peak) = self.build_buildah(case, &storage, &theirs);
                rows[row].theirs.push(took);
                rows[row].reference_rss_kib = rows[row].reference_rss_kib.max(Some(peak));
            }
            storage.remove(self);
        };
        if ours_first {
            walt_side(rows);
            buildah_side(rows);
        } else {
            buildah_side(rows);
            walt_side(rows);
        }
        let sizes = Some((self.image_bytes(&ours), self.image_bytes(&theirs)));
        rows[cold].result_bytes = sizes;
        rows[warm].result_bytes = sizes;
    }
}

impl Bench {
    /// Saves what shows where the time went (the operators' logs, the events of the bench's
    /// namespaces) under `$WALT_CACHE/bench/`, and says where.
    fn keep_logs(&self) {
        let dir = images::cache_dir().join("bench");
        std::fs::create_dir_all(&dir).expect("bench log dir");
        let runtime = walt_crds::runtime_namespace(NS);
        let logs = [
            (
                "operator.log",
                vec![
                    "logs",
                    "-n",
                    lab::SYSTEM_NAMESPACE,
                    "-l",
                    "app.kubernetes.io/component=operator",
                    "--prefix",
                    "--tail=-1",
                ],
            ),
            (
                "events.txt",
                vec!["get", "events", "-A", "--sort-by=.lastTimestamp"],
            ),
            (
                "runtime-pods.txt",
                vec!["get", "pods", "-n", &runtime, "-o", "wide"],
            ),
        ];
        for (file, args) in logs {
            let text = run(self.kube.kubectl().args(&args)).unwrap_or_else(|e| e.to_string());
            std::fs::write(dir.join(file), text).expect("write a bench log");
        }
        eprintln!("bench: operator logs and events in {}", dir.display());
    }
}

/// podman with its own storage and configuration (runc, no network, cgroupfs, file events).
struct Podman {
    dir: PathBuf,
}

impl Podman {
    fn new(dir: PathBuf) -> Podman {
        std::fs::create_dir_all(&dir).expect("podman dir");
        std::fs::write(
            dir.join("containers.conf"),
            "[containers]\ndefault_ulimits = [\"nofile=20000:20000\", \"nproc=4096:4096\"]\nnetns = \"none\"\n\
             [engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n",
        )
        .expect("containers.conf");
        Podman { dir }
    }

    /// podman in the node's network namespace (the lab registry's Service name resolves there).
    fn command(&self, bench: &Bench) -> Command {
        self.tool(bench, &["podman"])
    }

    /// `program` (podman or buildah, after any wrapper such as GNU time) in the node's network
    /// namespace with this storage and configuration.
    fn tool(&self, bench: &Bench, program: &[&str]) -> Command {
        let (first, rest) = program.split_first().expect("a program");
        let mut command = bench.in_netns(first);
        command
            .args(rest)
            .env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .arg("--root")
            .arg(self.dir.join("root"))
            .arg("--runroot")
            .arg(self.dir.join("runroot"))
            .args(["--storage-driver", "overlay"]);
        command
    }

    /// Removes everything in this storage, then its directory (a cold build starts from nothing).
    fn remove(&self, bench: &Bench) {
        let mut rmi = self.tool(bench, &["buildah"]);
        rmi.args(["rmi", "--all", "--force"]);
        must(run(&mut rmi), "buildah rmi --all");
        std::fs::remove_dir_all(&self.dir)
            .unwrap_or_else(|e| panic!("removing buildah's storage {}: {e}", self.dir.display()));
    }
}

/// The Debian image of `arch`: the debootstrap root as one layer, bash as its command (amd64's
/// labelled for the `pc-x86-64` model, which the virtual nodes boot); returns the layout and the
/// digests of its layers and config.
fn debian_layout(arch: Arch) -> (OciLayout, Vec<String>, String) {
    let rootfs = images::debian_systemd_rootfs(arch).unwrap_or_else(|e| panic!("{e}"));
    let layout = OciLayout::new().expect("layout");
    layout.new_image("empty", arch).expect("umoci new");
    layout
        .add_layer_from_dir("empty", "base", &rootfs)
        .expect("the Debian layer");
    if arch == Arch::Amd64 {
        layout
            .set_label("base", "walt.node.models", "pc-x86-64")
            .expect("label");
    }
    layout
        .configure("base", &["--config.cmd=/bin/bash"])
        .expect("cmd");
    let manifest = layout
        .read_json_blob(&layout.digest("base").expect("digest"))
        .expect("manifest");
    let layers = manifest["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .filter_map(|l| l["digest"].as_str().map(str::to_owned))
        .collect();
    let config = manifest["config"]["digest"]
        .as_str()
        .expect("config digest")
        .trim_start_matches("sha256:")
        .to_owned();
    (layout, layers, config)
}

/// Pushes the image tagged `base` in `layout` to the lab registry as each of `images` (`:latest` in
/// the bench's namespace), through the lab registry's address on this machine.
fn push_to_lab(kube: &Kube, layout: &OciLayout, images: &[String]) {
    let registry = lab::LabRegistry::open(kube).expect("reach the lab registry");
    for image in images {
        let reference = format!("{}/walt/{NS}/{image}:latest", registry.address());
        let auth = registry.auth(&reference).expect("a token to push");
        image_build::push_layout(layout.path(), "base", &reference, true, &auth)
            .unwrap_or_else(|e| panic!("push {reference}: {e}"));
    }
}

fn set_up(cluster: Cluster, profile: BuildProfile) -> Bench {
    let kube = Kube::new(cluster.kubeconfig()).expect("kubectl");
    let node_registry = cluster.registry().expect("node registry");
    let netns = cluster.node_netns().expect("node network namespace").to_owned();
    lab::install_release(&kube, &node_registry, profile).unwrap_or_else(|e| panic!("install walt: {e}"));
    must(
        run(kube.kubectl().args([
            "rollout",
            "status",
            "deployment/walt-operator",
            "-n",
            lab::SYSTEM_NAMESPACE,
            "--timeout=300s",
        ])),
        "the operator rolls out",
    );
    let work = tempfile::tempdir_in(images::cache_dir()).expect("work dir");

    // The same image in the node registry (for the kubelet) and in the lab registry (for walt).
    let started = Instant::now();
    let (layout, layers, config) = debian_layout(Arch::Amd64);
    let run_image = format!("{node_registry}/{NS}/{IMAGE}:1");
    image_build::push_layout(layout.path(), "base", &run_image, true, &RegistryAuth::Anonymous)
        .unwrap_or_else(|e| panic!("push {run_image}: {e}"));
    push_to_lab(&kube, &layout, &[IMAGE.to_owned()]);
    eprintln!(
        "bench: Debian image built and pushed twice in {:.0} s",
        started.elapsed().as_secs_f64()
    );

    // The tenant: namespace, the Image, a virtual node booting it.
    kube.apply(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NS}\n  labels:\n    pod-security.kubernetes.io/enforce: baseline\n\
         ---\napiVersion: walt.dev/v1alpha1\nkind: Image\nmetadata: {{name: {IMAGE}, namespace: {NS}}}\nspec: {{}}\n\
         ---\napiVersion: walt.dev/v1alpha1\nkind: Node\nmetadata: {{name: {NODE}, namespace: {NS}}}\n\
         spec:\n  model: pc-x86-64\n  image: {IMAGE}\n  bootMode: volatile\n  virtual: {{architecture: amd64, memory: 1Gi, cpu: 500m}}\n"
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    for (object, path, want) in [
        (
            format!("image.walt.dev/{IMAGE}"),
            "{.status.conditions[?(@.type==\"Ready\")].status}",
            "True",
        ),
        (format!("nodes.walt.dev/{NODE}"), "{.status.phase}", "Ready"),
    ] {
        Wait::new(&format!("{object} {path} to be {want}"), Duration::from_mins(5))
            .every(Duration::from_secs(1))
            .until(|| {
                let now =
                    run(kube
                        .kubectl()
                        .args(["get", &object, "-n", NS, "-o", &format!("jsonpath={path}")]))
                    .unwrap_or_default();
                if now == want {
                    Poll::Ready(())
                } else {
                    Poll::Pending(now)
                }
            })
            .unwrap_or_else(|e| {
                let describe = run(kube.kubectl().args(["describe", &object, "-n", NS])).unwrap_or_default();
                panic!("{e}\n{describe}")
            });
    }
    let address = must(
        run(kube.kubectl().args([
            "get",
            &format!("nodes.walt.dev/{NODE}"),
            "-n",
            NS,
            "-o",
            "jsonpath={.status.address}",
        ])),
        "the node's address",
    );
    let node_address = address
        .rsplit_once(':')
        .map_or(address.as_str(), |(host, _)| host)
        .to_owned();

    // The node key and the lab registry credential, for ssh, the bare save and podman.
    let node_key = work.path().join("node_key");
    let key = must(
        run(kube.kubectl().args([
            "get",
            "secret",
            "walt-node-key",
            "-n",
            lab::SYSTEM_NAMESPACE,
            "-o",
            "jsonpath={.data.ssh-privatekey}",
        ])),
        "the node key",
    );
    use base64::Engine as _;
    let key = base64::engine::general_purpose::STANDARD
        .decode(key.trim())
        .expect("base64 node key");
    std::fs::write(&node_key, key).expect("write the node key");
    std::fs::set_permissions(&node_key, std::fs::Permissions::from_mode(0o600)).expect("chmod the node key");
    let credential = lab::registry_creds(&kube).expect("the lab registry credential");
    let auth_file = work.path().join("auth.json");
    std::fs::write(
        &auth_file,
        serde_json::json!({"auths": {lab::lab_registry_for_pods(): {
            "auth": base64::engine::general_purpose::STANDARD.encode(credential)
        }}})
        .to_string(),
    )
    .expect("auth file");
    let dns = must(
        run(kube.kubectl().args([
            "get",
            "service",
            "kube-dns",
            "-n",
            "kube-system",
            "-o",
            "jsonpath={.spec.clusterIP}",
        ])),
        "the cluster DNS address",
    );
    // Its own programs reach ClusterIPs: the harness routes the Service range in the node's namespace.
    let etc = PathBuf::from("/etc/netns").join(&netns);
    std::fs::create_dir_all(&etc).expect("/etc/netns dir");
    std::fs::write(
        etc.join("resolv.conf"),
        format!("nameserver {dns}\nsearch cluster.local\noptions ndots:5\n"),
    )
    .expect("resolv.conf");
    let operator_bin = walt_tests::deploy::target_dir()
        .join(image_build::Arch::host().rust_target())
        .join(profile.name())
        .join("walt-operator");
    assert!(operator_bin.is_file(), "{} is missing", operator_bin.display());
    let podman = Podman::new(work.path().join("podman"));
    let bench = Bench {
        cluster,
        kube,
        netns,
        work,
        run_image,
        layers,
        config,
        node_key,
        auth_file,
        node_address,
        operator_bin,
        podman,
        counter: Cell::new(0),
        _etc: NetnsEtc(etc),
    };
    // WalT's server keeps its images in podman's storage: the base is there before a save.
    let mut pull = bench.podman.command(&bench);
    pull.args(["pull", "--tls-verify=false", "--authfile"])
        .arg(&bench.auth_file)
        .arg(lab_ref(IMAGE));
    must(run(&mut pull), "podman pull of the base");
    bench
}

/// The walt image's build profile ([`bench::PROFILE_ENV`]; default release, what is shipped).
fn profile_from_env() -> BuildProfile {
    std::env::var(bench::PROFILE_ENV)
        .ok()
        .filter(|text| !text.trim().is_empty())
        .map_or(Ok(BuildProfile::Release), |text| BuildProfile::parse(text.trim()))
        .unwrap_or_else(|e| panic!("{}: {e}", bench::PROFILE_ENV))
}

fn require_cluster_tier() {
    match cluster_tier_skip_reason() {
        Ok(Some(reason)) => panic!("the benchmark needs the cluster tier: {reason}"),
        Ok(None) => {}
        Err(error) => panic!("cluster tier prerequisites: {error}"),
    }
}

#[test]
#[ignore = "benchmark: run with `cargo xtask bench`"]
fn user_felt_speed() {
    require_cluster_tier();
    let reps =
        bench::reps_from(std::env::var(bench::REPS_ENV).ok().as_deref()).unwrap_or_else(|e| panic!("{e}"));
    let groups =
        bench::groups_from(std::env::var(bench::ONLY_ENV).ok().as_deref()).unwrap_or_else(|e| panic!("{e}"));
    let measures = |group: &str| groups.contains(&group);
    let cluster = Cluster::start(ClusterOptions::cluster()).expect("start the cluster tier");
    let bench = set_up(cluster, profile_from_env());
    let mut rows = vec![
        Row {
            what: "image shell, cold".into(),
            reference: "kubectl run -it --rm, cold".into(),
            goal: Some(1.0),
            ..Row::default()
        },
        Row {
            what: "image shell, warm".into(),
            reference: "kubectl run -it --rm, warm".into(),
            goal: Some(1.0),
            ..Row::default()
        },
        Row {
            what: "node shell".into(),
            reference: "ssh to the node".into(),
            ..Row::default()
        },
        Row {
            what: "node save 256 MiB".into(),
            reference: "walt-operator save (bare)".into(),
            goal: Some(1.1),
            ..Row::default()
        },
        Row {
            what: "node save 256 MiB".into(),
            reference: "WalT: ssh tar; podman build+push".into(),
            ..Row::default()
        },
    ];
    // The image build rows: cold and warm per architecture, after the rows above.
    let cases = [bench.build_case(Arch::Amd64), bench.build_case(Arch::Arm64)];
    for case in &cases {
        for state in ["cold", "warm"] {
            rows.push(Row {
                what: format!("image build {}, {state}", case.label()),
                reference: format!("buildah bud --layers+push, {state}"),
                ..Row::default()
            });
        }
    }
    for rep in 0..reps {
        eprintln!("bench: repetition {}/{reps}", rep + 1);
        let ours_first = rep % 2 == 0;
        for (row, cold) in [(0, true), (1, false)]
            .into_iter()
            .filter(|_| measures("image-shell"))
        {
            let (ours, theirs) = if ours_first {
                let ours = bench.image_shell(cold);
                (ours, bench.kubectl_run(cold))
            } else {
                let theirs = bench.kubectl_run(cold);
                (bench.image_shell(cold), theirs)
            };
            eprintln!("bench:   {}: {ours:.2} s vs {theirs:.2} s", rows[row].what);
            rows[row].ours.push(ours);
            rows[row].theirs.push(theirs);
        }
        if measures("node-shell") {
            let (ours, theirs) = if ours_first {
                let ours = bench.node_shell();
                (ours, bench.ssh_shell())
            } else {
                let theirs = bench.ssh_shell();
                (bench.node_shell(), theirs)
            };
            eprintln!("bench:   node shell: {ours:.2} s vs ssh {theirs:.2} s");
            rows[2].ours.push(ours);
            rows[2].theirs.push(theirs);
        }
        let mut saves = |which: usize| match which {
            0 => {
                bench.change_node();
                let (took, peak) = bench.save_ours();
                rows[3].ours.push(took);
                rows[4].ours.push(took);
                for row in [3, 4] {
                    rows[row].operator_rss_kib = rows[row].operator_rss_kib.max(Some(peak));
                }
            }
            1 => {
                bench.change_node();
                let (took, peak) = bench.save_bare();
                rows[3].theirs.push(took);
                rows[3].reference_rss_kib = rows[3].reference_rss_kib.max(Some(peak));
            }
            _ => {
                bench.change_node();
                rows[4].theirs.push(bench.save_podman());
            }
        };
        let order: [usize; 3] = if ours_first { [0, 1, 2] } else { [2, 1, 0] };
        for which in order.into_iter().filter(|_| measures("node-save")) {
            saves(which);
        }
        for (i, case) in cases.iter().enumerate().filter(|_| measures("image-build")) {
            let cold = 5 + 2 * i;
            bench.build_rows(case, &mut rows, (cold, cold + 1), ours_first);
        }
    }
    println!("\n{}", bench::render(&rows, reps));
    bench.keep_logs();
}

/// Image shells opened at once by [`load_of_shells_and_saves`].
const LOAD_SHELLS: usize = 20;
/// Node saves started at once by [`load_of_shells_and_saves`] (one per virtual node).
const LOAD_SAVES: usize = 10;
/// What each loaded node writes before its save (a file of this many MiB).
const LOAD_SAVE_MIB: usize = 16;
/// The operator's reconcile-duration histogram (`/metrics`).
const RECONCILE_HISTOGRAM: &str = "walt_reconcile_duration_seconds";

/// What one user of the load saw: time to the prompt (or to the command's end) and the terminal.
struct UserRun {
    took: f64,
    code: i32,
    shown: String,
}

impl Bench {
    /// The operators' `/metrics` text, scraped from their pods (in the node's network namespace).
    fn metrics(&self) -> String {
        let pods = self.kubectl(&[
            "get",
            "pods",
            "-n",
            lab::SYSTEM_NAMESPACE,
            "-l",
            "app.kubernetes.io/component=operator",
            "-o",
            "jsonpath={range .items[*]}{.status.podIP}{\"\\n\"}{end}",
        ]);
        pods.lines()
            .filter(|ip| !ip.trim().is_empty())
            .map(|ip| {
                let mut curl = self.in_netns("curl");
                curl.args([
                    "-sf",
                    "--max-time",
                    "10",
                    &format!("http://{}:8080/metrics", ip.trim()),
                ]);
                must(run(&mut curl), "scraping the operator's /metrics")
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits until every object of `kind` named in `names` has condition Ready=True, or panics with
    /// what the objects say.
    fn wait_ready(&self, kind: &str, names: &[String], within: Duration) {
        let mut args = vec!["wait", "-n", NS, "--for=condition=Ready", "--timeout"];
        let timeout = format!("{}s", within.as_secs());
        args.push(&timeout);
        let qualified: Vec<String> = names.iter().map(|n| format!("{kind}/{n}")).collect();
        args.extend(qualified.iter().map(String::as_str));
        if let Err(error) = run(self.kube.kubectl().args(&args)) {
            let mut describe = vec!["describe", "-n", NS];
            describe.extend(qualified.iter().map(String::as_str));
            let said = run(self.kube.kubectl().args(&describe)).unwrap_or_default();
            panic!("{kind} not all Ready: {error}\n{said}");
        }
    }

    /// The tar listing of the top layer of `image` in the lab registry (what its last change wrote).
    fn top_layer_listing(&self, image: &str) -> String {
        let layout = OciLayout::new().expect("layout");
        let mut copy = self.in_netns("skopeo");
        copy.args(["copy", "--quiet", "--src-tls-verify=false", "--src-authfile"])
            .arg(&self.auth_file)
            .arg(format!("docker://{}", lab_ref(image)))
            .arg(format!("oci:{}:top", layout.path().display()));
        must(run(&mut copy), &format!("skopeo copy of {image}"));
        let manifest = layout
            .read_json_blob(&layout.digest("top").expect("digest"))
            .expect("manifest");
        let top = manifest["layers"]
            .as_array()
            .and_then(|layers| layers.last())
            .and_then(|layer| layer["digest"].as_str())
            .unwrap_or_else(|| panic!("{image} has no layer: {manifest}"))
            .trim_start_matches("sha256:")
            .to_owned();
        must(
            run(Command::new("tar")
                .arg("-tf")
                .arg(layout.path().join("blobs/sha256").join(top))),
            &format!("listing the top layer of {image}"),
        )
    }

    /// The time since `started` until every object of `kind` named in `names` is Ready.
    fn ready_after(&self, kind: &str, names: &[String], started: Instant) -> f64 {
        self.wait_ready(kind, names, Duration::from_mins(15));
        started.elapsed().as_secs_f64()
    }

    /// Resets the operators' peak RSS; returns their PIDs.
    fn reset_operators(&self) -> Vec<u32> {
        let operators = self.operators();
        for pid in &operators {
            bench::reset_peak_rss(*pid).unwrap_or_else(|e| panic!("{e}"));
        }
        operators
    }

    /// Asserts nothing of the load is left behind: no shell pod, no unfinished ShellSession or
    /// NodeSave (the per-image lock is computed from those).
    fn assert_nothing_left(&self) {
        self.wait_gone(
            "every shell pod of the load to be deleted",
            &walt_crds::runtime_namespace(NS),
            &["-l", "walt.dev/shell-session"],
        );
        let sessions = self.kubectl(&[
            "get",
            "shellsessions",
            "-n",
            NS,
            "-o",
            "jsonpath={range .items[*]}{.metadata.name}={.status.phase}{\"\\n\"}{end}",
        ]);
        assert!(
            sessions
                .lines()
                .all(|l| l.trim().is_empty() || l.ends_with("=Succeeded")),
            "ShellSessions left unfinished:\n{sessions}"
        );
        let saves = self.kubectl(&[
            "get",
            "nodesaves",
            "-n",
            NS,
            "-o",
            "jsonpath={range .items[*]}{.metadata.name}={.status.phase}{\"\\n\"}{end}",
        ]);
        assert!(
            saves
                .lines()
                .all(|l| l.trim().is_empty() || l.ends_with("=Succeeded")),
            "NodeSaves left unfinished or failed:\n{saves}"
        );
    }
}

/// Opens an image shell of `image`, times it to the prompt, writes `/root/<marker>` and saves the
/// session as `save_as` through the exit dialogue.
fn shell_and_save(command: &Command, image: &str, marker: &str, save_as: &str) -> UserRun {
    let (took, mut pty): (Duration, Pty) =
        bench::time_to_answer(command, Duration::from_mins(10)).unwrap_or_else(|e| panic!("{image}: {e}"));
    pty.send(&format!("echo {marker} > /root/{marker}; exit\n"));
    pty.expect_within(
        &format!("Save as a new image, or press Enter to overwrite {image}:"),
        Duration::from_mins(5),
    );
    pty.send(&format!("{save_as}\n"));
    let (code, shown) = pty.wait_within(Duration::from_mins(10));
    UserRun {
        took: took.as_secs_f64(),
        code,
        shown,
    }
}

/// Runs `users` on threads started together; their results in order.
fn all_at_once<F>(users: Vec<F>) -> Vec<UserRun>
where
    F: FnOnce() -> UserRun + Send + 'static,
{
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(users.len()));
    let handles: Vec<_> = users
        .into_iter()
        .map(|user| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                user()
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|handle| {
            handle
                .join()
                .unwrap_or_else(|_| panic!("a user of the load panicked"))
        })
        .collect()
}

/// One phase of the load: `users` started together, then until every Image of `results` (one per
/// user, in order) is Ready; asserts each user's command succeeded and prints the figures.
fn load_phase<F>(bench: &Bench, what: &str, users: Vec<F>, results: &[String], kinds: &[&str])
where
    F: FnOnce() -> UserRun + Send + 'static,
{
    let operators = bench.reset_operators();
    let before = bench.metrics();
    let started = Instant::now();
    let runs = all_at_once(users);
    let ready = bench.ready_after("image.walt.dev", results, started);
    let peak = operators
        .iter()
        .filter_map(|pid| bench::peak_rss_kib(*pid))
        .max()
        .unwrap_or_default();
    let after = bench.metrics();
    for (run, result) in runs.iter().zip(results) {
        assert_eq!(
            run.code, 0,
            "{what}: the user making {result} failed:\n{}",
            run.shown
        );
    }
    let times: Vec<f64> = runs.iter().map(|r| r.took).collect();
    report(what, &times, ready, peak, &before, &after, kinds);
}

/// Prints one line of the load figures.
fn report(
    what: &str,
    runs: &[f64],
    last_done: f64,
    peak_kib: u64,
    before: &str,
    after: &str,
    kinds: &[&str],
) {
    let latency = kinds
        .iter()
        .map(|kind| {
            let buckets = |text: &str| bench::histogram_buckets(text, RECONCILE_HISTOGRAM, kind);
            let (b, a) = (buckets(before), buckets(after));
            let at = |q| bench::quantile_text(bench::histogram_quantile(&b, &a, q), &a);
            format!("{kind} p50 {} p99 {}", at(0.5), at(0.99))
        })
        .collect::<Vec<_>>()
        .join(", ");
    let at = |q| bench::quantile(runs, q).unwrap_or_default();
    println!(
        "load: {what}: each p50 {:.2} s, p99 {:.2} s, slowest {:.2} s; all done {last_done:.2} s; \
         operator peak RSS {:.1} MiB; reconcile latency: {latency}",
        at(0.5),
        at(0.99),
        at(1.0),
        bench::kib_to_mib(peak_kib),
    );
}

/// Issue 17's load figures (figures, not pass/fail; everything asserted is what must hold under load):
/// [`LOAD_SHELLS`] users open `kubectl walt image shell` at once (each on its own image: one shell per
/// image is WalT's rule), write a file and save it as a new image; then [`LOAD_SAVES`] virtual nodes are
/// saved at once with `kubectl walt node save`. Printed: time to the prompt (p50, p99, the last),
/// time until every result is Ready, the operator's peak RSS, its reconcile latency (p50/p99, from
/// its own histogram between two scrapes). Asserted: every change is in its image's top layer, no shell
/// pod or unfinished object is left. Run: `cargo xtask bench --load`.
#[test]
#[ignore = "benchmark: run with `cargo xtask bench --load`"]
fn load_of_shells_and_saves() {
    require_cluster_tier();
    let cluster = Cluster::start(ClusterOptions::cluster()).expect("start the cluster tier");
    let bench = set_up(cluster, profile_from_env());

    // The shells' images: the Debian image under one name per user (tags of the same digest).
    let (layout, _, _) = debian_layout(Arch::Amd64);
    let shell_images: Vec<String> = (0..LOAD_SHELLS).map(|i| format!("load-{i}")).collect();
    push_to_lab(&bench.kube, &layout, &shell_images);
    // The saved nodes: small virtual nodes booting the same image.
    let nodes: Vec<String> = (0..LOAD_SAVES).map(|i| format!("vload-{i}")).collect();
    let images = shell_images.iter().map(|image| {
        format!("apiVersion: walt.dev/v1alpha1\nkind: Image\nmetadata: {{name: {image}, namespace: {NS}}}\nspec: {{}}\n")
    });
    let virtual_nodes = nodes.iter().map(|node| {
        format!(
            "apiVersion: walt.dev/v1alpha1\nkind: Node\nmetadata: {{name: {node}, namespace: {NS}}}\n\
             spec:\n  model: pc-x86-64\n  image: {IMAGE}\n  bootMode: volatile\n  virtual: {{architecture: amd64, memory: 256Mi, cpu: 100m}}\n"
        )
    });
    // The virtual nodes are made after the shells' phase: ten images unpacking and booting at once
    // beside it would measure their boot, not the shells (on 2 cores they starved the operator).
    let images = images.collect::<Vec<_>>().join("---\n");
    bench.kube.apply(&images).unwrap_or_else(|e| panic!("{e}"));
    bench.wait_ready("image.walt.dev", &shell_images, Duration::from_mins(5));
    // A first shell fills walt's layer cache on the node: the load measures shells, not one download.
    bench.image_shell(false);

    // 1. The shells, all at once.
    let saved_shells: Vec<String> = (0..LOAD_SHELLS).map(|i| format!("load-{i}-saved")).collect();
    let users = shell_images
        .iter()
        .zip(&saved_shells)
        .map(|(image, save_as)| {
            let command = bench.walt(&["image", "shell", image]);
            let (image, save_as) = (image.clone(), save_as.clone());
            move || shell_and_save(&command, &image, &format!("{image}-was-here"), &save_as)
        })
        .collect();
    load_phase(
        &bench,
        &format!("{LOAD_SHELLS} image shells at once, to the prompt"),
        users,
        &saved_shells,
        &["ShellSession", "Image"],
    );
    for (image, save_as) in shell_images.iter().zip(&saved_shells) {
        let listing = bench.top_layer_listing(save_as);
        assert!(
            listing
                .lines()
                .any(|l| l.trim_start_matches("./") == format!("root/{image}-was-here")),
            "{save_as} lacks the file its shell wrote; its top layer:\n{listing}"
        );
    }

    // 2. The node saves, all at once.
    let virtual_nodes = virtual_nodes.collect::<Vec<_>>().join("---\n");
    bench.kube.apply(&virtual_nodes).unwrap_or_else(|e| panic!("{e}"));
    Wait::new("the load's virtual Nodes to be Ready", Duration::from_mins(10))
        .every(Duration::from_secs(2))
        .until(|| {
            let phases = bench.kubectl(&[
                "get",
                "nodes.walt.dev",
                "-n",
                NS,
                "-o",
                "jsonpath={range .items[*]}{.metadata.name}={.status.phase}{\"\\n\"}{end}",
            ]);
            let waiting: Vec<&String> = nodes
                .iter()
                .filter(|node| !phases.lines().any(|line| line == format!("{node}=Ready")))
                .collect();
            if waiting.is_empty() {
                Poll::Ready(())
            } else {
                Poll::Pending(phases.clone())
            }
        })
        .unwrap_or_else(|e| panic!("{e}"));
    for node in &nodes {
        let address = bench.kubectl(&[
            "get",
            &format!("nodes.walt.dev/{node}"),
            "-n",
            NS,
            "-o",
            "jsonpath={.status.address}",
        ]);
        let host = address.rsplit_once(':').map_or(address.as_str(), |(h, _)| h);
        // A virtual Node turns Ready when its pod runs; its SSH server (the pod's readiness, the
        // Service's endpoint) comes once the image is unpacked and booted: with `cpu: 50m` (a limit)
        // not within minutes ("Connection refused" from the Service). Ten nodes' CPU must fit the
        // cluster node's 2 cores beside the bench's own node (500m): at 250m five stayed Pending.
        Wait::new(&format!("writing on {node}"), Duration::from_mins(5))
            .every(Duration::from_secs(2))
            .until(|| {
                let mut write = bench.ssh_to(host, false);
                write.arg(format!(
                    "mkdir -p /root/load && head -c {} /dev/urandom > /root/load/{node} && sync",
                    LOAD_SAVE_MIB << 20
                ));
                match run(&mut write) {
                    Ok(_) => Poll::Ready(()),
                    Err(error) => Poll::Pending(error.to_string()),
                }
            })
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let saved_nodes: Vec<String> = nodes.iter().map(|n| format!("{n}-saved")).collect();
    let users = nodes
        .iter()
        .zip(&saved_nodes)
        .map(|(node, target)| {
            let mut command = bench.walt(&["node", "save", node, target]);
            move || {
                let started = Instant::now();
                let output = command.output().expect("run kubectl walt node save");
                UserRun {
                    took: started.elapsed().as_secs_f64(),
                    code: output.status.code().unwrap_or(-1),
                    shown: format!(
                        "{}{}",
                        String::from_utf8_lossy(&output.stdout),
                        String::from_utf8_lossy(&output.stderr)
                    ),
                }
            }
        })
        .collect();
    load_phase(
        &bench,
        &format!("{LOAD_SAVES} node saves of {LOAD_SAVE_MIB} MiB at once, the command"),
        users,
        &saved_nodes,
        &["NodeSave", "Node", "Image"],
    );
    for (node, target) in nodes.iter().zip(&saved_nodes) {
        let listing = bench.top_layer_listing(target);
        assert!(
            listing
                .lines()
                .any(|l| l.trim_start_matches("./") == format!("root/load/{node}")),
            "{target} lacks the file written on {node}; its top layer:\n{listing}"
        );
    }
    bench.assert_nothing_left();
    bench.keep_logs();
}
