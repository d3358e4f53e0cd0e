"""Attention rows beside fast attention.

Methods that score tokens by attention need a few rows of the attention matrix (the last query,
the text queries, the CLS query), not the whole matrix, and the model keeps running SDPA. Given a
layer's queries for those rows and its keys (RoPE already applied), this computes exactly the
rows eager attention would have produced, at O(rows x keys) cost.
"""

from __future__ import annotations

from typing import Callable

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
    """Llama-style rotary embedding: x (B, H, L, d), cos/sin (B, L, r). Where r < d (partial rotary: Qwen3.5's full
    attention rotates a part of each head) the first r channels rotate and the rest pass, as the model does."""
    rotary = cos.shape[-1]
    if rotary < x.shape[-1]:
        return torch.cat([apply_rope(x[..., :rotary], cos, sin), x[..., rotary:]], dim=-1)
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def question_rows(adapter, parts, queries: torch.Tensor, keys: torch.Tensor, position_embeddings, index: torch.Tensor,
                  key_valid: torch.Tensor) -> torch.Tensor:
    """(B, H, Q, L) attention probabilities of the queries at index (B, Q) over the valid keys before them (on a
    sliding-window layer, those less than its window before), from a layer's projected queries and keys (B, L, H x d)
    (the query of each head, where the projection also gives a gate: parts.query_heads; through its per-head norms where
    it has them: parts.normed) and its rotary embeddings: computed beside SDPA."""
    batch, length, _ = keys.shape
    queries, keys = parts.normed(parts.query_heads(queries), keys.view(batch, length, parts.num_kv_heads, parts.head_dim))
    queries, keys = queries.transpose(1, 2), keys.transpose(1, 2)
    keys = adapter.rotate(keys, position_embeddings)
    cos, sin = adapter.gather_position_embeddings(position_embeddings, index)
    picked = queries.gather(2, index[:, None, :, None].expand(-1, parts.num_heads, -1, parts.head_dim))
    picked = adapter.rotate(picked, (cos, sin))
    key_at = torch.arange(length, device=keys.device)
    allowed = (key_at[None, None, :] <= index[:, :, None]) & key_valid[:, None, :]
    if parts.window is not None:
        allowed &= index[:, :, None] - key_at[None, None, :] < parts.window
    return attention_rows(picked, keys, parts.scaling, allowed=allowed[:, None])


def received_attention(rows: Callable[[torch.Tensor], torch.Tensor], valid: torch.Tensor) -> torch.Tensor:
    """(B, N) the attention each token receives, averaged over heads and over the valid queries (rows: an
    encoder layer's attention rows for query indices, EncoderAttention.rows): where a tower has no class
    token, the score LightCompress ranks VisionZip's dominant tokens by on LLaVA-OneVision's SigLIP
    (zhangbilang/LightCompress, llmc/compression/token_reduction/holitom.py, SigLipVisionTower_forward with
    WRAPPER=visionzip: `attentions[-1].mean(dim=1).mean(dim=1)`, the feature layer's attention averaged over
    heads, then over queries). Reads nothing back to the host."""
    batch, n = valid.shape
    weight = valid.float() / valid.sum(dim=1, keepdim=True).clamp_min(1)  # padding queries count for nothing
    total = torch.zeros(batch, n, dtype=torch.float32, device=valid.device)
    for start in range(0, n, QUERY_CHUNK):
        index = torch.arange(start, min(start + QUERY_CHUNK, n), device=valid.device).expand(batch, -1)
        per_query = rows(index).mean(dim=1)  # (B, Q, N): mean over heads
        total += (per_query * weight[:, start : start + QUERY_CHUNK, None]).sum(dim=1)
    return total
