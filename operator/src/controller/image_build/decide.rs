//! The pure decision of an ImageBuild reconcile: from the build and what the reconcile observed (its
//! pod's state, the end of its log), [`decide`] says the next step; [`apply_progress`] writes what the
//! log says into the status.

use std::time::Duration;

use walt_crds::image_build::LogProgress;
use walt_crds::{ImageBuild, ImageBuildPhase, ImageBuildStatus};

use super::build::{BuildOutcome, PodState};
use super::failure::Failure;

/// How long a running build pod may wait for its context before the build fails.
pub const CONTEXT_TIMEOUT: Duration = Duration::from_mins(5);
/// How often a running build's progress is read from its log.
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(2);

/// What one reconcile observed.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// The build pod's state (`None`: there is no pod of this build).
    pub pod: Option<PodState>,
    /// A pod of the build pod's name exists that is not this build's (its owner labels name another
    /// uid: left by a former build of the same name): never read nor attached to, it goes first.
    pub stale_pod: bool,
    /// The end of the build pod's log, when it was read (running or ended pods).
    pub log: Option<LogProgress>,
    /// Who else holds the target image (`Kind/name`), when looked up (a build about to start):
    /// one writer at a time per image ([`crate::controller::shared::lock`]).
    pub holder: Option<String>,
}

/// What the reconcile does next.
#[derive(Debug)]
pub enum Step {
    /// The build is over: make sure its pod is gone.
    Cleanup,
    /// A pod of the build pod's name that is not this build's is in the way: delete it, look again.
    RemoveStalePod,
    /// Check the target, then create the build pod.
    Start,
    /// Another writer holds the target image (`Kind/name`): the build starts after it.
    WaitForImage(String),
    /// The pod starts: look again after this long.
    Wait(Duration),
    /// The build runs: report its progress (step, log tail), look again soon.
    Progress,
    /// The build pushed its image: tag it as `spec.image` and update the Image.
    Save(BuildOutcome),
    /// The build failed (or a retryable failure happened).
    Fail(Failure),
}

/// Decides the next step of `build` (pure).
pub fn decide(build: &ImageBuild, observed: &Observed) -> Step {
    let phase = build
        .status
        .as_ref()
        .map(|status| status.phase)
        .unwrap_or_default();
    if phase.is_finished() {
        return Step::Cleanup;
    }
    if observed.stale_pod {
        return Step::RemoveStalePod;
    }
    let Some(pod) = &observed.pod else {
        return if phase != ImageBuildPhase::Pending {
            Step::Fail(Failure::PodLost)
        } else if let Some(holder) = &observed.holder {
            Step::WaitForImage(holder.clone())
        } else {
            Step::Start
        };
    };
    match pod {
        PodState::Starting => Step::Wait(PROGRESS_INTERVAL),
        PodState::Running(running_for) => {
            let received = observed.log.as_ref().is_some_and(|log| log.context_received);
            if !received && *running_for >= CONTEXT_TIMEOUT {
                Step::Fail(Failure::ContextNotUploaded(CONTEXT_TIMEOUT))
            } else {
                Step::Progress
            }
        }
        PodState::Succeeded(outcome) => Step::Save(outcome.clone()),
        PodState::Failed(message) => Step::Fail(Failure::BuildFailed {
            message: message.clone(),
            output: observed
                .log
                .as_ref()
                .map(|log| {
                    log.tail
                        .iter()
                        .filter(|line| !line.starts_with("walt-operator: "))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default(),
        }),
        PodState::CannotStart(why) => Step::Fail(Failure::PodFailed(why.clone())),
    }
}

/// Writes what the log says into the status (pure): the step running (kept when the log's end no
/// longer shows it), steps done and in all, the log tail.
pub fn apply_progress(status: &mut ImageBuildStatus, log: &LogProgress) {
    if let Some(step) = &log.step {
        status.step = Some(step.display());
        status.steps_done = log.steps_done();
        status.steps_total = Some(step.total);
    }
    if !log.tail.is_empty() {
        status.log_tail.clone_from(&log.tail);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use walt_crds::ImageBuildSpec;

    fn build(phase: ImageBuildPhase) -> ImageBuild {
        let mut build = ImageBuild::new(
            "app",
            ImageBuildSpec {
                image: "app".into(),
                ..ImageBuildSpec::default()
            },
        );
        build.status = Some(ImageBuildStatus {
            phase,
            ..ImageBuildStatus::default()
        });
        build
    }

    fn observed(pod: Option<PodState>, log: &str) -> Observed {
        Observed {
            pod,
            log: Some(LogProgress::of(log)),
            ..Observed::default()
        }
    }

    #[test]
    fn a_pod_left_by_a_former_build_of_the_same_name_goes_first() {
        let stale = Observed {
            stale_pod: true,
            ..Observed::default()
        };
        assert!(matches!(
            decide(&build(ImageBuildPhase::Pending), &stale),
            Step::RemoveStalePod
        ));
        assert!(matches!(
            decide(&build(ImageBuildPhase::Building), &stale),
            Step::RemoveStalePod
        ));
        assert!(matches!(
            decide(&build(ImageBuildPhase::Failed), &stale),
            Step::Cleanup
        ));
    }

    #[test]
    fn a_new_build_waits_while_another_writer_holds_its_image() {
        let busy = Observed {
            holder: Some("NodeSave/s1".into()),
            ..Observed::default()
        };
        assert!(matches!(
            decide(&build(ImageBuildPhase::Pending), &busy),
            Step::WaitForImage(holder) if holder == "NodeSave/s1"
        ));
        assert!(matches!(
            decide(&build(ImageBuildPhase::Building), &busy),
            Step::Fail(Failure::PodLost)
        ));
    }

    #[test]
    fn a_new_build_starts_its_pod_and_a_lost_pod_fails_it() {
        assert!(matches!(
            decide(&build(ImageBuildPhase::Pending), &Observed::default()),
            Step::Start
        ));
        assert!(matches!(
            decide(&build(ImageBuildPhase::Building), &Observed::default()),
            Step::Fail(Failure::PodLost)
        ));
        assert!(matches!(
            decide(
                &build(ImageBuildPhase::Succeeded),
                &observed(Some(PodState::Starting), "")
            ),
            Step::Cleanup
        ));
    }

    #[test]
    fn a_running_build_reports_progress_until_its_context_is_overdue() {
        let building = build(ImageBuildPhase::Building);
        assert!(matches!(
            decide(&building, &observed(Some(PodState::Starting), "")),
            Step::Wait(PROGRESS_INTERVAL)
        ));
        let waiting = observed(Some(PodState::Running(Duration::from_secs(30))), "");
        assert!(matches!(decide(&building, &waiting), Step::Progress));
        let overdue = observed(Some(PodState::Running(CONTEXT_TIMEOUT)), "");
        assert!(matches!(
            decide(&building, &overdue),
            Step::Fail(Failure::ContextNotUploaded(_))
        ));
        let received = observed(
            Some(PodState::Running(CONTEXT_TIMEOUT * 2)),
            "Build context received: 2 files, 10 bytes\nSTEP 1/2: FROM base\n",
        );
        assert!(matches!(decide(&building, &received), Step::Progress));
    }

    #[test]
    fn an_ended_pod_is_saved_or_fails_with_its_output() {
        let building = build(ImageBuildPhase::Building);
        let outcome = BuildOutcome {
            digest: "sha256:d1".into(),
            ..BuildOutcome::default()
        };
        assert!(matches!(
            decide(&building, &observed(Some(PodState::Succeeded(outcome)), "")),
            Step::Save(o) if o.digest == "sha256:d1"
        ));
        let failed = observed(
            Some(PodState::Failed(
                "step 2/2 (Dockerfile line 2) RUN exit 3: status 3".into(),
            )),
            "STEP 2/2: RUN exit 3\nboom-output\nwalt-operator: step 2/2 (Dockerfile line 2) RUN exit 3: status 3\n",
        );
        let Step::Fail(failure) = decide(&building, &failed) else {
            panic!("not failed")
        };
        assert_eq!(failure.retry(), None);
        let text = failure.to_string();
        assert!(text.starts_with("step 2/2 (Dockerfile line 2)"), "{text}");
        assert!(
            text.ends_with("STEP 2/2: RUN exit 3\nboom-output"),
            "the output, without the error twice: {text}"
        );
        assert!(matches!(
            decide(
                &building,
                &observed(Some(PodState::CannotStart("ErrImagePull: x".into())), "")
            ),
            Step::Fail(Failure::PodFailed(_))
        ));
    }

    #[test]
    fn progress_keeps_the_last_step_seen() {
        let mut status = ImageBuildStatus::default();
        apply_progress(
            &mut status,
            &LogProgress::of("STEP 3/9: RUN apt-get install -y curl\nUnpacking curl\n"),
        );
        assert_eq!(status.step.as_deref(), Some("3/9 RUN apt-get install -y curl"));
        assert_eq!((status.steps_done, status.steps_total), (Some(2), Some(9)));
        apply_progress(&mut status, &LogProgress::of("Setting up curl\n"));
        assert_eq!(
            status.step.as_deref(),
            Some("3/9 RUN apt-get install -y curl"),
            "kept"
        );
        assert_eq!(status.log_tail, ["Setting up curl"]);
    }
}
