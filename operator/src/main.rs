//! `walt-operator`: the operator, and the tools its pods run (shell runtime,
//! node save, virtual node), each usable on its own.

use clap::{Parser, Subcommand};
use walt_operator::{binfmt, boot, build, controller, oci, runtime, ssh};

/// walt: the WalT testbed workflows on Kubernetes.
#[derive(Debug, Parser)]
#[command(name = "walt-operator", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions (YAML) of the walt API.
    Crd,
    /// Run the operator (reconcile Image, Node, ShellSession, NodeSave, ImageBuild).
    Run(Box<controller::cli::Args>),
    /// OCI layer engine: commit an overlay upper dir, unpack an image.
    Oci(oci::cli::Args),
    /// Open a root shell inside an OS image (any CPU, through qemu-user).
    Shell(Box<runtime::cli::Args>),
    /// Build an image from a Dockerfile (RUN steps in the image's CPU, through qemu-user when foreign),
    /// push it by digest and tag it.
    Build(Box<build::cli::Args>),
    /// Save the files changed on a running node as a new image.
    Save(ssh::cli::SaveArgs),
    /// Relay users' SSH sessions to a node (the SSH gateway, one session; for tests and standalone use).
    Gateway(ssh::cli::GatewayArgs),
    /// Run an OS image as a virtual WalT node that serves SSH.
    Vnode(Box<ssh::vnode::Args>),
    /// Power a VM node: qemu-system on a tap of the lab network's bridge, network-booting like a
    /// device; its serial console on standard input and output.
    Vm(Box<runtime::vm::Args>),
    /// Register the image's qemu-user handlers in the kernel (binfmt_misc), once per cluster node.
    Binfmt(binfmt::Args),
    /// Serve network boot (DHCP, TFTP, HTTP, read-only NFSv3) to lab devices and VM nodes.
    BootServer(Box<boot::cli::Args>),
}

fn main() {
    let cli = Cli::parse();
    let outcome = match &cli.command {
        Command::Crd => {
            print!("{}", walt_crds::crds_yaml());
            Ok(0)
        }
        Command::Run(args) => controller::cli::run(args),
        Command::Oci(args) => oci::cli::run(args),
        Command::Shell(args) => runtime::cli::run(args),
        Command::Build(args) => build::cli::run(args),
        Command::Save(args) => ssh::cli::run_save(args),
        Command::Gateway(args) => ssh::cli::run_gateway(args),
        Command::Vnode(args) => ssh::vnode::run(args),
        Command::Vm(args) => runtime::vm::run(args),
        Command::Binfmt(args) => binfmt::run(args),
        Command::BootServer(args) if args.from_cluster => controller::boot_source::run(args),
        Command::BootServer(args) => boot::cli::run(args),
    };
    match outcome {
        Ok(code) => std::process::exit(code),
        Err(error) => {
            eprintln!("walt-operator: {error}");
            std::process::exit(1);
        }
    }
}
