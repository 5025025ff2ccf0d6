//! Build script: compiles every `bpf/*.bpf.c` with clang (`-target bpf`, BTF on) into `OUT_DIR`,
//! where `src/objects.rs` embeds the objects with `include_bytes!`.
//!
//! The objects are built for the architecture cargo builds for (`CARGO_CFG_TARGET_ARCH`): it
//! selects `bpf_tracing.h`'s `pt_regs` layout (`__TARGET_ARCH_*`) and the UAPI `asm/` headers.
//! x86-64 and aarch64 are supported; any other target stops the build with an error.

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

const CLANG_MISSING: &str =
    "clang not found: install Debian's clang and llvm (apt-get install clang llvm libbpf-dev)";

/// The BPF objects built from `bpf/<name>.bpf.c` into `OUT_DIR/<name>.bpf.o`.
const OBJECTS: [&str; 3] = ["datapath", "ipvs_probe", "bench_baseline"];

/// What the BPF objects need to know about the architecture they will run on.
struct TargetArch {
    /// `-D__TARGET_ARCH_<name>` for `bpf_tracing.h` (the kprobe `pt_regs` layout).
    tracing_define: &'static str,
    /// Directories holding that architecture's UAPI `asm/` headers, first existing wins:
    /// Debian's multiarch `linux-libc-dev:<arch>`, then its cross package
    /// (`linux-libc-dev-<arch>-cross`).
    asm_include_dirs: &'static [&'static str],
}

/// The supported architectures, by `CARGO_CFG_TARGET_ARCH`.
fn target_arch(arch: &str) -> Option<TargetArch> {
    match arch {
        "x86_64" => Some(TargetArch {
            tracing_define: "-D__TARGET_ARCH_x86",
            asm_include_dirs: &[
                "/usr/include/x86_64-linux-gnu",
                "/usr/x86_64-linux-gnu/include",
            ],
        }),
        "aarch64" => Some(TargetArch {
            tracing_define: "-D__TARGET_ARCH_arm64",
            asm_include_dirs: &[
                "/usr/include/aarch64-linux-gnu",
                "/usr/aarch64-linux-gnu/include",
            ],
        }),
        _ => None,
    }
}

fn main() -> ExitCode {
    println!("cargo:rerun-if-changed=bpf");
    println!("cargo:rerun-if-env-changed=CLANG");
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let Some(target) = target_arch(&arch) else {
        eprintln!(
            "kube-ipvs-bpf's BPF datapath is built and tested for x86_64 and aarch64 only, \
             not for target architecture '{arch}' (see README.md, Requirements)"
        );
        return ExitCode::FAILURE;
    };
    let Some(asm_include) = target
        .asm_include_dirs
        .iter()
        .find(|dir| Path::new(dir).join("asm/types.h").exists())
    else {
        eprintln!(
            "no UAPI asm/ headers for {arch} in {}: install linux-libc-dev:{} (or the cross \
             package; scripts/cross does it)",
            target.asm_include_dirs.join(" or "),
            if arch == "aarch64" { "arm64" } else { "amd64" }
        );
        return ExitCode::FAILURE;
    };
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_owned());
    let Some(out_dir) = env::var_os("OUT_DIR").map(PathBuf::from) else {
        eprintln!("OUT_DIR is not set (build scripts run under cargo)");
        return ExitCode::FAILURE;
    };
    let bpf_dir = Path::new("bpf");
    for name in OBJECTS {
        let source = bpf_dir.join(format!("{name}.bpf.c"));
        let object = out_dir.join(format!("{name}.bpf.o"));
        if let Err(message) = compile(&clang, &target, asm_include, &source, &object) {
            eprintln!("{message}");
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

fn compile(
    clang: &str,
    target: &TargetArch,
    asm_include: &str,
    source: &Path,
    object: &Path,
) -> Result<(), String> {
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
            target.tracing_define,
        ])
        .arg(format!("-I{asm_include}"))
        .args(["-Wall", "-Werror"])
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
