//! NFS snapshots, restores, clones and expansion through the real CSI server against a
//! real nfs-ganesha (tests/support/with-ganesha): the tree is copied over the wire by
//! the controller (contents, modes, owners, symlinks), a snapshot is independent of
//! its source, a half-made snapshot is never listed and is cleaned up, a copy that
//! outlasts the call answers "not ready" until it is done, and a snapshot being
//! restored can't be deleted under the restore.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use stowage::run::{Plan, Running, start};
use stowage_api::proto::csi::{self as proto, controller_client::ControllerClient};
use stowage_driver::backend::nfs::{NfsBackend, NfsConfig};
use stowage_driver::backend::{Backend, Backends};
use stowage_driver::node::SystemMounter;
use stowage_loops::csi_client::channel;
use stowage_nfs::client::ClientConfig;
use tonic::Code;
use tonic::transport::Channel;

struct Fixture {
    ganesha: Ganesha,
    _running: Running,
    channel: Channel,
    _dir: tempfile::TempDir,
}

impl Fixture {
    async fn start(test: &str, copy_wait: Duration) -> Option<Fixture> {
        let ganesha = Ganesha::from_env(test)?;
        let dir = tempfile::tempdir().unwrap();
        let backend = NfsBackend::new(NfsConfig {
            client: ClientConfig {
                call_timeout: Duration::from_secs(10),
                privileged_port: true,
                ..ClientConfig::default()
            },
            copy_wait,
            ..NfsConfig::default()
        });
        let running = start(Plan {
            socket: dir.path().join("csi.sock"),
            driver_name: "stowage.csi.dev".into(),
            backends: Backends::new(vec![Arc::new(backend) as Arc<dyn Backend>]),
            controller: true,
            node: None,
            nfs_node: None,
            mounter: Arc::new(SystemMounter::default()),
            http_addr: None,
            shutdown_grace: Duration::from_secs(5),
            backend_check_interval: stowage::run::DEFAULT_BACKEND_CHECK_INTERVAL,
        })
        .await
        .unwrap();
        let channel = channel::connect(&running.socket).await.unwrap();
        Some(Fixture {
            ganesha,
            _running: running,
            channel,
            _dir: dir,
        })
    }

    fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel.clone())
    }

    fn params(&self) -> [(&str, &str); 2] {
        [
            ("server", self.ganesha.server.as_str()),
            ("share", self.ganesha.share.as_str()),
        ]
    }

    fn dir(&self, name: &str) -> std::path::PathBuf {
        self.ganesha.share_dir.join(name)
    }
}

fn snapshot_request(source: &str, name: &str) -> proto::CreateSnapshotRequest {
    proto::CreateSnapshotRequest {
        source_volume_id: source.into(),
        name: name.into(),
        ..Default::default()
    }
}

fn from_source(
    name: &str,
    params: &[(&str, &str)],
    source: proto::volume_content_source::Type,
) -> proto::CreateVolumeRequest {
    proto::CreateVolumeRequest {
        volume_content_source: Some(proto::VolumeContentSource {
            r#type: Some(source),
        }),
        ..create_request(name, GIB, params)
    }
}

fn from_snapshot(
    name: &str,
    params: &[(&str, &str)],
    snapshot: &str,
) -> proto::CreateVolumeRequest {
    from_source(
        name,
        params,
        proto::volume_content_source::Type::Snapshot(
            proto::volume_content_source::SnapshotSource {
                snapshot_id: snapshot.into(),
            },
        ),
    )
}

fn clone_of(name: &str, params: &[(&str, &str)], volume: &str) -> proto::CreateVolumeRequest {
    from_source(
        name,
        params,
        proto::volume_content_source::Type::Volume(proto::volume_content_source::VolumeSource {
            volume_id: volume.into(),
        }),
    )
}

/// Every entry below `root`: relative path, kind, mode, owner, size and contents (or
/// link text) — what a copy must reproduce.
fn contents(root: &Path) -> Vec<(String, String)> {
    tree(root)
        .into_iter()
        .map(|relative| {
            let path = root.join(&relative);
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let what = if meta.file_type().is_symlink() {
                format!("link -> {}", std::fs::read_link(&path).unwrap().display())
            } else if meta.is_dir() {
                format!(
                    "dir {:o} {}:{}",
                    meta.mode() & 0o7777,
                    meta.uid(),
                    meta.gid()
                )
            } else {
                let data = std::fs::read(&path).unwrap();
                let sum = data
                    .iter()
                    .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(*b)));
                format!(
                    "file {:o} {}:{} {} bytes, sum {sum:x}",
                    meta.mode() & 0o7777,
                    meta.uid(),
                    meta.gid(),
                    data.len()
                )
            };
            (relative.display().to_string(), what)
        })
        .collect()
}

/// A volume directory with nested files, modes, owners and links.
fn fill(dir: &Path) {
    std::fs::create_dir_all(dir.join("db/wal")).unwrap();
    std::fs::write(dir.join("db/data"), vec![7u8; 300 * 1024]).unwrap();
    std::fs::write(dir.join("db/wal/0001"), b"first").unwrap();
    std::fs::set_permissions(dir.join("db/data"), std::fs::Permissions::from_mode(0o600)).unwrap();
    nix::unistd::chown(
        &dir.join("db/wal/0001"),
        Some(nix::unistd::Uid::from_raw(999)),
        Some(nix::unistd::Gid::from_raw(999)),
    )
    .unwrap();
    symlink("/etc/shadow", dir.join("db/escape")).unwrap();
    symlink("wal/0001", dir.join("db/latest")).unwrap();
}

#[tokio::test]
async fn snapshots_restores_and_clones_copy_the_tree_over_the_wire() {
    let Some(f) = Fixture::start("snapshots_restores_and_clones", Duration::from_secs(30)).await
    else {
        return;
    };
    let mut c = f.controller();
    let params = f.params();
    let source = create(&mut c, "pvc-snap-src", &params).await;
    fill(&f.dir("pvc-snap-src"));
    let original = contents(&f.dir("pvc-snap-src"));

    let snapshot = c
        .create_snapshot(snapshot_request(&source.volume_id, "snap-1"))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert!(
        snapshot.ready_to_use,
        "a small volume is copied within the call"
    );
    assert_eq!(snapshot.source_volume_id, source.volume_id);
    assert_eq!(
        snapshot.size_bytes, GIB,
        "the source's capacity (its restoreSize)"
    );
    // The same name and source again: the same snapshot; another source: refused.
    let again = c
        .create_snapshot(snapshot_request(&source.volume_id, "snap-1"))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(again.snapshot_id, snapshot.snapshot_id);
    let other = create(&mut c, "pvc-snap-other", &params).await;
    let err = c
        .create_snapshot(snapshot_request(&other.volume_id, "snap-1"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");

    // A clone is the source as it is now.
    let clone = c
        .create_volume(clone_of("pvc-clone", &params, &source.volume_id))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(contents(&f.dir("pvc-clone")), original);
    assert_eq!(
        std::fs::read_link(f.dir("pvc-clone/db/escape")).unwrap(),
        Path::new("/etc/shadow"),
        "links are copied as links, never followed"
    );
    // The source changes after the snapshot; the snapshot, a copy of its own, does
    // not. (Written on the server's disk: ganesha's directory cache would hide the
    // change from NFS clients for a while, so the restore is compared as snapshotted.)
    std::fs::write(f.dir("pvc-snap-src/db/wal/0002"), b"later").unwrap();
    let snapshot_data = f.ganesha.share_dir.join(".stowage-snapshots/snap-1/data");
    assert_eq!(
        contents(&snapshot_data),
        original,
        "the snapshot's own copy"
    );
    let restored = c
        .create_volume(from_snapshot(
            "pvc-restored",
            &params,
            &snapshot.snapshot_id,
        ))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(
        contents(&f.dir("pvc-restored")),
        original,
        "restored as snapshotted"
    );
    assert!(matches!(
        restored.content_source.and_then(|s| s.r#type),
        Some(proto::volume_content_source::Type::Snapshot(_))
    ));
    // Idempotent by name: the same clone again, nothing copied twice.
    let clone_again = c
        .create_volume(clone_of("pvc-clone", &params, &source.volume_id))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(clone_again.volume_id, clone.volume_id);
    let err = c
        .create_volume(from_snapshot("pvc-clone", &params, &snapshot.snapshot_id))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "another source: {err:?}");

    // Sources that are not there.
    let missing_snapshot = format!("nfs-snap#{}#{}#missing", f.ganesha.server, f.ganesha.share);
    let missing_volume = format!(
        "nfs#{}#{}#pvc-gone#pvc-gone#delete",
        f.ganesha.server, f.ganesha.share
    );
    for (request, what) in [
        (
            from_snapshot("pvc-none-1", &params, &missing_snapshot),
            "a missing snapshot",
        ),
        (
            from_snapshot("pvc-none-2", &params, "not-a-snapshot-id"),
            "a foreign snapshot id",
        ),
        (
            clone_of("pvc-none-3", &params, &missing_volume),
            "a missing volume",
        ),
    ] {
        let err = c.create_volume(request).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{what}: {err:?}");
    }

    // Listing, by id and by source.
    let listed = c
        .list_snapshots(proto::ListSnapshotsRequest {
            source_volume_id: source.volume_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(listed.len(), 1);
    assert_eq!(
        listed[0].snapshot.as_ref().unwrap().snapshot_id,
        snapshot.snapshot_id
    );

    // Expansion records the new capacity; the node has nothing to grow.
    let expanded = c
        .controller_expand_volume(proto::ControllerExpandVolumeRequest {
            volume_id: clone.volume_id.clone(),
            capacity_range: Some(proto::CapacityRange {
                required_bytes: 3 * GIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(expanded.capacity_bytes, 3 * GIB);
    assert!(!expanded.node_expansion_required);
    let volumes = c
        .list_volumes(proto::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    let listed_clone = volumes
        .iter()
        .filter_map(|e| e.volume.as_ref())
        .find(|v| v.volume_id == clone.volume_id)
        .unwrap();
    assert_eq!(listed_clone.capacity_bytes, 3 * GIB, "the record says so");

    // Deleting the snapshot removes its copy from the server.
    c.delete_snapshot(proto::DeleteSnapshotRequest {
        snapshot_id: snapshot.snapshot_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(
        !f.ganesha
            .share_dir
            .join(".stowage-snapshots/snap-1")
            .exists()
    );
    let err = c
        .create_volume(from_snapshot("pvc-after", &params, &snapshot.snapshot_id))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    for id in [
        &restored.volume_id,
        &clone.volume_id,
        &source.volume_id,
        &other.volume_id,
    ] {
        delete(&mut c, id).await;
    }
}

#[tokio::test]
async fn a_half_made_snapshot_is_never_listed_and_is_made_again() {
    let Some(f) = Fixture::start("a_half_made_snapshot", Duration::from_secs(30)).await else {
        return;
    };
    let mut c = f.controller();
    let params = f.params();
    let source = create(&mut c, "pvc-half-src", &params).await;
    fill(&f.dir("pvc-half-src"));
    // What a crash mid-copy leaves: a scratch directory with part of the tree.
    let scratch = f.ganesha.share_dir.join(".stowage-work/snapshot-snap-half");
    std::fs::create_dir_all(scratch.join("data/db")).unwrap();
    std::fs::write(scratch.join("data/db/torn"), b"half").unwrap();
    let listed = c
        .list_snapshots(proto::ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert!(
        !listed.iter().any(|e| e
            .snapshot
            .as_ref()
            .unwrap()
            .snapshot_id
            .ends_with("#snap-half")),
        "a half-made snapshot is not listed: {listed:?}"
    );
    let snapshot = c
        .create_snapshot(snapshot_request(&source.volume_id, "snap-half"))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert!(snapshot.ready_to_use);
    assert!(!scratch.exists(), "the scratch copy is gone");
    let data = f
        .ganesha
        .share_dir
        .join(".stowage-snapshots/snap-half/data");
    assert_eq!(
        contents(&data),
        contents(&f.dir("pvc-half-src")),
        "made again, whole"
    );
    c.delete_snapshot(proto::DeleteSnapshotRequest {
        snapshot_id: snapshot.snapshot_id,
        ..Default::default()
    })
    .await
    .unwrap();
    delete(&mut c, &source.volume_id).await;
}

#[tokio::test]
async fn copies_that_outlast_the_call_answer_not_ready_until_done() {
    // No waiting at all: every call sees the copy under way until it is done.
    let Some(f) = Fixture::start("copies_that_outlast_the_call", Duration::ZERO).await else {
        return;
    };
    let mut c = f.controller();
    let params = f.params();
    let source = create(&mut c, "pvc-slow-src", &params).await;
    std::fs::write(f.dir("pvc-slow-src/big"), vec![3u8; 64 << 20]).unwrap();
    let first = c
        .create_snapshot(snapshot_request(&source.volume_id, "snap-slow"))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert!(!first.ready_to_use, "not ready while copying");
    let mut ready = None;
    for _ in 0..600 {
        let again = c
            .create_snapshot(snapshot_request(&source.volume_id, "snap-slow"))
            .await
            .unwrap()
            .into_inner()
            .snapshot
            .unwrap();
        assert_eq!(again.snapshot_id, first.snapshot_id, "the same snapshot");
        if again.ready_to_use {
            ready = Some(again);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let snapshot = ready.expect("the snapshot became ready");

    // A restore under way: UNAVAILABLE until done, and the snapshot can't be
    // deleted under it.
    let err = c
        .create_volume(from_snapshot(
            "pvc-slow-restore",
            &params,
            &snapshot.snapshot_id,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("is still being copied from"),
        "{}",
        err.message()
    );
    let err = c
        .delete_snapshot(proto::DeleteSnapshotRequest {
            snapshot_id: snapshot.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let mut restored = None;
    for _ in 0..600 {
        match c
            .create_volume(from_snapshot(
                "pvc-slow-restore",
                &params,
                &snapshot.snapshot_id,
            ))
            .await
        {
            Ok(volume) => {
                restored = volume.into_inner().volume;
                break;
            }
            Err(e) if e.code() == Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("restore failed: {e:?}"),
        }
    }
    let restored = restored.expect("the restore finished");
    assert_eq!(
        std::fs::read(f.dir("pvc-slow-restore/big")).unwrap().len(),
        64 << 20
    );
    c.delete_snapshot(proto::DeleteSnapshotRequest {
        snapshot_id: snapshot.snapshot_id,
        ..Default::default()
    })
    .await
    .unwrap();
    delete(&mut c, &restored.volume_id).await;
    delete(&mut c, &source.volume_id).await;
}
