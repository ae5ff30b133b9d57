"""Static cache and compiled decoding (issue 7): the decode step traces as one graph, and gives the same tokens."""

import pytest
import torch
from transformers import CompileConfig, StaticCache

from hf_flexattention import unpatch_model

from .conftest import make_image
from .test_generate import NEW_TOKENS, flex_model, greedy


@pytest.mark.parametrize("selection", ["threshold", "topk", "random"])
def test_a_static_cache_gives_the_dynamic_cache_tokens(batch_inputs, selection):
    """Left padding, two image sizes and a text-only prompt in one batch. The static cache's keys are longer than the
    prompt at prefill (an empty tail that sdpa's upper-left causal mask skips): the high-res rows must skip it too."""
    model = flex_model(selection=selection)
    dynamic = greedy(model, batch_inputs)
    static = greedy(model, batch_inputs, cache_implementation="static")
    assert torch.equal(dynamic.sequences, static.sequences)
    # The same attention over more (masked) slots: rounding only, as for the stock model (~1e-7 here).
    torch.testing.assert_close(torch.stack(static.logits), torch.stack(dynamic.logits), atol=1e-6, rtol=0)


@pytest.mark.parametrize("selection", ["threshold", "topk", "random"])
def test_a_decode_step_compiles_as_one_graph(single_inputs, selection):
    model = flex_model(selection=selection)
    length = single_inputs["input_ids"].shape[1]
    cache = StaticCache(config=model.config, max_cache_len=length + 4)
    with torch.no_grad():
        prefill = model(**single_inputs, cache=cache, use_cache=True)
        step = {
            "input_ids": prefill.logits[:, -1:].argmax(-1),
            "attention_mask": torch.ones(1, length + 1, dtype=torch.long),
            "position_ids": torch.tensor([[length]]),
            "cache": cache,
            "use_cache": True,
            "logits_to_keep": 1,
        }
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(model.forward)(**step)
    assert explanation.graph_break_count == 0, [reason.reason for reason in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_compiled_generate_gives_the_eager_tokens(single_inputs):
    """`generate`'s own compiled decoding (`compile_config`, fullgraph) on the patched model."""
    model = flex_model()
    eager = greedy(model, single_inputs)
    config = CompileConfig(fullgraph=True, backend="eager", mode=None)
    config._compile_all_devices = True  # generate compiles on accelerators only unless told otherwise
    torch._dynamo.reset()
    compiled = greedy(model, single_inputs, cache_implementation="static", compile_config=config)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the decode steps did run compiled
    assert torch.equal(eager.sequences, compiled.sequences)
    torch.testing.assert_close(torch.stack(compiled.logits), torch.stack(eager.logits), atol=1e-6, rtol=0)


def test_a_reset_static_cache_forgets_the_image(single_inputs, processor):
    """A static cache made once, passed to generate and reset between prompts (the usual pattern with compiled
    decoding): the next prompt must not see the previous prompt's image."""
    model = flex_model()
    text_only = processor(text=["USER: how many trees ? ASSISTANT:"], return_tensors="pt")
    fresh = greedy(flex_model(), text_only, cache_implementation="static")
    cache = StaticCache(config=model.config, max_cache_len=single_inputs["input_ids"].shape[1] + NEW_TOKENS)
    greedy(model, single_inputs, cache=cache)
    assert cache.flex_state is not None
    cache.reset()
    reused = greedy(model, text_only, cache=cache)
    assert cache.flex_state is None
    assert torch.equal(fresh.sequences, reused.sequences)
    # The reused cache is longer than the fresh one: the same attention over more (masked) slots, rounding only.
    torch.testing.assert_close(torch.stack(reused.logits), torch.stack(fresh.logits), atol=1e-6, rtol=0)


def _graph_breaks(model, inputs, cache) -> list[str]:
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(model.forward)(**inputs, cache=cache, use_cache=True)
    return [reason.reason.split("\n")[0] for reason in explanation.break_reasons]


@pytest.mark.parametrize("with_image", [False, True], ids=["text-only", "low-res-image"])
def test_calls_without_high_res_inputs_compile_as_the_stock_ones(processor, with_image):
    """Without high-res inputs the model is the stock one and compiles like it (`_can_compile_fullgraph`): no branch on
    a static cache's length (a tensor). A decode step and a text-only prefill are one graph; a prefill with an image
    breaks exactly where stock Llava's does (its placeholder check and vision tower), nowhere else."""
    model = flex_model()
    stock = unpatch_model(flex_model())
    prompt = (
        "USER: <image>\nwhat color is the sign ? ASSISTANT:" if with_image else "USER: how many trees ? ASSISTANT:"
    )
    inputs = processor(images=make_image(1) if with_image else None, text=prompt, return_tensors="pt")
    inputs = {key: value for key, value in inputs.items() if key in ("input_ids", "attention_mask", "pixel_values")}
    length = inputs["input_ids"].shape[1]
    cache = StaticCache(config=model.config, max_cache_len=length + 4)
    assert model._can_compile_fullgraph
    prefill_breaks = _graph_breaks(model, inputs, cache)
    cache.reset()
    assert prefill_breaks == _graph_breaks(stock, inputs, cache)
    assert with_image or prefill_breaks == []
    cache.reset()
    with torch.no_grad():
        first = model(**inputs, cache=cache, use_cache=True)
    step = {
        "input_ids": first.logits[:, -1:].argmax(-1),
        "attention_mask": torch.ones(1, length + 1, dtype=torch.long),
        "position_ids": torch.tensor([[length]]),
    }
    assert _graph_breaks(model, step, cache) == []
