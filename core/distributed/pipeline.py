"""Pipeline parallelism for the Llama family (and the MoE models on its attention): contiguous blocks of layers per
stage, activations passed with torch.distributed send/recv.

Each stage builds only its own layers (and KV cache). The first stage embeds and runs its layers, the next stages
receive (hidden, residual) from the previous one; the last stage applies the final norm and sends the hidden states
back to the first stage (through a group of its own), which holds the engine core: it computes the logits and
samples, so results never leave the engine-core process. Sends are asynchronous, so with several micro-batches in
flight stage k works on batch i + 1 while stage k + 1 works on batch i. Every stage also builds the
(vocabulary-parallel) embedding and LM head, so one checkpoint placement rule serves all stages.
"""

from __future__ import annotations

import dataclasses
import re
from collections import deque
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from core.config import ModelConfig
from core.distributed.parallel_state import TensorParallelGroup
from core.layers.attention import AttentionMetadata


def stage_layers(num_layers: int, pp: int, stage: int) -> tuple[int, int]:
    """[start, end) of the stage's layers: equal blocks, the first ``num_layers % pp`` stages one layer more."""
    base, extra = divmod(num_layers, pp)
    start = stage * base + min(stage, extra)
    return start, start + base + (1 if stage < extra else 0)


def stage_config(cfg: ModelConfig, pp: int, stage: int) -> ModelConfig:
    start, end = stage_layers(cfg.num_layers, pp, stage)
    windows = cfg.sliding_windows[start:end] if cfg.sliding_windows else ()
    per_layer = {}
    if getattr(cfg, "sparse_layers", ()):  # a mixture of experts: which of the stage's layers are sparse
        per_layer["sparse_layers"] = cfg.sparse_layers[start:end]
    if cfg.quantization is not None:  # its per-layer choices are made by the checkpoint's layer names
        per_layer["quantization"] = cfg.quantization.for_stage(start)
    return dataclasses.replace(cfg, num_layers=end - start, sliding_windows=windows, **per_layer)


_LAYER = re.compile(r"^(.*\blayers\.)(\d+)(\..*)$")


def stage_weights(weights: Iterable[tuple[str, torch.Tensor]], start: int, end: int
                  ) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors for a stage: layers ``start..end`` renumbered from 0; other layers skipped."""
    for name, tensor in weights:
        match = _LAYER.match(name)
        if match is None:
            yield name, tensor
            continue
        index = int(match.group(2))
        if start <= index < end:
            yield f"{match.group(1)}{index - start}{match.group(3)}", tensor


class PendingHidden:
    """The first stage's view of a micro-batch in flight: the final hidden states arrive from the last stage into
    ``buffer``; ``wait()`` returns them (on CUDA it only orders the stream after the receive, no host sync)."""

    def __init__(self, buffer: torch.Tensor, work) -> None:
        self.buffer = buffer
        self.work = work

    def wait(self) -> torch.Tensor:
        self.work.wait()
        return self.buffer


class PipelineStage(nn.Module):
    """One stage of a Llama-family model (built from ``stage_config``): the runner calls it like the whole model.

    ``start`` runs this stage's part of a micro-batch and returns without waiting for the later stages, so the engine
    can start the next micro-batch on this stage while the later ones work on this one (core/engine.py keeps up to
    ``pipeline_micro_batches`` in flight). Every rank handles the micro-batches in the same order, so the sends and
    receives pair up without tags."""

    # Sends whose work is still held: a stage may run this many micro-batches ahead of its consumer.
    _MAX_PENDING_SENDS = 8

    def __init__(self, model: nn.Module, group: TensorParallelGroup) -> None:
        super().__init__()
        self.model = model
        self.group = group
        self.hidden_size = model.config.hidden_size
        self._sends: deque = deque()  # (work, tensor) of sends not known to be complete

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        """Stage 0: the final hidden states (from the last stage), waited for; other stages: this stage's output
        (unused)."""
        out = self.start(input_ids, positions, kv_caches, meta)
        return out.wait() if isinstance(out, PendingHidden) else out

    def start(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
              meta: AttentionMetadata) -> PendingHidden | torch.Tensor:
        """Run this stage's layers on one micro-batch and send the result on. Stage 0: a ``PendingHidden`` for the
        final hidden states; other stages: this stage's output (already sent)."""
        inner, group = self.model.model, self.group
        num_tokens = input_ids.shape[0]
        dtype = inner.norm.weight.dtype
        if group.is_first_stage:
            hidden, residual = inner.embed_tokens(input_ids), None
        else:
            received = group.recv_prev(torch.empty((2, num_tokens, self.hidden_size), dtype=dtype,
                                                   device=input_ids.device))
            hidden, residual = received[0], received[1]
        for layer, kv_cache in zip(inner.layers, kv_caches):
            hidden, residual = layer(positions, hidden, residual, kv_cache, meta)
        if not group.is_last_stage:
            self._hold(group.isend_next, torch.stack([hidden, residual]))
            if group.is_first_stage:
                final = torch.empty((num_tokens, self.hidden_size), dtype=dtype, device=input_ids.device)
                return PendingHidden(final, group.irecv_last(final))
            return hidden
        hidden, _ = inner.norm(hidden, residual)
        if not group.is_first_stage:
            self._hold(group.isend_first, hidden.contiguous())
        return hidden

    def _hold(self, send, tensor: torch.Tensor) -> None:
        """Start an asynchronous send of ``tensor`` and keep it alive until done; completed sends are dropped and
        the oldest is waited for when too many are outstanding (the consumer is that far behind)."""
        sends = self._sends
        sends.append((send(tensor), tensor))
        while sends and (len(sends) > self._MAX_PENDING_SENDS or sends[0][0].is_completed()):
            sends.popleft()[0].wait()

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits on the first stage (it samples); the other stages' are never read: a placeholder column."""
        if self.group.is_first_stage:
            return self.model.compute_logits(hidden)
        return torch.zeros((hidden.shape[0], 1), dtype=torch.float32, device=hidden.device)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return self.model.load_weights(weights)

    def init_dummy_weights(self, seed: int = 0) -> None:
        self.model.init_dummy_weights(seed)
