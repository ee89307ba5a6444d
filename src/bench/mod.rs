//! `stowage bench`: CreateVolume+DeleteVolume pairs per second and CreateVolume latency
//! over the CSI socket against the NFS backend, printed beside the raw MKDIR round trip
//! to the same server measured the same way, so the overhead over the wire is visible.
//! Also the raw SYMLINK and MKDIR + SYMLINK at once: the wire work of a new volume (its
//! directory and its record), the backend's CreateVolume called in-process, a CSI Probe
//! and a bare unix-socket echo, so what the backend, gRPC and the kernel each add on top
//! of the wire show. The series take turns sample by sample, so they all see the same
//! server state.
//! `provision` (claims to Bound) and `scale` (a restart among N volumes) measure the
//! loops against a cluster. Benchmarks live here, never as timed assertions in tests.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use std::net::IpAddr;

use crate::config::{BenchArgs, BenchKind, ProvisionArgs, ScaleArgs};
use crate::run::{Plan, start};
use stowage_api::proto::csi::{
    self as proto, controller_client::ControllerClient, identity_client::IdentityClient,
    volume_capability as vc,
};
use stowage_driver::backend::nfs::params::{OnDelete, Placement};
use stowage_driver::backend::nfs::records::Record;
use stowage_driver::backend::nfs::{DefaultExport, NfsBackend, NfsConfig};
use stowage_driver::backend::{Backend, Backends};
use stowage_driver::node::SystemMounter;
use stowage_loops::csi_client::channel;
use stowage_nfs::client::{ClientConfig, NfsClient, NfsTarget};
use stowage_nfs::server::EmbeddedServer;

pub mod provision;
pub mod scale;

/// What `stowage bench` measures, resolved from its flags (clap refuses the flags of
/// one kind given to another: `--volumes` without `--ebs-endpoint`, …).
#[derive(Debug, Clone)]
pub enum Bench {
    /// CSI round trips against NFS: a server of one's own, or an embedded one.
    Nfs {
        server: Option<(IpAddr, String)>,
        /// Measured operations per series and unmeasured ones before each.
        count: usize,
        warmup: usize,
    },
    /// Concurrent CreateVolume against an EC2 endpoint.
    Ebs { endpoint: String, volumes: usize },
    /// Claims → Bound against a cluster.
    Provision(ProvisionArgs),
    /// A restart among N existing volumes.
    Scale(ScaleArgs),
}

impl Bench {
    pub fn of(args: &BenchArgs) -> Bench {
        match (&args.what, &args.ebs_endpoint) {
            (Some(BenchKind::Provision(provision)), _) => Bench::Provision(provision.clone()),
            (Some(BenchKind::Scale(scale)), _) => Bench::Scale(scale.clone()),
            (None, Some(endpoint)) => Bench::Ebs {
                endpoint: endpoint.clone(),
                volumes: args.volumes,
            },
            (None, None) => Bench::Nfs {
                server: args.nfs_server.zip(args.nfs_share.clone()),
                count: args.count,
                warmup: args.warmup,
            },
        }
    }
}

pub async fn run(bench: Bench) -> anyhow::Result<()> {
    let (server, count, warmup) = match bench {
        Bench::Provision(provision) => return provision::run(provision).await,
        Bench::Scale(scale) => return scale::run(scale).await,
        Bench::Ebs { endpoint, volumes } => return ebs(&endpoint, volumes).await,
        Bench::Nfs {
            server,
            count,
            warmup,
        } => (server, count, warmup),
    };
    let scratch = tempfile::tempdir()?;
    let (embedded, target, label) = match server {
        Some((server, share)) => {
            let target = NfsTarget {
                server,
                share: share.clone(),
                port: None,
            };
            (None, target, format!("{server}:{share}"))
        }
        _ => {
            let dir = scratch.path().join("export");
            let server = EmbeddedServer::start(dir, "127.0.0.1:0".parse()?).await?;
            let target = NfsTarget {
                server: server.local_addr().ip(),
                share: server.export_path().to_owned(),
                port: Some(server.local_addr().port()),
            };
            (Some(server), target, "embedded nfs3_server".to_owned())
        }
    };
    let client_config = ClientConfig {
        privileged_port: nix::unistd::geteuid().is_root(),
        ..ClientConfig::default()
    };
    let nfs_config = NfsConfig {
        default_export: Some(DefaultExport {
            target: target.clone(),
            local_dir: None,
        }),
        client: client_config.clone(),
        resolve_timeout: Duration::from_secs(5),
        copy_wait: stowage_driver::backend::nfs::DEFAULT_COPY_WAIT,
    };
    let running = start(Plan {
        socket: scratch.path().join("csi.sock"),
        driver_name: stowage_api::keys::DEFAULT_DRIVER_NAME.into(),
        backends: Backends::new(vec![
            Arc::new(NfsBackend::new(nfs_config.clone())) as Arc<dyn Backend>
        ]),
        controller: true,
        node: None,
        nfs_node: None,
        mounter: Arc::new(SystemMounter::default()),
        http_addr: None,
        shutdown_grace: Duration::from_secs(5),
        backend_check_interval: crate::run::DEFAULT_BACKEND_CHECK_INTERVAL,
    })
    .await?;
    let socket = running.socket.clone();
    let measured = on_client_thread(async move {
        let mut clients = Clients {
            raw: NfsClient::new(target, client_config),
            backend: NfsBackend::new(nfs_config),
            identity: IdentityClient::new(channel::connect(&socket).await?),
            controller: ControllerClient::new(channel::connect(&socket).await?),
            echo: start_echo()?,
            record: raw_record(),
        };
        clients.interleaved(count, warmup).await
    })
    .await;
    running.stop().await?;
    if let Some(server) = embedded {
        server.shutdown().await;
    }
    let all = measured?;

    println!(
        "stowage bench: {label}, {} measured ops per series after {} warm-up, interleaved",
        count, warmup
    );
    println!(
        "{:<34} {:>10} {:>10} {:>12}",
        "series", "p50", "p99", "pairs/s"
    );
    for series in &all {
        println!(
            "{:<34} {:>10.1?} {:>10.1?} {:>12.0}",
            series.op.name(),
            series.percentile(0.50),
            series.percentile(0.99),
            series.pairs_per_second()
        );
    }
    let p50 = |op: Op| {
        all.iter()
            .find(|s| s.op == op)
            .map_or(0.0, |s| s.percentile(0.5).as_secs_f64())
    };
    let ratio = p50(Op::CreateVolume) / p50(Op::Mkdir);
    println!("CreateVolume p50 / MKDIR p50 = {ratio:.2}");
    Ok(())
}

/// Run a measurement like a separate client process would: on its own thread with its
/// own single-threaded runtime, so every series pays the same client-side costs.
async fn on_client_thread<T: Send + 'static>(
    work: impl std::future::Future<Output = anyhow::Result<T>> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(work)
    })
    .await?
}

/// One kind of sample. Every series takes its turn in each round, so all of them see
/// the same server state (a server's file system gets slower to allocate in as it
/// churns; a series run after another would pay for the other's deletions).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    /// One MKDIR on the wire.
    Mkdir,
    /// One SYMLINK of a record-sized target.
    Symlink,
    /// MKDIR and SYMLINK at once on two connections: the wire work of a new volume.
    MkdirAndSymlink,
    /// The backend's CreateVolume called in this thread: the wire work plus the
    /// backend's own, without the socket.
    Backend,
    /// A bare unix-socket echo, no gRPC: the kernel's and the scheduler's share of
    /// any call over the socket (two threads woken).
    Echo,
    /// Identity Probe: the floor of any gRPC call over the socket.
    Probe,
    /// CreateVolume over the socket.
    CreateVolume,
}

const OPS: [Op; 7] = [
    Op::Mkdir,
    Op::Symlink,
    Op::MkdirAndSymlink,
    Op::Backend,
    Op::Echo,
    Op::Probe,
    Op::CreateVolume,
];

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Mkdir => "NFS MKDIR (raw RPC)",
            Op::Symlink => "NFS SYMLINK (raw RPC)",
            Op::MkdirAndSymlink => "NFS MKDIR + SYMLINK at once (raw)",
            Op::Backend => "backend CreateVolume (no socket)",
            Op::Echo => "unix socket echo (no gRPC)",
            Op::Probe => "CSI Probe (socket, no storage)",
            Op::CreateVolume => "CSI CreateVolume (socket)",
        }
    }
}

/// Latency samples of one series, and the time its pairs (the measured call plus its
/// cleanup: RMDIR, REMOVE, DeleteVolume) took in all.
struct Series {
    op: Op,
    samples: Vec<Duration>,
    pairs_time: Duration,
}

impl Series {
    fn percentile(&self, p: f64) -> Duration {
        let mut sorted = self.samples.clone();
        sorted.sort();
        let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
        sorted.get(index).copied().unwrap_or_default()
    }

    fn pairs_per_second(&self) -> f64 {
        self.samples.len() as f64 / self.pairs_time.as_secs_f64()
    }
}

/// A record-sized symlink target, as CreateVolume writes one: the backend's own
/// record type, for a 1 GiB volume on an external export.
fn raw_record() -> String {
    Record {
        capacity_bytes: 1 << 30,
        placement: Placement {
            server: "127.0.0.1".into(),
            share: "/export".into(),
            sub_dir: vec!["bench".into()],
            mode: 0o777,
            owner: None,
            on_delete: OnDelete::Delete,
        },
        source: None,
    }
    .encode()
}

/// Directory of the raw series on the export.
const RAW_DIR: &str = "stowage-bench-raw";

/// Everything that takes samples, all on the client thread.
struct Clients {
    /// The NFS client pool for the raw series (the same kind CreateVolume uses).
    raw: NfsClient,
    /// A backend of its own for the in-process series.
    backend: NfsBackend,
    identity: IdentityClient<tonic::transport::Channel>,
    controller: ControllerClient<tonic::transport::Channel>,
    /// Our end of the echo thread's socket pair.
    echo: tokio::net::UnixStream,
    /// The symlink target of the raw SYMLINK series ([`raw_record`]).
    record: String,
}

/// Bytes sent and echoed back per echo sample: about a Probe's request.
const ECHO_SIZE: usize = 88;

/// Start a thread that echoes what arrives on its end of a unix socket pair with
/// blocking reads and writes (no runtime: the least a server can do) until the pair is
/// closed; our end is registered with this thread's runtime, as the CSI client is.
fn start_echo() -> anyhow::Result<tokio::net::UnixStream> {
    use std::io::{Read, Write};
    let (ours, mut theirs) = std::os::unix::net::UnixStream::pair()?;
    std::thread::Builder::new()
        .name("bench-echo".into())
        .spawn(move || {
            let mut buf = [0u8; ECHO_SIZE];
            while let Ok(n @ 1..) = theirs.read(&mut buf) {
                if theirs.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        })?;
    ours.set_nonblocking(true)?;
    Ok(tokio::net::UnixStream::from_std(ours)?)
}

impl Clients {
    /// `warmup + count` rounds of one sample of every series.
    async fn interleaved(&mut self, count: usize, warmup: usize) -> anyhow::Result<Vec<Series>> {
        self.raw.create_dir_all(&[RAW_DIR], 0o755, None).await?;
        let mut all: Vec<Series> = OPS
            .iter()
            .map(|&op| Series {
                op,
                samples: Vec::with_capacity(count),
                pairs_time: Duration::ZERO,
            })
            .collect();
        for i in 0..warmup + count {
            for series in &mut all {
                let started = Instant::now();
                let measured = self.sample(series.op, i).await?;
                if i >= warmup {
                    series.samples.push(measured);
                    series.pairs_time += started.elapsed();
                }
            }
        }
        self.raw.remove_all(&[RAW_DIR]).await?;
        Ok(all)
    }

    /// One sample of `op` (sample number `i`): the measured call's latency; its cleanup
    /// follows, unmeasured.
    async fn sample(&mut self, op: Op, i: usize) -> anyhow::Result<Duration> {
        let (dir_name, link_name) = (format!("d{i}"), format!("l{i}"));
        let dir = [RAW_DIR, dir_name.as_str()];
        let link = [RAW_DIR, link_name.as_str()];
        let (raw, record) = (&self.raw, &self.record);
        let started = Instant::now();
        let measured = match op {
            Op::Mkdir => {
                raw.create_dir(&dir, 0o755, None).await.context("MKDIR")?;
                let measured = started.elapsed();
                raw.remove_dir(&dir).await.context("RMDIR")?;
                measured
            }
            Op::Symlink => {
                raw.symlink(&link, record).await.context("SYMLINK")?;
                let measured = started.elapsed();
                raw.remove_file(&link).await.context("REMOVE")?;
                measured
            }
            Op::MkdirAndSymlink => {
                let (made, linked) = tokio::join!(
                    raw.create_dir(&dir, 0o755, None),
                    raw.symlink(&link, record)
                );
                made.context("MKDIR")?;
                linked.context("SYMLINK")?;
                let measured = started.elapsed();
                raw.remove_dir(&dir).await.context("RMDIR")?;
                raw.remove_file(&link).await.context("REMOVE")?;
                measured
            }
            Op::Backend => {
                let request = create_request("bench-in-process", i);
                let create = stowage_driver::csi::validate::create_volume(&request)
                    .map_err(|status| anyhow::anyhow!("{}", status.message()))?;
                let volume = self.backend.create_volume(&create).await?;
                let measured = started.elapsed();
                self.backend.delete_volume(&volume.id).await?;
                measured
            }
            Op::Echo => {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = [0u8; ECHO_SIZE];
                self.echo.write_all(&buf).await.context("echo write")?;
                self.echo.read_exact(&mut buf).await.context("echo read")?;
                started.elapsed()
            }
            Op::Probe => {
                self.identity.probe(proto::ProbeRequest {}).await?;
                started.elapsed()
            }
            Op::CreateVolume => {
                let volume = self
                    .controller
                    .create_volume(create_request("bench", i))
                    .await?
                    .into_inner()
                    .volume
                    .context("no volume")?;
                let measured = started.elapsed();
                self.controller
                    .delete_volume(proto::DeleteVolumeRequest {
                        volume_id: volume.volume_id,
                        ..Default::default()
                    })
                    .await?;
                measured
            }
        };
        Ok(measured)
    }
}

/// The CreateVolume request of sample `i`: 1 GiB, one mount capability, no parameters
/// (the default export).
fn create_request(prefix: &str, i: usize) -> proto::CreateVolumeRequest {
    proto::CreateVolumeRequest {
        name: format!("{prefix}-{i}"),
        capacity_range: Some(proto::CapacityRange {
            required_bytes: 1 << 30,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![proto::VolumeCapability {
            access_type: Some(vc::AccessType::Mount(vc::MountVolume::default())),
            access_mode: Some(vc::AccessMode {
                mode: vc::access_mode::Mode::SingleNodeWriter as i32,
            }),
        }],
        ..Default::default()
    }
}

/// N concurrent CreateVolume over the socket against an EC2 endpoint: volumes/s and
/// EC2 calls per volume by action (counted by the SDK interceptor). Deletes them after.
async fn ebs(endpoint: &str, volumes: usize) -> anyhow::Result<()> {
    use stowage_driver::backend::ebs::EbsBackend;
    use stowage_driver::backend::ebs::cloud::{Cloud, Ec2Settings};
    let scratch = tempfile::tempdir()?;
    let cloud = Arc::new(
        Cloud::new(Ec2Settings {
            endpoint: Some(endpoint.to_owned()),
            cluster_id: format!("stowage-bench-{}", std::process::id()),
            ..Ec2Settings::default()
        })
        .await,
    );
    let backend = EbsBackend::new(Arc::clone(&cloud), Some("us-east-1a".into()));
    let running = start(Plan {
        socket: scratch.path().join("csi.sock"),
        driver_name: stowage_api::keys::DEFAULT_DRIVER_NAME.into(),
        backends: Backends::new(vec![Arc::new(backend) as Arc<dyn Backend>]),
        controller: true,
        node: None,
        nfs_node: None,
        mounter: Arc::new(SystemMounter::default()),
        http_addr: None,
        shutdown_grace: Duration::from_secs(5),
        backend_check_interval: crate::run::DEFAULT_BACKEND_CHECK_INTERVAL,
    })
    .await?;
    let client = ControllerClient::new(channel::connect(&running.socket).await?);
    let started = Instant::now();
    let calls = (0..volumes).map(|i| {
        let mut client = client.clone();
        let request = create_request("bench", i);
        async move { client.create_volume(request).await }
    });
    let created = futures::future::join_all(calls).await;
    let elapsed = started.elapsed();
    let counts = cloud.call_counts();
    let mut ids = Vec::new();
    for result in created {
        ids.push(result?.into_inner().volume.context("no volume")?.volume_id);
    }
    println!(
        "stowage bench ebs: {volumes} concurrent CreateVolume against {endpoint}: {:.2?}, {:.0} volumes/s",
        elapsed,
        volumes as f64 / elapsed.as_secs_f64()
    );
    println!("{:<24} {:>8} {:>14}", "EC2 action", "calls", "per volume");
    for (action, n) in &counts {
        println!("{action:<24} {n:>8} {:>14.2}", *n as f64 / volumes as f64);
    }
    let mut client = client;
    for volume_id in ids {
        client
            .delete_volume(proto::DeleteVolumeRequest {
                volume_id,
                ..Default::default()
            })
            .await?;
    }
    running.stop().await
}
