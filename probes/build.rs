//! Build script: compiles every `bpf/*.bpf.c` with clang (`-target bpf`, BTF on) into `OUT_DIR`,
//! where `src/objects.rs` embeds the objects with `include_bytes!`.

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

const CLANG_MISSING: &str =
    "clang not found: install Debian's clang and llvm (apt-get install clang llvm libbpf-dev)";

/// The BPF objects built from `bpf/<name>.bpf.c` into `OUT_DIR/<name>.bpf.o`.
const OBJECTS: [&str; 3] = ["datapath", "ipvs_probe", "bench_baseline"];

fn main() -> ExitCode {
    println!("cargo:rerun-if-changed=bpf");
    println!("cargo:rerun-if-env-changed=CLANG");
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_owned());
    let Some(out_dir) = env::var_os("OUT_DIR").map(PathBuf::from) else {
        eprintln!("OUT_DIR is not set (build scripts run under cargo)");
        return ExitCode::FAILURE;
    };
    let bpf_dir = Path::new("bpf");
    for name in OBJECTS {
        let source = bpf_dir.join(format!("{name}.bpf.c"));
        let object = out_dir.join(format!("{name}.bpf.o"));
        if let Err(message) = compile(&clang, &source, &object) {
            eprintln!("{message}");
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

fn compile(clang: &str, source: &Path, object: &Path) -> Result<(), String> {
    let output = Command::new(clang)
        .args([
            "-O2",
            "-g",
            // The programs read addresses and tuples as 32-bit words (as the kernel, which is
            // built the same way): type-based alias analysis must not reorder those accesses.
            "-fno-strict-aliasing",
            "-target",
            "bpf",
            "-mcpu=v3",
            "-D__TARGET_ARCH_x86",
        ])
        .args(["-I/usr/include/x86_64-linux-gnu", "-Wall", "-Werror"])
        .arg("-c")
        .arg(source)
        .arg("-o")
        .arg(object)
        .output()
        .map_err(|error| {
            if error.kind() == std::io::ErrorKind::NotFound {
                CLANG_MISSING.to_owned()
            } else {
                format!("running {clang}: {error}")
            }
        })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{clang} failed on {}:\n{}{}",
            source.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}
