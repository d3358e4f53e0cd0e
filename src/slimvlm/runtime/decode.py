"""Decode steps after a reduced prefill: the bookkeeping that continues the reduced sequence (positions, each
view's valid entries and mask, VTU's copies) and the step itself by the plan's path (plan.py)."""

from __future__ import annotations

import torch

from ..errors import SlimVLMError
from ..sequence import attention_mask_4d, is_placeholder
from .decode_step import decode_step
from .outputs import Outputs, kept_positions
from .plan import Decode, Plan
from .session import Session
from .static_cache import StaticDecoder
from .unmerge import STATIC_COPIES, step_copies


class Decoder:
    """Decode steps on one applied model. stages_in_llm: stage-3/4 methods (VTU among them) are installed; a
    step then takes the LM's mask dtype (adapter.mask_dtype, which refuses an attention it cannot mask)."""

    def __init__(self, model, adapter, static: StaticDecoder, outputs: Outputs, stages_in_llm: bool) -> None:
        self.model = model
        self.adapter = adapter
        self.static = static
        self.outputs = outputs
        self.stages_in_llm = stages_in_llm

    def step(self, plan: Plan, session: Session, arguments: dict, kwargs: dict):
        """The model's output for one decode step (one token or several per sample) of `session`."""
        input_ids = arguments.get("input_ids")
        if input_ids is None:
            raise SlimVLMError("decode steps need input_ids when slimvlm is applied")
        input_ids = self._new_tokens(session, input_ids, arguments.get("attention_mask"))
        steps = input_ids.shape[1]
        new_valid = self._new_tokens_valid(plan, session, arguments.get("attention_mask"), steps)
        session.decoded += steps
        session.conversation = torch.cat([session.conversation, input_ids], dim=1)
        positions = session.next_position[:, None]  # (B, 1), or (B, 1, A) one per rotary axis
        if steps > 1:
            at = torch.arange(steps, device=input_ids.device)
            positions = positions + at.view(steps, *[1] * (positions.dim() - 2))
        session.next_position = session.next_position + steps
        if plan.decode is Decode.STATIC:
            masks = session.static.advance(steps, new_valid, self.adapter.mask_dtype(self.model.dtype))
            copies = None if session.static_copies is None else {STATIC_COPIES: session.static_copies}
            logits = self.static.step(input_ids, masks, session.static.group_of_layer, positions, session.cache, copies)
            return self.outputs.from_logits(logits, None, session.cache, arguments)
        unmerging = session.copies is not None  # on the dynamic cache
        mask_needed = new_valid is not None or session.padded or unmerging  # later layers: their views' masks
        every_key = steps == 1 and new_valid is None  # one real query: it sees all of an unpadded view's keys
        if new_valid is None:
            new_valid = torch.ones_like(input_ids, dtype=torch.bool)
        mask_dtype = self.adapter.mask_dtype(self.model.get_input_embeddings().weight.dtype) if self.stages_in_llm else None
        base = session.layer_views[0]
        if unmerging:
            session.copies, session.query_copies = step_copies(self.adapter, session.copies, base.key_valid.shape[1],
                                                               positions, new_valid, self.adapter.embed(input_ids))
        for view in session.distinct_views():
            view.key_valid = torch.cat([view.key_valid, new_valid], dim=1)
            if view is not base:  # no mask where it would allow everything (a batch-1 step): SDPA attends to all
                view.decode_mask = None if every_key and not view.padded else self.adapter.view_decode_mask(
                    view, steps, mask_dtype, session, positions)
        if plan.decode is Decode.LAYER_BY_LAYER:
            base_mask = attention_mask_4d(base.key_valid, steps, mask_dtype) if mask_needed else None
            logits = self._layer_by_layer(session, input_ids, positions, base_mask)
            return self.outputs.from_logits(kept_positions(logits, arguments.get("logits_to_keep")), None,
                                            session.cache, arguments)
        mask = base.key_valid.long() if mask_needed else None
        output = self.adapter.run_llm(self.adapter.embed(input_ids), mask, positions, session.cache, True, **kwargs)
        return self.outputs.from_hidden(output.last_hidden_state, session.cache, arguments, None, output)

    def _layer_by_layer(self, session: Session, input_ids: torch.Tensor, positions: torch.Tensor,
                        base_mask: torch.Tensor | None) -> torch.Tensor:
        """Logits of a decode step on the dynamic cache after stages 3-4, the LM's layers called in turn, each with
        its view's mask (decode_step.py, uncompiled): no layer hook runs each step (on a GPU at batch 1 the
        hooks' Python cost 2.6-5 ms a step against 20.5 for the whole step, results/generate/README.md)."""
        views = session.distinct_views()
        group = {id(view): index for index, view in enumerate(views)}
        masks = tuple(base_mask if view is session.layer_views[0] else view.decode_mask for view in views)
        return decode_step(self.adapter.decode_parts(), self.adapter.cache_kwarg, input_ids, masks,
                           tuple(group[id(view)] for view in session.layer_views), positions, session.cache)

    def _new_tokens(self, session: Session, input_ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The tokens of a step the cache does not hold yet. generate() cuts a follow-up turn's ids where the cache's
        length says, and the reduced cache holds fewer entries than the caller's frame has tokens: the ids then
        begin with some the cache holds already (the 2D mask, in the caller's frame, tells how many are new); those
        must be the conversation's own. A one-token step needs no look."""
        if input_ids.shape[1] == 1:
            return input_ids
        if session.static is not None:
            raise SlimVLMError(
                "a follow-up turn on slimvlm's static cache is not supported (its capacity was set for the first turn); "
                "chat on the dynamic cache (generate() without cache_implementation='static'), or start again"
            )
        held = session.conversation.shape[1]
        new = input_ids.shape[1] if mask is None or mask.dim() != 2 else mask.shape[1] - held
        if not 0 < new <= input_ids.shape[1]:
            raise SlimVLMError(
                f"attention_mask has {mask.shape[1]} columns for a conversation of {held} tokens and {input_ids.shape[1]} "
                "given: pass the whole conversation's mask (generate() keeps it), or none"
            )
        overlap = input_ids[:, : input_ids.shape[1] - new]
        new_ids = input_ids[:, input_ids.shape[1] - new :]
        checks = [(overlap != session.conversation[:, held - overlap.shape[1] :]).any(),
                  is_placeholder(new_ids, self.adapter.placeholder_ids).any()]
        differs, placeholders = torch.stack(checks).tolist()  # one read
        if differs:
            raise SlimVLMError("the ids given do not continue the conversation this cache holds; pass the same "
                               "conversation (its earlier turns as generated) with the cache, or start again without it")
        if placeholders:
            raise SlimVLMError(
                "a follow-up turn brings an image: the cache holds the earlier turns' reduced sequence and slimvlm "
                "does not add images to it; generate() again with the whole conversation, its images and no cache"
            )
        return new_ids

    @staticmethod
    def _new_tokens_valid(plan: Plan, session: Session, mask: torch.Tensor | None, steps: int) -> torch.Tensor | None:
        """Which of a decode step's tokens are real, from the caller's 2D mask in the untouched prompt's
        frame; None when all are (no mask, or the 4D mask generate() builds for a static cache, whose
        frame slimvlm rebuilds from its own bookkeeping). Where a None lets the dynamic cache's layers attend
        without a mask (an unpadded batch), one read asks whether the given columns are all ones, as
        transformers asks before dropping its own mask (generate() of transformers < 5.25 passes it each step)."""
        if mask is None or mask.dim() == 4:
            return None
        expected = session.prompt_length + session.decoded + steps
        if mask.shape[1] != expected:
            raise SlimVLMError(
                f"attention_mask has {mask.shape[1]} columns, expected {expected} (prompt + generated tokens); "
                "pass the mask generate() maintains, or none"
            )
        new_valid = mask[:, -steps:].bool()
        if (plan.decode is not Decode.STATIC and not session.padded and session.copies is None
                and bool(new_valid.all())):
            return None
        return new_valid
