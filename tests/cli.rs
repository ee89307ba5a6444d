//! The real `stowage` binary: `stowage local` prints its socket, serves, and on
//! SIGINT/SIGTERM exits 0 and removes the socket; bad flags fail with a message;
//! `/readyz` follows the Kubernetes API server; a stop is not held by loops that wait
//! for a silent API server; text logs carry no colour codes
//! unless stderr is a terminal; `stowage nfs-server` logs connections only at debug;
//! `stowage bench` runs end to end.

use std::io::{BufRead, BufReader, Read as _, Write as _};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use stowage_api::proto::csi::{self as proto, identity_client::IdentityClient};
use stowage_loops::csi_client::channel;

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

#[path = "common/http.rs"]
mod http;
use http::http_get;

#[tokio::test]
async fn http_serves_healthz_and_csi_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("csi.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_stowage"))
        .args([
            "local",
            "--endpoint",
            &format!("unix://{}", socket.display()),
        ])
        .args(["--data-dir", dir.path().join("data").to_str().unwrap()])
        .args(["--http-addr", "127.0.0.1:0", "--shutdown-grace", "1s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let _banner = lines.next().unwrap().unwrap();
    let metrics_line = lines.next().unwrap().unwrap();
    let addr = metrics_line
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("no metrics address in {metrics_line:?}"))
        .to_owned();

    let (status, body) = http_get(&addr, "/healthz");
    assert!(status.contains("200"), "{status}");
    assert_eq!(body, "ok\n");

    let mut identity = IdentityClient::new(channel::connect(&socket).await.unwrap());
    identity.probe(proto::ProbeRequest {}).await.unwrap();
    drop(identity);
    let (status, body) = http_get(&addr, "/metrics");
    assert!(status.contains("200"), "{status}");
    assert!(
        // Two: /healthz asked the CSI server (liveness), then the client above.
        body.contains(r#"csi_sidecar_operations_seconds_count{driver_name="stowage.csi.dev",method_name="/csi.v1.Identity/Probe",grpc_status_code="OK"} 2"#),
        "{body}"
    );
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    assert!(child.wait().unwrap().success());
}

#[allow(dead_code)]
#[path = "common/fake_kube.rs"]
mod fake_kube;

/// Polls `/readyz` until its status line contains `want`, for at most 30 s; the
/// last (status, body) either way.
fn wait_readyz(addr: &str, want: &str) -> (String, String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = http_get(addr, "/readyz");
        if status.contains(want) || Instant::now() > deadline {
            return (status, body);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The controller's readiness is the API server's: `/readyz` is 200 while it answers and
/// 503 (saying why) once it is gone, while `/healthz` (liveness) stays 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_kubernetes_api_server() {
    let fake = fake_kube::FakeKube::start().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    fake.write_kubeconfig(&kubeconfig);
    let socket = dir.path().join("csi.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_stowage"))
        .args([
            "local",
            "--endpoint",
            &format!("unix://{}", socket.display()),
        ])
        .args(["--data-dir", dir.path().join("data").to_str().unwrap()])
        .args(["--kubeconfig", kubeconfig.to_str().unwrap()])
        .args(["--http-addr", "127.0.0.1:0", "--shutdown-grace", "1s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let _banner = lines.next().unwrap().unwrap();
    let metrics_line = lines.next().unwrap().unwrap();
    let addr = metrics_line
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("no metrics address in {metrics_line:?}"))
        .to_owned();

    // The loops are up once their informers list claims: the check is in place.
    let deadline = Instant::now() + Duration::from_secs(30);
    while fake.calls_of("list", "persistentvolumeclaims") == 0 {
        assert!(Instant::now() < deadline, "the loops never listed claims");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let probe = addr.clone();
    let (status, body) = tokio::task::spawn_blocking(move || wait_readyz(&probe, "200"))
        .await
        .unwrap();
    assert!(status.contains("200"), "{status}: {body}");

    fake.shutdown().await;
    let probe = addr.clone();
    let (status, body) = tokio::task::spawn_blocking(move || wait_readyz(&probe, "503"))
        .await
        .unwrap();
    assert!(
        status.contains("503") && body.contains("Kubernetes API server"),
        "{status}: {body}"
    );
    let (status, _) = http_get(&addr, "/healthz");
    assert!(status.contains("200"), "liveness stays green: {status}");

    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    assert!(child.wait().unwrap().success());
}

/// SIGTERM while the loops still wait for their informers' first lists (an API server
/// that takes connections and never answers) stops the process: a start that cannot
/// finish never holds a shutdown.
#[test]
fn a_stop_is_not_held_by_loops_waiting_for_a_silent_api_server() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in silent.incoming().flatten() {
            held.push(stream);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    fake_kube::write_kubeconfig(&kubeconfig, &url);
    let socket = dir.path().join("csi.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_stowage"))
        .args([
            "local",
            "--endpoint",
            &format!("unix://{}", socket.display()),
        ])
        .args(["--data-dir", dir.path().join("data").to_str().unwrap()])
        .args(["--kubeconfig", kubeconfig.to_str().unwrap()])
        .args(["--shutdown-grace", "1s"])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.path().join("stderr")).unwrap())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut banner = String::new();
    stdout.read_line(&mut banner).unwrap();
    // Keep reading: the rest of the banner must not meet a closed pipe.
    std::thread::spawn(move || for _ in stdout.lines() {});
    assert!(socket.exists(), "serving: {banner}");
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("still running 20 s after SIGTERM: the loops' start held the shutdown");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = std::fs::read_to_string(dir.path().join("stderr")).unwrap_or_default();
    assert!(status.success(), "{status}: {log}");
    assert!(!socket.exists(), "socket removed");
}

/// A failing start logs an ERROR line through tracing (plus the plain message).
fn failing_controller() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_stowage"));
    command
        .args(["--log-format", "text", "controller"])
        .args(["--endpoint", "tcp://127.0.0.1:1"])
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR");
    command
}

/// `kubectl logs` shows the container's stderr as it was written: text logs must not
/// carry ANSI colour codes there; only a person at a terminal gets colours.
#[test]
fn text_logs_are_coloured_only_on_a_terminal() {
    let out = failing_controller().output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ERROR"), "{stderr}");
    assert!(
        !stderr.contains('\x1b'),
        "escape codes in piped logs: {stderr:?}"
    );

    let pty = nix::pty::openpty(None, None).unwrap();
    let mut child = failing_controller()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(pty.slave))
        .spawn()
        .unwrap();
    assert!(!child.wait().unwrap().success());
    // The child is gone and our copy of the slave was moved into it: reading drains
    // what it wrote, then fails with EIO (no writer left).
    let mut terminal = Vec::new();
    let mut master = std::fs::File::from(pty.master);
    let mut buf = [0u8; 4096];
    loop {
        match master.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => terminal.extend_from_slice(&buf[..n]),
        }
    }
    let terminal = String::from_utf8_lossy(&terminal);
    assert!(terminal.contains("ERROR"), "{terminal:?}");
    assert!(
        terminal.contains("\x1b["),
        "no colours on a terminal: {terminal:?}"
    );
}

/// One NFSv3 NULL call on `stream` (record-marked ONC RPC); true when it succeeded.
fn nfs_null_call(stream: &mut std::net::TcpStream) -> bool {
    let words: [u32; 10] = [7, 0, 2, 100_003, 3, 0, 0, 0, 0, 0];
    let mut record = (0x8000_0000u32 | 40).to_be_bytes().to_vec();
    for word in words {
        record.extend_from_slice(&word.to_be_bytes());
    }
    stream.write_all(&record).unwrap();
    let mut header = [0u8; 4];
    stream.read_exact(&mut header).unwrap();
    let mut reply = vec![0u8; (u32::from_be_bytes(header) & 0x7fff_ffff) as usize];
    stream.read_exact(&mut reply).unwrap();
    let word = |i: usize| u32::from_be_bytes(reply[i * 4..i * 4 + 4].try_into().unwrap());
    // xid, REPLY, MSG_ACCEPTED, verifier (flavor, length 0), SUCCESS
    reply.len() >= 24 && word(0) == 7 && word(1) == 1 && word(2) == 0 && word(5) == 0
}

/// Runs `stowage nfs-server` with `rust_log`, makes one NFS call and one bare TCP probe
/// (what the chart's readiness probe does), stops it, and returns its stderr.
fn nfs_server_log(rust_log: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_stowage"))
        .args(["--log-format", "text", "nfs-server"])
        .args(["--data-dir", dir.path().to_str().unwrap()])
        .args(["--bind", "127.0.0.1:0"])
        .env("RUST_LOG", rust_log)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut banner = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut banner)
        .unwrap();
    let addr = banner
        .trim()
        .rsplit(' ')
        .next()
        .unwrap_or_else(|| panic!("no address in {banner:?}"))
        .to_owned();
    // The call is relayed to nfs3_server, so it has taken its connection by the reply.
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    assert!(nfs_null_call(&mut stream), "NFS NULL failed");
    drop(stream);
    drop(std::net::TcpStream::connect(&addr).unwrap());
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(child.wait().unwrap().success(), "{stderr}");
    stderr
}

/// Each TCP probe of the in-cluster NFS server is a connection: at the chart's
/// `RUST_LOG=info` nothing is logged per connection (neither by the relay nor by
/// nfs3_server); at debug the relay says so, and naming nfs3_server shows its lines.
#[test]
fn nfs_server_logs_connections_only_at_debug() {
    let info = nfs_server_log("info");
    assert!(
        info.contains("embedded NFSv3 server listening"),
        "info lines are logged: {info}"
    );
    let per_connection: Vec<&str> = info
        .lines()
        .filter(|l| l.to_lowercase().contains("connection"))
        .collect();
    assert!(
        per_connection.is_empty(),
        "connections logged at info: {per_connection:#?}"
    );

    let debug = nfs_server_log("debug");
    assert!(
        debug.contains("NFS connection opened") && !debug.contains("Accepting connection"),
        "the relay's connection lines at debug, nfs3_server still quiet: {debug}"
    );
    let named = nfs_server_log("info,nfs3_server=info");
    assert!(
        named.contains("Accepting connection"),
        "RUST_LOG naming nfs3_server shows its lines: {named}"
    );
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

/// `stowage bench` (the benchmark, never a timed test) runs end to end: every series is
/// printed with a measured p50, then the CreateVolume/MKDIR ratio. No timing is checked.
#[test]
fn bench_prints_every_series() {
    let out = Command::new(env!("CARGO_BIN_EXE_stowage"))
        .args(["bench", "--count", "20", "--warmup", "2"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for series in [
        "NFS MKDIR (raw RPC)",
        "NFS SYMLINK (raw RPC)",
        "NFS MKDIR + SYMLINK at once (raw)",
        "backend CreateVolume (no socket)",
        "unix socket echo (no gRPC)",
        "CSI Probe (socket, no storage)",
        "CSI CreateVolume (socket)",
    ] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(series))
            .unwrap_or_else(|| panic!("no {series} line in:\n{stdout}"));
        let p50 = line[series.len()..].split_whitespace().next().unwrap();
        assert!(
            p50.ends_with('s') && p50 != "0.0ns",
            "{series}: p50 {p50:?}"
        );
    }
    let ratio = stdout
        .lines()
        .find_map(|l| l.strip_prefix("CreateVolume p50 / MKDIR p50 = "))
        .unwrap_or_else(|| panic!("no ratio in:\n{stdout}"));
    assert!(ratio.parse::<f64>().unwrap() > 0.0, "{ratio}");
}

/// Named `kubectl-stowage` (a symlink on the PATH), the binary is the kubectl plugin:
/// `kubectl stowage explain …` runs it with the words after `kubectl stowage`, and its
/// usage says so.
#[test]
fn as_kubectl_stowage_it_is_the_kubectl_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("kubectl-stowage");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_stowage"), &plugin).unwrap();
    let out = std::process::Command::new(&plugin)
        .args(["explain", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("Usage: kubectl stowage explain"), "{help}");
}
