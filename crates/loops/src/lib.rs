//! The Kubernetes side of stowage: the loops that watch PersistentVolumeClaims,
//! PersistentVolumes and VolumeAttachments and drive a CSI controller over its socket,
//! the way the upstream external-provisioner, external-attacher and external-resizer
//! sidecars do, in one process.
//!
//! - [`rules`]: PURE decisions and object builders (should a claim be provisioned, the
//!   PV name, the CreateVolume parameters, the PV object, the bind writes, should a PV
//!   be deleted). No I/O: every rule is table-tested with plain `#[test]`s.
//! - [`kube_client`]: the Kubernetes client (config, QPS limit, request counts).
//! - [`csi_client`]: the CSI client of the loops (call bound, timeouts, final vs
//!   in-progress) and its unix-socket channel.
//! - [`informer`], [`queue`]: shared watches + caches, and per-key work queues.
//! - [`claims`] (provision + bind), [`volumes`] (release + delete), [`attacher`],
//!   [`resizer`]: one reconciler each, built on the rules, never re-deciding them.
//! - [`leader`]: Lease-based leader election around all of them.
//! - [`Context`]: everything a reconciler reads or calls; unit tests build one from
//!   `fixtures` (a fake API server behind a real client, a fake CSI driver on a real
//!   socket) and call the reconcilers directly.
//!
//! The loops never touch backends directly: everything goes through CSI, so they can
//! drive any CSI driver given by `--csi-address`. This crate depends on `stowage-api`
//! (protobufs, key names, domain types) and never on `stowage-driver` or aws-sdk-ec2.

pub mod attacher;
pub mod claims;
pub mod csi_client;
pub mod events;
#[cfg(test)]
pub mod fixtures;
pub mod informer;
pub mod kube_client;
pub mod leader;
pub mod queue;
pub mod resizer;
pub mod rules;
pub mod volumes;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::{StorageClass, VolumeAttachment};
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Api, ResourceExt as _};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use csi_client::Csi;
pub use events::Events;
use informer::{Expectations, Handler};
use queue::{Backoff, Queue};
use stowage_api::metrics::Metrics;

/// The Kubernetes loops a controller runs (`--loops`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loop {
    /// PVC → CreateVolume → PV → bound claim; released PV → DeleteVolume.
    Provisioner,
    /// VolumeAttachment → ControllerPublish/Unpublish.
    Attacher,
    /// Larger PVC request → ControllerExpandVolume.
    Resizer,
}

impl Loop {
    /// Every loop, by its command-line name.
    pub const ALL: [(&'static str, Loop); 3] = [
        ("provisioner", Loop::Provisioner),
        ("attacher", Loop::Attacher),
        ("resizer", Loop::Resizer),
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
    pub requests: kube_client::RequestCounts,
    leader: Gauge,
    events_dropped: Counter,
}

fn latency_histogram() -> Histogram {
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

    fn succeeded(&self, operation: &str, started: Instant) {
        self.count(operation, "success", "");
        self.latency
            .get_or_create(&LatencyLabels {
                operation: operation.to_owned(),
            })
            .observe(started.elapsed().as_secs_f64());
    }

    fn failed(&self, operation: &str, reason: &str) {
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

/// Each loop's expectations of the cache after its own writes.
#[derive(Clone, Default)]
pub struct LoopExpectations {
    pub claims: Expectations,
    pub volumes: Expectations,
    pub attachments: Expectations,
    pub resizes: Expectations,
}

/// Everything a reconciler reads or calls, one context for the four loops: the API
/// client, the CSI client, the informers' caches, the expectations of the loops' own
/// writes, events and metrics. Unit tests build one from fixtures (`fixtures.rs`).
pub struct Context {
    pub expect: LoopExpectations,
    /// When each unbound claim (by uid) was first looked at.
    pub first_seen: std::sync::Mutex<std::collections::HashMap<String, Instant>>,
    pub client: kube::Client,
    pub csi: Csi,
    pub driver: String,
    pub settings: Settings,
    pub claims: Store<PersistentVolumeClaim>,
    pub volumes: Store<PersistentVolume>,
    pub classes: Store<StorageClass>,
    pub attachments: Store<VolumeAttachment>,
    pub events: Events,
    pub metrics: LoopMetrics,
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

/// A running set of loops; `stop` ends them.
pub struct Loops {
    queues: Vec<Queue>,
    tasks: Vec<JoinHandle<()>>,
}

impl Loops {
    /// Start the informers, wait for their first lists, then start the workers.
    pub async fn start(
        client: kube::Client,
        csi: Csi,
        settings: Settings,
        metrics: LoopMetrics,
    ) -> anyhow::Result<Loops> {
        let driver = csi.caps.driver_name.clone();
        let runs = |l: Loop| settings.loops.contains(&l);
        let claims_q = Queue::new(settings.backoff);
        let volumes_q = Queue::new(settings.backoff);
        let attach_q = Queue::new(settings.backoff);
        let resize_q = Queue::new(settings.backoff);

        let expect = LoopExpectations::default();
        let mut claim_handlers: Vec<Handler<PersistentVolumeClaim>> = Vec::new();
        let mut volume_handlers: Vec<Handler<PersistentVolume>> = Vec::new();
        let mut attachment_handlers: Vec<Handler<VolumeAttachment>> = Vec::new();
        if runs(Loop::Provisioner) {
            claim_handlers.push(observe_and_queue(&expect.claims, &claims_q));
            volume_handlers.push(observe_and_queue(&expect.volumes, &volumes_q));
            let cq = claims_q.clone();
            volume_handlers.push(Arc::new(move |pv, _| {
                // A PV for a claim: the claim may wait for it (its own, or one pre-bound).
                if let Some(claim) = pv.spec.as_ref().and_then(|s| s.claim_ref.as_ref())
                    && let (Some(ns), Some(name)) = (&claim.namespace, &claim.name)
                {
                    cq.add_forced(&format!("{ns}/{name}"));
                }
            }));
            let q = volumes_q.clone();
            attachment_handlers.push(Arc::new(move |va, deleted| {
                // DeleteVolume waits for attachments to go.
                if deleted && let Some(pv) = va.spec.source.persistent_volume_name.as_ref() {
                    q.add_forced(pv);
                }
            }));
        }
        if runs(Loop::Attacher) {
            attachment_handlers.push(observe_and_queue(&expect.attachments, &attach_q));
        }
        if runs(Loop::Resizer) {
            claim_handlers.push(observe_and_queue(&expect.resizes, &resize_q));
        }

        // Classes: a claim waiting for its class (or rejected by it) looks again when
        // the class appears or changes.
        let class_claims: Arc<std::sync::OnceLock<Store<PersistentVolumeClaim>>> = Arc::default();
        let class_handler: Handler<StorageClass> = {
            let claims = Arc::clone(&class_claims);
            let q = claims_q.clone();
            Arc::new(move |class, _| {
                let Some(store) = claims.get() else { return };
                let name = class.name_any();
                for pvc in store.state() {
                    if rules::claim_class(&pvc) == Some(name.as_str())
                        && pvc.spec.as_ref().is_none_or(|s| s.volume_name.is_none())
                    {
                        q.add_forced(&informer::key(pvc.as_ref()));
                    }
                }
            })
        };

        // Pages of 100: a list of thousands of objects never sits in memory at once
        // as JSON and parsed copies (the largest transient allocation of the loops).
        let config = watcher::Config::default().page_size(100);
        let claims = informer::start(
            Api::<PersistentVolumeClaim>::all(client.clone()),
            config.clone(),
            claim_handlers,
        );
        let _ = class_claims.set(claims.store.clone());
        let volumes = informer::start(
            Api::<PersistentVolume>::all(client.clone()),
            config.clone(),
            volume_handlers,
        );
        let classes = informer::start(
            Api::<StorageClass>::all(client.clone()),
            config.clone(),
            vec![class_handler],
        );
        let attachments = informer::start(
            Api::<VolumeAttachment>::all(client.clone()),
            config.clone(),
            attachment_handlers,
        );
        let mut tasks = vec![claims.task, volumes.task, classes.task, attachments.task];
        for store in [
            claims.store.wait_until_ready().await,
            volumes.store.wait_until_ready().await,
            classes.store.wait_until_ready().await,
            attachments.store.wait_until_ready().await,
        ] {
            store.map_err(|_| anyhow::anyhow!("an informer stopped before its first list"))?;
        }

        let shared = Arc::new(Context {
            expect: expect.clone(),
            first_seen: std::sync::Mutex::default(),
            events: Events::start(client.clone(), &driver, metrics.events_dropped.clone()),
            client,
            csi,
            driver,
            settings: settings.clone(),
            claims: claims.store,
            volumes: volumes.store,
            classes: classes.store,
            attachments: attachments.store,
            metrics,
        });
        shared.metrics.leader.set(1);
        let workers = settings.workers.max(1);
        if runs(Loop::Provisioner) {
            tasks.extend(spawn_workers(
                &shared,
                &claims_q,
                (&expect.claims, claim_version),
                workers,
                claims::reconcile,
            ));
            tasks.extend(spawn_workers(
                &shared,
                &volumes_q,
                (&expect.volumes, volume_version),
                workers,
                volumes::reconcile,
            ));
        }
        if runs(Loop::Attacher) {
            tasks.extend(spawn_workers(
                &shared,
                &attach_q,
                (&expect.attachments, attachment_version),
                workers,
                attacher::reconcile,
            ));
        }
        if runs(Loop::Resizer) {
            tasks.extend(spawn_workers(
                &shared,
                &resize_q,
                (&expect.resizes, claim_version),
                workers,
                resizer::reconcile,
            ));
        }
        tracing::info!(driver = %shared.driver, loops = ?settings.loops, "loops running");
        Ok(Loops {
            queues: vec![claims_q, volumes_q, attach_q, resize_q],
            tasks,
        })
    }

    /// Stop every worker and informer (in-flight reconciles are cancelled).
    pub fn stop(self) {
        for queue in &self.queues {
            queue.close();
        }
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// An informer handler that settles the loop's expectations, then queues the key.
fn observe_and_queue<K: kube::Resource>(expectations: &Expectations, queue: &Queue) -> Handler<K> {
    let expectations = expectations.clone();
    let queue = queue.clone();
    Arc::new(move |object: &K, deleted| {
        let key = informer::key(object);
        expectations.observe(&key, object.meta().resource_version.as_deref(), deleted);
        queue.add(&key);
    })
}

/// The resourceVersion a store holds for a key (`None`: not cached).
type CachedVersion = fn(&Context, &str) -> Option<String>;

fn claim_version(shared: &Context, key: &str) -> Option<String> {
    informer::get(&shared.claims, key).and_then(|o| o.metadata.resource_version.clone())
}

fn volume_version(shared: &Context, key: &str) -> Option<String> {
    informer::get(&shared.volumes, key).and_then(|o| o.metadata.resource_version.clone())
}

fn attachment_version(shared: &Context, key: &str) -> Option<String> {
    informer::get(&shared.attachments, key).and_then(|o| o.metadata.resource_version.clone())
}

fn spawn_workers<F, Fut>(
    shared: &Arc<Context>,
    queue: &Queue,
    (expectations, cached): (&Expectations, CachedVersion),
    count: usize,
    reconcile: F,
) -> Vec<JoinHandle<()>>
where
    F: Fn(Arc<Context>, String) -> Fut + Copy + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<Next>> + Send + 'static,
{
    (0..count)
        .map(|_| {
            let shared = Arc::clone(shared);
            let queue = queue.clone();
            let expectations = expectations.clone();
            tokio::spawn(async move {
                while let Some(key) = queue.next().await {
                    let version = cached(&shared, &key);
                    if let Some(wait) = expectations.wait(&key, version.as_deref()) {
                        // Our own last write is not in the cache yet: its event
                        // queues the key again (or the wait ends).
                        queue.add_after(&key, wait);
                        queue.done(&key);
                        continue;
                    }
                    let forced = queue.take_forced(&key);
                    if !expectations.begin(&key, version.as_deref(), forced) {
                        // Nothing new since this loop last left the object: its own
                        // write coming back, or a relist. A pending retry stays pending.
                        queue.done(&key);
                        continue;
                    }
                    match reconcile(Arc::clone(&shared), key.clone()).await {
                        Ok(Next::Done) => queue.settle(&key),
                        Ok(Next::After(delay)) => {
                            queue.forget(&key);
                            queue.add_after(&key, delay);
                        }
                        Ok(Next::Again) => {
                            queue.forget(&key);
                            queue.add_forced(&key);
                        }
                        Err(e) => {
                            let delay = queue.add_rate_limited(&key);
                            tracing::info!(%key, error = format!("{e:#}"), retry_in = ?delay, "reconcile failed");
                        }
                    }
                    queue.done(&key);
                }
            })
        })
        .collect()
}

/// Run the loops until `stop` turns true: at once, or with leader election only
/// while holding the Lease (losing it stops the loops until it is won again).
pub async fn run(
    client: kube::Client,
    csi: Csi,
    settings: Settings,
    metrics: LoopMetrics,
    election: Option<leader::Election>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let Some(election) = election else {
        let loops = Loops::start(client, csi, settings, metrics.clone()).await?;
        let _ = stop.wait_for(|s| *s).await;
        loops.stop();
        metrics.leader.set(0);
        return Ok(());
    };
    let mut lease = leader::Lease::new(client.clone(), election);
    loop {
        tokio::select! {
            acquired = lease.acquire() => acquired?,
            _ = stop.wait_for(|s| *s) => return Ok(()),
        }
        let loops = Loops::start(
            client.clone(),
            csi.clone(),
            settings.clone(),
            metrics.clone(),
        )
        .await;
        let loops = match loops {
            Ok(loops) => loops,
            Err(e) => {
                lease.release().await;
                return Err(e);
            }
        };
        let stopping = tokio::select! {
            lost = lease.hold() => {
                tracing::warn!(reason = %lost, "lost the leader Lease; stopping the loops");
                false
            }
            _ = stop.wait_for(|s| *s) => true,
        };
        loops.stop();
        metrics.leader.set(0);
        if stopping {
            lease.release().await;
            return Ok(());
        }
    }
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
fn finalizers_without<'a>(object: &'a impl kube::Resource, finalizer: &str) -> Vec<&'a String> {
    object
        .meta()
        .finalizers
        .iter()
        .flatten()
        .filter(|f| *f != finalizer)
        .collect()
}

/// A string map for CSI requests.
fn hash_map(map: &BTreeMap<String, String>) -> std::collections::HashMap<String, String> {
    map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// A Secret's data as the string map CSI calls carry.
async fn read_secret(
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
fn is_api(error: &kube::Error, code: u16) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == code)
}
