"""`hf_flexattention.convert`: the authors' checkpoint format -> flex_llava (issue 4).

Each test writes a tiny checkpoint in the authors' format itself (original LLaVA key names, written here by hand
rather than by the converter's own tables, and `k_proj_hd`/`v_proj_hd` that differ from `k_proj`/`v_proj` in every
layer), converts it, and compares the result with the same weights patched directly.
"""

import copy
import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPConfig, LlavaProcessor

from hf_flexattention import FlexLlavaConfig, FlexLlavaForConditionalGeneration, FlexLlavaProcessor, patch_model
from hf_flexattention.convert import convert_checkpoint, main
from hf_flexattention.tiny import TINY_IMAGE_TOKEN_ID, build_tiny_llava

from .conftest import PROMPTS, make_image


NUM_LAYERS = 11  # the official rule keeps layers 0..8 plain: 2 FlexAttention layers
N_FA = NUM_LAYERS - 9
EXTRA = {"highres_size": "96", "lowres_size": "32", "threshold": "48", "warmup": "10", "zoom_ratio": "3"}


# --- writing the authors' format -----------------------------------------------------------------------------


def original_key(key: str) -> str:
    """transformers Llava key -> the original LLaVA key (the inverse of the conversion, spelled out by hand)."""
    renames = {
        "model.language_model.": "model.",
        "model.vision_tower.": "model.vision_tower.vision_tower.vision_model.",
        "model.multi_modal_projector.linear_1.": "model.mm_projector.0.",
        "model.multi_modal_projector.linear_2.": "model.mm_projector.2.",
        "lm_head.": "lm_head.",
    }
    for prefix, original in renames.items():
        if key.startswith(prefix):
            return original + key[len(prefix) :]
    raise AssertionError(key)


def original_config(model, **overrides) -> dict:
    """An original LLaVA-1.5 config.json (LLaMA fields at the top level, `mm_*`, `extra` strings)."""
    text = model.config.text_config
    config = {
        "_name_or_path": "../llava-v1.5-7b-2",
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": text.bos_token_id,
        "eos_token_id": text.eos_token_id,
        "pad_token_id": text.pad_token_id,
        "hidden_act": "silu",
        "hidden_size": text.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": text.intermediate_size,
        "max_position_embeddings": text.max_position_embeddings,
        "num_attention_heads": text.num_attention_heads,
        "num_hidden_layers": text.num_hidden_layers,
        "num_key_value_heads": text.num_key_value_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": text.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.37.2",
        "use_cache": True,
        "vocab_size": text.vocab_size,
        "extra": dict(EXTRA),
        "freeze_mm_mlp_adapter": False,
        "image_aspect_ratio": "pad",
        "mm_hidden_size": model.config.vision_config.hidden_size,
        "mm_patch_merge_type": "flat",
        "mm_projector_lr": None,
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": "openai/clip-vit-tiny-test",
        "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right",
        "tune_mm_mlp_adapter": False,
        "use_mm_proj": True,
    }
    config.update(overrides)
    return config


def high_res_weights(model, seed: int = 1) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Trained-looking hd projections for every layer: k/v plus noise, so they differ from k_proj/v_proj."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for index, layer in enumerate(model.model.language_model.layers):
        k, v = layer.self_attn.k_proj.weight, layer.self_attn.v_proj.weight
        weights[index] = tuple(w + 0.05 * torch.randn(w.shape, generator=generator) for w in (k, v))
    return weights


def original_state_dict(model, hd, *, with_vision: bool = True) -> dict[str, torch.Tensor]:
    state = {}
    for key, tensor in model.state_dict().items():
        if key.startswith("model.vision_tower.") and not with_vision:
            continue
        if key.endswith("position_ids") or "rotary_emb" in key:  # non-persistent in transformers 4.37 too
            continue
        state[original_key(key)] = tensor.clone()
    for index, (k, v) in hd.items():
        state[f"model.layers.{index}.self_attn.k_proj_hd.weight"] = k.clone()
        state[f"model.layers.{index}.self_attn.v_proj_hd.weight"] = v.clone()
    return state


def write_original(folder: Path, state: dict, config: dict, *, fmt: str = "safetensors", shards: int = 1) -> Path:
    """Write `state` as the authors' checkpoint: one file, or `shards` files plus an index json."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    suffix = ".safetensors" if fmt == "safetensors" else ".bin"
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    keys = sorted(state)
    if shards == 1:
        groups = {f"{stem}{suffix}": keys}
    else:
        groups = {f"{stem}-{i + 1:05d}-of-{shards:05d}{suffix}": keys[i::shards] for i in range(shards)}
    for name, group in groups.items():
        part = {key: state[key].contiguous() for key in group}
        if fmt == "safetensors":
            save_file(part, folder / name, metadata={"format": "pt"})
        else:
            torch.save(part, folder / name)
    if shards > 1:
        weight_map = {key: name for name, group in groups.items() for key in group}
        (folder / f"{stem}{suffix}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def write_clip(folder: Path, model, *, with_weights: bool) -> Path:
    """A CLIP checkpoint as on the Hub (CLIPModel config; `vision_model.*` and `text_model.*` weights)."""
    vision = model.config.vision_config
    text = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    CLIPConfig(vision_config=vision.to_dict(), text_config=text, projection_dim=vision.projection_dim).save_pretrained(
        folder
    )
    if with_weights:
        prefix = "model.vision_tower."
        weights = {
            "vision_model." + key[len(prefix) :]: tensor.clone()
            for key, tensor in model.state_dict().items()
            if key.startswith(prefix) and not key.endswith("position_ids")
        }
        weights["text_model.embeddings.token_embedding.weight"] = torch.zeros(10, 16)
        weights["logit_scale"] = torch.tensor(2.0)
        save_file(weights, folder / "model.safetensors")
    return folder


def save_llava_processor(folder: Path, flex_processor) -> Path:
    """A stock LlavaProcessor with the tiny tokenizer and image processor (what llava-hf ships)."""
    LlavaProcessor(
        image_processor=flex_processor.image_processor,
        tokenizer=flex_processor.tokenizer,
        patch_size=flex_processor.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def stock():
    return build_tiny_llava(num_layers=NUM_LAYERS)


@pytest.fixture(scope="module")
def hd(stock):
    return high_res_weights(stock)


@pytest.fixture(scope="module")
def reference(stock, hd):
    """What the conversion must produce: the stock weights patched directly, hd weights in the hr projections."""
    model = patch_model(copy.deepcopy(stock), n_fa=N_FA, threshold=48 / 255, zoom=3, high_res_ramp=10.0)
    with torch.no_grad():
        for index in range(NUM_LAYERS - N_FA, NUM_LAYERS):
            attention = model.model.language_model.layers[index].self_attn
            attention.hr_k_proj.weight.copy_(hd[index][0])
            attention.hr_v_proj.weight.copy_(hd[index][1])
    return model


@pytest.fixture
def checkpoint(tmp_path, stock, hd):
    """A single-file safetensors checkpoint in the authors' format, with its vision tower."""
    return write_original(tmp_path / "original", original_state_dict(stock, hd), original_config(stock))


@pytest.fixture
def clip_config_only(tmp_path, stock):
    return write_clip(tmp_path / "clip-config", stock, with_weights=False)


def config_fields(config) -> dict:
    """A config as a dict, without the fields that say where and how it was loaded rather than what it is."""
    fields = config.to_dict()
    for name in ("dtype", "_name_or_path", "architectures", "transformers_version", "auto_map"):
        fields.pop(name, None)
        for sub in ("text_config", "vision_config"):
            fields[sub].pop(name, None)
    return fields


def assert_state_dicts_identical(first, second):
    first, second = first.state_dict(), second.state_dict()
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


# --- conversion ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt,shards,vision_in_checkpoint",
    [("safetensors", 3, True), ("bin", 2, False)],
    ids=["sharded-safetensors+tower-in-checkpoint", "sharded-bin+tower-from-clip"],
)
def test_converted_checkpoint_equals_the_directly_patched_model(
    tmp_path, stock, hd, reference, processor, single_inputs, fmt, shards, vision_in_checkpoint
):
    state = original_state_dict(stock, hd, with_vision=vision_in_checkpoint)
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # saved by older transformers: ignored
    source = write_original(tmp_path / "original", state, original_config(stock), fmt=fmt, shards=shards)
    clip = write_clip(tmp_path / "clip", stock, with_weights=not vision_in_checkpoint)
    llava_processor = save_llava_processor(tmp_path / "llava-processor", processor)

    output = convert_checkpoint(source, tmp_path / "converted", vision_tower=clip, processor=llava_processor)

    files = sorted(path.name for path in output.iterdir())
    assert "model.safetensors" in files and "README.md" in files and "modeling_flex_llava.py" in files
    assert not [name for name in files if name.endswith((".bin", ".pt"))]
    saved = json.loads((output / "config.json").read_text())
    assert saved["model_type"] == "flex_llava" and "AutoModelForImageTextToText" in saved["auto_map"]

    converted = FlexLlavaForConditionalGeneration.from_pretrained(output)
    assert isinstance(converted.config, FlexLlavaConfig)
    settings = (
        "flex_n_fa",
        "flex_threshold",
        "flex_zoom",
        "flex_high_res_ramp",
        "flex_selection",
        "flex_selection_grid",
    )
    assert {name: getattr(converted.config, name) for name in settings} == {
        name: getattr(reference.config, name) for name in settings
    }
    assert converted.config.flex_threshold == 48 / 255 and converted.config.flex_n_fa == N_FA
    assert converted.config.image_token_id == TINY_IMAGE_TOKEN_ID
    assert config_fields(converted.config) == config_fields(reference.config)
    assert_state_dicts_identical(converted, reference)
    hr_layers = [
        i for i, layer in enumerate(converted.model.language_model.layers) if hasattr(layer.self_attn, "hr_k_proj")
    ]
    assert hr_layers == list(range(NUM_LAYERS - N_FA, NUM_LAYERS))  # the dead hd weights of layers 0..8 are dropped
    with torch.no_grad():
        assert torch.equal(converted(**single_inputs).logits, reference(**single_inputs).logits)

    converted_processor = FlexLlavaProcessor.from_pretrained(output)
    assert converted_processor.zoom == 3
    again = converted_processor(images=make_image(1), text=PROMPTS[0], return_tensors="pt")
    for key, value in single_inputs.items():
        assert torch.equal(again[key], value), key


def test_a_checkpoint_without_image_token_grows_the_vocabulary(tmp_path, stock, hd, single_inputs):
    vocab = TINY_IMAGE_TOKEN_ID  # the original vocabulary ends before <image>, as LLaVA's 32000 tokens
    state = original_state_dict(stock, hd)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        state[key] = state[key][:vocab].clone()
    source = write_original(tmp_path / "original", state, original_config(stock, vocab_size=vocab))
    clip = write_clip(tmp_path / "clip", stock, with_weights=False)

    converted = FlexLlavaForConditionalGeneration.from_pretrained(
        convert_checkpoint(source, tmp_path / "converted", vision_tower=clip)
    )
    assert converted.config.image_token_id == vocab  # the first id after the vocabulary, as llava-hf
    assert converted.config.text_config.vocab_size == 64 * 2  # padded to a multiple of 64
    for module, key in (
        (converted.get_input_embeddings(), "model.embed_tokens.weight"),
        (converted.lm_head, "lm_head.weight"),
    ):
        assert torch.equal(module.weight[:vocab], state[key])
        assert torch.equal(module.weight[vocab:], state[key].mean(dim=0, keepdim=True).expand(128 - vocab, -1))
    with torch.no_grad():
        out = converted.generate(**single_inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == single_inputs["input_ids"].shape[1] + 3


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # runpy re-runs an imported module
def test_the_command_line_converts(tmp_path, checkpoint, clip_config_only, reference, monkeypatch, capsys):
    output = tmp_path / "converted"
    argv = [str(checkpoint), str(output), "--vision-tower", str(clip_config_only)]
    argv += ["--image-token-index", str(TINY_IMAGE_TOKEN_ID), "--dtype", "float32"]
    monkeypatch.setattr(sys, "argv", ["python -m hf_flexattention.convert", *argv])
    with pytest.raises(SystemExit) as exit_info:  # `python -m hf_flexattention.convert ...`, in process
        runpy.run_module("hf_flexattention.convert", run_name="__main__")
    assert exit_info.value.code == 0, capsys.readouterr().err
    assert "convert with --processor llava-hf/llava-1.5-7b-hf" in capsys.readouterr().out
    assert_state_dicts_identical(FlexLlavaForConditionalGeneration.from_pretrained(output), reference)


def test_the_command_line_reports_bad_input_without_a_traceback(tmp_path, checkpoint, capsys):
    assert main([str(checkpoint), str(tmp_path / "converted")]) == 2  # the tiny tower has no built-in config
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "--vision-tower" in error and "Traceback" not in error
    assert not (tmp_path / "converted").exists()


# --- bad input -----------------------------------------------------------------------------------------------


def assert_nothing_written(parent: Path, name: str = "converted"):
    assert not (parent / name).exists()
    assert not list(parent.glob(f".{name}.partial-*"))


def test_missing_keys_are_listed(tmp_path, stock, hd, clip_config_only):
    state = original_state_dict(stock, hd)
    del state["model.layers.10.self_attn.v_proj_hd.weight"], state["model.mm_projector.2.bias"]
    del state["model.layers.3.mlp.up_proj.weight"]
    del state["model.layers.4.self_attn.k_proj_hd.weight"]  # a plain layer's hd weight is not needed
    source = write_original(tmp_path / "original", state, original_config(stock))
    with pytest.raises(ValueError, match="lacks 3 weights") as error:
        convert_checkpoint(source, tmp_path / "converted", vision_tower=clip_config_only)
    for key in (
        "model.layers.10.self_attn.v_proj_hd.weight",
        "model.mm_projector.2.bias",
        "model.layers.3.mlp.up_proj.weight",
    ):
        assert key in str(error.value)
    assert_nothing_written(tmp_path)


def test_a_checkpoint_without_vision_tower_asks_for_one(tmp_path, stock, hd, clip_config_only):
    source = write_original(
        tmp_path / "original", original_state_dict(stock, hd, with_vision=False), original_config(stock)
    )
    with pytest.raises(ValueError, match="pass --vision-tower"):
        convert_checkpoint(source, tmp_path / "converted", vision_tower=clip_config_only)  # config only: no weights
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("num_hidden_layers", [NUM_LAYERS + 1, NUM_LAYERS - 1])
def test_a_layer_count_that_does_not_match_the_config_is_rejected(
    tmp_path, stock, hd, clip_config_only, num_hidden_layers
):
    config = original_config(stock, num_hidden_layers=num_hidden_layers)
    source = write_original(tmp_path / "original", original_state_dict(stock, hd), config)
    with pytest.raises(ValueError, match=rf"11 decoder layers .* num_hidden_layers={num_hidden_layers}"):
        convert_checkpoint(source, tmp_path / "converted", vision_tower=clip_config_only)
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_corrupt_weight_file_is_named_and_nothing_is_written(tmp_path, stock, hd, clip_config_only, fmt, damage):
    source = write_original(
        tmp_path / "original", original_state_dict(stock, hd), original_config(stock), fmt=fmt, shards=2
    )
    shard = sorted(source.glob(f"*-00002-of-00002.{fmt}"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a weight file" * 8)
    with pytest.raises(ValueError, match=rf"Cannot read .*{shard.name}.*truncated or corrupt"):
        convert_checkpoint(source, tmp_path / "converted", vision_tower=clip_config_only)
    assert_nothing_written(tmp_path)


def test_a_missing_shard_is_named(tmp_path, stock, hd, clip_config_only):
    source = write_original(tmp_path / "original", original_state_dict(stock, hd), original_config(stock), shards=3)
    (source / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(ValueError, match="model-00002-of-00003.safetensors"):
        convert_checkpoint(source, tmp_path / "converted", vision_tower=clip_config_only)


def test_a_failed_write_leaves_no_output(tmp_path, checkpoint, clip_config_only, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(FlexLlavaForConditionalGeneration, "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        convert_checkpoint(checkpoint, tmp_path / "converted", vision_tower=clip_config_only)
    assert_nothing_written(tmp_path)


def test_an_existing_output_is_not_overwritten_by_default(tmp_path, checkpoint, clip_config_only):
    output = tmp_path / "converted"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists and is not empty: .* replace it with `--overwrite`"):
        convert_checkpoint(checkpoint, output, vision_tower=clip_config_only)
    assert (output / "keep.txt").read_text() == "mine"
    convert_checkpoint(checkpoint, output, vision_tower=clip_config_only, overwrite=True, image_token_index=95)
    assert not (output / "keep.txt").exists() and (output / "config.json").is_file()


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"extra": None}, "not FlexAttention.*patch_model"),
        ({"model_type": "flex_llava"}, "import hf_flexattention.*trust_remote_code=True"),
        ({"text_config": {}}, "LlavaForConditionalGeneration.from_pretrained.*patch_model"),
        ({"mm_projector_type": "linear"}, "mm_projector_type"),
        ({"extra": {**EXTRA, "threshold": "high"}}, "extra.threshold"),
        ({"extra": {**EXTRA, "threshold": "300"}}, "0-255 scale"),
        ({"extra": {**EXTRA, "lowres_size": "336"}}, "--vision-tower"),
        ({"extra": {**EXTRA, "highres_size": "64"}}, "highres_size"),
        ({"mm_vision_tower": "openai/clip-vit-large-patch14-336"}, "hidden size is 1024.*--vision-tower"),
    ],
)
def test_configs_that_cannot_convert_say_why(tmp_path, stock, hd, overrides, match):
    clip = write_clip(tmp_path / "clip", stock, with_weights=False)
    vision_tower = None if "mm_vision_tower" in overrides else clip
    source = write_original(tmp_path / "original", original_state_dict(stock, hd), original_config(stock, **overrides))
    with pytest.raises(ValueError, match=match):
        convert_checkpoint(source, tmp_path / "converted", vision_tower=vision_tower)
    assert_nothing_written(tmp_path)


def test_a_model_with_too_few_layers_for_the_official_rule_is_rejected(tmp_path, clip_config_only):
    small = build_tiny_llava(num_layers=9)
    source = write_original(
        tmp_path / "original", original_state_dict(small, high_res_weights(small)), original_config(small)
    )
    with pytest.raises(ValueError, match="has 9 layers: none would be"):
        convert_checkpoint(source, tmp_path / "converted", vision_tower=clip_config_only)


def test_an_unknown_source_is_reported(tmp_path):
    with pytest.raises(ValueError, match="not a folder"):
        convert_checkpoint(tmp_path / "does-not-exist", tmp_path / "converted")
    with pytest.raises(ValueError, match="neither a local folder nor a reachable Hub repository"):
        convert_checkpoint("tester/not-downloaded", tmp_path / "converted")  # HF_HUB_OFFLINE=1 in the tests


def test_the_demo_runs_the_converted_checkpoint_with_its_trained_projections(
    tmp_path, checkpoint, clip_config_only, reference, processor, capsys
):
    """The converter's output, tried as its message says: the demo keeps the authors' hd weights and settings."""
    from hf_flexattention import demo
    from hf_flexattention.loading import load_flex_model

    llava_processor = save_llava_processor(tmp_path / "llava-processor", processor)
    output = convert_checkpoint(
        checkpoint, tmp_path / "converted", vision_tower=clip_config_only, processor=llava_processor
    )
    assert_state_dicts_identical(load_flex_model(str(output)), reference)
    image = tmp_path / "image.png"
    make_image(1).save(image)
    argv = ["--model", str(output), "--image", str(image), "--prompt", "what is in the image ?"]
    assert demo.main([*argv, "--output", str(tmp_path / "selection.png")]) == 0
    n_fa = reference.config.flex_n_fa
    assert f"n_fa={n_fa} of {reference.config.text_config.num_hidden_layers} layers" in capsys.readouterr().out
