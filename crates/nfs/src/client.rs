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

/// An NFS export: where to send MOUNT and NFS calls.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NfsTarget {
    /// Server address (resolve host names before building the target).
    pub server: IpAddr,
    /// MOUNT path of the export, e.g. `/export/rw`.
    pub share: String,
    /// `Some(port)`: portmap, MOUNT and NFS are all served on this one port
    /// (as the embedded `nfs3_server` does), so the portmapper is not asked.
    /// `None`: ask the portmapper on port 111 for the MOUNT and NFS ports.
    pub port: Option<u16>,
}

impl fmt::Display for NfsTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.server, self.port) {
            (IpAddr::V6(ip), Some(port)) => write!(f, "[{ip}]:{port}:{}", self.share),
            (ip, Some(port)) => write!(f, "{ip}:{port}:{}", self.share),
            (ip, None) => write!(f, "{ip}:{}", self.share),
        }
    }
}

/// Knobs for an [`NfsClient`]. `Default` gives the documented defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// Upper bound for one RPC (send + reply). Default 10 s.
    pub call_timeout: Duration,
    /// Upper bound for opening a connection: portmap (if used), MOUNT, and the
    /// NFS connection. Default 5 s.
    pub connect_timeout: Duration,
    /// Connections (= concurrent calls) per target. Default 8; 0 is treated as 1.
    pub max_connections: usize,
    /// `AUTH_UNIX` uid. Default 0.
    pub uid: u32,
    /// `AUTH_UNIX` gid. Default 0.
    pub gid: u32,
    /// Connect from a source port below 1024, which many servers (knfsd with
    /// `secure`, ganesha's default for root) require. Needs root or
    /// `CAP_NET_BIND_SERVICE`, so it is off by default: the caller decides.
    pub privileged_port: bool,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            call_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            max_connections: 8,
            uid: 0,
            gid: 0,
            privileged_port: false,
        }
    }
}

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
        }
    }
}

/// Outcome of a `mkdir`: the directory is there either way.
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

/// Everything that can go wrong. Paths in errors are relative to the share and
/// joined with `/`.
#[derive(Debug, thiserror::Error)]
pub enum NfsError {
    /// A path component failed validation; nothing was sent to the server.
    #[error("invalid path component {component:?}: {reason}")]
    InvalidName {
        component: String,
        reason: &'static str,
    },
    #[error("`{path}` does not exist on the NFS export")]
    NotFound { path: String },
    #[error("`{path}` exists on the NFS export but is not a directory")]
    NotADirectory { path: String },
    #[error("`{path}` already exists on the NFS export")]
    AlreadyExists { path: String },
    #[error(
        "NFS server denied {op} on `{path}`: permission denied \
         (check the export's access and root squashing, and the owner and mode of the parent directory)"
    )]
    PermissionDenied { path: String, op: &'static str },
    #[error("no space left on the NFS export (or quota exceeded)")]
    NoSpace,
    /// A call on an established connection got no reply in time; the
    /// operation may or may not have happened on the server.
    #[error("NFS {op} got no reply within {after:?}")]
    Timeout { op: &'static str, after: Duration },
    /// Opening a connection failed: TCP connect, portmap, MOUNT, or the connect timeout.
    #[error("cannot connect to NFS server {server} for export `{share}`: {reason}")]
    Connect {
        server: String,
        share: String,
        reason: String,
    },
    /// The connection broke during a call (server went away, reset).
    #[error("NFS {op} failed, connection lost: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// Any other `NFS3ERR_*` status.
    #[error("NFS {op} on `{path}` failed: {status}")]
    Server {
        op: &'static str,
        path: String,
        status: String,
    },
    /// Malformed or unexpected replies, RPC-level rejections (auth, program).
    #[error("NFS protocol error: {0}")]
    Protocol(String),
}

impl NfsError {
    /// Errors that say "the server can't be reached right now": retrying later
    /// may succeed without changing anything.
    #[must_use]
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Timeout { .. } | Self::Connect { .. } | Self::Io { .. } => true,
            Self::Server { status, .. } => status == "NFS3ERR_JUKEBOX",
            _ => false,
        }
    }
}

/// Check one path component before it is sent anywhere: not empty, not `.`
/// or `..`, no `/`, no NUL, at most [`MAX_COMPONENT_LEN`] bytes.
pub fn validate_component(component: &str) -> Result<(), NfsError> {
    let reason = if component.is_empty() {
        "is empty"
    } else if component == "." || component == ".." {
        "`.` and `..` are not allowed"
    } else if component.contains('/') {
        "contains `/`"
    } else if component.contains('\0') {
        "contains a NUL byte"
    } else if component.len() > MAX_COMPONENT_LEN {
        "is longer than 255 bytes"
    } else {
        return Ok(());
    };
    Err(NfsError::InvalidName {
        component: component.to_owned(),
        reason,
    })
}

fn validate_path(path: &[&str]) -> Result<(), NfsError> {
    path.iter().try_for_each(|c| validate_component(c))
}

/// Validate a path that must name something below the root.
fn validate_non_root(path: &[&str]) -> Result<(), NfsError> {
    if path.is_empty() {
        return Err(NfsError::InvalidName {
            component: String::new(),
            reason: "the path is empty (the export root itself can't be used here)",
        });
    }
    validate_path(path)
}

fn join(path: &[&str]) -> String {
    path.join("/")
}

/// Map an `NFS3ERR_*` status of operation `op` on `path`.
fn status_error(op: &'static str, path: &str, status: nfsstat3) -> NfsError {
    let path = path.to_owned();
    match status {
        nfsstat3::NFS3ERR_NOENT => NfsError::NotFound { path },
        nfsstat3::NFS3ERR_EXIST => NfsError::AlreadyExists { path },
        nfsstat3::NFS3ERR_ACCES | nfsstat3::NFS3ERR_PERM => NfsError::PermissionDenied { path, op },
        nfsstat3::NFS3ERR_NOSPC | nfsstat3::NFS3ERR_DQUOT => NfsError::NoSpace,
        nfsstat3::NFS3ERR_NOTDIR => NfsError::NotADirectory { path },
        other => NfsError::Server {
            op,
            path,
            status: other.to_string(),
        },
    }
}

fn rpc_error(op: &'static str, err: RpcError) -> NfsError {
    match err {
        RpcError::Io(source) => NfsError::Io { op, source },
        RpcError::Auth(stat) => NfsError::Protocol(format!(
            "{op}: the server rejected the AUTH_UNIX credential ({stat})"
        )),
        other => NfsError::Protocol(format!("{op}: {other}")),
    }
}

// ---------------------------------------------------------------------------
// Transport

/// TCP transport for `nfs3_client` that reports end-of-stream as an error.
///
/// The stream is shared with the pooled connection so it can check, before
/// reuse, whether the server closed the connection while it sat idle.
struct Transport {
    stream: Arc<TcpStream>,
}

impl AsyncRead for Transport {
    async fn async_read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            self.stream.readable().await?;
            match self.stream.try_read(buf) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the NFS server closed the connection",
                    ));
                }
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl AsyncWrite for Transport {
    async fn async_write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            self.stream.writable().await?;
            match self.stream.try_write(buf) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// Opens [`Transport`]s and remembers the last stream it opened: the
/// connection builder opens the NFS connection last, and the pool keeps that
/// stream for idle checks.
struct TransportConnector {
    last: Arc<Mutex<Option<Arc<TcpStream>>>>,
}

impl TransportConnector {
    fn wrap(&self, stream: TcpStream) -> Transport {
        // Requests are written whole; don't let Nagle hold back the last segment.
        let _ = stream.set_nodelay(true);
        let stream = Arc::new(stream);
        *self.last.lock().unwrap_or_else(PoisonError::into_inner) = Some(Arc::clone(&stream));
        Transport { stream }
    }
}

impl Connector for TransportConnector {
    type Connection = Transport;

    async fn connect(&self, addr: SocketAddr) -> io::Result<Transport> {
        let stream = TcpStream::connect(addr).await?;
        Ok(self.wrap(stream))
    }

    async fn connect_with_port(&self, addr: SocketAddr, local_port: u16) -> io::Result<Transport> {
        let (socket, local) = match addr {
            SocketAddr::V4(_) => (TcpSocket::new_v4()?, IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            SocketAddr::V6(_) => (TcpSocket::new_v6()?, IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
        };
        // Lets a port whose previous connection is in TIME_WAIT be bound again.
        socket.set_reuseaddr(true)?;
        socket.bind(SocketAddr::new(local, local_port))?;
        let stream = socket.connect(addr).await.map_err(|e| {
            if e.kind() == io::ErrorKind::AddrNotAvailable {
                // Same 4-tuple still in TIME_WAIT: make the caller try the next port.
                io::Error::new(io::ErrorKind::AddrInUse, e)
            } else {
                e
            }
        })?;
        Ok(self.wrap(stream))
    }
}

// ---------------------------------------------------------------------------
// Connections and pool

/// One mounted NFS connection with the export's root handle.
struct Conn {
    nfs: Nfs3Client<Transport>,
    stream: Arc<TcpStream>,
    root: nfs_fh3,
    call_timeout: Duration,
    /// Cleared while a call is in flight and after any transport/RPC error or
    /// timeout: only a reusable connection goes back to the pool. A call whose
    /// future is dropped mid-flight leaves it cleared as well.
    reusable: bool,
    /// Shared with the pool: see [`DirCache`].
    dirs: DirCache,
}

/// Run one RPC under the call timeout and keep the connection's state honest.
async fn guarded<T>(
    reusable: &mut bool,
    after: Duration,
    op: &'static str,
    call: impl Future<Output = Result<T, RpcError>>,
) -> Result<T, NfsError> {
    *reusable = false;
    match tokio::time::timeout(after, call).await {
        Ok(Ok(reply)) => {
            *reusable = true;
            Ok(reply)
        }
        Ok(Err(e)) => {
            tracing::debug!(op, error = %e, "NFS call failed; dropping the connection");
            Err(rpc_error(op, e))
        }
        Err(_) => {
            tracing::debug!(op, ?after, "NFS call timed out; dropping the connection");
            Err(NfsError::Timeout { op, after })
        }
    }
}

fn dirop(dir: &nfs_fh3, name: &[u8]) -> diropargs3<'static> {
    diropargs3 {
        dir: dir.clone(),
        name: filename3::from(name.to_vec()),
    }
}

impl Conn {
    /// Has the server closed (or written garbage to) this idle connection?
    fn is_alive(&self) -> bool {
        let mut byte = [0u8; 1];
        // An idle connection has nothing to read. EOF, a reset, or stray bytes
        // (a late reply) all mean it must not be used again.
        matches!(self.stream.try_read(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    async fn getattr(&mut self, fh: &nfs_fh3, path: &str) -> Result<Attr, NfsError> {
        let args = GETATTR3args { object: fh.clone() };
        let res = guarded(
            &mut self.reusable,
            self.call_timeout,
            "GETATTR",
            self.nfs.getattr(&args),
        )
        .await?;
        match res {
            Nfs3Result::Ok(ok) => Ok(Attr::from(&ok.obj_attributes)),
            Nfs3Result::Err((stat, _)) => Err(status_error("GETATTR", path, stat)),
        }
    }

    /// Attributes from a reply if present, else `GETATTR`.
    async fn attr_of(
        &mut self,
        fh: &nfs_fh3,
        attrs: Option<fattr3>,
        path: &str,
    ) -> Result<Attr, NfsError> {
        match attrs {
            Some(a) => Ok(Attr::from(&a)),
            None => self.getattr(fh, path).await,
        }
    }

    /// `LOOKUP name` in `dir`; `Ok(None)` when it doesn't exist. `path` is the
    /// display path of `name` and `dir_path` that of `dir`.
    async fn lookup(
        &mut self,
        dir: &nfs_fh3,
        name: &[u8],
        path: &str,
        dir_path: &str,
    ) -> Result<Option<(nfs_fh3, Option<fattr3>)>, NfsError> {
        let args = LOOKUP3args {
            what: dirop(dir, name),
        };
        let res = guarded(
            &mut self.reusable,
            self.call_timeout,
            "LOOKUP",
            self.nfs.lookup(&args),
        )
        .await?;
        match res {
            Nfs3Result::Ok(ok) => Ok(Some((ok.object, option(ok.obj_attributes)))),
            Nfs3Result::Err((nfsstat3::NFS3ERR_NOENT, _)) => Ok(None),
            // The directory we looked in is not a directory.
            Nfs3Result::Err((nfsstat3::NFS3ERR_NOTDIR, _)) => Err(NfsError::NotADirectory {
                path: dir_path.to_owned(),
            }),
            Nfs3Result::Err((stat, _)) => Err(status_error("LOOKUP", path, stat)),
        }
    }

    /// Walk `path` from the export root. `Ok(Err(i))`: `path[..=i]` is the first
    /// prefix that does not exist.
    async fn walk(
        &mut self,
        path: &[&str],
    ) -> Result<Result<(nfs_fh3, Option<fattr3>), usize>, NfsError> {
        let mut fh = self.root.clone();
        let mut attrs = None;
        for (i, name) in path.iter().enumerate() {
            let here = join(&path[..=i]);
            let parent = join(&path[..i]);
            match self.lookup(&fh, name.as_bytes(), &here, &parent).await? {
                Some((next, a)) => {
                    fh = next;
                    attrs = a;
                }
                None => return Ok(Err(i)),
            }
        }
        Ok(Ok((fh, attrs)))
    }

    /// Walk `path`; `None` if it doesn't exist, including when a prefix is not
    /// a directory (nothing can exist below a file).
    async fn find(&mut self, path: &[&str]) -> Result<Option<(nfs_fh3, Option<fattr3>)>, NfsError> {
        match self.walk(path).await {
            Ok(Ok(found)) => Ok(Some(found)),
            Ok(Err(_)) | Err(NfsError::NotADirectory { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Walk to an existing directory (from the cache when it was walked to before);
    /// `NotFound` names the first missing prefix.
    async fn walk_dir(&mut self, path: &[&str]) -> Result<nfs_fh3, NfsError> {
        if path.is_empty() {
            return Ok(self.root.clone());
        }
        let display = join(path);
        if let Some(fh) = self
            .dirs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&display)
        {
            return Ok(fh.clone());
        }
        match self.walk(path).await? {
            Ok((fh, attrs)) => {
                let attr = self.attr_of(&fh, attrs, &display).await?;
                if attr.is_dir() {
                    self.dirs
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(display, fh.clone());
                    Ok(fh)
                } else {
                    Err(NfsError::NotADirectory { path: display })
                }
            }
            Err(i) => Err(NfsError::NotFound {
                path: join(&path[..=i]),
            }),
        }
    }

    async fn setattr(
        &mut self,
        fh: &nfs_fh3,
        attributes: sattr3,
        path: &str,
    ) -> Result<Option<Attr>, NfsError> {
        let args = SETATTR3args {
            object: fh.clone(),
            new_attributes: attributes,
            guard: Nfs3Option::None,
        };
        let res = guarded(
            &mut self.reusable,
            self.call_timeout,
            "SETATTR",
            self.nfs.setattr(&args),
        )
        .await?;
        match res {
            Nfs3Result::Ok(ok) => Ok(option(ok.obj_wcc.after).as_ref().map(Attr::from)),
            Nfs3Result::Err((stat, _)) => Err(status_error("SETATTR", path, stat)),
        }
    }

    /// Make sure directory `name` exists in `dir`, creating it if needed: looks the
    /// name up before MKDIR (some servers create a duplicate entry instead of
    /// answering `NFS3ERR_EXIST`) and again after `EXIST`. An existing directory is
    /// `Existed` and left untouched; an existing non-directory is `NotADirectory`.
    async fn ensure_dir(
        &mut self,
        dir: &nfs_fh3,
        name: &str,
        path: &str,
        dir_path: &str,
        mode: u32,
        owner: Option<(u32, u32)>,
    ) -> Result<(Mkdir, nfs_fh3), NfsError> {
        if let Some(found) = self.lookup(dir, name.as_bytes(), path, dir_path).await? {
            return self.existing_dir(found, path).await;
        }
        match self
            .mkdir_exact(dir, name, path, dir_path, mode, owner)
            .await?
        {
            Ok((attr, fh)) => Ok((Mkdir::Created(attr), fh)),
            Err(nfsstat3::NFS3ERR_EXIST) => {
                // Created concurrently, or a non-directory is in the way.
                match self.lookup(dir, name.as_bytes(), path, dir_path).await? {
                    Some(found) => self.existing_dir(found, path).await,
                    None => Err(NfsError::Server {
                        op: "MKDIR",
                        path: path.to_owned(),
                        status: "NFS3ERR_EXIST, yet LOOKUP finds nothing".to_owned(),
                    }),
                }
            }
            Err(stat) => Err(status_error("MKDIR", path, stat)),
        }
    }

    /// One `MKDIR` with an explicit mode (and owner), made exact with one
    /// `SETATTR` if the server didn't apply it. `Ok(Err(status))` for NFS errors.
    async fn mkdir_exact(
        &mut self,
        dir: &nfs_fh3,
        name: &str,
        path: &str,
        dir_path: &str,
        mode: u32,
        owner: Option<(u32, u32)>,
    ) -> Result<Result<(Attr, nfs_fh3), nfsstat3>, NfsError> {
        let args = MKDIR3args {
            where_: dirop(dir, name.as_bytes()),
            attributes: sattr3 {
                mode: Nfs3Option::Some(mode & 0o7777),
                uid: owner.map_or(Nfs3Option::None, |(uid, _)| Nfs3Option::Some(uid)),
                gid: owner.map_or(Nfs3Option::None, |(_, gid)| Nfs3Option::Some(gid)),
                ..sattr3::default()
            },
        };
        let res = guarded(
            &mut self.reusable,
            self.call_timeout,
            "MKDIR",
            self.nfs.mkdir(&args),
        )
        .await?;
        let ok = match res {
            Nfs3Result::Ok(ok) => ok,
            Nfs3Result::Err((stat, _)) => return Ok(Err(stat)),
        };
        let fh = match ok.obj {
            Nfs3Option::Some(fh) => fh,
            Nfs3Option::None => match self.lookup(dir, name.as_bytes(), path, dir_path).await? {
                Some((fh, _)) => fh,
                None => {
                    return Err(NfsError::Protocol(format!(
                        "MKDIR `{path}` succeeded but LOOKUP can't find it"
                    )));
                }
            },
        };
        let mut attr = self.attr_of(&fh, option(ok.obj_attributes), path).await?;
        if attr.mode & 0o7777 != mode & 0o7777 {
            // Servers differ: ganesha drops setgid/sticky from MKDIR's mode (as
            // mkdir(2) does), others apply a umask or ignore the mode (memfs).
            // One SETATTR makes it exact where the server allows it.
            tracing::debug!(
                path,
                got = attr.mode,
                want = mode,
                "fixing mode after MKDIR"
            );
            let fix = sattr3 {
                mode: Nfs3Option::Some(mode & 0o7777),
                ..sattr3::default()
            };
            attr = match self.setattr(&fh, fix, path).await? {
                Some(a) => a,
                None => self.getattr(&fh, path).await?,
            };
        }
        Ok(Ok((attr, fh)))
    }
    async fn existing_dir(
        &mut self,
        (fh, attrs): (nfs_fh3, Option<fattr3>),
        path: &str,
    ) -> Result<(Mkdir, nfs_fh3), NfsError> {
        let attr = self.attr_of(&fh, attrs, path).await?;
        if attr.is_dir() {
            Ok((Mkdir::Existed(attr), fh))
        } else {
            Err(NfsError::NotADirectory {
                path: path.to_owned(),
            })
        }
    }

    /// `REMOVE` (files, symlinks…) or `RMDIR` (empty directories) one entry.
    /// An entry that is already gone counts as removed.
    async fn unlink(
        &mut self,
        dir: &nfs_fh3,
        name: &[u8],
        is_dir: bool,
        path: &str,
    ) -> Result<(), NfsError> {
        let (op, stat) = if is_dir {
            let args = RMDIR3args {
                object: dirop(dir, name),
            };
            let res = guarded(
                &mut self.reusable,
                self.call_timeout,
                "RMDIR",
                self.nfs.rmdir(&args),
            )
            .await?;
            ("RMDIR", status_of(&res))
        } else {
            let args = REMOVE3args {
                object: dirop(dir, name),
            };
            let res = guarded(
                &mut self.reusable,
                self.call_timeout,
                "REMOVE",
                self.nfs.remove(&args),
            )
            .await?;
            ("REMOVE", status_of(&res))
        };
        match stat {
            nfsstat3::NFS3_OK | nfsstat3::NFS3ERR_NOENT => Ok(()),
            other => Err(status_error(op, path, other)),
        }
    }

    /// One `RENAME`; the status is the caller's to interpret.
    async fn rename_once(
        &mut self,
        from_dir: &nfs_fh3,
        from_name: &[u8],
        to_dir: &nfs_fh3,
        to_name: &[u8],
    ) -> Result<nfsstat3, NfsError> {
        let args = RENAME3args {
            from: dirop(from_dir, from_name),
            to: dirop(to_dir, to_name),
        };
        let res = guarded(
            &mut self.reusable,
            self.call_timeout,
            "RENAME",
            self.nfs.rename(&args),
        )
        .await?;
        Ok(status_of(&res))
    }

    /// Every entry of a directory (without `.` and `..`), all pages.
    async fn list(&mut self, dir: &nfs_fh3, path: &str) -> Result<Vec<Entry>, NfsError> {
        // A directory changing under us may invalidate cookies: start over a few times.
        for _ in 0..3 {
            match self.list_once(dir, path).await {
                Err(NfsError::Server { status, .. }) if status == "NFS3ERR_BAD_COOKIE" => {}
                other => return other,
            }
        }
        self.list_once(dir, path).await
    }

    async fn list_once(&mut self, dir: &nfs_fh3, path: &str) -> Result<Vec<Entry>, NfsError> {
        let mut entries = Vec::new();
        let mut cookie = 0;
        let mut cookieverf = cookieverf3::default();
        loop {
            let args = READDIRPLUS3args {
                dir: dir.clone(),
                cookie,
                cookieverf,
                dircount: READDIR_DIRCOUNT,
                maxcount: READDIR_MAXCOUNT,
            };
            let res = guarded(
                &mut self.reusable,
                self.call_timeout,
                "READDIRPLUS",
                self.nfs.readdirplus(&args),
            )
            .await?;
            let ok = match res {
                Nfs3Result::Ok(ok) => ok,
                Nfs3Result::Err((nfsstat3::NFS3ERR_NOTSUPP, _)) if cookie == 0 => {
                    return self.list_plain(dir, path).await;
                }
                Nfs3Result::Err((stat, _)) => return Err(status_error("READDIRPLUS", path, stat)),
            };
            cookieverf = ok.cookieverf;
            let eof = ok.reply.eof;
            let page = ok.reply.entries.into_inner();
            if page.is_empty() && !eof {
                return Err(NfsError::Protocol(format!(
                    "READDIRPLUS `{path}`: empty page without EOF"
                )));
            }
            for e in page {
                cookie = e.cookie;
                let name = e.name.0.into_owned();
                if !checked_entry_name(&name, path)? {
                    continue;
                }
                entries.push(Entry {
                    kind: option(e.name_attributes)
                        .as_ref()
                        .map(|a| Attr::from(a).kind),
                    fh: option(e.name_handle),
                    name,
                });
            }
            if eof {
                return Ok(entries);
            }
        }
    }

    /// Listing for servers without `READDIRPLUS`: names only.
    async fn list_plain(&mut self, dir: &nfs_fh3, path: &str) -> Result<Vec<Entry>, NfsError> {
        let mut entries = Vec::new();
        let mut cookie = 0;
        let mut cookieverf = cookieverf3::default();
        loop {
            let args = READDIR3args {
                dir: dir.clone(),
                cookie,
                cookieverf,
                count: READDIR_MAXCOUNT,
            };
            let res = guarded(
                &mut self.reusable,
                self.call_timeout,
                "READDIR",
                self.nfs.readdir(&args),
            )
            .await?;
            let ok = match res {
                Nfs3Result::Ok(ok) => ok,
                Nfs3Result::Err((stat, _)) => return Err(status_error("READDIR", path, stat)),
            };
            cookieverf = ok.cookieverf;
            let eof = ok.reply.eof;
            let page = ok.reply.entries.into_inner();
            if page.is_empty() && !eof {
                return Err(NfsError::Protocol(format!(
                    "READDIR `{path}`: empty page without EOF"
                )));
            }
            for e in page {
                cookie = e.cookie;
                let name = e.name.0.into_owned();
                if checked_entry_name(&name, path)? {
                    entries.push(Entry {
                        name,
                        kind: None,
                        fh: None,
                    });
                }
            }
            if eof {
                return Ok(entries);
            }
        }
    }

    /// Remove directory `name` (handle `fh`) in `parent` and everything below it.
    /// Iterative, so deep trees don't need recursion.
    async fn remove_tree(
        &mut self,
        parent: nfs_fh3,
        name: Vec<u8>,
        fh: nfs_fh3,
        path: String,
    ) -> Result<(), NfsError> {
        let mut stack = vec![Frame {
            parent,
            name,
            fh,
            path,
            emptied: 0,
        }];
        while let Some(top) = stack.last_mut() {
            let (dir, dir_path) = (top.fh.clone(), top.path.clone());
            let entries = match self.list(&dir, &dir_path).await {
                Ok(entries) => entries,
                Err(e @ (NfsError::NotFound { .. } | NfsError::Server { .. })) => {
                    // Removed underneath us (NOENT, STALE)? Then this one is done.
                    let (parent, name) = (top.parent.clone(), top.name.clone());
                    if self.lookup(&parent, &name, &dir_path, "").await?.is_some() {
                        return Err(e);
                    }
                    stack.pop();
                    continue;
                }
                Err(e) => return Err(e),
            };
            let mut subdirs = Vec::new();
            for entry in entries {
                let entry_path = format!("{dir_path}/{}", String::from_utf8_lossy(&entry.name));
                let (kind, fh) = match (entry.kind, entry.fh) {
                    (Some(kind), Some(fh)) => (kind, fh),
                    (Some(kind), None) if kind != FileKind::Dir => (kind, nfs_fh3::default()),
                    _ => match self
                        .lookup(&dir, &entry.name, &entry_path, &dir_path)
                        .await?
                    {
                        Some((fh, attrs)) => {
                            (self.attr_of(&fh, attrs, &entry_path).await?.kind, fh)
                        }
                        None => continue,
                    },
                };
                if kind == FileKind::Dir {
                    subdirs.push(Frame {
                        parent: dir.clone(),
                        name: entry.name,
                        fh,
                        path: entry_path,
                        emptied: 0,
                    });
                } else {
                    self.unlink(&dir, &entry.name, false, &entry_path).await?;
                }
            }
            if subdirs.is_empty() {
                let top = stack.last_mut().expect("stack is not empty");
                let args = RMDIR3args {
                    object: dirop(&top.parent, &top.name),
                };
                let res = guarded(
                    &mut self.reusable,
                    self.call_timeout,
                    "RMDIR",
                    self.nfs.rmdir(&args),
                )
                .await?;
                match status_of(&res) {
                    nfsstat3::NFS3_OK | nfsstat3::NFS3ERR_NOENT => {
                        stack.pop();
                    }
                    nfsstat3::NFS3ERR_NOTEMPTY | nfsstat3::NFS3ERR_EXIST
                        if top.emptied + 1 < MAX_RMDIR_ATTEMPTS =>
                    {
                        // Something appeared meanwhile: list again.
                        top.emptied += 1;
                    }
                    other => return Err(status_error("RMDIR", &top.path, other)),
                }
            } else {
                if stack.len() + 1 > MAX_TREE_DEPTH {
                    return Err(NfsError::Protocol(format!(
                        "`{dir_path}`: directory tree deeper than {MAX_TREE_DEPTH} levels"
                    )));
                }
                stack.extend(subdirs);
            }
        }
        Ok(())
    }
}

/// Is this server-supplied directory entry name usable? `false` for `.`/`..`;
/// an error for names no POSIX directory can hold.
fn checked_entry_name(name: &[u8], dir_path: &str) -> Result<bool, NfsError> {
    if name == b"." || name == b".." {
        return Ok(false);
    }
    if name.is_empty() || name.contains(&b'/') || name.contains(&0) {
        return Err(NfsError::Protocol(format!(
            "directory `{dir_path}` lists an invalid entry name {:?}",
            String::from_utf8_lossy(name)
        )));
    }
    Ok(true)
}

fn option<T: nfs3_types::xdr_codec::Pack + nfs3_types::xdr_codec::Unpack>(
    o: Nfs3Option<T>,
) -> Option<T> {
    match o {
        Nfs3Option::Some(v) => Some(v),
        Nfs3Option::None => None,
    }
}

fn status_of<T, E>(res: &Nfs3Result<T, E>) -> nfsstat3 {
    match res {
        Nfs3Result::Ok(_) => nfsstat3::NFS3_OK,
        Nfs3Result::Err((stat, _)) => *stat,
    }
}

/// One directory entry as listed.
struct Entry {
    name: Vec<u8>,
    kind: Option<FileKind>,
    fh: Option<nfs_fh3>,
}

/// A directory pending removal in `remove_tree`.
struct Frame {
    parent: nfs_fh3,
    name: Vec<u8>,
    fh: nfs_fh3,
    path: String,
    /// How often RMDIR found it not empty after it was emptied.
    emptied: u32,
}

/// Handles of directories already walked to, by path (`a/b`). Directory handles are
/// server-wide, so every connection shares them; a STALE answer clears the cache.
type DirCache = Arc<Mutex<HashMap<String, nfs_fh3>>>;

struct Inner {
    dirs: DirCache,
    target: NfsTarget,
    config: ClientConfig,
    credential: opaque_auth<'static>,
    permits: Semaphore,
    idle: Mutex<Vec<Conn>>,
}

/// A connection checked out of the pool. Dropping it returns the connection
/// to the pool only if it is still reusable.
struct Lease<'a> {
    inner: &'a Inner,
    conn: Option<Conn>,
    _permit: SemaphorePermit<'a>,
}

impl Deref for Lease<'_> {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        self.conn.as_ref().expect("lease holds a connection")
    }
}

impl DerefMut for Lease<'_> {
    fn deref_mut(&mut self) -> &mut Conn {
        self.conn.as_mut().expect("lease holds a connection")
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            if conn.reusable {
                self.inner
                    .idle
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(conn);
            } else {
                tracing::debug!(export = %self.inner.target, "dropping NFS connection");
            }
        }
    }
}

/// A pool of NFSv3 connections to one export. Cheap to clone; clones share the pool.
#[derive(Clone)]
pub struct NfsClient {
    inner: Arc<Inner>,
}

impl fmt::Debug for NfsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NfsClient")
            .field("target", &self.inner.target)
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

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

    /// [`create_dir`](Self::create_dir) once, without the stale-handle retry.
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
        self.stale_checked(self.create_dir_once(path, mode, owner).await)
    }

    /// `RMDIR` one empty directory. `NotFound` if it (or a parent) is missing;
    /// a non-empty directory is `Server { status: "NFS3ERR_NOTEMPTY" }`.
    pub async fn remove_dir(&self, path: &[&str]) -> Result<(), NfsError> {
        self.forget(path);
        self.stale_checked(self.remove_dir_once(path).await)
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
        let result = async {
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
        }
        .await;
        self.stale_checked(result)
    }

    /// The target of symbolic link `path`; `None` if it doesn't exist.
    pub async fn readlink(&self, path: &[&str]) -> Result<Option<String>, NfsError> {
        validate_non_root(path)?;
        let result = async {
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
        }
        .await;
        self.stale_checked(result)
    }

    /// `REMOVE` one non-directory entry (file, symlink); one that is not there (or
    /// whose directory is not) counts as removed.
    pub async fn remove_file(&self, path: &[&str]) -> Result<(), NfsError> {
        validate_non_root(path)?;
        let result = async {
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
        }
        .await;
        self.stale_checked(result)
    }

    /// Drop cached handles of `path` and everything below it (it is going away).
    fn forget(&self, path: &[&str]) {
        let prefix = join(path);
        let below = format!("{prefix}/");
        self.inner
            .dirs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|k, _| k != &prefix && !k.starts_with(&below));
    }

    /// A STALE answer means a cached handle outlived its directory (removed or
    /// replaced behind our back): forget them all; the next call walks again.
    fn stale_checked<T>(&self, result: Result<T, NfsError>) -> Result<T, NfsError> {
        if let Err(NfsError::Server { status, .. }) = &result
            && status.contains("STALE")
        {
            tracing::info!(export = %self.inner.target, "stale directory handle; clearing the handle cache");
            self.inner
                .dirs
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clear();
        }
        result
    }

    /// Take an idle connection that is still alive, or open a new one.
    async fn lease(&self) -> Result<Lease<'_>, NfsError> {
        let inner = &*self.inner;
        let permit = inner
            .permits
            .acquire()
            .await
            .map_err(|_| NfsError::Protocol("connection pool closed".to_owned()))?;
        loop {
            let conn = inner
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop();
            match conn {
                Some(conn) if conn.is_alive() => {
                    return Ok(Lease {
                        inner,
                        conn: Some(conn),
                        _permit: permit,
                    });
                }
                Some(_) => {
                    tracing::debug!(export = %inner.target, "idle NFS connection was closed; discarding it");
                }
                None => break,
            }
        }
        let conn = self.connect().await?;
        Ok(Lease {
            inner,
            conn: Some(conn),
            _permit: permit,
        })
    }

    /// MOUNT the share and open the NFS connection, within `connect_timeout`.
    async fn connect(&self) -> Result<Conn, NfsError> {
        let inner = &*self.inner;
        let target = &inner.target;
        let config = &inner.config;
        let last = Arc::new(Mutex::new(None));
        let connector = TransportConnector {
            last: Arc::clone(&last),
        };
        let mut builder =
            Nfs3ConnectionBuilder::new(connector, target.server.to_string(), &target.share)
                .connect_from_privileged_port(config.privileged_port)
                .credential(inner.credential.clone());
        if let Some(port) = target.port {
            builder = builder
                .portmapper_port(port)
                .mount_port(port)
                .nfs3_port(port);
        }
        let connect_error = |reason: String| NfsError::Connect {
            server: match target.port {
                Some(port) => SocketAddr::new(target.server, port).to_string(),
                None => target.server.to_string(),
            },
            share: target.share.clone(),
            reason,
        };
        let mounted = match tokio::time::timeout(config.connect_timeout, builder.mount()).await {
            Ok(Ok(mounted)) => mounted,
            Ok(Err(e)) => return Err(connect_error(describe_connect_error(&e, config))),
            Err(_) => {
                return Err(connect_error(format!(
                    "no answer within {:?}",
                    config.connect_timeout
                )));
            }
        };
        let root = mounted.root_nfs_fh3();
        // The MOUNT connection is closed here; only the NFS one is kept.
        let nfs = mounted.into_nfs3_client();
        let stream = last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .ok_or_else(|| NfsError::Protocol("connector opened no NFS connection".to_owned()))?;
        tracing::debug!(export = %target, "connected to NFS export");
        Ok(Conn {
            nfs,
            stream,
            root,
            call_timeout: config.call_timeout,
            reusable: true,
            dirs: Arc::clone(&inner.dirs),
        })
    }

    #[cfg(test)]
    fn idle_connections(&self) -> usize {
        self.inner
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

fn describe_connect_error(e: &ConnectError, config: &ClientConfig) -> String {
    match e {
        ConnectError::Io(io)
            if io.kind() == io::ErrorKind::PermissionDenied && config.privileged_port =>
        {
            format!(
                "{io} (binding a privileged source port needs root or CAP_NET_BIND_SERVICE; \
                 or turn privileged_port off if the server allows it)"
            )
        }
        ConnectError::Mount(MountError::Denied(stat)) => {
            format!("MOUNT refused: {stat} (is the share path exported to this client?)")
        }
        ConnectError::Mount(MountError::Rpc(RpcError::Auth(stat))) => {
            format!("MOUNT rejected the AUTH_UNIX credential: {stat}")
        }
        ConnectError::Portmap(p) => format!("portmapper: {p}"),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    use nfs3_server::memfs::{MemFs, MemFsConfig};
    use nfs3_server::tcp::{NFSTcp, NFSTcpListener};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::task::JoinHandle;

    use super::*;

    const SHARE: &str = "/export/rw";

    /// An in-process memfs server exporting `/export` whose `rw` directory
    /// (plus whatever `setup` adds below `/rw`) is the share.
    struct Server {
        addr: SocketAddr,
        task: JoinHandle<()>,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    async fn memfs(setup: impl FnOnce(&mut MemFsConfig)) -> Server {
        let mut config = MemFsConfig::default();
        config.add_dir("/rw");
        setup(&mut config);
        let fs = MemFs::new(config).expect("memfs config");
        let mut listener = NFSTcpListener::bind("127.0.0.1:0", fs)
            .await
            .expect("bind memfs server");
        listener.with_export_name("export");
        let addr = SocketAddr::new(listener.get_listen_ip(), listener.get_listen_port());
        let task = tokio::spawn(async move {
            let _ = listener.handle_forever().await;
        });
        Server { addr, task }
    }

    fn target(addr: SocketAddr) -> NfsTarget {
        NfsTarget {
            server: addr.ip(),
            share: SHARE.to_owned(),
            port: Some(addr.port()),
        }
    }

    fn client(addr: SocketAddr) -> NfsClient {
        NfsClient::new(target(addr), ClientConfig::default())
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Mode {
        /// Forward both ways.
        Pass,
        /// New connections are accepted and closed at once; established ones
        /// are closed when the client next sends something.
        Drop,
        /// New connections are accepted and never answered; established ones
        /// swallow whatever the client sends from now on.
        BlackHole,
    }

    /// A TCP proxy in front of a server that can make it vanish or go silent.
    struct Proxy {
        addr: SocketAddr,
        mode: Arc<Mutex<Mode>>,
        accepted: Arc<AtomicUsize>,
        peers: Arc<Mutex<Vec<SocketAddr>>>,
        task: JoinHandle<()>,
    }

    impl Drop for Proxy {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    impl Proxy {
        async fn start(upstream: SocketAddr) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
            let addr = listener.local_addr().expect("proxy address");
            let mode = Arc::new(Mutex::new(Mode::Pass));
            let accepted = Arc::new(AtomicUsize::new(0));
            let peers = Arc::new(Mutex::new(Vec::new()));
            let task = tokio::spawn({
                let (mode, accepted) = (Arc::clone(&mode), Arc::clone(&accepted));
                let peers = Arc::clone(&peers);
                async move {
                    loop {
                        let Ok((client, peer)) = listener.accept().await else {
                            return;
                        };
                        peers.lock().expect("peers lock").push(peer);
                        accepted.fetch_add(1, Ordering::SeqCst);
                        tokio::spawn(Self::serve(client, upstream, Arc::clone(&mode)));
                    }
                }
            });
            Self {
                addr,
                mode,
                accepted,
                peers,
                task,
            }
        }

        fn set(&self, mode: Mode) {
            *self.mode.lock().expect("mode lock") = mode;
        }

        fn accepted(&self) -> usize {
            self.accepted.load(Ordering::SeqCst)
        }

        async fn serve(mut client: TcpStream, upstream: SocketAddr, mode: Arc<Mutex<Mode>>) {
            let now = || *mode.lock().expect("mode lock");
            match now() {
                Mode::Drop => return,
                Mode::BlackHole => {
                    let mut buf = [0u8; 4096];
                    while matches!(client.read(&mut buf).await, Ok(n) if n > 0) {}
                    return;
                }
                Mode::Pass => {}
            }
            let Ok(mut up) = TcpStream::connect(upstream).await else {
                return;
            };
            let (mut from_client, mut from_up) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
            let mut stalled = false;
            loop {
                tokio::select! {
                    r = client.read(&mut from_client) => {
                        let n = match r { Ok(0) | Err(_) => return, Ok(n) => n };
                        match now() {
                            Mode::Pass if !stalled => {
                                if up.write_all(&from_client[..n]).await.is_err() {
                                    return;
                                }
                            }
                            Mode::Drop => return,
                            Mode::Pass | Mode::BlackHole => stalled = true,
                        }
                    }
                    r = up.read(&mut from_up), if !stalled => {
                        let n = match r { Ok(0) | Err(_) => return, Ok(n) => n };
                        if client.write_all(&from_up[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Run `fut` on another task and insist it finishes within `limit`. A
    /// task spinning on a dead connection never yields, so this can't just
    /// panic and unwind (the runtime would wait for it forever): it aborts.
    async fn must_finish<T: Send + 'static>(
        limit: Duration,
        fut: impl Future<Output = T> + Send + 'static,
    ) -> (T, Duration) {
        let start = Instant::now();
        match tokio::time::timeout(limit, tokio::spawn(fut)).await {
            Ok(joined) => (joined.expect("task panicked"), start.elapsed()),
            Err(_) => {
                // Not eprintln!: the test harness would swallow it.
                let _ = writeln!(
                    io::stderr(),
                    "call did not return within {limit:?} (spinning on a dead connection?)"
                );
                std::process::abort();
            }
        }
    }

    /// Names in a directory of the share, via a pooled connection.
    async fn names(client: &NfsClient, path: &[&str]) -> Vec<String> {
        let mut conn = client.lease().await.expect("lease");
        let dir = conn.walk_dir(path).await.expect("walk");
        let mut names: Vec<String> = conn
            .list(&dir, &join(path))
            .await
            .expect("list")
            .into_iter()
            .map(|e| String::from_utf8(e.name).expect("utf-8 name"))
            .collect();
        names.sort();
        names
    }

    #[test]
    fn components_are_validated() {
        for ok in [
            "a",
            "pvc-123",
            "...",
            ".hidden",
            "a b",
            "ü",
            &"x".repeat(255),
        ] {
            assert!(validate_component(ok).is_ok(), "{ok:?} should be accepted");
        }
        let long = "x".repeat(256);
        for (bad, reason) in [
            ("", "empty"),
            (".", "`.`"),
            ("..", "`..`"),
            ("a/b", "`/`"),
            ("/", "`/`"),
            ("../../etc", "`/`"),
            ("a\0b", "NUL"),
            (long.as_str(), "255"),
        ] {
            match validate_component(bad) {
                Err(NfsError::InvalidName { reason: r, .. }) => {
                    assert!(r.contains(reason), "{bad:?}: reason {r:?}");
                }
                other => panic!("{bad:?} accepted: {other:?}"),
            }
        }
        let err = validate_component("a\0b").expect_err("NUL");
        assert!(err.to_string().contains(r#""a\0b""#), "{err}");
    }

    #[test]
    fn status_mapping() {
        let e = |s| status_error("MKDIR", "a/b", s);
        assert!(matches!(e(nfsstat3::NFS3ERR_NOENT), NfsError::NotFound { path } if path == "a/b"));
        assert!(matches!(
            e(nfsstat3::NFS3ERR_EXIST),
            NfsError::AlreadyExists { .. }
        ));
        assert!(matches!(
            e(nfsstat3::NFS3ERR_ACCES),
            NfsError::PermissionDenied { op: "MKDIR", .. }
        ));
        assert!(matches!(
            e(nfsstat3::NFS3ERR_PERM),
            NfsError::PermissionDenied { .. }
        ));
        assert!(matches!(e(nfsstat3::NFS3ERR_NOSPC), NfsError::NoSpace));
        assert!(matches!(e(nfsstat3::NFS3ERR_DQUOT), NfsError::NoSpace));
        assert!(matches!(
            e(nfsstat3::NFS3ERR_NOTDIR),
            NfsError::NotADirectory { .. }
        ));
        match e(nfsstat3::NFS3ERR_IO) {
            NfsError::Server { op, status, .. } => {
                assert_eq!((op, status.as_str()), ("MKDIR", "NFS3ERR_IO"))
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn create_dir_all_creates_then_reports_existing() {
        let server = memfs(|_| {}).await;
        let client = client(server.addr);
        let created = client
            .create_dir_all(&["vol"], 0o750, Some((1000, 1000)))
            .await
            .expect("mkdir");
        assert!(
            matches!(created, Mkdir::Created(a) if a.is_dir()),
            "{created:?}"
        );
        let again = client
            .create_dir_all(&["vol"], 0o750, None)
            .await
            .expect("mkdir again");
        assert_eq!(again, Mkdir::Existed(*created.attr()));
        // memfs would happily add a duplicate "vol": the lookup-first kept it single.
        assert_eq!(names(&client, &[]).await, ["vol"]);
        let attr = client.stat(&["vol"]).await.expect("stat").expect("exists");
        assert_eq!(attr.fileid, created.attr().fileid);
    }

    #[tokio::test]
    async fn create_dir_needs_parent_and_create_dir_all_refuses_files() {
        let server = memfs(|c| c.add_file("/rw/file", b"data".to_vec())).await;
        let client = client(server.addr);
        match client
            .create_dir(&["missing", "deeper", "vol"], 0o755, None)
            .await
        {
            Err(NfsError::NotFound { path }) => assert_eq!(path, "missing"),
            other => panic!("{other:?}"),
        }
        match client.create_dir_all(&["file"], 0o755, None).await {
            Err(NfsError::NotADirectory { path }) => assert_eq!(path, "file"),
            other => panic!("{other:?}"),
        }
        match client.create_dir_all(&["file", "vol"], 0o755, None).await {
            Err(NfsError::NotADirectory { path }) => assert_eq!(path, "file"),
            other => panic!("{other:?}"),
        }
        assert_eq!(names(&client, &[]).await, ["file"]);
    }

    #[tokio::test]
    async fn create_dir_all_creates_parents() {
        let server = memfs(|c| c.add_dir("/rw/a")).await;
        let client = client(server.addr);
        let made = client
            .create_dir_all(&["a", "b", "c"], 0o755, None)
            .await
            .expect("create_dir_all");
        assert!(made.created());
        assert!(
            client
                .stat(&["a", "b"])
                .await
                .expect("stat")
                .expect("b")
                .is_dir()
        );
        let again = client
            .create_dir_all(&["a", "b", "c"], 0o755, None)
            .await
            .expect("again");
        assert_eq!(again, Mkdir::Existed(*made.attr()));
        assert_eq!(names(&client, &["a"]).await, ["b"]);
        assert_eq!(names(&client, &["a", "b"]).await, ["c"]);
    }

    #[tokio::test]
    async fn stat_reports_missing_as_none() {
        let server = memfs(|c| c.add_file("/rw/f", b"12345".to_vec())).await;
        let client = client(server.addr);
        assert_eq!(client.stat(&["nope"]).await.expect("stat"), None);
        assert_eq!(client.stat(&["nope", "deeper"]).await.expect("stat"), None);
        let root = client.stat(&[]).await.expect("stat root").expect("root");
        assert!(root.is_dir());
        let f = client.stat(&["f"]).await.expect("stat f").expect("f");
        assert_eq!((f.kind, f.size), (FileKind::File, 5));
        assert_eq!(client.stat(&["f", "below"]).await.expect("stat"), None);
        assert!(
            !client
                .remove_all(&["f", "below"])
                .await
                .expect("remove_all")
        );
        assert!(
            !client
                .remove_all(&["f", "below", "deeper"])
                .await
                .expect("remove_all")
        );
    }

    #[tokio::test]
    async fn hostile_components_are_rejected_before_any_io() {
        let server = memfs(|c| c.add_dir("/rw/a")).await;
        let good = client(server.addr);
        // Nothing listens on port 1: any I/O would be a Connect error.
        let offline = NfsClient::new(
            NfsTarget {
                server: IpAddr::V4(Ipv4Addr::LOCALHOST),
                share: SHARE.to_owned(),
                port: Some(1),
            },
            ClientConfig::default(),
        );
        let hostile: [&[&str]; 7] = [
            &[".."],
            &["..", "..", "escape"],
            &["a", "."],
            &["a/b"],
            &["a", ""],
            &["a\0b"],
            &["a", "../../escape"],
        ];
        for client in [&good, &offline] {
            for path in hostile {
                let invalid = |r: Result<(), NfsError>| {
                    assert!(
                        matches!(r, Err(NfsError::InvalidName { .. })),
                        "{path:?}: {r:?}"
                    );
                };
                invalid(client.create_dir(path, 0o777, None).await.map(drop));
                invalid(client.create_dir_all(path, 0o777, None).await.map(drop));
                invalid(client.remove_all(path).await.map(drop));
                invalid(client.stat(path).await.map(drop));
                invalid(client.rename(&["a"], path).await);
                invalid(client.rename(path, &["z"]).await);
            }
            // The root itself can't be created, removed or renamed.
            assert!(matches!(
                client.remove_all(&[]).await,
                Err(NfsError::InvalidName { .. })
            ));
            assert!(matches!(
                client.create_dir_all(&[], 0o755, None).await,
                Err(NfsError::InvalidName { .. })
            ));
        }
        assert_eq!(names(&good, &[]).await, ["a"]);
        assert!(names(&good, &["a"]).await.is_empty());
    }

    #[tokio::test]
    async fn remove_all_removes_a_tree_with_many_entries() {
        let server = memfs(|c| {
            c.add_dir("/rw/keep");
            c.add_dir("/rw/vol");
            c.add_file("/rw/vol/top.txt", b"x".to_vec());
            c.add_dir("/rw/vol/empty");
            c.add_dir("/rw/vol/d1");
            c.add_dir("/rw/vol/d1/d2");
            c.add_dir("/rw/vol/d1/d2/d3");
            c.add_file("/rw/vol/d1/d2/d3/deep.txt", b"deep".to_vec());
            c.add_dir("/rw/vol/big");
            for i in 0..1500 {
                c.add_file(
                    &format!("/rw/vol/big/a-fairly-long-file-name-{i:05}"),
                    b"y".to_vec(),
                );
            }
        })
        .await;
        let client = client(server.addr);
        // The big directory takes several READDIRPLUS pages; all must be seen.
        {
            let mut conn = client.lease().await.expect("lease");
            let big = conn.walk_dir(&["vol", "big"]).await.expect("walk");
            let first = conn
                .nfs
                .readdirplus(&READDIRPLUS3args {
                    dir: big.clone(),
                    cookie: 0,
                    cookieverf: cookieverf3::default(),
                    dircount: READDIR_DIRCOUNT,
                    maxcount: READDIR_MAXCOUNT,
                })
                .await
                .expect("readdirplus")
                .unwrap();
            assert!(!first.reply.eof, "the test needs more than one page");
            assert_eq!(conn.list(&big, "vol/big").await.expect("list").len(), 1500);
        }
        assert!(client.remove_all(&["vol"]).await.expect("remove_all"));
        assert_eq!(client.stat(&["vol"]).await.expect("stat"), None);
        assert_eq!(names(&client, &[]).await, ["keep"]);
        assert!(!client.remove_all(&["vol"]).await.expect("again"));
        assert!(
            !client
                .remove_all(&["nope", "vol"])
                .await
                .expect("missing parent")
        );
    }

    #[tokio::test]
    async fn remove_all_removes_a_single_file() {
        let server = memfs(|c| c.add_file("/rw/f", b"x".to_vec())).await;
        let client = client(server.addr);
        assert!(client.remove_all(&["f"]).await.expect("remove file"));
        assert!(names(&client, &[]).await.is_empty());
    }

    #[tokio::test]
    async fn rename_moves_and_never_replaces() {
        let server = memfs(|c| {
            c.add_dir("/rw/a");
            c.add_file("/rw/a/inside", b"x".to_vec());
            c.add_dir("/rw/b");
            c.add_dir("/rw/archive");
        })
        .await;
        let client = client(server.addr);
        client
            .rename(&["a"], &["archive", "a-1"])
            .await
            .expect("rename");
        assert_eq!(client.stat(&["a"]).await.expect("stat"), None);
        assert_eq!(names(&client, &["archive", "a-1"]).await, ["inside"]);
        match client.rename(&["b"], &["archive", "a-1"]).await {
            Err(NfsError::AlreadyExists { path }) => assert_eq!(path, "archive/a-1"),
            other => panic!("{other:?}"),
        }
        match client.rename(&["a"], &["c"]).await {
            Err(NfsError::NotFound { path }) => assert_eq!(path, "a"),
            other => panic!("{other:?}"),
        }
        match client.rename(&["b"], &["nope", "b"]).await {
            Err(NfsError::NotFound { path }) => assert_eq!(path, "nope"),
            other => panic!("{other:?}"),
        }
        assert!(client.stat(&["b"]).await.expect("stat").is_some());
    }

    #[tokio::test]
    async fn read_dir_lists_names_and_refuses_files() {
        let server = memfs(|c| {
            c.add_dir("/rw/rec");
            c.add_file("/rw/rec/v1", b"{}".to_vec());
            c.add_file("/rw/rec/empty", Vec::new());
        })
        .await;
        let client = client(server.addr);
        assert_eq!(
            client.read_dir(&["rec"]).await.expect("read_dir"),
            Some(vec!["empty".to_owned(), "v1".to_owned()])
        );
        assert_eq!(client.read_dir(&["nope"]).await.expect("read_dir"), None);
        assert!(matches!(
            client.read_dir(&["rec", "v1"]).await,
            Err(NfsError::NotADirectory { .. })
        ));
        assert_eq!(
            client.read_dir(&[]).await.expect("root"),
            Some(vec!["rec".to_owned()])
        );
    }

    #[tokio::test]
    async fn create_dir_and_remove_dir_are_single_calls() {
        let server = memfs(|c| c.add_file("/rw/f", b"x".to_vec())).await;
        let client = client(server.addr);
        let attr = client
            .create_dir(&["d"], 0o755, None)
            .await
            .expect("create_dir");
        assert!(attr.is_dir());
        client
            .create_dir(&["d", "e"], 0o755, None)
            .await
            .expect("create_dir");
        match client.remove_dir(&["d"]).await {
            Err(NfsError::Server { status, .. }) => assert_eq!(status, "NFS3ERR_NOTEMPTY"),
            other => panic!("{other:?}"),
        }
        client.remove_dir(&["d", "e"]).await.expect("remove_dir");
        client.remove_dir(&["d"]).await.expect("remove_dir");
        match client.remove_dir(&["d"]).await {
            Err(NfsError::NotFound { path }) => assert_eq!(path, "d"),
            other => panic!("{other:?}"),
        }
        match client.create_dir(&["nope", "d"], 0o755, None).await {
            Err(NfsError::NotFound { path }) => assert_eq!(path, "nope"),
            other => panic!("{other:?}"),
        }
        assert_eq!(names(&client, &[]).await, ["f"]);
    }

    #[tokio::test]
    async fn fsstat_reports_the_export() {
        let server = memfs(|c| c.add_dir("/rw/d")).await;
        let client = client(server.addr);
        assert!(client.stat(&["d"]).await.expect("stat").is_some());
        let st = client.fsstat().await.expect("fsstat");
        // memfs reports a fixed 1 TiB / 1 Gi files.
        assert_eq!(st.total_bytes, 1 << 40);
        assert_eq!(st.avail_files, 1 << 30);
        // Everything ran on one connection, which is back in the pool.
        assert_eq!(client.idle_connections(), 1);
    }

    #[tokio::test]
    async fn unknown_share_is_a_connect_error() {
        let server = memfs(|_| {}).await;
        let mut t = target(server.addr);
        t.share = "/export/nope".to_owned();
        let client = NfsClient::new(t, ClientConfig::default());
        match client.stat(&[]).await.map(drop) {
            Err(e @ NfsError::Connect { .. }) => {
                assert!(e.to_string().contains("MNT3ERR_NOENT"), "{e}");
                assert!(e.is_transient());
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn server_going_away_fails_fast_then_reconnects() {
        let server = memfs(|c| c.add_dir("/rw/d")).await;
        let proxy = Proxy::start(server.addr).await;
        let client = NfsClient::new(target(proxy.addr), ClientConfig::default());
        client.stat(&["d"]).await.expect("stat").expect("d");
        assert_eq!(client.idle_connections(), 1);

        // The server vanishes while a pooled connection looks healthy: the
        // next call hits end-of-stream mid-call.
        proxy.set(Mode::Drop);
        let c = client.clone();
        let (res, took) =
            must_finish(Duration::from_secs(3), async move { c.stat(&["d"]).await }).await;
        match res {
            Err(NfsError::Io { op, source }) => {
                assert_eq!(op, "LOOKUP");
                assert_eq!(source.kind(), io::ErrorKind::UnexpectedEof);
            }
            other => panic!("{other:?}"),
        }
        assert!(took < Duration::from_secs(1), "took {took:?}");
        assert_eq!(
            client.idle_connections(),
            0,
            "a broken connection went back to the pool"
        );

        // Still gone: a listener that accepts and hangs up, during MOUNT.
        let c = client.clone();
        let (res, took) = must_finish(Duration::from_secs(3), async move {
            c.create_dir_all(&["x"], 0o755, None).await
        })
        .await;
        match res {
            Err(e @ NfsError::Connect { .. }) => assert!(e.is_transient(), "{e}"),
            other => panic!("{other:?}"),
        }
        assert!(took < Duration::from_secs(1), "took {took:?}");

        // Back again: the next call reconnects.
        proxy.set(Mode::Pass);
        client
            .stat(&["d"])
            .await
            .expect("stat after reconnect")
            .expect("d");
        assert_eq!(client.idle_connections(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn restarted_server_is_reconnected_transparently() {
        let server = memfs(|c| c.add_dir("/rw/d")).await;
        let proxy = Proxy::start(server.addr).await;
        let client = NfsClient::new(target(proxy.addr), ClientConfig::default());
        client.stat(&["d"]).await.expect("stat").expect("d");
        // Close the pooled connection's socket from the server side while idle
        // (the proxy hangs up on the next byte it sees; send it one).
        proxy.set(Mode::Drop);
        {
            let stream = {
                let idle = client.inner.idle.lock().expect("idle");
                Arc::clone(&idle[0].stream)
            };
            stream.writable().await.expect("writable");
            stream.try_write(&[0]).expect("poke");
            // Wait until the proxy has really hung up (readiness may be stale).
            loop {
                stream.readable().await.expect("readable");
                match stream.try_read(&mut [0u8; 1]) {
                    Ok(0) => break,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
        proxy.set(Mode::Pass);
        // The dead idle connection is noticed before use and replaced.
        client
            .stat(&["d"])
            .await
            .expect("stat after restart")
            .expect("d");
        assert_eq!(proxy.accepted(), 4, "expected exactly one reconnect");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn silent_server_times_out_and_connection_is_dropped() {
        let server = memfs(|c| c.add_dir("/rw/d")).await;
        let proxy = Proxy::start(server.addr).await;
        let after = Duration::from_millis(300);
        let client = NfsClient::new(
            target(proxy.addr),
            ClientConfig {
                call_timeout: after,
                ..ClientConfig::default()
            },
        );
        client.stat(&["d"]).await.expect("stat").expect("d");
        // MOUNT + NFS connection.
        assert_eq!(proxy.accepted(), 2);

        proxy.set(Mode::BlackHole);
        let c = client.clone();
        let (res, took) =
            must_finish(Duration::from_secs(3), async move { c.stat(&["d"]).await }).await;
        match res {
            Err(e @ NfsError::Timeout { .. }) => {
                assert!(
                    matches!(e, NfsError::Timeout { op: "LOOKUP", after: a } if a == after),
                    "{e:?}"
                );
                assert!(e.is_transient());
            }
            other => panic!("{other:?}"),
        }
        assert!(
            took >= after && took < after + Duration::from_secs(1),
            "took {took:?}"
        );
        assert_eq!(client.idle_connections(), 0);

        proxy.set(Mode::Pass);
        client
            .stat(&["d"])
            .await
            .expect("stat after timeout")
            .expect("d");
        // The silent connection was not reused: a new one was opened.
        assert_eq!(proxy.accepted(), 4);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn silent_server_times_out_on_connect() {
        let server = memfs(|_| {}).await;
        let proxy = Proxy::start(server.addr).await;
        proxy.set(Mode::BlackHole);
        let after = Duration::from_millis(300);
        let client = NfsClient::new(
            target(proxy.addr),
            ClientConfig {
                connect_timeout: after,
                ..ClientConfig::default()
            },
        );
        let c = client.clone();
        let (res, took) = must_finish(Duration::from_secs(3), async move {
            c.stat(&[]).await.map(drop)
        })
        .await;
        match res {
            Err(e @ NfsError::Connect { .. }) => {
                assert!(e.to_string().contains("no answer"), "{e}")
            }
            other => panic!("{other:?}"),
        }
        assert!(
            took >= after && took < after + Duration::from_secs(1),
            "took {took:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cancelled_call_does_not_return_its_connection() {
        let server = memfs(|c| c.add_dir("/rw/d")).await;
        let proxy = Proxy::start(server.addr).await;
        let client = NfsClient::new(target(proxy.addr), ClientConfig::default());
        client.stat(&["d"]).await.expect("stat");
        proxy.set(Mode::BlackHole);
        let cancelled = tokio::time::timeout(Duration::from_millis(100), client.stat(&["d"])).await;
        assert!(
            cancelled.is_err(),
            "the call should still have been waiting"
        );
        assert_eq!(client.idle_connections(), 0);
        proxy.set(Mode::Pass);
        client.stat(&["d"]).await.expect("stat").expect("d");
        assert_eq!(proxy.accepted(), 4);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pool_bounds_connections() {
        let server = memfs(|c| c.add_dir("/rw/p")).await;
        let proxy = Proxy::start(server.addr).await;
        let client = NfsClient::new(
            target(proxy.addr),
            ClientConfig {
                max_connections: 2,
                ..ClientConfig::default()
            },
        );
        let tasks: Vec<_> = (0..32)
            .map(|i| {
                let c = client.clone();
                tokio::spawn(async move {
                    let name = format!("v{i}");
                    c.create_dir_all(&["p", &name], 0o755, None).await
                })
            })
            .collect();
        for t in tasks {
            assert!(t.await.expect("join").expect("mkdir").created());
        }
        assert_eq!(names(&client, &["p"]).await.len(), 32);
        let nfs_connections = proxy.accepted() / 2;
        assert!(
            (1..=2).contains(&nfs_connections),
            "{nfs_connections} connections"
        );
        assert!(client.idle_connections() <= 2);
    }

    #[tokio::test]
    async fn privileged_port_is_used_when_asked() {
        let server = memfs(|_| {}).await;
        let proxy = Proxy::start(server.addr).await;
        let client = NfsClient::new(
            target(proxy.addr),
            ClientConfig {
                privileged_port: true,
                ..ClientConfig::default()
            },
        );
        let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
        let euid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            .expect("effective uid");
        match client.stat(&[]).await.map(drop) {
            Ok(()) => {
                assert_eq!(euid, "0", "a non-root process got a privileged port?");
                let peers = proxy.peers.lock().expect("peers").clone();
                assert_eq!(peers.len(), 2);
                assert!(peers.iter().all(|p| p.port() < 1024), "{peers:?}");
            }
            Err(e @ NfsError::Connect { .. }) if euid != "0" => {
                assert!(e.to_string().contains("CAP_NET_BIND_SERVICE"), "{e}");
            }
            Err(e) => panic!("{e}"),
        }
    }

    #[tokio::test]
    async fn idle_check_sees_a_closed_peer() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let stream = Arc::new(
            TcpStream::connect(listener.local_addr().expect("addr"))
                .await
                .expect("connect"),
        );
        let (peer, _) = listener.accept().await.expect("accept");
        let mut transport = Transport {
            stream: Arc::clone(&stream),
        };
        let alive = |s: &Arc<TcpStream>| {
            let mut b = [0u8; 1];
            matches!(s.try_read(&mut b), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
        };
        assert!(alive(&stream));
        drop(peer);
        stream.readable().await.expect("readable");
        assert!(!alive(&stream));
        // And a read on it is an error, not an endless stream of zero-length reads.
        let mut buf = [0u8; 4];
        let err = transport
            .async_read(&mut buf)
            .await
            .expect_err("EOF must be an error");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    /// Against a real nfs-ganesha, under `tests/support/with-ganesha` (as `tests/run`
    /// runs everything); skipped with a message elsewhere.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ganesha() {
        use std::os::unix::fs::{MetadataExt, symlink};

        if std::env::var_os("STOWAGE_TEST_NFS_SERVER").is_none() {
            assert!(
                std::env::var("STOWAGE_REQUIRE_GANESHA").as_deref() != Ok("1"),
                "STOWAGE_REQUIRE_GANESHA=1 but not under tests/support/with-ganesha"
            );
            eprintln!("SKIPPED client::tests::ganesha: needs tests/support/with-ganesha");
            return;
        }
        let env = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} is not set"));
        let server: IpAddr = env("STOWAGE_TEST_NFS_SERVER").parse().expect("server ip");
        let share_dir = std::path::PathBuf::from(env("STOWAGE_TEST_NFS_SHARE_DIR"));
        let config = ClientConfig {
            privileged_port: true,
            call_timeout: Duration::from_secs(2),
            ..ClientConfig::default()
        };
        let client = NfsClient::new(
            NfsTarget {
                server,
                share: env("STOWAGE_TEST_NFS_SHARE"),
                port: None,
            },
            config.clone(),
        );
        client.stat(&[]).await.expect("probe");
        let top = format!("client-test-{}", std::process::id());
        let top = top.as_str();
        client.remove_all(&[top]).await.expect("clean");

        // Mode and owner are applied exactly.
        let made = client
            .create_dir_all(&[top], 0o2750, Some((1234, 5678)))
            .await
            .expect("mkdir");
        println!("ganesha mkdir 0o2750 owner 1234:5678 -> {made:?}");
        let a = *made.attr();
        assert!(made.created());
        assert_eq!((a.mode & 0o7777, a.uid, a.gid), (0o2750, 1234, 5678));
        let meta = std::fs::metadata(share_dir.join(top)).expect("local metadata");
        assert_eq!(
            (meta.mode() & 0o7777, meta.uid(), meta.gid()),
            (0o2750, 1234, 5678)
        );
        assert_eq!(
            client
                .create_dir_all(&[top], 0o700, None)
                .await
                .expect("again"),
            Mkdir::Existed(a)
        );

        // Raw MKDIR of an existing name: does ganesha answer EXIST?
        {
            let mut conn = client.lease().await.expect("lease");
            let root = conn.root.clone();
            let res = conn
                .nfs
                .mkdir(&MKDIR3args {
                    where_: dirop(&root, top.as_bytes()),
                    attributes: sattr3::default(),
                })
                .await
                .expect("raw mkdir");
            println!(
                "ganesha raw MKDIR of an existing dir -> {:?}",
                status_of(&res)
            );
            assert_eq!(status_of(&res), nfsstat3::NFS3ERR_EXIST);
        }

        // Concurrent mkdir of one name: exactly one creates it.
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let c = client.clone();
                let p = top.to_owned();
                tokio::spawn(async move { c.create_dir_all(&[&p, "race"], 0o755, None).await })
            })
            .collect();
        let mut created = 0;
        for t in tasks {
            created += usize::from(t.await.expect("join").expect("mkdir").created());
        }
        assert_eq!(created, 1);

        // Nested, then a tree with files, a symlink and more than one page.
        let made = client
            .create_dir_all(&[top, "a", "b", "c"], 0o700, None)
            .await
            .expect("create_dir_all");
        assert_eq!(made.attr().mode & 0o7777, 0o700);
        let big = share_dir.join(top).join("a").join("big");
        std::fs::create_dir(&big).expect("mkdir big");
        for i in 0..2000 {
            std::fs::write(big.join(format!("file-with-a-long-name-{i:05}")), b"x").expect("write");
        }
        symlink("/etc/passwd", share_dir.join(top).join("a").join("link")).expect("symlink");
        std::fs::write(
            share_dir.join(top).join("a").join("b").join("c").join("f"),
            b"x",
        )
        .expect("write");
        let link = client
            .stat(&[top, "a", "link"])
            .await
            .expect("stat")
            .expect("link");
        assert_eq!(link.kind, FileKind::Symlink);

        // Hostile names never reach the server.
        for bad in ["..", "../escape", "a/../../x"] {
            assert!(matches!(
                client.create_dir_all(&[top, bad], 0o755, None).await,
                Err(NfsError::InvalidName { .. })
            ));
        }

        // Rename never replaces.
        client
            .create_dir_all(&[top, "dst"], 0o755, None)
            .await
            .expect("mkdir dst");
        assert!(matches!(
            client.rename(&[top, "a"], &[top, "dst"]).await,
            Err(NfsError::AlreadyExists { .. })
        ));
        client
            .rename(&[top, "a"], &[top, "dst", "a"])
            .await
            .expect("rename");

        // Single-call directory ops and atomic files.
        match client.create_dir(&[top], 0o755, None).await {
            Err(NfsError::AlreadyExists { path }) => assert_eq!(path, top),
            other => panic!("create_dir of an existing dir: {other:?}"),
        }
        client
            .create_dir(&[top, "single"], 0o1777, None)
            .await
            .expect("create_dir");
        assert_eq!(
            std::fs::metadata(share_dir.join(top).join("single"))
                .expect("meta")
                .mode()
                & 0o7777,
            0o1777
        );
        client
            .remove_dir(&[top, "single"])
            .await
            .expect("remove_dir");
        // A record: one SYMLINK, read back with READLINK; a second is EXIST.
        client
            .symlink(&[top, "rec"], r#"{"capacity_bytes":1}"#)
            .await
            .expect("symlink");
        assert!(matches!(
            client.symlink(&[top, "rec"], "other").await,
            Err(NfsError::AlreadyExists { .. })
        ));
        assert_eq!(
            client
                .readlink(&[top, "rec"])
                .await
                .expect("readlink")
                .as_deref(),
            Some(r#"{"capacity_bytes":1}"#)
        );
        let listed = client
            .read_dir(&[top])
            .await
            .expect("read_dir")
            .expect("exists");
        assert_eq!(listed, ["dst", "race", "rec"]);

        let st = client.fsstat().await.expect("fsstat");
        println!("ganesha fsstat -> {st:?}");
        assert!(st.total_bytes > 0 && st.avail_bytes <= st.total_bytes);

        let t0 = Instant::now();
        assert!(client.remove_all(&[top]).await.expect("remove_all"));
        println!(
            "ganesha remove_all of ~2010 entries took {:?}",
            t0.elapsed()
        );
        assert!(!share_dir.join(top).exists());
        assert!(
            std::fs::metadata("/etc/passwd").is_ok(),
            "symlink target survived"
        );

        // Root squash: root becomes nobody and may not write in a root-owned 0755 dir.
        let squash = NfsClient::new(
            NfsTarget {
                server,
                share: env("STOWAGE_TEST_NFS_SQUASH_SHARE"),
                port: None,
            },
            config.clone(),
        );
        match squash.create_dir_all(&["x"], 0o755, None).await {
            Err(e @ NfsError::PermissionDenied { .. }) => println!("ganesha squash mkdir -> {e}"),
            other => panic!("{other:?}"),
        }

        // Restart: calls fail fast while it is down, then reconnect.
        client.stat(&[]).await.expect("stat");
        let run = |var: &str| {
            let status = std::process::Command::new(env(var))
                .status()
                .expect("run script");
            assert!(status.success(), "{var}");
        };
        run("STOWAGE_TEST_GANESHA_STOP");
        let c = client.clone();
        let (res, took) =
            must_finish(Duration::from_secs(5), async move { c.stat(&[]).await }).await;
        println!("ganesha down: stat -> {res:?} in {took:?}");
        assert!(res.expect_err("server is down").is_transient());
        run("STOWAGE_TEST_GANESHA_START");
        client
            .stat(&[])
            .await
            .expect("stat after restart")
            .expect("root");
        println!("ganesha back: stat ok");
    }
}
