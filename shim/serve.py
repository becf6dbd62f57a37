"""`./build.sh serve`: tritonserver (supervised) plus the shim, in one process tree.

The shim starts first, so `GET /` answers `warming` from the first second. tritonserver
runs in its own process group, bound to 127.0.0.1, and is restarted whenever it exits;
on Ctrl-C or SIGTERM the whole group (stubs and vLLM engine processes included) is
stopped, so nothing is left behind.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shlex
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

import uvicorn

from preprocess import settings as cfg
from preprocess.engine.placement import plan_replicas, visible_devices

from .app import create_app
from .door import hardened_protocol
from .drain import DrainingServer

log = logging.getLogger("serve")

REPO = Path(__file__).resolve().parent.parent


def triton_home(shim: cfg.ShimSettings) -> Path:
    """TRITON_HOME (the NVIDIA image's /opt/tritonserver), else the one in the pytriton wheel."""
    return shim.triton_home or Path(sysconfig.get_paths()["purelib"]) / "pytriton" / "tritonserver"


def triton_command(shim: cfg.ShimSettings, repository: Path) -> list[str]:
    home = triton_home(shim)
    return [
        str(home / "bin" / "tritonserver"),
        f"--model-repository={repository}",
        f"--backend-directory={home / 'backends'}",
        f"--http-address={shim.triton_host}", f"--http-port={shim.triton_http_port}",
        f"--grpc-address={shim.triton_host}", f"--grpc-port={shim.triton_grpc_port}",
        f"--metrics-address={shim.triton_metrics_host}", f"--metrics-port={shim.triton_metrics_port}",
        "--log-verbose=0", "--exit-timeout-secs=10",
    ]


def triton_environment(base: dict[str, str], model_dir: Path, runtime: Path) -> dict[str, str]:
    """What the Python-backend stub needs: the venv's python3 first on PATH,
    the interpreter's own libpython, and absolute paths (the stub's cwd is not ours)."""
    env = dict(base)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = ":".join(p for p in (libdir, env.get("LD_LIBRARY_PATH", "")) if p)
    env["MODEL_DIR"] = str(model_dir)
    env["LLM_RUNTIME_DIR"] = str(runtime)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    env.setdefault("LC_ALL", "C.UTF-8")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def shell_exports(env: dict[str, str], base: dict[str, str], home: Path) -> str:
    """`export` lines for what `triton_environment` adds, and tritonserver on PATH: a plain
    `tritonserver --model-repository model_repository` in that shell runs the stubs as
    `./build.sh serve` does."""
    wanted = {name: value for name, value in env.items() if base.get(name) != value}
    wanted["MODEL_DIR"] = env["MODEL_DIR"]  # always: absolute, as the stubs' cwd is not the shell's
    wanted["PATH"] = f"{home / 'bin'}:{env['PATH']}"
    wanted["TRITON_HOME"] = str(home)
    return "".join(f"export {name}={shlex.quote(value)}\n" for name, value in sorted(wanted.items()))


def visible_gpu_count(run=subprocess.run) -> int:
    """GPUs nvidia-smi lists (0 without it): enough to check the placement before start-up."""
    try:
        listed = run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in listed.splitlines() if line.startswith("GPU "))


def check_placement(engine, gpu_count: int) -> None:
    """The generator's replicas fit the GPUs (SettingsError, one line, when they do not)."""
    if gpu_count:
        plan_replicas(engine.data_parallel_size, engine.tensor_parallel_size,
                      visible_devices(engine.visible_devices, gpu_count), accelerator=True)


def restart_delay(base_s: float, failures_in_a_row: int) -> float:
    """Back off when the server keeps failing (a model that cannot load): base, doubling, up to 30 s."""
    return min(30.0, base_s * 2 ** min(failures_in_a_row - 1, 5))


# Popen arguments for tritonserver: a process group of its own, so it is killed whole and
# Ctrl-C reaches the shim only, but the shim's session. Linux's autogroup schedules a session
# as one group, and an engine in another session kept the shim off the CPU for seconds on a
# 2-core machine (every piece of a stream arrived at its end). `process_group` is 3.11+;
# the MetaX image runs 3.10, where the child calls setpgrp before its exec.
OWN_PROCESS_GROUP: dict = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}


class TritonSupervisor:
    """Keeps one tritonserver running; restarts it when it exits unexpectedly."""

    def __init__(self, command: list[str], env: dict[str, str], restart_delay_s: float = 1.0):
        self.command = command
        self.env = env
        self.restart_delay_s = restart_delay_s
        self.process: subprocess.Popen | None = None
        self.restarts = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="triton-supervisor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        failures_in_a_row = 0
        while not self._stopping.is_set():
            log.info("starting tritonserver")
            started = time.monotonic()
            self.process = subprocess.Popen(self.command, env=self.env, cwd=REPO, **OWN_PROCESS_GROUP)
            code = self.process.wait()
            if self._stopping.is_set():
                return
            self._kill_group(self.process)  # stubs and engines of the dead server
            self.restarts += 1
            failures_in_a_row = 1 if time.monotonic() - started > 120 else failures_in_a_row + 1
            delay = restart_delay(self.restart_delay_s, failures_in_a_row)
            log.error("tritonserver exited with %s; restarting in %.0f s (restart %d)", code, delay, self.restarts)
            self._stopping.wait(delay)

    @staticmethod
    def _kill_group(process: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass

    def restart(self) -> None:
        """Stop the running server; the supervising loop starts a new one."""
        process = self.process
        if process is not None and process.poll() is None:
            self._kill_group(process, signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                self._kill_group(process)

    def stop(self, timeout_s: float = 20.0) -> None:
        self._stopping.set()
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            self._kill_group(process, signal.SIGTERM)
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver did not stop in %.0f s; killing it", timeout_s)
        self._kill_group(process)  # whatever of the group is left


def run_shim(app, shim: cfg.ShimSettings) -> None:
    config = uvicorn.Config(app, host=shim.host, port=shim.port, log_level="warning", timeout_graceful_shutdown=5,
                            http=hardened_protocol(shim.header_timeout_s),
                            h11_max_incomplete_event_size=shim.max_header_bytes)
    DrainingServer(config, app.state.shim.drain, shim.drain_s).run()


def attach(settings: cfg.Settings) -> int:
    """TRITON_URL: serve the shim in front of a Triton started elsewhere. Health, warm-up and
    the return to `ok` after an outage are the same; restarting that server is its owner's
    job (the shim cannot). Sharing LLM_RUNTIME_DIR with it (same host) adds the per-replica
    health and the abort of requests whose client went away."""
    shim = settings.shim
    log.info("attaching to the Triton at %s; shim on %s:%d", shim.triton_url, shim.host, shim.port)
    app = create_app(settings)
    run_shim(app, shim)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(levelname)s %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    try:
        settings = cfg.load(os.environ)
        if settings.shim.triton_url is None and "--print-env" not in argv:
            check_placement(settings.engine, visible_gpu_count())
    except cfg.SettingsError as exc:
        log.error("%s", exc)
        return 2
    shim, model_dir = settings.shim, settings.model_dir
    if shim.triton_url is not None:
        return attach(settings)
    server_binary = triton_home(shim) / "bin" / "tritonserver"
    if not server_binary.is_file():
        log.error("no tritonserver at %s (run ./build.sh, or set TRITON_HOME)", server_binary)
        return 2
    if "--print-env" in argv:  # for a plain tritonserver: eval "$(python -m shim.serve --print-env)"
        base = dict(os.environ)
        env = triton_environment(base, model_dir, settings.runtime_dir or Path())
        if settings.runtime_dir is None:
            env.pop("LLM_RUNTIME_DIR")
        sys.stdout.write(shell_exports(env, base, triton_home(shim)))
        return 0
    if not (model_dir / "config.json").is_file():
        log.error("MODEL_DIR %s has no config.json (run ./build.sh, or point MODEL_DIR at a model folder)", model_dir)
        return 2
    runtime = settings.runtime_dir or Path(tempfile.mkdtemp(prefix="llm-runtime-"))
    runtime.mkdir(parents=True, exist_ok=True)
    settings = dataclasses.replace(settings, runtime_dir=runtime)
    env = triton_environment(dict(os.environ), model_dir, runtime)
    supervisor = TritonSupervisor(triton_command(shim, REPO / "model_repository"), env)
    log.info("model %s; shim on %s:%d; tritonserver on %s:%d", model_dir, shim.host, shim.port,
             shim.triton_host, shim.triton_http_port)
    app = create_app(settings, on_shutdown=supervisor.stop, restart_server=supervisor.restart)
    app.state.supervisor = supervisor
    supervisor.start()
    try:
        run_shim(app, shim)
    finally:
        supervisor.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
