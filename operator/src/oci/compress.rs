//! Compression and hashing writers for the single-pass layer pipeline:
//! tar bytes → [`HashingWriter`] (diff_id) → [`Compressor`] (gzip on every core, or zstd multithreaded)
//! → any `Write` (the upload channel).

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::mpsc;
use std::thread::JoinHandle;

use sha2::{Digest as _, Sha256};

/// Layer compression.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// gzip (`application/vnd.oci.image.layer.v1.tar+gzip`): readable by every tool. Level 1, in parallel
    /// blocks on every core (one gzip member, like pigz).
    #[default]
    Gzip,
    /// zstd (`application/vnd.oci.image.layer.v1.tar+zstd`), level 3, multithreaded: smaller and faster,
    /// needs a recent runtime to pull.
    Zstd,
}

impl Compression {
    /// The OCI layer media type for this compression.
    pub fn media_type(self) -> &'static str {
        match self {
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }
}

/// Passes bytes through while computing their sha256 and counting them.
pub struct HashingWriter<W: Write> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W: Write> HashingWriter<W> {
    /// Wraps `inner`.
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            written: 0,
        }
    }

    /// Returns the inner writer, the `sha256:<hex>` digest and the byte count of what went through.
    pub fn finish(self) -> (W, String, u64) {
        (
            self.inner,
            format!("sha256:{}", hex::encode(self.hasher.finalize())),
            self.written,
        )
    }

    /// The inner writer.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A compressing writer: call [`Compressor::finish`] at the end (dropping it loses the tail).
pub enum Compressor<W: Write> {
    /// Parallel gzip.
    Gzip(ParallelGzip<W>),
    /// zstd.
    Zstd(zstd::stream::write::Encoder<'static, W>),
}

impl<W: Write + Send + 'static> Compressor<W> {
    /// A compressor writing into `inner`, using `threads` threads (0: every core).
    pub fn new(compression: Compression, inner: W, threads: usize) -> io::Result<Self> {
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(1, usize::from)
        } else {
            threads
        };
        Ok(match compression {
            Compression::Gzip => Compressor::Gzip(ParallelGzip::new(inner, threads)),
            Compression::Zstd => {
                let mut encoder = zstd::stream::write::Encoder::new(inner, 3)?;
                encoder.multithread(u32::try_from(threads).unwrap_or(1))?;
                Compressor::Zstd(encoder)
            }
        })
    }

    /// Flushes everything and writes the trailer; returns the inner writer.
    pub fn finish(self) -> io::Result<W> {
        match self {
            Compressor::Gzip(gzip) => gzip.finish(),
            Compressor::Zstd(encoder) => encoder.finish(),
        }
    }
}

impl<W: Write + Send + 'static> Write for Compressor<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Compressor::Gzip(gzip) => gzip.write(buf),
            Compressor::Zstd(encoder) => encoder.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Compressor::Gzip(gzip) => gzip.flush(),
            Compressor::Zstd(encoder) => encoder.flush(),
        }
    }
}

/// Input block size of the parallel gzip: each block is deflated on its own (ending on a sync flush), so
/// the output depends only on the input, never on the number of threads.
const GZIP_BLOCK: usize = 1 << 20;

/// A compressed block, its CRC32 and its uncompressed length.
type BlockResult = io::Result<(Vec<u8>, u32, u64)>;

struct Job {
    data: Vec<u8>,
    reply: mpsc::SyncSender<BlockResult>,
}

/// gzip in parallel blocks (one member; each block a raw deflate stream ended by a sync flush, CRCs
/// combined), level 1. Memory: about `threads + 1` blocks in flight.
pub struct ParallelGzip<W: Write> {
    inner: Option<W>,
    buffer: Vec<u8>,
    jobs: Option<mpsc::SyncSender<Job>>,
    workers: Vec<JoinHandle<()>>,
    in_flight: VecDeque<mpsc::Receiver<BlockResult>>,
    max_in_flight: usize,
    crc: crc32fast::Hasher,
    total: u64,
    header_written: bool,
}

impl<W: Write> ParallelGzip<W> {
    /// A gzip writer on `threads` worker threads.
    pub fn new(inner: W, threads: usize) -> Self {
        let threads = threads.max(1);
        let (jobs, receiver) = mpsc::sync_channel::<Job>(threads);
        let receiver = std::sync::Arc::new(std::sync::Mutex::new(receiver));
        let workers = (0..threads)
            .map(|_| {
                let receiver = std::sync::Arc::clone(&receiver);
                std::thread::spawn(move || {
                    loop {
                        let job = {
                            let Ok(guard) = receiver.lock() else { return };
                            match guard.recv() {
                                Ok(job) => job,
                                Err(_) => return,
                            }
                        };
                        let result = deflate_block(&job.data);
                        let _ = job.reply.send(result);
                    }
                })
            })
            .collect();
        ParallelGzip {
            inner: Some(inner),
            buffer: Vec::with_capacity(GZIP_BLOCK),
            jobs: Some(jobs),
            workers,
            in_flight: VecDeque::new(),
            max_in_flight: threads + 1,
            crc: crc32fast::Hasher::new(),
            total: 0,
            header_written: false,
        }
    }

    fn inner_mut(&mut self) -> io::Result<&mut W> {
        self.inner
            .as_mut()
            .ok_or_else(|| io::Error::other("gzip writer already finished"))
    }

    fn write_header(&mut self) -> io::Result<()> {
        if !self.header_written {
            // magic, deflate, no flags, mtime 0 (reproducible), no extra flags, OS unknown.
            self.inner_mut()?
                .write_all(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255])?;
            self.header_written = true;
        }
        Ok(())
    }

    fn collect_one(&mut self) -> io::Result<()> {
        if let Some(receiver) = self.in_flight.pop_front() {
            let (compressed, crc, len) = receiver
                .recv()
                .map_err(|_| io::Error::other("a gzip worker thread stopped"))??;
            self.write_header()?;
            self.inner_mut()?.write_all(&compressed)?;
            self.crc
                .combine(&crc32fast::Hasher::new_with_initial_len(crc, len));
        }
        Ok(())
    }

    fn dispatch(&mut self) -> io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        while self.in_flight.len() >= self.max_in_flight {
            self.collect_one()?;
        }
        let data = std::mem::replace(&mut self.buffer, Vec::with_capacity(GZIP_BLOCK));
        let (reply, receiver) = mpsc::sync_channel(1);
        self.jobs
            .as_ref()
            .ok_or_else(|| io::Error::other("gzip writer already finished"))?
            .send(Job { data, reply })
            .map_err(|_| io::Error::other("gzip worker threads stopped"))?;
        self.in_flight.push_back(receiver);
        Ok(())
    }

    /// Compresses what is left, writes the final block and the trailer; returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.dispatch()?;
        while !self.in_flight.is_empty() {
            self.collect_one()?;
        }
        self.write_header()?;
        // An empty final block (BFINAL=1, fixed Huffman, end of block), then CRC32 and size mod 2^32.
        let crc = self.crc.clone().finalize();
        let total = self.total as u32;
        let inner = self.inner_mut()?;
        inner.write_all(&[0x03, 0x00])?;
        inner.write_all(&crc.to_le_bytes())?;
        inner.write_all(&total.to_le_bytes())?;
        inner.flush()?;
        self.inner
            .take()
            .ok_or_else(|| io::Error::other("gzip writer already finished"))
    }
}

/// Order-0 entropy (bits per byte) above which a block is stored instead of deflated. Random or
/// already-compressed data (a tarball, a JPEG, a `.gz` inside the image) sits at 7.99+; deflate level 1 gains
/// under 1% on it while spending most of a commit's CPU (profiled: a 64 MiB random file in the commit
/// benchmark was ~50% of all samples in zlib's hash loop). Text and binaries sit well below 7.5.
const STORE_ABOVE_ENTROPY: f64 = 7.95;

/// Largest payload of one deflate stored block (LEN is 16 bits).
const STORED_BLOCK_MAX: usize = 0xffff;

/// Shannon entropy of the byte histogram of `data`, in bits per byte. Cheap (one pass of counting).
fn byte_entropy(data: &[u8]) -> f64 {
    let mut counts = [0u64; 256];
    for &byte in data {
        counts[usize::from(byte)] += 1;
    }
    #[allow(clippy::cast_precision_loss)] // a block is 1 MiB: exact in f64
    let total = data.len() as f64;
    counts
        .iter()
        .filter(|&&count| count > 0)
        .map(|&count| {
            #[allow(clippy::cast_precision_loss)]
            let p = count as f64 / total;
            -p * p.log2()
        })
        .sum()
}

/// `data` as deflate stored blocks (BFINAL=0): the stream stays byte-aligned before and after, like a
/// deflated block ended by a sync flush, so both kinds mix freely in one gzip member.
fn stored_blocks(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + data.len() / STORED_BLOCK_MAX * 5 + 5);
    for chunk in data.chunks(STORED_BLOCK_MAX) {
        // Header byte: BFINAL=0, BTYPE=00, then padding to the byte boundary; LEN and NLEN little-endian.
        let len = u16::try_from(chunk.len()).unwrap_or(u16::MAX);
        out.push(0);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

fn deflate_block(data: &[u8]) -> BlockResult {
    // The choice depends only on the block's bytes: the output stays a function of the input.
    if byte_entropy(data) > STORE_ABOVE_ENTROPY {
        let mut crc = crc32fast::Hasher::new();
        crc.update(data);
        return Ok((stored_blocks(data), crc.finalize(), data.len() as u64));
    }
    let mut compressor = flate2::Compress::new(flate2::Compression::fast(), false);
    let mut out = Vec::with_capacity(data.len() / 2 + 1024);
    let mut input = data;
    loop {
        let before_in = compressor.total_in();
        if out.capacity() - out.len() < 1024 {
            out.reserve(out.capacity().max(64 * 1024));
        }
        compressor
            .compress_vec(input, &mut out, flate2::FlushCompress::Sync)
            .map_err(io::Error::other)?;
        let consumed = usize::try_from(compressor.total_in() - before_in).unwrap_or(0);
        input = &input[consumed..];
        // Done when all input is consumed and the sync flush fit (spare room left in `out`).
        if input.is_empty() && out.len() < out.capacity() {
            break;
        }
    }
    let mut crc = crc32fast::Hasher::new();
    crc.update(data);
    Ok((out, crc.finalize(), data.len() as u64))
}

impl<W: Write> Write for ParallelGzip<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = GZIP_BLOCK - self.buffer.len();
        let n = room.min(buf.len());
        self.buffer.extend_from_slice(&buf[..n]);
        self.total += n as u64;
        if self.buffer.len() == GZIP_BLOCK {
            self.dispatch()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<W: Write> Drop for ParallelGzip<W> {
    fn drop(&mut self) {
        self.jobs = None;
        self.in_flight.clear();
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::Read as _;

    /// Random (incompressible, stored) and text (deflated) blocks mixed in one member decode to the input.
    #[test]
    fn gzip_mixes_stored_and_deflated_blocks() {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut data: Vec<u8> = (0..(GZIP_BLOCK * 2 + 12345))
            .map(|_| {
                // xorshift64: a reproducible incompressible stream.
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state.to_le_bytes()[0]
            })
            .collect();
        for line in 0..60_000 {
            data.extend_from_slice(format!("line {line} of some text\n").as_bytes());
        }
        assert!(byte_entropy(&data[..GZIP_BLOCK]) > STORE_ABOVE_ENTROPY);
        assert!(byte_entropy(&data[data.len() - GZIP_BLOCK..]) < STORE_ABOVE_ENTROPY);
        let mut gzip = ParallelGzip::new(Vec::new(), 2);
        gzip.write_all(&data).unwrap();
        let compressed = gzip.finish().unwrap();
        let mut decoded = Vec::new();
        flate2::read::GzDecoder::new(&compressed[..])
            .read_to_end(&mut decoded)
            .unwrap();
        assert!(decoded == data, "round trip differs");
        // The random part costs its size plus 5 bytes per 64 KiB; the text part still compresses.
        assert!(compressed.len() < GZIP_BLOCK * 2 + 12345 + 400 + 1_500_000 / 3);
    }
}
