"""Every entry point loads a FlexAttention checkpoint as one (issue 13.1): its class, trained hr projections and
settings; a setting changes only when asked, with a warning; a stock checkpoint is patched. Llava, LLaVA-NeXT and
LLaVA-OneVision (issue 11) alike."""

import json
import logging

import pytest
import torch
from transformers import LlavaNextProcessor

from hf_flexattention import (
    FlexLlavaForConditionalGeneration,
    FlexLlavaNextForConditionalGeneration,
    FlexLlavaNextProcessor,
    FlexLlavaOnevisionForConditionalGeneration,
    FlexLlavaOnevisionProcessor,
    demo,
    is_patched,
    patch_model,
)
from hf_flexattention.hub import save_pretrained
from hf_flexattention.loading import flex_settings, load_flex_model, load_flex_processor
from hf_flexattention.tiny import (
    build_tiny_llava,
    build_tiny_llava_next,
    build_tiny_llava_onevision,
    build_tiny_next_processor,
    build_tiny_onevision_processor,
)

from .conftest import StockOnevisionProcessor, load_example, make_image


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
    argv += ["--output", str(tmp_path / "selection.png")]
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


# ----- LLaVA-NeXT and LLaVA-OneVision ---------------------------------------------------------------------------


def stock_next_processor():
    parts = build_tiny_next_processor()
    return LlavaNextProcessor(
        image_processor=parts.image_processor,
        tokenizer=parts.tokenizer,
        patch_size=parts.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def stock_onevision_processor():
    parts = build_tiny_onevision_processor()
    return StockOnevisionProcessor(parts.image_processor, parts.tokenizer, num_image_tokens=parts.num_image_tokens)


# Per family: the tiny stock model, the stock processor a hub checkpoint ships (its prompts hold every crop token),
# the tiny FlexAttention processor, and the classes a checkpoint loads as.
ANY_RESOLUTION = {
    "llava_next": (
        build_tiny_llava_next,
        stock_next_processor,
        build_tiny_next_processor,
        FlexLlavaNextForConditionalGeneration,
        FlexLlavaNextProcessor,
    ),
    "llava_onevision": (
        build_tiny_llava_onevision,
        stock_onevision_processor,
        build_tiny_onevision_processor,
        FlexLlavaOnevisionForConditionalGeneration,
        FlexLlavaOnevisionProcessor,
    ),
}
NAMES = {"llava_next": "LLaVA-NeXT", "llava_onevision": "LLaVA-OneVision"}


@pytest.fixture(params=list(ANY_RESOLUTION))
def family(request):
    return request.param


@pytest.fixture
def stock_any_resolution_checkpoint(tmp_path, family):
    """A stock `llava_next` / `llava_onevision` checkpoint with its family's stock processor."""
    build, stock_processor, *_ = ANY_RESOLUTION[family]
    folder = tmp_path / f"stock-{family}"
    build().save_pretrained(folder)
    stock_processor().save_pretrained(folder)
    config_path = folder / "processor_config.json"
    # The test's OneVision stand-in (buildable without torchvision) saves its own class name; a hub checkpoint names
    # the stock class.
    config = json.loads(config_path.read_text())
    config["processor_class"] = {"llava_next": "LlavaNextProcessor", "llava_onevision": "LlavaOnevisionProcessor"}[
        family
    ]
    config_path.write_text(json.dumps(config))
    return folder


@pytest.fixture
def flex_any_resolution_checkpoint(tmp_path, family):
    """A `flex_llava_next` / `flex_llava_onevision` checkpoint with non-default settings, 'trained' hr projections
    and its processor."""
    build, _, build_processor, *_ = ANY_RESOLUTION[family]
    model = patch_model(build(), **NEXT_SAVED)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".hr_" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
    folder = tmp_path / f"flex-{family}"
    model.save_pretrained(folder)
    build_processor().save_pretrained(folder)
    return folder, high_res_weights(model)


NEXT_SAVED = {"n_fa": 2, "threshold": 0.3, "selection": "threshold", "high_res_ramp": 4.0}


def test_a_stock_any_resolution_checkpoint_is_patched_with_the_released_share(stock_any_resolution_checkpoint, family):
    model_class, processor_class = ANY_RESOLUTION[family][3:]
    model = load_flex_model(str(stock_any_resolution_checkpoint), {"threshold": 0.25, "zoom": None})
    assert type(model) is model_class and is_patched(model)
    assert model.config.flex_n_fa == 3  # the released 23-of-32 share of the tiny model's 4 layers
    assert model.config.flex_threshold == 0.25
    assert "zoom" not in flex_settings(model) and not hasattr(model.config, "flex_zoom")

    processor = load_flex_processor(str(stock_any_resolution_checkpoint))
    assert type(processor) is processor_class
    prompt = "USER: <image>\nwhat is in the image ? ASSISTANT:"
    inputs = processor(images=[make_image(1, width=70, height=40)], text=[prompt], return_tensors="pt")
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == 64  # the base image's 8 x 8 tokens
    assert inputs["pixel_values"].shape == (1, 5, 3, 32, 32)  # base + the crops (padded to 1 + 2 x 2), as stock
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


def test_a_flex_any_resolution_checkpoint_keeps_its_class_weights_settings_and_processor(
    flex_any_resolution_checkpoint, family, caplog
):
    folder, trained = flex_any_resolution_checkpoint
    build, _, _, model_class, processor_class = ANY_RESOLUTION[family]
    with caplog.at_level(logging.WARNING):
        model = load_flex_model(str(folder), {"n_fa": None, "threshold": None, "zoom": None})
    assert type(model) is model_class
    assert flex_settings(model) == flex_settings(patch_model(build(), **NEXT_SAVED))
    assert {name: flex_settings(model)[name] for name in NEXT_SAVED} == NEXT_SAVED
    for name, value in high_res_weights(model).items():
        assert torch.equal(value, trained[name]), name
    assert not caplog.records  # nothing was overridden
    assert type(load_flex_processor(str(folder))) is processor_class

    with caplog.at_level(logging.WARNING):
        model = load_flex_model(str(folder), {"threshold": 0.5})
    assert model.config.flex_threshold == 0.5
    assert [record.getMessage() for record in caplog.records] == [
        "Overriding the checkpoint's threshold=0.3 with threshold=0.5, as asked."
    ]


@pytest.mark.parametrize("which", ["stock", "flex"])
def test_a_zoom_for_any_resolution_families_is_refused(
    which, family, stock_any_resolution_checkpoint, flex_any_resolution_checkpoint
):
    folder = stock_any_resolution_checkpoint if which == "stock" else flex_any_resolution_checkpoint[0]
    with pytest.raises(ValueError, match=r"does not apply to (Llava|FlexLlava)(Next|Onevision)ForConditionalGen"):
        load_flex_model(str(folder), {"zoom": 2})
    with pytest.raises(ValueError, match=f"zoom=3 does not apply to the {NAMES[family]} checkpoint"):
        load_flex_processor(str(folder), zoom=3)


def test_a_llava_processor_needs_its_zoom(stock_checkpoint):
    with pytest.raises(ValueError, match="pass `zoom=model.config.flex_zoom`"):
        load_flex_processor(str(stock_checkpoint))


def test_the_training_example_loads_any_resolution_checkpoints_and_checks_the_model_type(
    flex_any_resolution_checkpoint, stock_any_resolution_checkpoint, stock_checkpoint, family
):
    folder, trained = flex_any_resolution_checkpoint
    model_class, processor_class = ANY_RESOLUTION[family][3:]
    train_lora = load_example("train_lora")
    script_args, _ = train_lora.parse_arguments(
        ["--model", str(folder), "--model-type", family, "--output-dir", str(folder / "out")]
    )
    model = train_lora.load_base(script_args)
    assert type(model) is model_class
    assert {name: flex_settings(model)[name] for name in NEXT_SAVED} == NEXT_SAVED
    for name, value in high_res_weights(model).items():
        assert torch.equal(value, trained[name]), name
    assert type(train_lora.load_processor(script_args, model)) is processor_class

    script_args, _ = train_lora.parse_arguments(
        ["--model", str(stock_any_resolution_checkpoint), "--output-dir", "unused"]
    )
    model = train_lora.load_base(script_args)  # no --model-type: the checkpoint's type decides
    assert type(model) is model_class and model.config.flex_n_fa == 3

    other = next(name for name in ANY_RESOLUTION if name != family)
    for checkpoint, wrong in ((stock_any_resolution_checkpoint, "llava"), (stock_any_resolution_checkpoint, other)):
        script_args, _ = train_lora.parse_arguments(
            ["--model", str(checkpoint), "--model-type", wrong, "--output-dir", "unused"]
        )
        with pytest.raises(ValueError, match=f"--model-type {wrong} does not match --model"):
            train_lora.load_base(script_args)
    script_args, _ = train_lora.parse_arguments(
        ["--model", str(stock_checkpoint), "--model-type", family, "--output-dir", "unused"]
    )
    with pytest.raises(ValueError, match=f"--model-type {family} does not match --model"):
        train_lora.load_base(script_args)


def test_a_tool_for_llava_only_refuses_an_any_resolution_checkpoint_before_loading_it(
    stock_any_resolution_checkpoint, tmp_path
):
    with pytest.raises(ValueError, match="this entry point serves `llava` checkpoints only: load it with the Python"):
        load_flex_model(str(stock_any_resolution_checkpoint), families=("llava",))
    image = tmp_path / "image.png"
    make_image(1).save(image)
    with pytest.raises(SystemExit):  # the demo reports the refusal through its argument parser
        demo.main(["--model", str(stock_any_resolution_checkpoint), "--image", str(image), "--prompt", "what ?"])
