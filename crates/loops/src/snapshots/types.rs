//! The `snapshot.storage.k8s.io/v1` objects, typed from the API definitions
//! (external-snapshotter's `client/apis/volumesnapshot/v1`): VolumeSnapshotClass,
//! VolumeSnapshot and VolumeSnapshotContent, with the field names and types the API
//! server stores. Only what the loops read or write is typed; nothing here is
//! generated from (or copied out of) the upstream CRD files. The chart's CRDs are
//! checked against these types by tests/chart.rs.

use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use serde::{Deserialize, Serialize};

/// The API group.
pub const GROUP: &str = "snapshot.storage.k8s.io";
/// The version served and stored.
pub const VERSION: &str = "v1";

/// `kube::Resource` for a type of this group.
macro_rules! snapshot_resource {
    ($ty:ty, $kind:literal, $plural:literal, $scope:ty) => {
        impl kube::Resource for $ty {
            type DynamicType = ();
            type Scope = $scope;

            fn kind(_: &()) -> Cow<'_, str> {
                $kind.into()
            }

            fn group(_: &()) -> Cow<'_, str> {
                GROUP.into()
            }

            fn version(_: &()) -> Cow<'_, str> {
                VERSION.into()
            }

            fn plural(_: &()) -> Cow<'_, str> {
                $plural.into()
            }

            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }

            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

/// What `deletionPolicy` says happens to the snapshot on the storage when its
/// VolumeSnapshotContent goes.
pub const DELETE: &str = "Delete";
pub const RETAIN: &str = "Retain";

/// VolumeSnapshotClass (cluster-scoped; its fields are at the top level, no spec).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotClass {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub driver: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<BTreeMap<String, String>>,
    /// `Delete` or `Retain`.
    pub deletion_policy: String,
}
snapshot_resource!(
    VolumeSnapshotClass,
    "VolumeSnapshotClass",
    "volumesnapshotclasses",
    k8s_openapi::ClusterResourceScope
);

/// VolumeSnapshot (namespaced): a user's request for a snapshot of a claim, or a
/// binding to a pre-provisioned VolumeSnapshotContent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshot {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: VolumeSnapshotSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<VolumeSnapshotStatus>,
}
snapshot_resource!(
    VolumeSnapshot,
    "VolumeSnapshot",
    "volumesnapshots",
    k8s_openapi::NamespaceResourceScope
);

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotSpec {
    pub source: VolumeSnapshotSource,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_snapshot_class_name: Option<String>,
}

/// Exactly one of the two: a claim to snapshot (dynamic) or a content to bind to
/// (pre-provisioned).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_snapshot_content_name: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bound_volume_snapshot_content_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_to_use: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_size: Option<Quantity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<VolumeSnapshotError>,
}

/// The last error of a snapshot's creation (or deletion).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotError {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// VolumeSnapshotContent (cluster-scoped): the snapshot on the storage.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotContent {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: VolumeSnapshotContentSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<VolumeSnapshotContentStatus>,
}
snapshot_resource!(
    VolumeSnapshotContent,
    "VolumeSnapshotContent",
    "volumesnapshotcontents",
    k8s_openapi::ClusterResourceScope
);

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotContentSpec {
    /// The VolumeSnapshot this content is bound to (its uid once bound).
    pub volume_snapshot_ref: ObjectReference,
    /// `Delete` or `Retain`.
    pub deletion_policy: String,
    pub driver: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_snapshot_class_name: Option<String>,
    pub source: VolumeSnapshotContentSource,
    /// `Filesystem` or `Block`: the mode of the volume snapshotted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_volume_mode: Option<String>,
}

/// Exactly one of the two: a volume to snapshot (dynamic) or an existing snapshot's
/// handle (pre-provisioned).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotContentSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_handle: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_handle: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSnapshotContentStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_handle: Option<String>,
    /// Nanoseconds since the Unix epoch, as the CSI driver reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_time: Option<i64>,
    /// Bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_size: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_to_use: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<VolumeSnapshotError>,
}

/// The annotation that marks a class as its driver's default.
pub const ANN_DEFAULT_CLASS: &str = "snapshot.storage.kubernetes.io/is-default-class";
/// Finalizer on a VolumeSnapshot while a claim is restored from it (or it is bound).
pub const FINALIZER_AS_SOURCE: &str =
    "snapshot.storage.kubernetes.io/volumesnapshot-as-source-protection";
pub const FINALIZER_BOUND: &str = "snapshot.storage.kubernetes.io/volumesnapshot-bound-protection";
/// Finalizer on a VolumeSnapshotContent whose snapshot must be deleted with it.
pub const FINALIZER_CONTENT: &str =
    "snapshot.storage.kubernetes.io/volumesnapshotcontent-bound-protection";
/// Finalizer on a claim while a snapshot of it is being made.
pub const FINALIZER_PVC_SOURCE: &str = "snapshot.storage.kubernetes.io/pvc-as-source-protection";
/// On a content: its VolumeSnapshot is being deleted (set before the content goes).
pub const ANN_BEING_DELETED: &str = "snapshot.storage.kubernetes.io/volumesnapshot-being-deleted";
/// On a content: CreateSnapshot was called and its handle is not recorded yet.
pub const ANN_BEING_CREATED: &str = "snapshot.storage.kubernetes.io/volumesnapshot-being-created";

/// The extra CreateSnapshot parameters external-snapshotter sends with
/// `--extra-create-metadata` (stowage always does).
pub const PARAM_SNAPSHOT_NAME: &str = "csi.storage.k8s.io/volumesnapshot/name";
pub const PARAM_SNAPSHOT_NAMESPACE: &str = "csi.storage.k8s.io/volumesnapshot/namespace";
pub const PARAM_CONTENT_NAME: &str = "csi.storage.k8s.io/volumesnapshotcontent/name";
/// The class keys naming the secret CreateSnapshot/DeleteSnapshot carry.
pub const PARAM_SECRET_NAME: &str = "csi.storage.k8s.io/snapshotter-secret-name";
pub const PARAM_SECRET_NAMESPACE: &str = "csi.storage.k8s.io/snapshotter-secret-namespace";

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn objects_read_as_the_api_server_stores_them() {
        let content: VolumeSnapshotContent = serde_json::from_value(json!({
            "apiVersion": "snapshot.storage.k8s.io/v1",
            "kind": "VolumeSnapshotContent",
            "metadata": {"name": "snapcontent-1"},
            "spec": {
                "volumeSnapshotRef": {"namespace": "db", "name": "s1", "uid": "u1"},
                "deletionPolicy": "Delete",
                "driver": "stowage.csi.dev",
                "volumeSnapshotClassName": "nfs",
                "source": {"volumeHandle": "nfs###pvc-1#pvc-1#delete"},
                "sourceVolumeMode": "Filesystem"
            },
            "status": {"snapshotHandle": "nfs-snap###snapshot-u1", "creationTime": 1_700_000_000_000_000_000_i64,
                       "restoreSize": 1073741824, "readyToUse": true}
        }))
        .unwrap();
        assert_eq!(content.spec.volume_snapshot_ref.uid.as_deref(), Some("u1"));
        assert_eq!(content.status.as_ref().unwrap().restore_size, Some(1 << 30));
        let snapshot: VolumeSnapshot = serde_json::from_value(json!({
            "metadata": {"name": "s1", "namespace": "db"},
            "spec": {"source": {"persistentVolumeClaimName": "data-db-0"}, "volumeSnapshotClassName": "nfs"},
            "status": {"boundVolumeSnapshotContentName": "snapcontent-1", "readyToUse": true,
                       "restoreSize": "1Gi", "creationTime": "2026-12-07T10:00:00Z",
                       "error": {"message": "boom", "time": "2026-12-07T10:00:00Z"}}
        }))
        .unwrap();
        assert_eq!(
            snapshot.spec.source.persistent_volume_claim_name.as_deref(),
            Some("data-db-0")
        );
        let class: VolumeSnapshotClass = serde_json::from_value(json!({
            "metadata": {"name": "nfs"}, "driver": "stowage.csi.dev", "deletionPolicy": "Retain"
        }))
        .unwrap();
        assert_eq!(class.deletion_policy, RETAIN);
        use kube::Resource as _;
        assert_eq!(
            VolumeSnapshot::url_path(&(), Some("db")),
            "/apis/snapshot.storage.k8s.io/v1/namespaces/db/volumesnapshots"
        );
        assert_eq!(
            VolumeSnapshotContent::url_path(&(), None),
            "/apis/snapshot.storage.k8s.io/v1/volumesnapshotcontents"
        );
    }
}
