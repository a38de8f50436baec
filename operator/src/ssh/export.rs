//! Overlay export for node save: the node's upper dir, streamed once over SSH, as a change-set tar.
//!
//! The node runs `tar` on its upper dir (no temp file there); its output goes through
//! [`filter_change_set`] on its way to the layer engine (no temp file here either). The change set is
//! an overlay-style tar: deletions are character devices 0:0 (whiteouts), opaque directories carry the
//! PAX xattr `SCHILY.xattr.trusted.overlay.opaque=y`. The layer engine turns that into an OCI layer.
//!
//! What each kind of node preserves:
//!
//! | | GNU tar node | busybox-only node |
//! |---|---|---|
//! | files, dirs, symlinks, hard links, devices, fifos, modes, owners, mtimes | yes | yes |
//! | deletions (whiteouts) | yes | yes |
//! | opaque directories | yes (`--xattrs`: `trusted.overlay.opaque`) | yes, detected (see below) |
//! | other xattrs (`security.capability`, `user.*`) | yes | no (busybox tar has no xattr support) |
//! | "changed after `/run/uptime-ready`" | mtime or ctime newer | mtime newer (busybox tar has no ctime) |
//!
//! Opaque directories on busybox-only nodes: busybox has no `getfattr` and its tar drops xattrs, so a
//! short busybox shell script lists them first: an upper directory is opaque-equivalent when the node's
//! merged view of it (`ls -A /DIR`, whiteouts hidden) holds exactly the upper dir's own entries (no
//! lower entry shows through). Marking such a directory opaque gives the same merged result, so the
//! layer is right; a directory that is new on the node is marked opaque too (harmless: the base image
//! has nothing there to hide).

use std::collections::{BTreeSet, HashSet};
use std::io::{self, Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use russh::ChannelMsg;

use super::{NodeClient, NodeTarget, SshError};

/// Where a WalT node keeps its overlay upper dir.
pub const WALT_UPPER_DIR: &str = "/run/walt/rootfs/mnt/fs_rw";
/// The file a WalT node writes once booted.
pub const WALT_READY_MARKER: &str = "/run/uptime-ready";
/// WalT's boot-time noise, never saved. Patterns are regular expressions searched in `/PATH`
/// (like WalT's): unanchored, `…$` anchors at the end, `^…` at the start.
pub const WALT_EXCLUDES: &[&str] = &[
    "/log/",
    ".lock$",
    "machine-id",
    "walt-env",
    "_walt_internal_",
    "README.nonlocal",
];

const OPAQUE_XATTR: &str = "SCHILY.xattr.trusted.overlay.opaque";

/// What to export from the node.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// The node's overlay upper dir.
    pub upper_dir: String,
    /// Only entries changed after this file's mtime are saved (volatile boot mode); `None` saves
    /// everything in the upper dir (persistent mode).
    pub ready_marker: Option<String>,
    /// Paths never saved (see [`WALT_EXCLUDES`] for the syntax).
    pub exclude: Vec<String>,
}

impl Default for ExportOptions {
    fn default() -> Self {
        Self {
            upper_dir: WALT_UPPER_DIR.into(),
            ready_marker: Some(WALT_READY_MARKER.into()),
            exclude: WALT_EXCLUDES.iter().map(|&p| p.to_owned()).collect(),
        }
    }
}

/// Which tar the node has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeTar {
    /// GNU tar: xattrs (so opaque dirs) and ctime kept.
    Gnu,
    /// busybox tar (or another tar without xattrs): opaque dirs detected by a script.
    Busybox,
}

/// What the probe of the node found, and how the export will run.
#[derive(Debug, Clone)]
pub struct ExportPlan {
    /// The node's tar.
    pub tar: NodeTar,
    /// The ready marker's mtime (seconds since the epoch), when filtering on it.
    pub changed_since: Option<i64>,
    /// Upper-dir directories (relative paths) found opaque-equivalent by the busybox script.
    pub detected_opaque: HashSet<String>,
    /// The command that streams the tar.
    pub command: String,
    /// Exclusion patterns.
    pub exclude: Vec<String>,
}

fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// The busybox script listing the opaque-equivalent directories of an upper dir (see module docs).
fn opaque_script(upper: &str) -> String {
    format!(
        r#"cd {upper} || exit 3
rootdev=$(stat -c %d /)
find . -mindepth 1 -type d | while IFS= read -r d; do
  m="/${{d#./}}"
  [ "$(stat -c %d "$m" 2>/dev/null)" = "$rootdev" ] || continue
  a=$(find "$d" -mindepth 1 -maxdepth 1 ! -type c | sed 's|.*/||' | sort)
  b=$(ls -A "$m" | sort)
  [ "$a" = "$b" ] && printf '%s\n' "${{d#./}}"
done
exit 0"#,
        upper = shell_quote(upper)
    )
}

/// Probes the node: which tar, the ready marker's time, the upper dir's presence, and (busybox) the
/// opaque directories.
pub async fn plan(client: &NodeClient, options: &ExportOptions) -> Result<ExportPlan, SshError> {
    let target = client.target().clone();
    let marker = options
        .ready_marker
        .as_deref()
        .map(shell_quote)
        .unwrap_or_default();
    let upper = shell_quote(&options.upper_dir);
    let probe = format!(
        "(tar --version 2>/dev/null | head -n 1); echo '::'; {stat}; echo '::'; [ -d {upper} ] && echo present",
        stat = if marker.is_empty() {
            "true".to_owned()
        } else {
            format!("stat -c %Y {marker} 2>/dev/null")
        },
    );
    let output = client.exec(&probe).await?;
    let text = String::from_utf8_lossy(&output.stdout);
    let mut parts = text.split("::");
    let version = parts.next().unwrap_or_default().trim().to_owned();
    let marker_time = parts.next().unwrap_or_default().trim().to_owned();
    let present = parts.next().unwrap_or_default().trim() == "present";
    if !present {
        return Err(SshError::Remote {
            target,
            reason: format!(
                "the overlay upper dir {} does not exist: is the node booted with a WalT overlay root? \
                 (set the upper dir if the node keeps it elsewhere)",
                options.upper_dir
            ),
        });
    }
    let changed_since = match &options.ready_marker {
        None => None,
        Some(path) => Some(marker_time.parse::<i64>().map_err(|_| SshError::Remote {
            target: target.clone(),
            reason: format!(
                "the ready marker {path} is missing, so the node has not finished booting (or is in persistent mode: \
                 then save without the ready filter)"
            ),
        })?),
    };
    let tar = if version.contains("GNU tar") {
        NodeTar::Gnu
    } else {
        NodeTar::Busybox
    };
    let mut detected_opaque = HashSet::new();
    let command = match tar {
        NodeTar::Gnu => format!(
            "exec tar -C {upper} --xattrs --xattrs-include='*' --format=posix --numeric-owner -cf - ."
        ),
        NodeTar::Busybox => {
            let listing = client.exec(&opaque_script(&options.upper_dir)).await?;
            if listing.exit_status != Some(0) {
                return Err(SshError::Remote {
                    target,
                    reason: format!(
                        "listing opaque directories failed ({:?}): {}",
                        listing.exit_status,
                        String::from_utf8_lossy(&listing.stderr).trim()
                    ),
                });
            }
            detected_opaque = String::from_utf8_lossy(&listing.stdout)
                .lines()
                .filter(|line| !line.is_empty())
                .map(str::to_owned)
                .collect();
            format!("exec tar -C {upper} -cf - .")
        }
    };
    Ok(ExportPlan {
        tar,
        changed_since,
        detected_opaque,
        command,
        exclude: options.exclude.clone(),
    })
}

/// Counters shared with whoever shows progress.
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes received from the node.
    pub bytes: AtomicU64,
    /// Entries written to the change set.
    pub files: AtomicU64,
}

enum Piece {
    Data(Bytes),
    End(Result<(), String>),
}

/// The node's tar stream as a blocking reader. It ends with an error (never a clean end of file) when
/// the node's command failed or the connection dropped before it finished, so a consumer cannot
/// mistake a cut stream for a complete one.
pub struct RemoteTarReader {
    receiver: tokio::sync::mpsc::Receiver<Piece>,
    current: Bytes,
    finished: Option<Result<(), String>>,
    progress: Arc<Progress>,
}

impl std::fmt::Debug for RemoteTarReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteTarReader").finish_non_exhaustive()
    }
}

impl Read for RemoteTarReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if !self.current.is_empty() {
                let n = buf.len().min(self.current.len());
                buf[..n].copy_from_slice(&self.current.split_to(n));
                return Ok(n);
            }
            if let Some(outcome) = &self.finished {
                return match outcome {
                    Ok(()) => Ok(0),
                    Err(reason) => Err(io::Error::new(io::ErrorKind::ConnectionAborted, reason.clone())),
                };
            }
            match self.receiver.blocking_recv() {
                Some(Piece::Data(data)) => {
                    self.progress
                        .bytes
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                    self.current = data;
                }
                Some(Piece::End(outcome)) => self.finished = Some(outcome),
                None => {
                    self.finished = Some(Err("the transfer from the node was abandoned".into()));
                }
            }
        }
    }
}

/// Starts the node's tar; returns a blocking reader of its output (read it from a blocking thread).
pub async fn start(
    client: &NodeClient,
    plan: &ExportPlan,
    progress: Arc<Progress>,
) -> Result<RemoteTarReader, SshError> {
    let mut channel = client.open_session().await?;
    channel
        .exec(true, plan.command.as_bytes())
        .await
        .map_err(|error| client.lost(&error))?;
    let (sender, receiver) = tokio::sync::mpsc::channel(32);
    let target = client.target().clone();
    let gnu = plan.tar == NodeTar::Gnu;
    let stall = client.bounds().stall_timeout;
    tokio::spawn(async move {
        let mut stderr = Vec::new();
        let mut exit: Option<u32> = None;
        let mut signal: Option<String> = None;
        // Only the wait for the node counts: time the consumer (the push) takes is not a stall.
        loop {
            let message = match tokio::time::timeout(stall, channel.wait()).await {
                Ok(Some(message)) => message,
                Ok(None) => break,
                Err(_) => {
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), channel.close()).await;
                    let _ = sender.send(Piece::End(Err(stalled(&target, stall)))).await;
                    return;
                }
            };
            match message {
                ChannelMsg::Data { data } => {
                    let delivered = sender.send(Piece::Data(data)).await;
                    if delivered.is_err() {
                        // The consumer gave up: stop the node's tar.
                        let _ = channel.close().await;
                        return;
                    }
                }
                ChannelMsg::ExtendedData { data, .. } if stderr.len() < 16 * 1024 => {
                    stderr.extend_from_slice(&data);
                }
                ChannelMsg::ExitStatus { exit_status } => exit = Some(exit_status),
                ChannelMsg::ExitSignal { signal_name, .. } => signal = Some(format!("{signal_name:?}")),
                ChannelMsg::Failure => {
                    exit = None;
                    stderr.extend_from_slice(b"the node refused to run tar");
                    break;
                }
                _ => {}
            }
        }
        let stderr = String::from_utf8_lossy(&stderr).trim().to_owned();
        let outcome = match (exit, signal) {
            (Some(0), _) => Ok(()),
            // GNU tar: 1 means "some files changed while being read": saved as they were read.
            (Some(1), _) if gnu => {
                tracing::warn!(node = %target, "tar on the node: {stderr}");
                Ok(())
            }
            (Some(code), _) => Err(format!(
                "tar on node {target} failed with exit status {code}: {stderr}"
            )),
            (None, Some(signal)) => Err(format!(
                "tar on node {target} was killed by signal {signal}: {stderr}"
            )),
            (None, None) => Err(format!(
                "the connection to node {target} dropped before the node finished sending its changes \
                 (node rebooted, crashed or unplugged?)"
            )),
        };
        let _ = sender.send(Piece::End(outcome)).await;
    });
    Ok(RemoteTarReader {
        receiver,
        current: Bytes::new(),
        finished: None,
        progress,
    })
}

/// What a transfer that stalled says (pure).
fn stalled(target: &NodeTarget, stall: std::time::Duration) -> String {
    format!(
        "node {target} sent nothing for {} s while sending its changes: the transfer was abandoned (a hung \
         node or a cut network?; the bound is --node-stall-timeout of the operator, --stall-timeout of \
         `walt-operator save`)",
        stall.as_secs_f32()
    )
}

/// What a change set holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangeSummary {
    /// Files, links, devices and directories written (not deletions).
    pub changed: u64,
    /// Deletions (whiteouts).
    pub deleted: u64,
    /// Opaque directories.
    pub opaque_dirs: u64,
    /// Entries left out (exclusions, or unchanged since the node booted).
    pub skipped: u64,
    /// Bytes of file content written.
    pub bytes: u64,
}

/// Compiled exclusion patterns: regular expressions searched in `/PATH`.
#[derive(Debug, Clone)]
pub struct Exclusions(regex::RegexSet);

impl Exclusions {
    /// Compiles `patterns`; the error names the pattern that is not a regular expression.
    pub fn new(patterns: &[String]) -> Result<Self, String> {
        for pattern in patterns {
            regex::Regex::new(pattern).map_err(|error| {
                format!("exclude pattern {pattern:?} is not a regular expression: {error}")
            })?;
        }
        regex::RegexSet::new(patterns)
            .map(Self)
            .map_err(|error| format!("exclude patterns: {error}"))
    }

    /// Whether `path` (relative, without the leading `/`) is excluded.
    pub fn matches(&self, path: &str) -> bool {
        self.0.is_match(&format!("/{path}"))
    }
}

/// Whether `/PATH` matches one of the exclusion patterns (an invalid pattern matches nothing).
pub fn excluded(path: &str, patterns: &[String]) -> bool {
    Exclusions::new(patterns).is_ok_and(|exclusions| exclusions.matches(path))
}

struct PendingDir {
    path: String,
    header: tar::Header,
    pax: Vec<(String, Vec<u8>)>,
}

fn unsafe_entry(target: &NodeTarget, reason: String) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        SshError::UnsafeEntry {
            target: target.clone(),
            reason,
        },
    )
}

/// Normalizes a tar entry name (`./a/b/` → `a/b`), refusing absolute names and `..`.
fn clean_name(raw: &[u8], target: &NodeTarget) -> io::Result<String> {
    let text = std::str::from_utf8(raw)
        .map_err(|_| unsafe_entry(target, format!("entry name {raw:?} is not UTF-8")))?;
    if text.starts_with('/') {
        return Err(unsafe_entry(
            target,
            format!("entry `{text}` has an absolute path"),
        ));
    }
    let mut parts = Vec::new();
    for part in text.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                return Err(unsafe_entry(
                    target,
                    format!("entry `{text}` climbs out with `..`"),
                ));
            }
            other => parts.push(other),
        }
    }
    Ok(parts.join("/"))
}

fn is_ancestor(dir: &str, path: &str) -> bool {
    path.len() > dir.len() && path.starts_with(dir) && path.as_bytes()[dir.len()] == b'/'
}

/// Turns the node's tar of its upper dir into a clean change set, written to `output`:
/// - entries excluded by pattern, or (with a ready time) not changed since then, are left out, but
///   the directories leading to a kept entry are kept (with their own metadata);
/// - unsafe entries (absolute, `..`, hard links out of the change set, unknown types) are refused;
/// - whiteouts stay character devices 0:0 even when the node's tar made later ones hard links to
///   the first (they share an inode);
/// - opaque directories carry `trusted.overlay.opaque=y` (from the node's xattrs, or detected);
///   other `trusted.overlay.*` xattrs are dropped.
pub fn filter_change_set<R: Read, W: Write>(
    input: R,
    output: W,
    plan: &ExportPlan,
    target: &NodeTarget,
    progress: &Progress,
) -> io::Result<ChangeSummary> {
    let limited = crate::overlay::HeaderLimit::new(input);
    let entry_pax = limited.entry_pax();
    let mut archive = tar::Archive::new(limited);
    // busybox and GNU tar end with zero blocks; a stream cut short is caught by the reader's error.
    archive.set_ignore_zeros(false);
    let mut filter = ChangeSetFilter::new(output, plan, target, progress)?;
    for entry in archive.entries()? {
        let mut entry = entry?;
        let pax = entry_pax.take();
        filter.entry(&mut entry, pax.as_deref())?;
    }
    filter.finish()
}

/// What one node tar entry says besides its header: its kept PAX records (xattrs, the opaque
/// flag normalized to [`OPAQUE_XATTR`]) and its ctime.
struct EntryExtras {
    pax: Vec<(String, Vec<u8>)>,
    ctime: Option<i64>,
}

fn entry_extras(pax: Option<&[u8]>) -> io::Result<EntryExtras> {
    let mut extras = EntryExtras {
        pax: Vec::new(),
        ctime: None,
    };
    let Some(data) = pax else {
        return Ok(extras);
    };
    for (key, value) in crate::overlay::pax_records(data)? {
        let Ok(key) = std::str::from_utf8(key) else {
            continue;
        };
        if key == "ctime" {
            extras.ctime = std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.split('.').next())
                .and_then(|v| v.parse().ok());
        } else if let Some(xattr) = key.strip_prefix("SCHILY.xattr.") {
            let overlay = xattr.starts_with("trusted.overlay.") || xattr.starts_with("user.overlay.");
            if xattr.ends_with("overlay.opaque") && value == b"y" {
                extras.pax.push((OPAQUE_XATTR.into(), b"y".to_vec()));
            } else if !overlay {
                extras.pax.push((key.to_owned(), value.to_vec()));
            }
        }
    }
    Ok(extras)
}

/// The change-set writer of [`filter_change_set`]: it owns what it has to remember across
/// entries (directories held back until a kept entry needs them, what was written, the
/// whiteouts and files a later hard link may name, the excluded directories).
struct ChangeSetFilter<'a, W: Write> {
    builder: tar::Builder<W>,
    plan: &'a ExportPlan,
    target: &'a NodeTarget,
    progress: &'a Progress,
    exclusions: Exclusions,
    summary: ChangeSummary,
    /// Unchanged directories, outermost first, written only if a kept entry lies beneath.
    pending: Vec<PendingDir>,
    written: BTreeSet<String>,
    whiteouts: HashSet<String>,
    emitted_files: HashSet<String>,
    excluded_dirs: Vec<String>,
}

/// One entry being filtered: its clean name, header, kept PAX records, and whether it changed
/// since the node was ready.
struct Current {
    name: String,
    header: tar::Header,
    pax: Vec<(String, Vec<u8>)>,
    fresh: bool,
}

impl<'a, W: Write> ChangeSetFilter<'a, W> {
    fn new(
        output: W,
        plan: &'a ExportPlan,
        target: &'a NodeTarget,
        progress: &'a Progress,
    ) -> io::Result<Self> {
        let exclusions = Exclusions::new(&plan.exclude)
            .map_err(|reason| io::Error::new(io::ErrorKind::InvalidInput, reason))?;
        let mut builder = tar::Builder::new(output);
        builder.mode(tar::HeaderMode::Complete);
        Ok(Self {
            builder,
            plan,
            target,
            progress,
            exclusions,
            summary: ChangeSummary::default(),
            pending: Vec::new(),
            written: BTreeSet::new(),
            whiteouts: HashSet::new(),
            emitted_files: HashSet::new(),
            excluded_dirs: Vec::new(),
        })
    }

    fn finish(mut self) -> io::Result<ChangeSummary> {
        self.builder.finish()?;
        Ok(self.summary)
    }

    /// Filters one entry of the node's tar.
    /// `pax` is the entry's raw PAX records ([`crate::overlay::EntryPax`]).
    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>, pax: Option<&[u8]>) -> io::Result<()> {
        let name = clean_name(&entry.path_bytes(), self.target)?;
        if name.is_empty() {
            return Ok(()); // the upper dir itself
        }
        let extras = entry_extras(pax)?;
        let header = entry.header().clone();
        let mtime = header.mtime().unwrap_or(0) as i64;
        let fresh = self
            .plan
            .changed_since
            .is_none_or(|since| mtime >= since || extras.ctime.is_some_and(|c| c >= since));
        // An excluded directory's content goes with it (`/log/` does that by itself; `^/x$` needs this).
        let skip =
            self.exclusions.matches(&name) || self.excluded_dirs.iter().any(|dir| is_ancestor(dir, &name));
        // Directories we leave: they can no longer gain a kept descendant.
        while self
            .pending
            .last()
            .is_some_and(|dir| !is_ancestor(&dir.path, &name))
        {
            self.pending.pop();
        }
        let current = Current {
            name,
            header,
            pax: extras.pax,
            fresh,
        };
        let kind = current.header.entry_type();
        if kind.is_dir() {
            return self.directory(current, skip);
        }
        if skip {
            self.summary.skipped += 1;
            return Ok(());
        }
        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                self.regular(current, entry)?;
            }
            tar::EntryType::Char if is_whiteout_device(&current.header)? => self.whiteout(current)?,
            tar::EntryType::Symlink => self.symlink(current, entry)?,
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => self.special(current)?,
            tar::EntryType::Link => self.hard_link(&current, entry)?,
            other => {
                return Err(unsafe_entry(
                    self.target,
                    format!("entry `{}` has an unsupported type {other:?}", current.name),
                ));
            }
        }
        self.progress.files.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Counts an entry left out (unchanged since the node was ready); true when it is.
    fn left_out(&mut self, current: &Current) -> bool {
        if !current.fresh {
            self.summary.skipped += 1;
        }
        !current.fresh
    }

    fn directory(&mut self, current: Current, skip: bool) -> io::Result<()> {
        let Current {
            name,
            header,
            mut pax,
            fresh,
        } = current;
        let opaque = pax.iter().any(|(k, _)| k == OPAQUE_XATTR) || self.plan.detected_opaque.contains(&name);
        // An opaque flag from before the node was ready is boot-time state: not saved.
        pax.retain(|(k, _)| k != OPAQUE_XATTR);
        if opaque && fresh && !skip {
            pax.push((OPAQUE_XATTR.into(), b"y".to_vec()));
            self.summary.opaque_dirs += 1;
        }
        if skip {
            self.summary.skipped += 1;
            self.excluded_dirs.push(name);
            return Ok(());
        }
        if fresh {
            self.flush_pending()?;
            write_entry(&mut self.builder, &header, &name, &pax, io::empty())?;
            self.written.insert(name);
            self.summary.changed += 1;
            self.progress.files.fetch_add(1, Ordering::Relaxed);
        } else {
            self.pending.push(PendingDir {
                path: name,
                header,
                pax,
            });
            self.summary.skipped += 1;
        }
        Ok(())
    }

    fn regular<R: Read>(&mut self, current: Current, content: &mut tar::Entry<'_, R>) -> io::Result<()> {
        if self.left_out(&current) {
            return Ok(());
        }
        self.flush_pending()?;
        self.summary.bytes += current.header.size().unwrap_or(0);
        let mut clean = current.header.clone();
        clean.set_entry_type(tar::EntryType::Regular);
        write_entry(&mut self.builder, &clean, &current.name, &current.pax, content)?;
        self.emitted_files.insert(current.name.clone());
        self.written.insert(current.name);
        self.summary.changed += 1;
        Ok(())
    }

    fn whiteout(&mut self, current: Current) -> io::Result<()> {
        self.whiteouts.insert(current.name.clone());
        if self.left_out(&current) {
            return Ok(());
        }
        self.flush_pending()?;
        write_entry(
            &mut self.builder,
            &current.header,
            &current.name,
            &[],
            io::empty(),
        )?;
        self.written.insert(current.name);
        self.summary.deleted += 1;
        Ok(())
    }

    fn symlink<R: Read>(&mut self, current: Current, entry: &tar::Entry<'_, R>) -> io::Result<()> {
        if self.left_out(&current) {
            return Ok(());
        }
        self.flush_pending()?;
        let name = &current.name;
        let link = entry
            .link_name_bytes()
            .ok_or_else(|| unsafe_entry(self.target, format!("symlink `{name}` has no target")))?
            .into_owned();
        let link = std::str::from_utf8(&link)
            .map_err(|_| unsafe_entry(self.target, format!("symlink `{name}` has a non-UTF-8 target")))?;
        let mut clean = current.header.clone();
        clean.set_size(0);
        for (key, value) in &current.pax {
            self.builder
                .append_pax_extensions([(key.as_str(), value.as_slice())])?;
        }
        self.builder
            .append_link(&mut clean, name, std::path::Path::new(link))?;
        self.written.insert(current.name);
        self.summary.changed += 1;
        Ok(())
    }

    /// Devices (other than whiteouts) and FIFOs.
    fn special(&mut self, current: Current) -> io::Result<()> {
        if self.left_out(&current) {
            return Ok(());
        }
        self.flush_pending()?;
        write_entry(
            &mut self.builder,
            &current.header,
            &current.name,
            &current.pax,
            io::empty(),
        )?;
        self.written.insert(current.name);
        self.summary.changed += 1;
        Ok(())
    }

    fn hard_link<R: Read>(&mut self, current: &Current, entry: &tar::Entry<'_, R>) -> io::Result<()> {
        let name = current.name.clone();
        let link = entry
            .link_name_bytes()
            .ok_or_else(|| unsafe_entry(self.target, format!("hard link `{name}` has no target")))?
            .into_owned();
        let link = clean_name(&link, self.target)?;
        if self.whiteouts.contains(&link) {
            // Whiteouts share one inode: the node's tar made this one a link. It is a deletion of
            // its own.
            if self.left_out(current) {
                return Ok(());
            }
            self.flush_pending()?;
            write_entry(
                &mut self.builder,
                &whiteout_like(&current.header)?,
                &name,
                &[],
                io::empty(),
            )?;
            self.written.insert(name);
            self.summary.deleted += 1;
        } else if self.emitted_files.contains(&link) {
            self.flush_pending()?;
            let mut clean = current.header.clone();
            clean.set_size(0);
            self.builder.append_link(&mut clean, &name, &link)?;
            self.written.insert(name);
            self.summary.changed += 1;
        } else if self.written.contains(&link) || !current.fresh {
            self.summary.skipped += 1;
        } else {
            tracing::warn!(node = %self.target, entry = %name, target = %link, "hard link to an entry left out of the change set: not saved");
            self.summary.skipped += 1;
        }
        Ok(())
    }

    /// Writes the held-back directories a kept entry needs (its ancestors).
    fn flush_pending(&mut self) -> io::Result<()> {
        for dir in self.pending.drain(..) {
            write_entry(&mut self.builder, &dir.header, &dir.path, &dir.pax, io::empty())?;
            self.written.insert(dir.path);
            self.summary.skipped = self.summary.skipped.saturating_sub(1);
            self.summary.changed += 1;
            self.progress.files.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// Whether a character device header is an overlay whiteout (0:0).
fn is_whiteout_device(header: &tar::Header) -> io::Result<bool> {
    Ok(header.device_major()?.unwrap_or(1) == 0 && header.device_minor()?.unwrap_or(1) == 0)
}

/// A whiteout (char device 0:0) header with the owner and time of `header`.
fn whiteout_like(header: &tar::Header) -> io::Result<tar::Header> {
    let mut device = tar::Header::new_gnu();
    device.set_entry_type(tar::EntryType::Char);
    device.set_mode(0o644);
    device.set_size(0);
    device.set_device_major(0)?;
    device.set_device_minor(0)?;
    device.set_mtime(header.mtime().unwrap_or(0));
    // A fresh header has empty owner fields, which no tar reader accepts.
    device.set_uid(header.uid().unwrap_or(0));
    device.set_gid(header.gid().unwrap_or(0));
    Ok(device)
}

fn write_entry<W: Write, R: Read>(
    builder: &mut tar::Builder<W>,
    header: &tar::Header,
    name: &str,
    pax: &[(String, Vec<u8>)],
    data: R,
) -> io::Result<()> {
    if !pax.is_empty() {
        builder.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))?;
    }
    let mut header = header.clone();
    if !matches!(header.entry_type(), tar::EntryType::Regular) {
        header.set_size(0);
    }
    builder.append_data(&mut header, name, data)
}

/// The size of the chunks handed from [`filter_change_set`] to the layer engine.
const PIPE_CHUNK: usize = 256 * 1024;

enum PipePiece {
    Data(Vec<u8>),
    End(Result<(), String>),
}

/// The writing end of a [`change_set_pipe`]: a [`filter_change_set`] output.
pub struct ChangeSetWriter {
    sender: std::sync::mpsc::SyncSender<PipePiece>,
    buffer: Vec<u8>,
}

/// The reading end of a [`change_set_pipe`]: a tar stream for the layer engine. Like
/// [`RemoteTarReader`], it ends with an error (never a clean end of file) unless the writer called
/// [`ChangeSetWriter::finish`] with success, so a cut change set can never become a layer.
pub struct ChangeSetReader {
    receiver: std::sync::mpsc::Receiver<PipePiece>,
    current: Vec<u8>,
    position: usize,
    finished: Option<Result<(), String>>,
}

impl std::fmt::Debug for ChangeSetWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangeSetWriter").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for ChangeSetReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangeSetReader").finish_non_exhaustive()
    }
}

/// An in-process pipe between [`filter_change_set`] (on one blocking thread) and the layer engine
/// (reading on another): bounded (a few chunks in flight), one pass, no temporary file, and the
/// writer's failure reaches the reader as an error (an OS pipe would turn it into a clean end of file).
pub fn change_set_pipe() -> (ChangeSetWriter, ChangeSetReader) {
    let (sender, receiver) = std::sync::mpsc::sync_channel(4);
    (
        ChangeSetWriter {
            sender,
            buffer: Vec::with_capacity(PIPE_CHUNK),
        },
        ChangeSetReader {
            receiver,
            current: Vec::new(),
            position: 0,
            finished: None,
        },
    )
}

fn pipe_closed() -> io::Error {
    io::Error::new(
        io::ErrorKind::BrokenPipe,
        "the layer engine stopped reading the change set",
    )
}

impl ChangeSetWriter {
    fn send_buffer(&mut self) -> io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buffer, Vec::with_capacity(PIPE_CHUNK));
        self.sender
            .send(PipePiece::Data(chunk))
            .map_err(|_| pipe_closed())
    }

    /// Ends the stream: with `Ok`, the reader sees a clean end of file; with `Err`, it sees the error.
    pub fn finish(mut self, outcome: Result<(), String>) -> io::Result<()> {
        if outcome.is_ok() {
            self.send_buffer()?;
        }
        self.sender
            .send(PipePiece::End(outcome))
            .map_err(|_| pipe_closed())
    }
}

impl Write for ChangeSetWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = PIPE_CHUNK - self.buffer.len();
        let n = data.len().min(room);
        self.buffer.extend_from_slice(&data[..n]);
        if self.buffer.len() == PIPE_CHUNK {
            self.send_buffer()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_buffer()
    }
}

impl Read for ChangeSetReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.position < self.current.len() {
                let n = buf.len().min(self.current.len() - self.position);
                buf[..n].copy_from_slice(&self.current[self.position..self.position + n]);
                self.position += n;
                return Ok(n);
            }
            if let Some(outcome) = &self.finished {
                return match outcome {
                    Ok(()) => Ok(0),
                    Err(reason) => Err(io::Error::new(io::ErrorKind::ConnectionAborted, reason.clone())),
                };
            }
            match self.receiver.recv() {
                Ok(PipePiece::Data(data)) => {
                    self.current = data;
                    self.position = 0;
                }
                Ok(PipePiece::End(outcome)) => self.finished = Some(outcome),
                Err(_) => {
                    self.finished = Some(Err("the change set ended before it was complete".into()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walt_exclusions_match_like_walt() {
        let patterns: Vec<String> = WALT_EXCLUDES.iter().map(|&p| p.into()).collect();
        assert!(excluded("var/log/syslog", &patterns));
        assert!(!excluded("var/log", &patterns));
        assert!(excluded("run/x.lock", &patterns));
        assert!(!excluded("run/x.locked", &patterns));
        assert!(excluded("etc/machine-id", &patterns));
        assert!(!excluded("etc/hostname", &patterns));
        assert!(excluded("etc/x", &["^/etc/".into()]));
        assert!(!excluded("usr/etc/x", &["^/etc/".into()]));
        // The API's defaults are written as regular expressions (escaped dots).
        let api: Vec<String> = walt_crds::node_save::DEFAULT_EXCLUDES
            .iter()
            .map(|&p| p.into())
            .collect();
        assert!(excluded("run/x.lock", &api));
        assert!(!excluded("run/x.locked", &api));
        assert!(excluded("etc/README.nonlocal", &api));
        assert!(!excluded("etc/READMEXnonlocal", &api));
        assert!(excluded("var/log/syslog", &api));
        assert!(Exclusions::new(&["(".into()]).unwrap_err().contains("\"(\""));
    }

    /// Overlay shares one whiteout inode between deletions, so the node's tar makes the second
    /// deletion a hard link to the first: it must come out as a whiteout of its own that a tar reader
    /// (our layer writer) accepts.
    #[test]
    fn linked_whiteouts_become_whiteouts_of_their_own() {
        let mut node_tar = tar::Builder::new(Vec::new());
        let mut root = tar::Header::new_ustar();
        root.set_entry_type(tar::EntryType::Directory);
        root.set_mode(0o755);
        root.set_uid(0);
        root.set_gid(0);
        root.set_size(0);
        node_tar.append_data(&mut root, "./", io::empty()).unwrap();
        let mut etc = root.clone();
        node_tar.append_data(&mut etc, "./etc/", io::empty()).unwrap();
        let mut whiteout = tar::Header::new_ustar();
        whiteout.set_entry_type(tar::EntryType::Char);
        whiteout.set_mode(0o600);
        whiteout.set_uid(0);
        whiteout.set_gid(0);
        whiteout.set_size(0);
        whiteout.set_device_major(0).unwrap();
        whiteout.set_device_minor(0).unwrap();
        node_tar
            .append_data(&mut whiteout, "./etc/motd", io::empty())
            .unwrap();
        let mut link = tar::Header::new_ustar();
        link.set_entry_type(tar::EntryType::Link);
        link.set_mode(0o600);
        link.set_uid(0);
        link.set_gid(0);
        link.set_size(0);
        node_tar
            .append_link(&mut link, "./etc/hostname", "./etc/motd")
            .unwrap();
        let node_tar = node_tar.into_inner().unwrap();
        let plan = ExportPlan {
            tar: NodeTar::Busybox,
            changed_since: None,
            detected_opaque: HashSet::new(),
            command: String::new(),
            exclude: Vec::new(),
        };
        let target: NodeTarget = "root@n".parse().unwrap();
        let mut change_set = Vec::new();
        let summary = filter_change_set(
            node_tar.as_slice(),
            &mut change_set,
            &plan,
            &target,
            &Progress::default(),
        )
        .unwrap();
        assert_eq!(summary.deleted, 2);
        let mut archive = tar::Archive::new(change_set.as_slice());
        let mut whiteouts = Vec::new();
        for entry in archive.entries().unwrap() {
            let entry = entry.unwrap();
            let header = entry.header();
            if header.entry_type() == tar::EntryType::Char {
                whiteouts.push((
                    entry.path().unwrap().display().to_string(),
                    header.uid().unwrap(),
                    header.gid().unwrap(),
                    header.device_major().unwrap(),
                ));
            }
        }
        assert_eq!(
            whiteouts,
            [
                ("etc/motd".to_owned(), 0, 0, Some(0)),
                ("etc/hostname".to_owned(), 0, 0, Some(0))
            ]
        );
    }

    #[test]
    fn names_are_cleaned_and_unsafe_ones_refused() {
        let target: NodeTarget = "root@n".parse().unwrap();
        assert_eq!(clean_name(b"./etc/passwd", &target).unwrap(), "etc/passwd");
        assert_eq!(clean_name(b"./", &target).unwrap(), "");
        assert!(clean_name(b"/etc/passwd", &target).is_err());
        assert!(clean_name(b"./a/../../b", &target).is_err());
    }
}
