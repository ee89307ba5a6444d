//! `stowage explain` through the binary, against the fake API server and a running
//! stowage (leader election on, its `/debug/attempts` read with --controller-url): the
//! first line names the cause for a class of another provisioner, a typo'd class key,
//! a claim with a selector, a WaitForFirstConsumer claim without a pod and a stopped
//! controller; a bound claim explains as healthy; `-o json` carries the controller's
//! last attempt.

mod common;

use std::process::Command;

use common::cluster::*;
use k8s_openapi::api::storage::v1::StorageClass;
use kube::Api;
use kube::api::PostParams;
use serde_json::json;

/// `stowage explain pvc/<claim>` as a user types it; (exit success, stdout).
fn explain(cluster: &Cluster, claim: &str, controller: Option<&str>, json: bool) -> (bool, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_stowage"));
    command
        .args(["explain", &format!("pvc/{claim}")])
        .args(["-n", &cluster.namespace])
        .args(["--kubeconfig", cluster.kubeconfig.to_str().unwrap()])
        .args(["--driver-name", &cluster.driver])
        .env_remove("KUBECONFIG")
        .env_remove("STOWAGE_CONTROLLER_URL");
    if let Some(url) = controller {
        command.args(["--controller-url", url]);
    }
    if json {
        command.args(["-o", "json"]);
    }
    let out = command.output().expect("running stowage explain");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or_default()
}

async fn class(
    cluster: &Cluster,
    base: &str,
    provisioner: &str,
    mode: &str,
    parameters: serde_json::Value,
) -> String {
    let name = cluster.name(base);
    let class: StorageClass = serde_json::from_value(json!({
        "metadata": {"name": name},
        "provisioner": provisioner,
        "volumeBindingMode": mode,
        "parameters": parameters,
    }))
    .unwrap();
    Api::<StorageClass>::all(cluster.client.clone())
        .create(&PostParams::default(), &class)
        .await
        .unwrap();
    name
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_names_the_first_broken_link_in_its_first_line() {
    let cluster = Cluster::start("explain").await;
    if cluster
        .fake_or_skip("explain", "runs against the fake API server")
        .is_none()
    {
        return;
    }
    let mut stowage = Stowage::start(
        &cluster,
        "stowage",
        &[
            "--leader-election",
            "--leader-election-namespace",
            &cluster.namespace,
        ],
    )
    .await;
    let url = format!("http://{}", stowage.http);
    let url = Some(url.as_str());

    let good = cluster.create_class("good", "Delete", &[], false).await;
    cluster.create_claim(&simple_claim("healthy", &good)).await;
    cluster.wait_bound("healthy").await;
    let (ok, out) = explain(&cluster, "healthy", url, false);
    assert!(ok, "{out}");
    assert!(
        first_line(&out).ends_with("nothing wrong: every link holds"),
        "{out}"
    );

    let theirs = class(
        &cluster,
        "theirs",
        "ebs.csi.aws.com",
        "Immediate",
        json!({}),
    )
    .await;
    cluster
        .create_claim(&simple_claim("other-driver", &theirs))
        .await;
    let (_, out) = explain(&cluster, "other-driver", url, false);
    assert!(
        first_line(&out).contains(&format!(
            "StorageClass `{theirs}` names provisioner `ebs.csi.aws.com`, not `{}`",
            cluster.driver
        )),
        "{out}"
    );

    let typo = cluster
        .create_class("typo", "Delete", &[("subDirr", "x")], false)
        .await;
    cluster.create_claim(&simple_claim("typo", &typo)).await;
    let (_, out) = explain(&cluster, "typo", url, false);
    assert!(
        first_line(&out).contains("unknown parameter `subDirr` (did you mean `subDir`?)"),
        "{out}"
    );
    // The controller failed on it too: its last attempt is in the answer.
    let controller_says = || explain(&cluster, "typo", url, true).1;
    let text = wait_for("the controller's failed attempt at claim typo", || async {
        let text = controller_says();
        if text.contains("\"link\": \"last attempt\"") && text.contains("INVALID_ARGUMENT") {
            Ok(text)
        } else {
            Err(text)
        }
    })
    .await;
    let answer: serde_json::Value = serde_json::from_str(&text).unwrap();
    let last = answer["chain"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["link"] == "last attempt")
        .unwrap();
    assert_eq!(last["state"], "broken", "{answer}");
    assert!(
        last["value"].as_str().unwrap().contains("subDirr"),
        "{answer}"
    );

    let mut selected = simple_claim("selector", &good);
    selected.spec.as_mut().unwrap().selector = Some(Default::default());
    cluster.create_claim(&selected).await;
    let (_, out) = explain(&cluster, "selector", url, false);
    assert!(
        first_line(&out).contains("claim has a selector: dynamic provisioning ignores such claims"),
        "{out}"
    );

    let late = class(
        &cluster,
        "late",
        &cluster.driver,
        "WaitForFirstConsumer",
        json!({}),
    )
    .await;
    cluster.create_claim(&simple_claim("no-pod", &late)).await;
    let (_, out) = explain(&cluster, "no-pod", url, false);
    assert!(
        first_line(&out).contains("WaitForFirstConsumer: no pod uses this claim yet"),
        "{out}"
    );

    // The controller stops (handing the Lease back): a new claim has no one to make it.
    assert!(stowage.terminate().await.success(), "{}", stowage.log());
    cluster.create_claim(&simple_claim("orphaned", &good)).await;
    let (_, out) = explain(&cluster, "orphaned", None, false);
    assert!(
        first_line(&out).contains(&format!(
            "no stowage controller holds the leader Lease `{}/{}`",
            cluster.namespace,
            cluster.lease_name()
        )),
        "{out}"
    );

    let (ok, out) = explain(&cluster, "never-made", None, false);
    assert!(ok, "{out}");
    assert!(
        first_line(&out).ends_with(&format!(
            "claim {}/never-made does not exist",
            cluster.namespace
        )),
        "{out}"
    );
}
