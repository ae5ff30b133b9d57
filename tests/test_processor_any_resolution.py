"""FlexLlavaNextProcessor and FlexLlavaOnevisionProcessor: the stock pixels, sizes (and OneVision's image counts),
each `<image>` expanded to the base g*g tokens. Each guarantee both processors share is written once here and run
over the family table of `tests/anyres_helpers.py`; what only one has is in `tests/test_processor_next.py` and
`tests/test_processor_onevision.py`."""

import numpy as np
import pytest
import torch
from transformers import AutoProcessor
from transformers.modeling_outputs import BaseModelOutputWithPooling

from hf_flexattention import FlexLlavaOnevisionProcessor
from hf_flexattention.tiny import TINY_IMAGE_TOKEN_ID

from .anyres_helpers import (
    BASE_TOKENS,
    NEXT,
    ONEVISION,
    assert_base_only_parity,
    flex_processor,
    images_of_every_shape,
    settings,
    stock_processor,
)
from .conftest import PROMPTS, make_image


FAMILIES = [pytest.param(family, id=family.name) for family in (NEXT, ONEVISION)]
# Stock token counts (base + unpadded crops + newlines) of images_of_every_shape()[:4], the same for both families
# without shrinking: 40x70 on the 2x2 grid keeps 10 of 16 rows (64 + 10 * 17), 60x30 is 2x1 (64 + 16 * 9), 20x20 is
# 1x2 unpadded to 8 rows (64 + 8 * 9), 64x64 is 2x2 whole (64 + 16 * 17).
STOCK_COUNTS = [234, 208, 136, 336]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("index", range(6))
def test_single_image_matches_stock_with_the_base_tokens_only(family, index):
    image = images_of_every_shape()[index]
    flex_inputs = flex_processor(family)(images=image, text=PROMPTS[0], return_tensors="pt")
    stock_inputs = stock_processor(family)(images=image, text=PROMPTS[0], return_tensors="pt")
    assert_base_only_parity(family, flex_inputs, stock_inputs)
    # The stock prompt holds base + crops + newlines: strictly more, so the test does shorten a span.
    assert (stock_inputs["input_ids"] == TINY_IMAGE_TOKEN_ID).sum() > BASE_TOKENS
    assert (flex_inputs["input_ids"] == TINY_IMAGE_TOKEN_ID).sum() == BASE_TOKENS


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_with_a_text_only_row_matches_stock(family):
    flex = flex_processor(family)
    images = images_of_every_shape()
    text = [PROMPTS[index % 2] for index in range(len(images))] + [PROMPTS[2]]
    flex_inputs = flex(images=images, text=text, padding=True, return_tensors="pt")
    stock_inputs = stock_processor(family)(images=images, text=text, padding=True, return_tensors="pt")
    assert_base_only_parity(family, flex_inputs, stock_inputs)
    assert flex_inputs["image_sizes"].tolist() == [[40, 70], [60, 30], [20, 20], [64, 64], [50, 33], [36, 52]]
    if family is ONEVISION:
        assert flex_inputs["batch_num_images"].tolist() == [1] * 6
    assert (stock_inputs["input_ids"] == TINY_IMAGE_TOKEN_ID).sum(dim=1).tolist()[:4] == STOCK_COUNTS
    assert (flex_inputs["input_ids"] == TINY_IMAGE_TOKEN_ID).sum(dim=1).tolist() == [BASE_TOKENS] * 6 + [0]
    # Nested per-sample lists, as for several images per sample, with one (or no) image each.
    nested = flex(images=[[image] for image in images] + [[]], text=text, padding=True, return_tensors="pt")
    for key, value in flex_inputs.items():
        assert torch.equal(nested[key], value), key


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_template_matches_stock(family):
    conversations = [
        [{"role": "user", "content": [{"type": "image", "image": make_image(3, 70, 40)}, {"type": "text", "text": q}]}]
        for q in ("what is in the image ?", "describe the picture")
    ]
    options = {"add_generation_prompt": True, "tokenize": True, "return_dict": True, "return_tensors": "pt"}
    flex_inputs = flex_processor(family).apply_chat_template(conversations, padding=True, **options)
    stock_inputs = stock_processor(family).apply_chat_template(conversations, padding=True, **options)
    assert_base_only_parity(family, flex_inputs, stock_inputs)


@pytest.mark.parametrize("family", FAMILIES)
def test_num_multimodal_tokens_counts_the_base_only(family):
    sizes = [[40, 70], [60, 30], [20, 20], [64, 64], [500, 900]]
    assert flex_processor(family)._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens == [BASE_TOKENS] * 5
    assert stock_processor(family)._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens[:4] == STOCK_COUNTS


@pytest.mark.parametrize("setting", settings(ratios=True))
def test_base_features_are_the_prompt_tokens(setting):
    """The tiny model's stock packing puts the base image's g*g features first in each image's entry, and those
    are exactly as many as the processor's placeholders: the stock forward scatters them into the flex prompt."""
    family = setting.family
    model = setting.stock()
    images = images_of_every_shape()[:4]
    inputs = flex_processor(family)(
        images=images, text=[PROMPTS[0]] * 4 + [PROMPTS[2]], padding=True, return_tensors="pt"
    )
    placeholders = (inputs["input_ids"] == TINY_IMAGE_TOKEN_ID).sum(dim=1).tolist()
    assert placeholders == [BASE_TOKENS] * 4 + [0]
    extra = {"batch_num_images": inputs["batch_num_images"]} if family is ONEVISION else {}
    with torch.no_grad():
        packed = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"], **extra).pooler_output
        # Reference: the base patch alone through the tower (the family's layer and select strategy) and the
        # projector.
        hidden = model.model.vision_tower(inputs["pixel_values"][:, 0], output_hidden_states=True).hidden_states
        base = model.model.multi_modal_projector(family.tower_base(hidden))
        assert base.shape[1] == BASE_TOKENS
        # base + crops + newlines, as the stock processor counts them; anyres_max_2 shrinks the 40x70 image's 10x16
        # crop tokens to 8x14 and the 64x64 image's 16x16 to 11x11.
        stock = stock_processor(family, setting.ratio)
        stock_counts = stock._get_num_multimodal_tokens(image_sizes=inputs["image_sizes"].tolist()).num_image_tokens
        expected = [184, 208, 136, 196] if setting.ratio == "anyres_max_2" else STOCK_COUNTS
        assert [len(features) for features in packed] == stock_counts == expected
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


@pytest.mark.parametrize("family", FAMILIES)
def test_from_the_stock_processor_keeps_its_parts(family):
    stock = stock_processor(family)
    wrapped = getattr(family.flex_processor_class, f"from_llava_{family.name}_processor")(stock)
    assert wrapped.tokenizer is stock.tokenizer and wrapped.image_processor is stock.image_processor
    assert wrapped.chat_template == stock.chat_template
    for name, value in family.processor_scalars.items():
        assert getattr(wrapped, name) == getattr(stock, name) == value, name
    image = make_image(0, 70, 40)
    assert_base_only_parity(
        family,
        wrapped(images=image, text=PROMPTS[0], return_tensors="pt"),
        stock(images=image, text=PROMPTS[0], return_tensors="pt"),
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_load(family, tmp_path):
    flex = flex_processor(family)
    processor = flex
    if family is ONEVISION:
        # A non-default vision_aspect_ratio: a scalar the save must keep (it is an `__init__` parameter).
        processor = FlexLlavaOnevisionProcessor.from_llava_onevision_processor(flex)
        processor.vision_aspect_ratio = "anyres_max_4"
    processor.save_pretrained(tmp_path)
    images = images_of_every_shape()[:2]
    expected = processor(images=images, text=list(PROMPTS), padding=True, return_tensors="pt")
    processor_class = family.flex_processor_class
    for loaded in (
        processor_class.from_pretrained(tmp_path),
        AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True),  # the saved remote code
    ):
        assert type(loaded).__name__ == processor_class.__name__
        settings = family.saved_processor_settings
        assert {name: getattr(loaded, name) for name in settings} == {
            name: getattr(processor, name) for name in settings
        }
        if family is ONEVISION:
            assert loaded.vision_aspect_ratio == "anyres_max_4"
        assert loaded.image_processor.image_grid_pinpoints == flex.image_processor.image_grid_pinpoints
        assert loaded.image_processor.size == flex.image_processor.size
        assert loaded.chat_template == flex.chat_template
        assert not hasattr(loaded, "video_processor")
        again = loaded(images=images, text=list(PROMPTS), padding=True, return_tensors="pt")
        assert set(again) == set(expected) == set(family.input_keys)
        for key, value in expected.items():
            assert torch.equal(again[key], value), key
    assert isinstance(processor_class.from_pretrained(tmp_path), processor_class)


@pytest.mark.parametrize("family", FAMILIES)
def test_bad_calls_raise_with_the_fix(family):
    """What neither processor can serve: several images in a sample or a prompt, videos, image counts that do not
    match the prompts' `<image>`s. (Bad settings, and OneVision's `<video>` prompts, are in the family files.)"""
    flex = flex_processor(family)
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
