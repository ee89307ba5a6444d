//! The harness of the Kubernetes loop tests: an API server (the in-process
//! [`FakeKube`], or the real cluster whose kubeconfig is in `STOWAGE_E2E_KUBECONFIG`)
//! and the real `stowage` binary started against it as a child process.
//!
//! Against a real cluster every test gets its own namespace, a unique driver name
//! (`t<tag>.stowage.csi.dev`, so another stowage serving `stowage.csi.dev` there never
//! touches the test's claims) and unique StorageClass names; everything is deleted
//! when the [`Cluster`] is dropped, also after a failure.
//!
//! Waits poll the API (or the data directory) until [`deadline`]; a wait that times
//! out fails with the state it last saw.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::storage::v1::{CSINode, StorageClass, VolumeAttachment};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Resource, ResourceExt as _};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::fake_kube::FakeKube;

/// How long any wait for a condition may take against the fake.
pub const DEADLINE: Duration = Duration::from_secs(30);
/// … and against a real cluster, whose controller-manager (pvc-protection, the PV
/// controller) may be slow to do its part when other work keeps it busy.
pub const REAL_DEADLINE: Duration = Duration::from_secs(120);

/// The deadline of waits in this run.
pub fn deadline() -> Duration {
    match std::env::var(E2E_ENV) {
        Ok(path) if !path.is_empty() => REAL_DEADLINE,
        _ => DEADLINE,
    }
}
/// The env var naming a real cluster's kubeconfig.
pub const E2E_ENV: &str = "STOWAGE_E2E_KUBECONFIG";
/// The finalizer external-provisioner (and stowage) puts on the PVs it creates.
pub const PV_FINALIZER: &str = "external-provisioner.volume.kubernetes.io/finalizer";

pub type Pvc = PersistentVolumeClaim;
pub type Pv = PersistentVolume;

/// Poll `probe` until it returns `Ok`, for at most [`deadline`]; on timeout, fail with
/// the state the last `Err` described.
pub async fn wait_for<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let (start, deadline) = (Instant::now(), deadline());
    loop {
        match probe().await {
            Ok(value) => return value,
            Err(state) if start.elapsed() > deadline => {
                panic!("timed out after {deadline:?} waiting for {what}; current state:\n{state}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

fn unique_tag() -> String {
    use std::hash::BuildHasher as _;
    let n = std::collections::hash_map::RandomState::new().hash_one((
        std::process::id(),
        std::time::SystemTime::now(),
        std::thread::current().id(),
    ));
    format!("{:08x}", n as u32)
}

/// Where the test's objects live and which driver name they use.
pub struct Cluster {
    /// On the fake: kube-controller-manager's PV controller, played by a stand-in
    /// (binding claims to their PVs is its job, not stowage's). Declared before `fake`
    /// so it stops first: fields drop in order.
    pub pv_controller: Option<super::stand_ins::PvController>,
    /// The fake API server (None against a real cluster).
    pub fake: Option<FakeKube>,
    pub client: kube::Client,
    pub kubeconfig: PathBuf,
    /// The namespace of the test's claims (and Leases).
    pub namespace: String,
    /// The CSI driver name: the StorageClasses' provisioner.
    pub driver: String,
    /// Unique per test (names of StorageClasses etc. on a real cluster).
    pub tag: String,
    pub dir: tempfile::TempDir,
    /// Cluster-scoped objects to delete afterwards (real cluster): (kind, name).
    created: Mutex<Vec<(&'static str, String)>>,
}

impl Cluster {
    /// The fake API server, or the real cluster when `STOWAGE_E2E_KUBECONFIG` is set.
    pub async fn start(test: &str) -> Cluster {
        Self::start_with_pv_lag(test, Duration::ZERO).await
    }

    /// [`Self::start`]; on the fake, the PV controller stand-in sees each PV event
    /// `lag` late (a busy kube-controller-manager).
    pub async fn start_with_pv_lag(test: &str, lag: Duration) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let tag = unique_tag();
        match std::env::var(E2E_ENV) {
            Ok(path) if !path.is_empty() => {
                let kubeconfig = PathBuf::from(path);
                let client = real_client(&kubeconfig).await;
                let namespace = format!("stowage-{tag}");
                let ns: Namespace =
                    serde_json::from_value(json!({"metadata": {"name": namespace}})).unwrap();
                Api::<Namespace>::all(client.clone())
                    .create(&PostParams::default(), &ns)
                    .await
                    .unwrap_or_else(|e| panic!("{test}: creating namespace {namespace}: {e}"));
                let driver = format!("t{tag}.stowage.csi.dev");
                eprintln!("{test}: real cluster, namespace {namespace}, driver {driver}");
                Cluster {
                    fake: None,
                    pv_controller: None,
                    client,
                    kubeconfig,
                    namespace,
                    driver,
                    tag,
                    dir,
                    created: Mutex::default(),
                }
            }
            _ => {
                static ONCE: Once = Once::new();
                ONCE.call_once(|| {
                    eprintln!("skipping real-cluster run: {E2E_ENV} not set");
                });
                let fake = FakeKube::start().await;
                let kubeconfig = dir.path().join("kubeconfig");
                fake.write_kubeconfig(&kubeconfig);
                Cluster {
                    client: fake.client(),
                    pv_controller: Some(super::stand_ins::PvController::start(&fake, lag)),
                    fake: Some(fake),
                    kubeconfig,
                    namespace: "db".to_owned(),
                    driver: stowage_api::keys::DEFAULT_DRIVER_NAME.to_owned(),
                    tag,
                    dir,
                    created: Mutex::default(),
                }
            }
        }
    }

    pub fn is_fake(&self) -> bool {
        self.fake.is_some()
    }

    /// The fake, or `None` with a message saying why the scenario needs it.
    pub fn fake_or_skip(&self, test: &str, why: &str) -> Option<&FakeKube> {
        if self.fake.is_none() {
            eprintln!("SKIPPED {test} against the real cluster: {why}");
        }
        self.fake.as_ref()
    }

    pub fn fake(&self) -> &FakeKube {
        self.fake
            .as_ref()
            .expect("this scenario needs the fake API server")
    }

    /// `base` on the fake, `base-<tag>` on a real cluster.
    pub fn name(&self, base: &str) -> String {
        if self.is_fake() {
            base.to_owned()
        } else {
            format!("{base}-{}", self.tag)
        }
    }

    /// The claim finalizer stowage holds while provisioning.
    pub fn provisioning_finalizer(&self) -> String {
        format!("{}/provisioning", self.driver)
    }

    /// The Lease name of leader election (the driver with dots as dashes).
    pub fn lease_name(&self) -> String {
        self.driver.replace('.', "-")
    }

    pub fn claims(&self) -> Api<Pvc> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    pub fn volumes(&self) -> Api<Pv> {
        Api::all(self.client.clone())
    }

    pub fn attachments(&self) -> Api<VolumeAttachment> {
        Api::all(self.client.clone())
    }

    /// A StorageClass of our driver named [`Self::name`]`(base)`; returns its name.
    pub async fn create_class(
        &self,
        base: &str,
        reclaim: &str,
        parameters: &[(&str, &str)],
        allow_expansion: bool,
    ) -> String {
        let name = self.name(base);
        let parameters: BTreeMap<&str, &str> = parameters.iter().copied().collect();
        let class: StorageClass = serde_json::from_value(json!({
            "metadata": {"name": name},
            "provisioner": self.driver,
            "reclaimPolicy": reclaim,
            "volumeBindingMode": "Immediate",
            "allowVolumeExpansion": allow_expansion,
            "parameters": parameters,
        }))
        .unwrap();
        self.created
            .lock()
            .unwrap()
            .push(("storageclass", name.clone()));
        Api::<StorageClass>::all(self.client.clone())
            .create(&PostParams::default(), &class)
            .await
            .unwrap_or_else(|e| panic!("creating StorageClass {name}: {e}"));
        name
    }

    /// A CSINode for `node` with our driver's entry.
    pub async fn create_csinode(&self, node: &str) {
        let csinode: CSINode = serde_json::from_value(json!({
            "metadata": {"name": node},
            "spec": {"drivers": [{"name": self.driver, "nodeID": node, "topologyKeys": []}]},
        }))
        .unwrap();
        self.created
            .lock()
            .unwrap()
            .push(("csinode", node.to_owned()));
        Api::<CSINode>::all(self.client.clone())
            .create(&PostParams::default(), &csinode)
            .await
            .unwrap_or_else(|e| panic!("creating CSINode {node}: {e}"));
    }

    /// A VolumeAttachment `name` of our driver: PV `pv` on node `node`.
    pub async fn create_attachment(&self, name: &str, node: &str, pv: &str) {
        let va: VolumeAttachment = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {
                "attacher": self.driver,
                "nodeName": node,
                "source": {"persistentVolumeName": pv},
            },
        }))
        .unwrap();
        self.attachments()
            .create(&PostParams::default(), &va)
            .await
            .unwrap_or_else(|e| panic!("creating VolumeAttachment {name}: {e}"));
    }

    pub async fn create_claim(&self, claim: &Pvc) -> Pvc {
        self.claims()
            .create(&PostParams::default(), claim)
            .await
            .unwrap_or_else(|e| panic!("creating claim {}: {e}", claim.name_any()))
    }

    pub async fn delete_claim(&self, name: &str) {
        match self.claims().delete(name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(e) => panic!("deleting claim {name}: {e}"),
        }
    }

    /// Wait until the claim `name` is Bound to `pvc-<uid>`, without the provisioning
    /// finalizer (on a real cluster the PV controller may bind it a moment before
    /// stowage's own bind write drops the finalizer), and that PV is Bound; returns
    /// both.
    pub async fn wait_bound(&self, name: &str) -> (Pvc, Pv) {
        wait_for(&format!("claim {name} to be Bound"), || async move {
            let claim = self
                .claims()
                .get_opt(name)
                .await
                .map_err(|e| e.to_string())?;
            let Some(claim) = claim else {
                return Err(format!("claim {name} does not exist"));
            };
            let expected = format!("pvc-{}", claim.uid().unwrap());
            let pv = self
                .volumes()
                .get_opt(&expected)
                .await
                .map_err(|e| e.to_string())?;
            let state = format!("{}\n{}", describe_claim(&claim), describe_pv_opt(&pv));
            let claim_bound = phase_of_claim(&claim) == Some("Bound")
                && volume_name(&claim) == Some(expected.as_str())
                && !claim.finalizers().contains(&self.provisioning_finalizer());
            match pv {
                Some(pv) if claim_bound && phase_of_pv(&pv) == Some("Bound") => Ok((claim, pv)),
                _ => Err(state),
            }
        })
        .await
    }

    /// Wait until every claim in `names` is Bound.
    pub async fn wait_all_bound(&self, names: &[String]) -> Vec<(Pvc, Pv)> {
        let mut out = Vec::new();
        for name in names {
            out.push(self.wait_bound(name).await);
        }
        out
    }

    /// Wait until the claim `name` no longer exists.
    pub async fn wait_claim_gone(&self, name: &str) {
        wait_for(&format!("claim {name} to disappear"), || async move {
            match self
                .claims()
                .get_opt(name)
                .await
                .map_err(|e| e.to_string())?
            {
                None => Ok(()),
                Some(claim) => Err(describe_claim(&claim)),
            }
        })
        .await
    }

    /// Wait until the PV `name` no longer exists.
    pub async fn wait_pv_gone(&self, name: &str) {
        wait_for(&format!("PV {name} to disappear"), || async move {
            match self
                .volumes()
                .get_opt(name)
                .await
                .map_err(|e| e.to_string())?
            {
                None => Ok(()),
                Some(pv) => Err(describe_pv(&pv)),
            }
        })
        .await
    }

    /// PVs of our driver.
    pub async fn our_pvs(&self) -> Vec<Pv> {
        self.volumes()
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|pv| {
                pv.spec
                    .as_ref()
                    .and_then(|s| s.csi.as_ref())
                    .is_some_and(|c| c.driver == self.driver)
            })
            .collect()
    }

    /// Events (events.k8s.io) about the object named `name` in our namespace.
    pub async fn events_about(&self, name: &str) -> Vec<Event> {
        Api::<Event>::namespaced(self.client.clone(), &self.namespace)
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .collect()
    }

    /// Wait for a Warning event `reason` about `name` whose note contains every one of
    /// `words`; returns its note.
    pub async fn wait_warning(&self, name: &str, reason: &str, words: &[&str]) -> String {
        wait_for(
            &format!("a {reason} warning about {name} naming {words:?}"),
            || async move {
                let events = self.events_about(name).await;
                events
                    .iter()
                    .filter(|e| {
                        e.reason.as_deref() == Some(reason) && e.type_.as_deref() == Some("Warning")
                    })
                    .filter_map(|e| e.note.clone())
                    .find(|note| words.iter().all(|w| note.contains(w)))
                    .ok_or_else(|| describe_events(&events))
            },
        )
        .await
    }

    /// Everything the test made, for failure messages.
    pub async fn describe(&self) -> String {
        let mut out = String::new();
        if let Ok(claims) = self.claims().list(&ListParams::default()).await {
            for claim in claims {
                out += &describe_claim(&claim);
                out.push('\n');
            }
        }
        for pv in self.our_pvs().await {
            out += &describe_pv(&pv);
            out.push('\n');
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.is_fake() {
            return;
        }
        let kubeconfig = self.kubeconfig.clone();
        let namespace = self.namespace.clone();
        let driver = self.driver.clone();
        let created = std::mem::take(&mut *self.created.lock().unwrap());
        // Drop can't await: clean up on a thread with its own runtime.
        let cleanup = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(clean_real_cluster(
                    &kubeconfig,
                    &namespace,
                    &driver,
                    created,
                ));
        });
        if cleanup.join().is_err() {
            eprintln!("cleaning up namespace {} failed", self.namespace);
        }
    }
}

async fn real_client(kubeconfig: &Path) -> kube::Client {
    let file = kube::config::Kubeconfig::read_from(kubeconfig)
        .unwrap_or_else(|e| panic!("reading {}: {e}", kubeconfig.display()));
    let config =
        kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
            .await
            .unwrap_or_else(|e| panic!("loading {}: {e}", kubeconfig.display()));
    kube::Client::try_from(config).expect("a client for the real cluster")
}

const NO_FINALIZERS: fn() -> Value = || json!({"metadata": {"finalizers": null}});

async fn strip_and_delete<K>(api: &Api<K>, name: &str)
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let _ = api.delete(name, &DeleteParams::default()).await;
    let _ = api
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(NO_FINALIZERS()),
        )
        .await;
}

/// Delete what a test made on a real cluster, dropping finalizers that a killed
/// stowage can no longer remove.
async fn clean_real_cluster(
    kubeconfig: &Path,
    namespace: &str,
    driver: &str,
    created: Vec<(&'static str, String)>,
) {
    let client = real_client(kubeconfig).await;
    let claims = Api::<Pvc>::namespaced(client.clone(), namespace);
    if let Ok(list) = claims.list(&ListParams::default()).await {
        for claim in list {
            strip_and_delete(&claims, &claim.name_any()).await;
        }
    }
    let attachments = Api::<VolumeAttachment>::all(client.clone());
    if let Ok(list) = attachments.list(&ListParams::default()).await {
        for va in list.into_iter().filter(|va| va.spec.attacher == driver) {
            strip_and_delete(&attachments, &va.name_any()).await;
        }
    }
    let volumes = Api::<Pv>::all(client.clone());
    if let Ok(list) = volumes.list(&ListParams::default()).await {
        for pv in list {
            let ours = pv
                .spec
                .as_ref()
                .and_then(|s| s.csi.as_ref())
                .is_some_and(|c| c.driver == driver);
            if ours {
                strip_and_delete(&volumes, &pv.name_any()).await;
            }
        }
    }
    for (kind, name) in created {
        match kind {
            "storageclass" => {
                let _ = Api::<StorageClass>::all(client.clone())
                    .delete(&name, &DeleteParams::default())
                    .await;
            }
            "csinode" => {
                let _ = Api::<CSINode>::all(client.clone())
                    .delete(&name, &DeleteParams::default())
                    .await;
            }
            _ => {}
        }
    }
    let _ = Api::<Namespace>::all(client)
        .delete(namespace, &DeleteParams::default())
        .await;
}

// ---------------------------------------------------------------------------------------
// Objects

/// A claim of `class` in the namespace (set on create), `volumeMode: Filesystem`.
pub fn claim(
    name: &str,
    class: &str,
    size: Option<&str>,
    modes: &[&str],
    labels: &[(&str, &str)],
) -> Pvc {
    let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
    let mut spec = json!({
        "storageClassName": class,
        "volumeMode": "Filesystem",
        "resources": {"requests": {}},
    });
    if let Some(size) = size {
        spec["resources"]["requests"]["storage"] = json!(size);
    }
    if !modes.is_empty() {
        spec["accessModes"] = json!(modes);
    }
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "spec": spec,
    }))
    .unwrap()
}

/// A 1Gi ReadWriteOnce claim.
pub fn simple_claim(name: &str, class: &str) -> Pvc {
    claim(name, class, Some("1Gi"), &["ReadWriteOnce"], &[])
}

pub fn phase_of_claim(claim: &Pvc) -> Option<&str> {
    claim.status.as_ref().and_then(|s| s.phase.as_deref())
}

pub fn phase_of_pv(pv: &Pv) -> Option<&str> {
    pv.status.as_ref().and_then(|s| s.phase.as_deref())
}

pub fn volume_name(claim: &Pvc) -> Option<&str> {
    claim.spec.as_ref().and_then(|s| s.volume_name.as_deref())
}

pub fn describe_claim(claim: &Pvc) -> String {
    format!(
        "claim {} uid={} rv={} phase={:?} volumeName={:?} finalizers={:?} deleting={} annotations={:?}",
        claim.name_any(),
        claim.uid().unwrap_or_default(),
        claim.resource_version().unwrap_or_default(),
        phase_of_claim(claim),
        volume_name(claim),
        claim.finalizers(),
        claim.metadata.deletion_timestamp.is_some(),
        claim.annotations(),
    )
}

pub fn describe_pv(pv: &Pv) -> String {
    let spec = pv.spec.clone().unwrap_or_default();
    format!(
        "PV {} phase={:?} claim={:?} reclaim={:?} finalizers={:?} deleting={}",
        pv.name_any(),
        phase_of_pv(pv),
        spec.claim_ref
            .as_ref()
            .map(|c| format!("{:?}/{:?}", c.namespace, c.name)),
        spec.persistent_volume_reclaim_policy,
        pv.finalizers(),
        pv.metadata.deletion_timestamp.is_some(),
    )
}

pub fn describe_pv_opt(pv: &Option<Pv>) -> String {
    pv.as_ref().map_or_else(|| "no PV".to_owned(), describe_pv)
}

pub fn describe_events(events: &[Event]) -> String {
    if events.is_empty() {
        return "no events".to_owned();
    }
    events
        .iter()
        .map(|e| {
            format!(
                "event {:?} {:?}: {:?}",
                e.type_.as_deref().unwrap_or_default(),
                e.reason.as_deref().unwrap_or_default(),
                e.note.as_deref().unwrap_or_default()
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

// ---------------------------------------------------------------------------------------
// The stowage process

/// A `stowage local` child process (CSI server, embedded NFS server and the loops),
/// killed on drop. Its stderr (the logs) is kept and printed when a test fails.
pub struct Stowage {
    child: Child,
    pub label: String,
    pub data: PathBuf,
    pub socket: PathBuf,
    pub http: SocketAddr,
    log: Arc<Mutex<VecDeque<String>>>,
}

const LOG_LINES: usize = 400;

impl Stowage {
    /// Start `stowage local` against `cluster` in `<cluster dir>/<label>`, with short
    /// retry intervals (unless `extra` sets them) and `extra` flags.
    pub async fn start(cluster: &Cluster, label: &str, extra: &[&str]) -> Stowage {
        Self::start_with_env(cluster, label, extra, &[]).await
    }

    pub async fn start_with_env(
        cluster: &Cluster,
        label: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Stowage {
        let data = cluster.dir.path().join(label).join("data");
        Self::start_with_data(cluster, label, &data, extra, env).await
    }

    /// Like [`Self::start_with_env`], with the data directory `data` (which may be
    /// another instance's: a restart after a crash).
    pub async fn start_with_data(
        cluster: &Cluster,
        label: &str,
        data: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Stowage {
        let dir = cluster.dir.path().join(label);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("csi.sock");
        let data = data.to_path_buf();
        let mut command = Command::new(env!("CARGO_BIN_EXE_stowage"));
        command
            .arg("local")
            .args(["--kubeconfig", cluster.kubeconfig.to_str().unwrap()])
            .args(["--endpoint", &format!("unix://{}", socket.display())])
            .args(["--http-addr", "127.0.0.1:0"])
            .args(["--driver-name", &cluster.driver])
            .args(extra)
            .env("RUST_LOG", "info,stowage=debug,nfs3_server=off")
            .env("NO_COLOR", "1")
            .env_remove("KUBECONFIG")
            .env_remove("POD_NAME")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // The embedded NFS server's directory, when NFS is served by it (stowage
        // refuses the flag otherwise: another backend, or an export of one's own).
        let backend = extra
            .iter()
            .position(|a| *a == "--backend")
            .and_then(|i| extra.get(i + 1));
        if backend.is_none_or(|b| b.split(',').any(|kind| kind == "nfs"))
            && !extra.contains(&"--nfs-server")
        {
            command.args(["--data-dir", data.to_str().unwrap()]);
        }
        // Defaults that `extra` may override.
        for (flag, value) in [
            ("--retry-interval-start", "100ms"),
            ("--retry-interval-max", "1s"),
            ("--shutdown-grace", "1s"),
        ] {
            if !extra.contains(&flag) {
                command.args([flag, value]);
            }
        }
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("starting stowage");
        let log = Arc::new(Mutex::new(VecDeque::new()));
        let stderr = child.stderr.take().unwrap();
        let tail = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut tail = tail.lock().unwrap();
                if tail.len() == LOG_LINES {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        });
        let (lines_tx, lines_rx) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // Once nobody listens, keep draining so stowage never blocks on stdout.
                let _ = lines_tx.send(line);
            }
        });
        let mut stowage = Stowage {
            child,
            label: label.to_owned(),
            data,
            socket,
            http: "127.0.0.1:1".parse().unwrap(),
            log,
        };
        let started = Instant::now();
        loop {
            while let Ok(line) = lines_rx.try_recv() {
                if let Some(rest) = line.strip_prefix("stowage local: metrics on http://") {
                    stowage.http = rest.trim_end_matches("/metrics").parse().unwrap();
                    return stowage;
                }
            }
            if let Ok(Some(status)) = stowage.child.try_wait() {
                panic!(
                    "stowage {label} exited before serving ({status}):\n{}",
                    stowage.log()
                );
            }
            assert!(
                started.elapsed() < deadline(),
                "stowage {label} did not print its metrics address:\n{}",
                stowage.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The last lines of its log.
    pub fn log(&self) -> String {
        let tail = self.log.lock().unwrap();
        tail.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// SIGTERM, and wait (at most [`deadline`]) for a clean exit.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                start.elapsed() < deadline(),
                "{} did not exit after SIGTERM",
                self.label
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// GET `path` on its --http-addr.
    pub async fn http_get(&self, path: &str) -> Result<String, String> {
        let mut stream = tokio::net::TcpStream::connect(self.http)
            .await
            .map_err(|e| format!("connecting to {}: {e}", self.http))?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: stowage\r\nConnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut body = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut body))
            .await
            .map_err(|_| format!("GET {path} timed out"))?
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&body).into_owned();
        match text.split_once("\r\n\r\n") {
            Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_owned()),
            _ => Err(format!("GET {path}: {text}")),
        }
    }

    pub async fn metrics(&self) -> String {
        self.http_get("/metrics")
            .await
            .unwrap_or_else(|e| panic!("stowage {} /metrics: {e}", self.label))
    }

    /// The volume directories in the data dir (its top-level entries but stowage's
    /// `.stowage` records), sorted.
    pub fn volume_dirs(&self) -> Vec<String> {
        volume_dirs(&self.data)
    }
}

impl Drop for Stowage {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "---- stowage {} log (last {LOG_LINES} lines) ----\n{}\n---- end of stowage {} log ----",
                self.label,
                self.log(),
                self.label
            );
        }
    }
}

/// Top-level entries of a data dir except `.stowage`, sorted.
pub fn volume_dirs(data: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(data) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with(".stowage"))
        .collect();
    names.sort();
    names
}

/// The value of a metric sample: `name` with every label in `labels` (others free),
/// summed over matching series; `None` when there is none.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (series_name, series_labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if series_name != name {
            continue;
        }
        let have: Vec<(&str, &str)> = series_labels
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k, v.trim_matches('"')))
            .collect();
        if labels.iter().all(|l| have.contains(l)) {
            let value: f64 = value.parse().unwrap_or(f64::NAN);
            *found.get_or_insert(0.0) += value;
        }
    }
    found
}
