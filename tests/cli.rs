//! The real `stowage` binary: `stowage local` prints its socket, serves, and on
//! SIGINT/SIGTERM exits 0 and removes the socket; bad flags fail with a message.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use stowage::csi::channel;
use stowage::csi::proto::{self, identity_client::IdentityClient};

fn local(dir: &std::path::Path) -> (std::process::Child, String) {
    let socket = dir.join("run/csi.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_stowage"))
        .args([
            "local",
            "--endpoint",
            &format!("unix://{}", socket.display()),
        ])
        .args(["--data-dir", dir.join("data").to_str().unwrap()])
        .args(["--shutdown-grace", "1s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (child, line)
}

#[tokio::test]
async fn local_serves_and_shuts_down_cleanly_on_signals() {
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        let dir = tempfile::tempdir().unwrap();
        let (mut child, banner) = local(dir.path());
        let socket = dir.path().join("run/csi.sock");
        assert!(
            banner.contains(&format!("unix://{}", socket.display())),
            "{banner}"
        );
        let mut identity = IdentityClient::new(channel::connect(&socket).await.unwrap());
        let info = identity
            .get_plugin_info(proto::GetPluginInfoRequest {})
            .await
            .unwrap();
        assert_eq!(info.into_inner().name, "stowage.csi.dev");
        drop(identity);

        kill(Pid::from_raw(child.id() as i32), signal).unwrap();
        let status = child.wait().unwrap();
        assert!(status.success(), "{signal}: {status}");
        assert!(!socket.exists(), "{signal}: socket removed");
        assert!(dir.path().join("data").is_dir(), "data dir kept");
    }
}

/// A client that never reads the server's GOAWAY (this test's runtime is blocked in
/// `wait`) must not keep the process alive past --shutdown-grace.
#[tokio::test]
async fn a_client_that_never_hangs_up_does_not_block_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, _) = local(dir.path());
    let socket = dir.path().join("run/csi.sock");
    let mut identity = IdentityClient::new(channel::connect(&socket).await.unwrap());
    identity.probe(proto::ProbeRequest {}).await.unwrap();
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(!socket.exists());
    drop(identity);
}

#[test]
fn bad_flags_fail_with_a_message() {
    let out = Command::new(env!("CARGO_BIN_EXE_stowage"))
        .args(["local", "--endpoint", "tcp://127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unix socket"), "{stderr}");

    let out = Command::new(env!("CARGO_BIN_EXE_stowage"))
        .args(["controller", "--nfs-server", "10.0.0.1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--nfs-share"));
}
