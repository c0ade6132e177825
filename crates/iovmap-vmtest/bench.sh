#!/usr/bin/env bash
# The benchmarks that need a kernel this host lacks (udmabuf), in a guest of the kernel
# matrix: interleaved (benches/src/bin/interleaved.rs) and the demo, on a quiet guest (no
# tests, no stress) booted by harness.sh. Figures from a TCG guest are ratios only:
# docs/benchmarks.md, "Kernel-built views". Run from anywhere:
#
#   bash crates/iovmap-vmtest/bench.sh                       # x86_64-sid: large, crossover, demo
#   bash crates/iovmap-vmtest/bench.sh arm64-4k "large,5"    # a row, and what to run
#   bash crates/iovmap-vmtest/bench.sh --build-only          # build what it boots, boot nothing
#
# --build-only (what .ci/run does, so that a broken bench script fails CI): builds the
# guest programs and the benchmark programs for the row's arch and checks that each is
# there and static, then stops.
#
# What to run: interleaved's commands, `+` between commands and `,` between arguments
# ("large,7+crossover,11"), or `demo`. Prints the guest's output between the BENCH: lines.
# Knobs: VMTEST_MEM (guest RAM, default 3G here: W2 maps a 2 GiB memfd), VMTEST_SMP (2),
# VMTEST_QEMU_TIMEOUT (s, default 5400 here), and harness.sh's.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
case $TARGET_DIR in /*) ;; *) TARGET_DIR=$ROOT/$TARGET_DIR ;; esac
W=$TARGET_DIR/vmtest-bench
BUILD_ONLY=0
if [ "${1:-}" = --build-only ]; then
  BUILD_ONLY=1
  shift
fi
ROW=${1:-x86_64-sid}
export VMTEST_MEM=${VMTEST_MEM:-3G} VMTEST_QEMU_TIMEOUT=${VMTEST_QEMU_TIMEOUT:-5400}
export VMTEST_SUITE=0 VM_BENCH_BINS=1 VM_BENCH=${2:-large,7+crossover,11+demo}
# shellcheck source=debian-packages.sh
. "$HERE/debian-packages.sh"
# shellcheck source=harness.sh
. "$HERE/harness.sh"
mkdir -p "$W"
die() { echo "bench.sh: $*" >&2; exit 1; }

VM_CHILD=
trap '[ -z "$VM_CHILD" ] || kill -KILL "$VM_CHILD" 2>/dev/null || true' EXIT
vm_row "$ROW" || die "$VM_WHY"
vm_host_tools "$ROW_ARCH"
eval "missing=\${VM_TOOLS_MISSING_$ROW_ARCH:-}"
[ -z "$missing" ] || die "$missing"
vm_build "$ROW_ARCH" || die "$VM_WHY"
if [ "$BUILD_ONLY" = 1 ]; then
  n=$(grep -c . "$W/build-$ROW_ARCH/bins")
  for b in interleaved iovmap-demo; do
    grep -q "/$b\$" "$W/build-$ROW_ARCH/bins" || die "vm_build listed no $b"
  done
  echo "bench.sh: built the $n programs a $ROW run boots with (vm_build checked each is static); not booting" >&2
  exit 0
fi
vm_kernel "$ROW" || die "$VM_WHY"
dir=$W/$ROW
mkdir -p "$dir"
vm_initramfs "$ROW" "$dir" || die "$VM_WHY"
echo "bench.sh: $ROW ($DEB_KERNEL_RELEASE), $VMTEST_MEM, running: $VM_BENCH" >&2
vm_boot "$ROW" "$dir" || die "$VM_WHY"
tr -d '\r' <"$dir/serial.log" | sed -n '/^BENCH: BEGIN/,/^BENCH: END/p'
ends=$(tr -d '\r' <"$dir/serial.log" | grep -c '^BENCH: END .* exit 0 ' || true)
want=$(echo "$VM_BENCH" | tr '+' '\n' | grep -c .)
[ "$ends" = "$want" ] || die "$((want - ends)) of $want runs did not finish (QEMU rc $(cat "$dir/qemu.rc"); $dir/serial.log)"
echo "bench.sh: done in $(( $(cat "$dir/qemu.ms") / 1000 )) s of guest time" >&2
