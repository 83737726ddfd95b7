//! Locks through the client, run against a server on loopback (`remote::*`) and embedded
//! shards (`embedded::*`): grants with growing fencing tokens, a first-come first-served
//! line woken by the server, release by unlock or by the lease's end, waits that end, and
//! writes fenced by a token.

#[macro_use]
mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tessera_client::{Client, ClientError, ErrorCode, LeaderChange};

scenarios!(
    grants_carry_growing_tokens,
    a_held_lock_is_busy_for_others,
    waiters_are_served_in_order,
    a_lease_end_hands_the_lock_over,
    a_wait_ends_without_the_lock,
    a_revoked_lease_leaves_the_line,
    fenced_writes_refuse_a_former_holder,
    a_dead_lease_cannot_lock,
    contenders_never_overlap_in_fenced_writes,
    an_election_has_one_leader_at_a_time,
);

const LONG: Duration = Duration::from_secs(30);

async fn grants_carry_growing_tokens(client: &Client) {
    let lease = client.lease(LONG).await.unwrap();
    let first = client
        .lock("tokens", lease.id(), Duration::ZERO)
        .await
        .unwrap()
        .expect("free");
    let again = client
        .lock("tokens", lease.id(), Duration::ZERO)
        .await
        .unwrap()
        .expect("already held by this lease");
    assert_eq!(again.token, first.token, "asking again returns the grant");
    assert!(!client.unlock("tokens", first.token + 1).await.unwrap());
    assert!(client.unlock("tokens", first.token).await.unwrap());
    assert!(
        !client.unlock("tokens", first.token).await.unwrap(),
        "released once"
    );
    let second = client
        .lock("tokens", lease.id(), Duration::ZERO)
        .await
        .unwrap()
        .expect("free again");
    assert!(second.token > first.token);
}

async fn a_held_lock_is_busy_for_others(client: &Client) {
    let holder = client.lease(LONG).await.unwrap();
    let other = client.lease(LONG).await.unwrap();
    let grant = client
        .lock("busy", holder.id(), Duration::ZERO)
        .await
        .unwrap()
        .expect("free");
    assert_eq!(
        client
            .lock("busy", other.id(), Duration::ZERO)
            .await
            .unwrap(),
        None
    );
    assert!(client.unlock("busy", grant.token).await.unwrap());
    assert!(client
        .lock("busy", other.id(), Duration::ZERO)
        .await
        .unwrap()
        .is_some());
}

async fn waiters_are_served_in_order(client: &Client) {
    let holder = client.lease(LONG).await.unwrap();
    let first = client
        .lock("line", holder.id(), Duration::ZERO)
        .await
        .unwrap()
        .expect("free");
    let mut waiting = Vec::new();
    for place in 0..3 {
        let lease = client.lease(LONG).await.unwrap();
        let waiter = client.clone();
        let id = lease.id();
        waiting.push((
            lease,
            tokio::spawn(async move {
                let grant = waiter.lock("line", id, LONG).await;
                (place, grant, Instant::now())
            }),
        ));
        // Each waiter is in line before the next asks.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut token = first.token;
    assert!(client.unlock("line", token).await.unwrap());
    let mut granted_at = Vec::new();
    for (lease, task) in waiting {
        let (place, grant, at) = task.await.unwrap();
        let grant = grant.unwrap().expect("granted in turn");
        assert!(grant.token > token, "place {place}: tokens grow");
        token = grant.token;
        granted_at.push(at);
        assert!(client.unlock("line", token).await.unwrap());
        drop(lease);
    }
    assert!(
        granted_at.windows(2).all(|pair| pair[0] <= pair[1]),
        "in order"
    );
}

async fn a_lease_end_hands_the_lock_over(client: &Client) {
    // Not renewed: it ends after its TTL, and the lock passes to the waiter.
    let ttl = Duration::from_millis(300);
    let short = client.grant_lease(ttl).await.unwrap();
    let first = client
        .lock("handover", short, Duration::ZERO)
        .await
        .unwrap()
        .expect("free");
    let next = client.lease(LONG).await.unwrap();
    let asked = Instant::now();
    let grant = client
        .lock("handover", next.id(), LONG)
        .await
        .unwrap()
        .expect("handed over");
    let waited = asked.elapsed();
    assert!(grant.token > first.token);
    // The TTL, plus a tick of the server and scheduling slack.
    assert!(
        waited < ttl + Duration::from_millis(500),
        "handover took {waited:?}"
    );
    assert!(
        !client.unlock("handover", first.token).await.unwrap(),
        "the old grant is gone"
    );
}

async fn a_wait_ends_without_the_lock(client: &Client) {
    let holder = client.lease(LONG).await.unwrap();
    let grant = client
        .lock("timeout", holder.id(), Duration::ZERO)
        .await
        .unwrap()
        .expect("free");
    let other = client.lease(LONG).await.unwrap();
    let asked = Instant::now();
    let refused = client
        .lock("timeout", other.id(), Duration::from_millis(200))
        .await
        .unwrap();
    assert_eq!(refused, None);
    assert!(asked.elapsed() >= Duration::from_millis(200));
    // The wait left the line: a release now leaves the lock free.
    assert!(client.unlock("timeout", grant.token).await.unwrap());
    assert!(client
        .lock("timeout", other.id(), Duration::ZERO)
        .await
        .unwrap()
        .is_some());
}

async fn a_revoked_lease_leaves_the_line(client: &Client) {
    let holder = client.lease(LONG).await.unwrap();
    client
        .lock("revoked", holder.id(), Duration::ZERO)
        .await
        .unwrap()
        .expect("free");
    let waiter_lease = client.grant_lease(LONG).await.unwrap();
    let waiter = client.clone();
    let task = tokio::spawn(async move { waiter.lock("revoked", waiter_lease, LONG).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(client.revoke_lease(waiter_lease).await.unwrap());
    let outcome = task.await.unwrap();
    assert!(
        matches!(
            &outcome,
            Err(ClientError::Server {
                code: ErrorCode::LeaseNotFound,
                ..
            })
        ),
        "{outcome:?}"
    );
}

async fn fenced_writes_refuse_a_former_holder(client: &Client) {
    // The lock and the data share a hash tag, so one shard checks the token.
    let (lock, data) = ("{job}lock", "{job}data");
    let paused = client
        .grant_lease(Duration::from_millis(200))
        .await
        .unwrap();
    let old = client
        .lock(lock, paused, Duration::ZERO)
        .await
        .unwrap()
        .expect("free");
    assert!(client
        .put_fenced(data, "old holder", lock, old.token)
        .await
        .unwrap());
    // The holder "pauses" past its lease; another takes the lock and writes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let next = client.lease(LONG).await.unwrap();
    let new = client
        .lock(lock, next.id(), Duration::ZERO)
        .await
        .unwrap()
        .expect("the old lease ended");
    assert!(client
        .put_fenced(data, "new holder", lock, new.token)
        .await
        .unwrap());
    // The former holder wakes up and writes with its old token: refused.
    assert!(!client
        .put_fenced(data, "stale", lock, old.token)
        .await
        .unwrap());
    assert_eq!(
        client.get(data).await.unwrap().map(|entry| entry.value),
        Some(b"new holder".to_vec())
    );
    // Released, the lock still remembers its last token.
    assert!(client.unlock(lock, new.token).await.unwrap());
    assert!(!client
        .put_fenced(data, "stale", lock, old.token)
        .await
        .unwrap());
}

async fn a_dead_lease_cannot_lock(client: &Client) {
    let id = client.grant_lease(LONG).await.unwrap();
    assert!(client.revoke_lease(id).await.unwrap());
    let refused = client.lock("dead", id, Duration::ZERO).await;
    assert!(
        matches!(
            &refused,
            Err(ClientError::Server {
                code: ErrorCode::LeaseNotFound,
                ..
            })
        ),
        "{refused:?}"
    );
}

/// Many contenders take the lock in turn; some "pause" in their critical section past their
/// lease (no renewal), so the lock is handed to the next while they still act on it. Every
/// write goes through the fence: the ones the server accepts must be in token order (no
/// write from a holder whose lock was granted again), and each contender that paused must
/// have been refused.
async fn contenders_never_overlap_in_fenced_writes(client: &Client) {
    const CONTENDERS: u64 = 6;
    const ROUNDS: u64 = 8;
    let (lock, data) = ("{mutex}lock", "{mutex}data");
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for contender in 0..CONTENDERS {
        let client = client.clone();
        let accepted = accepted.clone();
        tasks.push(tokio::spawn(async move {
            let mut refused_after_pause = 0;
            for round in 0..ROUNDS {
                // Renewed in the background while waiting and working.
                let lease = client.lease(Duration::from_millis(150)).await.unwrap();
                let id = lease.id();
                let Some(grant) = client.lock(lock, id, LONG).await.unwrap() else {
                    panic!("a long wait always gets the lock");
                };
                let pauses = (contender + round) % 4 == 0;
                if pauses {
                    // The holder freezes: nothing renews its lease while it sleeps.
                    drop(lease);
                    tokio::time::sleep(Duration::from_millis(400)).await;
                } else {
                    let hold = 5 + (contender * 7 + round * 3) % 20;
                    tokio::time::sleep(Duration::from_millis(hold)).await;
                }
                let value = format!("{}", grant.token);
                let written = client
                    .put_fenced(data, &value, lock, grant.token)
                    .await
                    .unwrap();
                if written {
                    accepted.lock().unwrap().push(grant.token);
                } else {
                    assert!(pauses, "a holder within its lease was fenced off");
                    refused_after_pause += 1;
                }
                let _ = client.unlock(lock, grant.token).await.unwrap();
                let _ = client.revoke_lease(id).await;
            }
            refused_after_pause
        }));
    }
    let mut refused = 0;
    for task in tasks {
        refused += task.await.unwrap();
    }
    let accepted = accepted.lock().unwrap().clone();
    assert!(
        accepted.windows(2).all(|pair| pair[0] < pair[1]),
        "accepted writes out of token order: {accepted:?}"
    );
    let last = accepted.last().copied().expect("some writes were accepted");
    assert_eq!(
        client.get(data).await.unwrap().map(|entry| entry.value),
        Some(last.to_string().into_bytes()),
        "the data holds the newest holder's write"
    );
    assert!(refused > 0, "pauses past the lease were fenced off");
}

/// A durable server restarted: a held lock comes back with its holder (whose lease gets a
/// full TTL again), tokens keep growing, and the fence still refuses an older token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_locks_come_back_after_a_restart() {
    common::within(
        common::SCENARIO_TIMEOUT,
        "locks across a restart",
        locks_across_a_restart(),
    )
    .await;
}

async fn locks_across_a_restart() {
    let config = common::test_config(common::CORE_COUNT);
    let mut server = common::DurableServer::start("lock-restart", config).await;
    let client = Client::connect(server.addresses()).await.unwrap();
    let (lock, data) = ("{restart}lock", "{restart}data");
    let holder = client.grant_lease(LONG).await.unwrap();
    let first = client
        .lock(lock, holder, Duration::ZERO)
        .await
        .unwrap()
        .expect("free");
    assert!(client.unlock(lock, first.token).await.unwrap());
    let held = client
        .lock(lock, holder, Duration::ZERO)
        .await
        .unwrap()
        .expect("free again");
    server.restart().await;
    let other = client.grant_lease(LONG).await.unwrap();
    assert_eq!(
        client.lock(lock, other, Duration::ZERO).await.unwrap(),
        None,
        "still held after the restart"
    );
    assert!(!client
        .put_fenced(data, "stale", lock, first.token)
        .await
        .unwrap());
    assert!(client
        .put_fenced(data, "holder", lock, held.token)
        .await
        .unwrap());
    assert!(client.unlock(lock, held.token).await.unwrap());
    let next = client
        .lock(lock, other, Duration::ZERO)
        .await
        .unwrap()
        .expect("released");
    assert!(
        next.token > held.token,
        "tokens keep growing across the restart"
    );
    drop(client);
    server.stop().await;
}

/// Two candidates: one leads, the other waits in line; observers see each change; when the
/// leader's lease ends (its handle dropped, as when its process dies) the other leads, and
/// the first one's fenced writes are refused from then on.
async fn an_election_has_one_leader_at_a_time(client: &Client) {
    let election = client.election("pick");
    let changes = Arc::new(Mutex::new(Vec::new()));
    let seen = changes.clone();
    let watching_election = election.clone();
    let observer = tokio::spawn(async move {
        watching_election
            .observe(|change| {
                let mut changes = seen.lock().unwrap();
                changes.push(change);
                changes.len() < 4
            })
            .await
    });
    // The observer's snapshot (nobody leads) comes before anything changes.
    while changes.lock().unwrap().is_empty() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let first_lease = client.lease(Duration::from_millis(300)).await.unwrap();
    let first = election.campaign(first_lease.id(), "first").await.unwrap();
    assert_eq!(election.leader().await.unwrap(), Some(b"first".to_vec()));
    let second_lease = client.lease(LONG).await.unwrap();
    let candidate = election.clone();
    let second_id = second_lease.id();
    let second = tokio::spawn(async move { candidate.campaign(second_id, "second").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !second.is_finished(),
        "the second waits while the first leads"
    );
    // The first leader dies: nothing renews its lease.
    drop(first_lease);
    let second = second.await.unwrap().unwrap();
    assert!(second.token > first.token);
    assert_eq!(election.leader().await.unwrap(), Some(b"second".to_vec()));
    assert!(!client
        .put_fenced(
            "{pick}state",
            "from the old leader",
            "{pick}lock",
            first.token
        )
        .await
        .unwrap());
    assert!(client
        .put_fenced("{pick}state", "from the leader", "{pick}lock", second.token)
        .await
        .unwrap());
    election.resign(&second).await.unwrap();
    assert_eq!(election.leader().await.unwrap(), None);
    observer.await.unwrap().unwrap();
    let changes = changes.lock().unwrap().clone();
    assert_eq!(
        changes,
        vec![
            LeaderChange::Vacant,
            LeaderChange::Elected(b"first".to_vec()),
            LeaderChange::Vacant,
            LeaderChange::Elected(b"second".to_vec()),
        ]
    );
    drop(second_lease);
}

/// A server stopping answers the lock requests waiting in line at once (`ShuttingDown`),
/// not at the end of their wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_a_stopping_server_answers_waiting_locks() {
    let server = common::start_server(common::CORE_COUNT);
    let client = Client::connect(server.addresses()).await.unwrap();
    let holder = client.grant_lease(LONG).await.unwrap();
    client
        .lock("stop", holder, Duration::ZERO)
        .await
        .unwrap()
        .expect("free");
    let waiter_lease = client.grant_lease(LONG).await.unwrap();
    let waiter = client.clone();
    let waiting = tokio::spawn(async move { waiter.lock("stop", waiter_lease, LONG).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stopped_at = Instant::now();
    let stopping = tokio::task::spawn_blocking(move || common::stop_server(server));
    let outcome = common::within(common::CALL_TIMEOUT, "the waiting lock", waiting)
        .await
        .unwrap();
    assert!(
        matches!(&outcome, Err(error) if error.is_retryable() || error.is_indeterminate()),
        "{outcome:?}"
    );
    assert!(
        stopped_at.elapsed() < Duration::from_secs(5),
        "answered at once"
    );
    drop(client);
    stopping.await.unwrap();
}
