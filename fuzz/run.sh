#!/usr/bin/env bash
# Fuzz campaigns for iovmap (docs/fuzzing.md).
#
#   fuzz/run.sh <seconds> [plan|maps|view]...   run each target (default: all) for <seconds>,
#                                               one after the other, at the lowest CPU priority
#   fuzz/run.sh cmin [plan|maps|view]...        merge what the campaigns found into the
#                                               committed seeds, minimised (a set cover)
#
# Each campaign starts from the committed seeds (fuzz/corpus/<target>, read-only) and
# grows its own corpus in fuzz/target/campaign/<target> (ignored by git, kept between
# runs). Crashes go to fuzz/artifacts/<target>/ (ignored by git): turn each into a file of
# fuzz/regressions/<target>/ and a named test (crates/iovmap-fuzz-targets/tests/replay*.rs).
#
# Needs the nightly toolchain and cargo-fuzz (cargo install cargo-fuzz). No sanitizer
# (-s none): plan and maps are safe Rust, checked with overflow checks and debug
# assertions (cargo fuzz's default build); view counts the process's VMAs and fds, which
# a sanitizer's allocator would change behind its back.
set -euo pipefail
cd "$(dirname "$0")"

all=(plan maps view)
usage() { echo "usage: $0 <seconds> [${all[*]}]... | $0 cmin [${all[*]}]..." >&2; exit 2; }
[ $# -ge 1 ] || usage
mode=$1
shift
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${all[@]}")
work=target/campaign

if [ "$mode" = cmin ]; then
  # A set cover by edge coverage (not libFuzzer's finer features): dozens of files per
  # target. Seeds named seed-* (hand-written, seed-kills-*) stay, and count as covered.
  host=$(rustc -vV | sed -n 's/^host: //p')
  for t in "${targets[@]}"; do
    nice -n 19 cargo +nightly fuzz build -s none "$t" >/dev/null
    before=$(ls "corpus/$t" | wc -l)
    out=$(mktemp -d)
    cp corpus/"$t"/seed-* "$out"/ 2>/dev/null || true
    pool=$(mktemp -d)
    find "corpus/$t" "$work/$t" -maxdepth 1 -type f ! -name 'seed-*' -exec cp -t "$pool" {} + 2>/dev/null || true
    nice -n 19 "target/$host/release/$t" -set_cover_merge=1 -use_counters=0 -use_cmp=0 "$out" "$pool" 2>&1 |
      grep -E "MERGE-OUTER: [0-9]+ new files" || true
    rm -rf "corpus/$t" "$pool"
    mv "$out" "corpus/$t"
    chmod 755 "corpus/$t"
    echo "$t: corpus/$t had $before files, now $(ls "corpus/$t" | wc -l) ($(du -sh --apparent-size "corpus/$t" | cut -f1))"
  done
  exit 0
fi

[[ "$mode" =~ ^[0-9]+$ ]] || usage
secs=$mode
for t in "${targets[@]}"; do nice -n 19 cargo +nightly fuzz build -s none "$t" >/dev/null; done
for t in "${targets[@]}"; do
  mkdir -p "$work/$t" "artifacts/$t"
  log="$work/$t.log"
  echo "== $t: ${secs}s, from corpus/$t and $work/$t (log: fuzz/$log)"
  start=$(date -u +%FT%TZ)
  # -timeout: a single input running 10 s is a hang, a finding like a crash.
  set +e
  nice -n 19 cargo +nightly fuzz run -s none "$t" "$work/$t" "corpus/$t" -- \
    -max_total_time="$secs" -timeout=10 -print_final_stats=1 -artifact_prefix="artifacts/$t/" >"$log" 2>&1
  status=$?
  set -e
  last=$(grep -E '^#[0-9]+' "$log" | tail -1)
  echo "   started $start, exit status $status"
  echo "   last status line: $last"
  grep -E '^(Done|stat::number_of_executed_units|stat::average_exec_per_sec|stat::new_units_added|stat::peak_rss_mb)' "$log" | sed 's/^/   /'
  crashes=$(ls "artifacts/$t" | wc -l)
  echo "   artifacts/$t: $crashes file(s)"
done
