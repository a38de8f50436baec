//! What the boot service serves: which device (by MAC) boots which image view, under which address
//! and host name; and the journal of what it served to whom.

use std::fmt;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use super::persist::PersistDir;
use super::view::ImageView;

/// Where WalT images look for their NFS root: `/var/lib/walt/nodes/<mac|ip|hostname>/fs`.
pub const NODES_DIR: &str = "/var/lib/walt/nodes/";

/// A MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// A MAC address that is not six hex pairs separated by `:` or `-`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a MAC address (expected six hex pairs such as 52:54:00:12:34:56)")]
pub struct BadMac(pub String);

impl std::str::FromStr for Mac {
    type Err = BadMac;
    fn from_str(text: &str) -> Result<Self, BadMac> {
        let parts: Vec<&str> = text.split([':', '-']).collect();
        if parts.len() != 6 {
            return Err(BadMac(text.to_string()));
        }
        let mut mac = [0; 6];
        for (byte, part) in mac.iter_mut().zip(parts) {
            if part.len() != 2 {
                return Err(BadMac(text.to_string()));
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| BadMac(text.to_string()))?;
        }
        Ok(Mac(mac))
    }
}

/// One device the service boots.
#[derive(Debug, Clone)]
pub struct Binding {
    /// The device's boot interface.
    pub mac: Mac,
    /// The address it gets (authoritative DHCP) or has.
    pub ip: Ipv4Addr,
    /// Its host name (the node name).
    pub hostname: String,
    /// Its model: boot files come from the image's `/boot/<model>/`.
    pub model: String,
    /// The image it boots.
    pub view: Arc<ImageView>,
    /// Its persistent directory (`/persist`), for the tenant it is lent to (`None`: none served).
    pub persist: Option<Arc<PersistDir>>,
}

/// One thing served, for the journal.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Served {
    /// Unix time in milliseconds.
    pub at_ms: u64,
    /// `dhcp`, `tftp`, `http` or `nfs-mount`.
    pub protocol: &'static str,
    /// The device's MAC, when known.
    pub mac: Option<String>,
    /// The client's address.
    pub client: String,
    /// What was asked (boot file path, export path; the offered address for DHCP).
    pub path: String,
    /// The digest of the image served (absent: refused, with `refused` saying why).
    pub digest: Option<String>,
    /// Why nothing was served.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    /// Boot notifications: the digest the node says it booted (`digest` is the one served to it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reported: Option<String>,
    /// `/persist` mounts: the tenant whose directory was served.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

/// What the boot service knows of one device's latest boot: the digest it served, the one it
/// mounted as the root, and the one the booted node reported.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BootRecord {
    /// The device's MAC.
    pub mac: String,
    /// The digest last served to it (DHCP, TFTP, HTTP or NFS MOUNT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served: Option<String>,
    /// When (Unix milliseconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_at_ms: Option<u64>,
    /// The digest whose root it last mounted over NFS (the start of a boot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mounted: Option<String>,
    /// When.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mounted_at_ms: Option<u64>,
    /// Whether the node notified its boot since that mount.
    #[serde(default)]
    pub notified: bool,
    /// The digest it reported booting (since that mount; `None`: not reported, or said nothing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported: Option<String>,
    /// When it notified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notified_at_ms: Option<u64>,
    /// Whether its notification connection is open (the node runs).
    #[serde(default)]
    pub up: bool,
}

impl BootRecord {
    /// Updates the record with one journal entry about this device (pure).
    pub fn apply(&mut self, served: &Served) {
        if served.refused.is_some() {
            return;
        }
        match (served.protocol, served.path.as_str()) {
            ("boot-notification", "booted") => {
                self.notified = true;
                self.reported.clone_from(&served.reported);
                self.notified_at_ms = Some(served.at_ms);
                self.up = true;
            }
            ("boot-notification", _) => self.up = false,
            ("dhcp" | "tftp" | "http" | "nfs-mount", _) if served.digest.is_some() => {
                self.served.clone_from(&served.digest);
                self.served_at_ms = Some(served.at_ms);
                if served.protocol == "nfs-mount" {
                    // A new boot: what the node reported before is about the previous one.
                    self.mounted.clone_from(&served.digest);
                    self.mounted_at_ms = Some(served.at_ms);
                    self.notified = false;
                    self.reported = None;
                    self.notified_at_ms = None;
                }
            }
            _ => {}
        }
    }
}

/// A view no binding serves any more, kept for the device that booted it.
#[derive(Debug, Clone)]
struct Retired {
    mac: Mac,
    ip: Ipv4Addr,
    view: Arc<ImageView>,
}

/// The bindings and the journal, shared by all the protocols.
///
/// The bindings can be replaced while serving ([`BootState::set_bindings`]: the cluster changed); a
/// view no binding serves any more stays served to the node that booted it (its file handles keep
/// working) until that node mounts a root again.
#[derive(Debug)]
pub struct BootState {
    bindings: RwLock<Arc<Vec<Binding>>>,
    refusals: RwLock<Arc<std::collections::HashMap<Mac, String>>>,
    sightings: std::sync::OnceLock<tokio::sync::mpsc::Sender<super::dhcp::Sighting>>,
    retired: Mutex<Vec<Retired>>,
    journal: Mutex<Journal>,
    records: Mutex<std::collections::BTreeMap<String, BootRecord>>,
}

#[derive(Debug)]
struct Journal {
    file: Option<std::fs::File>,
    entries: Vec<Served>,
}

/// Entries kept in memory (the file keeps them all).
const JOURNAL_MEMORY: usize = 10_000;

impl BootState {
    /// A state serving `bindings`; the journal is also appended to `journal` (JSON lines) when set.
    pub fn new(bindings: Vec<Binding>, journal: Option<PathBuf>) -> std::io::Result<Self> {
        let file = journal
            .map(|path| std::fs::OpenOptions::new().create(true).append(true).open(path))
            .transpose()?;
        Ok(BootState {
            bindings: RwLock::new(Arc::new(bindings)),
            refusals: RwLock::new(Arc::default()),
            sightings: std::sync::OnceLock::new(),
            retired: Mutex::new(Vec::new()),
            journal: Mutex::new(Journal {
                file,
                entries: Vec::new(),
            }),
            records: Mutex::new(std::collections::BTreeMap::new()),
        })
    }

    /// All bindings (a snapshot).
    pub fn bindings(&self) -> Arc<Vec<Binding>> {
        match self.bindings.read() {
            Ok(bindings) => bindings.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Replaces the bindings. The views of the old bindings that the new ones do not serve are kept
    /// for the devices that booted them, until each mounts a root again.
    pub fn set_bindings(&self, bindings: Vec<Binding>) {
        let old = self.bindings();
        let kept: std::collections::HashSet<[u8; 8]> = bindings.iter().map(|b| b.view.key()).collect();
        if let Ok(mut retired) = self.retired.lock() {
            for binding in old.iter().filter(|b| !kept.contains(&b.view.key())) {
                retired.push(Retired {
                    mac: binding.mac,
                    ip: binding.ip,
                    view: binding.view.clone(),
                });
            }
        }
        let new = Arc::new(bindings);
        match self.bindings.write() {
            Ok(mut current) => *current = new,
            Err(poisoned) => *poisoned.into_inner() = new,
        }
    }

    /// Replaces the MACs served nothing on purpose, each with the reason its requests are told
    /// (journal, logs).
    pub fn set_refusals(&self, refusals: std::collections::HashMap<Mac, String>) {
        let new = Arc::new(refusals);
        match self.refusals.write() {
            Ok(mut current) => *current = new,
            Err(poisoned) => *poisoned.into_inner() = new,
        }
    }

    /// Why a MAC is served nothing on purpose, if it is.
    pub fn refusal(&self, mac: Mac) -> Option<String> {
        match self.refusals.read() {
            Ok(refusals) => refusals.get(&mac).cloned(),
            Err(poisoned) => poisoned.into_inner().get(&mac).cloned(),
        }
    }

    /// Sends the requests of unserved MACs to `sink` (set once: the cluster feed records them).
    pub fn record_sightings(&self, sink: tokio::sync::mpsc::Sender<super::dhcp::Sighting>) {
        let _ = self.sightings.set(sink);
    }

    /// A request from an unserved MAC: passed on when a sink is set and has room (a flood of
    /// requests is dropped here rather than queued without bound).
    pub fn sighted(&self, sighting: super::dhcp::Sighting) {
        if let Some(sink) = self.sightings.get() {
            let _ = sink.try_send(sighting);
        }
    }

    /// The views kept for devices that booted them before their binding changed.
    pub fn retired(&self) -> Vec<(Mac, Arc<ImageView>)> {
        self.retired
            .lock()
            .map(|r| r.iter().map(|kept| (kept.mac, kept.view.clone())).collect())
            .unwrap_or_default()
    }

    /// The binding of a MAC.
    pub fn by_mac(&self, mac: Mac) -> Option<Binding> {
        self.bindings().iter().find(|b| b.mac == mac).cloned()
    }

    /// The binding of an address.
    pub fn by_ip(&self, ip: IpAddr) -> Option<Binding> {
        let IpAddr::V4(ip) = ip else { return None };
        self.bindings().iter().find(|b| b.ip == ip).cloned()
    }

    /// The binding an export path names (`/var/lib/walt/nodes/<mac|ip|hostname>/fs`), and the path
    /// inside the image it asks for.
    pub fn by_export<'a>(&self, path: &'a str) -> Option<(Binding, &'a str)> {
        let (key, inside) = export_key(path)?;
        self.by_key(key).map(|b| (b, inside))
    }

    /// The binding of an export key: a MAC, an address or a host name.
    pub fn by_key(&self, key: &str) -> Option<Binding> {
        if let Ok(mac) = key.parse::<Mac>() {
            return self.by_mac(mac);
        }
        if let Ok(ip) = key.parse::<Ipv4Addr>() {
            return self.by_ip(IpAddr::V4(ip));
        }
        self.bindings().iter().find(|b| b.hostname == key).cloned()
    }

    /// The view whose handle key is `key` (served now, or kept for a node that booted it).
    pub fn view(&self, key: [u8; 8]) -> Option<Arc<ImageView>> {
        let current = self
            .bindings()
            .iter()
            .map(|b| &b.view)
            .find(|v| v.key() == key)
            .cloned();
        current.or_else(|| {
            self.retired
                .lock()
                .ok()?
                .iter()
                .map(|kept| &kept.view)
                .find(|v| v.key() == key)
                .cloned()
        })
    }

    /// The view whose handle key is `key`, if `client` may read it: the device at that address is
    /// bound to it, or booted it before its binding changed. One device never reads another's root
    /// (its per-node layer holds that device's SSH host key), whatever handle it makes up.
    pub fn view_for(&self, client: IpAddr, key: [u8; 8]) -> Option<Arc<ImageView>> {
        let IpAddr::V4(client) = client else {
            return None;
        };
        let current = self
            .bindings()
            .iter()
            .find(|b| b.ip == client && b.view.key() == key)
            .map(|b| b.view.clone());
        current.or_else(|| {
            self.retired
                .lock()
                .ok()?
                .iter()
                .find(|kept| kept.ip == client && kept.view.key() == key)
                .map(|kept| kept.view.clone())
        })
    }

    /// The persistent directory whose handle key is `key`, if `client` may use it: the device at
    /// that address is bound to it now (a device lent to another tenant has that tenant's
    /// directory; the former tenant's handles are refused from then on).
    pub fn persist_for(&self, client: IpAddr, key: [u8; 8]) -> Option<Arc<PersistDir>> {
        let IpAddr::V4(client) = client else {
            return None;
        };
        self.bindings()
            .iter()
            .filter(|b| b.ip == client)
            .filter_map(|b| b.persist.as_ref())
            .find(|dir| dir.key() == key)
            .cloned()
    }

    /// Whether a binding serves the persistent directory whose handle key is `key` (to anyone).
    pub fn persist_known(&self, key: [u8; 8]) -> bool {
        self.bindings()
            .iter()
            .filter_map(|b| b.persist.as_ref())
            .any(|dir| dir.key() == key)
    }

    /// Records what was served (or refused).
    pub fn record(&self, mut served: Served) {
        served.at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        tracing::info!(
            protocol = served.protocol,
            mac = served.mac.as_deref().unwrap_or("-"),
            client = %served.client,
            path = %served.path,
            digest = served.digest.as_deref().unwrap_or("-"),
            refused = served.refused.as_deref().unwrap_or(""),
            "served"
        );
        if served.protocol == "nfs-mount" && served.refused.is_none() {
            // The device boots again: the views kept for its previous boot are done with.
            let mac = served.mac.as_deref().and_then(|m| m.parse::<Mac>().ok());
            if let (Some(mac), Ok(mut retired)) = (mac, self.retired.lock()) {
                retired.retain(|kept| kept.mac != mac);
            }
        }
        if let (Some(mac), Ok(mut records)) = (served.mac.as_ref(), self.records.lock()) {
            records
                .entry(mac.clone())
                .or_insert_with(|| BootRecord {
                    mac: mac.clone(),
                    ..BootRecord::default()
                })
                .apply(&served);
        }
        let Ok(mut journal) = self.journal.lock() else {
            return;
        };
        if let (Some(file), Ok(line)) = (journal.file.as_mut(), serde_json::to_string(&served)) {
            let _ = writeln!(file, "{line}");
        }
        if journal.entries.len() >= JOURNAL_MEMORY {
            journal.entries.remove(0);
        }
        journal.entries.push(served);
    }

    /// The boot records, by MAC.
    pub fn records(&self) -> Vec<BootRecord> {
        self.records
            .lock()
            .map(|r| r.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The journal entries kept in memory.
    pub fn journal(&self) -> Vec<Served> {
        self.journal.lock().map(|j| j.entries.clone()).unwrap_or_default()
    }
}

/// The `<key>` of `/var/lib/walt/nodes/<key>/fs[/<path inside>]`, and the path inside (`/` for the
/// export itself).
pub fn export_key(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix(NODES_DIR)?;
    let (key, rest) = rest.split_once('/')?;
    let inside = rest.strip_prefix("fs")?;
    if key.is_empty() || !(inside.is_empty() || inside.starts_with('/')) {
        return None;
    }
    Some((key, if inside.is_empty() { "/" } else { inside }))
}

/// The `<key>` of `/var/lib/walt/nodes/<key>/persist[/<path inside>]`, the export of a device's
/// persistent directory, and the path inside (`/` for the export itself).
pub fn persist_export_key(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix(NODES_DIR)?;
    let (key, rest) = rest.split_once('/')?;
    let inside = rest.strip_prefix(super::persist::EXPORT_NAME)?;
    if key.is_empty() || !(inside.is_empty() || inside.starts_with('/')) {
        return None;
    }
    Some((key, if inside.is_empty() { "/" } else { inside }))
}

/// A journal entry (time filled in by [`BootState::record`]).
pub fn served(protocol: &'static str, binding: Option<&Binding>, client: IpAddr, path: &str) -> Served {
    Served {
        at_ms: 0,
        protocol,
        mac: binding.map(|b| b.mac.to_string()),
        client: client.to_string(),
        path: path.to_string(),
        digest: binding.map(|b| b.view.digest().to_string()),
        refused: None,
        reported: None,
        tenant: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_with_colons_or_dashes_and_print_lowercase() {
        let mac: Mac = "52-54-00-AB-cd-01".parse().expect("mac");
        assert_eq!(mac.to_string(), "52:54:00:ab:cd:01");
        assert!("52:54:00:ab:cd".parse::<Mac>().is_err());
        assert!("52:54:00:ab:cd:0g".parse::<Mac>().is_err());
    }

    #[test]
    fn export_paths_name_a_key() {
        assert_eq!(
            export_key("/var/lib/walt/nodes/52:54:00:ab:cd:01/fs"),
            Some(("52:54:00:ab:cd:01", "/"))
        );
        assert_eq!(export_key("/var/lib/walt/nodes/vm1/fs/"), Some(("vm1", "/")));
        assert_eq!(
            export_key("/var/lib/walt/nodes/vm1/fs/etc"),
            Some(("vm1", "/etc"))
        );
        assert_eq!(export_key("/var/lib/walt/nodes/vm1/fsx"), None);
        assert_eq!(export_key("/var/lib/walt/nodes/vm1"), None);
        assert_eq!(export_key("/var/lib/walt/nodes//fs"), None);
        assert_eq!(export_key("/srv/vm1/fs"), None);
        assert_eq!(export_key("/var/lib/walt/nodes/vm1/persist"), None, "not a root");
    }

    #[test]
    fn persist_export_paths_name_a_key() {
        assert_eq!(
            persist_export_key("/var/lib/walt/nodes/vm1/persist"),
            Some(("vm1", "/"))
        );
        assert_eq!(
            persist_export_key("/var/lib/walt/nodes/52:54:00:ab:cd:01/persist/"),
            Some(("52:54:00:ab:cd:01", "/"))
        );
        assert_eq!(
            persist_export_key("/var/lib/walt/nodes/vm1/persist/sub"),
            Some(("vm1", "/sub"))
        );
        assert_eq!(persist_export_key("/var/lib/walt/nodes/vm1/persistx"), None);
        assert_eq!(persist_export_key("/var/lib/walt/nodes/vm1/fs"), None);
        assert_eq!(persist_export_key("/var/lib/walt/nodes//persist"), None);
    }

    #[test]
    fn a_view_replaced_in_the_bindings_stays_served_to_its_node_until_it_mounts_again() {
        use crate::overlay::OpaqueXattr;
        let dir = tempfile::tempdir().expect("tempdir");
        let view = |name: &str| {
            let root = dir.path().join(name);
            std::fs::create_dir_all(&root).expect("mkdir");
            std::fs::write(root.join("file"), name).expect("write");
            Arc::new(
                ImageView::build(&[root], &format!("sha256:{name}"), OpaqueXattr::Trusted).expect("view"),
            )
        };
        let (old, new) = (view("old"), view("new"));
        let mac: Mac = "52:54:00:00:00:01".parse().expect("mac");
        let binding = |view: &Arc<ImageView>| Binding {
            mac,
            ip: Ipv4Addr::new(10, 0, 0, 10),
            hostname: "vm1".into(),
            model: "pc-x86-64".into(),
            view: view.clone(),
            persist: None,
        };
        let state = BootState::new(vec![binding(&old)], None).expect("state");
        state.set_bindings(vec![binding(&new)]);
        assert_eq!(
            state.by_mac(mac).map(|b| b.view.digest().to_string()).as_deref(),
            Some("sha256:new")
        );
        assert!(state.view(old.key()).is_some(), "the running node keeps its root");
        assert!(state.view(new.key()).is_some());
        let mut mount = served(
            "nfs-mount",
            state.by_mac(mac).as_ref(),
            IpAddr::V4(Ipv4Addr::new(10, 0, 0, 10)),
            "/var/lib/walt/nodes/vm1/fs",
        );
        mount.at_ms = 1;
        state.record(mount);
        assert!(
            state.view(old.key()).is_none(),
            "dropped once the node mounts its new root"
        );
        assert_eq!(state.records()[0].mounted.as_deref(), Some("sha256:new"));
    }

    #[test]
    fn a_device_reads_only_its_own_root_whatever_handle_it_makes_up() {
        use crate::overlay::OpaqueXattr;
        let dir = tempfile::tempdir().expect("tempdir");
        let view = |name: &str| {
            let root = dir.path().join(name);
            std::fs::create_dir_all(&root).expect("mkdir");
            Arc::new(
                ImageView::build(&[root], &format!("sha256:{name}"), OpaqueXattr::Trusted).expect("view"),
            )
        };
        let binding = |last: u8, view: &Arc<ImageView>| Binding {
            mac: Mac([0x52, 0x54, 0, 0, 0, last]),
            ip: Ipv4Addr::new(10, 0, 0, last),
            hostname: format!("vm{last}"),
            model: "pc-x86-64".into(),
            view: view.clone(),
            persist: None,
        };
        let (alice, bob, alice_next) = (view("alice"), view("bob"), view("alice-next"));
        let state = BootState::new(vec![binding(1, &alice), binding(2, &bob)], None).expect("state");
        let (one, two) = (
            IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
        );
        assert!(state.view_for(one, alice.key()).is_some());
        assert!(
            state.view_for(one, bob.key()).is_none(),
            "bob's root, from alice's device"
        );
        assert!(state.view_for(two, alice.key()).is_none());
        // A new image for alice: her running node keeps its old root; bob still reads neither.
        state.set_bindings(vec![binding(1, &alice_next), binding(2, &bob)]);
        assert!(
            state.view_for(one, alice.key()).is_some(),
            "kept for the node that booted it"
        );
        assert!(state.view_for(two, alice.key()).is_none());
    }
}
