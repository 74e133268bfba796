#!/usr/bin/env bash
# Run every fuzz target for SECONDS each (default 60) and print one line per target:
#   fuzz: target=NAME seconds=N runs=N corpus=N crashes=0
# Needs cargo-fuzz (installed here if missing). The stable toolchain builds it with
# RUSTC_BOOTSTRAP=1, which lets it take the sanitizer flags cargo fuzz passes.
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-60}"
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
export RUSTC_BOOTSTRAP=1
for target in $(cargo fuzz list); do
    mkdir -p "corpus/$target"
    log="$(mktemp)"
    status=0
    cargo fuzz run "$target" "corpus/$target" -- -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1 || status=$?
    runs="$(grep -oE '^stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' || echo 0)"
    corpus="$(find "corpus/$target" -type f | wc -l)"
    crashes="$(find "artifacts/$target" -type f 2>/dev/null | wc -l)"
    echo "fuzz: target=$target seconds=$seconds runs=$runs corpus=$corpus crashes=$crashes"
    if [ "$status" -ne 0 ] || [ "$crashes" -ne 0 ]; then
        tail -40 "$log"
        exit 1
    fi
done
