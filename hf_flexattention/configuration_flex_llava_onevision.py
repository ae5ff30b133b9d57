"""`FlexLlavaOnevisionConfig`: a `LlavaOnevisionConfig` that carries the FlexAttention settings.

As for LLaVA-NeXT, the high-res pool is the model's own any-resolution crops, so there is no `flex_zoom`.

Shipped as remote code next to saved checkpoints: torch, transformers, the standard library and relative imports.
"""

from huggingface_hub.dataclasses import strict
from transformers import LlavaOnevisionConfig

from .configuration_flex_llava import FlexSettings, FlexSettingsMixin


@strict
class FlexLlavaOnevisionConfig(FlexSettingsMixin, FlexSettings, LlavaOnevisionConfig):
    r"""
    A [`LlavaOnevisionConfig`] with the settings of FlexAttention (Li et al., ECCV 2024). The fields mean what they
    mean in [`FlexLlavaConfig`]; the low-res grid is the base image's (`image_size // patch_size`, 27 on
    LLaVA-OneVision-7B), and the high-res tokens are the unpadded crops, shrunk as `vision_aspect_ratio` says.
    """

    model_type = "flex_llava_onevision"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._resolve_and_validate_flex_settings(zoom=None)


__all__ = ["FlexLlavaOnevisionConfig"]
