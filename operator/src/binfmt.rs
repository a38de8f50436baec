//! `walt-operator binfmt`: registers the qemu-user handlers of the walt image in the kernel's
//! binfmt_misc table, once per cluster node (what the chart's binfmt DaemonSet runs).
//!
//! The table is kernel-global, so the agent is careful: it mounts binfmt_misc only when the node has not,
//! it treats any enabled handler with the same magic and the fix-binary flag as "already there" (whoever
//! wrote it: the node's own `binfmt-support`, another tool), and on shutdown it removes only the handlers
//! it wrote itself. The fix-binary flag (`F`) makes the kernel open the interpreter at registration time,
//! so shell pods and virtual nodes need no qemu copy inside their images.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where binfmt_misc lives.
const BINFMT_DIR: &str = "/proc/sys/fs/binfmt_misc";

/// Where the walt image keeps its qemu-user interpreters (Debian's names: the `-binfmt-P` suffix tells
/// Debian's qemu that argv\[0\] is preserved).
pub const INTERPRETER_DIR: &str = "/usr/libexec/qemu-binfmt";

/// Errors of the binfmt agent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// binfmt_misc is not mounted and mounting it failed.
    #[error(
        "binfmt_misc is not mounted at {BINFMT_DIR} and mounting it failed: {0} (the agent needs a privileged container)"
    )]
    Mount(#[source] nix::Error),
    /// Reading or writing the binfmt_misc table failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The interpreter for a handler is missing from the image.
    #[error(
        "the qemu interpreter {0} is missing: this walt image was built without it (rebuild with `cargo xtask image build`)"
    )]
    MissingInterpreter(PathBuf),
    /// Signal handling or the runtime could not start.
    #[error("starting the agent's runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

/// One qemu-user handler: an ELF machine to emulate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handler {
    /// Handler name in the table (`qemu-aarch64`).
    pub name: &'static str,
    /// Interpreter file name under [`INTERPRETER_DIR`].
    pub interpreter: &'static str,
    /// ELF header bytes to match.
    pub magic: &'static [u8],
    /// Mask applied before matching.
    pub mask: &'static [u8],
}

const ARM64: Handler = Handler {
    name: "qemu-aarch64",
    interpreter: "aarch64-binfmt-P",
    magic: b"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00",
    mask: b"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff",
};
const ARM: Handler = Handler {
    name: "qemu-arm",
    interpreter: "arm-binfmt-P",
    magic: b"\x7fELF\x01\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x28\x00",
    mask: b"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff",
};
const AMD64: Handler = Handler {
    name: "qemu-x86_64",
    interpreter: "x86_64-binfmt-P",
    magic: b"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x3e\x00",
    mask: b"\xff\xff\xff\xff\xff\xfe\xfe\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff",
};

/// The handlers the walt image carries for the CPU it runs on (the foreign architectures of a lab).
pub fn handlers_for_host() -> &'static [Handler] {
    if cfg!(target_arch = "x86_64") {
        &[ARM64, ARM]
    } else if cfg!(target_arch = "aarch64") {
        &[AMD64]
    } else {
        &[]
    }
}

impl Handler {
    /// The line written to `register`: `:name:M::magic:mask:interpreter:PF`.
    pub fn registration(&self, interpreter_dir: &Path) -> String {
        format!(
            ":{}:M::{}:{}:{}:PF",
            self.name,
            escape(self.magic),
            escape(self.mask),
            interpreter_dir.join(self.interpreter).display()
        )
    }

    /// The magic as binfmt_misc prints it in a handler file (`magic 7f454c46…`).
    fn magic_hex(&self) -> String {
        hex::encode(self.magic)
    }
}

fn escape(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut out, byte| {
        let _ = write!(out, "\\x{byte:02x}");
        out
    })
}

/// What the table says about one handler file.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Entry {
    /// `enabled` (else `disabled`).
    pub enabled: bool,
    /// The interpreter path.
    pub interpreter: String,
    /// Flags letters (`PF`).
    pub flags: String,
    /// The magic, in hex.
    pub magic: String,
}

/// Parses a handler file of binfmt_misc.
pub fn parse_entry(text: &str) -> Entry {
    let mut entry = Entry::default();
    for line in text.lines() {
        if line == "enabled" {
            entry.enabled = true;
        } else if let Some(rest) = line.strip_prefix("interpreter ") {
            rest.clone_into(&mut entry.interpreter);
        } else if let Some(rest) = line.strip_prefix("flags: ") {
            rest.clone_into(&mut entry.flags);
        } else if let Some(rest) = line.strip_prefix("magic ") {
            rest.clone_into(&mut entry.magic);
        }
    }
    entry
}

/// How one handler stands in the table.
#[derive(Debug, PartialEq, Eq)]
pub enum Status {
    /// An enabled handler with the same magic and the fix-binary flag exists (its name).
    Present(String),
    /// A handler with the same magic exists but is disabled or lacks the fix-binary flag (its name): left
    /// alone, since it is not ours to replace.
    Unusable(String),
    /// No handler for this machine.
    Missing,
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_owned();
    move |source| Error::Io { action, path, source }
}

/// Looks for a handler of the same machine in the table at `dir`.
pub fn status(dir: &Path, handler: &Handler) -> Result<Status, Error> {
    let wanted = handler.magic_hex();
    let mut unusable = None;
    for dirent in std::fs::read_dir(dir).map_err(io("listing", dir))? {
        let dirent = dirent.map_err(io("listing", dir))?;
        let name = dirent.file_name().to_string_lossy().into_owned();
        if name == "register" || name == "status" {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(dirent.path()) else {
            continue;
        };
        let entry = parse_entry(&text);
        if entry.magic != wanted {
            continue;
        }
        if entry.enabled && entry.flags.contains('F') {
            return Ok(Status::Present(name));
        }
        unusable = Some(name);
    }
    Ok(unusable.map_or(Status::Missing, Status::Unusable))
}

/// Mounts binfmt_misc at [`BINFMT_DIR`] unless it is mounted.
fn ensure_mounted() -> Result<(), Error> {
    if Path::new(BINFMT_DIR).join("register").exists() {
        return Ok(());
    }
    nix::mount::mount(
        Some("binfmt_misc"),
        BINFMT_DIR,
        Some("binfmt_misc"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(Error::Mount)
}

/// Registers every missing handler in the table at `dir`; returns the names it registered.
pub fn register_missing(
    dir: &Path,
    interpreter_dir: &Path,
    handlers: &[Handler],
) -> Result<Vec<String>, Error> {
    let mut registered = Vec::new();
    for handler in handlers {
        match status(dir, handler)? {
            Status::Present(name) => {
                tracing::debug!(handler = handler.name, existing = %name, "handler already registered");
            }
            Status::Unusable(name) => {
                tracing::warn!(
                    handler = handler.name,
                    existing = %name,
                    "a handler for this machine exists but is disabled or lacks the fix-binary flag (F): \
                     emulated shells need F; remove it on the node (echo -1 > {BINFMT_DIR}/{name}) to let walt register its own"
                );
            }
            Status::Missing => {
                let interpreter = interpreter_dir.join(handler.interpreter);
                if !interpreter.exists() {
                    return Err(Error::MissingInterpreter(interpreter));
                }
                let register = dir.join("register");
                std::fs::write(&register, handler.registration(interpreter_dir))
                    .map_err(io("registering a handler through", &register))?;
                tracing::info!(handler = handler.name, interpreter = %interpreter.display(), "registered");
                registered.push(handler.name.to_owned());
            }
        }
    }
    Ok(registered)
}

/// Removes the handlers this agent wrote (same name and our interpreter), leaving others alone.
pub fn unregister_own(dir: &Path, interpreter_dir: &Path, names: &[String]) -> Result<(), Error> {
    for name in names {
        let path = dir.join(name);
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let entry = parse_entry(&text);
        if Path::new(&entry.interpreter).starts_with(interpreter_dir) {
            std::fs::write(&path, "-1").map_err(io("removing handler", &path))?;
            tracing::info!(handler = %name, "removed");
        }
    }
    Ok(())
}

/// Arguments of `walt-operator binfmt`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Keep running and check again every SECONDS (what a DaemonSet pod does); on SIGTERM, remove the
    /// handlers this agent registered. Without it: register what is missing once and exit.
    #[arg(long, value_name = "SECONDS")]
    pub watch: Option<u64>,
    /// Directory of the qemu interpreters.
    #[arg(long, default_value = INTERPRETER_DIR)]
    pub interpreter_dir: PathBuf,
}

/// Runs `walt-operator binfmt`.
pub fn run(args: &Args) -> Result<i32, Box<dyn std::error::Error + Send + Sync>> {
    let _ = tracing_subscriber::fmt().with_writer(std::io::stderr).try_init();
    ensure_mounted()?;
    let dir = Path::new(BINFMT_DIR);
    let handlers = handlers_for_host();
    let mut ours = register_missing(dir, &args.interpreter_dir, handlers)?;
    for handler in handlers {
        eprintln!("binfmt: {}: {:?}", handler.name, status(dir, handler)?);
    }
    let Some(seconds) = args.watch else { return Ok(0) };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::Runtime)?;
    runtime.block_on(async {
        let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(Error::Runtime)?;
        let mut interval = tokio::time::interval(Duration::from_secs(seconds.max(1)));
        interval.tick().await;
        loop {
            tokio::select! {
                _ = interval.tick() => {
                    match register_missing(dir, &args.interpreter_dir, handlers) {
                        Ok(new) => ours.extend(new),
                        Err(error) => tracing::error!(%error, "checking the handlers"),
                    }
                }
                _ = terminate.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
            }
        }
        unregister_own(dir, &args.interpreter_dir, &ours)?;
        Ok::<_, Error>(())
    })?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_line_matches_debian_conventions() {
        let line = ARM64.registration(Path::new(INTERPRETER_DIR));
        assert_eq!(
            line,
            ":qemu-aarch64:M::\\x7f\\x45\\x4c\\x46\\x02\\x01\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x02\\x00\\xb7\\x00:\
             \\xff\\xff\\xff\\xff\\xff\\xff\\xff\\x00\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\xfe\\xff\\xff\\xff:\
             /usr/libexec/qemu-binfmt/aarch64-binfmt-P:PF"
        );
    }

    #[test]
    fn status_reads_an_existing_table() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("register"), "").expect("write");
        std::fs::write(dir.path().join("status"), "enabled\n").expect("write");
        assert_eq!(status(dir.path(), &ARM64).expect("status"), Status::Missing);
        let entry = format!(
            "enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: PF\noffset 0\nmagic {}\nmask {}\n",
            hex::encode(ARM64.magic),
            hex::encode(ARM64.mask)
        );
        std::fs::write(dir.path().join("aarch64"), &entry).expect("write");
        assert_eq!(
            status(dir.path(), &ARM64).expect("status"),
            Status::Present("aarch64".into())
        );
        std::fs::write(dir.path().join("aarch64"), entry.replace("flags: PF", "flags: P")).expect("write");
        assert_eq!(
            status(dir.path(), &ARM64).expect("status"),
            Status::Unusable("aarch64".into())
        );
        assert_eq!(status(dir.path(), &ARM).expect("status"), Status::Missing);
    }

    #[test]
    fn missing_interpreter_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("register"), "").expect("write");
        let error =
            register_missing(dir.path(), Path::new("/nonexistent/qemu"), &[ARM64]).expect_err("must fail");
        assert!(
            error.to_string().contains("/nonexistent/qemu/aarch64-binfmt-P"),
            "{error}"
        );
    }
}
