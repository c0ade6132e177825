//! Position-dependent byte patterns: every byte depends on a seed and on its offset in its
//! backing (BAR file offset or RAM offset), so a piece placed at the wrong offset, a page
//! from the wrong source, or a stale page never passes for the right one.

/// A 64-bit mix (splitmix64's finaliser): consecutive inputs give unrelated outputs.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The pattern's 8 bytes at the 8-aligned offset `off & !7`.
///
/// ```
/// use iovmap_vmtest::pattern::{byte, word};
/// assert_eq!(word(1, 0x1000).to_le_bytes()[3], byte(1, 0x1003));
/// assert_ne!(word(1, 0x1000), word(2, 0x1000));
/// ```
pub fn word(seed: u64, off: u64) -> u64 {
    mix(mix(seed) ^ (off & !7))
}

/// The pattern's byte at offset `off`.
///
/// ```
/// assert_ne!(iovmap_vmtest::pattern::byte(7, 0), iovmap_vmtest::pattern::byte(7, 0x1000));
/// ```
pub fn byte(seed: u64, off: u64) -> u8 {
    word(seed, off).to_le_bytes()[(off & 7) as usize]
}

/// Writes pattern `seed` into `[ptr, ptr + len)`, the byte at `ptr` being offset `off` of
/// the pattern. Volatile: the memory may be a device BAR or shared with a guest.
///
/// # Safety
/// `[ptr, ptr + len)` must be mapped writable, and no Rust reference may point into it.
pub unsafe fn fill(ptr: *mut u8, len: usize, seed: u64, off: u64) {
    let mut i = 0;
    while i < len {
        let at = off + i as u64;
        let p = ptr.wrapping_add(i);
        if at % 8 == 0 && (p as usize) % 8 == 0 && len - i >= 8 {
            // SAFETY: 8 aligned bytes inside the range the caller vouches for.
            unsafe { p.cast::<u64>().write_volatile(word(seed, at).to_le()) };
            i += 8;
        } else {
            // SAFETY: one byte inside that range.
            unsafe { p.write_volatile(byte(seed, at)) };
            i += 1;
        }
    }
}

/// The first byte of `[ptr, ptr + len)` that differs from pattern `seed` (the byte at
/// `ptr` being offset `off`), as (index, found, expected).
///
/// # Safety
/// `[ptr, ptr + len)` must be mapped readable.
pub unsafe fn find_mismatch(ptr: *const u8, len: usize, seed: u64, off: u64) -> Option<(usize, u8, u8)> {
    let mut i = 0;
    while i < len {
        let at = off + i as u64;
        let p = ptr.wrapping_add(i);
        if at % 8 == 0 && (p as usize) % 8 == 0 && len - i >= 8 {
            // SAFETY: 8 aligned bytes inside the readable range.
            let got = u64::from_le(unsafe { p.cast::<u64>().read_volatile() });
            let want = word(seed, at);
            if got != want {
                let k = (0..8).find(|&k| got.to_le_bytes()[k] != want.to_le_bytes()[k]).unwrap_or(0);
                return Some((i + k, got.to_le_bytes()[k], want.to_le_bytes()[k]));
            }
            i += 8;
        } else {
            // SAFETY: one byte inside the readable range.
            let got = unsafe { p.read_volatile() };
            let want = byte(seed, at);
            if got != want {
                return Some((i, got, want));
            }
            i += 1;
        }
    }
    None
}

/// The pattern as a buffer: `len` bytes from offset `off`.
///
/// ```
/// let v = iovmap_vmtest::pattern::bytes(3, 5, 10);
/// assert_eq!(v[0], iovmap_vmtest::pattern::byte(3, 5));
/// ```
pub fn bytes(seed: u64, off: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| byte(seed, off + i)).collect()
}

/// The first index where two ranges differ, as (index, byte in `a`, byte in `b`).
///
/// # Safety
/// Both ranges must be mapped readable for `len` bytes.
pub unsafe fn compare(a: *const u8, b: *const u8, len: usize) -> Option<(usize, u8, u8)> {
    let aligned = (a as usize) % 8 == (b as usize) % 8;
    let mut i = 0;
    while i < len {
        let (pa, pb) = (a.wrapping_add(i), b.wrapping_add(i));
        if aligned && (pa as usize) % 8 == 0 && len - i >= 8 {
            // SAFETY: 8 aligned bytes inside both readable ranges.
            let (x, y) = unsafe { (pa.cast::<u64>().read_volatile(), pb.cast::<u64>().read_volatile()) };
            if x != y {
                let k = (0..8).find(|&k| x.to_ne_bytes()[k] != y.to_ne_bytes()[k]).unwrap_or(0);
                return Some((i + k, x.to_ne_bytes()[k], y.to_ne_bytes()[k]));
            }
            i += 8;
        } else {
            // SAFETY: one byte inside both readable ranges.
            let (x, y) = unsafe { (pa.read_volatile(), pb.read_volatile()) };
            if x != y {
                return Some((i, x, y));
            }
            i += 1;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_then_check_round_trips_at_any_alignment() {
        let mut buf = vec![0u8; 4096 + 16];
        for start in [0usize, 1, 3, 8, 13] {
            for off in [0u64, 5, 0x1000, 0x2003] {
                let len = 1000 + start;
                buf.fill(0);
                let p = buf.as_mut_ptr().wrapping_add(start);
                // SAFETY: inside `buf`, which no reference covers during the calls.
                unsafe {
                    fill(p, len, 9, off);
                    assert_eq!(find_mismatch(p, len, 9, off), None);
                }
                assert_eq!(&buf[start..start + len], &bytes(9, off, len)[..]);
            }
        }
    }

    #[test]
    fn a_changed_byte_or_a_shifted_page_is_found() {
        let mut buf = bytes(4, 0x10000, 8192);
        buf[5000] ^= 1;
        // SAFETY: `buf` is readable for its length.
        assert_eq!(unsafe { find_mismatch(buf.as_ptr(), 8192, 4, 0x10000) }.map(|m| m.0), Some(5000));
        // The same bytes taken for the page after them: wrong almost everywhere.
        let page = bytes(4, 0x10000, 4096);
        // SAFETY: as above.
        assert_eq!(unsafe { find_mismatch(page.as_ptr(), 4096, 4, 0x11000) }.map(|m| m.0), Some(0));
        // Another seed at the same offsets: wrong too.
        // SAFETY: as above.
        assert!(unsafe { find_mismatch(page.as_ptr(), 4096, 5, 0x10000) }.is_some());
    }

    #[test]
    fn compare_finds_the_first_difference() {
        let a = bytes(1, 0, 300);
        let mut b = a.clone();
        // SAFETY: both vectors are readable for 300 bytes.
        assert_eq!(unsafe { compare(a.as_ptr(), b.as_ptr(), 300) }, None);
        b[77] = !b[77];
        // SAFETY: as above.
        assert_eq!(unsafe { compare(a.as_ptr(), b.as_ptr(), 300) }, Some((77, a[77], b[77])));
        // SAFETY: as above, shifted by one byte (unaligned against each other).
        assert!(unsafe { compare(a.as_ptr().add(1), b.as_ptr(), 299) }.is_some());
    }
}
