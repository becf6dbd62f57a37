"""One replica's vLLM front end (AsyncLLM) in its own child process of the generator stub.

Why a process: AsyncLLM's output handling (decoding the engine core's messages,
detokenizing, stop checks, per-request bookkeeping) runs in the process that holds
AsyncLLM. With every replica's AsyncLLM in the one stub, that work shared one core and one
GIL, and with two replicas the stub's core, not the GPUs, was the limit. Here each
replica's AsyncLLM has a
process of its own, and the stub exchanges one message per request part (the prompts in,
the finished answers out) or per streamed piece.

Threads, stub side (ProcessRunner): callers send under a lock; one reader thread receives
every message from the child and runs the callbacks (which only enqueue).
Child side (`serve`): the main thread receives commands and hands them to a VllmRunner;
answers from the engine's loop thread are queued and sent by a sender thread, so vLLM's
loop never waits on the pipe.

Messages, stub -> child: ("submit", id, items), ("stream", id, item), ("cancel", id),
("stop",). Child -> stub: ("ready", info) or ("start_failed", exception class, text) once,
then ("answer", id, results), ("piece", id, delta), ("error", id, kind, text),
("dead", text) when the engine has died, ("kv", *KvCacheGauge.figures()).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Sequence

from ..contract import InvalidRequest
from ..errors import ErrorKind
from ..engine_settings import EngineSettings
from .fallback import EngineStartError
from .generation import (BatchHandle, Completion, EngineUnavailable, GenerationItem, StreamListener, classify_error,
                         group_by_sampling, new_batch_id)
from .metrics import KvCacheGauge

log = logging.getLogger("generator.frontend")

HEALTH_CHECK_S = 0.25  # how often the child looks at its engine's health and KV-cache figures


@dataclass(frozen=True)
class RunnerSpec:
    """What the child needs to build its VllmRunner (sent pickled at spawn)."""
    settings: EngineSettings
    model_dir: str
    stop_strings: tuple[str, ...]
    stop_token_ids: tuple[int, ...]
    model_max_len: int | None
    replica: int


def error_message(exc: BaseException, engine_healthy: bool) -> tuple[str, str]:
    """(kind, text) of a failed request, to cross the process boundary: the kind is
    classify_error's, or "cancelled"; an internal error keeps its class name in the text."""
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled", str(exc) or "request cancelled"
    kind = classify_error(exc, engine_healthy)
    return kind.value, f"{type(exc).__name__}: {exc}" if kind is ErrorKind.INTERNAL else str(exc)


def error_from_message(kind: str, text: str) -> BaseException:
    """The exception the stub raises for a child's ("error", id, kind, text): one that
    classify_error sorts into the same kind."""
    return {ErrorKind.INVALID.value: InvalidRequest, "cancelled": asyncio.CancelledError,
            ErrorKind.UNAVAILABLE.value: EngineUnavailable}.get(kind, RuntimeError)(text)


class ProcessRunner:
    """The Runner contract (generation.Runner) over a child process that runs a VllmRunner.
    The constructor returns once the engine serves, or raises what its start raised
    (EngineStartError when the child died before it could say)."""
    backend = "vllm"
    frontend = "process"

    def __init__(self, spec: RunnerSpec, kv_gauge: KvCacheGauge | None = None,
                 placed: Callable[[], ContextManager] = contextlib.nullcontext):
        """`placed()`: the context in which the child is spawned (placement.devices_for: the
        child inherits the environment, its GPUs included, at spawn)."""
        context = multiprocessing.get_context("spawn")  # a fork would copy the stub's threads
        self._conn, child_end = context.Pipe()
        # Not a daemon: a daemonic process may not start children, and vLLM starts its engine core.
        self._process = context.Process(target=serve, args=(child_end, spec), name=f"engine-frontend-{spec.replica}")
        with placed():
            self._process.start()
        child_end.close()  # so that the child's exit reads as EOF here
        self.frontend_pid = self._process.pid
        self.on_submit: Callable[[Sequence[GenerationItem], int], None] | None = None
        self._kv_gauge = kv_gauge
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._pending: dict[str, Callable[[Any], None]] = {}  # batch id -> its callback
        self._dead: str | None = None
        info = self._await_start()
        self.max_model_len: int = info["max_model_len"]
        self.engine_kwargs: dict[str, Any] = info["engine_kwargs"]
        self.scheduler: dict[str, Any] = info["scheduler"]
        self.engine_mode: str = info["engine_mode"]
        self.engine_pid: int | None = info["engine_pid"]
        self._engine_processes = engine_process_tree(self.engine_pid)
        self._reader = threading.Thread(target=self._read, name=f"frontend-reader-{spec.replica}", daemon=True)
        self._reader.start()

    def _await_start(self) -> dict[str, Any]:
        try:
            message = self._conn.recv()
        except (EOFError, OSError):
            self._process.join(10)
            message = ("start_failed", "EngineStartError",
                       f"the engine's process exited with code {self._process.exitcode} before it started")
        if message[0] == "ready":
            return message[1]
        self._process.join(10)
        self._conn.close()
        _, exception_class, text = message
        if exception_class == "EngineStartError":  # the fallback chain gave up: the caller may fall back
            raise EngineStartError(text)
        raise RuntimeError(f"{exception_class}: {text}")

    @property
    def healthy(self) -> bool:
        return self._dead is None

    def submit(self, items: Sequence[GenerationItem], on_done: Completion) -> BatchHandle:
        handle = BatchHandle(new_batch_id())
        if self.on_submit is not None:
            self.on_submit(items, len(group_by_sampling(items)))
        self._request(("submit", handle.batch_id, list(items)), on_done)
        return handle

    def stream(self, item: GenerationItem, on_delta: StreamListener) -> BatchHandle:
        handle = BatchHandle(new_batch_id())
        if self.on_submit is not None:
            self.on_submit([item], 1)
        self._request(("stream", handle.batch_id, item), on_delta)
        return handle

    def cancel(self, handle: BatchHandle) -> None:
        self._send(("cancel", handle.batch_id))

    def _request(self, message: tuple, callback: Callable[[Any], None]) -> None:
        """Register the callback, then send; a dead child answers at once (the reader may
        have failed it already: whoever takes the callback calls it)."""
        batch_id = message[1]
        with self._lock:
            registered = self._dead is None
            if registered:
                self._pending[batch_id] = callback
        if registered and self._send(message):
            return
        if not registered or self._take(batch_id) is not None:
            callback(EngineUnavailable(self._dead or "the engine's process is gone"))

    def _send(self, message: tuple) -> bool:
        try:
            with self._send_lock:
                self._conn.send(message)
            return True
        except (OSError, ValueError):  # the child is gone (ValueError: the pipe is closed here)
            return False

    def _take(self, batch_id: str) -> Callable[[Any], None] | None:
        with self._lock:
            return self._pending.pop(batch_id, None)

    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "answer":
                callback = self._take(message[1])
                if callback is not None:
                    callback(message[2])
            elif kind == "piece":
                delta = message[2]
                with self._lock:
                    callback = (self._pending.get(message[1]) if delta.finish_reason is None
                                else self._pending.pop(message[1], None))
                if callback is not None:
                    callback(delta)
            elif kind == "error":
                callback = self._take(message[1])
                if callback is not None:
                    callback(error_from_message(message[2], message[3]))
            elif kind == "dead":
                self._dead = message[1]
            elif kind == "kv" and self._kv_gauge is not None:
                self._kv_gauge.load_figures(message[1:])
        self._process.join(5)
        self._reap_engine()
        with self._lock:
            if self._dead is None:
                self._dead = f"the engine's process exited (code {self._process.exitcode})"
            orphans, self._pending = list(self._pending.values()), {}
        for callback in orphans:  # nothing is left unanswered
            callback(EngineUnavailable(self._dead))

    def shutdown(self, timeout_s: float) -> None:
        """Stop the child (it shuts its engine down), or kill it; the reader then reaps
        what is left of its engine."""
        self._send(("stop",))
        self._process.join(timeout_s)
        if self._process.is_alive():
            log.warning("the engine front end %d did not stop in %.0f s; killing it", self.frontend_pid, timeout_s)
            self._process.kill()
            self._process.join(5)
        self._reader.join(timeout_s)

    def _reap_engine(self) -> None:
        """Kill the engine core and its workers if they outlived the child: vLLM's engine
        core does not notice its parent's death, and a killed child left it holding its
        memory (measured on CPU: 7 GB per orphan)."""
        for process in self._engine_processes:
            try:
                if process.status() == "zombie":  # exited, not yet reaped: nothing holds memory
                    continue
                process.kill()  # psutil checks that the pid is still that process
                log.warning("replica engine process %d outlived its front end; killed", process.pid)
            except Exception:  # gone already
                pass


def engine_process_tree(pid: int | None) -> list:
    """The engine core's process and its workers, as psutil handles (safe against pid reuse)."""
    if pid is None:
        return []
    try:
        import psutil

        core = psutil.Process(pid)
        return [core, *core.children(recursive=True)]
    except Exception:  # no psutil, or the engine is gone already
        return []


def engine_info(runner) -> dict[str, Any]:
    """What the stub shows of the child's engine (plain values: they cross the pipe)."""
    plain = (str, int, float, bool, type(None), list, dict)
    return {
        "max_model_len": runner.max_model_len,
        "engine_kwargs": {k: v if isinstance(v, plain) else repr(v) for k, v in runner.engine_kwargs.items()},
        "scheduler": runner.scheduler,
        "engine_mode": runner.engine_mode,
        "engine_pid": runner.engine_pid,
    }


def serve(conn, spec: RunnerSpec) -> None:
    """The child: build a VllmRunner, then serve the stub's commands until "stop" or until
    the stub is gone (EOF), and shut the engine down."""
    from ..stub import prepare_stub_process
    from . import config as engine_config
    from .metrics import engine_stat_loggers
    from .vllm_runner import VllmRunner

    child_log = prepare_stub_process(f"generator replica {spec.replica}")
    engine_config.set_vllm_log_level(spec.settings.vllm_log_level)
    gauge = KvCacheGauge()
    try:
        runner = VllmRunner(spec.settings, spec.model_dir, spec.stop_strings, spec.stop_token_ids, spec.model_max_len,
                            stat_loggers=engine_stat_loggers(spec.settings.engine_stats, gauge))
    except BaseException as exc:
        conn.send(("start_failed", type(exc).__name__, str(exc)))
        return
    outbox: queue.SimpleQueue = queue.SimpleQueue()
    stopping = threading.Event()

    def send_all() -> None:
        while (message := outbox.get()) is not None:
            try:
                conn.send(message)
            except (OSError, ValueError):  # the stub is gone; the main thread sees EOF too
                return

    def watch() -> None:
        reported = None
        while not stopping.wait(HEALTH_CHECK_S):
            if not runner.healthy:
                outbox.put(("dead", "the generator engine died"))
                return
            figures = gauge.figures()
            if figures != reported and gauge.total_blocks:
                outbox.put(("kv", *figures))
                reported = figures

    sender = threading.Thread(target=send_all, name="frontend-sender", daemon=True)
    watcher = threading.Thread(target=watch, name="frontend-health", daemon=True)
    outbox.put(("ready", engine_info(runner)))
    sender.start()
    watcher.start()
    handles = RequestHandles()

    # The callbacks below run on the engine's loop thread: bookkeeping and enqueueing only.
    def answer_to(batch_id: str) -> Completion:
        def done(outcome) -> None:
            handles.finished(batch_id)
            outbox.put(("error", batch_id, *error_message(outcome, runner.healthy))
                       if isinstance(outcome, BaseException) else ("answer", batch_id, outcome))
        return done

    def pieces_to(batch_id: str) -> StreamListener:
        def relay(event) -> None:
            if isinstance(event, BaseException) or event.finish_reason is not None:
                handles.finished(batch_id)
            outbox.put(("error", batch_id, *error_message(event, runner.healthy))
                       if isinstance(event, BaseException) else ("piece", batch_id, event))
        return relay

    try:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                child_log.warning("the generator stub is gone; stopping")
                break
            op = message[0]
            if op == "submit":
                handles.keep(message[1], runner.submit(message[2], answer_to(message[1])))
            elif op == "stream":
                handles.keep(message[1], runner.stream(message[2], pieces_to(message[1])))
            elif op == "cancel":
                handle = handles.get(message[1])
                if handle is not None:
                    runner.cancel(handle)
            elif op == "stop":
                break
    finally:
        stopping.set()
        runner.shutdown(timeout_s=5)
        outbox.put(None)
        sender.join(5)


class RequestHandles:
    """The child's runner handles by the stub's batch id, for cancellation. An answer can
    come before `keep` stores its handle (the engine's thread is quick): then it is not
    stored at all."""

    def __init__(self):
        self._lock = threading.Lock()
        self._handles: dict[str, BatchHandle] = {}
        self._answered: set[str] = set()

    def keep(self, batch_id: str, handle: BatchHandle) -> None:
        with self._lock:
            if batch_id in self._answered:
                self._answered.discard(batch_id)
            else:
                self._handles[batch_id] = handle

    def finished(self, batch_id: str) -> None:
        with self._lock:
            if self._handles.pop(batch_id, None) is None:
                self._answered.add(batch_id)

    def get(self, batch_id: str) -> BatchHandle | None:
        with self._lock:
            return self._handles.get(batch_id)
