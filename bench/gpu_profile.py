"""Where a forward pass spends its time on CUDA: the engine's prefill and decode steps and HF's,
under torch.profiler (the ops with the most CPU time, and the step's wall time).

Run on a GPU machine: `python bench/gpu_profile.py [--checkpoint DIR]` (the bench/engine.py
checkpoint by default).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.engine import make_checkpoint  # noqa: E402
from services.worker.engine.engine import LLMEngine  # noqa: E402
from services.worker.engine.sequence import SamplingParams  # noqa: E402


def wall_ms(fn: Callable[[], object], repeat: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat * 1e3


def show(label: str, fn: Callable[[], object], rows: int) -> None:
    print(f"\n== {label}: {wall_ms(fn):.2f} ms per call", flush=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "bench" / "out" / "llama-100m")
    parser.add_argument("--rows", type=int, default=18)
    args = parser.parse_args()
    path = make_checkpoint(args.checkpoint)
    engine = LLMEngine.from_model_dir(path, with_tokenizer=False, max_num_seqs=16,
                                      max_model_len=1024, device="cuda", dtype="bfloat16")
    engine.load()
    runner = engine.runners[0]
    prompts = [[(i * 31 + j * 7) % 30000 + 1 for j in range(128)] for i in range(8)]

    def prefill() -> None:
        batch = runner.new_batch(is_prefill=True, slot_ids=list(range(8)),
                                 context_lens=[0] * 8, query_lens=[128] * 8)
        runner.logits(runner.forward(torch.tensor([t for p in prompts for t in p]), batch),
                      batch)

    show("ours: prefill 8 x 128", prefill, args.rows)

    for batch_size in (1, 16):
        params = SamplingParams(temperature=0.0, max_tokens=512, ignore_eos=True)
        for i in range(batch_size):
            engine.add_request(f"b{batch_size}-{i}", prompts[i % 8][:64 + i], params)
        engine.step()  # the prefill
        show(f"ours: engine.step(), decode batch {batch_size}", engine.step, args.rows)
        for i in range(batch_size):
            engine.abort(f"b{batch_size}-{i}")
        while engine.has_unfinished():
            engine.step()

    from transformers import AutoModelForCausalLM, DynamicCache

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    ids = torch.tensor(prompts, device="cuda")
    with torch.inference_mode():
        show("HF: forward 8 x 128", lambda: hf(ids, use_cache=True, logits_to_keep=1),
             args.rows)
        cache = DynamicCache(config=hf.config)
        out = hf(ids[:1], past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)

        def hf_decode() -> None:
            nonlocal token
            token = hf(token, past_key_values=cache, use_cache=True).logits[:, -1].argmax(
                -1, keepdim=True)

        show("HF: forward, decode batch 1", hf_decode, args.rows)


if __name__ == "__main__":
    main()
