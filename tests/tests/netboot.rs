//! Network boot on the component tier: `walt-operator boot-server` serving OCI images pulled from a
//! real registry, inside network namespaces this test creates.
//!
//! 1. Without a VM: an image of two layers (a deletion, a replaced directory, a hard link, a symlink
//!    chain into `/boot/<model>/`) served over NFSv3 (checked with libnfs's `nfs-ls`/`nfs-cat`, a
//!    client independent of ours, through the portmapper), TFTP (busybox `tftp` with `blksize`) and
//!    HTTP (busybox `wget`), under the three export keys (MAC, address, host name); an unknown key is
//!    refused; the journal records the image digest served at MOUNT, TFTP and HTTP time. The node's
//!    top layer (walt's scripts, `walt-env`, the digest) is served above the image; the node services
//!    answer WalT's protocol (`socat` as the client): the clock, and boot notifications whose digest
//!    the boot records judge (verified, or a mismatch).
//! 2. A VM node (`walt-operator vm --accel tcg`, what a VM node pod runs: `qemu-system-x86_64`, iPXE
//!    ROM, on a tap of a bridge in a lab namespace) powers on,
//!    gets its address and boot file from our authoritative DHCP, loads `start.ipxe`, the Debian
//!    kernel and an initramfs over HTTP, mounts its root read-only over NFSv3 from our server,
//!    walt's `walt-init` (from the node's top layer: the image has none) stacks the RAM overlay, sets
//!    the clock from the boot service (the VM's starts in 2001), and notifies the boot with the
//!    digest it booted; the boot records say verified. SSH logs in with the key the boot service was
//!    given, to the device's host key (neither is in the image). The figures (power-on → DHCP →
//!    kernel → NFS mount → booted) are printed. A change on the node (a new file, a deletion) is saved
//!    with `walt-operator save`; a VM whose MAC is not registered gets no image; the node then boots
//!    the saved image (verified: the saved digest) and finds its change.
//!    An arm64 VM node (`walt-operator vm --arch arm64`: `qemu-system-aarch64 -machine virt` with
//!    Debian's U-Boot) boots an image of Debian's arm64 kernel, busybox and OpenSSH the same way: DHCP,
//!    then `boot.scr.uimg` over TFTP, answered with the image's `start.uboot`, kernel and initramfs over
//!    TFTP; verified, SSH to the device's host key.
//! 3. Control plane tier: the boot service fed from the cluster; the operator verifying what a VM
//!    booted; the operator powering a VM node (its pod's `walt-operator vm` run here as a kubelet
//!    would), power-cycled by the boot watchdog and by a reboot request; an arm64 VM node from a
//!    `u-boot` VM slot.

use std::process::Command;
use std::time::Duration;

use walt_tests::images::{Arch, OciLayout};
use walt_tests::netboot::{
    BOOTED_MARKER, BootServer, Forward, LabNetwork, MODEL, MODEL_ARM64, ReferenceServers, VmNode,
    add_plain_walt_init, debian_kernel, in_netns, install_host_sshd, output, vm_image_root,
    vm_node_os_image_for, vm_node_os_root_for,
};
use walt_tests::registry::Registry;
use walt_tests::{require_root, run};

fn entries<'a>(journal: &'a [serde_json::Value], protocol: &str) -> Vec<&'a serde_json::Value> {
    journal.iter().filter(|e| e["protocol"] == protocol).collect()
}

const MAC: &str = "52:54:00:aa:00:01";

/// Where the boot server serves its boot records (inside the lab namespace).
const STATUS: &str = "127.0.0.1:9470";

/// The boot records (`GET /boots`), fetched inside the lab namespace with busybox `wget`.
fn boots(net: &LabNetwork) -> Vec<serde_json::Value> {
    let (ok, body) = output(
        in_netns(net, "busybox")
            .args(["wget", "-q", "-O", "-"])
            .arg(format!("http://{STATUS}/boots")),
    );
    assert!(ok, "GET /boots: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET /boots is not JSON ({e}): {body}"))
}

/// The boot record of `mac`.
fn boot_of(net: &LabNetwork, mac: &str) -> serde_json::Value {
    boots(net)
        .into_iter()
        .find(|b| b["mac"] == mac)
        .unwrap_or(serde_json::Value::Null)
}

/// Speaks WalT's line protocol to a node service with `socat` (not our code): `lines` sent, then
/// what the service answered before closing.
fn node_service(net: &LabNetwork, port: u16, lines: &str) -> String {
    use std::io::Write as _;
    let mut child = in_netns(net, "socat")
        .args(["-t", "5", "-", &format!("TCP:127.0.0.1:{port}")])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("socat");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(lines.as_bytes())
        .expect("write to socat");
    let out = child.wait_with_output().expect("socat");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One TCG VM at a time: two booting at once on a 2-core machine time out each other's SSH.
fn one_vm_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static VM: std::sync::Mutex<()> = std::sync::Mutex::new(());
    VM.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[test]
fn boot_service_serves_an_oci_image_over_nfs_tftp_and_http() {
    require_root().expect("root");
    let scratch = tempfile::tempdir().expect("scratch dir");
    let registry = Registry::start().expect("registry");
    let layout = OciLayout::new().expect("layout");
    layout.new_image("empty", Arch::Amd64).expect("new image");
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let kernel = big.clone();
    layout
        .add_layer("empty", "base", |root| {
            use std::os::unix::fs::symlink;
            for dir in ["etc", "replaced/old", &format!("boot/{MODEL}"), "usr/lib"] {
                std::fs::create_dir_all(root.join(dir))?;
            }
            std::fs::write(root.join("etc/hostname"), "base\n")?;
            std::fs::write(root.join("etc/deleted"), "gone in the next layer\n")?;
            std::fs::write(root.join("replaced/old/file"), "hidden by the next layer\n")?;
            std::fs::write(root.join("usr/lib/kernel.img"), &kernel)?;
            std::fs::hard_link(root.join("etc/hostname"), root.join("etc/hostname-link"))?;
            symlink(
                "../../usr/lib/kernel.img",
                root.join(format!("boot/{MODEL}/kernel.img")),
            )?;
            symlink(MODEL, root.join("boot/pc-alias"))?;
            Ok(())
        })
        .expect("base layer");
    layout
        .add_layer("base", "v2", |root| {
            std::fs::remove_file(root.join("etc/deleted"))?;
            std::fs::remove_dir_all(root.join("replaced"))?;
            std::fs::create_dir_all(root.join("replaced"))?;
            std::fs::write(root.join("replaced/new"), "new\n")
        })
        .expect("second layer");
    let digest = layout.push("v2", &registry, "netboot/files:v2").expect("push");
    let net = LabNetwork::create(201).expect("lab network");
    let device = format!(
        "mac={MAC},ip=127.0.0.1,name=node1,model={MODEL},image={}",
        registry.reference("netboot/files:v2")
    );
    // Another device, elsewhere on the lab network, booting the same image: its root is its own.
    let neighbour = format!(
        "mac=52:54:00:12:34:99,ip={},name=node2,model={MODEL},image={}",
        net.device_ip(50),
        registry.reference("netboot/files:v2")
    );
    let server = BootServer::start(
        &net,
        scratch.path(),
        Some(&registry),
        &[
            "--device".into(),
            device,
            "--device".into(),
            neighbour,
            "--status-listen".into(),
            STATUS.into(),
        ],
    );

    // NFS, through the portmapper, with libnfs (not our code).
    let (ok, listing) =
        output(in_netns(&net, "nfs-ls").arg("nfs://127.0.0.1/var/lib/walt/nodes/node1/fs/etc"));
    assert!(ok, "nfs-ls: {listing}");
    assert!(
        listing.contains("hostname-link") && listing.contains(" hostname"),
        "{listing}"
    );
    assert!(
        !listing.contains("deleted"),
        "the whiteout hides etc/deleted: {listing}"
    );
    let (ok, listing) =
        output(in_netns(&net, "nfs-ls").arg(format!("nfs://127.0.0.1/var/lib/walt/nodes/{MAC}/fs/replaced")));
    assert!(ok, "nfs-ls: {listing}");
    assert!(listing.contains("new") && !listing.contains("old"), "{listing}");
    let copy = scratch.path().join("kernel.nfs");
    let out = in_netns(&net, "nfs-cat")
        .arg("nfs://127.0.0.1/var/lib/walt/nodes/127.0.0.1/fs/usr/lib/kernel.img")
        .output()
        .expect("nfs-cat");
    std::fs::write(&copy, &out.stdout).expect("save");
    assert!(
        out.status.success() && out.stdout == big,
        "nfs-cat of a 3 MB file: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The node's top layer, above the image: the digest it boots, walt-env, walt's scripts.
    let (ok, served_digest) = output(
        in_netns(&net, "nfs-cat").arg("nfs://127.0.0.1/var/lib/walt/nodes/node1/fs/etc/walt/image-digest"),
    );
    assert!(
        ok && served_digest == format!("{digest}\n"),
        "image-digest: {served_digest}"
    );
    let (ok, env) =
        output(in_netns(&net, "nfs-cat").arg("nfs://127.0.0.1/var/lib/walt/nodes/node1/fs/bin/walt-env"));
    assert!(
        ok && env.contains(&format!("export walt_image_id='{digest}'"))
            && env.contains("export walt_server_notify_bootup_port='12347'"),
        "walt-env: {env}"
    );
    let (ok, init) = output(
        in_netns(&net, "nfs-ls").arg("nfs://127.0.0.1/var/lib/walt/nodes/node1/fs/bin/_walt_internal_"),
    );
    assert!(
        ok && init.contains("walt-notify-bootup") && init.contains("walt-clock-sync"),
        "walt's scripts: {init}"
    );

    // The node API (WalT's sync_clock) and boot notifications, spoken by socat.
    let answer = node_service(
        &net,
        12345,
        "REQ_API_SESSION\nNSAPI\n('API_CALL', 'sync_clock', (), {})\n",
    );
    let time: u64 = answer
        .lines()
        .nth(1)
        .and_then(|l| l.strip_prefix("('RESULT', "))
        .and_then(|l| l.strip_suffix(')'))
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("sync_clock answer: {answer:?}"));
    assert!(time.abs_diff(unix_now()) < 10, "sync_clock says {time}");
    assert_eq!(
        boot_of(&net, MAC)["verdict"]["reason"],
        "BootNotNotified",
        "mounted, not notified yet"
    );
    let ok = node_service(
        &net,
        12347,
        &format!("REQ_NOTIFY_BOOTUP_STATUS\nwalt_image_id={digest}\n"),
    );
    assert_eq!(
        ok, "OK\n",
        "the notification is acknowledged like WalT's server does"
    );
    let record = boot_of(&net, MAC);
    assert_eq!(record["verdict"]["reason"], "Verified", "{record}");
    assert_eq!(record["verdict"]["digest"], digest.as_str(), "{record}");
    let other = format!("sha256:{}", "0".repeat(64));
    node_service(
        &net,
        12347,
        &format!("REQ_NOTIFY_BOOTUP_STATUS\nwalt_image_id={other}\n"),
    );
    let record = boot_of(&net, MAC);
    assert_eq!(record["verdict"]["reason"], "DigestMismatch", "{record}");
    assert!(
        record["verdict"]["message"]
            .as_str()
            .is_some_and(|m| m.contains(&other)),
        "{record}"
    );

    let (ok, refused) =
        output(in_netns(&net, "nfs-ls").arg("nfs://127.0.0.1/var/lib/walt/nodes/someone-else/fs/"));
    assert!(
        !ok && refused.contains("MNT3ERR_NOENT"),
        "an unknown export is refused: {refused}"
    );
    // Another device's root (its per-node layer holds its SSH host key) is refused to this one,
    // under each of its three keys, and the journal says why.
    for key in ["node2", "52:54:00:12:34:99", &net.device_ip(50).to_string()] {
        let (ok, refused) =
            output(in_netns(&net, "nfs-ls").arg(format!("nfs://127.0.0.1/var/lib/walt/nodes/{key}/fs/etc")));
        assert!(
            !ok && refused.contains("MNT3ERR_ACCES"),
            "another device's root, by {key}: {refused}"
        );
    }
    assert!(
        server.journal().iter().any(|e| e["protocol"] == "nfs-mount"
            && e["refused"]
                .as_str()
                .is_some_and(|why| why.contains("only the device at"))),
        "the journal says why"
    );

    // TFTP with blksize, through the model dir's symlink chain.
    let tftp_copy = scratch.path().join("kernel.tftp");
    run(in_netns(&net, "busybox")
        .args(["tftp", "-g", "-b", "1468", "-r", "kernel.img", "-l"])
        .arg(&tftp_copy)
        .arg("127.0.0.1"))
    .expect("busybox tftp");
    assert_eq!(std::fs::read(&tftp_copy).expect("read"), big, "TFTP content");
    let (ok, missing) =
        output(in_netns(&net, "busybox").args(["tftp", "-g", "-r", "nope", "-l", "/dev/null", "127.0.0.1"]));
    assert!(
        !ok && missing.contains("no such file"),
        "a missing file is an error: {missing}"
    );

    // HTTP.
    let http_copy = scratch.path().join("kernel.http");
    run(in_netns(&net, "busybox")
        .args(["wget", "-q", "-O"])
        .arg(&http_copy)
        .arg("http://127.0.0.1/boot/kernel.img"))
    .expect("busybox wget");
    assert_eq!(std::fs::read(&http_copy).expect("read"), big, "HTTP content");

    let journal = server.journal();
    for protocol in ["nfs-mount", "tftp", "http"] {
        let served = entries(&journal, protocol);
        assert!(
            served
                .iter()
                .any(|e| e["digest"] == digest.as_str() && e["mac"] == MAC),
            "{protocol}: the journal records digest {digest} served to {MAC}: {journal:?}"
        );
    }
    assert!(
        entries(&journal, "nfs-mount")
            .iter()
            .any(|e| e["refused"].as_str().is_some_and(|r| r.contains("no device"))),
        "the refused MOUNT is recorded: {journal:?}"
    );
}

/// NFS status codes the `/persist` checks expect (RFC 1813).
const NFS3ERR_ACCES: u32 = 13;
const NFS3ERR_STALE: u32 = 70;

/// A boot service serving `/persist` from `persist` to node1 (at 127.0.0.1, where libnfs and the
/// raw client connect from) for `tenant`, and to node2 (127.0.0.2, for tenant alice), both on an
/// unpacked root; a 3 MiB quota.
fn persist_server(
    net: &LabNetwork,
    dir: &std::path::Path,
    root: &std::path::Path,
    persist: &std::path::Path,
    tenant: &str,
) -> BootServer {
    std::fs::create_dir_all(dir).expect("server dir");
    BootServer::start(
        net,
        dir,
        None,
        &[
            "--device".into(),
            format!(
                "mac={MAC},ip=127.0.0.1,name=node1,model={MODEL},rootfs={},tenant={tenant}",
                root.display()
            ),
            "--device".into(),
            format!(
                "mac=52:54:00:12:34:99,ip=127.0.0.2,name=node2,model={MODEL},rootfs={},tenant=alice",
                root.display()
            ),
            "--persist-dir".into(),
            persist.display().to_string(),
            "--persist-quota".into(),
            (3 << 20).to_string(),
        ],
    )
}

/// `/persist` on the component tier, with clients independent of walt's code: libnfs's `nfs-cp`
/// writes 1 MiB and `nfs-cat` reads it back (both timed), `nfs-ls` lists; a raw NFSv3 client
/// written from the RFC (`walt_tests::nfs_client`) makes what libnfs cannot: a directory (a file
/// copied into it mounts it as a subdirectory), symlinks pointing out (never followed: reading
/// through them fails, and the host file they name stays untouched), names with `..` or `/`
/// (refused), a removal. Another address (node2's) cannot mount node1's `/persist` nor use its
/// handles; a write past the quota fails. Restarted with node1 lent to tenant bob, node1's
/// `/persist` is empty and alice's handles are refused; lent back to alice, her files and her
/// handles (kept across the restarts) work again. On the host, each (device, tenant) has its own
/// directory under `--persist-dir`.
#[test]
fn boot_service_serves_each_devices_persist_read_write() {
    use walt_tests::nfs_client::NfsClient;
    require_root().expect("root");
    let scratch = tempfile::tempdir().expect("scratch dir");
    let root = scratch.path().join("rootfs");
    std::fs::create_dir_all(root.join("etc")).expect("rootfs");
    std::fs::write(root.join("etc/hostname"), "image\n").expect("rootfs");
    let persist = scratch.path().join("persist");
    let outside = scratch.path().join("outside");
    std::fs::write(&outside, "the host's, not the node's\n").expect("a host file");
    let net = LabNetwork::create(211).expect("lab network");
    let server = persist_server(&net, &scratch.path().join("s1"), &root, &persist, "alice");
    let export = "/var/lib/walt/nodes/node1/persist";
    let url = |path: &str| format!("nfs://127.0.0.1{export}{path}");

    // 1 MiB written and read back with libnfs, timed.
    let data: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let local = scratch.path().join("data.bin");
    std::fs::write(&local, &data).expect("local file");
    let started = std::time::Instant::now();
    let (ok, out) = output(in_netns(&net, "nfs-cp").arg(&local).arg(url("/data.bin")));
    let write = started.elapsed();
    assert!(ok, "nfs-cp to /persist: {out}");
    let started = std::time::Instant::now();
    let read = in_netns(&net, "nfs-cat")
        .arg(url("/data.bin"))
        .output()
        .expect("nfs-cat");
    let read_time = started.elapsed();
    assert!(
        read.status.success() && read.stdout == data,
        "nfs-cat of what was written: {}",
        String::from_utf8_lossy(&read.stderr)
    );
    let on_host = persist.join("node1/alice");
    assert_eq!(
        std::fs::read(on_host.join("data.bin")).expect("on the host"),
        data,
        "kept in --persist-dir/<device>/<tenant>"
    );

    // The raw client, from node1's address: a directory, then libnfs copies into it.
    let server_addr: std::net::SocketAddr = "127.0.0.1:2049".parse().expect("address");
    let mut node1 = NfsClient::connect_in(&net.netns, std::net::Ipv4Addr::LOCALHOST, server_addr);
    let top = node1.mount(export).expect("node1 mounts its /persist");
    let sub = node1.mkdir(&top, b"sub").expect("mkdir");
    let (ok, out) = output(in_netns(&net, "nfs-cp").arg(&outside).arg(url("/sub/note")));
    assert!(ok, "nfs-cp into a directory made over NFS: {out}");
    let (ok, listing) = output(in_netns(&net, "nfs-ls").arg(url("")));
    assert!(
        ok && listing.contains("data.bin") && listing.contains("sub"),
        "nfs-ls: {listing}"
    );
    assert!(on_host.join("sub/note").is_file(), "on the host");

    // Escapes: links pointing out are made (their text is the node's business) but never followed
    // on the server; `..` stays at the top; names with `..` or `/` are refused.
    assert_eq!(node1.symlink(&top, b"up", b"../../../outside"), 0, "SYMLINK");
    assert_eq!(
        node1.symlink(&top, b"abs", outside.to_str().expect("path").as_bytes()),
        0,
        "SYMLINK"
    );
    let (ok, out) = output(in_netns(&net, "nfs-cat").arg(url("/up")));
    assert!(
        !ok && !out.contains("the host's"),
        "reading through a link that points out: {out}"
    );
    let (ok, out) = output(in_netns(&net, "nfs-cat").arg(url("/abs")));
    assert!(
        !ok && !out.contains("the host's"),
        "reading through an absolute link: {out}"
    );
    let (ok, out) = output(in_netns(&net, "nfs-cp").arg(&local).arg(url("/up")));
    assert!(!ok, "writing through a link that points out: {out}");
    assert_eq!(
        std::fs::read_to_string(&outside).expect("host file"),
        "the host's, not the node's\n",
        "untouched"
    );
    let (_, up_id) = node1.lookup(&top, b"up").expect("the link itself");
    let link = node1.lookup(&top, b"up").expect("link").0;
    assert_ne!(
        node1.readdir(&link).err(),
        None,
        "a link is not listed as a directory"
    );
    let top_id = node1.getattr(&top).expect("getattr");
    assert_eq!(
        node1.lookup(&top, b"..").map(|(_, id)| id),
        Ok(top_id),
        "`..` of the top is the top"
    );
    assert_ne!(up_id, top_id);
    assert_eq!(node1.create(&top, b"../escaped"), NFS3ERR_ACCES, "a name with ..");
    assert_eq!(node1.create(&top, b"a/b"), NFS3ERR_ACCES, "a name with /");
    assert_eq!(node1.mkdir(&top, b"..").err(), Some(NFS3ERR_ACCES));
    assert!(
        node1.mount(&format!("{export}/../fs")).is_err(),
        "MOUNT of a path going up"
    );
    assert!(!scratch.path().join("escaped").exists() && !persist.join("node1/escaped").exists());

    // Another device (node2, at 127.0.0.2): node1's /persist is refused, by MOUNT and by handle.
    let mut node2 = NfsClient::connect_in(&net.netns, std::net::Ipv4Addr::new(127, 0, 0, 2), server_addr);
    assert_eq!(node2.mount(export).err(), Some(NFS3ERR_ACCES), "MNT3ERR_ACCES");
    assert_eq!(
        node2.getattr(&top).err(),
        Some(NFS3ERR_ACCES),
        "node1's handle from node2"
    );
    assert_eq!(node2.create(&sub, b"planted"), NFS3ERR_ACCES);
    assert_eq!(node2.readdir(&top).err(), Some(NFS3ERR_ACCES));
    let own = node2
        .mount("/var/lib/walt/nodes/node2/persist")
        .expect("node2's own");
    assert_eq!(
        node2.readdir(&own).expect("listed"),
        [".", ".."],
        "node2's is its own, empty"
    );
    let (ok, refused) =
        output(in_netns(&net, "nfs-ls").arg("nfs://127.0.0.1/var/lib/walt/nodes/node2/persist"));
    assert!(
        !ok && refused.contains("MNT3ERR_ACCES"),
        "node2's /persist from node1's address: {refused}"
    );
    assert!(
        server
            .journal()
            .iter()
            .any(|e| e["protocol"] == "nfs-mount-persist"
                && e["refused"]
                    .as_str()
                    .is_some_and(|why| why.contains("only the device at 127.0.0.2"))),
        "the journal says why"
    );

    // The quota (3 MiB, 1 MiB used): a 4 MiB copy fails, the directory stays within it.
    let big = scratch.path().join("big.bin");
    std::fs::write(&big, vec![7u8; 4 << 20]).expect("big file");
    let (ok, out) = output(in_netns(&net, "nfs-cp").arg(&big).arg(url("/big.bin")));
    assert!(!ok, "a copy past the quota fails: {out}");
    let size = std::fs::metadata(on_host.join("big.bin")).map_or(0, |m| m.len());
    assert!(
        size + data.len() as u64 <= 3 << 20,
        "within the quota: {size} bytes"
    );
    assert_eq!(node1.remove(&top, b"big.bin"), 0, "REMOVE");
    assert!(!on_host.join("big.bin").exists(), "removed on the host");
    drop(node1);
    drop(node2);
    drop(server);

    // Lent to bob: node1's /persist is bob's, empty; alice's handles are refused.
    let server = persist_server(&net, &scratch.path().join("s2"), &root, &persist, "bob");
    let mut node1 = NfsClient::connect_in(&net.netns, std::net::Ipv4Addr::LOCALHOST, server_addr);
    let bobs = node1.mount(export).expect("bob's /persist");
    assert_eq!(
        node1.readdir(&bobs).expect("listed"),
        [".", ".."],
        "another tenant finds it empty"
    );
    assert_eq!(
        node1.getattr(&sub).err(),
        Some(NFS3ERR_STALE),
        "alice's handle, under bob"
    );
    let (ok, out) = output(in_netns(&net, "nfs-cat").arg(url("/data.bin")));
    assert!(!ok, "alice's file under bob: {out}");
    assert!(
        persist.join("node1/bob").is_dir() && on_host.join("data.bin").is_file(),
        "alice's is kept"
    );
    assert!(
        server
            .journal()
            .iter()
            .any(|e| e["protocol"] == "nfs-mount-persist" && e["tenant"] == "bob")
    );
    drop(node1);
    drop(server);

    // Lent back to alice: her files, and her handles from before the restarts (found again by
    // inode), work.
    let _server = persist_server(&net, &scratch.path().join("s3"), &root, &persist, "alice");
    let mut node1 = NfsClient::connect_in(&net.netns, std::net::Ipv4Addr::LOCALHOST, server_addr);
    let note_id = std::fs::metadata(on_host.join("sub"))
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .expect("sub");
    assert_eq!(
        node1.getattr(&sub),
        Ok(note_id),
        "a handle from before two restarts"
    );
    assert_eq!(node1.readdir(&sub).expect("listed"), [".", "..", "note"]);
    let read = in_netns(&net, "nfs-cat")
        .arg(url("/data.bin"))
        .output()
        .expect("nfs-cat");
    assert!(
        read.status.success() && read.stdout == data,
        "alice's data is back"
    );
    let mib = |d: Duration| 1.0 / d.as_secs_f64();
    println!(
        "figures: /persist over libnfs: 1 MiB written (nfs-cp) in {:.3} s ({:.1} MiB/s), read (nfs-cat) in {:.3} s ({:.1} MiB/s)",
        write.as_secs_f64(),
        mib(write),
        read_time.as_secs_f64(),
        mib(read_time)
    );
}

/// A new ed25519 key pair at `path` (`path.pub` beside it), made with `ssh-keygen`; `path`.
fn keygen(path: &std::path::Path, comment: &str) -> std::path::PathBuf {
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path))
    .expect("ssh-keygen");
    path.to_path_buf()
}

/// The VM node's image, pushed to `registry` as `reference` (one layer, labelled for [`MODEL`]):
/// WalT's boot layout from Debian's kernel, busybox and the host's `sshd` with a host key of its
/// own and no authorized key (the boot service serves the device's), no `walt-init`, and
/// `/etc/delete-me` for a node to delete; its layout (image `vm`) and digest.
fn push_vm_image(scratch: &std::path::Path, registry: &Registry, reference: &str) -> (OciLayout, String) {
    push_vm_image_for(scratch, registry, reference, Arch::Amd64)
}

/// [`push_vm_image`] for VM nodes of `arch` (arm64: Debian's arm64 kernel, busybox and OpenSSH,
/// `/boot/qemu-arm-64/start.uboot`).
fn push_vm_image_for(
    scratch: &std::path::Path,
    registry: &Registry,
    reference: &str,
    arch: Arch,
) -> (OciLayout, String) {
    let root = scratch.join("image-root");
    vm_node_os_root_for(&root, arch).expect("image root");
    std::fs::write(root.join("etc/delete-me"), "deleted on the node, then saved\n")
        .expect("a file to delete");
    let layout = vm_node_os_image_for(&root, arch).expect("image layout");
    let digest = layout.push("vm", registry, reference).expect("push");
    (layout, digest)
}

#[test]
fn vm_node_network_boots_its_image() {
    require_root().expect("root");
    let _vm = one_vm_at_a_time();
    let scratch = tempfile::tempdir().expect("scratch dir");
    let client_key = keygen(&scratch.path().join("id_ed25519"), "client");
    let host_key = keygen(&scratch.path().join("device_host_key"), "vm1");
    let host_public = std::fs::read_to_string(host_key.with_extension("pub")).expect("host public key");
    let registry = Registry::start().expect("registry");
    let (_, digest) = push_vm_image(scratch.path(), &registry, "netboot/vm:latest");
    let net = LabNetwork::create(202).expect("lab network");
    let persist = scratch.path().join("persist");
    let device = format!(
        "mac={MAC},ip={},name=vm1,model={MODEL},image={},host-key={},tenant=alice",
        net.device_ip(0),
        registry.reference("netboot/vm:latest"),
        host_key.display()
    );
    let server = BootServer::start(
        &net,
        scratch.path(),
        Some(&registry),
        &[
            "--device".into(),
            device,
            "--persist-dir".into(),
            persist.display().to_string(),
            "--listen".into(),
            net.server.to_string(),
            "--dhcp".into(),
            "authoritative".into(),
            "--dhcp-interface".into(),
            "br0".into(),
            "--authorized-keys".into(),
            client_key.with_extension("pub").display().to_string(),
            "--status-listen".into(),
            STATUS.into(),
        ],
    );
    let known_hosts = scratch.path().join("known_hosts");
    std::fs::write(&known_hosts, format!("{} {}", net.device_ip(0), host_public)).expect("known_hosts");

    let mut vm = VmNode::power_on(&net, MAC, scratch.path()).expect("power on");
    let booted = vm
        .wait_console(BOOTED_MARKER, Duration::from_mins(5))
        .expect("the VM boots");
    let console = vm.console();
    let marker = console
        .lines()
        .find(|l| l.contains(BOOTED_MARKER))
        .unwrap_or_default()
        .to_string();
    assert!(
        marker.contains("vm1"),
        "the host name is the node name from DHCP: {marker}"
    );
    assert!(
        marker.contains(&digest),
        "the node reads the digest it booted from its top layer: {marker}"
    );

    // SSH into the node: its root is the image over NFS, read-only, under a RAM overlay whose upper
    // dir is at the WalT path.
    let ssh = |command: &str| {
        output(
            in_netns(&net, "ssh")
                .arg("-i")
                .arg(&client_key)
                .args(["-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes"])
                .arg("-o")
                .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
                .args(["-o", "ConnectTimeout=5", "-o", "LogLevel=ERROR"])
                .arg(format!("root@{}", net.device_ip(0)))
                .arg(command),
        )
    };
    let ssh_ready = walt_tests::wait::Wait::new("sshd on the VM node", Duration::from_mins(2))
        .every(Duration::from_millis(250))
        .until(|| ssh("true").0);
    ssh_ready.unwrap_or_else(|e| panic!("{e}: {}", vm.console()));
    let ssh_at = vm.since_power_on();
    let (ok, mounts) = ssh(
        "cat /proc/mounts; echo changed > /root/note; ls /run/walt/rootfs/mnt/fs_rw/root; cat /run/uptime-ready",
    );
    assert!(ok, "ssh: {mounts}");
    assert!(
        mounts.contains("overlay / overlay"),
        "the root is the RAM overlay: {mounts}"
    );
    assert!(
        mounts.contains(&format!("/var/lib/walt/nodes/{MAC}/fs")) && mounts.contains(" nfs ro,"),
        "the image root is mounted read-only over NFS: {mounts}"
    );
    assert!(
        mounts.contains("\nnote\n") && mounts.contains("booted"),
        "changes land in the upper dir at the WalT path: {mounts}"
    );
    // /persist: the device's directory for its tenant, read-write over NFS; what the Linux client
    // does there (create, write, rename, hard and symbolic links, remove, a directory) lands on
    // the boot service's host, and a 1 MiB write and read are timed on the node.
    assert!(
        mounts.contains(&format!("/var/lib/walt/nodes/{MAC}/persist /persist nfs rw,")),
        "/persist is mounted read-write over NFS: {mounts}"
    );
    let (ok, out) = ssh(
        "cd /persist && echo kept-across-boots > note && mkdir d && echo x > d/f && mv d/f d/g && ln d/g d/h \
         && ln -s note link && rm d/h && chmod 600 note && ls -l && \
         dd if=/dev/urandom of=/root/mib bs=1024 count=1024 2>/dev/null && \
         a=$(cut -d' ' -f1 /proc/uptime) && cp /root/mib mib && sync && b=$(cut -d' ' -f1 /proc/uptime) && \
         echo 3 > /proc/sys/vm/drop_caches && cmp /root/mib mib && c=$(cut -d' ' -f1 /proc/uptime) && \
         echo \"uptimes $a $b $c\" && rm mib",
    );
    assert!(ok, "working in /persist: {out}");
    let on_host = persist.join("vm1/alice");
    assert_eq!(
        std::fs::read_to_string(on_host.join("note")).expect("the note on the host"),
        "kept-across-boots\n"
    );
    assert!(on_host.join("d/g").is_file() && !on_host.join("d/h").exists() && !on_host.join("mib").exists());
    assert_eq!(
        std::fs::read_link(on_host.join("link")).expect("a symlink on the host"),
        std::path::Path::new("note")
    );
    // The node's uptime (10 ms steps) before the write, after it, after the read.
    let uptimes: Vec<f64> = out
        .lines()
        .find_map(|l| l.strip_prefix("uptimes "))
        .map(|l| l.split_whitespace().filter_map(|t| t.parse().ok()).collect())
        .unwrap_or_default();
    assert_eq!(uptimes.len(), 3, "{out}");
    let (persist_write, persist_read) = (uptimes[1] - uptimes[0], uptimes[2] - uptimes[1]);
    let (ok, clock) = ssh("date +%s");
    let clock: u64 = clock
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("date: {clock} ({ok})"));
    assert!(
        clock.abs_diff(unix_now()) < 120,
        "the clock (2001 at power-on) was set by the boot service: {clock}"
    );

    // The boot notification: the node says which digest it booted, and it is the one mounted.
    let verified = walt_tests::wait::Wait::new("the boot notification", Duration::from_mins(1))
        .every(Duration::from_millis(500))
        .until(|| boot_of(&net, MAC)["verdict"]["reason"] == "Verified");
    verified.unwrap_or_else(|e| panic!("{e}: {}", boot_of(&net, MAC)));
    let record = boot_of(&net, MAC);
    assert_eq!(record["verdict"]["digest"], digest.as_str(), "{record}");
    assert_eq!(
        record["up"], true,
        "the notification connection is held: {record}"
    );

    let journal = server.journal();
    let first = |protocol: &str, path: &str| {
        journal
            .iter()
            .find(|e| e["protocol"] == protocol && e["path"].as_str().is_some_and(|p| p.contains(path)))
            .unwrap_or_else(|| panic!("no {protocol} {path} in the journal: {journal:?}"))
    };
    for (protocol, path) in [
        ("dhcp", "ack"),
        ("http", "start.ipxe"),
        ("http", "vmlinuz"),
        ("http", "initrd.img"),
        ("nfs-mount", MAC),
        ("boot-notification", "booted"),
    ] {
        let entry = first(protocol, path);
        assert_eq!(
            entry["digest"],
            digest.as_str(),
            "{protocol} {path} served the pushed image: {entry}"
        );
        assert_eq!(entry["mac"], MAC, "{entry}");
    }
    let at = |protocol: &str, path: &str| first(protocol, path)["at_ms"].as_u64().unwrap_or_default();
    assert_eq!(first("boot-notification", "booted")["reported"], digest.as_str());
    assert!(
        journal
            .iter()
            .any(|e| e["protocol"] == "node-api" && e["path"] == "sync_clock" && e["mac"] == MAC),
        "the clock sync is journaled: {journal:?}"
    );
    let dhcp = at("dhcp", "offer");
    let kernel_at = at("http", "vmlinuz");
    let mount = at("nfs-mount", MAC);
    let notified = at("boot-notification", "booted");
    println!(
        "figures: power-on → booted marker {:.1} s, → SSH ready {:.1} s; DHCP offer → kernel request {:.1} s; kernel request → NFS mount {:.1} s; \
         NFS mount → boot notification {:.1} s; /persist on the node (TCG): 1 MiB written + synced in {persist_write:.3} s, \
         read back (caches dropped) in {persist_read:.3} s; console marker: {marker}",
        booted.as_secs_f64(),
        ssh_at.as_secs_f64(),
        (kernel_at.saturating_sub(dhcp)) as f64 / 1000.0,
        (mount.saturating_sub(kernel_at)) as f64 / 1000.0,
        (notified.saturating_sub(mount)) as f64 / 1000.0,
    );

    // A change on the node (a new file, a deleted one), saved as a new image over SSH.
    let (ok, out) = ssh("echo kept > /root/saved-note && rm /etc/delete-me");
    assert!(ok, "the change: {out}");
    let saved = save_node(&net, &client_key, &host_key.with_extension("pub"), &registry);
    assert_ne!(saved, digest);
    drop(vm);

    // A device nobody registered: DHCP records it and serves nothing.
    let stranger = "52:54:00:aa:00:99";
    let stranger_vm = VmNode::power_on(&net, stranger, scratch.path()).expect("power on");
    let refused = walt_tests::wait::Wait::new("the unknown device's DHCP request", Duration::from_secs(90))
        .every(Duration::from_millis(200))
        .until(|| {
            server.journal().iter().any(|e| {
                e["mac"] == stranger
                    && e["refused"]
                        .as_str()
                        .is_some_and(|r| r.contains("unknown device"))
            })
        });
    refused.unwrap_or_else(|e| panic!("{e}: {:?}", server.journal()));
    assert!(
        !server
            .journal()
            .iter()
            .any(|e| e["mac"] == stranger && e["digest"].is_string()),
        "nothing is served to an unknown device"
    );
    drop(stranger_vm);
    drop(server);

    // The node boots the saved image (its binding moved to the saved tag: a new boot service): the
    // verified digest is the saved one, and the node finds its change.
    let second = scratch.path().join("second");
    std::fs::create_dir_all(&second).expect("second dir");
    let device = |tenant: &str| {
        format!(
            "mac={MAC},ip={},name=vm1,model={MODEL},image={},host-key={},tenant={tenant}",
            net.device_ip(0),
            registry.reference("netboot/vm:saved"),
            host_key.display()
        )
    };
    let server = BootServer::start(
        &net,
        &second,
        Some(&registry),
        &[
            "--device".into(),
            device("alice"),
            "--persist-dir".into(),
            persist.display().to_string(),
            "--listen".into(),
            net.server.to_string(),
            "--dhcp".into(),
            "authoritative".into(),
            "--dhcp-interface".into(),
            "br0".into(),
            "--authorized-keys".into(),
            client_key.with_extension("pub").display().to_string(),
            "--status-listen".into(),
            STATUS.into(),
        ],
    );
    let mut vm = VmNode::power_on(&net, MAC, &second).expect("power on again");
    let rebooted = vm
        .wait_console(BOOTED_MARKER, Duration::from_mins(5))
        .expect("the VM boots the saved image");
    walt_tests::wait::Wait::new("the saved image's boot notification", Duration::from_mins(2))
        .every(Duration::from_millis(500))
        .until(|| boot_of(&net, MAC)["verdict"]["digest"] == saved.as_str())
        .unwrap_or_else(|e| panic!("{e}: {}\n{}", boot_of(&net, MAC), vm.console()));
    let (ok, found) = ssh_to(
        &net,
        &client_key,
        &known_hosts,
        "cat /root/saved-note /root/note; test -e /etc/delete-me && echo still-there || echo deleted; cat /etc/walt/image-digest",
    );
    assert!(ok, "ssh to the rebooted node: {found}");
    assert_eq!(
        found,
        format!("kept\nchanged\ndeleted\n{saved}\n"),
        "the node runs the saved image with the changes (deletion included)"
    );
    let (ok, found) = ssh_to(
        &net,
        &client_key,
        &known_hosts,
        "cat /persist/note; ls /persist/d",
    );
    assert_eq!(
        (ok, found.as_str()),
        (true, "kept-across-boots\ng\n"),
        "/persist is kept across the power cycle (and out of the saved image's RAM overlay)"
    );

    // The device lent to tenant bob (a new binding: the boot service restarted): the handles of
    // alice's directory are refused, and the device mounting /persist again finds bob's, empty.
    // The same layer cache (the node's root handles name its paths: they stay valid), the former
    // log moved aside (readiness is read from the new one).
    drop(server);
    std::fs::rename(
        second.join("boot-server.log"),
        second.join("boot-server.before-bob.log"),
    )
    .expect("move the log aside");
    let _server = BootServer::start(
        &net,
        &second,
        Some(&registry),
        &[
            "--device".into(),
            device("bob"),
            "--persist-dir".into(),
            persist.display().to_string(),
            "--listen".into(),
            net.server.to_string(),
            "--authorized-keys".into(),
            client_key.with_extension("pub").display().to_string(),
        ],
    );
    let server_ip = net.server;
    let (ok, found) = ssh_to(
        &net,
        &client_key,
        &known_hosts,
        &format!(
            "cat /persist/note 2>&1; umount /persist && \
             mount -t nfs -o rw,vers=3,proto=tcp,mountproto=tcp,nolock,addr={server_ip},mountaddr={server_ip} \
             {server_ip}:/var/lib/walt/nodes/{MAC}/persist /persist && echo mounted && ls -A /persist && echo bobs > /persist/bob-note"
        ),
    );
    assert!(ok, "remounting /persist as bob's: {found}");
    let mut lines = found.lines();
    assert!(
        lines
            .next()
            .is_some_and(|l| l.contains("Stale file handle") || l.contains("Permission denied")),
        "alice's handles are refused once the device is bob's: {found}"
    );
    assert_eq!(
        lines.collect::<Vec<_>>(),
        ["mounted"],
        "bob's /persist is empty: {found}"
    );
    assert!(
        persist.join("vm1/bob/bob-note").is_file(),
        "bob's directory on the host"
    );
    assert!(on_host.join("note").is_file(), "alice's is kept for her");
    println!(
        "figures: boot of the saved image: power-on → booted marker {:.1} s",
        rebooted.as_secs_f64()
    );
}

/// An arm64 VM node network-boots like a U-Boot board: `walt-operator vm --arch arm64 --accel tcg`
/// (`qemu-system-aarch64 -machine virt`, Debian's U-Boot as its firmware) on the lab bridge; U-Boot's
/// default boot asks DHCP (vendor class `U-Boot.armv8`), then `boot.scr.uimg` over TFTP, which the
/// boot service answers with the image's `/boot/qemu-arm-64/start.uboot` (a uImage script made with
/// `mkimage`); that script loads Debian's arm64 kernel and the initramfs over TFTP and boots them;
/// the initramfs mounts the root over NFSv3, walt's `walt-init` notifies the boot. Checked like the
/// amd64 VM: the booted marker with the digest, SSH to the device's host key (Debian's arm64 OpenSSH
/// answering `uname -m` aarch64), the boot record verified, the journal naming the pushed digest for
/// DHCP, the TFTP files and the NFS mount. Prints power-on → verified.
#[test]
fn arm64_vm_node_network_boots_its_image_through_u_boot() {
    require_root().expect("root");
    let _vm = one_vm_at_a_time();
    let scratch = tempfile::tempdir().expect("scratch dir");
    let client_key = keygen(&scratch.path().join("id_ed25519"), "client");
    let host_key = keygen(&scratch.path().join("device_host_key"), "arm1");
    let host_public = std::fs::read_to_string(host_key.with_extension("pub")).expect("host public key");
    let registry = Registry::start().expect("registry");
    let (_, digest) = push_vm_image_for(scratch.path(), &registry, "netboot/arm:latest", Arch::Arm64);
    let net = LabNetwork::create(211).expect("lab network");
    let mac = "52:54:00:aa:64:01";
    let device = format!(
        "mac={mac},ip={},name=arm1,model={MODEL_ARM64},image={},host-key={}",
        net.device_ip(0),
        registry.reference("netboot/arm:latest"),
        host_key.display()
    );
    let server = BootServer::start(
        &net,
        scratch.path(),
        Some(&registry),
        &[
            "--device".into(),
            device,
            "--listen".into(),
            net.server.to_string(),
            "--dhcp".into(),
            "authoritative".into(),
            "--dhcp-interface".into(),
            "br0".into(),
            "--authorized-keys".into(),
            client_key.with_extension("pub").display().to_string(),
            "--status-listen".into(),
            STATUS.into(),
        ],
    );
    let known_hosts = scratch.path().join("known_hosts");
    std::fs::write(&known_hosts, format!("{} {}", net.device_ip(0), host_public)).expect("known_hosts");

    let mut vm = VmNode::power_on_arch(&net, mac, scratch.path(), Arch::Arm64).expect("power on");
    let booted = vm
        .wait_console(BOOTED_MARKER, Duration::from_mins(5))
        .expect("the arm64 VM boots");
    let console = vm.console();
    assert!(
        console.contains("U-Boot") && console.contains("boot.scr.uimg"),
        "U-Boot booted it, asking its distro script: {console}"
    );
    let marker = console
        .lines()
        .find(|l| l.contains(BOOTED_MARKER))
        .unwrap_or_default()
        .to_string();
    assert!(
        marker.contains("arm1") && marker.contains(&digest),
        "the host name from DHCP, the digest from the top layer: {marker}"
    );
    let verified = walt_tests::wait::Wait::new("the boot notification", Duration::from_mins(2))
        .every(Duration::from_millis(250))
        .until(|| boot_of(&net, mac)["verdict"]["reason"] == "Verified");
    verified.unwrap_or_else(|e| panic!("{e}: {}", boot_of(&net, mac)));
    let verified_at = vm.since_power_on();
    let record = boot_of(&net, mac);
    assert_eq!(record["verdict"]["digest"], digest.as_str(), "{record}");

    let ssh_ready = walt_tests::wait::Wait::new("sshd on the arm64 VM node", Duration::from_mins(2))
        .every(Duration::from_millis(250))
        .until(|| ssh_to(&net, &client_key, &known_hosts, "true").0);
    ssh_ready.unwrap_or_else(|e| panic!("{e}: {}", vm.console()));
    let ssh_at = vm.since_power_on();
    let (ok, out) = ssh_to(
        &net,
        &client_key,
        &known_hosts,
        "uname -m; cat /proc/mounts; cat /etc/walt/image-digest",
    );
    assert!(ok, "ssh: {out}");
    assert!(out.starts_with("aarch64\n"), "an arm64 kernel runs it: {out}");
    assert!(
        out.contains("overlay / overlay")
            && out.contains(&format!("/var/lib/walt/nodes/{mac}/fs"))
            && out.contains(" nfs ro,"),
        "the RAM overlay over the read-only NFS root: {out}"
    );
    assert!(out.trim_end().ends_with(&digest), "{out}");

    let journal = server.journal();
    let first = |protocol: &str, path: &str| {
        journal
            .iter()
            .find(|e| {
                e["protocol"] == protocol
                    && e["refused"].is_null()
                    && e["path"].as_str().is_some_and(|p| p.contains(path))
            })
            .unwrap_or_else(|| panic!("no {protocol} {path} in the journal: {journal:?}"))
    };
    for (protocol, path) in [
        ("dhcp", "start.uboot"),
        ("tftp", "boot.scr.uimg"),
        ("tftp", "vmlinuz"),
        ("tftp", "initrd.img"),
        ("nfs-mount", mac),
        ("boot-notification", "booted"),
    ] {
        let entry = first(protocol, path);
        assert_eq!(entry["digest"], digest.as_str(), "{protocol} {path}: {entry}");
        assert_eq!(entry["mac"], mac, "{entry}");
    }
    let at = |protocol: &str, path: &str| first(protocol, path)["at_ms"].as_u64().unwrap_or_default();
    let (dhcp, script, kernel, mount, notified) = (
        at("dhcp", "start.uboot"),
        at("tftp", "boot.scr.uimg"),
        at("tftp", "vmlinuz"),
        at("nfs-mount", mac),
        at("boot-notification", "booted"),
    );
    let secs = |from: u64, to: u64| to.saturating_sub(from) as f64 / 1000.0;
    println!(
        "figures (arm64, TCG): power-on → booted marker {:.1} s, → verified {:.1} s, → SSH ready {:.1} s; \
         DHCP offer → boot script {:.1} s → kernel request {:.1} s → NFS mount {:.1} s → boot notification {:.1} s; {marker}",
        booted.as_secs_f64(),
        verified_at.as_secs_f64(),
        ssh_at.as_secs_f64(),
        secs(dhcp, script),
        secs(script, kernel),
        secs(kernel, mount),
        secs(mount, notified),
    );
}

/// The cluster tier's VM node image (what the chart's `vmNodes.image` runs) powers both machines:
/// `qemu-system-x86_64` with its TCG module and the iPXE ROMs, `qemu-system-aarch64` and Debian's
/// U-Boot for the arm64 `virt` board, beside the static `walt-operator`.
#[test]
fn the_vm_node_image_holds_the_amd64_and_the_arm64_machines() {
    let files = walt_tests::netboot::vm_node_image_files(&walt_tests::operator::operator_binary())
        .expect("the VM node image's files");
    let paths: Vec<&str> = files.iter().map(walt_tests::image_build::Entry::path).collect();
    for wanted in [
        "usr/bin/walt-operator",
        "usr/bin/qemu-system-x86_64",
        "usr/lib/x86_64-linux-gnu/qemu/accel-tcg-x86_64.so",
        "usr/bin/qemu-system-aarch64",
        "usr/lib/u-boot/qemu_arm64/u-boot.bin",
    ] {
        assert!(
            paths.contains(&wanted),
            "{wanted} in the VM node image: {paths:?}"
        );
    }
    assert!(
        paths.iter().any(|p| p.ends_with("efi-virtio.rom")),
        "the virtio NIC's iPXE ROM: {paths:?}"
    );
}

/// The operator's VM node flags of the control plane tests: an image no kubelet pulls (the test runs
/// the pod's arguments itself), the lab bridge of the test's network, TCG.
const VM_OPERATOR_ARGS: [&str; 6] = [
    "--vm-image",
    "127.0.0.1:1/walt/vm:test",
    "--vm-network",
    "default=br0",
    "--vm-accel",
    "tcg",
];

/// Control plane tier: the operator powers an **arm64 VM node** from a `u-boot` VM slot Device
/// (model `qemu-arm-64`) for a Node `virtual: {kind: vm, architecture: arm64}`: its pod's arguments
/// add `--arch arm64`; run as the kubelet would, the VM (qemu-system-aarch64, U-Boot) network-boots
/// the arm64 image from the boot service fed by the cluster, and the Node's booted image is verified
/// and Ready.
#[test]
fn operator_powers_an_arm64_vm_node_from_a_u_boot_slot() {
    require_root().expect("root");
    let _vm = one_vm_at_a_time();
    let lab = OperatorLab::start_arch(
        212,
        HostKeys::Pinned,
        ", virtual: {kind: vm, architecture: arm64, memory: 512Mi}",
        &VM_OPERATOR_ARGS,
        Arch::Arm64,
    );
    let set_up = lab.started.elapsed();
    let runtime = format!("walt-run-{}", lab.ns);
    lab.wait_served();
    let (_pod, args) = vm_pod(&lab, &runtime, None);
    assert_eq!(
        args.join(" "),
        format!(
            "vm --mac {} --bridge br0 --memory 512Mi --cpus 1 --accel tcg --arch arm64",
            lab.mac
        ),
        "the VM runner's arguments"
    );
    let mut vm = VmNode::power_on_as_pod(&lab.net, &args, lab.scratch.path()).expect("power on");
    let booted = vm
        .wait_console(BOOTED_MARKER, Duration::from_mins(5))
        .unwrap_or_else(|e| panic!("{e}\nboot server: {:?}", lab.server.journal()));
    let console = vm.console();
    assert!(
        console.contains(&format!("walt-operator vm: {} on br0", lab.mac))
            && console.contains("arm64")
            && console.contains("U-Boot"),
        "U-Boot on an arm64 VM booted it: {console}"
    );
    let verified = lab.verified_as(&vm, &lab.digest);
    lab.wait_ready();
    println!(
        "figures (arm64 VM node under the operator, TCG): set-up {:.1} s; power-on → booted marker {:.1} s, → bootedImage verified {:.1} s",
        set_up.as_secs_f64(),
        booted.as_secs_f64(),
        verified.as_secs_f64(),
    );
}

/// `ssh root@<device 0>` inside `net` with the client key, checking the device's host key.
fn ssh_to(
    net: &LabNetwork,
    key: &std::path::Path,
    known_hosts: &std::path::Path,
    command: &str,
) -> (bool, String) {
    output(
        in_netns(net, "ssh")
            .arg("-i")
            .arg(key)
            .args(["-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes"])
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
            .args(["-o", "ConnectTimeout=5", "-o", "LogLevel=ERROR"])
            .arg(format!("root@{}", net.device_ip(0)))
            .arg(command),
    )
}

/// Saves the changes of the node at device 0 of `net` as `netboot/vm:saved` on top of
/// `netboot/vm:latest` (`walt-operator save` over SSH through the lab namespace); the new digest.
fn save_node(
    net: &LabNetwork,
    key: &std::path::Path,
    host_key: &std::path::Path,
    registry: &Registry,
) -> String {
    let out = Command::new(walt_tests::operator::operator_binary())
        .args([
            "save",
            "--node",
            &format!("root@{}", net.device_ip(0)),
            "--identity",
        ])
        .arg(key)
        .arg("--host-key")
        .arg(host_key)
        .args([
            "--proxy-command",
            &format!("ip netns exec {} socat - TCP:%h:%p", net.netns),
        ])
        .args(["--base", &registry.reference("netboot/vm:latest")])
        .args(["--to", &registry.reference("netboot/vm:saved")])
        .args(["--insecure-registry", &registry.host()])
        .output()
        .expect("walt-operator save");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "walt-operator save: {stderr}");
    assert!(stderr.contains("1 deleted"), "the deletion is saved: {stderr}");
    let digest = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(digest.starts_with("sha256:"), "save printed {digest:?}");
    digest
}

/// Side by side, in one run (`cargo test -p walt-tests --test netboot bench_vm -- --ignored --nocapture`):
/// power-on → booted marker → SSH ready of the same VM node booted by walt's boot service vs Debian's
/// `dnsmasq` (DHCP + TFTP) + `nfs-ganesha` serving the unpacked image (alternated, 2 rounds each).
#[test]
#[ignore = "benchmark: run with --ignored"]
fn bench_vm_boot_vs_dnsmasq_and_ganesha() {
    require_root().expect("root");
    let scratch = tempfile::tempdir().expect("scratch dir");
    let kernel = debian_kernel().expect("Debian kernel");
    let root = scratch.path().join("image-root");
    vm_image_root(&root, &kernel).expect("image root");
    let client_key = scratch.path().join("id_ed25519");
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&client_key))
    .expect("client key");
    let public = std::fs::read_to_string(client_key.with_extension("pub")).expect("public key");
    install_host_sshd(&root, Some(public.trim())).expect("sshd in the image");
    let registry = Registry::start().expect("registry");
    let layout = OciLayout::new().expect("layout");
    layout.new_image("empty", Arch::Amd64).expect("new image");
    layout
        .add_layer_from_dir("empty", "vm", &root)
        .expect("image layer");
    layout.push("vm", &registry, "netboot/vm:latest").expect("push");
    // The reference serves the root as it is: it needs the walt-init walt's boot service adds.
    add_plain_walt_init(&root).expect("walt-init for the reference");
    // The reference's TFTP root: the same boot files, with the NFS root at the export's own path.
    let tftp = scratch.path().join("tftp");
    std::fs::create_dir_all(&tftp).expect("tftp root");
    let boot = root.join("boot").join(MODEL);
    for file in ["vmlinuz", "initrd.img"] {
        std::fs::copy(boot.join(file), tftp.join(file)).expect("copy a boot file");
    }
    let script = std::fs::read_to_string(boot.join("start.ipxe")).expect("start.ipxe");
    let script = script.replace("/var/lib/walt/nodes/${mac}/fs", &root.display().to_string());
    std::fs::write(tftp.join("start.ipxe"), script).expect("reference start.ipxe");

    let net = LabNetwork::create(203).expect("lab network");
    let ip = net.device_ip(0);
    let ssh_ok = |net: &LabNetwork| {
        output(
            in_netns(net, "ssh")
                .arg("-i")
                .arg(&client_key)
                .args([
                    "-o",
                    "StrictHostKeyChecking=no",
                    "-o",
                    "UserKnownHostsFile=/dev/null",
                    "-o",
                    "BatchMode=yes",
                ])
                .args(["-o", "ConnectTimeout=3", "-o", "LogLevel=ERROR"])
                .arg(format!("root@{ip}"))
                .arg("cat /run/uptime-ready"),
        )
        .0
    };
    let boot_once = |net: &LabNetwork, label: &str| {
        let mut vm = VmNode::power_on(net, MAC, scratch.path()).expect("power on");
        let booted = vm
            .wait_console(BOOTED_MARKER, Duration::from_mins(5))
            .expect("boots");
        walt_tests::wait::Wait::new("SSH", Duration::from_mins(2))
            .every(Duration::from_millis(200))
            .until(|| ssh_ok(net))
            .expect("SSH ready");
        let ssh = vm.since_power_on();
        println!(
            "bench boot {label}: power-on → booted {:.1} s, → SSH ready {:.1} s",
            booted.as_secs_f64(),
            ssh.as_secs_f64()
        );
        (booted, ssh)
    };
    let mut walt = Vec::new();
    let mut reference = Vec::new();
    for _ in 0..2 {
        {
            let device = format!(
                "mac={MAC},ip={ip},name=vm1,model={MODEL},image={}",
                registry.reference("netboot/vm:latest")
            );
            let _server = BootServer::start(
                &net,
                scratch.path(),
                Some(&registry),
                &[
                    "--device".into(),
                    device,
                    "--listen".into(),
                    net.server.to_string(),
                    "--dhcp".into(),
                    "authoritative".into(),
                    "--dhcp-interface".into(),
                    "br0".into(),
                ],
            );
            walt.push(boot_once(&net, "walt"));
        }
        {
            let _reference =
                ReferenceServers::start(&net, scratch.path(), &root, Some((MAC, ip, "vm1", &tftp)))
                    .expect("dnsmasq + ganesha");
            reference.push(boot_once(&net, "dnsmasq+ganesha"));
        }
    }
    let best = |runs: &[(Duration, Duration)]| {
        let booted = runs.iter().map(|r| r.0).min().unwrap_or_default();
        let ssh = runs.iter().map(|r| r.1).min().unwrap_or_default();
        (booted.as_secs_f64(), ssh.as_secs_f64())
    };
    let (w, r) = (best(&walt), best(&reference));
    println!(
        "figures: VM boot (best of 2) walt booted {:.1} s / SSH {:.1} s; dnsmasq+ganesha booted {:.1} s / SSH {:.1} s; ratio (SSH) {:.2}×",
        w.0,
        w.1,
        r.0,
        r.1,
        w.1 / r.1
    );
}

/// NFS reads with libnfs's `nfs-cat` of a 1 GiB file and a walk (`nfs-ls -R`) of 10,000 small files,
/// the same directory served by walt's boot service and by `nfs-ganesha`, each in a fresh namespace
/// (`cargo test -p walt-tests --test netboot bench_nfs -- --ignored --nocapture`).
/// A simulated lab device booting: in its own network namespace, a veth plugged into the lab
/// bridge with its MAC, it asks DHCP for its address (busybox `udhcpc`, iPXE's user class), fetches
/// its boot file over TFTP (`tftp -b 1468`, the Raspberry Pi and U-Boot way) and its boot script over
/// HTTP (the iPXE way), mounts its root over NFS and walks it and reads what a boot reads (libnfs's
/// `nfs-ls -R` and `nfs-cat`). Exits 0 when every step worked; says which one did not otherwise.
const DEVICE_BOOT: &str = r#"set -e
server="$1"; files="$2"
cat > /tmp/udhcpc-$$.sh <<'SCRIPT'
#!/bin/sh
[ "$1" = bound ] && ip addr add "$ip/$mask" dev "$interface"
exit 0
SCRIPT
chmod +x /tmp/udhcpc-$$.sh
ip link set lo up
busybox udhcpc -i eth0 -f -q -n -t 10 -T 2 -A 1 -s /tmp/udhcpc-$$.sh -V iPXE -x 0x4d:77616c742e6e6f64652e70632d7838362d3634 >/dev/null 2>&1 || { echo "dhcp: no lease"; exit 1; }
rm -f /tmp/udhcpc-$$.sh
ip=$(ip -4 -o addr show dev eth0 | awk '{print $4}' | cut -d/ -f1)
busybox tftp -g -b 1468 -r kernel.img -l /dev/null "$server" || { echo "tftp kernel.img failed"; exit 1; }
busybox wget -q -O /dev/null "http://$server/boot/start.ipxe" || { echo "http start.ipxe failed"; exit 1; }
root="nfs://$server/var/lib/walt/nodes/$ip/fs"
n=$(nfs-ls -R "$root/usr/lib/walt-bench" | wc -l)
[ "$n" -ge "$files" ] || { echo "nfs-ls -R listed $n entries"; exit 1; }
for f in 000 050 100 150; do nfs-cat "$root/usr/lib/walt-bench/f$f" > /dev/null || { echo "nfs-cat f$f failed"; exit 1; }; done
nfs-cat "$root/etc/walt/image-digest" > /dev/null || { echo "nfs-cat image-digest failed"; exit 1; }
"#;

/// Benchmark: 100 devices booting at once from one boot service (issue 16). Each simulated device
/// ([`DEVICE_BOOT`]) runs the network part of a boot; the boot service serves the same image to
/// all, each with its own per-node layer. Prints the time from the first request until the last
/// device is done, each phase's slowest device, the boot service's peak RSS, and checks that no
/// device was refused anything (every device done, no `refused` in the journal).
#[test]
#[ignore = "benchmark: run with --ignored"]
fn bench_hundred_devices_boot_at_once() {
    use std::time::Instant;
    const DEVICES: u8 = 100;
    const FILES: usize = 200;
    require_root().expect("root");
    let scratch = tempfile::tempdir().expect("scratch dir");
    let registry = Registry::start().expect("registry");
    let layout = OciLayout::new().expect("layout");
    layout.new_image("empty", Arch::Amd64).expect("new image");
    layout
        .add_layer("empty", "v1", |root| {
            let boot = root.join(format!("boot/{MODEL}"));
            std::fs::create_dir_all(&boot)?;
            let kernel: Vec<u8> = (0..8u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
            std::fs::write(boot.join("kernel.img"), kernel)?;
            std::fs::write(boot.join("start.ipxe"), "#!ipxe\nkernel vmlinuz\nboot\n")?;
            let lib = root.join("usr/lib/walt-bench");
            std::fs::create_dir_all(&lib)?;
            for i in 0..FILES {
                std::fs::write(lib.join(format!("f{i:03}")), format!("file {i}\n").repeat(2000))?;
            }
            Ok(())
        })
        .expect("layer");
    layout.push("v1", &registry, "netboot/hundred:v1").expect("push");
    let net = LabNetwork::create(210).expect("lab network");
    let mut args: Vec<String> = [
        "--listen",
        &net.server.to_string(),
        "--dhcp",
        "authoritative",
        "--dhcp-interface",
        "br0",
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    let mac = |i: u8| format!("52:54:00:bb:00:{i:02x}");
    for i in 0..DEVICES {
        args.push("--device".into());
        args.push(format!(
            "mac={},ip={},name=d{i:03},model={MODEL},image={}",
            mac(i),
            net.device_ip(100 + i),
            registry.reference("netboot/hundred:v1")
        ));
    }
    let prepared = Instant::now();
    let server = BootServer::start(&net, scratch.path(), Some(&registry), &args);
    let ready = prepared.elapsed().as_secs_f64();
    // Each device's namespace and veth, made before the clock starts.
    let namespaces: Vec<String> = (0..DEVICES)
        .map(|i| {
            let ns = format!("{}-d{i}", net.netns);
            let host_end = format!("d{i}b");
            run(Command::new("ip").args(["netns", "add", &ns])).expect("netns");
            run(Command::new("ip").args([
                "-n", &net.netns, "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ]))
            .expect("veth");
            run(Command::new("ip").args(["-n", &ns, "link", "set", "eth0", "address", &mac(i), "up"]))
                .expect("mac");
            run(Command::new("ip").args(["-n", &net.netns, "link", "set", &host_end, "master", "br0", "up"]))
                .expect("plug");
            ns
        })
        .collect();
    let started = Instant::now();
    let children: Vec<_> = namespaces
        .iter()
        .map(|ns| {
            Command::new("ip")
                .args(["netns", "exec", ns, "sh", "-c", DEVICE_BOOT, "device"])
                .arg(net.server.to_string())
                .arg(FILES.to_string())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("a device")
        })
        .collect();
    let mut done = Vec::new();
    let mut failed = Vec::new();
    for (i, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().expect("wait");
        if out.status.success() {
            done.push(started.elapsed().as_secs_f64());
        } else {
            failed.push(format!(
                "d{i:03}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    let all = started.elapsed().as_secs_f64();
    let peak_kib = walt_tests::bench::peak_rss_kib(server.pid()).unwrap_or_default();
    for ns in &namespaces {
        let _ = Command::new("ip").args(["netns", "del", ns]).status();
    }
    let journal = server.journal();
    let refused: Vec<&serde_json::Value> = journal.iter().filter(|e| e["refused"].is_string()).collect();
    // Which phase each device reached when: the journal's first DHCP answer, TFTP, HTTP and MOUNT.
    let first_at = journal
        .iter()
        .filter_map(|e| e["at_ms"].as_u64())
        .min()
        .unwrap_or_default();
    let last_of = |protocol: &str| {
        journal
            .iter()
            .filter(|e| e["protocol"] == protocol && e["digest"].is_string())
            .filter_map(|e| e["at_ms"].as_u64())
            .max()
            .map_or(f64::NAN, |at| at.saturating_sub(first_at) as f64 / 1000.0)
    };
    println!(
        "figures: {DEVICES} devices booting at once ({FILES} files walked, 5 read, an 8 MiB boot file over TFTP each): \
         all served in {all:.2} s (the last DHCP answer at {:.2} s, TFTP {:.2} s, HTTP {:.2} s, NFS MOUNT {:.2} s after \
         the first request), {} done, {} failed, {} refused; boot service peak RSS {:.1} MiB (ready {ready:.1} s after \
         it started with {DEVICES} devices)",
        last_of("dhcp"),
        last_of("tftp"),
        last_of("http"),
        last_of("nfs-mount"),
        done.len(),
        failed.len(),
        refused.len(),
        peak_kib as f64 / 1024.0,
    );
    assert!(
        failed.is_empty(),
        "devices that did not boot: {failed:#?}\n{}",
        server.log()
    );
    assert!(refused.is_empty(), "refused: {refused:#?}");
}

#[test]
#[ignore = "benchmark: run with --ignored"]
fn bench_nfs_reads_vs_ganesha() {
    use std::time::Instant;
    require_root().expect("root");
    let scratch = tempfile::tempdir().expect("scratch dir");
    let data = scratch.path().join("nfs-data");
    std::fs::create_dir_all(data.join("small")).expect("mkdir");
    {
        use std::io::Write as _;
        let mut big = std::fs::File::create(data.join("big")).expect("big file");
        let chunk: Vec<u8> = (0..1 << 20).map(|i: u32| (i * 31 % 253) as u8).collect();
        for _ in 0..1024 {
            big.write_all(&chunk).expect("write");
        }
    }
    for i in 0..10_000 {
        std::fs::write(
            data.join(format!("small/f{i:05}")),
            format!("file {i}\n").repeat(20),
        )
        .expect("small file");
    }
    let read_all = |net: &LabNetwork, export: &str| {
        let started = Instant::now();
        let out = in_netns(net, "nfs-cat")
            .arg(format!("nfs://127.0.0.1{export}/big"))
            .output()
            .expect("nfs-cat");
        assert!(
            out.status.success() && out.stdout.len() == 1 << 30,
            "nfs-cat nfs://127.0.0.1{export}/big read {} bytes ({}): {}",
            out.stdout.len(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let big = started.elapsed().as_secs_f64();
        let started = Instant::now();
        let (ok, listing) = output(
            in_netns(net, "nfs-ls")
                .arg("-R")
                .arg(format!("nfs://127.0.0.1{export}/small")),
        );
        assert!(
            ok && listing.lines().count() >= 10_000,
            "nfs-ls -R: {} lines",
            listing.lines().count()
        );
        (big, started.elapsed().as_secs_f64())
    };
    let ours = {
        let net = LabNetwork::create(204).expect("lab network");
        let _server = BootServer::start(
            &net,
            scratch.path(),
            None,
            &[
                "--device".into(),
                format!(
                    "mac={MAC},ip=127.0.0.1,name=data,model={MODEL},rootfs={}",
                    data.display()
                ),
            ],
        );
        read_all(&net, "/var/lib/walt/nodes/data/fs")
    };
    let theirs = {
        let net = LabNetwork::create(205).expect("lab network");
        let _reference = ReferenceServers::start(&net, scratch.path(), &data, None).expect("ganesha");
        read_all(&net, &data.display().to_string())
    };
    println!(
        "figures: NFS 1 GiB read walt {:.2} s ({:.0} MiB/s) vs ganesha {:.2} s ({:.0} MiB/s) = {:.2}× the throughput; \
         10,000 small files walk (nfs-ls -R) walt {:.2} s vs ganesha {:.2} s",
        ours.0,
        1024.0 / ours.0,
        theirs.0,
        1024.0 / theirs.0,
        theirs.0 / ours.0,
        ours.1,
        theirs.1
    );
}

/// Runs kubectl on the shared control plane with `input` on stdin.
fn kubectl_stdin(cluster: &walt_tests::k8s::Cluster, args: &[&str], input: &str) -> String {
    let out = kubectl_with_input(cluster, args, input);
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `kubectl ARGS` with `input` on its standard input, succeeding or not.
fn kubectl_with_input(
    cluster: &walt_tests::k8s::Cluster,
    args: &[&str],
    input: &str,
) -> std::process::Output {
    use std::io::Write as _;
    let mut child = cluster
        .kubectl()
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run kubectl");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write kubectl input");
    child.wait_with_output().expect("kubectl")
}

/// A log line without its terminal colour sequences (`ESC [ … m`).
fn without_colours(line: &str) -> String {
    let mut out = String::new();
    let mut in_escape = false;
    for c in line.chars() {
        match (in_escape, c) {
            (false, '\u{1b}') => in_escape = true,
            (false, c) => out.push(c),
            (true, 'm') => in_escape = false,
            (true, _) => {}
        }
    }
    out.trim_end().to_string()
}

/// The shared control plane with walt's CRDs served.
fn control_plane() -> &'static walt_tests::k8s::Cluster {
    let cluster = walt_tests::k8s::shared_control_plane().unwrap_or_else(|e| panic!("control plane: {e}"));
    kubectl_stdin(
        cluster,
        &["apply", "--server-side", "-f", "-"],
        &walt_crds::crds_yaml(),
    );
    cluster
        .kubectl_output(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/devices.walt.dev",
            "crd/nodes.walt.dev",
            "crd/images.walt.dev",
        ])
        .expect("CRDs established");
    cluster
}

/// Control plane tier: `walt-operator boot-server --from-cluster` takes its devices from a real API
/// server. A Device (mac, firmware, address) bound to a Node whose Image is resolved is served that
/// Image by digest under the Node's name; when the Image moves to another digest the boot service
/// serves the new one; when the Device is unbound it serves nothing. Checked over NFS with libnfs's
/// `nfs-cat` (the top layer's `/etc/walt/image-digest`) on host loopback with ports of its own.
#[test]
fn boot_server_takes_its_devices_from_the_cluster() {
    use walt_tests::wait::Wait;
    require_root().expect("root");
    let cluster = control_plane();
    let scratch = tempfile::tempdir().expect("scratch dir");
    let registry = Registry::start().expect("registry");
    let layout = OciLayout::new().expect("layout");
    layout.new_image("empty", Arch::Amd64).expect("new image");
    let mut digests = Vec::new();
    for version in ["v1", "v2"] {
        layout
            .add_layer("empty", version, |root| {
                std::fs::create_dir_all(root.join(format!("boot/{MODEL}")))?;
                std::fs::write(root.join(format!("boot/{MODEL}/kernel.img")), version)
            })
            .expect("layer");
        digests.push(
            layout
                .push(version, &registry, &format!("netboot/cluster:{version}"))
                .expect("push"),
        );
    }
    let ns = cluster.create_namespace("boot").expect("namespace");
    let device = format!("pc-{}", std::process::id());
    let mac = "52:54:00:bb:00:01";
    kubectl_stdin(
        cluster,
        &["apply", "-f", "-"],
        &format!(
            "apiVersion: walt.dev/v1alpha1\nkind: Image\nmetadata: {{name: os, namespace: {ns}}}\nspec: {{}}\n---\n\
             apiVersion: walt.dev/v1alpha1\nkind: Node\nmetadata: {{name: node1, namespace: {ns}}}\n\
             spec: {{model: {MODEL}, device: {device}, image: os}}\n---\n\
             apiVersion: walt.dev/v1alpha1\nkind: Device\nmetadata: {{name: {device}}}\n\
             spec: {{address: 127.0.0.1, model: {MODEL}, mac: '{mac}', firmware: ipxe, lentTo: {{namespace: {ns}}}}}\n"
        ),
    );
    let set_image = |version: usize| {
        let patch = serde_json::json!({"status": {
            "digest": digests[version],
            "reference": registry.reference(&format!("netboot/cluster:v{}", version + 1)),
        }});
        cluster
            .kubectl_output(&[
                "patch",
                "-n",
                &ns,
                "images.walt.dev",
                "os",
                "--subresource=status",
                "--type=merge",
                "-p",
                &patch.to_string(),
            ])
            .expect("Image status");
    };
    set_image(0);
    bind_device(cluster, &device, Some((&ns, "node1")));

    let port = |what| walt_tests::registry::free_port().unwrap_or_else(|e| panic!("{what} port: {e}"));
    let (nfs, http, status) = (port("NFS"), port("HTTP"), port("status"));
    let args: Vec<String> = [
        "--from-cluster",
        "--listen",
        "127.0.0.1",
        "--dhcp",
        "off",
        "--portmap-port",
        "0",
        "--tftp-port",
        "0",
        "--rpc-port",
        "0",
        "--notify-port",
        "0",
    ]
    .iter()
    .map(ToString::to_string)
    .chain([
        "--nfs-port".into(),
        nfs.to_string(),
        "--http-port".into(),
        http.to_string(),
        "--status-listen".into(),
        format!("127.0.0.1:{status}"),
        "--insecure-registry".into(),
        registry.host(),
        "--persist-dir".into(),
        scratch.path().join("persist").display().to_string(),
    ])
    .collect();
    let kubeconfig = cluster.kubeconfig();
    let _server = BootServer::start_with(
        scratch.path(),
        None,
        &args,
        &[("KUBECONFIG", kubeconfig.as_path())],
    );
    let served_digest = || {
        let out = Command::new("nfs-cat")
            .arg(format!(
                "nfs://127.0.0.1/var/lib/walt/nodes/node1/fs/etc/walt/image-digest?nfsport={nfs}&mountport={nfs}"
            ))
            .output()
            .expect("nfs-cat");
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let serves = |what: &str, digest: Option<&str>| {
        Wait::new(what, Duration::from_mins(1))
            .every(Duration::from_millis(300))
            .until(|| served_digest().as_deref() == digest)
            .unwrap_or_else(|e| panic!("{e}: serves {:?}", served_digest()));
    };
    serves("the bound Node's image", Some(&digests[0]));
    // Its /persist is the Device's directory for the tenant it is lent to: the Node's namespace.
    let note = scratch.path().join("note");
    std::fs::write(&note, "from node1\n").expect("a local file");
    let (ok, out) = output(Command::new("nfs-cp").arg(&note).arg(format!(
        "nfs://127.0.0.1/var/lib/walt/nodes/node1/persist/note?nfsport={nfs}&mountport={nfs}"
    )));
    assert!(ok, "nfs-cp into the bound device's /persist: {out}");
    assert_eq!(
        std::fs::read_to_string(
            scratch
                .path()
                .join("persist")
                .join(&device)
                .join(&ns)
                .join("note")
        )
        .ok()
        .as_deref(),
        Some("from node1\n"),
        "--persist-dir/<Device>/<Node's namespace>"
    );
    let kernel = Command::new("busybox")
        .args([
            "wget",
            "-q",
            "-O",
            "-",
            &format!("http://127.0.0.1:{http}/boot/kernel.img"),
        ])
        .output()
        .expect("busybox wget");
    assert_eq!(kernel.stdout, b"v1", "the boot files are the image's");
    set_image(1);
    serves("the Image's new digest", Some(&digests[1]));
    bind_device(cluster, &device, None);
    serves("nothing once the Device is unbound", None);
}

/// Binds `device` to the Node `(namespace, name)` (its uid read) as the operator's Node controller
/// does, or unbinds it (`None`).
fn bind_device(cluster: &walt_tests::k8s::Cluster, device: &str, node: Option<(&str, &str)>) {
    let bound = node.map_or(serde_json::Value::Null, |(namespace, name)| {
        let uid = cluster
            .kubectl_output(&[
                "get",
                "-n",
                namespace,
                "nodes.walt.dev",
                name,
                "-o",
                "jsonpath={.metadata.uid}",
            ])
            .expect("Node uid");
        serde_json::json!({"namespace": namespace, "node": name, "uid": uid.trim()})
    });
    let patch = serde_json::json!({"status": {"boundTo": bound}});
    cluster
        .kubectl_output(&[
            "patch",
            "devices.walt.dev",
            device,
            "--subresource=status",
            "--type=merge",
            "-p",
            &patch.to_string(),
        ])
        .expect("Device status");
}

/// The port of a `scheme://host:port` URL (test helper).
fn port_of(url: &str) -> u16 {
    url.rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .unwrap_or_else(|| panic!("no port in {url}"))
}

/// A DHCP client on `net` with `mac` (busybox `udhcpc` on a veth plugged into the lab bridge, the
/// vendor class `vendor`): the address it was given, or `None` when no server answered (3 tries, 1 s
/// apart).
fn dhcp_lease(net: &LabNetwork, mac: &str, vendor: &str) -> Option<String> {
    dhcp_lease_as(net, mac, vendor, None)
}

/// [`dhcp_lease`] with a DHCP user class (option 77, as iPXE sends it: `walt.node.<model>` names
/// the device's model).
fn dhcp_lease_as(net: &LabNetwork, mac: &str, vendor: &str, user_class: Option<&str>) -> Option<String> {
    let link = |args: &[&str]| {
        let (ok, out) = output(Command::new("ip").args(["-n", &net.netns, "link"]).args(args));
        assert!(ok, "ip link {args:?}: {out}");
    };
    if !output(Command::new("ip").args(["-n", &net.netns, "link", "show", "dhcp-c"])).0 {
        link(&["add", "dhcp-c", "type", "veth", "peer", "name", "dhcp-b"]);
        link(&["set", "dhcp-b", "master", "br0", "up"]);
    }
    link(&["set", "dhcp-c", "down"]);
    link(&["set", "dhcp-c", "address", mac]);
    link(&["set", "dhcp-c", "up"]);
    let (_, out) = output(
        in_netns(net, "busybox")
            .args([
                "udhcpc",
                "-i",
                "dhcp-c",
                "-f",
                "-q",
                "-n",
                "-t",
                "3",
                "-T",
                "1",
                "-A",
                "1",
                "-s",
                "/bin/true",
                "-V",
                vendor,
            ])
            .args(
                user_class
                    .map(|class| {
                        let hex = class.bytes().fold(String::new(), |mut hex, b| {
                            use std::fmt::Write as _;
                            let _ = write!(hex, "{b:02x}");
                            hex
                        });
                        ["-x".to_owned(), format!("0x4d:{hex}")]
                    })
                    .into_iter()
                    .flatten(),
            ),
    );
    out.lines()
        .find_map(|l| l.split("lease of ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
}

/// A new registry holding one image with WalT's boot layout for [`MODEL`] (its `kernel.img` says
/// `kernel`), pushed as `repository`: the registry and the image's digest.
fn registry_with_boot_image(repository: &str, kernel: &str) -> (Registry, String) {
    let registry = Registry::start().expect("registry");
    let layout = OciLayout::new().expect("layout");
    layout.new_image("empty", Arch::Amd64).expect("new image");
    let kernel = kernel.to_owned();
    layout
        .add_layer("empty", "v1", move |root| {
            std::fs::create_dir_all(root.join(format!("boot/{MODEL}")))?;
            std::fs::write(root.join(format!("boot/{MODEL}/kernel.img")), &kernel)
        })
        .expect("layer");
    let digest = layout.push("v1", &registry, repository).expect("push");
    (registry, digest)
}

/// A boot service fed from the cluster, run in a lab network, and the forwards it reaches the API
/// server and the registry through.
struct ClusterBootServer {
    server: BootServer,
    _forwards: [Forward; 2],
}

/// Starts `boot-server --from-cluster --network NETWORK --dhcp authoritative` on `net`'s bridge,
/// with `extra` arguments, reaching `cluster` and `registry` through forwards into the namespace.
fn cluster_boot_server(
    cluster: &walt_tests::k8s::Cluster,
    net: &LabNetwork,
    scratch: &std::path::Path,
    registry: &Registry,
    network: &str,
    extra: &[&str],
) -> ClusterBootServer {
    let forwards = [
        Forward::into_netns(net, port_of(cluster.server()), scratch).expect("forward the API server"),
        Forward::into_netns(net, port_of(&registry.host()), scratch).expect("forward the registry"),
    ];
    let listen = net.server.to_string();
    let args: Vec<String> = [
        "--from-cluster",
        "--network",
        network,
        "--listen",
        &listen,
        "--dhcp",
        "authoritative",
        "--dhcp-interface",
        "br0",
    ]
    .iter()
    .chain(extra)
    .map(ToString::to_string)
    .collect();
    let kubeconfig = cluster.kubeconfig();
    let server = BootServer::start_in(
        net,
        scratch,
        Some(registry),
        &args,
        &[("KUBECONFIG", kubeconfig.as_path())],
    );
    ClusterBootServer {
        server,
        _forwards: forwards,
    }
}

/// Control plane tier: a device nobody registered boots the lab's default image of its model, as on
/// a WalT server, once the lab says which image that is (`--default-image MODEL=IMAGE`, a catalog
/// Image) and which addresses its network lends (`--unregistered-addresses FIRST-LAST`). Real DHCP
/// (busybox `udhcpc` with iPXE's user class `walt.node.<model>`) against `boot-server --from-cluster`:
/// the first request records the device (`unknown-<mac>`, unregistered, lent to nobody) with the
/// first address of the pool in `status.discovered.address`, and an Event saying what it boots; the
/// next one gets that address, and the boot journal shows the default image's digest served to it.
/// A second device of a model without a default image is recorded with no address and gets none.
#[test]
fn an_unregistered_device_boots_the_labs_default_image_of_its_model() {
    use walt_tests::wait::Wait;
    require_root().expect("root");
    let started = std::time::Instant::now();
    let cluster = control_plane();
    let scratch = tempfile::tempdir().expect("scratch dir");
    let (registry, digest) = registry_with_boot_image("netboot/default:v1", "default");
    let net = LabNetwork::create(209).expect("lab network");
    let catalog = cluster.create_namespace("default-catalog").expect("namespace");
    let network = format!("defaults-{}", std::process::id());
    kubectl_stdin(
        cluster,
        &["apply", "-f", "-"],
        &format!(
            "apiVersion: walt.dev/v1alpha1\nkind: Image\nmetadata: {{name: pc-default, namespace: {catalog}}}\nspec: {{}}\n"
        ),
    );
    cluster
        .kubectl_output(&[
            "patch",
            "-n",
            &catalog,
            "images.walt.dev",
            "pc-default",
            "--subresource=status",
            "--type=merge",
            "-p",
            &serde_json::json!({"status": {"digest": digest, "reference": registry.reference("netboot/default:v1")}})
                .to_string(),
        ])
        .expect("status patch");
    let (first, last) = (net.device_ip(190), net.device_ip(191));
    let default_image = format!("{MODEL}=pc-default");
    let pool = format!("{first}-{last}");
    let ClusterBootServer { server, .. } = &cluster_boot_server(
        cluster,
        &net,
        scratch.path(),
        &registry,
        &network,
        &[
            "--catalog-namespace",
            &catalog,
            "--default-image",
            &default_image,
            "--unregistered-addresses",
            &pool,
        ],
    );
    let (mac, other) = ("52:54:00:de:00:01", "52:54:00:de:00:02");
    let user_class = format!("walt.node.{MODEL}");
    let mut lease = None;
    Wait::new("the default image's lease", Duration::from_mins(2))
        .every(Duration::from_millis(500))
        .until(|| {
            lease = dhcp_lease_as(&net, mac, "iPXE", Some(&user_class));
            lease.is_some()
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", server.log()));
    let served_at = started.elapsed();
    assert_eq!(lease, Some(first.to_string()), "the pool's first address");
    let recorded = "unknown-525400de0001";
    let seen: serde_json::Value = serde_json::from_str(
        &cluster
            .kubectl_output(&["get", "devices.walt.dev", recorded, "-o", "json"])
            .expect("the recorded Device"),
    )
    .expect("json");
    assert_eq!(seen["spec"]["model"], MODEL, "told by its user class");
    assert!(
        seen["spec"]["address"].is_null() && seen["spec"]["lentTo"].is_null(),
        "still unregistered, lent to nobody: {seen}"
    );
    assert_eq!(seen["status"]["discovered"]["address"], first.to_string());
    let offer = server
        .journal()
        .into_iter()
        .rev()
        .find(|e| e["protocol"] == "dhcp" && e["mac"] == mac && e["digest"].is_string())
        .unwrap_or_else(|| panic!("a DHCP journal entry serving {mac}: {:?}", server.journal()));
    assert_eq!(
        offer["digest"],
        digest.as_str(),
        "the default image, by digest: {offer}"
    );
    Wait::new("a Recorded Event saying what it boots", Duration::from_secs(30))
        .every(Duration::from_millis(300))
        .until(|| {
            cluster
                .event_messages(recorded, "Recorded")
                .is_ok_and(|m| m.contains(&format!("it boots the lab's default image pc-default at {first}")))
        })
        .unwrap_or_else(|e| panic!("{e}"));

    // A model the lab has no default image for: recorded, no address spent on it, nothing served.
    assert_eq!(dhcp_lease_as(&net, other, "iPXE", Some("walt.node.rpi-9")), None);
    let mut other_seen = serde_json::Value::Null;
    Wait::new("the second device recorded", Duration::from_secs(30))
        .every(Duration::from_millis(300))
        .until(|| {
            other_seen = cluster
                .kubectl_output(&["get", "devices.walt.dev", "unknown-525400de0002", "-o", "json"])
                .ok()
                .and_then(|out| serde_json::from_str(&out).ok())
                .unwrap_or_default();
            other_seen["spec"]["model"] == "rpi-9"
        })
        .unwrap_or_else(|e| panic!("{e}: {other_seen}\n{}", server.log()));
    assert!(
        other_seen["status"]["discovered"]["address"].is_null(),
        "{other_seen}"
    );
    assert_eq!(dhcp_lease_as(&net, other, "iPXE", Some("walt.node.rpi-9")), None);
    let _ = cluster.kubectl_output(&["delete", "devices.walt.dev", recorded, "unknown-525400de0002"]);
    eprintln!(
        "defaults: the unknown device served its model's default image {:.1} s after the start, test {:.1} s",
        served_at.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

/// Control plane tier: the boot service fed from the cluster refuses a MAC two Devices claim and
/// records a MAC no Device claims. Real DHCP (busybox `udhcpc`) in a lab namespace against
/// `boot-server --from-cluster --dhcp authoritative` run there: a Device bound to a Node gets its
/// address; a second Device with its MAC (a typo) makes the service answer neither, say why in its
/// journal and set `MacConflict=True` naming both on both Devices (with a Warning Event); deleting
/// the typo serves the MAC again (`MacConflict=False`); a Device of the network with another MAC
/// and the first one's address makes the service answer neither too (`AddressConflict=True` naming
/// both, Event, journal, `device ls` saying `(address shared: not booted)`), until it is deleted
/// (`AddressConflict=False`); with the chart's admission policies applied, writing either typo again
/// is refused by the API server (`walt-device-mac-unique`, `walt-device-address-unique`). A
/// Raspberry Pi ROM's request from an unknown MAC gets no address and is recorded as the
/// unregistered Device `unknown-<mac>` (firmware, network, no address, lent to nobody; Event
/// `Recorded`); with `--max-unknown-devices 1`, a second unknown MAC is not recorded and the log
/// says so. The lab admin lists it (`kubectl walt device ls --unregistered`) and registers it
/// (`kubectl walt device register … --as … --address … --model … --lend …`).
#[test]
fn boot_server_refuses_a_shared_mac_and_records_unknown_devices() {
    use walt_tests::wait::Wait;
    require_root().expect("root");
    let started = std::time::Instant::now();
    let cluster = control_plane();
    let scratch = tempfile::tempdir().expect("scratch dir");
    let (registry, digest) = registry_with_boot_image("netboot/claims:v1", "v1");
    let net = LabNetwork::create(208).expect("lab network");
    let ns = cluster.create_namespace("claims").expect("namespace");
    // A boot network of this test's own: Devices other tests leave on the control plane are not ours.
    let network = format!("claims-{}", std::process::id());
    let (mac, unknown, unknown2) = ("52:54:00:dd:00:01", "52:54:00:dd:00:02", "52:54:00:dd:00:03");
    let device_with_mac = |name: &str, address: &str, mac: &str| {
        format!(
            "apiVersion: walt.dev/v1alpha1\nkind: Device\nmetadata: {{name: {name}}}\n\
             spec: {{address: '{address}', model: {MODEL}, mac: '{mac}', firmware: ipxe, bootNetwork: {network}, \
             lentTo: {{namespace: {ns}}}}}\n"
        )
    };
    let device_yaml = |name: &str, address: &str| device_with_mac(name, address, mac);
    // A second device (its own MAC) given the first one's address by mistake.
    let other_mac = "52:54:00:dd:00:04";
    let pc_a = format!("pc-a-{}", std::process::id());
    let pc_b = format!("pc-b-{}", std::process::id());
    kubectl_stdin(
        cluster,
        &["apply", "-f", "-"],
        &format!(
            "apiVersion: walt.dev/v1alpha1\nkind: Image\nmetadata: {{name: os, namespace: {ns}}}\nspec: {{}}\n---\n\
             apiVersion: walt.dev/v1alpha1\nkind: Node\nmetadata: {{name: node1, namespace: {ns}}}\n\
             spec: {{model: {MODEL}, device: {pc_a}, image: os}}\n---\n{}",
            device_yaml(&pc_a, &net.device_ip(1).to_string())
        ),
    );
    let patch_status = |args: &[&str], patch: serde_json::Value| {
        cluster
            .kubectl_output(
                &[
                    args,
                    &["--subresource=status", "--type=merge", "-p", &patch.to_string()],
                ]
                .concat(),
            )
            .expect("status patch");
    };
    patch_status(
        &["patch", "-n", &ns, "images.walt.dev", "os"],
        serde_json::json!({"status": {"digest": digest, "reference": registry.reference("netboot/claims:v1")}}),
    );
    bind_device(cluster, &pc_a, Some((&ns, "node1")));

    let ClusterBootServer { server, .. } = &cluster_boot_server(
        cluster,
        &net,
        scratch.path(),
        &registry,
        &network,
        &["--max-unknown-devices", "1"],
    );
    let kubeconfig = cluster.kubeconfig();
    let ipxe = "iPXE";
    let rpi = "PXEClient:Arch:00000:UNDI:002001";
    let leases = |what: &str, wanted: Option<&str>| {
        let mut last = None;
        Wait::new(what, Duration::from_mins(2))
            .every(Duration::from_millis(500))
            .until(|| {
                last = dhcp_lease(&net, mac, ipxe);
                last.as_deref() == wanted
            })
            .unwrap_or_else(|e| panic!("{e}: lease {last:?}\n{}", server.log()));
    };
    let a_address = net.device_ip(1).to_string();
    leases("the Device's address", Some(&a_address));
    let served_at = started.elapsed();
    assert!(
        cluster
            .kubectl_output(&["get", "devices.walt.dev", "unknown-525400dd0001"])
            .is_err(),
        "a registered device asking before the service has read the Devices is not recorded as unknown"
    );

    // A second Device with the same MAC: neither is served, both say why.
    kubectl_stdin(
        cluster,
        &["apply", "-f", "-"],
        &device_yaml(&pc_b, &net.device_ip(2).to_string()),
    );
    leases("no answer while two Devices claim the MAC", None);
    let refused_at = started.elapsed();
    let condition_of = |device: &str, type_: &str| {
        cluster
            .kubectl_output(&[
                "get",
                "devices.walt.dev",
                device,
                "-o",
                &format!(
                    "jsonpath={{.status.conditions[?(@.type==\"{type_}\")].status}} \
                     {{.status.conditions[?(@.type==\"{type_}\")].message}}"
                ),
            ])
            .unwrap_or_default()
    };
    let condition = |device: &str| condition_of(device, "MacConflict");
    for device in [&pc_a, &pc_b] {
        let mut last = String::new();
        Wait::new("MacConflict=True", Duration::from_secs(30))
            .every(Duration::from_millis(300))
            .until(|| {
                last = condition(device);
                last.starts_with("True ") && last.contains(&format!("the Devices {pc_a}, {pc_b}"))
            })
            .unwrap_or_else(|e| panic!("{e}: {device}: {last:?}"));
    }
    // The latest DHCP request of the MAC in the journal, and why it was refused.
    let refusal = || {
        let entry = server
            .journal()
            .into_iter()
            .rev()
            .find(|e| e["protocol"] == "dhcp" && e["mac"] == mac)
            .expect("a DHCP journal entry");
        (entry["refused"].as_str().unwrap_or_default().to_owned(), entry)
    };
    let (why, entry) = refusal();
    assert!(
        why.contains(&format!("claimed by the Devices {pc_a}, {pc_b}")),
        "the journal says why: {entry}"
    );
    // The log says why (each boot service, at each change of its bindings). Not the `MAC address
    // shared` line: that one comes with the condition, which any boot service of the lab may write
    // first (a shared MAC is the lab's conflict; seen: another test's boot service on the same control
    // plane wrote it, and this one had nothing left to change).
    assert!(
        server
            .log()
            .lines()
            .any(|l| l.contains("not served")
                && l.contains(&format!("is claimed by the Devices {pc_a}, {pc_b}"))),
        "logged:\n{}",
        server.log()
    );
    for device in [&pc_a, &pc_b] {
        Wait::new("a MacConflict Event", Duration::from_secs(30))
            .every(Duration::from_millis(300))
            .until(|| {
                cluster
                    .event_messages(device, "MacConflict")
                    .is_ok_and(|m| m.contains("is claimed by the Devices"))
            })
            .unwrap_or_else(|e| panic!("{e}: {device}"));
    }

    // The typo fixed: the MAC is served again, the condition cleared.
    cluster
        .kubectl_output(&["delete", "devices.walt.dev", &pc_b])
        .expect("delete the typo");
    leases("the Device's address again", Some(&a_address));
    let served_again_at = started.elapsed();
    let mut last = String::new();
    Wait::new("MacConflict=False", Duration::from_secs(30))
        .every(Duration::from_millis(300))
        .until(|| {
            last = condition(&pc_a);
            last.starts_with("False ")
        })
        .unwrap_or_else(|e| panic!("{e}: {last:?}"));

    // A second Device of the network given the first one's address (its own MAC): neither is
    // served, both say why.
    let pc_d = format!("pc-d-{}", std::process::id());
    kubectl_stdin(
        cluster,
        &["apply", "-f", "-"],
        &device_with_mac(&pc_d, &a_address, other_mac),
    );
    leases("no answer while two Devices claim the address", None);
    let address_refused_at = started.elapsed();
    for device in [&pc_a, &pc_d] {
        let mut last = String::new();
        Wait::new("AddressConflict=True", Duration::from_secs(30))
            .every(Duration::from_millis(300))
            .until(|| {
                last = condition_of(device, "AddressConflict");
                last.starts_with("True ")
                    && last.contains(&format!(
                        "the address {a_address} is claimed by the Devices {pc_a}, {pc_d} on the boot network {network}"
                    ))
            })
            .unwrap_or_else(|e| panic!("{e}: {device}: {last:?}"));
        Wait::new("an AddressConflict Event", Duration::from_secs(30))
            .every(Duration::from_millis(300))
            .until(|| {
                cluster
                    .event_messages(device, "AddressConflict")
                    .is_ok_and(|m| m.contains(&format!("the address {a_address} is claimed")))
            })
            .unwrap_or_else(|e| panic!("{e}: {device}"));
    }
    let (why, entry) = refusal();
    assert!(
        why.contains(&format!(
            "the address {a_address} is claimed by the Devices {pc_a}, {pc_d}"
        )),
        "the journal says why: {entry}"
    );
    assert!(
        server.log().contains("address shared: not served"),
        "logged:\n{}",
        server.log()
    );
    let listed = Command::new(walt_tests::operator::plugin_binary())
        .env("KUBECONFIG", cluster.kubeconfig())
        .args(["-n", &ns, "device", "ls"])
        .output()
        .expect("kubectl-walt");
    let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with(pc_a.as_str()) && l.contains("(address shared: not booted)")),
        "{listed}"
    );
    cluster
        .kubectl_output(&["delete", "devices.walt.dev", &pc_d])
        .expect("delete the typo");
    leases("the Device's address once it is its own again", Some(&a_address));
    let address_served_again_at = started.elapsed();
    Wait::new("AddressConflict=False", Duration::from_secs(30))
        .every(Duration::from_millis(300))
        .until(|| {
            last = condition_of(&pc_a, "AddressConflict");
            last.starts_with("False ")
        })
        .unwrap_or_else(|e| panic!("{e}: {last:?}"));

    // With the chart's admission policies, the typo is refused when written (the condition above
    // stays for what admission cannot see: conflicts made before, or by two writes at once).
    let policies =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/walt/files/admission.yaml");
    cluster
        .kubectl_output(&["apply", "-f", &policies.display().to_string()])
        .expect("apply the chart's admission policies");
    let mut refused = String::new();
    Wait::new("admission to refuse the typo", Duration::from_mins(1))
        .every(Duration::from_millis(500))
        .until(|| {
            let out = kubectl_with_input(
                cluster,
                &["create", "-f", "-"],
                &device_yaml(&pc_b, &net.device_ip(2).to_string()),
            );
            if out.status.success() {
                let _ = cluster.kubectl_output(&["delete", "devices.walt.dev", &pc_b]);
            }
            refused = String::from_utf8_lossy(&out.stderr).into_owned();
            refused.contains("walt-device-mac-unique")
        })
        .unwrap_or_else(|e| panic!("{e}: {refused}"));
    assert!(
        refused.contains(&format!(
            "the MAC address {mac} is claimed by the Device {pc_a} already"
        )),
        "{refused}"
    );
    let out = kubectl_with_input(
        cluster,
        &["create", "-f", "-"],
        &device_with_mac(&pc_d, &a_address, other_mac),
    );
    if out.status.success() {
        let _ = cluster.kubectl_output(&["delete", "devices.walt.dev", &pc_d]);
    }
    let refused = String::from_utf8_lossy(&out.stderr);
    assert!(
        refused.contains("walt-device-address-unique")
            && refused.contains(&format!(
                "the address {a_address} is claimed by the Device {pc_a} already on the boot network {network}"
            )),
        "{refused}"
    );

    // An unknown device: no address, recorded for the lab admin.
    assert_eq!(
        dhcp_lease(&net, unknown, rpi),
        None,
        "an unknown device gets no address"
    );
    let recorded = "unknown-525400dd0002";
    let mut seen = serde_json::Value::Null;
    Wait::new("the unknown device recorded", Duration::from_secs(30))
        .every(Duration::from_millis(300))
        .until(|| {
            seen = cluster
                .kubectl_output(&["get", "devices.walt.dev", recorded, "-o", "json"])
                .ok()
                .and_then(|out| serde_json::from_str(&out).ok())
                .unwrap_or_default();
            seen["status"]["discovered"]["firmware"] == "rpi"
        })
        .unwrap_or_else(|e| panic!("{e}: {seen}\n{}", server.log()));
    let recorded_at = started.elapsed();
    assert_eq!(seen["spec"]["mac"], unknown);
    assert_eq!(seen["spec"]["firmware"], "rpi");
    assert_eq!(seen["spec"]["bootNetwork"], network.as_str());
    assert_eq!(seen["spec"]["model"], "unknown");
    assert!(
        seen["spec"]["address"].is_null() && seen["spec"]["lentTo"].is_null(),
        "unregistered, lent to nobody: {seen}"
    );
    assert_eq!(seen["metadata"]["labels"]["walt.dev/discovered"], "true");
    assert_eq!(seen["status"]["discovered"]["network"], network.as_str());
    assert_eq!(seen["status"]["discovered"]["vendorClass"], rpi);
    assert!(seen["status"]["discovered"]["firstSeen"].is_string(), "{seen}");
    Wait::new("a Recorded Event", Duration::from_secs(30))
        .every(Duration::from_millis(300))
        .until(|| {
            cluster
                .event_messages(recorded, "Recorded")
                .is_ok_and(|m| m.contains("kubectl walt device register"))
        })
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        dhcp_lease(&net, unknown, rpi),
        None,
        "recorded, still booted into nothing"
    );

    // The cap (1): a second unknown MAC is logged, not recorded.
    assert_eq!(dhcp_lease(&net, unknown2, rpi), None);
    Wait::new("the cap logged", Duration::from_secs(30))
        .every(Duration::from_millis(300))
        .until(|| server.log().contains("unknown devices not recorded"))
        .unwrap_or_else(|e| panic!("{e}:\n{}", server.log()));
    assert!(
        cluster
            .kubectl_output(&["get", "devices.walt.dev", "unknown-525400dd0003"])
            .is_err(),
        "past the cap, nothing is created"
    );
    // The lab admin sees it and registers it with the plugin (a new name, an address, a model, lent).
    let plugin = |args: &[&str]| {
        let out = Command::new(walt_tests::operator::plugin_binary())
            .env("KUBECONFIG", &kubeconfig)
            .args(["-n", &ns])
            .args(args)
            .output()
            .expect("kubectl-walt");
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "kubectl walt {args:?}: {text}");
        text
    };
    let listed = plugin(&["device", "ls", "--unregistered"]);
    let row = listed
        .lines()
        .find(|l| l.starts_with(recorded))
        .unwrap_or_else(|| panic!("{recorded} listed:\n{listed}"));
    assert!(
        row.contains(unknown) && row.contains("rpi") && row.contains(&network) && row.contains("ago"),
        "{listed}"
    );
    let pc_c = format!("pc-c-{}", std::process::id());
    let c_address = net.device_ip(3).to_string();
    plugin(&[
        "device",
        "register",
        recorded,
        "--as",
        &pc_c,
        "--address",
        &c_address,
        "--model",
        "rpi-3-b",
        "--lend",
        &ns,
    ]);
    let registered: serde_json::Value = serde_json::from_str(
        &cluster
            .kubectl_output(&["get", "devices.walt.dev", &pc_c, "-o", "json"])
            .expect("the registered Device"),
    )
    .expect("json");
    assert_eq!(
        (
            &registered["spec"]["address"],
            &registered["spec"]["mac"],
            &registered["spec"]["model"],
            &registered["spec"]["firmware"],
            &registered["spec"]["lentTo"]["namespace"]
        ),
        (
            &serde_json::Value::from(c_address.as_str()),
            &serde_json::Value::from(unknown),
            &serde_json::Value::from("rpi-3-b"),
            &serde_json::Value::from("rpi"),
            &serde_json::Value::from(ns.as_str())
        )
    );
    assert!(
        cluster
            .kubectl_output(&["get", "devices.walt.dev", recorded])
            .is_err(),
        "the record is replaced"
    );
    assert!(plugin(&["device", "ls", "--all"]).contains(&format!("{c_address}:22")));
    let _ = cluster.kubectl_output(&["delete", "devices.walt.dev", &pc_c, &pc_a]);
    eprintln!(
        "claims: served {:.1} s, refused after the typo {:.1} s, served again {:.1} s, shared address refused {:.1} s, \
         served again {:.1} s, recorded {:.1} s, test {:.1} s",
        served_at.as_secs_f64(),
        refused_at.as_secs_f64(),
        served_again_at.as_secs_f64(),
        address_refused_at.as_secs_f64(),
        address_served_again_at.as_secs_f64(),
        recorded_at.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

/// Control plane tier: what the chart lets the boot service write, enforced by a real API server.
/// The chart's boot ServiceAccount, ClusterRole(Binding) and `walt-boot-records-only` policy
/// (rendered with `helm template`) applied; as that ServiceAccount (impersonated), creating a
/// recorded Device (no address, lent to nobody, labelled) and patching its status succeed; a Device
/// with an address, a pinned host key or without the label is refused by the policy, a delete by
/// RBAC.
#[test]
fn the_boot_service_may_only_record_unregistered_devices() {
    use walt_tests::wait::Wait;
    let cluster = control_plane();
    let docs = walt_tests::deploy::render_chart(&[
        "--set",
        "bootService.enabled=true",
        "--set",
        "bootService.networks[0].name=default",
        "--set",
        "bootService.networks[0].listen=192.0.2.1",
        "--set",
        "bootService.networks[0].interface=eth1",
    ])
    .expect("helm template");
    let wanted = [
        ("ServiceAccount", "walt-boot"),
        ("ClusterRole", "walt-boot"),
        ("ClusterRoleBinding", "walt-boot"),
        ("ValidatingAdmissionPolicy", "walt-boot-records-only"),
        ("ValidatingAdmissionPolicyBinding", "walt-boot-records-only"),
        ("Role", "walt-boot-host-keys"),
        ("RoleBinding", "walt-boot-host-keys"),
    ];
    let items: Vec<serde_json::Value> = docs
        .into_iter()
        .filter(|doc| {
            let (kind, _, name) = walt_tests::deploy::object_id(doc);
            wanted.iter().any(|(k, n)| *k == kind && *n == name)
        })
        .collect();
    assert_eq!(items.len(), wanted.len(), "the chart renders them all");
    let _ = cluster.kubectl_output(&["create", "namespace", "walt-system"]);
    kubectl_stdin(
        cluster,
        &["apply", "-f", "-"],
        &serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string(),
    );
    let boot = "--as=system:serviceaccount:walt-system:walt-boot";
    let pid = std::process::id();
    let device = |name: &str, extra: &str, label: bool| {
        let labels = if label {
            "labels: {walt.dev/discovered: 'true'}, "
        } else {
            ""
        };
        format!(
            "apiVersion: walt.dev/v1alpha1\nkind: Device\nmetadata: {{{labels}name: {name}-{pid}}}\n\
             spec: {{model: unknown, mac: 'dc:a6:32:00:00:01', firmware: rpi{extra}}}\n"
        )
    };
    let as_boot = |yaml: &str| kubectl_with_input(cluster, &[boot, "create", "-f", "-"], yaml);
    // The policy takes effect a moment after it is created: until then, try again.
    let mut refused = String::new();
    Wait::new("the policy to refuse an address", Duration::from_mins(1))
        .every(Duration::from_millis(500))
        .until(|| {
            let out = as_boot(&device("addressed", ", address: 192.0.2.31", true));
            if out.status.success() {
                let _ = cluster.kubectl_output(&["delete", "devices.walt.dev", &format!("addressed-{pid}")]);
            }
            refused = String::from_utf8_lossy(&out.stderr).into_owned();
            refused.contains("walt-boot-records-only")
        })
        .unwrap_or_else(|e| panic!("{e}: {refused}"));
    assert!(
        refused.contains("the boot service only records unknown devices"),
        "{refused}"
    );
    for (what, yaml) in [
        (
            "a pinned host key",
            device(
                "keyed",
                ", hostKey: 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl'",
                true,
            ),
        ),
        ("no discovered label", device("unlabelled", "", false)),
    ] {
        let out = as_boot(&yaml);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains("walt-boot-records-only"),
            "{what}: {stderr}"
        );
    }
    let out = as_boot(&device("unknown", "", true));
    assert!(
        out.status.success(),
        "a record is created: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let name = format!("unknown-{pid}");
    cluster
        .kubectl_output(&[
            boot,
            "patch",
            "devices.walt.dev",
            &name,
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"discovered":{"firmware":"rpi","network":"default"}}}"#,
        ])
        .expect("the boot service writes a Device's status");
    let deleted = cluster.kubectl_output(&[boot, "delete", "devices.walt.dev", &name]);
    assert!(
        deleted
            .as_ref()
            .is_err_and(|e| e.to_string().contains("forbidden")),
        "RBAC: no delete: {deleted:?}"
    );
    cluster
        .kubectl_output(&["delete", "devices.walt.dev", &name])
        .expect("clean up");
    // The Devices' host keys: Secrets read in the release namespace, written nowhere, read nowhere
    // else.
    let can = |args: &[&str]| {
        let out = cluster
            .kubectl()
            .args(["auth", "can-i", boot])
            .args(args)
            .output()
            .expect("kubectl auth can-i");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    for verb in ["get", "list", "watch"] {
        assert_eq!(can(&[verb, "secrets", "-n", "walt-system"]), "yes", "{verb}");
    }
    for args in [
        &["create", "secrets", "-n", "walt-system"][..],
        &["patch", "secrets", "-n", "walt-system"],
        &["delete", "secrets", "-n", "walt-system"],
        &["list", "secrets", "-n", "default"],
        &["get", "secrets", "-A"],
    ] {
        assert_eq!(can(args), "no", "{args:?}");
    }
}

/// Where the device's SSH host key comes from in an [`OperatorLab`].
#[derive(Clone, Copy, PartialEq, Eq)]
enum HostKeys {
    /// The operator makes it (a Secret in its namespace, `status.hostKey`); the boot service
    /// watches the Secrets (`--host-key-namespace`).
    MadeByWalt,
    /// The lab admin's: pinned in `spec.hostKey`, its files given to the boot service
    /// (`--host-key-dir`).
    Pinned,
}

/// A lab under the operator on the control plane tier: a Device (MAC, iPXE firmware, address; a
/// pinned host key or one walt makes, see [`HostKeys`]) lent to a namespace, the Node `vm1` on it
/// booting the Image `os` (and an Image `os2` of a second digest), both pushed to a real registry,
/// the node key Secret; `walt-operator boot-server --from-cluster` (in the lab namespace, reaching
/// the API server and the registry through forwarded ports) serving it with the public key of the
/// node key as `authorized_keys`, and `walt-operator run --boot-status-url` at its boot records,
/// reaching the device through the lab namespace.
struct OperatorLab {
    cluster: &'static walt_tests::k8s::Cluster,
    scratch: tempfile::TempDir,
    ns: String,
    net: LabNetwork,
    mac: String,
    device: String,
    digest: String,
    digest2: String,
    server: BootServer,
    operator: walt_tests::operator::OperatorProcess,
    started: std::time::Instant,
    _forwards: Vec<Forward>,
    _registry: Registry,
}

impl OperatorLab {
    /// Sets it up on lab network `index`; the Node's spec gets `node_extra` (YAML flow entries,
    /// e.g. `virtual: {kind: vm}`), the operator `operator_extra` arguments.
    fn start(index: u8, host_keys: HostKeys, node_extra: &str, operator_extra: &[&str]) -> Self {
        Self::start_arch(index, host_keys, node_extra, operator_extra, Arch::Amd64)
    }

    /// [`Self::start`] with an image and a Device of `arch`: an amd64 one (model `pc-x86-64`,
    /// firmware `ipxe`) or an arm64 one (model `qemu-arm-64`, firmware `u-boot`).
    fn start_arch(
        index: u8,
        host_keys: HostKeys,
        node_extra: &str,
        operator_extra: &[&str],
        arch: Arch,
    ) -> Self {
        let (model, firmware) = match arch {
            Arch::Amd64 => (MODEL, "ipxe"),
            Arch::Arm64 => (MODEL_ARM64, "u-boot"),
        };
        let started = std::time::Instant::now();
        let cluster = control_plane();
        let scratch = tempfile::tempdir().expect("scratch dir");
        let node_key = keygen(&scratch.path().join("node_key"), "walt-node-key");
        let device = format!("vm-{}-{index}", std::process::id());
        let keys = scratch.path().join("host-keys");
        std::fs::create_dir_all(&keys).expect("host key dir");
        let host_key = keygen(&keys.join(&device), &device);
        let host_public = std::fs::read_to_string(host_key.with_extension("pub")).expect("host public key");
        let registry = Registry::start().expect("registry");
        let net = LabNetwork::create(index).expect("lab network");
        let ns = cluster.create_namespace("bootop").expect("namespace");
        // Pushed where the operator looks for the namespace's Images `os` and `os2` by default.
        let (layout, digest) =
            push_vm_image_for(scratch.path(), &registry, &format!("lab/{ns}/os:latest"), arch);
        layout
            .add_layer("vm", "v2", |root| {
                std::fs::write(root.join("etc/second-image"), "v2\n")
            })
            .expect("second image layer");
        let digest2 = layout
            .push("v2", &registry, &format!("lab/{ns}/os2:latest"))
            .expect("push v2");
        cluster
            .create_node_key_secret(&ns, &node_key)
            .expect("node key Secret");
        // One MAC per lab network: the control plane (and its Devices) outlive each test, and the
        // boot service of a later test serving from the cluster would otherwise meet two Devices with
        // the MAC and could take the earlier test's (its host key: "HOST KEY MISMATCH", seen when both
        // VM tests ran in one process).
        let mac = format!("52:54:00:cc:00:{index:02x}");
        kubectl_stdin(
            cluster,
            &["apply", "-f", "-"],
            &format!(
                "apiVersion: walt.dev/v1alpha1\nkind: Image\nmetadata: {{name: os, namespace: {ns}}}\nspec: {{}}\n---\n\
                 apiVersion: walt.dev/v1alpha1\nkind: Image\nmetadata: {{name: os2, namespace: {ns}}}\nspec: {{}}\n---\n\
                 apiVersion: walt.dev/v1alpha1\nkind: Node\nmetadata: {{name: vm1, namespace: {ns}}}\n\
                 spec: {{model: {model}, device: {device}, image: os{node_extra}}}\n---\n\
                 apiVersion: walt.dev/v1alpha1\nkind: Device\nmetadata: {{name: {device}}}\n\
                 spec: {{address: '{}', sshPort: 22, model: {model}, mac: '{mac}', firmware: {firmware}, \
                 {}lentTo: {{namespace: {ns}}}}}\n",
                net.device_ip(0),
                match host_keys {
                    HostKeys::Pinned => format!("hostKey: '{}', ", host_public.trim()),
                    HostKeys::MadeByWalt => String::new(),
                }
            ),
        );

        // The boot service runs whole in the lab namespace: the API server and the registry are
        // forwarded into it, its boot records out of it.
        let status = walt_tests::registry::free_port().expect("status port");
        let forwards = vec![
            Forward::into_netns(&net, port_of(cluster.server()), scratch.path())
                .expect("forward the API server"),
            Forward::into_netns(&net, port_of(&registry.host()), scratch.path())
                .expect("forward the registry"),
            Forward::out_of_netns(&net, 9470, status, scratch.path()).expect("forward the boot records"),
        ];
        let kubeconfig = cluster.kubeconfig();
        let keys = keys.display().to_string();
        let host_key_args = match host_keys {
            HostKeys::Pinned => ["--host-key-dir", keys.as_str()],
            // The operator's namespace (its --namespace below).
            HostKeys::MadeByWalt => ["--host-key-namespace", ns.as_str()],
        };
        let args: Vec<String> = [
            "--from-cluster",
            "--listen",
            &net.server.to_string(),
            "--dhcp",
            "authoritative",
            "--dhcp-interface",
            "br0",
            "--node-key",
            &node_key.display().to_string(),
            host_key_args[0],
            host_key_args[1],
            "--status-listen",
            STATUS,
        ]
        .iter()
        .map(ToString::to_string)
        .collect();
        let server = BootServer::start_in(
            &net,
            scratch.path(),
            Some(&registry),
            &args,
            &[("KUBECONFIG", kubeconfig.as_path())],
        );
        let mut operator_args: Vec<String> = [
            "--namespace",
            &ns,
            "--watch-namespace",
            &ns,
            "--lab-registry",
            &registry.reference("lab"),
            "--registry-plain-http",
            "true",
            "--node-key-secret",
            "walt-node-key",
            "--shell-image",
            "127.0.0.1:1/walt/operator:test",
            "--identity",
            "netboot",
            "--catalog-namespace",
            "walt-catalog-none",
            "--node-proxy-command",
            &format!("ip netns exec {} socat - TCP:%h:%p", net.netns),
            "--probe-interval",
            "2s",
            "--boot-status-url",
            &format!("http://127.0.0.1:{status}"),
        ]
        .map(ToString::to_string)
        .to_vec();
        operator_args.extend(operator_extra.iter().map(ToString::to_string));
        let operator = walt_tests::operator::OperatorProcess::start(
            &kubeconfig,
            None,
            &operator_args,
            &scratch.path().join("operator.log"),
        )
        .expect("start walt-operator");
        operator.wait_ready(Duration::from_mins(1));
        OperatorLab {
            cluster,
            scratch,
            ns,
            net,
            mac,
            device,
            digest,
            digest2,
            server,
            operator,
            started,
            _forwards: forwards,
            _registry: registry,
        }
    }

    /// The Events of the lab's namespace, oldest first (for failure messages).
    fn events(&self) -> String {
        self.cluster
            .kubectl_output(&[
                "-n",
                &self.ns,
                "get",
                "events",
                "--sort-by=.metadata.creationTimestamp",
                "-o",
                "custom-columns=TIME:.metadata.creationTimestamp,REASON:.reason,OBJECT:.involvedObject.name,MESSAGE:.message",
            ])
            .unwrap_or_else(|e| format!("(no Events: {e})"))
    }

    /// `jsonpath` of the Node `vm1`.
    fn node(&self, jsonpath: &str) -> String {
        self.cluster
            .kubectl_output(&[
                "-n",
                &self.ns,
                "get",
                "nodes.walt.dev",
                "vm1",
                "-o",
                &format!("jsonpath={jsonpath}"),
            ])
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    /// `jsonpath` of the Device.
    fn device(&self, jsonpath: &str) -> String {
        self.cluster
            .kubectl_output(&[
                "get",
                "devices.walt.dev",
                &self.device,
                "-o",
                &format!("jsonpath={jsonpath}"),
            ])
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    /// Waits until the operator recorded a host key in the Device's status other than `not`, and the
    /// boot service binds the device with it (its log names the key's fingerprint); the key's
    /// public line.
    fn wait_host_key_served(&self, not: Option<&str>) -> String {
        use walt_tests::wait::{Poll, Wait};
        let key = Wait::new(
            "the operator to record the Device's host key",
            Duration::from_mins(1),
        )
        .every(Duration::from_millis(300))
        .until(|| {
            let key = self.device("{.status.hostKey}");
            if key.starts_with("ssh-ed25519 ") && Some(key.as_str()) != not {
                Poll::Ready(key)
            } else {
                Poll::Pending(format!("status.hostKey {key:?}"))
            }
        })
        .unwrap_or_else(|e| panic!("{e}\noperator:\n{}", self.operator.log()));
        let fingerprint = ssh_fingerprint(&key, self.scratch.path());
        Wait::new(
            "the boot service to serve the Device's host key",
            Duration::from_mins(1),
        )
        .every(Duration::from_millis(300))
        .until(|| {
            let log =
                std::fs::read_to_string(self.scratch.path().join("boot-server.log")).unwrap_or_default();
            log.lines()
                .rfind(|l| l.contains("device bound"))
                .is_some_and(|l| l.contains(&fingerprint))
        })
        .unwrap_or_else(|e| panic!("{e}: {fingerprint}"));
        key
    }

    /// Waits until the operator has bound the Device and resolved the Image, and the boot service
    /// serves it (its boot records know the MAC once a binding names it).
    fn wait_served(&self) {
        walt_tests::wait::Wait::new("the boot service to serve the Device", Duration::from_mins(2))
            .every(Duration::from_millis(500))
            .until(|| {
                let log =
                    std::fs::read_to_string(self.scratch.path().join("boot-server.log")).unwrap_or_default();
                log.lines()
                    .rfind(|l| l.contains("bindings updated from the cluster"))
                    .is_some_and(|l| without_colours(l).ends_with("devices=1"))
            })
            .unwrap_or_else(|e| {
                panic!(
                    "{e}: Image status {}",
                    self.cluster
                        .kubectl_output(&["-n", &self.ns, "get", "images.walt.dev", "-o", "yaml"])
                        .unwrap_or_default()
                )
            });
    }

    /// Waits until the Node's verified booted image is `want`; returns the time since `vm`'s power-on.
    fn verified_as(&self, vm: &VmNode, want: &str) -> Duration {
        use walt_tests::wait::{Poll, Wait};
        Wait::new(
            &format!("the Node's verified booted image {want}"),
            Duration::from_mins(4),
        )
        .every(Duration::from_millis(500))
        .until(|| {
            let (booted, verified) = (
                self.node("{.status.bootedImage.digest}"),
                self.node("{.status.conditions[?(@.type==\"ImageVerified\")].status}"),
            );
            if booted == want && verified == "True" {
                Poll::Ready(())
            } else {
                Poll::Pending(format!("bootedImage {booted:?}, ImageVerified {verified:?}"))
            }
        })
        .unwrap_or_else(|e| {
            panic!(
                "{e}\nstatus: {}\noperator:\n{}\nconsole:\n{}",
                self.node("{.status}"),
                self.operator.log(),
                vm.console()
            )
        });
        vm.since_power_on()
    }

    /// Waits for `kubectl get nodes.walt.dev` to show the node Ready (the phase is the last probe's:
    /// an SSH probe may time out on a loaded machine, it settles).
    fn wait_ready(&self) {
        use walt_tests::wait::{Poll, Wait};
        Wait::new(
            "kubectl get nodes.walt.dev to show the node Ready",
            Duration::from_mins(1),
        )
        .every(Duration::from_millis(500))
        .until(|| {
            let table = self
                .cluster
                .kubectl_output(&["-n", &self.ns, "get", "nodes.walt.dev", "vm1"])
                .unwrap_or_default();
            if table.contains("Ready") {
                Poll::Ready(())
            } else {
                Poll::Pending(table)
            }
        })
        .unwrap_or_else(|e| panic!("{e}\nconditions: {}", self.node("{.status.conditions}")));
    }
}

/// Control plane tier, the whole path under the operator ([`OperatorLab`]): the operator makes the
/// Device its SSH host key (a Secret it owns, the public key in `status.hostKey`) and the boot
/// service serves it. The VM with the Device's MAC powers on and network-boots; the Node's
/// `status.bootedImage` becomes the Image's digest with `ImageVerified=True` (the operator logged in
/// with the node key, to that host key, and the boot service verified the digest mounted =
/// reported). OpenSSH checks the key independently: `ssh-keyscan` gets the Device's key from the
/// VM, and `ssh` with `StrictHostKeyChecking=yes` and a known_hosts made of the Device's status logs
/// in; `kubectl walt device show` prints its fingerprint as `ssh-keygen -lf` does. The Node then
/// moves to a second Image (`spec.image`): the operator reboots the device over SSH and the verified
/// digest becomes the second image's. Last, the key is made again (its Secret deleted): the VM,
/// booted with the former key, is refused (`Reachable=False HostKeyMismatch`, saying whose key is
/// expected and what to do).
#[test]
fn operator_verifies_the_image_a_vm_node_network_booted() {
    require_root().expect("root");
    let _vm = one_vm_at_a_time();
    let lab = OperatorLab::start(206, HostKeys::MadeByWalt, "", &[]);
    let set_up = lab.started.elapsed();
    let host_key = lab.wait_host_key_served(None);
    let secret = format!("walt-hostkey-{}", lab.device);
    let owner = lab
        .cluster
        .kubectl_output(&[
            "-n",
            &lab.ns,
            "get",
            "secret",
            &secret,
            "-o",
            "jsonpath={.metadata.ownerReferences[0].kind}/{.metadata.ownerReferences[0].name}",
        ])
        .expect("the host key Secret");
    assert_eq!(
        owner.trim(),
        format!("Device/{}", lab.device),
        "owned by the Device"
    );
    lab.wait_served();
    let mut vm = VmNode::power_on_rebootable(&lab.net, &lab.mac, lab.scratch.path()).expect("power on");
    let booted = vm
        .wait_console(BOOTED_MARKER, Duration::from_mins(5))
        .unwrap_or_else(|e| panic!("{e}\nboot server: {:?}", lab.server.journal()));
    // This boot service has no --persist-dir: walt-init says so on the console, and the boot goes on.
    assert!(
        vm.console().contains("walt-init: /persist is not mounted"),
        "{}",
        vm.console()
    );
    let verified = lab.verified_as(&vm, &lab.digest);
    let status = lab.node("{.status}");
    assert!(
        lab.node("{.status.boot.served}") == lab.digest && lab.node("{.status.boot.reported}") == lab.digest,
        "what the boot service served and the node reported: {status}"
    );
    assert_eq!(lab.node("{.status.device}"), lab.device, "{status}");
    lab.wait_ready();

    // OpenSSH sees the key walt made: ssh-keyscan, then ssh trusting only the Device's status.
    let ip = lab.net.device_ip(0).to_string();
    let (_, scanned) = output(in_netns(&lab.net, "ssh-keyscan").args(["-T", "10", "-t", "ed25519", &ip]));
    let answered = scanned
        .lines()
        .find(|l| l.starts_with(&ip))
        .unwrap_or_else(|| panic!("ssh-keyscan {ip}: {scanned}"));
    assert_eq!(
        key_fields(answered.trim_start_matches(&ip)),
        key_fields(&host_key),
        "the VM answers with the Device's key"
    );
    let known_hosts = lab.scratch.path().join("known_hosts");
    std::fs::write(&known_hosts, format!("{ip} {host_key}\n")).expect("known_hosts");
    let (ok, out) = ssh_to(
        &lab.net,
        &lab.scratch.path().join("node_key"),
        &known_hosts,
        "cat /etc/ssh/ssh_host_ed25519_key.pub",
    );
    assert!(ok && key_fields(&out) == key_fields(&host_key), "ssh: {out}");
    let fingerprint = ssh_fingerprint(&host_key, lab.scratch.path());
    let shown = Command::new(walt_tests::operator::plugin_binary())
        .env("KUBECONFIG", lab.cluster.kubeconfig())
        .args(["device", "show", &lab.device])
        .output()
        .expect("kubectl-walt");
    let shown = String::from_utf8_lossy(&shown.stdout).into_owned() + &String::from_utf8_lossy(&shown.stderr);
    assert!(
        shown.contains(&format!("Host key:     {fingerprint} (made by walt")),
        "device show: {shown}"
    );

    // The Node moves to the second image: the operator reboots the device over SSH, it
    // network-boots the new digest, verified.
    let moved_at = vm.since_power_on();
    lab.cluster
        .kubectl_output(&[
            "-n",
            &lab.ns,
            "patch",
            "nodes.walt.dev",
            "vm1",
            "--type=merge",
            "-p",
            r#"{"spec":{"image":"os2"}}"#,
        ])
        .expect("move the Node to os2");
    let reverified = lab.verified_as(&vm, &lab.digest2);
    let console = vm.console();
    assert!(
        console
            .lines()
            .any(|l| l.contains(BOOTED_MARKER) && l.contains(&lab.digest2)),
        "the VM rebooted into the second image: {console}"
    );
    assert_eq!(
        lab.node("{.status.boot.reported}"),
        lab.digest2,
        "{}",
        lab.node("{.status}")
    );

    // A new key (its Secret deleted: the operator makes another, never reusing the name's old
    // content): the VM still answers with the one it booted with, and the operator refuses it.
    let rotated_at = std::time::Instant::now();
    lab.cluster
        .kubectl_output(&["-n", &lab.ns, "delete", "secret", &secret])
        .expect("delete the host key Secret");
    let new_key = lab.wait_host_key_served(Some(&host_key));
    assert_ne!(key_fields(&new_key), key_fields(&host_key));
    let mut reachable = String::new();
    walt_tests::wait::Wait::new("the operator to refuse the former key", Duration::from_mins(1))
        .every(Duration::from_millis(500))
        .until(|| {
            reachable = lab.node(
                "{.status.conditions[?(@.type==\"Reachable\")].status} \
                 {.status.conditions[?(@.type==\"Reachable\")].reason} \
                 {.status.conditions[?(@.type==\"Reachable\")].message}",
            );
            reachable.starts_with("False HostKeyMismatch ")
        })
        .unwrap_or_else(|e| {
            panic!(
                "{e}: {reachable}\nevents:\n{}\noperator:\n{}\nconsole:\n{}",
                lab.events(),
                lab.operator.log(),
                vm.console()
            )
        });
    assert!(
        reachable.contains(&ssh_fingerprint(&new_key, lab.scratch.path()))
            && reachable.contains(&fingerprint)
            && reachable.contains(&format!("the one walt made for the Device {}", lab.device))
            && reachable.contains("power-cycle the device"),
        "the condition says which key was expected, which one answered, and what to do: {reachable}"
    );
    let refused = rotated_at.elapsed();
    // One boot at power-on, one for the move: the operator judged the new boot on its own record
    // (seen: judged on the record of the boot it left, it rebooted the VM a second time).
    let console = vm.console();
    let boots = console.lines().filter(|l| l.contains(BOOTED_MARKER)).count();
    assert_eq!(boots, 2, "the VM booted twice, no more: {console}");
    println!(
        "figures: operator path: set-up {:.1} s; power-on → booted marker {:.1} s, → Node bootedImage verified {:.1} s; \
         spec.image moved → second image verified {:.1} s; key made again → former key refused {:.1} s; test {:.1} s",
        set_up.as_secs_f64(),
        booted.as_secs_f64(),
        verified.as_secs_f64(),
        reverified.saturating_sub(moved_at).as_secs_f64(),
        refused.as_secs_f64(),
        lab.started.elapsed().as_secs_f64()
    );
}

/// The SHA256 fingerprint of a public key line, as OpenSSH's `ssh-keygen -lf` prints it.
fn ssh_fingerprint(public: &str, scratch: &std::path::Path) -> String {
    let file = scratch.join("fingerprint.pub");
    std::fs::write(&file, format!("{public}\n")).expect("write the public key");
    let (ok, out) = output(Command::new("ssh-keygen").arg("-lf").arg(&file));
    assert!(ok, "ssh-keygen -lf: {out}");
    out.split_whitespace()
        .nth(1)
        .filter(|f| f.starts_with("SHA256:"))
        .unwrap_or_else(|| panic!("a fingerprint in {out:?}"))
        .to_owned()
}

/// The type and key of an OpenSSH public key line (its comment left out).
fn key_fields(line: &str) -> String {
    line.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
}

/// The pod of the VM node `vm1` in `runtime`, once the operator has made one other than `not`: its
/// uid and its container's `walt-operator` arguments (the command must be `walt-operator`). The test
/// plays the kubelet: a pod being deleted is removed once its container stopped (the caller stops
/// the VM first).
fn vm_pod(lab: &OperatorLab, runtime: &str, not: Option<&str>) -> (String, Vec<String>) {
    use walt_tests::wait::{Poll, Wait};
    Wait::new("the operator to make the VM node's pod", Duration::from_mins(4))
        .every(Duration::from_millis(500))
        .until(|| {
            let json = lab
                .cluster
                .kubectl_output(&["-n", runtime, "get", "pod", "walt-node-vm1", "-o", "json"])
                .unwrap_or_default();
            let Ok(pod) = serde_json::from_str::<serde_json::Value>(&json) else {
                return Poll::Pending(format!("no pod yet; Node status {}", lab.node("{.status}")));
            };
            let uid = pod["metadata"]["uid"].as_str().unwrap_or_default().to_owned();
            if !pod["metadata"]["deletionTimestamp"].is_null() {
                let _ = lab.cluster.kubectl_output(&[
                    "-n",
                    runtime,
                    "delete",
                    "pod",
                    "walt-node-vm1",
                    "--grace-period=0",
                    "--force",
                ]);
                return Poll::Pending(format!("the pod {uid} being deleted"));
            }
            if Some(uid.as_str()) == not {
                return Poll::Pending(format!(
                    "the old pod {uid} still there; Node status {}",
                    lab.node("{.status}")
                ));
            }
            let container = &pod["spec"]["containers"][0];
            assert_eq!(
                container["command"],
                serde_json::json!(["walt-operator"]),
                "{pod}"
            );
            let args = container["args"]
                .as_array()
                .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
                .unwrap_or_default();
            Poll::Ready((uid, args))
        })
        .unwrap_or_else(|e| panic!("{e}\noperator:\n{}", lab.operator.log()))
}

/// Control plane tier, a **VM node** under the operator ([`OperatorLab`] with the Node `spec.virtual:
/// {kind: vm}`, the operator given `--vm-image`, `--vm-network default=br0`, `--vm-accel tcg` and a
/// 90 s boot watchdog). The operator makes the VM node pod `walt-node-vm1` in the runtime namespace;
/// the test plays the kubelet of the cluster node holding the lab bridge: it runs the pod's
/// `walt-operator` arguments in the lab namespace (no kubelet on this tier). That first pod is left
/// unstarted (a VM that never boots): the boot watchdog power-cycles it (a new pod, `BootTimeout`
/// "power-cycling the VM"). The new pod's VM network-boots through the boot service and the Node's
/// booted image is verified; a reboot request (`kubectl walt node reboot`'s annotation) power-cycles
/// it again (a new pod, Event `Reboot`), and the new VM boots, verified again.
#[test]
fn operator_powers_a_vm_node_and_power_cycles_it() {
    require_root().expect("root");
    let _vm = one_vm_at_a_time();
    let lab = OperatorLab::start(
        207,
        HostKeys::Pinned,
        ", virtual: {kind: vm, memory: 512Mi}",
        &[&VM_OPERATOR_ARGS[..], &["--boot-timeout", "90s"]].concat(),
    );
    let set_up = lab.started.elapsed();
    let runtime = format!("walt-run-{}", lab.ns);
    lab.wait_served();
    let (hung, args) = vm_pod(&lab, &runtime, None);
    assert_eq!(
        args.join(" "),
        format!(
            "vm --mac {} --bridge br0 --memory 512Mi --cpus 1 --accel tcg",
            lab.mac
        ),
        "the VM runner's arguments"
    );

    // The first VM never boots (its pod is never run): the watchdog power-cycles it.
    let cycled_at = std::time::Instant::now();
    let (first, args) = vm_pod(&lab, &runtime, Some(&hung));
    let watchdog = cycled_at.elapsed();
    let booted_reason = lab.node("{.status.conditions[?(@.type==\"Booted\")].message}");
    assert!(
        booted_reason.contains("power-cycling the VM (retry 1 of 9)"),
        "the watchdog's retry: {booted_reason}"
    );
    let mut vm = VmNode::power_on_as_pod(&lab.net, &args, lab.scratch.path()).expect("power on");
    let booted = vm
        .wait_console(BOOTED_MARKER, Duration::from_mins(5))
        .unwrap_or_else(|e| panic!("{e}\nboot server: {:?}", lab.server.journal()));
    let console = vm.console();
    assert!(
        console.contains(&format!("walt-operator vm: {} on br0", lab.mac))
            && console.contains(&format!(
                "walt-initrd: mounting 10.123.207.1:/var/lib/walt/nodes/{}/fs",
                lab.mac
            )),
        "the console holds the runner's line and the boot's (the kernel is `quiet`; its initramfs says what it mounts): {console}"
    );
    let verified = lab.verified_as(&vm, &lab.digest);
    lab.wait_ready();
    assert_eq!(
        lab.node("{.status.podNamespace}"),
        runtime,
        "where `node console` reads"
    );

    // A reboot request: the VM is power-cycled (a new pod), whether it answers or not.
    let requested = "2030-01-01T00:00:00Z";
    lab.cluster
        .kubectl_output(&[
            "-n",
            &lab.ns,
            "annotate",
            "nodes.walt.dev",
            "vm1",
            &format!("{}={requested}", walt_crds::request::REBOOT.requested),
        ])
        .expect("ask for a reboot");
    let asked = std::time::Instant::now();
    let (_second, args) = vm_pod(&lab, &runtime, Some(&first));
    drop(vm); // the kubelet stops the deleted pod's container: the VM powers off
    let events = lab
        .cluster
        .kubectl_output(&[
            "-n",
            &lab.ns,
            "get",
            "events",
            "--field-selector",
            "involvedObject.name=vm1",
        ])
        .unwrap_or_default();
    assert!(events.contains("power-cycling the VM"), "{events}");
    let mut vm = VmNode::power_on_as_pod(&lab.net, &args, lab.scratch.path()).expect("power on again");
    vm.wait_console(BOOTED_MARKER, Duration::from_mins(5))
        .unwrap_or_else(|e| panic!("{e}\nboot server: {:?}", lab.server.journal()));
    // The boot verified now is the new one: the boot service mounted the root and heard the
    // notification a second time.
    walt_tests::wait::Wait::new("the second boot's notification", Duration::from_mins(2))
        .every(Duration::from_millis(500))
        .until(|| {
            let journal = lab.server.journal();
            let of_vm = |protocol| {
                entries(&journal, protocol)
                    .iter()
                    .filter(|e| e["mac"] == lab.mac)
                    .count()
            };
            of_vm("nfs-mount") >= 2 && of_vm("boot-notification") >= 2
        })
        .unwrap_or_else(|e| panic!("{e}: {:?}", lab.server.journal()));
    lab.verified_as(&vm, &lab.digest);
    let reverified = asked.elapsed();
    let handled = lab.node(&format!(
        "{{.metadata.annotations.{}}}",
        walt_crds::request::REBOOT.handled.replace('.', "\\.")
    ));
    assert_eq!(handled, requested, "the reboot request is handled");
    println!(
        "figures: VM node: set-up {:.1} s; watchdog power cycle after {:.1} s; power-on → booted marker {:.1} s, \
         → Node bootedImage verified {:.1} s; reboot asked → VM verified again {:.1} s; test {:.1} s",
        set_up.as_secs_f64(),
        watchdog.as_secs_f64(),
        booted.as_secs_f64(),
        verified.as_secs_f64(),
        reverified.as_secs_f64(),
        lab.started.elapsed().as_secs_f64()
    );
}
