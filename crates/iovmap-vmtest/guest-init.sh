#!/bin/sh
# The guest's /init (busybox sh), packed by harness.sh: load vfio, bind the test devices
# to vfio-pci, measure the kernel's facts, run the guest test and the example where the
# ivshmem BAR reaches us through vfio, then the test suite; power off. Lines for the host
# start with INIT:, FACT, CHECK, VMTEST:, SUITE; the harness reads nothing else.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
up() { cut -d' ' -f1 /proc/uptime; }
echo "INIT: userspace at $(up) s (guest uptime), $(uname -r) $(uname -m)"
arg() { sed -n "s/.*vmtest\.$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
for m in $(cat /lib/modules/order); do
  insmod /lib/modules/$m.ko || echo "INIT: insmod $m failed"
done
# bench.sh: the benchmark instead of the tests, on a quiet guest (udmabuf loaded above).
BENCH=$(arg bench)
if [ -n "$BENCH" ]; then
  for cmd in $(echo "$BENCH" | tr '+' ' '); do
    echo "BENCH: BEGIN $cmd at $(up) s"
    if [ "$cmd" = demo ]; then /bin/iovmap-demo; else /bin/interleaved $(echo "$cmd" | tr ',' ' '); fi
    echo "BENCH: END $cmd exit $? at $(up) s"
  done
  sync
  poweroff -f
fi
find_dev() { # vendor device -> first PCI address
  for d in /sys/bus/pci/devices/*; do
    if [ "$(cat $d/vendor)" = "$1" ] && [ "$(cat $d/device)" = "$2" ]; then echo "${d##*/}"; return; fi
  done
}
bind() {
  if [ ! -e /sys/bus/pci/devices/$1/iommu_group ]; then
    echo "INIT: $1 ($2) has no IOMMU group: not bound to vfio-pci"
    return 1
  fi
  echo vfio-pci >/sys/bus/pci/devices/$1/driver_override
  [ -e /sys/bus/pci/devices/$1/driver ] && echo $1 >/sys/bus/pci/devices/$1/driver/unbind
  echo $1 >/sys/bus/pci/drivers_probe
  echo "INIT: $1 ($2) driver $(basename $(readlink /sys/bus/pci/devices/$1/driver) 2>/dev/null), iommu group $(basename $(readlink /sys/bus/pci/devices/$1/iommu_group))"
}
IV=$(find_dev 0x1af4 0x1110)
NV=$(find_dev 0x1b36 0x0010)
VFIO=no
if [ -n "$IV" ] && bind $IV ivshmem; then VFIO=yes; fi
NVARG=
if [ -n "$NV" ] && [ $VFIO = yes ] && bind $NV nvme; then NVARG="--nvme $NV"; fi
echo "INIT: /dev/vfio: $(ls /dev/vfio 2>/dev/null | tr '\n' ' ')"
/bin/iovmap-vmtest facts ${IV:+--ivshmem $IV}
echo "INIT: facts exit $?"
if [ $VFIO = yes ]; then
  T0=$(up)
  echo "INIT: iovmap-vmtest starts at $T0 s"
  /bin/iovmap-vmtest guest --ivshmem $IV $NVARG --stress-secs $(arg stress) --threads $(arg threads)
  echo "INIT: iovmap-vmtest exit $? at $(up) s (started at $T0 s)"
  /bin/vfio_passthrough $IV --verify-bar
  echo "INIT: vfio_passthrough ivshmem exit $?"
  if [ -n "$NVARG" ]; then
    /bin/vfio_passthrough $NV
    echo "INIT: vfio_passthrough nvme exit $?"
  fi
fi
# The test suite, on this kernel (a test prints SKIP with its reason where the guest
# lacks something). 2 MiB huge pages by size, not the default size: that is 32 MiB on
# 16K-page arm64, and the hugetlb fixtures ask for 2 MiB (MFD_HUGE_2MB).
if [ -n "$(ls /suite 2>/dev/null)" ]; then
  echo 16 >/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages 2>/dev/null \
    || echo "INIT: no 2 MiB huge pages on this kernel"
  echo $(arg max_map_count) >/proc/sys/vm/max_map_count
  echo "INIT: suite with vm.max_map_count $(cat /proc/sys/vm/max_map_count), $(cat /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages 2>/dev/null || echo 0) huge pages of 2 MiB"
  mount -t tmpfs tmpfs /tmp && cd /tmp
  export IOVMAP_FUZZ_DIR=/fuzz # the corpora the harness copied (replay tests)
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
