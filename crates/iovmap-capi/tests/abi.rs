//! The C ABI only grows: every declaration of the 0.2 header (`abi/iovmap-0.2.0.h`, the
//! header as released) is still in `include/iovmap.h`, word for word: functions with
//! their parameters, flags and codes with their values, structs with their fields in
//! order. New declarations, enum values and fields may only be added, so that a program
//! built against 0.2 keeps loading the library (`abi-version` stays 0.1).

mod common;

use std::collections::BTreeSet;

use common::{crate_dir, include_dir};

/// The declarations of a header: each `#define` (but the `*_ALL` lists, which grow by
/// design), each enum value on its own, and each other top-level statement (a prototype,
/// a typedef, a struct with its fields), comments dropped and whitespace collapsed.
fn declarations(header: &str) -> BTreeSet<String> {
    let mut code = String::new();
    let mut rest = header;
    while let Some(start) = rest.find("/*") {
        code.push_str(&rest[..start]);
        rest = &rest[rest[start..].find("*/").expect("unterminated comment") + start + 2..];
    }
    code.push_str(rest);
    let mut out = BTreeSet::new();
    let mut statements = String::new();
    for line in code.lines().map(|l| l.split("//").next().unwrap_or("").trim()) {
        if let Some(define) = line.strip_prefix("#define ") {
            if !define.split_whitespace().next().unwrap_or("").ends_with("_ALL") {
                out.insert(format!("#define {}", define.split_whitespace().collect::<Vec<_>>().join(" ")));
            }
        } else if !line.starts_with('#') && !line.starts_with("extern \"C\"") && line != "}" {
            statements.push_str(line);
            statements.push(' ');
        }
    }
    for statement in statements.split_inclusive(';') {
        let s = statement.split_whitespace().collect::<Vec<_>>().join(" ");
        if s.is_empty() || s == ";" {
            continue;
        }
        if let Some(open) = s.strip_prefix("typedef enum ").and_then(|e| e.find('{').map(|i| (e, i))) {
            let (e, i) = open;
            let name = e[..i].trim();
            let body = &e[i + 1..e.rfind('}').expect("enum body")];
            for value in body.split(',').map(str::trim).filter(|v| !v.is_empty()) {
                out.insert(format!("enum {name}: {value}"));
            }
        } else {
            out.insert(s);
        }
    }
    out
}

#[test]
fn the_released_declarations_are_all_still_there() {
    let baseline = std::fs::read_to_string(crate_dir().join("abi/iovmap-0.2.0.h")).unwrap();
    let now = std::fs::read_to_string(include_dir().join("iovmap.h")).unwrap();
    let (was, is) = (declarations(&baseline), declarations(&now));
    assert!(was.len() > 40, "the parser found too little in the baseline: {was:#?}");
    let gone: Vec<&String> = was.difference(&is).collect();
    assert!(gone.is_empty(), "declarations of the 0.2 ABI changed or went away: {gone:#?}");
    let added = is.difference(&was).count();
    println!("{} declarations of 0.2 unchanged, {added} added since", was.len());
}

#[test]
fn the_parser_sees_a_changed_value_or_field() {
    let baseline = std::fs::read_to_string(crate_dir().join("abi/iovmap-0.2.0.h")).unwrap();
    let was = declarations(&baseline);
    for (from, to) in [
        ("IOVMAP_E_NOT_MAPPED = -5", "IOVMAP_E_NOT_MAPPED = -50"),
        ("#define IOVMAP_MAP_POPULATE (1 << 1)", "#define IOVMAP_MAP_POPULATE (1 << 5)"),
        ("uint64_t fd_mapped;", "uint32_t fd_mapped;"),
        ("size_t iovmap_view_len(const struct iovmap_view *v);", "size_t iovmap_view_len(struct iovmap_view *v);"),
    ] {
        assert!(baseline.contains(from), "{from}");
        let changed = declarations(&baseline.replace(from, to));
        assert!(!was.is_subset(&changed), "a change of `{from}` went unseen");
    }
}
