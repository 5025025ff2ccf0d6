//! kube-ipvs-bpf command-line entry point.

fn main() {
    println!("kube-ipvs-bpf {}", env!("CARGO_PKG_VERSION"));
}
