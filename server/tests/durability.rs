//! Durability of the real binary: acknowledged writes survive SIGKILL.
//!
//! The crash loop starts `tessera-server --durability sync` on a data directory of its own,
//! runs writers that record every write the server acknowledged (puts of unique keys, and
//! overwrites of one key per writer with an increasing number), kills the server with SIGKILL
//! at a random moment, restarts it on the same directory, and checks that every acknowledged
//! unique key is there with its value and that every overwritten key holds its last
//! acknowledged number or a later one (a write sent but not acknowledged may or may not have
//! made it). `TESSERA_CRASH_LOOP_KILLS` sets the number of kills (default 50; see
//! `docs/storage.md` for the longer mode); the seed of the kill timings is printed and
//! `TESSERA_CRASH_LOOP_SEED` replays it.
//!
//! The disk-full test puts the data directory on a small loop-mounted ext4 filesystem (it
//! needs root, `losetup`/`mount` and `mkfs.ext4`; without them it says SKIPPED and why, and
//! passes), fills it, and checks that writes are refused with `NoSpace` while reads go on,
//! that writes are accepted again once space is freed, and that nothing acknowledged is lost.

mod common;

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use common::{free_port_pair, RawConnection, TestDir};
use tessera_protocol::{Put, Request, Response};

/// Longest the binary may take to recover and serve.
const START_DURATION_MAX: Duration = Duration::from_secs(20);

/// Writers running against each incarnation of the server.
const WRITER_COUNT: usize = 4;

/// Keys per verification request.
const VERIFY_BATCH: usize = 500;

struct ServerProcess {
    child: Child,
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(data_dir: &Path, base: u16) -> ServerProcess {
    start_with(
        data_dir,
        base,
        2,
        // Small segments and frequent snapshots, so kills land during snapshots, segment
        // switches and log truncation too.
        &[
            "--segment-bytes-max",
            "1MiB",
            "--snapshot-log-bytes",
            "128KiB",
        ],
    )
}

/// Waits until ports `base..base + core_count` can be bound again. A killed server's
/// listening sockets can outlive it briefly: the kernel tears its `io_uring` instances down
/// (and closes the sockets with operations in flight on them) after the process is gone.
fn wait_until_free(base: u16, core_count: u16) {
    let deadline = Instant::now() + START_DURATION_MAX;
    while !(base..base + core_count)
        .all(|port| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok())
    {
        assert!(Instant::now() < deadline, "port {base} stays taken");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Starts the binary with `core_count` cores from port `base` on `data_dir` in `sync` mode,
/// with `extra` flags, and waits until every core serves.
fn start_with(data_dir: &Path, base: u16, core_count: u16, extra: &[&str]) -> ServerProcess {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tessera-server"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("TESSERA_") {
            command.env_remove(name);
        }
    }
    let child = command
        .args(["--cores", &core_count.to_string()])
        .args(["--port", &base.to_string()])
        .args(["--data-dir", &data_dir.display().to_string()])
        .args(["--durability", "sync", "--memory-bytes-max", "256MiB"])
        .args(extra)
        .args(["--log", "warn"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the binary");
    let mut process = ServerProcess { child };
    let deadline = Instant::now() + START_DURATION_MAX;
    loop {
        if let Some(status) = process.child.try_wait().unwrap() {
            panic!("the server exited with {status} before serving");
        }
        let is_serving =
            (base..base + core_count).all(|port| TcpStream::connect(("127.0.0.1", port)).is_ok());
        if is_serving {
            return process;
        }
        assert!(
            Instant::now() < deadline,
            "the server did not start serving"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// What the server acknowledged, across every incarnation.
#[derive(Default)]
struct Acknowledged {
    /// Unique keys and their values.
    unique: Vec<(Vec<u8>, Vec<u8>)>,
    /// The last number acknowledged for each overwritten key.
    overwritten: HashMap<Vec<u8>, u64>,
}

fn put(connection: &mut RawConnection, request_id: u64, key: &[u8], value: &[u8]) -> bool {
    let request = Request::Put(Box::new(Put::new(key, value)));
    if connection.send(request_id, &request).is_err() {
        return false;
    }
    matches!(
        connection.receive(),
        Ok(Some((id, Response::Put { applied: true, .. }))) if id == request_id
    )
}

/// Writes until the connection breaks (the kill), recording what was acknowledged.
fn write_until_killed(
    address: &str,
    writer: usize,
    round: usize,
    acknowledged: &Mutex<Acknowledged>,
    stop: &AtomicBool,
) {
    let Ok(mut connection) = RawConnection::try_open(address) else {
        return;
    };
    let overwritten_key = format!("overwritten:{writer}").into_bytes();
    let mut number = acknowledged
        .lock()
        .unwrap()
        .overwritten
        .get(&overwritten_key)
        .copied()
        .unwrap_or(0);
    for index in 1_u64.. {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let key = format!("unique:{writer}:{round}:{index}").into_bytes();
        let value = format!("value-{round}-{index}").into_bytes();
        if !put(&mut connection, 2 * index, &key, &value) {
            return;
        }
        acknowledged.lock().unwrap().unique.push((key, value));
        number += 1;
        if !put(
            &mut connection,
            2 * index + 1,
            &overwritten_key,
            format!("{number:020}").as_bytes(),
        ) {
            return;
        }
        acknowledged
            .lock()
            .unwrap()
            .overwritten
            .insert(overwritten_key.clone(), number);
    }
}

/// Checks every acknowledged write against the server; returns how many were checked.
fn verify(address: &str, acknowledged: &Acknowledged) -> usize {
    let mut connection = RawConnection::open(address);
    let mut checked = 0;
    // Batches small enough that the reply stays far below the frame limit.
    let largest = acknowledged
        .unique
        .iter()
        .map(|(_, value)| value.len())
        .max()
        .unwrap_or(0);
    let batch_size = VERIFY_BATCH.min((4 << 20) / (largest + 64));
    for batch in acknowledged.unique.chunks(batch_size) {
        let keys: Vec<Vec<u8>> = batch.iter().map(|(key, _)| key.clone()).collect();
        let Response::Values(values) = connection.call(&Request::MultiGet { keys }) else {
            panic!("mget failed");
        };
        for ((key, value), found) in batch.iter().zip(values) {
            let found = found.unwrap_or_else(|| {
                panic!(
                    "acknowledged key {} is missing after the crash",
                    String::from_utf8_lossy(key)
                )
            });
            assert_eq!(&found.value, value, "key {}", String::from_utf8_lossy(key));
            // Written once: created by that write, which is its only one.
            assert_eq!(
                (found.version, found.create_revision),
                (1, found.mod_revision),
                "key {}",
                String::from_utf8_lossy(key)
            );
            checked += 1;
        }
    }
    for (key, &number) in &acknowledged.overwritten {
        let found = connection.get(key).unwrap_or_else(|| {
            panic!(
                "overwritten key {} is missing",
                String::from_utf8_lossy(key)
            )
        });
        let stored: u64 = String::from_utf8_lossy(&found.value).parse().unwrap();
        assert!(
            stored >= number,
            "key {} holds {stored}, but {number} was acknowledged",
            String::from_utf8_lossy(key)
        );
        // Never deleted, so still the key its first write created, and each value is at most
        // one more than the one before it (a writer resumes after the last acknowledged
        // number), so it took at least `stored` writes to get there.
        assert!(
            found.create_revision <= found.mod_revision
                && (found.version == 1) == (found.create_revision == found.mod_revision),
            "key {}: {found:?}",
            String::from_utf8_lossy(key)
        );
        assert!(
            found.version >= stored,
            "key {} holds {stored} after {} writes",
            String::from_utf8_lossy(key),
            found.version
        );
        checked += 1;
    }
    checked
}

/// Held by every test here for its whole run: they start servers on ports they picked free,
/// and a port the crash loop's killed server has just let go of (and will bind again) looks
/// free to another test, which could then talk to the crash loop's server instead of its own.
static PORT_USERS: Mutex<()> = Mutex::new(());

#[test]
fn acknowledged_writes_survive_sigkill() {
    let _ports = PORT_USERS.lock().unwrap_or_else(PoisonError::into_inner);
    let kill_count: usize = std::env::var("TESSERA_CRASH_LOOP_KILLS")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(50);
    let seed: u64 = std::env::var("TESSERA_CRASH_LOOP_SEED")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or_else(|| RandomState::new().hash_one(std::process::id()));
    eprintln!("crash loop: {kill_count} kills, seed {seed} (TESSERA_CRASH_LOOP_SEED replays it)");
    let data_dir = TestDir::new("crash-loop");
    let acknowledged = Arc::new(Mutex::new(Acknowledged::default()));
    let mut timing = seed;
    let started = Instant::now();
    let mut base = free_port_pair();
    for round in 0..kill_count {
        let server = start(&data_dir.0, base);
        let addresses = [
            format!("127.0.0.1:{base}"),
            format!("127.0.0.1:{}", base + 1),
        ];
        verify(&addresses[round % 2], &acknowledged.lock().unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..WRITER_COUNT)
            .map(|writer| {
                let address = addresses[writer % 2].clone();
                let acknowledged = acknowledged.clone();
                let stop = stop.clone();
                std::thread::spawn(move || {
                    write_until_killed(&address, writer, round, &acknowledged, &stop);
                })
            })
            .collect();
        // xorshift: a kill 20 to 220 ms after the writers start.
        timing ^= timing << 13;
        timing ^= timing >> 7;
        timing ^= timing << 17;
        std::thread::sleep(Duration::from_millis(20 + timing % 200));
        drop(server); // SIGKILL and reap.
        stop.store(true, Ordering::Relaxed);
        for writer in writers {
            writer.join().unwrap();
        }
        wait_until_free(base, 2);
        if round % 10 == 9 {
            // Ports may be taken by others meanwhile; move now and then.
            base = free_port_pair();
        }
    }
    let server = start(&data_dir.0, base);
    let checked = verify(&format!("127.0.0.1:{base}"), &acknowledged.lock().unwrap());
    drop(server);
    let count_files = |suffix: &str| {
        (0..2)
            .flat_map(|core| std::fs::read_dir(data_dir.0.join(format!("core-{core}"))).unwrap())
            .filter(|entry| {
                entry
                    .as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(suffix)
            })
            .count()
    };
    let (snapshot_count, segment_count) = (count_files(".snap"), count_files(".log"));
    eprintln!("crash loop: {snapshot_count} snapshots and {segment_count} log segments remain");
    assert!(
        snapshot_count >= 1,
        "no snapshot was taken, so none was recovered from"
    );
    let acknowledged = acknowledged.lock().unwrap();
    eprintln!(
        "crash loop: {kill_count} kills in {:?}, {} acknowledged unique writes and {} \
         overwritten keys checked ({checked} in the last check), none lost",
        started.elapsed(),
        acknowledged.unique.len(),
        acknowledged.overwritten.len()
    );
    assert!(
        acknowledged.unique.len() >= kill_count,
        "the writers made too little progress to test anything: {}",
        acknowledged.unique.len()
    );
}

/// A small ext4 filesystem in a file, loop-mounted; unmounted and removed when dropped.
struct LoopFilesystem {
    image: PathBuf,
    mount: PathBuf,
}

fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|error| format!("cannot run {program}: {error}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

impl LoopFilesystem {
    fn create(size_bytes: u64) -> Result<Self, String> {
        let base = std::env::temp_dir().join(format!(
            "tessera-loop-{}-{}",
            std::process::id(),
            RandomState::new().hash_one(1_u8)
        ));
        let image = base.with_extension("img");
        let mount = base.with_extension("mnt");
        std::fs::File::create(&image)
            .and_then(|file| file.set_len(size_bytes))
            .map_err(|error| format!("cannot create {}: {error}", image.display()))?;
        std::fs::create_dir_all(&mount).map_err(|error| error.to_string())?;
        let filesystem = Self { image, mount };
        let image = filesystem.image.display().to_string();
        let mount = filesystem.mount.display().to_string();
        run("mkfs.ext4", &["-q", "-F", &image])?;
        run("mount", &["-o", "loop", &image, &mount])?;
        Ok(filesystem)
    }

    /// Bytes a file could still take.
    fn available(&self) -> u64 {
        let output = Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(&self.mount)
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .nth(1)
            .and_then(|line| line.trim().parse().ok())
            .unwrap()
    }
}

impl Drop for LoopFilesystem {
    fn drop(&mut self) {
        let mount = self.mount.display().to_string();
        if run("umount", &[&mount]).is_err() {
            let _ = run("umount", &["-l", &mount]);
        }
        let _ = std::fs::remove_dir(&self.mount);
        let _ = std::fs::remove_file(&self.image);
    }
}

fn put_answer(
    connection: &mut RawConnection,
    request_id: u64,
    key: &[u8],
    value: &[u8],
) -> Response {
    connection
        .send(request_id, &Request::Put(Box::new(Put::new(key, value))))
        .unwrap();
    match connection.receive() {
        Ok(Some((id, response))) if id == request_id => response,
        other => panic!("no answer to put {request_id}: {other:?}"),
    }
}

fn is_no_space(response: &Response) -> bool {
    matches!(response, Response::Error(error) if error.code == tessera_protocol::ErrorCode::NoSpace)
}

#[test]
fn a_full_disk_refuses_writes_with_no_space_until_space_is_freed() {
    let _ports = PORT_USERS.lock().unwrap_or_else(PoisonError::into_inner);
    let filesystem = match LoopFilesystem::create(48 * 1024 * 1024) {
        Ok(filesystem) => filesystem,
        Err(reason) => {
            eprintln!("SKIPPED: the disk-full test needs a loop-mounted filesystem: {reason}");
            return;
        }
    };
    let data_dir = filesystem.mount.join("data");
    // Ballast leaves the server a few segments' worth of space; removing it frees space.
    let ballast = filesystem.mount.join("ballast");
    let ballast_size = filesystem.available().saturating_sub(6 * 1024 * 1024);
    std::fs::write(&ballast, vec![0_u8; usize::try_from(ballast_size).unwrap()]).unwrap();
    let flags = ["--segment-bytes-max", "1MiB", "--snapshot-log-bytes", "0"];
    let base = free_port_pair();
    let address = format!("127.0.0.1:{base}");
    let server = start_with(&data_dir, base, 1, &flags);
    let mut connection = RawConnection::open(&address);
    let mut acknowledged = Acknowledged::default();
    let value = vec![b'v'; 32 * 1024];
    let mut refusal = None;
    for index in 1..=2000_u64 {
        let key = format!("fill:{index}").into_bytes();
        match put_answer(&mut connection, index, &key, &value) {
            Response::Put { applied: true, .. } => acknowledged.unique.push((key, value.clone())),
            response if is_no_space(&response) => {
                refusal = Some(response);
                break;
            }
            other => panic!("put {index} answered {other:?}"),
        }
    }
    let refusal = refusal.expect("the disk never filled up");
    eprintln!(
        "disk full after {} acknowledged writes of 32 KiB: {refusal:?}",
        acknowledged.unique.len()
    );
    assert!(!acknowledged.unique.is_empty());
    // Reads go on, and writes keep being refused while the disk stays full.
    verify(&address, &acknowledged);
    assert!(is_no_space(&put_answer(
        &mut connection,
        5000,
        b"still-full",
        &value
    )));
    std::fs::remove_file(&ballast).unwrap();
    let freed_at = Instant::now();
    let mut request_id = 6000;
    loop {
        request_id += 1;
        let response = put_answer(&mut connection, request_id, b"after-free", &value);
        if matches!(response, Response::Put { applied: true, .. }) {
            break;
        }
        assert!(is_no_space(&response), "{response:?}");
        assert!(
            freed_at.elapsed() < Duration::from_secs(15),
            "writes were not accepted again after space was freed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "writes accepted again {:?} after space was freed",
        freed_at.elapsed()
    );
    acknowledged
        .unique
        .push((b"after-free".to_vec(), value.clone()));
    for index in 1..=20_u64 {
        let key = format!("later:{index}").into_bytes();
        let response = put_answer(&mut connection, 7000 + index, &key, &value);
        assert!(
            matches!(response, Response::Put { applied: true, .. }),
            "{response:?}"
        );
        acknowledged.unique.push((key, value.clone()));
    }
    drop(connection);
    drop(server); // SIGKILL
    wait_until_free(base, 1);
    let server = start_with(&data_dir, base, 1, &flags);
    let checked = verify(&address, &acknowledged);
    assert_eq!(checked, acknowledged.unique.len());
    drop(server);
}

/// The default data directory (`tessera-data`) is relative to the working directory; a
/// relative `--data-dir` works like an absolute one.
#[test]
fn a_relative_data_directory_is_used_from_the_working_directory() {
    let _ports = PORT_USERS.lock().unwrap_or_else(PoisonError::into_inner);
    let work = TestDir::new("relative");
    let base = free_port_pair();
    let mut command = Command::new(env!("CARGO_BIN_EXE_tessera-server"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("TESSERA_") {
            command.env_remove(name);
        }
    }
    let child = command
        .current_dir(&work.0)
        .args(["--cores", "1", "--port", &base.to_string(), "--log", "warn"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut server = ServerProcess { child };
    let deadline = Instant::now() + START_DURATION_MAX;
    while TcpStream::connect(("127.0.0.1", base)).is_err() {
        assert!(
            server.child.try_wait().unwrap().is_none(),
            "the server exited with the default, relative data directory"
        );
        assert!(
            Instant::now() < deadline,
            "the server did not start serving"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut connection = RawConnection::open(&format!("127.0.0.1:{base}"));
    assert!(put(&mut connection, 1, b"key", b"value"));
    drop(connection);
    drop(server);
    let data_dir = work.0.join("tessera-data");
    assert!(data_dir.join("tessera-data").is_file());
    assert!(data_dir.join("core-0").is_dir());
}
