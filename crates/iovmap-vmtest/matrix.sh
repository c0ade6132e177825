#!/usr/bin/env bash
# iovmap on a matrix of kernels and page sizes (issue 11): each row boots a Debian kernel
# under QEMU (TCG) with a vfio-pci device, and runs in it the facts report, the guest
# test, the vfio_passthrough example and the test suite. Run from anywhere:
#
#   bash crates/iovmap-vmtest/matrix.sh                 # every row
#   bash crates/iovmap-vmtest/matrix.sh x86_64-6.1      # some rows (run.sh is this one)
#
# Rows: x86_64-5.10 (bullseye), x86_64-6.1 (bookworm), x86_64-6.12 (trixie), x86_64-sid
# (the newest), arm64-4k and arm64-16k (sid's arm64 and arm64-16k flavours).
#
# 1. installs what the rows need where missing (apt: qemu-system-x86, qemu-system-arm,
#    gcc-aarch64-linux-gnu, libc6-dev-arm64-cross, cpio, kmod, ...; rustup: the aarch64
#    target); an arch whose pieces cannot be had makes its rows SKIP with the reason
#    (arm64) or FAIL (x86_64, which CI requires);
# 2. fetches each row's kernel and busybox from Debian into $IOVMAP_CACHE (outside the
#    clone, keyed by package version: debian-packages.sh), meanwhile builds the guest
#    programs and the test suite static, once per arch;
# 3. boots the rows, VMTEST_JOBS at a time (harness.sh: initramfs, QEMU, verdict), each in
#    target/vmtest/<row>/ (its serial.log stays there);
# 4. prints one line per row, with the facts the guest measured:
#      VM TEST <arch> <kernel> <page size>: PASS (holes yes, PROCMAP_QUERY no, ...)
#    (or FAIL <why> / SKIP <why>), then `VM MATRIX: PASS n/n rows` (exit 0) or
#    `VM MATRIX: FAIL ...` (exit 1). SKIPped rows are named on the last line and do not
#    fail the run unless VMTEST_REQUIRE_ALL=1.
#
# Knobs (environment): VMTEST_JOBS (guests at once, 2: on 2 cores two TCG guests of 2
# vCPUs finish the six rows in 0.65x the time one at a time does), VMTEST_ROW_ORDER (rows to
# start first, default: arm64 rows, the slowest), VMTEST_REQUIRE_ALL=1, IOVMAP_CACHE,
# and those of harness.sh (VMTEST_SMP, VMTEST_MEM, VMTEST_QEMU_TIMEOUT, VMTEST_SUITE,
# VMTEST_SUITE_ONLY, VMTEST_SUITE_PKGS, VMTEST_STRESS_SECS, VMTEST_THREADS, VMTEST_KEEP,
# VMTEST_BOOT). Every step has its own time limit; QEMU is killed on exit.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
case $TARGET_DIR in /*) ;; *) TARGET_DIR=$ROOT/$TARGET_DIR ;; esac
W=$TARGET_DIR/vmtest
ALL_ROWS=(x86_64-5.10 x86_64-6.1 x86_64-6.12 x86_64-sid arm64-4k arm64-16k)
JOBS=${VMTEST_JOBS:-2}
# shellcheck source=debian-packages.sh
. "$HERE/debian-packages.sh"
# shellcheck source=harness.sh
. "$HERE/harness.sh"
mkdir -p "$W"

now_s() { echo $(($(date +%s) - T_START)); }
T_START=$(date +%s)

# ------------------------------------------------------------ one row (a child process)
# `matrix.sh --row ROW` boots one row and writes its line to target/vmtest/ROW/result:
# each row is its own process, with its own trap for its QEMU.
if [ "${1:-}" = --row ]; then
  row=$2 dir=$W/$2
  mkdir -p "$dir"
  VM_CHILD=
  cleanup() {
    local rc=$?
    if [ -n "$VM_CHILD" ] && kill -0 "$VM_CHILD" 2>/dev/null; then
      kill -TERM "$VM_CHILD" 2>/dev/null || true
      sleep 1
      kill -KILL "$VM_CHILD" 2>/dev/null || true
    fi
    [ "${VMTEST_KEEP:-0}" = 1 ] || rm -f "$dir/bar2.bin" "$dir/nvme.img"
    exit $rc
  }
  trap cleanup EXIT
  trap 'exit 130' INT TERM
  vm_row "$row"
  result() { echo "VM TEST $ROW_ARCH ${VM_KREL:-${DEB_KERNEL_RELEASE:-?}} ${VM_PAGE:-?}: $*" >"$dir/result"; }
  vm_kernel "$row" || { result "FAIL $VM_WHY"; exit 0; }
  vm_initramfs "$row" "$dir" || { result "FAIL $VM_WHY"; exit 0; }
  vm_boot "$row" "$dir"
  {
    echo "================ $row: guest serial console (kernel log lines left out) ================"
    grep -avE '^\[ *[0-9]+\.[0-9]+\]' "$dir/serial.log" 2>/dev/null | tr -d '\r' || echo "(no serial log)"
  } >"$dir/console.txt"
  vm_verdict "$row" "$dir"
  if [ ${#VM_PROBLEMS[@]} -eq 0 ]; then
    result "PASS ($VM_FACTS)"
  else
    result "FAIL $(IFS=';'; echo "${VM_PROBLEMS[*]}") ($VM_FACTS)"
  fi
  exit 0
fi

# ------------------------------------------------------------------------ the matrix
ROWS=("$@")
[ ${#ROWS[@]} -gt 0 ] || ROWS=("${ALL_ROWS[@]}")
ARCHES=()
for row in "${ROWS[@]}"; do
  vm_row "$row" || { echo "usage: matrix.sh [${ALL_ROWS[*]}]"; exit 2; }
  case " ${ARCHES[*]-} " in *" $ROW_ARCH "*) ;; *) ARCHES+=("$ROW_ARCH") ;; esac
done
[ "$(uname -m)" = x86_64 ] || { echo "VM MATRIX: FAIL the host must be x86_64 (its builds and QEMU are)"; exit 1; }

PIDS=()
cleanup_matrix() {
  local rc=$? p
  for p in "${PIDS[@]-}"; do [ -n "$p" ] && kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  exit $rc
}
trap cleanup_matrix EXIT
trap 'echo "matrix.sh: interrupted"; exit 130' INT TERM

echo "matrix.sh: rows ${ROWS[*]}; $JOBS guest(s) at once, $VM_SMP vCPUs and $VM_MEM each; cache $IOVMAP_CACHE"
vm_host_tools "${ARCHES[@]}"
echo "matrix.sh: host tools ready at $(now_s) s"

# Kernels and busybox download while the guest programs build (network against CPU);
# one process fetches them all, so two never update one suite's lists at once.
(
  for row in "${ROWS[@]}"; do
    vm_row "$row"
    eval "skip=\${VM_TOOLS_MISSING_$ROW_ARCH:-}"
    [ -z "$skip" ] || continue
    vm_kernel "$row" >"$W/fetch-$row.err" 2>&1 || echo "matrix.sh: $row: $VM_WHY" >&2
    deb_fetch "$VM_BUSYBOX_SUITE" busybox-static "$ROW_DEBARCH" >/dev/null 2>>"$W/fetch-$row.err" || true
  done
) &
FETCH=$!
PIDS+=("$FETCH")

declare -A BUILD_FAILED=()
for arch in "${ARCHES[@]}"; do
  eval "skip=\${VM_TOOLS_MISSING_$arch:-}"
  [ -z "$skip" ] || continue
  t=$(date +%s)
  # One heavy build at a time (the machine is shared): the arches build in turn.
  if vm_build "$arch" 2>"$W/build-$arch.log"; then
    echo "matrix.sh: $arch guest programs and suite built in $(($(date +%s) - t)) s"
  else
    BUILD_FAILED[$arch]="$VM_WHY: $(grep -m1 -A3 '^error' "$W/build-$arch.log" | tr '\n' ' ' | cut -c1-300)"
    echo "matrix.sh: $arch build failed: ${BUILD_FAILED[$arch]}"
  fi
done
rm -f "$W/host-check-bin"
# host-check reads the backing files on the host: the x86_64 guest build where there is one.
hc=host
case " ${ARCHES[*]} " in *" x86_64 "*) [ -n "${BUILD_FAILED[x86_64]:-}${VM_TOOLS_MISSING_x86_64:-}" ] || hc=x86_64 ;; esac
vm_host_check_build "$hc" || echo "matrix.sh: $VM_WHY"
wait "$FETCH" || true
echo "matrix.sh: kernels fetched, builds done at $(now_s) s"

# Longest rows first, so that the last guest to start is a short one.
ORDER=()
for row in ${VMTEST_ROW_ORDER:-arm64-16k arm64-4k} "${ROWS[@]}"; do
  case " ${ROWS[*]} " in *" $row "*) ;; *) continue ;; esac
  case " ${ORDER[*]-} " in *" $row "*) ;; *) ORDER+=("$row") ;; esac
done

declare -A STARTED=()
running=0
for row in "${ORDER[@]}"; do
  vm_row "$row"
  dir=$W/$row
  mkdir -p "$dir"
  rm -f "$dir/result"
  eval "skip=\${VM_TOOLS_MISSING_$ROW_ARCH:-}"
  if [ -n "$skip" ]; then
    verb=SKIP
    [ "$ROW_ARCH" = x86_64 ] && verb=FAIL
    echo "VM TEST $ROW_ARCH ? ?: $verb $skip" >"$dir/result"
    continue
  fi
  if [ -n "${BUILD_FAILED[$ROW_ARCH]:-}" ]; then
    echo "VM TEST $ROW_ARCH ? ?: FAIL ${BUILD_FAILED[$ROW_ARCH]}" >"$dir/result"
    continue
  fi
  while [ "$running" -ge "$JOBS" ]; do
    wait -n || true
    running=$((running - 1))
  done
  echo "matrix.sh: $row starts at $(now_s) s"
  bash "$0" --row "$row" >"$dir/row.log" 2>&1 &
  PIDS+=($!)
  STARTED[$row]=$(date +%s)
  running=$((running + 1))
done
wait || true
echo "matrix.sh: all rows done at $(now_s) s"

pass=0 fail=0 skip=0 skipped=() failed=()
for row in "${ROWS[@]}"; do
  dir=$W/$row
  if [ -s "$dir/console.txt" ]; then cat "$dir/console.txt"; fi
done
echo "=================================================================================="
for row in "${ROWS[@]}"; do
  dir=$W/$row
  line=$(cat "$dir/result" 2>/dev/null || echo "VM TEST $row ? ?: FAIL the row printed no result (see $dir/row.log)")
  took=
  [ -n "${STARTED[$row]:-}" ] && took=" [$row, $(($(stat -c %Y "$dir/result" 2>/dev/null || date +%s) - STARTED[$row])) s]"
  echo "$line$took"
  case $line in
    *": PASS"*) pass=$((pass + 1)) ;;
    *": SKIP"*) skip=$((skip + 1)) skipped+=("$row") ;;
    *) fail=$((fail + 1)) failed+=("$row") ;;
  esac
done
n=${#ROWS[@]}
echo "matrix.sh: total $(now_s) s"
if [ "$fail" -eq 0 ] && { [ "$skip" -eq 0 ] || [ "${VMTEST_REQUIRE_ALL:-0}" != 1 ]; }; then
  echo "VM MATRIX: PASS $pass/$n rows${skipped[*]:+ (SKIP: ${skipped[*]})}"
  exit 0
fi
echo "VM MATRIX: FAIL $pass/$n rows passed${failed[*]:+ (FAIL: ${failed[*]})}${skipped[*]:+ (SKIP: ${skipped[*]})}"
exit 1
