//! Everything that can go wrong ([`NfsError`]) and the mapping from NFS statuses,
//! RPC failures and connect failures into it.

use super::*;

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

/// Map an `NFS3ERR_*` status of operation `op` on `path`.
pub(super) fn status_error(op: &'static str, path: &str, status: nfsstat3) -> NfsError {
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

pub(super) fn rpc_error(op: &'static str, err: RpcError) -> NfsError {
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

pub(super) fn describe_connect_error(e: &ConnectError, config: &ClientConfig) -> String {
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
