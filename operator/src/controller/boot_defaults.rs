//! What an unregistered device boots (pure decisions; I/O in [`super::boot_source`]). A WalT server
//! boots a device it has never seen into the default image of its model at once, so the lab admin
//! finds it up and reachable; walt does the same once the lab says which catalog image is the
//! default of a model (`--default-image MODEL=IMAGE`) and which addresses a lab network may lend to
//! devices nobody registered (`--unregistered-addresses FIRST-LAST`). Without both, a new device is
//! recorded and boots nothing until a lab admin registers it (the safer default of a shared lab).
//!
//! The lent address is written in the recorded Device's `status.discovered.address` ([`lend`]
//! picks it), so it stays the device's across restarts of the boot service; registering the device
//! (`spec.address`) ends the loan.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::str::FromStr;

use kube::ResourceExt;
use walt_crds::{Device, ImageName};

use super::boot_source::network_of;

/// The most addresses one pool lends (a typo such as `10.0.0.1-10.9.0.1` is refused, not scanned).
pub const MAX_POOL_ADDRESSES: u32 = 4096;

/// A range of addresses of a lab network lent to unregistered devices: `FIRST-LAST`, both included.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddressPool {
    first: Ipv4Addr,
    last: Ipv4Addr,
}

impl AddressPool {
    /// Whether `address` is in the pool.
    pub fn contains(&self, address: Ipv4Addr) -> bool {
        (self.first..=self.last).contains(&address)
    }

    /// The pool's addresses, lowest first.
    fn addresses(&self) -> impl Iterator<Item = Ipv4Addr> {
        (u32::from(self.first)..=u32::from(self.last)).map(Ipv4Addr::from)
    }
}

impl FromStr for AddressPool {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (first, last) = text.split_once('-').ok_or_else(|| {
            format!(
                "{text:?} is not a range of addresses: write FIRST-LAST, e.g. 192.168.152.200-192.168.152.249"
            )
        })?;
        let parse = |part: &str| {
            part.trim()
                .parse::<Ipv4Addr>()
                .map_err(|_| format!("{part:?} in {text:?} is not an IPv4 address"))
        };
        let (first, last) = (parse(first)?, parse(last)?);
        if first > last {
            return Err(format!(
                "{text:?}: the first address comes after the last (write FIRST-LAST)"
            ));
        }
        let size = u32::from(last) - u32::from(first) + 1;
        if size > MAX_POOL_ADDRESSES {
            return Err(format!(
                "{text:?} holds {size} addresses; a lab network lends at most {MAX_POOL_ADDRESSES} (check the range)"
            ));
        }
        Ok(Self { first, last })
    }
}

/// The lab's default image of each model, from `--default-image MODEL=IMAGE` (the last one of a
/// model wins); IMAGE names a catalog Image (in `--catalog-namespace`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DefaultImages(BTreeMap<String, String>);

impl DefaultImages {
    /// Parses one `--default-image` value, `MODEL=IMAGE` (pure); an error names the value and what
    /// is wrong.
    pub fn parse_one(value: &str) -> Result<(String, String), String> {
        let (model, image) = value
            .split_once('=')
            .ok_or_else(|| format!("{value:?}: write MODEL=IMAGE, e.g. pc-x86-64=pc-x86-64-default"))?;
        if model.is_empty() || model.len() > 63 {
            return Err(format!("{value:?}: the model must be 1 to 63 characters"));
        }
        ImageName::parse(image).map_err(|e| format!("{value:?}: the image: {e}"))?;
        Ok((model.to_owned(), image.to_owned()))
    }

    /// The default images of `pairs` (the last one of a model wins).
    pub fn new(pairs: &[(String, String)]) -> Self {
        Self(pairs.iter().cloned().collect())
    }

    /// The default image of `model`, if the lab set one.
    pub fn of(&self, model: &str) -> Option<&str> {
        self.0.get(model).map(String::as_str)
    }
}

/// What the boot service serves devices nobody registered on its network.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Unregistered {
    /// The default image of each model.
    pub images: DefaultImages,
    /// The addresses the network lends them (`None`: none; they boot nothing).
    pub pool: Option<AddressPool>,
}

/// The address lent to the unregistered Device `device` (its `status.discovered.address`), if any.
pub fn lent_address(device: &Device) -> Option<Ipv4Addr> {
    device
        .status
        .as_ref()?
        .discovered
        .as_ref()?
        .address
        .as_deref()?
        .parse()
        .ok()
}

/// The address to lend a device recorded on `network` (pure): the lowest one of `pool` that no
/// Device of that network holds, registered (`spec.address`) or lent (`status.discovered.address`);
/// `None` when all are taken.
pub fn lend(pool: &AddressPool, devices: &[Device], network: &str) -> Option<Ipv4Addr> {
    let taken: Vec<Ipv4Addr> = devices
        .iter()
        .filter(|d| network_of(d) == network)
        .flat_map(|d| {
            let registered = d.spec.address.as_deref().and_then(|a| a.parse().ok());
            [registered, lent_address(d)]
        })
        .flatten()
        .collect();
    pool.addresses().find(|address| !taken.contains(address))
}

/// What an unregistered Device of `network` boots (pure): the catalog image (by name) and the
/// address it is served at, or why it boots nothing.
pub fn default_boot<'a>(
    device: &Device,
    devices: &[Device],
    network: &str,
    unregistered: &'a Unregistered,
) -> Result<(&'a str, Ipv4Addr), String> {
    let not_registered = "not registered (no spec.address)";
    let Some(pool) = &unregistered.pool else {
        return Err(format!(
            "{not_registered}: boots nothing until a lab admin registers it (the network lends no address to \
             unregistered devices: --unregistered-addresses)"
        ));
    };
    let model = device.spec.model.as_str();
    let image = unregistered.images.of(model).ok_or_else(|| {
        format!(
            "{not_registered}: the lab has no default image for its model {model:?} (--default-image {model}=IMAGE); \
             it boots nothing until a lab admin registers it"
        )
    })?;
    let address = lent_address(device)
        .filter(|a| pool.contains(*a))
        .ok_or_else(|| {
            format!("{not_registered}: no address lent yet (it is lent at the device's next request)")
        })?;
    // A lab admin may since have registered another device at the lent address: that one wins.
    let holder = devices.iter().find(|d| {
        d.is_registered()
            && network_of(d) == network
            && d.spec.address.as_deref() == Some(address.to_string().as_str())
    });
    if let Some(holder) = holder {
        return Err(format!(
            "{not_registered}: its lent address {address} is now the registered Device {}'s; it gets another \
             at its next request",
            holder.name_any()
        ));
    }
    Ok((image, address))
}

#[cfg(test)]
mod tests {
    use super::*;
    use walt_crds::{DeviceDiscovery, DeviceSpec, DeviceStatus};

    fn device(name: &str, address: Option<&str>, lent: Option<&str>) -> Device {
        let mut device = Device::new(
            name,
            DeviceSpec {
                address: address.map(str::to_owned),
                model: "pc-x86-64".into(),
                ..DeviceSpec::default()
            },
        );
        device.status = lent.map(|lent| DeviceStatus {
            discovered: Some(DeviceDiscovery {
                address: Some(lent.to_owned()),
                ..DeviceDiscovery::default()
            }),
            ..DeviceStatus::default()
        });
        device
    }

    fn pool(text: &str) -> AddressPool {
        text.parse().expect("a pool")
    }

    #[test]
    fn pools_parse_and_bad_ones_say_what_is_wrong() {
        let range = pool("192.168.152.200-192.168.152.202");
        assert!(range.contains("192.168.152.201".parse().expect("ip")));
        assert!(!range.contains("192.168.152.203".parse().expect("ip")));
        for (text, says) in [
            ("192.168.152.200", "write FIRST-LAST"),
            ("192.168.152.200-x", "\"x\" in"),
            ("10.0.0.9-10.0.0.1", "comes after the last"),
            ("10.0.0.0-10.1.0.0", "holds 65537 addresses"),
        ] {
            let error = text.parse::<AddressPool>().expect_err(text);
            assert!(error.contains(says), "{text}: {error}");
        }
    }

    #[test]
    fn default_images_parse_the_last_of_a_model_wins() {
        let pairs: Vec<(String, String)> = [
            "pc-x86-64=pc-default",
            "rpi-3-b=rpi-default:v2",
            "pc-x86-64=pc-default:v3",
        ]
        .iter()
        .map(|v| DefaultImages::parse_one(v).expect("parses"))
        .collect();
        let images = DefaultImages::new(&pairs);
        assert_eq!(images.of("pc-x86-64"), Some("pc-default:v3"));
        assert_eq!(images.of("rpi-3-b"), Some("rpi-default:v2"));
        assert_eq!(images.of("rpi-4-b"), None);
        let error = DefaultImages::parse_one("pc-x86-64").expect_err("no =");
        assert!(error.contains("write MODEL=IMAGE"), "{error}");
        let error = DefaultImages::parse_one("pc=Bad Name").expect_err("bad image");
        assert!(error.contains("the image"), "{error}");
    }

    #[test]
    fn the_lowest_address_no_device_of_the_network_holds_is_lent() {
        let range = pool("10.0.0.10-10.0.0.12");
        let devices = [
            device("registered", Some("10.0.0.10"), None),
            device("unknown-1", None, Some("10.0.0.11")),
        ];
        assert_eq!(
            lend(&range, &devices, "default"),
            Some("10.0.0.12".parse().expect("ip"))
        );
        // Another network's devices hold nothing here.
        let mut other = device("elsewhere", Some("10.0.0.12"), None);
        other.spec.boot_network = Some("lab-b".into());
        let more = [devices[0].clone(), devices[1].clone(), other];
        assert_eq!(
            lend(&range, &more, "default"),
            Some("10.0.0.12".parse().expect("ip"))
        );
        let full = [
            more[0].clone(),
            more[1].clone(),
            device("x", Some("10.0.0.12"), None),
        ];
        assert_eq!(lend(&range, &full, "default"), None, "all taken");
    }

    #[test]
    fn an_unregistered_device_boots_its_models_default_at_its_lent_address_or_says_why_not() {
        let unregistered = Unregistered {
            images: DefaultImages::new(&[("pc-x86-64".into(), "pc-default".into())]),
            pool: Some(pool("10.0.0.10-10.0.0.19")),
        };
        let new = device("unknown-525400aa0001", None, Some("10.0.0.10"));
        assert_eq!(
            default_boot(&new, std::slice::from_ref(&new), "default", &unregistered),
            Ok(("pc-default", "10.0.0.10".parse().expect("ip")))
        );

        let no_pool = Unregistered {
            pool: None,
            ..unregistered.clone()
        };
        let why = default_boot(&new, &[], "default", &no_pool).expect_err("no pool");
        assert!(why.contains("--unregistered-addresses"), "{why}");

        let mut rpi = new.clone();
        rpi.spec.model = "rpi-3-b".into();
        let why = default_boot(&rpi, &[], "default", &unregistered).expect_err("no default");
        assert!(
            why.contains("no default image for its model \"rpi-3-b\""),
            "{why}"
        );

        let not_lent = device("unknown-2", None, None);
        let why = default_boot(&not_lent, &[], "default", &unregistered).expect_err("no address");
        assert!(why.contains("no address lent yet"), "{why}");

        let outside = device("unknown-3", None, Some("10.0.1.10"));
        assert!(
            default_boot(&outside, &[], "default", &unregistered).is_err(),
            "outside the pool"
        );

        let admin = device("pc-07", Some("10.0.0.10"), None);
        let why = default_boot(&new, &[new.clone(), admin], "default", &unregistered).expect_err("taken");
        assert!(why.contains("registered Device pc-07's"), "{why}");
    }
}
