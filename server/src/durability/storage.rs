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
    /// Creates `path` like [`Storage::create`] for a file written only by appends, one at a
    /// time, each starting where the last ended: a log segment. [`GlommioStorage`] writes
    /// these past the page cache ([`DirectFile`]); other storages need not differ.
    async fn create_appending(&self, path: &Path) -> io::Result<Self::File> {
        self.create(path).await
    }
    /// Makes the names in `directory` durable: files created, renamed or removed in it.
    async fn sync_directory(&self, directory: &Path) -> io::Result<()>;
    /// Renames `from` to `to`, replacing `to`.
    async fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes the file `path`.
    async fn remove(&self, path: &Path) -> io::Result<()>;
}

/// Bytes of zeros written at a time when a file is allocated.
const ZERO_CHUNK_BYTES: u64 = 1024 * 1024;

/// The smallest block a [`DirectFile`] writes whole (see [`DirectFile::alignment`]).
const DIRECT_BLOCK_BYTES: usize = 4096;

/// Files through glommio's `io_uring` reactor: what the server runs on.
#[derive(Debug, Clone, Copy, Default)]
pub struct GlommioStorage;

/// A file of [`GlommioStorage`]: through the page cache, or past it for log segments.
#[derive(Debug)]
pub enum GlommioFile {
    /// Written through the page cache (snapshots).
    Buffered(glommio::io::BufferedFile),
    /// Written with `O_DIRECT` (log segments).
    Direct(DirectFile),
}

fn from_glommio(error: glommio::GlommioError<()>) -> io::Error {
    error.into()
}

impl StorageFile for GlommioFile {
    async fn write_at(&self, bytes: Vec<u8>, offset: u64) -> io::Result<usize> {
        match self {
            Self::Buffered(file) => file.write_at(bytes, offset).await.map_err(from_glommio),
            Self::Direct(file) => file.append(&bytes, offset).await,
        }
    }

    async fn sync(&self) -> io::Result<()> {
        match self {
            Self::Buffered(file) => file.fdatasync().await,
            Self::Direct(file) => file.file.fdatasync().await,
        }
        .map_err(from_glommio)
    }

    async fn allocate(&self, size: u64) -> io::Result<()> {
        // A direct file's last write is padded to a whole block: cover that block too.
        let size = match self {
            Self::Buffered(_) => size,
            Self::Direct(file) => size.next_multiple_of(file.alignment() as u64),
        };
        // Reserve the space first: a full disk is found here, at once.
        let reserved = match self {
            Self::Buffered(file) => file.pre_allocate(size, false).await,
            Self::Direct(file) => file.file.pre_allocate(size, false).await,
        };
        match reserved.map_err(from_glommio) {
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
            let length = usize::try_from(ZERO_CHUNK_BYTES.min(size - offset)).unwrap_or(usize::MAX);
            let written = match self {
                Self::Buffered(file) => file.write_at(vec![0; length], offset).await,
                Self::Direct(file) => file.write_zeros(length, offset).await,
            }
            .map_err(from_glommio)?;
            if written == 0 {
                return Err(io::Error::other("zero-length write while zeroing"));
            }
            offset += written as u64;
        }
        self.sync().await
    }

    async fn close(self) -> io::Result<()> {
        match self {
            Self::Buffered(file) => file.close().await,
            Self::Direct(file) => file.file.close().await,
        }
        .map_err(from_glommio)
    }
}

/// A file written with `O_DIRECT`, by appends only.
///
/// Bytes go from our buffer to the device with no copy into the page cache, and an
/// `fdatasync` then has no dirty pages to write back: it is the device's cache flush alone.
/// The kernel runs such a write without a worker thread when it overwrites allocated blocks
/// (a preallocated segment). Direct writes cover whole blocks of [`DmaFile::alignment`]
/// bytes, so each append rewrites the file's last, partly written block: its bytes so far,
/// then the new ones, then zeros to the block's end. The bytes already there are written
/// again unchanged, so a write torn by a crash leaves them as they were.
///
/// [`DmaFile::alignment`]: glommio::io::DmaFile::alignment
#[derive(Debug)]
pub struct DirectFile {
    file: glommio::io::DmaFile,
    tail: std::cell::RefCell<TailBlock>,
}

impl DirectFile {
    /// The block every write covers whole: the device's logical block, but at least
    /// [`DIRECT_BLOCK_BYTES`], so that rewriting the last block never rewrites part of one of
    /// the device's physical blocks (a 4 KiB-sector disk that reports 512-byte logical blocks
    /// would read, change and write back the whole sector).
    fn alignment(&self) -> usize {
        usize::try_from(self.file.alignment())
            .unwrap_or(DIRECT_BLOCK_BYTES)
            .max(DIRECT_BLOCK_BYTES)
    }

    /// Appends `bytes` at `offset`, which must be where the last append ended (0 at first).
    /// One append at a time: the next starts once this one has returned.
    async fn append(&self, bytes: &[u8], offset: u64) -> io::Result<usize> {
        if bytes.is_empty() {
            // Nothing to write (and glommio cannot allocate an empty DMA buffer).
            return Ok(0);
        }
        let alignment = self.alignment();
        let (start, buffer) = {
            let mut tail = self.tail.borrow_mut();
            if offset != tail.end() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "a direct file takes appends only: write at {offset}, file ends at {}",
                        tail.end()
                    ),
                ));
            }
            let mut buffer = self
                .file
                .alloc_dma_buffer(tail.padded_length(bytes.len(), alignment));
            tail.fill(bytes, buffer.as_bytes_mut());
            let start = tail.offset;
            // Advanced before the write: if it fails the segment is abandoned.
            tail.advance(bytes, alignment);
            (start, buffer)
        };
        let length = buffer.len();
        let written = self
            .file
            .write_at(buffer, start)
            .await
            .map_err(from_glommio)?;
        if written != length {
            return Err(io::Error::other(format!(
                "short direct write: {written} of {length} bytes at {start}"
            )));
        }
        Ok(bytes.len())
    }

    /// Writes `length` zeros at `offset`, both multiples of the alignment, leaving the append
    /// position where it was.
    async fn write_zeros(
        &self,
        length: usize,
        offset: u64,
    ) -> Result<usize, glommio::GlommioError<()>> {
        let mut buffer = self
            .file
            .alloc_dma_buffer(length.next_multiple_of(self.alignment()));
        buffer.as_bytes_mut().fill(0);
        let written = self.file.write_at(buffer, offset).await?;
        Ok(written.min(length))
    }
}

/// The last block of a [`DirectFile`] that appends have only partly filled.
#[derive(Debug, Default, PartialEq, Eq)]
struct TailBlock {
    /// Where the block starts (a multiple of the alignment).
    offset: u64,
    /// The bytes appended into it so far (fewer than the alignment).
    bytes: Vec<u8>,
}

impl TailBlock {
    /// Where the next append must start.
    fn end(&self) -> u64 {
        self.offset + self.bytes.len() as u64
    }

    /// Bytes of the write that appends `appended` bytes: whole blocks from this one's start.
    fn padded_length(&self, appended: usize, alignment: usize) -> usize {
        (self.bytes.len() + appended).next_multiple_of(alignment)
    }

    /// Lays out that write in `out` (of [`TailBlock::padded_length`] bytes): this block's
    /// bytes, then `bytes`, then zeros.
    fn fill(&self, bytes: &[u8], out: &mut [u8]) {
        let (old, rest) = out.split_at_mut(self.bytes.len());
        old.copy_from_slice(&self.bytes);
        let (new, padding) = rest.split_at_mut(bytes.len());
        new.copy_from_slice(bytes);
        padding.fill(0);
    }

    /// Moves past an append of `bytes`: the block the file now ends in, and its bytes.
    fn advance(&mut self, bytes: &[u8], alignment: usize) {
        let before = self.bytes.len();
        let whole = (before + bytes.len()) / alignment * alignment;
        if whole >= before {
            self.bytes.clear();
            self.bytes.extend_from_slice(&bytes[whole - before..]);
        } else {
            self.bytes.extend_from_slice(bytes);
        }
        self.offset += whole as u64;
    }
}

impl Storage for GlommioStorage {
    type File = GlommioFile;

    async fn create(&self, path: &Path) -> io::Result<GlommioFile> {
        glommio::io::BufferedFile::create(path)
            .await
            .map(GlommioFile::Buffered)
            .map_err(from_glommio)
    }

    async fn create_appending(&self, path: &Path) -> io::Result<GlommioFile> {
        match glommio::io::DmaFile::create(path)
            .await
            .map_err(from_glommio)
        {
            Ok(file) => Ok(GlommioFile::Direct(DirectFile {
                file,
                tail: std::cell::RefCell::default(),
            })),
            // The filesystem has no O_DIRECT (some FUSE ones; on tmpfs glommio itself writes
            // through the page cache and does not fail here).
            Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
                tracing::warn!(
                    path = %path.display(),
                    "the filesystem cannot write past the page cache; the log is written through it"
                );
                self.create(path).await
            }
            Err(error) => Err(error),
        }
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

#[cfg(test)]
mod tests {
    use super::{GlommioFile, GlommioStorage, Storage, StorageFile, TailBlock};
    use crate::durability::test_support::TestDir;

    #[test]
    fn a_direct_file_holds_its_appends_then_zeros() {
        let directory = TestDir::new("direct-file");
        let path = directory.path().join("segment");
        let appended = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .make()
            .unwrap()
            .run({
                let path = path.clone();
                async move {
                    let file = GlommioStorage.create_appending(&path).await.unwrap();
                    assert!(matches!(file, GlommioFile::Direct(_)), "{file:?}");
                    // Not a multiple of the block: the size is rounded up.
                    file.allocate(100_000).await.unwrap();
                    let mut appended = Vec::new();
                    for length in [32, 5000, 4064, 1, 9000] {
                        let bytes: Vec<u8> = (0..length)
                            .map(|i| u8::try_from(i % 251).unwrap() + 1)
                            .collect();
                        let offset = appended.len() as u64;
                        assert_eq!(file.write_at(bytes.clone(), offset).await.unwrap(), length);
                        appended.extend_from_slice(&bytes);
                    }
                    let error = file.write_at(vec![1], 3).await.unwrap_err();
                    assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput, "{error}");
                    file.sync().await.unwrap();
                    file.close().await.unwrap();
                    appended
                }
            });
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(on_disk.len(), 100_000_usize.next_multiple_of(4096));
        assert_eq!(&on_disk[..appended.len()], &appended[..]);
        assert!(on_disk[appended.len()..].iter().all(|&byte| byte == 0));
    }

    /// Appends `lengths` bytes at a time to a tail block with `alignment`, laying out each
    /// write the way [`super::DirectFile`] does onto an in-memory "disk", and checks the disk
    /// holds exactly the bytes appended, then zeros.
    fn append_all(lengths: &[usize], alignment: usize) {
        let mut disk = vec![0u8; 64 * 1024];
        let mut expected = Vec::new();
        let mut tail = TailBlock::default();
        for (index, &length) in lengths.iter().enumerate() {
            let bytes: Vec<u8> = (0..length)
                .map(|i| u8::try_from((index * 31 + i) % 256).unwrap() | 1)
                .collect();
            assert_eq!(tail.end(), expected.len() as u64);
            let mut out = vec![0xEE; tail.padded_length(length, alignment)];
            assert_eq!(out.len() % alignment, 0);
            tail.fill(&bytes, &mut out);
            let start = usize::try_from(tail.offset).unwrap();
            assert_eq!(start % alignment, 0);
            disk[start..start + out.len()].copy_from_slice(&out);
            tail.advance(&bytes, alignment);
            expected.extend_from_slice(&bytes);
            assert!(tail.bytes.len() < alignment);
            assert_eq!(&disk[..expected.len()], &expected[..]);
            assert!(disk[expected.len()..].iter().all(|&byte| byte == 0));
        }
    }

    #[test]
    fn appends_rewrite_the_partial_block_and_keep_what_was_written() {
        append_all(&[32, 100, 4000, 1, 0, 4096, 8192, 5000, 3], 4096);
        append_all(&[4096, 4096, 1], 4096);
        append_all(&[7, 505, 512, 1023], 512);
    }

    #[test]
    fn an_append_ending_on_a_block_boundary_leaves_an_empty_tail() {
        let mut tail = TailBlock::default();
        tail.advance(&[1; 100], 512);
        tail.advance(&[2; 412], 512);
        assert_eq!(
            tail,
            TailBlock {
                offset: 512,
                bytes: Vec::new()
            }
        );
        assert_eq!(tail.padded_length(1, 512), 512);
    }
}
