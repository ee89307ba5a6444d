//! Node publish/unpublish/stats against `stowage local` with real bind mounts: the
//! target is created on publish and removed on unpublish, calls are idempotent, bad
//! arguments come before lookups, read-only publishes are read-only. Needs root.

mod common;

use common::*;
use stowage::csi::proto::{self, volume_capability as vc};
use tonic::Code;

fn publish_request(volume_id: &str, target: &std::path::Path) -> proto::NodePublishVolumeRequest {
    proto::NodePublishVolumeRequest {
        volume_id: volume_id.into(),
        target_path: target.display().to_string(),
        volume_capability: Some(mount_capability()),
        ..Default::default()
    }
}

fn unpublish_request(
    volume_id: &str,
    target: &std::path::Path,
) -> proto::NodeUnpublishVolumeRequest {
    proto::NodeUnpublishVolumeRequest {
        volume_id: volume_id.into(),
        target_path: target.display().to_string(),
    }
}

#[tokio::test]
async fn argument_checks_come_before_lookups() {
    let local = Local::start().await;
    let mut n = local.node();
    let target = local.dir.path().join("mnt/target");
    let no_id = proto::NodePublishVolumeRequest {
        volume_id: String::new(),
        ..publish_request("x", &target)
    };
    assert_eq!(
        n.node_publish_volume(no_id).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let no_target = proto::NodePublishVolumeRequest {
        target_path: String::new(),
        ..publish_request("fake", &target)
    };
    assert_eq!(
        n.node_publish_volume(no_target).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let no_cap = proto::NodePublishVolumeRequest {
        volume_capability: None,
        ..publish_request("fake", &target)
    };
    assert_eq!(
        n.node_publish_volume(no_cap).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let relative = proto::NodePublishVolumeRequest {
        target_path: "a/../b".into(),
        ..publish_request("fake", &target)
    };
    assert_eq!(
        n.node_publish_volume(relative).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        n.node_publish_volume(publish_request("fake-vol-id", &target))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert!(!target.exists(), "failed publish created no target");

    let no_id = proto::NodeUnpublishVolumeRequest {
        volume_id: String::new(),
        ..unpublish_request("x", &target)
    };
    assert_eq!(
        n.node_unpublish_volume(no_id).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let no_target = proto::NodeUnpublishVolumeRequest {
        target_path: String::new(),
        ..unpublish_request("x", &target)
    };
    assert_eq!(
        n.node_unpublish_volume(no_target).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    n.node_unpublish_volume(unpublish_request("fake-vol-id", &target))
        .await
        .expect("unknown volume unpublish is OK");

    let stats = |id: &str, path: &str| proto::NodeGetVolumeStatsRequest {
        volume_id: id.into(),
        volume_path: path.into(),
        staging_target_path: String::new(),
    };
    assert_eq!(
        n.node_get_volume_stats(stats("", "some/path"))
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    assert_eq!(
        n.node_get_volume_stats(stats("x", ""))
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    assert_eq!(
        n.node_get_volume_stats(stats("fake", "some/path"))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    local.stop().await;
}

#[tokio::test]
async fn publish_unpublish_cycle_with_real_bind_mounts() {
    let local = Local::start().await;
    let mut c = local.controller();
    let mut n = local.node();
    let volume = create(&mut c, "pub-vol", &[]).await;
    let target = local.dir.path().join("pods/p1/volumes/target");
    for _ in 0..10 {
        n.node_publish_volume(publish_request(&volume.volume_id, &target))
            .await
            .expect("publish");
    }
    assert!(is_mount_point(&target), "target is a mount point");
    std::fs::write(target.join("hello"), "from the pod").unwrap();
    assert_eq!(
        std::fs::read_to_string(local.data_dir().join("pub-vol/hello")).unwrap(),
        "from the pod",
        "writes land in the volume directory"
    );

    let stats = n
        .node_get_volume_stats(proto::NodeGetVolumeStatsRequest {
            volume_id: volume.volume_id.clone(),
            volume_path: target.display().to_string(),
            staging_target_path: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let units: Vec<i32> = stats.usage.iter().map(|u| u.unit).collect();
    assert_eq!(
        units,
        [
            proto::volume_usage::Unit::Bytes as i32,
            proto::volume_usage::Unit::Inodes as i32
        ]
    );
    assert!(
        stats
            .usage
            .iter()
            .all(|u| u.total > 0 && u.used <= u.total && u.available <= u.total)
    );
    let wrong_path = n
        .node_get_volume_stats(proto::NodeGetVolumeStatsRequest {
            volume_id: volume.volume_id.clone(),
            volume_path: "some/path".into(),
            staging_target_path: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(wrong_path.code(), Code::NotFound);

    for _ in 0..10 {
        n.node_unpublish_volume(unpublish_request(&volume.volume_id, &target))
            .await
            .expect("unpublish");
    }
    assert!(!is_mount_point(&target));
    assert!(!target.exists(), "target removed on unpublish");
    assert!(
        local.data_dir().join("pub-vol/hello").exists(),
        "data stays in the volume"
    );
    delete(&mut c, &volume.volume_id).await;
    local.stop().await;
}

#[tokio::test]
async fn read_only_publish_refuses_writes() {
    let local = Local::start().await;
    let mut c = local.controller();
    let mut n = local.node();
    let volume = create(&mut c, "ro-vol", &[]).await;
    let target = local.dir.path().join("ro-target");
    let request = proto::NodePublishVolumeRequest {
        readonly: true,
        volume_capability: Some(capability_with_mode(
            vc::access_mode::Mode::MultiNodeReaderOnly,
        )),
        ..publish_request(&volume.volume_id, &target)
    };
    n.node_publish_volume(request)
        .await
        .expect("publish read-only");
    let err = std::fs::write(target.join("x"), "y").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(nix::libc::EROFS), "{err}");
    n.node_unpublish_volume(unpublish_request(&volume.volume_id, &target))
        .await
        .unwrap();
    assert!(!target.exists());
    delete(&mut c, &volume.volume_id).await;
    local.stop().await;
}

#[tokio::test]
async fn block_access_is_refused_on_nfs() {
    let local = Local::start().await;
    let mut c = local.controller();
    let volume = create(&mut c, "blk", &[]).await;
    let target = local.dir.path().join("blk-target");
    let request = proto::NodePublishVolumeRequest {
        volume_capability: Some(block_capability()),
        ..publish_request(&volume.volume_id, &target)
    };
    let err = local.node().node_publish_volume(request).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(!target.exists());
    local.stop().await;
}
