"""FlexLlavaNextProcessor: the stock LLaVA-NeXT pixels and sizes, each `<image>` expanded to the base g*g tokens."""

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, LlavaNextProcessor
from transformers.modeling_outputs import BaseModelOutputWithPooling

from hf_flexattention import FlexLlavaNextProcessor
from hf_flexattention.tiny import (
    TINY_IMAGE_TOKEN_ID,
    TINY_PAD_TOKEN_ID,
    build_tiny_llava_next,
    build_tiny_next_processor,
)

from .conftest import LLAVA_HF_TEMPLATE, PROMPTS, make_image


BASE_TOKENS = 8 * 8  # the tiny tower: 32 px images, 4 px patches


@pytest.fixture(scope="module")
def flex() -> FlexLlavaNextProcessor:
    processor = build_tiny_next_processor()
    processor.chat_template = LLAVA_HF_TEMPLATE
    return processor


@pytest.fixture(scope="module")
def stock(flex) -> LlavaNextProcessor:
    return LlavaNextProcessor(
        image_processor=flex.image_processor,
        tokenizer=flex.tokenizer,
        patch_size=4,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_HF_TEMPLATE,
    )


def images_of_every_shape() -> list:
    """(height, width): 40x70 (2x2 crops, unpadded rows), 60x30 (2x1), 20x20 (1x2), 64x64 (2x2), and a numpy
    array (50x33) and a channels-first uint8 tensor (36x52)."""
    rng = np.random.default_rng(7)
    array = rng.integers(0, 256, size=(50, 33, 3), dtype=np.uint8)
    tensor = torch.from_numpy(rng.integers(0, 256, size=(3, 36, 52), dtype=np.uint8))
    sized = [
        make_image(seed, width=w, height=h) for seed, (h, w) in enumerate([(40, 70), (60, 30), (20, 20), (64, 64)])
    ]
    return [*sized, array, tensor]


def shorten_image_spans(stock_inputs, base_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The expected ids and mask: each row's unpadded stock ids with every run of image tokens cut to
    `base_tokens`, left padded again to the longest row."""
    rows = []
    for ids, mask in zip(stock_inputs["input_ids"].tolist(), stock_inputs["attention_mask"].tolist(), strict=True):
        ids = [token for token, keep in zip(ids, mask, strict=True) if keep]
        shortened, run = [], 0
        for token in ids:
            run = run + 1 if token == TINY_IMAGE_TOKEN_ID else 0
            if run <= base_tokens:
                shortened.append(token)
        rows.append(shortened)
    width = max(len(row) for row in rows)
    input_ids = torch.tensor([[TINY_PAD_TOKEN_ID] * (width - len(row)) + row for row in rows])
    attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    return input_ids, attention_mask


def assert_base_only_parity(flex_inputs, stock_inputs) -> None:
    assert set(flex_inputs) == set(stock_inputs) == {"input_ids", "attention_mask", "pixel_values", "image_sizes"}
    assert torch.equal(flex_inputs["pixel_values"], stock_inputs["pixel_values"])
    assert torch.equal(flex_inputs["image_sizes"], stock_inputs["image_sizes"])
    expected_ids, expected_mask = shorten_image_spans(stock_inputs, BASE_TOKENS)
    assert torch.equal(flex_inputs["input_ids"], expected_ids)
    assert torch.equal(flex_inputs["attention_mask"], expected_mask)


@pytest.mark.parametrize("index", range(6))
def test_single_image_matches_stock_with_the_base_tokens_only(flex, stock, index):
    image = images_of_every_shape()[index]
    flex_inputs = flex(images=image, text=PROMPTS[0], return_tensors="pt")
    stock_inputs = stock(images=image, text=PROMPTS[0], return_tensors="pt")
    assert_base_only_parity(flex_inputs, stock_inputs)
    # The stock prompt holds base + crops + newlines: strictly more, so the test does shorten a span.
    assert (stock_inputs["input_ids"] == TINY_IMAGE_TOKEN_ID).sum() > BASE_TOKENS
    assert (flex_inputs["input_ids"] == TINY_IMAGE_TOKEN_ID).sum() == BASE_TOKENS


def test_batch_with_a_text_only_row_matches_stock(flex, stock):
    images = images_of_every_shape()
    text = [PROMPTS[index % 2] for index in range(len(images))] + [PROMPTS[2]]
    flex_inputs = flex(images=images, text=text, padding=True, return_tensors="pt")
    stock_inputs = stock(images=images, text=text, padding=True, return_tensors="pt")
    assert_base_only_parity(flex_inputs, stock_inputs)
    assert flex_inputs["image_sizes"].tolist() == [[40, 70], [60, 30], [20, 20], [64, 64], [50, 33], [36, 52]]
    assert (flex_inputs["input_ids"] == TINY_IMAGE_TOKEN_ID).sum(dim=1).tolist() == [BASE_TOKENS] * 6 + [0]
    # Nested per-sample lists, as for several images per sample, with one (or no) image each.
    nested = flex(images=[[image] for image in images] + [[]], text=text, padding=True, return_tensors="pt")
    for key, value in flex_inputs.items():
        assert torch.equal(nested[key], value), key


def test_chat_template_matches_stock(flex, stock):
    conversations = [
        [{"role": "user", "content": [{"type": "image", "image": make_image(3, 70, 40)}, {"type": "text", "text": q}]}]
        for q in ("what is in the image ?", "describe the picture")
    ]
    options = {"add_generation_prompt": True, "tokenize": True, "return_dict": True, "return_tensors": "pt"}
    flex_inputs = flex.apply_chat_template(conversations, padding=True, **options)
    stock_inputs = stock.apply_chat_template(conversations, padding=True, **options)
    assert_base_only_parity(flex_inputs, stock_inputs)


def test_num_multimodal_tokens_counts_the_base_only(flex, stock):
    sizes = [[40, 70], [60, 30], [20, 20], [500, 900]]
    assert flex._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens == [BASE_TOKENS] * 4
    assert stock._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens[:3] == [234, 208, 136]


def test_base_features_are_the_prompt_tokens(flex):
    """The tiny model's stock packing puts the base image's g*g features first in each image's entry, and those
    are exactly as many as the processor's placeholders: the stock forward scatters them into the flex prompt."""
    model = build_tiny_llava_next()
    images = images_of_every_shape()[:3]
    inputs = flex(images=images, text=[PROMPTS[0]] * 3 + [PROMPTS[2]], padding=True, return_tensors="pt")
    placeholders = (inputs["input_ids"] == TINY_IMAGE_TOKEN_ID).sum(dim=1).tolist()
    with torch.no_grad():
        packed = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
        # Reference: the base patch alone through the tower (layer -2, CLS dropped) and the projector.
        hidden = model.model.vision_tower(inputs["pixel_values"][:, 0], output_hidden_states=True).hidden_states
        base = model.model.multi_modal_projector(hidden[-2][:, 1:])
        assert base.shape[1] == placeholders[0] == placeholders[1] == placeholders[2] == BASE_TOKENS
        assert [len(features) for features in packed] == [234, 208, 136]  # base + crops + newlines
        for index, features in enumerate(packed):
            # Same ops on the same patch, batched differently: float rounding only.
            torch.testing.assert_close(features[: placeholders[index]], base[index], atol=1e-5, rtol=1e-5)
        base_only = BaseModelOutputWithPooling(pooler_output=[features[:BASE_TOKENS] for features in packed])
        logits = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            mm_encoder_outputs={"image": base_only},
        ).logits
    assert logits.shape[:2] == inputs["input_ids"].shape


def test_save_and_load(flex, tmp_path):
    flex.save_pretrained(tmp_path)
    images = images_of_every_shape()[:2]
    expected = flex(images=images, text=list(PROMPTS), padding=True, return_tensors="pt")
    for loaded in (
        FlexLlavaNextProcessor.from_pretrained(tmp_path),
        AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True),  # the saved remote code
    ):
        assert type(loaded).__name__ == "FlexLlavaNextProcessor"
        settings = ("patch_size", "vision_feature_select_strategy", "num_additional_image_tokens", "image_token")
        assert {name: getattr(loaded, name) for name in settings} == {name: getattr(flex, name) for name in settings}
        assert loaded.image_processor.image_grid_pinpoints == flex.image_processor.image_grid_pinpoints
        assert loaded.chat_template == flex.chat_template
        again = loaded(images=images, text=list(PROMPTS), padding=True, return_tensors="pt")
        for key, value in expected.items():
            assert torch.equal(again[key], value), key
    assert isinstance(FlexLlavaNextProcessor.from_pretrained(tmp_path), FlexLlavaNextProcessor)


def test_from_llava_next_processor_keeps_its_parts(flex, stock):
    wrapped = FlexLlavaNextProcessor.from_llava_next_processor(stock)
    assert wrapped.tokenizer is stock.tokenizer and wrapped.image_processor is stock.image_processor
    assert wrapped.chat_template == stock.chat_template and wrapped.patch_size == 4
    image = make_image(0, 70, 40)
    assert_base_only_parity(
        wrapped(images=image, text=PROMPTS[0], return_tensors="pt"),
        stock(images=image, text=PROMPTS[0], return_tensors="pt"),
    )


def test_bad_input_raises_with_the_fix(flex, stock):
    parts = {"image_processor": flex.image_processor, "tokenizer": flex.tokenizer}
    for strategy in ("full", None):
        with pytest.raises(ValueError, match="'default' only.*Use 'default'"):
            FlexLlavaNextProcessor(**parts, patch_size=4, vision_feature_select_strategy=strategy)
    with pytest.raises(ValueError, match="Use num_additional_image_tokens=1"):
        FlexLlavaNextProcessor(**parts, patch_size=4, num_additional_image_tokens=0)
    for patch_size in (None, 0, 4.0):
        with pytest.raises(ValueError, match="`patch_size` must be the vision tower's patch size"):
            FlexLlavaNextProcessor(**parts, patch_size=patch_size)
    with pytest.raises(TypeError, match="Expected a LlavaNextProcessor"):
        FlexLlavaNextProcessor.from_llava_next_processor(flex.tokenizer)
    no_patch_size = LlavaNextProcessor(**parts, vision_feature_select_strategy="default")
    with pytest.raises(ValueError, match="has no `patch_size`"):
        FlexLlavaNextProcessor.from_llava_next_processor(no_patch_size)
    with pytest.raises(ValueError, match="Use 'default'"):
        FlexLlavaNextProcessor.from_llava_next_processor(
            LlavaNextProcessor(**parts, patch_size=4, vision_feature_select_strategy="full")
        )

    image, other = make_image(0), make_image(1, 30, 60)
    with pytest.raises(ValueError, match="A sample has 2 images.*one image per sample"):
        flex(images=[[image, other]], text=["USER: <image> <image> a cat"])
    with pytest.raises(ValueError, match="at most one '<image>'"):
        flex(images=[image, other], text="USER: <image> <image> ASSISTANT:")
    with pytest.raises(ValueError, match="takes no videos"):
        flex(videos=[np.zeros((2, 32, 32, 3), dtype=np.uint8)], text=PROMPTS[2])
    with pytest.raises(ValueError, match="Found total 1 <image> tokens and 2 images"):
        flex(images=[image, other], text=PROMPTS[0])
    with pytest.raises(ValueError, match="no images were passed"):
        flex(text=PROMPTS[0])
