//! The command line: every command, flag and example, as clap derive types.
//!
//! The names follow WalT's client (`walt node shell`, `walt image clone`, …) and the flags follow
//! kubectl's (`--context`, `-n/--namespace`, `-o`), so both kinds of users feel at home.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// `kubectl walt`: the WalT workflows (image shell, node shell, node save) on Kubernetes.
#[derive(Debug, Parser)]
#[command(
    name = "kubectl-walt",
    bin_name = "kubectl walt",
    version,
    about = "The WalT testbed workflows on Kubernetes: image shell, node shell, node save",
    long_about = "The WalT testbed workflows on Kubernetes.\n\n\
        Work on OS images (`image shell`, `image clone`, `image cp`) and on lab nodes (`node shell`,\n\
        `node save`, `node boot`). Every object is a Kubernetes resource of group walt.dev, so\n\
        `kubectl get walt` shows them all and RBAC decides who may do what.",
    after_help = EXAMPLES_ROOT,
    disable_help_subcommand = true,
    propagate_version = true,
    max_term_width = 110
)]
pub struct Cli {
    /// Connection options shared by every command.
    #[command(flatten)]
    pub global: GlobalArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

const EXAMPLES_ROOT: &str = "\
Examples:
  # List the nodes and images of your namespace
  kubectl walt node ls
  kubectl walt image ls

  # Modify an image in a shell, then save it
  kubectl walt image shell rpi-debian

  # Open a shell on a node, then save what you changed as a new image
  kubectl walt node shell rpi3-01
  kubectl walt node save rpi3-01 rpi-debian-tuned

  # Read the guides
  kubectl walt help list
  kubectl walt help show shells";

/// Options for reaching the cluster, as kubectl has them.
#[derive(Debug, Clone, Default, Args)]
pub struct GlobalArgs {
    /// Path to the kubeconfig file (default: $KUBECONFIG, else ~/.kube/config).
    #[arg(long, global = true, value_name = "FILE", value_hint = clap::ValueHint::FilePath)]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: the current context).
    #[arg(long, global = true, value_name = "NAME")]
    pub context: Option<String>,
    /// The namespace to work in: your working set of nodes and images (default: the context's).
    #[arg(short = 'n', long, global = true, value_name = "NAMESPACE")]
    pub namespace: Option<String>,
    /// How long to wait for a single API request before giving up (e.g. 30s, 2m).
    #[arg(long, global = true, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// Connect straight to the SSH gateway at HOST:PORT instead of through a port-forward
    /// (for operators that run outside the cluster, e.g. in development).
    #[arg(
        long,
        global = true,
        hide = true,
        env = "WALT_GATEWAY_ADDRESS",
        value_name = "HOST:PORT"
    )]
    pub gateway_address: Option<String>,
}

/// The top-level command groups.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Manage lab nodes: list, shell, run, save, boot, reboot, virtual nodes.
    #[command(subcommand, after_help = EXAMPLES_NODE)]
    Node(NodeCommand),
    /// Manage OS images: list, clone, build, shell, copy files, rename, remove.
    #[command(subcommand, after_help = EXAMPLES_IMAGE)]
    Image(ImageCommand),
    /// The lab's devices lent to your namespace (acquire one with `node acquire`).
    #[command(subcommand, after_help = EXAMPLES_DEVICE)]
    Device(DeviceCommand),
    /// Read the guides: `help list`, `help show TOPIC`.
    #[command(subcommand, after_help = EXAMPLES_HELP)]
    Help(HelpCommand),
    /// Print a shell completion script (bash, zsh or fish).
    #[command(after_help = EXAMPLES_COMPLETION)]
    Completion(CompletionArgs),
    /// Print completion candidates for the words given (used by the completion scripts, and by
    /// kubectl through a `kubectl_complete-walt` executable).
    #[command(name = "__complete", hide = true)]
    Complete(CompleteArgs),
}

const EXAMPLES_NODE: &str = "\
Examples:
  kubectl walt node ls
  kubectl walt node shell rpi3-01
  kubectl walt node run rpi3-01,rpi3-02 -- uname -a
  kubectl walt node save rpi3-01 rpi-debian-tuned";

const EXAMPLES_IMAGE: &str = "\
Examples:
  kubectl walt image ls
  kubectl walt image clone docker.io/waltplatform/rpi-debian:latest
  kubectl walt image shell rpi-debian
  kubectl walt image build --from-dir ./rpi-image rpi-debian:v2
  kubectl walt image cp ./config.txt rpi-debian:/boot/config.txt";

const EXAMPLES_DEVICE: &str = "\
Examples:
  kubectl walt device ls
  kubectl walt node acquire rpi-07
  kubectl walt help show devices";

/// `device …`: the lab's physical devices.
#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// List the devices lent to the namespace, and the node holding each.
    #[command(
        visible_alias = "list",
        long_about = "List the devices the lab lent to your namespace: name, model, address and the node of\n\
                      your namespace that holds it, or (available). Devices are the lab's: lab admins register\n\
                      them and lend each to one namespace at a time; you use one by acquiring it\n\
                      (`kubectl walt node acquire DEVICE`).",
        after_help = "\
Examples:
  kubectl walt device ls
  kubectl walt device ls --all      # every device of the lab, and whom it is lent to
  kubectl walt device ls -o yaml"
    )]
    Ls {
        /// Every device of the lab, with the namespace it is lent to.
        #[arg(long)]
        all: bool,
        /// Lab admins: the devices the boot service recorded when they asked for a network boot
        /// while unknown (no address yet: they boot nothing), with what their requests said.
        #[arg(long, conflicts_with = "all")]
        unregistered: bool,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Show a device: address, MAC, firmware, boot network, loan, binding, the fingerprint of the
    /// host key the operator enforces, conditions and Events.
    #[command(
        long_about = "Show DEVICE: where it is (address, MAC, firmware, boot network), whom it is lent to and\n\
                      the node bound to it, the SSH host key the operator enforces on it (its SHA256 fingerprint,\n\
                      as `ssh-keygen -lf` prints it; a network-booted device gets one walt makes and serves it at\n\
                      every boot), its conditions (MacConflict, AddressConflict) and its Events.",
        after_help = "\
Examples:
  kubectl walt device show rpi3-01
  kubectl walt device show rpi3-01 -o yaml"
    )]
    Show {
        /// The device.
        device: String,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Lab admins: register a device the boot service recorded (give it an address, a model, a name,
    /// and lend it).
    #[command(
        long_about = "Register DEVICE, a device the boot service recorded when it asked for a network boot\n\
                      while no Device had its MAC address (`kubectl walt device ls --unregistered`): it keeps\n\
                      its MAC, firmware and boot network, and gets the address the operator reaches it at, its\n\
                      model and, with --lend, the namespace it is lent to. With --as it gets a new name (the\n\
                      recorded Device is replaced by a new one). Needs the lab admin's rights on Devices.",
        after_help = "\
Examples:
  kubectl walt device ls --unregistered
  kubectl walt device register unknown-dca632010203 --as rpi3-01 --address 192.168.152.31 --model rpi-3-b --lend alice"
    )]
    Register {
        /// The recorded device (`unknown-<mac>`).
        device: String,
        /// Host name or IP address the operator reaches it at (an IPv4 address: the boot service gives
        /// it at DHCP time).
        #[arg(long)]
        address: String,
        /// Its new name (default: keep the recorded one).
        #[arg(long = "as", value_name = "NAME")]
        as_name: Option<String>,
        /// Its model, e.g. rpi-3-b (default: the one its boot request named; required when unknown).
        #[arg(long)]
        model: Option<String>,
        /// Lend it to this namespace.
        #[arg(long, value_name = "NAMESPACE")]
        lend: Option<String>,
    },
}

const EXAMPLES_HELP: &str = "\
Examples:
  kubectl walt help list
  kubectl walt help show node-save";

const EXAMPLES_COMPLETION: &str = "\
Examples:
  # bash (add to ~/.bashrc)
  source <(kubectl-walt completion bash)
  # zsh (add to ~/.zshrc)
  source <(kubectl-walt completion zsh)
  # fish
  kubectl-walt completion fish > ~/.config/fish/completions/kubectl-walt.fish
  # `kubectl walt <TAB>` through kubectl's own completion (kubectl >= 1.26)
  kubectl-walt completion kubectl > ~/.local/bin/kubectl_complete-walt
  chmod +x ~/.local/bin/kubectl_complete-walt";

/// Output formats for listing and showing resources, as kubectl's `-o`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns.
    #[default]
    Table,
    /// Aligned columns, with more of them.
    Wide,
    /// The resources as JSON (a `List` for several).
    Json,
    /// The resources as YAML (a `List` for several).
    Yaml,
}

/// `-o/--output`, shared by the commands that print resources.
#[derive(Debug, Clone, Copy, Args)]
pub struct OutputArgs {
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Table)]
    pub format: OutputFormat,
}

/// `walt node …`
#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// List the nodes of the namespace.
    #[command(
        visible_alias = "list",
        after_help = "\
Examples:
  kubectl walt node ls
  kubectl walt node ls -o wide
  kubectl walt node ls -o yaml"
    )]
    Ls {
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Show one node: its image, state, conditions and recent events.
    #[command(after_help = "\
Examples:
  kubectl walt node show rpi3-01
  kubectl walt node show rpi3-01 -o json")]
    Show {
        /// The node.
        #[arg(value_name = "NODE")]
        node: String,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Open a root shell on a node, through the walt SSH gateway.
    #[command(
        long_about = "Open a root shell on a node, through the walt SSH gateway.\n\n\
        The plugin makes a one-time key pair (kept in memory only), asks for a ShellSession that\n\
        authorizes it, and reaches the gateway through a port-forward. The node's filesystem is\n\
        volatile: changes outside /persist are lost on the next reboot; use `node save` to keep them.",
        after_help = "\
Examples:
  kubectl walt node shell rpi3-01
  # a one-off command instead of an interactive shell
  kubectl walt node shell rpi3-01 -- cat /proc/cpuinfo"
    )]
    Shell {
        /// The node.
        #[arg(value_name = "NODE")]
        node: String,
        /// A command to run instead of an interactive shell.
        #[arg(last = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Run a command on one or several nodes; each output line is prefixed with its node name.
    #[command(after_help = "\
Examples:
  kubectl walt node run rpi3-01 -- uname -a
  kubectl walt node run rpi3-01,rpi3-02 -- 'cat /etc/os-release | head -1'
  kubectl walt node run all-nodes -- uptime

Exit status: 0 when the command succeeded on every node, else the first non-zero status.")]
    Run {
        /// The nodes: NODE, NODE1,NODE2,… or all-nodes.
        #[arg(value_name = "NODES")]
        nodes: String,
        /// The command and its arguments (after `--`).
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Save the files changed on a running node as a new image on top of the one it booted.
    #[command(after_help = "\
Examples:
  # a new image
  kubectl walt node save rpi3-01 rpi-debian-tuned
  # overwrite the image the node booted (the nodes that boot it reboot)
  kubectl walt node save rpi3-01 rpi-debian --overwrite
  # keep some more files out
  kubectl walt node save rpi3-01 rpi-debian-tuned --exclude '/var/cache/'")]
    Save {
        /// The node.
        #[arg(value_name = "NODE")]
        node: String,
        /// The image to create (or to overwrite, with --overwrite).
        #[arg(value_name = "IMAGE")]
        image: String,
        /// Overwrite IMAGE if it exists (without asking).
        #[arg(long, short = 'y')]
        overwrite: bool,
        /// Do not reboot the nodes that boot IMAGE after an overwrite.
        #[arg(long)]
        no_reboot: bool,
        /// More paths to leave out (regular expressions), on top of the boot-time noise.
        #[arg(long, value_name = "REGEX")]
        exclude: Vec<String>,
        /// Layer compression.
        #[arg(long, value_enum, default_value_t = Compression::Gzip)]
        compression: Compression,
        /// Create the NodeSave and return without waiting for it.
        #[arg(long)]
        no_wait: bool,
    },
    /// Make nodes boot an image (they reboot).
    #[command(after_help = "\
Examples:
  kubectl walt node boot rpi3-01 rpi-debian-tuned
  kubectl walt node boot rpi3-01,rpi3-02 rpi-debian")]
    Boot {
        /// The nodes: NODE, NODE1,NODE2,… or all-nodes.
        #[arg(value_name = "NODES")]
        nodes: String,
        /// The image to boot.
        #[arg(value_name = "IMAGE")]
        image: String,
    },
    /// Reboot nodes (their volatile changes are lost).
    #[command(after_help = "\
Examples:
  kubectl walt node reboot rpi3-01
  kubectl walt node reboot all-nodes")]
    Reboot {
        /// The nodes: NODE, NODE1,NODE2,… or all-nodes.
        #[arg(value_name = "NODES")]
        nodes: String,
    },
    /// Create a virtual node: a pod that boots an image like a lab device.
    #[command(after_help = "\
Examples:
  kubectl walt node create-virtual vnode1 --image pc-x86-64-default
  kubectl walt node create-virtual vpi --image rpi-debian --arch arm64 --persistent")]
    CreateVirtual {
        /// The name of the new node.
        #[arg(value_name = "NAME")]
        name: String,
        /// The image it boots.
        #[arg(long, value_name = "IMAGE")]
        image: String,
        /// CPU architecture of the node (default: the cluster node's own): its pod prefers cluster
        /// nodes of that CPU, else runs emulated.
        #[arg(long, value_enum)]
        arch: Option<Architecture>,
        /// Node model (default: derived from the architecture: pc-x86-64 or qemu-arm64).
        #[arg(long, value_name = "MODEL")]
        model: Option<String>,
        /// Keep /persist across reboots (a PersistentVolumeClaim).
        #[arg(long)]
        persistent: bool,
        /// Memory limit, as a Kubernetes quantity (e.g. 512Mi).
        #[arg(long, value_name = "QUANTITY")]
        memory: Option<String>,
        /// CPU limit, as a Kubernetes quantity (e.g. 1, 500m).
        #[arg(long, value_name = "QUANTITY")]
        cpu: Option<String>,
    },
    /// Make a node of a device lent to the namespace (WalT's `node acquire`).
    #[command(
        long_about = "Create a Node bound to DEVICE, a device the lab lent to your namespace\n\
                      (`kubectl walt device ls`). The node gets the device's model; it is yours until you\n\
                      release it (`kubectl walt node release NODE`) or the lab takes the device back. One node\n\
                      per device: a device held by another node of the namespace is refused.",
        after_help = "\
Examples:
  kubectl walt node acquire rpi-07
  kubectl walt node acquire rpi-07 --as my-pi --image rpi-debian
  kubectl walt node wait my-pi
  kubectl walt node acquire vm-01 --vm --memory 1Gi --image pc-x86-64-debian
  kubectl walt node console vm-01"
    )]
    Acquire {
        /// The device (`kubectl walt device ls`).
        #[arg(value_name = "DEVICE")]
        device: String,
        /// The node's name (default: the device's).
        #[arg(long = "as", value_name = "NODE")]
        as_name: Option<String>,
        /// The image the node boots (default: the model's default image).
        #[arg(long, value_name = "IMAGE")]
        image: Option<String>,
        /// Run the device as a VM node: a VM slot of the lab (a Device with a locally administered MAC
        /// and firmware ipxe or u-boot) powered as qemu-system-x86_64 (ipxe: a PC) or
        /// qemu-system-aarch64 (u-boot: an arm64 board) in a pod on the lab network, network-booting
        /// like a device (`help show node-bootup`).
        #[arg(long)]
        vm: bool,
        /// With --vm: the VM's memory, a Kubernetes quantity (default 512Mi).
        #[arg(long, value_name = "QUANTITY", requires = "vm")]
        memory: Option<String>,
        /// With --vm: the VM's CPUs, a Kubernetes quantity (default 1).
        #[arg(long, value_name = "QUANTITY", requires = "vm")]
        cpu: Option<String>,
    },
    /// Show the serial console of a VM node (kernel and boot messages), following it.
    #[command(
        long_about = "Print the serial console of NODE, a VM node (`node acquire DEVICE --vm`), since its\n\
                      last power-on, and follow it until Ctrl-C: firmware, iPXE, the kernel's boot lines,\n\
                      walt-init, the login prompt. A reboot powers the VM off and on again: the console\n\
                      starts over.",
        after_help = "\
Examples:
  kubectl walt node console vm-01
  kubectl walt node console vm-01 --no-follow --tail 50"
    )]
    Console {
        /// The node.
        #[arg(value_name = "NODE")]
        node: String,
        /// Print what is there and return.
        #[arg(long)]
        no_follow: bool,
        /// Only the last N lines.
        #[arg(long, value_name = "N")]
        tail: Option<i64>,
    },
    /// Give a device back: delete the node that holds it (WalT's `node release`).
    #[command(
        long_about = "Delete NODE, a node made with `node acquire`, so its device is free again for the\n\
                      namespace. What the node had not saved is lost (`kubectl walt node save` first).\n\
                      Virtual nodes hold no device: remove them with `kubectl walt node remove`.",
        after_help = "\
Examples:
  kubectl walt node release my-pi"
    )]
    Release {
        /// The node.
        #[arg(value_name = "NODE")]
        node: String,
    },
    /// Remove nodes from the namespace (virtual nodes are stopped).
    #[command(
        visible_alias = "rm",
        after_help = "\
Examples:
  kubectl walt node remove vnode1"
    )]
    Remove {
        /// The nodes: NODE, NODE1,NODE2,…
        #[arg(value_name = "NODES")]
        nodes: String,
    },
    /// Relay stdin/stdout to a node's SSH server, for OpenSSH's ProxyCommand (ssh, scp, rsync).
    #[command(
        long_about = "Relay stdin/stdout to a node's SSH server through the walt gateway,\n\
        for OpenSSH's ProxyCommand. The session authorizes your own public key (ssh-agent's first\n\
        key, else ~/.ssh/id_ed25519.pub, id_ecdsa.pub, id_rsa.pub; or --public-key).",
        after_help = "\
Examples:
  # the SSH user (here alice-rpi3) names your session at the gateway: any unused name
  ssh -o ProxyCommand='kubectl walt node proxy %h --login %r' alice-rpi3@rpi3-01
  scp -o ProxyCommand='kubectl walt node proxy %h --login %r' file alice-rpi3@rpi3-01:/persist/

  # or once for all, in ~/.ssh/config (then: ssh walt-rpi3-01):
  Host walt-*
      ProxyCommand kubectl walt node proxy %n --login %r
      User alice-walt"
    )]
    Proxy {
        /// The node (a `walt-` prefix is removed, for ~/.ssh/config patterns).
        #[arg(value_name = "NODE")]
        node: String,
        /// The public key OpenSSH will authenticate with.
        #[arg(long, value_name = "FILE", value_hint = clap::ValueHint::FilePath)]
        public_key: Option<PathBuf>,
        /// Name the session like this (pass `%r`: the gateway user OpenSSH logs in as).
        #[arg(long, value_name = "NAME")]
        login: Option<String>,
    },
    /// Wait until nodes are booted and reachable.
    #[command(after_help = "\
Examples:
  kubectl walt node wait rpi3-01
  kubectl walt node wait rpi3-01,rpi3-02 --timeout 10m")]
    Wait {
        /// The nodes: NODE, NODE1,NODE2,… or all-nodes.
        #[arg(value_name = "NODES")]
        nodes: String,
        /// Give up after this long (e.g. 90s, 5m).
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        timeout: Duration,
    },
}

/// Layer compression for node saves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Compression {
    /// gzip (any registry and runtime reads it).
    Gzip,
    /// zstd (faster; needs a recent runtime on the nodes that pull it).
    Zstd,
}

/// CPU architectures a virtual node can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Architecture {
    /// x86-64.
    Amd64,
    /// 64-bit ARM (emulated on amd64 clusters).
    Arm64,
}

impl Architecture {
    /// The OCI/Go name of the architecture.
    pub fn as_str(self) -> &'static str {
        match self {
            Architecture::Amd64 => "amd64",
            Architecture::Arm64 => "arm64",
        }
    }
}

/// Shell modes for `image shell`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum ShellModeArg {
    /// Init mode if the image supports it, else basic.
    #[default]
    Auto,
    /// Boot the image's init (needs /bin/walt-image-shell-start and -shutdown).
    Init,
    /// Only a shell process.
    Basic,
}

/// `walt image …`
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// List the images of the namespace.
    #[command(
        visible_alias = "list",
        after_help = "\
Examples:
  kubectl walt image ls
  kubectl walt image ls -o wide"
    )]
    Ls {
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Show one image: reference, digest, node models, shell mode, layers, the nodes that boot it.
    #[command(after_help = "\
Examples:
  kubectl walt image show rpi-debian
  kubectl walt image show rpi-debian -o yaml")]
    Show {
        /// The image.
        #[arg(value_name = "IMAGE")]
        image: String,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Clone an image from a registry into the namespace (shows progress).
    #[command(after_help = "\
Examples:
  kubectl walt image clone docker.io/waltplatform/rpi-debian:latest
  kubectl walt image clone registry.example.org/lab/pc-x86-64:v3 pc-base
  kubectl walt image clone docker.io/library/debian:bookworm --platform linux/arm64 deb-arm")]
    Clone {
        /// The image reference to clone (registry/repository:tag or @digest).
        #[arg(value_name = "REF")]
        reference: String,
        /// Name of the new image (default: derived from REF).
        #[arg(value_name = "NAME")]
        name: Option<String>,
        /// Platform to pick from a multi-platform index (e.g. linux/arm64).
        #[arg(long, value_name = "OS/ARCH")]
        platform: Option<String>,
        /// Secret with the registry credentials for REF.
        #[arg(long, value_name = "SECRET")]
        pull_secret: Option<String>,
        /// Create the Image and return without waiting for the copy.
        #[arg(long)]
        no_wait: bool,
    },
    /// Open a root shell inside an image; on exit, save the changes as a new image or overwrite it.
    #[command(after_help = "\
Examples:
  kubectl walt image shell rpi-debian
  kubectl walt image shell rpi-debian --mode basic

On exit you are asked for a name: type a new name, or press Enter to overwrite the image
(the nodes that boot it reboot; you are told how many first). Ctrl-C discards the changes.")]
    Shell {
        /// The image.
        #[arg(value_name = "IMAGE")]
        image: String,
        /// Init mode (boots the image's init) or basic mode (a shell process alone).
        #[arg(long, value_enum, default_value_t = ShellModeArg::Auto)]
        mode: ShellModeArg,
    },
    /// Remove images (refused while nodes boot them).
    #[command(
        visible_alias = "remove",
        after_help = "\
Examples:
  kubectl walt image rm rpi-debian-old
  kubectl walt image rm test1,test2"
    )]
    Rm {
        /// The images: IMAGE or IMAGE1,IMAGE2,…
        #[arg(value_name = "IMAGES")]
        images: String,
    },
    /// Rename an image (refused while nodes boot it).
    #[command(after_help = "\
Examples:
  kubectl walt image rename rpi-debian-tuned rpi-debian-v2")]
    Rename {
        /// The image.
        #[arg(value_name = "IMAGE")]
        image: String,
        /// Its new name.
        #[arg(value_name = "NEW_NAME")]
        new_name: String,
    },
    /// Copy an image under a new name (same content, no data copied in the registry when it can mount).
    #[command(after_help = "\
Examples:
  kubectl walt image duplicate rpi-debian rpi-debian-experiment")]
    Duplicate {
        /// The image.
        #[arg(value_name = "IMAGE")]
        image: String,
        /// The new image's name.
        #[arg(value_name = "NEW_NAME")]
        new_name: String,
    },
    /// Squash all the layers of an image into one (an image shell is refused at 128 layers).
    #[command(after_help = "\
Examples:
  kubectl walt image squash rpi-debian")]
    Squash {
        /// The image.
        #[arg(value_name = "IMAGE")]
        image: String,
        /// Do not ask before overwriting an image that nodes boot.
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// Build an image from a Dockerfile, on the cluster (RUN steps in the image's own CPU).
    #[command(
        long_about = "Build an image from a Dockerfile (or Containerfile), on the cluster.\n\n\
        The build context (the files COPY and ADD read) is packed on this machine, leaving out what its\n\
        .dockerignore excludes, and streamed into a build pod that walt's operator starts in your namespace:\n\
        an ImageBuild resource (`kubectl get imagebuilds`, `kubectl explain imagebuild.spec`). Each RUN step\n\
        runs in walt's runtime in the image's own CPU: the build pod prefers a cluster node of that CPU\n\
        (--platform's, else that of the walt image the Dockerfile's FROM names), where it runs natively;\n\
        an arm64 image on an amd64 cluster node runs through qemu-user emulation (slower, but the result\n\
        is the same). The Built line says which, and on what cluster node. Each step that changes files\n\
        becomes a layer; unchanged steps come from the step cache, so a rebuild of the same Dockerfile and\n\
        context takes seconds and pushes nothing new. The result is pushed by digest, then the operator makes it\n\
        image NAME: a failed build, or Ctrl-C (which deletes the build and its pod), moves no tag.\n\n\
        --from-url clones the repository with the `git` of THIS machine (shallow, the --ref asked for)\n\
        into a temporary directory, then builds from it like --from-dir; the ImageBuild records the URL,\n\
        ref and commit. The cluster never reaches the repository itself.\n\n\
        Supported instructions: FROM (a reference the lab may pull; multi-stage, COPY --from), RUN, COPY\n\
        and ADD (--chown, --chmod, globs, local archives), ENV, ARG, WORKDIR, USER, LABEL, CMD, ENTRYPOINT,\n\
        SHELL, EXPOSE, VOLUME, STOPSIGNAL, HEALTHCHECK. Others are refused before the build starts, with\n\
        their line. See `kubectl walt help show image-build`.",
        after_help = "\
Examples:
  # from a directory with a Dockerfile
  kubectl walt image build --from-dir ./rpi-image rpi-debian:v2
  # from git (cloned on this machine), a sub-directory, another Dockerfile, build args
  kubectl walt image build --from-url https://git.example.org/lab/images.git --ref v4 \\
      --sub-dir rpi --file docker/Dockerfile.rpi --build-arg MIRROR=http://deb.debian.org/debian rpi-debian:v4
  # replace an image that nodes boot (they reboot; you are asked first, or pass --yes)
  kubectl walt image build --from-dir ./rpi-image --overwrite rpi-debian

Exit status: 0 when the image is built and tagged; 1 when the build failed (no tag moved);
130 on Ctrl-C (the build is deleted, no tag moved)."
    )]
    Build {
        /// The build context: a local directory.
        #[arg(long, value_name = "DIR", value_hint = clap::ValueHint::DirPath, required_unless_present = "from_url", conflicts_with = "from_url")]
        from_dir: Option<PathBuf>,
        /// The build context: a git repository, cloned on this machine with its `git`.
        #[arg(long, value_name = "URL")]
        from_url: Option<String>,
        /// With --from-url: the branch, tag or commit to build (default: the remote's default branch).
        #[arg(long = "ref", value_name = "REF")]
        git_ref: Option<String>,
        /// With --from-url: the directory of the repository that is the context.
        #[arg(long, value_name = "PATH")]
        sub_dir: Option<String>,
        /// The Dockerfile, relative to the context (default: Dockerfile, else Containerfile).
        #[arg(long, short = 'f', value_name = "FILE")]
        file: Option<String>,
        /// A value for an ARG of the Dockerfile (repeat).
        #[arg(long = "build-arg", value_name = "NAME=VALUE")]
        build_args: Vec<String>,
        /// Build this stage (FROM … AS STAGE) instead of the last one.
        #[arg(long, value_name = "STAGE")]
        target: Option<String>,
        /// Platform of base images that have several, and of FROM scratch (e.g. linux/arm64).
        #[arg(long, value_name = "OS/ARCH")]
        platform: Option<String>,
        /// Replace NAME if it exists (the nodes that boot it reboot on the new version).
        #[arg(long)]
        overwrite: bool,
        /// Do not ask before overwriting an image that nodes boot.
        #[arg(long, short = 'y')]
        yes: bool,
        /// Run every step, ignoring the step cache.
        #[arg(long)]
        no_cache: bool,
        /// The image to build (name[:tag]).
        #[arg(value_name = "NAME")]
        image: String,
    },
    /// Copy files into an image (as a new layer) or out of it.
    #[command(after_help = "\
Examples:
  # into an image (a new layer; the image is overwritten)
  kubectl walt image cp ./config.txt rpi-debian:/boot/config.txt
  # a trailing / copies into that directory, created when missing: /opt/my-tools
  kubectl walt image cp ./my-tools rpi-debian:/opt/
  # out of an image
  kubectl walt image cp rpi-debian:/etc/os-release ./os-release")]
    Cp {
        /// The source: LOCAL_PATH or IMAGE:PATH.
        #[arg(value_name = "SRC")]
        src: String,
        /// The destination: IMAGE:PATH or LOCAL_PATH.
        #[arg(value_name = "DST")]
        dst: String,
        /// Do not ask before overwriting an image that nodes boot.
        #[arg(long, short = 'y')]
        yes: bool,
    },
}

/// `walt help …`
#[derive(Debug, Subcommand)]
pub enum HelpCommand {
    /// List the help topics.
    List,
    /// Show a help topic.
    Show {
        /// The topic (see `help list`).
        #[arg(value_name = "TOPIC")]
        topic: String,
    },
}

/// `completion SHELL`
#[derive(Debug, Args)]
pub struct CompletionArgs {
    /// The shell (or `kubectl`, for the `kubectl_complete-walt` helper kubectl runs).
    #[arg(value_enum)]
    pub shell: CompletionShell,
}

/// Shells we write completion scripts for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CompletionShell {
    /// GNU bash.
    Bash,
    /// zsh.
    Zsh,
    /// fish.
    Fish,
    /// A `kubectl_complete-walt` executable, so that kubectl's own completion covers `kubectl walt`.
    Kubectl,
}

/// `__complete WORDS…`
#[derive(Debug, Args)]
pub struct CompleteArgs {
    /// The words typed after the program name; the last one is the word being completed.
    #[arg(allow_hyphen_values = true, trailing_var_arg = true)]
    pub words: Vec<String>,
}

/// Parses durations as kubectl does: `90s`, `5m`, `1h`, `1h30m`, or plain seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration: use e.g. 30s, 5m, 1h".into());
    }
    if let Ok(seconds) = text.parse::<u64>() {
        return Ok(Duration::from_secs(seconds));
    }
    let mut total = 0u64;
    let mut number = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let unit = if c == 'm' && chars.peek() == Some(&'s') {
            chars.next();
            "ms"
        } else {
            match c {
                's' => "s",
                'm' => "m",
                'h' => "h",
                _ => return Err(format!("invalid duration {text:?}: use e.g. 30s, 5m, 1h")),
            }
        };
        let value: u64 = number
            .parse()
            .map_err(|_| format!("invalid duration {text:?}: a number must come before {unit:?}"))?;
        number.clear();
        total += match unit {
            "ms" => value / 1000,
            "s" => value,
            "m" => value * 60,
            _ => value * 3600,
        };
    }
    if !number.is_empty() {
        return Err(format!(
            "invalid duration {text:?}: the last number has no unit (s, m, h)"
        ));
    }
    Ok(Duration::from_secs(total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations_parse_like_kubectl() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_mins(5)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_mins(90)));
        assert_eq!(parse_duration("42"), Ok(Duration::from_secs(42)));
        assert!(parse_duration("5x").unwrap_err().contains("invalid duration"));
        assert!(parse_duration("5m3").unwrap_err().contains("no unit"));
    }

    #[test]
    fn run_takes_the_command_after_double_dash() {
        let cli =
            Cli::try_parse_from(["kubectl-walt", "node", "run", "a,b", "--", "uname", "-a"]).expect("parses");
        match cli.command {
            Command::Node(NodeCommand::Run { nodes, command }) => {
                assert_eq!(nodes, "a,b");
                assert_eq!(command, ["uname", "-a"]);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn global_flags_work_anywhere() {
        let cli = Cli::try_parse_from([
            "kubectl-walt",
            "image",
            "ls",
            "-n",
            "lab",
            "--context",
            "kind",
            "-o",
            "yaml",
        ])
        .expect("parses");
        assert_eq!(cli.global.namespace.as_deref(), Some("lab"));
        assert_eq!(cli.global.context.as_deref(), Some("kind"));
    }
}
