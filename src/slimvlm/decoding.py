"""Decoding on transformers' static cache, in the reduced frame, compiled the way transformers compiles.

`generate(cache_implementation="static")` hands the prefill a StaticCache sized for the untouched
prompt. slimvlm swaps in a cache of its own, sized for the reduced sequence plus the room generate
left for new tokens, so that each decode step's attention reads only the entries that were kept
(a static cache attends over its whole length). The cache is reused while the batch size and the
size stay, so the compiled step is not rebuilt, and the size is rounded up to CAPACITY_STEP so that
image-dependent counts (DyMU) share a few sizes.

A decode step is one function of tensors (embed, the LM with a (B, 1, Q, C) mask and position ids,
lm_head): that function is what torch.compile sees, with transformers' own CompileConfig
(inductor, CUDA graphs). The bookkeeping around it is a slice assignment and an add.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import SlimVLMError
from .graphs import GraphCache
from .sequence import attention_mask_4d

CAPACITY_STEP = 64


def is_static(cache) -> bool:
    """A cache of fixed length that generate() would compile for (transformers' own criterion)."""
    from transformers import DynamicCache

    return cache is not None and bool(getattr(cache, "is_compileable", False)) and type(cache) is not DynamicCache


def cache_length(cache) -> int:
    """The entries a static cache holds per sequence (its longest layer)."""
    return max(layer.max_cache_len for layer in cache.layers)


@dataclass
class StaticSteps:
    """Where decoding stands in slimvlm's static cache: key_valid (B, C) marks the slots that hold a
    real entry (the reduced prompt's valid tokens, then each decoded token); `length` slots are used."""

    key_valid: torch.Tensor
    length: int

    @property
    def capacity(self) -> int:
        return self.key_valid.shape[1]

    def advance(self, steps: int, new_valid: torch.Tensor | None, mask_dtype: torch.dtype | None) -> torch.Tensor:
        """Take `steps` new tokens into the next slots, valid where `new_valid` (B, Q) says (None: all);
        the (B, 1, Q, C) mask of their queries."""
        start = self.length
        if start + steps > self.capacity:
            raise SlimVLMError(
                f"the static cache is full ({self.capacity} entries after the reduced prompt's); give generate() "
                "the max_new_tokens it will decode, or pass a larger StaticCache"
            )
        self.key_valid[:, start : start + steps] = True if new_valid is None else new_valid
        self.length = start + steps
        if steps == 1 and mask_dtype is None:  # later slots are still False: the padding mask is the causal one
            return self.key_valid[:, None, None, :]
        return attention_mask_4d(self.key_valid, steps, mask_dtype, first_query=start)


class StaticDecoder:
    """slimvlm's static cache for one applied model, and its decode step, compiled or eager.

    compile: True compiles the step, False never does, None (default) compiles as generate() does:
    on a GPU unless the model's generation_config says disable_compile."""

    def __init__(self, model, adapter, compile: bool | None) -> None:
        self.model = model
        self.adapter = adapter
        self.compile = compile
        self._cache = None
        self._cache_key: tuple | None = None
        self._prefill_graphs: GraphCache | None = None  # of the LLM prefill, writing self._cache
        self._compiled = None

    def start(self, given, valid: torch.Tensor, prompt_length: int, like: torch.Tensor) -> tuple[object, StaticSteps]:
        """A reset static cache for the reduced prompt `valid` (B, L), with the decode room that the
        given cache (sized by generate for the untouched prompt) left after `prompt_length`."""
        room = cache_length(given) - prompt_length
        if room < 1:
            raise SlimVLMError(
                f"the static cache holds {cache_length(given)} entries, no more than the prompt's {prompt_length}; "
                "make it longer than the prompt plus the tokens to generate"
            )
        batch, width = valid.shape
        capacity = -(-(width + room) // CAPACITY_STEP) * CAPACITY_STEP
        window = getattr(self.adapter.text_config, "sliding_window", None)
        if window is not None and capacity > window:
            raise SlimVLMError(
                f"the language model attends within a sliding window of {window} tokens, shorter than the "
                f"{capacity} this static cache holds; generate without cache_implementation='static'"
            )
        key = (batch, capacity, like.dtype, like.device)
        if key != self._cache_key:
            from transformers import StaticCache

            self._cache = None  # free the old one (and the graphs that write it) before allocating
            self._prefill_graphs = GraphCache(self._prefill)
            self._cache = StaticCache(config=self.adapter.text_config, max_cache_len=capacity)
            self._cache_key = key
        else:
            self._cache.reset()
        key_valid = torch.zeros(batch, capacity, dtype=torch.bool, device=valid.device)
        key_valid[:, :width] = valid
        return self._cache, StaticSteps(key_valid=key_valid, length=width)

    def prefill(self, embeds: torch.Tensor, positions: torch.Tensor, steps: StaticSteps, mask_dtype, graphs: bool) -> torch.Tensor:
        """The LM's last hidden states (B, L, D) over the reduced prompt, its entries written to the
        cache start() gave; replayed from a CUDA graph per width when `graphs` (its output buffer is
        the graph's: use it before the next prefill)."""
        mask = attention_mask_4d(steps.key_valid, embeds.shape[1], mask_dtype, first_query=0)
        if not graphs:
            return self._prefill(embeds, mask, positions)
        return self._prefill_graphs(embeds, mask, positions, after_warmup=self._cache.reset)

    def _prefill(self, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.adapter.run_llm(embeds, mask, positions, self._cache, True).last_hidden_state

    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, cache) -> torch.Tensor:
        """Logits (B, Q, V) of one decode step."""
        embed, body, head = self.adapter.decode_modules()
        args = (embed, body, head, self.adapter.cache_kwarg, input_ids, attention_mask, position_ids, cache)
        if not self._compiling(input_ids.device):
            return decode_step(*args)
        if self._compiled is None:  # looked up once per apply: a step's host time is what it must save
            self._compiled = compiled_decode_step(self.model)
        torch.compiler.cudagraph_mark_step_begin()
        return self._compiled(*args)

    def _compiling(self, device: torch.device) -> bool:
        if self.compile is not None:
            return self.compile
        return device.type == "cuda" and not getattr(self.model.generation_config, "disable_compile", False)


def decode_step(embed, body, head, cache_kwarg: str, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
    """One decode step of the LM, as a function of modules and tensors alone: what torch.compile sees.
    Module-level (not a method of a per-apply object) so that compiled code is found again when
    slimvlm is applied anew to the same model."""
    hidden = body(
        inputs_embeds=embed(input_ids), attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
        **{cache_kwarg: cache},
    ).last_hidden_state
    return head(hidden)


_COMPILED: dict[str, object] = {}


def compiled_decode_step(model):
    """decode_step compiled with the model's generation_config.compile_config (transformers' default:
    inductor with CUDA graphs), one compiled function per distinct config."""
    from transformers import CompileConfig

    config = getattr(model.generation_config, "compile_config", None) or CompileConfig()
    options = config.to_dict()
    key = repr(sorted(options.items(), key=lambda item: item[0]))
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(decode_step, **options)
    return _COMPILED[key]
