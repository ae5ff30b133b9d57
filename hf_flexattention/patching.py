"""`patch_model` / `unpatch_model` / `is_patched`: turn a loaded Llava model into a FlexAttention model in place.

Patching swaps the class of the model (to `FlexLlavaForConditionalGeneration`) and of its config (to
`FlexLlavaConfig`) instead of rebuilding anything, so every weight, hook, device placement and sub-config
reference stays as it is; it adds `hr_k_proj` / `hr_v_proj` (copies of `k_proj` / `v_proj`) to the top `n_fa`
decoder layers and routes the language model's attention through FlexAttention.
"""

import dataclasses

import torch
from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
    LlavaProcessor,
)

from .attention import base_implementation_name
from .configuration_flex_llava import FlexLlavaConfig, validate_flex_settings
from .configuration_flex_llava_next import FlexLlavaNextConfig
from .configuration_flex_llava_onevision import FlexLlavaOnevisionConfig
from .modeling_flex import (
    install_flex_attention,
    sync_high_res_projections,
    text_decoder_layers,
    uninstall_flex_attention,
)
from .modeling_flex_llava import FlexLlavaForConditionalGeneration
from .modeling_flex_llava_next import FlexLlavaNextForConditionalGeneration
from .modeling_flex_llava_onevision import FlexLlavaOnevisionForConditionalGeneration
from .processing_flex_llava import FlexLlavaProcessor
from .processing_flex_llava_next import FlexLlavaNextProcessor
from .processing_flex_llava_onevision import FlexLlavaOnevisionProcessor
from .quantization import check_quantization


_ORIGINAL_CLASSES = "_flex_original_classes"
_ORIGINAL_CONFIG_ENTRIES = "_flex_original_config_entries"
# Config entries that patching or saving the patched model changes on the instance: `model_type` (loaded configs
# carry it as an instance attribute that would hide the class's "flex_llava"), and what `save_pretrained` writes.
_CONFIG_ENTRIES_TO_RESTORE = ("model_type", "architectures", "auto_map")


@dataclasses.dataclass(frozen=True)
class Family:
    """A Llava family FlexAttention serves: the one table that patching, loading, the collator and the Hub card
    read. `contract_method` tells a FlexAttention model of this family loaded as remote code (another copy of the
    class) by what it can do; `wrap` is the FlexAttention processor's classmethod that wraps a stock processor."""

    name: str
    model_class: type
    config_class: type
    processor_class: type
    flex_model_class: type
    flex_config_class: type
    flex_processor_class: type
    contract_method: str
    wrap: str

    @property
    def model_type(self) -> str:
        """The stock checkpoints' `model_type` (`"llava"`, `"llava_next"`, `"llava_onevision"`)."""
        return self.config_class.model_type

    @property
    def has_zoom(self) -> bool:
        """Whether the high-res view is a zoomed image (LLaVA-1.5), not the model's own any-resolution crops."""
        return "flex_zoom" in self.flex_fields()

    def flex_fields(self) -> list[str]:
        parent = {field.name for field in dataclasses.fields(self.config_class)}
        return [field.name for field in dataclasses.fields(self.flex_config_class) if field.name not in parent]

    def wrap_call(self) -> str:
        """How a user wraps the stock processor, as code."""
        zoom = ", zoom=model.config.flex_zoom" if self.has_zoom else ""
        return f"{self.flex_processor_class.__name__}.{self.wrap}(processor{zoom})"


FAMILIES = (
    Family(
        "LLaVA-1.5",
        LlavaForConditionalGeneration,
        LlavaConfig,
        LlavaProcessor,
        FlexLlavaForConditionalGeneration,
        FlexLlavaConfig,
        FlexLlavaProcessor,
        "encode_high_res",
        "from_llava_processor",
    ),
    Family(
        "LLaVA-NeXT",
        LlavaNextForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextProcessor,
        FlexLlavaNextForConditionalGeneration,
        FlexLlavaNextConfig,
        FlexLlavaNextProcessor,
        "encode_images",
        "from_llava_next_processor",
    ),
    Family(
        "LLaVA-OneVision",
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionConfig,
        LlavaOnevisionProcessor,
        FlexLlavaOnevisionForConditionalGeneration,
        FlexLlavaOnevisionConfig,
        FlexLlavaOnevisionProcessor,
        "encode_images",
        "from_llava_onevision_processor",
    ),
)


def family_by_model_type(model_type: str) -> Family | None:
    """The family of a stock or `flex_` checkpoint's `model_type`, or None."""
    return next((family for family in FAMILIES if family.model_type == model_type.removeprefix("flex_")), None)


def _family_of(model) -> Family | None:
    """The family of a stock or FlexAttention model (None for any other model)."""
    for family in FAMILIES:
        if type(model) is family.model_class or isinstance(model, family.flex_model_class):
            return family
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if (
            isinstance(model, family.model_class)
            and model_type == family.flex_config_class.model_type
            and callable(getattr(model, family.contract_method, None))
        ):
            return family
    return None


def _reject_peft(model) -> None:
    try:
        from peft import PeftModel
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # peft is optional at run time
        return
    if isinstance(model, PeftModel) or any(isinstance(module, BaseTunerLayer) for module in model.modules()):
        raise ValueError(
            "This model already carries PEFT adapters. Call `patch_model` on the base Llava model first, then "
            "`get_peft_model` (the hr projections must exist before LoRA wraps the attention)."
        )


def _sharding(model) -> str | None:
    """The sharding wrapper `model` is already under (FSDP, FSDP2 `fully_shard`, DeepSpeed ZeRO-3), or None."""
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

        for module in model.modules():
            if isinstance(module, FSDPModule):
                return "FSDP2 (fully_shard)"
            if isinstance(module, FullyShardedDataParallel):
                return "FSDP"
    if any(hasattr(parameter, "ds_id") for parameter in model.parameters()):
        return "DeepSpeed ZeRO-3"
    return None


def _reject_sharded(model) -> None:
    sharding = _sharding(model)
    if sharding is not None:
        raise ValueError(
            f"This model is already sharded by {sharding}: its k_proj/v_proj hold only this process's shard, so "
            "FlexAttention cannot copy them. Call `patch_model` on the whole model first, then let Trainer / "
            "accelerate / DeepSpeed shard it (and load LoRA, if any, in between)."
        )


def _check_supported(model) -> Family:
    family = _family_of(model)
    if family is None:
        raise TypeError(
            "patch_model supports LlavaForConditionalGeneration (LLaVA-1.5 style, one image grid), "
            "LlavaNextForConditionalGeneration (LLaVA-NeXT) and LlavaOnevisionForConditionalGeneration "
            "(LLaVA-OneVision; single images) models with a Llama, Mistral or Qwen2 language model; got "
            f"{type(model).__name__}. Load the checkpoint with one of those classes."
        )
    family.flex_model_class.check_config(model.config)
    for layer in text_decoder_layers(model):
        attention = getattr(layer, "self_attn", None)
        if attention is None or not all(hasattr(attention, name) for name in ("k_proj", "v_proj", "layer_idx")):
            raise TypeError(
                "The language model's decoder layers must have `self_attn` with `k_proj`, `v_proj` and `layer_idx` "
                f"(Llama/Mistral/Qwen2 style); {type(layer).__name__} does not."
            )
    return family


def patch_model(
    model: LlavaForConditionalGeneration,
    n_fa: int,
    threshold: float = 48 / 255,
    *,
    zoom: int | None = None,
    selection: str = "threshold",
    selection_grid: int | None = None,
    topk_ratio: float = 0.1,
    random_p: float = 0.1,
    random_seed: int = 0,
    high_res_ramp: float = 10.0,
) -> FlexLlavaForConditionalGeneration:
    """Turn a loaded Llava model into a FlexAttention model, in place, and return it.

    Args:
        model: a `LlavaForConditionalGeneration`, `LlavaNextForConditionalGeneration` or
            `LlavaOnevisionForConditionalGeneration` (patch it before `get_peft_model`). LLaVA-NeXT's and
            LLaVA-OneVision's high-res pool is their own any-resolution crops.
        n_fa: number of FlexAttention layers at the top of the language model (`0` = patched but inert;
            the released LLaVA-1.5-7B model uses 23 of 32).
        threshold: normalised-attention threshold in [0, 1) (the official `48` means `48 / 255`).
        zoom: high-res side over the vision tower's input side (LLaVA-1.5; default 3: 1008 px for a 336 px tower).
            LLaVA-NeXT and LLaVA-OneVision have no zoom (their crops are the high-res view): leave it None.
        selection: `"threshold"` (paper), `"topk"` (a budget: `topk_ratio` of the high-res tokens, in whole cells
            of the selection grid, the same number for every row) or `"random"`
            (ablation: each cell with probability `random_p`, seeded by `random_seed`).
        selection_grid: side of the grid the selection is max-pooled to; None = the release's 3/8 of the
            low-res grid (9 for 24).
        topk_ratio: `"topk"`'s budget, a fraction of the high-res tokens: `round(topk_ratio * s**2)` cells of the
            `s x s` selection grid (0.1 keeps 8 of 81 cells, 512 of 5184 tokens, on LLaVA-1.5).
        random_p, random_seed: `"random"`'s probability per cell and seed.
        high_res_ramp: training ramp of the high-res blend, `alpha = min(1, epoch * high_res_ramp)` (the official
            code's `warmup`; the release uses 10: alpha reaches 1 a tenth of the way into the first epoch).

    Patching an already patched model with the same settings does nothing; with other settings it
    re-configures it (layers that stop being FlexAttention layers lose their hr projections).

    Returns:
        `model` itself, now a `FlexLlavaForConditionalGeneration` (or `FlexLlavaNextForConditionalGeneration`,
        `FlexLlavaOnevisionForConditionalGeneration`).
        A Llava model uses high-res tokens only when called with `high_res_pixel_values` (and
        `original_image_sizes`), which `FlexLlavaProcessor` makes; without them it computes what the stock model
        does. A LLaVA-NeXT / OneVision model takes the stock image processor's crops as its high-res tokens; its
        prompt holds the base image's tokens only (`FlexLlavaNextProcessor` / `FlexLlavaOnevisionProcessor`).

    Cost: each FlexAttention layer gains two `hidden x kv_dim` projections (772M parameters, 1.44 GiB in fp16, for
    LLaVA-1.5-7B with `n_fa=23`), and generation keeps every image's high-res keys of each FlexAttention layer
    (`n_fa * M * kv_dim` values: 0.91 GiB per image in fp16 for LLaVA-1.5-7B). `hf_flexattention.cost` models
    the FLOPs and memory of both.

    Raises:
        TypeError: for a model that is not a `LlavaForConditionalGeneration`, or a setting of the wrong type.
        ValueError: for a setting out of range (each message names the valid range), an attention
            implementation other than `sdpa`/`eager`, a model that already carries PEFT adapters or is already
            sharded (FSDP, DeepSpeed ZeRO-3: patch first), or a quantisation other than bitsandbytes 4-bit/8-bit
            (GPTQ, AWQ, HQQ, ...).

    Quantized bases: on a model loaded with a bitsandbytes `BitsAndBytesConfig` (4-bit nf4/fp4 or 8-bit), the hr
    projections are dequantised copies of `k_proj` / `v_proj` in the language model's dtype (full precision:
    1.44 GiB in bf16 for LLaVA-1.5-7B with `n_fa=23`), trainable like any `nn.Linear`; see
    `hf_flexattention.quantization`. Patching before or after `peft.prepare_model_for_kbit_training` gives the same
    model.

    Example:

    ```python
    >>> model = LlavaForConditionalGeneration.from_pretrained("llava-hf/llava-1.5-7b-hf", dtype=torch.float16)
    >>> model = patch_model(model, n_fa=23, threshold=48 / 255)
    ```
    """
    _reject_peft(model)
    family = _check_supported(model)
    _reject_sharded(model)
    check_quantization(model)
    config = model.config
    has_zoom = family.has_zoom
    if not has_zoom and zoom is not None:
        raise ValueError(
            f"`zoom={zoom}` does not apply to {family.model_class.__name__}: its high-res tokens are its own "
            "any-resolution crops. Leave `zoom` unset."
        )
    zoom = (3 if zoom is None else zoom) if has_zoom else None
    low_res_grid = config.vision_config.image_size // config.vision_config.patch_size
    validate_flex_settings(
        num_layers=config.text_config.num_hidden_layers,
        n_fa=n_fa,
        threshold=threshold,
        zoom=zoom,
        selection=selection,
        selection_grid=selection_grid,
        low_res_grid=low_res_grid,
        topk_ratio=topk_ratio,
        random_p=random_p,
        high_res_ramp=high_res_ramp,
        random_seed=random_seed,
    )
    settings = {
        "flex_n_fa": n_fa,
        "flex_threshold": float(threshold)
        if isinstance(threshold, int) and not isinstance(threshold, bool)
        else threshold,
        "flex_selection": selection,
        "flex_selection_grid": selection_grid,
        "flex_topk_ratio": topk_ratio,
        "flex_random_p": random_p,
        "flex_random_seed": random_seed,
        "flex_high_res_ramp": float(high_res_ramp),
    }
    if has_zoom:
        settings["flex_zoom"] = zoom
    if is_patched(model):
        if all(getattr(config, name) == value for name, value in settings.items()):
            return model
    else:
        original_attention = config.text_config._attn_implementation_internal
        install_flex_attention(model)  # validates the attention implementation before anything changes
        setattr(model, _ORIGINAL_CLASSES, (type(model), type(config), original_attention))
        entries = {name: config.__dict__[name] for name in _CONFIG_ENTRIES_TO_RESTORE if name in config.__dict__}
        setattr(model, _ORIGINAL_CONFIG_ENTRIES, entries)
        config.__dict__.pop("model_type", None)
        config.__class__ = family.flex_config_class
        model.__class__ = family.flex_model_class
    for name, value in settings.items():
        object.__setattr__(config, name, value)
    sync_high_res_projections(model, n_fa)
    install_flex_attention(model)
    return model


def unpatch_model(
    model: FlexLlavaForConditionalGeneration | FlexLlavaNextForConditionalGeneration,
) -> LlavaForConditionalGeneration | LlavaNextForConditionalGeneration:
    """Undo `patch_model` in place: original class, config and state dict (hr projections removed)."""
    if not is_patched(model):
        raise ValueError("This model is not patched with FlexAttention: there is nothing to unpatch.")
    family = _family_of(model)
    model_class, config_class, attn_implementation = getattr(
        model, _ORIGINAL_CLASSES, (family.model_class, family.config_class, None)
    )
    sync_high_res_projections(model, 0)
    uninstall_flex_attention(model)
    config = model.config
    for name in family.flex_fields():
        config.__dict__.pop(name, None)
    config.__class__ = config_class
    text_config = config.text_config
    text_config._attn_implementation_internal = attn_implementation or base_implementation_name(
        text_config._attn_implementation
    )
    model.__class__ = model_class
    entries = getattr(model, _ORIGINAL_CONFIG_ENTRIES, {})
    for name in _CONFIG_ENTRIES_TO_RESTORE:
        config.__dict__.pop(name, None)
        if name in entries:
            config.__dict__[name] = entries[name]
    for name in (_ORIGINAL_CLASSES, _ORIGINAL_CONFIG_ENTRIES):
        if hasattr(model, name):
            delattr(model, name)
    return model


def is_patched(model) -> bool:
    """Whether `model` is a FlexAttention model: patched in place, loaded as one, or loaded as remote code.

    A checkpoint loaded with `trust_remote_code=True` before `import hf_flexattention` has another copy of
    `FlexLlavaForConditionalGeneration` as its class (from the checkpoint's files), so models are recognised by what
    they are (a Llava or LLaVA-NeXT model whose config has the FlexAttention `model_type` and that has the family's
    encoding method), not by the identity of this package's class.
    """
    family = _family_of(model)
    return family is not None and type(model) is not family.model_class
