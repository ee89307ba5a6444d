//! The resizer: a bound claim of this driver whose `spec.resources.requests.storage`
//! grew past its capacity, in a StorageClass with `allowVolumeExpansion` →
//! ControllerExpandVolume → the PV's capacity → the claim's status, as
//! external-resizer writes it (`allocatedResources`, `allocatedResourceStatuses`,
//! conditions `Resizing`, then `FileSystemResizePending` when the node must grow the
//! filesystem, else the new capacity).
//!
//! The hand-over with the kubelet (KEP-1790): once the claim says `NodeResize*` for an
//! allocated size that covers the request, the resize is the kubelet's — it writes
//! `NodeResizeInProgress`, `NodeResizeFailed`/`Infeasible` or the final capacity, and
//! the resizer neither calls the driver again nor writes the claim's status. Every
//! status write is guarded by the resourceVersion it was decided on, so a write the
//! kubelet made meanwhile is never overwritten.
//!
//! VolumeAttributesClass (as external-resizer's modify controller): a bound claim whose
//! `volumeAttributesClassName` differs from its `currentVolumeAttributesClassName` →
//! `modifyVolumeStatus` InProgress → ControllerModifyVolume with the class's
//! parameters → the PV's `volumeAttributesClassName` and the claim's current class;
//! a final refusal is `Infeasible` (not retried until the claim names another class),
//! a class not there yet `Pending`.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource as _, ResourceExt as _};
use serde_json::{Value, json};

use crate::context::{Context, Next};
use crate::csi_client::pv_capability;
use crate::informer;
use crate::informer::Expect;
use crate::rules;
use stowage_api::proto::csi as proto;

const NODE_RESIZE_PENDING: &str = "NodeResizePending";
const CONTROLLER_RESIZE_IN_PROGRESS: &str = "ControllerResizeInProgress";
/// The resize states in which the node (kubelet) owns the claim's resize status.
const NODE_STATES: [&str; 4] = [
    NODE_RESIZE_PENDING,
    "NodeResizeInProgress",
    "NodeResizeFailed",
    "NodeResizeInfeasible",
];

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
pub async fn reconcile(shared: Arc<Context>, key: String) -> anyhow::Result<Next> {
    let Some(pvc) = shared.claims.get(&key) else {
        return Ok(Next::Done);
    };
    if let Some(next) = modify(&shared, &pvc).await? {
        return Ok(next);
    }
    let (pv, requested) = match resize_target(&shared, &pvc) {
        Ok(target) => target,
        Err(reason) => {
            tracing::debug!(claim = %key, version = ?pvc.metadata.resource_version, %reason, "not resizing");
            return Ok(Next::Done);
        }
    };
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

/// The class a bound claim of this driver asks for and does not have yet, with its PV;
/// `None` when there is nothing to modify (or it already failed for good).
fn modify_target(
    shared: &Context,
    pvc: &PersistentVolumeClaim,
) -> Option<(String, Arc<PersistentVolume>)> {
    let spec = pvc.spec.as_ref()?;
    let target = spec
        .volume_attributes_class_name
        .clone()
        .filter(|c| !c.is_empty())?;
    let status = pvc.status.as_ref()?;
    if status.phase.as_deref() != Some("Bound") || pvc.metadata.deletion_timestamp.is_some() {
        return None;
    }
    if status.current_volume_attributes_class_name.as_deref() == Some(target.as_str()) {
        return None;
    }
    if status.modify_volume_status.as_ref().is_some_and(|m| {
        m.status == "Infeasible"
            && m.target_volume_attributes_class_name.as_deref() == Some(target.as_str())
    }) {
        return None;
    }
    let pv = shared.volumes.get(spec.volume_name.as_deref()?)?;
    let ours = pv
        .spec
        .as_ref()
        .and_then(|s| s.csi.as_ref())
        .is_some_and(|csi| shared.driver.contains(&csi.driver));
    ours.then_some((target, pv))
}

/// ControllerModifyVolume for a claim's new VolumeAttributesClass; `None` when the
/// claim asks for none (expansion may still have work).
async fn modify(shared: &Context, pvc: &PersistentVolumeClaim) -> anyhow::Result<Option<Next>> {
    let Some((target, pv)) = modify_target(shared, pvc) else {
        return Ok(None);
    };
    let namespace = pvc.namespace().unwrap_or_default();
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(shared.client.clone(), &namespace);
    let asks_for = |live: &PersistentVolumeClaim| {
        live.spec
            .as_ref()
            .and_then(|s| s.volume_attributes_class_name.as_deref())
            == Some(target.as_str())
    };
    let modify_status = |state: &str| {
        json!({ "status": { "modifyVolumeStatus": {
            "targetVolumeAttributesClassName": target, "status": state } } })
    };
    let class =
        Api::<k8s_openapi::api::storage::v1::VolumeAttributesClass>::all(shared.client.clone())
            .get_opt(&target)
            .await
            .context("reading the VolumeAttributesClass")?;
    let Some(class) = class else {
        patch_claim_status(shared, &claims, pvc, modify_status("Pending"), asks_for).await?;
        // Classes are not watched: look again in a while.
        return Ok(Some(Next::After(std::time::Duration::from_secs(30))));
    };
    let refuse = |message: String| {
        shared
            .events
            .warning(pvc.object_ref(&()), "VolumeModifyFailed", message);
        patch_claim_status(shared, &claims, pvc, modify_status("Infeasible"), asks_for)
    };
    if !shared.driver.contains(&class.driver_name) {
        refuse(format!(
            "VolumeAttributesClass {target} is for driver {}, not {}",
            class.driver_name, shared.driver
        ))
        .await?;
        return Ok(Some(Next::Done));
    }
    if !shared.csi.caps.modify {
        refuse(format!(
            "driver {} cannot modify volumes (no MODIFY_VOLUME capability)",
            shared.driver
        ))
        .await?;
        return Ok(Some(Next::Done));
    }
    let Some(pvc) =
        patch_claim_status(shared, &claims, pvc, modify_status("InProgress"), asks_for).await?
    else {
        return Ok(Some(Next::Done));
    };
    let pvc = &pvc;
    let started = Instant::now();
    let handle = pv
        .spec
        .as_ref()
        .and_then(|s| s.csi.as_ref())
        .map(|c| c.volume_handle.clone())
        .unwrap_or_default();
    let request = proto::ControllerModifyVolumeRequest {
        volume_id: handle,
        secrets: Default::default(),
        mutable_parameters: class
            .parameters
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect(),
    };
    match shared.csi.modify(request).await {
        Ok(()) => {
            Api::<PersistentVolume>::all(shared.client.clone())
                .patch(
                    &pv.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&json!({ "spec": { "volumeAttributesClassName": target } })),
                )
                .await
                .context("writing the PV's VolumeAttributesClass")?;
            patch_claim_status(
                shared,
                &claims,
                pvc,
                json!({ "status": { "currentVolumeAttributesClassName": target, "modifyVolumeStatus": null } }),
                asks_for,
            )
            .await?;
            shared.metrics.succeeded("modify", started);
            shared.events.normal(
                pvc.object_ref(&()),
                "VolumeModifySuccessful",
                format!(
                    "Volume {} now has VolumeAttributesClass {target}",
                    pv.name_any()
                ),
            );
            Ok(Some(Next::Done))
        }
        Err(e) if e.is_final() => {
            shared.metrics.failed("modify", &format!("{:?}", e.code()));
            refuse(format!(
                "modify volume {} failed: {}",
                pv.name_any(),
                e.message()
            ))
            .await?;
            Ok(Some(Next::Done))
        }
        Err(e) => {
            shared.metrics.failed("modify", &format!("{:?}", e.code()));
            shared.events.warning(
                pvc.object_ref(&()),
                "VolumeModifyFailed",
                format!("modify volume {} failed: {}", pv.name_any(), e.message()),
            );
            Err(anyhow::Error::new(e).context("ControllerModifyVolume"))
        }
    }
}

/// The claim's PV and the size the controller must expand it to, or why there is
/// nothing to do for this driver now.
fn resize_target(
    shared: &Context,
    pvc: &PersistentVolumeClaim,
) -> Result<(Arc<PersistentVolume>, i64), &'static str> {
    if pvc.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Bound") {
        return Err("not Bound");
    }
    if pvc.metadata.deletion_timestamp.is_some() {
        return Err("being deleted");
    }
    let requested = controller_step(pvc).ok_or("no expansion for the controller")?;
    let volume = pvc
        .spec
        .as_ref()
        .and_then(|s| s.volume_name.clone())
        .ok_or("no volumeName")?;
    let pv = shared
        .volumes
        .get(&volume)
        .ok_or("its PV is not in the cache")?;
    let csi = pv
        .spec
        .as_ref()
        .and_then(|s| s.csi.as_ref())
        .ok_or("not a CSI volume")?;
    if !shared.driver.contains(&csi.driver) {
        return Err("another driver's volume");
    }
    Ok((pv, requested))
}

/// The claim (queue key) bound to `pv` when it is waiting for an expansion: the PV
/// event that must bring it back to the resizer. Watches of claims and PVs are not
/// ordered, so a claim's grown request can be seen while its PV is not yet cached.
pub fn claim_waiting_for(
    pv: &PersistentVolume,
    claims: &crate::cache::Cache<PersistentVolumeClaim>,
) -> Option<String> {
    let key = informer::claim_key_of(pv)?;
    let pvc = claims.get(&key)?;
    let bound_here = pvc.spec.as_ref()?.volume_name.as_deref() == Some(pv.name_any().as_str());
    (bound_here && controller_step(&pvc).is_some()).then_some(key)
}

/// The size ControllerExpandVolume must reach for this claim now, or `None` when
/// the controller has nothing to do: the request is met, or the node is growing the
/// filesystem to an allocated size that covers the request.
fn controller_step(pvc: &PersistentVolumeClaim) -> Option<i64> {
    let status = pvc.status.as_ref()?;
    let requested = storage_of(
        pvc.spec
            .as_ref()
            .and_then(|s| s.resources.as_ref())
            .and_then(|r| r.requests.as_ref()),
    )?;
    if requested <= storage_of(status.capacity.as_ref()).unwrap_or(0) {
        return None;
    }
    let state = status
        .allocated_resource_statuses
        .as_ref()
        .and_then(|s| s.get("storage"));
    let allocated = storage_of(status.allocated_resources.as_ref()).unwrap_or(0);
    if state.is_some_and(|s| NODE_STATES.contains(&s.as_str())) && allocated >= requested {
        return None;
    }
    Some(requested)
}

async fn expand(
    shared: &Context,
    pvc: &PersistentVolumeClaim,
    pv: &PersistentVolume,
    requested: i64,
) -> anyhow::Result<Next> {
    let started = Instant::now();
    let namespace = pvc.namespace().unwrap_or_default();
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(shared.client.clone(), &namespace);
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let quantity = rules::bytes_to_quantity(requested);
    let Some(pvc) = patch_claim_status(
        shared,
        &claims,
        pvc,
        json!({ "status": {
            "allocatedResources": { "storage": quantity },
            "allocatedResourceStatuses": { "storage": CONTROLLER_RESIZE_IN_PROGRESS },
            "conditions": [{ "type": "Resizing", "status": "True", "lastTransitionTime": now }],
        }}),
        |live| controller_step(live) == Some(requested),
    )
    .await?
    else {
        // The claim changed meanwhile (the kubelet's turn, a new request, deleted):
        // its own event brings it back if there is work left.
        return Ok(Next::Done);
    };
    let pvc = &pvc;
    // Later writes only continue this resize: the claim must still be ours, at this size.
    let still_ours = |live: &PersistentVolumeClaim| {
        let status = live.status.clone().unwrap_or_default();
        storage_of(status.allocated_resources.as_ref()) == Some(requested)
            && status
                .allocated_resource_statuses
                .as_ref()
                .and_then(|s| s.get("storage"))
                .is_some_and(|s| s == CONTROLLER_RESIZE_IN_PROGRESS)
    };
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
                still_ours,
            )
            .await?;
            return Err(anyhow::Error::new(e).context("ControllerExpandVolume"));
        }
    };
    let size = response.capacity_bytes.max(requested);
    let pv_size = storage_of(pv.spec.as_ref().and_then(|s| s.capacity.as_ref())).unwrap_or(0);
    if pv_size < size {
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
    }
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
            still_ours,
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
            still_ours,
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

/// A claim status write guarded by `pvc`'s resourceVersion (see
/// [`super::patch_status_guarded`]); `None` when the claim moved on without us.
async fn patch_claim_status(
    shared: &Context,
    claims: &Api<PersistentVolumeClaim>,
    pvc: &PersistentVolumeClaim,
    patch: Value,
    still: impl Fn(&PersistentVolumeClaim) -> bool,
) -> anyhow::Result<Option<PersistentVolumeClaim>> {
    let written = crate::context::patch_status_guarded(claims, pvc, &patch, still)
        .await
        .context("writing the claim's resize status")?;
    // Not looked at again until the cache has this write.
    if let Some(version) = written
        .as_ref()
        .and_then(|w| w.metadata.resource_version.clone())
    {
        shared
            .expect
            .resizes
            .expect(&informer::key(pvc), Expect::Version(version));
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        PersistentVolumeClaimSpec, PersistentVolumeClaimStatus, VolumeResourceRequirements,
    };
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use std::collections::BTreeMap;

    const GI: i64 = 1 << 30;

    fn storage(bytes: i64) -> Option<BTreeMap<String, Quantity>> {
        Some(BTreeMap::from([(
            "storage".to_owned(),
            rules::bytes_to_quantity(bytes),
        )]))
    }

    fn claim(
        requested: i64,
        capacity: i64,
        allocated: Option<i64>,
        state: Option<&str>,
    ) -> PersistentVolumeClaim {
        PersistentVolumeClaim {
            spec: Some(PersistentVolumeClaimSpec {
                resources: Some(VolumeResourceRequirements {
                    requests: storage(requested),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            status: Some(PersistentVolumeClaimStatus {
                phase: Some("Bound".into()),
                capacity: storage(capacity),
                allocated_resources: allocated.and_then(storage),
                allocated_resource_statuses: state
                    .map(|s| BTreeMap::from([("storage".to_owned(), s.to_owned())])),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn the_controller_expands_only_what_the_node_does_not_own() {
        assert_eq!(
            controller_step(&claim(GI, GI, None, None)),
            None,
            "request met"
        );
        assert_eq!(
            controller_step(&claim(2 * GI, GI, None, None)),
            Some(2 * GI)
        );
        // The node's turn for this size, whatever the kubelet wrote last.
        for state in NODE_STATES {
            assert_eq!(
                controller_step(&claim(2 * GI, GI, Some(2 * GI), Some(state))),
                None,
                "{state}"
            );
            // A request grown past what the node is working on is the controller's again.
            assert_eq!(
                controller_step(&claim(3 * GI, GI, Some(2 * GI), Some(state))),
                Some(3 * GI),
                "{state}"
            );
        }
        // An interrupted or failed controller resize is retried.
        for state in [CONTROLLER_RESIZE_IN_PROGRESS, "ControllerResizeInfeasible"] {
            assert_eq!(
                controller_step(&claim(2 * GI, GI, Some(2 * GI), Some(state))),
                Some(2 * GI)
            );
        }
    }
}

#[cfg(test)]
mod reconcile_tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::core::v1::PersistentVolumeClaimStatus;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    use super::*;
    use crate::fixtures::{
        Caches, DRIVER, FakeDriver, Recorded, claim, class, fixture, provisioned_pv,
    };

    /// A claim bound to `pvc-1` at 1Gi whose request grew to 2Gi, in an expandable class.
    fn grown(state: Option<&str>, allocated: Option<&str>) -> Caches {
        let mut pvc = claim("default", "data", "u-1", "fast", "2Gi");
        pvc.spec.as_mut().unwrap().volume_name = Some("pvc-1".into());
        pvc.status = Some(PersistentVolumeClaimStatus {
            phase: Some("Bound".into()),
            capacity: Some(BTreeMap::from([("storage".into(), Quantity("1Gi".into()))])),
            allocated_resources: allocated
                .map(|a| BTreeMap::from([("storage".into(), Quantity(a.into()))])),
            allocated_resource_statuses: state
                .map(|s| BTreeMap::from([("storage".into(), s.to_owned())])),
            ..Default::default()
        });
        let mut class = class("fast", DRIVER, &[]);
        class.allow_volume_expansion = Some(true);
        Caches {
            claims: vec![pvc],
            volumes: vec![provisioned_pv("pvc-1", "vol-1", "Delete", "Bound")],
            classes: vec![class],
            ..Default::default()
        }
    }

    fn lines(requests: &[Recorded]) -> Vec<String> {
        requests.iter().map(Recorded::line).collect()
    }

    #[tokio::test]
    async fn a_grown_claim_is_expanded_once_then_handed_to_the_kubelet() {
        let f = fixture(grown(None, None), FakeDriver::default().expanding(true)).await;
        let next = reconcile(Arc::clone(&f.context), "default/data".into())
            .await
            .expect("expanded");
        assert_eq!(next, Next::Done);
        let expands = f.driver.expands();
        assert_eq!(expands.len(), 1, "one ControllerExpandVolume");
        assert_eq!(expands[0].volume_id, "vol-1");
        assert_eq!(
            expands[0].capacity_range.as_ref().unwrap().required_bytes,
            2 << 30
        );
        let status_path = "/api/v1/namespaces/default/persistentvolumeclaims/data/status";
        assert_eq!(
            lines(&f.api.writes()),
            [
                format!("PATCH {status_path}"),
                "PATCH /api/v1/persistentvolumes/pvc-1".to_owned(),
                format!("PATCH {status_path}"),
            ]
        );
        let pv: PersistentVolume = f.api.object(None, "pvc-1").unwrap();
        assert_eq!(pv.spec.unwrap().capacity.unwrap()["storage"].0, "2Gi");
        let pvc: PersistentVolumeClaim = f.api.object(Some("default"), "data").unwrap();
        let status = pvc.status.unwrap();
        assert_eq!(
            status.allocated_resource_statuses.unwrap()["storage"],
            NODE_RESIZE_PENDING,
            "the node's turn"
        );
        assert_eq!(
            status.capacity.unwrap()["storage"].0,
            "1Gi",
            "the claim's capacity is the kubelet's to write"
        );
    }

    #[test]
    fn a_pv_brings_back_only_its_own_claim_waiting_for_an_expansion() {
        use k8s_openapi::api::core::v1::ObjectReference;
        let bound_to = |pv: &str, claim: &str| {
            let mut pv = provisioned_pv(pv, "vol-1", "Delete", "Bound");
            pv.spec.as_mut().unwrap().claim_ref = Some(ObjectReference {
                namespace: Some("default".into()),
                name: Some(claim.into()),
                ..Default::default()
            });
            pv
        };
        let claims = |caches: Caches| {
            crate::cache::Cache::of(
                &caches.claims,
                stowage_api::keys::DriverNames::new(DRIVER, ""),
            )
        };
        let waiting = claims(grown(None, None));
        assert_eq!(
            claim_waiting_for(&bound_to("pvc-1", "data"), &waiting).as_deref(),
            Some("default/data")
        );
        // Another PV naming the claim (the claim is bound to pvc-1), another claim, no claim.
        assert_eq!(
            claim_waiting_for(&bound_to("pvc-2", "data"), &waiting),
            None
        );
        assert_eq!(
            claim_waiting_for(&bound_to("pvc-1", "other"), &waiting),
            None
        );
        let unbound = provisioned_pv("pvc-1", "vol-1", "Delete", "Available");
        assert_eq!(claim_waiting_for(&unbound, &waiting), None);
        // The node's turn: nothing for the controller.
        let kubelets = claims(grown(Some("NodeResizePending"), Some("2Gi")));
        assert_eq!(
            claim_waiting_for(&bound_to("pvc-1", "data"), &kubelets),
            None
        );
    }

    #[tokio::test]
    async fn a_claim_the_kubelet_is_resizing_is_left_to_it() {
        let f = fixture(
            grown(Some("NodeResizeInProgress"), Some("2Gi")),
            FakeDriver::default().expanding(true),
        )
        .await;
        reconcile(Arc::clone(&f.context), "default/data".into())
            .await
            .expect("nothing to do");
        assert!(
            f.driver.expands().is_empty(),
            "the driver is not called again"
        );
        assert!(
            f.api.requests().is_empty(),
            "{:?}",
            lines(&f.api.requests())
        );
    }
}
