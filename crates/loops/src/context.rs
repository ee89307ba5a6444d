//! What every reconciler shares: the [`Context`] it reads and calls, the [`Settings`]
//! of the loops, their metrics and expectations, what a reconcile asks for next
//! ([`Next`]), and the small API helpers the reconcilers write with.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::{StorageClass, VolumeAttachment};
use kube::Api;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::Store;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use serde_json::json;

use crate::cache::Cache;
use crate::csi_client::Csi;
use crate::events::Events;
use crate::informer::Expectations;
use crate::queue::Backoff;
use stowage_api::keys::DriverNames;
use stowage_api::metrics::Metrics;

/// The Kubernetes loops a controller runs (`--loops`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loop {
    /// PVC → CreateVolume → PV → bound claim; released PV → DeleteVolume.
    Provisioner,
    /// VolumeAttachment → ControllerPublish/Unpublish.
    Attacher,
    /// Larger PVC request → ControllerExpandVolume; a claim's VolumeAttributesClass →
    /// ControllerModifyVolume.
    Resizer,
    /// VolumeSnapshotContent of this driver → CreateSnapshot/DeleteSnapshot
    /// (external-snapshotter's csi-snapshotter sidecar).
    Snapshotter,
    /// VolumeSnapshot of this driver → its VolumeSnapshotContent, status, deletion
    /// (external-snapshotter's common snapshot-controller, for this driver only).
    SnapshotController,
}

impl Loop {
    /// Every loop, by its command-line name.
    pub const ALL: [(&'static str, Loop); 5] = [
        ("provisioner", Loop::Provisioner),
        ("attacher", Loop::Attacher),
        ("resizer", Loop::Resizer),
        ("snapshotter", Loop::Snapshotter),
        ("snapshot-controller", Loop::SnapshotController),
    ];
}

impl std::str::FromStr for Loop {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        Loop::ALL
            .iter()
            .find(|(known, _)| *known == name)
            .map(|(_, l)| *l)
            .ok_or_else(|| {
                let names: Vec<&str> = Loop::ALL.iter().map(|(n, _)| *n).collect();
                format!(
                    "unknown loop {name:?}; expected one of {}",
                    names.join(", ")
                )
            })
    }
}

/// How the loops run.
#[derive(Debug, Clone)]
pub struct Settings {
    pub loops: Vec<Loop>,
    pub backoff: Backoff,
    /// Workers per queue (each holds at most one CSI call).
    pub workers: usize,
    /// The `storage.kubernetes.io/csiProvisionerIdentity` of this process.
    pub identity: String,
    /// How long a new claim waits for the PV controller's
    /// `volume.kubernetes.io/storage-provisioner` annotation before stowage writes it.
    pub annotation_grace: Duration,
    /// The NFS-only driver name served beside the CSI driver's own (`--nfs-driver-name`;
    /// see [`DriverNames`]).
    pub nfs_driver_name: Option<String>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    operation: String,
    result: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LatencyLabels {
    operation: String,
}

/// Metrics of the loops (registered once per process; they survive leadership changes).
#[derive(Clone)]
pub struct LoopMetrics {
    operations: Family<OperationLabels, Counter>,
    latency: Family<LatencyLabels, Histogram, fn() -> Histogram>,
    pub requests: crate::kube_client::RequestCounts,
    pub(crate) leader: Gauge,
    pub(crate) events_dropped: Counter,
}

pub(crate) fn latency_histogram() -> Histogram {
    // 1 ms … ~65 s
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

impl LoopMetrics {
    pub fn register(metrics: &Metrics) -> LoopMetrics {
        let this = LoopMetrics {
            operations: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            requests: Family::default(),
            leader: Gauge::default(),
            events_dropped: Counter::default(),
        };
        metrics.register(
            "stowage_operations",
            "Provisioner, attacher and resizer operations by result and reason \
             (success, or the failure's CSI code / cause)",
            this.operations.clone(),
        );
        metrics.register(
            "stowage_operation_duration_seconds",
            "Duration of successful provision, delete, attach, detach and resize operations",
            this.latency.clone(),
        );
        metrics.register(
            "stowage_kube_api_requests",
            "Kubernetes API requests sent by the loops, by verb and resource",
            this.requests.clone(),
        );
        metrics.register(
            "stowage_leader",
            "1 while this replica runs the loops (holds the Lease or needs none)",
            this.leader.clone(),
        );
        metrics.register(
            "stowage_events_dropped",
            "Events not published because the event queue was full",
            this.events_dropped.clone(),
        );
        this
    }

    pub(crate) fn succeeded(&self, operation: &str, started: Instant) {
        self.count(operation, "success", "");
        self.latency
            .get_or_create(&LatencyLabels {
                operation: operation.to_owned(),
            })
            .observe(started.elapsed().as_secs_f64());
    }

    pub(crate) fn failed(&self, operation: &str, reason: &str) {
        self.count(operation, "failed", reason);
    }

    fn count(&self, operation: &str, result: &str, reason: &str) {
        self.operations
            .get_or_create(&OperationLabels {
                operation: operation.to_owned(),
                result: result.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }
}

/// See [`Context::unsaved_pvs`].
pub type UnsavedPvs =
    std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, PersistentVolume>>>;

/// Each loop's expectations of the cache after its own writes.
#[derive(Clone, Default)]
pub struct LoopExpectations {
    pub claims: Expectations,
    pub volumes: Expectations,
    pub attachments: Expectations,
    pub resizes: Expectations,
    pub snapshots: Expectations,
    pub contents: Expectations,
}

/// Everything a reconciler reads or calls, one context for all the loops: the API
/// client, the CSI client, the informers' caches, the expectations of the loops' own
/// writes, events and metrics. Unit tests build one from fixtures (`fixtures.rs`).
pub struct Context {
    pub expect: LoopExpectations,
    /// When each unbound claim (by uid) was first looked at.
    pub first_seen: std::sync::Mutex<std::collections::HashMap<String, Instant>>,
    /// PVs the provisioner created that the PV cache may not show yet (by name), so a
    /// claim looked at again meanwhile is not provisioned a second time.
    pub created_pvs: std::sync::Mutex<std::collections::HashMap<String, Instant>>,
    /// PVs built for volumes CreateVolume made whose creation failed (API server away):
    /// the claim's next attempt creates the PV without calling the driver again, as
    /// external-provisioner's volume store does. Kept by the process across leadership
    /// terms (a lost Lease while the API server is away must not forget them).
    pub unsaved_pvs: UnsavedPvs,
    pub client: kube::Client,
    pub csi: Csi,
    /// The driver names whose objects are the loops' (the CSI driver's own first).
    pub driver: DriverNames,
    pub settings: Settings,
    pub claims: Cache<PersistentVolumeClaim>,
    pub volumes: Cache<PersistentVolume>,
    pub classes: Store<StorageClass>,
    pub attachments: Cache<VolumeAttachment>,
    /// The snapshot objects' caches; `None` where the API server serves no
    /// `snapshot.storage.k8s.io/v1` (the snapshot loops then have nothing to do).
    pub snapshot_stores: Option<crate::snapshots::SnapshotStores>,
    pub events: Events,
    pub metrics: LoopMetrics,
    /// What the workers are on and what last failed (`/debug/attempts`, liveness).
    pub activity: crate::activity::Activity,
}

/// What a reconcile wants next for its key.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Nothing until the object changes.
    Done,
    /// Look again after this long (no backoff growth).
    After(Duration),
    /// One step done (a write); take the next as soon as the cache shows the write.
    /// A loop's own write never queues its key by itself.
    Again,
}

/// A status merge patch guarded by `object`'s resourceVersion. On a conflict the live
/// object is read once more and patched again only if `still` holds for it; otherwise
/// someone else has written the status meanwhile and it is theirs (`Ok(None)`).
pub(crate) async fn patch_status_guarded<K>(
    api: &Api<K>,
    object: &K,
    patch: &serde_json::Value,
    still: impl Fn(&K) -> bool,
) -> Result<Option<K>, kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let name = object.meta().name.clone().unwrap_or_default();
    let mut version = object.meta().resource_version.clone();
    for attempt in 0..2 {
        let mut guarded = patch.clone();
        guarded["metadata"] = json!({ "resourceVersion": version });
        match api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&guarded))
            .await
        {
            Ok(written) => return Ok(Some(written)),
            Err(e) if is_api(&e, 409) && attempt == 0 => {
                let Some(live) = api.get_opt(&name).await? else {
                    return Ok(None);
                };
                if !still(&live) {
                    return Ok(None);
                }
                version = live.meta().resource_version.clone();
            }
            Err(e) if is_api(&e, 404) => return Ok(None),
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// An object's finalizers without `finalizer`: the list a merge patch sets to remove it.
pub(crate) fn finalizers_without<'a>(
    object: &'a impl kube::Resource,
    finalizer: &str,
) -> Vec<&'a String> {
    object
        .meta()
        .finalizers
        .iter()
        .flatten()
        .filter(|f| *f != finalizer)
        .collect()
}

/// A string map for CSI requests.
pub(crate) fn hash_map(
    map: &BTreeMap<String, String>,
) -> std::collections::HashMap<String, String> {
    map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// A Secret's data as the string map CSI calls carry.
pub(crate) async fn read_secret(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> Result<std::collections::HashMap<String, String>, kube::Error> {
    let secret = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), namespace)
        .get(name)
        .await?;
    Ok(secret
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()))
        .collect())
}

/// True for a Kubernetes API answer with this HTTP code.
pub(crate) fn is_api(error: &kube::Error, code: u16) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == code)
}
