//! Stand-ins for the two components stowage shares objects with, run against the fake
//! API server as clients of it (their requests carry [`STAND_IN_HEADER`], so the fake
//! counts them apart from stowage's):
//!
//! - [`PvController`]: kube-controller-manager's PV controller, the parts of
//!   `syncClaim`/`syncVolume` a CSI provisioner meets: it binds a claim to a PV
//!   pre-bound to it (stowage's dynamically provisioned PVs, or a static PV with a
//!   `claimRef` by name), marks a claim `Lost` whose `bind-completed` PV it cannot see,
//!   lifts it back to `Bound` when it can, and marks a PV `Available` (no claim or
//!   pre-bound by name) or `Released` (its claim gone). Its PV cache lags the API server
//!   by a configurable delay, as a busy controller-manager's does; its writes are updates
//!   with the resourceVersion of its cache, so a stale cache conflicts as the real one's
//!   does. It also annotates new claims with their class's provisioner.
//! - [`Kubelet`]: the node side of an expansion (KEP-1790): a claim at
//!   `NodeResizePending` → `NodeResizeInProgress` → (one failed attempt when asked:
//!   `NodeResizeFailed`, then again) → done (capacity = allocated, statuses and
//!   conditions cleared), every write guarded by the resourceVersion it read.
//!
//! Not modelled: matching unbound PVs to claims by size/class, recycling, in-tree
//! provisioning, the claim/PV caches' resync period (here: a full sync every 500 ms),
//! events other than `ClaimLost` (counted, see [`PvController::lost_marks`]).
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Resource as _, ResourceExt as _};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::fake_kube::{FakeKube, STAND_IN_HEADER, http_client_as};

const BIND_COMPLETED: &str = "pv.kubernetes.io/bind-completed";
const BOUND_BY_CONTROLLER: &str = "pv.kubernetes.io/bound-by-controller";
const STORAGE_PROVISIONER: &str = "volume.kubernetes.io/storage-provisioner";
const BETA_STORAGE_PROVISIONER: &str = "volume.beta.kubernetes.io/storage-provisioner";
const SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";

/// A client of the fake whose requests are marked as a stand-in's.
pub fn client(fake: &FakeKube) -> kube::Client {
    let _ = STAND_IN_HEADER;
    http_client_as(kube::Config::new(fake.url().parse().unwrap()), true)
}

fn version(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> u64 {
    meta.resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn phase_of_pv(pv: &PersistentVolume) -> Option<&str> {
    pv.status.as_ref().and_then(|s| s.phase.as_deref())
}

fn phase_of_claim(pvc: &PersistentVolumeClaim) -> Option<&str> {
    pvc.status.as_ref().and_then(|s| s.phase.as_deref())
}

fn claim_key(pvc: &PersistentVolumeClaim) -> String {
    format!("{}/{}", pvc.namespace().unwrap_or_default(), pvc.name_any())
}

fn volume_name(pvc: &PersistentVolumeClaim) -> Option<&str> {
    pvc.spec
        .as_ref()
        .and_then(|s| s.volume_name.as_deref())
        .filter(|v| !v.is_empty())
}

/// `IsVolumeBoundToClaim`: the PV's claimRef names this claim (and its uid, if set).
fn bound_to(pv: &PersistentVolume, pvc: &PersistentVolumeClaim) -> bool {
    let Some(r) = pv.spec.as_ref().and_then(|s| s.claim_ref.as_ref()) else {
        return false;
    };
    r.name == pvc.metadata.name
        && r.namespace == pvc.metadata.namespace
        && r.uid
            .as_deref()
            .filter(|u| !u.is_empty())
            .is_none_or(|u| Some(u) == pvc.metadata.uid.as_deref())
}

enum Change {
    Claim(Option<Box<PersistentVolumeClaim>>, String),
    Volume(Option<Box<PersistentVolume>>, String),
    Resync,
}

/// The PV-controller stand-in; stops when dropped.
pub struct PvController {
    tasks: Vec<JoinHandle<()>>,
    lost: Arc<AtomicU64>,
}

impl Drop for PvController {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl PvController {
    /// Starts it; its PV cache shows each PV event `lag` after the API server sent it.
    pub fn start(fake: &FakeKube, lag: Duration) -> PvController {
        let client = client(fake);
        let (tx, rx) = mpsc::unbounded_channel();
        let mut tasks = Vec::new();
        // Claims: at once.
        let claims: Api<PersistentVolumeClaim> = Api::all(client.clone());
        let claim_tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            let mut stream = watcher(claims, watcher::Config::default())
                .default_backoff()
                .boxed();
            while let Some(event) = stream.next().await {
                let changes = match event {
                    Ok(watcher::Event::Apply(c) | watcher::Event::InitApply(c)) => {
                        vec![Change::Claim(Some(Box::new(c.clone())), claim_key(&c))]
                    }
                    Ok(watcher::Event::Delete(c)) => vec![Change::Claim(None, claim_key(&c))],
                    _ => vec![],
                };
                for change in changes {
                    let _ = claim_tx.send(change);
                }
            }
        }));
        // PVs: each event delivered `lag` later, in order.
        let volumes: Api<PersistentVolume> = Api::all(client.clone());
        let (delay_tx, mut delay_rx) = mpsc::unbounded_channel::<(tokio::time::Instant, Change)>();
        tasks.push(tokio::spawn(async move {
            let mut stream = watcher(volumes, watcher::Config::default())
                .default_backoff()
                .boxed();
            while let Some(event) = stream.next().await {
                let change = match event {
                    Ok(watcher::Event::Apply(v) | watcher::Event::InitApply(v)) => {
                        Change::Volume(Some(Box::new(v.clone())), v.name_any())
                    }
                    Ok(watcher::Event::Delete(v)) => Change::Volume(None, v.name_any()),
                    _ => continue,
                };
                let _ = delay_tx.send((tokio::time::Instant::now() + lag, change));
            }
        }));
        let volume_tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            while let Some((due, change)) = delay_rx.recv().await {
                tokio::time::sleep_until(due).await;
                let _ = volume_tx.send(change);
            }
        }));
        // The controller's periodic full sync (the real one: every 15 s).
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                if tx.send(Change::Resync).is_err() {
                    return;
                }
            }
        }));
        let lost = Arc::new(AtomicU64::new(0));
        let mut controller = Controller {
            client,
            claims: HashMap::new(),
            volumes: HashMap::new(),
            lost: lost.clone(),
        };
        tasks.push(tokio::spawn(async move { controller.run(rx).await }));
        PvController { tasks, lost }
    }

    /// How many times it marked a claim `Lost` (each with a `ClaimLost` Warning).
    pub fn lost_marks(&self) -> u64 {
        self.lost.load(Ordering::SeqCst)
    }
}

struct Controller {
    client: kube::Client,
    claims: HashMap<String, PersistentVolumeClaim>,
    volumes: HashMap<String, PersistentVolume>,
    lost: Arc<AtomicU64>,
}

impl Controller {
    async fn run(&mut self, mut rx: mpsc::UnboundedReceiver<Change>) {
        while let Some(change) = rx.recv().await {
            match change {
                Change::Claim(claim, key) => {
                    self.store_claim(claim.map(|c| *c), &key);
                    self.sync_claim(&key).await;
                }
                Change::Volume(volume, name) => {
                    self.store_volume(volume.map(|v| *v), &name);
                    self.sync_volume(&name).await;
                }
                Change::Resync => {
                    let claims: Vec<String> = self.claims.keys().cloned().collect();
                    for key in claims {
                        self.sync_claim(&key).await;
                    }
                    let volumes: Vec<String> = self.volumes.keys().cloned().collect();
                    for name in volumes {
                        self.sync_volume(&name).await;
                    }
                }
            }
        }
    }

    /// Keeps the newer of the cached and the given object (`storeObjectUpdate`).
    fn store_claim(&mut self, claim: Option<PersistentVolumeClaim>, key: &str) {
        match claim {
            None => {
                self.claims.remove(key);
            }
            Some(claim) => {
                if self
                    .claims
                    .get(key)
                    .is_none_or(|c| version(&c.metadata) <= version(&claim.metadata))
                {
                    self.claims.insert(key.to_owned(), claim);
                }
            }
        }
    }

    fn store_volume(&mut self, volume: Option<PersistentVolume>, name: &str) {
        match volume {
            None => {
                self.volumes.remove(name);
            }
            Some(volume) => {
                if self
                    .volumes
                    .get(name)
                    .is_none_or(|v| version(&v.metadata) <= version(&volume.metadata))
                {
                    self.volumes.insert(name.to_owned(), volume);
                }
            }
        }
    }

    fn claims_api(&self, namespace: &str) -> Api<PersistentVolumeClaim> {
        Api::namespaced(self.client.clone(), namespace)
    }

    fn volumes_api(&self) -> Api<PersistentVolume> {
        Api::all(self.client.clone())
    }

    async fn sync_claim(&mut self, key: &str) {
        let Some(claim) = self.claims.get(key).cloned() else {
            return;
        };
        if claim.metadata.deletion_timestamp.is_some() {
            return;
        }
        if !claim.annotations().contains_key(BIND_COMPLETED) {
            return self.sync_unbound_claim(claim).await;
        }
        // syncBoundClaim
        let Some(name) = volume_name(&claim) else {
            return self.mark_lost(claim).await;
        };
        match self.volumes.get(name).cloned() {
            None => self.mark_lost(claim).await,
            Some(pv) => {
                let claim_ref = pv.spec.as_ref().and_then(|s| s.claim_ref.as_ref());
                if claim_ref.is_none()
                    || claim_ref.and_then(|r| r.uid.as_deref()) == claim.metadata.uid.as_deref()
                {
                    self.bind(pv, claim).await;
                }
            }
        }
    }

    async fn sync_unbound_claim(&mut self, claim: PersistentVolumeClaim) {
        match volume_name(&claim) {
            None => {
                let prebound = self
                    .volumes
                    .values()
                    .find(|pv| {
                        bound_to(pv, &claim)
                            && pv.metadata.deletion_timestamp.is_none()
                            && same_mode(pv, &claim)
                    })
                    .cloned();
                match prebound {
                    Some(pv) => self.bind(pv, claim).await,
                    None => self.ask_for_provisioning(claim).await,
                }
            }
            Some(name) => {
                let Some(pv) = self.volumes.get(name).cloned() else {
                    return; // Pending until the PV shows up.
                };
                let claim_ref = pv.spec.as_ref().and_then(|s| s.claim_ref.as_ref());
                if claim_ref.is_none() || bound_to(&pv, &claim) {
                    self.bind(pv, claim).await;
                }
            }
        }
    }

    /// `provisionClaim` for an external provisioner: annotate the claim with it.
    async fn ask_for_provisioning(&mut self, claim: PersistentVolumeClaim) {
        if claim.annotations().contains_key(STORAGE_PROVISIONER) {
            return;
        }
        let Some(class_name) = claim
            .spec
            .as_ref()
            .and_then(|s| s.storage_class_name.clone())
            .filter(|c| !c.is_empty())
        else {
            return;
        };
        let classes: Api<StorageClass> = Api::all(self.client.clone());
        let Ok(Some(class)) = classes.get_opt(&class_name).await else {
            return;
        };
        if class.volume_binding_mode.as_deref() == Some("WaitForFirstConsumer")
            && !claim.annotations().contains_key(SELECTED_NODE)
        {
            return;
        }
        let mut updated = claim.clone();
        let annotations = updated.annotations_mut();
        annotations.insert(STORAGE_PROVISIONER.into(), class.provisioner.clone());
        annotations.insert(BETA_STORAGE_PROVISIONER.into(), class.provisioner.clone());
        let namespace = claim.namespace().unwrap_or_default();
        if let Ok(written) = self
            .claims_api(&namespace)
            .replace(&claim.name_any(), &PostParams::default(), &updated)
            .await
        {
            self.store_claim(Some(written), &claim_key(&claim));
        }
    }

    async fn mark_lost(&mut self, claim: PersistentVolumeClaim) {
        if phase_of_claim(&claim) == Some("Lost") {
            return;
        }
        let mut updated = claim.clone();
        updated.status.get_or_insert_default().phase = Some("Lost".into());
        let namespace = claim.namespace().unwrap_or_default();
        if let Ok(written) = self
            .claims_api(&namespace)
            .replace_status(&claim.name_any(), &PostParams::default(), &updated)
            .await
        {
            self.lost.fetch_add(1, Ordering::SeqCst);
            eprintln!(
                "PV-controller stand-in: claim {} Lost (its PV {:?} is not in its cache)",
                claim_key(&claim),
                volume_name(&claim)
            );
            self.store_claim(Some(written), &claim_key(&claim));
        }
    }

    /// `bind`: the PV's claimRef, the PV's phase, the claim's volumeName and
    /// annotations, the claim's phase — each written only when it differs, each an
    /// update with the cached resourceVersion; the first failure ends it (the next sync
    /// goes on).
    async fn bind(&mut self, mut pv: PersistentVolume, mut claim: PersistentVolumeClaim) {
        let key = claim_key(&claim);
        let namespace = claim.namespace().unwrap_or_default();
        let claim_ref_uid = pv
            .spec
            .as_ref()
            .and_then(|s| s.claim_ref.as_ref())
            .and_then(|r| r.uid.clone())
            .filter(|u| !u.is_empty());
        if claim_ref_uid.is_none() {
            let set_bound_by_controller = !bound_to(&pv, &claim);
            let mut updated = pv.clone();
            updated.spec.get_or_insert_default().claim_ref = Some(claim.object_ref(&()));
            if set_bound_by_controller {
                updated
                    .annotations_mut()
                    .insert(BOUND_BY_CONTROLLER.into(), "yes".into());
            }
            match self
                .volumes_api()
                .replace(&pv.name_any(), &PostParams::default(), &updated)
                .await
            {
                Ok(written) => {
                    pv = written.clone();
                    self.store_volume(Some(written), &pv.name_any());
                }
                Err(_) => return,
            }
        }
        if phase_of_pv(&pv) != Some("Bound") {
            let mut updated = pv.clone();
            updated.status.get_or_insert_default().phase = Some("Bound".into());
            match self
                .volumes_api()
                .replace_status(&pv.name_any(), &PostParams::default(), &updated)
                .await
            {
                Ok(written) => {
                    pv = written.clone();
                    self.store_volume(Some(written), &pv.name_any());
                }
                Err(_) => return,
            }
        }
        let pv_name = pv.name_any();
        let mut updated = claim.clone();
        let mut dirty = false;
        if volume_name(&claim) != Some(pv_name.as_str()) {
            updated.spec.get_or_insert_default().volume_name = Some(pv_name.clone());
            updated
                .annotations_mut()
                .insert(BOUND_BY_CONTROLLER.into(), "yes".into());
            dirty = true;
        }
        if !claim.annotations().contains_key(BIND_COMPLETED) {
            updated
                .annotations_mut()
                .insert(BIND_COMPLETED.into(), "yes".into());
            dirty = true;
        }
        if dirty {
            match self
                .claims_api(&namespace)
                .replace(&claim.name_any(), &PostParams::default(), &updated)
                .await
            {
                Ok(written) => {
                    claim = written.clone();
                    self.store_claim(Some(written), &key);
                }
                Err(_) => return,
            }
        }
        // updateClaimStatus(Bound): capacity only when the claim becomes Bound.
        let spec = pv.spec.clone().unwrap_or_default();
        let status = claim.status.clone().unwrap_or_default();
        let becoming_bound = status.phase.as_deref() != Some("Bound");
        if becoming_bound || status.access_modes != spec.access_modes {
            let mut updated = claim.clone();
            let s = updated.status.get_or_insert_default();
            s.phase = Some("Bound".into());
            s.access_modes = spec.access_modes.clone();
            if becoming_bound {
                s.capacity = spec.capacity.clone();
                // VolumeAttributesClass (GA in 1.34): the claim's current class is the
                // PV's, from the bind on.
                s.current_volume_attributes_class_name = spec.volume_attributes_class_name.clone();
            }
            if let Ok(written) = self
                .claims_api(&namespace)
                .replace_status(&claim.name_any(), &PostParams::default(), &updated)
                .await
            {
                self.store_claim(Some(written), &key);
            }
        }
    }

    async fn sync_volume(&mut self, name: &str) {
        let Some(pv) = self.volumes.get(name).cloned() else {
            return;
        };
        let Some(claim_ref) = pv.spec.as_ref().and_then(|s| s.claim_ref.clone()) else {
            return self.set_pv_phase(pv, "Available").await;
        };
        let Some(uid) = claim_ref.uid.clone().filter(|u| !u.is_empty()) else {
            // Pre-bound by name: the claim's sync binds it.
            return self.set_pv_phase(pv, "Available").await;
        };
        let key = format!(
            "{}/{}",
            claim_ref.namespace.clone().unwrap_or_default(),
            claim_ref.name.clone().unwrap_or_default()
        );
        let mut claim = self.claims.get(&key).cloned();
        if claim.is_none() {
            // Not in the cache: asked of the API server before anything is released.
            claim = self
                .claims_api(claim_ref.namespace.as_deref().unwrap_or_default())
                .get_opt(claim_ref.name.as_deref().unwrap_or_default())
                .await
                .ok()
                .flatten();
        }
        match claim {
            Some(claim) if claim.metadata.uid.as_deref() == Some(uid.as_str()) => {
                match volume_name(&claim) {
                    None => self.sync_claim(&key).await,
                    Some(v) if v == pv.name_any() => self.set_pv_phase(pv, "Bound").await,
                    Some(_) => {}
                }
            }
            _ => {
                if !matches!(phase_of_pv(&pv), Some("Released" | "Failed")) {
                    self.set_pv_phase(pv, "Released").await;
                }
            }
        }
    }

    async fn set_pv_phase(&mut self, pv: PersistentVolume, phase: &str) {
        if phase_of_pv(&pv) == Some(phase) {
            return;
        }
        let mut updated = pv.clone();
        updated.status.get_or_insert_default().phase = Some(phase.into());
        if let Ok(written) = self
            .volumes_api()
            .replace_status(&pv.name_any(), &PostParams::default(), &updated)
            .await
        {
            self.store_volume(Some(written), &pv.name_any());
        }
    }
}

fn same_mode(pv: &PersistentVolume, claim: &PersistentVolumeClaim) -> bool {
    let mode = |m: Option<&String>| m.map_or("Filesystem", String::as_str).to_owned();
    mode(pv.spec.as_ref().and_then(|s| s.volume_mode.as_ref()))
        == mode(claim.spec.as_ref().and_then(|s| s.volume_mode.as_ref()))
}

// ---------------------------------------------------------------------------------------
// The kubelet's part of an expansion.

/// What the kubelet stand-in did.
#[derive(Default)]
pub struct KubeletCounts {
    /// NodeExpandVolume calls it made (each a NodeResizeInProgress attempt).
    pub node_expansions: AtomicU64,
    /// Its guarded writes that met a conflict (someone wrote the claim meanwhile).
    pub conflicts: AtomicU64,
    /// Resizes it finished.
    pub finished: AtomicU64,
}

/// The kubelet stand-in; stops when dropped.
pub struct Kubelet {
    task: JoinHandle<()>,
    pub counts: Arc<KubeletCounts>,
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Kubelet {
    /// Starts it: each node expansion takes `step`; with `fail_first`, the first
    /// attempt of each claim fails (`NodeResizeFailed`) and is retried after `step`.
    pub fn start(fake: &FakeKube, step: Duration, fail_first: bool) -> Kubelet {
        let client = client(fake);
        let counts = Arc::new(KubeletCounts::default());
        let c = counts.clone();
        let task = tokio::spawn(async move {
            let claims: Api<PersistentVolumeClaim> = Api::all(client.clone());
            let mut stream = watcher(claims, watcher::Config::default())
                .default_backoff()
                .boxed();
            let busy = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
            while let Some(event) = stream.next().await {
                let claim = match event {
                    Ok(watcher::Event::Apply(c) | watcher::Event::InitApply(c)) => c,
                    _ => continue,
                };
                if resize_state(&claim) != Some("NodeResizePending") {
                    continue;
                }
                let key = claim_key(&claim);
                if !busy.lock().unwrap().insert(key.clone()) {
                    continue;
                }
                let (client, counts, busy) = (client.clone(), c.clone(), busy.clone());
                tokio::spawn(async move {
                    expand_on_node(client, claim, step, fail_first, &counts).await;
                    busy.lock().unwrap().remove(&key);
                });
            }
        });
        Kubelet { task, counts }
    }
}

fn resize_state(claim: &PersistentVolumeClaim) -> Option<&str> {
    claim
        .status
        .as_ref()
        .and_then(|s| s.allocated_resource_statuses.as_ref())
        .and_then(|s| s.get("storage"))
        .map(String::as_str)
}

/// A status merge patch guarded by `claim`'s resourceVersion, as the kubelet's
/// `PatchPVCStatus` is; `None` on a conflict (counted) or another error.
async fn guarded(
    api: &Api<PersistentVolumeClaim>,
    claim: &PersistentVolumeClaim,
    status: serde_json::Value,
    counts: &KubeletCounts,
) -> Option<PersistentVolumeClaim> {
    let patch = json!({
        "metadata": { "resourceVersion": claim.metadata.resource_version },
        "status": status,
    });
    match api
        .patch_status(
            &claim.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(written) => Some(written),
        Err(kube::Error::Api(e)) if e.code == 409 => {
            counts.conflicts.fetch_add(1, Ordering::SeqCst);
            None
        }
        Err(e) => {
            // The fake is going away with its test.
            eprintln!("kubelet stand-in: writing claim status: {e}");
            None
        }
    }
}

async fn expand_on_node(
    client: kube::Client,
    claim: PersistentVolumeClaim,
    step: Duration,
    fail_first: bool,
    counts: &KubeletCounts,
) {
    let api: Api<PersistentVolumeClaim> =
        Api::namespaced(client, &claim.namespace().unwrap_or_default());
    let mut claim = claim;
    let mut failed_once = false;
    loop {
        let state = resize_state(&claim);
        if !matches!(state, Some("NodeResizePending" | "NodeResizeFailed")) {
            return;
        }
        let Some(in_progress) = guarded(
            &api,
            &claim,
            json!({ "allocatedResourceStatuses": { "storage": "NodeResizeInProgress" } }),
            counts,
        )
        .await
        else {
            // Someone wrote the claim meanwhile: the reconciler looks again.
            match api.get_opt(&claim.name_any()).await {
                Ok(Some(live)) => claim = live,
                _ => return,
            }
            continue;
        };
        counts.node_expansions.fetch_add(1, Ordering::SeqCst);
        // NodeExpandVolume takes its time.
        tokio::time::sleep(step).await;
        let result = if fail_first && !failed_once {
            failed_once = true;
            json!({ "allocatedResourceStatuses": { "storage": "NodeResizeFailed" } })
        } else {
            let allocated = in_progress
                .status
                .as_ref()
                .and_then(|s| s.allocated_resources.as_ref())
                .and_then(|a| a.get("storage"))
                .cloned();
            json!({
                "capacity": { "storage": allocated },
                "allocatedResourceStatuses": null,
                "conditions": [],
            })
        };
        match guarded(&api, &in_progress, result, counts).await {
            Some(written) if resize_state(&written).is_none() => {
                counts.finished.fetch_add(1, Ordering::SeqCst);
                return;
            }
            Some(written) => {
                // Failed: the kubelet retries after its backoff.
                tokio::time::sleep(step).await;
                claim = written;
            }
            None => match api.get_opt(&claim.name_any()).await {
                Ok(Some(live)) => claim = live,
                _ => return,
            },
        }
    }
}
