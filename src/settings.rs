//! What a serving role runs with, resolved from its flags: pure, no I/O (server names
//! are resolved, instance metadata asked and kubeconfigs read when `run` starts, from
//! the values kept here). `run` reads nothing else, so a flag that changes nothing
//! here changes nothing at all: tests/flags.rs holds every flag of every subcommand to
//! "changes these settings, or is refused".

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use stowage_api::keys::DriverNames;
use stowage_driver::backend::ebs::cloud::Ec2Settings;
use stowage_driver::backend::ebs::metadata::KnownMetadata;
use stowage_loops::Loop;
use stowage_loops::queue::Backoff;
use stowage_nfs::client::ClientConfig;

use crate::config::{
    BackendArgs, BackendKind, CommonArgs, ControllerArgs, EbsNodeArgs, Ec2Args, GcArgs,
    GcScheduleArgs, KubeArgs, LocalArgs, NfsClientArgs, NfsExportArgs, NodeArgs, Output,
    default_endpoint, node_socket,
};

/// Which serving role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Controller,
    Node,
    Local,
}

/// One serving process: its socket, backends, services and loops.
#[derive(Debug, Clone)]
pub struct Serve {
    pub role: Role,
    pub socket: PathBuf,
    /// `--driver-name` (GetPluginInfo's) and `--nfs-driver-name`.
    pub drivers: DriverNames,
    pub http_addr: Option<SocketAddr>,
    pub shutdown_grace: Duration,
    /// In the order given: the first is the default.
    pub backends: Vec<Backend>,
    /// Serve the Node service as this node.
    pub node: Option<Node>,
    /// Run the Kubernetes loops.
    pub loops: Option<Loops>,
    /// The controller's periodic gc (needs the loops' client).
    pub gc: Option<GcSchedule>,
    /// How often the Controller service checks its backends.
    pub backend_check_interval: Duration,
}

/// `--gc-interval`, `--gc-delete-older-than`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcSchedule {
    pub interval: Duration,
    /// Delete orphans older than this; `None`: list only.
    pub delete_older_than: Option<Duration>,
}

fn gc_schedule(args: &GcScheduleArgs) -> Option<GcSchedule> {
    args.gc_interval.map(|interval| GcSchedule {
        interval,
        delete_older_than: args.gc_delete_older_than,
    })
}

/// What `stowage gc` runs with.
#[derive(Debug, Clone)]
pub struct Gc {
    pub kubeconfig: Option<PathBuf>,
    pub drivers: DriverNames,
    pub backends: Vec<Backend>,
    pub delete: bool,
    pub older_than: Duration,
    pub output: Output,
}

/// `stowage gc`'s settings: the backends as the controller builds them.
pub fn gc(args: &GcArgs) -> Result<Gc, String> {
    Ok(Gc {
        kubeconfig: args.kubeconfig.clone(),
        drivers: DriverNames::new(args.driver_name.clone(), &args.nfs_driver_name),
        backends: backends(
            &args.backends,
            || Nfs {
                default_export: remote_export(&args.nfs_export),
                client: Some(nfs_client(&args.nfs_client)),
            },
            || Ebs {
                ec2: Some(ec2(&args.ec2)),
                zone: None,
            },
        )?,
        delete: args.delete,
        older_than: args.older_than,
        output: args.output,
    })
}

impl Serve {
    /// The Controller service runs in `controller` and `local`.
    pub fn controller(&self) -> bool {
        self.role != Role::Node
    }

    pub fn nfs(&self) -> Option<&Nfs> {
        self.backends.iter().find_map(|b| match b {
            Backend::Nfs(nfs) => Some(nfs),
            Backend::Ebs(_) => None,
        })
    }

    pub fn serves_ebs(&self) -> bool {
        self.backends.iter().any(|b| matches!(b, Backend::Ebs(_)))
    }
}

#[derive(Debug, Clone)]
pub enum Backend {
    Nfs(Nfs),
    Ebs(Ebs),
}

#[derive(Debug, Clone)]
pub struct Nfs {
    pub default_export: Option<Export>,
    /// The client the controller manages directories with (the node makes no NFS
    /// calls: `None`).
    pub client: Option<ClientConfig>,
}

/// The default NFS export.
#[derive(Debug, Clone)]
pub enum Export {
    /// A server of one's own (a name or an IP; resolved at start).
    Remote { server: String, share: String },
    /// The embedded server of `local`, exporting `data_dir` on `bind`.
    Embedded { data_dir: PathBuf, bind: SocketAddr },
}

#[derive(Debug, Clone)]
pub struct Ebs {
    /// How to reach EC2 (the node makes no EC2 calls: `None`).
    pub ec2: Option<Ec2Settings>,
    /// Zone of volumes whose request names none.
    pub zone: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Node {
    /// `None`: the instance id with EBS, else the host name (`local`) or an error.
    pub node_id: Option<String>,
    pub kubelet_dir: PathBuf,
    /// Register with kubelet, telling it this socket path (`None`: the socket's own).
    pub registration: Option<Option<PathBuf>>,
    pub ebs: Option<EbsNode>,
}

#[derive(Debug, Clone)]
pub struct EbsNode {
    pub known: KnownMetadata,
    pub max_volumes: Option<i64>,
    pub by_id_dir: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Loops {
    /// `None`: the in-cluster config.
    pub kubeconfig: Option<PathBuf>,
    /// The CSI socket the loops call (`None`: this process's own).
    pub csi_address: Option<String>,
    pub loops: Vec<Loop>,
    pub leader: Option<Leader>,
    pub kube_api_qps: f64,
    pub kube_api_burst: u32,
    pub max_csi_calls: usize,
    pub backoff: Backoff,
    pub annotation_grace: Duration,
    pub csi_timeout: Duration,
    /// A worker on one object longer than this fails liveness.
    pub stuck_after: Duration,
}

#[derive(Debug, Clone)]
pub struct Leader {
    pub namespace: Option<String>,
    pub identity: Option<String>,
    pub owner_uid: Option<String>,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

fn drivers(common: &CommonArgs) -> DriverNames {
    DriverNames::new(common.driver_name.clone(), &common.nfs_driver_name)
}

fn socket(common: &CommonArgs, role: &str) -> Result<PathBuf, String> {
    let endpoint = common
        .endpoint
        .clone()
        .unwrap_or_else(|| default_endpoint(role, &common.driver_name));
    stowage_driver::csi::server::socket_path(&endpoint)
}

fn nfs_client(args: &NfsClientArgs) -> ClientConfig {
    ClientConfig {
        call_timeout: args.nfs_timeout,
        max_connections: args.nfs_connections,
        ..ClientConfig::default()
    }
}

fn remote_export(args: &NfsExportArgs) -> Option<Export> {
    args.nfs_server
        .clone()
        .zip(args.nfs_share.clone())
        .map(|(server, share)| Export::Remote { server, share })
}

fn ec2(args: &Ec2Args) -> Ec2Settings {
    Ec2Settings {
        region: args.region.clone(),
        endpoint: args.ebs_endpoint.clone(),
        cluster_id: args.cluster_id.clone(),
        max_attempts: args.ec2_max_attempts,
        call_timeout: args.ec2_timeout,
        ..Ec2Settings::default()
    }
}

fn ebs_node(args: &EbsNodeArgs, zone: &Option<String>) -> EbsNode {
    EbsNode {
        known: KnownMetadata {
            instance_id: args.instance_id.clone(),
            zone: zone.clone(),
            instance_type: args.instance_type.clone(),
        },
        max_volumes: args.max_volumes,
        by_id_dir: args.by_id_dir.clone(),
    }
}

/// The backends in the order given, each built by `nfs`/`ebs`.
fn backends(
    args: &BackendArgs,
    nfs: impl Fn() -> Nfs,
    ebs: impl Fn() -> Ebs,
) -> Result<Vec<Backend>, String> {
    let mut list = Vec::new();
    for kind in &args.backends {
        let backend = match kind {
            BackendKind::Nfs => Backend::Nfs(nfs()),
            BackendKind::Ebs => Backend::Ebs(ebs()),
        };
        if !list
            .iter()
            .any(|b| std::mem::discriminant(b) == std::mem::discriminant(&backend))
        {
            list.push(backend);
        }
    }
    if list.is_empty() {
        return Err("no backend configured (--backend nfs|ebs)".into());
    }
    Ok(list)
}

fn loops(args: &KubeArgs, runs: bool) -> Option<Loops> {
    runs.then(|| Loops {
        kubeconfig: args.kubeconfig.clone(),
        csi_address: args.csi_address.clone(),
        loops: args.loops.clone(),
        leader: args.leader_election.then(|| Leader {
            namespace: args.leader_election_namespace.clone(),
            identity: args.leader_election_identity.clone(),
            owner_uid: args.leader_election_owner_uid.clone(),
            lease_duration: args.leader_election_lease_duration,
            renew_deadline: args.leader_election_renew_deadline,
            retry_period: args.leader_election_retry_period,
        }),
        kube_api_qps: args.kube_api_qps,
        kube_api_burst: args.kube_api_burst,
        max_csi_calls: args.max_csi_calls,
        backoff: Backoff {
            start: args.retry_interval_start,
            max: args.retry_interval_max,
        },
        annotation_grace: args.annotation_grace,
        csi_timeout: args.csi_timeout,
        stuck_after: args.stuck_after,
    })
}

fn absolute(path: &std::path::Path, flag: &str) -> Result<PathBuf, String> {
    std::path::absolute(path).map_err(|e| format!("{flag} {}: {e}", path.display()))
}

pub fn controller(args: &ControllerArgs) -> Result<Serve, String> {
    Ok(Serve {
        role: Role::Controller,
        socket: socket(&args.common, "controller")?,
        drivers: drivers(&args.common),
        http_addr: args.common.http_addr,
        shutdown_grace: args.common.shutdown_grace,
        backends: backends(
            &args.backends,
            || Nfs {
                default_export: remote_export(&args.nfs_export),
                client: Some(nfs_client(&args.nfs_client)),
            },
            || Ebs {
                ec2: Some(ec2(&args.ec2)),
                zone: args.ebs_zone.zone.clone(),
            },
        )?,
        node: None,
        loops: loops(&args.kube, !args.kube.no_loops),
        gc: gc_schedule(&args.gc),
        backend_check_interval: args.backend_check.backend_check_interval,
    })
}

pub fn node(args: &NodeArgs) -> Result<Serve, String> {
    let kubelet_dir = absolute(&args.kubelet_dir, "--kubelet-dir")?;
    let socket = match &args.common.endpoint {
        Some(endpoint) => stowage_driver::csi::server::socket_path(endpoint)?,
        None => node_socket(&kubelet_dir, &args.common.driver_name),
    };
    let ebs = args.backends.serves(BackendKind::Ebs);
    Ok(Serve {
        role: Role::Node,
        socket,
        drivers: drivers(&args.common),
        http_addr: args.common.http_addr,
        shutdown_grace: args.common.shutdown_grace,
        backends: backends(
            &args.backends,
            || Nfs {
                default_export: remote_export(&args.nfs_export),
                client: None,
            },
            || Ebs {
                ec2: None,
                zone: args.ebs_zone.zone.clone(),
            },
        )?,
        node: Some(Node {
            node_id: args.node_id.clone(),
            kubelet_dir,
            registration: args
                .kubelet_registration
                .then(|| args.kubelet_registration_path.clone()),
            ebs: ebs.then(|| ebs_node(&args.ebs_node, &args.ebs_zone.zone)),
        }),
        loops: None,
        gc: None,
        // The node serves no Controller service: nothing is checked.
        backend_check_interval: Duration::ZERO,
    })
}

pub fn local(args: &LocalArgs) -> Result<Serve, String> {
    let socket = socket(&args.common, "local")?;
    let kubelet_dir = match &args.kubelet_dir {
        Some(dir) => absolute(dir, "--kubelet-dir")?,
        None => socket
            .parent()
            .map(std::path::Path::to_path_buf)
            .ok_or("the CSI socket has no directory")?,
    };
    let ebs = args.backends.serves(BackendKind::Ebs);
    let export = remote_export(&args.nfs_export).unwrap_or_else(|| Export::Embedded {
        data_dir: args.data_dir.clone(),
        bind: args.nfs_bind,
    });
    Ok(Serve {
        role: Role::Local,
        socket,
        drivers: drivers(&args.common),
        http_addr: args.common.http_addr,
        shutdown_grace: args.common.shutdown_grace,
        backends: backends(
            &args.backends,
            || Nfs {
                default_export: Some(export.clone()),
                client: Some(nfs_client(&args.nfs_client)),
            },
            || Ebs {
                ec2: Some(ec2(&args.ec2)),
                zone: args.ebs_zone.zone.clone(),
            },
        )?,
        node: Some(Node {
            node_id: args.node_id.clone(),
            kubelet_dir,
            registration: None,
            ebs: ebs.then(|| ebs_node(&args.ebs_node, &args.ebs_zone.zone)),
        }),
        loops: loops(&args.kube, args.kube.kubeconfig.is_some()),
        gc: gc_schedule(&args.gc),
        backend_check_interval: args.backend_check.backend_check_interval,
    })
}
