//! Running the loops: informers, queues and workers ([`Loops`]), under leader election
//! when asked ([`run`]). Decides nothing about objects: the reconcilers do.

use std::future::Future;
use std::sync::Arc;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::{StorageClass, VolumeAttachment};
use kube::runtime::watcher;
use kube::{Api, ResourceExt as _};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::activity::Activity;
use crate::cache::{Cache, UNBOUND};
use crate::context::*;
use crate::csi_client::Csi;
use crate::events::Events;
use crate::informer::{Expectations, Handler};
use crate::queue::Queue;
use crate::snapshots::types::{VolumeSnapshot, VolumeSnapshotClass, VolumeSnapshotContent};
use crate::snapshots::{self, SnapshotStores, controller as snapshot_controller};
use crate::{attacher, claims, informer, leader, resizer, rules, volumes};
use stowage_api::keys::DriverNames;

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
        (metrics, activity): (LoopMetrics, Activity),
        unsaved_pvs: UnsavedPvs,
    ) -> anyhow::Result<Loops> {
        let driver = DriverNames::new(
            csi.caps.driver_name.clone(),
            settings.nfs_driver_name.as_deref().unwrap_or_default(),
        );
        let runs = |l: Loop| settings.loops.contains(&l);
        let claims_q = Queue::new(settings.backoff);
        let volumes_q = Queue::new(settings.backoff);
        let attach_q = Queue::new(settings.backoff);
        let resize_q = Queue::new(settings.backoff);
        let snapshots_q = Queue::new(settings.backoff);
        let contents_q = Queue::new(settings.backoff);

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
                if let Some(key) = informer::claim_key_of(pv) {
                    cq.add_forced(&key);
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
        // The claims cache, for handlers of other resources (set once it exists).
        let claims_store: Arc<std::sync::OnceLock<Cache<PersistentVolumeClaim>>> = Arc::default();
        if runs(Loop::Resizer) {
            claim_handlers.push(observe_and_queue(&expect.resizes, &resize_q));
            // A grown claim whose PV was not cached yet looks again when the PV is (a
            // claim retrying after a failure keeps its backoff: the retry sees the PV).
            let claims = Arc::clone(&claims_store);
            let q = resize_q.clone();
            volume_handlers.push(Arc::new(move |pv, deleted| {
                if !deleted
                    && let Some(key) = claims
                        .get()
                        .and_then(|store| resizer::claim_waiting_for(pv, store))
                    && q.failures(&key) == 0
                {
                    q.add_forced(&key);
                }
            }));
        }

        // Classes: a claim waiting for its class (or rejected by it) looks again when
        // the class appears or changes.
        let class_handler: Handler<StorageClass> = {
            let claims = Arc::clone(&claims_store);
            let q = claims_q.clone();
            Arc::new(move |class, _| {
                let Some(store) = claims.get() else { return };
                let name = class.name_any();
                for pvc in store.tagged(UNBOUND) {
                    if rules::claim_class(&pvc) == Some(name.as_str()) {
                        q.add_forced(&informer::key(pvc.as_ref()));
                    }
                }
            })
        };

        // Snapshots: informers only where the API server serves the CRDs.
        let snapshot_api = snapshots_served(&client).await;
        let snapshot_stores_cell: Arc<std::sync::OnceLock<SnapshotStores>> = Arc::default();
        let mut snapshot_handlers: Vec<Handler<VolumeSnapshot>> = Vec::new();
        let mut content_handlers: Vec<Handler<VolumeSnapshotContent>> = Vec::new();
        if snapshot_api {
            if runs(Loop::SnapshotController) {
                snapshot_handlers.push(observe_and_queue(&expect.snapshots, &snapshots_q));
                // A content's change is its VolumeSnapshot's news.
                let q = snapshots_q.clone();
                content_handlers.push(Arc::new(move |content: &VolumeSnapshotContent, _| {
                    let reference = &content.spec.volume_snapshot_ref;
                    if let (Some(ns), Some(name)) = (&reference.namespace, &reference.name) {
                        q.add_forced(&format!("{ns}/{name}"));
                    }
                }));
                // A claim's change: VolumeSnapshots of it (waiting for its binding) and
                // the one it restores from (a deletion waiting for the restore).
                let stores = Arc::clone(&snapshot_stores_cell);
                let q = snapshots_q.clone();
                claim_handlers.push(Arc::new(move |pvc: &PersistentVolumeClaim, _| {
                    let Some(stores) = stores.get() else { return };
                    let namespace = pvc.metadata.namespace.as_deref();
                    let name = pvc.metadata.name.as_deref();
                    for vs in stores.snapshots.state() {
                        if vs.metadata.namespace.as_deref() == namespace
                            && vs.spec.source.persistent_volume_claim_name.as_deref() == name
                        {
                            q.add_forced(&informer::key(vs.as_ref()));
                        }
                    }
                    if let (Some(ns), Some(source)) =
                        (namespace, pvc.spec.as_ref().and_then(rules::data_source))
                        && rules::source_kind(&source) == Some(rules::SourceKind::Snapshot)
                    {
                        q.add_forced(&format!("{ns}/{}", source.name));
                    }
                }));
            }
            if runs(Loop::Snapshotter) {
                content_handlers.push(observe_and_queue(&expect.contents, &contents_q));
            }
            if runs(Loop::Provisioner) {
                // A claim restoring a snapshot waits for it to be ready.
                let claims = Arc::clone(&claims_store);
                let q = claims_q.clone();
                snapshot_handlers.push(Arc::new(move |vs: &VolumeSnapshot, _| {
                    let Some(store) = claims.get() else { return };
                    let namespace = vs.metadata.namespace.as_deref().unwrap_or_default();
                    let name = vs.metadata.name.as_deref().unwrap_or_default();
                    for pvc in store.tagged(UNBOUND) {
                        if snapshot_controller::restores_from(&pvc, namespace, name) {
                            q.add_forced(&informer::key(pvc.as_ref()));
                        }
                    }
                }));
            }
        }

        let config = list_config(&client).await;
        let claims = informer::start_compact(
            Api::<PersistentVolumeClaim>::all(client.clone()),
            config.clone(),
            driver.clone(),
            claim_handlers,
        );
        let _ = claims_store.set(claims.store.clone());
        let volumes = informer::start_compact(
            Api::<PersistentVolume>::all(client.clone()),
            config.clone(),
            driver.clone(),
            volume_handlers,
        );
        let classes = informer::start(
            Api::<StorageClass>::all(client.clone()),
            config.clone(),
            vec![class_handler],
        );
        let attachments = informer::start_compact(
            Api::<VolumeAttachment>::all(client.clone()),
            config.clone(),
            driver.clone(),
            attachment_handlers,
        );
        let mut tasks = vec![claims.task, volumes.task, classes.task, attachments.task];
        claims.store.wait_until_ready().await?;
        volumes.store.wait_until_ready().await?;
        classes
            .store
            .wait_until_ready()
            .await
            .map_err(|_| anyhow::anyhow!("an informer stopped before its first list"))?;
        attachments.store.wait_until_ready().await?;
        crate::cache::return_free_memory();
        let snapshot_stores = if snapshot_api {
            let vs = informer::start(
                Api::<VolumeSnapshot>::all(client.clone()),
                config.clone(),
                snapshot_handlers,
            );
            let contents = informer::start(
                Api::<VolumeSnapshotContent>::all(client.clone()),
                config.clone(),
                content_handlers,
            );
            let classes = informer::start(
                Api::<VolumeSnapshotClass>::all(client.clone()),
                config.clone(),
                vec![],
            );
            tasks.extend([vs.task, contents.task, classes.task]);
            let stores = SnapshotStores {
                snapshots: vs.store,
                contents: contents.store,
                classes: classes.store,
            };
            for ready in [
                stores.snapshots.wait_until_ready().await.is_ok(),
                stores.contents.wait_until_ready().await.is_ok(),
                stores.classes.wait_until_ready().await.is_ok(),
            ] {
                anyhow::ensure!(ready, "a snapshot informer stopped before its first list");
            }
            let _ = snapshot_stores_cell.set(stores.clone());
            Some(stores)
        } else {
            None
        };

        let shared = Arc::new(Context {
            expect: expect.clone(),
            first_seen: std::sync::Mutex::default(),
            created_pvs: std::sync::Mutex::default(),
            unsaved_pvs,
            events: Events::start(client.clone(), &driver.main, metrics.events_dropped.clone()),
            client,
            csi,
            driver,
            settings: settings.clone(),
            claims: claims.store,
            volumes: volumes.store,
            classes: classes.store,
            attachments: attachments.store,
            snapshot_stores,
            metrics,
            activity,
        });
        shared.metrics.leader.set(1);
        shared.activity.set_leading(true);
        let workers = settings.workers.max(1);
        if runs(Loop::Provisioner) {
            tasks.extend(spawn_workers(
                (&shared, "provisioner"),
                &claims_q,
                (&expect.claims, claim_version),
                workers,
                claims::reconcile,
            ));
            tasks.extend(spawn_workers(
                (&shared, "provisioner"),
                &volumes_q,
                (&expect.volumes, volume_version),
                workers,
                volumes::reconcile,
            ));
        }
        if runs(Loop::Attacher) {
            tasks.extend(spawn_workers(
                (&shared, "attacher"),
                &attach_q,
                (&expect.attachments, attachment_version),
                workers,
                attacher::reconcile,
            ));
        }
        if runs(Loop::Resizer) {
            tasks.extend(spawn_workers(
                (&shared, "resizer"),
                &resize_q,
                (&expect.resizes, claim_version),
                workers,
                resizer::reconcile,
            ));
        }
        if shared.snapshot_stores.is_some() {
            if runs(Loop::Snapshotter) {
                tasks.extend(spawn_workers(
                    (&shared, "snapshotter"),
                    &contents_q,
                    (&expect.contents, content_version),
                    workers,
                    snapshots::content::reconcile,
                ));
            }
            if runs(Loop::SnapshotController) {
                tasks.extend(spawn_workers(
                    (&shared, "snapshot-controller"),
                    &snapshots_q,
                    (&expect.snapshots, snapshot_version),
                    workers,
                    snapshot_controller::reconcile,
                ));
            }
        } else if runs(Loop::Snapshotter) || runs(Loop::SnapshotController) {
            tracing::warn!(
                "the API server serves no snapshot.storage.k8s.io/v1: the snapshot loops have nothing to watch (install the snapshot CRDs, then restart)"
            );
        }
        tracing::info!(driver = %shared.driver, loops = ?settings.loops, "loops running");
        Ok(Loops {
            queues: vec![
                claims_q,
                volumes_q,
                attach_q,
                resize_q,
                snapshots_q,
                contents_q,
            ],
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
    shared.claims.version(key)
}

fn volume_version(shared: &Context, key: &str) -> Option<String> {
    shared.volumes.version(key)
}

fn attachment_version(shared: &Context, key: &str) -> Option<String> {
    shared.attachments.version(key)
}

fn snapshot_version(shared: &Context, key: &str) -> Option<String> {
    let stores = shared.snapshot_stores.as_ref()?;
    informer::get(&stores.snapshots, key).and_then(|o| o.metadata.resource_version.clone())
}

fn content_version(shared: &Context, key: &str) -> Option<String> {
    let stores = shared.snapshot_stores.as_ref()?;
    informer::get(&stores.contents, key).and_then(|o| o.metadata.resource_version.clone())
}

/// Objects per page of a paged list: client-go's reflector pages by 500 too. Each page
/// is a consistent read from etcd, so the page count sets a restart's pace (50,000 PVs
/// and claims in pages of 100 took 19.8 s to sync on the e2e cluster) while a page of
/// 500 parsed is ~2 MB.
const LIST_PAGE: u32 = 500;

/// How the informers list: streamed as watch events where the API server supports it
/// (WatchList, `sendInitialEvents`: the server sends the objects one by one from its
/// watch cache, no list response is built on either side), else in pages of
/// [`LIST_PAGE`] (a list of thousands of objects never sits in memory at once as JSON
/// and parsed copies).
/// Support is asked once, by a streamed watch of StorageClasses that must end its
/// initial events within 5 s.
async fn list_config(client: &kube::Client) -> watcher::Config {
    let streaming = watcher::Config::default().streaming_lists();
    let probe = watcher::watcher(Api::<StorageClass>::all(client.clone()), streaming.clone());
    let ended = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        let mut events = std::pin::pin!(probe);
        while let Some(event) = events.next().await {
            match event {
                Ok(watcher::Event::InitDone) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        Err("the watch ended".to_owned())
    })
    .await;
    match ended {
        Ok(Ok(())) => {
            tracing::info!("informers list by streaming (WatchList)");
            streaming
        }
        Ok(Err(e)) => {
            tracing::info!(reason = %e, "the API server does not stream lists; informers list in pages");
            watcher::Config::default().page_size(LIST_PAGE)
        }
        Err(_) => {
            tracing::info!("no streamed list within 5 s; informers list in pages");
            watcher::Config::default().page_size(LIST_PAGE)
        }
    }
}

/// Does the API server serve `snapshot.storage.k8s.io/v1` (are the CRDs installed)?
async fn snapshots_served(client: &kube::Client) -> bool {
    match Api::<VolumeSnapshotClass>::all(client.clone())
        .list(&kube::api::ListParams::default().limit(1))
        .await
    {
        Ok(_) => true,
        Err(kube::Error::Api(status)) if status.code == 404 => false,
        Err(e) => {
            tracing::warn!(error = %e, "could not tell whether the snapshot CRDs are installed; assuming they are not");
            false
        }
    }
}

fn spawn_workers<F, Fut>(
    (shared, name): (&Arc<Context>, &'static str),
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
                        tracing::trace!(%key, ?wait, "waiting for the cache to show our write");
                        queue.add_after(&key, wait);
                        queue.done(&key);
                        continue;
                    }
                    let forced = queue.take_forced(&key);
                    if !expectations.begin(&key, version.as_deref(), forced) {
                        // Nothing new since this loop last left the object: its own
                        // write coming back, or a relist. A pending retry stays pending.
                        tracing::trace!(%key, ?version, "nothing new");
                        queue.done(&key);
                        continue;
                    }
                    let working = shared.activity.begin(name, &key);
                    let result = reconcile(Arc::clone(&shared), key.clone()).await;
                    drop(working);
                    match result {
                        Ok(next) => {
                            shared.activity.succeeded(name, &key);
                            match next {
                                Next::Done => queue.settle(&key),
                                Next::After(delay) => {
                                    queue.forget(&key);
                                    queue.add_after(&key, delay);
                                }
                                Next::Again => {
                                    queue.forget(&key);
                                    queue.add_forced(&key);
                                }
                            }
                        }
                        Err(e) => {
                            let delay = queue.add_rate_limited(&key);
                            shared.activity.failed(name, &key, &e, delay);
                            tracing::info!(loop_name = name, %key, error = format!("{e:#}"), retry_in = ?delay, "reconcile failed");
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
    (metrics, activity): (LoopMetrics, Activity),
    election: Option<leader::Election>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let unsaved_pvs = UnsavedPvs::default();
    let stopped = |metrics: &LoopMetrics| {
        metrics.leader.set(0);
        activity.set_leading(false);
    };
    // A start waits for the informers' first lists, which never come while the API
    // server is away: a stop must not wait for it.
    let Some(election) = election else {
        let started = Loops::start(
            client,
            csi,
            settings,
            (metrics.clone(), activity.clone()),
            unsaved_pvs,
        );
        let loops = tokio::select! {
            loops = started => loops?,
            _ = stop.wait_for(|s| *s) => return Ok(()),
        };
        let _ = stop.wait_for(|s| *s).await;
        loops.stop();
        stopped(&metrics);
        return Ok(());
    };
    let mut lease = leader::Lease::new(client.clone(), election);
    loop {
        tokio::select! {
            acquired = lease.acquire() => acquired?,
            _ = stop.wait_for(|s| *s) => return Ok(()),
        }
        let started = Loops::start(
            client.clone(),
            csi.clone(),
            settings.clone(),
            (metrics.clone(), activity.clone()),
            unsaved_pvs.clone(),
        );
        let loops = tokio::select! {
            loops = started => Some(loops),
            _ = stop.wait_for(|s| *s) => None,
        };
        let Some(loops) = loops else {
            lease.release().await;
            stopped(&metrics);
            return Ok(());
        };
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
        stopped(&metrics);
        if stopping {
            lease.release().await;
            return Ok(());
        }
    }
}
