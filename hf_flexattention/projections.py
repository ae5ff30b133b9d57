"""Projecting selected high-res tokens into one layer's keys and values, once per token per sequence.

During decoding every step re-selects high-res tokens, mostly the same ones as the step before. Projecting a
token costs two `hidden x kv_dim` matmuls per FlexAttention layer, far more than the rest of a decode step, so at
inference the rotated keys and values of every token already projected are kept (per image, per layer, compactly:
only tokens that were ever selected) and only new tokens are projected. With gradients enabled (training) tokens
are projected directly, so that autograd sees every use.

Shipped as remote code with saved checkpoints: torch and relative imports only.
"""

from dataclasses import dataclass

import torch

from .high_res import apply_rotary
from .state import FlexState, pack_true_indices


def project_tokens(
    module: torch.nn.Module, state: FlexState, images: torch.Tensor, tokens: torch.Tensor, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated keys and values of high-res `tokens` `(b, u)` of `images` `(b,)`, each `(b, u, kv_heads, head_dim)`."""
    index = images[:, None]
    features = state.features[index, tokens].to(module.hr_k_proj.weight.dtype)
    batch, width = tokens.shape
    keys = module.hr_k_proj(features).view(batch, width, -1, head_dim)
    values = module.hr_v_proj(features).view(batch, width, -1, head_dim)
    cos = state.rope_cos[index, tokens][:, :, None].to(keys.dtype)
    sin = state.rope_sin[index, tokens][:, :, None].to(keys.dtype)
    return apply_rotary(keys, cos, sin), values


@dataclass
class ProjectionMemo:
    """Projected high-res keys/values of one layer: `slot[image, token]` indexes `keys[image]` (-1: not yet)."""

    slot: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    count: torch.Tensor

    @classmethod
    def empty(cls, state: FlexState, like: torch.Tensor) -> "ProjectionMemo":
        n_images, n_tokens = state.features.shape[:2]
        device = state.features.device
        store = like.new_empty(n_images, 0, *like.shape[2:])
        return cls(
            slot=torch.full((n_images, n_tokens), -1, dtype=torch.long, device=device),
            keys=store,
            values=store.clone(),
            count=torch.zeros(n_images, dtype=torch.long, device=device),
        )

    def _grow(self, capacity: int) -> None:
        if capacity <= self.keys.shape[1]:
            return
        # Amortised doubling, but never more slots than the image has high-res tokens.
        capacity = min(max(capacity, 2 * self.keys.shape[1]), self.slot.shape[1])
        grown = self.keys.new_empty(self.keys.shape[0], capacity, *self.keys.shape[2:])
        grown_values = self.values.new_empty(grown.shape)
        grown[:, : self.keys.shape[1]] = self.keys
        grown_values[:, : self.values.shape[1]] = self.values
        self.keys, self.values = grown, grown_values

    def add(
        self, images: torch.Tensor, tokens: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor
    ) -> None:
        """Store projections of `tokens` `(b, w)` of `images` `(b,)` where `valid`."""
        per_image = valid.sum(dim=1)
        slots = self.count[images][:, None] + torch.arange(tokens.shape[1], device=tokens.device)
        self._grow(int((self.count[images] + per_image).max()))
        image_index = images[:, None].expand_as(tokens)[valid]
        self.keys[image_index, slots[valid]] = keys[valid].to(self.keys.dtype)
        self.values[image_index, slots[valid]] = values[valid].to(self.values.dtype)
        self.slot[image_index, tokens[valid]] = slots[valid]
        self.count[images] += per_image


def memoised_projections(
    memos: dict[int, ProjectionMemo],
    layer_idx: int,
    module: torch.nn.Module,
    state: FlexState,
    images: torch.Tensor,
    tokens: torch.Tensor,
    valid: torch.Tensor,
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like `project_tokens`, but projecting only tokens that this layer has not projected for the image before."""
    n_images, n_tokens = state.features.shape[:2]
    needed = torch.zeros(n_images, n_tokens, dtype=torch.bool, device=tokens.device)
    needed[images[:, None].expand_as(tokens)[valid], tokens[valid]] = True
    memo = memos.get(layer_idx)
    new = needed if memo is None else needed & (memo.slot < 0)
    new_images = new.any(dim=1).nonzero().squeeze(1)
    if new_images.numel() > 0:
        new_tokens, new_valid = pack_true_indices(new[new_images])
        keys, values = project_tokens(module, state, new_images, new_tokens, head_dim)
        if memo is None:
            memo = memos[layer_idx] = ProjectionMemo.empty(state, keys)
        memo.add(new_images, new_tokens, keys, values, new_valid)
    slots = memo.slot[images[:, None], tokens].clamp(min=0)  # padding slots point anywhere; they are masked
    return memo.keys[images[:, None], slots], memo.values[images[:, None], slots]
