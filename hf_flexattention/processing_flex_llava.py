"""`FlexLlavaProcessor`: a `LlavaProcessor` that also returns the high-res view of each image.

Each image is padded to a square with the processor's mean colour (LLaVA-1.5 "pad"), resized to `zoom` times the
vision tower's input size and normalised: `high_res_pixel_values`. The low-res view (`pixel_values`) is the
bilinear, antialiased downsample of that normalised tensor, as the released FlexAttention checkpoint was trained
with, and the prompt is expanded to the low-res token count only.

Shipped as remote code with saved checkpoints: torch, transformers, PIL and relative imports only.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoProcessor, LlavaProcessor
from transformers.feature_extraction_utils import BatchFeature

from .configuration_flex_llava import FlexLlavaConfig


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Centre `image` on a square canvas of its longest side filled with `fill` (LLaVA's expand2square)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def _flatten_images(images) -> list[Image.Image]:
    if images is None:
        return []
    if isinstance(images, Image.Image):
        return [images]
    flat = []
    for item in images:
        if isinstance(item, Image.Image):
            flat.append(item)
        elif isinstance(item, Sequence) and not isinstance(item, str):
            if len(item) > 1:
                raise ValueError(
                    f"A sample has {len(item)} images, but FlexAttention supports one image per sample: split it."
                )
            flat.extend(_flatten_images(item))
        else:
            raise TypeError(f"Images must be PIL images, got {type(item).__name__}; open files with PIL.Image.open.")
    return flat


class FlexLlavaProcessor(LlavaProcessor):
    """Processor for [`FlexLlavaForConditionalGeneration`]: prompts, low-res and high-res pixels, original sizes.

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
    def low_res_size(self) -> int:
        """The vision tower's input side (the image processor's crop size)."""
        crop = self.image_processor.crop_size
        return crop["height"] if crop is not None else self.image_processor.size["shortest_edge"]

    @property
    def num_image_tokens(self) -> int:
        """Image tokens each `<image>` expands to (the low-res grid, plus the extra tokens of the strategy)."""
        count = (self.low_res_size // self.patch_size) ** 2 + self.num_additional_image_tokens
        return count - 1 if self.vision_feature_select_strategy == "default" else count

    def _pixel_values(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        mean = self.image_processor.image_mean
        fill = tuple(int(channel * 255) for channel in mean)
        sizes, padded = [], []
        for image in images:
            image = image.convert("RGB")
            sizes.append((image.height, image.width))
            padded.append(pad_to_square(image, fill))
        high_res_side = self.zoom * self.low_res_size
        high_res = self.image_processor(
            padded,
            size={"shortest_edge": high_res_side},
            crop_size={"height": high_res_side, "width": high_res_side},
            return_tensors="pt",
        )["pixel_values"]
        low_res = F.interpolate(high_res, size=(self.low_res_size,) * 2, mode="bilinear", antialias=True)
        return {
            "pixel_values": low_res,
            "high_res_pixel_values": high_res,
            "original_image_sizes": torch.tensor(sizes, dtype=torch.long),
        }

    def __call__(self, images=None, text=None, **kwargs) -> BatchFeature:
        """Tokenise `text` (one `<image>` per image, at most one per sample) and preprocess `images`.

        Args:
            images: a PIL image, or a list of them (or of one-image lists) in the order of the prompts' `<image>`
                placeholders; text-only prompts take none. Any mode and size: each image is padded to a square with
                the image processor's mean colour, as LLaVA-1.5 does.
            text: a prompt or a list of prompts; `<image>` expands to the vision tower's `N` low-res tokens.
            **kwargs: tokenizer arguments (`padding`, `return_tensors`, ...).

        Returns:
            A `BatchFeature` with `input_ids` and `attention_mask` `(batch, length)` and, when there are images,
            `pixel_values` `(n_images, 3, S, S)` (the low-res view, `S` the vision tower's input size, 336 for
            LLaVA-1.5), `high_res_pixel_values` `(n_images, 3, zoom * S, zoom * S)` and `original_image_sizes`
            `(n_images, 2)` long, each image's (height, width) in pixels before padding.

        Raises:
            ValueError: without `text`, with more than one `<image>` in a prompt (or images in one sample), or when
                the placeholders and the images do not pair up.
            TypeError: for images that are not PIL images (open files with `PIL.Image.open`).
        """
        if text is None:
            raise ValueError("FlexLlavaProcessor needs `text` with one `<image>` placeholder per image.")
        texts = [text] if isinstance(text, str) else list(text)
        flat_images = _flatten_images(images)
        per_sample = [sample.count(self.image_token) for sample in texts]
        if any(count > 1 for count in per_sample):
            raise ValueError(
                f"Each prompt may hold at most one {self.image_token!r} (one image per sample), got {per_sample}."
            )
        if sum(per_sample) != len(flat_images):
            raise ValueError(
                f"The prompts hold {sum(per_sample)} {self.image_token!r} placeholders but {len(flat_images)} "
                "images were given: pass exactly one image per placeholder, in order."
            )
        return_tensors = kwargs.pop("return_tensors", None)
        expanded = [sample.replace(self.image_token, self.image_token * self.num_image_tokens) for sample in texts]
        data = dict(self.tokenizer(expanded, return_tensors=return_tensors, **kwargs))
        if flat_images:
            data.update(self._pixel_values(flat_images))
        return BatchFeature(data=data, tensor_type=return_tensors)


FlexLlavaProcessor.register_for_auto_class("AutoProcessor")
try:  # with the plugin imported, AutoProcessor loads saved processors without trust_remote_code
    AutoProcessor.register(FlexLlavaConfig, FlexLlavaProcessor)
except ValueError:  # already registered: a re-import
    pass

__all__ = ["FlexLlavaProcessor"]
