//! Component tests of `walt-operator build` with real parts: the real binary, a real registry (Debian's
//! docker-registry), busybox images made from Debian packages (amd64, and arm64 through qemu-user), and
//! skopeo + umoci as independent checkers of what was pushed. They run as root.
#![allow(clippy::unwrap_used)] // a failed step is a failed test

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use serde_json::Value;
use walt_tests::images::{self, Arch, OciLayout};
use walt_tests::registry::Registry;

fn bin() -> String {
    std::env::var("WALT_OPERATOR_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_walt-operator").to_string())
}

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the build tests need root (mounts, namespaces): run them as root"
    );
}

fn require_arm64_emulation() {
    let entry = fs::read_to_string("/proc/sys/fs/binfmt_misc/qemu-aarch64").unwrap_or_default();
    assert!(
        entry.starts_with("enabled") && entry.contains("flags: PF"),
        "arm64 emulation is not enabled: apt-get install qemu-user-static binfmt-support; \
         mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc; \
         update-binfmts --enable qemu-aarch64"
    );
}

/// A registry holding `lab/base:1`, a busybox image of `arch` labelled `walt.node.models=rpi-b`.
fn registry_with_base(arch: Arch) -> Registry {
    let registry = Registry::start().unwrap();
    let layout = OciLayout::walt_busybox(arch, "rpi-b").unwrap();
    layout.push("base", &registry, "lab/base:1").unwrap();
    registry
}

struct Build {
    output: Output,
    seconds: f64,
}

impl Build {
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }

    fn text(&self) -> String {
        format!(
            "{}{}",
            self.stdout(),
            String::from_utf8_lossy(&self.output.stderr)
        )
    }

    fn result(&self) -> Value {
        assert!(self.output.status.success(), "the build failed:\n{}", self.text());
        let stdout = self.stdout();
        let last = stdout.lines().last().unwrap_or_default();
        serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: last line {last:?}\n{}", self.text()))
    }
}

fn build(registry: &Registry, context: &Path, cache: &Path, target: &str, extra: &[&str]) -> Build {
    let started = Instant::now();
    let output = Command::new(bin())
        .arg("build")
        .arg("--context")
        .arg(context)
        .arg("--to")
        .arg(registry.reference(target))
        .arg("--insecure-registry")
        .arg(registry.host())
        .arg("--cache-dir")
        .arg(cache)
        .args(extra)
        .output()
        .unwrap();
    Build {
        output,
        seconds: started.elapsed().as_secs_f64(),
    }
}

fn write(path: &Path, content: &str, mode: u32) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, content).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

const DOCKERFILE: &str = r#"# syntax=docker/dockerfile:1
# A Dockerfile with every instruction walt builds support.
ARG BASE
FROM ${BASE} AS build
RUN echo compiled-$(uname -m) > /artifact

FROM ${BASE}
ARG GREETING=hello
ARG TARGETARCH
ENV APP_HOME=/opt/app \
    MESSAGE="${GREETING} world"
WORKDIR $APP_HOME
COPY --chown=1001:1001 files/ ./files/
COPY src/*.txt /srv/
COPY ["with space.txt", "/srv/"]
ADD data.tar.gz /data/
COPY --from=build /artifact /usr/share/artifact
COPY --chmod=0755 tool.sh /usr/local/bin/tool
RUN echo 'walt:x:1001:1001::/home/walt:/bin/sh' >> /etc/passwd \
 && (grep Seccomp: /proc/self/status; unshare -U true 2>&1; echo rc=$?) > /seccomp \
 && echo 'lab:x:1001:' >> /etc/group \
 && mkdir -p /home/walt && chown walt:lab /home/walt \
 && rm /etc/inittab \
 && echo "$MESSAGE $TARGETARCH $(uname -m)" > greeting
USER walt
RUN id -u > /home/walt/uid && tool > /home/walt/tool-out
USER root
SHELL ["/bin/sh", "-ec"]
LABEL version=1.0 description="built by walt"
EXPOSE 8080
STOPSIGNAL SIGINT
CMD ["--serve"]
ENTRYPOINT ["/usr/local/bin/tool"]
"#;

/// The context of [`DOCKERFILE`].
fn full_context(dir: &Path) {
    write(&dir.join("Dockerfile"), DOCKERFILE, 0o644);
    write(&dir.join(".dockerignore"), "*.log\nfiles/secret\n", 0o644);
    write(&dir.join("build.log"), "not sent\n", 0o644);
    write(&dir.join("files/a.conf"), "a=1\n", 0o640);
    write(&dir.join("files/sub/b"), "b\n", 0o600);
    write(&dir.join("files/secret/key"), "secret\n", 0o600);
    write(&dir.join("src/one.txt"), "one\n", 0o644);
    write(&dir.join("src/two.txt"), "two\n", 0o644);
    write(&dir.join("src/skip.md"), "skip\n", 0o644);
    write(&dir.join("with space.txt"), "space\n", 0o644);
    write(&dir.join("tool.sh"), "#!/bin/sh\necho tool-ran\n", 0o644);
    // A gzip tar with an entry owned by 42:42, extracted by ADD.
    let file = fs::File::create(dir.join("data.tar.gz")).unwrap();
    let mut archive = tar::Builder::new(flate2::write::GzEncoder::new(file, flate2::Compression::fast()));
    let mut header = tar::Header::new_gnu();
    let content = b"inner\n";
    header.set_size(content.len() as u64);
    header.set_mode(0o644);
    header.set_uid(42);
    header.set_gid(42);
    header.set_mtime(1_700_000_000);
    header.set_entry_type(tar::EntryType::Regular);
    archive
        .append_data(&mut header, "dir/inner.txt", &content[..])
        .unwrap();
    archive.into_inner().unwrap().finish().unwrap();
}

/// Every file of the registry's storage with its size and modification time.
fn storage_snapshot(registry: &Registry) -> BTreeMap<PathBuf, (u64, i64)> {
    fn walk(dir: &Path, out: &mut BTreeMap<PathBuf, (u64, i64)>) {
        for entry in fs::read_dir(dir).unwrap().flatten() {
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                walk(&entry.path(), out);
            } else {
                out.insert(
                    entry.path(),
                    (meta.len(), meta.mtime_nsec() + meta.mtime() * 1_000_000_000),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(&registry.storage_dir(), &mut out);
    out
}

fn every_instruction(arch: Arch) {
    require_root();
    let registry = registry_with_base(arch);
    let work = tempfile::tempdir().unwrap();
    let context = work.path().join("context");
    let cache = work.path().join("cache");
    full_context(&context);
    let base = registry.reference("lab/base:1");
    let args = [
        "--build-arg",
        &format!("BASE={base}"),
        "--build-arg",
        "GREETING=bonjour",
    ];
    let first = build(&registry, &context, &cache, "lab/built:1", &args);
    let result = first.result();
    let text = first.text();
    let (machine, name) = match arch {
        Arch::Amd64 => ("x86_64", "amd64"),
        Arch::Arm64 => ("aarch64", "arm64"),
    };
    assert_eq!(result["architecture"], name, "{result}");
    assert_eq!(result["emulated"], arch == Arch::Arm64, "{result}");
    assert_eq!(result["steps"], 23, "{result}");
    assert_eq!(result["pushed"], true);
    assert_eq!(result["cached"], 0);
    assert!(
        text.contains("STEP 8/23: COPY --chown=1001:1001 files/ ./files/"),
        "{text}"
    );
    assert!(text.contains(" ---> layer sha256:"), "{text}");
    eprintln!("{name}: first build {:.1} s", first.seconds);

    // Independent checkers: skopeo copies the image out, umoci unpacks it.
    let digest = images::skopeo_inspect_format(&registry, "lab/built:1", "{{.Digest}}").unwrap();
    assert_eq!(
        result["digest"].as_str(),
        Some(digest.as_str()),
        "the tag points at the pushed digest"
    );
    let check = tempfile::tempdir().unwrap();
    let rootfs = images::skopeo_umoci_unpack(&registry, "lab/built:1", check.path()).unwrap();
    let read = |path: &str| fs::read_to_string(rootfs.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    let meta = |path: &str| fs::symlink_metadata(rootfs.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert_eq!(read("opt/app/files/a.conf"), "a=1\n");
    assert_eq!(meta("opt/app/files/a.conf").mode() & 0o7777, 0o640);
    assert_eq!(
        (
            meta("opt/app/files/a.conf").uid(),
            meta("opt/app/files/a.conf").gid()
        ),
        (1001, 1001)
    );
    assert_eq!(meta("opt/app/files/sub/b").mode() & 0o7777, 0o600);
    assert_eq!(meta("opt/app/files/sub").uid(), 1001);
    assert!(
        !rootfs.join("opt/app/files/secret").exists(),
        ".dockerignore excludes files/secret"
    );
    assert!(!rootfs.join("opt/app/build.log").exists());
    assert_eq!(read("srv/one.txt"), "one\n");
    assert_eq!(read("srv/two.txt"), "two\n");
    assert!(!rootfs.join("srv/skip.md").exists(), "the glob picks *.txt only");
    assert_eq!(read("srv/with space.txt"), "space\n");
    assert_eq!(meta("srv/one.txt").uid(), 0, "COPY without --chown: root");
    assert_eq!(read("data/dir/inner.txt"), "inner\n");
    assert_eq!(
        meta("data/dir/inner.txt").uid(),
        42,
        "ADD keeps the archive's owners"
    );
    assert_eq!(
        read("usr/share/artifact"),
        format!("compiled-{machine}\n"),
        "COPY --from a stage"
    );
    assert_eq!(
        meta("usr/local/bin/tool").mode() & 0o7777,
        0o755,
        "--chmod (the context file is 0644)"
    );
    assert_eq!(
        read("opt/app/greeting"),
        format!("bonjour world {name} {machine}\n")
    );
    assert_eq!(read("home/walt/uid"), "1001\n", "RUN as USER walt");
    assert_eq!(
        read("seccomp"),
        "Seccomp:\t2\nunshare: unshare(0x10000000): Operation not permitted\nrc=1\n",
        "a RUN step runs under the seccomp filter: no user namespace"
    );
    assert_eq!(meta("home/walt/uid").uid(), 1001);
    assert_eq!(read("home/walt/tool-out"), "tool-ran\n");
    assert!(read("etc/passwd").contains("walt:x:1001:1001:"));
    assert!(
        !rootfs.join("etc/inittab").exists(),
        "a deleted file is a whiteout"
    );
    assert!(rootfs.join("bin/busybox").is_file(), "the base layers are there");

    let config = images::skopeo_inspect_config(&registry, "lab/built:1").unwrap();
    let runtime = &config["config"];
    let env: Vec<&str> = runtime["Env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(env.contains(&"APP_HOME=/opt/app"), "{env:?}");
    assert!(env.contains(&"MESSAGE=bonjour world"), "{env:?}");
    assert!(
        !env.iter().any(|e| e.starts_with("GREETING=")),
        "build args stay out of the image: {env:?}"
    );
    assert_eq!(runtime["WorkingDir"], "/opt/app");
    assert_eq!(runtime["User"], "root");
    assert_eq!(
        runtime["Labels"]["walt.node.models"], "rpi-b",
        "WalT's label is kept"
    );
    assert_eq!(runtime["Labels"]["version"], "1.0");
    assert_eq!(runtime["Labels"]["description"], "built by walt");
    assert_eq!(runtime["ExposedPorts"], serde_json::json!({"8080/tcp": {}}));
    assert_eq!(runtime["StopSignal"], "SIGINT");
    assert_eq!(runtime["Cmd"], serde_json::json!(["--serve"]));
    assert_eq!(runtime["Entrypoint"], serde_json::json!(["/usr/local/bin/tool"]));
    assert_eq!(config["architecture"], name);
    let history = config["history"].as_array().unwrap();
    let layers = history.iter().filter(|h| h["empty_layer"] != true).count();
    assert_eq!(layers, config["rootfs"]["diff_ids"].as_array().unwrap().len());
    assert!(
        history.iter().any(|h| h["created_by"]
            .as_str()
            .unwrap_or_default()
            .starts_with("RUN echo 'walt:x:1001")),
        "{history:?}"
    );
    let manifest = images::skopeo_inspect_raw(&registry, "lab/built:1").unwrap();
    assert_eq!(manifest["layers"].as_array().unwrap().len(), layers);

    // A rebuild with the same Dockerfile and context pushes nothing.
    let before = storage_snapshot(&registry);
    let second = build(&registry, &context, &cache, "lab/built:1", &args);
    let again = second.result();
    assert_eq!(again["digest"], result["digest"], "{}", second.text());
    assert_eq!(again["pushed"], false, "{}", second.text());
    assert_eq!(again["layersPushed"], 0);
    assert_eq!(again["cached"], result["layersPushed"], "{}", second.text());
    assert_eq!(
        again["emulated"],
        result["emulated"],
        "a fully cached rebuild says how its RUN steps ran, as the first build did: {}",
        second.text()
    );
    assert_eq!(storage_snapshot(&registry), before, "the registry is untouched");
    eprintln!("{name}: rebuild with the cache {:.1} s", second.seconds);

    // A changed context file runs the steps from its COPY on; the ones before come from the cache.
    write(&context.join("src/two.txt"), "two, changed\n", 0o644);
    let third = build(&registry, &context, &cache, "lab/built:2", &args);
    let changed = third.result();
    assert_eq!(changed["pushed"], true);
    assert!(changed["cached"].as_u64().unwrap() >= 2, "{}", third.text());
    fs::create_dir_all(check.path().join("2")).unwrap();
    let rootfs = images::skopeo_umoci_unpack(&registry, "lab/built:2", &check.path().join("2")).unwrap();
    assert_eq!(
        fs::read_to_string(rootfs.join("srv/two.txt")).unwrap(),
        "two, changed\n"
    );
    eprintln!("{name}: rebuild after a context change {:.1} s", third.seconds);
}

#[test]
fn every_instruction_amd64() {
    every_instruction(Arch::Amd64);
}

#[test]
fn every_instruction_arm64_emulated() {
    require_arm64_emulation();
    every_instruction(Arch::Arm64);
}

#[test]
fn unsupported_instruction_is_refused_with_its_line() {
    require_root();
    let registry = Registry::start().unwrap();
    let work = tempfile::tempdir().unwrap();
    let context = work.path().join("context");
    write(
        &context.join("Dockerfile"),
        "FROM scratch\nCOPY a /a\nONBUILD RUN make\n",
        0o644,
    );
    let refused = build(&registry, &context, &work.path().join("cache"), "lab/x:1", &[]);
    assert!(!refused.output.status.success());
    let text = refused.text();
    assert!(
        text.contains("Dockerfile line 3: ONBUILD is not supported"),
        "{text}"
    );
    assert!(!text.contains("STEP 1/"), "refused before any step: {text}");
}

#[test]
fn a_failing_run_fails_the_build_with_its_output_and_moves_no_tag() {
    require_root();
    let registry = registry_with_base(Arch::Amd64);
    let work = tempfile::tempdir().unwrap();
    let context = work.path().join("context");
    let cache = work.path().join("cache");
    let base = registry.reference("lab/base:1");
    write(
        &context.join("Dockerfile"),
        &format!("FROM {base}\nRUN echo good > /good\n"),
        0o644,
    );
    let good = build(&registry, &context, &cache, "lab/app:1", &[]).result();
    write(
        &context.join("Dockerfile"),
        &format!("FROM {base}\nRUN echo good > /good\n\nRUN echo boom-output; exit 3\nRUN echo never\n"),
        0o644,
    );
    let failed = build(&registry, &context, &cache, "lab/app:1", &[]);
    assert!(!failed.output.status.success());
    let text = failed.text();
    assert!(text.contains("boom-output"), "the step's output is shown: {text}");
    assert!(
        text.contains(
            "step 3/4 (Dockerfile line 4) RUN echo boom-output; exit 3: the command exited with status 3"
        ),
        "{text}"
    );
    assert!(!text.contains("STEP 4/4"), "{text}");
    let digest = images::skopeo_inspect_format(&registry, "lab/app:1", "{{.Digest}}").unwrap();
    assert_eq!(
        Some(digest.as_str()),
        good["digest"].as_str(),
        "the tag did not move"
    );
}

/// Whether a process runs `sleep <seconds>` (its command line).
fn sleeping(seconds: &str) -> bool {
    fs::read_dir("/proc").unwrap().flatten().any(|entry| {
        let expected = format!("sleep\0{seconds}\0");
        fs::read(entry.path().join("cmdline")).is_ok_and(|cmdline| cmdline.ends_with(expected.as_bytes()))
    })
}

#[test]
fn an_interrupted_build_moves_no_tag_and_leaves_nothing_running() {
    use std::io::BufRead as _;
    require_root();
    let registry = registry_with_base(Arch::Amd64);
    let work = tempfile::tempdir().unwrap();
    let context = work.path().join("context");
    let cache = work.path().join("cache");
    let base = registry.reference("lab/base:1");
    write(
        &context.join("Dockerfile"),
        &format!("FROM {base}\nRUN echo good > /good\n"),
        0o644,
    );
    let good = build(&registry, &context, &cache, "lab/app:1", &[]).result();
    write(
        &context.join("Dockerfile"),
        &format!("FROM {base}\nRUN echo good > /good\nRUN echo step-started && sleep 271\n"),
        0o644,
    );
    let mut command = Command::new(bin());
    command
        .arg("build")
        .arg("--context")
        .arg(&context)
        .arg("--to")
        .arg(registry.reference("lab/app:1"))
        .arg("--insecure-registry")
        .arg(registry.host())
        .arg("--cache-dir")
        .arg(&cache)
        .stdout(std::process::Stdio::piped());
    // A user's Ctrl-C reaches a foreground build whose SIGINT has its default action, whatever
    // this test was started with.
    walt_tests::process::default_sigint_in_child(&mut command);
    let mut child = command.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufReader::new(stdout).lines();
    let started = lines
        .by_ref()
        .map_while(Result::ok)
        .any(|line| line == "step-started");
    assert!(started, "the RUN step started");
    walt_tests::wait::Wait::new("the step's sleep to start", std::time::Duration::from_secs(20))
        .until(|| sleeping("271"))
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "Ctrl-C stops the build");
    walt_tests::wait::Wait::new("the step's processes to end", std::time::Duration::from_secs(10))
        .until(|| !sleeping("271"))
        .unwrap();
    let digest = images::skopeo_inspect_format(&registry, "lab/app:1", "{{.Digest}}").unwrap();
    assert_eq!(
        Some(digest.as_str()),
        good["digest"].as_str(),
        "the tag did not move"
    );
}

/// How a build pod gets its context: a tar archive on standard input (`--context-tar -`), written by
/// GNU tar here. The stream is left open after the archive, as an attached client leaves it: the build
/// reads to the archive's end, and its RUN steps get an empty input (a `cat` of stdin ends at once).
#[test]
fn the_context_arrives_as_a_tar_on_stdin() {
    use std::io::Write as _;
    require_root();
    let registry = registry_with_base(Arch::Amd64);
    let work = tempfile::tempdir().unwrap();
    let context = work.path().join("context");
    let base = registry.reference("lab/base:1");
    write(
        &context.join("Dockerfile"),
        &format!("FROM {base}\nCOPY conf/ /etc/app/\nRUN cat > /stdin-seen && echo run-done\n"),
        0o644,
    );
    write(&context.join("conf/app.conf"), "key=value\n", 0o600);
    let archive = Command::new("tar")
        .arg("-c")
        .arg("-C")
        .arg(&context)
        .arg(".")
        .output()
        .unwrap();
    assert!(archive.status.success());
    let mut child = Command::new("timeout")
        .arg("120")
        .arg(bin())
        .args(["build", "--context-tar", "-", "--to"])
        .arg(registry.reference("lab/piped:1"))
        .arg("--insecure-registry")
        .arg(registry.host())
        .arg("--cache-dir")
        .arg(work.path().join("cache"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&archive.stdout).unwrap();
    stdin.flush().unwrap();
    // `stdin` stays open until the build is over.
    let output = child.wait_with_output().unwrap();
    drop(stdin);
    let built = Build { output, seconds: 0.0 };
    let text = built.text();
    assert!(text.contains("Build context received: "), "{text}");
    assert!(
        text.contains("run-done"),
        "the RUN step did not wait for input: {text}"
    );
    let result = built.result();
    let rootfs = images::skopeo_umoci_unpack(&registry, "lab/piped:1", work.path()).unwrap();
    assert_eq!(
        fs::read_to_string(rootfs.join("etc/app/app.conf")).unwrap(),
        "key=value\n"
    );
    assert_eq!(
        fs::metadata(rootfs.join("etc/app/app.conf"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600,
        "modes survive the archive"
    );
    assert_eq!(
        fs::read(rootfs.join("stdin-seen")).unwrap(),
        b"",
        "RUN steps read an empty input"
    );
    assert!(
        result["digest"]
            .as_str()
            .is_some_and(|d| d.starts_with("sha256:"))
    );
}
