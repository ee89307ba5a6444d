//! File handles: `(st_dev, st_ino)` of an object, the part of the NFS handle that
//! belongs to the VFS.

use super::*;

/// `(st_dev, st_ino)` of an object, little-endian: the part of the NFS handle that
/// belongs to the VFS (`nfs3_server` adds the generation in front).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct NodeId(pub(super) [u8; 16]);

impl NodeId {
    pub(super) fn new(dev: u64, ino: u64) -> Self {
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&dev.to_le_bytes());
        bytes[8..].copy_from_slice(&ino.to_le_bytes());
        Self(bytes)
    }

    pub(super) fn of(st: &FileStat) -> Self {
        Self::new(st.st_dev, st.st_ino)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (dev, ino) = self.0.split_at(8);
        let word = |b: &[u8]| b.try_into().map_or(0, u64::from_le_bytes);
        write!(f, "NodeId(dev={}, ino={})", word(dev), word(ino))
    }
}

impl FileHandle for NodeId {
    fn len(&self) -> usize {
        self.0.len()
    }

    fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    fn from_bytes(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self)
    }
}
