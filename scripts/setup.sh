#!/usr/bin/env bash
# One-time, idempotent set-up of a fresh machine for building and testing observer.
#
# Installs only what is missing, so a second run takes a second or two:
#   - the nightly toolchain pinned in Cargo.toml ([workspace.metadata.toolchain]),
#     with rust-src (the eBPF crate builds core from source) and clippy;
#   - the pinned bpf-linker from crates.io, built against that nightly's own
#     libLLVM (no prebuilt download): see docs/kernels.md;
#   - the Debian packages the tests drive (haproxy, iperf3, nftables, prometheus
#     with promtool, curl, ...);
#   - on x86_64, the arm64 cross toolchain (gcc-aarch64-linux-gnu,
#     libc6-dev-arm64-cross, Rust's aarch64-unknown-linux-gnu standard library):
#     `cargo xtask build --target aarch64` and the arm64 kernel matrix use it.
set -euo pipefail

log() { printf 'setup: %s\n' "$*" >&2; }

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# The pins: one place, the workspace manifest.
pin() { sed -n "/^\[workspace.metadata.toolchain\]/,/^\[/ s/^$1 = \"\(.*\)\"/\1/p" "$ROOT/Cargo.toml"; }
NIGHTLY=$(pin nightly)
BPF_LINKER=$(pin bpf-linker)
if [[ -z "$NIGHTLY" || -z "$BPF_LINKER" ]]; then
  log "error: $ROOT/Cargo.toml has no [workspace.metadata.toolchain] nightly/bpf-linker pins"
  exit 1
fi
# Where bpf-linker's libLLVM links live. The path is baked into the binary as its
# run path, so it must stay put: keep it outside the work tree.
LLVM_PREFIX_DIR=${OBSERVER_LLVM_PREFIX:-$HOME/.local/share/observer/llvm-prefix}

# --- Debian packages -------------------------------------------------------
# curl: the HTTPS client of tests/tests/web_config.rs.
DEB_PACKAGES=(haproxy iperf3 nftables iproute2 procps prometheus curl)
# The arm64 cross build (scripts/build-observer.sh arm64): C compiler and libc for
# ring and the tests' fake NVML library, and the linker.
CROSS_TARGET=
if [[ "$(dpkg --print-architecture 2>/dev/null)" == amd64 ]]; then
  DEB_PACKAGES+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
  CROSS_TARGET=aarch64-unknown-linux-gnu
fi
# OBSERVER_SETUP_SKIP_DEBS=1: build-only machines (deploy/Dockerfile) need none;
# scripts/build-observer.sh installs a cross toolchain itself when it needs one.
if [[ -n "${OBSERVER_SETUP_SKIP_DEBS:-}" ]]; then DEB_PACKAGES=(); CROSS_TARGET=; fi
missing=()
for p in "${DEB_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # haproxy's and prometheus' packages start services we do not want on this
  # host: the tests start their own, in private network namespaces.
  for svc in haproxy prometheus; do
    if command -v systemctl >/dev/null 2>&1; then systemctl disable --now "$svc" >/dev/null 2>&1 || true; fi
    pkill -x "$svc" 2>/dev/null || true
  done
fi

# --- Rust's standard library for the cross target ------------------------------
if [[ -n "$CROSS_TARGET" ]] && ! rustup target list --installed | grep -qx "$CROSS_TARGET"; then
  log "installing Rust's standard library for $CROSS_TARGET"
  rustup target add "$CROSS_TARGET"
fi

# --- the pinned nightly, with rust-src and clippy -----------------------------
if ! rustup component list --toolchain "$NIGHTLY" --installed 2>/dev/null | grep -q '^rust-src'; then
  log "installing toolchain ${NIGHTLY} with rust-src and clippy"
  if ! rustup toolchain install "$NIGHTLY" --profile minimal --component rust-src --component clippy; then
    log "error: could not install ${NIGHTLY}, the nightly pinned in Cargo.toml [workspace.metadata.toolchain]."
    log "       The kernel crate is verified with that nightly only; install it with"
    log "       'rustup toolchain install ${NIGHTLY} --component rust-src --component clippy'"
    log "       where rustup can reach its distribution server, then run this script again."
    exit 1
  fi
fi
if ! rustup component list --toolchain "$NIGHTLY" --installed | grep -q '^clippy'; then
  rustup component add clippy --toolchain "$NIGHTLY"
fi
# A dated channel names one build; say which, so a log shows what built the programs.
log "kernel crate toolchain: $(rustc +"$NIGHTLY" -V)"

# --- bpf-linker against the nightly's libLLVM --------------------------------
sysroot=$(rustc +"$NIGHTLY" --print sysroot)
llvm_major=$(rustc +"$NIGHTLY" -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
llvm_lib=$(cd "$sysroot/lib" && ls libLLVM.so.* libLLVM-*.so 2>/dev/null | head -n1)
if [[ -z "$llvm_lib" ]]; then
  log "error: no libLLVM shared library in $sysroot/lib; is the nightly toolchain complete?"
  exit 1
fi
want_feature="llvm-${llvm_major}"
stamp="$LLVM_PREFIX_DIR/bpf-linker.stamp"
want_stamp="bpf-linker $BPF_LINKER $sysroot/lib/$llvm_lib"
if ! command -v bpf-linker >/dev/null 2>&1 || [[ "$(cat "$stamp" 2>/dev/null)" != "$want_stamp" ]]; then
  log "building bpf-linker ${BPF_LINKER} (${want_feature}) against $sysroot/lib/$llvm_lib (about a minute)"
  mkdir -p "$LLVM_PREFIX_DIR/lib"
  ln -sfn "$sysroot/lib/$llvm_lib" "$LLVM_PREFIX_DIR/lib/libLLVM.so"
  ln -sfn "$sysroot/lib/$llvm_lib" "$LLVM_PREFIX_DIR/lib/$llvm_lib"
  # The soname may differ from the file name (libLLVM.so.22.1-rust-... vs
  # libLLVM-22-rust-...): link every name the sysroot has, so the run path finds it.
  for f in "$sysroot"/lib/libLLVM*.so*; do ln -sfn "$f" "$LLVM_PREFIX_DIR/lib/$(basename "$f")"; done
  LLVM_PREFIX="$LLVM_PREFIX_DIR" RUSTFLAGS="-C link-args=-Wl,-rpath,$LLVM_PREFIX_DIR/lib" \
    cargo install --locked --force bpf-linker --version "=$BPF_LINKER" --no-default-features --features "$want_feature"
  echo "$want_stamp" >"$stamp"
fi

have=$(bpf-linker --version 2>/dev/null | awk '{print $2}')
if [[ "$have" != "$BPF_LINKER" ]]; then
  log "error: bpf-linker on PATH is '${have:-missing}', Cargo.toml pins ${BPF_LINKER}: is another one earlier on PATH ($(command -v bpf-linker))?"
  exit 1
fi

# tracefs is needed by classic tracepoints; mount it if the host has not.
if [[ ! -e /sys/kernel/tracing/events ]] && [[ $(id -u) == 0 ]]; then
  mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null || true
fi
log "ready"
