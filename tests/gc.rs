//! `stowage gc` through the binary against the fake API server and a real NFS export
//! (nfs-ganesha, tests/support/with-ganesha), served by a running `stowage local`:
//! orphans made the way they are made in clusters (a Retain PV deleted behind
//! stowage's back) are listed and, with --delete, removed — and nothing else is: not a
//! volume a PV refers to, nor one a VolumeSnapshotContent is made from, nor one a
//! claim still being provisioned will get. A PV whose volume is gone is listed. The
//! controller's periodic run (--gc-interval) counts the orphans in
//! `stowage_orphan_volumes`.
//!
//! The serving process keeps an index of its export's records: a volume deleted by the
//! `gc` command stays in that process's ListVolumes until it restarts (its periodic
//! run, `--gc-delete-older-than`, deletes through its own index).

mod common;

use std::process::Command;

use common::Ganesha;
use common::cluster::*;
use k8s_openapi::api::core::v1::PersistentVolume;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use stowage_api::proto::csi::{self as proto, controller_client::ControllerClient};
use stowage_loops::csi_client::channel;
use stowage_loops::snapshots::types::VolumeSnapshotContent;

/// `stowage gc` against `ganesha`'s export; (success, parsed JSON report, text).
fn gc(cluster: &Cluster, ganesha: &Ganesha, extra: &[&str]) -> (bool, Value, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_stowage"))
        .arg("gc")
        .args(["--kubeconfig", cluster.kubeconfig.to_str().unwrap()])
        .args(["--driver-name", &cluster.driver])
        .args([
            "--nfs-server",
            &ganesha.server,
            "--nfs-share",
            &ganesha.share,
        ])
        .args(["-o", "json"])
        .args(extra)
        .env_remove("KUBECONFIG")
        .output()
        .expect("running stowage gc");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let text = format!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let report = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    (out.status.success(), report, text)
}

fn volumes_of(report: &Value, list: &str) -> Vec<String> {
    report[list]
        .as_array()
        .unwrap_or_else(|| panic!("no {list} in {report}"))
        .iter()
        .map(|l| l["volume"].as_str().unwrap().to_owned())
        .collect()
}

/// Delete a PV as a user would with `kubectl delete pv` and its finalizers removed:
/// the volume stays on the export with nothing pointing at it.
async fn delete_pv_behind_stowages_back(cluster: &Cluster, name: &str) {
    let pvs: Api<PersistentVolume> = Api::all(cluster.client.clone());
    pvs.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    let _ = pvs.delete(name, &DeleteParams::default()).await;
    cluster.wait_pv_gone(name).await;
}

async fn handle_of(cluster: &Cluster, claim: &str) -> (String, String) {
    let (_, pv) = cluster.wait_bound(claim).await;
    let handle = pv.spec.unwrap().csi.unwrap().volume_handle;
    (pv.metadata.name.unwrap(), handle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_lists_and_deletes_orphans_and_nothing_else() {
    let Some(ganesha) = Ganesha::from_env("gc") else {
        return;
    };
    let cluster = Cluster::start("gc").await;
    if cluster
        .fake_or_skip("gc", "runs against the fake API server")
        .is_none()
    {
        return;
    }
    let stowage = Stowage::start(
        &cluster,
        "stowage",
        &[
            "--nfs-server",
            &ganesha.server,
            "--nfs-share",
            &ganesha.share,
            "--gc-interval",
            "300ms",
        ],
    )
    .await;
    let keep = cluster.create_class("keep", "Retain", &[], false).await;
    for claim in ["orphaned", "snapshotted", "in-use", "lost"] {
        cluster.create_claim(&simple_claim(claim, &keep)).await;
    }
    let (orphan_pv, orphan) = handle_of(&cluster, "orphaned").await;
    let (snapshotted_pv, snapshotted) = handle_of(&cluster, "snapshotted").await;
    let (_, in_use) = handle_of(&cluster, "in-use").await;
    let (_, lost) = handle_of(&cluster, "lost").await;

    // Orphans, made as they are in clusters: the claim, then the Retain PV deleted.
    for (claim, pv) in [("orphaned", &orphan_pv), ("snapshotted", &snapshotted_pv)] {
        cluster.delete_claim(claim).await;
        cluster.wait_claim_gone(claim).await;
        delete_pv_behind_stowages_back(&cluster, pv).await;
    }
    // A snapshot being made from one of them protects it.
    let content: VolumeSnapshotContent = serde_json::from_value(json!({
        "metadata": {"name": "from-snapshotted"},
        "spec": {
            "deletionPolicy": "Delete",
            "driver": cluster.driver,
            "source": {"volumeHandle": snapshotted},
            "volumeSnapshotRef": {"name": "s", "namespace": cluster.namespace},
        },
    }))
    .unwrap();
    Api::<VolumeSnapshotContent>::all(cluster.client.clone())
        .create(&PostParams::default(), &content)
        .await
        .unwrap();
    // A claim stowage will not provision (another driver's class) whose volume exists
    // under the name it would get: a claim "still being provisioned".
    let theirs = cluster.name("theirs");
    let class: k8s_openapi::api::storage::v1::StorageClass = serde_json::from_value(json!({
        "metadata": {"name": theirs},
        "provisioner": "other.csi.example",
    }))
    .unwrap();
    Api::<k8s_openapi::api::storage::v1::StorageClass>::all(cluster.client.clone())
        .create(&PostParams::default(), &class)
        .await
        .unwrap();
    let pending = cluster
        .create_claim(&simple_claim("pending", &theirs))
        .await;
    let pending_name = format!("pvc-{}", pending.metadata.uid.unwrap());
    let mut csi = ControllerClient::new(channel::connect(&stowage.socket).await.unwrap());
    let provisioning = csi
        .create_volume(proto::CreateVolumeRequest {
            name: pending_name.clone(),
            volume_capabilities: vec![common::mount_capability()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    // A PV whose volume is gone: deleted on the storage behind the cluster's back.
    csi.delete_volume(proto::DeleteVolumeRequest {
        volume_id: lost.clone(),
        ..Default::default()
    })
    .await
    .unwrap();

    // The dry run lists, changes nothing.
    let (ok, report, text) = gc(&cluster, &ganesha, &["--older-than", "0s"]);
    assert!(ok, "{text}");
    assert_eq!(volumes_of(&report, "orphans"), [orphan.as_str()], "{text}");
    assert_eq!(volumes_of(&report, "youngOrphans"), Vec::<String>::new());
    assert_eq!(
        volumes_of(&report, "pvsWithoutVolume"),
        [lost.as_str()],
        "{text}"
    );
    assert_eq!(report["inUse"], 3, "in-use, snapshotted, pending: {text}");
    assert!(report.get("deleted").is_none(), "{text}");
    // Young orphans are kept even by --delete.
    let (ok, report, text) = gc(&cluster, &ganesha, &["--delete"]);
    assert!(ok, "{text}");
    assert_eq!(
        volumes_of(&report, "youngOrphans"),
        [orphan.as_str()],
        "{text}"
    );
    assert!(report.get("deleted").is_none(), "{text}");
    // The controller's periodic run counts it.
    wait_for("stowage_orphan_volumes{backend=nfs} 1", || async {
        let text = stowage.metrics().await;
        match metric(&text, "stowage_orphan_volumes", &[("backend", "nfs")]) {
            Some(1.0) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    let (ok, report, text) = gc(&cluster, &ganesha, &["--delete", "--older-than", "0s"]);
    assert!(ok, "{text}");
    assert_eq!(report["deleted"], json!([orphan.clone()]), "{text}");
    // On the export (the serving stowage's own index is not re-read: it lists what it
    // knew until restarted): the orphan's record and directory are gone, the rest kept.
    let on_export = |id: &str| {
        let name = id.split('#').nth(4).unwrap().to_owned();
        (
            ganesha
                .share_dir
                .join(".stowage")
                .join(&name)
                .symlink_metadata()
                .is_ok(),
            ganesha.share_dir.join(&name).is_dir(),
        )
    };
    assert_eq!(on_export(&orphan), (false, false), "the orphan is deleted");
    for kept in [&snapshotted, &in_use, &provisioning] {
        assert_eq!(on_export(kept), (true, true), "{kept} was deleted");
    }
    let (ok, report, text) = gc(&cluster, &ganesha, &["--older-than", "0s"]);
    assert!(ok, "{text}");
    assert_eq!(
        volumes_of(&report, "orphans"),
        Vec::<String>::new(),
        "{text}"
    );
}
