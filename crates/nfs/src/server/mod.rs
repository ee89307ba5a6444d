//! The embedded NFSv3 server behind `stowage local`.
//!
//! [`EmbeddedServer`] exports one local directory over NFSv3 (portmap, MOUNT and NFS
//! on a single TCP port) so that the NFS backend has a real server to talk to on a host
//! without any kernel NFS. It knows nothing about CSI, volumes or StorageClasses: it
//! mirrors a directory, nothing more.
//!
//! # How it is built
//!
//! - `MirrorFs` does the file system work on the real directory, and `MirrorVfs`
//!   exposes it through `nfs3_server`'s VFS traits (`NfsReadFileSystem` and
//!   `NfsFileSystem`). `nfs3_server` does the XDR, MOUNT and most NFS procedures.
//! - `nfs3_server` 0.11.1 cannot express three things the NFS backend relies on: it
//!   drops the attributes of MKDIR (so no mode and no owner), it answers FSSTAT with
//!   fixed made-up numbers, and it sends RMDIR and REMOVE to the same VFS call. So the
//!   port clients connect to is a small RPC relay (`Relay`): it answers portmap
//!   GETPORT, NFS MKDIR, RMDIR and FSSTAT itself, and passes every other record
//!   unchanged to the `nfs3_server` listener on a loopback port.
//! - The relay also answers SYMLINK (every CreateVolume writes its record with one):
//!   one blocking file system call instead of the loopback hop plus `nfs3_server`'s
//!   three (directory attributes before, the link, directory attributes after).
//!
//! # File handles
//!
//! A handle is the object's `(st_dev, st_ino)`; `nfs3_server` prefixes it with this
//! server's generation number. An in-memory table maps each handle this process handed
//! out to its path relative to the export. Every use re-checks that the path still
//! leads to the same `(dev, ino)`, so a handle whose object was removed or replaced is
//! `NFS3ERR_STALE`, never another file. A handle from an earlier server (older
//! generation) is `NFS3ERR_STALE` too; clients look names up again.
//!
//! # Staying inside the directory
//!
//! Names from clients must be one path component: empty, `.`, `..`, anything with `/`
//! or NUL is `NFS3ERR_INVAL`, longer than 255 bytes `NFS3ERR_NAMETOOLONG`. Paths are
//! never resolved by the kernel from the export's path: each operation walks from a
//! descriptor of the exported directory with `openat(O_NOFOLLOW | O_DIRECTORY)` one
//! component at a time and acts with the `*at` calls (`mkdirat`, `unlinkat`,
//! `renameat`, `fchownat(AT_SYMLINK_NOFOLLOW)` …). A symlink is served as a symlink
//! and never followed, even if something swaps a directory for a symlink mid-way.
//!
//! # What it does not do
//!
//! No authentication: `AUTH_UNIX` credentials are not checked and every call acts
//! with the rights of this process (ACCESS grants whatever is asked). Bind it to
//! loopback. The `nfs3_server` listener behind the relay is on a second,
//! unadvertised `127.0.0.1` port. No MKNOD, no LINK, no UDP, no NLM locking. Exclusive CREATE keeps its
//! verifier in the file's atime/mtime, as Linux knfsd does. Readdir cookies are a
//! hash of the entry name: paging is stable while the directory doesn't change.
//! The handle table keeps one entry per object handed out while the server runs.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fmt;
use std::fs::File;
use std::io::{self, Cursor};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Buf;
use nfs3_server::tcp::{NFSTcp, NFSTcpListener};
use nfs3_server::vfs::{
    DirEntryPlus, FileHandle, NextResult, NfsFileSystem, NfsReadFileSystem, ReadDirPlusIterator,
};
use nfs3_types::nfs3::{
    self as nfs, FSSTAT3args, FSSTAT3res, FSSTAT3resfail, FSSTAT3resok, MKDIR3args, MKDIR3res,
    MKDIR3resfail, MKDIR3resok, NFS_PROGRAM, Nfs3Option, RMDIR3args, RMDIR3res, RMDIR3resfail,
    RMDIR3resok, SYMLINK3args, SYMLINK3res, SYMLINK3resfail, SYMLINK3resok, createverf3, fattr3,
    filename3, ftype3, nfs_fh3, nfspath3, nfsstat3, nfstime3, post_op_attr, pre_op_attr, sattr3,
    set_atime, set_gid3, set_mode3, set_mtime, set_size3, set_uid3, specdata3, stable_how,
    wcc_attr, wcc_data,
};
use nfs3_types::rpc::{
    RPC_VERSION_2, accept_stat_data, accepted_reply, call_body, fragment_header, msg_body,
    opaque_auth, reply_body, rpc_msg,
};
use nfs3_types::xdr_codec::{Opaque, Pack, Unpack, Void};
use nfs3_types::{mount, portmap};
use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat, readlinkat, renameat};
use nix::sys::stat::{
    FchmodatFlags, FileStat, Mode, UtimensatFlags, fchmod, fchmodat, fstat, fstatat, futimens,
    mkdirat, utimensat,
};
use nix::sys::statvfs::fstatvfs;
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchown, fchownat, symlinkat, unlinkat};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, info, warn};

/// The MOUNT path of the export. The whole directory is exported; clients may also
/// mount a sub-directory (`/a/b`).
const EXPORT_PATH: &str = "/";
/// Mode of a directory created by MKDIR without a mode.
const DEFAULT_DIR_MODE: u32 = 0o755;
/// Mode of a file created by CREATE without a mode.
const DEFAULT_FILE_MODE: u32 = 0o644;
/// Longest name accepted in a directory operation (`NAME_MAX`).
const NAME_MAX: usize = 255;
/// Largest READ served at once; FSINFO advertises 1 MiB.
const MAX_READ: u32 = 1 << 20;
/// Largest RPC record accepted from either side of the relay.
const MAX_RECORD: usize = 4 << 20;

/// A running embedded NFSv3 server exporting one directory.
///
/// Dropping it stops it too; [`shutdown`](Self::shutdown) also waits until the
/// listeners are closed.
pub struct EmbeddedServer {
    local_addr: SocketAddr,
    dir: PathBuf,
    tasks: Vec<JoinHandle<()>>,
}

impl EmbeddedServer {
    /// Serves `dir` (created if missing) on `bind`, e.g. `127.0.0.1:0`.
    ///
    /// Returns once the port is listening. Portmap, MOUNT and NFS all answer on
    /// [`local_addr`](Self::local_addr): point a client's portmapper port at it.
    pub async fn start(dir: PathBuf, bind: SocketAddr) -> io::Result<Self> {
        let generation = next_generation();
        let fs = tokio::task::spawn_blocking(move || MirrorFs::open(&dir, generation))
            .await
            .map_err(io::Error::other)??;
        let fs = Arc::new(fs);

        let backend = NFSTcpListener::bind_with_generation(
            "127.0.0.1:0",
            MirrorVfs(Arc::clone(&fs)),
            generation,
        )
        .await?;
        let backend_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, backend.get_listen_port()));
        let front = TcpListener::bind(bind).await?;
        let local_addr = front.local_addr()?;
        let dir = fs.dir.clone();

        let backend_task = tokio::spawn(async move {
            // `handle_forever` returns on the first failed accept (out of
            // descriptors…): keep serving.
            loop {
                if let Err(error) = backend.handle_forever().await {
                    warn!(%error, "embedded NFS server: backend accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });
        let relay = Arc::new(Relay {
            fs,
            backend: backend_addr,
            port: local_addr.port(),
        });
        let front_task = tokio::spawn(accept_loop(front, relay));
        info!(dir = %dir.display(), %local_addr, "embedded NFSv3 server listening");
        Ok(Self {
            local_addr,
            dir,
            tasks: vec![front_task, backend_task],
        })
    }

    /// The address portmap, MOUNT and NFS answer on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The MOUNT path clients must use for the exported directory.
    pub fn export_path(&self) -> &str {
        EXPORT_PATH
    }

    /// The exported directory (canonical path).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stops accepting connections, drops the open ones and waits for the listeners
    /// to close.
    pub async fn shutdown(mut self) {
        for task in &self.tasks {
            task.abort();
        }
        for task in &mut self.tasks {
            // A cancelled task is the expected outcome; a panic has been logged by tokio.
            let _ = task.await;
        }
        info!(dir = %self.dir.display(), "embedded NFSv3 server stopped");
    }
}

impl Drop for EmbeddedServer {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl fmt::Debug for EmbeddedServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedServer")
            .field("local_addr", &self.local_addr)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// A generation number newer than any earlier one in this process, and (by the
/// clock) than those of earlier processes.
fn next_generation() -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    let previous = LAST
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |last| {
            Some(now.max(last.saturating_add(1)))
        })
        .unwrap_or_else(|last| last);
    now.max(previous.saturating_add(1))
}

mod handle;
mod mirror;
mod relay;
#[cfg(test)]
mod tests;
mod vfs;

use handle::*;
use mirror::*;
use relay::*;
use vfs::*;
