//! `cargo xtask`: developer and CI tasks (real Kubernetes harness, local lab).

fn main() {
    eprintln!("cargo xtask: no tasks yet");
    std::process::exit(2);
}
