//! Component tests of the OCI engine against a real registry (Debian `docker-registry` on 127.0.0.1),
//! checked independently with `skopeo` + `umoci`. Run as root (overlay mounts, devices, owners, xattrs).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use walt_operator::oci::{
    ChangeSource, ClientOptions, CommitOptions, Compression, Credentials, Error, LayerCache, Platform,
    RegistryClient,
};
use walt_operator::overlay::LayerOptions;
use walt_tests::images::{self, Arch, OciLayout};
use walt_tests::registry::Registry;
use walt_tests::tree::{Snapshot, SnapshotOptions, assert_same_tree};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn client_for(registry: &Registry) -> RegistryClient {
    RegistryClient::new(ClientOptions::insecure([registry.host()])).expect("client")
}

fn sh(script: &str) {
    let status = Command::new("sh").arg("-ec").arg(script).status().expect("sh");
    assert!(status.success(), "shell step failed: {script}");
}

/// An overlay mount (lower: a busybox rootfs; upper and work dirs on disk); unmounted on drop.
struct Overlay {
    merged: PathBuf,
    upper: PathBuf,
    mounted: bool,
}

impl Overlay {
    fn mount(lower: &Path, dir: &Path) -> Overlay {
        let upper = dir.join("upper");
        let work = dir.join("work");
        let merged = dir.join("merged");
        for d in [&upper, &work, &merged] {
            std::fs::create_dir_all(d).expect("mkdir");
        }
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        );
        let status = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o", &options])
            .arg(&merged)
            .status()
            .expect("mount");
        assert!(status.success(), "mounting overlay failed (tests need root)");
        Overlay {
            merged,
            upper,
            mounted: true,
        }
    }

    fn unmount(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg(&self.merged).status();
            self.mounted = false;
        }
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        self.unmount();
    }
}

/// Makes every kind of change through the merged view of an overlay over the busybox rootfs.
fn make_changes(merged: &Path) {
    let m = merged.display();
    sh(&format!(
        r"
        cd {m}
        echo 'walt:x:1000:1000::/home/walt:/bin/sh' >> etc/passwd      # modified
        rm etc/group                                                    # deleted file
        rm -rf var/log                                                  # deleted dir
        rm -rf usr/share/doc && mkdir -p usr/share/doc && echo new > usr/share/doc/only-this   # opaque dir
        mkdir -p empty-dir home/walt                                   # empty dirs
        chown 1000:1000 home/walt && chmod 0750 home/walt
        echo hello > home/walt/hello && chown 1000:1000 home/walt/hello && chmod 0640 home/walt/hello
        echo shared > hard1 && ln hard1 hard2 && ln hard1 home/hard3     # hard links
        ln -s /bin/busybox usr/bin/new-symlink && ln -s ../hard1 home/rel-symlink
        mknod chardev c 10 200 && mknod blockdev b 7 0 && mkfifo fifo  # devices, fifo
        chmod 4755 hard1                                                 # set-uid bit
        setfattr -n user.walt -v 'xattr value' home/walt/hello
        setfattr -n trusted.walt -v trusted home/walt
        long=$(printf 'n%.0s' $(seq 1 200)); mkdir -p deep/$long/$long && echo long > deep/$long/$long/$long
        echo 'non-ascii' > 'héllo-ünïcödé-日本語' && ln -s 'héllo-ünïcödé-日本語' 'lien-ñ'
        dd if=/dev/urandom of=sparse bs=4096 count=1 seek=2560 2>/dev/null   # 10 MiB, mostly a hole
        dd if=/dev/urandom of=big bs=1M count=3 2>/dev/null
        rm bin/ls bin/cat                                               # two whiteouts (one shared inode)
        "
    ));
}

struct Fixture {
    registry: Registry,
    base_ref: String,
    _base_layout: OciLayout,
    base_rootfs: tempfile::TempDir,
}

fn fixture() -> Fixture {
    walt_tests::require_root().expect("root");
    let registry = Registry::start().expect("registry");
    let layout = OciLayout::walt_busybox(Arch::Amd64, "pc-x86-64,qemu-arm64").expect("busybox image");
    layout
        .push("base", &registry, "lab/busybox:base")
        .expect("push base");
    let base_rootfs = tempfile::tempdir().expect("tempdir");
    let rootfs = layout
        .umoci_unpack("base", base_rootfs.path())
        .expect("umoci unpack base");
    assert!(rootfs.join("bin/busybox").is_file());
    Fixture {
        registry,
        base_ref: "lab/busybox:base".into(),
        _base_layout: layout,
        base_rootfs,
    }
}

fn snapshot_options() -> SnapshotOptions {
    SnapshotOptions::default()
}

#[test]
fn registry_fixture_starts_with_and_without_auth() {
    let registry = Registry::start().expect("registry");
    assert_eq!(registry.get_status("/v2/").expect("GET /v2/"), 200);
    let secured = Registry::start_with_basic_auth("walt", "s3cret").expect("registry with auth");
    assert_eq!(secured.get_status_with("/v2/", None).expect("GET /v2/"), 401);
    assert_eq!(secured.get_status("/v2/").expect("GET /v2/ with auth"), 200);
}

#[test]
fn commit_of_an_upper_dir_unpacks_with_umoci_to_the_merged_tree() {
    let fx = fixture();
    let rt = runtime();
    let client = client_for(&fx.registry);
    let work = tempfile::tempdir().expect("tempdir");
    let lower = fx.base_rootfs.path().join("bundle/rootfs");
    let mut overlay = Overlay::mount(&lower, work.path());
    make_changes(&overlay.merged);
    let expected = Snapshot::take(&overlay.merged, &snapshot_options()).expect("snapshot merged");
    overlay.unmount();

    let base = rt
        .block_on(client.resolve(&fx.registry.reference(&fx.base_ref), None))
        .expect("resolve base");
    assert_eq!(
        base.labels.get("walt.node.models").map(String::as_str),
        Some("pc-x86-64,qemu-arm64")
    );
    let mut options = CommitOptions::new("walt image shell");
    options.layer.lower_dirs = vec![lower.clone()];
    let target = fx.registry.reference("lab/result");
    let pushed = rt
        .block_on(client.push_on_top(
            &base,
            &target,
            ChangeSource::UpperDir(overlay.upper.clone()),
            options,
        ))
        .expect("push on top");
    assert!(pushed.summary.deleted >= 4, "summary: {:?}", pushed.summary);
    assert!(
        pushed.summary.added > 10 && pushed.summary.modified >= 2,
        "summary: {:?}",
        pushed.summary
    );

    // Independent check: skopeo copy + umoci unpack of the pushed digest gives exactly the merged tree.
    let check = tempfile::tempdir().expect("tempdir");
    let rootfs = images::skopeo_umoci_unpack(
        &fx.registry,
        &format!("lab/result@{}", pushed.manifest_digest),
        check.path(),
    )
    .expect("skopeo + umoci unpack");
    let actual = Snapshot::take(&rootfs, &snapshot_options()).expect("snapshot");
    expected.assert_same(&actual);
    let sparse = actual.get("sparse").expect("sparse file");
    assert!(matches!(
        sparse.kind,
        walt_tests::tree::Kind::File { size: 10_489_856, .. }
    ));
    assert!(actual.get("etc/group").is_none() && actual.get("var/log").is_none());
    assert_eq!(
        actual.hard_link_groups,
        vec![vec![
            PathBuf::from("hard1"),
            PathBuf::from("hard2"),
            PathBuf::from("home/hard3")
        ]]
    );

    // The config keeps the labels, appends the diff_id and a history entry.
    let config =
        images::skopeo_inspect_config(&fx.registry, &format!("lab/result@{}", pushed.manifest_digest))
            .expect("config");
    assert_eq!(
        config["config"]["Labels"]["walt.node.models"],
        "pc-x86-64,qemu-arm64"
    );
    let diff_ids = config["rootfs"]["diff_ids"].as_array().expect("diff_ids");
    assert_eq!(diff_ids.len(), base.layers.len() + 1);
    assert_eq!(
        diff_ids.last().and_then(|v| v.as_str()),
        Some(pushed.diff_id.as_str())
    );
    let history = config["history"].as_array().expect("history");
    assert_eq!(
        history.last().expect("history entry")["created_by"],
        "walt image shell"
    );
    // By digest only: no tag was created.
    assert!(images::skopeo_inspect_raw(&fx.registry, "lab/result:latest").is_err());
    rt.block_on(client.tag(&target, &pushed.manifest_digest, "v1"))
        .expect("tag");
    let tagged = images::skopeo_inspect_raw(&fx.registry, "lab/result:v1").expect("tagged manifest");
    assert_eq!(
        tagged["layers"].as_array().map(Vec::len),
        Some(base.layers.len() + 1)
    );

    // The same change gives the same layer.
    let again = rt
        .block_on(client.push_on_top(
            &base,
            &target,
            ChangeSource::UpperDir(overlay.upper.clone()),
            CommitOptions::new("walt image shell"),
        ))
        .expect("second push");
    assert_eq!(again.layer_digest, pushed.layer_digest);
    assert_eq!(again.diff_id, pushed.diff_id);

    // A GNU tar stream of the same upper dir (what a node sends) gives the same tree.
    let mut child = Command::new("tar")
        .args(["--xattrs", "--xattrs-include=*", "--sort=name", "-C"])
        .arg(&overlay.upper)
        .args(["-cf", "-", "."])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("tar");
    let stream = child.stdout.take().expect("tar stdout");
    let from_stream = rt
        .block_on(client.push_on_top(
            &base,
            &target,
            ChangeSource::TarStream(Box::new(stream)),
            CommitOptions::new("walt node save n1"),
        ))
        .expect("push tar stream");
    assert!(child.wait().expect("tar").success());
    assert_eq!(from_stream.summary.deleted, pushed.summary.deleted);
    let check2 = tempfile::tempdir().expect("tempdir");
    let rootfs2 = images::skopeo_umoci_unpack(
        &fx.registry,
        &format!("lab/result@{}", from_stream.manifest_digest),
        check2.path(),
    )
    .expect("skopeo + umoci unpack");
    expected.assert_same(&Snapshot::take(&rootfs2, &snapshot_options()).expect("snapshot"));

    // zstd: our own reader checks it (umoci 0.4 does not read zstd).
    let mut zstd_options = CommitOptions::new("walt image shell");
    zstd_options.compression = Compression::Zstd;
    let zstd = rt
        .block_on(client.push_on_top(
            &base,
            &target,
            ChangeSource::UpperDir(overlay.upper.clone()),
            zstd_options,
        ))
        .expect("zstd push");
    assert_eq!(zstd.diff_id, pushed.diff_id);
    let manifest = images::skopeo_inspect_raw(&fx.registry, &format!("lab/result@{}", zstd.manifest_digest))
        .expect("manifest");
    assert_eq!(
        manifest["layers"]
            .as_array()
            .and_then(|l| l.last())
            .map(|l| l["mediaType"].clone()),
        Some("application/vnd.oci.image.layer.v1.tar+zstd".into())
    );
    let ours = tempfile::tempdir().expect("tempdir");
    rt.block_on(client.unpack_image(
        &format!("{target}@{}", zstd.manifest_digest),
        None,
        &ours.path().join("rootfs"),
    ))
    .expect("our unpack of zstd image");
    expected
        .assert_same(&Snapshot::take(&ours.path().join("rootfs"), &snapshot_options()).expect("snapshot"));
}

#[test]
fn node_save_exclusions_and_ready_marker_filter() {
    let fx = fixture();
    let rt = runtime();
    let client = client_for(&fx.registry);
    let upper = tempfile::tempdir().expect("tempdir");
    let u = upper.path().display();
    sh(&format!(
        "cd {u} && mkdir -p var/log etc run/walt && echo x > var/log/syslog && echo x > etc/machine-id && touch run/x.lock \
         && echo keep > etc/hostname && touch -d '2001-01-01' etc/old-file && mkdir old-dir && touch -d '2001-01-01' old-dir/f old-dir"
    ));
    let base = rt
        .block_on(client.resolve(&fx.registry.reference(&fx.base_ref), None))
        .expect("resolve");
    let mut options = CommitOptions::new("walt node save n1");
    options.layer = LayerOptions::node_save();
    options.layer.changed_after = Some(std::time::SystemTime::now() - std::time::Duration::from_hours(1));
    // ctime counts on disk: make the old entries really old by checking mtime via the tar stream instead.
    let mut child = Command::new("tar")
        .arg("-C")
        .arg(upper.path())
        .args(["-cf", "-", "."])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("tar");
    let stream = child.stdout.take().expect("stdout");
    let pushed = rt
        .block_on(client.push_on_top(
            &base,
            &fx.registry.reference("lab/saved"),
            ChangeSource::TarStream(Box::new(stream)),
            options,
        ))
        .expect("push");
    assert!(child.wait().expect("tar").success());
    let check = tempfile::tempdir().expect("tempdir");
    let rootfs = images::skopeo_umoci_unpack(
        &fx.registry,
        &format!("lab/saved@{}", pushed.manifest_digest),
        check.path(),
    )
    .expect("unpack");
    assert_eq!(
        std::fs::read_to_string(rootfs.join("etc/hostname")).expect("hostname"),
        "keep\n"
    );
    for absent in [
        "var/log/syslog",
        "etc/machine-id",
        "run/x.lock",
        "etc/old-file",
        "old-dir",
    ] {
        assert!(
            rootfs.join(absent).symlink_metadata().is_err(),
            "{absent} should have been left out"
        );
    }
    assert!(rootfs.join("var/log").is_dir(), "the base's /var/log stays");
}

/// An image made by umoci with several layers, deletions and a deleted directory.
fn multi_layer_layout() -> OciLayout {
    let layout = OciLayout::busybox(Arch::Amd64).expect("busybox");
    layout
        .add_layer("base", "l2", |root| {
            std::fs::create_dir_all(root.join("srv/data"))?;
            std::fs::write(root.join("srv/data/a"), "a")?;
            std::fs::write(root.join("srv/b"), "b")?;
            std::fs::set_permissions(root.join("srv/b"), std::fs::Permissions::from_mode(0o600))?;
            std::fs::remove_dir_all(root.join("usr/share/doc"))?;
            std::fs::remove_file(root.join("etc/inittab"))?;
            xattr::set(root.join("srv/b"), "user.k", b"v")?;
            Ok(())
        })
        .expect("layer 2");
    layout
        .add_layer("l2", "l3", |root| {
            std::fs::remove_dir_all(root.join("srv/data"))?;
            std::fs::write(root.join("srv/c"), "c")?;
            std::os::unix::fs::symlink("/srv/c", root.join("srv/link"))?;
            std::fs::hard_link(root.join("srv/c"), root.join("srv/c2"))?;
            Ok(())
        })
        .expect("layer 3");
    layout
        .set_label("l3", "walt.node.models", "rpi-b")
        .expect("label");
    layout
}

#[test]
fn our_unpack_and_layer_cache_match_umoci_unpack() {
    walt_tests::require_root().expect("root");
    let registry = Registry::start().expect("registry");
    let rt = runtime();
    let client = client_for(&registry);
    let layout = multi_layer_layout();
    layout.push("l3", &registry, "lab/multi:3").expect("push");
    let reference = registry.reference("lab/multi:3");

    let umoci = tempfile::tempdir().expect("tempdir");
    let expected = layout.umoci_unpack("l3", umoci.path()).expect("umoci unpack");
    let ours = tempfile::tempdir().expect("tempdir");
    let image = rt
        .block_on(client.unpack_image(&reference, None, &ours.path().join("rootfs")))
        .expect("our unpack");
    assert_eq!(image.layers.len(), 3);
    assert_eq!(
        image.labels.get("walt.node.models").map(String::as_str),
        Some("rpi-b")
    );
    assert_same_tree(&expected, &ours.path().join("rootfs"), &snapshot_options());

    // Layer cache in overlay form: stacked with overlay it gives the same tree.
    let cache_dir = tempfile::tempdir().expect("tempdir");
    let cache = LayerCache::new(cache_dir.path()).expect("cache");
    let pulled = rt
        .block_on(client.pull_image(&cache, &reference, None))
        .expect("pull");
    assert_eq!(pulled.lower_dirs.len(), 3);
    assert_eq!(pulled.platform, Platform::parse("linux/amd64").expect("platform"));
    let again = rt
        .block_on(client.pull_image(&cache, &reference, None))
        .expect("pull again (cached)");
    assert_eq!(again.lower_dirs, pulled.lower_dirs);
    let mnt = tempfile::tempdir().expect("tempdir");
    let lowers = pulled
        .lower_dirs
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    let merged = mnt.path().join("merged");
    std::fs::create_dir(&merged).expect("mkdir");
    let status = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o"])
        .arg(format!("lowerdir={lowers}"))
        .arg(&merged)
        .status()
        .expect("mount");
    assert!(status.success());
    let result = std::panic::catch_unwind(|| assert_same_tree(&expected, &merged, &snapshot_options()));
    let _ = Command::new("umount").arg(&merged).status();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
    assert!(
        std::fs::read_dir(cache_dir.path().join("tmp"))
            .expect("tmp")
            .next()
            .is_none(),
        "no leftovers in the cache"
    );
}

fn raw_layer(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    build(&mut builder);
    builder.into_inner().expect("tar")
}

fn raw_header(name: &[u8], kind: tar::EntryType, size: u64, link: Option<&[u8]>) -> tar::Header {
    let mut header = tar::Header::new_ustar();
    {
        let old = header.as_old_mut();
        old.name = [0; 100];
        old.name[..name.len()].copy_from_slice(name);
        if let Some(link) = link {
            old.linkname = [0; 100];
            old.linkname[..link.len()].copy_from_slice(link);
        }
    }
    header.set_entry_type(kind);
    header.set_size(size);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_cksum();
    header
}

fn assert_refused(client: &RegistryClient, rt: &tokio::runtime::Runtime, reference: &str, expect: &str) {
    let cache_dir = tempfile::tempdir().expect("tempdir");
    let cache = LayerCache::new(cache_dir.path()).expect("cache");
    let error = rt
        .block_on(client.pull_image(&cache, reference, None))
        .expect_err("malicious layer must be refused");
    let message = error.to_string();
    assert!(
        message.contains(expect),
        "error {message:?} should mention {expect:?}"
    );
    assert!(
        std::fs::read_dir(cache_dir.path().join("tmp"))
            .expect("tmp")
            .next()
            .is_none(),
        "leftover in cache tmp"
    );
    let unpacked: Vec<_> = std::fs::read_dir(cache_dir.path().join("sha256"))
        .expect("layers")
        .collect();
    assert_eq!(unpacked.len(), 1, "only the good base layer may be in the cache");
    let outside = tempfile::tempdir().expect("tempdir");
    let error = rt
        .block_on(client.unpack_image(reference, None, &outside.path().join("rootfs")))
        .expect_err("refused");
    assert!(error.to_string().contains(expect), "{error}");
}

#[test]
fn malicious_layers_and_corrupt_blobs_are_refused() {
    walt_tests::require_root().expect("root");
    let registry = Registry::start().expect("registry");
    let rt = runtime();
    let client = client_for(&registry);
    let layout = OciLayout::busybox(Arch::Amd64).expect("busybox");

    let traversal = raw_layer(|b| {
        b.append(
            &raw_header(b"../../../tmp/walt-escaped", tar::EntryType::Regular, 4, None),
            &b"evil"[..],
        )
        .expect("append");
    });
    layout
        .append_raw_layer("base", "traversal", &traversal, true)
        .expect("layer");
    layout
        .push("traversal", &registry, "lab/evil:traversal")
        .expect("push");
    assert_refused(&client, &rt, &registry.reference("lab/evil:traversal"), "`..`");

    let absolute = raw_layer(|b| {
        b.append(
            &raw_header(b"/tmp/walt-absolute", tar::EntryType::Regular, 4, None),
            &b"evil"[..],
        )
        .expect("append");
    });
    layout
        .append_raw_layer("base", "absolute", &absolute, false)
        .expect("layer");
    layout
        .push("absolute", &registry, "lab/evil:absolute")
        .expect("push");
    assert_refused(
        &client,
        &rt,
        &registry.reference("lab/evil:absolute"),
        "absolute path",
    );

    let through_link = raw_layer(|b| {
        b.append(
            &raw_header(b"escape", tar::EntryType::Symlink, 0, Some(b"/tmp")),
            std::io::empty(),
        )
        .expect("append");
        b.append(
            &raw_header(b"escape/walt-through-link", tar::EntryType::Regular, 4, None),
            &b"evil"[..],
        )
        .expect("append");
    });
    layout
        .append_raw_layer("base", "through-link", &through_link, true)
        .expect("layer");
    layout
        .push("through-link", &registry, "lab/evil:through-link")
        .expect("push");
    assert_refused(
        &client,
        &rt,
        &registry.reference("lab/evil:through-link"),
        "goes through the symlink",
    );

    let hard_link = raw_layer(|b| {
        b.append(
            &raw_header(
                b"passwd",
                tar::EntryType::Link,
                0,
                Some(b"../../../../etc/passwd"),
            ),
            std::io::empty(),
        )
        .expect("append");
    });
    layout
        .append_raw_layer("base", "hard-link", &hard_link, true)
        .expect("layer");
    layout
        .push("hard-link", &registry, "lab/evil:hard-link")
        .expect("push");
    assert_refused(
        &client,
        &rt,
        &registry.reference("lab/evil:hard-link"),
        "leaves the layer",
    );

    let climbing = raw_layer(|b| {
        b.append(
            &raw_header(b"up", tar::EntryType::Symlink, 0, Some(b"../../../etc")),
            std::io::empty(),
        )
        .expect("append");
    });
    layout
        .append_raw_layer("base", "climbing", &climbing, true)
        .expect("layer");
    layout
        .push("climbing", &registry, "lab/evil:climbing")
        .expect("push");
    assert_refused(
        &client,
        &rt,
        &registry.reference("lab/evil:climbing"),
        "climbs above the root",
    );
    assert!(
        Path::new("/tmp/walt-escaped").symlink_metadata().is_err()
            && Path::new("/tmp/walt-through-link").symlink_metadata().is_err()
    );

    // A blob whose bytes do not match its digest (the registry serves it anyway).
    let good = raw_layer(|b| {
        let mut data = Vec::new();
        for i in 0..20_000 {
            writeln!(data, "line {i}").expect("write");
        }
        b.append(
            &raw_header(b"data", tar::EntryType::Regular, data.len() as u64, None),
            &data[..],
        )
        .expect("append");
    });
    layout
        .append_raw_layer("base", "corrupt", &good, true)
        .expect("layer");
    layout
        .push("corrupt", &registry, "lab/evil:corrupt")
        .expect("push");
    let manifest = images::skopeo_inspect_raw(&registry, "lab/evil:corrupt").expect("manifest");
    let digest = manifest["layers"][1]["digest"]
        .as_str()
        .expect("digest")
        .to_owned();
    registry.corrupt_blob(&digest).expect("corrupt");
    let cache_dir = tempfile::tempdir().expect("tempdir");
    let cache = LayerCache::new(cache_dir.path()).expect("cache");
    let error = rt
        .block_on(client.pull_image(&cache, &registry.reference("lab/evil:corrupt"), None))
        .expect_err("corrupt blob refused");
    assert!(
        matches!(
            error,
            Error::DigestMismatch { .. } | Error::Layer { .. } | Error::Internal(_)
        ),
        "{error}"
    );
    assert!(
        !cache.contains(&digest),
        "a corrupt layer must not enter the cache"
    );
    assert!(
        std::fs::read_dir(cache_dir.path().join("tmp"))
            .expect("tmp")
            .next()
            .is_none()
    );
}

#[test]
fn index_resolution_auth_and_errors_name_the_registry() {
    walt_tests::require_root().expect("root");
    let registry = Registry::start_with_basic_auth("walt", "s3cret").expect("registry");
    let rt = runtime();
    let layout = OciLayout::new().expect("layout");
    for arch in [Arch::Amd64, Arch::Arm64] {
        layout
            .new_image(&format!("empty-{}", arch.name()), arch)
            .expect("new");
        layout
            .add_layer(&format!("empty-{}", arch.name()), arch.name(), |root| {
                images::busybox_rootfs(arch, root).map_err(std::io::Error::other)
            })
            .expect("layer");
        layout
            .set_label(arch.name(), "walt.node.models", &format!("model-{}", arch.name()))
            .expect("label");
    }
    layout.make_index(&["amd64", "arm64"], "multi").expect("index");
    layout
        .push("multi", &registry, "lab/multi:latest")
        .expect("push index");

    let anonymous = RegistryClient::new(ClientOptions::insecure([registry.host()])).expect("client");
    let error = rt
        .block_on(anonymous.resolve(&registry.reference("lab/multi:latest"), None))
        .expect_err("needs auth");
    let message = error.to_string();
    assert!(
        message.contains(&registry.host()) && message.contains("lab/multi"),
        "{message}"
    );

    let credentials =
        Credentials::from_docker_config_json(registry.docker_config_json().as_bytes()).expect("credentials");
    let client = RegistryClient::new(ClientOptions {
        credentials,
        insecure_registries: vec![registry.host()],
        timeout: None,
    })
    .expect("client");
    let arm = Platform::parse("linux/arm64").expect("platform");
    let image = rt
        .block_on(client.resolve(&registry.reference("lab/multi:latest"), Some(&arm)))
        .expect("resolve arm64");
    assert_eq!(image.platform.architecture, "arm64");
    assert!(image.index_digest.is_some());
    assert_eq!(
        image.labels.get("walt.node.models").map(String::as_str),
        Some("model-arm64")
    );
    let riscv = Platform::parse("linux/riscv64").expect("platform");
    let error = rt
        .block_on(client.resolve(&registry.reference("lab/multi:latest"), Some(&riscv)))
        .expect_err("no riscv64");
    assert!(
        error.to_string().contains("linux/amd64") && error.to_string().contains("linux/arm64"),
        "{error}"
    );

    // Push with credentials, to another repository (blobs mounted), and check with skopeo.
    let upper = tempfile::tempdir().expect("tempdir");
    std::fs::write(upper.path().join("added"), "x").expect("write");
    let pushed = rt
        .block_on(client.push_on_top(
            &image,
            &registry.reference("other/arm"),
            ChangeSource::UpperDir(upper.path().into()),
            CommitOptions::new("walt image shell"),
        ))
        .expect("push with auth");
    let check = tempfile::tempdir().expect("tempdir");
    let rootfs = images::skopeo_umoci_unpack(
        &registry,
        &format!("other/arm@{}", pushed.manifest_digest),
        check.path(),
    )
    .expect("unpack");
    assert_eq!(std::fs::read_to_string(rootfs.join("added")).expect("added"), "x");
    assert!(rootfs.join("bin/busybox").is_file());
    let _ = BTreeMap::<String, String>::new();
}

#[test]
fn cli_commit_upper_and_unpack() {
    let fx = fixture();
    let upper = tempfile::tempdir().expect("tempdir");
    std::fs::write(upper.path().join("from-cli"), "cli\n").expect("write");
    let output = Command::new(env!("CARGO_BIN_EXE_walt-operator"))
        .args(["oci", "commit-upper", "--upper"])
        .arg(upper.path())
        .args([
            "--base",
            &fx.registry.reference(&fx.base_ref),
            "--to",
            &fx.registry.reference("lab/cli"),
            "--tag",
            "v1",
        ])
        .args(["--insecure-registry", &fx.registry.host()])
        .output()
        .expect("walt-operator");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("pushed ") && stdout.contains("changes: 1 added, 0 modified, 0 deleted, 4 bytes"),
        "{stdout}"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let output = Command::new(env!("CARGO_BIN_EXE_walt-operator"))
        .args(["oci", "unpack", &fx.registry.reference("lab/cli:v1")])
        .arg(dir.path().join("rootfs"))
        .args(["--insecure-registry", &fx.registry.host()])
        .output()
        .expect("walt-operator");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("rootfs/from-cli")).expect("file"),
        "cli\n"
    );
    let output = Command::new(env!("CARGO_BIN_EXE_walt-operator"))
        .args(["oci", "unpack", "127.0.0.1:1/none:x", "/tmp/walt-never"])
        .args(["--insecure-registry", "127.0.0.1:1"])
        .output()
        .expect("walt-operator");
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("registry 127.0.0.1:1, repository none"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `walt-operator oci unpack REF DIR` as a user runs it: (success, stdout + stderr).
fn cli_unpack(registry: &Registry, reference: &str, dir: &Path) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_walt-operator"))
        .args(["oci", "unpack", &registry.reference(reference)])
        .arg(dir)
        .args(["--insecure-registry", &registry.host()])
        .output()
        .expect("walt-operator");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// (mode, mtime) of a path, not following a symlink.
fn mode_and_mtime(path: &Path) -> (u32, i64) {
    use std::os::unix::fs::MetadataExt as _;
    let meta = path.symlink_metadata().expect("metadata");
    (meta.mode() & 0o7777, meta.mtime())
}

#[test]
fn a_directory_replaced_by_a_symlink_to_the_host_leaves_the_host_untouched() {
    walt_tests::require_root().expect("root");
    let registry = Registry::start().expect("registry");
    let rt = runtime();
    let client = client_for(&registry);
    let layout = OciLayout::busybox(Arch::Amd64).expect("busybox");
    let host = tempfile::tempdir().expect("tempdir");
    let victim = host.path().join("host-dir");
    std::fs::create_dir(&victim).expect("mkdir");
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let time = filetime::FileTime::from_unix_time(1_700_000_000, 0);
    filetime::set_file_times(&victim, time, time).expect("utimes");
    let before = mode_and_mtime(&victim);

    let victim_bytes = victim.as_os_str().as_encoded_bytes();
    let layer = raw_layer(|b| {
        let mut dir = raw_header(b"etc/evil/", tar::EntryType::Directory, 0, None);
        dir.set_mode(0o777);
        dir.set_cksum();
        b.append(&dir, std::io::empty()).expect("append");
        b.append(
            &raw_header(b"etc/evil", tar::EntryType::Symlink, 0, Some(victim_bytes)),
            std::io::empty(),
        )
        .expect("append");
    });
    layout
        .append_raw_layer("base", "dir-then-symlink", &layer, true)
        .expect("layer");
    layout
        .push("dir-then-symlink", &registry, "lab/evil:dir-then-symlink")
        .expect("push");
    let expect = r#"refusing unsafe layer entry "etc/evil/": a later entry of the layer replaced the directory "etc/evil" by a symlink"#;
    assert_refused(
        &client,
        &rt,
        &registry.reference("lab/evil:dir-then-symlink"),
        expect,
    );
    assert_eq!(
        mode_and_mtime(&victim),
        before,
        "pull and unpack_image left the host dir alone"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let (success, output) = cli_unpack(&registry, "lab/evil:dir-then-symlink", &dir.path().join("rootfs"));
    assert!(!success, "the CLI must fail: {output}");
    assert!(output.contains(expect), "{output}");
    assert_eq!(
        mode_and_mtime(&victim),
        before,
        "walt-operator oci unpack changed the host directory {}",
        victim.display()
    );
}

#[test]
fn hostile_links_and_headers_are_refused_with_the_path_named() {
    walt_tests::require_root().expect("root");
    let registry = Registry::start().expect("registry");
    let rt = runtime();
    let client = client_for(&registry);
    let layout = OciLayout::busybox(Arch::Amd64).expect("busybox");

    // A hard link to a deleted file: unpacked in overlay form, it would itself become a deletion.
    let whiteout_link = raw_layer(|b| {
        b.append(
            &raw_header(b"etc/.wh.passwd", tar::EntryType::Regular, 0, None),
            std::io::empty(),
        )
        .expect("append");
        b.append(
            &raw_header(b"etc/group", tar::EntryType::Link, 0, Some(b"etc/passwd")),
            std::io::empty(),
        )
        .expect("append");
    });
    layout
        .append_raw_layer("base", "whiteout-link", &whiteout_link, true)
        .expect("layer");
    layout
        .push("whiteout-link", &registry, "lab/evil:whiteout-link")
        .expect("push");
    assert_refused(
        &client,
        &rt,
        &registry.reference("lab/evil:whiteout-link"),
        // Overlay form says "is a whiteout", flattening "is not a file of this layer" (it is gone).
        r#"refusing unsafe layer entry "etc/group": hard link target "etc/passwd" is "#,
    );

    // A GNU long name claiming 8 GiB (the gzip blob is small: the stream ends early). Nothing of it is
    // read into memory: the header itself is refused.
    let mut long_name = raw_header(b"././@LongLink", tar::EntryType::GNULongName, 0, None);
    long_name.set_size(8 << 30);
    long_name.set_cksum();
    let mut huge = long_name.as_bytes().to_vec();
    huge.extend(std::iter::repeat_n(b'n', 1 << 20));
    let (success, output) = {
        layout
            .append_raw_layer("base", "huge-name", &huge, true)
            .expect("layer");
        layout
            .push("huge-name", &registry, "lab/evil:huge-name")
            .expect("push");
        let dir = tempfile::tempdir().expect("tempdir");
        cli_unpack(&registry, "lab/evil:huge-name", &dir.path().join("rootfs"))
    };
    assert!(!success, "{output}");
    assert!(
        output.contains(
            r#"GNU long name header "././@LongLink" claims 8589934592 bytes, more than the 1048576 accepted"#
        ),
        "{output}"
    );
    assert_refused(
        &client,
        &rt,
        &registry.reference("lab/evil:huge-name"),
        "claims 8589934592 bytes",
    );
}

#[test]
fn cli_commit_upper_refuses_a_tag_or_digest_in_to() {
    let upper = tempfile::tempdir().expect("tempdir");
    for (to, expect) in [
        (
            "127.0.0.1:1/lab/repo:1",
            r#"--to "127.0.0.1:1/lab/repo:1" carries the tag "1", but --to takes a repository only (the image is pushed by digest, the tag would be dropped): use --to 127.0.0.1:1/lab/repo --tag 1"#,
        ),
        (
            "127.0.0.1:1/lab/repo@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "use --to 127.0.0.1:1/lab/repo, and --tag TAG to name the new image",
        ),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_walt-operator"))
            .args(["oci", "commit-upper", "--upper"])
            .arg(upper.path())
            .args(["--base", "127.0.0.1:1/lab/base:1", "--to", to])
            .args(["--insecure-registry", "127.0.0.1:1"])
            .output()
            .expect("walt-operator");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{stderr}");
        assert!(stderr.contains(expect), "{stderr}");
        assert!(
            !stderr.contains("registry 127.0.0.1:1"),
            "refused before any registry access: {stderr}"
        );
    }
}

/// A "registry" on a real socket that answers every connection one byte every 200 ms (a status line and
/// headers that never end, as a registry behind a choking link); the listener's thread ends with the test.
fn trickling_registry() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the trickling registry");
    let address = listener.local_addr().expect("its address").to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut stream = stream;
                let answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Slow: ";
                for byte in answer.iter().chain(std::iter::repeat(&b'x')) {
                    std::thread::sleep(std::time::Duration::from_millis(200));
                    if stream.write_all(std::slice::from_ref(byte)).is_err() {
                        return;
                    }
                }
            });
        }
    });
    address
}

/// A tar reader that hands out its bytes slowly: 256 KiB, then a pause, `pause` each time.
struct SlowReader {
    inner: std::io::Cursor<Vec<u8>>,
    since_pause: usize,
    pause: std::time::Duration,
}

impl std::io::Read for SlowReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.since_pause >= 256 << 10 {
            std::thread::sleep(self.pause);
            self.since_pause = 0;
        }
        let n = buf.len().min((256 << 10) - self.since_pause);
        let n = self.inner.read(&mut buf[..n])?;
        self.since_pause += n;
        Ok(n)
    }
}

/// The registry client's silence bound (`ClientOptions::timeout`, `--registry-timeout`): a registry
/// that answers byte by byte (one every 200 ms) fails a resolve at the bound (1 s), the error naming the
/// registry and the bound; an upload whose changes come slowly (4 MiB over about 3 s, the registry
/// taking each piece at once) is no silence of the registry and succeeds, though it lasts longer than
/// the bound.
#[test]
fn a_registry_answering_byte_by_byte_is_bounded_and_a_slow_upload_is_not() {
    let rt = runtime();
    let second = std::time::Duration::from_secs(1);
    let trickling = trickling_registry();
    let client = RegistryClient::new(ClientOptions {
        timeout: Some(second),
        ..ClientOptions::insecure([trickling.clone()])
    })
    .expect("client");
    let started = std::time::Instant::now();
    let error = rt
        .block_on(client.resolve(&format!("{trickling}/lab/slow:1"), None))
        .expect_err("a trickle never finishes");
    let took = started.elapsed();
    eprintln!(
        "the byte-by-byte registry was given up after {:.1} s",
        took.as_secs_f64()
    );
    let message = error.to_string();
    assert!(
        message.contains(&format!("registry {trickling}"))
            && message.contains("silent for 1 s (--registry-timeout)"),
        "{message}"
    );
    assert!(error.is_transient(), "a silent registry may come back: {message}");
    assert!(took < std::time::Duration::from_secs(10), "{took:?}");

    let registry = Registry::start().expect("registry");
    OciLayout::busybox(Arch::Amd64)
        .expect("busybox image")
        .push("base", &registry, "lab/base:1")
        .expect("push the base");
    let client = RegistryClient::new(ClientOptions {
        timeout: Some(second),
        ..ClientOptions::insecure([registry.host()])
    })
    .expect("client");
    let base = rt
        .block_on(client.resolve(&registry.reference("lab/base:1"), None))
        .expect("resolve the base");
    let content = incompressible(4 << 20);
    let stream = SlowReader {
        inner: std::io::Cursor::new(one_file_tar("srv/slow", &content)),
        since_pause: 0,
        pause: std::time::Duration::from_millis(200),
    };
    let started = std::time::Instant::now();
    let pushed = rt
        .block_on(client.push_on_top(
            &base,
            &registry.reference("lab/slow"),
            ChangeSource::TarStream(Box::new(stream)),
            CommitOptions::new("walt node save"),
        ))
        .expect("a slow upload the registry takes at once is not silence");
    let took = started.elapsed();
    eprintln!("the slow upload took {:.1} s", took.as_secs_f64());
    assert!(
        took > 2 * second,
        "the upload must outlast the bound to prove anything: {took:?}"
    );
    let check = tempfile::tempdir().expect("tempdir");
    let rootfs = images::skopeo_umoci_unpack(
        &registry,
        &format!("lab/slow@{}", pushed.manifest_digest),
        check.path(),
    )
    .expect("unpack the pushed image");
    assert_eq!(std::fs::read(rootfs.join("srv/slow")).expect("srv/slow"), content);
}

/// `len` bytes gzip cannot shrink (xorshift), so an upload is as long as its content.
fn incompressible(len: usize) -> Vec<u8> {
    let mut content = vec![0_u8; len];
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    for byte in &mut content {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        *byte = state.to_le_bytes()[0];
    }
    content
}

/// A tar stream (as a node sends its changes) of one root-owned regular file.
fn one_file_tar(path: &str, content: &[u8]) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(content.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(1);
    header.set_uid(0);
    header.set_gid(0);
    header.set_entry_type(tar::EntryType::Regular);
    tar.append_data(&mut header, path, content).expect("tar entry");
    tar.into_inner().expect("tar")
}

/// A change stream that gives `good` bytes, then fails as a node's stream does when the node goes away.
struct FailingAfter {
    inner: std::io::Cursor<Vec<u8>>,
    good: u64,
}

impl std::io::Read for FailingAfter {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.good.saturating_sub(self.inner.position());
        if left == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "the node dropped the connection",
            ));
        }
        let take = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        std::io::Read::read(&mut self.inner, &mut buf[..take])
    }
}

/// A change stream that fails mid-upload (the node went away) fails the push with the stream's words,
/// publishes nothing, and leaves no upload open in the registry: the operator ends the body and cancels
/// the upload instead of abandoning it to the registry's purge a week later.
#[test]
fn a_change_stream_failing_mid_upload_leaves_no_upload_in_the_registry() {
    let rt = runtime();
    let registry = Registry::start().expect("registry");
    OciLayout::busybox(Arch::Amd64)
        .expect("busybox image")
        .push("base", &registry, "lab/base:1")
        .expect("push the base");
    let client = client_for(&registry);
    let base = rt
        .block_on(client.resolve(&registry.reference("lab/base:1"), None))
        .expect("resolve the base");
    let tar = one_file_tar("srv/big", &incompressible(24 << 20));
    let failing = FailingAfter {
        inner: std::io::Cursor::new(tar.clone()),
        good: 12 << 20,
    };
    let error = rt
        .block_on(client.push_on_top(
            &base,
            &registry.reference("lab/broken"),
            ChangeSource::TarStream(Box::new(failing)),
            CommitOptions::new("walt node save"),
        ))
        .expect_err("a stream that fails cannot be pushed");
    assert!(
        error.to_string().contains("the node dropped the connection"),
        "the error says why: {error}"
    );
    assert_eq!(
        registry.uploads_holding_data(),
        Vec::<(String, u64)>::new(),
        "no upload's data left in the registry"
    );
    assert_eq!(
        registry.get_status("/v2/lab/broken/tags/list").expect("tags"),
        404,
        "nothing published"
    );
    // The same changes, whole, push fine afterwards.
    let pushed = rt
        .block_on(client.push_on_top(
            &base,
            &registry.reference("lab/broken"),
            ChangeSource::TarStream(Box::new(std::io::Cursor::new(tar))),
            CommitOptions::new("walt node save"),
        ))
        .expect("the whole stream pushes");
    assert!(pushed.manifest_digest.starts_with("sha256:"));
    assert_eq!(registry.uploads_holding_data(), Vec::<(String, u64)>::new());
}

/// The layer cache's disk full: a cache on an 8 MiB tmpfs, filled but for 256 KiB, fails a pull of
/// busybox with an error naming the cache and its full disk, and leaves nothing in it (no staging dir,
/// no layer); once the filler is removed, the same pull succeeds.
#[test]
fn a_full_layer_cache_fails_the_pull_cleanly_and_the_next_succeeds_once_freed() {
    walt_tests::require_root().expect("root");
    let registry = Registry::start().expect("registry");
    OciLayout::busybox(Arch::Amd64)
        .expect("busybox image")
        .push("base", &registry, "lab/busybox:1")
        .expect("push busybox");
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = walt_tests::tmpfs::Tmpfs::mount(&dir.path().join("cache"), 8 << 20).expect("tmpfs");
    let filler = disk.path().join("filler");
    let free = disk.free_bytes().expect("free bytes");
    std::fs::write(
        &filler,
        vec![0_u8; usize::try_from(free - (256 << 10)).expect("size")],
    )
    .expect("fill the cache's disk");
    let cache = LayerCache::new(disk.path()).expect("layer cache");
    let client = client_for(&registry);
    let rt = runtime();
    let reference = registry.reference("lab/busybox:1");
    let error = rt
        .block_on(client.pull_image(&cache, &reference, None))
        .expect_err("busybox does not fit in 256 KiB");
    let message = error.to_string();
    assert!(
        error.is_disk_full()
            && message.contains(&format!("into the layer cache {}", disk.path().display()))
            && message.contains("no space left on its disk"),
        "{message}"
    );
    let left: Vec<_> = ["tmp", "sha256"]
        .iter()
        .flat_map(|sub| std::fs::read_dir(disk.path().join(sub)).expect("list the cache"))
        .map(|entry| entry.expect("entry").path())
        .collect();
    assert!(left.is_empty(), "a failed pull left {left:?}");

    std::fs::remove_file(&filler).expect("free the cache's disk");
    let pulled = rt
        .block_on(client.pull_image(&cache, &reference, None))
        .expect("the pull succeeds once there is room");
    assert!(
        pulled
            .lower_dirs
            .iter()
            .any(|dir| dir.join("bin/busybox").is_file())
    );
}

/// A config is read once per repository: resolving an Image again (as the operator does every
/// `--resolve-interval`) asks the registry for its manifest (the tag may have moved), not its config;
/// another repository holding the same config is asked for it (never answered from another's).
#[test]
fn resolving_again_reads_the_manifest_not_the_config() {
    let registry = Registry::start_recording_requests().expect("registry");
    let layout = OciLayout::busybox(Arch::Amd64).expect("busybox layout");
    layout.push("base", &registry, "lab/cfg-a:1").expect("push a");
    layout.push("base", &registry, "lab/cfg-b:1").expect("push b");
    let client = client_for(&registry);
    let rt = runtime();
    let config_reads =
        |repository: &str, mark: usize| registry.requests_to(&format!("{repository}/blobs/"), mark).len();
    let manifest_reads = |repository: &str, mark: usize| {
        registry
            .requests_to(&format!("{repository}/manifests/"), mark)
            .len()
    };
    let mark = registry.log_mark();
    let first = rt
        .block_on(client.resolve(&registry.reference("lab/cfg-a:1"), None))
        .expect("resolve a");
    assert_eq!(config_reads("lab/cfg-a", mark), 1, "{}", registry.log());
    let mark = registry.log_mark();
    let again = rt
        .block_on(client.resolve(&registry.reference("lab/cfg-a:1"), None))
        .expect("resolve a again");
    assert_eq!(again.config, first.config);
    assert_eq!(again.config_digest, first.config_digest);
    assert_eq!(manifest_reads("lab/cfg-a", mark), 1, "the manifest is read again");
    assert_eq!(
        config_reads("lab/cfg-a", mark),
        0,
        "the config is not: {}",
        registry.log()
    );
    let mark = registry.log_mark();
    let other = rt
        .block_on(client.resolve(&registry.reference("lab/cfg-b:1"), None))
        .expect("resolve b");
    assert_eq!(other.config_digest, first.config_digest, "the same config");
    assert_eq!(config_reads("lab/cfg-b", mark), 1, "read from its own repository");
}
