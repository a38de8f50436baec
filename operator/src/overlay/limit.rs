//! Bounded memory for a tar stream's extension headers.
//!
//! The `tar` crate reads a GNU long name (`L`), long link name (`K`) or PAX extended header (`x`) whole
//! into memory, however large its header says it is: a compressed layer of a few MB can claim a long name
//! of many GB of zeros and exhaust the unpacker's memory. [`HeaderLimit`] watches the stream as the `tar`
//! crate reads it, following the same block layout (header, GNU sparse extension blocks, data rounded up to
//! 512 bytes, a PAX `size` overriding the next entry's), and fails the read of any such header claiming
//! more than [`MAX_EXTENSION_SIZE`] before its data is read.

use std::io::Read;
use std::sync::{Arc, Mutex, PoisonError};

/// The PAX records of the entry the `tar` crate has just handed out (see [`HeaderLimit::entry_pax`]).
#[derive(Clone, Debug, Default)]
pub struct EntryPax(Arc<Mutex<Option<Vec<u8>>>>);

impl EntryPax {
    /// The current entry's PAX extended header data, raw (`None` when it has none).
    pub fn take(&self) -> Option<Vec<u8>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }

    fn set(&self, data: Option<Vec<u8>>) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = data;
    }
}

/// The records of PAX extended header data, `LEN KEY=VALUE\n` each, read by their length: a value may
/// hold any byte, newlines included (binary xattrs such as `trusted.overlay.origin` or
/// `security.capability` do). The `tar` crate's own reader splits records at newlines and refuses
/// such a value as "malformed pax extension".
///
/// # Errors
/// A record whose length is not a number, runs past the data, or lacks its `=` or final newline.
pub fn pax_records(mut data: &[u8]) -> std::io::Result<Vec<(&[u8], &[u8])>> {
    let malformed = |why: &str| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("malformed PAX record: {why}"),
        )
    };
    let mut records = Vec::new();
    while !data.is_empty() {
        if data.iter().all(|b| *b == 0) {
            break; // padding some writers leave after the last record
        }
        let space = data
            .iter()
            .position(|b| *b == b' ')
            .ok_or_else(|| malformed("no length"))?;
        let length: usize = std::str::from_utf8(&data[..space])
            .ok()
            .and_then(|text| text.parse().ok())
            .ok_or_else(|| malformed("its length is not a number"))?;
        if length <= space + 1 || length > data.len() || data[length - 1] != b'\n' {
            return Err(malformed("its length does not end at a newline"));
        }
        let record = &data[space + 1..length - 1];
        let equals = record
            .iter()
            .position(|b| *b == b'=')
            .ok_or_else(|| malformed("no `=`"))?;
        records.push((&record[..equals], &record[equals + 1..]));
        data = &data[length..];
    }
    Ok(records)
}

/// The largest GNU long name / long link / PAX extended header accepted: 1 MiB, as Go's `archive/tar`
/// (containerd, Docker) does.
pub const MAX_EXTENSION_SIZE: u64 = 1 << 20;

const BLOCK: usize = 512;

/// Where the stream is in the tar block layout.
#[derive(Debug)]
enum State {
    /// Collecting a 512-byte header.
    Header,
    /// Collecting a GNU sparse extension block (after a sparse header whose `isextended` is set).
    SparseExtension,
    /// Inside an entry's data and padding: `remaining` bytes, of which PAX data is kept when `pax`.
    Data { remaining: u64, pax: bool },
    /// End of archive (a zero block, as the `tar` crate stops there) or a header the `tar` crate will
    /// refuse by itself: nothing more is checked.
    Done,
}

/// A reader that passes a tar stream through unchanged and fails (`InvalidData`) on a GNU long name, long
/// link name or PAX extended header larger than [`MAX_EXTENSION_SIZE`].
#[derive(Debug)]
pub struct HeaderLimit<R> {
    inner: R,
    state: State,
    block: Vec<u8>,
    pax: Vec<u8>,
    pax_size: Option<u64>,
    /// PAX data waiting for the entry it describes.
    pending_pax: Option<Vec<u8>>,
    /// The PAX data of the last entry header seen, for the reader of the `tar` crate's entries.
    entry_pax: EntryPax,
    /// Data length (padded) of a GNU sparse entry, read after its extension blocks.
    sparse_data: u64,
}

impl<R> HeaderLimit<R> {
    /// Watches `inner`, which starts with a tar header.
    pub fn new(inner: R) -> Self {
        HeaderLimit {
            inner,
            state: State::Header,
            block: Vec::with_capacity(BLOCK),
            pax: Vec::new(),
            pax_size: None,
            pending_pax: None,
            entry_pax: EntryPax::default(),
            sparse_data: 0,
        }
    }

    /// A handle on the raw PAX records of the entry the `tar` crate has just handed out: it reads a
    /// header, its extension headers and the entry's own header exactly, before handing the entry out,
    /// so the last entry header this reader saw is that entry's. Read them with [`pax_records`].
    pub fn entry_pax(&self) -> EntryPax {
        self.entry_pax.clone()
    }

    /// The wrapped reader.
    pub fn into_inner(self) -> R {
        self.inner
    }

    /// Follows the layout over bytes just read.
    fn observe(&mut self, mut bytes: &[u8]) -> std::io::Result<()> {
        while !bytes.is_empty() {
            match &mut self.state {
                State::Done => return Ok(()),
                State::Header | State::SparseExtension => {
                    let take = (BLOCK - self.block.len()).min(bytes.len());
                    self.block.extend_from_slice(&bytes[..take]);
                    bytes = &bytes[take..];
                    if self.block.len() == BLOCK {
                        self.state = if matches!(self.state, State::Header) {
                            self.on_header()?
                        } else {
                            self.on_sparse_extension()
                        };
                        self.block.clear();
                    }
                }
                State::Data { remaining, pax } => {
                    let take = usize::try_from(*remaining).map_or(bytes.len(), |r| r.min(bytes.len()));
                    if *pax {
                        self.pax.extend_from_slice(&bytes[..take]);
                    }
                    bytes = &bytes[take..];
                    *remaining -= take as u64;
                    if *remaining == 0 {
                        if *pax {
                            self.pax_size = pax_size(&self.pax);
                            self.pending_pax = Some(std::mem::take(&mut self.pax));
                        }
                        self.state = State::Header;
                    }
                }
            }
        }
        Ok(())
    }

    /// The state after a complete header block.
    fn on_header(&mut self) -> std::io::Result<State> {
        if self.block.iter().all(|b| *b == 0) {
            return Ok(State::Done);
        }
        let header = tar::Header::from_byte_slice(&self.block);
        let kind = header.entry_type();
        let recognized = header.as_gnu().is_some() || header.as_ustar().is_some();
        let Ok(size) = header.entry_size() else {
            return Ok(State::Done);
        };
        // What the `tar` crate reads whole into memory: bounded here.
        let buffered = recognized
            && (kind.is_gnu_longname() || kind.is_gnu_longlink() || kind.is_pax_local_extensions());
        if buffered && size > MAX_EXTENSION_SIZE {
            return Err(too_large(header, kind, size));
        }
        let size = if buffered {
            size
        } else {
            // An entry handed to the caller: a pending PAX `size` overrides its header's, unless it is
            // itself an extension header (as the `tar` crate does); either way the PAX records are used up.
            let pax_size = self.pax_size.take();
            let is_extension = kind.is_gnu_longname()
                || kind.is_gnu_longlink()
                || kind.is_pax_local_extensions()
                || kind.is_pax_global_extensions();
            if is_extension {
                size
            } else {
                self.entry_pax.set(self.pending_pax.take());
                pax_size.unwrap_or(size)
            }
        };
        let Some(padded) = size.checked_next_multiple_of(BLOCK as u64) else {
            return Ok(State::Done);
        };
        let sparse_extension =
            kind.is_gnu_sparse() && header.as_gnu().is_some_and(tar::GnuHeader::is_extended);
        self.sparse_data = padded;
        Ok(if sparse_extension {
            State::SparseExtension
        } else {
            data_state(padded, buffered && kind.is_pax_local_extensions())
        })
    }

    /// The state after a GNU sparse extension block: another one, or the entry's data.
    fn on_sparse_extension(&mut self) -> State {
        // `isextended` is the byte after 21 sparse records of 24 bytes (`tar::GnuExtSparseHeader`).
        if self.block[21 * 24] == 1 {
            State::SparseExtension
        } else {
            data_state(self.sparse_data, false)
        }
    }
}

impl<R: Read> Read for HeaderLimit<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let read = self.inner.read(buf)?;
        self.observe(&buf[..read])?;
        Ok(read)
    }
}

/// Data (and padding) of `padded` bytes, or the next header at once when there is none.
fn data_state(padded: u64, pax: bool) -> State {
    if padded == 0 {
        State::Header
    } else {
        State::Data {
            remaining: padded,
            pax,
        }
    }
}

/// The `size` record of PAX extended header data (which overrides the next entry's header size), parsed
/// as the `tar` crate does (the first `size` record; an unparsable one is ignored).
fn pax_size(data: &[u8]) -> Option<u64> {
    // Exactly the `tar` crate's reading (not [`pax_records`]): the layout followed here must be the
    // one the `tar` crate follows, or a header could pass unbounded.
    for extension in tar::PaxExtensions::new(data) {
        let extension = extension.ok()?;
        if extension.key() == Ok("size") {
            return extension.value().ok()?.parse().ok();
        }
    }
    None
}

/// The error for an extension header over the limit, naming the header and the entry it describes when
/// its own name field says (GNU tar writes `././@LongLink`, PAX writers `PaxHeaders/<name>`).
fn too_large(header: &tar::Header, kind: tar::EntryType, size: u64) -> std::io::Error {
    let what = if kind.is_gnu_longname() {
        "GNU long name"
    } else if kind.is_gnu_longlink() {
        "GNU long link name"
    } else {
        "PAX extended"
    };
    let name = String::from_utf8_lossy(&header.as_old().name);
    let name = name.trim_end_matches('\0');
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!(
            "{what} header {name:?} claims {size} bytes, more than the {MAX_EXTENSION_SIZE} accepted \
             (the layer is malformed or malicious)"
        ),
    )
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::{HeaderLimit, MAX_EXTENSION_SIZE, pax_records};

    /// A binary xattr value as overlayfs writes them (`trusted.overlay.origin` is a file handle): it
    /// holds newline bytes.
    const BINARY: &[u8] = b"\x00\xfb\n\x0a\x01bin\n";

    #[test]
    fn pax_records_are_read_by_their_length_so_values_may_hold_newlines() {
        let mut builder = tar::Builder::new(Vec::new());
        builder
            .append_pax_extensions([
                ("SCHILY.xattr.trusted.overlay.origin", BINARY),
                ("path", &b"etc/x"[..]),
            ])
            .expect("pax");
        let data = builder.into_inner().expect("tar")[512..].to_vec();
        let records = pax_records(&data).expect("well-formed records");
        assert_eq!(
            records[..2],
            [
                (&b"SCHILY.xattr.trusted.overlay.origin"[..], BINARY),
                (&b"path"[..], &b"etc/x"[..])
            ]
        );
        assert!(
            tar::PaxExtensions::new(&data).any(|record| record.is_err()),
            "the tar crate's own reader refuses this (why walt reads the records itself)"
        );
        for malformed in [&b"9 a=b\n"[..], b"x a=b\n", b"6 ab\n", b"7 a=b\n"] {
            assert!(pax_records(malformed).is_err(), "{malformed:?}");
        }
    }

    #[test]
    fn a_change_stream_with_a_binary_xattr_keeps_it() {
        let mut builder = tar::Builder::new(Vec::new());
        builder
            .append_pax_extensions([("SCHILY.xattr.user.bin", BINARY)])
            .expect("pax");
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(2);
        header.set_mode(0o644);
        header.set_mtime(1);
        header.set_uid(0);
        header.set_gid(0);
        builder
            .append_data(&mut header, "etc/file", &b"hi"[..])
            .expect("file");
        let stream = builder.into_inner().expect("tar");
        let options = crate::overlay::LayerOptions::default();
        let (layer, summary) = crate::overlay::write_layer_from_tar(&stream[..], &options, Vec::new())
            .expect("a binary xattr is no reason to refuse a change set");
        assert_eq!(summary.added + summary.modified, 1);
        let mut archive = tar::Archive::new(&layer[..]);
        let mut kept = None;
        for entry in archive.entries().expect("layer") {
            let mut entry = entry.expect("entry");
            if entry.path_bytes().as_ref() == b"etc/file"
                && let Some(data) = entry.pax_extensions().expect("pax")
            {
                kept = Some(data.count());
            }
        }
        assert!(kept.is_some(), "the xattr is carried into the layer");
    }

    /// A raw header block of `kind` named `name` claiming `size` bytes.
    fn header_block(name: &str, kind: tar::EntryType, size: u64) -> Vec<u8> {
        let mut header = tar::Header::new_gnu();
        header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        header.set_entry_type(kind);
        header.set_size(size);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_cksum();
        header.as_bytes().to_vec()
    }

    /// Reads every entry (paths, link names, PAX records, data) through the `tar` crate.
    fn read_all(input: impl Read) -> std::io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut archive = tar::Archive::new(input);
        let mut seen = Vec::new();
        for entry in archive.entries()? {
            let mut entry = entry?;
            let mut data = entry.path_bytes().into_owned();
            data.extend(
                entry
                    .link_name_bytes()
                    .map(std::borrow::Cow::into_owned)
                    .unwrap_or_default(),
            );
            if let Some(extensions) = entry.pax_extensions()? {
                for extension in extensions {
                    data.extend_from_slice(extension?.value_bytes());
                }
            }
            let mut content = Vec::new();
            entry.read_to_end(&mut content)?;
            seen.push((data, content));
        }
        Ok(seen)
    }

    #[test]
    fn long_names_links_and_pax_records_pass_unchanged() {
        let mut builder = tar::Builder::new(Vec::new());
        let long = format!("{}/{}", "d".repeat(150), "f".repeat(200));
        let mut file = tar::Header::new_gnu();
        file.set_size(3);
        builder
            .append_data(&mut file, &long, &b"abc"[..])
            .expect("long name");
        let mut link = tar::Header::new_gnu();
        link.set_entry_type(tar::EntryType::Symlink);
        link.set_size(0);
        link.set_mode(0o777);
        link.set_uid(0);
        link.set_gid(0);
        link.set_mtime(0);
        builder
            .append_link(&mut link, "l", "t".repeat(300))
            .expect("long link");
        let xattr = vec![b'x'; 200_000];
        builder
            .append_pax_extensions([("SCHILY.xattr.user.big", &xattr[..])])
            .expect("pax");
        let mut file = tar::Header::new_ustar();
        file.set_size(600);
        builder
            .append_data(&mut file, "with-xattr", &[7u8; 600][..])
            .expect("file");
        let bytes = builder.into_inner().expect("tar");
        let expected = read_all(&bytes[..]).expect("plain read");
        let mut through = HeaderLimit::new(&bytes[..]);
        assert_eq!(read_all(&mut through).expect("read through the limit"), expected);
        assert_eq!(expected.len(), 3);
    }

    #[test]
    fn a_pax_size_moves_the_next_header_as_the_tar_crate_does() {
        // The file's data (600 bytes per its PAX `size`, 0 per its header) holds what looks like a huge
        // long-name header: it is data, not a header, and must pass.
        let mut builder = tar::Builder::new(Vec::new());
        builder
            .append_pax_extensions([("size", &b"600"[..])])
            .expect("pax");
        let mut data = header_block("././@LongLink", tar::EntryType::GNULongName, 1 << 40);
        data.resize(600, 0);
        let mut bytes = builder.get_ref().clone(); // without the end-of-archive blocks
        bytes.extend(header_block("file", tar::EntryType::Regular, 0));
        bytes.extend(&data);
        bytes.resize(bytes.len().next_multiple_of(512) + 1024, 0);
        let entries = read_all(HeaderLimit::new(&bytes[..])).expect("data is not a header");
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].1, data);
    }

    #[test]
    fn gnu_sparse_extension_blocks_are_followed() {
        // 5 chunks of 512 bytes at offsets 0, 1024, … 4096: 4 described in the header, 1 in an extension
        // block. The last chunk looks like a huge long-name header: it is data, and must pass (a reader
        // that forgot the extension block would take it for a header).
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::GNUSparse);
        header.as_old_mut().name[..6].copy_from_slice(b"sparse");
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_size(5 * 512);
        let gnu = header.as_gnu_mut().expect("GNU header");
        for (i, chunk) in gnu.sparse.iter_mut().take(4).enumerate() {
            chunk.set_offset(i as u64 * 1024);
            chunk.set_length(512);
        }
        gnu.set_real_size(4096 + 512);
        gnu.set_is_extended(true);
        header.set_cksum();
        let mut extension = tar::GnuExtSparseHeader::new();
        extension.sparse[0].set_offset(4096);
        extension.sparse[0].set_length(512);
        let fake = header_block("././@LongLink", tar::EntryType::GNULongName, 1 << 40);
        let mut bytes = header.as_bytes().to_vec();
        bytes.extend_from_slice(extension.as_bytes());
        bytes.extend(std::iter::repeat_n(b's', 4 * 512));
        bytes.extend(&fake);
        bytes.resize(bytes.len() + 1024, 0);
        let entries = read_all(HeaderLimit::new(&bytes[..])).expect("sparse entry passes");
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].1.len(), 4096 + 512);
        assert_eq!(&entries[0].1[4096..], &fake[..]);
    }

    /// A reader that counts what was taken from it.
    struct Counting<R>(R, std::rc::Rc<std::cell::Cell<u64>>);

    impl<R: Read> Read for Counting<R> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let read = self.0.read(buf)?;
            self.1.set(self.1.get() + read as u64);
            Ok(read)
        }
    }

    #[test]
    fn a_huge_long_name_or_pax_header_fails_before_its_data_is_read() {
        for (kind, what) in [
            (
                tar::EntryType::GNULongName,
                "GNU long name header \"././@LongLink\"",
            ),
            (
                tar::EntryType::GNULongLink,
                "GNU long link name header \"././@LongLink\"",
            ),
            (tar::EntryType::XHeader, "PAX extended header \"././@LongLink\""),
        ] {
            let claimed = 8u64 << 30;
            let taken = std::rc::Rc::new(std::cell::Cell::new(0));
            // 64 MiB of a long name follow (as a gzip bomb would inflate to); only the header may be read.
            let stream = std::io::Cursor::new(header_block("././@LongLink", kind, claimed))
                .chain(std::io::repeat(b'n').take(64 << 20));
            let error = read_all(HeaderLimit::new(Counting(stream, taken.clone()))).expect_err("refused");
            assert_eq!(error.kind(), std::io::ErrorKind::InvalidData);
            assert!(
                error.to_string().contains(&format!(
                    "{what} claims {claimed} bytes, more than the {MAX_EXTENSION_SIZE} accepted"
                )),
                "{error}"
            );
            assert!(
                taken.get() <= 64 << 10,
                "read {} bytes before refusing",
                taken.get()
            );
        }
    }

    #[test]
    fn a_long_name_at_the_limit_passes() {
        let name_len = usize::try_from(MAX_EXTENSION_SIZE).expect("usize");
        let mut bytes = header_block("././@LongLink", tar::EntryType::GNULongName, MAX_EXTENSION_SIZE);
        bytes.extend(std::iter::repeat_n(b'n', name_len - 1));
        bytes.push(0);
        bytes.extend(header_block("short", tar::EntryType::Regular, 0));
        bytes.resize(bytes.len() + 1024, 0);
        let entries = read_all(HeaderLimit::new(&bytes[..])).expect("at the limit");
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].0.len(), name_len - 1);
    }
}
