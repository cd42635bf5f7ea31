"""The device side of embedding (pooling) models: one forward over whole prompts, then pooling.

Encoders (BERT family) run over the packed prompts with bidirectional varlen attention and no KV cache. Decoders
used as embedders (``task="embed"`` on a Llama-family checkpoint) run the ordinary causal prefill path into a small
scratch KV cache that each step overwrites (no block survives the step), then pool their last token.
The one device -> host copy of a step is the pooled embeddings.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from core.config import ModelConfig, is_encoder_config, log_resolved, resolve_config
from core.layers.quantization import resolve_quantization
from core.loader import iter_weights, load_hf_config
from core.model_source import resolve_model
from core.models import model_class
from core.models.bert import BertConfig, BertModel
from core.pooling import PoolingConfig, PoolingType, load_pooling_config, pool
from core.step_inputs import StepInputs
from ipc.config import EngineConfig
from ipc.messages import EmbeddingInfo

logger = logging.getLogger(__name__)


class PoolingRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.source = resolve_model(config.model, config.revision)
        hf_config = load_hf_config(self.source)
        self.is_encoder = is_encoder_config(hf_config)
        directory = None if self.source.is_gguf else Path(self.source.path)
        if self.is_encoder and config.quantization is not None:
            raise ValueError(f"--quantization {config.quantization} is not supported for encoder (BERT-family) "
                             "models.")
        if self.is_encoder:
            self.model_config: BertConfig | ModelConfig = BertConfig.from_hf_dict(hf_config)
            default_pooling = PoolingConfig(PoolingType.CLS, False)  # plain BERT checkpoints: the [CLS] token
            self.is_matryoshka = self.model_config.is_matryoshka
            self.matryoshka_dimensions = self.model_config.matryoshka_dimensions
        else:
            self.model_config = resolve_quantization(ModelConfig.from_hf_dict(hf_config), hf_config,
                                                     config.quantization)
            default_pooling = PoolingConfig(PoolingType.LAST, True)  # vLLM's default for decoders as embedders
            dims = hf_config.get("matryoshka_dimensions")
            self.is_matryoshka = bool(hf_config.get("is_matryoshka") or dims)
            self.matryoshka_dimensions = tuple(dims) if dims else None
        self.resolved = resolve_config(config, self.model_config)
        if self.is_encoder and config.kv_cache_dtype != "auto":
            raise ValueError(f"kv_cache_dtype={config.kv_cache_dtype!r} does not apply: encoder models (BERT family) "
                             "keep no KV cache.")
        log_resolved(config, self.resolved)
        self.pooling = load_pooling_config(directory, default_pooling)
        self.hidden_size = self.model_config.hidden_size
        self.vocab_size = self.model_config.vocab_size
        self.device = self.resolved.device
        self.dtype = self.resolved.dtype
        self.max_model_len = self.resolved.max_model_len
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = self.resolved.max_num_batched_tokens
        if self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens} is below max_model_len="
                             f"{self.max_model_len}: an embedding prompt is computed in one step, whole.")
        torch.manual_seed(config.seed)
        start = time.perf_counter()
        self.model = self._load_model()
        logger.info("Loaded %s (%s, %s, %s pooling%s) in %.1f s", self.source.name, self.dtype, self.device,
                    self.pooling.pooling_type.value, ", normalized" if self.pooling.normalize else "",
                    time.perf_counter() - start)
        if not self.is_encoder:
            self._init_scratch_cache()

    def embedding_info(self) -> EmbeddingInfo:
        dims = list(self.matryoshka_dimensions) if self.matryoshka_dimensions else None
        return EmbeddingInfo(self.hidden_size, self.pooling.normalize, self.is_matryoshka, dims)

    def _load_model(self) -> torch.nn.Module:
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        cls = BertModel if self.is_encoder else model_class(self.model_config)
        try:
            with torch.device(self.device):
                model = cls(self.model_config, attention_backend=self.resolved.attention_backend,
                            kernel_backend=self.resolved.kernel_backend)
        finally:
            torch.set_default_dtype(default_dtype)
        if self.config.load_format == "dummy":
            model.init_dummy_weights(self.config.seed)
        else:
            model.load_weights(iter_weights(self.source, self.config.load_format))
        return model.eval()

    def _init_scratch_cache(self) -> None:
        """Enough blocks for one step's tokens (every sequence rounds up to whole blocks); block 0 stays unused."""
        cfg, bs = self.model_config, self.config.block_size
        self.block_size = bs
        self.max_blocks_per_seq = -(-self.max_model_len // bs)
        num_blocks = 1 + self.max_num_batched_tokens // bs + self.max_num_seqs
        self.num_scratch_blocks = num_blocks
        shape = (2, num_blocks, bs, cfg.num_kv_heads, cfg.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=self.resolved.kv_cache_dtype, device=self.device)
                          for _ in range(cfg.num_layers)]
        self.inputs = StepInputs(self.max_num_batched_tokens, self.max_num_seqs, self.max_blocks_per_seq, bs,
                                 self.device)

    @torch.inference_mode()
    def embed(self, prompts: list[list[int]]) -> np.ndarray:
        """Embeddings [B, H] float32 (on the host) of whole prompts, in order."""
        lens = np.fromiter((len(p) for p in prompts), dtype=np.int64, count=len(prompts))
        token_ids = np.fromiter((t for p in prompts for t in p), dtype=np.int64, count=int(lens.sum()))
        cu_host = np.zeros(len(prompts) + 1, dtype=np.int64)
        np.cumsum(lens, out=cu_host[1:])
        if self.is_encoder:
            positions = np.arange(len(token_ids), dtype=np.int64) - np.repeat(cu_host[:-1], lens)
            cu = torch.from_numpy(cu_host.astype(np.int32)).to(self.device, non_blocking=True)
            hidden = self.model(torch.from_numpy(token_ids).to(self.device, non_blocking=True),
                                torch.from_numpy(positions).to(self.device, non_blocking=True), cu, int(lens.max()))
        else:
            blocks_per_seq = -(-lens // self.block_size)
            first_block = 1 + np.concatenate([[0], np.cumsum(blocks_per_seq)[:-1]])
            table = first_block[:, None] + np.arange(int(blocks_per_seq.max()))[None, :]
            np.minimum(table, self.num_scratch_blocks - 1, out=table)  # columns past a sequence's end: never read
            meta = self.inputs.stage(token_ids, np.zeros_like(lens), lens, table.astype(np.int32))
            num_tokens = len(token_ids)
            hidden = self.model(self.inputs.input_ids[:num_tokens], self.inputs.positions[:num_tokens],
                                self.kv_caches, meta)
            cu = meta.query_start_loc
        return pool(hidden, cu, self.pooling).cpu().numpy()

