"""The generator's backend choice and lifecycle, independent of Triton.

Runs the replicas placement.py plans (DATA_PARALLEL_SIZE engines of TENSOR_PARALLEL_SIZE
GPUs each), spreads each request over those serving, and chooses each engine's backend:
vLLM or transformers (USE_VLLM, FORCE_VLLM, the fallback chain). When a replica's engine
process dies, the watchdog brings a new one up in the background while the other replicas
keep answering (with one replica, requests fail fast meanwhile), so the server recovers
without a restart.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, MutableMapping, Sequence

from .. import settings as cfg
from ..engine_settings import has_metax_device
from ..errors import ErrorKind
from ..runtime import GeneratorState
from ..tokenizer import load_tokenizer
from . import config as engine_config
from . import placement
from .fallback import EngineStartError
from .versions import check_vllm_version
from .metrics import engine_stat_loggers
from .generation import (BatchHandle, Completion, EngineUnavailable, GenerationItem, GenerationResult, PromptTooLong,
                         Runner, StreamDelta, StreamListener, check_prompt_lengths, classify_error)
from .replicas import EngineReplica, SplitRequest, joined_handle

log = logging.getLogger("generator")


def stop_token_ids(tokenizer, stop_strings: Sequence[str]) -> list[int]:
    """The tokenizer's eos plus the ids of the end markers that are single tokens."""
    ids: list[int] = []
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        ids.append(eos)
    vocab = tokenizer.get_vocab() if tokenizer is not None else {}
    for marker in ("<|im_end|>", "<|endoftext|>", *stop_strings):
        if marker in vocab:
            ids.append(vocab[marker])
    return list(dict.fromkeys(ids))


def text_stop_strings(tokenizer, stop_strings: Sequence[str], stop_ids: Sequence[int]) -> list[str]:
    """The stop strings vLLM must search the decoded text for. A special token among the stop
    ids never reaches the text (vLLM skips special tokens when decoding), so its string could
    never match: the id alone stops generation, and vLLM does one search less per token."""
    special = set(getattr(tokenizer, "all_special_tokens", None) or [])
    vocab = tokenizer.get_vocab() if tokenizer is not None else {}
    by_id = set(stop_ids)
    return [s for s in stop_strings if not (s in special and vocab.get(s) in by_id)]


def model_max_len(model_dir: Path) -> int | None:
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get("max_position_embeddings")
    return int(value) if isinstance(value, int) else None


def died_under(outcome: Any, engine_healthy: bool) -> bool:
    """Whether `outcome` is a failure from the engine going away (not the request's own
    fault, not a cancellation its client asked for while the engine was well)."""
    if not isinstance(outcome, BaseException) or classify_error(outcome, engine_healthy) is not ErrorKind.UNAVAILABLE:
        return False
    return not engine_healthy or not isinstance(outcome, asyncio.CancelledError)


def scheduler_capacity(runner: Runner, otherwise: int) -> int:
    """How many requests the runner's scheduler runs at once (vLLM's max_num_seqs)."""
    return int(runner.scheduler.get("max_num_seqs") or otherwise)


def installed_vllm() -> tuple[str | None, str | None]:
    """(vLLM's version, None) when it imports, else (None, the import error)."""
    try:
        import vllm

        return str(getattr(vllm, "__version__", "unknown")), None
    except Exception as exc:  # a broken install is a reason to fall back, told in the log
        return None, f"{type(exc).__name__}: {exc}"


def accelerator_count() -> int:
    """CUDA devices this process sees (0 without torch or CUDA)."""
    try:
        import torch

        return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    except Exception:
        return 0


def accelerator_available() -> bool:
    return accelerator_count() > 0


def prepare_generator_process(environ: MutableMapping[str, str]) -> cfg.Settings:
    """Process set-up of the generator: the environment fixes vLLM needs, then the settings
    for this process's device. The fixes come first: a blank CUDA_VISIBLE_DEVICES would
    hide the GPU from the accelerator probe."""
    metax = has_metax_device()
    for change in engine_config.prepare_process_environment(environ, metax):
        log.info("environment: %s", change)
    settings = cfg.load(environ, metax=metax, cpu_only=not accelerator_available())
    for change in engine_config.choose_vllm_plugins(environ, settings.engine):
        log.info("environment: %s", change)
    engine_config.set_vllm_log_level(settings.engine.vllm_log_level)
    return settings


class GeneratorService:
    # Rebuild attempts back off from the first delay, doubling, to the last: a restart that
    # keeps failing (FORCE_VLLM=1, out of memory) must not spin.
    retry_first_s = 0.5
    retry_max_s = 30.0

    def __init__(self, settings: cfg.Settings, metrics=None, process_environ: MutableMapping[str, str] | None = None):
        """`process_environ`: the process environment, where a replica's GPUs are
        set while its engine process is spawned; needed only with GPUs."""
        self.process_environ = {} if process_environ is None else process_environ
        self.model_dir = settings.model_dir
        self.state = GeneratorState(settings.runtime_dir)
        self.metrics = metrics  # preprocess.engine.metrics.GeneratorMetrics, or None outside Triton
        self.engine = settings.engine
        self.accelerator = not settings.engine.cpu_only
        self.sampling = settings.sampling
        self.tokenizer = load_tokenizer(self.model_dir)
        self.stop_token_ids = stop_token_ids(self.tokenizer, self.sampling.stop_strings)
        self.placements = placement.plan_replicas(
            self.engine.data_parallel_size, self.engine.tensor_parallel_size,
            placement.visible_devices(self.engine.visible_devices, accelerator_count()), self.accelerator)
        if self.metrics is not None:
            self.metrics.add_replicas(len(self.placements))
        self.process_frontends = placement.process_frontends(self.engine.frontend, len(self.placements))
        self.fallback: str | None = None  # why transformers serves where vLLM was asked for
        self.vllm_version: str | None = None
        self.replicas = self._start_replicas()
        if self.metrics is not None:
            for index, replica in enumerate(self.replicas):
                self.metrics.set_load(index, lambda r=replica: (r.in_flight, scheduler_capacity(r.runner, r.in_flight)))
        self.publish_state()
        self._stop = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="engine-watchdog", daemon=True)
        self._watchdog.start()

    def _start_replicas(self) -> list[EngineReplica]:
        """Every replica's engine, up. Engines in processes of their own start side by side
        (each child gets its GPUs); in-process engines one at a time, since a placement
        narrows the process environment. If one fails, those already up are shut down."""
        def start(where: placement.Replica) -> EngineReplica:
            replica = EngineReplica(where, self._start_backend, self.retry_first_s, self.retry_max_s)
            log.info("replica %d up on %s", where.index, ",".join(where.devices) or "CPU")
            return replica

        workers = len(self.placements) if self.process_frontends else 1
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="replica-start") as pool:
            starts = [pool.submit(start, where) for where in self.placements]
            concurrent.futures.wait(starts)
        failed = [f.exception() for f in starts if f.exception() is not None]
        if failed:
            for done in starts:
                if done.exception() is None:
                    done.result().runner.shutdown(timeout_s=10)
            raise failed[0]
        return [done.result() for done in starts]

    def _start_backend(self, where: placement.Replica) -> Runner:
        return self._hooked(self._new_runner(where), where.index)

    def _new_runner(self, where: placement.Replica) -> Runner:
        vllm_version, import_error = installed_vllm()
        self.vllm_version = vllm_version
        if vllm_version is not None and self.engine.use_vllm != "false":
            log.info("%s", check_vllm_version(vllm_version, self.engine.allow_unsupported_vllm))
        use, reason = engine_config.should_try_vllm(
            self.engine, vllm_version is not None, engine_config.has_c_compiler(), self.accelerator)
        if use:
            try:
                runner = self._vllm_runner(where)
                self.fallback = None
                return runner
            except EngineStartError as exc:
                if self.engine.force_vllm:
                    raise RuntimeError(f"FORCE_VLLM=1 and vLLM did not start: {exc}") from None
                self.fallback = f"vLLM did not start: {exc}"
        else:
            if import_error is not None:
                reason = f"{reason} ({import_error})"
            if self.engine.force_vllm and self.engine.use_vllm != "false":
                raise RuntimeError(f"FORCE_VLLM=1 but vLLM cannot be used: {reason}")
            chosen = self.engine.use_vllm == "false" or (self.engine.use_vllm == "auto" and not self.accelerator)
            self.fallback = None if chosen else f"vLLM cannot be used: {reason}"
            if chosen:
                log.info("not using vLLM: %s", reason)
        if self.fallback is not None:
            # One line an operator cannot miss: transformers serves many times slower than vLLM.
            log.error("SLOW: serving with transformers instead of vLLM (%s); FORCE_VLLM=1 fails start-up instead",
                      self.fallback)
        from .hf_runner import TransformersRunner

        device = f"cuda:{where.positions[0]}" if where.positions else None
        return TransformersRunner(str(self.model_dir), self.tokenizer, self.sampling.stop_strings,
                                  self.stop_token_ids, device=device)

    def _vllm_runner(self, where: placement.Replica) -> Runner:
        stop_strings = text_stop_strings(self.tokenizer, self.sampling.stop_strings, self.stop_token_ids)
        kv_gauge = self.metrics.kv_gauge(where.index) if self.metrics is not None else None
        if self.process_frontends:
            from .process_runner import ProcessRunner, RunnerSpec

            spec = RunnerSpec(self.engine, str(self.model_dir), tuple(stop_strings), tuple(self.stop_token_ids),
                              model_max_len(self.model_dir), where.index)
            return ProcessRunner(spec, kv_gauge, placed=lambda: placement.devices_for(where, self.process_environ))
        from .vllm_runner import VllmRunner

        with placement.devices_for(where, self.process_environ):
            return VllmRunner(self.engine, str(self.model_dir), stop_strings, self.stop_token_ids,
                              model_max_len(self.model_dir),
                              stat_loggers=engine_stat_loggers(self.engine.engine_stats, kv_gauge))

    def _hooked(self, runner: Runner, replica: int) -> Runner:
        if self.metrics is not None:
            metrics = self.metrics
            runner.on_submit = lambda items, groups: metrics.submitted(items, groups, replica)
        return runner

    @property
    def ready(self) -> bool:
        """Every replica serves (health says ok only then)."""
        return all(r.ready for r in self.replicas)

    @property
    def serving(self) -> bool:
        """At least one replica serves: requests are still answered."""
        return any(r.ready for r in self.replicas)

    def submit(self, items: Sequence[GenerationItem], on_done: Completion, resubmit: bool = True) -> BatchHandle | None:
        """Spread `items` over the serving replicas so that their loads level out; the
        answers come back in the items' order, through `on_done`, once. With `resubmit`, a
        part whose engine dies under it is sent again once (see _resubmit_when_serving)."""
        resubmit = resubmit and self.engine.resubmit_wait_s > 0
        serving = [r for r in self.replicas if r.ready]
        if not serving:
            on_done(EngineUnavailable("the generator engine is restarting; retry shortly"))
            return None
        lengths = [r.runner.max_model_len for r in serving if r.runner.max_model_len]
        try:
            check_prompt_lengths(items, min(lengths) if lengths else None)
        except PromptTooLong as exc:
            on_done(exc)
            return None
        shares = placement.split_evenly(len(items), [r.in_flight for r in serving])
        dealt = placement.deal_by_answer_length([item.sampling.max_tokens for item in items], shares)
        assigned = [(replica, positions) for replica, positions in zip(serving, dealt) if positions]
        parts: list[tuple[EngineReplica, BatchHandle]] = []
        split = SplitRequest([positions for _, positions in assigned], on_done,
                             lambda: self.cancel(joined_handle(parts)))
        for part, (replica, positions) in enumerate(assigned):
            if split.answered:  # an earlier part failed at once: the request is answered
                break
            generation = replica.engine_generation
            replica.add_in_flight(len(positions), generation)
            part_items = [items[i] for i in positions]
            handle = replica.runner.submit(part_items, self._part_done(split, part, replica, part_items, generation,
                                                                       resubmit))
            parts.append((replica, handle))
        return joined_handle(parts)

    def _part_done(self, split: SplitRequest, part: int, replica: EngineReplica, part_items: list[GenerationItem],
                   generation: int, resubmit: bool) -> Completion:
        def done(outcome):
            # On the replica's engine thread: bookkeeping only, the adapter sends elsewhere.
            replica.add_in_flight(-len(part_items), generation)
            if resubmit and not split.answered and died_under(outcome, replica.runner.healthy):
                self._resubmit_when_serving(part_items, lambda again: split.part_done(part, again))
                return
            if self.metrics is not None and not isinstance(outcome, BaseException):
                self.metrics.finished(outcome, replica.index)
            split.part_done(part, outcome)
        return done

    def _resubmit_when_serving(self, items: list[GenerationItem], on_done: Completion) -> None:
        """Prompts whose engine died before answering: once a replica serves again (the
        rebuilt engine, or another replica) within ENGINE_RESUBMIT_S, they are submitted
        again, once; past the bound, or on a second death, they get the 503. On a thread of
        its own: the caller is the dying engine's thread. Not cancellable meanwhile."""
        wait_s = self.engine.resubmit_wait_s

        def wait_then_submit() -> None:
            deadline = time.monotonic() + wait_s
            while not self.serving and time.monotonic() < deadline and not self._stop.is_set():
                time.sleep(0.2)
            if not self.serving:
                on_done(EngineUnavailable(f"the generator engine died and was not back within {wait_s:g} s "
                                          "(ENGINE_RESUBMIT_S); retry shortly"))
                return
            log.warning("submitting %d prompt(s) again: their engine died before answering", len(items))
            self.submit(items, on_done, resubmit=False)

        threading.Thread(target=wait_then_submit, name="resubmit", daemon=True).start()

    def stream(self, item: GenerationItem, on_delta: StreamListener) -> BatchHandle | None:
        """One answer, piece by piece, from the least loaded serving replica (see
        VllmRunner.stream). A backend that cannot stream (transformers) gives the whole
        answer as one last piece."""
        serving = [r for r in self.replicas if r.ready]
        if not serving:
            on_delta(EngineUnavailable("the generator engine is restarting; retry shortly"))
            return None
        replica = min(serving, key=lambda r: r.in_flight)
        try:
            check_prompt_lengths([item], replica.runner.max_model_len)
        except PromptTooLong as exc:
            on_delta(exc)
            return None
        generation = replica.engine_generation
        replica.add_in_flight(1, generation)
        started, tokens, first_token_s = time.perf_counter(), 0, None

        def relay(event: StreamDelta | BaseException) -> None:
            # On the replica's engine thread: bookkeeping, then the listener (which only enqueues).
            nonlocal tokens, first_token_s
            if isinstance(event, StreamDelta):
                tokens += event.tokens
                if first_token_s is None and event.tokens:
                    first_token_s = time.perf_counter() - started
            if isinstance(event, BaseException) or event.finish_reason is not None:
                replica.add_in_flight(-1, generation)
                if self.metrics is not None:
                    outcome = ("finished" if isinstance(event, StreamDelta) else
                               "cancelled" if isinstance(event, asyncio.CancelledError) else "failed")
                    self.metrics.stream_ended(outcome, GenerationResult(
                        "", len(item.token_ids), tokens, getattr(event, "finish_reason", outcome),
                        ttft_s=first_token_s, e2e_s=time.perf_counter() - started), replica.index)
            on_delta(event)

        return joined_handle([(replica, replica.runner.stream(item, relay))])

    def cancel(self, handle: BatchHandle) -> None:
        for replica, part in handle.parts:
            replica.runner.cancel(part)

    def _watch(self) -> None:
        """Rebuild dead engines (their process was killed) without a server restart, one
        replica at a time; until a replica is back the state says not ready."""
        while not self._stop.wait(0.5):
            for replica in self.replicas:
                if self._stop.is_set():
                    return
                if replica.notice_death():
                    self.publish_state()
                if replica.rebuild_if_due(time.monotonic()):
                    self.publish_state()

    def publish_state(self) -> None:
        """Write info() where the shim reads it (GET /info, health)."""
        if self.metrics is not None:
            for replica in self.replicas:
                self.metrics.set_engine_up(replica.ready, replica.index)
        self.state.publish(self.info())

    def info(self) -> dict[str, Any]:
        """The first replica's engine stands for all (they are built alike); `replicas` has each."""
        runner = self.replicas[0].runner
        return {
            "ready": self.ready,
            "serving": self.serving,
            "backend": runner.backend,
            "engine_fallback": self.fallback,
            "vllm_version": self.vllm_version,
            "engine_mode": runner.engine_mode,
            "frontend": "process" if self.process_frontends else "thread",
            "model_dir": str(self.model_dir),
            "engine_kwargs": runner.engine_kwargs,
            "scheduler": runner.scheduler,
            "max_model_len": runner.max_model_len,
            "tensor_parallel_size": self.engine.tensor_parallel_size,
            "replicas": [replica.info() for replica in self.replicas],
            "restarts": sum(replica.restarts for replica in self.replicas),
            "pid": os.getpid(),
            "engine_pid": getattr(runner, "engine_pid", None),
        }

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """The replicas' engines stop side by side: vLLM gives each engine process up to 5 s
        to exit before it kills it, and one after another that would outlast Triton's exit
        timeout with a few replicas."""
        self._stop.set()
        with concurrent.futures.ThreadPoolExecutor(len(self.replicas), thread_name_prefix="replica-stop") as pool:
            for done in [pool.submit(replica.runner.shutdown, timeout_s) for replica in self.replicas]:
                done.result()
