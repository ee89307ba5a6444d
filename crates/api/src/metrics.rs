//! The process's Prometheus registry and its health and readiness checks: the driver
//! and the loops register their metrics and checks here; the binary's `http` module
//! serves them (`/metrics`, `/healthz`: alive, every health check passes, e.g. kubelet
//! has not refused the node plugin's registration; `/readyz`: every readiness check
//! passes, e.g. the controller's Kubernetes API server answers).
//! Names follow the CSI sidecars where they overlap
//! (`csi_sidecar_operations_seconds{driver_name,method_name,grpc_status_code}`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApiCallLabels {
    backend: String,
    action: String,
}

/// Reads cloud API call counts at scrape time: (backend, action, calls).
type ApiCallSource = Box<dyn Fn() -> Vec<(String, String, u64)> + Send + Sync>;

/// Exposes `stowage_cloud_api_calls_total{backend,action}` from counters kept by the
/// backends (the EBS backend counts each EC2 HTTP attempt in an SDK interceptor).
struct ApiCalls(ApiCallSource);

impl std::fmt::Debug for ApiCalls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiCalls")
    }
}

impl prometheus_client::collector::Collector for ApiCalls {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::TypedMetric;
        use prometheus_client::metrics::counter::Counter;
        let family = Family::<ApiCallLabels, Counter>::default();
        for (backend, action, calls) in (self.0)() {
            family
                .get_or_create(&ApiCallLabels { backend, action })
                .inc_by(calls);
        }
        let metric = encoder.encode_descriptor(
            "stowage_cloud_api_calls",
            "Cloud API calls made by the backends, by action (retries included)",
            None,
            <Family<ApiCallLabels, Counter> as TypedMetric>::TYPE,
        )?;
        family.encode(metric)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    driver_name: String,
    method_name: String,
    grpc_status_code: String,
}

type HistogramFamily = Family<OperationLabels, Histogram, fn() -> Histogram>;

/// One health or readiness check: `Err` says what is wrong.
pub type Check = Arc<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// The process's metrics registry, and what `/readyz` checks.
pub struct Metrics {
    driver_name: String,
    registry: Mutex<Registry>,
    operations: HistogramFamily,
    ready_checks: Mutex<Vec<Check>>,
    health_checks: Mutex<Vec<Check>>,
    ready_notes: Mutex<Vec<Note>>,
}

/// A line `/readyz` shows whether ready or not (e.g. "leader: yes").
pub type Note = Arc<dyn Fn() -> Option<String> + Send + Sync>;

fn operation_histogram() -> Histogram {
    // 1 ms … ~65 s
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

impl Metrics {
    pub fn new(driver_name: &str) -> Arc<Self> {
        let mut registry = Registry::default();
        let operations: HistogramFamily = Family::new_with_constructor(operation_histogram);
        registry.register(
            "csi_sidecar_operations_seconds",
            "Duration of CSI operations, by method and gRPC status code",
            operations.clone(),
        );
        Arc::new(Self {
            driver_name: driver_name.to_owned(),
            registry: Mutex::new(registry),
            operations,
            ready_checks: Mutex::default(),
            health_checks: Mutex::default(),
            ready_notes: Mutex::default(),
        })
    }

    /// Add a check to `/readyz`, run on every request (a probe), so the answer is
    /// never older than the request.
    pub fn add_ready_check(
        &self,
        check: impl Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync + 'static,
    ) {
        self.ready_checks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::new(check));
    }

    /// Add a check to `/healthz` (liveness: failing it gets the process restarted),
    /// run on every request.
    pub fn add_health_check(
        &self,
        check: impl Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync + 'static,
    ) {
        self.health_checks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::new(check));
    }

    /// Add a line `/readyz` shows after its verdict, ready or not: what this replica
    /// is (leader or standby, each backend's last check).
    pub fn add_ready_note(&self, note: impl Fn() -> Option<String> + Send + Sync + 'static) {
        self.ready_notes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::new(note));
    }

    /// The lines of every note that has something to say.
    pub fn ready_notes(&self) -> Vec<String> {
        let notes = self
            .ready_notes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        notes.iter().filter_map(|note| note()).collect()
    }

    /// Ready when every check passes (no check: ready while serving); else the reasons.
    pub async fn ready(&self) -> Result<(), String> {
        run_checks(&self.ready_checks).await
    }

    /// Alive when every health check passes; else the reasons.
    pub async fn healthy(&self) -> Result<(), String> {
        run_checks(&self.health_checks).await
    }

    /// Record one CSI call: `method` like `/csi.v1.Controller/CreateVolume`,
    /// `status_code` like `OK` or `NotFound`.
    pub fn observe_operation(&self, method: &str, status_code: &str, elapsed: Duration) {
        self.operations
            .get_or_create(&OperationLabels {
                driver_name: self.driver_name.clone(),
                method_name: method.to_owned(),
                grpc_status_code: status_code.to_owned(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Export cloud API call counts read from `source` at every scrape.
    pub fn register_api_calls(
        &self,
        source: impl Fn() -> Vec<(String, String, u64)> + Send + Sync + 'static,
    ) {
        self.registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .register_collector(Box::new(ApiCalls(Box::new(source))));
    }

    /// Register another metric (the Kubernetes loops add theirs).
    pub fn register(
        &self,
        name: &str,
        help: &str,
        metric: impl prometheus_client::registry::Metric,
    ) {
        self.registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .register(name, help, metric);
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        prometheus_client::encoding::text::encode(&mut text, &registry)
            .expect("writing to a String cannot fail");
        text
    }
}

async fn run_checks(checks: &Mutex<Vec<Check>>) -> Result<(), String> {
    let checks = checks.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let failed: Vec<String> = futures::future::join_all(checks.iter().map(|check| check()))
        .await
        .into_iter()
        .filter_map(Result::err)
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed.join("\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_are_exported_with_sidecar_labels() {
        let metrics = Metrics::new("stowage.csi.dev");
        metrics.observe_operation(
            "/csi.v1.Controller/CreateVolume",
            "OK",
            Duration::from_millis(3),
        );
        let text = metrics.encode();
        assert!(
            text.contains(r#"csi_sidecar_operations_seconds_count{driver_name="stowage.csi.dev",method_name="/csi.v1.Controller/CreateVolume",grpc_status_code="OK"} 1"#),
            "{text}"
        );
    }

    #[tokio::test]
    async fn ready_only_when_every_check_passes() {
        let metrics = Metrics::new("stowage.csi.dev");
        assert_eq!(metrics.ready().await, Ok(()), "no check: ready");
        let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let state = Arc::clone(&up);
        metrics.add_ready_check(move || {
            let up = state.load(std::sync::atomic::Ordering::Relaxed);
            Box::pin(async move {
                if up {
                    Ok(())
                } else {
                    Err("API down".to_owned())
                }
            })
        });
        metrics.add_ready_check(|| Box::pin(async { Ok(()) }));
        assert_eq!(metrics.ready().await, Ok(()));
        up.store(false, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(metrics.ready().await, Err("API down".to_owned()));
        up.store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(metrics.ready().await, Ok(()), "checked again on every call");
    }

    #[test]
    fn cloud_api_calls_are_read_at_scrape_time() {
        let metrics = Metrics::new("stowage.csi.dev");
        let calls = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let source = std::sync::Arc::clone(&calls);
        metrics.register_api_calls(move || {
            vec![(
                "ebs".into(),
                "CreateVolume".into(),
                source.load(std::sync::atomic::Ordering::Relaxed),
            )]
        });
        calls.store(7, std::sync::atomic::Ordering::Relaxed);
        let text = metrics.encode();
        assert!(
            text.contains(
                r#"stowage_cloud_api_calls_total{backend="ebs",action="CreateVolume"} 7"#
            ),
            "{text}"
        );
    }
}
