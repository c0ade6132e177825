#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""One boot of test.sh's guest under one QEMU binary, driven from the host.

    blobtest.py --qemu BIN --kernel VMLINUZ --initrd CPIO --pattern PATTERN --workdir DIR
                --ram memfd|hugetlbfs:DIR [--expect refused] [--timeout S] [--size WxH] [--fragment PAGES]
                [--migrate postcopy]

Boots the guest with -device virtio-gpu-pci,blob=true, its RAM on a memfd or on a file
in a hugetlbfs mount. The guest (test.sh's /init) draws frame 1 of pattern.c's picture
into its framebuffer and says so on the serial line; this script then takes QMP
screendumps until one matches frame 1 in every pixel (or the time is up), tells the
guest to draw frame 2, and checks that the same way. It then reads QEMU's trace log
(virtio_gpu_iovmap_* and virtio_gpu_blob_copy_init events) for the blob the guest
scanned out, and prints one JSON object on stdout:

    {"ok": true, "iovecs": 47, "path": "view", "runs": 47, "cloned": 47, "fd_mapped": 0,
     "ns": 123456, "frames": ["1280x800: all 1024000 pixels are frame 1", ...]}
    {"ok": true, "path": "copy", "iovecs": 77, "reason": "... off a page boundary ..."}
    {"ok": false, "why": "..."}

With --expect refused, QEMU must refuse to start; the JSON has its message. QEMU is
killed when the script ends, however it ends; every wait has a deadline.

With --migrate postcopy, frame 1 is checked on a source QEMU, which then migrates to a
destination QEMU (-incoming) with postcopy: precopy throttled so it cannot converge,
the switch to postcopy made at once and background pages throttled until the
destination has shown frame 1, so that the framebuffer's pages are still on the source
when the destination's virtio-gpu maps the blob. Frame 2 is drawn and checked on the
destination, and the migration must complete. The JSON then also has "late": how many
of the blob's pages the destination's fault thread asked the source for while
virtio-gpu waited for them (postcopy_ram_fault_thread_request events of the thread
that made the mapping, between its virtio_gpu_iovmap_resolve_start and
virtio_gpu_iovmap_resolve events), and "resolved", the bytes iovmap faulted in.
"""
import argparse
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time


class Fail(Exception):
    pass


def qemu_command(a, serial, qmp, trace_log):
    ram = "256M"
    if a.ram == "memfd":
        backend = f"memory-backend-memfd,id=ram,size={ram},share=on"
    else:
        # mem-path names a directory: QEMU creates (and unlinks) its file there.
        backend = f"memory-backend-file,id=ram,size={ram},share=on,mem-path={a.ram.split(':', 1)[1]}"
    return [
        a.qemu, "-nodefaults", "-machine", "q35,memory-backend=ram", "-accel", "tcg",
        "-cpu", "max", "-smp", "1", "-m", ram, "-object", backend,
        "-device", "virtio-gpu-pci,blob=true" + (f",xres={a.xres},yres={a.yres}" if a.xres else ""),
        "-display", "none",
        "-L", "/usr/share/seabios", "-L", "/usr/share/qemu",
        "-serial", f"pipe:{serial}", "-qmp", f"unix:{qmp},server=on,wait=off",
        "-kernel", a.kernel, "-initrd", a.initrd, "-no-reboot",
        # no_timer_check, as the matrix harness boots (harness.sh says why): the boot-time
        # count of timer ticks fails when the host deschedules the TCG vCPU, and a kernel
        # whose every IO-APIC timer route then fails panics.
        "-append", "console=ttyS0 panic=-1 quiet vt.global_cursor_default=0 consoleblank=0 no_timer_check"
                   + (f" blobtest.fragment={a.fragment}" if a.fragment else ""),
        # The stock binary lacks the first two: it warns and goes on.
        "-trace", "virtio_gpu_iovmap_*", "-trace", "virtio_gpu_blob_copy_init",
        "-trace", "virtio_gpu_cmd_set_scanout_blob",
        "-D", trace_log,
    ]


class Serial:
    """The guest's serial line through QEMU's pipe chardev (DIR/serial.in, .out)."""

    def __init__(self, base, log):
        for suffix in (".in", ".out"):
            os.mkfifo(base + suffix)
        # Opened read-write so that neither side blocks waiting for the other.
        self.rd = os.open(base + ".out", os.O_RDWR | os.O_NONBLOCK)
        self.wr = os.open(base + ".in", os.O_RDWR | os.O_NONBLOCK)
        self.buf = b""
        self.log = open(log, "wb")

    def wait_for(self, pattern, deadline, proc):
        """Returns the first serial line matching `pattern` (a regex), read by `deadline`."""
        rx = re.compile(pattern)
        while True:
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                text = line.decode(errors="replace").rstrip("\r")
                if rx.search(text):
                    return text
                if text.startswith("BLOBTEST: FAIL"):
                    raise Fail("guest: " + text)
            if proc.poll() is not None:
                raise Fail(f"QEMU exited with {proc.returncode} while waiting for '{pattern}'")
            left = deadline - time.monotonic()
            if left <= 0:
                raise Fail(f"timed out waiting for '{pattern}' on the serial line")
            r, _, _ = select.select([self.rd], [], [], min(left, 1.0))
            if r:
                try:
                    data = os.read(self.rd, 65536)
                except BlockingIOError:
                    continue
                self.log.write(data)
                self.log.flush()
                self.buf += data

    def send(self, line):
        os.write(self.wr, line.encode() + b"\n")


class Qmp:
    def __init__(self, path, deadline):
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise Fail("no QMP socket")
                time.sleep(0.1)
        self.sock.settimeout(60)
        self.file = self.sock.makefile("rwb")
        self._read()  # the greeting
        self.execute("qmp_capabilities")

    def _read(self):
        while True:
            line = self.file.readline()
            if not line:
                raise Fail("QMP connection closed")
            msg = json.loads(line)
            if "event" not in msg:
                return msg

    def execute(self, cmd, **args):
        self.file.write(json.dumps({"execute": cmd, "arguments": args}).encode() + b"\n")
        self.file.flush()
        reply = self._read()
        if "error" in reply:
            raise Fail(f"QMP {cmd}: {reply['error'].get('desc')}")
        return reply["return"]


def check_frame(a, qmp, frame, deadline):
    """Screendumps until one is frame `frame` in every pixel; returns the checker's line."""
    dump = os.path.join(a.workdir, f"screen-{frame}.ppm")
    last = "no screendump taken"
    while time.monotonic() < deadline:
        qmp.execute("screendump", filename=dump)
        r = subprocess.run([a.pattern, "check", str(frame), dump], capture_output=True,
                           text=True, timeout=60)
        last = (r.stdout + r.stderr).strip()
        if r.returncode == 0:
            return last
        time.sleep(0.5)
    raise Fail(f"frame {frame} never showed: {last}")


# A trace line of QEMU's log backend: "<pid>@<time>:<event> <args>" (or no prefix).
def trace_events(path, name):
    rx = re.compile(r"(?:^|[:\s])" + re.escape(name) + r" (.*)$")
    out = []
    if os.path.exists(path):
        with open(path, errors="replace") as f:
            for line in f:
                m = rx.search(line.rstrip("\n"))
                if m:
                    out.append(m.group(1))
    return out


def what_served(trace_log, res=None):
    """How QEMU gave the scanout blob (`res`, or the last one the guest set) its mapping,
    from its own trace events."""
    if res is None:
        scanouts = trace_events(trace_log, "virtio_gpu_cmd_set_scanout_blob")
        ids = [m.group(1) for m in (re.search(r"res (0x[0-9a-f]+)", s) for s in scanouts) if m]
        if not ids:
            raise Fail("no virtio_gpu_cmd_set_scanout_blob in the trace: the guest set no blob scanout")
        res = ids[-1]
    for ev in trace_events(trace_log, "virtio_gpu_iovmap_map"):
        m = re.match(r"res (0x[0-9a-f]+), iovecs (\d+), runs (\d+), cloned (\d+), "
                     r"fd_mapped (\d+), time (-?\d+) ns", ev)
        if m and m.group(1) == res:
            return {"res": res, "path": "view", "iovecs": int(m.group(2)), "runs": int(m.group(3)),
                    "cloned": int(m.group(4)), "fd_mapped": int(m.group(5)), "ns": int(m.group(6))}
    failed = None
    for ev in trace_events(trace_log, "virtio_gpu_iovmap_map_failed"):
        m = re.match(r"res (0x[0-9a-f]+), iovecs (\d+), at iovec (-?\d+): (.*)", ev)
        if m and m.group(1) == res:
            failed = {"iovecs": int(m.group(2)), "index": int(m.group(3)), "reason": m.group(4)}
    for ev in trace_events(trace_log, "virtio_gpu_blob_copy_init"):
        m = re.match(r"res (0x[0-9a-f]+), size (\d+): (.*)", ev)
        if m and m.group(1) == res:
            out = {"res": res, "path": "copy", "size": int(m.group(2)), "reason": m.group(3)}
            if failed:
                out.update(iovecs=failed["iovecs"], index=failed["index"], reason=failed["reason"])
            return out
    raise Fail(f"the trace has neither a view nor a copy of the scanout blob {res}")


class Guest:
    """One QEMU process of a boot: its serial line, QMP socket, trace log and stderr."""

    def __init__(self, a, name, extra):
        self.serial = os.path.join(a.workdir, name + "serial")
        self.qmp_path = os.path.join(a.workdir, name + "qmp.sock")
        self.trace_log = os.path.join(a.workdir, name + "trace.log")
        for p in (self.serial + ".in", self.serial + ".out", self.qmp_path, self.trace_log):
            if os.path.exists(p):
                os.unlink(p)
        self.ser = Serial(self.serial, os.path.join(a.workdir, name + "serial.log"))
        cmd = qemu_command(a, self.serial, self.qmp_path, self.trace_log) + extra
        with open(os.path.join(a.workdir, name + "cmdline"), "w") as f:
            f.write(" ".join(cmd) + "\n")
        self.stderr = open(os.path.join(a.workdir, name + "qemu.stderr"), "w+")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.stderr,
                                     stderr=self.stderr, start_new_session=True)
        self.qmp = None

    def connect(self, deadline):
        self.qmp = Qmp(self.qmp_path, deadline)
        return self.qmp

    def kill(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def migration_status(qmp):
    return qmp.execute("query-migrate").get("status", "none")


def wait_status(qmp, want, deadline, what):
    """Polls query-migrate until its status is one of `want`; a failure ends the wait."""
    status = "none"
    while time.monotonic() < deadline:
        status = migration_status(qmp)
        if status in want:
            return status
        if status in ("failed", "cancelled"):
            info = qmp.execute("query-migrate")
            raise Fail(f"{what}: migration {status}: {info.get('error-desc', info)}")
        time.sleep(0.2)
    raise Fail(f"{what}: migration still '{status}', not {'/'.join(want)}")


def late_pages(trace_log, res):
    """The blob's pages the fault thread asked the source for while virtio-gpu waited for
    them: requests by the waiting thread between its resolve_start and resolve events."""
    rx_line = re.compile(r"^(\d+)@[0-9.]+:(\S+) (.*)$")
    waiting, late, resolved, found = None, set(), None, False
    with open(trace_log, errors="replace") as f:
        for line in f:
            m = rx_line.match(line.rstrip("\n"))
            if not m:
                continue
            tid, event, args = m.groups()
            if event == "virtio_gpu_iovmap_resolve_start" and args.startswith(f"res {res},"):
                waiting, found = tid, True
            elif event == "virtio_gpu_iovmap_resolve" and waiting and args.startswith(f"res {res},"):
                r = re.search(r"bytes (\d+), time (-?\d+) ns, ret (-?\d+)", args)
                if not r or r.group(3) != "0":
                    raise Fail(f"iovmap could not resolve the blob's pages: {args}")
                resolved = int(r.group(1))
                waiting = None
            elif event == "postcopy_ram_fault_thread_request" and waiting:
                r = re.search(r"HVA=0x([0-9a-f]+) .* pid=(\d+)", args)
                if r and r.group(2) == waiting:
                    late.add(int(r.group(1), 16))
    if not found:
        raise Fail(f"no virtio_gpu_iovmap_resolve_start for {res} in the destination's trace")
    return len(late), resolved


def run_postcopy(a, deadline):
    """Frame 1 on a source, postcopy to a destination, frame 2 there."""
    sock = os.path.join(a.workdir, "migration.sock")
    if os.path.exists(sock):
        os.unlink(sock)
    src = Guest(a, "src-", [])
    dst = None
    try:
        sq = src.connect(deadline)
        src.ser.wait_for(r"^BLOBTEST: DRAWN 1\b", deadline, src.proc)
        on_source = check_frame(a, sq, 1, deadline)
        dst = Guest(a, "dst-", ["-incoming", "defer", "-msg", "timestamp=on",
                                "-trace", "postcopy_ram_fault_thread_request",
                                "-trace", "virtio_gpu_iovmap_resolve*",
                                "-trace", "migration_uffd_*"])
        dq = dst.connect(deadline)
        caps = [{"capability": "postcopy-ram", "state": True}]
        dq.execute("migrate-set-capabilities", capabilities=caps)
        dq.execute("migrate-incoming", uri=f"unix:{sock}")
        sq.execute("migrate-set-capabilities", capabilities=caps)
        # Precopy may not converge (1 ms of downtime, 1 MB/s), and postcopy sends the
        # rest slowly until the destination has shown frame 1: the blob's pages are then
        # still on the source when the destination maps the blob.
        sq.execute("migrate-set-parameters", **{"max-bandwidth": 1 << 20, "downtime-limit": 1,
                                                "max-postcopy-bandwidth": 256 << 10})
        sq.execute("migrate", uri=f"unix:{sock}")
        sq.execute("migrate-start-postcopy")
        wait_status(sq, ("postcopy-active", "completed"), deadline, "source")
        while dq.execute("query-status").get("status") != "running":
            if time.monotonic() > deadline or dst.proc.poll() is not None:
                raise Fail("the destination never ran")
            time.sleep(0.2)
        frames = [on_source + " (source)", check_frame(a, dq, 1, deadline) + " (destination)"]
        sq.execute("migrate-set-parameters", **{"max-postcopy-bandwidth": 0})
        dst.ser.send("next")
        dst.ser.wait_for(r"^BLOBTEST: DRAWN 2\b", deadline, dst.proc)
        frames.append(check_frame(a, dq, 2, deadline) + " (destination)")
        wait_status(sq, ("completed",), deadline, "source")
        wait_status(dq, ("completed",), deadline, "destination")
        dst.ser.send("next")
        dst.ser.wait_for(r"^BLOBTEST: DONE", deadline, dst.proc)
        res = what_served(src.trace_log)["res"]
        out = {"ok": True, "frames": frames}
        out.update(what_served(dst.trace_log, res))
        out["late"], out["resolved"] = late_pages(dst.trace_log, res)
        return out
    finally:
        src.kill()
        if dst:
            dst.kill()


def run(a):
    os.makedirs(a.workdir, exist_ok=True)
    if a.migrate:
        start = time.monotonic()
        out = run_postcopy(a, start + a.timeout)
        out["secs"] = round(time.monotonic() - start, 1)
        return out
    serial = os.path.join(a.workdir, "serial")
    qmp_path = os.path.join(a.workdir, "qmp.sock")
    trace_log = os.path.join(a.workdir, "trace.log")
    for p in (serial + ".in", serial + ".out", qmp_path, trace_log):
        if os.path.exists(p):
            os.unlink(p)
    ser = Serial(serial, os.path.join(a.workdir, "serial.log"))
    cmd = qemu_command(a, serial, qmp_path, trace_log)
    with open(os.path.join(a.workdir, "cmdline"), "w") as f:
        f.write(" ".join(cmd) + "\n")
    stderr = open(os.path.join(a.workdir, "qemu.stderr"), "w+")
    start = time.monotonic()
    deadline = start + a.timeout
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                            start_new_session=True)
    try:
        if a.expect == "refused":
            try:
                rc = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                raise Fail("it started (still running after 30 s) instead of refusing")
            stderr.seek(0)
            lines = [l.strip() for l in stderr if l.strip()]
            errors = [l for l in lines if "warning:" not in l]
            msg = (errors or lines or ["(nothing on stderr)"])[-1]
            msg = re.sub(r"^.*?qemu-system-x86_64: (-device [^:]*: )?", "", msg)
            if rc == 0:
                raise Fail(f"exit 0 (ran the guest) instead of refusing: {msg}")
            if "blob" not in msg:
                raise Fail(f"exit {rc}, but not for blob resources: {msg}")
            return {"ok": True, "refused": msg, "rc": rc}
        qmp = Qmp(qmp_path, deadline)
        frames = []
        for frame in (1, 2):
            ser.wait_for(rf"^BLOBTEST: DRAWN {frame}\b", deadline, proc)
            frames.append(check_frame(a, qmp, frame, deadline))
            ser.send("next")
        ser.wait_for(r"^BLOBTEST: DONE", deadline, proc)
        try:
            proc.wait(timeout=max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        out = {"ok": True, "frames": frames, "secs": round(time.monotonic() - start, 1)}
        out.update(what_served(trace_log))
        return out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--qemu", required=True)
    p.add_argument("--kernel", required=True)
    p.add_argument("--initrd", required=True)
    p.add_argument("--pattern", required=True, help="the host build of pattern.c")
    p.add_argument("--workdir", required=True)
    p.add_argument("--ram", required=True, help="memfd, or hugetlbfs:DIR (a hugetlbfs mount)")
    p.add_argument("--expect", choices=["pixels", "refused"], default="pixels")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--size", help="WxH: the display size virtio-gpu offers (default 1280x800)")
    p.add_argument("--fragment", type=int, default=0,
                   help="pages of guest memory the guest fragments before loading virtio-gpu")
    p.add_argument("--migrate", choices=["postcopy"],
                   help="migrate the guest to a second QEMU after frame 1, with postcopy")
    a = p.parse_args()
    a.xres = a.yres = None
    if a.size:
        m = re.fullmatch(r"(\d+)x(\d+)", a.size)
        if not m:
            p.error("--size is WxH")
        a.xres, a.yres = m.groups()
    # test.sh's timeout sends SIGTERM: unwind, so that QEMU is killed on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if a.ram != "memfd" and not a.ram.startswith("hugetlbfs:"):
        p.error("--ram is memfd or hugetlbfs:DIR")
    try:
        out = run(a)
    except Fail as e:
        out = {"ok": False, "why": str(e)}
    except Exception as e:  # a bug here or an OS error: still one JSON answer
        out = {"ok": False, "why": f"{type(e).__name__}: {e}"}
    print(json.dumps(out))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
