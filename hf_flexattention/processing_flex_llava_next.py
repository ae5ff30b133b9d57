"""`FlexLlavaNextProcessor`: a `LlavaNextProcessor` whose prompt holds the base image's tokens only.

With FlexAttention, a LLaVA-NeXT model keeps the base (whole-image) features in the sequence and moves the
any-resolution crops' features into the high-res pool. So the image step is the stock one (`pixel_values` keep the
base patch and every crop, `image_sizes` the original sizes, which give the model the crop grid), and only the text
expansion differs: each `<image>` becomes g*g tokens, g = vision `image_size // patch_size` (576 on LLaVA-NeXT-7B),
instead of the stock g*g + rows * (cols + 1) of base, unpadded crops and newlines.

Shipped as remote code with saved checkpoints: torch, transformers, PIL and relative imports only.
"""

from transformers import AutoProcessor, LlavaNextProcessor

from .configuration_flex_llava_next import FlexLlavaNextConfig
from .processing_checks import check_one_image_per_sample


class FlexLlavaNextProcessor(LlavaNextProcessor):
    """Processor for a FlexAttention LLaVA-NeXT model: stock pixels and sizes, a base-image-only prompt.

    A [`LlavaNextProcessor`] in everything but the number of tokens each `<image>` expands to: the base image's
    g*g features (`vision_feature_select_strategy="default"` drops the CLIP tower's CLS token), g = the processed
    side (`size["shortest_edge"]`, the vision tower's `image_size`) over `patch_size`. `pixel_values`
    (n_images, max_patches, 3, S, S) and `image_sizes` (n_images, 2) (height, width) are exactly the stock ones, so
    the model still sees every crop; it puts them in the high-res pool rather than in the sequence.

    One image per sample, and no videos (LLaVA-NeXT takes none).

    Args:
        The arguments of [`LlavaNextProcessor`], with `vision_feature_select_strategy="default"` and
        `num_additional_image_tokens=1` (a CLIP tower's CLS token), the only settings a LLaVA-NeXT model can run.

    Raises:
        ValueError: another `vision_feature_select_strategy` or `num_additional_image_tokens`, or no positive int
            `patch_size`.

    Example:

    ```python
    >>> stock = AutoProcessor.from_pretrained("llava-hf/llava-v1.6-mistral-7b-hf")
    >>> processor = FlexLlavaNextProcessor.from_llava_next_processor(stock)
    >>> inputs = processor(images=image, text="[INST] <image>\\nWhat is shown? [/INST]", return_tensors="pt")
    >>> int((inputs["input_ids"] == processor.image_token_id).sum())  # 24 * 24, whatever the image's size
    576
    ```
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        patch_size: int | None = None,
        vision_feature_select_strategy: str | None = "default",
        chat_template: str | None = None,
        image_token: str = "<image>",
        num_additional_image_tokens: int = 1,
        **kwargs,
    ):
        if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
            raise ValueError(
                f"`patch_size` must be the vision tower's patch size (a positive int, 14 on LLaVA-NeXT), got "
                f"{patch_size!r}."
            )
        if vision_feature_select_strategy != "default":
            raise ValueError(
                f"FlexLlavaNextProcessor supports vision_feature_select_strategy='default' only, got "
                f"{vision_feature_select_strategy!r}: LLaVA-NeXT's crop grid needs g*g features per patch, which a "
                "CLIP tower gives only with its CLS token dropped. Use 'default' (as the model's config does)."
            )
        if num_additional_image_tokens != 1:
            raise ValueError(
                f"num_additional_image_tokens={num_additional_image_tokens!r}: with the 'default' strategy a "
                "LLaVA-NeXT model needs a tower with exactly one extra (CLS) token, so that each patch gives g*g "
                "features. Use num_additional_image_tokens=1."
            )
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=patch_size,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template,
            image_token=image_token,
            num_additional_image_tokens=num_additional_image_tokens,
            **kwargs,
        )

    @classmethod
    def from_llava_next_processor(cls, processor: LlavaNextProcessor) -> "FlexLlavaNextProcessor":
        """Wrap the image processor, tokenizer and settings of a loaded `LlavaNextProcessor`.

        Raises:
            TypeError: `processor` is not a `LlavaNextProcessor`.
            ValueError: it has no `patch_size`, or settings a LLaVA-NeXT model cannot run (see the class).
        """
        if not isinstance(processor, LlavaNextProcessor):
            raise TypeError(
                f"Expected a LlavaNextProcessor (e.g. from AutoProcessor), got {type(processor).__name__}."
            )
        if processor.patch_size is None:
            raise ValueError("The LlavaNextProcessor has no `patch_size`; set it to the vision tower's patch size.")
        return cls(
            image_processor=processor.image_processor,
            tokenizer=processor.tokenizer,
            patch_size=processor.patch_size,
            vision_feature_select_strategy=processor.vision_feature_select_strategy,
            chat_template=processor.chat_template,
            image_token=processor.image_token,
            num_additional_image_tokens=processor.num_additional_image_tokens,
        )

    def _get_number_of_features(self, orig_height: int, orig_width: int, height: int, width: int) -> int:
        """Features of the base patch (processed `height` x `width` pixels): (height / P) * (width / P) + the extra
        tokens; the caller subtracts the CLS for "default", so an `<image>` becomes g*g tokens.

        The one seam of both the prompt expansion (`replace_image_token`) and `_get_num_multimodal_tokens`; the
        original size no longer matters, since the crops (and their unpadding and newlines) stay out of the prompt.
        """
        return (height // self.patch_size) * (width // self.patch_size) + self.num_additional_image_tokens

    def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs) -> None:
        """`LlavaNextProcessor`'s checks, plus one image per sample and no videos.

        Raises:
            ValueError: videos, a prompt with more than one `<image>`, or a sample given several images.
        """
        if videos is not None:
            raise ValueError("LLaVA-NeXT takes no videos: pass frames as separate samples' `images`.")
        check_one_image_per_sample(images, text, self.image_token)
        super().validate_inputs(images=images, text=text, videos=videos, audio=audio, **kwargs)


FlexLlavaNextProcessor.register_for_auto_class("AutoProcessor")
try:  # with the plugin imported, AutoProcessor loads saved processors without trust_remote_code
    AutoProcessor.register(FlexLlavaNextConfig, FlexLlavaNextProcessor)
except ValueError:  # already registered: a re-import
    pass

__all__ = ["FlexLlavaNextProcessor"]
