#!/usr/bin/env bash
# W5 of shared/BENCHMARKS.md: pagedserve serving SmolLM2-135M (dummy weights), driven by our `bench serve` with
# vLLM's flags. Usage: benchmarks/run_w5.sh MODEL_DIR [RESULT_DIR]   (MODEL_DIR holds config.json + tokenizer)
# Env: API_SERVER_COUNT (serve --api-server-count; default: the server's own, from the cores), CONCURRENCY (256),
# NUM_PROMPTS (1000), PORT, PYSPY_OUT (profile every process of the tree), SERVER_ARGS (extra `serve` flags, e.g.
# "--max-num-batched-tokens 4096"), BENCH_ARGS (extra `bench serve` flags, e.g. "--save-detailed --no-plots"),
# RESULT_FILENAME (the result JSON's name inside RESULT_DIR; default: vLLM's naming).
set -euo pipefail
model=${1:?model directory}
results=${2:-benchmarks/results}
port=${PORT:-8000}
python -m frontend.cli serve "$model" --load-format dummy --max-model-len 4096 --gpu-memory-utilization 0.9 \
  --port "$port" ${API_SERVER_COUNT:+--api-server-count "$API_SERVER_COUNT"} ${SERVER_ARGS:-} > "$results.server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 300); do
  curl -sf "http://localhost:$port/health" > /dev/null && break
  kill -0 $server 2>/dev/null || { echo "server died"; tail -30 "$results.server.log"; exit 1; }
  sleep 1
done
if [ -n "${PYSPY_OUT:-}" ]; then  # sample both processes' Python stacks once the load is on (needs py-spy)
  ( until curl -s "http://localhost:$port/metrics" | grep -q '^vllm:num_requests_running{.*} [1-9]'; do sleep 0.2; done
    sleep 1
    py-spy record --pid "$server" --subprocesses --rate 250 --duration "${PYSPY_SECONDS:-4}" --format raw \
      --output "$PYSPY_OUT" --nonblocking > /dev/null 2>&1 ) &
fi
compiled_before=$( [ -n "${TRITON_CACHE_DIR:-}" ] && ls "$TRITON_CACHE_DIR" | sort || true)
python -m benchmarks.serve --backend vllm --port "$port" --endpoint /v1/completions --dataset-name random \
  --random-input-len 512 --random-output-len 128 --num-prompts "${NUM_PROMPTS:-1000}" --max-concurrency "${CONCURRENCY:-256}" --ignore-eos --seed 0 \
  --tokenizer "$model" --save-result --result-dir "$results" --disable-tqdm \
  ${RESULT_FILENAME:+--result-filename "$RESULT_FILENAME"} ${BENCH_ARGS:-}
# The server's side of the tail: event-loop lag and GC pauses of the API processes, tokens per engine step
curl -sf "http://localhost:$port/metrics" > "$results.metrics.txt" || echo "could not read /metrics"
if [ -n "${TRITON_CACHE_DIR:-}" ]; then  # kernels compiled while serving (each one stalls the engine)
  comm -13 <(echo "$compiled_before") <(ls "$TRITON_CACHE_DIR" | sort) | while read -r entry; do
    ls "$TRITON_CACHE_DIR/$entry" | grep '\.json$' | grep -v '^__grp__' ; done | sed 's/^/compiled while serving: /'
fi
