"""`FlexLlavaForConditionalGeneration`: a Llava model whose upper decoder layers use FlexAttention.

Shipped as remote code with saved checkpoints (`trust_remote_code=True` loads it without the plugin installed), so
it imports only torch, transformers, the standard library and sibling files (relatively). Importing it registers
the config and model with the Auto classes, the attention functions, and the llava checkpoint conversion mapping.
"""

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoModelForMultimodalLM,
    AutoModelForPreTraining,
    LlavaForConditionalGeneration,
)
from transformers.cache_utils import Cache, DynamicCache
from transformers.conversion_mapping import (
    get_checkpoint_conversion_mapping,
    register_checkpoint_conversion_mapping,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, logging
from transformers.utils.deprecation import deprecate_kwarg

from .attention import (
    FlexAttentionConfig,
    base_implementation_name,
    register_flex_attention,
)
from .configuration_flex_llava import SUPPORTED_BASE_ATTENTION, FlexLlavaConfig
from .high_res import encode_high_res_features, interpolate_rotary, rotary_table
from .quantization import high_res_projection
from .selection import inside_image, pool_cells, pooling_windows, token_cells
from .state import CACHE_ATTRIBUTE, FlexCall, FlexState, attach_state, pack_true_indices


logger = logging.get_logger(__name__)

IGNORE_INDEX = -100
HIGH_RES_PROJECTIONS = {"hr_k_proj": "k_proj", "hr_v_proj": "v_proj"}


def _is_llava_config(config) -> bool:
    return hasattr(config, "vision_config") and hasattr(config, "text_config")


def _unservable_config(config) -> ValueError:
    return ValueError(
        f"FlexLlavaForConditionalGeneration cannot be built from a {type(config).__name__}: it needs a Llava config "
        "(a `vision_config` and a `text_config`). Load a Llava checkpoint (`llava` or `flex_llava`), or patch a "
        "loaded LlavaForConditionalGeneration with `patch_model`."
    )


def text_decoder_layers(model: LlavaForConditionalGeneration) -> nn.ModuleList:
    """The decoder layers of a Llava model's language model."""
    return model.model.language_model.layers


def sync_high_res_projections(model: LlavaForConditionalGeneration, n_fa: int) -> None:
    """Give exactly the top `n_fa` layers `hr_k_proj` / `hr_v_proj`, new ones as copies of `k_proj` / `v_proj`
    (dequantised into the language model's dtype when those are bitsandbytes 4-bit/8-bit layers; see
    `quantization.high_res_projection`)."""
    layers = text_decoder_layers(model)
    first_flex_layer = len(layers) - n_fa
    text_dtype = None
    for index, layer in enumerate(layers):
        attention = layer.self_attn
        for name, source in HIGH_RES_PROJECTIONS.items():
            if index < first_flex_layer:
                if hasattr(attention, name):
                    delattr(attention, name)
            elif not hasattr(attention, name):
                text_dtype = text_dtype or model.model.language_model.dtype
                setattr(attention, name, high_res_projection(getattr(attention, source), dtype=text_dtype))


def install_flex_attention(model: LlavaForConditionalGeneration) -> None:
    """Route the language model's attention through FlexAttention, keeping its `sdpa`/`eager` implementation.

    Each decoder layer's attention module gets a `FlexAttentionConfig` view of the language model's config, whose
    `_attn_implementation` names the FlexAttention wrapper; the configs themselves keep reporting `sdpa`/`eager`.

    Raises:
        ValueError: for another implementation (flash attention, flex_attention, ...), naming the supported ones.
    """
    text_config = model.config.text_config
    current = text_config._attn_implementation or "sdpa"
    base = base_implementation_name(current)
    if base not in SUPPORTED_BASE_ATTENTION:
        raise ValueError(
            f"FlexAttention cannot serve the language model's attn_implementation={current!r}: it supports "
            f"{SUPPORTED_BASE_ATTENTION}. Load the model with attn_implementation='sdpa' (or call "
            "`model.set_attn_implementation({'text_config': 'sdpa'})`) before patching."
        )
    if current != base:  # a config from an earlier plugin version that stored the wrapper's name
        text_config._attn_implementation_internal = base
    for layer in text_decoder_layers(model):
        attention = layer.self_attn
        if not isinstance(attention.config, FlexAttentionConfig) or attention.config.text_config is not text_config:
            attention.config = FlexAttentionConfig(text_config)


def uninstall_flex_attention(model: LlavaForConditionalGeneration) -> None:
    """Give the attention modules their language model's config back (undoes `install_flex_attention`; also the
    view installed by another copy of this file, as remote code loads one)."""
    text_config = model.config.text_config
    for layer in text_decoder_layers(model):
        layer.self_attn.config = text_config


class FlexLlavaForConditionalGeneration(LlavaForConditionalGeneration):
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

    def __init__(self, config: FlexLlavaConfig):
        if not _is_llava_config(config):
            raise _unservable_config(config)
        super().__init__(config)
        sync_high_res_projections(self, config.flex_n_fa)
        install_flex_attention(self)

    @classmethod
    def is_custom_code(cls) -> bool:
        """False: weights are initialised by transformers' own Llava/CLIP `_init_weights` (which respects what was
        loaded), so missing weights get the stock scheme. transformers would otherwise treat this class (registered
        for remote code) as custom code, and skip e.g. CLIP's attention init for weights missing from a checkpoint."""
        return False

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """Load like any transformers model; from a stock Llava checkpoint the hr projections copy k/v.

        Raises:
            ValueError: for a checkpoint whose config is not a Llava config (this class cannot serve it).
        """
        output_loading_info = kwargs.pop("output_loading_info", False)
        model, loading_info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        missing = set(loading_info.get("missing_keys", ()))
        copied = model._copy_missing_high_res_projections(missing)
        if copied:
            loading_info["missing_keys"] = type(loading_info["missing_keys"])(
                key for key in loading_info["missing_keys"] if key not in copied
            )
            logger.info(f"Initialised {len(copied)} high-res projection tensors from k_proj/v_proj.")
        return (model, loading_info) if output_loading_info else model

    def _copy_missing_high_res_projections(self, missing_keys: set[str]) -> set[str]:
        """Copy `k_proj`/`v_proj` into hr projections the checkpoint did not contain; return the keys that now hold
        loaded weights (an hr projection whose source was missing too stays missing: nothing real was copied)."""
        copied = set()
        prefix = "model.language_model.layers"
        for index, layer in enumerate(text_decoder_layers(self)):
            for name, source in HIGH_RES_PROJECTIONS.items():
                projection = getattr(layer.self_attn, name, None)
                if projection is None:
                    continue
                keys = {f"{prefix}.{index}.self_attn.{name}.{p}" for p, _ in projection.named_parameters()}
                if keys & missing_keys:
                    original = getattr(layer.self_attn, source)
                    with torch.no_grad():
                        projection.load_state_dict(original.state_dict())
                    source_keys = {f"{prefix}.{index}.self_attn.{source}.{p}" for p, _ in original.named_parameters()}
                    if not source_keys & missing_keys:
                        copied |= keys
        return copied

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, plus a FlexAttention model card (`README.md`) if the folder has none.

        Under FSDP2 the model's class is a subclass made on the fly (`FSDPFlexLlavaForConditionalGeneration`, defined
        in torch); saved as it is, the checkpoint's `architectures` and remote code would name that class and ship
        torch's files. It is saved as this class instead (pass the gathered `state_dict`, as Trainer does).
        """
        wrapper_class = type(self)
        if torch.distributed.is_available():
            from torch.distributed.fsdp import FSDPModule

            if isinstance(self, FSDPModule):  # fully_shard made `type(name, (FSDPModule, cls), {})`
                self.__class__ = next(cls for cls in wrapper_class.__bases__ if not issubclass(cls, FSDPModule))
        try:
            super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self.__class__ = wrapper_class
        if kwargs.get("push_to_hub"):
            return  # transformers has uploaded the folder already, with its own card
        try:  # the card writer is plugin code, never shipped as remote code: without the plugin, save as stock
            from hf_flexattention.hub import write_model_card
        except ImportError:
            return
        write_model_card(self, save_directory, overwrite=False)

    def push_to_hub(self, repo_id: str, *args, **kwargs):
        """`PreTrainedModel.push_to_hub`, with a FlexAttention model card when the plugin is installed."""
        try:
            from hf_flexattention.hub import push_to_hub
        except ImportError:  # remote code without the plugin: transformers' push and card
            return super().push_to_hub(repo_id, *args, **kwargs)
        if args:
            raise TypeError("Pass push_to_hub's options by keyword (e.g. `private=True`).")
        return push_to_hub(self, repo_id, **kwargs)

    @property
    def is_gradient_checkpointing(self) -> bool:
        """`is_activation_checkpointing` under its old name, without transformers' deprecation warning: PEFT 0.21 reads
        it in every `get_peft_model`, and users cannot act on that warning."""
        return self.is_activation_checkpointing

    def set_attn_implementation(self, attn_implementation: str | dict, allow_all_kernels: bool = False):
        """Set the attention implementation; the language model keeps FlexAttention around `sdpa`/`eager`."""
        super().set_attn_implementation(attn_implementation, allow_all_kernels=allow_all_kernels)
        install_flex_attention(self)

    def generate(self, inputs: torch.Tensor | None = None, *args, **kwargs):
        """[`GenerationMixin.generate`], marking where the answer starts so cache-less decoding matches."""
        if kwargs.get("flex_answer_start") is None:
            prompt = inputs if inputs is not None else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
            if prompt is not None:
                kwargs["flex_answer_start"] = prompt.shape[1]
        return super().generate(inputs, *args, **kwargs)

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

    def _image_token_mask(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        """`(batch, length)` bool: where the image tokens are; in `inputs_embeds`, the rows equal to the image token's
        embedding (how stock Llava's `get_placeholder_mask` finds them)."""
        if input_ids is not None:
            return input_ids == self.config.image_token_id
        image_token = torch.full((), self.config.image_token_id, dtype=torch.long, device=inputs_embeds.device)
        return (inputs_embeds == self.get_input_embeddings()(image_token)).all(-1)

    def _check_input_types(
        self, pixel_values, high_res_pixel_values, original_image_sizes, flex_answer_start, mm_encoder_outputs
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
        if flex_answer_start is not None and (
            isinstance(flex_answer_start, bool) or not isinstance(flex_answer_start, int)
        ):
            raise TypeError(f"`flex_answer_start` must be an int (a sequence index), got {flex_answer_start!r}.")
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
        tokens_per_image = self.config.low_res_grid**2
        image_tokens = image_mask.sum(dim=1)
        if bool(((image_tokens != 0) & (image_tokens != tokens_per_image)).any()):
            raise ValueError(
                f"Each sequence must hold 0 or exactly {tokens_per_image} image tokens (one image per sample), got "
                f"{image_tokens.tolist()}. FlexAttention supports one image per sample: split multi-image samples."
            )
        has_image = image_tokens > 0
        n_images = int(has_image.sum())
        if high_res_pixel_values.shape[0] != n_images:
            raise ValueError(
                f"`high_res_pixel_values` holds {high_res_pixel_values.shape[0]} images but the prompts hold "
                f"{n_images}: pass one high-res image per sample that has an image, in batch order."
            )
        if original_image_sizes is not None and tuple(original_image_sizes.shape) != (n_images, 2):
            raise ValueError(
                f"`original_image_sizes` must have shape ({n_images}, 2) of (height, width), got "
                f"{tuple(original_image_sizes.shape)}."
            )
        return torch.where(has_image, has_image.long().cumsum(0) - 1, -1)

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
        config = self.config
        batch, device = image_mask.shape[0], image_mask.device
        image_rows = (sample_image >= 0).nonzero().squeeze(1)
        image_positions = image_mask[image_rows].nonzero()[:, 1].view(len(image_rows), -1)
        if position_ids is None:
            position_ids = torch.arange(image_mask.shape[1], device=device)[None]
        rotary_positions = position_ids.expand(batch, -1)[image_rows].gather(1, image_positions)

        # generate repeats each sample for every beam / returned sequence: keep one copy of each (image, position).
        same_as_previous = (
            (high_res_pixel_values[1:] == high_res_pixel_values[:-1]).flatten(1).all(dim=1)
            & (image_positions[1:] == image_positions[:-1]).all(dim=1)
            & (rotary_positions[1:] == rotary_positions[:-1]).all(dim=1)
        )
        if original_image_sizes is not None:
            same_as_previous &= (original_image_sizes[1:] == original_image_sizes[:-1]).all(dim=1)
        distinct = torch.cat([same_as_previous.new_ones(1), ~same_as_previous])
        distinct_index = distinct.long().cumsum(0) - 1
        sample_image = torch.where(sample_image >= 0, distinct_index[sample_image.clamp(min=0)], -1)

        features = self.encode_high_res(
            high_res_pixel_values[distinct], vision_feature_layer, vision_feature_select_strategy
        )
        cos, sin = self.model.language_model.rotary_emb(features[:1].float(), position_ids=rotary_positions[distinct])
        high_res_grid = config.high_res_grid
        rotary = rotary_table(interpolate_rotary(cos, high_res_grid), interpolate_rotary(sin, high_res_grid))

        # Per sequence: where its image tokens are, and which cells lie inside its image (none for text-only rows).
        grid, selection_grid = config.low_res_grid, config.resolved_selection_grid
        positions = torch.zeros(batch, grid * grid, dtype=torch.long, device=device)
        positions[image_rows] = image_positions
        inside = torch.zeros(batch, grid * grid, device=device)
        if original_image_sizes is None:
            inside[image_rows] = 1.0
        else:
            inside[image_rows] = inside_image(original_image_sizes.to(device), grid).float()
        windows = pooling_windows(grid, selection_grid, device)
        cell_inside = (pool_cells(inside, windows) > 0)[:, None, None]
        # The language model may run in another dtype than the vision tower that made the features.
        text_dtype = self.model.language_model.dtype
        return FlexState(
            features=features.to(text_dtype),
            rotary=rotary.to(text_dtype),
            row_image=sample_image.clamp(min=0),
            image_positions=positions[:, None, None],
            inside=inside[:, None, None],
            cell_inside=cell_inside,
            empty_cells=torch.zeros_like(cell_inside),
            rows_are_images=bool((sample_image == torch.arange(batch, device=device)).all()),
            pooling_windows=windows,
            token_cell=token_cells(selection_grid, config.high_res_grid, device),
        )

    def _high_res_rows(
        self,
        q_length: int,
        past_length: int | torch.Tensor,
        labels: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        flex_answer_start: int | None,
        device: torch.device,
    ) -> torch.Tensor | None:
        """`(batch, q)` bool: the rows of this call that predict answer tokens (README, "How it works").

        None means "the last row of every sequence" and is only returned for one-token calls, whose single row
        is then used without building a mask. Text-only sequences select nothing, so they need no special case.
        """
        real = None
        if attention_mask is not None and attention_mask.ndim == 2:
            real = attention_mask[:, -q_length:].to(device=device, dtype=torch.bool)
        if labels is not None:
            rows = torch.zeros(labels.shape[0], q_length, dtype=torch.bool, device=device)
            rows[:, :-1] = labels[:, 1:].to(device) != IGNORE_INDEX
        elif q_length == 1 and (
            flex_answer_start is None or (isinstance(past_length, int) and past_length + 1 >= flex_answer_start)
        ):
            return real  # a decode step: its row predicts the next answer token
        elif flex_answer_start is not None:
            query_positions = torch.arange(q_length, device=device) + past_length
            rows = (query_positions + 1 >= flex_answer_start)[None]
        else:
            last_real = q_length - 1 if real is None else q_length - 1 - real.flip(1).int().argmax(dim=1, keepdim=True)
            rows = torch.arange(q_length, device=device)[None] == last_real
        return rows if real is None else rows & real

    def _sliding_window(self) -> int | None:
        """The language model's sliding attention window, if any layer uses one."""
        text_config = self.config.text_config
        layer_types = getattr(text_config, "layer_types", None)
        if layer_types is not None and "sliding_attention" not in layer_types:
            return None
        return getattr(text_config, "sliding_window", None)

    def _check_sliding_window(self, cache: Cache | None, past_length, q_length: int) -> None:
        window = self._sliding_window()
        if window is None:
            return
        # A static cache reports its length as a tensor: check what it can hold once, at prefill, instead.
        length = past_length + q_length if isinstance(past_length, int) else cache.get_max_length()
        if length > window:
            raise ValueError(
                f"The sequence (up to {length} tokens) is longer than the language model's sliding window ({window}): "
                "FlexAttention needs every low-res image key in the cache. Shorten the prompt (or the cache), or load "
                "the model with `text_config.sliding_window=None` if it was trained with full attention."
            )

    def _flex_alpha(self) -> float:
        """Blend weight of the hierarchical output: `min(1, progress * flex_high_res_ramp)` in training, else 1."""
        progress = getattr(self, "flex_training_progress", None)
        if not self.training or progress is None:
            return 1.0
        return min(1.0, float(progress) * self.config.flex_high_res_ramp)

    def _prepare_flex_call(
        self,
        input_ids,
        inputs_embeds,
        attention_mask,
        position_ids,
        cache,
        labels,
        high_res_pixel_values,
        original_image_sizes,
        flex_answer_start,
        vision_feature_layer,
        vision_feature_select_strategy,
        use_cache,
    ) -> tuple[FlexCall | None, Cache | None]:
        """Build this call's FlexAttention view (None when no row can attend to high-res tokens).

        A one-token call (a decode step) reads its state from the cache and sets up its rows without reading any
        tensor on the host; a prefill encodes the high-res images and may.
        """
        if self.config.flex_n_fa == 0:
            return None, cache
        past_length = cache.get_seq_length() if cache is not None else 0
        q_length = next(t for t in (input_ids, inputs_embeds, attention_mask) if t is not None).shape[1]
        if high_res_pixel_values is not None:
            if bool(past_length > 0):
                raise ValueError(
                    "`high_res_pixel_values` must come with the whole prompt (prefill), not with a cache that already "
                    "holds tokens: start generation from an empty cache."
                )
            state = self._build_state(
                self._image_token_mask(input_ids, inputs_embeds),
                position_ids,
                high_res_pixel_values,
                original_image_sizes,
                vision_feature_layer,
                vision_feature_select_strategy,
            )
            if cache is None and use_cache and not (self.is_activation_checkpointing and self.training):
                cache = DynamicCache(config=self.config.text_config)
            if cache is not None:
                attach_state(cache, state)  # None for a batch without images
        else:
            state = getattr(cache, CACHE_ATTRIBUTE, None) if cache is not None else None
            if state is not None and isinstance(past_length, int) and past_length == 0:
                attach_state(cache, None)  # a fresh prompt never sees an earlier image
                state = None
        if state is None:
            return None, cache
        if isinstance(past_length, int) or high_res_pixel_values is not None:
            self._check_sliding_window(cache, past_length, q_length)

        device = state.row_image.device
        rows = self._high_res_rows(q_length, past_length, labels, attention_mask, flex_answer_start, device)
        if q_length == 1:
            row_index, row_valid = None, rows
        else:
            row_index, row_valid = pack_true_indices(rows.expand(state.row_image.shape[0], -1))
            if row_index.shape[1] == 0:
                return None, cache
        inside, cell_inside = state.inside, state.cell_inside
        if row_valid is not None:  # rows that predict no answer token select nothing
            valid = row_valid[:, None, :, None]
            inside, cell_inside = inside * valid, cell_inside & valid
        config = self.config
        call = FlexCall(
            state=state,
            row_index=row_index,
            row_valid=row_valid,
            # A static cache's length is a tensor that the first layer's cache update increments in place.
            query_offset=past_length if isinstance(past_length, int) else past_length.clone(),
            inside=inside,
            cell_inside=cell_inside,
            alpha=self._flex_alpha(),
            first_flex_layer=config.first_flex_layer,
            num_layers=config.text_config.num_hidden_layers,
            mode=config.flex_selection,
            threshold=config.flex_threshold,
            budget=config.topk_cells if config.flex_selection == "topk" else 0,
            random_p=config.flex_random_p,
            seed=config.flex_random_seed,
            selection_grid=config.resolved_selection_grid,
        )
        return call, cache

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
        trace = flex_trace
        tokens = input_ids if input_ids is not None else inputs_embeds
        if labels is not None and tokens is not None and tuple(labels.shape) != tuple(tokens.shape[:2]):
            raise ValueError(
                f"`labels` has shape {tuple(labels.shape)} but the inputs have shape {tuple(tokens.shape[:2])}: "
                "labels must align token by token with input_ids (-100 where no loss is wanted)."
            )
        self._check_input_types(
            pixel_values, high_res_pixel_values, original_image_sizes, flex_answer_start, mm_encoder_outputs
        )
        use_cache = kwargs.get("use_cache", self.config.text_config.use_cache)
        flex_call, cache = self._prepare_flex_call(
            input_ids,
            inputs_embeds,
            attention_mask,
            position_ids,
            cache,
            labels,
            high_res_pixel_values,
            original_image_sizes,
            flex_answer_start,
            vision_feature_layer,
            vision_feature_select_strategy,
            use_cache,
        )
        if flex_call is not None:
            flex_call.trace = trace
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


def _register() -> None:
    register_flex_attention()
    for key in ("flex_llava", "FlexLlavaForConditionalGeneration"):
        try:
            register_checkpoint_conversion_mapping(key, get_checkpoint_conversion_mapping("llava"))
        except ValueError:  # already registered: a re-import, or the plugin next to remote code
            pass
    try:
        AutoConfig.register("flex_llava", FlexLlavaConfig)
    except ValueError:
        pass
    # Every Auto class that maps `llava` to LlavaForConditionalGeneration. (Not AutoModel: its `llava` entry is the
    # bare LlavaModel, which would load a FlexAttention checkpoint as a stock model without a word.)
    for auto_class in (AutoModelForImageTextToText, AutoModelForMultimodalLM, AutoModelForPreTraining):
        try:
            auto_class.register(FlexLlavaConfig, FlexLlavaForConditionalGeneration)
        except ValueError:
            pass
    # Saved checkpoints carry these files and an `auto_map`, so they load with trust_remote_code=True where the
    # plugin is not installed.
    FlexLlavaConfig.register_for_auto_class("AutoConfig")
    FlexLlavaForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")


_register()

__all__ = ["FlexLlavaForConditionalGeneration"]
