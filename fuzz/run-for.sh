#!/usr/bin/env bash
# Runs every fuzz target for HOURS hours in total (split evenly, one target
# after the other, in rounds of at most 30 minutes each so that every target
# is fuzzed early even in a long run), each on its own growing corpus.
#
#   fuzz/run-for.sh HOURS [JOBS]
#
# HOURS may be fractional (0.5). JOBS (default 1) is libFuzzer's -jobs/-workers
# count per target. Needs cargo-fuzz (`cargo install cargo-fuzz`) and a
# nightly toolchain (or RAMPART_FUZZ_TOOLCHAIN=stable, which sets
# RUSTC_BOOTSTRAP=1). Corpora grow in fuzz/corpus/<target>/ (seeded from
# fuzz/seeds/<target>/), crashes land in fuzz/artifacts/<target>/, and a
# summary (seconds fuzzed, executions, crashes (with leaks and inputs over
# 2 GB of RSS) and timeouts per target, as libFuzzer counted them; a timeout is an input over 10 s, which on a
# starved machine may only mean that the fuzzer got no CPU: rerun it) is
# written to fuzz/artifacts/run-for-summary.txt and printed. Exits 1 when
# any target crashed. Meant for a scheduled job: it stops by itself.
#
# The targets are built once, at the start; the rounds then run the built
# binaries, so the sources may change (a developer keeps working in the
# tree) without rebuilding or breaking a long run.
set -euo pipefail

hours=${1:?usage: fuzz/run-for.sh HOURS [JOBS]}
jobs=${2:-1}
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"

toolchain=${RAMPART_FUZZ_TOOLCHAIN:-nightly}
cargo_fuzz=(cargo "+$toolchain" fuzz)
if [ "$toolchain" = stable ]; then
    export RUSTC_BOOTSTRAP=1
fi
command -v cargo-fuzz >/dev/null || {
    echo "cargo-fuzz is missing: cargo install cargo-fuzz" >&2
    exit 2
}

mapfile -t targets < <("${cargo_fuzz[@]}" list)
[ "${#targets[@]}" -gt 0 ] || { echo "no fuzz targets" >&2; exit 2; }

total=$(awk -v h="$hours" 'BEGIN { printf "%d", h * 3600 }')
per_target=$((total / ${#targets[@]}))
[ "$per_target" -gt 0 ] || { echo "HOURS too small for ${#targets[@]} targets" >&2; exit 2; }
round=$((per_target < 1800 ? per_target : 1800))
rounds=$(((per_target + round - 1) / round))

echo "fuzzing ${#targets[@]} targets for ${hours} h: ${per_target} s each, in ${rounds} round(s) of ${round} s"
"${cargo_fuzz[@]}" build --release >/dev/null
triple=$(rustc "+$toolchain" -vV | sed -n 's/^host: //p')
bin_dir=${CARGO_TARGET_DIR:-$here/target}/$triple/release
for t in "${targets[@]}"; do
    [ -x "$bin_dir/$t" ] || { echo "built target missing: $bin_dir/$t" >&2; exit 2; }
done
# As `cargo fuzz run` runs them (ASan's ODR check trips on Rust's
# duplicated symbols).
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_odr_violation=0}
# The last fork-mode status line (`#N: cov: ...`) of a round's log: N is
# the number of inputs libFuzzer executed in that round.
executions() {
    sed -n 's/^#\([0-9][0-9]*\): cov:.*/\1/p' "$1" | tail -n 1
}

declare -A spent crashes execs timeouts
for t in "${targets[@]}"; do
    spent[$t]=0
    timeouts[$t]=0
    crashes[$t]=0
    execs[$t]=0
    mkdir -p "corpus/$t" "artifacts/$t"
done

for ((r = 1; r <= rounds; r++)); do
    for t in "${targets[@]}"; do
        left=$((per_target - spent[$t]))
        [ "$left" -gt 0 ] || continue
        slice=$((left < round ? left : round))
        echo "round $r/$rounds: $t for ${slice} s"
        start=$(date +%s)
        before=$(find "artifacts/$t" -type f \( -name 'crash-*' -o -name 'leak-*' -o -name 'oom-*' \) | wc -l)
        slow_before=$(find "artifacts/$t" -type f -name 'timeout-*' | wc -l)
        # A crash stops this slice; -fork mode keeps going after one and
        # writes every crash to artifacts/.
        set +e
        "$bin_dir/$t" -artifact_prefix="$here/artifacts/$t/" "corpus/$t" "seeds/$t" \
            -max_total_time="$slice" -fork="$jobs" -ignore_crashes=1 -ignore_timeouts=1 \
            -ignore_ooms=1 -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
            >"artifacts/$t/round-$r.log" 2>&1
        set -e
        after=$(find "artifacts/$t" -type f \( -name 'crash-*' -o -name 'leak-*' -o -name 'oom-*' \) | wc -l)
        slow_after=$(find "artifacts/$t" -type f -name 'timeout-*' | wc -l)
        timeouts[$t]=$((timeouts[$t] + slow_after - slow_before))
        spent[$t]=$((spent[$t] + $(date +%s) - start))
        n=$(executions "artifacts/$t/round-$r.log")
        execs[$t]=$((execs[$t] + ${n:-0}))
        crashes[$t]=$((crashes[$t] + after - before))
    done
done

summary=artifacts/run-for-summary.txt
{
    echo "fuzz/run-for.sh $hours (finished $(date -u +%FT%TZ))"
    printf '%-16s %10s %14s %8s %9s\n' target seconds executions crashes timeouts
    for t in "${targets[@]}"; do
        printf '%-16s %10s %14s %8s %9s\n' "$t" "${spent[$t]}" "${execs[$t]}" "${crashes[$t]}" "${timeouts[$t]}"
    done
} | tee "$summary"
found=0
for t in "${targets[@]}"; do
    found=$((found + crashes[$t]))
done
[ "$found" -eq 0 ] || { echo "crashes: see fuzz/artifacts/<target>/" >&2; exit 1; }
