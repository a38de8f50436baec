//! Shipping checks: the Helm chart lints and renders what an installation needs, its schema refuses bad
//! values, the kustomize base and overlays render the same objects as the chart, and the container image
//! is a multi-arch index that skopeo and umoci read.

use std::collections::BTreeSet;
use std::process::Command;

use serde_json::Value;
use walt_tests::deploy::{self, object_ids, render_chart};

fn ids(list: &[(&str, &str, &str)]) -> BTreeSet<(String, String, String)> {
    list.iter()
        .map(|(k, ns, n)| ((*k).to_owned(), (*ns).to_owned(), (*n).to_owned()))
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|doc| {
            let (k, _, n) = deploy::object_id(doc);
            k == kind && n == name
        })
        .unwrap_or_else(|| panic!("the rendering has no {kind} {name}"))
}

fn helm_fails(args: &[&str]) -> String {
    let helm = deploy::helm().expect("helm");
    let output = Command::new(helm)
        .args(["template", "walt"])
        .arg(deploy::chart_dir())
        .args(["-n", "walt-system"])
        .args(args)
        .output()
        .expect("run helm");
    assert!(
        !output.status.success(),
        "helm template {args:?} should have failed"
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn chart_lints_and_renders_a_complete_installation() {
    let helm = deploy::helm().expect("helm");
    let lint = Command::new(&helm)
        .args(["lint", "--strict"])
        .arg(deploy::chart_dir())
        .output()
        .expect("helm lint");
    assert!(
        lint.status.success(),
        "helm lint --strict failed:\n{}{}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );

    let docs = render_chart(&[]).expect("helm template");
    let got = object_ids(&docs);
    let ns = "walt-system";
    let expected = ids(&[
        ("ServiceAccount", ns, "walt-operator"),
        ("Deployment", ns, "walt-operator"),
        ("Service", ns, "walt-gateway"),
        ("Service", ns, "walt-operator-metrics"),
        ("PodDisruptionBudget", ns, "walt-operator"),
        ("ClusterRole", "", "walt-operator"),
        ("ClusterRoleBinding", "", "walt-operator"),
        ("Role", ns, "walt-operator"),
        ("RoleBinding", ns, "walt-operator"),
        ("ClusterRole", "", "walt-admin"),
        ("ClusterRole", "", "walt-edit"),
        ("ClusterRole", "", "walt-view"),
        ("Secret", ns, "walt-node-key"),
        ("Secret", ns, "walt-registry-credentials"),
        ("Secret", ns, "walt-registry-token"),
        ("Service", ns, "walt-registry-token"),
        ("ConfigMap", ns, "walt-registry"),
        ("PersistentVolumeClaim", ns, "walt-registry"),
        ("Deployment", ns, "walt-registry"),
        ("Service", ns, "walt-registry"),
        ("DaemonSet", ns, "walt-binfmt"),
        ("NetworkPolicy", ns, "walt-operator"),
        ("NetworkPolicy", ns, "walt-registry"),
        ("ConfigMap", ns, "walt-session-limits"),
        ("ValidatingAdmissionPolicy", "", "walt-session-limits"),
        ("ValidatingAdmissionPolicyBinding", "", "walt-session-limits"),
        ("ConfigMap", ns, "walt-registry-paths"),
        ("ValidatingAdmissionPolicy", "", "walt-registry-paths"),
        ("ValidatingAdmissionPolicyBinding", "", "walt-registry-paths"),
    ]);
    let missing: Vec<_> = expected.difference(&got).collect();
    assert!(
        missing.is_empty(),
        "the default rendering lacks {missing:?}; it has {got:?}"
    );

    // The operator: two replicas with leader election, probes, resources, locked-down security context.
    let operator = find(&docs, "Deployment", "walt-operator");
    assert_eq!(operator["spec"]["replicas"], Value::from(2));
    let pod = &operator["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        assert!(
            container[probe]["httpGet"]["path"].is_string(),
            "operator has no {probe}"
        );
    }
    assert!(container["resources"]["requests"]["memory"].is_string());
    assert_eq!(
        container["securityContext"]["readOnlyRootFilesystem"],
        Value::from(true)
    );
    assert_eq!(
        container["securityContext"]["allowPrivilegeEscalation"],
        Value::from(false)
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"], Value::from(true));
    let env: Vec<&str> = container["env"]
        .as_array()
        .expect("env")
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    for wanted in [
        "WALT_NAMESPACE",
        "WALT_LAB_REGISTRY",
        "WALT_NODE_KEY_SECRET",
        "WALT_REGISTRY_CREDENTIALS_SECRET",
        "WALT_SHELL_IMAGE",
        "WALT_LEADER_ELECTION",
    ] {
        assert!(env.contains(&wanted), "operator env lacks {wanted}: {env:?}");
    }
    // Every WALT_ variable the chart sets is a flag `walt-operator run` really has.
    let operator_binary = walt_tests::operator::operator_binary();
    let help = deploy::run(Command::new(&operator_binary).args(["run", "--help"]))
        .expect("walt-operator run --help");
    for name in env.iter().filter(|name| name.starts_with("WALT_")) {
        assert!(
            help.contains(&format!("[env: {name}")),
            "the chart sets {name}, which `walt-operator run` does not read:\n{help}"
        );
    }

    // User roles aggregate into Kubernetes' own.
    for (role, aggregate) in [
        ("walt-view", "view"),
        ("walt-edit", "edit"),
        ("walt-admin", "admin"),
    ] {
        let labels = &find(&docs, "ClusterRole", role)["metadata"]["labels"];
        assert_eq!(
            labels[format!("rbac.authorization.k8s.io/aggregate-to-{aggregate}").as_str()],
            Value::from("true")
        );
    }
    // The operator's cluster-wide rights: no wildcard, no cluster-wide list of Secrets.
    for rule in find(&docs, "ClusterRole", "walt-operator")["rules"]
        .as_array()
        .expect("rules")
    {
        let verbs: Vec<&str> = rule["verbs"]
            .as_array()
            .expect("verbs")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(!verbs.contains(&"*"), "wildcard verb in {rule:?}");
        let resources: Vec<&str> = rule["resources"]
            .as_array()
            .expect("resources")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(!resources.contains(&"*"), "wildcard resource in {rule:?}");
        if resources.contains(&"secrets") {
            assert!(
                !verbs.contains(&"list") && !verbs.contains(&"watch"),
                "cluster-wide secret listing: {rule:?}"
            );
        }
    }

    // Generated secrets: a node key OpenSSH reads, registry credentials matching the htpasswd user.
    let key = find(&docs, "Secret", "walt-node-key")["data"]["ssh-privatekey"]
        .as_str()
        .expect("key")
        .to_owned();
    use base64::Engine as _;
    let pem = base64::engine::general_purpose::STANDARD
        .decode(key)
        .expect("base64");
    let dir = tempfile::tempdir().expect("tempdir");
    let key_path = dir.path().join("key");
    std::fs::write(&key_path, pem).expect("write key");
    std::fs::set_permissions(&key_path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod");
    let public = Command::new("ssh-keygen")
        .arg("-y")
        .arg("-f")
        .arg(&key_path)
        .output()
        .expect("ssh-keygen");
    assert!(
        public.status.success(),
        "ssh-keygen cannot read the generated node key: {}",
        String::from_utf8_lossy(&public.stderr)
    );
    // The registry trusts only the operator's tokens: token auth with the certificate of the operator's
    // token key (no htpasswd: no password the registry itself accepts), realm = the operator's Service.
    assert!(
        !object_ids(&docs)
            .iter()
            .any(|(_, _, name)| name == "walt-registry-htpasswd"),
        "an htpasswd Secret is rendered with token auth"
    );
    let registry_config: Value = serde_saphyr::from_str(
        find(&docs, "ConfigMap", "walt-registry")["data"]["config.yml"]
            .as_str()
            .expect("config.yml"),
    )
    .expect("registry config");
    let token = &registry_config["auth"]["token"];
    assert_eq!(
        token["realm"],
        Value::from("http://walt-registry-token.walt-system.svc:5002/token")
    );
    assert_eq!(token["service"], Value::from("walt-registry"));
    assert_eq!(token["issuer"], Value::from("walt-operator"));
    assert!(
        registry_config["auth"]["htpasswd"].is_null(),
        "{registry_config:?}"
    );
    let token_secret = &find(&docs, "Secret", "walt-registry-token")["data"];
    let decode = |key: &str| {
        String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(token_secret[key].as_str().expect("key"))
                .expect("b64"),
        )
        .expect("utf8")
    };
    assert!(decode("tls.key").starts_with("-----BEGIN EC PRIVATE KEY-----"));
    assert!(decode("tls.crt").starts_with("-----BEGIN CERTIFICATE-----"));
    assert!(decode("tenant-secret").len() >= 32);

    // binfmt agent: privileged, from the same image, checks periodically.
    let binfmt = &find(&docs, "DaemonSet", "walt-binfmt")["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(binfmt["securityContext"]["privileged"], Value::from(true));
    assert_eq!(binfmt["image"], container["image"]);
    assert_eq!(binfmt["args"][0], Value::from("binfmt"));
    let args: Vec<&str> = binfmt["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let binfmt_help = deploy::run(Command::new(&operator_binary).args(&args).arg("--help"))
        .expect("walt-operator binfmt --help");
    assert!(binfmt_help.contains("--watch"), "{binfmt_help}");
}

/// Issue 15: no user role writes status (only the operator does, so the gateway can trust it).
#[test]
fn no_user_role_writes_status() {
    let docs = render_chart(&[]).expect("helm template");
    for role in ["walt-view", "walt-edit", "walt-admin"] {
        let rules = find(&docs, "ClusterRole", role)["rules"]
            .as_array()
            .expect("rules");
        for rule in rules {
            let status = rule["resources"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .any(|resource| resource.ends_with("/status") || resource == "*");
            let writes = rule["verbs"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .any(|verb| !matches!(verb, "get" | "list" | "watch"));
            assert!(!(status && writes), "{role} writes status: {rule:?}");
        }
    }
}

/// The operator's egress is the API server, DNS, the embedded registry, virtual node pods (22), and
/// only the registries and device networks the lab lists; the session ceilings reach the operator
/// and the admission policy's parameter.
#[test]
fn operator_egress_and_session_ceilings_are_what_the_lab_lists() {
    let docs = render_chart(&[
        "--set",
        "networkPolicy.egress.apiServerCIDRs={10.0.0.10/32}",
        "--set",
        "networkPolicy.egress.deviceNetworks[0].cidr=192.168.152.0/24",
        "--set",
        "networkPolicy.egress.deviceNetworks[0].ports={22,2222}",
        "--set",
        "networkPolicy.egress.registries[0].cidr=198.51.100.7/32",
        "--set",
        "networkPolicy.egress.registries[0].ports={443}",
        "--set",
        "sessionLimits.maxTtl=4h",
        "--set",
        "sessionLimits.maxIdleTimeout=30m",
    ])
    .expect("helm template");
    let policy = &find(&docs, "NetworkPolicy", "walt-operator")["spec"];
    assert_eq!(
        policy["policyTypes"],
        serde_saphyr::from_str::<Value>("[Ingress, Egress]").expect("yaml")
    );
    let egress = policy["egress"].as_array().expect("egress rules");
    let blocks: Vec<(String, Vec<u64>)> = egress
        .iter()
        .flat_map(|rule| {
            let ports: Vec<u64> = rule["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|port| port["port"].as_u64())
                .collect();
            rule["to"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|to| to["ipBlock"]["cidr"].as_str())
                .map(move |cidr| (cidr.to_owned(), ports.clone()))
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(
        blocks,
        [
            ("10.0.0.10/32".to_owned(), vec![443, 6443]),
            ("198.51.100.7/32".to_owned(), vec![443]),
            ("192.168.152.0/24".to_owned(), vec![22, 2222]),
        ]
    );
    assert!(
        egress.iter().all(|rule| !rule["to"].is_null()),
        "an egress rule open to every address: {egress:?}"
    );
    let dns = serde_saphyr::to_string(egress).expect("yaml");
    assert!(dns.contains("kube-system") && dns.contains("port: 53"), "{dns}");
    assert!(dns.contains("walt.dev/node"), "virtual node pods: {dns}");

    let limits = find(&docs, "ConfigMap", "walt-session-limits");
    assert_eq!(limits["data"]["maxTtl"], Value::from("4h"));
    assert_eq!(limits["data"]["maxIdleTimeout"], Value::from("30m"));
    let env = find(&docs, "Deployment", "walt-operator")["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .expect("env")
        .clone();
    let value = |name: &str| {
        env.iter()
            .find(|e| e["name"] == name)
            .map_or_else(|| panic!("no {name}"), |e| e["value"].clone())
    };
    assert_eq!(value("WALT_MAX_SESSION_TTL"), Value::from("4h"));
    assert_eq!(value("WALT_MAX_SESSION_IDLE_TIMEOUT"), Value::from("30m"));
    let binding = find(&docs, "ValidatingAdmissionPolicyBinding", "walt-session-limits");
    assert_eq!(
        binding["spec"]["paramRef"]["name"],
        Value::from("walt-session-limits")
    );
    assert_eq!(binding["spec"]["validationActions"][0], Value::from("Deny"));

    let error = helm_fails(&["--set", "sessionLimits.maxTtl=forever"]);
    assert!(error.contains("maxTtl"), "{error}");
    let error = helm_fails(&["--set", "networkPolicy.egress.deviceNetworks[0].cidr=lab"]);
    assert!(error.contains("deviceNetworks"), "{error}");
}

#[test]
fn chart_options_change_what_is_rendered() {
    // External registry: no embedded registry objects, the operator points at the external one.
    let docs = render_chart(&[
        "--set",
        "registry.embedded.enabled=false",
        "--set",
        "registry.external=registry.example.org",
        "--set",
        "registry.insecure=false",
        "--set",
        "serviceMonitor.enabled=true",
    ])
    .expect("helm template");
    let got = object_ids(&docs);
    for gone in ["walt-registry", "walt-registry-credentials"] {
        assert!(
            !got.iter().any(|(_, _, name)| name == gone),
            "{gone} rendered with an external registry"
        );
    }
    assert!(got.contains(&(
        "ServiceMonitor".into(),
        "walt-system".into(),
        "walt-operator".into()
    )));
    let operator = find(&docs, "Deployment", "walt-operator");
    let env = operator["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .expect("env");
    let registry = env
        .iter()
        .find(|e| e["name"] == "WALT_LAB_REGISTRY")
        .expect("WALT_LAB_REGISTRY");
    assert_eq!(registry["value"], Value::from("registry.example.org/walt"));

    // Existing secrets are used, not generated.
    let docs = render_chart(&[
        "--set",
        "nodeKey.existingSecret=my-key",
        "--set",
        "registry.credentials.existingSecret=my-creds",
    ])
    .expect("helm template");
    let got = object_ids(&docs);
    assert!(
        !got.iter()
            .any(|(k, _, n)| k == "Secret" && (n == "walt-node-key" || n == "walt-registry-credentials"))
    );

    // The schema refuses bad values with a message naming them.
    let error = helm_fails(&["--set", "registry.embedded.enabled=false"]);
    assert!(error.contains("external"), "{error}");
    let error = helm_fails(&["--set", "operator.replicas=-1"]);
    assert!(error.contains("replicas"), "{error}");
    let error = helm_fails(&["--set", "operator.leaderElection.enabled=false"]);
    assert!(error.contains("replicas") || error.contains("maximum"), "{error}");
    let error = helm_fails(&["--set", "operator.logFormat=xml"]);
    assert!(error.contains("logFormat"), "{error}");
    let error = helm_fails(&["--set", "imageTypo=1"]);
    assert!(error.contains("imageTypo"), "{error}");
}

/// VM nodes: off unless `vmNodes.image` is set; then the operator is given their image, accelerator,
/// and for each boot network its bridge (`bridge`, else `interface`) and cluster nodes.
#[test]
fn vm_nodes_run_on_each_boot_networks_bridge() {
    let operator_env = |docs: &[Value]| -> Vec<Value> {
        find(docs, "Deployment", "walt-operator")["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_array()
            .expect("env")
            .clone()
    };
    let value_of =
        |env: &[Value], name: &str| env.iter().find(|e| e["name"] == name).map(|e| e["value"].clone());
    let defaults = operator_env(&render_chart(&[]).expect("helm template"));
    assert_eq!(
        value_of(&defaults, "WALT_VM_IMAGE"),
        None,
        "no VM nodes by default"
    );
    let docs = render_chart(&[
        "--set",
        "vmNodes.image=registry.example.org/walt/vm:1",
        "--set",
        "bootService.enabled=true",
        "--set",
        "bootService.networks[0].name=default",
        "--set",
        "bootService.networks[0].listen=192.168.152.1",
        "--set",
        "bootService.networks[0].interface=br-lab",
        "--set",
        "bootService.networks[0].nodeSelector.lab=gw",
        "--set",
        "bootService.networks[0].unregisteredAddresses=192.168.152.200-192.168.152.249",
        "--set",
        "bootService.defaultImages.pc-x86-64=pc-default",
        "--set",
        "bootService.networks[1].name=lab2",
        "--set",
        "bootService.networks[1].listen=10.9.0.1",
        "--set",
        "bootService.networks[1].interface=eth2",
        "--set",
        "bootService.networks[1].bridge=br-lab2",
    ])
    .expect("helm template");
    let env = operator_env(&docs);
    assert_eq!(
        value_of(&env, "WALT_VM_IMAGE"),
        Some(Value::from("registry.example.org/walt/vm:1"))
    );
    assert_eq!(value_of(&env, "WALT_VM_ACCEL"), Some(Value::from("auto")));
    assert_eq!(
        value_of(&env, "WALT_VM_NETWORK"),
        Some(Value::from("default=br-lab lab=gw,lab2=br-lab2"))
    );
}

/// The boot service: off by default; on, one Deployment per lab network on the host network, fed from
/// the cluster by a ServiceAccount that may only read Devices, Nodes and Images; the operator is told
/// where each network's boot records are and may reach them.
#[test]
fn boot_service_runs_one_instance_per_lab_network() {
    let defaults = object_ids(&render_chart(&[]).expect("helm template"));
    assert!(
        !defaults.iter().any(|(_, _, name)| name.starts_with("walt-boot")),
        "the boot service is off by default: {defaults:?}"
    );
    let docs = render_chart(&[
        "--set",
        "bootService.enabled=true",
        "--set",
        "bootService.networks[0].name=default",
        "--set",
        "bootService.networks[0].listen=192.168.152.1",
        "--set",
        "bootService.networks[0].interface=eth1",
        "--set",
        "bootService.networks[0].nodeSelector.lab=gw",
        "--set",
        "bootService.networks[0].unregisteredAddresses=192.168.152.200-192.168.152.249",
        "--set",
        "bootService.defaultImages.pc-x86-64=pc-default",
        "--set",
        "bootService.networks[1].name=lab2",
        "--set",
        "bootService.networks[1].listen=10.9.0.1",
        "--set",
        "bootService.networks[1].dhcp=off",
    ])
    .expect("helm template");
    let args_of = |name: &str| -> Vec<String> {
        let spec = &find(&docs, "Deployment", name)["spec"];
        assert_eq!(spec["replicas"], Value::from(1), "{name}: one active instance");
        assert_eq!(
            spec["template"]["spec"]["hostNetwork"],
            Value::from(true),
            "{name}"
        );
        spec["template"]["spec"]["containers"][0]["args"]
            .as_array()
            .expect("args")
            .iter()
            .filter_map(|a| a.as_str().map(str::to_owned))
            .collect()
    };
    let first = args_of("walt-boot-default");
    for arg in [
        "boot-server",
        "--from-cluster",
        "--network=default",
        "--listen=192.168.152.1",
        "--dhcp=authoritative",
        "--dhcp-interface=eth1",
        "--status-listen=192.168.152.1:9470",
        "--default-image=pc-x86-64=pc-default",
        "--unregistered-addresses=192.168.152.200-192.168.152.249",
    ] {
        assert!(first.contains(&arg.to_owned()), "{arg} in {first:?}");
    }
    assert_eq!(
        find(&docs, "Deployment", "walt-boot-default")["spec"]["template"]["spec"]["nodeSelector"]["lab"],
        Value::from("gw")
    );
    // /persist: one directory per (device, tenant) under a host directory of the lab's data.
    assert!(
        first.contains(&"--persist-dir=/var/lib/walt/persist".to_owned())
            && !first.iter().any(|a| a.starts_with("--persist-quota")),
        "{first:?}"
    );
    let pod = &find(&docs, "Deployment", "walt-boot-default")["spec"]["template"]["spec"];
    let volume = pod["volumes"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == "persist"))
        .expect("a persist volume");
    assert_eq!(volume["hostPath"]["path"], Value::from("/var/lib/walt/persist"));
    assert!(
        pod["containers"][0]["volumeMounts"]
            .to_string()
            .contains("/var/lib/walt/persist"),
        "{}",
        pod["containers"][0]["volumeMounts"]
    );
    let second = args_of("walt-boot-lab2");
    assert!(second.contains(&"--dhcp=off".to_owned()), "{second:?}");
    assert!(
        !second.iter().any(|a| a.starts_with("--unregistered-addresses")),
        "a network lends addresses only when told: {second:?}"
    );
    assert!(
        !second.iter().any(|a| a.starts_with("--dhcp-interface")),
        "{second:?}"
    );
    let rules = find(&docs, "ClusterRole", "walt-boot")["rules"]
        .as_array()
        .expect("rules")
        .clone();
    let writes: Vec<String> = rules
        .iter()
        .filter(|r| {
            r["verbs"]
                .as_array()
                .is_some_and(|v| v.iter().any(|v| v != "get" && v != "list" && v != "watch"))
        })
        .map(|r| format!("{} {}", r["resources"], r["verbs"]))
        .collect();
    assert_eq!(
        writes,
        [
            "[\"devices\"] [\"create\"]",
            "[\"devices/status\"] [\"get\",\"patch\"]",
            "[\"events\"] [\"create\",\"patch\"]"
        ],
        "reads walt's objects; writes only unknown devices' records, Device status and Events"
    );
    assert!(!Value::from(rules).to_string().contains("secrets"));
    // The Devices' host keys: Secrets read in the release namespace only, never written.
    let host_keys = find(&docs, "Role", "walt-boot-host-keys");
    assert_eq!(host_keys["metadata"]["namespace"], Value::from("walt-system"));
    assert_eq!(
        host_keys["rules"],
        serde_json::json!([{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "watch"]}])
    );
    assert_eq!(
        find(&docs, "RoleBinding", "walt-boot-host-keys")["subjects"][0]["name"],
        Value::from("walt-boot")
    );
    assert!(
        first.contains(&"--host-key-namespace=walt-system".to_owned()),
        "{first:?}"
    );
    let records_only = find(&docs, "ValidatingAdmissionPolicy", "walt-boot-records-only");
    assert_eq!(
        records_only["spec"]["matchConditions"][0]["expression"],
        "request.userInfo.username == 'system:serviceaccount:walt-system:walt-boot'"
    );
    assert!(
        args_of("walt-boot-default").contains(&"--max-unknown-devices=64".to_string()),
        "{:?}",
        args_of("walt-boot-default")
    );
    let env = find(&docs, "Deployment", "walt-operator")["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .expect("env")
        .clone();
    let urls = env
        .iter()
        .find(|e| e["name"] == "WALT_BOOT_STATUS_URL")
        .map(|e| e["value"].clone());
    assert_eq!(
        urls,
        Some(Value::from(
            "default=http://192.168.152.1:9470,lab2=http://10.9.0.1:9470"
        ))
    );
    let policy = find(&docs, "NetworkPolicy", "walt-operator")["spec"]["egress"].to_string();
    assert!(
        policy.contains("192.168.152.1/32") && policy.contains("9470"),
        "{policy}"
    );

    // No /persist when turned off; a quota when given.
    let boot_args = |extra: &[&str]| -> Vec<String> {
        let mut args = vec![
            "--set",
            "bootService.enabled=true",
            "--set",
            "bootService.networks[0].name=default",
            "--set",
            "bootService.networks[0].listen=192.168.152.1",
            "--set",
            "bootService.networks[0].dhcp=off",
        ];
        args.extend_from_slice(extra);
        let docs = render_chart(&args).expect("helm template");
        find(&docs, "Deployment", "walt-boot-default")["spec"]["template"]["spec"]["containers"][0]["args"]
            .as_array()
            .expect("args")
            .iter()
            .filter_map(|a| a.as_str().map(str::to_owned))
            .collect()
    };
    let off = boot_args(&["--set", "bootService.persist="]);
    assert!(!off.iter().any(|a| a.starts_with("--persist")), "{off:?}");
    let quota = boot_args(&["--set-string", "bootService.persistQuota=1073741824"]);
    assert!(
        quota.contains(&"--persist-quota=1073741824".to_owned()),
        "{quota:?}"
    );

    let error = helm_fails(&[
        "--set",
        "bootService.enabled=true",
        "--set",
        "bootService.networks[0].name=default",
        "--set",
        "bootService.networks[0].listen=lab-gw",
    ]);
    assert!(error.contains("listen"), "{error}");
}

#[test]
fn kustomize_base_is_the_chart_defaults() {
    // The checked-in base is exactly what `cargo xtask deploy sync` generates from the chart.
    let chart = render_chart(&[]).expect("helm template");
    let generated = deploy::generate_base(&chart).expect("generate");
    let checked_in = deploy::read_base(&deploy::base_dir()).expect("read deploy/base");
    assert!(
        generated == checked_in,
        "deploy/base is out of date with charts/walt: run `cargo xtask deploy sync` and commit the result"
    );

    // kubectl kustomize renders the same objects (kinds, namespaces, names) as helm template, but the
    // Secrets: none is kept in git, the operator creates them when missing.
    let copy = deploy::clean_checkout().expect("a clean checkout");
    let copy = copy.path().join("deploy");
    let without_secrets = |docs: &[Value]| {
        let mut ids = object_ids(docs);
        ids.retain(|(kind, _, _)| kind != "Secret");
        ids
    };
    let base = deploy::kustomize(&copy.join("base")).expect("kubectl kustomize deploy/base");
    assert_eq!(
        object_ids(&base),
        without_secrets(&chart),
        "kustomize base and chart defaults differ"
    );

    // Overlays render, and match the chart with the same options.
    let external = deploy::kustomize(&copy.join("overlays").join("external-registry")).expect("overlay");
    let chart_external = render_chart(&[
        "--set",
        "registry.embedded.enabled=false",
        "--set",
        "registry.external=registry.example.org",
        "--set",
        "registry.credentials.existingSecret=walt-registry-credentials",
    ])
    .expect("helm template");
    assert_eq!(
        object_ids(&external),
        without_secrets(&chart_external),
        "external-registry overlay"
    );
    // The operator is told the same Secrets as by the chart: with token auth (the default, an external
    // registry trusting walt's issuer too) the token Secret and no htpasswd; an htpasswd only for the
    // embedded registry without token auth.
    let env_names = |docs: &[Value]| -> BTreeSet<String> {
        find(docs, "Deployment", "walt-operator")["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_array()
            .expect("env")
            .iter()
            .filter_map(|e| e["name"].as_str().map(str::to_owned))
            .collect()
    };
    assert_eq!(env_names(&external), env_names(&chart_external));
    for docs in [&base, &external] {
        let names = env_names(docs);
        assert!(names.contains("WALT_REGISTRY_TOKEN_SECRET"), "{names:?}");
        assert!(!names.contains("WALT_REGISTRY_HTPASSWD_SECRET"), "{names:?}");
    }
    let htpasswd_only = render_chart(&["--set", "registry.tokenAuth.enabled=false"]).expect("helm template");
    let names = env_names(&htpasswd_only);
    assert!(names.contains("WALT_REGISTRY_HTPASSWD_SECRET"), "{names:?}");
    assert!(!names.contains("WALT_REGISTRY_TOKEN_SECRET"), "{names:?}");
    let monitoring = deploy::kustomize(&copy.join("overlays").join("monitoring")).expect("overlay");
    let chart_monitoring = render_chart(&["--set", "serviceMonitor.enabled=true"]).expect("helm template");
    assert_eq!(
        object_ids(&monitoring),
        without_secrets(&chart_monitoring),
        "monitoring overlay"
    );
}

#[test]
fn every_kustomization_renders_from_a_clean_checkout() {
    // What Argo CD or Flux sees: the tracked files only (git archive), no generated or git-ignored file.
    let checkout = deploy::clean_checkout().expect("a clean checkout");
    let deploy_dir = checkout.path().join("deploy");
    let kustomizations = deploy::kustomizations(&deploy_dir).expect("list kustomizations");
    let names: Vec<String> = kustomizations
        .iter()
        .filter_map(|dir| dir.strip_prefix(&deploy_dir).ok())
        .map(|dir| dir.display().to_string())
        .collect();
    for expected in ["base", "overlays/external-registry", "overlays/monitoring"] {
        assert!(names.iter().any(|n| n == expected), "no {expected} in {names:?}");
    }
    for dir in &kustomizations {
        let docs = deploy::kustomize(dir)
            .unwrap_or_else(|e| panic!("kubectl kustomize {} from a clean checkout: {e}", dir.display()));
        let ids = object_ids(&docs);
        assert!(
            ids.iter()
                .any(|(kind, _, name)| kind == "Deployment" && name == "walt-operator"),
            "{} renders no operator",
            dir.display()
        );
        assert!(
            !ids.iter().any(|(kind, _, _)| kind == "Secret"),
            "{} renders a Secret: secrets stay out of git",
            dir.display()
        );
    }

    // The GitOps examples point at a kustomization that exists in the repository.
    let gitops = deploy_dir.join("examples").join("gitops");
    let read = |name: &str| {
        let path = gitops.join(name);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        deploy::parse_documents(&text, name).expect("YAML")
    };
    let is_a_kustomization = |path: &str| {
        deploy_dir
            .parent()
            .expect("root")
            .join(path)
            .join("kustomization.yaml")
            .is_file()
    };
    let argo = read("argocd-application.yaml");
    let application = find(&argo, "Application", "walt");
    let path = application["spec"]["source"]["path"]
        .as_str()
        .expect("source.path");
    assert!(is_a_kustomization(path), "Argo CD's source.path {path}");
    assert_eq!(
        application["spec"]["destination"]["namespace"],
        Value::from("walt-system")
    );
    let flux = read("flux.yaml");
    let kustomization = find(&flux, "Kustomization", "walt");
    assert_eq!(
        kustomization["apiVersion"],
        Value::from("kustomize.toolkit.fluxcd.io/v1")
    );
    let path = kustomization["spec"]["path"].as_str().expect("spec.path");
    assert!(is_a_kustomization(path), "Flux's spec.path {path}");
    let source = &kustomization["spec"]["sourceRef"];
    let repository = find(
        &flux,
        "GitRepository",
        source["name"].as_str().expect("sourceRef.name"),
    );
    assert_eq!(
        repository["apiVersion"],
        Value::from("source.toolkit.fluxcd.io/v1")
    );
    find(&flux, "Namespace", "walt-system");
}

/// A loopback Distribution registry (Debian's docker-registry), stopped by PID when dropped.
struct Registry {
    child: std::process::Child,
    address: String,
    _dir: tempfile::TempDir,
}

impl Registry {
    fn start() -> Registry {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let address = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nstorage: {{filesystem: {{rootdirectory: {}}}, delete: {{enabled: true}}}}\nhttp: {{addr: {address}}}\n",
                dir.path().join("data").display()
            ),
        )
        .expect("config");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("docker-registry is missing: apt-get install docker-registry");
        let registry = Registry {
            child,
            address,
            _dir: dir,
        };
        walt_tests::wait::Wait::new(
            &format!("docker-registry to listen on {}", registry.address),
            std::time::Duration::from_secs(20),
        )
        .every(std::time::Duration::from_millis(100))
        .until(|| match std::net::TcpStream::connect(&registry.address) {
            Ok(_) => walt_tests::wait::Poll::Ready(()),
            Err(e) => walt_tests::wait::Poll::Pending(e.to_string()),
        })
        .unwrap_or_else(|e| panic!("{e}"));
        registry
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// ELF machine (e_machine) of a binary, and whether it is static (no PT_INTERP program header).
fn elf_machine_and_static(bytes: &[u8]) -> (u16, bool) {
    assert_eq!(&bytes[..4], b"\x7fELF", "not an ELF file");
    assert_eq!(bytes[4], 2, "not a 64-bit ELF");
    let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
    let u64_at = |at: usize| {
        let mut raw = [0u8; 8];
        raw.copy_from_slice(&bytes[at..at + 8]);
        u64::from_le_bytes(raw)
    };
    let machine = u16_at(18);
    let phoff = u64_at(32) as usize;
    let phentsize = usize::from(u16_at(54));
    let phnum = usize::from(u16_at(56));
    let has_interp = (0..phnum).any(|i| {
        let at = phoff + i * phentsize;
        u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]) == 3
    });
    (machine, !has_interp)
}

#[test]
fn image_is_a_multi_arch_index_of_static_binaries() {
    let registry = Registry::start();
    let reference = format!("{}/walt/operator:test", registry.address);
    let xtask = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args([
            "xtask",
            "image",
            "build",
            "--profile",
            "dist-check",
            "--push",
            &reference,
        ])
        .current_dir(deploy::repo_root())
        .output()
        .expect("run cargo xtask image build");
    let shown = String::from_utf8_lossy(&xtask.stdout).into_owned();
    assert!(
        xtask.status.success(),
        "cargo xtask image build failed:\n{shown}{}",
        String::from_utf8_lossy(&xtask.stderr)
    );
    assert!(shown.contains("pushed "), "{shown}");

    // skopeo: one index with both platforms.
    let raw = deploy::run(
        Command::new("skopeo")
            .args(["inspect", "--raw", "--tls-verify=false"])
            .arg(format!("docker://{reference}")),
    )
    .expect("skopeo inspect");
    let index: serde_json::Value = serde_json::from_str(&raw).expect("index JSON");
    assert_eq!(index["mediaType"], "application/vnd.oci.image.index.v1+json");
    let arches: BTreeSet<&str> = index["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .filter_map(|m| m["platform"]["architecture"].as_str())
        .collect();
    assert_eq!(arches, BTreeSet::from(["amd64", "arm64"]));

    // umoci: each platform unpacks to the static binary of its CPU, the interpreters and nothing to run besides.
    for (arch, machine, interpreters) in [
        ("amd64", 62u16, vec!["aarch64-binfmt-P", "arm-binfmt-P"]),
        ("arm64", 183u16, vec!["x86_64-binfmt-P"]),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let layout = dir.path().join("oci");
        deploy::run(
            Command::new("skopeo")
                .args([
                    "copy",
                    "--quiet",
                    "--src-tls-verify=false",
                    "--override-arch",
                    arch,
                ])
                .arg(format!("docker://{reference}"))
                .arg(format!("oci:{}:{arch}", layout.display())),
        )
        .expect("skopeo copy");
        let bundle = dir.path().join("bundle");
        deploy::run(
            Command::new("umoci")
                .args(["unpack", "--rootless", "--image"])
                .arg(format!("{}:{arch}", layout.display()))
                .arg(&bundle),
        )
        .expect("umoci unpack");
        let rootfs = bundle.join("rootfs");
        let binary =
            std::fs::read(rootfs.join("usr/local/bin/walt-operator")).expect("walt-operator in the image");
        assert_eq!(
            elf_machine_and_static(&binary),
            (machine, true),
            "{arch}: walt-operator is not a static binary for its CPU"
        );
        for interpreter in interpreters {
            let bytes = std::fs::read(rootfs.join("usr/libexec/qemu-binfmt").join(interpreter))
                .expect("qemu interpreter");
            assert_eq!(
                elf_machine_and_static(&bytes).0,
                machine,
                "{arch}: {interpreter} is not built for the image's CPU"
            );
        }
        for absent in ["bin/sh", "usr/bin/apt", "sbin/apk", "bin/busybox"] {
            assert!(
                !rootfs.join(absent).exists(),
                "{arch}: the image carries {absent}"
            );
        }
    }
}
