"""FlexLlavaNextProcessor only: the settings it refuses. The parity with the stock LlavaNextProcessor (the base g*g
tokens per `<image>`, the stock pixels and sizes), saving and loading and the bad calls both any-resolution processors
share are in `tests/test_processor_any_resolution.py`."""

import pytest
from transformers import LlavaNextProcessor

from hf_flexattention import FlexLlavaNextProcessor

from .anyres_helpers import NEXT, flex_processor


def test_bad_settings_raise_with_the_fix():
    flex = flex_processor(NEXT)
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
