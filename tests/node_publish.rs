//! Node publish/unpublish/stats against `stowage local` with real bind mounts: the
//! target is created on publish and removed on unpublish, calls are idempotent, bad
//! arguments come before lookups, read-only publishes are read-only, and nothing
//! outside --kubelet-dir is touched (paths outside, `..`, symlinks leading out). Needs root.

mod common;

use common::*;
use std::os::unix::fs::MetadataExt;
use stowage_api::proto::csi::{self as proto, volume_capability as vc};
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

    // Another volume's 1 MiB beside this one on the export.
    let other = create(&mut c, "pub-vol-neighbour", &[]).await;
    std::fs::write(
        local.data_dir().join("pub-vol-neighbour/big"),
        vec![1u8; 1 << 20],
    )
    .unwrap();
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
    // Used is the volume's own directory, not the export: the neighbour's 1 MiB is
    // not counted; the volume's root and its one file are.
    let allocated = |p: &std::path::Path| std::fs::metadata(p).unwrap().blocks() * 512;
    let own = allocated(&target) + allocated(&target.join("hello"));
    assert_eq!(stats.usage[0].used, own as i64, "bytes used by this volume");
    assert_eq!(stats.usage[1].used, 2, "inodes used: the root and `hello`");
    delete(&mut c, &other.volume_id).await;
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

// ---------------------------------------------------------------------------
// Confinement: the node service acts only under --kubelet-dir.
// ---------------------------------------------------------------------------

/// `stowage local` with `--kubelet-dir <tmp>/kubelet`; `<tmp>/outside` is the rest of
/// the host.
struct Confined {
    local: Local,
    kubelet: std::path::PathBuf,
    outside: std::path::PathBuf,
}

async fn confined() -> Confined {
    let local = Local::start_with_kubelet_dir(|dir| {
        let kubelet = dir.join("kubelet");
        std::fs::create_dir_all(kubelet.join("pods")).unwrap();
        kubelet
    })
    .await;
    let base = std::fs::canonicalize(local.dir.path()).unwrap();
    let outside = base.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    Confined {
        kubelet: base.join("kubelet"),
        outside,
        local,
    }
}

/// INVALID_ARGUMENT that names the flag.
fn assert_refused(result: Result<impl std::fmt::Debug, tonic::Status>, what: &str) {
    let err = result.expect_err(what);
    assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
    assert!(
        err.message().contains("--kubelet-dir"),
        "{what}: the message names the flag: {}",
        err.message()
    );
}

/// Unmounts a test's own mount when dropped, so a failed assertion leaves no mount.
struct MountGuard(std::path::PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        while is_mount_point(&self.0) {
            let status = std::process::Command::new("umount")
                .arg(&self.0)
                .status()
                .unwrap();
            assert!(status.success(), "umount {}", self.0.display());
        }
    }
}

fn bind_on_itself(dir: &std::path::Path) -> MountGuard {
    let status = std::process::Command::new("mount")
        .arg("--bind")
        .arg(dir)
        .arg(dir)
        .status()
        .unwrap();
    assert!(status.success(), "mount --bind {}", dir.display());
    MountGuard(dir.to_owned())
}

#[tokio::test]
async fn unpublish_outside_the_kubelet_dir_is_refused_and_removes_nothing() {
    let t = confined().await;
    let mut n = t.local.node();
    let victim = t.outside.join("empty-dir");
    std::fs::create_dir(&victim).unwrap();
    assert_refused(
        n.node_unpublish_volume(unpublish_request("pvc-1", &victim))
            .await,
        "a target outside",
    );
    assert!(victim.is_dir(), "the directory outside is still there");

    // Climbing out with `..` from inside.
    let climbing = format!("{}/../outside/empty-dir", t.kubelet.display());
    let err = n
        .node_unpublish_volume(proto::NodeUnpublishVolumeRequest {
            volume_id: "pvc-1".into(),
            target_path: climbing,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(victim.is_dir());

    // A directory beside the kubelet dir whose name starts like it.
    let sibling = t.kubelet.with_file_name("kubelet-other");
    std::fs::create_dir(&sibling).unwrap();
    assert_refused(
        n.node_unpublish_volume(unpublish_request("pvc-1", &sibling))
            .await,
        "a sibling of the kubelet dir",
    );
    assert!(sibling.is_dir());

    // The kubelet dir itself is not a target either.
    std::fs::remove_dir(t.kubelet.join("pods")).unwrap();
    assert_refused(
        n.node_unpublish_volume(unpublish_request("pvc-1", &t.kubelet))
            .await,
        "the kubelet dir itself",
    );
    assert!(t.kubelet.is_dir(), "the kubelet dir is still there");
    t.local.stop().await;
}

#[tokio::test]
async fn symlinks_out_of_the_kubelet_dir_are_refused() {
    use std::os::unix::fs::symlink;
    let t = confined().await;
    let mut c = t.local.controller();
    let mut n = t.local.node();
    let volume = create(&mut c, "escape-vol", &[]).await;

    // A parent that is a symlink to elsewhere: unpublish would remove outside/victim.
    let victim = t.outside.join("victim");
    std::fs::create_dir(&victim).unwrap();
    symlink(&t.outside, t.kubelet.join("pods/p1")).unwrap();
    assert_refused(
        n.node_unpublish_volume(unpublish_request(
            &volume.volume_id,
            &t.kubelet.join("pods/p1/victim"),
        ))
        .await,
        "unpublish through a symlinked parent",
    );
    assert!(victim.is_dir(), "outside/victim still there");

    // The target itself a symlink to elsewhere: publish would mount over outside/victim.
    let link = t.kubelet.join("pods/p2");
    symlink(&victim, &link).unwrap();
    assert_refused(
        n.node_publish_volume(publish_request(&volume.volume_id, &link))
            .await,
        "publish onto a symlink out",
    );
    assert!(!is_mount_point(&victim), "nothing mounted outside");
    assert_eq!(std::fs::read_dir(&victim).unwrap().count(), 0);

    // A relative symlink climbing out.
    symlink("../../outside", t.kubelet.join("pods/p3")).unwrap();
    assert_refused(
        n.node_publish_volume(publish_request(
            &volume.volume_id,
            &t.kubelet.join("pods/p3/new/mount"),
        ))
        .await,
        "publish below a relative symlink out",
    );
    assert!(!t.outside.join("new").exists(), "nothing created outside");

    // A dangling symlink: where it would lead can't be checked.
    symlink(t.outside.join("not-yet"), t.kubelet.join("pods/p4")).unwrap();
    assert_refused(
        n.node_publish_volume(publish_request(
            &volume.volume_id,
            &t.kubelet.join("pods/p4/mount"),
        ))
        .await,
        "publish below a dangling symlink",
    );
    assert!(!t.outside.join("not-yet").exists());

    // Symlinks that stay inside still work; the mount is at the resolved path.
    std::fs::create_dir(t.kubelet.join("pods/real")).unwrap();
    symlink(t.kubelet.join("pods/real"), t.kubelet.join("pods/alias")).unwrap();
    let via_alias = t.kubelet.join("pods/alias/mount");
    n.node_publish_volume(publish_request(&volume.volume_id, &via_alias))
        .await
        .expect("publish through a symlink inside");
    let real = t.kubelet.join("pods/real/mount");
    let _guard = MountGuard(real.clone());
    assert!(is_mount_point(&real), "mounted at the resolved path");
    n.node_unpublish_volume(unpublish_request(&volume.volume_id, &via_alias))
        .await
        .expect("unpublish through a symlink inside");
    assert!(!is_mount_point(&real) && !real.exists());
    delete(&mut c, &volume.volume_id).await;
    t.local.stop().await;
}

#[tokio::test]
async fn stage_and_unstage_outside_the_kubelet_dir_touch_nothing() {
    let t = confined().await;
    let mut c = t.local.controller();
    let mut n = t.local.node();
    let volume = create(&mut c, "stage-vol", &[]).await;
    // Something mounted elsewhere on the host: unstage would unmount it.
    let mounted = t.outside.join("mounted");
    std::fs::create_dir(&mounted).unwrap();
    let _guard = bind_on_itself(&mounted);
    assert_refused(
        n.node_unstage_volume(proto::NodeUnstageVolumeRequest {
            volume_id: volume.volume_id.clone(),
            staging_target_path: mounted.display().to_string(),
        })
        .await,
        "unstage outside",
    );
    assert!(is_mount_point(&mounted), "still mounted");
    assert_refused(
        n.node_stage_volume(proto::NodeStageVolumeRequest {
            volume_id: volume.volume_id.clone(),
            staging_target_path: t.outside.join("staging").display().to_string(),
            volume_capability: Some(mount_capability()),
            ..Default::default()
        })
        .await,
        "stage outside",
    );
    assert!(!t.outside.join("staging").exists());
    delete(&mut c, &volume.volume_id).await;
    t.local.stop().await;
}

// ---------------------------------------------------------------------------
// A volume's own path never follows a tenant's symlink and never reaches stowage's
// records (#21).
// ---------------------------------------------------------------------------

/// FAILED_PRECONDITION naming the link.
fn assert_link_refused(result: Result<impl std::fmt::Debug, tonic::Status>, link: &str) {
    let err = result.expect_err(link);
    assert_eq!(err.code(), Code::FailedPrecondition, "{link}: {err:?}");
    assert!(
        err.message().contains(link) && err.message().contains("symbolic link"),
        "the message names {link}: {}",
        err.message()
    );
}

#[tokio::test]
async fn a_symlink_planted_by_one_volume_never_redirects_another_volumes_publish() {
    use std::os::unix::fs::symlink;
    let t = confined().await;
    let mut c = t.local.controller();
    let mut n = t.local.node();
    // Nested sub-directories: `inner` lives inside `outer`'s directory, which
    // `outer`'s pod can write.
    let outer = create(&mut c, "outer", &[("subDir", "nest")]).await;
    let inner = create(&mut c, "inner", &[("subDir", "nest/inner")]).await;
    let decoy = t.outside.join("decoy");
    std::fs::create_dir(&decoy).unwrap();
    std::fs::write(decoy.join("secret"), "host data").unwrap();

    // `inner` is published, used and unpublished while its directory is real.
    let inner_target = t.kubelet.join("pods/p-inner/mount");
    let _inner_guard = MountGuard(inner_target.clone());
    n.node_publish_volume(publish_request(&inner.volume_id, &inner_target))
        .await
        .expect("publish inner");
    std::fs::write(inner_target.join("data"), "inner's data").unwrap();
    n.node_unpublish_volume(unpublish_request(&inner.volume_id, &inner_target))
        .await
        .unwrap();

    // Then `outer`'s pod swaps `inner`'s directory for a link to the host.
    let outer_target = t.kubelet.join("pods/p-outer/mount");
    n.node_publish_volume(publish_request(&outer.volume_id, &outer_target))
        .await
        .expect("publish outer");
    let _outer_guard = MountGuard(outer_target.clone());
    std::fs::rename(outer_target.join("inner"), outer_target.join("moved")).unwrap();
    symlink(&decoy, outer_target.join("inner")).unwrap();

    assert_link_refused(
        n.node_publish_volume(publish_request(&inner.volume_id, &inner_target))
            .await,
        "nest/inner",
    );
    assert!(
        !inner_target.exists(),
        "no target made for a refused publish"
    );
    assert!(
        !is_mount_point(&decoy),
        "nothing mounted from or onto the decoy"
    );
    assert_eq!(
        std::fs::read_to_string(decoy.join("secret")).unwrap(),
        "host data"
    );
    assert_eq!(
        std::fs::read_dir(&decoy).unwrap().count(),
        1,
        "the decoy is unchanged"
    );
    assert_eq!(
        std::fs::read_to_string(t.local.data_dir().join("nest/moved/data")).unwrap(),
        "inner's data",
        "the volume's data is untouched"
    );

    // A link relative to the export, pointing at another volume, is refused too:
    // no link is followed, wherever it leads.
    std::fs::remove_file(outer_target.join("inner")).unwrap();
    symlink("moved", outer_target.join("inner")).unwrap();
    assert_link_refused(
        n.node_publish_volume(publish_request(&inner.volume_id, &inner_target))
            .await,
        "nest/inner",
    );

    // Put back, the volume publishes again with its data.
    std::fs::remove_file(outer_target.join("inner")).unwrap();
    std::fs::rename(outer_target.join("moved"), outer_target.join("inner")).unwrap();
    n.node_publish_volume(publish_request(&inner.volume_id, &inner_target))
        .await
        .expect("publish inner again");
    assert_eq!(
        std::fs::read_to_string(inner_target.join("data")).unwrap(),
        "inner's data"
    );
    n.node_unpublish_volume(unpublish_request(&inner.volume_id, &inner_target))
        .await
        .unwrap();
    n.node_unpublish_volume(unpublish_request(&outer.volume_id, &outer_target))
        .await
        .unwrap();
    delete(&mut c, &inner.volume_id).await;
    delete(&mut c, &outer.volume_id).await;
    t.local.stop().await;
}

#[tokio::test]
async fn a_volume_id_naming_the_records_directory_is_refused_everywhere() {
    let t = confined().await;
    let mut c = t.local.controller();
    let mut n = t.local.node();
    let kept = create(&mut c, "kept", &[]).await;
    let records = t.local.data_dir().join(".stowage");
    let before = tree(&records);
    assert!(!before.is_empty(), "the record of `kept` is there");
    let target = t.kubelet.join("pods/p1/mount");
    for id in [
        "nfs###.stowage#pvc-x#delete",
        "nfs###.stowage#.stowage#delete",
        "nfs###.stowage/kept#kept#delete",
    ] {
        let refused = |err: tonic::Status, call: &str| {
            assert_eq!(err.code(), Code::InvalidArgument, "{call} {id}: {err:?}");
            assert!(
                err.message().contains("reserved"),
                "{call} {id}: {}",
                err.message()
            );
        };
        let err = c
            .delete_volume(proto::DeleteVolumeRequest {
                volume_id: id.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        refused(err, "DeleteVolume");
        let err = n
            .node_publish_volume(publish_request(id, &target))
            .await
            .unwrap_err();
        refused(err, "NodePublishVolume");
        let err = c
            .validate_volume_capabilities(proto::ValidateVolumeCapabilitiesRequest {
                volume_id: id.into(),
                volume_capabilities: vec![mount_capability()],
                ..Default::default()
            })
            .await
            .unwrap_err();
        refused(err, "ValidateVolumeCapabilities");
    }
    assert_eq!(tree(&records), before, "the records are untouched");
    assert!(!target.exists() && !is_mount_point(&target));
    let listed = c
        .list_volumes(proto::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed
            .entries
            .iter()
            .any(|e| e.volume.as_ref().unwrap().volume_id == kept.volume_id),
        "`kept` is still listed"
    );
    delete(&mut c, &kept.volume_id).await;
    t.local.stop().await;
}

#[tokio::test]
async fn volume_stats_outside_the_kubelet_dir_are_refused() {
    use std::os::unix::fs::symlink;
    let t = confined().await;
    let mut c = t.local.controller();
    let mut n = t.local.node();
    let volume = create(&mut c, "stats-vol", &[]).await;
    let stats = |path: &std::path::Path| proto::NodeGetVolumeStatsRequest {
        volume_id: volume.volume_id.clone(),
        volume_path: path.display().to_string(),
        staging_target_path: String::new(),
    };
    for outside in [
        std::path::Path::new("/etc"),
        std::path::Path::new("/root"),
        &t.outside,
    ] {
        assert_refused(
            n.node_get_volume_stats(stats(outside)).await,
            &format!("stats of {}", outside.display()),
        );
    }
    symlink("/etc", t.kubelet.join("pods/etc")).unwrap();
    assert_refused(
        n.node_get_volume_stats(stats(&t.kubelet.join("pods/etc")))
            .await,
        "stats through a symlink out",
    );
    // Inside, unpublished: not found, as before.
    let err = n
        .node_get_volume_stats(stats(&t.kubelet.join("pods/none")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    delete(&mut c, &volume.volume_id).await;
    t.local.stop().await;
}
