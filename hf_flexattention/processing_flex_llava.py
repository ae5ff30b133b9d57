"""`FlexLlavaProcessor`: a `LlavaProcessor` that also returns the high-res view of each image.

Each image is padded to a square with the processor's mean colour (LLaVA-1.5 "pad"), resized to `zoom` times the
vision tower's input size and normalised: `high_res_pixel_values`. The low-res view (`pixel_values`) is the
bilinear, antialiased downsample of that normalised tensor, as the released FlexAttention checkpoint was trained
with, and the prompt is expanded to the low-res token count only.

Shipped as remote code with saved checkpoints: torch, transformers, PIL and relative imports only.
"""

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoProcessor, LlavaProcessor
from transformers.image_utils import get_image_size, make_flat_list_of_images, to_numpy_array

from .configuration_flex_llava import FlexLlavaConfig
from .processing_checks import check_one_image_per_sample


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Centre `image` on a square canvas of its longest side filled with `fill` (LLaVA's expand2square)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def _square_side(size: dict | None, name: str) -> int | None:
    """The side of a square `size`/`crop_size` dict, None for a `shortest_edge` or absent one."""
    if size is None:
        return None
    size = dict(size)
    if "height" in size or "width" in size:
        if size.get("height") != size.get("width"):
            raise ValueError(
                f"FlexAttention needs a square vision-tower input, got {name}={size}: use equal height and width."
            )
        return size["height"]
    return size.get("shortest_edge")


class FlexLlavaProcessor(LlavaProcessor):
    """Processor for [`FlexLlavaForConditionalGeneration`]: prompts, low-res and high-res pixels, original sizes.

    A [`LlavaProcessor`] in everything but the image step, so it takes the inputs and options the stock one does:
    PIL images, numpy arrays, tensors, paths and URLs; `images_kwargs` / `text_kwargs` or flat keyword options
    (`do_normalize`, `image_mean`, `padding`, `max_length`, ...); chat templates; and it refuses a truncation
    that would cut image tokens.

    Args:
        zoom (`int`, *optional*, defaults to 3):
            High-res side over the vision tower's input side (must match the model's `flex_zoom`).
        The other arguments are those of [`LlavaProcessor`].

    Example:

    ```python
    >>> processor = FlexLlavaProcessor.from_llava_processor(AutoProcessor.from_pretrained("llava-hf/llava-1.5-7b-hf"))
    >>> prompt = "USER: <image>\\nWhat does the sign say? ASSISTANT:"
    >>> inputs = processor(images=image, text=prompt, return_tensors="pt")
    >>> sorted(inputs.keys())
    ['attention_mask', 'high_res_pixel_values', 'input_ids', 'original_image_sizes', 'pixel_values']
    ```
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        patch_size=None,
        vision_feature_select_strategy=None,
        chat_template=None,
        image_token="<image>",
        num_additional_image_tokens=0,
        zoom: int = 3,
        **kwargs,
    ):
        if isinstance(zoom, bool) or not isinstance(zoom, int) or zoom < 1:
            raise ValueError(f"`zoom` must be an int >= 1 (the released model uses 3), got {zoom!r}.")
        self.zoom = zoom
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
    def from_llava_processor(cls, processor: LlavaProcessor, zoom: int = 3) -> "FlexLlavaProcessor":
        """Wrap the image processor, tokenizer and settings of a loaded `LlavaProcessor`."""
        if not isinstance(processor, LlavaProcessor):
            raise TypeError(f"Expected a LlavaProcessor (e.g. from AutoProcessor), got {type(processor).__name__}.")
        if processor.patch_size is None:
            raise ValueError("The LlavaProcessor has no `patch_size`; set it to the vision tower's patch size.")
        return cls(
            image_processor=processor.image_processor,
            tokenizer=processor.tokenizer,
            patch_size=processor.patch_size,
            vision_feature_select_strategy=processor.vision_feature_select_strategy,
            chat_template=processor.chat_template,
            image_token=processor.image_token,
            num_additional_image_tokens=processor.num_additional_image_tokens,
            zoom=zoom,
        )

    @property
    def model_input_names(self) -> list[str]:
        return [*super().model_input_names, "high_res_pixel_values", "original_image_sizes"]

    def low_res_side(self, **images_kwargs) -> int:
        """The vision tower's input side, in pixels: the crop size (as overridden by `images_kwargs`).

        Raises:
            ValueError: for a non-square crop, or a resize `size` that differs from the crop (FlexAttention maps the
                whole padded image onto the high-res canvas, so nothing may be cropped away).
        """
        crop = images_kwargs.get("crop_size") or self.image_processor.crop_size
        size = images_kwargs.get("size") or self.image_processor.size
        crop_side, size_side = _square_side(crop, "crop_size"), _square_side(size, "size")
        if crop_side is not None and size_side is not None and crop_side != size_side:
            raise ValueError(
                f"size={dict(size)} and crop_size={dict(crop)} differ: the stock processor would crop the image, and "
                "FlexAttention needs the whole padded image. Give them the same side."
            )
        side = crop_side if crop_side is not None else size_side
        if side is None:
            raise ValueError("The image processor has neither `crop_size` nor `size`: set the vision tower's side.")
        return side

    @property
    def low_res_size(self) -> int:
        """The vision tower's input side (the image processor's crop size)."""
        return self.low_res_side()

    def _num_image_tokens(self, low_res_side: int) -> int:
        count = (low_res_side // self.patch_size) ** 2 + self.num_additional_image_tokens
        return count - 1 if self.vision_feature_select_strategy == "default" else count

    @property
    def num_image_tokens(self) -> int:
        """Image tokens each `<image>` expands to (the low-res grid, plus the extra tokens of the strategy)."""
        return self._num_image_tokens(self.low_res_size)

    def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs) -> None:
        """`LlavaProcessor`'s checks, plus FlexAttention's one image per sample.

        Raises:
            ValueError: a prompt with more than one `<image>`, or a sample given several images.
        """
        check_one_image_per_sample(images, text, self.image_token)
        super().validate_inputs(images=images, text=text, videos=videos, audio=audio, **kwargs)

    def _process_images(self, images, **kwargs) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Both views of each image, and the prompt text each `<image>` becomes (the low-res tokens only).

        Each image is padded to a square with the image processor's mean colour (LLaVA-1.5 "pad", the image
        processor's own `do_pad`), resized to `zoom` times the vision tower's side and preprocessed with every
        option given (`do_normalize`, `image_mean`, `resample`, ...): `high_res_pixel_values`. The low-res view is
        the bilinear, antialiased downsample of that tensor, as the released FlexAttention checkpoint was trained.

        Returns:
            (`{"pixel_values": (n, 3, S, S), "high_res_pixel_values": (n, 3, zoom * S, zoom * S),
            "original_image_sizes": (n, 2) long (height, width) before padding}`, one replacement string per image).

        Raises:
            ValueError: `do_pad=False` or `do_resize=False` (the high-res geometry needs the padded, resized square).
        """
        for option in ("do_pad", "do_resize"):
            if kwargs.get(option) is False:
                raise ValueError(
                    f"FlexLlavaProcessor cannot honour {option}=False: the high-res tokens are laid out on the whole "
                    "image padded to a square and resized to `zoom` times the vision tower's side. Drop the option."
                )
        flat = make_flat_list_of_images(images)
        channel_dim = kwargs.get("input_data_format")
        sizes = [get_image_size(to_numpy_array(image), channel_dim=channel_dim) for image in flat]
        side = self.low_res_side(**kwargs)
        high_res_side = self.zoom * side
        options = {key: value for key, value in kwargs.items() if key not in ("size", "crop_size", "return_tensors")}
        high_res = self.image_processor(
            flat,
            **options,
            do_pad=True,
            do_resize=True,
            size={"shortest_edge": high_res_side},
            crop_size={"height": high_res_side, "width": high_res_side},
            return_tensors="pt",
        )["pixel_values"]
        low_res = F.interpolate(high_res, size=(side, side), mode="bilinear", antialias=True)
        processed = {
            "pixel_values": low_res,
            "high_res_pixel_values": high_res,
            "original_image_sizes": torch.tensor(sizes, dtype=torch.long).reshape(-1, 2),
        }
        return processed, [self.image_token * self._num_image_tokens(side)] * len(flat)


FlexLlavaProcessor.register_for_auto_class("AutoProcessor")
try:  # with the plugin imported, AutoProcessor loads saved processors without trust_remote_code
    AutoProcessor.register(FlexLlavaConfig, FlexLlavaProcessor)
except ValueError:  # already registered: a re-import
    pass

__all__ = ["FlexLlavaProcessor"]
