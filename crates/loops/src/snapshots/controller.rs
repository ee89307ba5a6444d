//! The common snapshot-controller's part, for the VolumeSnapshots of this driver (the
//! bound content's driver, or the claim's PV's): run it only where the cluster runs
//! no upstream snapshot-controller (`--loops snapshot-controller`, chart value
//! `snapshots.controller`), never both on one object.
//!
//! - Dynamic (`source.persistentVolumeClaimName`): once the claim is bound to a PV of
//!   this driver, the VolumeSnapshot gets its finalizers, the claim its
//!   `pvc-as-source-protection` (until the snapshot is ready), and the content
//!   `snapcontent-<uid>` is made with the class's deletion policy and the PV's handle.
//! - Pre-provisioned (`source.volumeSnapshotContentName`): the content must name this
//!   VolumeSnapshot; its ref gets the uid.
//! - The status mirrors the content's (ready, restore size, creation time, error).
//! - Deleted: kept while an unbound claim is being restored from it; then its content
//!   is deleted (policy Delete: the sidecar part deletes the snapshot, the content's
//!   finalizer holds it until then) or left (Retain), and the finalizers go.

use std::sync::Arc;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::{ObjectReference, PersistentVolumeClaim};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource as _, ResourceExt as _};
use serde_json::json;

use super::types::*;
use super::{SnapshotStores, content_name, pick_class};
use crate::cache::UNBOUND;
use crate::context::{Context, Next, finalizers_without, is_api, patch_status_guarded};
use crate::informer::{self, Expect};

fn snapshots(shared: &Context, namespace: &str) -> Api<VolumeSnapshot> {
    Api::namespaced(shared.client.clone(), namespace)
}

fn contents(shared: &Context) -> Api<VolumeSnapshotContent> {
    Api::all(shared.client.clone())
}

fn expect_written(shared: &Context, written: &VolumeSnapshot) {
    if let Some(version) = &written.metadata.resource_version {
        shared
            .expect
            .snapshots
            .expect(&informer::key(written), Expect::Version(version.clone()));
    }
}

/// Does a claim wait to be restored from the VolumeSnapshot `namespace/name`?
pub fn restores_from(pvc: &PersistentVolumeClaim, namespace: &str, name: &str) -> bool {
    pvc.metadata.namespace.as_deref() == Some(namespace)
        && pvc.spec.as_ref().is_some_and(|spec| {
            spec.volume_name.as_deref().is_none_or(str::is_empty)
                && crate::rules::data_source(spec).is_some_and(|source| {
                    source.kind == "VolumeSnapshot"
                        && source.api_group.as_deref() == Some(GROUP)
                        && source.name == name
                })
        })
}

/// The name of the content a VolumeSnapshot is (or will be) bound to.
fn bound_content_name(vs: &VolumeSnapshot) -> Option<String> {
    vs.status
        .as_ref()
        .and_then(|s| s.bound_volume_snapshot_content_name.clone())
        .or_else(|| vs.spec.source.volume_snapshot_content_name.clone())
        .or_else(|| vs.metadata.uid.as_deref().map(content_name))
}

/// The claim a dynamic VolumeSnapshot snapshots, and the CSI handle and driver of its PV.
fn source_volume(
    shared: &Context,
    vs: &VolumeSnapshot,
    claim_name: &str,
) -> Result<(Arc<PersistentVolumeClaim>, String, String, Option<String>), String> {
    let namespace = vs.namespace().unwrap_or_default();
    let pvc = shared
        .claims
        .get(&format!("{namespace}/{claim_name}"))
        .ok_or_else(|| format!("claim {namespace}/{claim_name} does not exist"))?;
    let pv_name = pvc
        .spec
        .as_ref()
        .and_then(|s| s.volume_name.clone())
        .filter(|v| !v.is_empty())
        .ok_or_else(|| format!("claim {namespace}/{claim_name} is not bound yet"))?;
    let pv = shared.volumes.get(&pv_name).ok_or_else(|| {
        format!("PV {pv_name} of claim {namespace}/{claim_name} is not known yet")
    })?;
    let spec = pv.spec.as_ref();
    let csi = spec
        .and_then(|s| s.csi.as_ref())
        .ok_or_else(|| format!("PV {pv_name} is not a CSI volume"))?;
    Ok((
        pvc,
        csi.driver.clone(),
        csi.volume_handle.clone(),
        spec.and_then(|s| s.volume_mode.clone()),
    ))
}

/// Is this VolumeSnapshot this driver's?
fn is_ours(shared: &Context, stores: &SnapshotStores, vs: &VolumeSnapshot) -> bool {
    if let Some(content) =
        bound_content_name(vs).and_then(|n| stores.contents.get(&ObjectRef::new(&n)))
    {
        return shared.driver.contains(&content.spec.driver);
    }
    if vs.spec.source.volume_snapshot_content_name.is_some() {
        // Pre-provisioned, its content not cached yet: unknown until it is.
        return false;
    }
    match &vs.spec.source.persistent_volume_claim_name {
        Some(claim) => match source_volume(shared, vs, claim) {
            Ok((_, driver, _, _)) => shared.driver.contains(&driver),
            // Not bound yet: the class says whose it will be.
            Err(_) => vs
                .spec
                .volume_snapshot_class_name
                .as_deref()
                .and_then(|c| stores.classes.get(&ObjectRef::new(c)))
                .is_some_and(|class| shared.driver.contains(&class.driver)),
        },
        None => false,
    }
}

/// Reconcile the VolumeSnapshot `namespace/name`.
pub async fn reconcile(shared: Arc<Context>, key: String) -> anyhow::Result<Next> {
    let Some(stores) = shared.snapshot_stores.clone() else {
        return Ok(Next::Done);
    };
    let Some(vs) = informer::get(&stores.snapshots, &key) else {
        return Ok(Next::Done);
    };
    if !is_ours(&shared, &stores, &vs) {
        return Ok(Next::Done);
    }
    if vs.metadata.deletion_timestamp.is_some() {
        return deleted(&shared, &stores, &vs).await;
    }
    let uid = vs.metadata.uid.clone().unwrap_or_default();
    let content = match vs.spec.source.volume_snapshot_content_name.clone() {
        Some(name) => match bind_pre_provisioned(&shared, &stores, &vs, &name).await? {
            Some(content) => content,
            None => return Ok(Next::Done),
        },
        None => {
            let Some(claim) = vs.spec.source.persistent_volume_claim_name.clone() else {
                let message = "spec.source names neither persistentVolumeClaimName nor volumeSnapshotContentName";
                write_error(&shared, &vs, message).await?;
                anyhow::bail!("VolumeSnapshot {key}: {message}");
            };
            match stores.contents.get(&ObjectRef::new(&content_name(&uid))) {
                Some(content) => content,
                None => return make_content(&shared, &stores, &vs, &claim).await,
            }
        }
    };
    if content.spec.volume_snapshot_ref.uid.as_deref() != Some(uid.as_str()) {
        let message = format!(
            "VolumeSnapshotContent {} is bound to another VolumeSnapshot (uid {:?})",
            content.name_any(),
            content.spec.volume_snapshot_ref.uid
        );
        write_error(&shared, &vs, &message).await?;
        anyhow::bail!(message);
    }
    mirror_status(&shared, &stores, &vs, &content).await
}

/// A dynamic VolumeSnapshot without its content yet: finalizers, the claim's
/// protection, then the content.
async fn make_content(
    shared: &Context,
    stores: &SnapshotStores,
    vs: &VolumeSnapshot,
    claim: &str,
) -> anyhow::Result<Next> {
    let (pvc, driver, handle, mode) = match source_volume(shared, vs, claim) {
        Ok(found) => found,
        Err(message) => {
            // The claim's binding (a claim event) brings this back.
            tracing::debug!(snapshot = %informer::key(vs), %message, "waiting for the source");
            write_error(shared, vs, &message).await?;
            return Ok(Next::Done);
        }
    };
    if !shared.driver.contains(&driver) {
        return Ok(Next::Done);
    }
    let classes = stores.classes.state();
    let class = match pick_class(
        vs.spec.volume_snapshot_class_name.as_deref(),
        &classes,
        &driver,
    ) {
        Ok(class) => class.clone(),
        Err(message) => {
            shared.events.warning(
                vs.object_ref(&()),
                "SnapshotCreationFailed",
                message.clone(),
            );
            write_error(shared, vs, &message).await?;
            anyhow::bail!(message);
        }
    };
    let missing: Vec<&str> = [FINALIZER_AS_SOURCE, FINALIZER_BOUND]
        .into_iter()
        .filter(|f| !vs.finalizers().iter().any(|have| have == f))
        .collect();
    if !missing.is_empty() {
        let mut finalizers = vs.finalizers().to_vec();
        finalizers.extend(missing.iter().map(|f| (*f).to_owned()));
        let patch = json!({
            "metadata": {"finalizers": finalizers, "resourceVersion": vs.metadata.resource_version}
        });
        let written = snapshots(shared, &vs.namespace().unwrap_or_default())
            .patch(
                &vs.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .context("adding the VolumeSnapshot's finalizers")?;
        expect_written(shared, &written);
        return Ok(Next::Again);
    }
    protect_claim(shared, &pvc).await?;
    let uid = vs.metadata.uid.clone().unwrap_or_default();
    let name = content_name(&uid);
    let content = VolumeSnapshotContent {
        api_version: Some(format!("{GROUP}/{VERSION}")),
        kind: Some("VolumeSnapshotContent".into()),
        metadata: ObjectMeta {
            name: Some(name.clone()),
            ..Default::default()
        },
        spec: VolumeSnapshotContentSpec {
            volume_snapshot_ref: ObjectReference {
                api_version: Some(format!("{GROUP}/{VERSION}")),
                kind: Some("VolumeSnapshot".into()),
                namespace: vs.namespace(),
                name: Some(vs.name_any()),
                uid: Some(uid.clone()),
                resource_version: vs.metadata.resource_version.clone(),
                ..Default::default()
            },
            deletion_policy: class.deletion_policy.clone(),
            driver: driver.clone(),
            volume_snapshot_class_name: class.metadata.name.clone(),
            source: VolumeSnapshotContentSource {
                volume_handle: Some(handle.clone()),
                snapshot_handle: None,
            },
            source_volume_mode: Some(mode.unwrap_or_else(|| "Filesystem".into())),
        },
        status: None,
    };
    match contents(shared)
        .create(&PostParams::default(), &content)
        .await
    {
        Ok(_) => {
            shared.events.normal(
                vs.object_ref(&()),
                "CreatingSnapshot",
                format!(
                    "Waiting for a snapshot {} to be created by the CSI driver",
                    informer::key(vs)
                ),
            );
        }
        Err(e) if is_api(&e, 409) => {}
        Err(e) => return Err(anyhow::Error::new(e).context(format!("creating {name}"))),
    }
    let patch = json!({"status": {"boundVolumeSnapshotContentName": name, "readyToUse": false}});
    if let Some(written) = patch_status_guarded(
        &snapshots(shared, &vs.namespace().unwrap_or_default()),
        vs,
        &patch,
        |live| {
            live.status
                .as_ref()
                .and_then(|s| s.bound_volume_snapshot_content_name.as_ref())
                .is_none()
        },
    )
    .await
    .context("writing the VolumeSnapshot's bound content")?
    {
        expect_written(shared, &written);
    }
    Ok(Next::Done)
}

/// A pre-provisioned VolumeSnapshot: its content must name it; the content's ref gets
/// this VolumeSnapshot's uid; the bound finalizer goes on. `None`: not bindable yet.
async fn bind_pre_provisioned(
    shared: &Context,
    stores: &SnapshotStores,
    vs: &VolumeSnapshot,
    name: &str,
) -> anyhow::Result<Option<Arc<VolumeSnapshotContent>>> {
    let Some(content) = stores.contents.get(&ObjectRef::new(name)) else {
        write_error(
            shared,
            vs,
            &format!("VolumeSnapshotContent {name} does not exist"),
        )
        .await?;
        return Ok(None);
    };
    let reference = &content.spec.volume_snapshot_ref;
    if reference.namespace != vs.namespace() || reference.name.as_deref() != Some(&vs.name_any()) {
        let message = format!(
            "VolumeSnapshotContent {name} names VolumeSnapshot {}/{}, not this one",
            reference.namespace.clone().unwrap_or_default(),
            reference.name.clone().unwrap_or_default()
        );
        write_error(shared, vs, &message).await?;
        anyhow::bail!(message);
    }
    if !vs.finalizers().iter().any(|f| f == FINALIZER_BOUND) {
        let mut finalizers = vs.finalizers().to_vec();
        finalizers.push(FINALIZER_BOUND.to_owned());
        let patch = json!({
            "metadata": {"finalizers": finalizers, "resourceVersion": vs.metadata.resource_version}
        });
        let written = snapshots(shared, &vs.namespace().unwrap_or_default())
            .patch(
                &vs.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .context("adding the VolumeSnapshot's finalizer")?;
        expect_written(shared, &written);
        return Ok(None);
    }
    if reference.uid.as_deref().is_none_or(str::is_empty) {
        let patch = json!({
            "metadata": {"resourceVersion": content.metadata.resource_version},
            "spec": {"volumeSnapshotRef": {"uid": vs.metadata.uid}}
        });
        contents(shared)
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .context("binding the content to its VolumeSnapshot")?;
        // The content's event brings this VolumeSnapshot back.
        return Ok(None);
    }
    Ok(Some(content))
}

/// The VolumeSnapshot's status as its content's says; the claim's protection goes
/// once the snapshot is ready.
async fn mirror_status(
    shared: &Context,
    stores: &SnapshotStores,
    vs: &VolumeSnapshot,
    content: &VolumeSnapshotContent,
) -> anyhow::Result<Next> {
    let from = content.status.clone().unwrap_or_default();
    let ready = from.ready_to_use.unwrap_or(false);
    let wanted = VolumeSnapshotStatus {
        bound_volume_snapshot_content_name: Some(content.name_any()),
        creation_time: from.creation_time.and_then(|ns| {
            k8s_openapi::jiff::Timestamp::from_nanosecond(i128::from(ns))
                .ok()
                .map(Time)
        }),
        ready_to_use: Some(ready),
        restore_size: from.restore_size.map(|bytes| Quantity(bytes.to_string())),
        error: from.error.clone(),
    };
    let current = vs.status.clone().unwrap_or_default();
    if current != wanted {
        let mut status = serde_json::to_value(&wanted)?;
        if wanted.error.is_none() {
            // An error from before (a missing class, a failed attempt) goes once the
            // content has none: a merge patch keeps any field it does not name.
            status["error"] = serde_json::Value::Null;
        }
        let patch = json!({ "status": status });
        let namespace = vs.namespace().unwrap_or_default();
        if let Some(written) =
            patch_status_guarded(&snapshots(shared, &namespace), vs, &patch, |_| true)
                .await
                .context("writing the VolumeSnapshot's status")?
        {
            expect_written(shared, &written);
            if ready && current.ready_to_use != Some(true) {
                shared.events.normal(
                    vs.object_ref(&()),
                    "SnapshotReady",
                    format!("Snapshot {} is ready to use", informer::key(vs)),
                );
            }
        }
    }
    if ready {
        release_claim(shared, stores, vs).await?;
    }
    Ok(Next::Done)
}

/// A deleted VolumeSnapshot: wait for restores from it, delete (or leave) its
/// content, then let it go.
async fn deleted(
    shared: &Context,
    stores: &SnapshotStores,
    vs: &VolumeSnapshot,
) -> anyhow::Result<Next> {
    let ours = [FINALIZER_AS_SOURCE, FINALIZER_BOUND];
    if !vs.finalizers().iter().any(|f| ours.contains(&f.as_str())) {
        return Ok(Next::Done);
    }
    let namespace = vs.namespace().unwrap_or_default();
    let name = vs.name_any();
    if let Some(claim) = shared
        .claims
        .find_tagged(UNBOUND, |pvc| restores_from(pvc, &namespace, &name))
    {
        // The claim's binding brings this back.
        tracing::info!(snapshot = %informer::key(vs), claim = %informer::key(claim.as_ref()), "deleted VolumeSnapshot kept while a claim is restored from it");
        return Ok(Next::Done);
    }
    let content = bound_content_name(vs)
        .and_then(|n| stores.contents.get(&ObjectRef::new(&n)))
        .filter(|c| c.spec.volume_snapshot_ref.uid == vs.metadata.uid);
    if let Some(content) = content
        && content.spec.deletion_policy == DELETE
    {
        if content.metadata.deletion_timestamp.is_none() {
            let patch = json!({
                "metadata": {"annotations": {ANN_BEING_DELETED: "yes"}}
            });
            contents(shared)
                .patch(
                    &content.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
                .context("marking the content as being deleted")?;
            match contents(shared)
                .delete(&content.name_any(), &DeleteParams::default())
                .await
            {
                Ok(_) => {}
                Err(e) if is_api(&e, 404) => {}
                Err(e) => return Err(anyhow::Error::new(e).context("deleting the content")),
            }
        }
        // The content's removal (after DeleteSnapshot) brings this back.
        return Ok(Next::Done);
    }
    release_claim(shared, stores, vs).await?;
    let remaining: Vec<&String> = vs
        .finalizers()
        .iter()
        .filter(|f| !ours.contains(&f.as_str()))
        .collect();
    let patch = json!({
        "metadata": {"finalizers": remaining, "resourceVersion": vs.metadata.resource_version}
    });
    match snapshots(shared, &namespace)
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(written) => expect_written(shared, &written),
        Err(e) if is_api(&e, 404) => {}
        Err(e) => {
            return Err(anyhow::Error::new(e).context("removing the VolumeSnapshot's finalizers"));
        }
    }
    Ok(Next::Done)
}

/// The source claim keeps `pvc-as-source-protection` while a snapshot of it is made.
async fn protect_claim(shared: &Context, pvc: &PersistentVolumeClaim) -> anyhow::Result<()> {
    if pvc.finalizers().iter().any(|f| f == FINALIZER_PVC_SOURCE) {
        return Ok(());
    }
    let mut finalizers = pvc.finalizers().to_vec();
    finalizers.push(FINALIZER_PVC_SOURCE.to_owned());
    let patch = json!({
        "metadata": {"finalizers": finalizers, "resourceVersion": pvc.metadata.resource_version}
    });
    Api::<PersistentVolumeClaim>::namespaced(
        shared.client.clone(),
        &pvc.namespace().unwrap_or_default(),
    )
    .patch(
        &pvc.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .context("protecting the snapshot's source claim")?;
    Ok(())
}

/// Drop the source claim's protection once no snapshot of it is still being made.
async fn release_claim(
    shared: &Context,
    stores: &SnapshotStores,
    vs: &VolumeSnapshot,
) -> anyhow::Result<()> {
    let Some(claim) = vs.spec.source.persistent_volume_claim_name.as_deref() else {
        return Ok(());
    };
    let namespace = vs.namespace().unwrap_or_default();
    let Some(pvc) = shared.claims.get(&format!("{namespace}/{claim}")) else {
        return Ok(());
    };
    if !pvc.finalizers().iter().any(|f| f == FINALIZER_PVC_SOURCE) {
        return Ok(());
    }
    let others_in_progress = stores.snapshots.state().iter().any(|other| {
        other.metadata.uid != vs.metadata.uid
            && other.metadata.namespace.as_deref() == Some(namespace.as_str())
            && other.spec.source.persistent_volume_claim_name.as_deref() == Some(claim)
            && other.metadata.deletion_timestamp.is_none()
            && other.status.as_ref().and_then(|s| s.ready_to_use) != Some(true)
    });
    if others_in_progress {
        return Ok(());
    }
    let patch = json!({
        "metadata": {
            "finalizers": finalizers_without(pvc.as_ref(), FINALIZER_PVC_SOURCE),
            "resourceVersion": pvc.metadata.resource_version,
        }
    });
    match Api::<PersistentVolumeClaim>::namespaced(shared.client.clone(), &namespace)
        .patch(claim, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if is_api(&e, 404) || is_api(&e, 409) => Ok(()),
        Err(e) => Err(anyhow::Error::new(e).context("releasing the snapshot's source claim")),
    }
}

async fn write_error(shared: &Context, vs: &VolumeSnapshot, message: &str) -> anyhow::Result<()> {
    let same = vs
        .status
        .as_ref()
        .and_then(|s| s.error.as_ref())
        .and_then(|e| e.message.as_deref())
        == Some(message);
    if same {
        return Ok(());
    }
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let patch =
        json!({"status": {"readyToUse": false, "error": {"message": message, "time": now}}});
    let namespace = vs.namespace().unwrap_or_default();
    if let Some(written) =
        patch_status_guarded(&snapshots(shared, &namespace), vs, &patch, |_| true)
            .await
            .context("writing the VolumeSnapshot's error")?
    {
        expect_written(shared, &written);
    }
    Ok(())
}
