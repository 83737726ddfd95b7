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
    /// Reserves disk space for the file's first `size` bytes, which read as zeros until
    /// written; the file's size becomes at least `size`. `ErrorKind::Unsupported` where the
    /// filesystem cannot.
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

/// Files through glommio's `io_uring` reactor: what the server runs on.
#[derive(Debug, Clone, Copy, Default)]
pub struct GlommioStorage;

/// A file of [`GlommioStorage`].
#[derive(Debug)]
pub struct GlommioFile(glommio::io::BufferedFile);

fn from_glommio(error: glommio::GlommioError<()>) -> io::Error {
    error.into()
}

impl StorageFile for GlommioFile {
    async fn write_at(&self, bytes: Vec<u8>, offset: u64) -> io::Result<usize> {
        self.0.write_at(bytes, offset).await.map_err(from_glommio)
    }

    async fn sync(&self) -> io::Result<()> {
        self.0.fdatasync().await.map_err(from_glommio)
    }

    async fn allocate(&self, size: u64) -> io::Result<()> {
        match self.0.pre_allocate(size, false).await.map_err(from_glommio) {
            Err(error) if error.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                Err(io::Error::new(io::ErrorKind::Unsupported, error))
            }
            other => other,
        }
    }

    async fn close(self) -> io::Result<()> {
        self.0.close().await.map_err(from_glommio)
    }
}

impl Storage for GlommioStorage {
    type File = GlommioFile;

    async fn create(&self, path: &Path) -> io::Result<GlommioFile> {
        glommio::io::BufferedFile::create(path)
            .await
            .map(GlommioFile)
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
