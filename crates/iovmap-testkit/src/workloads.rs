//! Scatter lists shaped like the ones VMMs see, generated deterministically from a seed.

/// SplitMix64: a small, good, deterministic generator (no dependency, same sequence on
/// every machine).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}

/// A run of adjacent pages of guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// First page (index into guest RAM).
    pub page: usize,
    /// Number of pages.
    pub pages: usize,
}

/// A fragmented allocation, like the backing of a virtio-gpu blob in a guest whose RAM
/// has been in use for a while: guest RAM of `ram_pages` pages is cut into chunks of
/// `1..=max_run` pages (uniform), the chunks are shuffled, and the first ones that add
/// up to `blob_pages` are taken (the last is cut to fit).
pub fn fragmented(ram_pages: usize, blob_pages: usize, max_run: usize, seed: u64) -> Vec<Chunk> {
    assert!(blob_pages <= ram_pages, "the blob must fit in guest RAM");
    let mut rng = Rng::new(seed);
    let mut all = Vec::new();
    let mut page = 0;
    while page < ram_pages {
        let pages = rng.range(1, max_run).min(ram_pages - page);
        all.push(Chunk { page, pages });
        page += pages;
    }
    rng.shuffle(&mut all);
    let mut left = blob_pages;
    let mut blob = Vec::new();
    for mut c in all {
        if left == 0 {
            break;
        }
        c.pages = c.pages.min(left);
        left -= c.pages;
        blob.push(c);
    }
    blob
}

/// `n` single pages of guest RAM, no two adjacent (every other page, shuffled): the list
/// that nothing can coalesce.
pub fn scattered(n: usize, seed: u64) -> Vec<Chunk> {
    let mut v: Vec<Chunk> = (0..n).map(|i| Chunk { page: 2 * i, pages: 1 }).collect();
    let mut rng = Rng::new(seed);
    rng.shuffle(&mut v);
    // A shuffle can put page 2k+2 right after 2k: still not adjacent (2k+1 lies
    // between), so no two entries continue each other.
    v
}

/// One iovec per page of `chunks`, over guest RAM at `base` with pages of `page` bytes:
/// what a guest driver that does not merge pages hands over.
pub fn page_iovecs(base: *const u8, chunks: &[Chunk], page: usize) -> Vec<libc::iovec> {
    let mut v = Vec::with_capacity(chunks.iter().map(|c| c.pages).sum());
    for c in chunks {
        for p in c.page..c.page + c.pages {
            v.push(crate::iov(base.wrapping_add(p * page), page));
        }
    }
    v
}

/// One iovec per chunk: what a guest driver that merges adjacent pages hands over.
pub fn chunk_iovecs(base: *const u8, chunks: &[Chunk], page: usize) -> Vec<libc::iovec> {
    chunks.iter().map(|c| crate::iov(base.wrapping_add(c.page * page), c.pages * page)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragmented_is_deterministic_and_exact() {
        let a = fragmented(1 << 16, 1 << 14, 64, 7);
        assert_eq!(a, fragmented(1 << 16, 1 << 14, 64, 7));
        assert_eq!(a.iter().map(|c| c.pages).sum::<usize>(), 1 << 14);
        assert!(a.iter().all(|c| (1..=64).contains(&c.pages) && c.page + c.pages <= 1 << 16));
    }

    #[test]
    fn scattered_pages_are_never_adjacent() {
        let v = scattered(1000, 3);
        assert!(v.windows(2).all(|w| w[1].page != w[0].page + 1));
    }
}
