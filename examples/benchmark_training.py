"""Training-step time and memory of FlexAttention next to the stock low-res Llava model, on the same batch, in one run.

Both models start from the same random weights; one is patched with FlexAttention. A training step is forward
(with labels), backward and an AdamW step, for LoRA (`lora_target_modules()`, hr projections trained in full via
`modules_to_save`, as in `examples/train_lora.py`) and for full fine-tuning of the language model and projector
(vision tower frozen, as in LLaVA-1.5). The two models take turns within each round, warm-up rounds are discarded
and the table reports medians, so a busy machine slows both alike.

Shapes built in code (random weights, no download):
* `scaled` (default, CPU): LLaVA-1.5-7B's image geometry (336 px / patch 14: 576 low-res, 5184 high-res tokens) and
  proportions (vision tower ~1/21 of the language model, head dim 128, 3 of 4 layers FlexAttention) at a size a CPU
  trains;
* `tiny`: the 32 px tiny model of the tests;
* `llava-1.5-7b`, `llava-1.5-13b`: the released checkpoints' exact shapes, built on the device (a GPU).

Weights are random, so the paper's threshold selection would pick an arbitrary share of the image; by default each
answer row keeps a budget of the paper's ~10 % of the high-res tokens (`--selection topk --topk-ratio 0.1`). The
output reports what was selected per row, and projected per FlexAttention layer (the union of a sample's rows).

    python examples/benchmark_training.py                                   # scaled model, CPU
    python examples/benchmark_training.py --shape tiny
    python examples/benchmark_training.py --shape llava-1.5-7b --modes lora  # exact 7B shapes, bf16, a GPU
"""

import argparse
import copy
import os
import platform
import statistics
import sys
import time


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a source checkout

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import LlavaForConditionalGeneration  # noqa: E402

import hf_flexattention  # noqa: E402
from hf_flexattention import patch_model  # noqa: E402
from hf_flexattention.data import LlavaConversationCollator, LlavaSample  # noqa: E402
from hf_flexattention.demo import DTYPES  # noqa: E402
from hf_flexattention.shapes import SHAPES, shaped_llava_config  # noqa: E402
from hf_flexattention.tiny import TINY_IMAGE_TOKEN_ID, TINY_WORDS, build_tiny_processor, tiny_llava_config  # noqa: E402
from hf_flexattention.training import lora_target_modules  # noqa: E402


PRESETS = {
    # LLaVA-1.5-7B: CLIP-L/14-336 (24 layers, 1024 wide) and Vicuna-7B (32 layers, 4096 wide, 32 heads of 128).
    "scaled": {
        "text": {"num_layers": 4, "hidden_size": 1024, "num_heads": 8, "num_kv_heads": 8},
        "vision": {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 3, "num_attention_heads": 4},
        "image_size": 336,
        "patch_size": 14,
    },
    "tiny": {"text": {}, "vision": {}, "image_size": 32, "patch_size": 4},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see `--help`); bad values stop here, before any model is built."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=[*PRESETS, *SHAPES], default="scaled", help="model (see above)")
    parser.add_argument("--modes", default="lora,full", help="comma-separated: lora, full")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--answer-words", type=int, default=16, help="supervised tokens per sample (answer rows)")
    parser.add_argument("--n-fa", type=int, help="FlexAttention layers (default: the released 23-of-32 share)")
    parser.add_argument("--selection", choices=("random", "topk", "threshold"), default="topk")
    parser.add_argument("--random-p", type=float, default=0.1, help="random: probability per cell")
    parser.add_argument("--topk-ratio", type=float, default=0.1, help="topk: the budget, share of high-res tokens")
    parser.add_argument("--threshold", type=float, default=48 / 255, help="threshold: the paper's selection")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (one step of each model per round)")
    parser.add_argument("--warmup-rounds", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on CUDA, else float32")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    if not modes or any(mode not in ("lora", "full") for mode in modes):
        parser.error(f"--modes takes lora and/or full, comma-separated; got {args.modes!r}")
    if min(args.batch_size, args.answer_words, args.rounds) < 1 or args.warmup_rounds < 0:
        parser.error("need --batch-size, --answer-words, --rounds >= 1 and --warmup-rounds >= 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    args.modes = modes
    return args


def build_stock_model(shape: str, dtype: torch.dtype, device: str, seed: int = 0) -> LlavaForConditionalGeneration:
    """The stock model of `shape`, with random weights (seeded), built on `device`."""
    torch.manual_seed(seed)
    if shape in SHAPES:
        with torch.device(device):
            return LlavaForConditionalGeneration._from_config(shaped_llava_config(shape), dtype=dtype)
    preset = PRESETS[shape]
    config = tiny_llava_config(image_size=preset["image_size"], patch_size=preset["patch_size"], **preset["text"])
    for name, value in preset["vision"].items():
        setattr(config.vision_config, name, value)
    config.text_config.intermediate_size = int(config.text_config.hidden_size * 11008 / 4096)  # Vicuna's ratio
    config._attn_implementation = "sdpa"
    return LlavaForConditionalGeneration(config).to(device, dtype)


def make_batch(processor, batch_size: int, answer_words: int, image_token_id: int) -> dict[str, torch.Tensor]:
    """A collated batch of LLaVA conversations with drawn images; the tiny tokenizer's words stand for text (their
    ids are valid in any vocabulary), its image token is mapped to the model's."""
    rng = np.random.default_rng(0)
    words = TINY_WORDS[2:]  # not the role names
    samples = []
    for index in range(batch_size):
        pixels = rng.integers(0, 256, size=(300 + 40 * index, 400, 3), dtype=np.uint8)
        pixels[60:160, 80:240] = (220, 40, 40)  # structure for the attention to find
        answer = " ".join(words[int(i)] for i in rng.integers(len(words), size=answer_words))
        conversation = [{"from": "human", "value": "<image>\ndescribe the picture"}, {"from": "gpt", "value": answer}]
        samples.append(LlavaSample(conversation, Image.fromarray(pixels)))
    batch = LlavaConversationCollator(processor)(samples)
    batch["input_ids"] = batch["input_ids"].masked_fill(batch["input_ids"] == TINY_IMAGE_TOKEN_ID, image_token_id)
    return batch


def trainable(model: torch.nn.Module, mode: str, flex: bool) -> torch.nn.Module:
    """The model set up for `mode`: LoRA on the language model (+ hr projections in full), or full fine-tuning."""
    if mode == "lora":
        config = LoraConfig(
            r=16,
            lora_alpha=32,
            target_modules=lora_target_modules(),
            modules_to_save=["hr_k_proj", "hr_v_proj"] if flex else None,
        )
        return get_peft_model(model, config)
    model.model.vision_tower.requires_grad_(False)
    return model


def step_time(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict, device: str) -> float:
    synchronize = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    synchronize()
    start = time.perf_counter()
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    synchronize()
    return time.perf_counter() - start


def selection_stats(model: torch.nn.Module, batch: dict, high_res_tokens: int) -> tuple[float, float]:
    """Mean share of the high-res tokens selected per answer row, and projected per FlexAttention layer (the union of
    each sample's rows, padded to the batch's largest), from one extra forward with gradients (not timed)."""
    trace, projected = [], []
    hooks = [
        module.register_forward_hook(lambda _, args, __: projected.append(args[0].shape[1] / high_res_tokens))
        for name, module in model.named_modules()
        if name.endswith("hr_k_proj")  # the projection, or the PEFT wrapper around it
    ]
    try:
        model(**batch, flex_trace=trace)
    finally:
        for hook in hooks:
            hook.remove()
    model.zero_grad(set_to_none=True)
    per_row = torch.cat([counts[counts > 0].float() for _, counts in trace]).mean().item() / high_res_tokens
    return per_row, statistics.mean(projected) if projected else float("nan")


def hardware(device: str) -> str:
    if device.startswith("cuda"):
        return f"GPU: {torch.cuda.get_device_name(device)}"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as file:
            name = next(line.split(":", 1)[1].strip() for line in file if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU: {name}, {torch.get_num_threads()} torch threads"


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    base = build_stock_model(args.shape, dtype, args.device)
    vision = base.config.vision_config
    processor = build_tiny_processor(image_size=vision.image_size, patch_size=vision.patch_size)
    batch = make_batch(processor, args.batch_size, args.answer_words, base.config.image_token_id)
    batch = {k: v.to(args.device, dtype) if v.is_floating_point() else v.to(args.device) for k, v in batch.items()}
    stock_batch = {k: v for k, v in batch.items() if k not in ("high_res_pixel_values", "original_image_sizes")}
    layers = base.config.text_config.num_hidden_layers
    n_fa = args.n_fa if args.n_fa is not None else min(layers - 1, max(1, round(layers * 23 / 32)))
    patch_kwargs = {
        "n_fa": n_fa,
        "selection": args.selection,
        "random_p": args.random_p,
        "topk_ratio": args.topk_ratio,
        "threshold": args.threshold,
    }
    text = base.config.text_config
    sequence = batch["input_ids"].shape[1]
    supervised = int((batch["labels"] != -100).sum()) // args.batch_size
    print(f"hardware: {hardware(args.device)}")
    print(
        f"software: torch {torch.__version__}, transformers {transformers.__version__}, "
        f"hf_flexattention {hf_flexattention.__version__}, Python {platform.python_version()}"
    )
    print(
        f"model:    {args.shape}: language model {text.num_hidden_layers} x {text.hidden_size} "
        f"({sum(p.numel() for p in base.model.language_model.parameters()) / 1e6:.1f} M), vision tower "
        f"{vision.num_hidden_layers} x {vision.hidden_size} "
        f"({sum(p.numel() for p in base.model.vision_tower.parameters()) / 1e6:.2f} M), random weights, n_fa {n_fa}, "
        f"selection {args.selection}; batch {args.batch_size} x {sequence} tokens ({supervised} supervised each), "
        f"{str(dtype).split('.')[-1]}, {args.device}"
    )
    print(
        f"method:   forward + backward + AdamW step; medians of {args.rounds} rounds after {args.warmup_rounds} "
        "discarded, the two models alternating"
    )

    results = []
    for mode in args.modes:
        stock = trainable(copy.deepcopy(base), mode, flex=False).train()
        flex = trainable(patch_model(copy.deepcopy(base), **patch_kwargs), mode, flex=True).train()
        row_share, projected = selection_stats(flex, batch, processor.zoom**2 * processor.num_image_tokens)
        models = {"stock": (stock, stock_batch), "flex": (flex, batch)}
        optimizers = {
            name: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
            for name, (model, _) in models.items()
        }
        times = {name: [] for name in models}
        peaks = {name: 0.0 for name in models}
        for round_index in range(args.warmup_rounds + args.rounds):
            order = list(models) if round_index % 2 == 0 else list(reversed(models))
            for name in order:
                model, inputs = models[name]
                if cuda:
                    # All models stay resident (base, stock, flex): the step's own peak is what it adds over them.
                    torch.cuda.reset_peak_memory_stats(args.device)
                    resident = torch.cuda.memory_allocated(args.device)
                elapsed = step_time(model, optimizers[name], inputs, args.device)
                if round_index >= args.warmup_rounds:
                    times[name].append(elapsed)
                    if cuda:
                        added = (torch.cuda.max_memory_allocated(args.device) - resident) / 2**30
                        peaks[name] = max(peaks[name], added)
        results.append({"mode": mode, "times": times, "peaks": peaks, "row": row_share, "projected": projected})
        del stock, flex, models, optimizers

    print()
    header = "| mode | stock low-res step (s) | FlexAttention step (s) | ratio (fastest) |"
    if cuda:
        header += " step peak GiB over resident weights and state, stock / flex | ratio |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for result in results:
        stock, flex = result["times"]["stock"], result["times"]["flex"]
        ratio, fastest = statistics.median(flex) / statistics.median(stock), min(flex) / min(stock)
        row = (
            f"| {result['mode']} | {statistics.median(stock):.3f} | {statistics.median(flex):.3f} | "
            f"{ratio:.2f}x ({fastest:.2f}x) |"
        )
        if cuda:
            peaks = result["peaks"]
            row += f" {peaks['stock']:.2f} / {peaks['flex']:.2f} | {peaks['flex'] / peaks['stock']:.2f}x |"
        print(row)
    print()
    for result in results:
        print(
            f"{result['mode']}: high-res tokens selected per answer row {100 * result['row']:.1f} %, projected per "
            f"FlexAttention layer (union of a sample's rows) {100 * result['projected']:.1f} %"
        )
    return results


if __name__ == "__main__":
    main()
