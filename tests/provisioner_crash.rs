//! Crash safety of the provisioner: the `stowage local` process is SIGKILLed at
//! pseudo-random moments while claims are provisioned and deleted, and restarted on
//! the same data directory (the embedded NFS export: volumes are its `pvc-<uid>`
//! sub-directories, `.stowage/` holds their records). Afterwards every claim must be
//! Bound, the volumes on the backend must be exactly the PVs, and a crash must never
//! leave a volume without a PV or a PV without a volume.
//!
//! The moments come from a seeded generator; the seed is printed, and
//! `STOWAGE_CRASH_SEED=<seed>` repeats a run (`STOWAGE_CRASH_LOGS=1` also prints the
//! end of each killed instance's log). Runs against the in-process fake API
//! server, or a real cluster when `STOWAGE_E2E_KUBECONFIG` is set (see
//! `tests/common/cluster.rs`).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::cluster::*;
use futures::StreamExt as _;
use kube::ResourceExt as _;
use kube::api::{DeleteParams, ListParams, PostParams};

const CLAIMS: usize = 100;
const PROVISION_KILLS: usize = 10;
const DELETED: usize = 50;
const DELETE_KILLS: usize = 5;
/// Each kill comes this long (ms, uniformly) after the loops of the previous
/// restart began to run.
const KILL_AFTER_MS: (u64, u64) = (20, 400);
/// Concurrent API calls of the test's own creates and deletes.
const PARALLEL: usize = 16;
/// Dead instances whose logs are kept for a failure message.
const KEEP_LOGS: usize = 3;

/// splitmix64: small, seedable, good enough for picking moments.
struct Rng(u64);

impl Rng {
    fn seeded(test: &str) -> Rng {
        let seed = match std::env::var("STOWAGE_CRASH_SEED") {
            Ok(s) if !s.is_empty() => s.parse().expect("STOWAGE_CRASH_SEED is a u64"),
            _ => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64,
        };
        println!("{test}: seed {seed} (STOWAGE_CRASH_SEED={seed} repeats this run)");
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            items.swap(i, j);
        }
    }
}

/// The stowage process across restarts: always the same data directory.
struct Controller<'a> {
    cluster: &'a Cluster,
    data: PathBuf,
    current: Option<Stowage>,
    dead: Vec<Stowage>,
    starts: usize,
}

impl<'a> Controller<'a> {
    async fn start(cluster: &'a Cluster) -> Controller<'a> {
        let data = cluster.dir.path().join("data");
        let mut controller = Controller {
            cluster,
            data,
            current: None,
            dead: Vec::new(),
            starts: 0,
        };
        controller.restart().await;
        controller
    }

    /// Start a new instance (a fresh label and socket, the same data dir).
    async fn restart(&mut self) {
        assert!(self.current.is_none(), "one instance at a time");
        self.starts += 1;
        let label = format!("stowage-{}", self.starts);
        self.current =
            Some(Stowage::start_with_data(self.cluster, &label, &self.data, &[], &[]).await);
    }

    /// SIGKILL the running instance.
    fn kill(&mut self) {
        let mut stowage = self.current.take().expect("a running instance");
        stowage.kill();
        self.dead.push(stowage);
        if self.dead.len() > KEEP_LOGS {
            self.dead.remove(0);
        }
    }

    /// Wait until the running instance's loops run (`stowage_leader` is 1 once the
    /// informers have synced and the workers start); returns how long that took.
    async fn loops_running(&self) -> Duration {
        let stowage = self.current.as_ref().expect("a running instance");
        let start = Instant::now();
        loop {
            let text = stowage.http_get("/metrics").await.unwrap_or_default();
            if metric(&text, "stowage_leader", &[]) == Some(1.0) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < deadline(),
                "the loops of stowage {} never ran:\n{}",
                stowage.label,
                stowage.log()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Kill and restart `kills` times, each kill at a random moment after the loops of
    /// the last (re)start began to run (on a real cluster with many objects, the
    /// informers' first lists alone may take longer than the window); prints what each
    /// kill interrupted.
    async fn crash_repeatedly(&mut self, rng: &mut Rng, kills: usize, phase: &str) {
        for i in 1..=kills {
            let after = rng.between(KILL_AFTER_MS.0, KILL_AFTER_MS.1);
            let startup = self.loops_running().await;
            tokio::time::sleep(Duration::from_millis(after)).await;
            self.kill();
            let state = snapshot(self.cluster, &self.data).await;
            println!(
                "{phase}: SIGKILL {i}/{kills} {after} ms after the loops ran ({startup:?} after start): {state}"
            );
            if std::env::var_os("STOWAGE_CRASH_LOGS").is_some() {
                let log = self.dead.last().expect("just killed").log();
                let lines: Vec<&str> = log.lines().collect();
                let tail = &lines[lines.len().saturating_sub(40)..];
                println!("---- end of the killed log ----\n{}", tail.join("\n"));
            }
            self.restart().await;
        }
    }
}

/// Counts of the state at a moment, for the output.
async fn snapshot(cluster: &Cluster, data: &Path) -> String {
    let claims = cluster
        .claims()
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default();
    let finalizer = cluster.provisioning_finalizer();
    let bound = claims
        .iter()
        .filter(|c| phase_of_claim(c) == Some("Bound"))
        .count();
    let held = claims
        .iter()
        .filter(|c| c.finalizers().contains(&finalizer))
        .count();
    let pvs = cluster.our_pvs().await.len();
    format!(
        "{} claims ({bound} Bound, {held} with the provisioning finalizer), {pvs} PVs, {} volume dirs, {} records",
        claims.len(),
        volume_dirs(data).len(),
        records(data).len()
    )
}

/// The backend's volume records: the entries of `<data>/.stowage`, sorted.
fn records(data: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(data.join(".stowage")) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn set(items: impl IntoIterator<Item = String>) -> BTreeSet<String> {
    items.into_iter().collect()
}

/// What differs between two sets, for a failure message.
fn diff(what: &str, have: &BTreeSet<String>, want: &BTreeSet<String>) -> String {
    let extra: Vec<_> = have.difference(want).collect();
    let missing: Vec<_> = want.difference(have).collect();
    format!(
        "{what}: {} extra {extra:?}, {} missing {missing:?}",
        extra.len(),
        missing.len()
    )
}

async fn create_claims(cluster: &Cluster, class: &str, names: &[String]) {
    let api = cluster.claims();
    futures::stream::iter(names)
        .for_each_concurrent(PARALLEL, |name| {
            let api = api.clone();
            async move {
                api.create(&PostParams::default(), &simple_claim(name, class))
                    .await
                    .unwrap_or_else(|e| panic!("creating claim {name}: {e}"));
            }
        })
        .await;
}

async fn delete_claims(cluster: &Cluster, names: &[String]) {
    let api = cluster.claims();
    futures::stream::iter(names)
        .for_each_concurrent(PARALLEL, |name| {
            let api = api.clone();
            async move {
                api.delete(name, &DeleteParams::default())
                    .await
                    .unwrap_or_else(|e| panic!("deleting claim {name}: {e}"));
            }
        })
        .await;
}

/// Wait until every claim in `names` is Bound to `pvc-<uid>` without the provisioning
/// finalizer, and its PV is Bound; returns claim name → (uid, PV).
async fn wait_all_bound(cluster: &Cluster, names: &[String]) -> BTreeMap<String, (String, Pv)> {
    let finalizer = cluster.provisioning_finalizer();
    let (finalizer, wanted) = (&finalizer, &set(names.iter().cloned()));
    wait_for(
        &format!("{} claims to be Bound", names.len()),
        || async move {
            let claims = cluster
                .claims()
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?;
            let pvs: BTreeMap<String, Pv> = cluster
                .our_pvs()
                .await
                .into_iter()
                .map(|pv| (pv.name_any(), pv))
                .collect();
            let mut bound = BTreeMap::new();
            let mut waiting = Vec::new();
            for claim in claims
                .items
                .iter()
                .filter(|c| wanted.contains(&c.name_any()))
            {
                let uid = claim.uid().unwrap_or_default();
                let expected = format!("pvc-{uid}");
                let pv = pvs.get(&expected);
                let ready = phase_of_claim(claim) == Some("Bound")
                    && volume_name(claim) == Some(expected.as_str())
                    && !claim.finalizers().contains(finalizer)
                    && pv.is_some_and(|pv| phase_of_pv(pv) == Some("Bound"));
                match pv {
                    Some(pv) if ready => {
                        bound.insert(claim.name_any(), (uid, pv.clone()));
                    }
                    _ => waiting.push(format!(
                        "{}\n  {}",
                        describe_claim(claim),
                        describe_pv_opt(&pv.cloned())
                    )),
                }
            }
            if bound.len() == wanted.len() {
                return Ok(bound);
            }
            let missing: Vec<_> = wanted
                .iter()
                .filter(|n| !claims.items.iter().any(|c| &c.name_any() == *n))
                .collect();
            waiting.truncate(10);
            Err(format!(
                "{} of {} Bound; missing claims {missing:?}; not ready (first 10):\n{}",
                bound.len(),
                wanted.len(),
                waiting.join("\n")
            ))
        },
    )
    .await
}

/// Wait until the claims `names` and the PVs `pvs` are gone.
async fn wait_all_gone(cluster: &Cluster, names: &BTreeSet<String>, pvs: &BTreeSet<String>) {
    wait_for(
        &format!("{} claims and their PVs to be gone", names.len()),
        || async move {
            let claims = cluster
                .claims()
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?;
            let left_claims: Vec<String> = claims
                .items
                .iter()
                .filter(|c| names.contains(&c.name_any()))
                .take(10)
                .map(describe_claim)
                .collect();
            let left_pvs: Vec<String> = cluster
                .our_pvs()
                .await
                .iter()
                .filter(|pv| pvs.contains(&pv.name_any()))
                .take(10)
                .map(describe_pv)
                .collect();
            if left_claims.is_empty() && left_pvs.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "claims left (first 10):\n{}\nPVs left (first 10):\n{}",
                    left_claims.join("\n"),
                    left_pvs.join("\n")
                ))
            }
        },
    )
    .await
}

/// The backend holds exactly `expected` volumes: directories and records.
async fn wait_backend(data: &Path, expected: &BTreeSet<String>) {
    wait_for(
        &format!("exactly {} volumes on the backend", expected.len()),
        || async move {
            let dirs = set(volume_dirs(data));
            let recs = set(records(data));
            if &dirs == expected && &recs == expected {
                Ok(())
            } else {
                Err(format!(
                    "{}\n{}",
                    diff("volume directories", &dirs, expected),
                    diff("records", &recs, expected)
                ))
            }
        },
    )
    .await
}

/// The PVs are exactly those of `bound`, each made for its claim, with distinct
/// volume handles, and the backend holds exactly their volumes.
async fn check_consistent(cluster: &Cluster, data: &Path, bound: &BTreeMap<String, (String, Pv)>) {
    let pvs = cluster.our_pvs().await;
    let pv_names = set(pvs.iter().map(|pv| pv.name_any()));
    let expected = set(bound.values().map(|(uid, _)| format!("pvc-{uid}")));
    assert_eq!(
        pv_names,
        expected,
        "{}",
        diff("PVs vs pvc-<uid> of the claims", &pv_names, &expected)
    );
    let by_name: BTreeMap<String, &Pv> = pvs.iter().map(|pv| (pv.name_any(), pv)).collect();
    let mut handles = BTreeSet::new();
    for (claim, (uid, _)) in bound {
        let pv = by_name[&format!("pvc-{uid}")];
        let spec = pv.spec.as_ref().expect("PV spec");
        let claim_ref = spec.claim_ref.as_ref().expect("PV claimRef");
        assert_eq!(
            claim_ref.uid.as_deref(),
            Some(uid.as_str()),
            "{}",
            describe_pv(pv)
        );
        assert_eq!(
            claim_ref.name.as_deref(),
            Some(claim.as_str()),
            "{}",
            describe_pv(pv)
        );
        assert_eq!(
            claim_ref.namespace.as_deref(),
            Some(cluster.namespace.as_str())
        );
        let handle = &spec.csi.as_ref().expect("PV spec.csi").volume_handle;
        assert!(
            handles.insert(handle.clone()),
            "volume handle {handle} twice"
        );
    }
    let dirs = volume_dirs(data);
    let recs = records(data);
    assert_eq!(dirs.len(), set(dirs.clone()).len(), "duplicate directories");
    assert_eq!(
        set(dirs.clone()),
        expected,
        "{}",
        diff("volume directories vs PVs", &set(dirs), &expected)
    );
    assert_eq!(
        set(recs.clone()),
        expected,
        "{}",
        diff("volume records vs PVs", &set(recs), &expected)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_while_provisioning_and_deleting_leaves_no_orphan_and_no_duplicate() {
    const TEST: &str = "sigkill_while_provisioning_and_deleting";
    let started = Instant::now();
    let mut rng = Rng::seeded(TEST);
    let cluster = Cluster::start(TEST).await;
    let class = cluster
        .create_class("stowage-nfs", "Delete", &[], false)
        .await;
    let mut controller = Controller::start(&cluster).await;
    let data = controller.data.clone();
    let names: Vec<String> = (0..CLAIMS).map(|i| format!("crash-{i:03}")).collect();

    // 1. 100 claims at once, 10 crashes meanwhile.
    let provisioning = Instant::now();
    tokio::join!(
        create_claims(&cluster, &class, &names),
        controller.crash_repeatedly(&mut rng, PROVISION_KILLS, "provisioning"),
    );
    let bound = wait_all_bound(&cluster, &names).await;
    println!(
        "all {CLAIMS} claims Bound {:?} after the first create ({} starts)",
        provisioning.elapsed(),
        controller.starts
    );
    check_consistent(&cluster, &data, &bound).await;

    // 2. Delete half of them, 5 crashes meanwhile.
    let mut doomed = names.clone();
    rng.shuffle(&mut doomed);
    let (doomed, kept) = doomed.split_at(DELETED);
    let doomed_set = set(doomed.iter().cloned());
    let doomed_pvs = set(doomed.iter().map(|n| bound[n].1.name_any()));
    let deleting = Instant::now();
    tokio::join!(
        delete_claims(&cluster, doomed),
        controller.crash_repeatedly(&mut rng, DELETE_KILLS, "deleting"),
    );
    wait_all_gone(&cluster, &doomed_set, &doomed_pvs).await;
    let kept_pvs = set(kept.iter().map(|n| bound[n].1.name_any()));
    wait_backend(&data, &kept_pvs).await;
    println!(
        "{DELETED} claims and their volumes gone {:?} after the first delete",
        deleting.elapsed()
    );
    let kept_bound = wait_all_bound(&cluster, kept).await;
    for (name, (uid, pv)) in &kept_bound {
        assert_eq!(uid, &bound[name].0, "claim {name} was replaced");
        assert_eq!(pv.name_any(), bound[name].1.name_any());
    }
    check_consistent(&cluster, &data, &kept_bound).await;
    println!(
        "{TEST}: {} starts, {:?} in all",
        controller.starts,
        started.elapsed()
    );
}

/// Spin until the volume directory `name` appears in `data`, then SIGKILL `pid` at
/// once (from the polling thread: no hand-over in between).
async fn kill_when_the_volume_dir_appears(data: &Path, name: &str, pid: i32) {
    let dir = data.join(name);
    let limit = deadline();
    tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        while !dir.exists() {
            assert!(
                start.elapsed() < limit,
                "the volume directory {} never appeared",
                dir.display()
            );
            std::thread::yield_now();
        }
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("SIGKILL");
    })
    .await
    .unwrap()
}

/// A volume made, its PV not yet: the claim, deleted while stowage is down, is held by
/// the provisioning finalizer, and the restarted stowage deletes the volume and lets
/// the claim go. A kill that comes too late (the PV already made) takes the ordinary
/// deletion path, which is checked as well, and the case is tried again (up to
/// `ATTEMPTS` times; on the fake with the PV's first create failing) until the kill
/// lands between the volume and its PV.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_right_after_create_volume_then_the_claim_is_deleted() {
    const TEST: &str = "sigkill_right_after_create_volume";
    const ATTEMPTS: usize = 10;
    let cluster = Cluster::start(TEST).await;
    let class = cluster
        .create_class("stowage-nfs", "Delete", &[], false)
        .await;
    let mut controller = Controller::start(&cluster).await;
    let data = controller.data.clone();
    let finalizer = cluster.provisioning_finalizer();
    for attempt in 1..=ATTEMPTS {
        let name = format!("victim-{attempt}");
        if attempt > 1
            && let Some(fake) = &cluster.fake
        {
            // Too late before: hold the PV back (its first create fails, retried after
            // the backoff) so that the kill lands before it.
            fake.fail_next("create", "persistentvolumes", 1, 500, "InternalError");
        }
        let claim = cluster.create_claim(&simple_claim(&name, &class)).await;
        let volume = format!("pvc-{}", claim.uid().unwrap());
        let pid = controller.current.as_ref().unwrap().pid();
        kill_when_the_volume_dir_appears(&data, &volume, pid).await;
        controller.kill();

        let at_kill = cluster.claims().get(&name).await.unwrap();
        let pv = cluster.volumes().get_opt(&volume).await.unwrap();
        println!(
            "attempt {attempt}, at SIGKILL: {}\n  {}",
            describe_claim(&at_kill),
            describe_pv_opt(&pv)
        );
        assert!(
            at_kill.finalizers().contains(&finalizer) || pv.is_some(),
            "volume directory {volume} exists, but neither a PV nor the provisioning finalizer protects it"
        );

        // Deleted while stowage is down: a volume without a PV keeps its claim.
        cluster.delete_claim(&name).await;
        let pv = cluster.volumes().get_opt(&volume).await.unwrap();
        let after_delete = cluster.claims().get_opt(&name).await.unwrap();
        println!(
            "attempt {attempt}, deleted while down: {}\n  {}",
            after_delete
                .as_ref()
                .map_or_else(|| "claim gone".to_owned(), describe_claim),
            describe_pv_opt(&pv)
        );
        let finalizer_path = pv.is_none();
        if finalizer_path {
            let claim = after_delete.expect("the claim of a volume without a PV was let go");
            assert!(claim.finalizers().contains(&finalizer));
            assert!(claim.metadata.deletion_timestamp.is_some());
        }

        controller.restart().await;
        cluster.wait_claim_gone(&name).await;
        cluster.wait_pv_gone(&volume).await;
        wait_backend(&data, &BTreeSet::new()).await;
        assert!(
            cluster.our_pvs().await.is_empty(),
            "{}",
            cluster.describe().await
        );
        if finalizer_path {
            println!("{TEST}: the kill landed between the volume and its PV (attempt {attempt})");
            return;
        }
        println!("{TEST}: attempt {attempt}: the PV was made before the kill; again");
    }
    panic!("in {ATTEMPTS} attempts, no kill landed between a volume and its PV");
}
