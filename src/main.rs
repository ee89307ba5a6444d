use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = stowage::config::Cli::parse();
    stowage::telemetry::init(cli.log_format);
    match stowage::execute(cli.command).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("stowage: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
