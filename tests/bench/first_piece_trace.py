"""Where a stream's first piece spends its time, hop by hop, from timestamps.

    python -m tests.bench.first_piece_trace --model-dir DIR [--requests 30] [--out FILE]
        [--product-env NAME=VALUE ...]

The product's code is not touched: the tree is copied to a temporary folder, and the copy
gets one timestamp line per hop (wall clock, comparable across the processes of one host)
at 15 points of the stream path, from the shim's route to the first SSE chunk. Its server
then answers `--requests` streams of /v1/completions one at a time (c=1, 4 tokens each,
after 3 unmeasured ones), and the table gives each point's median time after the client
sent the request, and the step from the point before. The copy's probes are inserted by
text replacement: when the code they anchor to changes, this script stops and names the
anchor it could not find.
"""
from __future__ import annotations

import argparse
import http.client
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.conftest import server_env, start_server, stop_server  # noqa: E402

# (file, code to find, the probe goes before it (True) or after it (False), point name)
PROBES = [
    ("shim/routes/openai.py", "    state = shim_state(request)\n    overrides, work = await state.admit([row]",
     True, "01 shim route"),
    ("shim/streaming.py", "            call = self._connection().stream_infer(", True, "02 shim gRPC call"),
    ("model_repository/preprocess/1/model.py", "        return io.answer_each_statelessly(", True,
     "03 preprocess execute"),
    ("model_repository/generator_stream/1/model.py", "        for request in requests:\n            sender = ",
     True, "04 generator_stream execute"),
    ("model_repository/generator_stream/1/model.py", "            prompt_ids, values = self._read(request)\n",
     True, "05 relay thread"),
    ("preprocess/engine/stream_socket.py",
     '            conn.sendall(encode({"prompt_ids": prompt_ids, "values": values}))\n', False, "06 relay sent"),
    ("preprocess/engine/stream_socket.py", "                request = json.loads(await reader.readline())\n",
     False, "07 socket server read"),
    ("preprocess/engine/vllm_runner.py",
     "            async for output in self.engine.generate(self._TokensPrompt(prompt_token_ids=item.token_ids)",
     True, "08 engine.generate"),
]
# Points on the way back, each taken once per stream (its first piece).
FIRST_ONLY = [
    ("preprocess/engine/vllm_runner.py", "                received = True\n", True, "09 engine first output"),
    ("preprocess/engine/stream_socket.py", "                writer.write(b\"\".join(lines))\n", True,
     "10 socket server writes"),
    ("model_repository/generator_stream/1/model.py", "                last = piece.get(\"finish_reason\") is not None\n",
     True, "11 relay has the piece"),
    ("model_repository/generator_stream/1/model.py", "                if last:\n                    return\n", True,
     "12 relay sent it to Triton"),
    ("shim/streaming.py", "                piece = read_piece(result)\n", False, "13 shim has the piece"),
    ("shim/routes/openai.py", "    include_usage = body.stream_options is not None", True, "14 shim route has it"),
]


def probe_code(trace_dir: Path, point: str, indent: str, first_only: bool) -> str:
    """One line that appends `point` and the wall clock to this process's trace file; with
    `first_only`, only the first time in each call frame (a per-frame flag in locals)."""
    write = (f"open({str(trace_dir)!r} + '/' + str(__import__('os').getpid()), 'a').write("
             f"{point!r} + ' %.6f\\n' % __import__('time').time())")
    if not first_only:
        return f"{indent}{write}\n"
    flag = "_traced_" + point.split()[0]
    return f"{indent}if not locals().get({flag!r}):\n{indent}    {flag} = True\n{indent}    {write}\n"


def instrumented_copy(trace_dir: Path) -> Path:
    """A copy of this tree (tracked and untracked files, not ignored ones) with the probes in."""
    copy = Path(tempfile.mkdtemp(prefix="first-piece-trace-"))
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, copy / name)
    for name, anchor, before, point in PROBES + FIRST_ONLY:
        path = copy / name
        text = path.read_text()
        if text.count(anchor) != 1:
            raise SystemExit(f"{name}: the anchor of probe {point!r} is found {text.count(anchor)} times: {anchor!r}")
        indent = anchor[:len(anchor) - len(anchor.lstrip(" "))]
        probe = probe_code(trace_dir, point, indent, (name, anchor, before, point) in FIRST_ONLY)
        path.write_text(text.replace(anchor, probe + anchor if before else anchor + probe))
    return copy


def first_text(port: int, model: str, prompt: str) -> tuple[float, float]:
    """(sent, first text chunk) wall clock of one streamed /v1/completions."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 4, "ignore_eos": True, "temperature": 0,
                       "stream": True})
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    sent = time.time()
    connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    response, first = connection.getresponse(), None
    for line in response:
        if first is None and line.startswith(b"data: ") and b'"text"' in line:
            first = time.time()
    connection.close()
    if first is None:
        raise RuntimeError(f"no text in the stream of {prompt!r} ({response.status})")
    return sent, first


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--product-env", nargs="*", default=[])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    trace_dir = Path(tempfile.mkdtemp(prefix="first-piece-points-"))
    copy = instrumented_copy(trace_dir)
    # --product-env overrides these defaults (the same keyword twice was a TypeError).
    overrides = {"BATCH_MODE": "1", "DTYPE": "bfloat16", "SHIM_MAX_REQUEST_TOKENS": str(10**8),
                 **dict(item.split("=", 1) for item in args.product_env), "PYTHONPATH": str(copy)}
    env = server_env(args.model_dir.resolve(), **overrides)
    server = start_server(env, "first-piece-trace-server.log", cwd=copy)
    try:
        for k in range(3):
            first_text(int(env["PORT"]), args.model_dir.name, f"[warm-{k}] Hello")
        for stale in trace_dir.iterdir():
            stale.unlink()
        client = [first_text(int(env["PORT"]), args.model_dir.name, f"[trace-{i}] What is the capital of France?")
                  for i in range(args.requests)]
        time.sleep(1)  # the last points are written after the client has its chunk
    finally:
        stop_server(server)
        shutil.rmtree(copy, ignore_errors=True)
    points: dict[str, list[float]] = {}
    for file in trace_dir.iterdir():
        for line in file.read_text().splitlines():
            point, stamp = line.rsplit(" ", 1)
            points.setdefault(point, []).append(float(stamp))
    rows, previous = [], 0.0
    for point in sorted(points):
        stamps = sorted(points[point])
        if len(stamps) != len(client):
            raise SystemExit(f"{point}: {len(stamps)} timestamps for {len(client)} requests")
        ms = statistics.median(1000 * (stamp - sent) for stamp, (sent, _) in zip(stamps, client))
        rows.append({"point": point, "ms_after_send": round(ms, 2), "step_ms": round(ms - previous, 2)})
        previous = ms
    total = statistics.median(1000 * (first - sent) for sent, first in client)
    rows.append({"point": "15 client has the first text", "ms_after_send": round(total, 2),
                 "step_ms": round(total - previous, 2)})
    for row in rows:
        print(f"{row['point']:32} {row['ms_after_send']:8.2f} ms  (+{row['step_ms']:.2f})")
    if args.out:
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "requests": len(client), "points": rows},
                                       indent=1))


if __name__ == "__main__":
    main()
