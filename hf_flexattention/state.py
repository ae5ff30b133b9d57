"""Per-sequence and per-call FlexAttention state.

`FlexState` holds what belongs to the sequences of one `generate()` (or one forward): the high-res features, their
rotary tables and where the low-res image tokens sit. It rides on the KV cache (`cache.flex_state`) so it
follows the cache through decode steps and beam reordering and dies with it.

`FlexCall` holds what belongs to one forward call: which query rows attend to high-res tokens, the warm-up alpha,
and the selections each layer hands to the next (keyed by layer index, so gradient checkpointing can re-run a
layer).

Shipped as remote code with saved checkpoints: torch and relative imports only.
"""

from dataclasses import dataclass, field

import torch


CACHE_ATTRIBUTE = "flex_state"


def pack_true_indices(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of a `(b, n)` bool mask, the ascending indices of its True entries, padded to the fullest row.

    Returns `(indices (b, w), valid (b, w))`; `w` is 0 when no entry is True.
    """
    counts = mask.sum(dim=1)
    width = int(counts.max()) if mask.shape[0] else 0
    indices = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :width]
    return indices, torch.arange(width, device=mask.device) < counts[:, None]


@dataclass
class FlexState:
    """High-res data of the sequences in a batch.

    Images are stored once per distinct (image, prompt position): the copies that generate makes for beams or
    returned sequences share one encoding and one projection memo.

    Attributes:
        features: `(n_images, M, D)` projected high-res features, row-major over the `G x G` grid.
        rope_cos: `(n_images, M, head_dim)` float32 rotary cos of each high-res key.
        rope_sin: `(n_images, M, head_dim)` float32 rotary sin of each high-res key.
        image_positions: `(n_images, N)` sequence (KV) indices of the low-res image tokens.
        original_sizes: `(n_images, 2)` (height, width) before square padding, or None when unknown.
        sample_image: `(batch,)` image index of each sequence, -1 for text-only sequences.
        generator: random generator of the `"random"` selection mode.
        projections: per-layer memo of the high-res keys/values projected so far (inference only).
    """

    features: torch.Tensor
    rope_cos: torch.Tensor
    rope_sin: torch.Tensor
    image_positions: torch.Tensor
    original_sizes: torch.Tensor | None
    sample_image: torch.Tensor
    generator: torch.Generator | None = None
    projections: dict = field(default_factory=dict)

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Follow the cache when beam search reorders (or expands) the batch."""
        self.sample_image = self.sample_image[beam_idx.to(self.sample_image.device)]


@dataclass
class FlexCall:
    """One forward call's view of the high-res rows.

    The high-res rows are stored padded per sequence: `row_samples[i]` is a batch index and `row_index[i, j]` a
    query index (within this call) of one of its high-res rows when `row_valid[i, j]`.
    """

    state: FlexState
    row_samples: torch.Tensor
    row_index: torch.Tensor
    row_valid: torch.Tensor
    alpha: float
    first_flex_layer: int
    num_layers: int
    selection_kwargs: dict
    selections: dict[int, torch.Tensor] = field(default_factory=dict)
    trace: list | None = None

    @property
    def row_images(self) -> torch.Tensor:
        """Image index of each sequence that has high-res rows."""
        return self.state.sample_image[self.row_samples]

    def makes_selection(self, layer_idx: int) -> bool:
        """Whether `layer_idx` computes the selection the layer above it uses."""
        return self.first_flex_layer - 1 <= layer_idx < self.num_layers - 1
