"""One stage of one model on one device: build on `meta`, load, allocate the KV cache, run."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from services.worker.engine.attention import ForwardBatch
from services.worker.engine.config import EngineConfig, ModelConfig, StageSpec
from services.worker.engine.cpu_packing import BackgroundPacker, can_pack, pack_linears
from services.worker.engine.kv_cache import KVCache, plan_kv_cache
from services.worker.engine.loader import LoadStats, checkpoint_tensors, load_weights
from services.worker.engine.models import build_stage_model

# Default longest sequence when the model allows more (the CPU cache is lazily committed, a
# GPU's is not; set EngineConfig.max_model_len to go further).
DEFAULT_MAX_MODEL_LEN = 4096
# Stages with fewer weight bytes are packed before ready instead of in the background.
BACKGROUND_PACKING_MIN_BYTES = 32 * 2**20


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig | None = None) -> None:
        self.config = config
        self.model_config = model_config or ModelConfig.from_model_dir(config.model_path)
        self.stage: StageSpec = config.stage(self.model_config)
        self.dtype = config.torch_dtype(self.model_config)
        self.device = torch.device(config.device)
        self.model = build_stage_model(self.model_config, self.stage)
        self.kv_cache: KVCache | None = None
        self.packer: BackgroundPacker | None = None

    @property
    def max_model_len(self) -> int:
        model_max = self.model_config.max_position_embeddings
        if self.config.max_model_len is not None:
            # learned position tables (OPT) end there; rotary models were trained to there
            length = min(self.config.max_model_len, model_max or self.config.max_model_len)
        else:
            length = min(model_max or DEFAULT_MAX_MODEL_LEN, DEFAULT_MAX_MODEL_LEN)
        # Mistral-style sliding-window attention is not implemented: within the window it is
        # plain causal attention, so sequences are capped there rather than computed wrongly.
        window = self.model_config.hf_config.get("sliding_window")
        return min(length, window) if isinstance(window, int) and window > 0 else length

    def load(self, sources: Iterable[tuple[str, torch.Tensor]] | None = None) -> LoadStats:
        """Assign weights (default: the model folder's safetensors), then make the cache."""
        if sources is None:
            sources = checkpoint_tensors(self.config.model_path)
        mode = self.config.weight_packing
        packs = can_pack(self.device, self.dtype) and mode != "off"
        as_loaded = (lambda: pack_linears(self.model)) if packs and mode == "as_loaded" else None
        stats = load_weights(self.model, sources, dtype=self.dtype, device=self.device,
                             on_assigned=as_loaded)
        self.model.init_buffers(self.device, self.max_model_len)
        self.allocate_kv_cache()
        if packs and mode != "as_loaded":
            # Packing takes ~1 ms per MB; below the threshold it is not worth a thread.
            if mode == "sync" or stats.num_bytes < BACKGROUND_PACKING_MIN_BYTES:
                pack_linears(self.model)
            else:
                self.packer = BackgroundPacker(self.model)
        return stats

    def pack_weights(self) -> None:
        """Pack the linears now (for a runner loaded with packing off, or still packing in the
        background); serving may go on meanwhile, each layer switching when it is done."""
        if self.packer is not None:
            self.packer.wait()
        elif can_pack(self.device, self.dtype):
            pack_linears(self.model)

    def wait_for_packing(self, timeout: float | None = None) -> bool:
        """Block until background weight packing is done (True if none is running)."""
        return self.packer.wait(timeout) if self.packer is not None else True

    def allocate_kv_cache(self) -> KVCache:
        shape = self.model.kv_cache_shape(self.dtype)
        budget = plan_kv_cache(shape, max_num_seqs=self.config.max_num_seqs,
                               max_model_len=self.max_model_len,
                               kv_cache_bytes=self.config.kv_cache_bytes)
        self.kv_cache = KVCache(shape, budget, self.device)
        self.model.bind_kv_cache(self.kv_cache)
        return self.kv_cache

    @torch.inference_mode()
    def forward(self, inputs: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """Run the stage: token ids [T] (first stage) or hidden [T, hidden] -> hidden."""
        if not batch.is_prefill:
            assert self.kv_cache is not None
            # this step writes position context_len of every sequence
            written = [n + 1 for n in batch.context_lens]
            self.kv_cache.make_readable(batch.slot_ids, written, max(written))
        return self.model(inputs.to(self.device), batch)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor, batch: ForwardBatch, *,
               all_tokens: bool = False) -> torch.Tensor:
        """Logits [num_seqs, vocab] at each sequence's last token (or every token)."""
        if not all_tokens:
            hidden = hidden[batch.last_token_indices()]
        return self.model.compute_logits(hidden)

    def new_batch(self, *, is_prefill: bool, slot_ids: list[int], context_lens: list[int],
                  query_lens: list[int]) -> ForwardBatch:
        return ForwardBatch(is_prefill=is_prefill, slot_ids=slot_ids, context_lens=context_lens,
                            query_lens=query_lens, device=self.device)
