//! The package cache of the guest harnesses (`debian-packages.sh`) under the matrix's
//! concurrency: rows run as parallel subshells of one script and share the cache, so two
//! rows of one architecture fetch and unpack the same busybox at the same moment on a
//! cold cache. Each row must get the whole file: a row that copied a busybox another
//! row was still unpacking booted a guest whose /init failed with EIO (error -5).
//!
//! Real `bash`, `dpkg-deb` and files; the one stand-in is `apt-get`/`apt-cache` for the
//! download (no network in a test): a script that serves a local .deb slowly, in two
//! writes, as a download in progress looks.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Rows started at once in each round (the matrix starts two per architecture; more
/// make the race certain rather than likely), and rounds, each on a cold cache.
const ROWS: usize = 6;
const ROUNDS: usize = 3;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("debian-packages.sh")
}

/// Why this host cannot run the test (the guests of the matrix, which run this suite,
/// have busybox's sh and no dpkg-deb), or None.
fn missing_tools() -> Option<String> {
    for tool in ["bash", "dpkg-deb", "flock", "cmp"] {
        let found = Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output();
        if !found.map(|o| o.status.success()).unwrap_or(false) {
            return Some(format!("{tool} is not installed"));
        }
    }
    None
}

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("iovmap-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Builds `blob_1_all.deb` in `dir` holding `usr/bin/blob`, 24 MiB of bytes no two
/// pages of which are alike (a truncated or mixed copy cannot compare equal), and
/// returns the payload's path.
fn build_deb(dir: &Path) -> PathBuf {
    let pkg = dir.join("pkg");
    fs::create_dir_all(pkg.join("DEBIAN")).unwrap();
    fs::create_dir_all(pkg.join("usr/bin")).unwrap();
    fs::write(
        pkg.join("DEBIAN/control"),
        "Package: blob\nVersion: 1\nArchitecture: all\nMaintainer: iovmap tests <tests@invalid>\nDescription: a payload\n",
    )
    .unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let bytes: Vec<u8> = (0..24usize << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let payload = pkg.join("usr/bin/blob");
    fs::write(&payload, &bytes).unwrap();
    let out = Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zgzip", "-z1", "--build"])
        .arg(&pkg)
        .arg(dir.join("blob_1_all.deb"))
        .output()
        .unwrap();
    assert!(out.status.success(), "dpkg-deb --build: {}", String::from_utf8_lossy(&out.stderr));
    payload
}

/// Runs `body` in bash with debian-packages.sh sourced, the cache in `dir/cache`, a
/// suite whose lists count as fresh, and the stand-in apt on PATH; returns its output.
fn run(dir: &Path, body: &str) -> String {
    let cache = dir.join("cache");
    let lists = cache.join("apt/sid");
    fs::create_dir_all(lists.join("lists/partial")).unwrap();
    fs::create_dir_all(lists.join("cache/archives/partial")).unwrap();
    fs::write(lists.join("debian.sources"), "").unwrap();
    fs::write(lists.join("updated"), "").unwrap();
    let bin = dir.join("fake-bin");
    fs::create_dir_all(&bin).unwrap();
    let deb = dir.join("blob_1_all.deb");
    // apt-cache show: the record's Filename; apt-get download: the .deb into the current
    // directory, its first 64 KiB first, the rest 200 ms later.
    let fake = [
        ("apt-cache", "#!/bin/sh\necho 'Filename: pool/main/b/blob/blob_1_all.deb'\n".to_string()),
        (
            "apt-get",
            format!(
                "#!/bin/sh\nhead -c 65536 '{d}' > blob_1_all.deb\nsleep 0.2\ncat '{d}' > blob_1_all.deb\n",
                d = deb.display()
            ),
        ),
    ];
    for (name, text) in fake {
        let path = bin.join(name);
        fs::write(&path, text).unwrap();
        let mut perm = fs::metadata(&path).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
        fs::set_permissions(&path, perm).unwrap();
    }
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("set -u\n. '{}'\n{body}", script().display()))
        .env("IOVMAP_CACHE", &cache)
        .env("PATH", path)
        .current_dir(dir)
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "bash exited with {}:\n{text}", out.status);
    text
}

/// What each row of the matrix does with busybox (harness.sh, vm_initramfs): fetch the
/// package, unpack it into the shared directory, copy the binary out. Rows start
/// together, on a cold cache, as the matrix starts them.
#[test]
fn rows_that_unpack_one_package_at_once_each_get_all_of_it() {
    if let Some(why) = missing_tools() {
        eprintln!("SKIP: {why}: the package cache is a host-side script");
        return;
    }
    for round in 0..ROUNDS {
        let dir = Scratch::new(&format!("package-cache-{round}"));
        let payload = build_deb(&dir.0);
        let body = format!(
            r#"
for i in $(seq {ROWS}); do
  (
    deb=$(deb_fetch sid blob all) || {{ echo "row $i: deb_fetch failed"; exit 1; }}
    deb_unpack "$deb" "$IOVMAP_CACHE/blob-all" || {{ echo "row $i: deb_unpack failed"; exit 1; }}
    cp "$IOVMAP_CACHE/blob-all/usr/bin/blob" "copy.$i"
  ) &
done
fail=0
for job in $(jobs -p); do wait "$job" || fail=1; done
for i in $(seq {ROWS}); do
  cmp -s '{payload}' "copy.$i" || {{ echo "row $i: copy differs ($(stat -c %s "copy.$i") bytes)"; fail=1; }}
done
[ "$fail" = 0 ] && echo "all {ROWS} rows got the whole file"
"#,
            payload = payload.display()
        );
        let text = run(&dir.0, &body);
        assert!(
            text.contains(&format!("all {ROWS} rows got the whole file")),
            "round {round}, {ROWS} rows at once on a cold cache:\n{text}"
        );
    }
}
