"""Stages 1-2: the visual tokens the LLM gets (the vision tower with the stage-1 method, the projector, the
stage-2 methods) and the text embeddings stage-2 fusion gives, replayed as one CUDA graph where it can."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..graphs import GraphCache
from ..method import Method, PromptContext
from ..tokens import VisualTokens


@dataclass
class Visual:
    """What stages 1-2 give the prefill: the visual tokens, the vision trace (per vision layer run, tokens per
    encoder view), per encoder view the tokens through the projector, the text embeddings after fusion, and per
    fusion layer the tokens it ran over per sample."""

    tokens: VisualTokens
    trace: list
    projected: list[int] | torch.Tensor
    text_embeds: torch.Tensor
    fusion: list[list[int]]


def images_of_samples(images_per_sample: tuple[int, ...]) -> list[list[int]]:
    """Per sample, the indices of its images in the batch's."""
    starts = [sum(images_per_sample[:sample]) for sample in range(len(images_per_sample))]
    return [list(range(start, start + count)) for start, count in zip(starts, images_per_sample)]


class VisionStages:
    """Stages 1-2 of one applied model; `graphs` replays `encode` (a graph per pixel shape and images per sample)."""

    def __init__(self, adapter, encode_methods: list[Method], project_methods: list[Method]) -> None:
        self.adapter = adapter
        self.encode_methods = encode_methods
        self.project_methods = project_methods
        self.graphs = GraphCache(self.encode)  # stages 1-2 in one graph, when every method is capturable

    def run(self, pixel_values, input_ids: torch.Tensor, attention_mask, labels, images_per_sample: tuple[int, ...],
            graphs: bool) -> Visual:
        """Stages 1-2 and the stage-2 fusion over the prompts, stages 1-2 replayed as one CUDA graph when graphs are
        on and every method is capturable: a graph per pixel shape and images per sample, whatever the prompt's
        length (the prompt's tensors stay out of it)."""
        stages_1_2 = self.encode_methods + self.project_methods
        context = PromptContext(input_ids=input_ids, attention_mask=attention_mask, text_embeds=self.adapter.embed(input_ids),
                                image_of_sample=images_of_samples(images_per_sample))
        # a method whose counts follow the image keeps its width in a graph (padding what it merges): worth it at
        # batch 1, where the encoder is paid in launches; at larger batches it runs eagerly on fewer tokens
        keeping_width_pays = input_ids.shape[0] == 1 or not any(method.varying_lengths for method in stages_1_2)
        if (graphs and self.adapter.vision_capturable and all(method.capturable for method in stages_1_2)
                and keeping_width_pays):
            tokens, trace, projected, states = self.graphs(pixel_values, key=(images_per_sample, True))
            for method, state in zip(stages_1_2, states):  # a replay runs no Python: what the methods set, again
                vars(method).update(state)
            tokens = replace(tokens)  # every replay returns the captured object: counts read later must be this one's
        else:
            tokens, trace, projected, _ = self.encode(pixel_values, images_per_sample, False, context, graphs)
        context.labels = labels
        text_embeds = context.text_embeds
        for method in self.project_methods:
            text_embeds, tokens = method.fuse(text_embeds, tokens, context)
        fusion = [layer for method in self.project_methods for layer in method.fusion_tokens()]
        return Visual(tokens, trace, projected, text_embeds, fusion)

    def encode(self, pixel_values, images_per_sample: tuple[int, ...], keep_width: bool,
               context: PromptContext | None = None, graphs: bool = False):
        """Stages 1-2 up to the visual tokens the LLM gets: the vision tower with the stage-1 method, the
        projector, the stage-2 methods' project(). Returns (tokens, vision trace, tokens per image through the
        projector, per method of stages 1-2 the attributes it set (Method.encoder_state)). keep_width: for a
        CUDA graph, methods keep the token tensor's width where their counts follow the image. context: the
        prompts; None inside a graph, where stage-2 methods get their images' places alone (a capturable
        method reads no prompt tensor: a replay would read the captured ones)."""
        adapter = self.adapter
        stage1 = self.encode_methods
        tokens, trace = adapter.encode(pixel_values, stage1[0] if stage1 else None, graphs, keep_width)
        tokens = adapter.project(tokens, keep_cls=any(m.feeds_cls for m in stage1))
        projected = adapter.projector_counts(tokens)
        tokens = adapter.pack(tokens)
        context = context or PromptContext(input_ids=None, image_of_sample=images_of_samples(images_per_sample))
        for method in self.project_methods:
            tokens = method.project(tokens, context)
        states = [{name: getattr(method, name) for name in method.encoder_state}
                  for method in stage1 + self.project_methods]
        return tokens, trace, projected, states
