/* SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause */
/*
 * remap.c: what a C VMM does with iovmap.
 *
 * 1. Guest RAM is a memfd mapped MAP_SHARED (QEMU: a memfd memory backend, share=on).
 * 2. A guest buffer arrives as a scatter list of host iovecs into that RAM. iovmap maps
 *    it into one contiguous view without copying; the bytes are checked, and writes are
 *    seen both ways.
 * 3. Device memory the kernel will not clone (a vfio-pci BAR in a real VMM; here a
 *    perf_event ring buffer, VM_PFNMAP like a BAR) is registered with its fd, and a list
 *    mixing RAM and the ring is mapped: the ring through the fd fallback.
 * 4. Guest RAM sealed as QEMU's memory-backend-memfd seals it, registered: where the
 *    kernel has /dev/udmabuf, a scattered list is built by the kernel (one dma-buf for
 *    the view, handed to a "display" that maps it on its own); elsewhere it says why and
 *    automatic placement remaps instead.
 *
 * Build it from the repository root, after `cargo build --release -p iovmap-capi`:
 *
 *   cc -O2 -Wall -Icrates/iovmap-capi/include crates/iovmap-capi/examples/c/remap.c \
 *      target/release/libiovmap_capi.a -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc -o remap
 *
 * It prints what it did, then "remap: ok", and exits 0; a failed check exits 1.
 * crates/iovmap-capi/tests/c_example.rs builds and runs it under `cargo test`.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <linux/perf_event.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <iovmap.h>

/* Exits with a message unless `cond` holds; the message is formatted first, so it may
 * use strerror(errno). */
#define CHECK(cond, ...)                                                                  \
    do {                                                                                  \
        if (!(cond)) {                                                                    \
            char msg_[256];                                                               \
            snprintf(msg_, sizeof(msg_), __VA_ARGS__);                                    \
            fprintf(stderr, "remap: line %d: check failed: %s: %s\n", __LINE__, #cond,    \
                    msg_);                                                                \
            exit(1);                                                                      \
        }                                                                                 \
    } while (0)

static size_t page;

/* Reports a failed iovmap call the way a VMM would log it, and exits. */
static void die(const char *what, int rc)
{
    fprintf(stderr, "remap: %s: %s (iovec %" PRId64 "): %s\n", what, iovmap_strerror(rc),
            iovmap_last_error_index(), iovmap_last_error_message());
    exit(1);
}

/* The byte guest RAM holds at `off` (before anything writes it). */
static uint8_t pattern(size_t off)
{
    return (uint8_t)(off * 131u + (off / 4096u) * 7u + 1u);
}

/* The view's bytes are the iovecs' bytes, concatenated. */
static void check_view(const iovmap_view *v, const struct iovec *iov, int n)
{
    const uint8_t *p = iovmap_view_ptr(v);
    size_t at = 0;
    for (int i = 0; i < n; i++) {
        CHECK(memcmp(p + at, iov[i].iov_base, iov[i].iov_len) == 0,
              "iovec %d differs from the view at offset %zu", i, at);
        at += iov[i].iov_len;
    }
    CHECK(at == iovmap_view_len(v), "view length %zu, iovecs %zu", iovmap_view_len(v), at);
}

static iovmap_stats stats_of(const iovmap_view *v)
{
    iovmap_stats s;
    int rc = iovmap_view_stats(v, &s);
    if (rc != IOVMAP_OK)
        die("iovmap_view_stats", rc);
    return s;
}

static void print_stats(const char *what, int iovcnt, iovmap_stats s)
{
    printf("%s: %d iovecs -> %" PRIu64 " runs (%" PRIu64 " cloned, %" PRIu64 " fd-mapped, %" PRIu64
           " syscalls)",
           what, iovcnt, s.runs, s.cloned, s.fd_mapped, s.syscalls);
}

/* A perf_event ring buffer: 1 control page + `data_pages` pages, MAP_SHARED. Its VMA is
 * VM_PFNMAP | VM_IO | VM_DONTEXPAND, like a vfio-pci BAR: the kernel refuses to clone
 * it, and its fd maps only the whole ring at offset 0. Returns the fd, or -1. */
static int perf_ring(size_t data_pages, uint8_t **ring, size_t *len)
{
    struct perf_event_attr attr;
    memset(&attr, 0, sizeof(attr));
    attr.type = PERF_TYPE_SOFTWARE;
    attr.size = sizeof(attr);
    attr.config = PERF_COUNT_SW_DUMMY;
    attr.disabled = 1;
    attr.exclude_kernel = 1;
    attr.exclude_hv = 1;
    int fd = (int)syscall(SYS_perf_event_open, &attr, 0, -1, -1, PERF_FLAG_FD_CLOEXEC);
    if (fd < 0)
        return -1;
    *len = (1 + data_pages) * page;
    void *p = mmap(NULL, *len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
        close(fd);
        return -1;
    }
    *ring = p;
    return fd;
}

/* 4. Sealed memfd RAM: kernel-built where /dev/udmabuf exists. */
static void kernel_built(iovmap_remapper *r)
{
    const size_t len = 32 * page;
    int fd = memfd_create("sealed-ram", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    CHECK(fd >= 0, "memfd_create: %s", strerror(errno));
    CHECK(ftruncate(fd, (off_t)len) == 0, "ftruncate: %s", strerror(errno));
    CHECK(fcntl(fd, F_ADD_SEALS, F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL) == 0, "F_ADD_SEALS: %s",
          strerror(errno));
    uint8_t *ram = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    CHECK(ram != MAP_FAILED, "mmap: %s", strerror(errno));
    for (size_t i = 0; i < len; i++)
        ram[i] = pattern(i);
    int rc = iovmap_register(r, ram, len, fd, 0);
    if (rc != IOVMAP_OK)
        die("iovmap_register of sealed RAM", rc);
    /* Every other page, backwards: what a guest framebuffer looks like. */
    struct iovec list[8];
    for (int i = 0; i < 8; i++)
        list[i] = (struct iovec){ram + (size_t)(30 - 4 * i) * page, page};
    iovmap_view *v;
    rc = iovmap_map(r, list, 8, IOVMAP_MAP_KERNEL_BUILT, &v);
    if (rc == IOVMAP_E_KERNEL_BUILT) {
        printf("kernel-built: not here: %s\n", iovmap_last_error_message());
        rc = iovmap_map(r, list, 8, 0, &v);
        if (rc != IOVMAP_OK)
            die("iovmap_map (automatic) of sealed RAM", rc);
        iovmap_kernel_built kb;
        CHECK(iovmap_view_kernel_built(v, &kb) == IOVMAP_OK, "iovmap_view_kernel_built");
        CHECK(kb.runs == 0 && kb.declined != IOVMAP_DECLINED_NONE, "declined %d", (int)kb.declined);
        check_view(v, list, 8);
        printf("kernel-built: automatic placement remapped instead (declined %d, errno %d)\n",
               (int)kb.declined, kb.declined_errno);
        iovmap_view_free(v);
    } else {
        if (rc != IOVMAP_OK)
            die("iovmap_map (kernel-built) of sealed RAM", rc);
        check_view(v, list, 8);
        iovmap_dmabuf buf;
        CHECK(iovmap_view_dmabuf_count(v) == 1 && iovmap_view_dmabuf(v, 0, &buf) == IOVMAP_OK,
              "one dma-buf for the view");
        printf("kernel-built: 8 iovecs -> 1 dma-buf of %" PRIu64 " bytes, bytes match\n", buf.len);
        iovmap_view_free(v);

        /* No CPU mapping at all: the dma-buf is handed over, and its new owner maps it. */
        iovmap_dmabufs *l;
        rc = iovmap_dmabufs_new(r, list, 8, &l);
        if (rc != IOVMAP_OK)
            die("iovmap_dmabufs_new", rc);
        CHECK(iovmap_dmabufs_count(l) == 1, "%zu dma-bufs", iovmap_dmabufs_count(l));
        int dmabuf = iovmap_dmabufs_take(l, 0);
        CHECK(dmabuf >= 0, "iovmap_dmabufs_take: %s", iovmap_last_error_message());
        iovmap_dmabufs_free(l);
        const uint8_t *display = mmap(NULL, 8 * page, PROT_READ, MAP_SHARED, dmabuf, 0);
        CHECK(display != MAP_FAILED, "mmap of the dma-buf: %s", strerror(errno));
        for (int i = 0; i < 8; i++)
            CHECK(memcmp(display + (size_t)i * page, list[i].iov_base, page) == 0, "page %d of the dma-buf", i);
        printf("kernel-built: the dma-buf, handed over and mapped by its owner, shows the same pages\n");
        munmap((void *)display, 8 * page);
        close(dmabuf);
    }
    rc = iovmap_unregister(r, ram);
    if (rc != IOVMAP_OK)
        die("iovmap_unregister of sealed RAM", rc);
    munmap(ram, len);
    close(fd);
}

int main(void)
{
    page = (size_t)sysconf(_SC_PAGESIZE);

    /* 1. Guest RAM: 64 pages of memfd, mapped shared, filled with a pattern. */
    const size_t ram_len = 64 * page;
    int ram_fd = memfd_create("guest-ram", MFD_CLOEXEC);
    CHECK(ram_fd >= 0, "memfd_create: %s", strerror(errno));
    CHECK(ftruncate(ram_fd, (off_t)ram_len) == 0, "ftruncate: %s", strerror(errno));
    uint8_t *ram = mmap(NULL, ram_len, PROT_READ | PROT_WRITE, MAP_SHARED, ram_fd, 0);
    CHECK(ram != MAP_FAILED, "mmap of guest RAM: %s", strerror(errno));
    for (size_t i = 0; i < ram_len; i++)
        ram[i] = pattern(i);

    iovmap_remapper *r = iovmap_remapper_new();
    CHECK(r != NULL, "iovmap_remapper_new: %s", iovmap_last_error_message());

    /* 2. A scatter list: pages 9-11 as three iovecs (adjacent: one run), page 3, a
     *    zero-length entry (skipped), pages 20-21, and the first 100 bytes of page 0. */
    struct iovec list[] = {
        {ram + 9 * page, page},  {ram + 10 * page, page}, {ram + 11 * page, page},
        {ram + 3 * page, page},  {ram + 40 * page, 0},    {ram + 20 * page, 2 * page},
        {ram, 100},
    };
    const int n = (int)(sizeof(list) / sizeof(list[0]));
    iovmap_view *v;
    int rc = iovmap_map(r, list, n, 0, &v);
    if (rc != IOVMAP_OK)
        die("iovmap_map of guest RAM", rc);
    check_view(v, list, n);
    uint8_t *p = iovmap_view_ptr(v);
    p[10] = 0xa1; /* view -> RAM (page 9) */
    CHECK(ram[9 * page + 10] == 0xa1, "a write through the view is not in guest RAM");
    ram[21 * page + 7] = 0xa2; /* RAM -> view (page 21 is the view's sixth) */
    CHECK(p[5 * page + 7] == 0xa2, "a write to guest RAM is not in the view");
    iovmap_stats s = stats_of(v);
    CHECK(s.segments == 6 && s.runs == 4 && s.cloned == 4 && s.fd_mapped == 0 && s.syscalls == 4,
          "stats %" PRIu64 "/%" PRIu64, s.runs, s.syscalls);
    print_stats("guest RAM", n, s);
    printf(", %zu bytes match, writes alias both ways\n", iovmap_view_len(v));
    iovmap_view_free(v);
    CHECK(ram[9 * page + 10] == 0xa1, "freeing the view changed guest RAM");

    /* 3. Device memory the kernel will not clone. */
    uint8_t *ring;
    size_t ring_len;
    int ring_fd = perf_ring(2, &ring, &ring_len);
    if (ring_fd < 0) {
        printf("pfnmap: skipped, no perf ring: %s (kernel.perf_event_paranoid?)\n", strerror(errno));
    } else {
        /* Bytes 512..1023 of the control page are the kernel's to leave alone. */
        for (size_t i = 512; i < 1024; i++)
            ring[i] = (uint8_t)(i ^ 0x5a);
        struct iovec mixed[] = {
            {ram + 2 * page, page},
            {ring, page},                    /* the control page */
            {ring + page, ring_len - page},  /* the data pages: the same run */
            {ram + 5 * page, page},
        };
        const int m = (int)(sizeof(mixed) / sizeof(mixed[0]));

        /* Unregistered: refused, naming the ring's first iovec. */
        rc = iovmap_map(r, mixed, m, 0, &v);
        CHECK(rc == IOVMAP_E_NO_FALLBACK && v == NULL, "unregistered ring: %s", iovmap_strerror(rc));
        CHECK(iovmap_last_error_index() == 1, "index %" PRId64, iovmap_last_error_index());
        printf("pfnmap unregistered: refused at iovec %" PRId64 " as expected: %s\n",
               iovmap_last_error_index(), iovmap_strerror(rc));

        /* Registered with its fd (a vfio VMM: the device fd at the region's offset). */
        rc = iovmap_register(r, ring, ring_len, ring_fd, 0);
        if (rc != IOVMAP_OK)
            die("iovmap_register of the perf ring", rc);
        rc = iovmap_map(r, mixed, m, IOVMAP_MAP_POPULATE, &v);
        if (rc != IOVMAP_OK)
            die("iovmap_map of RAM and the perf ring", rc);
        check_view(v, mixed, m);
        s = stats_of(v);
        /* Two clones, one refused clone, one fd map. */
        CHECK(s.runs == 3 && s.cloned == 2 && s.fd_mapped == 1 && s.syscalls == 4,
              "stats %" PRIu64 "/%" PRIu64 "/%" PRIu64, s.runs, s.fd_mapped, s.syscalls);
        p = iovmap_view_ptr(v);
        p[page + 600] = 0x5b; /* view -> ring */
        CHECK(ring[600] == 0x5b, "a write through the view is not in the ring");
        ring[700] = 0x6c; /* ring -> view */
        CHECK(p[page + 700] == 0x6c, "a write to the ring is not in the view");
        print_stats("pfnmap", m, s);
        printf(", bytes match, the control page aliases both ways\n");
        iovmap_view_free(v);

        /* The refusal is remembered: the ring alone now takes one syscall. */
        rc = iovmap_map(r, mixed + 1, 2, 0, &v);
        if (rc != IOVMAP_OK)
            die("iovmap_map of the perf ring", rc);
        s = stats_of(v);
        CHECK(s.runs == 1 && s.fd_mapped == 1 && s.syscalls == 1, "syscalls %" PRIu64, s.syscalls);
        print_stats("pfnmap again", 2, s);
        printf(": the refusal is remembered\n");
        iovmap_view_free(v);

        rc = iovmap_unregister(r, ring);
        if (rc != IOVMAP_OK)
            die("iovmap_unregister", rc);
        munmap(ring, ring_len);
        close(ring_fd);
    }

    kernel_built(r);

    iovmap_remapper_free(r);
    munmap(ram, ram_len);
    close(ram_fd);
    printf("remap: ok\n");
    return 0;
}
