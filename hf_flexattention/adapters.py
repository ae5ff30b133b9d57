"""PEFT adapters of FlexAttention models remember the FlexAttention settings of the base they were trained on.

PEFT saves an adapter's weights and `adapter_config.json`, not the settings of the FlexAttention model under it. Loaded
onto a stock base, or one patched with another `n_fa`, the adapter's trained `hr_k_proj` / `hr_v_proj` (LoRA or
`modules_to_save`) would find no module to go to and be dropped without a word. So saving an adapter here also
writes `flex_attention.json` beside it (`hf_flexattention.hub.save_pretrained` and `push_to_hub` do too), and
`load_adapter` patches a stock base with those settings, or stops with what to do.

    from hf_flexattention.adapters import load_adapter
    model = load_adapter(LlavaForConditionalGeneration.from_pretrained("llava-hf/llava-1.5-7b-hf"), "me/flex-lora")
"""

import json
import os
from pathlib import Path

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from transformers.utils import logging

from .loading import SETTINGS, apply_settings, flex_settings
from .patching import is_patched


logger = logging.get_logger(__name__)

SETTINGS_FILE = "flex_attention.json"
HIGH_RES_MODULES = ("hr_k_proj", "hr_v_proj")


def write_adapter_settings(peft_model, save_directory: str | os.PathLike) -> Path:
    """Write the FlexAttention settings of `peft_model`'s base beside its saved adapter; return the file's path.

    Raises:
        TypeError: if the PEFT model's base is not a FlexAttention model.
    """
    base = peft_model.get_base_model()
    if not is_patched(base):
        raise TypeError(
            "This PEFT model's base is not a FlexAttention model: nothing to record. Patch the base model with "
            "`patch_model` before `get_peft_model`."
        )
    path = Path(save_directory) / SETTINGS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"flex_settings": flex_settings(base), "num_hidden_layers": base.config.text_config.num_hidden_layers}
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return path


def save_adapter(peft_model, save_directory: str | os.PathLike, **save_kwargs) -> None:
    """`peft_model.save_pretrained(save_directory, **save_kwargs)` and the FlexAttention settings of its base."""
    peft_model.save_pretrained(save_directory, **save_kwargs)
    write_adapter_settings(peft_model, save_directory)


def adapter_settings(adapter: str | os.PathLike, **hub_kwargs) -> dict | None:
    """The FlexAttention settings an adapter (folder or Hub id) recorded, or None if it recorded none."""
    if Path(adapter).is_dir():
        path = Path(adapter) / SETTINGS_FILE
        if not path.is_file():
            return None
    else:
        try:
            path = Path(hf_hub_download(str(adapter), SETTINGS_FILE, **hub_kwargs))
        except EntryNotFoundError:
            return None
    return json.loads(path.read_text())["flex_settings"]


def _trains_high_res(adapter: str | os.PathLike, **hub_kwargs) -> bool:
    """Whether an adapter holds weights for `hr_k_proj`/`hr_v_proj` (LoRA on them, or `modules_to_save`)."""
    from peft import PeftConfig

    config = PeftConfig.from_pretrained(str(adapter), **hub_kwargs)
    names = [str(getattr(config, "target_modules", "") or ""), *(getattr(config, "modules_to_save", None) or [])]
    return any(module in name for name in names for module in HIGH_RES_MODULES)


def load_adapter(base, adapter: str | os.PathLike, *, hub_kwargs: dict | None = None, **peft_kwargs):
    """Load a PEFT adapter onto `base`, with `base` patched as the adapter was trained.

    Args:
        base: a stock Llava model (it is patched with the adapter's recorded settings) or a FlexAttention model (its
            `n_fa` must match the adapter's; other settings that differ are logged, and kept).
        adapter: folder or Hub id of an adapter saved by `save_adapter`, `hub.save_pretrained` or `hub.push_to_hub`.
        hub_kwargs: `revision`, `token`, ... to locate the adapter's files on the Hub.
        **peft_kwargs: passed to `PeftModel.from_pretrained` (`adapter_name`, `is_trainable`, ...).

    Returns:
        The `PeftModel`.

    Raises:
        ValueError: if `base` has another `n_fa` than the adapter recorded, or if the adapter trained hr projections
            but recorded no settings and `base` is not patched (each message says what to do).
    """
    from peft import PeftModel

    hub_kwargs = hub_kwargs or {}
    settings = adapter_settings(adapter, **hub_kwargs)
    if settings is None:
        if _trains_high_res(adapter, **hub_kwargs) and not is_patched(base):
            raise ValueError(
                f"The adapter {str(adapter)!r} trained hr_k_proj/hr_v_proj but records no FlexAttention settings "
                f"(no {SETTINGS_FILE}; PEFT's own save_pretrained does not write it). Patch the base as it was "
                "trained first: `patch_model(base, n_fa=...)`, then load it; save adapters with "
                "`hf_flexattention.adapters.save_adapter` or `hf_flexattention.hub.save_pretrained` to record them."
            )
        if not is_patched(base):
            logger.warning(f"The adapter {str(adapter)!r} records no FlexAttention settings; the base is stock.")
    elif not is_patched(base):
        logger.info(f"Patching the base with the adapter's FlexAttention settings: {settings}.")
        apply_settings(base, {name: settings[name] for name in SETTINGS if name in settings})
    else:
        own = flex_settings(base)
        if own["n_fa"] != settings["n_fa"]:
            raise ValueError(
                f"The adapter was trained on a base with n_fa={settings['n_fa']}, this base has n_fa={own['n_fa']}: "
                f"its hr projections would not all find their layers. Load it on a stock base (it is then patched "
                f"as recorded), or re-patch this one: `patch_model(base, **{settings})`."
            )
        differences = {name: (own[name], value) for name, value in settings.items() if own.get(name) != value}
        for name, (value, recorded) in differences.items():
            logger.warning(f"The adapter was trained with {name}={recorded!r}; the base keeps its {name}={value!r}.")
    return PeftModel.from_pretrained(base, str(adapter), **peft_kwargs)


__all__ = ["SETTINGS_FILE", "adapter_settings", "load_adapter", "save_adapter", "write_adapter_settings"]
