"""Training-step time of FlexAttention next to the stock low-res Llava model, on the same batch, in one run.

Both models start from the same random weights; one is patched with FlexAttention. A training step is forward
(with labels), backward and an AdamW step, for LoRA (`lora_target_modules()`, hr projections in full via
`modules_to_save`, as in `examples/train_lora.py`) and for full fine-tuning of the language model and projector
(vision tower frozen, as in LLaVA-1.5). The two models take turns within each round, warm-up rounds are discarded
and the table reports medians, so a busy machine slows both alike.

The default `scaled` model keeps LLaVA-1.5-7B's geometry and proportions at a size a CPU can train: CLIP at
336 px / patch 14 (576 low-res, 5184 high-res tokens), a vision tower ~1/21 of the language model (CLIP-L vs
Vicuna-7B), head dim 128, and 3 of 4 decoder layers FlexAttention (the release: 23 of 32). Weights are random, so
the attention-threshold selection would pick an arbitrary share of the image; by default each answer row keeps
the paper's ~10 % of the high-res tokens (`--selection topk --topk-ratio 0.1`). The table also reports what was
selected: the share per row and the union over a sample's answer rows (what each layer projects).

    python examples/benchmark_training.py                   # scaled model, CPU
    python examples/benchmark_training.py --preset tiny     # the 32 px tiny model of the tests
    python examples/benchmark_training.py --selection threshold --device cuda
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
from peft import LoraConfig, get_peft_model  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import LlavaForConditionalGeneration  # noqa: E402

from hf_flexattention import patch_model  # noqa: E402
from hf_flexattention.data import LlavaConversationCollator, LlavaSample  # noqa: E402
from hf_flexattention.tiny import TINY_WORDS, build_tiny_processor, tiny_llava_config  # noqa: E402
from hf_flexattention.training import lora_target_modules  # noqa: E402


PRESETS = {
    # LLaVA-1.5-7B: CLIP-L/14-336 (24 layers, 1024 wide) and Vicuna-7B (32 layers, 4096 wide, 32 heads of 128).
    "scaled": {
        "text": {"num_layers": 4, "hidden_size": 1024, "num_heads": 8, "num_kv_heads": 8},
        "vision": {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 3, "num_attention_heads": 4},
        "image_size": 336,
        "patch_size": 14,
        "n_fa": 3,
    },
    "tiny": {"text": {}, "vision": {}, "image_size": 32, "patch_size": 4, "n_fa": 2},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see `--help`)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="scaled", help="model size (see above)")
    parser.add_argument("--modes", default="lora,full", help="comma-separated: lora, full")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--answer-words", type=int, default=16, help="supervised tokens per sample (answer rows)")
    parser.add_argument("--selection", choices=("random", "topk", "threshold"), default="random")
    parser.add_argument("--random-p", type=float, default=0.1, help="random: share of high-res tokens per row")
    parser.add_argument("--topk-ratio", type=float, default=0.1, help="topk: share of low-res cells per row")
    parser.add_argument("--threshold", type=float, default=48 / 255, help="threshold: the paper's selection")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (one step of each model per round)")
    parser.add_argument("--warmup-rounds", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    return parser.parse_args(argv)


def build_stock_model(preset: dict, seed: int = 0) -> LlavaForConditionalGeneration:
    config = tiny_llava_config(image_size=preset["image_size"], patch_size=preset["patch_size"], **preset["text"])
    for name, value in preset["vision"].items():
        setattr(config.vision_config, name, value)
    config.text_config.intermediate_size = int(config.text_config.hidden_size * 11008 / 4096)  # Vicuna's ratio
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config)


def make_batch(processor, batch_size: int, answer_words: int) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)
    words = TINY_WORDS[2:]  # not the role names
    samples = []
    for index in range(batch_size):
        pixels = rng.integers(0, 256, size=(300 + 40 * index, 400, 3), dtype=np.uint8)
        pixels[60:160, 80:240] = (220, 40, 40)  # structure for the attention to find
        answer = " ".join(words[int(i)] for i in rng.integers(len(words), size=answer_words))
        conversation = [{"from": "human", "value": "<image>\ndescribe the picture"}, {"from": "gpt", "value": answer}]
        samples.append(LlavaSample(conversation, Image.fromarray(pixels)))
    return LlavaConversationCollator(processor)(samples)


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
    """Mean share of the high-res tokens selected per answer row, and projected per sample and FlexAttention layer
    (the union of the sample's rows), from one extra forward (not timed)."""
    from hf_flexattention import attention

    trace, unions = [], []
    original = getattr(attention, "_hierarchical_rows", None)  # private: the union is only reported if it exists

    def recording(module, call, selected, *args, **kwargs):
        union = selected.any(dim=1)
        unions.extend((union.sum(dim=-1).float() / union.shape[-1]).tolist())
        return original(module, call, selected, *args, **kwargs)

    if original is not None:
        attention._hierarchical_rows = recording
    try:
        with torch.no_grad():
            model(**batch, flex_trace=trace)
    finally:
        if original is not None:
            attention._hierarchical_rows = original
    per_row = torch.cat([counts[counts > 0].float() for _, counts in trace]).mean().item() / high_res_tokens
    return per_row, statistics.mean(unions) if unions else float("nan")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    processor = build_tiny_processor(image_size=preset["image_size"], patch_size=preset["patch_size"])
    batch = {k: v.to(args.device) for k, v in make_batch(processor, args.batch_size, args.answer_words).items()}
    stock_batch = {k: v for k, v in batch.items() if k not in ("high_res_pixel_values", "original_image_sizes")}
    base = build_stock_model(preset)
    patch_kwargs = {
        "n_fa": preset["n_fa"],
        "selection": args.selection,
        "random_p": args.random_p,
        "topk_ratio": args.topk_ratio,
        "threshold": args.threshold,
    }

    if args.device.startswith("cuda"):
        hardware = torch.cuda.get_device_name(args.device)
    else:
        hardware = f"{cpu_name()}, {torch.get_num_threads()} torch threads"
    text, vision = base.config.text_config, base.config.vision_config
    sequence = batch["input_ids"].shape[1]
    supervised = int((batch["labels"] != -100).sum()) // args.batch_size
    print(
        f"{args.preset} model: language model {text.num_hidden_layers} x {text.hidden_size} "
        f"({sum(p.numel() for p in base.model.language_model.parameters()) / 1e6:.1f} M), vision tower "
        f"{vision.num_hidden_layers} x {vision.hidden_size} "
        f"({sum(p.numel() for p in base.model.vision_tower.parameters()) / 1e6:.2f} M), n_fa {preset['n_fa']}; "
        f"batch {args.batch_size} x {sequence} tokens ({supervised} supervised each), fp32, {args.device}"
    )
    print(f"hardware: {hardware}; torch {torch.__version__}")

    results = []
    for mode in args.modes.split(","):
        stock = trainable(copy.deepcopy(base), mode, flex=False).to(args.device).train()
        flex_base = patch_model(copy.deepcopy(base), **patch_kwargs)
        flex = trainable(flex_base, mode, flex=True).to(args.device).train()
        row_share, projected = selection_stats(flex, batch, processor.zoom**2 * processor.num_image_tokens)
        models = {"stock": (stock, stock_batch), "flex": (flex, batch)}
        optimizers = {
            name: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
            for name, (model, _) in models.items()
        }
        times = {name: [] for name in models}
        for round_index in range(args.warmup_rounds + args.rounds):
            order = list(models) if round_index % 2 == 0 else list(reversed(models))
            for name in order:
                model, inputs = models[name]
                elapsed = step_time(model, optimizers[name], inputs, args.device)
                if round_index >= args.warmup_rounds:
                    times[name].append(elapsed)
        stock_time, flex_time = statistics.median(times["stock"]), statistics.median(times["flex"])
        results.append(
            {
                "mode": mode,
                "stock_s": stock_time,
                "flex_s": flex_time,
                "ratio": flex_time / stock_time,
                "stock_min_s": min(times["stock"]),
                "flex_min_s": min(times["flex"]),
                "row_share": row_share,
                "projected_share": projected,
            }
        )

    print()
    print(f"| training step, {args.rounds} rounds: median (fastest) | stock low-res (s) | FlexAttention (s) | ratio |")
    print("|---|---|---|---|")
    for result in results:
        fastest_ratio = result["flex_min_s"] / result["stock_min_s"]
        print(
            f"| {result['mode']} | {result['stock_s']:.3f} ({result['stock_min_s']:.3f}) | {result['flex_s']:.3f} "
            f"({result['flex_min_s']:.3f}) | {result['ratio']:.2f}x ({fastest_ratio:.2f}x) |"
        )
    print()
    for result in results:
        print(
            f"{result['mode']}: high-res tokens selected per answer row {100 * result['row_share']:.1f} %, "
            f"projected per sample and FlexAttention layer (union of its rows) {100 * result['projected_share']:.1f} %"
        )
    return results


if __name__ == "__main__":
    main()
