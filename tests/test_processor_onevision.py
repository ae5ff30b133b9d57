"""FlexLlavaOnevisionProcessor only: the tiny tokenizer, shrunk grids, loading a stock OneVision folder, and the
settings and `<video>` prompts it refuses. The parity with the stock LlavaOnevisionProcessor (the base g*g tokens per
`<image>`, the stock pixels, sizes and image counts), saving and loading and the bad calls both any-resolution
processors share are in `tests/test_processor_any_resolution.py`."""

import json

import numpy as np
import pytest

from hf_flexattention import FlexLlavaOnevisionProcessor
from hf_flexattention.tiny import TINY_IMAGE_TOKEN_ID, TINY_VIDEO_TOKEN_ID, build_tiny_llava_onevision

from .anyres_helpers import (
    BASE_TOKENS,
    ONEVISION,
    assert_base_only_parity,
    flex_processor,
    images_of_every_shape,
    stock_processor,
)
from .conftest import LLAVA_HF_TEMPLATE, PROMPTS, StockOnevisionProcessor, make_image


@pytest.fixture(scope="module")
def flex() -> FlexLlavaOnevisionProcessor:
    return flex_processor(ONEVISION)


def test_tiny_tokenizer_matches_the_tiny_model(flex):
    config = build_tiny_llava_onevision().config
    assert flex.image_token_id == config.image_token_id == TINY_IMAGE_TOKEN_ID
    assert flex.video_token_id == config.video_token_id == TINY_VIDEO_TOKEN_ID
    assert flex.tokenizer.convert_ids_to_tokens([TINY_VIDEO_TOKEN_ID, TINY_IMAGE_TOKEN_ID]) == ["<video>", "<image>"]
    assert len(flex.tokenizer) == config.text_config.vocab_size


def test_downsampled_grids_still_give_the_base_only(flex):
    """`anyres_max_2` shrinks the stock 64x64 image's 16x16 crop tokens to 11x11; the base is unaffected."""
    parts = {"image_processor": flex.image_processor, "tokenizer": flex.tokenizer, "num_image_tokens": BASE_TOKENS}
    stock = StockOnevisionProcessor(**parts, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_2")
    processor = FlexLlavaOnevisionProcessor(**parts, vision_aspect_ratio="anyres_max_2")
    image = make_image(0, 64, 64)
    stock_inputs = stock(images=image, text=PROMPTS[0], return_tensors="pt")
    assert (stock_inputs["input_ids"] == TINY_IMAGE_TOKEN_ID).sum() == 64 + 11 * 12
    assert_base_only_parity(ONEVISION, processor(images=image, text=PROMPTS[0], return_tensors="pt"), stock_inputs)


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
        flex(images=[[image], [image, other]], text=["USER: <image> a cat", "USER: <image> <image> a cat"])
    video = [np.zeros((2, 32, 32, 3), dtype=np.uint8)]
    for text in (PROMPTS[2], "USER: <video> what is in the image ?"):
        with pytest.raises(ValueError, match="takes no videos.*separate samples' `images`"):
            flex(videos=video, text=text)
    with pytest.raises(ValueError, match="Found 1 <video> tokens in the text but no videos were passed"):
        flex(text="USER: <video> what is in the image ?")


def test_from_pretrained_loads_a_stock_onevision_folder(flex, tmp_path):
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
        ONEVISION,
        loaded(images=images, text=text, padding=True, return_tensors="pt"),
        stock_processor(ONEVISION)(images=images, text=text, padding=True, return_tensors="pt"),
    )
