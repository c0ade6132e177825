/*
 * The naive loop VMMs ship today: reserve PROT_NONE address space for the whole list,
 * then clone each iovec into it with mremap(old_size 0), one call per iovec, and unmap
 * everything on the first error. No coalescing, no splitting at VMA boundaries, no
 * fallback for memory the kernel will not clone.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stddef.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>

static size_t round_up(size_t x, size_t to)
{
	return (x + to - 1) & ~(to - 1);
}

/* Returns 0 and the view in *out / *out_len, or -errno (nothing left mapped). */
int iovmap_naive_map(const struct iovec *iov, size_t n, void **out, size_t *out_len)
{
	size_t page = (size_t)sysconf(_SC_PAGESIZE);
	size_t total = 0, i;
	char *base, *cursor;

	for (i = 0; i < n; i++)
		total += round_up(iov[i].iov_len, page);
	if (total == 0)
		return -EINVAL;
	base = mmap(NULL, total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (base == MAP_FAILED)
		return -errno;
	cursor = base;
	for (i = 0; i < n; i++) {
		if (iov[i].iov_len == 0)
			continue;
		if (mremap(iov[i].iov_base, 0, iov[i].iov_len, MREMAP_FIXED | MREMAP_MAYMOVE, cursor) == MAP_FAILED) {
			int err = errno;
			munmap(base, total);
			return -err;
		}
		cursor += round_up(iov[i].iov_len, page);
	}
	*out = base;
	*out_len = total;
	return 0;
}
