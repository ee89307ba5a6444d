//! The csi-snapshotter sidecar's part: VolumeSnapshotContents of this driver ↔ CSI.
//!
//! - Dynamic content (`source.volumeHandle`): the finalizer (policy Delete) and the
//!   `volumesnapshot-being-created` annotation go on first, in one write; then
//!   CreateSnapshot `snapshot-<VolumeSnapshot uid>` and the status from its answer. A
//!   snapshot not ready yet is asked for again (CreateSnapshot is idempotent by name)
//!   until it is; then the annotation comes off. A crash between CreateSnapshot and the
//!   status write repeats CreateSnapshot with the same name: the same snapshot, written
//!   once.
//! - Pre-provisioned content (`source.snapshotHandle`): ListSnapshots of that id.
//! - Deleted content: with policy Delete, DeleteSnapshot of its handle (or, when the
//!   handle was never written but CreateSnapshot was called, of the snapshot a repeated
//!   CreateSnapshot names), then the finalizer goes. Retain: the finalizer goes.
//!
//! Writes only contents (metadata and status), events and nothing else.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource as _, ResourceExt as _};
use serde_json::json;

use super::types::*;
use super::{snapshot_name, snapshot_parameters, snapshot_secret};
use crate::context::{Context, Next, finalizers_without, hash_map, patch_status_guarded};
use crate::informer::{self, Expect};
use stowage_api::proto::csi as proto;

fn api(shared: &Context) -> Api<VolumeSnapshotContent> {
    Api::all(shared.client.clone())
}

fn has_finalizer(content: &VolumeSnapshotContent, finalizer: &str) -> bool {
    content.finalizers().iter().any(|f| f == finalizer)
}

fn annotated(content: &VolumeSnapshotContent, annotation: &str) -> bool {
    content
        .annotations()
        .get(annotation)
        .is_some_and(|v| v == "yes")
}

fn expect_written(shared: &Context, written: &VolumeSnapshotContent) {
    if let Some(version) = &written.metadata.resource_version {
        shared
            .expect
            .contents
            .expect(&informer::key(written), Expect::Version(version.clone()));
    }
}

/// How long a snapshot that is not ready yet waits before it is asked for again.
fn poll(shared: &Context) -> Duration {
    shared
        .settings
        .backoff
        .start
        .max(Duration::from_millis(500))
}

/// Reconcile the VolumeSnapshotContent `name`.
pub async fn reconcile(shared: Arc<Context>, key: String) -> anyhow::Result<Next> {
    let Some(stores) = shared.snapshot_stores.as_ref() else {
        return Ok(Next::Done);
    };
    let Some(content) = informer::get(&stores.contents, &key) else {
        return Ok(Next::Done);
    };
    if !shared.driver.contains(&content.spec.driver) {
        return Ok(Next::Done);
    }
    let class = content
        .spec
        .volume_snapshot_class_name
        .as_deref()
        .and_then(|name| stores.classes.get(&ObjectRef::new(name)));
    let secrets = match snapshot_secret(class.as_deref()) {
        Some((namespace, name)) => crate::context::read_secret(&shared.client, &namespace, &name)
            .await
            .with_context(|| format!("reading snapshotter secret {namespace}/{name}"))?,
        None => Default::default(),
    };
    let delete_policy = content.spec.deletion_policy == DELETE;
    if content.metadata.deletion_timestamp.is_some() {
        if !has_finalizer(&content, FINALIZER_CONTENT) {
            return Ok(Next::Done);
        }
        if delete_policy {
            delete_snapshot(&shared, &content, class.as_deref(), &secrets).await?;
        }
        remove_finalizer(&shared, &content).await?;
        return Ok(Next::Done);
    }
    if let Some(handle) = content.spec.source.snapshot_handle.clone() {
        return pre_provisioned(&shared, &content, &handle).await;
    }
    let Some(volume) = content.spec.source.volume_handle.clone() else {
        let message = "the content names neither source.volumeHandle nor source.snapshotHandle";
        write_error(&shared, &content, message).await?;
        anyhow::bail!("VolumeSnapshotContent {key}: {message}");
    };
    let status = content.status.clone().unwrap_or_default();
    if status.ready_to_use == Some(true) && status.snapshot_handle.is_some() {
        if annotated(&content, ANN_BEING_CREATED) {
            unannotate(&shared, &content).await?;
        }
        return Ok(Next::Done);
    }
    // Protect the snapshot-to-be before asking for it.
    let needs_finalizer = delete_policy && !has_finalizer(&content, FINALIZER_CONTENT);
    if needs_finalizer || !annotated(&content, ANN_BEING_CREATED) {
        let mut finalizers = content.finalizers().to_vec();
        if needs_finalizer {
            finalizers.push(FINALIZER_CONTENT.to_owned());
        }
        let patch = json!({
            "metadata": {
                "finalizers": finalizers,
                "annotations": { ANN_BEING_CREATED: "yes" },
                "resourceVersion": content.metadata.resource_version,
            }
        });
        let written = api(&shared)
            .patch(&key, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .context("marking the content as being created")?;
        expect_written(&shared, &written);
        return Ok(Next::Again);
    }
    let request = create_request(&content, class.as_deref(), &volume, secrets)?;
    let started = std::time::Instant::now();
    match shared.csi.create_snapshot(request).await {
        Ok(snapshot) => {
            let ready = snapshot.ready_to_use;
            write_status(&shared, &content, &snapshot).await?;
            if ready {
                shared.metrics.succeeded("snapshot", started);
                shared.events.normal(
                    content.object_ref(&()),
                    "SnapshotCreated",
                    format!(
                        "Snapshot {} of volume {volume} is ready",
                        snapshot.snapshot_id
                    ),
                );
                Ok(Next::Again)
            } else {
                Ok(Next::After(poll(&shared)))
            }
        }
        Err(e) => {
            shared
                .metrics
                .failed("snapshot", &format!("{:?}", e.code()));
            let message = format!(
                "failed to take snapshot of volume {volume}: {}",
                e.message()
            );
            shared.events.warning(
                content.object_ref(&()),
                "SnapshotCreationFailed",
                message.clone(),
            );
            write_error(&shared, &content, &message).await?;
            Err(anyhow::Error::new(e).context("CreateSnapshot"))
        }
    }
}

fn create_request(
    content: &VolumeSnapshotContent,
    class: Option<&VolumeSnapshotClass>,
    volume: &str,
    secrets: std::collections::HashMap<String, String>,
) -> anyhow::Result<proto::CreateSnapshotRequest> {
    let reference = &content.spec.volume_snapshot_ref;
    let uid = reference
        .uid
        .as_deref()
        .filter(|u| !u.is_empty())
        .context("the content's volumeSnapshotRef has no uid (it is not bound yet)")?;
    let mut parameters = snapshot_parameters(class);
    parameters.insert(
        PARAM_SNAPSHOT_NAME.to_owned(),
        reference.name.clone().unwrap_or_default(),
    );
    parameters.insert(
        PARAM_SNAPSHOT_NAMESPACE.to_owned(),
        reference.namespace.clone().unwrap_or_default(),
    );
    parameters.insert(PARAM_CONTENT_NAME.to_owned(), content.name_any());
    Ok(proto::CreateSnapshotRequest {
        source_volume_id: volume.to_owned(),
        name: snapshot_name(uid),
        secrets,
        parameters: hash_map(&parameters),
    })
}

/// The content's status from a snapshot as CSI describes it (guarded by the version
/// decided on; a conflict re-reads and writes again only while nobody else did).
async fn write_status(
    shared: &Context,
    content: &VolumeSnapshotContent,
    snapshot: &proto::Snapshot,
) -> anyhow::Result<()> {
    let created = snapshot
        .creation_time
        .as_ref()
        .map(|t| t.seconds.saturating_mul(1_000_000_000) + i64::from(t.nanos));
    let patch = json!({
        "status": {
            "snapshotHandle": snapshot.snapshot_id,
            "creationTime": created,
            "restoreSize": snapshot.size_bytes,
            "readyToUse": snapshot.ready_to_use,
            "error": null,
        }
    });
    let written = patch_status_guarded(&api(shared), content, &patch, |live| {
        live.metadata.deletion_timestamp.is_none()
    })
    .await
    .context("writing the content's status")?;
    if let Some(written) = written {
        expect_written(shared, &written);
    }
    Ok(())
}

async fn write_error(
    shared: &Context,
    content: &VolumeSnapshotContent,
    message: &str,
) -> anyhow::Result<()> {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let patch = json!({ "status": { "error": { "message": message, "time": now } } });
    if let Some(written) = patch_status_guarded(&api(shared), content, &patch, |_| true)
        .await
        .context("writing the content's error")?
    {
        expect_written(shared, &written);
    }
    Ok(())
}

async fn pre_provisioned(
    shared: &Context,
    content: &VolumeSnapshotContent,
    handle: &str,
) -> anyhow::Result<Next> {
    let status = content.status.clone().unwrap_or_default();
    if status.ready_to_use == Some(true) && status.snapshot_handle.as_deref() == Some(handle) {
        return Ok(Next::Done);
    }
    match shared.csi.get_snapshot(handle).await {
        Ok(Some(snapshot)) => {
            let ready = snapshot.ready_to_use;
            write_status(shared, content, &snapshot).await?;
            Ok(if ready {
                Next::Again
            } else {
                Next::After(poll(shared))
            })
        }
        Ok(None) => {
            let message = format!(
                "snapshot {handle} does not exist on driver {}",
                shared.driver
            );
            write_error(shared, content, &message).await?;
            anyhow::bail!(message)
        }
        Err(e) => Err(anyhow::Error::new(e).context("ListSnapshots")),
    }
}

/// DeleteSnapshot of the content's snapshot. Without a recorded handle, a content whose
/// CreateSnapshot was called (annotated) asks CreateSnapshot again for the handle
/// first: that snapshot exists and must not leak.
async fn delete_snapshot(
    shared: &Context,
    content: &VolumeSnapshotContent,
    class: Option<&VolumeSnapshotClass>,
    secrets: &std::collections::HashMap<String, String>,
) -> anyhow::Result<()> {
    let recorded = content
        .status
        .as_ref()
        .and_then(|s| s.snapshot_handle.clone())
        .or_else(|| content.spec.source.snapshot_handle.clone());
    let handle = match (recorded, content.spec.source.volume_handle.as_deref()) {
        (Some(handle), _) => Some(handle),
        (None, Some(volume)) if annotated(content, ANN_BEING_CREATED) => {
            let request = create_request(content, class, volume, secrets.clone())?;
            match shared.csi.create_snapshot(request).await {
                Ok(snapshot) => Some(snapshot.snapshot_id),
                Err(e) if e.is_final() => {
                    tracing::info!(content = %content.name_any(), error = %e, "no snapshot to delete: CreateSnapshot fails finally");
                    None
                }
                Err(e) => {
                    return Err(anyhow::Error::new(e)
                        .context("CreateSnapshot (finding the snapshot to delete)"));
                }
            }
        }
        (None, _) => None,
    };
    if let Some(handle) = handle {
        let started = std::time::Instant::now();
        if let Err(e) = shared.csi.delete_snapshot(&handle, secrets.clone()).await {
            shared
                .metrics
                .failed("delete-snapshot", &format!("{:?}", e.code()));
            shared.events.warning(
                content.object_ref(&()),
                "SnapshotDeleteError",
                format!("failed to delete snapshot {handle}: {}", e.message()),
            );
            return Err(anyhow::Error::new(e).context("DeleteSnapshot"));
        }
        shared.metrics.succeeded("delete-snapshot", started);
        tracing::info!(content = %content.name_any(), snapshot = %handle, "snapshot deleted");
    }
    Ok(())
}

async fn remove_finalizer(shared: &Context, content: &VolumeSnapshotContent) -> anyhow::Result<()> {
    let patch = json!({
        "metadata": {
            "finalizers": finalizers_without(content, FINALIZER_CONTENT),
            "resourceVersion": content.metadata.resource_version,
        }
    });
    match api(shared)
        .patch(
            &content.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(written) => {
            expect_written(shared, &written);
            Ok(())
        }
        Err(e) if crate::context::is_api(&e, 404) => Ok(()),
        Err(e) => Err(anyhow::Error::new(e).context("removing the content's finalizer")),
    }
}

async fn unannotate(shared: &Context, content: &VolumeSnapshotContent) -> anyhow::Result<()> {
    let patch = json!({
        "metadata": {
            "annotations": { ANN_BEING_CREATED: null },
            "resourceVersion": content.metadata.resource_version,
        }
    });
    let written = api(shared)
        .patch(
            &content.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .context("removing the being-created annotation")?;
    expect_written(shared, &written);
    Ok(())
}
