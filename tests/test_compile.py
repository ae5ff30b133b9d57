"""Static cache and compiled decoding (issue 7): the decode step traces as one graph, and gives the same tokens."""

import pytest
import torch
from transformers import CompileConfig, StaticCache

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
