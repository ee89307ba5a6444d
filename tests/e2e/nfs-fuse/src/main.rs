//! `mount.nfs-fuse`: a TEST-ONLY stand-in for `/sbin/mount.nfs`. It is never part of
//! the product image (the Dockerfile neither builds nor copies it); only the e2e test
//! image installs it, as `/sbin/mount.nfs`. (Cargo names the binary `mount-nfs-fuse`:
//! a binary name can't contain a `.`.)
//!
//! Why: the e2e test node (a real kubelet on a development machine) has no kernel NFS
//! client, so the node plugin's `mount -t nfs server:/share /target` fails there. This
//! program speaks NFSv3 in user space with `nfs3_client`, the crate stowage itself uses,
//! and serves the export at the target through FUSE, so the e2e tests can publish NFS
//! volumes to real pods.
//!
//! Called the way mount(8) calls helpers: `mount.nfs SPEC DIR [-sfnvrw] [-o OPTIONS]`,
//! SPEC being `host:/export[/sub/dir]` (`[v6addr]:/...` for IPv6). Of the options, `ro`
//! and `rw`, `port=` (NFS) and `mountport=` (MOUNT) are honoured, and the portmapper on
//! port 111 is asked for whichever port is missing; `nfsvers=3`, `hard`, `proto=tcp`,
//! `nolock`, `timeo=` and the rest are accepted and ignored (NFS versions other than 3
//! are refused). If the server won't MOUNT the whole path, shorter prefixes are mounted
//! and the rest is walked with LOOKUP.
//!
//! The foreground process exits 0 only once the FUSE mount is in place, or 32 with a
//! message on stderr when the export can't be reached or mounted. A daemon (its own
//! session, cwd `/`, stdio detached so callers reading our output see EOF) serves the
//! mount until `umount DIR`, then exits. Its later errors go to `$MOUNT_NFS_FUSE_LOG`
//! (default `/tmp/mount.nfs-fuse.log`; nowhere if that can't be opened).
//!
//! Simple rather than fast: one NFS connection (re-opened after a transport error, the
//! call retried once), one FUSE thread, FILE_SYNC writes, 1 s attribute and entry
//! caching. Soft, not hard: a call fails with EIO when the server is gone (after at
//! most 60 s without a reply) instead of waiting for it to come back. Every call uses `AUTH_UNIX` root; the kernel checks permissions from the
//! file modes (`default_permissions`), and new files, directories and symlinks get the
//! caller's uid and gid (the directory's gid under a setgid directory) explicitly.
//! Inode numbers are handed out per NFS file handle and never forgotten.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{BsdFileFlags, FopenFlags};
use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, Generation, INodeNo, LockOwner, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyStatfs, ReplyWrite, Request,
    Session, SessionACL, TimeOrNow, WriteFlags,
};
use nfs3_client::io::{AsyncRead, AsyncWrite};
use nfs3_client::net::Connector;
use nfs3_client::{ConnectError, MountError, Nfs3Client, Nfs3ConnectionBuilder, RpcError};
use nfs3_types::nfs3::{
    CREATE3args, FSINFO3args, FSSTAT3args, GETATTR3args, LINK3args, LOOKUP3args, MKDIR3args, Nfs3Option, Nfs3Result,
    READ3args, READDIRPLUS3args, READLINK3args, REMOVE3args, RENAME3args, RMDIR3args, SETATTR3args, SYMLINK3args,
    WRITE3args, cookieverf3, createhow3, diropargs3, fattr3, ftype3, nfs_fh3, nfsstat3, nfstime3, post_op_attr,
    post_op_fh3, sattr3, set_atime, set_mtime, stable_how, symlinkdata3,
};
use nfs3_types::rpc::{auth_unix, opaque_auth};
use nfs3_types::xdr_codec::Opaque;
use nix::mount::MsFlags;
use nix::unistd::ForkResult;
use tokio::net::{TcpSocket, TcpStream};

const USAGE: &str = "usage: mount.nfs SPEC DIR [-sfnvrw] [-o OPTIONS]  (SPEC: host:/export[/sub])";
/// How long the kernel may cache attributes and directory entries.
const TTL: Duration = Duration::from_secs(1);
/// Upper bound for connecting: portmap, MOUNT, NFS connection, path walk.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound for one NFS call; the connection is dropped after it.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest READ/WRITE sent, whatever FSINFO allows.
const MAX_IO: u32 = 1 << 20;
const S_IFMT: u32 = 0o170_000;
const S_IFREG: u32 = 0o100_000;
/// Exit status of mount.nfs for a failed mount (`1` is bad usage).
const MOUNT_FAILED: u8 = 32;

macro_rules! log {
    ($($t:tt)*) => { eprintln!("mount.nfs-fuse[{}]: {}", std::process::id(), format_args!($($t)*)) };
}

// ---------------------------------------------------------------------------
// Command line

#[derive(Debug, Clone, PartialEq, Eq)]
struct Args {
    spec: String,
    host: String,
    path: String,
    dir: PathBuf,
    fake: bool,
    verbose: bool,
    ro: bool,
    port: Option<u16>,
    mountport: Option<u16>,
}

fn parse_args(argv: &[String]) -> Result<Args, String> {
    let (mut positional, mut options) = (Vec::new(), Vec::new());
    let (mut fake, mut verbose, mut ro) = (false, false, false);
    let mut it = argv.iter();
    while let Some(arg) = it.next() {
        if arg == "-o" {
            options.push(it.next().ok_or("-o needs a value")?.clone());
        } else if let Some(o) = arg.strip_prefix("-o") {
            options.push(o.to_owned());
        } else if arg == "-t" || arg == "-N" {
            it.next(); // file system type / namespace, as some mount(8) versions pass them
        } else if let Some(flags) = arg.strip_prefix('-').filter(|f| !f.is_empty()) {
            for flag in flags.chars() {
                match flag {
                    'f' => fake = true,
                    'v' => verbose = true,
                    'r' => ro = true,
                    'w' => ro = false,
                    's' | 'n' => {}
                    _ => return Err(format!("unknown flag -{flag}")),
                }
            }
        } else {
            positional.push(arg.clone());
        }
    }
    let [spec, dir] = <[String; 2]>::try_from(positional).map_err(|_| "expected SPEC and DIR")?;
    let (mut port, mut mountport) = (None, None);
    for option in options.iter().flat_map(|o| o.split(',')) {
        let (key, value) = option.split_once('=').unwrap_or((option, ""));
        match key {
            "ro" => ro = true,
            "rw" => ro = false,
            "port" => port = parse_port(value)?,
            "mountport" => mountport = parse_port(value)?,
            "vers" | "nfsvers" if value != "3" => {
                return Err(format!("only NFSv3 is supported, not `{option}`"));
            }
            "v2" | "v4" => return Err(format!("only NFSv3 is supported, not `{option}`")),
            _ => {} // hard, proto=tcp, nolock, timeo=, retrans=, … : accepted, ignored
        }
    }
    let (host, path) = parse_spec(&spec)?;
    Ok(Args { spec, host, path, dir: PathBuf::from(dir), fake, verbose, ro, port, mountport })
}

/// `port=0` means "ask the portmapper", as for mount.nfs.
fn parse_port(value: &str) -> Result<Option<u16>, String> {
    let port: u16 = value.parse().map_err(|_| format!("bad port `{value}`"))?;
    Ok((port != 0).then_some(port))
}

/// `host:/path` or `[v6addr]:/path` into host and path.
fn parse_spec(spec: &str) -> Result<(String, String), String> {
    let split = match spec.strip_prefix('[') {
        Some(rest) => rest.split_once("]:"),
        None => spec.split_once(':'),
    };
    match split {
        Some((host, path)) if !host.is_empty() && path.starts_with('/') => Ok((host.to_owned(), path.to_owned())),
        _ => Err(format!("`{spec}` is not host:/path")),
    }
}

fn resolve(host: &str) -> Result<IpAddr, String> {
    if let Ok(ip) = host.parse() {
        return Ok(ip);
    }
    let addrs: Vec<SocketAddr> =
        (host, 0).to_socket_addrs().map_err(|e| format!("cannot resolve `{host}`: {e}"))?.collect();
    let addr = addrs.iter().find(|a| a.is_ipv4()).or(addrs.first());
    addr.map(SocketAddr::ip).ok_or_else(|| format!("`{host}` has no address"))
}

// ---------------------------------------------------------------------------
// NFS transport and connection

/// TCP for `nfs3_client` that reports end-of-stream as an error (on its own the crate
/// retries zero-length reads forever once the server is gone).
struct Io(TcpStream);

impl AsyncRead for Io {
    async fn async_read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = tokio::io::AsyncReadExt::read(&mut self.0, buf).await?;
        if n == 0 && !buf.is_empty() {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the NFS server closed the connection"));
        }
        Ok(n)
    }
}

impl AsyncWrite for Io {
    async fn async_write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match tokio::io::AsyncWriteExt::write(&mut self.0, buf).await? {
            0 if !buf.is_empty() => Err(io::ErrorKind::WriteZero.into()),
            n => Ok(n),
        }
    }
}

struct Tcp;

impl Connector for Tcp {
    type Connection = Io;

    async fn connect(&self, addr: SocketAddr) -> io::Result<Io> {
        Ok(Io(TcpStream::connect(addr).await?))
    }

    async fn connect_with_port(&self, addr: SocketAddr, local_port: u16) -> io::Result<Io> {
        let (socket, any) = match addr {
            SocketAddr::V4(_) => (TcpSocket::new_v4()?, IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            SocketAddr::V6(_) => (TcpSocket::new_v6()?, IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
        };
        socket.set_reuseaddr(true)?;
        socket.bind(SocketAddr::new(any, local_port))?;
        match socket.connect(addr).await {
            Ok(stream) => Ok(Io(stream)),
            // Same 4-tuple still in TIME_WAIT: make the builder try the next port.
            Err(e) if e.kind() == io::ErrorKind::AddrNotAvailable => Err(io::Error::new(io::ErrorKind::AddrInUse, e)),
            Err(e) => Err(e),
        }
    }
}

type Client = Nfs3Client<Io>;

#[derive(Debug, Clone)]
struct Target {
    ip: IpAddr,
    path: String,
    port: Option<u16>,
    mountport: Option<u16>,
}

fn credential() -> opaque_auth<'static> {
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as u32);
    opaque_auth::auth_unix(&auth_unix {
        stamp,
        machinename: Opaque::borrowed(b"mount-nfs-fuse"),
        uid: 0,
        gid: 0,
        gids: vec![],
    })
}

/// MOUNT `target.path` and return the client and the directory's handle. A server that
/// refuses the whole path gets shorter prefixes, the rest walked with LOOKUP.
async fn connect(t: &Target) -> Result<(Client, nfs_fh3), String> {
    let names: Vec<&str> = t.path.split('/').filter(|c| !c.is_empty()).collect();
    let mut refused = None;
    for keep in (0..=names.len()).rev() {
        let export = format!("/{}", names[..keep].join("/"));
        let mut builder = Nfs3ConnectionBuilder::new(Tcp, t.ip.to_string(), &export)
            .connect_from_privileged_port(nix::unistd::geteuid().is_root())
            .credential(credential());
        if let Some(port) = t.port {
            builder = builder.nfs3_port(port);
        }
        if let Some(port) = t.mountport {
            builder = builder.mount_port(port);
        }
        let mounted = match builder.mount().await {
            Ok(mounted) => mounted,
            Err(ConnectError::Mount(MountError::Denied(stat))) => {
                refused.get_or_insert(format!("the server refused to MOUNT `{export}`: {stat}"));
                continue;
            }
            Err(ConnectError::Portmap(e)) => {
                return Err(format!("portmapper on {}:111: {e} (or give port= and mountport=)", t.ip));
            }
            Err(e) => return Err(format!("cannot MOUNT `{export}` from {}: {e}", t.ip)),
        };
        let mut fh = mounted.root_nfs_fh3();
        let mut client = mounted.into_nfs3_client();
        for name in &names[keep..] {
            let args = LOOKUP3args { what: dirop(&fh, name.as_bytes()) };
            match client.lookup(&args).await.map_err(|e| e.to_string())? {
                Nfs3Result::Ok(ok) => fh = ok.object,
                Nfs3Result::Err((stat, _)) => {
                    return Err(format!("`{name}` below `{export}`: {stat}"));
                }
            }
        }
        let attrs = client.getattr(&GETATTR3args { object: fh.clone() }).await;
        return match attrs.map_err(|e| e.to_string())? {
            Nfs3Result::Ok(ok) if ok.obj_attributes.type_ == ftype3::NF3DIR => Ok((client, fh)),
            Nfs3Result::Ok(_) => Err(format!("`{}` is not a directory", t.path)),
            Nfs3Result::Err((stat, _)) => Err(format!("GETATTR `{}`: {stat}", t.path)),
        };
    }
    Err(refused.unwrap_or_else(|| "nothing to mount".to_owned()))
}

fn dirop<'a>(dir: &nfs_fh3, name: &'a [u8]) -> diropargs3<'a> {
    diropargs3 { dir: dir.clone(), name: name.into() }
}

fn errno(stat: nfsstat3) -> Errno {
    use nfs3_types::nfs3::nfsstat3::*;
    use nix::libc;
    Errno::from_i32(match stat {
        // The NFSv3 numbers of these are Linux's errno numbers.
        NFS3ERR_PERM | NFS3ERR_NOENT | NFS3ERR_IO | NFS3ERR_NXIO | NFS3ERR_ACCES | NFS3ERR_EXIST | NFS3ERR_XDEV
        | NFS3ERR_NODEV | NFS3ERR_NOTDIR | NFS3ERR_ISDIR | NFS3ERR_INVAL | NFS3ERR_FBIG | NFS3ERR_NOSPC
        | NFS3ERR_ROFS | NFS3ERR_MLINK => stat as i32,
        NFS3ERR_NAMETOOLONG => libc::ENAMETOOLONG,
        NFS3ERR_NOTEMPTY => libc::ENOTEMPTY,
        NFS3ERR_DQUOT => libc::EDQUOT,
        NFS3ERR_STALE | NFS3ERR_BADHANDLE => libc::ESTALE,
        NFS3ERR_REMOTE => libc::EREMOTE,
        NFS3ERR_NOTSUPP => libc::EOPNOTSUPP,
        NFS3ERR_JUKEBOX => libc::EAGAIN,
        _ => libc::EIO,
    })
}

fn nfs_result<T, E>(res: Nfs3Result<T, E>) -> Result<T, Errno> {
    match res {
        Nfs3Result::Ok(ok) => Ok(ok),
        Nfs3Result::Err((stat, _)) => Err(errno(stat)),
    }
}

/// One NFS call on the shared connection: connect when there is none, drop the
/// connection after a transport error or timeout (retrying once after a transport
/// error), and turn `NFS3ERR_*` into an errno.
macro_rules! rpc {
    ($fs:expr, $method:ident, $args:expr) => {{
        let fs: &Fs = $fs;
        let args = $args;
        fs.rt.block_on(async {
            let mut conn = fs.conn.lock().await;
            let mut retried = false;
            loop {
                if conn.is_none() {
                    match fs.reconnect().await {
                        Ok(client) => *conn = Some(client),
                        Err(e) => break Err(e),
                    }
                }
                let Some(client) = conn.as_mut() else { unreachable!("connected above") };
                let op = stringify!($method);
                match tokio::time::timeout(CALL_TIMEOUT, client.$method(&args)).await {
                    Ok(Ok(reply)) => break nfs_result(reply),
                    Ok(Err(e)) => {
                        let reusable = e.is_connection_reusable();
                        log!("{op}: {e}");
                        if !reusable {
                            *conn = None; // and retry once on a new one
                        }
                        if matches!(e, RpcError::ProcUnavail) {
                            break Err(Errno::EOPNOTSUPP); // e.g. no LINK on stowage's server
                        } else if reusable || std::mem::replace(&mut retried, true) {
                            break Err(Errno::EIO);
                        }
                    }
                    Err(_) => {
                        log!("{op}: no reply within {CALL_TIMEOUT:?}; dropping the connection");
                        *conn = None;
                        break Err(Errno::EIO);
                    }
                }
            }
        })
    }};
}

// ---------------------------------------------------------------------------
// The file system

/// Inode numbers by NFS file handle and back. Inode 1 is the mounted directory.
struct Inodes {
    by_fh: HashMap<Vec<u8>, u64>,
    fhs: HashMap<u64, nfs_fh3>,
    last: u64,
}

struct Fs {
    rt: tokio::runtime::Runtime,
    target: Target,
    conn: tokio::sync::Mutex<Option<Client>>,
    inodes: Mutex<Inodes>,
    /// READDIRPLUS cookie verifiers by directory inode.
    verfs: Mutex<HashMap<u64, cookieverf3>>,
    io_size: u32,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn opt<T: nfs3_types::xdr_codec::Pack + nfs3_types::xdr_codec::Unpack>(value: Option<T>) -> Nfs3Option<T> {
    value.map_or(Nfs3Option::None, Nfs3Option::Some)
}

fn nfs_time(t: SystemTime) -> nfstime3 {
    nfstime3::try_from(t).unwrap_or_default()
}

fn file_attr(ino: u64, a: &fattr3) -> FileAttr {
    let kind = match a.type_ {
        ftype3::NF3REG => FileType::RegularFile,
        ftype3::NF3DIR => FileType::Directory,
        ftype3::NF3BLK => FileType::BlockDevice,
        ftype3::NF3CHR => FileType::CharDevice,
        ftype3::NF3LNK => FileType::Symlink,
        ftype3::NF3SOCK => FileType::Socket,
        ftype3::NF3FIFO => FileType::NamedPipe,
    };
    let rdev = nix::sys::stat::makedev(a.rdev.specdata1.into(), a.rdev.specdata2.into());
    FileAttr {
        ino: INodeNo(ino),
        size: a.size,
        blocks: a.used.div_ceil(512),
        atime: a.atime.into(),
        mtime: a.mtime.into(),
        ctime: a.ctime.into(),
        crtime: a.ctime.into(),
        kind,
        perm: (a.mode & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: rdev as u32,
        blksize: 4096,
        flags: 0,
    }
}

impl Fs {
    fn new(rt: tokio::runtime::Runtime, target: Target, client: Client, root: nfs_fh3) -> Self {
        let mut client = client;
        let io_size = rt.block_on(io_size(&mut client, &root));
        let inodes =
            Inodes { by_fh: HashMap::from([(root.data.to_vec(), 1)]), fhs: HashMap::from([(1, root)]), last: 1 };
        Self {
            rt,
            target,
            conn: tokio::sync::Mutex::new(Some(client)),
            inodes: Mutex::new(inodes),
            verfs: Mutex::default(),
            io_size,
        }
    }

    async fn reconnect(&self) -> Result<Client, Errno> {
        match tokio::time::timeout(CONNECT_TIMEOUT, connect(&self.target)).await {
            Ok(Ok((client, root))) => {
                let mut t = lock(&self.inodes);
                if let Some(old) = t.fhs.insert(1, root.clone()) {
                    t.by_fh.remove(&old.data.to_vec());
                }
                t.by_fh.insert(root.data.to_vec(), 1);
                log!("reconnected to {}", self.target.ip);
                Ok(client)
            }
            Ok(Err(e)) => {
                log!("reconnecting: {e}");
                Err(Errno::EIO)
            }
            Err(_) => {
                log!("reconnecting: no answer within {CONNECT_TIMEOUT:?}");
                Err(Errno::EIO)
            }
        }
    }

    fn ino(&self, fh: &nfs_fh3) -> u64 {
        let mut t = lock(&self.inodes);
        if let Some(&ino) = t.by_fh.get(&fh.data.to_vec()) {
            return ino;
        }
        t.last += 1;
        let ino = t.last;
        t.by_fh.insert(fh.data.to_vec(), ino);
        t.fhs.insert(ino, fh.clone());
        ino
    }

    fn fh(&self, ino: INodeNo) -> Result<nfs_fh3, Errno> {
        lock(&self.inodes).fhs.get(&ino.0).cloned().ok_or(Errno::ESTALE)
    }

    fn getattr_fh(&self, fh: &nfs_fh3) -> Result<fattr3, Errno> {
        let ok = rpc!(self, getattr, GETATTR3args { object: fh.clone() })?;
        Ok(ok.obj_attributes)
    }

    fn attrs_or_getattr(&self, fh: &nfs_fh3, attrs: post_op_attr) -> Result<fattr3, Errno> {
        match attrs {
            Nfs3Option::Some(a) => Ok(a),
            Nfs3Option::None => self.getattr_fh(fh),
        }
    }

    fn attr_of(&self, fh: &nfs_fh3, attrs: post_op_attr) -> Result<FileAttr, Errno> {
        let a = self.attrs_or_getattr(fh, attrs)?;
        Ok(file_attr(self.ino(fh), &a))
    }

    fn lookup_fh(&self, dir: &nfs_fh3, name: &[u8]) -> Result<(nfs_fh3, post_op_attr), Errno> {
        let ok = rpc!(self, lookup, LOOKUP3args { what: dirop(dir, name) })?;
        Ok((ok.object, ok.obj_attributes))
    }

    /// Attributes for a new object of `req` in `dir`: `mode`, the caller's uid, and the
    /// caller's gid or, under a setgid directory, the directory's (subdirectories then
    /// inherit the setgid bit), as a local Linux file system does.
    fn new_sattr(&self, req: &Request, dir: &nfs_fh3, mode: Option<u32>, is_dir: bool) -> Result<sattr3, Errno> {
        let parent = self.getattr_fh(dir)?;
        let setgid = parent.mode & 0o2000 != 0;
        Ok(sattr3 {
            mode: opt(mode.map(|m| if setgid && is_dir { m | 0o2000 } else { m })),
            uid: Nfs3Option::Some(req.uid()),
            gid: Nfs3Option::Some(if setgid { parent.gid } else { req.gid() }),
            ..sattr3::default()
        })
    }

    /// The entry of an object just created in `dir`, with the mode and owner in `want`
    /// made exact by one SETATTR when the server did not apply them.
    fn finish(
        &self, dir: &nfs_fh3, name: &OsStr, obj: post_op_fh3, attrs: post_op_attr, want: &sattr3,
    ) -> Result<FileAttr, Errno> {
        let (fh, attrs) = match obj {
            Nfs3Option::Some(fh) => (fh, attrs),
            Nfs3Option::None => self.lookup_fh(dir, name.as_bytes())?,
        };
        let mut a = self.attrs_or_getattr(&fh, attrs)?;
        let differs = |want: Nfs3Option<u32>, have: u32| match want {
            Nfs3Option::Some(w) if w != have => want,
            _ => Nfs3Option::None,
        };
        let fix = sattr3 {
            mode: differs(want.mode, a.mode & 0o7777),
            uid: differs(want.uid, a.uid),
            gid: differs(want.gid, a.gid),
            ..sattr3::default()
        };
        if fix.mode.is_some() || fix.uid.is_some() || fix.gid.is_some() {
            let args = SETATTR3args { object: fh.clone(), new_attributes: fix, guard: Nfs3Option::None };
            let ok = rpc!(self, setattr, args)?;
            a = self.attrs_or_getattr(&fh, ok.obj_wcc.after)?;
        }
        Ok(file_attr(self.ino(&fh), &a))
    }

    fn create_file(
        &self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, exclusive: bool,
    ) -> Result<FileAttr, Errno> {
        let dir = self.fh(parent)?;
        let want = self.new_sattr(req, &dir, Some(mode & 0o7777), false)?;
        let how = if exclusive { createhow3::GUARDED(want.clone()) } else { createhow3::UNCHECKED(want.clone()) };
        let args = CREATE3args { where_: dirop(&dir, name.as_bytes()), how };
        let ok = rpc!(self, create, args)?;
        self.finish(&dir, name, ok.obj, ok.obj_attributes, &want)
    }

    /// Fill `reply` from READDIRPLUS pages, starting after NFS cookie `offset` (the
    /// offset of each FUSE entry is its cookie).
    fn fill_dir(&self, ino: INodeNo, offset: u64, reply: &mut ReplyDirectory) -> Result<(), Errno> {
        let dir = self.fh(ino)?;
        let mut cookie = offset;
        loop {
            let cookieverf = match cookie {
                0 => cookieverf3::default(),
                _ => lock(&self.verfs).get(&ino.0).copied().unwrap_or_default(),
            };
            let args =
                READDIRPLUS3args { dir: dir.clone(), cookie, cookieverf, dircount: 16 * 1024, maxcount: 64 * 1024 };
            let ok = rpc!(self, readdirplus, args)?;
            lock(&self.verfs).insert(ino.0, ok.cookieverf);
            for entry in ok.reply.entries.0 {
                let name = entry.name.as_ref();
                let (child, attrs) = match (name, entry.name_handle) {
                    (b"." | b"..", _) => (ino.0, entry.name_attributes),
                    (_, Nfs3Option::Some(fh)) => (self.ino(&fh), entry.name_attributes),
                    (_, Nfs3Option::None) => match self.lookup_fh(&dir, name) {
                        Ok((fh, attrs)) => (self.ino(&fh), attrs),
                        Err(Errno::ENOENT) => continue, // removed meanwhile
                        Err(e) => return Err(e),
                    },
                };
                let kind = match attrs {
                    Nfs3Option::Some(a) => file_attr(child, &a).kind,
                    Nfs3Option::None if name == b"." || name == b".." => FileType::Directory,
                    Nfs3Option::None => FileType::RegularFile,
                };
                cookie = entry.cookie;
                if reply.add(INodeNo(child), cookie, kind, OsStr::from_bytes(name)) {
                    return Ok(());
                }
            }
            if ok.reply.eof {
                return Ok(());
            }
        }
    }
}

/// READ/WRITE size: FSINFO's maxima, at most [`MAX_IO`].
async fn io_size(client: &mut Client, root: &nfs_fh3) -> u32 {
    match client.fsinfo(&FSINFO3args { fsroot: root.clone() }).await {
        Ok(Nfs3Result::Ok(info)) => info.rtmax.min(info.wtmax).clamp(4096, MAX_IO),
        _ => 32 * 1024,
    }
}

fn reply_entry(reply: ReplyEntry, res: Result<FileAttr, Errno>) {
    match res {
        Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
        Err(e) => reply.error(e),
    }
}

fn reply_attr(reply: ReplyAttr, res: Result<FileAttr, Errno>) {
    match res {
        Ok(attr) => reply.attr(&TTL, &attr),
        Err(e) => reply.error(e),
    }
}

fn reply_empty(reply: ReplyEmpty, res: Result<(), Errno>) {
    match res {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

impl Filesystem for Fs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let res = self.fh(parent).and_then(|dir| {
            let (fh, attrs) = self.lookup_fh(&dir, name.as_bytes())?;
            self.attr_of(&fh, attrs)
        });
        reply_entry(reply, res);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let res = self.fh(ino).and_then(|fh| self.attr_of(&fh, Nfs3Option::None));
        reply_attr(reply, res);
    }

    fn setattr(
        &self, _req: &Request, ino: INodeNo, mode: Option<u32>, uid: Option<u32>, gid: Option<u32>, size: Option<u64>,
        atime: Option<TimeOrNow>, mtime: Option<TimeOrNow>, _ctime: Option<SystemTime>, _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>, _chgtime: Option<SystemTime>, _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>, reply: ReplyAttr,
    ) {
        let res = self.fh(ino).and_then(|fh| {
            let new_attributes = sattr3 {
                mode: opt(mode.map(|m| m & 0o7777)),
                uid: opt(uid),
                gid: opt(gid),
                size: opt(size),
                atime: match atime {
                    None => set_atime::DONT_CHANGE,
                    Some(TimeOrNow::Now) => set_atime::SET_TO_SERVER_TIME,
                    Some(TimeOrNow::SpecificTime(t)) => set_atime::SET_TO_CLIENT_TIME(nfs_time(t)),
                },
                mtime: match mtime {
                    None => set_mtime::DONT_CHANGE,
                    Some(TimeOrNow::Now) => set_mtime::SET_TO_SERVER_TIME,
                    Some(TimeOrNow::SpecificTime(t)) => set_mtime::SET_TO_CLIENT_TIME(nfs_time(t)),
                },
            };
            let args = SETATTR3args { object: fh.clone(), new_attributes, guard: Nfs3Option::None };
            let ok = rpc!(self, setattr, args)?;
            self.attr_of(&fh, ok.obj_wcc.after)
        });
        reply_attr(reply, res);
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let res = self.fh(ino).and_then(|symlink| rpc!(self, readlink, READLINK3args { symlink }));
        match res {
            Ok(ok) => reply.data(ok.data.as_ref()),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, _rdev: u32, reply: ReplyEntry,
    ) {
        if mode & S_IFMT != S_IFREG {
            return reply.error(Errno::EOPNOTSUPP); // only regular files
        }
        reply_entry(reply, self.create_file(req, parent, name, mode & !umask, true));
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let res = self.fh(parent).and_then(|dir| {
            let want = self.new_sattr(req, &dir, Some(mode & !umask & 0o7777), true)?;
            let args = MKDIR3args { where_: dirop(&dir, name.as_bytes()), attributes: want.clone() };
            let ok = rpc!(self, mkdir, args)?;
            self.finish(&dir, name, ok.obj, ok.obj_attributes, &want)
        });
        reply_entry(reply, res);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let res = self
            .fh(parent)
            .and_then(|dir| rpc!(self, remove, REMOVE3args { object: dirop(&dir, name.as_bytes()) }).map(drop));
        reply_empty(reply, res);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let res = self
            .fh(parent)
            .and_then(|dir| rpc!(self, rmdir, RMDIR3args { object: dirop(&dir, name.as_bytes()) }).map(drop));
        reply_empty(reply, res);
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let res = self.fh(parent).and_then(|dir| {
            let want = self.new_sattr(req, &dir, None, false)?;
            let args = SYMLINK3args {
                where_: dirop(&dir, link_name.as_bytes()),
                symlink: symlinkdata3 {
                    symlink_attributes: want.clone(),
                    symlink_data: target.as_os_str().as_bytes().into(),
                },
            };
            let ok = rpc!(self, symlink, args)?;
            self.finish(&dir, link_name, ok.obj, ok.obj_attributes, &want)
        });
        reply_entry(reply, res);
    }

    fn rename(
        &self, _req: &Request, parent: INodeNo, name: &OsStr, newparent: INodeNo, newname: &OsStr, flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let res = (|| {
            if flags.contains(RenameFlags::RENAME_EXCHANGE) {
                return Err(Errno::EINVAL);
            }
            let (from, to) = (self.fh(parent)?, self.fh(newparent)?);
            if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                // Not atomic: NFSv3 has no such rename.
                match self.lookup_fh(&to, newname.as_bytes()) {
                    Ok(_) => return Err(Errno::EEXIST),
                    Err(Errno::ENOENT) => {}
                    Err(e) => return Err(e),
                }
            }
            let args = RENAME3args { from: dirop(&from, name.as_bytes()), to: dirop(&to, newname.as_bytes()) };
            rpc!(self, rename, args).map(drop)
        })();
        reply_empty(reply, res);
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        let res = (|| {
            let (file, dir) = (self.fh(ino)?, self.fh(newparent)?);
            let args = LINK3args { file: file.clone(), link: dirop(&dir, newname.as_bytes()) };
            let ok = rpc!(self, link, args)?;
            self.attr_of(&file, ok.file_attributes)
        })();
        reply_entry(reply, res);
    }

    fn read(
        &self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, size: u32, _flags: OpenFlags,
        _lock_owner: Option<LockOwner>, reply: ReplyData,
    ) {
        let res = self.fh(ino).and_then(|file| {
            let mut data = Vec::with_capacity(size as usize);
            while data.len() < size as usize {
                let count = (size - data.len() as u32).min(self.io_size);
                let args = READ3args { file: file.clone(), offset: offset + data.len() as u64, count };
                let ok = rpc!(self, read, args)?;
                data.extend_from_slice(&ok.data);
                if ok.eof || ok.data.is_empty() {
                    break;
                }
            }
            Ok(data)
        });
        match res {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, data: &[u8], _write_flags: WriteFlags,
        _flags: OpenFlags, _lock_owner: Option<LockOwner>, reply: ReplyWrite,
    ) {
        let res = self.fh(ino).and_then(|file| {
            let mut done = 0;
            while done < data.len() {
                let chunk = &data[done..data.len().min(done + self.io_size as usize)];
                let args = WRITE3args {
                    file: file.clone(),
                    offset: offset + done as u64,
                    count: chunk.len() as u32,
                    stable: stable_how::FILE_SYNC,
                    data: Opaque::borrowed(chunk),
                };
                match rpc!(self, write, args)?.count {
                    0 => return Err(Errno::EIO),
                    n => done += n as usize,
                }
            }
            Ok(done as u32)
        });
        match res {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    // No flush, fsync or fsyncdir: writes are FILE_SYNC, so there is nothing to commit,
    // and the kernel takes their ENOSYS as success (and stops asking).

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        match self.fill_dir(ino, offset, &mut reply) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        const BLOCK: u64 = 4096;
        match self.fh(ino).and_then(|fsroot| rpc!(self, fsstat, FSSTAT3args { fsroot })) {
            Ok(s) => reply.statfs(
                s.tbytes / BLOCK,
                s.fbytes / BLOCK,
                s.abytes / BLOCK,
                s.tfiles,
                s.afiles,
                BLOCK as u32,
                255,
                BLOCK as u32,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, flags: i32, reply: ReplyCreate,
    ) {
        let exclusive = flags & nix::libc::O_EXCL != 0;
        match self.create_file(req, parent, name, mode & !umask, exclusive) {
            Ok(attr) => reply.created(&TTL, &attr, Generation(0), FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }
}

// ---------------------------------------------------------------------------
// Mounting and the daemon

/// mount(2) a FUSE file system of type `fuse.nfs` from `spec` on `dir`; the returned
/// `/dev/fuse` descriptor serves it. Done here rather than by `fuser`, whose session
/// would unmount `dir` again when it ends, even if something else is mounted there by
/// then.
fn fuse_mount(spec: &str, dir: &Path, ro: bool) -> Result<OwnedFd, String> {
    let root_mode = std::fs::metadata(dir).map_err(|e| format!("mount point {}: {e}", dir.display()))?.mode();
    let dev = File::options().read(true).write(true).open("/dev/fuse").map_err(|e| format!("/dev/fuse: {e}"))?;
    let data = format!(
        "fd={},rootmode={:o},user_id={},group_id={},allow_other,default_permissions",
        dev.as_raw_fd(),
        root_mode & S_IFMT,
        nix::unistd::geteuid(),
        nix::unistd::getegid(),
    );
    let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if ro {
        flags |= MsFlags::MS_RDONLY;
    }
    nix::mount::mount(Some(spec), dir, Some("fuse.nfs"), flags, Some(data.as_str()))
        .map_err(|e| format!("mount(2) of FUSE on {}: {e}", dir.display()))?;
    Ok(dev.into())
}

/// Connect, MOUNT and mount FUSE: in the daemon, before anything else has threads.
fn start(args: &Args) -> Result<Session<Fs>, String> {
    nix::unistd::setsid().map_err(|e| format!("setsid: {e}"))?;
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))?;
    let target =
        Target { ip: resolve(&args.host)?, path: args.path.clone(), port: args.port, mountport: args.mountport };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    let connected = rt.block_on(async { tokio::time::timeout(CONNECT_TIMEOUT, connect(&target)).await });
    let (client, root) =
        connected.map_err(|_| format!("no answer from {} within {CONNECT_TIMEOUT:?}", target.ip))??;
    if args.verbose {
        eprintln!("mount.nfs-fuse: MOUNT {} from {} ok", target.path, target.ip);
    }
    let fs = Fs::new(rt, target, client, root);
    let fd = fuse_mount(&args.spec, &args.dir, args.ro)?;
    let mut config = Config::default();
    config.n_threads = Some(1);
    Session::from_fd(fs, fd, SessionACL::All, config).map_err(|e| {
        let _ = nix::mount::umount2(&args.dir, nix::mount::MntFlags::MNT_DETACH);
        format!("FUSE handshake on {}: {e}", args.dir.display())
    })
}

/// Point stdin and stdout at /dev/null and stderr at the log: whoever ran mount(8) may
/// be reading our output until EOF.
fn detach_stdio() {
    let Ok(null) = File::options().read(true).write(true).open("/dev/null") else {
        return;
    };
    let log = std::env::var_os("MOUNT_NFS_FUSE_LOG").unwrap_or_else(|| "/tmp/mount.nfs-fuse.log".into());
    let err = File::options().append(true).create(true).open(log);
    let _ = nix::unistd::dup2_stdin(&null);
    let _ = nix::unistd::dup2_stdout(&null);
    let _ = nix::unistd::dup2_stderr(err.as_ref().unwrap_or(&null));
}

fn daemon(args: &Args, mut status: io::PipeWriter) -> ! {
    let session = match start(args) {
        Ok(session) => session,
        Err(e) => {
            let _ = status.write_all(e.as_bytes());
            std::process::exit(MOUNT_FAILED.into());
        }
    };
    detach_stdio();
    let _ = status.write_all(b"ok");
    drop(status);
    log!("serving {} on {}", args.spec, args.dir.display());
    match session.run() {
        Ok(()) => log!("{} unmounted; exiting", args.dir.display()),
        Err(e) => log!("FUSE session on {} ended: {e}", args.dir.display()),
    }
    std::process::exit(0)
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let args = match parse_args(&argv) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("mount.nfs-fuse: {e}\n{USAGE}");
            return ExitCode::from(1);
        }
    };
    if args.fake {
        return ExitCode::SUCCESS;
    }
    let (mut status, status_w) = match io::pipe() {
        Ok(pipe) => pipe,
        Err(e) => {
            eprintln!("mount.nfs-fuse: pipe: {e}");
            return ExitCode::from(MOUNT_FAILED);
        }
    };
    // SAFETY: no thread has been started yet (the runtime and the FUSE session are made
    // in the child), so the child is a complete copy of a single-threaded process.
    match unsafe { nix::unistd::fork() } {
        Err(e) => {
            eprintln!("mount.nfs-fuse: fork: {e}");
            ExitCode::from(MOUNT_FAILED)
        }
        Ok(ForkResult::Child) => {
            drop(status);
            daemon(&args, status_w)
        }
        Ok(ForkResult::Parent { child }) => {
            drop(status_w);
            let mut message = String::new();
            let _ = status.read_to_string(&mut message);
            if message == "ok" {
                if args.verbose {
                    eprintln!("mount.nfs-fuse: {} mounted on {} (daemon pid {child})", args.spec, args.dir.display());
                }
                return ExitCode::SUCCESS;
            }
            let _ = nix::sys::wait::waitpid(child, None);
            if message.is_empty() {
                message = "the mount daemon died".to_owned();
            }
            eprintln!("mount.nfs-fuse: mounting {} on {} failed: {message}", args.spec, args.dir.display());
            ExitCode::from(MOUNT_FAILED)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Result<Args, String> {
        parse_args(&list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
    }

    #[test]
    fn command_lines() {
        let a = args(&[
            "10.0.0.5:/export/a/b",
            "/mnt/x",
            "-o",
            "nfsvers=3,hard,proto=tcp,port=2049,mountport=20048,ro,nolock,timeo=600",
        ])
        .expect("parse");
        assert_eq!((a.host.as_str(), a.path.as_str()), ("10.0.0.5", "/export/a/b"));
        assert_eq!((a.port, a.mountport, a.ro, a.fake), (Some(2049), Some(20048), true, false));
        let a = args(&["-v", "[fd00::5]:/", "/m", "-overs=3,rw", "-sfn"]).expect("parse");
        assert_eq!((a.host.as_str(), a.path.as_str(), a.ro, a.fake, a.verbose), ("fd00::5", "/", false, true, true));
        assert_eq!(a.port, None);
        assert!(args(&["h:/x", "/m", "-o", "nfsvers=4.1"]).is_err());
        assert!(args(&["h:x", "/m"]).is_err());
        assert!(args(&["h:/x"]).is_err());
        assert!(args(&["h:/x", "/m", "-o", "port=x"]).is_err());
        assert_eq!(args(&["h:/x", "/m", "-o", "port=0"]).expect("parse").port, None);
    }
}
