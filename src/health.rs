//! What `/healthz` and `/readyz` check, and the lines `/readyz` shows.
//!
//! Liveness (`/healthz`, failing restarts the process): the CSI server answers Probe on
//! its own socket; no loop worker is stuck on one object past `--stuck-after`; kubelet
//! did not refuse the node plugin's registration (registered by the driver).
//! Readiness (`/readyz`, failing only takes the pod out of service): the API server
//! answers; each backend answered its last check (NFS FSSTAT of each export in use, an
//! EC2 call), checked every `--backend-check-interval` in the background so a probe
//! never waits on storage. A backend that is down is a reason in `/readyz` and
//! `stowage_backend_up 0`, never a restart. `/readyz` also says whether this replica
//! leads the loops and what each backend last answered.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use stowage_api::metrics::Metrics;
use stowage_driver::backend::Backends;
use stowage_loops::Activity;
use tokio::sync::watch;

/// How long `/healthz` waits for the CSI server's Probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// `/healthz` fails when the CSI server stops answering Probe on its own socket (what
/// kubelet and the loops call): a wedged server gets the process restarted.
pub fn add_probe_health_check(metrics: &Metrics, socket: PathBuf) {
    use stowage_api::proto::csi::{ProbeRequest, identity_client::IdentityClient};
    metrics.add_health_check(move || {
        let socket = socket.clone();
        Box::pin(async move {
            let probe = async {
                let channel = stowage_loops::csi_client::channel::connect(&socket)
                    .await
                    .map_err(|e| e.to_string())?;
                IdentityClient::new(channel)
                    .probe(ProbeRequest {})
                    .await
                    .map_err(|status| status.message().to_owned())?;
                Ok::<(), String>(())
            };
            match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(format!(
                    "the CSI server on {} does not answer Probe: {e}",
                    socket.display()
                )),
                Err(_) => Err(format!(
                    "the CSI server on {} did not answer Probe within {PROBE_TIMEOUT:?}",
                    socket.display()
                )),
            }
        })
    });
}

/// `/healthz` fails while a loop's worker has been on one object past `stuck_after`
/// (a hung call the loops cannot cancel); `/readyz` says whether this replica leads.
pub fn add_loops_checks(metrics: &Metrics, activity: &Activity, stuck_after: Duration) {
    let working = activity.clone();
    metrics.add_health_check(move || {
        let stuck = working.stuck(stuck_after);
        Box::pin(async move {
            match stuck.first() {
                None => Ok(()),
                Some((loop_name, object, elapsed)) => Err(format!(
                    "the {loop_name} loop has been on {object} for {}s (bound --stuck-after {}s){}",
                    elapsed.as_secs(),
                    stuck_after.as_secs(),
                    match stuck.len() {
                        1 => String::new(),
                        n => format!(", and {} more", n - 1),
                    }
                )),
            }
        })
    });
    let leading = activity.clone();
    metrics.add_ready_note(move || {
        Some(if leading.leading() {
            "loops: leading (informers synced, workers running)".to_owned()
        } else {
            "loops: standby (another replica holds the leader Lease, or the loops are starting)"
                .to_owned()
        })
    });
}

/// How long `/readyz` waits for the API server (kubelet's probe gives up after 3 s).
const API_READY_TIMEOUT: Duration = Duration::from_secs(2);

/// `/readyz` fails while the API server does not answer: asked on each probe (one GET
/// `/version`) over the loops' own client, so a connection they cannot use shows too.
/// Leader or not, a replica that cannot reach the API server cannot do its work.
pub fn add_api_ready_check(metrics: &Metrics, kube: kube::Client) {
    metrics.add_ready_check(move || {
        let kube = kube.clone();
        Box::pin(async move {
            match tokio::time::timeout(API_READY_TIMEOUT, kube.apiserver_version()).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(error)) => Err(format!(
                    "the Kubernetes API server does not answer: {error}"
                )),
                Err(_) => Err(format!(
                    "the Kubernetes API server did not answer within {API_READY_TIMEOUT:?}"
                )),
            }
        })
    });
}

/// How long one backend check may take before it counts as down.
const BACKEND_CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// Labels of `stowage_backend_up`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    backend: String,
}

/// One backend's last check: what it said and when.
type LastCheck = (String, Result<String, String>, Instant);

/// Check every backend now and every `interval` (`--backend-check-interval`) until `stop`:
/// `stowage_backend_up{backend}` 1/0, a `/readyz` reason while one is down, a
/// `/readyz` line for each.
pub fn spawn_backend_checks(
    metrics: &Metrics,
    (backends, interval): (Backends, Duration),
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let up: Family<BackendLabels, Gauge> = Family::default();
    metrics.register(
        "stowage_backend_up",
        "1 when the backend answered its last check (NFS FSSTAT of each export in use, an EC2 call), else 0",
        up.clone(),
    );
    let last: Arc<Mutex<Vec<LastCheck>>> = Arc::default();
    let verdict = Arc::clone(&last);
    metrics.add_ready_check(move || {
        let down: Vec<String> = verdict
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(|(kind, result, _)| {
                result
                    .as_ref()
                    .err()
                    .map(|e| format!("backend {kind} is down: {e}"))
            })
            .collect();
        Box::pin(async move {
            if down.is_empty() {
                Ok(())
            } else {
                Err(down.join("\n"))
            }
        })
    });
    let lines = Arc::clone(&last);
    metrics.add_ready_note(move || {
        let last = lines.lock().unwrap_or_else(|e| e.into_inner());
        (!last.is_empty()).then(|| {
            last.iter()
                .map(|(kind, result, at)| {
                    let ago = at.elapsed().as_secs();
                    match result {
                        Ok(said) => format!("backend {kind}: up, {ago}s ago: {said}"),
                        Err(e) => format!("backend {kind}: DOWN, {ago}s ago: {e}"),
                    }
                })
                .collect::<Vec<_>>()
                .join("\n")
        })
    });
    tokio::spawn(async move {
        loop {
            let checks = backends.iter().map(|backend| async move {
                let result =
                    match tokio::time::timeout(BACKEND_CHECK_TIMEOUT, backend.check()).await {
                        Ok(result) => result,
                        Err(_) => Err(format!("no answer within {BACKEND_CHECK_TIMEOUT:?}")),
                    };
                (backend.kind().to_owned(), result, Instant::now())
            });
            let checked = futures::future::join_all(checks).await;
            for (kind, result, _) in &checked {
                up.get_or_create(&BackendLabels {
                    backend: kind.clone(),
                })
                .set(i64::from(result.is_ok()));
                if let Err(e) = result {
                    tracing::warn!(backend = %kind, error = %e, "backend check failed");
                }
            }
            *last.lock().unwrap_or_else(|e| e.into_inner()) = checked;
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn liveness_fails_while_nothing_answers_probe_on_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Metrics::new("stowage.csi.dev");
        add_probe_health_check(&metrics, dir.path().join("csi.sock"));
        let failed = metrics.healthy().await.unwrap_err();
        assert!(failed.contains("does not answer Probe"), "{failed}");
    }

    #[tokio::test]
    async fn a_worker_past_the_bound_fails_liveness_and_readiness_says_who_leads() {
        let metrics = Metrics::new("stowage.csi.dev");
        let activity = Activity::default();
        add_loops_checks(&metrics, &activity, Duration::ZERO);
        assert_eq!(metrics.healthy().await, Ok(()));
        assert!(metrics.ready_notes()[0].starts_with("loops: standby"));
        let working = activity.begin("resizer", "db/data-db-0");
        std::thread::sleep(Duration::from_millis(2));
        let failed = metrics.healthy().await.unwrap_err();
        assert!(
            failed.starts_with("the resizer loop has been on db/data-db-0 for"),
            "{failed}"
        );
        drop(working);
        assert_eq!(metrics.healthy().await, Ok(()));
        activity.set_leading(true);
        assert!(metrics.ready_notes()[0].starts_with("loops: leading"));
    }
}
