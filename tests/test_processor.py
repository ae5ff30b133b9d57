"""FlexLlavaProcessor: dual-resolution preprocessing (DESIGN.md 2.1), prompt expansion, save/load."""

import numpy as np
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
    with pytest.raises(ValueError, match="Found total 1 <image> tokens and 2 images"):
        processor(images=[make_image(0), make_image(1)], text=PROMPTS[0])
    with pytest.raises(ValueError, match="at most one '<image>'"):
        processor(images=[make_image(0), make_image(1)], text="USER: <image> <image> ASSISTANT:")
    with pytest.raises(ValueError, match="one image per sample"):
        processor(images=[[make_image(0), make_image(1)]], text=PROMPTS[0])
    with pytest.raises(ValueError, match="valid path to an image file"):
        processor(images=["no-such-picture.png"], text=PROMPTS[0])
    with pytest.raises(TypeError, match="single or a list of entries"):
        processor(images=[3], text=PROMPTS[0])
    with pytest.raises(ValueError, match="no images were passed"):
        processor(text=PROMPTS[0])
    for option in ("do_pad", "do_resize"):
        with pytest.raises(ValueError, match=f"cannot honour {option}=False"):
            processor(images=make_image(0), text=PROMPTS[0], **{option: False})
    with pytest.raises(ValueError, match="Give them the same side"):
        processor(images=make_image(0), text=PROMPTS[0], size={"shortest_edge": 40})
    with pytest.raises(ValueError, match="equal height and width"):
        processor(images=make_image(0), text=PROMPTS[0], crop_size={"height": 32, "width": 40})
    with pytest.raises(ValueError, match="zoom"):
        FlexLlavaProcessor(
            image_processor=processor.image_processor, tokenizer=processor.tokenizer, patch_size=4, zoom=0
        )
    with pytest.raises(TypeError, match="LlavaProcessor"):
        FlexLlavaProcessor.from_llava_processor(processor.tokenizer)


def test_truncation_through_image_tokens_is_refused(processor):
    """Stock's check: cutting 45 of the 64 image tokens would leave features without placeholders."""
    with pytest.raises(ValueError, match="Mismatch in `image` token count.*truncation"):
        processor(images=make_image(0), text=PROMPTS[0], truncation=True, max_length=20)
    text_only = processor(text=PROMPTS[2], truncation=True, max_length=4, return_tensors="pt")
    assert text_only["input_ids"].shape == (1, 4)  # truncating text is still allowed


# --- Parity with LlavaProcessor: every input form and option the stock processor takes ---------------------------


@pytest.fixture(scope="module")
def stock(processor):
    return LlavaProcessor(
        image_processor=processor.image_processor,
        tokenizer=processor.tokenizer,
        patch_size=processor.patch_size,
        vision_feature_select_strategy=processor.vision_feature_select_strategy,
        num_additional_image_tokens=processor.num_additional_image_tokens,
        chat_template=processor.chat_template,
    )


@pytest.fixture(scope="module")
def png_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "picture.png"
    make_image(7, width=50, height=30).save(path)
    return path


def _image_forms(png_path):
    """The same 50x30 picture as each input form transformers accepts."""
    pil = Image.open(png_path).convert("RGB")
    array = np.array(pil)
    return {
        "pil": pil,
        "numpy_hwc": array,
        "numpy_chw": np.ascontiguousarray(array.transpose(2, 0, 1)),
        "tensor_chw": torch.from_numpy(array).permute(2, 0, 1).contiguous(),
        "path": str(png_path),
        "nested_list": [[pil]],
    }


OPTIONS = {
    "defaults": ({}, {}),
    "do_normalize": ({"do_normalize": False}, {"do_normalize": False}),
    "image_mean": ({"image_mean": [0.0, 0.0, 0.0]}, {"image_mean": [0.0, 0.0, 0.0]}),
    "images_kwargs": ({"images_kwargs": {"do_normalize": False}}, {"do_normalize": False}),
    "resample": ({"resample": Image.Resampling.NEAREST}, {"resample": Image.Resampling.NEAREST}),
    "text_kwargs": ({"text_kwargs": {"padding": "max_length", "max_length": 80}}, {}),
    "padding": ({"padding": "max_length", "max_length": 80}, {}),
}


@pytest.mark.parametrize("form", ["pil", "numpy_hwc", "numpy_chw", "tensor_chw", "path", "nested_list"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_parity_with_llava_processor(processor, stock, png_path, form, option):
    call_kwargs, image_options = OPTIONS[option]
    image = _image_forms(png_path)[form]
    prompt = "USER: <image>\nwhat color is the sign ? ASSISTANT:"
    ours = processor(images=image, text=prompt, return_tensors="pt", **call_kwargs)
    theirs = stock(images=image, text=prompt, return_tensors="pt", **call_kwargs)
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])
    assert ours["original_image_sizes"].tolist() == [[30, 50]]
    # Reference: pad with PIL to a square of the (possibly overridden) mean colour, then the stock image
    # processor at the high-res side with the same options.
    mean = image_options.get("image_mean", processor.image_processor.image_mean)
    padded = pad_to_square(Image.open(png_path).convert("RGB"), tuple(int(channel * 255) for channel in mean))
    expected = processor.image_processor(
        padded,
        size={"shortest_edge": 96},
        crop_size={"height": 96, "width": 96},
        return_tensors="pt",
        **image_options,
    )["pixel_values"]
    torch.testing.assert_close(ours["high_res_pixel_values"], expected, atol=0, rtol=0)
    low_res = F.interpolate(expected, size=(32, 32), mode="bilinear", antialias=True)
    torch.testing.assert_close(ours["pixel_values"], low_res, atol=0, rtol=0)


def test_options_change_the_pixels_they_should(processor, png_path):
    """Guards the parity test's reference: each option really changes the output (nothing is ignored)."""
    prompt = "USER: <image>\nwhat ? ASSISTANT:"
    base = processor(images=str(png_path), text=prompt, return_tensors="pt")["high_res_pixel_values"]
    raw = processor(images=str(png_path), text=prompt, do_normalize=False, return_tensors="pt")
    assert raw["high_res_pixel_values"].min() >= 0 and raw["high_res_pixel_values"].max() <= 1
    assert not torch.equal(raw["high_res_pixel_values"], base)
    nested = processor(images=str(png_path), text=prompt, images_kwargs={"do_normalize": False}, return_tensors="pt")
    assert torch.equal(nested["high_res_pixel_values"], raw["high_res_pixel_values"])
    zero_mean = processor(images=str(png_path), text=prompt, image_mean=[0.0, 0.0, 0.0], return_tensors="pt")
    assert zero_mean["high_res_pixel_values"][:, :, 0, 0].abs().max() == 0  # the padding is black now
    padded = processor(images=str(png_path), text=prompt, padding="max_length", max_length=80, return_tensors="pt")
    unpadded = processor(images=str(png_path), text=prompt, return_tensors="pt")["input_ids"]
    assert padded["input_ids"].shape == (1, 80) and padded["attention_mask"].sum() == unpadded.shape[1]
    assert torch.equal(padded["input_ids"][:, 80 - unpadded.shape[1] :], unpadded)  # left padded


def test_chat_template_with_local_images(template_processor, png_path):
    processor = template_processor
    prompt = "what color is the sign ?"
    expected = processor(images=Image.open(png_path), text=f"USER: <image>\n{prompt} ASSISTANT:", return_tensors="pt")
    for key in ("path", "url"):
        messages = [
            {"role": "user", "content": [{"type": "image", key: str(png_path)}, {"type": "text", "text": prompt}]}
        ]
        inputs = processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        assert set(inputs) == set(expected)
        for name, value in expected.items():
            assert torch.equal(inputs[name], value), (key, name)


def test_model_input_names_include_the_high_res_inputs(processor):
    names = processor.model_input_names
    assert {"input_ids", "attention_mask", "pixel_values", "high_res_pixel_values", "original_image_sizes"} <= set(
        names
    )
