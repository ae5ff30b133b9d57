"""`FlexLlavaForConditionalGeneration`: a Llava model whose upper decoder layers use FlexAttention.

Shipped as remote code with saved checkpoints (`trust_remote_code=True` loads it without the plugin installed), so
it imports only torch, transformers, the standard library and sibling files (relatively). Importing it registers
the config and model with the Auto classes, the attention functions, and the llava checkpoint conversion mapping.
"""

import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoModelForMultimodalLM,
    AutoModelForPreTraining,
    LlavaForConditionalGeneration,
)
from transformers.cache_utils import Cache
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, logging
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_flex_llava import FlexLlavaConfig
from .high_res import encode_high_res_features, interpolate_rotary, rotary_table
from .modeling_flex import (
    FlexAttentionMixin,
    build_flex_state,
    distinct_images,
    image_placement,
    register_flex_family,
)
from .selection import inside_image, token_cells
from .state import FlexState


logger = logging.get_logger(__name__)


def _is_llava_config(config) -> bool:
    return hasattr(config, "vision_config") and hasattr(config, "text_config")


def _unservable_config(config) -> ValueError:
    return ValueError(
        f"FlexLlavaForConditionalGeneration cannot be built from a {type(config).__name__}: it needs a Llava config "
        "(a `vision_config` and a `text_config`). Load a Llava checkpoint (`llava` or `flex_llava`), or patch a "
        "loaded LlavaForConditionalGeneration with `patch_model`."
    )


class FlexLlavaForConditionalGeneration(FlexAttentionMixin, LlavaForConditionalGeneration):
    """A [`LlavaForConditionalGeneration`] with FlexAttention in its top `config.flex_n_fa` decoder layers.

    The image enters the language model as low-resolution tokens only (`pixel_values`, as in stock Llava). The
    high-resolution image (`high_res_pixel_values`) is encoded tile by tile into a grid of features that never
    enters the sequence; in FlexAttention layers, the rows that predict answer tokens also attend to the
    high-res tokens that their attention in the layer below selected.

    Example:

    ```python
    >>> from hf_flexattention import FlexLlavaProcessor, patch_model
    >>> model = patch_model(LlavaForConditionalGeneration.from_pretrained("llava-hf/llava-1.5-7b-hf"), n_fa=23)
    >>> processor = FlexLlavaProcessor.from_llava_processor(AutoProcessor.from_pretrained("llava-hf/llava-1.5-7b-hf"))
    >>> inputs = processor(images=image, text="USER: <image>\\nWhat is written here? ASSISTANT:", return_tensors="pt")
    >>> model.generate(**inputs, max_new_tokens=20)
    ```
    """

    config_class = FlexLlavaConfig

    @classmethod
    def check_config(cls, config) -> None:
        """A ValueError unless `config` is a Llava config (a `vision_config` and a `text_config`)."""
        if not _is_llava_config(config):
            raise _unservable_config(config)

    def encode_high_res(
        self,
        high_res_pixel_values: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
    ) -> torch.Tensor:
        """Encode `(n, 3, zoom*S, zoom*S)` images into `(n, (zoom*g)**2, D)` high-res features (no gradient)."""
        tile_size = self.config.vision_config.image_size
        layer = vision_feature_layer if vision_feature_layer is not None else self.config.vision_feature_layer
        strategy = vision_feature_select_strategy or self.config.vision_feature_select_strategy

        def encode_tiles(tiles: torch.Tensor) -> torch.Tensor:
            outputs = self.model.get_image_features(
                pixel_values=tiles.to(self.dtype),
                vision_feature_layer=layer,
                vision_feature_select_strategy=strategy,
                return_dict=True,
            )
            return torch.stack(list(outputs.pooler_output))

        with torch.no_grad():
            return encode_high_res_features(encode_tiles, high_res_pixel_values, tile_size)

    def _check_input_types(
        self, pixel_values, high_res_pixel_values, original_image_sizes, mm_encoder_outputs
    ) -> None:
        """Type checks of the FlexAttention inputs, and the pairing of `pixel_values` with `high_res_pixel_values`."""
        if high_res_pixel_values is not None and not isinstance(high_res_pixel_values, torch.Tensor):
            raise TypeError(
                "`high_res_pixel_values` must be a (n_images, 3, H, W) torch.Tensor, as FlexLlavaProcessor returns "
                f"with return_tensors='pt'; got {type(high_res_pixel_values).__name__}."
            )
        if original_image_sizes is not None and (
            not isinstance(original_image_sizes, torch.Tensor) or original_image_sizes.is_floating_point()
        ):
            raise TypeError(
                "`original_image_sizes` must be an integer (n_images, 2) torch.Tensor of (height, width), as "
                f"FlexLlavaProcessor returns; got {type(original_image_sizes).__name__}."
            )
        if high_res_pixel_values is not None and pixel_values is None and mm_encoder_outputs is None:
            raise ValueError(
                "`high_res_pixel_values` was given without `pixel_values`: the image tokens would hold no image. Pass "
                "both, as FlexLlavaProcessor returns them (`model(**processor(images=..., text=...))`)."
            )
        if pixel_values is not None and high_res_pixel_values is None and self.config.flex_n_fa > 0:
            logger.warning_once(
                "This FlexAttention model got `pixel_values` without `high_res_pixel_values`, so it runs as the stock "
                "low-res model. Preprocess with FlexLlavaProcessor (`hf_flexattention.loading.load_flex_processor`, "
                "or `FlexLlavaProcessor.from_llava_processor(processor)`) to use the high-res image."
            )

    def _validate_high_res_inputs(
        self, image_mask: torch.Tensor, high_res_pixel_values: torch.Tensor, original_image_sizes
    ) -> torch.Tensor:
        """Check the high-res inputs against the prompt; return the `(batch,)` image index of each sequence."""
        if high_res_pixel_values.ndim != 4:
            raise ValueError(
                "`high_res_pixel_values` must be a (n_images, 3, H, W) tensor, as returned by FlexLlavaProcessor; got "
                f"shape {tuple(high_res_pixel_values.shape)}."
            )
        expected = self.config.flex_zoom * self.config.vision_config.image_size
        if tuple(high_res_pixel_values.shape[-2:]) != (expected, expected):
            raise ValueError(
                f"`high_res_pixel_values` has size {tuple(high_res_pixel_values.shape[-2:])}, but flex_zoom="
                f"{self.config.flex_zoom} times the vision tower's {self.config.vision_config.image_size} px is "
                f"{expected}: preprocess with FlexLlavaProcessor (same zoom) or re-patch with a matching zoom."
            )
        n_images = high_res_pixel_values.shape[0]
        sample_image = self._sequence_images(
            image_mask,
            n_images,
            "high_res_pixel_values",
            "FlexAttention supports one image per sample: split multi-image samples.",
        )
        if original_image_sizes is not None and tuple(original_image_sizes.shape) != (n_images, 2):
            raise ValueError(
                f"`original_image_sizes` must have shape ({n_images}, 2) of (height, width), got "
                f"{tuple(original_image_sizes.shape)}."
            )
        return sample_image

    def _build_state(
        self,
        image_mask: torch.Tensor,
        position_ids: torch.Tensor | None,
        high_res_pixel_values: torch.Tensor,
        original_image_sizes: torch.Tensor | None,
        vision_feature_layer,
        vision_feature_select_strategy,
    ) -> FlexState | None:
        """Encode the high-res images and lay out everything the decode steps need (prefill; host syncs allowed)."""
        sample_image = self._validate_high_res_inputs(image_mask, high_res_pixel_values, original_image_sizes)
        if high_res_pixel_values.shape[0] == 0:
            return None
        config, device = self.config, image_mask.device
        image_rows, image_positions, rotary_positions = image_placement(image_mask, sample_image, position_ids)

        distinct, distinct_index = distinct_images(
            high_res_pixel_values, image_positions, rotary_positions, original_image_sizes
        )
        sample_image = torch.where(sample_image >= 0, distinct_index[sample_image.clamp(min=0)], -1)

        features = self.encode_high_res(
            high_res_pixel_values[distinct], vision_feature_layer, vision_feature_select_strategy
        )
        cos, sin = self.model.language_model.rotary_emb(features[:1].float(), position_ids=rotary_positions[distinct])
        high_res_grid = config.high_res_grid
        rotary = rotary_table(interpolate_rotary(cos, high_res_grid), interpolate_rotary(sin, high_res_grid))

        grid = config.low_res_grid
        image_inside = None
        if original_image_sizes is not None:
            image_inside = inside_image(original_image_sizes.to(device), grid).float()
        return build_flex_state(
            sample_image,
            image_rows,
            image_positions,
            features=features,
            rotary=rotary,
            token_cell=token_cells(config.resolved_selection_grid, config.high_res_grid, device),
            image_inside=image_inside,
            grid=grid,
            selection_grid=config.resolved_selection_grid,
            # The language model may run in another dtype than the vision tower that made the features.
            dtype=self.model.language_model.dtype,
        )

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        image_sizes: torch.Tensor | None = None,
        mm_encoder_outputs: dict | None = None,
        high_res_pixel_values: torch.Tensor | None = None,
        original_image_sizes: torch.Tensor | None = None,
        flex_answer_start: int | None = None,
        flex_trace: list | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ):
        r"""
        The stock Llava forward, plus:

        high_res_pixel_values (`torch.Tensor` of shape `(n_images, 3, zoom * S, zoom * S)`, *optional*, `S` the
            vision tower's input size, 336 for LLaVA-1.5):
            The square-padded high-res image of each sample that has an image, in batch order (from
            [`FlexLlavaProcessor`]). Only needed at prefill; generate drops it at decode steps.
        original_image_sizes (`torch.LongTensor` of shape `(n_images, 2)`, *optional*):
            (height, width) of each image before padding, so the padding margin is never selected.
        flex_answer_start (`int`, *optional*):
            Sequence index of the first answer token: every row that predicts a token at or after it attends to
            high-res tokens. `generate` sets it to the prompt length. Without it (and without `labels`), only the
            last row does; with `labels`, every row that predicts a supervised token does.
        flex_trace (`list`, *optional*):
            If given, receives `(layer_index, selected token count per high-res row)` for each FlexAttention layer;
            a [`~tracing.FlexTrace`] also keeps each row's low-res attention map and selected mask. `generate`
            passes it to every forward call (prefill and decode steps).
        """
        self._check_flex_arguments(input_ids, inputs_embeds, labels, flex_answer_start)
        self._check_input_types(pixel_values, high_res_pixel_values, original_image_sizes, mm_encoder_outputs)
        use_cache = kwargs.get("use_cache", self.config.text_config.use_cache)
        build_state = None
        if high_res_pixel_values is not None:

            def build_state() -> FlexState | None:
                return self._build_state(
                    self._image_token_mask(input_ids, inputs_embeds),
                    position_ids,
                    high_res_pixel_values,
                    original_image_sizes,
                    vision_feature_layer,
                    vision_feature_select_strategy,
                )

        flex_call, cache = self._prepare_flex_call(
            input_ids, inputs_embeds, attention_mask, cache, labels, flex_answer_start, use_cache, build_state
        )
        if flex_call is not None:
            flex_call.trace = flex_trace
            kwargs["flex_call"] = flex_call
        return super().forward(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            labels=labels,
            logits_to_keep=logits_to_keep,
            image_sizes=image_sizes,
            mm_encoder_outputs=mm_encoder_outputs,
            **kwargs,
        )


# Every Auto class that maps `llava` to LlavaForConditionalGeneration. (Not AutoModel: its `llava` entry is the bare
# LlavaModel, which would load a FlexAttention checkpoint as a stock model without a word.)
register_flex_family(
    FlexLlavaConfig,
    FlexLlavaForConditionalGeneration,
    "llava",
    (AutoModelForImageTextToText, AutoModelForMultimodalLM, AutoModelForPreTraining),
)

__all__ = ["FlexLlavaForConditionalGeneration"]
