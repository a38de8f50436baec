//! `ImageBuild`: build an image from a Dockerfile on the cluster, RUN steps in the image's own CPU.
//!
//! The build context is uploaded by the client (`kubectl walt image build`) into the build pod's
//! standard input as a tar archive; a `git` record says where it came from. The operator runs the
//! build pod in the tenant's runtime namespace (`walt-run-<namespace>`, [`crate::runtime_namespace`]:
//! the tenant needs no pod rights, its own namespace stays at Pod Security `baseline`), reads its
//! progress, and once the image is pushed (by digest) moves the target image's tag and updates its
//! Image, like every other image change.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Most build arguments one ImageBuild takes.
pub const BUILD_ARGS_MAX_ITEMS: usize = 64;
/// Most lines of the build log kept in `status.logTail`.
pub const LOG_TAIL_MAX_LINES: usize = 20;
/// Longest line kept in `status.logTail` (longer lines are cut, marked with `…`).
pub const LOG_LINE_MAX_LENGTH: usize = 512;
/// Longest `status.step` (longer step texts are cut, marked with `…`).
pub const STEP_MAX_LENGTH: usize = 256;
/// The line the build prints before its first step (its progress lines start with it).
pub const STEP_PREFIX: &str = "STEP ";
/// The line the build prints once it has read the whole context from its standard input.
pub const CONTEXT_RECEIVED: &str = "Build context received:";

/// The reasons an ImageBuild's conditions and Events give, read alike by the operator (which writes
/// them) and `kubectl walt` (which waits on them): one place, compared as constants, never as text.
pub mod reasons {
    /// Event: the build pod was created.
    pub const POD_CREATED: &str = "PodCreated";
    /// `Complete=False`: another writer (an image shell, a node save, another build) holds the
    /// target image; the build pod starts when it ends (one writer at a time per image).
    pub const IMAGE_BUSY: &str = "ImageBusy";
    /// `Complete=False`: the build pod waits for the context the client uploads.
    pub const WAITING_FOR_CONTEXT: &str = "WaitingForContext";
    /// `Complete=False`: the build runs (see `status.step`).
    pub const BUILDING: &str = "Building";
    /// `Complete=True`: the image was built, pushed and its tag moved.
    pub const BUILT: &str = "Built";
    /// `Complete=True`, failed: a step failed (its output is in the message and `status.logTail`); no
    /// tag moved.
    pub const BUILD_FAILED: &str = "BuildFailed";
    /// `Complete=True`, failed: the build pod could not start or vanished; no tag moved.
    pub const POD_FAILED: &str = "PodFailed";
    /// `Complete=True`, failed: no context was uploaded in time; no tag moved.
    pub const CONTEXT_NOT_UPLOADED: &str = "ContextNotUploaded";
    /// `Complete=True`, failed: `spec.image` exists and `spec.overwrite` is false.
    pub const IMAGE_EXISTS: &str = "ImageExists";
    /// `Complete=True`, failed: the built image could not be tagged as `spec.image`.
    pub const SAVE_FAILED: &str = "SaveFailed";
    /// `Complete=True`, failed: the target is outside the namespace's registry path.
    pub const REGISTRY_PATH_FORBIDDEN: &str = crate::image::reasons::REGISTRY_PATH_FORBIDDEN;
    /// `Complete=True`, failed: the tenant's runtime namespace cannot be used (the build's namespace
    /// is named like one, or a namespace of that name exists that walt did not make for it); no pod
    /// was made.
    pub const RUNTIME_NAMESPACE_REFUSED: &str = "RuntimeNamespaceRefused";
}

/// What to build (a Dockerfile and its context) and the image it becomes. Cannot change once created.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "walt.dev",
    version = "v1alpha1",
    kind = "ImageBuild",
    plural = "imagebuilds",
    namespaced,
    status = "ImageBuildStatus",
    derive = "PartialEq",
    derive = "Default",
    shortname = "wbuild",
    category = "walt",
    doc = "Build an image from a Dockerfile on the cluster: a build pod runs each RUN step in walt's \
           runtime (through qemu-user when the image's CPU differs from the cluster node's), pushes the \
           result by digest, and the operator then tags it as spec.image. The spec cannot change once created.",
    printcolumn = r#"{"name": "Image", "type": "string", "jsonPath": ".spec.image", "description": "Image the build becomes"}"#,
    printcolumn = r#"{"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Pending, Building, Succeeded or Failed"}"#,
    printcolumn = r#"{"name": "Step", "type": "string", "jsonPath": ".status.step", "description": "The step running (or that failed)"}"#,
    printcolumn = r#"{"name": "Digest", "type": "string", "jsonPath": ".status.result.shortDigest", "description": "Manifest digest of the built image (short)"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self == oldSelf",
        "message": "the spec of an ImageBuild cannot change; create a new ImageBuild"
    },
]))]
pub struct ImageBuildSpec {
    /// Image name (`name[:tag]`) the build becomes: a new image of the namespace, or an existing one
    /// with `overwrite: true` (the nodes that boot it then reboot on the new content).
    #[schemars(schema_with = "crate::schema::image_name")]
    pub image: String,
    /// Where the build context (the files `COPY` and `ADD` read) comes from.
    #[serde(default)]
    pub source: BuildSource,
    /// The Dockerfile, relative to the context (default: `Dockerfile`, else `Containerfile`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::schema::context_path")]
    pub dockerfile: Option<String>,
    /// Values for the Dockerfile's `ARG`s (like `docker build --build-arg NAME=VALUE`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "build_args_schema")]
    pub build_args: Vec<BuildArg>,
    /// Build this stage (`FROM … AS name`) instead of the last one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::schema::stage_name")]
    pub target: Option<String>,
    /// Platform of base images that have several, and of `FROM scratch` (`linux/arm64`). Unset: the
    /// base image's own (an index with several: the cluster node's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::schema::platform")]
    pub platform: Option<String>,
    /// The base image (`FROM`) of the stage built, as `kubectl walt image build` read it from the
    /// Dockerfile, for scheduling only: when it is an Image of the namespace or the catalog (its
    /// `status.reference`), the build pod prefers cluster nodes of that Image's CPU, so `RUN` steps run
    /// natively where the cluster has one. The build itself reads the Dockerfile. Unset: unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    pub base_image: Option<String>,
    /// Replace `image` if it exists (otherwise the build fails rather than overwrite it).
    #[serde(default)]
    pub overwrite: bool,
    /// Run every step, ignoring the step cache.
    #[serde(default)]
    pub no_cache: bool,
}

fn build_args_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let item = generator.subschema_for::<BuildArg>();
    schemars::json_schema!({
        "type": "array",
        "items": item,
        "maxItems": BUILD_ARGS_MAX_ITEMS,
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["name"],
    })
}

/// One build argument.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BuildArg {
    /// Name of the `ARG`.
    #[schemars(schema_with = "crate::schema::arg_name")]
    pub name: String,
    /// Its value.
    #[serde(default)]
    #[schemars(length(max = 4096))]
    pub value: String,
}

/// Where the build context comes from, and (for the record) where that came from.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BuildSource {
    /// How the context reaches the build: `Upload`, the client streams it as a tar archive into the
    /// build pod's standard input (what `kubectl walt image build` does, for `--from-dir` and
    /// `--from-url` alike: a git URL is cloned on the user's machine).
    #[serde(default)]
    pub context: ContextSource,
    /// Provenance: the git repository the uploaded context was taken from (not fetched by the cluster).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git: Option<GitSource>,
}

/// How the build context reaches the build pod.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ContextSource {
    /// The client streams a tar archive of the context into the build pod's standard input.
    #[default]
    Upload,
}

/// A git checkout, as the client made it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GitSource {
    /// The repository URL.
    #[schemars(length(min = 1, max = 2048))]
    pub url: String,
    /// The branch, tag or commit asked for (unset: the remote's default branch).
    #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub ref_: Option<String>,
    /// The directory of the repository that is the context (unset: its root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::schema::context_path")]
    pub sub_dir: Option<String>,
    /// The commit that was checked out (full hex object name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::schema::commit")]
    pub commit: Option<String>,
}

/// Lifecycle of a build.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ImageBuildPhase {
    /// Accepted, the build pod not created yet.
    #[default]
    Pending,
    /// The build pod runs (waiting for the context, then the steps; see `step`).
    Building,
    /// The image is built and tagged as `spec.image` (see `result`).
    Succeeded,
    /// The build failed (see the conditions and `logTail`); no tag moved.
    Failed,
}

impl ImageBuildPhase {
    /// Whether the build is over.
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed)
    }
}

/// The image a build produced.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageBuildResult {
    /// The image name it was saved as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Manifest digest (`sha256:…`) of the built image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// The first 12 hex digits of `digest`, for display.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub short_digest: Option<String>,
    /// CPU architecture of the built image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architecture: Option<String>,
    /// Whether `RUN` steps went through qemu-user: the image's CPU differs from that of the cluster
    /// node the build ran on (`clusterNode`, its `nodeInfo.architecture`).
    #[serde(default)]
    pub emulated: bool,
    /// Layer steps reused from the step cache.
    #[serde(default)]
    pub cached_steps: u32,
    /// Layers this build uploaded.
    #[serde(default)]
    pub layers_pushed: u32,
}

/// The observed state of an ImageBuild.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageBuildStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pending, Building, Succeeded or Failed.
    #[serde(default)]
    pub phase: ImageBuildPhase,
    /// The build pod (it reads the context on its standard input).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// The namespace of the build pod: the tenant's walt runtime namespace (`walt-run-<namespace>`,
    /// see [`crate::runtime_namespace`]), which the operator owns; the tenant may attach to its own
    /// builds there and create nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_namespace: Option<String>,
    /// The step running, or the last one (`3/9 RUN apt-get install …`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub step: Option<String>,
    /// Steps finished (all stages, `FROM` included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps_done: Option<u32>,
    /// Steps in all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps_total: Option<u32>,
    /// The last lines of the build log (a failed step's output ends here).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20), inner(length(max = 512)))]
    pub log_tail: Vec<String>,
    /// The cluster node the build pod runs (or ran) on, once scheduled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_node: Option<String>,
    /// The built image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<ImageBuildResult>,
    /// When the build pod was created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the build ended (succeeded or failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// Standard conditions (`Complete`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::schema::conditions")]
    pub conditions: Vec<Condition>,
}

/// One progress line of the build log: `STEP 3/9: RUN apt-get install …`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepLine {
    /// The step's number (1-based, all stages).
    pub number: u32,
    /// Steps in all.
    pub total: u32,
    /// The instruction, shortened.
    pub text: String,
}

impl StepLine {
    /// Parses a progress line (`None` for any other line).
    pub fn parse(line: &str) -> Option<Self> {
        let rest = line.trim_end().strip_prefix(STEP_PREFIX)?;
        let (counts, text) = rest.split_once(": ")?;
        let (number, total) = counts.split_once('/')?;
        Some(Self {
            number: number.parse().ok()?,
            total: total.parse().ok()?,
            text: text.to_owned(),
        })
    }

    /// How `status.step` shows it: `3/9 RUN apt-get install …` (bounded).
    pub fn display(&self) -> String {
        cut(
            &format!("{}/{} {}", self.number, self.total, self.text),
            STEP_MAX_LENGTH,
        )
    }
}

/// What a build log says so far (pure): the last step line, whether the context arrived, the tail.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogProgress {
    /// The last step line seen.
    pub step: Option<StepLine>,
    /// The context was read from standard input.
    pub context_received: bool,
    /// The last lines (at most [`LOG_TAIL_MAX_LINES`], each at most [`LOG_LINE_MAX_LENGTH`]).
    pub tail: Vec<String>,
}

impl LogProgress {
    /// Reads a build log (or its end).
    pub fn of(log: &str) -> Self {
        let lines: Vec<&str> = log
            .lines()
            .map(str::trim_end)
            .filter(|line| !line.is_empty())
            .collect();
        let step = lines.iter().rev().find_map(|line| StepLine::parse(line));
        let context_received = step.is_some() || lines.iter().any(|line| line.starts_with(CONTEXT_RECEIVED));
        let tail = lines[lines.len().saturating_sub(LOG_TAIL_MAX_LINES)..]
            .iter()
            .map(|line| cut(line, LOG_LINE_MAX_LENGTH))
            .collect();
        Self {
            step,
            context_received,
            tail,
        }
    }

    /// Steps finished: all before the running one.
    pub fn steps_done(&self) -> Option<u32> {
        self.step.as_ref().map(|step| step.number.saturating_sub(1))
    }
}

/// `text` cut to at most `max` bytes on a character boundary, marked with `…` when cut.
fn cut(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_lines_parse_and_display() {
        let step = StepLine::parse("STEP 3/9: RUN apt-get install -y curl").expect("a step line");
        assert_eq!(
            (step.number, step.total, step.text.as_str()),
            (3, 9, "RUN apt-get install -y curl")
        );
        assert_eq!(step.display(), "3/9 RUN apt-get install -y curl");
        assert_eq!(StepLine::parse("Setting up curl"), None);
        assert_eq!(StepLine::parse("STEP x/9: RUN"), None);
        let long = StepLine {
            number: 1,
            total: 2,
            text: "é".repeat(300),
        };
        assert!(long.display().len() <= STEP_MAX_LENGTH && long.display().ends_with('…'));
    }

    #[test]
    fn a_log_gives_the_running_step_and_a_bounded_tail() {
        use std::fmt::Write as _;
        let mut log = String::from("Build context received: 3 files, 120 bytes\nSTEP 1/3: FROM debian\n");
        assert!(!LogProgress::of("").context_received);
        assert!(LogProgress::of(&log).context_received);
        log.push_str("STEP 2/3: RUN make\n");
        for n in 0..40 {
            writeln!(log, "cc -c file{n}.c").expect("write to a String");
        }
        log.push_str(&"x".repeat(2000));
        let progress = LogProgress::of(&log);
        assert_eq!(
            progress.step.as_ref().map(StepLine::display),
            Some("2/3 RUN make".into())
        );
        assert_eq!(progress.steps_done(), Some(1));
        assert_eq!(progress.tail.len(), LOG_TAIL_MAX_LINES);
        assert!(progress.tail.iter().all(|line| line.len() <= LOG_LINE_MAX_LENGTH));
        assert_eq!(progress.tail[0], "cc -c file21.c");
    }
}
