//! The cluster tier's standard services, as any conformant cluster has them: kube-proxy (Service
//! ClusterIPs route to their endpoints) and a cluster DNS (CoreDNS: Service names resolve in pods).
//!
//! Both run as processes of the node, in its network namespace, where the pods' network is:
//! - kube-proxy (built from the pinned Kubernetes release, `tests/k8s/build.sh`) in iptables mode:
//!   Debian's `iptables` (nf_tables backend) works in a network namespace without any kernel module
//!   to load by hand, and the bridge's netfilter hook (`net.bridge.bridge-nf-call-iptables`, on in a
//!   new namespace) lets a pod reach a Service whose endpoint is on the same bridge. It changes no
//!   machine-wide setting: the conntrack table size and timeouts are left as they are (the
//!   settings it would write are per network namespace otherwise).
//! - CoreDNS (built from its Go module with only the plugins needed, `tests/k8s/coredns`) listens
//!   on the node address, port 53, and answers for `cluster.local` from the API server (its
//!   `kubernetes` plugin, as the user `system:coredns` with the read rights CoreDNS's own
//!   deployment grants). The `kube-system/kube-dns` Service, at the address kubelets give pods
//!   as their nameserver ([`CLUSTER_DNS_IP`]), has that address as its one endpoint: pods reach
//!   CoreDNS through kube-proxy, as in a cluster where it runs as a pod.
//!
//! Names outside `cluster.local` get no answer (the node namespace has no route out).

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use super::{Cluster, Error, free_port, kubeconfig, pki::Ca};
use crate::process::Lifetime;
use crate::wait::{Poll, Wait};

/// The cluster DNS Service's address (`kube-system/kube-dns`), given to pods as their nameserver.
pub const CLUSTER_DNS_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The cluster's DNS domain.
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// The user CoreDNS authenticates as (its client certificate's common name).
const COREDNS_USER: &str = "system:coredns";
/// The user kube-proxy authenticates as: Kubernetes binds it to `system:node-proxier`.
const KUBE_PROXY_USER: &str = "system:kube-proxy";

/// Where the node's services listen and find their files.
#[derive(Debug, Clone)]
pub(crate) struct ServicePlan<'a> {
    /// The node address (CoreDNS listens there; kube-proxy's node address).
    pub node_ip: Ipv4Addr,
    /// The node's name (kube-proxy's `--hostname-override`).
    pub node_name: &'a str,
    /// The pod network (kube-proxy tells pod traffic from the rest by it).
    pub pod_cidr: &'a str,
    /// Port of CoreDNS's readiness endpoint on the node's 127.0.0.1.
    pub dns_ready_port: u16,
    /// Port of kube-proxy's health endpoint on the node's 127.0.0.1.
    pub proxy_health_port: u16,
    /// Port of kube-proxy's metrics endpoint on the node's 127.0.0.1.
    pub proxy_metrics_port: u16,
}

/// The Corefile: one server on the node address for the cluster domain and the reverse zones.
pub(crate) fn corefile(plan: &ServicePlan<'_>, kubeconfig: &Path) -> String {
    format!(
        "{CLUSTER_DOMAIN}:53 in-addr.arpa:53 ip6.arpa:53 {{\n  bind {ip}\n  ready 127.0.0.1:{ready}\n  \
         errors\n  kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{\n    kubeconfig {kubeconfig}\n    \
         pods insecure\n    ttl 5\n  }}\n}}\n",
        ip = plan.node_ip,
        ready = plan.dns_ready_port,
        kubeconfig = kubeconfig.display(),
    )
}

/// The API objects of the cluster DNS: CoreDNS's read rights, and the `kube-dns` Service whose one
/// endpoint is CoreDNS on the node address.
pub(crate) fn dns_objects(plan: &ServicePlan<'_>) -> String {
    format!(
        r#"apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: system:coredns
rules:
- apiGroups: [""]
  resources: [endpoints, services, pods, namespaces]
  verbs: [list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: system:coredns
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: system:coredns}}
subjects:
- {{apiGroup: rbac.authorization.k8s.io, kind: User, name: "{COREDNS_USER}"}}
---
apiVersion: v1
kind: Service
metadata:
  name: kube-dns
  namespace: kube-system
  labels: {{k8s-app: kube-dns, kubernetes.io/name: CoreDNS}}
spec:
  clusterIP: {dns_ip}
  ports:
  - {{name: dns, port: 53, protocol: UDP}}
  - {{name: dns-tcp, port: 53, protocol: TCP}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kube-dns-node
  namespace: kube-system
  labels: {{kubernetes.io/service-name: kube-dns, endpointslice.kubernetes.io/managed-by: walt-tests}}
addressType: IPv4
endpoints:
- addresses: ["{node_ip}"]
  conditions: {{ready: true}}
ports:
- {{name: dns, port: 53, protocol: UDP}}
- {{name: dns-tcp, port: 53, protocol: TCP}}
"#,
        dns_ip = CLUSTER_DNS_IP,
        node_ip = plan.node_ip,
    )
}

/// kube-proxy's flags: iptables mode, and no machine-wide conntrack setting touched (see module docs).
pub(crate) fn kube_proxy_args(plan: &ServicePlan<'_>, kubeconfig: &Path) -> Vec<String> {
    vec![
        format!("--kubeconfig={}", kubeconfig.display()),
        "--proxy-mode=iptables".into(),
        format!("--hostname-override={}", plan.node_name),
        format!("--bind-address={}", plan.node_ip),
        format!("--cluster-cidr={}", plan.pod_cidr),
        format!("--healthz-bind-address=127.0.0.1:{}", plan.proxy_health_port),
        format!("--metrics-bind-address=127.0.0.1:{}", plan.proxy_metrics_port),
        "--conntrack-max-per-core=0".into(),
        "--conntrack-min=0".into(),
        "--conntrack-tcp-timeout-established=0".into(),
        "--conntrack-tcp-timeout-close-wait=0".into(),
        "--v=1".into(),
    ]
}

/// What the node's services need to know: where they run and where their files go.
pub(crate) struct ServiceContext<'a> {
    /// The cluster (API server, binaries, certificates).
    pub cluster: &'a Cluster,
    /// The node they run on.
    pub node: &'a super::node::Node,
    /// Their directory (kubeconfigs, Corefile, manifests).
    pub dir: &'a Path,
    /// Whether they belong to this test process.
    pub lifetime: Lifetime,
    /// When to give up waiting for them.
    pub deadline: Instant,
}

impl ServiceContext<'_> {
    fn binary(&self, name: &str, found: Option<&std::path::PathBuf>) -> Result<std::path::PathBuf, Error> {
        found.cloned().ok_or_else(|| {
            Error::Unavailable(format!(
                "no {name} in {}: the cluster tier runs it; build it with tests/k8s/build.sh (or put it there)",
                self.cluster.binaries().dir.display()
            ))
        })
    }

    fn plan(&self) -> Result<ServicePlan<'_>, Error> {
        let place = self.node.place();
        Ok(ServicePlan {
            node_ip: place.ip,
            node_name: &place.name,
            pod_cidr: &place.pod_cidr,
            dns_ready_port: free_port()?,
            proxy_health_port: free_port()?,
            proxy_metrics_port: free_port()?,
        })
    }

    /// A kubeconfig for `user`, with a client certificate of the cluster CA.
    fn kubeconfig(&self, name: &str, user: &str) -> Result<std::path::PathBuf, Error> {
        std::fs::create_dir_all(self.dir)
            .map_err(|e| Error::io(format!("create {}", self.dir.display()), e))?;
        let ca = Ca::load(&self.cluster.dir().join("pki"))?;
        let cert = ca.issue(&self.node.place().component(name), user, &[], &[], &[])?;
        let path = self.dir.join(format!("{name}.kubeconfig"));
        let server = self.node.api_server(self.cluster);
        kubeconfig::write(&path, &server, &ca.cert_pem()?, &cert, user)?;
        Ok(path)
    }
}

/// Starts CoreDNS in the node's network namespace, creates the `kube-dns` Service in front of it,
/// and waits until it has read the cluster's Services. Before the kubelet: pods get it as their
/// nameserver from their start.
pub(crate) fn start_dns(context: &ServiceContext<'_>) -> Result<(), Error> {
    let started = Instant::now();
    let cluster = context.cluster;
    let coredns = context.binary("coredns", cluster.binaries().coredns.as_ref())?;
    let plan = context.plan()?;
    let kubeconfig = context.kubeconfig("coredns", COREDNS_USER)?;
    let objects = context.dir.join("cluster-dns.yaml");
    write(&objects, &dns_objects(&plan))?;
    cluster.kubectl_output(&["apply", "-f", &objects.to_string_lossy()])?;
    let corefile_path = context.dir.join("Corefile");
    write(&corefile_path, &corefile(&plan, &kubeconfig))?;
    let mut dns = context.node.command(&coredns);
    dns.arg("-conf").arg(&corefile_path);
    cluster.spawn("coredns", dns, context.lifetime)?;
    wait_http_ok(context, "coredns", plan.dns_ready_port, "/ready")?;
    eprintln!(
        "walt-tests: CoreDNS ready in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Starts kube-proxy in the node's namespaces and waits until it has written the Services' rules
/// (its health endpoint answers 200). After the node is registered: kube-proxy reads its Node.
pub(crate) fn start_proxy(context: &ServiceContext<'_>) -> Result<(), Error> {
    let started = Instant::now();
    let cluster = context.cluster;
    let kube_proxy = context.binary("kube-proxy", cluster.binaries().kube_proxy.as_ref())?;
    let plan = context.plan()?;
    let kubeconfig = context.kubeconfig("kube-proxy", KUBE_PROXY_USER)?;
    let name = context.node.place().component("kube-proxy");
    let mut proxy = context.node.node_command(&kube_proxy.to_string_lossy());
    proxy.args(kube_proxy_args(&plan, &kubeconfig));
    cluster.spawn(&name, proxy, context.lifetime)?;
    wait_http_ok(context, &name, plan.proxy_health_port, "/healthz")?;
    eprintln!(
        "walt-tests: {name} ready in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Waits until `path` on the node's `127.0.0.1:port` answers 200 (an HTTP/1.0 GET through socat in
/// the node's network namespace), failing early when `component` exits.
fn wait_http_ok(context: &ServiceContext<'_>, component: &str, port: u16, path: &str) -> Result<(), Error> {
    let cluster = context.cluster;
    Wait::new(
        &format!("{component} to answer GET 127.0.0.1:{port}{path} in the node"),
        context.deadline.saturating_duration_since(Instant::now()),
    )
    .every(Duration::from_millis(100))
    .until(|| -> Result<_, Error> {
        cluster.check_alive(component)?;
        let response = http_get_in_node(context.node, port, path)?;
        Ok(if is_http_ok(&response) {
            Poll::Ready(())
        } else {
            Poll::Pending(response.lines().next().unwrap_or("no answer").to_owned())
        })
    })
    .map_err(|e| e.or_timed_out(|message| cluster.not_ready(component, message)))
}

/// One HTTP/1.0 GET of `path` on the node's `127.0.0.1:port`; the whole response, or empty.
fn http_get_in_node(node: &super::node::Node, port: u16, path: &str) -> Result<String, Error> {
    use std::io::Write as _;
    let mut socat = node.command(Path::new("socat"));
    socat
        .args(["-T", "2", "-", &format!("TCP:127.0.0.1:{port}")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = socat.spawn().map_err(|e| Error::io("run socat", e))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A refused connection closes the pipe early: the answer (none) says it all.
        let _ = write!(stdin, "GET {path} HTTP/1.0\r\n\r\n");
    }
    let output = child
        .wait_with_output()
        .map_err(|e| Error::io("wait for socat", e))?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Whether an HTTP response's status line says 200.
fn is_http_ok(response: &str) -> bool {
    response
        .lines()
        .next()
        .and_then(|status| status.split_whitespace().nth(1))
        == Some("200")
}

fn write(path: &Path, contents: &str) -> Result<(), Error> {
    std::fs::write(path, contents).map_err(|e| Error::io(format!("write {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> ServicePlan<'static> {
        ServicePlan {
            node_ip: Ipv4Addr::new(10, 200, 0, 2),
            node_name: "walt-node",
            pod_cidr: "10.244.0.0/24",
            dns_ready_port: 18181,
            proxy_health_port: 10256,
            proxy_metrics_port: 10249,
        }
    }

    #[test]
    fn corefile_serves_the_cluster_domain_on_the_node_address() {
        let text = corefile(&plan(), Path::new("/k/coredns.kubeconfig"));
        assert!(text.starts_with("cluster.local:53 in-addr.arpa:53 ip6.arpa:53 {\n"));
        assert!(text.contains("  bind 10.200.0.2\n"));
        assert!(text.contains("  ready 127.0.0.1:18181\n"));
        assert!(text.contains("    kubeconfig /k/coredns.kubeconfig\n"));
    }

    #[test]
    fn dns_service_points_at_the_node_address() {
        let text = dns_objects(&plan());
        assert!(text.contains("clusterIP: 10.96.0.10\n"));
        assert!(text.contains("- addresses: [\"10.200.0.2\"]\n"));
        assert!(text.contains("name: \"system:coredns\""));
    }

    #[test]
    fn kube_proxy_leaves_machine_wide_conntrack_settings_alone() {
        let args = kube_proxy_args(&plan(), Path::new("/k/kp.kubeconfig"));
        for flag in [
            "--conntrack-max-per-core=0",
            "--conntrack-min=0",
            "--proxy-mode=iptables",
            "--hostname-override=walt-node",
            "--healthz-bind-address=127.0.0.1:10256",
        ] {
            assert!(args.iter().any(|a| a == flag), "{flag} missing from {args:?}");
        }
    }

    #[test]
    fn only_a_200_status_is_ok() {
        assert!(is_http_ok("HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nOK"));
        assert!(!is_http_ok("HTTP/1.0 503 Service Unavailable\r\n\r\n"));
        assert!(!is_http_ok(""));
    }
}
