// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//
// The picture test.sh checks: one program, built static, used on both sides.
//
//   pattern draw FRAME [FBDEV]      in the guest: draw frame FRAME into the framebuffer
//                                   (default /dev/fb0) through write(), so the fbdev
//                                   emulation damages and flushes it to the device
//   pattern check FRAME FILE.ppm    on the host: compare every pixel of a QMP screendump
//                                   (binary PPM, P6) with frame FRAME; exit 0 if all match
//
// Every pixel's colour is a hash of (x, y, frame): no two frames agree on more than a few
// pixels by chance, and a page shown at the wrong place, a stale page or a stale frame
// cannot pass. FRAME is 1..2^31.
#define _GNU_SOURCE // pwrite
#include <errno.h>
#include <fcntl.h>
#include <linux/fb.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

// 0xRRGGBB of pixel (x, y) in frame `frame` (a murmur3-style finalizer of the three).
static uint32_t pattern_rgb(uint32_t x, uint32_t y, uint32_t frame)
{
    uint32_t h = x * 0x9E3779B1u ^ (y + 1) * 0x85EBCA77u ^ frame * 0xC2B2AE3Du;
    h ^= h >> 16;
    h *= 0x85EBCA6Bu;
    h ^= h >> 13;
    h *= 0xC2B2AE35u;
    h ^= h >> 16;
    return h & 0xFFFFFF;
}

static int usage(void)
{
    fprintf(stderr, "usage: pattern draw FRAME [FBDEV] | pattern check FRAME FILE.ppm\n");
    return 2;
}

static int draw(uint32_t frame, const char *dev)
{
    int fd = open(dev, O_RDWR);
    if (fd < 0) {
        fprintf(stderr, "pattern: open %s: %s\n", dev, strerror(errno));
        return 1;
    }
    struct fb_var_screeninfo var;
    struct fb_fix_screeninfo fix;
    if (ioctl(fd, FBIOGET_VSCREENINFO, &var) < 0 || ioctl(fd, FBIOGET_FSCREENINFO, &fix) < 0) {
        fprintf(stderr, "pattern: FBIOGET_*SCREENINFO: %s\n", strerror(errno));
        return 1;
    }
    if (var.bits_per_pixel != 32 || var.red.length != 8 || var.green.length != 8 ||
        var.blue.length != 8) {
        fprintf(stderr, "pattern: %u bpp (r%u g%u b%u): only 32 bpp 8:8:8 is drawn\n",
                var.bits_per_pixel, var.red.length, var.green.length, var.blue.length);
        return 1;
    }
    // Make the fbdev emulation set its mode again (it is the scanout) in case the console
    // that was bound to it went away.
    var.activate = FB_ACTIVATE_NOW | FB_ACTIVATE_FORCE;
    if (ioctl(fd, FBIOPUT_VSCREENINFO, &var) < 0) {
        fprintf(stderr, "pattern: FBIOPUT_VSCREENINFO: %s (going on)\n", strerror(errno));
    }
    size_t stride = fix.line_length, size = stride * var.yres;
    uint8_t *buf = calloc(1, size);
    if (!buf) {
        fprintf(stderr, "pattern: out of memory\n");
        return 1;
    }
    for (uint32_t y = 0; y < var.yres; y++) {
        uint32_t *row = (uint32_t *)(buf + y * stride);
        for (uint32_t x = 0; x < var.xres; x++) {
            uint32_t c = pattern_rgb(x, y, frame);
            row[x] = (c >> 16 & 0xFF) << var.red.offset | (c >> 8 & 0xFF) << var.green.offset |
                     (c & 0xFF) << var.blue.offset;
        }
    }
    size_t done = 0;
    off_t at = (off_t)var.yoffset * stride;
    while (done < size) {
        ssize_t n = pwrite(fd, buf + done, size - done, at + (off_t)done);
        if (n <= 0) {
            fprintf(stderr, "pattern: write %s: %s\n", dev, n < 0 ? strerror(errno) : "short");
            return 1;
        }
        done += (size_t)n;
    }
    fsync(fd); // fbdev deferred I/O: flush now rather than after its delay (if it can)
    close(fd);
    printf("pattern: frame %u drawn: %ux%u, stride %zu, rgb offsets %u/%u/%u\n", frame, var.xres,
           var.yres, stride, var.red.offset, var.green.offset, var.blue.offset);
    free(buf);
    return 0;
}

// Reads one header token of a PPM (skipping whitespace and comments).
static int ppm_token(FILE *f, unsigned *out)
{
    int c;
    while ((c = fgetc(f)) != EOF) {
        if (c == '#') {
            while ((c = fgetc(f)) != EOF && c != '\n') {
            }
        } else if (c != ' ' && c != '\t' && c != '\n' && c != '\r') {
            break;
        }
    }
    if (c < '0' || c > '9') {
        return -1;
    }
    unsigned v = 0;
    while (c >= '0' && c <= '9') {
        v = v * 10 + (unsigned)(c - '0');
        c = fgetc(f);
    }
    *out = v; // c, one whitespace byte, is consumed
    return 0;
}

static int check(uint32_t frame, const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        printf("cannot open %s: %s\n", path, strerror(errno));
        return 1;
    }
    unsigned w, h, maxval;
    if (fgetc(f) != 'P' || fgetc(f) != '6' || ppm_token(f, &w) || ppm_token(f, &h) ||
        ppm_token(f, &maxval) || maxval != 255 || w == 0 || h == 0) {
        printf("%s is not a binary PPM with maxval 255\n", path);
        return 1;
    }
    uint64_t bad = 0;
    unsigned first_x = 0, first_y = 0;
    uint32_t first_got = 0, first_want = 0;
    uint8_t px[3];
    for (unsigned y = 0; y < h; y++) {
        for (unsigned x = 0; x < w; x++) {
            if (fread(px, 1, 3, f) != 3) {
                printf("%s: truncated at pixel (%u, %u) of %ux%u\n", path, x, y, w, h);
                return 1;
            }
            uint32_t got = (uint32_t)px[0] << 16 | (uint32_t)px[1] << 8 | px[2];
            uint32_t want = pattern_rgb(x, y, frame);
            if (got != want && bad++ == 0) {
                first_x = x, first_y = y, first_got = got, first_want = want;
            }
        }
    }
    fclose(f);
    if (bad) {
        printf("%ux%u: %llu of %llu pixels differ from frame %u, first at (%u, %u): "
               "#%06x, want #%06x\n",
               w, h, (unsigned long long)bad, (unsigned long long)w * h, frame, first_x, first_y,
               first_got, first_want);
        return 1;
    }
    printf("%ux%u: all %llu pixels are frame %u\n", w, h, (unsigned long long)w * h, frame);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        return usage();
    }
    char *end;
    unsigned long frame = strtoul(argv[2], &end, 10);
    if (*end || frame == 0 || frame > 0x7FFFFFFF) {
        return usage();
    }
    if (!strcmp(argv[1], "draw") && argc <= 4) {
        return draw((uint32_t)frame, argc == 4 ? argv[3] : "/dev/fb0");
    }
    if (!strcmp(argv[1], "check") && argc == 4) {
        return check((uint32_t)frame, argv[3]);
    }
    return usage();
}
