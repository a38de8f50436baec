//! Benchmark of the layer engine (not a timed test): builds a 1 GiB overlay upper dir (many small files and
//! a few large, partly compressible ones), pushes it with our engine to a loopback registry (layer writer +
//! diff_id + gzip on every core + blob digest + chunked upload, one pass), and in the same run times the
//! reference `tar -C DIR -cf - . | gzip -1 | sha256sum`. Prints both times, the ratio and our peak RSS.
//!
//! ```text
//! cargo run -p walt-operator --example oci_bench -- [--size-mib 1024] [--dir /var/tmp/walt-bench] [--compression gzip|zstd]
//! ```
//! The data set is kept in `--dir` and reused by later runs (delete it to regenerate).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use walt_operator::oci::{ChangeSource, ClientOptions, CommitOptions, Compression, RegistryClient};
use walt_tests::images::{Arch, OciLayout};
use walt_tests::registry::Registry;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let bytes = self.next().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

/// Compressible text: log-like lines.
fn text(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 128);
    while out.len() < len {
        let n = rng.next();
        let _ = writeln!(
            out,
            "{} walt-node-{:03} kernel: [{:>8}.{:06}] eth0: link up, 1000 Mbps, full duplex, lpa 0x{:04X}",
            n % 100_000,
            n % 300,
            (n >> 20) % 100_000,
            (n >> 8) % 1_000_000,
            n % 0xffff
        );
    }
    out.truncate(len);
    out
}

fn generate(dir: &Path, size_mib: u64) -> std::io::Result<(u64, u64)> {
    let marker = dir.join(format!(".complete-{size_mib}"));
    let upper = dir.join("upper");
    if marker.exists() {
        let (files, bytes) = std::fs::read_to_string(&marker)?
            .split_once(' ')
            .map_or((0, 0), |(a, b)| {
                (a.trim().parse().unwrap_or(0), b.trim().parse().unwrap_or(0))
            });
        return Ok((files, bytes));
    }
    if upper.exists() {
        std::fs::remove_dir_all(&upper)?;
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let total = size_mib << 20;
    let small_budget = total / 4;
    let (mut files, mut bytes) = (0u64, 0u64);
    let mut random = vec![0u8; 1 << 20];
    // Many small files (1–16 KiB), half text, half random, in 300 directories.
    while bytes < small_budget {
        let d = upper.join(format!("usr/share/walt/d{:03}", files % 300));
        if files < 300 {
            std::fs::create_dir_all(&d)?;
        }
        let len = 1024 + (rng.next() % (15 * 1024)) as usize;
        let content = if files.is_multiple_of(2) {
            text(&mut rng, len)
        } else {
            rng.fill(&mut random[..len]);
            random[..len].to_vec()
        };
        std::fs::write(d.join(format!("f{files:06}")), &content)?;
        files += 1;
        bytes += len as u64;
    }
    // A few large files: 1 MiB blocks alternating random and text (about half compressible).
    let large_dir = upper.join("var/lib/walt");
    std::fs::create_dir_all(&large_dir)?;
    let large_count = 4;
    let per_file = (total - bytes) / large_count;
    let text_block = text(&mut rng, 1 << 20);
    for i in 0..large_count {
        let mut file = std::io::BufWriter::new(std::fs::File::create(large_dir.join(format!("big{i}.img")))?);
        let mut written = 0u64;
        let mut block = 0u64;
        while written < per_file {
            let len = (per_file - written).min(1 << 20) as usize;
            if block.is_multiple_of(2) {
                rng.fill(&mut random[..len]);
                file.write_all(&random[..len])?;
            } else {
                file.write_all(&text_block[..len])?;
            }
            written += len as u64;
            block += 1;
        }
        file.flush()?;
        files += 1;
        bytes += written;
    }
    std::fs::write(&marker, format!("{files} {bytes}"))?;
    Ok((files, bytes))
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(|l| l[6..].trim().trim_end_matches(" kB").trim().parse().unwrap_or(0))
        })
        .unwrap_or(0)
}

fn reset_peak_rss() {
    // Writing 5 to clear_refs resets VmHWM to the current RSS (Linux ≥ 4.0).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn reference(upper: &Path) -> f64 {
    let start = Instant::now();
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "tar -C '{}' -cf - . | gzip -1 | sha256sum >/dev/null",
            upper.display()
        ))
        .status()
        .expect("sh");
    assert!(status.success(), "the reference pipeline failed");
    start.elapsed().as_secs_f64()
}

fn main() {
    let mut size_mib = 1024u64;
    let mut dir = PathBuf::from("/var/tmp/walt-bench");
    let mut compression = Compression::Gzip;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--size-mib" => size_mib = args.next().and_then(|v| v.parse().ok()).expect("--size-mib N"),
            "--dir" => dir = PathBuf::from(args.next().expect("--dir DIR")),
            "--compression" => {
                compression = match args.next().as_deref() {
                    Some("zstd") => Compression::Zstd,
                    _ => Compression::Gzip,
                }
            }
            other => panic!(
                "unknown argument {other}; usage: oci_bench [--size-mib N] [--dir DIR] [--compression gzip|zstd]"
            ),
        }
    }
    std::fs::create_dir_all(&dir).expect("bench dir");
    let start = Instant::now();
    let (files, bytes) = generate(&dir, size_mib).expect("generating the upper dir");
    let upper = dir.join("upper");
    println!(
        "upper dir {}: {files} files, {:.2} GiB (ready in {:.1} s)",
        upper.display(),
        bytes as f64 / f64::from(1u32 << 30),
        start.elapsed().as_secs_f64()
    );

    let registry = Registry::start().expect("registry");
    let layout = OciLayout::busybox(Arch::Amd64).expect("base image");
    layout.push("base", &registry, "bench/base:1").expect("push base");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let client = RegistryClient::new(ClientOptions::insecure([registry.host()])).expect("client");
    let base = runtime
        .block_on(client.resolve(&registry.reference("bench/base:1"), None))
        .expect("resolve base");

    // Warm the page cache the same way for both (one read pass), then measure side by side.
    let _ = reference(&upper);
    let reference_first = reference(&upper);

    reset_peak_rss();
    let before = peak_rss_kib();
    let start = Instant::now();
    let mut options = CommitOptions::new("walt bench");
    options.compression = compression;
    let pushed = runtime
        .block_on(client.push_on_top(
            &base,
            &registry.reference("bench/result"),
            ChangeSource::UpperDir(upper.clone()),
            options,
        ))
        .expect("push");
    let ours = start.elapsed().as_secs_f64();
    let peak = peak_rss_kib();

    let reference_second = reference(&upper);
    let reference_time = f64::midpoint(reference_first, reference_second);
    println!(
        "reference  tar | gzip -1 | sha256sum        : {reference_time:.2} s ({reference_first:.2} s, {reference_second:.2} s)"
    );
    println!(
        "walt push  layer+{:?}+digests+chunked upload : {ours:.2} s (layer {:.0} MiB, {} entries)",
        compression,
        pushed.layer_size as f64 / f64::from(1u32 << 20),
        pushed.summary.entries
    );
    println!(
        "ratio ours/reference: {:.2} (budget <= 1.0)",
        ours / reference_time
    );
    println!(
        "peak RSS during the push: {} MiB (before: {} MiB; budget <= 64 MiB)",
        peak / 1024,
        before / 1024
    );
    println!("pushed {}", pushed.reference);
}
