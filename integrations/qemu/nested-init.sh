#!/bin/sh
# /init of nested.sh's guest (busybox sh): the guest is a host of its own. It binds its
# ivshmem device to vfio-pci, then runs QEMU (patched, then stock) as a VMM with that
# device passed through, virtio-gpu-pci with blob=true and memfd RAM, under -accel qtest,
# driven by gpu-qtest: blobs in the BAR, in RAM and BAR mixed, and in RAM, every pixel of
# two frames checked. Where the guest's kernel has udmabuf (nested.postcopy=1), both
# QEMUs also migrate a RAM blob's VM between two QEMUs with postcopy. Lines for the host
# start with NESTED.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
up() { cut -d' ' -f1 /proc/uptime; }
arg() { sed -n "s/.*nested\.$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
echo "NESTED: userspace at $(up) s, $(uname -r), $(sed -n 's/MemTotal: *//p' /proc/meminfo)"
for m in $(cat /lib/modules/order); do insmod /lib/modules/$m.ko || echo "NESTED: insmod $m failed"; done
find_dev() {
  for d in /sys/bus/pci/devices/*; do
    if [ "$(cat $d/vendor)" = "$1" ] && [ "$(cat $d/device)" = "$2" ]; then echo "${d##*/}"; return; fi
  done
}
IV=$(find_dev 0x1af4 0x1110)
if [ -z "$IV" ] || [ ! -e /sys/bus/pci/devices/$IV/iommu_group ]; then
  echo "NESTED: FAIL no ivshmem device with an IOMMU group"
  poweroff -f
fi
echo vfio-pci >/sys/bus/pci/devices/$IV/driver_override
[ -e /sys/bus/pci/devices/$IV/driver ] && echo $IV >/sys/bus/pci/devices/$IV/driver/unbind
echo $IV >/sys/bus/pci/drivers_probe
echo "NESTED: ivshmem $IV driver $(basename "$(readlink /sys/bus/pci/devices/$IV/driver)"), udmabuf $([ -e /dev/udmabuf ] && echo yes || echo no)"
export LD_LIBRARY_PATH=/opt/iovmap/lib
SIZE=$(arg size)
# The VM QEMU runs: 64 MiB of memfd RAM (sealed, as udmabuf wants), virtio-gpu with blobs.
vm() {
  echo -L /usr/share/seabios -L /usr/share/qemu -nodefaults -machine q35,memory-backend=ram -m 64M \
    -object memory-backend-memfd,id=ram,size=64M,share=on \
    -device virtio-gpu-pci,blob=true,xres=${SIZE%x*},yres=${SIZE#*x} \
    -trace virtio_gpu_iovmap_* -trace virtio_gpu_blob_mapping -trace virtio_gpu_cmd_set_scanout_blob
}
# run NAME BINARY [gpu-qtest options]: one gpu-qtest run; its lines, QEMU's trace and, on
# failure, QEMU's stderr go to the host.
run() {
  name=$1 bin=$2
  shift 2
  mkdir -p /tmp/$name
  echo "NESTED: $name starts at $(up) s"
  extra="-device vfio-pci,host=$IV"
  case " $* " in *" --migrate "*) extra= ;; esac
  # vm's words are QEMU's arguments, split but not globbed (the trace pattern).
  set -f
  # shellcheck disable=SC2046
  gpu-qtest --workdir /tmp/$name --timeout 400 "$@" -- $bin $(vm) $extra -D /tmp/$name/trace.log \
    >/tmp/$name/out 2>&1
  rc=$?
  set +f
  sed "s/^/NESTED[$name]: /" /tmp/$name/out
  for t in /tmp/$name/trace.log /tmp/$name/trace.log.dst; do
    [ -f $t ] && grep -E 'virtio_gpu_(iovmap|blob_mapping)' $t | head -40 | sed "s/^/NESTED[$name] trace: /"
  done
  if [ $rc != 0 ]; then
    for f in /tmp/$name/*stderr*; do [ -f $f ] && tail -n 15 $f | sed "s/^/NESTED[$name] stderr: /"; done
  fi
  echo "NESTED: $name exit $rc at $(up) s"
}
run patched qemu-system-x86_64 --blob bar --blob mixed --blob ram
run stock qemu-stock --blob bar --blob mixed --blob ram
if [ "$(arg postcopy)" = 1 ]; then
  run postcopy-patched qemu-system-x86_64 --migrate postcopy
  run postcopy-stock qemu-stock --migrate postcopy
fi
echo "NESTED: done at $(up) s"
sync
poweroff -f
