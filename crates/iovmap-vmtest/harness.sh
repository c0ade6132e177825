# The guest VM harness: everything matrix.sh (and so run.sh, one row of it) does to put
# a Debian kernel under QEMU with a vfio-pci device and judge what the guest printed.
# Sourced, not run. The caller sets -euo pipefail, HERE (this directory), ROOT (the
# clone), W (its scratch directory under target/) and sources debian-packages.sh first.
#
# A function that fails sets VM_WHY to why and returns 1.
#
#   vm_row ROW            -> ROW_ARCH ROW_SUITE ROW_FLAVOUR ROW_TRIPLE ROW_QEMU ROW_VFIO
#   vm_host_tools ARCH... -> installs what the rows of these arches need (apt, rustup);
#                            sets VM_TOOLS_MISSING_<arch> to why an arch cannot run
#   vm_build ARCH         -> builds the guest programs and the suite static for ARCH;
#                            writes $W/build-ARCH/{bins,suite} (paths, one a line)
#   vm_kernel ROW         -> deb_kernel + VM_KERNEL_BOOT (the image QEMU boots)
#   vm_initramfs ROW DIR  -> DIR/initramfs.cpio: busybox, the row's modules, the binaries, /init
#   vm_boot ROW DIR       -> boots it; DIR/serial.log, DIR/qemu.rc, DIR/qemu.ms
#   vm_verdict ROW DIR    -> VM_PROBLEMS (array), VM_FACTS (one line), VM_KREL, VM_PAGE
#
# Knobs (environment), shared by matrix.sh and run.sh: VMTEST_QEMU_TIMEOUT (s per guest,
# 900), VMTEST_BUILD_TIMEOUT (s, 1500), VMTEST_APT_TIMEOUT (s, 900), VMTEST_STRESS_SECS
# (per stress scenario, 3), VMTEST_THREADS (stress loop threads, 4), VMTEST_SMP (vCPUs per
# guest, 2), VMTEST_MEM (guest RAM, 768M), VMTEST_SUITE=0 (no test suite in the guest),
# VMTEST_SUITE_ONLY="races leaks" (only these test binaries), VMTEST_SUITE_PKGS (the
# crates whose test binaries run in the guest: "iovmap iovmap-testkit iovmap-vmtest
# iovmap-fuzz-targets"), VMTEST_KEEP=1 (keep the backing files), VMTEST_BOOT=bzimage
# (x86_64: boot the bzImage instead of the extracted ELF vmlinux), VMTEST_MAX_MAP_COUNT
# (the guest's vm.max_map_count while the suite runs, 16384: leaks.rs needs more than
# iovmap's counting slack of 8,192 + 1,000).

VM_QEMU_TIMEOUT=${VMTEST_QEMU_TIMEOUT:-900}
VM_BUILD_TIMEOUT=${VMTEST_BUILD_TIMEOUT:-1500}
VM_APT_TIMEOUT=${VMTEST_APT_TIMEOUT:-900}
VM_STRESS_SECS=${VMTEST_STRESS_SECS:-3}
VM_THREADS=${VMTEST_THREADS:-4}
VM_SMP=${VMTEST_SMP:-2}
VM_MEM=${VMTEST_MEM:-768M}
VM_SUITE=${VMTEST_SUITE:-1}
VM_SUITE_ONLY=${VMTEST_SUITE_ONLY:-}
VM_SUITE_PKGS=${VMTEST_SUITE_PKGS:-iovmap iovmap-testkit iovmap-vmtest iovmap-fuzz-targets}
# The suite's VMA-cap tests fill the address space up to vm.max_map_count (they read the
# limit); at Linux's default 65530 that takes minutes under TCG, where every lookup on a
# kernel without PROCMAP_QUERY reads all of /proc/self/maps. The guest lowers the limit.
VM_MAX_MAP_COUNT=${VMTEST_MAX_MAP_COUNT:-16384}
VM_BAR_SIZE=32M # layout::BAR_SIZE
# bench.sh's: build the benchmark programs too (1), and what the guest runs instead of the
# tests: interleaved's commands, `+` between commands and `,` between arguments
# ("large,7+crossover,11"), or `demo`.
VM_BENCH_BINS=${VM_BENCH_BINS:-0}
VM_BENCH=${VM_BENCH:-}
# busybox for the initramfs comes from this suite, for either arch (nothing installed).
VM_BUSYBOX_SUITE=sid

vm_say() { echo "harness: $*" >&2; }

# ------------------------------------------------------------------------------ rows
# ROW is <arch>-<kernel line>. The kernel line names a Debian suite; the flavour is
# Debian's linux-image-<flavour>.
vm_row() {
  ROW_VFIO=required
  case $1 in
    x86_64-5.10) ROW_ARCH=x86_64 ROW_SUITE=bullseye ROW_FLAVOUR=amd64 ;;
    x86_64-6.1) ROW_ARCH=x86_64 ROW_SUITE=bookworm ROW_FLAVOUR=amd64 ;;
    x86_64-6.12) ROW_ARCH=x86_64 ROW_SUITE=trixie ROW_FLAVOUR=amd64 ;;
    x86_64-sid) ROW_ARCH=x86_64 ROW_SUITE=sid ROW_FLAVOUR=amd64 ;;
    arm64-4k) ROW_ARCH=arm64 ROW_SUITE=sid ROW_FLAVOUR=arm64 ;;
    arm64-16k) ROW_ARCH=arm64 ROW_SUITE=sid ROW_FLAVOUR=arm64-16k ;;
    *) VM_WHY="unknown row $1"; return 1 ;;
  esac
  ROW_TRIPLE=$(vm_triple "$ROW_ARCH")
  case $ROW_ARCH in
    x86_64) ROW_QEMU=qemu-system-x86_64 ROW_DEBARCH=amd64 ;;
    arm64) ROW_QEMU=qemu-system-aarch64 ROW_DEBARCH=arm64 ;;
  esac
}

vm_triple() { case $1 in x86_64) echo x86_64-unknown-linux-gnu ;; arm64) echo aarch64-unknown-linux-gnu ;; esac; }

# ------------------------------------------------------------------------ host tools
# apt waits for another apt (other builds share the machine) rather than failing.
vm_apt_install() {
  [ "$(id -u)" = 0 ] || { VM_WHY="missing $* and not root (apt-get install $*)"; return 1; }
  vm_say "installing $*"
  export DEBIAN_FRONTEND=noninteractive
  if [ ! -e "$W/apt-updated" ]; then
    timeout -k 10 "$VM_APT_TIMEOUT" apt-get -o DPkg::Lock::Timeout=600 update -qq >"$W/apt.log" 2>&1 \
      || { VM_WHY="apt-get update failed or timed out: $(tail -2 "$W/apt.log" | tr '\n' ' ')"; return 1; }
    touch "$W/apt-updated"
  fi
  timeout -k 10 "$VM_APT_TIMEOUT" apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "$@" \
    >>"$W/apt.log" 2>&1 || { VM_WHY="apt-get install $* failed or timed out: $(tail -2 "$W/apt.log" | tr '\n' ' ')"; return 1; }
}

vm_host_tools() {
  local need=() arch why
  command -v cpio >/dev/null || need+=(cpio)
  command -v modinfo >/dev/null || need+=(kmod)
  command -v xz >/dev/null || need+=(xz-utils)
  command -v zstd >/dev/null || need+=(zstd)
  command -v readelf >/dev/null || need+=(binutils)
  command -v file >/dev/null || need+=(file)
  command -v cc >/dev/null || need+=(gcc)
  [ -f /usr/lib/x86_64-linux-gnu/libc.a ] || need+=(libc6-dev)
  for arch in "$@"; do
    case $arch in
      x86_64) command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86) ;;
      arm64)
        command -v qemu-system-aarch64 >/dev/null || need+=(qemu-system-arm)
        command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu)
        [ -f /usr/aarch64-linux-gnu/lib/libc.a ] || need+=(libc6-dev-arm64-cross)
        ;;
    esac
  done
  if [ ${#need[@]} -gt 0 ]; then
    vm_apt_install "${need[@]}" || vm_say "$VM_WHY"
  fi
  for arch in "$@"; do
    why=
    case $arch in
      x86_64) command -v qemu-system-x86_64 >/dev/null || why="no qemu-system-x86_64 (apt-get install qemu-system-x86)" ;;
      arm64)
        command -v qemu-system-aarch64 >/dev/null || why="no qemu-system-aarch64 (apt-get install qemu-system-arm)"
        command -v aarch64-linux-gnu-gcc >/dev/null || why="no aarch64-linux-gnu-gcc (apt-get install gcc-aarch64-linux-gnu)"
        [ -f /usr/aarch64-linux-gnu/lib/libc.a ] || why="no arm64 libc.a (apt-get install libc6-dev-arm64-cross)"
        if [ -z "$why" ] && ! rustup target list --installed 2>/dev/null | grep -qx aarch64-unknown-linux-gnu; then
          vm_say "rustup target add aarch64-unknown-linux-gnu"
          timeout -k 10 600 rustup target add aarch64-unknown-linux-gnu >"$W/rustup.log" 2>&1 \
            || why="rustup target add aarch64-unknown-linux-gnu failed: $(tail -1 "$W/rustup.log")"
        fi
        ;;
    esac
    for t in cpio modinfo xz zstd readelf file cc; do
      command -v $t >/dev/null || why="no $t on the host (apt-get install ${need[*]})"
    done
    printf -v "VM_TOOLS_MISSING_$arch" '%s' "$why"
  done
}

# --------------------------------------------------------------------------- build
# Static binaries (crt-static against glibc's libc.a), so the initramfs needs no libc.
# With --target, RUSTFLAGS reach only the target's crates and the artifacts go to
# target/<triple>/: the host build's cache is left alone.
vm_build() {
  local arch=$1 triple out json b kind
  triple=$(vm_triple "$arch")
  out=$W/build-$arch
  mkdir -p "$out"
  local env=(RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static")
  if [ "$arch" = arm64 ]; then
    env+=(CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
      CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar)
  fi
  vm_say "building the guest programs for $triple"
  env "${env[@]}" timeout -k 10 "$VM_BUILD_TIMEOUT" nice cargo build -q --manifest-path "$ROOT/Cargo.toml" --release \
    -p iovmap-vmtest --bin iovmap-vmtest --example vfio_passthrough --target "$triple" \
    || { VM_WHY="cargo build of the guest programs for $triple failed or timed out (${VM_BUILD_TIMEOUT}s)"; return 1; }
  local tdir=${CARGO_TARGET_DIR:-$ROOT/target}
  case $tdir in /*) ;; *) tdir=$ROOT/$tdir ;; esac
  printf '%s\n' "$tdir/$triple/release/iovmap-vmtest" "$tdir/$triple/release/examples/vfio_passthrough" >"$out/bins"
  if [ "$VM_BENCH_BINS" = 1 ]; then
    vm_say "building the benchmark programs for $triple (interleaved, iovmap-demo)"
    env "${env[@]}" timeout -k 10 "$VM_BUILD_TIMEOUT" nice cargo build -q --manifest-path "$ROOT/Cargo.toml" --release \
      -p iovmap-benches -p iovmap-demo --bin interleaved --bin iovmap-demo --target "$triple" \
      || { VM_WHY="cargo build of the benchmark programs for $triple failed or timed out"; return 1; }
    printf '%s\n' "$tdir/$triple/release/interleaved" "$tdir/$triple/release/iovmap-demo" >>"$out/bins"
  fi
  : >"$out/suite"
  if [ "$VM_SUITE" = 1 ]; then
    local pkgs=() p
    for p in $VM_SUITE_PKGS; do pkgs+=(-p "$p"); done
    vm_say "building the test suite for $triple: $VM_SUITE_PKGS"
    json=$out/suite-build.json
    env "${env[@]}" timeout -k 10 "$VM_BUILD_TIMEOUT" nice cargo test -q --manifest-path "$ROOT/Cargo.toml" --release \
      "${pkgs[@]}" --no-run --target "$triple" --message-format=json >"$json" \
      || { VM_WHY="cargo test --no-run for $triple failed or timed out (${VM_BUILD_TIMEOUT}s)"; return 1; }
    # "<name>\t<path>" per test binary, named after its target (`views`, the crate's lib
    # `iovmap_testkit`, a bin's tests `iovmap-vmtest-bin`): two binaries never share a name.
    grep '"profile":{[^}]*"test":true' "$json" \
      | sed -n 's/.*"target":{"kind":\["\([^"]*\)"\][^}]*"name":"\([^"]*\)".*"executable":"\([^"]*\)".*/\2\t\1\t\3/p' \
      | awk -F'\t' '{ n = $1; if ($2 == "bin") n = n "-bin"; print n "\t" $3 }' | sort -u >"$out/suite.all"
    [ "$(cut -f1 "$out/suite.all" | sort | uniq -d | wc -l)" = 0 ] \
      || { VM_WHY="two test binaries share a name: $(cut -f1 "$out/suite.all" | sort | uniq -d | tr '\n' ' ')"; return 1; }
    if [ -n "$VM_SUITE_ONLY" ]; then
      while IFS=$'\t' read -r m b; do
        case " $VM_SUITE_ONLY " in *" $m "*) printf '%s\t%s\n' "$m" "$b" ;; esac
      done <"$out/suite.all" >"$out/suite"
      [ -s "$out/suite" ] || { VM_WHY="VMTEST_SUITE_ONLY='$VM_SUITE_ONLY' names none of the test binaries"; return 1; }
    else
      cp "$out/suite.all" "$out/suite"
    fi
    [ "$(wc -l <"$out/suite")" -ge 5 ] || [ -n "$VM_SUITE_ONLY" ] \
      || { VM_WHY="expected 5+ test binaries for $triple, found $(wc -l <"$out/suite")"; return 1; }
  fi
  while IFS= read -r b; do
    kind=$(file -L "$b")
    case $kind in
      *"statically linked"* | *"static-pie linked"*) ;;
      *) VM_WHY="$b is not statically linked: $kind"; return 1 ;;
    esac
  done < <(cat "$out/bins"; cut -f2 "$out/suite")
}

# -------------------------------------------------------------------------- kernel
vm_kernel() {
  vm_row "$1" || return 1
  deb_kernel "$ROW_SUITE" "$ROW_DEBARCH" "$ROW_FLAVOUR" >&2 || { VM_WHY="cannot fetch linux-image-$ROW_FLAVOUR ($ROW_DEBARCH) of $ROW_SUITE"; return 1; }
  [ -n "$DEB_KERNEL_MODULES" ] || { VM_WHY="no modules directory in $DEB_KERNEL_DIR"; return 1; }
  VM_KERNEL_BOOT=$DEB_KERNEL_IMAGE
  case $ROW_ARCH in
    x86_64) [ "${VMTEST_BOOT:-pvh}" = pvh ] && vm_pvh_vmlinux ;;
    arm64)
      # QEMU boots an arm64 Image; Debian's vmlinuz is one, gzipped up to 6.x.
      if [ "$(head -c 2 "$DEB_KERNEL_IMAGE" | od -An -tx1 | tr -d ' ')" = 1f8b ]; then
        [ -s "$DEB_KERNEL_DIR/Image" ] || gzip -dc "$DEB_KERNEL_IMAGE" >"$DEB_KERNEL_DIR/Image"
        VM_KERNEL_BOOT=$DEB_KERNEL_DIR/Image
      fi
      ;;
  esac
  return 0
}

# The bzImage's payload is a compressed ELF vmlinux; booting that ELF through its PVH
# entry note skips the in-guest decompression, which is slow under TCG. The payload is
# found by its compression magic (bash strings cannot hold NUL bytes, so the magics are
# NUL-free prefixes), decompressed once into the kernel's cache directory.
vm_pvh_vmlinux() {
  local vmlinux=$DEB_KERNEL_DIR/vmlinux fmt tool magic off
  if [ ! -s "$vmlinux" ]; then
    for fmt in "xz:$(printf '\3757zXZ')" "zstd:$(printf '\050\265\057\375')" "gzip:$(printf '\037\213\010')"; do
      tool=${fmt%%:*} magic=${fmt#*:}
      command -v "$tool" >/dev/null || continue
      for off in $(LC_ALL=C grep -aboF -- "$magic" "$DEB_KERNEL_IMAGE" | head -3 | cut -d: -f1); do
        tail -c +$((off + 1)) "$DEB_KERNEL_IMAGE" | "$tool" -dc >"$vmlinux.tmp.$$" 2>/dev/null || true
        if [ "$(head -c 4 "$vmlinux.tmp.$$" | od -An -c | tr -d ' ')" = 177ELF ]; then
          mv "$vmlinux.tmp.$$" "$vmlinux"
          break 2
        fi
      done
    done
    rm -f "$vmlinux.tmp.$$"
  fi
  # XEN_ELFNOTE_PHYS32_ENTRY (0x12) is the PVH entry point QEMU boots.
  if [ -s "$vmlinux" ] && readelf -n "$vmlinux" 2>/dev/null | grep -q '0x00000012'; then
    VM_KERNEL_BOOT=$vmlinux
  else
    vm_say "no PVH entry in the extracted vmlinux of $DEB_KERNEL_RELEASE: booting the bzImage (slower)"
  fi
}

# ----------------------------------------------------------------------- initramfs
# Modules in dependency order, depth first (modinfo -F depends on the module files: the
# packages ship no modules.dep), skipping built-in ones.
vm_add_module() {
  local name=$1 f dep
  name=${name//-/_}
  case " ${VM_MOD_ORDER[*]-} " in *" $name "*) return 0 ;; esac
  grep -q "/${name//_/[-_]}\.ko" "$DEB_KERNEL_MODULES/modules.builtin" 2>/dev/null && return 0
  f=$(grep -m1 "/${name//_/[-_]}\.ko" "$VM_MOD_INDEX") || return 1
  for dep in $(modinfo -F depends "$f" 2>/dev/null | tr ',' ' '); do vm_add_module "$dep" || return 1; done
  VM_MOD_ORDER+=("$name")
  VM_MOD_FILE[$name]=$f
}

# vm_modules DIR ROOTFS: the vfio modules (and udmabuf where it is a module) of the
# kernel vm_kernel fetched, unpacked into ROOTFS/lib/modules, their load order in
# ROOTFS/lib/modules/order. vfio's type1 IOMMU backend is a softdep (modinfo -F depends
# does not list it); udmabuf is loaded where it is a module, so that the fact says what
# the kernel has.
vm_modules() {
  local dir=$1 r=$2 m f
  mkdir -p "$r/lib/modules"
  VM_MOD_INDEX=$dir/modules.index
  find "$DEB_KERNEL_MODULES/kernel" -name '*.ko*' >"$VM_MOD_INDEX"
  VM_MOD_ORDER=()
  declare -gA VM_MOD_FILE=()
  for m in vfio vfio_iommu_type1 vfio-pci; do vm_add_module "$m" || { VM_WHY="no module $m for $DEB_KERNEL_RELEASE"; return 1; }; done
  vm_add_module udmabuf || true
  : >"$r/lib/modules/order"
  for m in "${VM_MOD_ORDER[@]}"; do
    f=${VM_MOD_FILE[$m]}
    case $f in
      *.ko.xz) xz -dc "$f" >"$r/lib/modules/$m.ko" ;;
      *.ko.zst) zstd -qdc "$f" >"$r/lib/modules/$m.ko" ;;
      *.ko.gz) gzip -dc "$f" >"$r/lib/modules/$m.ko" ;;
      *) cp "$f" "$r/lib/modules/$m.ko" ;;
    esac || { VM_WHY="cannot unpack module $f"; return 1; }
    echo "$m" >>"$r/lib/modules/order"
  done
}

# vm_busybox DEBARCH ROOTFS: Debian's static busybox for DEBARCH (amd64, arm64), fetched
# and unpacked into the cache once, copied to ROOTFS/bin/busybox.
vm_busybox() {
  local arch=$1 r=$2 deb f
  deb=$(deb_fetch "$VM_BUSYBOX_SUITE" busybox-static "$arch") || { VM_WHY="cannot fetch busybox-static ($arch)"; return 1; }
  deb_unpack "$deb" "$IOVMAP_CACHE/busybox-$arch" || { VM_WHY="cannot unpack $deb"; return 1; }
  # /bin/busybox, or /usr/bin/busybox in a merged-/usr package.
  f=$(find "$IOVMAP_CACHE/busybox-$arch" -type f -path '*bin/busybox' | head -1)
  [ -n "$f" ] && cp "$f" "$r/bin/busybox" || { VM_WHY="no bin/busybox in $deb"; return 1; }
}

vm_initramfs() {
  local row=$1 dir=$2 r m f bins suite
  vm_row "$row"
  r=$dir/rootfs
  rm -rf "$r"
  mkdir -p "$r"/{bin,dev,proc,sys,tmp,lib/modules,suite}
  vm_busybox "$ROW_DEBARCH" "$r" || return 1
  # The applet list of a foreign-arch busybox cannot be asked for: link the ones /init uses.
  for m in sh cat cut echo ls mount mkdir poweroff readlink basename sed sync uname find tr insmod sleep grep head; do
    ln -sf busybox "$r/bin/$m"
  done
  ln -s bin "$r/sbin"
  # Each copy checked: a function called in an `||` list runs without set -e.
  bins=$W/build-$ROW_ARCH/bins suite=$W/build-$ROW_ARCH/suite
  while IFS= read -r f; do
    cp "$f" "$r/bin/$(basename "$f")" || { VM_WHY="cannot copy the guest program $f"; return 1; }
  done <"$bins"
  while IFS=$'\t' read -r m f; do
    cp "$f" "$r/suite/$m" || { VM_WHY="cannot copy test binary $f"; return 1; }
  done <"$suite"
  # The fuzz targets' replay tests read the corpora from $IOVMAP_FUZZ_DIR, which
  # guest-init.sh sets to /fuzz: the path of the build may not exist in the guest (a
  # clone under /tmp is hidden by the guest's tmpfs there).
  if grep -q '^replay' "$suite"; then
    mkdir -p "$r/fuzz"
    cp -r "$ROOT/fuzz/corpus" "$ROOT/fuzz/regressions" "$r/fuzz/" || { VM_WHY="cannot copy the fuzz corpora"; return 1; }
  fi

  vm_modules "$dir" "$r" || return 1
  cp "$HERE/guest-init.sh" "$r/init" && chmod +x "$r/init" || { VM_WHY="cannot install /init"; return 1; }
  # Uncompressed: the kernel unpacks it without decompressing (slow under TCG).
  (cd "$r" && find . | cpio -o -H newc --quiet >"$dir/initramfs.cpio") || { VM_WHY="cpio failed"; return 1; }
  vm_say "$row: initramfs $(($(stat -c %s "$dir/initramfs.cpio") >> 20)) MiB, modules $(tr '\n' ' ' <"$r/lib/modules/order")"
}

# ---------------------------------------------------------------------------- boot
vm_boot() {
  local row=$1 dir=$2 t0 rc=0 args
  vm_row "$row"
  rm -f "$dir/serial.log" "$dir/bar2.bin" "$dir/nvme.img"
  truncate -s "$VM_BAR_SIZE" "$dir/bar2.bin" && truncate -s 1M "$dir/nvme.img" || { VM_WHY="cannot create backing files in $dir"; return 1; }
  args="panic=-1 quiet vmtest.stress=$VM_STRESS_SECS vmtest.threads=$VM_THREADS vmtest.max_map_count=$VM_MAX_MAP_COUNT"
  [ -z "$VM_BENCH" ] || args="$args vmtest.bench=$VM_BENCH"
  # More of the guest's command line, for other /init scripts (integrations/qemu/nested.sh).
  [ -z "${VM_APPEND:-}" ] || args="$args $VM_APPEND"
  # x86_64 guests run their vCPUs on one host thread (thread=single): with one thread per
  # vCPU, the 7.2 guest once died of `Oops: int3` in __schedule while perf_event_open
  # enabled a static key (int3-based text patching racing the other vCPU under TCG).
  # With two guests at once, both cores are busy either way. arm64 patches text without
  # int3 and keeps a thread per vCPU.
  local tcg=thread=multi
  [ "$ROW_ARCH" = x86_64 ] && tcg=thread=single
  local q=("$ROW_QEMU" -nodefaults -accel "tcg,$tcg" -smp "$VM_SMP" -m "$VM_MEM"
    -display none -monitor none -serial "file:$dir/serial.log" -no-reboot
    -kernel "$VM_KERNEL_BOOT" -initrd "$dir/initramfs.cpio")
  case $ROW_ARCH in
    # q35 with an emulated VT-d (caching-mode=on, which vfio needs): Debian's kernels have
    # no vfio no-IOMMU mode, and vfio-ioctls wants a type1 container.
    # no_timer_check: at boot check_timer() wants 5 timer ticks within 160M TSC cycles
    # (~62 ms of host time under TCG); a vCPU the host deschedules then misses ticks, and
    # with interrupt remapping on (intel_iommu=on) the kernel panics ("timer doesn't work
    # through Interrupt-remapped IO-APIC"). Kernels skip the check on KVM themselves.
    x86_64) q+=(-machine q35 -cpu max -append "console=ttyS0 intel_iommu=on no_timer_check $args" -device intel-iommu,caching-mode=on) ;;
    # virt with an emulated SMMUv3 in front of its PCIe host bridge, and GICv3 with its
    # ITS: vfio's type1 backend refuses (EPERM) to attach a group whose MSIs are not
    # isolated, which the default GICv2 cannot do. pauth-impdef: the architected
    # pointer-authentication algorithm is slow to emulate and nothing here needs it.
    arm64) q+=(-machine virt,iommu=smmuv3,gic-version=3 -cpu max,pauth-impdef=on -append "console=ttyAMA0 $args") ;;
  esac
  q+=(-object "memory-backend-file,id=bar2,share=on,mem-path=$dir/bar2.bin,size=$VM_BAR_SIZE"
    -device ivshmem-plain,memdev=bar2
    -drive "file=$dir/nvme.img,if=none,id=nv,format=raw" -device nvme,drive=nv,serial=iovmap-vmtest)
  echo "${q[*]}" >"$dir/qemu.cmd"
  t0=$(date +%s%N)
  # In the background and waited for, so that a signal reaches the caller's trap at once
  # (bash defers traps while a foreground child runs); the trap kills $VM_CHILD.
  timeout -k 5 "$VM_QEMU_TIMEOUT" "${q[@]}" </dev/null >"$dir/qemu.out" 2>&1 &
  VM_CHILD=$!
  wait "$VM_CHILD" || rc=$?
  VM_CHILD=
  echo "$rc" >"$dir/qemu.rc"
  echo $((($(date +%s%N) - t0) / 1000000)) >"$dir/qemu.ms"
  [ "$rc" = 124 ] && vm_say "$row: QEMU timed out after ${VM_QEMU_TIMEOUT}s"
  return 0
}

# ------------------------------------------------------------------------- verdict
# What the guest printed, judged: the facts report, the guest program's checks (where
# the row has a vfio BAR), the example, every test binary, and the backing file's bytes.
vm_verdict() {
  local row=$1 dir=$2 log=$2/serial.log bin name f yes detail label vfio_bar=no
  vm_row "$row"
  VM_PROBLEMS=() VM_FACTS=
  VM_KREL=$(sed -n 's/^FACT kernel: \([^ ]*\).*/\1/p' "$log" 2>/dev/null | tr -d '\r' | head -1)
  VM_PAGE=$(sed -n 's/^FACT page: \([^ ]*\).*/\1/p' "$log" 2>/dev/null | tr -d '\r' | head -1)
  grep -aq '^FACTS: DONE' "$log" 2>/dev/null || VM_PROBLEMS+=("facts: $(grep -a '^FACTS:' "$log" 2>/dev/null | tr -d '\r' | tail -1 || true)")
  for f in holes:holes procmap_query:PROCMAP_QUERY populate:populate udmabuf:udmabuf vfio_bar:"vfio BAR" \
    vfio_dmabuf:"vfio dma-buf" mseal:mseal; do
    name=${f%%:*} label=${f#*:}
    yes=$(sed -n "s/^FACT $name: \([a-z]*\).*/\1/p" "$log" 2>/dev/null | head -1)
    detail=$(sed -n "s/^FACT $name: [a-z]* (\(.*\))\r*$/\1/p" "$log" 2>/dev/null | head -1)
    [ -n "$yes" ] || { VM_PROBLEMS+=("no FACT $name line"); yes='?'; }
    # Why a row has no vfio BAR belongs on its line.
    if [ "$name" = vfio_bar ] && [ "$yes" = no ]; then yes="no ($detail)"; fi
    [ "$name" = vfio_bar ] && vfio_bar=${yes%% *}
    VM_FACTS+="${VM_FACTS:+, }$label $yes"
  done
  if [ "$vfio_bar" = yes ]; then
    grep -aq '^VMTEST: PASS' "$log" || VM_PROBLEMS+=("guest: $(grep -a '^VMTEST:' "$log" | tr -d '\r' | tail -1 || echo 'no VMTEST: verdict line')")
    grep -aq 'INIT: iovmap-vmtest exit 0 ' "$log" || VM_PROBLEMS+=("iovmap-vmtest did not exit 0")
    grep -aq 'INIT: vfio_passthrough ivshmem exit 0' "$log" || VM_PROBLEMS+=("vfio_passthrough on ivshmem did not exit 0")
    if grep -aq 'INIT: vfio_passthrough nvme exit' "$log"; then
      grep -aq 'INIT: vfio_passthrough nvme exit 0' "$log" || VM_PROBLEMS+=("vfio_passthrough on nvme did not exit 0")
    fi
    # The bytes the guest left in the host file: the whole image, and (independently of
    # the Rust code) the magic and the verdict.
    bin=$(cat "$W/host-check-bin" 2>/dev/null || true)
    if [ -s "$dir/bar2.bin" ] && [ -x "$bin" ]; then
      "$bin" host-check "$dir/bar2.bin" >"$dir/host-check.out" 2>&1 || VM_PROBLEMS+=("host-check: $(cat "$dir/host-check.out")")
      local magic verdict
      magic=$(head -c 16 "$dir/bar2.bin")
      verdict=$(dd if="$dir/bar2.bin" bs=1 skip=16 count=4 2>/dev/null)
      [ "$magic" = IOVMAP-VMTEST-01 ] && [ "$verdict" = PASS ] || VM_PROBLEMS+=("backing file magic/verdict '$magic'/'$verdict'")
    elif [ -s "$dir/bar2.bin" ]; then
      VM_PROBLEMS+=("no host-check program ($W/host-check-bin)")
    else
      VM_PROBLEMS+=("no backing file")
    fi
  elif [ "$ROW_VFIO" = required ]; then
    VM_PROBLEMS+=("no vfio BAR in the guest, which this row requires")
  fi
  grep -aq 'INIT: done' "$log" 2>/dev/null || VM_PROBLEMS+=("the guest did not finish (QEMU exit $(cat "$dir/qemu.rc" 2>/dev/null))")
  if [ "$VM_SUITE" = 1 ]; then
    while IFS=$'\t' read -r name f; do
      grep -aq "^SUITE: $name exit 0 " "$log" 2>/dev/null || VM_PROBLEMS+=("$name tests failed in the guest (SUITE[$name] lines)")
    done <"$W/build-$ROW_ARCH/suite"
  fi
}

# host-check is a host program: the x86_64 guest build (static, so it runs on the host
# too) where the matrix has x86_64 rows, else a host build. Its path goes to
# $W/host-check-bin for the rows' verdicts.
vm_host_check_build() {
  local b
  if [ -s "$W/build-x86_64/bins" ] && [ "$1" = x86_64 ]; then
    b=$(sed -n 1p "$W/build-x86_64/bins")
  else
    timeout -k 10 "$VM_BUILD_TIMEOUT" nice cargo build -q --release --manifest-path "$ROOT/Cargo.toml" -p iovmap-vmtest \
      --bin iovmap-vmtest || { VM_WHY="cargo build of host-check failed"; return 1; }
    b=${CARGO_TARGET_DIR:-$ROOT/target}/release/iovmap-vmtest
    case $b in /*) ;; *) b=$ROOT/$b ;; esac
  fi
  echo "$b" >"$W/host-check-bin"
}
