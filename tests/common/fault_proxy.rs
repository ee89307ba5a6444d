//! An HTTP/1.1 reverse proxy in front of moto that injects the EC2 faults moto can't
//! produce: throttling (`RequestLimitExceeded`), other EC2 errors, slow answers,
//! volumes still `creating`. Programmed at run time by the test; counts every request
//! per EC2 `Action` (faulted ones included).
//!
//! ```ignore
//! let proxy = FaultProxy::start(&moto.endpoint()).await;
//! proxy.throttle("CreateVolume", 2);      // the next 2 CreateVolume: 503
//! let backend = Ebs::new(config_for(proxy.endpoint()));
//! …
//! assert_eq!(proxy.count("CreateVolume"), 3);
//! ```
//!
//! Each fault applies to the next `n` matching requests, in the order the proxy
//! receives them; faults don't stack (an error wins over a delay). The action is read
//! from the form-encoded body (as aws-sdk-ec2 sends it) or the query string.
//!
//! It can also stand in for EC2's `CopyVolumes`, which moto does not know
//! ([`FaultProxy::offer_copy_volumes`]): the copy is made as EC2 documents it (same
//! zone as the source, the size/type/IOPS/throughput asked or the source's, the tags
//! asked, the same copy again for the same ClientToken) out of moto's own
//! DescribeVolumes and CreateVolume, and answered in CopyVolumes' wire format.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::Response;

use super::moto::{form_value, http_request, xml};

/// A running proxy bound to 127.0.0.1:0; stops on drop.
pub struct FaultProxy {
    address: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

struct Shared {
    upstream: String,
    faults: Mutex<Faults>,
    /// `Some(token → copy)` while the proxy answers CopyVolumes itself.
    copy_volumes: Mutex<Option<BTreeMap<String, String>>>,
    /// Requests being handled now (received, not yet answered or abandoned).
    in_flight: tokio::sync::watch::Sender<usize>,
    /// Ticks on every request received (after it was counted).
    received: tokio::sync::watch::Sender<u64>,
}

/// Counts one request as in flight for as long as its handler lives.
struct InFlight(Arc<Shared>);

impl InFlight {
    fn new(shared: &Arc<Shared>) -> InFlight {
        shared.in_flight.send_modify(|n| *n += 1);
        InFlight(shared.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.send_modify(|n| *n -= 1);
    }
}

#[derive(Default)]
struct Faults {
    errors: Vec<ErrorFault>,
    delays: Vec<DelayFault>,
    creating: usize,
    counts: BTreeMap<String, usize>,
}

struct ErrorFault {
    action: String,
    remaining: usize,
    status: u16,
    code: String,
    message: String,
}

struct DelayFault {
    action: String,
    remaining: usize,
    duration: Duration,
    /// Forward first and hold the answer (the server acted), or hold the request.
    after_forwarding: bool,
}

enum Plan {
    Error {
        status: u16,
        code: String,
        message: String,
    },
    Forward {
        hold_before: Option<Duration>,
        hold_after: Option<Duration>,
    },
}

impl FaultProxy {
    /// Starts a proxy forwarding to `upstream` (`http://host:port`).
    pub async fn start(upstream: &str) -> FaultProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let address = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            upstream: upstream.trim_end_matches('/').to_string(),
            faults: Mutex::new(Faults::default()),
            copy_volumes: Mutex::new(None),
            in_flight: tokio::sync::watch::channel(0).0,
            received: tokio::sync::watch::channel(0).0,
        });
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .await
                .expect("fault proxy serves");
        });
        FaultProxy {
            address,
            shared,
            task,
        }
    }

    /// `http://127.0.0.1:PORT`
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    /// The next `n` requests with `Action=<action>` get HTTP 503
    /// `RequestLimitExceeded` and never reach the server.
    pub fn throttle(&self, action: &str, n: usize) {
        self.fail(
            action,
            n,
            503,
            "RequestLimitExceeded",
            "Request limit exceeded.",
        );
    }

    /// The next `n` CreateVolume get HTTP 400 `IdempotentParameterMismatch` (what EC2
    /// says when a ClientToken is reused with different parameters).
    pub fn idempotent_mismatch(&self, n: usize) {
        self.fail(
            "CreateVolume",
            n,
            400,
            "IdempotentParameterMismatch",
            "The client token you have provided is associated with a resource that is already deleted or has different parameters.",
        );
    }

    /// The next `n` requests with `Action=<action>` get an EC2 error answer
    /// (`<Response><Errors><Error><Code>…`) with `status`, and never reach the server.
    pub fn fail(&self, action: &str, n: usize, status: u16, code: &str, message: &str) {
        self.faults().errors.push(ErrorFault {
            action: action.into(),
            remaining: n,
            status,
            code: code.into(),
            message: message.into(),
        });
    }

    /// The next `n` requests with `Action=<action>` are held for `duration` before
    /// being forwarded (to make clients time out). A request whose client gave up
    /// meanwhile is dropped without reaching the server (hyper cancels it).
    pub fn delay(&self, action: &str, n: usize, duration: Duration) {
        self.push_delay(action, n, duration, false);
    }

    /// The next `n` requests with `Action=<action>` are forwarded at once (the server
    /// acts on them even if the client gives up) and their answer is held for
    /// `duration`: "the call timed out, but did it happen?".
    pub fn delay_response(&self, action: &str, n: usize, duration: Duration) {
        self.push_delay(action, n, duration, true);
    }

    /// In the next `n` successful DescribeVolumes answers every
    /// `<status>available</status>` reads `<status>creating</status>`; CreateVolume
    /// answers say `creating` too while any of the `n` are left.
    pub fn creating(&self, n: usize) {
        self.faults().creating += n;
    }

    /// Requests seen per Action, faulted ones included (`""`: no Action).
    pub fn counts(&self) -> BTreeMap<String, usize> {
        self.faults().counts.clone()
    }

    pub fn count(&self, action: &str) -> usize {
        self.faults().counts.get(action).copied().unwrap_or(0)
    }

    pub fn reset_counts(&self) {
        self.faults().counts.clear();
    }

    /// How many programmed faults have not fired yet (0: all were used).
    pub fn unfired(&self) -> usize {
        let faults = self.faults();
        faults.errors.iter().map(|f| f.remaining).sum::<usize>()
            + faults.delays.iter().map(|f| f.remaining).sum::<usize>()
            + faults.creating
    }

    /// Waits until at least `n` requests with `Action=<action>` were received in all;
    /// panics after `timeout`. To abandon a call at a known point: start it in a task,
    /// wait for it here, abort the task.
    pub async fn wait_for_count(&self, action: &str, n: usize, timeout: Duration) {
        let mut received = self.shared.received.subscribe();
        let reached = async {
            while self.count(action) < n {
                received.changed().await.unwrap();
            }
        };
        if tokio::time::timeout(timeout, reached).await.is_err() {
            panic!(
                "fault proxy: {} {action} received after {timeout:?}, expected {n}",
                self.count(action)
            );
        }
    }

    /// Requests (and forwards) received and not yet answered (nor abandoned by their client).
    pub fn in_flight(&self) -> usize {
        *self.shared.in_flight.borrow()
    }

    /// Waits until no request is in flight (none held, none being forwarded); panics
    /// after `timeout`. E.g. after a client gave up on a [`delay`](Self::delay)ed
    /// request, this returns as soon as the proxy has dropped it; after one gave up on
    /// a [`delay_response`](Self::delay_response)d request, once moto has answered.
    pub async fn wait_idle(&self, timeout: Duration) {
        let mut watch = self.shared.in_flight.subscribe();
        let idle = watch.wait_for(|n| *n == 0);
        match tokio::time::timeout(timeout, idle).await {
            Ok(result) => {
                result.unwrap();
            }
            Err(_) => panic!(
                "fault proxy: {} request(s) still in flight after {timeout:?}",
                self.in_flight()
            ),
        }
    }

    /// Forget every fault not fired yet.
    /// Answer CopyVolumes (see the module docs) instead of forwarding it to moto,
    /// which fails it with an HTTP 500.
    pub fn offer_copy_volumes(&self) {
        *self.shared.copy_volumes.lock().unwrap() = Some(BTreeMap::new());
    }

    pub fn clear(&self) {
        let mut faults = self.faults();
        faults.errors.clear();
        faults.delays.clear();
        faults.creating = 0;
    }

    fn push_delay(&self, action: &str, n: usize, duration: Duration, after_forwarding: bool) {
        self.faults().delays.push(DelayFault {
            action: action.into(),
            remaining: n,
            duration,
            after_forwarding,
        });
    }

    fn faults(&self) -> std::sync::MutexGuard<'_, Faults> {
        self.shared.faults.lock().unwrap()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Faults {
    /// Counts the request and takes the fault (if any) that applies to it.
    fn plan(&mut self, action: &str) -> Plan {
        *self.counts.entry(action.to_string()).or_default() += 1;
        if let Some(fault) = self
            .errors
            .iter_mut()
            .find(|f| f.remaining > 0 && f.action == action)
        {
            fault.remaining -= 1;
            return Plan::Error {
                status: fault.status,
                code: fault.code.clone(),
                message: fault.message.clone(),
            };
        }
        let mut plan = Plan::Forward {
            hold_before: None,
            hold_after: None,
        };
        if let Some(fault) = self
            .delays
            .iter_mut()
            .find(|f| f.remaining > 0 && f.action == action)
        {
            fault.remaining -= 1;
            plan = if fault.after_forwarding {
                Plan::Forward {
                    hold_before: None,
                    hold_after: Some(fault.duration),
                }
            } else {
                Plan::Forward {
                    hold_before: Some(fault.duration),
                    hold_after: None,
                }
            };
        }
        self.errors.retain(|f| f.remaining > 0);
        self.delays.retain(|f| f.remaining > 0);
        plan
    }
}

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "content-length",
];

async fn handle(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let _in_flight = InFlight::new(&shared);
    let (parts, body) = request.into_parts();
    let body = match axum::body::to_bytes(body, 64 << 20).await {
        Ok(body) => body,
        Err(e) => return plain(StatusCode::BAD_REQUEST, format!("fault proxy: body: {e}")),
    };
    let action = std::str::from_utf8(&body)
        .ok()
        .and_then(|form| form_value(form, "Action"))
        .or_else(|| parts.uri.query().and_then(|q| form_value(q, "Action")))
        .unwrap_or_default();
    let plan = shared.faults.lock().unwrap().plan(&action);
    shared.received.send_modify(|n| *n += 1);
    let (hold_before, hold_after) = match plan {
        Plan::Error {
            status,
            code,
            message,
        } => return ec2_error(status, &code, &message),
        Plan::Forward {
            hold_before,
            hold_after,
        } => (hold_before, hold_after),
    };
    if action == "CopyVolumes" && shared.copy_volumes.lock().unwrap().is_some() {
        return copy_volumes(&shared, std::str::from_utf8(&body).unwrap_or_default()).await;
    }
    if let Some(duration) = hold_before {
        // The injected fault itself: if the client gives up, hyper drops this future
        // and the request never reaches the server.
        tokio::time::sleep(duration).await;
    }

    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .filter(|(name, _)| !HOP_BY_HOP.contains(&name.as_str()))
        .filter_map(|(name, value)| Some((name.to_string(), value.to_str().ok()?.to_string())))
        .collect();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_else(|| "/".into());
    let upstream = shared.upstream.clone();
    let method = parts.method.to_string();
    // Forward in a task of its own: once forwarded, a request completes on the
    // server even if the client goes away.
    let forwarding = InFlight::new(&shared);
    let forwarded = tokio::spawn(async move {
        let _forwarding = forwarding;
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        http_request(&upstream, &method, &path, &headers, &body).await
    });
    let reply = match forwarded.await {
        Ok(Ok(reply)) => reply,
        Ok(Err(e)) => return plain(StatusCode::BAD_GATEWAY, format!("fault proxy: {e}")),
        Err(e) => return plain(StatusCode::BAD_GATEWAY, format!("fault proxy: {e}")),
    };
    if let Some(duration) = hold_after {
        tokio::time::sleep(duration).await; // the injected fault: a late answer
    }

    let mut body = reply.body;
    if matches!(action.as_str(), "DescribeVolumes" | "CreateVolume") && reply.status == 200 {
        let mut faults = shared.faults.lock().unwrap();
        if faults.creating > 0 {
            // CreateVolume answers say `creating` (as EC2's do) while the fault is
            // armed; each DescribeVolumes answer uses one.
            if action == "DescribeVolumes" {
                faults.creating -= 1;
            }
            body = String::from_utf8_lossy(&body)
                .replace("<status>available</status>", "<status>creating</status>")
                .into_bytes();
        }
    }
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::BAD_GATEWAY);
    for (name, value) in &reply.headers {
        if HOP_BY_HOP.contains(&name.as_str()) {
            continue;
        }
        if let (Ok(name), Ok(value)) = (
            axum::http::HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            response.headers_mut().append(name, value);
        }
    }
    response
}

/// An EC2 Query API error answer, shaped as EC2 (and moto) send them.
pub fn ec2_error_body(code: &str, message: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{}</Code><Message>{}</Message></Error></Errors><RequestID>fault-proxy</RequestID></Response>",
        xml::escape(code),
        xml::escape(message)
    )
}

fn ec2_error(status: u16, code: &str, message: &str) -> Response {
    let mut response = Response::new(Body::from(ec2_error_body(code, message)));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
    response.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("text/xml;charset=UTF-8"),
    );
    response
}

fn plain(status: StatusCode, text: String) -> Response {
    let mut response = Response::new(Body::from(text));
    *response.status_mut() = status;
    response
}

/// CopyVolumes as EC2 documents it, out of moto's DescribeVolumes and CreateVolume.
async fn copy_volumes(shared: &Shared, form: &str) -> Response {
    let ec2 = super::moto::Ec2Query::new(shared.upstream.clone());
    let token = form_value(form, "ClientToken");
    let known = token.as_ref().and_then(|token| {
        shared
            .copy_volumes
            .lock()
            .unwrap()
            .as_ref()
            .and_then(|copies| copies.get(token).cloned())
    });
    let copy_id = match known {
        Some(id) => id,
        None => {
            let Some(source) = form_value(form, "SourceVolumeId") else {
                return ec2_error(400, "MissingParameter", "SourceVolumeId is required");
            };
            let described = ec2
                .call("DescribeVolumes", &[("VolumeId.1", &source)])
                .await;
            if described.status != 200 {
                return ec2_reply(described.status, described.body);
            }
            let Some(item) = super::moto::parse_volumes(&described.body)
                .into_iter()
                .next()
            else {
                return ec2_error(
                    400,
                    "InvalidVolume.NotFound",
                    &format!("The volume '{source}' does not exist."),
                );
            };
            let size = form_value(form, "Size").unwrap_or_else(|| item.size_gib.to_string());
            let volume_type = form_value(form, "VolumeType")
                .or(item.volume_type.clone())
                .unwrap_or_else(|| "gp3".into());
            let zone = item.zone.clone().unwrap_or_default();
            let mut params: Vec<(String, String)> = vec![
                ("AvailabilityZone".into(), zone),
                ("Size".into(), size),
                ("VolumeType".into(), volume_type),
            ];
            for key in ["Iops", "Throughput"] {
                if let Some(value) = form_value(form, key) {
                    params.push((key.into(), value));
                }
            }
            for pair in form.split('&') {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                let key = super::moto::form_decode(key);
                if key.starts_with("TagSpecification.") {
                    params.push((key, super::moto::form_decode(value)));
                }
            }
            let params: Vec<(&str, &str)> = params
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let created = ec2.call("CreateVolume", &params).await;
            if created.status != 200 {
                return ec2_reply(created.status, created.body);
            }
            let Some(id) = xml::text(xml::root(&created.body), "volumeId") else {
                return ec2_error(500, "InternalError", "CreateVolume answered no volumeId");
            };
            if let (Some(token), Some(copies)) =
                (token, shared.copy_volumes.lock().unwrap().as_mut())
            {
                copies.insert(token, id.clone());
            }
            id
        }
    };
    let described = ec2
        .call("DescribeVolumes", &[("VolumeId.1", &copy_id)])
        .await;
    let item = xml::find(&described.body, "volumeSet")
        .and_then(|set| xml::children(set).into_iter().next())
        .map(|(_, item)| item.to_owned())
        .unwrap_or_default();
    ec2_reply(
        200,
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<CopyVolumesResponse xmlns=\"http://ec2.amazonaws.com/doc/{}/\"><requestId>fault-proxy</requestId><volumeSet><item>{item}</item></volumeSet></CopyVolumesResponse>",
            super::moto::API_VERSION
        ),
    )
}

fn ec2_reply(status: u16, body: String) -> Response {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    response.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("text/xml;charset=UTF-8"),
    );
    response
}
