"""What the wrapped forward returns: the untouched model's output class, built from the runtime's hidden states
or logits."""

from __future__ import annotations

import torch


def kept_positions(x: torch.Tensor, keep) -> torch.Tensor:
    """x (B, L, ...) at the positions `logits_to_keep` asks for: the last `keep` (all for 0 or None), or an index."""
    keep = keep or 0
    if isinstance(keep, int):
        return x[:, -keep:] if keep > 0 else x
    return x[:, keep]


class Outputs:
    """The output of one applied model's forward. cache_name: the keyword its forward takes the cache by."""

    def __init__(self, model, adapter, cache_name: str) -> None:
        self.model = model
        self.adapter = adapter
        self.cache_name = cache_name

    def from_hidden(self, hidden: torch.Tensor, cache, arguments: dict, labels, output=None,
                    image: dict | None = None):
        """The output over the LM's last hidden states: logits at the positions asked for, the loss where
        labels are given, the LM's output's hidden states and attentions, the visual outputs `image`."""
        logits = self.adapter.lm_head(kept_positions(hidden, arguments.get("logits_to_keep")))
        loss = None
        if labels is not None:
            loss = self.model.loss_function(logits=logits, labels=labels, vocab_size=self.adapter.text_config.vocab_size)
        extra = dict(image or {})
        if output is not None:
            extra.update(hidden_states=output.hidden_states, attentions=output.attentions)
        return self.from_logits(logits, loss, cache, arguments, **extra)

    def from_logits(self, logits: torch.Tensor, loss, cache, arguments: dict, **extra):
        """What the untouched model returns: its output class (a tuple when return_dict=False), with the
        LM's hidden states and attentions (of the reduced sequence) and the visual tokens the LLM got."""
        result = self.adapter.output_class(loss=loss, logits=logits, **{self.cache_name: cache}, **extra)
        return result if arguments.get("return_dict", True) is not False else result.to_tuple()
