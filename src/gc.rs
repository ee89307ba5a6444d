//! Leftovers: backend volumes no PV references (orphans) and PVs whose backend volume
//! is gone — `stowage gc`, and the controller's periodic run (`--gc-interval`).
//!
//! [`sort`] is the rule, pure: a volume is in use when a PV names it (by handle, or by
//! its CSI name = the PV name of a dynamic volume), when a VolumeSnapshotContent is
//! made from it, or when a claim still being provisioned will be bound to it (its name
//! is that claim's `pvc-<uid>`); every other volume is an orphan, and only orphans older
//! than the bound are ever deleted. [`collect`] reads the cluster and the backends;
//! [`delete`] reads the cluster once more right before deleting (a PV made meanwhile
//! protects its volume) and deletes through the backend, as DeleteVolume would.
//! NFS archives (`onDelete: archive`) are listed apart and never deleted.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::Api;
use kube::api::ListParams;
use serde::Serialize;
use stowage_api::keys::DriverNames;
use stowage_driver::backend::{Backend, Backends, Held, InventoryHints};
use stowage_loops::rules;
use stowage_loops::snapshots::types::VolumeSnapshotContent;

/// What the cluster says about volumes: who refers to which.
#[derive(Debug, Default)]
pub struct Refs {
    /// volumeHandle → PV name, for every PV of this driver.
    pub pv_handles: HashMap<String, String>,
    /// Every PV's name (a dynamic volume's CSI name is its PV's name).
    pub pv_names: BTreeSet<String>,
    /// source.volumeHandle → content name, for every VolumeSnapshotContent.
    pub content_sources: HashMap<String, String>,
    /// The PV name (`pvc-<uid>`) of every claim not bound yet, → the claim's key.
    pub provisioning: HashMap<String, String>,
}

impl Refs {
    /// Who refers to what, from the cluster's objects.
    pub fn of(
        drivers: &DriverNames,
        pvs: &[PersistentVolume],
        claims: &[PersistentVolumeClaim],
        contents: &[VolumeSnapshotContent],
    ) -> Refs {
        let mut refs = Refs::default();
        for pv in pvs {
            let name = pv.metadata.name.clone().unwrap_or_default();
            if let Some(csi) = pv.spec.as_ref().and_then(|s| s.csi.as_ref())
                && drivers.contains(&csi.driver)
            {
                refs.pv_handles
                    .insert(csi.volume_handle.clone(), name.clone());
            }
            refs.pv_names.insert(name);
        }
        for content in contents {
            if let Some(handle) = &content.spec.source.volume_handle {
                refs.content_sources.insert(
                    handle.clone(),
                    content.metadata.name.clone().unwrap_or_default(),
                );
            }
        }
        for pvc in claims {
            let bound = pvc
                .spec
                .as_ref()
                .and_then(|s| s.volume_name.as_deref())
                .is_some_and(|v| !v.is_empty());
            if !bound && let Ok(pv_name) = rules::pv_name(pvc) {
                refs.provisioning.insert(
                    pv_name,
                    format!(
                        "{}/{}",
                        pvc.metadata.namespace.as_deref().unwrap_or_default(),
                        pvc.metadata.name.as_deref().unwrap_or_default()
                    ),
                );
            }
        }
        refs
    }

    /// Who keeps `volume` in use, if anyone.
    pub fn user_of(&self, volume: &Held) -> Option<String> {
        if let Some(pv) = self.pv_handles.get(&volume.id) {
            return Some(format!("PV {pv}"));
        }
        if self.pv_names.contains(&volume.name) {
            return Some(format!("PV {}", volume.name));
        }
        if let Some(content) = self.content_sources.get(&volume.id) {
            return Some(format!("VolumeSnapshotContent {content}"));
        }
        self.provisioning
            .get(&volume.name)
            .map(|claim| format!("claim {claim} (being provisioned)"))
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Line {
    pub backend: String,
    /// The volume id; a PV's handle; an archive's path.
    pub volume: String,
    /// The CSI name (NFS, EBS volumes); the PV's name (a PV without volume).
    pub name: String,
    pub place: String,
    pub size_bytes: u64,
    /// Seconds since it was made; `None` when the storage does not say.
    pub age_seconds: Option<u64>,
}

/// What gc found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// Volumes nothing refers to, old enough to delete.
    pub orphans: Vec<Line>,
    /// Volumes nothing refers to, younger than the bound: kept for now.
    pub young_orphans: Vec<Line>,
    /// What `onDelete: archive` kept (never deleted by gc).
    pub archived: Vec<Line>,
    /// PVs of this driver whose volume the backend no longer has.
    pub pvs_without_volume: Vec<Line>,
    /// Volumes in use (counted, not listed).
    pub in_use: usize,
    /// Orphans deleted by this run, and those whose deletion failed (with why).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deleted: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_deleted: Vec<String>,
}

fn age(created: Option<SystemTime>, now: SystemTime) -> Option<Duration> {
    created.map(|c| now.duration_since(c).unwrap_or_default())
}

fn line(backend: &str, held: &Held, now: SystemTime) -> Line {
    Line {
        backend: backend.to_owned(),
        volume: held.id.clone(),
        name: held.name.clone(),
        place: held.place.clone(),
        size_bytes: held.capacity_bytes,
        age_seconds: age(held.created, now).map(|a| a.as_secs()),
    }
}

/// Sort one backend's volumes: in use, orphan, or an orphan too young to delete
/// (an unknown age counts as young: never deleted on a guess).
pub fn sort(
    report: &mut Report,
    backend: &str,
    volumes: &[Held],
    refs: &Refs,
    (now, older_than): (SystemTime, Duration),
) {
    for held in volumes {
        if refs.user_of(held).is_some() {
            report.in_use += 1;
            continue;
        }
        let line = line(backend, held, now);
        match age(held.created, now) {
            Some(age) if age >= older_than => report.orphans.push(line),
            _ => report.young_orphans.push(line),
        }
    }
}

/// The cluster's objects gc reads (read-only: list PVs, claims, StorageClasses,
/// VolumeSnapshotContents where served).
struct Cluster {
    pvs: Vec<PersistentVolume>,
    claims: Vec<PersistentVolumeClaim>,
    classes: Vec<StorageClass>,
    contents: Vec<VolumeSnapshotContent>,
}

async fn read_cluster(client: &kube::Client) -> anyhow::Result<Cluster> {
    let all = ListParams::default();
    let pvs = Api::<PersistentVolume>::all(client.clone())
        .list(&all)
        .await
        .context("listing PersistentVolumes")?
        .items;
    let claims = Api::<PersistentVolumeClaim>::all(client.clone())
        .list(&all)
        .await
        .context("listing PersistentVolumeClaims")?
        .items;
    let classes = Api::<StorageClass>::all(client.clone())
        .list(&all)
        .await
        .context("listing StorageClasses")?
        .items;
    let contents = match Api::<VolumeSnapshotContent>::all(client.clone())
        .list(&all)
        .await
    {
        Ok(list) => list.items,
        // No snapshot CRDs: no content can refer to a volume.
        Err(kube::Error::Api(status)) if status.code == 404 => vec![],
        Err(e) => return Err(e).context("listing VolumeSnapshotContents"),
    };
    Ok(Cluster {
        pvs,
        claims,
        classes,
        contents,
    })
}

/// Read the cluster and every backend; sort their volumes (nothing is changed).
pub async fn collect(
    client: &kube::Client,
    backends: &Backends,
    drivers: &DriverNames,
    older_than: Duration,
) -> anyhow::Result<Report> {
    let cluster = read_cluster(client).await?;
    let refs = Refs::of(drivers, &cluster.pvs, &cluster.claims, &cluster.contents);
    let hints = InventoryHints {
        class_parameters: cluster
            .classes
            .iter()
            .filter(|c| drivers.contains(&c.provisioner))
            .map(|c| {
                c.parameters
                    .clone()
                    .unwrap_or_default()
                    .into_iter()
                    .collect()
            })
            .collect(),
        volume_ids: refs.pv_handles.keys().cloned().collect(),
    };
    let now = SystemTime::now();
    let mut report = Report::default();
    let mut held_ids = BTreeSet::new();
    for backend in backends.iter() {
        let inventory = backend
            .inventory(&hints)
            .await
            .with_context(|| format!("listing the {} backend's volumes", backend.kind()))?;
        sort(
            &mut report,
            backend.kind(),
            &inventory.volumes,
            &refs,
            (now, older_than),
        );
        report.archived.extend(
            inventory
                .archived
                .iter()
                .map(|h| line(backend.kind(), h, now)),
        );
        held_ids.extend(inventory.volumes.into_iter().map(|h| h.id));
    }
    // PVs whose handle no backend listed: asked one by one (a statically provisioned
    // NFS directory has no record, and is still there).
    let mut handles: Vec<(&String, &String)> = refs.pv_handles.iter().collect();
    handles.sort();
    for (handle, pv) in handles {
        if held_ids.contains(handle) {
            continue;
        }
        let Some(backend) = backends.iter().find(|b| b.owns(handle)) else {
            continue;
        };
        if backend
            .get_volume(handle)
            .await
            .with_context(|| format!("looking up PV {pv}'s volume {handle}"))?
            .is_none()
        {
            report.pvs_without_volume.push(Line {
                backend: backend.kind().to_owned(),
                volume: handle.clone(),
                name: pv.clone(),
                place: String::new(),
                size_bytes: 0,
                age_seconds: None,
            });
        }
    }
    Ok(report)
}

/// Delete the report's orphans: the cluster is read again first, and an orphan that
/// something refers to by now is left alone.
pub async fn delete(
    client: &kube::Client,
    backends: &Backends,
    drivers: &DriverNames,
    report: &mut Report,
) -> anyhow::Result<()> {
    let cluster = read_cluster(client).await?;
    let refs = Refs::of(drivers, &cluster.pvs, &cluster.claims, &cluster.contents);
    for orphan in &report.orphans {
        let held = Held {
            id: orphan.volume.clone(),
            name: orphan.name.clone(),
            capacity_bytes: orphan.size_bytes,
            created: None,
            place: orphan.place.clone(),
        };
        if let Some(user) = refs.user_of(&held) {
            report
                .not_deleted
                .push(format!("{}: now in use by {user}", orphan.volume));
            continue;
        }
        let backend: Option<&Arc<dyn Backend>> = backends.iter().find(|b| b.owns(&orphan.volume));
        let Some(backend) = backend else { continue };
        match backend.delete_volume(&orphan.volume).await {
            Ok(()) => {
                tracing::info!(volume = %orphan.volume, name = %orphan.name, "gc deleted an orphan volume");
                report.deleted.push(orphan.volume.clone());
            }
            Err(e) => report.not_deleted.push(format!("{}: {e}", orphan.volume)),
        }
    }
    Ok(())
}

/// Labels of `stowage_orphan_volumes`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct OrphanLabels {
    backend: String,
}

/// The controller's gc: every `schedule.interval`, while this replica leads, list
/// (and with `delete_older_than`, delete) orphans; `stowage_orphan_volumes{backend}`
/// counts them (old or young) after each run.
pub fn spawn_schedule(
    schedule: crate::settings::GcSchedule,
    client: kube::Client,
    (backends, activity): (Backends, stowage_loops::Activity),
    metrics: &stowage_api::metrics::Metrics,
    drivers: DriverNames,
) -> tokio::task::JoinHandle<()> {
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge;
    let orphans: Family<OrphanLabels, Gauge> = Family::default();
    metrics.register(
        "stowage_orphan_volumes",
        "Backend volumes no PV, VolumeSnapshotContent or claim refers to, at the last gc run",
        orphans.clone(),
    );
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(schedule.interval).await;
            if !activity.leading() {
                continue;
            }
            let older_than = schedule
                .delete_older_than
                .unwrap_or(Duration::from_secs(3600));
            let mut report = match collect(&client, &backends, &drivers, older_than).await {
                Ok(report) => report,
                Err(e) => {
                    tracing::warn!(error = format!("{e:#}"), "gc could not list the volumes");
                    continue;
                }
            };
            for backend in backends.iter() {
                let count = report
                    .orphans
                    .iter()
                    .chain(&report.young_orphans)
                    .filter(|l| l.backend == backend.kind())
                    .count();
                orphans
                    .get_or_create(&OrphanLabels {
                        backend: backend.kind().to_owned(),
                    })
                    .set(i64::try_from(count).unwrap_or(i64::MAX));
            }
            for orphan in report.orphans.iter().chain(&report.young_orphans) {
                tracing::info!(backend = %orphan.backend, volume = %orphan.volume, age_seconds = ?orphan.age_seconds, "orphan volume: no PV, snapshot or claim refers to it");
            }
            if schedule.delete_older_than.is_some()
                && !report.orphans.is_empty()
                && let Err(e) = delete(&client, &backends, &drivers, &mut report).await
            {
                tracing::warn!(error = format!("{e:#}"), "gc could not delete the orphans");
            }
            for why in &report.not_deleted {
                tracing::warn!(%why, "gc did not delete an orphan");
            }
        }
    })
}

/// `stowage gc`: list, and with `--delete` delete, then print what was found and done.
pub async fn run(settings: crate::settings::Gc) -> anyhow::Result<()> {
    let config = stowage_loops::kube_client::config(settings.kubeconfig.as_deref()).await?;
    let client = kube::Client::try_from(config).context("building the Kubernetes client")?;
    let (backends, embedded) = crate::run::backends(&settings.backends).await?;
    anyhow::ensure!(
        embedded.is_none(),
        "gc reads an NFS export of the cluster's: give --nfs-server/--nfs-share"
    );
    let mut report = collect(&client, &backends, &settings.drivers, settings.older_than).await?;
    if settings.delete && !report.orphans.is_empty() {
        delete(&client, &backends, &settings.drivers, &mut report).await?;
    }
    match settings.output {
        crate::config::Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        crate::config::Output::Text => {
            print!("{}", render(&report, settings.older_than, settings.delete));
        }
    }
    anyhow::ensure!(
        report.not_deleted.is_empty(),
        "{} orphans were not deleted",
        report.not_deleted.len()
    );
    Ok(())
}

/// A size for people: `1.5 GiB`.
fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// An age for people: `3d4h`, `12m`.
fn age_text(seconds: Option<u64>) -> String {
    let Some(s) = seconds else {
        return "?".to_owned();
    };
    match s {
        s if s >= 86_400 => format!("{}d{}h", s / 86_400, s % 86_400 / 3600),
        s if s >= 3600 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// The report as a person reads it.
pub fn render(report: &Report, older_than: Duration, deleting: bool) -> String {
    let mut out = String::new();
    let table = |out: &mut String, title: &str, lines: &[Line]| {
        if lines.is_empty() {
            return;
        }
        out.push_str(&format!("{title}:\n"));
        out.push_str("  BACKEND  AGE      SIZE       VOLUME\n");
        for l in lines {
            out.push_str(&format!(
                "  {:<8} {:<8} {:<10} {}{}\n",
                l.backend,
                age_text(l.age_seconds),
                size(l.size_bytes),
                l.volume,
                if l.place.is_empty() {
                    String::new()
                } else {
                    format!("  ({})", l.place)
                }
            ));
        }
    };
    let bound = humantime::format_duration(older_than);
    table(
        &mut out,
        &format!("Orphan volumes (no PV, snapshot or claim refers to them; older than {bound})"),
        &report.orphans,
    );
    table(
        &mut out,
        &format!("Orphan volumes younger than {bound} (kept: a claim may still be getting them)"),
        &report.young_orphans,
    );
    table(
        &mut out,
        "Archived directories (onDelete: archive; gc never deletes them)",
        &report.archived,
    );
    if !report.pvs_without_volume.is_empty() {
        out.push_str("PVs whose volume is gone (delete the PV, or restore the volume):\n");
        for l in &report.pvs_without_volume {
            out.push_str(&format!(
                "  PV {}  {} volume {}\n",
                l.name, l.backend, l.volume
            ));
        }
    }
    out.push_str(&format!(
        "{} volumes in use, {} orphans ({} old enough to delete), {} archived, {} PVs without volume.\n",
        report.in_use,
        report.orphans.len() + report.young_orphans.len(),
        report.orphans.len(),
        report.archived.len(),
        report.pvs_without_volume.len()
    ));
    for id in &report.deleted {
        out.push_str(&format!("deleted {id}\n"));
    }
    for why in &report.not_deleted {
        out.push_str(&format!("not deleted {why}\n"));
    }
    if !deleting && !report.orphans.is_empty() {
        out.push_str(&format!(
            "Dry run: nothing deleted. `stowage gc --delete --older-than {bound}` deletes the orphans above.\n"
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        CSIPersistentVolumeSource, PersistentVolumeClaimSpec, PersistentVolumeSpec,
    };
    use kube::api::ObjectMeta;
    use stowage_loops::snapshots::types::{VolumeSnapshotContentSource, VolumeSnapshotContentSpec};

    const DRIVER: &str = "stowage.csi.dev";
    const NFS_DRIVER: &str = "nfs.stowage.csi.dev";

    fn names() -> DriverNames {
        DriverNames::new(DRIVER, NFS_DRIVER)
    }
    const HOUR: Duration = Duration::from_secs(3600);

    fn held(id: &str, name: &str, age: Option<Duration>, now: SystemTime) -> Held {
        Held {
            id: id.to_owned(),
            name: name.to_owned(),
            capacity_bytes: 1 << 30,
            created: age.map(|a| now - a),
            place: "10.0.0.5:/export".to_owned(),
        }
    }

    fn pv(name: &str, driver: &str, handle: &str) -> PersistentVolume {
        PersistentVolume {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..Default::default()
            },
            spec: Some(PersistentVolumeSpec {
                csi: Some(CSIPersistentVolumeSource {
                    driver: driver.to_owned(),
                    volume_handle: handle.to_owned(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn claim(name: &str, uid: &str, bound_to: Option<&str>) -> PersistentVolumeClaim {
        PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some("db".to_owned()),
                uid: Some(uid.to_owned()),
                ..Default::default()
            },
            spec: Some(PersistentVolumeClaimSpec {
                volume_name: bound_to.map(str::to_owned),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn content(name: &str, source_handle: &str) -> VolumeSnapshotContent {
        VolumeSnapshotContent {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..Default::default()
            },
            spec: VolumeSnapshotContentSpec {
                source: VolumeSnapshotContentSource {
                    volume_handle: Some(source_handle.to_owned()),
                    snapshot_handle: None,
                },
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn sorted(volumes: &[Held], refs: &Refs, now: SystemTime) -> Report {
        let mut report = Report::default();
        sort(&mut report, "nfs", volumes, refs, (now, HOUR));
        report
    }

    #[test]
    fn a_volume_nothing_refers_to_is_an_orphan_once_old_enough() {
        let now = SystemTime::now();
        let volumes = [
            held("nfs#a", "pvc-old", Some(2 * HOUR), now),
            held("nfs#b", "pvc-new", Some(HOUR / 2), now),
            held("nfs#c", "pvc-unknown-age", None, now),
        ];
        let report = sorted(&volumes, &Refs::default(), now);
        let ids = |lines: &[Line]| lines.iter().map(|l| l.volume.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&report.orphans), ["nfs#a"]);
        assert_eq!(
            ids(&report.young_orphans),
            ["nfs#b", "nfs#c"],
            "unknown age is never old"
        );
        assert_eq!(report.in_use, 0);
    }

    #[test]
    fn every_kind_of_reference_protects_a_volume() {
        let now = SystemTime::now();
        let old = Some(48 * HOUR);
        let volumes = [
            held("nfs#by-handle", "pvc-1", old, now),
            held("nfs#by-pv-name", "pvc-2", old, now),
            held("nfs#by-content", "pvc-3", old, now),
            held("nfs#by-claim", "pvc-u-4", old, now),
        ];
        let refs = Refs::of(
            &names(),
            &[
                pv("static-pv", DRIVER, "nfs#by-handle"),
                // A PV of another driver with this name still names the volume.
                pv("pvc-2", "other.csi.example", "whatever"),
            ],
            &[
                claim("data-db-4", "u-4", None),
                // A bound claim protects nothing by itself: its PV does.
                claim("data-db-9", "u-9", Some("pvc-u-9")),
            ],
            &[content("snapcontent-1", "nfs#by-content")],
        );
        let report = sorted(&volumes, &refs, now);
        assert_eq!(report.in_use, 4, "{report:?}");
        assert!(report.orphans.is_empty() && report.young_orphans.is_empty());
        assert_eq!(refs.user_of(&volumes[0]).as_deref(), Some("PV static-pv"));
        assert_eq!(
            refs.user_of(&volumes[2]).as_deref(),
            Some("VolumeSnapshotContent snapcontent-1")
        );
        assert_eq!(
            refs.user_of(&volumes[3]).as_deref(),
            Some("claim db/data-db-4 (being provisioned)")
        );
        // The bound claim's volume, without its PV, is an orphan.
        let lone = [held("nfs#lone", "pvc-u-9", old, now)];
        assert_eq!(sorted(&lone, &refs, now).orphans.len(), 1);
    }

    #[test]
    fn another_drivers_pv_handle_protects_nothing() {
        let now = SystemTime::now();
        let volumes = [
            held("vol-0abc", "pvc-x", Some(2 * HOUR), now),
            held("nfs#under-the-nfs-name", "pvc-y", Some(2 * HOUR), now),
        ];
        let refs = Refs::of(
            &names(),
            &[
                pv("theirs", "ebs.csi.aws.com", "vol-0abc"),
                pv("pvc-y", NFS_DRIVER, "nfs#under-the-nfs-name"),
            ],
            &[],
            &[],
        );
        let report = sorted(&volumes, &refs, now);
        assert_eq!(report.orphans.len(), 1, "{report:?}");
        assert_eq!(report.orphans[0].volume, "vol-0abc");
        assert_eq!(report.in_use, 1, "the NFS name's PV protects its volume");
    }

    #[test]
    fn the_report_reads_as_a_dry_run_with_what_to_type() {
        let now = SystemTime::now();
        let volumes = [held("nfs#a", "pvc-old", Some(3 * HOUR), now)];
        let report = sorted(&volumes, &Refs::default(), now);
        let text = render(&report, HOUR, false);
        assert!(text.contains("3h0m"), "{text}");
        assert!(text.contains("1.0 GiB"), "{text}");
        assert!(text.contains("Dry run: nothing deleted"), "{text}");
        assert!(
            text.contains("stowage gc --delete --older-than 1h"),
            "{text}"
        );
    }
}
