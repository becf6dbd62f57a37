"""The engine benchmark's record: every measurement as it lands, and its summary table
(median and min-max per path, each path's ratio to every baseline, latencies over them)."""
from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path

log = logging.getLogger("bench_engine")


# A window's latency figures (milliseconds), summarised per path and against each baseline.
LATENCY_KEYS = ("p50_ms", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "tpot_p50_ms")


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


class Record:
    """Every measurement as it lands, written to disk each time (a cut-off run keeps its rounds)."""

    def __init__(self, out: Path, header: dict):
        self.out, self.header, self.measurements = out, header, []

    def add(self, case: str, path: str, round_: int, result: dict, rate_key: str) -> None:
        rate = result[rate_key] / result["seconds"]
        self.measurements.append({"case": case, "path": path, "round": round_, "rate": rate, **result})
        extra = "".join(f", {key.removesuffix('_ms').replace('_', ' ')} {result[key]:.1f} ms"
                        for key in LATENCY_KEYS if key in result)
        log.info("round %d %-14s %-16s %9.0f %s/s (%.1f s%s)", round_ + 1, case, path, rate,
                 rate_key.removesuffix("s"), result["seconds"], extra)
        for model, stage in result.get("stages", {}).items():
            log.info("    %-16s %6d requests, %.2f per execution; ms per request: queue %s, input %s, infer %s, "
                     "output %s", model, stage["requests"], stage["requests_per_execution"] or 0, stage["queue_ms"],
                     stage["compute_input_ms"], stage["compute_infer_ms"], stage["compute_output_ms"])
        if shares := result.get("cpu_core_share"):
            log.info("    cores busy: %s", ", ".join(f"{role} {share:.2f}" for role, share in shares.items() if share >= 0.05))
        if engine := result.get("engine"):
            phases = ", ".join(f"{name} {engine[f'engine_{name}_mean_ms']:.1f}" for name in
                               ("ttft", "queue", "prefill", "decode") if f"engine_{name}_mean_ms" in engine)
            log.info("    client mean %.1f ms: %.1f ms in the engine (means, ms: %s), %.1f ms outside it (%d prompts)",
                     result["mean_ms"], engine["engine_mean_ms"], phases or "none", engine["outside_engine_ms"],
                     engine["prompts"])
        self.write()

    def table(self) -> dict:
        cases: dict[str, dict[str, dict[int, dict]]] = {}
        for m in self.measurements:
            cases.setdefault(m["case"], {}).setdefault(m["path"], {})[m["round"]] = m
        table = {}
        for case, paths in cases.items():
            rows = {path: {"rate": summary([m["rate"] for m in rounds.values()])} for path, rounds in paths.items()}
            for path, rounds in paths.items():
                for key in LATENCY_KEYS:
                    if key in next(iter(rounds.values())):
                        rows[path][key] = summary([m[key] for m in rounds.values()])
                for base, base_rounds in paths.items():
                    # each path against every baseline; product B's also against the first product
                    if base == path or not (base.startswith("baseline") or path == f"{base} B"):
                        continue
                    common = sorted(set(rounds) & set(base_rounds))
                    if common:
                        rows[path][f"ratio_to_{base}"] = summary(
                            [rounds[r]["rate"] / base_rounds[r]["rate"] for r in common])
                        for key in LATENCY_KEYS:  # milliseconds more than the baseline, per round
                            if key in rounds[common[0]] and key in base_rounds[common[0]]:
                                rows[path][f"{key}_over_{base}"] = summary(
                                    [rounds[r][key] - base_rounds[r][key] for r in common])
            table[case] = rows
        return table

    def write(self, **more) -> None:
        self.header.update(more)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps({**self.header, "table": self.table(), "measurements": self.measurements},
                                       indent=1, ensure_ascii=False))


def print_table(table: dict) -> None:
    for case, rows in table.items():
        for path, row in rows.items():
            rate = row["rate"]
            ratios = "  ".join(f"{k.removeprefix('ratio_to_')} {v['median']:.3f} ({v['min']:.3f}-{v['max']:.3f})"
                               for k, v in row.items() if k.startswith("ratio_to_"))
            latency = "".join(f"  {key.removesuffix('_ms').replace('_', ' ')} {row[key]['median']:.1f} ms"
                              for key in LATENCY_KEYS if key in row)
            print(f"{case:14} {path:18} {rate['median']:9.0f} ({rate['min']:.0f}-{rate['max']:.0f}){latency}  {ratios}")
