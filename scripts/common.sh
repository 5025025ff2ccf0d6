# shellcheck shell=bash
# Shared by scripts/*: paths, logging, and installing what the scripts need.
# Everything downloaded or built lives under $KIB_CACHE, outside the clone, so runs on the
# same machine reuse it and a fresh clone starts fast.

set -euo pipefail

KIB_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
KIB_CACHE=${KIB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kube-ipvs-bpf}
export KIB_ROOT KIB_CACHE
# Build outputs are cached outside the clone as well.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$KIB_CACHE/target}

log() { printf '\033[1m==>\033[0m %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

need_root() {
	[ "$(id -u)" -eq 0 ] || die "$1 must run as root (it boots kernels, creates network namespaces and loads BPF programs)"
}

# Debian packages the scripts and tests use on the host. The lab image copies the tools from
# here, so the guest runs exactly the host's versions.
KIB_APT_PACKAGES=(
	qemu-system-x86 busybox-static kmod cpio xz-utils zstd
	clang llvm libbpf-dev libelf-dev zlib1g-dev pkg-config
	ipvsadm conntrack nftables iptables ipset iproute2 bpftool socat tcpdump util-linux python3 graphviz
	buildah mmdebstrap crun
)
# What scripts/cross and the arm64 lab add (scripts/cross adds the arm64 dpkg architecture
# first): the aarch64 cross gcc, the arm64 libraries libbpf-sys links, qemu-system-aarch64.
KIB_CROSS_APT_PACKAGES=(
	gcc-aarch64-linux-gnu libc6-dev-arm64-cross libelf-dev:arm64 zlib1g-dev:arm64 qemu-system-arm
)
# Packages that must come from bookworm-backports (the stable qemu conflicts with the
# backported qemu-utils that these machines ship).
KIB_APT_BACKPORTS=(qemu-system-x86 qemu-system-arm)

ensure_backports_source() {
	local codename
	codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
	[ -n "$codename" ] || return 0
	if ! grep -rqs "$codename-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
		log "adding the $codename-backports apt source"
		echo "deb http://deb.debian.org/debian $codename-backports main" \
			>/etc/apt/sources.list.d/kube-ipvs-bpf-backports.list
		KIB_APT_UPDATED=0
	fi
}

apt_update_once() {
	if [ "${KIB_APT_UPDATED:-0}" != 1 ]; then
		DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
		KIB_APT_UPDATED=1
	fi
}

# Installs the packages that are missing (dpkg's view), nothing else.
ensure_packages() {
	local missing=() p
	for p in "$@"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
	done
	[ ${#missing[@]} -eq 0 ] && return 0
	need_root "installing ${missing[*]}"
	ensure_backports_source
	apt_update_once
	local codename bp=() std=()
	codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
	for p in "${missing[@]}"; do
		if [[ " ${KIB_APT_BACKPORTS[*]} " == *" $p "* ]] && [ -n "$codename" ]; then bp+=("$p"); else std+=("$p"); fi
	done
	log "installing ${missing[*]}"
	if [ ${#std[@]} -gt 0 ]; then
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${std[@]}" >/dev/null
	fi
	if [ ${#bp[@]} -gt 0 ]; then
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			-t "$codename-backports" "${bp[@]}" >/dev/null
	fi
}

ensure_rust() {
	command -v cargo >/dev/null || die "cargo not found: install Rust with rustup (https://rustup.rs) first"
	# rust-toolchain.toml pins the toolchain; rustup installs it on first use.
	(cd "$KIB_ROOT" && cargo --version >/dev/null)
}

ensure_host_deps() {
	ensure_packages "${KIB_APT_PACKAGES[@]}"
	ensure_rust
}
