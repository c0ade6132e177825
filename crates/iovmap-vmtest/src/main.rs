//! The guest side of issue 7's VM test, and its host-side check.
//!
//! ```text
//! iovmap-vmtest guest --ivshmem <BDF> [--nvme <BDF>] [--stress-secs N] [--threads N] [--builders N]
//! iovmap-vmtest host-check <ivshmem backing file>
//! iovmap-vmtest facts [--ivshmem <BDF>]
//! ```
//!
//! `guest` runs inside the VM that `run.sh` boots (it refuses to run where there is no
//! /dev/vfio/vfio): it uses iovmap on the ivshmem device's BAR2 exactly as a VMM would and
//! prints one `CHECK` line per check and a `VMTEST:` verdict line. `host-check` runs on the
//! host after the guest powered off and compares the ivshmem backing file with the image
//! the guest must have left. `facts` measures what the kernel offers iovmap (holes,
//! PROCMAP_QUERY, populate, udmabuf, a vfio BAR, mseal: [`iovmap_vmtest::facts`]), for
//! each row of the kernel matrix (`matrix.sh`). See docs/vfio.md.

mod guest;

use std::process::ExitCode;
use std::time::Duration;

use iovmap_vmtest::device;
use iovmap_vmtest::layout;

const USAGE: &str = "\
usage: iovmap-vmtest guest --ivshmem <BDF> [--nvme <BDF>] [--stress-secs N] [--threads N] [--builders N]
       iovmap-vmtest host-check <ivshmem backing file>
       iovmap-vmtest facts [--ivshmem <BDF>]

`guest` runs inside the VM that crates/iovmap-vmtest/run.sh boots (it needs the ivshmem
device bound to vfio-pci); `host-check` checks the backing file on the host afterwards.";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("guest") => guest(&args[1..]),
        Some("host-check") => host_check(&args[1..]),
        Some("facts") => facts(&args[1..]),
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn host_check(args: &[String]) -> ExitCode {
    let [path] = args else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    match std::fs::read(path) {
        Err(e) => {
            println!("HOSTCHECK: FAIL cannot read {path}: {e}");
            ExitCode::FAILURE
        }
        Ok(image) => match layout::check_image(&image) {
            Ok(s) => {
                println!("HOSTCHECK: PASS {path}: {s}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                println!("HOSTCHECK: FAIL {path}: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

fn facts(args: &[String]) -> ExitCode {
    let ivshmem = match args {
        [] => None,
        [flag, bdf] if flag == "--ivshmem" => match device::parse_bdf(bdf) {
            Ok(b) => Some(b),
            Err(e) => {
                eprintln!("iovmap-vmtest: {e}\n{USAGE}");
                return ExitCode::from(2);
            }
        },
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    if iovmap_vmtest::facts::report(ivshmem.as_deref()) { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

struct Opts {
    ivshmem: String,
    nvme: Option<String>,
    stress: Duration,
    threads: usize,
    builders: usize,
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts { ivshmem: String::new(), nvme: None, stress: Duration::from_secs(3), threads: 4, builders: 2 };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().cloned().ok_or_else(|| format!("{a} needs a value"));
        let num = |v: String| v.parse::<u64>().map_err(|_| format!("{a}: not a number: {v}"));
        match a.as_str() {
            "--ivshmem" => o.ivshmem = device::parse_bdf(&val()?)?,
            "--nvme" => o.nvme = Some(device::parse_bdf(&val()?)?),
            "--stress-secs" => o.stress = Duration::from_millis((num(val()?)? * 1000).max(100)),
            "--threads" => o.threads = num(val()?)?.clamp(1, 64) as usize,
            "--builders" => o.builders = num(val()?)?.clamp(1, 16) as usize,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if o.ivshmem.is_empty() {
        return Err("--ivshmem <BDF> is required".into());
    }
    Ok(o)
}

fn guest(args: &[String]) -> ExitCode {
    let opts = match parse(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("iovmap-vmtest: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = device::preflight(&opts.ivshmem) {
        println!("VMTEST: FAIL not in the test VM, or the VM is not set up: {e}");
        return ExitCode::from(2);
    }
    guest::run(&opts)
}
