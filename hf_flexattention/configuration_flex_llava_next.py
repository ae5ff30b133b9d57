"""`FlexLlavaNextConfig`: a `LlavaNextConfig` that carries the FlexAttention settings.

LLaVA-NeXT's high-res pool is its own any-resolution crops (`image_grid_pinpoints`), so there is no `flex_zoom`.

Shipped as remote code next to saved checkpoints: torch, transformers, the standard library and relative imports.
"""

from huggingface_hub.dataclasses import strict
from transformers import LlavaNextConfig

from .configuration_flex_llava import FlexSettings, FlexSettingsMixin


@strict
class FlexLlavaNextConfig(FlexSettingsMixin, FlexSettings, LlavaNextConfig):
    r"""
    A [`LlavaNextConfig`] with the settings of FlexAttention (Li et al., ECCV 2024). The fields mean what they mean
    in [`FlexLlavaConfig`]; the low-res grid is the base image's (`image_size // patch_size`, 24 on LLaVA-NeXT-7B),
    and the high-res tokens are the unpadded crops of the any-resolution grid.
    """

    model_type = "flex_llava_next"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._resolve_and_validate_flex_settings(zoom=None)


__all__ = ["FlexLlavaNextConfig"]
