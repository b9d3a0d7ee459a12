#!/usr/bin/env bash
# Builds the release observer for one Debian architecture (amd64 or arm64) on
# this machine, cross-compiling when it is not this machine's own, and installs
# it at OUT. The image build (deploy/Dockerfile) runs exactly this in its build
# stage, on the builder's own platform for every target platform, and
# `cargo xtask build --target aarch64` and `cargo xtask test` run it here, so
# the image's cross build is exercised without a container builder.
#
#   scripts/build-observer.sh ARCH [OUT]      ARCH: amd64 | arm64 (Docker's TARGETARCH)
#
# The kernel programs are compiled for the bpf target either way; observer's
# build script (aya-build) passes the target's architecture to them as
# `bpf_target_arch`, which picks the registers kprobe programs read arguments
# and return values from (docs/kernels.md#arm64). A cross build needs the
# target's C cross compiler and libc (ring, the fake NVML of the tests) and
# Rust's standard library for the target: installed here when missing, and by
# scripts/setup.sh on a development machine.
set -euo pipefail

log() { printf 'build-observer: %s\n' "$*" >&2; }

ROOT=$(cd "$(dirname "$0")/.." && pwd)
ARCH=${1:?usage: build-observer.sh amd64|arm64 [OUT]}
case "$ARCH" in
  amd64) TRIPLE=x86_64-unknown-linux-gnu GNU=x86_64-linux-gnu CROSS_DEBS="gcc-x86-64-linux-gnu libc6-dev-amd64-cross" ;;
  arm64) TRIPLE=aarch64-unknown-linux-gnu GNU=aarch64-linux-gnu CROSS_DEBS="gcc-aarch64-linux-gnu libc6-dev-arm64-cross" ;;
  *) log "unknown architecture '$ARCH' (amd64 or arm64)"; exit 2 ;;
esac
OUT=${2:-}

HOST_TRIPLE=$(rustc -vV | sed -n 's/^host: //p')
args=(build --release --locked -p observer)
bin_dir="${CARGO_TARGET_DIR:-$ROOT/target}/release"
if [[ "$TRIPLE" != "$HOST_TRIPLE" ]]; then
  if ! command -v "$GNU-gcc" >/dev/null 2>&1; then
    log "installing the $ARCH cross compiler: $CROSS_DEBS"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086 # two package names
    apt-get install -y -qq --no-install-recommends $CROSS_DEBS >/dev/null
  fi
  if ! rustup target list --installed | grep -qx "$TRIPLE"; then
    rustup target add "$TRIPLE"
  fi
  # Cargo's linker and the cc crate's compiler for the target (cargo's and cc's
  # own environment variable spellings).
  upper=$(echo "$TRIPLE" | tr 'a-z-' 'A-Z_')
  export "CARGO_TARGET_${upper}_LINKER=$GNU-gcc" "CC_${TRIPLE//-/_}=$GNU-gcc" "AR_${TRIPLE//-/_}=$GNU-ar"
  args+=(--target "$TRIPLE")
  bin_dir="${CARGO_TARGET_DIR:-$ROOT/target}/$TRIPLE/release"
fi

log "cargo ${args[*]}"
(cd "$ROOT" && cargo "${args[@]}")
if [[ -n "$OUT" ]]; then
  install -D -m 0755 "$bin_dir/observer" "$OUT"
  log "$ARCH observer: $OUT"
else
  log "$ARCH observer: $bin_dir/observer"
fi
