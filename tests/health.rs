//! Health that covers what can break, through the binary: `stowage local` with the
//! loops (fake API server) on a real NFS export (nfs-ganesha). When the NFS server
//! hangs (SIGSTOP: it takes connections and answers nothing), `/readyz` turns 503 and
//! names the backend, `stowage_backend_up` turns 0, and a provisioning worker held by
//! the hung server past --stuck-after turns `/healthz` 500 naming the loop and the
//! claim; when the server answers again both turn back, and the claim is provisioned.
//! `/readyz` says whether this replica leads either way.

mod common;

use common::Ganesha;
use common::cluster::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_nfs_server_fails_readiness_and_a_stuck_worker_fails_liveness_until_it_answers() {
    let Some(ganesha) = Ganesha::from_env("health") else {
        return;
    };
    let cluster = Cluster::start("health").await;
    if cluster
        .fake_or_skip("health", "runs against the fake API server")
        .is_none()
    {
        return;
    }
    let stowage = Stowage::start(
        &cluster,
        "stowage",
        &[
            "--nfs-server",
            &ganesha.server,
            "--nfs-share",
            &ganesha.share,
            "--nfs-timeout",
            "4s",
            "--backend-check-interval",
            "200ms",
            "--stuck-after",
            "1s",
        ],
    )
    .await;
    let stowage = &stowage;
    let ready = wait_for("/readyz 200 with the backend up, leading", || async move {
        let body = stowage.http_get("/readyz").await?;
        if body.contains("backend nfs: up") && body.contains("loops: leading") {
            Ok(body)
        } else {
            Err(body)
        }
    })
    .await;
    assert!(ready.starts_with("ok\n"), "{ready}");
    let up = |value: f64| async move {
        let text = stowage.metrics().await;
        match metric(&text, "stowage_backend_up", &[("backend", "nfs")]) {
            Some(v) if v == value => Ok(()),
            other => Err(format!("stowage_backend_up {other:?}")),
        }
    };
    wait_for("stowage_backend_up 1", || up(1.0)).await;
    assert_eq!(stowage.http_get("/healthz").await.as_deref(), Ok("ok\n"));

    ganesha.pause(true);
    let class = cluster.create_class("nfs", "Delete", &[], false).await;
    cluster.create_claim(&simple_claim("held", &class)).await;
    let not_ready = wait_for("/readyz 503 naming the backend", || async move {
        match stowage.http_get("/readyz").await {
            Ok(body) => Err(format!("still ready: {body}")),
            Err(text) if text.contains("backend nfs is down") => Ok(text),
            Err(text) => Err(text),
        }
    })
    .await;
    assert!(not_ready.contains("HTTP/1.1 503"), "{not_ready}");
    assert!(not_ready.contains("loops: leading"), "{not_ready}");
    wait_for("stowage_backend_up 0", || up(0.0)).await;
    let stuck = wait_for("/healthz 500 naming the stuck worker", || async move {
        match stowage.http_get("/healthz").await {
            Ok(body) => Err(format!("still healthy: {body}")),
            Err(text) => Ok(text),
        }
    })
    .await;
    assert!(stuck.contains("HTTP/1.1 500"), "{stuck}");
    assert!(
        stuck.contains(&format!(
            "the provisioner loop has been on {}/held",
            cluster.namespace
        )),
        "{stuck}"
    );

    ganesha.pause(false);
    cluster.wait_bound("held").await;
    wait_for("/healthz and /readyz 200 again", || async move {
        let health = stowage.http_get("/healthz").await?;
        let ready = stowage.http_get("/readyz").await?;
        if ready.contains("backend nfs: up") {
            Ok((health, ready))
        } else {
            Err(ready)
        }
    })
    .await;
    wait_for("stowage_backend_up 1 again", || up(1.0)).await;
}
