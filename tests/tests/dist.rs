//! `cargo xtask dist`: the kubectl-walt release archives unpack, their binary is static and runs as
//! `kubectl walt` (arm64 through qemu-user binfmt), `SHA256SUMS` matches them, the krew manifest names
//! both with their sha256, and a second run makes the same bytes.
//!
//! The binaries are built with the `dist-check` profile (unoptimized: minutes instead of the release
//! build's tens of minutes on a loaded machine); everything else is what `cargo xtask dist` does for a
//! release, which only changes the cargo profile.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use serde_json::Value;
use walt_tests::dist::{self, Options, archive_name};
use walt_tests::image_build::{Arch, BuildProfile};

/// ELF `e_machine` of x86-64 and of AArch64.
const EM_X86_64: u16 = 62;
const EM_AARCH64: u16 = 183;
/// ELF program header type of the dynamic loader's path (present in every dynamically linked executable).
const PT_INTERP: u32 = 3;

/// `e_machine` of a 64-bit little-endian ELF executable, and whether it names a dynamic loader.
fn elf_machine_and_interpreter(binary: &Path) -> (u16, bool) {
    let bytes = std::fs::read(binary).expect("read the binary");
    assert!(
        bytes.len() > 64 && &bytes[..4] == b"\x7fELF" && bytes[4] == 2 && bytes[5] == 1,
        "{} is not a 64-bit little-endian ELF file",
        binary.display()
    );
    let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let machine = u16_at(18);
    let (phoff, phentsize, phnum) = (
        u64_at(32) as usize,
        usize::from(u16_at(54)),
        usize::from(u16_at(56)),
    );
    let interpreter = (0..phnum).any(|i| u32_at(phoff + i * phentsize) == PT_INTERP);
    (machine, interpreter)
}

/// `kubectl walt --version` with `dir` first on PATH (kubectl finds plugins there).
fn kubectl_walt_version(dir: &Path) -> String {
    let kubectl = walt_tests::deploy::kubectl().expect("kubectl (WALT_KUBECTL)");
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![dir.to_owned()];
    paths.extend(std::env::split_paths(&path));
    let output = Command::new(&kubectl)
        .args(["walt", "--version"])
        .env("PATH", std::env::join_paths(paths).expect("PATH"))
        .output()
        .unwrap_or_else(|e| panic!("running {} walt --version: {e}", kubectl.display()));
    assert!(
        output.status.success(),
        "kubectl walt --version ({}) failed: {}",
        dir.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

fn make(out: &Path, version: &str) -> dist::Dist {
    dist::dist(&Options {
        out_dir: out.to_owned(),
        version: version.to_owned(),
        base_url: "https://downloads.example.org/walt/v{version}/".to_owned(),
        arches: Arch::ALL.to_vec(),
        profile: BuildProfile::Check,
    })
    .expect("cargo xtask dist --profile dist-check")
}

#[test]
fn dist_archives_unpack_run_and_match_their_checksums_and_krew_manifest() {
    walt_tests::k8s::images::ensure_arm64_emulation().expect("arm64 emulation (qemu-user binfmt)");
    let out = tempfile::tempdir().expect("tempdir");
    let version = dist::workspace_version();
    let started = Instant::now();
    let made = make(out.path(), version);
    eprintln!(
        "dist (dist-check profile, amd64 + arm64): {:.0} s",
        started.elapsed().as_secs_f64()
    );

    // SHA256SUMS: the tool itself agrees, and so does our own hash of each file.
    let check = Command::new("sha256sum")
        .args(["-c", "SHA256SUMS"])
        .current_dir(out.path())
        .output()
        .expect("run sha256sum -c");
    assert!(
        check.status.success(),
        "sha256sum -c: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let sums: BTreeMap<String, String> = std::fs::read_to_string(&made.sums)
        .expect("read SHA256SUMS")
        .lines()
        .filter_map(|line| line.split_once("  "))
        .map(|(sha, name)| (name.to_owned(), sha.to_owned()))
        .collect();
    assert_eq!(sums.len(), 2, "{sums:?}");

    for (arch, machine) in [(Arch::Amd64, EM_X86_64), (Arch::Arm64, EM_AARCH64)] {
        let name = archive_name(version, arch);
        let path = out.path().join(&name);
        let (sha, size) = dist::sha256_file(&path).expect("hash");
        assert_eq!(sums.get(&name), Some(&sha), "{name} in SHA256SUMS");
        eprintln!("{name}: {size} bytes, sha256 {sha}");

        // The layout: the three files at the top, the binary executable, owned by root.
        let listing = Command::new("tar")
            .arg("-tvzf")
            .arg(&path)
            .output()
            .expect("run tar -t");
        assert!(listing.status.success(), "tar -tvzf {name}");
        let listing = String::from_utf8_lossy(&listing.stdout).into_owned();
        let entries: Vec<(&str, &str, &str)> = listing
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                Some((*fields.first()?, *fields.get(1)?, *fields.last()?))
            })
            .collect();
        assert_eq!(
            entries,
            [
                ("-rwxr-xr-x", "0/0", "kubectl-walt"),
                ("-rw-r--r--", "0/0", "LICENSE"),
                ("-rw-r--r--", "0/0", "README.md"),
            ],
            "{name}:\n{listing}"
        );

        let unpacked = out.path().join(format!("unpacked-{}", arch.name()));
        std::fs::create_dir_all(&unpacked).expect("mkdir");
        let status = Command::new("tar")
            .arg("-xzf")
            .arg(&path)
            .arg("-C")
            .arg(&unpacked)
            .status()
            .expect("run tar");
        assert!(status.success(), "tar -xzf {name}");
        let binary = unpacked.join("kubectl-walt");
        let (found, interpreter) = elf_machine_and_interpreter(&binary);
        assert_eq!(found, machine, "{name}: CPU of the binary");
        assert!(
            !interpreter,
            "{name}: the binary names a dynamic loader (not static)"
        );
        // kubectl finds the plugin on PATH; the arm64 one runs through the kernel's qemu-aarch64 binfmt handler.
        let printed = kubectl_walt_version(&unpacked);
        assert_eq!(printed, format!("kubectl-walt {version}"), "{name}");
    }

    // The krew manifest parses and names both archives with their sha256.
    let text = std::fs::read_to_string(&made.krew_manifest).expect("read walt.yaml");
    let manifest: Value = serde_saphyr::from_str(&text).expect("walt.yaml is YAML");
    assert_eq!(
        manifest["apiVersion"],
        Value::from("krew.googlecontainertools.github.com/v1alpha2")
    );
    assert_eq!(manifest["kind"], Value::from("Plugin"));
    assert_eq!(manifest["metadata"]["name"], Value::from("walt"));
    assert_eq!(manifest["spec"]["version"], Value::from(format!("v{version}")));
    let platforms = manifest["spec"]["platforms"].as_array().expect("platforms");
    let mut seen = Vec::new();
    for platform in platforms {
        let arch = platform["selector"]["matchLabels"]["arch"]
            .as_str()
            .expect("arch");
        assert_eq!(platform["selector"]["matchLabels"]["os"], Value::from("linux"));
        let name = format!("kubectl-walt_{version}_linux_{arch}.tar.gz");
        assert_eq!(
            platform["uri"],
            Value::from(format!("https://downloads.example.org/walt/v{version}/{name}"))
        );
        assert_eq!(
            platform["sha256"].as_str(),
            sums.get(&name).map(String::as_str),
            "{name}"
        );
        assert_eq!(platform["bin"], Value::from("kubectl-walt"));
        let files: Vec<(&str, &str)> = platform["files"]
            .as_array()
            .expect("files")
            .iter()
            .filter_map(|file| Some((file["from"].as_str()?, file["to"].as_str()?)))
            .collect();
        assert_eq!(
            files,
            [("kubectl-walt", "."), ("LICENSE", "."), ("README.md", ".")],
            "{name}"
        );
        seen.push(arch.to_owned());
    }
    seen.sort();
    assert_eq!(seen, ["amd64", "arm64"]);

    // Reproducible: a second run (cargo has nothing to rebuild) writes the same bytes.
    let again = tempfile::tempdir().expect("tempdir");
    let started = Instant::now();
    let remade = make(again.path(), version);
    eprintln!("dist again: {:.0} s", started.elapsed().as_secs_f64());
    assert_eq!(
        std::fs::read_to_string(&remade.sums).expect("SHA256SUMS again"),
        std::fs::read_to_string(&made.sums).expect("SHA256SUMS")
    );
}
