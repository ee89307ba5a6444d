//! Wiring only: build the backends for a role, bind the socket, serve, and shut down
//! cleanly on SIGINT/SIGTERM (in-flight calls finish, the socket file is removed).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{
    BackendKind, CommonArgs, ControllerArgs, EbsArgs, KubeArgs, LocalArgs, NfsArgs, NfsServerArgs,
    NodeArgs, default_endpoint, node_socket,
};
use stowage_api::metrics::Metrics;
use stowage_driver::backend::ebs::EbsBackend;
use stowage_driver::backend::ebs::cloud::{Cloud, Ec2Settings};
use stowage_driver::backend::ebs::metadata::{InstanceMetadata, KnownMetadata, metadata};
use stowage_driver::backend::nfs::{DefaultExport, NfsBackend, NfsConfig};
use stowage_driver::backend::{Backend, Backends};
use stowage_driver::csi::PluginInfo;
use stowage_driver::csi::controller::ControllerService;
use stowage_driver::csi::identity::IdentityService;
use stowage_driver::csi::node::{NodeConfig, NodeService};
use stowage_driver::csi::registration::{KubeletRegistration, registration_socket};
use stowage_driver::csi::server::{self, Services};
use stowage_driver::node::{Mounter, SystemMounter};
use stowage_nfs::client::{ClientConfig, NfsTarget};
use stowage_nfs::server::EmbeddedServer;

/// What one serving process runs.
pub struct Plan {
    pub socket: PathBuf,
    pub driver_name: String,
    pub backends: Backends,
    pub controller: bool,
    /// Serve the Node service as this node.
    pub node: Option<NodeConfig>,
    pub mounter: Arc<dyn Mounter>,
    pub http_addr: Option<std::net::SocketAddr>,
    /// How long shutdown waits for connected clients.
    pub shutdown_grace: Duration,
}

/// A serving process: stop it to shut down and remove the socket.
pub struct Running {
    pub socket: PathBuf,
    /// The process's metrics (other parts register theirs here).
    pub metrics: Arc<Metrics>,
    pub http_addr: Option<std::net::SocketAddr>,
    stop: watch::Sender<bool>,
    shutdown_grace: Duration,
    /// Resolves with the CSI server's result when its thread ends.
    grpc: tokio::sync::oneshot::Receiver<Result<(), tonic::transport::Error>>,
    http: Option<JoinHandle<std::io::Result<()>>>,
    /// kubelet's plugin registration: its socket and the task serving it.
    registration: Option<(PathBuf, JoinHandle<Result<(), tonic::transport::Error>>)>,
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// The CSI server gets a thread with its own single-threaded runtime: a request's
/// decoding, backend calls and reply run on one thread and never wait for another
/// worker to wake up. Backend calls are I/O-bound, so one thread serves many requests
/// at once; handlers must not block (blocking work goes to `spawn_blocking`).
/// Returns once the socket is bound.
async fn spawn_csi_thread(
    socket: PathBuf,
    services: Services,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<tokio::sync::oneshot::Receiver<Result<(), tonic::transport::Error>>> {
    let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("csi-server".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    let _ = bound_tx.send(Err(
                        anyhow::Error::new(e).context("building the CSI runtime")
                    ));
                    return;
                }
            };
            runtime.block_on(async move {
                let listener = match server::bind(&socket) {
                    Ok(listener) => listener,
                    Err(e) => {
                        let context = format!("binding CSI socket {}", socket.display());
                        let _ = bound_tx.send(Err(anyhow::Error::new(e).context(context)));
                        return;
                    }
                };
                let _ = bound_tx.send(Ok(()));
                let result = server::serve(listener, services, stopped(stop)).await;
                let _ = done_tx.send(result);
            })
        })?;
    match bound_rx.await {
        Ok(Ok(())) => Ok(done_rx),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(anyhow::anyhow!(
            "the CSI server thread exited before binding"
        )),
    }
}

/// Bind and serve a plan.
pub async fn start(plan: Plan) -> anyhow::Result<Running> {
    let metrics = Metrics::new(&plan.driver_name);
    let counted = plan.backends.clone();
    metrics.register_api_calls(move || {
        counted
            .iter()
            .flat_map(|b| {
                b.api_calls()
                    .into_iter()
                    .map(|(action, calls)| (b.kind().to_owned(), action, calls))
            })
            .collect()
    });
    let info = PluginInfo {
        name: plan.driver_name.clone(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    let services = Services {
        identity: IdentityService::new(
            info,
            plan.controller,
            plan.backends.any_attach(),
            plan.backends.any_expand(),
            Arc::clone(&metrics),
        ),
        controller: plan
            .controller
            .then(|| ControllerService::new(plan.backends.clone(), Arc::clone(&metrics))),
        node: plan.node.clone().map(|node| {
            NodeService::new(
                node,
                plan.backends.clone(),
                Arc::clone(&plan.mounter),
                Arc::clone(&metrics),
            )
        }),
    };
    let (stop, rx) = watch::channel(false);
    let (http, http_addr) = match plan.http_addr {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding --http-addr {addr}"))?;
            let bound = listener.local_addr()?;
            let task = tokio::spawn(crate::http::serve(
                listener,
                Arc::clone(&metrics),
                stopped(rx.clone()),
            ));
            (Some(task), Some(bound))
        }
        None => (None, None),
    };
    let grpc = spawn_csi_thread(plan.socket.clone(), services, rx).await?;
    Ok(Running {
        metrics,
        shutdown_grace: plan.shutdown_grace,
        socket: plan.socket,
        http_addr,
        stop,
        grpc,
        http,
        registration: None,
    })
}

impl Running {
    /// Serve kubelet's plugin registration on its socket (bound before this returns),
    /// until stopped.
    pub fn serve_registration(&mut self, registration: KubeletRegistration) -> anyhow::Result<()> {
        let path = registration.socket().to_path_buf();
        let listener = server::bind(&path)
            .with_context(|| format!("binding the registration socket {}", path.display()))?;
        tracing::info!(socket = %path.display(), "waiting for kubelet to register the plugin");
        let task = tokio::spawn(server::serve_registration(
            listener,
            registration,
            stopped(self.stop.subscribe()),
        ));
        self.registration = Some((path, task));
        Ok(())
    }

    /// Stop serving, wait for in-flight calls, remove the sockets (the registration
    /// socket first: kubelet then deregisters the plugin before its socket goes).
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        if let Some((path, task)) = self.registration {
            remove_socket(&path)?;
            match tokio::time::timeout(self.shutdown_grace, task).await {
                Ok(joined) => joined?.context("registration server")?,
                Err(_) => tracing::warn!(
                    "kubelet still connected to the registration socket; stopping anyway"
                ),
            }
        }
        // Graceful shutdown waits for clients to hang up; one that never does must
        // not keep the process from exiting (the thread is left to die with it).
        match tokio::time::timeout(self.shutdown_grace, self.grpc).await {
            Ok(done) => done
                .map_err(|_| anyhow::anyhow!("the CSI server thread ended without a result"))?
                .context("CSI server")?,
            Err(_) => {
                tracing::warn!(grace = ?self.shutdown_grace, "CSI clients still connected after the grace period; stopping anyway")
            }
        }
        if let Some(http) = self.http {
            match tokio::time::timeout(self.shutdown_grace, http).await {
                Ok(joined) => joined?.context("metrics server")?,
                Err(_) => tracing::warn!("metrics clients still connected; stopping anyway"),
            }
        }
        remove_socket(&self.socket)
    }

    /// Serve until SIGINT/SIGTERM, then stop.
    pub async fn until_signal(self, signals: ShutdownSignals) -> anyhow::Result<()> {
        signals.wait().await;
        tracing::info!("shutting down");
        self.stop().await
    }
}

fn remove_socket(path: &std::path::Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(anyhow::Error::new(e).context(format!("removing {}", path.display())))
        }
        _ => Ok(()),
    }
}

/// SIGINT and SIGTERM, caught from the moment this is made: before anything serves,
/// so a signal that arrives early is never the default "terminate at once".
pub struct ShutdownSignals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    pub fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    async fn wait(mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

fn client_config(nfs: &NfsArgs) -> ClientConfig {
    ClientConfig {
        call_timeout: nfs.nfs_timeout,
        max_connections: nfs.nfs_connections,
        privileged_port: nix::unistd::geteuid().is_root(),
        ..ClientConfig::default()
    }
}

/// The NFS backend with an optional default export from flags.
async fn nfs_backend(
    nfs: &NfsArgs,
    local: Option<(NfsTarget, PathBuf)>,
) -> anyhow::Result<NfsBackend> {
    let default_export = match (local, &nfs.nfs_server, &nfs.nfs_share) {
        (Some((target, dir)), _, _) => Some(DefaultExport {
            target,
            local_dir: Some(dir),
        }),
        (None, Some(server), Some(share)) => {
            let address = tokio::net::lookup_host((server.as_str(), 0))
                .await
                .with_context(|| format!("resolving --nfs-server {server}"))?
                .next()
                .with_context(|| format!("--nfs-server {server} has no address"))?
                .ip();
            Some(DefaultExport {
                target: NfsTarget {
                    server: address,
                    share: share.clone(),
                    port: None,
                },
                local_dir: None,
            })
        }
        _ => None,
    };
    Ok(NfsBackend::new(NfsConfig {
        default_export,
        client: client_config(nfs),
        resolve_timeout: Duration::from_secs(5),
    }))
}

fn socket(common: &CommonArgs, role: &str) -> anyhow::Result<PathBuf> {
    let endpoint = common
        .endpoint
        .clone()
        .unwrap_or_else(|| default_endpoint(role, &common.driver_name));
    server::socket_path(&endpoint).map_err(anyhow::Error::msg)
}

fn ec2_settings(ebs: &EbsArgs) -> Ec2Settings {
    Ec2Settings {
        region: ebs.region.clone(),
        endpoint: ebs.ebs_endpoint.clone(),
        cluster_id: ebs.cluster_id.clone(),
        max_attempts: ebs.ec2_max_attempts,
        call_timeout: ebs.ec2_timeout,
        ..Ec2Settings::default()
    }
}

/// The backends a role serves, in the order given (the first is the default).
async fn backends(
    kinds: &[BackendKind],
    nfs: Option<NfsBackend>,
    ebs: &EbsArgs,
) -> anyhow::Result<Backends> {
    let mut nfs = nfs;
    let mut list: Vec<Arc<dyn Backend>> = Vec::new();
    for kind in kinds {
        match kind {
            BackendKind::Nfs => {
                if let Some(backend) = nfs.take() {
                    list.push(Arc::new(backend));
                }
            }
            BackendKind::Ebs => {
                let cloud = Arc::new(Cloud::new(ec2_settings(ebs)).await);
                list.push(Arc::new(EbsBackend::new(cloud, ebs.zone.clone())));
            }
        }
    }
    anyhow::ensure!(
        !list.is_empty(),
        "no backend configured (--backend nfs|ebs)"
    );
    Ok(Backends::new(list))
}

/// Node identity and limits: with EBS, the instance (flags first, then IMDSv2).
async fn node_config(
    kinds: &[BackendKind],
    node_id: Option<String>,
    ebs: &EbsArgs,
) -> anyhow::Result<NodeConfig> {
    let mut config = NodeConfig::new(node_id.clone().unwrap_or_default());
    config.by_id_dir = ebs.by_id_dir.clone();
    if kinds.contains(&BackendKind::Ebs) {
        let known = KnownMetadata {
            instance_id: ebs.instance_id.clone(),
            zone: ebs.zone.clone(),
            instance_type: ebs.instance_type.clone(),
        };
        let instance = metadata(&known)
            .await
            .context("reading this node's instance metadata")?;
        let InstanceMetadata {
            instance_id,
            zone,
            instance_type,
        } = instance;
        if node_id.is_none() {
            config.node_id = instance_id;
        }
        config.topology = Some(stowage_api::volume::Segments::from([(
            stowage_driver::backend::ebs::ZONE_KEY.to_owned(),
            zone,
        )]));
        config.max_volumes = ebs.max_volumes.unwrap_or_else(|| {
            stowage_driver::backend::ebs::metadata::attach_limit(&instance_type)
        });
    }
    anyhow::ensure!(!config.node_id.is_empty(), "--node-id is required");
    Ok(config)
}

pub async fn controller(args: ControllerArgs, signals: ShutdownSignals) -> anyhow::Result<()> {
    let nfs = nfs_backend(&args.storage.nfs, None).await?;
    let running = start(Plan {
        socket: socket(&args.common, "controller")?,
        driver_name: args.common.driver_name.clone(),
        backends: backends(&args.storage.backends, Some(nfs), &args.storage.ebs).await?,
        controller: true,
        node: None,
        mounter: Arc::new(SystemMounter::default()),
        http_addr: args.common.http_addr,
        shutdown_grace: args.common.shutdown_grace,
    })
    .await?;
    tracing::info!(socket = %running.socket.display(), "controller serving");
    if args.kube.no_loops {
        return running.until_signal(signals).await;
    }
    let loops = start_loops(&args.kube, &running, &args.common.driver_name).await;
    let loops = match loops {
        Ok(loops) => loops,
        Err(e) => {
            let _ = running.stop().await;
            return Err(e);
        }
    };
    serve_with_loops(running, Some(loops), signals).await
}

/// The Kubernetes loops running beside a CSI server.
pub struct KubeLoops {
    stop: watch::Sender<bool>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl KubeLoops {
    /// Stop the loops (handing back the leader Lease) and wait for them.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        self.task.await.context("the loops task")?
    }
}

/// Start the provisioner/attacher/resizer loops per `args`, driving the CSI socket
/// `--csi-address` (default: the process's own).
pub async fn start_loops(
    args: &KubeArgs,
    running: &Running,
    driver_name: &str,
) -> anyhow::Result<KubeLoops> {
    use stowage_loops::{LoopMetrics, Settings, csi_client::Csi, kube_client, leader, queue};
    let config = kube_client::config(args.kubeconfig.as_deref()).await?;
    let metrics = LoopMetrics::register(&running.metrics);
    let kube = kube_client::client(
        config,
        args.kube_api_qps,
        args.kube_api_burst,
        metrics.requests.clone(),
    )?;
    add_api_ready_check(&running.metrics, kube.clone());
    let socket = match &args.csi_address {
        Some(address) => server::socket_path(address).map_err(anyhow::Error::msg)?,
        None => running.socket.clone(),
    };
    let csi = Csi::connect(
        &socket,
        args.max_csi_calls,
        args.csi_timeout,
        Duration::from_secs(30),
    )
    .await?;
    anyhow::ensure!(
        csi.caps.create_delete,
        "the CSI driver at {} cannot create volumes (no CREATE_DELETE_VOLUME capability)",
        socket.display()
    );
    if csi.caps.driver_name != driver_name {
        tracing::info!(driver = %csi.caps.driver_name, "the loops act for the driver at --csi-address");
    }
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let settings = Settings {
        loops: args.loops.clone(),
        backoff: queue::Backoff {
            start: args.retry_interval_start,
            max: args.retry_interval_max,
        },
        workers: args.max_csi_calls,
        annotation_grace: args.annotation_grace,
        identity: stowage_loops::rules::provisioner_identity(
            &csi.caps.driver_name,
            i64::try_from(started.as_millis()).unwrap_or(i64::MAX),
            u16::try_from(started.subsec_nanos() % 10_000).unwrap_or(0),
        ),
    };
    let pod_namespace = std::env::var("POD_NAMESPACE").ok().or_else(|| {
        std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
            .ok()
            .map(|s| s.trim().to_owned())
    });
    let lease_namespace = args
        .leader_election_namespace
        .clone()
        .or_else(|| pod_namespace.clone())
        .unwrap_or_else(|| "default".to_owned());
    let election = args.leader_election.then(|| leader::Election {
        owner: match (
            &args.leader_election_owner_uid,
            &args.leader_election_identity,
        ) {
            (Some(uid), Some(pod))
                if pod_namespace.as_deref() == Some(lease_namespace.as_str()) =>
            {
                Some(leader::PodOwner {
                    name: pod.clone(),
                    uid: uid.clone(),
                })
            }
            _ => None,
        },
        namespace: lease_namespace,
        name: csi.caps.driver_name.replace(['.', '/'], "-"),
        identity: args.leader_election_identity.clone().unwrap_or_else(|| {
            let host = nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_else(|_| "stowage".to_owned());
            format!("{host}_{}", std::process::id())
        }),
        lease_duration: args.leader_election_lease_duration,
        renew_deadline: args.leader_election_renew_deadline,
        retry_period: args.leader_election_retry_period,
    });
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(stowage_loops::run(
        kube, csi, settings, metrics, election, stopped,
    ));
    Ok(KubeLoops { stop, task })
}

/// How long `/readyz` waits for the API server (kubelet's probe gives up after 3 s).
const API_READY_TIMEOUT: Duration = Duration::from_secs(2);

/// `/readyz` fails while the API server does not answer: asked on each probe (one GET
/// `/version`) over the loops' own client, so a connection they cannot use shows too.
/// Leader or not, a replica that cannot reach the API server cannot do its work.
fn add_api_ready_check(metrics: &Metrics, kube: kube::Client) {
    metrics.add_ready_check(move || {
        let kube = kube.clone();
        Box::pin(async move {
            match tokio::time::timeout(API_READY_TIMEOUT, kube.apiserver_version()).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(error)) => Err(format!(
                    "the Kubernetes API server does not answer: {error}"
                )),
                Err(_) => Err(format!(
                    "the Kubernetes API server did not answer within {API_READY_TIMEOUT:?}"
                )),
            }
        })
    });
}

/// Serve until a signal (or until the loops fail), then stop the loops and the server.
async fn serve_with_loops(
    running: Running,
    loops: Option<KubeLoops>,
    signals: ShutdownSignals,
) -> anyhow::Result<()> {
    let Some(mut loops) = loops else {
        return running.until_signal(signals).await;
    };
    let failed = tokio::select! {
        _ = signals.wait() => None,
        result = &mut loops.task => Some(result),
    };
    tracing::info!("shutting down");
    let loops_result = match failed {
        None => loops.stop().await,
        Some(result) => result
            .context("the loops task")
            .and_then(|r| r)
            .and_then(|()| Err(anyhow::anyhow!("the Kubernetes loops ended"))),
    };
    running.stop().await?;
    loops_result
}

pub async fn node(args: NodeArgs, signals: ShutdownSignals) -> anyhow::Result<()> {
    let kubelet_dir = std::path::absolute(&args.kubelet_dir)
        .with_context(|| format!("--kubelet-dir {}", args.kubelet_dir.display()))?;
    let driver_name = args.common.driver_name.clone();
    let nfs = nfs_backend(&args.storage.nfs, None).await?;
    let mut node = node_config(
        &args.storage.backends,
        args.node_id.clone(),
        &args.storage.ebs,
    )
    .await?;
    node.kubelet_dir = kubelet_dir.clone();
    let node_id = node.node_id.clone();
    let socket = match &args.common.endpoint {
        Some(endpoint) => server::socket_path(endpoint).map_err(anyhow::Error::msg)?,
        None => node_socket(&kubelet_dir, &driver_name),
    };
    let mut running = start(Plan {
        socket,
        driver_name: driver_name.clone(),
        backends: backends(&args.storage.backends, Some(nfs), &args.storage.ebs).await?,
        controller: false,
        node: Some(node),
        mounter: Arc::new(SystemMounter::default()),
        http_addr: args.common.http_addr,
        shutdown_grace: args.common.shutdown_grace,
    })
    .await?;
    if args.kubelet_registration {
        let endpoint = args
            .kubelet_registration_path
            .clone()
            .unwrap_or_else(|| running.socket.clone());
        let registration = KubeletRegistration::new(
            &driver_name,
            &endpoint,
            registration_socket(&kubelet_dir, &driver_name),
            &running.metrics,
        );
        if let Err(e) = running.serve_registration(registration) {
            running.stop().await?;
            return Err(e);
        }
    }
    tracing::info!(
        socket = %running.socket.display(),
        node = %node_id,
        kubelet_dir = %kubelet_dir.display(),
        http_addr = %running.http_addr.map(|a| a.to_string()).unwrap_or_default(),
        "node plugin serving"
    );
    running.until_signal(signals).await
}

/// `stowage local` up and running: the CSI socket plus the embedded NFS server.
pub struct LocalStack {
    pub running: Running,
    pub nfs: EmbeddedServer,
    /// The node service acts only on paths under this directory.
    pub kubelet_dir: PathBuf,
}

/// Start `stowage local` (used by `main` and by the tests).
pub async fn start_local(args: LocalArgs) -> anyhow::Result<LocalStack> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating --data-dir {}", args.data_dir.display()))?;
    let data_dir = std::fs::canonicalize(&args.data_dir)?;
    let nfs = EmbeddedServer::start(data_dir.clone(), args.nfs_bind)
        .await
        .with_context(|| format!("starting the embedded NFS server on {}", args.nfs_bind))?;
    let target = NfsTarget {
        server: nfs.local_addr().ip(),
        share: nfs.export_path().to_owned(),
        port: Some(nfs.local_addr().port()),
    };
    let mut client_args = args.storage.nfs.clone();
    client_args.nfs_server = None;
    let nfs_backend = nfs_backend(&client_args, Some((target, data_dir))).await?;
    let node_id = match args.node_id.clone() {
        Some(id) => Some(id),
        None if args.storage.backends.contains(&BackendKind::Ebs) => None,
        None => Some(nix::unistd::gethostname()?.to_string_lossy().into_owned()),
    };
    let mut node = node_config(&args.storage.backends, node_id, &args.storage.ebs).await?;
    let socket = socket(&args.common, "local")?;
    let kubelet_dir = match &args.kubelet_dir {
        Some(dir) => dir.clone(),
        None => socket
            .parent()
            .map(std::path::Path::to_path_buf)
            .context("the CSI socket has no directory")?,
    };
    node.kubelet_dir = std::path::absolute(&kubelet_dir)
        .with_context(|| format!("--kubelet-dir {}", kubelet_dir.display()))?;
    let node_kubelet_dir = node.kubelet_dir.clone();
    let running = start(Plan {
        socket,
        driver_name: args.common.driver_name.clone(),
        backends: backends(&args.storage.backends, Some(nfs_backend), &args.storage.ebs).await?,
        controller: true,
        node: Some(node),
        mounter: Arc::new(SystemMounter::default()),
        http_addr: args.common.http_addr,
        shutdown_grace: args.common.shutdown_grace,
    })
    .await?;
    Ok(LocalStack {
        running,
        nfs,
        kubelet_dir: node_kubelet_dir,
    })
}

pub async fn local(args: LocalArgs, signals: ShutdownSignals) -> anyhow::Result<()> {
    let args_kube = args.kube.clone();
    let driver_name = args.common.driver_name.clone();
    let stack = start_local(args).await?;
    println!(
        "stowage local: CSI endpoint unix://{}  (NFS export {}:{} → {}; node paths under {})",
        stack.running.socket.display(),
        stack.nfs.local_addr(),
        stack.nfs.export_path(),
        stack.nfs.dir().display(),
        stack.kubelet_dir.display()
    );
    if let Some(addr) = stack.running.http_addr {
        println!("stowage local: metrics on http://{addr}/metrics");
    }
    let loops = match &args_kube.kubeconfig {
        Some(_) if args_kube.no_loops => None,
        Some(path) => {
            println!(
                "stowage local: provisioning for the cluster in {}",
                path.display()
            );
            match start_loops(&args_kube, &stack.running, &driver_name).await {
                Ok(loops) => Some(loops),
                Err(e) => {
                    let _ = stack.running.stop().await;
                    stack.nfs.shutdown().await;
                    return Err(e);
                }
            }
        }
        None => None,
    };
    let result = serve_with_loops(stack.running, loops, signals).await;
    stack.nfs.shutdown().await;
    result
}

/// `stowage nfs-server`: the embedded NFSv3 server alone, exporting one directory.
pub async fn nfs_server(args: NfsServerArgs, signals: ShutdownSignals) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating --data-dir {}", args.data_dir.display()))?;
    let dir = std::fs::canonicalize(&args.data_dir)?;
    let nfs = EmbeddedServer::start(dir.clone(), args.bind)
        .await
        .with_context(|| format!("starting the NFS server on {}", args.bind))?;
    let (stop, rx) = watch::channel(false);
    let http = match args.http_addr {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding --http-addr {addr}"))?;
            let metrics = Metrics::new("nfs-server");
            Some(tokio::spawn(crate::http::serve(
                listener,
                metrics,
                stopped(rx),
            )))
        }
        None => None,
    };
    println!(
        "stowage nfs-server: exporting {} as {} on {}",
        dir.display(),
        nfs.export_path(),
        nfs.local_addr()
    );
    signals.wait().await;
    tracing::info!("shutting down");
    let _ = stop.send(true);
    nfs.shutdown().await;
    if let Some(http) = http {
        http.await?.context("metrics server")?;
    }
    Ok(())
}
