"""Every entry point loads a FlexAttention checkpoint as one (issue 13.1): its class, trained hr projections and
settings; a setting changes only when asked, with a warning; a stock checkpoint is patched."""

import logging

import pytest
import torch

from hf_flexattention import FlexLlavaForConditionalGeneration, demo, is_patched, patch_model
from hf_flexattention.hub import save_pretrained
from hf_flexattention.loading import flex_settings, load_flex_model, load_flex_processor
from hf_flexattention.tiny import build_tiny_llava

from .conftest import load_example, make_image


SAVED = {"n_fa": 3, "threshold": 0.3, "selection": "threshold", "high_res_ramp": 4.0}


def high_res_weights(model):
    return {name: value.clone() for name, value in model.state_dict().items() if ".hr_" in name}


@pytest.fixture
def flex_checkpoint(tmp_path, processor):
    """A FlexAttention checkpoint with non-default settings and 'trained' (perturbed) hr projections."""
    model = patch_model(build_tiny_llava(), **SAVED)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".hr_" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
    save_pretrained(model, tmp_path / "flex", processor)
    return tmp_path / "flex", high_res_weights(model)


@pytest.fixture
def stock_checkpoint(tmp_path, processor):
    build_tiny_llava().save_pretrained(tmp_path / "stock")
    processor.save_pretrained(tmp_path / "stock")
    return tmp_path / "stock"


def test_a_flex_checkpoint_keeps_its_class_weights_and_settings(flex_checkpoint, caplog):
    folder, trained = flex_checkpoint
    with caplog.at_level(logging.WARNING):
        model = load_flex_model(str(folder), {"n_fa": None, "threshold": None})
    assert type(model) is FlexLlavaForConditionalGeneration
    assert {name: flex_settings(model)[name] for name in SAVED} == SAVED
    for name, value in high_res_weights(model).items():
        assert torch.equal(value, trained[name]), name
    assert not caplog.records  # nothing was overridden


def test_a_setting_given_on_purpose_overrides_the_checkpoint_with_a_warning(flex_checkpoint, caplog):
    folder, trained = flex_checkpoint
    with caplog.at_level(logging.WARNING):
        model = load_flex_model(str(folder), {"threshold": 0.5, "n_fa": 3})  # n_fa as saved: no warning for it
    assert model.config.flex_threshold == 0.5 and model.config.flex_n_fa == 3
    assert [record.getMessage() for record in caplog.records] == [
        "Overriding the checkpoint's threshold=0.3 with threshold=0.5, as asked."
    ]
    for name, value in high_res_weights(model).items():
        assert torch.equal(value, trained[name]), name


def test_a_stock_checkpoint_is_patched_with_the_settings_given(stock_checkpoint):
    model = load_flex_model(str(stock_checkpoint), {"threshold": 0.25})
    assert is_patched(model)
    assert model.config.flex_n_fa == 3  # the released 23-of-32 share of the tiny model's 4 layers
    assert model.config.flex_threshold == 0.25
    processor = load_flex_processor(str(stock_checkpoint), zoom=model.config.flex_zoom)
    assert processor.zoom == 3


def test_another_model_type_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'llama' checkpoint: FlexAttention loads LLaVA-1.5-style `llava`"):
        load_flex_model(str(tmp_path))


def test_the_demo_runs_a_flex_checkpoint_with_its_own_settings(flex_checkpoint, tmp_path, capsys):
    folder, _ = flex_checkpoint
    image = tmp_path / "image.png"
    make_image(1).save(image)
    argv = ["--model", str(folder), "--image", str(image), "--prompt", "what is in the image ?"]
    assert demo.main([*argv, "--max-new-tokens", "2"]) == 0
    assert "n_fa=3 of 4 layers, threshold selection (threshold 0.3000)" in capsys.readouterr().out
    assert demo.main([*argv, "--max-new-tokens", "2", "--threshold", "0.6"]) == 0
    assert "(threshold 0.6000)" in capsys.readouterr().out


def test_the_benchmark_and_the_training_example_keep_a_flex_checkpoint(flex_checkpoint):
    folder, trained = flex_checkpoint
    benchmark = load_example("benchmark")
    args = benchmark.parse_args(["--model", str(folder)])
    runner = benchmark.Runner(benchmark.load(args, torch.float32).model, args)
    runner.use(False)  # the stock baseline: no hr projections
    assert not is_patched(runner.model)
    runner.use(True)  # back, with the checkpoint's trained projections and settings
    assert {name: flex_settings(runner.model)[name] for name in SAVED} == SAVED
    for name, value in high_res_weights(runner.model).items():
        assert torch.equal(value, trained[name]), name

    train_lora = load_example("train_lora")
    script_args, _ = train_lora.parse_arguments(["--model", str(folder), "--output-dir", str(folder / "out")])
    model = train_lora.load_base(script_args)
    assert {name: flex_settings(model)[name] for name in SAVED} == SAVED
    for name, value in high_res_weights(model).items():
        assert torch.equal(value, trained[name]), name
