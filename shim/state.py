"""The shim's one state object: settings, the ensemble client, health, warm-up and the
run-time system prompt. Every route reaches it through `shim_state(request)`."""
from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Any, AsyncIterator, Mapping

from fastapi import Request

from preprocess import settings as cfg
from preprocess.contract import InvalidRequest
from preprocess.reasoning import ParserUnavailable, Reasoning, configured
from preprocess.runtime import CancelMarkers, GeneratorState
from preprocess.sampling import model_sampling_defaults

from .bodies import Limits
from .budget import PromptCounter, WorkLedger, check_request_work
from .ensemble import Answer, EnsembleClient, EnsembleError
from .drain import Drain
from .errors import ApiError, ClientGone
from .guards import ShimMetrics
from .progress import Heartbeat
from .streaming import Piece, StreamClient
from .warmup import warmup_prompts

log = logging.getLogger("shim")

WARMUP_MAX_TOKENS = 8
PROBE_TIMEOUT_S = 30
# Requests with more text than this are counted on a worker thread, off the event loop.
OFF_LOOP_CHARS = 64 * 1024


class ShimState:
    def __init__(self, settings: cfg.Settings, live_environ: Mapping[str, str],
                 client: EnsembleClient | None = None, restart_server=None):
        self.settings = settings
        self.live_environ = live_environ  # BATCH_MODE only, which health reads at each request
        self.system_prompt = settings.chat.system_prompt  # changed at run time by POST /system_prompt
        shim = settings.shim
        self.limits = Limits(shim.max_batch_prompts, shim.max_request_tokens, settings.largest_token_limit)
        runtime = settings.runtime_dir
        self.client = client or EnsembleClient(
            shim.triton_endpoint, timeout_s=shim.request_timeout_s,
            cancel_markers=CancelMarkers(runtime / "cancelled" if runtime else None))
        self.streams = StreamClient(shim.triton_grpc_endpoint, timeout_s=shim.request_timeout_s,
                                    cancel_markers=self.client.cancel_markers)
        self.generator = GeneratorState(runtime)
        self.metrics = ShimMetrics()
        self.drain = Drain()  # set on the first SIGTERM (shim.drain)
        # Byte counts (a bound) until the tokenizer is loaded, off the loop, before warm-up.
        self.counter = PromptCounter(None)
        self.ledger = WorkLedger(max(shim.max_queued_tokens, shim.max_request_tokens), self.metrics.queued_tokens.set)
        self.client.on_failure = self.metrics.model_failures.inc
        self.restart_server = restart_server  # the supervisor's restart, under ./build.sh serve
        self.ready = False
        self.replicas_up: tuple[int, int] | None = None  # (serving, in all), as the generator says
        self.engine_fallback: str | None = None  # why transformers serves where vLLM was asked for
        self.started = time.monotonic()
        self.ready_after_s: float | None = None
        self.last_wait_report_s = 0.0
        self._openai_defaults: dict[str, Any] | None = None
        self._reasoning_for: tuple[Any, Reasoning | None] | None = None  # (the tokenizer, its split)
        self._reasoning_load: asyncio.Future | None = None

    def openai_defaults(self) -> dict[str, Any]:
        """What /v1 applies to a sampling field a client leaves out (model_sampling_defaults),
        read once the model is in place."""
        if self._openai_defaults is None:
            found = model_sampling_defaults(self.settings.model_dir)
            if (self.settings.model_dir / "config.json").is_file():
                self._openai_defaults = found
            return found
        return self._openai_defaults

    @property
    def reasoning(self) -> Reasoning | None:
        """vLLM's reasoning parser that splits thinking out of /v1 chat answers as
        `reasoning_content` (REASONING_PARSER), None for no split. Resolved off the event loop
        (`auto` reads the whole vocabulary) for the tokenizer the shim holds: a chat that
        arrives before the warm-up has loaded it gets no split, and later ones get the parser."""
        tokenizer = self.counter.tokenizer
        if self._reasoning_for is None or self._reasoning_for[0] is not tokenizer:
            self._reasoning_for = (tokenizer, configured(self.settings.chat.reasoning_parser, self.settings.model_dir,
                                                         tokenizer))
        return self._reasoning_for[1]

    @property
    def batch_mode(self) -> bool:
        return cfg.batch_mode(self.live_environ)

    async def admit(self, rows: list[str], overrides: dict[str, Any], choices: int = 1, row_input: str = "prompt",
                    verbatim: bool = False) -> tuple[dict[str, Any], int]:
        """The overrides as the ensemble gets them, and the request's work (shim.budget):
        prompt tokens after the template, plus choices x new tokens. ApiError when a setting
        is out of range or the request is over a limit."""
        values = self.limits.admit(overrides, len(rows), choices)
        counting = functools.partial(self.counter.count, rows, self.system_prompt, row_input, verbatim)
        try:
            counts = await asyncio.to_thread(counting) if sum(map(len, rows)) > OFF_LOOP_CHARS else counting()
        except InvalidRequest as exc:
            raise ApiError(400, str(exc)) from None
        return values, check_request_work(counts, choices, self.limits.new_tokens(values),
                                          self.limits.max_request_tokens)

    async def generate(self, request: Request, prompts: list[str], overrides: dict[str, Any], work: int,
                       system_prompt: str | None = None, **options) -> list[Answer]:
        """The ensemble's answers, for every generating route, while `work` is held in the
        ledger (a 429 when it does not fit): a client that disconnects first has its
        generation aborted (in vLLM, through the cancel markers). `options` go to
        EnsembleClient.generate (row_input, texts, outputs)."""
        with self.ledger.reserve(work):
            answers = self.client.generate(prompts, self.system_prompt if system_prompt is None else system_prompt,
                                           overrides, **options)
            return await run_until_disconnect(request, answers)

    async def stream(self, prompt: str, overrides: dict[str, Any], work: int, **options) -> AsyncIterator[Piece]:
        """One answer's pieces from llm_stream (see StreamClient.stream), with the system
        prompt of the moment; `work` is held in the ledger until the stream is closed."""
        with self.ledger.reserve(work):
            pieces = self.streams.stream(prompt, self.system_prompt, overrides, **options)
            try:
                async for piece in pieces:
                    yield piece
            finally:
                await pieces.aclose()

    async def monitor(self) -> None:
        """Follows the ensemble: warm up whenever it (re)appears, fall back to warming when it
        goes, and restart tritonserver only when its models are dead (see EnsembleClient)."""
        while True:
            generator_up, self.replicas_up, fallback = self.generator.status()
            if fallback != self.engine_fallback:
                self.engine_fallback = fallback
                self.metrics.engine_fallback.set(1 if fallback else 0)
            if not generator_up or self.degraded:
                # The generator is rebuilding an engine by itself: failures are not a dead server.
                self.client.reset_failures()
            if self.restart_server is not None and self.client.suspect:
                await self.check_for_dead_server()
            up = generator_up and await self.client.ready()
            if not up:
                await self.client.let_go_when_idle()
            if not up and not self.ready:
                self._report_waiting()
            if up and not self.ready:
                await self._warm_up()
            elif not up and self.ready:
                log.warning("the ensemble is not ready any more; health says warming")
                self.ready = False
            await asyncio.sleep(0.5)

    async def check_for_dead_server(self) -> bool:
        """After a model failure: probe, and restart tritonserver when the probes have kept
        failing (3 in a row over 5 s). Whether it restarted."""
        await self._probe()
        if not self.client.persistently_failing():
            return False
        log.error("the shim's own probe request fails although Triton says ready (%d in a row): "
                  "restarting tritonserver", self.client.failures_in_a_row)
        self.ready = False
        self.client.reset_failures()
        self.metrics.server_restarts.inc()
        await asyncio.to_thread(self.restart_server)
        return True

    async def _probe(self) -> None:
        """One request of the shim's own (the warm-up prompt, one token), whose input is
        known to be good. Only its failure counts toward a restart; a probe that is merely
        slow (a busy engine) or meets a restarting engine (503) proves nothing either way."""
        try:
            await asyncio.wait_for(self.client.generate([self.settings.warmup.prompt], self.system_prompt,
                                                        {"max_new_tokens": 1}), PROBE_TIMEOUT_S)
        except EnsembleError as exc:
            if exc.status == 502:
                log.warning("probe request failed: %s", exc.message)
                self.client.probe_failed()
        except asyncio.TimeoutError:
            log.info("probe request unanswered after %d s (a busy engine); probing again", PROBE_TIMEOUT_S)

    @property
    def degraded(self) -> bool:
        """Some replica is down while others serve: answers still come, health is not ok."""
        return self.replicas_up is not None and self.replicas_up[0] < self.replicas_up[1]

    def _report_waiting(self) -> None:
        """While the model server comes up (engine load: tens of seconds), one line every 5 s."""
        waited = time.monotonic() - self.started
        if waited - self.last_wait_report_s >= 5.0:
            self.last_wait_report_s = waited
            log.info("waiting for the model server: %.0f s (generator: %s)", waited, self.generator.describe())

    async def _warm_up(self) -> None:
        await self.client.read_max_batch_size()
        if self.counter.tokenizer is None:
            self.counter = await asyncio.to_thread(self._load_counter)
        if self._reasoning_load is None:  # beside the warm-up, not before it: readiness does not wait
            self._reasoning_load = asyncio.ensure_future(asyncio.to_thread(self._load_reasoning))
        prompts = warmup_prompts(self.settings.warmup)
        started = time.monotonic()
        try:
            with Heartbeat(log, f"warm-up ({len(prompts)} prompts through the ensemble)"):
                await self.client.generate(prompts, self.system_prompt, {"max_new_tokens": WARMUP_MAX_TOKENS})
        except EnsembleError as exc:
            log.warning("warm-up failed (%s); will retry", exc.message)
            return
        self.ready = True
        if self.ready_after_s is None:
            self.ready_after_s = time.monotonic() - self.started
        log.info("ready: warm-up took %.1f s, %.1f s since the shim started", time.monotonic() - started,
                 time.monotonic() - self.started)


    def _load_reasoning(self) -> None:
        """vLLM's reasoning parser imported before the first chat asks for it (seconds); one
        the installed vLLM lacks is logged here, and /v1 chat answers 501 naming it."""
        reasoning = self.reasoning
        if reasoning is None:
            return
        try:
            reasoning.load()
            log.info("thinking split by vLLM's reasoning parser %r", reasoning.name)
        except ParserUnavailable as exc:
            log.error("%s: /v1 chat answers 501", exc)

    def _load_counter(self) -> PromptCounter:
        from preprocess.tokenizer import load_tokenizer

        counter = PromptCounter(load_tokenizer(self.settings.model_dir), self.settings.chat.fast_chat_template)
        return counter


def shim_state(request: Request) -> ShimState:
    return request.app.state.shim


async def run_until_disconnect(request: Request, work):
    """Run `work`; if the client disconnects first, cancel it (which aborts it in vLLM)."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if done:
            return task.result()
        if await request.is_disconnected():
            log.info("client disconnected; cancelling its generation")
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise ClientGone()
