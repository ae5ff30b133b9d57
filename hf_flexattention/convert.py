"""Convert the authors' released FlexAttention checkpoint (original LLaVA format) into a `flex_llava` checkpoint.

The official FlexAttention code is a fork of LLaVA on transformers 4.37. Its checkpoints, such as
`senfu/llava-v1.5-7b-flexattn`, use the original LLaVA layout, which transformers' Llava classes cannot read:

- weights `model.embed_tokens`, `model.layers.*`, `model.norm`, `lm_head`, `model.mm_projector.{0,2}`,
  `model.vision_tower.vision_tower.vision_model.*`, and `model.layers.*.self_attn.{k,v}_proj_hd` in every layer;
- a `config.json` with `"model_type": "llava"`, the LLaMA fields at the top level, `mm_*` fields, and the
  FlexAttention settings in `"extra"`, as strings (`{"zoom_ratio": "3", "threshold": "48", "warmup": "10", ...}`).

The converter writes safetensors that `AutoModelForImageTextToText` loads (with `hf_flexattention` imported, or with
`trust_remote_code=True` where it is not installed):

- weights renamed to the transformers Llava layout; `{k,v}_proj_hd` become `hr_{k,v}_proj` in the FlexAttention
  layers only (the official code creates them in every layer but uses them in layers 9 and up);
- settings: the official code makes every layer with `layer_idx > 8` hierarchical, so `n_fa = L - 9`; its threshold
  is on a 0-255 scale (`48 -> 48/255`); `zoom_ratio -> flex_zoom`, `warmup -> flex_high_res_ramp` (the code's defaults
  when missing: threshold 64, warmup 3);
- the CLIP tower from the checkpoint, or from `--vision-tower` (a folder or Hub id) when the checkpoint has none; its
  config from `--vision-tower`, or built in for `openai/clip-vit-large-patch14-336`;
- the image token: LLaVA splices images in at a sentinel id, transformers at a real `<image>` token. Its id comes
  from `--processor`'s tokenizer, or `--image-token-index`, or defaults to the first id after the vocabulary (as
  llava-hf). Rows that the vocabulary lacks are added (to a multiple of 64, as llava-hf does) as the mean of the
  existing rows: deterministic, and the new tokens score the average logit, so they are unlikely predictions.

Convert the released LLaVA-1.5-7B model (the whole checkpoint, about 16 GB in fp16, is held in memory; the output
is about as large):

    python -m hf_flexattention.convert senfu/llava-v1.5-7b-flexattn llava-v1.5-7b-flexattn-hf \\
        --processor llava-hf/llava-1.5-7b-hf

`--processor llava-hf/llava-1.5-7b-hf` adds the matching processor (the same Vicuna tokenizer plus `<image>` = 32000
and `<pad>` = 32001, and CLIP's 336 px image processor), so the vocabulary grows to 32064 rows as in llava-hf. To
convert offline, `hf download senfu/llava-v1.5-7b-flexattn --local-dir DIR` first and pass `DIR`; if a checkpoint
lacks its vision tower, add `--vision-tower openai/clip-vit-large-patch14-336`. Then:

    import hf_flexattention
    from transformers import AutoModelForImageTextToText
    model = AutoModelForImageTextToText.from_pretrained("llava-v1.5-7b-flexattn-hf", dtype=torch.float16)
    processor = hf_flexattention.FlexLlavaProcessor.from_pretrained("llava-v1.5-7b-flexattn-hf")
"""

import argparse
import dataclasses
import json
import logging
import math
import re
import shutil
import sys
import uuid
from pathlib import Path

import torch
from huggingface_hub import HfApi, snapshot_download
from safetensors.torch import load_file
from transformers import AutoProcessor, CLIPVisionConfig, LlamaConfig, LlavaProcessor, PreTrainedConfig

from .configuration_flex_llava import RELEASED_PLAIN_LAYERS, FlexLlavaConfig
from .hub import as_hub_repo_id, create_model_card
from .modeling_flex_llava import FlexLlavaForConditionalGeneration
from .processing_flex_llava import FlexLlavaProcessor


logger = logging.getLogger(__name__)

ORIGINAL_MODEL_TYPES = ("llava", "llava_llama")
# Defaults the official code applies when `extra` lacks a key (modeling_llama.py of the fork).
CODE_DEFAULTS = {"threshold": "64", "warmup": "3"}
VOCAB_MULTIPLE = 64  # llava-hf pads its vocabulary to a multiple of 64
SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}
KNOWN_VISION_TOWERS = {
    "openai/clip-vit-large-patch14-336": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "projection_dim": 768,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 336,
        "patch_size": 14,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
    },
}
# (original prefix, transformers Llava prefix), in the order they are tried.
KEY_PREFIXES = (
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("model.vision_tower.vision_tower.vision_model.", "model.vision_tower."),
    ("model.embed_tokens.", "model.language_model.embed_tokens."),
    ("model.layers.", "model.language_model.layers."),
    ("model.norm.", "model.language_model.norm."),
    ("lm_head.", "lm_head."),
)
EMBED_KEY, LM_HEAD_KEY = "model.language_model.embed_tokens.weight", "lm_head.weight"
HD_KEY = re.compile(r"^model\.layers\.(\d+)\.self_attn\.([kv])_proj_hd\.(weight|bias)$")
HR_KEY = re.compile(r"^model\.language_model\.layers\.(\d+)\.self_attn\.hr_([kv])_proj\.(weight|bias)$")
LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")
# Non-persistent buffers that older transformers versions saved; the model recomputes them.
IGNORED_KEY = re.compile(r"(rotary_emb\.inv_freq|embeddings\.position_ids)$")
# A CLIP checkpoint's vision weights: `vision_model.*` (CLIPModel, transformers 4.x) or at the root (5.x).
CLIP_VISION_ROOTS = ("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


# --- reading -------------------------------------------------------------------------------------------------


def _resolve_folder(name: str | Path, what: str, revision: str | None = None) -> Path:
    """A local folder, or a Hub repository's config and weights downloaded to the cache."""
    path = Path(name)
    if path.is_dir():
        return path
    if path.exists() or as_hub_repo_id(str(name)) is None:
        raise ValueError(f"The {what} {str(name)!r} is not a folder: pass a checkpoint folder or a Hub repo id.")
    try:
        files = [sibling.rfilename for sibling in HfApi().model_info(str(name), revision=revision).siblings]
    except Exception as error:
        raise ValueError(
            f"The {what} {str(name)!r} is neither a local folder nor a reachable Hub repository ({error}). "
            "Download it first (`hf download REPO --local-dir DIR`) and pass DIR."
        ) from error
    # Download one weight format only: safetensors when the repository has it.
    suffix = ".safetensors" if any(file.endswith(".safetensors") for file in files) else ".bin"
    patterns = ["config.json", f"*{suffix}", f"*{suffix}.index.json"]
    return Path(snapshot_download(str(name), revision=revision, allow_patterns=patterns))


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ValueError(f"The {what} has no {path.name} (looked in {path.parent}).")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}): download it again.") from error


def _weight_files(folder: Path, what: str) -> list[Path]:
    """The weight files of a checkpoint folder: those its index lists, else the single or globbed files."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = folder / index_name
        if index_path.is_file():
            names = sorted(set(_read_json(index_path, what).get("weight_map", {}).values()))
            missing = [name for name in names if not (folder / name).is_file()]
            if missing:
                raise ValueError(
                    f"{index_path} lists shards that are not in the folder: {missing}. Download them (or the whole "
                    "checkpoint) again."
                )
            return [folder / name for name in names]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return [folder / single]
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        raise ValueError(f"The {what} in {folder} has no weights (*.safetensors or *.bin files).")
    return files


def _read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors or `.bin` file; a `ValueError` naming the file if it cannot be read."""
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        raise ValueError(
            f"Cannot read {path} ({type(error).__name__}: {error}). The file is truncated or corrupt: download it "
            "again."
        ) from error


def _read_weights(files: list[Path]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in files:
        logger.info(f"Reading {path.name}")
        shard = _read_weight_file(path)
        if not isinstance(shard, dict):
            raise ValueError(f"{path} does not hold a state dict (got {type(shard).__name__}).")
        state.update(shard)
    return state


# --- config --------------------------------------------------------------------------------------------------


def _check_original_config(config: dict, folder: Path) -> None:
    """Reject inputs that are not in the authors' format, saying what to do with them instead."""
    model_type = config.get("model_type")
    if model_type == "flex_llava":
        raise ValueError(
            f"{folder} is already a flex_llava checkpoint: load it with `import hf_flexattention` and "
            "`AutoModelForImageTextToText.from_pretrained(path)`, or with `trust_remote_code=True` where the plugin "
            "is not installed."
        )
    if "text_config" in config or "vision_config" in config:
        raise ValueError(
            f"{folder} is a transformers Llava checkpoint (it has text_config/vision_config), not the authors' "
            "format: load it with `LlavaForConditionalGeneration.from_pretrained` and call "
            "`hf_flexattention.patch_model(model, n_fa=...)`."
        )
    if model_type not in ORIGINAL_MODEL_TYPES or "mm_vision_tower" not in config:
        raise ValueError(
            f"{folder}/config.json is not an original LLaVA config (model_type {model_type!r}, expected one of "
            f"{ORIGINAL_MODEL_TYPES} with `mm_vision_tower`)."
        )
    if "zoom_ratio" not in (config.get("extra") or {}):
        raise ValueError(
            f"{folder}/config.json has no `extra.zoom_ratio`: this is a plain LLaVA checkpoint, not FlexAttention. "
            "Convert it to the transformers Llava format (or use llava-hf/llava-1.5-7b-hf) and call "
            "`hf_flexattention.patch_model(model, n_fa=...)`."
        )
    unsupported = {
        "mm_projector_type": ("mlp2x_gelu",),
        "mm_patch_merge_type": ("flat",),
        "mm_use_im_start_end": (False,),
        "mm_vision_select_feature": tuple(SELECT_FEATURE),
    }
    for name, supported in unsupported.items():
        if name in config and config[name] not in supported:
            raise ValueError(
                f"`{name}: {config[name]!r}` is not supported by the transformers Llava model (supported: "
                f"{supported}); only LLaVA-1.5 style checkpoints convert."
            )
    if config.get("image_aspect_ratio", "pad") != "pad":
        logger.warning(
            f"The checkpoint was trained with image_aspect_ratio={config['image_aspect_ratio']!r}; FlexLlavaProcessor "
            "pads images to a square (LLaVA-1.5 'pad')."
        )


def _number(extra: dict, name: str) -> float:
    value = extra.get(name, CODE_DEFAULTS.get(name))
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"`extra.{name}` in config.json must be a number (as a string), got {value!r}.") from None


def _flex_settings(extra: dict, num_layers: int, image_size: int) -> dict:
    """FlexLlavaConfig fields from the official `extra` strings."""
    zoom = _number(extra, "zoom_ratio")
    if zoom != int(zoom) or zoom < 1:
        raise ValueError(f"`extra.zoom_ratio` must be a whole number >= 1, got {extra['zoom_ratio']!r}.")
    zoom = int(zoom)
    if "lowres_size" in extra and _number(extra, "lowres_size") != image_size:
        raise ValueError(
            f"`extra.lowres_size` is {extra['lowres_size']} but the vision tower takes {image_size} px images: pass "
            "the vision tower the checkpoint was trained with (--vision-tower)."
        )
    if "highres_size" in extra and _number(extra, "highres_size") != zoom * image_size:
        raise ValueError(
            f"`extra.highres_size` ({extra['highres_size']}) is not zoom_ratio x {image_size} px "
            f"({zoom * image_size})."
        )
    threshold = _number(extra, "threshold")
    if not 0 <= threshold < 255:
        raise ValueError(f"`extra.threshold` is on the official 0-255 scale, got {threshold:g}.")
    n_fa = num_layers - RELEASED_PLAIN_LAYERS
    if n_fa < 1:
        raise ValueError(
            f"The official code makes the decoder layers with index > {RELEASED_PLAIN_LAYERS - 1} FlexAttention "
            f"layers, but this checkpoint has {num_layers} layers: none would be. Only checkpoints with more than "
            f"{RELEASED_PLAIN_LAYERS} layers convert."
        )
    return {
        "flex_n_fa": n_fa,
        "flex_threshold": threshold / 255,
        "flex_zoom": zoom,
        "flex_high_res_ramp": _number(extra, "warmup"),
    }


def _vision_config(original: dict, vision_folder: Path | None) -> CLIPVisionConfig:
    if vision_folder is not None:
        config = CLIPVisionConfig.from_pretrained(vision_folder)
        if config.model_type != "clip_vision_model":
            raise ValueError(f"--vision-tower {vision_folder} is not a CLIP model (model_type {config.model_type!r}).")
    else:
        name = original["mm_vision_tower"]
        if name not in KNOWN_VISION_TOWERS:
            raise ValueError(
                f"The checkpoint's vision tower {name!r} has no built-in config: pass --vision-tower with its Hub id "
                "or a local copy."
            )
        config = CLIPVisionConfig(**KNOWN_VISION_TOWERS[name])
    mm_hidden_size = original.get("mm_hidden_size", config.hidden_size)
    if mm_hidden_size != config.hidden_size:
        raise ValueError(
            f"The vision tower's hidden size is {config.hidden_size} but the checkpoint's projector expects "
            f"mm_hidden_size={mm_hidden_size}: pass the vision tower it was trained with (--vision-tower)."
        )
    return config


def _text_config(original: dict) -> LlamaConfig:
    # The LLaMA fields sit at the top level of the original config, among LLaVA's own `mm_*`/training fields.
    generic = {field.name for field in dataclasses.fields(PreTrainedConfig)}
    names = {field.name for field in dataclasses.fields(LlamaConfig)} - generic | {"rope_theta", "rope_scaling"}
    return LlamaConfig(**{name: value for name, value in original.items() if name in names})


# --- weights -------------------------------------------------------------------------------------------------


def _rename(state: dict[str, torch.Tensor], first_flex_layer: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Original keys -> transformers Llava keys; returns the renamed state and the keys nothing maps."""
    renamed, unexpected = {}, []
    for key, tensor in state.items():
        if IGNORED_KEY.search(key):
            continue
        hd = HD_KEY.match(key)
        if hd is not None:
            layer, which, parameter = int(hd.group(1)), hd.group(2), hd.group(3)
            if layer >= first_flex_layer:  # the plain layers' hd projections are dead weights
                renamed[f"model.language_model.layers.{layer}.self_attn.hr_{which}_proj.{parameter}"] = tensor
            continue
        for source, target in KEY_PREFIXES:
            if key.startswith(source):
                renamed[target + key[len(source) :]] = tensor
                break
        else:
            unexpected.append(key)
    return renamed, unexpected


def _original_key(key: str) -> str:
    """The original name of a transformers Llava key (for error messages)."""
    hr = HR_KEY.match(key)
    if hr is not None:
        return f"model.layers.{hr.group(1)}.self_attn.{hr.group(2)}_proj_hd.{hr.group(3)}"
    for source, target in KEY_PREFIXES:
        if key.startswith(target):
            return source + key[len(target) :]
    return key


def _vision_tower_weights(folder: Path | None, trained_with: str) -> dict[str, torch.Tensor]:
    """The vision weights of a CLIP checkpoint folder, under the Llava model's `model.vision_tower.` prefix."""
    fix = f"pass --vision-tower with the CLIP model it was trained with ({trained_with}), weights included."
    has_weights = folder is not None and any(path.suffix in (".safetensors", ".bin") for path in folder.iterdir())
    if not has_weights:
        where = f" and --vision-tower {folder} has none either" if folder is not None else ""
        raise ValueError(
            f"The checkpoint has no vision tower weights (model.vision_tower.vision_tower.*){where}: {fix}"
        )
    weights = {}
    for key, tensor in _read_weights(_weight_files(folder, "vision tower")).items():
        name = key.removeprefix("vision_model.")
        if (key.startswith("vision_model.") or key.startswith(CLIP_VISION_ROOTS)) and not IGNORED_KEY.search(key):
            weights[f"model.vision_tower.{name}"] = tensor
    if not weights:
        raise ValueError(f"--vision-tower {folder} holds no CLIP vision weights (vision_model.* keys): {fix}")
    return weights


def _check_layers(state: dict[str, torch.Tensor], num_layers: int) -> None:
    layers = sorted({int(match.group(1)) for key in state if (match := LAYER_KEY.match(key))})
    if layers != list(range(num_layers)):
        found = f"{len(layers)} decoder layers (indices {layers[0]}..{layers[-1]})" if layers else "no decoder layers"
        raise ValueError(
            f"The weights hold {found} but config.json says num_hidden_layers={num_layers}: the config and the "
            "weights come from different checkpoints (or shards are missing). Use the config.json that came with "
            "these weights."
        )


def _resize_vocabulary(state: dict[str, torch.Tensor], rows: int) -> None:
    """Grow `embed_tokens` and `lm_head` to `rows` rows, new rows being the mean of the existing ones."""
    for key in (EMBED_KEY, LM_HEAD_KEY):
        matrix = state[key]
        if matrix.shape[0] >= rows:
            continue
        mean = matrix.float().mean(dim=0, keepdim=True).to(matrix.dtype)
        state[key] = torch.cat([matrix, mean.expand(rows - matrix.shape[0], -1)])


def _check_against_model(state: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    expected = model.state_dict()
    missing = sorted(_original_key(key) for key in expected if key not in state)
    if missing:
        shown = ", ".join(missing[:20]) + (f", ... ({len(missing)} in all)" if len(missing) > 20 else "")
        raise ValueError(
            f"The checkpoint lacks {len(missing)} weights that the converted model needs: {shown}. Download the "
            "complete checkpoint (all shards)"
            + (
                "; for a checkpoint without its vision tower, pass --vision-tower."
                if any(key.startswith("model.vision_tower.") for key in missing)
                else "."
            )
        )
    mismatched = [
        f"{_original_key(key)}: {tuple(state[key].shape)} vs {tuple(tensor.shape)}"
        for key, tensor in expected.items()
        if tuple(state[key].shape) != tuple(tensor.shape)
    ]
    if mismatched:
        raise ValueError(
            "Weight shapes do not match config.json (checkpoint vs config): "
            + "; ".join(mismatched[:10])
            + ". Use the config.json (and --vision-tower) that came with these weights."
        )


# --- processor -----------------------------------------------------------------------------------------------


def _load_processor(name: str, zoom: int, vision_config: CLIPVisionConfig) -> FlexLlavaProcessor:
    processor = AutoProcessor.from_pretrained(name)
    if not isinstance(processor, LlavaProcessor):
        raise TypeError(
            f"--processor {name} gives a {type(processor).__name__}; pass a Llava processor such as "
            "llava-hf/llava-1.5-7b-hf (same tokenizer plus `<image>`, CLIP image processor)."
        )
    processor = FlexLlavaProcessor.from_llava_processor(processor, zoom=zoom)
    if processor.low_res_size != vision_config.image_size or processor.patch_size != vision_config.patch_size:
        raise ValueError(
            f"--processor {name} prepares {processor.low_res_size} px images with patch {processor.patch_size}, but "
            f"the vision tower takes {vision_config.image_size} px with patch {vision_config.patch_size}."
        )
    return processor


# --- the conversion ------------------------------------------------------------------------------------------


def convert_checkpoint(
    source: str | Path,
    output: str | Path,
    *,
    vision_tower: str | Path | None = None,
    processor: str | Path | None = None,
    image_token_index: int | None = None,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    revision: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert an original-format FlexAttention checkpoint into a `flex_llava` checkpoint folder; return it.

    Args:
        source: folder or Hub repo id of the authors' checkpoint (e.g. `"senfu/llava-v1.5-7b-flexattn"`).
        output: folder to write; it must not exist (or be empty) unless `overwrite`. Nothing is left there if
            the conversion fails.
        vision_tower: folder or Hub id of the CLIP model (config; weights too when the checkpoint has none).
        processor: folder or Hub id of a Llava processor to wrap and save (e.g. `"llava-hf/llava-1.5-7b-hf"`);
            its tokenizer gives the `<image>` and pad token ids.
        image_token_index: id of the `<image>` token without `processor` (default: the vocabulary size).
        dtype: dtype of the written weights (default: that of the checkpoint's embeddings).
        max_shard_size: largest safetensors shard written.
        revision: Hub revision of `source`.
        overwrite: replace a non-empty `output` folder.
    """
    output = Path(output)
    if output.exists() and not overwrite and (not output.is_dir() or any(output.iterdir())):
        raise ValueError(
            f"The output {output} already exists and is not empty: choose another folder, or replace it with "
            "`--overwrite` (`overwrite=True` from Python)."
        )

    # Everything is read and checked before anything is written.
    folder = _resolve_folder(source, "checkpoint", revision)
    original = _read_json(folder / "config.json", "checkpoint")
    _check_original_config(original, folder)
    vision_folder = _resolve_folder(vision_tower, "vision tower") if vision_tower is not None else None
    vision_config = _vision_config(original, vision_folder)
    text_config = _text_config(original)
    num_layers = text_config.num_hidden_layers
    settings = _flex_settings(original["extra"], num_layers, vision_config.image_size)

    state = _read_weights(_weight_files(folder, "checkpoint"))
    _check_layers(state, num_layers)
    state, unexpected = _rename(state, first_flex_layer=num_layers - settings["flex_n_fa"])
    if unexpected:
        raise ValueError(
            f"The checkpoint holds {len(unexpected)} weights that are not part of a LLaVA-1.5 FlexAttention model: "
            f"{unexpected[:20]}. Is it the authors' format?"
        )
    if not any(key.startswith("model.vision_tower.") for key in state):
        state.update(_vision_tower_weights(vision_folder, original["mm_vision_tower"]))

    loaded_processor = None
    pad_token_id = text_config.pad_token_id
    embeddings = state.get(EMBED_KEY)
    rows = embeddings.shape[0] if embeddings is not None else text_config.vocab_size
    needed_rows = rows
    if processor is not None:
        loaded_processor = _load_processor(str(processor), settings["flex_zoom"], vision_config)
        tokenizer = loaded_processor.tokenizer
        image_token_index = tokenizer.convert_tokens_to_ids(loaded_processor.image_token)
        pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else pad_token_id
        needed_rows = max(needed_rows, len(tokenizer))
    if image_token_index is None:
        image_token_index = text_config.vocab_size  # the first id after the vocabulary, as llava-hf
    needed_rows = max(needed_rows, image_token_index + 1)
    if embeddings is not None and needed_rows > rows:
        new_rows = math.ceil(needed_rows / VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        logger.info(f"Growing the vocabulary from {rows} to {new_rows} rows for the <image> token.")
        _resize_vocabulary(state, new_rows)
        text_config.vocab_size = new_rows
    text_config.pad_token_id = pad_token_id

    grid = vision_config.image_size // vision_config.patch_size
    strategy = SELECT_FEATURE[original.get("mm_vision_select_feature", "patch")]
    config = FlexLlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_token_index,
        image_seq_length=grid * grid,
        vision_feature_layer=original.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=original.get("tie_word_embeddings", False),
        **settings,
    )
    with torch.device("meta"):  # no memory and no random init: every weight comes from the checkpoint
        model = FlexLlavaForConditionalGeneration(config)
    _check_against_model(state, model)
    dtype = dtype or state[EMBED_KEY].dtype
    state = {key: tensor.to(dtype) if tensor.is_floating_point() else tensor for key, tensor in state.items()}
    model.load_state_dict(state, strict=True, assign=True)

    return _write(model, loaded_processor, output, source, max_shard_size, overwrite)


def _write(model, processor, output: Path, source, max_shard_size, overwrite: bool) -> Path:
    """Save into a staging folder next to `output` and move it into place, so a failure leaves no output."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        logger.info(f"Writing {output}")
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        if processor is not None:
            processor.save_pretrained(staging)
        card = create_model_card(
            model, repo_id=output.name, base_model=as_hub_repo_id(str(source)), has_processor=processor is not None
        )
        card.save(staging / "README.md")
        if output.exists():
            if not overwrite and (not output.is_dir() or any(output.iterdir())):
                raise ValueError(f"The output {output} appeared during the conversion: nothing was written to it.")
            if output.is_dir():
                shutil.rmtree(output)
            else:
                output.unlink()
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


def main(argv: list[str] | None = None) -> int:
    """Command line: `python -m hf_flexattention.convert SOURCE OUTPUT [options]`."""
    parser = argparse.ArgumentParser(
        prog="python -m hf_flexattention.convert",
        description="Convert the authors' FlexAttention checkpoint (original LLaVA format, e.g. "
        "senfu/llava-v1.5-7b-flexattn) into a flex_llava checkpoint for transformers.",
    )
    parser.add_argument("source", help="folder or Hub repo id of the original checkpoint")
    parser.add_argument("output", help="folder to write (must not exist, or be empty)")
    parser.add_argument(
        "--vision-tower", help="folder or Hub id of the CLIP model (needed when the checkpoint has none)"
    )
    parser.add_argument(
        "--processor", help="folder or Hub id of a Llava processor to save with it (llava-hf/llava-1.5-7b-hf)"
    )
    parser.add_argument(
        "--image-token-index", type=int, help="id of <image> without --processor (default: vocab size)"
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="dtype of the written weights (default: as stored)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default: 5GB)")
    parser.add_argument("--revision", help="Hub revision of SOURCE")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUTPUT folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = convert_checkpoint(
            args.source,
            args.output,
            vision_tower=args.vision_tower,
            processor=args.processor,
            image_token_index=args.image_token_index,
            dtype=DTYPES[args.dtype] if args.dtype else None,
            max_shard_size=args.max_shard_size,
            revision=args.revision,
            overwrite=args.overwrite,
        )
    except (ValueError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"Converted {args.source} -> {path}")
    if args.processor:
        print(
            f"Try it (its trained hr projections and settings load as saved): python -m hf_flexattention.demo "
            f"--model {path} --image IMAGE --prompt QUESTION"
        )
    else:
        print("No processor was saved with it: convert with --processor llava-hf/llava-1.5-7b-hf to run it as is.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
