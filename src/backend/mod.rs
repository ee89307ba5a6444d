//! The storage backends behind the CSI services, and the one trait they share.
//!
//! A backend owns one kind of storage (NFS sub-directories, EBS volumes): creating,
//! finding, listing and deleting volumes, and telling the node what to mount. It speaks
//! in the domain types of [`crate::volume`] and reports [`BackendError`]s that know their
//! meaning; `csi::status` turns them into gRPC codes. Backends never import tonic or kube.

pub mod nfs;
pub mod params;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;

use crate::volume::{Capability, CreateRequest, Volume};

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
    /// Bind-mount a directory that already exists on this host.
    Bind { path: PathBuf },
    /// Mount a remote filesystem, e.g. `mount -t nfs server:/share/dir`.
    Mount {
        source: String,
        fs_type: String,
        options: Vec<String>,
    },
}

/// One kind of storage. Implementations must be idempotent by volume name and must
/// not rely on the storage server for that.
#[async_trait]
pub trait Backend: Send + Sync {
    /// Short name used in the `backend` StorageClass parameter and in logs ("nfs").
    fn kind(&self) -> &'static str;

    /// Does this volume id belong to this backend?
    fn owns(&self, volume_id: &str) -> bool;

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

    /// What the node must mount to publish this volume. Pure: no I/O.
    fn node_source(
        &self,
        volume_id: &str,
        context: &BTreeMap<String, String>,
        capability: &Capability,
    ) -> Result<NodeSource, BackendError>;
}

/// The StorageClass parameter that picks a backend when more than one is configured.
pub const BACKEND_PARAMETER: &str = "backend";

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

    fn kinds(&self) -> String {
        let kinds: Vec<&str> = self.backends.iter().map(|b| b.kind()).collect();
        kinds.join(", ")
    }
}
