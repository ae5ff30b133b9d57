"""Share FlexAttention models on the Hugging Face Hub with a model card.

`model.save_pretrained` / `model.push_to_hub` of a FlexAttention model already write what loading needs: safetensors
weights, a `config.json` with `model_type: flex_llava` and an `auto_map`, and the flat remote-code files, so the
checkpoint loads with the plugin imported or, without it, with `trust_remote_code=True`. These helpers also write a
model card (`README.md`: library, tags, base model, the FlexAttention settings, how to load it both ways, the paper's
citation) and the processor, in one commit:

```python
>>> from hf_flexattention.hub import push_to_hub
>>> push_to_hub(model, "me/llava-flex", processor=processor)   # model + processor + README.md
>>> push_to_hub(peft_model, "me/llava-flex-lora")             # a LoRA adapter of a patched model
```

This module is not remote code: the files shipped next to checkpoints never import it.
"""

import os
import tempfile
from pathlib import Path

from huggingface_hub import CommitInfo, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import LlavaForConditionalGeneration

from .adapters import SETTINGS_FILE, write_adapter_settings
from .patching import family_by_model_type, is_patched
from .processing_flex_llava import FlexLlavaProcessor


LIBRARY_NAME = "hf_flexattention"
PAPER_URL = "https://arxiv.org/abs/2407.20228"
CARD_TAGS = ("hf_flexattention", "flexattention", "llava", "high-resolution", "arxiv:2407.20228")
CITATION = """@inproceedings{li2024flexattention,
  title     = {FlexAttention for Efficient High-Resolution Vision-Language Models},
  author    = {Li, Junyan and Chen, Delin and Cai, Tianle and Chen, Peihao and Hong, Yining and Chen, Zhenfang
               and Shen, Yikang and Gan, Chuang},
  booktitle = {European Conference on Computer Vision (ECCV)},
  year      = {2024},
  eprint    = {2407.20228},
  archivePrefix = {arXiv}
}"""
LOAD_FIXES = (
    'Loading it with neither fails with *"contains custom code which must be executed"*: install and import '
    "`hf_flexattention`, or pass `trust_remote_code=True`."
)
EXAMPLE_PROMPT = "USER: <image>\\nWhat is written on the sign? ASSISTANT:"


# --- what can be shared --------------------------------------------------------------------------------------


def _is_flex_model(model) -> bool:
    # A model loaded with trust_remote_code has the same class name but is not the plugin's class.
    return is_patched(model) or (
        type(model).__name__ == "FlexLlavaForConditionalGeneration" and hasattr(model.config, "flex_n_fa")
    )


def _peft_base(model):
    """The model under a `PeftModel`, or None when `model` is not one."""
    try:
        from peft import PeftModel
    except ImportError:  # peft is optional at run time
        return None
    return model.get_base_model() if isinstance(model, PeftModel) else None


def _check_shareable(model):
    """Return the FlexAttention model (the base model of a PEFT model); raise with the fix for anything else."""
    base = _peft_base(model)
    if base is not None:
        if not _is_flex_model(base):
            raise TypeError(
                "This PEFT model's base model is not patched with FlexAttention. Call "
                "`patch_model(base_model, n_fa=...)` before `get_peft_model`, then train and share the adapter; to "
                "share a stock Llava adapter, use `peft_model.push_to_hub(repo_id)`."
            )
        return base
    if _is_flex_model(model):
        return model
    if isinstance(model, LlavaForConditionalGeneration):
        raise TypeError(
            f"This {type(model).__name__} is not patched with FlexAttention: call "
            "`hf_flexattention.patch_model(model, n_fa=...)` first, or share it as a stock Llava model with "
            "`model.push_to_hub(repo_id)`."
        )
    raise TypeError(
        "Expected a FlexAttention model (a Llava model patched with `hf_flexattention.patch_model`) or a PEFT model "
        f"built on one, got {type(model).__name__}."
    )


def _check_processor(processor, config) -> None:
    if processor is None:
        return
    family = family_by_model_type(config.model_type)
    if not family.has_zoom:  # an any-resolution family
        name = family.flex_processor_class.__name__
        if type(processor).__name__ != name:
            raise TypeError(
                f"`processor` must be a {name}, got {type(processor).__name__}. Wrap the stock processor with "
                f"`{family.wrap_call()}`."
            )
        return
    if not (isinstance(processor, FlexLlavaProcessor) or type(processor).__name__ == "FlexLlavaProcessor"):
        raise TypeError(
            f"`processor` must be a FlexLlavaProcessor, got {type(processor).__name__}. Wrap a Llava processor with "
            f"`FlexLlavaProcessor.from_llava_processor(processor, zoom={config.flex_zoom})`."
        )
    if processor.zoom != config.flex_zoom:
        raise ValueError(
            f"The processor's zoom={processor.zoom} does not match the model's flex_zoom={config.flex_zoom}: "
            f"rebuild it with `FlexLlavaProcessor.from_llava_processor(processor, zoom={config.flex_zoom})`."
        )


def as_hub_repo_id(name: str | None) -> str | None:
    """`name` if it is a Hub repo id (`namespace/name`, not a local folder), else None."""
    if not name or os.path.isdir(name) or os.path.isabs(name):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name if "/" in name else None


# --- the card ------------------------------------------------------------------------------------------------


def _settings_table(config) -> str:
    text_config, vision = config.text_config, config.vision_config
    layers = text_config.num_hidden_layers
    first = config.first_flex_layer
    if config.flex_n_fa == 0:
        n_fa = "0 (patched but inert: every layer is plain)"
    else:
        span = f"layer {first}" if config.flex_n_fa == 1 else f"layers {first}-{layers - 1}"
        n_fa = f"{config.flex_n_fa} FlexAttention layer{'s' if config.flex_n_fa > 1 else ''} ({span} of {layers})"
    grid = config.resolved_selection_grid
    selection = {
        "threshold": f"`threshold`: cells above {config.flex_threshold:.4g} "
        f"({config.flex_threshold * 255:.4g}/255) of the min-max normalised map, pooled to {grid}x{grid}",
        "topk": f"`topk`: a budget of the {config.topk_cells} strongest of {grid}x{grid} cells per row "
        f"(`flex_topk_ratio={config.flex_topk_ratio:g}`)",
        "random": f"`random`: each of {grid}x{grid} cells with p={config.flex_random_p:g} "
        f"(seed {config.flex_random_seed})",
    }[config.flex_selection]
    rows = [
        ("`flex_n_fa`", n_fa),
        ("`flex_threshold`", f"{config.flex_threshold:.6g}"),
        _high_res_row(config),
        ("`flex_selection`", selection),
        ("`flex_high_res_ramp`", f"{config.flex_high_res_ramp:g} (training: alpha = min(1, epoch x ramp))"),
        ("language model", f"{text_config.model_type}, {layers} layers, hidden size {text_config.hidden_size}"),
        (
            "vision tower",
            f"{vision.model_type}, {vision.image_size} px, patch {vision.patch_size} "
            f"({config.low_res_grid**2} low-res image tokens in the sequence)",
        ),
    ]
    return "| setting | value |\n|---|---|\n" + "\n".join(f"| {name} | {value} |" for name, value in rows)


def _high_res_row(config) -> tuple[str, str]:
    if getattr(config, "flex_zoom", None) is None:  # an any-resolution family: the crops are the high-res view
        shrunk = f", shrunk as `{config.vision_aspect_ratio}` says" if hasattr(config, "vision_aspect_ratio") else ""
        return (
            "high-res tokens",
            f"the unpadded any-resolution crops of `image_grid_pinpoints` {config.image_grid_pinpoints}{shrunk} (the "
            "prompt holds the base image's tokens only)",
        )
    side = config.high_res_grid
    return (
        "`flex_zoom`",
        f"{config.flex_zoom} ({config.flex_zoom * config.vision_config.image_size} px high-res image, "
        f"{side}x{side} = {side**2} high-res tokens)",
    )


def _usage(repo_id: str, base_model: str | None, config, has_processor: bool | None) -> str:
    zoom = getattr(config, "flex_zoom", None)

    def load(trust: str) -> str:
        lines = f'model = AutoModelForImageTextToText.from_pretrained("{repo_id}"{trust})'
        if has_processor is not False:
            lines += f'\nprocessor = AutoProcessor.from_pretrained("{repo_id}"{trust})'
        return lines

    build_processor = ""
    if not has_processor:
        condition = (
            "This repository holds no processor"
            if has_processor is False
            else ("If this repository holds no processor (`processor_config.json`)")
        )
        base = base_model or "BASE_LLAVA_MODEL"
        family = family_by_model_type(config.model_type)
        name = family.flex_processor_class.__name__
        wrap_processor = (
            f"from hf_flexattention import {name}\n\n"
            f'processor = {name}.{family.wrap}(AutoProcessor.from_pretrained("{base}"))'
            if zoom is None
            else "from hf_flexattention import FlexLlavaProcessor\n\n"
            f'llava_processor = AutoProcessor.from_pretrained("{base}")\n'
            f"processor = FlexLlavaProcessor.from_llava_processor(llava_processor, zoom={zoom})"
        )
        build_processor = f"""

{condition}, build one from the base model's with the plugin:

```python
{wrap_processor}
```"""
    return f"""With the plugin (`hf_flexattention`, installed from its source repository: it is not on PyPI
yet; importing it registers the FlexAttention model types):

```python
import hf_flexattention  # noqa: F401
from transformers import AutoModelForImageTextToText, AutoProcessor

{load("")}
```

Without the plugin, with the code shipped in this repository:

```python
from transformers import AutoModelForImageTextToText, AutoProcessor

{load(", trust_remote_code=True")}
```

{LOAD_FIXES}{build_processor}

Then, with a LLaVA-1.5 style prompt:

```python
from PIL import Image

inputs = processor(images=Image.open("image.jpg"), text="{EXAMPLE_PROMPT}", return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=32)
print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```"""


def create_model_card(
    model,
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    has_processor: bool | None = None,
    tags: list[str] | None = None,
) -> ModelCard:
    """The model card of a FlexAttention model: metadata, settings, how to load it both ways, the citation.

    Args:
        model: a FlexAttention model (patched with `patch_model`, or loaded as one).
        repo_id: the repository the card describes (used in the loading snippets).
        base_model: the Hub id of the model it was made from; defaults to the model's `name_or_path` when that is
            a Hub id.
        has_processor: whether the repository holds a `FlexLlavaProcessor`; the card says how to build one when
            it does not (False) or may not (None).
        tags: extra Hub tags (the model's `model_tags` are added too).
    """
    _check_shareable(model)
    if _peft_base(model) is not None:
        raise TypeError(
            "create_model_card describes full FlexAttention models; for a PEFT adapter use "
            "`hf_flexattention.hub.save_pretrained` or `push_to_hub`, which extend PEFT's adapter card."
        )
    config = model.config
    base_model = as_hub_repo_id(base_model) or as_hub_repo_id(getattr(model, "name_or_path", None))
    title = repo_id.split("/")[-1] if repo_id else "FlexAttention Llava model"
    all_tags = ["transformers", "image-text-to-text", *CARD_TAGS, *(getattr(model, "model_tags", None) or [])]
    data = ModelCardData(
        library_name=LIBRARY_NAME,
        pipeline_tag="image-text-to-text",
        tags=list(dict.fromkeys(all_tags + list(tags or []))),
        base_model=base_model,
    )
    based_on = f" It was made from [{base_model}](https://huggingface.co/{base_model})." if base_model else ""
    body = f"""# {title}

A Llava model with **FlexAttention** ([Li et al., ECCV 2024]({PAPER_URL})), saved with `hf_flexattention`.{based_on}
The image enters the language model as {config.low_res_grid**2} low-resolution tokens only; in the top
{config.flex_n_fa} decoder layers, the rows that predict the answer also attend to a few high-resolution image tokens,
selected from the attention of the layer below.

## FlexAttention settings

{_settings_table(config)}

## How to load

{_usage(repo_id or "REPO_ID", base_model, config, has_processor)}

## Citation

```bibtex
{CITATION}
```
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def _adapter_card(card_path: Path, peft_model, repo_id: str | None, base_model: str | None, tags) -> ModelCard:
    """PEFT's adapter card with the FlexAttention tags, how to load the adapter both ways, and the citation."""
    card = ModelCard.load(card_path) if card_path.exists() else ModelCard(f"---\n{ModelCardData().to_yaml()}\n---\n")
    adapter_base = next(iter(peft_model.peft_config.values())).base_model_name_or_path
    base_model = as_hub_repo_id(base_model) or as_hub_repo_id(adapter_base)
    card.data.base_model = base_model  # a local path would fail the Hub's metadata validation
    card.data.tags = sorted({*(card.data.tags or []), *CARD_TAGS, *(tags or [])})
    base, repo_id = base_model or "BASE_FLEX_MODEL", repo_id or "REPO_ID"
    card.text += f"""

## FlexAttention adapter

A PEFT adapter of a FlexAttention model ([Li et al., ECCV 2024]({PAPER_URL}), via `hf_flexattention`). Its
`{SETTINGS_FILE}` records the FlexAttention settings of the base it was trained on; `load_adapter` patches a stock
base with them (or stops if a patched base differs), so the trained high-res projections are never dropped:

```python
from hf_flexattention.adapters import load_adapter
from transformers import AutoModelForImageTextToText

model = load_adapter(AutoModelForImageTextToText.from_pretrained("{base}"), "{repo_id}")
```

Without the plugin, load a FlexAttention base with the code its repository ships, then the adapter with PEFT:
`PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained("{base}", trust_remote_code=True),
"{repo_id}")`. {LOAD_FIXES}

```bibtex
{CITATION}
```
"""
    return card


def write_model_card(
    model,
    save_directory: str | os.PathLike,
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    tags: list[str] | None = None,
    overwrite: bool = True,
) -> Path:
    """Write the model card of a FlexAttention model saved in `save_directory` as its `README.md`; return the path.

    With `overwrite=False` an existing `README.md` (the user's own card) is kept. Whether the folder holds a
    processor is read from its `processor_config.json`.
    """
    path = Path(save_directory) / "README.md"
    if overwrite or not path.exists():
        has_processor = True if (path.parent / "processor_config.json").is_file() else None
        card = create_model_card(model, repo_id=repo_id, base_model=base_model, has_processor=has_processor, tags=tags)
        card.save(path)
    return path


# --- save and push -------------------------------------------------------------------------------------------


def save_pretrained(
    model,
    save_directory: str | os.PathLike,
    processor: FlexLlavaProcessor | None = None,
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    tags: list[str] | None = None,
    **save_kwargs,
) -> None:
    """`model.save_pretrained(save_directory)`, plus the processor and a model card (`README.md`, replaced).

    Works for a FlexAttention model and for a PEFT model built on one (then PEFT's adapter card gains the
    FlexAttention sections). `repo_id` names the repository in the card's snippets; `save_kwargs` go to
    `save_pretrained` (e.g. `max_shard_size`).
    """
    flex_model = _check_shareable(model)
    _check_processor(processor, flex_model.config)
    save_directory = Path(save_directory)
    model.save_pretrained(save_directory, **save_kwargs)
    if processor is not None:
        processor.save_pretrained(save_directory)
    if _peft_base(model) is not None:
        write_adapter_settings(model, save_directory)
        card_path = save_directory / "README.md"
        _adapter_card(card_path, model, repo_id, base_model, tags).save(card_path)
    else:
        write_model_card(model, save_directory, repo_id=repo_id, base_model=base_model, tags=tags)


def push_to_hub(
    model,
    repo_id: str,
    processor: FlexLlavaProcessor | None = None,
    *,
    base_model: str | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = "5GB",
    tags: list[str] | None = None,
) -> CommitInfo:
    """Push a FlexAttention model (or a PEFT adapter of one), its processor and a model card in one commit.

    Takes the keyword arguments of transformers' `push_to_hub`. The repository (and the `revision` branch) is
    created if needed, and its `README.md` is replaced by the generated card. The result loads with
    `AutoModelForImageTextToText.from_pretrained(repo_id)` where `hf_flexattention` is imported, and with
    `trust_remote_code=True` where it is not.
    """
    flex_model = _check_shareable(model)  # fail before anything is created on the Hub
    _check_processor(processor, flex_model.config)
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and not revision.startswith("refs/pr"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    is_adapter = _peft_base(model) is not None
    with tempfile.TemporaryDirectory() as folder:
        save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
        save_pretrained(model, folder, processor, repo_id=repo_id, base_model=base_model, tags=tags, **save_kwargs)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message or f"Upload FlexAttention {'adapter' if is_adapter else 'model'}",
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
        )


__all__ = ["create_model_card", "push_to_hub", "save_pretrained", "write_model_card"]
