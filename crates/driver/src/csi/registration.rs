//! kubelet's plugin registration (`pluginregistration` v1), served by the node plugin
//! itself so no node-driver-registrar sidecar is needed: a socket in
//! `<kubelet-dir>/plugins_registry/<driver>-reg.sock` answers GetInfo (a CSI plugin,
//! its name, the CSI socket's host path, version 1.0.0) and takes kubelet's verdict.
//! One socket per driver name (the NFS-only name has its own, see `--nfs-driver-name`).
//! Each verdict is logged, exported as `stowage_kubelet_registration_state{driver,state}` and
//! checked by `/healthz`, which also fails once the socket file is gone (kubelet's
//! directory wiped): both need a restart to register again. The socket is removed on
//! shutdown, before the CSI socket, so kubelet deregisters the driver first.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tonic::{Request, Response, Status};

use stowage_api::metrics::Metrics;

use stowage_api::proto::registration as proto;

/// The plugin type kubelet's CSI handler accepts.
pub const CSI_PLUGIN_TYPE: &str = "CSIPlugin";

/// CSI versions reported to kubelet (kubelet accepts major version 1).
pub const SUPPORTED_VERSIONS: &[&str] = &["1.0.0"];

/// The registration socket for a driver in a kubelet directory.
pub fn registration_socket(kubelet_dir: &Path, driver_name: &str) -> PathBuf {
    kubelet_dir
        .join("plugins_registry")
        .join(format!("{driver_name}-reg.sock"))
}

/// What kubelet last said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No word from kubelet yet.
    Waiting,
    Registered,
    /// kubelet refused the plugin, saying why.
    Failed(String),
}

impl Verdict {
    fn label(&self) -> &'static str {
        match self {
            Verdict::Waiting => "waiting",
            Verdict::Registered => "registered",
            Verdict::Failed(_) => "failed",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    driver: String,
    state: String,
}

/// The registration service and the state it keeps for `/healthz` and `/metrics`.
#[derive(Clone)]
pub struct KubeletRegistration {
    info: proto::PluginInfo,
    socket: PathBuf,
    verdict: Arc<Mutex<Verdict>>,
    states: Family<StateLabels, Gauge>,
}

impl KubeletRegistration {
    /// One registration per `(driver name, endpoint)`, each on its socket in
    /// `kubelet_dir`'s plugins_registry; `endpoint`: that name's CSI socket as a path on
    /// kubelet's host. Registers the state metric (once) and a `/healthz` check per
    /// name with `metrics`.
    pub fn for_drivers(
        names: &[(String, PathBuf)],
        kubelet_dir: &Path,
        metrics: &Metrics,
    ) -> Vec<Self> {
        let states = Family::<StateLabels, Gauge>::default();
        metrics.register(
            "stowage_kubelet_registration_state",
            "kubelet plugin registration per driver name: 1 for the current state (waiting, registered, failed)",
            states.clone(),
        );
        names
            .iter()
            .map(|(driver_name, endpoint)| {
                let registration = Self {
                    info: proto::PluginInfo {
                        r#type: CSI_PLUGIN_TYPE.to_owned(),
                        name: driver_name.clone(),
                        endpoint: endpoint.display().to_string(),
                        supported_versions: SUPPORTED_VERSIONS
                            .iter()
                            .map(|v| (*v).to_owned())
                            .collect(),
                    },
                    socket: registration_socket(kubelet_dir, driver_name),
                    verdict: Arc::new(Mutex::new(Verdict::Waiting)),
                    states: states.clone(),
                };
                registration.set(Verdict::Waiting);
                let check = registration.clone();
                metrics.add_health_check(move || {
                    let result = check.health();
                    Box::pin(async move { result })
                });
                registration
            })
            .collect()
    }

    /// The registration socket's path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn verdict(&self) -> Verdict {
        self.verdict
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set(&self, verdict: Verdict) {
        for state in ["waiting", "registered", "failed"] {
            self.states
                .get_or_create(&StateLabels {
                    driver: self.info.name.clone(),
                    state: state.to_owned(),
                })
                .set(i64::from(state == verdict.label()));
        }
        *self.verdict.lock().unwrap_or_else(|e| e.into_inner()) = verdict;
    }

    /// Alive unless kubelet refused the plugin or the socket it watches is gone.
    fn health(&self) -> Result<(), String> {
        use std::os::unix::fs::FileTypeExt;
        if let Verdict::Failed(error) = self.verdict() {
            return Err(format!(
                "kubelet refused the plugin registration of {}: {error}",
                self.info.name
            ));
        }
        match std::fs::symlink_metadata(&self.socket) {
            Ok(meta) if meta.file_type().is_socket() => Ok(()),
            _ => Err(format!(
                "registration socket {} is gone: kubelet cannot find this plugin again until it restarts",
                self.socket.display()
            )),
        }
    }
}

#[tonic::async_trait]
impl proto::registration_server::Registration for KubeletRegistration {
    async fn get_info(
        &self,
        _request: Request<proto::InfoRequest>,
    ) -> Result<Response<proto::PluginInfo>, Status> {
        tracing::debug!(endpoint = %self.info.endpoint, "kubelet asked for the plugin's info");
        Ok(Response::new(self.info.clone()))
    }

    async fn notify_registration_status(
        &self,
        request: Request<proto::RegistrationStatus>,
    ) -> Result<Response<proto::RegistrationStatusResponse>, Status> {
        let status = request.into_inner();
        if status.plugin_registered {
            tracing::info!(driver = %self.info.name, endpoint = %self.info.endpoint, "registered with kubelet");
            self.set(Verdict::Registered);
        } else {
            tracing::error!(
                driver = %self.info.name,
                error = %status.error,
                "kubelet refused the plugin registration; /healthz fails so the container restarts and registers again"
            );
            self.set(Verdict::Failed(status.error));
        }
        Ok(Response::new(proto::RegistrationStatusResponse {}))
    }
}
