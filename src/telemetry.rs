//! Logging: tracing-subscriber with `RUST_LOG` filtering, text or JSON. The default
//! silences the nfs3_server crate, which logs every ordinary NFS answer such as
//! NOENT at `error` (set `RUST_LOG=nfs3_server=debug` to see it).

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,nfs3_server=off"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
