//! moto_server, a real EC2 emulator, for the EBS tests: start one per test (~0.7 s),
//! reset it, and drive it with the raw EC2 Query API (no aws-sdk here, so these
//! helpers can check what the SDK-based backend did).
//!
//! `tests/run` installs moto into a venv and sets `STOWAGE_MOTO_SERVER` (the path of
//! its `moto_server`) and `STOWAGE_REQUIRE_MOTO=1`.
//!
//! moto keeps one state per account and region, and picks the service (EC2) and the
//! region from the `Authorization` header's credential scope: without that header a
//! request goes to its S3 emulation. These helpers sign (with a dummy signature,
//! moto checks none) as region [`REGION`] and the default account 123456789012: an
//! SDK client must use the same region (and an access key that is not 12 digits,
//! which moto would take as an account id) to see the same volumes.

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The region every helper here addresses.
pub const REGION: &str = "us-east-1";
/// EC2 Query API version (what aws-sdk-ec2 sends).
pub const API_VERSION: &str = "2016-11-15";
/// Any AMI id works: moto validates AMIs only with MOTO_ENABLE_AMI_VALIDATION=true.
pub const AMI: &str = "ami-12c6146b";
/// Upper bound for one HTTP exchange made by these helpers: a test fails, never hangs.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
const LOG_LINES: usize = 200;

/// A running `moto_server` on 127.0.0.1; killed (and reaped) on drop.
///
/// Derefs to an [`Ec2Query`] client aimed at it: `moto.run_instance(..)`,
/// `moto.describe_volumes()`, `moto.call(..)` …
pub struct Moto {
    child: Child,
    ec2: Ec2Query,
    log: Arc<Mutex<VecDeque<String>>>,
}

impl Moto {
    /// Starts moto_server on a port the kernel chooses (`-p 0`: moto prints the
    /// address it bound, so there is no pick-then-bind race) and returns once it
    /// answers HTTP. `None` (with a SKIPPED message) when STOWAGE_MOTO_SERVER is
    /// unset, unless STOWAGE_REQUIRE_MOTO=1, which makes that a failure.
    pub fn start(test: &str) -> Option<Moto> {
        let server = match std::env::var("STOWAGE_MOTO_SERVER") {
            Ok(server) => server,
            Err(_) if std::env::var("STOWAGE_REQUIRE_MOTO").as_deref() == Ok("1") => {
                panic!(
                    "{test}: STOWAGE_REQUIRE_MOTO=1 but STOWAGE_MOTO_SERVER is not set: run tests/run"
                )
            }
            Err(_) => {
                eprintln!(
                    "SKIPPED {test}: needs moto; run via tests/run or set STOWAGE_MOTO_SERVER=<venv>/bin/moto_server"
                );
                return None;
            }
        };
        let mut child = Command::new(&server)
            .args(["-H", "127.0.0.1", "-p", "0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{test}: cannot run {server}: {e}"));

        // moto logs one line per request on stderr: drain it for the process's whole
        // life (a full pipe would block moto), keeping the tail for failure messages.
        let log = Arc::new(Mutex::new(VecDeque::new()));
        let (address_tx, address_rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let tail = log.clone();
        std::thread::spawn(move || drain_log(stderr, tail, address_tx));

        let mut moto = Moto {
            child,
            ec2: Ec2Query::new(""),
            log,
        };
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let address = match address_rx.recv_timeout(STARTUP_TIMEOUT) {
            Ok(address) => address,
            Err(_) => panic!(
                "{test}: moto_server did not print its address within {STARTUP_TIMEOUT:?}; its log:\n{}",
                moto.log().join("\n")
            ),
        };
        wait_until_answers(&address, deadline).unwrap_or_else(|e| {
            panic!(
                "{test}: moto_server at {address} does not answer: {e}; its log:\n{}",
                moto.log().join("\n")
            )
        });
        moto.ec2 = Ec2Query::new(format!("http://{address}"));
        Some(moto)
    }

    /// `http://127.0.0.1:PORT`
    pub fn endpoint(&self) -> String {
        self.ec2.endpoint.clone()
    }

    /// A client for this moto (the same one `Deref` gives).
    pub fn ec2(&self) -> Ec2Query {
        self.ec2.clone()
    }

    /// Forget every resource (all accounts, regions and services).
    pub async fn reset(&self) {
        let reply = http_request(&self.ec2.endpoint, "POST", "/moto-api/reset", &[], b"")
            .await
            .expect("POST /moto-api/reset");
        assert_eq!(reply.status, 200, "reset: {}", reply.text());
    }

    /// The last lines moto wrote on stderr (one per request).
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().iter().cloned().collect()
    }
}

impl std::ops::Deref for Moto {
    type Target = Ec2Query;
    fn deref(&self) -> &Ec2Query {
        &self.ec2
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn drain_log(
    stderr: impl Read,
    tail: Arc<Mutex<VecDeque<String>>>,
    address_tx: mpsc::Sender<String>,
) {
    const MARK: &str = "Running on http://";
    for line in BufReader::new(stderr).lines() {
        let Ok(line) = line else { break };
        if let Some(at) = line.find(MARK) {
            let address: String = line[at + MARK.len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | ':'))
                .collect();
            let _ = address_tx.send(address);
        }
        let mut tail = tail.lock().unwrap();
        if tail.len() == LOG_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    }
}

/// Polls (every 20 ms, until `deadline`) until `address` answers an HTTP request.
fn wait_until_answers(address: &str, deadline: Instant) -> Result<(), String> {
    loop {
        let attempt = (|| -> std::io::Result<String> {
            let mut stream = std::net::TcpStream::connect(address)?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            stream
                .write_all(b"GET /moto-api/ HTTP/1.1\r\nHost: moto\r\nConnection: close\r\n\r\n")?;
            let mut head = [0u8; 12];
            stream.read_exact(&mut head)?;
            Ok(String::from_utf8_lossy(&head).into_owned())
        })();
        match attempt {
            Ok(head) if head.starts_with("HTTP/1.") => return Ok(()),
            Ok(head) => return Err(format!("not HTTP: {head:?}")),
            Err(e) if Instant::now() >= deadline => return Err(e.to_string()),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

// ---------------------------------------------------------------------------------
// EC2 Query API

/// A raw EC2 Query API client (form-encoded POST, XML answers) for `endpoint`: moto
/// itself, or a [`super::fault_proxy::FaultProxy`] in front of it.
#[derive(Clone, Debug)]
pub struct Ec2Query {
    pub endpoint: String,
}

/// An EC2 answer: HTTP status and XML body.
#[derive(Clone, Debug)]
pub struct Ec2Reply {
    pub status: u16,
    pub body: String,
}

impl Ec2Reply {
    /// The EC2 error code (`<Code>` of the first `<Error>`), if this is an error.
    pub fn code(&self) -> Option<String> {
        xml::find(&self.body, "Error").and_then(|error| xml::text(error, "Code"))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeInfo {
    pub id: String,
    pub size_gib: u64,
    /// `available`, `in-use` … (`creating` only through the fault proxy).
    pub state: String,
    /// moto omits the zone when CreateVolume named one it doesn't know.
    pub zone: Option<String>,
    pub volume_type: Option<String>,
    pub attachments: Vec<Attachment>,
    pub tags: BTreeMap<String, String>,
    /// The snapshot the volume was created from.
    pub snapshot_id: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub instance_id: String,
    pub device: String,
    /// `attached` (moto never shows `attaching`/`detaching`).
    pub state: String,
}

impl Ec2Query {
    pub fn new(endpoint: impl Into<String>) -> Ec2Query {
        Ec2Query {
            endpoint: endpoint.into(),
        }
    }

    /// One EC2 call: `Action=<action>&Version=…&<params>`; any status.
    pub async fn call(&self, action: &str, params: &[(&str, &str)]) -> Ec2Reply {
        let mut body = format!("Action={}&Version={API_VERSION}", form_encode(action));
        for (key, value) in params {
            body.push_str(&format!("&{}={}", form_encode(key), form_encode(value)));
        }
        let authorization = format!(
            "AWS4-HMAC-SHA256 Credential=stowagetest/20240101/{REGION}/ec2/aws4_request, \
             SignedHeaders=content-type;host, Signature=0"
        );
        let headers = [
            (
                "Content-Type",
                "application/x-www-form-urlencoded; charset=utf-8",
            ),
            ("Authorization", authorization.as_str()),
        ];
        let reply = http_request(&self.endpoint, "POST", "/", &headers, body.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("EC2 {action} to {}: {e}", self.endpoint));
        Ec2Reply {
            status: reply.status,
            body: reply.text(),
        }
    }

    /// Like [`call`](Self::call) but panics unless HTTP 200; returns the body.
    pub async fn ok(&self, action: &str, params: &[(&str, &str)]) -> String {
        let reply = self.call(action, params).await;
        assert_eq!(reply.status, 200, "EC2 {action}: {}", reply.body);
        reply.body
    }

    /// RunInstances of one instance in `zone` and returns its id. The instance has
    /// no root volume (`BlockDeviceMapping NoDevice`), unlike moto's default (an
    /// 8 GiB volume attached as /dev/sda1): volume counts and the hypervisor see only
    /// the volumes a test creates.
    pub async fn run_instance(&self, zone: &str) -> String {
        let body = self
            .ok(
                "RunInstances",
                &[
                    ("ImageId", AMI),
                    ("MinCount", "1"),
                    ("MaxCount", "1"),
                    ("InstanceType", "m5.large"),
                    ("Placement.AvailabilityZone", zone),
                    ("BlockDeviceMapping.1.DeviceName", "/dev/sda1"),
                    ("BlockDeviceMapping.1.NoDevice", ""),
                ],
            )
            .await;
        xml::find(&body, "instancesSet")
            .and_then(|set| xml::children(set).into_iter().next())
            .and_then(|(_, item)| xml::text(item, "instanceId"))
            .unwrap_or_else(|| panic!("no instanceId in RunInstances answer: {body}"))
    }

    /// CreateVolume (gp3) with `tags`; returns the volume id.
    pub async fn create_volume(&self, zone: &str, size_gib: u64, tags: &[(&str, &str)]) -> String {
        let size = size_gib.to_string();
        let mut params = vec![
            ("AvailabilityZone", zone.to_string()),
            ("Size", size),
            ("VolumeType", "gp3".to_string()),
        ];
        if !tags.is_empty() {
            params.push(("TagSpecification.1.ResourceType", "volume".to_string()));
        }
        let mut keys = Vec::new();
        for (i, (key, value)) in tags.iter().enumerate() {
            keys.push((
                format!("TagSpecification.1.Tag.{}.Key", i + 1),
                key.to_string(),
            ));
            keys.push((
                format!("TagSpecification.1.Tag.{}.Value", i + 1),
                value.to_string(),
            ));
        }
        let mut all: Vec<(&str, &str)> = params.iter().map(|(k, v)| (*k, v.as_str())).collect();
        all.extend(keys.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let body = self.ok("CreateVolume", &all).await;
        xml::text(xml::root(&body), "volumeId")
            .unwrap_or_else(|| panic!("no volumeId in CreateVolume answer: {body}"))
    }

    pub async fn attach_volume(&self, volume_id: &str, instance_id: &str, device: &str) {
        self.ok(
            "AttachVolume",
            &[
                ("VolumeId", volume_id),
                ("InstanceId", instance_id),
                ("Device", device),
            ],
        )
        .await;
    }

    /// DetachVolume (moto answers HTTP 500 without InstanceId).
    pub async fn detach_volume(&self, volume_id: &str, instance_id: &str) {
        self.ok(
            "DetachVolume",
            &[("VolumeId", volume_id), ("InstanceId", instance_id)],
        )
        .await;
    }

    pub async fn delete_volume(&self, volume_id: &str) {
        self.ok("DeleteVolume", &[("VolumeId", volume_id)]).await;
    }

    /// ModifyVolume to `size_gib` (moto completes it at once).
    pub async fn resize_volume(&self, volume_id: &str, size_gib: u64) {
        let size = size_gib.to_string();
        self.ok("ModifyVolume", &[("VolumeId", volume_id), ("Size", &size)])
            .await;
    }

    /// Every volume of the region (moto doesn't paginate).
    pub async fn describe_volumes(&self) -> Vec<VolumeInfo> {
        let body = self.ok("DescribeVolumes", &[]).await;
        parse_volumes(&body)
    }

    pub async fn volume(&self, volume_id: &str) -> Option<VolumeInfo> {
        self.describe_volumes()
            .await
            .into_iter()
            .find(|v| v.id == volume_id)
    }

    /// Every snapshot: `(snapshot id, source volume id)`.
    pub async fn describe_snapshots(&self) -> Vec<(String, String)> {
        parse_snapshots(&self.ok("DescribeSnapshots", &[]).await)
    }

    pub async fn count_volumes(&self) -> usize {
        self.describe_volumes().await.len()
    }
}

/// The volumes of a DescribeVolumes answer.
pub fn parse_volumes(body: &str) -> Vec<VolumeInfo> {
    let set = xml::find(body, "volumeSet")
        .unwrap_or_else(|| panic!("no volumeSet in DescribeVolumes answer: {body}"));
    xml::children(set)
        .into_iter()
        .map(|(_, item)| {
            let text = |tag: &str| xml::text(item, tag);
            let attachments = xml::child(item, "attachmentSet")
                .map(xml::children)
                .unwrap_or_default()
                .into_iter()
                .map(|(_, a)| Attachment {
                    instance_id: xml::text(a, "instanceId").unwrap_or_default(),
                    device: xml::text(a, "device").unwrap_or_default(),
                    state: xml::text(a, "status").unwrap_or_default(),
                })
                .collect();
            let tags = xml::child(item, "tagSet")
                .map(xml::children)
                .unwrap_or_default()
                .into_iter()
                .map(|(_, t)| {
                    (
                        xml::text(t, "key").unwrap_or_default(),
                        xml::text(t, "value").unwrap_or_default(),
                    )
                })
                .collect();
            VolumeInfo {
                id: text("volumeId").expect("volumeId"),
                size_gib: text("size").expect("size").parse().expect("numeric size"),
                state: text("status").expect("status"),
                zone: text("availabilityZone"),
                volume_type: text("volumeType"),
                attachments,
                tags,
                snapshot_id: text("snapshotId").filter(|s| !s.is_empty()),
            }
        })
        .collect()
}

/// `(snapshot id, source volume id)` of a DescribeSnapshots answer.
pub fn parse_snapshots(body: &str) -> Vec<(String, String)> {
    let Some(set) = xml::find(body, "snapshotSet") else {
        return Vec::new();
    };
    xml::children(set)
        .into_iter()
        .filter_map(|(_, item)| {
            Some((xml::text(item, "snapshotId")?, xml::text(item, "volumeId")?))
        })
        .collect()
}

/// `application/x-www-form-urlencoded` encoding of one key or value.
pub fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for byte in s.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Decodes one form-encoded key or value (`+` is a space).
pub fn form_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(byte) => {
                        out.push(byte);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The value of `key` in a form-encoded string.
pub fn form_value(form: &str, key: &str) -> Option<String> {
    form.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (form_decode(k) == key).then(|| form_decode(v))
    })
}

// ---------------------------------------------------------------------------------
// A minimal HTTP/1.1 client: one request per connection (`Connection: close`).

#[derive(Clone, Debug)]
pub struct HttpReply {
    pub status: u16,
    /// Header names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpReply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends one request to `endpoint` (`http://host:port`) and reads the whole answer,
/// within [`HTTP_TIMEOUT`]. `Host`, `Content-Length` and `Connection` are added
/// unless `headers` has them.
pub async fn http_request(
    endpoint: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<HttpReply, String> {
    let address = endpoint
        .strip_prefix("http://")
        .ok_or_else(|| format!("not an http:// endpoint: {endpoint}"))?
        .trim_end_matches('/');
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(address)
            .await
            .map_err(|e| format!("connect {address}: {e}"))?;
        let has = |name: &str| headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));
        let mut head = format!("{method} {path} HTTP/1.1\r\n");
        if !has("host") {
            head.push_str(&format!("Host: {address}\r\n"));
        }
        for (name, value) in headers {
            if name.eq_ignore_ascii_case("connection")
                || name.eq_ignore_ascii_case("content-length")
            {
                continue;
            }
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str(&format!(
            "Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        ));
        let mut request = head.into_bytes();
        request.extend_from_slice(body);
        stream
            .write_all(&request)
            .await
            .map_err(|e| format!("send to {address}: {e}"))?;
        let mut raw = Vec::new();
        stream
            .read_to_end(&mut raw)
            .await
            .map_err(|e| format!("read from {address}: {e}"))?;
        parse_response(&raw)
    };
    tokio::time::timeout(HTTP_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("no answer from {address} within {HTTP_TIMEOUT:?}"))?
}

fn parse_response(raw: &[u8]) -> Result<HttpReply, String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("incomplete HTTP answer ({} bytes)", raw.len()))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let rest = &raw[split + 4..];
    let header = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v);
    let body = if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        dechunk(rest)?
    } else if let Some(length) = header("content-length") {
        let length: usize = length.parse().map_err(|_| "bad Content-Length")?;
        rest.get(..length)
            .ok_or_else(|| format!("body shorter than Content-Length {length}"))?
            .to_vec()
    } else {
        rest.to_vec()
    };
    Ok(HttpReply {
        status,
        headers,
        body,
    })
}

fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("truncated chunk size")?;
        let size = String::from_utf8_lossy(&rest[..end]);
        let size = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16)
            .map_err(|_| format!("bad chunk size {size:?}"))?;
        rest = &rest[end + 2..];
        if size == 0 {
            return Ok(body);
        }
        body.extend_from_slice(rest.get(..size).ok_or("truncated chunk")?);
        rest = rest.get(size + 2..).ok_or("truncated chunk")?;
    }
}

// ---------------------------------------------------------------------------------

/// Just enough XML for EC2 answers: elements without attributes that matter, no
/// CDATA or comments; text entities are decoded by [`text`](xml::text).
pub mod xml {
    /// The direct child elements of `fragment`: (name, inner text), in order.
    /// Self-closing `<a/>` gives ("a", "").
    pub fn children(fragment: &str) -> Vec<(&str, &str)> {
        let mut out = Vec::new();
        let mut at = 0;
        while let Some(open) = fragment[at..].find('<').map(|i| at + i) {
            let Some(close) = fragment[open..].find('>').map(|i| open + i) else {
                break;
            };
            let tag = &fragment[open + 1..close];
            at = close + 1;
            if tag.starts_with('?') || tag.starts_with('!') || tag.starts_with('/') {
                continue;
            }
            let name = tag.split([' ', '/']).next().unwrap_or_default();
            if tag.ends_with('/') {
                out.push((name, ""));
                continue;
            }
            // Find the matching end tag, counting nested elements of any name.
            let inner_start = at;
            let mut depth = 1;
            let mut scan = at;
            while depth > 0 {
                let Some(o) = fragment[scan..].find('<').map(|i| scan + i) else {
                    return out; // malformed: stop here
                };
                let Some(c) = fragment[o..].find('>').map(|i| o + i) else {
                    return out;
                };
                let t = &fragment[o + 1..c];
                if t.starts_with('/') {
                    depth -= 1;
                    if depth == 0 {
                        out.push((name, &fragment[inner_start..o]));
                    }
                } else if !t.ends_with('/') && !t.starts_with('?') && !t.starts_with('!') {
                    depth += 1;
                }
                scan = c + 1;
            }
            at = scan;
        }
        out
    }

    /// The inner text of a document's root element (`<XResponse>…</XResponse>`).
    pub fn root(document: &str) -> &str {
        children(document)
            .into_iter()
            .next()
            .map(|(_, inner)| inner)
            .unwrap_or_default()
    }

    /// The inner text of the first direct child named `name`.
    pub fn child<'a>(fragment: &'a str, name: &str) -> Option<&'a str> {
        children(fragment)
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, inner)| inner)
    }

    /// The first element named `name` at any depth (depth-first, document order).
    pub fn find<'a>(fragment: &'a str, name: &str) -> Option<&'a str> {
        for (n, inner) in children(fragment) {
            if n == name {
                return Some(inner);
            }
            if let Some(found) = find(inner, name) {
                return Some(found);
            }
        }
        None
    }

    /// The decoded text of the direct child `name`.
    pub fn text(fragment: &str, name: &str) -> Option<String> {
        child(fragment, name).map(unescape)
    }

    pub fn unescape(s: &str) -> String {
        s.replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&apos;", "'")
            .replace("&amp;", "&")
    }

    pub fn escape(s: &str) -> String {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    }
}
