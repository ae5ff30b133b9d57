"""FlexLlavaProcessor: dual-resolution preprocessing (DESIGN.md 2.1), prompt expansion, save/load."""

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import LlavaProcessor

from hf_flexattention.processing_flex_llava import FlexLlavaProcessor, pad_to_square
from hf_flexattention.tiny import TINY_IMAGE_TOKEN_ID

from .conftest import PROMPTS, make_image


def test_outputs_and_shapes(processor, batch_inputs):
    assert set(batch_inputs) == {
        "input_ids",
        "attention_mask",
        "pixel_values",
        "high_res_pixel_values",
        "original_image_sizes",
    }
    assert batch_inputs["pixel_values"].shape == (2, 3, 32, 32)
    assert batch_inputs["high_res_pixel_values"].shape == (2, 3, 96, 96)
    assert batch_inputs["original_image_sizes"].tolist() == [[40, 60], [64, 40]]  # (height, width)
    image_tokens = (batch_inputs["input_ids"] == TINY_IMAGE_TOKEN_ID).sum(dim=1)
    assert image_tokens.tolist() == [64, 64, 0]  # the low-res grid only, never the high-res one


def test_low_res_is_the_antialiased_downsample_of_high_res(batch_inputs):
    expected = F.interpolate(batch_inputs["high_res_pixel_values"], size=(32, 32), mode="bilinear", antialias=True)
    assert torch.equal(batch_inputs["pixel_values"], expected)


def test_images_are_padded_with_the_mean_colour(processor):
    image = Image.new("RGB", (90, 30), (255, 0, 0))  # landscape: padded above and below
    high_res = processor(images=image, text=PROMPTS[0], return_tensors="pt")["high_res_pixel_values"][0]
    fill = [int(mean * 255) for mean in processor.image_processor.image_mean]
    for channel in range(3):
        top_row = high_res[channel, 0]
        expected = (
            fill[channel] / 255 - processor.image_processor.image_mean[channel]
        ) / processor.image_processor.image_std[channel]
        torch.testing.assert_close(top_row, torch.full_like(top_row, expected), atol=1e-5, rtol=0)
    centre = high_res[:, 48, 48]
    assert centre[0] > 1.5 and centre[1] < -1.0  # the red image itself


def test_pad_to_square_centres_the_image():
    padded = pad_to_square(Image.new("RGB", (10, 4), (255, 255, 255)), (0, 0, 0))
    assert padded.size == (10, 10)
    assert padded.getpixel((5, 2)) == (0, 0, 0) and padded.getpixel((5, 3)) == (255, 255, 255)
    assert padded.getpixel((5, 6)) == (255, 255, 255) and padded.getpixel((5, 7)) == (0, 0, 0)


def test_save_and_load(processor, tmp_path, batch_inputs):
    processor.save_pretrained(tmp_path)
    loaded = FlexLlavaProcessor.from_pretrained(tmp_path)
    assert loaded.zoom == 3 and loaded.num_image_tokens == 64
    again = loaded(
        images=[make_image(1), make_image(2, width=40, height=64)],
        text=list(PROMPTS),
        padding=True,
        return_tensors="pt",
    )
    for key, value in batch_inputs.items():
        assert torch.equal(again[key], value), key


def test_from_llava_processor_keeps_its_parts(processor):
    llava = LlavaProcessor(
        image_processor=processor.image_processor,
        tokenizer=processor.tokenizer,
        patch_size=4,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    flex = FlexLlavaProcessor.from_llava_processor(llava, zoom=2)
    assert flex.tokenizer is llava.tokenizer and flex.image_processor is llava.image_processor
    assert flex.zoom == 2
    out = flex(images=make_image(0), text=PROMPTS[0], return_tensors="pt")
    assert out["high_res_pixel_values"].shape[-1] == 64
    stock = llava(images=make_image(0), text=PROMPTS[0], return_tensors="pt")
    assert torch.equal(out["input_ids"], stock["input_ids"])  # same prompt expansion as the stock processor


def test_bad_input_raises_with_the_fix(processor):
    with pytest.raises(ValueError, match="1 '<image>' placeholders but 2 images"):
        processor(images=[make_image(0), make_image(1)], text=PROMPTS[0])
    with pytest.raises(ValueError, match="at most one '<image>'"):
        processor(images=[make_image(0), make_image(1)], text="USER: <image> <image> ASSISTANT:")
    with pytest.raises(ValueError, match="one image per sample"):
        processor(images=[[make_image(0), make_image(1)]], text=PROMPTS[0])
    with pytest.raises(TypeError, match="PIL"):
        processor(images=["picture.png"], text=PROMPTS[0])
    with pytest.raises(ValueError, match="needs `text`"):
        processor(images=make_image(0))
    with pytest.raises(ValueError, match="zoom"):
        FlexLlavaProcessor(
            image_processor=processor.image_processor, tokenizer=processor.tokenizer, patch_size=4, zoom=0
        )
    with pytest.raises(TypeError, match="LlavaProcessor"):
        FlexLlavaProcessor.from_llava_processor(processor.tokenizer)
