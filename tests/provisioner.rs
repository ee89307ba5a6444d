//! The Kubernetes loops end to end: the real `stowage local` binary (CSI server,
//! embedded NFS server, provisioner/attacher/resizer loops) against an API server —
//! the in-process fake (`tests/common/fake_kube.rs`), or a real cluster when
//! `STOWAGE_E2E_KUBECONFIG` names its kubeconfig (then each test uses its own
//! namespace, driver name and StorageClasses, and deletes them afterwards; scenarios
//! that need fault injection are skipped there).
//!
//! Every wait polls the API (or the data directory) for at most 30 s and fails with
//! the state it last saw; a failing test also prints the tail of stowage's log.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::cluster::*;
use k8s_openapi::api::coordination::v1::Lease;
use kube::ResourceExt as _;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

const FAULTS: &str = "needs the fake API server's fault injection";
const STATEFULSET_CLAIMS: [&str; 3] = ["data-db-0", "data-db-1", "data-db-2"];
const BIND_COMPLETED: &str = "pv.kubernetes.io/bind-completed";
const BOUND_BY_CONTROLLER: &str = "pv.kubernetes.io/bound-by-controller";
const PROVISIONED_BY: &str = "pv.kubernetes.io/provisioned-by";
const IDENTITY_KEY: &str = "storage.kubernetes.io/csiProvisionerIdentity";

fn as_strs(list: &[String]) -> Vec<&str> {
    list.iter().map(String::as_str).collect()
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// The PV and the claim as external-provisioner and the PV controller leave them.
fn check_provisioned(cluster: &Cluster, claim: &Pvc, pv: &Pv, class: &str, reclaim: &str) {
    let context = format!("{}\n{}", describe_claim(claim), describe_pv(pv));
    let uid = claim.uid().expect("claim uid");
    assert_eq!(pv.name_any(), format!("pvc-{uid}"), "{context}");

    let spec = pv.spec.as_ref().expect("PV spec");
    let claim_ref = spec.claim_ref.as_ref().expect("PV claimRef");
    assert_eq!(claim_ref.uid.as_deref(), Some(uid.as_str()), "{context}");
    assert_eq!(claim_ref.name, claim.metadata.name, "{context}");
    assert_eq!(claim_ref.namespace, claim.metadata.namespace, "{context}");
    assert_eq!(claim_ref.kind.as_deref(), Some("PersistentVolumeClaim"));
    assert_eq!(claim_ref.api_version.as_deref(), Some("v1"));
    let ref_version = claim_ref
        .resource_version
        .as_deref()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| panic!("claimRef has no resourceVersion\n{context}"));
    // The version the claim had when its PV was built: never newer than the claim now.
    if let (Ok(then), Ok(now)) = (
        ref_version.parse::<u64>(),
        claim.resource_version().unwrap_or_default().parse::<u64>(),
    ) {
        assert!(
            then <= now,
            "claimRef.resourceVersion {then} > {now}\n{context}"
        );
    }
    assert!(
        pv.finalizers().iter().any(|f| f == PV_FINALIZER),
        "PV lacks {PV_FINALIZER}\n{context}"
    );
    assert_eq!(
        pv.annotations().get(PROVISIONED_BY),
        Some(&cluster.driver),
        "{context}"
    );
    let csi = spec.csi.as_ref().expect("PV spec.csi");
    assert_eq!(csi.driver, cluster.driver);
    assert!(!csi.volume_handle.is_empty(), "{context}");
    let identity = csi
        .volume_attributes
        .as_ref()
        .and_then(|a| a.get(IDENTITY_KEY))
        .unwrap_or_else(|| panic!("no {IDENTITY_KEY} volume attribute\n{context}"));
    assert!(identity.ends_with(&cluster.driver), "{identity}");
    let capacity = spec.capacity.as_ref().and_then(|c| c.get("storage"));
    assert_eq!(capacity.map(|q| q.0.as_str()), Some("1Gi"), "{context}");
    assert_eq!(
        spec.persistent_volume_reclaim_policy.as_deref(),
        Some(reclaim)
    );
    assert_eq!(spec.storage_class_name.as_deref(), Some(class));
    assert_eq!(
        spec.access_modes.as_deref(),
        Some(&["ReadWriteOnce".to_owned()][..])
    );
    assert_eq!(spec.volume_mode.as_deref(), Some("Filesystem"));
    assert_eq!(phase_of_pv(pv), Some("Bound"), "{context}");

    let annotations = claim.annotations();
    assert_eq!(
        annotations.get(BIND_COMPLETED).map(String::as_str),
        Some("yes"),
        "{context}"
    );
    assert_eq!(
        annotations.get(BOUND_BY_CONTROLLER).map(String::as_str),
        Some("yes"),
        "{context}"
    );
    let status = claim.status.as_ref().expect("claim status");
    assert_eq!(status.phase.as_deref(), Some("Bound"));
    assert_eq!(
        status
            .capacity
            .as_ref()
            .and_then(|c| c.get("storage"))
            .map(|q| q.0.as_str()),
        Some("1Gi"),
        "{context}"
    );
    assert_eq!(
        status.access_modes.as_deref(),
        Some(&["ReadWriteOnce".to_owned()][..])
    );
    assert!(
        !claim
            .finalizers()
            .contains(&cluster.provisioning_finalizer()),
        "the provisioning finalizer is left on a bound claim\n{context}"
    );
}

/// Wait until the data dir holds exactly these volume directories.
async fn wait_dirs(stowage: &Stowage, expected: &[String]) {
    let mut expected = expected.to_vec();
    expected.sort();
    let expected = &expected;
    wait_for(
        &format!(
            "the volume directories {expected:?} in {}",
            stowage.data.display()
        ),
        || async move {
            let dirs = stowage.volume_dirs();
            if dirs == *expected {
                Ok(())
            } else {
                Err(format!("directories: {dirs:?}"))
            }
        },
    )
    .await
}

async fn operations(stowage: &Stowage, operation: &str, result: &str) -> f64 {
    let text = stowage.metrics().await;
    metric(
        &text,
        "stowage_operations_total",
        &[("operation", operation), ("result", result)],
    )
    .unwrap_or(0.0)
}

/// Successful calls of a CSI controller method (`CreateVolume`, …) the CSI server saw.
async fn csi_calls(stowage: &Stowage, method: &str) -> f64 {
    let text = stowage.metrics().await;
    let method = format!("/csi.v1.Controller/{method}");
    metric(
        &text,
        "csi_sidecar_operations_seconds_count",
        &[("method_name", &method), ("grpc_status_code", "OK")],
    )
    .unwrap_or(0.0)
}

/// stowage with the EBS backend on moto, as `instance` in `zone`.
async fn start_on_ebs(
    cluster: &Cluster,
    moto: &common::moto::Moto,
    instance: &str,
    zone: &str,
) -> Stowage {
    let endpoint = moto.endpoint();
    Stowage::start_with_env(
        cluster,
        "stowage",
        &[
            "--backend",
            "ebs",
            "--ebs-endpoint",
            &endpoint,
            "--region",
            common::moto::REGION,
            "--zone",
            zone,
            "--instance-id",
            instance,
            "--instance-type",
            "m5.large",
        ],
        &[
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ],
    )
    .await
}

/// A claim `grow` of 1Gi in a new expandable EBS class, Bound, then asked to grow to
/// 2Gi; returns its PV as it was bound.
async fn bind_then_grow(cluster: &Cluster) -> Pv {
    let class = cluster
        .create_class("stowage-ebs", "Delete", &[], true)
        .await;
    cluster.create_claim(&simple_claim("grow", &class)).await;
    let (_, pv) = cluster.wait_bound("grow").await;
    cluster
        .claims()
        .patch(
            "grow",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"resources": {"requests": {"storage": "2Gi"}}}})),
        )
        .await
        .unwrap();
    pv
}

/// Give late (wrong) work a moment to show before asserting it did not happen.
async fn settle() {
    tokio::time::sleep(Duration::from_secs(1)).await;
}

// ---------------------------------------------------------------------------------------
// 1. A StatefulSet's claims, then scaling down.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statefulset_claims_bind_and_scaling_down_deletes_their_volumes() {
    let cluster = Cluster::start("statefulset_claims_bind_and_scaling_down").await;
    let stowage = Stowage::start(&cluster, "stowage", &[]).await;
    let class = cluster
        .create_class("stowage-nfs", "Delete", &[], false)
        .await;
    for name in STATEFULSET_CLAIMS {
        // What the StatefulSet controller makes for `db` with volumeClaimTemplate `data`.
        let labels = [("app", "db")];
        let pvc = claim(name, &class, Some("1Gi"), &["ReadWriteOnce"], &labels);
        cluster.create_claim(&pvc).await;
    }
    let bound = cluster.wait_all_bound(&names(&STATEFULSET_CLAIMS)).await;
    for (claim, pv) in &bound {
        check_provisioned(&cluster, claim, pv, &class, "Delete");
    }
    let volumes: Vec<String> = bound.iter().map(|(_, pv)| pv.name_any()).collect();
    wait_dirs(&stowage, &volumes).await;
    let (db0, pv0) = bound[0].clone();

    // Scale to 1: the StatefulSet's claims of db-1 and db-2 go.
    cluster.delete_claim("data-db-1").await;
    cluster.delete_claim("data-db-2").await;
    for (claim, pv) in &bound[1..] {
        cluster.wait_claim_gone(&claim.name_any()).await;
        cluster.wait_pv_gone(&pv.name_any()).await;
    }
    wait_dirs(&stowage, &volumes[..1]).await;

    // data-db-0 untouched.
    let (db0_now, pv0_now) = cluster.wait_bound("data-db-0").await;
    check_provisioned(&cluster, &db0_now, &pv0_now, &class, "Delete");
    if cluster.is_fake() {
        assert_eq!(db0_now.resource_version(), db0.resource_version());
        assert_eq!(pv0_now.resource_version(), pv0.resource_version());
    }
}

/// A reconcile that runs again right after its own writes sees the informer cache of
/// before them: it must not create or delete the volume a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_volume_is_created_once_and_deleted_once() {
    const N: usize = 10;
    let cluster = Cluster::start("each_volume_is_created_once_and_deleted_once").await;
    let stowage = Stowage::start(&cluster, "stowage", &[]).await;
    let class = cluster
        .create_class("stowage-nfs", "Delete", &[], false)
        .await;
    let names: Vec<String> = (0..N).map(|i| format!("data-db-{i}")).collect();
    for name in &names {
        cluster.create_claim(&simple_claim(name, &class)).await;
    }
    let bound = cluster.wait_all_bound(&names).await;
    for name in &names {
        cluster.delete_claim(name).await;
    }
    for (_, pv) in &bound {
        cluster.wait_pv_gone(&pv.name_any()).await;
    }
    wait_dirs(&stowage, &[]).await;
    settle().await;
    let counts = (
        csi_calls(&stowage, "CreateVolume").await,
        operations(&stowage, "provision", "success").await,
        csi_calls(&stowage, "DeleteVolume").await,
        operations(&stowage, "delete", "success").await,
    );
    println!(
        "{N} volumes: CreateVolume {} (provision successes {}), DeleteVolume {} (delete successes {})",
        counts.0, counts.1, counts.2, counts.3
    );
    let n = N as f64;
    assert_eq!(
        counts,
        (n, n, n, n),
        "(CreateVolume, provisions, DeleteVolume, deletes) for {N} volumes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retain_class_releases_the_pv_and_keeps_the_directory() {
    let cluster = Cluster::start("retain_class_releases_the_pv").await;
    let stowage = Stowage::start(&cluster, "stowage", &[]).await;
    let class = cluster
        .create_class("stowage-keep", "Retain", &[], false)
        .await;
    cluster
        .create_claim(&simple_claim("data-db-0", &class))
        .await;
    let (claim, pv) = cluster.wait_bound("data-db-0").await;
    check_provisioned(&cluster, &claim, &pv, &class, "Retain");
    wait_dirs(&stowage, &[pv.name_any()]).await;

    cluster.delete_claim("data-db-0").await;
    cluster.wait_claim_gone("data-db-0").await;
    let volumes = cluster.volumes();
    let pv_name = pv.name_any();
    let released = wait_for(
        "the Retain PV to be Released without the provisioner finalizer",
        || {
            let (volumes, pv_name) = (&volumes, &pv_name);
            async move {
                let pv = volumes.get_opt(pv_name).await.map_err(|e| e.to_string())?;
                match pv {
                    Some(pv)
                        if phase_of_pv(&pv) == Some("Released")
                            && !pv.finalizers().iter().any(|f| f == PV_FINALIZER) =>
                    {
                        Ok(pv)
                    }
                    other => Err(describe_pv_opt(&other)),
                }
            }
        },
    )
    .await;
    assert!(released.metadata.deletion_timestamp.is_none());
    assert_eq!(stowage.volume_dirs(), [pv_name.as_str()], "directory kept");
    assert_eq!(operations(&stowage, "delete", "success").await, 0.0);
}

// ---------------------------------------------------------------------------------------
// 2. Bad input.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_class_parameter_fails_with_an_event_naming_it() {
    let cluster = Cluster::start("an_unknown_class_parameter_fails").await;
    let stowage = Stowage::start(&cluster, "stowage", &[]).await;
    let class = cluster
        .create_class("stowage-colour", "Delete", &[("colour", "blue")], false)
        .await;
    cluster.create_claim(&simple_claim("painted", &class)).await;
    let note = cluster
        .wait_warning("painted", "ProvisioningFailed", &["colour"])
        .await;
    println!("ProvisioningFailed: {note}");
    // Tried again (with backoff), never with a different outcome.
    let (stowage_ref, cluster_ref) = (&stowage, &cluster);
    wait_for("a second failed provisioning attempt", || async move {
        let failed = operations(stowage_ref, "provision", "failed").await;
        if failed >= 2.0 {
            Ok(())
        } else {
            Err(format!(
                "failed attempts: {failed}\n{}",
                cluster_ref.describe().await
            ))
        }
    })
    .await;
    // The repeated failure is one Event whose series counts the attempts, not an Event
    // per attempt (events are published in the background, so wait for the count).
    wait_for(
        "the repeated warning counted into one series",
        || async move {
            let events = cluster_ref.events_about("painted").await;
            let failed: Vec<_> = events
                .iter()
                .filter(|e| e.reason.as_deref() == Some("ProvisioningFailed"))
                .collect();
            match failed.as_slice() {
                [one] if one.series.as_ref().is_some_and(|s| s.count >= 2) => Ok(()),
                _ => Err(describe_events(&events)),
            }
        },
    )
    .await;
    let claim = cluster.claims().get("painted").await.unwrap();
    assert_eq!(
        phase_of_claim(&claim),
        Some("Pending"),
        "{}",
        describe_claim(&claim)
    );
    assert_eq!(volume_name(&claim), None);
    assert!(
        cluster.our_pvs().await.is_empty(),
        "{}",
        cluster.describe().await
    );
    assert!(
        stowage.volume_dirs().is_empty(),
        "{:?}",
        stowage.volume_dirs()
    );
    let finalizer_left = claim
        .finalizers()
        .contains(&cluster.provisioning_finalizer());
    println!(
        "claim that cannot be provisioned carries the provisioning finalizer: {finalizer_left} ({:?})",
        claim.finalizers()
    );

    // It can still be deleted, and nothing is left behind.
    cluster.delete_claim("painted").await;
    cluster.wait_claim_gone("painted").await;
    assert!(cluster.our_pvs().await.is_empty());
    assert!(stowage.volume_dirs().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_with_a_bad_size_or_no_access_modes_fail_with_events() {
    let cluster = Cluster::start("claims_with_a_bad_size_or_no_access_modes").await;
    if cluster
        .fake_or_skip(
            "claims_with_a_bad_size_or_no_access_modes",
            "the real API server refuses such claims",
        )
        .is_none()
    {
        return;
    }
    let stowage = Stowage::start(&cluster, "stowage", &[]).await;
    let class = cluster
        .create_class("stowage-nfs", "Delete", &[], false)
        .await;
    let rwo = &["ReadWriteOnce"][..];
    // (claim, storage request, access modes, words the event must contain)
    type Case<'a> = (&'a str, Option<&'a str>, &'a [&'a str], &'a [&'a str]);
    let cases: [Case; 5] = [
        (
            "no-size",
            None,
            rwo,
            &["no spec.resources.requests.storage"],
        ),
        ("zero", Some("0"), rwo, &["\"0\"", "must be positive"]),
        ("junk", Some("lots"), rwo, &["\"lots\"", "is not a number"]),
        ("no-modes", Some("1Gi"), &[], &["no spec.accessModes"]),
        (
            "odd-mode",
            Some("1Gi"),
            &["ReadWriteSometimes"],
            &["ReadWriteSometimes"],
        ),
    ];
    for (name, size, modes, _) in &cases {
        cluster
            .create_claim(&claim(name, &class, *size, modes, &[]))
            .await;
    }
    cluster.create_claim(&simple_claim("fine", &class)).await;
    for (name, _, _, words) in &cases {
        let note = cluster
            .wait_warning(name, "ProvisioningFailed", words)
            .await;
        println!("{name}: {note}");
    }
    cluster.wait_bound("fine").await;
    for (name, ..) in &cases {
        let claim = cluster.claims().get(name).await.unwrap();
        assert_eq!(
            phase_of_claim(&claim),
            Some("Pending"),
            "{}",
            describe_claim(&claim)
        );
        assert!(
            !claim
                .finalizers()
                .contains(&cluster.provisioning_finalizer()),
            "rejected before CreateVolume, yet holds the finalizer: {}",
            describe_claim(&claim)
        );
    }
    assert_eq!(
        cluster.our_pvs().await.len(),
        1,
        "{}",
        cluster.describe().await
    );
    assert_eq!(
        stowage.volume_dirs().len(),
        1,
        "{:?}",
        stowage.volume_dirs()
    );
}

// ---------------------------------------------------------------------------------------
// 3. A volume without a PV never leaks; failures are retried.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_deleted_while_its_pv_cannot_be_created_leaves_no_volume() {
    const TEST: &str = "a_claim_deleted_while_its_pv_cannot_be_created";
    let cluster = Cluster::start(TEST).await;
    let Some(fake) = cluster.fake_or_skip(TEST, FAULTS) else {
        return;
    };
    let stowage = Stowage::start(&cluster, "stowage", &[]).await;
    let class = cluster
        .create_class("stowage-nfs", "Delete", &[], false)
        .await;
    fake.fail_next(
        "create",
        "persistentvolumes",
        1_000_000,
        500,
        "InternalError",
    );
    let created = cluster.create_claim(&simple_claim("orphan", &class)).await;
    let volume = format!("pvc-{}", created.uid().unwrap());

    let (cluster_ref, stowage_ref, volume_ref) = (&cluster, &stowage, &volume);
    wait_for(
        "the volume to exist without a PV while PV creation keeps failing",
        || async move {
            let claim = cluster_ref
                .claims()
                .get("orphan")
                .await
                .map_err(|e| e.to_string())?;
            let attempts = fake.calls_of("create", "persistentvolumes");
            let dirs = stowage_ref.volume_dirs();
            let held = claim
                .finalizers()
                .contains(&cluster_ref.provisioning_finalizer());
            if held && dirs == [volume_ref.clone()] && attempts >= 2 {
                Ok(())
            } else {
                Err(format!(
                    "{}\nPV create attempts: {attempts}\ndirectories: {dirs:?}",
                    describe_claim(&claim)
                ))
            }
        },
    )
    .await;
    assert!(fake.objects("persistentvolumes").is_empty());

    cluster.delete_claim("orphan").await;
    cluster.wait_claim_gone("orphan").await;
    wait_dirs(&stowage, &[]).await;
    assert!(fake.objects("persistentvolumes").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioning_retries_through_api_failures() {
    const TEST: &str = "provisioning_retries_through_api_failures";
    let cluster = Cluster::start(TEST).await;
    let Some(fake) = cluster.fake_or_skip(TEST, FAULTS) else {
        return;
    };
    // The informers' first lists fail too.
    fake.fail_next("list", "persistentvolumeclaims", 2, 500, "InternalError");
    fake.fail_next("create", "persistentvolumes", 3, 500, "InternalError");
    fake.fail_next("patch", "persistentvolumeclaims", 2, 500, "InternalError");
    let stowage = Stowage::start(&cluster, "stowage", &[]).await;
    let class = cluster
        .create_class("stowage-nfs", "Delete", &[], false)
        .await;
    cluster
        .create_claim(&simple_claim("stubborn", &class))
        .await;
    let (claim, pv) = cluster.wait_bound("stubborn").await;
    check_provisioned(&cluster, &claim, &pv, &class, "Delete");
    wait_dirs(&stowage, &[pv.name_any()]).await;
    assert_eq!(cluster.our_pvs().await.len(), 1);
    let calls = fake.calls();
    let count = |verb: &str, resource: &str| fake.calls_of(verb, resource);
    assert!(count("create", "persistentvolumes") >= 4, "{calls:?}");
    // The finalizer on (after two failures) and off: the bind is the PV controller's.
    assert!(count("patch", "persistentvolumeclaims") >= 4, "{calls:?}");
    assert_eq!(
        count("patch", "persistentvolumeclaims/status"),
        0,
        "{calls:?}"
    );
    assert_eq!(count("patch", "persistentvolumes/status"), 0, "{calls:?}");
    // The volume was made once: the PV's failed creations are retried without the driver.
    let metrics = stowage.metrics().await;
    let creates: f64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("csi_sidecar_operations_seconds_count{")
                && l.contains("/csi.v1.Controller/CreateVolume")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(creates, 1.0, "CreateVolume calls (3 PV creations failed)");
}

/// The finalizer of a deleted PV comes off through conflicts (on a real cluster
/// kube-controller-manager drops `kubernetes.io/pv-protection` meanwhile, and a patch
/// of the stale finalizer list was refused): it is re-read and retried, and
/// DeleteVolume is not called again for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pv_finalizer_conflicts_do_not_repeat_delete_volume() {
    const N: usize = 3;
    let cluster = Cluster::start("pv_finalizer_conflicts").await;
    let Some(fake) = cluster.fake_or_skip("pv_finalizer_conflicts", FAULTS) else {
        return;
    };
    let stowage = Stowage::start(&cluster, "stowage", &["--retry-interval-max", "300ms"]).await;
    let class = cluster
        .create_class("stowage-nfs", "Delete", &[], false)
        .await;
    let names: Vec<String> = (0..N).map(|i| format!("data-{i}")).collect();
    for name in &names {
        cluster.create_claim(&simple_claim(name, &class)).await;
    }
    let bound = cluster.wait_all_bound(&names).await;
    settle().await;
    let patches = || fake.calls_of("patch", "persistentvolumes");
    let before = patches();
    // N conflicts however they fall: fewer than the 5 a removal retries by itself.
    fake.fail_next("patch", "persistentvolumes", N, 409, "Conflict");
    for name in &names {
        cluster.delete_claim(name).await;
    }
    for (_, pv) in &bound {
        cluster.wait_pv_gone(&pv.name_any()).await;
    }
    wait_dirs(&stowage, &[]).await;
    settle().await;
    assert!(
        patches() - before >= 2 * N as u64,
        "{N} conflicts and one removal per PV: {} PV patches",
        patches() - before
    );
    let n = N as f64;
    assert_eq!(
        (
            csi_calls(&stowage, "CreateVolume").await,
            csi_calls(&stowage, "DeleteVolume").await,
            operations(&stowage, "delete", "success").await,
        ),
        (n, n, n),
        "(CreateVolume, DeleteVolume, deletes) for {N} volumes"
    );
}

// ---------------------------------------------------------------------------------------
// 4. Conflicts and broken watches.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicts_and_broken_watches_still_bind_every_claim_once() {
    let cluster = Cluster::start("conflicts_and_broken_watches").await;
    let Some(fake) = cluster.fake_or_skip("conflicts_and_broken_watches", FAULTS) else {
        return;
    };
    let stowage = Stowage::start(&cluster, "stowage", &["--retry-interval-max", "300ms"]).await;
    let class = cluster
        .create_class("stowage-nfs", "Delete", &[], false)
        .await;

    // The bind write conflicts: hold the PV back until the claim carries the
    // finalizer, then make the next claim writes (the bind) fail with 409 more often
    // than the bind retries by itself.
    fake.fail_next("create", "persistentvolumes", 6, 500, "InternalError");
    cluster.create_claim(&simple_claim("c-0", &class)).await;
    let cluster_ref = &cluster;
    wait_for("c-0 to carry the provisioning finalizer", || async move {
        let claim = cluster_ref
            .claims()
            .get("c-0")
            .await
            .map_err(|e| e.to_string())?;
        if claim
            .finalizers()
            .contains(&cluster_ref.provisioning_finalizer())
        {
            Ok(())
        } else {
            Err(describe_claim(&claim))
        }
    })
    .await;
    let patches_before = fake.calls_of("patch", "persistentvolumeclaims");
    fake.fail_next("patch", "persistentvolumeclaims", 4, 409, "Conflict");
    cluster.wait_bound("c-0").await;
    let patches = fake.calls_of("patch", "persistentvolumeclaims");
    assert!(
        patches - patches_before >= 5,
        "4 conflicts and the bind: {} claim patches",
        patches - patches_before
    );

    // Watches break while claims come and go through their provisioning.
    let mut all = vec!["c-0".to_owned()];
    fake.fail_next("watch", "persistentvolumeclaims", 1, 500, "InternalError");
    for i in 1..=4 {
        fake.break_watches();
        let name = format!("c-{i}");
        cluster.create_claim(&simple_claim(&name, &class)).await;
        all.push(name);
    }
    fake.break_watches();
    let bound = cluster.wait_all_bound(&all).await;
    fake.break_watches();
    let bound_again = cluster.wait_all_bound(&all).await;
    for ((claim, pv), (claim_again, _)) in bound.iter().zip(&bound_again) {
        check_provisioned(&cluster, claim, pv, &class, "Delete");
        assert_eq!(volume_name(claim), volume_name(claim_again));
    }
    let volumes: Vec<String> = bound.iter().map(|(_, pv)| pv.name_any()).collect();
    wait_dirs(&stowage, &volumes).await;
    let pvs = cluster.our_pvs().await;
    assert_eq!(pvs.len(), all.len(), "{}", cluster.describe().await);
    let owners: BTreeSet<String> = pvs
        .iter()
        .filter_map(|pv| pv.spec.as_ref()?.claim_ref.as_ref()?.uid.clone())
        .collect();
    assert_eq!(owners.len(), all.len(), "one PV per claim");
}

// ---------------------------------------------------------------------------------------
// 5. The attacher.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_attachments_are_attached_and_released_on_delete() {
    // One RWX volume attached to three nodes.
    const NODES: usize = 3;
    let cluster = Cluster::start("volume_attachments_are_attached").await;
    let stowage = Stowage::start(&cluster, "stowage", &[]).await;
    let class = cluster
        .create_class("stowage-nfs", "Delete", &[], false)
        .await;
    let shared = claim("shared", &class, Some("1Gi"), &["ReadWriteMany"], &[]);
    cluster.create_claim(&shared).await;
    let (_, pv) = cluster.wait_bound("shared").await;
    let attachments = cluster.attachments();
    let mut va_names = Vec::new();
    for i in 1..=NODES {
        let node = cluster.name(&format!("node-{i}"));
        cluster.create_csinode(&node).await;
        let va_name = cluster.name(&format!("csi-shared-{i}"));
        cluster
            .create_attachment(&va_name, &node, &pv.name_any())
            .await;
        va_names.push(va_name);
    }
    let finalizer = format!("external-attacher/{}", cluster.driver.replace('.', "-"));
    let (attachments_ref, finalizer_ref) = (&attachments, &finalizer);
    for va_name in &va_names {
        wait_for(&format!("{va_name} to be attached"), || async move {
            let va = attachments_ref
                .get(va_name)
                .await
                .map_err(|e| e.to_string())?;
            let attached = va.status.as_ref().is_some_and(|s| s.attached);
            if attached && va.finalizers().contains(finalizer_ref) {
                Ok(())
            } else {
                Err(format!("{:?} finalizers={:?}", va.status, va.finalizers()))
            }
        })
        .await;
    }

    // While attached anywhere, a released PV keeps its volume.
    cluster.delete_claim("shared").await;
    cluster.wait_claim_gone("shared").await;
    let (volumes, pv_name, stowage_ref) = (&cluster.volumes(), &pv.name_any(), &stowage);
    wait_for("the PV to be Released", || async move {
        let pv = volumes.get_opt(pv_name).await.map_err(|e| e.to_string())?;
        match pv {
            Some(pv) if phase_of_pv(&pv) == Some("Released") => Ok(()),
            other => Err(describe_pv_opt(&other)),
        }
    })
    .await;
    let still_there = || async move {
        let watched = Instant::now();
        while watched.elapsed() < Duration::from_secs(1) {
            assert!(
                volumes.get_opt(pv_name).await.unwrap().is_some(),
                "PV deleted while a VolumeAttachment uses it"
            );
            assert_eq!(stowage_ref.volume_dirs(), [pv_name.as_str()]);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    still_there().await;

    for (i, va_name) in va_names.iter().enumerate() {
        attachments
            .delete(va_name, &Default::default())
            .await
            .unwrap();
        wait_for(
            &format!("{va_name} to be detached and gone"),
            || async move {
                match attachments_ref
                    .get_opt(va_name)
                    .await
                    .map_err(|e| e.to_string())?
                {
                    None => Ok(()),
                    Some(va) => Err(format!(
                        "{:?} finalizers={:?} deleting={}",
                        va.status,
                        va.finalizers(),
                        va.metadata.deletion_timestamp.is_some()
                    )),
                }
            },
        )
        .await;
        if i + 1 < NODES {
            still_there().await;
        }
    }
    cluster.wait_pv_gone(pv_name).await;
    wait_dirs(&stowage, &[]).await;
    settle().await;
    let attaches = operations(&stowage, "attach", "success").await;
    let detaches = operations(&stowage, "detach", "success").await;
    let n = NODES as f64;
    assert_eq!(
        (attaches, detaches),
        (n, n),
        "(attach, detach) operations for {NODES} VolumeAttachments"
    );
}

// ---------------------------------------------------------------------------------------
// 6. Leader election.

async fn lease_holder(cluster: &Cluster, namespace: &str) -> Option<String> {
    Api::<Lease>::namespaced(cluster.client.clone(), namespace)
        .get_opt(&cluster.lease_name())
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec?.holder_identity)
}

async fn leader_gauge(stowage: &Stowage) -> Option<f64> {
    let text = stowage.http_get("/metrics").await.ok()?;
    metric(&text, "stowage_leader", &[])
}

/// `Ok` when `stowage` says it leads and the Lease (in `namespace`) names `identity`.
async fn leads(
    cluster: &Cluster,
    namespace: &str,
    stowage: &Stowage,
    identity: &str,
) -> Result<(), String> {
    let gauge = leader_gauge(stowage).await;
    let holder = lease_holder(cluster, namespace).await;
    if gauge == Some(1.0) && holder.as_deref() == Some(identity) {
        Ok(())
    } else {
        Err(format!("stowage_leader={gauge:?}; Lease holder {holder:?}"))
    }
}

/// The namespace of the leader-election Lease in tests.
fn lease_namespace(cluster: &Cluster) -> String {
    if cluster.is_fake() {
        "default".to_owned()
    } else {
        cluster.namespace.clone()
    }
}

/// Leader-election flags: `identity`, the Lease in `namespace`, and its timings
/// (lease duration, renew deadline; retries every 200 ms).
fn election_flags(namespace: &str, identity: &str, lease: &str, renew: &str) -> Vec<String> {
    [
        "--leader-election",
        "--leader-election-namespace",
        namespace,
        "--leader-election-identity",
        identity,
        "--leader-election-lease-duration",
        lease,
        "--leader-election-renew-deadline",
        renew,
        "--leader-election-retry-period",
        "200ms",
    ]
    .map(str::to_owned)
    .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_election_runs_one_replica_and_hands_over_when_it_dies() {
    let cluster = Cluster::start("leader_election").await;
    let namespace = lease_namespace(&cluster);
    let flags = |identity: &str| election_flags(&namespace, identity, "2s", "1500ms");
    let (flags_a, flags_b) = (flags("replica-a"), flags("replica-b"));
    let mut replicas = vec![
        Stowage::start(&cluster, "replica-a", &as_strs(&flags_a)).await,
        Stowage::start(&cluster, "replica-b", &as_strs(&flags_b)).await,
    ];
    let class = cluster
        .create_class("stowage-nfs", "Delete", &[], false)
        .await;

    let (cluster_ref, replicas_ref, ns) = (&cluster, &replicas, namespace.as_str());
    let leader = wait_for("exactly one leader", || async move {
        let a = leader_gauge(&replicas_ref[0]).await;
        let b = leader_gauge(&replicas_ref[1]).await;
        let holder = lease_holder(cluster_ref, ns).await;
        match (a, b, holder.as_deref()) {
            (Some(1.0), Some(0.0), Some("replica-a")) => Ok(0),
            (Some(0.0), Some(1.0), Some("replica-b")) => Ok(1),
            _ => Err(format!(
                "stowage_leader: a={a:?} b={b:?}; Lease holder {holder:?}"
            )),
        }
    })
    .await;
    let follower = 1 - leader;
    cluster.create_claim(&simple_claim("before", &class)).await;
    let (_, pv) = cluster.wait_bound("before").await;
    assert_eq!(replicas[leader].volume_dirs(), [pv.name_any()]);
    assert!(replicas[follower].volume_dirs().is_empty());
    assert_eq!(leader_gauge(&replicas[follower]).await, Some(0.0));

    replicas[leader].kill();
    let killed = Instant::now();
    let (replicas_ref, identity) = (&replicas, ["replica-a", "replica-b"][follower]);
    wait_for("the other replica to take over", || {
        leads(cluster_ref, ns, &replicas_ref[follower], identity)
    })
    .await;
    println!("takeover after SIGKILL: {:?}", killed.elapsed());
    cluster.create_claim(&simple_claim("after", &class)).await;
    let (_, pv_after) = cluster.wait_bound("after").await;
    assert_eq!(replicas[follower].volume_dirs(), [pv_after.name_any()]);
}

/// A waiting replica sees the leader's renewals as they happen (it watches the Lease), so
/// it leads within the lease duration of the last renewal. Replica b reads the Lease only
/// every 10 s: reading alone, it could not lead before its second read after the kill
/// (the first sees renewals it had not seen, so starts the 2 s lease over), ≥ 9.5 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_replica_leads_within_the_lease_duration_of_the_last_renewal() {
    let cluster = Cluster::start("leader_takeover").await;
    let namespace = lease_namespace(&cluster);
    let flags_a = election_flags(&namespace, "replica-a", "2s", "1500ms");
    let mut flags_b = election_flags(&namespace, "replica-b", "2s", "1500ms");
    *flags_b.last_mut().unwrap() = "10s".to_owned();
    let mut a = Stowage::start(&cluster, "replica-a", &as_strs(&flags_a)).await;
    let (cluster_ref, ns, a_ref) = (&cluster, namespace.as_str(), &a);
    wait_for("replica a to lead", || {
        leads(cluster_ref, ns, a_ref, "replica-a")
    })
    .await;
    let b = Stowage::start(&cluster, "replica-b", &as_strs(&flags_b)).await;
    let b_ref = &b;
    wait_for("replica b to wait", || async move {
        match leader_gauge(b_ref).await {
            Some(0.0) => Ok(()),
            other => Err(format!("stowage_leader={other:?}")),
        }
    })
    .await;
    a.kill();
    let killed = Instant::now();
    wait_for("replica b to lead", || {
        leads(cluster_ref, ns, b_ref, "replica-b")
    })
    .await;
    let took = killed.elapsed();
    assert!(
        took < Duration::from_secs(8),
        "replica b led {took:?} after the SIGKILL: it waited for its 10 s reads, not the 2 s lease"
    );
}

// ---------------------------------------------------------------------------------------
// 7. API economy.

type Calls = BTreeMap<(String, String), u64>;

const WRITES: [&str; 4] = ["create", "update", "patch", "delete"];

fn writes_between(before: &Calls, after: &Calls) -> BTreeMap<(String, String), u64> {
    after
        .iter()
        .filter(|((verb, _), _)| WRITES.contains(&verb.as_str()))
        .map(|(key, n)| (key.clone(), n - before.get(key).copied().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// Wait until the fake holds two events per claim for `claims` claims: Provisioning +
/// ProvisioningSucceeded, published in the background.
async fn wait_provisioning_events(fake: &common::fake_kube::FakeKube, claims: u64) {
    wait_for("two events per claim", || async move {
        let events = fake.objects("events.events.k8s.io").len() as u64;
        if events >= 2 * claims {
            Ok(())
        } else {
            Err(format!("{events} events"))
        }
    })
    .await;
}

/// Wait until the fake has seen no write for `quiet`.
async fn wait_quiet(cluster: &Cluster, quiet: Duration) {
    let fake = cluster.fake();
    let start = Instant::now();
    let mut last = (fake.total_writes(), Instant::now());
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let writes = fake.total_writes();
        if writes != last.0 {
            last = (writes, Instant::now());
        } else if last.1.elapsed() >= quiet {
            return;
        }
        assert!(
            start.elapsed() < deadline(),
            "writes never stopped: {writes}"
        );
    }
}

fn stowage_writes(metrics: &str) -> f64 {
    WRITES
        .iter()
        .map(|verb| {
            metric(
                metrics,
                "stowage_kube_api_requests_total",
                &[("verb", verb)],
            )
            .unwrap_or(0.0)
        })
        .sum()
}

fn print_breakdown(title: &str, writes: &BTreeMap<(String, String), u64>, per: u64) {
    println!("{title}");
    for ((verb, resource), n) in writes {
        println!(
            "  {verb:<7} {resource:<40} {n:>5}  ({:.2} per claim)",
            *n as f64 / per as f64
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_writes_per_claim_stay_bounded() {
    const N: u64 = 20;
    // The least: events Provisioning + ProvisioningSucceeded, the claim's finalizer on
    // and off, the PV = 5 (the bind and both phases are the PV controller's); one spare
    // for a conflict retry.
    const MAX_PROVISION_WRITES_PER_CLAIM: f64 = 6.0;
    // The least: delete the PV, drop its finalizer = 2 (Released is the PV controller's).
    const MAX_DELETE_WRITES_PER_CLAIM: f64 = 2.5;
    let cluster = Cluster::start("api_writes_per_claim_stay_bounded").await;
    let Some(fake) = cluster.fake_or_skip("api_writes_per_claim_stay_bounded", FAULTS) else {
        return;
    };
    let stowage = Stowage::start(&cluster, "stowage", &[]).await;
    let class = cluster
        .create_class("stowage-nfs", "Delete", &[], false)
        .await;
    wait_quiet(&cluster, Duration::from_millis(500)).await;
    let before = fake.calls();
    let stowage_before = stowage_writes(&stowage.metrics().await);
    let names: Vec<String> = (0..N).map(|i| format!("data-db-{i}")).collect();
    for name in &names {
        cluster.create_claim(&simple_claim(name, &class)).await;
    }
    let bound = cluster.wait_all_bound(&names).await;
    wait_provisioning_events(fake, N).await;
    wait_quiet(&cluster, Duration::from_secs(2)).await;
    let after = fake.calls();
    let mut writes = writes_between(&before, &after);
    // The test's own writes: the claims.
    *writes
        .get_mut(&("create".to_owned(), "persistentvolumeclaims".to_owned()))
        .unwrap() -= N;
    writes.retain(|_, n| *n > 0);
    let total: u64 = writes.values().sum();
    let per_claim = total as f64 / N as f64;
    print_breakdown(
        &format!("provisioning {N} claims: {total} writes by stowage, {per_claim:.2} per claim"),
        &writes,
        N,
    );
    let reported = stowage_writes(&stowage.metrics().await) - stowage_before;
    assert_eq!(
        reported, total as f64,
        "stowage_kube_api_requests_total writes vs what the API server saw"
    );
    let provision_per_claim = per_claim;

    // Deleting them.
    let before = fake.calls();
    for name in &names {
        cluster.delete_claim(name).await;
    }
    for (_, pv) in &bound {
        cluster.wait_pv_gone(&pv.name_any()).await;
    }
    wait_dirs(&stowage, &[]).await;
    wait_quiet(&cluster, Duration::from_secs(2)).await;
    let mut writes = writes_between(&before, &fake.calls());
    *writes
        .get_mut(&("delete".to_owned(), "persistentvolumeclaims".to_owned()))
        .unwrap() -= N;
    writes.retain(|_, n| *n > 0);
    let total: u64 = writes.values().sum();
    let per_claim = total as f64 / N as f64;
    print_breakdown(
        &format!("deleting {N} claims: {total} writes by stowage, {per_claim:.2} per claim"),
        &writes,
        N,
    );
    assert!(
        provision_per_claim <= MAX_PROVISION_WRITES_PER_CLAIM,
        "{provision_per_claim:.2} writes per provisioned claim (max {MAX_PROVISION_WRITES_PER_CLAIM})"
    );
    assert!(
        per_claim <= MAX_DELETE_WRITES_PER_CLAIM,
        "{per_claim:.2} writes per deleted claim (max {MAX_DELETE_WRITES_PER_CLAIM})"
    );
}

// ---------------------------------------------------------------------------------------
// 8. The resizer, on EBS (moto).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resizer_expands_an_ebs_volume_and_leaves_the_filesystem_to_the_node() {
    const TEST: &str = "resizer_expands_an_ebs_volume";
    const ZONE: &str = "us-east-1a";
    let Some(moto) = common::moto::Moto::start(TEST) else {
        return;
    };
    let instance = moto.ec2().run_instance(ZONE).await;
    let cluster = Cluster::start(TEST).await;
    let stowage = start_on_ebs(&cluster, &moto, &instance, ZONE).await;
    let class = cluster
        .create_class("stowage-ebs", "Delete", &[], true)
        .await;
    cluster.create_claim(&simple_claim("grow", &class)).await;
    let (claim, pv) = cluster.wait_bound("grow").await;
    check_provisioned(&cluster, &claim, &pv, &class, "Delete");
    let handle = pv
        .spec
        .as_ref()
        .unwrap()
        .csi
        .as_ref()
        .unwrap()
        .volume_handle
        .clone();
    assert_eq!(moto.volume(&handle).await.map(|v| v.size_gib), Some(1));

    cluster
        .claims()
        .patch(
            "grow",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"resources": {"requests": {"storage": "2Gi"}}}})),
        )
        .await
        .unwrap();
    let (cluster_ref, pv_name) = (&cluster, &pv.name_any());
    wait_for(
        "the PV to grow and the claim to wait for the node",
        || async move {
            let claim = cluster_ref
                .claims()
                .get("grow")
                .await
                .map_err(|e| e.to_string())?;
            let pv = cluster_ref
                .volumes()
                .get(pv_name)
                .await
                .map_err(|e| e.to_string())?;
            let capacity = pv
                .spec
                .as_ref()
                .and_then(|s| s.capacity.as_ref())
                .and_then(|c| c.get("storage"))
                .map(|q| q.0.clone());
            let status = claim.status.clone().unwrap_or_default();
            let pending = status
                .conditions
                .as_deref()
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "FileSystemResizePending" && c.status == "True");
            let node_pending = status
                .allocated_resource_statuses
                .as_ref()
                .and_then(|s| s.get("storage"))
                .map(String::as_str)
                == Some("NodeResizePending");
            if capacity.as_deref() == Some("2Gi") && pending && node_pending {
                Ok(())
            } else {
                Err(format!(
                    "PV capacity {capacity:?}; claim status {:?}",
                    claim.status
                ))
            }
        },
    )
    .await;
    // Nothing else may then report the new size as the claim's (filesystem) capacity.
    settle().await;
    let claim = cluster.claims().get("grow").await.unwrap();
    let status = claim.status.unwrap();
    assert_eq!(
        status
            .capacity
            .as_ref()
            .and_then(|c| c.get("storage"))
            .map(|q| q.0.as_str()),
        Some("1Gi"),
        "the claim's capacity grows only once the node has grown the filesystem"
    );
    assert_eq!(
        status
            .allocated_resources
            .as_ref()
            .and_then(|c| c.get("storage"))
            .map(|q| q.0.as_str()),
        Some("2Gi")
    );
    assert_eq!(moto.volume(&handle).await.map(|v| v.size_gib), Some(2));
    assert_eq!(operations(&stowage, "resize", "success").await, 1.0);
}

/// Watches of different resources are not ordered: the claim's grown request can reach
/// the resizer before its PV reaches the PV cache (a busy API server, a slow informer).
/// The resizer must expand it once the PV arrives, not drop the claim until its next
/// change. Here stowage's PV watch runs 2 s behind; the claim is grown as soon as it
/// is Bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_grown_before_its_pv_is_cached_is_expanded_when_the_pv_arrives() {
    const TEST: &str = "a_claim_grown_before_its_pv_is_cached";
    const ZONE: &str = "us-east-1a";
    let Some(moto) = common::moto::Moto::start(TEST) else {
        return;
    };
    let instance = moto.ec2().run_instance(ZONE).await;
    let cluster = Cluster::start(TEST).await;
    let Some(fake) = cluster.fake_or_skip(TEST, "delays stowage's PV watch") else {
        return;
    };
    fake.lag_watches("persistentvolumes", Duration::from_secs(2));
    let stowage = start_on_ebs(&cluster, &moto, &instance, ZONE).await;
    let pv = bind_then_grow(&cluster).await;
    let claims = cluster.claims();
    let claims = &claims;
    wait_for("the claim to wait for the node at 2Gi", || async move {
        let claim = claims.get("grow").await.map_err(|e| e.to_string())?;
        let status = claim.status.clone().unwrap_or_default();
        let state = status
            .allocated_resource_statuses
            .as_ref()
            .and_then(|s| s.get("storage"))
            .cloned();
        let allocated = status
            .allocated_resources
            .as_ref()
            .and_then(|a| a.get("storage"))
            .map(|q| q.0.clone());
        if state.as_deref() == Some("NodeResizePending") && allocated.as_deref() == Some("2Gi") {
            Ok(())
        } else {
            Err(format!("claim status {status:?}"))
        }
    })
    .await;
    assert!(
        stowage.log().contains("its PV is not in the cache"),
        "the grown claim reached the resizer after its PV (the race this test is about):\n{}",
        stowage.log()
    );
    let handle = &pv
        .spec
        .as_ref()
        .unwrap()
        .csi
        .as_ref()
        .unwrap()
        .volume_handle;
    assert_eq!(moto.volume(handle).await.map(|v| v.size_gib), Some(2));
    wait_quiet(&cluster, Duration::from_secs(1)).await;
    assert_eq!(csi_calls(&stowage, "ControllerExpandVolume").await, 1.0);
}

// ---------------------------------------------------------------------------------------
// 9. Sharing objects with kube-controller-manager and the kubelet (their stand-ins in
//    tests/common/stand_ins.rs): never fight them.

/// kube-controller-manager's PV controller marks a claim `Lost` when the claim says it
/// is bound (`bind-completed`) to a PV its own cache does not hold yet — which happens
/// when its PV informer lags (a busy controller-manager). stowage leaves the bind to
/// it, so the claim is never shown bound early, and nothing is fought over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_pv_controller_never_marks_a_claim_lost() {
    const TEST: &str = "a_lagging_pv_controller_never_marks_a_claim_lost";
    let cluster = Cluster::start_with_pv_lag(TEST, Duration::from_millis(1500)).await;
    let Some(fake) = cluster.fake_or_skip(TEST, "plays the PV controller with a lag") else {
        return;
    };
    let _stowage = Stowage::start(&cluster, "stowage", &[]).await;
    let class = cluster
        .create_class("stowage-nfs", "Delete", &[], false)
        .await;
    let names: Vec<String> = (0..10).map(|i| format!("data-db-{i}")).collect();
    for name in &names {
        cluster.create_claim(&simple_claim(name, &class)).await;
    }
    for (claim, pv) in cluster.wait_all_bound(&names).await {
        check_provisioned(&cluster, &claim, &pv, &class, "Delete");
    }
    wait_quiet(&cluster, Duration::from_secs(2)).await;
    let lost = cluster.pv_controller.as_ref().unwrap().lost_marks();
    assert_eq!(lost, 0, "claims marked Lost by the PV controller");
    // The phases and the bind are the PV controller's writes alone.
    for resource in ["persistentvolumeclaims/status", "persistentvolumes/status"] {
        for verb in ["patch", "update"] {
            assert_eq!(
                fake.calls_of(verb, resource),
                0,
                "stowage {verb} {resource}"
            );
        }
    }
}

/// A PV made by hand for the driver and pre-bound to a claim by name (no uid): the
/// PV controller binds it; stowage neither provisions for the claim nor touches the PV.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_pv_prebound_by_name_binds_without_a_fight() {
    const TEST: &str = "a_static_pv_prebound_by_name_binds_without_a_fight";
    // A busy controller-manager: its PV cache a little behind, so its writes of the PV
    // conflict with any other writer's.
    let cluster = Cluster::start_with_pv_lag(TEST, Duration::from_millis(300)).await;
    let Some(fake) = cluster.fake_or_skip(TEST, "counts writes per object") else {
        return;
    };
    let stowage = Stowage::start(&cluster, "stowage", &[]).await;
    let class = cluster
        .create_class("stowage-nfs", "Delete", &[], false)
        .await;
    let static_pv: Pv = serde_json::from_value(json!({
        "metadata": {"name": "existing-data"},
        "spec": {
            "capacity": {"storage": "5Gi"},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Delete",
            "storageClassName": class,
            "volumeMode": "Filesystem",
            "claimRef": {"namespace": cluster.namespace, "name": "handed-over"},
            "csi": {"driver": cluster.driver, "volumeHandle": "nfs####existing-data#retain"},
        },
    }))
    .unwrap();
    cluster
        .volumes()
        .create(&PostParams::default(), &static_pv)
        .await
        .unwrap();
    cluster
        .create_claim(&simple_claim("handed-over", &class))
        .await;
    let claims = cluster.claims();
    let claims = &claims;
    let claim = wait_for("the claim to be Bound", || async move {
        let claim = claims.get("handed-over").await.map_err(|e| e.to_string())?;
        if phase_of_claim(&claim) == Some("Bound") {
            Ok(claim)
        } else {
            Err(describe_claim(&claim))
        }
    })
    .await;
    assert_eq!(
        volume_name(&claim),
        Some("existing-data"),
        "{}",
        describe_claim(&claim)
    );
    wait_quiet(&cluster, Duration::from_secs(2)).await;
    let (by_stowage, by_pv_controller) = fake.writes_to("persistentvolumes", "existing-data");
    println!(
        "writes to the static PV: {by_stowage} by stowage, {by_pv_controller} by the PV controller"
    );
    assert!(
        by_stowage + by_pv_controller < 10,
        "{by_stowage} writes by stowage, {by_pv_controller} by the PV controller"
    );
    assert_eq!(csi_calls(&stowage, "CreateVolume").await, 0.0);
    let pv = cluster.volumes().get("existing-data").await.unwrap();
    assert_eq!(phase_of_pv(&pv), Some("Bound"), "{}", describe_pv(&pv));
}

/// A claim whose CreateVolume fails for good (a raw block volume from an NFS class) is
/// tried once per backoff step — its own writes (finalizer on and off) never cut the
/// wait short — and each repeated event is one Event whose series counts the attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_that_cannot_be_provisioned_waits_out_each_backoff_step() {
    const TEST: &str = "a_claim_that_cannot_be_provisioned_waits_out_each_backoff_step";
    const START: Duration = Duration::from_millis(200);
    let cluster = Cluster::start(TEST).await;
    let stowage = Stowage::start(&cluster, "stowage", &["--retry-interval-start", "200ms"]).await;
    let class = cluster
        .create_class("stowage-nfs", "Delete", &[], false)
        .await;
    let mut block = simple_claim("raw", &class);
    block.spec.as_mut().unwrap().volume_mode = Some("Block".into());
    let created = Instant::now();
    cluster.create_claim(&block).await;
    cluster
        .wait_warning("raw", "ProvisioningFailed", &["not block devices"])
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let elapsed = created.elapsed();
    let failed = operations(&stowage, "provision", "failed").await;
    // Attempts at 0, START, 3·START, 7·START, …: the most that fit in `elapsed`.
    let mut most = 0;
    let mut at = Duration::ZERO;
    while at <= elapsed {
        most += 1;
        at = at * 2 + START;
    }
    println!("{failed} failed attempts in {elapsed:?} (at most {most} at backoff steps)");
    assert!(failed >= 2.0, "retried: {failed} attempts");
    assert!(
        failed <= most as f64,
        "{failed} attempts in {elapsed:?}: more than one per backoff step ({most})"
    );
    let events = cluster.events_about("raw").await;
    for reason in ["ProvisioningFailed", "Provisioning"] {
        let same: Vec<_> = events
            .iter()
            .filter(|e| e.reason.as_deref() == Some(reason))
            .collect();
        assert!(
            same.len() <= 1,
            "{} {reason} events, not one series:\n{}",
            same.len(),
            describe_events(&events)
        );
    }
}

/// An expansion the node must finish (EBS): the resizer calls ControllerExpandVolume
/// once and hands the claim to the kubelet (NodeResizePending); while the kubelet works
/// (NodeResizeInProgress), fails once (NodeResizeFailed) and retries, the resizer
/// neither calls the driver again nor writes the claim, so none of the kubelet's
/// guarded writes conflicts, and the claim reaches its new capacity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expansion_is_handed_to_the_kubelet_once() {
    const TEST: &str = "an_expansion_is_handed_to_the_kubelet_once";
    const ZONE: &str = "us-east-1a";
    let Some(moto) = common::moto::Moto::start(TEST) else {
        return;
    };
    let instance = moto.ec2().run_instance(ZONE).await;
    let cluster = Cluster::start(TEST).await;
    let Some(fake) = cluster.fake_or_skip(TEST, "plays the kubelet") else {
        return;
    };
    let kubelet = common::stand_ins::Kubelet::start(fake, Duration::from_millis(300), true);
    let stowage = start_on_ebs(&cluster, &moto, &instance, ZONE).await;
    bind_then_grow(&cluster).await;
    let claims = cluster.claims();
    let claims = &claims;
    wait_for("the claim to reach 2Gi", || async move {
        let claim = claims.get("grow").await.map_err(|e| e.to_string())?;
        let status = claim.status.clone().unwrap_or_default();
        let capacity = status
            .capacity
            .as_ref()
            .and_then(|c| c.get("storage"))
            .map(|q| q.0.clone());
        if capacity.as_deref() == Some("2Gi") && status.allocated_resource_statuses.is_none() {
            Ok(())
        } else {
            Err(format!("claim status {status:?}"))
        }
    })
    .await;
    wait_quiet(&cluster, Duration::from_secs(1)).await;
    use std::sync::atomic::Ordering::SeqCst;
    let counts = &kubelet.counts;
    assert_eq!(csi_calls(&stowage, "ControllerExpandVolume").await, 1.0);
    assert_eq!(
        counts.node_expansions.load(SeqCst),
        2,
        "one failed node expansion and one that worked"
    );
    assert_eq!(
        counts.conflicts.load(SeqCst),
        0,
        "the kubelet's writes conflicted"
    );
    assert_eq!(counts.finished.load(SeqCst), 1);
    let events = cluster.events_about("grow").await;
    for reason in ["Resizing", "FileSystemResizeRequired"] {
        let same: Vec<_> = events
            .iter()
            .filter(|e| e.reason.as_deref() == Some(reason))
            .collect();
        assert_eq!(same.len(), 1, "{reason}:\n{}", describe_events(&events));
        assert!(
            same[0].series.is_none(),
            "{reason} repeated:\n{}",
            describe_events(&events)
        );
    }
}

/// A leader stopped cleanly (SIGTERM: `helm uninstall`, a rollout) gives its Lease up:
/// the holder is cleared at once, so the next replica leads at its first attempt
/// instead of waiting out a lease period. The Lease names the leader's pod as its
/// owner, so it goes with the pod when nobody is left to release it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_leader_releases_its_lease_and_the_next_leads_at_once() {
    const TEST: &str = "a_stopped_leader_releases_its_lease";
    let cluster = Cluster::start(TEST).await;
    let namespace = lease_namespace(&cluster);
    // A lease longer than the test's deadline: only a release lets the next lead in time.
    let flags = |identity: &str| election_flags(&namespace, identity, "60s", "40s");
    let pod_uid = "0b9f6d1e-7c55-4a36-9d35-5f2a3c1b7e01";
    let env = [("POD_NAMESPACE", namespace.as_str()), ("POD_UID", pod_uid)];
    let flags_a = flags("replica-a");
    let mut first = Stowage::start_with_env(&cluster, "replica-a", &as_strs(&flags_a), &env).await;
    let (cluster_ref, ns) = (&cluster, namespace.as_str());
    let leases: Api<Lease> = Api::namespaced(cluster.client.clone(), ns);
    let lease_name = cluster.lease_name();
    let (leases_ref, lease_ref) = (&leases, lease_name.as_str());
    wait_for("replica-a to lead", || async move {
        let holder = lease_holder(cluster_ref, ns).await;
        if holder.as_deref() == Some("replica-a") {
            Ok(())
        } else {
            Err(format!("Lease holder {holder:?}"))
        }
    })
    .await;
    let lease = leases.get(lease_ref).await.unwrap();
    let owners = lease.metadata.owner_references.clone().unwrap_or_default();
    assert_eq!(owners.len(), 1, "{:?}", lease.metadata);
    assert_eq!(
        (
            owners[0].kind.as_str(),
            owners[0].name.as_str(),
            owners[0].uid.as_str()
        ),
        ("Pod", "replica-a", pod_uid)
    );

    let status = first.terminate().await;
    assert!(status.success(), "replica-a exit: {status}");
    let lease = leases_ref.get(lease_ref).await.unwrap();
    let spec = lease.spec.clone().unwrap_or_default();
    assert!(
        spec.holder_identity
            .as_deref()
            .unwrap_or_default()
            .is_empty(),
        "the Lease still names a holder after a clean stop: {spec:?}"
    );

    let flags_b = flags("replica-b");
    let second = Stowage::start(&cluster, "replica-b", &as_strs(&flags_b)).await;
    let second_ref = &second;
    wait_for("replica-b to lead", || async move {
        let gauge = leader_gauge(second_ref).await;
        let holder = lease_holder(cluster_ref, ns).await;
        if gauge == Some(1.0) && holder.as_deref() == Some("replica-b") {
            Ok(())
        } else {
            Err(format!("stowage_leader={gauge:?}; Lease holder {holder:?}"))
        }
    })
    .await;
}

/// One ControllerPublish per attach and one ControllerUnpublish per detach (EBS), even
/// with the claim and its PV deleted right behind the VolumeAttachment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_attach_and_detach_calls_the_driver_once() {
    const TEST: &str = "each_attach_and_detach_calls_the_driver_once";
    const ZONE: &str = "us-east-1a";
    let Some(moto) = common::moto::Moto::start(TEST) else {
        return;
    };
    let instance = moto.ec2().run_instance(ZONE).await;
    let cluster = Cluster::start(TEST).await;
    let stowage = start_on_ebs(&cluster, &moto, &instance, ZONE).await;
    let class = cluster
        .create_class("stowage-ebs", "Delete", &[], false)
        .await;
    let node = cluster.name("node-1");
    let csinode: k8s_openapi::api::storage::v1::CSINode = serde_json::from_value(json!({
        "metadata": {"name": node},
        "spec": {"drivers": [{"name": cluster.driver, "nodeID": instance, "topologyKeys": []}]},
    }))
    .unwrap();
    Api::<k8s_openapi::api::storage::v1::CSINode>::all(cluster.client.clone())
        .create(&PostParams::default(), &csinode)
        .await
        .unwrap();
    let attachments = cluster.attachments();
    let attachments = &attachments;
    const ROUNDS: usize = 2;
    for round in 0..ROUNDS {
        let name = format!("disk-{round}");
        cluster.create_claim(&simple_claim(&name, &class)).await;
        let (_, pv) = cluster.wait_bound(&name).await;
        let va_name = cluster.name(&format!("csi-{round}"));
        cluster
            .create_attachment(&va_name, &node, &pv.name_any())
            .await;
        let va_ref = &va_name;
        wait_for("the attachment", || async move {
            let va = attachments.get(va_ref).await.map_err(|e| e.to_string())?;
            if va.status.as_ref().is_some_and(|s| s.attached) {
                Ok(())
            } else {
                Err(format!("{:?}", va.status))
            }
        })
        .await;
        // Detach, and the claim right behind it (as a StatefulSet scale-down does).
        attachments
            .delete(&va_name, &Default::default())
            .await
            .unwrap();
        cluster.delete_claim(&name).await;
        wait_for("the attachment to go", || async move {
            match attachments
                .get_opt(va_ref)
                .await
                .map_err(|e| e.to_string())?
            {
                None => Ok(()),
                Some(va) => Err(format!("{:?} {:?}", va.status, va.finalizers())),
            }
        })
        .await;
        cluster.wait_pv_gone(&pv.name_any()).await;
    }
    settle().await;
    let publishes = csi_calls(&stowage, "ControllerPublishVolume").await;
    let unpublishes = csi_calls(&stowage, "ControllerUnpublishVolume").await;
    let rounds = ROUNDS as f64;
    assert_eq!(
        (publishes, unpublishes),
        (rounds, rounds),
        "(ControllerPublish, ControllerUnpublish) calls for {ROUNDS} attach + detach"
    );
    assert_eq!(moto.ec2().count_volumes().await, 0, "volumes left in EC2");
}

/// VolumeAttributesClass on EBS: a claim created with a class gets a volume of the
/// class's type (CreateVolume's mutable parameters) and a PV naming the class; a claim
/// moved to another class is modified in EC2 (ModifyVolume seen by moto) and its
/// status says so; a class of another driver is Infeasible, with no EC2 call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_attributes_class_reaches_ec2_and_the_claims_status() {
    const TEST: &str = "a_volume_attributes_class_reaches_ec2";
    const ZONE: &str = "us-east-1a";
    let Some(moto) = common::moto::Moto::start(TEST) else {
        return;
    };
    let instance = moto.ec2().run_instance(ZONE).await;
    let cluster = Cluster::start(TEST).await;
    let stowage = start_on_ebs(&cluster, &moto, &instance, ZONE).await;
    let class = cluster
        .create_class("stowage-ebs", "Delete", &[("type", "gp3")], false)
        .await;
    let classes: Api<k8s_openapi::api::storage::v1::VolumeAttributesClass> =
        Api::all(cluster.client.clone());
    for (name, driver, parameters) in [
        (
            "fast",
            cluster.driver.as_str(),
            json!({"type": "io2", "iops": "3000"}),
        ),
        (
            "faster",
            cluster.driver.as_str(),
            json!({"type": "io2", "iops": "6000"}),
        ),
        ("theirs", "ebs.csi.aws.com", json!({"type": "gp2"})),
    ] {
        let vac = serde_json::from_value(json!({
            "metadata": {"name": cluster.name(name)},
            "driverName": driver,
            "parameters": parameters,
        }))
        .unwrap();
        classes.create(&PostParams::default(), &vac).await.unwrap();
    }
    // 10 GiB: io2 needs 4 GiB at least, and at most 500 IOPS per GiB.
    let mut pvc = claim("tuned", &class, Some("10Gi"), &["ReadWriteOnce"], &[]);
    pvc.spec.as_mut().unwrap().volume_attributes_class_name = Some(cluster.name("fast"));
    cluster.create_claim(&pvc).await;
    let (claim, pv) = cluster.wait_bound("tuned").await;
    let handle = pv
        .spec
        .as_ref()
        .unwrap()
        .csi
        .as_ref()
        .unwrap()
        .volume_handle
        .clone();
    assert_eq!(
        pv.spec
            .as_ref()
            .unwrap()
            .volume_attributes_class_name
            .as_deref(),
        Some(cluster.name("fast").as_str())
    );
    let ec2_volume = moto.ec2().volume(&handle).await.unwrap();
    assert_eq!(
        ec2_volume.volume_type.as_deref(),
        Some("io2"),
        "created with the class's type"
    );
    assert_eq!(
        claim
            .status
            .as_ref()
            .unwrap()
            .current_volume_attributes_class_name
            .as_deref(),
        Some(cluster.name("fast").as_str())
    );
    settle().await;
    assert_eq!(
        csi_calls(&stowage, "ControllerModifyVolume").await,
        0.0,
        "nothing to modify after creation"
    );

    // Moved to another class: ModifyVolume, then the status.
    cluster
        .claims()
        .patch(
            "tuned",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"volumeAttributesClassName": cluster.name("faster")}})),
        )
        .await
        .unwrap();
    let claims = cluster.claims();
    let claims = &claims;
    let faster = cluster.name("faster");
    let faster = &faster;
    wait_for("the claim's current class to be `faster`", || async move {
        let claim = claims.get("tuned").await.map_err(|e| e.to_string())?;
        let status = claim.status.clone().unwrap_or_default();
        if status.current_volume_attributes_class_name.as_deref() == Some(faster.as_str())
            && status.modify_volume_status.is_none()
        {
            Ok(())
        } else {
            Err(format!("{status:?}"))
        }
    })
    .await;
    assert_eq!(csi_calls(&stowage, "ControllerModifyVolume").await, 1.0);
    let modified = moto
        .ec2()
        .ok("DescribeVolumesModifications", &[("VolumeId.1", &handle)])
        .await;
    assert!(
        modified.contains("6000"),
        "EC2 saw ModifyVolume to 6000 IOPS: {modified}"
    );
    let pv = cluster.volumes().get(&pv.name_any()).await.unwrap();
    assert_eq!(
        pv.spec
            .as_ref()
            .unwrap()
            .volume_attributes_class_name
            .as_deref(),
        Some(faster.as_str())
    );

    // Another driver's class: Infeasible, no call.
    cluster
        .claims()
        .patch(
            "tuned",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"volumeAttributesClassName": cluster.name("theirs")}})),
        )
        .await
        .unwrap();
    let theirs = cluster.name("theirs");
    let theirs = &theirs;
    wait_for("the claim's modification to be Infeasible", || async move {
        let claim = claims.get("tuned").await.map_err(|e| e.to_string())?;
        let status = claim.status.clone().unwrap_or_default();
        match status.modify_volume_status {
            Some(m)
                if m.status == "Infeasible"
                    && m.target_volume_attributes_class_name.as_deref()
                        == Some(theirs.as_str()) =>
            {
                Ok(())
            }
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(csi_calls(&stowage, "ControllerModifyVolume").await, 1.0);
}

/// A restart among volumes that need nothing is quiet (#23): stowage started again
/// against bound claims and their PVs (as it and the PV controller left them) lists and
/// watches them and then writes nothing — no finalizer, no status, no event — and calls
/// no CSI Controller method.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_among_bound_volumes_writes_nothing() {
    const N: u64 = 30;
    let test = "a_restart_among_bound_volumes_writes_nothing";
    let cluster = Cluster::start(test).await;
    let Some(fake) = cluster.fake_or_skip(test, FAULTS) else {
        return;
    };
    let mut first = Stowage::start(&cluster, "first", &[]).await;
    let class = cluster
        .create_class("stowage-nfs", "Delete", &[], false)
        .await;
    let names: Vec<String> = (0..N).map(|i| format!("data-db-{i}")).collect();
    for name in &names {
        cluster.create_claim(&simple_claim(name, &class)).await;
    }
    cluster.wait_all_bound(&names).await;
    wait_provisioning_events(fake, N).await;
    wait_quiet(&cluster, Duration::from_secs(1)).await;
    let data = first.data.clone();
    first.kill();

    let before = fake.calls();
    let second = Stowage::start_with_data(&cluster, "second", &data, &[], &[]).await;
    wait_listed_again(fake, &before).await;
    // Every key the informers handed over has been looked at well within this.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let writes = writes_between(&before, &fake.calls());
    assert!(writes.is_empty(), "writes after a restart: {writes:?}");
    let metrics = second.metrics().await;
    let controller_calls: Vec<&str> = metrics
        .lines()
        .filter(|l| {
            l.starts_with("csi_sidecar_operations_seconds_count{")
                && l.contains("/csi.v1.Controller/")
                && !l.contains("ControllerGetCapabilities")
        })
        .collect();
    assert!(
        controller_calls.is_empty(),
        "CSI calls after a restart: {controller_calls:?}"
    );
    assert_eq!(
        cluster.our_pvs().await.len() as u64,
        N,
        "every PV still there"
    );

    // The loops have no periodic resync; what stands for one is the relist after a
    // watch expires (410 Gone): it must be as quiet.
    let before_relist = fake.calls();
    fake.compact();
    wait_listed_again(fake, &before_relist).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let writes = writes_between(&before_relist, &fake.calls());
    assert!(writes.is_empty(), "writes after a relist: {writes:?}");
    drop(second);
}

/// Wait until the loops have listed claims, PVs and attachments again since `before`
/// (a restart's first lists, or the relists after their watches expired).
async fn wait_listed_again(
    fake: &common::fake_kube::FakeKube,
    before: &BTreeMap<(String, String), u64>,
) {
    for resource in [
        "persistentvolumeclaims",
        "persistentvolumes",
        "volumeattachments",
    ] {
        let listed = before
            .get(&("list".to_owned(), resource.to_owned()))
            .copied()
            .unwrap_or(0);
        wait_for(&format!("the loops list {resource} again"), || async move {
            if fake.calls_of("list", resource) > listed {
                Ok(())
            } else {
                Err(format!("no new list of {resource}"))
            }
        })
        .await;
    }
}

/// Where the API server streams lists (WatchList), the informers use it: no list
/// request at start or after a watch expires, and claims are provisioned as with pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn informers_stream_their_lists_where_the_api_server_can() {
    let test = "informers_stream_their_lists_where_the_api_server_can";
    let cluster = Cluster::start(test).await;
    let Some(fake) = cluster.fake_or_skip(test, FAULTS) else {
        return;
    };
    fake.stream_lists();
    let _stowage = Stowage::start(&cluster, "stream", &[]).await;
    let class = cluster
        .create_class("stowage-nfs", "Delete", &[], false)
        .await;
    cluster
        .create_claim(&simple_claim("data-db-0", &class))
        .await;
    cluster.wait_all_bound(&["data-db-0".to_owned()]).await;
    fake.compact();
    cluster
        .create_claim(&simple_claim("data-db-1", &class))
        .await;
    cluster.wait_all_bound(&["data-db-1".to_owned()]).await;
    for resource in [
        "persistentvolumeclaims",
        "persistentvolumes",
        "volumeattachments",
        "storageclasses",
    ] {
        assert_eq!(
            fake.calls_of("list", resource),
            0,
            "{resource} listed although the API server streams"
        );
    }
}
