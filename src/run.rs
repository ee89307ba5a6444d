//! Wiring only: from a role's resolved settings (`settings`, its only input) build
//! the backends, bind the sockets, serve, and shut down cleanly on SIGINT/SIGTERM
//! (in-flight calls finish, the socket files are removed).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::NfsServerArgs;
use crate::{health, settings};
use stowage_api::keys::DriverNames;
use stowage_api::metrics::Metrics;
use stowage_driver::backend::ebs::EbsBackend;
use stowage_driver::backend::ebs::cloud::Cloud;
use stowage_driver::backend::ebs::metadata::{InstanceMetadata, metadata};
use stowage_driver::backend::nfs::{DefaultExport, NfsBackend, NfsConfig};
use stowage_driver::backend::{Backend, Backends};
use stowage_driver::csi::PluginInfo;
use stowage_driver::csi::controller::ControllerService;
use stowage_driver::csi::identity::IdentityService;
use stowage_driver::csi::node::{NodeConfig, NodeService};
use stowage_driver::csi::registration::KubeletRegistration;
use stowage_driver::csi::server::{self, Services};
use stowage_driver::node::{Mounter, SystemMounter};
use stowage_loops::Activity;
use stowage_nfs::client::{ClientConfig, NfsTarget};
use stowage_nfs::server::EmbeddedServer;

/// `--backend-check-interval`'s default.
pub const DEFAULT_BACKEND_CHECK_INTERVAL: Duration = Duration::from_secs(30);

/// What one serving process runs.
pub struct Plan {
    pub socket: PathBuf,
    pub driver_name: String,
    pub backends: Backends,
    pub controller: bool,
    /// Serve the Node service as this node.
    pub node: Option<NodeConfig>,
    /// With `node`: the NFS-only driver name's own socket (see [`NfsNodeSocket`]).
    pub nfs_node: Option<NfsNodeSocket>,
    pub mounter: Arc<dyn Mounter>,
    pub http_addr: Option<std::net::SocketAddr>,
    /// How long shutdown waits for connected clients.
    pub shutdown_grace: Duration,
    /// How often the Controller service checks its backends.
    pub backend_check_interval: Duration,
}

/// The node plugin's second CSI socket, for `--nfs-driver-name`: kubelet asks each
/// registered name's socket for NodeGetInfo, and the NFS name must report no volume
/// limit (EBS's attach limit is the main name's). It serves Identity (the NFS name) and
/// Node with the NFS backend only, so an EBS volume provisioned under the NFS name
/// (which nothing would attach) is refused there by name.
#[derive(Debug, Clone)]
pub struct NfsNodeSocket {
    pub driver_name: String,
    pub socket: PathBuf,
}

/// A serving process: stop it to shut down and remove the socket.
pub struct Running {
    pub socket: PathBuf,
    /// The process's metrics (other parts register theirs here).
    pub metrics: Arc<Metrics>,
    /// The loops' work and failures (`/debug/attempts`); empty without loops.
    pub activity: Activity,
    /// The backends it serves.
    pub backends: Backends,
    pub http_addr: Option<std::net::SocketAddr>,
    stop: watch::Sender<bool>,
    shutdown_grace: Duration,
    /// Resolves with the CSI server's result when its thread ends.
    grpc: CsiServerDone,
    http: Option<JoinHandle<std::io::Result<()>>>,
    /// The NFS-only name's CSI socket and its server thread's result.
    nfs_node: Option<(PathBuf, CsiServerDone)>,
    /// kubelet's plugin registrations (one per driver name): socket and serving task.
    registrations: Vec<(PathBuf, JoinHandle<Result<(), tonic::transport::Error>>)>,
}

/// Resolves with a CSI server's result when its thread ends.
type CsiServerDone = tokio::sync::oneshot::Receiver<Result<(), tonic::transport::Error>>;

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
) -> anyhow::Result<CsiServerDone> {
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

/// The CSI services one socket serves as `driver_name`: Identity with the capabilities
/// of `backends`, Controller when `controller`, Node when `node` is given.
fn csi_services(
    driver_name: &str,
    backends: &Backends,
    controller: bool,
    node: Option<NodeConfig>,
    (mounter, metrics): (&Arc<dyn Mounter>, &Arc<Metrics>),
) -> Services {
    let info = PluginInfo {
        name: driver_name.to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    Services {
        identity: IdentityService::new(
            info,
            controller,
            backends.any_attach(),
            backends.any_expand(),
            Arc::clone(metrics),
        ),
        controller: controller
            .then(|| ControllerService::new(backends.clone(), Arc::clone(metrics))),
        node: node.map(|node| {
            NodeService::new(
                node,
                backends.clone(),
                Arc::clone(mounter),
                Arc::clone(metrics),
            )
        }),
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
    let services = csi_services(
        &plan.driver_name,
        &plan.backends,
        plan.controller,
        plan.node.clone(),
        (&plan.mounter, &metrics),
    );
    let (stop, rx) = watch::channel(false);
    let activity = Activity::default();
    let (http, http_addr) = match plan.http_addr {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding --http-addr {addr}"))?;
            let bound = listener.local_addr()?;
            let task = tokio::spawn(crate::http::serve(
                listener,
                (Arc::clone(&metrics), activity.clone()),
                stopped(rx.clone()),
            ));
            (Some(task), Some(bound))
        }
        None => (None, None),
    };
    let grpc = spawn_csi_thread(plan.socket.clone(), services, rx.clone()).await?;
    health::add_probe_health_check(&metrics, plan.socket.clone());
    let nfs_node = match (&plan.nfs_node, &plan.node) {
        (Some(nfs), Some(node)) => {
            let backends = Backends::new(
                plan.backends
                    .iter()
                    .filter(|b| b.kind() == "nfs")
                    .map(Arc::clone)
                    .collect(),
            );
            let node = NodeConfig {
                max_volumes: 0,
                ..node.clone()
            };
            let services = csi_services(
                &nfs.driver_name,
                &backends,
                false,
                Some(node),
                (&plan.mounter, &metrics),
            );
            let done = spawn_csi_thread(nfs.socket.clone(), services, rx).await?;
            health::add_probe_health_check(&metrics, nfs.socket.clone());
            Some((nfs.socket.clone(), done))
        }
        _ => None,
    };
    if plan.controller {
        health::spawn_backend_checks(
            &metrics,
            (plan.backends.clone(), plan.backend_check_interval),
            stop.subscribe(),
        );
    }
    Ok(Running {
        metrics,
        activity,
        backends: plan.backends.clone(),
        shutdown_grace: plan.shutdown_grace,
        socket: plan.socket,
        http_addr,
        stop,
        grpc,
        nfs_node,
        http,
        registrations: Vec::new(),
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
        self.registrations.push((path, task));
        Ok(())
    }

    /// Stop serving, wait for in-flight calls, remove the sockets (the registration
    /// socket first: kubelet then deregisters the plugin before its socket goes).
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        for (path, task) in self.registrations {
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
        let mut servers = vec![(self.socket.clone(), self.grpc)];
        servers.extend(self.nfs_node);
        for (socket, grpc) in servers {
            match tokio::time::timeout(self.shutdown_grace, grpc).await {
                Ok(done) => done
                    .map_err(|_| anyhow::anyhow!("the CSI server thread ended without a result"))?
                    .with_context(|| format!("CSI server on {}", socket.display()))?,
                Err(_) => {
                    tracing::warn!(grace = ?self.shutdown_grace, socket = %socket.display(), "CSI clients still connected after the grace period; stopping anyway")
                }
            }
            if socket != self.socket {
                remove_socket(&socket)?;
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

/// The NFS backend; its default export resolved (a name looked up, the embedded
/// server started: returned so it can be shut down).
async fn nfs_backend(nfs: &settings::Nfs) -> anyhow::Result<(NfsBackend, Option<EmbeddedServer>)> {
    let (default_export, embedded) = match &nfs.default_export {
        None => (None, None),
        Some(settings::Export::Remote { server, share }) => {
            let address = tokio::net::lookup_host((server.as_str(), 0))
                .await
                .with_context(|| format!("resolving --nfs-server {server}"))?
                .next()
                .with_context(|| format!("--nfs-server {server} has no address"))?
                .ip();
            let export = DefaultExport {
                target: NfsTarget {
                    server: address,
                    share: share.clone(),
                    port: None,
                },
                local_dir: None,
            };
            (Some(export), None)
        }
        Some(settings::Export::Embedded { data_dir, bind }) => {
            std::fs::create_dir_all(data_dir)
                .with_context(|| format!("creating --data-dir {}", data_dir.display()))?;
            let data_dir = std::fs::canonicalize(data_dir)?;
            let server = EmbeddedServer::start(data_dir.clone(), *bind)
                .await
                .with_context(|| format!("starting the embedded NFS server on {bind}"))?;
            let export = DefaultExport {
                target: NfsTarget {
                    server: server.local_addr().ip(),
                    share: server.export_path().to_owned(),
                    port: Some(server.local_addr().port()),
                },
                local_dir: Some(data_dir),
            };
            (Some(export), Some(server))
        }
    };
    let client = ClientConfig {
        privileged_port: nix::unistd::geteuid().is_root(),
        ..nfs.client.clone().unwrap_or_default()
    };
    let backend = NfsBackend::new(NfsConfig {
        default_export,
        client,
        resolve_timeout: Duration::from_secs(5),
        copy_wait: stowage_driver::backend::nfs::DEFAULT_COPY_WAIT,
    });
    Ok((backend, embedded))
}

/// The backends a role serves, in the order given (the first is the default), and the
/// embedded NFS server when one was started for them.
pub async fn backends(
    list: &[settings::Backend],
) -> anyhow::Result<(Backends, Option<EmbeddedServer>)> {
    let mut embedded = None;
    let mut backends: Vec<Arc<dyn Backend>> = Vec::new();
    for backend in list {
        match backend {
            settings::Backend::Nfs(nfs) => {
                let (backend, server) = nfs_backend(nfs).await?;
                embedded = server;
                backends.push(Arc::new(backend));
            }
            settings::Backend::Ebs(ebs) => {
                // The node makes no EC2 calls: a client with the defaults, never used.
                let cloud = Cloud::new(ebs.ec2.clone().unwrap_or_default()).await;
                backends.push(Arc::new(EbsBackend::new(Arc::new(cloud), ebs.zone.clone())));
            }
        }
    }
    Ok((Backends::new(backends), embedded))
}

/// Node identity and limits: with EBS, the instance (flags first, then IMDSv2).
async fn node_config(role: settings::Role, node: &settings::Node) -> anyhow::Result<NodeConfig> {
    let node_id = match (&node.node_id, &node.ebs) {
        (Some(id), _) => id.clone(),
        (None, None) if role == settings::Role::Local => {
            nix::unistd::gethostname()?.to_string_lossy().into_owned()
        }
        (None, _) => String::new(),
    };
    let mut config = NodeConfig::new(node_id);
    config.kubelet_dir = node.kubelet_dir.clone();
    if let Some(ebs) = &node.ebs {
        config.by_id_dir = ebs.by_id_dir.clone();
        let instance = metadata(&ebs.known)
            .await
            .context("reading this node's instance metadata")?;
        let InstanceMetadata {
            instance_id,
            zone,
            instance_type,
        } = instance;
        if node.node_id.is_none() {
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

/// A serving role up and running: the CSI socket (and kubelet's registration socket),
/// plus the embedded NFS server when `local` started one.
pub struct Stack {
    pub running: Running,
    pub embedded: Option<EmbeddedServer>,
    pub settings: settings::Serve,
    /// The node id the Node service reports (resolved: flags, host name, metadata).
    pub node_id: Option<String>,
}

impl Stack {
    /// Stop serving and shut the embedded server down.
    pub async fn stop(self) -> anyhow::Result<()> {
        let result = self.running.stop().await;
        if let Some(embedded) = self.embedded {
            embedded.shutdown().await;
        }
        result
    }
}

/// Start a serving role (used by [`serve`] and by the tests): backends, the CSI socket,
/// kubelet's registration. The loops are [`start_loops`]'.
pub async fn start_stack(settings: settings::Serve) -> anyhow::Result<Stack> {
    let node = match &settings.node {
        Some(node) => Some(node_config(settings.role, node).await?),
        None => None,
    };
    let node_id = node.as_ref().map(|n| n.node_id.clone());
    let (backends, embedded) = backends(&settings.backends).await?;
    // The node plugin serves the NFS-only name on its own socket under the kubelet
    // directory (`local` mode has no kubelet to register with: one socket).
    let nfs_node = match (&settings.node, &settings.drivers.nfs) {
        (Some(node), Some(name))
            if settings.role == settings::Role::Node
                && backends.iter().any(|b| b.kind() == "nfs") =>
        {
            Some(NfsNodeSocket {
                driver_name: name.clone(),
                socket: crate::config::node_socket(&node.kubelet_dir, name),
            })
        }
        _ => None,
    };
    let started = start(Plan {
        socket: settings.socket.clone(),
        driver_name: settings.drivers.main.clone(),
        backends,
        controller: settings.controller(),
        node,
        nfs_node: nfs_node.clone(),
        mounter: Arc::new(SystemMounter::default()),
        http_addr: settings.http_addr,
        shutdown_grace: settings.shutdown_grace,
        backend_check_interval: settings.backend_check_interval,
    })
    .await;
    let mut running = match started {
        Ok(running) => running,
        Err(e) => {
            if let Some(embedded) = embedded {
                embedded.shutdown().await;
            }
            return Err(e);
        }
    };
    if let Some(settings::Node {
        registration: Some(path),
        kubelet_dir,
        ..
    }) = &settings.node
    {
        let endpoint = path.clone().unwrap_or_else(|| running.socket.clone());
        let mut names = vec![(settings.drivers.main.clone(), endpoint)];
        names.extend(nfs_node.map(|nfs| (nfs.driver_name, nfs.socket)));
        let registrations = KubeletRegistration::for_drivers(&names, kubelet_dir, &running.metrics);
        for registration in registrations {
            if let Err(e) = running.serve_registration(registration) {
                running.stop().await?;
                if let Some(embedded) = embedded {
                    embedded.shutdown().await;
                }
                return Err(e);
            }
        }
    }
    Ok(Stack {
        running,
        embedded,
        settings,
        node_id,
    })
}

/// Serve a role until SIGINT/SIGTERM (or until its loops fail).
pub async fn serve(settings: settings::Serve, signals: ShutdownSignals) -> anyhow::Result<()> {
    let stack = start_stack(settings).await?;
    announce(&stack);
    let loops = match &stack.settings.loops {
        Some(loops) => match start_loops(loops, &stack.running, &stack.settings.drivers).await {
            Ok(mut loops) => {
                if let Some(schedule) = stack.settings.gc.clone() {
                    loops.schedule_gc(schedule, &stack.running, &stack.settings.drivers);
                }
                Some(loops)
            }
            Err(e) => {
                let _ = stack.stop().await;
                return Err(e);
            }
        },
        None => None,
    };
    let Stack {
        running, embedded, ..
    } = stack;
    let result = serve_with_loops(running, loops, signals).await;
    if let Some(embedded) = embedded {
        embedded.shutdown().await;
    }
    result
}

/// What a starting role says: every role logs it; `local` also prints it (a person
/// started it).
fn announce(stack: &Stack) {
    let settings = &stack.settings;
    let socket = stack.running.socket.display();
    let default_export = settings.nfs().and_then(|n| n.default_export.as_ref());
    let export = match (&stack.embedded, default_export) {
        (Some(embedded), _) => Some(format!(
            "NFS export {}:{} → {} (embedded server)",
            embedded.local_addr(),
            embedded.export_path(),
            embedded.dir().display()
        )),
        (None, Some(settings::Export::Remote { server, share })) => {
            Some(format!("NFS export {server}:{share}"))
        }
        _ => None,
    };
    let kubelet_dir = settings
        .node
        .as_ref()
        .map(|n| n.kubelet_dir.display().to_string());
    let http_addr = stack
        .running
        .http_addr
        .map(|a| a.to_string())
        .unwrap_or_default();
    let export = export.as_deref().unwrap_or("none");
    let kubelet_dir_field = kubelet_dir.as_deref().unwrap_or("");
    let node = stack.node_id.as_deref().unwrap_or("");
    match settings.role {
        settings::Role::Controller => {
            tracing::info!(%socket, export, %http_addr, "controller serving");
        }
        settings::Role::Node => tracing::info!(
            %socket,
            node,
            kubelet_dir = kubelet_dir_field,
            %http_addr,
            "node plugin serving"
        ),
        settings::Role::Local => tracing::info!(
            %socket,
            node,
            export,
            kubelet_dir = kubelet_dir_field,
            %http_addr,
            "local serving"
        ),
    }
    let export = Some(export.to_owned()).filter(|e| e != "none");
    if settings.role == settings::Role::Local {
        let mut details: Vec<String> = export.into_iter().collect();
        details.extend(kubelet_dir.map(|d| format!("node paths under {d}")));
        println!(
            "stowage local: CSI endpoint unix://{socket}  ({})",
            details.join("; ")
        );
        if let Some(addr) = stack.running.http_addr {
            println!("stowage local: metrics on http://{addr}/metrics");
        }
        if let Some(loops) = &settings.loops {
            let config = loops
                .kubeconfig
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "the in-cluster config".into());
            println!("stowage local: provisioning for the cluster in {config}");
        }
    }
}

/// The Kubernetes loops running beside a CSI server.
pub struct KubeLoops {
    stop: watch::Sender<bool>,
    task: JoinHandle<anyhow::Result<()>>,
    /// The loops' Kubernetes client (the periodic gc reads with it too).
    pub client: kube::Client,
    /// The periodic gc, when it runs.
    gc: Option<JoinHandle<()>>,
}

impl KubeLoops {
    /// Stop the loops (handing back the leader Lease) and wait for them.
    pub async fn stop(self) -> anyhow::Result<()> {
        if let Some(gc) = &self.gc {
            gc.abort();
        }
        let _ = self.stop.send(true);
        self.task.await.context("the loops task")?
    }

    /// Run gc every `schedule.interval` while this replica leads.
    pub fn schedule_gc(
        &mut self,
        schedule: settings::GcSchedule,
        running: &Running,
        drivers: &DriverNames,
    ) {
        self.gc = Some(crate::gc::spawn_schedule(
            schedule,
            self.client.clone(),
            (running.backends.clone(), running.activity.clone()),
            &running.metrics,
            drivers.clone(),
        ));
    }
}

/// Start the provisioner/attacher/resizer loops per `args`, driving the CSI socket
/// `--csi-address` (default: the process's own).
pub async fn start_loops(
    args: &settings::Loops,
    running: &Running,
    drivers: &DriverNames,
) -> anyhow::Result<KubeLoops> {
    use stowage_loops::{LoopMetrics, Settings, csi_client::Csi, kube_client, leader};
    let config = kube_client::config(args.kubeconfig.as_deref()).await?;
    let metrics = LoopMetrics::register(&running.metrics);
    let kube = kube_client::client(
        config,
        args.kube_api_qps,
        args.kube_api_burst,
        metrics.requests.clone(),
    )?;
    health::add_api_ready_check(&running.metrics, kube.clone());
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
    if csi.caps.driver_name != drivers.main {
        tracing::info!(driver = %csi.caps.driver_name, "the loops act for the driver at --csi-address");
    }
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let settings = Settings {
        loops: args.loops.clone(),
        backoff: args.backoff,
        workers: args.max_csi_calls,
        annotation_grace: args.annotation_grace,
        nfs_driver_name: drivers.nfs.clone(),
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
    let election = args.leader.as_ref().map(|leader| {
        let lease_namespace = leader
            .namespace
            .clone()
            .or_else(|| pod_namespace.clone())
            .unwrap_or_else(|| "default".to_owned());
        leader::Election {
            owner: match (&leader.owner_uid, &leader.identity) {
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
            identity: leader.identity.clone().unwrap_or_else(|| {
                let host = nix::unistd::gethostname()
                    .map(|h| h.to_string_lossy().into_owned())
                    .unwrap_or_else(|_| "stowage".to_owned());
                format!("{host}_{}", std::process::id())
            }),
            lease_duration: leader.lease_duration,
            renew_deadline: leader.renew_deadline,
            retry_period: leader.retry_period,
        }
    });
    health::add_loops_checks(&running.metrics, &running.activity, args.stuck_after);
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(stowage_loops::run(
        kube.clone(),
        csi,
        settings,
        (metrics, running.activity.clone()),
        election,
        stopped,
    ));
    Ok(KubeLoops {
        stop,
        task,
        client: kube,
        gc: None,
    })
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
                (metrics, Activity::default()),
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
