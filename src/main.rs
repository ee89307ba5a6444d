#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = match stowage::config::parse_from(std::env::args_os()) {
        Ok(cli) => cli,
        Err(error) => error.exit(),
    };
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
