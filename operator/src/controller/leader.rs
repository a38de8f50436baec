//! Leader election on a `coordination.k8s.io/v1` Lease, so two replicas of the
//! operator are safe: only the holder runs controllers (every replica serves
//! the SSH gateway, from the ShellSessions the leader marks Running).
//!
//! Expiry is judged like client-go does, on this process's own clock: a
//! candidate takes the Lease over only after it has seen the holder's record
//! stay unchanged for a whole `leaseDurationSeconds`. Clocks of different
//! machines are never compared. Updates carry the `resourceVersion` they were
//! computed from, so two candidates racing for the Lease cannot both win (the
//! API server refuses the second with 409 Conflict).

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

use super::shared::error::{Error, Result};

/// Timing of the election.
#[derive(Clone, Debug)]
pub struct LeaseTiming {
    /// How long a holder's Lease stays valid without renewal.
    pub lease_duration: Duration,
    /// How often the holder renews (and candidates retry).
    pub retry_period: Duration,
}

impl Default for LeaseTiming {
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(15),
            retry_period: Duration::from_secs(3),
        }
    }
}

/// What a candidate should do with the Lease it just read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// No Lease exists: create it, holding it.
    Create,
    /// Another holder's Lease expired (or was released): take it over.
    Acquire,
    /// We hold it: renew it.
    Renew,
    /// Someone else holds a valid Lease: wait.
    Wait,
}

/// Decides what to do (pure). `expired` tells whether the current record has
/// been seen unchanged for a whole lease duration on our clock.
pub fn decide(lease: Option<&Lease>, identity: &str, expired: bool) -> Decision {
    let Some(lease) = lease else {
        return Decision::Create;
    };
    let holder = lease
        .spec
        .as_ref()
        .and_then(|spec| spec.holder_identity.as_deref())
        .unwrap_or("");
    if holder == identity {
        Decision::Renew
    } else if holder.is_empty() || expired {
        Decision::Acquire
    } else {
        Decision::Wait
    }
}

/// Builds the spec we write when we create, acquire or renew (pure).
pub fn next_spec(
    current: Option<&LeaseSpec>,
    identity: &str,
    timing: &LeaseTiming,
    now: Timestamp,
) -> LeaseSpec {
    let held_by_us = current.and_then(|spec| spec.holder_identity.as_deref()) == Some(identity);
    let transitions = current.and_then(|spec| spec.lease_transitions).unwrap_or(0);
    LeaseSpec {
        holder_identity: Some(identity.to_owned()),
        lease_duration_seconds: Some(timing.lease_duration.as_secs().max(1) as i32),
        acquire_time: if held_by_us {
            current.and_then(|spec| spec.acquire_time.clone())
        } else {
            Some(MicroTime(now))
        },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(if held_by_us || current.is_none() {
            transitions
        } else {
            transitions + 1
        }),
        ..LeaseSpec::default()
    }
}

/// One candidate for leadership.
pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    timing: LeaseTiming,
    observed: Option<(String, Instant)>,
}

impl std::fmt::Debug for LeaderElector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaderElector")
            .field("name", &self.name)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

/// The part of a Lease that changes on every renewal: seeing it unchanged
/// for a lease duration means the holder is gone.
fn record_of(lease: &Lease) -> String {
    let spec = lease.spec.clone().unwrap_or_default();
    format!(
        "{}|{:?}|{}",
        spec.holder_identity.unwrap_or_default(),
        spec.renew_time.map(|time| time.0),
        lease.metadata.resource_version.clone().unwrap_or_default()
    )
}

impl LeaderElector {
    /// A candidate `identity` for the Lease `namespace/name`.
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str, timing: LeaseTiming) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            identity: identity.to_owned(),
            timing,
            observed: None,
        }
    }

    /// This candidate's identity.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// One round: read the Lease, create/acquire/renew it if we may.
    /// Returns whether we hold it afterwards.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool> {
        let current = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|source| Error::kube(format!("reading Lease {}", self.name), source))?;
        let expired = match &current {
            None => true,
            Some(lease) => {
                let record = record_of(lease);
                match &self.observed {
                    Some((seen, since)) if *seen == record => since.elapsed() >= self.timing.lease_duration,
                    _ => {
                        self.observed = Some((record, Instant::now()));
                        false
                    }
                }
            }
        };
        let decision = decide(current.as_ref(), &self.identity, expired);
        let spec = next_spec(
            current.as_ref().and_then(|lease| lease.spec.as_ref()),
            &self.identity,
            &self.timing,
            Timestamp::now(),
        );
        let written = match decision {
            Decision::Wait => return Ok(false),
            Decision::Create => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(spec),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            Decision::Acquire | Decision::Renew => {
                let mut lease = current.unwrap_or_default();
                lease.spec = Some(spec);
                self.api.replace(&self.name, &PostParams::default(), &lease).await
            }
        };
        match written {
            Ok(lease) => {
                self.observed = Some((record_of(&lease), Instant::now()));
                if decision != Decision::Renew {
                    tracing::info!(lease = %self.name, identity = %self.identity, "became the leader");
                }
                Ok(true)
            }
            // Someone else wrote it between our read and our write.
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(source) => Err(Error::kube(format!("writing Lease {}", self.name), source)),
        }
    }

    /// Waits until this candidate leads (or `cancel` fires: returns false).
    pub async fn acquire(&mut self, cancel: &CancellationToken) -> bool {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => return true,
                Ok(false) => {}
                Err(error) => tracing::warn!(%error, "leader election round failed; retrying"),
            }
            tokio::select! {
                () = cancel.cancelled() => return false,
                () = tokio::time::sleep(self.timing.retry_period) => {}
            }
        }
    }

    /// Renews the Lease until `cancel` fires (returns Ok) or leadership is
    /// lost: another holder took it, or renewing kept failing until the Lease
    /// could have expired for the others (returns the error).
    pub async fn keep(&mut self, cancel: &CancellationToken) -> Result<()> {
        let mut last_renewal = Instant::now();
        // Give up a little before others may take over.
        let deadline = self
            .timing
            .lease_duration
            .saturating_sub(self.timing.retry_period);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                () = tokio::time::sleep(self.timing.retry_period) => {}
            }
            match self.try_acquire_or_renew().await {
                Ok(true) => last_renewal = Instant::now(),
                Ok(false) => {
                    return Err(Error::Leadership(format!(
                        "Lease {} was taken by another replica",
                        self.name
                    )));
                }
                Err(error) => {
                    tracing::warn!(%error, "renewing the leader Lease failed");
                    if last_renewal.elapsed() >= deadline {
                        return Err(Error::Leadership(format!(
                            "could not renew Lease {} for {:?}: {error}",
                            self.name,
                            last_renewal.elapsed()
                        )));
                    }
                }
            }
        }
    }

    /// Gives the Lease up (on graceful shutdown) so another replica takes
    /// over at once instead of waiting for expiry.
    pub async fn release(&mut self) -> Result<()> {
        let Some(mut lease) = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|source| Error::kube(format!("reading Lease {}", self.name), source))?
        else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) | Err(kube::Error::Api(_)) => Ok(()),
            Err(source) => Err(Error::kube(format!("releasing Lease {}", self.name), source)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: Option<&str>) -> Lease {
        Lease {
            metadata: ObjectMeta::default(),
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_owned),
                lease_transitions: Some(2),
                acquire_time: Some(MicroTime(Timestamp::UNIX_EPOCH)),
                ..LeaseSpec::default()
            }),
        }
    }

    #[test]
    fn decisions() {
        assert_eq!(decide(None, "me", false), Decision::Create);
        assert_eq!(decide(Some(&lease(Some("me"))), "me", false), Decision::Renew);
        assert_eq!(decide(Some(&lease(Some("other"))), "me", false), Decision::Wait);
        assert_eq!(decide(Some(&lease(Some("other"))), "me", true), Decision::Acquire);
        assert_eq!(decide(Some(&lease(None)), "me", false), Decision::Acquire);
    }

    #[test]
    fn takeover_counts_a_transition_and_renewal_keeps_acquire_time() {
        let timing = LeaseTiming::default();
        let now = Timestamp::now();
        let other = lease(Some("other"));
        let taken = next_spec(other.spec.as_ref(), "me", &timing, now);
        assert_eq!(taken.holder_identity.as_deref(), Some("me"));
        assert_eq!(taken.lease_transitions, Some(3));
        assert_eq!(taken.acquire_time, Some(MicroTime(now)));
        assert_eq!(taken.lease_duration_seconds, Some(15));
        let mine = lease(Some("me"));
        let renewed = next_spec(mine.spec.as_ref(), "me", &timing, now);
        assert_eq!(renewed.lease_transitions, Some(2));
        assert_eq!(renewed.acquire_time, Some(MicroTime(Timestamp::UNIX_EPOCH)));
        assert_eq!(renewed.renew_time, Some(MicroTime(now)));
    }
}
