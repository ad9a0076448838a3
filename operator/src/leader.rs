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

/// Decides from the Lease as read, at `now_ms` (milliseconds since the epoch).
pub fn decide(lease: Option<&Lease>, me: &str, now_ms: i64) -> LeaseDecision {
    let Some(spec) = lease.and_then(|l| l.spec.as_ref()) else {
        return LeaseDecision::Take;
    };
    let holder = spec.holder_identity.clone().unwrap_or_default();
    if holder.is_empty() || holder == me {
        return LeaseDecision::Take;
    }
    let duration_ms = i64::from(spec.lease_duration_seconds.unwrap_or(15)) * 1000;
    let renewed_ms = spec.renew_time.as_ref().map_or(0, |t| t.0.as_millisecond());
    let expires = renewed_ms + duration_ms;
    if now_ms >= expires {
        LeaseDecision::Take
    } else {
        LeaseDecision::Wait {
            holder,
            after: Duration::from_millis((expires - now_ms) as u64),
        }
    }
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

    /// Waits until this replica holds the Lease.
    pub async fn acquire(&self) -> Result<(), kube::Error> {
        loop {
            let current = self.leases.get_opt(&self.name).await?;
            match decide(current.as_ref(), &self.identity, Timestamp::now().as_millisecond()) {
                LeaseDecision::Take => {
                    if self.take(current).await? {
                        tracing::info!(lease = %self.name, identity = %self.identity, "leading");
                        return Ok(());
                    }
                }
                LeaseDecision::Wait { holder, after } => {
                    tracing::info!(lease = %self.name, %holder, "another replica leads; waiting");
                    tokio::time::sleep(after.min(self.duration / 3)).await;
                }
            }
        }
    }

    /// Renews the Lease every third of its duration; returns when it is lost.
    pub async fn hold(&self) -> String {
        loop {
            tokio::time::sleep(self.duration / 3).await;
            let current = match self.leases.get_opt(&self.name).await {
                Ok(current) => current,
                Err(e) => return format!("cannot read the Lease: {e}"),
            };
            let held = current
                .as_ref()
                .and_then(|l| l.spec.as_ref())
                .and_then(|s| s.holder_identity.clone());
            if held.as_deref() != Some(self.identity.as_str()) {
                return format!("the Lease is held by {}", held.unwrap_or_default());
            }
            match self.take(current).await {
                Ok(true) => {}
                Ok(false) => return "the Lease was taken over".to_owned(),
                Err(e) => return format!("cannot renew the Lease: {e}"),
            }
        }
    }
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
    fn a_lease_is_taken_when_free_ours_or_expired() {
        assert_eq!(decide(None, "me", 0), LeaseDecision::Take);
        assert_eq!(decide(Some(&lease("me", 0)), "me", 1_000), LeaseDecision::Take);
        assert_eq!(
            decide(Some(&lease("other", 10_000)), "me", 20_000),
            LeaseDecision::Wait {
                holder: "other".into(),
                after: Duration::from_secs(5)
            }
        );
        assert_eq!(decide(Some(&lease("other", 10_000)), "me", 25_000), LeaseDecision::Take);
    }
}
