"""`hydraserve generate`: stream a completion from a model folder to the terminal."""

from __future__ import annotations

import argparse
import sys
import time

from libs.common.errors import HydraError


def run_generate(args: argparse.Namespace) -> int:
    from services.worker.engine.engine import LLMEngine
    from services.worker.engine.sequence import SamplingParams

    started = time.perf_counter()
    try:
        boundaries = [int(x) for x in args.stages.split(",")] if args.stages else None
        engine = LLMEngine.from_model_dir(
            args.model_dir, stage_boundaries=boundaries, dtype=args.dtype, device=args.device,
            max_num_seqs=max(len(args.prompt), 1),
        )
        stats = engine.load()
        loaded = time.perf_counter()
        stages = ", ".join(f"[{r.stage.start_layer},{r.stage.end_layer})" for r in engine.runners)
        _info(f"loaded {args.model_dir} ({engine.model_config.architecture}, stages {stages}) "
              f"in {loaded - started:.2f}s, {sum(s.num_bytes for s in stats) / 1e6:.1f} MB")
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                                stop=args.stop)
        for i, prompt in enumerate(args.prompt):
            messages = [{"role": "user", "content": prompt}] if args.chat else None
            engine.add_request(str(i), None if args.chat else prompt, params, messages=messages)
    except (HydraError, ValueError, OSError) as exc:
        _info(f"error: {exc}")
        return 2
    return _stream(engine, num_prompts=len(args.prompt), loaded=loaded)


def _stream(engine: object, *, num_prompts: int, loaded: float) -> int:
    from services.worker.engine.engine import LLMEngine

    assert isinstance(engine, LLMEngine)
    texts: dict[str, str] = {}
    first_token: float | None = None
    num_tokens = 0
    while engine.has_unfinished():
        for out in engine.step():
            first_token = first_token or time.perf_counter()
            num_tokens += len(out.new_token_ids)
            if num_prompts == 1:
                sys.stdout.write(out.text)
                sys.stdout.flush()
            else:
                texts[out.request_id] = texts.get(out.request_id, "") + out.text
            if out.finished:
                _info(f"\n[{out.request_id}] finish_reason={out.finish_reason} "
                      f"prompt_tokens={out.prompt_tokens} "
                      f"completion_tokens={out.completion_tokens}")
    for request_id, text in sorted(texts.items(), key=lambda kv: int(kv[0])):
        print(f"--- [{request_id}]\n{text}")
    done = time.perf_counter()
    if first_token is not None:
        _info(f"first token {first_token - loaded:.3f}s after load; {num_tokens} tokens in "
              f"{done - loaded:.2f}s ({num_tokens / (done - loaded):.1f} tok/s)")
    return 0


def _info(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
