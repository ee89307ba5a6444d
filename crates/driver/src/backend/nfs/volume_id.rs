//! NFS volume ids: `nfs#<server>#<share>#<sub/dir>#<name>#<onDelete>`. Everything
//! DeleteVolume and the node need is in the id, so they need no parameters and no state.
//! An empty server and share mean the backend's default export. Ids are user input
//! (static PVs, any CSI client): every part is checked as a StorageClass's would be,
//! the directory by the same rule (`params::check_volume_dir`). Pure; no I/O.

use super::params::{
    OnDelete, Placement, check_component, check_server, check_share, check_volume_dir,
};

const PREFIX: &str = "nfs";

/// A parsed volume id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NfsVolumeId {
    pub server: String,
    pub share: String,
    pub sub_dir: Vec<String>,
    pub name: String,
    pub on_delete: OnDelete,
}

impl NfsVolumeId {
    pub fn new(name: &str, placement: &Placement) -> Self {
        Self {
            server: placement.server.clone(),
            share: placement.share.clone(),
            sub_dir: placement.sub_dir.clone(),
            name: name.to_owned(),
            on_delete: placement.on_delete,
        }
    }

    /// Does this id look like an NFS volume id (cheap prefix test)?
    pub fn is_nfs(id: &str) -> bool {
        id.starts_with("nfs#")
    }

    pub fn encode(&self) -> String {
        format!(
            "{PREFIX}#{}#{}#{}#{}#{}",
            self.server,
            self.share,
            self.sub_dir.join("/"),
            self.name,
            self.on_delete.as_str()
        )
    }

    /// Parse and check every part; ids are user input too (static PVs, sanity tests).
    pub fn parse(id: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("volume id {id:?} is not an NFS volume id ({why})");
        let parts: Vec<&str> = id.split('#').collect();
        let [prefix, server, share, sub_dir, name, on_delete] = parts[..] else {
            return Err(bad("expected nfs#server#share#subdir#name#onDelete"));
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
        let sub_dir: Vec<String> = sub_dir.split('/').map(str::to_owned).collect();
        check_volume_dir(&sub_dir).map_err(|e| bad(&e))?;
        check_component(name).map_err(|e| bad(&e))?;
        let on_delete = match on_delete {
            "delete" => OnDelete::Delete,
            "retain" => OnDelete::Retain,
            "archive" => OnDelete::Archive,
            other => return Err(bad(&format!("unknown onDelete {other:?}"))),
        };
        Ok(Self {
            server: server.to_owned(),
            share: share.to_owned(),
            sub_dir,
            name: name.to_owned(),
            on_delete,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let id = NfsVolumeId {
            server: "10.0.0.5".into(),
            share: "/export".into(),
            sub_dir: vec!["prod".into(), "data-db-0".into()],
            name: "pvc-1".into(),
            on_delete: OnDelete::Archive,
        };
        let text = id.encode();
        assert_eq!(text, "nfs#10.0.0.5#/export#prod/data-db-0#pvc-1#archive");
        assert_eq!(NfsVolumeId::parse(&text).unwrap(), id);
        let default = "nfs###pvc-2#pvc-2#delete";
        assert_eq!(NfsVolumeId::parse(default).unwrap().server, "");
    }

    #[test]
    fn rejects_hostile_or_malformed_ids() {
        for bad in [
            "",
            "fake-vol-id",
            "nfs#a#/x#sub#name",
            "nfs#a#/x#../etc#name#delete",
            "nfs#a#/x#sub/../..#name#delete",
            "nfs#a#/x#sub#..#delete",
            "nfs#a#/x##name#delete",
            "nfs#a#/x#sub#name#shred",
            "nfs#a##sub#name#delete",
            "nfs#a b#/x#sub#name#delete",
            "nfs#a#/x/../y#sub#name#delete",
            "ebs#a#/x#sub#name#delete",
            "nfs###.stowage#pvc-1#delete",
            "nfs###.stowage/pvc-1#pvc-1#delete",
            "nfs#a#/x#.stowage#name#retain",
            "nfs#a#/x#a#b#c#delete",
        ] {
            assert!(NfsVolumeId::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
