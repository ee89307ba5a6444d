//! `stowage node` registers itself with kubelet: this test plays kubelet's plugin
//! watcher on the registration socket (GetInfo, then the CSI socket it names, then
//! NotifyRegistrationStatus) against the real binary, and checks that kubelet's verdict
//! and the socket's presence drive `/healthz` and the state metric, that shutdown
//! removes both sockets, and that `--kubelet-registration=false` serves none; and that
//! the NFS-only name (`--nfs-driver-name`) registers on a socket of its own whose
//! NodeGetInfo reports no volume limit.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use stowage_api::proto::csi::{
    self as proto, identity_client::IdentityClient, node_client::NodeClient,
};
use stowage_api::proto::registration::{
    InfoRequest, RegistrationStatus, registration_client::RegistrationClient,
};
use stowage_loops::csi_client::channel;

#[path = "common/process.rs"]
mod process;
use process::Process;

const DRIVER: &str = "registration.stowage.test";
const NFS_DRIVER: &str = "nfs.registration.stowage.test";

/// `stowage node` on a kubelet directory of its own; returns the process and the
/// address of its `/healthz` and `/metrics`, read from its "serving" log line.
fn node(kubelet_dir: &Path, extra: &[&str]) -> (Process, String) {
    let mut child = Process(
        Command::new(env!("CARGO_BIN_EXE_stowage"))
            .args(["--log-format", "json", "node", "--node-id", "node-a"])
            .args(["--driver-name", DRIVER])
            .args(
                (!extra.contains(&"--nfs-driver-name"))
                    .then_some(["--nfs-driver-name", NFS_DRIVER])
                    .into_iter()
                    .flatten(),
            )
            .args(["--kubelet-dir", kubelet_dir.to_str().unwrap()])
            .args(["--http-addr", "127.0.0.1:0", "--shutdown-grace", "1s"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stderr = BufReader::new(child.0.stderr.take().unwrap());
    let mut lines = stderr.lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("stowage node exited before serving")
            .unwrap();
        let log: serde_json::Value = serde_json::from_str(&line).unwrap();
        if log["fields"]["message"] == "node plugin serving" {
            break log["fields"]["http_addr"].as_str().unwrap().to_owned();
        }
    };
    // Keep draining the logs so the process never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (child, addr)
}

#[path = "common/http.rs"]
mod http;
use http::http_get;

/// The state the metric says is current for `driver`.
fn registration_state(addr: &str, driver: &str) -> String {
    let (_, body) = http_get(addr, "/metrics");
    let prefix = format!("stowage_kubelet_registration_state{{driver=\"{driver}\",state=\"");
    let current: Vec<&str> = body
        .lines()
        .filter(|l| l.starts_with(&prefix) && l.ends_with(" 1"))
        .collect();
    assert_eq!(current.len(), 1, "one current state for {driver}: {body}");
    current[0][prefix.len()..]
        .split('"')
        .next()
        .expect("state label")
        .to_owned()
}

fn registration_socket(kubelet_dir: &Path) -> PathBuf {
    kubelet_dir.join(format!("plugins_registry/{DRIVER}-reg.sock"))
}

fn nfs_registration_socket(kubelet_dir: &Path) -> PathBuf {
    kubelet_dir.join(format!("plugins_registry/{NFS_DRIVER}-reg.sock"))
}

#[tokio::test]
async fn kubelet_registers_the_plugin_and_its_verdict_drives_healthz() {
    let dir = tempfile::tempdir().unwrap();
    let kubelet_dir = dir.path().join("kubelet");
    let (child, addr) = node(&kubelet_dir, &[]);
    let reg_socket = registration_socket(&kubelet_dir);
    let csi_socket = kubelet_dir.join(format!("plugins/{DRIVER}/csi.sock"));

    // kubelet's plugin watcher: GetInfo on the socket it found.
    let mut registration = RegistrationClient::new(channel::connect(&reg_socket).await.unwrap());
    let info = registration
        .get_info(InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.r#type, "CSIPlugin");
    assert_eq!(info.name, DRIVER);
    assert_eq!(Path::new(&info.endpoint), csi_socket);
    assert_eq!(info.supported_versions, ["1.0.0"]);
    // Its CSI handler then dials the endpoint it was told and asks who is there.
    let endpoint = channel::connect(Path::new(&info.endpoint)).await.unwrap();
    let plugin = IdentityClient::new(endpoint.clone())
        .get_plugin_info(proto::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(plugin.name, DRIVER);
    let node_info = NodeClient::new(endpoint)
        .node_get_info(proto::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(node_info.node_id, "node-a");

    // No verdict yet: alive, waiting.
    assert!(http_get(&addr, "/healthz").0.contains("200"));
    assert_eq!(registration_state(&addr, DRIVER), "waiting");

    // Refused: /healthz fails with kubelet's reason, so the container restarts.
    registration
        .notify_registration_status(RegistrationStatus {
            plugin_registered: false,
            error: "plugin validation failed: incompatible versions".into(),
        })
        .await
        .unwrap();
    let (status, body) = http_get(&addr, "/healthz");
    assert!(status.contains("500"), "{status}");
    assert!(body.contains("incompatible versions"), "{body}");
    assert_eq!(registration_state(&addr, DRIVER), "failed");

    // Registered: alive again.
    registration
        .notify_registration_status(RegistrationStatus {
            plugin_registered: true,
            error: String::new(),
        })
        .await
        .unwrap();
    assert!(http_get(&addr, "/healthz").0.contains("200"));
    assert_eq!(registration_state(&addr, DRIVER), "registered");

    // The socket deleted under the plugin (kubelet's directory wiped): kubelet can no
    // longer find it, so /healthz fails and says why.
    std::fs::remove_file(&reg_socket).unwrap();
    let (status, body) = http_get(&addr, "/healthz");
    assert!(status.contains("500"), "{status}");
    assert!(body.contains("is gone"), "{body}");
    drop(registration);

    child.stop();
    assert!(!csi_socket.exists(), "CSI socket removed on shutdown");
}

#[tokio::test]
async fn shutdown_removes_the_registration_socket() {
    let dir = tempfile::tempdir().unwrap();
    let kubelet_dir = dir.path().join("kubelet");
    let (child, _) = node(&kubelet_dir, &[]);
    let reg_socket = registration_socket(&kubelet_dir);
    assert!(reg_socket.exists(), "registration socket served");
    child.stop();
    assert!(
        !reg_socket.exists(),
        "registration socket removed on shutdown"
    );
    assert!(
        kubelet_dir.join("plugins_registry").is_dir(),
        "kubelet's directory kept"
    );
}

#[tokio::test]
async fn no_registration_socket_when_the_registrar_registers() {
    let dir = tempfile::tempdir().unwrap();
    let kubelet_dir = dir.path().join("kubelet");
    let (child, addr) = node(&kubelet_dir, &["--kubelet-registration=false"]);
    assert!(
        kubelet_dir
            .join(format!("plugins/{DRIVER}/csi.sock"))
            .exists()
    );
    assert!(!registration_socket(&kubelet_dir).exists());
    assert!(!nfs_registration_socket(&kubelet_dir).exists());
    assert!(http_get(&addr, "/healthz").0.contains("200"));
    let (_, metrics) = http_get(&addr, "/metrics");
    assert!(
        !metrics.contains("stowage_kubelet_registration_state"),
        "{metrics}"
    );
    child.stop();
}

#[tokio::test]
async fn the_nfs_name_registers_on_its_own_socket_without_a_volume_limit() {
    let dir = tempfile::tempdir().unwrap();
    let kubelet_dir = dir.path().join("kubelet");
    let (child, addr) = node(&kubelet_dir, &[]);
    let nfs_socket = kubelet_dir.join(format!("plugins/{NFS_DRIVER}/csi.sock"));

    let mut registration = RegistrationClient::new(
        channel::connect(&nfs_registration_socket(&kubelet_dir))
            .await
            .unwrap(),
    );
    let info = registration
        .get_info(InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, NFS_DRIVER);
    assert_eq!(Path::new(&info.endpoint), nfs_socket, "a socket of its own");
    let endpoint = channel::connect(&nfs_socket).await.unwrap();
    let plugin = IdentityClient::new(endpoint.clone())
        .get_plugin_info(proto::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(plugin.name, NFS_DRIVER);
    let node_info = NodeClient::new(endpoint.clone())
        .node_get_info(proto::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(node_info.node_id, "node-a");
    assert_eq!(node_info.max_volumes_per_node, 0, "no attach limit for NFS");

    // Each name's verdict is its own.
    registration
        .notify_registration_status(RegistrationStatus {
            plugin_registered: true,
            error: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(registration_state(&addr, NFS_DRIVER), "registered");
    assert_eq!(registration_state(&addr, DRIVER), "waiting");
    registration
        .notify_registration_status(RegistrationStatus {
            plugin_registered: false,
            error: "driver name already registered".into(),
        })
        .await
        .unwrap();
    let (status, body) = http_get(&addr, "/healthz");
    assert!(status.contains("500"), "{status}");
    assert!(
        body.contains(NFS_DRIVER),
        "the refused name is named: {body}"
    );
    drop(registration);

    child.stop();
    assert!(
        !nfs_socket.exists(),
        "the NFS name's CSI socket removed on shutdown"
    );
    assert!(!nfs_registration_socket(&kubelet_dir).exists());
}

#[tokio::test]
async fn an_empty_nfs_driver_name_serves_one_name() {
    let dir = tempfile::tempdir().unwrap();
    let kubelet_dir = dir.path().join("kubelet");
    let (child, addr) = node(&kubelet_dir, &["--nfs-driver-name", ""]);
    assert!(registration_socket(&kubelet_dir).exists());
    assert!(!nfs_registration_socket(&kubelet_dir).exists());
    assert!(!kubelet_dir.join(format!("plugins/{NFS_DRIVER}")).exists());
    assert_eq!(registration_state(&addr, DRIVER), "waiting");
    child.stop();
}
