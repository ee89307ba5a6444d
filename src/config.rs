//! Command line: subcommands and flags (clap derive), each flag with an environment
//! fallback so the Helm chart can set them either way.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use std::net::IpAddr;

use clap::builder::TypedValueParser as _;
use clap::{Args, Parser, Subcommand, ValueEnum};

use stowage_api::keys::{DEFAULT_DRIVER_NAME, DEFAULT_NFS_DRIVER_NAME};
use stowage_driver::csi::node::DEFAULT_KUBELET_DIR;
use stowage_loops::Loop;

#[derive(Debug, Parser)]
#[command(
    name = "stowage",
    version,
    about = "Kubernetes CSI driver and dynamic provisioner: NFS sub-directories and EBS volumes in one binary"
)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// CSI Identity + Controller on a unix socket (runs as a Deployment).
    Controller(ControllerArgs),
    /// CSI Identity + Node on the kubelet plugin socket (runs as a DaemonSet).
    Node(NodeArgs),
    /// Controller and node on one socket with an embedded NFS server: no cluster,
    /// no AWS, no NFS server needed.
    Local(LocalArgs),
    /// Serve a directory over NFSv3 (the chart's in-cluster NFS server mode).
    NfsServer(NfsServerArgs),
    /// Measure CreateVolume/DeleteVolume over a socket against the NFS backend.
    Bench(BenchArgs),
    /// List leftovers: backend volumes no PV refers to, PVs whose volume is gone
    /// (dry run; --delete removes the orphans older than --older-than).
    Gc(GcArgs),
    /// Why is a claim, PV or VolumeAttachment stuck? Follows it through the cluster and
    /// the controller and names the first broken link, with the fix.
    Explain(ExplainArgs),
}

/// Flags every serving role has.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// CSI endpoint (unix socket), e.g. unix:///csi/csi.sock.
    #[arg(long, env = "CSI_ENDPOINT")]
    pub endpoint: Option<String>,

    /// CSI driver name: the StorageClass `provisioner`.
    #[arg(long, env = "DRIVER_NAME", default_value = DEFAULT_DRIVER_NAME)]
    pub driver_name: String,

    /// A second driver name, for NFS only: its volumes never wait for a
    /// VolumeAttachment (its CSIDriver says `attachRequired: false`) while the main
    /// name's EBS volumes are attached. The node plugin registers both with kubelet;
    /// the loops provision, resize and snapshot for both. Empty: only --driver-name.
    #[arg(long, env = "NFS_DRIVER_NAME", default_value = DEFAULT_NFS_DRIVER_NAME)]
    pub nfs_driver_name: String,

    /// Address for /metrics and /healthz (e.g. 0.0.0.0:9808); off when unset.
    #[arg(long, env = "HTTP_ADDR")]
    pub http_addr: Option<SocketAddr>,

    /// How long shutdown waits for connected CSI clients before exiting anyway.
    #[arg(long, env = "SHUTDOWN_GRACE", value_parser = humantime::parse_duration, default_value = "10s")]
    pub shutdown_grace: Duration,
}

/// Which storage backends to serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    Nfs,
    Ebs,
}

/// Which backends a role serves.
#[derive(Debug, Clone, Args)]
pub struct BackendArgs {
    /// Storage backends to serve (repeatable or comma-separated); the first is the
    /// default. EBS in `local` mode needs --ebs-endpoint (an emulator) or AWS credentials.
    #[arg(
        long = "backend",
        env = "BACKENDS",
        value_enum,
        value_delimiter = ',',
        default_value = "nfs"
    )]
    pub backends: Vec<BackendKind>,
}

impl BackendArgs {
    pub fn serves(&self, kind: BackendKind) -> bool {
        self.backends.contains(&kind)
    }
}

/// The default NFS export: where volumes of StorageClasses that name no server go
/// (controller), and what such volumes mount (node).
#[derive(Debug, Clone, Args)]
pub struct NfsExportArgs {
    /// Default NFS server for StorageClasses that name none.
    #[arg(long, env = "NFS_SERVER", requires = "nfs_share")]
    pub nfs_server: Option<String>,

    /// Default NFS share (export path) for StorageClasses that name none.
    #[arg(long, env = "NFS_SHARE", requires = "nfs_server")]
    pub nfs_share: Option<String>,
}

/// The NFS client of the roles that manage directories over the wire.
#[derive(Debug, Clone, Args)]
pub struct NfsClientArgs {
    /// Timeout of each NFS call; a connection that timed out is dropped.
    #[arg(long, env = "NFS_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10s")]
    pub nfs_timeout: Duration,

    /// Connections per NFS export.
    #[arg(long, env = "NFS_CONNECTIONS", default_value_t = 8)]
    pub nfs_connections: usize,
}

/// Where EC2 is and which volumes are this cluster's (the roles that call EC2).
#[derive(Debug, Clone, Args)]
pub struct Ec2Args {
    /// AWS region.
    #[arg(long, env = "AWS_REGION", default_value = "us-east-1")]
    pub region: String,

    /// EC2 endpoint override, e.g. an emulator (http://127.0.0.1:5000).
    #[arg(long, env = "AWS_ENDPOINT_URL_EC2")]
    pub ebs_endpoint: Option<String>,

    /// Value of the cluster tag on volumes this cluster creates (and lists).
    #[arg(long, env = "CLUSTER_ID", default_value = "stowage")]
    pub cluster_id: String,

    /// Attempts per EC2 call (standard retries with backoff).
    #[arg(long, env = "EC2_MAX_ATTEMPTS", default_value_t = 3)]
    pub ec2_max_attempts: u32,

    /// Timeout of one EC2 call attempt.
    #[arg(long, env = "EC2_TIMEOUT", value_parser = humantime::parse_duration, default_value = "15s")]
    pub ec2_timeout: Duration,
}

/// The EBS zone: for volumes whose request names none (controller), this node's (node).
#[derive(Debug, Clone, Args)]
pub struct EbsZoneArgs {
    /// Zone for volumes whose request names none (controller); this node's zone (node).
    /// From instance metadata when unset on a node.
    #[arg(long, env = "ZONE")]
    pub zone: Option<String>,
}

/// This node as EBS sees it (the roles that serve the Node service).
#[derive(Debug, Clone, Args)]
pub struct EbsNodeArgs {
    /// This node's EC2 instance id (from instance metadata when unset).
    #[arg(long, env = "INSTANCE_ID")]
    pub instance_id: Option<String>,

    /// This node's EC2 instance type, for the attach limit (from instance metadata when unset).
    #[arg(long, env = "INSTANCE_TYPE")]
    pub instance_type: Option<String>,

    /// Volumes this node can attach, overriding the instance type's limit.
    #[arg(long, env = "MAX_VOLUMES")]
    pub max_volumes: Option<i64>,

    /// Where attached volumes appear by serial.
    #[arg(long, env = "BY_ID_DIR", default_value = "/dev/disk/by-id")]
    pub by_id_dir: PathBuf,
}

/// How the controller reaches Kubernetes and the CSI driver it drives.
#[derive(Debug, Clone, Args)]
pub struct KubeArgs {
    /// Kubeconfig for the Kubernetes loops. `controller`: in-cluster config when unset;
    /// `local`: the loops run only when this is given.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// CSI socket the loops call (default: this process's own --endpoint), so they can
    /// also drive another CSI driver.
    #[arg(long, env = "CSI_ADDRESS")]
    pub csi_address: Option<String>,

    /// Loops to run (repeatable or comma-separated).
    #[arg(
        long = "loops",
        env = "LOOPS",
        value_parser = clap::builder::PossibleValuesParser::new(Loop::ALL.map(|(name, _)| name))
            .try_map(|name| name.parse::<Loop>()),
        value_delimiter = ',',
        default_value = "provisioner,attacher,resizer,snapshotter"
    )]
    pub loops: Vec<Loop>,

    /// Serve CSI only, without the Kubernetes loops (e.g. beside the upstream sidecars,
    /// or with no cluster at all).
    #[arg(long, env = "NO_LOOPS", conflicts_with_all = ["kubeconfig", "loops", "leader_election"])]
    pub no_loops: bool,

    /// Run the loops only while holding a coordination.k8s.io Lease (one active
    /// replica of several).
    #[arg(long, env = "LEADER_ELECTION")]
    pub leader_election: bool,

    /// Namespace of the Lease (default: the pod's namespace, else `default`).
    #[arg(long, env = "LEADER_ELECTION_NAMESPACE")]
    pub leader_election_namespace: Option<String>,

    /// This replica's identity in the Lease (default: POD_NAME, else the host name).
    #[arg(long, env = "POD_NAME")]
    pub leader_election_identity: Option<String>,

    /// This pod's uid (downward API `metadata.uid`): while this replica leads, the
    /// Lease names its pod as owner, so deleting the pod (e.g. `helm uninstall`, which
    /// also removes the RBAC a hand-back needs) deletes the Lease with it. Used only
    /// when the Lease is in the pod's namespace (`POD_NAMESPACE`).
    #[arg(long, env = "POD_UID")]
    pub leader_election_owner_uid: Option<String>,

    /// How long a Lease holds without renewal before another replica may take it.
    #[arg(long, env = "LEADER_ELECTION_LEASE_DURATION", value_parser = humantime::parse_duration, default_value = "15s")]
    pub leader_election_lease_duration: Duration,

    /// The leader stops its loops when it could not renew for this long.
    #[arg(long, env = "LEADER_ELECTION_RENEW_DEADLINE", value_parser = humantime::parse_duration, default_value = "10s")]
    pub leader_election_renew_deadline: Duration,

    /// How often a replica tries to take or renew the Lease.
    #[arg(long, env = "LEADER_ELECTION_RETRY_PERIOD", value_parser = humantime::parse_duration, default_value = "2s")]
    pub leader_election_retry_period: Duration,

    /// Kubernetes API requests per second (sustained) this process may send.
    #[arg(long, env = "KUBE_API_QPS", default_value_t = 5000.0)]
    pub kube_api_qps: f64,

    /// Kubernetes API requests this process may send in a burst above --kube-api-qps.
    #[arg(long, env = "KUBE_API_BURST", default_value_t = 10000)]
    pub kube_api_burst: u32,

    /// CSI calls the loops keep in flight at most.
    #[arg(long, env = "MAX_CSI_CALLS", default_value_t = 100)]
    pub max_csi_calls: usize,

    /// First retry delay of a failed claim or PV (doubles per failure).
    #[arg(long, env = "RETRY_INTERVAL_START", value_parser = humantime::parse_duration, default_value = "1s")]
    pub retry_interval_start: Duration,

    /// Longest retry delay.
    #[arg(long, env = "RETRY_INTERVAL_MAX", value_parser = humantime::parse_duration, default_value = "5m")]
    pub retry_interval_max: Duration,

    /// How long a new claim waits for kube-controller-manager to annotate it before
    /// stowage does (writing first would make the PV controller's pending write fail
    /// with a conflict). 0 = never wait.
    #[arg(long, env = "ANNOTATION_GRACE", value_parser = humantime::parse_duration, default_value = "150ms")]
    pub annotation_grace: Duration,

    /// Timeout of one CSI call from the loops (CreateVolume, DeleteVolume, …).
    #[arg(long, env = "CSI_TIMEOUT", value_parser = humantime::parse_duration, default_value = "60s")]
    pub csi_timeout: Duration,

    /// /healthz fails (the process is restarted) when a loop's worker has been on one
    /// object for longer than this: a call that hangs past every timeout.
    #[arg(long, env = "STUCK_AFTER", value_parser = humantime::parse_duration, default_value = "10m")]
    pub stuck_after: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct ControllerArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub backends: BackendArgs,
    #[command(flatten)]
    pub nfs_export: NfsExportArgs,
    #[command(flatten)]
    pub nfs_client: NfsClientArgs,
    #[command(flatten)]
    pub ec2: Ec2Args,
    #[command(flatten)]
    pub ebs_zone: EbsZoneArgs,
    #[command(flatten)]
    pub kube: KubeArgs,
    #[command(flatten)]
    pub gc: GcScheduleArgs,
    #[command(flatten)]
    pub backend_check: BackendCheckArgs,
}

/// How the Controller service checks its backends (`/readyz`, `stowage_backend_up`).
#[derive(Debug, Clone, Args)]
pub struct BackendCheckArgs {
    /// How often each backend is asked whether it answers (NFS FSSTAT of each export
    /// in use, an EC2 call).
    #[arg(long, env = "BACKEND_CHECK_INTERVAL", value_parser = humantime::parse_duration, default_value = "30s")]
    pub backend_check_interval: Duration,
}

/// The controller's periodic gc (off by default).
#[derive(Debug, Clone, Args)]
pub struct GcScheduleArgs {
    /// Run `stowage gc` every this long while leading: `stowage_orphan_volumes` and a
    /// log line per orphan (off when unset).
    #[arg(long, env = "GC_INTERVAL", value_parser = humantime::parse_duration)]
    pub gc_interval: Option<Duration>,

    /// With --gc-interval: also delete orphans older than this (unset: only list).
    #[arg(long, env = "GC_DELETE_OLDER_THAN", value_parser = humantime::parse_duration, requires = "gc_interval")]
    pub gc_delete_older_than: Option<Duration>,
}

/// How a command prints its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

/// `stowage gc`: reads the cluster with your kubeconfig and the backends with the
/// controller's flags.
#[derive(Debug, Clone, Args)]
pub struct GcArgs {
    /// Kubeconfig (default: $KUBECONFIG, ~/.kube/config, or in-cluster).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// The CSI driver name whose PVs and StorageClasses count.
    #[arg(long, env = "DRIVER_NAME", default_value = DEFAULT_DRIVER_NAME)]
    pub driver_name: String,
    /// The NFS-only driver name whose PVs and StorageClasses count too (empty: none).
    #[arg(long, env = "NFS_DRIVER_NAME", default_value = DEFAULT_NFS_DRIVER_NAME)]
    pub nfs_driver_name: String,
    #[command(flatten)]
    pub backends: BackendArgs,
    #[command(flatten)]
    pub nfs_export: NfsExportArgs,
    #[command(flatten)]
    pub nfs_client: NfsClientArgs,
    #[command(flatten)]
    pub ec2: Ec2Args,
    /// Delete the orphans older than --older-than (without it: list only).
    #[arg(long)]
    pub delete: bool,
    /// Only orphans older than this are deleted, or listed as deletable (a claim may
    /// still be getting a younger one).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1h")]
    pub older_than: Duration,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

/// `stowage explain`: read-only, with your kubeconfig.
#[derive(Debug, Clone, Args)]
pub struct ExplainArgs {
    /// What to explain: `pvc/NAME`, `pv/NAME` or `volumeattachment/NAME`.
    pub object: String,
    /// The claim's namespace (default: the kubeconfig context's, else `default`).
    #[arg(short = 'n', long = "namespace")]
    pub namespace: Option<String>,
    /// Kubeconfig (default: $KUBECONFIG, ~/.kube/config, or in-cluster).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// The CSI driver name.
    #[arg(long, env = "DRIVER_NAME", default_value = DEFAULT_DRIVER_NAME)]
    pub driver_name: String,
    /// The NFS-only driver name (empty: none).
    #[arg(long, env = "NFS_DRIVER_NAME", default_value = DEFAULT_NFS_DRIVER_NAME)]
    pub nfs_driver_name: String,
    /// The controller's HTTP address (e.g. http://127.0.0.1:8080), when the API
    /// server's pod proxy cannot reach it (default: through the API server, to the
    /// pod that holds the leader Lease).
    #[arg(long, env = "STOWAGE_CONTROLLER_URL")]
    pub controller_url: Option<String>,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

#[derive(Debug, Clone, Args)]
pub struct NfsServerArgs {
    /// Directory to export.
    #[arg(long, env = "STOWAGE_DATA_DIR", default_value = "/export")]
    pub data_dir: PathBuf,
    /// Address to serve NFSv3 and MOUNT on (one port for both).
    #[arg(long, env = "STOWAGE_NFS_BIND", default_value = "0.0.0.0:2049")]
    pub bind: SocketAddr,
    /// Address for /healthz and /metrics; off when unset.
    #[arg(long, env = "HTTP_ADDR")]
    pub http_addr: Option<SocketAddr>,
}

#[derive(Debug, Clone, Args)]
pub struct NodeArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub backends: BackendArgs,
    #[command(flatten)]
    pub nfs_export: NfsExportArgs,
    #[command(flatten)]
    pub ebs_zone: EbsZoneArgs,
    #[command(flatten)]
    pub ebs_node: EbsNodeArgs,
    /// This node's id: the Kubernetes node name for NFS; with EBS it must be the
    /// instance id (defaults to it).
    #[arg(long, env = "NODE_ID")]
    pub node_id: Option<String>,
    /// kubelet's root directory: NodeStage/NodePublish/NodeUnpublish/NodeUnstage act
    /// only on paths under it; the default --endpoint is in it.
    #[arg(long, env = "KUBELET_DIR", default_value = DEFAULT_KUBELET_DIR)]
    pub kubelet_dir: PathBuf,
    /// Register with kubelet through `<kubelet-dir>/plugins_registry/<driver>-reg.sock`.
    /// Turn off where node-driver-registrar registers the plugin instead.
    #[arg(long, env = "KUBELET_REGISTRATION", default_value_t = true, action = clap::ArgAction::Set)]
    pub kubelet_registration: bool,
    /// The CSI socket as a path on kubelet's host, told to kubelet at registration
    /// (default: the --endpoint path, right when the plugin sees the host's kubelet
    /// directory at the same path).
    #[arg(long, env = "KUBELET_REGISTRATION_PATH")]
    pub kubelet_registration_path: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct LocalArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub backends: BackendArgs,
    #[command(flatten)]
    pub nfs_export: NfsExportArgs,
    #[command(flatten)]
    pub nfs_client: NfsClientArgs,
    #[command(flatten)]
    pub ec2: Ec2Args,
    #[command(flatten)]
    pub ebs_zone: EbsZoneArgs,
    #[command(flatten)]
    pub ebs_node: EbsNodeArgs,
    /// This node's id; defaults to the host name.
    #[arg(long, env = "NODE_ID")]
    pub node_id: Option<String>,
    /// Directory the embedded NFS server exports; volumes are directories in it.
    #[arg(long, env = "STOWAGE_DATA_DIR", default_value = "./stowage-data")]
    pub data_dir: PathBuf,
    /// Address of the embedded NFS server.
    #[arg(long, env = "STOWAGE_NFS_BIND", default_value = "127.0.0.1:0")]
    pub nfs_bind: SocketAddr,
    /// The node service acts only on paths under this directory (kubelet's root
    /// directory when a real kubelet calls this socket). Default: the directory of
    /// the CSI socket (`/tmp/stowage` by default).
    #[arg(long, env = "KUBELET_DIR")]
    pub kubelet_dir: Option<PathBuf>,
    #[command(flatten)]
    pub kube: KubeArgs,
    #[command(flatten)]
    pub gc: GcScheduleArgs,
    #[command(flatten)]
    pub backend_check: BackendCheckArgs,
}

/// Default sockets per role (the node's for the default kubelet directory).
pub fn default_endpoint(role: &str, driver_name: &str) -> String {
    match role {
        "node" => format!(
            "unix://{}",
            node_socket(std::path::Path::new(DEFAULT_KUBELET_DIR), driver_name).display()
        ),
        "local" => "unix:///tmp/stowage/csi.sock".into(),
        _ => "unix:///csi/csi.sock".into(),
    }
}

/// The node plugin's CSI socket in a kubelet directory: `<dir>/plugins/<driver>/csi.sock`.
pub fn node_socket(kubelet_dir: &std::path::Path, driver_name: &str) -> PathBuf {
    kubelet_dir
        .join("plugins")
        .join(driver_name)
        .join("csi.sock")
}

/// `stowage bench`: CSI round trips against NFS or EBS, or `provision`.
#[derive(Debug, Clone, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    /// NFS server (IP) to measure against; without it an embedded server in a temp dir.
    #[arg(long, requires = "nfs_share")]
    pub nfs_server: Option<IpAddr>,
    /// Export path on --nfs-server.
    #[arg(long, requires = "nfs_server")]
    pub nfs_share: Option<String>,
    /// Measured operations per series.
    #[arg(long, default_value_t = 2000)]
    pub count: usize,
    /// Unmeasured operations before each series (connections, caches).
    #[arg(long, default_value_t = 200)]
    pub warmup: usize,

    /// Measure the EBS backend instead: concurrent CreateVolume against this EC2
    /// endpoint (an emulator such as moto; credentials from the AWS environment).
    #[arg(long, conflicts_with_all = ["nfs_server", "nfs_share", "count", "warmup"])]
    pub ebs_endpoint: Option<String>,

    /// With --ebs-endpoint: how many CreateVolume calls run at once.
    #[arg(long, default_value_t = 50, requires = "ebs_endpoint")]
    pub volumes: usize,

    #[command(subcommand)]
    pub what: Option<BenchKind>,
}

/// Benchmarks other than the CSI round trip.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum BenchKind {
    /// Claims → Bound against a cluster: starts `stowage local --kubeconfig`, creates N
    /// claims at once, reports time to all Bound, claims/s, Kubernetes API calls per
    /// claim and the controller's peak RSS, then deletes them.
    Provision(ProvisionArgs),
    /// A restart among N existing volumes: fills the cluster with N bound claim/PV
    /// pairs (directly, as provisioning and binding leave them), starts `stowage local
    /// --kubeconfig`, reports time to synced, RSS, writes and CSI calls meanwhile, and a
    /// new claim's time to PV; optionally the same for external-provisioner.
    Scale(ScaleArgs),
}

/// `stowage bench scale`.
#[derive(Debug, Clone, clap::Args)]
pub struct ScaleArgs {
    /// The cluster to measure against.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: PathBuf,
    /// Bound claim/PV pairs present (created when missing; existing ones are kept).
    #[arg(long, default_value_t = 1000)]
    pub volumes: usize,
    /// PVs of another CSI driver present (created when missing).
    #[arg(long, default_value_t = 0)]
    pub other_volumes: usize,
    /// Namespace of the claims (created when missing).
    #[arg(long, default_value = "stowage-scale")]
    pub namespace: String,
    /// Only fill (stop kube-controller-manager meanwhile: it marks a claim Lost when
    /// its cache lacks the claim's PV), then exit.
    #[arg(long, conflicts_with = "clean")]
    pub fill_only: bool,
    /// Delete everything the bench filled, then exit.
    #[arg(long)]
    pub clean: bool,
    #[command(flatten)]
    pub external: ExternalProvisionerArgs,
    /// Append each result as a JSON line to this file.
    #[arg(long)]
    pub results: Option<PathBuf>,
    /// Draw RSS against volumes, from every row of --results, into this SVG file.
    #[arg(long, requires = "results")]
    pub svg: Option<PathBuf>,
    /// Extra flags for the measured `stowage local`.
    #[arg(long = "controller-arg", allow_hyphen_values = true)]
    pub controller_args: Vec<String>,
}

/// external-provisioner for the benches to compare with: csi-provisioner with
/// hostpathplugin behind it, serving stowage's driver name.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ExternalProvisionerArgs {
    /// Measure this csi-provisioner binary too (`bench scale`) or instead of stowage
    /// (`bench provision`), with --hostpathplugin serving the same driver name.
    #[arg(long, requires = "hostpathplugin")]
    pub csi_provisioner: Option<PathBuf>,
    /// The hostpathplugin binary behind --csi-provisioner.
    #[arg(long, requires = "csi_provisioner")]
    pub hostpathplugin: Option<PathBuf>,
    /// Extra flags for csi-provisioner (e.g. `--kube-api-qps=200`: its default is 5).
    #[arg(
        long = "csi-provisioner-arg",
        allow_hyphen_values = true,
        requires = "csi_provisioner"
    )]
    pub csi_provisioner_args: Vec<String>,
}

/// `stowage bench provision`.
#[derive(Debug, Clone, clap::Args)]
pub struct ProvisionArgs {
    /// The cluster to measure against.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: PathBuf,
    /// Claims created at once.
    #[arg(long, default_value_t = 100)]
    pub claims: usize,
    /// Namespace for the claims (created when missing).
    #[arg(long, default_value = "stowage-bench")]
    pub namespace: String,
    /// Extra flags for the measured `stowage local` (e.g. `--kube-api-qps=50`).
    #[arg(long = "controller-arg", allow_hyphen_values = true)]
    pub controller_args: Vec<String>,
    /// Keep the claims and PVs instead of deleting them at the end.
    #[arg(long)]
    pub keep: bool,
    #[command(flatten)]
    pub external: ExternalProvisionerArgs,
}

/// The name that makes the binary a kubectl plugin (`kubectl stowage explain …`).
pub const KUBECTL_PLUGIN: &str = "kubectl-stowage";

/// Parse a command line: clap's own checks, then [`refuse_inapplicable`]. What
/// `main`, the chart's tests and the flag tests all use.
pub fn parse_from<I, T>(args: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    use clap::{CommandFactory, FromArgMatches};
    let args: Vec<T> = args.into_iter().collect();
    let mut command = Cli::command();
    // Installed as `kubectl-stowage`, it is the kubectl plugin `kubectl stowage …`.
    let program = args
        .first()
        .map(|a| std::path::PathBuf::from(a.clone().into()));
    if program.is_some_and(|p| p.file_name().is_some_and(|n| n == KUBECTL_PLUGIN)) {
        command = command.bin_name("kubectl stowage");
    }
    let matches = command.try_get_matches_from_mut(args)?;
    let cli = Cli::from_arg_matches(&matches).map_err(|e| e.format(&mut command))?;
    let (name, sub) = matches.subcommand().expect("a subcommand is required");
    refuse_inapplicable(&cli.command, sub).map_err(|message| {
        let mut sub_command = command
            .find_subcommand_mut(name)
            .expect("the parsed subcommand exists")
            .clone();
        clap::Error::raw(clap::error::ErrorKind::ArgumentConflict, message).format(&mut sub_command)
    })?;
    Ok(cli)
}

/// Flags that do nothing in this command's configuration, each with why: a flag of a
/// backend the role does not serve, a loop flag where no loops run, a leader-election
/// flag without `--leader-election`, the embedded server's flags beside an export of
/// one's own. Given on the command line, each is refused (the user meant something by
/// it); from the environment it is left alone (a platform may set AWS_REGION or
/// POD_NAME for every container).
pub fn inapplicable(command: &Command) -> Vec<(&'static str, String)> {
    let mut out: Vec<(&'static str, String)> = Vec::new();
    let mut refuse = |ids: &[&'static str], why: String| {
        out.extend(ids.iter().map(|id| (*id, why.clone())));
    };
    let nfs_export = &["nfs_server", "nfs_share"];
    let nfs_client = &["nfs_timeout", "nfs_connections"];
    let ec2 = &[
        "region",
        "ebs_endpoint",
        "cluster_id",
        "ec2_max_attempts",
        "ec2_timeout",
        "zone",
    ];
    let ebs_node = &[
        "zone",
        "instance_id",
        "instance_type",
        "max_volumes",
        "by_id_dir",
    ];
    let not_served = |kind: &str, role: &str| {
        format!(
            "it applies to the {kind} backend, which this `{role}` does not serve (add it with --backend, or leave the flag out)"
        )
    };
    match command {
        Command::Controller(a) => {
            if !a.backends.serves(BackendKind::Nfs) {
                refuse(nfs_export, not_served("NFS", "controller"));
                refuse(nfs_client, not_served("NFS", "controller"));
            }
            if !a.backends.serves(BackendKind::Ebs) {
                refuse(ec2, not_served("EBS", "controller"));
            }
            kube_inapplicable(&a.kube, true, &mut refuse);
            if a.kube.no_loops {
                refuse(
                    &["gc_interval", "gc_delete_older_than"],
                    "the periodic gc reads the cluster through the loops' client, which --no-loops turns off".into(),
                );
            }
        }
        Command::Node(a) => {
            if !a.backends.serves(BackendKind::Nfs) {
                refuse(nfs_export, not_served("NFS", "node"));
            }
            if !a.backends.serves(BackendKind::Ebs) {
                refuse(ebs_node, not_served("EBS", "node"));
            }
            if !a.kubelet_registration {
                refuse(
                    &["kubelet_registration_path"],
                    "it is what stowage tells kubelet when it registers itself, and --kubelet-registration=false leaves registration to node-driver-registrar".into(),
                );
            }
        }
        Command::Local(a) => {
            if !a.backends.serves(BackendKind::Nfs) {
                refuse(nfs_export, not_served("NFS", "local"));
                refuse(nfs_client, not_served("NFS", "local"));
                refuse(&["data_dir", "nfs_bind"], not_served("NFS", "local"));
            } else if a.nfs_export.nfs_server.is_some() {
                refuse(
                    &["data_dir", "nfs_bind"],
                    "it configures the embedded NFS server, which does not start when --nfs-server/--nfs-share name an export of your own".into(),
                );
            }
            if !a.backends.serves(BackendKind::Ebs) {
                refuse(ec2, not_served("EBS", "local"));
                refuse(ebs_node, not_served("EBS", "local"));
            }
            kube_inapplicable(&a.kube, false, &mut refuse);
            if a.kube.kubeconfig.is_none() {
                refuse(
                    &["gc_interval", "gc_delete_older_than"],
                    "the periodic gc reads the cluster, which `local` reads only with --kubeconfig"
                        .into(),
                );
            }
        }
        Command::Gc(a) => {
            if !a.backends.serves(BackendKind::Nfs) {
                refuse(nfs_export, not_served("NFS", "gc"));
                refuse(nfs_client, not_served("NFS", "gc"));
            }
            if !a.backends.serves(BackendKind::Ebs) {
                refuse(&ec2[..5], not_served("EBS", "gc"));
            }
        }
        Command::NfsServer(_) | Command::Bench(_) | Command::Explain(_) => {}
    }
    out
}

/// The loop flags that do nothing: all but --kubeconfig without loops (`--no-loops`,
/// or `local` without --kubeconfig), the Lease's without --leader-election.
fn kube_inapplicable(
    kube: &KubeArgs,
    loops_by_default: bool,
    refuse: &mut impl FnMut(&[&'static str], String),
) {
    let leader = &[
        "leader_election_namespace",
        "leader_election_identity",
        "leader_election_owner_uid",
        "leader_election_lease_duration",
        "leader_election_renew_deadline",
        "leader_election_retry_period",
    ];
    let loops = &[
        "csi_address",
        "loops",
        "leader_election",
        "kube_api_qps",
        "kube_api_burst",
        "max_csi_calls",
        "retry_interval_start",
        "retry_interval_max",
        "annotation_grace",
        "csi_timeout",
        "stuck_after",
    ];
    let runs_loops = if loops_by_default {
        !kube.no_loops
    } else {
        kube.kubeconfig.is_some()
    };
    if !loops_by_default {
        refuse(
            &["no_loops"],
            "`local` runs the Kubernetes loops only with --kubeconfig: leave both out to serve CSI alone".into(),
        );
    }
    if !runs_loops {
        let why = if loops_by_default {
            "it configures the Kubernetes loops, which --no-loops turns off"
        } else {
            "it configures the Kubernetes loops, which `local` runs only with --kubeconfig"
        };
        refuse(loops, why.into());
        refuse(leader, why.into());
    } else if !kube.leader_election {
        refuse(
            leader,
            "it configures the leader election, which runs only with --leader-election".into(),
        );
    }
}

/// Refuse each [`inapplicable`] flag given on the command line, naming it and why.
fn refuse_inapplicable(command: &Command, matches: &clap::ArgMatches) -> Result<(), String> {
    use clap::CommandFactory;
    let root = Cli::command();
    let sub_name = matches_name(command);
    let sub = root
        .find_subcommand(sub_name)
        .expect("every Command has a subcommand");
    let mut seen = std::collections::BTreeSet::new();
    let refused: Vec<String> = inapplicable(command)
        .into_iter()
        .filter(|(id, _)| seen.insert(*id))
        .filter(|(id, _)| {
            matches.try_contains_id(id).unwrap_or(false)
                && matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine)
        })
        .map(|(id, why)| {
            let long = sub
                .get_arguments()
                .find(|a| a.get_id() == id)
                .and_then(|a| a.get_long())
                .unwrap_or(id);
            format!("--{long} does nothing here: {why}")
        })
        .collect();
    if refused.is_empty() {
        Ok(())
    } else {
        Err(refused.join("\n"))
    }
}

/// The subcommand's name on the command line.
pub fn matches_name(command: &Command) -> &'static str {
    match command {
        Command::Controller(_) => "controller",
        Command::Node(_) => "node",
        Command::Local(_) => "local",
        Command::NfsServer(_) => "nfs-server",
        Command::Bench(_) => "bench",
        Command::Gc(_) => "gc",
        Command::Explain(_) => "explain",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_local_with_defaults() {
        let cli = Cli::try_parse_from(["stowage", "local"]).unwrap();
        let Command::Local(args) = cli.command else {
            panic!("not local")
        };
        assert_eq!(args.data_dir, PathBuf::from("./stowage-data"));
        assert_eq!(args.common.driver_name, DEFAULT_DRIVER_NAME);
        assert_eq!(args.nfs_client.nfs_timeout, Duration::from_secs(10));
    }

    #[test]
    fn node_defaults_to_the_kubelet_dir() {
        let cli = Cli::try_parse_from(["stowage", "node"]).unwrap();
        let Command::Node(args) = cli.command else {
            panic!("not node")
        };
        assert_eq!(args.kubelet_dir, PathBuf::from(DEFAULT_KUBELET_DIR));
        assert!(args.kubelet_registration);
        assert_eq!(
            default_endpoint("node", "d.example"),
            "unix:///var/lib/kubelet/plugins/d.example/csi.sock"
        );
    }

    #[test]
    fn every_flag_named_as_inapplicable_exists() {
        use clap::CommandFactory;
        let root = Cli::command();
        for name in ["controller", "node", "local"] {
            let cli = parse_from(["stowage", name, "--backend", "ebs"]).unwrap();
            let sub = root.find_subcommand(name).unwrap();
            for (id, _) in inapplicable(&cli.command) {
                assert!(
                    sub.get_arguments().any(|a| a.get_id() == id),
                    "`stowage {name}` has no argument {id}"
                );
            }
        }
    }

    #[test]
    fn nfs_server_needs_share() {
        assert!(
            Cli::try_parse_from(["stowage", "controller", "--nfs-server", "10.0.0.1"]).is_err()
        );
    }
}
