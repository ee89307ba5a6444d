//! The attacher: VolumeAttachments whose `spec.attacher` is this driver →
//! ControllerPublishVolume / ControllerUnpublishVolume, reported in the attachment's
//! status (`attached`, `attachmentMetadata`, `attachError`, `detachError`) the way
//! external-attacher reports them, with its finalizer `external-attacher/<driver with
//! dots as dashes>` held while the volume may be attached.
//!
//! A driver without PUBLISH_UNPUBLISH_VOLUME (NFS only) still gets its attachments
//! marked attached, as external-attacher does for such drivers (CSIDriver
//! `attachRequired: true` then costs one status write, nothing more).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::PersistentVolume;
use k8s_openapi::api::storage::v1::{CSINode, VolumeAttachment};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt as _};
use serde_json::{Value, json};

use crate::context::{Context, Next, finalizers_without, is_api};
use crate::csi_client::pv_capability;
use crate::informer::Expect;
use stowage_api::proto::csi as proto;

/// external-attacher's finalizer name for a driver.
pub fn finalizer(driver: &str) -> String {
    format!("external-attacher/{}", driver.replace('.', "-"))
}

fn api(shared: &Context) -> Api<VolumeAttachment> {
    Api::all(shared.client.clone())
}

/// Reconcile the VolumeAttachment `name`.
pub async fn reconcile(shared: Arc<Context>, name: String) -> anyhow::Result<Next> {
    let Some(va) = shared.attachments.get(&name) else {
        return Ok(Next::Done);
    };
    if !shared.driver.contains(&va.spec.attacher) {
        return Ok(Next::Done);
    }
    let finalizer = finalizer(&va.spec.attacher);
    let has_finalizer = va.finalizers().iter().any(|f| f == &finalizer);
    if va.metadata.deletion_timestamp.is_some() {
        if has_finalizer {
            detach(&shared, &va, &finalizer).await?;
        }
        return Ok(Next::Done);
    }
    if va.status.as_ref().is_some_and(|s| s.attached) {
        return Ok(Next::Done);
    }
    attach(&shared, &va, &finalizer, has_finalizer).await?;
    Ok(Next::Done)
}

async fn attach(
    shared: &Context,
    va: &VolumeAttachment,
    finalizer: &str,
    has_finalizer: bool,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut current = va.clone();
    if !has_finalizer {
        let mut finalizers = va.finalizers().to_vec();
        finalizers.push(finalizer.to_owned());
        current = api(shared)
            .patch(
                &va.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&json!({ "metadata": {
                    "finalizers": finalizers,
                    "resourceVersion": va.metadata.resource_version,
                }})),
            )
            .await
            .context("adding the attacher finalizer")?;
        expect_version(shared, &current);
    }
    let metadata = if shared.csi.caps.publish_unpublish {
        let request = match publish_request(shared, va).await {
            Ok(request) => request,
            Err(message) => {
                shared.metrics.failed("attach", "InvalidAttachment");
                write_status(shared, &current, error_status("attachError", &message)).await?;
                anyhow::bail!(message);
            }
        };
        match shared.csi.publish(request).await {
            Ok(context) => context,
            Err(e) => {
                shared.metrics.failed("attach", &format!("{:?}", e.code()));
                let message = format!("rpc error: code = {:?} desc = {}", e.code(), e.message());
                write_status(shared, &current, error_status("attachError", &message)).await?;
                return Err(anyhow::Error::new(e).context("ControllerPublishVolume"));
            }
        }
    } else {
        HashMap::new()
    };
    let status = json!({ "status": {
        "attached": true,
        "attachmentMetadata": metadata,
        "attachError": null,
    }});
    if write_status(shared, &current, status).await?.is_some() {
        shared.metrics.succeeded("attach", started);
    }
    Ok(())
}

async fn detach(shared: &Context, va: &VolumeAttachment, finalizer: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    if shared.csi.caps.publish_unpublish {
        let (volume_id, node_id) = match volume_and_node(shared, va).await {
            Ok(ids) => ids,
            Err(message) => {
                shared.metrics.failed("detach", "InvalidAttachment");
                write_status(shared, va, error_status("detachError", &message)).await?;
                anyhow::bail!(message);
            }
        };
        let request = proto::ControllerUnpublishVolumeRequest {
            volume_id,
            node_id,
            secrets: HashMap::new(),
        };
        if let Err(e) = shared.csi.unpublish(request).await {
            shared.metrics.failed("detach", &format!("{:?}", e.code()));
            let message = format!("rpc error: code = {:?} desc = {}", e.code(), e.message());
            write_status(shared, va, error_status("detachError", &message)).await?;
            return Err(anyhow::Error::new(e).context("ControllerUnpublishVolume"));
        }
    }
    let status = json!({ "status": {
        "attached": false, "attachmentMetadata": null, "detachError": null,
    }});
    // `None`: the attachment is gone already, or no longer ours to finish.
    let Some(current) = write_status(shared, va, status).await? else {
        shared.metrics.succeeded("detach", started);
        return Ok(());
    };
    let finalizers = finalizers_without(&current, finalizer);
    match api(shared)
        .patch(
            &current.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&json!({ "metadata": {
                "finalizers": finalizers,
                "resourceVersion": current.metadata.resource_version,
            }})),
        )
        .await
    {
        // Without our finalizer a deleted attachment goes away: not looked at again
        // until the cache shows that, so a stale copy never starts a second
        // ControllerUnpublish.
        Ok(written) if written.finalizers().is_empty() => shared
            .expect
            .attachments
            .expect(&written.name_any(), Expect::Deleted),
        Ok(written) => expect_version(shared, &written),
        Err(e) if is_api(&e, 404) => {}
        Err(e) => return Err(anyhow::Error::new(e).context("removing the attacher finalizer")),
    }
    shared.metrics.succeeded("detach", started);
    Ok(())
}

fn error_status(field: &str, message: &str) -> Value {
    json!({ "status": { field: {
        "message": message,
        "time": Time(k8s_openapi::jiff::Timestamp::now()),
    }}})
}

/// Patch the attachment's status, guarded by the version `va` shows (re-read once on a
/// conflict). `None` when the attachment is gone, or changed in a way that makes the
/// write moot: attach results only while it is not being deleted, detach results only
/// while it is and still carries our finalizer.
async fn write_status(
    shared: &Context,
    va: &VolumeAttachment,
    patch: Value,
) -> anyhow::Result<Option<VolumeAttachment>> {
    let deleting = va.metadata.deletion_timestamp.is_some();
    let finalizer = finalizer(&va.spec.attacher);
    let written = crate::context::patch_status_guarded(&api(shared), va, &patch, |live| {
        live.metadata.deletion_timestamp.is_some() == deleting
            && (!deleting || live.finalizers().contains(&finalizer))
    })
    .await
    .with_context(|| format!("writing VolumeAttachment {} status", va.name_any()))?;
    if let Some(written) = &written {
        expect_version(shared, written);
    }
    Ok(written)
}

/// Not looked at again until the cache has this write.
fn expect_version(shared: &Context, written: &VolumeAttachment) {
    if let Some(version) = written.metadata.resource_version.clone() {
        shared
            .expect
            .attachments
            .expect(&written.name_any(), Expect::Version(version));
    }
}

fn attached_pv(shared: &Context, va: &VolumeAttachment) -> Result<Arc<PersistentVolume>, String> {
    let pv_name = va
        .spec
        .source
        .persistent_volume_name
        .as_deref()
        .ok_or("VolumeAttachment has no spec.source.persistentVolumeName (inline volumes are not supported)")?;
    shared
        .volumes
        .get(pv_name)
        .ok_or_else(|| format!("PV {pv_name} not found"))
}

/// The CSI volume id (from the PV) and node id (from the node's CSINode entry for this
/// driver).
async fn volume_and_node(
    shared: &Context,
    va: &VolumeAttachment,
) -> Result<(String, String), String> {
    let pv = attached_pv(shared, va)?;
    let csi = pv
        .spec
        .as_ref()
        .and_then(|s| s.csi.as_ref())
        .ok_or_else(|| format!("PV {} is not a CSI volume", pv.name_any()))?;
    let node = &va.spec.node_name;
    let csi_node = Api::<CSINode>::all(shared.client.clone())
        .get_opt(node)
        .await
        .map_err(|e| format!("reading CSINode {node}: {e}"))?;
    let node_id = csi_node
        .and_then(|n| {
            let attacher = &va.spec.attacher;
            n.spec.drivers.into_iter().find(|d| &d.name == attacher)
        })
        .map(|d| d.node_id)
        .ok_or_else(|| {
            format!(
                "node {node} has no CSINode entry for driver {}: is the node plugin running there?",
                va.spec.attacher
            )
        })?;
    Ok((csi.volume_handle.clone(), node_id))
}

async fn publish_request(
    shared: &Context,
    va: &VolumeAttachment,
) -> Result<proto::ControllerPublishVolumeRequest, String> {
    let (volume_id, node_id) = volume_and_node(shared, va).await?;
    let pv = attached_pv(shared, va)?;
    let csi = pv
        .spec
        .as_ref()
        .and_then(|s| s.csi.clone())
        .unwrap_or_default();
    let capability = pv_capability(&pv)
        .ok_or_else(|| format!("PV {} has no known access mode", pv.name_any()))?;
    Ok(proto::ControllerPublishVolumeRequest {
        volume_id,
        node_id,
        volume_capability: Some(capability),
        readonly: csi.read_only.unwrap_or(false),
        secrets: HashMap::new(),
        volume_context: csi
            .volume_attributes
            .unwrap_or_default()
            .into_iter()
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{Caches, DRIVER, FakeDriver, Recorded, attachment, fixture};

    const VA: &str = "/apis/storage.k8s.io/v1/volumeattachments/csi-1";

    fn lines(requests: &[Recorded]) -> Vec<String> {
        requests.iter().map(Recorded::line).collect()
    }

    #[tokio::test]
    async fn a_driver_without_attach_gets_its_attachments_marked_attached() {
        let f = fixture(
            Caches {
                attachments: vec![attachment("csi-1", "pvc-1", "node-1")],
                ..Default::default()
            },
            FakeDriver::default(),
        )
        .await;
        assert!(!f.context.csi.caps.publish_unpublish);
        let next = reconcile(Arc::clone(&f.context), "csi-1".into())
            .await
            .expect("attached");
        assert_eq!(next, Next::Done);
        assert_eq!(
            lines(&f.api.writes()),
            [format!("PATCH {VA}"), format!("PATCH {VA}/status")],
            "the finalizer, then the status"
        );
        let va: VolumeAttachment = f.api.object(None, "csi-1").unwrap();
        assert_eq!(va.finalizers(), [finalizer(DRIVER)]);
        assert!(va.status.is_some_and(|s| s.attached));
    }

    #[tokio::test]
    async fn an_attachment_of_another_attacher_is_not_touched() {
        let mut theirs = attachment("csi-1", "pvc-1", "node-1");
        theirs.spec.attacher = "ebs.csi.aws.com".into();
        let f = fixture(
            Caches {
                attachments: vec![theirs],
                ..Default::default()
            },
            FakeDriver::default(),
        )
        .await;
        reconcile(Arc::clone(&f.context), "csi-1".into())
            .await
            .expect("skipped");
        assert!(
            f.api.requests().is_empty(),
            "{:?}",
            lines(&f.api.requests())
        );
    }

    #[test]
    fn finalizer_spells_the_driver_with_dashes() {
        assert_eq!(
            super::finalizer("stowage.csi.dev"),
            "external-attacher/stowage-csi-dev"
        );
    }
}
