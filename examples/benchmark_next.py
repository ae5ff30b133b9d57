"""LLaVA-NeXT / OneVision: the stock model (base image and every any-resolution crop in the sequence) against
FlexAttention (the base image in the sequence, the crops as the high-res pool), on the same images, in one run.

    python examples/benchmark_next.py                                   # the tiny NeXT model, CPU
    python examples/benchmark_next.py --shape llava-v1.6-mistral-7b     # the 7B shapes, random weights (a GPU)
    python examples/benchmark_next.py --shape llava-onevision-qwen2-7b  # OneVision-7B's shapes (a GPU)

Prints a markdown table: prompt tokens, prefill time, decode time per token, host syncs and operators (CUDA kernel
launches on a GPU) per decode step, and the KV cache plus FlexAttention state (CPU) or the peak memory (GPU).
"""

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import LlavaNextForConditionalGeneration, LlavaOnevisionForConditionalGeneration, LogitsProcessorList
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches


sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import DTYPES, StepClock, hardware, mebibytes, synchronize  # noqa: E402

import hf_flexattention  # noqa: E402
from hf_flexattention import patch_model, unpatch_model  # noqa: E402
from hf_flexattention.configuration_flex_llava import released_n_fa  # noqa: E402
from hf_flexattention.counting import decode_step_counts  # noqa: E402
from hf_flexattention.shapes import NEXT_SHAPES, shaped_llava_next_config  # noqa: E402
from hf_flexattention.tiny import tiny_llava_next_config, tiny_llava_onevision_config  # noqa: E402


VARIANTS = {"a": "stock, base + crops in the sequence", "b": "FlexAttention, base in the sequence"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=["tiny-next", "tiny-onevision", *NEXT_SHAPES], default="tiny-next")
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"), help="default: 2x2 crops")
    parser.add_argument("--text-tokens", type=int, default=40, help="non-image prompt tokens")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--n-fa", type=int, help="FlexAttention layers (default: the released 23-of-32 share)")
    parser.add_argument("--selection", choices=("threshold", "topk"), default="threshold")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: float16 on CUDA, else float32")
    parser.add_argument("--threads", type=int, help="CPU threads for torch")
    args = parser.parse_args(argv)
    if args.new_tokens < 4 or args.repeats < 1 or args.batch_size < 1 or args.text_tokens < 1:
        parser.error("need --new-tokens >= 4, --repeats >= 1, --batch-size >= 1 and --text-tokens >= 1")
    args.device = torch.device(args.device)
    return args


def build_inputs(model, args) -> dict[str, dict]:
    """Each variant's inputs for `batch` copies of one random image: its pixels, and a prompt of `text_tokens`
    random words around the image tokens (all patches for stock, the base image's tokens for FlexAttention)."""
    config, device = model.config, args.device
    side = config.vision_config.image_size
    size = args.image_size or [2 * side, 2 * side]
    patches = image_size_to_num_patches(size, config.image_grid_pinpoints, side)
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(args.batch_size, patches, 3, side, side, generator=generator)
    image_sizes = torch.tensor([size] * args.batch_size)
    with torch.inference_mode():  # the stock token count of this image: its packed features
        packed = model.model.get_image_features(
            pixel_values[:1].to(device, model.dtype), image_sizes[:1].to(device), return_dict=True
        ).pooler_output[0]
    text = torch.randint(3, config.image_token_id - 1, (args.batch_size, args.text_tokens), generator=generator)
    inputs = {}
    for key, image_tokens in (("a", packed.shape[0]), ("b", (side // config.vision_config.patch_size) ** 2)):
        image = torch.full((args.batch_size, image_tokens), config.image_token_id)
        input_ids = torch.cat([text[:, :1], image, text[:, 1:]], dim=1)
        inputs[key] = {
            "input_ids": input_ids.to(device),
            "attention_mask": torch.ones_like(input_ids).to(device),
            "pixel_values": pixel_values.to(device, model.dtype),
            "image_sizes": image_sizes.to(device),
        }
    return inputs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.type == "cuda"
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if cuda else torch.float32)
    tiny = {"tiny-next": tiny_llava_next_config, "tiny-onevision": tiny_llava_onevision_config}
    config = tiny[args.shape]() if args.shape in tiny else shaped_llava_next_config(args.shape)
    model_class = (
        LlavaNextForConditionalGeneration
        if config.model_type == "llava_next"
        else (LlavaOnevisionForConditionalGeneration)
    )
    torch.manual_seed(0)
    with args.device:
        model = model_class(config).to(dtype).eval()
    n_fa = args.n_fa if args.n_fa is not None else released_n_fa(config.text_config.num_hidden_layers)
    inputs = build_inputs(model, args)
    results = {key: {"prefill": [], "decode": [], "memory": []} for key in VARIANTS}
    kwargs = {"do_sample": False, "max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens}
    for round_index in range(args.repeats + 1):  # round 0 warms up
        for key in VARIANTS:
            if key == "b":
                patch_model(model, n_fa=n_fa, selection=args.selection)
            output = None  # the previous variant's cache must not count in this one's peak
            if cuda:
                torch.cuda.reset_peak_memory_stats(args.device)
            clock = StepClock(args.device)
            synchronize(args.device)
            start = time.perf_counter()
            with torch.inference_mode():
                output = model.generate(
                    **inputs[key],
                    logits_processor=LogitsProcessorList([clock]),
                    return_dict_in_generate=True,
                    **kwargs,
                )
            if round_index > 0:
                results[key]["prefill"].append((clock.times[0] - start) * 1e3)
                results[key]["decode"].append(statistics.median(clock.step_times()) * 1e3)
                if cuda:
                    results[key]["memory"].append(torch.cuda.max_memory_allocated(args.device) / 2**30)
                else:
                    cache = output.past_key_values
                    kv = mebibytes([(layer.keys, layer.values) for layer in cache.layers])
                    results[key]["memory"].append(kv + mebibytes(getattr(cache, "flex_state", None)))
            if key == "b":
                counts = decode_step_counts(model, inputs[key], do_sample=False) if round_index == 0 else None
                results[key]["counts"] = counts or results[key].get("counts")
                unpatch_model(model)
            elif round_index == 0:
                results[key]["counts"] = decode_step_counts(model, inputs[key], do_sample=False)

    print(f"hardware:  {hardware(args.device)}")
    print(
        f"software:  torch {torch.__version__}, transformers {transformers.__version__}, "
        f"hf_flexattention {hf_flexattention.__version__}, Python {platform.python_version()}"
    )
    size = args.image_size or [2 * config.vision_config.image_size] * 2
    print(
        f"model:     {args.shape}, random weights, {str(dtype).split('.')[-1]} on {args.device}; batch "
        f"{args.batch_size} of one {size[0]}x{size[1]} image; n_fa={n_fa}, selection {args.selection}"
    )
    print(
        f"method:    greedy generate, {args.new_tokens} new tokens, dynamic cache; medians of {args.repeats} rounds "
        "after 1 discarded, variants interleaved; syncs and operators counted for one decode step"
    )
    memory = "peak GiB" if cuda else "cache+state MiB"
    count = "kernels/step" if cuda else "aten ops/step"
    print()
    print(f"| variant | prompt tokens | prefill ms | decode ms/token | {memory} | syncs/step | {count} |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for key, name in VARIANTS.items():
        values = [statistics.median(results[key][metric]) for metric in ("prefill", "decode", "memory")]
        counts = results[key]["counts"]
        operators = counts.kernels if cuda else counts.ops
        print(
            f"| ({key}) {name} | {inputs[key]['input_ids'].shape[1]} | {values[0]:.1f} | {values[1]:.2f} | "
            f"{values[2]:.2f} | {counts.syncs + (counts.device_syncs or 0)} | {operators} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
