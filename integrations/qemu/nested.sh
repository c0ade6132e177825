#!/usr/bin/env bash
# QEMU with a passed-through device, tested inside the kernel matrix's guests: each guest
# (x86_64 6.1: no udmabuf, no vfio dma-buf export; x86_64 7.2: both) is a host of its own,
# with a real vfio-pci device (the ivshmem BAR behind an emulated VT-d). In it the patched
# QEMU of integrations/qemu, then the stock one of the same version, run as VMMs with that
# device passed through (-device vfio-pci,host=...), virtio-gpu-pci with blob=true and
# memfd RAM, under -accel qtest, driven by gpu-qtest (QEMU's own way of testing devices
# without a guest kernel): blobs wholly in the BAR, in RAM and BAR interleaved, and in RAM,
# every pixel of two frames checked. In the 7.2 guest both QEMUs also migrate a RAM blob's
# VM between two QEMUs with postcopy, switched before the blob's pages are sent. Run from
# anywhere (root: the guests boot under the host's QEMU, TCG):
#
#   bash integrations/qemu/nested.sh
#
# Prints, per row and blob, how the patched QEMU mapped it (from its trace events) and
# that the pixels matched; per row, what the stock QEMU did with the same blobs; the
# postcopy lines; then QEMU VFIO TEST: PASS or FAIL.
#
# Knobs: NESTED_ROWS (default "x86_64-6.1 x86_64-sid"), NESTED_SIZE (the display, 640x480),
# NESTED_TIMEOUT (s per guest, 900), NESTED_MEM (guest RAM, 1536M), NESTED_KEEP=1 (keep
# the scratch directory, target/nested). Caches as build.sh and the matrix: QEMU builds and
# kernels under ${IOVMAP_CACHE:-~/.cache/iovmap}.
set -euo pipefail

QHERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$QHERE/../.." && pwd)
HERE=$ROOT/crates/iovmap-vmtest
. "$HERE/debian-packages.sh"
W=${CARGO_TARGET_DIR:-$ROOT/target}/nested
case $W in /*) ;; *) W=$ROOT/$W ;; esac
export VMTEST_MEM=${NESTED_MEM:-1536M} VMTEST_QEMU_TIMEOUT=${NESTED_TIMEOUT:-900}
. "$HERE/harness.sh"
ROWS=${NESTED_ROWS:-x86_64-6.1 x86_64-sid}
SIZE=${NESTED_SIZE:-640x480}
T0=$(date +%s)

say() { echo "nested.sh: $*" >&2; }
fail() { echo "nested.sh: $*" >&2; echo "QEMU VFIO TEST: FAIL $*"; exit 1; }

[ "$(uname -m)" = x86_64 ] || fail "the guests and the static programs are x86_64: run on x86_64"
[ "$(id -u)" = 0 ] || fail "not root: the guests' backing files and apt need it"
mkdir -p "$W"
PIDS=()
cleanup() {
  local rc=$? p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ "${NESTED_KEEP:-0}" = 1 ] || find "$W" -mindepth 1 -maxdepth 1 ! -name '*.log' -exec rm -rf {} + 2>/dev/null || true
  exit $rc
}
trap cleanup EXIT
trap 'echo "nested.sh: interrupted" >&2; exit 130' INT TERM

vm_host_tools x86_64
[ -z "${VM_TOOLS_MISSING_x86_64:-}" ] || fail "$VM_TOOLS_MISSING_x86_64"
command -v strip >/dev/null || vm_apt_install binutils || fail "$VM_WHY"
command -v python3 >/dev/null || vm_apt_install python3 || fail "$VM_WHY"
[ -f /usr/share/seabios/bios-256k.bin ] || vm_apt_install seabios || fail "$VM_WHY"
[ -f /usr/share/qemu/kvmvapic.bin ] || vm_apt_install qemu-system-data || fail "$VM_WHY"

# ------------------------------------------------------------------------ programs
T=$(date +%s)
bash "$QHERE/build.sh" >"$W/build.out" || fail "build.sh failed: see its messages above"
BUILD_S=$(( $(date +%s) - T ))
PATCHED=$(tail -n 1 "$W/build.out")
STOCK=$(sed -n 's/^stock //p' "$W/build.out")
LIBIOVMAP=$(sed -n 's/^lib //p' "$W/build.out")
[ -x "$PATCHED" ] && [ -x "$STOCK" ] && [ -d "$LIBIOVMAP" ] || fail "build.sh printed no usable binaries"
ABI=$(cat "$ROOT/crates/iovmap-capi/abi-version")
gcc -std=c11 -O2 -Wall -Wextra -Werror -static -o "$W/gpu-qtest" "$QHERE/gpu-qtest.c" || fail "cannot build gpu-qtest.c"

# ----------------------------------------------------------------------- initramfs
# initramfs ROW DIR: busybox, the vfio modules (and udmabuf where it is one), both QEMUs
# (stripped) with their shared libraries and the firmware they open, gpu-qtest, /init.
initramfs() {
  local row=$1 dir=$2 r m so
  r=$dir/rootfs
  rm -rf "$r"
  mkdir -p "$r"/{bin,dev,proc,sys,tmp,lib/modules,lib64,lib/x86_64-linux-gnu,opt/iovmap/lib,usr/share/seabios,usr/share/qemu}
  vm_busybox amd64 "$r" || return 1
  for m in $("$r/bin/busybox" --list); do [ "$m" = busybox ] || ln -sf busybox "$r/bin/$m"; done
  ln -s bin "$r/sbin"
  vm_modules "$dir" "$r" || return 1
  # The builds carry debug info (66 MiB): stripped, both fit in ~45 MiB.
  strip -o "$r/bin/qemu-system-x86_64" "$PATCHED" && strip -o "$r/bin/qemu-stock" "$STOCK" \
    || { VM_WHY="cannot strip the QEMU binaries"; return 1; }
  cp -L "$LIBIOVMAP/libiovmap.so.$ABI" "$r/opt/iovmap/lib/" || { VM_WHY="no libiovmap.so.$ABI"; return 1; }
  while read -r so; do
    case $so in
      */libiovmap.so*) ;;
      /lib64/ld-linux-x86-64.so.2) cp -L "$so" "$r/lib64/" ;;
      *) cp -L "$so" "$r/lib/x86_64-linux-gnu/" ;;
    esac
  done < <({ LD_LIBRARY_PATH=$LIBIOVMAP ldd "$PATCHED"; ldd "$STOCK"; } | awk '/=>/ && $3 ~ /^\// {print $3} !/=>/ && $1 ~ /^\// {print $1}' | sort -u)
  # Even under qtest, QEMU loads the BIOS and the vapic option ROM.
  cp /usr/share/seabios/bios-256k.bin "$r/usr/share/seabios/" && cp /usr/share/qemu/kvmvapic.bin "$r/usr/share/qemu/" \
    || { VM_WHY="no bios-256k.bin/kvmvapic.bin (seabios, qemu-system-data)"; return 1; }
  cp "$W/gpu-qtest" "$r/bin/gpu-qtest" && cp "$QHERE/nested-init.sh" "$r/init" && chmod +x "$r/init" \
    || { VM_WHY="cannot install gpu-qtest and /init"; return 1; }
  # Uncompressed: the kernel unpacks it without decompressing (slow under TCG).
  (cd "$r" && find . | cpio -o -H newc --quiet >"$dir/initramfs.cpio") || { VM_WHY="cpio failed"; return 1; }
  rm -rf "$r"
}

# ----------------------------------------------------------------------------- rows
# prepare ROW: its kernel and initramfs, one row after the other (the caches are shared).
prepare() {
  local row=$1 dir=$W/$1
  mkdir -p "$dir"
  rm -f "$dir/status" "$dir/serial.log" "$dir/boot.env"
  vm_kernel "$row" >"$dir/kernel.log" 2>&1 || { echo "FAIL $VM_WHY" >"$dir/status"; return 0; }
  initramfs "$row" "$dir" || { echo "FAIL $VM_WHY" >"$dir/status"; return 0; }
  printf 'VM_KERNEL_BOOT=%q\n' "$VM_KERNEL_BOOT" >"$dir/boot.env"
}
# boot ROW: the matrix's machine (q35, VT-d, ivshmem, vm_boot), the serial console in
# $W/ROW/serial.log, a line in $W/ROW/status.
boot() {
  local row=$1 dir=$W/$1 append
  . "$dir/boot.env"
  append="nested.size=$SIZE"
  [ "$row" = x86_64-sid ] && append="$append nested.postcopy=1"
  VM_APPEND=$append vm_boot "$row" "$dir" || { echo "FAIL $VM_WHY" >"$dir/status"; return 0; }
  echo "booted in $(( $(cat "$dir/qemu.ms") / 1000 )) s, QEMU exit $(cat "$dir/qemu.rc")" >"$dir/status"
}

for r in $ROWS; do
  say "$r: kernel and initramfs"
  prepare "$r"
done
# Both guests at once (one host thread each, thread=single), as the matrix runs them.
for r in $ROWS; do
  [ -s "$W/$r/boot.env" ] || continue
  say "$r: boot"
  boot "$r" >"$W/$r.log" 2>&1 &
  PIDS+=($!)
done
for p in "${PIDS[@]}"; do wait "$p" || true; done
PIDS=()

# -------------------------------------------------------------------------- verdict
rc=0
for r in $ROWS; do
  st=$(cat "$W/$r/status" 2>/dev/null || echo "FAIL no status (see $W/$r.log)")
  say "$r: $st"
  case $st in FAIL*) echo "$r: $st"; rc=1; continue ;; esac
  python3 "$QHERE/nested_verdict.py" "$r" "$W/$r/serial.log" || {
    rc=1
    say "$r failed; the guest's NESTED lines:"
    grep -a '^NESTED' "$W/$r/serial.log" | tr -d '\r' | tail -n 80 | sed "s/^/  [$r] /" >&2 || true
  }
done
say "timings: build.sh ${BUILD_S} s, nested.sh total $(( $(date +%s) - T0 )) s"
if [ $rc = 0 ]; then
  echo "QEMU VFIO TEST: PASS"
else
  echo "QEMU VFIO TEST: FAIL"
fi
exit $rc
