//! Instance exclusivity through `Server::start`, as two instances started by mistake on one
//! host meet it: a second server on a running one's data directory is refused with the
//! holder's name and pid, one whose explicit CPUs overlap a running one's is refused naming
//! both, and both locks go away with the server. Also: each core's progress counter (the
//! watchdog's input) advances while the server runs.

mod common;

use std::time::{Duration, Instant};

use common::{test_config, TestDir};
use tessera_server::config::Durability;
use tessera_server::{Config, Server, StartError};

/// A one-core server on free ports that registers in `registry`.
fn config(name: &str, registry: &TestDir) -> Config {
    Config {
        name: name.to_owned(),
        instance_dir: registry.0.clone(),
        ..test_config(1)
    }
}

#[test]
fn a_second_server_on_the_same_data_dir_is_refused_naming_the_first() {
    let registry = TestDir::new("registry-data");
    let data = TestDir::new("data-shared");
    let durable = |name: &str| Config {
        durability: Durability::Async,
        data_dir: data.0.clone(),
        ..config(name, &registry)
    };
    let first = Server::start(durable("first")).unwrap();
    let error = Server::start(durable("second")).unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, StartError::Instance(_)), "{message}");
    let holder = format!("in use by instance first (pid {})", std::process::id());
    assert!(message.contains(&holder), "{message}");
    assert!(message.contains(&data.0.display().to_string()), "{message}");
    // The refused start left the first server serving and its files alone.
    let lock = std::fs::read_to_string(data.0.join("LOCK")).unwrap();
    assert!(lock.starts_with("name=first\n"), "{lock}");
    first.shutdown().unwrap();
    let again = Server::start(durable("second")).unwrap();
    again.shutdown().unwrap();
}

#[test]
fn overlapping_cpus_are_refused_and_the_registration_goes_with_the_server() {
    let registry = TestDir::new("registry-cpus");
    let pinned = |name: &str| Config {
        cpus: Some(vec![0]),
        ..config(name, &registry)
    };
    let first = Server::start(pinned("a")).unwrap();
    let registration = first.registration().unwrap().to_owned();
    assert!(registration.starts_with(&registry.0));
    let text = std::fs::read_to_string(&registration).unwrap();
    assert!(
        text.contains("name=a\n") && text.contains("cpus=0\n"),
        "{text}"
    );
    let error = Server::start(pinned("b")).unwrap_err();
    let message = error.to_string();
    assert!(
        message.contains(&format!("instance a (pid {},", std::process::id())),
        "{message}"
    );
    assert!(message.contains("already uses cpus 0"), "{message}");
    // Same name, free ports, no CPU list: no conflict.
    let unpinned = Server::start(config("a", &registry)).unwrap();
    first.shutdown().unwrap();
    assert!(
        !registration.exists(),
        "the registration outlived its server"
    );
    let second = Server::start(pinned("b")).unwrap();
    second.shutdown().unwrap();
    unpinned.shutdown().unwrap();
}

#[test]
fn every_core_makes_progress_while_running() {
    let registry = TestDir::new("registry-progress");
    let server = Server::start(Config {
        cores: 2,
        tick_ms: 5,
        ..config("progress", &registry)
    })
    .unwrap();
    let start = server.core_progress_counts();
    assert_eq!(start.len(), 2);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = server.core_progress_counts();
        if now
            .iter()
            .zip(&start)
            .all(|(now, start)| now >= &(start + 3))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "cores did not tick: {start:?} -> {now:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let progress = server.core_progress();
    server.shutdown().unwrap();
    // Stopped cores tick no more.
    let stopped: Vec<u64> = progress
        .iter()
        .map(|count| count.load(std::sync::atomic::Ordering::Relaxed))
        .collect();
    std::thread::sleep(Duration::from_millis(30));
    let later: Vec<u64> = progress
        .iter()
        .map(|count| count.load(std::sync::atomic::Ordering::Relaxed))
        .collect();
    assert_eq!(stopped, later);
}
