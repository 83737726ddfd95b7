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

mod common;

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{free_port_pair, RawConnection};
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

/// A directory of this test's own, removed when dropped.
struct TestDir(PathBuf);

impl TestDir {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "tessera-{name}-{}-{}",
            std::process::id(),
            RandomState::new().hash_one(0_u8)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn start(data_dir: &Path, base: u16) -> ServerProcess {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tessera-server"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("TESSERA_") {
            command.env_remove(name);
        }
    }
    let child = command
        .args(["--cores", "2", "--port", &base.to_string()])
        .args(["--data-dir", &data_dir.display().to_string()])
        .args(["--durability", "sync", "--memory-bytes-max", "256MiB"])
        // Small segments and frequent snapshots, so kills land during snapshots, segment
        // switches and log truncation too.
        .args([
            "--segment-bytes-max",
            "1MiB",
            "--snapshot-log-bytes",
            "128KiB",
        ])
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
        let is_serving = [base, base + 1]
            .iter()
            .all(|port| TcpStream::connect(("127.0.0.1", *port)).is_ok());
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
    let request = Request::Put(Put::new(key, value));
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
    for batch in acknowledged.unique.chunks(VERIFY_BATCH) {
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
        checked += 1;
    }
    checked
}

#[test]
fn acknowledged_writes_survive_sigkill() {
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
