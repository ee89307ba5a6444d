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

// ---------------------------------------------------------------------------
// RPC relay: the public port
// ---------------------------------------------------------------------------

/// Answers the calls `nfs3_server` gets wrong and relays the others to it.
struct Relay {
    fs: Arc<MirrorFs>,
    backend: SocketAddr,
    port: u16,
}

/// The calls the relay answers itself.
#[derive(Clone, Copy, Debug)]
enum Intercepted {
    GetPort,
    Mkdir,
    Symlink,
    Rmdir,
    Fsstat,
}

impl Intercepted {
    fn of(call: &call_body<'_>) -> Option<Self> {
        const GETPORT: u32 = portmap::PMAP_PROG::PMAPPROC_GETPORT as u32;
        const MKDIR: u32 = NFS_PROGRAM::NFSPROC3_MKDIR as u32;
        const SYMLINK: u32 = NFS_PROGRAM::NFSPROC3_SYMLINK as u32;
        const RMDIR: u32 = NFS_PROGRAM::NFSPROC3_RMDIR as u32;
        const FSSTAT: u32 = NFS_PROGRAM::NFSPROC3_FSSTAT as u32;
        if call.rpcvers != RPC_VERSION_2 {
            return None;
        }
        match (call.prog, call.vers, call.proc) {
            (portmap::PROGRAM, portmap::VERSION, GETPORT) => Some(Self::GetPort),
            (nfs::PROGRAM, nfs::VERSION, MKDIR) => Some(Self::Mkdir),
            (nfs::PROGRAM, nfs::VERSION, SYMLINK) => Some(Self::Symlink),
            (nfs::PROGRAM, nfs::VERSION, RMDIR) => Some(Self::Rmdir),
            (nfs::PROGRAM, nfs::VERSION, FSSTAT) => Some(Self::Fsstat),
            _ => None,
        }
    }
}

async fn accept_loop(listener: TcpListener, relay: Arc<Relay>) {
    // Dropping the set (when this task is aborted) aborts every connection.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    // Every TCP probe is a connection: debug, never info.
                    debug!(%peer, "NFS connection opened");
                    let relay = Arc::clone(&relay);
                    connections.spawn(async move {
                        match relay.serve(stream).await {
                            Ok(()) => debug!(%peer, "NFS connection closed"),
                            Err(error) => debug!(%peer, %error, "NFS connection ended"),
                        }
                    });
                }
                Err(error) => {
                    // Out of descriptors and the like: don't spin.
                    warn!(%error, "embedded NFS server: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

impl Relay {
    /// Serves one client connection, with its own connection to the backend.
    async fn serve(&self, client: TcpStream) -> io::Result<()> {
        client.set_nodelay(true)?;
        let backend = TcpStream::connect(self.backend).await?;
        backend.set_nodelay(true)?;
        let (mut client_rx, mut client_tx) = client.into_split();
        let (mut backend_rx, mut backend_tx) = backend.into_split();
        let (replies, mut outbox) = mpsc::channel::<Vec<u8>>(32);
        let backend_replies = replies.clone();

        let to_client = async move {
            while let Some(record) = outbox.recv().await {
                write_record(&mut client_tx, &record).await?;
            }
            client_tx.shutdown().await
        };
        let from_backend = async move {
            while let Some(record) = read_record(&mut backend_rx).await? {
                if backend_replies.send(record).await.is_err() {
                    break;
                }
            }
            Ok(())
        };
        let from_client = async move {
            while let Some(record) = read_record(&mut client_rx).await? {
                match self.answer(&record).await {
                    Some(reply) => {
                        if replies.send(reply).await.is_err() {
                            break;
                        }
                    }
                    None => write_record(&mut backend_tx, &record).await?,
                }
            }
            backend_tx.shutdown().await
        };
        // When either side closes, the connection is over: the losing reader is
        // dropped with its sender, and `to_client` flushes what is queued, then closes.
        let relay_calls = async move {
            tokio::select! {
                done = from_client => done,
                done = from_backend => done,
            }
        };
        tokio::try_join!(to_client, relay_calls).map(|_| ())
    }

    /// The reply to `record` if the relay answers it itself, else `None`.
    async fn answer(&self, record: &[u8]) -> Option<Vec<u8>> {
        let (msg, header_len) = rpc_msg::unpack(&mut Cursor::new(record)).ok()?;
        let msg_body::CALL(call) = &msg.body else {
            return None;
        };
        let op = Intercepted::of(call)?;
        let args = record.get(header_len..)?;
        debug!(
            xid = msg.xid,
            ?op,
            "embedded NFS server: answering in the relay"
        );
        Some(self.run(op, msg.xid, args).await)
    }

    async fn run(&self, op: Intercepted, xid: u32, args: &[u8]) -> Vec<u8> {
        match op {
            Intercepted::GetPort => match unpack_all::<portmap::mapping>(args) {
                Some(m) => success(xid, &self.getport(&m)),
                None => garbage_args(xid),
            },
            Intercepted::Mkdir => match unpack_all::<MKDIR3args<'_>>(args) {
                Some(args) => success(xid, &self.mkdir(args).await),
                None => garbage_args(xid),
            },
            Intercepted::Symlink => match unpack_all::<SYMLINK3args<'_>>(args) {
                Some(args) => success(xid, &self.symlink(args).await),
                None => garbage_args(xid),
            },
            Intercepted::Rmdir => match unpack_all::<RMDIR3args<'_>>(args) {
                Some(args) => success(xid, &self.rmdir(args).await),
                None => garbage_args(xid),
            },
            Intercepted::Fsstat => match unpack_all::<FSSTAT3args>(args) {
                Some(args) => success(xid, &self.fsstat(&args).await),
                None => garbage_args(xid),
            },
        }
    }

    /// Every program this server speaks is on this one port (TCP only).
    fn getport(&self, m: &portmap::mapping) -> u32 {
        let served = m.prog == nfs::PROGRAM || m.prog == mount::PROGRAM;
        if served && m.prot == portmap::IPPROTO_TCP {
            u32::from(self.port)
        } else {
            0
        }
    }

    /// MKDIR and SYMLINK: a blocking call that makes one entry in the directory `dir`.
    /// Gives the new object's handle and attributes, or the status, each with the
    /// directory's attributes before and after.
    async fn make_entry(
        &self,
        dir: &nfs_fh3,
        make: impl FnOnce(&MirrorFs, NodeId) -> (Result<(NodeId, fattr3), nfsstat3>, wcc_data)
        + Send
        + 'static,
    ) -> Result<(nfs_fh3, fattr3, wcc_data), (nfsstat3, wcc_data)> {
        let dir = self
            .fs
            .decode(dir)
            .map_err(|stat| (stat, wcc_data::default()))?;
        let fs = Arc::clone(&self.fs);
        match tokio::task::spawn_blocking(move || make(&fs, dir)).await {
            Ok((Ok((id, attr)), dir_wcc)) => Ok((self.fs.encode(id), attr, dir_wcc)),
            Ok((Err(stat), dir_wcc)) => Err((stat, dir_wcc)),
            Err(_) => Err((nfsstat3::NFS3ERR_SERVERFAULT, wcc_data::default())),
        }
    }

    async fn mkdir(&self, args: MKDIR3args<'_>) -> MKDIR3res {
        let (name, attrs) = (args.where_.name.as_ref().to_vec(), args.attributes);
        let made = self
            .make_entry(&args.where_.dir, move |fs, dir| {
                fs.mkdir(dir, &name, &attrs)
            })
            .await;
        match made {
            Ok((fh, attr, dir_wcc)) => MKDIR3res::Ok(MKDIR3resok {
                obj: Nfs3Option::Some(fh),
                obj_attributes: Nfs3Option::Some(attr),
                dir_wcc,
            }),
            Err((stat, dir_wcc)) => MKDIR3res::Err((stat, MKDIR3resfail { dir_wcc })),
        }
    }

    async fn symlink(&self, args: SYMLINK3args<'_>) -> SYMLINK3res {
        let name = args.where_.name.as_ref().to_vec();
        let target = args.symlink.symlink_data.as_ref().to_vec();
        let attrs = args.symlink.symlink_attributes;
        let made = self
            .make_entry(&args.where_.dir, move |fs, dir| {
                fs.symlink(dir, &name, &target, &attrs)
            })
            .await;
        match made {
            Ok((fh, attr, dir_wcc)) => SYMLINK3res::Ok(SYMLINK3resok {
                obj: Nfs3Option::Some(fh),
                obj_attributes: Nfs3Option::Some(attr),
                dir_wcc,
            }),
            Err((stat, dir_wcc)) => SYMLINK3res::Err((stat, SYMLINK3resfail { dir_wcc })),
        }
    }

    async fn rmdir(&self, args: RMDIR3args<'_>) -> RMDIR3res {
        let dir = match self.fs.decode(&args.object.dir) {
            Ok(dir) => dir,
            Err(stat) => {
                return RMDIR3res::Err((
                    stat,
                    RMDIR3resfail {
                        dir_wcc: wcc_data::default(),
                    },
                ));
            }
        };
        let name = args.object.name.as_ref().to_vec();
        let fs = Arc::clone(&self.fs);
        let outcome = tokio::task::spawn_blocking(move || fs.rmdir(dir, &name)).await;
        match outcome {
            Ok((Ok(()), dir_wcc)) => RMDIR3res::Ok(RMDIR3resok { dir_wcc }),
            Ok((Err(stat), dir_wcc)) => RMDIR3res::Err((stat, RMDIR3resfail { dir_wcc })),
            Err(_) => RMDIR3res::Err((
                nfsstat3::NFS3ERR_SERVERFAULT,
                RMDIR3resfail {
                    dir_wcc: wcc_data::default(),
                },
            )),
        }
    }

    async fn fsstat(&self, args: &FSSTAT3args) -> FSSTAT3res {
        let id = match self.fs.decode(&args.fsroot) {
            Ok(id) => id,
            Err(stat) => return FSSTAT3res::Err((stat, FSSTAT3resfail::default())),
        };
        let fs = Arc::clone(&self.fs);
        match tokio::task::spawn_blocking(move || fs.fsstat(id)).await {
            Ok(Ok(ok)) => FSSTAT3res::Ok(ok),
            Ok(Err(stat)) => FSSTAT3res::Err((stat, FSSTAT3resfail::default())),
            Err(_) => FSSTAT3res::Err((nfsstat3::NFS3ERR_SERVERFAULT, FSSTAT3resfail::default())),
        }
    }
}

/// Unpacks a call's arguments, which must fill the rest of the record.
fn unpack_all<T: Unpack>(args: &[u8]) -> Option<T> {
    let (value, used) = T::unpack(&mut Cursor::new(args)).ok()?;
    (used == args.len()).then_some(value)
}

fn accepted(xid: u32, reply_data: accept_stat_data, body: &impl Pack) -> io::Result<Vec<u8>> {
    let msg = rpc_msg {
        xid,
        body: msg_body::REPLY(reply_body::MSG_ACCEPTED(accepted_reply {
            verf: opaque_auth::default(),
            reply_data,
        })),
    };
    let mut out = Vec::with_capacity(msg.packed_size() + body.packed_size());
    msg.pack(&mut out).map_err(io::Error::other)?;
    body.pack(&mut out).map_err(io::Error::other)?;
    Ok(out)
}

fn success(xid: u32, body: &impl Pack) -> Vec<u8> {
    accepted(xid, accept_stat_data::SUCCESS, body).unwrap_or_else(|error| {
        warn!(%error, xid, "embedded NFS server: cannot encode a reply");
        system_err(xid)
    })
}

fn garbage_args(xid: u32) -> Vec<u8> {
    accepted(xid, accept_stat_data::GARBAGE_ARGS, &Void).unwrap_or_default()
}

fn system_err(xid: u32) -> Vec<u8> {
    accepted(xid, accept_stat_data::SYSTEM_ERR, &Void).unwrap_or_default()
}

/// Reads one RPC record (all its fragments); `None` at a clean end of stream.
async fn read_record(r: &mut (impl AsyncRead + Unpin)) -> io::Result<Option<Vec<u8>>> {
    let mut record = Vec::new();
    loop {
        let mut header = [0u8; 4];
        if let Err(error) = r.read_exact(&mut header).await {
            if error.kind() == io::ErrorKind::UnexpectedEof && record.is_empty() {
                return Ok(None);
            }
            return Err(error);
        }
        let header = fragment_header::from(header);
        let start = record.len();
        let len = header.fragment_length() as usize;
        if start + len > MAX_RECORD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("RPC record larger than {MAX_RECORD} bytes"),
            ));
        }
        record.resize(start + len, 0);
        r.read_exact(&mut record[start..]).await?;
        if header.eof() {
            return Ok(Some(record));
        }
    }
}

/// Writes `record` as a single last fragment, header and body in one vectored write
/// (two writes on a no-delay socket are two segments, and the reader may wake for
/// each), without copying the body.
async fn write_record(w: &mut (impl AsyncWrite + Unpin), record: &[u8]) -> io::Result<()> {
    let len = u32::try_from(record.len())
        .ok()
        .filter(|len| *len <= fragment_header::MASK)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "RPC record too large"))?;
    let header = fragment_header::new(len, true).into_xdr_buf();
    w.write_all_buf(&mut Buf::chain(header.as_slice(), record))
        .await
}

// ---------------------------------------------------------------------------
// File handles
// ---------------------------------------------------------------------------

/// `(st_dev, st_ino)` of an object, little-endian: the part of the NFS handle that
/// belongs to the VFS (`nfs3_server` adds the generation in front).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct NodeId([u8; 16]);

impl NodeId {
    fn new(dev: u64, ino: u64) -> Self {
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&dev.to_le_bytes());
        bytes[8..].copy_from_slice(&ino.to_le_bytes());
        Self(bytes)
    }

    fn of(st: &FileStat) -> Self {
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

// ---------------------------------------------------------------------------
// The mirror file system (blocking calls; run them off the async threads)
// ---------------------------------------------------------------------------

/// The exported directory, and the handles handed out for it.
struct MirrorFs {
    /// Canonical path of the exported directory (for logs and `dir()`).
    dir: PathBuf,
    /// The exported directory, opened once: every path is walked from here.
    root: OwnedFd,
    root_id: NodeId,
    generation: u64,
    /// Handle → path relative to `root`, built from validated names only.
    paths: RwLock<HashMap<NodeId, PathBuf>>,
}

/// An object found from its handle: its parent directory (`None` for the root) and
/// its current status.
struct Resolved {
    rel: PathBuf,
    parent: Option<OwnedFd>,
    st: FileStat,
}

/// Where an attribute change applies: the exported directory itself, or a name in
/// an opened directory (never followed if it is a symlink).
#[derive(Clone, Copy)]
enum At<'a> {
    Root(BorrowedFd<'a>),
    Child(BorrowedFd<'a>, &'a OsStr),
}

impl Resolved {
    fn at<'a>(&'a self, root: &'a OwnedFd) -> At<'a> {
        match (&self.parent, self.rel.file_name()) {
            (Some(parent), Some(name)) => At::Child(parent.as_fd(), name),
            _ => At::Root(root.as_fd()),
        }
    }
}

impl MirrorFs {
    fn open(dir: &Path, generation: u64) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let dir = std::fs::canonicalize(dir)?;
        let file = File::open(&dir)?;
        if !file.metadata()?.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                format!("{} is not a directory", dir.display()),
            ));
        }
        let root = OwnedFd::from(file);
        let root_id = NodeId::of(&fstat(&root)?);
        let mut paths = HashMap::new();
        paths.insert(root_id, PathBuf::new());
        Ok(Self {
            dir,
            root,
            root_id,
            generation,
            paths: RwLock::new(paths),
        })
    }

    /// The NFS handle of `id` as `nfs3_server` encodes it.
    fn encode(&self, id: NodeId) -> nfs_fh3 {
        let mut data = Vec::with_capacity(8 + id.len());
        data.extend_from_slice(&self.generation.to_le_bytes());
        data.extend_from_slice(id.as_bytes());
        nfs_fh3 {
            data: Opaque::owned(data),
        }
    }

    /// Reads an NFS handle as `nfs3_server` does: an older generation is STALE.
    fn decode(&self, fh: &nfs_fh3) -> Result<NodeId, nfsstat3> {
        let data: &[u8] = fh.data.as_ref();
        let (generation, id) = data
            .split_first_chunk::<8>()
            .ok_or(nfsstat3::NFS3ERR_BADHANDLE)?;
        let generation = u64::from_le_bytes(*generation);
        if generation < self.generation {
            return Err(nfsstat3::NFS3ERR_STALE);
        }
        if generation > self.generation {
            return Err(nfsstat3::NFS3ERR_BADHANDLE);
        }
        NodeId::from_bytes(id).ok_or(nfsstat3::NFS3ERR_BADHANDLE)
    }

    // -- the handle table --------------------------------------------------

    fn path_of(&self, id: NodeId) -> Result<PathBuf, nfsstat3> {
        let paths = self.paths.read().unwrap_or_else(PoisonError::into_inner);
        paths.get(&id).cloned().ok_or(nfsstat3::NFS3ERR_STALE)
    }

    fn remember(&self, rel: PathBuf, st: &FileStat) -> NodeId {
        let id = NodeId::of(st);
        let mut paths = self.paths.write().unwrap_or_else(PoisonError::into_inner);
        paths.insert(id, rel);
        id
    }

    /// Forgets `rel` and everything below it.
    fn forget(&self, rel: &Path) {
        let mut paths = self.paths.write().unwrap_or_else(PoisonError::into_inner);
        paths.retain(|_, path| !path.starts_with(rel));
    }

    /// Records that `from` (and everything below it) is now `to`.
    fn moved(&self, from: &Path, to: &Path) {
        let mut paths = self.paths.write().unwrap_or_else(PoisonError::into_inner);
        paths.retain(|_, path| !path.starts_with(to));
        for path in paths.values_mut() {
            if let Ok(rest) = path.strip_prefix(from) {
                *path = if rest.as_os_str().is_empty() {
                    to.to_path_buf()
                } else {
                    to.join(rest)
                };
            }
        }
    }

    // -- walking -------------------------------------------------------------

    /// Opens the directory at `rel` from the root, one component at a time, never
    /// following a symlink. `last` is added to the flags of the final open.
    fn walk(&self, rel: &Path, last: OFlag) -> nix::Result<OwnedFd> {
        let base = OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let mut names = Vec::new();
        for component in rel.components() {
            match component {
                Component::Normal(name) => names.push(name),
                _ => return Err(Errno::EINVAL),
            }
        }
        let Some((last_name, parents)) = names.split_last() else {
            return openat(&self.root, ".", base | last, Mode::empty());
        };
        let mut dir: Option<OwnedFd> = None;
        for name in parents {
            let from = dir.as_ref().map_or(self.root.as_fd(), AsFd::as_fd);
            let next = openat(from, *name, base | OFlag::O_PATH, Mode::empty())?;
            dir = Some(next);
        }
        let from = dir.as_ref().map_or(self.root.as_fd(), AsFd::as_fd);
        openat(from, *last_name, base | last, Mode::empty())
    }

    /// Finds the object behind `id`, checking it is still the same object.
    fn resolve(&self, id: NodeId) -> Result<Resolved, nfsstat3> {
        let rel = self.path_of(id)?;
        let (parent, st) = match (rel.parent(), rel.file_name()) {
            (Some(parent_rel), Some(name)) => {
                let parent = self.walk(parent_rel, OFlag::O_PATH).map_err(gone)?;
                let st = fstatat(&parent, name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(gone)?;
                (Some(parent), st)
            }
            _ => (None, fstat(&self.root).map_err(nfs_err)?),
        };
        if NodeId::of(&st) != id {
            return Err(nfsstat3::NFS3ERR_STALE);
        }
        Ok(Resolved { rel, parent, st })
    }

    /// Opens the directory behind `id` (`O_PATH` for `*at` calls, `O_RDONLY` to list
    /// it), with its relative path.
    fn open_dir(&self, id: NodeId, flags: OFlag) -> Result<(OwnedFd, PathBuf), nfsstat3> {
        let rel = self.path_of(id)?;
        match self.walk(&rel, flags) {
            Ok(fd) => {
                if NodeId::of(&fstat(&fd).map_err(nfs_err)?) != id {
                    return Err(nfsstat3::NFS3ERR_STALE);
                }
                Ok((fd, rel))
            }
            Err(Errno::ENOTDIR | Errno::ELOOP) if self.resolve(id).is_ok() => {
                Err(nfsstat3::NFS3ERR_NOTDIR)
            }
            Err(error) => Err(gone(error)),
        }
    }

    /// Opens the regular file behind `id`.
    fn open_file(&self, id: NodeId, flags: OFlag) -> Result<File, nfsstat3> {
        let r = self.resolve(id)?;
        match kind(&r.st) {
            ftype3::NF3REG => {}
            ftype3::NF3DIR => return Err(nfsstat3::NFS3ERR_ISDIR),
            _ => return Err(nfsstat3::NFS3ERR_INVAL),
        }
        let (Some(parent), Some(name)) = (&r.parent, r.rel.file_name()) else {
            return Err(nfsstat3::NFS3ERR_ISDIR);
        };
        let flags = flags | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
        let fd = openat(parent, name, flags, Mode::empty()).map_err(nfs_err)?;
        if NodeId::of(&fstat(&fd).map_err(nfs_err)?) != id {
            return Err(nfsstat3::NFS3ERR_STALE);
        }
        Ok(File::from(fd))
    }

    // -- operations ----------------------------------------------------------

    fn getattr(&self, id: NodeId) -> Result<fattr3, nfsstat3> {
        self.resolve(id).map(|r| fattr(&r.st))
    }

    fn lookup(&self, dir: NodeId, name: &[u8]) -> Result<NodeId, nfsstat3> {
        let name = check_name(name)?;
        let (dfd, rel) = self.open_dir(dir, OFlag::O_PATH)?;
        let st = fstatat(&dfd, name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(nfs_err)?;
        Ok(self.remember(rel.join(name), &st))
    }

    fn setattr(&self, id: NodeId, attrs: &sattr3) -> Result<fattr3, nfsstat3> {
        let r = self.resolve(id)?;
        set_attrs(r.at(&self.root), kind(&r.st), id, attrs)?;
        self.getattr(id)
    }

    /// MKDIR with its attributes: the mode is applied exactly (no umask), the owner
    /// if given. An existing name is `NFS3ERR_EXIST`.
    fn mkdir(
        &self,
        dir: NodeId,
        name: &[u8],
        attrs: &sattr3,
    ) -> (Result<(NodeId, fattr3), nfsstat3>, wcc_data) {
        let (dfd, rel) = match self.open_dir(dir, OFlag::O_PATH) {
            Ok(opened) => opened,
            Err(stat) => return (Err(stat), wcc_data::default()),
        };
        let before = pre_op(&dfd);
        let result = self.mkdir_in(&dfd, &rel, name, attrs);
        (
            result,
            wcc_data {
                before,
                after: post_op(&dfd),
            },
        )
    }

    fn mkdir_in(
        &self,
        dfd: &OwnedFd,
        rel: &Path,
        name: &[u8],
        attrs: &sattr3,
    ) -> Result<(NodeId, fattr3), nfsstat3> {
        let name = check_name(name)?;
        let mode = requested_mode(attrs).unwrap_or(DEFAULT_DIR_MODE);
        mkdirat(dfd, name, Mode::from_bits_truncate(mode)).map_err(nfs_err)?;
        let st = fstatat(dfd, name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(nfs_err)?;
        let id = NodeId::of(&st);
        let exact = sattr3 {
            mode: set_mode3::Some(mode),
            size: set_size3::None,
            ..attrs.clone()
        };
        if let Err(stat) = set_attrs(At::Child(dfd.as_fd(), name), ftype3::NF3DIR, id, &exact) {
            // Don't leave a directory with the wrong mode or owner behind.
            let _ = unlinkat(dfd, name, UnlinkatFlags::RemoveDir);
            return Err(stat);
        }
        let st = fstatat(dfd, name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(nfs_err)?;
        Ok((self.remember(rel.join(name), &st), fattr(&st)))
    }

    /// RMDIR: only directories, only empty ones.
    fn rmdir(&self, dir: NodeId, name: &[u8]) -> (Result<(), nfsstat3>, wcc_data) {
        let (dfd, rel) = match self.open_dir(dir, OFlag::O_PATH) {
            Ok(opened) => opened,
            Err(stat) => return (Err(stat), wcc_data::default()),
        };
        let before = pre_op(&dfd);
        let result = (|| {
            let name = check_name(name)?;
            let st = fstatat(&dfd, name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(nfs_err)?;
            if kind(&st) != ftype3::NF3DIR {
                return Err(nfsstat3::NFS3ERR_NOTDIR);
            }
            unlinkat(&dfd, name, UnlinkatFlags::RemoveDir).map_err(|error| match error {
                Errno::ENOTEMPTY | Errno::EEXIST => nfsstat3::NFS3ERR_NOTEMPTY,
                error => nfs_err(error),
            })?;
            self.forget(&rel.join(name));
            Ok(())
        })();
        (
            result,
            wcc_data {
                before,
                after: post_op(&dfd),
            },
        )
    }

    /// REMOVE: anything but a directory (a symlink itself, never its target).
    fn remove(&self, dir: NodeId, name: &[u8]) -> Result<(), nfsstat3> {
        let name = check_name(name)?;
        let (dfd, rel) = self.open_dir(dir, OFlag::O_PATH)?;
        let st = fstatat(&dfd, name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(nfs_err)?;
        if kind(&st) == ftype3::NF3DIR {
            return Err(nfsstat3::NFS3ERR_ISDIR);
        }
        unlinkat(&dfd, name, UnlinkatFlags::NoRemoveDir).map_err(nfs_err)?;
        self.forget(&rel.join(name));
        Ok(())
    }

    /// RENAME as RFC 1813 says: an existing target is replaced only by an object of
    /// the same kind, and a directory only if empty; otherwise `NFS3ERR_EXIST`.
    fn rename(
        &self,
        from_dir: NodeId,
        from_name: &[u8],
        to_dir: NodeId,
        to_name: &[u8],
    ) -> Result<(), nfsstat3> {
        let from_name = check_name(from_name)?;
        let to_name = check_name(to_name)?;
        let (from_fd, from_rel) = self.open_dir(from_dir, OFlag::O_PATH)?;
        let (to_fd, to_rel) = self.open_dir(to_dir, OFlag::O_PATH)?;
        let (from_rel, to_rel) = (from_rel.join(from_name), to_rel.join(to_name));
        let src = fstatat(&from_fd, from_name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(nfs_err)?;
        if from_rel == to_rel {
            return Ok(());
        }
        match fstatat(&to_fd, to_name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(dst) if NodeId::of(&dst) == NodeId::of(&src) => return Ok(()),
            Ok(dst) if (kind(&dst) == ftype3::NF3DIR) != (kind(&src) == ftype3::NF3DIR) => {
                return Err(nfsstat3::NFS3ERR_EXIST);
            }
            Ok(_) | Err(Errno::ENOENT) => {}
            Err(error) => return Err(nfs_err(error)),
        }
        renameat(&from_fd, from_name, &to_fd, to_name).map_err(|error| match error {
            Errno::ENOTEMPTY | Errno::EEXIST | Errno::ENOTDIR | Errno::EISDIR => {
                nfsstat3::NFS3ERR_EXIST
            }
            error => nfs_err(error),
        })?;
        self.moved(&from_rel, &to_rel);
        Ok(())
    }

    /// CREATE (UNCHECKED or GUARDED; the GUARDED check is done by `nfs3_server`).
    fn create(
        &self,
        dir: NodeId,
        name: &[u8],
        attrs: &sattr3,
    ) -> Result<(NodeId, fattr3), nfsstat3> {
        let name = check_name(name)?;
        let (dfd, rel) = self.open_dir(dir, OFlag::O_PATH)?;
        let existed = match fstatat(&dfd, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) if kind(&st) == ftype3::NF3REG => true,
            Ok(_) => return Err(nfsstat3::NFS3ERR_EXIST),
            Err(Errno::ENOENT) => false,
            Err(error) => return Err(nfs_err(error)),
        };
        let mode = requested_mode(attrs).unwrap_or(DEFAULT_FILE_MODE);
        let flags = OFlag::O_CREAT
            | OFlag::O_WRONLY
            | OFlag::O_NOFOLLOW
            | OFlag::O_NONBLOCK
            | OFlag::O_CLOEXEC;
        let fd =
            openat(&dfd, name, flags, Mode::from_bits_truncate(mode)).map_err(
                |error| match error {
                    Errno::ELOOP | Errno::EISDIR => nfsstat3::NFS3ERR_EXIST,
                    error => nfs_err(error),
                },
            )?;
        let st = fstat(&fd).map_err(nfs_err)?;
        let id = NodeId::of(&st);
        let mut attrs = attrs.clone();
        if !existed {
            attrs.mode = set_mode3::Some(mode);
        }
        set_attrs(At::Child(dfd.as_fd(), name), ftype3::NF3REG, id, &attrs)?;
        let st = fstat(&fd).map_err(nfs_err)?;
        Ok((self.remember(rel.join(name), &st), fattr(&st)))
    }

    /// Exclusive CREATE: the verifier is kept in atime/mtime so that a retransmitted
    /// call succeeds.
    fn create_exclusive(
        &self,
        dir: NodeId,
        name: &[u8],
        verf: createverf3,
    ) -> Result<NodeId, nfsstat3> {
        let name = check_name(name)?;
        let (dfd, rel) = self.open_dir(dir, OFlag::O_PATH)?;
        let (hi, lo) = verf.0.split_at(4);
        let word = |b: &[u8]| b.try_into().map_or(0, u32::from_be_bytes);
        let (atime, mtime) = (i64::from(word(hi)), i64::from(word(lo)));
        let flags =
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        match openat(&dfd, name, flags, Mode::from_bits_truncate(0o600)) {
            Ok(fd) => {
                let times = (TimeSpec::new(atime, 0), TimeSpec::new(mtime, 0));
                futimens(&fd, &times.0, &times.1).map_err(nfs_err)?;
                let st = fstat(&fd).map_err(nfs_err)?;
                Ok(self.remember(rel.join(name), &st))
            }
            Err(Errno::EEXIST) => {
                let st = fstatat(&dfd, name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(nfs_err)?;
                let same =
                    kind(&st) == ftype3::NF3REG && st.st_atime == atime && st.st_mtime == mtime;
                if same {
                    Ok(self.remember(rel.join(name), &st))
                } else {
                    Err(nfsstat3::NFS3ERR_EXIST)
                }
            }
            Err(error) => Err(nfs_err(error)),
        }
    }

    /// SYMLINK, with the directory's attributes before and after.
    fn symlink(
        &self,
        dir: NodeId,
        name: &[u8],
        target: &[u8],
        attrs: &sattr3,
    ) -> (Result<(NodeId, fattr3), nfsstat3>, wcc_data) {
        let (dfd, rel) = match self.open_dir(dir, OFlag::O_PATH) {
            Ok(opened) => opened,
            Err(stat) => return (Err(stat), wcc_data::default()),
        };
        let before = pre_op(&dfd);
        let result = self.symlink_in(&dfd, &rel, name, target, attrs);
        (
            result,
            wcc_data {
                before,
                after: post_op(&dfd),
            },
        )
    }

    fn symlink_in(
        &self,
        dfd: &OwnedFd,
        rel: &Path,
        name: &[u8],
        target: &[u8],
        attrs: &sattr3,
    ) -> Result<(NodeId, fattr3), nfsstat3> {
        let name = check_name(name)?;
        if target.is_empty() || target.contains(&0) {
            return Err(nfsstat3::NFS3ERR_INVAL);
        }
        symlinkat(OsStr::from_bytes(target), dfd, name).map_err(nfs_err)?;
        let st = fstatat(dfd, name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(nfs_err)?;
        let id = NodeId::of(&st);
        let owner_and_times = sattr3 {
            mode: set_mode3::None,
            size: set_size3::None,
            ..attrs.clone()
        };
        if let Err(stat) = set_attrs(
            At::Child(dfd.as_fd(), name),
            ftype3::NF3LNK,
            id,
            &owner_and_times,
        ) {
            let _ = unlinkat(dfd, name, UnlinkatFlags::NoRemoveDir);
            return Err(stat);
        }
        let st = fstatat(dfd, name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(nfs_err)?;
        Ok((self.remember(rel.join(name), &st), fattr(&st)))
    }

    fn readlink(&self, id: NodeId) -> Result<Vec<u8>, nfsstat3> {
        let r = self.resolve(id)?;
        if kind(&r.st) != ftype3::NF3LNK {
            return Err(nfsstat3::NFS3ERR_INVAL);
        }
        let (Some(parent), Some(name)) = (&r.parent, r.rel.file_name()) else {
            return Err(nfsstat3::NFS3ERR_INVAL);
        };
        let target = readlinkat(parent, name).map_err(nfs_err)?;
        Ok(target.as_bytes().to_vec())
    }

    fn read(&self, id: NodeId, offset: u64, count: u32) -> Result<(Vec<u8>, bool), nfsstat3> {
        let file = self.open_file(id, OFlag::O_RDONLY)?;
        let size = file.metadata().map_err(|e| io_err(&e))?.len();
        let mut buf = vec![0u8; count.min(MAX_READ) as usize];
        let mut filled = 0;
        while filled < buf.len() {
            let at = offset
                .checked_add(filled as u64)
                .ok_or(nfsstat3::NFS3ERR_INVAL)?;
            match file.read_at(&mut buf[filled..], at) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err(&e)),
            }
        }
        buf.truncate(filled);
        let eof = offset.saturating_add(filled as u64) >= size;
        Ok((buf, eof))
    }

    fn write(
        &self,
        id: NodeId,
        offset: u64,
        data: &[u8],
        stable: stable_how,
    ) -> Result<(fattr3, stable_how), nfsstat3> {
        let file = self.open_file(id, OFlag::O_WRONLY)?;
        file.write_all_at(data, offset).map_err(|e| io_err(&e))?;
        match stable {
            stable_how::UNSTABLE => Ok(()),
            stable_how::DATA_SYNC => file.sync_data(),
            stable_how::FILE_SYNC => file.sync_all(),
        }
        .map_err(|e| io_err(&e))?;
        let st = fstat(&file).map_err(nfs_err)?;
        Ok((fattr(&st), stable))
    }

    fn commit(&self, id: NodeId) -> Result<(), nfsstat3> {
        match self.open_file(id, OFlag::O_RDONLY) {
            Ok(file) => file.sync_all().map_err(|e| io_err(&e)),
            // Nothing is buffered for directories and the like.
            Err(nfsstat3::NFS3ERR_ISDIR | nfsstat3::NFS3ERR_INVAL) => Ok(()),
            Err(stat) => Err(stat),
        }
    }

    /// The entries of a directory after `cookie`, in cookie order, without `.`/`..`.
    fn list(self: &Arc<Self>, dir: NodeId, cookie: u64) -> Result<Listing, nfsstat3> {
        let (fd, rel) = self.open_dir(dir, OFlag::O_RDONLY)?;
        let statfd = fd.try_clone().map_err(|e| io_err(&e))?;
        let mut names = Vec::new();
        let mut d = Dir::from_fd(fd).map_err(nfs_err)?;
        for entry in d.iter() {
            let entry = entry.map_err(nfs_err)?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            let entry_cookie = cookie_of(name);
            if entry_cookie > cookie {
                names.push((entry_cookie, name.to_vec()));
            }
        }
        names.sort_unstable();
        Ok(Listing {
            fs: Arc::clone(self),
            dir: statfd,
            rel,
            names: names.into_iter(),
        })
    }

    /// FSSTAT from the file system holding the exported directory.
    fn fsstat(&self, id: NodeId) -> Result<FSSTAT3resok, nfsstat3> {
        let r = self.resolve(id)?;
        let vfs = fstatvfs(&self.root).map_err(nfs_err)?;
        let frsize = vfs.fragment_size();
        let bytes = |blocks: u64| blocks.saturating_mul(frsize);
        Ok(FSSTAT3resok {
            obj_attributes: post_op_attr::Some(fattr(&r.st)),
            tbytes: bytes(vfs.blocks()),
            fbytes: bytes(vfs.blocks_free()),
            abytes: bytes(vfs.blocks_available()),
            tfiles: vfs.files(),
            ffiles: vfs.files_free(),
            afiles: vfs.files_available(),
            invarsec: 0,
        })
    }
}

/// What the `nfs3_server` handlers iterate over: names are listed up front, each is
/// stat'ed (and gets a handle) only when it is about to be sent.
struct Listing {
    fs: Arc<MirrorFs>,
    dir: OwnedFd,
    rel: PathBuf,
    names: std::vec::IntoIter<(u64, Vec<u8>)>,
}

impl Listing {
    fn next_entry(&mut self) -> NextResult<DirEntryPlus<NodeId>> {
        for (cookie, name) in self.names.by_ref() {
            let os_name = OsStr::from_bytes(&name);
            match fstatat(&self.dir, os_name, AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(st) => {
                    let id = self.fs.remember(self.rel.join(os_name), &st);
                    return NextResult::Ok(DirEntryPlus {
                        fileid: st.st_ino,
                        name: filename3::from(name),
                        cookie,
                        name_attributes: Some(fattr(&st)),
                        name_handle: Some(id),
                    });
                }
                // Removed since it was listed.
                Err(Errno::ENOENT) => {}
                Err(error) => return NextResult::Err(nfs_err(error)),
            }
        }
        NextResult::Eof
    }
}

impl ReadDirPlusIterator<NodeId> for Listing {
    async fn next(&mut self) -> NextResult<DirEntryPlus<NodeId>> {
        self.next_entry()
    }
}

/// A readdir cookie: FNV-1a of the name, never 0 (0 means "from the start").
fn cookie_of(name: &[u8]) -> u64 {
    let hash = name.iter().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    });
    hash.max(1)
}

/// Applies `attrs` in the order Linux knfsd does: size, owner (which clears
/// set-id bits), mode, times. Never follows a symlink.
fn set_attrs(at: At<'_>, kind: ftype3, id: NodeId, attrs: &sattr3) -> Result<(), nfsstat3> {
    if let set_size3::Some(size) = attrs.size {
        match (kind, at) {
            (ftype3::NF3REG, At::Child(dir, name)) => truncate(dir, name, id, size)?,
            (ftype3::NF3DIR, _) => return Err(nfsstat3::NFS3ERR_ISDIR),
            _ => return Err(nfsstat3::NFS3ERR_INVAL),
        }
    }
    let uid = match attrs.uid {
        set_uid3::Some(uid) => Some(Uid::from_raw(uid)),
        set_uid3::None => None,
    };
    let gid = match attrs.gid {
        set_gid3::Some(gid) => Some(Gid::from_raw(gid)),
        set_gid3::None => None,
    };
    if uid.is_some() || gid.is_some() {
        match at {
            At::Root(fd) => fchown(fd, uid, gid),
            At::Child(dir, name) => fchownat(dir, name, uid, gid, AtFlags::AT_SYMLINK_NOFOLLOW),
        }
        .map_err(nfs_err)?;
    }
    // Linux has no mode on symlinks; knfsd ignores it too.
    if let (set_mode3::Some(mode), false) = (attrs.mode, kind == ftype3::NF3LNK) {
        let mode = Mode::from_bits_truncate(mode & 0o7777);
        match at {
            At::Root(fd) => fchmod(fd, mode).map_err(nfs_err)?,
            At::Child(dir, name) => chmod_at(dir, name, id, mode)?,
        }
    }
    let atime = match attrs.atime {
        set_atime::DONT_CHANGE => TimeSpec::UTIME_OMIT,
        set_atime::SET_TO_SERVER_TIME => TimeSpec::UTIME_NOW,
        set_atime::SET_TO_CLIENT_TIME(t) => timespec(t),
    };
    let mtime = match attrs.mtime {
        set_mtime::DONT_CHANGE => TimeSpec::UTIME_OMIT,
        set_mtime::SET_TO_SERVER_TIME => TimeSpec::UTIME_NOW,
        set_mtime::SET_TO_CLIENT_TIME(t) => timespec(t),
    };
    if atime != TimeSpec::UTIME_OMIT || mtime != TimeSpec::UTIME_OMIT {
        match at {
            At::Root(fd) => futimens(fd, &atime, &mtime),
            At::Child(dir, name) => {
                utimensat(dir, name, &atime, &mtime, UtimensatFlags::NoFollowSymlink)
            }
        }
        .map_err(nfs_err)?;
    }
    Ok(())
}

fn truncate(dir: BorrowedFd<'_>, name: &OsStr, id: NodeId, size: u64) -> Result<(), nfsstat3> {
    let flags = OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
    let file = File::from(openat(dir, name, flags, Mode::empty()).map_err(nfs_err)?);
    if NodeId::of(&fstat(&file).map_err(nfs_err)?) != id {
        return Err(nfsstat3::NFS3ERR_STALE);
    }
    file.set_len(size).map_err(|e| io_err(&e))
}

/// `chmod` of a name that is not a symlink. `fchmodat(AT_SYMLINK_NOFOLLOW)` needs
/// `/proc` or a recent kernel; without them, open the object and `fchmod` it.
fn chmod_at(dir: BorrowedFd<'_>, name: &OsStr, id: NodeId, mode: Mode) -> Result<(), nfsstat3> {
    match fchmodat(dir, name, mode, FchmodatFlags::NoFollowSymlink) {
        Err(Errno::EOPNOTSUPP) => {
            let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
            let fd = openat(dir, name, flags, Mode::empty()).map_err(nfs_err)?;
            if NodeId::of(&fstat(&fd).map_err(nfs_err)?) != id {
                return Err(nfsstat3::NFS3ERR_STALE);
            }
            fchmod(&fd, mode).map_err(nfs_err)
        }
        result => result.map_err(nfs_err),
    }
}

fn timespec(t: nfstime3) -> TimeSpec {
    TimeSpec::new(t.seconds.into(), t.nseconds.into())
}

fn requested_mode(attrs: &sattr3) -> Option<u32> {
    match attrs.mode {
        set_mode3::Some(mode) => Some(mode & 0o7777),
        set_mode3::None => None,
    }
}

/// A name for a directory operation: exactly one path component.
fn check_name(name: &[u8]) -> Result<&OsStr, nfsstat3> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        return Err(nfsstat3::NFS3ERR_INVAL);
    }
    if name.len() > NAME_MAX {
        return Err(nfsstat3::NFS3ERR_NAMETOOLONG);
    }
    Ok(OsStr::from_bytes(name))
}

fn kind(st: &FileStat) -> ftype3 {
    match st.st_mode & nix::libc::S_IFMT {
        nix::libc::S_IFDIR => ftype3::NF3DIR,
        nix::libc::S_IFLNK => ftype3::NF3LNK,
        nix::libc::S_IFBLK => ftype3::NF3BLK,
        nix::libc::S_IFCHR => ftype3::NF3CHR,
        nix::libc::S_IFIFO => ftype3::NF3FIFO,
        nix::libc::S_IFSOCK => ftype3::NF3SOCK,
        _ => ftype3::NF3REG,
    }
}

fn nfstime(seconds: i64, nanos: i64) -> nfstime3 {
    nfstime3 {
        seconds: u32::try_from(seconds.max(0)).unwrap_or(u32::MAX),
        nseconds: u32::try_from(nanos).unwrap_or(0),
    }
}

fn fattr(st: &FileStat) -> fattr3 {
    let size = u64::try_from(st.st_size).unwrap_or(0);
    let blocks = u64::try_from(st.st_blocks).unwrap_or(0);
    let rdev = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
    fattr3 {
        type_: kind(st),
        mode: st.st_mode & 0o7777,
        nlink: u32::try_from(st.st_nlink).unwrap_or(u32::MAX),
        uid: st.st_uid,
        gid: st.st_gid,
        size,
        used: blocks.saturating_mul(512),
        rdev: specdata3 {
            specdata1: rdev(nix::sys::stat::major(st.st_rdev)),
            specdata2: rdev(nix::sys::stat::minor(st.st_rdev)),
        },
        fsid: st.st_dev,
        fileid: st.st_ino,
        atime: nfstime(st.st_atime, st.st_atime_nsec),
        mtime: nfstime(st.st_mtime, st.st_mtime_nsec),
        ctime: nfstime(st.st_ctime, st.st_ctime_nsec),
    }
}

fn pre_op(fd: &OwnedFd) -> pre_op_attr {
    fstat(fd).map_or(pre_op_attr::None, |st| {
        let attr = fattr(&st);
        pre_op_attr::Some(wcc_attr {
            size: attr.size,
            mtime: attr.mtime,
            ctime: attr.ctime,
        })
    })
}

fn post_op(fd: &OwnedFd) -> post_op_attr {
    fstat(fd).map_or(post_op_attr::None, |st| post_op_attr::Some(fattr(&st)))
}

/// A path that no longer leads to the object: the handle is stale.
fn gone(error: Errno) -> nfsstat3 {
    match error {
        Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP => nfsstat3::NFS3ERR_STALE,
        error => nfs_err(error),
    }
}

fn io_err(error: &io::Error) -> nfsstat3 {
    error
        .raw_os_error()
        .map_or(nfsstat3::NFS3ERR_IO, |code| nfs_err(Errno::from_raw(code)))
}

fn nfs_err(error: Errno) -> nfsstat3 {
    match error {
        Errno::EPERM => nfsstat3::NFS3ERR_PERM,
        Errno::ENOENT => nfsstat3::NFS3ERR_NOENT,
        Errno::ENXIO => nfsstat3::NFS3ERR_NXIO,
        Errno::EACCES => nfsstat3::NFS3ERR_ACCES,
        Errno::EEXIST => nfsstat3::NFS3ERR_EXIST,
        Errno::EXDEV => nfsstat3::NFS3ERR_XDEV,
        Errno::ENODEV => nfsstat3::NFS3ERR_NODEV,
        Errno::ENOTDIR => nfsstat3::NFS3ERR_NOTDIR,
        Errno::EISDIR => nfsstat3::NFS3ERR_ISDIR,
        Errno::EINVAL | Errno::ELOOP => nfsstat3::NFS3ERR_INVAL,
        Errno::EFBIG => nfsstat3::NFS3ERR_FBIG,
        Errno::ENOSPC => nfsstat3::NFS3ERR_NOSPC,
        Errno::EROFS => nfsstat3::NFS3ERR_ROFS,
        Errno::EMLINK => nfsstat3::NFS3ERR_MLINK,
        Errno::ENAMETOOLONG => nfsstat3::NFS3ERR_NAMETOOLONG,
        Errno::ENOTEMPTY => nfsstat3::NFS3ERR_NOTEMPTY,
        Errno::EDQUOT => nfsstat3::NFS3ERR_DQUOT,
        Errno::ESTALE => nfsstat3::NFS3ERR_STALE,
        Errno::EOPNOTSUPP => nfsstat3::NFS3ERR_NOTSUPP,
        _ => nfsstat3::NFS3ERR_IO,
    }
}

// ---------------------------------------------------------------------------
// nfs3_server's VFS traits
// ---------------------------------------------------------------------------

/// `MirrorFs` behind `nfs3_server`'s VFS traits; each call runs on the blocking pool.
struct MirrorVfs(Arc<MirrorFs>);

impl MirrorVfs {
    async fn blocking<T, F>(&self, f: F) -> Result<T, nfsstat3>
    where
        T: Send + 'static,
        F: FnOnce(&Arc<MirrorFs>) -> Result<T, nfsstat3> + Send + 'static,
    {
        let fs = Arc::clone(&self.0);
        tokio::task::spawn_blocking(move || f(&fs))
            .await
            .unwrap_or(Err(nfsstat3::NFS3ERR_SERVERFAULT))
    }
}

impl NfsReadFileSystem for MirrorVfs {
    type Handle = NodeId;

    fn root_dir(&self) -> NodeId {
        self.0.root_id
    }

    async fn lookup(&self, dirid: &NodeId, filename: &filename3<'_>) -> Result<NodeId, nfsstat3> {
        let (dir, name) = (*dirid, filename.as_ref().to_vec());
        self.blocking(move |fs| fs.lookup(dir, &name)).await
    }

    async fn getattr(&self, id: &NodeId) -> Result<fattr3, nfsstat3> {
        let id = *id;
        self.blocking(move |fs| fs.getattr(id)).await
    }

    async fn read(
        &self,
        id: &NodeId,
        offset: u64,
        count: u32,
    ) -> Result<(Vec<u8>, bool), nfsstat3> {
        let id = *id;
        self.blocking(move |fs| fs.read(id, offset, count)).await
    }

    async fn readdirplus(
        &self,
        dirid: &NodeId,
        cookie: u64,
    ) -> Result<impl ReadDirPlusIterator<NodeId>, nfsstat3> {
        let dir = *dirid;
        self.blocking(move |fs| fs.list(dir, cookie)).await
    }

    async fn readlink(&self, id: &NodeId) -> Result<nfspath3<'_>, nfsstat3> {
        let id = *id;
        self.blocking(move |fs| fs.readlink(id))
            .await
            .map(nfspath3::from)
    }
}

impl NfsFileSystem for MirrorVfs {
    async fn setattr(&self, id: &NodeId, setattr: sattr3) -> Result<fattr3, nfsstat3> {
        let id = *id;
        self.blocking(move |fs| fs.setattr(id, &setattr)).await
    }

    async fn write(
        &self,
        id: &NodeId,
        offset: u64,
        data: &[u8],
        stable: stable_how,
    ) -> Result<(fattr3, stable_how), nfsstat3> {
        let (id, data) = (*id, data.to_vec());
        self.blocking(move |fs| fs.write(id, offset, &data, stable))
            .await
    }

    async fn create(
        &self,
        dirid: &NodeId,
        filename: &filename3<'_>,
        attr: sattr3,
    ) -> Result<(NodeId, fattr3), nfsstat3> {
        let (dir, name) = (*dirid, filename.as_ref().to_vec());
        self.blocking(move |fs| fs.create(dir, &name, &attr)).await
    }

    async fn create_exclusive(
        &self,
        dirid: &NodeId,
        filename: &filename3<'_>,
        createverf: createverf3,
    ) -> Result<NodeId, nfsstat3> {
        let (dir, name) = (*dirid, filename.as_ref().to_vec());
        self.blocking(move |fs| fs.create_exclusive(dir, &name, createverf))
            .await
    }

    /// Not reached through the relay (which answers MKDIR with its attributes);
    /// kept correct anyway, with the default mode.
    async fn mkdir(
        &self,
        dirid: &NodeId,
        dirname: &filename3<'_>,
    ) -> Result<(NodeId, fattr3), nfsstat3> {
        let (dir, name) = (*dirid, dirname.as_ref().to_vec());
        self.blocking(move |fs| fs.mkdir(dir, &name, &sattr3::default()).0)
            .await
    }

    /// REMOVE only: the relay answers RMDIR, so a directory here is `NFS3ERR_ISDIR`.
    async fn remove(&self, dirid: &NodeId, filename: &filename3<'_>) -> Result<(), nfsstat3> {
        let (dir, name) = (*dirid, filename.as_ref().to_vec());
        self.blocking(move |fs| fs.remove(dir, &name)).await
    }

    async fn rename<'a>(
        &self,
        from_dirid: &NodeId,
        from_filename: &filename3<'a>,
        to_dirid: &NodeId,
        to_filename: &filename3<'a>,
    ) -> Result<(), nfsstat3> {
        let (from_dir, from) = (*from_dirid, from_filename.as_ref().to_vec());
        let (to_dir, to) = (*to_dirid, to_filename.as_ref().to_vec());
        self.blocking(move |fs| fs.rename(from_dir, &from, to_dir, &to))
            .await
    }

    async fn symlink<'a>(
        &self,
        dirid: &NodeId,
        linkname: &filename3<'a>,
        symlink: &nfspath3<'a>,
        attr: &sattr3,
    ) -> Result<(NodeId, fattr3), nfsstat3> {
        let (dir, name) = (*dirid, linkname.as_ref().to_vec());
        let (target, attr) = (symlink.as_ref().to_vec(), attr.clone());
        self.blocking(move |fs| fs.symlink(dir, &name, &target, &attr).0)
            .await
    }

    async fn commit(&self, id: &NodeId, _offset: u64, _count: u32) -> Result<(), nfsstat3> {
        let id = *id;
        self.blocking(move |fs| fs.commit(id)).await
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::future::Future;
    use std::os::unix::fs::{MetadataExt, symlink as disk_symlink};

    use nfs3_client::tokio::{TokioConnector, TokioIo};
    use nfs3_client::{ConnectError, Nfs3Connection, Nfs3ConnectionBuilder};
    use nfs3_types::nfs3::{
        CREATE3args, FSSTAT3args, GETATTR3args, LOOKUP3args, MKDIR3args, Nfs3Result, READ3args,
        READDIR3args, READDIRPLUS3args, READLINK3args, REMOVE3args, RENAME3args, RMDIR3args,
        SETATTR3args, SYMLINK3args, WRITE3args, cookieverf3, createhow3, diropargs3, entryplus3,
        symlinkdata3,
    };
    use nfs3_types::rpc::auth_unix;
    use tokio::net::TcpStream;

    use super::*;

    type Conn = Nfs3Connection<TokioIo<TcpStream>>;
    type NfsResult<T> = Result<T, nfsstat3>;

    /// Fails a test that hangs instead of hanging CI.
    async fn within<F: Future>(f: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(60), f)
            .await
            .expect("test took more than 60 s")
    }

    struct Fixture {
        tmp: tempfile::TempDir,
        data: PathBuf,
        server: EmbeddedServer,
    }

    async fn fixture() -> Fixture {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = tmp.path().join("data");
        let server = start(&data).await;
        let data = std::fs::canonicalize(&data).expect("canonical data dir");
        Fixture { tmp, data, server }
    }

    async fn start(dir: &Path) -> EmbeddedServer {
        let bind = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        EmbeddedServer::start(dir.to_path_buf(), bind)
            .await
            .expect("start embedded server")
    }

    async fn mount_path(server: &EmbeddedServer, path: &str) -> Result<Conn, ConnectError> {
        let addr = server.local_addr();
        Nfs3ConnectionBuilder::new(TokioConnector, addr.ip().to_string(), path)
            .portmapper_port(addr.port())
            .connect_from_privileged_port(false)
            .credential(opaque_auth::auth_unix(&auth_unix::default()))
            .mount()
            .await
    }

    async fn mount(server: &EmbeddedServer) -> Conn {
        mount_path(server, server.export_path())
            .await
            .expect("mount the export")
    }

    fn is_root() -> bool {
        Uid::effective().is_root()
    }

    fn dirop(dir: &nfs_fh3, name: &[u8]) -> diropargs3<'static> {
        diropargs3 {
            dir: dir.clone(),
            name: filename3::from(name.to_vec()),
        }
    }

    fn with_mode(mode: u32) -> sattr3 {
        sattr3 {
            mode: set_mode3::Some(mode),
            ..sattr3::default()
        }
    }

    fn disk_mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path).expect("stat").mode() & 0o7777
    }

    fn disk_names(dir: &Path) -> BTreeSet<String> {
        std::fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
            .collect()
    }

    fn names(list: &[&str]) -> BTreeSet<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    async fn mkdir(
        c: &mut Conn,
        dir: &nfs_fh3,
        name: &[u8],
        attributes: sattr3,
    ) -> NfsResult<(nfs_fh3, fattr3)> {
        let args = MKDIR3args {
            where_: dirop(dir, name),
            attributes,
        };
        match c.mkdir(&args).await.expect("MKDIR call") {
            Nfs3Result::Ok(ok) => Ok((ok.obj.unwrap(), ok.obj_attributes.unwrap())),
            Nfs3Result::Err((stat, _)) => Err(stat),
        }
    }

    async fn lookup(c: &mut Conn, dir: &nfs_fh3, name: &[u8]) -> NfsResult<nfs_fh3> {
        let args = LOOKUP3args {
            what: dirop(dir, name),
        };
        match c.lookup(&args).await.expect("LOOKUP call") {
            Nfs3Result::Ok(ok) => Ok(ok.object),
            Nfs3Result::Err((stat, _)) => Err(stat),
        }
    }

    async fn getattr(c: &mut Conn, fh: &nfs_fh3) -> NfsResult<fattr3> {
        let args = GETATTR3args { object: fh.clone() };
        match c.getattr(&args).await.expect("GETATTR call") {
            Nfs3Result::Ok(ok) => Ok(ok.obj_attributes),
            Nfs3Result::Err((stat, _)) => Err(stat),
        }
    }

    async fn setattr(c: &mut Conn, fh: &nfs_fh3, attrs: sattr3) -> NfsResult<fattr3> {
        let args = SETATTR3args {
            object: fh.clone(),
            new_attributes: attrs,
            guard: Nfs3Option::None,
        };
        match c.setattr(&args).await.expect("SETATTR call") {
            Nfs3Result::Ok(ok) => Ok(ok.obj_wcc.after.unwrap()),
            Nfs3Result::Err((stat, _)) => Err(stat),
        }
    }

    async fn rmdir(c: &mut Conn, dir: &nfs_fh3, name: &[u8]) -> NfsResult<()> {
        let args = RMDIR3args {
            object: dirop(dir, name),
        };
        match c.rmdir(&args).await.expect("RMDIR call") {
            Nfs3Result::Ok(_) => Ok(()),
            Nfs3Result::Err((stat, _)) => Err(stat),
        }
    }

    async fn remove(c: &mut Conn, dir: &nfs_fh3, name: &[u8]) -> NfsResult<()> {
        let args = REMOVE3args {
            object: dirop(dir, name),
        };
        match c.remove(&args).await.expect("REMOVE call") {
            Nfs3Result::Ok(_) => Ok(()),
            Nfs3Result::Err((stat, _)) => Err(stat),
        }
    }

    async fn rename(c: &mut Conn, from: (&nfs_fh3, &[u8]), to: (&nfs_fh3, &[u8])) -> NfsResult<()> {
        let args = RENAME3args {
            from: dirop(from.0, from.1),
            to: dirop(to.0, to.1),
        };
        match c.rename(&args).await.expect("RENAME call") {
            Nfs3Result::Ok(_) => Ok(()),
            Nfs3Result::Err((stat, _)) => Err(stat),
        }
    }

    async fn create(
        c: &mut Conn,
        dir: &nfs_fh3,
        name: &[u8],
        how: createhow3,
    ) -> NfsResult<nfs_fh3> {
        let args = CREATE3args {
            where_: dirop(dir, name),
            how,
        };
        match c.create(&args).await.expect("CREATE call") {
            Nfs3Result::Ok(ok) => Ok(ok.obj.unwrap()),
            Nfs3Result::Err((stat, _)) => Err(stat),
        }
    }

    async fn write(c: &mut Conn, fh: &nfs_fh3, offset: u64, data: &[u8]) -> NfsResult<()> {
        let args = WRITE3args {
            file: fh.clone(),
            offset,
            count: u32::try_from(data.len()).expect("small write"),
            stable: stable_how::FILE_SYNC,
            data: Opaque::borrowed(data),
        };
        match c.write(&args).await.expect("WRITE call") {
            Nfs3Result::Ok(_) => Ok(()),
            Nfs3Result::Err((stat, _)) => Err(stat),
        }
    }

    async fn read(
        c: &mut Conn,
        fh: &nfs_fh3,
        offset: u64,
        count: u32,
    ) -> NfsResult<(Vec<u8>, bool)> {
        let args = READ3args {
            file: fh.clone(),
            offset,
            count,
        };
        match c.read(&args).await.expect("READ call") {
            Nfs3Result::Ok(ok) => Ok((ok.data.0.to_vec(), ok.eof)),
            Nfs3Result::Err((stat, _)) => Err(stat),
        }
    }

    async fn symlink(
        c: &mut Conn,
        dir: &nfs_fh3,
        name: &[u8],
        target: &[u8],
    ) -> NfsResult<nfs_fh3> {
        let args = SYMLINK3args {
            where_: dirop(dir, name),
            symlink: symlinkdata3 {
                symlink_attributes: sattr3::default(),
                symlink_data: nfspath3::from(target.to_vec()),
            },
        };
        match c.symlink(&args).await.expect("SYMLINK call") {
            Nfs3Result::Ok(ok) => Ok(ok.obj.unwrap()),
            Nfs3Result::Err((stat, _)) => Err(stat),
        }
    }

    async fn readlink(c: &mut Conn, fh: &nfs_fh3) -> NfsResult<Vec<u8>> {
        let args = READLINK3args {
            symlink: fh.clone(),
        };
        match c.readlink(&args).await.expect("READLINK call") {
            Nfs3Result::Ok(ok) => Ok(ok.data.0.to_vec()),
            Nfs3Result::Err((stat, _)) => Err(stat),
        }
    }

    async fn fsstat(c: &mut Conn, fh: &nfs_fh3) -> NfsResult<FSSTAT3resok> {
        let args = FSSTAT3args { fsroot: fh.clone() };
        match c.fsstat(&args).await.expect("FSSTAT call") {
            Nfs3Result::Ok(ok) => Ok(ok),
            Nfs3Result::Err((stat, _)) => Err(stat),
        }
    }

    /// Every READDIRPLUS page of `dir`, following cookies to EOF.
    async fn readdirplus_pages(
        c: &mut Conn,
        dir: &nfs_fh3,
        maxcount: u32,
    ) -> NfsResult<Vec<Vec<entryplus3<'static>>>> {
        let (mut cookie, mut cookieverf) = (0, cookieverf3::default());
        let mut pages = Vec::new();
        loop {
            let args = READDIRPLUS3args {
                dir: dir.clone(),
                cookie,
                cookieverf,
                dircount: maxcount / 4,
                maxcount,
            };
            let ok = match c.readdirplus(&args).await.expect("READDIRPLUS call") {
                Nfs3Result::Ok(ok) => ok,
                Nfs3Result::Err((stat, _)) => return Err(stat),
            };
            let page = ok.reply.entries.0;
            assert!(!page.is_empty() || ok.reply.eof, "empty page before EOF");
            if let Some(last) = page.last() {
                cookie = last.cookie;
            }
            cookieverf = ok.cookieverf;
            pages.push(page);
            if ok.reply.eof {
                return Ok(pages);
            }
            assert!(pages.len() < 10_000, "READDIRPLUS never reaches EOF");
        }
    }

    /// Every READDIR entry of `dir` as (cookie, name), and the number of pages.
    async fn readdir_all(
        c: &mut Conn,
        dir: &nfs_fh3,
        count: u32,
    ) -> NfsResult<(Vec<(u64, String)>, usize)> {
        let (mut cookie, mut cookieverf) = (0, cookieverf3::default());
        let (mut entries, mut pages) = (Vec::new(), 0);
        loop {
            let args = READDIR3args {
                dir: dir.clone(),
                cookie,
                cookieverf,
                count,
            };
            let ok = match c.readdir(&args).await.expect("READDIR call") {
                Nfs3Result::Ok(ok) => ok,
                Nfs3Result::Err((stat, _)) => return Err(stat),
            };
            pages += 1;
            for entry in ok.reply.entries.0 {
                cookie = entry.cookie;
                let name = String::from_utf8(entry.name.0.to_vec()).expect("utf-8");
                entries.push((entry.cookie, name));
            }
            cookieverf = ok.cookieverf;
            if ok.reply.eof {
                return Ok((entries, pages));
            }
            assert!(pages < 10_000, "READDIR never reaches EOF");
        }
    }

    #[tokio::test]
    async fn mkdir_applies_the_requested_mode_and_owner_exactly() {
        within(async {
            let f = fixture().await;
            let mut c = mount(&f.server).await;
            let root = c.root_nfs_fh3();
            // 0o777 and 0o2775 would come out as 0o755 under the usual umask 022.
            for (i, mode) in [0o750, 0o777, 0o2775, 0o1777, 0o700, 0o000]
                .into_iter()
                .enumerate()
            {
                let name = format!("vol{i}");
                let (fh, attr) = mkdir(&mut c, &root, name.as_bytes(), with_mode(mode))
                    .await
                    .expect("mkdir");
                let path = f.data.join(&name);
                assert!(path.symlink_metadata().expect("stat").is_dir());
                assert_eq!(disk_mode(&path), mode, "{name} on disk");
                assert_eq!(attr.mode, mode, "{name} in the MKDIR reply");
                assert_eq!(attr.type_, ftype3::NF3DIR);
                assert_eq!(getattr(&mut c, &fh).await.expect("getattr").mode, mode);
            }
            mkdir(&mut c, &root, b"default", sattr3::default())
                .await
                .expect("mkdir without a mode");
            assert_eq!(disk_mode(&f.data.join("default")), DEFAULT_DIR_MODE);

            if is_root() {
                let attrs = sattr3 {
                    mode: set_mode3::Some(0o750),
                    uid: set_uid3::Some(1234),
                    gid: set_gid3::Some(4321),
                    ..sattr3::default()
                };
                let (_, attr) = mkdir(&mut c, &root, b"owned", attrs).await.expect("mkdir");
                let meta = f.data.join("owned").symlink_metadata().expect("stat");
                assert_eq!((meta.uid(), meta.gid()), (1234, 4321));
                assert_eq!((attr.uid, attr.gid, attr.mode), (1234, 4321, 0o750));
            }
        })
        .await;
    }

    #[tokio::test]
    async fn mkdir_of_an_existing_name_is_exist_and_changes_nothing() {
        within(async {
            let f = fixture().await;
            let mut c = mount(&f.server).await;
            let root = c.root_nfs_fh3();
            mkdir(&mut c, &root, b"a", with_mode(0o750))
                .await
                .expect("first mkdir");
            assert_eq!(
                mkdir(&mut c, &root, b"a", with_mode(0o777))
                    .await
                    .map(|_| ()),
                Err(nfsstat3::NFS3ERR_EXIST)
            );
            assert_eq!(
                disk_mode(&f.data.join("a")),
                0o750,
                "the existing dir is untouched"
            );

            std::fs::write(f.data.join("file"), b"x").expect("write file");
            assert_eq!(
                mkdir(&mut c, &root, b"file", with_mode(0o755))
                    .await
                    .map(|_| ()),
                Err(nfsstat3::NFS3ERR_EXIST)
            );
            assert!(
                f.data
                    .join("file")
                    .symlink_metadata()
                    .expect("stat")
                    .is_file()
            );
            assert_eq!(disk_names(&f.data), names(&["a", "file"]));
        })
        .await;
    }

    #[tokio::test]
    async fn hostile_names_are_rejected_and_nothing_is_created_outside() {
        within(async {
            let f = fixture().await;
            let mut c = mount(&f.server).await;
            let root = c.root_nfs_fh3();
            let (a, _) = mkdir(&mut c, &root, b"a", with_mode(0o755))
                .await
                .expect("mkdir a");
            let long = [b'n'; 256];
            let hostile: [&[u8]; 9] = [
                b"..",
                b".",
                b"",
                b"a/b",
                b"../escape",
                b"/escape",
                b"a/../../escape",
                b"x\0y",
                &long,
            ];
            for name in hostile {
                let want = if name.len() > NAME_MAX {
                    nfsstat3::NFS3ERR_NAMETOOLONG
                } else {
                    nfsstat3::NFS3ERR_INVAL
                };
                let shown = String::from_utf8_lossy(name).into_owned();
                for dir in [&root, &a] {
                    let mkdir = mkdir(&mut c, dir, name, with_mode(0o777)).await;
                    assert_eq!(mkdir.map(|_| ()), Err(want), "MKDIR {shown:?}");
                    assert_eq!(
                        lookup(&mut c, dir, name).await,
                        Err(want),
                        "LOOKUP {shown:?}"
                    );
                    let how = createhow3::UNCHECKED(sattr3::default());
                    assert_eq!(
                        create(&mut c, dir, name, how).await,
                        Err(want),
                        "CREATE {shown:?}"
                    );
                    assert_eq!(rmdir(&mut c, dir, name).await, Err(want), "RMDIR {shown:?}");
                    assert_eq!(
                        remove(&mut c, dir, name).await,
                        Err(want),
                        "REMOVE {shown:?}"
                    );
                    let link = symlink(&mut c, dir, name, b"/").await;
                    assert_eq!(link, Err(want), "SYMLINK {shown:?}");
                }
                let renamed = rename(&mut c, (&root, b"a"), (&root, name)).await;
                assert_eq!(renamed, Err(want), "RENAME a -> {shown:?}");
                let renamed = rename(&mut c, (&root, name), (&root, b"z")).await;
                assert_eq!(renamed, Err(want), "RENAME {shown:?} -> z");
            }
            for path in ["/..", "/a/../..", "/../data"] {
                assert!(mount_path(&f.server, path).await.is_err(), "MOUNT {path}");
            }
            assert!(
                mount_path(&f.server, "/a").await.is_ok(),
                "MOUNT of a subdirectory"
            );

            assert_eq!(disk_names(f.tmp.path()), names(&["data"]));
            assert_eq!(disk_names(&f.data), names(&["a"]));
            assert_eq!(disk_names(&f.data.join("a")), names(&[]));
        })
        .await;
    }

    #[tokio::test]
    async fn symlink_replies_carry_the_link_and_the_directory_before_and_after() {
        within(async {
            let f = fixture().await;
            let mut c = mount(&f.server).await;
            let root = c.root_nfs_fh3();
            let dir = mkdir(&mut c, &root, b"records", with_mode(0o700))
                .await
                .expect("mkdir")
                .0;
            let record = br#"{"capacity_bytes":1}"#;
            let owner = if is_root() {
                sattr3 {
                    uid: set_uid3::Some(1234),
                    gid: set_gid3::Some(4321),
                    ..sattr3::default()
                }
            } else {
                sattr3::default()
            };
            let args = |name: &'static [u8], attrs: sattr3| SYMLINK3args {
                where_: dirop(&dir, name),
                symlink: symlinkdata3 {
                    symlink_attributes: attrs,
                    symlink_data: nfspath3::from(record.to_vec()),
                },
            };
            let ok = match c.symlink(&args(b"pvc-1", owner)).await.expect("SYMLINK") {
                Nfs3Result::Ok(ok) => ok,
                Nfs3Result::Err((stat, _)) => panic!("SYMLINK failed: {stat:?}"),
            };
            let on_disk = f.data.join("records/pvc-1");
            assert_eq!(
                std::fs::read_link(&on_disk)
                    .expect("read_link")
                    .as_os_str()
                    .as_bytes(),
                record
            );
            let meta = on_disk.symlink_metadata().expect("stat");
            let Nfs3Option::Some(attr) = ok.obj_attributes else {
                panic!("no attributes in the SYMLINK reply");
            };
            assert_eq!(attr.type_, ftype3::NF3LNK);
            assert_eq!(attr.fileid, meta.ino());
            assert_eq!(attr.size, record.len() as u64);
            if is_root() {
                assert_eq!((meta.uid(), meta.gid()), (1234, 4321));
                assert_eq!((attr.uid, attr.gid), (1234, 4321));
            }
            let Nfs3Option::Some(fh) = ok.obj else {
                panic!("no handle in the SYMLINK reply");
            };
            assert_eq!(readlink(&mut c, &fh).await.expect("readlink"), record);
            let (Nfs3Option::Some(before), Nfs3Option::Some(after)) =
                (ok.dir_wcc.before, ok.dir_wcc.after)
            else {
                panic!("no directory attributes in the SYMLINK reply");
            };
            assert_eq!(
                after.fileid,
                f.data.join("records").metadata().expect("stat").ino()
            );
            assert!(after.size >= before.size && after.mtime != nfstime3::default());

            // An existing name: EXIST, the first link untouched, nothing else made.
            match c
                .symlink(&args(b"pvc-1", sattr3::default()))
                .await
                .expect("SYMLINK")
            {
                Nfs3Result::Err((stat, _)) => assert_eq!(stat, nfsstat3::NFS3ERR_EXIST),
                Nfs3Result::Ok(_) => panic!("a second SYMLINK of one name succeeded"),
            }
            assert_eq!(
                std::fs::read_link(&on_disk)
                    .expect("read_link")
                    .as_os_str()
                    .as_bytes(),
                record
            );
            // A hostile name: INVAL, nothing made.
            match c
                .symlink(&args(b"..", sattr3::default()))
                .await
                .expect("SYMLINK")
            {
                Nfs3Result::Err((stat, _)) => assert_eq!(stat, nfsstat3::NFS3ERR_INVAL),
                Nfs3Result::Ok(_) => panic!("SYMLINK named .. succeeded"),
            }
            assert_eq!(disk_names(&f.data.join("records")), names(&["pvc-1"]));
        })
        .await;
    }

    #[tokio::test]
    async fn symlinks_are_served_as_symlinks_and_never_followed() {
        within(async {
            let f = fixture().await;
            let outside = f.tmp.path().join("outside");
            std::fs::create_dir_all(outside.join("sub")).expect("outside dir");
            std::fs::write(outside.join("secret"), b"keep").expect("outside file");
            let secret_mode = disk_mode(&outside.join("secret"));
            let secret_uid = outside.join("secret").metadata().expect("stat").uid();
            disk_symlink(&outside, f.data.join("link_dir")).expect("symlink");
            disk_symlink(outside.join("secret"), f.data.join("link_file")).expect("symlink");

            let mut c = mount(&f.server).await;
            let root = c.root_nfs_fh3();
            let ld = lookup(&mut c, &root, b"link_dir")
                .await
                .expect("lookup link_dir");
            assert_eq!(
                getattr(&mut c, &ld).await.expect("getattr").type_,
                ftype3::NF3LNK
            );
            assert_eq!(
                readlink(&mut c, &ld).await.expect("readlink"),
                outside.as_os_str().as_bytes()
            );
            let notdir = Err(nfsstat3::NFS3ERR_NOTDIR);
            assert_eq!(
                mkdir(&mut c, &ld, b"x", with_mode(0o777)).await.map(|_| ()),
                notdir
            );
            let how = createhow3::UNCHECKED(sattr3::default());
            assert_eq!(create(&mut c, &ld, b"x", how).await.map(|_| ()), notdir);
            assert_eq!(lookup(&mut c, &ld, b"secret").await.map(|_| ()), notdir);
            assert_eq!(rmdir(&mut c, &ld, b"sub").await, notdir);
            assert_eq!(remove(&mut c, &ld, b"secret").await, notdir);
            assert_eq!(
                readdirplus_pages(&mut c, &ld, 4096).await.map(|_| ()),
                notdir
            );
            let entered = rename(&mut c, (&ld, b"secret"), (&root, b"stolen")).await;
            assert_eq!(entered, notdir);

            let lf = lookup(&mut c, &root, b"link_file")
                .await
                .expect("lookup link_file");
            let inval = Err(nfsstat3::NFS3ERR_INVAL);
            assert_eq!(write(&mut c, &lf, 0, b"pwned").await, inval);
            assert_eq!(read(&mut c, &lf, 0, 10).await.map(|_| ()), inval);
            let truncate = sattr3 {
                size: set_size3::Some(0),
                ..sattr3::default()
            };
            assert_eq!(setattr(&mut c, &lf, truncate).await.map(|_| ()), inval);
            setattr(&mut c, &lf, with_mode(0o777))
                .await
                .expect("mode of a symlink is ignored");
            if is_root() {
                let chown = sattr3 {
                    uid: set_uid3::Some(1234),
                    ..sattr3::default()
                };
                setattr(&mut c, &lf, chown)
                    .await
                    .expect("chown of the link itself");
                let link_meta = f.data.join("link_file").symlink_metadata().expect("lstat");
                assert_eq!(link_meta.uid(), 1234);
            }
            let how = createhow3::UNCHECKED(sattr3 {
                size: set_size3::Some(0),
                ..sattr3::default()
            });
            assert_eq!(
                create(&mut c, &root, b"link_file", how).await.map(|_| ()),
                Err(nfsstat3::NFS3ERR_EXIST)
            );
            remove(&mut c, &root, b"link_file")
                .await
                .expect("remove the link");
            remove(&mut c, &root, b"link_dir")
                .await
                .expect("remove the link");

            assert_eq!(
                std::fs::read(outside.join("secret")).expect("read"),
                b"keep"
            );
            assert_eq!(disk_mode(&outside.join("secret")), secret_mode);
            let secret_meta = outside.join("secret").metadata().expect("stat");
            assert_eq!(
                secret_meta.uid(),
                secret_uid,
                "the target's owner is untouched"
            );
            assert_eq!(disk_names(&outside), names(&["secret", "sub"]));
            assert_eq!(disk_names(&outside.join("sub")), names(&[]));
            assert_eq!(disk_names(&f.data), names(&[]));
        })
        .await;
    }

    #[tokio::test]
    async fn a_directory_swapped_for_a_symlink_makes_handles_below_it_stale() {
        within(async {
            let f = fixture().await;
            let outside = f.tmp.path().join("outside");
            std::fs::create_dir_all(outside.join("sub")).expect("outside dir");
            let mut c = mount(&f.server).await;
            let root = c.root_nfs_fh3();
            let (d, _) = mkdir(&mut c, &root, b"d", with_mode(0o755))
                .await
                .expect("mkdir d");
            let (sub, _) = mkdir(&mut c, &d, b"sub", with_mode(0o755))
                .await
                .expect("mkdir sub");

            std::fs::rename(f.data.join("d"), f.data.join("d.real")).expect("rename");
            disk_symlink(&outside, f.data.join("d")).expect("symlink");

            let stale = Err(nfsstat3::NFS3ERR_STALE);
            assert_eq!(getattr(&mut c, &sub).await.map(|_| ()), stale);
            assert_eq!(
                mkdir(&mut c, &sub, b"pwn", with_mode(0o777))
                    .await
                    .map(|_| ()),
                stale
            );
            let how = createhow3::UNCHECKED(sattr3::default());
            assert_eq!(create(&mut c, &sub, b"pwn", how).await.map(|_| ()), stale);
            assert_eq!(
                readdirplus_pages(&mut c, &sub, 4096).await.map(|_| ()),
                stale
            );
            assert_eq!(
                setattr(&mut c, &sub, with_mode(0o777)).await.map(|_| ()),
                stale
            );
            assert_eq!(rmdir(&mut c, &d, b"sub").await, stale);

            assert_eq!(disk_names(&outside.join("sub")), names(&[]));
            assert_eq!(disk_mode(&outside.join("sub")), 0o755);
            assert!(f.data.join("d.real/sub").is_dir());
        })
        .await;
    }

    #[tokio::test]
    async fn rmdir_remove_and_rename_follow_rfc_1813() {
        within(async {
            let f = fixture().await;
            let mut c = mount(&f.server).await;
            let root = c.root_nfs_fh3();
            let (a, _) = mkdir(&mut c, &root, b"a", with_mode(0o755))
                .await
                .expect("mkdir a");
            let (full, _) = mkdir(&mut c, &root, b"full", with_mode(0o755))
                .await
                .expect("mkdir");
            mkdir(&mut c, &full, b"child", with_mode(0o755))
                .await
                .expect("mkdir child");
            let how = createhow3::UNCHECKED(with_mode(0o644));
            create(&mut c, &root, b"f", how).await.expect("create f");

            assert_eq!(
                rmdir(&mut c, &root, b"f").await,
                Err(nfsstat3::NFS3ERR_NOTDIR)
            );
            assert_eq!(
                remove(&mut c, &root, b"a").await,
                Err(nfsstat3::NFS3ERR_ISDIR)
            );
            assert_eq!(
                rmdir(&mut c, &root, b"full").await,
                Err(nfsstat3::NFS3ERR_NOTEMPTY)
            );
            assert_eq!(
                rmdir(&mut c, &root, b"missing").await,
                Err(nfsstat3::NFS3ERR_NOENT)
            );
            assert_eq!(
                remove(&mut c, &root, b"missing").await,
                Err(nfsstat3::NFS3ERR_NOENT)
            );

            rename(&mut c, (&root, b"a"), (&root, b"b"))
                .await
                .expect("rename a -> b");
            assert_eq!(disk_names(&f.data), names(&["b", "f", "full"]));
            // The handle follows the directory to its new name.
            mkdir(&mut c, &a, b"inside", with_mode(0o755))
                .await
                .expect("mkdir in moved dir");
            assert!(f.data.join("b/inside").is_dir());

            let exist = Err(nfsstat3::NFS3ERR_EXIST);
            assert_eq!(rename(&mut c, (&root, b"b"), (&root, b"full")).await, exist);
            assert_eq!(rename(&mut c, (&root, b"f"), (&root, b"full")).await, exist);
            assert_eq!(rename(&mut c, (&root, b"b"), (&root, b"f")).await, exist);
            assert!(
                f.data.join("full/child").is_dir(),
                "a non-empty dir is never clobbered"
            );
            assert!(f.data.join("b/inside").is_dir());
            assert!(f.data.join("f").is_file());
            let into_itself = rename(&mut c, (&root, b"b"), (&a, b"deeper")).await;
            assert_eq!(into_itself, Err(nfsstat3::NFS3ERR_INVAL));
            let missing = rename(&mut c, (&root, b"nope"), (&root, b"x")).await;
            assert_eq!(missing, Err(nfsstat3::NFS3ERR_NOENT));
            rename(&mut c, (&root, b"b"), (&root, b"b"))
                .await
                .expect("rename to itself");

            mkdir(&mut c, &root, b"empty", with_mode(0o700))
                .await
                .expect("mkdir empty");
            rename(&mut c, (&root, b"b"), (&root, b"empty"))
                .await
                .expect("over an empty dir");
            assert!(f.data.join("empty/inside").is_dir());
            assert_eq!(getattr(&mut c, &a).await.expect("getattr").mode, 0o755);

            std::fs::write(f.data.join("h"), b"old").expect("write h");
            rename(&mut c, (&root, b"f"), (&root, b"h"))
                .await
                .expect("file over file");
            assert_eq!(std::fs::read(f.data.join("h")).expect("read"), b"");

            assert_eq!(
                rmdir(&mut c, &root, b"empty").await,
                Err(nfsstat3::NFS3ERR_NOTEMPTY)
            );
            rmdir(&mut c, &a, b"inside").await.expect("rmdir inside");
            rmdir(&mut c, &root, b"empty").await.expect("rmdir empty");
            assert_eq!(
                getattr(&mut c, &a).await.map(|_| ()),
                Err(nfsstat3::NFS3ERR_STALE)
            );
            remove(&mut c, &root, b"h").await.expect("remove h");
            assert_eq!(disk_names(&f.data), names(&["full"]));
        })
        .await;
    }

    #[tokio::test]
    async fn readdir_pages_through_a_large_directory() {
        within(async {
            let f = fixture().await;
            let mut expected = BTreeSet::new();
            for i in 0..250 {
                let name = format!("entry-{i:03}");
                std::fs::create_dir(f.data.join(&name)).expect("create dir");
                expected.insert(name);
            }
            std::fs::write(f.data.join("a-file"), b"x").expect("write");
            expected.insert("a-file".to_owned());

            let mut c = mount(&f.server).await;
            let root = c.root_nfs_fh3();
            let pages = readdirplus_pages(&mut c, &root, 4096)
                .await
                .expect("readdirplus");
            assert!(
                pages.len() > 3,
                "{} pages: paging not exercised",
                pages.len()
            );
            let entries: Vec<_> = pages.into_iter().flatten().collect();
            let listed: Vec<String> = entries
                .iter()
                .map(|e| String::from_utf8(e.name.0.to_vec()).expect("utf-8"))
                .collect();
            assert_eq!(listed.len(), expected.len(), "no entry twice");
            assert_eq!(listed.iter().cloned().collect::<BTreeSet<_>>(), expected);
            let cookies: Vec<u64> = entries.iter().map(|e| e.cookie).collect();
            assert!(cookies.windows(2).all(|w| w[0] < w[1]), "cookies increase");

            // Handles and attributes come with the entries.
            for entry in entries.iter().take(5) {
                let Nfs3Option::Some(fh) = &entry.name_handle else {
                    panic!("entry without a handle");
                };
                let attr = getattr(&mut c, fh).await.expect("getattr");
                assert_eq!(attr.fileid, entry.fileid);
            }

            // Stable while the directory doesn't change, and READDIR agrees.
            let again: Vec<_> = readdirplus_pages(&mut c, &root, 8192)
                .await
                .expect("readdirplus")
                .into_iter()
                .flatten()
                .map(|e| e.cookie)
                .collect();
            assert_eq!(again, cookies);
            let (plain, plain_pages) = readdir_all(&mut c, &root, 1024).await.expect("readdir");
            assert!(plain_pages > 3, "{plain_pages} READDIR pages");
            let plain_cookies: Vec<u64> = plain.iter().map(|(cookie, _)| *cookie).collect();
            assert_eq!(plain_cookies, cookies);
            assert_eq!(
                plain.iter().map(|(_, n)| n).cloned().collect::<Vec<_>>(),
                listed
            );
        })
        .await;
    }

    #[tokio::test]
    async fn fsstat_reports_the_real_file_system() {
        within(async {
            let f = fixture().await;
            let mut c = mount(&f.server).await;
            let root = c.root_nfs_fh3();
            let got = fsstat(&mut c, &root).await.expect("fsstat");
            let real = nix::sys::statvfs::statvfs(&f.data).expect("statvfs");
            let frsize = real.fragment_size();
            assert_eq!(got.tbytes, real.blocks() * frsize);
            assert_eq!(got.tfiles, real.files());
            assert!(got.abytes <= got.fbytes && got.fbytes <= got.tbytes);
            assert!(got.afiles <= got.tfiles);
            let available = real.blocks_available() * frsize;
            assert!(
                got.abytes.abs_diff(available) < 256 << 20,
                "abytes {} vs statvfs {available}",
                got.abytes
            );
            let (sub, _) = mkdir(&mut c, &root, b"sub", with_mode(0o755))
                .await
                .expect("mkdir");
            assert_eq!(
                fsstat(&mut c, &sub).await.expect("fsstat sub").tbytes,
                got.tbytes
            );
        })
        .await;
    }

    #[tokio::test]
    async fn handles_of_an_earlier_server_are_stale_and_a_restart_serves_the_same_dir() {
        within(async {
            let tmp = tempfile::tempdir().expect("tempdir");
            let data = tmp.path().join("data");
            let first = start(&data).await;
            let mut c = mount(&first).await;
            let old_root = c.root_nfs_fh3();
            let (keep, _) = mkdir(&mut c, &old_root, b"keep", with_mode(0o750))
                .await
                .expect("mkdir");
            let how = createhow3::UNCHECKED(with_mode(0o600));
            let file = create(&mut c, &keep, b"file", how).await.expect("create");
            write(&mut c, &file, 0, b"hello").await.expect("write");
            drop(c);
            first.shutdown().await;

            // The same port number may be reused; the generation still differs.
            let second = start(&data).await;
            let mut c = mount(&second).await;
            let stale = Err(nfsstat3::NFS3ERR_STALE);
            assert_eq!(getattr(&mut c, &old_root).await.map(|_| ()), stale);
            assert_eq!(getattr(&mut c, &keep).await.map(|_| ()), stale);
            assert_eq!(lookup(&mut c, &old_root, b"keep").await.map(|_| ()), stale);
            assert_eq!(read(&mut c, &file, 0, 5).await.map(|_| ()), stale);
            // Answered by the relay, not by nfs3_server: the same rule.
            assert_eq!(
                mkdir(&mut c, &keep, b"x", with_mode(0o755))
                    .await
                    .map(|_| ()),
                stale
            );
            assert_eq!(rmdir(&mut c, &old_root, b"keep").await, stale);
            assert_eq!(fsstat(&mut c, &old_root).await.map(|_| ()), stale);
            assert!(!data.join("keep/x").exists());

            let root = c.root_nfs_fh3();
            assert_ne!(root, old_root);
            let keep = lookup(&mut c, &root, b"keep").await.expect("lookup keep");
            assert_eq!(getattr(&mut c, &keep).await.expect("getattr").mode, 0o750);
            let file = lookup(&mut c, &keep, b"file").await.expect("lookup file");
            assert_eq!(
                read(&mut c, &file, 0, 100).await.expect("read"),
                (b"hello".to_vec(), true)
            );
            second.shutdown().await;
        })
        .await;
    }

    #[tokio::test]
    async fn files_can_be_created_written_read_and_changed() {
        within(async {
            let f = fixture().await;
            let mut c = mount(&f.server).await;
            let root = c.root_nfs_fh3();
            let how = createhow3::UNCHECKED(with_mode(0o666));
            let file = create(&mut c, &root, b"f", how).await.expect("create");
            assert_eq!(disk_mode(&f.data.join("f")), 0o666, "no umask");
            let guarded = createhow3::GUARDED(sattr3::default());
            assert_eq!(
                create(&mut c, &root, b"f", guarded).await,
                Err(nfsstat3::NFS3ERR_EXIST)
            );

            write(&mut c, &file, 0, b"hello world")
                .await
                .expect("write");
            assert_eq!(
                std::fs::read(f.data.join("f")).expect("read"),
                b"hello world"
            );
            let all = read(&mut c, &file, 0, 100).await.expect("read");
            assert_eq!(all, (b"hello world".to_vec(), true));
            assert_eq!(
                read(&mut c, &file, 0, 5).await.expect("read"),
                (b"hello".to_vec(), false)
            );
            assert_eq!(
                read(&mut c, &file, 6, 5).await.expect("read"),
                (b"world".to_vec(), true)
            );
            assert_eq!(
                read(&mut c, &file, 50, 5).await.expect("read"),
                (Vec::new(), true)
            );

            let truncate = sattr3 {
                size: set_size3::Some(5),
                ..sattr3::default()
            };
            assert_eq!(
                setattr(&mut c, &file, truncate)
                    .await
                    .expect("truncate")
                    .size,
                5
            );
            assert_eq!(std::fs::read(f.data.join("f")).expect("read"), b"hello");

            let times = sattr3 {
                atime: set_atime::SET_TO_CLIENT_TIME(nfstime3 {
                    seconds: 2_000_000,
                    nseconds: 0,
                }),
                mtime: set_mtime::SET_TO_CLIENT_TIME(nfstime3 {
                    seconds: 1_000_000,
                    nseconds: 5,
                }),
                ..sattr3::default()
            };
            let attr = setattr(&mut c, &file, times).await.expect("set times");
            assert_eq!((attr.mtime.seconds, attr.mtime.nseconds), (1_000_000, 5));
            let meta = f.data.join("f").symlink_metadata().expect("stat");
            assert_eq!((meta.mtime(), meta.atime()), (1_000_000, 2_000_000));

            if is_root() {
                let owner_and_mode = sattr3 {
                    mode: set_mode3::Some(0o4755),
                    uid: set_uid3::Some(1234),
                    gid: set_gid3::Some(4321),
                    ..sattr3::default()
                };
                setattr(&mut c, &file, owner_and_mode)
                    .await
                    .expect("chown + chmod");
                let meta = f.data.join("f").symlink_metadata().expect("stat");
                assert_eq!((meta.uid(), meta.gid()), (1234, 4321));
                assert_eq!(
                    meta.mode() & 0o7777,
                    0o4755,
                    "set-uid kept: mode after owner"
                );
            }

            // SETATTR on the exported directory itself.
            setattr(&mut c, &root, with_mode(0o751))
                .await
                .expect("chmod the export");
            assert_eq!(disk_mode(&f.data), 0o751);

            let link = symlink(&mut c, &root, b"l", b"f").await.expect("symlink");
            assert_eq!(readlink(&mut c, &link).await.expect("readlink"), b"f");
            let on_disk = std::fs::read_link(f.data.join("l")).expect("read_link");
            assert_eq!(on_disk, Path::new("f"));
            assert_eq!(readlink(&mut c, &file).await, Err(nfsstat3::NFS3ERR_INVAL));
            remove(&mut c, &root, b"l").await.expect("remove link");
            assert!(f.data.join("f").is_file());

            let verf = createverf3(*b"verifier");
            let exclusive = create(&mut c, &root, b"x", createhow3::EXCLUSIVE(verf))
                .await
                .expect("exclusive create");
            let retransmitted = create(&mut c, &root, b"x", createhow3::EXCLUSIVE(verf))
                .await
                .expect("same verifier");
            assert_eq!(exclusive, retransmitted);
            let other = createhow3::EXCLUSIVE(createverf3(*b"another!"));
            assert_eq!(
                create(&mut c, &root, b"x", other).await,
                Err(nfsstat3::NFS3ERR_EXIST)
            );
        })
        .await;
    }

    #[tokio::test]
    async fn concurrent_connections_each_get_their_answers() {
        within(async {
            let f = fixture().await;
            let mut tasks = JoinSet::new();
            for worker in 0..4 {
                let addr = f.server.local_addr();
                tasks.spawn(async move {
                    // Explicit ports this time, no portmap.
                    let mut c =
                        Nfs3ConnectionBuilder::new(TokioConnector, addr.ip().to_string(), "/")
                            .mount_port(addr.port())
                            .nfs3_port(addr.port())
                            .connect_from_privileged_port(false)
                            .credential(opaque_auth::auth_unix(&auth_unix::default()))
                            .mount()
                            .await
                            .expect("mount");
                    let root = c.root_nfs_fh3();
                    for i in 0..50 {
                        let name = format!("w{worker}-{i}");
                        let (fh, attr) = mkdir(&mut c, &root, name.as_bytes(), with_mode(0o700))
                            .await
                            .expect("mkdir");
                        assert_eq!(attr.mode, 0o700);
                        let looked_up = lookup(&mut c, &root, name.as_bytes())
                            .await
                            .expect("lookup");
                        assert_eq!(looked_up, fh);
                    }
                });
            }
            while let Some(done) = tasks.join_next().await {
                done.expect("worker");
            }
            assert_eq!(disk_names(&f.data).len(), 200);
        })
        .await;
    }
}
