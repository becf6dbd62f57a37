"""Session fixtures: a tiny real-architecture model, and one real server per test session.

The server is the product itself (`python -m shim.serve`): a real tritonserver on the
real model_repository, vLLM on CPU, and the shim, on free ports.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from preprocess.settings import EMBEDDED_MODEL_ID
from shim.serve import OWN_PROCESS_GROUP

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "tests" / ".artifacts"
EMBEDDED_MODEL = REPO / "model" / EMBEDDED_MODEL_ID
TINY_MODEL = ARTIFACTS / "tiny-llama-answers-gpu"
TINY_MODEL_LEN = 1024  # tokens, prompt and answer together: vLLM ends an answer there ("length")
TINY_ANSWER = " GPU"  # what the tiny model says, greedily, to any prompt: once per generated token
LEAK_CANARY = "canary-secret-4b1d"
SESSION_TOKEN_BUDGET = 24_000  # SHIM_MAX_REQUEST_TOKENS of the session server
SESSION_QUEUE_BUDGET = 70_000  # its SHIM_MAX_QUEUED_TOKENS: three 520-prompt batches fit


_PORTS_GIVEN: set[int] = set()
SHM_BEFORE = pytest.StashKey[set]()  # /dev/shm's names when the session started


def ephemeral_ports_start() -> int:
    """The first port of the kernel's ephemeral range: the ports it hands to `bind(0)`."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def worker_port_range() -> tuple[int, int]:
    """The ports below the kernel's ephemeral range, split between pytest-xdist's workers
    (./build.sh test runs two): each worker gives out its own slice, so a port one worker
    chose for a server that binds a minute later is never chosen by the other."""
    end = ephemeral_ports_start()
    start = 20000 if end > 21000 else 1024
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    size = (end - start) // workers
    return start + worker * size, start + (worker + 1) * size


def free_port() -> int:
    """A port nothing listens on, outside the kernel's ephemeral range, not given out before
    in this session. A server binds its ports only once its engines are up (a minute on
    CPU); meanwhile vLLM's workers, ZMQ and torch's TCP store ask the kernel for ports, and
    an ephemeral port chosen here could be handed to them; tritonserver then fails to start
    on it ("already in use"). The kernel never hands out a port below its range."""
    start, end = worker_port_range()
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(start, end)
        if port in _PORTS_GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("", port))  # all addresses, as tritonserver binds
            except OSError:
                continue
        _PORTS_GIVEN.add(port)
        return port
    raise RuntimeError(f"no free port between {start} and {end}")


def build_tiny_model(dest: Path) -> Path:
    """Llama architecture, SmolLM2's real tokenizer and chat template, random weights, and
    one planted direction: every token embedding carries a large constant in dimension 0,
    and only the LM-head row of TINY_ANSWER reads it. Greedy decoding then says " GPU" at
    every step, whatever the prompt, so an answer check cannot pass on empty output (random
    weights alone said "\n" at every step, which clean-up turns into "")."""
    if (dest / "config.json").is_file():
        return dest
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_MODEL)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=TINY_MODEL_LEN,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    (answer_id,) = tokenizer.encode(TINY_ANSWER, add_special_tokens=False)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 8.0
        model.lm_head.weight[answer_id, 0] = 8.0
    model = model.to(torch.bfloat16)
    tmp = dest.with_name(f"{dest.name}.partial-{os.getpid()}")  # two workers may build it at once
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(dest)
    except OSError:  # the other worker's copy got there first: the same seed, the same weights
        if not (dest / "config.json").is_file():
            raise
        shutil.rmtree(tmp)
    return dest


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return build_tiny_model(TINY_MODEL)


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def http_json(method: str, url: str, body=None, headers=None, timeout=120):
    """(status, parsed JSON body) over real HTTP; errors are returned, not raised."""
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except ValueError:
            return exc.code, raw.decode(errors="replace")


def scrape_metrics(url: str) -> dict[str, float]:
    """A Prometheus endpoint as {name{label=value,...}: value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=10).read().decode()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def over_replicas(values: dict[str, float]) -> dict[str, float]:
    """The figures with the generator's `replica` label dropped and its series summed: what
    all replicas did together."""
    import re

    summed: dict[str, float] = {}
    for key, value in values.items():
        key = re.sub(r"replica=[^,}]*,?", "", key).replace(",}", "}").replace("{}", "")
        summed[key] = summed.get(key, 0.0) + value
    return summed


@dataclass(frozen=True)
class Outcome:
    """What one request got: a status and body, or the connection error or timeout it met."""
    status: int | None
    body: object
    seconds: float
    error: str | None = None


def request_outcome(method: str, url: str, body=None, timeout=120) -> Outcome:
    """Like http_json, but never raises: a timeout, reset or refused connection is an outcome
    too, so a concurrent test can assert over every request after joining its threads."""
    started = time.monotonic()
    try:
        status, reply = http_json(method, url, body, timeout=timeout)
        return Outcome(status, reply, time.monotonic() - started)
    except Exception as exc:  # noqa: BLE001 - recorded, judged by the caller
        return Outcome(None, None, time.monotonic() - started, f"{type(exc).__name__}: {exc}")


def wait_for(check, timeout_s: float):
    """Poll `check` until it returns a truthy value, which is returned; None after
    `timeout_s`. A bound on the wait, never a timing the verdict depends on."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    return None


def warmed(client) -> None:
    """Wait (a bound, not a timing) until an in-process app (a TestClient) has left warming."""
    wait_for(lambda: client.get("/").json()["status"] != "warming", 120)


@contextlib.contextmanager
def engine_in_slices(server, run_s: float = 0.02, pause_s: float = 0.2, held: threading.Event | None = None):
    """The server's vLLM engines (core processes and their workers) run only in slices of
    `run_s` with `pause_s` stopped between them (SIGSTOP/SIGCONT). The tokens an engine can
    make then stay few per slice, while every other process gets the pauses to react: a
    test can then tell "the client left before the end" from "the engine was faster", on
    any machine. With `held`, the engines stay stopped until it is set (work piles up in
    front of them). Always continued on exit; a process that died meanwhile is skipped."""
    import psutil

    engines = [psutil.Process(r["engine_pid"]) for r in server.get("/info")[1]["replicas"] if r.get("engine_pid")]
    processes = [p for core in engines for p in (core, *core.children(recursive=True))]
    assert processes, "no engine process to slice"
    stop = threading.Event()

    def signal_all(sig):
        for process in processes:
            try:
                process.send_signal(sig)
            except psutil.NoSuchProcess:  # an engine that died meanwhile (the generator rebuilds it)
                pass

    def slices():
        while held is not None and not held.is_set() and not stop.is_set():
            held.wait(0.1)
        while not stop.is_set():
            signal_all(signal.SIGCONT)
            time.sleep(run_s)
            signal_all(signal.SIGSTOP)
            stop.wait(pause_s)

    if held is not None:
        signal_all(signal.SIGSTOP)
    slicer = threading.Thread(target=slices, daemon=True)
    slicer.start()
    try:
        yield
    finally:
        stop.set()
        slicer.join(60)  # before the last SIGCONT: a slicer still running could stop them again
        signal_all(signal.SIGCONT)


def run_threads(targets, join_timeout_s: float) -> None:
    """Start one thread per target, join them all, and fail if any is still running."""
    threads = [threading.Thread(target=t, daemon=True) for t in targets]
    for t in threads:
        t.start()
    deadline = time.monotonic() + join_timeout_s
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    alive = [t.name for t in threads if t.is_alive()]
    assert not alive, f"client threads still running after {join_timeout_s:.0f} s: {alive}"


@dataclass
class Server:
    url: str
    triton_url: str
    metrics_url: str
    process: subprocess.Popen
    env: dict
    statuses_seen: list = field(default_factory=list)
    readiness_seen: list = field(default_factory=list)  # (HTTP status, body status) of /health/ready
    log_path: Path | None = None

    def get(self, path, **kw):
        return http_json("GET", self.url + path, **kw)

    def post(self, path, body, **kw):
        return http_json("POST", self.url + path, body, **kw)

    def health_body(self) -> dict:
        """What GET / says, or {} when it did not answer in time (unknown, not a state)."""
        try:
            body = self.get("/", timeout=5)[1]
        except OSError:
            return {}
        return body if isinstance(body, dict) else {}

    def health(self) -> str | None:
        return self.health_body().get("status")

    def generator_state(self) -> dict:
        return json.loads((Path(self.env["LLM_RUNTIME_DIR"]) / "generator.json").read_text())

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def wait_ok(self, timeout_s: float = 240) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            try:
                status, body = self.get("/", timeout=2)
                if status == 200 and body.get("status") in ("ok", "batch"):
                    return time.monotonic() - started
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not ok after {timeout_s} s; log tail:\n{self.log_text()[-3000:]}")


def server_env(model_dir: Path, **extra: str) -> dict:
    env = dict(os.environ)
    env.update({
        "MODEL_DIR": str(model_dir), "PORT": str(free_port()), "HOST": "127.0.0.1",
        "TRITON_HTTP_PORT": str(free_port()), "TRITON_GRPC_PORT": str(free_port()),
        "TRITON_METRICS_PORT": str(free_port()),
        "VLLM_CPU_KVCACHE_SPACE": "1", "WARMUP_NUM_SAMPLES": "0",
        "LLM_RUNTIME_DIR": tempfile.mkdtemp(prefix="llm-test-runtime-"),
        "MAX_NEW_TOKENS": "8", "MAX_NEW_TOKENS_CODE_SOFT": "8", "MAX_NEW_TOKENS_CODE": "8",
        # Bounds the work any one request (schemathesis's included) can ask of 2 cores:
        # 16 prompts x 1000 new tokens and their prompts, a few seconds with the tiny model;
        # and what all requests in flight together may ask.
        "SHIM_MAX_REQUEST_TOKENS": str(SESSION_TOKEN_BUDGET), "SHIM_MAX_QUEUED_TOKENS": str(SESSION_QUEUE_BUDGET),
        # Short door timeouts, so the tests that hold a request open finish quickly.
        "SHIM_HEADER_TIMEOUT_S": "3", "SHIM_BODY_TIMEOUT_S": "5",
    })
    env.update(extra)
    return env


def start_server(env: dict, log_name: str, command: list[str] | None = None, cwd: Path = REPO) -> Server:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    log_path = ARTIFACTS / log_name
    log_file = open(log_path, "w")
    process = subprocess.Popen(command or [sys.executable, "-m", "shim.serve"], cwd=cwd, env=env,
                               stdout=log_file, stderr=subprocess.STDOUT, **OWN_PROCESS_GROUP)
    server = Server(
        url=f"http://127.0.0.1:{env['PORT']}", triton_url=f"127.0.0.1:{env['TRITON_HTTP_PORT']}",
        metrics_url=f"http://127.0.0.1:{env['TRITON_METRICS_PORT']}/metrics",
        process=process, env=env, log_path=log_path)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # record what health says while it comes up
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log_text()[-3000:]}")
        try:
            status, body = server.get("/", timeout=2)
            server.statuses_seen.append(body.get("status") if isinstance(body, dict) else body)
            ready, ready_body = server.get("/health/ready", timeout=2)
            server.readiness_seen.append((ready, ready_body.get("status") if isinstance(ready_body, dict) else None))
            if server.statuses_seen[-1] in ("ok", "batch") and ready == 200:
                return server
        except OSError:
            server.statuses_seen.append("unreachable")
        time.sleep(0.5)
    stop_server(server)
    raise TimeoutError(f"server not ok after 240 s:\n{server.log_text()[-3000:]}")


def stop_process(process: subprocess.Popen, sig: int, timeout_s: float = 40) -> None:
    """Send `sig`; if the process has not exited within `timeout_s`, kill its whole group."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)


def stop_server(server: Server) -> None:
    stop_process(server.process, signal.SIGINT)  # what Ctrl-C sends


# One empty file per pytest-xdist worker that started the session's server (see
# pytest_sessionfinish: more than one means the grouping broke).
SESSION_SERVER_STARTS = ARTIFACTS / "session-server-starts"


@pytest.fixture(scope="session")
def server(tiny_model) -> Server:
    if worker := os.environ.get("PYTEST_XDIST_WORKER"):
        SESSION_SERVER_STARTS.mkdir(parents=True, exist_ok=True)
        (SESSION_SERVER_STARTS / worker).touch()
    env = server_env(tiny_model, USE_VLLM="true", HF_TOKEN=LEAK_CANARY, OPENAI_API_KEY=LEAK_CANARY)
    srv = start_server(env, "server.log")
    yield srv
    stop_server(srv)


@pytest.fixture(scope="session")
def triton(server):
    import tritonclient.http as triton_http

    client = triton_http.InferenceServerClient(server.triton_url, network_timeout=120)
    yield client
    client.close()


def pytest_sessionstart(session):
    from tests.shm_hygiene import shm_names

    if not hasattr(session.config, "workerinput"):  # the controller, before any worker starts
        session.config.stash[SHM_BEFORE] = shm_names()
        shutil.rmtree(SESSION_SERVER_STARTS, ignore_errors=True)


def pytest_sessionfinish(session, exitstatus):
    """After every session fixture (the servers among them) has stopped: what killed servers
    left in /dev/shm goes (tests/shm_hygiene.py). Only the controller does it, once every
    worker has ended: a worker that ends first could take the other's segments for orphans.
    And the session fails if more than one worker started the session's server: that is
    pytest-xdist running the session's tests apart (the item._id rewrite below no longer
    works with the installed pytest and pytest-xdist)."""
    from tests.shm_hygiene import remove_orphans

    before = session.config.stash.get(SHM_BEFORE, None)
    removed = remove_orphans(before) if before is not None else []
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if removed and reporter is not None:
        reporter.write_line(f"\n/dev/shm: removed {len(removed)} left by killed test servers: {' '.join(removed)}")
    starts = sorted(path.name for path in SESSION_SERVER_STARTS.glob("*")) if before is not None else []
    if len(starts) > 1:  # the session's tests ran on several workers, against several servers
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        if reporter is not None:
            reporter.write_line(f"\nFAILED: the session's server was started by {len(starts)} workers ({', '.join(starts)}): "
                                "pytest-xdist ignored the groups (pytest_collection_modifyitems)", red=True)


SESSION_SERVER_GROUP = "session-server"


def xdist_group_of(item) -> str:
    """Every test that uses the session's server is one group, so one worker runs them all
    against one server; every other file is a group of its own, so a module's fixture (the
    replicas' server, a process-runner engine) starts once."""
    uses_session_server = {"server", "triton"} & set(getattr(item, "fixturenames", ()))
    return SESSION_SERVER_GROUP if uses_session_server else str(item.path.relative_to(REPO))


@pytest.hookimpl(trylast=True)  # after pytest's own reordering by fixture, which would undo the order
def pytest_collection_modifyitems(config, items):
    """./build.sh test runs two pytest-xdist workers (`--dist loadgroup`). Within a group the
    order holds: the session server's fault tests, which kill parts of the shared server,
    run last in its group. Between groups it does not: pytest-xdist hands out the largest
    groups first, whatever the order here (so the `engine` marker's place in this sort has no
    effect under ./build.sh test; it orders a plain serial run).

    The group goes into the test's id as `@GROUP`, which is what pytest-xdist's scheduler
    reads. pytest-xdist 3.8 writes it into `item._nodeid`, which pytest 9 no longer reads
    (its ids are `item._id`): without this, its groups are silently ignored (measured: the
    session's tests ran on both workers, against two servers writing one log)."""
    def starts_its_own(item) -> bool:
        return any(item.get_closest_marker(name) for name in ("server", "engine"))

    items.sort(key=lambda item: (xdist_group_of(item) != SESSION_SERVER_GROUP,
                                 item.get_closest_marker("faults") is not None, not starts_its_own(item)))
    if config.getoption("dist", "no") == "loadgroup" or getattr(config.option, "loadgroup", False):
        for item in items:
            node_id = item._id
            last = node_id.names[-1] + (f"[{node_id.params}]" if node_id.params is not None else "")
            item._id = dataclasses.replace(node_id, names=(*node_id.names[:-1], f"{last}@{xdist_group_of(item)}"),
                                           params=None)


def error_text(body) -> str:
    """An error reply's message, in either shape: `{"error": "..."}` (the judge's and the
    operators' routes) or OpenAI's `{"error": {"message": ...}}` (/v1)."""
    found = body["error"]
    return found["message"] if isinstance(found, dict) else found
