//! CPU architectures and qemu-user emulation through binfmt_misc.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Why an image of another architecture cannot run here.
#[derive(Debug, thiserror::Error)]
pub enum EmulationError {
    /// binfmt_misc is not mounted.
    #[error(
        "the image is for {image} but this host is {host}, and binfmt_misc is not mounted, so the {handler} handler cannot be checked. Enable emulation on the host (once per machine, as root): mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc && update-binfmts --enable {handler} (Debian packages qemu-user-static and binfmt-support)"
    )]
    NotMounted {
        /// Image architecture (OCI name).
        image: String,
        /// Host architecture (OCI name).
        host: String,
        /// binfmt handler name.
        handler: String,
    },
    /// binfmt_misc is globally disabled.
    #[error(
        "the image is for {image} but binfmt_misc is disabled on this host: enable it with `echo 1 > /proc/sys/fs/binfmt_misc/status`"
    )]
    Disabled {
        /// Image architecture.
        image: String,
    },
    /// The handler is missing or disabled.
    #[error(
        "the image is for {image} but this host is {host} and the binfmt_misc handler {handler} is {state}. Enable it on the host (once per machine, as root): update-binfmts --enable {handler} (Debian packages qemu-user-static and binfmt-support)"
    )]
    Missing {
        /// Image architecture.
        image: String,
        /// Host architecture.
        host: String,
        /// binfmt handler name.
        handler: String,
        /// "not registered" or "disabled".
        state: &'static str,
    },
    /// The handler lacks the fix-binary flag.
    #[error(
        "the binfmt_misc handler {handler} is registered without the F (fix-binary) flag (flags: {flags}), so the emulator cannot be found inside the image. Re-register it with F: update-binfmts --disable {handler}; then install qemu-user-static's registration (flags PF) with update-binfmts --enable {handler}"
    )]
    NoFixBinary {
        /// binfmt handler name.
        handler: String,
        /// Flags found.
        flags: String,
    },
    /// The architecture has no known qemu-user handler.
    #[error("the image is for {image} and this host is {host}; walt knows no qemu-user emulator for {image}")]
    Unsupported {
        /// Image architecture.
        image: String,
        /// Host architecture.
        host: String,
    },
}

/// The host's architecture as an OCI name (`amd64`, `arm64`, …).
pub fn host_architecture() -> String {
    let machine = nix::sys::utsname::uname().map_or_else(
        |_| std::env::consts::ARCH.to_string(),
        |u| u.machine().to_string_lossy().into_owned(),
    );
    oci_architecture(&machine).to_string()
}

/// Maps a kernel/ELF machine name to the OCI architecture name.
pub fn oci_architecture(machine: &str) -> &str {
    match machine {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "armv7l" | "armv6l" | "armhf" | "armel" => "arm",
        "i386" | "i486" | "i586" | "i686" | "x86" => "386",
        "powerpc64le" => "ppc64le",
        other => other,
    }
}

/// The binfmt_misc handler name (as Debian's qemu-user-static registers it)
/// that runs binaries of OCI architecture `arch`.
pub fn binfmt_handler(arch: &str) -> Option<&'static str> {
    Some(match arch {
        "arm64" => "qemu-aarch64",
        "arm" => "qemu-arm",
        "amd64" => "qemu-x86_64",
        "386" => "qemu-i386",
        "riscv64" => "qemu-riscv64",
        "ppc64le" => "qemu-ppc64le",
        "s390x" => "qemu-s390x",
        "mips64le" => "qemu-mips64el",
        "loong64" => "qemu-loongarch64",
        _ => return None,
    })
}

/// Whether `image_arch` runs natively on a `host_arch` machine.
pub fn runs_natively(image_arch: &str, host_arch: &str) -> bool {
    image_arch == host_arch
        || (host_arch == "amd64" && image_arch == "386")
        || (host_arch == "arm64" && image_arch == "arm" && arm32_supported())
}

fn arm32_supported() -> bool {
    // arm64 kernels built with COMPAT run armv7 binaries; /proc/cpuinfo lists
    // the 32-bit features then.
    fs::read_to_string("/proc/cpuinfo")
        .is_ok_and(|info| info.contains("CPU architecture: 7") || info.contains("aarch32"))
}

/// Where walt's pods see the cluster node's binfmt_misc table (a read-only hostPath volume): inside a
/// container, `/proc/sys/fs/binfmt_misc` is not mounted.
pub const POD_BINFMT_DIR: &str = "/run/walt/binfmt_misc";

/// Checks that binaries of `image_arch` can run here; returns `true` when they
/// run through emulation. The binfmt_misc table is read where it is mounted: the
/// usual place on a host, else [`POD_BINFMT_DIR`] in a walt pod.
pub fn check(image_arch: &str) -> Result<bool, EmulationError> {
    let host = host_architecture();
    let binfmt = [Path::new("/proc/sys/fs/binfmt_misc"), Path::new(POD_BINFMT_DIR)]
        .into_iter()
        .find(|dir| dir.join("status").exists())
        .unwrap_or(Path::new("/proc/sys/fs/binfmt_misc"));
    check_with(image_arch, &host, binfmt)
}

/// [`check`] with an explicit host architecture and binfmt_misc directory.
pub fn check_with(image_arch: &str, host: &str, binfmt: &Path) -> Result<bool, EmulationError> {
    if runs_natively(image_arch, host) {
        return Ok(false);
    }
    let handler = binfmt_handler(image_arch).ok_or_else(|| EmulationError::Unsupported {
        image: image_arch.into(),
        host: host.into(),
    })?;
    let status = fs::read_to_string(binfmt.join("status")).map_err(|_| EmulationError::NotMounted {
        image: image_arch.into(),
        host: host.into(),
        handler: handler.into(),
    })?;
    if status.trim() != "enabled" {
        return Err(EmulationError::Disabled {
            image: image_arch.into(),
        });
    }
    let missing = |state| EmulationError::Missing {
        image: image_arch.into(),
        host: host.into(),
        handler: handler.into(),
        state,
    };
    let entry = fs::read_to_string(binfmt.join(handler)).map_err(|_| missing("not registered"))?;
    if entry.lines().next() != Some("enabled") {
        return Err(missing("disabled"));
    }
    let flags = entry
        .lines()
        .find_map(|line| line.strip_prefix("flags:"))
        .map(str::trim)
        .unwrap_or_default()
        .to_string();
    if !flags.contains('F') {
        return Err(EmulationError::NoFixBinary {
            handler: handler.into(),
            flags,
        });
    }
    Ok(true)
}

/// The architecture of an ELF binary (OCI name), from its header.
pub fn elf_architecture(path: &Path) -> Option<String> {
    let mut header = [0u8; 20];
    fs::File::open(path).ok()?.read_exact(&mut header).ok()?;
    if &header[..4] != b"\x7fELF" {
        return None;
    }
    let little = header[5] == 1;
    let machine = if little {
        u16::from_le_bytes([header[18], header[19]])
    } else {
        u16::from_be_bytes([header[18], header[19]])
    };
    let class64 = header[4] == 2;
    Some(
        match (machine, class64) {
            (62, _) => "amd64",
            (183, _) => "arm64",
            (40, _) => "arm",
            (3, _) => "386",
            (243, _) => "riscv64",
            (21, true) if little => "ppc64le",
            (22, _) => "s390x",
            (258, _) => "loong64",
            (8, true) => "mips64le",
            _ => return None,
        }
        .to_string(),
    )
}

/// The architecture of an unpacked root (layers top first), from its shell
/// or busybox binary.
pub fn root_architecture(layers: &[PathBuf]) -> Option<String> {
    ["/bin/sh", "/bin/bash", "/bin/busybox", "/usr/bin/env"]
        .iter()
        .find_map(|path| {
            let resolved = super::root::resolve_in_root(layers, Path::new(path))?;
            let relative = resolved.strip_prefix("/").ok()?.to_path_buf();
            layers
                .iter()
                .map(|layer| layer.join(&relative))
                .find(|p| p.is_file())
                .and_then(|p| elf_architecture(&p))
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn native_needs_no_handler() {
        assert_eq!(
            check_with("amd64", "amd64", Path::new("/nonexistent")).ok(),
            Some(false)
        );
    }

    #[test]
    fn missing_mount_names_the_handler() {
        let error = check_with("arm64", "amd64", Path::new("/nonexistent")).unwrap_err();
        let text = error.to_string();
        assert!(text.contains("qemu-aarch64"), "{text}");
        assert!(text.contains("mount -t binfmt_misc"), "{text}");
    }

    #[test]
    fn handler_without_fix_binary_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("status"), "enabled\n").unwrap();
        fs::write(
            dir.path().join("qemu-aarch64"),
            "enabled\ninterpreter /usr/bin/qemu-aarch64\nflags: P\noffset 0\n",
        )
        .unwrap();
        let error = check_with("arm64", "amd64", dir.path()).unwrap_err();
        assert!(error.to_string().contains("F (fix-binary)"), "{error}");
        fs::write(
            dir.path().join("qemu-aarch64"),
            "disabled\ninterpreter /usr/bin/qemu-aarch64\nflags: PF\noffset 0\n",
        )
        .unwrap();
        let error = check_with("arm64", "amd64", dir.path()).unwrap_err();
        assert!(error.to_string().contains("is disabled"), "{error}");
        fs::write(
            dir.path().join("qemu-aarch64"),
            "enabled\ninterpreter /usr/bin/qemu-aarch64\nflags: PF\noffset 0\n",
        )
        .unwrap();
        assert!(check_with("arm64", "amd64", dir.path()).unwrap());
    }
}
