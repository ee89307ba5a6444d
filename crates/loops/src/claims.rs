//! The provisioning reconciler: a claim of one of our StorageClasses → CreateVolume →
//! the PV, pre-bound to the claim (`claimRef` with its uid), as external-provisioner
//! makes it. Binding is the PV controller's (kube-controller-manager): it sets the
//! claim's `volumeName`, `bind-completed` and both phases once *its* cache holds the
//! PV. stowage never writes those: a claim marked bound before the PV controller can
//! see its PV is one it declares `Lost`.
//!
//! Crash safety: before CreateVolume the claim gets the finalizer
//! `<driver>/provisioning`; it comes off once the PV exists. So while a volume may
//! exist without a PV, its claim cannot disappear: a claim deleted meanwhile is seen
//! again with the finalizer, and the volume is looked up by name (CreateVolume is
//! idempotent) and deleted before the finalizer goes. A restart re-runs CreateVolume
//! for the same name (`pvc-<uid>`), so it never duplicates.
//!
//! Reads decisions from [`super::rules`]; never touches backends except through CSI.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::{CSINode, StorageClass, VolumeAttributesClass};
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource as _, ResourceExt as _};
use serde_json::json;

use crate::cache::UNBOUND;
use crate::context::{Context, Next, finalizers_without, hash_map, is_api};
use crate::csi_client::capability;
use crate::informer;
use crate::informer::{EXPECTATION_TTL, Expect};
use crate::rules::{self, Decision};
use stowage_api::convert::volume_from_proto;
use stowage_api::proto::csi as proto;
use stowage_api::volume::Segments;

/// The claim finalizer held while a volume may exist without a PV.
pub fn provisioning_finalizer(driver: &str) -> String {
    format!("{driver}/provisioning")
}

fn has_finalizer(pvc: &PersistentVolumeClaim, finalizer: &str) -> bool {
    pvc.finalizers().iter().any(|f| f == finalizer)
}

/// The cache must show this write of the claim before the claim is looked at again.
fn expect_written(shared: &Context, written: &PersistentVolumeClaim) {
    if let Some(version) = &written.metadata.resource_version {
        shared
            .expect
            .claims
            .expect(&informer::key(written), Expect::Version(version.clone()));
    }
}

fn claims(shared: &Context, namespace: &str) -> Api<PersistentVolumeClaim> {
    Api::namespaced(shared.client.clone(), namespace)
}

fn volumes(shared: &Context) -> Api<PersistentVolume> {
    Api::all(shared.client.clone())
}

/// Reconcile the claim `namespace/name`.
pub async fn reconcile(shared: Arc<Context>, key: String) -> anyhow::Result<Next> {
    let Some(pvc) = shared.claims.get(&key) else {
        return Ok(Next::Done);
    };
    let finalizer = provisioning_finalizer(&shared.driver.main);
    if pvc
        .spec
        .as_ref()
        .and_then(|s| s.volume_name.as_deref())
        .is_some_and(|v| !v.is_empty())
    {
        // Bound (or being bound) by the PV controller: only our finalizer is left to go.
        return settle(&shared, &pvc, &finalizer).await;
    }
    if pvc.metadata.deletion_timestamp.is_some() {
        if has_finalizer(&pvc, &finalizer) {
            return abandon(&shared, &pvc, &finalizer).await;
        }
        return Ok(Next::Done);
    }
    let class = rules::claim_class(&pvc).and_then(|name| shared.classes.get(&ObjectRef::new(name)));
    match rules::should_provision(&pvc, class.as_deref(), &shared.driver) {
        Decision::Skip(reason) | Decision::Wait(reason) => {
            tracing::debug!(claim = %key, %reason, "not provisioning");
            Ok(Next::Done)
        }
        Decision::Reject(message) => {
            shared.metrics.failed("provision", "InvalidClaim");
            shared
                .events
                .warning(pvc.object_ref(&()), "ProvisioningFailed", message.clone());
            Err(anyhow::anyhow!(message))
        }
        Decision::Provision => {
            if let Some(pv) = shared
                .volumes
                .find_tagged(&key, |pv| rules::is_prebound_to(pv, &pvc))
            {
                tracing::debug!(claim = %key, pv = %pv.name_any(), "a PV is pre-bound to the claim; the PV controller binds it");
                return Ok(Next::Done);
            }
            if let Some(wait) = annotation_wait(&shared, &pvc) {
                return Ok(Next::After(wait));
            }
            let class = class.expect("Provision implies the class exists");
            let result = provision(&shared, &pvc, &class, &finalizer).await;
            if result.is_ok() {
                forget_seen(&shared, &pvc);
            }
            result
        }
    }
}

/// Give kube-controller-manager's PV controller a moment to annotate a new claim
/// (`volume.kubernetes.io/storage-provisioner`). It reads the claim, then writes the
/// annotation with that resourceVersion: a claim written by stowage in between makes
/// its write fail with a conflict, which it reports as a ProvisioningFailed event. A
/// claim it has annotated (or one nobody annotates within the grace: no PV controller
/// running, or one slowed by its rate limit) goes ahead, and stowage's first write
/// carries the annotation, so a later PV controller sync has nothing to write.
fn annotation_wait(shared: &Context, pvc: &PersistentVolumeClaim) -> Option<std::time::Duration> {
    let grace = shared.settings.annotation_grace;
    if grace.is_zero()
        || pvc
            .annotations()
            .contains_key(rules::ANN_STORAGE_PROVISIONER)
    {
        return None;
    }
    let uid = pvc.metadata.uid.clone().unwrap_or_default();
    let mut seen = shared.first_seen.lock().unwrap_or_else(|e| e.into_inner());
    if seen.len() > 10_000 {
        seen.retain(|_, at| at.elapsed() < grace * 4);
    }
    let first = *seen.entry(uid).or_insert_with(Instant::now);
    grace
        .checked_sub(first.elapsed())
        .filter(|left| !left.is_zero())
}

fn forget_seen(shared: &Context, pvc: &PersistentVolumeClaim) {
    if let Some(uid) = &pvc.metadata.uid {
        shared
            .first_seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(uid);
    }
}

async fn provision(
    shared: &Context,
    pvc: &PersistentVolumeClaim,
    class: &StorageClass,
    finalizer: &str,
) -> anyhow::Result<Next> {
    let started = Instant::now();
    let name = rules::pv_name(pvc).map_err(anyhow::Error::msg)?;
    if existing_pv(shared, &name, pvc).await?.is_some() || created_uncached(shared, &name) {
        // Made before a crash or a failed finalizer write, or just made and not in the
        // cache yet: the PV controller binds it.
        return settle(shared, pvc, finalizer).await;
    }
    let unsaved = lock(&shared.unsaved_pvs).remove(&name);
    if let Some(pv) = unsaved.filter(|pv| check_pv_is_for(pv, pvc).is_ok()) {
        // CreateVolume made the volume on an earlier attempt; only its PV is missing.
        return save_pv(shared, pvc, pv, finalizer, started).await;
    }
    let class_name = class.name_any();
    let request = match create_request(shared, pvc, class, &name).await {
        Ok(request) => request,
        Err(message) => {
            shared.metrics.failed("provision", "InvalidClaim");
            let message =
                format!("failed to provision volume with StorageClass \"{class_name}\": {message}");
            shared
                .events
                .warning(pvc.object_ref(&()), "ProvisioningFailed", message.clone());
            anyhow::bail!(message);
        }
    };
    let requested = request
        .capacity_range
        .as_ref()
        .map_or(0, |r| r.required_bytes);
    let pvc = add_finalizer(shared, pvc, finalizer, &class.provisioner).await?;
    protect_clone_source(shared, &pvc).await?;
    shared.events.normal(
        pvc.object_ref(&()),
        "Provisioning",
        format!(
            "External provisioner is provisioning volume for claim \"{}\"",
            informer::key(&pvc)
        ),
    );
    let volume = match shared.csi.create_volume(request).await {
        Ok(volume) => volume_from_proto(volume),
        Err(e) => {
            shared
                .metrics
                .failed("provision", &format!("{:?}", e.code()));
            let failed = format!(
                "failed to provision volume with StorageClass \"{class_name}\": {}",
                e.message()
            );
            if let Some(node) = reschedulable(class, &pvc, e.code()) {
                // No room on the selected node (or its zone): as external-provisioner
                // does, hand the claim back to the scheduler instead of retrying there.
                reschedule(shared, &pvc, finalizer, &node, &failed).await?;
                return Ok(Next::Done);
            }
            shared
                .events
                .warning(pvc.object_ref(&()), "ProvisioningFailed", failed);
            if e.is_final() && e.code() != tonic::Code::AlreadyExists {
                // The driver says no volume was made: nothing to protect while the
                // claim waits for its next attempt (it may be deleted meanwhile).
                remove_finalizer(shared, &pvc, finalizer).await?;
            }
            return Err(anyhow::Error::new(e).context("CreateVolume"));
        }
    };
    if let Err(message) = rules::provisioned_capacity(&volume, requested) {
        // Upstream deletes a too-small volume and tries again.
        let deleted = shared.csi.delete_volume(&volume.id, HashMap::new()).await;
        shared.metrics.failed("provision", "TooSmall");
        shared
            .events
            .warning(pvc.object_ref(&()), "ProvisioningFailed", message.clone());
        deleted.context("deleting the too-small volume")?;
        anyhow::bail!(message);
    }
    let pv = rules::build_pv(&pvc, class, &shared.settings.identity, &volume, requested)
        .map_err(anyhow::Error::msg)?;
    save_pv(shared, &pvc, pv, finalizer, started).await
}

/// Create the PV of the volume CreateVolume made for `pvc`, then let the claim go. A PV
/// that cannot be created now is kept for the claim's next attempt, which saves it
/// without calling the driver again.
async fn save_pv(
    shared: &Context,
    pvc: &PersistentVolumeClaim,
    pv: PersistentVolume,
    finalizer: &str,
    started: Instant,
) -> anyhow::Result<Next> {
    let name = pv.name_any();
    if let Err(e) = create_pv(shared, &pv, pvc).await {
        lock(&shared.unsaved_pvs).insert(name, pv);
        return Err(e);
    }
    remember_created(shared, &name);
    shared.metrics.succeeded("provision", started);
    shared.events.normal(
        pvc.object_ref(&()),
        "ProvisioningSucceeded",
        format!("Successfully provisioned volume {name}"),
    );
    // The volume has its PV: the claim may go now, and the PV controller binds it.
    remove_finalizer(shared, pvc, finalizer).await?;
    release_clone_source(shared, pvc).await?;
    Ok(Next::Done)
}

/// The node to forget when CreateVolume found no capacity for a WaitForFirstConsumer
/// claim scheduled there (RESOURCE_EXHAUSTED); `None` otherwise (an Immediate claim keeps
/// retrying, as the capacity may come back).
fn reschedulable(
    class: &StorageClass,
    pvc: &PersistentVolumeClaim,
    code: tonic::Code,
) -> Option<String> {
    let wait_for_consumer =
        class.volume_binding_mode.as_deref() == Some(rules::BINDING_WAIT_FOR_FIRST_CONSUMER);
    (code == tonic::Code::ResourceExhausted && wait_for_consumer)
        .then(|| pvc.annotations().get(rules::ANN_SELECTED_NODE).cloned())
        .flatten()
        .filter(|node| !node.is_empty())
}

/// Drop the claim's `volume.kubernetes.io/selected-node` (and our finalizer: no volume
/// was made), so the scheduler picks another node for its pod.
async fn reschedule(
    shared: &Context,
    pvc: &PersistentVolumeClaim,
    finalizer: &str,
    node: &str,
    failed: &str,
) -> anyhow::Result<()> {
    let patch = json!({
        "metadata": {
            "annotations": { rules::ANN_SELECTED_NODE: null },
            "finalizers": finalizers_without(pvc, finalizer),
            "resourceVersion": pvc.metadata.resource_version,
        }
    });
    let written = claims(shared, pvc.namespace().as_deref().unwrap_or_default())
        .patch(
            &pvc.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .context("removing the selected node from the claim")?;
    expect_written(shared, &written);
    shared.events.warning(
        pvc.object_ref(&()),
        "ProvisioningFailed",
        format!("{failed}; no capacity on node {node}: handed back to the scheduler to pick another node"),
    );
    Ok(())
}

/// The finalizer a claim being cloned keeps until its clones have their volumes
/// (external-provisioner's clone protection).
pub const CLONE_FINALIZER: &str = "provisioner.storage.kubernetes.io/cloning-protection";

/// The claim `pvc` clones from, if it clones one.
fn clone_source_key(pvc: &PersistentVolumeClaim) -> Option<String> {
    let source = pvc.spec.as_ref().and_then(rules::data_source)?;
    (rules::source_kind(&source) == Some(rules::SourceKind::Claim))
        .then(|| format!("{}/{}", pvc.namespace().unwrap_or_default(), source.name))
}

/// The source of a clone keeps [`CLONE_FINALIZER`] while the clone is made.
async fn protect_clone_source(shared: &Context, pvc: &PersistentVolumeClaim) -> anyhow::Result<()> {
    let Some(key) = clone_source_key(pvc) else {
        return Ok(());
    };
    let Some(source) = shared.claims.get(&key) else {
        return Ok(());
    };
    if has_finalizer(&source, CLONE_FINALIZER) {
        return Ok(());
    }
    let mut finalizers = source.finalizers().to_vec();
    finalizers.push(CLONE_FINALIZER.to_owned());
    let patch = json!({
        "metadata": {"finalizers": finalizers, "resourceVersion": source.metadata.resource_version}
    });
    claims(shared, &source.namespace().unwrap_or_default())
        .patch(
            &source.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .context("protecting the claim being cloned")?;
    Ok(())
}

/// Drop the clone protection of `pvc`'s source once no other claim is still being
/// cloned from it.
async fn release_clone_source(shared: &Context, pvc: &PersistentVolumeClaim) -> anyhow::Result<()> {
    let Some(key) = clone_source_key(pvc) else {
        return Ok(());
    };
    let Some(source) = shared.claims.get(&key) else {
        return Ok(());
    };
    if !has_finalizer(&source, CLONE_FINALIZER) {
        return Ok(());
    }
    let others = shared.claims.tagged(UNBOUND).into_iter().any(|other| {
        other.metadata.uid != pvc.metadata.uid
            && clone_source_key(&other).as_deref() == Some(key.as_str())
            && other
                .spec
                .as_ref()
                .and_then(|s| s.volume_name.as_deref())
                .is_none_or(str::is_empty)
    });
    if others {
        return Ok(());
    }
    let patch = json!({
        "metadata": {
            "finalizers": finalizers_without(source.as_ref(), CLONE_FINALIZER),
            "resourceVersion": source.metadata.resource_version,
        }
    });
    match claims(shared, &source.namespace().unwrap_or_default())
        .patch(
            &source.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if is_api(&e, 404) || is_api(&e, 409) => Ok(()),
        Err(e) => Err(anyhow::Error::new(e).context("releasing the cloned claim")),
    }
}

/// The PV already made for this claim (before a crash or a failed bind), if any.
async fn existing_pv(
    shared: &Context,
    name: &str,
    pvc: &PersistentVolumeClaim,
) -> anyhow::Result<Option<PersistentVolume>> {
    let Some(pv) = shared.volumes.get(name) else {
        return Ok(None);
    };
    lock(&shared.created_pvs).remove(name);
    check_pv_is_for(&pv, pvc)?;
    Ok(Some((*pv).clone()))
}

/// Note a PV this process created, until the PV cache shows it (or
/// [`EXPECTATION_TTL`] passes: a missed event must not block the claim).
fn remember_created(shared: &Context, name: &str) {
    let mut created = lock(&shared.created_pvs);
    created.retain(|_, at| at.elapsed() < EXPECTATION_TTL);
    created.insert(name.to_owned(), Instant::now());
}

/// Did this process create the PV `name` so lately that the cache may not show it?
fn created_uncached(shared: &Context, name: &str) -> bool {
    lock(&shared.created_pvs)
        .get(name)
        .is_some_and(|at| at.elapsed() < EXPECTATION_TTL)
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn check_pv_is_for(pv: &PersistentVolume, pvc: &PersistentVolumeClaim) -> anyhow::Result<()> {
    let claim_uid = pv
        .spec
        .as_ref()
        .and_then(|s| s.claim_ref.as_ref())
        .and_then(|c| c.uid.as_deref());
    anyhow::ensure!(
        claim_uid == pvc.metadata.uid.as_deref(),
        "PV {} exists but belongs to another claim (uid {:?}); not touching it",
        pv.name_any(),
        claim_uid
    );
    Ok(())
}

async fn create_pv(
    shared: &Context,
    pv: &PersistentVolume,
    pvc: &PersistentVolumeClaim,
) -> anyhow::Result<PersistentVolume> {
    match volumes(shared).create(&PostParams::default(), pv).await {
        Ok(created) => Ok(created),
        Err(e) if is_api(&e, 409) => {
            let existing = volumes(shared)
                .get(&pv.name_any())
                .await
                .context("reading the PV that already exists")?;
            check_pv_is_for(&existing, pvc)?;
            Ok(existing)
        }
        Err(e) => Err(anyhow::Error::new(e).context(format!("creating PV {}", pv.name_any()))),
    }
}

/// Add the provisioning finalizer (guarded by the claim's resourceVersion); returns
/// the claim as written.
async fn add_finalizer(
    shared: &Context,
    pvc: &PersistentVolumeClaim,
    finalizer: &str,
    provisioner: &str,
) -> anyhow::Result<PersistentVolumeClaim> {
    if has_finalizer(pvc, finalizer) {
        return Ok(pvc.clone());
    }
    let mut finalizers = pvc.finalizers().to_vec();
    finalizers.push(finalizer.to_owned());
    // The PV controller's annotations too, as it writes them: once they are there it
    // has nothing left to write to this claim.
    let patch = json!({
        "metadata": {
            "finalizers": finalizers,
            "resourceVersion": pvc.metadata.resource_version,
            "annotations": {
                rules::ANN_STORAGE_PROVISIONER: provisioner,
                rules::ANN_BETA_STORAGE_PROVISIONER: provisioner,
            },
        }
    });
    claims(shared, pvc.namespace().as_deref().unwrap_or_default())
        .patch(
            &pvc.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .context("adding the provisioning finalizer to the claim")
        .inspect(|written| expect_written(shared, written))
}

/// Remove the provisioning finalizer, guarded by the claim's resourceVersion (the
/// other finalizers may move meanwhile). A conflict — the PV controller annotating the
/// claim, say — re-reads the claim and tries again.
async fn remove_finalizer(
    shared: &Context,
    pvc: &PersistentVolumeClaim,
    finalizer: &str,
) -> anyhow::Result<()> {
    let api = claims(shared, pvc.namespace().as_deref().unwrap_or_default());
    let mut current = pvc.clone();
    for _ in 0..3 {
        if !has_finalizer(&current, finalizer) || current.metadata.uid != pvc.metadata.uid {
            return Ok(());
        }
        let patch = json!({
            "metadata": {
                "finalizers": finalizers_without(&current, finalizer),
                "resourceVersion": current.metadata.resource_version,
            }
        });
        match api
            .patch(
                &current.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(written) => {
                expect_written(shared, &written);
                return Ok(());
            }
            Err(e) if is_api(&e, 404) => return Ok(()),
            Err(e) if is_api(&e, 409) => {
                match api
                    .get_opt(&current.name_any())
                    .await
                    .context("re-reading the claim")?
                {
                    Some(live) => current = live,
                    None => return Ok(()),
                }
            }
            Err(e) => {
                return Err(anyhow::Error::new(e).context("removing the provisioning finalizer"));
            }
        }
    }
    anyhow::bail!("the claim kept changing; its finalizer is removed on the next attempt")
}

/// A claim whose volume has its PV: drop our finalizer if it is still there.
async fn settle(
    shared: &Context,
    pvc: &PersistentVolumeClaim,
    finalizer: &str,
) -> anyhow::Result<Next> {
    if has_finalizer(pvc, finalizer) {
        remove_finalizer(shared, pvc, finalizer).await?;
    }
    Ok(Next::Done)
}

/// A claim deleted while we may have created its volume: if no PV took the volume
/// over, find the volume by name (CreateVolume is idempotent) and delete it, then let
/// the claim go.
async fn abandon(
    shared: &Context,
    pvc: &PersistentVolumeClaim,
    finalizer: &str,
) -> anyhow::Result<Next> {
    let name = rules::pv_name(pvc).map_err(anyhow::Error::msg)?;
    lock(&shared.unsaved_pvs).remove(&name);
    let has_pv = match volumes(shared).get_opt(&name).await? {
        Some(pv) => check_pv_is_for(&pv, pvc).is_ok(),
        None => false,
    };
    if !has_pv {
        let class = rules::claim_class(pvc).and_then(|n| shared.classes.get(&ObjectRef::new(n)));
        let request = match &class {
            Some(class) => create_request(shared, pvc, class, &name).await.ok(),
            None => None,
        };
        match request {
            None => {
                tracing::warn!(claim = %informer::key(pvc), "claim deleted while provisioning; its StorageClass or request is no longer valid, so a volume named {name} (if any) cannot be looked up");
                shared.events.warning(
                    pvc.object_ref(&()),
                    "ProvisioningCleanupFailed",
                    format!("claim deleted while provisioning and its StorageClass is gone: check the backend for a volume named {name}"),
                );
            }
            Some(request) => match shared.csi.create_volume(request).await {
                Ok(volume) => {
                    shared
                        .csi
                        .delete_volume(&volume.volume_id, HashMap::new())
                        .await
                        .map_err(|e| {
                            anyhow::Error::new(e).context("DeleteVolume of an abandoned volume")
                        })?;
                    tracing::info!(claim = %informer::key(pvc), volume = %volume.volume_id, "deleted the volume of a claim deleted while provisioning");
                }
                Err(e) if e.is_final() => {
                    tracing::info!(claim = %informer::key(pvc), error = %e, "claim deleted while provisioning; CreateVolume fails finally, so no volume exists");
                }
                Err(e) => {
                    return Err(anyhow::Error::new(e)
                        .context("CreateVolume (looking up an abandoned volume)"));
                }
            },
        }
    }
    remove_finalizer(shared, pvc, finalizer).await?;
    release_clone_source(shared, pvc).await?;
    Ok(Next::Done)
}

/// The CreateVolume request for a claim; `Err` is a message for ProvisioningFailed.
async fn create_request(
    shared: &Context,
    pvc: &PersistentVolumeClaim,
    class: &StorageClass,
    name: &str,
) -> Result<proto::CreateVolumeRequest, String> {
    let empty = BTreeMap::new();
    let class_parameters = class.parameters.as_ref().unwrap_or(&empty);
    let mut parameters = rules::create_parameters(class_parameters, pvc, name)?;
    rules::backend_for_provisioner(&mut parameters, &class.provisioner, &shared.driver)?;
    let required = rules::capacity_request(pvc)?;
    let modes = rules::access_modes(pvc)?;
    let fs_type = rules::fs_type(class_parameters);
    let mount_flags = class.mount_options.clone().unwrap_or_default();
    let volume_capabilities = modes
        .access_modes
        .iter()
        .map(|mode| capability(*mode, modes.block, fs_type.as_deref(), &mount_flags))
        .collect();
    let secrets = match rules::provisioner_secret(class_parameters, pvc, name)? {
        Some((namespace, name)) => crate::context::read_secret(&shared.client, &namespace, &name)
            .await
            .map_err(|e| format!("reading provisioner secret {namespace}/{name}: {e}"))?,
        None => HashMap::new(),
    };
    let accessibility_requirements = requirements(shared, pvc, class).await?;
    let volume_content_source = content_source(shared, pvc, required)?;
    let mutable_parameters = mutable_parameters(shared, pvc).await?;
    Ok(proto::CreateVolumeRequest {
        name: name.to_owned(),
        capacity_range: Some(proto::CapacityRange {
            required_bytes: required,
            limit_bytes: 0,
        }),
        volume_capabilities,
        parameters: hash_map(&parameters),
        secrets,
        volume_content_source,
        accessibility_requirements,
        mutable_parameters,
    })
}

/// The claim's data source as CSI names it: the snapshot handle of a ready
/// VolumeSnapshot of this driver (a restore), or the volume handle of a bound claim of
/// the same class (a clone); `Err` says what to fix (or wait for).
fn content_source(
    shared: &Context,
    pvc: &PersistentVolumeClaim,
    requested: i64,
) -> Result<Option<proto::VolumeContentSource>, String> {
    use proto::volume_content_source::{SnapshotSource, Type, VolumeSource};
    let Some(source) = pvc.spec.as_ref().and_then(rules::data_source) else {
        return Ok(None);
    };
    let namespace = pvc.namespace().unwrap_or_default();
    let kind = rules::source_kind(&source).ok_or_else(|| {
        format!(
            "data source kind {} is not one stowage provisions from",
            source.kind
        )
    })?;
    let r#type = match kind {
        rules::SourceKind::Snapshot => {
            let stores = shared.snapshot_stores.as_ref().ok_or(
                "the claim restores a VolumeSnapshot, but the API server serves no snapshot.storage.k8s.io/v1 (install the snapshot CRDs, then restart stowage)",
            )?;
            let key = format!("{namespace}/{}", source.name);
            let snapshot = informer::get(&stores.snapshots, &key)
                .ok_or_else(|| format!("VolumeSnapshot {key} does not exist"))?;
            let status = snapshot.status.clone().unwrap_or_default();
            if status.ready_to_use != Some(true) {
                return Err(format!("VolumeSnapshot {key} is not ready to use yet"));
            }
            let content_name = status
                .bound_volume_snapshot_content_name
                .ok_or_else(|| format!("VolumeSnapshot {key} is not bound to a content"))?;
            let content = stores
                .contents
                .get(&ObjectRef::new(&content_name))
                .ok_or_else(|| format!("VolumeSnapshotContent {content_name} does not exist"))?;
            if !shared.driver.contains(&content.spec.driver) {
                return Err(format!(
                    "VolumeSnapshot {key} is a snapshot of driver {}, not {}",
                    content.spec.driver, shared.driver
                ));
            }
            if let Some(size) = &status.restore_size {
                let size = rules::parse_quantity(&size.0)?;
                if size > requested {
                    return Err(format!(
                        "the claim asks for {requested} bytes, less than VolumeSnapshot {key}'s restoreSize ({size} bytes)"
                    ));
                }
            }
            let snapshot_id = content
                .status
                .as_ref()
                .and_then(|s| s.snapshot_handle.clone())
                .ok_or_else(|| {
                    format!("VolumeSnapshotContent {content_name} has no snapshot handle yet")
                })?;
            Type::Snapshot(SnapshotSource { snapshot_id })
        }
        rules::SourceKind::Claim => {
            let key = format!("{namespace}/{}", source.name);
            let source_pvc = shared
                .claims
                .get(&key)
                .ok_or_else(|| format!("the source claim {key} does not exist"))?;
            let source_pv = source_pvc
                .spec
                .as_ref()
                .and_then(|s| s.volume_name.as_deref())
                .and_then(|name| shared.volumes.get(name));
            let volume_id = rules::clone_source_handle(
                pvc,
                &source_pvc,
                source_pv.as_deref(),
                &shared.driver,
                requested,
            )?;
            Type::Volume(VolumeSource { volume_id })
        }
    };
    Ok(Some(proto::VolumeContentSource {
        r#type: Some(r#type),
    }))
}

/// A claim's VolumeAttributesClass at creation: its parameters are CreateVolume's
/// mutable parameters (the class must be this driver's).
async fn mutable_parameters(
    shared: &Context,
    pvc: &PersistentVolumeClaim,
) -> Result<HashMap<String, String>, String> {
    let Some(name) = pvc
        .spec
        .as_ref()
        .and_then(|s| s.volume_attributes_class_name.clone())
        .filter(|n| !n.is_empty())
    else {
        return Ok(HashMap::new());
    };
    let class = Api::<VolumeAttributesClass>::all(shared.client.clone())
        .get_opt(&name)
        .await
        .map_err(|e| format!("reading VolumeAttributesClass {name}: {e}"))?
        .ok_or_else(|| format!("VolumeAttributesClass {name} does not exist"))?;
    if !shared.driver.contains(&class.driver_name) {
        return Err(format!(
            "VolumeAttributesClass {name} is for driver {}, not {}",
            class.driver_name, shared.driver
        ));
    }
    Ok(class.parameters.unwrap_or_default().into_iter().collect())
}

/// Accessibility requirements, when the driver has topology: WaitForFirstConsumer →
/// the selected node's segments (its labels for the driver's CSINode topology keys);
/// Immediate → the class's allowedTopologies.
async fn requirements(
    shared: &Context,
    pvc: &PersistentVolumeClaim,
    class: &StorageClass,
) -> Result<Option<proto::TopologyRequirement>, String> {
    if !shared.csi.caps.topology {
        return Ok(None);
    }
    let selected = pvc
        .annotations()
        .get(rules::ANN_SELECTED_NODE)
        .filter(|n| !n.is_empty());
    let segments: Vec<Segments> = match selected {
        Some(node) => vec![node_segments(shared, node, &class.provisioner).await?],
        None => rules::allowed_topologies(class),
    };
    let topologies: Vec<proto::Topology> = segments
        .into_iter()
        .filter(|s| !s.is_empty())
        .map(|segments| proto::Topology {
            segments: hash_map(&segments),
        })
        .collect();
    if topologies.is_empty() {
        return Ok(None);
    }
    Ok(Some(proto::TopologyRequirement {
        requisite: topologies.clone(),
        preferred: topologies,
    }))
}

/// The selected node's segments for the topology keys the class's driver name
/// registered in its CSINode (the main name's where a node plugin registered only that).
async fn node_segments(
    shared: &Context,
    node: &str,
    provisioner: &str,
) -> Result<Segments, String> {
    let csi_node = Api::<CSINode>::all(shared.client.clone())
        .get_opt(node)
        .await
        .map_err(|e| format!("reading CSINode {node}: {e}"))?;
    let keys = csi_node
        .and_then(|n| {
            let drivers = n.spec.drivers;
            let named = |name: &str| drivers.iter().position(|d| d.name == name);
            let at = named(provisioner).or_else(|| named(&shared.driver.main))?;
            drivers.into_iter().nth(at)
        })
        .ok_or_else(|| {
            format!(
                "node {node} has no CSINode entry for driver {provisioner}: is the node plugin running there?"
            )
        })?
        .topology_keys
        .unwrap_or_default();
    if keys.is_empty() {
        return Ok(Segments::new());
    }
    let labels = Api::<Node>::all(shared.client.clone())
        .get(node)
        .await
        .map_err(|e| format!("reading node {node}: {e}"))?
        .metadata
        .labels
        .unwrap_or_default();
    keys.into_iter()
        .map(|key| match labels.get(&key) {
            Some(value) => Ok((key, value.clone())),
            None => Err(format!(
                "node {node} has no label {key} (a topology key of the driver)"
            )),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{
        Caches, DRIVER, FakeDriver, NFS_DRIVER, claim, class, fixture, pv_prebound_to, refused,
    };
    use tonic::Status;

    const CLAIMS: &str = "/api/v1/namespaces/default/persistentvolumeclaims";
    const PVS: &str = "/api/v1/persistentvolumes";

    fn lines(requests: &[crate::fixtures::Recorded]) -> Vec<String> {
        requests.iter().map(|r| r.line()).collect()
    }

    #[tokio::test]
    async fn a_claim_of_our_class_gets_a_volume_and_a_prebound_pv_and_no_bind_write() {
        let pvc = claim("default", "data-db-0", "u-0", "fast", "1Gi");
        let f = fixture(
            Caches {
                claims: vec![pvc.clone()],
                classes: vec![class("fast", DRIVER, &[("subDir", "${pvc.metadata.name}")])],
                ..Default::default()
            },
            FakeDriver::default(),
        )
        .await;

        let next = reconcile(Arc::clone(&f.context), "default/data-db-0".into())
            .await
            .expect("provisioned");
        assert_eq!(next, Next::Done);

        let creates = f.driver.creates();
        assert_eq!(creates.len(), 1, "one CreateVolume");
        let create = &creates[0];
        assert_eq!(create.name, "pvc-u-0");
        assert_eq!(
            create.capacity_range.as_ref().unwrap().required_bytes,
            1 << 30
        );
        assert_eq!(create.parameters["subDir"], "${pvc.metadata.name}");
        assert_eq!(create.parameters[stowage_api::keys::PVC_NAME], "data-db-0");
        assert_eq!(
            create.parameters[stowage_api::keys::PVC_NAMESPACE],
            "default"
        );

        // The finalizer guards the volume until its PV exists; the PV is pre-bound;
        // the claim's volumeName, bind annotations and phases are the PV controller's.
        let claim_path = format!("{CLAIMS}/data-db-0");
        assert_eq!(
            lines(&f.api.writes()),
            [
                format!("PATCH {claim_path}"),
                format!("POST {PVS}"),
                format!("PATCH {claim_path}"),
            ]
        );
        let writes = f.api.writes();
        let finalizer = provisioning_finalizer(DRIVER);
        assert_eq!(writes[0].body["metadata"]["finalizers"], json!([finalizer]));
        let pv = &writes[1].body;
        assert_eq!(pv["metadata"]["name"], "pvc-u-0");
        assert_eq!(pv["spec"]["claimRef"]["uid"], "u-0");
        assert_eq!(pv["spec"]["csi"]["driver"], DRIVER);
        assert_eq!(pv["spec"]["csi"]["volumeHandle"], "vol-pvc-u-0");
        for write in [&writes[0], &writes[2]] {
            assert!(write.body.get("spec").is_none(), "{:?}", write.body);
            assert!(write.body.get("status").is_none(), "{:?}", write.body);
        }
        let after: PersistentVolumeClaim = f.api.object(Some("default"), "data-db-0").unwrap();
        assert!(!has_finalizer(&after, &finalizer), "{:?}", after.metadata);
        assert!(f.api.event("ProvisioningSucceeded").await.is_some());
    }

    #[tokio::test]
    async fn a_claim_of_the_nfs_name_gets_an_nfs_volume_and_a_pv_under_that_name() {
        let pvc = claim("default", "shared", "u-5", "nfs-fast", "1Gi");
        let f = fixture(
            Caches {
                claims: vec![pvc],
                classes: vec![class("nfs-fast", NFS_DRIVER, &[])],
                ..Default::default()
            },
            FakeDriver::default(),
        )
        .await;
        reconcile(Arc::clone(&f.context), "default/shared".into())
            .await
            .expect("provisioned");
        let creates = f.driver.creates();
        assert_eq!(creates.len(), 1);
        assert_eq!(
            creates[0].parameters["backend"], "nfs",
            "the name picks the backend"
        );
        let writes = f.api.writes();
        // The finalizer is the main name's (one finalizer per claim, whatever the
        // name); the PV and the annotations name the class's provisioner.
        assert_eq!(
            writes[0].body["metadata"]["finalizers"],
            json!([provisioning_finalizer(DRIVER)])
        );
        assert_eq!(
            writes[0].body["metadata"]["annotations"][rules::ANN_STORAGE_PROVISIONER],
            NFS_DRIVER
        );
        let pv = &writes[1].body;
        assert_eq!(pv["spec"]["csi"]["driver"], NFS_DRIVER);
        assert_eq!(
            pv["metadata"]["annotations"][rules::ANN_PROVISIONED_BY],
            NFS_DRIVER
        );
    }

    #[tokio::test]
    async fn a_class_of_the_nfs_name_asking_for_another_backend_is_refused_before_any_call() {
        let pvc = claim("default", "wrong", "u-6", "nfs-ebs", "1Gi");
        let f = fixture(
            Caches {
                claims: vec![pvc],
                classes: vec![class("nfs-ebs", NFS_DRIVER, &[("backend", "ebs")])],
                ..Default::default()
            },
            FakeDriver::default(),
        )
        .await;
        let error = reconcile(Arc::clone(&f.context), "default/wrong".into())
            .await
            .expect_err("refused");
        assert!(
            format!("{error:#}").contains(&format!("use provisioner {DRIVER} for ebs volumes")),
            "{error:#}"
        );
        assert!(f.driver.creates().is_empty(), "no CreateVolume");
        assert!(f.api.writes().is_empty(), "{:?}", lines(&f.api.writes()));
        let event = f.api.event("ProvisioningFailed").await.expect("an event");
        let message = event["note"].as_str().unwrap_or_default();
        assert!(message.contains("serves NFS volumes only"), "{event}");
    }

    #[tokio::test]
    async fn a_claim_of_another_provisioner_is_not_touched() {
        let pvc = claim("default", "other", "u-1", "theirs", "1Gi");
        let f = fixture(
            Caches {
                claims: vec![pvc],
                classes: vec![class("theirs", "ebs.csi.aws.com", &[])],
                ..Default::default()
            },
            FakeDriver::default(),
        )
        .await;
        let next = reconcile(Arc::clone(&f.context), "default/other".into())
            .await
            .expect("skipped");
        assert_eq!(next, Next::Done);
        assert!(f.driver.creates().is_empty());
        assert!(
            f.api.requests().is_empty(),
            "{:?}",
            lines(&f.api.requests())
        );
    }

    #[tokio::test]
    async fn a_claim_a_pv_is_prebound_to_is_left_to_the_pv_controller() {
        let pvc = claim("default", "static", "u-2", "fast", "1Gi");
        let f = fixture(
            Caches {
                claims: vec![pvc.clone()],
                volumes: vec![pv_prebound_to("handmade", &pvc)],
                classes: vec![class("fast", DRIVER, &[])],
                ..Default::default()
            },
            FakeDriver::default(),
        )
        .await;
        let next = reconcile(Arc::clone(&f.context), "default/static".into())
            .await
            .expect("skipped");
        assert_eq!(next, Next::Done);
        assert!(f.driver.creates().is_empty());
        assert!(
            f.api.requests().is_empty(),
            "{:?}",
            lines(&f.api.requests())
        );
    }

    #[tokio::test]
    async fn a_final_create_error_releases_the_finalizer_and_says_why() {
        let pvc = claim("default", "bad", "u-3", "fast", "1Gi");
        let f = fixture(
            Caches {
                claims: vec![pvc],
                classes: vec![class("fast", DRIVER, &[])],
                ..Default::default()
            },
            FakeDriver::answering(|_| Err(refused("parameter `sever` is not known"))),
        )
        .await;
        let error = reconcile(Arc::clone(&f.context), "default/bad".into())
            .await
            .expect_err("the driver refused");
        assert!(format!("{error:#}").contains("sever"), "{error:#}");
        assert_eq!(f.driver.creates().len(), 1);
        let claim_path = format!("{CLAIMS}/bad");
        assert_eq!(
            lines(&f.api.writes()),
            [format!("PATCH {claim_path}"), format!("PATCH {claim_path}")],
            "finalizer on, then off; no PV"
        );
        let after: PersistentVolumeClaim = f.api.object(Some("default"), "bad").unwrap();
        assert!(!has_finalizer(&after, &provisioning_finalizer(DRIVER)));
        let event = f.api.event("ProvisioningFailed").await.expect("a warning");
        assert_eq!(event["type"], "Warning");
        assert!(event["note"].as_str().unwrap().contains("sever"), "{event}");
    }

    #[tokio::test]
    async fn a_claim_written_meanwhile_is_not_overwritten() {
        // The cache holds resourceVersion 1; the server has moved on (someone else wrote
        // the claim): the guarded finalizer write fails and nothing is created.
        let pvc = claim("default", "raced", "u-4", "fast", "1Gi");
        let f = fixture(
            Caches {
                claims: vec![pvc.clone()],
                classes: vec![class("fast", DRIVER, &[])],
                ..Default::default()
            },
            FakeDriver::default(),
        )
        .await;
        let mut newer = pvc;
        newer.metadata.resource_version = Some("7".into());
        f.api.seed(&newer);
        let result = reconcile(Arc::clone(&f.context), "default/raced".into()).await;
        assert!(result.is_err(), "{result:?}");
        assert!(
            f.driver.creates().is_empty(),
            "no CreateVolume without the finalizer"
        );
        assert!(
            f.api
                .writes()
                .iter()
                .all(|w| w.method != http::Method::POST),
            "{:?}",
            lines(&f.api.writes())
        );
    }

    #[tokio::test]
    async fn no_capacity_on_the_selected_node_hands_the_claim_back_to_the_scheduler() {
        let mut pvc = claim("default", "wffc", "u-5", "late", "1Gi");
        pvc.metadata
            .annotations
            .get_or_insert_default()
            .insert(rules::ANN_SELECTED_NODE.to_owned(), "node-full".to_owned());
        let mut late = class("late", DRIVER, &[]);
        late.volume_binding_mode = Some(rules::BINDING_WAIT_FOR_FIRST_CONSUMER.to_owned());
        let full = || {
            Err(Status::new(
                tonic::Code::ResourceExhausted,
                "no room in zone a",
            ))
        };
        let f = fixture(
            Caches {
                claims: vec![pvc],
                classes: vec![late],
                ..Default::default()
            },
            FakeDriver::answering(move |_| full()),
        )
        .await;
        let next = reconcile(Arc::clone(&f.context), "default/wffc".into())
            .await
            .expect("rescheduled, not an error to retry");
        assert_eq!(next, Next::Done);
        let after: PersistentVolumeClaim = f.api.object(Some("default"), "wffc").unwrap();
        assert!(
            !after.annotations().contains_key(rules::ANN_SELECTED_NODE),
            "{:?}",
            after.metadata.annotations
        );
        assert!(!has_finalizer(&after, &provisioning_finalizer(DRIVER)));
        let event = f.api.event("ProvisioningFailed").await.expect("a warning");
        assert!(
            event["note"].as_str().unwrap().contains("node-full"),
            "{event}"
        );
    }

    #[tokio::test]
    async fn no_capacity_for_an_immediate_claim_is_retried() {
        let pvc = claim("default", "now", "u-6", "fast", "1Gi");
        let full = || Err(Status::new(tonic::Code::ResourceExhausted, "no room"));
        let f = fixture(
            Caches {
                claims: vec![pvc],
                classes: vec![class("fast", DRIVER, &[])],
                ..Default::default()
            },
            FakeDriver::answering(move |_| full()),
        )
        .await;
        let result = reconcile(Arc::clone(&f.context), "default/now".into()).await;
        assert!(result.is_err(), "retried with backoff: {result:?}");
        let after: PersistentVolumeClaim = f.api.object(Some("default"), "now").unwrap();
        assert!(
            has_finalizer(&after, &provisioning_finalizer(DRIVER)),
            "in progress: the finalizer stays"
        );
    }

    #[test]
    fn finalizer_is_a_qualified_name_under_the_driver() {
        assert_eq!(
            provisioning_finalizer("stowage.csi.dev"),
            "stowage.csi.dev/provisioning"
        );
    }
}
