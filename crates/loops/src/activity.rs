//! What the loops are doing and what last went wrong, per object: the reconcile in
//! flight on each object (for liveness: a worker stuck on one object past a bound) and
//! each object's last failed attempt (loop, CSI code, message, when, next retry) — the
//! controller's own answer to "why is my claim stuck?", served as JSON at
//! `/debug/attempts` and read by `stowage explain`.
//!
//! Bounded: at most [`MAX_FAILURES`] failures are kept, the oldest dropped first; a
//! success forgets the object's failure. Owns no Kubernetes or CSI state.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::csi_client::CallError;

/// Failures kept at most (about 500 bytes each).
pub const MAX_FAILURES: usize = 4096;

/// One object's last failed attempt, as `/debug/attempts` serves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Failure {
    /// The loop (`provisioner`, `attacher`, `resizer`, `snapshotter`,
    /// `snapshot-controller`).
    pub loop_name: String,
    /// The object's key: `namespace/name`, or `name` for cluster objects.
    pub object: String,
    /// The CSI code of the failed call (`RESOURCE_EXHAUSTED` …), when a CSI call failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// What failed, with its causes.
    pub message: String,
    /// Failures in a row.
    pub failures: u32,
    /// When it failed (RFC 3339).
    pub at: String,
    /// When the loop tries again (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_retry: Option<String>,
}

/// A reconcile in flight, as `/debug/attempts` serves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InFlight {
    pub loop_name: String,
    pub object: String,
    pub seconds: u64,
}

/// The `/debug/attempts` document.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// Does this replica run the loops (holds the leader Lease, or runs without one)?
    pub leading: bool,
    pub failures: Vec<Failure>,
    pub in_flight: Vec<InFlight>,
}

/// A failure as kept: times as times (rendered when reported).
struct Kept {
    code: Option<String>,
    message: String,
    failures: u32,
    at: SystemTime,
    next_retry: SystemTime,
}

#[derive(Default)]
struct State {
    failures: HashMap<(&'static str, String), Kept>,
    in_flight: HashMap<(&'static str, String), Instant>,
    leading: bool,
}

/// Shared by every worker of every loop, and by the HTTP endpoint. Cheap to clone.
#[derive(Clone, Default)]
pub struct Activity {
    state: Arc<Mutex<State>>,
}

fn rfc3339(at: SystemTime) -> String {
    k8s_openapi::jiff::Timestamp::try_from(at)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// The CSI code in an error's chain, if a CSI call failed.
fn csi_code(error: &anyhow::Error) -> Option<String> {
    error
        .chain()
        .find_map(|cause| {
            cause
                .downcast_ref::<CallError>()
                .map(CallError::code)
                .or_else(|| {
                    cause
                        .downcast_ref::<tonic::Status>()
                        .map(tonic::Status::code)
                })
        })
        .map(|code| {
            // `ResourceExhausted` → `RESOURCE_EXHAUSTED`, as the CSI spec writes codes.
            let mut upper = String::new();
            for (i, c) in format!("{code:?}").chars().enumerate() {
                if c.is_uppercase() && i > 0 {
                    upper.push('_');
                }
                upper.push(c.to_ascii_uppercase());
            }
            upper
        })
}

impl Activity {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Does this replica run the loops now?
    pub fn set_leading(&self, leading: bool) {
        self.state().leading = leading;
    }

    /// Does this replica run the loops now?
    pub fn leading(&self) -> bool {
        self.state().leading
    }

    /// A worker starts on `object`; the guard ends it.
    pub fn begin(&self, loop_name: &'static str, object: &str) -> Working {
        self.state()
            .in_flight
            .insert((loop_name, object.to_owned()), Instant::now());
        Working {
            activity: self.clone(),
            key: (loop_name, object.to_owned()),
        }
    }

    /// The object's attempt failed; the loop retries after `retry_in`.
    pub fn failed(
        &self,
        loop_name: &'static str,
        object: &str,
        error: &anyhow::Error,
        retry_in: Duration,
    ) {
        let now = SystemTime::now();
        let mut state = self.state();
        let key = (loop_name, object.to_owned());
        let failures = state.failures.get(&key).map_or(0, |f| f.failures) + 1;
        if !state.failures.contains_key(&key)
            && state.failures.len() >= MAX_FAILURES
            && let Some(oldest) = state
                .failures
                .iter()
                .min_by_key(|(_, kept)| kept.at)
                .map(|(k, _)| k.clone())
        {
            state.failures.remove(&oldest);
        }
        state.failures.insert(
            key,
            Kept {
                code: csi_code(error),
                message: format!("{error:#}"),
                failures,
                at: now,
                next_retry: now + retry_in,
            },
        );
    }

    /// The object's attempt succeeded (or left nothing to retry): forget its failure.
    pub fn succeeded(&self, loop_name: &'static str, object: &str) {
        self.state()
            .failures
            .remove(&(loop_name, object.to_owned()));
    }

    /// Reconciles in flight for longer than `bound`: (loop, object, how long).
    pub fn stuck(&self, bound: Duration) -> Vec<(String, String, Duration)> {
        let state = self.state();
        let mut stuck: Vec<_> = state
            .in_flight
            .iter()
            .filter(|(_, since)| since.elapsed() > bound)
            .map(|((l, o), since)| (l.to_string(), o.clone(), since.elapsed()))
            .collect();
        stuck.sort();
        stuck
    }

    /// Everything known, failures in time order; `object` keeps only that object's.
    pub fn report(&self, object: Option<&str>) -> Report {
        let state = self.state();
        let wanted = |o: &str| object.is_none_or(|w| w == o);
        let mut kept: Vec<_> = state
            .failures
            .iter()
            .filter(|((_, o), _)| wanted(o))
            .collect();
        kept.sort_by(|a, b| a.1.at.cmp(&b.1.at).then(a.0.cmp(b.0)));
        let failures = kept
            .into_iter()
            .map(|((l, o), k)| Failure {
                loop_name: l.to_string(),
                object: o.clone(),
                code: k.code.clone(),
                message: k.message.clone(),
                failures: k.failures,
                at: rfc3339(k.at),
                next_retry: Some(rfc3339(k.next_retry)),
            })
            .collect();
        let mut in_flight: Vec<InFlight> = state
            .in_flight
            .iter()
            .filter(|((_, o), _)| wanted(o))
            .map(|((l, o), since)| InFlight {
                loop_name: l.to_string(),
                object: o.clone(),
                seconds: since.elapsed().as_secs(),
            })
            .collect();
        in_flight.sort_by(|a, b| a.object.cmp(&b.object));
        Report {
            leading: state.leading,
            failures,
            in_flight,
        }
    }
}

/// A reconcile in flight; dropping it ends it.
pub struct Working {
    activity: Activity,
    key: (&'static str, String),
}

impl Drop for Working {
    fn drop(&mut self) {
        self.activity.state().in_flight.remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_is_kept_with_its_csi_code_until_a_success() {
        let activity = Activity::default();
        let status = tonic::Status::resource_exhausted("no room in us-east-1a");
        let error = anyhow::Error::new(CallError::Status(status)).context("CreateVolume");
        activity.failed(
            "provisioner",
            "db/data-db-0",
            &error,
            Duration::from_secs(8),
        );
        activity.failed(
            "provisioner",
            "db/data-db-0",
            &error,
            Duration::from_secs(16),
        );
        let report = activity.report(Some("db/data-db-0"));
        assert_eq!(report.failures.len(), 1);
        let failure = &report.failures[0];
        assert_eq!(failure.code.as_deref(), Some("RESOURCE_EXHAUSTED"));
        assert_eq!(failure.failures, 2);
        assert!(failure.message.starts_with("CreateVolume: "), "{failure:?}");
        assert!(failure.message.contains("no room in us-east-1a"));
        let time = |t: &str| t.parse::<k8s_openapi::jiff::Timestamp>().unwrap();
        let retry_in = time(failure.next_retry.as_deref().unwrap()) - time(&failure.at);
        assert_eq!(retry_in.get_seconds(), 16, "the last failure's retry");
        assert!(activity.report(Some("db/other")).failures.is_empty());
        activity.succeeded("provisioner", "db/data-db-0");
        assert!(activity.report(None).failures.is_empty());
    }

    #[test]
    fn failures_are_bounded_and_the_oldest_go_first() {
        let activity = Activity::default();
        let error = anyhow::anyhow!("API down");
        for i in 0..MAX_FAILURES + 10 {
            activity.failed("provisioner", &format!("ns/c-{i}"), &error, Duration::ZERO);
        }
        let report = activity.report(None);
        assert_eq!(report.failures.len(), MAX_FAILURES);
        assert!(report.failures.iter().all(|f| f.code.is_none()));
        let newest = format!("ns/c-{}", MAX_FAILURES + 9);
        assert!(report.failures.iter().any(|f| f.object == newest));
    }

    #[test]
    fn a_reconcile_in_flight_past_the_bound_is_stuck_until_it_ends() {
        let activity = Activity::default();
        let working = activity.begin("attacher", "csi-abc");
        assert!(activity.stuck(Duration::from_secs(60)).is_empty());
        let stuck = activity.stuck(Duration::ZERO);
        assert_eq!(stuck.len(), 1);
        assert_eq!(
            (stuck[0].0.as_str(), stuck[0].1.as_str()),
            ("attacher", "csi-abc")
        );
        assert_eq!(activity.report(None).in_flight.len(), 1);
        drop(working);
        assert!(activity.stuck(Duration::ZERO).is_empty());
        assert!(activity.report(None).in_flight.is_empty());
    }
}
