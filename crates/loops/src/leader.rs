//! Leader election on a coordination.k8s.io/v1 Lease, the way client-go's
//! `leaderelection` does it: take the Lease when it is free or its holder has not
//! renewed within the lease duration (measured on this replica's clock, from when it
//! last saw the record change, so clocks need not agree); renew every retry period;
//! give up leadership when renewals have failed for the renew deadline; on shutdown,
//! hand the Lease back so the other replica takes over at once.
//!
//! A waiting replica watches the Lease as well as reading it every retry period: it
//! sees each renewal when it happens, and tries again the moment the last one seen
//! expires (or the Lease is handed back or deleted). So a killed leader is replaced
//! within the lease duration of its last renewal, not that plus two retry periods
//! (one before the last renewal is seen, one after it expires) as with polling alone.
//!
//! In a pod, the leader also names its pod as the Lease's owner: when the pod is
//! deleted without having handed the Lease back (its RBAC deleted before it, as `helm
//! uninstall` does; a node lost), the garbage collector deletes the Lease, and the next
//! replica or install leads at once instead of waiting out a lease duration.
//!
//! Owns only the Lease object; the caller starts and stops the loops.

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease as LeaseObject, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, OwnerReference};
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio::time::Instant;

use crate::context::is_api;

/// Where the Lease is and how it is kept.
#[derive(Debug, Clone)]
pub struct Election {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
    /// The pod this replica runs in, made the Lease's owner while it leads.
    pub owner: Option<PodOwner>,
}

/// A pod in the Lease's namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodOwner {
    pub name: String,
    pub uid: String,
}

impl PodOwner {
    fn reference(&self) -> OwnerReference {
        OwnerReference {
            api_version: "v1".to_owned(),
            kind: "Pod".to_owned(),
            name: self.name.clone(),
            uid: self.uid.clone(),
            ..OwnerReference::default()
        }
    }
}

/// What identifies one state of the Lease: holder and renew time.
type Record = (Option<String>, Option<String>);

/// The last record seen, when it was first seen, and the duration it claims.
struct Observed {
    record: Record,
    at: Instant,
    duration: Duration,
}

/// This replica's view of the Lease.
pub struct Lease {
    api: Api<LeaseObject>,
    election: Election,
    observed: Option<Observed>,
}

/// The Lease's holder; `None` when it is free (no holder, or handed back).
fn holder_of(lease: &LeaseObject) -> Option<&str> {
    lease
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.as_deref())
        .filter(|h| !h.is_empty())
}

fn now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

impl Lease {
    pub fn new(client: kube::Client, election: Election) -> Lease {
        Lease {
            api: Api::namespaced(client, &election.namespace),
            election,
            observed: None,
        }
    }

    fn seconds(duration: Duration) -> i32 {
        i32::try_from(duration.as_secs().max(1)).unwrap_or(i32::MAX)
    }

    fn observe(&mut self, lease: &LeaseObject) {
        let spec = lease.spec.clone().unwrap_or_default();
        let record = (
            spec.holder_identity.clone(),
            spec.renew_time.as_ref().map(|t| t.0.to_string()),
        );
        let duration = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map_or(self.election.lease_duration, Duration::from_secs);
        match &mut self.observed {
            Some(seen) if seen.record == record => seen.duration = duration,
            _ => {
                self.observed = Some(Observed {
                    record,
                    at: Instant::now(),
                    duration,
                })
            }
        }
    }

    fn expired(&self) -> bool {
        self.observed
            .as_ref()
            .is_some_and(|seen| seen.at.elapsed() > seen.duration)
    }

    /// When a waiting replica tries next: when the record it last saw expires, or
    /// after the retry period, whichever is first.
    fn next_attempt(&self) -> Instant {
        let poll = Instant::now() + self.election.retry_period;
        self.observed.as_ref().map_or(poll, |seen| {
            poll.min(seen.at + seen.duration + Duration::from_millis(1))
        })
    }

    /// One attempt to take or renew; `Ok(true)` when we hold the Lease afterwards.
    async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let me = self.election.identity.clone();
        let duration = Self::seconds(self.election.lease_duration);
        let Some(current) = self.api.get_opt(&self.election.name).await? else {
            let lease = LeaseObject {
                metadata: ObjectMeta {
                    name: Some(self.election.name.clone()),
                    namespace: Some(self.election.namespace.clone()),
                    owner_references: self.election.owner.as_ref().map(|o| vec![o.reference()]),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me),
                    lease_duration_seconds: Some(duration),
                    acquire_time: Some(now()),
                    renew_time: Some(now()),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(created) => {
                    self.observe(&created);
                    Ok(true)
                }
                Err(e) if is_api(&e, 409) => Ok(false),
                Err(e) => Err(e),
            };
        };
        self.observe(&current);
        let holder = holder_of(&current);
        let mine = holder == Some(me.as_str());
        if holder.is_some() && !mine && !self.expired() {
            return Ok(false);
        }
        let mut next = current.clone();
        let mut spec = current.spec.clone().unwrap_or_default();
        if !mine {
            spec.acquire_time = Some(now());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.holder_identity = Some(me);
        spec.lease_duration_seconds = Some(duration);
        spec.renew_time = Some(now());
        next.spec = Some(spec);
        if let Some(owner) = &self.election.owner {
            next.metadata.owner_references = Some(vec![owner.reference()]);
        }
        match self
            .api
            .replace(&self.election.name, &PostParams::default(), &next)
            .await
        {
            Ok(written) => {
                self.observe(&written);
                Ok(true)
            }
            Err(e) if is_api(&e, 409) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Wait until this replica holds the Lease.
    pub async fn acquire(&mut self) -> anyhow::Result<()> {
        tracing::info!(lease = %format!("{}/{}", self.election.namespace, self.election.name), identity = %self.election.identity, "waiting for the leader Lease");
        let config =
            watcher::Config::default().fields(&format!("metadata.name={}", self.election.name));
        let mut changes = watcher::watcher(self.api.clone(), config)
            .default_backoff()
            .boxed();
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    tracing::info!(identity = %self.election.identity, "became the leader");
                    return Ok(());
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "leader election: reading or writing the Lease failed")
                }
            }
            let wake = tokio::time::sleep_until(self.next_attempt());
            tokio::pin!(wake);
            loop {
                tokio::select! {
                    () = &mut wake => break,
                    Some(change) = changes.next() => match change {
                        Ok(Event::Apply(lease) | Event::InitApply(lease)) => {
                            self.observe(&lease);
                            if holder_of(&lease).is_none() {
                                break;
                            }
                            wake.as_mut().reset(self.next_attempt());
                        }
                        Ok(Event::Delete(_)) => break,
                        Ok(Event::Init | Event::InitDone) => {}
                        Err(e) => tracing::debug!(error = %e, "watching the leader Lease failed; reading it every retry period"),
                    },
                }
            }
        }
    }

    /// Keep renewing; returns why leadership was lost.
    pub async fn hold(&mut self) -> String {
        let mut renewed = Instant::now();
        loop {
            tokio::time::sleep(self.election.retry_period).await;
            let attempt =
                tokio::time::timeout(self.election.renew_deadline, self.try_acquire_or_renew())
                    .await;
            match attempt {
                Ok(Ok(true)) => renewed = Instant::now(),
                Ok(Ok(false)) => return "another replica holds the Lease".to_owned(),
                Ok(Err(e)) => tracing::warn!(error = %e, "renewing the leader Lease failed"),
                Err(_) => tracing::warn!("renewing the leader Lease timed out"),
            }
            if renewed.elapsed() >= self.election.renew_deadline {
                return format!(
                    "could not renew the Lease for {:?}",
                    self.election.renew_deadline
                );
            }
        }
    }

    /// Hand the Lease back so another replica need not wait for expiry: cleared holder,
    /// a one-second duration, no owner. Tried until it works or the renew deadline
    /// passes (a conflict re-reads the Lease); a failure is logged with its cause (the
    /// owner reference still lets the garbage collector remove the Lease with the pod).
    pub async fn release(&mut self) {
        let deadline = Instant::now() + self.election.renew_deadline;
        loop {
            match self.try_release().await {
                Ok(released) => {
                    if released {
                        tracing::info!("released the leader Lease");
                    }
                    return;
                }
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, "releasing the leader Lease failed; trying again");
                    tokio::time::sleep(self.election.retry_period.min(Duration::from_millis(500)))
                        .await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not release the leader Lease; the next leader waits for it to expire");
                    return;
                }
            }
        }
    }

    /// One attempt; `Ok(false)` when there is nothing to release (not ours, gone).
    async fn try_release(&mut self) -> Result<bool, kube::Error> {
        let Some(mut current) = self.api.get_opt(&self.election.name).await? else {
            return Ok(false);
        };
        let Some(spec) = current.spec.as_mut() else {
            return Ok(false);
        };
        if spec.holder_identity.as_deref() != Some(self.election.identity.as_str()) {
            return Ok(false);
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(now());
        current.metadata.owner_references = None;
        self.api
            .replace(&self.election.name, &PostParams::default(), &current)
            .await?;
        Ok(true)
    }
}
