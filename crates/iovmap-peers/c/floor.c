/*
 * The floor of a map call: what no remapper can do without. One pass over the list that
 * coalesces adjacent iovecs into runs and sums their bytes, then the placement syscalls
 * the runs need: one mremap clone where the kernel chooses for a list of one run (and
 * nothing to reserve), else a reservation and one clone per run. No validation at all:
 * no VMA lookups, no splitting at VMA boundaries, no alignment checks, no fallback.
 * Only for lists whose runs the kernel clones (memfd RAM). Not a product.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stddef.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>

struct run {
	char *src;
	size_t len;
};

/* Returns 0 and the view in *out / *out_len, or -errno (nothing left mapped). */
int iovmap_floor_map(const struct iovec *iov, size_t n, void **out, size_t *out_len)
{
	size_t page = (size_t)sysconf(_SC_PAGESIZE);
	size_t runs = 0, bytes = 0, i, total = 0;
	char *start = NULL, *end = NULL, *base, *cursor;

	/* The pass: runs and bytes. */
	for (i = 0; i < n; i++) {
		char *b = iov[i].iov_base;
		size_t l = iov[i].iov_len;
		if (l == 0)
			continue;
		if (b != end) {
			runs++;
			if (runs == 1)
				start = b;
		}
		end = b + l;
		bytes += l;
	}
	if (bytes == 0)
		return -EINVAL;
	if (runs == 1) {
		base = mremap(start, 0, bytes, MREMAP_MAYMOVE);
		if (base == MAP_FAILED)
			return -errno;
		*out = base;
		*out_len = bytes;
		return 0;
	}
	/* Several runs: a second pass places them (page-aligned runs assumed). */
	for (i = 0; i < n; i++)
		total += iov[i].iov_len;
	base = mmap(NULL, total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (base == MAP_FAILED)
		return -errno;
	cursor = base;
	start = end = NULL;
	for (i = 0; i <= n; i++) {
		char *b = i < n ? iov[i].iov_base : NULL;
		size_t l = i < n ? iov[i].iov_len : 0;
		if (i < n && l == 0)
			continue;
		if (i == n || b != end) {
			if (start) {
				size_t len = (size_t)(end - start);
				if (mremap(start, 0, len, MREMAP_FIXED | MREMAP_MAYMOVE, cursor) == MAP_FAILED) {
					int err = errno;
					munmap(base, total);
					return -err;
				}
				cursor += len;
			}
			start = b;
		}
		end = b + l;
	}
	(void)page;
	*out = base;
	*out_len = total;
	return 0;
}
