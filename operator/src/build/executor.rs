//! The build executor: runs a parsed Dockerfile on this host.
//!
//! Each stage starts from its `FROM` (a registry image pulled through the layer cache, an earlier stage,
//! or `scratch`). `RUN` runs in walt's runtime ([`crate::runtime::root::Container`]) on an overlay of the
//! stage's layers, through qemu-user when the image's CPU differs; `COPY`/`ADD` write through the same
//! overlay ([`crate::runtime::root::with_mounted_root`]). The upper dir of a step that changed files is
//! uploaded as one layer by walt's layer engine and then serves, unpacked, as the lower dir of the next
//! steps. Config steps (`ENV`, `LABEL`, `CMD`…) only edit the config. At the end the image is pushed **by
//! digest**, then the tag is moved: a failed build moves no tag.
//!
//! **Step cache.** Every step has a key: the hash of the previous step's key (the first one: the base
//! image's digest) and of the step as resolved (variables substituted; for `COPY`/`ADD` the selected
//! files' contents). A layer step's result (its layer blob and history entry) is recorded under its key in
//! `<cache>/build-cache/`; a later build with the same key reuses it when the layer is still unpacked here
//! and its blob is still in the target repository. History entries of cached steps keep their time, so a
//! rebuild with an unchanged Dockerfile and context makes the same config and manifest: nothing is pushed
//! when the tag already points at it.
//!
//! **Threads.** Containers are forked from a single-threaded process: registry work runs on a
//! current-thread runtime that is dropped (and its threads awaited) before each step runs.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use super::config::{self, ImageConfig};
use super::context::{self, Context};
use super::copy::{CopyJob, CopySource};
use super::dockerfile::{self, CopySpec, Dockerfile, Instruction, Stage, Step};
use crate::oci::{CommitOptions, LayerCache, LayerDescriptor, Platform, ResolvedImage, UploadedLayer};
use crate::overlay::{LayerOptions, OpaqueXattr};
use crate::runtime::image::{RegistryAccess, block_on, split_target};
use crate::runtime::root::{self, Network, RootSpec};
use crate::runtime::session_dir::SessionDir;

/// Errors of a build; each names the step (number, Dockerfile line, instruction) when it is about one.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The Dockerfile was refused.
    #[error(transparent)]
    Parse(#[from] dockerfile::ParseError),
    /// A step failed.
    #[error("step {number}/{total} (Dockerfile line {line}) {text}: {message}")]
    Step {
        /// Step number (1-based, all stages).
        number: usize,
        /// Steps in all.
        total: usize,
        /// Dockerfile line.
        line: usize,
        /// The instruction, shortened.
        text: String,
        /// What went wrong and what to do.
        message: String,
    },
    /// Registry or runtime work outside a step (pull, push, tag).
    #[error("{0}")]
    Image(#[from] crate::runtime::image::ImageError),
    /// Reading the Dockerfile or the context.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Bad input outside the Dockerfile (target, build args, stage names).
    #[error("{0}")]
    Usage(String),
}

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildRequest {
    /// The context directory.
    pub context_dir: PathBuf,
    /// The Dockerfile (default: `Dockerfile` in the context, else `Containerfile`).
    pub dockerfile: Option<PathBuf>,
    /// `--build-arg` values.
    pub build_args: BTreeMap<String, String>,
    /// `registry/repository[:tag]` to push and tag.
    pub target: String,
    /// Build this stage instead of the last one.
    pub target_stage: Option<String>,
    /// Platform of `FROM` images that have several (`linux/arm64`); `scratch` gets it too.
    pub platform: Option<String>,
    /// Registry access.
    pub access: RegistryAccess,
    /// The walt cache (layer cache, sessions, build cache).
    pub cache_dir: PathBuf,
    /// Network of `RUN` steps.
    pub network: Network,
    /// Ignore the step cache (results are still recorded).
    pub no_cache: bool,
}

/// What a build did (the last line of its output, as JSON).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildResult {
    /// Manifest digest of the image.
    pub digest: String,
    /// The tagged reference.
    pub reference: String,
    /// The image's architecture.
    pub architecture: String,
    /// Whether `RUN` steps went through qemu-user (cached ones included: they were built that way).
    pub emulated: bool,
    /// Steps in all stages (`FROM` included).
    pub steps: usize,
    /// Layer steps reused from the cache.
    pub cached: usize,
    /// Layers uploaded by this build.
    pub layers_pushed: usize,
    /// Whether a manifest was pushed (false: the tag already pointed at this exact image).
    pub pushed: bool,
    /// Seconds the build took.
    pub seconds: f64,
}

/// A layer this build added (uploaded, and unpacked in the layer cache).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct AddedLayer {
    uploaded: UploadedLayer,
    dir: PathBuf,
}

/// A step result recorded in the build cache.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct CacheEntry {
    /// The layer, or none when the step changed no file.
    layer: Option<UploadedLayer>,
    /// The history entry.
    history: Value,
}

/// The state of a stage between steps.
#[derive(Debug, Clone)]
struct StageState {
    name: Option<String>,
    base: ResolvedImage,
    base_lowers: Vec<PathBuf>,
    added: Vec<AddedLayer>,
    config: ImageConfig,
    history: Vec<Value>,
    key: String,
    args: BTreeMap<String, String>,
    shell: Vec<String>,
    last_created: String,
    architecture: String,
}

impl StageState {
    fn lower_dirs(&self) -> Vec<PathBuf> {
        self.added
            .iter()
            .rev()
            .map(|layer| layer.dir.clone())
            .chain(self.base_lowers.iter().cloned())
            .collect()
    }

    /// Variables for substitution: ENV overrides ARG.
    fn lookup(&self) -> impl Fn(&str) -> Option<String> + '_ {
        move |name| self.config.env_get(name).or_else(|| self.args.get(name).cloned())
    }
}

/// Counters of a build.
#[derive(Debug, Default)]
struct Tally {
    cached: usize,
    layers_pushed: usize,
    emulated: bool,
}

/// The position of a step, for messages.
#[derive(Debug, Clone, Copy)]
struct Position<'a> {
    number: usize,
    total: usize,
    step: &'a Step,
}

impl Position<'_> {
    fn fail(&self, message: impl Into<String>) -> BuildError {
        BuildError::Step {
            number: self.number,
            total: self.total,
            line: self.step.line,
            text: short(&self.step.text),
            message: message.into(),
        }
    }
}

fn short(text: &str) -> String {
    let one_line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() > 80 {
        format!("{}…", one_line.chars().take(79).collect::<String>())
    } else {
        one_line
    }
}

fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

fn chain(key: &str, step: &str) -> String {
    sha256_hex(&format!("{key}\n{step}"))
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Reads and parses the Dockerfile of `request`.
pub fn load_dockerfile(request: &BuildRequest) -> Result<Dockerfile, BuildError> {
    let path = match &request.dockerfile {
        Some(path) if path.is_absolute() => path.clone(),
        Some(path) => request.context_dir.join(path),
        None => {
            let docker = request.context_dir.join("Dockerfile");
            let container = request.context_dir.join("Containerfile");
            if !docker.exists() && container.exists() {
                container
            } else {
                docker
            }
        }
    };
    let text = std::fs::read_to_string(&path).map_err(|source| BuildError::Io {
        what: "reading the Dockerfile",
        path: path.clone(),
        source,
    })?;
    Ok(dockerfile::parse(&text)?)
}

/// Builds, pushes by digest and tags. Must run in a single-threaded process (see the module docs).
pub fn build(request: &BuildRequest) -> Result<BuildResult, BuildError> {
    let started = Instant::now();
    let dockerfile = load_dockerfile(request)?;
    let context = Context::open(&request.context_dir).map_err(|e| BuildError::Usage(e.to_string()))?;
    let (repository, tag) = split_target(&request.target)?;
    let total: usize = dockerfile.stages.iter().map(|s| 1 + s.steps.len()).sum();
    let last = match &request.target_stage {
        Some(name) => dockerfile
            .stages
            .iter()
            .position(|s| s.name.as_deref() == Some(&name.to_lowercase()))
            .ok_or_else(|| {
                BuildError::Usage(format!(
                    "--target {name}: no stage has that name (FROM … AS {name})"
                ))
            })?,
        None => dockerfile.stages.len() - 1,
    };
    let global_args = global_args(&dockerfile, &request.build_args)?;
    warn_unused_args(&dockerfile, &request.build_args);
    let mut tally = Tally::default();
    let mut done: Vec<StageState> = Vec::new();
    let mut number = 0;
    for stage in &dockerfile.stages[..=last] {
        number += 1;
        let mut state = start_stage(request, stage, &done, &global_args, &repository, number, total)?;
        for step in &stage.steps {
            number += 1;
            let position = Position { number, total, step };
            say(&format!("STEP {number}/{total}: {}", short(&step.text)));
            run_step(
                request,
                &context,
                &dockerfile,
                &mut state,
                &done,
                &global_args,
                &repository,
                position,
                &mut tally,
            )?;
        }
        done.push(state);
    }
    let Some(state) = done.pop() else {
        return Err(BuildError::Usage("the Dockerfile has no stage".into()));
    };
    let (digest, pushed) = finish(request, &state, &repository, &tag)?;
    let reference = format!("{repository}:{tag}");
    say(&format!(
        "{} {reference} ({digest})",
        if pushed { "Pushed" } else { "Unchanged" }
    ));
    Ok(BuildResult {
        digest,
        reference,
        architecture: state.architecture.clone(),
        emulated: tally.emulated,
        steps: total,
        cached: tally.cached,
        layers_pushed: tally.layers_pushed,
        pushed,
        seconds: (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
    })
}

/// The values of the `ARG`s before the first `FROM`, and the automatic platform args.
fn global_args(
    dockerfile: &Dockerfile,
    build_args: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, BuildError> {
    let mut args = BTreeMap::new();
    for step in &dockerfile.global_args {
        if let Instruction::Arg { name, default } = &step.instruction {
            let value = match (build_args.get(name), default) {
                (Some(value), _) => Some(value.clone()),
                (None, Some(default)) => {
                    let lookup = |n: &str| args.get(n).cloned();
                    Some(
                        dockerfile::expand(default, dockerfile.escape, false, &lookup)
                            .map_err(|e| BuildError::Usage(format!("Dockerfile line {}: {e}", step.line)))?,
                    )
                }
                (None, None) => None,
            };
            if let Some(value) = value {
                args.insert(name.clone(), value);
            }
        }
    }
    Ok(args)
}

fn warn_unused_args(dockerfile: &Dockerfile, build_args: &BTreeMap<String, String>) {
    let declared: Vec<&str> = dockerfile
        .global_args
        .iter()
        .chain(dockerfile.stages.iter().flat_map(|s| s.steps.iter()))
        .filter_map(|step| match &step.instruction {
            Instruction::Arg { name, .. } => Some(name.as_str()),
            _ => None,
        })
        .collect();
    for name in build_args.keys() {
        if !declared.contains(&name.as_str()) {
            say(&format!(
                "Warning: --build-arg {name} is not declared by any ARG of the Dockerfile; it is unused"
            ));
        }
    }
}

/// The platform args of an architecture (`TARGETARCH`, …), available once declared with `ARG`.
fn platform_args(architecture: &str) -> BTreeMap<String, String> {
    let host = crate::runtime::emulation::host_architecture();
    BTreeMap::from([
        ("TARGETPLATFORM".to_owned(), format!("linux/{architecture}")),
        ("TARGETOS".to_owned(), "linux".to_owned()),
        ("TARGETARCH".to_owned(), architecture.to_owned()),
        ("BUILDPLATFORM".to_owned(), format!("linux/{host}")),
        ("BUILDOS".to_owned(), "linux".to_owned()),
        ("BUILDARCH".to_owned(), host),
    ])
}

/// Resolves a stage's `FROM`: an earlier stage, `scratch`, or a registry image (pulled).
fn start_stage(
    request: &BuildRequest,
    stage: &Stage,
    done: &[StageState],
    global_args: &BTreeMap<String, String>,
    repository: &str,
    number: usize,
    total: usize,
) -> Result<StageState, BuildError> {
    let from_step = Step {
        line: stage.line,
        text: format!("FROM {}", stage.base),
        instruction: Instruction::Maintainer(String::new()),
    };
    let position = Position {
        number,
        total,
        step: &from_step,
    };
    let lookup = |name: &str| global_args.get(name).cloned();
    let base =
        dockerfile::expand(&stage.base, '\\', false, &lookup).map_err(|e| position.fail(e.to_string()))?;
    let platform = match &stage.platform {
        Some(raw) => {
            Some(dockerfile::expand(raw, '\\', false, &lookup).map_err(|e| position.fail(e.to_string()))?)
        }
        None => request.platform.clone(),
    };
    say(&format!("STEP {number}/{total}: FROM {base}"));
    let mut state = if let Some(earlier) = done
        .iter()
        .find(|s| s.name.as_deref() == Some(&base.to_lowercase()))
    {
        let mut state = earlier.clone();
        state.config.cmd_set_here = false;
        state
    } else if base == "scratch" {
        scratch(platform.as_deref(), repository).map_err(|e| position.fail(e))?
    } else {
        pull(request, &base, platform.as_deref()).map_err(|e| position.fail(e.to_string()))?
    };
    state.name.clone_from(&stage.name);
    state.args = BTreeMap::new();
    Ok(state)
}

fn scratch(platform: Option<&str>, repository: &str) -> Result<StageState, String> {
    let platform = match platform {
        Some(text) => Platform::parse(text).map_err(|e| e.to_string())?,
        None => Platform::host(),
    };
    let (registry, path) = repository.split_once('/').unwrap_or(("", repository));
    let doc = json!({
        "architecture": platform.architecture,
        "os": platform.os,
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": []},
        "history": [],
    });
    Ok(StageState {
        name: None,
        base: ResolvedImage {
            registry: registry.to_owned(),
            repository: path.to_owned(),
            digest: "scratch".into(),
            index_digest: None,
            platform: platform.clone(),
            labels: BTreeMap::new(),
            layers: Vec::new(),
            diff_ids: Vec::new(),
            size: 0,
            config: doc.clone(),
            config_digest: String::new(),
            manifest: Value::Null,
        },
        base_lowers: Vec::new(),
        added: Vec::new(),
        config: ImageConfig::new(doc),
        history: Vec::new(),
        key: sha256_hex(&format!("FROM scratch {platform}")),
        args: BTreeMap::new(),
        shell: config::default_shell(),
        last_created: "1970-01-01T00:00:00Z".into(),
        architecture: platform.architecture.clone(),
    })
}

fn pull(request: &BuildRequest, reference: &str, platform: Option<&str>) -> Result<StageState, BuildError> {
    let pulled = crate::runtime::image::pull(
        reference,
        platform,
        &request.access,
        &request.cache_dir,
        root::in_user_namespace(),
    )?;
    let image = pulled.image;
    let doc = image.config.clone();
    let history = doc["history"].as_array().cloned().unwrap_or_default();
    let last_created = doc["created"]
        .as_str()
        .unwrap_or("1970-01-01T00:00:00Z")
        .to_owned();
    let shell = doc["config"]["Shell"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .filter(|a| !a.is_empty())
        .unwrap_or_else(config::default_shell);
    say(&format!(
        " ---> {} ({}, {} layers)",
        image.pinned_reference(),
        image.platform,
        image.layers.len()
    ));
    Ok(StageState {
        name: None,
        key: sha256_hex(&format!("FROM {}", image.digest)),
        base_lowers: pulled.lower_dirs,
        added: Vec::new(),
        config: ImageConfig::new(doc),
        history,
        args: BTreeMap::new(),
        shell,
        last_created,
        architecture: pulled.architecture,
        base: image,
    })
}

/// One step: config edits, or a filesystem step through the cache.
#[allow(clippy::too_many_arguments)]
fn run_step(
    request: &BuildRequest,
    context: &Context,
    dockerfile: &Dockerfile,
    state: &mut StageState,
    done: &[StageState],
    global_args: &BTreeMap<String, String>,
    repository: &str,
    position: Position<'_>,
    tally: &mut Tally,
) -> Result<(), BuildError> {
    let escape = dockerfile.escape;
    let step = position.step;
    let expand = |state: &StageState, word: &str| -> Result<String, BuildError> {
        let lookup = state.lookup();
        dockerfile::expand(word, escape, false, &lookup).map_err(|e| position.fail(e.to_string()))
    };
    let fingerprint = match &step.instruction {
        Instruction::Run(command) => {
            let argv = config::argv_of(command, &state.shell);
            let work = FsWork::Run { argv };
            return filesystem_step(request, state, repository, position, tally, &work);
        }
        Instruction::Copy(spec) | Instruction::Add(spec) => {
            let add = matches!(step.instruction, Instruction::Add(_));
            let work = copy_work(context, spec, add, state, done, escape, position)?;
            return filesystem_step(request, state, repository, position, tally, &work);
        }
        Instruction::Workdir(raw) => {
            let path = expand(state, raw)?;
            let path = state.config.set_workdir(&path);
            let exists = root::resolve_in_root(&state.lower_dirs(), Path::new(&path))
                .is_some_and(|p| p != Path::new("/") || path == "/");
            state.key = chain(&state.key, &format!("WORKDIR {path}"));
            if exists {
                record_config_step(state, step);
            } else {
                filesystem_step(
                    request,
                    state,
                    repository,
                    position,
                    tally,
                    &FsWork::Mkdir { path },
                )?;
            }
            return Ok(());
        }
        Instruction::Env(pairs) => {
            let mut text = String::from("ENV");
            for (key, value) in pairs {
                let value = expand(state, value)?;
                let _ = write!(text, " {key}={value}");
                state.config.env_set(key, &value);
            }
            text
        }
        Instruction::Arg { name, default } => {
            let value = match (request.build_args.get(name), default) {
                (Some(value), _) => Some(value.clone()),
                (None, Some(default)) => Some(expand(state, default)?),
                (None, None) => global_args
                    .get(name)
                    .cloned()
                    .or_else(|| platform_args(&state.architecture).get(name).cloned()),
            };
            let text = format!("ARG {name}={}", value.clone().unwrap_or_default());
            if let Some(value) = value {
                state.args.insert(name.clone(), value);
            }
            // ARG leaves no history entry (as with Docker); it still changes the key.
            state.key = chain(&state.key, &text);
            return Ok(());
        }
        Instruction::User(raw) => {
            let user = expand(state, raw)?;
            state.config.set("User", json!(user));
            format!("USER {user}")
        }
        Instruction::Label(pairs) => {
            let mut text = String::from("LABEL");
            for (key, value) in pairs {
                let key = expand(state, key)?;
                let value = expand(state, value)?;
                let _ = write!(text, " {key}={value}");
                state.config.add_label(&key, &value);
            }
            text
        }
        Instruction::Cmd(command) | Instruction::Entrypoint(command) => {
            let entrypoint = matches!(step.instruction, Instruction::Entrypoint(_));
            state.config.set_command(entrypoint, command, &state.shell);
            format!(
                "{} {}",
                step.instruction.keyword(),
                json!(config::argv_of(command, &state.shell))
            )
        }
        Instruction::Shell(shell) => {
            state.shell.clone_from(shell);
            state.config.set("Shell", json!(shell));
            format!("SHELL {}", json!(shell))
        }
        Instruction::Expose(words) => {
            let mut text = String::from("EXPOSE");
            for word in words {
                let port = config::port_key(&expand(state, word)?);
                let _ = write!(text, " {port}");
                state.config.add_to_set("ExposedPorts", &port);
            }
            text
        }
        Instruction::Volume(words) => {
            let mut text = String::from("VOLUME");
            for word in words {
                let path = expand(state, word)?;
                let _ = write!(text, " {path}");
                state.config.add_to_set("Volumes", &path);
            }
            text
        }
        Instruction::StopSignal(raw) => {
            let signal = expand(state, raw)?;
            state.config.set("StopSignal", json!(signal));
            format!("STOPSIGNAL {signal}")
        }
        Instruction::Healthcheck(check) => {
            state.config.set_healthcheck(check);
            format!("HEALTHCHECK {check:?}")
        }
        Instruction::Maintainer(name) => {
            state.config.doc["author"] = json!(name);
            format!("MAINTAINER {name}")
        }
    };
    state.key = chain(&state.key, &fingerprint);
    record_config_step(state, step);
    Ok(())
}

/// A history entry for a step that changed no file.
fn record_config_step(state: &mut StageState, step: &Step) {
    state.history.push(json!({
        "created": state.last_created,
        "created_by": short_history(&step.text),
        "comment": "walt build",
        "empty_layer": true,
    }));
}

fn short_history(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The filesystem work of a step.
#[derive(Debug)]
enum FsWork {
    /// Run a command.
    Run { argv: Vec<String> },
    /// Copy files in; `content` identifies what is copied (context files' digest, or the source
    /// stage's key).
    Copy {
        /// The copy.
        job: Box<CopyJob>,
        /// Its content fingerprint.
        content: String,
    },
    /// Create the `WORKDIR`.
    Mkdir { path: String },
}

/// Resolves a `COPY`/`ADD`: sources, destination, owner; selects context files (their contents count in
/// the cache key).
#[allow(clippy::too_many_arguments)]
fn copy_work(
    context: &Context,
    spec: &CopySpec,
    add: bool,
    state: &StageState,
    done: &[StageState],
    escape: char,
    position: Position<'_>,
) -> Result<FsWork, BuildError> {
    let lookup = state.lookup();
    let expand = |word: &str| -> Result<String, BuildError> {
        dockerfile::expand(word, escape, spec.json, &lookup).map_err(|e| position.fail(e.to_string()))
    };
    let sources = spec
        .sources
        .iter()
        .map(|s| expand(s))
        .collect::<Result<Vec<_>, _>>()?;
    let raw_dest = expand(&spec.dest)?;
    let dest_is_dir = raw_dest.ends_with('/') || sources.len() > 1;
    let dest = if raw_dest.starts_with('/') {
        raw_dest.clone()
    } else {
        format!("{}/{raw_dest}", state.config.workdir().trim_end_matches('/'))
    };
    let owner = match &spec.chown {
        Some(raw) => {
            let spec_text = expand(raw)?;
            let (identity, _) =
                identity_in(&state.lower_dirs(), &spec_text, false).map_err(|e| position.fail(e))?;
            Some((identity.uid, identity.gid))
        }
        None => None,
    };
    let chmod = spec
        .chmod
        .as_deref()
        .map(|m| u32::from_str_radix(m, 8))
        .transpose()
        .map_err(|e| position.fail(format!("--chmod: {e}")))?;
    let (source, groups, content) = if let Some(raw) = &spec.from {
        let from = expand(raw)?.to_lowercase();
        let stage = done
                .iter()
                .find(|s| s.name.as_deref() == Some(&from))
                .or_else(|| from.parse::<usize>().ok().and_then(|i| done.get(i)))
                .ok_or_else(|| {
                    position.fail(format!(
                        "--from={from}: no earlier stage has that name (FROM … AS {from}); images are not supported in --from: add a stage FROM the image"
                    ))
                })?;
        (
            CopySource::Layers {
                lower_dirs: stage.lower_dirs(),
                mount_at: PathBuf::new(),
            },
            Vec::new(),
            format!("from {}", stage.key),
        )
    } else {
        let groups = context
            .select(&sources)
            .map_err(|e| position.fail(e.to_string()))?;
        let fingerprint = context
            .fingerprint(&groups)
            .map_err(|e| position.fail(e.to_string()))?;
        (CopySource::Context(context.clone()), groups, fingerprint)
    };
    let job = CopyJob {
        source,
        sources,
        groups,
        dest,
        dest_is_dir,
        owner,
        chmod,
        extract_archives: add,
    };
    Ok(FsWork::Copy {
        job: Box::new(job),
        content,
    })
}

/// Resolves a user spec against the image's `/etc/passwd` and `/etc/group`.
fn identity_in(
    layers: &[PathBuf],
    spec: &str,
    primary_group: bool,
) -> Result<(root::Identity, Option<String>), String> {
    let read = |path: &str| read_image_file(layers, path).unwrap_or_default();
    config::resolve_user(spec, &read("/etc/passwd"), &read("/etc/group"), primary_group)
        .map_err(|e| e.to_string())
}

/// A file of the image made of `layers` (top first), links followed inside it.
fn read_image_file(layers: &[PathBuf], path: &str) -> Option<String> {
    let resolved = root::resolve_in_root(layers, Path::new(path))?;
    let relative = resolved.strip_prefix("/").ok()?.to_path_buf();
    layers
        .iter()
        .find_map(|layer| std::fs::read_to_string(layer.join(&relative)).ok())
}

impl FsWork {
    /// What identifies the work in the cache key.
    fn fingerprint(&self, state: &StageState) -> String {
        match self {
            FsWork::Run { argv } => format!(
                "RUN {} env={} user={} workdir={}",
                json!(argv),
                json!(config::run_env(&state.config, &state.args, None)),
                state.config.user(),
                state.config.workdir()
            ),
            FsWork::Copy { job, content } => {
                format!(
                    "COPY {} -> {} dir={} owner={:?} chmod={:?} add={} {content}",
                    json!(job.sources),
                    job.dest,
                    job.dest_is_dir,
                    job.owner,
                    job.chmod,
                    job.extract_archives
                )
            }
            FsWork::Mkdir { path } => format!("MKDIR {path}"),
        }
    }
}

/// A step that may change files: through the cache, else run, upload its layer, keep it unpacked.
fn filesystem_step(
    request: &BuildRequest,
    state: &mut StageState,
    repository: &str,
    position: Position<'_>,
    tally: &mut Tally,
    work: &FsWork,
) -> Result<(), BuildError> {
    let key = chain(&state.key, &work.fingerprint(state));
    let cache = layer_cache(request)?;
    if !request.no_cache
        && let Some(entry) = cached(request, &key, repository, &cache)
    {
        say(" ---> Using cache");
        // A cached RUN was run through qemu-user when the stage's CPU is not this node's: the
        // result says so on a fully cached rebuild too (it said ", emulated" on the first build).
        if matches!(work, FsWork::Run { .. }) {
            let host = crate::runtime::emulation::host_architecture();
            tally.emulated |= !crate::runtime::emulation::runs_natively(&state.architecture, &host);
        }
        apply_result(state, entry.layer, entry.history, &cache);
        state.key = key;
        tally.cached += 1;
        return Ok(());
    }
    let guard = SessionDir::create(&request.cache_dir).map_err(|source| BuildError::Io {
        what: "creating a session directory in",
        path: request.cache_dir.clone(),
        source,
    })?;
    let session = guard.path().to_path_buf();
    let mut spec = RootSpec::new(state.lower_dirs(), &session);
    spec.hostname = "walt-build".into();
    spec.network = request.network;
    spec.bind_cpuinfo = false;
    spec.scratch_tmpfs = false;
    match work {
        FsWork::Run { argv } => run_command(state, &spec, argv, position, tally)?,
        FsWork::Copy { job, .. } => {
            let mut job = job.as_ref().clone();
            if let CopySource::Layers { mount_at, .. } = &mut job.source {
                *mount_at = session.join("from");
            }
            root::with_mounted_root(&spec, |root| super::copy::copy_into(root, &job).map(|_| ()))
                .map_err(|e| position.fail(e.to_string()))?;
        }
        FsWork::Mkdir { path } => {
            let path = path.clone();
            root::with_mounted_root(&spec, |root| {
                let host = context::join_in_root(root, Path::new(&path));
                std::fs::create_dir_all(&host).map_err(|e| format!("create {path}: {e}"))
            })
            .map_err(|e| position.fail(e.to_string()))?;
        }
    }
    let created = now();
    let history = json!({
        "created": created,
        "created_by": short_history(&position.step.text),
        "comment": "walt build",
    });
    let changed = std::fs::read_dir(&spec.upper_dir).is_ok_and(|mut entries| entries.next().is_some());
    let layer = if changed {
        let uploaded = upload(request, state, repository, &spec.upper_dir, &position.step.text)
            .map_err(|e| position.fail(e.to_string()))?;
        let dir = cache.layer_dir(&uploaded.descriptor.digest);
        if !dir.exists() {
            std::fs::rename(&spec.upper_dir, &dir).map_err(|source| BuildError::Io {
                what: "keeping the new layer in the layer cache at",
                path: dir.clone(),
                source,
            })?;
        }
        say(&format!(
            " ---> layer {} ({} bytes): {} added, {} modified, {} deleted",
            uploaded.descriptor.digest,
            uploaded.descriptor.size,
            uploaded.summary.added,
            uploaded.summary.modified,
            uploaded.summary.deleted
        ));
        tally.layers_pushed += 1;
        Some(uploaded)
    } else {
        say(" ---> no file changed");
        None
    };
    let entry = CacheEntry {
        layer: layer.clone(),
        history: history.clone(),
    };
    record(request, &key, &entry);
    drop(guard);
    apply_result(state, layer, history, &cache);
    state.key = key;
    Ok(())
}

fn layer_cache(request: &BuildRequest) -> Result<LayerCache, BuildError> {
    let mut cache = LayerCache::new(request.cache_dir.join("layers"))
        .map_err(|e| BuildError::Usage(format!("the layer cache: {e}")))?;
    if root::in_user_namespace() {
        cache = cache.with_opaque_xattr(OpaqueXattr::User);
    }
    Ok(cache)
}

fn apply_result(
    state: &mut StageState,
    layer: Option<UploadedLayer>,
    mut history: Value,
    cache: &LayerCache,
) {
    if let Some(created) = history["created"].as_str() {
        created.clone_into(&mut state.last_created);
    }
    match layer {
        Some(uploaded) => {
            let dir = cache.layer_dir(&uploaded.descriptor.digest);
            state.added.push(AddedLayer { uploaded, dir });
        }
        None => history["empty_layer"] = json!(true),
    }
    state.history.push(history);
}

fn cache_path(request: &BuildRequest, key: &str) -> PathBuf {
    request.cache_dir.join("build-cache").join(format!("{key}.json"))
}

/// The cached result of `key`, when its layer is unpacked here and its blob is in the target repository.
fn cached(request: &BuildRequest, key: &str, repository: &str, cache: &LayerCache) -> Option<CacheEntry> {
    let text = std::fs::read_to_string(cache_path(request, key)).ok()?;
    let entry: CacheEntry = serde_json::from_str(&text).ok()?;
    let Some(layer) = &entry.layer else {
        return Some(entry);
    };
    if !cache.contains(&layer.descriptor.digest) {
        return None;
    }
    let client = request.access.client().ok()?;
    let digest = layer.descriptor.digest.clone();
    let present = block_on(async { Ok(client.has_blob(repository, &digest).await?) }).ok()?;
    drop(client);
    crate::runtime::image::await_single_thread().ok()?;
    present.then_some(entry)
}

fn record(request: &BuildRequest, key: &str, entry: &CacheEntry) {
    let path = cache_path(request, key);
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Ok(text) = serde_json::to_string(entry) {
        let temporary = path.with_extension("tmp");
        if std::fs::write(&temporary, text).is_ok() {
            let _ = std::fs::rename(&temporary, &path);
        }
    }
}

/// Runs `argv` as PID 1 of a container on the stage's layers; fails the step on a non-zero exit.
fn run_command(
    state: &StageState,
    spec: &RootSpec,
    argv: &[String],
    position: Position<'_>,
    tally: &mut Tally,
) -> Result<(), BuildError> {
    let emulated =
        crate::runtime::emulation::check(&state.architecture).map_err(|e| position.fail(e.to_string()))?;
    tally.emulated |= emulated;
    let layers = state.lower_dirs();
    let user = state.config.user();
    let (identity, home) = if user.is_empty() {
        (None, None)
    } else {
        let (identity, home) =
            identity_in(&layers, &user, true).map_err(|e| position.fail(format!("USER {user}: {e}")))?;
        (Some(identity), home)
    };
    let env = config::run_env(&state.config, &state.args, home.as_deref());
    let Some(first) = argv.first() else {
        return Err(position.fail("an empty command"));
    };
    let program = find_program(&layers, first, &env).ok_or_else(|| {
        position.fail(format!(
            "{first} is not an executable file of the image (searched in its PATH): install it in an earlier step, or use SHELL to name the image's shell"
        ))
    })?;
    let command = root::Command {
        program,
        args: argv.to_vec(),
        env,
        cwd: state.config.workdir(),
        stdio: root::Stdio::Inherit,
        identity,
    };
    let mut container = root::Container::start(spec, &command).map_err(|e| position.fail(e.to_string()))?;
    let status = container.wait_init(Duration::from_secs(u64::from(u32::MAX)), || {});
    container.finish();
    let code = status.map_or(1, crate::runtime::terminal::exit_code);
    if code != 0 {
        return Err(position.fail(format!(
            "the command exited with status {code} (its output is above)"
        )));
    }
    Ok(())
}

/// `program` as an absolute path in the image: as given when absolute, else searched in `PATH`.
fn find_program(layers: &[PathBuf], program: &str, env: &[String]) -> Option<String> {
    if program.contains('/') {
        let absolute = if program.starts_with('/') {
            program.to_owned()
        } else {
            format!("/{program}")
        };
        return crate::runtime::session::is_executable(layers, &absolute).then_some(absolute);
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(config::DEFAULT_PATH);
    path.split(':')
        .filter(|dir| dir.starts_with('/'))
        .map(|dir| format!("{}/{program}", dir.trim_end_matches('/')))
        .find(|candidate| crate::runtime::session::is_executable(layers, candidate))
}

/// Uploads the upper dir as a layer blob to the target repository.
fn upload(
    request: &BuildRequest,
    state: &StageState,
    repository: &str,
    upper: &Path,
    text: &str,
) -> Result<UploadedLayer, crate::runtime::image::ImageError> {
    let client = request.access.client()?;
    let mut options = CommitOptions::new(&short_history(text));
    options.layer = LayerOptions {
        lower_dirs: state.lower_dirs(),
        ..LayerOptions::default()
    };
    let uploaded = block_on(async { Ok(client.push_layer_dir(repository, upper, &options).await?) })?;
    drop(client);
    crate::runtime::image::await_single_thread()?;
    Ok(uploaded)
}

/// The final config of a stage.
fn final_config(state: &StageState) -> Value {
    let mut doc = state.config.doc.clone();
    let diff_ids: Vec<Value> = state
        .base
        .diff_ids
        .iter()
        .cloned()
        .chain(state.added.iter().map(|l| l.uploaded.diff_id.clone()))
        .map(Value::String)
        .collect();
    doc["rootfs"] = json!({"type": "layers", "diff_ids": diff_ids});
    doc["history"] = Value::Array(state.history.clone());
    doc["created"] = json!(state.last_created);
    doc["architecture"] = json!(state.architecture);
    if doc["os"].as_str().is_none_or(str::is_empty) {
        doc["os"] = json!("linux");
    }
    doc
}

/// Pushes the image by digest and moves the tag, unless the tag already points at this exact image.
/// Returns the digest and whether anything was pushed.
fn finish(
    request: &BuildRequest,
    state: &StageState,
    repository: &str,
    tag: &str,
) -> Result<(String, bool), BuildError> {
    let config = final_config(state);
    let added: Vec<LayerDescriptor> = state
        .added
        .iter()
        .map(|l| l.uploaded.descriptor.clone())
        .collect();
    let all_layers: Vec<LayerDescriptor> = state
        .base
        .layers
        .iter()
        .cloned()
        .chain(added.iter().cloned())
        .collect();
    let client = request.access.client()?;
    let target = format!("{repository}:{tag}");
    let outcome = block_on(async {
        if let Ok(existing) = client.resolve(&target, None).await
            && existing.config == config
            && same_blobs(&existing.layers, &all_layers)
        {
            return Ok((existing.digest, false));
        }
        let digest = client
            .push_assembled(&state.base, repository, &added, &config)
            .await?;
        client.tag(repository, &digest, tag).await?;
        Ok((digest, true))
    })?;
    drop(client);
    Ok(outcome)
}

fn same_blobs(a: &[LayerDescriptor], b: &[LayerDescriptor]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.digest == y.digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_chain_and_steps_shorten() {
        let a = chain("base", "RUN x");
        assert_eq!(a, chain("base", "RUN x"));
        assert_ne!(a, chain("other", "RUN x"));
        assert_ne!(a, chain("base", "RUN y"));
        assert_eq!(short("RUN a \\\n   b"), "RUN a \\ b");
        assert_eq!(short(&"x".repeat(100)).chars().count(), 80);
    }

    #[test]
    fn programs_are_found_in_the_image_path() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let layer = dir.path().to_path_buf();
        std::fs::create_dir_all(layer.join("usr/bin")).unwrap();
        std::fs::write(layer.join("usr/bin/tool"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(layer.join("usr/bin/tool"), std::fs::Permissions::from_mode(0o755)).unwrap();
        let env = vec!["PATH=/bin:/usr/bin".to_owned()];
        let layers = vec![layer];
        assert_eq!(
            find_program(&layers, "tool", &env).as_deref(),
            Some("/usr/bin/tool")
        );
        assert_eq!(
            find_program(&layers, "/usr/bin/tool", &env).as_deref(),
            Some("/usr/bin/tool")
        );
        assert_eq!(find_program(&layers, "missing", &env), None);
    }
}
