"""`FlexLlavaOnevisionForConditionalGeneration`: LLaVA-OneVision whose any-resolution crops are the high-res pool.

The same design as LLaVA-NeXT (`modeling_flex_llava_next.py`): the prompt holds the base image's `g x g` tokens
(729 on OneVision-7B: SigLIP at 384 px, patch 14, all tokens kept), and the crops, stitched and unpadded, are the
pool. OneVision then shrinks a crop grid that exceeds `anyres_max_N` (about `1.1**2 * N * g * g` tokens) by
bilinear interpolation before it enters the stock sequence; the pool is that shrunk grid, the features the
checkpoint was trained on (81 x 81 = 6,561 crop tokens for a 1536 x 1536 image instead of 108 x 108).

Supported: single-image prompts. Videos (`pixel_values_videos`) and multi-image samples (`batch_num_images > 1`,
which stock OneVision encodes without crops) are refused.

Shipped as remote code with saved checkpoints: torch, transformers, the standard library and relative imports only.
"""

import math
import re

import torch
import torch.nn.functional as F
from transformers import LlavaOnevisionForConditionalGeneration
from transformers.cache_utils import Cache
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_flex_llava_onevision import FlexLlavaOnevisionConfig
from .modeling_flex import register_flex_family
from .modeling_flex_llava_next import AnyResolutionFlexMixin, check_servable


def max_crops(vision_aspect_ratio: str) -> int:
    """`N` of OneVision's `"anyres_max_N"`: the crop budget above which a crop grid is shrunk.

    Raises:
        ValueError: for any other form (the message names the one that works).
    """
    match = re.fullmatch(r"anyres_max_(\d+)", str(vision_aspect_ratio))
    if match is None or int(match.group(1)) < 1:
        raise ValueError(
            f"vision_aspect_ratio={vision_aspect_ratio!r} is not supported: FlexAttention on LLaVA-OneVision needs "
            "'anyres_max_N' with N >= 1 (the released checkpoints use 'anyres_max_9')."
        )
    return int(match.group(1))


class FlexLlavaOnevisionForConditionalGeneration(AnyResolutionFlexMixin, LlavaOnevisionForConditionalGeneration):
    """A [`LlavaOnevisionForConditionalGeneration`] with FlexAttention in its top `config.flex_n_fa` decoder layers.

    The prompt holds the base image's `g x g` tokens ([`FlexLlavaOnevisionProcessor`]); the crops, unpadded and
    shrunk as the stock model shrinks them, are the high-res pool. Single-image prompts only.
    """

    config_class = FlexLlavaOnevisionConfig
    flex_processor_name = "FlexLlavaOnevisionProcessor"

    @classmethod
    def check_config(cls, config) -> None:
        """`check_servable`, and a `vision_aspect_ratio` of the form `anyres_max_N` (`max_crops`)."""
        check_servable(config)
        max_crops(config.vision_aspect_ratio)

    def _shrink_crop_grid(self, grid: torch.Tensor) -> torch.Tensor:
        """Stock `pack_image_features`' shrinking of a large `(D, R, C)` crop grid: when `R * C` exceeds the
        `anyres_max_N` budget by a ratio above 1.1 (in side length), bilinear down to `R // ratio x C // ratio`."""
        side = self.config.low_res_grid
        _, height, width = grid.shape
        ratio = math.sqrt(height * width / (max_crops(self.config.vision_aspect_ratio) * side**2))
        if ratio <= 1.1:
            return grid
        return F.interpolate(grid[None], [int(height // ratio), int(width // ratio)], mode="bilinear")[0]

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        image_sizes_videos: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        vision_aspect_ratio: str | None = None,
        batch_num_images: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict | None = None,
        flex_answer_start: int | None = None,
        flex_trace: list | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ):
        r"""
        The stock LLaVA-OneVision forward, with the base image's tokens in the prompt and the crops as the high-res
        pool (single images; `pixel_values_videos` and multi-image samples are refused).

        flex_answer_start (`int`, *optional*), flex_trace (`list`, *optional*):
            As in [`FlexLlavaForConditionalGeneration.forward`].
        """
        if pixel_values_videos is not None or image_sizes_videos is not None:
            raise ValueError(
                "FlexAttention on LLaVA-OneVision serves single images, not videos: pass `pixel_values` of one image "
                "per sample, or unpatch the model (`hf_flexattention.unpatch_model`) for video prompts."
            )
        # `generate` passes `batch_num_images` to every decode step too (it is not among the multimodal inputs it
        # drops after the prefill); checked with the images only, so a decode step reads no device value.
        if pixel_values is not None and batch_num_images is not None and bool((batch_num_images > 1).any()):
            raise ValueError(
                f"FlexAttention serves one image per sample; got batch_num_images={batch_num_images.tolist()}. Split "
                "multi-image samples (stock OneVision encodes them without crops, so there is no high-res pool)."
            )
        if vision_aspect_ratio not in (None, self.config.vision_aspect_ratio):
            raise ValueError(
                f"vision_aspect_ratio={vision_aspect_ratio!r} differs from the config's "
                f"{self.config.vision_aspect_ratio!r}: leave it None."
            )
        if use_cache is not None:
            kwargs["use_cache"] = use_cache
        mm_encoder_outputs, cache = self._prepare_any_resolution_call(
            input_ids,
            inputs_embeds,
            pixel_values,
            image_sizes,
            attention_mask,
            position_ids,
            cache,
            vision_feature_layer,
            vision_feature_select_strategy,
            labels,
            mm_encoder_outputs,
            flex_answer_start,
            flex_trace,
            kwargs,
        )
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            labels=labels,
            logits_to_keep=logits_to_keep,
            mm_encoder_outputs=mm_encoder_outputs,
            **kwargs,
        )


register_flex_family(FlexLlavaOnevisionConfig, FlexLlavaOnevisionForConditionalGeneration, "llava_onevision")

__all__ = ["FlexLlavaOnevisionForConditionalGeneration"]
