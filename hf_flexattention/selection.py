"""High-res token selection from a low-res attention map (pure torch; no transformers imports).

The released FlexAttention code turns, per query row, the attention that row pays to the `g x g` low-res image
tokens into a boolean mask over the `G x G` high-res tokens: zero the padding margin, min-max normalise, keep cells
above a threshold, max-pool to a coarse `s x s` selection grid, upsample (nearest). A high-res token is therefore
selected exactly when its coarse cell is, so everything here works on the `s * s` coarse cells (81 for LLaVA-1.5)
and maps cells to tokens with a precomputed index at the end. All functions keep static shapes and never read a
tensor value on the host, so the decode step stays free of host syncs and compiles without graph breaks.

Shipped as remote code with saved checkpoints: torch only.
"""

import math

import torch


def padding_margin_cells(original_sizes: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Number of low-res grid rows and columns covered by the square padding, per image.

    Args:
        original_sizes: `(n, 2)` (height, width) of each image before it was padded to a square; a row of
            non-positive values means "unknown" and gives no margin.
        grid: side of the low-res token grid.

    Returns:
        `(margin_rows, margin_cols)`, each `(n,)` long: cells to zero on both sides of the padded axis
        (`int(|H - W| // 2 / max(H, W) * grid)`, as in the released code).
    """
    height, width = original_sizes[:, 0].long(), original_sizes[:, 1].long()
    known = (height > 0) & (width > 0)
    longest = torch.maximum(height, width).clamp(min=1)
    cells = ((height - width).abs() // 2).double() / longest.double() * grid
    cells = torch.where(known, cells.floor().long(), torch.zeros_like(height))
    margin_rows = torch.where(width > height, cells, torch.zeros_like(cells))
    margin_cols = torch.where(height > width, cells, torch.zeros_like(cells))
    return margin_rows, margin_cols


def inside_image(original_sizes: torch.Tensor, grid: int) -> torch.Tensor:
    """`(n, grid * grid)` bool, row-major: True where a low-res cell lies inside the image (not in the padding)."""
    margin_rows, margin_cols = padding_margin_cells(original_sizes, grid)
    index = torch.arange(grid, device=original_sizes.device)
    rows_ok = (index >= margin_rows[:, None]) & (index < grid - margin_rows[:, None])
    cols_ok = (index >= margin_cols[:, None]) & (index < grid - margin_cols[:, None])
    return (rows_ok[:, :, None] & cols_ok[:, None, :]).flatten(1)


def pooling_windows(grid: int, selection_grid: int, device: torch.device | None = None) -> torch.Tensor:
    """`(s * s, w)` long: the low-res cells (row-major) in each window of an adaptive max-pool from `g` to `s`.

    Window `i` spans `[floor(i * g / s), ceil((i + 1) * g / s))` on each axis, as `F.adaptive_max_pool2d`'s do;
    with the released 24 -> 9 pooling they overlap slightly (`[0,3) [2,6) [5,8) ...`): a small dilation. Smaller
    windows repeat one of their cells up to the widest window's `w` cells (a max is unchanged by repeats).
    """
    starts = [(i * grid) // selection_grid for i in range(selection_grid)]
    ends = [-(-(i + 1) * grid // selection_grid) for i in range(selection_grid)]
    width = max(end - start for start, end in zip(starts, ends, strict=True))
    axis = torch.tensor(
        [[min(start + offset, end - 1) for offset in range(width)] for start, end in zip(starts, ends, strict=True)]
    )
    cells = axis[:, None, :, None] * grid + axis[None, :, None, :]  # s, s, w, w
    return cells.reshape(selection_grid * selection_grid, width * width).to(device)


def pool_cells(low_res_map: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """Max-pool `(..., g * g)` row-major maps to `(..., s * s)` coarse cells over `pooling_windows`.

    Equals `F.adaptive_max_pool2d` on the `g x g` grid, as one gather and one max over static shapes.
    """
    return low_res_map[..., windows].amax(dim=-1)


def threshold_cells(low_res_map: torch.Tensor, pooled: torch.Tensor, threshold: float) -> torch.Tensor:
    """Coarse cells whose min-max normalised attention is strictly above `threshold` (the paper's rule).

    `(x - min) / (max - min) > t` is evaluated as `x > lerp(min, max, t)`: the same comparison without the
    division, so a constant map (max == min) selects nothing instead of producing NaN. Max-pooling and then
    thresholding equals thresholding and then pooling, because normalisation is monotonic.

    Args:
        low_res_map: `(..., g * g)` attention over the low-res image tokens (margin already zeroed).
        pooled: `(..., s * s)` its `pool_cells`.
        threshold: in [0, 1).

    Returns:
        `(..., s * s)` bool.
    """
    low, high = torch.aminmax(low_res_map, dim=-1, keepdim=True)
    return pooled > torch.lerp(low, high, threshold)


def budget_cells(topk_ratio: float, selection_grid: int) -> int:
    """Number of coarse cells the `"topk"` budget keeps: `round(topk_ratio * s * s)` (halves round up).

    Every coarse cell covers the same number of high-res tokens when `s` divides the high-res grid side (8 x 8
    tokens for LLaVA-1.5's 9 x 9 grid over 72 x 72), so the budget is `cells / s**2` of the high-res tokens:
    `topk_ratio=0.1` keeps 8 of 81 cells, 512 of 5184 tokens (9.9%).

    Raises:
        ValueError: if `topk_ratio` is outside (0, 1] or rounds to zero cells.
    """
    cells = selection_grid * selection_grid
    smallest = 0.5 / cells
    if not (isinstance(topk_ratio, (int, float)) and not isinstance(topk_ratio, bool)) or not 0 < topk_ratio <= 1:
        raise ValueError(
            f"`topk_ratio={topk_ratio!r}` must lie in [{smallest:.4g}, 1]: it is the fraction of high-res tokens "
            f"kept, in whole cells of the {selection_grid}x{selection_grid} selection grid."
        )
    kept = math.floor(topk_ratio * cells + 0.5)
    if kept < 1:
        raise ValueError(
            f"`topk_ratio={topk_ratio}` keeps no cell of the {selection_grid}x{selection_grid} selection grid "
            f"(round({topk_ratio} * {cells}) = 0): use a value in [{smallest:.4g}, 1]."
        )
    return kept


def topk_cells(pooled: torch.Tensor, cell_inside: torch.Tensor, budget: int, empty: torch.Tensor | None = None):
    """The `budget` strongest coarse cells of each row: a static number, for static shapes.

    Args:
        pooled: `(..., s * s)` pooled attention, zero on cells that lie wholly in the padding margin.
        cell_inside: `(..., s * s)` bool (broadcastable): cells that overlap the image. Cells that do not rank last
            (their attention is zero) and are never kept, so a row never spends its budget on padding; a row
            whose image has fewer cells than the budget keeps fewer.
        budget: cells per row (`budget_cells`).
        empty: an all-False bool tensor of `pooled`'s shape to scatter into (saves allocating one per call).

    Returns:
        `(..., s * s)` bool.
    """
    top = pooled.topk(budget, dim=-1).indices
    if empty is None:
        empty = pooled.new_zeros(pooled.shape, dtype=torch.bool)
    return empty.scatter(-1, top, True) & cell_inside


_UINT32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """`x * constant mod 2**32` for `x` in [0, 2**32) held in int64, without overflowing it (two 16-bit halves)."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _UINT32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (the "lowbias32" finaliser) on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def random_cells(positions: torch.Tensor, layer: int, selection_grid: int, p: float, seed: int) -> torch.Tensor:
    """`(*positions.shape, s * s)` bool: each coarse cell with probability `p` (the paper's random-selection ablation).

    The draw is a counter-based hash of (seed, layer, the row's sequence position, cell), in exact integer
    arithmetic: a row draws the same cells with or without a KV cache, compiled or not, on any device, and no
    generator state is kept.

    Args:
        positions: `(...)` long: each row's position in its sequence.
        layer: the layer the selection is for.
    """
    cells = torch.arange(selection_grid * selection_grid, device=positions.device)
    key = _hash32(torch.full_like(cells, (seed * 0x9E3779B1 + layer * 0x85EBCA77) & _UINT32))
    x = _hash32((key + _hash32(positions[..., None] & _UINT32) + cells * 0x27D4EB2F) & _UINT32)
    return x < round(p * 2**32)


def token_cells(
    selection_grid: int, high_res_grid: int | tuple[int, int], device: torch.device | None = None
) -> torch.Tensor:
    """`(H * W,)` long: the coarse cell (row-major) of each high-res token, as nearest upsampling assigns it.

    `high_res_grid` is `G` (a `G x G` grid) or `(H, W)`. High-res row `y` falls in coarse row `floor(y * s / H)`
    (`F.interpolate(mode="nearest")`), columns alike.
    """
    height, width = (high_res_grid, high_res_grid) if isinstance(high_res_grid, int) else high_res_grid
    rows = torch.arange(height, device=device) * selection_grid // height
    columns = torch.arange(width, device=device) * selection_grid // width
    return (rows[:, None] * selection_grid + columns[None, :]).flatten()


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
    random_seed: int = 0,
) -> torch.Tensor:
    """Select high-res tokens for each query row from its attention over the low-res image tokens.

    Args:
        attention: `(n, g*g)` non-negative attention of each row over the low-res image tokens (summed over
            heads), row-major.
        high_res_grid: side `G` of the high-res token grid.
        selection_grid: side `s` of the coarse grid the selection is max-pooled to (released: 9 for g = 24).
        mode: `"threshold"` (min-max normalise, keep cells strictly above `threshold`; the paper, Sec. 3.2),
            `"topk"` (a budget: the `budget_cells(topk_ratio, s)` strongest coarse cells) or `"random"` (each
            coarse cell with probability `random_p`; the attention values are ignored).
        original_sizes: `(n, 2)` (height, width) before padding, to ignore the padding margin; None skips it.
        random_seed: seed of `"random"` (row `i` draws as a row at sequence position `i`, `random_cells`).

    Returns:
        `(n, G*G)` bool mask over the high-res tokens, row-major. A constant map selects nothing.

    Raises:
        ValueError: for a non-square map, an unknown mode, or a `topk_ratio` that keeps no cell.
    """
    n, cells = attention.shape
    grid = math.isqrt(cells)
    if grid * grid != cells:
        raise ValueError(f"The low-res attention map has {cells} cells, which is not a square grid.")
    to_tokens = token_cells(selection_grid, high_res_grid, attention.device)
    if mode == "random":
        positions = torch.arange(n, device=attention.device)
        return random_cells(positions, 0, selection_grid, random_p, random_seed)[:, to_tokens]

    low_res_map = attention.detach().float()
    inside = torch.ones_like(low_res_map, dtype=torch.bool)
    if original_sizes is not None:
        inside = inside_image(original_sizes.to(low_res_map.device), grid)
        low_res_map = low_res_map * inside
    windows = pooling_windows(grid, selection_grid, attention.device)
    pooled = pool_cells(low_res_map, windows)
    if mode == "threshold":
        chosen = threshold_cells(low_res_map, pooled, threshold)
    elif mode == "topk":
        cell_inside = pool_cells(inside, windows)
        chosen = topk_cells(pooled, cell_inside, budget_cells(topk_ratio, selection_grid))
    else:
        raise ValueError(f"Unknown selection mode {mode!r}: use 'threshold', 'topk' or 'random'.")
    return chosen[:, to_tokens]
