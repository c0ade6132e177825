#!/usr/bin/env bash
# Fuzz campaigns for iovmap (docs/fuzzing.md).
#
#   fuzz/run.sh <seconds> [plan|maps|view]...   run each target (default: all) for <seconds>,
#                                               one after the other, at the lowest CPU priority
#   fuzz/run.sh cmin [plan|maps|view]...        merge what the campaigns found into the
#                                               committed seeds, minimised (cargo fuzz cmin)
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
  for t in "${targets[@]}"; do
    before=$(ls "corpus/$t" | wc -l)
    # Hand-written seeds (seed-*) stay whatever their coverage.
    keep=$(mktemp -d)
    cp corpus/"$t"/seed-* "$keep"/ 2>/dev/null || true
    [ -d "$work/$t" ] && cp -n "$work/$t"/* "corpus/$t"/ 2>/dev/null || true
    nice -n 19 cargo +nightly fuzz cmin -s none "$t" "corpus/$t" -- -max_len=4096 2>&1 | grep -E "MERGE-OUTER: [0-9]+ new files" || true
    cp "$keep"/* "corpus/$t"/ 2>/dev/null || true
    rm -rf "$keep"
    echo "$t: corpus/$t had $before files, now $(ls "corpus/$t" | wc -l) ($(du -sh "corpus/$t" | cut -f1))"
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
