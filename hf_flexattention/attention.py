"""The FlexAttention attention function, registered with transformers' `AttentionInterface`.

The backbone's own attention module (Llama, Mistral, Qwen2, ...) still computes q/k/v, RoPE and the KV cache and
then calls this function. Every row gets the backbone's plain attention (its `sdpa` or `eager` function). Only the
few high-res rows of a forward call are then recomputed here:

* in the layer below each FlexAttention layer, their plain attention over the low-res image tokens selects
  high-res tokens for the layer above (a small side computation, never the full attention matrix);
* in FlexAttention layers, they attend jointly to their causal keys and their selected high-res tokens,
  projected by that layer's `hr_k_proj` / `hr_v_proj` and rotated with interpolated RoPE.

Shipped as remote code with saved checkpoints: torch, transformers and relative imports only.
"""

import sys

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from .projections import memoised_projections, project_tokens
from .selection import select_high_res_tokens
from .state import FlexCall, pack_true_indices


FLEX_ATTENTION_PREFIX = "flexattn_"


def flex_implementation_name(base: str) -> str:
    """Name under which FlexAttention wraps the backbone's `base` attention implementation."""
    return FLEX_ATTENTION_PREFIX + base


def base_implementation_name(name: str) -> str:
    """The backbone implementation wrapped by a FlexAttention implementation name (identity for other names)."""
    return name.removeprefix(FLEX_ATTENTION_PREFIX)


def _eager_attention_of(module: torch.nn.Module):
    """The backbone's own eager attention function (the one its module falls back to)."""
    return sys.modules[type(module).__module__].eager_attention_forward


def _allowed_keys_of_rows(
    call: FlexCall, attention_mask: torch.Tensor | None, q_length: int, kv_length: int, device: torch.device
) -> torch.Tensor:
    """`(rows_batch, rows, kv)` bool: which cached/current keys each high-res row may attend to (plain mask)."""
    if attention_mask is None:
        # sdpa drops the mask when it is purely causal; rebuild it lower-right aligned.
        key_index = torch.arange(kv_length, device=device)
        return key_index <= (call.row_index + (kv_length - q_length))[..., None]
    if attention_mask.dtype == torch.bool:
        allowed = attention_mask
    else:
        allowed = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    allowed = allowed[:, 0].expand(-1, q_length, -1)
    samples = call.row_samples if attention_mask.shape[0] > 1 else torch.zeros_like(call.row_samples)
    return allowed[samples[:, None], call.row_index]


def _select_for_next_layer(
    call: FlexCall,
    layer_idx: int,
    row_queries: torch.Tensor,
    row_keys: torch.Tensor,
    allowed: torch.Tensor,
    scaling: float,
) -> None:
    """Store in `call.selections[layer_idx + 1]` the high-res tokens each row selects from its plain attention."""
    with torch.no_grad():
        keys = repeat_kv(row_keys, row_queries.shape[1] // row_keys.shape[1])
        scores = torch.matmul(row_queries.float(), keys.float().transpose(-1, -2)) * scaling
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        probabilities = torch.softmax(scores, dim=-1).nan_to_num(0.0).sum(dim=1)  # rows_batch, rows, kv
        state = call.state
        image_positions = state.image_positions[call.row_images]  # rows_batch, N
        rows = row_queries.shape[2]
        image_attention = probabilities.gather(-1, image_positions[:, None, :].expand(-1, rows, -1))
        sizes = None
        if state.original_sizes is not None:
            sizes = state.original_sizes[call.row_images].repeat_interleave(rows, dim=0)
        selected = select_high_res_tokens(
            image_attention.flatten(0, 1),
            original_sizes=sizes,
            generator=state.generator,
            **call.selection_kwargs,
        )
        selected = selected.view(*image_attention.shape[:2], -1) & call.row_valid[..., None]
        call.selections[layer_idx + 1] = selected
        if call.trace is not None:
            call.trace.append((layer_idx + 1, selected.sum(-1).cpu()))


def _hierarchical_rows(
    module: torch.nn.Module,
    call: FlexCall,
    selected: torch.Tensor,
    row_queries: torch.Tensor,
    row_keys: torch.Tensor,
    row_values: torch.Tensor,
    allowed: torch.Tensor,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Joint attention of each high-res row over its causal keys and its selected high-res tokens.

    Only the union of the tokens a sequence's rows selected is projected (one gather, one matmul per
    projection), and at inference only tokens not projected at an earlier step. Returns
    `(outputs (rows_batch, rows, heads, dim), active rows mask)` or None if nothing is
    selected.
    """
    order, slot_valid = pack_true_indices(selected.any(dim=1))  # the union of each sequence's rows
    width = order.shape[1]
    if width == 0:
        return None
    batch, kv_heads, _, head_dim = row_keys.shape
    if torch.is_grad_enabled():
        hr_keys, hr_values = project_tokens(module, call.state, call.row_images, order, head_dim)
    else:
        hr_keys, hr_values = memoised_projections(
            call.state.projections, module.layer_idx, module, call.state, call.row_images, order, slot_valid, head_dim
        )
    hr_keys, hr_values = hr_keys.transpose(1, 2), hr_values.transpose(1, 2)

    rows = row_queries.shape[2]
    hr_allowed = selected.gather(-1, order[:, None, :].expand(-1, rows, -1)) & slot_valid[:, None, :]
    active = hr_allowed.any(dim=-1) & call.row_valid
    mask = torch.cat([allowed, hr_allowed], dim=-1) | ~active[..., None]  # inactive rows are discarded later
    groups = row_queries.shape[1] // kv_heads
    keys = repeat_kv(torch.cat([row_keys, hr_keys.to(row_keys.dtype)], dim=2), groups)
    values = repeat_kv(torch.cat([row_values, hr_values.to(row_values.dtype)], dim=2), groups)
    outputs = F.scaled_dot_product_attention(row_queries, keys, values, attn_mask=mask[:, None], scale=scaling)
    return outputs.transpose(1, 2), active


def _with_zero_high_res_gradient(module: torch.nn.Module, attn_output: torch.Tensor) -> torch.Tensor:
    """Give the hr projections of a layer that did not use them a zero gradient.

    DDP without `find_unused_parameters` (the Trainer's choice under gradient checkpointing) waits for a gradient
    of every trainable parameter; a batch in which no row selected a high-res token would otherwise hang it.
    Calling the modules (not their weights) also reaches LoRA and `modules_to_save` wrappers.
    """
    probe = attn_output.new_zeros(1, module.config.hidden_size)
    return attn_output + 0.0 * (module.hr_k_proj(probe).sum() + module.hr_v_proj(probe).sum())


def flex_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    base_attention,
    flex_call: FlexCall | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Plain attention for every row, then hierarchical attention / selection for the high-res rows."""
    attn_output, attn_weights = base_attention(module, query, key, value, attention_mask, **kwargs)
    hierarchical = _high_res_rows_output(module, query, key, value, attention_mask, attn_output, flex_call, kwargs)
    if hierarchical is not None:
        return hierarchical, attn_weights
    if torch.is_grad_enabled() and hasattr(module, "hr_k_proj"):
        attn_output = _with_zero_high_res_gradient(module, attn_output)
    return attn_output, attn_weights


def _high_res_rows_output(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    attn_output: torch.Tensor,
    flex_call: FlexCall | None,
    kwargs: dict,
) -> torch.Tensor | None:
    """`attn_output` with the high-res rows replaced by their hierarchical output (None if this layer has none).

    Also stores the selection this layer makes for the layer above.
    """
    layer_idx = getattr(module, "layer_idx", None)
    if flex_call is None or layer_idx is None:
        return None
    is_flex_layer = hasattr(module, "hr_k_proj") and layer_idx in flex_call.selections
    if not (is_flex_layer or flex_call.makes_selection(layer_idx)):
        return None

    scaling = kwargs.get("scaling")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    q_length, kv_length = query.shape[2], key.shape[2]
    row_queries = query.transpose(1, 2)[flex_call.row_samples[:, None], flex_call.row_index].transpose(1, 2)
    row_keys, row_values = key[flex_call.row_samples], value[flex_call.row_samples]
    allowed = _allowed_keys_of_rows(flex_call, attention_mask, q_length, kv_length, query.device)

    if flex_call.makes_selection(layer_idx):
        _select_for_next_layer(flex_call, layer_idx, row_queries, row_keys, allowed, scaling)
    if not is_flex_layer:
        return None

    result = _hierarchical_rows(
        module, flex_call, flex_call.selections[layer_idx], row_queries, row_keys, row_values, allowed, scaling
    )
    if result is None:
        return None
    row_outputs, active = result
    batch_index = flex_call.row_samples[:, None].expand_as(active)[active]
    query_index = flex_call.row_index[active]
    hierarchical = row_outputs[active].to(attn_output.dtype)
    if flex_call.alpha != 1.0:
        plain = attn_output[batch_index, query_index]
        hierarchical = plain + flex_call.alpha * (hierarchical - plain)
    return attn_output.index_put((batch_index, query_index), hierarchical)


def _flex_sdpa(module, query, key, value, attention_mask, **kwargs):
    return flex_attention_forward(
        module, query, key, value, attention_mask, base_attention=sdpa_attention_forward, **kwargs
    )


def _flex_eager(module, query, key, value, attention_mask, **kwargs):
    return flex_attention_forward(
        module, query, key, value, attention_mask, base_attention=_eager_attention_of(module), **kwargs
    )


def register_flex_attention() -> None:
    """Register the FlexAttention wrappers of `sdpa` and `eager` (and their masks) with transformers."""
    AttentionInterface.register(flex_implementation_name("sdpa"), _flex_sdpa)
    AttentionInterface.register(flex_implementation_name("eager"), _flex_eager)
    AttentionMaskInterface.register(flex_implementation_name("sdpa"), sdpa_mask)
    AttentionMaskInterface.register(flex_implementation_name("eager"), eager_mask)
