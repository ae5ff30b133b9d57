"""DESIGN.md 4.3-4.5: generate with and without cache, teacher forcing, batches, beams."""

import pytest
import torch

from hf_flexattention import patch_model
from hf_flexattention.tiny import TINY_IMAGE_TOKEN_ID, build_tiny_llava

from .conftest import PROMPTS, make_image


BACKBONES = ["llama", "mistral", "qwen2"]
NEW_TOKENS = 6
# Same math in a different order (one row at a time vs. the whole sequence; padded vs. unpadded batches): fp32
# rounding differences of ~1e-6 on logits of magnitude ~10. 1e-4 is DESIGN.md 4.3's contract.
LOGITS_ATOL = 1e-4


def flex_model(backbone="llama", **patch_kwargs):
    return patch_model(build_tiny_llava(backbone), **{"n_fa": 2, **patch_kwargs})


def greedy(model, inputs, **kwargs):
    return model.generate(
        **inputs,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
        **kwargs,
    )


def only(inputs, index, has_image_before):
    """Sample `index` of a batch alone: unpadded, with its own image rows."""
    keep = inputs["attention_mask"][index].bool()
    alone = {
        "input_ids": inputs["input_ids"][index, keep][None],
        "attention_mask": inputs["attention_mask"][index, keep][None],
    }
    if "pixel_values" in inputs and has_image_before is not None:
        for key in ("pixel_values", "high_res_pixel_values", "original_image_sizes"):
            alone[key] = inputs[key][has_image_before : has_image_before + 1]
    return alone


def test_the_selection_is_partial(single_inputs):
    trace = []
    with torch.no_grad():
        flex_model()(**single_inputs, flex_trace=trace)
    counts = [int(count) for _, count in trace]
    assert any(0 < count < 576 for count in counts), counts  # otherwise the tests below would not exercise it


@pytest.mark.parametrize("backbone", BACKBONES)
def test_cache_no_cache_and_teacher_forcing_agree(backbone, single_inputs):
    model = flex_model(backbone)
    cached = greedy(model, single_inputs)
    uncached = greedy(model, single_inputs, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(
        torch.stack(cached.logits, 1), torch.stack(uncached.logits, 1), atol=LOGITS_ATOL, rtol=0
    )

    prompt_length = single_inputs["input_ids"].shape[1]
    sequence = cached.sequences
    labels = torch.full_like(sequence, -100)
    labels[:, prompt_length:] = sequence[:, prompt_length:]
    with torch.no_grad():
        forced = model(
            input_ids=sequence,
            pixel_values=single_inputs["pixel_values"],
            high_res_pixel_values=single_inputs["high_res_pixel_values"],
            original_image_sizes=single_inputs["original_image_sizes"],
            labels=labels,
        ).logits
    torch.testing.assert_close(
        forced[:, prompt_length - 1 : -1], torch.stack(cached.logits, 1), atol=LOGITS_ATOL, rtol=0
    )


def test_high_res_changes_what_is_generated(single_inputs):
    model = flex_model()
    with_high_res = greedy(model, single_inputs)
    low_res_only = {
        k: v for k, v in single_inputs.items() if k not in ("high_res_pixel_values", "original_image_sizes")
    }
    without = greedy(model, low_res_only)
    assert not torch.allclose(torch.stack(with_high_res.logits, 1), torch.stack(without.logits, 1))


@pytest.mark.parametrize("backbone", BACKBONES)
def test_batch_equals_each_sample_alone(backbone, batch_inputs):
    model = flex_model(backbone)
    batched = greedy(model, batch_inputs)
    image_index = [0, 1, None]  # the third prompt is text-only
    for index, image in enumerate(image_index):
        alone = greedy(model, only(batch_inputs, index, image))
        assert torch.equal(batched.sequences[index, -NEW_TOKENS:], alone.sequences[0, -NEW_TOKENS:])
        torch.testing.assert_close(
            torch.stack(batched.logits, 1)[index], torch.stack(alone.logits, 1)[0], atol=LOGITS_ATOL, rtol=0
        )


def test_text_only_batch_runs_like_stock(processor):
    stock = build_tiny_llava()
    model = flex_model()
    inputs = processor(
        text=["USER: how many trees ? ASSISTANT:", "USER: what is this ? ASSISTANT:"],
        padding=True,
        return_tensors="pt",
    )
    assert torch.equal(greedy(model, inputs).sequences, greedy(stock, inputs).sequences)


def test_beam_search_with_cache_equals_without(batch_inputs):
    """Beam search reorders the cache every step: the high-res state must follow it."""
    model = flex_model()
    kwargs = {"num_beams": 3, "num_return_sequences": 2, "max_new_tokens": NEW_TOKENS, "do_sample": False}
    cached = model.generate(**batch_inputs, **kwargs)
    uncached = model.generate(**batch_inputs, use_cache=False, **kwargs)
    assert cached.shape[0] == 3 * 2
    assert torch.equal(cached, uncached)


def test_beam_search_batch_equals_each_sample_alone(batch_inputs):
    model = flex_model()
    kwargs = {"num_beams": 3, "num_return_sequences": 2, "max_new_tokens": NEW_TOKENS, "do_sample": False}
    batched = model.generate(**batch_inputs, **kwargs)
    for index, image in enumerate([0, 1, None]):
        alone = model.generate(**only(batch_inputs, index, image), **kwargs)
        assert torch.equal(batched[2 * index : 2 * index + 2, -NEW_TOKENS:], alone[:, -NEW_TOKENS:])


def test_sampling_with_several_return_sequences_is_reproducible(batch_inputs):
    model = flex_model()
    # An image token sampled into the answer would make the cache-less re-run see a second image.
    kwargs = {"do_sample": True, "num_return_sequences": 2, "max_new_tokens": NEW_TOKENS, "top_k": 5}
    kwargs["suppress_tokens"] = [TINY_IMAGE_TOKEN_ID]
    torch.manual_seed(3)
    first = model.generate(**batch_inputs, **kwargs)
    torch.manual_seed(3)
    second = model.generate(**batch_inputs, use_cache=False, **kwargs)
    assert first.shape[0] == 6
    assert torch.equal(first, second)


def test_high_res_state_does_not_leak_into_a_later_call(single_inputs):
    model = flex_model()
    low_res_only = {
        k: v for k, v in single_inputs.items() if k not in ("high_res_pixel_values", "original_image_sizes")
    }
    before = greedy(model, low_res_only)
    greedy(model, single_inputs)
    after = greedy(model, low_res_only)
    assert torch.equal(before.sequences, after.sequences)
    torch.testing.assert_close(torch.stack(before.logits), torch.stack(after.logits), atol=0, rtol=0)


def test_a_reused_cache_drops_the_old_image(single_inputs):
    from transformers import DynamicCache

    model = flex_model()
    cache = DynamicCache(config=model.config.text_config)
    with torch.no_grad():
        model(**single_inputs, cache=cache)
    assert cache.flex_state is not None
    cache.reset()
    text_only = {"input_ids": single_inputs["input_ids"][:, -5:]}
    with torch.no_grad():
        model(**text_only, cache=cache)
    assert cache.flex_state is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_and_tracks_fp32(dtype, single_inputs):
    """bf16/fp16 flex error (vs. the fp32 flex model) stays within a few times the stock model's own
    half-precision error (vs. fp32), the relative bound flash-attention's tests use."""
    settings = {"selection": "topk", "topk_ratio": 1.0}  # no threshold flips: a selection change is not rounding
    flex32, flex16 = flex_model(**settings), flex_model(**settings).to(dtype)
    stock32, stock16 = build_tiny_llava(), build_tiny_llava(dtype=dtype)
    low_res = {k: v for k, v in single_inputs.items() if k not in ("high_res_pixel_values", "original_image_sizes")}
    with torch.no_grad():
        flex_error = (
            (flex16(**single_inputs).logits[:, -1].float() - flex32(**single_inputs).logits[:, -1]).abs().max()
        )
        stock_error = (stock16(**low_res).logits[:, -1].float() - stock32(**low_res).logits[:, -1]).abs().max()
    assert torch.isfinite(flex_error)
    assert flex_error <= 3 * stock_error + 1e-2, (flex_error, stock_error)
    out = flex16.generate(**single_inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == single_inputs["input_ids"].shape[1] + 3


@pytest.mark.parametrize("num_beams", [1, 3])
def test_decoding_projects_each_selected_token_once_per_layer(single_inputs, num_beams):
    """Tokens projected at an earlier step (or for another beam) are reused, never projected again (DESIGN.md 5)."""
    model = flex_model()
    projected_rows = {}

    def count(layer):
        def hook(_module, args, _output):
            projected_rows[layer] = projected_rows.get(layer, 0) + args[0].shape[0] * args[0].shape[1]

        return hook

    for index in (2, 3):
        model.model.language_model.layers[index].self_attn.hr_k_proj.register_forward_hook(count(index))
    model.generate(**single_inputs, max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=num_beams)
    assert projected_rows
    for layer, rows in projected_rows.items():
        assert 0 < rows <= 24 * 24, (layer, rows)  # at most every high-res token, once


def test_an_empty_high_res_batch_is_a_text_only_batch(processor):
    model = flex_model()
    inputs = processor(text=["USER: how many trees ? ASSISTANT:"], return_tensors="pt")
    empty = dict(inputs, high_res_pixel_values=torch.zeros(0, 3, 96, 96))
    assert torch.equal(greedy(model, empty).sequences, greedy(model, inputs).sequences)


def test_beams_encode_each_image_once(batch_inputs):
    model = flex_model()
    encoded = []
    original = model.encode_high_res

    def counting(images, *args):
        encoded.append(images.shape[0])
        return original(images, *args)

    model.encode_high_res = counting
    model.generate(**batch_inputs, num_beams=3, max_new_tokens=2, do_sample=False)
    assert encoded == [2]


@pytest.mark.parametrize("num_beams", [1, 3])
def test_the_high_res_state_is_one_key_set_per_image_and_layer_and_never_grows(single_inputs, num_beams):
    """What generation keeps beside the KV cache: features, rotary table and one rotated key per high-res token
    per FlexAttention layer, shared by the beams; the same after 2 steps as after 12 (DESIGN.md 5)."""
    model = flex_model(selection="random", random_p=0.5)  # a fresh random selection every step

    def state_after(steps):
        cache = model.generate(
            **single_inputs,
            max_new_tokens=steps,
            min_new_tokens=steps,
            num_beams=num_beams,
            do_sample=False,
            return_dict_in_generate=True,
        ).past_key_values
        return cache.flex_state

    short, long = state_after(2), state_after(12)
    config = model.config.text_config
    kv_dim = config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    assert sorted(long.high_res_keys) == [2, 3]
    for keys in long.high_res_keys.values():
        assert tuple(keys.shape) == (1, config.num_key_value_heads, kv_dim // config.num_key_value_heads, 24 * 24)
    for name in ("features", "rotary"):
        assert getattr(short, name).shape == getattr(long, name).shape
    assert {k: v.shape for k, v in short.high_res_keys.items()} == {k: v.shape for k, v in long.high_res_keys.items()}


@pytest.mark.parametrize("selection", ["threshold", "random"])
def test_a_later_answer_start_is_honoured_with_and_without_cache(single_inputs, selection):
    """Rows that predict tokens before `flex_answer_start` are plain, in one-token decode steps too; the random
    selection draws by position, so it also gives the same result with and without a cache."""
    model = flex_model(selection=selection, random_p=0.3)
    start = single_inputs["input_ids"].shape[1] + 3
    cached = greedy(model, single_inputs, flex_answer_start=start)
    uncached = greedy(model, single_inputs, flex_answer_start=start, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(
        torch.stack(cached.logits, 1), torch.stack(uncached.logits, 1), atol=LOGITS_ATOL, rtol=0
    )
    low_res = {k: v for k, v in single_inputs.items() if k not in ("high_res_pixel_values", "original_image_sizes")}
    plain = greedy(model, low_res)
    # Steps 0-2 predict tokens before the answer start: the stock rows. Step 3 on sees high-res tokens.
    torch.testing.assert_close(torch.stack(cached.logits[:3]), torch.stack(plain.logits[:3]), atol=1e-5, rtol=0)
    assert not torch.allclose(cached.logits[3], plain.logits[3], atol=1e-3)


def test_a_language_model_in_another_dtype_than_the_vision_tower(single_inputs):
    """A bf16 language model next to an fp32 vision tower, as stock Llava allows: the state takes the LM's dtype."""
    model = flex_model()
    model.model.language_model.to(torch.bfloat16)
    model.lm_head.to(torch.bfloat16)
    out = greedy(model, single_inputs)
    assert out.past_key_values.flex_state.features.dtype == torch.bfloat16
    assert torch.isfinite(torch.stack(out.logits)).all()


def test_the_state_follows_the_caches_batch_operations(processor):
    """`batch_repeat_interleave` and `batch_select_indices` on the cache select the high-res state's sequences."""
    from transformers import DynamicCache

    model = flex_model()
    images = [make_image(1), make_image(2, width=40, height=64)]
    prompts = [PROMPTS[0], PROMPTS[1]]
    inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    tokens = torch.tensor([[7], [9]])

    def decode(cache, batch, step_tokens):
        mask = torch.cat([batch["attention_mask"], torch.ones_like(step_tokens)], dim=1)
        with torch.no_grad():
            return model(input_ids=step_tokens, attention_mask=mask, cache=cache).logits[:, -1]

    def prefill(batch):
        cache = DynamicCache(config=model.config.text_config)
        with torch.no_grad():
            model(**batch, cache=cache)
        return cache

    alone = [{k: v[i : i + 1] for k, v in inputs.items()} for i in range(2)]
    want = [decode(prefill(alone[i]), alone[i], tokens[i : i + 1]) for i in range(2)]

    cache = prefill(alone[0])
    cache.batch_repeat_interleave(2)
    repeated = {k: v.repeat(2, *[1] * (v.ndim - 1)) for k, v in alone[0].items()}
    got = decode(cache, repeated, tokens)
    torch.testing.assert_close(got[0], want[0][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1], decode(prefill(alone[0]), alone[0], tokens[1:])[0], atol=1e-5, rtol=0)

    cache = prefill(inputs)
    cache.batch_select_indices(torch.tensor([1]))
    selected = {"attention_mask": inputs["attention_mask"][1:]}
    torch.testing.assert_close(decode(cache, selected, tokens[1:])[0], want[1][0], atol=1e-5, rtol=0)
