// gpu-qtest: a guest driver for QEMU's virtio-gpu that runs outside the guest.
//
//   gpu-qtest --workdir DIR [--size WxH] [--blob ram|bar|mixed]... [--timeout S]
//             [--seed N] [--migrate postcopy [--dst-env NAME=VALUE]...]
//             -- QEMU_BINARY QEMU_ARGS...
//
// QEMU runs with `-accel qtest`: no firmware, no guest kernel. This program plays the
// guest: it talks QEMU's qtest protocol (a unix socket it listens on) to enumerate PCI on
// bus 0 through ports 0xcf8/0xcfc, size and place the BARs, bring up virtio-gpu-pci over
// the modern virtio-pci transport with its control queue in guest RAM it lays out itself,
// and then, for each requested kind of blob resource (`ram`: scattered guest RAM; `bar`:
// pieces of an ivshmem device's BAR2, emulated or passed through with vfio-pci; `mixed`:
// RAM and BAR pieces interleaved), creates the blob, scans it out, draws two different
// pictures into its pages with qtest writes, and checks every pixel of a QMP `screendump`
// after each one. One line per blob:
//
//   GPU-QTEST blob=ram res=1 entries=40 bytes=1228800 map=iovmap,runs=40 result=match frames=2 time=0.03s
//   GPU-QTEST blob=bar res=2 entries=37 bytes=1228800 result=error step=RESOURCE_CREATE_BLOB resp=0x1200 err=ERR_UNSPEC time=0.00s
//   GPU-QTEST blob=ram res=1 ... result=differ frame=2 wrong=9216/307200 first=(0,64) got=#a9544f want=#d3fe25 dump=DIR/ram-frame2.ppm
//   GPU-QTEST done ok=N failed=M time=0.13s
//
// and `GPU-QTEST info ...` / `GPU-QTEST error ...` lines around them. Exit status 0 only if
// every blob matched (1 otherwise, 2 for a usage error). `map=` is read from QEMU's trace
// log when the QEMU arguments carry `-D FILE` and the `virtio_gpu_iovmap_*` /
// `virtio_gpu_blob_copy*` trace events are on.
//
// What it adds to QEMU's arguments: `-accel qtest -qtest unix:DIR/qtest.sock -qtest-log
// none -qmp unix:DIR/qmp.sock,server=on,wait=off` and `-display none` (unless a -display
// or -nographic is given). QEMU's stdout and stderr go to DIR/qemu.stderr; QEMU runs in its
// own process group, which is killed whenever this program exits (and QEMU gets SIGKILL
// if this program dies). Every wait has a deadline inside --timeout.
//
// The guest-physical layout, the PCI placement and the virtqueue state all live in one
// `struct guest`, so that after a migration the driver carries on with a second QEMU from
// that struct alone.
//
// --migrate postcopy runs one scenario instead of the blob list, with a `ram` blob only
// (pass no ivshmem/vfio device: vfio-pci blocks migration). Frame 1 is drawn and checked
// on the QEMU started as above (the source); then a destination is started from the same
// binary and arguments plus `-incoming defer -msg timestamp=on -trace
// postcopy_ram_fault_thread_request`, its trace log (`-D FILE`) in FILE.dst, its sockets,
// stderr and command line in DIR/dst-*, and the environment of --dst-env on top of this
// program's. Both get postcopy-ram; the source migrates to unix:DIR/migration.sock with
// precopy held back (max-bandwidth 1 MiB/s, downtime-limit 1 ms) and switches to postcopy
// at once, background pages held to 256 KiB/s (max-postcopy-bandwidth) until the
// destination has shown frame 1: the blob's pages are then mostly still on the source
// when the destination's virtio-gpu loads and maps the blob. On the destination frame 1
// is checked as migrated, then (bandwidth unlimited) frame 2 is drawn through its qtest
// and flushed through its virtqueue (the ring state migrated with the device), and
// checked; both sides must report `completed`. From FILE.dst: how virtio-gpu mapped the
// blob (`virtio_gpu_blob_mapping`, patched QEMU only: `unknown` otherwise) and `late`,
// the distinct pages the fault thread asked the source for on behalf of the thread that
// resolved the blob's pages, between its `virtio_gpu_iovmap_resolve_start` and
// `virtio_gpu_iovmap_resolve` (-1 without those events), with the bytes it `resolved`:
//
//   GPU-QTEST migrate=postcopy blob=ram res=1 entries=40 bytes=1228800 source=match dest1=match dest2=match migration=completed mapping=iovmap late=57 resolved=1228800 time=1.2s
//   GPU-QTEST migrate=postcopy ... dest1=differ(wrong=279552/307200) dest2=skipped(migration postcopy-paused) migration=failed(source postcopy-active, destination postcopy-paused: uffd_copy_page() failed: ... errno=17) ...
//
// Exit status 0 only if all three frames matched and the migration completed.
//
// Build: gcc -std=c11 -O2 -Wall -Wextra -Werror -static -o gpu-qtest gpu-qtest.c
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define TAG "GPU-QTEST"

/* ---- virtio / virtio-gpu constants (virtio 1.2 spec, linux/virtio_gpu.h) ---- */
#define VIRTIO_STATUS_ACKNOWLEDGE 1u
#define VIRTIO_STATUS_DRIVER 2u
#define VIRTIO_STATUS_DRIVER_OK 4u
#define VIRTIO_STATUS_FEATURES_OK 8u
#define VIRTIO_STATUS_NEEDS_RESET 0x40u
#define VIRTIO_STATUS_FAILED 0x80u
#define VIRTIO_F_VERSION_1 32
#define VIRTIO_F_ACCESS_PLATFORM 33
#define VIRTIO_GPU_F_RESOURCE_BLOB 3
#define VIRTIO_MSI_NO_VECTOR 0xffffu

#define VIRTIO_PCI_CAP_COMMON_CFG 1
#define VIRTIO_PCI_CAP_NOTIFY_CFG 2
#define VIRTIO_PCI_CAP_ISR_CFG 3
#define VIRTIO_PCI_CAP_DEVICE_CFG 4

/* struct virtio_pci_common_cfg offsets */
#define CC_DFSELECT 0
#define CC_DF 4
#define CC_GFSELECT 8
#define CC_GF 12
#define CC_MSIX 16
#define CC_NUMQ 18
#define CC_STATUS 20
#define CC_QSELECT 22
#define CC_QSIZE 24
#define CC_QMSIX 26
#define CC_QENABLE 28
#define CC_QNOFF 30
#define CC_QDESC 32
#define CC_QAVAIL 40
#define CC_QUSED 48

#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2

#define GPU_CMD_GET_DISPLAY_INFO 0x0100
#define GPU_CMD_RESOURCE_UNREF 0x0102
#define GPU_CMD_SET_SCANOUT 0x0103
#define GPU_CMD_RESOURCE_FLUSH 0x0104
#define GPU_CMD_RESOURCE_CREATE_BLOB 0x010c
#define GPU_CMD_SET_SCANOUT_BLOB 0x010d
#define GPU_RESP_OK_NODATA 0x1100
#define GPU_RESP_OK_DISPLAY_INFO 0x1101
#define GPU_BLOB_MEM_GUEST 1
#define GPU_BLOB_FLAG_USE_SHAREABLE 2
#define GPU_FORMAT_B8G8R8X8_UNORM 2
#define GPU_MAX_ENTRIES 16384 /* QEMU's limit in virtio_gpu_create_mapping_iov */

#define PAGE 4096u
#define KiB 1024ull
#define MiB (1024ull * 1024)
#define GiB (1024ull * MiB)

/* Guest-physical layout: everything this driver puts in guest RAM sits low. */
#define RING_GPA 0x100000ull      /* desc table; avail at +4 KiB, used at +8 KiB */
#define REQ_GPA 0x110000ull       /* command buffer (create_blob + 16384 entries fits) */
#define REQ_MAX 0x70000ull
#define RESP_GPA 0x180000ull      /* response buffer */
#define RESP_MAX 0x1000ull
#define ARENA_LO 0x400000ull      /* blob pieces in RAM from 4 MiB up */
#define QUEUE_MAX 256u

/* PCI BAR windows this driver allocates from (q35: MMCONFIG is off without firmware). */
#define MMIO32_LO 0xc0000000ull
#define MMIO32_HI 0xfec00000ull /* IOAPIC, HPET, LAPIC above */
#define MMIO64_LO 0x1000000000ull

/* Blob pieces: 4 KiB..64 KiB, each in its own 128 KiB slot with a gap after it. */
#define PIECE_MAX_PAGES 16u
#define SLOT (128 * KiB)

/* Deadlines (ms), each capped by --timeout. */
#define T_START 60000.0
#define T_QTEST 10000.0
#define T_GPU 10000.0
#define T_QMP 30000.0

/* ================================================================ basics */

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static double g_t0, g_deadline;
static double until(double ms) {
  double d = now_ms() + ms;
  return d < g_deadline ? d : g_deadline;
}

static char g_err[4096];
__attribute__((format(printf, 1, 2))) static void seterr(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(g_err, sizeof g_err, fmt, ap);
  va_end(ap);
  for (char *p = g_err; *p; p++) /* the message goes between double quotes */
    if (*p == '"' || *p == '\n' || *p == '\r') *p = *p == '"' ? '\'' : ' ';
}

static void *xmalloc(size_t n) {
  void *p = malloc(n ? n : 1);
  if (!p) {
    fprintf(stderr, "gpu-qtest: out of memory\n");
    exit(1);
  }
  return p;
}

static void put16(uint8_t *p, uint16_t v) { p[0] = v; p[1] = v >> 8; }
static void put32(uint8_t *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = v >> (8 * i); }
static void put64(uint8_t *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = v >> (8 * i); }
static uint32_t get32(const uint8_t *p) {
  return p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t rng_next(uint64_t *s) { /* splitmix64 */
  uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
static uint64_t rng_below(uint64_t *s, uint64_t n) { return n ? rng_next(s) % n : 0; }

/* The picture: each pixel a hash of (x, y, frame, resource), 0xRRGGBB. */
static uint32_t pixel(uint32_t x, uint32_t y, uint32_t frame, uint32_t res) {
  uint64_t s = (uint64_t)x | (uint64_t)y << 16 | (uint64_t)frame << 32 | (uint64_t)res << 40;
  return (uint32_t)rng_next(&s) & 0xffffff;
}

/* ================================================================ QEMU processes */

/* Two at most: the one the blobs are made on and, with --migrate, the destination. */
struct qemu;

struct conn {
  const char *name;
  struct qemu *q; /* the QEMU at the other end */
  int fd;
  int dead;
  char *buf;
  size_t len, cap;
  char *line;
  size_t linecap;
};

struct qemu {
  const char *name; /* in messages: "QEMU", "destination QEMU" */
  pid_t pid;
  int exited, status;
  const char *trace_path; /* its -D FILE, if any */
  char stderr_path[4200], qtest_path[4200], qmp_path[4200], dump_path[4200], cmdline_path[4200];
  struct conn qt, qmp;
};

static struct qemu g_src = {.name = "QEMU",
                            .pid = -1,
                            .qt = {.name = "qtest", .q = &g_src, .fd = -1},
                            .qmp = {.name = "QMP", .q = &g_src, .fd = -1}};
static struct qemu g_dst = {.name = "destination QEMU",
                            .pid = -1,
                            .qt = {.name = "destination qtest", .q = &g_dst, .fd = -1},
                            .qmp = {.name = "destination QMP", .q = &g_dst, .fd = -1}};
static struct qemu *g_q = &g_src; /* where qt() and qmp_cmd() go */
static char g_dir[4096];
static char **g_dst_env; /* --dst-env NAME=VALUE..., for the destination only */
static int g_ndst_env;

static void qemu_kill_one(struct qemu *q) {
  if (q->pid > 0 && !q->exited) {
    kill(-q->pid, SIGKILL);
    kill(q->pid, SIGKILL);
    if (waitpid(q->pid, &q->status, 0) == q->pid) q->exited = 1;
  }
}

static void qemu_kill(void) {
  qemu_kill_one(&g_dst);
  qemu_kill_one(&g_src);
}

static void on_signal(int sig) {
  pid_t pids[2] = {g_src.pid, g_dst.pid};
  for (int i = 0; i < 2; i++)
    if (pids[i] > 0) {
      kill(-pids[i], SIGKILL);
      kill(pids[i], SIGKILL);
    }
  _exit(128 + sig);
}

/* 1 if that QEMU has exited (status in q->status), or never started. */
static int qemu_gone(struct qemu *q) {
  if (q->pid <= 0) return 1;
  if (q->exited) return 1;
  if (waitpid(q->pid, &q->status, WNOHANG) == q->pid) q->exited = 1;
  return q->exited;
}

static const char *qemu_status_str(struct qemu *q) {
  static char s[64];
  if (WIFEXITED(q->status))
    snprintf(s, sizeof s, "exit %d", WEXITSTATUS(q->status));
  else if (WIFSIGNALED(q->status))
    snprintf(s, sizeof s, "signal %d", WTERMSIG(q->status));
  else
    snprintf(s, sizeof s, "status 0x%x", q->status);
  return s;
}

/* The last few non-empty lines of a QEMU's stderr, joined with " | ", quotes made safe. */
static const char *qemu_stderr_tail(struct qemu *q) {
  static char out[1024];
  char buf[8192];
  out[0] = 0;
  int fd = open(q->stderr_path, O_RDONLY);
  if (fd < 0) return out;
  off_t end = lseek(fd, 0, SEEK_END);
  off_t from = end > (off_t)sizeof buf - 1 ? end - (off_t)sizeof buf + 1 : 0;
  ssize_t n = pread(fd, buf, sizeof buf - 1, from);
  close(fd);
  if (n <= 0) return out;
  buf[n] = 0;
  const char *lines[4];
  int nl = 0;
  for (char *p = strtok(buf, "\n"); p; p = strtok(NULL, "\n")) {
    if (!*p) continue;
    if (nl == 4) memmove(lines, lines + 1, 3 * sizeof *lines), nl = 3;
    lines[nl++] = p;
  }
  for (int i = 0; i < nl; i++) {
    size_t o = strlen(out);
    snprintf(out + o, sizeof out - o, "%s%s", i ? " | " : "", lines[i]);
  }
  for (char *p = out; *p; p++)
    if (*p == '"' || *p == '\r' || *p == '\t') *p = '\'';
  return out;
}

/* The first error (not a warning) a QEMU wrote to its stderr, without the timestamp and
 * the program's name; "" if none. */
static const char *qemu_stderr_error(struct qemu *q) {
  static char out[600];
  char line[2048];
  out[0] = 0;
  FILE *f = fopen(q->stderr_path, "r");
  if (!f) return out;
  while (fgets(line, sizeof line, f)) {
    if (strstr(line, "warning:") || !line[strspn(line, " \r\n")]) continue;
    char *m = strstr(line, "qemu-system-");
    m = m ? strstr(m, ": ") : NULL;
    m = m ? m + 2 : line;
    snprintf(out, sizeof out, "%.*s", (int)strcspn(m, "\r\n"), m);
    break;
  }
  fclose(f);
  return out;
}

/* Fill in a QEMU's file names: DIR/<prefix>qemu.stderr, DIR/<prefix>qtest.sock, ... */
static void qemu_paths(struct qemu *q, const char *prefix) {
  snprintf(q->stderr_path, sizeof q->stderr_path, "%s/%sqemu.stderr", g_dir, prefix);
  snprintf(q->qtest_path, sizeof q->qtest_path, "%s/%sqtest.sock", g_dir, prefix);
  snprintf(q->qmp_path, sizeof q->qmp_path, "%s/%sqmp.sock", g_dir, prefix);
  snprintf(q->dump_path, sizeof q->dump_path, "%s/%sscreendump.ppm", g_dir, prefix);
  snprintf(q->cmdline_path, sizeof q->cmdline_path, "%s/%sqemu.cmdline", g_dir, prefix);
}

static int spawn_qemu(struct qemu *q, char **qargv, int nq, char **env, int nenv) {
  /* argv: QEMU's own, then what the client needs. */
  int has_display = 0;
  for (int i = 1; i < nq; i++) {
    if (!strcmp(qargv[i], "-display") || !strcmp(qargv[i], "-nographic")) has_display = 1;
    if (!strcmp(qargv[i], "-D") && i + 1 < nq) q->trace_path = qargv[i + 1];
  }
  char qtest_arg[4300], qmp_arg[4300];
  snprintf(qtest_arg, sizeof qtest_arg, "unix:%s", q->qtest_path);
  snprintf(qmp_arg, sizeof qmp_arg, "unix:%s,server=on,wait=off", q->qmp_path);
  const char *extra[] = {"-accel", "qtest", "-qtest", qtest_arg, "-qtest-log", "none",
                         "-qmp", qmp_arg, "-display", "none"};
  int nextra = (int)(sizeof extra / sizeof *extra) - (has_display ? 2 : 0);
  char **argv = xmalloc(sizeof *argv * (nq + nextra + 1));
  for (int i = 0; i < nq; i++) argv[i] = qargv[i];
  for (int i = 0; i < nextra; i++) argv[nq + i] = (char *)extra[i];
  argv[nq + nextra] = NULL;

  FILE *cmdf;
  if ((cmdf = fopen(q->cmdline_path, "w"))) {
    for (int i = 0; i < nenv; i++) fprintf(cmdf, "%s ", env[i]);
    for (int i = 0; argv[i]; i++) fprintf(cmdf, "%s%s", i ? " " : "", argv[i]);
    fprintf(cmdf, "\n");
    fclose(cmdf);
  }

  int errfd = open(q->stderr_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (errfd < 0) {
    seterr("cannot create %s: %s", q->stderr_path, strerror(errno));
    free(argv);
    return -1;
  }
  pid_t parent = getpid();
  fflush(NULL);
  pid_t pid = fork();
  if (pid < 0) {
    seterr("fork: %s", strerror(errno));
    close(errfd);
    free(argv);
    return -1;
  }
  if (pid == 0) {
    setpgid(0, 0);
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(127);
    int nul = open("/dev/null", O_RDONLY);
    if (nul >= 0) dup2(nul, 0);
    dup2(errfd, 1);
    dup2(errfd, 2);
    signal(SIGPIPE, SIG_DFL);
    for (int i = 0; i < nenv; i++) putenv(env[i]);
    execvp(argv[0], argv);
    dprintf(2, "gpu-qtest: cannot run %s: %s\n", argv[0], strerror(errno));
    _exit(127);
  }
  setpgid(pid, pid);
  close(errfd);
  q->pid = pid;
  free(argv);
  return 0;
}

/* ================================================================ line connections */

static void conn_break(struct conn *c, const char *why) {
  c->dead = 1;
  /* a connection that breaks (not one that times out) is most often QEMU exiting: give it
   * a moment to finish so that its status and last words can be reported */
  for (int i = 0; i < 40 && !strstr(why, "timed out") && !qemu_gone(c->q); i++) usleep(25000);
  if (qemu_gone(c->q))
    seterr("%s exited (%s): %s (%s: %s)", c->q->name, qemu_status_str(c->q), qemu_stderr_tail(c->q), c->name, why);
  else
    seterr("%s: %s", c->name, why);
}

static int conn_send(struct conn *c, const char *data, size_t n, double deadline) {
  if (c->dead) {
    seterr("%s connection is gone", c->name);
    return -1;
  }
  while (n) {
    ssize_t k = send(c->fd, data, n, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (k > 0) {
      data += k;
      n -= k;
      continue;
    }
    if (k < 0 && errno != EAGAIN && errno != EINTR) {
      conn_break(c, strerror(errno));
      return -1;
    }
    double left = deadline - now_ms();
    if (left <= 0) {
      conn_break(c, "timed out sending");
      return -1;
    }
    struct pollfd p = {c->fd, POLLOUT, 0};
    poll(&p, 1, left > 100 ? 100 : (int)left + 1);
    if (qemu_gone(c->q)) {
      conn_break(c, "QEMU is gone");
      return -1;
    }
  }
  return 0;
}

/* The next line (without its end of line) in c->line, or NULL. */
static char *conn_line(struct conn *c, double deadline) {
  if (c->dead) {
    seterr("%s connection is gone", c->name);
    return NULL;
  }
  for (;;) {
    char *nl = c->len ? memchr(c->buf, '\n', c->len) : NULL;
    if (nl) {
      size_t n = nl - c->buf;
      if (n + 1 > c->linecap) {
        free(c->line);
        c->linecap = n + 1024;
        c->line = xmalloc(c->linecap);
      }
      memcpy(c->line, c->buf, n);
      if (n && c->line[n - 1] == '\r') n--;
      c->line[n] = 0;
      memmove(c->buf, nl + 1, c->len - (nl + 1 - c->buf));
      c->len -= nl + 1 - c->buf;
      return c->line;
    }
    if (c->cap - c->len < 65536) {
      c->cap = c->cap ? c->cap * 2 : 1 << 20;
      c->buf = realloc(c->buf, c->cap);
      if (!c->buf) {
        fprintf(stderr, "gpu-qtest: out of memory\n");
        exit(1);
      }
    }
    double left = deadline - now_ms();
    if (left <= 0) {
      conn_break(c, "timed out waiting for an answer");
      return NULL;
    }
    struct pollfd p = {c->fd, POLLIN, 0};
    int r = poll(&p, 1, left > 100 ? 100 : (int)left + 1);
    if (r < 0 && errno != EINTR) {
      conn_break(c, strerror(errno));
      return NULL;
    }
    if (r > 0) {
      ssize_t k = recv(c->fd, c->buf + c->len, c->cap - c->len, 0);
      if (k == 0) {
        conn_break(c, "connection closed");
        return NULL;
      }
      if (k < 0 && errno != EAGAIN && errno != EINTR) {
        conn_break(c, strerror(errno));
        return NULL;
      }
      if (k > 0) c->len += k;
    } else if (qemu_gone(c->q)) {
      conn_break(c, "no answer");
      return NULL;
    }
  }
}

/* ================================================================ qtest */

static char *g_cmd;
static size_t g_cmdcap;

/* Send one qtest command (g_cmd, n bytes, newline included) and wait for "OK...". */
static char *qt_send_cmd(size_t n) {
  if (conn_send(&g_q->qt, g_cmd, n, until(T_QTEST))) return NULL;
  char *a = conn_line(&g_q->qt, until(T_QTEST));
  if (!a) return NULL;
  if (strncmp(a, "OK", 2)) {
    char *sp = strchr(g_cmd, ' ');
    seterr("%s: '%.*s ...' answered '%.200s'", g_q->qt.name, sp ? (int)(sp - g_cmd) : 16, g_cmd, a);
    return NULL;
  }
  return a;
}

__attribute__((format(printf, 1, 2))) static char *qt(const char *fmt, ...) {
  va_list ap;
  if (g_cmdcap < 4096) {
    g_cmdcap = 4096;
    g_cmd = realloc(g_cmd, g_cmdcap);
  }
  va_start(ap, fmt);
  int n = vsnprintf(g_cmd, g_cmdcap - 1, fmt, ap);
  va_end(ap);
  g_cmd[n++] = '\n';
  return qt_send_cmd(n);
}

static int qt_val(uint64_t *v, char *a) {
  if (!a) return -1;
  char *end;
  errno = 0;
  *v = strtoull(a + 2, &end, 0);
  if (errno || end == a + 2) {
    seterr("qtest: cannot parse '%.100s'", a);
    return -1;
  }
  return 0;
}

static const char *const SFX[] = {"b", "w", "l", "q"};
static int szidx(unsigned bytes) { return bytes == 1 ? 0 : bytes == 2 ? 1 : bytes == 4 ? 2 : 3; }

static int io_out(unsigned bytes, unsigned port, uint32_t v) {
  return qt("out%s 0x%x 0x%x", SFX[szidx(bytes)], port, v) ? 0 : -1;
}
static int io_in(unsigned bytes, unsigned port, uint32_t *v) {
  uint64_t x;
  if (qt_val(&x, qt("in%s 0x%x", SFX[szidx(bytes)], port))) return -1;
  *v = (uint32_t)x;
  return 0;
}
static int mw(unsigned bytes, uint64_t a, uint64_t v) {
  return qt("write%s 0x%" PRIx64 " 0x%" PRIx64, SFX[szidx(bytes)], a, v) ? 0 : -1;
}
static int mr(unsigned bytes, uint64_t a, uint64_t *v) {
  return qt_val(v, qt("read%s 0x%" PRIx64, SFX[szidx(bytes)], a));
}

static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
static size_t b64enc(char *out, const uint8_t *in, size_t n) {
  size_t o = 0, i = 0;
  for (; i + 2 < n; i += 3) {
    uint32_t v = in[i] << 16 | in[i + 1] << 8 | in[i + 2];
    out[o++] = B64[v >> 18];
    out[o++] = B64[(v >> 12) & 63];
    out[o++] = B64[(v >> 6) & 63];
    out[o++] = B64[v & 63];
  }
  if (i < n) {
    uint32_t v = in[i] << 16 | (i + 1 < n ? in[i + 1] << 8 : 0);
    out[o++] = B64[v >> 18];
    out[o++] = B64[(v >> 12) & 63];
    out[o++] = i + 1 < n ? B64[(v >> 6) & 63] : '=';
    out[o++] = '=';
  }
  return o;
}

/* Guest-physical write with b64write, in chunks (qtest scans its whole input line for the
 * newline on every 1 KiB it reads: long lines cost quadratic time). */
#define WCHUNK (32 * 1024)
static int mwrite(uint64_t a, const void *p, size_t n) {
  const uint8_t *b = p;
  size_t need = 64 + (WCHUNK + 2) / 3 * 4 + 2;
  if (g_cmdcap < need) {
    g_cmdcap = need;
    g_cmd = realloc(g_cmd, g_cmdcap);
  }
  while (n) {
    size_t k = n < WCHUNK ? n : WCHUNK;
    int h = snprintf(g_cmd, 64, "b64write 0x%" PRIx64 " 0x%zx ", a, k);
    size_t m = h + b64enc(g_cmd + h, b, k);
    g_cmd[m++] = '\n';
    if (!qt_send_cmd(m)) return -1;
    a += k;
    b += k;
    n -= k;
  }
  return 0;
}

static int hexval(int c) {
  return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

static int mread(uint64_t a, void *p, size_t n) {
  uint8_t *b = p;
  while (n) {
    size_t k = n < 4096 ? n : 4096;
    char *r = qt("read 0x%" PRIx64 " 0x%zx", a, k);
    if (!r) return -1;
    const char *h = strstr(r, "0x");
    if (!h || strlen(h + 2) < 2 * k) {
      seterr("qtest: short read answer '%.60s'", r);
      return -1;
    }
    h += 2;
    for (size_t i = 0; i < k; i++) {
      int hi = hexval(h[2 * i]), lo = hexval(h[2 * i + 1]);
      if (hi < 0 || lo < 0) {
        seterr("qtest: bad hex in read answer");
        return -1;
      }
      b[i] = hi << 4 | lo;
    }
    a += k;
    b += k;
    n -= k;
  }
  return 0;
}

static int mzero(uint64_t a, size_t n) { return qt("memset 0x%" PRIx64 " 0x%zx 0", a, n) ? 0 : -1; }

/* ================================================================ QMP */

/* One QMP command on that QEMU; its answer line (with "return"), or NULL (g_err says why). */
static char *qmp_on(struct qemu *q, const char *json, double ms) {
  struct conn *c = &q->qmp;
  if (conn_send(c, json, strlen(json), until(ms)) || conn_send(c, "\r\n", 2, until(ms))) return NULL;
  for (;;) {
    char *r = conn_line(c, until(ms));
    if (!r) return NULL;
    if (strstr(r, "\"event\"")) continue;
    if (strstr(r, "\"error\"")) {
      char *d = strstr(r, "\"desc\"");
      seterr("%s: %.300s", c->name, d ? d : r);
      return NULL;
    }
    if (strstr(r, "\"return\"")) return r;
  }
}

static char *qmp_cmd(const char *json, double ms) { return qmp_on(g_q, json, ms); }

static int qmp_connect(struct qemu *q) {
  int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  struct sockaddr_un a = {.sun_family = AF_UNIX};
  strcpy(a.sun_path, q->qmp_path);
  double end = until(T_START);
  while (connect(s, (struct sockaddr *)&a, sizeof a)) {
    if (now_ms() > end || qemu_gone(q)) {
      if (qemu_gone(q))
        seterr("%s exited (%s) before its QMP socket took a connection: %s", q->name, qemu_status_str(q),
               qemu_stderr_tail(q));
      else
        seterr("cannot connect to QMP at %s: %s", q->qmp_path, strerror(errno));
      close(s);
      return -1;
    }
    usleep(20000);
  }
  q->qmp.fd = s;
  char *r = conn_line(&q->qmp, until(T_QMP));
  if (!r) return -1;
  if (!strstr(r, "\"QMP\"")) {
    seterr("%s: unexpected greeting '%.100s'", q->qmp.name, r);
    return -1;
  }
  return qmp_on(q, "{\"execute\":\"qmp_capabilities\"}", T_QMP) ? 0 : -1;
}

/* The string value of "key" in a QMP answer, unescaped (\" \\ \n only), in out; 0 if found. */
static int json_str(const char *r, const char *key, char *out, size_t cap) {
  char pat[80];
  snprintf(pat, sizeof pat, "\"%s\"", key);
  const char *p = r ? strstr(r, pat) : NULL;
  out[0] = 0;
  if (!p) return -1;
  p += strlen(pat);
  while (*p == ' ' || *p == ':') p++;
  if (*p++ != '"') return -1;
  size_t o = 0;
  for (; *p && *p != '"' && o + 1 < cap; p++) {
    if (*p == '\\' && p[1]) {
      p++;
      out[o++] = *p == 'n' || *p == 't' || *p == 'r' ? ' ' : *p;
    } else {
      out[o++] = *p;
    }
  }
  out[o] = 0;
  return 0;
}

static void json_escape(char *out, size_t cap, const char *in) {
  size_t o = 0;
  for (; *in && o + 7 < cap; in++) {
    unsigned char c = *in;
    if (c == '"' || c == '\\')
      out[o++] = '\\', out[o++] = c;
    else if (c < 0x20)
      o += snprintf(out + o, cap - o, "\\u%04x", c);
    else
      out[o++] = c;
  }
  out[o] = 0;
}

/* ================================================================ the guest */

struct bar {
  uint64_t addr, size;
  uint8_t io, is64, pref;
};

struct pcidev {
  int present;
  uint8_t bus, slot, fn;
  uint16_t vendor, device;
  struct bar bar[6];
};

struct vring_state {
  uint16_t size;      /* entries */
  uint64_t desc, avail, used;
  uint64_t notify;    /* where to write the queue index */
  uint16_t avail_idx; /* next avail->idx this driver publishes */
  uint16_t used_idx;  /* last used->idx this driver consumed */
};

/* Everything a second QEMU would need to carry on after a migration. */
struct guest {
  uint64_t ram_size;                /* from QMP query-memory-size-summary */
  uint64_t arena_lo, arena_hi;      /* guest RAM that blob pieces may use */
  uint64_t req_gpa, resp_gpa;       /* command / response buffers */
  uint64_t mmio32_next, mmio64_next; /* BAR allocator */
  struct pcidev gpu, shm;           /* virtio-gpu-pci, ivshmem (emulated or vfio-pci) */
  int shm_bar;                      /* the ivshmem BAR that blobs use (2) */
  uint64_t common, notify_base, isr, devcfg;
  uint32_t notify_mult;
  uint64_t dev_features, drv_features;
  struct vring_state ctrlq;
  uint32_t width, height; /* the picture */
  uint64_t seed;
};

static uint32_t cfg_addr(const struct pcidev *d, unsigned off) {
  return 0x80000000u | (uint32_t)d->bus << 16 | (uint32_t)d->slot << 11 | (uint32_t)d->fn << 8 | (off & 0xfc);
}
static int cfg_r32(const struct pcidev *d, unsigned off, uint32_t *v) {
  if (io_out(4, 0xcf8, cfg_addr(d, off))) return -1;
  return io_in(4, 0xcfc, v);
}
static int cfg_r8(const struct pcidev *d, unsigned off, uint8_t *v) {
  uint32_t x;
  if (cfg_r32(d, off, &x)) return -1;
  *v = x >> (8 * (off & 3));
  return 0;
}
static int cfg_w32(const struct pcidev *d, unsigned off, uint32_t v) {
  if (io_out(4, 0xcf8, cfg_addr(d, off))) return -1;
  return io_out(4, 0xcfc, v);
}
static int cfg_w16(const struct pcidev *d, unsigned off, uint16_t v) {
  if (io_out(4, 0xcf8, cfg_addr(d, off))) return -1;
  return io_out(2, 0xcfc + (off & 2), v);
}

/* Size every BAR (all-ones, read back), with decoding off. */
static int pci_size_bars(struct pcidev *d) {
  uint32_t cmd;
  if (cfg_r32(d, 0x04, &cmd) || cfg_w16(d, 0x04, cmd & 0xfff8)) return -1;
  for (int i = 0; i < 6; i++) {
    unsigned off = 0x10 + 4 * i;
    uint32_t orig, lo, hi = 0, orig_hi = 0;
    struct bar *b = &d->bar[i];
    memset(b, 0, sizeof *b);
    if (cfg_r32(d, off, &orig) || cfg_w32(d, off, 0xffffffff) || cfg_r32(d, off, &lo) || cfg_w32(d, off, orig))
      return -1;
    if (!lo) continue;
    if (orig & 1) { /* I/O BAR: not used by this driver */
      b->io = 1;
      b->size = (~(lo & ~3u) + 1) & 0xffff;
      continue;
    }
    b->pref = (orig >> 3) & 1;
    b->is64 = ((orig >> 1) & 3) == 2;
    uint64_t mask = lo & ~0xfu;
    if (b->is64 && i < 5) {
      if (cfg_r32(d, off + 4, &orig_hi) || cfg_w32(d, off + 4, 0xffffffff) || cfg_r32(d, off + 4, &hi) ||
          cfg_w32(d, off + 4, orig_hi))
        return -1;
      mask |= (uint64_t)hi << 32;
    } else {
      mask |= 0xffffffff00000000ull;
    }
    b->size = ~mask + 1;
    if (b->is64) i++; /* the upper half is not a BAR of its own */
  }
  return 0;
}

static int pci_place_bar(struct guest *g, struct pcidev *d, int i) {
  struct bar *b = &d->bar[i];
  uint64_t align = b->size < PAGE ? PAGE : b->size;
  uint64_t a = (g->mmio32_next + align - 1) & ~(align - 1);
  if (a + b->size <= MMIO32_HI) {
    g->mmio32_next = a + b->size;
  } else if (b->is64) {
    a = (g->mmio64_next + align - 1) & ~(align - 1);
    g->mmio64_next = a + b->size;
  } else {
    seterr("no room below 4 GiB for BAR%d of %02x:%02x.%x (0x%" PRIx64 " bytes)", i, d->bus, d->slot, d->fn, b->size);
    return -1;
  }
  b->addr = a;
  unsigned off = 0x10 + 4 * i;
  if (cfg_w32(d, off, (uint32_t)a)) return -1;
  if (b->is64 && cfg_w32(d, off + 4, (uint32_t)(a >> 32))) return -1;
  uint32_t lo, hi = 0;
  if (cfg_r32(d, off, &lo) || (b->is64 && cfg_r32(d, off + 4, &hi))) return -1;
  uint64_t got = ((uint64_t)hi << 32 | lo) & ~0xfull;
  if (got != a) {
    seterr("BAR%d of %02x:%02x.%x reads back 0x%" PRIx64 " after writing 0x%" PRIx64, i, d->bus, d->slot, d->fn, got, a);
    return -1;
  }
  return 0;
}

/* Place the memory BARs of the devices this driver uses, largest first, and turn on
 * memory decoding and bus mastering. */
static int pci_setup(struct guest *g) {
  struct pcidev *devs[2] = {&g->gpu, g->shm.present ? &g->shm : NULL};
  struct { struct pcidev *d; int i; } order[12];
  int n = 0;
  for (int k = 0; k < 2; k++) {
    if (!devs[k]) continue;
    if (pci_size_bars(devs[k])) return -1;
    for (int i = 0; i < 6; i++)
      if (devs[k]->bar[i].size && !devs[k]->bar[i].io) order[n].d = devs[k], order[n++].i = i;
  }
  for (int a = 0; a < n; a++) /* sort by size, largest first */
    for (int b = a + 1; b < n; b++)
      if (order[b].d->bar[order[b].i].size > order[a].d->bar[order[a].i].size) {
        __typeof__(order[0]) t = order[a];
        order[a] = order[b];
        order[b] = t;
      }
  g->mmio32_next = MMIO32_LO;
  g->mmio64_next = MMIO64_LO;
  for (int k = 0; k < n; k++)
    if (pci_place_bar(g, order[k].d, order[k].i)) return -1;
  for (int k = 0; k < 2; k++) {
    uint32_t cmd;
    if (!devs[k]) continue;
    if (cfg_r32(devs[k], 0x04, &cmd) || cfg_w16(devs[k], 0x04, (cmd & 0xffff) | 0x6)) return -1;
    if (cfg_r32(devs[k], 0x04, &cmd)) return -1;
    if ((cmd & 0x6) != 0x6) {
      seterr("%02x:%02x.%x: PCI_COMMAND reads 0x%x after enabling memory and bus mastering", devs[k]->bus,
             devs[k]->slot, devs[k]->fn, cmd & 0xffff);
      return -1;
    }
  }
  return 0;
}

static int pci_scan(struct guest *g) {
  for (int slot = 0; slot < 32; slot++) {
    for (int fn = 0; fn < 8; fn++) {
      struct pcidev d = {.bus = 0, .slot = slot, .fn = fn};
      uint32_t id, hdr;
      if (cfg_r32(&d, 0, &id)) return -1;
      if ((id & 0xffff) == 0xffff || (id & 0xffff) == 0) {
        if (fn == 0) break;
        continue;
      }
      d.present = 1;
      d.vendor = id & 0xffff;
      d.device = id >> 16;
      if (d.vendor == 0x1af4 && d.device == 0x1050 && !g->gpu.present) g->gpu = d;
      if (d.vendor == 0x1af4 && d.device == 0x1110 && !g->shm.present) g->shm = d;
      if (fn == 0) {
        if (cfg_r32(&d, 0x0c, &hdr)) return -1;
        if (!((hdr >> 16) & 0x80)) break; /* not multi-function */
      }
    }
  }
  return 0;
}

static void print_dev(const char *what, const struct pcidev *d) {
  char s[512];
  int o = snprintf(s, sizeof s, TAG " info pci %02x:%02x.%x %04x:%04x %s", d->bus, d->slot, d->fn, d->vendor,
                   d->device, what);
  for (int i = 0; i < 6; i++) {
    const struct bar *b = &d->bar[i];
    if (!b->size || b->io) continue;
    o += snprintf(s + o, sizeof s - o, " bar%d=0x%" PRIx64 "+0x%" PRIx64 "%s%s", i, b->addr, b->size,
                  b->is64 ? "/64" : "", b->pref ? "/pref" : "");
  }
  printf("%s\n", s);
}

/* ---------------------------------------------------------------- virtio-pci modern */

static int virtio_find_caps(struct guest *g) {
  struct pcidev *d = &g->gpu;
  uint32_t st;
  uint8_t p;
  int found = 0;
  if (cfg_r32(d, 0x04, &st)) return -1;
  if (!((st >> 16) & 0x10)) {
    seterr("virtio-gpu has no PCI capability list");
    return -1;
  }
  if (cfg_r8(d, 0x34, &p)) return -1;
  for (int guard = 0; p && guard < 64; guard++) {
    uint32_t w0, bar, off;
    p &= 0xfc;
    if (cfg_r32(d, p, &w0)) return -1;
    if ((w0 & 0xff) == 0x09) { /* vendor-specific: struct virtio_pci_cap */
      unsigned type = (w0 >> 24) & 0xff;
      if (cfg_r32(d, p + 4, &bar) || cfg_r32(d, p + 8, &off)) return -1;
      bar &= 0xff;
      uint64_t a = bar < 6 ? d->bar[bar].addr + off : 0;
      if (bar < 6 && d->bar[bar].size && !(found & (1 << type))) {
        if (type == VIRTIO_PCI_CAP_COMMON_CFG) g->common = a;
        if (type == VIRTIO_PCI_CAP_NOTIFY_CFG) {
          g->notify_base = a;
          if (cfg_r32(d, p + 16, &g->notify_mult)) return -1;
        }
        if (type == VIRTIO_PCI_CAP_ISR_CFG) g->isr = a;
        if (type == VIRTIO_PCI_CAP_DEVICE_CFG) g->devcfg = a;
        if (type < 32) found |= 1 << type;
      }
    }
    p = (w0 >> 8) & 0xff;
  }
  int need = 1 << VIRTIO_PCI_CAP_COMMON_CFG | 1 << VIRTIO_PCI_CAP_NOTIFY_CFG | 1 << VIRTIO_PCI_CAP_DEVICE_CFG;
  if ((found & need) != need) {
    seterr("virtio-gpu lacks modern virtio-pci capabilities (found mask 0x%x)", found);
    return -1;
  }
  return 0;
}

static int virtio_status(struct guest *g, uint8_t s) { return mw(1, g->common + CC_STATUS, s); }

static int virtio_init(struct guest *g) {
  uint64_t v, lo, hi;
  /* reset */
  if (virtio_status(g, 0)) return -1;
  double end = until(T_GPU);
  for (;;) {
    if (mr(1, g->common + CC_STATUS, &v)) return -1;
    if (!v) break;
    if (now_ms() > end) {
      seterr("virtio-gpu does not finish its reset (status 0x%" PRIx64 ")", v);
      return -1;
    }
  }
  if (virtio_status(g, VIRTIO_STATUS_ACKNOWLEDGE) || virtio_status(g, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER))
    return -1;
  if (mw(4, g->common + CC_DFSELECT, 0) || mr(4, g->common + CC_DF, &lo) || mw(4, g->common + CC_DFSELECT, 1) ||
      mr(4, g->common + CC_DF, &hi))
    return -1;
  g->dev_features = hi << 32 | (lo & 0xffffffff);
  if (!(g->dev_features >> VIRTIO_F_VERSION_1 & 1)) {
    seterr("virtio-gpu does not offer VIRTIO_F_VERSION_1 (features 0x%" PRIx64 ")", g->dev_features);
    return -1;
  }
  if (!(g->dev_features >> VIRTIO_GPU_F_RESOURCE_BLOB & 1)) {
    seterr("virtio-gpu does not offer VIRTIO_GPU_F_RESOURCE_BLOB (features 0x%" PRIx64
           "): start it with -device virtio-gpu-pci,blob=true",
           g->dev_features);
    virtio_status(g, VIRTIO_STATUS_FAILED);
    return -1;
  }
  g->drv_features = 1ull << VIRTIO_F_VERSION_1 | 1ull << VIRTIO_GPU_F_RESOURCE_BLOB;
  /* A device that insists on ACCESS_PLATFORM (iommu_platform=on) refuses drivers that do
   * not take it; with no vIOMMU programmed, addresses stay guest-physical either way. */
  g->drv_features |= g->dev_features & 1ull << VIRTIO_F_ACCESS_PLATFORM;
  if (mw(4, g->common + CC_GFSELECT, 0) || mw(4, g->common + CC_GF, (uint32_t)g->drv_features) ||
      mw(4, g->common + CC_GFSELECT, 1) || mw(4, g->common + CC_GF, g->drv_features >> 32))
    return -1;
  uint8_t st = VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK;
  if (virtio_status(g, st) || mr(1, g->common + CC_STATUS, &v)) return -1;
  if (!(v & VIRTIO_STATUS_FEATURES_OK)) {
    seterr("virtio-gpu refused features 0x%" PRIx64 " (status 0x%" PRIx64 ")", g->drv_features, v);
    return -1;
  }
  if (mw(2, g->common + CC_MSIX, VIRTIO_MSI_NO_VECTOR)) return -1;

  /* queue 0, the control queue */
  struct vring_state *q = &g->ctrlq;
  uint64_t qsz, noff;
  if (mw(2, g->common + CC_QSELECT, 0) || mr(2, g->common + CC_QSIZE, &qsz)) return -1;
  if (!qsz) {
    seterr("virtio-gpu has no queue 0");
    return -1;
  }
  if (qsz > QUEUE_MAX) {
    qsz = QUEUE_MAX;
    if (mw(2, g->common + CC_QSIZE, qsz)) return -1;
  }
  q->size = qsz;
  q->desc = RING_GPA;
  q->avail = RING_GPA + 0x1000;
  q->used = RING_GPA + 0x2000;
  q->avail_idx = q->used_idx = 0;
  if (mzero(RING_GPA, 0x3000)) return -1;
  if (mw(2, g->common + CC_QMSIX, VIRTIO_MSI_NO_VECTOR) || mw(4, g->common + CC_QDESC, (uint32_t)q->desc) ||
      mw(4, g->common + CC_QDESC + 4, q->desc >> 32) || mw(4, g->common + CC_QAVAIL, (uint32_t)q->avail) ||
      mw(4, g->common + CC_QAVAIL + 4, q->avail >> 32) || mw(4, g->common + CC_QUSED, (uint32_t)q->used) ||
      mw(4, g->common + CC_QUSED + 4, q->used >> 32) || mr(2, g->common + CC_QNOFF, &noff))
    return -1;
  q->notify = g->notify_base + noff * g->notify_mult;
  if (mw(2, g->common + CC_QENABLE, 1)) return -1;
  st |= VIRTIO_STATUS_DRIVER_OK;
  if (virtio_status(g, st) || mr(1, g->common + CC_STATUS, &v)) return -1;
  if ((v & (VIRTIO_STATUS_NEEDS_RESET | VIRTIO_STATUS_FAILED)) || !(v & VIRTIO_STATUS_DRIVER_OK)) {
    seterr("virtio-gpu status 0x%" PRIx64 " after DRIVER_OK", v);
    return -1;
  }
  return 0;
}

/* One command on the control queue, synchronously: request (device-readable) and response
 * (device-writable) descriptors 0 and 1, published in the avail ring, notified, then the
 * used index polled. Returns 0 with *type = the response's header type, or -1 when the
 * transport failed (g_err says why). */
static int gpu_cmd(struct guest *g, const uint8_t *req, size_t reqlen, uint8_t *resp, size_t resplen, uint32_t *type) {
  struct vring_state *q = &g->ctrlq;
  uint8_t desc[32] = {0};
  if (reqlen > REQ_MAX || resplen > RESP_MAX) {
    seterr("command too large (%zu bytes)", reqlen);
    return -1;
  }
  put64(desc, g->req_gpa);
  put32(desc + 8, reqlen);
  put16(desc + 12, VRING_DESC_F_NEXT);
  put16(desc + 14, 1);
  put64(desc + 16, g->resp_gpa);
  put32(desc + 24, resplen);
  put16(desc + 28, VRING_DESC_F_WRITE);
  if (mwrite(g->req_gpa, req, reqlen) || mzero(g->resp_gpa, resplen) || mwrite(q->desc, desc, sizeof desc)) return -1;
  if (mw(2, q->avail + 4 + 2 * (q->avail_idx % q->size), 0)) return -1;
  q->avail_idx++;
  if (mw(2, q->avail + 2, q->avail_idx) || mw(2, q->notify, 0)) return -1;
  /* virtio-gpu handles its control queue in a bottom half, which QEMU's main loop runs
   * between two qtest commands: polling the used index is enough. */
  double end = until(T_GPU);
  uint64_t used;
  for (unsigned polls = 0;; polls++) {
    if (mr(2, q->used + 2, &used)) return -1;
    if ((uint16_t)used != q->used_idx) break;
    if (now_ms() > end) {
      seterr("virtio-gpu did not answer command 0x%x within %.0f s", get32(req), T_GPU / 1000);
      return -1;
    }
    if (polls > 16) usleep(polls > 1000 ? 2000 : 100);
  }
  uint64_t id, len;
  uint64_t elem = q->used + 4 + 8 * (q->used_idx % q->size);
  if (mr(4, elem, &id) || mr(4, elem + 4, &len)) return -1;
  q->used_idx++;
  if (id != 0) {
    seterr("virtio-gpu returned descriptor %" PRIu64 ", not 0", id);
    return -1;
  }
  if (len < 24) {
    seterr("virtio-gpu wrote a %" PRIu64 "-byte response to command 0x%x", len, get32(req));
    return -1;
  }
  if (mread(g->resp_gpa, resp, len < resplen ? len : resplen)) return -1;
  *type = get32(resp);
  return 0;
}

static void gpu_hdr(uint8_t *b, uint32_t type) { put32(b, type); }

/* ================================================================ blobs */

struct piece {
  uint64_t gpa;
  uint32_t len;
  uint8_t bar; /* 1: in the ivshmem BAR */
};

struct arena {
  uint64_t lo;
  size_t nslots;
  uint8_t *used;
};

static int arena_take(struct arena *a, uint64_t *rng, uint32_t len, uint64_t *gpa) {
  size_t s = rng_below(rng, a->nslots), k;
  for (k = 0; k < a->nslots && a->used[s]; k++) s = (s + 1) % a->nslots;
  if (k == a->nslots) return -1;
  a->used[s] = 1;
  /* a random page offset in the slot that leaves at least one page free after the piece */
  uint64_t choices = (SLOT - PAGE - len) / PAGE + 1;
  *gpa = a->lo + s * SLOT + rng_below(rng, choices) * PAGE;
  return 0;
}

/* Cut a blob of `size` bytes into 4..64 KiB pieces, placed in random slots. */
static int blob_layout(struct guest *g, const char *kind, uint64_t size, uint64_t seed, struct piece **out, size_t *n) {
  uint64_t rng = seed;
  struct arena ram = {.lo = g->arena_lo, .nslots = (g->arena_hi - g->arena_lo) / SLOT};
  struct arena bar = {0};
  if (g->shm.present) {
    bar.lo = g->shm.bar[g->shm_bar].addr;
    bar.nslots = g->shm.bar[g->shm_bar].size / SLOT;
  }
  int use_ram = strcmp(kind, "bar") != 0, use_bar = strcmp(kind, "ram") != 0;
  if (use_bar && !bar.nslots) {
    seterr("no ivshmem BAR%d to put blob pages in (need -device ivshmem-plain or a vfio-pci ivshmem)", g->shm_bar);
    return -1;
  }
  ram.used = calloc(ram.nslots + 1, 1);
  bar.used = calloc(bar.nslots + 1, 1);
  size_t cap = size / PAGE + 1;
  struct piece *p = xmalloc(cap * sizeof *p);
  size_t k = 0;
  int rc = 0;
  for (uint64_t done = 0; done < size; k++) {
    uint32_t len = (1 + rng_below(&rng, PIECE_MAX_PAGES)) * PAGE;
    if (len > size - done) len = size - done;
    int in_bar = use_bar && (!use_ram || (k & 1));
    if (arena_take(in_bar ? &bar : &ram, &rng, len, &p[k].gpa)) {
      seterr("blob of %" PRIu64 " bytes does not fit in the %s arena (%zu slots of %llu KiB)", size,
             in_bar ? "BAR" : "RAM", in_bar ? bar.nslots : ram.nslots, SLOT / KiB);
      rc = -1;
      break;
    }
    p[k].len = len;
    p[k].bar = in_bar;
    done += len;
  }
  free(ram.used);
  free(bar.used);
  if (rc) {
    free(p);
    return -1;
  }
  *out = p;
  *n = k;
  return 0;
}

static void render(uint8_t *img, uint64_t size, uint32_t w, uint32_t h, uint32_t frame, uint32_t res) {
  memset(img, 0, size);
  for (uint32_t y = 0; y < h; y++)
    for (uint32_t x = 0; x < w; x++) {
      uint32_t v = pixel(x, y, frame, res);
      uint8_t *p = img + ((uint64_t)y * w + x) * 4;
      p[0] = v; /* B8G8R8X8: bytes B, G, R, X */
      p[1] = v >> 8;
      p[2] = v >> 16;
      p[3] = 0xff;
    }
}

/* Compare a PPM screendump with frame `frame`. 0: match; 1: differs (desc set, and
 * *wrong the number of wrong pixels); -1: error. */
static int check_dump(struct guest *g, const char *path, uint32_t frame, uint32_t res, char *desc, size_t desclen,
                      uint64_t *wrong_out) {
  FILE *f = fopen(path, "rb");
  *wrong_out = 0;
  if (!f) {
    seterr("cannot open the screendump %s: %s", path, strerror(errno));
    return -1;
  }
  int w, h, maxv;
  if (fscanf(f, "P6 %d %d %d", &w, &h, &maxv) != 3 || maxv != 255 || fgetc(f) == EOF) {
    fclose(f);
    seterr("the screendump is not a P6 PPM");
    return -1;
  }
  if ((uint32_t)w != g->width || (uint32_t)h != g->height) {
    fclose(f);
    snprintf(desc, desclen, "frame=%u size=%dx%d want=%ux%u", frame, w, h, g->width, g->height);
    *wrong_out = (uint64_t)g->width * g->height;
    return 1;
  }
  size_t n = (size_t)w * h * 3;
  uint8_t *px = xmalloc(n);
  size_t got = fread(px, 1, n, f);
  fclose(f);
  if (got != n) {
    free(px);
    seterr("the screendump is short (%zu of %zu bytes)", got, n);
    return -1;
  }
  uint64_t wrong = 0;
  uint32_t fx = 0, fy = 0, fgot = 0, fwant = 0;
  for (uint32_t y = 0; y < (uint32_t)h; y++)
    for (uint32_t x = 0; x < (uint32_t)w; x++) {
      const uint8_t *p = px + ((size_t)y * w + x) * 3;
      uint32_t v = (uint32_t)p[0] << 16 | p[1] << 8 | p[2];
      uint32_t want = pixel(x, y, frame, res);
      if (v != want && !wrong++) fx = x, fy = y, fgot = v, fwant = want;
    }
  free(px);
  *wrong_out = wrong;
  if (!wrong) return 0;
  snprintf(desc, desclen, "frame=%u wrong=%" PRIu64 "/%u first=(%u,%u) got=#%06x want=#%06x", frame, wrong,
           g->width * g->height, fx, fy, fgot, fwant);
  return 1;
}

/* How QEMU mapped resource `res`, from its trace log (-D), if it has the events. */
static const char *trace_map(uint32_t res) {
  static char out[160];
  if (!g_q->trace_path) return NULL;
  FILE *f = fopen(g_q->trace_path, "r");
  if (!f) return NULL;
  char pat_map[64], pat_fail[64], pat_copy[64], line[2048];
  snprintf(pat_map, sizeof pat_map, "virtio_gpu_iovmap_map res 0x%x,", res);
  snprintf(pat_fail, sizeof pat_fail, "virtio_gpu_iovmap_map_failed res 0x%x,", res);
  snprintf(pat_copy, sizeof pat_copy, "virtio_gpu_blob_copy_init res 0x%x,", res);
  out[0] = 0;
  while (fgets(line, sizeof line, f)) {
    char *m;
    if ((m = strstr(line, pat_map))) {
      char *r = strstr(m, "runs ");
      snprintf(out, sizeof out, "iovmap%s%.*s", r ? ",runs=" : "", r ? (int)strcspn(r + 5, ",\n") : 0, r ? r + 5 : "");
    } else if (strstr(line, pat_copy)) {
      snprintf(out, sizeof out, "copy");
    } else if (strstr(line, pat_fail) && !out[0]) {
      snprintf(out, sizeof out, "iovmap-failed");
    }
  }
  fclose(f);
  return out[0] ? out : "none";
}

struct result {
  int ok;
  char line[1024];
};

static const char *resp_name(uint32_t t) {
  switch (t) {
  case 0x1200: return "ERR_UNSPEC";
  case 0x1201: return "ERR_OUT_OF_MEMORY";
  case 0x1202: return "ERR_INVALID_SCANOUT_ID";
  case 0x1203: return "ERR_INVALID_RESOURCE_ID";
  case 0x1204: return "ERR_INVALID_CONTEXT_ID";
  case 0x1205: return "ERR_INVALID_PARAMETER";
  default: return "?";
  }
}

/* Send a command that answers OK_NODATA; on failure describe it in `err`. */
static int gpu_simple(struct guest *g, const char *step, const uint8_t *req, size_t len, char *err, size_t errlen) {
  uint8_t resp[24];
  uint32_t type;
  if (gpu_cmd(g, req, len, resp, sizeof resp, &type)) {
    snprintf(err, errlen, "result=error step=%s reason=\"%.400s\"", step, g_err);
    return -1;
  }
  if (type != GPU_RESP_OK_NODATA) {
    snprintf(err, errlen, "result=error step=%s resp=0x%x err=%s", step, type, resp_name(type));
    return -1;
  }
  return 0;
}

static int blob_create(struct guest *g, uint32_t res, const struct piece *p, size_t n, uint64_t size, char *err,
                       size_t errlen) {
  /* RESOURCE_CREATE_BLOB with the entries after the struct */
  size_t reqlen = 56 + 16 * n;
  uint8_t *req = calloc(1, reqlen);
  if (!req) {
    fprintf(stderr, "gpu-qtest: out of memory\n");
    exit(1);
  }
  gpu_hdr(req, GPU_CMD_RESOURCE_CREATE_BLOB);
  put32(req + 24, res);
  put32(req + 28, GPU_BLOB_MEM_GUEST);
  put32(req + 32, GPU_BLOB_FLAG_USE_SHAREABLE);
  put32(req + 36, n);
  put64(req + 40, 0);
  put64(req + 48, size);
  for (size_t i = 0; i < n; i++) {
    put64(req + 56 + 16 * i, p[i].gpa);
    put32(req + 64 + 16 * i, p[i].len);
  }
  int rc = gpu_simple(g, "RESOURCE_CREATE_BLOB", req, reqlen, err, errlen);
  free(req);
  return rc;
}

/* SET_SCANOUT_BLOB: scanout 0, the whole picture */
static int blob_scanout(struct guest *g, uint32_t res, char *err, size_t errlen) {
  uint8_t req[96] = {0};
  gpu_hdr(req, GPU_CMD_SET_SCANOUT_BLOB);
  put32(req + 24, 0); /* r.x, r.y, r.width, r.height */
  put32(req + 28, 0);
  put32(req + 32, g->width);
  put32(req + 36, g->height);
  put32(req + 40, 0); /* scanout_id */
  put32(req + 44, res);
  put32(req + 48, g->width);
  put32(req + 52, g->height);
  put32(req + 56, GPU_FORMAT_B8G8R8X8_UNORM);
  put32(req + 64, g->width * 4); /* strides[0]; offsets[0] = 0 */
  return gpu_simple(g, "SET_SCANOUT_BLOB", req, sizeof req, err, errlen);
}

/* Draw frame `frame` into the blob's pages (img: a buffer of `size` bytes), then
 * RESOURCE_FLUSH. */
static int blob_draw(struct guest *g, uint32_t res, const struct piece *p, size_t n, uint8_t *img, uint64_t size,
                     uint32_t frame, char *err, size_t errlen) {
  render(img, size, g->width, g->height, frame, res);
  uint64_t off = 0;
  for (size_t i = 0; i < n; i++) {
    if (mwrite(p[i].gpa, img + off, p[i].len)) {
      snprintf(err, errlen, "result=error step=draw frame=%u reason=\"%.400s\"", frame, g_err);
      return -1;
    }
    off += p[i].len;
  }
  uint8_t fl[48] = {0};
  gpu_hdr(fl, GPU_CMD_RESOURCE_FLUSH);
  put32(fl + 32, g->width);
  put32(fl + 36, g->height);
  put32(fl + 40, res);
  return gpu_simple(g, "RESOURCE_FLUSH", fl, sizeof fl, err, errlen);
}

/* A screendump of g_q checked against frame `frame`. 0: match; 1: differs (out says how,
 * *wrong how many pixels; the dump is kept as DIR/<keep>.ppm); -1: error (out says). */
static int blob_check(struct guest *g, uint32_t res, uint32_t frame, const char *keep, uint64_t *wrong, char *out,
                      size_t outlen) {
  char json[9000], esc[8500];
  const char *dump = g_q->dump_path;
  *wrong = 0;
  json_escape(esc, sizeof esc, dump);
  snprintf(json, sizeof json, "{\"execute\":\"screendump\",\"arguments\":{\"filename\":\"%s\"}}", esc);
  unlink(dump);
  if (!qmp_cmd(json, T_QMP)) {
    snprintf(out, outlen, "result=error step=screendump frame=%u reason=\"%.400s\"", frame, g_err);
    return -1;
  }
  char desc[300];
  int c = check_dump(g, dump, frame, res, desc, sizeof desc, wrong);
  if (c < 0) {
    snprintf(out, outlen, "result=error step=check frame=%u reason=\"%.400s\"", frame, g_err);
    return -1;
  }
  if (c > 0) {
    char kept[4400];
    snprintf(kept, sizeof kept, "%s/%s.ppm", g_dir, keep);
    rename(dump, kept);
    snprintf(out, outlen, "result=differ %s dump=%.300s", desc, kept);
    return 1;
  }
  return 0;
}

static void run_blob(struct guest *g, const char *kind, uint32_t res, struct result *r) {
  double t0 = now_ms();
  uint64_t img_bytes = (uint64_t)g->width * g->height * 4;
  uint64_t size = (img_bytes + PAGE - 1) / PAGE * PAGE;
  struct piece *p = NULL;
  size_t n = 0;
  char head[256], tail[768] = "", map[200] = "";
  uint64_t seed = g->seed ^ (uint64_t)res * 0x9e3779b97f4a7c15ull ^ (uint64_t)kind[0] << 56;
  int created = 0, scanned = 0, frames = 0;
  uint8_t *img = NULL;

  snprintf(head, sizeof head, "blob=%s res=%u", kind, res);
  r->ok = 0;
  if (g_q->qt.dead) {
    snprintf(r->line, sizeof r->line, TAG " %s result=error step=skipped reason=\"qtest broke earlier: %.400s\"", head,
             g_err);
    return;
  }
  if (blob_layout(g, kind, size, seed, &p, &n)) {
    snprintf(r->line, sizeof r->line, TAG " %s result=error step=layout reason=\"%.400s\"", head, g_err);
    return;
  }
  size_t nbar = 0;
  for (size_t i = 0; i < n; i++) nbar += p[i].bar;
  if (nbar && nbar != n)
    snprintf(head, sizeof head, "blob=%s res=%u entries=%zu bar_entries=%zu bytes=%" PRIu64, kind, res, n, nbar, size);
  else
    snprintf(head, sizeof head, "blob=%s res=%u entries=%zu bytes=%" PRIu64, kind, res, n, size);
  if (n > GPU_MAX_ENTRIES || 56 + 16 * n > REQ_MAX) {
    snprintf(tail, sizeof tail, "result=error step=layout reason=\"%zu entries, more than a command holds\"", n);
    goto out;
  }

  if (blob_create(g, res, p, n, size, tail, sizeof tail)) goto out;
  created = 1;
  const char *m = trace_map(res);
  if (m) snprintf(map, sizeof map, " map=%s", m);
  if (blob_scanout(g, res, tail, sizeof tail)) goto out;
  scanned = 1;
  if ((m = trace_map(res))) snprintf(map, sizeof map, " map=%s", m);

  img = xmalloc(size);
  for (uint32_t frame = 1; frame <= 2; frame++) {
    if (blob_draw(g, res, p, n, img, size, frame, tail, sizeof tail)) goto out;
    char keep[64];
    uint64_t wrong;
    snprintf(keep, sizeof keep, "%s-frame%u", kind, frame);
    if (blob_check(g, res, frame, keep, &wrong, tail, sizeof tail)) goto out;
    frames++;
  }
  r->ok = 1;
  snprintf(tail, sizeof tail, "result=match frames=%d", frames);

out:;
  /* take the blob off the scanout and drop it; report the first thing that failed */
  char cleanup[512] = "", unref_err[512] = "";
  if (scanned && !g_q->qt.dead) {
    uint8_t ss[48] = {0};
    gpu_hdr(ss, GPU_CMD_SET_SCANOUT); /* scanout 0, resource 0: disable */
    if (gpu_simple(g, "SET_SCANOUT", ss, sizeof ss, cleanup, sizeof cleanup)) r->ok = 0;
  }
  if (created && !g_q->qt.dead) {
    uint8_t un[32] = {0};
    gpu_hdr(un, GPU_CMD_RESOURCE_UNREF);
    put32(un + 24, res);
    if (gpu_simple(g, "RESOURCE_UNREF", un, sizeof un, unref_err, sizeof unref_err)) r->ok = 0;
    if (!cleanup[0]) memcpy(cleanup, unref_err, sizeof cleanup);
  }
  if (cleanup[0] && !strncmp(tail, "result=match", 12)) snprintf(tail, sizeof tail, "%s", cleanup);
  snprintf(r->line, sizeof r->line, TAG " %s%s %s time=%.2fs", head, map, tail, (now_ms() - t0) / 1000);
  free(img);
  free(p);
}

/* ================================================================ postcopy migration */

#define T_MIGRATE 120000.0

/* Start QEMU `q` (its paths set): listen on its qtest socket, run it, take the qtest
 * connection and then QMP. -1: it did not start; -2: no QMP (g_err says why). */
static int qemu_start(struct qemu *q, char **argv, int n, char **env, int nenv) {
  unlink(q->qtest_path);
  unlink(q->qmp_path);
  if (strlen(q->qtest_path) >= sizeof(((struct sockaddr_un *)0)->sun_path)) {
    seterr("--workdir path too long for a unix socket: %s", q->qtest_path);
    return -1;
  }
  /* qtest: this program listens, QEMU connects (as libqtest does) */
  int ls = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  struct sockaddr_un sun = {.sun_family = AF_UNIX};
  strcpy(sun.sun_path, q->qtest_path);
  if (ls < 0 || bind(ls, (struct sockaddr *)&sun, sizeof sun) || listen(ls, 1)) {
    seterr("qtest socket %s: %s", q->qtest_path, strerror(errno));
    if (ls >= 0) close(ls);
    return -1;
  }
  if (spawn_qemu(q, argv, n, env, nenv)) {
    close(ls);
    return -1;
  }
  double end = until(T_START);
  for (;;) {
    struct pollfd pf = {ls, POLLIN, 0};
    if (poll(&pf, 1, 50) > 0) {
      q->qt.fd = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
      if (q->qt.fd >= 0) break;
    }
    if (qemu_gone(q)) {
      seterr("%s exited (%s) before it connected to qtest: %s", q->name, qemu_status_str(q), qemu_stderr_tail(q));
      close(ls);
      return -1;
    }
    if (now_ms() > end) {
      seterr("%s did not connect to qtest within %.0f s", q->name, (end - g_t0) / 1000);
      close(ls);
      return -1;
    }
  }
  close(ls);
  unlink(q->qtest_path);
  struct qemu *was = g_q;
  g_q = q;
  int ok = qt("endianness") != NULL;
  g_q = was;
  if (!ok) return -1;
  return qmp_connect(q) ? -2 : 0;
}

/* query-migrate on q: its status (and error-desc, if any); -1 when QMP failed. */
static int mig_status(struct qemu *q, char *st, size_t stcap, char *desc, size_t dcap) {
  char *r = qmp_on(q, "{\"execute\":\"query-migrate\"}", T_QMP);
  if (!r) return -1;
  if (json_str(r, "status", st, stcap)) snprintf(st, stcap, "none");
  json_str(r, "error-desc", desc, dcap);
  return 0;
}

/* A migration in this state will not complete by itself. */
static int mig_stuck(const char *st) {
  return !strcmp(st, "failed") || !strcmp(st, "cancelled") || !strncmp(st, "postcopy-paused", 15) ||
         !strncmp(st, "postcopy-recover", 16);
}

/* A value for the result line, what(text), the text kept on one line. */
static void field(char *out, size_t cap, const char *what, const char *text) {
  char t[600];
  snprintf(t, sizeof t, "%s", text);
  for (char *p = t; *p; p++)
    if (*p == '\n' || *p == '\r' || *p == '\t') *p = ' ';
  snprintf(out, cap, "%s(%s)", what, t);
}

/* Why a migration stopped: the destination's error-desc or else the first error it
 * printed (postcopy mostly breaks there, and the source then only sees the connection
 * go), else the source's. */
static const char *mig_why(const char *src_desc, const char *dst_desc) {
  if (dst_desc && *dst_desc) return dst_desc;
  const char *e = qemu_stderr_error(&g_dst);
  if (*e) return e;
  if (src_desc && *src_desc) return src_desc;
  e = qemu_stderr_error(&g_src);
  return *e ? e : "no error-desc";
}

/* How a blob_check went, for the result line. */
static void check_field(char *out, size_t cap, int rc, uint64_t wrong, const struct guest *g, const char *err) {
  if (rc == 0)
    snprintf(out, cap, "match");
  else if (rc > 0) {
    char w[64];
    snprintf(w, sizeof w, "wrong=%" PRIu64 "/%u", wrong, g->width * g->height);
    field(out, cap, "differ", w);
  } else
    field(out, cap, "error", strncmp(err, "result=error ", 13) ? err : err + 13);
}

struct hvas {
  uint64_t *v;
  size_t n, cap;
};

static int cmp_u64(const void *a, const void *b) {
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return x < y ? -1 : x > y;
}

/* From the destination's trace log: how virtio-gpu mapped resource `res`
 * (virtio_gpu_blob_mapping: patched QEMU only), and `late`: the distinct HVAs the fault
 * thread asked the source for on behalf of the thread that resolved the blob's pages,
 * between its virtio_gpu_iovmap_resolve_start and virtio_gpu_iovmap_resolve lines, with
 * the bytes that resolve reported. -1 for late and resolved when those events are absent
 * (stock QEMU), resolved -1 also when a resolve never returned.
 * Lines are `TID@SECS:event args` (-msg timestamp=on). */
static void trace_postcopy(const char *path, uint32_t res, char *mapping, size_t mcap, long *late, long long *resolved,
                           int *resolve_ret) {
  snprintf(mapping, mcap, "unknown");
  *late = -1;
  *resolved = -1;
  *resolve_ret = 0;
  FILE *f = path ? fopen(path, "r") : NULL;
  if (!f) return;
  char pat_map[64], pat_res[32], line[4096];
  snprintf(pat_map, sizeof pat_map, "virtio_gpu_blob_mapping res 0x%x, ", res);
  snprintf(pat_res, sizeof pat_res, "res 0x%x,", res);
  static const char EV_START[] = "virtio_gpu_iovmap_resolve_start", EV_DONE[] = "virtio_gpu_iovmap_resolve",
                    EV_REQ[] = "postcopy_ram_fault_thread_request";
  struct hvas h = {0};
  unsigned long waiting = 0;
  int found = 0, ended = 0;
  long long bytes_sum = 0;
  while (fgets(line, sizeof line, f)) {
    char *m = strstr(line, pat_map);
    if (m) {
      m += strlen(pat_map);
      snprintf(mapping, mcap, "%.*s", (int)strcspn(m, " ,\r\n"), m);
    }
    char *at;
    unsigned long tid = strtoul(line, &at, 10);
    if (at == line || *at != '@') continue;
    char *ev = strchr(at, ':');
    if (!ev) continue;
    ev++;
    size_t el = strcspn(ev, " \r\n");
    char *args = ev + el + (ev[el] == ' ');
    if (el == strlen(EV_START) && !strncmp(ev, EV_START, el) && !strncmp(args, pat_res, strlen(pat_res))) {
      waiting = tid;
      found = 1;
    } else if (el == strlen(EV_DONE) && !strncmp(ev, EV_DONE, el) && waiting == tid &&
               !strncmp(args, pat_res, strlen(pat_res))) {
      char *b = strstr(args, "bytes "), *r = strstr(args, "ret ");
      if (b) bytes_sum += strtoll(b + 6, NULL, 10);
      if (r && atoi(r + 4)) *resolve_ret = atoi(r + 4);
      waiting = 0;
      ended = 1;
    } else if (el == strlen(EV_REQ) && !strncmp(ev, EV_REQ, el) && waiting) {
      char *hv = strstr(args, "HVA=0x"), *pid = strstr(args, "pid=");
      if (hv && pid && strtoul(pid + 4, NULL, 10) == waiting) {
        if (h.n == h.cap) {
          h.cap = h.cap ? 2 * h.cap : 1024;
          h.v = realloc(h.v, h.cap * sizeof *h.v);
          if (!h.v) {
            fprintf(stderr, "gpu-qtest: out of memory\n");
            exit(1);
          }
        }
        h.v[h.n++] = strtoull(hv + 6, NULL, 16);
      }
    }
  }
  fclose(f);
  if (found) {
    qsort(h.v, h.n, sizeof *h.v, cmp_u64);
    long distinct = 0;
    for (size_t i = 0; i < h.n; i++)
      if (!i || h.v[i] != h.v[i - 1]) distinct++;
    *late = distinct;
    *resolved = ended && !waiting ? bytes_sum : -1; /* -1: a resolve that never returned */
  }
  free(h.v);
}

/* Frame 1 on this QEMU, postcopy migration to a second one, frame 1 and then frame 2 on
 * that one; one result line. Returns the exit status. */
static int run_postcopy(struct guest *g, char **qargv, int nq) {
  const char *kind = "ram";
  uint32_t res = 1;
  uint64_t img_bytes = (uint64_t)g->width * g->height * 4;
  uint64_t size = (img_bytes + PAGE - 1) / PAGE * PAGE;
  uint64_t seed = g->seed ^ (uint64_t)res * 0x9e3779b97f4a7c15ull ^ (uint64_t)kind[0] << 56;
  struct piece *p = NULL;
  size_t n = 0;
  char head[256], err[768], src_f[700] = "not-run", d1_f[700] = "not-run", d2_f[700] = "not-run",
                            mig_f[800] = "not-started", mapping[64] = "unknown";
  int src_rc = -1, d1_rc = -1, d2_rc = -1, completed = 0;
  long late = -1;
  long long resolved = -1;
  int resolve_ret = 0;
  uint8_t *img = NULL;
  uint64_t wrong;
  char **dargv = NULL, *dst_trace = NULL;
  char sock[4300], esc[8700], json[9400];

  snprintf(head, sizeof head, "blob=%s res=%u", kind, res);
  if (blob_layout(g, kind, size, seed, &p, &n)) {
    field(src_f, sizeof src_f, "error", g_err);
    goto report;
  }
  snprintf(head, sizeof head, "blob=%s res=%u entries=%zu bytes=%" PRIu64, kind, res, n, size);
  if (n > GPU_MAX_ENTRIES || 56 + 16 * n > REQ_MAX) {
    field(src_f, sizeof src_f, "error", "step=layout: more entries than a command holds");
    goto report;
  }

  /* 1. the blob, scanned out, frame 1 on the source */
  img = xmalloc(size);
  if (blob_create(g, res, p, n, size, err, sizeof err) || blob_scanout(g, res, err, sizeof err) ||
      blob_draw(g, res, p, n, img, size, 1, err, sizeof err)) {
    check_field(src_f, sizeof src_f, -1, 0, g, err);
    goto report;
  }
  src_rc = blob_check(g, res, 1, "src-frame1", &wrong, err, sizeof err);
  check_field(src_f, sizeof src_f, src_rc, wrong, g, err);
  if (src_rc) printf(TAG " info source frame 1: %s\n", err);
  if (src_rc < 0) goto report;

  /* 2. the destination: the same QEMU and arguments, -incoming defer, its trace in
   * FILE.dst, timestamps with thread ids, and the fault thread's requests traced */
  dargv = xmalloc(sizeof *dargv * (nq + 8));
  int dn = 0;
  for (int i = 0; i < nq; i++) {
    dargv[dn++] = qargv[i];
    if (!strcmp(qargv[i], "-D") && i + 1 < nq) {
      size_t l = strlen(qargv[i + 1]) + 5;
      dst_trace = xmalloc(l);
      snprintf(dst_trace, l, "%s.dst", qargv[i + 1]);
      dargv[dn++] = dst_trace;
      i++;
    }
  }
  const char *more[] = {"-incoming", "defer", "-msg", "timestamp=on", "-trace", "postcopy_ram_fault_thread_request"};
  for (size_t i = 0; i < sizeof more / sizeof *more; i++) dargv[dn++] = (char *)more[i];
  dargv[dn] = NULL;
  if (dst_trace) unlink(dst_trace);
  qemu_paths(&g_dst, "dst-");
  double t_dst = now_ms();
  int sr = qemu_start(&g_dst, dargv, dn, g_dst_env, g_ndst_env);
  if (sr) {
    field(mig_f, sizeof mig_f, "failed", g_err);
    printf(TAG " info the destination did not start: %s\n", g_err);
    goto report;
  }
  printf(TAG " info destination up in %.0f ms, waiting for migration on %s/migration.sock\n", now_ms() - t_dst, g_dir);

  /* 3. postcopy: precopy held back (1 MiB/s, 1 ms downtime: it cannot converge), the
   * switch at once, background pages at 256 KiB/s: the blob's pages are still on the
   * source when the destination's virtio-gpu loads and maps the blob */
  snprintf(sock, sizeof sock, "unix:%s/migration.sock", g_dir);
  unlink(sock + 5);
  json_escape(esc, sizeof esc, sock);
  static const char CAPS[] = "{\"execute\":\"migrate-set-capabilities\",\"arguments\":{\"capabilities\":"
                             "[{\"capability\":\"postcopy-ram\",\"state\":true}]}}";
  const char *step = "destination migrate-set-capabilities";
  if (!qmp_on(&g_dst, CAPS, T_QMP)) goto qmp_failed;
  step = "destination migrate-incoming";
  snprintf(json, sizeof json, "{\"execute\":\"migrate-incoming\",\"arguments\":{\"uri\":\"%s\"}}", esc);
  if (!qmp_on(&g_dst, json, T_QMP)) goto qmp_failed;
  step = "source migrate-set-capabilities";
  if (!qmp_on(&g_src, CAPS, T_QMP)) goto qmp_failed;
  step = "source migrate-set-parameters";
  if (!qmp_on(&g_src,
              "{\"execute\":\"migrate-set-parameters\",\"arguments\":{\"max-bandwidth\":1048576,"
              "\"downtime-limit\":1,\"max-postcopy-bandwidth\":262144}}",
              T_QMP))
    goto qmp_failed;
  step = "source migrate";
  snprintf(json, sizeof json, "{\"execute\":\"migrate\",\"arguments\":{\"uri\":\"%s\"}}", esc);
  double t_mig = now_ms();
  if (!qmp_on(&g_src, json, T_QMP)) goto qmp_failed;
  step = "source migrate-start-postcopy";
  if (!qmp_on(&g_src, "{\"execute\":\"migrate-start-postcopy\"}", T_QMP)) goto qmp_failed;

  char st[64] = "none", desc[512] = "";
  double end = until(T_MIGRATE);
  for (;;) {
    step = "source query-migrate";
    if (mig_status(&g_src, st, sizeof st, desc, sizeof desc)) goto qmp_failed;
    if (!strcmp(st, "postcopy-active") || !strcmp(st, "completed")) break;
    if (mig_stuck(st)) {
      char t[1200];
      snprintf(t, sizeof t, "source %s: %s", st, mig_why(desc, NULL));
      field(mig_f, sizeof mig_f, "failed", t);
      goto after;
    }
    if (qemu_gone(&g_dst)) goto dst_died;
    if (now_ms() > end) {
      char t[200];
      snprintf(t, sizeof t, "source still '%s', not postcopy-active, after %.0f s", st, (now_ms() - t_mig) / 1000);
      field(mig_f, sizeof mig_f, "failed", t);
      goto after;
    }
    usleep(20000);
  }
  double t_pc = now_ms();
  char rs[64] = "";
  for (;;) {
    step = "destination query-status";
    char *r = qmp_on(&g_dst, "{\"execute\":\"query-status\"}", T_QMP);
    if (!r) goto qmp_failed;
    json_str(r, "status", rs, sizeof rs);
    if (!strcmp(rs, "running")) break;
    if (qemu_gone(&g_dst)) goto dst_died;
    if (now_ms() > end) {
      char t[200];
      snprintf(t, sizeof t, "the destination is still '%s', not running, %.0f s after the switch", rs,
               (now_ms() - t_pc) / 1000);
      field(mig_f, sizeof mig_f, "failed", t);
      goto after;
    }
    usleep(20000);
  }
  printf(TAG " info source %s %.2f s after migrate, destination running %.2f s after that\n", st,
         (t_pc - t_mig) / 1000, (now_ms() - t_pc) / 1000);
  snprintf(mig_f, sizeof mig_f, "postcopy-active");

  /* 4. on the destination: frame 1 as migrated, then frame 2 drawn there. The virtqueue
   * and the BAR placement migrated with the device: struct guest carries on as it is. */
  g_q = &g_dst;
  d1_rc = blob_check(g, res, 1, "dst-frame1", &wrong, err, sizeof err);
  check_field(d1_f, sizeof d1_f, d1_rc, wrong, g, err);
  if (d1_rc) printf(TAG " info destination frame 1: %s\n", err);
  if (!qmp_on(&g_src, "{\"execute\":\"migrate-set-parameters\",\"arguments\":{\"max-postcopy-bandwidth\":0}}",
              T_QMP))
    printf(TAG " info source max-postcopy-bandwidth 0: %s\n", g_err);
  /* a migration that has already stopped leaves the pages it did not bring as holes that
   * nobody fills: the qtest writes of frame 2 would wait on them until a deadline */
  char ds0[64] = "";
  if ((!mig_status(&g_dst, ds0, sizeof ds0, desc, sizeof desc) && mig_stuck(ds0)) ||
      (!mig_status(&g_src, st, sizeof st, desc, sizeof desc) && mig_stuck(st))) {
    char t[100];
    snprintf(t, sizeof t, "migration %s", mig_stuck(ds0) ? ds0 : st);
    field(d2_f, sizeof d2_f, "skipped", t);
  } else if (blob_draw(g, res, p, n, img, size, 2, err, sizeof err)) {
    check_field(d2_f, sizeof d2_f, -1, 0, g, err);
    printf(TAG " info destination frame 2: %s\n", err);
  } else {
    d2_rc = blob_check(g, res, 2, "dst-frame2", &wrong, err, sizeof err);
    check_field(d2_f, sizeof d2_f, d2_rc, wrong, g, err);
    if (d2_rc) printf(TAG " info destination frame 2: %s\n", err);
  }

  /* 5. both sides completed */
  {
    char ds[64] = "", ddesc[512] = "";
    int src_ok = !g_src.qmp.dead, dst_ok = !g_dst.qmp.dead;
    end = until(T_MIGRATE);
    for (;;) {
      if (qemu_gone(&g_dst)) goto dst_died;
      if (src_ok && mig_status(&g_src, st, sizeof st, desc, sizeof desc)) {
        src_ok = 0;
        snprintf(st, sizeof st, "unknown");
        desc[0] = 0;
        printf(TAG " info source query-migrate: %s\n", g_err);
      }
      if (dst_ok && mig_status(&g_dst, ds, sizeof ds, ddesc, sizeof ddesc)) {
        dst_ok = 0;
        snprintf(ds, sizeof ds, "unknown");
        ddesc[0] = 0;
        printf(TAG " info destination query-migrate: %s\n", g_err);
      }
      if (!strcmp(st, "completed") && !strcmp(ds, "completed")) {
        completed = 1;
        snprintf(mig_f, sizeof mig_f, "completed");
        printf(TAG " info migration completed %.2f s after migrate\n", (now_ms() - t_mig) / 1000);
        break;
      }
      int timed_out = now_ms() > end && !mig_stuck(st) && !mig_stuck(ds);
      if (mig_stuck(st) || mig_stuck(ds) || (!src_ok && !dst_ok) || timed_out) {
        char t[1400];
        snprintf(t, sizeof t, "%ssource %s, destination %s: %s", timed_out ? "timed out, " : "", st, ds,
                 mig_why(desc, ddesc));
        field(mig_f, sizeof mig_f, "failed", t);
        /* what the destination said about it */
        const char *tail = qemu_stderr_tail(&g_dst);
        if (*tail) printf(TAG " info destination stderr: %s\n", tail);
        break;
      }
      usleep(100000);
    }
  }
  goto after;

qmp_failed:;
  {
    char t[900];
    snprintf(t, sizeof t, "%s: %.800s", step, g_err);
    field(mig_f, sizeof mig_f, "failed", t);
  }
  goto after;
dst_died:;
  {
    char t[1200];
    snprintf(t, sizeof t, "destination QEMU exited (%s): %s", qemu_status_str(&g_dst), qemu_stderr_tail(&g_dst));
    field(mig_f, sizeof mig_f, "failed", t);
    printf(TAG " info %s\n", t);
  }

after:
  /* 6. what the destination's trace says */
  trace_postcopy(dst_trace, res, mapping, sizeof mapping, &late, &resolved, &resolve_ret);

report:;
  /* 7. the line */
  char extra[64] = "";
  if (resolve_ret) snprintf(extra, sizeof extra, " resolve_ret=%d", resolve_ret);
  printf(TAG " migrate=postcopy %s source=%s dest1=%s dest2=%s migration=%s mapping=%s late=%ld resolved=%lld%s "
             "time=%.1fs\n",
         head, src_f, d1_f, d2_f, mig_f, mapping, late, resolved, extra, (now_ms() - g_t0) / 1000);
  free(img);
  free(p);
  free(dargv);
  free(dst_trace);
  qemu_kill();
  return src_rc == 0 && d1_rc == 0 && d2_rc == 0 && completed ? 0 : 1;
}

/* ================================================================ main */

static void usage(void) {
  fprintf(stderr,
          "usage: gpu-qtest --workdir DIR [--size WxH] [--blob ram|bar|mixed]... [--timeout S] [--seed N]\n"
          "                 [--migrate postcopy [--dst-env NAME=VALUE]...] -- QEMU_BINARY QEMU_ARGS...\n"
          "QEMU_ARGS: machine, memory backends, -device virtio-gpu-pci,blob=true[,xres=,yres=],\n"
          "an ivshmem device (ivshmem-plain or vfio-pci) for bar/mixed, -nodefaults, -L paths.\n"
          "--migrate postcopy: one ram blob, migrated with postcopy to a second QEMU (no ivshmem/vfio).\n");
  exit(2);
}

static const char *g_blobs[16];
static int g_nblobs;
static int g_migrate; /* --migrate postcopy */

static void fail_all(const char *step) {
  printf(TAG " error step=%s reason=\"%s\"\n", step, g_err);
  if (g_migrate) {
    char t[4400], f[700];
    snprintf(t, sizeof t, "step=%s: %s", step, g_err);
    field(f, sizeof f, "error", t);
    printf(TAG " migrate=postcopy blob=ram res=1 source=%s dest1=not-run dest2=not-run migration=not-started "
               "mapping=unknown late=-1 resolved=-1 time=%.1fs\n",
           f, (now_ms() - g_t0) / 1000);
    qemu_kill();
    exit(1);
  }
  for (int i = 0; i < g_nblobs; i++) printf(TAG " blob=%s result=error step=%s\n", g_blobs[i], step);
  printf(TAG " done ok=0 failed=%d time=%.2fs\n", g_nblobs ? g_nblobs : 1, (now_ms() - g_t0) / 1000);
  qemu_kill();
  exit(1);
}

static int mkdir_p(const char *path) {
  char tmp[4096];
  snprintf(tmp, sizeof tmp, "%s", path);
  for (char *p = tmp + 1; *p; p++)
    if (*p == '/') {
      *p = 0;
      mkdir(tmp, 0755);
      *p = '/';
    }
  return mkdir(tmp, 0755) && errno != EEXIST ? -1 : 0;
}

int main(int argc, char **argv) {
  const char *dir = NULL;
  uint32_t width = 0, height = 0;
  double timeout_s = 120;
  uint64_t seed = 0x6770752d71746573ull;
  int i;
  g_t0 = now_ms();
  setvbuf(stdout, NULL, _IOLBF, 0);
  for (i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (!strcmp(a, "--")) {
      i++;
      break;
    }
    if (i + 1 >= argc) usage();
    if (!strcmp(a, "--workdir")) {
      dir = argv[++i];
    } else if (!strcmp(a, "--size")) {
      if (sscanf(argv[++i], "%ux%u", &width, &height) != 2 || !width || !height || width > 16384 || height > 16384)
        usage();
    } else if (!strcmp(a, "--blob")) {
      const char *k = argv[++i];
      if ((strcmp(k, "ram") && strcmp(k, "bar") && strcmp(k, "mixed")) || g_nblobs == 16) usage();
      g_blobs[g_nblobs++] = k;
    } else if (!strcmp(a, "--timeout")) {
      timeout_s = atof(argv[++i]);
      if (timeout_s <= 0) usage();
    } else if (!strcmp(a, "--seed")) {
      seed = strtoull(argv[++i], NULL, 0);
    } else if (!strcmp(a, "--migrate")) {
      if (strcmp(argv[++i], "postcopy")) usage();
      g_migrate = 1;
    } else if (!strcmp(a, "--dst-env")) {
      if (!strchr(argv[++i], '=')) usage();
      g_dst_env = realloc(g_dst_env, sizeof *g_dst_env * (g_ndst_env + 1));
      if (!g_dst_env) usage();
      g_dst_env[g_ndst_env++] = argv[i];
    } else {
      usage();
    }
  }
  if (!dir || i >= argc) usage();
  if (g_migrate && g_nblobs && (g_nblobs > 1 || strcmp(g_blobs[0], "ram"))) usage();
  if (g_ndst_env && !g_migrate) usage();
  g_deadline = g_t0 + timeout_s * 1000;

  if (mkdir_p(dir)) {
    fprintf(stderr, "gpu-qtest: cannot create %s: %s\n", dir, strerror(errno));
    return 2;
  }
  if (!realpath(dir, g_dir)) snprintf(g_dir, sizeof g_dir, "%s", dir);
  qemu_paths(&g_src, "");
  if (strlen(g_src.qtest_path) + 4 >= sizeof(((struct sockaddr_un *)0)->sun_path)) {
    fprintf(stderr, "gpu-qtest: --workdir path too long for a unix socket: %s\n", g_dir);
    return 2;
  }

  atexit(qemu_kill);
  signal(SIGPIPE, SIG_IGN);
  struct sigaction sa = {.sa_handler = on_signal};
  sigaction(SIGINT, &sa, NULL);
  sigaction(SIGTERM, &sa, NULL);
  sigaction(SIGHUP, &sa, NULL);

  int sr = qemu_start(&g_src, argv + i, argc - i, NULL, 0);
  if (sr) fail_all(sr == -1 ? "start" : "qmp");
  double t_up = now_ms() - g_t0;

  static struct guest G; /* the whole guest-side state */
  struct guest *g = &G;
  g->seed = seed;
  g->shm_bar = 2;
  g->req_gpa = REQ_GPA;
  g->resp_gpa = RESP_GPA;
  char *r = qmp_cmd("{\"execute\":\"query-memory-size-summary\"}", T_QMP);
  char *bm = r ? strstr(r, "\"base-memory\"") : NULL;
  if (!bm || sscanf(bm + strlen("\"base-memory\""), " : %" SCNu64, &g->ram_size) != 1) {
    if (r) seterr("QMP: no base-memory in '%.200s'", r);
    fail_all("qmp");
  }
  /* q35 keeps RAM below 4 GiB up to 2 GiB once there is 2.75 GiB or more */
  uint64_t low = g->ram_size >= 0xb0000000ull ? 0x80000000ull : g->ram_size;
  g->arena_lo = ARENA_LO;
  g->arena_hi = low > ARENA_LO + MiB ? (low - MiB) & ~(SLOT - 1) : ARENA_LO;
  printf(TAG " info qemu up in %.0f ms, guest RAM %" PRIu64 " MiB, blob RAM arena 0x%" PRIx64 "-0x%" PRIx64 "\n", t_up,
         (uint64_t)(g->ram_size / MiB), g->arena_lo, g->arena_hi);

  if (pci_scan(g)) fail_all("pci");
  if (!g->gpu.present) {
    seterr("no virtio-gpu-pci (1af4:1050) on PCI bus 0");
    fail_all("pci");
  }
  if (pci_setup(g)) fail_all("pci");
  print_dev("virtio-gpu", &g->gpu);
  if (g->shm.present) print_dev("ivshmem", &g->shm);
  if (g->shm.present && (!g->shm.bar[g->shm_bar].size || g->shm.bar[g->shm_bar].io)) {
    printf(TAG " info ivshmem has no memory BAR%d\n", g->shm_bar);
    g->shm.present = 0;
  }
  if (g_migrate && g->shm.present)
    printf(TAG " info an ivshmem device is present; with vfio-pci it blocks migration\n");
  if (!g_nblobs) {
    g_blobs[g_nblobs++] = "ram";
    if (g->shm.present) g_blobs[g_nblobs++] = "bar", g_blobs[g_nblobs++] = "mixed";
  }

  if (virtio_find_caps(g)) fail_all("virtio");
  if (virtio_init(g)) fail_all("virtio");

  /* GET_DISPLAY_INFO: proves the queue works, and gives the default size */
  uint8_t req[24] = {0}, di[24 + 16 * 24];
  uint32_t type;
  gpu_hdr(req, GPU_CMD_GET_DISPLAY_INFO);
  if (gpu_cmd(g, req, sizeof req, di, sizeof di, &type)) fail_all("GET_DISPLAY_INFO");
  if (type != GPU_RESP_OK_DISPLAY_INFO) {
    seterr("GET_DISPLAY_INFO answered 0x%x", type);
    fail_all("GET_DISPLAY_INFO");
  }
  uint32_t sw = get32(di + 24 + 8), sh = get32(di + 24 + 12), en = get32(di + 24 + 16);
  g->width = width ? width : en && sw ? sw : 640;
  g->height = height ? height : en && sh ? sh : 480;
  printf(TAG " info virtio-gpu features 0x%" PRIx64 " accepted 0x%" PRIx64
         ", ctrlq %u entries at 0x%" PRIx64 ", scanout0 %ux%u%s, picture %ux%u\n",
         g->dev_features, g->drv_features, g->ctrlq.size, g->ctrlq.desc, sw, sh, en ? "" : " (disabled)", g->width,
         g->height);

  if (g_migrate) return run_postcopy(g, argv + i, argc - i);

  int ok = 0, failed = 0;
  for (int b = 0; b < g_nblobs; b++) {
    struct result res;
    run_blob(g, g_blobs[b], b + 1, &res);
    printf("%s\n", res.line);
    if (res.ok)
      ok++;
    else
      failed++;
  }

  /* QMP quit when all went well so far; QEMU must be gone within a few seconds or it is
   * killed (at once when a connection broke or the time is up: it may hang) */
  if (!g_src.qt.dead && !g_src.qmp.dead && !qemu_gone(&g_src) && now_ms() < g_deadline) {
    g_deadline = now_ms() + 5000;
    qmp_cmd("{\"execute\":\"quit\"}", 5000);
    while (!qemu_gone(&g_src) && now_ms() < g_deadline) usleep(10000);
  }
  if (!qemu_gone(&g_src)) {
    printf(TAG " info QEMU killed\n");
    qemu_kill();
  } else if (!WIFEXITED(g_src.status) || WEXITSTATUS(g_src.status)) {
    printf(TAG " info QEMU ended with %s: %s\n", qemu_status_str(&g_src), qemu_stderr_tail(&g_src));
  }
  printf(TAG " done ok=%d failed=%d time=%.2fs\n", ok, failed, (now_ms() - g_t0) / 1000);
  return failed || !ok ? 1 : 0;
}
