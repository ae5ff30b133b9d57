"""Dual-resolution helpers: tile the high-res image, stitch tile features, place high-res keys in RoPE.

Shipped as remote code with saved checkpoints: torch only.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F


def split_into_tiles(images: torch.Tensor, tile_size: int) -> torch.Tensor:
    """Cut `(n, C, z*t, z*t)` images into `(n*z*z, C, t, t)` tiles in raster order (row outer, column inner)."""
    n, channels, height, width = images.shape
    zoom = height // tile_size
    tiles = images.unfold(2, tile_size, tile_size).unfold(3, tile_size, tile_size)  # n, C, z, z, t, t
    return tiles.permute(0, 2, 3, 1, 4, 5).reshape(n * zoom * zoom, channels, tile_size, tile_size)


def stitch_tile_features(features: torch.Tensor, zoom: int) -> torch.Tensor:
    """Stitch `(n*z*z, g*g, D)` raster-order tile features into `(n, (z*g)**2, D)` row-major grid features."""
    tiles, tokens, dim = features.shape
    grid = int(round(tokens**0.5))
    n = tiles // (zoom * zoom)
    grid_features = features.reshape(n, zoom, zoom, grid, grid, dim).permute(0, 1, 3, 2, 4, 5)
    return grid_features.reshape(n, (zoom * grid) ** 2, dim)


def encode_high_res_features(
    encode_tiles: Callable[[torch.Tensor], torch.Tensor], high_res_pixel_values: torch.Tensor, tile_size: int
) -> torch.Tensor:
    """Encode each `tile_size` tile of the high-res images with `encode_tiles` and stitch a row-major grid.

    `encode_tiles` maps `(k, C, t, t)` pixels to `(k, g*g, D)` projected features; it is the same vision tower,
    feature layer, select strategy and projector as the low-res path.
    """
    zoom = high_res_pixel_values.shape[-1] // tile_size
    tiles = split_into_tiles(high_res_pixel_values, tile_size)
    return stitch_tile_features(encode_tiles(tiles), zoom)


def interpolate_rotary(table: torch.Tensor, high_res_grid: int | tuple[int, int]) -> torch.Tensor:
    """Bicubically interpolate `(n, g*g, d)` RoPE cos or sin of the low-res image tokens to `(n, H*W, d)`.

    `high_res_grid` is `G` (a `G x G` grid) or `(H, W)` (LLaVA-NeXT's unpadded crop grid, which covers the same
    image as its base tokens). Each high-res key then gets (about) the rotary phase of the low-res token that covers
    its location, as in the released FlexAttention model (align_corners=False; cos and sin interpolated separately).
    """
    height, width = (high_res_grid, high_res_grid) if isinstance(high_res_grid, int) else high_res_grid
    n, tokens, dim = table.shape
    grid = int(round(tokens**0.5))
    planes = table.float().reshape(n, grid, grid, dim).permute(0, 3, 1, 2)
    resized = F.interpolate(planes, size=(height, width), mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1).reshape(n, height * width, dim)


def rotary_table(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Stack `(..., d)` cos and sin into the `(..., 2, d)` table `apply_rotary` takes.

    `rotate_half(x) = roll(x, d/2) * sign` with `sign = (-1, ..., -1, +1, ..., +1)`, so the table keeps `sin * sign`:
    rotating then costs one roll and one multiply-add.
    """
    half = sin.shape[-1] // 2
    sign = torch.ones(sin.shape[-1], dtype=sin.dtype, device=sin.device)
    sign[:half] = -1
    return torch.stack([cos, sin * sign], dim=-2)


def apply_rotary(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate `x` `(..., d)` by a `rotary_table` `(..., 2, d)` (broadcastable): `x * cos + rotate_half(x) * sin`."""
    cos, signed_sin = table.unbind(-2)
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)
