"""Stages 3-4 inside the LLM: a stage-3 method's drops at its layers (and the attention rows it reads there),
a stage-4 method's cut of the cache after prefill, and the layer hooks that run them inside the LM's own forward.

After a drop or a cut, LLM layers see different sequences (session.py's views); the hooks give each layer
its view's mask and positions while the LM's own forward runs (the plan says when: plan.py).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator

import torch

from ..attention import question_rows
from ..device_reads import read_together
from ..hooks import HookSet, capture_outputs
from ..method import Method, PrefillLayer, query_index
from ..sequence import IGNORE_INDEX, Sequence, compaction, gather_rows, kept_range
from .plan import Plan
from .session import Session, View


class LayerEdits:
    """The stage-3 methods that drop tokens and the stage-4 methods that cut the cache, on one applied model.
    session: the session being served (the hooks run inside the LM, where only the runtime knows it)."""

    def __init__(self, adapter, drop_methods: list[Method], cache_methods: list[Method],
                 session: Callable[[], Session]) -> None:
        self.adapter = adapter
        self.drop_methods = drop_methods
        self.cache_methods = cache_methods
        self._session = session
        self._hooks = HookSet()

    # ---- the layer hooks -----------------------------------------------------------------------
    @contextlib.contextmanager
    def hooks(self, plan: Plan) -> Iterator[None]:
        """Within the block, the layer hooks if the plan has them: from the first layer a view can differ on,
        each layer's view; in prefill, the drops and the attention rows they read."""
        if not plan.layer_hooks:
            yield
            return
        first = 0 if self.cache_methods else min((layer for m in self.drop_methods for layer in m.drop_layers), default=0)
        pre_hook = self._prefill_pre_hook if plan.prefill is not None else self._decode_pre_hook
        try:  # installing inside: a failure halfway leaves none of the hooks behind
            for index in range(first, len(self.adapter.llm_layers)):
                hook = functools.partial(pre_hook, index)
                self._hooks.add(self.adapter.llm_layers[index].register_forward_pre_hook(hook, with_kwargs=True))
            if plan.prefill is not None:
                for method in self.drop_methods:
                    if method.queries is not None:
                        for layer in method.drop_layers:
                            self._install_row_probe(method, layer)
            yield
        finally:
            self._hooks.remove()

    def _decode_pre_hook(self, layer_index: int, _module, args, kwargs):
        """A decode step's layer attends with its view's mask (the base view's is transformers' own)."""
        session = self._session()
        if session.is_base(layer_index):
            return None
        kwargs["attention_mask"] = self.adapter.for_layer(session.view_of(layer_index).decode_mask, layer_index)
        return args, kwargs

    def _prefill_pre_hook(self, layer_index: int, _module, args, kwargs):
        """At a drop layer the drop; then the layer sees its view: mask, positions, rotary embeddings."""
        session = self._session()
        for method in self.drop_methods:
            if layer_index in method.drop_layers:
                hidden = self.drop(session, method, layer_index, args[0] if args else kwargs["hidden_states"],
                                   kwargs["position_embeddings"])
                dropped = session.view_of(layer_index)  # the mask its layers attend with (segments make their own)
                dropped.prefill_mask = self.adapter.view_prefill_mask(dropped.sequence, hidden,
                                                                      self.adapter.mask_dtype(hidden.dtype),
                                                                      session.mask_inputs)
                if args:
                    args = (hidden, *args[1:])
                else:
                    kwargs["hidden_states"] = hidden
        if session.is_base(layer_index):
            return None
        view = session.view_of(layer_index)
        kwargs["attention_mask"] = self.adapter.for_layer(view.prefill_mask, layer_index)
        kwargs["position_embeddings"] = self.adapter.for_layer(view.position_embeddings, layer_index)
        kwargs["position_ids"] = view.sequence.positions
        return args, kwargs

    def _install_row_probe(self, method: Method, drop_layer: int) -> None:
        """Compute, beside SDPA, the attention rows `method` needs from the layer before `drop_layer`."""
        score_layer = drop_layer - 1
        parts = self.adapter.attention_parts(score_layer)
        captured: dict = {}

        def before(_module, _args, kwargs):
            captured["position_embeddings"] = kwargs["position_embeddings"]
            captured["capture"] = capture_outputs(parts.q_proj, parts.k_proj)
            captured["outputs"] = captured["capture"].__enter__()

        def after(_module, _args, _kwargs, _output):
            captured.pop("capture").__exit__(None, None, None)
            queries, keys = captured.pop("outputs")
            session = self._session()
            sequence = session.view_of(score_layer).sequence
            index, valid = self.query_rows(session, sequence, method.queries)
            rows = question_rows(self.adapter, parts, queries, keys, captured.pop("position_embeddings"), index,
                                 sequence.valid)
            session.rows[method.name, drop_layer] = (rows, index, valid)

        self._hooks.add(parts.module.register_forward_pre_hook(before, with_kwargs=True))
        self._hooks.add(parts.module.register_forward_hook(after, with_kwargs=True))

    # ---- stage 3: drops during prefill -----------------------------------------------------------
    @staticmethod
    def query_rows(session: Session, sequence: Sequence, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The query rows `which` of `sequence`: found on the prompt's sequence at the first probe (a read of
        their count), then carried through each drop (text is never dropped), so later probes read nothing."""
        known = session.queries.get(which)
        if known is None or known[0] is not sequence:
            known = (sequence, *query_index(sequence, which))
            session.queries[which] = known
        return known[1], known[2]

    @staticmethod
    def _carry_queries(session: Session, old: Sequence, new: Sequence, gather: torch.Tensor) -> None:
        """Move the query rows known on `old` to `new`, the sequence that gathering `old` by `gather` gives."""
        for which, (sequence, index, valid) in session.queries.items():
            if sequence is old:
                batch, length = old.valid.shape
                at = torch.zeros(batch, length + 1, dtype=torch.long, device=gather.device)  # padding: a spare column
                slots = torch.arange(gather.shape[1], device=gather.device).expand_as(gather)
                at.scatter_(1, torch.where(new.valid, gather, length), slots)
                session.queries[which] = (new, torch.where(valid, at.gather(1, index), 0), valid)

    def drop(self, session: Session, method: Method, layer_index: int, hidden: torch.Tensor,
             position_embeddings) -> torch.Tensor:
        """The method's drop at the input of `layer_index`: the layers from there on see the kept tokens;
        returns their input hidden states. position_embeddings: the prompt's rotary embeddings (before any
        drop)."""
        current = session.view_of(layer_index)
        rows, index, valid = session.rows.pop((method.name, layer_index), (None, None, None))
        sequence = current.sequence
        keep = method.prefill_keep(PrefillLayer(layer_index, sequence, hidden, rows, index, valid, session.tokens))
        keep = (keep | ~sequence.visual) & sequence.valid
        gather, new_valid, padded = compaction(keep, right=session.right_padded)
        new_sequence = sequence.gather(gather, new_valid)
        self._carry_queries(session, sequence, new_sequence, gather)
        if session.labels is not None:
            session.labels = torch.where(new_valid, session.labels.gather(1, gather), IGNORE_INDEX)
        embeddings = current.position_embeddings or position_embeddings
        view = View(
            sequence=new_sequence,
            key_valid=new_valid,
            padded=padded,
            position_embeddings=self.adapter.view_position_embeddings(embeddings, gather, new_sequence, hidden),
        )
        session.set_view(range(layer_index, len(self.adapter.llm_layers)), view)
        return gather_rows(hidden, gather)

    # ---- stage 4: the KV cache after prefill --------------------------------------------------
    def compress_cache(self, session: Session) -> None:
        """Each stage-4 method's cut of the prefill's cache."""
        for method in self.cache_methods:
            self._compress_by(session, method)

    def _compress_by(self, session: Session, method: Method) -> None:
        """Keep, per layer, only the cache entries the method chooses (visual entries only; text
        and positions of later tokens stay as they are). Layers that see one sequence and get the same keep
        mask (the same tensor) share one view; what each group drops and keeps is read in one transfer."""
        layers = self.adapter.cache_layers(session.cache)
        groups: dict[tuple[int, int], list[int]] = {}
        cuts: dict[tuple[int, int], tuple] = {}  # holds each keep, so that no id is reused while grouping
        for index in range(len(layers)):
            sequence = session.view_of(index).sequence
            keep = method.decode_keep(index, sequence, session.tokens)
            if keep is None:
                continue
            key = (id(sequence), id(keep))
            if key not in cuts:
                cuts[key] = (sequence, keep, (keep | ~sequence.visual) & sequence.valid)
            groups.setdefault(key, []).append(index)
        if not cuts:
            return
        facts = read_together([torch.cat([(cut != sequence.valid).any()[None], kept_range(cut)])
                               for sequence, _, cut in cuts.values()])
        shared = None  # where every cut layer keeps one set (cache_keeps_one_set), the view they share
        for (key, indices), (dropping, fewest, most) in zip(groups.items(), facts):
            view = session.view_of(indices[0])  # a group that drops nothing holds the set already
            if dropping:
                sequence, _, cut = cuts[key]
                gather, valid, padded = compaction(cut, known=(fewest, most))
                view = View(sequence=sequence.gather(gather, valid), key_valid=valid, padded=padded)
                at = gather[:, None, :, None]
                for index in indices:
                    cache_layer = layers[index]
                    cache_layer.keys = cache_layer.keys.gather(2, at.expand(-1, cache_layer.keys.shape[1], -1, cache_layer.keys.shape[3]))
                    cache_layer.values = cache_layer.values.gather(2, at.expand(-1, cache_layer.values.shape[1], -1, cache_layer.values.shape[3]))
            if method.cache_keeps_one_set:
                shared = shared or view
                view = shared
            session.set_view(indices, view)
