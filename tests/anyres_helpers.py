"""What the LLaVA-NeXT and LLaVA-OneVision tests share: the family table (`NEXT`, `ONEVISION`: builders, processors,
classes, crop grids) and its `Setting`s, the tiny any-resolution inputs, the stock references (the base image alone,
the packed crop grid, a dense select-all attention), a training collator and the plugin-free subprocess.

Both families use the same tiny towers (an 8 x 8 base grid: 32 px at patch 4), the same tokenizer and the same
`TINY_IMAGE_GRID_PINPOINTS`; they differ in the image processor, the stock model, and (OneVision) the shrinking of
large crop grids, which the family table gives as the expected crop grid of each image.
"""

import copy
import dataclasses
import functools
import os
import subprocess
import sys
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import (
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
)
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import AttentionInterface

from hf_flexattention import FlexLlavaNextProcessor, FlexLlavaOnevisionProcessor, patch_model
from hf_flexattention.configuration_flex_llava_next import FlexLlavaNextConfig
from hf_flexattention.configuration_flex_llava_onevision import FlexLlavaOnevisionConfig
from hf_flexattention.data import LlavaSample
from hf_flexattention.modeling_flex_llava_next import FlexLlavaNextForConditionalGeneration
from hf_flexattention.modeling_flex_llava_onevision import FlexLlavaOnevisionForConditionalGeneration
from hf_flexattention.tiny import (
    TINY_IMAGE_GRID_PINPOINTS,
    TINY_IMAGE_TOKEN_ID,
    TINY_PAD_TOKEN_ID,
    build_tiny_llava_next,
    build_tiny_llava_onevision,
    build_tiny_next_processor,
    build_tiny_onevision_processor,
    build_tiny_processor,
)

from .conftest import LLAVA_HF_TEMPLATE, StockOnevisionProcessor, make_image
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


# ===== the family table ========================================================================================


@dataclasses.dataclass(frozen=True, eq=False)
class Family:
    """One any-resolution model family as the shared tests see it.

    `crop_grids[ratio][size]` is the crop grid (rows, cols) the stock `pack_image_features` gives the test image of
    `(height, width)` size (after unpadding and, for OneVision, shrinking); NeXT has the single setting `ratio=None`.
    `stock_processor(image_processor, tokenizer, ratio)` is the stock processor that expands every crop and newline
    token into the prompt."""

    name: str
    build: Callable  # (backbone, ratio) -> the stock tiny model
    backbones: tuple[str, ...]
    ratios: tuple[str | None, ...]
    crop_grids: dict
    image_processor: Callable
    processor: Callable  # the family's tiny Flex processor
    tokenizer: Callable | None  # the prompt tokenizer (None: the tiny Llava one)
    stock_processor: Callable
    flex_class: type
    flex_config_class: type
    stock_class: type
    stock_config_class: type
    saved_config_names: tuple[str, ...]  # what a saved Flex config must keep, beyond the shared settings
    select_strategy: str  # the one the base grid needs; the other is refused
    wrong_strategy: str
    tower: str
    expanded_prompt_hint: str  # what the stock-expanded-prompt error names (a regex piece)
    flex_processor_class: type
    input_keys: tuple[str, ...]  # what the processors return: input_ids, attention_mask, then the image entries
    saved_processor_settings: tuple[str, ...]  # the Flex processor's scalars a save must keep
    processor_scalars: dict  # what `from_llava_*_processor` must take over from the stock processor
    tower_base: Callable  # the vision tower's hidden states -> the base image's g*g features, before the projector

    @functools.cached_property
    def inputs(self) -> "TinyAnyResInputs":
        """What the family's Flex processor makes for the tiny model: base-only prompts over the stock image
        processor (`TinyAnyResInputs`)."""
        return TinyAnyResInputs(self.image_processor(), None if self.tokenizer is None else self.tokenizer())

    @functools.cached_property
    def batch(self) -> dict:
        """`batch_of_four`: three images with different crop grids (5, 3, 5 patches) and a text-only row."""
        return batch_of_four(self.inputs)

    def stock_inputs(self, images, text, ratio=None) -> dict:
        """What the stock processor makes: every (shrunk) crop and newline token expanded into the prompt."""
        processor = self.stock_processor(self.inputs.image_processor, self.inputs.tokenizer, ratio)
        return dict(processor(images=images, text=text, padding=True, return_tensors="pt"))


@dataclasses.dataclass(frozen=True)
class Setting:
    """A family with one text backbone and (OneVision) one `vision_aspect_ratio`: what a shared test runs on."""

    family: Family
    backbone: str
    ratio: str | None

    @property
    def id(self) -> str:
        return "-".join(part for part in (self.family.name, self.backbone, self.ratio) if part)

    def stock(self):
        return self.family.build(self.backbone, self.ratio)

    def model(self, **patch_kwargs):
        """The patched model (2 FlexAttention layers unless `patch_kwargs` say otherwise)."""
        return patch_model(self.stock(), **{"n_fa": 2, **patch_kwargs})

    def stock_and_patched(self, **patch_kwargs):
        stock = self.stock()
        return stock, patch_model(copy.deepcopy(stock), **{"n_fa": 2, **patch_kwargs})

    def crop_grid(self, size: tuple[int, int]) -> tuple[int, int]:
        return self.family.crop_grids[self.ratio][size]

    def crop_tokens(self, size: tuple[int, int]) -> int:
        rows, cols = self.crop_grid(size)
        return rows * cols

    def stock_inputs(self, images, text) -> dict:
        return self.family.stock_inputs(images, text, self.ratio)


def next_image_processor() -> LlavaNextImageProcessorPil:
    """The stock LLaVA-NeXT image processor of `build_tiny_next_processor`."""
    return LlavaNextImageProcessorPil(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_grid_pinpoints=TINY_IMAGE_GRID_PINPOINTS,
    )


def onevision_image_processor() -> LlavaOnevisionImageProcessorPil:
    return LlavaOnevisionImageProcessorPil(
        size={"height": 32, "width": 32}, image_grid_pinpoints=TINY_IMAGE_GRID_PINPOINTS
    )


def stock_next_processor(image_processor, tokenizer, ratio=None) -> LlavaNextProcessor:
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=4,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def stock_onevision_processor(image_processor, tokenizer, ratio="anyres_max_9") -> StockOnevisionProcessor:
    return StockOnevisionProcessor(image_processor, tokenizer, BASE_TOKENS, "full", vision_aspect_ratio=ratio)


NEXT = Family(
    name="next",
    build=lambda backbone, ratio: build_tiny_llava_next(backbone),
    backbones=("llama", "mistral", "qwen2"),
    ratios=(None,),
    # (height, width) of the test images -> the unpadded crop grid (rows, cols) of the tiny model's pinpoints (stock
    # `pack_image_features`): 40x70 takes the 2x2 grid (16x16 tokens), unpadded to 10 rows (new_h = 9.14 -> 9,
    # pad = 3, 16 - 6 = 10 rows kept); 60x30 takes 2x1 (16x8), nothing cut; 64x64 takes 2x2 whole.
    crop_grids={None: {(40, 70): (10, 16), (60, 30): (16, 8), (64, 64): (16, 16)}},
    image_processor=next_image_processor,
    processor=build_tiny_next_processor,
    tokenizer=None,
    stock_processor=stock_next_processor,
    flex_class=FlexLlavaNextForConditionalGeneration,
    flex_config_class=FlexLlavaNextConfig,
    stock_class=LlavaNextForConditionalGeneration,
    stock_config_class=LlavaNextConfig,
    saved_config_names=(),
    select_strategy="default",
    wrong_strategy="full",
    tower="clip",
    expanded_prompt_hint=".*FlexLlavaNextProcessor",
    flex_processor_class=FlexLlavaNextProcessor,
    input_keys=("input_ids", "attention_mask", "pixel_values", "image_sizes"),
    saved_processor_settings=(
        "patch_size",
        "vision_feature_select_strategy",
        "num_additional_image_tokens",
        "image_token",
    ),
    processor_scalars={"patch_size": 4},
    tower_base=lambda hidden_states: hidden_states[-2][:, 1:],  # layer -2, CLS dropped ("default")
)

ONEVISION = Family(
    name="onevision",
    build=lambda backbone, ratio: build_tiny_llava_onevision(backbone, vision_aspect_ratio=ratio),
    backbones=("qwen2", "llama"),  # Qwen2 as released; Llama to show nothing depends on the text backbone
    # Where the pool's shape matters the tests run with `anyres_max_9` (nothing shrinks on the tiny model) and
    # `anyres_max_2` (two of the three test images shrink).
    ratios=("anyres_max_9", "anyres_max_2"),
    # After unpadding (as on LLaVA-NeXT): 40x70 -> 10x16, 60x30 -> 16x8, 64x64 -> 16x16. `anyres_max_N` then shrinks
    # a grid whose ratio = sqrt(R*C / (N*g*g)) exceeds 1.1 to int(R // ratio) x int(C // ratio): with N = 9 (576
    # tokens) nothing shrinks; with N = 2 (128 tokens) 10x16 has ratio 1.118 -> 8x14, 16x8 has ratio 1 (kept),
    # 16x16 has 1.414 -> 11x11.
    crop_grids={
        "anyres_max_9": {(40, 70): (10, 16), (60, 30): (16, 8), (64, 64): (16, 16)},
        "anyres_max_2": {(40, 70): (8, 14), (60, 30): (16, 8), (64, 64): (11, 11)},
    },
    image_processor=onevision_image_processor,
    processor=build_tiny_onevision_processor,
    tokenizer=lambda: build_tiny_onevision_processor().tokenizer,  # with `<video>`
    stock_processor=stock_onevision_processor,
    flex_class=FlexLlavaOnevisionForConditionalGeneration,
    flex_config_class=FlexLlavaOnevisionConfig,
    stock_class=LlavaOnevisionForConditionalGeneration,
    stock_config_class=LlavaOnevisionConfig,
    saved_config_names=("video_token_id", "vision_aspect_ratio", "vision_feature_select_strategy"),
    select_strategy="full",
    wrong_strategy="default",
    tower="siglip",
    # The OneVision model's message names FlexLlavaNextProcessor too (the shared mixin's wording): not pinned here.
    expanded_prompt_hint=".*FlexLlavaOnevisionProcessor",
    flex_processor_class=FlexLlavaOnevisionProcessor,
    input_keys=("input_ids", "attention_mask", "pixel_values", "image_sizes", "batch_num_images"),
    saved_processor_settings=(
        "num_image_tokens",
        "vision_feature_select_strategy",
        "vision_aspect_ratio",
        "image_token",
        "video_token",
        "image_token_id",
        "video_token_id",
    ),
    processor_scalars={"num_image_tokens": BASE_TOKENS, "vision_aspect_ratio": "anyres_max_9"},
    tower_base=lambda hidden_states: hidden_states[-1],  # the last layer, every token ("full")
)

FAMILIES = (NEXT, ONEVISION)
for _family in FAMILIES:
    assert all(list(grids) == SIZES for grids in _family.crop_grids.values()), _family.name


def settings(*, backbones: bool = False, ratios: bool = False, ratio: str = "anyres_max_9", families=FAMILIES) -> list:
    """`pytest.param(Setting)`s for a shared test: each family on its default backbone (the first) and, for OneVision,
    `ratio`; `backbones` / `ratios` sweep those axes instead (NeXT has no ratio axis)."""
    params = []
    for family in families:
        family_ratios = family.ratios if ratios or family.ratios == (None,) else (ratio,)
        for backbone in family.backbones if backbones else family.backbones[:1]:
            for each_ratio in family_ratios:
                setting = Setting(family, backbone, each_ratio)
                params.append(pytest.param(setting, id=setting.id))
    return params


# ===== the processors ==========================================================================================


@functools.cache
def flex_processor(family: Family):
    """The family's tiny Flex processor with the llava-hf chat template."""
    processor = family.processor()
    processor.chat_template = LLAVA_HF_TEMPLATE
    return processor


@functools.cache
def stock_processor(family: Family, ratio: str | None = None):
    """The stock processor over `flex_processor(family)`'s parts (every crop and newline token in the prompt), with
    the llava-hf chat template; OneVision's `ratio` defaults to `anyres_max_9`."""
    flex = flex_processor(family)
    stock = family.stock_processor(flex.image_processor, flex.tokenizer, *([ratio] if ratio else []))
    stock.chat_template = LLAVA_HF_TEMPLATE
    return stock


def images_of_every_shape() -> list:
    """(height, width): 40x70 (2x2 crops, unpadded rows), 60x30 (2x1), 20x20 (1x2), 64x64 (2x2), and a numpy
    array (50x33) and a channels-first uint8 tensor (36x52)."""
    rng = np.random.default_rng(7)
    array = rng.integers(0, 256, size=(50, 33, 3), dtype=np.uint8)
    tensor = torch.from_numpy(rng.integers(0, 256, size=(3, 36, 52), dtype=np.uint8))
    sized = [
        make_image(seed, width=w, height=h) for seed, (h, w) in enumerate([(40, 70), (60, 30), (20, 20), (64, 64)])
    ]
    return [*sized, array, tensor]


def shorten_image_spans(stock_inputs, base_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The expected ids and mask: each row's unpadded stock ids with every run of image tokens cut to
    `base_tokens`, left padded again to the longest row."""
    rows = []
    for ids, mask in zip(stock_inputs["input_ids"].tolist(), stock_inputs["attention_mask"].tolist(), strict=True):
        ids = [token for token, keep in zip(ids, mask, strict=True) if keep]
        shortened, run = [], 0
        for token in ids:
            run = run + 1 if token == TINY_IMAGE_TOKEN_ID else 0
            if run <= base_tokens:
                shortened.append(token)
        rows.append(shortened)
    width = max(len(row) for row in rows)
    input_ids = torch.tensor([[TINY_PAD_TOKEN_ID] * (width - len(row)) + row for row in rows])
    attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    return input_ids, attention_mask


def assert_base_only_parity(family: Family, flex_inputs, stock_inputs) -> None:
    """The Flex processor's output is the stock one's with each image's token span cut to the base g*g tokens; the
    image entries (`pixel_values`, `image_sizes`, OneVision's `batch_num_images`) are the stock ones."""
    assert set(flex_inputs) == set(stock_inputs) == set(family.input_keys)
    for key in family.input_keys[2:]:
        assert torch.equal(flex_inputs[key], stock_inputs[key]), key
    expected_ids, expected_mask = shorten_image_spans(stock_inputs, BASE_TOKENS)
    assert torch.equal(flex_inputs["input_ids"], expected_ids)
    assert torch.equal(flex_inputs["attention_mask"], expected_mask)


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
