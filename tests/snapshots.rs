//! Snapshots, restores and clones through Kubernetes: the real `stowage local` binary
//! (snapshotter and snapshot-controller loops beside the provisioner, NFS on the
//! embedded server) against the fake API server with kube-controller-manager's PV
//! controller played by a stand-in. Every object transition: a VolumeSnapshot of a
//! claim becomes ready, a claim restored from it and a clone of the original hold the
//! same bytes, deletion with `Delete` removes the snapshot from the backend and with
//! `Retain` keeps it, a pre-provisioned content binds, a VolumeSnapshot deleted while a
//! claim is restored from it waits for the restore, and a SIGKILL between
//! CreateSnapshot and the content's status write neither leaks a snapshot nor makes a
//! second one.

mod common;

use std::time::Duration;

use common::cluster::*;
use kube::ResourceExt as _;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;
use stowage_loops::snapshots::types::{VolumeSnapshot, VolumeSnapshotClass, VolumeSnapshotContent};

const LOOPS: [&str; 2] = [
    "--loops",
    "provisioner,attacher,resizer,snapshotter,snapshot-controller",
];

fn snapshots(cluster: &Cluster) -> Api<VolumeSnapshot> {
    Api::namespaced(cluster.client.clone(), &cluster.namespace)
}

fn contents(cluster: &Cluster) -> Api<VolumeSnapshotContent> {
    Api::all(cluster.client.clone())
}

async fn create_snapshot_class(cluster: &Cluster, name: &str, policy: &str, default: bool) {
    let class: VolumeSnapshotClass = serde_json::from_value(json!({
        "metadata": {
            "name": name,
            "annotations": if default {
                json!({"snapshot.storage.kubernetes.io/is-default-class": "true"})
            } else {
                json!({})
            },
        },
        "driver": cluster.driver,
        "deletionPolicy": policy,
    }))
    .unwrap();
    Api::<VolumeSnapshotClass>::all(cluster.client.clone())
        .create(&PostParams::default(), &class)
        .await
        .unwrap_or_else(|e| panic!("creating VolumeSnapshotClass {name}: {e}"));
}

async fn create_snapshot(cluster: &Cluster, name: &str, claim: &str, class: Option<&str>) {
    let mut spec = json!({"source": {"persistentVolumeClaimName": claim}});
    if let Some(class) = class {
        spec["volumeSnapshotClassName"] = json!(class);
    }
    let vs: VolumeSnapshot =
        serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).unwrap();
    snapshots(cluster)
        .create(&PostParams::default(), &vs)
        .await
        .unwrap_or_else(|e| panic!("creating VolumeSnapshot {name}: {e}"));
}

/// Wait until the VolumeSnapshot is ready; returns it and its content.
async fn wait_ready(cluster: &Cluster, name: &str) -> (VolumeSnapshot, VolumeSnapshotContent) {
    wait_for(
        &format!("VolumeSnapshot {name} to be ready"),
        || async move {
            let vs = snapshots(cluster)
                .get_opt(name)
                .await
                .map_err(|e| e.to_string())?
                .ok_or("no VolumeSnapshot")?;
            let status = vs.status.clone().unwrap_or_default();
            if status.ready_to_use != Some(true) {
                return Err(format!("status {status:?}"));
            }
            let content_name = status
                .bound_volume_snapshot_content_name
                .clone()
                .ok_or("not bound")?;
            let content = contents(cluster)
                .get(&content_name)
                .await
                .map_err(|e| e.to_string())?;
            Ok((vs, content))
        },
    )
    .await
}

async fn wait_gone<K>(api: &Api<K>, name: &str)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    wait_for(&format!("{name} to be gone"), || async move {
        match api.get_opt(name).await.map_err(|e| e.to_string())? {
            None => Ok(()),
            Some(object) => Err(format!("still there: {:?}", object.meta())),
        }
    })
    .await
}

/// Snapshot directories on the embedded server's export.
fn snapshot_dirs(stowage: &Stowage) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(stowage.data.join(".stowage-snapshots"))
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn claim_from(name: &str, class: &str, kind: &str, source: &str) -> Pvc {
    let mut pvc = simple_claim(name, class);
    let api_group = (kind == "VolumeSnapshot").then_some("snapshot.storage.k8s.io");
    pvc.spec.as_mut().unwrap().data_source =
        Some(k8s_openapi::api::core::v1::TypedLocalObjectReference {
            api_group: api_group.map(str::to_owned),
            kind: kind.into(),
            name: source.into(),
        });
    pvc
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_restores_and_a_clone_copies_and_delete_removes_the_snapshot() {
    let cluster = Cluster::start("a_snapshot_restores_and_a_clone_copies").await;
    let stowage = Stowage::start(&cluster, "stowage", &LOOPS).await;
    let class = cluster
        .create_class("stowage-nfs", "Delete", &[], false)
        .await;
    create_snapshot_class(&cluster, "nfs-snapshots", "Delete", true).await;
    cluster
        .create_claim(&simple_claim("data-db-0", &class))
        .await;
    let (_, pv) = cluster.wait_bound("data-db-0").await;
    std::fs::write(
        stowage.data.join(pv.name_any()).join("table"),
        b"rows 1-100",
    )
    .unwrap();

    create_snapshot(&cluster, "nightly", "data-db-0", None).await;
    let (vs, content) = wait_ready(&cluster, "nightly").await;
    let uid = vs.uid().unwrap();
    assert_eq!(content.name_any(), format!("snapcontent-{uid}"));
    assert_eq!(content.spec.deletion_policy, "Delete");
    assert_eq!(
        content.spec.source.volume_handle.as_deref(),
        pv.spec
            .as_ref()
            .unwrap()
            .csi
            .as_ref()
            .map(|c| c.volume_handle.as_str())
    );
    let status = vs.status.clone().unwrap();
    assert_eq!(
        status.restore_size.as_ref().map(|q| q.0.as_str()),
        Some("1073741824")
    );
    assert!(status.creation_time.is_some());
    assert!(
        vs.finalizers()
            .iter()
            .any(|f| f == "snapshot.storage.kubernetes.io/volumesnapshot-bound-protection")
    );
    assert!(
        content
            .finalizers()
            .iter()
            .any(|f| f == "snapshot.storage.kubernetes.io/volumesnapshotcontent-bound-protection")
    );
    assert_eq!(snapshot_dirs(&stowage), [format!("snapshot-{uid}")]);
    // The source claim is protected only while the snapshot was being made.
    let source = cluster.claims().get("data-db-0").await.unwrap();
    assert!(
        !source
            .finalizers()
            .iter()
            .any(|f| f == "snapshot.storage.kubernetes.io/pvc-as-source-protection"),
        "{:?}",
        source.finalizers()
    );

    // The source changes; the restore holds the snapshot's bytes, the clone today's.
    std::fs::write(
        stowage.data.join(pv.name_any()).join("table"),
        b"rows 1-200",
    )
    .unwrap();
    cluster
        .create_claim(&claim_from("restored", &class, "VolumeSnapshot", "nightly"))
        .await;
    cluster
        .create_claim(&claim_from(
            "copy",
            &class,
            "PersistentVolumeClaim",
            "data-db-0",
        ))
        .await;
    let (_, restored_pv) = cluster.wait_bound("restored").await;
    let (_, copy_pv) = cluster.wait_bound("copy").await;
    let read = |pv: &Pv| std::fs::read(stowage.data.join(pv.name_any()).join("table")).unwrap();
    assert_eq!(read(&restored_pv), b"rows 1-100");
    assert_eq!(read(&copy_pv), b"rows 1-200");
    let source = cluster.claims().get("data-db-0").await.unwrap();
    assert!(
        !source
            .finalizers()
            .iter()
            .any(|f| f == "provisioner.storage.kubernetes.io/cloning-protection"),
        "the clone's source is released once the clone has its PV: {:?}",
        source.finalizers()
    );

    // Deleting the VolumeSnapshot (policy Delete) deletes the content and the snapshot.
    snapshots(&cluster)
        .delete("nightly", &DeleteParams::default())
        .await
        .unwrap();
    wait_gone(&snapshots(&cluster), "nightly").await;
    wait_gone(&contents(&cluster), &content.name_any()).await;
    wait_for("the snapshot's copy to be gone", || async {
        match snapshot_dirs(&stowage).as_slice() {
            [] => Ok(()),
            left => Err(format!("{left:?}")),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retain_keeps_the_snapshot_and_a_pre_provisioned_content_binds_to_it() {
    let cluster = Cluster::start("retain_keeps_the_snapshot").await;
    let stowage = Stowage::start(&cluster, "stowage", &LOOPS).await;
    let class = cluster
        .create_class("stowage-nfs", "Delete", &[], false)
        .await;
    create_snapshot_class(&cluster, "keep", "Retain", false).await;
    cluster
        .create_claim(&simple_claim("data-db-0", &class))
        .await;
    let (_, pv) = cluster.wait_bound("data-db-0").await;
    std::fs::write(stowage.data.join(pv.name_any()).join("kept"), b"keep me").unwrap();
    create_snapshot(&cluster, "weekly", "data-db-0", Some("keep")).await;
    let (_, content) = wait_ready(&cluster, "weekly").await;
    let handle = content.status.clone().unwrap().snapshot_handle.unwrap();

    snapshots(&cluster)
        .delete("weekly", &DeleteParams::default())
        .await
        .unwrap();
    wait_gone(&snapshots(&cluster), "weekly").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let kept = contents(&cluster).get(&content.name_any()).await.unwrap();
    assert!(
        kept.metadata.deletion_timestamp.is_none(),
        "Retain keeps the content"
    );
    assert_eq!(snapshot_dirs(&stowage).len(), 1, "and the snapshot");

    // Another namespace's user brings the retained snapshot back as a pre-provisioned
    // content and a VolumeSnapshot that names it.
    let preprovisioned: VolumeSnapshotContent = serde_json::from_value(json!({
        "metadata": {"name": "imported"},
        "spec": {
            "volumeSnapshotRef": {"namespace": cluster.namespace, "name": "imported"},
            "deletionPolicy": "Retain",
            "driver": cluster.driver,
            "source": {"snapshotHandle": handle},
        },
    }))
    .unwrap();
    contents(&cluster)
        .create(&PostParams::default(), &preprovisioned)
        .await
        .unwrap();
    let vs: VolumeSnapshot = serde_json::from_value(json!({
        "metadata": {"name": "imported"},
        "spec": {"source": {"volumeSnapshotContentName": "imported"}},
    }))
    .unwrap();
    snapshots(&cluster)
        .create(&PostParams::default(), &vs)
        .await
        .unwrap();
    let (vs, bound) = wait_ready(&cluster, "imported").await;
    assert_eq!(bound.spec.volume_snapshot_ref.uid, vs.metadata.uid);
    cluster
        .create_claim(&claim_from("back", &class, "VolumeSnapshot", "imported"))
        .await;
    let (_, back) = cluster.wait_bound("back").await;
    assert_eq!(
        std::fs::read(stowage.data.join(back.name_any()).join("kept")).unwrap(),
        b"keep me"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_deleted_while_a_claim_is_restored_from_it_waits_for_the_restore() {
    let cluster = Cluster::start("a_snapshot_deleted_while_restoring").await;
    let Some(fake) = cluster.fake_or_skip("a_snapshot_deleted_while_restoring", "fault injection")
    else {
        return;
    };
    let stowage = Stowage::start(&cluster, "stowage", &LOOPS).await;
    let class = cluster
        .create_class("stowage-nfs", "Delete", &[], false)
        .await;
    create_snapshot_class(&cluster, "nfs-snapshots", "Delete", true).await;
    cluster
        .create_claim(&simple_claim("data-db-0", &class))
        .await;
    let (_, pv) = cluster.wait_bound("data-db-0").await;
    std::fs::write(stowage.data.join(pv.name_any()).join("row"), b"1").unwrap();
    create_snapshot(&cluster, "s1", "data-db-0", None).await;
    let (_, content) = wait_ready(&cluster, "s1").await;

    // The restore's PV can't be created for a while: the restore is in flight.
    fake.fail_next("create", "persistentvolumes", 1000, 500, "InternalError");
    cluster
        .create_claim(&claim_from("restoring", &class, "VolumeSnapshot", "s1"))
        .await;
    wait_for("the restore to have begun", || async {
        let claim = cluster
            .claims()
            .get("restoring")
            .await
            .map_err(|e| e.to_string())?;
        if claim
            .finalizers()
            .contains(&cluster.provisioning_finalizer())
        {
            Ok(())
        } else {
            Err("no provisioning finalizer yet".to_owned())
        }
    })
    .await;
    snapshots(&cluster)
        .delete("s1", &DeleteParams::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let held = snapshots(&cluster).get("s1").await.unwrap();
    assert!(held.metadata.deletion_timestamp.is_some());
    assert!(
        contents(&cluster)
            .get_opt(&content.name_any())
            .await
            .unwrap()
            .is_some(),
        "the content (and the snapshot) stay while the restore is in flight"
    );
    assert_eq!(snapshot_dirs(&stowage).len(), 1);

    fake.clear_faults();
    let (_, restored) = cluster.wait_bound("restoring").await;
    assert_eq!(
        std::fs::read(stowage.data.join(restored.name_any()).join("row")).unwrap(),
        b"1"
    );
    wait_gone(&snapshots(&cluster), "s1").await;
    wait_gone(&contents(&cluster), &content.name_any()).await;
    wait_for("the snapshot's copy to be gone", || async {
        match snapshot_dirs(&stowage).as_slice() {
            [] => Ok(()),
            left => Err(format!("{left:?}")),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_before_the_contents_status_leaks_no_snapshot_and_makes_none_twice() {
    let cluster = Cluster::start("a_sigkill_before_the_contents_status").await;
    let Some(fake) =
        cluster.fake_or_skip("a_sigkill_before_the_contents_status", "fault injection")
    else {
        return;
    };
    let mut first = Stowage::start(&cluster, "first", &LOOPS).await;
    let class = cluster
        .create_class("stowage-nfs", "Delete", &[], false)
        .await;
    create_snapshot_class(&cluster, "nfs-snapshots", "Delete", true).await;
    cluster
        .create_claim(&simple_claim("data-db-0", &class))
        .await;
    let _ = cluster.wait_bound("data-db-0").await;

    // CreateSnapshot answers; the content's status is never written.
    fake.fail_next(
        "patch",
        "volumesnapshotcontents/status",
        100_000,
        500,
        "InternalError",
    );
    create_snapshot(&cluster, "kept", "data-db-0", None).await;
    create_snapshot(&cluster, "dropped", "data-db-0", None).await;
    let data = first.data.clone();
    wait_for("both snapshots to exist on the export", || {
        let data = data.clone();
        async move {
            let dirs: Vec<String> = std::fs::read_dir(data.join(".stowage-snapshots"))
                .map(|e| {
                    e.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            if dirs.len() == 2 {
                Ok(())
            } else {
                Err(format!("{dirs:?}"))
            }
        }
    })
    .await;
    first.kill();
    let kept_uid = snapshots(&cluster)
        .get("kept")
        .await
        .unwrap()
        .uid()
        .unwrap();
    // While stowage is down, one VolumeSnapshot goes.
    snapshots(&cluster)
        .delete("dropped", &DeleteParams::default())
        .await
        .unwrap();
    fake.clear_faults();
    let second = Stowage::start_with_data(&cluster, "second", &data, &LOOPS, &[]).await;
    let (_, content) = wait_ready(&cluster, "kept").await;
    assert_eq!(
        content
            .status
            .unwrap()
            .snapshot_handle
            .as_deref()
            .map(|h| h.ends_with(&format!("#snapshot-{kept_uid}"))),
        Some(true)
    );
    wait_gone(&snapshots(&cluster), "dropped").await;
    wait_for("only the kept snapshot on the export", || async {
        let dirs = snapshot_dirs(&second);
        if dirs == [format!("snapshot-{kept_uid}")] {
            Ok(())
        } else {
            Err(format!("{dirs:?}"))
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_blocks_a_snapshot_is_in_its_status_and_events() {
    let cluster = Cluster::start("what_blocks_a_snapshot").await;
    let _stowage = Stowage::start(&cluster, "stowage", &LOOPS).await;
    let class = cluster
        .create_class("stowage-nfs", "Delete", &[], false)
        .await;
    cluster
        .create_claim(&simple_claim("data-db-0", &class))
        .await;
    let _ = cluster.wait_bound("data-db-0").await;
    // No default VolumeSnapshotClass for the driver, none named.
    create_snapshot(&cluster, "orphan", "data-db-0", None).await;
    let api = snapshots(&cluster);
    let api = &api;
    let message = wait_for("the VolumeSnapshot's error", || async move {
        let vs = api.get("orphan").await.map_err(|e| e.to_string())?;
        vs.status
            .and_then(|s| s.error)
            .and_then(|e| e.message)
            .ok_or_else(|| "no error yet".to_owned())
    })
    .await;
    assert!(message.contains("default VolumeSnapshotClass"), "{message}");
    let warning = cluster
        .wait_warning(
            "orphan",
            "SnapshotCreationFailed",
            &["default VolumeSnapshotClass"],
        )
        .await;
    assert!(!warning.is_empty());
    // Then a default class appears: the same VolumeSnapshot goes on and becomes ready.
    // Classes are not watched: the next retry (backoff ≤ 1 s here) picks it up.
    create_snapshot_class(&cluster, "late-default", "Delete", true).await;
    let (vs, _) = wait_ready(&cluster, "orphan").await;
    assert!(
        vs.status.unwrap().error.is_none(),
        "the error is cleared once ready"
    );
}
