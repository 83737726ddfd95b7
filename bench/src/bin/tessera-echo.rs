//! `tessera-echo`: the loopback ceiling. One pinned glommio executor per core, each with its
//! own listener on `port + core`, exactly like `tessera-server`, but every connection writes
//! back whatever it reads. Driving it with the same frames and the same load generator shows
//! what the machine's network stack costs, so Tessera's own cost per request can be read as
//! the difference.
//!
//! It runs until it gets SIGTERM or SIGINT (the default action: the process ends).

use std::os::fd::{FromRawFd, IntoRawFd};
use std::process::ExitCode;

use clap::Parser;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::{LocalExecutorBuilder, Placement};
use socket2::{Domain, Protocol, Socket, Type};

/// Bytes read per call.
const BUFFER_SIZE: usize = 64 * 1024;

/// Listen backlog per core.
const LISTEN_BACKLOG: i32 = 1024;

/// Echo every byte back, one pinned executor and listener per core.
#[derive(Debug, Parser)]
#[command(name = "tessera-echo", version, about)]
struct Flags {
    /// Executors (cores); core `i` listens on `port + i`.
    #[arg(long, default_value_t = 1)]
    cores: usize,
    /// Base port (0: any free port per core; the chosen ports are printed).
    #[arg(long, default_value_t = 7100)]
    port: u16,
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// CPUs to pin core `i` to (comma separated); default: CPU `i`.
    #[arg(long, value_delimiter = ',')]
    cpus: Vec<usize>,
    /// Spin this long before parking an idle executor (0: park at once), as
    /// `tessera-server --spin-before-park-us` does.
    #[arg(long, default_value_t = 0)]
    spin_before_park_us: u64,
    /// Socket I/O: `ring` (the core's own `io_uring`, as `tessera-server` does) or `glommio`
    /// (glommio's streams, one poll and one system call per message).
    #[arg(long, value_enum, default_value_t = Io::Ring)]
    io: Io,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Io {
    Ring,
    Glommio,
}

fn main() -> ExitCode {
    let flags = Flags::parse();
    let mut listeners = Vec::with_capacity(flags.cores);
    for core in 0..flags.cores {
        let port = if flags.port == 0 {
            Some(0)
        } else {
            u16::try_from(core)
                .ok()
                .and_then(|core| flags.port.checked_add(core))
        };
        let Some(port) = port else {
            eprintln!(
                "tessera-echo: port {} + core {core} is over 65535",
                flags.port
            );
            return ExitCode::from(2);
        };
        match bind(&flags.host, port) {
            Ok(listener) => listeners.push(listener),
            Err(error) => {
                eprintln!(
                    "tessera-echo: cannot listen on {}:{port}: {error}",
                    flags.host
                );
                return ExitCode::from(2);
            }
        }
    }
    let addresses: Vec<String> = listeners
        .iter()
        .filter_map(|listener| listener.local_addr().ok()?.as_socket())
        .map(|address| address.to_string())
        .collect();
    println!("{}", addresses.join(","));
    let threads: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(core, listener)| {
            let cpu = flags.cpus.get(core).copied().unwrap_or(core);
            let spin = std::time::Duration::from_micros(flags.spin_before_park_us);
            let io = flags.io;
            std::thread::spawn(move || serve_core(cpu, spin, io, listener))
        })
        .collect();
    for thread in threads {
        match thread.join() {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                eprintln!("tessera-echo: {error}");
                return ExitCode::from(1);
            }
            Err(_) => return ExitCode::from(1),
        }
    }
    ExitCode::SUCCESS
}

fn bind(host: &str, port: u16) -> std::io::Result<Socket> {
    let address: std::net::SocketAddr = format!("{host}:{port}")
        .parse()
        .map_err(|error| std::io::Error::new(std::io::ErrorKind::InvalidInput, error))?;
    let socket = Socket::new(
        Domain::for_address(address),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_tcp_nodelay(true)?;
    socket.bind(&address.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

fn serve_core(
    cpu: usize,
    spin: std::time::Duration,
    io: Io,
    listener: Socket,
) -> Result<(), String> {
    let mut builder = LocalExecutorBuilder::new(Placement::Fixed(cpu))
        .name("tessera-echo")
        .io_memory(1 << 20);
    if !spin.is_zero() {
        builder = builder.spin_before_park(spin);
    }
    let executor = builder
        .make()
        .map_err(|error| format!("cannot start an executor on cpu {cpu}: {error}"))?;
    executor.run(async move {
        // SAFETY: the descriptor is a listening TCP socket this process owns; ownership moves
        // into the glommio listener, which closes it.
        let listener = unsafe { glommio::net::TcpListener::from_raw_fd(listener.into_raw_fd()) };
        match io {
            Io::Glommio => loop {
                match listener.accept().await {
                    Ok(stream) => {
                        glommio::spawn_local(echo(stream)).detach();
                    }
                    Err(error) => {
                        eprintln!("tessera-echo: accept: {error}");
                        glommio::timer::sleep(std::time::Duration::from_millis(10)).await;
                    }
                }
            },
            Io::Ring => ring_echo::serve(listener).await,
        }
        Ok(())
    })
}

async fn echo(mut stream: glommio::net::TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut buffer = vec![0_u8; BUFFER_SIZE];
    loop {
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(size) => {
                if stream.write_all(&buffer[..size]).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Echo over the core's own `io_uring` ([`tessera_server::net::ring::SocketRing`]): the same
/// I/O path `tessera-server` uses, so this measures exactly what its sockets cost.
mod ring_echo {
    use std::cell::RefCell;
    use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
    use std::rc::Rc;

    use tessera_server::net::ring::{Completion, SocketRing};
    use tessera_server::runtime::LocalNotify;

    const RING_ENTRIES: u32 = 4096;

    struct Connection {
        fd: OwnedFd,
        /// Bytes received and not yet echoed; handed to the kernel as a whole when sending.
        buffer: Vec<u8>,
        filled: usize,
        sent: usize,
        is_receiving: bool,
        is_sending: bool,
        is_closing: bool,
    }

    pub async fn serve(listener: glommio::net::TcpListener) {
        let accepted: Rc<RefCell<Vec<OwnedFd>>> = Rc::default();
        let notify = LocalNotify::new();
        let _acceptor = glommio::spawn_local(accept(listener, accepted.clone(), notify.clone()));
        let Ok(mut ring) = SocketRing::new(RING_ENTRIES) else {
            eprintln!("tessera-echo: cannot create the socket ring");
            return;
        };
        let mut connections: Vec<Option<Connection>> = Vec::new();
        let mut completions = Vec::new();
        loop {
            for fd in accepted.borrow_mut().drain(..) {
                let connection = Connection {
                    fd,
                    buffer: vec![0; super::BUFFER_SIZE],
                    filled: 0,
                    sent: 0,
                    is_receiving: false,
                    is_sending: false,
                    is_closing: false,
                };
                match connections.iter().position(Option::is_none) {
                    Some(free) => connections[free] = Some(connection),
                    None => connections.push(Some(connection)),
                }
            }
            for (index, slot) in connections.iter_mut().enumerate() {
                queue_io(&mut ring, index, slot);
            }
            if ring.submit().is_err() {
                return;
            }
            completions.clear();
            ring.take_completions(&mut completions);
            if completions.is_empty() {
                futures_lite::future::or(ring.wait_signal(), notify.notified()).await;
                continue;
            }
            for &completion in &completions {
                complete(&mut connections, completion);
            }
            // Let timers and the acceptor run between batches.
            glommio::yield_if_needed().await;
        }
    }

    async fn accept(
        listener: glommio::net::TcpListener,
        accepted: Rc<RefCell<Vec<OwnedFd>>>,
        notify: LocalNotify,
    ) {
        loop {
            let Ok(stream) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            // SAFETY: the stream's descriptor is open for the duration of this call.
            let borrowed = unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) };
            if let Ok(fd) = borrowed.try_clone_to_owned() {
                accepted.borrow_mut().push(fd);
                notify.notify();
            }
        }
    }

    /// Queues the echo of what was received, or the next receive; frees a closed connection
    /// once nothing is in flight.
    fn queue_io(ring: &mut SocketRing, index: usize, slot: &mut Option<Connection>) {
        let Some(connection) = slot else { return };
        if connection.is_closing {
            if !connection.is_receiving && !connection.is_sending {
                *slot = None;
            }
            return;
        }
        let token = (index as u64) << 1;
        if connection.filled > connection.sent && !connection.is_sending {
            let rest = &connection.buffer[connection.sent..connection.filled];
            // SAFETY: the buffer is not touched or freed while a send is in flight
            // (is_sending), and the slot is only emptied once nothing is in flight.
            let pushed = unsafe {
                ring.push_send(connection.fd.as_raw_fd(), rest.as_ptr(), rest.len(), token)
            };
            connection.is_sending = pushed.is_ok();
        }
        if !connection.is_receiving && !connection.is_sending && connection.filled == 0 {
            let space = &mut connection.buffer[..];
            // SAFETY: as for the send: the buffer stays put while is_receiving.
            let pushed = unsafe {
                ring.push_receive(
                    connection.fd.as_raw_fd(),
                    space.as_mut_ptr(),
                    space.len(),
                    token | 1,
                )
            };
            connection.is_receiving = pushed.is_ok();
        }
    }

    fn complete(connections: &mut [Option<Connection>], completion: Completion) {
        let Completion { token, result } = completion;
        let index = usize::try_from(token >> 1).unwrap_or(usize::MAX);
        let Some(Some(connection)) = connections.get_mut(index) else {
            return;
        };
        let size = usize::try_from(result).unwrap_or(0);
        if token & 1 == 1 {
            connection.is_receiving = false;
            if size == 0 {
                connection.is_closing = true;
            }
            connection.filled = size;
            connection.sent = 0;
        } else {
            connection.is_sending = false;
            if result < 0 {
                connection.is_closing = true;
            }
            connection.sent += size;
            if connection.sent >= connection.filled {
                connection.sent = 0;
                connection.filled = 0;
            }
        }
    }
}
