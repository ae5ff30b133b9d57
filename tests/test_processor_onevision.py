"""FlexLlavaOnevisionProcessor: the stock LLaVA-OneVision pixels, sizes and image counts, each `<image>` expanded to
the base g*g tokens."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, LlavaOnevisionProcessor
from transformers.modeling_outputs import BaseModelOutputWithPooling

from hf_flexattention import FlexLlavaOnevisionProcessor
from hf_flexattention.tiny import (
    TINY_IMAGE_TOKEN_ID,
    TINY_VIDEO_TOKEN_ID,
    build_tiny_llava_onevision,
    build_tiny_onevision_processor,
)

from .conftest import LLAVA_HF_TEMPLATE, PROMPTS, make_image
from .test_processor_next import images_of_every_shape, shorten_image_spans


BASE_TOKENS = 8 * 8  # the tiny SigLIP tower: 32 px images, 4 px patches, no CLS token
INPUT_KEYS = {"input_ids", "attention_mask", "pixel_values", "image_sizes", "batch_num_images"}


class StockOnevisionProcessor(LlavaOnevisionProcessor):
    """The stock `LlavaOnevisionProcessor` behaviour, unchanged, built without a video processor.

    Without torchvision the stock `__init__` fails on the lookup of the video processor class even for
    `video_processor=None`; leaving that parameter out of the signature skips the lookup and nothing else.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens=None,
        vision_feature_select_strategy=None,
        chat_template=None,
        vision_aspect_ratio="anyres_max_9",
    ):
        super().__init__(
            image_processor,
            tokenizer,
            None,
            num_image_tokens=num_image_tokens,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template,
            vision_aspect_ratio=vision_aspect_ratio,
        )


@pytest.fixture(scope="module")
def flex() -> FlexLlavaOnevisionProcessor:
    processor = build_tiny_onevision_processor()
    processor.chat_template = LLAVA_HF_TEMPLATE
    return processor


@pytest.fixture(scope="module")
def stock(flex) -> LlavaOnevisionProcessor:
    return StockOnevisionProcessor(
        image_processor=flex.image_processor,
        tokenizer=flex.tokenizer,
        num_image_tokens=BASE_TOKENS,
        vision_feature_select_strategy="full",
        chat_template=LLAVA_HF_TEMPLATE,
    )


def assert_base_only_parity(flex_inputs, stock_inputs) -> None:
    assert set(flex_inputs) == set(stock_inputs) == INPUT_KEYS
    for key in ("pixel_values", "image_sizes", "batch_num_images"):
        assert torch.equal(flex_inputs[key], stock_inputs[key]), key
    expected_ids, expected_mask = shorten_image_spans(stock_inputs, BASE_TOKENS)
    assert torch.equal(flex_inputs["input_ids"], expected_ids)
    assert torch.equal(flex_inputs["attention_mask"], expected_mask)


def test_tiny_tokenizer_matches_the_tiny_model(flex):
    config = build_tiny_llava_onevision().config
    assert flex.image_token_id == config.image_token_id == TINY_IMAGE_TOKEN_ID
    assert flex.video_token_id == config.video_token_id == TINY_VIDEO_TOKEN_ID
    assert flex.tokenizer.convert_ids_to_tokens([TINY_VIDEO_TOKEN_ID, TINY_IMAGE_TOKEN_ID]) == ["<video>", "<image>"]
    assert len(flex.tokenizer) == config.text_config.vocab_size


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
    assert flex_inputs["batch_num_images"].tolist() == [1] * 6
    # Stock: base + unpadded crops + newlines (40x70 on the 2x2 grid keeps 10 of 16 rows: 64 + 10 * 17).
    assert (stock_inputs["input_ids"] == TINY_IMAGE_TOKEN_ID).sum(dim=1).tolist()[:4] == [234, 208, 136, 336]
    assert (flex_inputs["input_ids"] == TINY_IMAGE_TOKEN_ID).sum(dim=1).tolist() == [BASE_TOKENS] * 6 + [0]
    # Nested per-sample lists, as for several images per sample, with one (or no) image each.
    nested = flex(images=[[image] for image in images] + [[]], text=text, padding=True, return_tensors="pt")
    for key, value in flex_inputs.items():
        assert torch.equal(nested[key], value), key


def test_downsampled_grids_still_give_the_base_only(flex):
    """`anyres_max_2` shrinks the stock 64x64 image's 16x16 crop tokens to 11x11; the base is unaffected."""
    parts = {"image_processor": flex.image_processor, "tokenizer": flex.tokenizer, "num_image_tokens": BASE_TOKENS}
    stock = StockOnevisionProcessor(**parts, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_2")
    processor = FlexLlavaOnevisionProcessor(**parts, vision_aspect_ratio="anyres_max_2")
    image = make_image(0, 64, 64)
    stock_inputs = stock(images=image, text=PROMPTS[0], return_tensors="pt")
    assert (stock_inputs["input_ids"] == TINY_IMAGE_TOKEN_ID).sum() == 64 + 11 * 12
    assert_base_only_parity(processor(images=image, text=PROMPTS[0], return_tensors="pt"), stock_inputs)


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
    sizes = [[40, 70], [60, 30], [20, 20], [64, 64], [500, 900]]
    assert flex._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens == [BASE_TOKENS] * 5
    assert stock._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens[:4] == [234, 208, 136, 336]


@pytest.mark.parametrize("vision_aspect_ratio", ["anyres_max_9", "anyres_max_2"])
def test_base_features_are_the_prompt_tokens(flex, vision_aspect_ratio):
    """The tiny model's stock packing puts the base image's g*g features first in each image's entry, and those
    are exactly as many as the processor's placeholders: the stock forward scatters them into the flex prompt."""
    model = build_tiny_llava_onevision(vision_aspect_ratio=vision_aspect_ratio)
    images = images_of_every_shape()[:4]
    inputs = flex(images=images, text=[PROMPTS[0]] * 4 + [PROMPTS[2]], padding=True, return_tensors="pt")
    placeholders = (inputs["input_ids"] == TINY_IMAGE_TOKEN_ID).sum(dim=1).tolist()
    assert placeholders == [BASE_TOKENS] * 4 + [0]
    with torch.no_grad():
        packed = model.model.get_image_features(
            inputs["pixel_values"], inputs["image_sizes"], batch_num_images=inputs["batch_num_images"]
        ).pooler_output
        # Reference: the base patch alone through the tower (last layer, "full": every token) and the projector.
        hidden = model.model.vision_tower(inputs["pixel_values"][:, 0], output_hidden_states=True).hidden_states
        base = model.model.multi_modal_projector(hidden[-1])
        assert base.shape[1] == BASE_TOKENS
        # base + crops + newlines, as the stock processor counts them; anyres_max_2 shrinks the 40x70 image's 10x16
        # crop tokens to 8x14 and the 64x64 image's 16x16 to 11x11.
        stock = StockOnevisionProcessor(
            flex.image_processor, flex.tokenizer, BASE_TOKENS, "full", vision_aspect_ratio=vision_aspect_ratio
        )
        stock_counts = stock._get_num_multimodal_tokens(image_sizes=inputs["image_sizes"].tolist()).num_image_tokens
        expected = {"anyres_max_9": [234, 208, 136, 336], "anyres_max_2": [184, 208, 136, 196]}[vision_aspect_ratio]
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


def test_save_and_load(flex, tmp_path):
    # A non-default vision_aspect_ratio: a scalar the save must keep (it is an `__init__` parameter).
    processor = FlexLlavaOnevisionProcessor.from_llava_onevision_processor(flex)
    processor.vision_aspect_ratio = "anyres_max_4"
    processor.save_pretrained(tmp_path)
    images = images_of_every_shape()[:2]
    expected = processor(images=images, text=list(PROMPTS), padding=True, return_tensors="pt")
    for loaded in (
        FlexLlavaOnevisionProcessor.from_pretrained(tmp_path),
        AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True),  # the saved remote code
    ):
        assert type(loaded).__name__ == "FlexLlavaOnevisionProcessor"
        settings = (
            "num_image_tokens",
            "vision_feature_select_strategy",
            "vision_aspect_ratio",
            "image_token",
            "video_token",
            "image_token_id",
            "video_token_id",
        )
        assert {name: getattr(loaded, name) for name in settings} == {
            name: getattr(processor, name) for name in settings
        }
        assert loaded.vision_aspect_ratio == "anyres_max_4"
        assert loaded.image_processor.image_grid_pinpoints == flex.image_processor.image_grid_pinpoints
        assert loaded.image_processor.size == flex.image_processor.size
        assert loaded.chat_template == flex.chat_template
        assert not hasattr(loaded, "video_processor")
        again = loaded(images=images, text=list(PROMPTS), padding=True, return_tensors="pt")
        assert set(again) == set(expected) == INPUT_KEYS
        for key, value in expected.items():
            assert torch.equal(again[key], value), key
    assert isinstance(FlexLlavaOnevisionProcessor.from_pretrained(tmp_path), FlexLlavaOnevisionProcessor)


def test_from_llava_onevision_processor_keeps_its_parts(flex, stock):
    wrapped = FlexLlavaOnevisionProcessor.from_llava_onevision_processor(stock)
    assert wrapped.tokenizer is stock.tokenizer and wrapped.image_processor is stock.image_processor
    assert wrapped.chat_template == stock.chat_template and wrapped.num_image_tokens == BASE_TOKENS
    assert wrapped.vision_aspect_ratio == stock.vision_aspect_ratio
    image = make_image(0, 70, 40)
    assert_base_only_parity(
        wrapped(images=image, text=PROMPTS[0], return_tensors="pt"),
        stock(images=image, text=PROMPTS[0], return_tensors="pt"),
    )


def test_bad_input_raises_with_the_fix(flex):
    parts = {"image_processor": flex.image_processor, "tokenizer": flex.tokenizer}
    for strategy in ("default", None):
        with pytest.raises(ValueError, match="'full' only.*Use 'full'"):
            FlexLlavaOnevisionProcessor(**parts, num_image_tokens=BASE_TOKENS, vision_feature_select_strategy=strategy)
    for num_image_tokens in (None, 0, 65, 64.0, True):
        with pytest.raises(ValueError, match="`num_image_tokens` must be g\\*g"):
            FlexLlavaOnevisionProcessor(**parts, num_image_tokens=num_image_tokens)
    with pytest.raises(TypeError, match="Expected a LlavaOnevisionProcessor"):
        FlexLlavaOnevisionProcessor.from_llava_onevision_processor(flex.tokenizer)
    with pytest.raises(TypeError, match="Expected a LlavaOnevisionProcessor"):
        FlexLlavaOnevisionProcessor.from_llava_onevision_processor(flex.image_processor)
    no_count = StockOnevisionProcessor(**parts, vision_feature_select_strategy="full")
    with pytest.raises(ValueError, match="has no `num_image_tokens`"):
        FlexLlavaOnevisionProcessor.from_llava_onevision_processor(no_count)
    with pytest.raises(ValueError, match="Use 'full'"):
        FlexLlavaOnevisionProcessor.from_llava_onevision_processor(
            StockOnevisionProcessor(**parts, num_image_tokens=BASE_TOKENS, vision_feature_select_strategy="default")
        )

    image, other = make_image(0), make_image(1, 30, 60)
    with pytest.raises(ValueError, match="A sample has 2 images.*one image per sample"):
        flex(images=[[image, other]], text=["USER: <image> <image> a cat"])
    with pytest.raises(ValueError, match="A sample has 2 images.*one image per sample"):
        flex(images=[[image], [image, other]], text=["USER: <image> a cat", "USER: <image> <image> a cat"])
    with pytest.raises(ValueError, match="at most one '<image>'"):
        flex(images=[image, other], text="USER: <image> <image> ASSISTANT:")
    video = [np.zeros((2, 32, 32, 3), dtype=np.uint8)]
    for text in (PROMPTS[2], "USER: <video> what is in the image ?"):
        with pytest.raises(ValueError, match="takes no videos.*separate samples' `images`"):
            flex(videos=video, text=text)
    with pytest.raises(ValueError, match="Found 1 <video> tokens in the text but no videos were passed"):
        flex(text="USER: <video> what is in the image ?")
    with pytest.raises(ValueError, match="Found total 1 <image> tokens and 2 images"):
        flex(images=[image, other], text=PROMPTS[0])
    with pytest.raises(ValueError, match="no images were passed"):
        flex(text=PROMPTS[0])


def test_from_pretrained_loads_a_stock_onevision_folder(flex, stock, tmp_path):
    """A llava-hf OneVision checkpoint's processor files (the older layout: the image processor in
    preprocessor_config.json, a video processor config the Flex processor ignores, the scalars in
    processor_config.json) load straight into `FlexLlavaOnevisionProcessor`, with no torchvision needed."""
    flex.tokenizer.save_pretrained(tmp_path)
    image_processor = flex.image_processor.to_dict() | {"image_processor_type": "LlavaOnevisionImageProcessor"}
    video_processor = {"video_processor_type": "LlavaOnevisionVideoProcessor", "size": {"height": 32, "width": 32}}
    scalars = {"num_image_tokens": BASE_TOKENS, "vision_feature_select_strategy": "full"}
    files = {
        "preprocessor_config.json": image_processor,
        "video_preprocessor_config.json": video_processor,
        "processor_config.json": scalars | {"processor_class": "LlavaOnevisionProcessor"},
        "chat_template.json": {"chat_template": LLAVA_HF_TEMPLATE},
    }
    for name, content in files.items():
        (tmp_path / name).write_text(json.dumps(content))
    loaded = FlexLlavaOnevisionProcessor.from_pretrained(tmp_path)
    assert loaded.num_image_tokens == BASE_TOKENS and loaded.chat_template == LLAVA_HF_TEMPLATE
    assert loaded.image_processor.image_grid_pinpoints == flex.image_processor.image_grid_pinpoints
    images = images_of_every_shape()[:2]
    text = [PROMPTS[0], PROMPTS[1], PROMPTS[2]]
    assert_base_only_parity(
        loaded(images=images, text=text, padding=True, return_tensors="pt"),
        stock(images=images, text=text, padding=True, return_tensors="pt"),
    )
