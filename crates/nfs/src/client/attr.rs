//! What the server says about an object: its kind and attributes, the outcome of
//! making a directory, the export's capacity.

use super::*;

/// What kind of object a path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileKind {
    Dir,
    File,
    Symlink,
    /// Devices, sockets, FIFOs.
    Other,
}

/// The attributes of an object on the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub kind: FileKind,
    /// Permission bits (including setuid/setgid/sticky), no file-type bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub fileid: u64,
    /// Last modification, as the server's clock says.
    pub mtime: std::time::SystemTime,
}

impl Attr {
    #[must_use]
    pub fn is_dir(&self) -> bool {
        self.kind == FileKind::Dir
    }
}

impl From<&fattr3> for Attr {
    fn from(a: &fattr3) -> Self {
        let kind = match a.type_ {
            ftype3::NF3DIR => FileKind::Dir,
            ftype3::NF3REG => FileKind::File,
            ftype3::NF3LNK => FileKind::Symlink,
            _ => FileKind::Other,
        };
        Self {
            kind,
            mode: a.mode,
            uid: a.uid,
            gid: a.gid,
            size: a.size,
            fileid: a.fileid,
            mtime: std::time::UNIX_EPOCH
                + std::time::Duration::new(u64::from(a.mtime.seconds), a.mtime.nseconds),
        }
    }
}

/// Outcome of `create_dir_all` for its last component: the directory is there either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mkdir {
    Created(Attr),
    Existed(Attr),
}

impl Mkdir {
    #[must_use]
    pub fn attr(&self) -> &Attr {
        match self {
            Self::Created(a) | Self::Existed(a) => a,
        }
    }

    #[must_use]
    pub fn created(&self) -> bool {
        matches!(self, Self::Created(_))
    }
}

/// Capacity of the export, as `FSSTAT` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsStat {
    pub total_bytes: u64,
    pub free_bytes: u64,
    /// Free bytes available to the credential in use.
    pub avail_bytes: u64,
    pub total_files: u64,
    pub free_files: u64,
    pub avail_files: u64,
}
