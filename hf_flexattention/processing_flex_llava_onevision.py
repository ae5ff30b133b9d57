"""`FlexLlavaOnevisionProcessor`: a `LlavaOnevisionProcessor` whose prompt holds the base image's tokens only.

With FlexAttention, a LLaVA-OneVision model keeps the base (whole-image) features in the sequence and moves the
any-resolution crops' features into the high-res pool. So the image step is the stock one (`pixel_values` keep the
base patch and every crop, `image_sizes` the original sizes and `batch_num_images` the images per sample, which give
the model the crop grid), and only the text expansion differs: each `<image>` becomes the base patch's g*g tokens,
g = vision `image_size // patch_size` (27 * 27 = 729 on LLaVA-OneVision-7B: SigLIP 384/14, `"full"` features, no
CLS token), instead of the stock g*g + the unpadded (and `anyres_max_N`-downsampled) crop tokens and their newlines.

One image per sample and no videos. The processor is built without a video processor, so it also works without
torchvision (transformers' OneVision video processor needs it, and `LlavaOnevisionProcessor.__init__` fails on the
lookup of its class even when given `video_processor=None`).

Shipped as remote code with saved checkpoints: torch, transformers, PIL and relative imports only.
"""

import math

from transformers import AutoProcessor, LlavaOnevisionProcessor

from .configuration_flex_llava_onevision import FlexLlavaOnevisionConfig
from .processing_checks import check_one_image_per_sample


class FlexLlavaOnevisionProcessor(LlavaOnevisionProcessor):
    """Processor for a FlexAttention LLaVA-OneVision model: stock pixels and sizes, a base-image-only prompt.

    A [`LlavaOnevisionProcessor`] in everything but the number of tokens each `<image>` expands to, and the missing
    video processor: the base image's `num_image_tokens` = g*g features. `pixel_values`
    (n_images, max_patches, 3, S, S), `image_sizes` (n_images, 2) (height, width) and `batch_num_images`
    (n_samples,) are exactly the stock ones, so the model still sees every crop; it puts them in the high-res pool
    rather than in the sequence.

    Args:
        image_processor: a LLaVA-OneVision image processor (e.g. `LlavaOnevisionImageProcessorPil`).
        tokenizer: the language model's tokenizer; it must know `image_token` (and `video_token`, for the stock
            `video_token_id`).
        num_image_tokens (`int`): g*g, the vision tower's features per patch (729 on LLaVA-OneVision).
        vision_feature_select_strategy (`str`, defaults to `"full"`): the only strategy a LLaVA-OneVision model
            runs (its SigLIP tower has no CLS token, and the model requires g*g base features).
        chat_template, image_token, video_token, vision_aspect_ratio: as for [`LlavaOnevisionProcessor`] (the
            model, not the prompt, uses `vision_aspect_ratio` now; it is kept so that save/load round-trips it).

    Raises:
        ValueError: `num_image_tokens` is not a positive square int, or another `vision_feature_select_strategy`.

    Example:

    ```python
    >>> stock = AutoProcessor.from_pretrained("llava-hf/llava-onevision-qwen2-7b-ov-hf")  # needs torchvision
    >>> processor = FlexLlavaOnevisionProcessor.from_llava_onevision_processor(stock)
    >>> prompt = "<|im_start|>user <image>\\nWhat is shown?<|im_end|><|im_start|>assistant\\n"
    >>> inputs = processor(images=image, text=prompt, return_tensors="pt")
    >>> int((inputs["input_ids"] == processor.image_token_id).sum())  # 27 * 27, whatever the image's size
    729
    ```
    """

    # No `video_processor` parameter: the processor's attributes come from this signature, so none is looked up
    # (a lookup that fails without torchvision) and none is saved. Every scalar setting is named so that
    # `save_pretrained` writes it (it saves the `__init__` parameters only).
    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens: int | None = None,
        vision_feature_select_strategy: str | None = "full",
        chat_template: str | None = None,
        image_token: str = "<image>",
        video_token: str = "<video>",
        vision_aspect_ratio: str = "anyres_max_9",
        **kwargs,
    ):
        if (
            isinstance(num_image_tokens, bool)
            or not isinstance(num_image_tokens, int)
            or num_image_tokens < 1
            or math.isqrt(num_image_tokens) ** 2 != num_image_tokens
        ):
            raise ValueError(
                f"`num_image_tokens` must be g*g, the vision tower's features per patch (a positive square int, "
                f"27 * 27 = 729 on LLaVA-OneVision), got {num_image_tokens!r}."
            )
        if vision_feature_select_strategy != "full":
            raise ValueError(
                f"FlexLlavaOnevisionProcessor supports vision_feature_select_strategy='full' only, got "
                f"{vision_feature_select_strategy!r}: LLaVA-OneVision's SigLIP tower has no CLS token, and the model "
                "needs g*g base features per image. Use 'full' (as the model's config does)."
            )
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            num_image_tokens=num_image_tokens,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template,
            image_token=image_token,
            video_token=video_token,
            vision_aspect_ratio=vision_aspect_ratio,
            **kwargs,
        )

    @classmethod
    def from_llava_onevision_processor(cls, processor: LlavaOnevisionProcessor) -> "FlexLlavaOnevisionProcessor":
        """Wrap the image processor, tokenizer and settings of a loaded `LlavaOnevisionProcessor` (its video
        processor, if any, is dropped: no videos with FlexAttention).

        Raises:
            TypeError: `processor` is not a `LlavaOnevisionProcessor`.
            ValueError: it has no `num_image_tokens`, or settings a LLaVA-OneVision model cannot run (see the class).
        """
        if not isinstance(processor, LlavaOnevisionProcessor):
            raise TypeError(
                f"Expected a LlavaOnevisionProcessor (e.g. from AutoProcessor), got {type(processor).__name__}."
            )
        if processor.num_image_tokens is None:
            raise ValueError(
                "The LlavaOnevisionProcessor has no `num_image_tokens`; set it to g*g, the vision tower's features "
                "per patch (729 on LLaVA-OneVision)."
            )
        return cls(
            image_processor=processor.image_processor,
            tokenizer=processor.tokenizer,
            num_image_tokens=processor.num_image_tokens,
            vision_feature_select_strategy=processor.vision_feature_select_strategy,
            chat_template=processor.chat_template,
            image_token=processor.image_token,
            video_token=processor.video_token,
            vision_aspect_ratio=processor.vision_aspect_ratio,
        )

    def _get_number_of_features(self, orig_height: int, orig_width: int, height: int, width: int) -> int:
        """Features of the base patch: `num_image_tokens` (g*g), so a single image's `<image>` becomes g*g tokens.

        The one seam of both the prompt expansion (`replace_image_token`, single-image samples) and
        `_get_num_multimodal_tokens`; the original size no longer matters, since the crops (and their unpadding,
        `anyres_max_N` downsampling and newlines) stay out of the prompt. The stock multi-image branch of
        `replace_image_token` is never reached: `validate_inputs` refuses several images per sample.
        """
        return self.num_image_tokens

    def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs) -> None:
        """`LlavaOnevisionProcessor`'s checks, plus one image per sample and no videos.

        Raises:
            ValueError: videos, a prompt with more than one `<image>`, or a sample given several images.
        """
        if videos is not None:
            raise ValueError(
                "FlexLlavaOnevisionProcessor takes no videos (FlexAttention's high-res pool holds one image's crops): "
                "pass single frames as separate samples' `images`, or use the stock LlavaOnevisionProcessor with the "
                "unpatched model for videos."
            )
        check_one_image_per_sample(images, text, self.image_token)
        super().validate_inputs(images=images, text=text, videos=videos, audio=audio, **kwargs)


FlexLlavaOnevisionProcessor.register_for_auto_class("AutoProcessor")
try:  # with the plugin imported, AutoProcessor loads saved processors without trust_remote_code
    AutoProcessor.register(FlexLlavaOnevisionConfig, FlexLlavaOnevisionProcessor)
except ValueError:  # already registered: a re-import
    pass

__all__ = ["FlexLlavaOnevisionProcessor"]
