"""The LLM over a rebuilt prompt, by the plan's path, up to the cache its decode steps continue on."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .layer_features import layer_features_added
from .plan import Cache, Plan, Prefill
from .prefill_layers import LayerEdits
from .segments import SegmentedPrefill
from .session import Session, View
from .static_cache import CAPACITY_STEP, StaticDecoder, layer_groups
from .stats import tokens_per_layer
from .unmerge import prompt_copies, static_copies


class LlmPrefill:
    """The prefill's LLM part on one applied model: slimvlm's static cache, the segments' scratch cache and graphs,
    the stage-3/4 edits, whether virtual unmerging is on."""

    def __init__(self, adapter, static: StaticDecoder, edits: LayerEdits, unmerge: bool) -> None:
        self.adapter = adapter
        self.static = static
        self.segments = SegmentedPrefill(adapter)
        self.edits = edits
        self.unmerge = unmerge

    def start_session(self, plan: Plan, rebuilt, tokens, given, input_ids: torch.Tensor, right_padded: bool,
                      arguments: dict) -> Session:
        """The prompt's state for prefill and decoding: its cache (the caller's, slimvlm's own static
        one, or a new dynamic one), its views of the sequence, where positions continue, what of the call
        (`arguments`: the model's forward's) the LM's masks follow."""
        sequence = rebuilt.sequence
        prompt_length = input_ids.shape[1]
        layers = len(self.adapter.llm_layers)
        views = [View(sequence=sequence, key_valid=sequence.valid)] * layers
        static = None
        if plan.cache is Cache.NONE:
            cache = None
        elif plan.cache is Cache.STATIC:  # every attention layer holds the whole prompt: a group per window
            entries = [None if recurrent else sequence.valid.shape[1] for recurrent in self.adapter.recurrent_layers()]
            groups = layer_groups(views, self.adapter.layer_windows(), entries)
            cache, static = self.static.start(given, groups, prompt_length, rebuilt.embeds)
        elif plan.cache is Cache.DYNAMIC and given is not None:
            cache = given
        else:  # a new dynamic cache: none was given, or a static one that the prefill's entries are handed to
            from transformers import DynamicCache

            cache = DynamicCache(config=self.adapter.text_config)
        session = Session(
            plan=plan,
            cache=cache,
            prompt_length=prompt_length,
            conversation=input_ids,
            next_position=sequence.next_position(),
            layer_views=views,
            tokens=tokens,
            given_cache=given,
            static=static,
            padded=rebuilt.padded,
            labels=rebuilt.labels,
            right_padded=right_padded,
            mask_inputs=self.adapter.mask_inputs(arguments),
        )
        if self.unmerge:
            session.copies = session.query_copies = prompt_copies(self.adapter, sequence, tokens, rebuilt.embeds)
        return session

    def run(self, plan: Plan, rebuilt, session: Session, given, kwargs: dict):
        """(the LM's output or None, its last hidden states, the tokens per layer (stats.tokens_per_layer)) over
        the rebuilt prompt by the plan's path; then the cache decoding continues on: stage 4's cuts, and the
        entries moved where the plan says."""
        sequence = rebuilt.sequence
        target = session.cache  # the dynamic cache decoding continues on, where the segments' entries move to
        output = None
        if plan.prefill is Prefill.SEGMENTS:
            hidden = self._in_segments(rebuilt, session, plan.graphs)
        elif plan.prefill is Prefill.STATIC:
            mask_dtype = self.adapter.mask_dtype(rebuilt.embeds.dtype)
            hidden = self.static.prefill(rebuilt.embeds, sequence.positions, session.static, mask_dtype, plan.graphs)
        else:
            with layer_features_added(self.adapter.llm_layers, session):  # on the LM's own forward alone (plan.py)
                mask = self.adapter.prompt_mask(sequence, rebuilt.embeds, session.cache, session.mask_inputs)
                output = self.adapter.run_llm(rebuilt.embeds, mask, sequence.positions, session.cache,
                                              session.cache is not None, **kwargs)
            hidden = output.last_hidden_state
        layer_tokens = tokens_per_layer(session)
        if plan.cache is not Cache.NONE:
            self.edits.compress_cache(session)
        if plan.cache is Cache.HAND_OFF:
            self._hand_off_to_static(session, given, rebuilt.embeds)
        elif plan.prefill is Prefill.SEGMENTS:
            session.cache = self._filled(target, session.cache) if plan.cache is Cache.DYNAMIC else None
        return output, hidden, layer_tokens

    def _in_segments(self, rebuilt, session: Session, graphs: bool) -> torch.Tensor:
        """The LM's last hidden states over the rebuilt prompt, its layers run in segments between the prefill
        method's drops (segments.py), each replayed from a CUDA graph when `graphs`; the drops run
        between them as the hooks would run them. session.cache holds the entries until they move on."""
        sequence = rebuilt.sequence
        hidden = rebuilt.embeds
        mask_dtype = self.adapter.mask_dtype(hidden.dtype)
        prompt_embeddings = self.adapter.position_embeddings(hidden, sequence.positions)
        session.cache = self.segments.start(*sequence.valid.shape, hidden)
        method = self.edits.drop_methods[0] if self.edits.drop_methods else None  # one method per stage (registry.py)
        drops = tuple(method.drop_layers) if method is not None else ()
        layers = len(self.adapter.llm_layers)
        start = 0
        for end in (*drops, layers):
            view = session.view_of(start)
            index = valid = None
            if end < layers and method.queries is not None:
                index, valid = self.edits.query_rows(session, view.sequence, method.queries)
                more = (1 << (index.shape[1] - 1).bit_length()) - index.shape[1]  # a power of two: a few graphs for
                # questions of any length
                index, valid = F.pad(index, (0, more)), F.pad(valid, (0, more))
            hidden, rows = self.segments.run(session.cache, start, end, hidden, view.key_valid,
                                             view.position_embeddings or prompt_embeddings, mask_dtype, index,
                                             end == layers, graphs)
            if end < layers:
                if index is not None:
                    session.rows[method.name, end] = (rows, index, valid)
                hidden = self.edits.drop(session, method, end, hidden, prompt_embeddings)
            start = end
        return hidden

    def _filled(self, cache, entries):
        """The dynamic cache `cache` holding the segments' entries, each layer's copied (the scratch cache they
        sit in is the next prefill's)."""
        for index, layer in enumerate(self.adapter.cache_layers(entries)):
            cache.update(layer.keys, layer.values, index)
        return cache

    def _hand_off_to_static(self, session: Session, given, like: torch.Tensor) -> None:
        """Move the prefill's dynamic cache into slimvlm's static one, a length per group of layers that
        hold the same entries and attend with one window (a sliding layer's dynamic cache holds its window's
        last entries alone), a linear-attention layer's states as they are: the static decode step gives each layer
        its group's mask itself."""
        layers = self.adapter.cache_layers(session.cache)
        entries = [None if recurrent else layer.keys.shape[2]
                   for layer, recurrent in zip(layers, self.adapter.recurrent_layers(), strict=True)]
        groups = layer_groups(session.layer_views, self.adapter.layer_windows(), entries)
        session.cache, session.static = self.static.hand_off(given, groups, layers, session.prompt_length, like)
        if session.copies is not None:
            slots = session.static.key_valid[0]  # virtual unmerging edits no layer: one group
            session.static_copies = static_copies(self.adapter, session.copies, slots, session.static.lengths[0],
                                                  session.next_position, like, CAPACITY_STEP)
