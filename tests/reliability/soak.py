"""Load soak: concurrent clients mixing every kind of request, bounded in time and count.

    ./build.sh soak [--minutes 10] [--clients 32] [--model-dir DIR]

Mix per client loop: single /predict, batch /predict (16-64 prompts), /system_prompt
updates, /v1/chat/completions. Reports requests served, errors, p50/p99 per time window,
the RSS of every process at start and end, and crossed answers: each chat request carries
a unique number of filler words, so its prompt token count identifies it, and the usage
that comes back must match the count measured alone for that prompt.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.conftest import EMBEDDED_MODEL, http_json, request_outcome, server_env, start_server, stop_server  # noqa: E402
from shim.progress import Heartbeat  # noqa: E402

log = logging.getLogger("soak")


def process_rss(root_pid: int) -> dict[str, float]:
    """MiB per process of the serve tree, keyed by a readable name."""
    root = psutil.Process(root_pid)
    out = {}
    for proc in [root, *root.children(recursive=True)]:
        try:
            cmd = " ".join(proc.cmdline())
            name = next((m for m in ("preprocess", "generator", "postprocess") if f"/{m}/1/model.py" in cmd), proc.name())
            out[f"{name}[{proc.pid}]"] = proc.memory_info().rss / 2**20
        except psutil.Error:
            continue
    return out


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * (len(ordered) - 1)))] if ordered else float("nan")


def run_soak(server, seconds: float, clients: int, max_requests: int = 100_000, window_s: float = 60.0) -> dict:
    url = server.url
    records = []  # (t, kind, status, latency)
    per_client = defaultdict(int)
    crossed = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds
    started = time.monotonic()
    def chat_prompt(k: int) -> str:
        return "tag " + "word " * k

    crashed = []  # (client, the exception) of a client thread that raised

    def client(index: int):
        try:
            run_client(index)
        except BaseException as exc:  # recorded: a dead client must count as unfinished, not vanish
            with lock:
                crashed.append((index, f"{type(exc).__name__}: {exc}"))

    def run_client(index: int):
        rng = random.Random(index)
        while time.monotonic() < stop_at and len(records) < max_requests:
            kind = rng.choices(["single", "batch", "system_prompt", "chat"], weights=[4, 2, 1, 3])[0]
            begin = time.monotonic()
            # request_outcome never raises: a timeout or reset is recorded as an error, not a dead thread.
            if kind == "single":
                got = request_outcome("POST", url + "/predict", {"prompt": f"client {index} question", "max_new_tokens": 8})
                ok = got.status == 200 and isinstance(got.body.get("response"), str)
            elif kind == "batch":
                count = rng.randint(16, 64)
                got = request_outcome("POST", url + "/predict",
                                      {"prompt": [f"c{index} q{i}" for i in range(count)], "max_new_tokens": 4})
                ok = got.status == 200 and len(got.body.get("response", [])) == count
            elif kind == "system_prompt":
                got = request_outcome("POST", url + "/system_prompt", {"system_prompt": f"简短回答。{rng.random()}"})
                ok = got.status == 200
            else:
                k = rng.randint(1, 40)
                got = request_outcome("POST", url + "/v1/chat/completions",
                                      {"messages": [{"role": "system", "content": "fixed"},
                                                    {"role": "user", "content": chat_prompt(k)}], "max_tokens": 4})
                ok = got.status == 200
                if ok and got.body["usage"]["prompt_tokens"] != expected_with_fixed_system[k]:
                    with lock:
                        crossed.append((k, got.body["usage"]["prompt_tokens"]))
            status = got.status if got.error is None else got.error
            with lock:
                records.append((begin - started, kind, status if ok else f"bad-{status}", time.monotonic() - begin))
                per_client[index] += 1

    # Each k measured alone, before the load; under load the usage must match.
    expected_with_fixed_system = {}
    for k in range(1, 41):
        _, body = http_json("POST", url + "/v1/chat/completions",
                            {"messages": [{"role": "system", "content": "fixed"},
                                          {"role": "user", "content": chat_prompt(k)}], "max_tokens": 1})
        expected_with_fixed_system[k] = body["usage"]["prompt_tokens"]

    rss_start = process_rss(server.process.pid)
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    # RSS over time tells a leak (steady climb) from caches filling up (a plateau): vLLM's
    # CPU KV cache and the allocator's pools are touched page by page as load spreads.
    rss_series = [{"t_s": 0.0, "rss_mib": rss_start}]
    sampling_done = threading.Event()

    def sample_rss():
        while not sampling_done.wait(window_s / 2):
            rss_series.append({"t_s": round(time.monotonic() - started, 1), "rss_mib": process_rss(server.process.pid)})

    sampler = threading.Thread(target=sample_rss, daemon=True)
    with Heartbeat(log, f"soak, {clients} clients, {seconds:.0f} s", every_s=10,
                   status=lambda: f"{len(records)} requests, {sum(1 for r in records if r[2] != 200)} errors"):
        sampler.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join(seconds + 600)
        sampling_done.set()
    unfinished = sum(t.is_alive() for t in threads) + len(crashed)
    rss_end = process_rss(server.process.pid)
    windows = defaultdict(list)
    for t, _, _, latency in records:
        windows[int(t // window_s)].append(latency)
    errors = [r for r in records if str(r[2]).startswith("bad")]
    growth = {name: (rss_end.get(name, 0) - mib) / mib for name, mib in rss_start.items() if mib > 50}
    # Growth over the second half alone: after the caches have been touched, a leak still climbs.
    middle = rss_series[len(rss_series) // 2]["rss_mib"]
    growth_second_half = {name: (rss_end.get(name, 0) - mib) / mib for name, mib in middle.items() if mib > 50}
    return {
        "seconds": seconds, "clients": clients, "requests": len(records),
        "by_kind": {k: sum(1 for r in records if r[1] == k) for k in ("single", "batch", "system_prompt", "chat")},
        "errors": len(errors), "error_samples": [str(e) for e in errors[:5]], "unfinished_clients": unfinished,
        "crashed_clients": [f"client {i}: {why}" for i, why in crashed],
        "requests_per_client_min": min(per_client.values()) if per_client else 0,
        "crossed_answers": len(crossed),
        "latency_windows": [{"window": w, "p50_ms": 1000 * statistics.median(v), "p99_ms": 1000 * percentile(v, 99),
                             "requests": len(v)} for w, v in sorted(windows.items())],
        "rss_start_mib": rss_start, "rss_end_mib": rss_end,
        "rss_growth_max": max(growth.values()) if growth else 0.0,
        "rss_growth_second_half_max": max(growth_second_half.values()) if growth_second_half else 0.0,
        "rss_series": rss_series,
    }


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="[soak] %(message)s")
    parser = argparse.ArgumentParser(prog="./build.sh soak")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--model-dir", default=str(EMBEDDED_MODEL))
    args = parser.parse_args(argv)
    server = start_server(server_env(Path(args.model_dir), VLLM_CPU_KVCACHE_SPACE="2"), "soak-server.log")
    try:
        report = run_soak(server, args.minutes * 60, args.clients)
    finally:
        stop_server(server)
    print(json.dumps(report, indent=1, ensure_ascii=False))
    out = REPO / "tests" / ".artifacts" / "soak.json"
    out.write_text(json.dumps(report, indent=1, ensure_ascii=False))
    print(f"written to {out}")
    return 0 if report["errors"] == 0 and report["crossed_answers"] == 0 and report["unfinished_clients"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
