//! A server killed mid-test: calls fail within their timeout instead of hanging or
//! spinning (nfs3_client retries a 0-byte read forever), and the next call after the
//! server is back succeeds on a fresh connection. Its own test binary, because it
//! kills and restarts the shared nfs-ganesha.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use stowage::run::{Plan, start};
use stowage_api::proto::csi::controller_client::ControllerClient;
use stowage_driver::backend::nfs::{NfsBackend, NfsConfig};
use stowage_driver::backend::{Backend, Backends};
use stowage_driver::node::SystemMounter;
use stowage_loops::csi_client::channel;
use stowage_nfs::client::ClientConfig;
use tonic::Code;

/// CPU seconds this process has used (utime + stime from /proc/self/stat).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_comm.split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

#[tokio::test]
async fn killed_server_fails_fast_without_spinning_and_recovers() {
    let Some(ganesha) = Ganesha::from_env("killed_server_fails_fast_without_spinning_and_recovers")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let timeout = Duration::from_secs(2);
    let backend = NfsBackend::new(NfsConfig {
        default_export: None,
        client: ClientConfig {
            call_timeout: timeout,
            connect_timeout: timeout,
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
        node: None,
        nfs_node: None,
        mounter: Arc::new(SystemMounter::default()),
        http_addr: None,
        shutdown_grace: Duration::from_secs(5),
        backend_check_interval: stowage::run::DEFAULT_BACKEND_CHECK_INTERVAL,
    })
    .await
    .unwrap();
    let mut c = ControllerClient::new(channel::connect(&running.socket).await.unwrap());
    let base = [
        ("server", ganesha.server.as_str()),
        ("share", ganesha.share.as_str()),
    ];

    // Open pooled connections, then kill the server under them.
    let first = create(&mut c, "pvc-before-kill", &base).await;
    Ganesha::run(&ganesha.stop);

    let cpu_before = cpu_seconds();
    let started = Instant::now();
    let err = c
        .create_volume(create_request("pvc-during-outage", GIB, &base))
        .await
        .unwrap_err();
    let waited = started.elapsed();
    let cpu_used = cpu_seconds() - cpu_before;
    assert!(
        matches!(err.code(), Code::Unavailable | Code::DeadlineExceeded),
        "a dead server is UNAVAILABLE or DEADLINE_EXCEEDED: {err:?}"
    );
    assert!(
        waited < timeout * 3,
        "the call returned within its timeouts ({waited:?})"
    );
    assert!(
        cpu_used < 0.5,
        "no busy loop while the server is gone: {cpu_used:.2}s CPU in {waited:?}"
    );

    Ganesha::run(&ganesha.start);
    let after = create(&mut c, "pvc-after-restart", &base).await;
    assert!(ganesha.share_dir.join("pvc-after-restart").is_dir());
    delete(&mut c, &after.volume_id).await;
    delete(&mut c, &first.volume_id).await;
    running.stop().await.unwrap();
}
