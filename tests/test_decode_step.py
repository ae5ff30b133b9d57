"""The cost contract of a decode step (issue 7), pinned by counts that do not vary between runs.

On a model with LLaVA-1.5's image geometry (336 px / patch 14: 576 low-res and 5184 high-res tokens) and its share of
FlexAttention layers (6 of 8, as 23 of 32), one decode step of the patched model must make exactly the stock step's
host syncs, dispatch at most 1.3x its aten ops, and dispatch the same number whatever the batch size and whatever
was selected. Prefill may add a few syncs, never some per layer.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from hf_flexattention import patch_model
from hf_flexattention.counting import count_ops, decode_step_counts
from hf_flexattention.tiny import build_tiny_llava, build_tiny_processor


# Issue 7's target for eager decoding (the patched step dispatched 648 ops to stock's 502, 1.29x, when it was pinned).
MAX_RATIO = 1.3
PROMPT = "USER: <image>\nwhat is in the image ? ASSISTANT:"
LAYERS, N_FA = 8, 6
# Host syncs a patched prefill adds to stock's (validation, image placement, distinct images, selected rows).
PREFILL_SYNCS = 8


def llava_geometry_model(num_layers=LAYERS):
    """LLaVA-1.5's vision geometry and multi-head attention (kv heads = heads), at a size a CPU runs in seconds."""
    return build_tiny_llava(
        num_layers=num_layers, hidden_size=64, num_heads=4, num_kv_heads=4, image_size=336, patch_size=14
    )


def images(count, seed=0):
    """Distinct photos of different shapes (landscape and portrait, so the padding margin varies)."""
    rng = np.random.default_rng(seed)
    sizes = [(300, 420), (420, 300), (336, 336), (250, 500)]
    return [Image.fromarray(rng.integers(0, 256, (*sizes[i % 4], 3), dtype=np.uint8)) for i in range(count)]


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor(image_size=336, patch_size=14)


@pytest.fixture(scope="module")
def models():
    """The same weights twice: stock and patched."""
    stock = llava_geometry_model()
    patched = patch_model(llava_geometry_model(), n_fa=N_FA)
    return stock, patched


def inputs_for(processor, batch, seed=0):
    return processor(images=images(batch, seed), text=[PROMPT] * batch, return_tensors="pt")


def low_res(inputs):
    return {key: inputs[key] for key in ("input_ids", "attention_mask", "pixel_values")}


def step_counts(models, inputs, **settings):
    stock, patched = models
    patch_model(patched, n_fa=N_FA, **settings)
    return decode_step_counts(stock, low_res(inputs)), decode_step_counts(patched, inputs)


@pytest.mark.parametrize("selection", ["threshold", "topk"])
@pytest.mark.parametrize("batch", [1, 4])
def test_a_decode_step_syncs_like_stock_and_dispatches_at_most_1_3x_its_ops(models, processor, selection, batch):
    stock, patched = step_counts(models, inputs_for(processor, batch), selection=selection)
    assert patched.syncs == stock.syncs
    assert patched.ops <= MAX_RATIO * stock.ops, (patched, stock)


def test_a_decode_step_costs_the_same_whatever_the_batch_and_the_selection(models, processor):
    """Same ops for batch 1 and 4, for threshold and budget selection, and for images that select differently."""
    _, patched = models
    counts, selected = set(), set()
    for selection, batch, seed in [("threshold", 1, 0), ("threshold", 1, 1), ("threshold", 4, 2), ("topk", 4, 3)]:
        patch_model(patched, n_fa=N_FA, selection=selection)
        inputs = inputs_for(processor, batch, seed)
        counts.add(decode_step_counts(patched, inputs))
        trace = []
        with torch.no_grad():
            patched(**inputs, flex_trace=trace)
        selected.add(tuple(int(count) for _, per_row in trace for count in per_row.flatten()))
    assert len(counts) == 1, counts
    assert len(selected) == 4  # the runs really selected different tokens


def test_prefill_adds_a_few_syncs_and_none_per_layer(processor):
    inputs = inputs_for(processor, 2)

    def prefill(model, inputs):
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=1)

    added = []
    for layers in (4, 8):
        model = llava_geometry_model(layers)
        stock = count_ops(lambda: prefill(model, low_res(inputs)))  # noqa: B023 (called before the loop moves on)
        patch_model(model, n_fa=layers - 2)
        added.append((count_ops(lambda: prefill(model, inputs)) - stock).syncs)  # noqa: B023
    assert added[0] == added[1], added  # independent of the number of (FlexAttention) layers
    # Pinned, not bounded: reading the image placement twice once cost 2 more syncs and passed a looser bound.
    assert added[0] == PREFILL_SYNCS, added
