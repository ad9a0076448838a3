//! Leader election on a `coordination.k8s.io/v1` Lease: only the holder runs the
//! controllers. A replica takes the Lease when it is free or its holder stopped
//! renewing it, renews it well within its duration, and stops (the process exits and
//! is restarted) the moment it cannot: two operators never act at once.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};

/// What to do about the Lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseDecision {
    /// Take it (free, expired, or ours).
    Take,
    /// Someone else holds it; look again after this long.
    Wait { holder: String, after: Duration },
}

/// Another replica's Lease as this one last saw it, and when, on this replica's own
/// monotonic clock: another replica's clock is never compared with ours (client-go
/// does the same).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    holder: String,
    renewed: Option<i64>,
    at: std::time::Instant,
}

/// Decides from the Lease as read at `now`, given what was seen of it before. A
/// holder's Lease expires its duration after this replica last saw it change.
pub fn decide(
    lease: Option<&Lease>,
    me: &str,
    seen: Option<&Seen>,
    now: std::time::Instant,
) -> (LeaseDecision, Option<Seen>) {
    let Some(spec) = lease.and_then(|l| l.spec.as_ref()) else {
        return (LeaseDecision::Take, None);
    };
    let holder = spec.holder_identity.clone().unwrap_or_default();
    if holder.is_empty() || holder == me {
        return (LeaseDecision::Take, None);
    }
    let renewed = spec.renew_time.as_ref().map(|t| t.0.as_millisecond());
    let at = match seen {
        Some(s) if s.holder == holder && s.renewed == renewed => s.at,
        _ => now,
    };
    let duration = Duration::from_secs(u64::try_from(spec.lease_duration_seconds.unwrap_or(15)).unwrap_or(15));
    let expires = at + duration;
    let decision = if now >= expires {
        LeaseDecision::Take
    } else {
        LeaseDecision::Wait {
            holder: holder.clone(),
            after: expires - now,
        }
    };
    (decision, Some(Seen { holder, renewed, at }))
}

/// One replica's side of the election.
#[derive(Clone)]
pub struct Election {
    /// Leases of the operator's namespace.
    pub leases: Api<Lease>,
    /// The Lease's name.
    pub name: String,
    /// This replica (its pod name, or host and PID).
    pub identity: String,
    /// How long a Lease lasts without renewal.
    pub duration: Duration,
}

impl std::fmt::Debug for Election {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Election")
            .field("name", &self.name)
            .field("identity", &self.identity)
            .finish()
    }
}

impl Election {
    /// Writes the Lease as ours, if it still is what we read (resourceVersion).
    async fn take(&self, current: Option<Lease>) -> Result<bool, kube::Error> {
        let now = MicroTime(Timestamp::now());
        let transitions = current
            .as_ref()
            .and_then(|l| l.spec.as_ref())
            .filter(|s| s.holder_identity.as_deref() != Some(self.identity.as_str()))
            .map_or(0, |_| 1);
        let spec = LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration.as_secs() as i32),
            acquire_time: current
                .as_ref()
                .and_then(|l| l.spec.as_ref())
                .filter(|s| s.holder_identity.as_deref() == Some(self.identity.as_str()))
                .and_then(|s| s.acquire_time.clone())
                .or_else(|| Some(now.clone())),
            renew_time: Some(now),
            lease_transitions: Some(
                current
                    .as_ref()
                    .and_then(|l| l.spec.as_ref())
                    .and_then(|s| s.lease_transitions)
                    .unwrap_or(0)
                    + transitions,
            ),
            ..LeaseSpec::default()
        };
        let result = match current {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(spec),
                };
                self.leases.create(&PostParams::default(), &lease).await
            }
            Some(mut lease) => {
                lease.spec = Some(spec);
                self.leases.replace(&self.name, &PostParams::default(), &lease).await
            }
        };
        match result {
            Ok(_) => Ok(true),
            // Someone else wrote it first.
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Waits until this replica holds the Lease; returns when the write that took it
    /// was sent (the Lease counts from then, not from the answer).
    pub async fn acquire(&self) -> Result<std::time::Instant, kube::Error> {
        let mut seen = None;
        loop {
            let current = self.leases.get_opt(&self.name).await?;
            let (decision, now_seen) = decide(
                current.as_ref(),
                &self.identity,
                seen.as_ref(),
                std::time::Instant::now(),
            );
            seen = now_seen;
            match decision {
                LeaseDecision::Take => {
                    let sent = std::time::Instant::now();
                    if self.take(current).await? {
                        tracing::info!(lease = %self.name, identity = %self.identity, "leading");
                        return Ok(sent);
                    }
                }
                LeaseDecision::Wait { holder, after } => {
                    tracing::info!(lease = %self.name, %holder, "another replica leads; waiting");
                    tokio::time::sleep(after.min(self.duration / 3)).await;
                }
            }
        }
    }

    /// Renews the Lease every third of its duration, from `renewed` (when the write
    /// that took it was sent); returns when it is lost, or when it could not be renewed
    /// within two thirds of its duration (the renew deadline, before any other replica
    /// may take it), saying why. Each attempt is bounded by what is left of the deadline:
    /// a request that stalls must not keep a leader past it.
    pub async fn hold(&self, mut renewed: std::time::Instant) -> String {
        let deadline = self.duration * 2 / 3;
        let mut wait = self.duration / 3;
        loop {
            tokio::time::sleep(wait).await;
            let sent = std::time::Instant::now();
            let left = deadline.saturating_sub(renewed.elapsed());
            let failure = match tokio::time::timeout(left, self.renew_once()).await {
                Ok(Ok(())) => {
                    renewed = sent;
                    wait = self.duration / 3;
                    continue;
                }
                Ok(Err(Renewal::Lost(why))) => return why,
                Ok(Err(Renewal::Failed(why))) => why,
                Err(_) => "the renewal did not answer in time".to_owned(),
            };
            if renewed.elapsed() >= deadline {
                return format!("{failure}; not renewed for {} s", deadline.as_secs());
            }
            tracing::warn!(lease = %self.name, %failure, "retrying until the renew deadline");
            wait = Duration::from_secs(1).min(deadline.saturating_sub(renewed.elapsed()));
        }
    }

    /// One renewal: the Lease read and written back as ours.
    async fn renew_once(&self) -> Result<(), Renewal> {
        let current = self
            .leases
            .get_opt(&self.name)
            .await
            .map_err(|e| Renewal::Failed(format!("cannot read the Lease: {e}")))?;
        let held = current
            .as_ref()
            .and_then(|l| l.spec.as_ref())
            .and_then(|s| s.holder_identity.clone());
        if held.as_deref() != Some(self.identity.as_str()) {
            return Err(Renewal::Lost(format!(
                "the Lease is held by {}",
                held.unwrap_or_default()
            )));
        }
        match self.take(current).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(Renewal::Lost("the Lease was taken over".to_owned())),
            Err(e) => Err(Renewal::Failed(format!("cannot renew the Lease: {e}"))),
        }
    }
}

/// Why a renewal did not happen.
enum Renewal {
    /// Someone else holds the Lease: stop now.
    Lost(String),
    /// It may work on a retry, within the renew deadline.
    Failed(String),
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn lease(holder: &str, renewed_ms: i64) -> Lease {
        Lease {
            metadata: ObjectMeta::default(),
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                lease_duration_seconds: Some(15),
                renew_time: Some(MicroTime(Timestamp::from_millisecond(renewed_ms).unwrap())),
                ..LeaseSpec::default()
            }),
        }
    }

    #[test]
    fn a_lease_is_taken_when_free_ours_or_expired_on_our_own_clock() {
        let t0 = std::time::Instant::now();
        let secs = Duration::from_secs;
        assert_eq!(decide(None, "me", None, t0).0, LeaseDecision::Take);
        assert_eq!(decide(Some(&lease("me", 0)), "me", None, t0).0, LeaseDecision::Take);
        // Its renew time is far in the past by our wall clock: no matter, it was just seen.
        let (decision, seen) = decide(Some(&lease("other", 10_000)), "me", None, t0);
        assert_eq!(
            decision,
            LeaseDecision::Wait {
                holder: "other".into(),
                after: secs(15)
            }
        );
        // Unchanged 10 s later: 5 s left; unchanged 15 s later: ours.
        let wait = |after| LeaseDecision::Wait {
            holder: "other".into(),
            after,
        };
        assert_eq!(
            decide(Some(&lease("other", 10_000)), "me", seen.as_ref(), t0 + secs(10)).0,
            wait(secs(5))
        );
        assert_eq!(
            decide(Some(&lease("other", 10_000)), "me", seen.as_ref(), t0 + secs(15)).0,
            LeaseDecision::Take
        );
        // Renewed meanwhile (whatever its clock says): a full duration again from when we saw it.
        assert_eq!(
            decide(Some(&lease("other", 9_000)), "me", seen.as_ref(), t0 + secs(15)).0,
            wait(secs(15))
        );
    }
}
