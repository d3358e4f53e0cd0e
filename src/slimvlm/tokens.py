"""VisualTokens: the visual tokens of a batch of images, with the bookkeeping every method needs.

Images in one batch may end with different token counts (DyMU gives each its own), so the
tokens live in a padded tensor whose padding slots have size 0. Every reduction, whether it
drops tokens or merges them, is one operation, `regroup`: each token goes to a group (or to
-1, dropped), each group becomes the size-weighted mean of its members. Tokens stay in spatial
order (by the first patch they cover), so the LLM sees them in the order of the image.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

PADDING_ORIGIN = torch.iinfo(torch.long).max
CLS_ORIGIN = -1


@dataclass
class VisualTokens:
    """A padded batch of visual tokens.

    x: (B, N, D) features. size: (B, N) patches each token stands for, 0 for padding.
    origin: (B, N) first patch index a token covers (CLS_ORIGIN for the class token).
    patch_to_token: (B, P) the token each of the P patches now belongs to, -1 if dropped.
    grid: (rows, cols) of the patch grid; None where an image's tokens lie on no one grid (views packed
    into a layout: models/anyres.py, where the P "patches" are the layout's slots and an image with
    fewer slots than P has -1 past its own). has_cls: whether token 0 is the class token.
    uniform: known without reading the device that every size is 1 and nothing is padded (fresh
    patches; a regroup clears it), so attention needs no bias and no host sync to find that out.
    known: per image, its token count where the host knows it without reading the device (fresh
    patches; a regroup whose caller knew the counts, or that read them): see host_counts. Reading
    counts back stalls the host on the GPU and stops a CUDA graph from covering the work.
    view_slots: for images packed from several encoder views (LLaVA-NeXT), (V, P_view): where each
    view's patch went, image * P + slot, -1 where the packing cut it (InternVL: the shuffled token its
    patch joined); None when each image is one view.
    layer_features: (B, N, K, D) what each token adds to the outputs of the LLM's first K layers (Qwen3-VL's
    DeepStack features), None where the family has none; a regroup merges them with the weights it merges x
    with, so that they follow every token a method keeps, drops or merges.
    """

    x: torch.Tensor
    size: torch.Tensor
    origin: torch.Tensor
    patch_to_token: torch.Tensor
    grid: tuple[int, int] | None
    has_cls: bool
    uniform: bool = False
    known: list[int] | None = None
    view_slots: torch.Tensor | None = None
    layer_features: torch.Tensor | None = None

    @classmethod
    def from_patches(cls, x: torch.Tensor, grid: tuple[int, int], has_cls: bool) -> "VisualTokens":
        """Fresh tokens straight from the patch embedding: one token per patch (after CLS, if any)."""
        batch, n, _ = x.shape
        patches = grid[0] * grid[1]
        if n != patches + int(has_cls):
            raise ValueError(f"{n} tokens do not fit a {grid} grid (has_cls={has_cls})")
        device = x.device
        origin = torch.arange(n, device=device) - int(has_cls)
        patch_to_token = torch.arange(patches, device=device) + int(has_cls)
        return cls(
            x=x,
            size=torch.ones(batch, n, device=device, dtype=torch.float32),
            origin=origin.expand(batch, n).clone(),
            patch_to_token=patch_to_token.expand(batch, patches).clone(),
            grid=grid,
            has_cls=has_cls,
            uniform=True,
            known=[n] * batch,
        )

    @classmethod
    def from_images(cls, images: list[torch.Tensor], layer_features: list[torch.Tensor] | None = None,
                    **extra) -> "VisualTokens":
        """Each image's tokens (n_i, D) in the order the LLM takes them, with no patch grid behind them (a
        packed AnyRes layout, Qwen's merger outputs): token i stands for slot i; padded at the end.
        layer_features: each image's (n_i, K, D), where the family has them."""
        counts = [len(image) for image in images]
        device = images[0].device
        slot = torch.arange(max(counts), device=device)
        valid = slot < torch.tensor(counts, device=device)[:, None]
        return cls(
            x=torch.nn.utils.rnn.pad_sequence(images, batch_first=True),
            size=valid.float(),
            origin=torch.where(valid, slot, PADDING_ORIGIN),
            patch_to_token=torch.where(valid, slot, -1),
            grid=None,
            has_cls=False,
            known=counts,
            layer_features=None if layer_features is None else torch.nn.utils.rnn.pad_sequence(layer_features,
                                                                                             batch_first=True),
            **extra,
        )

    @classmethod
    def cat(cls, parts: list["VisualTokens"]) -> "VisualTokens":
        """Several token sets one after another along the batch, each padded to the most tokens and patches
        (e.g. items a method reduced one by one); no grid, no class token."""
        width = max(part.x.shape[1] for part in parts)
        patches = max(part.num_patches for part in parts)

        def padded(name: str, columns: int, value) -> torch.Tensor:
            return torch.cat([torch.nn.functional.pad(getattr(part, name), (0, columns - getattr(part, name).shape[1]),
                                                      value=value) for part in parts])

        x = torch.cat([torch.nn.functional.pad(part.x, (0, 0, 0, width - part.x.shape[1])) for part in parts])
        known = [count for part in parts for count in part.known] if all(p.known is not None for p in parts) else None
        layer_features = None
        if parts[0].layer_features is not None:
            layer_features = torch.cat([torch.nn.functional.pad(part.layer_features, (0, 0, 0, 0, 0, width - part.x.shape[1]))
                                        for part in parts])
        return cls(x=x, size=padded("size", width, 0.0), origin=padded("origin", width, PADDING_ORIGIN),
                   patch_to_token=padded("patch_to_token", patches, -1), grid=None, has_cls=False, known=known,
                   layer_features=layer_features)

    @property
    def batch_size(self) -> int:
        return self.x.shape[0]

    @property
    def num_patches(self) -> int:
        return self.patch_to_token.shape[1]

    @property
    def valid(self) -> torch.Tensor:
        """(B, N) True for real tokens, False for padding."""
        return self.size > 0

    @property
    def counts(self) -> torch.Tensor:
        """(B,) number of real tokens per image (the class token included if present)."""
        return self.valid.sum(dim=1)

    def host_counts(self) -> list[int]:
        """Per image, its number of real tokens, read from the device only when not already known."""
        if self.known is None:
            self.known = self.counts.tolist()
        return self.known

    def min_count(self) -> int:
        """The smallest per-image count (see host_counts)."""
        return min(self.host_counts(), default=0)

    @property
    def is_cls(self) -> torch.Tensor:
        """(B, N) True where the token is the class token."""
        return self.origin == CLS_ORIGIN

    def with_features(self, x: torch.Tensor, layer_features: torch.Tensor | None = None) -> "VisualTokens":
        """Same tokens, new features (e.g. after an encoder layer or the projector); new layer features where
        given (a method that computes its merged features itself computes these the same way)."""
        if x.shape[:2] != self.x.shape[:2]:
            raise ValueError(f"features of shape {tuple(x.shape)} do not match tokens {tuple(self.x.shape[:2])}")
        return replace(self, x=x) if layer_features is None else replace(self, x=x, layer_features=layer_features)

    def attention_bias(self, proportional: bool) -> torch.Tensor | None:
        """Additive (B, 1, 1, N) bias on attention logits: log(size) for ToMe's proportional
        attention, which also masks padding (log 0 = -inf); None for uniform tokens (nothing to add).
        After a regroup the bias is built even where it happens to be all zeros: asking the device
        would cost a host sync per layer."""
        if self.uniform:  # log 1 = 0 everywhere and no padding: the bias would add nothing
            return None
        if not proportional and self.known is not None and min(self.known, default=0) == self.x.shape[1]:
            return None  # no padding to mask (every image as wide as the batch): SDPA keeps its fastest kernel
        bias = self.size.log() if proportional else torch.zeros_like(self.size).masked_fill(~self.valid, float("-inf"))
        return bias.to(self.x.dtype)[:, None, None, :]

    def regroup(self, assign: torch.Tensor, num_groups: int, order: torch.Tensor | None = None,
                counts: list[int] | None = None, at: torch.Tensor | None = None,
                width: int | None = None) -> "VisualTokens":
        """Tokens -> groups: assign (B, N) gives each token a group in [0, num_groups) or -1 to
        drop it. Each group becomes the size-weighted mean of its members, its size their sum and
        its origin their first patch (or `at`, (B, num_groups), where the method places a group on one
        member's patch). Output is in spatial order (or by `order`, a (B, num_groups) sort key, for methods
        whose paper fixes another order), padded at the end. counts: the number of non-empty groups per
        image, where the caller knows it (else it is read back, unless `width` fixes the output's width: at
        least any image's groups, the rest padding)."""
        batch, n, dim = self.x.shape
        if assign.shape != (batch, n):
            raise ValueError(f"assign has shape {tuple(assign.shape)}, expected {(batch, n)}")
        kept = (assign >= 0) & self.valid
        group = torch.where(kept, assign, torch.zeros_like(assign))
        weight = torch.where(kept, self.size, torch.zeros_like(self.size))

        size = weight.new_zeros(batch, num_groups).scatter_add_(1, group, weight)
        origin = torch.full((batch, num_groups), PADDING_ORIGIN, device=self.x.device, dtype=torch.long)
        origin.scatter_reduce_(1, group, torch.where(kept, self.origin, PADDING_ORIGIN), reduce="amin")
        if at is not None:
            origin = at.masked_fill(size == 0, PADDING_ORIGIN)

        def merged(values: torch.Tensor) -> torch.Tensor:
            """(B, N, E) -> (B, num_groups, E): each group's size-weighted mean."""
            summed = values.new_zeros(batch, num_groups, values.shape[2])
            summed.scatter_add_(1, group[..., None].expand(-1, -1, values.shape[2]), values * weight[..., None].to(values.dtype))
            return summed / size.clamp_min(torch.finfo(torch.float32).tiny)[..., None].to(summed.dtype)

        features = merged(self.x)
        layer_features = None if self.layer_features is None else merged(self.layer_features.flatten(2))

        key = origin if order is None else order.masked_fill(size == 0, PADDING_ORIGIN)
        full_order = key.argsort(dim=1, stable=True)
        rank_of_group = torch.empty_like(full_order)
        rank_of_group.scatter_(1, full_order, torch.arange(num_groups, device=origin.device).expand(batch, -1))
        if width is None:
            if counts is None:
                counts = (size > 0).sum(dim=1).tolist()  # one host sync
            width = max(counts, default=0)
        order = full_order[:, :width]

        token_group = torch.where(kept, group, torch.full_like(group, -1))
        patch_group = torch.where(
            self.patch_to_token >= 0,
            token_group.gather(1, self.patch_to_token.clamp_min(0)),
            torch.full_like(self.patch_to_token, -1),
        )
        patch_to_token = torch.where(
            patch_group >= 0, rank_of_group.gather(1, patch_group.clamp_min(0)), torch.full_like(patch_group, -1)
        )
        return VisualTokens(
            x=features.gather(1, order[..., None].expand(-1, -1, dim)),
            size=size.gather(1, order),
            origin=origin.gather(1, order),
            patch_to_token=patch_to_token,
            grid=self.grid,
            has_cls=self.has_cls,
            known=None if counts is None else list(counts),
            view_slots=self.view_slots,
            layer_features=None if layer_features is None else layer_features.gather(
                1, order[..., None].expand(-1, -1, layer_features.shape[2])).unflatten(2, self.layer_features.shape[2:]),
        )

    def keep(self, mask: torch.Tensor, counts: list[int] | None = None, width: int | None = None) -> "VisualTokens":
        """Keep the tokens where mask (B, N) is True, drop the rest (counts: kept per image, if known; width: see
        regroup)."""
        n = self.x.shape[1]
        identity = torch.arange(n, device=mask.device).expand_as(mask)
        return self.regroup(torch.where(mask, identity, torch.full_like(identity, -1)), n, counts=counts, width=width)

    def keep_indices(self, index: torch.Tensor) -> "VisualTokens":
        """Keep the tokens at index (B, K), distinct real tokens of each image; output stays in spatial order."""
        mask = torch.zeros_like(self.valid)
        mask.scatter_(1, index, True)
        return self.keep(mask, counts=[index.shape[1]] * index.shape[0])

    def drop_cls(self) -> "VisualTokens":
        """The patch tokens alone (LLaVA's 'default' feature selection)."""
        if not self.has_cls:
            return self
        if self.uniform:  # fresh patches: the class token is token 0, the rest in order (what keep() gives)
            n = self.x.shape[1]
            return replace(self, x=self.x[:, 1:], size=self.size[:, 1:], origin=self.origin[:, 1:],
                           patch_to_token=self.patch_to_token - 1, has_cls=False, known=[n - 1] * self.batch_size)
        # one token fewer than the widest image: no count to read back (stages 1-2 may run in a CUDA graph)
        dropped = self.keep(~self.is_cls, counts=None if self.known is None else [c - 1 for c in self.known],
                            width=self.x.shape[1] - 1)
        return replace(dropped, has_cls=False)

    def patches_from_views(self, mask: torch.Tensor) -> torch.Tensor:
        """A per-view patch mask (V, P_view) of bools, e.g. a set a stage-1 method chose in each view, moved to
        the images' patches (B, P) (see view_slots): a patch is set where any view patch landing on it is (one
        lands on each of LLaVA-NeXT's slots, four on each of InternVL's shuffled tokens); as it is when each
        image is one view."""
        if self.view_slots is None:
            return mask
        hits = torch.zeros(self.batch_size * self.num_patches, dtype=torch.int32, device=mask.device)
        lands = self.view_slots >= 0
        hits.index_add_(0, self.view_slots[lands], mask[lands].int())
        return (hits > 0).view(self.batch_size, self.num_patches)

    def split(self) -> list[torch.Tensor]:
        """Per image, its real tokens' features (N_i, D), in spatial order."""
        return [self.x[i, :c] for i, c in enumerate(self.host_counts())]
