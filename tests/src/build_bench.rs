//! The image build benchmark's inputs and readings, shared by the host benchmark
//! (`operator/examples/runtime_bench.rs build`: `walt-operator build` vs `buildah bud`) and the
//! cluster one (`tests/tests/bench.rs`: `kubectl walt image build --from-dir` vs `buildah bud`): the
//! build context (a Dockerfile on a Debian base, a .deb installed with `dpkg -i`, `COPY` of 10,000
//! small files, two `RUN`s; nothing reaches the network), and what is read from the results (the
//! compressed size of an image, what the plugin says it pushed).

use std::path::Path;
use std::process::Command;

use crate::FixtureError;

/// Small files the context's `COPY` carries: [`FILE_DIRS`] directories of [`FILES_PER_DIR`].
pub const FILE_DIRS: usize = 100;
/// Files per directory of the context's `COPY`.
pub const FILES_PER_DIR: usize = 100;
/// The package the context's .deb installs (`/usr/share/<name>/hello.txt`).
pub const PACKAGE: &str = "walt-bench";

/// The benchmark's Dockerfile on `base` (pure): the .deb copied and installed with `dpkg -i`, the
/// 10,000 files copied, and a `RUN` that reads them (so the last layer depends on the copy).
pub fn dockerfile(base: &str) -> String {
    format!(
        "FROM {base}\nCOPY {PACKAGE}.deb /tmp/\nRUN dpkg -i /tmp/{PACKAGE}.deb && rm /tmp/{PACKAGE}.deb\n\
         COPY files/ /opt/files/\nRUN echo built > /etc/{PACKAGE} && find /opt/files -type f | wc -l > /opt/count\n"
    )
}

/// The `DEBIAN/control` of the context's package (architecture `all`: one .deb for every CPU).
fn control() -> String {
    format!(
        "Package: {PACKAGE}\nVersion: 1.0\nArchitecture: all\nMaintainer: walt <walt@example.org>\n\
         Description: walt build benchmark\n"
    )
}

/// The relative path and content of small file `file` of directory `dir` of the context (pure).
pub fn small_file(dir: usize, file: usize) -> (String, String) {
    (
        format!("files/{dir:03}/{file:03}.txt"),
        format!("file {dir} {file}\n"),
    )
}

fn write(path: &Path, text: &str) -> Result<(), FixtureError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| FixtureError::io(&format!("creating {}", parent.display()), e))?;
    }
    std::fs::write(path, text).map_err(|e| FixtureError::io(&format!("writing {}", path.display()), e))
}

/// Writes the benchmark's build context in `dir` (created): `Dockerfile` on `base`, `walt-bench.deb`
/// (built here with `dpkg-deb`), and the 10,000 files under `files/`.
pub fn write_context(dir: &Path, base: &str) -> Result<(), FixtureError> {
    crate::require_tool("dpkg-deb", "dpkg")?;
    let package = tempfile::tempdir().map_err(|e| FixtureError::io("creating the package's dir", e))?;
    write(&package.path().join("DEBIAN/control"), &control())?;
    write(
        &package.path().join(format!("usr/share/{PACKAGE}/hello.txt")),
        "hello\n",
    )?;
    std::fs::create_dir_all(dir).map_err(|e| FixtureError::io(&format!("creating {}", dir.display()), e))?;
    crate::run(
        Command::new("dpkg-deb")
            .args(["--build", "--root-owner-group"])
            .arg(package.path())
            .arg(dir.join(format!("{PACKAGE}.deb"))),
    )?;
    for d in 0..FILE_DIRS {
        for f in 0..FILES_PER_DIR {
            let (path, text) = small_file(d, f);
            write(&dir.join(path), &text)?;
        }
    }
    write(&dir.join("Dockerfile"), &dockerfile(base))
}

/// The compressed size of an image (the sum of its layers' sizes) from its manifest as
/// `skopeo inspect --raw` prints it; None for an index or an unreadable text.
pub fn layers_bytes(manifest: &str) -> Option<u64> {
    let manifest: serde_json::Value = serde_json::from_str(manifest).ok()?;
    manifest["layers"]
        .as_array()?
        .iter()
        .map(|layer| layer["size"].as_u64())
        .sum()
}

/// What `kubectl walt image build` says it did, from its `Built NAME: sha256:… (amd64, 6 steps,
/// 2 cached, 1 layers pushed, in 0:05)` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Built {
    /// Steps taken from the step cache.
    pub cached: u64,
    /// Layers the build pushed.
    pub layers_pushed: u64,
}

/// The [`Built`] figures of the plugin's standard output (pure); None without a `Built` line.
pub fn built(stdout: &str) -> Option<Built> {
    let line = stdout.lines().rev().find(|line| line.starts_with("Built "))?;
    let details = line.rsplit_once('(')?.1.trim_end_matches(')');
    let count = |suffix: &str| {
        details
            .split(", ")
            .find_map(|part| part.strip_suffix(suffix))
            .and_then(|n| n.trim().parse().ok())
    };
    Some(Built {
        cached: count(" cached")?,
        layers_pushed: count(" layers pushed")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dockerfile_installs_the_deb_and_copies_the_files() {
        let text = dockerfile("reg.lab/walt/bench/debian:latest");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "FROM reg.lab/walt/bench/debian:latest");
        assert!(lines.contains(&"RUN dpkg -i /tmp/walt-bench.deb && rm /tmp/walt-bench.deb"));
        assert!(lines.contains(&"COPY files/ /opt/files/"));
        assert_eq!(lines.iter().filter(|l| l.starts_with("RUN ")).count(), 2);
    }

    #[test]
    fn the_context_holds_the_deb_and_ten_thousand_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_context(dir.path(), "base").expect("the context");
        let files = walkdir(&dir.path().join("files"));
        assert_eq!(files, 10_000);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("files/099/042.txt")).expect("a file"),
            "file 99 42\n"
        );
        let fields = crate::run_stdout(
            Command::new("dpkg-deb")
                .args(["--field"])
                .arg(dir.path().join("walt-bench.deb"))
                .args(["Package", "Architecture"]),
        )
        .expect("dpkg-deb reads the package");
        assert_eq!(fields, "Package: walt-bench\nArchitecture: all");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("Dockerfile")).expect("Dockerfile"),
            dockerfile("base")
        );
    }

    fn walkdir(dir: &Path) -> usize {
        std::fs::read_dir(dir)
            .expect("read_dir")
            .map(|entry| {
                let path = entry.expect("entry").path();
                if path.is_dir() { walkdir(&path) } else { 1 }
            })
            .sum()
    }

    #[test]
    fn the_size_of_an_image_is_the_sum_of_its_layers() {
        let manifest = r#"{"schemaVersion":2,"config":{"size":1234},
            "layers":[{"digest":"sha256:a","size":120000000},{"digest":"sha256:b","size":4567}]}"#;
        assert_eq!(layers_bytes(manifest), Some(120_004_567));
        assert_eq!(layers_bytes(r#"{"manifests":[]}"#), None, "an index");
        assert_eq!(layers_bytes("not json"), None);
    }

    #[test]
    fn what_the_plugin_says_it_pushed() {
        let stdout = "STEP 6/6: RUN echo built\nBuilt build-amd64: sha256:0a1b2c3d4e5f (amd64, 6 steps, 3 cached, 0 layers pushed, in 0:04)\n";
        assert_eq!(
            built(stdout),
            Some(Built {
                cached: 3,
                layers_pushed: 0
            })
        );
        let emulated = "Built b: sha256:0a1b (arm64, emulated, 6 steps, 0 cached, 3 layers pushed)\n";
        assert_eq!(built(emulated).map(|b| b.layers_pushed), Some(3));
        assert_eq!(built("Build failed\n"), None);
    }
}
