//! What a client connects to ([`NfsTarget`]) and how ([`ClientConfig`]).

use super::*;

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
