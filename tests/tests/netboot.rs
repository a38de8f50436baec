//! Network boot on the component tier: `walt-operator boot-server` serving OCI images pulled from a
//! real registry, inside network namespaces this test creates.
//!
//! 1. Without a VM: an image of two layers (a deletion, a replaced directory, a hard link, a symlink
//!    chain into `/boot/<model>/`) served over NFSv3 (checked with libnfs's `nfs-ls`/`nfs-cat`, a
//!    client independent of ours, through the portmapper), TFTP (busybox `tftp` with `blksize`) and
//!    HTTP (busybox `wget`), under the three export keys (MAC, address, host name); an unknown key is
//!    refused; the journal records the image digest served at MOUNT, TFTP and HTTP time.
//! 2. A VM node (`qemu-system-x86_64 -accel tcg`, iPXE ROM) on a bridge in a lab namespace powers on,
//!    gets its address and boot file from our authoritative DHCP, loads `start.ipxe`, the Debian
//!    kernel and an initramfs over HTTP, mounts its root read-only over NFSv3 from our server,
//!    `walt-init` stacks the RAM overlay, and init prints the booted marker on the serial console. The
//!    figures (power-on → DHCP → kernel → NFS mount → booted) are printed. A VM whose MAC is not
//!    registered gets no image.

use std::process::Command;
use std::time::Duration;

use walt_tests::images::{Arch, OciLayout};
use walt_tests::netboot::{
    BOOTED_MARKER, BootServer, LabNetwork, MODEL, ReferenceServers, VmNode, debian_kernel, in_netns,
    install_host_sshd, output, vm_image_root,
};
use walt_tests::registry::Registry;
use walt_tests::{require_root, run};

fn entries<'a>(journal: &'a [serde_json::Value], protocol: &str) -> Vec<&'a serde_json::Value> {
    journal.iter().filter(|e| e["protocol"] == protocol).collect()
}

const MAC: &str = "52:54:00:aa:00:01";

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
    let server = BootServer::start(
        &net,
        scratch.path(),
        Some(&registry),
        &["--device".into(), device],
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
    let (ok, refused) =
        output(in_netns(&net, "nfs-ls").arg("nfs://127.0.0.1/var/lib/walt/nodes/someone-else/fs/"));
    assert!(
        !ok && refused.contains("MNT3ERR_NOENT"),
        "an unknown export is refused: {refused}"
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

#[test]
fn vm_node_network_boots_its_image() {
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
    install_host_sshd(&root, public.trim()).expect("sshd in the image");
    let registry = Registry::start().expect("registry");
    let layout = OciLayout::new().expect("layout");
    layout.new_image("empty", Arch::Amd64).expect("new image");
    layout
        .add_layer_from_dir("empty", "vm", &root)
        .expect("image layer");
    layout.set_label("vm", "walt.node.models", MODEL).expect("label");
    let digest = layout.push("vm", &registry, "netboot/vm:latest").expect("push");
    let mut net = LabNetwork::create(202).expect("lab network");
    let device = format!(
        "mac={MAC},ip={},name=vm1,model={MODEL},image={}",
        net.device_ip(0),
        registry.reference("netboot/vm:latest")
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
        ],
    );

    let mut vm = VmNode::power_on(&mut net, MAC, scratch.path()).expect("power on");
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

    // SSH into the node: its root is the image over NFS, read-only, under a RAM overlay whose upper
    // dir is at the WalT path.
    let ssh = |command: &str| {
        output(
            in_netns(&net, "ssh")
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
    let dhcp = at("dhcp", "offer");
    let kernel_at = at("http", "vmlinuz");
    let mount = at("nfs-mount", MAC);
    println!(
        "figures: power-on → booted marker {:.1} s, → SSH ready {:.1} s; DHCP offer → kernel request {:.1} s; kernel request → NFS mount {:.1} s; \
         console marker: {marker}",
        booted.as_secs_f64(),
        ssh_at.as_secs_f64(),
        (kernel_at.saturating_sub(dhcp)) as f64 / 1000.0,
        (mount.saturating_sub(kernel_at)) as f64 / 1000.0,
    );
    drop(vm);

    // A device nobody registered: DHCP records it and serves nothing.
    let stranger = "52:54:00:aa:00:99";
    let _vm2 = VmNode::power_on(&mut net, stranger, scratch.path()).expect("power on");
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
    install_host_sshd(&root, public.trim()).expect("sshd in the image");
    let registry = Registry::start().expect("registry");
    let layout = OciLayout::new().expect("layout");
    layout.new_image("empty", Arch::Amd64).expect("new image");
    layout
        .add_layer_from_dir("empty", "vm", &root)
        .expect("image layer");
    layout.push("vm", &registry, "netboot/vm:latest").expect("push");
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

    let mut net = LabNetwork::create(203).expect("lab network");
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
    let boot_once = |net: &mut LabNetwork, label: &str| {
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
            walt.push(boot_once(&mut net, "walt"));
        }
        {
            let _reference =
                ReferenceServers::start(&net, scratch.path(), &root, Some((MAC, ip, "vm1", &tftp)))
                    .expect("dnsmasq + ganesha");
            reference.push(boot_once(&mut net, "dnsmasq+ganesha"));
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
