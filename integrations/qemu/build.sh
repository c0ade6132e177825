#!/usr/bin/env bash
# Builds QEMU 10.0 twice from Debian's source package, into a cache outside the clone:
# once with integrations/qemu/patches/ applied and linked with libiovmap, once unpatched
# (stock) with the same configuration, for the comparison test.sh makes. Run from anywhere:
#
#   bash integrations/qemu/build.sh          # last line of stdout: the patched binary
#
# stdout carries three lines: `stock <path>` (the unpatched qemu-system-x86_64), `lib <dir>`
# (libiovmap built from this clone, to run the patched binary with LD_LIBRARY_PATH=<dir>)
# and, last, the path of the patched qemu-system-x86_64. Progress goes to stderr.
#
# Steps: installs the Debian build dependencies that are missing (apt, as root), makes a
# Python venv in the cache with meson and pycotap (Debian's orig tarball strips QEMU's
# python/wheels, which configure would otherwise install meson from), fetches the source
# with deb_source (crates/iovmap-vmtest/debian-packages.sh), builds and installs libiovmap
# (crates/iovmap-capi/install.sh) into the build's own prefix, unpacks, patches with
# `patch --fuzz=0` (a patch that needs fuzz fails the build), configures and builds.
#
# Cache: ${IOVMAP_CACHE:-$HOME/.cache/iovmap}/qemu/. Each build is one directory whose name
# is its key, and is reused while the key holds:
#   stock:   qemu-<Debian version>-stock-c<hash of the configure line>
#   patched: qemu-<Debian version>-iovmap-c<configure>-p<hash of the patch files>
#            -a<libiovmap's ABI (crates/iovmap-capi/abi-version)>-h<hash of what QEMU is
#            compiled and linked against: iovmap.h, iovmap.pc.in, install.sh>
# The patched QEMU links libiovmap.so.<ABI> dynamically, so a change to the library that
# keeps its ABI does not rebuild QEMU: every run builds libiovmap from this clone (cargo,
# incremental) into the clone's target directory, and test.sh runs the cached QEMU on it.
# A rerun with nothing changed builds nothing (a few seconds), a changed patch or header
# rebuilds only the patched QEMU, and a new Debian upload rebuilds both.
#
# Knobs (environment):
#   IOVMAP_CACHE          cache root (default $HOME/.cache/iovmap, as debian-packages.sh)
#   QEMU_SUITE            Debian suite whose qemu source is used (default trixie: 10.0.x)
#   QEMU_JOBS             ninja -j (default 2: this project's machines have 2 cores)
#   QEMU_BUILD_TIMEOUT    seconds for one QEMU configure+build (default 3000)
#   QEMU_APT_TIMEOUT      seconds for apt-get/pip (default 900)
#   QEMU_ONLY=stock|iovmap  build only that one (the other line is then not printed)
#   QEMU_CACHE_KEEP       builds of each kind kept in the cache, newest first (default 3)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
# shellcheck source=../../crates/iovmap-vmtest/debian-packages.sh
. "$ROOT/crates/iovmap-vmtest/debian-packages.sh"

SUITE=${QEMU_SUITE:-trixie}
JOBS=${QEMU_JOBS:-2}
BUILD_TIMEOUT=${QEMU_BUILD_TIMEOUT:-3000}
APT_TIMEOUT=${QEMU_APT_TIMEOUT:-900}
ONLY=${QEMU_ONLY:-}
KEEP=${QEMU_CACHE_KEEP:-3}
CACHE=$IOVMAP_CACHE/qemu
PATCHES=$HERE/patches
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
case $TARGET_DIR in /*) ;; *) TARGET_DIR=$ROOT/$TARGET_DIR ;; esac

say() { echo "build.sh: $*" >&2; }
die() { echo "build.sh: $*" >&2; exit 1; }
T0=$(date +%s)

# Only what qemu-system-x86_64 needs to boot test.sh's guest with virtio-gpu-pci: no
# default features (no GUI, no network backends, no block formats beyond raw), pixman
# (virtio-gpu needs it), no downloads (the build machine reaches only package registries).
CONFIGURE=(--target-list=x86_64-softmmu --without-default-features --enable-pixman
  --disable-download --disable-docs --disable-tools --disable-install-blobs)

# ------------------------------------------------------------------ dependencies
need=()
for p in gcc:gcc make:make ninja:ninja-build flex:flex bison:bison pkg-config:pkg-config \
         bzip2:bzip2 patch:patch flock:util-linux xz:xz-utils; do
  command -v "${p%%:*}" >/dev/null 2>&1 || need+=("${p#*:}")
done
pkg-config --exists glib-2.0 2>/dev/null || need+=(libglib2.0-dev)
pkg-config --exists pixman-1 2>/dev/null || need+=(libpixman-1-dev)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
# cargo comes from rustup (the project's toolchain), not from apt.
command -v cargo >/dev/null 2>&1 || die "no cargo: install the Rust toolchain first (rustup)"
if [ ${#need[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || die "missing ${need[*]} and not root: apt-get install ${need[*]}"
  say "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  timeout -k 10 "$APT_TIMEOUT" apt-get update -qq >&2 || die "apt-get update failed or timed out"
  timeout -k 10 "$APT_TIMEOUT" apt-get install -y -qq --no-install-recommends "${need[@]}" >&2 \
    || die "apt-get install ${need[*]} failed or timed out"
fi

mkdir -p "$CACHE"
# One build at a time on this machine (2 cores shared with other engineers), and no two
# runs writing the same cache entry.
exec 9>"$CACHE/.build.lock"
flock 9

# meson and pycotap at the versions QEMU 10.0's pythondeps.toml names (the ones its
# stripped python/wheels would have provided), in a venv keyed by the Python version.
PYVER=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
VENV=$CACHE/venv-py$PYVER-meson1.5.0
if [ ! -e "$VENV/.complete" ]; then
  say "creating $VENV (meson 1.5.0, pycotap 1.3.1 from PyPI)"
  rm -rf "$VENV"
  python3 -m venv "$VENV" >&2
  timeout -k 10 "$APT_TIMEOUT" "$VENV/bin/pip" install -q --disable-pip-version-check \
    meson==1.5.0 pycotap==1.3.1 >&2 || die "pip install meson pycotap failed"
  touch "$VENV/.complete"
fi
export PATH=$VENV/bin:$PATH

# -------------------------------------------------------------------- the source
SRCDIR=$(deb_source "$SUITE" qemu) || die "cannot fetch the qemu source package of $SUITE"
ORIG=$(ls "$SRCDIR"/qemu_*.orig.tar.* 2>/dev/null | head -1)
[ -n "$ORIG" ] || die "no orig tarball in $SRCDIR"
VERSION=$(basename "$SRCDIR")      # qemu_<Debian version without epoch>
VERSION=${VERSION#qemu_}
case $VERSION in 10.0.*) ;; *) die "$SUITE has qemu $VERSION; the patches are for 10.0.x (QEMU_SUITE=trixie)" ;; esac

short_hash() { sha256sum | cut -c1-12; }
CFG_HASH=$(printf '%s\n' "${CONFIGURE[@]}" | short_hash)

# unpack_source DIR: the orig tarball into DIR/src, with empty stand-ins for the edk2
# images Debian strips (pc-bios/meson.build unpacks them whenever bzip2 is installed and an
# x86_64 target is built; SeaBIOS, from Debian's seabios package, is what test.sh boots).
unpack_source() {
  local dir=$1 f
  rm -rf "$dir/src"
  mkdir -p "$dir/src"
  tar -xf "$ORIG" -C "$dir/src" --strip-components=1
  for f in $(sed -n "s/^ *'\(edk2-[a-z0-9_-]*\.fd\)',$/\1/p" "$dir/src/pc-bios/meson.build"); do
    [ -e "$dir/src/pc-bios/$f.bz2" ] || bzip2 -c </dev/null >"$dir/src/pc-bios/$f.bz2"
  done
}

# build_qemu DIR [configure args...]: configure and build in DIR/build; marks DIR complete.
build_qemu() {
  local dir=$1
  shift
  rm -rf "$dir/build"
  mkdir -p "$dir/build"
  say "configuring $(basename "$dir")"
  (cd "$dir/build" && timeout -k 10 "$BUILD_TIMEOUT" ../src/configure --python="$VENV/bin/python3" \
    "${CONFIGURE[@]}" "$@" >"$dir/configure.log" 2>&1) \
    || die "configure failed: $(tail -5 "$dir/configure.log" | tr '\n' ' ') (see $dir/configure.log)"
  say "building $(basename "$dir") (ninja -j$JOBS, log in $dir/build.log)"
  local t=$(date +%s)
  timeout -k 10 "$BUILD_TIMEOUT" nice -n 10 ninja -C "$dir/build" -j"$JOBS" qemu-system-x86_64 \
    >"$dir/build.log" 2>&1 \
    || die "ninja failed or timed out: $(grep -m3 -E 'error|FAILED' "$dir/build.log" | tr '\n' ' ') (see $dir/build.log)"
  [ -x "$dir/build/qemu-system-x86_64" ] || die "no $dir/build/qemu-system-x86_64 after the build"
  say "built $(basename "$dir") in $(( $(date +%s) - t )) s"
  touch "$dir/.complete"
}

# ------------------------------------------------------------------ stock QEMU
if [ "$ONLY" != iovmap ]; then
  STOCK=$CACHE/qemu-$VERSION-stock-c$CFG_HASH
  if [ ! -e "$STOCK/.complete" ]; then
    unpack_source "$STOCK"
    build_qemu "$STOCK"
  else
    say "reusing $(basename "$STOCK")"
    touch "$STOCK" # newest first for prune
  fi
fi

# ------------------------------------------------------------------ patched QEMU
if [ "$ONLY" != stock ]; then
  shopt -s nullglob
  SERIES=("$PATCHES"/*.patch)
  shopt -u nullglob
  [ ${#SERIES[@]} -gt 0 ] || die "no patches in $PATCHES"
  PATCH_HASH=$(cat "${SERIES[@]}" | short_hash)
  ABI=$(cat "$ROOT/crates/iovmap-capi/abi-version")
  # What QEMU is built against: the header, the pkg-config template and the installer that
  # lays them out. The library's code is not in the key (see Cache above).
  API_HASH=$(cd "$ROOT/crates/iovmap-capi" && cat include/iovmap.h iovmap.pc.in install.sh abi-version \
      | short_hash)
  PATCHED=$CACHE/qemu-$VERSION-iovmap-c$CFG_HASH-p$PATCH_HASH-a$ABI-h$API_HASH
  # libiovmap from this clone, every run: where the patched QEMU finds it at run time.
  LIBDIR_FRESH=$TARGET_DIR/qemu-libiovmap
  say "building libiovmap $ABI from this clone (cargo build --release -p iovmap-capi)"
  timeout -k 10 "$BUILD_TIMEOUT" nice -n 10 cargo build -q --release -j"$JOBS" \
    --manifest-path "$ROOT/Cargo.toml" -p iovmap-capi >&2 || die "cargo build -p iovmap-capi failed"
  rm -rf "$LIBDIR_FRESH"
  sh "$ROOT/crates/iovmap-capi/install.sh" --prefix "$LIBDIR_FRESH" --from "$TARGET_DIR/release" >&2 \
    || die "install.sh failed"
  if [ ! -e "$PATCHED/.complete" ]; then
    # QEMU compiles and links against a copy in the build's own prefix (its RUNPATH).
    rm -rf "$PATCHED/iovmap"
    sh "$ROOT/crates/iovmap-capi/install.sh" --prefix "$PATCHED/iovmap" --from "$TARGET_DIR/release" >&2 \
      || die "install.sh failed"
    unpack_source "$PATCHED"
    for p in "${SERIES[@]}"; do
      (cd "$PATCHED/src" && patch -p1 --fuzz=0 --forward --batch --quiet <"$p" >&2) \
        || die "$(basename "$p") does not apply to qemu $VERSION without fuzz"
    done
    say "applied ${#SERIES[@]} patches"
    export PKG_CONFIG_PATH=$PATCHED/iovmap/lib/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}
    build_qemu "$PATCHED" --enable-iovmap
  else
    say "reusing $(basename "$PATCHED")"
    touch "$PATCHED"
  fi
fi

# Keep the newest $KEEP builds of each kind (other worktrees may use older keys), drop the
# rest: each is ~0.7 GB. Done under the lock, so no build in progress is touched.
prune() {
  local kind=$1 d
  { ls -dt "$CACHE"/qemu-*-"$kind"-* 2>/dev/null || true; } | tail -n +$(( KEEP + 1 )) | while read -r d; do
    say "removing the old build $(basename "$d")"
    rm -rf "$d"
  done
}
prune stock
prune iovmap

say "done in $(( $(date +%s) - T0 )) s"
[ "$ONLY" = iovmap ] || echo "stock $STOCK/build/qemu-system-x86_64"
[ "$ONLY" = stock ] || echo "lib $LIBDIR_FRESH/lib"
[ "$ONLY" = stock ] || echo "$PATCHED/build/qemu-system-x86_64"
