#!/usr/bin/env bash
# iovmap on a real vfio-pci device, in a guest VM (issue 7). Run from anywhere:
#
#   bash crates/iovmap-vmtest/run.sh
#
# 1. installs what it needs with apt where missing (qemu-system-x86, linux-image-amd64,
#    busybox-static, cpio, kmod, xz-utils, zstd, binutils, file, gcc, libc6-dev);
# 2. builds crates/iovmap-vmtest's guest program and the vfio_passthrough example as static
#    binaries (gnu target, crt-static against glibc's libc.a);
# 3. builds an initramfs: busybox, the vfio modules of the guest kernel in dependency order,
#    the two binaries, and an /init that binds the ivshmem and nvme devices to vfio-pci and
#    runs them;
# 4. boots the Debian kernel under QEMU (TCG, q35, -cpu max, emulated Intel IOMMU with
#    caching-mode=on, guest intel_iommu=on; the extracted ELF vmlinux through its PVH entry)
#    with an ivshmem-plain device whose BAR2 is a host file under target/vmtest/, and an nvme
#    device (its BAR0 holds an MSI-X table: the sparse-mmap candidate);
# 5. after the vfio checks, runs iovmap's own test suite (every test binary of crates/iovmap,
#    built static) in the guest: the /proc/self/maps fallback (6.1 has no PROCMAP_QUERY),
#    the hole-safe map path and the leak checks, on a kernel that punches holes;
# 6. reads the verdict from the serial log, checks the bytes the guest left in the host-side
#    backing file (iovmap-vmtest host-check, plus the magic and verdict read here with od),
#    and prints `VM TEST: PASS` (exit 0) only if everything held, else `VM TEST: FAIL ...`.
#
# Scratch files live in target/vmtest/ (or $CARGO_TARGET_DIR/vmtest/). QEMU is killed and
# the backing files removed on exit. Every step has its own time limit.
#
# Knobs (environment): VMTEST_QEMU_TIMEOUT (s, default 300), VMTEST_BUILD_TIMEOUT (s, 1500),
# VMTEST_APT_TIMEOUT (s, 900), VMTEST_STRESS_SECS (per stress scenario, 3), VMTEST_THREADS
# (stress loop threads, 4), VMTEST_SMP (guest vCPUs, 4), VMTEST_KVER (guest kernel version,
# default: newest in /boot with vfio-pci), VMTEST_BOOT=pvh|bzimage (default pvh),
# VMTEST_KEEP=1 (keep the backing files and the serial log), VMTEST_SUITE=0 (skip step 5),
# VMTEST_SUITE_ONLY="races leaks" (run only these of iovmap's test binaries in step 5).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
case $TARGET_DIR in /*) ;; *) TARGET_DIR=$ROOT/$TARGET_DIR ;; esac
W=$TARGET_DIR/vmtest
QEMU_TIMEOUT=${VMTEST_QEMU_TIMEOUT:-300}
BUILD_TIMEOUT=${VMTEST_BUILD_TIMEOUT:-1500}
APT_TIMEOUT=${VMTEST_APT_TIMEOUT:-900}
STRESS_SECS=${VMTEST_STRESS_SECS:-3}
THREADS=${VMTEST_THREADS:-4}
SMP=${VMTEST_SMP:-4}
BOOT=${VMTEST_BOOT:-pvh}
SUITE=${VMTEST_SUITE:-1}
SUITE_ONLY=${VMTEST_SUITE_ONLY:-}
BAR_SIZE=32M          # layout::BAR_SIZE
TRIPLE=x86_64-unknown-linux-gnu

T_START=$(date +%s%N)
now_ms() { echo $(( ($(date +%s%N) - T_START) / 1000000 )); }
say() { echo "run.sh: $*"; }
fail() { echo "run.sh: $*" >&2; echo "VM TEST: FAIL $*"; exit 1; }

# Long steps run in the background and are waited for, so that a signal reaches the
# trap at once (bash defers traps while a foreground child runs); the trap kills them.
CHILD=
BACKING=$W/ivshmem-bar2.bin
NVME_IMG=$W/nvme.img
cleanup() {
  local rc=$?
  if [ -n "$CHILD" ] && kill -0 "$CHILD" 2>/dev/null; then
    kill -TERM "$CHILD" 2>/dev/null || true
    sleep 1
    kill -KILL "$CHILD" 2>/dev/null || true
  fi
  if [ "${VMTEST_KEEP:-0}" != 1 ]; then rm -f "$BACKING" "$NVME_IMG"; fi
  exit $rc
}
trap cleanup EXIT
trap 'echo "run.sh: interrupted"; exit 130' INT TERM
in_bg() { "$@" & CHILD=$!; local rc=0; wait "$CHILD" || rc=$?; CHILD=; return $rc; }

mkdir -p "$W"

# ------------------------------------------------------------------ packages
kernel_ok() {
  local k
  for k in /boot/vmlinuz-*; do
    [ -e "$k" ] || continue
    ls "/lib/modules/${k#/boot/vmlinuz-}"/kernel/drivers/vfio/pci/vfio-pci.ko* >/dev/null 2>&1 && return 0
  done
  return 1
}
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
kernel_ok || need+=(linux-image-amd64)
# busybox-static unless /bin/busybox is known to be static (the busybox package's is not).
if ! { [ -x /bin/busybox ] && command -v file >/dev/null && file -L /bin/busybox | grep -q 'statically linked'; }; then
  need+=(busybox-static)
fi
command -v cpio >/dev/null || need+=(cpio)
command -v modinfo >/dev/null || need+=(kmod)
command -v xz >/dev/null || need+=(xz-utils)
command -v zstd >/dev/null || need+=(zstd)
command -v readelf >/dev/null || need+=(binutils)
command -v file >/dev/null || need+=(file)
command -v cc >/dev/null || need+=(gcc)
[ -f /usr/lib/x86_64-linux-gnu/libc.a ] || need+=(libc6-dev)
if [ ${#need[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || fail "missing ${need[*]} and not root: install them (apt-get install ${need[*]})"
  say "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  in_bg timeout -k 10 "$APT_TIMEOUT" apt-get update -qq || fail "apt-get update failed or timed out"
  in_bg timeout -k 10 "$APT_TIMEOUT" apt-get install -y -qq --no-install-recommends "${need[@]}" \
    || fail "apt-get install ${need[*]} failed or timed out"
fi
file -L /bin/busybox | grep -q 'statically linked' || fail "/bin/busybox is not static (install busybox-static)"
[ "$(uname -m)" = x86_64 ] || fail "the guest is x86_64 and its binaries are built for the host: run on x86_64"

# --------------------------------------------------------------- guest kernel
KVER=${VMTEST_KVER:-}
if [ -z "$KVER" ]; then
  for k in $(ls /boot/vmlinuz-* 2>/dev/null | sed 's|/boot/vmlinuz-||' | sort -V); do
    ls /lib/modules/"$k"/kernel/drivers/vfio/pci/vfio-pci.ko* >/dev/null 2>&1 && KVER=$k
  done
fi
[ -n "$KVER" ] && [ -r "/boot/vmlinuz-$KVER" ] || fail "no /boot/vmlinuz-<version> with a vfio-pci module (apt-get install linux-image-amd64)"
VMLINUZ=/boot/vmlinuz-$KVER
KERNEL=$VMLINUZ
if [ "$BOOT" = pvh ]; then
  # The bzImage's payload is a compressed ELF vmlinux; booting that ELF through its PVH
  # entry note skips the in-guest decompression, which is slow under TCG. Find the
  # payload by its compression magic (bash strings cannot hold NUL bytes, so the magics
  # are NUL-free prefixes), decompress it, and keep it if it is an ELF with the note.
  VMLINUX=$W/vmlinux-$KVER
  if [ ! -s "$VMLINUX" ] || [ "$VMLINUX" -ot "$VMLINUZ" ]; then
    rm -f "$VMLINUX"
    for fmt in "xz:$(printf '\3757zXZ')" "zstd:$(printf '\050\265\057\375')" "gzip:$(printf '\037\213\010')"; do
      tool=${fmt%%:*} magic=${fmt#*:}
      command -v "$tool" >/dev/null || continue
      for off in $(LC_ALL=C grep -aboF -- "$magic" "$VMLINUZ" | head -3 | cut -d: -f1); do
        tail -c +$((off + 1)) "$VMLINUZ" | "$tool" -dc >"$VMLINUX.tmp" 2>/dev/null || true
        if [ "$(head -c 4 "$VMLINUX.tmp" | od -An -c | tr -d ' ')" = 177ELF ]; then
          mv "$VMLINUX.tmp" "$VMLINUX"
          break 2
        fi
      done
    done
    rm -f "$VMLINUX.tmp"
  fi
  # XEN_ELFNOTE_PHYS32_ENTRY (0x12) is the PVH entry point QEMU boots.
  if [ -s "$VMLINUX" ] && readelf -n "$VMLINUX" 2>/dev/null | grep -q '0x00000012'; then
    KERNEL=$VMLINUX
  else
    say "no PVH entry in an extracted vmlinux: booting the bzImage (slower: decompression under TCG)"
  fi
fi
say "guest kernel $KVER ($KERNEL)"

# ------------------------------------------------------------- guest programs
T_BUILD=$(date +%s%N)
say "building iovmap-vmtest and vfio_passthrough (static, $TRIPLE, crt-static)"
# With --target, RUSTFLAGS reach only the target's crates (not build scripts or proc macros),
# and the artifacts go to target/$TRIPLE/: the host build's cache is left alone.
in_bg env RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" timeout -k 10 "$BUILD_TIMEOUT" \
  cargo build --manifest-path "$ROOT/Cargo.toml" --release -p iovmap-vmtest --bin iovmap-vmtest \
  --example vfio_passthrough --target "$TRIPLE" \
  || fail "cargo build of the guest programs failed or timed out (${BUILD_TIMEOUT}s)"
BUILD_MS=$(( ($(date +%s%N) - T_BUILD) / 1000000 ))
BIN=$TARGET_DIR/$TRIPLE/release/iovmap-vmtest
EXAMPLE=$TARGET_DIR/$TRIPLE/release/examples/vfio_passthrough
for b in "$BIN" "$EXAMPLE"; do
  kind=$(file -L "$b")
  case $kind in
    *"statically linked"* | *"static-pie linked"*) ;;
    *) fail "$b is not statically linked: $kind" ;;
  esac
done
say "built in $BUILD_MS ms: $(file -L "$BIN" | cut -d, -f1,2,5 | sed 's|.*/||')"

# iovmap's own tests, to run in the guest too (step 5): every test binary of the crate.
SUITE_BINS=()
if [ "$SUITE" = 1 ]; then
  say "building iovmap's test suite (static)"
  suite_json=$W/suite-build.json
  mkdir -p "$W"
  in_bg env RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" timeout -k 10 "$BUILD_TIMEOUT" \
    cargo test --manifest-path "$ROOT/Cargo.toml" --release -p iovmap --no-run --target "$TRIPLE" \
    --message-format=json >"$suite_json" \
    || fail "cargo test --no-run of iovmap's suite failed or timed out (${BUILD_TIMEOUT}s)"
  while IFS= read -r exe; do SUITE_BINS+=("$exe"); done < <(grep -o '"executable":"[^"]*"' "$suite_json" | cut -d'"' -f4)
  [ ${#SUITE_BINS[@]} -ge 5 ] || fail "expected iovmap's 5+ test binaries, found ${#SUITE_BINS[@]}"
  if [ -n "$SUITE_ONLY" ]; then
    kept=()
    for b in "${SUITE_BINS[@]}"; do
      case " $SUITE_ONLY " in *" $(basename "$b" | sed 's/-[0-9a-f]*$//') "*) kept+=("$b") ;; esac
    done
    [ ${#kept[@]} -gt 0 ] || fail "VMTEST_SUITE_ONLY='$SUITE_ONLY' names none of iovmap's test binaries"
    SUITE_BINS=("${kept[@]}")
  fi
  say "suite: $(for b in "${SUITE_BINS[@]}"; do basename "$b" | sed 's/-[0-9a-f]*$//'; done | tr '\n' ' ')"
fi

# ------------------------------------------------------------------ initramfs
R=$W/rootfs
rm -rf "$R"
mkdir -p "$R"/{bin,dev,proc,sys,lib/modules}
cp /bin/busybox "$R/bin/busybox"
for applet in $("$R/bin/busybox" --list); do
  [ "$applet" = busybox ] || ln -sf busybox "$R/bin/$applet"
done
ln -s bin "$R/sbin"
cp "$BIN" "$R/bin/iovmap-vmtest"
cp "$EXAMPLE" "$R/bin/vfio_passthrough"
mkdir -p "$R/suite"
for b in "${SUITE_BINS[@]}"; do cp "$b" "$R/suite/$(basename "$b" | sed 's/-[0-9a-f]*$//')"; done

# vfio-pci's module dependencies, depth first (modinfo -F depends), plus the type1 IOMMU
# backend vfio loads on demand (a softdep, which modinfo -F depends does not list).
ORDER=()
add_module() {
  local m=$1 dep
  for dep in $(modinfo -k "$KVER" -F depends "$m" 2>/dev/null | tr ',' ' '); do add_module "$dep"; done
  case " ${ORDER[*]-} " in *" $m "*) ;; *) ORDER+=("$m") ;; esac
}
for m in vfio vfio_iommu_type1 vfio-pci; do add_module "$m"; done
: >"$R/lib/modules/order"
for m in "${ORDER[@]}"; do
  f=$(modinfo -k "$KVER" -n "$m" 2>/dev/null) || fail "modinfo cannot find module $m for $KVER"
  case $f in
    (builtin | "") continue ;;
    (*.ko.xz) xz -dc "$f" >"$R/lib/modules/$m.ko" ;;
    (*.ko.zst) zstd -qdc "$f" >"$R/lib/modules/$m.ko" ;;
    (*.ko.gz) gzip -dc "$f" >"$R/lib/modules/$m.ko" ;;
    (*) cp "$f" "$R/lib/modules/$m.ko" ;;
  esac
  echo "$m" >>"$R/lib/modules/order"
done
say "modules: $(tr '\n' ' ' <"$R/lib/modules/order")"

cat >"$R/init" <<'INIT'
#!/bin/sh
# The guest's init: load vfio, bind the test devices to vfio-pci, run the test and the
# example, power off. Every line it prints starts with INIT: for run.sh to find.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
up() { cut -d' ' -f1 /proc/uptime; }
echo "INIT: userspace at $(up) s (guest uptime)"
arg() { sed -n "s/.*vmtest\.$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
for m in $(cat /lib/modules/order); do
  insmod /lib/modules/$m.ko || echo "INIT: insmod $m failed"
done
find_dev() {   # vendor device -> first PCI address
  for d in /sys/bus/pci/devices/*; do
    if [ "$(cat $d/vendor)" = "$1" ] && [ "$(cat $d/device)" = "$2" ]; then echo "${d##*/}"; return; fi
  done
}
bind() {
  echo vfio-pci >/sys/bus/pci/devices/$1/driver_override
  [ -e /sys/bus/pci/devices/$1/driver ] && echo $1 >/sys/bus/pci/devices/$1/driver/unbind
  echo $1 >/sys/bus/pci/drivers_probe
  echo "INIT: $1 ($2) driver $(basename $(readlink /sys/bus/pci/devices/$1/driver) 2>/dev/null), iommu group $(basename $(readlink /sys/bus/pci/devices/$1/iommu_group))"
}
IV=$(find_dev 0x1af4 0x1110)
NV=$(find_dev 0x1b36 0x0010)
if [ -z "$IV" ]; then
  echo "VMTEST: FAIL no ivshmem device (1af4:1110) in the guest"
else
  bind $IV ivshmem
  NVARG=
  if [ -n "$NV" ]; then bind $NV nvme; NVARG="--nvme $NV"; fi
  echo "INIT: /dev/vfio: $(ls /dev/vfio | tr '\n' ' ')"
  T0=$(up)
  echo "INIT: iovmap-vmtest starts at $T0 s"
  /bin/iovmap-vmtest guest --ivshmem $IV $NVARG --stress-secs $(arg stress) --threads $(arg threads)
  echo "INIT: iovmap-vmtest exit $? at $(up) s (started at $T0 s)"
  /bin/vfio_passthrough $IV --verify-bar
  echo "INIT: vfio_passthrough ivshmem exit $?"
  if [ -n "$NV" ]; then
    /bin/vfio_passthrough $NV
    echo "INIT: vfio_passthrough nvme exit $?"
  fi
fi
# iovmap's own suite, on this kernel (a test prints SKIP with its reason where the guest
# lacks something).
if [ -n "$(ls /suite 2>/dev/null)" ]; then
  echo 16 >/proc/sys/vm/nr_hugepages
  mkdir -p /tmp && mount -t tmpfs tmpfs /tmp && cd /tmp
  for t in /suite/*; do
    echo "INIT: suite $(basename $t) starts at $(up) s"
    RUST_BACKTRACE=1 $t --test-threads=2 >/tmp/suite.out 2>&1
    rc=$?
    sed "s|^|SUITE[$(basename $t)]: |" /tmp/suite.out
    echo "SUITE: $(basename $t) exit $rc at $(up) s"
  done
fi
echo "INIT: done at $(up) s, powering off"
sync
poweroff -f
INIT
chmod +x "$R/init"
# Uncompressed: the kernel unpacks it without decompressing (slow under TCG).
(cd "$R" && find . | cpio -o -H newc --quiet >"$W/initramfs.cpio") || fail "cpio failed"
say "initramfs: $(( $(stat -c %s "$W/initramfs.cpio") / 1024 )) KiB"

# ----------------------------------------------------------------------- boot
rm -f "$BACKING" "$NVME_IMG"
truncate -s "$BAR_SIZE" "$BACKING" && truncate -s 1M "$NVME_IMG" || fail "cannot create backing files in $W"
LOG=$W/serial.log
rm -f "$LOG"
QEMU=(qemu-system-x86_64
  -nodefaults -machine q35 -accel tcg,thread=multi -cpu max -smp "$SMP" -m 1G
  -display none -monitor none -serial "file:$LOG" -no-reboot
  -kernel "$KERNEL" -initrd "$W/initramfs.cpio"
  -append "console=ttyS0 intel_iommu=on panic=-1 quiet vmtest.stress=$STRESS_SECS vmtest.threads=$THREADS"
  -device intel-iommu,caching-mode=on
  -object "memory-backend-file,id=bar2,share=on,mem-path=$BACKING,size=$BAR_SIZE"
  -device ivshmem-plain,memdev=bar2
  -drive "file=$NVME_IMG,if=none,id=nv,format=raw"
  -device nvme,drive=nv,serial=iovmap-vmtest)
say "${QEMU[*]}"
T_BOOT=$(date +%s%N)
QRC=0
in_bg timeout -k 5 "$QEMU_TIMEOUT" "${QEMU[@]}" </dev/null || QRC=$?
QEMU_MS=$(( ($(date +%s%N) - T_BOOT) / 1000000 ))
[ "$QRC" = 124 ] && say "QEMU timed out after ${QEMU_TIMEOUT}s"
say "QEMU exited with $QRC after $QEMU_MS ms"

echo "================ guest serial console (kernel log lines left out) ================"
[ -f "$LOG" ] && grep -avE '^\[ *[0-9]+\.[0-9]+\]' "$LOG" | tr -d '\r' || echo "(no serial log)"
echo "=================================================================================="

# ------------------------------------------------------------------- verdict
problems=()
if ! grep -aq '^VMTEST: PASS' "$LOG" 2>/dev/null; then
  guest_verdict=$(grep -a '^VMTEST:' "$LOG" 2>/dev/null | tail -1 | tr -d '\r' || true)
  problems+=("guest: ${guest_verdict:-no VMTEST: verdict line on the serial console}")
fi
grep -aq '^VMTEST: FAIL' "$LOG" 2>/dev/null && problems+=("guest printed VMTEST: FAIL")
grep -aq 'INIT: iovmap-vmtest exit 0 ' "$LOG" 2>/dev/null || problems+=("iovmap-vmtest did not exit 0")
grep -aq 'INIT: vfio_passthrough ivshmem exit 0' "$LOG" 2>/dev/null || problems+=("vfio_passthrough on ivshmem did not exit 0")
if grep -aq 'INIT: vfio_passthrough nvme exit' "$LOG" 2>/dev/null; then
  grep -aq 'INIT: vfio_passthrough nvme exit 0' "$LOG" || problems+=("vfio_passthrough on nvme did not exit 0")
fi
grep -aq 'INIT: done' "$LOG" 2>/dev/null || problems+=("the guest did not finish (QEMU exit $QRC)")
for b in "${SUITE_BINS[@]}"; do
  name=$(basename "$b" | sed 's/-[0-9a-f]*$//')
  grep -aq "^SUITE: $name exit 0 " "$LOG" 2>/dev/null || problems+=("iovmap's $name tests failed in the guest (see SUITE[$name] lines)")
done

# The bytes the guest left in the host file: the whole image, and (independently of the
# Rust code) the magic and the verdict.
if [ -s "$BACKING" ]; then
  HOSTCHECK=$("$BIN" host-check "$BACKING" 2>&1) || problems+=("host-check: $HOSTCHECK")
  echo "$HOSTCHECK"
  magic=$(head -c 16 "$BACKING")
  verdict=$(dd if="$BACKING" bs=1 skip=16 count=4 2>/dev/null)
  say "backing file: magic '$magic', verdict '$verdict'"
  [ "$magic" = IOVMAP-VMTEST-01 ] && [ "$verdict" = PASS ] || problems+=("backing file magic/verdict '$magic'/'$verdict'")
else
  problems+=("no backing file")
fi

up=$(sed -n 's/^INIT: userspace at \([0-9.]*\) s.*/\1/p' "$LOG" 2>/dev/null | head -1)
test_span=$(sed -n 's/^INIT: iovmap-vmtest exit [0-9]* at \([0-9.]*\) s (started at \([0-9.]*\) s)/\1 \2/p' "$LOG" 2>/dev/null | head -1)
tt=$( [ -n "$test_span" ] && echo "$test_span" | awk '{printf "%.2f", $1 - $2}' || echo "?")
say "timings: build ${BUILD_MS} ms; QEMU start to guest userspace ${up:-?} s (guest clock); guest test ${tt} s; QEMU total ${QEMU_MS} ms; run.sh total $(now_ms) ms"

if [ ${#problems[@]} -eq 0 ]; then
  echo "VM TEST: PASS"
  exit 0
fi
printf 'run.sh: %s\n' "${problems[@]}"
echo "VM TEST: FAIL ${problems[*]}"
exit 1
