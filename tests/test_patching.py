"""patch_model / unpatch_model semantics, save/load (DESIGN.md 4.6) and bad input (4.8)."""

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText, LlavaConfig, LlavaForConditionalGeneration

from hf_flexattention import FlexLlavaConfig, FlexLlavaForConditionalGeneration, is_patched, patch_model, unpatch_model
from hf_flexattention.tiny import build_tiny_llava


def assert_state_dicts_identical(first, second):
    first, second = first.state_dict(), second.state_dict()
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def hr_layers(model):
    return [
        index for index, layer in enumerate(model.model.language_model.layers) if hasattr(layer.self_attn, "hr_k_proj")
    ]


def test_patch_is_in_place_and_adds_exact_copies():
    model = build_tiny_llava()
    patched = patch_model(model, n_fa=3, threshold=0.25)
    assert patched is model
    assert is_patched(model) and isinstance(model, LlavaForConditionalGeneration)
    assert isinstance(model.config, FlexLlavaConfig) and model.config.model_type == "flex_llava"
    assert (model.config.flex_n_fa, model.config.flex_threshold) == (3, 0.25)
    assert model.config.text_config is model.model.language_model.config  # sub-config references survive
    assert hr_layers(model) == [1, 2, 3]
    for index in hr_layers(model):
        attention = model.model.language_model.layers[index].self_attn
        for name, source in (("hr_k_proj", attention.k_proj), ("hr_v_proj", attention.v_proj)):
            projection = getattr(attention, name)
            assert projection.weight is not source.weight
            assert torch.equal(projection.weight, source.weight)
            assert projection.weight.dtype == source.weight.dtype and projection.weight.device == source.weight.device


def test_patching_twice_with_the_same_settings_is_a_no_op():
    model = patch_model(build_tiny_llava(), n_fa=2)
    with torch.no_grad():
        model.model.language_model.layers[3].self_attn.hr_k_proj.weight.add_(1.0)  # "trained"
    before = copy.deepcopy(model.state_dict())
    patch_model(model, n_fa=2)
    after = model.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before) and before.keys() == after.keys()


def test_patching_again_with_other_settings_reconfigures():
    model = patch_model(build_tiny_llava(), n_fa=1)
    with torch.no_grad():
        model.model.language_model.layers[3].self_attn.hr_k_proj.weight.add_(1.0)
    trained = model.model.language_model.layers[3].self_attn.hr_k_proj.weight.clone()
    patch_model(model, n_fa=3, threshold=0.5, selection="topk", topk_ratio=0.2)
    assert hr_layers(model) == [1, 2, 3]
    assert torch.equal(model.model.language_model.layers[3].self_attn.hr_k_proj.weight, trained)
    assert (model.config.flex_selection, model.config.flex_topk_ratio) == ("topk", 0.2)
    patch_model(model, n_fa=1)
    assert hr_layers(model) == [3]


def test_unpatch_restores_class_config_and_state_dict():
    model = build_tiny_llava()
    original = copy.deepcopy(model)
    config_before = model.config.to_dict()
    patch_model(model, n_fa=2)
    unpatch_model(model)
    assert type(model) is LlavaForConditionalGeneration and type(model.config) is LlavaConfig
    assert not is_patched(model)
    assert model.config.to_dict() == config_before
    assert model.config.text_config._attn_implementation == "sdpa"
    assert_state_dicts_identical(model, original)
    with pytest.raises(ValueError, match="not patched"):
        unpatch_model(model)


def test_save_and_load_round_trip_is_bit_identical(tmp_path, single_inputs):
    model = patch_model(build_tiny_llava(), n_fa=2, threshold=0.3, selection_grid=4)
    with torch.no_grad():
        model.model.language_model.layers[2].self_attn.hr_v_proj.weight.mul_(1.5)
    model.save_pretrained(tmp_path)
    for loader in (FlexLlavaForConditionalGeneration, AutoModelForImageTextToText):
        loaded = loader.from_pretrained(tmp_path)
        assert type(loaded) is FlexLlavaForConditionalGeneration
        assert (loaded.config.flex_n_fa, loaded.config.flex_threshold, loaded.config.flex_selection_grid) == (
            2,
            0.3,
            4,
        )
        assert loaded.config.text_config._attn_implementation == "sdpa"
        assert loaded.model.language_model.layers[0].self_attn.config._attn_implementation == "flexattn_sdpa"
        assert_state_dicts_identical(loaded, model)
        with torch.no_grad():
            assert torch.equal(loaded(**single_inputs).logits, model(**single_inputs).logits)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), FlexLlavaConfig)


def test_stock_checkpoint_loads_into_the_flex_class_with_copied_projections(tmp_path):
    stock = build_tiny_llava()
    stock.save_pretrained(tmp_path)
    loaded, info = FlexLlavaForConditionalGeneration.from_pretrained(tmp_path, flex_n_fa=2, output_loading_info=True)
    assert not [key for key in info["missing_keys"] if "hr_" in key or "lm_head" in key]
    state = loaded.state_dict()
    for key, value in stock.state_dict().items():
        assert torch.equal(state[key], value), key
    for index in (2, 3):
        attention = loaded.model.language_model.layers[index].self_attn
        assert torch.equal(attention.hr_k_proj.weight, attention.k_proj.weight)
        assert torch.equal(attention.hr_v_proj.weight, attention.v_proj.weight)


def test_flex_checkpoint_loads_into_the_stock_class(tmp_path):
    model = patch_model(build_tiny_llava(), n_fa=2)
    model.save_pretrained(tmp_path)
    stock = LlavaForConditionalGeneration.from_pretrained(tmp_path)
    state = stock.state_dict()
    flex_state = model.state_dict()
    assert state.keys() == {key for key in flex_state if ".hr_" not in key}
    for key, value in state.items():
        assert torch.equal(value, flex_state[key]), key


def test_set_attn_implementation_keeps_flex_attention(single_inputs):
    model = patch_model(build_tiny_llava(), n_fa=2)
    model.set_attn_implementation("eager")
    assert model.config.text_config._attn_implementation == "eager"
    assert model.model.language_model.layers[-1].self_attn.config._attn_implementation == "flexattn_eager"
    trace = []
    with torch.no_grad():
        model(**single_inputs, flex_trace=trace)
    assert trace


# --- bad input -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"n_fa": 4}, ValueError, r"0 <= n_fa <= 3"),
        ({"n_fa": -1}, ValueError, r"0 <= n_fa <= 3"),
        ({"n_fa": 2.0}, TypeError, "must be an int"),
        ({"n_fa": 2, "threshold": 48}, ValueError, r"pass 48/255"),
        ({"n_fa": 2, "threshold": 1.0}, ValueError, r"\[0, 1\)"),
        ({"n_fa": 2, "threshold": -0.1}, ValueError, r"\[0, 1\)"),
        ({"n_fa": 2, "zoom": 0}, ValueError, "zoom=0"),
        ({"n_fa": 2, "selection": "center"}, ValueError, "threshold"),
        ({"n_fa": 2, "selection_grid": 9}, ValueError, r"\[1, 8\]"),
        ({"n_fa": 2, "topk_ratio": 0.0}, ValueError, "topk_ratio"),
        # the tiny model's 3x3 selection grid: a budget must keep round(ratio * 9) >= 1 cells
        ({"n_fa": 2, "selection": "topk", "topk_ratio": 0.05}, ValueError, r"keeps no cell.*\[0\.05556, 1\]"),
        ({"n_fa": 2, "selection": "topk", "topk_ratio": 1.5}, ValueError, r"\[0\.05556, 1\]"),
        ({"n_fa": 2, "random_p": 1.5}, ValueError, "random_p"),
        ({"n_fa": 2, "random_p": "0.5"}, TypeError, r"`random_p` must be a float in \[0, 1\], got str"),
        ({"n_fa": 2, "random_seed": 1.5}, TypeError, "`random_seed` must be an int, got float"),
        ({"n_fa": 2, "high_res_ramp": -1}, ValueError, "high_res_ramp"),
        ({"n_fa": 2, "high_res_ramp": None}, TypeError, "`high_res_ramp` must be a number >= 0, got NoneType"),
        ({"n_fa": 2, "high_res_ramp": float("nan")}, ValueError, "must be a finite number >= 0"),
        (
            {"n_fa": 2, "threshold": 1.5},
            ValueError,
            r"must lie in \[0, 1\) \(normalised attention is compared to it\)\.$",
        ),
    ],
)
def test_bad_settings_raise_with_the_fix(kwargs, error, match):
    model = build_tiny_llava()
    with pytest.raises(error, match=match):
        patch_model(model, **kwargs)
    assert not is_patched(model)


def test_a_model_that_is_not_llava_is_rejected():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    )
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration"):
        patch_model(model, n_fa=1)


def test_an_unservable_attention_implementation_is_rejected():
    model = build_tiny_llava()
    model.config.text_config._attn_implementation_internal = "flash_attention_2"
    with pytest.raises(ValueError, match="'sdpa', 'eager'"):
        patch_model(model, n_fa=2)
    assert not is_patched(model)


def test_a_peft_wrapped_model_asks_to_patch_first():
    from peft import LoraConfig, get_peft_model

    model = build_tiny_llava()
    peft_model = get_peft_model(model, LoraConfig(target_modules=r".*language_model.*\.(q_proj|v_proj)"))
    with pytest.raises(ValueError, match="patch_model` on the base Llava model first"):
        patch_model(peft_model, n_fa=2)


def test_bad_high_res_inputs_raise_with_the_fix(single_inputs, batch_inputs):
    model = patch_model(build_tiny_llava(), n_fa=2)
    wrong_size = dict(single_inputs, high_res_pixel_values=single_inputs["high_res_pixel_values"][..., :64, :64])
    with pytest.raises(ValueError, match="flex_zoom=3"):
        model(**wrong_size)
    wrong_count = dict(batch_inputs, high_res_pixel_values=batch_inputs["high_res_pixel_values"][:1])
    with pytest.raises(ValueError, match="holds 1 images but the prompts hold 2"):
        model(**wrong_count)
    ids = torch.cat([single_inputs["input_ids"], single_inputs["input_ids"]], dim=1)
    with pytest.raises(ValueError, match="one image per sample"):
        model(
            input_ids=ids,
            pixel_values=torch.cat([single_inputs["pixel_values"]] * 2),
            high_res_pixel_values=single_inputs["high_res_pixel_values"],
        )
    with pytest.raises(ValueError, match="align token by token"):
        model(**single_inputs, labels=single_inputs["input_ids"][:, :-1])
    with pytest.raises(TypeError, match="torch.Tensor"):
        model(**dict(single_inputs, high_res_pixel_values=[1, 2]))


def test_a_loaded_model_patched_saved_and_unpatched_gets_its_config_back(tmp_path):
    build_tiny_llava().save_pretrained(tmp_path / "stock")
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "stock")
    config_before = model.config.to_dict()
    patch_model(model, n_fa=2)
    assert model.config.model_type == "flex_llava"  # not hidden by the loaded config's instance attribute
    model.save_pretrained(tmp_path / "flex")  # writes architectures and auto_map onto the config
    unpatch_model(model)
    assert model.config.to_dict() == config_before
    assert model.config.model_type == "llava"


def test_a_sequence_longer_than_the_sliding_window_is_refused(single_inputs):
    model = build_tiny_llava("mistral")
    model.config.text_config.sliding_window = 16
    patch_model(model, n_fa=2)
    with pytest.raises(ValueError, match="sliding window"):
        model(**single_inputs)


def test_a_config_saved_with_the_old_ramp_name_loads(tmp_path):
    """Configs written before the blend ramp was renamed carry `flex_warmup`: it loads as `flex_high_res_ramp`."""
    import json

    model = patch_model(build_tiny_llava(), n_fa=2, high_res_ramp=4.0)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["flex_warmup"] = config.pop("flex_high_res_ramp")
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = FlexLlavaForConditionalGeneration.from_pretrained(tmp_path)
    assert loaded.config.flex_high_res_ramp == 4.0
    assert not hasattr(loaded.config, "flex_warmup")


def test_copies_of_a_patched_model_route_through_their_own_config(single_inputs):
    """The attention modules' config view must follow the copy's config, not the original's (deepcopy, pickle)."""
    import io
    import pickle

    model = patch_model(build_tiny_llava(), n_fa=2).eval()
    for copied in (copy.deepcopy(model), pickle.load(io.BytesIO(pickle.dumps(model)))):
        for layer in copied.model.language_model.layers:
            assert layer.self_attn.config.text_config is copied.config.text_config
        copied.set_attn_implementation("eager")
        assert model.config.text_config._attn_implementation == "sdpa"
        assert model.model.language_model.layers[0].self_attn.config._attn_implementation == "flexattn_sdpa"
        assert copied.model.language_model.layers[0].self_attn.config._attn_implementation == "flexattn_eager"
        with torch.no_grad():  # eager and sdpa: the same math, rounded differently (fp32)
            expected, got = model(**single_inputs).logits, copied(**single_inputs).logits
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
