//! `cargo xtask dist`: the kubectl-walt release archives unpack and their binary runs (arm64 through
//! qemu-user binfmt), `SHA256SUMS` matches them, and the krew manifest names both with their sha256.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use serde_yaml::Value;
use walt_tests::dist::{self, Options, archive_name};
use walt_tests::image_build::Arch;

fn run_version(binary: &Path) -> String {
    let output = Command::new(binary)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("running {} --version: {e}", binary.display()));
    assert!(
        output.status.success(),
        "{} --version failed: {}",
        binary.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

fn elf_machine(binary: &Path) -> u16 {
    let bytes = std::fs::read(binary).expect("read the binary");
    assert_eq!(&bytes[..4], b"\x7fELF", "{} is not an ELF file", binary.display());
    u16::from_le_bytes([bytes[18], bytes[19]])
}

#[test]
fn dist_archives_unpack_run_and_match_their_checksums_and_krew_manifest() {
    walt_tests::k8s::images::ensure_arm64_emulation().expect("arm64 emulation (qemu-user binfmt)");
    let out = tempfile::tempdir().expect("tempdir");
    let version = dist::workspace_version();
    let base_url = "https://downloads.example.org/walt/v{version}/";
    let made = dist::dist(&Options {
        out_dir: out.path().to_owned(),
        version: version.to_owned(),
        base_url: base_url.to_owned(),
        arches: Arch::ALL.to_vec(),
    })
    .expect("cargo xtask dist");

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

    for (arch, machine) in [(Arch::Amd64, 62u16), (Arch::Arm64, 183u16)] {
        let name = archive_name(version, arch);
        let path = out.path().join(&name);
        let (sha, size) = dist::sha256_file(&path).expect("hash");
        assert_eq!(sums.get(&name), Some(&sha), "{name} in SHA256SUMS");
        eprintln!("{name}: {size} bytes, sha256 {sha}");

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
        let mut files: Vec<String> = std::fs::read_dir(&unpacked)
            .expect("list")
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        assert_eq!(files, ["LICENSE", "README.md", "kubectl-walt"], "{name}");
        let binary = unpacked.join("kubectl-walt");
        assert_eq!(elf_machine(&binary), machine, "{name}: CPU of the binary");
        // The arm64 binary runs through the kernel's qemu-aarch64 binfmt handler.
        let printed = run_version(&binary);
        assert_eq!(printed, format!("kubectl-walt {version}"), "{name}");
    }

    // The krew manifest parses and names both archives with their sha256.
    let text = std::fs::read_to_string(&made.krew_manifest).expect("read walt.yaml");
    let manifest: Value = serde_yaml::from_str(&text).expect("walt.yaml is YAML");
    assert_eq!(
        manifest["apiVersion"],
        Value::from("krew.googlecontainertools.github.com/v1alpha2")
    );
    assert_eq!(manifest["kind"], Value::from("Plugin"));
    assert_eq!(manifest["spec"]["version"], Value::from(format!("v{version}")));
    let platforms = manifest["spec"]["platforms"].as_sequence().expect("platforms");
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
        seen.push(arch.to_owned());
    }
    seen.sort();
    assert_eq!(seen, ["amd64", "arm64"]);
}
