"""The Runtime: installed on one model by slimvlm.apply, it wraps the model's forward and routes each call. A
prompt with images is a prefill, a call on the cache a prefill left is its decode step, anything else runs
the untouched forward; a plan decided at the call's start (plan.py) says which path it takes."""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn

from .. import graphs
from ..errors import SlimVLMError
from ..hooks import Installed
from ..method import Method, Stage
from ..models.compat import cache_kwarg
from ..sequence import padding_of_causal_mask, rebuild
from .conversations import Conversations
from .decode import Decoder
from .outputs import Outputs
from .plan import Cache, Plan, plan_prefill
from .prefill import LlmPrefill
from .prefill_layers import LayerEdits
from .prompt import prompt_shape, refuse_unsupported
from .session import Session
from .static_cache import CAPACITY_STEP, StaticDecoder, is_static, refuse_static_cache
from .stats import Stats, recorded
from .unmerge import UnmergeCore
from .vision import VisionStages


_ABSENT = object()  # no instance-level forward before apply: the class's ran


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
        self.session: Session | None = None  # the prompt being served now (the layer hooks read it)
        self.conversations = Conversations()  # every cache a prefill filled, and its session
        for method in methods:
            adapter.check_method(method)
            method.check_identity(model)
        by_stage = {stage: [m for m in methods if stage in m.stages] for stage in Stage}
        in_llm = by_stage[Stage.PREFILL] + by_stage[Stage.DECODE]
        # virtual unmerging: every LLM layer's attention runs over the merged tokens' copies (unmerge.py)
        self._unmerge = any(m.virtual_unmerge for m in methods)
        # the others drop tokens (stage 3) or cut the cache (stage 4): LLM layers end prefill holding different
        # entries (prefill_layers.py)
        self._edits_layers = bool(in_llm) and not self._unmerge
        drop_methods = [m for m in by_stage[Stage.PREFILL] if not m.virtual_unmerge]
        window = getattr(adapter.text_config, "sliding_window", None)
        # layers of more than one kind (sliding-window or linear attention beside full): plan.py's mixed_layers
        self._mixed_layers = window is not None or adapter.masks_layer_kinds
        if window is not None and (self._unmerge or in_llm) and not adapter.masks_layer_kinds:
            names = sorted({m.name for m in in_llm} | ({"vtu"} if self._unmerge else set()))
            raise SlimVLMError(
                f"{', '.join(names)} attend(s) with masks slimvlm builds, which do not apply this LM's sliding window "
                f"(sliding_window={window}); use stage-1/2 methods on it (tome, dymu:vtu=false, visionzip, divprune, ...)"
            )
        self._undo: list = []
        if self._unmerge:
            if by_stage[Stage.DECODE]:
                raise SlimVLMError("virtual unmerging cannot be combined with a stage-4 method that edits the KV cache")
            self.keep_positions = True  # the copies sit at the patches' own positions
            core = UnmergeCore(lambda: self.session)
            for layer in range(len(adapter.llm_layers)):
                self._undo.append(adapter.override_attention(layer, core))
        elif self._edits_layers:
            adapter.mask_dtype(torch.float32)  # refuses attention implementations it cannot mask
        static = StaticDecoder(model, adapter, compile)
        self._cache_name = cache_kwarg(type(model).forward)
        self.outputs = Outputs(model, adapter, self._cache_name)
        self.vision = VisionStages(adapter, by_stage[Stage.ENCODE], by_stage[Stage.PROJECT])
        self.layer_edits = LayerEdits(adapter, drop_methods, by_stage[Stage.DECODE], lambda: self.session)
        self.llm_prefill = LlmPrefill(adapter, static, self.layer_edits, self._unmerge)
        self.decoder = Decoder(model, adapter, static, self.outputs, stages_in_llm=bool(in_llm))
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
        """Wrap the forward the model has now, whoever set it. Under an accelerate hook (add_hook_to_module, as
        device_map="auto" installs them) the module's forward runs the hook's pre- and post-forward around
        `_old_forward`: slimvlm wraps that one, so the hook runs on every path (inputs to the execution device,
        outputs back)."""
        hooked = getattr(self.model, "_hf_hook", None) is not None and "_old_forward" in self.model.__dict__
        self._slot = "_old_forward" if hooked else "forward"
        self._previous = self.model.__dict__.get(self._slot, _ABSENT)  # a user's wrapper, torch.compile's, a hook's
        original = getattr(self.model, self._slot)
        # the model's own parameters, whatever a wrapper in between declares (*args, **kwargs, say)
        signature = inspect.signature(type(self.model).forward.__get__(self.model))
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
        setattr(self.model, self._slot, Installed(forward))
        # generate() reads the signature of the forward it calls: under a hook that is the hook's wrapper, which
        # shows the model's own (with mm_encoder_outputs); it must show ours, or generate() computes the image
        # features itself and hands them over in place of the pixels
        self._outer = self.model.forward if hooked else None
        if self._outer is not None:
            self._outer_signature = self._outer.__dict__.get("__signature__", _ABSENT)
            self._outer.__signature__ = ours

    def remove(self) -> None:
        """Undo every change, and put back exactly the forward that was there before apply()."""
        for undo in self._undo:
            undo()
        self._undo.clear()
        if self._previous is _ABSENT:
            self.model.__dict__.pop(self._slot, None)
        else:
            setattr(self.model, self._slot, self._previous)
        if self._outer is not None:
            if self._outer_signature is _ABSENT:
                del self._outer.__signature__
            else:
                self._outer.__signature__ = self._outer_signature
        self.session = None

    # ---- each call -----------------------------------------------------------------------------
    def _forward(self, original, arguments: dict, kwargs: dict):
        """Route one call: kwargs are the arguments outside the model's signature (for the LM's own forward)."""
        for name in ("use_cache", "return_dict"):
            if name in kwargs:
                arguments[name] = kwargs.pop(name)
        if self._cache_name != "past_key_values" and "past_key_values" in kwargs:  # the deprecated alias
            arguments[self._cache_name] = kwargs.pop("past_key_values")
        self.adapter.check_inputs({**kwargs, **arguments})  # kwargs too: a release may take an input by **kwargs
        masks = arguments.get("attention_mask")
        if isinstance(masks, dict):  # generate()'s 4D masks per layer type on a static cache (LMs with layer_types)
            arguments["attention_mask"] = masks.get("full_attention", next(iter(masks.values())))
        visuals = self.adapter.visual_inputs(arguments)
        cache = arguments.get(self._cache_name)
        if arguments.get("mm_encoder_outputs") is not None or kwargs.get("mm_encoder_outputs") is not None:
            raise SlimVLMError("pass pixel_values, not mm_encoder_outputs, to a model slimvlm is applied to")
        session = self.conversations.of(cache)
        if session is not None:  # a decode step, or a follow-up turn, of a conversation a prefill here started
            self.session = session
            plan = session.plan.step(lm_outputs_asked=bool(kwargs))
            run = functools.partial(self.decoder.step, plan, session, arguments, kwargs)
        elif visuals is not None:
            plan = self._read_prompt(arguments, kwargs, visuals)
            run = functools.partial(self._prefill, plan, arguments, kwargs)
        else:
            self.session = None
            output = original(**arguments, **kwargs)
            self.conversations.untouched(getattr(output, self._cache_name, None))
            return output
        with self.layer_edits.hooks(plan):  # the layer hooks are on for this call alone, where its plan has them
            return run()

    def _read_prompt(self, arguments: dict, kwargs: dict, visuals: tuple) -> Plan:
        """Check a prompt with images, give the encoder its views, and plan its prefill."""
        refuse_unsupported(self.adapter, arguments, self._cache_name)
        static_given = is_static(arguments.get(self._cache_name))
        if static_given:  # before reading generate()'s masks for that cache
            refuse_static_cache(self.adapter, arguments[self._cache_name])
        arguments["pixel_values"] = self.adapter.views(  # the encoder's views (LLaVA-NeXT: each image's crops)
            *visuals, kwargs.pop("interpolate_pos_encoding", False))
        input_ids = arguments["input_ids"]
        mask = arguments.get("attention_mask")
        if mask is not None and mask.dim() == 4:  # generate()'s mask for a static cache, in the untouched frame
            arguments["attention_mask"] = padding_of_causal_mask(mask, input_ids.shape[1],
                                                                 self.adapter.two_way_pairs(arguments))
        use_cache = arguments.get("use_cache")
        if use_cache is None:
            use_cache = self.adapter.text_config.use_cache
        return plan_prefill(
            edits_layers=self._edits_layers, unmerge=self._unmerge, mixed_layers=self._mixed_layers,
            takes_masks=self.adapter.takes_masks(),
            graphs=graphs.graphs_wanted(self.cuda_graphs, input_ids.device),  # looked up here: device_reads swaps it
            batch=input_ids.shape[0], lm_outputs_asked=bool(kwargs), use_cache=bool(use_cache),
            static_given=static_given, layer_features=self.adapter.adds_layer_features)

    def _prefill(self, plan: Plan, arguments: dict, kwargs: dict):
        """Stages 1-2, the rebuilt prompt, the LLM over it by the plan's path (stages 3-4), the statistics."""
        adapter = self.adapter
        input_ids, mask, labels = arguments["input_ids"], arguments.get("attention_mask"), arguments.get("labels")
        images_per_sample, right_padded, placeholders = prompt_shape(adapter, input_ids, mask)
        visual = self.vision.run(arguments["pixel_values"], input_ids, mask, labels, tuple(images_per_sample),
                                 plan.graphs)
        rebuilt = rebuild(
            input_ids,
            visual.text_embeds,
            mask,
            adapter.prompt_positions(input_ids, mask, arguments.get("position_ids")),
            labels,
            visual.tokens,
            adapter.placeholder_ids,
            adapter.image_tokens(),
            self.keep_positions,
            width_step=CAPACITY_STEP if plan.cache is Cache.STATIC else 1,  # a few widths, a graph or compile each
            right_padded=right_padded,
            placeholders=placeholders,
            at_origin=adapter.tokens_at_origin,
        )
        given = arguments.get(self._cache_name)
        session = self.session = self.llm_prefill.start_session(plan, rebuilt, visual.tokens, given,
                                                                input_ids, right_padded, arguments)
        output, hidden, layer_tokens = self.llm_prefill.run(plan, rebuilt, session, given, kwargs)
        if plan.cache is not Cache.NONE:
            self.conversations.started(session)
        self.labels = session.labels  # stage 3 may have shortened the sequence since rebuild
        self._read_stats = recorded(session, visual.tokens, visual.trace, visual.projected, layer_tokens,
                                    input_ids.shape[1], visual.fusion,
                                    adapter.two_way_visual_runs(session.mask_inputs))
        if plan.cache is Cache.NONE:
            self.session = None
        return self.outputs.from_hidden(hidden, session.cache, arguments, self.labels, output,
                                        adapter.visual_outputs(visual.tokens))
