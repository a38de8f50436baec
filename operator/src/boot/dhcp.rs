//! DHCP (RFC 2131/2132) for network boot: authoritative for a lab network (address, host name = node
//! name, boot server in `siaddr`, boot file), proxy (RFC 4578 / PXE: boot information only, for
//! PXE, iPXE and Raspberry Pi firmware clients, on a network whose addresses another server gives),
//! or off. Packet encoding and the reply decision are pure; the socket loop is at the edge.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;

use tokio::net::UdpSocket;

use super::state::{self, Binding, BootState, Mac};

const MAGIC: [u8; 4] = [99, 130, 83, 99];
/// The text the Raspberry Pi boot ROM looks for in option 43 before it network-boots.
pub const RPI_BOOT: &str = "Raspberry Pi Boot";

/// DHCP option codes used here.
pub mod opt {
    /// Subnet mask.
    pub const NETMASK: u8 = 1;
    /// Routers.
    pub const ROUTER: u8 = 3;
    /// Host name.
    pub const HOSTNAME: u8 = 12;
    /// Vendor-specific information (PXE / Raspberry Pi boot menu).
    pub const VENDOR: u8 = 43;
    /// Requested address.
    pub const REQUESTED_IP: u8 = 50;
    /// Lease time.
    pub const LEASE: u8 = 51;
    /// Message type.
    pub const MESSAGE_TYPE: u8 = 53;
    /// Server identifier.
    pub const SERVER_ID: u8 = 54;
    /// Vendor class identifier.
    pub const VENDOR_CLASS: u8 = 60;
    /// TFTP server name.
    pub const TFTP_SERVER: u8 = 66;
    /// Boot file name.
    pub const BOOTFILE: u8 = 67;
    /// User class.
    pub const USER_CLASS: u8 = 77;
    /// iPXE encapsulated options (present only in requests from iPXE).
    pub const IPXE: u8 = 175;
}

/// DHCP message types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    /// DHCPDISCOVER.
    Discover = 1,
    /// DHCPOFFER.
    Offer = 2,
    /// DHCPREQUEST.
    Request = 3,
    /// DHCPACK.
    Ack = 5,
    /// DHCPNAK.
    Nak = 6,
}

/// A BOOTP/DHCP packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    /// 1: request, 2: reply.
    pub op: u8,
    /// Transaction id.
    pub xid: u32,
    /// Seconds since the client started.
    pub secs: u16,
    /// Flags (0x8000: broadcast).
    pub flags: u16,
    /// Client address (when it has one).
    pub ciaddr: Ipv4Addr,
    /// "Your" address: the one given.
    pub yiaddr: Ipv4Addr,
    /// Next server (the boot server).
    pub siaddr: Ipv4Addr,
    /// Relay agent.
    pub giaddr: Ipv4Addr,
    /// Client hardware address (Ethernet: the MAC).
    pub chaddr: Mac,
    /// Boot file name (the `file` field).
    pub file: String,
    /// Options in order (pad and end removed).
    pub options: Vec<(u8, Vec<u8>)>,
}

/// A packet that is not DHCP.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed DHCP packet: {0}")]
pub struct Malformed(&'static str);

fn ip_at(b: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3])
}

impl Packet {
    /// Decodes a packet (Ethernet hardware addresses only).
    pub fn decode(b: &[u8]) -> Result<Packet, Malformed> {
        if b.len() < 240 {
            return Err(Malformed("shorter than 240 bytes"));
        }
        if b[1] != 1 || b[2] != 6 {
            return Err(Malformed("not an Ethernet hardware address"));
        }
        if b[236..240] != MAGIC {
            return Err(Malformed("no DHCP magic cookie"));
        }
        let mut options = Vec::new();
        let mut at = 240;
        while at < b.len() {
            let code = b[at];
            if code == 0 {
                at += 1;
                continue;
            }
            if code == 255 {
                break;
            }
            let len = *b.get(at + 1).ok_or(Malformed("truncated option"))? as usize;
            let value = b.get(at + 2..at + 2 + len).ok_or(Malformed("truncated option"))?;
            options.push((code, value.to_vec()));
            at += 2 + len;
        }
        let mut mac = [0; 6];
        mac.copy_from_slice(&b[28..34]);
        let file_end = b[108..236].iter().position(|c| *c == 0).unwrap_or(128);
        Ok(Packet {
            op: b[0],
            xid: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
            secs: u16::from_be_bytes([b[8], b[9]]),
            flags: u16::from_be_bytes([b[10], b[11]]),
            ciaddr: ip_at(b, 12),
            yiaddr: ip_at(b, 16),
            siaddr: ip_at(b, 20),
            giaddr: ip_at(b, 24),
            chaddr: Mac(mac),
            file: String::from_utf8_lossy(&b[108..108 + file_end]).into_owned(),
            options,
        })
    }

    /// Encodes a packet (padded to the 300 bytes BOOTP clients expect at least).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0; 240];
        b[0] = self.op;
        b[1] = 1;
        b[2] = 6;
        b[4..8].copy_from_slice(&self.xid.to_be_bytes());
        b[8..10].copy_from_slice(&self.secs.to_be_bytes());
        b[10..12].copy_from_slice(&self.flags.to_be_bytes());
        for (at, ip) in [
            (12, self.ciaddr),
            (16, self.yiaddr),
            (20, self.siaddr),
            (24, self.giaddr),
        ] {
            b[at..at + 4].copy_from_slice(&ip.octets());
        }
        b[28..34].copy_from_slice(&self.chaddr.0);
        let file = self.file.as_bytes();
        let len = file.len().min(127);
        b[108..108 + len].copy_from_slice(&file[..len]);
        b[236..240].copy_from_slice(&MAGIC);
        for (code, value) in &self.options {
            for chunk in value.chunks(255) {
                b.push(*code);
                b.push(chunk.len() as u8);
                b.extend_from_slice(chunk);
            }
        }
        b.push(255);
        if b.len() < 300 {
            b.resize(300, 0);
        }
        b
    }

    /// The value of an option.
    pub fn option(&self, code: u8) -> Option<&[u8]> {
        self.options
            .iter()
            .find(|(c, _)| *c == code)
            .map(|(_, v)| v.as_slice())
    }

    /// The message type.
    pub fn message_type(&self) -> Option<u8> {
        self.option(opt::MESSAGE_TYPE).and_then(|v| v.first().copied())
    }
}

/// What boots the client, told by its request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Firmware {
    /// iPXE (option 175 or user class `iPXE`); the user class when it is `walt.node.<model>`.
    Ipxe(Option<String>),
    /// The Raspberry Pi boot ROM (`PXEClient:Arch:00000:UNDI:002001`).
    Rpi,
    /// Another PXE ROM.
    Pxe,
    /// U-Boot (`U-Boot…` vendor class).
    Uboot,
    /// Anything else (the kernel's ipconfig, an OS).
    Other,
}

/// Tells the firmware from the request's options.
pub fn firmware(request: &Packet) -> Firmware {
    let class = request
        .option(opt::VENDOR_CLASS)
        .map(String::from_utf8_lossy)
        .unwrap_or_default();
    let user = request
        .option(opt::USER_CLASS)
        .map(String::from_utf8_lossy)
        .unwrap_or_default();
    if request.option(opt::IPXE).is_some() || user == "iPXE" || user.starts_with("walt.node.") {
        let model = user.strip_prefix("walt.node.").map(str::to_string);
        Firmware::Ipxe(model)
    } else if class.starts_with("PXEClient:Arch:00000:UNDI:002001") {
        Firmware::Rpi
    } else if class.starts_with("PXEClient") {
        Firmware::Pxe
    } else if class.starts_with("U-Boot") {
        Firmware::Uboot
    } else {
        Firmware::Other
    }
}

/// A DHCP request from a MAC the service does not serve: what a lab admin needs to register the
/// device (its firmware and the classes that told it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sighting {
    /// The device's MAC.
    pub mac: Mac,
    /// Its firmware, told by the request.
    pub firmware: Firmware,
    /// Option 60, as sent (lossy UTF-8).
    pub vendor_class: Option<String>,
    /// Option 77, as sent (lossy UTF-8).
    pub user_class: Option<String>,
}

/// The sighting a request from an unserved MAC is (pure): `None` when it is not worth recording.
/// Authoritative DHCP hears every client of the lab network, as a WalT server does, and records
/// them all; a proxy shares its network with the lab's own DHCP and its computers, so it records
/// only the boot firmware it answers (PXE, iPXE, the Raspberry Pi ROM).
pub fn sighting(mode: Mode, request: &Packet) -> Option<Sighting> {
    let asks = request.op == 1 && matches!(request.message_type(), Some(1 | 3));
    let firmware = firmware(request);
    let boot_firmware = matches!(firmware, Firmware::Ipxe(_) | Firmware::Rpi | Firmware::Pxe);
    let worth = match mode {
        Mode::Authoritative => true,
        Mode::Proxy => boot_firmware,
        Mode::Off => false,
    };
    let text = |code| {
        request
            .option(code)
            .map(|v| String::from_utf8_lossy(v).chars().take(255).collect())
    };
    (asks && worth).then(|| Sighting {
        mac: request.chaddr,
        firmware,
        vendor_class: text(opt::VENDOR_CLASS),
        user_class: text(opt::USER_CLASS),
    })
}

/// How the service answers DHCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// The only DHCP server of the lab network: addresses, host names and boot information.
    Authoritative,
    /// Boot information only, for PXE/iPXE/Raspberry Pi clients; another server gives addresses.
    Proxy,
    /// No DHCP (the lab's DHCP server points devices at this service).
    Off,
}

/// The network settings of authoritative replies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    /// This service's address on the lab network (`siaddr`, server identifier).
    pub server: Ipv4Addr,
    /// The lab network's mask.
    pub netmask: Ipv4Addr,
    /// The default route given to devices, if any.
    pub router: Option<Ipv4Addr>,
    /// Lease time in seconds.
    pub lease_secs: u32,
}

/// The boot file a firmware is told to load (`None`: the firmware knows its files, or the client
/// is an OS).
pub fn boot_file(firmware: &Firmware, server: Ipv4Addr) -> Option<String> {
    match firmware {
        Firmware::Ipxe(_) => Some(format!("http://{server}/boot/start.ipxe")),
        Firmware::Pxe => Some("undionly.kpxe".into()),
        Firmware::Uboot => Some(super::tftp::UBOOT_WALT_SCRIPT.into()),
        Firmware::Rpi | Firmware::Other => None,
    }
}

/// Option 43 for PXE clients: discovery control (boot from the file in this reply), and for the
/// Raspberry Pi ROM a boot menu entry named [`RPI_BOOT`].
pub fn pxe_vendor_options(firmware: &Firmware) -> Vec<u8> {
    let mut v = vec![6, 1, 3];
    if *firmware == Firmware::Rpi {
        v.extend_from_slice(&[9, (RPI_BOOT.len() + 3) as u8, 0, 0, RPI_BOOT.len() as u8]);
        v.extend_from_slice(RPI_BOOT.as_bytes());
        v.extend_from_slice(&[10, 4, 0, b'P', b'X', b'E']);
    }
    v.push(255);
    v
}

/// The reply to a request, or `None` (with the reason, for the journal) when there is none to give.
pub fn reply(
    mode: Mode,
    network: &Network,
    request: &Packet,
    binding: Option<&Binding>,
) -> Result<Packet, &'static str> {
    if request.op != 1 {
        return Err("not a request");
    }
    let kind = request.message_type().ok_or("not DHCP (no message type)")?;
    let reply_type = match kind {
        1 => MessageType::Offer,
        3 => MessageType::Ack,
        _ => return Err("message type not answered"),
    };
    let firmware = firmware(request);
    let Some(binding) = binding else {
        return Err("unknown device: register its MAC address to boot it");
    };
    let is_pxe = matches!(firmware, Firmware::Ipxe(_) | Firmware::Rpi | Firmware::Pxe);
    if mode == Mode::Proxy && !is_pxe {
        return Err("proxy mode answers PXE, iPXE and Raspberry Pi firmware only");
    }
    if mode == Mode::Off {
        return Err("DHCP is off");
    }
    let mut reply = Packet {
        op: 2,
        xid: request.xid,
        secs: 0,
        flags: request.flags,
        ciaddr: request.ciaddr,
        yiaddr: Ipv4Addr::UNSPECIFIED,
        siaddr: network.server,
        giaddr: request.giaddr,
        chaddr: request.chaddr,
        file: String::new(),
        options: Vec::new(),
    };
    let mut reply_type = reply_type;
    if mode == Mode::Authoritative {
        let asked = request
            .option(opt::REQUESTED_IP)
            .filter(|v| v.len() == 4)
            .map(|v| ip_at(v, 0))
            .or((request.ciaddr != Ipv4Addr::UNSPECIFIED).then_some(request.ciaddr));
        if kind == 3 && asked.is_some_and(|ip| ip != binding.ip) {
            reply_type = MessageType::Nak;
        } else {
            reply.yiaddr = binding.ip;
        }
    }
    reply.options.push((opt::MESSAGE_TYPE, vec![reply_type as u8]));
    reply
        .options
        .push((opt::SERVER_ID, network.server.octets().to_vec()));
    if reply_type == MessageType::Nak {
        return Ok(reply);
    }
    if mode == Mode::Authoritative {
        reply
            .options
            .push((opt::LEASE, network.lease_secs.to_be_bytes().to_vec()));
        reply
            .options
            .push((opt::NETMASK, network.netmask.octets().to_vec()));
        if let Some(router) = network.router {
            reply.options.push((opt::ROUTER, router.octets().to_vec()));
        }
        reply
            .options
            .push((opt::HOSTNAME, binding.hostname.as_bytes().to_vec()));
    }
    if let Some(file) = boot_file(&firmware, network.server) {
        reply.options.push((opt::BOOTFILE, file.as_bytes().to_vec()));
        reply.file = file;
    }
    reply
        .options
        .push((opt::TFTP_SERVER, network.server.to_string().into_bytes()));
    if mode == Mode::Authoritative && matches!(firmware, Firmware::Ipxe(_)) {
        // iPXE's "no ProxyDHCP" setting (encapsulated option 176): this offer is the whole answer,
        // no need to wait for a proxy.
        reply.options.push((opt::IPXE, vec![176, 1, 1]));
    }
    // iPXE takes a reply that names "PXEClient" as a PXE offer and then waits for a proxy: only the
    // PXE ROMs (the Raspberry Pi's included) get it.
    if matches!(firmware, Firmware::Rpi | Firmware::Pxe) {
        reply.options.push((opt::VENDOR_CLASS, b"PXEClient".to_vec()));
        reply.options.push((opt::VENDOR, pxe_vendor_options(&firmware)));
    }
    Ok(reply)
}

/// Where a reply goes: the relay, the client's address, else broadcast on the client port.
pub fn destination(request: &Packet, from: SocketAddr, client_port: u16) -> SocketAddr {
    if request.giaddr != Ipv4Addr::UNSPECIFIED {
        SocketAddr::V4(SocketAddrV4::new(request.giaddr, 67))
    } else if request.ciaddr != Ipv4Addr::UNSPECIFIED {
        SocketAddr::new(from.ip(), from.port())
    } else {
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::BROADCAST, client_port))
    }
}

/// Serves DHCP on `socket` (bound to port 67, or 4011 for proxy requests, on the lab interface).
pub async fn serve(socket: UdpSocket, mode: Mode, network: Network, state: Arc<BootState>, client_port: u16) {
    let mut buf = vec![0; 1500];
    loop {
        let Ok((len, from)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        let Ok(request) = Packet::decode(&buf[..len]) else {
            continue;
        };
        let binding = state.by_mac(request.chaddr);
        let mut served = state::served("dhcp", binding.as_ref(), from.ip(), "");
        served.mac = Some(request.chaddr.to_string());
        // A MAC the service refuses (several Devices claim it) says why, rather than "unknown".
        let refusal = binding.is_none().then(|| state.refusal(request.chaddr)).flatten();
        let answer = match &refusal {
            Some(why) => Err(why.as_str()),
            None => reply(mode, &network, &request, binding.as_ref()),
        };
        if binding.is_none()
            && refusal.is_none()
            && let Some(sighting) = sighting(mode, &request)
        {
            state.sighted(sighting);
        }
        match answer {
            Ok(answer) => {
                let kind = match answer.message_type() {
                    Some(2) => "offer",
                    Some(5) => "ack",
                    _ => "nak",
                };
                served.path = format!("{kind} {} {}", answer.yiaddr, answer.file);
                state.record(served);
                let _ = socket
                    .send_to(&answer.encode(), destination(&request, from, client_port))
                    .await;
            }
            Err(reason) => {
                if request.message_type().is_some_and(|t| t == 1 || t == 3) {
                    served.digest = None;
                    served.refused = Some(reason.to_string());
                    state.record(served);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::view::ImageView;
    use crate::overlay::OpaqueXattr;

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

    /// A request as the firmware sends it, byte by byte.
    fn request_bytes(message_type: u8, extra: &[(u8, &[u8])]) -> Vec<u8> {
        let mut b = vec![0; 240];
        b[..4].copy_from_slice(&[1, 1, 6, 0]);
        b[4..8].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        b[10] = 0x80; // broadcast flag
        b[28..34].copy_from_slice(&MAC);
        b[236..240].copy_from_slice(&MAGIC);
        b.extend_from_slice(&[53, 1, message_type]);
        for (code, value) in extra {
            b.push(*code);
            b.push(value.len() as u8);
            b.extend_from_slice(value);
        }
        b.push(255);
        b
    }

    fn binding() -> Binding {
        let view = ImageView::build(&[], "sha256:feed", OpaqueXattr::Trusted).expect("empty view");
        Binding {
            mac: Mac(MAC),
            ip: Ipv4Addr::new(10, 123, 0, 10),
            hostname: "vm1".into(),
            model: "pc-x86-64".into(),
            view: Arc::new(view),
            persist: None,
        }
    }

    fn network() -> Network {
        Network {
            server: Ipv4Addr::new(10, 123, 0, 1),
            netmask: Ipv4Addr::new(255, 255, 255, 0),
            router: None,
            lease_secs: 3600,
        }
    }

    #[test]
    fn firmware_is_told_from_the_request() {
        let ipxe = Packet::decode(&request_bytes(
            1,
            &[(77, b"iPXE"), (175, &[177, 5, 1, 0x1a, 0xf4, 0x10, 0])],
        ))
        .expect("decodes");
        assert_eq!(firmware(&ipxe), Firmware::Ipxe(None));
        let walt = Packet::decode(&request_bytes(1, &[(77, b"walt.node.pc-x86-64")])).expect("decodes");
        assert_eq!(firmware(&walt), Firmware::Ipxe(Some("pc-x86-64".into())));
        let rpi =
            Packet::decode(&request_bytes(1, &[(60, b"PXEClient:Arch:00000:UNDI:002001")])).expect("decodes");
        assert_eq!(firmware(&rpi), Firmware::Rpi);
        let pxe = Packet::decode(&request_bytes(1, &[(60, b"PXEClient:Arch:00000:UNDI:002001x")]));
        assert_eq!(pxe.map(|p| firmware(&p)), Ok(Firmware::Rpi));
        let bios =
            Packet::decode(&request_bytes(1, &[(60, b"PXEClient:Arch:00007:UNDI:003016")])).expect("decodes");
        assert_eq!(firmware(&bios), Firmware::Pxe);
        let uboot = Packet::decode(&request_bytes(1, &[(60, b"U-Boot.armv8")])).expect("decodes");
        assert_eq!(firmware(&uboot), Firmware::Uboot);
        let linux = Packet::decode(&request_bytes(1, &[])).expect("decodes");
        assert_eq!(firmware(&linux), Firmware::Other);
    }

    #[test]
    fn authoritative_offer_to_ipxe_matches_the_golden_bytes() {
        let request = Packet::decode(&request_bytes(1, &[(77, b"iPXE")])).expect("decodes");
        let offer = reply(Mode::Authoritative, &network(), &request, Some(&binding())).expect("an offer");
        let bytes = offer.encode();
        assert_eq!(bytes[..4], [2, 1, 6, 0]);
        assert_eq!(bytes[4..8], [0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(bytes[10..12], [0x80, 0]);
        assert_eq!(bytes[16..20], [10, 123, 0, 10], "yiaddr: the device's address");
        assert_eq!(bytes[20..24], [10, 123, 0, 1], "siaddr: the boot server");
        assert_eq!(bytes[28..34], MAC);
        let file = b"http://10.123.0.1/boot/start.ipxe";
        assert_eq!(&bytes[108..108 + file.len()], file);
        assert_eq!(bytes[108 + file.len()], 0);
        let mut options = vec![
            53, 1, 2, 54, 4, 10, 123, 0, 1, 51, 4, 0, 0, 0x0e, 0x10, 1, 4, 255, 255, 255, 0,
        ];
        options.extend_from_slice(&[12, 3, b'v', b'm', b'1', 67, file.len() as u8]);
        options.extend_from_slice(file);
        options.extend_from_slice(&[66, 10]);
        options.extend_from_slice(b"10.123.0.1");
        options.extend_from_slice(&[175, 3, 176, 1, 1, 255]);
        assert_eq!(bytes[236..240], MAGIC);
        assert_eq!(bytes[240..240 + options.len()], options[..]);
        assert!(bytes.len() >= 300);
        assert_eq!(Packet::decode(&bytes).map(|p| p.message_type()), Ok(Some(2)));
    }

    #[test]
    fn raspberry_pi_gets_the_boot_menu_in_option_43() {
        let request =
            Packet::decode(&request_bytes(1, &[(60, b"PXEClient:Arch:00000:UNDI:002001")])).expect("decodes");
        let offer = reply(Mode::Proxy, &network(), &request, Some(&binding())).expect("an offer");
        assert_eq!(offer.yiaddr, Ipv4Addr::UNSPECIFIED, "a proxy gives no address");
        assert_eq!(offer.option(opt::VENDOR_CLASS), Some(&b"PXEClient"[..]));
        let mut vendor = vec![6, 1, 3, 9, 20, 0, 0, 17];
        vendor.extend_from_slice(b"Raspberry Pi Boot");
        vendor.extend_from_slice(&[10, 4, 0, b'P', b'X', b'E', 255]);
        assert_eq!(offer.option(opt::VENDOR), Some(&vendor[..]));
        assert_eq!(offer.option(opt::HOSTNAME), None);
        assert_eq!(offer.file, "");
    }

    #[test]
    fn requests_for_another_address_are_refused_and_unknown_devices_get_nothing() {
        let request = Packet::decode(&request_bytes(3, &[(50, &[10, 123, 0, 99])])).expect("decodes");
        let nak = reply(Mode::Authoritative, &network(), &request, Some(&binding())).expect("a reply");
        assert_eq!(nak.message_type(), Some(MessageType::Nak as u8));
        let request = Packet::decode(&request_bytes(3, &[(50, &[10, 123, 0, 10])])).expect("decodes");
        let ack = reply(Mode::Authoritative, &network(), &request, Some(&binding())).expect("a reply");
        assert_eq!(ack.message_type(), Some(MessageType::Ack as u8));
        assert_eq!(ack.yiaddr, Ipv4Addr::new(10, 123, 0, 10));
        let err = reply(Mode::Authoritative, &network(), &request, None).expect_err("unknown");
        assert!(err.contains("unknown device"), "{err}");
        let os = Packet::decode(&request_bytes(1, &[])).expect("decodes");
        assert!(
            reply(Mode::Proxy, &network(), &os, Some(&binding())).is_err(),
            "proxy ignores an OS"
        );
        let uboot = Packet::decode(&request_bytes(1, &[(60, b"U-Boot.armv8")])).expect("decodes");
        let offer = reply(Mode::Authoritative, &network(), &uboot, Some(&binding())).expect("offer");
        assert_eq!(offer.file, "start.uboot");
    }

    #[test]
    fn a_request_from_an_unserved_mac_is_a_sighting_when_worth_recording() {
        let rpi =
            Packet::decode(&request_bytes(1, &[(60, b"PXEClient:Arch:00000:UNDI:002001")])).expect("decodes");
        let seen = sighting(Mode::Authoritative, &rpi).expect("recorded");
        assert_eq!(seen.mac, Mac(MAC));
        assert_eq!(seen.firmware, Firmware::Rpi);
        assert_eq!(
            seen.vendor_class.as_deref(),
            Some("PXEClient:Arch:00000:UNDI:002001")
        );
        assert_eq!(seen.user_class, None);
        let ipxe = Packet::decode(&request_bytes(3, &[(77, b"walt.node.rpi-3-b")])).expect("decodes");
        let seen = sighting(Mode::Proxy, &ipxe).expect("a proxy records boot firmware");
        assert_eq!(seen.firmware, Firmware::Ipxe(Some("rpi-3-b".into())));
        assert_eq!(seen.user_class.as_deref(), Some("walt.node.rpi-3-b"));
        let os = Packet::decode(&request_bytes(1, &[])).expect("decodes");
        assert!(
            sighting(Mode::Authoritative, &os).is_some(),
            "authoritative: every client"
        );
        assert_eq!(
            sighting(Mode::Proxy, &os),
            None,
            "proxy: the lab's computers are not ours"
        );
        assert_eq!(sighting(Mode::Off, &rpi), None);
        let release = Packet::decode(&request_bytes(7, &[])).expect("decodes");
        assert_eq!(
            sighting(Mode::Authoritative, &release),
            None,
            "only DISCOVER and REQUEST"
        );
    }

    #[test]
    fn malformed_packets_are_refused() {
        assert!(Packet::decode(&[0; 100]).is_err());
        let mut bytes = request_bytes(1, &[]);
        bytes[236] = 0;
        assert!(Packet::decode(&bytes).is_err());
        let mut truncated = request_bytes(1, &[]);
        truncated.truncate(241);
        truncated.push(40);
        assert!(Packet::decode(&truncated).is_err());
    }
}
