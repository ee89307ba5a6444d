//! Logging: tracing-subscriber with `RUST_LOG` filtering, text or JSON, on stderr.
//!
//! - The nfs3_server crate stays silent unless `RUST_LOG` names it: it logs every
//!   ordinary NFS answer such as NOENT at `error` and every connection at `info` (each
//!   TCP probe of `stowage nfs-server`, each relay connection). A plain `RUST_LOG=info`,
//!   as the chart sets, must not turn that on; `RUST_LOG=info,nfs3_server=debug` does.
//! - Text logs are coloured only when stderr is a terminal: `kubectl logs`, files and
//!   pipes get no ANSI escape codes.

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Without `RUST_LOG`.
const DEFAULT_LEVEL: &str = "info";
const QUIET_CRATE: &str = "nfs3_server";

/// The filter directives for a `RUST_LOG` value (`None`: unset).
pub fn filter_directives(rust_log: Option<&str>) -> String {
    let directives = rust_log
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .unwrap_or(DEFAULT_LEVEL);
    if directives.contains(QUIET_CRATE) {
        directives.to_owned()
    } else {
        format!("{directives},{QUIET_CRATE}=off")
    }
}

pub fn init(format: LogFormat) {
    let rust_log = std::env::var(EnvFilter::DEFAULT_ENV).ok();
    let filter = EnvFilter::try_new(filter_directives(rust_log.as_deref())).unwrap_or_else(|e| {
        eprintln!("stowage: ignoring RUST_LOG ({e}); logging at {DEFAULT_LEVEL}");
        EnvFilter::new(filter_directives(None))
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nfs3_server_stays_quiet_unless_named() {
        assert_eq!(filter_directives(None), "info,nfs3_server=off");
        assert_eq!(filter_directives(Some("")), "info,nfs3_server=off");
        assert_eq!(filter_directives(Some("info")), "info,nfs3_server=off");
        assert_eq!(
            filter_directives(Some("debug,stowage::provisioner=trace")),
            "debug,stowage::provisioner=trace,nfs3_server=off"
        );
        assert_eq!(
            filter_directives(Some("info,nfs3_server=debug")),
            "info,nfs3_server=debug"
        );
        for directives in [None, Some("info"), Some("warn,nfs3_server=trace")] {
            EnvFilter::try_new(filter_directives(directives)).unwrap();
        }
    }
}
