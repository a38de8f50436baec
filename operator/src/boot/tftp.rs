//! TFTP (RFC 1350) with the option extension (RFC 2347): `blksize` (RFC 2348), `tsize` and `timeout`
//! (RFC 2349). Read requests only: a client's files are those of its image's `/boot/<model>/`.

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;

use super::state::{self, BootState};
use super::view::{ImageView, Kind, ResolveError};

/// Default and limits of the block size.
pub const DEFAULT_BLKSIZE: usize = 512;
const MIN_BLKSIZE: usize = 8;
const MAX_BLKSIZE: usize = 65_464;
/// Retransmissions of a block before the transfer is abandoned.
const RETRIES: u32 = 5;

/// A TFTP error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    /// Not defined, see the message.
    Undefined = 0,
    /// File not found.
    NotFound = 1,
    /// Access violation.
    Access = 2,
    /// Illegal TFTP operation.
    Illegal = 4,
    /// Option negotiation refused (RFC 2347).
    Options = 8,
}

/// A decoded TFTP packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// A read request: file name, mode, options (names lowercased).
    Read {
        /// The requested file.
        file: String,
        /// `octet` or `netascii` (both are sent as bytes).
        mode: String,
        /// Requested options.
        options: Vec<(String, String)>,
    },
    /// A write request (always refused).
    Write,
    /// A data block.
    Data(u16, Vec<u8>),
    /// An acknowledgement.
    Ack(u16),
    /// An error.
    Error(u16, String),
    /// Option acknowledgement.
    Oack(Vec<(String, String)>),
}

/// A packet that is not TFTP.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed TFTP packet: {0}")]
pub struct Malformed(&'static str);

fn strings(bytes: &[u8]) -> Result<Vec<String>, Malformed> {
    let Some(body) = bytes.strip_suffix(&[0]) else {
        return Err(Malformed("strings not NUL-terminated"));
    };
    Ok(body
        .split(|b| *b == 0)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect())
}

impl Packet {
    /// Decodes a packet.
    pub fn decode(bytes: &[u8]) -> Result<Packet, Malformed> {
        if bytes.len() < 4 {
            return Err(Malformed("shorter than 4 bytes"));
        }
        let opcode = u16::from_be_bytes([bytes[0], bytes[1]]);
        let word = u16::from_be_bytes([bytes[2], bytes[3]]);
        match opcode {
            1 => {
                let mut parts = strings(&bytes[2..])?.into_iter();
                let file = parts.next().ok_or(Malformed("no file name"))?;
                let mode = parts.next().ok_or(Malformed("no mode"))?.to_ascii_lowercase();
                let rest: Vec<String> = parts.collect();
                let options = rest
                    .chunks(2)
                    .filter(|pair| pair.len() == 2)
                    .map(|pair| (pair[0].to_ascii_lowercase(), pair[1].clone()))
                    .collect();
                Ok(Packet::Read { file, mode, options })
            }
            2 => Ok(Packet::Write),
            3 => Ok(Packet::Data(word, bytes[4..].to_vec())),
            4 => Ok(Packet::Ack(word)),
            5 => Ok(Packet::Error(
                word,
                strings(&bytes[4..]).map(|s| s.join(" ")).unwrap_or_default(),
            )),
            6 => {
                let parts = strings(&bytes[2..])?;
                Ok(Packet::Oack(
                    parts
                        .chunks(2)
                        .filter(|p| p.len() == 2)
                        .map(|p| (p[0].clone(), p[1].clone()))
                        .collect(),
                ))
            }
            _ => Err(Malformed("unknown opcode")),
        }
    }

    /// Encodes a packet.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let push_str = |out: &mut Vec<u8>, s: &str| {
            out.extend_from_slice(s.as_bytes());
            out.push(0);
        };
        match self {
            Packet::Read { file, mode, options } => {
                out.extend_from_slice(&1u16.to_be_bytes());
                push_str(&mut out, file);
                push_str(&mut out, mode);
                for (k, v) in options {
                    push_str(&mut out, k);
                    push_str(&mut out, v);
                }
            }
            Packet::Write => out.extend_from_slice(&2u16.to_be_bytes()),
            Packet::Data(block, data) => {
                out.extend_from_slice(&3u16.to_be_bytes());
                out.extend_from_slice(&block.to_be_bytes());
                out.extend_from_slice(data);
            }
            Packet::Ack(block) => {
                out.extend_from_slice(&4u16.to_be_bytes());
                out.extend_from_slice(&block.to_be_bytes());
            }
            Packet::Error(code, message) => {
                out.extend_from_slice(&5u16.to_be_bytes());
                out.extend_from_slice(&code.to_be_bytes());
                push_str(&mut out, message);
            }
            Packet::Oack(options) => {
                out.extend_from_slice(&6u16.to_be_bytes());
                for (k, v) in options {
                    push_str(&mut out, k);
                    push_str(&mut out, v);
                }
            }
        }
        out
    }
}

/// What the server grants of the requested options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// Block size.
    pub blksize: usize,
    /// Retransmission timeout.
    pub timeout: Duration,
    /// The options to acknowledge (empty: no OACK, start with block 1).
    pub oack: Vec<(String, String)>,
}

/// Grants the options a client asked for (unknown ones are ignored, as RFC 2347 says); `size` answers
/// `tsize`.
pub fn negotiate(options: &[(String, String)], size: u64) -> Negotiated {
    let mut out = Negotiated {
        blksize: DEFAULT_BLKSIZE,
        timeout: Duration::from_secs(1),
        oack: Vec::new(),
    };
    for (name, value) in options {
        match name.as_str() {
            "blksize" => {
                if let Ok(asked @ MIN_BLKSIZE..) = value.parse::<usize>() {
                    out.blksize = asked.min(MAX_BLKSIZE);
                    out.oack.push((name.clone(), out.blksize.to_string()));
                }
            }
            "tsize" => out.oack.push((name.clone(), size.to_string())),
            "timeout" => {
                if let Ok(secs @ 1..=255) = value.parse::<u64>() {
                    out.timeout = Duration::from_secs(secs);
                    out.oack.push((name.clone(), secs.to_string()));
                }
            }
            _ => {}
        }
    }
    out
}

/// The image path of a requested file: `/boot/<model>/<file>` (leading `/` and `./` ignored).
pub fn boot_path(model: &str, file: &str) -> String {
    let file = file.trim_start_matches('/').trim_start_matches("./");
    format!("/boot/{model}/{file}")
}

/// The boot script a stock U-Boot asks for over TFTP after its DHCP (its default boot,
/// `distro_bootcmd`), then runs.
pub const UBOOT_DISTRO_SCRIPT: &str = "boot.scr.uimg";
/// The boot script of WalT images for U-Boot boards (a uImage script), which WalT's first stage on a
/// board's SD card loads over TFTP and runs; DHCP names it as U-Boot's boot file.
pub const UBOOT_WALT_SCRIPT: &str = "start.uboot";

/// The image paths that may answer a TFTP request for `file`, the first that exists wins (pure):
/// [`boot_path`], and for [`UBOOT_DISTRO_SCRIPT`] then the image's [`UBOOT_WALT_SCRIPT`]. A stock
/// U-Boot (an arm64 VM node's, a board without WalT's SD card) so runs WalT's boot script as WalT's
/// first stage would; an image that has its own `boot.scr.uimg` is served that.
pub fn boot_paths(model: &str, file: &str) -> Vec<String> {
    let asked = boot_path(model, file);
    let mut paths = vec![asked.clone()];
    if asked == boot_path(model, UBOOT_DISTRO_SCRIPT) {
        paths.push(boot_path(model, UBOOT_WALT_SCRIPT));
    }
    paths
}

/// The file of `view` at the first of `paths` that is one (its bytes and size), else why the first
/// is not.
fn find_boot_file(view: &ImageView, paths: &[String]) -> Result<(Source, u64), (ErrorCode, String)> {
    let mut first_refusal = None;
    for path in paths {
        let found = match view.resolve(path.as_bytes()) {
            Ok(id) => match view.inode(id).map(|i| (&i.kind, i.attr.size)) {
                Some((Kind::File(layer_path), size)) => Ok((Source::Layer(layer_path.clone()), size)),
                Some((Kind::Data(data), size)) => Ok((Source::Memory(data.clone()), size)),
                _ => Err((ErrorCode::NotFound, format!("{path}: not a regular file"))),
            },
            Err(ResolveError::Loop) => Err((ErrorCode::NotFound, format!("{path}: symbolic link loop"))),
            Err(e) => Err((ErrorCode::NotFound, format!("{path}: {e}"))),
        };
        match found {
            Ok(found) => return Ok(found),
            Err(refusal) => {
                first_refusal.get_or_insert(refusal);
            }
        }
    }
    Err(first_refusal.unwrap_or((ErrorCode::NotFound, "no file asked".into())))
}

/// Serves TFTP on `socket`; transfers run from new sockets bound to `local` (port 0).
pub async fn serve(socket: UdpSocket, local: IpAddr, state: Arc<BootState>) {
    let mut buf = vec![0; 2048];
    loop {
        let Ok((len, peer)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        let packet = Packet::decode(&buf[..len]);
        let state = state.clone();
        tokio::spawn(async move {
            let Ok(transfer) = UdpSocket::bind(SocketAddr::new(local, 0)).await else {
                return;
            };
            match packet {
                Ok(Packet::Read { file, options, .. }) => {
                    if let Err(error) = read_request(&transfer, peer, &file, &options, &state).await {
                        tracing::debug!(%peer, %file, %error, "TFTP transfer ended");
                    }
                }
                Ok(Packet::Write) => {
                    let reply = Packet::Error(ErrorCode::Access as u16, "read-only server".into());
                    let _ = transfer.send_to(&reply.encode(), peer).await;
                }
                _ => {}
            }
        });
    }
}

/// Where a served file's bytes are.
enum Source {
    /// A file of a layer.
    Layer(std::path::PathBuf),
    /// A file of the node's top layer.
    Memory(Arc<[u8]>),
}

/// An open [`Source`].
enum Opened {
    Layer(std::fs::File),
    Memory(Arc<[u8]>),
}

impl Source {
    fn open(&self) -> std::io::Result<Opened> {
        Ok(match self {
            Source::Layer(path) => Opened::Layer(std::fs::File::open(path)?),
            Source::Memory(data) => Opened::Memory(data.clone()),
        })
    }
}

impl Opened {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        match self {
            Opened::Layer(file) => file.read_at(buf, offset),
            Opened::Memory(data) => {
                let start = usize::try_from(offset).unwrap_or(usize::MAX).min(data.len());
                let n = buf.len().min(data.len() - start);
                buf[..n].copy_from_slice(&data[start..start + n]);
                Ok(n)
            }
        }
    }
}

async fn read_request(
    socket: &UdpSocket,
    peer: SocketAddr,
    file: &str,
    options: &[(String, String)],
    state: &BootState,
) -> std::io::Result<()> {
    let binding = state.by_ip(peer.ip());
    let mut served = state::served("tftp", binding.as_ref(), peer.ip(), file);
    let found = match binding {
        None => Err((
            ErrorCode::Access,
            "unknown device: no image is served to this address".to_string(),
        )),
        Some(b) => find_boot_file(&b.view, &boot_paths(&b.model, file)),
    };
    let (source, size) = match found {
        Ok(found) => found,
        Err((code, message)) => {
            served.digest = None;
            served.refused = Some(message.clone());
            state.record(served);
            socket
                .send_to(&Packet::Error(code as u16, message).encode(), peer)
                .await?;
            return Ok(());
        }
    };
    state.record(served);
    let data = source.open()?;
    let granted = negotiate(options, size);
    if !granted.oack.is_empty() {
        send_until_acked(
            socket,
            peer,
            &Packet::Oack(granted.oack.clone()).encode(),
            0,
            granted.timeout,
        )
        .await?;
    }
    let mut block: u16 = 1;
    let mut offset = 0u64;
    let mut buf = vec![0; granted.blksize];
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            let n = data.read_at(&mut buf[filled..], offset + filled as u64)?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        let packet = Packet::Data(block, buf[..filled].to_vec()).encode();
        send_until_acked(socket, peer, &packet, block, granted.timeout).await?;
        offset += filled as u64;
        if filled < granted.blksize {
            return Ok(());
        }
        block = block.wrapping_add(1);
    }
}

async fn send_until_acked(
    socket: &UdpSocket,
    peer: SocketAddr,
    packet: &[u8],
    block: u16,
    timeout: Duration,
) -> std::io::Result<()> {
    let mut buf = [0; 1024];
    for _ in 0..=RETRIES {
        socket.send_to(packet, peer).await?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let Ok(received) = tokio::time::timeout_at(deadline, socket.recv_from(&mut buf)).await else {
                break;
            };
            let (len, from) = received?;
            if from != peer {
                continue;
            }
            match Packet::decode(&buf[..len]) {
                Ok(Packet::Ack(acked)) if acked == block => return Ok(()),
                Ok(Packet::Error(code, message)) => {
                    return Err(std::io::Error::other(format!("client error {code}: {message}")));
                }
                _ => {}
            }
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "no acknowledgement",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_request_with_options_decodes() {
        let bytes = b"\x00\x01kernel\x00octet\x00blksize\x001468\x00TSIZE\x000\x00";
        assert_eq!(
            Packet::decode(bytes),
            Ok(Packet::Read {
                file: "kernel".into(),
                mode: "octet".into(),
                options: vec![("blksize".into(), "1468".into()), ("tsize".into(), "0".into())],
            })
        );
        let packet = Packet::decode(bytes).expect("decodes");
        assert_eq!(Packet::decode(&packet.encode()), Ok(packet));
    }

    #[test]
    fn packets_encode_to_the_rfc_bytes() {
        assert_eq!(Packet::Ack(258).encode(), b"\x00\x04\x01\x02");
        assert_eq!(Packet::Data(1, b"ab".to_vec()).encode(), b"\x00\x03\x00\x01ab");
        assert_eq!(Packet::Error(1, "no".into()).encode(), b"\x00\x05\x00\x01no\x00");
        assert_eq!(
            Packet::Oack(vec![("tsize".into(), "42".into())]).encode(),
            b"\x00\x06tsize\x0042\x00"
        );
        assert!(Packet::decode(b"\x00\x09xx").is_err());
        assert!(Packet::decode(b"\x00\x01file").is_err());
    }

    #[test]
    fn options_are_granted_within_limits() {
        let asked = [
            ("blksize".to_string(), "100000".to_string()),
            ("tsize".to_string(), "0".to_string()),
            ("timeout".to_string(), "0".to_string()),
            ("windowsize".to_string(), "8".to_string()),
        ];
        let granted = negotiate(&asked, 1234);
        assert_eq!(granted.blksize, MAX_BLKSIZE);
        assert_eq!(
            granted.oack,
            vec![
                ("blksize".to_string(), MAX_BLKSIZE.to_string()),
                ("tsize".to_string(), "1234".to_string())
            ]
        );
        assert_eq!(negotiate(&[], 1).oack, vec![]);
        assert_eq!(
            negotiate(&[("blksize".into(), "4".into())], 1).blksize,
            DEFAULT_BLKSIZE
        );
    }

    #[test]
    fn u_boots_distro_script_is_the_images_own_else_its_walt_boot_script() {
        assert_eq!(
            boot_paths("qemu-arm-64", "boot.scr.uimg"),
            ["/boot/qemu-arm-64/boot.scr.uimg", "/boot/qemu-arm-64/start.uboot"]
        );
        assert_eq!(
            boot_paths("qemu-arm-64", "/start.uboot"),
            ["/boot/qemu-arm-64/start.uboot"]
        );
        assert_eq!(boot_paths("rpi-3-b", "kernel"), ["/boot/rpi-3-b/kernel"]);
    }

    #[test]
    fn a_missing_file_is_refused_by_its_own_path_and_a_fallback_serves() {
        use crate::boot::view::{ImageView, TopEntry};
        use crate::overlay::OpaqueXattr;
        let base = Arc::new(ImageView::build(&[], "sha256:feed", OpaqueXattr::Trusted).expect("empty view"));
        let script = TopEntry {
            path: "/boot/qemu-arm-64/start.uboot".into(),
            mode: 0o644,
            data: Some(b"script".to_vec()),
        };
        let view = ImageView::with_top_layer(base.clone(), &[script], "vm1", (0, 0))
            .expect("a view with start.uboot");
        let paths = boot_paths("qemu-arm-64", "boot.scr.uimg");
        let found = find_boot_file(&view, &paths).map(|(_, size)| size);
        assert_eq!(found, Ok(6), "start.uboot answers boot.scr.uimg");
        let missing = find_boot_file(&view, &boot_paths("qemu-arm-64", "vmlinuz"))
            .map(|(_, size)| size)
            .expect_err("no vmlinuz");
        assert_eq!(missing.0, ErrorCode::NotFound);
        assert!(
            missing.1.starts_with("/boot/qemu-arm-64/vmlinuz"),
            "{}",
            missing.1
        );
        let none = find_boot_file(&base, &paths)
            .map(|(_, size)| size)
            .expect_err("neither");
        assert!(
            none.1.starts_with("/boot/qemu-arm-64/boot.scr.uimg"),
            "{}",
            none.1
        );
    }

    #[test]
    fn boot_paths_stay_under_the_model_dir() {
        assert_eq!(boot_path("rpi-3-b", "/start.elf"), "/boot/rpi-3-b/start.elf");
        assert_eq!(
            boot_path("pc-x86-64", "./ipxe/start.ipxe"),
            "/boot/pc-x86-64/ipxe/start.ipxe"
        );
    }
}
