"""The transformers backend: the generator's contract when vLLM is off or cannot start.

Batches are generated together (left padding), only the new tokens are decoded (the prompt is never echoed), stop tokens and
stop strings are honoured, and frequency_penalty and presence_penalty are a real logits
processor instead of arguments `generate` does not know.
"""
from __future__ import annotations

import logging
import queue
import threading
from typing import Sequence

from .generation import (BatchHandle, Completion, GenerationItem, GenerationResult, StreamDelta, StreamListener,
                         group_by_sampling, new_batch_id)
from ..contract import NOT_SET, InvalidRequest
from ..sampling import SamplingSettings

log = logging.getLogger("generator.transformers")


def penalty_processor(frequency: float, presence: float, prompt_len: int):
    """Subtracts frequency x (count of each token generated so far) and presence x (1 if
    generated at all), as vLLM does."""
    import torch

    def process(input_ids: "torch.Tensor", scores: "torch.Tensor") -> "torch.Tensor":
        generated = input_ids[:, prompt_len:]
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores)
        counts.scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - frequency * counts - presence * (counts > 0).to(scores.dtype)

    return process


class TransformersRunner:
    backend = "transformers"
    engine_mode = "TransformersRunner"
    engine_kwargs: dict = {}
    scheduler: dict = {}

    def __init__(self, model_dir: str, tokenizer, stop_strings: Sequence[str], stop_token_ids: Sequence[int],
                 device: str | None = None):
        """`device`: a torch device (a replica's first GPU); None: the first GPU, else the CPU."""
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, low_cpu_mem_usage=True).to(device)
        self.model.eval()
        self.device = device
        self.tokenizer = tokenizer
        self.stop_strings = [s for s in stop_strings if s]
        self.stop_token_ids = list(stop_token_ids)
        if tokenizer is None:
            raise RuntimeError(f"the transformers backend needs the model's tokenizer, and {model_dir} has none")
        self.pad_id = next((i for i in (tokenizer.pad_token_id, *self.stop_token_ids,
                                        getattr(self.model.config, "pad_token_id", None),
                                        getattr(self.model.config, "eos_token_id", None)) if isinstance(i, int)), 0)
        self.max_model_len = getattr(self.model.config, "max_position_embeddings", None)
        self.on_submit = None  # metrics hook: (items, number of sampling groups)
        self._work: queue.Queue = queue.Queue()
        self._stopping = threading.Event()
        # One worker thread: generate() holds the model; requests queue behind each other.
        self._thread = threading.Thread(target=self._serve, name="transformers-worker", daemon=True)
        self._thread.start()
        log.info("transformers backend up on %s", device)

    @property
    def healthy(self) -> bool:
        return self._thread.is_alive()

    def submit(self, items: Sequence[GenerationItem], on_done: Completion) -> BatchHandle:
        handle = BatchHandle(new_batch_id())
        self._work.put((list(items), on_done, handle))
        return handle

    def stream(self, item: GenerationItem, on_delta: StreamListener) -> BatchHandle:
        """The whole answer as one last piece: generate() gives no tokens before it ends."""
        return self.submit([item], lambda outcome: on_delta(
            outcome if isinstance(outcome, BaseException) else StreamDelta.whole(outcome[0])))

    def cancel(self, handle: BatchHandle) -> None:
        handle.cancelled = True  # a queued batch is dropped; a running generate() finishes

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                items, on_done, handle = self._work.get(timeout=0.2)
            except queue.Empty:
                continue
            if handle.cancelled:
                on_done(RuntimeError("request cancelled"))
                continue
            try:
                on_done(self._generate(items))
            except Exception as exc:  # one failed batch answers its own request only
                log.exception("generation failed")
                on_done(exc)

    def _generate(self, items: list[GenerationItem]) -> list[GenerationResult]:
        results: list[GenerationResult | None] = [None] * len(items)
        groups = group_by_sampling(items)
        if self.on_submit is not None:
            self.on_submit(items, len(groups))
        for sampling, indices in groups.items():
            for index, result in zip(indices, self._generate_group([items[i].token_ids for i in indices], sampling)):
                results[index] = result
        return results  # type: ignore[return-value]

    def _generate_group(self, prompts: list[list[int]], sampling: SamplingSettings) -> list[GenerationResult]:
        if sampling.top_logprobs != NOT_SET or sampling.response_format:
            raise InvalidRequest("logprobs and response_format need the vLLM backend; this server runs transformers")
        torch = self.torch
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], device=self.device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        kwargs = dict(
            max_new_tokens=sampling.max_tokens,
            repetition_penalty=sampling.repetition_penalty,
            eos_token_id=None if sampling.ignore_eos or not self.stop_token_ids else self.stop_token_ids,
            pad_token_id=self.pad_id,
        )
        if sampling.temperature > 0:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                          top_k=sampling.top_k if sampling.top_k > 0 else None)
        else:
            kwargs.update(do_sample=False)
        if sampling.frequency_penalty or sampling.presence_penalty:
            kwargs["logits_processor"] = [penalty_processor(sampling.frequency_penalty, sampling.presence_penalty,
                                                            width)]
        stop_strings = [*([] if sampling.ignore_eos else self.stop_strings), *sampling.stop]
        if stop_strings:
            kwargs.update(stop_strings=stop_strings, tokenizer=self.tokenizer)
        if sampling.seed != NOT_SET:
            torch.manual_seed(sampling.seed)  # one worker thread: nothing else samples meanwhile
        with torch.inference_mode():
            output = self.model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)
        results = []
        for prompt, row in zip(prompts, output[:, width:].tolist()):
            new_tokens = []
            for token in row:
                if token in self.stop_token_ids and not sampling.ignore_eos:
                    break
                new_tokens.append(token)
            text = self.tokenizer.decode(new_tokens, skip_special_tokens=True)
            for stop in stop_strings:
                text = text.split(stop, 1)[0]
            finish = "length" if len(new_tokens) >= sampling.max_tokens else "stop"
            results.append(GenerationResult(text, len(prompt), len(new_tokens), finish))
        return results

    def shutdown(self, timeout_s: float) -> None:
        self._stopping.set()
        self._thread.join(timeout_s)
