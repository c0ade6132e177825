#!/usr/bin/env bash
# QEMU's virtio-gpu blob resources through libiovmap, end to end, pixels checked (issue 13).
# Run from anywhere (as root: it reserves huge pages and mounts hugetlbfs):
#
#   bash integrations/qemu/test.sh
#
# 1. builds (or reuses) the patched and the stock QEMU 10.0 with build.sh (its cache);
# 2. fetches Debian bookworm's 6.1 kernel with deb_kernel (crates/iovmap-vmtest/
#    debian-packages.sh) and builds a busybox initramfs with its virtio-gpu DRM modules and
#    pattern.c built static; its /init draws frame 1 of pattern.c's picture into /dev/fb0
#    (fbdev emulation on the driver's dumb buffer, which is a guest blob when the device
#    offers blobs), waits for the host, draws frame 2, waits, powers off;
# 3. boots it with -device virtio-gpu-pci,blob=true three times (blobtest.py drives each
#    boot: serial handshake, QMP screendumps, every pixel compared with pattern.c, QEMU's
#    trace events read for how the scanout blob was mapped):
#      patched QEMU, guest RAM on memory-backend-memfd      -> must be an iovmap view
#      patched QEMU, guest RAM on memory-backend-file in a hugetlbfs mount
#                                                           -> a view or the copy fallback
#      stock QEMU, the memfd command line                   -> must refuse blob=true
# 4. prints, each on its own line,
#      memfd: <iovecs> iovecs, <runs> runs, pixels match
#      hugetlbfs: <iovecs> iovecs, <view: runs/cloned/fd-mapped | copy: iovmap's reason>, pixels match
#      stock QEMU: refused (<its message>)
#    then `QEMU BLOB TEST: PASS` (exit 0) only if all three held, else
#    `QEMU BLOB TEST: FAIL <why>` (exit 1). Every number comes from QEMU's trace events.
#
# Huge pages: reserves what the hugetlbfs boot needs (256 MiB of 2 MiB pages) on top of
# those already free, and gives back what it added on exit; the mount is removed too. The
# scratch directory (mktemp) is removed on exit unless QEMU_TEST_KEEP=1.
#
# Knobs (environment): QEMU_TEST_TIMEOUT (s per boot, default 300), QEMU_TEST_BUILD_TIMEOUT
# (s for build.sh, default 5400), QEMU_TEST_APT_TIMEOUT (s, 900), QEMU_TEST_KEEP=1 (keep the
# scratch directory: serial logs, traces, screendumps), QEMU_TEST_KERNEL_SUITE (default
# bookworm: its 6.1 kernel is known to make fbdev blobs), QEMU_TEST_FIGURES="640x480
# 1280x800/20000" (extra memfd boots at these display sizes, optionally after the guest
# fragments PAGES pages of its memory; their iovec counts and map times on stderr:
# docs/qemu.md's figures; they do not change the verdict), and build.sh's knobs
# (IOVMAP_CACHE, QEMU_SUITE, QEMU_JOBS).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
# shellcheck source=../../crates/iovmap-vmtest/debian-packages.sh
. "$ROOT/crates/iovmap-vmtest/debian-packages.sh"

BOOT_TIMEOUT=${QEMU_TEST_TIMEOUT:-300}
BUILD_TIMEOUT=${QEMU_TEST_BUILD_TIMEOUT:-5400}
APT_TIMEOUT=${QEMU_TEST_APT_TIMEOUT:-900}
KERNEL_SUITE=${QEMU_TEST_KERNEL_SUITE:-bookworm}
HUGE_MB=256 # the guest's RAM: blobtest.py's -m
T0=$(date +%s)

say() { echo "test.sh: $*" >&2; }
fail() { echo "test.sh: $*" >&2; echo "QEMU BLOB TEST: FAIL $*"; exit 1; }

W=$(mktemp -d "${TMPDIR:-/tmp}/qemu-blobtest.XXXXXX")
HUGE_DIR=$W/mnt-hugetlbfs # not $W/hugetlbfs: that is the hugetlbfs boot's scratch directory
HUGE_ADDED=0
NR_HUGE=/proc/sys/vm/nr_hugepages
CHILD=
cleanup() {
  local rc=$?
  if [ -n "$CHILD" ] && kill -0 "$CHILD" 2>/dev/null; then kill -TERM "$CHILD" 2>/dev/null || true; wait "$CHILD" 2>/dev/null || true; fi
  if mountpoint -q "$HUGE_DIR" 2>/dev/null; then umount "$HUGE_DIR" || say "cannot unmount $HUGE_DIR"; fi
  if [ "$HUGE_ADDED" -gt 0 ]; then
    echo $(( $(cat "$NR_HUGE") - HUGE_ADDED )) >"$NR_HUGE" || say "cannot give back $HUGE_ADDED huge pages"
  fi
  if [ "${QEMU_TEST_KEEP:-0}" = 1 ]; then say "kept $W"; else rm -rf "$W"; fi
  exit $rc
}
trap cleanup EXIT
trap 'echo "test.sh: interrupted" >&2; exit 130' INT TERM
# Long steps run in the background and are waited for, so that a signal reaches the trap
# at once (bash defers traps while a foreground child runs); the trap ends them.
in_bg() { "$@" & CHILD=$!; local rc=0; wait "$CHILD" || rc=$?; CHILD=; return $rc; }

[ "$(uname -m)" = x86_64 ] || fail "the guest and pattern.c's static build are x86_64: run on x86_64"
[ "$(id -u)" = 0 ] || fail "not root: the hugetlbfs case needs huge pages reserved and a hugetlbfs mount"

# ------------------------------------------------------------------ packages
need=()
# busybox-static unless /bin/busybox is static (the busybox package's is not).
file -L /bin/busybox 2>/dev/null | grep -q 'statically linked' || need+=(busybox-static)
command -v file >/dev/null || need+=(file)
command -v cpio >/dev/null || need+=(cpio)
command -v depmod >/dev/null || need+=(kmod)
command -v gcc >/dev/null || need+=(gcc)
[ -f /usr/lib/x86_64-linux-gnu/libc.a ] || need+=(libc6-dev)
command -v python3 >/dev/null || need+=(python3)
[ -f /usr/share/seabios/bios-256k.bin ] || need+=(seabios)
[ -f /usr/share/qemu/linuxboot_dma.bin ] || need+=(qemu-system-data)  # option ROMs for -kernel
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  in_bg timeout -k 10 "$APT_TIMEOUT" apt-get update -qq || fail "apt-get update failed or timed out"
  in_bg timeout -k 10 "$APT_TIMEOUT" apt-get install -y -qq --no-install-recommends "${need[@]}" >&2 \
    || fail "apt-get install ${need[*]} failed or timed out"
fi
file -L /bin/busybox | grep -q 'statically linked' || fail "/bin/busybox is not static (install busybox-static)"

# ------------------------------------------------------------------ QEMU builds
T_BUILD=$(date +%s)
in_bg timeout -k 10 "$BUILD_TIMEOUT" bash "$HERE/build.sh" >"$W/build.out" \
  || fail "build.sh failed or timed out (${BUILD_TIMEOUT}s): see its messages above"
BUILD_S=$(( $(date +%s) - T_BUILD ))
PATCHED=$(tail -n 1 "$W/build.out")
STOCK=$(sed -n 's/^stock //p' "$W/build.out")
LIBIOVMAP=$(sed -n 's/^lib //p' "$W/build.out")
[ -x "$PATCHED" ] && [ -x "$STOCK" ] && [ -d "$LIBIOVMAP" ] \
  || fail "build.sh printed no usable binaries: $(tr '\n' ' ' <"$W/build.out")"
# The patched QEMU is cached while libiovmap's ABI holds; the library it runs on is this
# clone's, which must be the one the dynamic linker picks.
ABI=$(cat "$ROOT/crates/iovmap-capi/abi-version")
RESOLVED=$(LD_LIBRARY_PATH=$LIBIOVMAP ldd "$PATCHED" | sed -n "s/^[[:space:]]*libiovmap\.so\.$ABI => \([^ ]*\) .*/\1/p")
[ "$RESOLVED" = "$LIBIOVMAP/libiovmap.so.$ABI" ] \
  || fail "the patched QEMU would load libiovmap from '${RESOLVED:-nowhere}', not $LIBIOVMAP"
say "libiovmap: $RESOLVED"
export LD_LIBRARY_PATH=$LIBIOVMAP${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
say "patched: $PATCHED"
say "stock:   $STOCK"

# ------------------------------------------------------------------ guest
deb_kernel "$KERNEL_SUITE" amd64 amd64 || fail "cannot fetch the $KERNEL_SUITE amd64 kernel"
KREL=$DEB_KERNEL_RELEASE
say "guest kernel $KREL ($DEB_KERNEL_IMAGE)"
KBASE=${DEB_KERNEL_MODULES%/lib/modules/*}
case $KBASE in "$DEB_KERNEL_MODULES") KBASE=${DEB_KERNEL_MODULES%/usr/lib/modules/*} ;; esac
# Debian's packages ship no modules.dep (postinst makes it): make it in the cache's tree.
[ -s "$DEB_KERNEL_MODULES/modules.dep" ] || depmod -b "$KBASE" "$KREL" || fail "depmod -b $KBASE $KREL failed"

R=$W/rootfs
mkdir -p "$R"/{bin,dev,proc,sys,lib/modules}
cp /bin/busybox "$R/bin/busybox"
for applet in $("$R/bin/busybox" --list); do
  [ "$applet" = busybox ] || ln -sf busybox "$R/bin/$applet"
done
gcc -std=c11 -O2 -Wall -Wextra -Werror -static -o "$W/pattern" "$HERE/pattern.c" \
  || fail "cannot build pattern.c (static: needs libc6-dev)"
cp "$W/pattern" "$R/bin/pattern"

# virtio-pci and the virtio-gpu DRM driver with what they depend on, in load order.
: >"$R/lib/modules/order"
for m in virtio_pci virtio_gpu; do
  deps=$(modprobe -d "$KBASE" -S "$KREL" --show-depends "$m") || fail "modprobe cannot resolve $m for $KREL"
  while read -r kind path _; do
    [ "$kind" = insmod ] || continue
    name=$(basename "$path"); name=${name%%.ko*}
    grep -qx "$name" "$R/lib/modules/order" && continue
    case $path in
      *.ko.xz) xz -dc "$path" >"$R/lib/modules/$name.ko" ;;
      *.ko.zst) zstd -qdc "$path" >"$R/lib/modules/$name.ko" ;;
      *.ko.gz) gzip -dc "$path" >"$R/lib/modules/$name.ko" ;;
      *) cp "$path" "$R/lib/modules/$name.ko" ;;
    esac
    echo "$name" >>"$R/lib/modules/order"
  done <<<"$deps"
done
grep -qxE "virtio[-_]gpu" "$R/lib/modules/order" || fail "virtio_gpu is not a module of $KREL (CONFIG_DRM_VIRTIO_GPU=m expected)"
say "modules: $(tr '\n' ' ' <"$R/lib/modules/order")"

cat >"$R/init" <<'INIT'
#!/bin/sh
# test.sh's guest: load virtio-gpu, draw frame 1 and 2 into /dev/fb0 when the host says
# so, power off. Lines for the host start with BLOBTEST:.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# blobtest.fragment=N (figures only): fill N pages of tmpfs and free every other one, so
# that the framebuffer the driver allocates next is made of scattered pages.
n=$(sed -n 's/.*blobtest\.fragment=\([0-9]*\).*/\1/p' /proc/cmdline)
if [ -n "$n" ]; then
  mkdir -p /frag && mount -t tmpfs -o size=90% tmpfs /frag
  i=0; while [ $i -lt $n ]; do echo x >/frag/$i; i=$((i + 1)); done
  rm -f /frag/*[13579]
  echo "BLOBTEST: fragmented: $n pages filled, every other one freed"
fi
for m in $(cat /lib/modules/order); do
  insmod /lib/modules/$m.ko || echo "BLOBTEST: FAIL insmod $m"
done
i=0
while [ ! -e /dev/fb0 ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
[ -e /dev/fb0 ] || { echo "BLOBTEST: FAIL no /dev/fb0 after 30 s"; poweroff -f; }
# fbcon would draw its cursor and text over the picture: unbind it from the framebuffer.
for v in /sys/class/vtconsole/vtcon*; do
  grep -q "frame buffer" $v/name 2>/dev/null && echo 0 >$v/bind
done
echo "BLOBTEST: fb0 $(cat /sys/class/graphics/fb0/name), $(cat /sys/class/graphics/fb0/virtual_size), $(cat /sys/class/graphics/fb0/bits_per_pixel) bpp"
for frame in 1 2; do
  if pattern draw $frame; then
    echo "BLOBTEST: DRAWN $frame"
  else
    echo "BLOBTEST: FAIL pattern draw $frame"
  fi
  read -r reply </dev/ttyS0
done
echo "BLOBTEST: DONE"
poweroff -f
INIT
chmod +x "$R/init"
# Uncompressed: the kernel unpacks it without decompressing (slow under TCG).
(cd "$R" && find . | cpio -o -H newc --quiet >"$W/initramfs.cpio") || fail "cpio failed"

# ------------------------------------------------------------------ hugetlbfs
# The guest's 256 MiB in 2 MiB pages, on top of those already free (other tests use theirs).
want=$(( HUGE_MB / 2 ))
free_pages=$(awk '/^HugePages_Free:/ {print $2}' /proc/meminfo)
if [ "$free_pages" -lt "$want" ]; then
  before=$(cat "$NR_HUGE")
  echo $(( before + want - free_pages )) >"$NR_HUGE" || true
  HUGE_ADDED=$(( $(cat "$NR_HUGE") - before ))
  free_pages=$(awk '/^HugePages_Free:/ {print $2}' /proc/meminfo)
  [ "$free_pages" -ge "$want" ] || fail "only $free_pages free 2 MiB huge pages after asking for $want (memory too fragmented?)"
fi
mkdir -p "$HUGE_DIR"
mount -t hugetlbfs -o pagesize=2M none "$HUGE_DIR" || fail "cannot mount hugetlbfs on $HUGE_DIR"
[ "$(stat -f -c %T "$HUGE_DIR")" = hugetlbfs ] || fail "$HUGE_DIR is not a hugetlbfs mount"

# ------------------------------------------------------------------ the boots
# boot NAME QEMU RAM [blobtest args]: one blobtest.py run; its JSON in $W/NAME.json.
boot() {
  local name=$1 qemu=$2 ram=$3
  shift 3
  say "boot: $name"
  in_bg timeout -k 10 $(( BOOT_TIMEOUT + 30 )) python3 "$HERE/blobtest.py" --qemu "$qemu" \
    --kernel "$DEB_KERNEL_IMAGE" --initrd "$W/initramfs.cpio" --pattern "$W/pattern" \
    --workdir "$W/$name" --ram "$ram" --timeout "$BOOT_TIMEOUT" "$@" >"$W/$name.json" || true
  [ -s "$W/$name.json" ] || echo '{"ok": false, "why": "blobtest.py printed nothing (timed out?)"}' >"$W/$name.json"
  if ! json "$name" ok | grep -qx True; then
    say "$name failed; its serial console and QEMU's messages:"
    # serial.log, or src-serial.log and dst-serial.log for a migration; likewise stderr.
    for f in "$W/$name"/*serial.log; do
      [ -f "$f" ] || continue
      t=$(basename "$f" serial.log)
      tail -n 30 "$f" | tr -d '\r' | sed "s/^/  [$name ${t}serial] /" >&2 || true
    done
    for f in "$W/$name"/*qemu.stderr; do
      [ -f "$f" ] && sed "s/^/  [$name $(basename "$f" .stderr)] /" "$f" >&2
    done
  fi
}
# json NAME KEY: a field of $W/NAME.json.
json() { python3 -c 'import json, sys; print(json.load(open(sys.argv[1])).get(sys.argv[2], ""))' "$W/$1.json" "$2"; }

boot memfd "$PATCHED" memfd
boot hugetlbfs "$PATCHED" "hugetlbfs:$HUGE_DIR"
boot stock "$STOCK" memfd --expect refused
# Postcopy: frame 1 drawn on a source, the switch made before the framebuffer's pages
# are sent, the destination maps the blob while they are still on the source.
boot postcopy "$PATCHED" memfd --migrate postcopy

# ------------------------------------------------------------------ verdict
problems=()
if [ "$(json memfd ok)" = True ]; then
  if [ "$(json memfd path)" != view ]; then
    problems+=("memfd: served by the copy fallback, not an iovmap view ($(json memfd reason))")
  elif [ "$(( $(json memfd cloned) + $(json memfd fd_mapped) ))" -ne "$(json memfd runs)" ]; then
    problems+=("memfd: runs $(json memfd runs) != cloned $(json memfd cloned) + fd-mapped $(json memfd fd_mapped)")
  else
    echo "memfd: $(json memfd iovecs) iovecs, $(json memfd runs) runs, pixels match"
  fi
else
  problems+=("memfd: $(json memfd why)")
fi
if [ "$(json hugetlbfs ok)" = True ]; then
  case $(json hugetlbfs path) in
    view) how="view: $(json hugetlbfs runs) runs, $(json hugetlbfs cloned) cloned, $(json hugetlbfs fd_mapped) fd-mapped" ;;
    # iovmap's reason up to its first colon ("segment 0 meets its neighbour off a page
    # boundary"); the whole message goes to stderr.
    *) reason=$(json hugetlbfs reason); how="copy: ${reason%%: *}"; say "hugetlbfs: iovmap: $reason" ;;
  esac
  if [ -z "$(json hugetlbfs iovecs)" ]; then
    problems+=("hugetlbfs: no iovec count in the trace")
  else
    echo "hugetlbfs: $(json hugetlbfs iovecs) iovecs, $how, pixels match"
  fi
else
  problems+=("hugetlbfs: $(json hugetlbfs why)")
fi
if [ "$(json postcopy ok)" = True ]; then
  late=$(json postcopy late)
  if [ "$(json postcopy path)" != view ]; then
    problems+=("postcopy: the destination's blob was not an iovmap view ($(json postcopy reason))")
  elif ! [ "${late:-0}" -gt 0 ] 2>/dev/null; then
    # Every page had arrived before the view was made: nothing was tested.
    problems+=("postcopy: no page of the blob was still on the source when its view was made (late=${late:-?})")
  else
    echo "postcopy: $late of the blob's pages arrived after its view was needed, pixels match"
  fi
else
  problems+=("postcopy: $(json postcopy why)")
fi
if [ "$(json stock ok)" = True ]; then
  echo "stock QEMU: refused ($(json stock refused))"
else
  problems+=("stock QEMU: $(json stock why)")
fi

for n in memfd hugetlbfs postcopy; do
  [ "$(json $n ok)" = True ] || continue
  case $(json $n path) in
    view) served="map time $(json $n ns) ns" ;;
    *) served="copied ($(json $n size) bytes)" ;;
  esac
  say "$n: $(json $n frames | tr -d "[]'"); guest run $(json $n secs) s; $served"
done
# docs/qemu.md's figures: the map time of the fbdev blob at other display sizes and guest
# memory fragmentation (memfd). Each entry is WxH or WxH/PAGES (blobtest.fragment=PAGES).
for fig in ${QEMU_TEST_FIGURES:-}; do
  size=${fig%%/*} frag=
  case $fig in */*) frag=${fig#*/} ;; esac
  name=figure-$size-${frag:-0}
  boot "$name" "$PATCHED" memfd --size "$size" ${frag:+--fragment "$frag"}
  say "figure: $size, fragment ${frag:-0}: $(json "$name" iovecs) iovecs, $(json "$name" runs) runs," \
    "$(json "$name" cloned) cloned, map $(json "$name" ns) ns, pixels ok: $(json "$name" ok)"
done
say "timings: build.sh ${BUILD_S} s, test.sh total $(( $(date +%s) - T0 )) s"
if [ ${#problems[@]} -eq 0 ]; then
  echo "QEMU BLOB TEST: PASS"
  exit 0
fi
printf 'test.sh: %s\n' "${problems[@]}" >&2
echo "QEMU BLOB TEST: FAIL ${problems[*]}"
exit 1
