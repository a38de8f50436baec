//! Operator at scale (issue 7's benchmark; figures, not pass/fail): N physical Nodes and M Images on
//! a real control plane (etcd + kube-apiserver of the harness), then the operator binary is started
//! and measured:
//!
//! - time from its start until every Node has a phase and every Image is `Ready=True`;
//! - its peak RSS (`VmHWM` of `/proc/PID/status`); issue 17's goal at 10,000 + 10,000 (release build):
//!   ≤ 120 s and ≤ 256 MiB;
//! - until then, the API requests of walt's kinds and Events (the API server's `apiserver_request_total`)
//!   and the CPU seconds of kube-apiserver, etcd, the registry and the operator: where the start-up's time goes;
//! - reconciles per minute once idle (from `/metrics`), next to what the requeue intervals predict
//!   (Nodes every `--probe-interval`, Images every `--resolve-interval`): more would be a hot loop.
//!
//! ```text
//! cargo build -p walt-operator --bin walt-operator --example operator_scale
//! cargo run -p walt-operator --example operator_scale -- --nodes 2000 --images 2000
//! # the release operator at 10,000 + 10,000 (the harness itself may stay a debug build):
//! cargo build --release -p walt-operator --bin walt-operator
//! cargo run -p walt-operator --example operator_scale -- --nodes 10000 --images 10000 \
//!     --operator target/release/walt-operator
//! ```
//! Traffic stays on loopback: the Images point to a `docker-registry` on 127.0.0.1, the Nodes to
//! `127.0.0.X` on a port where nothing listens (every probe is refused at once: the Nodes end up
//! `Unreachable`, which exercises the probe back-off).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use clap::Parser;
use futures::StreamExt as _;
use kube::Api;
use kube::api::PostParams;
use kube::runtime::{WatchStreamExt as _, reflector, watcher};
use walt_crds::{
    Device, DeviceLoan, DeviceSpec, Image, ImageSpec, Node, NodeSpec, condition_types, find_condition,
};
use walt_tests::k8s::{Cluster, ClusterOptions};
use walt_tests::process::{Daemon, Lifetime};

/// A port on 127.0.0.X where nothing listens (checked before use).
const DEAD_PORT: u16 = 9;

#[derive(Parser, Debug)]
#[command(about = "walt operator at scale: Nodes and Images on a real API server")]
struct Args {
    /// Nodes to create.
    #[arg(long, default_value_t = 2000)]
    nodes: usize,
    /// Images to create.
    #[arg(long, default_value_t = 2000)]
    images: usize,
    /// Seconds of idle time measured after everything is reconciled.
    #[arg(long, default_value_t = 120)]
    idle: u64,
    /// The operator binary (default: `walt-operator` next to this example's directory).
    #[arg(long)]
    operator: Option<PathBuf>,
    /// Creations in flight at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
}

fn operator_binary(args: &Args) -> PathBuf {
    args.operator.clone().unwrap_or_else(|| {
        let exe = std::env::current_exe().expect("current exe");
        // target/<profile>/examples/operator_scale → target/<profile>/walt-operator
        exe.parent()
            .and_then(std::path::Path::parent)
            .map(|dir| dir.join("walt-operator"))
            .expect("target directory")
    })
}

fn kubectl(cluster: &Cluster, args: &[&str]) -> String {
    cluster
        .kubectl_output(args)
        .unwrap_or_else(|error| panic!("kubectl {args:?}: {error}"))
}

fn metrics(port: u16) -> BTreeMap<String, f64> {
    use std::io::{Read as _, Write as _};
    let mut values = BTreeMap::new();
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return values;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let mut body = String::new();
    let _ = stream.read_to_string(&mut body);
    for line in body
        .lines()
        .filter(|line| line.starts_with("walt_reconciles_total"))
    {
        if let Some((name, value)) = line.rsplit_once(' ') {
            values.insert(name.to_owned(), value.parse().unwrap_or(0.0));
        }
    }
    values
}

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// CPU seconds a process has used (user + system, from `/proc/PID/stat`; 0 when it is gone).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime and stime are the 12th and 13th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: f64 = fields.get(11..13).map_or(0.0, |both| {
        both.iter().filter_map(|field| field.parse::<f64>().ok()).sum()
    });
    // The kernel's clock ticks per second (USER_HZ) is 100 on Linux.
    ticks / 100.0
}

/// The processes named `name` whose command lines name files in `dir` (this cluster's, this registry's).
fn pids_of(dir: &std::path::Path, name: &str) -> Vec<u32> {
    let dir = dir.display().to_string();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            let program = cmdline.split('\0').next().unwrap_or_default();
            program.ends_with(name) && cmdline.contains(&dir)
        })
        .collect()
}

/// The API server's request counts of walt's kinds and Events, by verb and resource
/// (`apiserver_request_total` of its `/metrics`, all response codes together).
fn api_requests(cluster: &Cluster) -> BTreeMap<String, f64> {
    let metrics = cluster
        .kubectl_output(&["get", "--raw", "/metrics"])
        .unwrap_or_default();
    let mut counts = BTreeMap::new();
    for line in metrics
        .lines()
        .filter(|line| line.starts_with("apiserver_request_total{"))
    {
        let Some((labels, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let label = |name: &str| {
            labels
                .split_once(&format!("{name}=\""))
                .and_then(|(_, rest)| rest.split_once('"'))
                .map_or("", |(value, _)| value)
        };
        let resource = label("resource");
        if !["nodes", "images", "devices", "events"].contains(&resource) {
            continue;
        }
        let subresource = label("subresource");
        let key = if subresource.is_empty() {
            format!("{} {resource}", label("verb"))
        } else {
            format!("{} {resource}/{subresource}", label("verb"))
        };
        *counts.entry(key).or_insert(0.0) += value.parse::<f64>().unwrap_or(0.0);
    }
    counts
}

/// A store of every `K` of `api`, kept up to date by a watch running on `runtime` (returned once it
/// has its first full list).
fn watched<K>(runtime: &tokio::runtime::Runtime, api: Api<K>) -> reflector::Store<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let stream = reflector::reflector(
        writer,
        watcher::watcher(api, watcher::Config::default()).default_backoff(),
    );
    runtime.spawn(stream.for_each(|_| async {}));
    runtime
        .block_on(store.wait_until_ready())
        .expect("the watch of the benchmark's objects");
    store
}

/// Whether the operator has reconciled a Node (its status has conditions).
fn node_done(node: &Node) -> bool {
    node.status
        .as_ref()
        .is_some_and(|status| !status.conditions.is_empty())
}

/// Whether an Image is `Ready=True`.
fn image_ready(image: &Image) -> bool {
    image.status.as_ref().is_some_and(|status| {
        find_condition(&status.conditions, condition_types::READY).is_some_and(|ready| ready.status == "True")
    })
}

fn main() {
    let args = Args::parse();
    let operator_bin = operator_binary(&args);
    assert!(
        operator_bin.is_file(),
        "{} not found: build it first (cargo build -p walt-operator --bin walt-operator) or pass --operator",
        operator_bin.display()
    );
    for x in [2, 3] {
        assert!(
            std::net::TcpStream::connect(("127.0.0.".to_owned() + &x.to_string(), DEAD_PORT)).is_err(),
            "something listens on 127.0.0.{x}:{DEAD_PORT}; the benchmark needs a dead port"
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let cluster = Cluster::start(ClusterOptions::control_plane()).expect("start the control plane tier");
    let crds = std::env::temp_dir().join(format!("walt-scale-crds-{}.yaml", std::process::id()));
    std::fs::write(&crds, walt_crds::crds_yaml()).expect("write CRDs");
    kubectl(
        &cluster,
        &["apply", "--server-side", "-f", &crds.display().to_string()],
    );
    for crd in ["images", "nodes", "shellsessions", "nodesaves"] {
        kubectl(
            &cluster,
            &[
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                &format!("crd/{crd}.walt.dev"),
            ],
        );
    }
    let namespace = cluster.create_namespace("scale").expect("namespace");
    let keys = tempfile::tempdir().expect("temp dir");
    let key = walt_tests::sshnode::keygen(keys.path(), "node_key");
    cluster
        .create_node_key_secret(&namespace, &key)
        .unwrap_or_else(|error| panic!("the node key Secret in {namespace}: {error}"));
    let registry = walt_tests::registry::Registry::start().expect("start a docker-registry on loopback");
    let layout =
        walt_tests::images::OciLayout::busybox(walt_tests::images::Arch::Amd64).expect("busybox image");
    // Under the namespace's own path of the lab registry: a tenant's Images may read nothing else there.
    let path = format!("lab/{namespace}/base:latest");
    let digest = layout.push("base", &registry, &path).expect("push the image");
    let reference = registry.reference(&path);
    println!(
        "control plane up; registry {} serves {reference} ({digest})",
        registry.host()
    );

    let client = runtime.block_on(cluster.client()).expect("kube client");
    let images: Api<Image> = Api::namespaced(client.clone(), &namespace);
    let nodes: Api<Node> = Api::namespaced(client.clone(), &namespace);
    let created = Instant::now();
    runtime.block_on(async {
        let image_creations = (0..args.images).map(|i| {
            let images = images.clone();
            let mut image = Image::new(
                &format!("img-{i}"),
                ImageSpec {
                    reference: Some(reference.clone()),
                    ..ImageSpec::default()
                },
            );
            image.metadata.namespace = Some(namespace.clone());
            async move { images.create(&PostParams::default(), &image).await.map(|_| ()) }
        });
        // Each node is a Device of the lab, lent to the namespace, at a dead port.
        let devices: Api<Device> = Api::all(client.clone());
        let device_creations = (0..args.nodes).map(|i| {
            let devices = devices.clone();
            let device = Device::new(
                &format!("{namespace}-d-{i}"),
                DeviceSpec {
                    address: Some(format!("127.0.0.{}", 2 + i % 250)),
                    ssh_port: i32::from(DEAD_PORT),
                    model: "pc-x86-64".into(),
                    lent_to: Some(DeviceLoan {
                        namespace: namespace.clone(),
                    }),
                    ..DeviceSpec::default()
                },
            );
            async move { devices.create(&PostParams::default(), &device).await.map(|_| ()) }
        });
        let node_creations = (0..args.nodes).map(|i| {
            let nodes = nodes.clone();
            let mut node = Node::new(
                &format!("n-{i}"),
                NodeSpec {
                    model: "pc-x86-64".into(),
                    image: (args.images > 0).then(|| format!("img-{}", i % args.images)),
                    device: Some(format!("{namespace}-d-{i}")),
                    ..NodeSpec::default()
                },
            );
            node.metadata.namespace = Some(namespace.clone());
            async move { nodes.create(&PostParams::default(), &node).await.map(|_| ()) }
        });
        let mut results = futures::stream::iter(image_creations)
            .buffer_unordered(args.concurrency)
            .chain(futures::stream::iter(device_creations).buffer_unordered(args.concurrency))
            .chain(futures::stream::iter(node_creations).buffer_unordered(args.concurrency));
        while let Some(result) = results.next().await {
            result.expect("create an object");
        }
    });
    println!(
        "created {} Images and {} Nodes in {:.1} s",
        args.images,
        args.nodes,
        created.elapsed().as_secs_f64()
    );

    let http = walt_tests::k8s::free_port().expect("port");
    let gateway = walt_tests::k8s::free_port().expect("port");
    let log = std::env::temp_dir().join(format!("walt-operator-scale-{}.log", std::process::id()));
    let mut command = Command::new(&operator_bin);
    command
        .arg("run")
        .args(["--namespace", &namespace, "--watch-namespace", &namespace])
        .args(["--lab-registry", &format!("{}/lab", registry.host())])
        .args([
            "--registry-plain-http",
            "true",
            "--node-key-secret",
            "walt-node-key",
        ])
        .args([
            "--shell-image",
            "127.0.0.1:1/walt/operator:scale",
            "--identity",
            "scale",
        ])
        .args(["--catalog-namespace", "walt-catalog-none"])
        .args(["--http-addr", &format!("127.0.0.1:{http}")])
        .args(["--gateway-addr", &format!("127.0.0.1:{gateway}")])
        .env("KUBECONFIG", cluster.kubeconfig())
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        );
    println!("operator log: {}", log.display());
    // What is done is counted from watches of the Nodes and Images, opened (and listed once) before the
    // operator starts: a LIST of everything every 2 s cost the API server as much as the operator's own
    // writes at 10,000 + 10,000 (two answers of about 30 MB each, per poll).
    let node_cache = watched(&runtime, nodes.clone());
    let image_cache = watched(&runtime, images.clone());
    let registry_dir = registry.storage_dir();
    let registry_dir = registry_dir.parent().unwrap_or(&registry_dir);
    let control_plane: Vec<(&str, Vec<u32>)> = vec![
        ("kube-apiserver", pids_of(cluster.dir(), "kube-apiserver")),
        ("etcd", pids_of(cluster.dir(), "etcd")),
        ("docker-registry", pids_of(registry_dir, "docker-registry")),
    ];
    let control_plane_cpu = |pids: &[u32]| pids.iter().copied().map(cpu_seconds).sum::<f64>();
    let cpu_before: Vec<f64> = control_plane
        .iter()
        .map(|(_, pids)| control_plane_cpu(pids))
        .collect();
    let requests_before = api_requests(&cluster);
    let started = Instant::now();
    let operator = Daemon::spawn("walt-operator", command, &log, Lifetime::Test).expect("start the operator");
    let pid = operator.pid();
    let mut peak_sampled = 0;
    let all_reconciled = loop {
        peak_sampled = peak_sampled.max(proc_status_kib(pid, "VmRSS:"));
        let nodes_done = node_cache.state().iter().filter(|node| node_done(node)).count();
        let images_done = image_cache
            .state()
            .iter()
            .filter(|image| image_ready(image))
            .count();
        let elapsed = started.elapsed();
        println!(
            "  {:>5.1} s: {nodes_done}/{} Nodes, {images_done}/{} Images, RSS {} MiB",
            elapsed.as_secs_f64(),
            args.nodes,
            args.images,
            proc_status_kib(pid, "VmRSS:") / 1024
        );
        if nodes_done == args.nodes && images_done == args.images {
            break elapsed;
        }
        assert!(
            elapsed < Duration::from_mins(30),
            "not all reconciled after 30 minutes; operator log: {}",
            log.display()
        );
        std::thread::sleep(Duration::from_secs(2));
    };
    // Where the start-up's work went: the API requests it took and the CPU each process spent.
    let requests_after = api_requests(&cluster);
    let startup_cpu: Vec<(&str, f64)> = control_plane
        .iter()
        .zip(&cpu_before)
        .map(|((name, pids), before)| (*name, control_plane_cpu(pids) - before))
        .chain(std::iter::once(("walt-operator", cpu_seconds(pid))))
        .collect();
    // Idle: reconciles per window, so a slow tail of startup work shows apart from the steady state.
    let sum = |values: &BTreeMap<String, f64>| values.values().sum::<f64>();
    let first = metrics(http);
    let mut previous = first.clone();
    let window = Duration::from_secs(30).min(Duration::from_secs(args.idle.max(1)));
    let idle_start = Instant::now();
    while idle_start.elapsed() < Duration::from_secs(args.idle) {
        std::thread::sleep(window);
        let now = metrics(http);
        println!(
            "  idle +{:>4.0} s: {:.0} reconciles/min in the last {} s",
            idle_start.elapsed().as_secs_f64(),
            (sum(&now) - sum(&previous)) * 60.0 / window.as_secs_f64(),
            window.as_secs()
        );
        previous = now;
    }
    let before = first;
    let after = previous;
    let minutes = idle_start.elapsed().as_secs_f64() / 60.0;
    let peak = proc_status_kib(pid, "VmHWM:").max(peak_sampled);
    println!(
        "\nRESULTS ({} Nodes, {} Images, operator {})",
        args.nodes,
        args.images,
        operator_bin.display()
    );
    println!(
        "  time until all reconciled: {:.1} s (from the operator's start)",
        all_reconciled.as_secs_f64()
    );
    println!(
        "  operator peak RSS: {:.1} MiB (goal at 10,000 + 10,000: 256 MiB)",
        peak as f64 / 1024.0
    );
    println!("  until all reconciled, CPU seconds:");
    for (name, seconds) in &startup_cpu {
        println!("    {name}: {seconds:.1}");
    }
    println!(
        "  until all reconciled, API requests (walt's kinds and Events; the benchmark's own polls are the LISTs):"
    );
    for (key, after) in &requests_after {
        let count = after - requests_before.get(key).copied().unwrap_or(0.0);
        if count > 0.0 {
            println!("    {key}: {count:.0}");
        }
    }
    let mut total = 0.0;
    for (name, value) in &after {
        let rate = (value - before.get(name).copied().unwrap_or(0.0)) / minutes;
        total += rate;
        println!("  idle reconciles/min {name}: {rate:.0}");
    }
    println!(
        "  idle reconciles/min total: {total:.0} over {:.0} s (expected from the intervals: {} Nodes / 1 min probe + {} Images / 10 min resolve = {})",
        minutes * 60.0,
        args.nodes,
        args.images,
        args.nodes + args.images / 10
    );
    drop(operator);
    drop(registry);
    cluster.stop();
}
