//! `tessera-server`: parses the configuration, starts one executor per core, and runs until
//! SIGINT or SIGTERM, then shuts down gracefully and exits 0. A core that fails to start or
//! dies makes the process exit non-zero with a message.
//!
//! Under systemd (`Type=notify`) it reports `READY=1` only once [`Server::start`] returned
//! (recovery done, every core listening), `STOPPING=1` when a signal starts the stop, and,
//! if the unit has `WatchdogSec=`, pings the watchdog while every core makes progress.

use std::process::ExitCode;

use clap::Parser;
use signal_hook::consts::{SIGINT, SIGTERM};
use tessera_server::config::{Config, Flags, LogTarget};
use tessera_server::systemd::{self, Watchdog};
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
    if let Err(reason) = init_logging(&config.log, &config.log_target) {
        eprintln!("tessera-server: {reason}");
        return ExitCode::from(2);
    }
    let mut signals = match signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) {
        Ok(signals) => signals,
        Err(signal_error) => {
            eprintln!("tessera-server: cannot install signal handlers: {signal_error}");
            return ExitCode::FAILURE;
        }
    };
    let tick_ms = config.tick_ms;
    let server = match Server::start(config) {
        Ok(server) => server,
        Err(start_error) => {
            tracing::error!(%start_error, "cannot start");
            eprintln!("tessera-server: {start_error}");
            return ExitCode::FAILURE;
        }
    };
    let addresses = server.addresses();
    systemd::notify_ready(&format!(
        "serving {} cores on {}",
        addresses.len(),
        addresses.join(",")
    ));
    let watchdog = match Watchdog::start_if_enabled(server.core_progress(), tick_ms) {
        Ok(watchdog) => watchdog,
        Err(spawn_error) => {
            eprintln!("tessera-server: cannot start the watchdog thread: {spawn_error}");
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
    // systemd stops watching once the unit stops; a core that stops ticking while it
    // drains must not look stuck meanwhile.
    drop(watchdog);
    match event {
        Some(ServerEvent::Signal(signal)) => {
            tracing::info!(signal, "shutting down");
            systemd::notify_stopping();
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

/// Installs the log subscriber writing to `target`.
fn init_logging(filter: &str, target: &LogTarget) -> Result<(), String> {
    let filter = if filter.contains("glommio") {
        filter.to_owned()
    } else {
        format!("{filter},{GLOMMIO_PROBE_DIRECTIVE}")
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match target {
        LogTarget::Stderr => builder.with_writer(std::io::stderr).init(),
        LogTarget::File(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|error| {
                    format!("cannot open log target file:{}: {error}", path.display())
                })?;
            builder
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(file))
                .init();
        }
    }
    Ok(())
}
