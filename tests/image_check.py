"""Serves the judge's contract from a built image, the way the judge runs it, and stops it.

    python -m tests.image_check --image localhost/llm-triton:cpu [--podman "podman --runtime /usr/sbin/runc"]

Checks, each with a bound on the work it waits for: `GET /` goes from warming to serving;
`POST /predict` with a list answers every prompt, in order (each answer equals the answer to
that prompt alone: greedy decoding); the server runs as a non-root user under an init as
PID 1, on a read-only root, with vLLM as its engine; `podman stop` ends the container within its grace period, by the drain rather than
SIGKILL, with no process of it left on the host. Prints the timings; exits 1 on a failure.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
import urllib.request

import psutil

from .conftest import free_port

GRACE_S = 60
QUESTIONS = ["What is the capital of France?", "Name a prime number.", "What colour is the sky?",
             "写一句问候语。", "What is 2 + 2?"]


def http(method: str, url: str, body=None, timeout: float = 300):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        return reply.status, json.loads(reply.read())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.image_check")
    parser.add_argument("--image", required=True)
    parser.add_argument("--podman", default="podman --runtime /usr/sbin/runc")
    parser.add_argument("--ulimits", default="--ulimit nofile=1024:1024 --ulimit nproc=4096:4096")
    parser.add_argument("--start-timeout", type=float, default=600)
    args = parser.parse_args(argv)
    podman = shlex.split(args.podman)
    name = f"llm-image-check-{os.getpid()}"
    port = free_port()
    env = {"PORT": port, "HOST": "127.0.0.1", "TRITON_HTTP_PORT": free_port(), "TRITON_GRPC_PORT": free_port(),
           "TRITON_METRICS_PORT": free_port(), "VLLM_CPU_KVCACHE_SPACE": "1", "MAX_NEW_TOKENS": "8"}
    # A read-only root, as the Kubernetes manifest runs it: the server writes only to /tmp
    # (podman's --read-only mounts a tmpfs there) and to $HOME's caches.
    command = [*podman, "run", "-d", "--name", name, "--network", "host", "--shm-size", "1g",
               "--read-only", "--tmpfs", "/home/llm:rw,mode=1777",
               *shlex.split(args.ulimits), *(f"--env={k}={v}" for k, v in env.items()), args.image]
    failures: list[str] = []

    def check(ok: bool, what: str) -> None:
        print(f"[image-check] {'ok  ' if ok else 'FAIL'} {what}", flush=True)
        if not ok:
            failures.append(what)

    started = time.monotonic()
    subprocess.run(command, check=True, capture_output=True, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        seen: list[str] = []
        serving_after = None
        while time.monotonic() - started < args.start_timeout:
            state = subprocess.run([*podman, "inspect", "--format", "{{.State.Status}}", name],
                                   capture_output=True, text=True).stdout.strip()
            if state != "running":
                break
            try:
                status = http("GET", url + "/", timeout=5)[1].get("status")
            except OSError:
                status = "unreachable"
            if not seen or seen[-1] != status:
                seen.append(status)
            if status in ("ok", "batch"):
                serving_after = time.monotonic() - started
                break
            time.sleep(1)
        check(serving_after is not None and "warming" in seen,
              f"GET / went {' -> '.join(seen)} in {serving_after or time.monotonic() - started:.0f} s")
        if serving_after is None:
            logs = subprocess.run([*podman, "logs", "--tail", "80", name], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True).stdout
            print(logs[-8000:], flush=True)
            return 1

        began = time.monotonic()
        status, body = http("POST", url + "/predict", {"prompt": QUESTIONS})
        batch_s = time.monotonic() - began
        answers = body.get("response")
        alone = [http("POST", url + "/predict", {"prompt": q})[1].get("response") for q in QUESTIONS]
        check(status == 200 and isinstance(answers, list) and len(answers) == len(QUESTIONS),
              f"/predict with {len(QUESTIONS)} questions: {len(answers or [])} answers in {batch_s:.1f} s")
        check(answers == alone, "each answer is its own question's (the batch equals the questions one by one)")
        print(f"[image-check]      first answer: {answers[0]!r}" if answers else "", flush=True)

        uid = subprocess.run([*podman, "exec", name, "id", "-u"], capture_output=True, text=True).stdout.strip()
        check(uid not in ("", "0"), f"the server runs as uid {uid}")
        init = subprocess.run([*podman, "exec", name, "cat", "/proc/1/cmdline"], capture_output=True).stdout
        pid1 = init.split(b"\0")[0].decode(errors="replace")
        check(pid1.endswith("tini"), f"PID 1 is {pid1}")
        top = subprocess.run([*podman, "top", name, "hpid", "args"], capture_output=True, text=True).stdout.splitlines()
        host_pids = [int(line.split()[0]) for line in top[1:] if line.split() and line.split()[0].isdigit()]
        info = http("GET", url + "/info")[1]
        check(info.get("backend") == "vllm" and not info.get("engine_fallback"),
              f"the engine is {info.get('backend')} {info.get('vllm_version')} (fallback: {info.get('engine_fallback')})")
        check(len(host_pids) >= 4, f"{len(host_pids)} processes inside (tini, shim, tritonserver, stubs, engine)")

        began = time.monotonic()
        subprocess.run([*podman, "stop", "-t", str(GRACE_S), name], capture_output=True, text=True)
        stop_s = time.monotonic() - began
        code = subprocess.run([*podman, "inspect", "--format", "{{.State.ExitCode}}", name],
                              capture_output=True, text=True).stdout.strip()
        check(stop_s < GRACE_S and code != "137", f"podman stop: exited with {code} in {stop_s:.1f} s "
                                                  f"(grace {GRACE_S} s; 137 would mean killed)")
        left = [pid for pid in host_pids if psutil.pid_exists(pid)
                and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        check(not left, f"no process of the container left on the host ({len(left)} left)")
    finally:
        subprocess.run([*podman, "rm", "-f", "-t", "0", name], capture_output=True)
    print(f"[image-check] {'passed' if not failures else 'FAILED: ' + '; '.join(failures)}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
