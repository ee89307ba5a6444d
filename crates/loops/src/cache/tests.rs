//! The compact caches keep every field a loop reads: one test per loop, each listing
//! the fields that loop reads (JSON pointers) and comparing them on a whole object and
//! on its compact form. Dropping a kept field from a `Keep` rule fails the loop's test.

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::VolumeAttachment;
use serde_json::{Value, json};

use super::*;

const DRIVER: &str = "stowage.csi.dev";
const NFS: &str = "nfs.stowage.csi.dev";

fn drivers() -> DriverNames {
    DriverNames::new(DRIVER, NFS)
}

/// Fields no loop reads, on every object: what the compact form drops.
fn unread_metadata() -> Value {
    json!({
        "labels": {"app": "db", "team": "storage"},
        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "db", "uid": "5a7c"}],
        "creationTimestamp": "2026-12-07T10:00:00Z",
        "generation": 3,
        "managedFields": [{"manager": "kubectl", "operation": "Apply", "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}}],
    })
}

fn with_unread(mut object: Value) -> Value {
    let metadata = object["metadata"].as_object_mut().unwrap();
    for (k, v) in unread_metadata().as_object().unwrap() {
        metadata.insert(k.clone(), v.clone());
    }
    metadata
        .entry("annotations")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .unwrap()
        .insert(
            LAST_APPLIED.into(),
            json!("{\"kind\":\"a whole copy of the object\"}"),
        );
    object
}

fn claim(bound: bool) -> PersistentVolumeClaim {
    let mut claim = json!({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": "data-db-0", "namespace": "prod", "uid": "c-1", "resourceVersion": "41",
            "deletionTimestamp": "2026-12-07T11:00:00Z",
            "finalizers": ["kubernetes.io/pvc-protection", "provisioner.storage.kubernetes.io/cloning-protection"],
            "annotations": {
                "volume.kubernetes.io/storage-provisioner": DRIVER,
                "volume.beta.kubernetes.io/storage-provisioner": DRIVER,
                "volume.kubernetes.io/selected-node": "node-1",
                "volume.beta.kubernetes.io/storage-class": "fast",
                "team.example.com/secret": "db-secret",
            },
        },
        "spec": {
            "storageClassName": "fast",
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": "2Gi"}},
            "volumeMode": "Filesystem",
            "selector": {"matchLabels": {"tier": "gold"}},
            "dataSource": {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "nightly"},
            "dataSourceRef": {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "nightly"},
            "volumeAttributesClassName": "gold",
        },
        "status": {
            "phase": "Bound",
            "accessModes": ["ReadWriteOnce"],
            "capacity": {"storage": "1Gi"},
            "allocatedResources": {"storage": "2Gi"},
            "allocatedResourceStatuses": {"storage": "ControllerResizeInProgress"},
            "conditions": [{"type": "Resizing", "status": "True"}],
            "currentVolumeAttributesClassName": "silver",
            "modifyVolumeStatus": {"status": "InProgress", "targetVolumeAttributesClassName": "gold"},
        },
    });
    if bound {
        claim["spec"]["volumeName"] = json!("pvc-c-1");
    }
    serde_json::from_value(with_unread(claim)).unwrap()
}

fn volume(driver: &str) -> PersistentVolume {
    serde_json::from_value(with_unread(json!({
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {
            "name": "pvc-c-1", "uid": "v-1", "resourceVersion": "42",
            "deletionTimestamp": "2026-12-07T11:00:00Z",
            "finalizers": ["external-provisioner.volume.kubernetes.io/finalizer", "kubernetes.io/pv-protection"],
            "annotations": {
                "pv.kubernetes.io/provisioned-by": driver,
                "volume.kubernetes.io/provisioner-deletion-secret-name": "s",
                "volume.kubernetes.io/provisioner-deletion-secret-namespace": "prod",
            },
        },
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "capacity": {"storage": "2Gi"},
            "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": "prod", "name": "data-db-0", "uid": "c-1", "resourceVersion": "40"},
            "csi": {
                "driver": driver, "volumeHandle": "vol-0abc", "fsType": "xfs", "readOnly": false,
                "volumeAttributes": {"backend": "ebs", "storage.kubernetes.io/csiProvisionerIdentity": "id"},
                "controllerPublishSecretRef": {"name": "s", "namespace": "prod"},
                "controllerExpandSecretRef": {"name": "s", "namespace": "prod"},
                "nodeStageSecretRef": {"name": "s", "namespace": "prod"},
            },
            "mountOptions": ["noatime"],
            "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["a"]}]}]}},
            "persistentVolumeReclaimPolicy": "Delete",
            "storageClassName": "fast",
            "volumeMode": "Filesystem",
            "volumeAttributesClassName": "gold",
        },
        "status": {"phase": "Bound", "lastPhaseTransitionTime": "2026-12-07T10:00:01Z"},
    })))
    .unwrap()
}

fn attachment(attacher: &str) -> VolumeAttachment {
    serde_json::from_value(with_unread(json!({
        "apiVersion": "storage.k8s.io/v1", "kind": "VolumeAttachment",
        "metadata": {
            "name": "csi-0123", "uid": "a-1", "resourceVersion": "43",
            "deletionTimestamp": "2026-12-07T11:00:00Z",
            "finalizers": ["external-attacher/stowage-csi-dev"],
            "annotations": {"csi.alpha.kubernetes.io/node-id": "i-1"},
        },
        "spec": {"attacher": attacher, "nodeName": "node-1", "source": {"persistentVolumeName": "pvc-c-1"}},
        "status": {
            "attached": true,
            "attachmentMetadata": {"devicePath": "/dev/xvdba"},
            "attachError": {"message": "busy", "time": "2026-12-07T10:00:02Z"},
            "detachError": {"message": "busy", "time": "2026-12-07T10:00:03Z"},
        },
    })))
    .unwrap()
}

/// Each pointer's value on the whole object equals the one on its compact form.
#[track_caller]
fn keeps<K: Compact>(object: K, key: &str, read: &[&str]) {
    let cache = Cache::of(std::slice::from_ref(&object), drivers());
    let compact = cache.get(key).expect("cached");
    let (whole, compact) = (
        serde_json::to_value(&object).unwrap(),
        serde_json::to_value(compact.as_ref()).unwrap(),
    );
    for pointer in read {
        let want = whole
            .pointer(pointer)
            .unwrap_or_else(|| panic!("the fixture has {pointer}"));
        assert_eq!(
            compact.pointer(pointer),
            Some(want),
            "{pointer} is read by a loop: the compact form must keep it"
        );
    }
}

const CLAIM_META: &[&str] = &[
    "/metadata/name",
    "/metadata/namespace",
    "/metadata/uid",
    "/metadata/resourceVersion",
    "/metadata/deletionTimestamp",
    "/metadata/finalizers",
];

#[test]
fn the_provisioner_reads_of_claims_and_volumes_survive() {
    let claim_fields = [
        "/metadata/annotations/volume.kubernetes.io~1storage-provisioner",
        "/metadata/annotations/volume.beta.kubernetes.io~1storage-provisioner",
        "/metadata/annotations/volume.kubernetes.io~1selected-node",
        "/metadata/annotations/volume.beta.kubernetes.io~1storage-class",
        // `${pvc.annotations['<key>']}` secret templates read any annotation.
        "/metadata/annotations/team.example.com~1secret",
        "/spec/storageClassName",
        "/spec/accessModes",
        "/spec/resources/requests/storage",
        "/spec/volumeMode",
        "/spec/selector",
        "/spec/dataSource",
        "/spec/dataSourceRef",
        "/spec/volumeAttributesClassName",
        "/spec/volumeName",
        "/status/phase",
    ];
    keeps(
        claim(true),
        "prod/data-db-0",
        &[CLAIM_META, &claim_fields].concat(),
    );
    keeps(claim(false), "prod/data-db-0", CLAIM_META);
    // Pre-binding compares these on any PV naming the claim, stowage's or not.
    let prebinding = [
        "/metadata/name",
        "/metadata/deletionTimestamp",
        "/spec/claimRef/namespace",
        "/spec/claimRef/name",
        "/spec/claimRef/uid",
        "/spec/capacity/storage",
        "/spec/volumeMode",
        "/spec/storageClassName",
    ];
    keeps(volume(DRIVER), "pvc-c-1", &prebinding);
    keeps(volume("other.csi.example.com"), "pvc-c-1", &prebinding);
}

#[test]
fn the_volume_loop_reads_of_volumes_and_attachments_survive() {
    let fields = [
        "/metadata/name",
        "/metadata/resourceVersion",
        "/metadata/deletionTimestamp",
        "/metadata/finalizers",
        "/metadata/annotations/pv.kubernetes.io~1provisioned-by",
        "/metadata/annotations/volume.kubernetes.io~1provisioner-deletion-secret-name",
        "/metadata/annotations/volume.kubernetes.io~1provisioner-deletion-secret-namespace",
        "/spec/csi/driver",
        "/spec/csi/volumeHandle",
        "/spec/persistentVolumeReclaimPolicy",
        "/spec/claimRef/namespace",
        "/spec/claimRef/name",
        "/spec/claimRef/uid",
        "/status/phase",
    ];
    keeps(volume(DRIVER), "pvc-c-1", &fields);
    keeps(volume(NFS), "pvc-c-1", &fields);
    // What tells the loop a PV is not its own, and a finalizer it must not touch.
    let not_ours = [
        "/metadata/annotations/pv.kubernetes.io~1provisioned-by",
        "/metadata/finalizers",
        "/spec/csi/driver",
        "/spec/persistentVolumeReclaimPolicy",
        "/status/phase",
    ];
    keeps(volume("other.csi.example.com"), "pvc-c-1", &not_ours);
    // A deletion waits for attachments of the PV, whoever attached it.
    for attacher in [DRIVER, "other.csi.example.com"] {
        keeps(
            attachment(attacher),
            "csi-0123",
            &["/metadata/name", "/spec/source/persistentVolumeName"],
        );
    }
}

#[test]
fn the_attacher_reads_of_attachments_and_volumes_survive() {
    keeps(
        attachment(DRIVER),
        "csi-0123",
        &[
            "/metadata/name",
            "/metadata/uid",
            "/metadata/resourceVersion",
            "/metadata/deletionTimestamp",
            "/metadata/finalizers",
            "/metadata/annotations/csi.alpha.kubernetes.io~1node-id",
            "/spec/attacher",
            "/spec/nodeName",
            "/spec/source/persistentVolumeName",
            "/status/attached",
            "/status/attachmentMetadata",
            "/status/attachError",
            "/status/detachError",
        ],
    );
    keeps(
        volume(DRIVER),
        "pvc-c-1",
        &[
            "/spec/accessModes",
            "/spec/csi/driver",
            "/spec/csi/volumeHandle",
            "/spec/csi/readOnly",
            "/spec/csi/fsType",
            "/spec/csi/volumeAttributes",
            "/spec/csi/controllerPublishSecretRef",
            "/spec/mountOptions",
            "/spec/volumeMode",
        ],
    );
}

#[test]
fn the_resizer_reads_of_claims_and_volumes_survive() {
    keeps(
        claim(true),
        "prod/data-db-0",
        &[
            "/metadata/resourceVersion",
            "/spec/resources/requests/storage",
            "/spec/volumeName",
            "/spec/volumeAttributesClassName",
            "/status/capacity",
            "/status/allocatedResources",
            "/status/allocatedResourceStatuses",
            "/status/conditions",
            "/status/currentVolumeAttributesClassName",
            "/status/modifyVolumeStatus",
        ],
    );
    keeps(
        volume(DRIVER),
        "pvc-c-1",
        &[
            "/metadata/resourceVersion",
            "/spec/capacity/storage",
            "/spec/claimRef/uid",
            "/spec/csi/driver",
            "/spec/csi/volumeHandle",
            "/spec/csi/controllerExpandSecretRef",
            "/spec/volumeAttributesClassName",
            "/spec/accessModes",
            "/spec/volumeMode",
        ],
    );
}

#[test]
fn the_snapshot_loops_reads_of_claims_and_volumes_survive() {
    keeps(
        claim(true),
        "prod/data-db-0",
        &[
            "/metadata/uid",
            "/spec/volumeName",
            "/spec/dataSource",
            "/spec/dataSourceRef",
            "/status/phase",
        ],
    );
    keeps(claim(false), "prod/data-db-0", &["/spec/dataSourceRef"]);
    keeps(
        volume(DRIVER),
        "pvc-c-1",
        &["/spec/csi/driver", "/spec/csi/volumeHandle"],
    );
}

#[test]
fn what_no_loop_reads_is_dropped_and_other_drivers_cost_little() {
    let cache = Cache::of(&[volume(DRIVER)], drivers());
    let ours = serde_json::to_value(cache.get("pvc-c-1").unwrap().as_ref()).unwrap();
    for dropped in [
        "/metadata/labels",
        "/metadata/ownerReferences",
        "/metadata/creationTimestamp",
        "/metadata/managedFields",
        "/metadata/annotations/kubectl.kubernetes.io~1last-applied-configuration",
        "/status/lastPhaseTransitionTime",
        "/spec/claimRef/resourceVersion",
    ] {
        assert_eq!(ours.pointer(dropped), None, "{dropped} is read by no loop");
    }
    let whole = serde_json::to_vec(&volume(DRIVER)).unwrap().len();
    let other = Cache::of(&[volume("other.csi.example.com")], drivers());
    let theirs = serde_json::to_value(other.get("pvc-c-1").unwrap().as_ref()).unwrap();
    // (A required field decodes empty.)
    assert_eq!(theirs.pointer("/spec/csi/volumeHandle"), Some(&json!("")));
    assert_eq!(theirs.pointer("/spec/nodeAffinity"), None);
    assert!(
        other.compact_bytes() < cache.compact_bytes() && cache.compact_bytes() < whole,
        "another driver's PV {} B < ours {} B < whole {whole} B",
        other.compact_bytes(),
        cache.compact_bytes()
    );
    // Still known as not ours, from the compact form alone.
    let decoded = other.get("pvc-c-1").unwrap();
    assert!(!crate::rules::is_ours(&decoded, &drivers()));
    assert!(crate::rules::is_ours(
        &cache.get("pvc-c-1").unwrap(),
        &drivers()
    ));
}

#[test]
fn tags_follow_the_objects_and_a_relist_drops_what_it_did_not_see() {
    let (cache, writer) = Cache::<PersistentVolumeClaim>::new(drivers());
    writer.list_started();
    let mut other = claim(false);
    other.metadata.name = Some("data-db-1".into());
    writer.apply(&claim(false));
    writer.apply(&other);
    writer.list_done();
    assert_eq!(cache.tagged(UNBOUND).len(), 2);
    assert_eq!(cache.version("prod/data-db-0").as_deref(), Some("41"));
    // Bound by a watch event: no longer among the unbound.
    writer.apply(&claim(true));
    assert_eq!(cache.tagged(UNBOUND).len(), 1);
    // A relist (after a 410) that no longer sees data-db-1: gone once it ends.
    writer.list_started();
    writer.apply(&claim(true));
    assert_eq!(cache.len(), 2, "the old state stays readable while listing");
    writer.list_done();
    assert_eq!(cache.len(), 1);
    assert!(cache.get("prod/data-db-1").is_none());
    writer.delete(&claim(true));
    assert!(cache.is_empty());

    let volumes = Cache::of(&[volume(DRIVER)], drivers());
    assert!(
        volumes
            .find_tagged("prod/data-db-0", |pv| pv.metadata.uid.as_deref()
                == Some("v-1"))
            .is_some()
    );
    assert!(volumes.find_tagged("prod/data-db-1", |_| true).is_none());
}
