"""Runs a model with methods installed: the wrapped forward, the prefill and decode bookkeeping.

Data flows one way: pixels -> stage 1 (encoder) -> stage 2 (projected tokens) -> the LLM input is
rebuilt (embeddings, mask, positions) -> stage 3 (LLM layers in prefill) -> decode steps whose
masks and positions continue the reduced sequence. generate() needs no change: its own
bookkeeping stays in the frame of the original prompt, and each forward maps it to ours.
"""

from __future__ import annotations

import functools
import inspect
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SlimVLMError
from ..models.compat import cache_kwarg
from ..hooks import HookSet, capture_outputs
from ..device_reads import read_together
from ..sequence import (IGNORE_INDEX, Sequence, attention_mask_4d, compaction, gather_rows, kept_range, is_placeholder,
                       padding_of_causal_mask, rebuild)
from ..method import Method, PrefillLayer, Stage, query_index
from ..attention import question_rows
from .decode_step import decode_step
from .static_cache import CAPACITY_STEP, StaticDecoder, is_static
from .. import graphs as cuda_graphs
from .outputs import Outputs, kept_positions
from .prompt import prompt_shape, refuse_unsupported
from .segments import SegmentedPrefill
from .session import Session, View
from .stats import Stats, recorded, tokens_per_layer
from .unmerge import UnmergeCore, prompt_copies, step_copies
from .vision import VisionStages


class Runtime:
    """Installed on one model by slimvlm.apply; `remove()` restores the model exactly."""

    def __init__(self, model: nn.Module, adapter, methods: list[Method], keep_positions: bool,
                 compile: bool | None = None, cuda_graphs: bool | None = None) -> None:
        self.model = model
        self.cuda_graphs = cuda_graphs
        self.adapter = adapter
        self.methods = methods
        self.keep_positions = adapter.positions_kept(keep_positions)
        self._stats = Stats()
        self._read_stats = None  # the last forward's statistics, read from the device when asked for
        self.labels: torch.Tensor | None = None  # the last prefill's labels, remapped to its sequence
        self.session: Session | None = None
        self._by_stage = {stage: [m for m in methods if stage in m.stages] for stage in Stage}
        self._prefill_methods = self._by_stage[Stage.PREFILL]
        self._llm_hooks = HookSet()  # stage 3-4 hooks on the LLM layers
        self._static = StaticDecoder(model, adapter, compile)
        self.vision = VisionStages(adapter, self._by_stage[Stage.ENCODE], self._by_stage[Stage.PROJECT])
        self._segments = SegmentedPrefill(adapter)
        for method in methods:
            adapter.check_method(method)
            method.check_identity(model)
        self._decode_methods = self._by_stage[Stage.DECODE]
        # stages 3-4 act inside the LLM through layer hooks; their layers end prefill holding different entries
        self._in_llm = bool(self._prefill_methods or self._decode_methods)
        self._unmerge = any(m.virtual_unmerge for m in methods)
        self._undo: list = []
        window = getattr(adapter.text_config, "sliding_window", None)
        self._windowed = window is not None
        if window is not None and (self._unmerge or self._prefill_methods or self._decode_methods):
            names = sorted({m.name for m in self._prefill_methods + self._decode_methods} | ({"vtu"} if self._unmerge else set()))
            raise SlimVLMError(
                f"{', '.join(names)} attend(s) with masks slimvlm builds, which do not apply this LM's sliding window "
                f"(sliding_window={window}); use stage-1/2 methods on it (tome, dymu:vtu=false, visionzip, divprune, ...)"
            )
        if self._unmerge:
            if self._decode_methods:
                raise SlimVLMError("virtual unmerging cannot be combined with a stage-4 method that edits the KV cache")
            self.keep_positions = True  # the copies sit at the patches' own positions
            core = UnmergeCore(lambda: self.session)
            for layer in range(len(adapter.llm_layers)):
                self._undo.append(adapter.override_attention(layer, core))
        elif self._in_llm:
            adapter.mask_dtype(torch.float32)  # refuses attention implementations it cannot mask
            self._install_layer_hooks()
        self._cache_name = cache_kwarg(model.forward)
        self.outputs = Outputs(model, adapter, self._cache_name)
        self._install_forward()
        undo = adapter.patch_generate()  # a family whose inputs generate() cannot repeat per sequence as it is
        if undo is not None:
            self._undo.append(undo)

    @property
    def stats(self) -> Stats:
        """What the last forward did: read from the device on first access, not during the forward
        (device_reads.py)."""
        if self._read_stats is not None:
            self._stats, self._read_stats = self._read_stats(), None
        return self._stats

    # ---- installation ------------------------------------------------------------------------
    def _install_forward(self) -> None:
        original = self.model.forward
        signature = inspect.signature(original)
        # without 'mm_encoder_outputs' in the signature, generate() hands us pixel_values
        params = [p for name, p in signature.parameters.items() if name != "mm_encoder_outputs"]
        ours = inspect.Signature(params, return_annotation=signature.return_annotation)
        named = {name for name, p in signature.parameters.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}

        # torch.compile (generate() compiles the model's call for a static cache) must not trace the
        # bookkeeping: it runs eagerly, and the decode step it calls is compiled on its own (decode_step.py)
        @torch.compiler.disable
        def forward(*args, **kwargs):
            if args:
                arguments = ours.bind(*args, **kwargs).arguments
                extra = arguments.pop("kwargs", {})
            else:  # generate() passes keywords only: no binding needed
                arguments = {k: v for k, v in kwargs.items() if k in named}
                extra = {k: v for k, v in kwargs.items() if k not in named}
            return self._forward(original, arguments, dict(extra))

        functools.update_wrapper(forward, original)
        forward.__signature__ = ours
        del forward.__wrapped__
        self.model.forward = forward

    def _install_layer_hooks(self) -> None:
        first = min((layer for m in self._prefill_methods for layer in m.drop_layers), default=0)
        if self._decode_methods:
            first = 0
        for index in range(first, len(self.adapter.llm_layers)):
            layer = self.adapter.llm_layers[index]
            hook = functools.partial(self._layer_pre_hook, index)
            self._llm_hooks.add(layer.register_forward_pre_hook(hook, with_kwargs=True))
        for method in self._prefill_methods:
            if method.queries is not None:
                for layer in method.drop_layers:
                    self._install_row_probe(method, layer)

    def remove(self) -> None:
        self._llm_hooks.remove()
        for undo in self._undo:
            undo()
        self._undo.clear()
        if "forward" in self.model.__dict__:
            del self.model.forward
        self.session = None

    # ---- forward -----------------------------------------------------------------------------
    def _forward(self, original, arguments: dict, kwargs: dict):
        for name in ("use_cache", "return_dict"):
            if name in kwargs:
                arguments[name] = kwargs.pop(name)
        if self._cache_name != "past_key_values" and "past_key_values" in kwargs:  # the deprecated alias
            arguments[self._cache_name] = kwargs.pop("past_key_values")
        self.adapter.check_inputs(arguments)
        masks = arguments.get("attention_mask")
        if isinstance(masks, dict):  # generate()'s 4D masks per layer type on a static cache (LMs with layer_types)
            arguments["attention_mask"] = masks.get("full_attention", next(iter(masks.values())))
        visuals = self.adapter.visual_inputs(arguments)
        cache = arguments.get(self._cache_name)
        if kwargs.get("mm_encoder_outputs") is not None:
            raise SlimVLMError("pass pixel_values, not mm_encoder_outputs, to a model slimvlm is applied to")
        if visuals is not None:
            return self._prefill(arguments, kwargs, visuals)
        session = self.session
        if session is not None and cache is not None and (cache is session.cache or cache is session.given_cache):
            return self._decode(arguments, kwargs)
        self.session = None
        return original(**arguments, **kwargs)


    def _prefill(self, arguments: dict, kwargs: dict, visuals: tuple):
        refuse_unsupported(self.adapter, arguments, self._cache_name)
        arguments["pixel_values"] = self.adapter.views(  # the encoder's views (LLaVA-NeXT: each image's crops)
            *visuals, kwargs.pop("interpolate_pos_encoding", False))
        adapter = self.adapter
        input_ids = arguments["input_ids"]
        mask = arguments.get("attention_mask")
        if mask is not None and mask.dim() == 4:  # generate()'s mask for a static cache, in the untouched frame
            arguments["attention_mask"] = padding_of_causal_mask(mask, input_ids.shape[1])
        use_cache = arguments.get("use_cache")
        if use_cache is None:
            use_cache = adapter.text_config.use_cache
        given = arguments.get(self._cache_name)
        on_static = bool(use_cache) and is_static(given)
        if on_static:
            self._check_static()
        # stages 3-4 on a static cache: the prefill's entries are handed over to slimvlm's static cache (static_cache.py)
        hand_off = on_static and self._in_llm
        graphs = cuda_graphs.graphs_wanted(self.cuda_graphs, input_ids.device)  # looked up at each call: device_reads swaps it
        # at batch 1 with CUDA graphs, where a prefill is paid in launches, the runtime runs the LM in segments
        # between drops replayed from graphs (segments.py): on the dynamic cache, and on the static one for
        # stages 3-4 (stage 1-2 methods replay the whole LM there). Not where the caller asks the LM's own outputs,
        # nor on an LM that attends within a sliding window (the segments' masks are causal over the whole prompt)
        # or whose attention takes no mask of slimvlm's (flash attention); nor without graphs, where the segments'
        # attention over the prompt's width (masked) would cost what the drops save
        segmented = (graphs and input_ids.shape[0] == 1 and not kwargs and not self._unmerge and not self._windowed
                     and adapter.takes_masks() and (hand_off or not on_static))
        if segmented:
            self._llm_hooks.remove()  # the segments run the drops themselves; decode steps get them back
        elif self._in_llm and not self._unmerge and not self._llm_hooks:  # taken off by a static-cache generate()
            self._install_layer_hooks()
        images_per_sample, right_padded, placeholders = prompt_shape(adapter, input_ids, arguments.get("attention_mask"))
        visual = self.vision.run(arguments["pixel_values"], input_ids, arguments.get("attention_mask"),
                                 arguments.get("labels"), tuple(images_per_sample), graphs)
        tokens = visual.tokens
        rebuilt = rebuild(
            input_ids,
            visual.text_embeds,
            arguments.get("attention_mask"),
            adapter.prompt_positions(input_ids, arguments.get("attention_mask"), arguments.get("position_ids")),
            arguments.get("labels"),
            tokens,
            adapter.placeholder_ids,
            adapter.image_tokens(),
            self.keep_positions,
            width_step=CAPACITY_STEP if on_static and not hand_off else 1,  # a few widths, a graph or compile each
            right_padded=right_padded,
            placeholders=placeholders,
        )
        session = self._start_session(rebuilt, tokens, given, use_cache, on_static and not hand_off, input_ids.shape[1],
                                      right_padded)
        if segmented:
            target = session.cache  # the dynamic cache decoding continues on (none without use_cache, or if static)
            output, hidden = None, self._prefill_in_segments(rebuilt, session, graphs)
        else:
            output, hidden = self._prefill_llm(rebuilt, session, graphs, kwargs)
        self.labels = session.labels  # stage 3 may have shortened the sequence since rebuild
        prefill_tokens = tokens_per_layer(session)
        session.padded = rebuilt.padded
        if use_cache:
            for method in self._decode_methods:
                self._compress_cache(method)
        if hand_off:
            self._hand_off_to_static(session, given, rebuilt.embeds)
        elif segmented:
            session.cache = self._filled(target, session.cache) if use_cache else None
        if self._in_llm and not self._unmerge:
            self._llm_hooks.remove()  # decode steps call the layers in turn with their masks (_decode_layer_by_layer)
        self._read_stats = recorded(self.session, tokens, visual.trace, visual.projected, prefill_tokens, input_ids.shape[1],
                                    visual.fusion)
        if not use_cache:
            self.session = None
        return self.outputs.from_hidden(hidden, session.cache, arguments, self.labels, output, adapter.visual_outputs(tokens))

    def _start_session(self, rebuilt, tokens, given, use_cache: bool, on_static: bool, prompt_length: int,
                       right_padded: bool) -> Session:
        """The prompt's state for prefill and decoding: its cache (the caller's, slimvlm's own static
        one, or a new dynamic one), its views of the sequence, where positions continue."""
        sequence = rebuilt.sequence
        valid = sequence.valid
        cache, static = (given, None) if use_cache and not is_static(given) else (None, None)
        if on_static:
            layers = len(self.adapter.llm_layers)
            cache, static = self._static.start(given, [valid], (0,) * layers, prompt_length, rebuilt.embeds)
        elif use_cache and cache is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.adapter.text_config)
        self.session = Session(
            cache=cache,
            prompt_length=prompt_length,
            next_position=sequence.next_position(),
            layer_views=[View(sequence=sequence, key_valid=valid)] * len(self.adapter.llm_layers),
            tokens=tokens,
            given_cache=given,
            static=static,
            labels=rebuilt.labels,
            right_padded=right_padded,
        )
        if self._unmerge:
            self.session.copies = prompt_copies(self.adapter, sequence, tokens, rebuilt.embeds)
            self.session.query_copies = self.session.copies
        return self.session

    def _prefill_llm(self, rebuilt, session: Session, graphs: bool, kwargs: dict):
        """(the LM's output or None, its last hidden states) over the rebuilt prompt: on slimvlm's
        static cache through its own mask (replayed from a CUDA graph when asked), else the LM as is."""
        sequence = rebuilt.sequence
        if session.static is not None and not kwargs:
            mask_dtype = self.adapter.mask_dtype(rebuilt.embeds.dtype)
            return None, self._static.prefill(rebuilt.embeds, sequence.positions, session.static, mask_dtype, graphs)
        use_cache = session.cache is not None
        output = self.adapter.run_llm(rebuilt.embeds, sequence.valid.long(), sequence.positions, session.cache,
                                      use_cache, **kwargs)
        return output, output.last_hidden_state

    def _prefill_in_segments(self, rebuilt, session: Session, graphs: bool) -> torch.Tensor:
        """The LM's last hidden states over the rebuilt prompt, its layers run in segments between the prefill
        method's drops (segments.py), each replayed from a CUDA graph when `graphs`; the drops run
        between them as the hooks would run them. session.cache holds the entries until they move on."""
        sequence = rebuilt.sequence
        hidden = rebuilt.embeds
        mask_dtype = self.adapter.mask_dtype(hidden.dtype)
        prompt_embeddings = self.adapter.position_embeddings(hidden, sequence.positions)
        session.cache = self._segments.start(*sequence.valid.shape, hidden)
        method = self._prefill_methods[0] if self._prefill_methods else None  # one method per stage (registry.py)
        drops = tuple(method.drop_layers) if method is not None else ()
        layers = len(self.adapter.llm_layers)
        start = 0
        for end in (*drops, layers):
            view = session.view_of(start)
            index = valid = None
            if end < layers and method.queries is not None:
                index, valid = self._query_rows(view.sequence, method.queries)
                more = (1 << (index.shape[1] - 1).bit_length()) - index.shape[1]  # a power of two: a few graphs for
                # questions of any length
                index, valid = F.pad(index, (0, more)), F.pad(valid, (0, more))
            hidden, rows = self._segments.run(session.cache, start, end, hidden, view.key_valid,
                                              view.position_embeddings or prompt_embeddings, mask_dtype, index,
                                              end == layers, graphs)
            if end < layers:
                if index is not None:
                    session.rows[method.name, end] = (rows, index, valid)
                hidden = self._drop(method, end, hidden, prompt_embeddings)
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
        hold the same entries, and take the layer hooks off: the static decode step gives each layer its
        group's mask itself, and hooks would be traced into the compiled step."""
        groups = session.distinct_views()
        group_index = {id(view): group for group, view in enumerate(groups)}
        session.cache, session.static = self._static.hand_off(
            given, [view.key_valid for view in groups], tuple(group_index[id(view)] for view in session.layer_views),
            self.adapter.cache_layers(session.cache), session.prompt_length, like)
        self._llm_hooks.remove()

    def _check_static(self) -> None:
        """Refuse, before any work, what transformers' static cache cannot hold."""
        if self._unmerge:
            raise SlimVLMError(
                "virtual unmerging (vtu, and dymu by default) attends over every merged token's copies in each step, "
                "which a static cache does not hold; generate without cache_implementation='static', or use dymu:vtu=false"
            )

    def _decode(self, arguments: dict, kwargs: dict):
        session = self.session
        input_ids = arguments.get("input_ids")
        if input_ids is None:
            raise SlimVLMError("decode steps need input_ids when slimvlm is applied")
        steps = input_ids.shape[1]
        if steps > 1 and bool(is_placeholder(input_ids, self.adapter.placeholder_ids).any()):  # one-token steps need no look
            raise SlimVLMError(
                "continuing from a KV cache that slimvlm reduced is not supported: the cache holds the reduced "
                "sequence, the new input the image's placeholders; call generate() again with the whole "
                "conversation and pixel_values, and no cache"
            )
        new_valid = self._new_tokens_valid(arguments.get("attention_mask"), steps)
        session.decoding = True
        session.decoded += steps
        positions = session.next_position[:, None]  # (B, 1), or (B, 1, A) one per rotary axis
        if steps > 1:
            at = torch.arange(steps, device=input_ids.device)
            positions = positions + at.view(steps, *[1] * (positions.dim() - 2))
        session.next_position = session.next_position + steps
        if session.static is not None:
            masks = session.static.advance(steps, new_valid, self.adapter.mask_dtype(self.model.dtype))
            logits = self._static.step(input_ids, masks, session.static.group_of_layer, positions, session.cache)
            return self.outputs.from_logits(logits, None, session.cache, arguments)
        mask_needed = new_valid is not None or session.padded or self._unmerge  # later layers: their views' masks
        every_key = steps == 1 and new_valid is None  # one real query: it sees all of an unpadded view's keys
        if new_valid is None:
            new_valid = torch.ones_like(input_ids, dtype=torch.bool)
        mask_dtype = self.adapter.mask_dtype(self.model.get_input_embeddings().weight.dtype) if self._in_llm else None
        base = session.layer_views[0]
        if self._unmerge:
            session.copies, session.query_copies = step_copies(self.adapter, session.copies, base.key_valid.shape[1],
                                                               positions, new_valid, self.adapter.embed(input_ids))
        for view in session.distinct_views():
            view.key_valid = torch.cat([view.key_valid, new_valid], dim=1)
            if view is not base:  # no mask where it would allow everything (a batch-1 step): SDPA attends to all
                view.decode_mask = None if every_key and not view.padded else attention_mask_4d(
                    view.key_valid, steps, mask_dtype)
        if self._in_llm and not self._unmerge and not kwargs:
            base_mask = attention_mask_4d(base.key_valid, steps, mask_dtype) if mask_needed else None
            logits = self._decode_layer_by_layer(input_ids, positions, base_mask)
            return self.outputs.from_logits(kept_positions(logits, arguments.get("logits_to_keep")), None, session.cache,
                                            arguments)
        if self._in_llm and not self._unmerge and not self._llm_hooks:  # taken off after prefill
            self._install_layer_hooks()
        mask = base.key_valid.long() if mask_needed else None
        output = self.adapter.run_llm(self.adapter.embed(input_ids), mask, positions, session.cache, True, **kwargs)
        return self.outputs.from_hidden(output.last_hidden_state, session.cache, arguments, None, output)

    def _decode_layer_by_layer(self, input_ids: torch.Tensor, positions: torch.Tensor,
                               base_mask: torch.Tensor | None) -> torch.Tensor:
        """Logits of a decode step on the dynamic cache after stages 3-4, the LM's layers called in turn, each with
        its view's mask (decode_step.py, uncompiled): no layer hook runs each step (on a GPU at batch 1 the
        hooks' Python cost 2.6-5 ms a step against 20.5 for the whole step, results/generate/README.md)."""
        session = self.session
        views = session.distinct_views()
        group = {id(view): index for index, view in enumerate(views)}
        masks = tuple(base_mask if view is session.layer_views[0] else view.decode_mask for view in views)
        return decode_step(self.adapter.decode_parts(), self.adapter.cache_kwarg, input_ids, masks,
                           tuple(group[id(view)] for view in session.layer_views), positions, session.cache)

    def _new_tokens_valid(self, mask: torch.Tensor | None, steps: int) -> torch.Tensor | None:
        """Which of a decode step's tokens are real, from the caller's 2D mask in the untouched prompt's
        frame; None when all are (no mask, or the 4D mask generate() builds for a static cache, whose
        frame slimvlm rebuilds from its own bookkeeping). Where a None lets the dynamic cache's layers attend
        without a mask (an unpadded batch), one read asks whether the given columns are all ones, as
        transformers asks before dropping its own mask (generate() of transformers < 5.25 passes it each step)."""
        if mask is None or mask.dim() == 4:
            return None
        session = self.session
        expected = session.prompt_length + session.decoded + steps
        if mask.shape[1] != expected:
            raise SlimVLMError(
                f"attention_mask has {mask.shape[1]} columns, expected {expected} (prompt + generated tokens); "
                "pass the mask generate() maintains, or none"
            )
        new_valid = mask[:, -steps:].bool()
        if session.static is None and not session.padded and not self._unmerge and bool(new_valid.all()):
            return None
        return new_valid

    # ---- stage 3: LLM layers during prefill ---------------------------------------------------
    def _install_row_probe(self, method: Method, drop_layer: int) -> None:
        """Compute, beside SDPA, the attention rows `method` needs from the layer before `drop_layer`."""
        score_layer = drop_layer - 1
        parts = self.adapter.attention_parts(score_layer)
        captured: dict = {}

        def before(_module, _args, kwargs):
            if self.session is None or self.session.decoding:
                return
            captured["position_embeddings"] = kwargs["position_embeddings"]
            captured["capture"] = capture_outputs(parts.q_proj, parts.k_proj)
            captured["outputs"] = captured["capture"].__enter__()

        def after(_module, _args, _kwargs, _output):
            if "capture" not in captured:
                return
            captured.pop("capture").__exit__(None, None, None)
            queries, keys = captured.pop("outputs")
            view = self.session.view_of(score_layer)
            self.session.rows[method.name, drop_layer] = self._rows(parts, view.sequence, queries, keys, captured.pop("position_embeddings"), method.queries)

        self._llm_hooks.add(parts.module.register_forward_pre_hook(before, with_kwargs=True))
        self._llm_hooks.add(parts.module.register_forward_hook(after, with_kwargs=True))

    def _rows(self, parts, sequence: Sequence, queries, keys, position_embeddings, which: str):
        index, valid = self._query_rows(sequence, which)
        return question_rows(self.adapter, parts, queries, keys, position_embeddings, index, sequence.valid), index, valid

    def _query_rows(self, sequence: Sequence, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The query rows `which` of `sequence`: found on the prompt's sequence at the first probe (a read of
        their count), then carried through each drop (text is never dropped), so later probes read nothing."""
        known = self.session.queries.get(which)
        if known is None or known[0] is not sequence:
            known = (sequence, *query_index(sequence, which))
            self.session.queries[which] = known
        return known[1], known[2]

    def _carry_queries(self, old: Sequence, new: Sequence, gather: torch.Tensor) -> None:
        """Move the query rows known on `old` to `new`, the sequence that gathering `old` by `gather` gives."""
        for which, (sequence, index, valid) in self.session.queries.items():
            if sequence is old:
                batch, length = old.valid.shape
                at = torch.zeros(batch, length + 1, dtype=torch.long, device=gather.device)  # padding: a spare column
                slots = torch.arange(gather.shape[1], device=gather.device).expand_as(gather)
                at.scatter_(1, torch.where(new.valid, gather, length), slots)
                self.session.queries[which] = (new, torch.where(valid, at.gather(1, index), 0), valid)

    def _layer_pre_hook(self, layer_index: int, _module, args, kwargs):
        session = self.session
        if session is None:
            return None
        if session.decoding:
            if session.is_base(layer_index):
                return None
            kwargs["attention_mask"] = session.view_of(layer_index).decode_mask
            return args, kwargs
        for method in self._prefill_methods:
            if layer_index in method.drop_layers:
                hidden = self._drop(method, layer_index, args[0] if args else kwargs["hidden_states"],
                                    kwargs["position_embeddings"])
                dropped = session.view_of(layer_index)  # the mask its layers attend with (segments make their own)
                dropped.prefill_mask = attention_mask_4d(dropped.key_valid, dropped.key_valid.shape[1],
                                                         self.adapter.mask_dtype(hidden.dtype))
                if args:
                    args = (hidden, *args[1:])
                else:
                    kwargs["hidden_states"] = hidden
        if session.is_base(layer_index):
            return None
        view = session.view_of(layer_index)
        kwargs["attention_mask"] = view.prefill_mask
        kwargs["position_embeddings"] = view.position_embeddings
        kwargs["position_ids"] = view.sequence.positions
        return args, kwargs

    def _drop(self, method: Method, layer_index: int, hidden: torch.Tensor, position_embeddings) -> torch.Tensor:
        """The method's drop at the input of `layer_index`: the layers from there on see the kept tokens;
        returns their input hidden states. position_embeddings: the prompt's rotary embeddings (before any
        drop)."""
        session = self.session
        current = session.view_of(layer_index)
        rows, index, valid = session.rows.pop((method.name, layer_index), (None, None, None))
        sequence = current.sequence
        keep = method.prefill_keep(PrefillLayer(layer_index, sequence, hidden, rows, index, valid, session.tokens))
        keep = (keep | ~sequence.visual) & sequence.valid
        gather, new_valid, padded = compaction(keep, right=session.right_padded)
        new_sequence = sequence.gather(gather, new_valid)
        self._carry_queries(sequence, new_sequence, gather)
        if session.labels is not None:
            session.labels = torch.where(new_valid, session.labels.gather(1, gather), IGNORE_INDEX)
        embeddings = current.position_embeddings or position_embeddings
        view = View(
            sequence=new_sequence,
            key_valid=new_valid,
            padded=padded,
            position_embeddings=self.adapter.gather_position_embeddings(embeddings, gather),
        )
        session.set_view(range(layer_index, len(self.adapter.llm_layers)), view)
        return gather_rows(hidden, gather)

    # ---- stage 4: the KV cache after prefill --------------------------------------------------
    def _compress_cache(self, method: Method) -> None:
        """Keep, per layer, only the cache entries the method chooses (visual entries only; text
        and positions of later tokens stay as they are). Layers that see one sequence and get the same keep
        mask (the same tensor) share one view; what each group drops and keeps is read in one transfer."""
        session = self.session
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
