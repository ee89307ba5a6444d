//! NFS snapshots: a copy of a volume's tree made over the wire by the controller (no
//! kernel mount), kept on the same export.
//!
//! Why a copy of the tree and not an archive (csi-driver-nfs tars the directory
//! through a kernel mount): over NFS a tree copy needs nothing but the calls the
//! backend already makes (READDIRPLUS, READ, WRITE, CREATE, MKDIR, SYMLINK, SETATTR),
//! keeps modes, owners, times and symlinks without an archive format to get right,
//! and a restore is the same copy the other way, so one code path does both. The
//! price is space: a snapshot is as large as the files it holds, uncompressed.
//!
//! Layout on the export (every name reserved, `params::RESERVED`):
//! - `.stowage-work/snapshot-<name>/` while the copy is made: `data/` (the tree),
//!   then `record`;
//! - renamed, when both are in, to `.stowage-snapshots/<name>/`: only a finished
//!   snapshot is ever there, so a half-made one is never listed or reported ready;
//! - a crash leaves the scratch directory, which the next CreateSnapshot of that name
//!   (the CO retries until it is ready) or its DeleteSnapshot removes.
//!
//! Ids carry what DeleteSnapshot needs: `nfs-snap#<server>#<share>#<name>` (empty
//! server and share: the default export), like volume ids. A copy of a live volume is
//! not a point-in-time image: files written during the copy may be caught half-way.
//! Quiesce the application (or snapshot from a read-only clone) for consistency.

use serde::{Deserialize, Serialize};

use super::params::{SNAPSHOTS_DIR, WORK_DIR, check_component, check_server, check_share};
use crate::backend::BackendError;

const PREFIX: &str = "nfs-snap";

/// A parsed snapshot id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotId {
    pub server: String,
    pub share: String,
    pub name: String,
}

impl SnapshotId {
    pub fn is_nfs(id: &str) -> bool {
        id.starts_with("nfs-snap#")
    }

    pub fn encode(&self) -> String {
        format!("{PREFIX}#{}#{}#{}", self.server, self.share, self.name)
    }

    /// Parse and check every part (ids are user input: pre-provisioned
    /// VolumeSnapshotContents name any handle).
    pub fn parse(id: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("snapshot id {id:?} is not an NFS snapshot id ({why})");
        let parts: Vec<&str> = id.split('#').collect();
        let [prefix, server, share, name] = parts[..] else {
            return Err(bad("expected nfs-snap#server#share#name"));
        };
        if prefix != PREFIX {
            return Err(bad("wrong prefix"));
        }
        if server.is_empty() != share.is_empty() {
            return Err(bad("server and share must both be set or both be empty"));
        }
        if !server.is_empty() {
            check_server(server).map_err(|e| bad(&e))?;
            check_share(share).map_err(|e| bad(&e))?;
        }
        check_name(name).map_err(|e| bad(&e))?;
        Ok(Self {
            server: server.to_owned(),
            share: share.to_owned(),
            name: name.to_owned(),
        })
    }

    /// `.stowage-snapshots/<name>`: the finished snapshot.
    pub fn dir(&self) -> [&str; 2] {
        [SNAPSHOTS_DIR, &self.name]
    }

    /// `.stowage-snapshots/<name>/data`: the copied tree.
    pub fn data(&self) -> [&str; 3] {
        [SNAPSHOTS_DIR, &self.name, DATA]
    }

    /// `.stowage-snapshots/<name>/record`.
    pub fn record(&self) -> [&str; 3] {
        [SNAPSHOTS_DIR, &self.name, RECORD]
    }

    /// `.stowage-work/snapshot-<name>`: where the snapshot is made.
    pub fn scratch_name(&self) -> String {
        format!("snapshot-{}", self.name)
    }
}

/// The tree inside a snapshot directory, and its record.
pub const DATA: &str = "data";
pub const RECORD: &str = "record";

/// A snapshot (or clone) name: one plain path component without `#`.
pub fn check_name(name: &str) -> Result<(), String> {
    check_component(name)?;
    if name.contains('#') {
        return Err(format!("name {name:?} contains '#'"));
    }
    Ok(())
}

/// What a snapshot's record says (a symlink's text, written once, atomically).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub source_volume_id: String,
    /// The snapshot's size as CSI reports it (its `restoreSize`): the source volume's
    /// capacity when recorded, else the bytes copied.
    pub size_bytes: u64,
    /// When the copy started (seconds, nanoseconds since the epoch).
    pub created: (i64, i32),
}

impl SnapshotRecord {
    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("a snapshot record is plain data")
    }

    pub fn decode(text: &str) -> Result<Self, BackendError> {
        serde_json::from_str(text)
            .map_err(|e| BackendError::Internal(format!("unreadable snapshot record: {e}")))
    }
}

/// The scratch directory of a copy, as a path below the export root.
pub fn scratch(name: &str) -> [&str; 2] {
    [WORK_DIR, name]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_hostile_ones_are_refused() {
        let id = SnapshotId {
            server: "10.0.0.5".into(),
            share: "/export".into(),
            name: "snapshot-1".into(),
        };
        assert_eq!(id.encode(), "nfs-snap#10.0.0.5#/export#snapshot-1");
        assert_eq!(SnapshotId::parse(&id.encode()).unwrap(), id);
        assert_eq!(SnapshotId::parse("nfs-snap###s").unwrap().server, "");
        for bad in [
            "",
            "nfs-snap#a#/x",
            "nfs-snap#a#/x#..",
            "nfs-snap#a#/x#a/b",
            "nfs-snap#a##s",
            "nfs#a#/x#s",
            "nfs-snap#a#/x/../y#s",
        ] {
            assert!(SnapshotId::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
