"""The FlexAttention attention function, registered with transformers' `AttentionInterface`.

The backbone's own attention module (Llama, Mistral, Qwen2, ...) still computes q/k/v, RoPE and the KV cache and
then calls this function. Rows that do not predict an answer get the backbone's plain attention (its `sdpa` or
`eager` function). The high-res rows of a call are computed here:

* in the layer below each FlexAttention layer, their plain attention over the low-res image tokens selects
  high-res tokens for the layer above (a small side computation, never the full attention matrix);
* in FlexAttention layers, they attend in one softmax to their causal keys and their selected high-res tokens,
  whose keys are rotated with interpolated RoPE (paper Sec. 3.3; `projections.py` says how keys and values are
  obtained).

A one-token decode step has one row per sequence, which is the query itself: the layers that FlexAttention touches
then compute that row's attention here and skip the backbone's call, and nothing depends on the data's values, so
the step has the stock step's host syncs (none added) and a fixed number of operations whatever the batch size and
whatever was selected.

Shipped as remote code with saved checkpoints: torch, transformers and relative imports only.
"""

import sys

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from .projections import dense_keys, high_res_values, project_keys
from .selection import pool_cells, random_cells, threshold_cells, topk_cells
from .state import FlexCall, pack_true_indices


FLEX_ATTENTION_PREFIX = "flexattn_"


def flex_implementation_name(base: str) -> str:
    """Name under which FlexAttention wraps the backbone's `base` attention implementation."""
    return FLEX_ATTENTION_PREFIX + base


def base_implementation_name(name: str) -> str:
    """The backbone implementation wrapped by a FlexAttention implementation name (identity for other names)."""
    return name.removeprefix(FLEX_ATTENTION_PREFIX)


class FlexAttentionConfig:
    """What a patched language model's attention modules see as their `config`: the language model's config, except
    that `_attn_implementation` names the FlexAttention wrapper of the implementation that config holds.

    The model's own configs keep reporting `"sdpa"` or `"eager"`, which is what transformers, PEFT, TRL and
    accelerate compare against (e.g. `output_attentions` needs `"eager"`), and this view follows the config when
    `set_attn_implementation` changes it. Reads and writes of anything else go to the config itself.
    """

    def __init__(self, text_config) -> None:
        object.__setattr__(self, "text_config", text_config)

    @property
    def _attn_implementation(self) -> str:
        return flex_implementation_name(base_implementation_name(self.text_config._attn_implementation or "sdpa"))

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "text_config":  # copy/pickle probes, and before __init__ ran
            raise AttributeError(name)
        return getattr(self.text_config, name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self.text_config, name, value)


def _eager_attention_of(module: torch.nn.Module):
    """The backbone's own eager attention function (the one its module falls back to)."""
    return sys.modules[type(module).__module__].eager_attention_forward


def _row_queries(call: FlexCall, query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """The high-res rows' queries, grouped by kv head: `(batch, kv_heads, groups * rows, head_dim)`."""
    batch, heads, _, head_dim = query.shape
    if call.row_index is not None:
        index = call.row_index[:, None, :, None].expand(batch, heads, -1, head_dim)
        query = query.gather(2, index)
    return query if heads == kv_heads else query.reshape(batch, kv_heads, -1, head_dim)


def _row_mask(call: FlexCall, attention_mask: torch.Tensor | None, kv_length: int, groups: int) -> torch.Tensor | None:
    """The plain mask of the high-res rows, broadcastable to `(batch, kv_heads, groups * rows, kv)`.

    A decode step's rows are its queries: the backbone's mask serves as it is (None, bool or additive). Gathered
    rows get a bool mask; a padding slot may attend to every key, so that it never makes NaN (it is discarded).
    """
    if call.row_index is None:
        return attention_mask
    if attention_mask is None:
        # sdpa drops the mask when it is purely causal: rebuild it from the query positions. (Aligning it to the last
        # key instead would let a static cache's prefill attend to the cache's empty tail.)
        key_index = torch.arange(kv_length, device=call.row_index.device)
        allowed = key_index <= (call.row_index + call.query_offset)[..., None]
    else:
        allowed = attention_mask
        if allowed.dtype != torch.bool:  # eager's additive mask: 0 where allowed, the dtype's minimum elsewhere
            allowed = allowed > torch.finfo(allowed.dtype).min / 2
        index = call.row_index[:, None, :, None].expand(-1, allowed.shape[1], -1, kv_length)
        allowed = allowed.expand(call.row_index.shape[0], -1, -1, -1).gather(2, index)[:, 0]
    allowed = allowed | ~call.row_valid[..., None]
    return allowed[:, None].repeat(1, 1, groups, 1)


def _masked(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return scores
    if mask.dtype == torch.bool:
        return torch.where(mask, scores, float("-inf"))
    return scores + mask


def _select_for_next_layer(call: FlexCall, layer_idx: int, plain: torch.Tensor) -> None:
    """Store in `call.selections[layer_idx + 1]` what each high-res row selects from its plain attention map.

    `plain`: the rows' plain attention probabilities, `(batch, kv_heads, groups * rows, kv)` float32. A row's map
    is their sum over heads on the low-res image tokens, with the padding margin zeroed (paper Sec. 3.2, as the
    released code computes it); a row of a sequence without an image, or that predicts no answer token, selects
    nothing.
    """
    state, rows = call.state, call.rows
    with torch.no_grad():
        if rows == 1:
            image_attention = plain.sum(dim=(1, 2), keepdim=True)
            positions = state.image_positions
        else:
            image_attention = plain.view(plain.shape[0], -1, rows, plain.shape[-1]).sum(dim=1, keepdim=True)
            positions = state.image_positions.expand(-1, -1, rows, -1)
        low_res_map = image_attention.gather(-1, positions) * call.inside  # batch, 1, rows, N
        pooled = pool_cells(low_res_map, state.pooling_windows)
        if call.mode == "threshold":
            cells = threshold_cells(low_res_map, pooled, call.threshold)
        elif call.mode == "topk":
            empty = state.empty_cells if rows == 1 else None
            cells = topk_cells(pooled, call.cell_inside, call.budget, empty)
        else:
            draw = random_cells(call.row_positions(), layer_idx + 1, call.selection_grid, call.random_p, call.seed)
            cells = draw[:, None] & call.cell_inside
        selected = state.tokens_of_cells(cells)  # batch, 1, rows, M
    call.selections[layer_idx + 1] = selected
    if call.trace is not None:
        call.trace.append((layer_idx + 1, selected.sum(dim=-1)[:, 0].cpu()))
        if hasattr(call.trace, "record_selection"):  # a tracing.FlexTrace: the maps and masks too
            call.trace.record_selection(layer_idx + 1, call, low_res_map[:, 0], selected[:, 0])


def _candidates(
    module: torch.nn.Module, call: FlexCall, selected: torch.Tensor, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """`(keys (batch, kv_heads, head_dim, U), features (batch, U, D), allowed (batch, 1, rows, U))`.

    Inference attends over every high-res token's key, projected once at prefill, and masks the unselected ones.
    With gradients (training), the union of the tokens a sequence's rows selected is projected, every call.
    None when no sequence selected anything (training only: the union's size is read on the host there).
    """
    state = call.state
    if not torch.is_grad_enabled():
        keys = state.per_sequence(dense_keys(module, state, head_dim))
        return keys, state.per_sequence(state.features), selected
    tokens, slot_valid = pack_true_indices(selected.any(dim=2)[:, 0])
    if tokens.shape[1] == 0:
        return None
    allowed = selected.gather(-1, tokens[:, None, None].expand(-1, 1, call.rows, -1)) & slot_valid[:, None, None]
    row_image = state.row_image[:, None]
    features = state.features[row_image, tokens]
    keys = project_keys(module, features, state.rotary[row_image, tokens], head_dim)
    return keys.transpose(-1, -2), features, allowed


def _hierarchical_rows(
    module: torch.nn.Module,
    call: FlexCall,
    queries: torch.Tensor,
    scores: torch.Tensor,
    value: torch.Tensor,
) -> torch.Tensor | None:
    """Joint attention of the high-res rows over their causal keys and their selected high-res tokens.

    Args:
        queries: `(batch, kv_heads, groups * rows, head_dim)`, already scaled.
        scores: `(batch, kv_heads, groups * rows, kv)` their masked plain scores.

    Returns:
        `(batch, kv_heads, groups * rows, head_dim)`, or None when nothing was selected (training only).
    """
    candidates = _candidates(module, call, call.selections[module.layer_idx], queries.shape[-1])
    if candidates is None:
        return None
    keys, features, allowed = candidates
    if call.rows > 1:
        allowed = allowed.repeat(1, 1, queries.shape[2] // call.rows, 1)
    high_res_scores = torch.where(allowed, queries @ keys, float("-inf"))
    probabilities = torch.cat([scores, high_res_scores], dim=-1).softmax(dim=-1, dtype=torch.float32)
    if probabilities.dtype != value.dtype:
        probabilities = probabilities.to(value.dtype)
    plain, high_res = probabilities.split([scores.shape[-1], high_res_scores.shape[-1]], dim=-1)
    return plain @ value + high_res_values(module, high_res, features)


def _with_zero_high_res_gradient(module: torch.nn.Module, attn_output: torch.Tensor) -> torch.Tensor:
    """Give the hr projections of a layer that did not use them a zero gradient.

    DDP without `find_unused_parameters` (the Trainer's choice under gradient checkpointing) waits for a gradient
    of every trainable parameter; a batch in which no row selected a high-res token would otherwise hang it.
    Calling the modules (not their weights) also reaches LoRA and `modules_to_save` wrappers.
    """
    probe = attn_output.new_zeros(1, module.hr_k_proj.in_features)
    return attn_output + 0.0 * (module.hr_k_proj(probe).sum() + module.hr_v_proj(probe).sum())


def flex_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    base_attention,
    returns_weights: bool = False,
    flex_call: FlexCall | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The backbone's attention for plain rows; selection and hierarchical attention for the high-res rows.

    Same contract as any `AttentionInterface` function: `query` `(batch, heads, q, head_dim)`, `key`/`value`
    `(batch, kv_heads, kv, head_dim)` (post-RoPE, post-cache), returns `((batch, q, heads, head_dim), weights)`.
    `weights` are the backbone's (None for `sdpa`; for `eager`, `(batch, heads, q, kv)` over the sequence, which
    for high-res rows leaves out the high-res tokens: they are not sequence positions). `returns_weights` makes a
    decode step in a FlexAttention layer run the backbone's call too, so that those weights exist.
    """
    layer_idx = getattr(module, "layer_idx", None)
    flex_layer = flex_call is not None and flex_call.is_flex_layer(layer_idx) and hasattr(module, "hr_k_proj")
    selects = flex_call is not None and flex_call.makes_selection(layer_idx)
    if not (flex_layer or selects):
        attn_output, attn_weights = base_attention(module, query, key, value, attention_mask, **kwargs)
        if torch.is_grad_enabled() and hasattr(module, "hr_k_proj"):
            attn_output = _with_zero_high_res_gradient(module, attn_output)
        return attn_output, attn_weights

    batch, heads, _, head_dim = query.shape
    kv_heads, kv_length = key.shape[1], key.shape[2]
    # A decode step's rows are its queries: compute them here alone, unless something needs the backbone's call
    # (eager's contract returns the attention weights, which `output_attentions` collects).
    rows_are_queries = flex_call.row_index is None and flex_call.alpha == 1.0
    attn_output = attn_weights = None
    if not rows_are_queries or returns_weights:
        attn_output, attn_weights = base_attention(module, query, key, value, attention_mask, **kwargs)

    scaling = kwargs.get("scaling") or head_dim**-0.5
    queries = _row_queries(flex_call, query, kv_heads) * scaling
    mask = _row_mask(flex_call, attention_mask, kv_length, heads // kv_heads)
    scores = _masked(queries @ key.transpose(-1, -2), mask)
    plain = None
    if selects:
        plain = scores.softmax(dim=-1, dtype=torch.float32)
        _select_for_next_layer(flex_call, layer_idx, plain)

    output = _hierarchical_rows(module, flex_call, queries, scores, value) if flex_layer else None
    # A FlexAttention layer whose rows selected nothing (training only) still gives its hr projections a gradient.
    unused = flex_layer and output is None and torch.is_grad_enabled()
    if output is None and attn_output is not None:
        return (_with_zero_high_res_gradient(module, attn_output) if unused else attn_output), attn_weights
    if output is None:  # the queries of a plain layer that selects: their plain attention is the layer's output
        plain = scores.softmax(dim=-1, dtype=torch.float32) if plain is None else plain
        output = (plain if plain.dtype == value.dtype else plain.to(value.dtype)) @ value
    if flex_call.row_index is None:  # one row per sequence: (batch, kv_heads, groups, d) is (batch, 1, heads, d)
        output = output.view(batch, 1, heads, head_dim)
    else:
        output = output.view(batch, heads, -1, head_dim).transpose(1, 2)  # batch, rows, heads, head_dim
    if unused:
        output = _with_zero_high_res_gradient(module, output)
    if attn_output is None:
        return output, None
    return _merge_rows(flex_call, attn_output, output), attn_weights


def _merge_rows(call: FlexCall, attn_output: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The backbone's `attn_output` `(batch, q, heads, d)` with the valid high-res rows `(batch, rows, heads, d)`
    put in (blended by the warm-up alpha). Scatters without reading anything on the host."""
    rows = rows.to(attn_output.dtype)
    if call.row_index is None:
        base = attn_output
    else:
        batch_index = torch.arange(attn_output.shape[0], device=attn_output.device)[:, None]
        base = attn_output[batch_index, call.row_index]
    if call.alpha != 1.0:
        rows = base + call.alpha * (rows - base)
    if call.row_valid is not None:
        rows = torch.where(call.row_valid[..., None, None], rows, base)
    if call.row_index is None:
        return rows
    return attn_output.index_put((batch_index, call.row_index), rows)


def _flex_sdpa(module, query, key, value, attention_mask, **kwargs):
    return flex_attention_forward(
        module, query, key, value, attention_mask, base_attention=sdpa_attention_forward, **kwargs
    )


def _flex_eager(module, query, key, value, attention_mask, **kwargs):
    return flex_attention_forward(
        module,
        query,
        key,
        value,
        attention_mask,
        base_attention=_eager_attention_of(module),
        returns_weights=True,
        **kwargs,
    )


def register_flex_attention() -> None:
    """Register the FlexAttention wrappers of `sdpa` and `eager` (and their masks) with transformers."""
    AttentionInterface.register(flex_implementation_name("sdpa"), _flex_sdpa)
    AttentionInterface.register(flex_implementation_name("eager"), _flex_eager)
    AttentionMaskInterface.register(flex_implementation_name("sdpa"), sdpa_mask)
    AttentionMaskInterface.register(flex_implementation_name("eager"), eager_mask)
