"""The FlexAttention Llava shipped in the package (`hf_flexattention/pretrained/visual_search`): it loads offline
with `from_pretrained` and reads the small letter on held-out test images, from its high-res tokens (the demo
runs it by default: tests/test_demo.py)."""

import json

import pytest
import torch

from hf_flexattention import FlexLlavaForConditionalGeneration
from hf_flexattention.demo import build_prompt
from hf_flexattention.loading import apply_settings
from hf_flexattention.visual_search import SHIPPED_MODEL, load_shipped_model, make_sample


# The first 60 test-split samples (the README's run scored samples 0-199 of the same split).
TEST_SAMPLES = 60
# Free-answer accuracy the shipped model must keep. Chance is 1/8; the low-res variant of the same run scored at
# chance on the test split (README), and even a template reader told where the letter is reads only 33% of them in
# the low-res view (`visual_search.read_letter`, tested in test_visual_search.py). 0.5 is out of reach of any
# low-res reader of this task while it leaves room below the shipped model's own figure on these samples (0.65,
# 39 of 60) for floating-point differences between machines.
ACCURACY_BAR = 0.5


@pytest.fixture(scope="module")
def shipped():
    return load_shipped_model()


def test_the_package_ships_a_complete_checkpoint():
    names = {path.name for path in SHIPPED_MODEL.iterdir()}
    assert {"config.json", "model.safetensors", "README.md", "task.json", "processor_config.json"} <= names
    assert sum(path.stat().st_size for path in SHIPPED_MODEL.iterdir()) < 5 * 2**20  # a few MB at most
    task = json.loads((SHIPPED_MODEL / "task.json").read_text())
    assert {r["variant"] for r in task["results"]} == {"low_res", "flex", "full_high_res"}
    assert "## Training and evaluation" in (SHIPPED_MODEL / "README.md").read_text()


def test_shipped_model_loads_with_from_pretrained(shipped):
    model, _, _ = shipped
    reloaded = FlexLlavaForConditionalGeneration.from_pretrained(SHIPPED_MODEL)
    assert model.config.flex_n_fa == reloaded.config.flex_n_fa > 0
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def answers(model, processor, samples) -> list[str]:
    out = []
    for sample in samples:
        prompt = build_prompt(processor, sample.question)
        inputs = processor(images=sample.image, text=prompt, return_tensors="pt")
        with torch.no_grad():
            tokens = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        out.append(processor.tokenizer.decode(tokens[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    return [answer.strip() for answer in out]


def test_shipped_model_reads_the_small_letter_on_test_images(shipped):
    model, processor, task = shipped
    samples = [make_sample("test", index, **task["sample_kwargs"]) for index in range(TEST_SAMPLES)]
    predicted = answers(model, processor, samples)
    accuracy = sum(p == s.answer for p, s in zip(predicted, samples, strict=True)) / TEST_SAMPLES
    assert accuracy >= ACCURACY_BAR, f"free-answer accuracy {accuracy:.2f} on {TEST_SAMPLES} test samples"


def test_without_its_high_res_tokens_the_shipped_model_cannot_read():
    """The same weights with the high-res path off (n_fa = 0: every layer sees only the low-res tokens) fall to
    chance: what the model reads, it reads from the high-res tokens it selected (measured: 5 of 60)."""
    model, processor, task = load_shipped_model()  # its own copy: the module's fixture stays as shipped
    apply_settings(model, {"n_fa": 0})
    samples = [make_sample("test", index, **task["sample_kwargs"]) for index in range(TEST_SAMPLES)]
    predicted = answers(model, processor, samples)
    accuracy = sum(p == s.answer for p, s in zip(predicted, samples, strict=True)) / TEST_SAMPLES
    # Chance is 1/8; 0.25 is about 2.9 binomial standard deviations (sqrt(1/8 * 7/8 / 60) = 0.043) above it.
    assert accuracy < 0.25, f"accuracy {accuracy:.2f} without high-res tokens"
