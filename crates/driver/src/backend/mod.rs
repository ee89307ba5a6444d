//! The storage backends behind the CSI services, and the one trait they share.
//!
//! A backend owns one kind of storage (NFS sub-directories, EBS volumes): creating,
//! finding, listing and deleting volumes, and telling the node what to mount. It speaks
//! in the domain types of [`stowage_api::volume`] and reports [`BackendError`]s that know their
//! meaning; `csi::status` turns them into gRPC codes. Backends never import tonic or kube.

pub mod ebs;
pub mod nfs;
pub mod params;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;

use stowage_api::volume::{Capability, CapacityRange, CreateRequest, Snapshot, Volume};

/// What went wrong, in terms the CSI layer can map to a status code.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum BackendError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidParameter(String),
    #[error("{0}")]
    OutOfRange(String),
    #[error("{0}")]
    PermissionDenied(String),
    /// The volume is in a state that forbids the operation (attached elsewhere, in use).
    #[error("{0}")]
    InUse(String),
    #[error("{0}")]
    Exhausted(String),
    /// The storage system can't be reached right now; the caller should retry.
    #[error("{0}")]
    Unavailable(String),
    /// A call did not answer in time; the operation may still complete.
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    Internal(String),
}

/// How the node makes a volume visible at a target path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeSource {
    /// Bind-mount a directory of an export that is on this host (`stowage local`'s
    /// embedded server): `sub_dir` below `root`, opened without following any symlink
    /// and bind-mounted from that descriptor.
    ExportDir { root: PathBuf, sub_dir: Vec<String> },
    /// Mount a remote filesystem, e.g. `mount -t nfs server:/share/dir`.
    Mount {
        source: String,
        fs_type: String,
        options: Vec<String>,
    },
    /// A block device attached to this node: NodeStage finds it (by serial under the
    /// by-id directory, else the hint), formats it when blank and mounts it at the
    /// staging path; NodePublish bind-mounts the staging path (or the device itself
    /// for raw block access).
    Device {
        /// Serial as the by-id link shows it, e.g. `vol0abc` for `vol-0abc`.
        serial: String,
        /// Device name from ControllerPublish (`/dev/xvdba`), used when no by-id link.
        hint: Option<String>,
        fs_type: String,
        mkfs_args: Vec<String>,
        mount_options: Vec<String>,
    },
}

/// A volume a backend holds, as `stowage gc` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// The CSI volume id (an archived directory: its path on the export).
    pub id: String,
    /// The CSI name it was created with: a dynamic volume's PV name (`pvc-<uid>`).
    pub name: String,
    pub capacity_bytes: u64,
    /// When it was made, where the storage says.
    pub created: Option<std::time::SystemTime>,
    /// Where it lives: the export (`server:/share`) or the zone.
    pub place: String,
}

/// What a backend holds: its volumes, and what it keeps of deleted ones (NFS
/// `onDelete: archive` directories), listed apart and never collected.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inventory {
    pub volumes: Vec<Held>,
    pub archived: Vec<Held>,
}

/// Where to look, from the cluster: the parameters of every StorageClass of this
/// driver and the handle of every PV (NFS: the exports they name; EBS needs neither).
#[derive(Debug, Clone, Default)]
pub struct InventoryHints {
    pub class_parameters: Vec<BTreeMap<String, String>>,
    pub volume_ids: Vec<String>,
}

/// One kind of storage. Implementations must be idempotent by volume name and must
/// not rely on the storage server for that.
#[async_trait]
pub trait Backend: Send + Sync {
    /// Short name used in the `backend` StorageClass parameter and in logs ("nfs").
    fn kind(&self) -> &'static str;

    /// Does this volume id belong to this backend?
    fn owns(&self, volume_id: &str) -> bool;

    /// Must ControllerPublish attach volumes to nodes?
    fn needs_attach(&self) -> bool {
        false
    }

    /// Must the node stage volumes (NodeStageVolume) before publishing them?
    fn needs_stage(&self) -> bool {
        false
    }

    /// Is each volume one directory of a filesystem other volumes share (an NFS
    /// export)? Then statvfs describes the whole filesystem, and the node counts the
    /// volume's own usage by walking its directory.
    fn volumes_share_filesystem(&self) -> bool {
        false
    }

    /// Can volumes of this backend serve the capability? `Err` says why not.
    fn supports(&self, capability: &Capability) -> Result<(), String>;

    /// Create (or find, when it already exists with the same parameters) a volume.
    async fn create_volume(&self, request: &CreateRequest) -> Result<Volume, BackendError>;

    /// Delete a volume; a volume that does not exist is not an error.
    async fn delete_volume(&self, volume_id: &str) -> Result<(), BackendError>;

    /// Look a volume up by id; `Ok(None)` when it does not exist.
    async fn get_volume(&self, volume_id: &str) -> Result<Option<Volume>, BackendError>;

    /// Every volume this backend can see, in a stable order.
    async fn list_volumes(&self) -> Result<Vec<Volume>, BackendError>;

    /// Every volume this backend holds where `hints` point (and its default place),
    /// with age and size, for garbage collection.
    async fn inventory(&self, hints: &InventoryHints) -> Result<Inventory, BackendError>;

    /// Bytes available for new volumes created with these parameters.
    async fn capacity(&self, parameters: &BTreeMap<String, String>) -> Result<u64, BackendError>;

    /// Make the volume reachable from a node. Backends with nothing to attach only check
    /// that the volume exists.
    async fn controller_publish(
        &self,
        volume_id: &str,
        _node_id: &str,
    ) -> Result<BTreeMap<String, String>, BackendError> {
        match self.get_volume(volume_id).await? {
            Some(_) => Ok(BTreeMap::new()),
            None => Err(BackendError::NotFound(format!(
                "volume {volume_id} does not exist"
            ))),
        }
    }

    /// Undo [`Backend::controller_publish`]; unknown volumes and nodes are not an error.
    async fn controller_unpublish(
        &self,
        _volume_id: &str,
        _node_id: &str,
    ) -> Result<(), BackendError> {
        Ok(())
    }

    /// Does the storage answer? One cheap call per place it lives (NFS: FSSTAT of each
    /// export in use; EBS: one EC2 call). `Ok` says what answered, `Err` what did not.
    async fn check(&self) -> Result<String, String>;

    /// Cloud API calls made so far, by action (for metrics); empty when not counted.
    fn api_calls(&self) -> BTreeMap<String, u64> {
        BTreeMap::new()
    }

    /// Can this backend make a volume from another volume (CLONE_VOLUME)?
    fn can_clone(&self) -> bool {
        false
    }

    /// Can volumes of this backend grow (ControllerExpandVolume)?
    fn can_expand(&self) -> bool {
        false
    }

    /// Must the node grow something after the controller grew a volume (a filesystem
    /// on a block device: NodeExpandVolume)?
    fn expands_on_node(&self) -> bool {
        false
    }

    /// Grow a volume to at least `capacity.required`; returns the new size in bytes and
    /// whether the node must grow the filesystem too.
    async fn expand_volume(
        &self,
        volume_id: &str,
        _capacity: CapacityRange,
    ) -> Result<(u64, bool), BackendError> {
        Err(BackendError::InvalidParameter(format!(
            "volume {volume_id}: this backend cannot expand volumes"
        )))
    }

    /// Can volumes of this backend change type/performance in place (ModifyVolume)?
    fn can_modify(&self) -> bool {
        false
    }

    /// Apply mutable parameters (a VolumeAttributesClass) to an existing volume.
    async fn modify_volume(
        &self,
        volume_id: &str,
        _mutable: &BTreeMap<String, String>,
    ) -> Result<(), BackendError> {
        Err(BackendError::InvalidParameter(format!(
            "volume {volume_id}: this backend cannot modify volumes"
        )))
    }

    /// Can this backend take snapshots?
    fn can_snapshot(&self) -> bool {
        false
    }

    /// Does this snapshot id belong to this backend?
    fn owns_snapshot(&self, _snapshot_id: &str) -> bool {
        false
    }

    /// Snapshot a volume, idempotent by `name`; a name already used for another
    /// source volume is ALREADY_EXISTS.
    async fn create_snapshot(
        &self,
        source_volume_id: &str,
        _name: &str,
        _parameters: &BTreeMap<String, String>,
    ) -> Result<Snapshot, BackendError> {
        Err(BackendError::InvalidParameter(format!(
            "volume {source_volume_id}: this backend takes no snapshots"
        )))
    }

    /// Delete a snapshot; an unknown one is not an error.
    async fn delete_snapshot(&self, _snapshot_id: &str) -> Result<(), BackendError> {
        Ok(())
    }

    /// Every snapshot this backend manages.
    async fn list_snapshots(&self) -> Result<Vec<Snapshot>, BackendError> {
        Ok(vec![])
    }

    /// What the node must mount to publish this volume. Pure: no I/O. `context` is the
    /// volume context with the publish context merged in.
    fn node_source(
        &self,
        volume_id: &str,
        context: &BTreeMap<String, String>,
        capability: &Capability,
    ) -> Result<NodeSource, BackendError>;
}

/// Would a StorageClass with these parameters make a volume of `capacity_bytes`? The
/// parameter rules CreateVolume applies, without I/O (`stowage explain`): the backend
/// is the one `backend` names, else the one whose keys the parameters use most. `Ok`
/// names the backend; `Err` is CreateVolume's message.
pub fn check_class_parameters(
    parameters: &BTreeMap<String, String>,
    capacity_bytes: u64,
) -> Result<&'static str, String> {
    use stowage_api::keys::{PV_NAME, PVC_NAME, PVC_NAMESPACE};
    let mut rest = parameters.clone();
    let wanted = rest.remove(BACKEND_PARAMETER);
    let uses = |keys: &[&str]| {
        rest.keys()
            .filter(|k| keys.iter().any(|known| known.eq_ignore_ascii_case(k)))
            .count()
    };
    let kind = match wanted.as_deref() {
        Some("nfs") => "nfs",
        Some("ebs") => "ebs",
        Some(other) => {
            return Err(format!(
                "parameter `{BACKEND_PARAMETER}` is {other:?}: stowage's backends are nfs and ebs"
            ));
        }
        None if uses(&ebs::params::KEYS) > uses(nfs::params::KEYS) => "ebs",
        None => "nfs",
    };
    // What the provisioner adds to every CreateVolume (subDir templates read them).
    for (key, value) in [
        (PVC_NAME, "claim"),
        (PVC_NAMESPACE, "namespace"),
        (PV_NAME, "pvc-check"),
    ] {
        rest.entry(key.to_owned())
            .or_insert_with(|| value.to_owned());
    }
    let checked = match kind {
        "nfs" => nfs::params::placement("pvc-check", &rest, true).map(|_| ()),
        _ => ebs::params::spec(
            CapacityRange {
                required: capacity_bytes,
                limit: None,
            },
            &rest,
            None,
        )
        .map(|_| ()),
    };
    checked.map(|()| kind).map_err(|e| e.to_string())
}

/// The StorageClass parameter that picks a backend when more than one is configured.
pub use stowage_api::keys::BACKEND_PARAMETER;

/// A backend picked for a request, with the parameters left for it.
pub type Routed = (Arc<dyn Backend>, BTreeMap<String, String>);

/// The configured backends; routes requests by parameter or volume id.
#[derive(Clone, Default)]
pub struct Backends {
    backends: Vec<Arc<dyn Backend>>,
}

impl Backends {
    pub fn new(backends: Vec<Arc<dyn Backend>>) -> Self {
        Self { backends }
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn Backend>> {
        self.backends.iter()
    }

    /// The backend a StorageClass asks for (`backend: nfs`), or the first configured one.
    /// Returns the parameters without the routing key.
    pub fn for_parameters(
        &self,
        parameters: &BTreeMap<String, String>,
    ) -> Result<Routed, BackendError> {
        let mut rest = parameters.clone();
        let wanted = rest.remove(BACKEND_PARAMETER);
        let found = match wanted.as_deref() {
            None => self.backends.first(),
            Some(kind) => self.backends.iter().find(|b| b.kind() == kind),
        };
        match found {
            Some(backend) => Ok((Arc::clone(backend), rest)),
            None => Err(BackendError::InvalidParameter(format!(
                "parameter `{BACKEND_PARAMETER}` is {:?}, but the configured backends are: {}",
                wanted.unwrap_or_default(),
                self.kinds()
            ))),
        }
    }

    /// The backend that owns a volume id.
    pub fn for_volume(&self, volume_id: &str) -> Option<Arc<dyn Backend>> {
        self.backends
            .iter()
            .find(|b| b.owns(volume_id))
            .map(Arc::clone)
    }

    /// Does any configured backend attach volumes?
    pub fn any_attach(&self) -> bool {
        self.backends.iter().any(|b| b.needs_attach())
    }

    /// Can any configured backend modify volumes?
    pub fn any_modify(&self) -> bool {
        self.backends.iter().any(|b| b.can_modify())
    }

    /// Can any configured backend take snapshots?
    pub fn any_snapshot(&self) -> bool {
        self.backends.iter().any(|b| b.can_snapshot())
    }

    /// The backend that owns a snapshot id.
    pub fn for_snapshot(&self, snapshot_id: &str) -> Option<Arc<dyn Backend>> {
        self.backends
            .iter()
            .find(|b| b.owns_snapshot(snapshot_id))
            .map(Arc::clone)
    }

    /// Can any configured backend clone volumes?
    pub fn any_clone(&self) -> bool {
        self.backends.iter().any(|b| b.can_clone())
    }

    /// Can any configured backend expand volumes?
    pub fn any_expand(&self) -> bool {
        self.backends.iter().any(|b| b.can_expand())
    }

    /// Does any configured backend grow volumes on the node too?
    pub fn any_node_expand(&self) -> bool {
        self.backends.iter().any(|b| b.expands_on_node())
    }

    /// Does any configured backend need NodeStage?
    pub fn any_stage(&self) -> bool {
        self.backends.iter().any(|b| b.needs_stage())
    }

    fn kinds(&self) -> String {
        let kinds: Vec<&str> = self.backends.iter().map(|b| b.kind()).collect();
        kinds.join(", ")
    }
}
