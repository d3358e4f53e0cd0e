"""Attention rows beside fast attention.

Methods that score tokens by attention need a few rows of the attention matrix (the last query,
the text queries, the CLS query), not the whole matrix, and the model keeps running SDPA. Given a
layer's queries for those rows and its keys (RoPE already applied), this computes exactly the
rows eager attention would have produced, at O(rows x keys) cost.
"""

from __future__ import annotations

import torch

QUERY_CHUNK = 128  # queries scored at once: all of a batch of 729-token crops at once is gigabytes of (B, H, Q, N)


def attention_rows(
    queries: torch.Tensor,
    keys: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention probabilities for selected query rows.

    queries: (B, H, Q, d); keys: (B, H_kv, K, d) with H a multiple of H_kv (grouped-query attention
    shares each key head among H / H_kv query heads). bias: additive logits broadcastable to
    (B, H, Q, K). allowed: bool mask broadcastable to (B, H, Q, K), False = masked.
    Returns (B, H, Q, K) in float32.
    """
    heads, kv_heads = queries.shape[1], keys.shape[1]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads cannot share {kv_heads} key heads")
    if heads != kv_heads:
        keys = keys.repeat_interleave(heads // kv_heads, dim=1)
    logits = torch.matmul(queries.float() * scaling, keys.float().transpose(-1, -2))  # scaled on the queries: Q x d, not Q x K
    if bias is not None:
        logits = logits + bias.float()
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    return logits.softmax(dim=-1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama-style rotary embedding: x (B, H, L, d), cos/sin (B, L, d)."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]
