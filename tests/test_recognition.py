"""Loading reports and initialises what a checkpoint lacks as stock Llava does, refuses configs it cannot serve, and
flex models are recognised by what they are, also when loaded as remote code before the plugin was imported."""

import subprocess
import sys
import textwrap

import pytest
import safetensors.torch
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaForConditionalGeneration

from hf_flexattention import FlexLlavaForConditionalGeneration, patch_model
from hf_flexattention.tiny import build_tiny_llava


VISION_KEY = "vision_tower.encoder.layers.0.self_attn.q_proj.weight"  # as saved (the llava-hf layout)
TEXT_KEY = "language_model.model.layers.3.self_attn.k_proj.weight"


def save_without(folder, model, *keys):
    model.save_pretrained(folder)
    weights = safetensors.torch.load_file(folder / "model.safetensors")
    for key in keys:
        del weights[key]
    safetensors.torch.save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def load(cls, folder, **kwargs):
    torch.manual_seed(0)
    return cls.from_pretrained(folder, output_loading_info=True, **kwargs)


def test_weights_missing_from_a_stock_checkpoint_are_reported_and_initialised_as_stock(tmp_path):
    folder = save_without(tmp_path / "stock", build_tiny_llava(), VISION_KEY, TEXT_KEY)
    stock, stock_info = load(LlavaForConditionalGeneration, folder)
    flex, flex_info = load(FlexLlavaForConditionalGeneration, folder, flex_n_fa=2)
    # k_proj of layer 3 was missing, so its hr copy holds nothing real either: both stay reported.
    assert set(flex_info["missing_keys"]) == set(stock_info["missing_keys"]) | {
        "model.language_model.layers.3.self_attn.hr_k_proj.weight"
    }
    assert "model.language_model.layers.2.self_attn.hr_k_proj.weight" not in flex_info["missing_keys"]  # copied
    # The missing vision weight gets CLIP's own init (std hidden**-0.5 * (2 * layers)**-0.5 for q_proj), drawn from
    # the same seed as the stock load: the same tensor.
    name = next(
        name for name, _ in stock.named_parameters() if "vision_tower" in name and "0.self_attn.q_proj" in name
    )
    stock_weight, flex_weight = stock.get_parameter(name), flex.get_parameter(name)
    assert torch.equal(flex_weight, stock_weight)
    hidden = stock.config.vision_config.hidden_size
    expected_std = hidden**-0.5 * (2 * stock.config.vision_config.num_hidden_layers) ** -0.5
    assert abs(stock_weight.std().item() - expected_std) < 0.5 * expected_std  # CLIP's scheme, not 0.02


def test_a_flex_checkpoint_missing_hr_projections_reports_them(tmp_path):
    model = patch_model(build_tiny_llava(), n_fa=2)
    folder = save_without(tmp_path / "flex", model, "language_model.model.layers.3.self_attn.hr_v_proj.weight")
    _, info = load(FlexLlavaForConditionalGeneration, folder)
    assert info["missing_keys"] == set() or not info["missing_keys"]  # copied from v_proj, which was loaded
    folder = save_without(
        tmp_path / "flex-2",
        model,
        "language_model.model.layers.3.self_attn.hr_v_proj.weight",
        "language_model.model.layers.3.self_attn.v_proj.weight",
    )
    _, info = load(FlexLlavaForConditionalGeneration, folder)
    assert set(info["missing_keys"]) == {
        "model.language_model.layers.3.self_attn.v_proj.weight",
        "model.language_model.layers.3.self_attn.hr_v_proj.weight",
    }


@pytest.mark.parametrize(
    "config",
    [
        LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
        CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
    ],
    ids=["llama", "clip"],
)
def test_a_config_the_class_cannot_serve_is_a_value_error(tmp_path, config):
    with pytest.raises(ValueError, match="needs a Llava config"):
        FlexLlavaForConditionalGeneration(config)
    build_tiny_llava().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="needs a Llava config"):
        FlexLlavaForConditionalGeneration.from_pretrained(tmp_path, config=config)


REMOTE_BEFORE_PLUGIN = """
import importlib.abc
import sys

import torch


class BlockPlugin(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "hf_flexattention" or name.startswith("hf_flexattention."):
            raise ModuleNotFoundError(name, name=name)


blocker = BlockPlugin()
sys.meta_path.insert(0, blocker)
from transformers import AutoModelForImageTextToText  # noqa: E402

model = AutoModelForImageTextToText.from_pretrained(sys.argv[1], trust_remote_code=True)
stock_state = {k: v.clone() for k, v in model.state_dict().items() if ".hr_" not in k}
sys.meta_path.remove(blocker)

import hf_flexattention  # noqa: E402
from hf_flexattention.training import HighResRampCallback, find_flex_model  # noqa: E402

report = {"module": type(model).__module__}
report["is_patched"] = hf_flexattention.is_patched(model)
report["found"] = find_flex_model(model) is model
HighResRampCallback()
report["repatched_n_fa"] = hf_flexattention.patch_model(model, n_fa=1).config.flex_n_fa
report["hr_layers"] = sum(hasattr(layer.self_attn, "hr_k_proj") for layer in model.model.language_model.layers)
stock = hf_flexattention.unpatch_model(model)
report["unpatched"] = (type(stock).__name__, stock.config.model_type, hf_flexattention.is_patched(stock))
report["same_state"] = stock.state_dict().keys() == stock_state.keys() and all(
    torch.equal(stock.state_dict()[k], v) for k, v in stock_state.items()
)
print(report)
"""


def test_a_flex_model_loaded_as_remote_code_before_the_plugin_is_recognised(tmp_path):
    patch_model(build_tiny_llava(), n_fa=2).save_pretrained(tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(REMOTE_BEFORE_PLUGIN), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PATH": "", "HF_HOME": str(tmp_path / "hf")},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = eval(result.stdout.strip().splitlines()[-1])  # a dict literal of plain values, printed above
    assert report["module"].startswith("transformers_modules.")  # the checkpoint's copy of the class
    assert report["is_patched"] and report["found"]
    assert report["repatched_n_fa"] == 1 and report["hr_layers"] == 1
    assert report["unpatched"] == ("LlavaForConditionalGeneration", "llava", False)
    assert report["same_state"]


@pytest.mark.parametrize(
    "auto_class", ["AutoModelForImageTextToText", "AutoModelForMultimodalLM", "AutoModelForPreTraining"]
)
def test_every_auto_class_that_serves_llava_serves_a_flex_checkpoint(tmp_path, auto_class):
    import transformers

    patch_model(build_tiny_llava(), n_fa=2).save_pretrained(tmp_path)
    stock_name = getattr(transformers.models.auto.modeling_auto, auto_class_mapping(auto_class))["llava"]
    assert stock_name == "LlavaForConditionalGeneration"  # so the flex class is its FlexAttention counterpart
    loaded = getattr(transformers, auto_class).from_pretrained(tmp_path)
    assert type(loaded) is FlexLlavaForConditionalGeneration and loaded.config.flex_n_fa == 2


def auto_class_mapping(auto_class: str) -> str:
    return {
        "AutoModelForImageTextToText": "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
        "AutoModelForMultimodalLM": "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES",
        "AutoModelForPreTraining": "MODEL_FOR_PRETRAINING_MAPPING_NAMES",
    }[auto_class]
