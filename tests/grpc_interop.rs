//! Clients other than Go and Rust: gRPC C-core (Python's grpcio) sends the socket path,
//! percent-encoded, as `:authority` on a unix socket, which h2 alone refuses with
//! PROTOCOL_ERROR. The CSI socket and kubelet's registration socket must serve it: real
//! `stowage` binaries, a real grpcio client (from tests/run's venv).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use prost::Message;
use stowage_api::proto::csi as proto;
use stowage_api::proto::registration;

#[path = "common/process.rs"]
mod process;
use process::Process;

/// The venv's Python with grpcio, or None (skipped) unless the run requires it.
fn python(test: &str) -> Option<PathBuf> {
    match std::env::var_os("STOWAGE_GRPC_PYTHON") {
        Some(python) => Some(PathBuf::from(python)),
        None if std::env::var("STOWAGE_REQUIRE_GRPC_PYTHON").as_deref() == Ok("1") => {
            panic!(
                "{test}: STOWAGE_REQUIRE_GRPC_PYTHON=1 but STOWAGE_GRPC_PYTHON is unset: run tests/run"
            )
        }
        None => {
            eprintln!(
                "SKIPPED {test}: needs Python with grpcio; run via tests/run or set STOWAGE_GRPC_PYTHON"
            );
            None
        }
    }
}

/// One call through grpcio: the decoded response, or the status grpcio reported.
fn call<R: Message + Default>(
    python: &Path,
    socket: &Path,
    method: &str,
    request: &impl Message,
) -> Result<R, String> {
    let output = Command::new(python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/support/grpc_unary.py"
        ))
        .arg(socket)
        .arg(method)
        .arg(hex(&request.encode_to_vec()))
        .output()
        .unwrap();
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    let text = String::from_utf8(output.stdout).unwrap();
    let bytes: Vec<u8> = (0..text.trim().len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text.trim()[i..i + 2], 16).unwrap())
        .collect();
    Ok(R::decode(bytes.as_slice()).unwrap())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn wait_for(path: &Path, child: &mut Process) {
    for _ in 0..600 {
        if path.exists() {
            return;
        }
        if let Some(status) = child.0.try_wait().unwrap() {
            panic!("stowage exited before serving: {status}");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("{} never appeared", path.display());
}

#[test]
fn grpc_c_core_clients_are_served_on_the_csi_socket() {
    let Some(python) = python("grpc_c_core_clients_are_served_on_the_csi_socket") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("run/csi.sock");
    let mut child = Process(
        Command::new(env!("CARGO_BIN_EXE_stowage"))
            .args(["local", "--endpoint"])
            .arg(format!("unix://{}", socket.display()))
            .args(["--data-dir", dir.path().join("data").to_str().unwrap()])
            .args(["--shutdown-grace", "1s"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for(&socket, &mut child);

    let info: proto::GetPluginInfoResponse = call(
        &python,
        &socket,
        "/csi.v1.Identity/GetPluginInfo",
        &proto::GetPluginInfoRequest {},
    )
    .unwrap_or_else(|e| panic!("GetPluginInfo through grpcio: {e}"));
    assert_eq!(info.name, "stowage.csi.dev");

    // More than one request on a connection's table, and a real volume.
    let created: proto::CreateVolumeResponse = call(
        &python,
        &socket,
        "/csi.v1.Controller/CreateVolume",
        &proto::CreateVolumeRequest {
            name: "through-grpcio".into(),
            volume_capabilities: vec![proto::VolumeCapability {
                access_type: Some(proto::volume_capability::AccessType::Mount(
                    proto::volume_capability::MountVolume::default(),
                )),
                access_mode: Some(proto::volume_capability::AccessMode {
                    mode: proto::volume_capability::access_mode::Mode::SingleNodeWriter as i32,
                }),
            }],
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("CreateVolume through grpcio: {e}"));
    let volume = created.volume.expect("a volume");
    assert!(
        volume.volume_id.contains("through-grpcio"),
        "{}",
        volume.volume_id
    );

    // Errors come back as gRPC statuses, not as a reset stream.
    let refused = call::<proto::CreateVolumeResponse>(
        &python,
        &socket,
        "/csi.v1.Controller/CreateVolume",
        &proto::CreateVolumeRequest::default(),
    )
    .unwrap_err();
    assert!(refused.starts_with("INVALID_ARGUMENT"), "{refused}");
    child.stop();
}

#[test]
fn grpc_c_core_clients_are_served_on_the_registration_socket() {
    let Some(python) = python("grpc_c_core_clients_are_served_on_the_registration_socket") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let kubelet_dir = dir.path().join("kubelet");
    let mut child = Process(
        Command::new(env!("CARGO_BIN_EXE_stowage"))
            .args(["node", "--node-id", "node-a", "--kubelet-dir"])
            .arg(&kubelet_dir)
            .args(["--shutdown-grace", "1s"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let socket = kubelet_dir.join("plugins_registry/stowage.csi.dev-reg.sock");
    wait_for(&socket, &mut child);
    let info: registration::PluginInfo = call(
        &python,
        &socket,
        "/pluginregistration.Registration/GetInfo",
        &registration::InfoRequest {},
    )
    .unwrap_or_else(|e| panic!("GetInfo through grpcio: {e}"));
    assert_eq!(info.name, "stowage.csi.dev");
    assert_eq!(
        Path::new(&info.endpoint),
        kubelet_dir.join("plugins/stowage.csi.dev/csi.sock")
    );
    child.stop();
}
