//! stowage: a Kubernetes CSI driver and dynamic provisioner in one binary. This package
//! is the binary: the command line, the wiring and the benchmarks. The work lives in
//! the workspace's crates:
//!
//! - `stowage-api`: what the driver and the loops share (CSI protobufs, volume domain
//!   types, StorageClass key names, the metric registry).
//! - `stowage-nfs`: NFSv3, the client connection pool and the embedded server.
//! - `stowage-driver`: the backends (NFS, EBS), the CSI gRPC server and the node's OS
//!   work (mounts, devices, stats).
//! - `stowage-loops`: the Kubernetes loops (provisioner, attacher, resizer, leader
//!   election), driving any CSI driver over its socket.
//!
//! Here:
//! - [`config`]: the command line (`controller`, `node`, `local`, `nfs-server`,
//!   `bench`), every subcommand's flags.
//! - [`settings`]: what a serving role runs with, resolved from its flags (pure).
//! - [`run`]: wiring only: build backends, bind sockets, spawn tasks, shut down.
//! - [`telemetry`], [`http`], [`health`]: logs; `/metrics`, `/healthz`, `/readyz`,
//!   `/debug/attempts`, and what the health endpoints check.
//! - [`gc`]: `stowage gc` and the controller's periodic run: orphan volumes, PVs
//!   whose volume is gone.
//! - [`explain`]: `stowage explain`: why a claim, PV or attachment is stuck.
//! - [`bench`](mod@bench): `stowage bench`, NFS CreateVolume latency and pairs/s; EBS
//!   concurrent CreateVolume with EC2 calls per volume; `bench provision`, claims to
//!   Bound against a cluster.
#![forbid(unsafe_code)]

pub mod bench;
pub mod config;
pub mod explain;
pub mod gc;
pub mod health;
pub mod http;
pub mod run;
pub mod settings;
pub mod telemetry;

use config::Command;
use run::ShutdownSignals;

/// Run one subcommand to its end. Serving roles catch SIGINT/SIGTERM before anything
/// serves; a bench keeps the default action.
pub async fn execute(command: Command) -> anyhow::Result<()> {
    let serve = match &command {
        Command::Controller(args) => settings::controller(args),
        Command::Node(args) => settings::node(args),
        Command::Local(args) => settings::local(args),
        Command::NfsServer(args) => {
            return run::nfs_server(args.clone(), ShutdownSignals::new()?).await;
        }
        Command::Bench(args) => return bench::run(bench::Bench::of(args)).await,
        Command::Gc(args) => {
            return gc::run(settings::gc(args).map_err(anyhow::Error::msg)?).await;
        }
        Command::Explain(args) => return explain::run(args.clone()).await,
    };
    let serve = serve.map_err(anyhow::Error::msg)?;
    run::serve(serve, ShutdownSignals::new()?).await
}
