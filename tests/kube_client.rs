//! The loops' Kubernetes client against a TLS server that speaks HTTP/2 like
//! kube-apiserver: every request rides one connection, and a watch nobody reads does
//! not stall the other requests on that connection (with h2's default 64 kB windows it
//! did: the bench's unread claim watch froze its claim creates at 746 of 1,000).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt as _;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::WatchParams;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// What the server saw.
#[derive(Default)]
struct Seen {
    connections: AtomicUsize,
    http2_requests: AtomicUsize,
    other_requests: AtomicUsize,
    user_agent_stowage: AtomicUsize,
}

type Body = BoxBody<Bytes, Infallible>;

/// ADDED events for a 16 kB ConfigMap, without end: far more than any window.
fn endless_watch() -> Body {
    let data = "x".repeat(16 * 1024);
    let events = futures::stream::iter(0u64..).map(move |i| {
        let event = serde_json::json!({
            "type": "ADDED",
            "object": {
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": format!("cm-{i}"), "namespace": "default",
                             "resourceVersion": format!("{}", i + 1)},
                "data": {"blob": data},
            },
        });
        let mut line = serde_json::to_vec(&event).expect("json");
        line.push(b'\n');
        Ok::<_, Infallible>(Frame::data(Bytes::from(line)))
    });
    BodyExt::boxed(StreamBody::new(events))
}

async fn serve(request: Request<Incoming>, seen: Arc<Seen>) -> Result<Response<Body>, Infallible> {
    if request.version() == http::Version::HTTP_2 {
        seen.http2_requests.fetch_add(1, Ordering::SeqCst);
    } else {
        seen.other_requests.fetch_add(1, Ordering::SeqCst);
    }
    let user_agent = request
        .headers()
        .get(http::header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if user_agent == stowage_loops::kube_client::USER_AGENT {
        seen.user_agent_stowage.fetch_add(1, Ordering::SeqCst);
    }
    let watch = request
        .uri()
        .query()
        .is_some_and(|q| q.contains("watch=true"));
    let body = if watch {
        endless_watch()
    } else {
        let name = request.uri().path().rsplit('/').next().unwrap_or("x");
        let object = serde_json::json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": "default", "resourceVersion": "1"},
        });
        BodyExt::boxed(Full::new(Bytes::from(object.to_string())))
    };
    Ok(Response::builder()
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(body)
        .expect("response"))
}

/// A self-signed certificate for 127.0.0.1 (openssl CLI), as PEM (cert, key).
fn certificate(dir: &std::path::Path) -> (Vec<u8>, Vec<u8>) {
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    let status = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
        .args([
            "-subj",
            "/CN=stowage-test",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl (tests/run installs it)");
    assert!(status.success(), "openssl req failed");
    (
        std::fs::read(cert).expect("cert"),
        std::fs::read(key).expect("key"),
    )
}

/// A TLS server offering only h2 (ALPN), like kube-apiserver to an h2 client.
async fn start_server(cert: &[u8], key: &[u8], seen: Arc<Seen>) -> std::net::SocketAddr {
    let certs = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<Vec<_>, _>>()
        .expect("cert pem");
    let key = PrivateKeyDer::from_pem_slice(key).expect("key pem");
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocols")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server cert");
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let seen = Arc::clone(&seen);
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                seen.connections.fetch_add(1, Ordering::SeqCst);
                let service = hyper::service::service_fn(move |r| serve(r, Arc::clone(&seen)));
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    addr
}

fn kubeconfig(dir: &std::path::Path, addr: std::net::SocketAddr, ca: &[u8]) -> std::path::PathBuf {
    use base64::Engine as _;
    let ca = base64::engine::general_purpose::STANDARD.encode(ca);
    let text = format!(
        "apiVersion: v1\nkind: Config\ncurrent-context: t\n\
         clusters:\n- name: t\n  cluster:\n    server: https://{addr}\n    certificate-authority-data: {ca}\n\
         contexts:\n- name: t\n  context:\n    cluster: t\n    user: t\n    namespace: default\n\
         users:\n- name: t\n  user:\n    token: test\n"
    );
    let path = dir.join("kubeconfig");
    std::fs::write(&path, text).expect("kubeconfig");
    path
}

#[tokio::test]
async fn one_http2_connection_and_an_unread_watch_stalls_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = certificate(dir.path());
    let seen = Arc::new(Seen::default());
    let addr = start_server(&cert, &key, Arc::clone(&seen)).await;
    let config = stowage_loops::kube_client::config(Some(&kubeconfig(dir.path(), addr, &cert)))
        .await
        .expect("config");
    let client =
        stowage_loops::kube_client::client(config, 0.0, 1, Default::default()).expect("client");
    let api: Api<ConfigMap> = Api::namespaced(client, "default");

    // Read one event of the watch, then leave the rest of its 16 kB events unread.
    let mut watch = api
        .watch(&WatchParams::default(), "0")
        .await
        .expect("watch")
        .boxed();
    let first = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("the first watch event within 10 s");
    assert!(first.is_some(), "the watch ended at once");

    // 100 requests after it, 20 at a time, on the same connection: each must finish
    // although the server has far more watch data to send than the h2 windows hold.
    let gets = futures::stream::iter(0..100)
        .map(|i| {
            let api = api.clone();
            async move { api.get(&format!("cm-{i}")).await }
        })
        .buffer_unordered(20)
        .collect::<Vec<_>>();
    let results = tokio::time::timeout(Duration::from_secs(20), gets)
        .await
        .expect("requests next to an unread watch finished within 20 s (flow-control stall?)");
    for result in results {
        result.expect("a GET failed");
    }
    assert_eq!(seen.connections.load(Ordering::SeqCst), 1, "one connection");
    assert_eq!(
        seen.http2_requests.load(Ordering::SeqCst),
        101,
        "all over h2"
    );
    assert_eq!(seen.other_requests.load(Ordering::SeqCst), 0);
    assert_eq!(
        seen.user_agent_stowage.load(Ordering::SeqCst),
        101,
        "every request says User-Agent: {}",
        stowage_loops::kube_client::USER_AGENT
    );
    drop(watch);
}
