//! Snapshots through Kubernetes: the work external-snapshotter splits between its
//! csi-snapshotter sidecar and its common snapshot-controller, in the same process as
//! the other loops, sharing their runner, queues, expectations and events.
//!
//! - [`content`] (loop `snapshotter`, the sidecar's part): a VolumeSnapshotContent of
//!   this driver → CreateSnapshot (named `snapshot-<VolumeSnapshot uid>`, so a retry or
//!   a restart finds the same snapshot) until it is ready, its status written from the
//!   answer; a pre-provisioned one (`snapshotHandle`) is looked up with ListSnapshots;
//!   a content deleted with `deletionPolicy: Delete` → DeleteSnapshot, then its
//!   finalizer goes.
//! - [`controller`] (loop `snapshot-controller`, the common controller's part, for the
//!   VolumeSnapshots of this driver only; run it only where the cluster runs no
//!   upstream snapshot-controller): a VolumeSnapshot of a claim → its
//!   VolumeSnapshotContent (`snapcontent-<uid>`), bound both ways, its status mirrored
//!   from the content's; a pre-provisioned content is bound; a VolumeSnapshot deleted →
//!   its content deleted (policy Delete) or released (Retain), never while a claim is
//!   being restored from it.
//! - [`types`]: the `snapshot.storage.k8s.io/v1` objects.
//!
//! Names, finalizers and annotations are upstream's, so either half can work with the
//! other half of the upstream stack.

pub mod content;
pub mod controller;
pub mod types;

use std::collections::BTreeMap;

use kube::runtime::reflector::Store;

use self::types::{ANN_DEFAULT_CLASS, VolumeSnapshot, VolumeSnapshotClass, VolumeSnapshotContent};

/// The caches of the snapshot objects (present when the API server serves them).
#[derive(Clone)]
pub struct SnapshotStores {
    pub snapshots: Store<VolumeSnapshot>,
    pub contents: Store<VolumeSnapshotContent>,
    pub classes: Store<VolumeSnapshotClass>,
}

/// The CSI snapshot name of a VolumeSnapshot: `snapshot-<uid>` (external-snapshotter's
/// `--snapshot-name-prefix` default).
pub fn snapshot_name(snapshot_uid: &str) -> String {
    format!("snapshot-{snapshot_uid}")
}

/// The VolumeSnapshotContent made for a VolumeSnapshot: `snapcontent-<uid>`.
pub fn content_name(snapshot_uid: &str) -> String {
    format!("snapcontent-{snapshot_uid}")
}

/// The class a VolumeSnapshot uses: the one it names, else the driver's default (the
/// one class of `driver` annotated as default). `Err` says what is wrong.
pub fn pick_class<'a>(
    named: Option<&str>,
    classes: &'a [std::sync::Arc<VolumeSnapshotClass>],
    driver: &str,
) -> Result<&'a VolumeSnapshotClass, String> {
    if let Some(name) = named {
        return classes
            .iter()
            .find(|c| c.metadata.name.as_deref() == Some(name))
            .map(|c| c.as_ref())
            .ok_or_else(|| format!("VolumeSnapshotClass {name} does not exist"));
    }
    let defaults: Vec<&VolumeSnapshotClass> = classes
        .iter()
        .filter(|c| c.driver == driver)
        .filter(|c| {
            c.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(ANN_DEFAULT_CLASS))
                .is_some_and(|v| v == "true")
        })
        .map(|c| c.as_ref())
        .collect();
    match defaults.as_slice() {
        [one] => Ok(one),
        [] => Err(format!(
            "the VolumeSnapshot names no volumeSnapshotClassName and driver {driver} has no default VolumeSnapshotClass (annotation {ANN_DEFAULT_CLASS}: \"true\")"
        )),
        _ => Err(format!(
            "driver {driver} has {} default VolumeSnapshotClasses; name one in volumeSnapshotClassName",
            defaults.len()
        )),
    }
}

/// A class's parameters for CreateSnapshot: without the reserved `csi.storage.k8s.io/*`
/// keys (the secret references), as external-snapshotter strips them.
pub fn snapshot_parameters(class: Option<&VolumeSnapshotClass>) -> BTreeMap<String, String> {
    class
        .and_then(|c| c.parameters.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, _)| !k.starts_with(stowage_api::keys::RESERVED_PREFIX))
        .collect()
}

/// The Secret a class names for CreateSnapshot/DeleteSnapshot, if any.
pub fn snapshot_secret(class: Option<&VolumeSnapshotClass>) -> Option<(String, String)> {
    let parameters = class?.parameters.as_ref()?;
    Some((
        parameters.get(types::PARAM_SECRET_NAMESPACE)?.clone(),
        parameters.get(types::PARAM_SECRET_NAME)?.clone(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use std::sync::Arc;

    fn class(name: &str, driver: &str, default: bool) -> Arc<VolumeSnapshotClass> {
        Arc::new(VolumeSnapshotClass {
            metadata: ObjectMeta {
                name: Some(name.into()),
                annotations: default
                    .then(|| BTreeMap::from([(ANN_DEFAULT_CLASS.into(), "true".into())])),
                ..Default::default()
            },
            driver: driver.into(),
            deletion_policy: types::DELETE.into(),
            ..Default::default()
        })
    }

    #[test]
    fn a_named_class_or_the_drivers_one_default() {
        let classes = vec![
            class("ours", "d", true),
            class("theirs", "other", true),
            class("plain", "d", false),
        ];
        assert_eq!(
            pick_class(None, &classes, "d")
                .unwrap()
                .metadata
                .name
                .as_deref(),
            Some("ours")
        );
        assert_eq!(
            pick_class(Some("plain"), &classes, "d")
                .unwrap()
                .metadata
                .name
                .as_deref(),
            Some("plain")
        );
        assert!(pick_class(Some("gone"), &classes, "d").is_err());
        let err = pick_class(None, &classes, "nobody").unwrap_err();
        assert!(err.contains("no default"), "{err}");
        let two = vec![class("a", "d", true), class("b", "d", true)];
        assert!(
            pick_class(None, &two, "d")
                .unwrap_err()
                .contains("2 default")
        );
    }

    #[test]
    fn names_and_parameters_follow_upstream() {
        assert_eq!(snapshot_name("u1"), "snapshot-u1");
        assert_eq!(content_name("u1"), "snapcontent-u1");
        let mut c = (*class("c", "d", false)).clone();
        c.parameters = Some(BTreeMap::from([
            ("tier".into(), "fast".into()),
            (types::PARAM_SECRET_NAME.into(), "s".into()),
            (types::PARAM_SECRET_NAMESPACE.into(), "ns".into()),
        ]));
        assert_eq!(
            snapshot_parameters(Some(&c)),
            BTreeMap::from([("tier".into(), "fast".into())])
        );
        assert_eq!(snapshot_secret(Some(&c)), Some(("ns".into(), "s".into())));
    }
}
