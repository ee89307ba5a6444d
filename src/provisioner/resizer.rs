//! The resizer: a bound claim of this driver whose `spec.resources.requests.storage`
//! grew past its capacity, in a StorageClass with `allowVolumeExpansion` →
//! ControllerExpandVolume → the PV's capacity → the claim's status, as
//! external-resizer writes it (`allocatedResources`, `allocatedResourceStatuses`,
//! conditions `Resizing`, then `FileSystemResizePending` when the node must grow the
//! filesystem, else the new capacity).

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource as _, ResourceExt as _};
use serde_json::{Value, json};

use super::csi::pv_capability;
use super::informer::Expect;
use super::rules;
use super::{Next, Shared, informer};
use crate::csi::proto;

const NODE_RESIZE_PENDING: &str = "NodeResizePending";

fn storage_of(
    map: Option<
        &std::collections::BTreeMap<
            String,
            k8s_openapi::apimachinery::pkg::api::resource::Quantity,
        >,
    >,
) -> Option<i64> {
    map?.get("storage")
        .and_then(|q| rules::parse_quantity(&q.0).ok())
}

/// Reconcile the claim `namespace/name` for expansion.
pub async fn reconcile(shared: Arc<Shared>, key: String) -> anyhow::Result<Next> {
    let Some(pvc) = informer::get(&shared.claims, &key) else {
        return Ok(Next::Done);
    };
    let status = pvc.status.clone().unwrap_or_default();
    if status.phase.as_deref() != Some("Bound") || pvc.metadata.deletion_timestamp.is_some() {
        return Ok(Next::Done);
    }
    let Some(requested) = storage_of(
        pvc.spec
            .as_ref()
            .and_then(|s| s.resources.as_ref())
            .and_then(|r| r.requests.as_ref()),
    ) else {
        return Ok(Next::Done);
    };
    let current = storage_of(status.capacity.as_ref()).unwrap_or(0);
    if requested <= current {
        return Ok(Next::Done);
    }
    let node_pending = status
        .allocated_resource_statuses
        .as_ref()
        .and_then(|s| s.get("storage"))
        .is_some_and(|s| s == NODE_RESIZE_PENDING)
        && storage_of(status.allocated_resources.as_ref()) == Some(requested);
    if node_pending {
        return Ok(Next::Done);
    }
    let Some(volume) = pvc.spec.as_ref().and_then(|s| s.volume_name.clone()) else {
        return Ok(Next::Done);
    };
    let Some(pv) = shared.volumes.get(&ObjectRef::new(&volume)) else {
        return Ok(Next::Done);
    };
    let Some(csi) = pv.spec.as_ref().and_then(|s| s.csi.as_ref()) else {
        return Ok(Next::Done);
    };
    if csi.driver != shared.driver {
        return Ok(Next::Done);
    }
    let class = rules::claim_class(&pvc).and_then(|n| shared.classes.get(&ObjectRef::new(n)));
    if class.is_none_or(|c| c.allow_volume_expansion != Some(true)) {
        shared.events.warning(
            pvc.object_ref(&()),
            "VolumeResizeFailed",
            "the claim's StorageClass does not set allowVolumeExpansion: true".to_owned(),
        );
        return Ok(Next::Done);
    }
    if !shared.csi.caps.expand {
        shared.events.warning(
            pvc.object_ref(&()),
            "VolumeResizeFailed",
            format!(
                "driver {} cannot expand volumes (no EXPAND_VOLUME capability)",
                shared.driver
            ),
        );
        return Ok(Next::Done);
    }
    expand(&shared, &pvc, &pv, requested).await
}

async fn expand(
    shared: &Shared,
    pvc: &PersistentVolumeClaim,
    pv: &PersistentVolume,
    requested: i64,
) -> anyhow::Result<Next> {
    let started = Instant::now();
    let namespace = pvc.namespace().unwrap_or_default();
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(shared.client.clone(), &namespace);
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let quantity = rules::bytes_to_quantity(requested);
    patch_claim_status(
        shared,
        &claims,
        pvc,
        json!({ "status": {
            "allocatedResources": { "storage": quantity },
            "allocatedResourceStatuses": { "storage": "ControllerResizeInProgress" },
            "conditions": [{ "type": "Resizing", "status": "True", "lastTransitionTime": now }],
        }}),
    )
    .await?;
    shared.events.normal(
        pvc.object_ref(&()),
        "Resizing",
        format!("External resizer is resizing volume {}", pv.name_any()),
    );
    let spec = pv.spec.clone().unwrap_or_default();
    let csi = spec.csi.clone().unwrap_or_default();
    let block = spec.volume_mode.as_deref() == Some("Block");
    let request = proto::ControllerExpandVolumeRequest {
        volume_id: csi.volume_handle.clone(),
        capacity_range: Some(proto::CapacityRange {
            required_bytes: requested,
            limit_bytes: 0,
        }),
        secrets: Default::default(),
        volume_capability: pv_capability(pv),
    };
    let response = match shared.csi.expand(request).await {
        Ok(response) => response,
        Err(e) => {
            shared.metrics.failed("resize", &format!("{:?}", e.code()));
            let message = format!("resize volume {} failed: {}", pv.name_any(), e.message());
            shared
                .events
                .warning(pvc.object_ref(&()), "VolumeResizeFailed", message.clone());
            let state = if e.is_final() {
                "ControllerResizeInfeasible"
            } else {
                "ControllerResizeInProgress"
            };
            patch_claim_status(
                shared,
                &claims,
                pvc,
                json!({ "status": {
                    "allocatedResourceStatuses": { "storage": state },
                    "conditions": [{ "type": "ControllerResizeError", "status": "True",
                        "lastTransitionTime": now, "message": message }],
                }}),
            )
            .await?;
            return Err(anyhow::Error::new(e).context("ControllerExpandVolume"));
        }
    };
    let size = response.capacity_bytes.max(requested);
    Api::<PersistentVolume>::all(shared.client.clone())
        .patch(
            &pv.name_any(),
            &PatchParams::default(),
            &Patch::Merge(
                &json!({ "spec": { "capacity": { "storage": rules::bytes_to_quantity(size) } } }),
            ),
        )
        .await
        .context("writing the PV's new capacity")?;
    if response.node_expansion_required && !block {
        patch_claim_status(
            shared,
            &claims,
            pvc,
            json!({ "status": {
                "allocatedResourceStatuses": { "storage": NODE_RESIZE_PENDING },
                "conditions": [{ "type": "FileSystemResizePending", "status": "True",
                    "lastTransitionTime": now,
                    "message": "Waiting for user to (re-)start a pod to finish file system resize of volume on node." }],
            }}),
        )
        .await?;
        shared.events.normal(
            pvc.object_ref(&()),
            "FileSystemResizeRequired",
            "Require file system resize of volume on node".to_owned(),
        );
    } else {
        patch_claim_status(
            shared,
            &claims,
            pvc,
            json!({ "status": {
                "capacity": { "storage": rules::bytes_to_quantity(size) },
                "allocatedResourceStatuses": null,
                "conditions": [],
            }}),
        )
        .await?;
        shared.events.normal(
            pvc.object_ref(&()),
            "VolumeResizeSuccessful",
            "Resize volume succeeded".to_owned(),
        );
    }
    shared.metrics.succeeded("resize", started);
    Ok(Next::Done)
}

async fn patch_claim_status(
    shared: &Shared,
    claims: &Api<PersistentVolumeClaim>,
    pvc: &PersistentVolumeClaim,
    patch: Value,
) -> anyhow::Result<()> {
    let written = claims
        .patch_status(
            &pvc.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .context("writing the claim's resize status")?;
    // Not looked at again until the cache has this write.
    if let Some(version) = written.metadata.resource_version.clone() {
        shared
            .expect
            .resizes
            .expect(&informer::key(&written), Expect::Version(version));
    }
    Ok(())
}
