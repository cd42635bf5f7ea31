#!/usr/bin/env bash
# W5 at concurrency 256 and 32 back to back (and again with VARIANT_ARGS, when set), one summary line per run.
# Usage: benchmarks/run_w5_matrix.sh MODEL_DIR [OUT_DIR]
# Env: API_SERVER_COUNT (4), CONCURRENCIES ("256 32"), SERVER_ARGS (serve flags of every run), VARIANT_ARGS (serve
# flags of a second set of runs, e.g. "--max-num-batched-tokens 2048"), NUM_PROMPTS (1000), PORT.
# Each run is benchmarks/run_w5.sh (its own server: ~20 s startup + the load; ~6 s at 256 and ~20 s at 32 on the
# H200), saved with per-request data so the summary can say whether the ITL tail sits in the ramp or after it.
set -euo pipefail
model=${1:?model directory}
out=${2:-benchmarks/results/w5_matrix}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
export API_SERVER_COUNT=${API_SERVER_COUNT:-4}
variants=("base")
[ -n "${VARIANT_ARGS:-}" ] && variants+=("variant")
summaries=()
for variant in "${variants[@]}"; do
  args=${SERVER_ARGS:-}
  [ "$variant" = variant ] && args="$args $VARIANT_ARGS"
  for concurrency in ${CONCURRENCIES:-256 32}; do
    name="w5-c$concurrency-$variant"
    echo "=== $name: API_SERVER_COUNT=$API_SERVER_COUNT serve flags: ${args:-(none)}"
    started=$(date +%s)
    if SERVER_ARGS="$args" CONCURRENCY=$concurrency RESULT_FILENAME="$name.json" \
        BENCH_ARGS="--save-detailed --no-plots" bash "$here/run_w5.sh" "$model" "$out/$name" > "$out/$name.bench.log" 2>&1; then
      line=$(python -m benchmarks.w5_summary "$out/$name/$name.json" --metrics "$out/$name.metrics.txt" \
        --server-log "$out/$name.server.log")
    else
      line="$name: FAILED (see $out/$name.bench.log and $out/$name.server.log): $(tail -3 "$out/$name.bench.log" | tr '\n' ' ')"
    fi
    line="$line [flags: ${args:-none}; $(( $(date +%s) - started )) s]"
    echo "$line"
    summaries+=("$line")
  done
done
echo "=== summary (API_SERVER_COUNT=$API_SERVER_COUNT)"
printf '%s\n' "${summaries[@]}"
