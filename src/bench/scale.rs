//! `stowage bench scale`: a controller started among N existing volumes. Fills the
//! cluster with N bound claim/PV pairs written directly, as stowage and
//! kube-controller-manager would have left them (and optionally PVs of another
//! driver), then starts `stowage local --kubeconfig` and reports: time to synced, RSS
//! after sync, the API writes and CSI calls it made meanwhile (0 expected), and one new
//! claim's time to PV. With `--csi-provisioner` and `--hostpathplugin` it measures
//! external-provisioner on the same populated cluster (hostpathplugin serving the
//! same driver name). Each result is appended to `--results` (JSON lines);
//! `--svg` draws RSS against volumes for every driver found there.
//!
//! Filling writes claims Bound before kube-controller-manager could have seen their
//! PVs: stop it while filling (`--fill-only`), or it may mark claims Lost.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::{
    CSIPersistentVolumeSource, PersistentVolume, PersistentVolumeClaim, PersistentVolumeSpec,
};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt as _};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::provision::{
    CLASS, Controller, External, claim_spec, ensure_class_and_namespace, external_binaries,
    memory_of,
};
use crate::config::ScaleArgs;
use stowage_api::keys::DEFAULT_DRIVER_NAME;
use stowage_loops::rules;

/// Label of everything the bench fills (`pair` or `other`) and of its probe claims.
const LABEL: &str = "stowage.dev/bench-scale";
const OTHER_DRIVER: &str = "other.csi.example.com";
/// Requests in flight while filling.
const FILL_CONCURRENCY: usize = 64;

/// One measured start among the filled volumes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measured {
    pub driver: String,
    /// Bound claim/PV pairs of the measured driver present.
    pub volumes: usize,
    /// PVs of another driver present.
    pub other_volumes: usize,
    /// Start to informers synced (stowage: loops running), seconds.
    pub synced_s: Option<f64>,
    /// A new claim (created once synced; at start for external-provisioner) to its PV.
    pub first_pv_s: f64,
    /// Start to the new claim's PV.
    pub start_to_first_pv_s: f64,
    pub rss_mb: f64,
    pub peak_rss_mb: f64,
    /// API writes between start and the new claim (stowage's own count).
    pub writes: Option<u64>,
    /// CSI calls other than identity/capability probes, same span.
    pub csi_calls: Option<u64>,
}

pub async fn run(args: ScaleArgs) -> anyhow::Result<()> {
    let config = stowage_loops::kube_client::config(Some(&args.kubeconfig)).await?;
    let client = stowage_loops::kube_client::client(config, 0.0, 1, Default::default())?;
    if args.clean {
        return clean(&client, &args.namespace).await;
    }
    ensure_class_and_namespace(&client, &args.namespace).await?;
    fill(&client, &args).await?;
    if args.fill_only {
        return draw(&args);
    }
    let other = count(&client, "other").await?;
    measure_stowage(&client, &args, other).await?;
    if let Some((provisioner, plugin)) = external_binaries(&args.external)? {
        measure_external(&client, &args, other, provisioner, plugin).await?
    }
    draw(&args)
}

/// Draw `--svg` from the rows of `--results` (also after `--fill-only`: with
/// `--volumes 0` that only redraws the chart).
fn draw(args: &ScaleArgs) -> anyhow::Result<()> {
    if let Some(svg) = &args.svg {
        let path = args
            .results
            .as_ref()
            .context("--svg draws the rows of --results")?;
        let rows = read_results(path)?;
        std::fs::write(svg, chart(&rows)).with_context(|| format!("writing {}", svg.display()))?;
        println!("  chart of {} rows: {}", rows.len(), svg.display());
    }
    Ok(())
}

/// Print a result and append it to `--results`: as soon as it is measured, before the
/// probe's cleanup (which waits for kube-controller-manager).
fn report(m: &Measured, args: &ScaleArgs) -> anyhow::Result<()> {
    print(m);
    if let Some(path) = &args.results {
        use std::io::Write as _;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        writeln!(file, "{}", serde_json::to_string(m)?)?;
    }
    Ok(())
}

fn print(m: &Measured) {
    let opt = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1} s"));
    let count = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
    println!(
        "stowage bench scale: {} among {} bound volumes (+{} of another driver)",
        m.driver, m.volumes, m.other_volumes
    );
    println!("  synced after          {}", opt(m.synced_s));
    println!(
        "  RSS after sync        {:.1} MB ({:.2} KB per volume; peak {:.1} MB)",
        m.rss_mb,
        m.rss_mb * 1000.0 / (m.volumes + m.other_volumes).max(1) as f64,
        m.peak_rss_mb
    );
    println!(
        "  writes / CSI calls    {} / {}   (start to synced and quiet)",
        count(m.writes),
        count(m.csi_calls)
    );
    println!(
        "  new claim → PV        {:.2} s   ({:.1} s after start)",
        m.first_pv_s, m.start_to_first_pv_s
    );
}

/// How many objects labelled `role` exist (claims for `pair`, PVs for `other`).
async fn count(client: &kube::Client, role: &str) -> anyhow::Result<usize> {
    let params = ListParams::default()
        .labels(&format!("{LABEL}={role}"))
        .limit(500);
    let names = if role == "pair" {
        list_names::<PersistentVolumeClaim>(Api::all(client.clone()), params).await?
    } else {
        list_names::<PersistentVolume>(Api::all(client.clone()), params).await?
    };
    Ok(names.len())
}

async fn list_names<K>(api: Api<K>, mut params: ListParams) -> anyhow::Result<HashSet<String>>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut names = HashSet::new();
    loop {
        let page = api.list_metadata(&params).await?;
        names.extend(page.items.iter().map(|o| o.name_any()));
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(next) => params = params.continue_token(&next),
            None => return Ok(names),
        }
    }
}

/// Create what is missing of `--volumes` pairs and `--other-volumes` foreign PVs.
async fn fill(client: &kube::Client, args: &ScaleArgs) -> anyhow::Result<()> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &args.namespace);
    let params = ListParams::default()
        .labels(&format!("{LABEL}=pair"))
        .limit(500);
    let existing = list_names(claims.clone(), params).await?;
    let missing: Vec<usize> = (0..args.volumes)
        .filter(|i| !existing.contains(&format!("scale-{i}")))
        .collect();
    let class: StorageClass = Api::all(client.clone()).get(CLASS).await?;
    let started = Instant::now();
    let made = missing.len();
    futures::stream::iter(missing)
        .map(|i| fill_pair(client, &claims, &class, i))
        .buffer_unordered(FILL_CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;
    let volumes: Api<PersistentVolume> = Api::all(client.clone());
    let params = ListParams::default()
        .labels(&format!("{LABEL}=other"))
        .limit(500);
    let others = list_names(volumes.clone(), params).await?;
    let missing: Vec<usize> = (0..args.other_volumes)
        .filter(|i| !others.contains(&format!("scale-other-{i}")))
        .collect();
    let made_others = missing.len();
    futures::stream::iter(missing)
        .map(|i| fill_other(&volumes, i))
        .buffer_unordered(FILL_CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;
    if made + made_others > 0 {
        println!(
            "filled {made} bound pairs and {made_others} PVs of {OTHER_DRIVER} in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

fn labels(role: &str) -> Option<BTreeMap<String, String>> {
    Some(BTreeMap::from([(LABEL.to_owned(), role.to_owned())]))
}

/// One claim and its PV, Bound, as provisioning and kube-controller-manager's bind
/// leave them: the claim annotated and protected, the PV built by stowage's own
/// `build_pv` with its finalizers.
async fn fill_pair(
    client: &kube::Client,
    claims: &Api<PersistentVolumeClaim>,
    class: &StorageClass,
    i: usize,
) -> anyhow::Result<()> {
    let name = format!("scale-{i}");
    let annotations = [
        (rules::ANN_STORAGE_PROVISIONER, DEFAULT_DRIVER_NAME),
        (rules::ANN_BETA_STORAGE_PROVISIONER, DEFAULT_DRIVER_NAME),
        ("pv.kubernetes.io/bind-completed", "yes"),
        ("pv.kubernetes.io/bound-by-controller", "yes"),
    ];
    let claim = PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: labels("pair"),
            annotations: Some(
                annotations
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            ),
            finalizers: Some(vec!["kubernetes.io/pvc-protection".to_owned()]),
            ..ObjectMeta::default()
        },
        spec: Some(claim_spec("ReadWriteMany", "1Gi")),
        status: None,
    };
    let claim = claims
        .create(&PostParams::default(), &claim)
        .await
        .with_context(|| format!("creating claim {name}"))?;
    let pv_name = rules::pv_name(&claim).map_err(anyhow::Error::msg)?;
    let volume = stowage_api::volume::Volume {
        id: format!("nfs://bench-scale.invalid/export/{pv_name}"),
        capacity_bytes: 1 << 30,
        context: BTreeMap::from([
            ("backend".to_owned(), "nfs".to_owned()),
            ("server".to_owned(), "bench-scale.invalid".to_owned()),
            ("share".to_owned(), "/export".to_owned()),
            ("subDir".to_owned(), pv_name.clone()),
        ]),
        topology: Vec::new(),
        source: None,
    };
    let mut pv = rules::build_pv(&claim, class, "bench-scale", &volume, 1 << 30)
        .map_err(anyhow::Error::msg)?;
    pv.metadata.labels = labels("pair");
    pv.metadata
        .finalizers
        .get_or_insert_with(Vec::new)
        .push("kubernetes.io/pv-protection".to_owned());
    let volumes: Api<PersistentVolume> = Api::all(client.clone());
    volumes
        .create(&PostParams::default(), &pv)
        .await
        .with_context(|| format!("creating PV {pv_name}"))?;
    let patch = PatchParams::default();
    volumes
        .patch_status(
            &pv_name,
            &patch,
            &Patch::Merge(json!({"status": {"phase": "Bound"}})),
        )
        .await?;
    claims
        .patch(
            &name,
            &patch,
            &Patch::Merge(json!({"spec": {"volumeName": pv_name}})),
        )
        .await?;
    claims
        .patch_status(
            &name,
            &patch,
            &Patch::Merge(json!({"status": {
                "phase": "Bound",
                "accessModes": ["ReadWriteMany"],
                "capacity": {"storage": "1Gi"},
            }})),
        )
        .await?;
    Ok(())
}

/// A PV of another CSI driver (Available, no claim).
async fn fill_other(volumes: &Api<PersistentVolume>, i: usize) -> anyhow::Result<()> {
    let name = format!("scale-other-{i}");
    let pv = PersistentVolume {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: labels("other"),
            annotations: Some(BTreeMap::from([(
                rules::ANN_PROVISIONED_BY.to_owned(),
                OTHER_DRIVER.to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeSpec {
            access_modes: Some(vec!["ReadWriteOnce".to_owned()]),
            capacity: Some(BTreeMap::from([(
                "storage".to_owned(),
                Quantity("10Gi".into()),
            )])),
            csi: Some(CSIPersistentVolumeSource {
                driver: OTHER_DRIVER.to_owned(),
                volume_handle: format!("projects/p/zones/z/disks/{name}"),
                fs_type: Some("ext4".to_owned()),
                volume_attributes: Some(BTreeMap::from([(
                    "storage.kubernetes.io/csiProvisionerIdentity".to_owned(),
                    "1733500000000-1234-other.csi.example.com".to_owned(),
                )])),
                ..CSIPersistentVolumeSource::default()
            }),
            persistent_volume_reclaim_policy: Some("Retain".to_owned()),
            storage_class_name: Some("other".to_owned()),
            ..PersistentVolumeSpec::default()
        }),
        status: None,
    };
    volumes
        .create(&PostParams::default(), &pv)
        .await
        .with_context(|| format!("creating PV {name}"))?;
    Ok(())
}

/// Delete everything the bench filled: finalizers off first (no controller is asked
/// to delete a backend volume: none exists).
async fn clean(client: &kube::Client, namespace: &str) -> anyhow::Result<()> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    let volumes: Api<PersistentVolume> = Api::all(client.clone());
    let params = ListParams::default().labels(LABEL).limit(500);
    let pv_names = list_names(volumes.clone(), params.clone()).await?;
    let claim_names = list_names(claims.clone(), params).await?;
    let started = Instant::now();
    unprotect_and_delete(&volumes, &pv_names).await?;
    unprotect_and_delete(&claims, &claim_names).await?;
    println!(
        "deleted {} PVs and {} claims in {:.1} s",
        pv_names.len(),
        claim_names.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Drop the finalizers of the named objects, then delete them.
async fn unprotect_and_delete<K>(api: &Api<K>, names: &HashSet<String>) -> anyhow::Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let unprotect = json!({"metadata": {"finalizers": null}});
    futures::stream::iter(names)
        .map(|name| {
            let unprotect = &unprotect;
            async move {
                api.patch(name, &PatchParams::default(), &Patch::Merge(unprotect))
                    .await?;
                api.delete(name, &DeleteParams::default()).await.map(drop)
            }
        })
        .buffer_unordered(FILL_CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// A new claim, annotated for the driver as kube-controller-manager would (so the
/// measurement does not wait for it).
pub(super) fn probe_claim(name: &str) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: labels("probe"),
            annotations: Some(BTreeMap::from([(
                rules::ANN_STORAGE_PROVISIONER.to_owned(),
                DEFAULT_DRIVER_NAME.to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        spec: Some(claim_spec("ReadWriteOnce", "1Mi")),
        status: None,
    }
}

/// Create a probe claim and wait for a PV naming it: when it appeared, and its name.
pub(super) async fn probe(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> anyhow::Result<(Instant, String)> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    let volumes: Api<PersistentVolume> = Api::all(client.clone());
    let claim = claims
        .create(&PostParams::default(), &probe_claim(name))
        .await
        .with_context(|| format!("creating the probe claim {name}"))?;
    let pv_name = format!("pvc-{}", claim.uid().unwrap_or_default());
    let deadline = Instant::now() + Duration::from_secs(600);
    let appeared = loop {
        if volumes.get_opt(&pv_name).await?.is_some() {
            break Instant::now();
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no PV for the probe claim after 600 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    Ok((appeared, pv_name))
}

/// Delete the probe claim and wait for its PV to go (the measured provisioner still
/// runs and deletes its volume).
pub(super) async fn drop_probe(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    pv_name: &str,
) -> anyhow::Result<()> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    let volumes: Api<PersistentVolume> = Api::all(client.clone());
    claims.delete(name, &DeleteParams::default()).await?;
    // The PV goes once kube-controller-manager has marked it Released, which a
    // controller-manager just started among 100,000 PVs may take minutes to get to.
    let deadline = Instant::now() + Duration::from_secs(600);
    while volumes.get_opt(pv_name).await?.is_some() {
        if Instant::now() > deadline {
            tracing::warn!(pv = %pv_name, "the probe's PV was not deleted within 600 s; delete it by hand");
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// Writes (create/update/patch/delete, Leases aside) and CSI calls (identity and
/// capability probes aside) in a scrape of the controller's /metrics.
fn writes_and_calls(metrics: &str) -> (u64, u64) {
    let value = |line: &str| {
        line.rsplit(' ')
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0) as u64
    };
    let label = |line: &str, name: &str| {
        line.split(&format!("{name}=\""))
            .nth(1)
            .and_then(|v| v.split('"').next())
            .unwrap_or_default()
            .to_owned()
    };
    let mut writes = 0;
    let mut calls = 0;
    for line in metrics.lines() {
        if line.starts_with("stowage_kube_api_requests_total{") {
            let verb = label(line, "verb");
            let writing = matches!(verb.as_str(), "create" | "update" | "patch" | "delete");
            if writing && label(line, "resource") != "leases" {
                writes += value(line);
            }
        } else if line.starts_with("csi_sidecar_operations_seconds_count{") {
            let method = label(line, "method_name");
            let probe = ["Identity/", "GetCapabilities", "NodeGetInfo"]
                .iter()
                .any(|p| method.contains(p));
            if !probe {
                calls += value(line);
            }
        }
    }
    (writes, calls)
}

async fn measure_stowage(
    client: &kube::Client,
    args: &ScaleArgs,
    other_volumes: usize,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let controller = Controller::start(&args.kubeconfig, &args.controller_args).await?;
    controller.ready(Duration::from_secs(600)).await?;
    let synced = started.elapsed();
    // Whatever a restart would write is written right after the sync: give it 2 s.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (writes, csi_calls) = writes_and_calls(&controller.scrape().await?);
    let (peak, rss) = controller.memory();
    let asked = Instant::now();
    let probe_name = format!("probe-{}", std::process::id());
    let (appeared, pv_name) = probe(client, &args.namespace, &probe_name).await?;
    report(
        &Measured {
            driver: "stowage".to_owned(),
            volumes: args.volumes,
            other_volumes,
            synced_s: Some(synced.as_secs_f64()),
            first_pv_s: (appeared - asked).as_secs_f64(),
            start_to_first_pv_s: synced.as_secs_f64() + (appeared - asked).as_secs_f64(),
            rss_mb: rss as f64 / 1e6,
            peak_rss_mb: peak as f64 / 1e6,
            writes: Some(writes),
            csi_calls: Some(csi_calls),
        },
        args,
    )?;
    drop_probe(client, &args.namespace, &probe_name, &pv_name).await?;
    controller.stop().await;
    Ok(())
}

async fn measure_external(
    client: &kube::Client,
    args: &ScaleArgs,
    other_volumes: usize,
    provisioner: &Path,
    plugin: &Path,
) -> anyhow::Result<()> {
    let plugin = External::start_plugin(plugin).await?;
    let started = Instant::now();
    let external = plugin.start_provisioner(
        &args.kubeconfig,
        provisioner,
        &args.external.csi_provisioner_args,
    )?;
    let pid = external.pid();
    let probe_name = format!("probe-ep-{}", std::process::id());
    let (appeared, pv_name) = probe(client, &args.namespace, &probe_name).await?;
    // Its caches are synced by now (it provisioned); let the heap settle as stowage's did.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (peak, rss) = memory_of(pid);
    report(
        &Measured {
            driver: "external-provisioner".to_owned(),
            volumes: args.volumes,
            other_volumes,
            synced_s: None,
            first_pv_s: (appeared - started).as_secs_f64(),
            start_to_first_pv_s: (appeared - started).as_secs_f64(),
            rss_mb: rss as f64 / 1e6,
            peak_rss_mb: peak as f64 / 1e6,
            writes: None,
            csi_calls: None,
        },
        args,
    )?;
    drop_probe(client, &args.namespace, &probe_name, &pv_name).await?;
    external.stop().await;
    Ok(())
}

fn read_results(path: &Path) -> anyhow::Result<Vec<Measured>> {
    std::fs::read_to_string(path)
        .with_context(|| format!("reading {}", path.display()))?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).context("a results line"))
        .collect()
}

/// RSS (MB) against volumes, one line per driver, as an SVG document.
pub fn chart(rows: &[Measured]) -> String {
    let (w, h, left, bottom, top, right) = (640.0, 400.0, 60.0, 50.0, 30.0, 170.0);
    let max_x = rows.iter().map(|r| r.volumes).max().unwrap_or(1).max(1) as f64;
    let max_y = rows.iter().map(|r| r.rss_mb).fold(1.0, f64::max) * 1.1;
    let x = |v: f64| left + v / max_x * (w - left - right);
    let y = |v: f64| h - bottom - v / max_y * (h - bottom - top);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{left}\" y=\"18\" font-size=\"14\">Controller RSS after a restart among N bound volumes</text>\n\
         <line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n\
         <line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{}\" stroke=\"black\"/>\n\
         <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">bound volumes (PV + claim)</text>\n\
         <text x=\"14\" y=\"{}\" transform=\"rotate(-90 14 {})\" text-anchor=\"middle\">RSS (MB)</text>\n",
        h - bottom,
        w - right,
        h - bottom,
        h - bottom,
        (left + w - right) / 2.0,
        h - 12.0,
        (h - bottom + top) / 2.0,
        (h - bottom + top) / 2.0,
    );
    for i in 0..=4 {
        let v = max_y * i as f64 / 4.0;
        svg += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{v:.0}</text>\n",
            left - 6.0,
            y(v) + 4.0
        );
        let n = max_x * i as f64 / 4.0;
        svg += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{n:.0}</text>\n",
            x(n),
            h - bottom + 16.0
        );
    }
    let drivers: Vec<String> = rows.iter().fold(Vec::new(), |mut seen, r| {
        if !seen.contains(&r.driver) {
            seen.push(r.driver.clone());
        }
        seen
    });
    let colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];
    for (i, driver) in drivers.iter().enumerate() {
        let color = colors[i % colors.len()];
        let mut points: Vec<(f64, f64)> = rows
            .iter()
            .filter(|r| &r.driver == driver)
            .map(|r| (r.volumes as f64, r.rss_mb))
            .collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        let path: Vec<String> = points
            .iter()
            .map(|(v, m)| format!("{:.1},{:.1}", x(*v), y(*m)))
            .collect();
        svg += &format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>\n",
            path.join(" ")
        );
        for (v, m) in &points {
            svg += &format!(
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{color}\"/>\n\
                 <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\">{m:.0}</text>\n",
                x(*v),
                y(*m),
                x(*v) + 5.0,
                y(*m) - 5.0
            );
        }
        let ly = top + 20.0 + 18.0 * i as f64;
        svg += &format!(
            "<line x1=\"{}\" y1=\"{ly}\" x2=\"{}\" y2=\"{ly}\" stroke=\"{color}\" stroke-width=\"2\"/>\n\
             <text x=\"{}\" y=\"{}\">{driver}</text>\n",
            w - right + 10.0,
            w - right + 30.0,
            w - right + 35.0,
            ly + 4.0
        );
    }
    svg += "</svg>\n";
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(driver: &str, volumes: usize, rss_mb: f64) -> Measured {
        Measured {
            driver: driver.into(),
            volumes,
            other_volumes: 0,
            synced_s: None,
            first_pv_s: 0.1,
            start_to_first_pv_s: 0.1,
            rss_mb,
            peak_rss_mb: rss_mb,
            writes: None,
            csi_calls: None,
        }
    }

    #[test]
    fn the_chart_draws_a_line_per_driver_through_its_rows() {
        let rows = [
            row("stowage", 1000, 35.0),
            row("external-provisioner", 1000, 75.0),
            row("stowage", 50000, 190.0),
            row("external-provisioner", 50000, 800.0),
        ];
        let svg = chart(&rows);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        let lines: Vec<&str> = svg.lines().filter(|l| l.starts_with("<polyline")).collect();
        assert_eq!(lines.len(), 2, "one line per driver");
        for line in &lines {
            assert_eq!(line.matches(',').count(), 2, "two points each: {line}");
        }
        assert!(svg.contains(">stowage</text>") && svg.contains(">external-provisioner</text>"));
        // The largest value sits below the top of the plot, the smallest above the axis.
        let ys: Vec<f64> = svg
            .lines()
            .filter(|l| l.starts_with("<circle"))
            .filter_map(|l| l.split("cy=\"").nth(1)?.split('"').next()?.parse().ok())
            .collect();
        assert_eq!(ys.len(), 4);
        assert!(ys.iter().all(|y| (30.0..=350.0).contains(y)), "{ys:?}");
    }

    #[test]
    fn writes_and_calls_count_only_writes_and_real_csi_calls() {
        let metrics = "\
stowage_kube_api_requests_total{verb=\"list\",resource=\"persistentvolumes\"} 3
stowage_kube_api_requests_total{verb=\"patch\",resource=\"persistentvolumeclaims\"} 2
stowage_kube_api_requests_total{verb=\"update\",resource=\"leases\"} 9
stowage_kube_api_requests_total{verb=\"create\",resource=\"events\"} 1
csi_sidecar_operations_seconds_count{driver_name=\"d\",method_name=\"/csi.v1.Identity/Probe\",grpc_status_code=\"OK\"} 4
csi_sidecar_operations_seconds_count{driver_name=\"d\",method_name=\"/csi.v1.Controller/ControllerGetCapabilities\",grpc_status_code=\"OK\"} 1
csi_sidecar_operations_seconds_count{driver_name=\"d\",method_name=\"/csi.v1.Controller/CreateVolume\",grpc_status_code=\"OK\"} 5
";
        assert_eq!(writes_and_calls(metrics), (3, 5));
    }
}
