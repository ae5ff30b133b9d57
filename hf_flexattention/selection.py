"""High-res token selection from a low-res attention map (pure torch; no transformers imports).

The selection turns, per query row, the attention that row pays to the `g x g` low-res image tokens into a
boolean mask over the `G x G` high-res tokens (row-major), as the released FlexAttention code does: zero the
padding margin, min-max normalise, keep cells above a threshold, max-pool to a coarse grid, upsample (nearest).
"""

import torch
import torch.nn.functional as F


def padding_margin_cells(original_sizes: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Number of low-res grid rows and columns covered by the square padding, per image.

    Args:
        original_sizes: `(n, 2)` (height, width) of each image before it was padded to a square; a row of
            non-positive values means "unknown" and gives no margin.
        grid: side of the low-res token grid.

    Returns:
        `(margin_rows, margin_cols)`, each `(n,)` long: cells to zero on both sides of the padded axis.
    """
    height, width = original_sizes[:, 0].long(), original_sizes[:, 1].long()
    known = (height > 0) & (width > 0)
    longest = torch.maximum(height, width).clamp(min=1)
    cells = ((height - width).abs() // 2).double() / longest.double() * grid
    cells = torch.where(known, cells.floor().long(), torch.zeros_like(height))
    margin_rows = torch.where(width > height, cells, torch.zeros_like(cells))
    margin_cols = torch.where(height > width, cells, torch.zeros_like(cells))
    return margin_rows, margin_cols


def _margin_mask(margin_rows: torch.Tensor, margin_cols: torch.Tensor, grid: int) -> torch.Tensor:
    """`(n, grid, grid)` bool: True where a cell lies inside the image (outside the padding margin)."""
    index = torch.arange(grid, device=margin_rows.device)
    rows_ok = (index >= margin_rows[:, None]) & (index < grid - margin_rows[:, None])
    cols_ok = (index >= margin_cols[:, None]) & (index < grid - margin_cols[:, None])
    return rows_ok[:, :, None] & cols_ok[:, None, :]


def _cells_to_high_res(cells: torch.Tensor, selection_grid: int, high_res_grid: int) -> torch.Tensor:
    """Pool a `(n, g, g)` bool cell map to `selection_grid`, upsample to `high_res_grid`, flatten row-major."""
    pooled = F.adaptive_max_pool2d(cells[:, None].float(), (selection_grid, selection_grid))
    upsampled = F.interpolate(pooled, size=(high_res_grid, high_res_grid), mode="nearest")
    return upsampled[:, 0].flatten(1) > 0.5


def select_high_res_tokens(
    attention: torch.Tensor,
    *,
    high_res_grid: int,
    selection_grid: int,
    mode: str = "threshold",
    threshold: float = 48 / 255,
    topk_ratio: float = 0.1,
    random_p: float = 0.1,
    original_sizes: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Select high-res tokens for each query row from its attention over the low-res image tokens.

    Args:
        attention: `(n, g*g)` non-negative attention of each row over the low-res image tokens (summed over
            heads), row-major.
        high_res_grid: side `G` of the high-res token grid.
        selection_grid: side of the coarse grid the selection is max-pooled to (released: 9 for g = 24).
        mode: `"threshold"` (min-max normalise, keep cells strictly above `threshold`), `"topk"` (keep the
            `ceil(topk_ratio * cells)` strongest cells) or `"random"` (each coarse cell with probability
            `random_p`; the attention values are ignored).
        original_sizes: `(n, 2)` (height, width) before padding, to ignore the padding margin; None skips it.
        generator: random generator for `"random"`.

    Returns:
        `(n, G*G)` bool mask over the high-res tokens, row-major. A constant map selects nothing.
    """
    n, cells = attention.shape
    grid = int(round(cells**0.5))
    if grid * grid != cells:
        raise ValueError(f"The low-res attention map has {cells} cells, which is not a square grid.")
    if mode == "random":
        coarse = torch.rand(n, selection_grid, selection_grid, generator=generator, device="cpu") < random_p
        coarse = coarse.to(attention.device)
        upsampled = F.interpolate(coarse[:, None].float(), size=(high_res_grid, high_res_grid), mode="nearest")
        return upsampled[:, 0].flatten(1) > 0.5

    amap = attention.detach().float().reshape(n, grid, grid)
    if original_sizes is not None:
        inside = _margin_mask(*padding_margin_cells(original_sizes.to(amap.device), grid), grid)
        amap = amap * inside
    else:
        inside = torch.ones_like(amap, dtype=torch.bool)

    if mode == "threshold":
        flat = amap.flatten(1)
        low = flat.min(dim=1).values[:, None, None]
        high = flat.max(dim=1).values[:, None, None]
        span = high - low
        # A constant map carries no preference: it selects nothing instead of dividing by zero.
        normalised = torch.where(span > 0, (amap - low) / span.clamp(min=torch.finfo(amap.dtype).tiny), 0.0)
        chosen = (normalised > threshold) & (span > 0)
    elif mode == "topk":
        k = max(1, int(torch.tensor(topk_ratio * cells).ceil().item()))
        scores = amap.masked_fill(~inside, float("-inf")).flatten(1)
        top = scores.topk(min(k, cells), dim=1).indices
        chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, top, True)
        chosen = chosen.reshape(n, grid, grid) & inside
    else:
        raise ValueError(f"Unknown selection mode {mode!r}: use 'threshold', 'topk' or 'random'.")
    return _cells_to_high_res(chosen, selection_grid, high_res_grid)
