//! What the durability tests share.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use tessera_protocol::{SlotRange, SLOT_COUNT};

use crate::shard::ShardConfig;

/// A shard owning every slot, with room for all a test writes.
pub(crate) fn shard_config(shard_id: u16) -> ShardConfig {
    ShardConfig {
        node_id: 1,
        shard_id,
        slots: SlotRange {
            start: 0,
            end: SLOT_COUNT,
        },
        memory_bytes_max: 1 << 32,
        expired_per_tick_max: 1000,
        watch_limits: crate::shard::watch::WatchLimits::default(),
        lease_limits: crate::shard::lease::LeaseLimits::default(),
        lock_limits: crate::shard::lock::LockLimits::default(),
    }
}

/// A directory of one test's own (unique across tests and processes), removed when dropped.
pub(crate) struct TestDir(pub(crate) PathBuf);

static TEST_DIR_COUNT: AtomicUsize = AtomicUsize::new(0);

impl TestDir {
    /// A directory under the system's temporary directory.
    pub(crate) fn new(name: &str) -> Self {
        Self::under(&std::env::temp_dir(), name)
    }

    /// A directory on tmpfs where there is one (`/dev/shm`), for tests that write many
    /// directories and sync them: there a sync costs nothing.
    pub(crate) fn in_memory(name: &str) -> Self {
        let shm = Path::new("/dev/shm");
        if shm.is_dir() {
            Self::under(shm, name)
        } else {
            Self::new(name)
        }
    }

    fn under(parent: &Path, name: &str) -> Self {
        let count = TEST_DIR_COUNT.fetch_add(1, Ordering::Relaxed);
        let path = parent.join(format!("tessera-{name}-{}-{count}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    /// The directory.
    pub(crate) fn path(&self) -> &Path {
        &self.0
    }

    /// The names of the files in the directory, sorted.
    pub(crate) fn file_names(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(&self.0)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort_unstable();
        names
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
