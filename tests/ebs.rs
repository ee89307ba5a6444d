//! The EBS backend through the real CSI server against a real EC2 emulator (moto),
//! with a fault-injecting proxy in front of it and a test "hypervisor" that turns
//! attachments into loop devices: validation before any EC2 call, idempotency by name,
//! topology, attach/stage/publish on real ext4/xfs, throttling, creating→available,
//! batched waits for concurrent creates, timeouts, snapshots, expansion, and a
//! controller killed between EC2's answer and the CSI reply. Needs root.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::fault_proxy::FaultProxy;
use common::hypervisor::Hypervisor;
use common::moto::Moto;
use common::*;
use stowage::run::{Plan, Running, start};
use stowage_api::proto::csi::{
    self as proto, controller_client::ControllerClient, node_client::NodeClient,
};
use stowage_driver::backend::ebs::EbsBackend;
use stowage_driver::backend::ebs::cloud::{Cloud, Ec2Settings};
use stowage_driver::backend::{Backend, Backends};
use stowage_driver::csi::node::NodeConfig;
use stowage_driver::node::SystemMounter;
use stowage_loops::csi_client::channel;
use tonic::Code;
use tonic::transport::Channel;

const ZONE: &str = "us-east-1a";

struct Ebs {
    moto: Moto,
    proxy: FaultProxy,
    hv: Hypervisor,
    instance: String,
    cloud: Arc<Cloud>,
    running: Running,
    channel: Channel,
    dir: tempfile::TempDir,
}

impl Ebs {
    async fn start(test: &str, max_attempts: u32) -> Option<Ebs> {
        let moto = Moto::start(test)?;
        let instance = moto.ec2().run_instance(ZONE).await;
        let proxy = FaultProxy::start(&moto.endpoint()).await;
        let dir = tempfile::tempdir().unwrap();
        let cloud = Arc::new(
            Cloud::new(Ec2Settings {
                endpoint: Some(proxy.endpoint()),
                static_credentials: Some(("test".into(), "test".into())),
                max_attempts,
                call_timeout: Duration::from_secs(2),
                wait_timeout: Duration::from_secs(20),
                wait_interval: (Duration::from_millis(20), Duration::from_millis(200)),
                ..Ec2Settings::default()
            })
            .await,
        );
        let backend = EbsBackend::new(Arc::clone(&cloud), Some(ZONE.into()));
        let hv = Hypervisor::new(
            moto.endpoint(),
            &instance,
            dir.path().join("by-id"),
            dir.path().join("images"),
        );
        let mut node = NodeConfig::new(instance.clone());
        node.by_id_dir = dir.path().join("by-id");
        node.topology = Some(BTreeMap::from([(
            stowage_driver::backend::ebs::ZONE_KEY.to_owned(),
            ZONE.to_owned(),
        )]));
        node.max_volumes = 26;
        node.device_wait = Duration::from_millis(200);
        // Staging and target paths are under the temp dir, standing in for kubelet's.
        node.kubelet_dir = dir.path().to_path_buf();
        let running = start(Plan {
            socket: dir.path().join("csi.sock"),
            driver_name: "stowage.csi.dev".into(),
            backends: Backends::new(vec![Arc::new(backend) as Arc<dyn Backend>]),
            controller: true,
            node: Some(node),
            nfs_node: None,
            mounter: Arc::new(SystemMounter::default()),
            http_addr: None,
            shutdown_grace: Duration::from_secs(2),
            backend_check_interval: stowage::run::DEFAULT_BACKEND_CHECK_INTERVAL,
        })
        .await
        .unwrap();
        let channel = channel::connect(&running.socket).await.unwrap();
        Some(Ebs {
            moto,
            proxy,
            hv,
            instance,
            cloud,
            running,
            channel,
            dir,
        })
    }

    fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel.clone())
    }

    fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.channel.clone())
    }

    async fn stop(self) {
        self.running.stop().await.unwrap();
    }
}

fn ebs_request(name: &str, bytes: i64, parameters: &[(&str, &str)]) -> proto::CreateVolumeRequest {
    create_request(name, bytes, parameters)
}

#[tokio::test]
async fn bad_parameters_are_rejected_before_any_ec2_call() {
    let Some(e) = Ebs::start("bad_parameters_are_rejected_before_any_ec2_call", 1).await else {
        return;
    };
    let mut c = e.controller();
    let cases: Vec<(proto::CreateVolumeRequest, &str)> = vec![
        (ebs_request("bad-type", GIB, &[("type", "gp9")]), "type"),
        (
            ebs_request("bad-iops", 100 * GIB, &[("type", "gp3"), ("iops", "99999")]),
            "iops",
        ),
        (
            proto::CreateVolumeRequest {
                capacity_range: Some(proto::CapacityRange {
                    required_bytes: 0,
                    limit_bytes: 0,
                }),
                ..ebs_request("size-zero", 0, &[])
            },
            "capacity",
        ),
        (
            ebs_request("kms", GIB, &[("kmsKeyId", "arn:aws:kms:us-east-1:1:key/x")]),
            "kmsKeyId",
        ),
        (ebs_request("unknown", GIB, &[("tpye", "gp3")]), "tpye"),
    ];
    for (request, key) in cases {
        let name = request.name.clone();
        let err = c.create_volume(request).await.unwrap_err();
        assert!(
            matches!(err.code(), Code::InvalidArgument | Code::OutOfRange),
            "{name}: {err:?}"
        );
        assert!(
            err.message().contains(key),
            "{name}: message names `{key}`: {}",
            err.message()
        );
    }
    assert_eq!(
        e.moto.ec2().count_volumes().await,
        0,
        "no volume was created"
    );
    assert_eq!(
        e.proxy.count("CreateVolume"),
        0,
        "no CreateVolume reached EC2"
    );
    e.stop().await;
}

#[tokio::test]
async fn create_is_idempotent_by_name_and_tagged() {
    let Some(e) = Ebs::start("create_is_idempotent_by_name_and_tagged", 1).await else {
        return;
    };
    let mut c = e.controller();
    let request = ebs_request("pvc-idem", 3 * GIB / 2, &[("type", "gp3")]);
    let first = c
        .create_volume(request.clone())
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(
        first.capacity_bytes,
        2 * GIB,
        "rounded up to whole GiB and reported"
    );
    for _ in 0..10 {
        let again = c
            .create_volume(request.clone())
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        assert_eq!(again.volume_id, first.volume_id);
    }
    let volumes = e.moto.ec2().describe_volumes().await;
    assert_eq!(volumes.len(), 1, "exactly one EC2 volume");
    assert_eq!(
        volumes[0].tags.get("CSIVolumeName").map(String::as_str),
        Some("pvc-idem")
    );
    assert_eq!(
        volumes[0]
            .tags
            .get("stowage.csi.dev/cluster")
            .map(String::as_str),
        Some("stowage")
    );
    assert_eq!(e.proxy.count("CreateVolume"), 1);
    let bigger = ebs_request("pvc-idem", 4 * GIB, &[("type", "gp3")]);
    assert_eq!(
        c.create_volume(bigger).await.unwrap_err().code(),
        Code::AlreadyExists
    );
    let other_type = ebs_request("pvc-idem", 3 * GIB / 2, &[("type", "gp2")]);
    assert_eq!(
        c.create_volume(other_type).await.unwrap_err().code(),
        Code::AlreadyExists
    );
    delete(&mut c, &first.volume_id).await;
    delete(&mut c, &first.volume_id).await;
    assert_eq!(e.moto.ec2().count_volumes().await, 0);
    e.stop().await;
}

#[tokio::test]
async fn topology_requirements_pick_the_zone() {
    let Some(e) = Ebs::start("topology_requirements_pick_the_zone", 1).await else {
        return;
    };
    let zone = |z: &str| proto::Topology {
        segments: [(
            stowage_driver::backend::ebs::ZONE_KEY.to_owned(),
            z.to_owned(),
        )]
        .into(),
    };
    let request = proto::CreateVolumeRequest {
        accessibility_requirements: Some(proto::TopologyRequirement {
            requisite: vec![zone("us-east-1a"), zone("us-east-1b")],
            preferred: vec![zone("us-east-1b")],
        }),
        ..ebs_request("pvc-zone", GIB, &[])
    };
    let volume = e
        .controller()
        .create_volume(request)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(volume.accessible_topology, vec![zone("us-east-1b")]);
    let info = e.moto.ec2().volume(&volume.volume_id).await.unwrap();
    assert_eq!(info.zone.as_deref(), Some("us-east-1b"));
    let node = e
        .node()
        .node_get_info(proto::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(node.node_id, e.instance);
    assert_eq!(node.accessible_topology, Some(zone(ZONE)));
    assert_eq!(node.max_volumes_per_node, 26);
    e.stop().await;
}

async fn publish_and_stage(
    e: &Ebs,
    volume: &proto::Volume,
    fs: &str,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let mut c = e.controller();
    let mut n = e.node();
    let mut capability = mount_capability();
    if let Some(proto::volume_capability::AccessType::Mount(m)) = &mut capability.access_type {
        m.fs_type = fs.into();
    }
    let published = c
        .controller_publish_volume(proto::ControllerPublishVolumeRequest {
            volume_id: volume.volume_id.clone(),
            node_id: e.instance.clone(),
            volume_capability: Some(capability.clone()),
            volume_context: volume.volume_context.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        published
            .publish_context
            .get("devicePath")
            .is_some_and(|d| d.starts_with("/dev/xvd"))
    );
    e.hv.sync().await;
    let staging = e.dir.path().join(format!("staging-{}", volume.volume_id));
    let target = e
        .dir
        .path()
        .join(format!("pods/{}/mount", volume.volume_id));
    for _ in 0..3 {
        n.node_stage_volume(proto::NodeStageVolumeRequest {
            volume_id: volume.volume_id.clone(),
            publish_context: published.publish_context.clone(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(capability.clone()),
            volume_context: volume.volume_context.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    n.node_publish_volume(proto::NodePublishVolumeRequest {
        volume_id: volume.volume_id.clone(),
        publish_context: published.publish_context.clone(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(capability),
        volume_context: volume.volume_context.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    (staging, target)
}

async fn unpublish_and_unstage(
    e: &Ebs,
    volume_id: &str,
    staging: &std::path::Path,
    target: &std::path::Path,
) {
    let mut n = e.node();
    n.node_unpublish_volume(proto::NodeUnpublishVolumeRequest {
        volume_id: volume_id.into(),
        target_path: target.display().to_string(),
    })
    .await
    .unwrap();
    n.node_unstage_volume(proto::NodeUnstageVolumeRequest {
        volume_id: volume_id.into(),
        staging_target_path: staging.display().to_string(),
    })
    .await
    .unwrap();
    assert!(!is_mount_point(staging) && !is_mount_point(target) && !target.exists());
    e.controller()
        .controller_unpublish_volume(proto::ControllerUnpublishVolumeRequest {
            volume_id: volume_id.into(),
            node_id: e.instance.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    e.hv.sync().await;
}

fn blkid_type(device: &std::path::Path) -> String {
    let out = std::process::Command::new("blkid")
        .args(["-o", "value", "-s", "TYPE"])
        .arg(device)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test]
async fn attach_stage_publish_on_real_filesystems_and_data_survives_reattach() {
    let Some(e) = Ebs::start("attach_stage_publish_on_real_filesystems", 1).await else {
        return;
    };
    let mut c = e.controller();
    for fs in ["ext4", "xfs"] {
        let name = format!("pvc-{fs}");
        let params = [("csi.storage.k8s.io/fstype", fs)];
        let volume = c
            .create_volume(ebs_request(&name, GIB, &params))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        let (staging, target) = publish_and_stage(&e, &volume, fs).await;
        assert!(is_mount_point(&staging) && is_mount_point(&target));
        let device =
            e.hv.device(&volume.volume_id)
                .expect("attached as a loop device");
        assert_eq!(blkid_type(&device), fs, "formatted as asked");
        std::fs::write(target.join("data"), fs).unwrap();
        unpublish_and_unstage(&e, &volume.volume_id, &staging, &target).await;
        assert!(e.hv.device(&volume.volume_id).is_none(), "detached");
        assert!(
            e.moto
                .ec2()
                .volume(&volume.volume_id)
                .await
                .unwrap()
                .attachments
                .is_empty()
        );

        // Attach again: the filesystem is found, not re-made, and the data is there.
        let (staging, target) = publish_and_stage(&e, &volume, fs).await;
        assert_eq!(std::fs::read_to_string(target.join("data")).unwrap(), fs);
        unpublish_and_unstage(&e, &volume.volume_id, &staging, &target).await;
        delete(&mut c, &volume.volume_id).await;
    }
    e.stop().await;
}

#[tokio::test]
async fn publish_errors_and_in_use_deletes() {
    let Some(e) = Ebs::start("publish_errors_and_in_use_deletes", 1).await else {
        return;
    };
    let mut c = e.controller();
    let volume = create(&mut c, "pvc-pub", &[]).await;
    let publish = |node: &str| proto::ControllerPublishVolumeRequest {
        volume_id: volume.volume_id.clone(),
        node_id: node.into(),
        volume_capability: Some(mount_capability()),
        ..Default::default()
    };
    let err = c
        .controller_publish_volume(publish("i-0000000000000dead"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let first = c
        .controller_publish_volume(publish(&e.instance))
        .await
        .unwrap()
        .into_inner();
    let again = c
        .controller_publish_volume(publish(&e.instance))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        first.publish_context, again.publish_context,
        "publish is idempotent"
    );
    let other = e.moto.ec2().run_instance(ZONE).await;
    let err = c
        .controller_publish_volume(publish(&other))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::FailedPrecondition,
        "attached elsewhere: {err:?}"
    );
    let err = c
        .delete_volume(proto::DeleteVolumeRequest {
            volume_id: volume.volume_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::FailedPrecondition,
        "deleting an attached volume: {err:?}"
    );
    // A second volume gets another device name.
    let second = create(&mut c, "pvc-pub-2", &[]).await;
    let second_ctx = c
        .controller_publish_volume(proto::ControllerPublishVolumeRequest {
            volume_id: second.volume_id.clone(),
            ..publish(&e.instance)
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(
        first.publish_context["devicePath"],
        second_ctx.publish_context["devicePath"]
    );
    for v in [&volume, &second] {
        for _ in 0..2 {
            c.controller_unpublish_volume(proto::ControllerUnpublishVolumeRequest {
                volume_id: v.volume_id.clone(),
                node_id: e.instance.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        }
        delete(&mut c, &v.volume_id).await;
    }
    e.stop().await;
}

#[tokio::test]
async fn throttling_is_retried_and_creating_is_waited_for() {
    let Some(e) = Ebs::start("throttling_is_retried_and_creating_is_waited_for", 3).await else {
        return;
    };
    let mut c = e.controller();
    e.proxy.throttle("CreateVolume", 2);
    e.proxy.creating(3);
    let volume = create(&mut c, "pvc-throttled", &[]).await;
    assert_eq!(
        e.proxy.count("CreateVolume"),
        3,
        "two throttled attempts, one that went through"
    );
    assert_eq!(e.moto.ec2().count_volumes().await, 1);
    assert_eq!(e.proxy.unfired(), 0, "every programmed fault fired");
    let info = e.moto.ec2().volume(&volume.volume_id).await.unwrap();
    assert_eq!(info.state, "available");
    e.stop().await;
}

#[tokio::test]
async fn fifty_concurrent_creates_share_their_describe_calls() {
    let Some(e) = Ebs::start("fifty_concurrent_creates_share_their_describe_calls", 3).await else {
        return;
    };
    e.proxy.creating(5);
    let mut tasks = Vec::new();
    for i in 0..50 {
        let mut c = e.controller();
        tasks.push(tokio::spawn(async move {
            c.create_volume(ebs_request(&format!("pvc-many-{i}"), GIB, &[]))
                .await
        }));
    }
    for task in tasks {
        task.await.unwrap().expect("create");
    }
    let counts = e.proxy.counts();
    assert_eq!(counts.get("CreateVolume"), Some(&50), "{counts:?}");
    let describes = counts.get("DescribeVolumes").copied().unwrap_or(0);
    assert!(
        describes <= 10,
        "≤ 0.2 DescribeVolumes per volume, got {describes}: {counts:?}"
    );
    assert_eq!(e.moto.ec2().count_volumes().await, 50);
    let by_action = e.cloud.call_counts();
    assert_eq!(
        by_action.get("CreateVolume"),
        Some(&50),
        "the SDK interceptor counts too: {by_action:?}"
    );
    e.stop().await;
}

#[tokio::test]
async fn a_timed_out_call_is_an_error_and_the_retry_makes_one_volume() {
    let Some(e) = Ebs::start("a_timed_out_call_is_an_error", 1).await else {
        return;
    };
    let mut c = e.controller();
    e.proxy
        .delay_response("CreateVolume", 1, Duration::from_secs(4));
    let err = c
        .create_volume(ebs_request("pvc-slow", GIB, &[]))
        .await
        .unwrap_err();
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Unavailable),
        "{err:?}"
    );
    // EC2 acted on the call; moto ignores ClientToken, so only stowage's own lookup
    // can keep the retry from creating a second volume.
    let volume = create(&mut c, "pvc-slow", &[]).await;
    let named: Vec<_> = e
        .moto
        .ec2()
        .describe_volumes()
        .await
        .into_iter()
        .filter(|v| v.tags.get("CSIVolumeName").map(String::as_str) == Some("pvc-slow"))
        .collect();
    assert_eq!(named.len(), 1, "exactly one volume: {named:?}");
    assert_eq!(named[0].id, volume.volume_id);
    e.stop().await;
}

#[tokio::test]
async fn snapshots_and_volumes_from_them() {
    let Some(e) = Ebs::start("snapshots_and_volumes_from_them", 1).await else {
        return;
    };
    let mut c = e.controller();
    let source = create(&mut c, "pvc-src", &[]).await;
    let snap = |name: &str, source: &str| proto::CreateSnapshotRequest {
        source_volume_id: source.into(),
        name: name.into(),
        ..Default::default()
    };
    let first = c
        .create_snapshot(snap("snap-a", &source.volume_id))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    let again = c
        .create_snapshot(snap("snap-a", &source.volume_id))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(first.snapshot_id, again.snapshot_id);
    assert!(first.ready_to_use && first.creation_time.is_some());
    let other = create(&mut c, "pvc-other", &[]).await;
    assert_eq!(
        c.create_snapshot(snap("snap-a", &other.volume_id))
            .await
            .unwrap_err()
            .code(),
        Code::AlreadyExists
    );
    let listed = c
        .list_snapshots(proto::ListSnapshotsRequest {
            source_volume_id: source.volume_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.entries.len(), 1);
    let restored = c
        .create_volume(proto::CreateVolumeRequest {
            volume_content_source: Some(proto::VolumeContentSource {
                r#type: Some(proto::volume_content_source::Type::Snapshot(
                    proto::volume_content_source::SnapshotSource {
                        snapshot_id: first.snapshot_id.clone(),
                    },
                )),
            }),
            ..ebs_request("pvc-restored", GIB, &[])
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert!(restored.content_source.is_some());
    let missing = proto::CreateVolumeRequest {
        volume_content_source: Some(proto::VolumeContentSource {
            r#type: Some(proto::volume_content_source::Type::Snapshot(
                proto::volume_content_source::SnapshotSource {
                    snapshot_id: "snap-0123456789abcdef0".into(),
                },
            )),
        }),
        ..ebs_request("pvc-nosnap", GIB, &[])
    };
    assert_eq!(
        c.create_volume(missing).await.unwrap_err().code(),
        Code::NotFound
    );
    for _ in 0..2 {
        c.delete_snapshot(proto::DeleteSnapshotRequest {
            snapshot_id: first.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    e.stop().await;
}

fn clone_request(name: &str, bytes: i64, source: &str) -> proto::CreateVolumeRequest {
    proto::CreateVolumeRequest {
        volume_content_source: Some(proto::VolumeContentSource {
            r#type: Some(proto::volume_content_source::Type::Volume(
                proto::volume_content_source::VolumeSource {
                    volume_id: source.into(),
                },
            )),
        }),
        ..ebs_request(name, bytes, &[])
    }
}

/// Where EC2 offers no CopyVolumes (moto, which fails it with an HTTP 500), a clone
/// goes through a snapshot of the source and a volume from it, in the source's zone,
/// at least the source's size; the snapshot is deleted once the clone is made; a
/// retry makes no second copy; CopyVolumes is tried once, then no more.
#[tokio::test]
async fn clones_go_through_a_snapshot_where_copy_volumes_is_not_offered() {
    let Some(e) = Ebs::start("clones_go_through_a_snapshot", 1).await else {
        return;
    };
    let mut c = e.controller();
    let source = create(&mut c, "pvc-clone-src", &[("type", "gp3")]).await;
    let sized = c
        .controller_expand_volume(proto::ControllerExpandVolumeRequest {
            volume_id: source.volume_id.clone(),
            capacity_range: Some(proto::CapacityRange {
                required_bytes: 3 * GIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sized.capacity_bytes, 3 * GIB);
    e.proxy.reset_counts();
    let clone = c
        .create_volume(clone_request("pvc-clone", GIB, &source.volume_id))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(clone.capacity_bytes, 3 * GIB, "at least the source's size");
    assert!(matches!(
        clone.content_source.as_ref().and_then(|s| s.r#type.as_ref()),
        Some(proto::volume_content_source::Type::Volume(v)) if v.volume_id == source.volume_id
    ));
    assert_eq!(e.proxy.count("CopyVolumes"), 1, "tried once");
    assert_eq!(e.proxy.count("CreateSnapshot"), 1);
    assert_eq!(e.proxy.count("CreateVolume"), 1);
    assert_eq!(
        e.proxy.count("DeleteSnapshot"),
        1,
        "the snapshot it went through"
    );
    let made = e.moto.volume(&clone.volume_id).await.unwrap();
    assert_eq!(made.zone.as_deref(), Some(ZONE));
    assert_eq!(
        made.tags.get("stowage.csi.dev/source-volume"),
        Some(&source.volume_id)
    );
    let snapshots = e.moto.ec2().ok("DescribeSnapshots", &[]).await;
    assert!(!snapshots.contains("clone-pvc-clone"), "{snapshots}");

    // A retry finds the clone by name: no second copy, no second snapshot.
    e.proxy.reset_counts();
    let again = c
        .create_volume(clone_request("pvc-clone", GIB, &source.volume_id))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(again.volume_id, clone.volume_id);
    assert_eq!(e.proxy.count("CreateVolume"), 0);
    assert_eq!(e.proxy.count("CreateSnapshot"), 0);
    // A second clone: CopyVolumes is not asked again.
    let second = c
        .create_volume(clone_request("pvc-clone-2", GIB, &source.volume_id))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(e.proxy.count("CopyVolumes"), 0);

    // Bad sources and sizes.
    let err = c
        .create_volume(clone_request(
            "pvc-clone-none",
            GIB,
            "vol-0123456789abcdef0",
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = c
        .create_volume(proto::CreateVolumeRequest {
            capacity_range: Some(proto::CapacityRange {
                required_bytes: GIB,
                limit_bytes: 2 * GIB,
            }),
            ..clone_request("pvc-clone-small", GIB, &source.volume_id)
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    let err = c
        .create_volume(proto::CreateVolumeRequest {
            accessibility_requirements: Some(proto::TopologyRequirement {
                requisite: vec![proto::Topology {
                    segments: [(
                        stowage_driver::backend::ebs::ZONE_KEY.to_owned(),
                        "us-east-1b".to_owned(),
                    )]
                    .into(),
                }],
                preferred: vec![],
            }),
            ..clone_request("pvc-clone-zone", GIB, &source.volume_id)
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains(ZONE), "{}", err.message());
    for id in [&second.volume_id, &clone.volume_id, &source.volume_id] {
        delete(&mut c, id).await;
    }
    e.stop().await;
}

/// Where EC2 offers CopyVolumes (here the fault proxy stands in for it, out of moto's
/// own calls: see tests/common/fault_proxy.rs), a clone is one CopyVolumes with a
/// ClientToken from the name, no snapshot; a retry makes no second copy.
#[tokio::test]
async fn clones_are_one_copy_volumes_where_ec2_offers_it() {
    let Some(e) = Ebs::start("clones_are_one_copy_volumes", 1).await else {
        return;
    };
    e.proxy.offer_copy_volumes();
    let mut c = e.controller();
    let source = create(&mut c, "pvc-copy-src", &[("type", "gp3")]).await;
    e.proxy.reset_counts();
    let clone = c
        .create_volume(clone_request("pvc-copy", 2 * GIB, &source.volume_id))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(clone.capacity_bytes, 2 * GIB);
    assert_eq!(e.proxy.count("CopyVolumes"), 1);
    assert_eq!(e.proxy.count("CreateSnapshot"), 0);
    assert_eq!(
        e.proxy.count("CreateVolume"),
        0,
        "no volume made another way"
    );
    let made = e.moto.volume(&clone.volume_id).await.unwrap();
    assert_eq!(made.zone.as_deref(), Some(ZONE));
    assert_eq!(
        made.tags.get("CSIVolumeName").map(String::as_str),
        Some("pvc-copy")
    );
    e.proxy.reset_counts();
    let again = c
        .create_volume(clone_request("pvc-copy", 2 * GIB, &source.volume_id))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(again.volume_id, clone.volume_id);
    assert_eq!(e.proxy.count("CopyVolumes"), 0);
    delete(&mut c, &clone.volume_id).await;
    delete(&mut c, &source.volume_id).await;
    e.stop().await;
}

/// A snapshot of a staged XFS volume restored and cloned on the same node: both
/// mount beside the original (same filesystem UUID: staged with `nouuid`, as
/// aws-ebs-csi-driver does) and hold the bytes the original held (the test hypervisor
/// keeps snapshot data as EBS does).
#[tokio::test]
async fn restores_and_clones_of_xfs_mount_beside_their_source_with_its_bytes() {
    let Some(e) = Ebs::start("restores_and_clones_of_xfs_mount_beside_their_source", 1).await
    else {
        return;
    };
    let mut c = e.controller();
    let xfs = [("csi.storage.k8s.io/fstype", "xfs")];
    let source = create(&mut c, "pvc-xfs-src", &xfs).await;
    let (src_staging, src_target) = publish_and_stage(&e, &source, "xfs").await;
    std::fs::write(src_target.join("table"), b"rows 1-100").unwrap();
    nix::unistd::sync();
    let snapshot = c
        .create_snapshot(proto::CreateSnapshotRequest {
            source_volume_id: source.volume_id.clone(),
            name: "snap-xfs".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    e.hv.sync().await;
    std::fs::write(src_target.join("table"), b"rows 1-200").unwrap();
    nix::unistd::sync();
    let restored = c
        .create_volume(proto::CreateVolumeRequest {
            volume_content_source: Some(proto::VolumeContentSource {
                r#type: Some(proto::volume_content_source::Type::Snapshot(
                    proto::volume_content_source::SnapshotSource {
                        snapshot_id: snapshot.snapshot_id.clone(),
                    },
                )),
            }),
            ..ebs_request("pvc-xfs-restored", GIB, &xfs)
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let clone = c
        .create_volume(proto::CreateVolumeRequest {
            parameters: params(&xfs),
            ..clone_request("pvc-xfs-clone", GIB, &source.volume_id)
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let (r_staging, r_target) = publish_and_stage(&e, &restored, "xfs").await;
    let (c_staging, c_target) = publish_and_stage(&e, &clone, "xfs").await;
    assert_eq!(
        std::fs::read(r_target.join("table")).unwrap(),
        b"rows 1-100"
    );
    assert_eq!(
        std::fs::read(c_target.join("table")).unwrap(),
        b"rows 1-200"
    );
    for (volume, staging, target) in [
        (&clone, c_staging, c_target),
        (&restored, r_staging, r_target),
        (&source, src_staging, src_target),
    ] {
        unpublish_and_unstage(&e, &volume.volume_id, &staging, &target).await;
        delete(&mut c, &volume.volume_id).await;
    }
    e.stop().await;
}

#[tokio::test]
async fn expansion_grows_the_volume_and_the_filesystem() {
    let Some(e) = Ebs::start("expansion_grows_the_volume_and_the_filesystem", 1).await else {
        return;
    };
    let mut c = e.controller();
    // xfs: online ext4 growth needs CAP_SYS_RESOURCE, which this sandbox withholds
    // even from root (resize2fs answers EPERM); xfs_growfs has no such need.
    let params = [("csi.storage.k8s.io/fstype", "xfs")];
    let volume = c
        .create_volume(ebs_request("pvc-grow", GIB, &params))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let (staging, target) = publish_and_stage(&e, &volume, "xfs").await;
    let before = stowage_driver::node::usage(&target).unwrap().bytes_total;
    let expanded = c
        .controller_expand_volume(proto::ControllerExpandVolumeRequest {
            volume_id: volume.volume_id.clone(),
            capacity_range: Some(proto::CapacityRange {
                required_bytes: 2 * GIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(expanded.capacity_bytes, 2 * GIB);
    assert!(expanded.node_expansion_required);
    assert_eq!(
        e.moto
            .ec2()
            .volume(&volume.volume_id)
            .await
            .unwrap()
            .size_gib,
        2
    );
    // The hypervisor's part: the disk grows.
    e.hv.sync().await;
    e.node()
        .node_expand_volume(proto::NodeExpandVolumeRequest {
            volume_id: volume.volume_id.clone(),
            volume_path: target.display().to_string(),
            capacity_range: Some(proto::CapacityRange {
                required_bytes: 2 * GIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let after = stowage_driver::node::usage(&target).unwrap().bytes_total;
    assert!(
        after > before + (GIB as u64) / 2,
        "filesystem grew: {before} → {after}"
    );
    unpublish_and_unstage(&e, &volume.volume_id, &staging, &target).await;
    e.stop().await;
}

/// Poll until a CSI server answers Probe on `socket` (bounded).
async fn wait_ready(socket: &std::path::Path) -> Channel {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(channel) = channel::connect(socket).await {
            let mut identity = proto::identity_client::IdentityClient::new(channel.clone());
            if identity.probe(proto::ProbeRequest {}).await.is_ok() {
                return channel;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "stowage did not start serving {}",
            socket.display()
        );
        tokio::task::yield_now().await;
    }
}

/// The crash window that matters most: EC2 created the volume, the controller dies
/// before it can answer. After a restart, the provisioner's retry must find that
/// volume (moto ignores ClientToken, so stowage's own lookup is what prevents a
/// duplicate).
#[tokio::test]
async fn controller_killed_after_ec2_answers_leaves_exactly_one_volume() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let Some(moto) = Moto::start("controller_killed_after_ec2_answers") else {
        return;
    };
    let proxy = FaultProxy::start(&moto.endpoint()).await;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("csi.sock");
    let spawn = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_stowage"))
            .args([
                "controller",
                "--no-loops",
                "--backend",
                "ebs",
                "--ebs-endpoint",
                &proxy.endpoint(),
                "--zone",
                ZONE,
            ])
            .args([
                "--endpoint",
                &format!("unix://{}", socket.display()),
                "--ec2-max-attempts",
                "1",
            ])
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut first = spawn();
    let channel = wait_ready(&socket).await;
    proxy.delay_response("CreateVolume", 1, Duration::from_secs(60));
    let mut client = ControllerClient::new(channel);
    let call = tokio::spawn(async move {
        client
            .create_volume(ebs_request("pvc-crash", GIB, &[]))
            .await
    });
    // EC2 has acted once the emulator holds the volume; its answer is still held.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while moto.ec2().count_volumes().await == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "CreateVolume never reached EC2"
        );
    }
    kill(Pid::from_raw(first.id() as i32), Signal::SIGKILL).unwrap();
    first.wait().unwrap();
    assert!(call.await.unwrap().is_err(), "the caller got no answer");

    let mut second = spawn();
    let mut client = ControllerClient::new(wait_ready(&socket).await);
    let volume = client
        .create_volume(ebs_request("pvc-crash", GIB, &[]))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let volumes = moto.ec2().describe_volumes().await;
    assert_eq!(volumes.len(), 1, "no duplicate: {volumes:?}");
    assert_eq!(volumes[0].id, volume.volume_id);
    kill(Pid::from_raw(second.id() as i32), Signal::SIGTERM).unwrap();
    second.wait().unwrap();
}

#[tokio::test]
async fn raw_block_publish_binds_the_device_itself() {
    use std::os::unix::fs::FileTypeExt;
    let Some(e) = Ebs::start("raw_block_publish_binds_the_device_itself", 1).await else {
        return;
    };
    let mut c = e.controller();
    let request = proto::CreateVolumeRequest {
        volume_capabilities: vec![block_capability()],
        ..ebs_request("pvc-block", GIB, &[])
    };
    let volume = c
        .create_volume(request)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let published = c
        .controller_publish_volume(proto::ControllerPublishVolumeRequest {
            volume_id: volume.volume_id.clone(),
            node_id: e.instance.clone(),
            volume_capability: Some(block_capability()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    e.hv.sync().await;
    let staging = e.dir.path().join("block-staging");
    let target = e.dir.path().join("pods/block/dev");
    let mut n = e.node();
    n.node_stage_volume(proto::NodeStageVolumeRequest {
        volume_id: volume.volume_id.clone(),
        publish_context: published.publish_context.clone(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(block_capability()),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(
        !is_mount_point(&staging),
        "raw block volumes are not mounted at staging"
    );
    n.node_publish_volume(proto::NodePublishVolumeRequest {
        volume_id: volume.volume_id.clone(),
        publish_context: published.publish_context,
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(block_capability()),
        ..Default::default()
    })
    .await
    .unwrap();
    let meta = std::fs::metadata(&target).unwrap();
    assert!(
        meta.file_type().is_block_device(),
        "the target is the device"
    );
    let device = e.hv.device(&volume.volume_id).unwrap();
    assert_eq!(
        blkid_type(&device),
        "",
        "a raw block volume is never formatted"
    );
    n.node_unpublish_volume(proto::NodeUnpublishVolumeRequest {
        volume_id: volume.volume_id.clone(),
        target_path: target.display().to_string(),
    })
    .await
    .unwrap();
    assert!(!target.exists());
    e.stop().await;
}

#[tokio::test]
async fn a_client_token_reused_with_other_parameters_is_already_exists() {
    let Some(e) = Ebs::start("a_client_token_reused_with_other_parameters", 1).await else {
        return;
    };
    e.proxy.idempotent_mismatch(1);
    let err = e
        .controller()
        .create_volume(ebs_request("pvc-token", GIB, &[]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert!(
        err.message().contains("IdempotentParameterMismatch"),
        "{}",
        err.message()
    );
    assert_eq!(e.moto.ec2().count_volumes().await, 0);
    e.stop().await;
}

/// A volume deleted while ControllerUnpublishVolume waits for its detach is detached
/// from everything: the call answers OK (the CSI spec: a volume that no longer exists
/// is unpublished), not NotFound — so the attacher does not retry a detach that is done.
#[tokio::test]
async fn unpublish_of_a_volume_deleted_while_detaching_is_ok() {
    let Some(e) = Ebs::start("unpublish_of_a_volume_deleted_while_detaching_is_ok", 3).await else {
        return;
    };
    let mut c = e.controller();
    let volume = create(&mut c, "pvc-vanishing", &[]).await;
    c.controller_publish_volume(proto::ControllerPublishVolumeRequest {
        volume_id: volume.volume_id.clone(),
        node_id: e.instance.clone(),
        volume_capability: Some(mount_capability()),
        volume_context: volume.volume_context.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    // EC2 detaches at once; its answer is held while the volume is deleted.
    e.proxy
        .delay_response("DetachVolume", 1, Duration::from_secs(2));
    let unpublish = {
        let mut c = e.controller();
        let request = proto::ControllerUnpublishVolumeRequest {
            volume_id: volume.volume_id.clone(),
            node_id: e.instance.clone(),
            ..Default::default()
        };
        tokio::spawn(async move { c.controller_unpublish_volume(request).await })
    };
    e.proxy
        .wait_for_count("DetachVolume", 1, Duration::from_secs(10))
        .await;
    let ec2 = e.moto.ec2();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let reply = ec2
            .call("DeleteVolume", &[("VolumeId", &volume.volume_id)])
            .await;
        match reply.code() {
            None => break,
            // moto may still be detaching.
            Some(code) => assert!(
                std::time::Instant::now() < deadline,
                "DeleteVolume kept failing: {code}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let answer = unpublish.await.unwrap();
    assert!(answer.is_ok(), "unpublish of a deleted volume: {answer:?}");
    e.stop().await;
}

/// Not run by `tests/run` (ignored): `tests/e2e/run` starts it as the EC2 hypervisor of
/// its real kubelet node. It makes an instance in the moto at `STOWAGE_E2E_MOTO` (zone
/// `us-east-1a`), writes the instance id to `STOWAGE_E2E_INSTANCE_FILE`, then keeps the
/// host's `/dev/disk/by-id` in step with that instance's attachments (loop devices over
/// images in `STOWAGE_E2E_IMAGES`, grown when a volume is modified) until the file
/// `STOWAGE_E2E_STOP` exists; dropping the hypervisor detaches and deletes everything.
#[tokio::test]
#[ignore = "the e2e node's EC2 hypervisor: run by tests/e2e/run"]
async fn e2e_node_hypervisor() {
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} unset"));
    let moto = var("STOWAGE_E2E_MOTO");
    let stop = std::path::PathBuf::from(var("STOWAGE_E2E_STOP"));
    let instance = common::moto::Ec2Query::new(moto.clone())
        .run_instance(ZONE)
        .await;
    let hv = Hypervisor::new(
        moto,
        &instance,
        "/dev/disk/by-id".into(),
        var("STOWAGE_E2E_IMAGES").into(),
    );
    std::fs::write(var("STOWAGE_E2E_INSTANCE_FILE"), &instance).unwrap();
    while !stop.exists() {
        hv.sync().await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
