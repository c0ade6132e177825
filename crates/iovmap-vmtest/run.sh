#!/usr/bin/env bash
# The quick guest VM test: one row of the kernel matrix, a Debian 6.1 guest (x86_64,
# 4 KiB pages, a kernel that punches holes, no PROCMAP_QUERY) under QEMU TCG with a real
# vfio-pci device. Run from anywhere:
#
#   bash crates/iovmap-vmtest/run.sh              # = matrix.sh x86_64-6.1
#   bash crates/iovmap-vmtest/run.sh x86_64-sid   # any other row(s) of matrix.sh
#
# It is matrix.sh with one row: the same fetch (Debian bookworm's linux-image-amd64 into
# $IOVMAP_CACHE), build, initramfs, boot and verdict (harness.sh), the same knobs, and
# the same output: a `VM TEST x86_64 <kernel> 4K: PASS (facts)` line and
# `VM MATRIX: PASS 1/1 rows` (exit 0), or FAIL with the reasons (exit 1). See
# docs/vfio.md for what the guest checks.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[ $# -gt 0 ] || set -- x86_64-6.1
exec bash "$HERE/matrix.sh" "$@"
