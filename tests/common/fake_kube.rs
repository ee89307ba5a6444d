//! An in-process fake of the Kubernetes API server for integration tests.
//!
//! It speaks the real HTTP/JSON API on `http://127.0.0.1:<random port>` (no TLS, any
//! `Authorization` accepted), so an unmodified `kube::Client`, `Api<K>`, and
//! kube-runtime watchers/reflectors work against it.
//!
//! What it does, like the real apiserver:
//! - Generic storage for a fixed table of built-in resources ([`RESOURCES`]), namespaced
//!   and cluster-scoped URL forms, cluster-wide list/watch of namespaced resources.
//!   Unknown paths answer a 404 `Status`.
//! - One global `resourceVersion` counter bumped by every write; `uid`,
//!   `creationTimestamp`, `generateName`; 409 AlreadyExists / 422 Invalid (no name) /
//!   400 BadRequest (namespace mismatch) / 500 (resourceVersion set on create).
//! - Create resets `status` where the real strategy does (PVC, PV and pod phase
//!   `Pending`, namespace phase `Active`, empty for VolumeAttachment and StatefulSet).
//! - get / list (label selectors `=`, `==`, `!=`, `k`, `!k`, `in`, `notin`; field selectors
//!   `metadata.name`, `metadata.namespace` and a few per-resource fields) / watch.
//! - Watch: newline-delimited JSON events; a bounded history ([`HISTORY`] events) replays
//!   events after an older `resourceVersion`, older than the history → `ERROR` 410
//!   Expired. `resourceVersion` absent or `"0"` → ADDED for current objects first;
//!   `sendInitialEvents=true` adds the `k8s.io/initial-events-end` BOOKMARK once
//!   [`FakeKube::stream_lists`] is on, else is refused (ERROR 500, as a real API server
//!   on an etcd without RequestWatchProgress). Objects that
//!   stop/start matching a selector are sent as DELETED/ADDED. `timeoutSeconds` ends the
//!   stream; with `allowWatchBookmarks` a BOOKMARK is sent every second. A watcher that
//!   lags behind the fan-out has its stream ended (never silently loses events).
//!   [`FakeKube::lag_watches`] delays one resource's events to the code under test;
//!   [`FakeKube::compact`] expires every watch (410 on the re-watch, then a relist).
//! - update: optimistic concurrency on `metadata.resourceVersion` (empty = unconditional),
//!   409 Conflict with the real message; a no-op update writes nothing (no new
//!   resourceVersion, no event). `uid` (422 if changed), `creationTimestamp`,
//!   `deletionTimestamp` are kept from the stored object. Status subresource: PUT/PATCH
//!   on the main resource keep the stored `status`; on `/status` only `status` changes.
//! - patch: `application/merge-patch+json` (RFC 7386), `application/json-patch+json`
//!   (RFC 6902; a failing op, e.g. `test`, → 422). A `metadata.resourceVersion` in the
//!   patched result is a precondition (409), as on the real server.
//! - delete: with finalizers → `deletionTimestamp` + `deletionGracePeriodSeconds: 0`
//!   (MODIFIED), otherwise removed (DELETED, Status Success). Emptying the finalizers of a
//!   deleting object removes it; adding finalizers to it → 422. `preconditions.uid` /
//!   `resourceVersion` in DeleteOptions → 409 on mismatch.
//! - Every error is a metav1 `Status`; every request is counted by (audit verb,
//!   resource[/subresource]); failures can be injected with [`FakeKube::fail_next`].
//! - Minimal discovery: `/api`, `/apis`, `/api/v1`, `/apis/{g}/{v}`, `/version`.
//!
//! Deliberate approximations / omissions:
//! - `application/strategic-merge-patch+json` is applied as a JSON merge patch (after
//!   dropping `$`-directives): lists are replaced, list merge keys are NOT honoured
//!   (e.g. a strategic patch of `metadata.finalizers` replaces the list).
//! - Server-side apply (`application/apply-patch+yaml`) → 415 UnsupportedMediaType.
//! - `dryRun` → 400 (refused rather than silently persisted). DeleteCollection → 405.
//! - list ignores `limit`/`continue` (everything in one page, no continue token) and
//!   `resourceVersion`/`resourceVersionMatch` (always the latest state).
//! - No admission, defaulting or validation beyond the above: objects may be created in
//!   namespaces that do not exist, names are not validated, no `generation`,
//!   `managedFields`, garbage collection (ownerReferences, propagationPolicy ignored),
//!   namespace termination or pod graceful deletion (delete is immediate). Metadata
//!   changes through `/status` are ignored. Core `events` and `events.k8s.io` events are
//!   separate stores. Periodic bookmarks are every second (the real server: ~1/minute).
//! - `total_writes()` counts create/update/patch/delete *requests*, failed ones and the
//!   stand-ins' included; `calls()` leaves the stand-ins' requests (those with
//!   [`STAND_IN_HEADER`]) to `stand_in_calls()`.
//!
//! Clients: [`FakeKube::client`] / [`http_client`] build kube's default client stack
//! without TLS (see there why). That stack retries 429/503/504 by itself, so failures
//! injected with those codes are absorbed by the client and only show in `calls()`.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::Response;
use serde_json::{Map, Value, json};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;

/// Watch events kept for replay from an older resourceVersion.
pub const HISTORY: usize = 10_000;
/// The resourceVersion before the first write (history starts here).
const FIRST_RV: u64 = 100;

/// One served resource type.
pub struct Res {
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    pub status: bool,
    /// Field selectors besides metadata.name / metadata.namespace.
    pub fields: &'static [&'static str],
}

const fn res(
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
    status: bool,
    fields: &'static [&'static str],
) -> Res {
    Res {
        group,
        version,
        plural,
        kind,
        namespaced,
        status,
        fields,
    }
}

const EVENT_FIELDS: &[&str] = &[
    "involvedObject.kind",
    "involvedObject.namespace",
    "involvedObject.name",
    "involvedObject.uid",
    "involvedObject.apiVersion",
    "involvedObject.fieldPath",
    "reason",
    "type",
];

#[rustfmt::skip]
pub const RESOURCES: &[Res] = &[
    res("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", true, true, &[]),
    res("", "v1", "persistentvolumes", "PersistentVolume", false, true, &[]),
    res("", "v1", "nodes", "Node", false, true, &["spec.unschedulable"]),
    res("", "v1", "namespaces", "Namespace", false, false, &["status.phase"]),
    res("", "v1", "events", "Event", true, false, EVENT_FIELDS),
    res("", "v1", "secrets", "Secret", true, false, &["type"]),
    res("", "v1", "pods", "Pod", true, true, &["spec.nodeName", "status.phase"]),
    res("storage.k8s.io", "v1", "storageclasses", "StorageClass", false, false, &[]),
    res("storage.k8s.io", "v1", "volumeattachments", "VolumeAttachment", false, true, &[]),
    res("storage.k8s.io", "v1", "csinodes", "CSINode", false, false, &[]),
    res("storage.k8s.io", "v1", "csidrivers", "CSIDriver", false, false, &[]),
    res("coordination.k8s.io", "v1", "leases", "Lease", true, false, &[]),
    res("events.k8s.io", "v1", "events", "Event", true, false, &["reason", "type"]),
    res("apps", "v1", "statefulsets", "StatefulSet", true, true, &[]),
    res("storage.k8s.io", "v1", "volumeattributesclasses", "VolumeAttributesClass", false, false, &[]),
    res("snapshot.storage.k8s.io", "v1", "volumesnapshots", "VolumeSnapshot", true, true, &[]),
    res("snapshot.storage.k8s.io", "v1", "volumesnapshotcontents", "VolumeSnapshotContent", false, true, &[]),
    res("snapshot.storage.k8s.io", "v1", "volumesnapshotclasses", "VolumeSnapshotClass", false, false, &[]),
];

impl Res {
    fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
    /// `status` a create leaves (None: keep the body's), like the real strategies.
    fn create_status(&self) -> Option<Value> {
        match (self.group, self.plural) {
            ("", "persistentvolumeclaims" | "persistentvolumes" | "pods") => {
                Some(json!({"phase": "Pending"}))
            }
            ("", "namespaces") => Some(json!({"phase": "Active"})),
            (_, "volumeattachments") => Some(json!({})),
            (_, "statefulsets") => Some(json!({"replicas": 0, "availableReplicas": 0})),
            _ => None,
        }
    }
}

/// An API error, answered as a metav1 Status.
pub struct ApiErr {
    code: u16,
    reason: String,
    message: String,
    details: Value,
}

fn err(code: u16, reason: &str, message: impl Into<String>) -> ApiErr {
    ApiErr {
        code,
        reason: reason.into(),
        message: message.into(),
        details: json!({}),
    }
}

impl ApiErr {
    fn details(mut self, d: Value) -> Self {
        self.details = d;
        self
    }
    fn body(&self) -> Value {
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": self.message, "reason": self.reason, "details": self.details,
               "code": self.code})
    }
}

fn named(r: &Res, name: &str) -> Value {
    let mut d = json!({"name": name, "kind": r.plural});
    if !r.group.is_empty() {
        d["group"] = json!(r.group);
    }
    d
}
fn not_found(r: &Res, name: &str) -> ApiErr {
    err(
        404,
        "NotFound",
        format!("{} \"{name}\" not found", qualified(r)),
    )
    .details(named(r, name))
}
fn conflict(r: &Res, name: &str, why: &str) -> ApiErr {
    let msg = format!(
        "Operation cannot be fulfilled on {} \"{name}\": {why}",
        qualified(r)
    );
    err(409, "Conflict", msg).details(named(r, name))
}
const MODIFIED_MSG: &str =
    "the object has been modified; please apply your changes to the latest version and try again";
fn invalid(r: &Res, name: &str, field: &str, cause: &str, detail: &str) -> ApiErr {
    let msg = format!("{} \"{name}\" is invalid: {field}: {detail}", r.kind);
    let mut d = json!({"name": name, "kind": r.kind,
                       "causes": [{"reason": cause, "message": detail, "field": field}]});
    if !r.group.is_empty() {
        d["group"] = json!(r.group);
    }
    err(422, "Invalid", msg).details(d)
}
fn bad_request(msg: impl Into<String>) -> ApiErr {
    err(400, "BadRequest", msg)
}
fn no_route() -> ApiErr {
    err(
        404,
        "NotFound",
        "the server could not find the requested resource",
    )
}
/// `plural` or `plural.group`, as the real server names a resource in messages.
fn qualified(r: &Res) -> String {
    if r.group.is_empty() {
        r.plural.to_string()
    } else {
        format!("{}.{}", r.plural, r.group)
    }
}

type Key = (String, String); // (namespace or "", name)

struct Ev {
    rv: u64,
    res: usize,
    ty: &'static str,
    obj: Arc<Value>,
    prev: Option<Arc<Value>>,
    /// When the write happened (a lagging watch delivers it relative to this).
    at: tokio::time::Instant,
}

#[derive(Clone)]
enum Msg {
    Ev(Arc<Ev>),
    Bookmark(u64),
    Break,
}

struct Fault {
    verb: String,
    resource: String,
    left: usize,
    code: u16,
    reason: String,
}

struct Store {
    rv: u64,
    objects: Vec<BTreeMap<Key, Arc<Value>>>,
    history: VecDeque<Arc<Ev>>,
    /// Events up to this resourceVersion are no longer in `history`.
    evicted_rv: u64,
    calls: BTreeMap<(String, String), u64>,
    /// Requests of the stand-ins for kube-controller-manager and the kubelet
    /// (header [`STAND_IN_HEADER`]), kept apart from `calls`.
    stand_in_calls: BTreeMap<(String, String), u64>,
    /// Write requests per object: (plural, name) → (by others, by stand-ins).
    object_writes: BTreeMap<(String, String), (u64, u64)>,
    faults: Vec<Fault>,
    /// Per resource (plural): how late events reach the watches of the code under test.
    watch_lag: BTreeMap<String, Duration>,
    /// Whether watches with `sendInitialEvents` are served (see [`FakeKube::stream_lists`]).
    stream_lists: bool,
    closed: bool,
}

struct Shared {
    store: Mutex<Store>,
    tx: broadcast::Sender<Msg>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The fake apiserver; see the module docs.
pub struct FakeKube {
    shared: Arc<Shared>,
    url: String,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
    ticker: JoinHandle<()>,
}

impl FakeKube {
    /// Binds 127.0.0.1:0 and serves in a tokio task.
    pub async fn start() -> FakeKube {
        let (tx, _) = broadcast::channel(1 << 16);
        let shared = Arc::new(Shared {
            store: Mutex::new(Store {
                rv: FIRST_RV,
                objects: RESOURCES.iter().map(|_| BTreeMap::new()).collect(),
                history: VecDeque::new(),
                evicted_rv: FIRST_RV,
                calls: BTreeMap::new(),
                stand_in_calls: BTreeMap::new(),
                object_writes: BTreeMap::new(),
                faults: Vec::new(),
                watch_lag: BTreeMap::new(),
                stream_lists: false,
                closed: false,
            }),
            tx,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(shared.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
        });
        let sh = shared.clone();
        let ticker = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let st = sh.lock();
                if sh.tx.receiver_count() > 0 {
                    let _ = sh.tx.send(Msg::Bookmark(st.rv));
                }
            }
        });
        FakeKube {
            shared,
            url,
            stop: Some(stop),
            server: Some(server),
            ticker,
        }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// A kube client for [`Self::url`] (`kube::Config::new`, namespace `default`); see
    /// [`http_client`].
    pub fn client(&self) -> kube::Client {
        http_client(kube::Config::new(self.url.parse().unwrap()))
    }

    /// Writes a kubeconfig (JSON, which kube reads as YAML) pointing at this server.
    pub fn write_kubeconfig(&self, path: &std::path::Path) {
        write_kubeconfig(path, &self.url);
    }

    /// Requests of the stand-ins ([`crate::common::stand_ins`]) by (verb, resource).
    pub fn stand_in_calls(&self) -> BTreeMap<(String, String), u64> {
        self.shared.lock().stand_in_calls.clone()
    }

    /// Update/patch/delete requests to one object (main resource and subresources):
    /// (by everyone but the stand-ins, by the stand-ins).
    pub fn writes_to(&self, plural: &str, name: &str) -> (u64, u64) {
        self.shared
            .lock()
            .object_writes
            .get(&(plural.to_owned(), name.to_owned()))
            .copied()
            .unwrap_or_default()
    }

    /// Requests so far by (audit verb, resource[/subresource]), the stand-ins' apart.
    pub fn calls(&self) -> BTreeMap<(String, String), u64> {
        self.shared.lock().calls.clone()
    }

    /// Requests of one verb and resource so far (`"patch"`, `"persistentvolumes/status"`).
    pub fn calls_of(&self, verb: &str, resource: &str) -> u64 {
        self.shared
            .lock()
            .calls
            .get(&(verb.to_owned(), resource.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    /// create + update + patch + delete requests (failed ones included).
    pub fn total_writes(&self) -> u64 {
        let st = self.shared.lock();
        let writes = ["create", "update", "patch", "delete"];
        st.calls
            .iter()
            .chain(&st.stand_in_calls)
            .filter(|((v, _), _)| writes.contains(&v.as_str()))
            .map(|(_, n)| n)
            .sum()
    }

    /// The next `times` requests with this verb and resource (e.g. `update`,
    /// `persistentvolumeclaims/status`) fail with a Status of `code`/`reason`, unprocessed.
    pub fn fail_next(&self, verb: &str, resource: &str, times: usize, code: u16, reason: &str) {
        if times == 0 {
            return;
        }
        self.shared.lock().faults.push(Fault {
            verb: verb.into(),
            resource: resource.into(),
            left: times,
            code,
            reason: reason.into(),
        });
    }

    /// Forget every fault not fired yet.
    pub fn clear_faults(&self) {
        self.shared.lock().faults.clear();
    }

    /// Watches of `resource` (plural) that the code under test opens from now on get
    /// each event `lag` after it happened, as from a busy API server or informer: one
    /// resource's cache behind another's, which no ordering across watches rules out.
    /// Lists and the stand-ins' watches are not delayed.
    pub fn lag_watches(&self, resource: &str, lag: Duration) {
        assert!(
            RESOURCES.iter().any(|r| r.plural == resource),
            "fake apiserver has no resource {resource}"
        );
        self.shared
            .lock()
            .watch_lag
            .insert(resource.to_owned(), lag);
    }

    /// Watch streams open right now.
    pub fn open_watches(&self) -> usize {
        self.shared.tx.receiver_count()
    }

    /// Ends every open watch stream; clients must re-watch.
    pub fn break_watches(&self) {
        let _st = self.shared.lock();
        let _ = self.shared.tx.send(Msg::Break);
    }

    /// Serve streamed lists (`sendInitialEvents=true`), as an API server whose storage
    /// has RequestWatchProgress (etcd 3.5+ with the WatchList feature) does. Off by
    /// default: such a watch then gets the ERROR event the e2e cluster's API server
    /// sends (its etcd lacks the feature), and clients list in pages.
    pub fn stream_lists(&self) {
        self.shared.lock().stream_lists = true;
    }

    /// Compacts the watch history as etcd compaction does, and ends every open watch:
    /// each client's re-watch from its last resourceVersion is answered 410 Expired, so
    /// it lists again (what a real compaction, or a long disconnect, makes it do).
    pub fn compact(&self) {
        {
            let mut st = self.shared.lock();
            st.rv += 1;
            st.evicted_rv = st.rv;
            st.history.clear();
        }
        self.break_watches();
    }

    /// Current objects of a resource (`plural`, or `plural.group` e.g.
    /// `events.events.k8s.io`), all namespaces, ordered by namespace/name.
    pub fn objects(&self, resource: &str) -> Vec<Value> {
        let i = RESOURCES
            .iter()
            .position(|r| r.plural == resource || format!("{}.{}", r.plural, r.group) == resource)
            .unwrap_or_else(|| panic!("fake apiserver has no resource {resource}"));
        self.shared.lock().objects[i]
            .values()
            .map(|o| (**o).clone())
            .collect()
    }

    /// Ends watches and stops serving.
    pub async fn shutdown(mut self) {
        self.stop_now();
        if let Some(mut server) = self.server.take()
            && tokio::time::timeout(Duration::from_secs(5), &mut server)
                .await
                .is_err()
        {
            server.abort();
        }
    }

    fn stop_now(&mut self) {
        {
            let mut st = self.shared.lock();
            st.closed = true;
            let _ = self.shared.tx.send(Msg::Break);
        }
        self.ticker.abort();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.stop_now();
    }
}

/// A `kube::Client` for a plain-`http://` `config` with kube's default stack minus TLS:
/// base URI, auth (e.g. a kubeconfig token) and the default retry of 429/503/504.
///
/// Not `Client::try_from(config)`: that builds a rustls config even for `http://`, which
/// panics in this crate (rustls has both the ring and aws-lc-rs providers compiled in and
/// no process default is installed).
/// A kubeconfig at `path` for the API server at `url` (plain HTTP, a bearer token).
pub fn write_kubeconfig(path: &std::path::Path, url: &str) {
    let config = json!({
        "apiVersion": "v1", "kind": "Config", "preferences": {},
        "clusters": [{"name": "fake", "cluster": {"server": url}}],
        "users": [{"name": "fake", "user": {"token": "fake-token"}}],
        "contexts": [{"name": "fake",
                      "context": {"cluster": "fake", "user": "fake", "namespace": "default"}}],
        "current-context": "fake",
    });
    std::fs::write(path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
}

pub fn http_client(config: kube::Config) -> kube::Client {
    http_client_as(config, false)
}

/// The request header that marks a stand-in's request (counted apart).
pub const STAND_IN_HEADER: &str = "x-stowage-test-stand-in";

/// [`http_client`], its requests marked as a stand-in's when `stand_in`.
pub fn http_client_as(config: kube::Config, stand_in: bool) -> kube::Client {
    use kube::client::ConfigExt;
    type BoxError = Box<dyn std::error::Error + Send + Sync>;
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<kube::client::Body>();
    let service = tower::ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .layer(tower::retry::RetryLayer::new(
            kube::client::retry::RetryPolicy::server_retry(),
        ))
        .option_layer(config.auth_layer().unwrap())
        .map_request(move |mut request: http::Request<kube::client::Body>| {
            if stand_in {
                request
                    .headers_mut()
                    .insert(STAND_IN_HEADER, http::HeaderValue::from_static("1"));
            }
            request
        })
        .map_err(|e| Box::new(e) as BoxError)
        .service(http);
    kube::Client::new(service, config.default_namespace)
}

// ---------------------------------------------------------------------------------------
// HTTP

fn json_response(code: u16, v: &impl serde::Serialize) -> Response {
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(serde_json::to_vec(v).unwrap()))
        .unwrap()
}

fn error_response(e: &ApiErr) -> Response {
    json_response(e.code, &e.body())
}

fn pct_decode(s: &str) -> String {
    let (b, mut out, mut i) = (s.as_bytes(), Vec::with_capacity(s.len()), 0);
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    while i < b.len() {
        match (
            b[i],
            b.get(i + 1).and_then(|&c| hex(c)),
            b.get(i + 2).and_then(|&c| hex(c)),
        ) {
            (b'+', _, _) => out.push(b' '),
            (b'%', Some(h), Some(l)) => {
                out.push(h << 4 | l);
                i += 2;
            }
            (c, _, _) => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

struct Query(Vec<(String, String)>);

impl Query {
    fn parse(q: Option<&str>) -> Query {
        Query(
            q.unwrap_or("")
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    (pct_decode(k), pct_decode(v))
                })
                .collect(),
        )
    }
    fn get(&self, k: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    }
    fn flag(&self, k: &str) -> bool {
        matches!(self.get(k), Some("true" | "1"))
    }
}

enum Route {
    Json(Value),
    Res {
        res: usize,
        ns: Option<String>,
        name: Option<String>,
        status: bool,
    },
}

fn find(group: &str, version: &str, plural: &str) -> Option<usize> {
    RESOURCES
        .iter()
        .position(|r| r.group == group && r.version == version && r.plural == plural)
}

fn route(path: &str) -> Result<Route, ApiErr> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["version"] => {
            return Ok(Route::Json(
                json!({"major": "1", "minor": "34", "gitVersion": "v1.34.0",
                                          "platform": "linux/amd64"}),
            ));
        }
        ["api"] => {
            return Ok(Route::Json(
                json!({"kind": "APIVersions", "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}]}),
            ));
        }
        ["apis"] => return Ok(Route::Json(group_list())),
        ["api", "v1"] => return Ok(Route::Json(resource_list("", "v1"))),
        ["apis", g, v] if RESOURCES.iter().any(|r| r.group == *g && r.version == *v) => {
            return Ok(Route::Json(resource_list(g, v)));
        }
        ["api", "v1", rest @ ..] => ("", "v1", rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Err(no_route()),
    };
    let (res, ns, tail) = match rest {
        ["namespaces", ns, plural, tail @ ..]
            if find(group, version, plural).is_some_and(|i| RESOURCES[i].namespaced) =>
        {
            (
                find(group, version, plural).unwrap(),
                Some(ns.to_string()),
                tail,
            )
        }
        [plural, tail @ ..] => (
            find(group, version, plural).ok_or_else(no_route)?,
            None,
            tail,
        ),
        [] => return Err(no_route()),
    };
    let r = &RESOURCES[res];
    let (name, status) = match tail {
        [] => (None, false),
        [name] => (Some(name.to_string()), false),
        [name, "status"] if r.status => (Some(name.to_string()), true),
        _ => return Err(no_route()),
    };
    if name.is_some() && r.namespaced && ns.is_none() {
        return Err(no_route());
    }
    Ok(Route::Res {
        res,
        ns,
        name,
        status,
    })
}

fn group_list() -> Value {
    let mut groups: Vec<Value> = Vec::new();
    for r in RESOURCES.iter().filter(|r| !r.group.is_empty()) {
        if groups.iter().any(|g| g["name"] == r.group) {
            continue;
        }
        let gv = json!({"groupVersion": r.api_version(), "version": r.version});
        groups.push(json!({"name": r.group, "versions": [gv], "preferredVersion": gv}));
    }
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn resource_list(group: &str, version: &str) -> Value {
    let verbs = [
        "create", "delete", "get", "list", "patch", "update", "watch",
    ];
    let mut resources = Vec::new();
    for r in RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
    {
        resources.push(
            json!({"name": r.plural, "singularName": r.kind.to_lowercase(),
            "namespaced": r.namespaced, "kind": r.kind, "verbs": verbs}),
        );
        if r.status {
            resources.push(
                json!({"name": format!("{}/status", r.plural), "singularName": "",
                "namespaced": r.namespaced, "kind": r.kind, "verbs": ["get", "patch", "update"]}),
            );
        }
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources})
}

async fn handle(
    State(sh): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (res, ns, name, status) = match route(uri.path()) {
        Ok(Route::Json(v)) if method == Method::GET => return json_response(200, &v),
        Ok(Route::Json(_)) => return error_response(&method_not_allowed()),
        Ok(Route::Res {
            res,
            ns,
            name,
            status,
        }) => (res, ns, name, status),
        Err(e) => return error_response(&e),
    };
    let q = Query::parse(uri.query());
    let verb = match (&method, name.is_some()) {
        (&Method::GET, true) => "get",
        (&Method::GET, false) if q.flag("watch") => "watch",
        (&Method::GET, false) => "list",
        (&Method::POST, false) => "create",
        (&Method::PUT, true) => "update",
        (&Method::PATCH, true) => "patch",
        (&Method::DELETE, true) => "delete",
        (&Method::DELETE, false) => "deletecollection",
        _ => return error_response(&method_not_allowed()),
    };
    let r = &RESOURCES[res];
    let resource = if status {
        format!("{}/status", r.plural)
    } else {
        r.plural.to_string()
    };
    let lag;
    {
        let mut st = sh.lock();
        let stand_in = headers.contains_key(STAND_IN_HEADER);
        lag = st
            .watch_lag
            .get(r.plural)
            .filter(|_| !stand_in && verb == "watch")
            .copied();
        let calls = if stand_in {
            &mut st.stand_in_calls
        } else {
            &mut st.calls
        };
        *calls
            .entry((verb.to_string(), resource.clone()))
            .or_default() += 1;
        if let (Some(name), "update" | "patch" | "delete") = (&name, verb) {
            let writes = st
                .object_writes
                .entry((r.plural.to_string(), name.clone()))
                .or_default();
            if stand_in {
                writes.1 += 1;
            } else {
                writes.0 += 1;
            }
        }
        // Injected faults are for the code under test, not the stand-ins.
        if let Some(f) = st
            .faults
            .iter_mut()
            .filter(|_| !stand_in)
            .find(|f| f.left > 0 && f.verb == verb && f.resource == resource)
        {
            f.left -= 1;
            let msg = format!(
                "injected {verb} {resource} failure: {} {}",
                f.code, f.reason
            );
            let mut e = err(f.code, &f.reason, msg);
            if let Some(name) = &name {
                e = e.details(named(r, name));
            }
            st.faults.retain(|f| f.left > 0);
            return error_response(&e);
        }
    }
    let result = match verb {
        "get" | "list" | "watch" => return read(&sh, res, ns, name, &q, verb, lag),
        _ if q.get("dryRun").is_some() => Err(bad_request("dryRun is not supported by the fake")),
        "create" if r.namespaced && ns.is_none() => Err(method_not_allowed()),
        "create" => parse_body(&body).and_then(|obj| create(&sh, res, ns.as_deref(), obj)),
        "update" => parse_body(&body).and_then(|obj| {
            let key = key_of(r, ns.as_deref(), name.as_deref().unwrap());
            update(&sh, res, key, status, obj)
        }),
        "patch" => {
            let key = key_of(r, ns.as_deref(), name.as_deref().unwrap());
            let ctype = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok());
            patch(&sh, res, key, status, ctype.unwrap_or(""), &body)
        }
        "delete" => {
            let key = key_of(r, ns.as_deref(), name.as_deref().unwrap());
            let opts = if body.is_empty() {
                Ok(json!({}))
            } else {
                parse_body(&body)
            };
            opts.and_then(|o| delete(&sh, res, key, &o))
        }
        _ => Err(method_not_allowed()),
    };
    match result {
        Ok((code, v)) => json_response(code, &v),
        Err(e) => error_response(&e),
    }
}

fn method_not_allowed() -> ApiErr {
    err(
        405,
        "MethodNotAllowed",
        "the server does not allow this method on the requested resource",
    )
}

fn parse_body(body: &[u8]) -> Result<Value, ApiErr> {
    match serde_json::from_slice::<Value>(body) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err(bad_request("the body of the request is not a JSON object")),
        Err(e) => Err(bad_request(format!("json parse error: {e}"))),
    }
}

fn key_of(r: &Res, ns: Option<&str>, name: &str) -> Key {
    let ns = if r.namespaced { ns.unwrap_or("") } else { "" };
    (ns.to_string(), name.to_string())
}

// ---------------------------------------------------------------------------------------
// Object helpers

fn meta(obj: &Value, field: &str) -> String {
    obj["metadata"][field].as_str().unwrap_or("").to_string()
}

fn meta_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj["metadata"].is_object() {
        obj["metadata"] = json!({});
    }
    obj["metadata"].as_object_mut().unwrap()
}

fn set_rv(obj: &mut Value, rv: u64) {
    meta_mut(obj).insert("resourceVersion".into(), json!(rv.to_string()));
}

fn set_status(obj: &mut Value, status: Option<Value>) {
    let obj = obj.as_object_mut().unwrap();
    match status {
        Some(s) => obj.insert("status".into(), s),
        None => obj.remove("status"),
    };
}

fn finalizers(obj: &Value) -> Vec<String> {
    obj["metadata"]["finalizers"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|f| f.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn now() -> Value {
    let t =
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now());
    serde_json::to_value(t).unwrap()
}

fn random() -> u64 {
    static N: AtomicU64 = AtomicU64::new(0);
    std::collections::hash_map::RandomState::new().hash_one(N.fetch_add(1, Ordering::Relaxed))
}

fn new_uid() -> String {
    let (a, b) = (random(), random());
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        ((b >> 48) & 0x3fff) | 0x8000,
        b & 0xffff_ffff_ffff
    )
}

fn check_kind(r: &Res, obj: &mut Value) -> Result<(), ApiErr> {
    let av = r.api_version();
    for (field, want) in [("apiVersion", av.as_str()), ("kind", r.kind)] {
        match obj[field].as_str() {
            None | Some("") => obj[field] = json!(want),
            Some(got) if got == want => {}
            Some(got) => {
                return Err(bad_request(format!(
                    "the {field} in the data ({got}) does not match the expected {field} ({want})"
                )));
            }
        }
    }
    Ok(())
}

/// Namespace of a body: filled from the URL, 400 when different, dropped if cluster-scoped.
fn check_namespace(r: &Res, key_ns: &str, obj: &mut Value) -> Result<(), ApiErr> {
    let m = meta_mut(obj);
    if !r.namespaced {
        m.remove("namespace");
        return Ok(());
    }
    match m.get("namespace").and_then(Value::as_str) {
        None | Some("") => {
            m.insert("namespace".into(), json!(key_ns));
        }
        Some(ns) if ns == key_ns => {}
        Some(_) => {
            return Err(bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Writes (all under the store lock)

fn emit(
    sh: &Shared,
    st: &mut Store,
    res: usize,
    ty: &'static str,
    obj: Arc<Value>,
    prev: Option<Arc<Value>>,
) {
    let ev = Arc::new(Ev {
        rv: st.rv,
        res,
        ty,
        obj,
        prev,
        at: tokio::time::Instant::now(),
    });
    st.history.push_back(ev.clone());
    if st.history.len() > HISTORY {
        st.evicted_rv = st.history.pop_front().unwrap().rv;
    }
    let _ = sh.tx.send(Msg::Ev(ev));
}

type Answer = Result<(u16, Value), ApiErr>;

fn create(sh: &Shared, res: usize, ns: Option<&str>, mut obj: Value) -> Answer {
    let r = &RESOURCES[res];
    check_kind(r, &mut obj)?;
    check_namespace(r, ns.unwrap_or(""), &mut obj)?;
    if !meta(&obj, "resourceVersion").is_empty() {
        return Err(err(
            500,
            "InternalError",
            "resourceVersion should not be set on objects to be created",
        ));
    }
    let mut st = sh.lock();
    let mut name = meta(&obj, "name");
    if name.is_empty() {
        let prefix = meta(&obj, "generateName");
        if prefix.is_empty() {
            let detail = "Required value: name or generateName is required";
            return Err(invalid(
                r,
                "",
                "metadata.name",
                "FieldValueRequired",
                detail,
            ));
        }
        const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
        name = loop {
            let mut n = random();
            let mut candidate = prefix.clone();
            for _ in 0..5 {
                candidate.push(ALPHABET[(n % ALPHABET.len() as u64) as usize] as char);
                n /= ALPHABET.len() as u64;
            }
            if !st.objects[res].contains_key(&key_of(r, ns, &candidate)) {
                break candidate;
            }
        };
    }
    let key = key_of(r, ns, &name);
    if st.objects[res].contains_key(&key) {
        let msg = format!("{} \"{name}\" already exists", qualified(r));
        return Err(err(409, "AlreadyExists", msg).details(named(r, &name)));
    }
    if let Some(status) = r.create_status() {
        obj["status"] = status;
    } else if r.status && r.group == "snapshot.storage.k8s.io" {
        // Custom resources with a status subresource drop the status on create.
        obj.as_object_mut().unwrap().remove("status");
    }
    let m = meta_mut(&mut obj);
    m.insert("name".into(), json!(name));
    m.insert("uid".into(), json!(new_uid()));
    m.insert("creationTimestamp".into(), now());
    m.remove("deletionTimestamp");
    m.remove("deletionGracePeriodSeconds");
    st.rv += 1;
    set_rv(&mut obj, st.rv);
    let obj = Arc::new(obj);
    st.objects[res].insert(key, obj.clone());
    emit(sh, &mut st, res, "ADDED", obj.clone(), None);
    Ok((201, (*obj).clone()))
}

/// PUT (and the second half of PATCH): `new` is the full object sent for `key`.
fn update(sh: &Shared, res: usize, key: Key, status: bool, new: Value) -> Answer {
    let mut st = sh.lock();
    update_locked(sh, &mut st, res, key, status, new)
}

fn update_locked(
    sh: &Shared,
    st: &mut Store,
    res: usize,
    key: Key,
    status: bool,
    mut new: Value,
) -> Answer {
    let r = &RESOURCES[res];
    let old = st.objects[res]
        .get(&key)
        .cloned()
        .ok_or_else(|| not_found(r, &key.1))?;
    check_kind(r, &mut new)?;
    check_namespace(r, &key.0, &mut new)?;
    let body_name = meta(&new, "name");
    if body_name != key.1 {
        return Err(bad_request(format!(
            "the name of the object ({body_name}) does not match the name on the URL ({})",
            key.1
        )));
    }
    let (old_rv, body_rv) = (meta(&old, "resourceVersion"), meta(&new, "resourceVersion"));
    if !body_rv.is_empty() && body_rv != old_rv {
        return Err(conflict(r, &key.1, MODIFIED_MSG));
    }
    let uid = meta(&new, "uid");
    if !uid.is_empty() && uid != meta(&old, "uid") {
        let detail = format!("Invalid value: \"{uid}\": field is immutable");
        return Err(invalid(
            r,
            &key.1,
            "metadata.uid",
            "FieldValueInvalid",
            &detail,
        ));
    }
    if status {
        let s = new.get("status").cloned();
        new = (*old).clone();
        set_status(&mut new, s);
    } else if r.status {
        set_status(&mut new, old.get("status").cloned());
    }
    let m = meta_mut(&mut new);
    for f in [
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
    ] {
        match old["metadata"].get(f) {
            Some(v) => m.insert(f.into(), v.clone()),
            None => m.remove(f),
        };
    }
    m.insert("resourceVersion".into(), json!(old_rv));
    let deleting = old["metadata"].get("deletionTimestamp").is_some();
    if deleting {
        let before = finalizers(&old);
        let added: Vec<String> = finalizers(&new)
            .into_iter()
            .filter(|f| !before.contains(f))
            .collect();
        if !added.is_empty() {
            let detail = format!(
                "Forbidden: no new finalizers can be added if the object is being deleted, found new finalizers {added:?}"
            );
            return Err(invalid(
                r,
                &key.1,
                "metadata.finalizers",
                "FieldValueForbidden",
                &detail,
            ));
        }
    }
    if new == *old {
        return Ok((200, new)); // no-op: nothing written, like the real server
    }
    st.rv += 1;
    if deleting && finalizers(&new).is_empty() {
        st.objects[res].remove(&key);
        let mut gone = (*old).clone();
        set_rv(&mut gone, st.rv);
        let gone = Arc::new(gone);
        emit(sh, st, res, "DELETED", gone.clone(), None);
        return Ok((200, (*gone).clone()));
    }
    set_rv(&mut new, st.rv);
    let new = Arc::new(new);
    st.objects[res].insert(key, new.clone());
    emit(sh, st, res, "MODIFIED", new.clone(), Some(old));
    Ok((200, (*new).clone()))
}

fn strip_directives(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|k, _| !k.starts_with('$'));
            m.values_mut().for_each(strip_directives);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_directives),
        _ => {}
    }
}

fn patch(sh: &Shared, res: usize, key: Key, status: bool, ctype: &str, body: &[u8]) -> Answer {
    let r = &RESOURCES[res];
    let ctype = ctype.split(';').next().unwrap_or("").trim();
    let p: Value = match ctype {
        "application/merge-patch+json"
        | "application/json-patch+json"
        | "application/strategic-merge-patch+json" => serde_json::from_slice(body)
            .map_err(|e| bad_request(format!("error decoding patch: {e}")))?,
        _ => {
            return Err(err(
                415,
                "UnsupportedMediaType",
                format!(
                    "the body of the request was in an unknown format - accepted media types include: \
                     application/json-patch+json, application/merge-patch+json, \
                     application/strategic-merge-patch+json (got {ctype:?}; the fake has no server-side apply)"
                ),
            ));
        }
    };
    let mut st = sh.lock();
    let old = st.objects[res]
        .get(&key)
        .cloned()
        .ok_or_else(|| not_found(r, &key.1))?;
    let mut doc = (*old).clone();
    match ctype {
        "application/json-patch+json" => {
            let ops: json_patch::Patch =
                serde_json::from_value(p).map_err(|e| bad_request(e.to_string()))?;
            json_patch::patch(&mut doc, &ops).map_err(|e| err(422, "Invalid", e.to_string()))?;
        }
        "application/strategic-merge-patch+json" => {
            let mut p = p;
            strip_directives(&mut p);
            json_patch::merge(&mut doc, &p);
        }
        _ => json_patch::merge(&mut doc, &p),
    }
    update_locked(sh, &mut st, res, key, status, doc)
}

fn delete(sh: &Shared, res: usize, key: Key, opts: &Value) -> Answer {
    let r = &RESOURCES[res];
    if opts["dryRun"].as_array().is_some_and(|a| !a.is_empty()) {
        return Err(bad_request("dryRun is not supported by the fake"));
    }
    let mut st = sh.lock();
    let old = st.objects[res]
        .get(&key)
        .cloned()
        .ok_or_else(|| not_found(r, &key.1))?;
    for (field, label) in [("uid", "UID"), ("resourceVersion", "ResourceVersion")] {
        if let Some(want) = opts["preconditions"][field].as_str() {
            let have = meta(&old, field);
            if want != have {
                let why = format!(
                    "Precondition failed: {label} in precondition: {want}, {label} in object meta: {have}"
                );
                return Err(conflict(r, &key.1, &why));
            }
        }
    }
    if !finalizers(&old).is_empty() {
        if old["metadata"].get("deletionTimestamp").is_some() {
            return Ok((200, (*old).clone()));
        }
        let mut new = (*old).clone();
        let m = meta_mut(&mut new);
        m.insert("deletionTimestamp".into(), now());
        m.insert("deletionGracePeriodSeconds".into(), json!(0));
        st.rv += 1;
        set_rv(&mut new, st.rv);
        let new = Arc::new(new);
        st.objects[res].insert(key, new.clone());
        emit(sh, &mut st, res, "MODIFIED", new.clone(), Some(old));
        return Ok((200, (*new).clone()));
    }
    st.objects[res].remove(&key);
    st.rv += 1;
    let mut gone = (*old).clone();
    set_rv(&mut gone, st.rv);
    emit(sh, &mut st, res, "DELETED", Arc::new(gone), None);
    let mut details = named(r, &key.1);
    details["uid"] = json!(meta(&old, "uid"));
    Ok((
        200,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                    "details": details}),
    ))
}

// ---------------------------------------------------------------------------------------
// Reads: get, list, watch

enum Req {
    Eq(String, String),
    Ne(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

fn parse_labels(s: &str) -> Result<Vec<Req>, ApiErr> {
    let bad = |t: &str| {
        bad_request(format!(
            "unable to parse requirement: invalid label selector {t:?}"
        ))
    };
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&s[start..]);
    let mut reqs = Vec::new();
    for t in terms.into_iter().map(str::trim).filter(|t| !t.is_empty()) {
        let req = if let Some((left, vals)) = t.split_once('(') {
            let vals: Vec<String> = vals
                .strip_suffix(')')
                .ok_or_else(|| bad(t))?
                .split(',')
                .map(|v| v.trim().to_string())
                .collect();
            match left.split_whitespace().collect::<Vec<_>>().as_slice() {
                [k, "in"] => Req::In(k.to_string(), vals),
                [k, "notin"] => Req::NotIn(k.to_string(), vals),
                _ => return Err(bad(t)),
            }
        } else if let Some((k, v)) = t.split_once("!=") {
            Req::Ne(k.trim().into(), v.trim().into())
        } else if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
            Req::Eq(k.trim().into(), v.trim().into())
        } else if let Some(k) = t.strip_prefix('!') {
            Req::NotExists(k.trim().into())
        } else {
            Req::Exists(t.into())
        };
        let key = match &req {
            Req::Eq(k, _) | Req::Ne(k, _) | Req::In(k, _) | Req::NotIn(k, _) => k,
            Req::Exists(k) | Req::NotExists(k) => k,
        };
        if key.is_empty() || key.contains(char::is_whitespace) {
            return Err(bad(t));
        }
        reqs.push(req);
    }
    Ok(reqs)
}

/// What a list or watch selects.
struct Filter {
    res: usize,
    ns: Option<String>,
    labels: Vec<Req>,
    /// (path, equal?, value)
    fields: Vec<(String, bool, String)>,
}

impl Filter {
    fn new(res: usize, ns: Option<String>, q: &Query) -> Result<Filter, ApiErr> {
        let r = &RESOURCES[res];
        let labels = parse_labels(q.get("labelSelector").unwrap_or(""))?;
        let mut fields = Vec::new();
        for t in q
            .get("fieldSelector")
            .unwrap_or("")
            .split(',')
            .map(str::trim)
        {
            if t.is_empty() {
                continue;
            }
            let (path, eq, value) = if let Some((p, v)) = t.split_once("!=") {
                (p, false, v)
            } else if let Some((p, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
                (p, true, v)
            } else {
                return Err(bad_request(format!(
                    "invalid selector: '{t}'; can't understand '{t}'"
                )));
            };
            let path = path.trim();
            if !["metadata.name", "metadata.namespace"].contains(&path) && !r.fields.contains(&path)
            {
                return Err(bad_request(format!("field label not supported: {path}")));
            }
            fields.push((path.to_string(), eq, value.trim().to_string()));
        }
        Ok(Filter {
            res,
            ns,
            labels,
            fields,
        })
    }

    fn matches(&self, obj: &Value) -> bool {
        if let Some(ns) = &self.ns
            && obj["metadata"]["namespace"].as_str().unwrap_or("") != ns
        {
            return false;
        }
        let labels = &obj["metadata"]["labels"];
        let label = |k: &str| labels.get(k).and_then(Value::as_str);
        let labels_ok = self.labels.iter().all(|req| match req {
            Req::Eq(k, v) => label(k) == Some(v),
            Req::Ne(k, v) => label(k) != Some(v),
            Req::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            Req::NotIn(k, vs) => label(k).is_none_or(|l| !vs.iter().any(|v| v == l)),
            Req::Exists(k) => label(k).is_some(),
            Req::NotExists(k) => label(k).is_none(),
        });
        labels_ok
            && self.fields.iter().all(|(path, eq, want)| {
                let v = path.split('.').fold(obj, |v, seg| &v[seg]);
                let have = match v {
                    Value::String(s) => s.clone(),
                    Value::Null => String::new(),
                    other => other.to_string(),
                };
                (have == *want) == *eq
            })
    }

    /// The watch line this watcher gets for `ev`, if any.
    fn line(&self, ev: &Ev) -> Option<Bytes> {
        if ev.res != self.res {
            return None;
        }
        let now = self.matches(&ev.obj);
        let before = ev.prev.as_deref().is_some_and(|p| self.matches(p));
        match (ev.ty, before, now) {
            ("MODIFIED", true, false) => {
                // left the selection: DELETED with the previous content at the event's RV
                let mut prev = (**ev.prev.as_ref().unwrap()).clone();
                set_rv(&mut prev, ev.rv);
                Some(event_line("DELETED", &prev))
            }
            ("MODIFIED", false, true) => Some(event_line("ADDED", &ev.obj)),
            (ty, _, true) => Some(event_line(ty, &ev.obj)),
            _ => None,
        }
    }
}

#[derive(serde::Serialize)]
struct Line<'a> {
    #[serde(rename = "type")]
    ty: &'a str,
    object: &'a Value,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct List<'a> {
    kind: String,
    api_version: String,
    metadata: Value,
    items: Vec<&'a Value>,
}

fn event_line(ty: &str, object: &Value) -> Bytes {
    let mut v = serde_json::to_vec(&Line { ty, object }).unwrap();
    v.push(b'\n');
    Bytes::from(v)
}

fn bookmark(r: &Res, rv: u64, initial_end: bool) -> Bytes {
    let mut m = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        m["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    event_line(
        "BOOKMARK",
        &json!({"kind": r.kind, "apiVersion": r.api_version(), "metadata": m}),
    )
}

fn read(
    sh: &Arc<Shared>,
    res: usize,
    ns: Option<String>,
    name: Option<String>,
    q: &Query,
    verb: &str,
    lag: Option<Duration>,
) -> Response {
    let r = &RESOURCES[res];
    if let Some(name) = name {
        let key = key_of(r, ns.as_deref(), &name);
        let obj = sh.lock().objects[res].get(&key).cloned();
        return match obj {
            Some(o) => json_response(200, &*o),
            None => error_response(&not_found(r, &name)),
        };
    }
    let filter = match Filter::new(res, ns, q) {
        Ok(f) => f,
        Err(e) => return error_response(&e),
    };
    if verb == "list" {
        let (rv, items): (u64, Vec<Arc<Value>>) = {
            let st = sh.lock();
            (
                st.rv,
                st.objects[res]
                    .values()
                    .filter(|o| filter.matches(o))
                    .cloned()
                    .collect(),
            )
        };
        let list = List {
            kind: format!("{}List", r.kind),
            api_version: r.api_version(),
            metadata: json!({"resourceVersion": rv.to_string()}),
            items: items.iter().map(|o| &**o).collect(),
        };
        return json_response(200, &list);
    }
    watch(sh, filter, q, lag)
}

fn watch(sh: &Arc<Shared>, filter: Filter, q: &Query, lag: Option<Duration>) -> Response {
    let r = &RESOURCES[filter.res];
    let bookmarks = q.flag("allowWatchBookmarks");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .filter(|t| *t > 0);
    let since = match q.get("resourceVersion").unwrap_or("") {
        "" | "0" => None,
        v => match v.parse::<u64>() {
            Ok(v) => Some(v),
            Err(_) => {
                let msg = format!("resourceVersion: Invalid value: {v:?}: must be an integer");
                return error_response(&bad_request(msg));
            }
        },
    };
    let mut lines = Vec::new();
    let (mut rx, done) = {
        let st = sh.lock();
        let rx = sh.tx.subscribe();
        match since {
            _ if st.closed => (rx, true),
            _ if q.flag("sendInitialEvents") && !st.stream_lists => {
                // What kube-apiserver 1.36 on an etcd without RequestWatchProgress says.
                let msg = "a watch stream was requested by the client but the required storage \
                           feature RequestWatchProgress is disabled";
                lines.push(event_line("ERROR", &err(500, "InternalError", msg).body()));
                (rx, true)
            }
            None => {
                let objs = st.objects[filter.res]
                    .values()
                    .filter(|o| filter.matches(o));
                lines.extend(objs.map(|o| event_line("ADDED", o)));
                if q.flag("sendInitialEvents") {
                    lines.push(bookmark(r, st.rv, true));
                }
                (rx, false)
            }
            Some(rv) if rv < st.evicted_rv => {
                let msg = format!("too old resource version: {rv} ({})", st.evicted_rv + 1);
                let status = err(410, "Expired", msg).body();
                lines.push(event_line("ERROR", &status));
                (rx, true)
            }
            Some(rv) => {
                let start = st.history.partition_point(|e| e.rv <= rv);
                lines.extend(st.history.range(start..).filter_map(|e| filter.line(e)));
                (rx, false)
            }
        }
    };
    let (tx, out) = mpsc::channel::<Result<Bytes, Infallible>>(256);
    tokio::spawn(async move {
        for l in lines {
            if tx.send(Ok(l)).await.is_err() {
                return;
            }
        }
        if done {
            return;
        }
        let deadline = async {
            match timeout {
                Some(t) => tokio::time::sleep(Duration::from_secs(t)).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(deadline);
        loop {
            let msg = tokio::select! {
                _ = tx.closed() => return,
                _ = &mut deadline => return,
                m = rx.recv() => m,
            };
            let (line, happened) = match msg {
                Ok(Msg::Ev(ev)) => (filter.line(&ev), ev.at),
                Ok(Msg::Bookmark(rv)) if bookmarks => {
                    (Some(bookmark(r, rv, false)), tokio::time::Instant::now())
                }
                Ok(Msg::Bookmark(_)) => continue,
                // Break, shutdown, or this watcher lagged: end the stream; the client
                // re-watches from its last resourceVersion (or re-lists on 410).
                Ok(Msg::Break) | Err(_) => return,
            };
            let Some(l) = line else { continue };
            if let Some(lag) = lag {
                // Each event `lag` after it happened, in order.
                tokio::time::sleep_until(happened + lag).await;
            }
            if tx.send(Ok(l)).await.is_err() {
                return;
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(
            tokio_stream::wrappers::ReceiverStream::new(out),
        ))
        .unwrap()
}
