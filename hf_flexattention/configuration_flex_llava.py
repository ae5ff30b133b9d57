"""`FlexLlavaConfig`: a `LlavaConfig` that carries the FlexAttention settings.

This file is shipped as remote code next to saved checkpoints, so it imports only torch, transformers, the
standard library and sibling files (relatively).
"""

import dataclasses
import math
from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import LlavaConfig

from .selection import budget_cells


SELECTION_MODES = ("threshold", "topk", "random")
SUPPORTED_BASE_ATTENTION = ("sdpa", "eager")

# The released checkpoint pools a 24x24 low-res attention map to 9x9 cells; other grids keep that ratio.
RELEASED_SELECTION_GRID_RATIO = 9 / 24
# The released checkpoint keeps the first 9 decoder layers plain (32 layers, 23 FlexAttention layers).
RELEASED_PLAIN_LAYERS = 9


def released_n_fa(num_layers: int) -> int:
    """The released model's share of FlexAttention layers (23 of 32), for a language model of `num_layers` layers:
    at least 1 and at most `num_layers - 1`."""
    return min(num_layers - 1, max(1, round(num_layers * 23 / 32)))


def default_selection_grid(low_res_grid: int) -> int:
    """The selection grid the released model uses (9 for a 24x24 low-res grid), scaled to `low_res_grid`."""
    return max(1, round(low_res_grid * RELEASED_SELECTION_GRID_RATIO))


def validate_flex_settings(
    *,
    num_layers: int,
    n_fa: int,
    threshold: float,
    zoom: int | None,
    selection: str,
    selection_grid: int | None,
    low_res_grid: int,
    topk_ratio: float,
    random_p: float,
    high_res_ramp: float,
    random_seed: int = 0,
) -> None:
    """Raise a `ValueError`/`TypeError` naming the fix for any FlexAttention setting that cannot work (`zoom=None`:
    a family whose high-res pool is not a zoomed image, e.g. LLaVA-NeXT's crops)."""
    if isinstance(n_fa, bool) or not isinstance(n_fa, int):
        raise TypeError(
            f"`n_fa` must be an int (number of FlexAttention layers at the top), got {type(n_fa).__name__}."
        )
    if not 0 <= n_fa <= num_layers - 1:
        raise ValueError(
            f"`n_fa={n_fa}` is out of range for a language model with {num_layers} decoder layers: use "
            f"0 <= n_fa <= {num_layers - 1} (the first selection is taken from the layer below the first "
            "FlexAttention "
            f"layer, so at least one layer stays plain; the released LLaVA-1.5-7B model uses n_fa=23 of 32)."
        )
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"`threshold` must be a float in [0, 1), got {type(threshold).__name__}.")
    if not 0.0 <= threshold < 1.0:
        hint = (
            f" The official code's `threshold:{threshold:g}` is on a 0-255 scale: pass {threshold:g}/255."
            if (1.0 <= threshold <= 255.0 and float(threshold).is_integer())
            else ""
        )
        raise ValueError(f"`threshold={threshold}` must lie in [0, 1) (normalised attention is compared to it).{hint}")
    if zoom is not None and (isinstance(zoom, bool) or not isinstance(zoom, int)):
        raise TypeError(f"`zoom` must be an int (high-res side / low-res side), got {type(zoom).__name__}.")
    if zoom is not None and zoom < 1:
        raise ValueError(f"`zoom={zoom}` must be >= 1 (the released model uses zoom=3: 1008 px over a 336 px tower).")
    if selection not in SELECTION_MODES:
        raise ValueError(f"`selection={selection!r}` is not supported: use one of {SELECTION_MODES}.")
    if selection_grid is not None:
        if isinstance(selection_grid, bool) or not isinstance(selection_grid, int):
            raise TypeError(f"`selection_grid` must be an int or None, got {type(selection_grid).__name__}.")
        if not 1 <= selection_grid <= low_res_grid:
            raise ValueError(
                f"`selection_grid={selection_grid}` must lie in [1, {low_res_grid}] (the low-res token grid side); "
                f"leave it None for the released ratio ({default_selection_grid(low_res_grid)} here)."
            )
    if selection == "topk":
        budget_cells(topk_ratio, selection_grid or default_selection_grid(low_res_grid))  # raises if it keeps no cell
    elif isinstance(topk_ratio, bool) or not isinstance(topk_ratio, (int, float)) or not 0.0 < topk_ratio <= 1.0:
        raise ValueError(f"`topk_ratio={topk_ratio!r}` must lie in (0, 1] (fraction of high-res tokens kept).")
    if not _is_number(random_p):
        raise TypeError(f"`random_p` must be a float in [0, 1], got {type(random_p).__name__}.")
    if not 0.0 <= random_p <= 1.0:
        raise ValueError(f"`random_p={random_p}` must lie in [0, 1] (probability that a cell is selected).")
    if isinstance(random_seed, bool) or not isinstance(random_seed, int):
        raise TypeError(f"`random_seed` must be an int, got {type(random_seed).__name__}.")
    if not _is_number(high_res_ramp):
        raise TypeError(f"`high_res_ramp` must be a number >= 0, got {type(high_res_ramp).__name__}.")
    if not (math.isfinite(high_res_ramp) and high_res_ramp >= 0):
        raise ValueError(
            f"`high_res_ramp={high_res_ramp}` must be a finite number >= 0 (alpha = min(1, epoch * high_res_ramp); "
            "the release uses 10)."
        )


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclasses.dataclass
class FlexSettings:
    """The `flex_*` fields every FlexAttention config class has (documented in [`FlexLlavaConfig`]); a config class
    lists this after `FlexSettingsMixin` and before its stock config class."""

    flex_n_fa: int | None = None
    flex_threshold: float = 48 / 255
    flex_selection: Literal["threshold", "topk", "random"] = "threshold"
    flex_selection_grid: int | None = None
    flex_topk_ratio: float = 0.1
    flex_random_p: float = 0.1
    flex_random_seed: int = 0
    flex_high_res_ramp: float = 10.0


class FlexSettingsMixin:
    """Properties derived from the `flex_*` fields, for every FlexAttention config class."""

    @property
    def low_res_grid(self) -> int:
        """Side of the low-res image-token grid (24 for CLIP-L/14 at 336 px)."""
        return self.vision_config.image_size // self.vision_config.patch_size

    @property
    def resolved_selection_grid(self) -> int:
        """`flex_selection_grid`, or the released ratio's default when it is None."""
        if self.flex_selection_grid is not None:
            return self.flex_selection_grid
        return default_selection_grid(self.low_res_grid)

    @property
    def topk_cells(self) -> int:
        """Cells of the selection grid the `"topk"` budget keeps per row (`selection.budget_cells`)."""
        return budget_cells(self.flex_topk_ratio, self.resolved_selection_grid)

    @property
    def first_flex_layer(self) -> int:
        """Index of the first hierarchical layer (`num_layers` when `flex_n_fa == 0`)."""
        return self.text_config.num_hidden_layers - self.flex_n_fa

    def _resolve_and_validate_flex_settings(self, zoom: int | None) -> None:
        if self.flex_n_fa is None:
            self.flex_n_fa = max(0, self.text_config.num_hidden_layers - RELEASED_PLAIN_LAYERS)
        validate_flex_settings(
            num_layers=self.text_config.num_hidden_layers,
            n_fa=self.flex_n_fa,
            threshold=self.flex_threshold,
            zoom=zoom,
            selection=self.flex_selection,
            selection_grid=self.flex_selection_grid,
            low_res_grid=self.low_res_grid,
            topk_ratio=self.flex_topk_ratio,
            random_p=self.flex_random_p,
            high_res_ramp=self.flex_high_res_ramp,
            random_seed=self.flex_random_seed,
        )


@strict
class FlexLlavaConfig(FlexSettingsMixin, FlexSettings, LlavaConfig):
    r"""
    A [`LlavaConfig`] with the settings of FlexAttention (Li et al., ECCV 2024).

    Args:
        flex_n_fa (`int`, *optional*):
            Number of FlexAttention (hierarchical) layers at the top of the language model. `0` means patched but
            inert. Defaults to the released model's rule: every layer but the first 9.
        flex_threshold (`float`, *optional*, defaults to 48/255):
            Cells of the min-max normalised attention map strictly above this value are selected.
        flex_zoom (`int`, *optional*, defaults to 3):
            High-res image side over the vision tower's input side (1008 / 336).
        flex_selection (`str`, *optional*, defaults to `"threshold"`):
            `"threshold"` (the paper), `"topk"` (a fixed budget of cells) or `"random"` (the paper's ablation).
        flex_selection_grid (`int`, *optional*):
            Side of the grid the selection is max-pooled to. Defaults to 3/8 of the low-res grid (9 for 24).
        flex_topk_ratio (`float`, *optional*, defaults to 0.1):
            Fraction of the high-res tokens `"topk"` keeps per row, in whole cells of the selection grid:
            `round(flex_topk_ratio * s**2)` cells (8 of 81, 9.9% of the tokens, for LLaVA-1.5 at 0.1).
        flex_random_p (`float`, *optional*, defaults to 0.1):
            Probability that a selection cell is kept by `"random"`.
        flex_random_seed (`int`, *optional*, defaults to 0):
            Seed of `"random"` selection: a row's cells are a hash of (seed, layer, position), so cached and
            cache-less generation draw alike.
        flex_high_res_ramp (`float`, *optional*, defaults to 10.0):
            Training ramp of the high-res blend: `alpha = min(1, epoch * flex_high_res_ramp)` (the official code's
            `warmup`; configs saved with a `flex_warmup` field load it here).
    """

    model_type = "flex_llava"

    flex_zoom: int = 3

    def __post_init__(self, **kwargs):
        legacy_ramp = kwargs.pop("flex_warmup", None)  # the field's name in configs saved before 0.2
        if legacy_ramp is not None:
            self.flex_high_res_ramp = float(legacy_ramp)
        super().__post_init__(**kwargs)
        self._resolve_and_validate_flex_settings(zoom=self.flex_zoom)

    @property
    def high_res_grid(self) -> int:
        """Side of the high-res token grid (72 for zoom 3)."""
        return self.flex_zoom * self.low_res_grid


__all__ = ["FlexLlavaConfig"]
