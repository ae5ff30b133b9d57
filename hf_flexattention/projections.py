"""Keys and values of high-res tokens in one FlexAttention layer (`hr_k_proj` / `hr_v_proj`, paper Sec. 3.3).

Keys. A high-res key is `RoPE(hr_k_proj(f))`, with the token's interpolated rotary phase. Two ways to have them:

* dense (inference, every selection mode): every high-res token is projected once per layer at prefill and kept
  on the state; each decode step masks the unselected ones. Static shapes, no gather, no re-projection, whatever
  the selection picks; costs `n_fa * M * kv_dim` values per image (0.91 GiB for LLaVA-1.5-7B in fp16) and
  `n_fa * M * hidden * kv_dim` multiply-adds at prefill (2 TMACs for LLaVA-1.5-7B).
* gathered (training, with gradients): the union of the tokens a sequence's rows selected is gathered and
  projected, every call; reading the union's size costs one host sync per layer, which a training step affords.

Dense rather than gathered at inference: the paper's threshold selection has no static count to gather, and even
a static budget would gather, rotate and project its tokens in every layer at every step (more operators per step,
and at batch 8 about 3.2 TFLOPs per step for LLaVA-1.5-7B at a 10% budget) where the dense step only masks.

Values are never projected token by token when it is cheaper not to. `hr_v_proj` is affine, so a row's attention
output over high-res tokens, `sum_t p_t hr_v_proj(f_t)`, equals `hr_v_proj(sum_t p_t f_t) + (sum_t p_t - 1) b`:
one projection of the attention-weighted feature per (head, row) instead of one per token. For one decode row
that is 32 projections instead of 5184 on LLaVA-1.5-7B, and nothing to keep. Keeping every token's value as well
as its key would double the state (another 0.91 GiB per image); folding instead reads `hr_v_proj`'s weight each
step (32 MiB per layer, shared by the batch), so at batch 8 it moves about the bytes stored values would.

Shipped as remote code with saved checkpoints: torch and relative imports only.
"""

import torch
from torch import nn

from .high_res import apply_rotary
from .state import FlexState


def project_keys(module: nn.Module, features: torch.Tensor, rotary: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rotated high-res keys `(b, kv_heads, u, head_dim)` of `features` `(b, u, D)` with `rotary` `(b, u, 2, d)`."""
    batch, tokens = features.shape[:2]
    keys = module.hr_k_proj(features).view(batch, tokens, -1, head_dim)
    return apply_rotary(keys, rotary[:, :, None]).transpose(1, 2)


def dense_keys(module: nn.Module, state: FlexState, head_dim: int) -> torch.Tensor:
    """Every image's rotated high-res keys in this layer, `(n_images, kv_heads, head_dim, M)`, projected once.

    Stored transposed, ready for `query @ keys`. Only called without gradients (the stored keys carry none).
    """
    keys = state.high_res_keys.get(module.layer_idx)
    if keys is None:
        features = state.features.to(module.hr_k_proj.weight.dtype)
        keys = project_keys(module, features, state.rotary, head_dim).transpose(-1, -2).contiguous()
        state.high_res_keys[module.layer_idx] = keys
    return keys


def _bias_of(projection: nn.Module) -> bool:
    """Whether an affine projection (an `nn.Linear`, possibly inside a PEFT wrapper) adds a bias."""
    return any(isinstance(layer, nn.Linear) and layer.bias is not None for layer in projection.modules())


def folds_values(head_rows: int, tokens: int) -> bool:
    """Whether projecting the attention-weighted features (one per (head, row) pair) takes fewer projections than
    projecting every candidate token's value."""
    return head_rows < tokens


def high_res_values(module: nn.Module, probabilities: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """The high-res part of the attention output: `probabilities @ hr_v_proj(features)`, per kv-head group.

    Args:
        module: the attention module (holds `hr_v_proj`).
        probabilities: `(b, kv_heads, rows, U)` attention of each (query head, row) on the candidates, in the
            value dtype; `rows` runs over the query heads of each kv head, then the high-res rows.
        features: `(b, U, D)` high-res features of the candidates.

    Returns:
        `(b, kv_heads, rows, head_dim)`.

    With fewer (head, row) pairs than candidates (always when decoding) the weighted features are projected;
    otherwise the candidates' values are (long teacher-forced answers): `folds_values` decides.
    """
    batch, kv_heads, rows, tokens = probabilities.shape
    if not folds_values(kv_heads * rows, tokens):
        values = module.hr_v_proj(features).view(batch, tokens, kv_heads, -1).transpose(1, 2)
        return probabilities @ values
    mixed = probabilities.reshape(batch, kv_heads * rows, tokens) @ features
    # Each (head, row) needs only its own kv head's slice of the projection: the diagonal of (kv head, kv head).
    projected = module.hr_v_proj(mixed).view(batch, kv_heads, rows, kv_heads, -1)
    output = projected.diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)
    if _bias_of(module.hr_v_proj):  # hr_v_proj(sum p f) adds b once; the tokens' values add it sum(p) times
        bias = module.hr_v_proj(features.new_zeros(features.shape[-1])).view(kv_heads, 1, -1)
        output = output + (probabilities.sum(dim=-1, keepdim=True) - 1) * bias
    return output
