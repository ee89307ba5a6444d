//! `stowage bench`: CreateVolume+DeleteVolume pairs per second and CreateVolume latency
//! over the CSI socket against the NFS backend, printed beside the raw MKDIR round trip
//! to the same server measured the same way, so the overhead over the wire is visible.
//! Also the raw SYMLINK and MKDIR + SYMLINK at once: the wire work of a new volume (its
//! directory and its record), and the backend's CreateVolume called in-process, so what
//! the backend and what the socket add on top of the wire each show.
//! Benchmarks live here, never as timed assertions in tests.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::backend::nfs::client::{ClientConfig, NfsClient, NfsTarget};
use crate::backend::nfs::server::EmbeddedServer;
use crate::backend::nfs::{DefaultExport, NfsBackend, NfsConfig};
use crate::backend::{Backend, Backends};
use crate::csi::channel;
use crate::csi::proto::{
    self, controller_client::ControllerClient, identity_client::IdentityClient,
    volume_capability as vc,
};
use crate::node::SystemMounter;
use crate::run::{Plan, start};

pub mod provision;

#[derive(Debug, Clone, clap::Args)]
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
    #[arg(long)]
    pub ebs_endpoint: Option<String>,

    /// With --ebs-endpoint: how many CreateVolume calls run at once.
    #[arg(long, default_value_t = 50)]
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
    Provision(provision::ProvisionArgs),
}

/// Latency samples of one series.
struct Series {
    name: &'static str,
    samples: Vec<Duration>,
    pairs_per_second: f64,
}

impl Series {
    fn percentile(&self, p: f64) -> Duration {
        let mut sorted = self.samples.clone();
        sorted.sort();
        let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
        sorted.get(index).copied().unwrap_or_default()
    }
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if let Some(BenchKind::Provision(provision)) = args.what {
        return provision::run(provision).await;
    }
    if let Some(endpoint) = args.ebs_endpoint.clone() {
        return ebs(&endpoint, args.volumes).await;
    }
    let scratch = tempfile::tempdir()?;
    let (embedded, target, label) = match (args.nfs_server, &args.nfs_share) {
        (Some(server), Some(share)) => {
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
    let raw = {
        let (target, config, args) = (target.clone(), client_config.clone(), args.clone());
        on_client_thread(async move { raw_series(&target, &config, &args).await }).await?
    };

    let nfs_config = NfsConfig {
        default_export: Some(DefaultExport {
            target: target.clone(),
            local_dir: None,
        }),
        client: client_config,
        resolve_timeout: Duration::from_secs(5),
    };
    let in_process = {
        let (config, args) = (nfs_config.clone(), args.clone());
        on_client_thread(async move { backend_pairs(NfsBackend::new(config), &args).await }).await?
    };
    let backend = NfsBackend::new(nfs_config);
    let running = start(Plan {
        socket: scratch.path().join("csi.sock"),
        driver_name: crate::config::DEFAULT_DRIVER_NAME.into(),
        backends: Backends::new(vec![Arc::new(backend) as Arc<dyn Backend>]),
        controller: true,
        node: None,
        mounter: Arc::new(SystemMounter::default()),
        http_addr: None,
        shutdown_grace: Duration::from_secs(5),
    })
    .await?;
    let (socket, bench_args) = (running.socket.clone(), args.clone());
    let measured = on_client_thread(async move {
        let probe = csi_probe(&socket, &bench_args).await?;
        let csi = csi_pairs(&socket, &bench_args).await?;
        anyhow::Ok((probe, csi))
    })
    .await;
    running.stop().await?;
    if let Some(server) = embedded {
        server.shutdown().await;
    }
    let (probe, csi) = measured?;

    println!(
        "stowage bench: {label}, {} measured ops per series after {} warm-up",
        args.count, args.warmup
    );
    println!(
        "{:<34} {:>10} {:>10} {:>12}",
        "series", "p50", "p99", "pairs/s"
    );
    for series in raw.iter().chain([&in_process, &probe, &csi]) {
        println!(
            "{:<34} {:>10.1?} {:>10.1?} {:>12.0}",
            series.name,
            series.percentile(0.50),
            series.percentile(0.99),
            series.pairs_per_second
        );
    }
    let ratio = csi.percentile(0.5).as_secs_f64() / raw[0].percentile(0.5).as_secs_f64();
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

/// What one raw sample does on the wire.
#[derive(Clone, Copy)]
enum RawOp {
    Mkdir,
    Symlink,
    /// MKDIR and SYMLINK at once on two connections: the wire work of a new volume.
    MkdirAndSymlink,
}

/// A record-sized symlink target, as CreateVolume writes one.
const RAW_RECORD: &str = r#"{"capacity_bytes":1073741824,"placement":{"server":"127.0.0.1","share":"/export","sub_dir":["bench"],"mode":511,"owner":null}}"#;

/// The raw NFS series: one operation per sample (+ its removal, unmeasured), through
/// the same client pool CreateVolume uses.
async fn raw_series(
    target: &NfsTarget,
    config: &ClientConfig,
    args: &BenchArgs,
) -> anyhow::Result<Vec<Series>> {
    let client = NfsClient::new(target.clone(), config.clone());
    client
        .mkdir_all(&["stowage-bench-raw"], 0o755, None)
        .await?;
    let mut all = Vec::new();
    for (op, name) in [
        (RawOp::Mkdir, "NFS MKDIR (raw RPC)"),
        (RawOp::Symlink, "NFS SYMLINK (raw RPC)"),
        (RawOp::MkdirAndSymlink, "NFS MKDIR + SYMLINK at once (raw)"),
    ] {
        all.push(raw_op(&client, op, name, args).await?);
    }
    client.remove_all(&["stowage-bench-raw"]).await?;
    Ok(all)
}

async fn raw_op(
    client: &NfsClient,
    op: RawOp,
    name: &'static str,
    args: &BenchArgs,
) -> anyhow::Result<Series> {
    let mut samples = Vec::with_capacity(args.count);
    let started = Instant::now();
    for i in 0..args.warmup + args.count {
        if i == args.warmup {
            samples.clear();
        }
        let dir_name = format!("d{i}");
        let link_name = format!("l{i}");
        let dir = ["stowage-bench-raw", dir_name.as_str()];
        let link = ["stowage-bench-raw", link_name.as_str()];
        let t = Instant::now();
        match op {
            RawOp::Mkdir => {
                client
                    .create_dir(&dir, 0o755, None)
                    .await
                    .context("MKDIR")?;
            }
            RawOp::Symlink => client.symlink(&link, RAW_RECORD).await.context("SYMLINK")?,
            RawOp::MkdirAndSymlink => {
                let (made, linked) = tokio::join!(
                    client.create_dir(&dir, 0o755, None),
                    client.symlink(&link, RAW_RECORD)
                );
                made.context("MKDIR")?;
                linked.context("SYMLINK")?;
            }
        }
        samples.push(t.elapsed());
        if matches!(op, RawOp::Mkdir | RawOp::MkdirAndSymlink) {
            client.remove_dir(&dir).await.context("RMDIR")?;
        }
        if matches!(op, RawOp::Symlink | RawOp::MkdirAndSymlink) {
            client.remove_file(&link).await.context("REMOVE")?;
        }
    }
    let measured = started
        .elapsed()
        .mul_f64(args.count as f64 / (args.warmup + args.count) as f64);
    Ok(Series {
        name,
        pairs_per_second: args.count as f64 / measured.as_secs_f64(),
        samples,
    })
}

/// The floor of any CSI call here: Identity Probe over the same socket.
async fn csi_probe(socket: &std::path::Path, args: &BenchArgs) -> anyhow::Result<Series> {
    let mut client = IdentityClient::new(channel::connect(socket).await?);
    let mut samples = Vec::with_capacity(args.count);
    let started = Instant::now();
    for i in 0..args.warmup + args.count {
        if i == args.warmup {
            samples.clear();
        }
        let t = Instant::now();
        client.probe(proto::ProbeRequest {}).await?;
        samples.push(t.elapsed());
    }
    let measured = started
        .elapsed()
        .mul_f64(args.count as f64 / (args.warmup + args.count) as f64);
    Ok(Series {
        name: "CSI Probe (socket, no storage)",
        pairs_per_second: args.count as f64 / measured.as_secs_f64(),
        samples,
    })
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

/// CreateVolume (measured) + DeleteVolume called on the backend in this thread: the
/// same requests as over the socket, without the socket.
async fn backend_pairs(backend: NfsBackend, args: &BenchArgs) -> anyhow::Result<Series> {
    let mut samples = Vec::with_capacity(args.count);
    let mut measured = Duration::ZERO;
    for i in 0..args.warmup + args.count {
        let request = create_request("bench-in-process", i);
        let t = Instant::now();
        let create = crate::csi::validate::create_volume(&request)
            .map_err(|status| anyhow::anyhow!("{}", status.message()))?;
        let volume = backend.create_volume(&create).await?;
        let created = t.elapsed();
        backend.delete_volume(&volume.id).await?;
        if i >= args.warmup {
            samples.push(created);
            measured += t.elapsed();
        }
    }
    Ok(Series {
        name: "backend CreateVolume (no socket)",
        pairs_per_second: args.count as f64 / measured.as_secs_f64(),
        samples,
    })
}

/// CreateVolume (measured) + DeleteVolume over the CSI socket.
async fn csi_pairs(socket: &std::path::Path, args: &BenchArgs) -> anyhow::Result<Series> {
    let mut client = ControllerClient::new(channel::connect(socket).await?);
    let mut samples = Vec::with_capacity(args.count);
    let mut measured = Duration::ZERO;
    for i in 0..args.warmup + args.count {
        let request = create_request("bench", i);
        let t = Instant::now();
        let volume = client
            .create_volume(request)
            .await?
            .into_inner()
            .volume
            .context("no volume")?;
        let create = t.elapsed();
        client
            .delete_volume(proto::DeleteVolumeRequest {
                volume_id: volume.volume_id,
                ..Default::default()
            })
            .await?;
        if i >= args.warmup {
            samples.push(create);
            measured += t.elapsed();
        }
    }
    Ok(Series {
        name: "CSI CreateVolume (socket)",
        pairs_per_second: args.count as f64 / measured.as_secs_f64(),
        samples,
    })
}

/// N concurrent CreateVolume over the socket against an EC2 endpoint: volumes/s and
/// EC2 calls per volume by action (counted by the SDK interceptor). Deletes them after.
async fn ebs(endpoint: &str, volumes: usize) -> anyhow::Result<()> {
    use crate::backend::ebs::EbsBackend;
    use crate::backend::ebs::cloud::{Cloud, Ec2Settings};
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
        driver_name: crate::config::DEFAULT_DRIVER_NAME.into(),
        backends: Backends::new(vec![Arc::new(backend) as Arc<dyn Backend>]),
        controller: true,
        node: None,
        mounter: Arc::new(SystemMounter::default()),
        http_addr: None,
        shutdown_grace: Duration::from_secs(5),
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
