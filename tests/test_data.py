"""LLaVA conversation data (issue 3): rendering, label masking, padding, mixed batches and bad input; the collator
with the LLaVA-OneVision processor (issue 11; with LLaVA-NeXT's, in test_any_resolution.py's LoRA test)."""

import json
import re

import numpy as np
import pytest
import torch
from transformers import LlavaNextProcessor, LlavaProcessor

from hf_flexattention import patch_model
from hf_flexattention.data import (
    IGNORE_INDEX,
    LlavaConversationCollator,
    LlavaConversationDataset,
    LlavaSample,
    write_colour_dataset,
)
from hf_flexattention.tiny import (
    TINY_IMAGE_TOKEN_ID,
    build_tiny_llava,
    build_tiny_llava_onevision,
    build_tiny_next_processor,
    build_tiny_onevision_processor,
)

from .conftest import StockOnevisionProcessor, make_image


MULTI_TURN = [
    {"from": "human", "value": "<image>\nwhat color is the sign ?"},
    {"from": "gpt", "value": "red and white"},
    {"from": "human", "value": "is it a car ?"},
    {"from": "gpt", "value": "no"},
]
TEXT_ONLY = [{"from": "human", "value": "what is two and three ?"}, {"from": "gpt", "value": "five"}]


@pytest.fixture(params=["v1", "chat_template"])
def collator(request, processor, template_processor):
    return LlavaConversationCollator(processor if request.param == "v1" else template_processor)


def supervised_text(collator, batch, row):
    labels = batch["labels"][row]
    return collator.processor.tokenizer.decode(labels[labels != IGNORE_INDEX])


def real_tokens(batch, row):
    return batch["input_ids"][row][batch["attention_mask"][row].bool()]


def test_v1_format_supervises_every_answer_turn_with_its_end_token(processor):
    collator = LlavaConversationCollator(processor)
    batch = collator([LlavaSample(MULTI_TURN, make_image(1))])
    text = processor.tokenizer.decode(batch["input_ids"][0])
    assert text.replace("<image> " * 64, "<image> ") == (
        "USER: <image> what color is the sign ? ASSISTANT: red and white </s> USER: is it a car ? ASSISTANT: no </s>"
    )
    assert supervised_text(collator, batch, 0) == "red and white </s> no </s>"
    assert int((batch["input_ids"] == TINY_IMAGE_TOKEN_ID).sum()) == processor.num_image_tokens


def test_the_image_opens_its_turn_as_in_llava(collator):
    trailing = [{"from": "human", "value": "what is in the image ? <image>"}, {"from": "gpt", "value": "a cat"}]
    assert collator.generation_prompt(trailing[:1]) == "USER: <image>\nwhat is in the image ? ASSISTANT:"


def test_chat_template_answers_are_supervised_and_end_with_eos(template_processor):
    collator = LlavaConversationCollator(template_processor)
    batch = collator([LlavaSample(MULTI_TURN, make_image(1))])
    text = template_processor.tokenizer.decode(batch["input_ids"][0])
    # The template's trailing space after each answer becomes EOS, so the model learns to stop.
    assert text.replace("<image> " * 64, "<image> ") == (
        "USER: <image> what color is the sign ? ASSISTANT: red and white </s> USER: is it a car ? ASSISTANT: no </s>"
    )
    assert supervised_text(collator, batch, 0) == "red and white </s> no </s>"
    no_eos = LlavaConversationCollator(template_processor, append_eos=False)([LlavaSample(MULTI_TURN, make_image(1))])
    assert supervised_text(collator, no_eos, 0) == "red and white no"


def test_the_generation_prompt_is_the_training_text_before_the_answer(collator):
    batch = collator([LlavaSample(MULTI_TURN[:2], make_image(1))])
    first_answer = int((batch["labels"][0] != IGNORE_INDEX).nonzero()[0])
    prompt = collator.generation_prompt(MULTI_TURN[:1])
    inputs = collator.processor(images=[make_image(1)], text=[prompt], return_tensors="pt")
    # What generate continues from is exactly what training conditioned the first answer token on.
    assert torch.equal(inputs["input_ids"][0], batch["input_ids"][0, :first_answer])


def test_the_system_prompt_is_not_supervised(processor):
    collator = LlavaConversationCollator(processor, system_prompt="a picture")
    batch = collator([LlavaSample(TEXT_ONLY)])
    assert processor.tokenizer.decode(real_tokens(batch, 0)).startswith("a picture USER:")
    assert supervised_text(collator, batch, 0) == "five </s>"


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_mixed_batch_pads_and_masks(processor, padding_side):
    collator = LlavaConversationCollator(processor, padding_side=padding_side)
    samples = [
        LlavaSample(MULTI_TURN, make_image(1)),
        LlavaSample(TEXT_ONLY),
        LlavaSample(MULTI_TURN[:2], make_image(2)),
    ]
    batch = collator(samples)
    assert set(batch) == {
        "input_ids",
        "attention_mask",
        "labels",
        "pixel_values",
        "high_res_pixel_values",
        "original_image_sizes",
    }
    assert batch["high_res_pixel_values"].shape == (2, 3, 96, 96)  # one per image-bearing sample, in batch order
    assert batch["original_image_sizes"].tolist() == [[40, 60], [40, 60]]
    padding = ~batch["attention_mask"].bool()
    assert padding.any() and bool((batch["labels"][padding] == IGNORE_INDEX).all())
    assert bool((batch["input_ids"][padding] == processor.tokenizer.pad_token_id).all())
    edge = 0 if padding_side == "left" else -1
    assert not bool(batch["attention_mask"][1, edge])  # the short text-only sample is padded on that side
    for row, sample in enumerate(samples):  # padding does not change a sample's tokens or labels
        alone = collator([sample])
        assert torch.equal(real_tokens(batch, row), alone["input_ids"][0])
        assert torch.equal(batch["labels"][row][batch["attention_mask"][row].bool()], alone["labels"][0])


def test_a_mixed_batch_trains_through_the_high_res_path(processor):
    collator = LlavaConversationCollator(processor)
    batch = collator([LlavaSample(MULTI_TURN, make_image(1)), LlavaSample(TEXT_ONLY)])
    model = patch_model(build_tiny_llava(), n_fa=2).train()
    trace = []
    loss = model(**batch, flex_trace=trace).loss
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    # Every answer row of the image sample ("red and white </s> no </s>": 6 rows) selected high-res tokens.
    supervised = int((batch["labels"][0, 1:] != IGNORE_INDEX).sum())
    assert supervised == 6
    assert all(int((counts > 0).sum()) == supervised for _, counts in trace)


def test_dataset_reads_llava_json_and_images(tmp_path, processor):
    json_path = write_colour_dataset(tmp_path, num_samples=6)
    dataset = LlavaConversationDataset(json_path)  # images relative to the JSON's folder by default
    assert len(dataset) == 6
    with_image, text_only = dataset[0], dataset[4]
    assert with_image.image.mode == "RGB" and with_image.conversations[0]["value"].startswith("<image>\n")
    assert text_only.image is None and dataset.image_path(4) is None
    moved = tmp_path / "elsewhere.json"
    moved.write_text(open(json_path).read())
    assert LlavaConversationDataset(moved, image_folder=tmp_path)[0].image.size == with_image.image.size
    batch = LlavaConversationCollator(processor)([dataset[index] for index in range(6)])
    assert batch["high_res_pixel_values"].shape[0] == 5


def test_truncation_keeps_what_fits(processor):
    collator = LlavaConversationCollator(processor, max_length=75)
    batch = collator([LlavaSample(MULTI_TURN, make_image(1))])
    assert batch["input_ids"].shape[1] == 75
    assert supervised_text(collator, batch, 0) == "red and white"


# ----- bad input ---------------------------------------------------------------------------------------------------


def test_labels_that_do_not_match_input_ids_raise(processor):
    batch = LlavaConversationCollator(processor)([LlavaSample(MULTI_TURN, make_image(1)), LlavaSample(TEXT_ONLY)])
    model = patch_model(build_tiny_llava(), n_fa=2).train()
    with pytest.raises(ValueError, match="align token by token"):
        model(**dict(batch, labels=batch["labels"][:, :-1]))
    with pytest.raises(ValueError, match="align token by token"):
        model(**dict(batch, labels=batch["labels"][:1]))


def test_labels_that_do_not_match_input_ids_raise_for_text_only_batches(processor):
    batch = LlavaConversationCollator(processor)([LlavaSample(TEXT_ONLY), LlavaSample(TEXT_ONLY)])
    model = patch_model(build_tiny_llava(), n_fa=2).train()
    with pytest.raises(ValueError, match="align token by token"):
        model(**dict(batch, labels=batch["labels"][:, :-1]))


@pytest.mark.parametrize(
    ("conversations", "has_image", "message"),
    [
        (MULTI_TURN, False, "has no image but holds 1 '<image>'"),
        (TEXT_ONLY, True, "has an image but holds 0 '<image>'"),
        ([{"from": "human", "value": "<image>\n<image>\nwhat ?"}, {"from": "gpt", "value": "red"}], True, "holds 2"),
        ([{"from": "human", "value": "what ?"}, {"from": "gpt", "value": "<image>"}], False, "only appear in a human"),
        ([{"from": "human", "value": "<image>\nwhat color ?"}], True, "no answer turn"),
        ([{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "no"}], False, "unknown role 'robot'"),
        ([{"from": "human"}], False, "string 'value'"),
        ([], False, "non-empty list"),
    ],
)
def test_bad_conversations_raise_with_the_fix(tmp_path, processor, conversations, has_image, message):
    image = make_image(1) if has_image else None
    with pytest.raises((ValueError, TypeError), match=message):
        LlavaConversationCollator(processor)([LlavaSample(conversations, image)])
    record = {"id": "x", "conversations": conversations}
    if has_image:
        make_image(1).save(tmp_path / "a.png")
        record["image"] = "a.png"
    with pytest.raises((ValueError, TypeError), match=message):
        LlavaConversationDataset([record], image_folder=tmp_path)  # caught before training starts


@pytest.mark.parametrize("content", [None, b"not an image at all"])
def test_an_image_that_cannot_be_opened_names_the_file(tmp_path, content):
    if content is not None:
        (tmp_path / "broken.jpg").write_bytes(content)
    record = {"id": "7", "image": "broken.jpg", "conversations": MULTI_TURN}
    dataset = LlavaConversationDataset([record], image_folder=tmp_path)
    with pytest.raises(ValueError, match=r"sample 0 \(id '7'\): cannot open image file '.*broken\.jpg'"):
        dataset[0]


def test_truncation_that_cuts_the_image_or_every_answer_raises(processor):
    sample = LlavaSample(MULTI_TURN, make_image(1))
    with pytest.raises(ValueError, match="would cut its image tokens"):
        LlavaConversationCollator(processor, max_length=40)([sample])
    with pytest.raises(ValueError, match="no supervised answer token within max_length=71"):
        LlavaConversationCollator(processor, max_length=71)([sample])


def test_a_batch_stripped_by_trainer_asks_for_remove_unused_columns(processor):
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        LlavaConversationCollator(processor)([{"input_ids": [1, 2]}])


def test_bad_collator_settings_raise(processor):
    with pytest.raises(ValueError, match="padding_side"):
        LlavaConversationCollator(processor, padding_side="middle")
    with pytest.raises(ValueError, match="max_length"):
        LlavaConversationCollator(processor, max_length=0)
    with pytest.raises(TypeError, match=r"must be a FlexAttention processor .*got dict: wrap .*from_llava_processor"):
        LlavaConversationCollator({"tokenizer": processor.tokenizer})


def stock_processor(family: str, processor):
    """The stock processor of `family` on the tiny models' parts (its `<image>` expands as the unpatched model's)."""
    if family == "llava":
        return LlavaProcessor(image_processor=processor.image_processor, tokenizer=processor.tokenizer, patch_size=4)
    if family == "llava_next":
        parts = build_tiny_next_processor()
        return LlavaNextProcessor(parts.image_processor, parts.tokenizer, patch_size=4, num_additional_image_tokens=1)
    parts = build_tiny_onevision_processor()
    return StockOnevisionProcessor(parts.image_processor, parts.tokenizer, num_image_tokens=64)


@pytest.mark.parametrize(
    "family, wrap",
    [
        ("llava", "FlexLlavaProcessor.from_llava_processor(processor, zoom=model.config.flex_zoom)"),
        ("llava_next", "FlexLlavaNextProcessor.from_llava_next_processor(processor)"),
        ("llava_onevision", "FlexLlavaOnevisionProcessor.from_llava_onevision_processor(processor)"),
    ],
)
def test_a_stock_processor_is_refused_with_the_call_that_wraps_it(processor, family, wrap):
    stock = stock_processor(family, processor)
    with pytest.raises(TypeError, match=rf"got a stock {type(stock).__name__} .*wrap it with `{re.escape(wrap)}`\.$"):
        LlavaConversationCollator(stock)


def test_a_json_that_is_not_a_list_raises(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"conversations": TEXT_ONLY}))
    with pytest.raises(TypeError, match="JSON list"):
        LlavaConversationDataset(path)
    with pytest.raises(TypeError, match="one relative path"):
        LlavaConversationDataset([{"image": ["a.jpg", "b.jpg"], "conversations": MULTI_TURN}])


# ----- LLaVA-OneVision ------------------------------------------------------------------------------------------
# Images of three shapes (crop grids 1x2, 2x1 and 2x2 on the tiny pinpoints) and a text-only sample in one batch.
ONEVISION_SAMPLES = [
    LlavaSample(MULTI_TURN, make_image(1, width=40, height=70)),
    LlavaSample(TEXT_ONLY),
    LlavaSample(MULTI_TURN[:2], make_image(2, width=90, height=30)),
    LlavaSample(MULTI_TURN[:2], make_image(3, width=64, height=64)),
]


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_onevision_batches_carry_the_stock_image_inputs_and_base_only_prompts(padding_side):
    processor = build_tiny_onevision_processor()
    collator = LlavaConversationCollator(processor, padding_side=padding_side)
    batch = collator(ONEVISION_SAMPLES)
    assert set(batch) == {
        "input_ids",
        "attention_mask",
        "labels",
        "pixel_values",
        "image_sizes",
        "batch_num_images",
    }
    # One entry per image-bearing sample, in batch order: the base patch then the crops (zero-padded to the tiny
    # pinpoints' most patches, 1 + 2 x 2), the (height, width) sizes, and one image per sample.
    assert batch["pixel_values"].shape == (3, 5, 3, 32, 32)
    assert batch["image_sizes"].tolist() == [[70, 40], [30, 90], [64, 64]]
    assert batch["batch_num_images"].tolist() == [1, 1, 1]
    # The prompt holds the base image's 8 x 8 tokens only, whatever the crop grid.
    assert (batch["input_ids"] == TINY_IMAGE_TOKEN_ID).sum(dim=1).tolist() == [64, 0, 64, 64]
    assert [supervised_text(collator, batch, row) for row in range(4)] == [
        "red and white </s> no </s>",
        "five </s>",
        "red and white </s>",
        "red and white </s>",
    ]
    stock = processor(images=[sample.image for sample in ONEVISION_SAMPLES if sample.image], text=["<image>"] * 3)
    assert torch.equal(batch["pixel_values"], torch.from_numpy(np.asarray(stock["pixel_values"])))
    for row, sample in enumerate(ONEVISION_SAMPLES):  # padding does not change a sample's tokens or labels
        alone = collator([sample])
        assert torch.equal(real_tokens(batch, row), alone["input_ids"][0])
        assert torch.equal(batch["labels"][row][batch["attention_mask"][row].bool()], alone["labels"][0])


def test_a_onevision_batch_trains_through_the_high_res_path():
    collator = LlavaConversationCollator(build_tiny_onevision_processor())
    batch = collator(ONEVISION_SAMPLES[:2])
    model = patch_model(build_tiny_llava_onevision(), n_fa=2).train()
    trace = []
    loss = model(**batch, flex_trace=trace).loss
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    high_res = model.model.language_model.layers[3].self_attn.hr_k_proj.weight.grad
    assert high_res is not None and high_res.abs().sum() > 0  # the crops' keys are in the loss
    # Every answer row of the image sample ("red and white </s> no </s>": 6 rows) selected high-res tokens.
    assert int((batch["labels"][0, 1:] != IGNORE_INDEX).sum()) == 6
    assert trace and all(int((counts[0] > 0).sum()) == 6 for _, counts in trace)
