"""A lower bound on a throughput workload's run time for a dense model on the H200, from the workload's own request
lengths: how close a measured out tok/s (ours, vLLM's) is to what the hardware allows, and whether a goal fits
under it.

Three parts, each bounded by itself (the kernels of a step run one after another, so the bounds add up):

* decode attention: every generated token reads the K and V of its whole context (of a sliding-window layer, the
  last ``window`` positions) once, from HBM: ``sum over tokens of context x bytes per position`` / copy bandwidth;
* linear layers: every prompt and output token is one row through every weight matrix (the LM head only for the
  rows that sample: outputs and each prompt's last token): ``2 x rows x weights`` FLOPs at the measured bf16 peak,
  or, if larger, one read of the weights per decode step for at least ``max(output lengths)`` steps;
* prefill attention: causal ``QK^T`` and ``PV`` over each prompt at the bf16 peak (small next to the others).

Everything else (norms, rotary, sampling, host work, prefill/decode imbalance) is left out, so a real engine stays
above this time. Defaults are the H200 figures of ``.library/device``: 4.28 TB/s copy, 771 TFLOP/s bf16.

    python -m benchmarks.roofline --workload W2 --model .models/gemma-2-9b --measured pagedserve=6085 vllm=6398 \\
        --goal 7038
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.throughput import make_workload

H200_COPY_BYTES_PER_S = 4.28e12
H200_BF16_FLOPS = 771e12


@dataclass(frozen=True)
class Roofline:
    decode_attention_s: float
    linear_s: float
    linear_compute_s: float
    linear_weight_stream_s: float
    prefill_attention_s: float
    output_tokens: int
    # Not a bound: the linear layers if every request decodes from the same step on (prefills first, at the peak),
    # each decode step costing the larger of its FLOPs and one read of the weights as the batch drains.
    linear_all_at_once_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.decode_attention_s + self.linear_s + self.prefill_attention_s

    @property
    def ceiling_tok_s(self) -> float:
        return self.output_tokens / self.total_s


def dense_weights(cfg) -> tuple[int, int]:
    """(weights of the decoder layers' linear layers, weights of the LM head)."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_layer = cfg.hidden_size * (q + 2 * kv) + q * cfg.hidden_size + 3 * cfg.hidden_size * cfg.intermediate_size
    return cfg.num_layers * per_layer, cfg.vocab_size * cfg.hidden_size


def kv_read_bytes(cfg, contexts: np.ndarray, kv_bytes: int = 2) -> float:
    """Bytes of K and V that decoding reads for queries at these context lengths: every position of every layer, a
    sliding-window layer's last ``window`` only."""
    position_bytes = 2 * cfg.num_kv_heads * cfg.head_dim * kv_bytes  # K and V of one position in one layer
    contexts = np.asarray(contexts, dtype=np.float64)
    positions = 0.0
    for layer in range(cfg.num_layers):
        window = cfg.sliding_windows[layer] if cfg.sliding_windows else 0
        positions += float(np.minimum(contexts, window).sum() if window else contexts.sum())
    return positions * position_bytes


def step_linear_s(cfg, rows, sampled_rows, *, weight_bytes: float = 2, bandwidth: float = H200_COPY_BYTES_PER_S,
                  flops: float = H200_BF16_FLOPS):
    """One step's linear layers (numbers or arrays of steps): ``rows`` through the decoder layers, ``sampled_rows``
    through the LM head, at the FLOP peak or one read of the weights, whichever is longer."""
    layer_weights, head_weights = dense_weights(cfg)
    compute = 2 * (np.asarray(rows) * layer_weights + np.asarray(sampled_rows) * head_weights) / flops
    return np.maximum(compute, (layer_weights + head_weights) * weight_bytes / bandwidth)


def roofline(cfg, input_lens: np.ndarray, output_lens: np.ndarray, *, kv_bytes: int = 2, weight_bytes: float = 2,
             bandwidth: float = H200_COPY_BYTES_PER_S, flops: float = H200_BF16_FLOPS) -> Roofline:
    inputs, outputs = input_lens.astype(np.float64), output_lens.astype(np.float64)
    # Decode attention: token t of a request (t = 0 .. out - 1) reads in + t positions.
    contexts = np.concatenate([i + np.arange(o) for i, o in zip(inputs, outputs)])
    decode_attention_s = kv_read_bytes(cfg, contexts, kv_bytes) / bandwidth
    layer_weights, head_weights = dense_weights(cfg)
    rows = inputs.sum() + outputs.sum()
    sampled_rows = outputs.sum() + len(inputs)
    linear_compute_s = 2 * (rows * layer_weights + sampled_rows * head_weights) / flops
    linear_weight_stream_s = outputs.max() * (layer_weights + head_weights) * weight_bytes / bandwidth
    batch_per_step = (outputs[None, :] > np.arange(int(outputs.max()))[:, None]).sum(1)
    prefill_linear_s = 2 * (inputs.sum() * layer_weights + len(inputs) * head_weights) / flops
    decode_linear_s = step_linear_s(cfg, batch_per_step, batch_per_step, weight_bytes=weight_bytes,
                                    bandwidth=bandwidth, flops=flops)
    linear_all_at_once_s = prefill_linear_s + float(decode_linear_s.sum())
    # Causal prefill: QK^T and PV each 2 * L^2 / 2 * head_dim FLOPs per query head and layer.
    prefill_flops = 2 * float((inputs**2).sum()) * cfg.head_dim * cfg.num_heads * cfg.num_layers
    return Roofline(decode_attention_s, max(linear_compute_s, linear_weight_stream_s), linear_compute_s,
                    linear_weight_stream_s, prefill_flops / flops, int(outputs.sum()), linear_all_at_once_s)


def load_model_config(model: str):
    from core.config import ModelConfig

    raw = json.loads((Path(model) / "config.json").read_text())
    if any(key in raw for key in ("num_experts", "num_local_experts", "n_routed_experts")):
        raise SystemExit(f"{model}: a mixture of experts; this bound is for dense models")
    return ModelConfig.from_hf_dict(raw)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="W2")
    p.add_argument("--model", required=True, help="a directory with config.json")
    p.add_argument("--num-prompts", type=int, default=None)
    p.add_argument("--kv-bytes", type=int, default=2, help="bytes per KV element (2 = bf16, 1 = fp8)")
    p.add_argument("--measured", nargs="*", default=[], metavar="NAME=TOK_S", help="measured out tok/s to compare")
    p.add_argument("--goal", type=float, default=None, help="a goal in out tok/s to place under the ceiling")
    args = p.parse_args(argv)
    cfg = load_model_config(args.model)
    workload = make_workload(args.workload, args.num_prompts)
    bound = roofline(cfg, np.array([len(p) for p in workload.prompts]), np.array(workload.max_tokens),
                     kv_bytes=args.kv_bytes)
    print(f"{args.workload} on {args.model}: {len(workload.prompts)} requests, {bound.output_tokens} output tokens")
    print(f"  decode attention (KV reads at {H200_COPY_BYTES_PER_S / 1e12:.2f} TB/s)  {bound.decode_attention_s:7.2f} s")
    print(f"  linear layers: compute {bound.linear_compute_s:.2f} s, weight reads {bound.linear_weight_stream_s:.2f} s"
          f" -> {bound.linear_s:7.2f} s")
    print(f"  prefill attention (bf16 peak)                  {bound.prefill_attention_s:7.2f} s")
    print(f"  lower bound on the run                         {bound.total_s:7.2f} s = "
          f"ceiling {bound.ceiling_tok_s:,.0f} out tok/s")
    estimate = bound.total_s - bound.linear_s + bound.linear_all_at_once_s
    print(f"  estimate with the batch of an all-at-once schedule (linear layers {bound.linear_all_at_once_s:.2f} s): "
          f"{estimate:.2f} s = {bound.output_tokens / estimate:,.0f} out tok/s")
    for item in args.measured:
        name, value = item.split("=")
        print(f"  {name}: {float(value):,.0f} out tok/s = {float(value) / bound.ceiling_tok_s:.2f} of the ceiling")
    if args.goal:
        print(f"  goal: {args.goal:,.0f} out tok/s = {args.goal / bound.ceiling_tok_s:.2f} of the ceiling")
    return 0


if __name__ == "__main__":
    sys.exit(main())
