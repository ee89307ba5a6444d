//! The NFS backend through the real CSI server against a real nfs-ganesha (started by
//! `tests/support/with-ganesha`, which `tests/run` uses): directories, modes and
//! owners on the server's disk, onDelete, hostile template inputs that must not touch
//! anything outside the share, root squash, capacity, the in-flight guard, and what
//! the node would mount.

mod common;
#[path = "common/process.rs"]
mod process;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use stowage::run::{Plan, Running, start};
use stowage_api::proto::csi::{
    self as proto, controller_client::ControllerClient, node_client::NodeClient,
};
use stowage_driver::backend::nfs::{NfsBackend, NfsConfig};
use stowage_driver::backend::{Backend, Backends};
use stowage_driver::node::{MountError, Mounter, SystemMounter};
use stowage_loops::csi_client::channel;
use stowage_nfs::client::ClientConfig;
use tonic::Code;
use tonic::transport::Channel;

/// source, fs type, options
type MountCall = (String, String, Vec<String>);

/// Records what would be mounted; the kernel here has no NFS client.
#[derive(Default)]
struct RecordingMounter {
    mounts: Mutex<BTreeMap<PathBuf, MountCall>>,
}

#[async_trait::async_trait]
impl Mounter for RecordingMounter {
    async fn mount(
        &self,
        source: &str,
        target: &Path,
        fs_type: &str,
        options: &[String],
    ) -> Result<(), MountError> {
        let entry = (source.to_owned(), fs_type.to_owned(), options.to_vec());
        self.mounts.lock().unwrap().insert(target.to_owned(), entry);
        Ok(())
    }
    async fn bind(&self, _: &Path, _: &Path, _: bool) -> Result<(), MountError> {
        panic!("an NFS volume on a remote server is never bind-mounted")
    }
    async fn bind_opened(
        &self,
        _: std::os::fd::OwnedFd,
        _: &Path,
        _: bool,
    ) -> Result<(), MountError> {
        panic!("an NFS volume on a remote server is never bind-mounted")
    }
    async fn unmount(&self, target: &Path) -> Result<(), MountError> {
        self.mounts.lock().unwrap().remove(target);
        Ok(())
    }
    async fn is_mounted(&self, target: &Path) -> Result<bool, MountError> {
        Ok(self.mounts.lock().unwrap().contains_key(target))
    }
}

/// The tests share one export and compare snapshots of it: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Fixture {
    _serial: tokio::sync::MutexGuard<'static, ()>,
    ganesha: Ganesha,
    _running: Running,
    channel: Channel,
    _dir: tempfile::TempDir,
}

impl Fixture {
    async fn start(
        test: &str,
        mounter: Arc<dyn Mounter>,
        call_timeout: Duration,
    ) -> Option<Fixture> {
        let ganesha = Ganesha::from_env(test)?;
        let serial = SERIAL.lock().await;
        let dir = tempfile::tempdir().unwrap();
        let backend = NfsBackend::new(NfsConfig {
            default_export: None,
            client: ClientConfig {
                call_timeout,
                privileged_port: true,
                ..ClientConfig::default()
            },
            resolve_timeout: Duration::from_secs(5),
            copy_wait: stowage_driver::backend::nfs::DEFAULT_COPY_WAIT,
        });
        let running = start(Plan {
            socket: dir.path().join("csi.sock"),
            driver_name: "stowage.csi.dev".into(),
            backends: Backends::new(vec![Arc::new(backend) as Arc<dyn Backend>]),
            controller: true,
            node: Some(stowage_driver::csi::node::NodeConfig {
                // Targets are under the temp dir, standing in for kubelet's.
                kubelet_dir: dir.path().to_path_buf(),
                ..stowage_driver::csi::node::NodeConfig::new("node-1")
            }),
            nfs_node: None,
            mounter,
            http_addr: None,
            shutdown_grace: Duration::from_secs(5),
            backend_check_interval: stowage::run::DEFAULT_BACKEND_CHECK_INTERVAL,
        })
        .await
        .unwrap();
        let channel = channel::connect(&running.socket).await.unwrap();
        Some(Fixture {
            _serial: serial,
            ganesha,
            _running: running,
            channel,
            _dir: dir,
        })
    }

    fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel.clone())
    }

    fn rw(&self) -> Vec<(&'static str, String)> {
        vec![
            ("server", self.ganesha.server.clone()),
            ("share", self.ganesha.share.clone()),
        ]
    }
}

fn with<'a>(
    base: &'a [(&'static str, String)],
    extra: &[(&'a str, &'a str)],
) -> Vec<(&'a str, &'a str)> {
    base.iter()
        .map(|(k, v)| (*k, v.as_str()))
        .chain(extra.iter().copied())
        .collect()
}

#[tokio::test]
async fn directories_get_the_requested_mode_and_owner_on_the_server() {
    let Some(f) = Fixture::start(
        "directories_get_the_requested_mode_and_owner",
        Arc::new(RecordingMounter::default()),
        Duration::from_secs(5),
    )
    .await
    else {
        return;
    };
    let mut c = f.controller();
    let base = f.rw();
    let volume = create(
        &mut c,
        "pvc-mode",
        &with(
            &base,
            &[
                ("mountPermissions", "0750"),
                ("uid", "1234"),
                ("gid", "5678"),
            ],
        ),
    )
    .await;
    let meta = std::fs::metadata(f.ganesha.share_dir.join("pvc-mode")).unwrap();
    assert!(meta.is_dir());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o750);
    assert_eq!((meta.uid(), meta.gid()), (1234, 5678));
    assert!(
        volume
            .volume_id
            .starts_with(&format!("nfs#{}#", f.ganesha.server)),
        "the id carries the server: {}",
        volume.volume_id
    );
    assert!(
        volume.volume_context.is_empty(),
        "{:?}",
        volume.volume_context
    );
    // A repeat finds the same volume and creates nothing new.
    let before = tree(&f.ganesha.root);
    let again = create(
        &mut c,
        "pvc-mode",
        &with(
            &base,
            &[
                ("mountPermissions", "0750"),
                ("uid", "1234"),
                ("gid", "5678"),
            ],
        ),
    )
    .await;
    assert_eq!(again.volume_id, volume.volume_id);
    assert_eq!(tree(&f.ganesha.root), before);
    delete(&mut c, &volume.volume_id).await;
    assert!(!f.ganesha.share_dir.join("pvc-mode").exists());
}

#[tokio::test]
async fn templated_sub_directories_and_on_delete() {
    let Some(f) = Fixture::start(
        "templated_sub_directories_and_on_delete",
        Arc::new(RecordingMounter::default()),
        Duration::from_secs(5),
    )
    .await
    else {
        return;
    };
    let mut c = f.controller();
    let base = f.rw();
    let claim = [
        ("subDir", "${pvc.metadata.namespace}/${pvc.metadata.name}"),
        ("csi.storage.k8s.io/pvc/name", "data-db-0"),
        ("csi.storage.k8s.io/pvc/namespace", "prod"),
        ("csi.storage.k8s.io/pv/name", "pvc-tpl"),
    ];
    let volume = create(&mut c, "pvc-tpl", &with(&base, &claim)).await;
    let dir = f.ganesha.share_dir.join("prod/data-db-0");
    assert!(dir.is_dir());
    std::fs::write(dir.join("file"), "x").unwrap();
    delete(&mut c, &volume.volume_id).await;
    assert!(!dir.exists(), "onDelete=delete removes the tree");
    assert!(
        f.ganesha.share_dir.join("prod").is_dir(),
        "the parent stays"
    );

    let archive = [
        ("subDir", "arch-${pv.metadata.name}"),
        ("onDelete", "archive"),
        ("csi.storage.k8s.io/pv/name", "pvc-arch"),
    ];
    let volume = create(&mut c, "pvc-arch", &with(&base, &archive)).await;
    delete(&mut c, &volume.volume_id).await;
    assert!(f.ganesha.share_dir.join("archived-arch-pvc-arch").is_dir());
    assert!(!f.ganesha.share_dir.join("arch-pvc-arch").exists());
}

#[tokio::test]
async fn hostile_inputs_change_nothing_outside_or_inside_the_share() {
    let Some(f) = Fixture::start(
        "hostile_inputs_change_nothing",
        Arc::new(RecordingMounter::default()),
        Duration::from_secs(5),
    )
    .await
    else {
        return;
    };
    let mut c = f.controller();
    let base = f.rw();
    let before = tree(&f.ganesha.root);
    let cases: &[&[(&str, &str)]] = &[
        &[
            ("subDir", "${pvc.metadata.name}"),
            ("csi.storage.k8s.io/pvc/name", ".."),
        ],
        &[
            ("subDir", "${pvc.metadata.name}"),
            ("csi.storage.k8s.io/pvc/name", "../../escape"),
        ],
        &[
            ("subDir", "${pvc.metadata.namespace}/x"),
            ("csi.storage.k8s.io/pvc/namespace", "a/b"),
        ],
        &[
            ("subDir", "${pvc.metadata.namespace}/x"),
            ("csi.storage.k8s.io/pvc/namespace", "../.."),
        ],
        &[("subDir", "../escape")],
        &[("subDir", "a/../../escape")],
        &[("subDir", "/")],
        &[
            ("subDir", "${pvc.metadata.name}"),
            ("csi.storage.k8s.io/pvc/name", "a\0b"),
        ],
    ];
    for extra in cases {
        let err = c
            .create_volume(create_request("pvc-hostile", GIB, &with(&base, extra)))
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{extra:?}: {}",
            err.message()
        );
        assert!(
            err.message().contains("subDir") || err.message().contains("path component"),
            "{}",
            err.message()
        );
    }
    for hostile_share in ["/export/rw/..", "/export/rw/../squash", "relative"] {
        let params = [
            ("server", f.ganesha.server.as_str()),
            ("share", hostile_share),
        ];
        let err = c
            .create_volume(create_request("pvc-hostile", GIB, &params))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{hostile_share}");
    }
    for hostile_id in [
        format!(
            "nfs#{}#{}#../..#x#delete",
            f.ganesha.server, f.ganesha.share
        ),
        format!(
            "nfs#{}#{}#a/../../..#x#delete",
            f.ganesha.server, f.ganesha.share
        ),
        format!("nfs#{}#{}#ok#..#delete", f.ganesha.server, f.ganesha.share),
    ] {
        let err = c
            .delete_volume(proto::DeleteVolumeRequest {
                volume_id: hostile_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{hostile_id}: {err:?}");
    }
    assert_eq!(
        tree(&f.ganesha.root),
        before,
        "no hostile input created, renamed or deleted anything"
    );
}

#[tokio::test]
async fn root_squash_is_a_clear_permission_error_and_creates_nothing() {
    let Some(f) = Fixture::start(
        "root_squash_is_a_clear_permission_error",
        Arc::new(RecordingMounter::default()),
        Duration::from_secs(5),
    )
    .await
    else {
        return;
    };
    let mut c = f.controller();
    let params = [
        ("server", f.ganesha.server.as_str()),
        ("share", f.ganesha.squash_share.as_str()),
    ];
    let before = tree(&f.ganesha.root);
    let err = c
        .create_volume(create_request("pvc-squashed", GIB, &params))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    assert!(err.message().contains("squash"), "{}", err.message());
    assert_eq!(tree(&f.ganesha.root), before);
}

#[tokio::test]
async fn capacity_comes_from_fsstat() {
    let Some(f) = Fixture::start(
        "capacity_comes_from_fsstat",
        Arc::new(RecordingMounter::default()),
        Duration::from_secs(5),
    )
    .await
    else {
        return;
    };
    let params = params(&[("server", &f.ganesha.server), ("share", &f.ganesha.share)]);
    let capacity = f
        .controller()
        .get_capacity(proto::GetCapacityRequest {
            parameters: params,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .available_capacity;
    let usage = stowage_driver::node::usage(&f.ganesha.share_dir).unwrap();
    let diff = (capacity - usage.bytes_available as i64).abs();
    assert!(
        capacity > 0 && diff < usage.bytes_total as i64 / 10,
        "{capacity} vs {usage:?}"
    );
}

#[tokio::test]
async fn node_mounts_the_export_sub_directory_with_nfsv3() {
    let mounter = Arc::new(RecordingMounter::default());
    let Some(f) = Fixture::start(
        "node_mounts_the_export_sub_directory",
        mounter.clone(),
        Duration::from_secs(5),
    )
    .await
    else {
        return;
    };
    let mut c = f.controller();
    let volume = create(&mut c, "pvc-node", &with(&f.rw(), &[])).await;
    let mut n = NodeClient::new(f.channel.clone());
    let target = f._dir.path().join("target");
    let mut capability = mount_capability();
    if let Some(proto::volume_capability::AccessType::Mount(m)) = &mut capability.access_type {
        m.mount_flags = vec!["hard".into(), "timeo=600".into()];
    }
    n.node_publish_volume(proto::NodePublishVolumeRequest {
        volume_id: volume.volume_id.clone(),
        target_path: target.display().to_string(),
        volume_capability: Some(capability),
        ..Default::default()
    })
    .await
    .unwrap();
    let expected = (
        format!("{}:{}/pvc-node", f.ganesha.server, f.ganesha.share),
        "nfs".to_owned(),
        vec![
            "vers=3".to_owned(),
            "hard".to_owned(),
            "timeo=600".to_owned(),
        ],
    );
    assert_eq!(mounter.mounts.lock().unwrap().get(&target), Some(&expected));
    assert!(target.is_dir(), "target created");
    n.node_unpublish_volume(proto::NodeUnpublishVolumeRequest {
        volume_id: volume.volume_id.clone(),
        target_path: target.display().to_string(),
    })
    .await
    .unwrap();
    assert!(!target.exists() && mounter.mounts.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_failing_kernel_mount_is_reported_and_leaves_no_target() {
    // The real mount(8): this kernel has no NFS client, so it fails like a broken node would.
    let Some(f) = Fixture::start(
        "a_failing_kernel_mount_is_reported",
        Arc::new(SystemMounter::new(Duration::from_secs(30))),
        Duration::from_secs(5),
    )
    .await
    else {
        return;
    };
    let mut c = f.controller();
    let volume = create(&mut c, "pvc-kernel", &with(&f.rw(), &[])).await;
    let target = f._dir.path().join("kernel-target");
    let err = NodeClient::new(f.channel.clone())
        .node_publish_volume(proto::NodePublishVolumeRequest {
            volume_id: volume.volume_id.clone(),
            target_path: target.display().to_string(),
            volume_capability: Some(mount_capability()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Internal);
    assert!(
        err.message().contains("mount -t nfs -o vers=3"),
        "{}",
        err.message()
    );
    assert!(!target.exists(), "the target we created is removed again");
}

#[tokio::test]
async fn a_second_operation_on_a_busy_volume_is_aborted() {
    let Some(f) = Fixture::start(
        "a_second_operation_on_a_busy_volume_is_aborted",
        Arc::new(RecordingMounter::default()),
        Duration::from_millis(1500),
    )
    .await
    else {
        return;
    };
    let mut c = f.controller();
    // Warm the pool, then freeze the server so the first call hangs until its timeout.
    let warm = create(&mut c, "pvc-warm", &with(&f.rw(), &[])).await;
    let pid: i32 = std::fs::read_to_string("/run/stowage-ganesha/ganesha.pid")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(pid);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let base = f.rw();
    let request = create_request("pvc-busy", GIB, &with(&base, &[]));
    // Both calls overlap: whichever claims the volume first hangs on the frozen server
    // until its NFS timeout; the other must be ABORTED at once.
    let (mut a, mut b) = (f.controller(), f.controller());
    let (ra, rb) = tokio::join!(
        a.create_volume(request.clone()),
        b.create_volume(request.clone())
    );
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    let mut codes = [ra.unwrap_err().code(), rb.unwrap_err().code()];
    codes.sort_by_key(|c| *c as i32);
    assert_eq!(
        codes,
        [Code::DeadlineExceeded, Code::Aborted],
        "one timed out, one was aborted"
    );
    // After the server thaws, the retry converges on one volume.
    let volume = create(&mut c, "pvc-busy", &with(&base, &[])).await;
    delete(&mut c, &volume.volume_id).await;
    delete(&mut c, &warm.volume_id).await;
}

/// `stowage local --nfs-server --nfs-share` (the real binary) provisions into that
/// export, starts no embedded server (no --data-dir made), and its node mounts the
/// volume with `mount -t nfs` from that server (which this kernel cannot do: the
/// error shows what was run) rather than binding a local directory (#25).
#[tokio::test]
async fn local_with_an_nfs_server_of_its_own_provisions_there() {
    let Some(ganesha) = Ganesha::from_env("local_with_an_nfs_server_of_its_own_provisions_there")
    else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("csi.sock");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_stowage"))
        .current_dir(dir.path())
        .args([
            "local",
            "--endpoint",
            &format!("unix://{}", socket.display()),
        ])
        .args([
            "--nfs-server",
            &ganesha.server,
            "--nfs-share",
            &ganesha.share,
        ])
        .args(["--node-id", "n1", "--shutdown-grace", "1s"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let mut child = process::Process(child);
    let mut banner = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.0.stdout.take().unwrap()),
        &mut banner,
    )
    .unwrap();
    let export = format!("{}:{}", ganesha.server, ganesha.share);
    assert!(
        banner.contains(&export),
        "the banner names the export: {banner}"
    );
    assert!(!banner.contains("embedded"), "{banner}");

    let channel = channel::connect(&socket).await.unwrap();
    let mut c = ControllerClient::new(channel.clone());
    let volume = create(&mut c, "pvc-own-export", &[]).await;
    assert!(
        ganesha.share_dir.join("pvc-own-export").is_dir(),
        "the volume's directory is on the export"
    );
    assert!(
        !dir.path().join("stowage-data").exists(),
        "no embedded server's data dir"
    );
    let target = dir.path().join("pods/p1/mount");
    let err = NodeClient::new(channel)
        .node_publish_volume(proto::NodePublishVolumeRequest {
            volume_id: volume.volume_id.clone(),
            target_path: target.display().to_string(),
            volume_capability: Some(mount_capability()),
            ..Default::default()
        })
        .await
        .expect_err("this kernel has no NFS client");
    assert!(
        err.message().contains("-t nfs")
            && err.message().contains(&format!("{export}/pvc-own-export")),
        "published by mounting the export: {}",
        err.message()
    );
    delete(&mut c, &volume.volume_id).await;
    assert!(!ganesha.share_dir.join("pvc-own-export").exists());
    child.stop();
}
