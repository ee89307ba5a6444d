//! Domain types shared by the CSI server, the backends and the loops: what a volume
//! is, what a request asks for. Owns no I/O and must not import tonic, kube or any
//! backend crate; the driver's `csi/` converts the protobuf messages into these types
//! after validating them.

use std::collections::BTreeMap;
use std::fmt;

/// Bytes in one GiB.
pub const GIB: u64 = 1 << 30;

/// How many nodes may use a volume at once, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AccessMode {
    SingleNodeWriter,
    SingleNodeReaderOnly,
    MultiNodeReaderOnly,
    MultiNodeSingleWriter,
    MultiNodeMultiWriter,
    SingleNodeSingleWriter,
    SingleNodeMultiWriter,
}

impl AccessMode {
    /// True when the mode only allows reading.
    pub fn is_read_only(self) -> bool {
        matches!(
            self,
            AccessMode::SingleNodeReaderOnly | AccessMode::MultiNodeReaderOnly
        )
    }
}

/// Whether the workload sees a filesystem or a raw block device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessType {
    Mount {
        fs_type: Option<String>,
        mount_flags: Vec<String>,
    },
    Block,
}

/// One requested capability: access type plus access mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capability {
    pub access_type: AccessType,
    pub access_mode: AccessMode,
}

/// Requested size bounds in bytes; `limit == None` means unbounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CapacityRange {
    pub required: u64,
    pub limit: Option<u64>,
}

impl CapacityRange {
    /// Does a volume of `bytes` satisfy this range?
    pub fn admits(&self, bytes: u64) -> bool {
        bytes >= self.required && self.limit.is_none_or(|limit| bytes <= limit)
    }
}

/// Topology segments, e.g. `{"topology.kubernetes.io/zone": "us-east-1a"}`.
pub type Segments = BTreeMap<String, String>;

/// Where a new volume may (requisite) and should (preferred) be reachable from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Accessibility {
    pub requisite: Vec<Segments>,
    pub preferred: Vec<Segments>,
}

/// A validated CreateVolume request.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    /// The CSI volume name (`pvc-<uid>` when the provisioner asks); the idempotency key.
    pub name: String,
    pub capacity: CapacityRange,
    pub capabilities: Vec<Capability>,
    /// StorageClass parameters with stowage's own routing keys removed.
    pub parameters: BTreeMap<String, String>,
    /// Accessibility requirements (WaitForFirstConsumer / allowedTopologies).
    pub accessibility: Accessibility,
    /// Credentials passed with the request (never logged).
    pub secrets: BTreeMap<String, String>,
    /// Create the volume from a snapshot, or as a clone of a volume.
    pub source: Option<ContentSource>,
}

/// What a new volume's contents come from (CSI `VolumeContentSource`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContentSource {
    /// A snapshot id.
    Snapshot(String),
    /// A volume id: the new volume is a clone of it.
    Volume(String),
}

/// A point-in-time copy of a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub id: String,
    pub source_volume_id: String,
    pub size_bytes: u64,
    /// Seconds and nanoseconds since the Unix epoch.
    pub created: (i64, i32),
    pub ready: bool,
}

/// A volume as a backend reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    pub id: String,
    pub capacity_bytes: u64,
    /// Handed back to the node in NodeStage/NodePublish (`volume_context`).
    pub context: BTreeMap<String, String>,
    /// Where the volume can be used from; empty = everywhere.
    pub topology: Vec<Segments>,
    /// The snapshot or volume the volume was created from.
    pub source: Option<ContentSource>,
}

/// Filesystem usage of a published volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub bytes_total: u64,
    pub bytes_available: u64,
    pub bytes_used: u64,
    pub inodes_total: u64,
    pub inodes_free: u64,
    pub inodes_used: u64,
}

/// Rounds `bytes` up to a whole number of GiB.
pub fn round_up_gib(bytes: u64) -> u64 {
    bytes.div_ceil(GIB).saturating_mul(GIB)
}

/// Human-readable byte count for error messages ("5 GiB", "1536 MiB", "100 bytes").
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const MIB: u64 = 1 << 20;
        match self.0 {
            b if b >= GIB && b % GIB == 0 => write!(f, "{} GiB", b / GIB),
            b if b >= MIB && b % MIB == 0 => write!(f, "{} MiB", b / MIB),
            b => write!(f, "{b} bytes"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_range_admits_within_bounds_only() {
        let range = CapacityRange {
            required: 10,
            limit: Some(20),
        };
        assert!(range.admits(10));
        assert!(range.admits(20));
        assert!(!range.admits(9));
        assert!(!range.admits(21));
        let open = CapacityRange {
            required: 0,
            limit: None,
        };
        assert!(open.admits(u64::MAX));
    }

    #[test]
    fn rounds_up_to_gib() {
        assert_eq!(round_up_gib(0), 0);
        assert_eq!(round_up_gib(1), GIB);
        assert_eq!(round_up_gib(GIB), GIB);
        assert_eq!(round_up_gib(GIB + 1), 2 * GIB);
    }

    #[test]
    fn bytes_display_picks_the_largest_exact_unit() {
        assert_eq!(Bytes(5 * GIB).to_string(), "5 GiB");
        assert_eq!(Bytes(1536 << 20).to_string(), "1536 MiB");
        assert_eq!(Bytes(100).to_string(), "100 bytes");
    }
}
