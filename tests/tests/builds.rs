//! Image builds on the cluster tier: `kubectl walt image build` through the real plugin and the real
//! operator, the build running in a real build pod (kubelet + containerd + runc) of the walt image.
//!
//! One test, because one cluster start serves every step (the machine has 2 cores):
//! The tenant's namespace is at Pod Security `baseline`: the build pods (privileged here, no user
//! namespaces) run in its runtime namespace `walt-run-<ns>`, where the plugin attaches.
//!
//! 1. `--from-dir`, amd64: `COPY` of a context directory (`.dockerignore` honoured on the client) and
//!    `RUN` steps; the plugin prints the step's output and a progress line per step; the operator tags
//!    the result and creates the Image, whose digest is the registry's; skopeo + umoci show the files;
//!    no build pod is left.
//! 2. A failing `RUN` with `--overwrite`: exit status 1, the step and its output said, the image's tag
//!    not moved.
//! 3. `--from-url` (a local git repository, cloned by the plugin with git) of an arm64 image that
//!    installs a service, its `RUN` emulated through qemu-user: the result says emulated, the files are
//!    arm64's, the ImageBuild records the commit.
//! 4. `kubectl walt image shell` into that built arm64 image (emulated): the service it installed runs;
//!    leaving it unchanged moves no tag.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use walt_tests::image_build::Arch;
use walt_tests::k8s::{Cluster, ClusterOptions};
use walt_tests::operator::OperatorProcess;
use walt_tests::operator_lab::{OperatorLab, kubectl};
use walt_tests::pty::Pty;
use walt_tests::wait::{Poll, Wait};

fn jsonpath(cluster: &Cluster, ns: &str, object: &str, path: &str) -> String {
    cluster
        .kubectl_output(&["-n", ns, "get", object, "-o", &format!("jsonpath={path}")])
        .unwrap_or_default()
        .trim()
        .to_owned()
}

fn wait_jsonpath(
    cluster: &Cluster,
    ns: &str,
    object: &str,
    path: &str,
    want: &str,
    operator: &OperatorProcess,
) {
    Wait::new(&format!("{object} {path} to be {want:?}"), Duration::from_mins(3))
        .every(Duration::from_millis(500))
        .until(|| {
            let last = jsonpath(cluster, ns, object, path);
            if last == want {
                Poll::Ready(())
            } else {
                Poll::Pending(format!("{last:?}"))
            }
        })
        .unwrap_or_else(|e| panic!("{e}\noperator log (end):\n{}", tail(&operator.log(), 60)));
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, text).expect("write");
}

/// Unpacks `reference` with skopeo + umoci; returns the root filesystem.
fn unpack(reference: &str, dir: &Path) -> std::path::PathBuf {
    let layout = dir.join(format!("oci-{}", reference.replace(['/', ':', '.'], "_")));
    let out = Command::new("skopeo")
        .args(["copy", "--src-tls-verify=false"])
        .arg(format!("docker://{reference}"))
        .arg(format!("oci:{}:x", layout.display()))
        .output()
        .expect("run skopeo");
    assert!(
        out.status.success(),
        "skopeo copy {reference}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bundle = dir.join(format!("bundle-{}", reference.replace(['/', ':', '.'], "_")));
    let out = Command::new("umoci")
        .args(["unpack", "--rootless", "--image"])
        .arg(format!("{}:x", layout.display()))
        .arg(&bundle)
        .output()
        .expect("run umoci");
    assert!(
        out.status.success(),
        "umoci unpack: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    bundle.join("rootfs")
}

fn digest_of(reference: &str) -> String {
    walt_tests::lab::remote_digest(reference, &walt_tests::registry_auth::RegistryAuth::Anonymous)
        .unwrap_or_default()
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args([
            "-c",
            "user.name=walt-test",
            "-c",
            "user.email=walt-test@localhost",
            "-C",
        ])
        .arg(dir)
        .args(args)
        .output()
        .expect("run git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

// Long by design: one cluster start serves the whole story (see the module docs).
#[test]
fn image_builds_on_the_cluster_tier() {
    let Some(lab) = OperatorLab::start(
        ClusterOptions::cluster(),
        "builds",
        &[("base", Arch::Amd64), ("base-arm", Arch::Arm64)],
    ) else {
        return;
    };
    let (cluster, registry, for_pods, ns, work, operator, plugin) = (
        &lab.cluster,
        &lab.registry,
        &lab.for_pods,
        &lab.ns,
        &lab.work,
        &lab.operator,
        &lab.plugin,
    );
    let runtime = walt_crds::runtime_namespace(ns);
    let walt = |args: &[&str]| {
        let output = Command::new(plugin)
            .args(["-n", ns])
            .args(args)
            .env("KUBECONFIG", cluster.kubeconfig())
            .output()
            .expect("run kubectl walt");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };

    // 1. --from-dir, amd64: COPY + RUN, the result checked in the registry.
    let context = work.path().join("context");
    write(
        &context.join("Dockerfile"),
        &format!(
            "FROM {for_pods}/lab/{ns}/base:latest\nCOPY app/ /opt/app/\n\
             RUN echo visible-step-output && echo built-on-$(uname -m) > /etc/built && cat /opt/app/hello.txt >> /etc/built\n\
             LABEL walt.node.models=pc-x86-64\n"
        ),
    );
    write(&context.join(".dockerignore"), "app/secret.txt\n");
    write(&context.join("app/hello.txt"), "hello from the context\n");
    write(&context.join("app/secret.txt"), "never sent\n");
    let (code, stdout, stderr) = walt(&[
        "image",
        "build",
        "--from-dir",
        &context.display().to_string(),
        "built",
    ]);
    assert_eq!(
        code,
        Some(0),
        "image build:\n{stdout}\n{stderr}\noperator:\n{}",
        tail(&operator.log(), 60)
    );
    assert!(
        stdout.contains("visible-step-output"),
        "the step's own output is streamed:\n{stdout}"
    );
    assert!(
        stderr.contains("[3/4 ") && stderr.contains("] RUN echo visible-step-output"),
        "a progress line per step:\n{stderr}"
    );
    assert!(stdout.contains("Built built: sha256:"), "{stdout}");
    assert!(
        !stdout.contains("\"layersPushed\""),
        "the build's JSON result is for the operator, not the terminal:\n{stdout}"
    );
    let reference = format!("{registry}/lab/{ns}/built:latest");
    let digest = digest_of(&reference);
    assert!(digest.starts_with("sha256:"), "the tag exists: {digest:?}");
    wait_jsonpath(
        cluster,
        ns,
        "image.walt.dev/built",
        "{.status.digest}",
        &digest,
        operator,
    );
    let build_name = kubectl(
        cluster,
        &[
            "-n",
            ns,
            "get",
            "imagebuilds",
            "-o",
            "jsonpath={.items[0].metadata.name}",
        ],
    );
    assert_eq!(
        jsonpath(
            cluster,
            ns,
            &format!("imagebuild/{build_name}"),
            "{.status.phase} {.status.result.digest} {.status.podNamespace}"
        ),
        format!("Succeeded {digest} {runtime}")
    );
    let rootfs = unpack(&reference, work.path());
    assert_eq!(
        std::fs::read_to_string(rootfs.join("etc/built")).expect("the RUN step's file"),
        "built-on-x86_64\nhello from the context\n"
    );
    assert!(rootfs.join("opt/app/hello.txt").is_file(), "COPY");
    assert!(
        !rootfs.join("opt/app/secret.txt").exists(),
        ".dockerignore kept it on this machine"
    );
    assert!(rootfs.join("bin/busybox").exists(), "the base's files");
    // The operator deletes the pod once the Image is updated (its grace period runs after).
    Wait::new("the build pod to be deleted", Duration::from_mins(1))
        .every(Duration::from_millis(500))
        .until(|| {
            let left = kubectl(
                cluster,
                &[
                    "-n",
                    &runtime,
                    "get",
                    "pods",
                    "-l",
                    "walt.dev/image-build",
                    "-o",
                    "name",
                ],
            );
            if left.trim().is_empty() {
                Poll::Ready(())
            } else {
                Poll::Pending(left)
            }
        })
        .unwrap_or_else(|e| panic!("{e}"));

    // 2. A failing RUN: the step and its output are said, the tag does not move.
    write(
        &context.join("Dockerfile"),
        &format!("FROM {for_pods}/lab/{ns}/base:latest\nRUN echo failing-output && exit 7\n"),
    );
    let (code, stdout, stderr) = walt(&[
        "image",
        "build",
        "--from-dir",
        &context.display().to_string(),
        "--overwrite",
        "--yes",
        "built",
    ]);
    assert_eq!(code, Some(1), "{stdout}\n{stderr}");
    assert!(stdout.contains("failing-output"), "the step's output:\n{stdout}");
    assert!(
        stderr.contains("(BuildFailed): step 2/2 (Dockerfile line 2) RUN echo failing-output && exit 7: the command exited with status 7"),
        "{stderr}"
    );
    assert_eq!(digest_of(&reference), digest, "no tag moved");

    // 3. --from-url of a local repository: an arm64 image that installs a service, RUN emulated.
    let repo = work.path().join("repo");
    write(
        &repo.join("images/arm/Dockerfile"),
        &format!(
            "FROM {for_pods}/lab/{ns}/base-arm:latest\nCOPY hello-service /etc/init.d/S50hello\n\
             RUN chmod 0755 /etc/init.d/S50hello && echo arch-$(uname -m) > /etc/hello-arch\n"
        ),
    );
    write(
        &repo.join("images/arm/hello-service"),
        "#!/bin/sh\necho hello service\n",
    );
    git(&repo, &["init", "-q", "-b", "main"]);
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-q", "-m", "arm image"]);
    let commit = git(&repo, &["rev-parse", "HEAD"]);
    let url = format!("file://{}", repo.display());
    let (code, stdout, stderr) = walt(&[
        "image",
        "build",
        "--from-url",
        &url,
        "--ref",
        "main",
        "--sub-dir",
        "images/arm",
        "built-arm",
    ]);
    assert_eq!(
        code,
        Some(0),
        "image build --from-url:\n{stdout}\n{stderr}\noperator:\n{}",
        tail(&operator.log(), 60)
    );
    assert!(stdout.contains("(arm64, emulated, "), "{stdout}");
    let rootfs = unpack(&format!("{registry}/lab/{ns}/built-arm:latest"), work.path());
    assert_eq!(
        std::fs::read_to_string(rootfs.join("etc/hello-arch")).expect("file"),
        "arch-aarch64\n"
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(rootfs.join("etc/init.d/S50hello"))
            .expect("the service")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o755, "the service script is executable");
    let recorded = kubectl(
        cluster,
        &[
            "-n",
            ns,
            "get",
            "imagebuilds",
            "-o",
            "jsonpath={.items[*].spec.source.git.commit}",
        ],
    );
    assert_eq!(
        recorded, commit,
        "the ImageBuild records the commit it was built from"
    );

    // 4. An image shell into the built arm64 image: the service is there and runs, emulated; a shell
    // that changed nothing ends without the dialogue and moves no tag.
    let before = digest_of(&format!("{registry}/lab/{ns}/built-arm:latest"));
    let mut shell = Command::new(plugin);
    shell
        .args(["-n", ns, "image", "shell", "built-arm"])
        .env("KUBECONFIG", cluster.kubeconfig());
    let mut pty = Pty::spawn(&shell);
    pty.expect_within("Type `exit` or Ctrl-D", Duration::from_mins(4));
    std::thread::sleep(Duration::from_secs(2));
    pty.send("/etc/init.d/S50hello; cat /etc/hello-arch; echo shell-on-$(uname -m)\n");
    pty.expect_within("shell-on-aarch64", Duration::from_mins(1));
    let shown = pty.text();
    assert!(
        shown.contains("hello service"),
        "the built service runs:\n{shown}"
    );
    assert!(shown.contains("arch-aarch64"), "the build's file:\n{shown}");
    pty.send("exit\n");
    let (code, shown) = pty.wait_within(Duration::from_mins(2));
    assert_eq!(code, 0, "{shown}");
    assert!(
        shown.contains("No changes: image built-arm was left as it was."),
        "{shown}"
    );
    assert_eq!(
        digest_of(&format!("{registry}/lab/{ns}/built-arm:latest")),
        before,
        "a shell that changed nothing moves no tag"
    );
}
