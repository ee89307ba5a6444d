use clap::Parser;

/// mimalloc hands freed pages back to the OS promptly, so the controller's RSS follows
/// its live heap instead of the high-water mark of glibc's per-thread arenas.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = stowage::config::Cli::parse();
    stowage::telemetry::init(cli.log_format);
    match stowage::run::run(cli.command).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("stowage: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
