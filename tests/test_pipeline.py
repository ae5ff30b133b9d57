"""`pipeline("image-text-to-text")` runs a FlexAttention model through its high-res path: given a patched model and
its processor, and given only a saved folder (AutoProcessor picks `FlexLlavaProcessor` on its own)."""

import pytest
import torch
from transformers import pipeline

from hf_flexattention import FlexLlavaForConditionalGeneration, FlexLlavaProcessor, patch_model
from hf_flexattention.hub import save_pretrained
from hf_flexattention.tiny import build_tiny_llava

from .conftest import PROMPTS, make_image


NEW_TOKENS = 4


@pytest.fixture
def model():
    return patch_model(build_tiny_llava(), n_fa=2).eval()


@pytest.fixture
def high_res_encodings(monkeypatch):
    """Counts the calls that encode high-res images (the path a pipeline must take)."""
    calls = []
    original = FlexLlavaForConditionalGeneration.encode_high_res

    def counting(self, *args, **kwargs):
        calls.append(args[0].shape[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FlexLlavaForConditionalGeneration, "encode_high_res", counting)
    return calls


def expected_answer(model, processor, image, prompt) -> str:
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    tokens = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    return processor.decode(tokens[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_a_patched_model_with_its_processor(model, processor, high_res_encodings):
    image = make_image(1)
    answer = expected_answer(model, processor, image, PROMPTS[0])
    high_res_encodings.clear()
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    out = pipe(images=image, text=PROMPTS[0], max_new_tokens=NEW_TOKENS, do_sample=False, return_full_text=False)
    assert out[0]["generated_text"].strip() == answer.strip()
    assert high_res_encodings == [1]


def test_a_saved_folder_picks_the_flex_processor(model, template_processor, tmp_path, high_res_encodings):
    save_pretrained(model, tmp_path, template_processor)
    image = make_image(2, width=40, height=64)
    answer = expected_answer(model, template_processor, image, PROMPTS[1])
    high_res_encodings.clear()
    pipe = pipeline("image-text-to-text", model=str(tmp_path))
    assert isinstance(pipe.processor, FlexLlavaProcessor)
    assert isinstance(pipe.model, FlexLlavaForConditionalGeneration)
    out = pipe(images=image, text=PROMPTS[1], max_new_tokens=NEW_TOKENS, do_sample=False, return_full_text=False)
    assert out[0]["generated_text"].strip() == answer.strip()
    # Chat messages go through the saved chat template to the same prompt.
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": "what color is the sign ?"}],
        }
    ]
    chat = pipe(text=messages, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert chat[0]["generated_text"][-1]["content"].strip() == answer.strip()
    assert high_res_encodings == [1, 1]
    assert torch.equal(
        pipe.model.model.language_model.layers[-1].self_attn.hr_k_proj.weight,
        model.model.language_model.layers[-1].self_attn.hr_k_proj.weight,
    )
