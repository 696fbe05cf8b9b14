"""HydraServe's engine side by side with Hugging Face transformers on one ~100M Llama checkpoint.

Measures, on the same checkpoint, device and thread count:
  - load time to ready, in-process (imports already done) and as a fresh process (the oneDNN
    weight packing runs after ready, in the background; its end is reported too);
  - prefill tokens/s for a batch of equal-length prompts;
  - decode tokens/s at batch 1 and batch 16 (16 prompts of different lengths: ours batched
    continuously, HF `generate` with left padding): the best of 3 runs each, and the ratio of
    each back-to-back pair with its median (the steadier figure on a shared machine);
  - a 32-request workload with mixed output lengths, at most 16 at once (where continuous
    batching differs most from static batches).
Prints each figure and the ratio ours / HF. Run: `python bench/engine.py [--quick]`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.worker.engine.config import EngineConfig  # noqa: E402
from services.worker.engine.engine import LLMEngine, generate  # noqa: E402
from services.worker.engine.model_runner import ModelRunner  # noqa: E402
from services.worker.engine.sequence import SamplingParams  # noqa: E402

VOCAB = 32000


def make_checkpoint(folder: Path) -> Path:
    """A random Llama of ~134M parameters (hidden 768, 12 layers, GQA 12/4, vocab 32000)."""
    if (folder / "model.safetensors").is_file():
        return folder
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=12, num_key_value_heads=4, vocab_size=VOCAB,
                         max_position_embeddings=2048)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


DEVICE = "cpu"
DTYPE = "float32"


def sync() -> None:
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        gc.collect()
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


# --- load ---------------------------------------------------------------------------------------
OURS_LOAD = """
import time, sys; t = time.perf_counter()
sys.path.insert(0, {root!r})
from services.worker.engine.config import EngineConfig
from services.worker.engine.model_runner import ModelRunner
import torch
ModelRunner(EngineConfig(model_path={path!r}, max_num_seqs=16, max_model_len=1024,
                         device={device!r}, dtype={dtype!r})).load()
torch.cuda.synchronize() if {device!r}.startswith("cuda") else None
print(time.perf_counter() - t)
"""
HF_LOAD = """
import time; t = time.perf_counter()
import torch
from transformers import AutoModelForCausalLM
AutoModelForCausalLM.from_pretrained({path!r}, dtype=getattr(torch, {dtype!r})
                                     ).to({device!r}).eval()
torch.cuda.synchronize() if {device!r}.startswith("cuda") else None
print(time.perf_counter() - t)
"""


def process_load(script: str, path: Path) -> float:
    """Wall time of a fresh interpreter that imports and loads, to ready."""
    start = time.perf_counter()
    code = script.format(root=str(ROOT), path=str(path), device=DEVICE, dtype=DTYPE)
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return time.perf_counter() - start


def load_ours(path: Path, *, packed: bool = False) -> ModelRunner:
    """Ready to serve; with `packed`, also wait for the background weight packing."""
    runner = ModelRunner(EngineConfig(model_path=path, max_num_seqs=16, max_model_len=1024,
                                      device=DEVICE, dtype=DTYPE))  # type: ignore[arg-type]
    runner.load()
    if packed:
        runner.wait_for_packing()
    sync()
    return runner


def load_hf(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, DTYPE))
    model = model.to(DEVICE).eval()
    sync()
    return model


# --- generation ---------------------------------------------------------------------------------
def ours_engine(path: Path) -> LLMEngine:
    engine = LLMEngine.from_model_dir(path, with_tokenizer=False, max_num_seqs=16,
                                      max_model_len=1024, device=DEVICE, dtype=DTYPE)
    engine.load()
    for runner in engine.runners:
        runner.wait_for_packing()
    return engine


def ours_generate(engine: LLMEngine, prompts: list[list[int]], new_tokens: list[int]
                  ) -> Callable[[], object]:
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in new_tokens]
    return lambda: generate(engine, list(prompts), params)


def hf_generate(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int,
                batch_size: int) -> Callable[[], object]:
    """HF generate in static batches of `batch_size`, left-padded."""

    def run() -> None:
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            width = max(map(len, chunk))
            ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk], device=DEVICE)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk],
                                device=DEVICE)
            with torch.inference_mode():
                model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                               max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               pad_token_id=0, eos_token_id=None)

    return run


def interleaved(ours: Callable[[], object], theirs: Callable[[], object], repeat: int
                ) -> tuple[float, float]:
    """Best time of each, alternating runs so load from elsewhere hits both alike."""
    times = paired(ours, theirs, repeat)
    return min(t for t, _ in times), min(t for _, t in times)


def paired(ours: Callable[[], object], theirs: Callable[[], object], repeat: int
           ) -> list[tuple[float, float]]:
    """(ours, theirs) times of `repeat` back-to-back pairs: the machine's drift between runs
    (HF's batch-16 rate moved 152-203 tok/s between runs of one hour) hits a pair alike."""
    return [(timed(ours), timed(theirs)) for _ in range(repeat)]


def prefill_rates(runner: ModelRunner, hf: torch.nn.Module, prompts: list[list[int]]
                  ) -> tuple[float, float]:
    num_tokens = sum(map(len, prompts))

    def ours() -> None:
        batch = runner.new_batch(is_prefill=True, slot_ids=list(range(len(prompts))),
                                 context_lens=[0] * len(prompts),
                                 query_lens=[len(p) for p in prompts])
        hidden = runner.forward(torch.tensor([t for p in prompts for t in p]), batch)
        runner.logits(hidden, batch)

    def theirs() -> None:
        with torch.inference_mode():
            hf(torch.tensor(prompts, device=DEVICE), use_cache=True, logits_to_keep=1)

    ours_t, theirs_t = interleaved(ours, theirs, 3)
    return num_tokens / ours_t, num_tokens / theirs_t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens (a smoke run)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "bench" / "out" / "llama-100m")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (both systems run there)")
    parser.add_argument("--dtype", default=None,
                        help="compute dtype for both (default: float32 on cpu, bfloat16 on cuda)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "engine.json")
    args = parser.parse_args()
    global DEVICE, DTYPE
    DEVICE = args.device
    DTYPE = args.dtype or ("bfloat16" if DEVICE.startswith("cuda") else "float32")
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    path = make_checkpoint(args.checkpoint)
    num_params = sum(
        t.numel() for t in load_ours(path).model.parameters()
    )
    rng = random.Random(0)
    new = 32 if args.quick else 128
    rows: list[tuple[str, float, float, str]] = []

    (path / "model.safetensors").read_bytes()  # both loads start from a warm page cache
    ours_load, hf_load = interleaved(lambda: load_ours(path), lambda: load_hf(path), 3)
    rows.append(("load to ready, in-process (s)", ours_load, hf_load, "lower"))
    if DEVICE == "cpu":
        rows.append(("load, then weights packed for the CPU kernel (s)",
                     timed(lambda: load_ours(path, packed=True), 3), hf_load, "lower"))
    ours_proc, hf_proc = float("inf"), float("inf")
    for _ in range(2):
        ours_proc = min(ours_proc, process_load(OURS_LOAD, path))
        hf_proc = min(hf_proc, process_load(HF_LOAD, path))
    rows.append(("load to ready, fresh process (s)", ours_proc, hf_proc, "lower"))

    runner, hf = load_ours(path, packed=True), load_hf(path)
    prefill_prompts = [[rng.randrange(VOCAB) for _ in range(128)] for _ in range(8)]
    ours_rate, hf_rate = prefill_rates(runner, hf, prefill_prompts)
    rows.append(("prefill, 8 x 128 tokens (tok/s)", ours_rate, hf_rate, "higher"))
    del runner

    engine = ours_engine(path)
    pair_ratios: dict[str, list[float]] = {}
    for batch in (1, 16):
        prompts = [[rng.randrange(VOCAB) for _ in range(rng.randint(32, 256))]
                   for _ in range(batch)]
        # decode rate = new tokens / (time to generate `new` tokens - time to generate 1)
        fulls = paired(ours_generate(engine, prompts, [new] * batch),
                       hf_generate(hf, prompts, new, batch), 3)
        ours_one, hf_one = interleaved(ours_generate(engine, prompts, [1] * batch),
                                       hf_generate(hf, prompts, 1, batch), 3)
        tokens = batch * (new - 1)
        rates = [(tokens / (ours_t - ours_one), tokens / (hf_t - hf_one)) for ours_t, hf_t in fulls]
        name = f"decode, batch {batch} (tok/s)"
        rows.append((name, max(r for r, _ in rates), max(r for _, r in rates), "higher"))
        pair_ratios[name] = [ours / theirs for ours, theirs in rates]

    prompts = [[rng.randrange(VOCAB) for _ in range(rng.randint(32, 256))] for _ in range(32)]
    lengths = [rng.randint(new // 8, new) for _ in range(32)]
    # HF static batches must run every sequence to the batch's longest output.
    ours_t, hf_t = interleaved(ours_generate(engine, prompts, lengths),
                               hf_generate(hf, prompts, new, 16), 1)
    rows.append(("32 requests, mixed lengths, <=16 at once (useful tok/s)",
                 sum(lengths) / ours_t, sum(lengths) / hf_t, "higher"))

    where = (torch.cuda.get_device_name() if DEVICE.startswith("cuda")
             else f"{args.threads} threads")
    print(f"\nengine benchmark: Llama {num_params / 1e6:.0f}M params, {DTYPE}, {DEVICE} "
          f"({where}), torch {torch.__version__}, {new} new tokens")
    print(f"{'measure':58} {'ours':>10} {'HF':>10} {'ours/HF':>8}")
    results = []
    for name, ours, theirs, better in rows:
        ratio = ours / theirs
        print(f"{name:58} {ours:10.3f} {theirs:10.3f} {ratio:8.2f}  ({better} is better)")
        results.append({"measure": name, "ours": ours, "hf": theirs, "ratio": ratio})
    for name, ratios in pair_ratios.items():
        print(f"{name.removesuffix(' (tok/s)')}: ours/HF per back-to-back pair "
              f"{', '.join(f'{r:.2f}' for r in ratios)}; median {statistics.median(ratios):.2f}")
        next(r for r in results if r["measure"] == name)["pair_ratios"] = ratios
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
