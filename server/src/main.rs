//! `tessera-server`: parses the configuration, starts one executor per core, and runs until
//! SIGINT or SIGTERM, then shuts down gracefully and exits 0. A core that fails to start or
//! dies makes the process exit non-zero with a message.

use std::process::ExitCode;

use clap::Parser;
use signal_hook::consts::{SIGINT, SIGTERM};
use tessera_server::config::{Config, Flags};
use tessera_server::{Server, ServerEvent};

fn main() -> ExitCode {
    let flags = Flags::parse();
    let config = match Config::from_flags(&flags) {
        Ok(config) => config,
        Err(config_error) => {
            eprintln!("tessera-server: {config_error}");
            return ExitCode::from(2);
        }
    };
    if flags.print_config {
        return match config.to_toml() {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(config_error) => {
                eprintln!("tessera-server: {config_error}");
                ExitCode::FAILURE
            }
        };
    }
    init_logging(&config.log);
    let mut signals = match signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) {
        Ok(signals) => signals,
        Err(signal_error) => {
            eprintln!("tessera-server: cannot install signal handlers: {signal_error}");
            return ExitCode::FAILURE;
        }
    };
    let server = match Server::start(config) {
        Ok(server) => server,
        Err(start_error) => {
            tracing::error!(%start_error, "cannot start");
            eprintln!("tessera-server: {start_error}");
            return ExitCode::FAILURE;
        }
    };
    let events = server.event_sender();
    let signal_handle = signals.handle();
    let signal_thread = std::thread::spawn(move || {
        if let Some(signal) = signals.forever().next() {
            let _ = events.send(ServerEvent::Signal(signal));
        }
    });
    let event = server.next_event();
    signal_handle.close();
    let _ = signal_thread.join();
    match event {
        Some(ServerEvent::Signal(signal)) => {
            tracing::info!(signal, "shutting down");
            match server.shutdown() {
                Ok(_summaries) => {
                    tracing::info!("stopped");
                    ExitCode::SUCCESS
                }
                Err(server_error) => {
                    eprintln!("tessera-server: {server_error}");
                    ExitCode::FAILURE
                }
            }
        }
        Some(ServerEvent::CoreFailed { core_id, reason }) => {
            tracing::error!(core_id, %reason, "a core's log failed; exiting so recovery can replay it");
            eprintln!("tessera-server: core {core_id}: {reason}");
            // Not a graceful stop: what is unacknowledged stays so, and recovery replays what
            // reached the disk.
            std::process::exit(3);
        }
        Some(ServerEvent::CoreExited { core_id }) => {
            tracing::error!(core_id, "a core exited unexpectedly; stopping");
            eprintln!("tessera-server: core {core_id} exited unexpectedly");
            let _ = server.shutdown();
            ExitCode::FAILURE
        }
        None => ExitCode::FAILURE,
    }
}

/// Silences glommio's one reactor message, unless the filter names glommio itself: opening a
/// log segment for direct writes, glommio probes the device for polled I/O with a read of
/// the write-only file, and logs the refused read as an error each time. The probe's answer
/// (no polled I/O) is the right one for a file that is only written.
const GLOMMIO_PROBE_DIRECTIVE: &str = "glommio::reactor=off";

fn init_logging(filter: &str) {
    let filter = if filter.contains("glommio") {
        filter.to_owned()
    } else {
        format!("{filter},{GLOMMIO_PROBE_DIRECTIVE}")
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
