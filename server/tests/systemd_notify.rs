//! The binary under a service manager of `Type=notify`, played by this test: `NOTIFY_SOCKET`
//! names a datagram socket the test binds, `WATCHDOG_USEC`/`WATCHDOG_PID` ask for watchdog
//! pings. The server must say `READY=1` (with a status) once it serves, ping `WATCHDOG=1`
//! while its cores run, and say `STOPPING=1` when SIGTERM stops it, then exit 0.

use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Longest the test waits for any one notification.
const NOTIFICATION_WAIT_MAX: Duration = Duration::from_secs(10);

/// The server process, killed if the test fails before it exits.
struct ServerProcess(Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Receives datagrams until one contains `wanted`, returning it.
fn wait_for(socket: &UnixDatagram, wanted: &str, seen: &mut Vec<String>) -> String {
    let deadline = Instant::now() + NOTIFICATION_WAIT_MAX;
    let mut buffer = [0_u8; 4096];
    while Instant::now() < deadline {
        match socket.recv(&mut buffer) {
            Ok(length) => {
                let message = String::from_utf8_lossy(&buffer[..length]).into_owned();
                seen.push(message.clone());
                if message.lines().any(|line| line == wanted) {
                    return message;
                }
            }
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(error) => panic!("receive a notification: {error}"),
        }
    }
    panic!("no {wanted} within {NOTIFICATION_WAIT_MAX:?}; received {seen:?}");
}

#[test]
fn the_binary_reports_ready_pings_the_watchdog_and_reports_stopping() {
    let directory = std::env::temp_dir().join(format!("tessera-notify-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&directory);
    std::fs::create_dir_all(&directory).unwrap();
    let socket_path = directory.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();

    // systemd sets WATCHDOG_PID to the service's pid; `exec` keeps the shell's pid, so the
    // shell can name it before it becomes the server.
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg("WATCHDOG_PID=$$ exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_tessera-server"))
        .args([
            "--port",
            "0",
            "--cores",
            "2",
            "--memory-bytes-max",
            "256MiB",
        ])
        .args(["--log", "warn", "--durability", "memory"]);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("TESSERA_") {
            command.env_remove(name);
        }
    }
    let child = command
        .env("TESSERA_INSTANCE_DIR", directory.join("instances"))
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "200000")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut process = ServerProcess(child);
    let child = &mut process.0;

    let mut seen = Vec::new();
    let ready = wait_for(&socket, "READY=1", &mut seen);
    let status = ready
        .lines()
        .find_map(|line| line.strip_prefix("STATUS="))
        .unwrap_or_else(|| panic!("READY=1 came without a status: {ready:?}"));
    assert!(status.starts_with("serving 2 cores on "), "{status}");
    // Ready means serving: every core's address in the status accepts now.
    let addresses = status.trim_start_matches("serving 2 cores on ");
    for address in addresses.split(',') {
        TcpStream::connect(address).unwrap_or_else(|error| panic!("connect {address}: {error}"));
    }
    wait_for(&socket, "WATCHDOG=1", &mut seen);
    // Pings keep coming while the cores run.
    wait_for(&socket, "WATCHDOG=1", &mut seen);

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    wait_for(&socket, "STOPPING=1", &mut seen);
    let deadline = Instant::now() + NOTIFICATION_WAIT_MAX;
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        assert!(
            Instant::now() < deadline,
            "the server did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(exit.success(), "exit {exit}: {stderr}");
    std::fs::remove_dir_all(&directory).unwrap();
}
