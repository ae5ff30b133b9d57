import importlib.util
import os
import pathlib
import warnings


os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import LlavaOnevisionProcessor  # noqa: E402

from hf_flexattention.tiny import build_tiny_processor  # noqa: E402


EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str):
    """An `examples/` script imported as a module (they are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def quiet_and_single_threaded():
    """For training tests: no Trainer / transformers deprecation chatter (gradient_checkpointing ->
    activation_checkpointing, ...), and one thread: the tiny model's matmuls are too small to gain from a second
    one, and on a busy 2-core machine OpenMP threads spinning for each other made training loops up to 10x slower."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class StockOnevisionProcessor(LlavaOnevisionProcessor):
    """The stock `LlavaOnevisionProcessor` behaviour, unchanged, built without a video processor: without
    torchvision the stock `__init__` fails on the lookup of the video processor's class even for
    `video_processor=None`, and leaving that parameter out of the signature skips the lookup and nothing else.
    `vision_feature_select_strategy` defaults to `"full"`, what the OneVision checkpoints (SigLIP, no CLS) use."""

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        num_image_tokens=None,
        vision_feature_select_strategy="full",
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


def make_image(seed: int, width: int = 60, height: int = 40) -> Image.Image:
    """A deterministic noisy RGB image with a bright block, so attention maps are not flat."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    pixels[height // 4 : height // 2, width // 5 : width // 2] = 255
    return Image.fromarray(pixels)


@pytest.fixture(scope="session")
def processor():
    return build_tiny_processor()


# The chat template that llava-hf/llava-1.5-*-hf processors ship (assistant turns end with a space, no EOS).
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@pytest.fixture(scope="module")
def template_processor():
    processor = build_tiny_processor()
    processor.chat_template = LLAVA_HF_TEMPLATE
    return processor


PROMPTS = (
    "USER: <image>\nwhat is in the image ? ASSISTANT:",
    "USER: <image>\nwhat color is the sign ? ASSISTANT:",
    "USER: how many trees are there ? ASSISTANT:",
)


@pytest.fixture
def single_inputs(processor):
    return processor(images=make_image(1), text=PROMPTS[0], return_tensors="pt")


@pytest.fixture
def batch_inputs(processor):
    """Three samples, left padded: two with images of different shapes, one text-only."""
    images = [make_image(1), make_image(2, width=40, height=64)]
    return processor(images=images, text=list(PROMPTS), padding=True, return_tensors="pt")
