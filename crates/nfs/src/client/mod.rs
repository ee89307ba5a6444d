//! NFSv3 client for managing directories on an export, without a kernel mount.
//!
//! The controller uses this to create, inspect, rename and delete volume
//! directories on an NFS share. [`NfsClient`] is one lazily-connected pool for
//! one [`NfsTarget`] (server + MOUNT path); it is cheap to clone and share.
//!
//! # What this module owns
//!
//! - **Connections**: MOUNT the share, keep the root file handle, and pool up to
//!   [`ClientConfig::max_connections`] NFS connections (one call in flight per
//!   connection). Connections are opened on demand and re-opened after errors;
//!   idle ones the server closed are noticed and replaced before use. The
//!   MOUNT connection is closed right after `MNT` (no `UMNT` is sent).
//!   Every call is sent with an `AUTH_UNIX` credential (ganesha rejects
//!   `AUTH_NULL`).
//! - **Timeouts**: every connect and every RPC is bounded
//!   ([`ClientConfig::connect_timeout`], [`ClientConfig::call_timeout`]). A
//!   connection that timed out, lost its transport or returned any RPC-level
//!   error is dropped, never reused: a late reply would otherwise be read as the
//!   answer to the next call. NFS status errors (`NFS3ERR_*`) keep the connection.
//!   The transport turns end-of-stream into an error; `nfs3_client` on its own
//!   retries a zero-length read forever at 100 % CPU when the server goes away.
//! - **Path walking**: paths are slices of components, each validated
//!   ([`validate_component`]) before any I/O, and walked with `LOOKUP` from the
//!   export root. Servers have been seen to act on `..` and `/` inside
//!   `MKDIR`/`RMDIR` names, so nothing unvalidated is ever sent.
//! - **Symbolic links as small records**: one `SYMLINK` writes a target text
//!   atomically (`AlreadyExists` if the name is taken), `READLINK` reads it back;
//!   the backend keeps its per-volume records this way.
//! - **Copying a tree** (`copy.rs`): directories, files and symlinks, page by page
//!   and chunk by chunk, for snapshots and clones.
//! - **Idempotency that doesn't trust the server**: `create_dir_all` looks up
//!   before it creates (some servers create duplicate entries instead of answering
//!   `NFS3ERR_EXIST`) and re-checks after `EXIST`; `remove_all` treats entries
//!   that vanish underneath it as removed.
//!
//! # What it must not do
//!
//! No CSI or tonic types, no StorageClass semantics (sub-directory templates,
//! `onDelete`, `mountPermissions` parsing): callers translate those into plain
//! component paths, modes and owners, and map [`NfsError`] to their own errors.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nfs3_client::io::{AsyncRead, AsyncWrite};
use nfs3_client::net::Connector;
use nfs3_client::{ConnectError, MountError, Nfs3Client, Nfs3ConnectionBuilder, RpcError};
use nfs3_types::nfs3::{
    FSSTAT3args, GETATTR3args, LOOKUP3args, MKDIR3args, Nfs3Option, Nfs3Result, READDIR3args,
    READDIRPLUS3args, READLINK3args, REMOVE3args, RENAME3args, RMDIR3args, SETATTR3args,
    SYMLINK3args, cookieverf3, diropargs3, fattr3, filename3, ftype3, nfs_fh3, nfspath3, nfsstat3,
    sattr3, symlinkdata3,
};
use nfs3_types::rpc::{auth_unix, opaque_auth};
use nfs3_types::xdr_codec::Opaque;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Semaphore, SemaphorePermit};

/// Longest path component accepted (the usual `NAME_MAX`).
pub const MAX_COMPONENT_LEN: usize = 255;

/// Machine name sent in the `AUTH_UNIX` credential.
const MACHINE_NAME: &[u8] = b"stowage";

/// `READDIRPLUS` sizes: directory-entry bytes and whole-reply bytes per page.
const READDIR_DIRCOUNT: u32 = 8 * 1024;
const READDIR_MAXCOUNT: u32 = 64 * 1024;

/// `remove_all` gives up on trees deeper than this (cycles, hostile servers).
const MAX_TREE_DEPTH: usize = 1024;

/// How often `remove_all` re-lists a directory whose `RMDIR` answered
/// `NFS3ERR_NOTEMPTY` (someone keeps adding entries) before giving up.
const MAX_RMDIR_ATTEMPTS: u32 = 5;

mod attr;
mod config;
mod connection;
mod copy;
mod error;
mod path;
mod pool;
#[cfg(test)]
mod tests;
mod transport;

pub use attr::{Attr, FileKind, FsStat, Mkdir};
pub use config::{ClientConfig, NfsTarget};
pub use copy::{COPY_CHUNK, Copied};
pub use error::NfsError;
pub use path::validate_component;
pub use pool::NfsClient;

use connection::*;
use error::*;
use path::*;
use pool::*;
use transport::*;

impl NfsClient {
    /// A client for `target`. No I/O happens until the first call.
    #[must_use]
    pub fn new(target: NfsTarget, config: ClientConfig) -> Self {
        let stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| (d.as_secs() & u64::from(u32::MAX)) as u32);
        let credential = opaque_auth::auth_unix(&auth_unix {
            stamp,
            machinename: Opaque::borrowed(MACHINE_NAME),
            uid: config.uid,
            gid: config.gid,
            gids: vec![],
        });
        let permits = Semaphore::new(config.max_connections.max(1));
        Self {
            inner: Arc::new(Inner {
                target,
                config,
                credential,
                permits,
                idle: Mutex::new(Vec::new()),
                dirs: DirCache::default(),
            }),
        }
    }

    #[must_use]
    pub fn target(&self) -> &NfsTarget {
        &self.inner.target
    }

    #[must_use]
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// Attributes of `path`; `None` if any component is missing (or a prefix
    /// is not a directory). An empty path is the export root.
    pub async fn stat(&self, path: &[&str]) -> Result<Option<Attr>, NfsError> {
        validate_path(path)?;
        let mut conn = self.lease().await?;
        match conn.find(path).await? {
            Some((fh, attrs)) => Ok(Some(conn.attr_of(&fh, attrs, &join(path)).await?)),
            None => Ok(None),
        }
    }

    /// Make every component of `path` a directory, creating the missing ones with
    /// exactly `mode` (and `owner` as `(uid, gid)` if given); existing ones are left
    /// untouched. Idempotent without trusting the server (see [`Mkdir`]). The result
    /// is the last component's.
    pub async fn create_dir_all(
        &self,
        path: &[&str],
        mode: u32,
        owner: Option<(u32, u32)>,
    ) -> Result<Mkdir, NfsError> {
        validate_non_root(path)?;
        let mut conn = self.lease().await?;
        let mut dir = conn.root.clone();
        let mut result = None;
        for (i, name) in path.iter().enumerate() {
            let (made, fh) = conn
                .ensure_dir(
                    &dir,
                    name,
                    &join(&path[..=i]),
                    &join(&path[..i]),
                    mode,
                    owner,
                )
                .await?;
            dir = fh;
            result = Some(made);
        }
        Ok(result.expect("path is not empty"))
    }

    /// Remove `path` and, if it is a directory, everything below it.
    /// `Ok(false)` if it did not exist (or a prefix is not a directory). The
    /// export root can't be removed.
    pub async fn remove_all(&self, path: &[&str]) -> Result<bool, NfsError> {
        validate_non_root(path)?;
        let (parent, name) = path.split_at(path.len() - 1);
        let display = join(path);
        let mut conn = self.lease().await?;
        let Some((dir, _)) = conn.find(parent).await? else {
            return Ok(false);
        };
        let name = name[0].as_bytes();
        let (fh, attrs) = match conn.lookup(&dir, name, &display, &join(parent)).await {
            Ok(Some(found)) => found,
            Ok(None) | Err(NfsError::NotADirectory { .. }) => return Ok(false),
            Err(e) => return Err(e),
        };
        let attr = conn.attr_of(&fh, attrs, &display).await?;
        if attr.is_dir() {
            self.forget(path);
            conn.remove_tree(dir, name.to_vec(), fh, display).await?;
        } else {
            conn.unlink(&dir, name, false, &display).await?;
        }
        Ok(true)
    }

    /// Rename `from` to `to` within the export. Fails with `AlreadyExists` if
    /// `to` exists (NFS would silently replace it) and `NotFound` if `from`
    /// or `to`'s parent doesn't.
    pub async fn rename(&self, from: &[&str], to: &[&str]) -> Result<(), NfsError> {
        self.forget(from);
        self.retry_stale(|| self.rename_once(from, to)).await
    }

    async fn rename_once(&self, from: &[&str], to: &[&str]) -> Result<(), NfsError> {
        validate_non_root(from)?;
        validate_non_root(to)?;
        let (from_parent, from_name) = from.split_at(from.len() - 1);
        let (to_parent, to_name) = to.split_at(to.len() - 1);
        let (from_path, to_path) = (join(from), join(to));
        let mut conn = self.lease().await?;
        let from_dir = conn.walk_dir(from_parent).await?;
        let from_name = from_name[0].as_bytes();
        if conn
            .lookup(&from_dir, from_name, &from_path, &join(from_parent))
            .await?
            .is_none()
        {
            return Err(NfsError::NotFound { path: from_path });
        }
        let to_dir = conn.walk_dir(to_parent).await?;
        let to_name = to_name[0].as_bytes();
        if conn
            .lookup(&to_dir, to_name, &to_path, &join(to_parent))
            .await?
            .is_some()
        {
            return Err(NfsError::AlreadyExists { path: to_path });
        }
        match conn
            .rename_once(&from_dir, from_name, &to_dir, to_name)
            .await?
        {
            nfsstat3::NFS3_OK => Ok(()),
            nfsstat3::NFS3ERR_EXIST | nfsstat3::NFS3ERR_NOTEMPTY => {
                Err(NfsError::AlreadyExists { path: to_path })
            }
            nfsstat3::NFS3ERR_NOENT => Err(NfsError::NotFound { path: from_path }),
            other => Err(status_error("RENAME", &from_path, other)),
        }
    }

    /// Rename the non-directory `from` onto `to`, replacing what `to` names (RENAME's
    /// own atomic replace): how a small record is rewritten without a moment where
    /// neither the old nor the new one exists. `NotFound` if `from` is missing.
    pub async fn replace(&self, from: &[&str], to: &[&str]) -> Result<(), NfsError> {
        validate_non_root(from)?;
        validate_non_root(to)?;
        let (from_parent, from_name) = from.split_at(from.len() - 1);
        let (to_parent, to_name) = to.split_at(to.len() - 1);
        self.retry_stale(|| async move {
            let from_path = join(from);
            let mut conn = self.lease().await?;
            let from_dir = conn.walk_dir(from_parent).await?;
            let to_dir = conn.walk_dir(to_parent).await?;
            match conn
                .rename_once(
                    &from_dir,
                    from_name[0].as_bytes(),
                    &to_dir,
                    to_name[0].as_bytes(),
                )
                .await?
            {
                nfsstat3::NFS3_OK => Ok(()),
                nfsstat3::NFS3ERR_NOENT => Err(NfsError::NotFound { path: from_path }),
                other => Err(status_error("RENAME", &from_path, other)),
            }
        })
        .await
    }

    /// [`create_dir`](Self::create_dir) once, without the STALE retry.
    async fn create_dir_once(
        &self,
        path: &[&str],
        mode: u32,
        owner: Option<(u32, u32)>,
    ) -> Result<Attr, NfsError> {
        validate_non_root(path)?;
        let (parent, name) = path.split_at(path.len() - 1);
        let display = join(path);
        let mut conn = self.lease().await?;
        let dir = conn.walk_dir(parent).await?;
        match conn
            .mkdir_exact(&dir, name[0], &display, &join(parent), mode, owner)
            .await?
        {
            Ok((attr, _)) => Ok(attr),
            Err(stat) => Err(status_error("MKDIR", &display, stat)),
        }
    }

    /// `RMDIR` one empty directory. `NotFound` if it (or a parent) is missing;
    /// a non-empty directory is `Server { status: "NFS3ERR_NOTEMPTY" }`.
    async fn remove_dir_once(&self, path: &[&str]) -> Result<(), NfsError> {
        validate_non_root(path)?;
        let (parent, name) = path.split_at(path.len() - 1);
        let display = join(path);
        let mut conn = self.lease().await?;
        let dir = conn.walk_dir(parent).await?;
        let args = RMDIR3args {
            object: dirop(&dir, name[0].as_bytes()),
        };
        let conn = &mut *conn;
        let res = guarded(
            &mut conn.reusable,
            conn.call_timeout,
            "RMDIR",
            conn.nfs.rmdir(&args),
        )
        .await?;
        match status_of(&res) {
            nfsstat3::NFS3_OK => Ok(()),
            stat => Err(status_error("RMDIR", &display, stat)),
        }
    }

    /// Names in directory `path`, sorted, without `.` and `..`; `None` if the
    /// directory doesn't exist. Names that aren't UTF-8 are skipped (logged).
    pub async fn read_dir(&self, path: &[&str]) -> Result<Option<Vec<String>>, NfsError> {
        validate_path(path)?;
        let dir_path = join(path);
        let mut conn = self.lease().await?;
        let Some((fh, attrs)) = conn.find(path).await? else {
            return Ok(None);
        };
        if !path.is_empty() && !conn.attr_of(&fh, attrs, &dir_path).await?.is_dir() {
            return Err(NfsError::NotADirectory { path: dir_path });
        }
        let mut names: Vec<String> = conn
            .list(&fh, &dir_path)
            .await?
            .into_iter()
            .filter_map(|e| match String::from_utf8(e.name) {
                Ok(name) => Some(name),
                Err(e) => {
                    tracing::warn!(
                        dir = dir_path.as_str(),
                        name = %String::from_utf8_lossy(e.as_bytes()),
                        "skipping a name that is not UTF-8"
                    );
                    None
                }
            })
            .collect();
        names.sort();
        Ok(Some(names))
    }

    /// Capacity of the export.
    pub async fn fsstat(&self) -> Result<FsStat, NfsError> {
        let mut conn = self.lease().await?;
        let args = FSSTAT3args {
            fsroot: conn.root.clone(),
        };
        let conn = &mut *conn;
        let res = guarded(
            &mut conn.reusable,
            conn.call_timeout,
            "FSSTAT",
            conn.nfs.fsstat(&args),
        )
        .await?;
        match res {
            Nfs3Result::Ok(ok) => Ok(FsStat {
                total_bytes: ok.tbytes,
                free_bytes: ok.fbytes,
                avail_bytes: ok.abytes,
                total_files: ok.tfiles,
                free_files: ok.ffiles,
                avail_files: ok.afiles,
            }),
            Nfs3Result::Err((stat, _)) => Err(status_error("FSSTAT", "", stat)),
        }
    }

    /// One plain `MKDIR` of the last component (the parent must exist, its handle
    /// cached after the first walk), the mode made exact with one `SETATTR` when the
    /// server did not apply it. An existing entry is `AlreadyExists` — as far as the
    /// server says so: callers that need idempotency look the name up themselves, or
    /// use [`create_dir_all`](Self::create_dir_all).
    pub async fn create_dir(
        &self,
        path: &[&str],
        mode: u32,
        owner: Option<(u32, u32)>,
    ) -> Result<Attr, NfsError> {
        self.retry_stale(|| self.create_dir_once(path, mode, owner))
            .await
    }

    /// `RMDIR` one empty directory. `NotFound` if it (or a parent) is missing;
    /// a non-empty directory is `Server { status: "NFS3ERR_NOTEMPTY" }`.
    pub async fn remove_dir(&self, path: &[&str]) -> Result<(), NfsError> {
        self.forget(path);
        self.retry_stale(|| self.remove_dir_once(path)).await
    }

    /// Create the symbolic link `path` pointing at `target` (any bytes but NUL, at
    /// most 1024): one `SYMLINK` call, atomic, so it doubles as a small record.
    /// `AlreadyExists` when the name exists.
    pub async fn symlink(&self, path: &[&str], target: &str) -> Result<(), NfsError> {
        validate_non_root(path)?;
        if target.is_empty() || target.len() > 1024 || target.contains('\0') {
            return Err(NfsError::Protocol(format!(
                "symlink target for `{}` must be 1..=1024 bytes without NUL",
                join(path)
            )));
        }
        self.retry_stale(|| async move {
            let (parent, name) = path.split_at(path.len() - 1);
            let display = join(path);
            let mut conn = self.lease().await?;
            let dir = conn.walk_dir(parent).await?;
            let args = SYMLINK3args {
                where_: dirop(&dir, name[0].as_bytes()),
                symlink: symlinkdata3 {
                    symlink_attributes: sattr3 {
                        mode: Nfs3Option::Some(0o777),
                        ..sattr3::default()
                    },
                    symlink_data: nfspath3(Opaque::borrowed(target.as_bytes())),
                },
            };
            let conn = &mut *conn;
            let res = guarded(
                &mut conn.reusable,
                conn.call_timeout,
                "SYMLINK",
                conn.nfs.symlink(&args),
            )
            .await?;
            match status_of(&res) {
                nfsstat3::NFS3_OK => Ok(()),
                stat => Err(status_error("SYMLINK", &display, stat)),
            }
        })
        .await
    }

    /// The target of symbolic link `path`; `None` if it doesn't exist.
    pub async fn readlink(&self, path: &[&str]) -> Result<Option<String>, NfsError> {
        validate_non_root(path)?;
        self.retry_stale(|| async move {
            let (parent, name) = path.split_at(path.len() - 1);
            let display = join(path);
            let mut conn = self.lease().await?;
            let dir = match conn.walk_dir(parent).await {
                Ok(dir) => dir,
                Err(NfsError::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(e),
            };
            let Some((fh, _)) = conn
                .lookup(&dir, name[0].as_bytes(), &display, &join(parent))
                .await?
            else {
                return Ok(None);
            };
            let conn = &mut *conn;
            let res = guarded(
                &mut conn.reusable,
                conn.call_timeout,
                "READLINK",
                conn.nfs.readlink(&READLINK3args { symlink: fh }),
            )
            .await?;
            match res {
                Nfs3Result::Ok(ok) => String::from_utf8(ok.data.0.to_vec())
                    .map(Some)
                    .map_err(|_| NfsError::Protocol(format!("`{display}` is not UTF-8"))),
                Nfs3Result::Err((nfsstat3::NFS3ERR_NOENT, _)) => Ok(None),
                Nfs3Result::Err((stat, _)) => Err(status_error("READLINK", &display, stat)),
            }
        })
        .await
    }

    /// `REMOVE` one non-directory entry (file, symlink); one that is not there (or
    /// whose directory is not) counts as removed.
    pub async fn remove_file(&self, path: &[&str]) -> Result<(), NfsError> {
        validate_non_root(path)?;
        self.retry_stale(|| async move {
            let (parent, name) = path.split_at(path.len() - 1);
            let mut conn = self.lease().await?;
            match conn.walk_dir(parent).await {
                Ok(dir) => {
                    conn.unlink(&dir, name[0].as_bytes(), false, &join(path))
                        .await
                }
                Err(NfsError::NotFound { .. }) => Ok(()),
                Err(e) => Err(e),
            }
        })
        .await
    }
}
