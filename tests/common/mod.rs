//! Shared test fixtures: start `stowage local` on a temp socket, CSI clients, request
//! builders, and the nfs-ganesha environment made by `tests/support/with-ganesha`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use stowage::config::Command;
use stowage::run::{Stack, start_stack};
use stowage_api::proto::csi::{
    self as proto, controller_client::ControllerClient, identity_client::IdentityClient,
    node_client::NodeClient, volume_capability as vc,
};
use stowage_loops::csi_client::channel;
use tonic::transport::Channel;

pub const GIB: i64 = 1 << 30;

/// A running `stowage local` in a temp dir.
pub struct Local {
    pub stack: Stack,
    pub dir: tempfile::TempDir,
    pub channel: Channel,
}

impl Local {
    /// Node paths confined to the temp dir (it stands in for kubelet's directory).
    pub async fn start() -> Local {
        Self::start_with_kubelet_dir(Path::to_path_buf).await
    }

    /// `--kubelet-dir` chosen from the temp dir (which must exist by then).
    pub async fn start_with_kubelet_dir(kubelet_dir: impl FnOnce(&Path) -> PathBuf) -> Local {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("csi.sock");
        let data = dir.path().join("data");
        let kubelet_dir = kubelet_dir(dir.path());
        let cli = stowage::config::parse_from([
            "stowage",
            "local",
            "--endpoint",
            &format!("unix://{}", socket.display()),
            "--data-dir",
            data.to_str().unwrap(),
            "--node-id",
            "test-node",
            "--nfs-timeout",
            "5s",
            "--kubelet-dir",
            kubelet_dir.to_str().unwrap(),
        ])
        .expect("valid test arguments");
        let Command::Local(args) = cli.command else {
            unreachable!()
        };
        let settings = stowage::settings::local(&args).expect("settings");
        let stack = start_stack(settings).await.expect("stowage local starts");
        let channel = channel::connect(&socket).await.expect("connect to socket");
        Local {
            stack,
            dir,
            channel,
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        std::fs::canonicalize(self.dir.path().join("data")).unwrap()
    }

    pub fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel.clone())
    }

    pub fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.channel.clone())
    }

    pub fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel.clone())
    }

    pub async fn stop(self) {
        let socket = self.stack.running.socket.clone();
        self.stack.stop().await.unwrap();
        assert!(!socket.exists(), "socket removed on shutdown");
    }
}

pub fn mount_capability() -> proto::VolumeCapability {
    capability_with_mode(vc::access_mode::Mode::SingleNodeWriter)
}

pub fn capability_with_mode(mode: vc::access_mode::Mode) -> proto::VolumeCapability {
    proto::VolumeCapability {
        access_type: Some(vc::AccessType::Mount(vc::MountVolume::default())),
        access_mode: Some(vc::AccessMode { mode: mode as i32 }),
    }
}

pub fn block_capability() -> proto::VolumeCapability {
    proto::VolumeCapability {
        access_type: Some(vc::AccessType::Block(vc::BlockVolume {})),
        access_mode: Some(vc::AccessMode {
            mode: vc::access_mode::Mode::SingleNodeWriter as i32,
        }),
    }
}

pub fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn create_request(
    name: &str,
    bytes: i64,
    parameters: &[(&str, &str)],
) -> proto::CreateVolumeRequest {
    proto::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(proto::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount_capability()],
        parameters: params(parameters),
        ..Default::default()
    }
}

pub async fn create(
    client: &mut ControllerClient<Channel>,
    name: &str,
    parameters: &[(&str, &str)],
) -> proto::Volume {
    client
        .create_volume(create_request(name, GIB, parameters))
        .await
        .unwrap_or_else(|e| panic!("CreateVolume {name}: {e}"))
        .into_inner()
        .volume
        .expect("volume in response")
}

pub async fn delete(client: &mut ControllerClient<Channel>, volume_id: &str) {
    client
        .delete_volume(proto::DeleteVolumeRequest {
            volume_id: volume_id.into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("DeleteVolume {volume_id}: {e}"));
}

/// Every path under `root` (relative), sorted: a snapshot to prove nothing else changed.
pub fn tree(root: &Path) -> Vec<PathBuf> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            out.push(path.strip_prefix(root).unwrap().to_path_buf());
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                walk(root, &path, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

/// Is `path` a mount point (per /proc/self/mountinfo)?
pub fn is_mount_point(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    stowage_driver::node::mount_points(&info)
        .iter()
        .any(|p| p == path)
}

/// The nfs-ganesha that `tests/support/with-ganesha` runs for this process.
pub struct Ganesha {
    pub server: String,
    pub share: String,
    pub share_dir: PathBuf,
    pub squash_share: String,
    pub squash_dir: PathBuf,
    pub root: PathBuf,
    pub stop: PathBuf,
    pub start: PathBuf,
    pub pid_file: PathBuf,
}

impl Ganesha {
    /// `None` (with a message saying why) when not run under with-ganesha; `tests/run`
    /// sets STOWAGE_REQUIRE_GANESHA=1 so that there a missing server is a failure.
    pub fn from_env(test: &str) -> Option<Ganesha> {
        let var = |name: &str| std::env::var(name).ok();
        match var("STOWAGE_TEST_NFS_SERVER") {
            Some(server) => Some(Ganesha {
                server,
                share: var("STOWAGE_TEST_NFS_SHARE").unwrap(),
                share_dir: var("STOWAGE_TEST_NFS_SHARE_DIR").unwrap().into(),
                squash_share: var("STOWAGE_TEST_NFS_SQUASH_SHARE").unwrap(),
                squash_dir: var("STOWAGE_TEST_NFS_SQUASH_DIR").unwrap().into(),
                root: var("STOWAGE_TEST_NFS_ROOT").unwrap().into(),
                stop: var("STOWAGE_TEST_GANESHA_STOP").unwrap().into(),
                start: var("STOWAGE_TEST_GANESHA_START").unwrap().into(),
                pid_file: var("STOWAGE_TEST_GANESHA_PID_FILE").unwrap().into(),
            }),
            None if var("STOWAGE_REQUIRE_GANESHA").as_deref() == Some("1") => {
                panic!(
                    "{test}: STOWAGE_REQUIRE_GANESHA=1 but no ganesha: run it under tests/support/with-ganesha"
                )
            }
            None => {
                eprintln!(
                    "SKIPPED {test}: needs nfs-ganesha; run via tests/run or tests/support/with-ganesha cargo test"
                );
                None
            }
        }
    }

    /// SIGSTOP (`true`) or SIGCONT the server: stopped, it still takes connections
    /// (the kernel does) and answers no call — a hung server, not a dead one.
    pub fn pause(&self, paused: bool) {
        let pid: i32 = std::fs::read_to_string(&self.pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let signal = if paused {
            nix::sys::signal::Signal::SIGSTOP
        } else {
            nix::sys::signal::Signal::SIGCONT
        };
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).unwrap();
    }

    pub fn run(script: &Path) {
        let status = std::process::Command::new(script).status().unwrap();
        assert!(status.success(), "{} failed", script.display());
    }
}

pub mod cluster;
pub mod fake_kube;
pub mod fault_proxy;
pub mod hypervisor;
pub mod moto;
pub mod stand_ins;
