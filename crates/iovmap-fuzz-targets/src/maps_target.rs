//! The `maps` target: iovmap's `/proc/<pid>/maps` parser on arbitrary bytes.
//!
//! - `parse_maps_line` never panics; what it accepts has `start < end`, round-trips
//!   through `format_maps_line`, and is exactly what a second, independent reading of the
//!   format accepts (the reference below, written from proc(5));
//! - any `Vma` the parser can produce, formatted, parses back to itself;
//! - `parse_maps` over arbitrary text never panics and yields exactly the lines the line
//!   parser accepts, in order.
//!
//! PROCMAP_QUERY replies are binary structs the kernel fills; their conversion to a
//! `Vma` (in `vma.rs`) is not reachable from outside the crate and not fuzzed here.

use arbitrary::{Arbitrary, Unstructured};
use iovmap::maps::{format_maps_line, parse_maps, parse_maps_line};
use iovmap::plan::{FileId, Vma};

/// proc(5): `address perms offset dev inode pathname`, fields separated by spaces;
/// `address` is `start-end` in hex; `perms` is `[r-][w-][x-][sp]`; `offset` is hex; `dev`
/// is `major:minor` in hex; `inode` is decimal. iovmap reads the first five fields, and
/// accepts at most 16 hex digits per number, device numbers up to 32 bits and inodes that
/// fit in 64 bits.
fn reference(line: &[u8], page_size: usize) -> Option<Vma> {
    let fields: Vec<&[u8]> = line.split(|&b| b == b' ').filter(|f| !f.is_empty()).take(5).collect();
    let [range, perms, off, dev, ino] = fields[..] else { return None };
    let dash = range.iter().position(|&b| b == b'-')?;
    let hex = |s: &[u8]| -> Option<usize> {
        if s.is_empty() || s.len() > 16 || !s.iter().all(u8::is_ascii_hexdigit) {
            return None;
        }
        usize::from_str_radix(std::str::from_utf8(s).ok()?, 16).ok()
    };
    let (start, end) = (hex(&range[..dash])?, hex(&range[dash + 1..])?);
    let [r, w, x, s] = perms[..] else { return None };
    let bit = |c: u8, yes: u8, prot: i32| match c {
        b'-' => Some(0),
        c if c == yes => Some(prot),
        _ => None,
    };
    let prot = bit(r, b'r', libc::PROT_READ)? | bit(w, b'w', libc::PROT_WRITE)? | bit(x, b'x', libc::PROT_EXEC)?;
    let shared = match s {
        b's' => true,
        b'p' => false,
        _ => return None,
    };
    let offset = hex(off)? as u64;
    let colon = dev.iter().position(|&b| b == b':')?;
    let (major, minor) = (hex(&dev[..colon])?, hex(&dev[colon + 1..])?);
    let (major, minor) = (u32::try_from(major).ok()?, u32::try_from(minor).ok()?);
    if ino.is_empty() || ino.len() > 20 || !ino.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let ino: u64 = std::str::from_utf8(ino).ok()?.parse().ok()?;
    let file = FileId { dev: u64::from(major) << 32 | u64::from(minor), ino };
    (start < end).then_some(Vma { start, end, prot, shared, page_size, offset, file })
}

/// The `maps` fuzz target. The whole input is the text (so hand-written maps lines are
/// seeds as they are); a VMA to format and parse back is drawn from its first bytes.
pub fn maps(data: &[u8]) {
    // The page size is passed through untouched: any power of two.
    let page_size = 1usize << (data.len() % 48);
    for line in data.split(|&b| b == b'\n') {
        check_line(line, page_size);
    }
    check_line(data, page_size);

    let all = parse_maps(data, page_size);
    let lines: Vec<Vma> = data.split(|&b| b == b'\n').filter_map(|l| parse_maps_line(l, page_size)).collect();
    assert_eq!(all, lines, "parse_maps is not the line parser over each line");
    assert!(all.iter().all(|v| v.start < v.end && v.page_size == page_size));

    // Format, parse back.
    let mut u = Unstructured::new(data);
    let Ok(((start, end, prot, shared), (offset, major, minor, ino))) =
        <((u64, u64, u8, bool), (u64, u32, u32, u64))>::arbitrary(&mut u)
    else {
        return;
    };
    let file = FileId { dev: u64::from(major) << 32 | u64::from(minor), ino };
    let v =
        Vma { start: start as usize, end: end as usize, prot: i32::from(prot % 8), shared, page_size, offset, file };
    let line = format_maps_line(&v);
    let back = parse_maps_line(line.as_bytes(), page_size);
    if v.start < v.end {
        assert_eq!(back, Some(v), "{line:?}");
    } else {
        assert_eq!(back, None, "an empty or inverted range was accepted: {line:?}");
    }
}

fn check_line(line: &[u8], page_size: usize) {
    let got = parse_maps_line(line, page_size);
    let want = reference(line, page_size);
    assert_eq!(got, want, "parser and reference disagree on {:?}", String::from_utf8_lossy(line));
    if let Some(v) = got {
        assert!(v.start < v.end);
        let again = format_maps_line(&v);
        assert_eq!(parse_maps_line(again.as_bytes(), page_size), Some(v), "{again:?} does not round-trip");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reference_reads_real_lines() {
        let v = reference(b"7f00a000-7f00c000 rw-s 00000000 00:01 2052 /memfd:ram", 4096).unwrap();
        assert_eq!((v.start, v.end, v.prot, v.shared), (0x7f00a000, 0x7f00c000, 3, true));
        assert_eq!((v.offset, v.file), (0, FileId { dev: 1, ino: 2052 }));
        assert_eq!(reference(b"1000-2000 rw-s", 4096), None, "offset, device and inode are read");
        assert_eq!(reference(b"+1000-2000 rw-s", 4096), None, "from_str_radix's sign is not hex");
        let text = std::fs::read("/proc/self/maps").unwrap();
        for l in text.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            assert!(reference(l, 4096).is_some(), "{}", String::from_utf8_lossy(l));
            check_line(l, 4096);
        }
    }
}
