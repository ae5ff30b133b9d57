"""Per-sequence and per-call FlexAttention state.

`FlexState` holds what belongs to the sequences of one `generate()` (or one forward): the high-res features and
their rotary table (once per distinct image), the rotated high-res keys of each FlexAttention layer once they are
projected, and, per sequence, where its low-res image tokens sit and which cells lie inside its image. It rides on
the KV cache (`cache.flex_state`), so it follows the cache through decode steps and beam reordering and dies with
it. Everything a decode step needs is prepared at prefill, so the step itself runs on static shapes.

`FlexCall` holds what belongs to one forward call: which query rows attend to high-res tokens, the warm-up alpha,
and the selections each layer hands to the next (keyed by layer index, so gradient checkpointing can re-run a
layer).

Shipped as remote code with saved checkpoints: torch and relative imports only.
"""

import types
from dataclasses import dataclass, field

import torch


CACHE_ATTRIBUTE = "flex_state"


def pack_true_indices(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of a `(b, n)` bool mask, the ascending indices of its True entries, padded to the fullest row.

    Reads the fullest row's count on the host (one sync): used at prefill and in training, never when decoding.

    Returns `(indices (b, w), valid (b, w))`; `w` is 0 when no entry is True. Padding entries are distinct
    indices of False entries.
    """
    counts = mask.sum(dim=1)
    width = int(counts.max()) if mask.shape[0] else 0
    indices = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :width]
    return indices, torch.arange(width, device=mask.device) < counts[:, None]


def _reset(cache, *args, **kwargs):
    setattr(cache, CACHE_ATTRIBUTE, None)
    return type(cache).reset(cache, *args, **kwargs)


def _reorder_cache(cache, beam_idx: torch.Tensor) -> None:
    type(cache).reorder_cache(cache, beam_idx)
    _select_sequences(cache, beam_idx)


def _batch_select_indices(cache, indices: torch.Tensor) -> None:
    type(cache).batch_select_indices(cache, indices)
    _select_sequences(cache, indices)


def _batch_repeat_interleave(cache, repeats: int) -> None:
    state = getattr(cache, CACHE_ATTRIBUTE, None)
    type(cache).batch_repeat_interleave(cache, repeats)
    if state is not None:
        sequences = torch.arange(state.row_image.shape[0], device=state.row_image.device)
        state.select_sequences(sequences.repeat_interleave(repeats))


def _select_sequences(cache, index: torch.Tensor) -> None:
    state = getattr(cache, CACHE_ATTRIBUTE, None)
    if state is not None:
        state.select_sequences(index)


_FOLLOWED_METHODS = {
    "reset": _reset,
    "reorder_cache": _reorder_cache,
    "batch_select_indices": _batch_select_indices,
    "batch_repeat_interleave": _batch_repeat_interleave,
}


def attach_state(cache, state: "FlexState | None") -> None:
    """Put `state` on `cache`, and make it follow the cache's batch operations.

    `reorder_cache` (beam search), `batch_select_indices` and `batch_repeat_interleave` select the state's
    sequences as they select the cache's; `reset` drops the state (`generate` resets and reuses static caches, and
    a later prompt must never see an earlier image; telling a reset cache from a decoding one by its length would
    read a tensor on the host at every step). The methods are bound to this cache object, so a deep copy of the
    cache binds them to the copy.
    """
    setattr(cache, CACHE_ATTRIBUTE, state)
    for name, method in _FOLLOWED_METHODS.items():
        if name not in vars(cache) and hasattr(cache, name):
            setattr(cache, name, types.MethodType(method, cache))


@dataclass
class FlexState:
    """High-res data of the sequences in a batch.

    Images are stored once per distinct (image, prompt position): the copies that generate makes for beams or
    returned sequences share one encoding and one set of projected keys.

    Attributes:
        features: `(n_images, M, D)` projected high-res features, row-major over the `G x G` grid.
        rotary: `(n_images, M, 2, head_dim)` RoPE table of each high-res key (`high_res.rotary_table`).
        row_image: `(batch,)` image index of each sequence (text-only sequences point at image 0: their `inside`
            is all zero, so they select nothing).
        image_positions: `(batch, 1, 1, N)` sequence (KV) indices of each sequence's low-res image tokens.
        inside: `(batch, 1, 1, N)` 1.0 where a low-res cell lies inside the sequence's image, 0.0 in the padding
            margin and for text-only sequences (whose selections are therefore empty).
        cell_inside: `(batch, 1, 1, s * s)` bool: coarse cells that overlap the sequence's image.
        empty_cells: `(batch, 1, 1, s * s)` all False, for the budget selection to scatter into.
        rows_are_images: whether sequence `i` holds image `i` for every `i`, so that per-image tensors serve the
            batch as they are (no gather per layer).
        pooling_windows: `(s * s, w)` low-res cells of each coarse cell's pooling window (`selection.pooling_windows`).
        token_cell: `(M,)` coarse cell of each high-res token (`selection.token_cells`), the same for every image;
            or `(n_images, M)` when images have pools of different shapes (LLaVA-NeXT's crop grids), with
            `token_valid` marking each image's real tokens (pools are padded to the largest).
        token_valid: None, or `(n_images, M)` bool with a `(n_images, M)` `token_cell`.
        high_res_keys: per FlexAttention layer, the rotated high-res keys of every token, `(n_images, kv_heads,
            head_dim, M)` (inference with a dense selection; filled at prefill).
    """

    features: torch.Tensor
    rotary: torch.Tensor
    row_image: torch.Tensor
    image_positions: torch.Tensor
    inside: torch.Tensor
    cell_inside: torch.Tensor
    empty_cells: torch.Tensor
    rows_are_images: bool
    pooling_windows: torch.Tensor
    token_cell: torch.Tensor
    token_valid: torch.Tensor | None = None
    high_res_keys: dict[int, torch.Tensor] = field(default_factory=dict)

    def per_sequence(self, per_image: torch.Tensor) -> torch.Tensor:
        """`(n_images, ...)` -> `(batch, ...)`: as it is when `rows_are_images`, else one gather."""
        return per_image if self.rows_are_images else per_image[self.row_image]

    def tokens_of_cells(self, cells: torch.Tensor) -> torch.Tensor:
        """`(batch, 1, rows, s * s)` selected coarse cells -> `(batch, 1, rows, M)` selected high-res tokens (the
        released code's nearest upsampling; a padding slot of a smaller pool is never selected)."""
        if self.token_valid is None:
            return cells[..., self.token_cell]
        index = self.per_sequence(self.token_cell)[:, None, None].expand(-1, 1, cells.shape[2], -1)
        return cells.gather(-1, index) & self.per_sequence(self.token_valid)[:, None, None]

    def select_sequences(self, index: torch.Tensor) -> None:
        """Keep sequences `index` `(new_batch,)` (beam reordering, batch selection or repetition of the cache)."""
        index = index.to(self.row_image.device)
        for name in ("row_image", "image_positions", "inside", "cell_inside", "empty_cells"):
            setattr(self, name, getattr(self, name)[index])
        # Whether the new order is still the identity cannot be known without reading `index` on the host;
        # gathering per layer is always right.
        self.rows_are_images = False


@dataclass
class FlexCall:
    """One forward call's view of the high-res rows.

    The high-res rows are stored padded per sequence: `row_index[b, r]` is a query index (within this call) of
    sequence `b` when `row_valid[b, r]`. `row_index` is None when the rows are the call's queries themselves (a
    one-token decode step): then no row is gathered or scattered, and shapes do not depend on the data;
    `row_valid` is then None when every query is a high-res row. `query_offset` is the number of tokens cached
    before this call (a tensor for static caches): query `i` sits at position `query_offset + i`. `inside`
    `(batch, 1, rows | 1, N)` and `cell_inside` are the state's, zero for rows that are not valid, so such rows
    select nothing.
    """

    state: FlexState
    row_index: torch.Tensor | None
    row_valid: torch.Tensor | None
    query_offset: int | torch.Tensor
    inside: torch.Tensor
    cell_inside: torch.Tensor
    alpha: float
    first_flex_layer: int
    num_layers: int
    mode: str
    threshold: float
    budget: int
    random_p: float
    seed: int
    selection_grid: int
    selections: dict[int, torch.Tensor] = field(default_factory=dict)
    trace: list | None = None

    def row_positions(self) -> torch.Tensor:
        """`(batch | 1, rows)` the sequence position of each high-res row."""
        device = self.inside.device
        if self.row_index is None:
            return torch.as_tensor(self.query_offset, device=device).view(1, 1)
        return self.row_index + self.query_offset

    @property
    def rows(self) -> int:
        """High-res rows per sequence (padded)."""
        return 1 if self.row_index is None else self.row_index.shape[1]

    def makes_selection(self, layer_idx: int) -> bool:
        """Whether `layer_idx` computes the selection the layer above it uses."""
        return self.first_flex_layer - 1 <= layer_idx < self.num_layers - 1

    def is_flex_layer(self, layer_idx: int) -> bool:
        """Whether `layer_idx` is a FlexAttention (hierarchical) layer."""
        return layer_idx >= self.first_flex_layer
