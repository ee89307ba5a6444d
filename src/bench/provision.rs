//! `stowage bench provision`: how fast claims become Bound against a real cluster.
//! Starts `stowage local --kubeconfig` as a child (the controller measured), creates N
//! claims at once on a stowage StorageClass, and reports the seconds to every claim's
//! PV (stowage's share) and to all Bound (kube-controller-manager binds after the PV),
//! claims/s, the controller's Kubernetes API requests per claim (from its /metrics)
//! and its RSS (peak and with all PVs present); then deletes the claims and reports
//! the time until every PV is gone. With `--csi-provisioner` and `--hostpathplugin`
//! the same for external-provisioner instead (hostpathplugin serving stowage's driver
//! name; no request counts: it has no such metrics).

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::{
    Namespace, PersistentVolume, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    VolumeResourceRequirements,
};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{DeleteParams, ObjectMeta, PostParams};
use kube::runtime::watcher;
use kube::{Api, ResourceExt as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::scale::{drop_probe, probe};
use crate::config::{ExternalProvisionerArgs, ProvisionArgs};
use stowage_api::keys::DEFAULT_DRIVER_NAME;

pub(super) const CLASS: &str = "stowage-bench";
const LABEL: &str = "stowage.dev/bench";

/// The measured controller process (`stowage local --kubeconfig`).
pub(super) struct Controller {
    child: tokio::process::Child,
    metrics: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

impl Controller {
    pub(super) async fn start(
        kubeconfig: &std::path::Path,
        controller_args: &[String],
    ) -> anyhow::Result<Controller> {
        let dir = tempfile::tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let exe = std::env::current_exe()?;
        let child = tokio::process::Command::new(exe)
            .arg("local")
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .arg("--endpoint")
            .arg(format!("unix://{}", dir.path().join("csi.sock").display()))
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--http-addr")
            .arg(port.to_string())
            .args(controller_args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting stowage local")?;
        Ok(Controller {
            child,
            metrics: port,
            _dir: dir,
        })
    }

    /// Wait until its loops run (asked every 20 ms); the request counts then.
    pub(super) async fn ready(&self, within: Duration) -> anyhow::Result<BTreeMap<String, f64>> {
        let ready_by = Instant::now() + within;
        loop {
            match self.requests().await {
                Ok((requests, true)) => return Ok(requests),
                _ if Instant::now() > ready_by => {
                    anyhow::bail!("stowage did not start its loops within {within:?}")
                }
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    pub(super) async fn stop(mut self) {
        kill(&mut self.child).await;
    }

    pub(super) fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// (VmHWM, VmRSS) in bytes.
    pub(super) fn memory(&self) -> (u64, u64) {
        memory_of(self.pid())
    }

    pub(super) async fn scrape(&self) -> anyhow::Result<String> {
        let mut stream = tokio::net::TcpStream::connect(self.metrics).await?;
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n")
            .await?;
        let mut body = String::new();
        stream.read_to_string(&mut body).await?;
        Ok(body)
    }

    /// Kubernetes API requests by verb, and whether the loops run (leader).
    pub(super) async fn requests(&self) -> anyhow::Result<(BTreeMap<String, f64>, bool)> {
        let text = self.scrape().await?;
        let mut by_verb = BTreeMap::new();
        let mut leader = false;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("stowage_kube_api_requests_total{") {
                let verb = rest
                    .split("verb=\"")
                    .nth(1)
                    .and_then(|v| v.split('"').next())
                    .unwrap_or("?")
                    .to_owned();
                let value: f64 = rest
                    .rsplit(' ')
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0.0);
                *by_verb.entry(verb).or_insert(0.0) += value;
            }
            if line.trim() == "stowage_leader 1" {
                leader = true;
            }
        }
        Ok((by_verb, leader))
    }
}

/// (VmHWM, VmRSS) of a process, in bytes.
/// The csi-provisioner and hostpathplugin binaries to compare with, if given.
pub(super) fn external_binaries(
    args: &ExternalProvisionerArgs,
) -> anyhow::Result<Option<(&Path, &Path)>> {
    match (&args.csi_provisioner, &args.hostpathplugin) {
        (Some(provisioner), Some(plugin)) => Ok(Some((provisioner, plugin))),
        (None, None) => Ok(None),
        _ => anyhow::bail!("--csi-provisioner and --hostpathplugin go together"),
    }
}

/// Kill a child process and reap it.
async fn kill(child: &mut tokio::process::Child) {
    let _ = child.start_kill();
    let _ = child.wait().await;
}

/// A child process killed when dropped.
fn spawn(program: &Path, args: &[String]) -> anyhow::Result<tokio::process::Child> {
    tokio::process::Command::new(program)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", program.display()))
}

/// hostpathplugin serving stowage's driver name on a socket of its own; once started,
/// csi-provisioner in front of it. Both are killed when this is dropped.
pub(super) struct External {
    plugin: tokio::process::Child,
    provisioner: Option<tokio::process::Child>,
    dir: tempfile::TempDir,
}

impl External {
    pub(super) async fn start_plugin(plugin: &Path) -> anyhow::Result<External> {
        let dir = tempfile::tempdir()?;
        let socket = dir.path().join("csi.sock");
        let plugin = spawn(
            plugin,
            &[
                format!("-drivername={DEFAULT_DRIVER_NAME}"),
                format!("-endpoint=unix://{}", socket.display()),
                "-nodeid=stowage-bench".to_owned(),
                format!("-statedir={}", dir.path().join("state").display()),
                "-enable-topology=false".to_owned(),
            ],
        )?;
        let ready_by = Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            anyhow::ensure!(Instant::now() < ready_by, "hostpathplugin made no socket");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(External {
            plugin,
            provisioner: None,
            dir,
        })
    }

    pub(super) fn start_provisioner(
        mut self,
        kubeconfig: &Path,
        provisioner: &Path,
        extra: &[String],
    ) -> anyhow::Result<External> {
        let mut args = vec![
            format!(
                "--csi-address={}",
                self.dir.path().join("csi.sock").display()
            ),
            format!("--kubeconfig={}", kubeconfig.display()),
            "--leader-election=false".to_owned(),
        ];
        args.extend_from_slice(extra);
        self.provisioner = Some(spawn(provisioner, &args)?);
        Ok(self)
    }

    /// The csi-provisioner's pid (0 before it is started).
    pub(super) fn pid(&self) -> u32 {
        self.provisioner.as_ref().and_then(|c| c.id()).unwrap_or(0)
    }

    pub(super) async fn stop(mut self) {
        if let Some(mut provisioner) = self.provisioner.take() {
            kill(&mut provisioner).await;
        }
        kill(&mut self.plugin).await;
    }
}

pub(super) fn memory_of(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// Requests per claim between two scrapes, and by verb: (7.01, "create 3.00, patch 4.01").
fn per_claim(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
    n: f64,
) -> (f64, String) {
    let mut total = 0.0;
    let mut verbs = Vec::new();
    for (verb, count) in after {
        let delta = count - before.get(verb).copied().unwrap_or(0.0);
        if delta > 0.0 {
            total += delta;
            verbs.push(format!("{verb} {:.2}", delta / n));
        }
    }
    (total / n, verbs.join(", "))
}

/// Scrape until the request counts stop changing for a second (at most a minute):
/// when the last one changed, and the counts then.
async fn quiet(
    controller: &Controller,
    mut last: BTreeMap<String, f64>,
) -> anyhow::Result<(Instant, BTreeMap<String, f64>)> {
    let mut changed = Instant::now();
    let give_up = changed + Duration::from_secs(60);
    while changed.elapsed() < Duration::from_secs(1) && Instant::now() < give_up {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (now, _) = controller.requests().await?;
        // Watches and the lease renewals go on; only writes and reads count.
        let moved = now.iter().any(|(verb, count)| {
            verb != "watch" && verb != "update" && last.get(verb) != Some(count)
        });
        if moved {
            changed = Instant::now();
        }
        last = now;
    }
    Ok((changed, last))
}

/// The spec of a bench claim: one access mode, `size`, on the bench's StorageClass.
pub(super) fn claim_spec(access_mode: &str, size: &str) -> PersistentVolumeClaimSpec {
    PersistentVolumeClaimSpec {
        access_modes: Some(vec![access_mode.to_owned()]),
        storage_class_name: Some(CLASS.to_owned()),
        resources: Some(VolumeResourceRequirements {
            requests: Some(BTreeMap::from([(
                "storage".to_owned(),
                Quantity(size.to_owned()),
            )])),
            ..VolumeResourceRequirements::default()
        }),
        ..PersistentVolumeClaimSpec::default()
    }
}

fn claim(name: &str, run: &str) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(BTreeMap::from([(LABEL.to_owned(), run.to_owned())])),
            ..ObjectMeta::default()
        },
        spec: Some(claim_spec("ReadWriteMany", "1Gi")),
        status: None,
    }
}

pub async fn run(args: ProvisionArgs) -> anyhow::Result<()> {
    let config = stowage_loops::kube_client::config(Some(&args.kubeconfig)).await?;
    // The claims are created the way client-go programs (the StatefulSet controller,
    // kubectl, helm) create them: over one HTTP/2 connection, without a client-side limit.
    let client = stowage_loops::kube_client::client(config, 0.0, 1, Default::default())?;
    ensure_class_and_namespace(&client, &args.namespace).await?;

    let run_id = format!("{}", std::process::id());
    let measured = match external_binaries(&args.external)? {
        None => {
            Measured::Stowage(Controller::start(&args.kubeconfig, &args.controller_args).await?)
        }
        Some((provisioner, plugin)) => {
            let external = External::start_plugin(plugin).await?.start_provisioner(
                &args.kubeconfig,
                provisioner,
                &args.external.csi_provisioner_args,
            )?;
            // Ready once it has provisioned a claim (its caches synced).
            let probe_name = format!("probe-{run_id}");
            let (_, pv_name) = probe(&client, &args.namespace, &probe_name).await?;
            drop_probe(&client, &args.namespace, &probe_name, &pv_name).await?;
            Measured::External(external)
        }
    };
    let before = match &measured {
        Measured::Stowage(controller) => Some(controller.ready(Duration::from_secs(60)).await?),
        Measured::External(_) => None,
    };
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &args.namespace);
    let selector = format!("{LABEL}={run_id}");

    // Watch for PVs and Bound before creating, so no transition is missed.
    let watch_config = watcher::Config::default().labels(&selector);
    let mut bound_events = Box::pin(watcher::watcher(claims.clone(), watch_config));
    let volumes: Api<PersistentVolume> = Api::all(client.clone());
    let mut pv_events = Box::pin(watcher::watcher(volumes.clone(), Default::default()));
    let names: Vec<String> = (0..args.claims)
        .map(|i| format!("bench-{run_id}-{i}"))
        .collect();
    let started = Instant::now();
    futures::stream::iter(names.iter().cloned())
        .map(|name| {
            let claims = claims.clone();
            let run_id = run_id.clone();
            async move {
                claims
                    .create(&PostParams::default(), &claim(&name, &run_id))
                    .await
                    .with_context(|| format!("creating claim {name}"))
            }
        })
        .buffer_unordered(200)
        .try_collect::<Vec<_>>()
        .await?;
    let created = started.elapsed();
    let wanted: HashSet<&str> = names.iter().map(String::as_str).collect();
    let mut bound: HashSet<String> = HashSet::new();
    let mut uids: HashSet<String> = HashSet::new();
    let mut with_pv: HashSet<String> = HashSet::new();
    let mut all_pvs = None;
    let deadline = Duration::from_secs(300);
    while bound.len() < args.claims || all_pvs.is_none() {
        let waiting = || {
            format!(
                "after {deadline:?}: {} of {} claims with a PV, {} Bound",
                with_pv.len(),
                args.claims,
                bound.len()
            )
        };
        let left = deadline.saturating_sub(started.elapsed());
        tokio::select! {
            event = bound_events.next() => match event {
                Some(Ok(watcher::Event::Apply(pvc) | watcher::Event::InitApply(pvc))) => {
                    if pvc.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound") {
                        uids.insert(format!("pvc-{}", pvc.uid().unwrap_or_default()));
                        bound.insert(pvc.name_any());
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => tracing::warn!(error = %e, "watch error"),
                None => anyhow::bail!("the claim watch ended"),
            },
            event = pv_events.next() => match event {
                Some(Ok(watcher::Event::Apply(pv) | watcher::Event::InitApply(pv))) => {
                    let claim = pv.spec.and_then(|s| s.claim_ref).unwrap_or_default();
                    if claim.namespace.as_deref() == Some(args.namespace.as_str())
                        && claim.name.as_deref().is_some_and(|n| wanted.contains(n))
                    {
                        with_pv.extend(claim.name);
                        if with_pv.len() == args.claims && all_pvs.is_none() {
                            all_pvs = Some(started.elapsed());
                        }
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => tracing::warn!(error = %e, "watch error"),
                None => anyhow::bail!("the PV watch ended"),
            },
            () = tokio::time::sleep(left) => anyhow::bail!(waiting()),
        }
    }
    let all_bound = started.elapsed();
    let all_pvs = all_pvs.unwrap_or(all_bound);
    let n = args.claims as f64;
    let who = match &measured {
        Measured::Stowage(_) => "stowage",
        Measured::External(_) => "external-provisioner (csi-provisioner + hostpathplugin)",
    };
    println!(
        "stowage bench provision: {} claims (StorageClass {CLASS}), {who}",
        args.claims
    );
    println!("  created in            {:>8.3} s", created.as_secs_f64());
    println!(
        "  all PVs after         {:>8.3} s   (the provisioner's share: claim → PV)",
        all_pvs.as_secs_f64()
    );
    println!(
        "  all Bound after       {:>8.3} s   ({:.0} claims/s)",
        all_bound.as_secs_f64(),
        n / all_bound.as_secs_f64()
    );
    if let (Measured::Stowage(controller), Some(before)) = (&measured, before) {
        let (after, _) = controller.requests().await?;
        let (total, detail) = per_claim(&before, &after, n);
        println!("  API requests / claim  {total:>8.2}     by all Bound ({detail})");
        // Events are published behind the binds: wait until the controller goes quiet.
        let (settled_at, settled) = quiet(controller, after).await?;
        let (total, detail) = per_claim(&before, &settled, n);
        println!(
            "  API requests / claim  {total:>8.2}     with the events, all sent after {:.3} s ({detail})",
            (settled_at - started).as_secs_f64()
        );
    }
    let pid = measured.pid();
    let (peak, rss) = memory_of(pid);
    println!(
        "  provisioner RSS       {:>8.1} MB now, {:.1} MB peak (pid {pid})",
        rss as f64 / 1e6,
        peak as f64 / 1e6,
    );

    if !args.keep {
        drop(pv_events);
        let mut pv_events = Box::pin(watcher::watcher(volumes, watcher::Config::default()));
        let deleting = Instant::now();
        futures::stream::iter(names.iter().cloned())
            .map(|name| {
                let claims = claims.clone();
                async move {
                    claims
                        .delete(&name, &DeleteParams::default())
                        .await
                        .map(drop)
                }
            })
            .buffer_unordered(200)
            .try_collect::<Vec<_>>()
            .await?;
        let mut present: HashSet<String> = HashSet::new();
        let mut listed = false;
        loop {
            if listed && present.is_empty() {
                break;
            }
            let event = tokio::time::timeout(Duration::from_secs(300), pv_events.next())
                .await
                .context("PVs not deleted within 300 s")?;
            match event {
                Some(Ok(watcher::Event::Init)) => present.clear(),
                Some(Ok(watcher::Event::InitApply(pv) | watcher::Event::Apply(pv))) => {
                    if uids.contains(&pv.name_any()) {
                        present.insert(pv.name_any());
                    }
                }
                Some(Ok(watcher::Event::Delete(pv))) => {
                    present.remove(&pv.name_any());
                }
                Some(Ok(watcher::Event::InitDone)) => listed = true,
                Some(Err(e)) => tracing::warn!(error = %e, "watch error"),
                None => anyhow::bail!("the PV watch ended"),
            }
        }
        println!(
            "  all PVs deleted after {:>8.3} s",
            deleting.elapsed().as_secs_f64()
        );
    }
    measured.stop().await;
    Ok(())
}

/// The provisioner a run measures.
enum Measured {
    Stowage(Controller),
    External(External),
}

impl Measured {
    fn pid(&self) -> u32 {
        match self {
            Measured::Stowage(controller) => controller.pid(),
            Measured::External(external) => external.pid(),
        }
    }

    async fn stop(self) {
        match self {
            Measured::Stowage(controller) => controller.stop().await,
            Measured::External(external) => external.stop().await,
        }
    }
}

pub(super) async fn ensure_class_and_namespace(
    client: &kube::Client,
    namespace: &str,
) -> anyhow::Result<()> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    if namespaces.get_opt(namespace).await?.is_none() {
        let object = Namespace {
            metadata: ObjectMeta {
                name: Some(namespace.to_owned()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        namespaces.create(&PostParams::default(), &object).await?;
    }
    let classes: Api<StorageClass> = Api::all(client.clone());
    if classes.get_opt(CLASS).await?.is_none() {
        let class = StorageClass {
            metadata: ObjectMeta {
                name: Some(CLASS.to_owned()),
                ..ObjectMeta::default()
            },
            provisioner: stowage_api::keys::DEFAULT_DRIVER_NAME.to_owned(),
            reclaim_policy: Some("Delete".to_owned()),
            volume_binding_mode: Some("Immediate".to_owned()),
            ..StorageClass::default()
        };
        classes.create(&PostParams::default(), &class).await?;
    }
    Ok(())
}
