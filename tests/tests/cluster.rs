//! Cluster tier: a real single-node cluster (kubelet + containerd + runc + CNI in a network
//! namespace) started by the harness. One test, because one node start serves every check; each
//! step says what it checks. Skipped (with the reason printed) only on a machine that cannot run
//! a kubelet; see `walt_tests::k8s::cluster_tier_runs`.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::process::Stdio;
use std::time::{Duration, Instant};

use walt_tests::k8s::images::{self, Arch};
use walt_tests::k8s::{Cluster, ClusterOptions};

fn pod_yaml(name: &str, image: &str, script: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  labels: {{app: {name}}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: {image}
    command: ["/bin/sh", "-c", {script:?}]
    ports:
    - containerPort: 8080
"#
    )
}

fn apply(cluster: &Cluster, ns: &str, yaml: &str) {
    let mut child = cluster
        .kubectl()
        .args(["apply", "-n", ns, "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kubectl apply");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(yaml.as_bytes())
        .expect("write manifest");
    let out = child.wait_with_output().expect("kubectl apply");
    assert!(
        out.status.success(),
        "kubectl apply failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn wait_ready(cluster: &Cluster, ns: &str, pod: &str) {
    if let Err(e) = cluster.kubectl_output(&[
        "wait",
        "-n",
        ns,
        "--for=condition=Ready",
        &format!("pod/{pod}"),
        "--timeout=180s",
    ]) {
        let describe = cluster
            .kubectl_output(&["describe", "-n", ns, "pod", pod])
            .unwrap_or_else(|e| e.to_string());
        panic!("pod {pod} is not Ready: {e}\n{describe}");
    }
}

/// `kubectl port-forward` to `pod`'s port 8080, then one HTTP GET through it.
fn http_get_through_port_forward(cluster: &Cluster, ns: &str, pod: &str) -> String {
    let mut child = cluster
        .kubectl()
        .args(["port-forward", "-n", ns, &format!("pod/{pod}"), ":8080"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kubectl port-forward");
    // Keep reading its output: kubectl dies of SIGPIPE if it cannot write "Handling connection".
    let mut output = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    output.read_line(&mut line).expect("read port-forward output");
    let drain = std::thread::spawn(move || std::io::copy(&mut output, &mut std::io::sink()));
    // "Forwarding from 127.0.0.1:PORT -> 8080"
    let port: u16 = line
        .split("127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected port-forward output: {line:?}"));
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to the forwarded port");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    write!(stream, "GET /index.html HTTP/1.0\r\nHost: pod\r\n\r\n").expect("send request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    let _ = child.kill();
    let _ = child.wait();
    let _ = drain.join();
    response
}

#[test]
fn single_node_cluster() {
    if !walt_tests::k8s::cluster_tier_runs("single_node_cluster") {
        return;
    }
    images::ensure_arm64_emulation()
        .unwrap_or_else(|e| panic!("cannot register qemu-aarch64 with binfmt_misc: {e}"));
    let started = Instant::now();
    let cluster = Cluster::start(ClusterOptions::cluster())
        .unwrap_or_else(|e| panic!("cannot start the cluster tier: {e}"));
    eprintln!("cluster tier ready in {:.1} s", started.elapsed().as_secs_f64());

    // The node is registered and Ready.
    let nodes = cluster
        .kubectl_output(&[
            "get",
            "nodes",
            "-o",
            r#"jsonpath={range .items[*]}{.metadata.name}={.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}"#,
        ])
        .expect("kubectl get nodes");
    assert_eq!(nodes.trim(), "walt-node=True", "kubectl get nodes: {nodes}");

    // Images built here, pushed to the node's registry.
    let registry = cluster.registry().expect("cluster tier has a registry");
    let work = cluster.dir().join("test-images");
    let busybox = images::push_busybox(&registry, "walt/busybox:1", Arch::Amd64, &["sh"], &work)
        .expect("push the amd64 busybox image");
    let busybox_arm64 = images::push_busybox(&registry, "walt/busybox-arm64:1", Arch::Arm64, &["sh"], &work)
        .expect("push the arm64 busybox image");

    let ns = cluster.create_namespace("pods").expect("namespace");
    apply(
        &cluster,
        &ns,
        &pod_yaml(
            "busybox",
            &busybox,
            "mkdir -p /www && echo hello from walt > /www/index.html && exec httpd -f -p 8080 -h /www",
        ),
    );
    apply(
        &cluster,
        &ns,
        &pod_yaml(
            "arm64",
            &busybox_arm64,
            "echo started on $(uname -m); exec sleep 3600",
        ),
    );
    wait_ready(&cluster, &ns, "busybox");

    // kubectl exec returns the container's output.
    let exec = cluster
        .kubectl_output(&[
            "exec",
            "-n",
            &ns,
            "busybox",
            "--",
            "sh",
            "-c",
            "echo exec works; uname -m",
        ])
        .expect("kubectl exec");
    assert_eq!(exec, "exec works\nx86_64\n");

    // The pod has an address on the pod network, which exists only in the node's namespace.
    let pod_ip = cluster
        .kubectl_output(&[
            "get",
            "pod",
            "-n",
            &ns,
            "busybox",
            "-o",
            "jsonpath={.status.podIP}",
        ])
        .expect("pod IP");
    assert!(pod_ip.starts_with("10.244.0."), "pod IP {pod_ip}");

    // kubectl port-forward reaches the pod's server.
    let response = http_get_through_port_forward(&cluster, &ns, "busybox");
    assert!(
        response.starts_with("HTTP/1.") && response.ends_with("hello from walt\n"),
        "response through port-forward: {response:?}"
    );

    // The arm64 pod runs under qemu-user emulation.
    wait_ready(&cluster, &ns, "arm64");
    let arch = cluster
        .kubectl_output(&["exec", "-n", &ns, "arm64", "--", "uname", "-m"])
        .expect("kubectl exec in the arm64 pod");
    assert_eq!(arch.trim(), "aarch64");
    let logs = cluster
        .kubectl_output(&["logs", "-n", &ns, "arm64"])
        .expect("kubectl logs");
    assert_eq!(logs.trim(), "started on aarch64");

    services_by_name_and_cluster_ip(&cluster, &ns, &busybox);
}

/// The standard services (kube-proxy, cluster DNS) as a pod sees them: from another pod, the
/// `kubernetes` Service and a Service of the test resolve by name, and a ClusterIP Service's port
/// reaches the HTTP server pod behind it, by name and by address.
fn services_by_name_and_cluster_ip(cluster: &Cluster, ns: &str, busybox: &str) {
    let started = Instant::now();
    apply(
        cluster,
        ns,
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  selector: {app: busybox}\n  \
         ports: [{port: 80, targetPort: 8080}]\n",
    );
    apply(cluster, ns, &pod_yaml("client", busybox, "exec sleep 3600"));
    wait_ready(cluster, ns, "client");
    let cluster_ip = cluster
        .kubectl_output(&[
            "get",
            "service",
            "-n",
            ns,
            "web",
            "-o",
            "jsonpath={.spec.clusterIP}",
        ])
        .expect("the Service's ClusterIP");
    assert!(cluster_ip.starts_with("10.96."), "ClusterIP {cluster_ip}");
    let exec = |script: &str| {
        cluster
            .kubectl_output(&["exec", "-n", ns, "client", "--", "sh", "-c", script])
            .unwrap_or_else(|e| panic!("`{script}` in the client pod: {e}"))
    };

    // The pod's resolver is the cluster DNS, with the cluster's search path.
    let resolv = exec("cat /etc/resolv.conf");
    assert!(resolv.contains("nameserver 10.96.0.10"), "resolv.conf: {resolv}");
    assert!(
        resolv.contains(&format!(
            "search {ns}.svc.cluster.local svc.cluster.local cluster.local"
        )),
        "resolv.conf: {resolv}"
    );
    // Names resolve: the API server's Service and the test's Service (short name, via the search path).
    let api = exec("nslookup kubernetes.default.svc.cluster.local");
    assert!(api.contains("Address: 10.96.0.1\n"), "nslookup kubernetes: {api}");
    let web = exec(&format!("nslookup web.{ns}.svc.cluster.local"));
    assert!(
        web.contains(&format!("Address: {cluster_ip}\n")),
        "nslookup web: {web}"
    );
    // The ClusterIP routes to the server pod: by the short name (resolver search path), by the
    // `kubernetes.default.svc`-style name and by address.
    for url in [
        "http://web/index.html".to_string(),
        format!("http://web.{ns}.svc/index.html"),
        format!("http://{cluster_ip}/index.html"),
    ] {
        let body = exec(&format!("timeout 20 wget -q -O - {url}"));
        assert_eq!(body, "hello from walt\n", "GET {url}");
    }
    // The API server answers through its Service, by name, as in-cluster clients reach it.
    let healthz =
        exec("timeout 20 wget -q --no-check-certificate -O - https://kubernetes.default.svc/healthz");
    assert_eq!(healthz, "ok", "GET https://kubernetes.default.svc/healthz");
    eprintln!("services checked in {:.1} s", started.elapsed().as_secs_f64());
}
