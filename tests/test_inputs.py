"""Inputs are validated, or used, the way stock Llava uses them: pairing, types, `inputs_embeds`, attention maps."""

import copy
import logging

import pytest
import torch

from hf_flexattention import patch_model
from hf_flexattention.tiny import build_tiny_llava


# fp32 on the CPU: the same math through a different op order (embedding lookup vs. given embeddings) differs
# by float rounding only.
ATOL = 1e-5


@pytest.fixture(scope="module")
def model():
    return patch_model(build_tiny_llava(), n_fa=2).eval()


def test_high_res_pixels_without_low_res_pixels_are_refused(model, single_inputs):
    inputs = {key: value for key, value in single_inputs.items() if key != "pixel_values"}
    with pytest.raises(ValueError, match="without `pixel_values`.*Pass both"):
        model(**inputs)


def test_low_res_pixels_alone_warn_once_naming_the_processor(model, single_inputs, caplog):
    logging.Logger.warning_once.cache_clear()  # transformers' warning_once is cached process-wide
    inputs = {key: single_inputs[key] for key in ("input_ids", "attention_mask", "pixel_values")}
    with caplog.at_level(logging.WARNING), torch.no_grad():
        model(**inputs)
        model(**inputs)
    warnings = [record for record in caplog.records if "without `high_res_pixel_values`" in record.getMessage()]
    assert len(warnings) == 1 and "FlexLlavaProcessor" in warnings[0].getMessage()


def test_inputs_without_an_image_do_not_warn(model, processor, caplog):
    logging.Logger.warning_once.cache_clear()
    inputs = processor(text="USER: how many trees are there ? ASSISTANT:", return_tensors="pt")
    with caplog.at_level(logging.WARNING), torch.no_grad():
        model(**inputs)
    assert "high_res_pixel_values" not in caplog.text


@pytest.mark.parametrize(
    "name, value, match",
    [
        ("high_res_pixel_values", "list", "`high_res_pixel_values` must be a .*torch.Tensor.*got list"),
        ("high_res_pixel_values", "array", "`high_res_pixel_values` must be a .*torch.Tensor.*got ndarray"),
        ("original_image_sizes", "list", "`original_image_sizes` must be an integer .*got list"),
        ("original_image_sizes", "float", "`original_image_sizes` must be an integer"),
        ("flex_answer_start", "str", "`flex_answer_start` must be an int"),
        ("flex_answer_start", "bool", "`flex_answer_start` must be an int"),
    ],
)
def test_each_high_res_input_is_type_checked(model, single_inputs, name, value, match):
    converted = {
        "list": lambda tensor: tensor.tolist(),
        "array": lambda tensor: tensor.numpy(),
        "float": lambda tensor: tensor.float(),
        "str": lambda tensor: "70",
        "bool": lambda tensor: True,
    }[value]
    inputs = dict(single_inputs)
    inputs[name] = converted(inputs.get(name, torch.tensor(0)))
    with pytest.raises(TypeError, match=match):
        model(**inputs)


def _embedded(model, inputs):
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    return {key: value for key, value in inputs.items() if key != "input_ids"} | {"inputs_embeds": embeds}


def test_inputs_embeds_locate_the_image_tokens_as_input_ids_do(model, batch_inputs):
    with torch.no_grad():
        from_ids = model(**batch_inputs).logits
        from_embeds = model(**_embedded(model, batch_inputs)).logits
    real = batch_inputs["attention_mask"].bool()
    torch.testing.assert_close(from_embeds[real], from_ids[real], atol=ATOL, rtol=0)
    # ... and the high-res path was taken: without high-res inputs the answer rows differ.
    plain_inputs = {
        key: value for key, value in batch_inputs.items() if "high_res" not in key and "original" not in key
    }
    with torch.no_grad():
        plain = model(**plain_inputs).logits
    assert (plain[:, -1] - from_ids[:, -1]).abs().max() > 1e-3


def test_generate_from_inputs_embeds_gives_the_input_ids_tokens(model, batch_inputs):
    kwargs = {"max_new_tokens": 5, "do_sample": False}
    from_ids = model.generate(**batch_inputs, **kwargs)
    from_embeds = model.generate(**_embedded(model, batch_inputs), **kwargs)
    # With only `inputs_embeds`, generate returns the new tokens alone (as for any decoder-only model).
    assert torch.equal(from_embeds, from_ids[:, batch_inputs["input_ids"].shape[1] :])


def test_output_attentions_on_an_eager_model(single_inputs):
    stock = build_tiny_llava(attn_implementation="eager").eval()
    patched = patch_model(copy.deepcopy(stock), n_fa=2)
    patched.config.text_config.output_attentions = True  # stock accepts this on an eager model; so must we
    patched.config.text_config.output_attentions = False
    with torch.no_grad():
        got = patched(**single_inputs, output_attentions=True).attentions
        expected = stock(**single_inputs, output_attentions=True).attentions
    assert len(got) == len(expected) == stock.config.text_config.num_hidden_layers
    for ours, theirs in zip(got, expected, strict=True):
        assert ours is not None and ours.shape == theirs.shape
        # Only the last row predicts the answer here, and no earlier row sees it (causal): every other row's map is
        # the stock one; the last row's is the plain attention over the sequence (high-res tokens are no positions).
        torch.testing.assert_close(ours[:, :, :-1], theirs[:, :, :-1], atol=ATOL, rtol=0)
        torch.testing.assert_close(ours[:, :, -1].sum(-1), torch.ones_like(ours[:, :, -1, 0]), atol=ATOL, rtol=0)


def test_output_attentions_while_generating(single_inputs):
    patched = patch_model(build_tiny_llava(attn_implementation="eager"), n_fa=2).eval()
    out = patched.generate(
        **single_inputs, max_new_tokens=3, do_sample=False, output_attentions=True, return_dict_in_generate=True
    )
    plain = patched.generate(**single_inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(out.sequences, plain)  # asking for the maps changes nothing else
    assert len(out.attentions) == 3
    for step in out.attentions:  # every decode step, every layer (FlexAttention layers included)
        assert all(layer is not None for layer in step)
    length = single_inputs["input_ids"].shape[1]
    assert out.attentions[-1][-1].shape[-2:] == (1, length + 2)


def test_the_reported_attention_implementation_is_the_stock_one(single_inputs):
    for name in ("sdpa", "eager"):
        model = patch_model(build_tiny_llava(attn_implementation=name), n_fa=2)
        assert model.config.text_config._attn_implementation == name
        assert (
            model.config._attn_implementation == build_tiny_llava(attn_implementation=name).config._attn_implementation
        )
        views = {layer.self_attn.config._attn_implementation for layer in model.model.language_model.layers}
        assert views == {f"flexattn_{name}"}  # the modules still route through FlexAttention


def test_forward_keeps_the_stock_kwargs_annotation():
    """transformers reads `**kwargs: Unpack[TransformersKwargs]` to tell which shared features a model supports."""
    import inspect

    from transformers import LlavaForConditionalGeneration

    from hf_flexattention import FlexLlavaForConditionalGeneration

    ours = inspect.signature(FlexLlavaForConditionalGeneration.forward).parameters["kwargs"].annotation
    theirs = inspect.signature(LlavaForConditionalGeneration.forward).parameters["kwargs"].annotation
    assert ours == theirs and "TransformersKwargs" in str(ours)
