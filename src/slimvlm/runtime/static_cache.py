"""Decoding on transformers' static cache, in the reduced frame, compiled the way transformers compiles.

`generate(cache_implementation="static")` hands the prefill a StaticCache sized for the untouched
prompt. slimvlm swaps in a cache of its own, sized for the reduced sequence plus the room generate
left for new tokens, so that each decode step's attention reads only the entries that were kept
(a static cache attends over its whole length). Where stage 3 or 4 left layers with different
entries (FastV drops tokens from layer K on, MustDrop's output-aware cache keeps fewer), each group
of layers gets its own length: the prefill's entries are handed over. Every layer is a plain StaticLayer,
sliding-window ones too (Gemma 3's): their window is in their group's decode mask (a query sees the keys
less than `window` slots before it, as transformers' sliding layers do on cache indices), not in a rolling
buffer, so the slots keep the order the masks count in. Linear-attention layers (Qwen3.5's Gated DeltaNet)
hold no entries: each keeps transformers' own LinearAttentionLayer (a convolution and a recurrent state), reset,
filled and handed over beside the entries, and takes no mask in a one-token step, as the model's own decode gives
it none. The cache is reused while the batch
size stays and each group's length suffices (it only grows), so the compiled step is not rebuilt, and
lengths are rounded up to CAPACITY_STEP so that image-dependent counts (DyMU, MustDrop) share a few sizes.

Each decode step runs decode_step.py's function of tensors, compiled; the bookkeeping around it is a slice
assignment per group and an add.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..errors import SlimVLMError
from ..graphs import GraphCache
from ..sequence import attention_mask_4d, gather_rows
from .decode_step import compiled_decode_step, decode_step, decoder_layers

CAPACITY_STEP = 64


def is_static(cache) -> bool:
    """A cache of fixed length that generate() would compile for (transformers' own criterion)."""
    from transformers import DynamicCache

    return cache is not None and bool(getattr(cache, "is_compileable", False)) and type(cache) is not DynamicCache


def cache_length(cache) -> int:
    """The entries a static cache holds per sequence (its longest layer; a linear-attention layer's is -1)."""
    return max(layer.get_max_length() for layer in cache.layers)


def refuse_static_cache(adapter, given) -> None:
    """Refuse, before any work, a static cache (generate()'s, `given`) that slimvlm's cannot stand in for: the family's
    LM it cannot hold (adapter.static_cache_refusal), layers it does not mask (adapter.layer_windows), or an LM with a
    sliding window on every layer, whose every layer transformers caps at the window once prompt and new tokens pass
    it: the cache then no longer says how many tokens generate() will add, which slimvlm's must hold."""
    if adapter.static_cache_refusal:
        raise SlimVLMError(adapter.static_cache_refusal)
    windows = adapter.layer_windows()
    if None not in windows and cache_length(given) >= min(windows):
        raise SlimVLMError(
            f"{adapter.name}'s language model attends within a sliding window of {min(windows)} tokens on every layer, "
            "so the static cache generate() made holds that window alone and does not say how many tokens it will "
            "generate, which slimvlm's static cache must hold; generate without cache_implementation='static'"
        )


class LayerGroups(NamedTuple):
    """LLM layers that hold the same cache entries and attend with one mask form a group: per group, key_valid
    (B, W) of the entries its layers hold after the prompt and its sliding window (None: every earlier key); per
    LLM layer, its group, or len(key_valid) for a layer of recurrent state (no entries, no mask in a one-token
    step: StaticSteps.advance gives it None)."""

    key_valid: list[torch.Tensor]
    windows: tuple[int | None, ...]
    of_layer: tuple[int, ...]


def layer_groups(views: list, windows: tuple[int | None, ...], entries: list[int | None]) -> LayerGroups:
    """The groups of LLM layers that see one view (`views`: per layer, an object with the key_valid (B, W) of its
    sequence) and have one window (`windows`: per layer). entries: per layer, the entries its cache holds, the last
    of its view's (a dynamic cache's sliding layer keeps only its window's), None for a layer of recurrent state."""
    index: dict[tuple[int, int | None], int] = {}
    key_valid, group_windows, of_layer = [], [], []
    for view, window, held in zip(views, windows, entries, strict=True):
        key = (id(view), window)
        if held is not None and key not in index:
            index[key] = len(key_valid)
            key_valid.append(view.key_valid[:, view.key_valid.shape[1] - held :])
            group_windows.append(window)
        of_layer.append(None if held is None else index[key])
    recurrent = len(key_valid)
    return LayerGroups(key_valid, tuple(group_windows),
                       tuple(recurrent if group is None else group for group in of_layer))


@dataclass
class StaticSteps:
    """Where decoding stands in slimvlm's static cache, per group of layers (LayerGroups): key_valid (B, C)
    marks the slots that hold a real entry (the reduced prompt's, then each decoded token), `lengths` slots are
    used, `windows` is its sliding window; `group_of_layer` names each LLM layer's group (one past the groups: a
    layer of recurrent state)."""

    key_valid: list[torch.Tensor]
    lengths: list[int]
    group_of_layer: tuple[int, ...]
    windows: tuple[int | None, ...]

    def advance(self, steps: int, new_valid: torch.Tensor | None, mask_dtype: torch.dtype | None) -> tuple[torch.Tensor, ...]:
        """Take `steps` new tokens into each group's next slots, valid where `new_valid` (B, Q) says (None:
        all); per group, the (B, 1, Q, C) mask of their queries, then None for the layers of recurrent state (a
        one-token step, the only kind on this cache (decode.py), has no padding for them to mask)."""
        for key_valid, start in zip(self.key_valid, self.lengths):
            if start + steps > key_valid.shape[1]:
                raise SlimVLMError(
                    f"the static cache is full ({key_valid.shape[1]} slots, the reduced prompt's and the new tokens'); give "
                    "generate() the max_new_tokens it will decode, or pass a larger StaticCache"
                )
        masks = []
        for group, (key_valid, window) in enumerate(zip(self.key_valid, self.windows)):
            start = self.lengths[group]
            key_valid[:, start : start + steps] = True if new_valid is None else new_valid
            self.lengths[group] = start + steps
            if steps == 1 and mask_dtype is None and window is None:  # later slots are still False: the padding
                # mask is the causal one
                masks.append(key_valid[:, None, None, :])
            else:
                masks.append(attention_mask_4d(key_valid, steps, mask_dtype, first_query=start, window=window))
        return (*masks, None)


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

    def start(self, given, groups: LayerGroups, prompt_length: int, like: torch.Tensor) -> tuple[object, StaticSteps]:
        """A reset static cache for the reduced prompt, with the decode room that the given cache (sized by
        generate for the untouched prompt) left after `prompt_length`; a length per group of layers."""
        key_valid, group_of_layer = groups.key_valid, groups.of_layer
        room = self._room(given, prompt_length)
        batch = key_valid[0].shape[0]
        needed = [-(-(valid.shape[1] + room) // CAPACITY_STEP) * CAPACITY_STEP for valid in key_valid]
        held = self._held(batch, group_of_layer, like)
        reuse = held is not None and all(want <= have for want, have in zip(needed, held))
        capacities = held if reuse else [max(pair) for pair in zip(needed, held or needed)]  # only ever grows
        if reuse:
            reset(self._cache)
        else:  # None: a layer of recurrent state, one past the groups
            per_layer = tuple(capacities[group] if group < len(capacities) else None for group in group_of_layer)
            self._cache = None  # free the old one (and the graphs that write it) before allocating
            self._prefill_graphs = GraphCache(self._prefill)
            self._cache = static_cache(self.adapter.text_config, per_layer)
            self._cache_key = (batch, per_layer, like.dtype, like.device)
        slots = []
        for valid, capacity in zip(key_valid, capacities):
            slot = torch.zeros(batch, capacity, dtype=torch.bool, device=valid.device)
            slot[:, : valid.shape[1]] = valid
            slots.append(slot)
        return self._cache, StaticSteps(slots, [valid.shape[1] for valid in key_valid], group_of_layer, groups.windows)

    @staticmethod
    def _room(given, prompt_length: int) -> int:
        """The slots for new tokens that generate() left in the static cache it sized for the untouched prompt (its
        longest layers' length past the prompt: refuse_static_cache keeps out caches whose every layer is capped)."""
        room = cache_length(given) - prompt_length
        if room < 1:
            raise SlimVLMError(
                f"the static cache holds {cache_length(given)} entries, no more than the prompt's {prompt_length}; "
                "make it longer than the prompt plus the tokens to generate"
            )
        return room

    def _held(self, batch: int, group_of_layer: tuple[int, ...], like: torch.Tensor) -> list[int] | None:
        """Per group of layers, the slots the cache held now gives it (its layers' one length), or None where it
        cannot serve these groups (none yet, another batch, dtype or device, or a group over layers of different
        lengths). A cache that serves is reused when long enough, so the compiled decode step keeps its shapes,
        as transformers keeps its own static cache across calls (generate's _prepare_static_cache)."""
        if self._cache_key is None or (self._cache_key[0], *self._cache_key[2:]) != (batch, like.dtype, like.device):
            return None
        per_layer = self._cache_key[1]
        lengths: dict[int, set[int]] = {}
        for layer, group in enumerate(group_of_layer):
            if per_layer[layer] is not None:  # a layer of recurrent state has no length
                lengths.setdefault(group, set()).add(per_layer[layer])
        if any(len(held) != 1 for held in lengths.values()):
            return None
        return [lengths[group].pop() for group in range(len(lengths))]

    def hand_off(self, given, groups: LayerGroups, layers: list, prompt_length: int,
                 like: torch.Tensor) -> tuple[object, StaticSteps]:
        """A static cache holding what a prefill left in a dynamic one (`layers`: per LLM layer, its keys and
        values), for methods after which layers hold different entries (stages 3-4): each group of layers
        gets its own length, so decode steps read only the entries kept."""
        cache, steps = self.start(given, groups, prompt_length, like)
        fill(cache, layers)
        return cache, steps

    def prefill(self, embeds: torch.Tensor, positions: torch.Tensor, steps: StaticSteps, mask_dtype, graphs: bool) -> torch.Tensor:
        """The LM's last hidden states (B, L, D) over the reduced prompt, its entries written to the
        cache start() gave, each row's real tokens in the first slots and its padding after them (steps
        learns the new order): causal attention over them then needs no mask, and SDPA runs it with
        is_causal (its flash kernel), as transformers runs the untouched prompt on an empty static cache.
        Replayed from a CUDA graph per width when `graphs` (its output buffer is the graph's: use it
        before the next prefill)."""
        slots = steps.key_valid[0]
        if not graphs:
            hidden, ordered = self._prefill(embeds, slots, positions, mask_dtype)
        else:
            hidden, ordered = self._prefill_graphs(embeds, slots, positions, key=(mask_dtype,),
                                                   after_warmup=lambda: reset(self._cache))
        slots[:, : embeds.shape[1]] = ordered
        return hidden

    def _prefill(self, embeds: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, mask_dtype):
        """(hidden states in the prompt's order, the slots' validity in the cache's order)."""
        width = embeds.shape[1]
        valid = slots[:, :width]
        at = torch.arange(width, device=valid.device)
        first = valid.long().argmax(dim=1, keepdim=True)  # compacted rows: real tokens are one run from here
        order = (at + first) % width
        ordered = valid.gather(1, order)
        mask = None  # SDPA: is_causal (a padding row sees real ones; no real row sees padding)
        if mask_dtype is not None:  # eager attention reads every slot: its mask says which hold what
            mask = attention_mask_4d(torch.cat([ordered, slots[:, width:]], dim=1), width, mask_dtype, first_query=0)
        hidden = gather_rows(embeds, order)
        parts = self.adapter.decode_parts()
        position_embeddings = self.adapter.position_embeddings(hidden, gather_rows(positions, order))
        layers = len(parts.layers)
        hidden = decoder_layers(parts.body, parts, hidden, (mask,), (0,) * layers, None, [position_embeddings] * layers,
                                self.adapter.cache_kwarg, self._cache).last_hidden_state
        return gather_rows(hidden, (at - first) % width), ordered

    def step(self, input_ids: torch.Tensor, masks: tuple[torch.Tensor, ...], group_of_layer: tuple[int, ...],
             position_ids: torch.Tensor, cache, layer_kwargs: dict | None = None) -> torch.Tensor:
        """Logits (B, Q, V) of one decode step; masks: per group of layers, its (B, 1, Q, C) mask; layer_kwargs:
        see decode_step."""
        args = (self.adapter.decode_parts(), self.adapter.cache_kwarg, input_ids, masks, group_of_layer, position_ids, cache,
                layer_kwargs)
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


def static_cache(text_config, capacities: tuple[int | None, ...]):
    """transformers' StaticCache with each LLM layer's own length, every attention layer a plain StaticLayer (where the
    config has sliding-window layers, transformers' would roll their entries through a window-long buffer, out of the
    slots slimvlm's masks count); a layer of recurrent state (capacity None) keeps the LinearAttentionLayer
    transformers' StaticCache gives it."""
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    cache = StaticCache(config=text_config, max_cache_len=max(c for c in capacities if c is not None))
    cache.layers = [layer if capacity is None else StaticLayer(max_cache_len=capacity)
                    for layer, capacity in zip(cache.layers, capacities, strict=True)]
    return cache


def is_recurrent(layer) -> bool:
    """Whether a cache layer holds a linear-attention layer's convolution and recurrent states, not entries."""
    from transformers.cache_utils import LinearAttentionCacheLayerMixin

    return isinstance(layer, LinearAttentionCacheLayerMixin)


def recurrent_tensors(layer) -> list[torch.Tensor]:
    """A linear-attention cache layer's initialised states, convolution then recurrent, and its token count where it
    keeps one (transformers >= 5.25): what its reset() zeroes."""
    states = [t for held in (layer.conv_states, layer.recurrent_states) for t in held.values() if t is not None]
    count = getattr(layer, "cumulative_length_linear", None)
    return states + ([] if count is None else [count])


def reset(cache) -> None:
    """What StaticCache.reset() does (every layer's keys, values and length zeroed, a linear-attention layer's states
    too, and its flag of a previous state cleared, so that the next prefill starts it afresh) in one op, not three a
    layer: at batch 1 each op is a kernel launch the prefill waits for."""
    attention = [layer for layer in cache.layers if not is_recurrent(layer)]
    recurrent = [layer for layer in cache.layers if is_recurrent(layer)]
    tensors = [t for layer in attention if layer.is_initialized for t in (layer.keys, layer.values)]
    tensors += [layer.cumulative_length for layer in attention]
    torch._foreach_zero_(tensors + [t for layer in recurrent for t in recurrent_tensors(layer)])
    for layer in recurrent:
        for state in layer.has_previous_state:
            layer.has_previous_state[state] = False


def fill(cache, layers: list) -> None:
    """Write each layer's prompt entries (`layers`: per LLM layer, a dynamic cache's layer: keys and values (B, H, W, d),
    or a linear-attention layer's states) at the start of a reset static cache, in two ops for all attention layers
    (its update() takes five a layer) and one for the linear-attention layers' states, which decoding continues
    from."""
    pairs = list(zip(cache.layers, layers, strict=True))
    fill_entries([pair for pair in pairs if not is_recurrent(pair[0])])
    fill_states([pair for pair in pairs if is_recurrent(pair[0])])


def fill_entries(pairs: list) -> None:
    """Each (static layer, source) pair: the source's keys and values in the first slots."""
    for target, source in pairs:
        if not target.is_initialized:
            target.lazy_initialization(source.keys, source.values)
    targets = [t.keys[:, :, : s.keys.shape[2]] for t, s in pairs] + [t.values[:, :, : s.values.shape[2]] for t, s in pairs]
    torch._foreach_copy_(targets, [s.keys for _, s in pairs] + [s.values for _, s in pairs])
    torch._foreach_add_([t.cumulative_length for t, _ in pairs], [s.keys.shape[2] for _, s in pairs])


def fill_states(pairs: list) -> None:
    """Each (linear-attention layer, source) pair: the source's convolution and recurrent states (allocated as the
    layer allocates them on its first update), its token count, and its flag that a previous state is held (without
    which the next step would start the recurrence afresh)."""
    for target, source in pairs:
        for state in range(source.number_of_states):
            if not target.is_conv_states_initialized[state] and source.is_conv_states_initialized[state]:
                target.lazy_initialization(conv_states=source.conv_states[state], state_idx=state,
                                           conv_kernel_size=source.conv_kernel_size[state])
            if not target.is_recurrent_states_initialized[state] and source.is_recurrent_states_initialized[state]:
                target.lazy_initialization(recurrent_states=source.recurrent_states[state], state_idx=state)
            target.has_previous_state[state] = source.has_previous_state[state]
    if pairs:
        torch._foreach_copy_([t for target, _ in pairs for t in recurrent_tensors(target)],
                             [t for _, source in pairs for t in recurrent_tensors(source)])
