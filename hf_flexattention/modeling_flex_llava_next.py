"""`FlexLlavaNextForConditionalGeneration`: LLaVA-NeXT whose any-resolution crops are FlexAttention's high-res pool.

Stock LLaVA-NeXT puts two views of an image into the sequence: the base image (the whole image resized to the
tower's input, `g x g` tokens) and every crop of its any-resolution grid, stitched and unpadded to the image's aspect
ratio (`R x C` tokens), with an image-newline token closing each row: 2,928 tokens for a 672 x 672 image on
LLaVA-NeXT-7B. Here the prompt holds the base tokens only ([`FlexLlavaNextProcessor`]); the crops' features, in their
spatial layout after unpadding, are the high-res pool that the answer rows select from. The same single vision pass
makes both, so nothing is encoded twice.

* Selection. The base image and the unpadded crop grid both cover the whole image, so the released code's rule
  carries over: the answer row's attention over the `g x g` base tokens picks cells of the `s x s` selection grid,
  and each cell is upsampled (nearest) onto the `R x C` crop grid of that image, whatever its crop layout.
* RoPE. High-res keys get the base tokens' cos/sin bicubically interpolated from `g x g` to `R x C`.
* Image-newline tokens mark row ends in the stock sequence and carry no image content; a pool addressed by
  position has no rows to end, so they are left out (the `image_newline` parameter stays, unused).
* Without crops (`pixel_values` holding one patch per image, the base alone) the model is the stock model run on
  the base image alone.

Shipped as remote code with saved checkpoints: torch, transformers, the standard library and relative imports only.
"""

import torch
from transformers import LlavaNextForConditionalGeneration
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
    unpad_image,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_flex_llava_next import FlexLlavaNextConfig
from .high_res import interpolate_rotary, rotary_table
from .modeling_flex import (
    FlexAttentionMixin,
    build_flex_state,
    distinct_images,
    image_placement,
    register_flex_family,
)
from .selection import token_cells
from .state import FlexState


def base_tokens_per_patch(config) -> int:
    """Tokens one patch gives after `vision_feature_select_strategy`: `"default"` drops the first token (CLIP's CLS),
    `"full"` keeps them all (SigLIP has no CLS token)."""
    grid = config.vision_config.image_size // config.vision_config.patch_size
    has_cls = not config.vision_config.model_type.startswith("siglip")
    return grid * grid + int(has_cls) - int(config.vision_feature_select_strategy == "default")


def check_servable(config) -> None:
    """Raise a ValueError naming what works if FlexAttention cannot serve this LLaVA-NeXT / OneVision config.

    The base image must be exactly the `g x g` tokens the selection map is read from: `"default"` on a tower with a
    CLS token (CLIP: LLaVA-NeXT), `"full"` on one without (SigLIP: LLaVA-OneVision); any other pairing is off by one
    (stock LLaVA-NeXT does not even run CLIP with `"full"`). Every `image_grid_pinpoints` entry must be whole crops
    of the tower's input, or the crop grid would not tile the pool.
    """
    if not hasattr(config, "image_grid_pinpoints") or not hasattr(config, "vision_config"):
        raise ValueError(
            f"FlexAttention's any-resolution models cannot be built from a {type(config).__name__}: they need a "
            "LlavaNextConfig or LlavaOnevisionConfig. Load such a checkpoint, or patch a loaded model."
        )
    grid = config.vision_config.image_size // config.vision_config.patch_size
    strategy = config.vision_feature_select_strategy
    if strategy not in ("default", "full") or base_tokens_per_patch(config) != grid * grid:
        working = "full" if config.vision_config.model_type.startswith("siglip") else "default"
        raise ValueError(
            f"vision_feature_select_strategy={strategy!r} on a {config.vision_config.model_type} tower does not give "
            f"the base image's {grid}x{grid} tokens that FlexAttention reads its selection from: use "
            f"vision_feature_select_strategy={working!r} (as the released checkpoints do)."
        )
    side = config.vision_config.image_size
    bad = [pair for pair in config.image_grid_pinpoints if any(int(value) % side for value in pair)]
    if bad:
        raise ValueError(
            f"image_grid_pinpoints {bad} are not multiples of the vision tower's {side} px input: the any-resolution "
            f"crops would not tile the high-res pool. Use pinpoints made of whole {side} px crops."
        )


class AnyResolutionFlexMixin(FlexAttentionMixin):
    """FlexAttention for the any-resolution families (LLaVA-NeXT, LLaVA-OneVision): the base image in the prompt,
    the crops as the high-res pool (module docstring). Listed before the stock class in a model's bases."""

    flex_processor_name: str  # the processor whose prompts the family's model takes (named in error messages)

    def _supports_mm_encoder_outputs(self) -> bool:
        """False: `generate` would otherwise encode `pixel_values` before the prefill and drop `image_sizes`, and the
        crops must become the pool, not image tokens. The forward encodes them, once."""
        return False

    def _encode_patches(self, patches: torch.Tensor, vision_feature_layer: int | list[int]) -> torch.Tensor:
        """`(k, 3, S, S)` patches -> `(k, g*g, D)` projected features (stock `get_image_features` before packing)."""
        outputs = self.model.vision_tower(patches, output_hidden_states=True, return_dict=True)
        if isinstance(vision_feature_layer, int):
            hidden = outputs.hidden_states[vision_feature_layer]
        else:
            hidden = torch.cat([outputs.hidden_states[index] for index in vision_feature_layer], dim=-1)
        if self.config.vision_feature_select_strategy == "default":  # the CLS token is dropped
            hidden = hidden[:, 1:]
        return self.model.multi_modal_projector(hidden)

    def _shrink_crop_grid(self, grid: torch.Tensor) -> torch.Tensor:
        """The unpadded `(D, R, C)` crop grid as the stock model puts it in its sequence (LLaVA-NeXT: unchanged)."""
        return grid

    def encode_images(
        self, pixel_values: torch.Tensor, image_sizes: torch.Tensor, vision_feature_layer: int | list[int]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Encode base images and crops in one vision pass.

        Args:
            pixel_values: `(n, patches, 3, S, S)`, base first (stock LLaVA-NeXT layout, zero patches padding the
                batch); `patches == 1` withholds the crops.
            image_sizes: `(n, 2)` original (height, width).

        Returns:
            `base (n, g*g, D)` and, per image, its crop features `(R, C, D)` after unpadding (stock
            `pack_image_features` without the newline tokens; `(0, 0, D)` when the crops are withheld).
        """
        config, side = self.config, self.config.vision_config.image_size
        grid = config.low_res_grid
        pinpoints = config.image_grid_pinpoints
        sizes = image_sizes.tolist()
        if pixel_values.shape[1] == 1:
            counts = [1] * len(sizes)
        else:
            counts = [image_size_to_num_patches(size, pinpoints, side) for size in sizes]
            if max(counts) > pixel_values.shape[1]:
                raise ValueError(
                    f"`pixel_values` holds {pixel_values.shape[1]} patches per image, but `image_sizes` "
                    f"{sizes[counts.index(max(counts))]} needs {max(counts)} (the base and its crops): pass the image "
                    "processor's output unchanged, or one patch per image (the base alone) to withhold the crops."
                )
        patches = torch.cat([images[:count] for images, count in zip(pixel_values, counts, strict=True)])
        features = self._encode_patches(patches.to(self.model.vision_tower.dtype), vision_feature_layer)
        per_image = features.split(counts)
        crops = []
        for image, size in zip(per_image, sizes, strict=True):
            dim = image.shape[-1]
            if image.shape[0] == 1:
                crops.append(image.new_zeros(0, 0, dim))
                continue
            rows, cols = get_anyres_image_grid_shape(size, pinpoints, side)
            stitched = image[1:].view(rows, cols, grid, grid, dim).permute(4, 0, 2, 1, 3)
            unpadded = unpad_image(stitched.reshape(dim, rows * grid, cols * grid), size)
            crops.append(self._shrink_crop_grid(unpadded).permute(1, 2, 0))
        return torch.stack([image[0] for image in per_image]), crops

    def _check_inputs(
        self, image_mask: torch.Tensor, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None
    ) -> torch.Tensor:
        """Check the images against the prompt; return the `(batch,)` image index of each sequence (-1: none)."""
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 5:
            raise ValueError(
                "`pixel_values` must be a (n_images, patches, 3, H, W) tensor, as the LLaVA-NeXT image processor "
                f"returns with return_tensors='pt'; got {getattr(pixel_values, 'shape', type(pixel_values))}."
            )
        n_images = pixel_values.shape[0]
        if not isinstance(image_sizes, torch.Tensor) or tuple(image_sizes.shape) != (n_images, 2):
            raise ValueError(
                f"`image_sizes` must be a ({n_images}, 2) tensor of each image's (height, width), as the processor "
                f"returns; got {getattr(image_sizes, 'shape', image_sizes)}."
            )
        return self._sequence_images(
            image_mask,
            n_images,
            "pixel_values",
            f"Build prompts with {self.flex_processor_name}, which expands <image> to the base image's tokens only "
            f"(the stock {self.flex_processor_name.removeprefix('Flex')} also counts the crops).",
        )

    def _build_state(
        self,
        sample_image: torch.Tensor,
        image_rows: torch.Tensor,
        image_positions: torch.Tensor,
        rotary_positions: torch.Tensor,
        crops: list[torch.Tensor],
    ) -> FlexState | None:
        """Lay the crops out as the high-res pool of each sequence (prefill; host syncs allowed).

        Args:
            sample_image: `(batch,)` index into `crops` of each sequence's image (-1: none).
            image_rows, image_positions: where the images sit (`modeling_flex.image_placement`).
            rotary_positions: `(n, g*g)` the RoPE positions of each distinct image's base tokens.
            crops: per distinct image, its `(R, C, D)` crop features (`encode_images`).
        """
        if all(crop.shape[0] == 0 for crop in crops):
            return None
        device = sample_image.device
        cos, sin = self.model.language_model.rotary_emb(crops[0].float(), position_ids=rotary_positions)

        text_dtype = self.model.language_model.dtype
        grid, selection_grid = self.config.low_res_grid, self.config.resolved_selection_grid
        longest = max(crop.shape[0] * crop.shape[1] for crop in crops)
        features = crops[0].new_zeros(len(crops), longest, crops[0].shape[-1], dtype=text_dtype)
        rotary = features.new_zeros(len(crops), longest, 2, cos.shape[-1])
        token_cell = torch.zeros(len(crops), longest, dtype=torch.long, device=device)
        token_valid = torch.zeros(len(crops), longest, dtype=torch.bool, device=device)
        for index, crop in enumerate(crops):
            shape = tuple(crop.shape[:2])
            tokens = shape[0] * shape[1]
            if tokens == 0:
                continue
            features[index, :tokens] = crop.flatten(0, 1).to(text_dtype)
            table = rotary_table(
                interpolate_rotary(cos[index : index + 1], shape), interpolate_rotary(sin[index : index + 1], shape)
            )
            rotary[index, :tokens] = table[0].to(text_dtype)
            token_cell[index, :tokens] = token_cells(selection_grid, shape, device)
            token_valid[index, :tokens] = True

        return build_flex_state(
            sample_image,
            image_rows,
            image_positions,
            features=features,
            rotary=rotary,
            token_cell=token_cell,
            token_valid=token_valid,
            grid=grid,
            selection_grid=selection_grid,
            dtype=text_dtype,
        )

    def _prepare_any_resolution_call(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        pixel_values: torch.Tensor | None,
        image_sizes: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        cache: Cache | None,
        vision_feature_layer: int | list[int] | None,
        vision_feature_select_strategy: str | None,
        labels: torch.Tensor | None,
        mm_encoder_outputs: dict | None,
        flex_answer_start: int | None,
        flex_trace: list | None,
        kwargs: dict,
    ) -> tuple[dict | None, Cache | None]:
        """Check the inputs, encode the images (base features for the prompt, crops for the pool) and set up this
        call's FlexAttention view in `kwargs`; returns the `mm_encoder_outputs` and cache to run the stock forward
        with."""
        if vision_feature_select_strategy not in (None, self.config.vision_feature_select_strategy):
            raise ValueError(
                f"vision_feature_select_strategy={vision_feature_select_strategy!r} is not supported by FlexAttention "
                f"here: leave it None (the config's {self.config.vision_feature_select_strategy!r})."
            )
        self._check_flex_arguments(input_ids, inputs_embeds, labels, flex_answer_start)
        build_state = None
        if pixel_values is not None and pixel_values.shape[0] == 0:
            pixel_values = None  # a batch of text-only prompts
        if pixel_values is not None:
            if mm_encoder_outputs is not None:
                raise ValueError("Pass either `pixel_values` or `mm_encoder_outputs`, not both.")
            image_mask = self._image_token_mask(input_ids, inputs_embeds)
            sample_image = self._check_inputs(image_mask, pixel_values, image_sizes)
            image_rows, placement, rotary_positions = image_placement(image_mask, sample_image, position_ids)
            # Beams and returned sequences repeat each sample: encode and keep each (image, placement) once.
            distinct, image_index = distinct_images(pixel_values, image_sizes, placement, rotary_positions)
            layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
            base, crops = self.encode_images(pixel_values[distinct], image_sizes[distinct], layer)
            mm_encoder_outputs = {"image": BaseModelOutputWithPooling(pooler_output=list(base[image_index]))}
            sequence_image = torch.where(sample_image >= 0, image_index[sample_image.clamp(min=0)], -1)
            image_rotary_positions = rotary_positions[distinct]

            def build_state() -> FlexState | None:
                return self._build_state(sequence_image, image_rows, placement, image_rotary_positions, crops)

        use_cache = kwargs.get("use_cache", self.config.text_config.use_cache)
        flex_call, cache = self._prepare_flex_call(
            input_ids, inputs_embeds, attention_mask, cache, labels, flex_answer_start, use_cache, build_state
        )
        if flex_call is not None:
            flex_call.trace = flex_trace
            kwargs["flex_call"] = flex_call
        return mm_encoder_outputs, cache


class FlexLlavaNextForConditionalGeneration(AnyResolutionFlexMixin, LlavaNextForConditionalGeneration):
    """A [`LlavaNextForConditionalGeneration`] with FlexAttention in its top `config.flex_n_fa` decoder layers.

    The prompt holds the base image's `g x g` tokens; the any-resolution crops are the high-res pool (module
    docstring). Inputs are the stock processor's `pixel_values` `(n_images, patches, 3, S, S)` (base first, then the
    crops) and `image_sizes` `(n_images, 2)`, with the text expanded by [`FlexLlavaNextProcessor`].
    """

    config_class = FlexLlavaNextConfig
    flex_processor_name = "FlexLlavaNextProcessor"

    @classmethod
    def check_config(cls, config) -> None:
        """`check_servable`."""
        check_servable(config)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict | None = None,
        flex_answer_start: int | None = None,
        flex_trace: list | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ):
        r"""
        The stock LLaVA-NeXT forward, with the base image's tokens in the prompt and the crops as the high-res pool:

        pixel_values (`torch.Tensor` of shape `(n_images, patches, 3, S, S)`):
            The stock image processor's patches, base first. One patch per image withholds the crops (the stock
            model on the base image alone).
        flex_answer_start (`int`, *optional*), flex_trace (`list`, *optional*):
            As in [`FlexLlavaForConditionalGeneration.forward`].
        """
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


register_flex_family(FlexLlavaNextConfig, FlexLlavaNextForConditionalGeneration, "llava_next")

__all__ = ["FlexLlavaNextForConditionalGeneration"]
