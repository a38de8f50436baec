//! `image build --from-dir DIR | --from-url URL … NAME`: an ImageBuild on the cluster, its context
//! streamed from this machine.
//!
//! The context is packed here as a tar archive (`.dockerignore` honoured, so excluded files never
//! leave the machine); `--from-url` first clones the repository with the local `git` (shallow, the
//! ref asked for) into a temporary directory. The plugin creates the ImageBuild, waits for its build
//! pod (in the tenant's runtime namespace, `status.podNamespace`: the user needs no pod rights in
//! their own namespace), attaches to it, writes the archive on its standard input and prints what the
//! build prints (the log, and a progress line per step); the operator tags the result as NAME. Ctrl-C
//! deletes the ImageBuild: its pod is killed and no tag moves.

use std::io::{IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{AttachParams, DeleteParams, PostParams};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
use walt_crds::dockerignore::Ignore;
use walt_crds::image_build::StepLine;
use walt_crds::{BuildArg, BuildSource, GitSource, ImageBuild, ImageBuildPhase, ImageBuildSpec, ImageName};

use crate::cluster::Ctx;
use crate::error::{Error, Op, Result};
use crate::format::{bytes, clock, short_digest};
use crate::resolve::image_name;
use crate::session::RuntimePod;
use crate::watch::{LiveLine, interruptible};

/// Where the context comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContextFrom {
    /// A local directory.
    Dir(PathBuf),
    /// A git repository, cloned here first.
    Url {
        /// The repository URL.
        url: String,
        /// Branch, tag or commit (default: the remote's HEAD).
        reference: Option<String>,
        /// The directory of the repository that is the context.
        sub_dir: Option<String>,
    },
}

/// The options of `image build`.
#[derive(Debug)]
pub struct BuildOptions<'a> {
    /// Where the context comes from.
    pub from: ContextFrom,
    /// The Dockerfile, relative to the context.
    pub file: Option<&'a str>,
    /// `NAME=VALUE` build args.
    pub build_args: &'a [String],
    /// The stage to build.
    pub target: Option<&'a str>,
    /// The platform (`linux/arm64`).
    pub platform: Option<&'a str>,
    /// Replace NAME if it exists.
    pub overwrite: bool,
    /// Do not ask before overwriting an image that nodes boot.
    pub yes: bool,
    /// Ignore the step cache.
    pub no_cache: bool,
    /// The image to build.
    pub image: &'a str,
}

/// Parses `NAME=VALUE` build args (pure).
pub fn parse_build_args(values: &[String]) -> Result<Vec<BuildArg>> {
    let mut args: Vec<BuildArg> = Vec::new();
    for value in values {
        let Some((name, text)) = value.split_once('=') else {
            return Err(Error::Invalid(format!(
                "--build-arg {value}: expected NAME=VALUE (e.g. --build-arg MIRROR=http://deb.debian.org/debian)"
            )));
        };
        let valid = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(Error::Invalid(format!(
                "--build-arg {value}: {name:?} is not an ARG name (letters, digits and '_', not starting with a digit)"
            )));
        }
        args.retain(|arg| arg.name != name);
        args.push(BuildArg {
            name: name.to_owned(),
            value: text.to_owned(),
        });
    }
    Ok(args)
}

/// Checks a path given relative to the context (Dockerfile, sub-directory): relative, no `..`.
pub fn context_relative(flag: &str, path: &str) -> Result<String> {
    match walt_crds::dockerignore::clean(path) {
        Some(clean) if !path.starts_with('/') && !clean.is_empty() => Ok(clean),
        _ => Err(Error::Invalid(format!(
            "{flag} {path}: must be a path inside the build context, relative to it (e.g. docker/Dockerfile)"
        ))),
    }
}

/// What was packed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Packed {
    /// The tar archive.
    pub archive: Vec<u8>,
    /// Entries in it.
    pub entries: u64,
    /// Bytes of file content.
    pub bytes: u64,
}

/// Packs the context directory as a tar archive, leaving out what `.dockerignore` excludes (and
/// `skip`, top-level names such as the clone's `.git`); the Dockerfile and `.dockerignore` are
/// always sent. Symbolic links are sent as links.
pub fn pack_context(dir: &Path, dockerfile: &str, skip: &[&str]) -> Result<Packed> {
    let ignore = match std::fs::read_to_string(dir.join(".dockerignore")) {
        Ok(text) => Ignore::parse(&text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ignore::default(),
        Err(e) => {
            return Err(Error::io(format!("cannot read {}/.dockerignore", dir.display()))(
                e,
            ));
        }
    };
    let mut packed = Packed::default();
    let mut builder = tar::Builder::new(Vec::new());
    builder.follow_symlinks(false);
    let keep = |path: &str| path == dockerfile || path == ".dockerignore" || !ignore.excluded(path);
    let mut pending = vec![String::new()];
    while let Some(relative) = pending.pop() {
        let here = if relative.is_empty() {
            dir.to_path_buf()
        } else {
            dir.join(&relative)
        };
        let mut names: Vec<String> = std::fs::read_dir(&here)
            .map_err(Error::io(format!("cannot read {}", here.display())))?
            .map(|entry| entry.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<std::io::Result<_>>()
            .map_err(Error::io(format!("cannot read {}", here.display())))?;
        names.sort();
        for name in names {
            if relative.is_empty() && skip.contains(&name.as_str()) {
                continue;
            }
            let path = if relative.is_empty() {
                name
            } else {
                format!("{relative}/{name}")
            };
            let full = dir.join(&path);
            let meta = std::fs::symlink_metadata(&full)
                .map_err(Error::io(format!("cannot read {}", full.display())))?;
            let kept = keep(&path);
            if meta.is_dir() {
                if kept {
                    builder
                        .append_dir(&path, &full)
                        .map_err(Error::io(format!("cannot pack {}", full.display())))?;
                    packed.entries += 1;
                }
                // An excluded directory may hold exceptions (`!dir/keep`): look inside only then.
                if kept || ignore.has_exceptions() {
                    pending.push(path);
                }
            } else if kept {
                builder
                    .append_path_with_name(&full, &path)
                    .map_err(Error::io(format!("cannot pack {}", full.display())))?;
                packed.entries += 1;
                if meta.is_file() {
                    packed.bytes += meta.len();
                }
            }
        }
    }
    packed.archive = builder
        .into_inner()
        .map_err(Error::io("cannot finish the context archive"))?;
    Ok(packed)
}

/// The Dockerfile the build will read, checked here so a typo fails before anything is created.
pub fn find_dockerfile(dir: &Path, file: Option<&str>) -> Result<String> {
    if let Some(file) = file {
        let relative = context_relative("--file", file)?;
        if !dir.join(&relative).is_file() {
            return Err(Error::Invalid(format!(
                "--file {file}: no such file in the build context {}",
                dir.display()
            )));
        }
        return Ok(relative);
    }
    ["Dockerfile", "Containerfile"]
        .into_iter()
        .find(|name| dir.join(name).is_file())
        .map(str::to_owned)
        .ok_or_else(|| {
            Error::Invalid(format!(
                "{} has no Dockerfile (nor Containerfile): name yours with --file",
                dir.display()
            ))
        })
}

/// The base image (`FROM`) of the stage a Dockerfile builds (pure): `target`'s, else the last stage's,
/// through the stages it is `FROM` (`FROM build AS runtime`). Only a hint for where the build pod
/// runs (the operator prefers cluster nodes of that image's CPU), so anything unclear gives `None`
/// rather than a guess: a reference made of `ARG`s, `FROM scratch`, a target no stage names. The
/// build itself reads the Dockerfile with the full parser.
pub fn base_image(dockerfile: &str, target: Option<&str>) -> Option<String> {
    // (base, stage name) of each stage, in order.
    let mut stages: Vec<(String, Option<String>)> = Vec::new();
    let mut logical = String::new();
    for line in dockerfile.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') {
            continue;
        }
        if let Some(continued) = trimmed.strip_suffix('\\') {
            logical.push_str(continued);
            logical.push(' ');
            continue;
        }
        logical.push_str(trimmed);
        let mut words = logical.split_whitespace();
        if words.next().is_some_and(|word| word.eq_ignore_ascii_case("FROM")) {
            let mut words = words.skip_while(|word| word.starts_with("--"));
            if let Some(base) = words.next() {
                let name = match (words.next(), words.next()) {
                    (Some(as_), Some(name)) if as_.eq_ignore_ascii_case("AS") => {
                        Some(name.to_ascii_lowercase())
                    }
                    _ => None,
                };
                stages.push((base.to_owned(), name));
            }
        }
        logical.clear();
    }
    let named = |name: &str| {
        stages
            .iter()
            .position(|(_, stage)| stage.as_deref() == Some(name.to_ascii_lowercase().as_str()))
    };
    let mut index = match target {
        Some(target) => named(target)?,
        None => stages.len().checked_sub(1)?,
    };
    // A stage is FROM an earlier stage only; each step goes back, so this ends.
    loop {
        let base = &stages[index].0;
        match named(base).filter(|&earlier| earlier < index) {
            Some(earlier) => index = earlier,
            None if base.contains('$') || base.eq_ignore_ascii_case("scratch") => return None,
            None => return Some(base.clone()),
        }
    }
}

/// The command line as given, checked before anything talks to the cluster.
#[derive(Debug, Clone, Copy)]
pub struct Given<'a> {
    /// `--from-dir`.
    pub from_dir: Option<&'a Path>,
    /// `--file`.
    pub file: Option<&'a str>,
    /// `--sub-dir`.
    pub sub_dir: Option<&'a str>,
    /// `--ref`.
    pub git_ref: Option<&'a str>,
    /// `--build-arg`s.
    pub build_args: &'a [String],
    /// `--platform`.
    pub platform: Option<&'a str>,
    /// NAME.
    pub image: &'a str,
}

/// Refuses bad input before any request: the image name, build args, paths, the platform, and for
/// `--from-dir` the directory and its Dockerfile.
pub fn preflight(given: &Given<'_>) -> Result<()> {
    image_name(given.image)?;
    parse_build_args(given.build_args)?;
    if let Some(file) = given.file {
        context_relative("--file", file)?;
    }
    if let Some(sub_dir) = given.sub_dir {
        context_relative("--sub-dir", sub_dir)?;
    }
    if let Some(platform) = given.platform {
        let parts: Vec<&str> = platform.split('/').collect();
        let word = |p: &&str| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        };
        if !(2..=3).contains(&parts.len()) || !parts.iter().all(word) {
            return Err(Error::Invalid(format!(
                "--platform {platform}: write OS/ARCH[/VARIANT], e.g. linux/arm64 or linux/arm/v7"
            )));
        }
    }
    if let Some(dir) = given.from_dir {
        if given.git_ref.is_some() || given.sub_dir.is_some() {
            return Err(Error::Invalid(
                "--ref and --sub-dir go with --from-url (the git repository to clone); with --from-dir the directory itself is the context".into(),
            ));
        }
        if !dir.is_dir() {
            return Err(Error::Invalid(format!(
                "--from-dir {}: not a directory (the build context is a directory holding the Dockerfile)",
                dir.display()
            )));
        }
        find_dockerfile(dir, given.file)?;
    }
    Ok(())
}

/// Runs `git` with `args`; its error output is the message when it fails.
fn git(args: &[&str]) -> Result<String> {
    let output = Command::new("git").args(args).output().map_err(|e| {
        Error::Invalid(format!(
            "--from-url runs `git` on this machine, and it cannot be started ({e}): install git, or clone the repository yourself and use --from-dir"
        ))
    })?;
    if !output.status.success() {
        return Err(Error::Failed(format!(
            "git {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Clones `url` at `reference` (shallow) into `dir`; returns the commit checked out.
pub fn shallow_clone(url: &str, reference: Option<&str>, dir: &Path) -> Result<String> {
    let path = dir.display().to_string();
    git(&["init", "-q", &path])?;
    git(&[
        "-C",
        &path,
        "fetch",
        "-q",
        "--depth",
        "1",
        "--",
        url,
        reference.unwrap_or("HEAD"),
    ])?;
    git(&[
        "-C",
        &path,
        "-c",
        "advice.detachedHead=false",
        "checkout",
        "-q",
        "FETCH_HEAD",
    ])?;
    git(&["-C", &path, "rev-parse", "HEAD"])
}

/// The progress line of a step (pure): `[3/9 ######----] RUN apt-get install …  1m02s`.
pub fn step_line(step: &StepLine, elapsed: Duration) -> String {
    const WIDTH: u32 = 10;
    let done = step.number.saturating_sub(1).min(step.total);
    let filled = (done * WIDTH).checked_div(step.total).unwrap_or(0) as usize;
    format!(
        "[{}/{} {}{}] {}  {}",
        step.number,
        step.total,
        "#".repeat(filled),
        "-".repeat(WIDTH as usize - filled),
        step.text,
        clock(elapsed)
    )
}

/// The `generateName` of the ImageBuild of image `name` (the API server appends 5 random characters;
/// the name is a label value of the build pod, so at most 63 characters with its `walt-build-` prefix).
fn build_name_prefix(name: &ImageName) -> String {
    let base: String = name.object_name().replace('.', "-").chars().take(40).collect();
    format!("{}-", base.trim_end_matches('-'))
}

/// `image build …`
pub async fn run(ctx: &Ctx, opts: &BuildOptions<'_>) -> Result<i32> {
    let name = image_name(opts.image)?;
    let build_args = parse_build_args(opts.build_args)?;
    // Attaching to the build pod needs no right here: it runs in the tenant's runtime namespace,
    // where the operator binds the attach role to whoever may use walt in this one.
    ctx.require(&[
        ("create", "walt.dev", "imagebuilds", None, &ctx.namespace),
        ("delete", "walt.dev", "imagebuilds", None, &ctx.namespace),
    ])
    .await?;
    let checkout = tempfile::Builder::new()
        .prefix("walt-build-")
        .tempdir()
        .map_err(Error::io("cannot make a temporary directory for the clone"))?;
    let (context_dir, git_source, skip) = match &opts.from {
        ContextFrom::Dir(dir) => (dir.clone(), None, Vec::new()),
        ContextFrom::Url {
            url,
            reference,
            sub_dir,
        } => {
            let sub_dir = sub_dir
                .as_deref()
                .map(|p| context_relative("--sub-dir", p))
                .transpose()?;
            eprintln!(
                "Cloning {url}{} on this machine (git, shallow)…",
                reference
                    .as_deref()
                    .map_or_else(String::new, |r| format!(" at {r}"))
            );
            let commit = shallow_clone(url, reference.as_deref(), checkout.path())?;
            let dir = sub_dir
                .as_deref()
                .map_or_else(|| checkout.path().to_path_buf(), |p| checkout.path().join(p));
            if !dir.is_dir() {
                return Err(Error::Invalid(format!(
                    "--sub-dir {}: no such directory in {url} at {commit}",
                    sub_dir.unwrap_or_default()
                )));
            }
            let source = GitSource {
                url: url.clone(),
                ref_: reference.clone(),
                sub_dir,
                commit: Some(commit),
            };
            (dir, Some(source), vec![".git"])
        }
    };
    if !context_dir.is_dir() {
        return Err(Error::Invalid(format!(
            "the build context {} is not a directory",
            context_dir.display()
        )));
    }
    let dockerfile = find_dockerfile(&context_dir, opts.file)?;
    let booted_by = confirm_target(ctx, &name, opts).await?;
    let packed = pack_context(&context_dir, &dockerfile, &skip)?;
    // Unreadable here: no hint; the build pod reads it and says what is wrong.
    let base = std::fs::read_to_string(context_dir.join(&dockerfile))
        .ok()
        .and_then(|text| base_image(&text, opts.target));
    let spec = ImageBuildSpec {
        image: name.to_string(),
        source: BuildSource {
            git: git_source,
            ..BuildSource::default()
        },
        dockerfile: opts.file.map(|_| dockerfile.clone()),
        build_args,
        target: opts.target.map(str::to_owned),
        platform: opts.platform.map(str::to_owned),
        base_image: base,
        overwrite: opts.overwrite,
        no_cache: opts.no_cache,
    };
    let mut object = ImageBuild::new("", spec);
    object.metadata.name = None;
    object.metadata.generate_name = Some(build_name_prefix(&name));
    let created = ctx
        .builds()
        .create(&PostParams::default(), &object)
        .await
        .map_err(|e| {
            Error::api(
                Op::collection("create", "image build", "imagebuilds.walt.dev", &ctx.namespace),
                e,
            )
        })?;
    let build_name = created.metadata.name.clone().unwrap_or_default();
    println!("imagebuild.walt.dev/{build_name} created for image {name}");
    let mut times = BuildTimes::default();
    let outcome = interruptible(build_and_follow(ctx, &build_name, &packed, &mut times)).await;
    if matches!(outcome, Err(Error::Interrupted)) {
        let _ = ctx.builds().delete(&build_name, &DeleteParams::default()).await;
        eprintln!(
            "\nInterrupted: build {build_name} was deleted and its pod stopped; no tag moved (image {name} is as it was)."
        );
    }
    let done = outcome?;
    print_result(&done, &name, &booted_by);
    eprintln!("{}", times.line(packed.bytes));
    Ok(0)
}

/// Refuses to replace an existing image without `--overwrite`, and asks before replacing one that
/// nodes boot (the image shell rule); returns those nodes.
async fn confirm_target(ctx: &Ctx, name: &ImageName, opts: &BuildOptions<'_>) -> Result<Vec<String>> {
    let exists = ctx
        .images()
        .get_opt(&name.object_name())
        .await
        .map_err(|e| {
            Error::api(
                Op::named(
                    "get",
                    "image",
                    "images.walt.dev",
                    &name.to_string(),
                    &ctx.namespace,
                ),
                e,
            )
        })?
        .is_some();
    if !exists {
        return Ok(Vec::new());
    }
    if !opts.overwrite {
        return Err(Error::Invalid(format!(
            "image {name} exists: add --overwrite to replace it with the build, or build under another name"
        )));
    }
    crate::image_cmd::confirm_overwrite(ctx, name, opts.yes, "not built").await
}

/// Where a build's time went, as the plugin saw it: each phase's end since the ImageBuild was
/// created (`None`: not reached).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BuildTimes {
    /// The ImageBuild created (the origin).
    pub created: Option<Instant>,
    /// The build pod's container running (the operator made the pod, the kubelet started it).
    pub pod_running: Option<Instant>,
    /// Attached to the pod.
    pub attached: Option<Instant>,
    /// The whole context written on the pod's standard input.
    pub context_sent: Option<Instant>,
    /// The pod's output ended: the build ran and pushed its layers.
    pub built: Option<Instant>,
    /// The operator's verdict seen (it read the result, tagged it and made the Image).
    pub verdict: Option<Instant>,
}

impl BuildTimes {
    /// The phases' durations, in order (pure): the name and the time from the previous phase's end.
    pub fn phases(&self) -> Vec<(&'static str, Duration)> {
        let marks = [
            ("pod start", self.pod_running),
            ("attach", self.attached),
            ("context upload", self.context_sent),
            ("build and push", self.built),
            ("tag and Image", self.verdict),
        ];
        let mut previous = self.created;
        let mut phases = Vec::new();
        for (name, mark) in marks {
            if let (Some(from), Some(to)) = (previous, mark) {
                phases.push((name, to.saturating_duration_since(from)));
            }
            previous = mark.or(previous);
        }
        phases
    }

    /// The line the plugin prints after a build (pure): where the time went, `context_bytes` the
    /// archive's size.
    pub fn line(&self, context_bytes: u64) -> String {
        let total = self
            .created
            .zip(self.verdict.or(self.built))
            .map(|(from, to)| to.saturating_duration_since(from));
        let parts: Vec<String> = self
            .phases()
            .into_iter()
            .map(|(name, took)| {
                let size = if name == "context upload" {
                    format!(" ({})", bytes(context_bytes))
                } else {
                    String::new()
                };
                format!("{name} {:.1} s{size}", took.as_secs_f64())
            })
            .collect();
        format!(
            "Time: {:.1} s ({})",
            total.unwrap_or_default().as_secs_f64(),
            parts.join(", ")
        )
    }
}

/// Waits for the build pod, sends the context, streams the build, waits for the operator's verdict;
/// `times` records when each phase ended.
async fn build_and_follow(
    ctx: &Ctx,
    build: &str,
    packed: &Packed,
    times: &mut BuildTimes,
) -> Result<ImageBuild> {
    times.created = Some(Instant::now());
    let pod = wait_for_pod(ctx, build).await?;
    times.pod_running = Some(Instant::now());
    eprintln!(
        "Sending the build context: {} entries, {}…",
        packed.entries,
        bytes(packed.bytes)
    );
    if let Err(error) = stream_build(ctx, &pod, &packed.archive, times).await {
        // The verdict still comes from the ImageBuild; say why the live log stopped.
        eprintln!("(the build log stopped: {error}; following the build's status)");
    }
    times.built = Some(Instant::now());
    let verdict = wait_for_verdict(ctx, build).await;
    times.verdict = Some(Instant::now());
    verdict
}

/// The build pod of a build, from its status (pure): `status.pod` in `status.podNamespace`, else (an
/// operator from before build pods moved to the runtime namespace said none) in the build's own
/// namespace `namespace`.
pub fn build_pod_of(namespace: &str, build: &ImageBuild) -> Option<RuntimePod> {
    let status = build.status.as_ref()?;
    RuntimePod::named(status.pod.as_ref(), status.pod_namespace.as_ref(), || {
        namespace.to_owned()
    })
}

/// Follows the ImageBuild until its build pod runs; a build that fails first is an error.
async fn wait_for_pod(ctx: &Ctx, build: &str) -> Result<RuntimePod> {
    let start = Instant::now();
    let mut line = LiveLine::stderr();
    let mut changes = crate::cluster::changes_of(ctx.builds(), build);
    loop {
        let object = get_build(ctx, build).await?;
        let status = object.status.clone().unwrap_or_default();
        if status.phase.is_finished() {
            line.finish();
            return Err(Error::Failed(verdict_message(&object)));
        }
        if let Some(pod) = build_pod_of(&ctx.namespace, &object)
            && pod.get(ctx).await.as_ref().is_some_and(container_running)
        {
            line.finish();
            return Ok(pod);
        }
        // Another writer of the image (a shell, a save, a build) goes first: say who.
        let busy = walt_crds::find_condition(&status.conditions, walt_crds::condition_types::COMPLETE)
            .filter(|condition| condition.reason == walt_crds::image_build::reasons::IMAGE_BUSY);
        line.show(&match busy {
            Some(condition) => format!("waiting: {}  ({})", condition.message, clock(start.elapsed())),
            None => format!(
                "starting the build pod: {:?}  ({})",
                status.phase,
                clock(start.elapsed())
            ),
        });
        crate::cluster::next_change(&mut changes).await;
    }
}

fn container_running(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|all| all.first())
        .and_then(|c| c.state.as_ref())
        .is_some_and(|state| state.running.is_some())
}

/// Attaches to the build pod: writes the archive on its standard input, prints its output (a
/// progress line on stderr for each step) until it ends.
async fn stream_build(ctx: &Ctx, pod: &RuntimePod, archive: &[u8], times: &mut BuildTimes) -> Result<()> {
    let params = AttachParams::default().stdin(true).stdout(true).stderr(true);
    let mut attached = pod.attach(ctx, &params, "attachment to the build pod").await?;
    times.attached = Some(Instant::now());
    let mut stdin = attached
        .stdin()
        .ok_or_else(|| Error::Failed("the build pod gave no standard input".into()))?;
    let stdout = attached
        .stdout()
        .ok_or_else(|| Error::Failed("the build pod gave no output".into()))?;
    let stderr = attached
        .stderr()
        .ok_or_else(|| Error::Failed("the build pod gave no error output".into()))?;
    let writer = async {
        stdin.write_all(archive).await?;
        stdin.flush().await?;
        // The archive ends with its end-of-archive blocks: the build reads no further.
        Ok::<_, std::io::Error>((stdin, Instant::now()))
    };
    let started = Instant::now();
    let terminal = std::io::stderr().is_terminal();
    let print_stdout = async {
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        while let Some(line) = lines.next_line().await? {
            if let Some(step) = StepLine::parse(&line) {
                let text = step_line(&step, started.elapsed());
                if terminal {
                    eprintln!("\x1b[1m{text}\x1b[0m");
                } else {
                    eprintln!("{text}");
                }
            } else {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{line}");
                let _ = out.flush();
            }
        }
        Ok::<_, std::io::Error>(())
    };
    let print_stderr = async {
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        while let Some(line) = lines.next_line().await? {
            eprintln!("{line}");
        }
        Ok::<_, std::io::Error>(())
    };
    let (written, out, err) = tokio::join!(writer, print_stdout, print_stderr);
    let (_stdin, sent) = written.map_err(Error::io("sending the build context"))?;
    times.context_sent = Some(sent);
    out.map_err(Error::io("reading the build log"))?;
    err.map_err(Error::io("reading the build log"))?;
    attached.abort();
    Ok(())
}

/// Follows the ImageBuild until it succeeded (or fails with its reason).
async fn wait_for_verdict(ctx: &Ctx, build: &str) -> Result<ImageBuild> {
    let start = Instant::now();
    let mut line = LiveLine::stderr();
    let mut changes = crate::cluster::changes_of(ctx.builds(), build);
    loop {
        let object = get_build(ctx, build).await?;
        let status = object.status.clone().unwrap_or_default();
        match status.phase {
            ImageBuildPhase::Succeeded => {
                line.finish();
                return Ok(object);
            }
            ImageBuildPhase::Failed => {
                line.finish();
                return Err(Error::Failed(verdict_message(&object)));
            }
            _ => {}
        }
        line.show(&format!(
            "building: {}  ({})",
            status.step.as_deref().unwrap_or("waiting for the build pod"),
            clock(start.elapsed())
        ));
        crate::cluster::next_change(&mut changes).await;
    }
}

async fn get_build(ctx: &Ctx, build: &str) -> Result<ImageBuild> {
    ctx.builds().get(build).await.map_err(|e| {
        Error::api(
            Op::named(
                "get",
                "image build",
                "imagebuilds.walt.dev",
                build,
                &ctx.namespace,
            ),
            e,
        )
    })
}

/// What the operator said about a finished build (its `Complete` condition).
fn verdict_message(build: &ImageBuild) -> String {
    let name = build.metadata.name.clone().unwrap_or_default();
    build
        .status
        .as_ref()
        .and_then(|s| walt_crds::find_condition(&s.conditions, walt_crds::condition_types::COMPLETE))
        .map_or_else(
            || format!("build {name} ended; see `kubectl describe imagebuild {name}`"),
            |c| format!("build {name} failed ({}): {}", c.reason, c.message),
        )
}

/// What a finished build says (pure): the digest, the image's CPU and whether its `RUN` steps were
/// emulated, the steps, and the cluster node it ran on.
fn built_line(build: &ImageBuild, name: &ImageName) -> String {
    let status = build.status.clone().unwrap_or_default();
    let result = status.result.clone().unwrap_or_default();
    let took = status
        .start_time
        .zip(status.completion_time)
        .map(|(start, end)| end.0.duration_since(start.0).unsigned_abs());
    format!(
        "Built {name}: {} ({}{}, {} steps, {} cached, {} layers pushed{}){}",
        short_digest(result.digest.as_deref().unwrap_or_default()),
        result.architecture.as_deref().unwrap_or("?"),
        if result.emulated { ", emulated" } else { "" },
        status.steps_total.unwrap_or_default(),
        result.cached_steps,
        result.layers_pushed,
        took.map_or_else(String::new, |d| format!(", in {}", clock(d))),
        status
            .cluster_node
            .map_or_else(String::new, |node| format!(" on cluster node {node}"))
    )
}

fn print_result(build: &ImageBuild, name: &ImageName, booted_by: &[String]) {
    println!("{}", built_line(build, name));
    if !booted_by.is_empty() {
        println!(
            "{} node(s) reboot on the new version: {}.",
            booted_by.len(),
            booted_by.join(", ")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_time_line_splits_the_build_into_its_phases() {
        let start = Instant::now();
        let at = |millis| Some(start + Duration::from_millis(millis));
        let times = BuildTimes {
            created: at(0),
            pod_running: at(3_100),
            attached: at(3_300),
            context_sent: at(3_600),
            built: at(8_300),
            verdict: at(9_600),
        };
        assert_eq!(
            times.line(1_200_000),
            "Time: 9.6 s (pod start 3.1 s, attach 0.2 s, context upload 0.3 s (1.1MiB), \
             build and push 4.7 s, tag and Image 1.3 s)"
        );
        // A log that stopped early (no attach): the phases reached, each from the last mark.
        let partial = BuildTimes {
            attached: None,
            context_sent: None,
            ..times
        };
        assert_eq!(
            partial.phases(),
            vec![
                ("pod start", Duration::from_millis(3_100)),
                ("build and push", Duration::from_millis(5_200)),
                ("tag and Image", Duration::from_millis(1_300)),
            ]
        );
    }

    #[test]
    fn the_base_image_is_the_built_stages_from() {
        let multi = "# syntax=docker/dockerfile:1\nARG BASE=debian\n\
            FROM --platform=linux/arm64 reg.lab/lab/alice/tools:v1 AS build\n\
            RUN make\n\
            from \\\n  reg.lab/lab/alice/base-arm:latest \\\n  as Runtime\n\
            COPY --from=build /out /\n\
            FROM runtime AS final\n\
            FROM ${BASE} AS from-arg\n\
            FROM scratch AS empty\n";
        assert_eq!(
            base_image(multi, Some("build")).as_deref(),
            Some("reg.lab/lab/alice/tools:v1")
        );
        assert_eq!(
            base_image(multi, Some("runtime")).as_deref(),
            Some("reg.lab/lab/alice/base-arm:latest"),
            "continued lines, any case"
        );
        assert_eq!(
            base_image(multi, Some("final")).as_deref(),
            Some("reg.lab/lab/alice/base-arm:latest"),
            "through the stage it is from"
        );
        // Unclear: no hint rather than a guess.
        assert_eq!(base_image(multi, Some("from-arg")), None);
        assert_eq!(base_image(multi, None), None, "the last stage is FROM scratch");
        assert_eq!(base_image(multi, Some("nowhere")), None);
        assert_eq!(base_image("RUN true\n", None), None);
        assert_eq!(
            base_image("FROM debian\nRUN true\n", None).as_deref(),
            Some("debian")
        );
        assert_eq!(
            base_image("FROM a AS x\nFROM x AS y\nFROM y\n", None).as_deref(),
            Some("a")
        );
    }

    #[test]
    fn a_built_line_says_the_cpu_whether_emulated_and_where() {
        let name = image_name("app").expect("name");
        let mut build = ImageBuild::new("app-x", ImageBuildSpec::default());
        build.status = Some(walt_crds::ImageBuildStatus {
            steps_total: Some(3),
            cluster_node: Some("pi-1".into()),
            result: Some(walt_crds::ImageBuildResult {
                digest: Some("sha256:0123456789abcdef".into()),
                architecture: Some("arm64".into()),
                layers_pushed: 2,
                ..walt_crds::ImageBuildResult::default()
            }),
            ..walt_crds::ImageBuildStatus::default()
        });
        assert_eq!(
            built_line(&build, &name),
            "Built app: sha256:0123456789ab (arm64, 3 steps, 0 cached, 2 layers pushed) on cluster node pi-1"
        );
        if let Some(result) = build.status.as_mut().and_then(|s| s.result.as_mut()) {
            result.emulated = true;
        }
        assert!(
            built_line(&build, &name).contains("(arm64, emulated, 3 steps"),
            "{}",
            built_line(&build, &name)
        );
    }

    #[test]
    fn build_args_parse_and_the_last_value_wins() {
        let args =
            parse_build_args(&["A=1".into(), "B=x=y".into(), "A=2".into(), "C=".into()]).expect("valid");
        let pairs: Vec<(&str, &str)> = args.iter().map(|a| (a.name.as_str(), a.value.as_str())).collect();
        assert_eq!(pairs, [("B", "x=y"), ("A", "2"), ("C", "")]);
        assert!(
            parse_build_args(&["A".into()])
                .expect_err("no =")
                .to_string()
                .contains("NAME=VALUE")
        );
        assert!(
            parse_build_args(&["1A=x".into()])
                .expect_err("bad name")
                .to_string()
                .contains("not an ARG name")
        );
    }

    #[test]
    fn context_paths_stay_inside() {
        assert_eq!(
            context_relative("--file", "./docker/Dockerfile").expect("ok"),
            "docker/Dockerfile"
        );
        assert!(context_relative("--file", "../Dockerfile").is_err());
        assert!(context_relative("--sub-dir", "/etc").is_err());
    }

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, text).expect("write");
    }

    #[test]
    fn the_context_leaves_out_what_dockerignore_excludes() {
        let dir = tempfile::tempdir().expect("tmp");
        let root = dir.path();
        write(&root.join("Dockerfile"), "FROM scratch\nCOPY . /\n");
        write(
            &root.join(".dockerignore"),
            "Dockerfile\n*.log\ntarget\n!target/keep.txt\n",
        );
        write(&root.join("src/main.c"), "int main;\n");
        write(&root.join("debug.log"), "noise\n");
        write(&root.join("target/big.o"), "object\n");
        write(&root.join("target/keep.txt"), "kept\n");
        write(&root.join(".git/HEAD"), "ref\n");
        std::os::unix::fs::symlink("src/main.c", root.join("link")).expect("symlink");
        let packed = pack_context(root, "Dockerfile", &[".git"]).expect("pack");
        let mut archive = tar::Archive::new(packed.archive.as_slice());
        let names: Vec<String> = archive
            .entries()
            .expect("entries")
            .map(|e| e.expect("entry").path().expect("path").display().to_string())
            .collect();
        assert_eq!(
            names,
            [
                ".dockerignore",
                "Dockerfile",
                "link",
                "src",
                "target/keep.txt",
                "src/main.c"
            ],
            "the Dockerfile and .dockerignore always; exceptions inside excluded directories"
        );
        assert_eq!(packed.entries, 6);
        assert!(find_dockerfile(root, None).is_ok());
        assert!(
            find_dockerfile(root, Some("nope"))
                .expect_err("missing")
                .to_string()
                .contains("no such file")
        );
    }

    #[test]
    fn a_step_line_shows_how_far_the_build_is() {
        let step = StepLine::parse("STEP 4/9: RUN apt-get install -y curl").expect("step");
        assert_eq!(
            step_line(&step, Duration::from_secs(62)),
            "[4/9 ###-------] RUN apt-get install -y curl  1m02s"
        );
    }

    #[test]
    fn a_url_is_cloned_shallow_at_its_ref_with_the_local_git() {
        let dir = tempfile::tempdir().expect("tmp");
        let repo = dir.path().join("repo");
        let run = |args: &[&str]| {
            let out = Command::new("git")
                .args(["-c", "user.name=t", "-c", "user.email=t@localhost", "-C"])
                .arg(&repo)
                .args(args)
                .output()
                .expect("git");
            assert!(
                out.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        };
        write(&repo.join("ctx/Dockerfile"), "FROM scratch\n");
        run(&["init", "-q", "-b", "main"]);
        run(&["add", "."]);
        run(&["commit", "-q", "-m", "one"]);
        let first = run(&["rev-parse", "HEAD"]);
        run(&["tag", "v1"]);
        write(&repo.join("ctx/Dockerfile"), "FROM scratch\nLABEL two=2\n");
        run(&["commit", "-q", "-am", "two"]);
        let url = format!("file://{}", repo.display());
        let at_tag = dir.path().join("at-tag");
        assert_eq!(shallow_clone(&url, Some("v1"), &at_tag).expect("clone v1"), first);
        assert_eq!(
            std::fs::read_to_string(at_tag.join("ctx/Dockerfile")).expect("read"),
            "FROM scratch\n"
        );
        let head = dir.path().join("head");
        let latest = shallow_clone(&url, None, &head).expect("clone HEAD");
        assert_ne!(latest, first);
        assert!(
            std::fs::read_to_string(head.join("ctx/Dockerfile"))
                .expect("read")
                .contains("two=2")
        );
        let missing = shallow_clone(&url, Some("no-such-ref"), &dir.path().join("x")).expect_err("no ref");
        assert!(missing.to_string().contains("no-such-ref"), "{missing}");
    }

    #[test]
    fn the_build_pod_is_where_the_status_says() {
        let mut build = ImageBuild::new("app-x1", ImageBuildSpec::default());
        assert_eq!(build_pod_of("alice", &build), None, "no status yet");
        build.status = Some(walt_crds::ImageBuildStatus {
            pod: Some("walt-build-app-x1".into()),
            pod_namespace: Some("walt-run-alice".into()),
            ..walt_crds::ImageBuildStatus::default()
        });
        assert_eq!(
            build_pod_of("alice", &build),
            Some(RuntimePod {
                namespace: "walt-run-alice".into(),
                name: "walt-build-app-x1".into()
            })
        );
        if let Some(status) = build.status.as_mut() {
            status.pod_namespace = None;
        }
        assert_eq!(
            build_pod_of("alice", &build).map(|pod| pod.namespace),
            Some("alice".into()),
            "an operator that names no namespace ran it in the build's own"
        );
    }

    #[test]
    fn build_names_fit_a_label() {
        let long = image_name(&format!("{}:v2", "a".repeat(100))).expect("name");
        let prefix = build_name_prefix(&long);
        assert!(prefix.len() <= 41 && !prefix.contains('.'), "{prefix}");
        assert!(format!("walt-build-{prefix}abcde").len() <= 63);
        assert_eq!(build_name_prefix(&image_name("rpi:v2").expect("name")), "rpi-v2-");
    }
}
