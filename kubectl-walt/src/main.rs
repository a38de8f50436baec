//! `kubectl walt`: the WalT workflows on Kubernetes.

fn main() {
    eprintln!("kubectl walt: no commands yet");
    std::process::exit(2);
}
