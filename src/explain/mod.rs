//! `stowage explain pvc/NAME` (also `kubectl stowage explain …`): reads the cluster with
//! the user's kubeconfig — read-only: get and list — and the controller's
//! `/debug/attempts` through the API server's pod proxy (or `--controller-url`), then
//! prints the chain and the first broken link with its fix ([`diagnose`]).

pub mod diagnose;

use std::collections::BTreeMap;

use anyhow::Context as _;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Event, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::{CSINode, StorageClass, VolumeAttachment};
use kube::Api;
use kube::api::ListParams;
use stowage_api::keys::DriverNames;
use stowage_loops::activity::Report as Attempts;
use stowage_loops::rules;

use crate::config::{ExplainArgs, Output};
use diagnose::{Explanation, Facts, Leader, Target};

/// Run `explain`: print the answer; the exit status is 0 either way (the answer is
/// the output), unless the cluster could not be read.
pub async fn run(args: ExplainArgs) -> anyhow::Result<()> {
    let config = stowage_loops::kube_client::config(args.kubeconfig.as_deref()).await?;
    let namespace = args
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let target = Target::parse(&args.object, &namespace).map_err(anyhow::Error::msg)?;
    let client = kube::Client::try_from(config).context("building the Kubernetes client")?;
    let facts = gather(&client, &args, target).await?;
    let explanation = diagnose::diagnose(&facts);
    print(&explanation, args.output)
}

fn print(explanation: &Explanation, output: Output) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(explanation)?),
        Output::Text => print!("{}", diagnose::render(explanation)),
    }
    Ok(())
}

/// `None` for a 404, the object otherwise.
async fn get_opt<K>(api: &Api<K>, name: &str) -> anyhow::Result<Option<K>>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    K::DynamicType: Default,
{
    api.get_opt(name)
        .await
        .with_context(|| format!("reading {} {name}", K::kind(&Default::default())))
}

/// Read what the diagnosis needs.
async fn gather(
    client: &kube::Client,
    args: &ExplainArgs,
    target: Target,
) -> anyhow::Result<Facts> {
    let drivers = DriverNames::new(args.driver_name.clone(), &args.nfs_driver_name);
    let mut facts = Facts {
        driver: drivers.clone(),
        target: target.clone(),
        claim: None,
        class: None,
        pods: vec![],
        volume: None,
        attachments: vec![],
        csinodes: BTreeMap::new(),
        leader: Leader::Unknown(String::new()),
        attempts: Err(String::new()),
        warnings: vec![],
    };
    let mut keys: Vec<String> = vec![];
    let mut pv_name: Option<String> = None;
    match &target {
        Target::Claim { namespace, name } => {
            let claims = Api::<PersistentVolumeClaim>::namespaced(client.clone(), namespace);
            facts.claim = get_opt(&claims, name).await?;
            keys.push(format!("{namespace}/{name}"));
            if let Some(pvc) = &facts.claim {
                if let Some(class) = rules::claim_class(pvc) {
                    facts.class = get_opt(&Api::<StorageClass>::all(client.clone()), class).await?;
                }
                facts.pods = pods_using(client, namespace, name).await?;
                pv_name = pvc
                    .spec
                    .as_ref()
                    .and_then(|s| s.volume_name.clone())
                    .filter(|v| !v.is_empty());
                facts.warnings = warnings(client, Some(namespace), name).await;
            }
        }
        Target::Volume { name } => {
            pv_name = Some(name.clone());
            keys.push(name.clone());
            facts.warnings = warnings(client, None, name).await;
        }
        Target::Attachment { name } => {
            keys.push(name.clone());
            if let Some(va) = get_opt(&Api::<VolumeAttachment>::all(client.clone()), name).await? {
                pv_name = va.spec.source.persistent_volume_name.clone();
                facts.attachments.push(va);
            }
        }
    }
    if let Some(pv_name) = &pv_name {
        facts.volume = get_opt(&Api::<PersistentVolume>::all(client.clone()), pv_name).await?;
        if !matches!(target, Target::Attachment { .. }) {
            facts.attachments = Api::<VolumeAttachment>::all(client.clone())
                .list(&ListParams::default())
                .await
                .context("listing VolumeAttachments")?
                .items
                .into_iter()
                .filter(|va| va.spec.source.persistent_volume_name.as_deref() == Some(pv_name))
                .collect();
        }
        keys.push(pv_name.clone());
    }
    // The nodes that matter: the claim's selected node, its pods' nodes, attachments'.
    let mut nodes: Vec<String> = facts
        .pods
        .iter()
        .filter_map(|p| p.spec.as_ref()?.node_name.clone())
        .chain(facts.attachments.iter().map(|va| va.spec.node_name.clone()))
        .chain(facts.claim.iter().filter_map(|c| {
            c.metadata
                .annotations
                .as_ref()?
                .get(rules::ANN_SELECTED_NODE)
                .cloned()
        }))
        .filter(|n| !n.is_empty())
        .collect();
    nodes.sort();
    nodes.dedup();
    let csinodes = Api::<CSINode>::all(client.clone());
    let driver = facts.node_driver().to_owned();
    for node in nodes {
        let has = get_opt(&csinodes, &node)
            .await?
            .map(|csinode| csinode.spec.drivers.iter().any(|d| d.name == driver));
        facts.csinodes.insert(node, has);
    }
    let (leader, pod) = leader(client, &drivers.main).await;
    facts.leader = leader;
    facts.attempts = attempts(client, args, pod, &keys).await;
    Ok(facts)
}

/// The pods of `namespace` that mount claim `name`.
async fn pods_using(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> anyhow::Result<Vec<Pod>> {
    Ok(Api::<Pod>::namespaced(client.clone(), namespace)
        .list(&ListParams::default())
        .await
        .context("listing pods")?
        .items
        .into_iter()
        .filter(|pod| {
            pod.spec.as_ref().is_some_and(|spec| {
                spec.volumes.iter().flatten().any(|v| {
                    v.persistent_volume_claim
                        .as_ref()
                        .is_some_and(|c| c.claim_name == name)
                })
            })
        })
        .collect())
}

/// The object's Warning events (core/v1, as `kubectl describe` shows them), oldest
/// first; none when they cannot be read.
async fn warnings(client: &kube::Client, namespace: Option<&str>, name: &str) -> Vec<String> {
    let api: Api<Event> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let selector = format!("involvedObject.name={name},type=Warning");
    let Ok(list) = api.list(&ListParams::default().fields(&selector)).await else {
        return vec![];
    };
    let mut events = list.items;
    events.sort_by_key(|e| e.last_timestamp.clone().map(|t| t.0));
    events
        .into_iter()
        .map(|e| {
            format!(
                "{}: {}",
                e.reason.unwrap_or_default(),
                e.message.unwrap_or_default().trim()
            )
        })
        .collect()
}

/// Who leads: the Lease named after the driver (`stowage-csi-dev`), in whatever
/// namespace the controller runs; and the pod that holds it (namespace, pod name).
async fn leader(client: &kube::Client, driver: &str) -> (Leader, Option<(String, String)>) {
    let name = driver.replace(['.', '/'], "-");
    let leases = match Api::<Lease>::all(client.clone())
        .list(&ListParams::default().fields(&format!("metadata.name={name}")))
        .await
    {
        Ok(list) => list.items,
        Err(e) => return (Leader::Unknown(format!("cannot list Leases: {e}")), None),
    };
    let Some(lease) = leases.into_iter().next() else {
        return (Leader::Missing { name }, None);
    };
    let namespace = lease.metadata.namespace.clone().unwrap_or_default();
    let spec = lease.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
    let since = spec.renew_time.as_ref().map(|t| {
        (k8s_openapi::jiff::Timestamp::now() - t.0)
            .total(k8s_openapi::jiff::Unit::Second)
            .map(|s| s as i64)
            .unwrap_or(0)
    });
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(15));
    match (holder, since) {
        (Some(holder), Some(since)) if since <= duration => {
            // The holder names its pod (POD_NAME), and in a pod owns the Lease.
            let pod = lease
                .metadata
                .owner_references
                .iter()
                .flatten()
                .find(|o| o.kind == "Pod")
                .map(|o| o.name.clone())
                .unwrap_or_else(|| holder.clone());
            (
                Leader::Held {
                    namespace: namespace.clone(),
                    holder,
                },
                Some((namespace, pod)),
            )
        }
        (holder, since) => (
            Leader::Lapsed {
                namespace,
                name,
                holder,
                seconds_since_renewal: since,
            },
            None,
        ),
    }
}

/// The controller's `/debug/attempts` for `keys`: from `--controller-url`, else through
/// the API server's proxy to the leading pod's `http` port.
async fn attempts(
    client: &kube::Client,
    args: &ExplainArgs,
    pod: Option<(String, String)>,
    keys: &[String],
) -> Result<Attempts, String> {
    let body = match (&args.controller_url, pod) {
        (Some(url), _) => direct(url).await?,
        (None, Some((namespace, pod))) => {
            let pod_spec = Api::<Pod>::namespaced(client.clone(), &namespace)
                .get(&pod)
                .await
                .map_err(|e| format!("reading the leader's pod {namespace}/{pod}: {e}"))?;
            let port = pod_spec
                .spec
                .iter()
                .flat_map(|s| &s.containers)
                .flat_map(|c| c.ports.iter().flatten())
                .find(|p| p.name.as_deref() == Some("http"))
                .map(|p| p.container_port)
                .ok_or_else(|| {
                    format!("pod {namespace}/{pod} has no port named http (--http-addr)")
                })?;
            let path =
                format!("/api/v1/namespaces/{namespace}/pods/{pod}:{port}/proxy/debug/attempts");
            let request = http::Request::get(path)
                .body(Vec::new())
                .map_err(|e| e.to_string())?;
            tokio::time::timeout(CONTROLLER_TIMEOUT, client.request_text(request))
                .await
                .map_err(|_| format!("the controller did not answer through the API server within {CONTROLLER_TIMEOUT:?} (give --controller-url)"))?
                .map_err(|e| format!("asking the controller through the API server: {e} (or give --controller-url)"))?
        }
        (None, None) => return Err("no controller leads".to_owned()),
    };
    let mut report: Attempts =
        serde_json::from_str(&body).map_err(|e| format!("the controller's answer: {e}"))?;
    report.failures.retain(|f| keys.contains(&f.object));
    report.in_flight.retain(|w| keys.contains(&w.object));
    Ok(report)
}

/// How long explain waits for the controller's answer.
const CONTROLLER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// GET `<url>/debug/attempts` over plain HTTP.
async fn direct(url: &str) -> Result<String, String> {
    use http_body_util::BodyExt as _;
    let uri: http::Uri = format!("{}/debug/attempts", url.trim_end_matches('/'))
        .parse()
        .map_err(|e| format!("--controller-url {url}: {e}"))?;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let response = tokio::time::timeout(CONTROLLER_TIMEOUT, client.get(uri))
        .await
        .map_err(|_| format!("{url} did not answer within {CONTROLLER_TIMEOUT:?}"))?
        .map_err(|e| format!("{url}: {e}"))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("{url}: {e}"))?
        .to_bytes();
    if !status.is_success() {
        return Err(format!("{url}/debug/attempts answered {status}"));
    }
    String::from_utf8(body.to_vec()).map_err(|e| e.to_string())
}
