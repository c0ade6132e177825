#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Installs iovmap's C library as cargo built it: include/iovmap.h, libiovmap.a,
# libiovmap.so.ABI (its SONAME, see build.rs) with the libiovmap.so link, and a
# pkg-config file, iovmap.pc, made from iovmap.pc.in. Cargo names the libraries
# libiovmap_capi.a and libiovmap_capi.so (the crate's library is iovmap_capi, apart from
# the iovmap crate's); they are installed under their C names.
#
#   cargo build --release -p iovmap-capi
#   crates/iovmap-capi/install.sh [--prefix /usr/local] [--libdir DIR] [--includedir DIR]
#                                 [--pkgconfigdir DIR] [--destdir DIR] [--from DIR]
#
# --libdir defaults to PREFIX/lib, --includedir to PREFIX/include, --pkgconfigdir to
# LIBDIR/pkgconfig. --destdir (or $DESTDIR) is prepended to every path written, for
# packaging; the .pc file still names the final paths. --from is where cargo left the
# libraries (default: target/release of this repository).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)

prefix=/usr/local
libdir=
includedir=
pkgconfigdir=
destdir=${DESTDIR:-}
from=$root/target/release

die() {
    echo "install.sh: $*" >&2
    exit 1
}

while [ $# -gt 0 ]; do
    case $1 in
        --prefix | --libdir | --includedir | --pkgconfigdir | --destdir | --from)
            [ $# -ge 2 ] || die "$1 needs a value"
            name=${1#--}
            eval "$name=\$2"
            shift 2
            ;;
        -h | --help)
            sed -n '3,17p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done

libdir=${libdir:-$prefix/lib}
includedir=${includedir:-$prefix/include}
pkgconfigdir=${pkgconfigdir:-$libdir/pkgconfig}
for d in "$prefix" "$libdir" "$includedir" "$pkgconfigdir"; do
    case $d in
        /*) ;;
        *) die "$d is not an absolute path" ;;
    esac
done
for f in libiovmap_capi.a libiovmap_capi.so; do
    [ -f "$from/$f" ] || die "$from/$f is missing: run cargo build --release -p iovmap-capi first (or pass --from)"
done

# The workspace version: the first `version = "..."` of the root Cargo.toml, in
# [workspace.package]. tests/install.rs checks it against the crate's.
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$root/Cargo.toml" | head -n 1)
[ -n "$version" ] || die "no version in $root/Cargo.toml"
# The ABI version in the SONAME, as build.rs sets it from the same file.
abi=$(tr -d '[:space:]' <"$here/abi-version")
[ -n "$abi" ] || die "no ABI version in $here/abi-version"

# What a Rust staticlib needs from the system on Linux (rustc --print native-static-libs).
native_static_libs="-lgcc_s -lutil -lrt -lpthread -lm -ldl -lc"

# Paths under the prefix are written relative to ${prefix} in the .pc file.
pc_path() {
    case $1 in
        "$prefix"/*) echo "\${prefix}${1#"$prefix"}" ;;
        *) echo "$1" ;;
    esac
}

install -d "$destdir$libdir" "$destdir$includedir" "$destdir$pkgconfigdir"
install -m 644 "$here/include/iovmap.h" "$destdir$includedir/iovmap.h"
install -m 644 "$from/libiovmap_capi.a" "$destdir$libdir/libiovmap.a"
install -m 755 "$from/libiovmap_capi.so" "$destdir$libdir/libiovmap.so.$abi"
ln -sf "libiovmap.so.$abi" "$destdir$libdir/libiovmap.so"
sed -e "s|@PREFIX@|$prefix|" \
    -e "s|@LIBDIR@|$(pc_path "$libdir")|" \
    -e "s|@INCLUDEDIR@|$(pc_path "$includedir")|" \
    -e "s|@VERSION@|$version|" \
    -e "s|@NATIVE_STATIC_LIBS@|$native_static_libs|" \
    "$here/iovmap.pc.in" >"$destdir$pkgconfigdir/iovmap.pc"

echo "installed iovmap $version: $destdir$includedir/iovmap.h, $destdir$libdir/libiovmap.a," \
    "$destdir$libdir/libiovmap.so.$abi (and libiovmap.so), $destdir$pkgconfigdir/iovmap.pc"
