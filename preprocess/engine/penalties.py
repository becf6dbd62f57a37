"""Repetition, frequency and presence penalties without vocabulary-wide tensors.

vLLM's sampler applies the three penalties (the default REPETITION_PENALTY and FREQUENCY_PENALTY
turn two of them on for every request) by building, every step, token counts over the whole vocabulary
for every sequence: two int64 tensors of [sequences, vocabulary + 1] (790 MB each at 650
sequences and Qwen's 151,936 tokens), their masks, and three more full passes over the
logits, although a row only touches the few hundred tokens of its prompt and answer.

`apply_all_penalties` here has vLLM's signature and gives the same logits, bit for bit: it
gathers the logits of the tokens a row has seen, applies vLLM's own repetition-penalty op
and the same frequency and presence arithmetic to them, and scatters them back. A token
seen twice is written twice with the same value, so the result does not depend on write
order. Every other logit is left as it is; vLLM subtracts zero from it, which leaves its
value unchanged.

It reaches vLLM's engine processes as a vLLM general plugin (`register`, the
`vllm.general_plugins` entry point in pyproject.toml), which vLLM loads in every process it
starts. It takes effect only where `VLLM_PLUGINS` names it: the generator does that
(`VLLM_FAST_PENALTIES`), and any other vLLM in the same environment keeps its own sampler.

On CPU it replaces vLLM's function for a large gain (docs/performance.md, "Penalties over
the tokens each sequence has seen"). On a GPU, vLLM runs dense models with its V2 model
runner, whose sampler applies the penalties in one fused kernel and never calls the function
this replaces: there it stays off by default, and `penalties_in_use` says `vllm` whatever loads.
"""
from __future__ import annotations

import logging

log = logging.getLogger("generator.penalties")

PLUGIN_NAME = "llm_service_fast_penalties"


def seen_tokens(prompt_ids, output_ids, vocab_size: int):
    """Per row: every slot of its prompt and output as a real token index (`[rows, prompt +
    output]`), how many times that token appears in the output, and whether the row has
    seen any token at all. Pads (`vocab_size`, and vLLM's -1 placeholders) point at the
    row's first seen token, or at token 0 in a row that has seen none, so that every
    slot's write-back is one its row makes anyway (or none, see `apply_penalties`)."""
    import torch

    output_ids = output_ids.masked_fill(output_ids < 0, vocab_size)
    tokens = torch.cat([prompt_ids.to(output_ids.dtype), output_ids], dim=1)
    seen = tokens < vocab_size
    any_seen = seen.any(dim=1)
    first = tokens.gather(1, seen.to(torch.int8).argmax(dim=1, keepdim=True))  # argmax: the first True
    first = torch.where(any_seen.unsqueeze(1), first, torch.zeros_like(first))
    tokens = torch.where(seen, tokens, first)
    ordered = output_ids.sort(dim=1).values  # pads sort last and match no real token
    counts = (torch.searchsorted(ordered, tokens, right=True)
              - torch.searchsorted(ordered, tokens, right=False))
    return tokens, counts, any_seen


def apply_penalties(logits, prompt_ids, output_ids, presence, frequency, repetition):
    """In place, as `vllm.model_executor.layers.utils.apply_penalties`: `prompt_ids` and
    `output_ids` are padded with the vocabulary size; the penalties are one per row."""
    import torch
    from vllm._custom_ops import apply_repetition_penalties

    if prompt_ids.shape[1] + output_ids.shape[1] == 0:
        return logits  # no row has a token to penalise
    tokens, counts, any_seen = seen_tokens(prompt_ids, output_ids, logits.shape[1])
    seen_logits = logits.gather(1, tokens)
    values = seen_logits.clone()
    everywhere = torch.ones_like(values, dtype=torch.bool)  # each slot holds a seen token
    apply_repetition_penalties(values, everywhere, everywhere, repetition)
    # A row that has seen nothing points its slots at token 0 and must leave it as it is.
    values = torch.where(any_seen.unsqueeze(1), values, seen_logits)
    values -= frequency.unsqueeze(dim=1) * counts
    values -= presence.unsqueeze(dim=1) * (counts > 0)
    logits.scatter_(1, tokens, values)
    return logits


def apply_all_penalties(logits, prompt_token_ids, presence_penalties, frequency_penalties,
                        repetition_penalties, output_token_ids: list[list[int]]):
    """Drop-in for `vllm.v1.sample.ops.penalties.apply_all_penalties`: the output token
    lists go to the device as vLLM sends them (padded, pinned, without blocking)."""
    from vllm.v1.sample.ops.penalties import _convert_to_tensors

    output_ids = _convert_to_tensors(output_token_ids, logits.shape[1], logits.device)
    return apply_penalties(logits, prompt_token_ids, output_ids, presence_penalties, frequency_penalties,
                           repetition_penalties)


def register() -> None:
    """vLLM general-plugin entry point: swap the sampler's penalty function, only where
    `VLLM_PLUGINS` names this plugin. Loaded again in each process vLLM starts."""
    import vllm.envs as envs

    if PLUGIN_NAME not in (envs.VLLM_PLUGINS or []):
        return
    try:
        from vllm.v1.sample import sampler
        from vllm.v1.sample.ops import penalties as vllm_penalties
    except ImportError as exc:
        log.warning("vLLM's penalties stay: %s", exc)
        return
    if not (hasattr(sampler, "apply_all_penalties") and hasattr(vllm_penalties, "_convert_to_tensors")):
        log.warning("vLLM's penalties stay: this vLLM's sampler has no apply_all_penalties to replace")
        return
    sampler.apply_all_penalties = apply_all_penalties
    log.info("penalties: applied to the tokens each sequence has seen, not the whole vocabulary")


def penalties_in_use(vllm_config) -> str:
    """Whose penalties the engine applies: `seen tokens` (this module's, the plugin loaded)
    or `vllm`. vLLM loads its plugins the same way in this process as in the engine
    processes it starts, so the sampler here stands for theirs. vLLM's V2 model runner
    (vLLM 0.25's default for dense models on a GPU) samples with its own fused penalty
    kernel and never calls the V1 sampler's function, so there it is always `vllm`."""
    if getattr(vllm_config, "use_v2_model_runner", False):
        return "vllm"
    try:
        from vllm.v1.sample import sampler
    except ImportError:
        return "vllm"
    return "seen tokens" if getattr(sampler, "apply_all_penalties", None) is apply_all_penalties else "vllm"


def ignored_fast_penalties(asked: bool, vllm_config) -> str | None:
    """The start-up warning when VLLM_FAST_PENALTIES is on but the engine samples with vLLM's
    own penalties (the V2 model runner, or the plugin not loaded); None when nothing was
    asked or the plugin acts."""
    in_use = penalties_in_use(vllm_config)
    if not asked or in_use == "seen tokens":
        return None
    why = ("vLLM's V2 model runner applies its own fused penalty kernel"
           if getattr(vllm_config, "use_v2_model_runner", False) else "the penalties plugin is not loaded")
    return f"VLLM_FAST_PENALTIES=1 has no effect: {why}; penalties are vLLM's"
