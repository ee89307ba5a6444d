//! Test fixtures for the reconcilers' unit tests (as kube-rs/controller-rs's
//! `fixtures.rs`): builders for claims, classes and PVs; a fake API server behind a
//! real `kube::Client` that records every request and answers from an object table the
//! way the API server does (POST stores or answers 409, GET reads or 404, a merge PATCH
//! merges, and a PATCH carrying a stale `metadata.resourceVersion` is a 409); a fake
//! CSI driver served by tonic on a real unix socket that records its calls; and a
//! [`Context`] assembled from them with the informers' caches filled by hand.
//! The end-to-end tests through the binary (`tests/`) stay the proof of the whole.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::core::v1::{
    CSIPersistentVolumeSource, ObjectReference, PersistentVolume, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PersistentVolumeSpec, PersistentVolumeStatus,
    VolumeResourceRequirements,
};
use k8s_openapi::api::storage::v1::{
    StorageClass, VolumeAttachment, VolumeAttachmentSource, VolumeAttachmentSpec,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use serde_json::{Value, json};
use stowage_api::keys::DriverNames;
use stowage_api::metrics::Metrics;
use stowage_api::proto::csi as proto;
use stowage_api::proto::csi::controller_server::{Controller, ControllerServer};
use stowage_api::proto::csi::identity_server::{Identity, IdentityServer};
use tonic::{Code, Status};

use crate::cache::Cache;
use crate::csi_client::Csi;
use crate::events::Events;
use crate::queue::Backoff;
use crate::{Context, Loop, LoopExpectations, LoopMetrics, Settings};

/// The driver every fixture belongs to.
pub const DRIVER: &str = "fake.csi.dev";

/// The fixtures' NFS-only driver name (`Settings::nfs_driver_name`).
pub const NFS_DRIVER: &str = "nfs.fake.csi.dev";

/// A claim `namespace/name` with uid `uid`, ReadWriteOnce, asking for `storage` of
/// class `class`, already annotated by the PV controller for [`DRIVER`].
pub fn claim(
    namespace: &str,
    name: &str,
    uid: &str,
    class: &str,
    storage: &str,
) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            uid: Some(uid.into()),
            resource_version: Some("1".into()),
            annotations: Some(BTreeMap::from([(
                crate::rules::ANN_STORAGE_PROVISIONER.to_owned(),
                DRIVER.to_owned(),
            )])),
            ..Default::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: Some(class.into()),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".into(),
                    Quantity(storage.into()),
                )])),
                ..Default::default()
            }),
            ..Default::default()
        }),
        status: None,
    }
}

/// A StorageClass `name` of `provisioner` with `parameters`, reclaim Delete.
pub fn class(name: &str, provisioner: &str, parameters: &[(&str, &str)]) -> StorageClass {
    StorageClass {
        metadata: ObjectMeta {
            name: Some(name.into()),
            resource_version: Some("1".into()),
            ..Default::default()
        },
        provisioner: provisioner.into(),
        parameters: Some(
            parameters
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        ),
        reclaim_policy: Some("Delete".into()),
        ..Default::default()
    }
}

/// A PV `name` of [`DRIVER`] pre-bound to `claim` (claimRef with its uid), as an
/// administrator makes one by hand.
pub fn pv_prebound_to(name: &str, claim: &PersistentVolumeClaim) -> PersistentVolume {
    PersistentVolume {
        metadata: ObjectMeta {
            name: Some(name.into()),
            resource_version: Some("1".into()),
            ..Default::default()
        },
        spec: Some(PersistentVolumeSpec {
            claim_ref: Some(ObjectReference {
                kind: Some("PersistentVolumeClaim".into()),
                namespace: claim.metadata.namespace.clone(),
                name: claim.metadata.name.clone(),
                uid: claim.metadata.uid.clone(),
                ..Default::default()
            }),
            capacity: Some(BTreeMap::from([("storage".into(), Quantity("1Gi".into()))])),
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            ..Default::default()
        }),
        status: None,
    }
}

/// A PV [`DRIVER`] provisioned for volume `handle` (annotation, csi source, the
/// provisioner finalizer), with `reclaim` policy and status `phase`.
pub fn provisioned_pv(name: &str, handle: &str, reclaim: &str, phase: &str) -> PersistentVolume {
    PersistentVolume {
        metadata: ObjectMeta {
            name: Some(name.into()),
            resource_version: Some("1".into()),
            annotations: Some(BTreeMap::from([(
                crate::rules::ANN_PROVISIONED_BY.to_owned(),
                DRIVER.to_owned(),
            )])),
            finalizers: Some(vec![crate::rules::FINALIZER.to_owned()]),
            ..Default::default()
        },
        spec: Some(PersistentVolumeSpec {
            csi: Some(CSIPersistentVolumeSource {
                driver: DRIVER.into(),
                volume_handle: handle.into(),
                ..Default::default()
            }),
            capacity: Some(BTreeMap::from([("storage".into(), Quantity("1Gi".into()))])),
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            persistent_volume_reclaim_policy: Some(reclaim.into()),
            ..Default::default()
        }),
        status: Some(PersistentVolumeStatus {
            phase: Some(phase.into()),
            ..Default::default()
        }),
    }
}

/// A VolumeAttachment of `pv` to `node`.
pub fn attachment(name: &str, pv: &str, node: &str) -> VolumeAttachment {
    VolumeAttachment {
        metadata: ObjectMeta {
            name: Some(name.into()),
            resource_version: Some("1".into()),
            ..Default::default()
        },
        spec: VolumeAttachmentSpec {
            attacher: DRIVER.into(),
            node_name: node.into(),
            source: VolumeAttachmentSource {
                persistent_volume_name: Some(pv.into()),
                ..Default::default()
            },
        },
        status: None,
    }
}

/// One request the fake API server received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: Method,
    pub path: String,
    pub body: Value,
}

impl Recorded {
    /// `"PATCH /api/v1/namespaces/default/persistentvolumeclaims/x"`.
    pub fn line(&self) -> String {
        format!("{} {}", self.method, self.path)
    }

    pub fn is_event(&self) -> bool {
        self.path.contains("/events")
    }
}

#[derive(Default)]
struct ApiState {
    requests: Vec<Recorded>,
    objects: HashMap<String, Value>,
    next_version: u64,
}

/// The fake API server: an object table keyed by URL path, and the requests made.
#[derive(Clone, Default)]
pub struct FakeApi {
    state: Arc<Mutex<ApiState>>,
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(target), Value::Object(patch)) => {
            for (key, value) in patch {
                if value.is_null() {
                    target.remove(key);
                } else {
                    merge(target.entry(key.clone()).or_insert(Value::Null), value);
                }
            }
        }
        (target, patch) => *target = patch.clone(),
    }
}

fn status(code: StatusCode, reason: &str, message: &str) -> (StatusCode, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
               "reason": reason, "message": message, "code": code.as_u16()}),
    )
}

impl FakeApi {
    /// Put `object` in the table at the path the API serves it from.
    pub fn seed<K: kube::Resource<DynamicType = ()> + serde::Serialize>(&self, object: &K) {
        let path = object_path::<K>(
            object.meta().namespace.as_deref(),
            object.meta().name.as_deref().unwrap_or_default(),
        );
        let value = serde_json::to_value(object).expect("objects serialise");
        self.lock().objects.insert(path, value);
    }

    /// The object at `path`, as the server holds it now.
    pub fn object<K: kube::Resource<DynamicType = ()> + serde::de::DeserializeOwned>(
        &self,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<K> {
        let path = object_path::<K>(namespace, name);
        let value = self.lock().objects.get(&path).cloned()?;
        Some(serde_json::from_value(value).expect("stored objects deserialise"))
    }

    /// Every request so far, in order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.lock().requests.clone()
    }

    /// The requests so far other than event writes (those are published in the
    /// background, in their own order).
    pub fn writes(&self) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| !r.is_event())
            .collect()
    }

    /// Wait (up to 10 s) until an event with `reason` has been posted.
    pub async fn event(&self, reason: &str) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let found = self
                .requests()
                .into_iter()
                .find(|r| r.is_event() && r.body["reason"] == reason);
            if found.is_some() || tokio::time::Instant::now() >= deadline {
                return found.map(|r| r.body);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ApiState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn answer(&self, method: &Method, path: &str, body: Value) -> (StatusCode, Value) {
        let mut state = self.lock();
        state.requests.push(Recorded {
            method: method.clone(),
            path: path.to_owned(),
            body: body.clone(),
        });
        state.next_version += 1;
        let version = (100 + state.next_version).to_string();
        match *method {
            Method::GET => match state.objects.get(path) {
                Some(object) => (StatusCode::OK, object.clone()),
                None => status(StatusCode::NOT_FOUND, "NotFound", path),
            },
            Method::POST => {
                let name = body["metadata"]["name"].as_str().unwrap_or_default();
                let at = format!("{path}/{name}");
                if state.objects.contains_key(&at) {
                    return status(StatusCode::CONFLICT, "AlreadyExists", &at);
                }
                let mut object = body;
                object["metadata"]["resourceVersion"] = json!(version);
                object["metadata"]["uid"] = json!(format!("uid-{version}"));
                state.objects.insert(at, object.clone());
                (StatusCode::CREATED, object)
            }
            Method::PATCH => {
                let path = path.trim_end_matches("/status");
                let Some(stored) = state.objects.get_mut(path) else {
                    return status(StatusCode::NOT_FOUND, "NotFound", path);
                };
                let guard = &body["metadata"]["resourceVersion"];
                if !guard.is_null() && *guard != stored["metadata"]["resourceVersion"] {
                    return status(
                        StatusCode::CONFLICT,
                        "Conflict",
                        "the object has been modified",
                    );
                }
                merge(stored, &body);
                stored["metadata"]["resourceVersion"] = json!(version);
                let answer = stored.clone();
                // A deleted object goes once its last finalizer is off.
                if !answer["metadata"]["deletionTimestamp"].is_null() && !finalizers(&answer) {
                    state.objects.remove(path);
                }
                (StatusCode::OK, answer)
            }
            Method::DELETE => {
                let Some(stored) = state.objects.get_mut(path) else {
                    return status(StatusCode::NOT_FOUND, "NotFound", path);
                };
                if finalizers(stored) {
                    stored["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
                    stored["metadata"]["resourceVersion"] = json!(version);
                    (StatusCode::OK, stored.clone())
                } else {
                    state.objects.remove(path);
                    (
                        StatusCode::OK,
                        json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
                    )
                }
            }
            _ => status(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", path),
        }
    }

    /// A real `kube::Client` whose requests this fake answers.
    pub fn client(&self) -> kube::Client {
        let api = self.clone();
        let service = tower::service_fn(move |request: Request<kube::client::Body>| {
            let api = api.clone();
            async move {
                let (parts, body) = request.into_parts();
                let bytes = http_body_util::BodyExt::collect(body)
                    .await
                    .map(|c| c.to_bytes())
                    .unwrap_or_default();
                let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let (code, answer) = api.answer(&parts.method, parts.uri.path(), body);
                let response = Response::builder()
                    .status(code)
                    .header("content-type", "application/json")
                    .body(kube::client::Body::from(
                        serde_json::to_vec(&answer).expect("json"),
                    ))
                    .expect("a response");
                Ok::<_, Infallible>(response)
            }
        });
        kube::Client::new(service, "default")
    }
}

fn finalizers(object: &Value) -> bool {
    object["metadata"]["finalizers"]
        .as_array()
        .is_some_and(|f| !f.is_empty())
}

/// The URL path of an object of kind `K`.
fn object_path<K: kube::Resource<DynamicType = ()>>(namespace: Option<&str>, name: &str) -> String {
    let url = K::url_path(&(), namespace);
    format!("{url}/{name}")
}

/// How the fake driver answers CreateVolume.
pub type CreateAnswer =
    Box<dyn Fn(&proto::CreateVolumeRequest) -> Result<proto::Volume, Status> + Send + Sync>;

/// The fake CSI driver: Identity and Controller with CREATE_DELETE_VOLUME, recording
/// every CreateVolume and DeleteVolume.
#[derive(Clone)]
pub struct FakeDriver {
    pub creates: Arc<Mutex<Vec<proto::CreateVolumeRequest>>>,
    pub deletes: Arc<Mutex<Vec<String>>>,
    pub expands: Arc<Mutex<Vec<proto::ControllerExpandVolumeRequest>>>,
    answer: Arc<CreateAnswer>,
    /// With EXPAND_VOLUME: whether the node must grow the filesystem afterwards.
    expand: Option<bool>,
}

impl Default for FakeDriver {
    /// A driver whose volumes are `vol-<name>` with exactly the requested size.
    fn default() -> Self {
        Self::answering(|request| {
            Ok(proto::Volume {
                volume_id: format!("vol-{}", request.name),
                capacity_bytes: request
                    .capacity_range
                    .as_ref()
                    .map_or(0, |r| r.required_bytes),
                ..Default::default()
            })
        })
    }
}

impl FakeDriver {
    /// A driver that answers CreateVolume with `answer`.
    pub fn answering(
        answer: impl Fn(&proto::CreateVolumeRequest) -> Result<proto::Volume, Status>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        Self {
            creates: Arc::default(),
            deletes: Arc::default(),
            expands: Arc::default(),
            answer: Arc::new(Box::new(answer)),
            expand: None,
        }
    }

    /// The driver also expands volumes (EXPAND_VOLUME) to exactly the size asked for;
    /// `node_expansion_required` as its answers say.
    pub fn expanding(mut self, node_expansion_required: bool) -> Self {
        self.expand = Some(node_expansion_required);
        self
    }

    pub fn expands(&self) -> Vec<proto::ControllerExpandVolumeRequest> {
        self.expands
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn creates(&self) -> Vec<proto::CreateVolumeRequest> {
        self.creates
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

#[tonic::async_trait]
impl Identity for FakeDriver {
    async fn get_plugin_info(
        &self,
        _: tonic::Request<proto::GetPluginInfoRequest>,
    ) -> Result<tonic::Response<proto::GetPluginInfoResponse>, Status> {
        Ok(tonic::Response::new(proto::GetPluginInfoResponse {
            name: DRIVER.into(),
            vendor_version: "0".into(),
            manifest: HashMap::new(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: tonic::Request<proto::GetPluginCapabilitiesRequest>,
    ) -> Result<tonic::Response<proto::GetPluginCapabilitiesResponse>, Status> {
        use proto::plugin_capability::{Service, Type, service};
        Ok(tonic::Response::new(proto::GetPluginCapabilitiesResponse {
            capabilities: vec![proto::PluginCapability {
                r#type: Some(Type::Service(Service {
                    r#type: service::Type::ControllerService as i32,
                })),
            }],
        }))
    }

    async fn probe(
        &self,
        _: tonic::Request<proto::ProbeRequest>,
    ) -> Result<tonic::Response<proto::ProbeResponse>, Status> {
        Ok(tonic::Response::new(proto::ProbeResponse {
            ready: Some(true),
        }))
    }
}

#[tonic::async_trait]
impl Controller for FakeDriver {
    async fn controller_get_capabilities(
        &self,
        _: tonic::Request<proto::ControllerGetCapabilitiesRequest>,
    ) -> Result<tonic::Response<proto::ControllerGetCapabilitiesResponse>, Status> {
        use proto::controller_service_capability::{Rpc, Type, rpc};
        let mut rpcs = vec![rpc::Type::CreateDeleteVolume];
        if self.expand.is_some() {
            rpcs.push(rpc::Type::ExpandVolume);
        }
        Ok(tonic::Response::new(
            proto::ControllerGetCapabilitiesResponse {
                capabilities: rpcs
                    .into_iter()
                    .map(|rpc| proto::ControllerServiceCapability {
                        r#type: Some(Type::Rpc(Rpc { r#type: rpc as i32 })),
                    })
                    .collect(),
            },
        ))
    }

    async fn controller_expand_volume(
        &self,
        request: tonic::Request<proto::ControllerExpandVolumeRequest>,
    ) -> Result<tonic::Response<proto::ControllerExpandVolumeResponse>, Status> {
        let Some(node_expansion_required) = self.expand else {
            return Err(Status::unimplemented("no EXPAND_VOLUME"));
        };
        let request = request.into_inner();
        self.expands
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(request.clone());
        Ok(tonic::Response::new(
            proto::ControllerExpandVolumeResponse {
                capacity_bytes: request.capacity_range.map_or(0, |r| r.required_bytes),
                node_expansion_required,
            },
        ))
    }

    async fn create_volume(
        &self,
        request: tonic::Request<proto::CreateVolumeRequest>,
    ) -> Result<tonic::Response<proto::CreateVolumeResponse>, Status> {
        let request = request.into_inner();
        self.creates
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(request.clone());
        let volume = (self.answer)(&request)?;
        Ok(tonic::Response::new(proto::CreateVolumeResponse {
            volume: Some(volume),
        }))
    }

    async fn delete_volume(
        &self,
        request: tonic::Request<proto::DeleteVolumeRequest>,
    ) -> Result<tonic::Response<proto::DeleteVolumeResponse>, Status> {
        self.deletes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(request.into_inner().volume_id);
        Ok(tonic::Response::new(proto::DeleteVolumeResponse {}))
    }
}

/// A status the fake driver can answer with.
pub fn refused(message: &str) -> Status {
    Status::new(Code::InvalidArgument, message)
}

/// A cache filled with `objects`, as an informer's after its first list.
pub fn store<K>(objects: &[K]) -> Store<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    let (store, mut writer) = reflector::store();
    for object in objects {
        writer.apply_watcher_event(&watcher::Event::Apply(object.clone()));
    }
    store
}

/// Everything a reconciler test holds: the context and the fakes behind it.
pub struct Fixture {
    pub context: Arc<Context>,
    pub api: FakeApi,
    pub driver: FakeDriver,
    _socket_dir: tempfile::TempDir,
    _server: tokio::task::JoinHandle<()>,
}

/// The caches a test starts with.
#[derive(Default)]
pub struct Caches {
    pub claims: Vec<PersistentVolumeClaim>,
    pub volumes: Vec<PersistentVolume>,
    pub classes: Vec<StorageClass>,
    pub attachments: Vec<VolumeAttachment>,
    pub snapshots: Vec<crate::snapshots::types::VolumeSnapshot>,
    pub contents: Vec<crate::snapshots::types::VolumeSnapshotContent>,
    pub snapshot_classes: Vec<crate::snapshots::types::VolumeSnapshotClass>,
}

/// A context over `driver` (served on a unix socket in a temporary directory) and a
/// fake API server seeded with the cached claims and volumes.
pub async fn fixture(caches: Caches, driver: FakeDriver) -> Fixture {
    let api = FakeApi::default();
    for claim in &caches.claims {
        api.seed(claim);
    }
    for volume in &caches.volumes {
        api.seed(volume);
    }
    for attachment in &caches.attachments {
        api.seed(attachment);
    }
    for snapshot in &caches.snapshots {
        api.seed(snapshot);
    }
    for content in &caches.contents {
        api.seed(content);
    }
    let socket_dir = tempfile::tempdir().expect("tempdir");
    let socket = socket_dir.path().join("csi.sock");
    let listener = tokio::net::UnixListener::bind(&socket).expect("bind the fake driver");
    let service = driver.clone();
    let server = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(IdentityServer::new(service.clone()))
            .add_service(ControllerServer::new(service))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
            .await;
    });
    let csi = Csi::connect(&socket, 4, Duration::from_secs(10), Duration::from_secs(10))
        .await
        .expect("connect to the fake driver");
    let client = api.client();
    let metrics = LoopMetrics::register(&Metrics::new(DRIVER));
    let names = DriverNames::new(DRIVER, NFS_DRIVER);
    let context = Arc::new(Context {
        expect: LoopExpectations::default(),
        first_seen: Mutex::default(),
        created_pvs: Mutex::default(),
        unsaved_pvs: Arc::default(),
        events: Events::start(client.clone(), DRIVER, metrics.events_dropped.clone()),
        client,
        csi,
        driver: names.clone(),
        settings: Settings {
            loops: vec![Loop::Provisioner, Loop::Attacher, Loop::Resizer],
            backoff: Backoff {
                start: Duration::from_secs(1),
                max: Duration::from_secs(300),
            },
            workers: 1,
            identity: "fixture-identity".into(),
            annotation_grace: Duration::ZERO,
            nfs_driver_name: Some(NFS_DRIVER.into()),
        },
        claims: Cache::of(&caches.claims, names.clone()),
        volumes: Cache::of(&caches.volumes, names.clone()),
        classes: store(&caches.classes),
        attachments: Cache::of(&caches.attachments, names),
        snapshot_stores: Some(crate::snapshots::SnapshotStores {
            snapshots: store(&caches.snapshots),
            contents: store(&caches.contents),
            classes: store(&caches.snapshot_classes),
        }),
        metrics,
        activity: crate::activity::Activity::default(),
    });
    Fixture {
        context,
        api,
        driver,
        _socket_dir: socket_dir,
        _server: server,
    }
}
