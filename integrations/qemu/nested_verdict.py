#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""The verdict on one guest of nested.sh, from its serial console.

    nested_verdict.py ROW SERIAL_LOG

Reads the NESTED lines the guest's /init printed (gpu-qtest's lines and the patched
QEMU's trace events, per run) and prints, for the patched QEMU and each blob,

    <row> <blob>: <iovecs> iovecs, <runs> runs (<cloned>/<fd_mapped>/<kernel-built>), dma-buf: <exporter or none>, pixels match

(or, for a blob QEMU's own udmabuf served, which path did), one line saying what the stock
QEMU did with the same blobs, and, where the guest migrated with postcopy, one line per
QEMU. Exits 1, after saying why, if the patched QEMU did not show every blob right, if a
blob was not mapped the way the guest's kernel allows (BAR runs from the device fd, a
vfio-pci dma-buf where the kernel exports BARs, udmabuf first where it exists), or if its
postcopy migration lost a page, failed, or had nothing to wait for.
"""
import re
import sys


def runs_of(lines):
    """{run name: {"client": [gpu-qtest lines], "trace": [events], "exit": rc, "stderr": [...]}}"""
    runs = {}
    for line in lines:
        m = re.match(r"^NESTED\[([\w-]+)\]( trace| stderr)?: (.*)$", line)
        if m:
            run = runs.setdefault(m.group(1), {"client": [], "trace": [], "stderr": [], "exit": None})
            kind = {None: "client", " trace": "trace", " stderr": "stderr"}[m.group(2)]
            run[kind].append(m.group(3))
            continue
        m = re.match(r"^NESTED: ([\w-]+) exit (\d+) ", line)
        if m:
            runs.setdefault(m.group(1), {"client": [], "trace": [], "stderr": [], "exit": None})["exit"] = int(m.group(2))
    return runs


def fields(line):
    """key=value words of a gpu-qtest line; a value may hold parenthesised text with
    spaces and parentheses of its own (`migration=failed(... uffd_copy_page() ...)`)."""
    out, i, n = {}, 0, len(line)
    while i < n:
        m = re.compile(r"(\w+)=").match(line, i)
        if not m or (i > 0 and line[i - 1] != " "):
            i = line.find(" ", i) + 1 or n
            continue
        j, depth = m.end(), 0
        while j < n and (depth > 0 or line[j] != " "):
            depth += {"(": 1, ")": -1}.get(line[j], 0)
            j += 1
        out[m.group(1)] = line[m.end():j]
        i = j + 1
    return out


def events(run, name):
    """The argument strings of one trace event, in order."""
    rx = re.compile(r"(?:^|[:\s])" + re.escape(name) + r" (.*)$")
    return [m.group(1) for m in (rx.search(t) for t in run["trace"]) if m]


def for_res(args, res):
    """The events of resource `res` (decimal from gpu-qtest; the trace writes 0x%x)."""
    tag = f"res {int(res):#x}"
    return [a for a in args if a == tag or a.startswith(tag + ",") or a.startswith(tag + ":")]


def blob_line(label, run, blob, kernel_has):
    """(line, problems) for one blob of the patched run."""
    problems = []
    c = next((fields(l) for l in run["client"] if l.startswith("GPU-QTEST ") and f"blob={blob} " in l + " "), None)
    if c is None:
        return None, [f"{blob}: gpu-qtest printed no line for it"]
    if c.get("result") != "match":
        detail = " ".join(f"{k}={v}" for k, v in c.items() if k not in ("blob", "time"))
        return None, [f"{blob}: {detail}"]
    res = c.get("res", "0")
    how = (for_res(events(run, "virtio_gpu_blob_mapping"), res) or ["?, unknown"])[-1].split(", ", 1)[-1]
    if how == "udmabuf":
        line = f"{label} {blob}: {c.get('entries')} iovecs, served by QEMU's own udmabuf (udmabuf first), dma-buf: udmabuf, pixels match"
        if blob != "ram":
            problems.append(f"{blob}: udmabuf cannot take BAR pages, yet it served the blob")
        return line, problems
    if how != "iovmap":
        return None, [f"{blob}: mapped by '{how}', not by an iovmap view"]
    m = None
    for a in for_res(events(run, "virtio_gpu_iovmap_map"), res):
        m = re.search(r"iovecs (\d+), runs (\d+), cloned (\d+), fd_mapped (\d+)", a) or m
    if not m:
        return None, [f"{blob}: no virtio_gpu_iovmap_map event for res {res}"]
    iovecs, runs, cloned, fd = (int(x) for x in m.groups())
    kb = runs - cloned - fd
    dmabuf = "none"
    for a in for_res(events(run, "virtio_gpu_iovmap_dmabuf"), res):
        dmabuf = a.rsplit("exporter ", 1)[-1]
    if dmabuf == "none":
        why = for_res(events(run, "virtio_gpu_iovmap_dmabuf_none"), res)
        if why:
            # iovmap's reason without the segment it names and the advice after it.
            text = why[-1].split(": ", 1)[-1]
            text = re.sub(r"^segment \d+ cannot be placed through udmabuf: ", "", text).split(" (")[0]
            dmabuf = f"none ({text})"
    line = f"{label} {blob}: {iovecs} iovecs, {runs} runs ({cloned}/{fd}/{kb}), dma-buf: {dmabuf}, pixels match"
    if blob == "bar" and fd != runs:
        problems.append(f"bar: {fd} of {runs} runs mapped from the device fd")
    if blob == "mixed" and (fd == 0 or cloned + kb == 0):
        problems.append(f"mixed: runs {cloned}/{fd}/{kb} do not mix RAM and BAR")
    if blob == "bar" and kernel_has["dmabuf_export"] and not dmabuf.startswith("vfio"):
        problems.append(f"bar: this kernel exports BARs, yet the blob's dma-buf is {dmabuf}")
    if blob == "bar" and not kernel_has["dmabuf_export"] and not dmabuf.startswith("none"):
        problems.append(f"bar: a dma-buf ({dmabuf}) on a kernel that does not export BARs")
    if blob == "ram" and kernel_has["udmabuf"]:
        problems.append("ram: udmabuf exists here and should have served the RAM blob first")
    return line, problems


def stock_line(label, run):
    lines = [l for l in run["client"] if l.startswith("GPU-QTEST ")]
    start = next((l for l in lines if " step=start " in l + " " or l.startswith("GPU-QTEST error step=start")), None)
    if start:
        reason = fields(start).get("reason", "")
        m = re.search(r'reason="(.*?)"', start)
        text = m.group(1) if m else reason
        m = re.search(r"(need [^(|]*blob resources)", text)
        return f"{label} stock QEMU: refused to start ({m.group(1).strip() if m else text[:160]})"
    parts = []
    for blob in ("bar", "mixed", "ram"):
        c = next((fields(l) for l in lines if f"blob={blob} " in l + " "), None)
        if c is None:
            parts.append(f"{blob}: no result")
        elif c.get("result") == "match":
            parts.append(f"{blob}: pixels match")
        elif c.get("result") == "error":
            parts.append(f"{blob}: {c.get('step', '?')} failed ({c.get('err', c.get('resp', '?'))})")
        else:
            parts.append(f"{blob}: {c.get('result')} (frame {c.get('frame', '?')}, wrong {c.get('wrong', '?')})")
    return f"{label} stock QEMU: " + "; ".join(parts)


def postcopy_line(label, name, run, patched):
    c = next((fields(l) for l in run["client"] if "migrate=postcopy" in l), None)
    who = "patched QEMU" if patched else "stock QEMU"
    if c is None:
        return f"{label} postcopy ({who}): no result line", [f"postcopy ({who}): gpu-qtest printed no result"]
    ok = all(c.get(k) == "match" for k in ("source", "dest1", "dest2")) and c.get("migration") == "completed"
    late = int(c.get("late", "-1")) if c.get("late", "-1").lstrip("-").isdigit() else -1
    desc = ", ".join(f"{k} {c.get(k)}" for k in ("dest1", "dest2", "migration", "mapping") if k in c)
    if patched:
        if ok and late > 0:
            return f"{label} postcopy ({who}): {late} of the blob's pages arrived after its mapping was needed, " \
                   f"served by {c.get('mapping')}, pixels match, migration completed", []
        why = "nothing was still on the source when the blob was mapped (late=0)" if ok else desc
        return f"{label} postcopy ({who}): {desc}", [f"postcopy ({who}): {why}"]
    # What went wrong, as a reader wants it: the frames, then why the migration stopped.
    parts = []
    for k, frame in (("dest1", 1), ("dest2", 2)):
        v = c.get(k, "?")
        m = re.match(r"differ\(wrong=(\d+)/(\d+)\)", v)
        parts.append(f"frame {frame} on the destination: " + (f"{m.group(1)} of {m.group(2)} pixels wrong" if m else v))
    mig = c.get("migration", "?")
    m = re.search(r"(uffd_copy_page\(\) failed: .*?errno=\d+)", mig)
    parts.append("migration " + (f"failed: {m.group(1)}" if m else mig))
    return f"{label} postcopy ({who}): " + "; ".join(parts), []


def main():
    row, log = sys.argv[1], sys.argv[2]
    with open(log, errors="replace") as f:
        lines = [l.rstrip("\r\n") for l in f]
    first = next((l for l in lines if l.startswith("NESTED: userspace at")), "")
    m = re.search(r", (\d+)\.(\d+)\.", first)
    label = f"{m.group(1)}.{m.group(2)}" if m else row
    dev = next((l for l in lines if l.startswith("NESTED: ivshmem")), "")
    if not dev or "driver vfio-pci" not in dev:
        print(f"{label}: FAIL the ivshmem device was not bound to vfio-pci ({dev or 'no NESTED: ivshmem line'})")
        return 1
    fail_line = next((l for l in lines if l.startswith("NESTED: FAIL")), None)
    if fail_line or not any(l.startswith("NESTED: done") for l in lines):
        print(f"{label}: FAIL the guest did not finish ({fail_line or 'no NESTED: done line'})")
        return 1
    udmabuf = "udmabuf yes" in dev
    # vfio-pci exports BARs from Linux 6.19: the rows are 6.1 and 7.2.
    kernel_has = {"udmabuf": udmabuf, "dmabuf_export": m is not None and (int(m.group(1)), int(m.group(2))) >= (6, 19)}
    runs = runs_of(lines)
    problems = []
    patched = runs.get("patched")
    if not patched:
        problems.append("no run of the patched QEMU")
    else:
        for blob in ("bar", "mixed", "ram"):
            line, p = blob_line(label, patched, blob, kernel_has)
            if line:
                print(line)
            problems += p
    if "stock" in runs:
        print(stock_line(label, runs["stock"]))
    else:
        problems.append("no run of the stock QEMU")
    for name, is_patched in (("postcopy-patched", True), ("postcopy-stock", False)):
        if name in runs:
            line, p = postcopy_line(label, name, runs[name], is_patched)
            print(line)
            problems += p
    if udmabuf and "postcopy-patched" not in runs:
        problems.append("no postcopy run in a guest with udmabuf")
    for p in problems:
        print(f"{label}: FAIL {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
