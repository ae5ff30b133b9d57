"""Analytic FLOPs and memory of FlexAttention next to its two baselines, from configs alone.

The three variants see the same prompt and image:

* (a) the stock Llava model: the `N` low-res image tokens in the sequence (576 for LLaVA-1.5);
* (b) FlexAttention as this plugin runs it: (a), plus the `zoom x zoom` high-res tiles through the vision tower and
  projector, every high-res key of each FlexAttention layer projected once at prefill (`n_fa * M * hidden * kv_dim`
  multiply-adds), and for each high-res row, scores over all `M` high-res keys and the attention-weighted features
  projected by `hr_v_proj` (`projections.py`). In training, only the union of the tokens the answer rows selected
  is projected;
* (c) the stock model with all `M` high-res tokens in the sequence (5184; the tiles' features, no low-res view).

Conventions, those of `torch.utils.flop_counter.FlopCounterMode`: 2 FLOPs per multiply-add of matrix products and
convolutions; elementwise work (norms, softmax, RoPE, the selection) is not counted; attention counts the full
`q x kv` score and value products, causal or not. A training step is forward plus backward of full fine-tuning of
the language model and projector with the vision tower frozen (LLaVA-1.5's recipe): a backward product costs one
forward product per operand that needs a gradient.

Memory counts what is kept: weights, the KV cache and FlexAttention's state (features, rotary table, dense keys),
and for training the gradients and AdamW moments (fp32) of the trainable parameters. Activations are not modelled
(they depend on kernels and checkpointing): the benchmarks measure peaks.

    python -m hf_flexattention.cost --shape llava-1.5-7b     # the table, next to the paper's Table 5
"""

import argparse
from dataclasses import dataclass

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from .configuration_flex_llava import RELEASED_PLAIN_LAYERS
from .shapes import SHAPES, shaped_llava_config


VARIANTS = {"a": "stock, low-res tokens", "b": "FlexAttention", "c": "stock, all high-res tokens"}
# Paper Table 5: TFLOPs per MagnifierBench sample (whole generation, calflops, LLaVA-1.5-7B based models).
PAPER_TFLOPS = {"LLaVA-FlexAttn (1008 px)": 17.1, "LLaVA-HD (448 px)": 24.9, "LLaVA-XAttn (1008 px)": 27.1}


@dataclass(frozen=True)
class LlavaShapes:
    """The sizes the costs depend on (see `from_config`)."""

    vision_hidden: int
    vision_mlp: int
    vision_layers: int
    patches: int
    patch_pixels: int
    text_hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    text_mlp: int
    text_layers: int
    vocab: int
    low_res_tokens: int
    zoom: int
    n_fa: int
    parameters: int

    @classmethod
    def from_config(cls, config: LlavaConfig, n_fa: int | None = None, zoom: int = 3) -> "LlavaShapes":
        """Shapes of a Llava config; `n_fa` defaults to the released rule (every layer but the first 9).

        The parameter count is exact: the model is instantiated on the meta device (no memory, no weights).
        """
        vision, text = config.vision_config, config.text_config
        grid = vision.image_size // vision.patch_size
        with torch.device("meta"):
            parameters = sum(p.numel() for p in LlavaForConditionalGeneration(config).parameters())
        layers = text.num_hidden_layers
        return cls(
            vision_hidden=vision.hidden_size,
            vision_mlp=vision.intermediate_size,
            vision_layers=vision.num_hidden_layers,
            patches=grid * grid,
            patch_pixels=vision.num_channels * vision.patch_size**2,
            text_hidden=text.hidden_size,
            heads=text.num_attention_heads,
            kv_heads=text.num_key_value_heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
            text_mlp=text.intermediate_size,
            text_layers=layers,
            vocab=text.vocab_size,
            low_res_tokens=grid * grid if config.vision_feature_select_strategy == "default" else grid * grid + 1,
            zoom=zoom,
            n_fa=max(0, layers - RELEASED_PLAIN_LAYERS) if n_fa is None else n_fa,
            parameters=parameters,
        )

    @property
    def high_res_tokens(self) -> int:
        """`M`: the high-res tokens of one image (5184 for LLaVA-1.5 at zoom 3)."""
        return self.zoom**2 * self.low_res_tokens

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def high_res_parameters(self) -> int:
        """Parameters `patch_model` adds: `hr_k_proj` and `hr_v_proj` in each FlexAttention layer (no bias)."""
        return self.n_fa * 2 * self.text_hidden * self.kv_dim


# --- FLOPs -----------------------------------------------------------------------------------------------------------


def vision_flops(s: LlavaShapes, images: int) -> float:
    """Vision tower (every layer runs) and projector over `images` images (or tiles) of the tower's input size."""
    tokens, d = s.patches + 1, s.vision_hidden
    tower = 2 * s.patches * s.patch_pixels * d + s.vision_layers * (
        8 * tokens * d * d + 4 * tokens * tokens * d + 4 * tokens * d * s.vision_mlp
    )
    projector = 2 * s.low_res_tokens * (d * s.text_hidden + s.text_hidden * s.text_hidden)
    return images * (tower + projector)


def _linear_flops(s: LlavaShapes, tokens: int) -> float:
    """q/k/v/o projections and MLP of one decoder layer for `tokens` tokens."""
    h, q_dim = s.text_hidden, s.heads * s.head_dim
    return 2 * tokens * (2 * h * q_dim + 2 * h * s.kv_dim + 3 * h * s.text_mlp)


def _attention_flops(s: LlavaShapes, queries: int, keys: int) -> float:
    return 4 * s.heads * queries * keys * s.head_dim


def text_flops(s: LlavaShapes, queries: int, keys: int, logits: int) -> float:
    """Language model: `queries` new tokens attending to `keys` keys in every layer, and `logits` lm_head rows."""
    per_layer = _linear_flops(s, queries) + _attention_flops(s, queries, keys)
    return s.text_layers * per_layer + 2 * logits * s.text_hidden * s.vocab


def _high_res_values_flops(s: LlavaShapes, rows: int, tokens: int) -> float:
    """`projections.high_res_values`: fold the weighted features, or project each candidate's value."""
    head_rows = s.heads * rows
    if head_rows < tokens:
        return 2 * head_rows * tokens * s.text_hidden + 2 * head_rows * s.text_hidden * s.kv_dim
    return 2 * tokens * s.text_hidden * s.kv_dim + 2 * head_rows * tokens * s.head_dim


def flex_row_flops(s: LlavaShapes, rows: int, keys: int, candidates: int, decode: bool) -> float:
    """What FlexAttention adds for `rows` high-res rows per sequence over `candidates` high-res keys.

    Each touched layer (the `n_fa` FlexAttention layers and the one below) computes the rows' scores over the `keys`
    cached keys once; a FlexAttention layer adds the plain part of the joint attention, the high-res scores and the
    values. When decoding, the touched layers compute the row's plain attention instead of the backbone, so only
    the high-res part is added.
    """
    scores = 2 * s.heads * rows * keys * s.head_dim
    high_res = 2 * s.heads * rows * candidates * s.head_dim + _high_res_values_flops(s, rows, candidates)
    if s.n_fa == 0:
        return 0.0
    if decode:
        return s.n_fa * high_res
    return (s.n_fa + 1) * scores + s.n_fa * (scores + high_res)


def prefill_flops(s: LlavaShapes, variant: str, text_tokens: int, batch: int = 1, logits: int = 1) -> float:
    """One prefill (as `generate` runs it: `logits` lm_head rows per sequence) of `batch` prompts with one image each.

    `text_tokens` are the prompt's non-image tokens.
    """
    if variant == "a":
        tokens = text_tokens + s.low_res_tokens
        return batch * (vision_flops(s, 1) + text_flops(s, tokens, tokens, logits))
    if variant == "c":
        tokens = text_tokens + s.high_res_tokens
        return batch * (vision_flops(s, s.zoom**2) + text_flops(s, tokens, tokens, logits))
    _check_variant(variant)
    tokens = text_tokens + s.low_res_tokens
    keys = s.n_fa * 2 * s.high_res_tokens * s.text_hidden * s.kv_dim
    rows = flex_row_flops(s, 1, tokens, s.high_res_tokens, decode=False)
    return prefill_flops(s, "a", text_tokens, batch, logits) + batch * (vision_flops(s, s.zoom**2) + keys + rows)


def decode_step_flops(s: LlavaShapes, variant: str, context: int, batch: int = 1) -> float:
    """One decode step of `batch` sequences, each with `context` tokens already in its cache."""
    _check_variant(variant)
    flops = text_flops(s, 1, context + 1, 1)
    if variant == "b":
        flops += flex_row_flops(s, 1, context + 1, s.high_res_tokens, decode=True)
    return batch * flops


def training_step_flops(
    s: LlavaShapes, variant: str, text_tokens: int, answer_tokens: int, union_fraction: float = 0.1, batch: int = 1
) -> float:
    """Forward and backward of one training step: `batch` samples with `answer_tokens` supervised tokens each.

    `union_fraction`: the share of the `M` high-res tokens that a sample's answer rows selected together (what each
    FlexAttention layer projects, with gradients). Full fine-tuning of the language model and projector, vision
    tower frozen, high-res tiles encoded without gradients, hr projections trained.
    """
    image_tokens = {"a": s.low_res_tokens, "b": s.low_res_tokens, "c": s.high_res_tokens}[_check_variant(variant)]
    tokens = text_tokens + image_tokens
    images = s.zoom**2 if variant == "c" else 1
    projector_in = 2 * images * s.low_res_tokens * s.vision_hidden * s.text_hidden
    projector_out = 2 * images * s.low_res_tokens * s.text_hidden * s.text_hidden
    language = text_flops(s, tokens, tokens, tokens)
    # Backward: each language-model product has two operands that need gradients; the projector's input has none.
    flops = vision_flops(s, images) + 3 * language + projector_in + 2 * projector_out
    if variant != "b" or s.n_fa == 0:
        return batch * flops
    candidates = max(1, round(union_fraction * s.high_res_tokens))
    rows, head_rows = answer_tokens, s.heads * answer_tokens
    scores = 2 * s.heads * rows * tokens * s.head_dim
    high_res_scores = 2 * s.heads * rows * candidates * s.head_dim
    keys = 2 * candidates * s.text_hidden * s.kv_dim  # features need no gradient: weight gradient only
    if head_rows < candidates:  # mixed = P @ F (gradient for P only), then hr_v_proj (both)
        mix, projection = 2 * head_rows * candidates * s.text_hidden, 2 * head_rows * s.text_hidden * s.kv_dim
        values = 2 * mix + 3 * projection
    else:  # hr_v_proj(F) (weight gradient only), then P @ V (both)
        values = 2 * 2 * candidates * s.text_hidden * s.kv_dim + 3 * 2 * head_rows * candidates * s.head_dim
    per_layer = 3 * scores + 2 * keys + 3 * high_res_scores + 3 * scores + values  # scores, keys, joint, values
    selection_only = scores  # the layer below the first FlexAttention layer: no gradient reaches its rows' scores
    tiles = vision_flops(s, s.zoom**2)
    return batch * (flops + tiles + s.n_fa * per_layer + selection_only)


def _check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"Unknown variant {variant!r}: use one of {', '.join(VARIANTS)} ({VARIANTS}).")
    return variant


# --- memory ----------------------------------------------------------------------------------------------------------


def memory_bytes(s: LlavaShapes, variant: str, context: int, batch: int = 1, dtype_bytes: int = 2) -> dict[str, float]:
    """Bytes kept during generation: `weights`, `kv_cache` (`context` tokens per sequence) and `state`.

    `state` is FlexAttention's (b): per image, the high-res features, their rotary table and every FlexAttention
    layer's dense keys (`n_fa * M * kv_dim`).
    """
    _check_variant(variant)
    weights = s.parameters + (s.high_res_parameters if variant == "b" else 0)
    cache = 2 * s.text_layers * s.kv_dim * context * batch
    state = 0
    if variant == "b":
        m = s.high_res_tokens
        state = batch * m * (s.text_hidden + 2 * s.head_dim + s.n_fa * s.kv_dim)
    return {"weights": weights * dtype_bytes, "kv_cache": cache * dtype_bytes, "state": state * dtype_bytes}


def training_memory_bytes(s: LlavaShapes, variant: str, dtype_bytes: int = 2) -> dict[str, float]:
    """Bytes kept by full fine-tuning (language model, projector and, for (b), hr projections trainable).

    `weights` and `gradients` in the training dtype, `optimizer`: AdamW's two fp32 moments. Activations excluded.
    """
    _check_variant(variant)
    vision = s.vision_layers * (4 * s.vision_hidden**2 + 2 * s.vision_hidden * s.vision_mlp)  # frozen, approximately
    trainable = s.parameters - vision + (s.high_res_parameters if variant == "b" else 0)
    weights = s.parameters + (s.high_res_parameters if variant == "b" else 0)
    return {"weights": weights * dtype_bytes, "gradients": trainable * dtype_bytes, "optimizer": trainable * 8}


NF4_DOUBLE_QUANT_BITS = 4 + 8 / 64 + 32 / (64 * 256)
"""Bits per weight of bitsandbytes nf4 with double quantisation: a 4-bit code, an 8-bit absmax per 64-weight block,
and an fp32 scale per 256 blocks (QLoRA, Dettmers et al. 2023, Sec. 3: 4.127 bits)."""


def qlora_memory_bytes(
    s: LlavaShapes,
    variant: str,
    lora_rank: int = 16,
    high_res: str = "save",
    quantized_bits: float = NF4_DOUBLE_QUANT_BITS,
    unquantized_bytes: int = 4,
) -> dict[str, float]:
    """Bytes kept by a QLoRA fine-tune: a 4-bit language model, LoRA on its attention, AdamW. Activations excluded.

    Args:
        s: the model's shapes.
        variant: `"a"` (stock) or `"b"` (FlexAttention; `"c"` is not trained this way).
        lora_rank: LoRA's `r` on `q_proj`, `k_proj`, `v_proj`, `o_proj` of every language-model layer.
        high_res: how the hr projections train: `"save"` (in full, `modules_to_save`), `"lora"` or `"frozen"`.
        quantized_bits: bits per quantized weight (nf4 with double quantisation by default).
        unquantized_bytes: bytes per weight left unquantized (embeddings, `lm_head`, vision tower, projector, norms,
            hr projections): 4 after `peft.prepare_model_for_kbit_training`, which casts them all to fp32; 2 when
            they are kept in bf16.

    Returns:
        `weights` (quantized linear layers of the language model's decoder layers, everything else unquantized),
        `adapters` (LoRA weights in fp32, and the trained copy of the hr projections that `modules_to_save` makes
        when `high_res="save"`, in `unquantized_bytes`), `gradients` (the same dtypes) and `optimizer` (AdamW's two
        fp32 moments of everything trained).
    """
    if _check_variant(variant) == "c":
        raise ValueError("QLoRA memory is modelled for variants 'a' (stock) and 'b' (FlexAttention).")
    if high_res not in ("save", "lora", "frozen"):
        raise ValueError(f"high_res must be 'save', 'lora' or 'frozen', got {high_res!r}.")
    h, kv = s.text_hidden, s.kv_dim
    quantized = s.text_layers * (2 * h * h + 2 * h * kv + 3 * h * s.text_mlp)
    unquantized = s.parameters - quantized
    lora = s.text_layers * lora_rank * (2 * (h + h) + 2 * (h + kv))
    copies = 0
    if variant == "b":
        unquantized += s.high_res_parameters
        if high_res == "lora":
            lora += s.n_fa * 2 * lora_rank * (h + kv)
        elif high_res == "save":
            copies = s.high_res_parameters  # modules_to_save keeps the original and trains a copy
    trained_bytes = lora * 4 + copies * unquantized_bytes  # PEFT keeps LoRA weights of a 4-bit base in fp32
    return {
        "weights": quantized * quantized_bits / 8 + unquantized * unquantized_bytes,
        "adapters": trained_bytes,
        "gradients": trained_bytes,
        "optimizer": (lora + copies) * 8,
    }


# --- report ----------------------------------------------------------------------------------------------------------


def report(
    s: LlavaShapes,
    text_tokens: int = 40,
    new_tokens: int = 8,
    answer_tokens: int = 16,
    union_fraction: float = 0.1,
    batch: int = 1,
) -> str:
    """A markdown table of the three variants, then the paper's Table 5 figures for comparison."""
    giga, tera, gib = 1e9, 1e12, 2**30
    rows = []
    for key, name in VARIANTS.items():
        image_tokens = s.high_res_tokens if key == "c" else s.low_res_tokens
        prompt = text_tokens + image_tokens
        prefill = prefill_flops(s, key, text_tokens, batch)
        steps = [decode_step_flops(s, key, prompt + step, batch) for step in range(new_tokens - 1)]
        sample = (prefill + sum(steps)) / batch
        memory = memory_bytes(s, key, prompt + new_tokens, batch)
        training = training_step_flops(s, key, text_tokens, answer_tokens, union_fraction, batch)
        rows.append(
            [
                f"({key}) {name}",
                str(prompt),
                f"{prefill / tera:.2f}",
                f"{steps[0] / giga:.1f}" if steps else "-",
                f"{sample / tera:.2f}",
                f"{training / tera:.2f}",
                f"{memory['weights'] / gib:.2f}",
                f"{memory['kv_cache'] / gib:.3f}",
                f"{memory['state'] / gib:.3f}",
            ]
        )
    header = [
        "variant",
        "prompt tokens",
        "prefill TFLOPs",
        "decode GFLOPs/step",
        f"sample TFLOPs ({new_tokens} tokens)",
        f"training step TFLOPs ({answer_tokens} answer tokens)",
        "weights GiB",
        "KV cache GiB",
        "state GiB",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines.append("")
    lines.append("Paper, Table 5 (TFLOPs per MagnifierBench sample, calflops on the authors' code, V100):")
    lines += [f"- {name}: {value}" for name, value in PAPER_TFLOPS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print `report` for a released checkpoint's shapes."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llava-1.5-7b")
    parser.add_argument("--n-fa", type=int, help="FlexAttention layers (default: all but the first 9)")
    parser.add_argument("--text-tokens", type=int, default=40, help="the prompt's non-image tokens")
    parser.add_argument("--new-tokens", type=int, default=8, help="generated tokens per sample (>= 1)")
    parser.add_argument("--answer-tokens", type=int, default=16, help="supervised tokens per training sample")
    parser.add_argument("--union", type=float, default=0.1, help="training: share of high-res tokens projected")
    parser.add_argument("--batch-size", type=int, default=1)
    args = parser.parse_args(argv)
    if min(args.text_tokens, args.new_tokens, args.answer_tokens, args.batch_size) < 1 or not 0 < args.union <= 1:
        parser.error("need --text-tokens, --new-tokens, --answer-tokens, --batch-size >= 1 and 0 < --union <= 1")
    shapes = LlavaShapes.from_config(shaped_llava_config(args.shape), n_fa=args.n_fa)
    print(
        f"{args.shape}: {shapes.parameters / 1e9:.2f}B parameters (+{shapes.high_res_parameters / 1e6:.0f}M for "
        f"n_fa={shapes.n_fa}), {shapes.low_res_tokens} low-res and {shapes.high_res_tokens} high-res tokens per "
        f"image; batch {args.batch_size}, {args.text_tokens} text tokens, fp16/bf16 memory"
    )
    print()
    print(report(shapes, args.text_tokens, args.new_tokens, args.answer_tokens, args.union, args.batch_size))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "LlavaShapes",
    "decode_step_flops",
    "memory_bytes",
    "prefill_flops",
    "qlora_memory_bytes",
    "report",
    "training_memory_bytes",
    "training_step_flops",
]
