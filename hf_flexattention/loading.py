"""Load any Llava, LLaVA-NeXT or LLaVA-OneVision checkpoint as a FlexAttention model, the way every command-line
entry point does.

A FlexAttention checkpoint (saved with `save_pretrained`, pushed, or made by `hf_flexattention.convert`) loads with
its own class, so its trained `hr_k_proj` / `hr_v_proj` and its saved settings are kept; a stock checkpoint is loaded
and patched. Settings given on purpose override a checkpoint's saved ones, each with a logged warning; settings left
unset never do.
"""

from transformers import AutoConfig, AutoProcessor
from transformers.utils import logging

from .configuration_flex_llava import released_n_fa
from .modeling_flex_llava import FlexLlavaForConditionalGeneration
from .modeling_flex_llava_next import FlexLlavaNextForConditionalGeneration
from .modeling_flex_llava_onevision import FlexLlavaOnevisionForConditionalGeneration
from .patching import FAMILIES as PATCHED_FAMILIES
from .patching import family_by_model_type, is_patched, patch_model
from .processing_flex_llava import FlexLlavaProcessor
from .processing_flex_llava_next import FlexLlavaNextProcessor
from .processing_flex_llava_onevision import FlexLlavaOnevisionProcessor


logger = logging.get_logger(__name__)

# patch_model's settings and the config fields that keep them.
SETTINGS = {
    "n_fa": "flex_n_fa",
    "threshold": "flex_threshold",
    "zoom": "flex_zoom",
    "selection": "flex_selection",
    "selection_grid": "flex_selection_grid",
    "topk_ratio": "flex_topk_ratio",
    "random_p": "flex_random_p",
    "random_seed": "flex_random_seed",
    "high_res_ramp": "flex_high_res_ramp",
}

# The checkpoint types `load_flex_model` loads, and the class each loads as (stock ones are then patched).
MODEL_CLASSES = {
    **{family.flex_config_class.model_type: family.flex_model_class for family in PATCHED_FAMILIES},
    **{family.model_type: family.model_class for family in PATCHED_FAMILIES},
}
FAMILIES = tuple(family.model_type for family in PATCHED_FAMILIES)
FAMILY_NAMES = {family.model_type: family.name for family in PATCHED_FAMILIES}
FlexModel = (
    FlexLlavaForConditionalGeneration
    | FlexLlavaNextForConditionalGeneration
    | FlexLlavaOnevisionForConditionalGeneration
)
FlexProcessor = FlexLlavaProcessor | FlexLlavaNextProcessor | FlexLlavaOnevisionProcessor


def flex_settings(model: FlexModel) -> dict:
    """The `patch_model` keyword arguments that reproduce `model`'s FlexAttention settings (a family without a
    setting, e.g. LLaVA-NeXT's `zoom`, leaves it out)."""
    return {name: getattr(model.config, field) for name, field in SETTINGS.items() if hasattr(model.config, field)}


def apply_settings(model, settings: dict | None = None) -> FlexModel:
    """Patch a stock model with `settings` (unset ones: `patch_model`'s defaults, `n_fa`: the released share), or
    apply to a FlexAttention model only the settings given that differ from its own, logging each.

    Args:
        model: a `LlavaForConditionalGeneration`, `LlavaNextForConditionalGeneration`,
            `LlavaOnevisionForConditionalGeneration` or a FlexAttention model.
        settings: `patch_model` keyword arguments; None values count as unset.

    Raises:
        ValueError / TypeError: as `patch_model`, for a setting it refuses (e.g. a `zoom` for LLaVA-NeXT or
            LLaVA-OneVision);
            ValueError for an unknown name.
    """
    chosen = {name: value for name, value in (settings or {}).items() if value is not None}
    unknown = sorted(set(chosen) - set(SETTINGS))
    if unknown:
        raise ValueError(f"Unknown FlexAttention settings {unknown}: use {sorted(SETTINGS)}.")
    if not is_patched(model):
        chosen.setdefault("n_fa", released_n_fa(model.config.text_config.num_hidden_layers))
        return patch_model(model, **chosen)
    saved = flex_settings(model)
    foreign = sorted(set(chosen) - set(saved))
    if foreign:
        raise ValueError(
            f"{', '.join(f'`{name}={chosen[name]!r}`' for name in foreign)} does not apply to {type(model).__name__}: "
            f"its settings are {sorted(saved)} (LLaVA-NeXT and LLaVA-OneVision have no `zoom`: their high-res "
            "tokens are their own any-resolution crops). Leave it unset."
        )
    changed = {name: value for name, value in chosen.items() if value != saved[name]}
    for name, value in changed.items():
        logger.warning(f"Overriding the checkpoint's {name}={saved[name]!r} with {name}={value!r}, as asked.")
    if "n_fa" in changed and changed["n_fa"] > saved["n_fa"]:
        logger.warning(
            f"n_fa={changed['n_fa']} adds FlexAttention layers the checkpoint has no trained hr_k_proj/hr_v_proj for: "
            "they start as copies of k_proj/v_proj."
        )
    return patch_model(model, **{**saved, **changed}) if changed else model


def load_flex_model(
    name_or_path: str,
    settings: dict | None = None,
    *,
    families: tuple[str, ...] = FAMILIES,
    **from_pretrained_kwargs,
) -> FlexModel:
    """Load `name_or_path` as a FlexAttention model: a `flex_llava` / `flex_llava_next` / `flex_llava_onevision`
    checkpoint as saved, a `llava` / `llava_next` / `llava_onevision` one patched (with the released 23-of-32 share
    of FlexAttention layers unless `settings` give `n_fa`: 20 of LLaVA-OneVision-7B's 28).

    Args:
        name_or_path: a Hub id or a folder.
        settings: `patch_model` settings given on purpose (None values are unset); see `apply_settings`.
        families: the stock model types the caller serves (each with its `flex_` counterpart), by default all of
            `FAMILIES`; a tool built for LLaVA-1.5 only passes `("llava",)`, so that other checkpoints are refused
            before their weights load.
        **from_pretrained_kwargs: passed to `from_pretrained` (`dtype`, `device_map`, `revision`, ...).

    Raises:
        ValueError: for a checkpoint of another type or family (the message names what works), or a setting the
            model's family does not have (`zoom` for LLaVA-NeXT and LLaVA-OneVision).
    """
    config = AutoConfig.from_pretrained(name_or_path, **_hub_kwargs(from_pretrained_kwargs))
    model_class = MODEL_CLASSES.get(config.model_type)
    if model_class is not None and config.model_type.removeprefix("flex_") not in families:
        raise ValueError(
            f"{name_or_path!r} is a {config.model_type!r} checkpoint, and this entry point serves "
            f"{' and '.join(f'`{family}`' for family in families)} checkpoints only: load it with the Python API "
            "(`hf_flexattention.loading.load_flex_model`)."
        )
    if model_class is None:
        raise ValueError(
            f"{name_or_path!r} is a {config.model_type!r} checkpoint: FlexAttention loads LLaVA-1.5-style `llava`, "
            "LLaVA-NeXT `llava_next` and LLaVA-OneVision `llava_onevision` checkpoints (patched here) and their "
            "`flex_` counterparts (saved by hf_flexattention or made by `python -m hf_flexattention.convert`)."
        )
    return apply_settings(model_class.from_pretrained(name_or_path, **from_pretrained_kwargs), settings)


def load_flex_processor(name_or_path: str, zoom: int | None = None) -> FlexProcessor:
    """The checkpoint's processor as a FlexAttention processor.

    For a Llava checkpoint, a `FlexLlavaProcessor` with `zoom` (the model's `config.flex_zoom`; required). For a
    LLaVA-NeXT or LLaVA-OneVision checkpoint (stock or `flex_`), a `FlexLlavaNextProcessor` /
    `FlexLlavaOnevisionProcessor` made of the saved processor's parts and settings (a stock processor's
    `patch_size`, `num_image_tokens`, strategy, chat template, ...; the processor's own checks refuse settings the
    model cannot run); these families have no zoom, so leave `zoom` None. A OneVision processor loads without its
    video processor, hence without torchvision (the stock `LlavaOnevisionProcessor` needs it to load at all).

    Raises:
        ValueError: a saved `FlexLlavaProcessor` with another zoom than the model, no `zoom` for a Llava checkpoint,
            a `zoom` for a LLaVA-NeXT / OneVision one, or processor settings the model's family cannot run.
    """
    family = family_by_model_type(AutoConfig.from_pretrained(name_or_path).model_type)
    if family is not None and not family.has_zoom:
        if zoom is not None:
            raise ValueError(
                f"zoom={zoom!r} does not apply to the {family.name} checkpoint {name_or_path!r}: its high-res"
                " tokens are its own any-resolution crops. Leave `zoom` unset (None)."
            )
        return family.flex_processor_class.from_pretrained(name_or_path)
    processor = AutoProcessor.from_pretrained(name_or_path)
    if zoom is None:
        raise ValueError(
            f"{name_or_path!r} has a Llava processor: pass `zoom=model.config.flex_zoom` (the high-res side over the "
            "vision tower's input side of the model it serves)."
        )
    if isinstance(processor, FlexLlavaProcessor):
        if processor.zoom != zoom:
            raise ValueError(
                f"The checkpoint's FlexLlavaProcessor has zoom={processor.zoom} but the model has flex_zoom={zoom}: "
                "keep the saved zoom (do not override it) or save the processor with the model's zoom."
            )
        return processor
    return FlexLlavaProcessor.from_llava_processor(processor, zoom=zoom)


def _hub_kwargs(kwargs: dict) -> dict:
    """The `from_pretrained` arguments that also locate the config (revision, cache, token, ...)."""
    keys = ("revision", "cache_dir", "token", "local_files_only", "trust_remote_code", "subfolder")
    return {key: kwargs[key] for key in keys if key in kwargs}
