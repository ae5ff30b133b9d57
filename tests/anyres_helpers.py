"""What the LLaVA-NeXT and LLaVA-OneVision tests share: the tiny any-resolution inputs, the stock references (the
base image alone, the packed crop grid, a dense select-all attention), a training collator and the plugin-free
subprocess.

Both families use the same tiny towers (an 8 x 8 base grid: 32 px at patch 4), the same tokenizer and the same
`TINY_IMAGE_GRID_PINPOINTS`; they differ in the image processor, the stock model, and (OneVision) the shrinking of
large crop grids, which the callers pass in as the expected crop grid of each image.
"""

import copy
import os
import subprocess
import sys

import torch
import torch.nn.functional as F
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import AttentionInterface

from hf_flexattention.data import LlavaSample
from hf_flexattention.tiny import TINY_IMAGE_TOKEN_ID, build_tiny_processor

from .conftest import make_image
from .test_equivalence import rotate
from .test_generate import greedy as greedy_with_logits
from .test_hub import BLOCK_PLUGIN


GRID = 8  # the tiny tower: 32 px / patch 4
BASE_TOKENS = GRID * GRID
# fp32 on CPU, same kernels on the same inputs for the plain rows: differences are rounding only (DESIGN.md 4.1).
ATOL = 1e-5
# Same math in another order (row by row vs whole sequence, padded vs unpadded): DESIGN.md 4.3's contract.
LOGITS_ATOL = 1e-4
NEW_TOKENS = 6

# (height, width) of the test images: on the tiny pinpoints 40x70 takes the 2x2 crop grid, 60x30 the 2x1, 64x64 the
# 2x2 whole (the crop grid each gives, after unpadding and any shrinking, is the calling test file's table).
SIZES = [(40, 70), (60, 30), (64, 64)]

PROMPTS = (
    "USER: <image>\nwhat is in the image ? ASSISTANT:",
    "USER: <image>\nwhat color is the sign ? ASSISTANT:",
    "USER: how many trees are there ? ASSISTANT:",
    "USER: <image>\ndescribe this picture ASSISTANT:",
)
BATCH_IMAGE = [0, 1, None, 2]  # the image index of each row of `batch_of_four`


def image(size: tuple[int, int], seed: int = 1):
    height, width = size
    return make_image(seed, width=width, height=height)


class TinyAnyResInputs:
    """What the Flex processors make for the tiny any-resolution models: `<image>` becomes the base image's 64
    tokens (of the tiny tokenizer, or the family processor's `tokenizer`), and the image entries (`pixel_values`
    `(n, patches, 3, 32, 32)`, `image_sizes` `(n, 2)`, OneVision's `batch_num_images`) come from the stock image
    processor given."""

    def __init__(self, image_processor, tokenizer=None):
        self.tokenizer = build_tiny_processor().tokenizer if tokenizer is None else tokenizer
        self.image_processor = image_processor

    def expand(self, text: str) -> str:
        return text.replace("<image>", "<image>" * BASE_TOKENS)

    def __call__(self, images=None, text=(), padding_side="left") -> dict:
        encoded = dict(
            self.tokenizer(
                [self.expand(t) for t in text], padding=True, padding_side=padding_side, return_tensors="pt"
            )
        )
        counts = (encoded["input_ids"] == TINY_IMAGE_TOKEN_ID).sum(dim=1).tolist()
        assert counts == [BASE_TOKENS * t.count("<image>") for t in text], counts
        if images:
            encoded.update(self.image_processor(images, return_tensors="pt"))
        return encoded


def batch_of_four(inputs: TinyAnyResInputs) -> dict:
    """Four samples, left padded: the three `SIZES` images (different crop grids) and a text-only row between them."""
    images = [image(SIZES[0], 1), image(SIZES[1], 2), image(SIZES[2], 3)]
    return inputs(images=images, text=list(PROMPTS))


def alone(inputs: TinyAnyResInputs, index: int) -> dict:
    """Sample `index` of `batch_of_four` processed on its own (no padding, its own patch count)."""
    image_index = BATCH_IMAGE[index]
    images = None if image_index is None else [image(SIZES[image_index], image_index + 1)]
    return inputs(images=images, text=[PROMPTS[index]])


def logits(model, inputs, **extra):
    with torch.no_grad():
        return model(**inputs, **extra).logits


def stock_packed_features(stock, inputs) -> list[torch.Tensor]:
    """The stock model's own per-image packed features: base (g*g) + the unpadded (OneVision: and shrunk) crops with
    a newline per row."""
    with torch.no_grad():
        return stock.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"], return_dict=True
        ).pooler_output


def base_only(stock, inputs) -> dict:
    """Stock inputs for the base image alone: the packed features cut to their first g*g rows, handed over as
    `mm_encoder_outputs` (the stock any-resolution models cannot be given a 1-patch image: they infer the crops from
    the sizes)."""
    features = (
        [packed[:BASE_TOKENS] for packed in stock_packed_features(stock, inputs)] if "pixel_values" in inputs else []
    )
    stock_inputs = {key: inputs[key] for key in ("input_ids", "attention_mask")}
    if features:
        stock_inputs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=features)}
    return stock_inputs


def crops_withheld(inputs) -> dict:
    return dict(inputs, pixel_values=inputs["pixel_values"][:, :1])


# ===== the dense select-all reference =========================================================================


def reference_crop_pool(stock, inputs, index: int, crop_grid: tuple[int, int]) -> torch.Tensor:
    """Image `index`'s crop features `(R*C, D)` from the stock packed output: drop the g*g base rows, lay the rest
    out as `(R, C + 1)` and drop the newline column."""
    packed = stock_packed_features(stock, inputs)[index]
    rows, cols = crop_grid
    crops = packed[BASE_TOKENS:].view(rows, cols + 1, -1)[:, :cols]
    return crops.reshape(rows * cols, -1)


def reference_crop_rotary(stock, image_positions: torch.Tensor, crop_grid: tuple[int, int]):
    """cos / sin `(R*C, d)` of the crop keys: the base tokens' tables, bicubically resized from g x g to R x C."""
    cos, sin = stock.model.language_model.rotary_emb(torch.zeros(1), position_ids=image_positions[None])
    tables = []
    for table in (cos[0], sin[0]):
        planes = table.reshape(GRID, GRID, -1).permute(2, 0, 1)[None]
        resized = F.interpolate(planes, size=crop_grid, mode="bicubic", align_corners=False)
        tables.append(resized[0].permute(1, 2, 0).reshape(crop_grid[0] * crop_grid[1], -1))
    return tables


class DenseReference:
    """Eager attention over every row; in FlexAttention layers, the high-res rows of sequence `b` also attend to
    ALL crop tokens of its image (`pools[b]`, None for a text-only sequence), in the same softmax."""

    def __init__(self, pools, cos, sin, high_res_rows):
        self.pools, self.cos, self.sin, self.high_res_rows = pools, cos, sin, high_res_rows

    def __call__(self, module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        groups = module.num_key_value_groups
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        scores = query.float() @ key.float().transpose(-1, -2) * scaling + attention_mask
        if hasattr(module, "hr_k_proj"):
            batch, heads, length, head_dim = query.shape
            longest = max(pool.shape[0] for pool in self.pools if pool is not None)
            hr_scores = torch.full((batch, heads, length, longest), float("-inf"))
            hr_values = torch.zeros(batch, heads, longest, head_dim)
            for b, pool in enumerate(self.pools):
                if pool is None:
                    continue
                tokens = pool.shape[0]
                hr_key = module.hr_k_proj(pool).view(tokens, -1, head_dim).transpose(0, 1)
                hr_key = rotate(hr_key, self.cos[b], self.sin[b]).repeat_interleave(groups, dim=0)
                hr_value = module.hr_v_proj(pool).view(tokens, -1, head_dim).transpose(0, 1)
                rows = self.high_res_rows[b]
                hr_scores[b, :, rows, :tokens] = (query[b].float() @ hr_key.float().transpose(-1, -2) * scaling)[
                    :, rows
                ]
                hr_values[b, :, :tokens] = hr_value.repeat_interleave(groups, dim=0).float()
            scores = torch.cat([scores, hr_scores], dim=-1)
            value = torch.cat([value.float(), hr_values], dim=2)
        probabilities = scores.softmax(dim=-1)
        return (probabilities @ value.float()).to(query.dtype).transpose(1, 2), probabilities


def flex_layers(model) -> list[int]:
    return [
        index for index, layer in enumerate(model.model.language_model.layers) if hasattr(layer.self_attn, "hr_k_proj")
    ]


def perturb_high_res_projections(patched) -> None:
    """Distinct hr projections, so a mix-up with k_proj/v_proj cannot pass (Qwen2's zero biases too)."""
    with torch.no_grad():
        for index in flex_layers(patched):
            attention = patched.model.language_model.layers[index].self_attn
            for projection in (attention.hr_k_proj, attention.hr_v_proj):
                for parameter in projection.parameters():
                    parameter.add_(0.05 * torch.randn_like(parameter))


def dense_reference_model(stock, patched, inputs, crop_grids: list, answer_rows: list[int], name: str):
    """A copy of `stock` with `patched`'s hr projections whose text attention is `DenseReference` (registered as
    `name`): run it on `base_only(stock, inputs)`. `crop_grids[b]` is the `(R, C)` crop grid of sequence `b`'s image
    (None for a text-only sequence), in `inputs`' image order."""
    reference = copy.deepcopy(stock)
    for index in flex_layers(patched):
        for projection in ("hr_k_proj", "hr_v_proj"):
            source = getattr(patched.model.language_model.layers[index].self_attn, projection)
            setattr(reference.model.language_model.layers[index].self_attn, projection, copy.deepcopy(source))
    input_ids = inputs["input_ids"]
    has_image = (input_ids == TINY_IMAGE_TOKEN_ID).any(dim=1).tolist()
    pools, cos, sin, high_res_rows = [], [], [], []
    image_index = 0
    for row, crop_grid in enumerate(crop_grids):
        high_res_rows.append(answer_rows)
        assert has_image[row] == (crop_grid is not None), row
        if crop_grid is None:
            pools.append(None), cos.append(None), sin.append(None)
            continue
        pools.append(reference_crop_pool(stock, inputs, image_index, crop_grid))
        image_positions = (input_ids[row] == TINY_IMAGE_TOKEN_ID).nonzero().squeeze(1)
        row_cos, row_sin = reference_crop_rotary(stock, image_positions, crop_grid)
        cos.append(row_cos), sin.append(row_sin)
        image_index += 1
    AttentionInterface.register(name, DenseReference(pools, cos, sin, high_res_rows))
    AttentionMaskInterface.register(name, eager_mask)
    reference.set_attn_implementation({"text_config": name})
    return reference


# ===== generate ===============================================================================================

# Every comparison runs all NEW_TOKENS steps: the random tiny model often says `</s>` first, which would end the
# answer before any decode step. An `<image>` token in the answer would be a second image to a cache-less re-run.
FULL_LENGTH = {"min_new_tokens": NEW_TOKENS, "suppress_tokens": [TINY_IMAGE_TOKEN_ID]}
BEAMS = {"num_beams": 2, "num_return_sequences": 2, "max_new_tokens": NEW_TOKENS, "do_sample": False, **FULL_LENGTH}


def greedy(model, inputs, **kwargs):
    return greedy_with_logits(model, inputs, **FULL_LENGTH, **kwargs)


def teacher_forced_logits(model, inputs, sequences: torch.Tensor) -> torch.Tensor:
    """`model`'s logits on `sequences` (prompt + generated answer) in one forward, with the answer as labels (so the
    answer rows are the high-res rows, as when generating) and `inputs`' images."""
    prompt_length = inputs["input_ids"].shape[1]
    labels = torch.full_like(sequences, -100)
    labels[:, prompt_length:] = sequences[:, prompt_length:]
    images = {key: value for key, value in inputs.items() if key not in ("input_ids", "attention_mask")}
    return logits(model, {"input_ids": sequences, **images}, labels=labels)


# ===== LoRA fine-tuning =======================================================================================
# Trained through the library's `LlavaConversationCollator` and the family's tiny Flex processor, as users do.


def conversation(question: str, answer: str, with_image: bool) -> list[dict]:
    return [
        {"from": "human", "value": ("<image>\n" if with_image else "") + question},
        {"from": "gpt", "value": answer},
    ]


TRAIN_SAMPLES = [
    LlavaSample(conversation("what color is the sign ?", "red", True), image(SIZES[0], 1)),
    LlavaSample(conversation("what is in the image ?", "a small dog", True), image(SIZES[1], 2)),
    LlavaSample(conversation("how many trees are there ?", "two", False)),
    LlavaSample(conversation("describe this picture", "a large house", True), image(SIZES[2], 4)),
]
TRAIN_ANSWERS = ["red </s>", "a small dog </s>", "two </s>", "a large house </s>"]


def high_res_lora_b(model) -> dict[str, torch.Tensor]:
    return {
        name: parameter
        for name, parameter in model.named_parameters()
        if "lora_B" in name and any(f"layers.{i}.self_attn.hr_" in name for i in (2, 3))
    }


# ===== remote code without the plugin =========================================================================

LOAD_AS_REMOTE_CODE = """
import sys
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText

work = Path(sys.argv[1])
report = {}
try:
    import hf_flexattention  # noqa: F401
    report["import_error"] = None
except ModuleNotFoundError as error:
    report["import_error"] = str(error)
model = AutoModelForImageTextToText.from_pretrained(work / "model", trust_remote_code=True)
inputs = torch.load(work / "inputs.pt", weights_only=True)
report["class"] = type(model).__module__ + "." + type(model).__name__
report["state"] = model.state_dict()
with torch.no_grad():
    report["logits"] = model(**inputs).logits
    report["tokens"] = model.generate(**inputs, max_new_tokens=4, do_sample=False)
report["plugin_modules"] = sorted(name for name in sys.modules if name.startswith("hf_flexattention"))
torch.save(report, work / "report.pt")
"""


def run_as_remote_code_without_the_plugin(tmp_path, model, inputs) -> dict:
    """Save `model` and `inputs` under `tmp_path`, load the model with `trust_remote_code=True` in a subprocess where
    importing `hf_flexattention` fails, run a forward and a greedy generate there; return what it recorded."""
    model.save_pretrained(tmp_path / "model")
    torch.save(dict(inputs), tmp_path / "inputs.pt")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), PYTHONWARNINGS="ignore")
    env.update(TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_PLUGIN + LOAD_AS_REMOTE_CODE, str(tmp_path)],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-6000:]
    return torch.load(tmp_path / "report.pt", weights_only=True)
