//! NFSv3 for stowage, with no kernel mount: [`client`], a connection pool over
//! nfs3_client (timeouts, reconnects, traversal-proof path walking) that the NFS
//! backend manages export sub-directories with; [`server`], the embedded NFSv3 server
//! (portmap + MOUNT + NFS on one port) behind `stowage local` and `stowage nfs-server`;
//! [`beneath`], opening a directory below a root without following any symlink (the
//! server's walks, and the node's bind mounts of a local export's directories).
//!
//! Must never import tonic, kube or aws-sdk-ec2, and knows no CSI or StorageClass
//! semantics: volumes, records and parameters are the driver's.
#![forbid(unsafe_code)]

pub mod beneath;
pub mod client;
pub mod server;
