//! Benchmarks of the `ssh` module against a real sshd node (root; figures, not pass/fail):
//!
//! ```text
//! cargo build -p walt-operator --bins --examples
//! cargo run -p walt-operator --example ssh_bench -- gateway   # 1 GiB relay + keystroke round-trip
//! cargo run -p walt-operator --example ssh_bench -- save      # node save of a 1 GiB upper dir, pushed
//! cargo run -p walt-operator --example ssh_bench -- vnode     # keystroke round-trip: vnode vs sshd
//! ```
//! Each measures walt and its reference side by side, in the same run, and prints the ratio.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use walt_operator::ssh::client::{self, BoxedStream, Connector, HostKeyPolicy, NodeTarget, Transport};
use walt_operator::ssh::gateway::{Authorization, Authorizations, Gateway, GatewayConfig};
use walt_tests::sshnode::{NodeRoot, SshNode, SshNodeBuilder, keygen};

const GIB: u64 = 1 << 30;

fn connector(node: &SshNode) -> Connector {
    let lab = node.lab_netns().to_owned();
    Arc::new(move |host: String, port: u16| {
        let lab = lab.clone();
        Box::pin(async move {
            let address: SocketAddr = format!("{host}:{port}").parse().map_err(io::Error::other)?;
            let stream =
                tokio::task::spawn_blocking(move || walt_tests::sshnode::connect_in_netns(&lab, address))
                    .await
                    .map_err(io::Error::other)??;
            stream.set_nonblocking(true)?;
            stream.set_nodelay(true)?;
            Ok(Box::new(tokio::net::TcpStream::from_std(stream)?) as BoxedStream)
        })
    })
}

fn timed(mut command: Command) -> f64 {
    let start = Instant::now();
    let status = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .expect("run");
    assert!(status.success(), "{command:?} failed");
    start.elapsed().as_secs_f64()
}

/// Keystroke round-trips: one byte to `cat` on a PTY, wait for its echo; p50 in ms.
fn keystrokes(ssh: &Command) -> f64 {
    let mut args: Vec<String> = vec![ssh.get_program().to_string_lossy().into_owned()];
    args.extend(ssh.get_args().map(|a| a.to_string_lossy().into_owned()));
    args.extend(["-tt".into(), "stty raw -echo; cat".into()]);
    let script = r#"
import json, os, pty, select, sys, time
args = json.loads(sys.argv[1])
pid, fd = pty.fork()
if pid == 0:
    os.execvp(args[0], args)
def read_until(marker, timeout):
    got, end = b"", time.time() + timeout
    while marker not in got:
        ready, _, _ = select.select([fd], [], [], max(0, end - time.time()))
        if not ready:
            raise SystemExit("timed out waiting for %r, got %r" % (marker, got))
        got += os.read(fd, 4096)
    return got
time.sleep(2)
while select.select([fd], [], [], 0.2)[0]:
    os.read(fd, 4096)
samples = []
for i in range(300):
    t = time.perf_counter()
    os.write(fd, b"x")
    read_until(b"x", 5)
    samples.append((time.perf_counter() - t) * 1000)
samples.sort()
print(samples[len(samples) // 2])
os.kill(pid, 9)
"#;
    // Drain what the remote prints first (the stty, maybe a prompt) by waiting; then measure.
    let output = Command::new("python3")
        .args(["-c", script, &serde_json::to_string(&args).expect("json")])
        .output()
        .expect("python3");
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .unwrap_or(f64::NAN)
}

fn gateway_bench() {
    let node = SshNode::busybox().expect("node");
    let work = tempfile::tempdir().expect("tempdir");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let host_key = keygen(work.path(), "gateway_host");
    let user_key = keygen(work.path(), "user");
    let mut config = GatewayConfig::new(
        client::load_key_file(&host_key).expect("key"),
        client::load_key_file(&node.client_key()).expect("key"),
    );
    config.node_transport = Transport::Connector(connector(&node));
    let authorizations = Authorizations::new();
    let target: NodeTarget = format!("root@{}:22", node.address()).parse().expect("target");
    authorizations.add(Authorization {
        session_id: "bench".into(),
        node: target,
        node_host_key: HostKeyPolicy::Pinned(client::parse_public_key(node.host_public_key()).expect("key")),
        public_key: client::parse_public_key(
            &std::fs::read_to_string(user_key.with_extension("pub")).expect("pub"),
        )
        .expect("key"),
        expires_at: SystemTime::now() + Duration::from_hours(1),
    });
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let address = listener.local_addr().expect("address");
    runtime.spawn(Gateway::new(config, authorizations).serve(listener));
    let known = work.path().join("known_hosts");
    std::fs::write(
        &known,
        format!(
            "[127.0.0.1]:{} {}",
            address.port(),
            std::fs::read_to_string(host_key.with_extension("pub")).expect("pub")
        ),
    )
    .expect("write");
    let through_gateway = || {
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
                "LogLevel=ERROR",
                "-i",
            ])
            .arg(&user_key)
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", known.display()))
            .args(["-p", &address.port().to_string(), "bench@127.0.0.1"]);
        command
    };
    let transfer = format!("head -c {GIB} /dev/zero");
    // Warm up both paths, then alternate.
    let _ = timed({
        let mut c = node.ssh();
        c.arg("true");
        c
    });
    let mut direct = Vec::new();
    let mut relayed = Vec::new();
    for _ in 0..3 {
        direct.push(timed({
            let mut c = node.ssh();
            c.arg(&transfer);
            c
        }));
        relayed.push(timed({
            let mut c = through_gateway();
            c.arg(&transfer);
            c
        }));
    }
    let best = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    let (d, g) = (best(&direct), best(&relayed));
    println!(
        "relay 1 GiB: direct ssh {d:.2} s ({:.0} MiB/s), through the gateway {g:.2} s ({:.0} MiB/s): {:.2}x throughput",
        1024.0 / d,
        1024.0 / g,
        d / g
    );
    let direct_rtt = keystrokes(&node.ssh());
    let gateway_rtt = keystrokes(&through_gateway());
    println!(
        "keystroke round-trip p50: direct {direct_rtt:.3} ms, through the gateway {gateway_rtt:.3} ms: +{:.3} ms",
        gateway_rtt - direct_rtt
    );
}

fn save_bench() {
    let node = SshNodeBuilder::new(NodeRoot::HostRoot)
        .upper_size("3g")
        .start()
        .expect("node");
    // 1 GiB: 32 files of 16 MiB of random data, 32 of 16 MiB of text, and 20,000 small files.
    node.run(
        "set -e; mkdir -p /data/rand /data/text /data/small; \
         for i in $(seq 32); do head -c 16777216 /dev/urandom > /data/rand/$i; done; \
         for i in $(seq 32); do yes \"walt node save benchmark line $i\" | head -c 16777216 > /data/text/$i; done; \
         for i in $(seq 20000); do echo $i > /data/small/$i; done",
    )
    .expect("fill the upper dir");
    // target/debug/examples/ssh_bench → target/debug/walt-operator (built by `cargo build --bins`).
    let binary = walt_operator_binary();
    let binary = binary.display();
    // The loopback registry the save pushes to, with a base image to push on top of.
    let registry = walt_tests::registry::Registry::start().expect("registry");
    let layout = walt_tests::images::OciLayout::busybox(walt_tests::images::Arch::Amd64).expect("base image");
    layout
        .push("base", &registry, "bench/base:1")
        .expect("push the base");
    let base = registry.reference("bench/base:1");
    let reference = format!(
        "{} 'tar -C /run/walt/rootfs/mnt/fs_rw -cf - .' | gzip -1 | sha256sum",
        shell_words(&node.ssh())
    );
    // The whole save: stream, layer (gzip -1 like the reference), push by digest, tag.
    let walt = |run: usize| {
        format!(
            "/usr/bin/time -f 'walt peak RSS %M KiB' {binary} save --node root@{} --identity {} --known-hosts {} \
             --proxy-command '{}' --all-changes --base {base} --to {} --insecure-registry {}",
            node.address(),
            node.client_key().display(),
            node.known_hosts().display(),
            node.proxy_command(),
            registry.reference(&format!("bench/saved:{run}")),
            registry.host()
        )
    };
    let mut reference_times = Vec::new();
    let mut walt_times = Vec::new();
    for run in 0..2 {
        reference_times.push(timed({
            let mut c = Command::new("bash");
            c.args(["-c", &format!("set -o pipefail; {reference}")]);
            c
        }));
        let start = Instant::now();
        let output = Command::new("bash")
            .args(["-c", &format!("set -o pipefail; {}", walt(run))])
            .output()
            .expect("walt save");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        walt_times.push(start.elapsed().as_secs_f64());
        let stderr = String::from_utf8_lossy(&output.stderr);
        if let Some(line) = stderr.lines().find(|l| l.contains("peak RSS")) {
            println!("{line}");
        }
    }
    let best = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    let (r, w) = (best(&reference_times), best(&walt_times));
    println!(
        "node save 1 GiB upper dir: reference (ssh tar | gzip -1 | sha256sum) {r:.2} s, walt save (pushed to the loopback registry) {w:.2} s: {:.2}x the time",
        w / r
    );
}

/// Keystroke round-trip through a virtual node's own SSH server (`walt-operator vnode`, amd64
/// busybox image) next to an OpenSSH sshd node's.
fn vnode_bench() {
    let registry = walt_tests::registry::Registry::start().expect("registry");
    let layout = walt_tests::images::OciLayout::busybox(walt_tests::images::Arch::Amd64).expect("image");
    layout
        .push("base", &registry, "bench/node:1")
        .expect("push the image");
    let work = tempfile::tempdir().expect("tempdir");
    let user_key = keygen(work.path(), "user");
    std::fs::copy(
        user_key.with_extension("pub"),
        work.path().join("authorized_keys"),
    )
    .expect("keys");
    let mut vnode = Command::new(walt_operator_binary())
        .args([
            "vnode",
            "--image",
            &registry.reference("bench/node:1"),
            "--name",
            "bench",
        ])
        .arg("--authorized-keys")
        .arg(work.path().join("authorized_keys"))
        .args(["--listen", "127.0.0.1:0", "--insecure-registry", &registry.host()])
        .arg("--cache-dir")
        .arg(work.path().join("cache"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the vnode");
    let mut ready = String::new();
    io::BufRead::read_line(
        &mut io::BufReader::new(vnode.stdout.take().expect("stdout")),
        &mut ready,
    )
    .expect("ready line");
    let port = ready
        .split(" listening on 127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .expect("port in the ready line")
        .to_owned();
    let host_key = ready
        .split(" host key ")
        .nth(1)
        .expect("host key")
        .trim()
        .to_owned();
    let known = work.path().join("known_hosts");
    std::fs::write(&known, format!("[127.0.0.1]:{port} {host_key}\n")).expect("known_hosts");
    let mut ssh = Command::new("ssh");
    ssh.args([
        "-F",
        "/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "IdentitiesOnly=yes",
    ])
    .args(["-o", "LogLevel=ERROR", "-i"])
    .arg(&user_key)
    .arg("-o")
    .arg(format!("UserKnownHostsFile={}", known.display()))
    .args(["-p", &port, "root@127.0.0.1"]);
    let vnode_rtt = keystrokes(&ssh);
    let node = SshNode::busybox().expect("node");
    let sshd_rtt = keystrokes(&node.ssh());
    println!(
        "keystroke round-trip p50: OpenSSH sshd node (through its socat ProxyCommand) {sshd_rtt:.3} ms, \
         walt vnode (loopback) {vnode_rtt:.3} ms"
    );
    let _ = Command::new("kill")
        .args(["-TERM", &vnode.id().to_string()])
        .status();
    let _ = vnode.wait();
}

/// `target/<profile>/walt-operator`, next to this example's directory.
fn walt_operator_binary() -> std::path::PathBuf {
    let binary = std::env::current_exe()
        .expect("current exe")
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("walt-operator");
    assert!(
        binary.exists(),
        "build it first: cargo build -p walt-operator --bins"
    );
    binary
}

fn shell_words(command: &Command) -> String {
    let mut words = vec![command.get_program().to_string_lossy().into_owned()];
    words.extend(
        command
            .get_args()
            .map(|a| format!("'{}'", a.to_string_lossy().replace('\'', r"'\''"))),
    );
    words.join(" ")
}

fn main() {
    match std::env::args().nth(1).as_deref() {
        Some("gateway") => gateway_bench(),
        Some("save") => save_bench(),
        Some("vnode") => vnode_bench(),
        _ => {
            eprintln!("usage: ssh_bench gateway|save|vnode");
            std::process::exit(2);
        }
    }
}
