//! Squashing an image into one layer (what `walt image squash` does), from the registry to the registry:
//! the layers' tar headers are read once to decide which entries survive (an entry survives unless a
//! layer above replaces it, deletes it with a whiteout, or hides it under an opaque directory or a
//! non-directory), then the survivors are streamed bottom layer first into one new layer. Nothing is
//! unpacked on disk (the operator needs no root for it) and memory holds only the paths.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::json;

use super::Error;
use super::image::{CommitOptions, PushedImage, ResolvedImage, decompressor};
use super::registry::RegistryClient;

/// What one tar entry means for the layers below it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    /// A directory: lower content under it stays visible.
    Directory,
    /// A file, link or device: it replaces the path and hides anything below it.
    Other,
    /// A hard link to another path of the same layer.
    HardLink(Vec<u8>),
    /// `.wh.NAME`: deletes `NAME` (the path given) and everything under it in lower layers.
    Whiteout,
    /// `.wh..wh..opq`: hides the lower content of the directory (the path given).
    Opaque,
}

/// One entry of a layer, as read from its header.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    path: Vec<u8>,
    kind: Kind,
}

/// `./a/b/`, `/a/b` and `a/b` are the same path `a/b` (pure).
fn normalize(path: &[u8]) -> Vec<u8> {
    let mut path = path;
    while let Some(rest) = path.strip_prefix(b"./").or_else(|| path.strip_prefix(b"/")) {
        path = rest;
    }
    let path = path.strip_suffix(b"/").unwrap_or(path);
    if path == b"." { Vec::new() } else { path.to_vec() }
}

/// The meaning of an entry (pure): whiteouts and opaque markers name the path they act on.
fn classify(raw_path: &[u8], entry_type: tar::EntryType, link: Option<&[u8]>) -> Seen {
    let path = normalize(raw_path);
    let (dir, name) = match path.iter().rposition(|&b| b == b'/') {
        Some(at) => (path[..at].to_vec(), path[at + 1..].to_vec()),
        None => (Vec::new(), path.clone()),
    };
    if name == b".wh..wh..opq" {
        return Seen {
            path: dir,
            kind: Kind::Opaque,
        };
    }
    if let Some(deleted) = name.strip_prefix(b".wh.") {
        let mut target = dir;
        if !target.is_empty() {
            target.push(b'/');
        }
        target.extend_from_slice(deleted);
        return Seen {
            path: target,
            kind: Kind::Whiteout,
        };
    }
    let kind = if entry_type.is_dir() {
        Kind::Directory
    } else if entry_type.is_hard_link() {
        Kind::HardLink(link.map(normalize).unwrap_or_default())
    } else {
        Kind::Other
    };
    Seen { path, kind }
}

/// The proper ancestors of `path` (`a`, `a/b` for `a/b/c`).
fn ancestors(path: &[u8]) -> impl Iterator<Item = &[u8]> {
    path.iter()
        .enumerate()
        .filter(|&(_, &b)| b == b'/')
        .map(move |(at, _)| &path[..at])
}

/// Which entries survive the squash (pure). `layers` are bottom first, each the entries in tar order;
/// the answer has the same shape. Fails when a surviving hard link points to a path that does not
/// survive in its layer (the squashed layer could not hold it).
fn survivors(layers: &[Vec<Seen>]) -> Result<Vec<Vec<bool>>, String> {
    let mut keep: Vec<Vec<bool>> = layers.iter().map(|entries| vec![false; entries.len()]).collect();
    // Paths a layer above already decided, and trees whose lower content a layer above hides.
    let mut claimed: HashSet<Vec<u8>> = HashSet::new();
    let mut hidden: HashSet<Vec<u8>> = HashSet::new();
    for (layer, entries) in layers.iter().enumerate().rev() {
        // The last entry that shows a path wins within a layer (markers name a path without showing it).
        let mut last_at: HashMap<&[u8], usize> = HashMap::new();
        for (at, entry) in entries.iter().enumerate() {
            if matches!(entry.kind, Kind::Directory | Kind::Other | Kind::HardLink(_)) {
                last_at.insert(&entry.path, at);
            }
        }
        let visible = |path: &[u8]| {
            !claimed.contains(path) && !hidden.contains(path) && !ancestors(path).any(|a| hidden.contains(a))
        };
        for (at, entry) in entries.iter().enumerate() {
            let is_last = last_at.get(entry.path.as_slice()) == Some(&at);
            let shows = matches!(entry.kind, Kind::Directory | Kind::Other | Kind::HardLink(_));
            keep[layer][at] = shows && is_last && !entry.path.is_empty() && visible(&entry.path);
        }
        for (at, entry) in entries.iter().enumerate() {
            if let Kind::HardLink(target) = &entry.kind
                && keep[layer][at]
            {
                let target_kept = last_at
                    .get(target.as_slice())
                    .is_some_and(|&target_at| keep[layer][target_at]);
                if !target_kept {
                    return Err(format!(
                        "/{} is a hard link to /{}, which a layer above replaced or deleted",
                        String::from_utf8_lossy(&entry.path),
                        String::from_utf8_lossy(target)
                    ));
                }
            }
        }
        for entry in entries {
            match entry.kind {
                Kind::Directory => {
                    claimed.insert(entry.path.clone());
                }
                Kind::Other | Kind::HardLink(_) | Kind::Whiteout => {
                    claimed.insert(entry.path.clone());
                    hidden.insert(entry.path.clone());
                }
                Kind::Opaque => {
                    hidden.insert(entry.path.clone());
                }
            }
        }
    }
    Ok(keep)
}

/// Reads the headers of one layer's tar.
fn read_headers(tar: impl Read) -> std::io::Result<Vec<Seen>> {
    let mut archive = tar::Archive::new(crate::overlay::HeaderLimit::new(tar));
    let mut seen = Vec::new();
    for entry in archive.entries()? {
        let entry = entry?;
        let link = entry.link_name_bytes().map(std::borrow::Cow::into_owned);
        seen.push(classify(
            &entry.path_bytes(),
            entry.header().entry_type(),
            link.as_deref(),
        ));
    }
    Ok(seen)
}

/// Copies the surviving entries of one layer's tar to `out` (headers, extended attributes, content).
fn copy_survivors<W: Write>(tar: impl Read, keep: &[bool], out: &mut tar::Builder<W>) -> std::io::Result<()> {
    let limited = crate::overlay::HeaderLimit::new(tar);
    let entry_pax = limited.entry_pax();
    let mut archive = tar::Archive::new(limited);
    for (at, entry) in archive.entries()?.enumerate() {
        let mut entry = entry?;
        let pax = entry_pax.take();
        if !keep.get(at).copied().unwrap_or(false) {
            continue;
        }
        let path = normalize(&entry.path_bytes());
        let path = String::from_utf8_lossy(&path).into_owned();
        let mut xattrs = Vec::new();
        for (key, value) in crate::overlay::pax_records(pax.as_deref().unwrap_or_default())? {
            if key.starts_with(b"SCHILY.xattr.") {
                xattrs.push((String::from_utf8_lossy(key).into_owned(), value.to_vec()));
            }
        }
        if !xattrs.is_empty() {
            out.append_pax_extensions(xattrs.iter().map(|(key, value)| (key.as_str(), value.as_slice())))?;
        }
        let mut header = entry.header().clone();
        match header.entry_type() {
            tar::EntryType::Link | tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .map(std::borrow::Cow::into_owned)
                    .unwrap_or_default();
                let target = String::from_utf8_lossy(&target).into_owned();
                let target = if header.entry_type().is_hard_link() {
                    String::from_utf8_lossy(&normalize(target.as_bytes())).into_owned()
                } else {
                    target
                };
                header.set_size(0);
                out.append_link(&mut header, &path, &target)?;
            }
            tar::EntryType::GNUSparse => {
                // Stored dense: the content is the same.
                let mut dense = tar::Header::new_gnu();
                dense.set_mode(header.mode()?);
                dense.set_uid(header.uid()?);
                dense.set_gid(header.gid()?);
                dense.set_mtime(header.mtime()?);
                dense.set_entry_type(tar::EntryType::Regular);
                dense.set_size(entry.size());
                out.append_data(&mut dense, &path, &mut entry)?;
            }
            _ => out.append_data(&mut header, &path, &mut entry)?,
        }
    }
    Ok(())
}

/// Squashes layer tars given in memory (uncompressed, bottom first) into one layer tar written to `out`
/// (pure: what [`RegistryClient::squash`] does between the registry reads and the push). Fails on a
/// malformed tar or a hard link a layer above broke.
pub fn squash_tars<W: Write>(layers: &[&[u8]], out: W) -> Result<W, String> {
    let seen = layers
        .iter()
        .map(|tar| read_headers(*tar).map_err(|e| format!("reading a layer's tar: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let keep = survivors(&seen)?;
    let mut builder = tar::Builder::new(out);
    for (tar, keep) in layers.iter().zip(keep) {
        copy_survivors(*tar, &keep, &mut builder).map_err(|e| format!("writing the squashed layer: {e}"))?;
    }
    builder
        .into_inner()
        .map_err(|e| format!("finishing the squashed layer: {e}"))
}

/// The read end of the squashed stream: its end is an error unless the writer finished, so a writer
/// that failed half way can never turn into a short, valid-looking layer.
struct GuardedReader {
    inner: std::io::PipeReader,
    finished: Arc<AtomicBool>,
}

impl Read for GuardedReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() && !self.finished.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("the squashed layer stream was cut short"));
        }
        Ok(n)
    }
}

/// The image `image` with no layers (the base the squashed layer goes on).
fn without_layers(image: &ResolvedImage) -> ResolvedImage {
    let mut config = image.config.clone();
    config["rootfs"] = json!({"type": "layers", "diff_ids": []});
    config["history"] = json!([]);
    ResolvedImage {
        layers: Vec::new(),
        diff_ids: Vec::new(),
        size: 0,
        config,
        ..image.clone()
    }
}

impl RegistryClient {
    /// Squashes `image` into a one-layer image pushed to `target_repository` (`registry/repo`) **by
    /// digest** (move a tag with [`RegistryClient::tag`]). Same config (labels, entrypoint…), one history
    /// entry (`options.created_by`). Refuses an image whose hard links a later layer broke.
    pub async fn squash(
        &self,
        image: &ResolvedImage,
        target_repository: &str,
        options: CommitOptions,
    ) -> Result<PushedImage, Error> {
        let shown = image.pinned_reference();
        let mut layers = Vec::with_capacity(image.layers.len());
        for layer in &image.layers {
            let media_type = layer.media_type.clone();
            let what = shown.clone();
            layers.push(
                self.with_blob(image, layer, move |blob| {
                    let reader = open_layer(&what, &media_type, blob)?;
                    read_headers(reader)
                        .map_err(|e| Error::Internal(format!("{what}: reading a layer's tar: {e}")))
                })
                .await?,
            );
        }
        let keep = survivors(&layers).map_err(|reason| Error::Invalid {
            reference: shown.clone(),
            what: "layers".into(),
            reason: format!("cannot squash: {reason}"),
        })?;
        drop(layers);
        let (reader, writer) =
            std::io::pipe().map_err(|e| Error::Internal(format!("creating the squash pipe: {e}")))?;
        let finished = Arc::new(AtomicBool::new(false));
        let stream = GuardedReader {
            inner: reader,
            finished: finished.clone(),
        };
        let base = without_layers(image);
        let push = self.push_on_top(
            &base,
            target_repository,
            super::ChangeSource::TarStream(Box::new(stream)),
            options,
        );
        let write = async {
            let mut builder = Some(tar::Builder::new(writer));
            for (layer, keep) in image.layers.iter().zip(keep) {
                let media_type = layer.media_type.clone();
                let what = shown.clone();
                let mut out = builder
                    .take()
                    .ok_or_else(|| Error::Internal("squash writer lost".into()))?;
                builder = Some(
                    self.with_blob(image, layer, move |blob| {
                        let reader = open_layer(&what, &media_type, blob)?;
                        copy_survivors(reader, &keep, &mut out).map_err(|e| {
                            Error::Internal(format!("{what}: writing the squashed layer: {e}"))
                        })?;
                        Ok(out)
                    })
                    .await?,
                );
            }
            let out = builder
                .take()
                .ok_or_else(|| Error::Internal("squash writer lost".into()))?;
            let writer = out
                .into_inner()
                .map_err(|e| Error::Internal(format!("finishing the squashed layer: {e}")))?;
            finished.store(true, Ordering::SeqCst);
            drop(writer);
            Ok::<(), Error>(())
        };
        let (pushed, written) = tokio::join!(push, write);
        // A writer failure is the cause; the push then failed on the cut stream.
        written?;
        pushed
    }
}

/// The decompressed tar of a layer blob.
fn open_layer<'r>(
    shown: &str,
    media_type: &str,
    blob: &'r mut (dyn Read + Send),
) -> Result<Box<dyn Read + Send + 'r>, Error> {
    decompressor(media_type, Box::new(blob))
        .ok_or_else(|| Error::UnsupportedMediaType {
            reference: shown.to_owned(),
            what: "layer".into(),
            media_type: media_type.to_owned(),
        })?
        .map_err(|e| Error::Internal(format!("{shown}: opening a layer: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(path: &str) -> Seen {
        classify(path.as_bytes(), tar::EntryType::Directory, None)
    }
    fn file(path: &str) -> Seen {
        classify(path.as_bytes(), tar::EntryType::Regular, None)
    }
    fn link(path: &str, target: &str) -> Seen {
        classify(path.as_bytes(), tar::EntryType::Link, Some(target.as_bytes()))
    }

    fn kept(layers: &[Vec<Seen>]) -> Vec<Vec<String>> {
        let keep = survivors(layers).expect("squashable");
        layers
            .iter()
            .zip(keep)
            .map(|(entries, keep)| {
                entries
                    .iter()
                    .zip(keep)
                    .filter(|(_, k)| *k)
                    .map(|(e, _)| String::from_utf8_lossy(&e.path).into_owned())
                    .collect()
            })
            .collect()
    }

    #[test]
    fn paths_are_normalized_and_markers_name_their_target() {
        assert_eq!(dir("./etc/").path, b"etc");
        assert_eq!(file("/etc/motd").path, b"etc/motd");
        let whiteout = file("etc/.wh.motd");
        assert_eq!(
            (whiteout.path.as_slice(), whiteout.kind),
            (&b"etc/motd"[..], Kind::Whiteout)
        );
        let opaque = file("./opt/.wh..wh..opq");
        assert_eq!((opaque.path.as_slice(), opaque.kind), (&b"opt"[..], Kind::Opaque));
        assert_eq!(file(".wh.top").path, b"top");
    }

    #[test]
    fn upper_entries_replace_whiteouts_delete_and_opaque_dirs_hide() {
        let bottom = vec![
            dir("etc"),
            file("etc/motd"),
            file("etc/hostname"),
            dir("opt"),
            file("opt/old"),
            dir("var"),
            file("var/log"),
            dir("usr"),
            file("usr/keep"),
        ];
        let top = vec![
            file("etc/.wh.motd"),
            file("etc/hostname"),
            dir("opt"),
            file("opt/.wh..wh..opq"),
            file("opt/new"),
            file("var"), // a directory replaced by a file hides what was under it
        ];
        assert_eq!(
            kept(&[bottom, top]),
            vec![
                vec!["etc", "usr", "usr/keep"],
                vec!["etc/hostname", "opt", "opt/new", "var"]
            ]
        );
    }

    #[test]
    fn a_deleted_then_recreated_directory_keeps_only_the_new_content() {
        let bottom = vec![dir("data"), file("data/a"), file("data/b")];
        let middle = vec![file(".wh.data")];
        let top = vec![dir("data"), file("data/c")];
        assert_eq!(
            kept(&[bottom, middle, top]),
            vec![vec![], vec![], vec!["data", "data/c"]]
        );
    }

    #[test]
    fn within_one_layer_the_last_entry_of_a_path_wins() {
        let only = vec![file("a"), file("a")];
        let keep = survivors(&[only]).expect("squashable");
        assert_eq!(keep, vec![vec![false, true]]);
    }

    #[test]
    fn hard_links_survive_with_their_target_and_are_refused_without_it() {
        let bottom = vec![file("bin/busybox"), link("bin/sh", "bin/busybox")];
        assert_eq!(
            kept(std::slice::from_ref(&bottom)),
            vec![vec!["bin/busybox", "bin/sh"]]
        );
        let top = vec![file("bin/busybox")];
        let error = survivors(&[bottom, top]).expect_err("a broken hard link");
        assert!(
            error.contains("/bin/sh is a hard link to /bin/busybox"),
            "{error}"
        );
    }

    #[test]
    fn squash_tars_merges_in_memory_layers() {
        let layer = |entries: &[(&str, &[u8])]| {
            let mut builder = tar::Builder::new(Vec::new());
            for (path, data) in entries {
                let mut header = tar::Header::new_gnu();
                header.set_mode(0o644);
                header.set_size(data.len() as u64);
                builder.append_data(&mut header, path, *data).expect("entry");
            }
            builder.into_inner().expect("tar")
        };
        let lower = layer(&[("a", b"old"), ("b", b"b")]);
        let upper = layer(&[("a", b"new"), (".wh.b", b"")]);
        let squashed = squash_tars(&[&lower, &upper], Vec::new()).expect("squash");
        let mut archive = tar::Archive::new(squashed.as_slice());
        let mut seen = Vec::new();
        for entry in archive.entries().expect("entries") {
            let mut entry = entry.expect("entry");
            let mut content = String::new();
            entry.read_to_string(&mut content).expect("content");
            seen.push(format!("{}={content}", entry.path().expect("path").display()));
        }
        assert_eq!(seen, ["a=new"]);
        assert!(squash_tars(&[b"not a tar at all".as_slice()], Vec::new()).is_err());
    }

    #[test]
    fn copied_survivors_keep_content_modes_links_and_xattrs() {
        let mut source = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Directory);
        header.set_mode(0o755);
        header.set_size(0);
        source
            .append_data(&mut header, "./etc/", std::io::empty())
            .expect("dir");
        source
            .append_pax_extensions([("SCHILY.xattr.user.note", &b"kept"[..])])
            .expect("pax");
        let mut header = tar::Header::new_gnu();
        header.set_mode(0o640);
        header.set_size(5);
        source
            .append_data(&mut header, "./etc/conf", &b"hello"[..])
            .expect("file");
        let mut header = tar::Header::new_gnu();
        header.set_mode(0o644);
        header.set_size(3);
        source
            .append_data(&mut header, "./etc/gone", &b"bye"[..])
            .expect("file");
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Link);
        header.set_mode(0o644);
        header.set_size(0);
        source
            .append_link(&mut header, "./etc/conf2", "./etc/conf")
            .expect("link");
        let tar = source.into_inner().expect("tar");

        let mut out = tar::Builder::new(Vec::new());
        copy_survivors(tar.as_slice(), &[true, true, false, true], &mut out).expect("copy");
        let squashed = out.into_inner().expect("tar");
        let mut archive = tar::Archive::new(squashed.as_slice());
        let mut seen = Vec::new();
        for entry in archive.entries().expect("entries") {
            let mut entry = entry.expect("entry");
            let path = entry.path().expect("path").display().to_string();
            let mode = entry.header().mode().expect("mode");
            let xattr = entry
                .pax_extensions()
                .expect("pax")
                .and_then(|mut e| e.next())
                .map(|e| e.expect("pax").value().expect("utf-8").to_owned());
            let link = entry.link_name().expect("link").map(|l| l.display().to_string());
            let mut content = String::new();
            entry.read_to_string(&mut content).expect("content");
            seen.push((path, mode, xattr, link, content));
        }
        assert_eq!(
            seen,
            vec![
                ("etc".into(), 0o755, None, None, String::new()),
                (
                    "etc/conf".into(),
                    0o640,
                    Some("kept".into()),
                    None,
                    "hello".into()
                ),
                (
                    "etc/conf2".into(),
                    0o644,
                    None,
                    Some("etc/conf".into()),
                    String::new()
                ),
            ]
        );
    }
}
