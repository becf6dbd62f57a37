"""Where a decode step's time goes: its wall time against the GPU's kernel time, by batch size.

The judge's batch spends about half its time on its long answers alone (about 90 sequences,
160 steps). This runs the product's engine arguments in process (so the profiler sees the
kernels), fills the batch with N judge prompts that decode with no stop (`ignore_eos`, no
detokenizing), lets them reach steady decoding, then per case:
- the wall time of each of `--steps` steps (median, min, max);
- the GPU's kernel time per step over `--profiled` more steps (torch profiler, CUDA
  activity only), and the kernels that take most of it.
If the kernel time is close to the wall time, the step is the GPU's; if it is well below,
the GPU waits on the host.

`--cascade N` turns on vLLM's cascade attention (`disable_cascade_attn=False`) and lets it
take shared prefixes from N tokens (vLLM's own floor is 256; the judge's shared system
prompt is shorter). `--judge-batches K` then times K whole judge batches (shipped limits,
fresh questions each) step by step, as `tests.bench.penalties` does. `--engine-arg KEY=JSON`
(repeatable) changes one engine argument over the product's, e.g. `block_size=64` or
`attention_config={"backend": "TRITON_ATTN"}`, to compare attention set-ups.

    python3 tests/bench/gpu/step_profile.py MODEL_DIR --sizes 90 650 --out FILE [--cascade 64] [--judge-batches 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process, for the profiler

from tests.bench.engine import SHIPPED_ROUTING, judge_questions  # noqa: E402
from tests.bench.workers import judge_stage, judge_steps, product_engine_args  # noqa: E402

NO_PENALTIES = {"repetition_penalty": 1.0, "frequency_penalty": 0.0}


def shipped_penalties() -> dict:
    """The penalties the generator applies by default (or as this environment sets them)."""
    from preprocess.settings import load_sampling

    sampling = load_sampling(os.environ)
    return {"repetition_penalty": sampling.repetition_penalty, "frequency_penalty": sampling.frequency_penalty}


def kernel_ms_per_step(engine, steps: int) -> tuple[float, list]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    on_gpu = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize() if on_gpu else None
    events = prof.key_averages()
    busy = [(e.key, e.self_device_time_total if on_gpu else e.self_cpu_time_total, e.count) for e in events]
    busy = [b for b in busy if b[1] > 0]
    busy.sort(key=lambda b: -b[1])
    total_ms = sum(b[1] for b in busy) / 1000 / steps
    return total_ms, [{"kernel": k[:120], "ms_per_step": round(t / 1000 / steps, 4), "calls_per_step": c / steps}
                      for k, t, c in busy[:15]]


def run_case(engine, rows, size: int, penalties: dict, warm: int, steps: int, profiled: int, tag: str) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(max_tokens=warm + steps + profiled + 20, ignore_eos=True, temperature=0.0,
                            detokenize=False, output_kind=RequestOutputKind.FINAL_ONLY, **penalties)
    ids = [f"{tag}-{i}" for i in range(size)]
    for request_id, row in zip(ids, rows[:size]):
        engine.add_request(request_id, TokensPrompt(prompt_token_ids=row.token_ids), params)
    for _ in range(warm):
        engine.step()
    walls = []
    for _ in range(steps):
        before = time.perf_counter()
        engine.step()
        walls.append(1000 * (time.perf_counter() - before))
    kernel_ms, top = kernel_ms_per_step(engine, profiled)
    engine.abort_request(ids)
    while engine.has_unfinished_requests():
        engine.step()
    wall = statistics.median(walls)
    return {"sequences": size, "penalties": penalties["repetition_penalty"] != 1.0,
            "wall_ms_per_step": {"median": round(wall, 3), "min": round(min(walls), 3), "max": round(max(walls), 3)},
            "kernel_ms_per_step": round(kernel_ms, 3), "kernel_share_of_wall": round(kernel_ms / wall, 3),
            "top_kernels": top}


def allow_cascade_from(min_prefix: int) -> None:
    """vLLM decides per step whether cascade attention pays (flash_attn.use_cascade_attention),
    but never below 256 shared tokens; shared prefixes from `min_prefix` are passed to its
    decision as 256 (only the decision: the prefix used is computed apart from it)."""
    import vllm.v1.attention.backends.flash_attn as flash_attn

    decide = flash_attn.use_cascade_attention

    def use_cascade_attention(common_prefix_len, *args, **kwargs):
        if min_prefix <= common_prefix_len < 256:
            common_prefix_len = 256
        return decide(common_prefix_len, *args, **kwargs)

    flash_attn.use_cascade_attention = use_cascade_attention


def engine_override(text: str) -> tuple[str, object]:
    """`KEY=JSON` -> (KEY, value); a value that is not JSON stays a string."""
    key, _, value = text.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("--sizes", type=int, nargs="+", default=[90, 650])
    parser.add_argument("--warm", type=int, default=40, help="steps before timing: prefill and the first tokens")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--profiled", type=int, default=20)
    parser.add_argument("--memory", type=float, default=0.5)
    parser.add_argument("--cascade", type=int, help="cascade attention from this many shared prompt tokens")
    parser.add_argument("--judge-batches", type=int, default=0)
    parser.add_argument("--judge-n", type=int, default=650)
    parser.add_argument("--engine-arg", action="append", default=[], metavar="KEY=JSON",
                        help="an engine argument over the product's (repeatable)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    overrides = dict(engine_override(text) for text in args.engine_arg)
    from vllm import LLM

    from tests.bench.cpu import device_name

    engine_args = {**product_engine_args(args.model_dir), "gpu_memory_utilization": args.memory, **overrides}
    if args.cascade:
        allow_cascade_from(args.cascade)
        engine_args["disable_cascade_attn"] = False
    llm = LLM(**engine_args)
    rows = judge_stage(args.model_dir).run(judge_questions(max(args.sizes), "step-profile"))
    result = {"device": device_name(), "cascade_from": args.cascade, "engine_args_over_product": overrides,
              "cases": [], "judge": []}
    for round_ in range(2):  # two passes, the cases interleaved
        for size in args.sizes:
            for name, penalties in (("on", shipped_penalties()), ("off", NO_PENALTIES)):
                case = run_case(llm.llm_engine, rows, size, penalties, args.warm, args.steps, args.profiled,
                                f"r{round_}-{size}-{name}")
                result["cases"].append({"round": round_, **case})
                print(json.dumps({k: v for k, v in case.items() if k != "top_kernels"}), flush=True)
                Path(args.out).write_text(json.dumps(result, indent=1))
    judge_rows = judge_stage(args.model_dir, SHIPPED_ROUTING)
    for batch in range(args.judge_batches):
        run = judge_steps(llm, judge_rows.run(judge_questions(args.judge_n, f"step-profile-judge-{batch}")))
        result["judge"].append(run)
        shown = ("seconds", "steps", "ms_per_step_then", "ms_per_step_after")
        print(json.dumps({k: run[k] for k in shown}), flush=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
