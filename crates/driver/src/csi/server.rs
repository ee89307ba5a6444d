//! Serving the CSI services on a unix socket: endpoint parsing, binding (stale socket
//! replaced, mode 0660) and `serve`, which takes a bound listener and a shutdown future;
//! `serve_registration` does the same for kubelet's plugin registration. Every
//! connection goes through [`AuthorityFix`] (clients that send the socket path as
//! `:authority`).

use std::future::Future;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::UnixListenerStream;

use super::authority::AuthorityFix;

use super::controller::ControllerService;
use super::identity::IdentityService;
use super::node::NodeService;
use super::proto::{
    controller_server::ControllerServer, identity_server::IdentityServer, node_server::NodeServer,
};
use stowage_api::proto::registration::registration_server::RegistrationServer;

use super::registration::KubeletRegistration;

/// The services one socket serves.
pub struct Services {
    pub identity: IdentityService,
    pub controller: Option<ControllerService>,
    pub node: Option<NodeService>,
}

/// `unix:///path/csi.sock`, `unix:/path` or a plain absolute path → the socket path.
pub fn socket_path(endpoint: &str) -> Result<PathBuf, String> {
    let path = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .unwrap_or(endpoint);
    if !path.starts_with('/') {
        return Err(format!(
            "endpoint {endpoint:?} must be a unix socket such as unix:///csi/csi.sock"
        ));
    }
    Ok(PathBuf::from(path))
}

/// Bind a unix socket at `path`: parent created, a stale socket replaced (anything
/// else at that path is an error, never deleted), permissions 0660.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a socket; not replacing it",
                    path.display()
                ),
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(listener)
}

/// Accepted connections, each behind [`AuthorityFix`] so clients that send the socket
/// path as `:authority` are served too.
fn incoming(
    listener: UnixListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<AuthorityFix<tokio::net::UnixStream>>> {
    UnixListenerStream::new(listener).map(|accepted| accepted.map(AuthorityFix::new))
}

/// Serve until `shutdown` resolves; in-flight calls are allowed to finish.
pub async fn serve(
    listener: UnixListener,
    services: Services,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(IdentityServer::new(services.identity))
        .add_optional_service(services.controller.map(ControllerServer::new))
        .add_optional_service(services.node.map(NodeServer::new))
        .serve_with_incoming_shutdown(incoming(listener), shutdown)
        .await
}

/// Serve kubelet's plugin registration on its own socket until `shutdown` resolves.
pub async fn serve_registration(
    listener: UnixListener,
    registration: KubeletRegistration,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(RegistrationServer::new(registration))
        .serve_with_incoming_shutdown(incoming(listener), shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            socket_path("unix:///csi/csi.sock").unwrap(),
            PathBuf::from("/csi/csi.sock")
        );
        assert_eq!(
            socket_path("unix:/csi/csi.sock").unwrap(),
            PathBuf::from("/csi/csi.sock")
        );
        assert_eq!(
            socket_path("/csi/csi.sock").unwrap(),
            PathBuf::from("/csi/csi.sock")
        );
        assert!(socket_path("tcp://127.0.0.1:10000").is_err());
        assert!(socket_path("unix://relative").is_err());
    }

    #[tokio::test]
    async fn bind_replaces_a_stale_socket_but_not_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/csi.sock");
        let first = bind(&path).unwrap();
        drop(first);
        let _second = bind(&path).expect("stale socket replaced");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        let file = dir.path().join("file");
        std::fs::write(&file, "keep me").unwrap();
        assert!(bind(&file).is_err());
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
    }
}
