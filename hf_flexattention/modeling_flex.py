"""FlexAttention's model-side machinery, shared by every Llava family it patches (`FlexAttentionMixin`).

A FlexAttention model class is `FlexAttentionMixin` plus a stock class (`LlavaForConditionalGeneration`,
`LlavaNextForConditionalGeneration`); the family's own class says how its high-res inputs become a `FlexState`
(`_build_state`), and everything else lives here: which rows attend to high-res tokens, the per-call view of the
attention function, the hr projections, loading, saving and routing the attention through FlexAttention.

Shipped as remote code with saved checkpoints: torch, transformers, the standard library and relative imports only.
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForImageTextToText
from transformers.cache_utils import Cache, DynamicCache
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.utils import logging

from .attention import FlexAttentionConfig, base_implementation_name, register_flex_attention
from .configuration_flex_llava import SUPPORTED_BASE_ATTENTION
from .quantization import high_res_projection
from .selection import pool_cells, pooling_windows
from .state import CACHE_ATTRIBUTE, FlexCall, FlexState, attach_state, pack_true_indices


logger = logging.get_logger(__name__)

IGNORE_INDEX = -100
HIGH_RES_PROJECTIONS = {"hr_k_proj": "k_proj", "hr_v_proj": "v_proj"}


def text_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Llava model's language model."""
    return model.model.language_model.layers


def sync_high_res_projections(model: nn.Module, n_fa: int) -> None:
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


def install_flex_attention(model: nn.Module) -> None:
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


def uninstall_flex_attention(model: nn.Module) -> None:
    """Give the attention modules their language model's config back (undoes `install_flex_attention`; also the
    view installed by another copy of this file, as remote code loads one)."""
    text_config = model.config.text_config
    for layer in text_decoder_layers(model):
        layer.self_attn.config = text_config


def register_flex_family(
    config_class: type, model_class: type, stock_model_type: str, auto_classes: tuple = (AutoModelForImageTextToText,)
) -> None:
    """Register a FlexAttention family with transformers (run when its modeling file is imported).

    The attention functions it routes to (remote code may import this family's file alone), the stock family's
    checkpoint conversion mapping under the FlexAttention model type and class name, the config with `AutoConfig`,
    the model with each of `auto_classes`, and both for `auto_map`, so saved checkpoints load with
    `trust_remote_code=True` where the plugin is not installed. Registering twice (a re-import, or the plugin next to
    remote code) is a no-op.
    """
    register_flex_attention()
    for key in (config_class.model_type, model_class.__name__):
        try:
            register_checkpoint_conversion_mapping(key, get_checkpoint_conversion_mapping(stock_model_type))
        except ValueError:  # already registered
            pass
    try:
        AutoConfig.register(config_class.model_type, config_class)
    except ValueError:
        pass
    for auto_class in auto_classes:
        try:
            auto_class.register(config_class, model_class)
        except ValueError:
            pass
    config_class.register_for_auto_class("AutoConfig")
    model_class.register_for_auto_class("AutoModelForImageTextToText")


def distinct_images(*per_image: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Which images differ from the one before them, and each image's index among the distinct ones.

    `generate` repeats each sample for every beam or returned sequence, next to each other: keeping one copy of each
    run of equal images (equal in every tensor given: pixels, prompt positions, sizes) encodes and stores each
    image once.

    Args:
        per_image: tensors with one row per image on dim 0; None entries are skipped.

    Returns:
        `(distinct (n,) bool, index (n,) long)`: `index[i]` is image `i`'s row among the distinct images.
    """
    tensors = [tensor for tensor in per_image if tensor is not None]
    same = torch.ones(tensors[0].shape[0] - 1, dtype=torch.bool, device=tensors[0].device)
    for tensor in tensors:
        same &= (tensor[1:] == tensor[:-1]).flatten(1).all(dim=1)
    distinct = torch.cat([same.new_ones(1), ~same])
    return distinct, distinct.long().cumsum(0) - 1


def image_placement(
    image_mask: torch.Tensor, sample_image: torch.Tensor, position_ids: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where each image sits in the prompt (prefill: reads the mask on the host).

    Args:
        image_mask: `(batch, length)` bool, the low-res image tokens.
        sample_image: `(batch,)` each sequence's image index (-1: a text-only sequence).
        position_ids: `(batch | 1, length)` RoPE positions, or None for `0 .. length - 1`.

    Returns:
        `image_rows (n,)`: the sequences that hold an image; `image_positions (n, g*g)`: the sequence indices of
        their image tokens; `rotary_positions (n, g*g)`: the RoPE positions of those tokens.
    """
    image_rows = (sample_image >= 0).nonzero().squeeze(1)
    image_positions = image_mask[image_rows].nonzero()[:, 1].view(len(image_rows), -1)
    if position_ids is None:
        position_ids = torch.arange(image_mask.shape[1], device=image_mask.device)[None]
    rotary_positions = position_ids.expand(len(image_mask), -1)[image_rows].gather(1, image_positions)
    return image_rows, image_positions, rotary_positions


def build_flex_state(
    sample_image: torch.Tensor,
    image_rows: torch.Tensor,
    image_positions: torch.Tensor,
    *,
    features: torch.Tensor,
    rotary: torch.Tensor,
    token_cell: torch.Tensor,
    token_valid: torch.Tensor | None = None,
    image_inside: torch.Tensor | None = None,
    grid: int,
    selection_grid: int,
    dtype: torch.dtype,
) -> FlexState:
    """The `FlexState` of a prefill: per image, its high-res features and rotary table (in the language model's
    `dtype`); per sequence, where its low-res image tokens are and which cells lie inside its image.

    Args:
        sample_image: `(batch,)` each sequence's image index into `features` (-1: a text-only sequence, which then
            has no cell inside any image and selects nothing).
        image_rows, image_positions: from `image_placement`.
        image_inside: `(sequences with an image, g*g)` 1.0 where a cell lies inside the image (LLaVA-1.5's padding
            margin is 0.0); None: every cell (an any-resolution base image has no padding).
        features, rotary, token_cell, token_valid: as `FlexState` documents them.
    """
    batch, device = sample_image.shape[0], sample_image.device
    positions = torch.zeros(batch, grid * grid, dtype=torch.long, device=device)
    positions[image_rows] = image_positions
    inside = torch.zeros(batch, grid * grid, device=device)
    inside[image_rows] = 1.0 if image_inside is None else image_inside.to(device, inside.dtype)
    windows = pooling_windows(grid, selection_grid, device)
    cell_inside = (pool_cells(inside, windows) > 0)[:, None, None]
    return FlexState(
        features=features.to(dtype),
        rotary=rotary.to(dtype),
        row_image=sample_image.clamp(min=0),
        image_positions=positions[:, None, None],
        inside=inside[:, None, None],
        cell_inside=cell_inside,
        empty_cells=torch.zeros_like(cell_inside),
        rows_are_images=bool((sample_image == torch.arange(batch, device=device)).all()),
        pooling_windows=windows,
        token_cell=token_cell,
        token_valid=token_valid,
    )


class FlexAttentionMixin:
    """What every FlexAttention model class adds to its stock Llava-family class (listed first in its bases).

    A family's class says which configs it can serve (`check_config`) and how its inputs become a `FlexState`.
    """

    def __init__(self, config):
        self.check_config(config)
        super().__init__(config)
        sync_high_res_projections(self, config.flex_n_fa)
        install_flex_attention(self)

    @classmethod
    def check_config(cls, config) -> None:
        """Raise a ValueError naming what works if this class cannot serve `config` (also run by `patch_model`,
        which swaps the class of a loaded model without calling `__init__`)."""
        raise NotImplementedError(f"{cls.__name__} must say which configs it serves.")

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

    def _check_flex_arguments(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        labels: torch.Tensor | None,
        flex_answer_start: int | None,
    ) -> None:
        """TypeError/ValueError for a `flex_answer_start` that is not an int, or `labels` not aligned with the
        inputs token by token."""
        if flex_answer_start is not None and (
            isinstance(flex_answer_start, bool) or not isinstance(flex_answer_start, int)
        ):
            raise TypeError(f"`flex_answer_start` must be an int (a sequence index), got {flex_answer_start!r}.")
        tokens = input_ids if input_ids is not None else inputs_embeds
        if labels is not None and tokens is not None and tuple(labels.shape) != tuple(tokens.shape[:2]):
            raise ValueError(
                f"`labels` has shape {tuple(labels.shape)} but the inputs have shape {tuple(tokens.shape[:2])}: "
                "labels must align token by token with input_ids (-100 where no loss is wanted)."
            )

    def _sequence_images(self, image_mask: torch.Tensor, n_images: int, images_name: str, hint: str) -> torch.Tensor:
        """The `(batch,)` index of each sequence's image among the `n_images` given (-1: a text-only sequence), after
        checking that every sequence holds 0 or exactly `g*g` image tokens and that the prompts hold `n_images`.

        `images_name` names the input that holds the images; `hint` ends the token-count error with the fix.
        """
        tokens_per_image = self.config.low_res_grid**2
        image_tokens = image_mask.sum(dim=1)
        if bool(((image_tokens != 0) & (image_tokens != tokens_per_image)).any()):
            raise ValueError(
                f"Each sequence must hold 0 or exactly {tokens_per_image} image tokens (one image per sample), got "
                f"{image_tokens.tolist()}. {hint}"
            )
        has_image = image_tokens > 0
        if int(has_image.sum()) != n_images:
            raise ValueError(
                f"`{images_name}` holds {n_images} images but the prompts hold {int(has_image.sum())}: pass one image "
                "per sample that has an image, in batch order."
            )
        return torch.where(has_image, has_image.long().cumsum(0) - 1, -1)

    def _image_token_mask(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        """`(batch, length)` bool: where the image tokens are; in `inputs_embeds`, the rows equal to the image token's
        embedding (how stock Llava's `get_placeholder_mask` finds them)."""
        if input_ids is not None:
            return input_ids == self.config.image_token_id
        image_token = torch.full((), self.config.image_token_id, dtype=torch.long, device=inputs_embeds.device)
        return (inputs_embeds == self.get_input_embeddings()(image_token)).all(-1)

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
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        cache: Cache | None,
        labels: torch.Tensor | None,
        flex_answer_start: int | None,
        use_cache: bool,
        build_state: Callable[[], FlexState | None] | None,
    ) -> tuple[FlexCall | None, Cache | None]:
        """Build this call's FlexAttention view (None when no row can attend to high-res tokens).

        `build_state()` encodes this call's high-res inputs (None when it has none). A one-token call (a
        decode step) reads its state from the cache and sets up its rows without reading any tensor on the host; a
        prefill encodes the high-res images and may.
        """
        if self.config.flex_n_fa == 0:
            return None, cache
        past_length = cache.get_seq_length() if cache is not None else 0
        q_length = next(t for t in (input_ids, inputs_embeds, attention_mask) if t is not None).shape[1]
        if build_state is not None:
            if bool(past_length > 0):
                raise ValueError(
                    "The high-res inputs must come with the whole prompt (prefill), not with a cache that already "
                    "holds tokens: start generation from an empty cache."
                )
            state = build_state()
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
        if isinstance(past_length, int) or build_state is not None:
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
