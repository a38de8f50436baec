//! `help list` / `help show TOPIC`: guides written for walt on Kubernetes, like WalT's own
//! `walt help show`.

use std::fmt::Write as _;

/// One help topic.
#[derive(Debug, Clone, Copy)]
pub struct Topic {
    /// The name given to `help show`.
    pub name: &'static str,
    /// One line for `help list`.
    pub summary: &'static str,
    /// The guide itself.
    pub text: &'static str,
}

/// Every topic, in the order `help list` shows them.
pub const TOPICS: &[Topic] = &[
    Topic {
        name: "shells",
        summary: "image shells and node shells: what they are, how they end",
        text: SHELLS,
    },
    Topic {
        name: "node-save",
        summary: "saving what changed on a running node as a new image",
        text: NODE_SAVE,
    },
    Topic {
        name: "boot-modes",
        summary: "volatile and persistent nodes, /persist, reboots",
        text: BOOT_MODES,
    },
    Topic {
        name: "node-bootup",
        summary: "how lab devices network-boot their image, and how walt checks what booted",
        text: NODE_BOOTUP,
    },
    Topic {
        name: "images",
        summary: "images, names, registries, cloning, copying files, squashing",
        text: IMAGES,
    },
    Topic {
        name: "image-build",
        summary: "building images from a Dockerfile on the cluster (RUN steps in the image's CPU)",
        text: IMAGE_BUILD,
    },
    Topic {
        name: "devices",
        summary: "the lab's devices: lent to your namespace, acquire and release",
        text: DEVICES,
    },
    Topic {
        name: "virtual-nodes",
        summary: "nodes that run as pods, on any architecture",
        text: VIRTUAL_NODES,
    },
    Topic {
        name: "troubleshooting",
        summary: "what the common errors mean and what to do",
        text: TROUBLESHOOTING,
    },
];

/// Finds a topic by name (case-insensitive; `node_save` works too).
pub fn find(name: &str) -> Option<&'static Topic> {
    let wanted = name.trim().to_ascii_lowercase().replace('_', "-");
    TOPICS.iter().find(|t| t.name == wanted)
}

/// The text of `help list`.
pub fn list() -> String {
    let width = TOPICS.iter().map(|t| t.name.len()).max().unwrap_or(0);
    let mut out = String::from("Help topics (show one with `kubectl walt help show TOPIC`):\n\n");
    for topic in TOPICS {
        let _ = writeln!(out, "  {:width$}   {}", topic.name, topic.summary);
    }
    out
}

const SHELLS: &str = "\
SHELLS

walt has two kinds of shells.

Image shell: `kubectl walt image shell IMAGE`
  You get a root shell inside the image itself, as if it were a container. The shell runs on a
  cluster node of the image's CPU when the cluster has one (an arm64 image on a Raspberry Pi
  worker: natively); elsewhere it runs through qemu-user emulation (slower). The plugin tells you
  which before the prompt.

  If the image has /bin/walt-image-shell-start and /bin/walt-image-shell-shutdown, you get an
  \"init\" shell: the image's init runs as PID 1 and services start as on a node. Otherwise you get
  a \"basic\" shell: only your shell process runs. Force one with --mode init|basic.

  When you leave the shell (exit or Ctrl-D), your changes are packed as one new layer and the
  plugin asks:
      save as a new image, or press Enter to overwrite IMAGE:
  - type a new name: a new image is created, IMAGE is unchanged;
  - press Enter: IMAGE is overwritten; the nodes that boot it reboot on the new version (you are
    told how many, and asked y/n first);
  - Ctrl-C: the changes are discarded.
  Only one shell, copy or squash runs on an image at a time.

Node shell: `kubectl walt node shell NODE`
  You get a root shell on a lab node, which you could not reach directly: the plugin makes a
  one-time key, a ShellSession authorizes it at the walt SSH gateway, and the gateway relays your
  session to the node. Nothing is left behind when you exit.

  Nodes boot a volatile filesystem: changes outside /persist will be lost on next node reboot.
  To keep them, save them as an image: `kubectl walt node save NODE NEW_IMAGE`.

  `kubectl walt node run NODES -- CMD` runs a command on several nodes at once, and
  `kubectl walt node proxy` lets OpenSSH (ssh, scp, rsync) go through the gateway:
      ssh -o ProxyCommand='kubectl walt node proxy %h' root@NODE

Who may do what is Kubernetes RBAC: to open a shell you need `create` on shellsessions.walt.dev
in the namespace (walt-edit or edit gives it, and with it attaching to your image shells in
walt-run-NAMESPACE); node shells also need port-forward to walt's gateway pods (the chart's
gateway-forward Role); ask your lab admin.
";

const NODE_SAVE: &str = "\
NODE SAVE

`kubectl walt node save NODE IMAGE` saves what you changed on a running node as a new image,
on top of the image the node booted.

A node boots its image with a RAM overlay: every file you create, change or delete lands in the
overlay's upper directory (/run/walt/rootfs/mnt/fs_rw). A save streams that directory from the node
(no copy on the node, no temporary file), turns it into one OCI layer and pushes it to the lab
registry next to the base image's layers. The plugin shows a progress bar (bytes, files, rate,
time left), then the new digest and a summary (added, modified, deleted).

Unlike WalT, deletions, opaque directories, empty directories, special files and extended
attributes are all kept.

Boot-time noise is left out: paths matching /log/, .lock$, machine-id, walt-env, _walt_internal_,
README.nonlocal. Add your own with --exclude REGEX.

Names:
  - a new name creates a new image;
  - an existing name needs --overwrite (or a y at the prompt); the nodes that boot it reboot,
    unless --no-reboot.
The new content is pushed by digest first; the name only moves once everything is in place, so an
interrupted save never leaves a broken image behind a name.
";

const BOOT_MODES: &str = "\
BOOT MODES

A node boots an image in one of two modes (Node spec.bootMode):

volatile (the default)
  The image is the node's root filesystem, read-only, under a RAM overlay. Everything you change
  is lost on the next reboot, except what you put in /persist. Every reboot starts clean: this is
  what makes experiments reproducible.

persistent
  The overlay survives reboots (virtual nodes: a PersistentVolumeClaim holds /persist).

/persist
  Kept across reboots in both modes. On a network-booted device it is a directory of the boot
  service's host (read-write over NFS) that belongs to the device while it is lent to your
  namespace: another tenant later lent the same device gets its own, empty, and never sees yours.
  It is not part of the image: a node save does not carry it.

Rebooting:
  - `kubectl walt node reboot NODES` reboots nodes (devices over SSH; container nodes get a new
    pod; VM nodes are powered off and on again, hung or not);
  - `kubectl walt node boot NODES IMAGE` makes them boot another image (they reboot);
  - overwriting an image (image shell + Enter, node save --overwrite, image cp into it) reboots
    the nodes that boot it; you are told how many first.
`kubectl walt node wait NODES` returns once they are booted and reachable again.
";

const NODE_BOOTUP: &str = "\
NODE BOOTUP

Lab devices (and VM nodes) boot over the network from walt's boot service, the way a WalT server
boots them; WalT images boot unchanged.

  1. The device powers on; its firmware (iPXE on PCs, the Raspberry Pi boot ROM, u-boot) asks DHCP.
     The boot service knows it by the MAC of its Device (spec.mac, spec.firmware) and answers with
     its address, the node name as host name, and where its boot files are.
  2. The firmware loads the boot script and kernel from the image's /boot/<model>/ (TFTP or HTTP):
     start.ipxe for iPXE, start.uboot for u-boot (also what a stock U-Boot asking boot.scr.uimg gets).
  3. The kernel mounts the image read-only over NFSv3 (/var/lib/walt/nodes/<mac>/fs) and runs
     /bin/walt-init. The boot service serves the image from its OCI layers, by digest, under a small
     top layer of the node's own (never written into the image): walt-init and its helpers,
     /bin/walt-env, /etc/walt/image-digest (the digest served), root's authorized_keys (the lab's key)
     and the device's SSH host key.
  4. walt-init stacks a RAM overlay over the image (your changes land in /run/walt/rootfs/mnt/fs_rw),
     mounts the device's /persist read-write over NFSv3 (/var/lib/walt/nodes/<mac>/persist: this
     device's directory for your namespace; if it cannot, it says so on the console and the boot
     goes on), sets the clock from the boot service (port 12345), and starts /sbin/init.
  5. Once sshd listens, the node writes /run/uptime-ready and notifies the boot service (port 12347),
     saying which digest it booted; it keeps that connection open while it runs.

What booted is checked, not assumed: the boot service records which digest it served to which MAC
(DHCP, TFTP, HTTP, NFS mount), the node reports the digest it booted, and the operator sets the Node's
bootedImage only when both agree (condition ImageVerified; DigestMismatch or BootNotNotified say why
not). `kubectl walt node show NODE` shows the served and verified digests.

A boot that sends no notification within 180 s is retried (a reboot, a power cycle for a VM node,
or an Event asking for a power cycle when a device does not answer), 9 times at most (WalT's
defaults): then Booted=False with reason BootFailed. A device the boot service does not know gets
nothing.

VM nodes boot the same way: `kubectl walt node acquire vm-01 --vm` runs the Device vm-01 (a VM slot
of the lab: a locally administered MAC, firmware ipxe or u-boot) as a virtual machine on the lab
network (KVM when the cluster node has it, else emulated). A slot with firmware ipxe is a PC
(qemu-system-x86_64): its NIC's iPXE ROM does steps 1-5. One with firmware u-boot is an arm64
board (qemu-system-aarch64, model qemu-arm-64): U-Boot asks DHCP, then boot.scr.uimg over TFTP,
which the boot service answers with the image's /boot/<model>/start.uboot (WalT's U-Boot script)
when the image has no boot.scr.uimg. `kubectl walt node console vm-01` shows its serial console: the
firmware, iPXE or U-Boot, the kernel's boot lines, walt-init. A reboot of a VM node is a power cycle:
off and on again, console included.
";

const IMAGES: &str = "\
IMAGES

An image is an OCI image in the lab registry, described by an Image resource in your namespace
(`kubectl get images.walt.dev`). `kubectl walt image ls` lists them with their node models (from the
label walt.node.models), shell mode, layers and size.

Names are lowercase letters, digits and dashes, with an optional :tag (^[a-z0-9-]+$); `default` is
reserved.

  image clone REF [NAME]     copy an image from any registry into the lab (progress shown);
                             --platform linux/arm64 picks one from a multi-platform index
  image shell IMAGE          modify it in a shell (see `help show shells`)
  image cp SRC DST           copy files in (IMAGE:PATH as DST; a new layer) or out (IMAGE:PATH as SRC)
  image duplicate IMG NEW    the same content under another name
  image rename IMG NEW       refused while nodes boot IMG
  image rm IMG               refused while nodes boot IMG
  image squash IMG           merge all layers into one; an image shell is refused at 128 layers

WalT labels are kept: walt.node.models, walt.image.preferred-name, walt.server.minversion.
";

const IMAGE_BUILD: &str = "\
IMAGE BUILD

`kubectl walt image build` builds an image from a Dockerfile (or Containerfile), the way labs keep
their images reproducible and in git. The build runs on the cluster, in your namespace:

  kubectl walt image build --from-dir ./rpi-image rpi-debian:v2
  kubectl walt image build --from-url https://git.example.org/lab/images.git --ref v4 \\
      --sub-dir rpi --file docker/Dockerfile.rpi rpi-debian:v4

Where it runs
  The plugin packs the build context on your machine (what .dockerignore excludes never leaves it)
  and streams it into a build pod that walt's operator starts for an ImageBuild resource. The pod
  runs walt's runtime with the same isolation as image shells, in your namespace's runtime namespace
  walt-run-NAMESPACE (the operator's; you may attach to your builds there and create nothing), so you
  need no pod rights and your namespace can stay at Pod Security baseline. It pulls and pushes with
  your namespace's own registry credentials: it writes only under your namespace's registry path.
  --from-url clones the repository with the git of YOUR machine (shallow, at --ref), then builds
  from that clone like --from-dir; the ImageBuild records the URL, ref and commit it came from.

RUN steps in the image's own CPU
  Each RUN runs inside the image being built. The build pod prefers a cluster node of the image's
  CPU (--platform's, else that of the walt image your Dockerfile's FROM names): natively there. An
  arm64 image (WalT's Raspberry Pi images) on an amd64 cluster node runs through qemu-user
  emulation: slower, same result. The Built line says which, and on what cluster node. Each step
  that changes files is a layer; unchanged steps come from the step cache (a rebuild of the same
  Dockerfile and context takes seconds and pushes nothing new).

What you see
  The build's own output, and a line per step: [3/9 ##--------] RUN apt-get install …  1m02s
  `kubectl get imagebuilds` lists builds (phase, current step, digest); `kubectl describe
  imagebuild NAME` shows the log tail and the operator's events. Builds are kept as a record.

The result, and what is never left half-done
  The image is pushed by digest; only then does the operator make it image NAME (its Image is
  created or updated, like after an image shell). A failing RUN fails the build with its output, and
  no tag moves. Ctrl-C deletes the build and kills its pod: no tag moves either.
  An existing NAME needs --overwrite; if nodes boot it, you are told how many reboot and asked
  (--yes to skip the question), as when an image shell overwrites an image.
  One writer at a time per image: while an image shell, a node save or another build works on NAME,
  the build waits (the plugin prints who holds it) and starts when it ends.

Supported instructions
  FROM (any reference the lab may pull; multi-stage with COPY --from), RUN, COPY and ADD (--chown,
  --chmod, globs, local archives), ENV, ARG (--build-arg NAME=VALUE), WORKDIR, USER, LABEL (WalT's
  walt.node.models is kept), CMD, ENTRYPOINT, SHELL, EXPOSE, VOLUME, STOPSIGNAL, HEALTHCHECK.
  Others (ONBUILD, RUN --mount, heredocs, remote ADD) are refused before the build starts, with
  their line. RUN steps reach the network the build pod has.
";

const VIRTUAL_NODES: &str = "\
VIRTUAL NODES

A virtual node is a Node resource with spec.virtual: the operator runs it as a pod that boots the
image as a lab device would (RAM overlay at the WalT path, init, an SSH server), so any image can be
tried without hardware, and arm64 images run on amd64 clusters through qemu-user.

  kubectl walt node create-virtual vnode1 --image pc-x86-64-default
  kubectl walt node create-virtual vpi --image rpi-debian --arch arm64 --persistent
  kubectl walt node wait vnode1
  kubectl walt node shell vnode1
  kubectl walt node remove vnode1

--persistent keeps /persist on a PersistentVolumeClaim; --memory and --cpu set the pod's limits.
Everything else works as with physical nodes: node shell, run, save, boot, reboot.

Two kinds (spec.virtual.kind):
  container (the default)  the image's files in a pod, with its init and SSH; no kernel of its own;
                           any architecture: on a cluster node of that CPU when there is one
                           (natively), else through qemu-user; `node show` says which (Runs on:).
  vm                       a virtual machine (qemu-system-x86_64, or qemu-system-aarch64 with U-Boot
                           for an arm64 slot; KVM when usable, else emulated) that network-boots the
                           image through the boot service exactly like a lab device: its own kernel,
                           NFS root, walt-init, verified booted digest. It runs as
                           a VM slot Device of the lab (a lab admin registers its MAC and address):
                             kubectl walt node acquire vm-01 --vm --memory 1Gi --image pc-x86-64-debian
                             kubectl walt node console vm-01     # its serial console
                           amd64 only; `help show node-bootup` tells the boot.
";

const DEVICES: &str = "\
DEVICES

The physical devices (Raspberry Pis, PCs…) are the lab's. Lab admins register each one as a Device
(cluster-wide: its address, model and host key) and lend it to one namespace at a time. You never
type an address: you use a device lent to your namespace by acquiring it, which makes a node of it.

  kubectl walt device ls                      # the devices lent to your namespace, and who holds each
  kubectl walt device show rpi-07             # one device: MAC, firmware, host key fingerprint, conditions
  kubectl walt node acquire rpi-07            # a node named rpi-07 on the device rpi-07
  kubectl walt node acquire rpi-07 --as my-pi --image rpi-debian
  kubectl walt node wait my-pi
  kubectl walt node release my-pi             # give the device back (unsaved changes are lost)

One node per device. A device held by another node of your namespace is refused until that node is
released. When the lab takes a device back (lends it elsewhere), your node stays but the operator no
longer reaches it: its Reachable condition says DeviceNotLent, and shells, runs and saves on it are
refused with the same words.

With plain kubectl: a Node with spec.device names the device (spec.address does not exist); the API
server refuses a Node naming a device not lent to your namespace.

For lab admins: a device that asks walt's boot service for a network boot while no Device has its
MAC address is recorded as an unregistered Device `unknown-<mac>` (its MAC, the firmware its
request showed, its boot network, first and last seen; no address, lent to nobody: it boots
nothing), as a WalT server registers new devices. At most bootService.maxUnknownDevices (64) are
kept; past that, requests are only logged by the boot service. Where the lab sets a default image
per model (bootService.defaultImages) and a network's pool of addresses
(bootService.networks[].unregisteredAddresses), a recorded device of such a model is lent an
address of the pool and boots that catalog image, as on a WalT server (LENT ADDRESS below).

  kubectl walt device ls --unregistered       # what asked to boot, when, with which firmware
  kubectl walt device register unknown-dca632010203 --as rpi3-01 --address 192.168.152.31 \\
      --model rpi-3-b --lend alice             # give it an address, a model, a name; lend it
  kubectl delete devices.walt.dev unknown-dca632010203   # not ours: forget it (recorded again if it asks again)

Two Devices with the same MAC address (a typo) are served nothing: the boot service cannot tell
which one asks. Both get the condition MacConflict=True naming the Devices, `device ls` shows
\"(MAC shared: not booted)\"; fix spec.mac and the device boots again. The same for two
network-booted Devices of one boot network with the same address (DHCP would lease it to both):
AddressConflict=True, \"(address shared: not booted)\"; fix spec.address.

Host keys: the operator makes each network-booted Device an SSH host key of its own (a Secret in its
namespace), the boot service serves it at every boot, and the operator accepts no other key from the
device: nobody trusts a key on first use. `kubectl walt device show DEVICE` prints its fingerprint;
compare it with `ssh-keyscan ADDRESS | ssh-keygen -lf -`. A device answering with another key is
refused (the node's Reachable condition says HostKeyMismatch, and what to do).
";

const TROUBLESHOOTING: &str = "\
TROUBLESHOOTING

\"node X not found in namespace Y\"
  Check the namespace (-n, or your context's) and `kubectl walt node ls`.

\"... is forbidden: you may not VERB RESOURCE in namespace Y\"
  Kubernetes RBAC refused it. The message names the permission; ask your lab admin for a Role that
  grants it (`kubectl auth can-i VERB RESOURCE -n Y` checks it).

\"the Device D is not lent to the namespace Y\" (reason DeviceNotLent)
  Your node names a device the lab did not lend to your namespace, or took back. `kubectl walt device
  ls` lists yours; ask a lab admin to lend it. \"bound to the Node N\" (DeviceTaken): one node per
  device, release N first (`kubectl walt node release N`).

\"node X is not ready (phase Unreachable)\"
  The operator cannot reach the node over SSH. `kubectl walt node show X` shows the conditions and
  recent events; `kubectl walt node reboot X` or a power cycle, then `kubectl walt node wait X`.

\"the shell session failed\" / stuck at \"pulling\"
  `kubectl describe shellsession NAME` shows the operator's events; the shell pod's events
  (`kubectl get events`) tell about image pulls, scheduling and quotas.

An arm64 image shell says \"No such file or directory\" for every command
  qemu-user is not registered on that cluster node (binfmt_misc): the walt chart's binfmt
  DaemonSet must run there.

Sessions left behind
  The plugin deletes what it created on Ctrl-C and on a lost connection; if it was killed, the
  operator's TTL removes the session. List them with `kubectl get shellsessions`.

The terminal looks broken after a crash
  Type `reset` and Enter.
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_topic_the_issue_asks_for_exists() {
        for name in [
            "shells",
            "node-save",
            "boot-modes",
            "node-bootup",
            "images",
            "image-build",
            "virtual-nodes",
            "devices",
            "troubleshooting",
        ] {
            let topic = find(name).expect(name);
            assert!(topic.text.len() > 200, "{name} is too short");
        }
        assert!(find("NODE_SAVE").is_some());
        assert!(find("nope").is_none());
    }

    #[test]
    fn list_names_every_topic() {
        let text = list();
        for topic in TOPICS {
            assert!(text.contains(topic.name));
            assert!(text.contains(topic.summary));
        }
    }
}
