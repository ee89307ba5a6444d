//! The Kubernetes API client of the loops: kubeconfig or in-cluster config, HTTP/2 to
//! the API server (one multiplexed connection, like client-go, instead of kube's
//! HTTP/1.1 pool that opens a TLS connection per concurrent request), a client-side
//! rate limit (QPS + burst, like client-go's token bucket) and a count of every
//! request by verb and resource for `/metrics` and the provisioning benchmark.
//!
//! Owns only the HTTP client stack; it never interprets the objects.

use std::future::Future as _;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use http::Request;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use kube::client::ClientBuilder;
use kube::client::retry::RetryPolicy;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::time::{Instant, Sleep};
use tower::{Layer, Service};

/// Labels of `stowage_kube_api_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub verb: String,
    pub resource: String,
}

/// Requests sent, by verb (`get list watch create update patch delete`) and resource
/// (`persistentvolumeclaims/status` for a subresource).
pub type RequestCounts = Family<RequestLabels, Counter>;

/// Load the config: the kubeconfig file when given, else in-cluster (then the
/// default kubeconfig locations).
pub async fn config(kubeconfig: Option<&Path>) -> anyhow::Result<kube::Config> {
    match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading --kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("loading --kubeconfig {}", path.display()))
        }
        None => kube::Config::infer().await.context(
            "no --kubeconfig and no in-cluster service account for the Kubernetes loops \
                 (--no-loops serves CSI only)",
        ),
    }
}

/// The User-Agent of every request: the API server names stowage's entries in
/// `managedFields` and the audit log after it (kube sends none: "unknown").
pub const USER_AGENT: &str = concat!("stowage/", env!("CARGO_PKG_VERSION"));

/// A client with the rate limit and request counting in front of `config`'s transport.
pub fn client(
    mut config: kube::Config,
    qps: f64,
    burst: u32,
    counts: RequestCounts,
) -> anyhow::Result<kube::Client> {
    if !config
        .headers
        .iter()
        .any(|(name, _)| name == http::header::USER_AGENT)
    {
        config.headers.push((
            http::header::USER_AGENT,
            http::HeaderValue::from_static(USER_AGENT),
        ));
    }
    let count = CountLayer { counts };
    let limit = RateLimitLayer {
        bucket: Arc::new(Mutex::new(TokenBucket::new(qps, burst))),
    };
    if config.proxy_url.is_some() {
        // kube's own stack knows the proxy protocols (HTTP/1.1 through the proxy).
        let builder = ClientBuilder::try_from(config).context("building the Kubernetes client")?;
        return Ok(builder.with_layer(&count).with_layer(&limit).build());
    }
    let builder = ClientBuilder::new(http2_transport(&config)?, config.default_namespace.clone());
    Ok(builder.with_layer(&count).with_layer(&limit).build())
}

/// kube's transport (base URI, retry of 429/503/504, auth, extra headers, TLS from the
/// config) on a hyper client that offers HTTP/2 through ALPN: every request, watches
/// included, is a stream on one connection. Idle connections are pinged like
/// client-go's (30 s, 15 s timeout) so a dead API server is noticed without a
/// per-request read timeout. Plain `http://` servers get HTTP/1.1.
fn http2_transport(config: &kube::Config) -> anyhow::Result<Transport> {
    use kube::client::ConfigExt as _;
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(config.connect_timeout);
    let tls = config
        .rustls_client_config()
        .context("TLS settings of the kubeconfig")?;
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http();
    let builder = match &config.tls_server_name {
        Some(name) => {
            builder.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(
                name.clone()
                    .try_into()
                    .with_context(|| format!("tls-server-name {name:?}"))?,
            ))
        }
        None => builder,
    };
    let https = builder.enable_http1().enable_http2().wrap_connector(http);
    let hyper = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        // Go's windows: a watch nobody reads for a while can hold at most its own 4 MB
        // of the connection's 1 GB, so it never stalls the other requests (the h2
        // defaults, 64 kB / adaptive, let one unread watch block the whole connection).
        .http2_initial_stream_window_size(STREAM_WINDOW)
        .http2_initial_connection_window_size(CONNECTION_WINDOW)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .http2_keep_alive_timeout(Duration::from_secs(15))
        .build(https);
    let retry = config
        .default_retry
        .then(|| tower::retry::RetryLayer::new(RetryPolicy::server_retry()));
    let service = tower::ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(retry)
        .option_layer(
            config
                .auth_layer()
                .context("credentials of the kubeconfig")?,
        )
        .layer(
            config
                .extra_headers_layer()
                .context("headers of the kubeconfig")?,
        )
        .map_err(tower::BoxError::from)
        .service(hyper);
    Ok(tower::util::BoxService::new(service))
}

const STREAM_WINDOW: u32 = 4 << 20;
const CONNECTION_WINDOW: u32 = 1 << 30;

type Transport = tower::util::BoxService<
    Request<kube::client::Body>,
    http::Response<hyper::body::Incoming>,
    tower::BoxError,
>;

/// The audit verb and resource of a request path, e.g. `GET
/// /api/v1/namespaces/db/persistentvolumeclaims?watch=true` → (`watch`,
/// `persistentvolumeclaims`).
pub fn verb_and_resource(
    method: &http::Method,
    path: &str,
    query: Option<&str>,
) -> (String, String) {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let rest: &[&str] = match segments.as_slice() {
        ["api", _version, rest @ ..] => rest,
        ["apis", _group, _version, rest @ ..] => rest,
        _ => &[],
    };
    // namespaces/{ns}/{resource}/{name}/{sub} or {resource}/{name}/{sub}
    let rest = match rest {
        ["namespaces", _ns, tail @ ..] if !tail.is_empty() => tail,
        other => other,
    };
    let resource = match rest {
        [] => "unknown".to_owned(),
        [resource] | [resource, _] => (*resource).to_owned(),
        [resource, _, sub, ..] => format!("{resource}/{sub}"),
    };
    let named = rest.len() >= 2;
    let watch = query.is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"));
    let verb = match *method {
        http::Method::GET if watch => "watch",
        http::Method::GET if named => "get",
        http::Method::GET => "list",
        http::Method::POST => "create",
        http::Method::PUT => "update",
        http::Method::PATCH => "patch",
        http::Method::DELETE if named => "delete",
        http::Method::DELETE => "deletecollection",
        _ => "other",
    };
    (verb.to_owned(), resource)
}

#[derive(Clone)]
struct CountLayer {
    counts: RequestCounts,
}

impl<S> Layer<S> for CountLayer {
    type Service = Count<S>;
    fn layer(&self, inner: S) -> Count<S> {
        Count {
            inner,
            counts: self.counts.clone(),
        }
    }
}

struct Count<S> {
    inner: S,
    counts: RequestCounts,
}

impl<S, B> Service<Request<B>> for Count<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let (verb, resource) = verb_and_resource(
            request.method(),
            request.uri().path(),
            request.uri().query(),
        );
        self.counts
            .get_or_create(&RequestLabels { verb, resource })
            .inc();
        self.inner.call(request)
    }
}

/// client-go's token bucket: `burst` tokens, refilled at `qps` per second; each request
/// takes one. kube wraps the stack in one buffer, so waiting in `poll_ready` delays
/// requests in order without dropping any.
struct TokenBucket {
    qps: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    fn new(qps: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            qps: if qps > 0.0 { qps } else { f64::INFINITY },
            burst,
            tokens: burst,
            at: Instant::now(),
        }
    }

    /// Take a token now, or say how long until one is there.
    fn take(&mut self) -> Result<(), Duration> {
        let now = Instant::now();
        let elapsed = now.duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.qps).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.qps))
        }
    }
}

#[derive(Clone)]
struct RateLimitLayer {
    bucket: Arc<Mutex<TokenBucket>>,
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;
    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit {
            inner,
            bucket: Arc::clone(&self.bucket),
            sleep: None,
            permitted: false,
        }
    }
}

struct RateLimit<S> {
    inner: S,
    bucket: Arc<Mutex<TokenBucket>>,
    sleep: Option<Pin<Box<Sleep>>>,
    permitted: bool,
}

impl<S, B> Service<Request<B>> for RateLimit<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        while !self.permitted {
            if let Some(sleep) = self.sleep.as_mut() {
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.sleep = None;
            }
            let taken = self.bucket.lock().unwrap_or_else(|e| e.into_inner()).take();
            match taken {
                Ok(()) => self.permitted = true,
                Err(wait) => self.sleep = Some(Box::pin(tokio::time::sleep(wait))),
            }
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        self.permitted = false;
        self.inner.call(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

    #[test]
    fn verbs_and_resources_from_paths() {
        let cases = [
            (
                Method::GET,
                "/api/v1/persistentvolumes",
                None,
                ("list", "persistentvolumes"),
            ),
            (
                Method::GET,
                "/api/v1/namespaces/db/persistentvolumeclaims",
                Some("watch=true&resourceVersion=5"),
                ("watch", "persistentvolumeclaims"),
            ),
            (
                Method::GET,
                "/api/v1/namespaces/db/persistentvolumeclaims/data-db-0",
                None,
                ("get", "persistentvolumeclaims"),
            ),
            (
                Method::PATCH,
                "/api/v1/namespaces/db/persistentvolumeclaims/data-db-0/status",
                None,
                ("patch", "persistentvolumeclaims/status"),
            ),
            (
                Method::POST,
                "/apis/events.k8s.io/v1/namespaces/db/events",
                None,
                ("create", "events"),
            ),
            (
                Method::PUT,
                "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/stowage",
                None,
                ("update", "leases"),
            ),
            (
                Method::DELETE,
                "/api/v1/persistentvolumes/pvc-1",
                None,
                ("delete", "persistentvolumes"),
            ),
            (
                Method::GET,
                "/api/v1/namespaces/db",
                None,
                ("get", "namespaces"),
            ),
        ];
        for (method, path, query, (verb, resource)) in cases {
            assert_eq!(
                verb_and_resource(&method, path, query),
                (verb.to_owned(), resource.to_owned()),
                "{method} {path}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_bucket_allows_a_burst_then_qps() {
        let mut bucket = TokenBucket::new(10.0, 3);
        for _ in 0..3 {
            assert!(bucket.take().is_ok());
        }
        let wait = bucket.take().unwrap_err();
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-6, "{wait:?}");
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(bucket.take().is_ok());
        assert!(bucket.take().is_err());
    }
}
