//! The file operations the log and snapshots use, behind a small trait.
//!
//! The server runs on [`GlommioStorage`] (`io_uring` through glommio). Tests put another
//! implementation underneath to see what the page cache hides: one that records every write
//! and sync barrier so crash images (what a power cut could leave) can be built from them, one
//! that fails a sync, one whose disk is full (`durability::crash_tests`).
//!
//! The traits use `async fn` and are used through generics only: every future stays on the
//! core's thread, so no `Send` bound is wanted.

#![allow(
    async_fn_in_trait,
    reason = "implementations run on one core's executor; no caller needs Send futures"
)]

use std::io;
use std::path::Path;

/// A file open for writing.
pub trait StorageFile {
    /// Writes all of `bytes` at `offset`, returning how many were written.
    async fn write_at(&self, bytes: Vec<u8>, offset: u64) -> io::Result<usize>;
    /// Makes everything written so far durable (`fdatasync`).
    async fn sync(&self) -> io::Result<()>;
    /// Reserves disk space for the file's first `size` bytes and fills them with zeros
    /// (durably), so later writes into them need no new space and no metadata change; the
    /// file's size becomes at least `size`. `ErrorKind::Unsupported` where the filesystem
    /// cannot reserve space.
    async fn allocate(&self, size: u64) -> io::Result<()>;
    /// Closes the file.
    async fn close(self) -> io::Result<()>;
}

/// The directory operations, and opening files.
pub trait Storage: Clone + 'static {
    /// The file type.
    type File: StorageFile;
    /// Creates `path` (truncating it if it exists) for writing.
    async fn create(&self, path: &Path) -> io::Result<Self::File>;
    /// Makes the names in `directory` durable: files created, renamed or removed in it.
    async fn sync_directory(&self, directory: &Path) -> io::Result<()>;
    /// Renames `from` to `to`, replacing `to`.
    async fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes the file `path`.
    async fn remove(&self, path: &Path) -> io::Result<()>;
}

/// Bytes of zeros written at a time when a file is allocated.
const ZERO_CHUNK_BYTES: u64 = 1024 * 1024;

/// Files through glommio's `io_uring` reactor: what the server runs on.
#[derive(Debug, Clone, Copy, Default)]
pub struct GlommioStorage;

/// A file of [`GlommioStorage`].
#[derive(Debug)]
pub struct GlommioFile {
    file: glommio::io::BufferedFile,
}

fn from_glommio(error: glommio::GlommioError<()>) -> io::Error {
    error.into()
}

impl StorageFile for GlommioFile {
    async fn write_at(&self, bytes: Vec<u8>, offset: u64) -> io::Result<usize> {
        self.file
            .write_at(bytes, offset)
            .await
            .map_err(from_glommio)
    }

    async fn sync(&self) -> io::Result<()> {
        self.file.fdatasync().await.map_err(from_glommio)
    }

    async fn allocate(&self, size: u64) -> io::Result<()> {
        // Reserve the space first: a full disk is found here, at once.
        match self
            .file
            .pre_allocate(size, false)
            .await
            .map_err(from_glommio)
        {
            Err(error) if error.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                return Err(io::Error::new(io::ErrorKind::Unsupported, error))
            }
            other => other?,
        }
        // Then write the zeros: blocks fallocate reserved are "unwritten", and the first write
        // into each must change the file's metadata, so every sync becomes a journal commit.
        // Written blocks make a sync a data flush alone (measured: 20-30% more synced writes
        // per second, `docs/benchmarks.md`).
        let mut offset = 0;
        while offset < size {
            let length = ZERO_CHUNK_BYTES.min(size - offset);
            let zeros = vec![0; usize::try_from(length).unwrap_or(usize::MAX)];
            let written = self
                .file
                .write_at(zeros, offset)
                .await
                .map_err(from_glommio)?;
            if written == 0 {
                return Err(io::Error::other("zero-length write while zeroing"));
            }
            offset += written as u64;
        }
        self.file.fdatasync().await.map_err(from_glommio)
    }

    async fn close(self) -> io::Result<()> {
        self.file.close().await.map_err(from_glommio)
    }
}

impl Storage for GlommioStorage {
    type File = GlommioFile;

    async fn create(&self, path: &Path) -> io::Result<GlommioFile> {
        glommio::io::BufferedFile::create(path)
            .await
            .map(|file| GlommioFile { file })
            .map_err(from_glommio)
    }

    async fn sync_directory(&self, directory: &Path) -> io::Result<()> {
        let handle = glommio::io::Directory::open(directory)
            .await
            .map_err(from_glommio)?;
        let synced = handle.sync().await.map_err(from_glommio);
        let _ = handle.close().await;
        synced
    }

    async fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        glommio::io::rename(from, to).await.map_err(from_glommio)
    }

    async fn remove(&self, path: &Path) -> io::Result<()> {
        glommio::io::remove(path).await.map_err(from_glommio)
    }
}

/// Whether an error means the filesystem is out of space (or of quota).
pub fn is_no_space(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
        || error.kind() == io::ErrorKind::StorageFull
}
