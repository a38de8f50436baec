//! The pure parts of the ImageBuild controller: the build pod (walt's runtime pod running
//! `walt-operator build --context-tar -`, in the tenant's runtime namespace), its scratch tag, and
//! what its status says.

use std::str::FromStr;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use serde::Deserialize;
use walt_crds::runtime::OWNER_NAME_LABEL;
use walt_crds::{Image, ImageBuild, runtime_namespace};

use crate::controller::config::LayerCache;
use crate::controller::shared::pods::{CACHE_DIR, RuntimePod, emulated_on, prefer_architecture, runtime_pod};
use crate::controller::shared::runtime::owner_labels;

/// Label naming the ImageBuild a pod belongs to.
pub const BUILD_LABEL: &str = "walt.dev/image-build";
/// The owner kind of a build pod's owner labels.
pub const OWNER_KIND: &str = "ImageBuild";

/// Name of the build pod of a build.
pub fn build_pod_name(build: &str) -> String {
    format!("walt-build-{build}")
}

/// The scratch tag a build pushes under (by digest): the target's own tag moves only once the build
/// succeeded, by the operator.
pub fn scratch_tag(build: &ImageBuild) -> String {
    let uid = build.uid().unwrap_or_default();
    let short: String = uid.chars().filter(char::is_ascii_alphanumeric).take(12).collect();
    format!("build-{short}")
}

/// What a build pod needs beyond the ImageBuild.
#[derive(Clone, Debug)]
pub struct BuildPodInputs<'a> {
    /// Image of the pod (the walt-operator image).
    pub runtime_image: &'a str,
    /// Where the build pushes: `repository:build-…` in the target's repository.
    pub push_to: &'a str,
    /// Registry host spoken to over plain HTTP, if any.
    pub insecure_registry: Option<&'a str>,
    /// Run in a user namespace instead of privileged.
    pub user_namespaces: bool,
    /// Where the layer (and step) cache lives.
    pub cache: &'a LayerCache,
    /// Whether the namespace has the registry credentials Secret to mount.
    pub registry_credentials: bool,
    /// The CPU the built image is for, when known before the build runs ([`build_architecture`]):
    /// the pod prefers cluster nodes of that CPU.
    pub architecture: Option<&'a str>,
}

/// The CPU a build's image is for, as far as the operator knows before the build runs (pure): the
/// architecture of `spec.platform`, else that of the Image whose `status.reference` is
/// `spec.baseImage` (the `FROM` the client read), among `images` (the namespace's and the catalog's).
/// `None`: unknown (a base outside them, a multi-platform one, `FROM scratch`); the pod then goes
/// wherever the scheduler puts it, and a multi-platform base resolves to that node's CPU.
pub fn build_architecture<'a>(spec: &'a walt_crds::ImageBuildSpec, images: &'a [Image]) -> Option<&'a str> {
    if let Some(platform) = &spec.platform {
        return platform.split('/').nth(1).filter(|a| !a.is_empty());
    }
    let base = comparable_reference(spec.base_image.as_deref()?)?;
    images
        .iter()
        .filter_map(|image| image.status.as_ref())
        .find(|status| {
            status
                .reference
                .as_deref()
                .and_then(comparable_reference)
                .as_ref()
                == Some(&base)
        })
        .and_then(|status| status.platform.as_ref())
        .map(|platform| platform.architecture.as_str())
        .filter(|a| !a.is_empty())
}

/// A reference as the registry reads it (`debian` is `docker.io/library/debian:latest`), to compare
/// two spellings of one; `None` when it is not a reference.
fn comparable_reference(reference: &str) -> Option<String> {
    oci_client::Reference::from_str(reference.trim())
        .ok()
        .map(|parsed| parsed.whole())
}

/// Whether a finished build's `RUN` steps were emulated, as walt reports it (pure): the build runtime
/// says whether it ran any through qemu-user, and the cluster node its pod ran on is the CPU walt
/// places pods by (its kubelet's word, the `kubernetes.io/arch` the pod preferred): on a node of the
/// image's CPU the build is native. Unknown node: the runtime's word alone.
pub fn build_emulated(
    outcome: &BuildOutcome,
    cluster_node: Option<&k8s_openapi::api::core::v1::Node>,
) -> bool {
    outcome.emulated && emulated_on(Some(&outcome.architecture), cluster_node) != Some(false)
}

/// The `walt-operator build` arguments of a build (pure).
pub fn build_args(build: &ImageBuild, inputs: &BuildPodInputs<'_>) -> Vec<String> {
    let spec = &build.spec;
    let mut args: Vec<String> = [
        "build",
        "--context-tar",
        "-",
        "--to",
        inputs.push_to,
        "--cache-dir",
        CACHE_DIR,
    ]
    .map(str::to_owned)
    .to_vec();
    if let Some(file) = &spec.dockerfile {
        args.extend(["--file".to_owned(), file.clone()]);
    }
    for arg in &spec.build_args {
        args.extend(["--build-arg".to_owned(), format!("{}={}", arg.name, arg.value)]);
    }
    if let Some(stage) = &spec.target {
        args.extend(["--target".to_owned(), stage.clone()]);
    }
    if let Some(platform) = &spec.platform {
        args.extend(["--platform".to_owned(), platform.clone()]);
    }
    if spec.no_cache {
        args.push("--no-cache".to_owned());
    }
    if let Some(host) = inputs.insecure_registry {
        args.extend(["--insecure-registry".to_owned(), host.to_owned()]);
    }
    args
}

/// Builds the build pod (pure): the same runtime pod as image shells, without a terminal (the client
/// writes the context's tar archive on its standard input), in the tenant's runtime namespace with
/// the build's owner labels (owner references cannot cross namespaces).
pub fn build_pod(build: &ImageBuild, inputs: &BuildPodInputs<'_>) -> Pod {
    let mut labels = owner_labels(OWNER_KIND, build);
    labels.insert(BUILD_LABEL.to_owned(), labels[OWNER_NAME_LABEL].clone());
    runtime_pod(&RuntimePod {
        name: build_pod_name(&build.name_any()),
        namespace: build.namespace().map(|namespace| runtime_namespace(&namespace)),
        labels,
        owner: None,
        container: "build",
        args: build_args(build, inputs),
        tty: false,
        runtime_image: inputs.runtime_image,
        user_namespaces: inputs.user_namespaces,
        cache: inputs.cache,
        registry_credentials: inputs.registry_credentials,
        // The image's CPU, when known: its RUN steps run natively on a node of that CPU where the
        // cluster has one, emulated elsewhere.
        affinity: prefer_architecture(inputs.architecture),
    })
}

/// What `walt-operator build` reports on success (its termination message, JSON).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildOutcome {
    /// Manifest digest of the pushed image.
    pub digest: String,
    /// Where it was pushed (`repository:build-…`).
    pub reference: String,
    /// Its architecture.
    #[serde(default)]
    pub architecture: String,
    /// Whether RUN steps were emulated.
    #[serde(default)]
    pub emulated: bool,
    /// Steps in all.
    #[serde(default)]
    pub steps: u32,
    /// Layer steps taken from the cache.
    #[serde(default)]
    pub cached: u32,
    /// Layers uploaded.
    #[serde(default)]
    pub layers_pushed: u32,
}

/// What the build pod's status says (pure).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodState {
    /// Being scheduled, pulling its image, starting.
    Starting,
    /// Running, for this long.
    Running(Duration),
    /// The build succeeded and reported this.
    Succeeded(BuildOutcome),
    /// The build ended in failure: its termination message (the build's error).
    Failed(String),
    /// The pod cannot start (image pull, configuration): why.
    CannotStart(String),
}

/// Reads a build pod's state (pure; `now` for how long it has run).
pub fn pod_state(pod: &Pod, now: Timestamp) -> PodState {
    let status = pod.status.clone().unwrap_or_default();
    let container = status.container_statuses.as_ref().and_then(|all| all.first());
    let state = container.and_then(|c| c.state.as_ref());
    if let Some(terminated) = state.and_then(|s| s.terminated.as_ref()) {
        let message = terminated.message.clone().unwrap_or_default();
        if terminated.exit_code == 0 {
            let result = message
                .lines()
                .rev()
                .find(|line| line.trim_start().starts_with('{'))
                .map(serde_json::from_str::<BuildOutcome>);
            return match result {
                Some(Ok(outcome)) => PodState::Succeeded(outcome),
                Some(Err(error)) => PodState::Failed(format!("an unreadable result ({error}): {message}")),
                None => PodState::Failed(format!("no result (termination message {message:?})")),
            };
        }
        let why = if message.trim().is_empty() {
            format!(
                "exit code {}, reason {}",
                terminated.exit_code,
                terminated.reason.clone().unwrap_or_else(|| "unknown".into())
            )
        } else {
            message.trim().trim_start_matches("walt-operator: ").to_owned()
        };
        return PodState::Failed(why);
    }
    if let Some(waiting) = state.and_then(|s| s.waiting.as_ref()) {
        let reason = waiting.reason.clone().unwrap_or_default();
        if matches!(
            reason.as_str(),
            "ErrImagePull"
                | "ImagePullBackOff"
                | "InvalidImageName"
                | "CreateContainerConfigError"
                | "CreateContainerError"
        ) {
            return PodState::CannotStart(format!(
                "{reason}: {}",
                waiting.message.clone().unwrap_or_default()
            ));
        }
    }
    if let Some(running) = state.and_then(|s| s.running.as_ref()) {
        let since = running.started_at.as_ref().map_or(now, |t| t.0);
        return PodState::Running(now.duration_since(since).unsigned_abs());
    }
    match status.phase.as_deref() {
        Some("Failed") => PodState::CannotStart(
            status
                .message
                .unwrap_or_else(|| status.reason.unwrap_or_default()),
        ),
        _ => PodState::Starting,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use walt_crds::{BuildArg, ImageBuildSpec};

    pub(crate) fn sample_build() -> ImageBuild {
        let mut build = ImageBuild::new(
            "app-v2",
            ImageBuildSpec {
                image: "app:v2".into(),
                dockerfile: Some("docker/Dockerfile".into()),
                build_args: vec![BuildArg {
                    name: "MIRROR".into(),
                    value: "http://deb example".into(),
                }],
                target: Some("runtime".into()),
                platform: Some("linux/arm64".into()),
                ..ImageBuildSpec::default()
            },
        );
        build.metadata.namespace = Some("alice".into());
        build.metadata.uid = Some("0a1b2c3d-4e5f-6789-abcd-ef0123456789".into());
        build.metadata.creation_timestamp = Some(Time(Timestamp::from_second(1_000).expect("time")));
        build
    }

    fn inputs(cache: &LayerCache) -> BuildPodInputs<'_> {
        BuildPodInputs {
            runtime_image: "reg.lab/walt/operator:1",
            push_to: "reg.lab/lab/alice/app:build-0a1b2c3d4e5f",
            insecure_registry: Some("reg.lab"),
            user_namespaces: true,
            cache,
            registry_credentials: true,
            architecture: Some("arm64"),
        }
    }

    #[test]
    fn the_build_pod_is_a_runtime_pod_reading_the_context_on_stdin() {
        let cache = LayerCache::EmptyDir;
        let build = sample_build();
        assert_eq!(scratch_tag(&build), "build-0a1b2c3d4e5f");
        let pod = build_pod(&build, &inputs(&cache));
        assert_eq!(pod.name_any(), "walt-build-app-v2");
        crate::controller::shared::runtime::assert_placed_for(
            &pod.metadata,
            "walt-run-alice",
            "ImageBuild",
            &build,
        );
        assert_eq!(pod.labels()[BUILD_LABEL], "app-v2");
        let spec = pod.spec.expect("spec");
        assert_eq!(spec.host_users, Some(false), "isolated like shell pods");
        assert_eq!(spec.automount_service_account_token, Some(false));
        let container = &spec.containers[0];
        assert_eq!(
            (container.stdin, container.stdin_once, container.tty),
            (Some(true), Some(true), Some(false))
        );
        assert_eq!(
            container.args.clone().expect("args").join(" "),
            "build --context-tar - --to reg.lab/lab/alice/app:build-0a1b2c3d4e5f --cache-dir /var/cache/walt \
             --file docker/Dockerfile --build-arg MIRROR=http://deb example --target runtime \
             --platform linux/arm64 --insecure-registry reg.lab"
        );
        let env = container.env.clone().expect("env");
        assert_eq!(env[0].name, "DOCKER_CONFIG", "the tenant's registry credentials");
        assert_eq!(
            spec.affinity,
            prefer_architecture(Some("arm64")),
            "a build for arm64 prefers arm64 cluster nodes (RUN steps native there)"
        );
        let unknown = build_pod(
            &build,
            &BuildPodInputs {
                architecture: None,
                ..inputs(&cache)
            },
        );
        assert_eq!(
            unknown.spec.expect("spec").affinity,
            None,
            "no CPU known: no preference"
        );
    }

    fn image_at(reference: &str, architecture: &str) -> Image {
        let mut image = Image::new("base", walt_crds::ImageSpec::default());
        image.status = Some(walt_crds::ImageStatus {
            reference: Some(reference.into()),
            platform: Some(walt_crds::Platform {
                os: "linux".into(),
                architecture: architecture.into(),
                variant: None,
            }),
            ..walt_crds::ImageStatus::default()
        });
        image
    }

    #[test]
    fn a_builds_cpu_is_its_platform_else_that_of_the_image_it_is_from() {
        let images = [
            image_at("reg.lab/lab/alice/base:latest", "amd64"),
            image_at("reg.lab/lab/alice/base-arm:latest", "arm64"),
            image_at("docker.io/library/debian:latest", "riscv64"),
        ];
        let from = |base: Option<&str>, platform: Option<&str>| ImageBuildSpec {
            image: "app".into(),
            base_image: base.map(str::to_owned),
            platform: platform.map(str::to_owned),
            ..ImageBuildSpec::default()
        };
        let cases = [
            (
                from(Some("reg.lab/lab/alice/base-arm:latest"), None),
                Some("arm64"),
            ),
            // The tag left out is `latest`; Docker Hub's short names are the registry's long ones.
            (from(Some("reg.lab/lab/alice/base-arm"), None), Some("arm64")),
            (from(Some("debian"), None), Some("riscv64")),
            (from(Some("reg.lab/lab/alice/base:latest"), None), Some("amd64")),
            // A platform asked for wins: multi-platform bases resolve to it.
            (
                from(Some("reg.lab/lab/alice/base:latest"), Some("linux/arm64")),
                Some("arm64"),
            ),
            (from(None, Some("linux/arm/v7")), Some("arm")),
            // A base that is no Image here, another tag, none read, not a reference: unknown.
            (from(Some("reg.lab/lab/alice/other:latest"), None), None),
            (from(Some("reg.lab/lab/alice/base-arm:v2"), None), None),
            (from(None, None), None),
            (from(Some("Not A Reference"), None), None),
        ];
        for (spec, want) in cases {
            assert_eq!(build_architecture(&spec, &images), want, "{spec:?}");
        }
    }

    #[test]
    fn a_build_is_emulated_when_its_cluster_node_is_of_another_cpu() {
        use crate::controller::shared::pods::cluster_node_of;
        let outcome = |emulated| BuildOutcome {
            architecture: "arm64".into(),
            emulated,
            ..BuildOutcome::default()
        };
        let (arm, amd) = (cluster_node_of("pi-1", "arm64"), cluster_node_of("pc-1", "amd64"));
        assert!(build_emulated(&outcome(true), Some(&amd)));
        assert!(
            !build_emulated(&outcome(true), Some(&arm)),
            "on a node of the image's CPU, native (what the pod was placed for)"
        );
        assert!(
            !build_emulated(&outcome(false), Some(&amd)),
            "no RUN step ran through qemu-user (a build of COPY steps only)"
        );
        assert!(
            build_emulated(&outcome(true), None),
            "node unknown: the runtime's word"
        );
    }

    fn pod_with(status: serde_json::Value) -> Pod {
        let cache = LayerCache::EmptyDir;
        let mut pod = build_pod(&sample_build(), &inputs(&cache));
        pod.status = Some(serde_json::from_value(status).expect("pod status"));
        pod
    }

    fn terminated(message: &str, exit_code: i32) -> Pod {
        pod_with(serde_json::json!({
            "phase": if exit_code == 0 { "Succeeded" } else { "Failed" },
            "containerStatuses": [{"name": "build", "ready": false, "restartCount": 0, "image": "x", "imageID": "y",
                "state": {"terminated": {"exitCode": exit_code, "reason": "Completed", "message": message}}}]
        }))
    }

    #[test]
    fn the_pod_status_says_how_the_build_went() {
        let now = Timestamp::from_second(2_000).expect("time");
        assert_eq!(
            pod_state(&pod_with(serde_json::json!({"phase": "Pending"})), now),
            PodState::Starting
        );
        let running = pod_with(
            serde_json::json!({"phase": "Running", "containerStatuses": [{"name": "build",
            "ready": true, "restartCount": 0, "image": "x", "imageID": "y",
            "state": {"running": {"startedAt": "1970-01-01T00:31:40Z"}}}]}),
        );
        assert_eq!(
            pod_state(&running, now),
            PodState::Running(Duration::from_secs(100))
        );
        let result = r#"{"digest":"sha256:d1","reference":"reg.lab/lab/alice/app:build-x","architecture":"arm64","emulated":true,"steps":4,"cached":1,"layersPushed":2,"pushed":true,"seconds":3.5}"#;
        let PodState::Succeeded(outcome) = pod_state(&terminated(result, 0), now) else {
            panic!("not succeeded")
        };
        assert_eq!(
            (outcome.digest.as_str(), outcome.layers_pushed, outcome.emulated),
            ("sha256:d1", 2, true)
        );
        assert_eq!(
            pod_state(
                &terminated("walt-operator: step 3/4 (Dockerfile line 4) RUN x: status 3", 1),
                now
            ),
            PodState::Failed("step 3/4 (Dockerfile line 4) RUN x: status 3".into())
        );
        let pulling = pod_with(
            serde_json::json!({"phase": "Pending", "containerStatuses": [{"name": "build",
            "ready": false, "restartCount": 0, "image": "x", "imageID": "",
            "state": {"waiting": {"reason": "ImagePullBackOff", "message": "not found"}}}]}),
        );
        assert!(
            matches!(pod_state(&pulling, now), PodState::CannotStart(why) if why.contains("ImagePullBackOff"))
        );
    }
}
