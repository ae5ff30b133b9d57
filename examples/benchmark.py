"""Latency and memory of FlexAttention next to its two baselines, on the same image and prompt, in one run.

(a) the stock Llava model: the low-res image tokens in the sequence (576 for LLaVA-1.5; 64 for the tiny model);
(b) the same model patched with FlexAttention: the same prompt, plus the high-res image outside the sequence;
(c) the "full high-res" model: the stock model with all M high-res tokens in the sequence (5184; 576 for tiny).

Each variant runs greedy `generate` with the KV cache once per round. Prefill is the time until the first token's
scores are ready (image encoding included: the low-res image for (a), it and the zoom x zoom high-res tiles for (b),
the high-res tiles for (c)); decode is the median time of the further steps. Memory is the peak allocated on CUDA,
or on CPU the KV cache plus the high-res state that FlexAttention keeps on it. Warm-up rounds are discarded,
variants take turns within each round, and the table reports medians over rounds.

    python examples/benchmark.py                                     # tiny model built in code (CPU friendly)
    python examples/benchmark.py --model llava-hf/llava-1.5-7b-hf --image photo.jpg --device cuda
"""

import argparse
import dataclasses
import os
import platform
import statistics
import time
from itertools import pairwise

import torch
import transformers
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration, LogitsProcessor, LogitsProcessorList
from transformers.modeling_outputs import BaseModelOutputWithPooling

import hf_flexattention
from hf_flexattention import is_patched, patch_model, unpatch_model
from hf_flexattention.demo import DTYPES, TINY_PROMPT, build_prompt, make_test_image
from hf_flexattention.high_res import encode_high_res_features
from hf_flexattention.processing_flex_llava import FlexLlavaProcessor
from hf_flexattention.tiny import build_tiny_llava, build_tiny_processor


VARIANTS = {"a": "stock, low-res tokens", "b": "FlexAttention", "c": "stock, all high-res tokens"}
REAL_PROMPT = "Describe the image in detail."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see `--help`)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="Llava checkpoint (Hub id or folder); default: a tiny model built in code")
    parser.add_argument("--tiny-layers", type=int, default=8, help="tiny model: language-model layers")
    parser.add_argument("--tiny-hidden", type=int, default=256, help="tiny model: language-model hidden size")
    parser.add_argument(
        "--tiny-geometry",
        choices=("small", "llava"),
        default="small",
        help="tiny model's image grid: small (32 px / patch 4: 64 low-res, 576 high-res tokens) or llava "
        "(336 px / patch 14: LLaVA-1.5's 576 low-res and 5184 high-res tokens)",
    )
    parser.add_argument("--image", help="image file (default: a drawn test image)")
    parser.add_argument("--prompt", help="question, or a full prompt holding <image>")
    parser.add_argument("--n-fa", type=int, help="FlexAttention layers (default: the released 23-of-32 share)")
    parser.add_argument("--threshold", type=float, default=48 / 255, help="selection threshold in [0, 1)")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: float16 on CUDA, else float32")
    parser.add_argument("--repeats", type=int, default=5, help="measured rounds (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="discarded rounds before measuring")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens generated per decode measurement (>= 2)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.new_tokens < 2 or args.repeats < 1 or args.warmup < 0:
        parser.error("need --new-tokens >= 2, --repeats >= 1 and --warmup >= 0")
    return args


def hardware(device: torch.device) -> str:
    """A one-line description of the device the benchmark runs on."""
    if device.type == "cuda":
        return f"GPU: {torch.cuda.get_device_name(device)}"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            name = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU: {name}, {os.cpu_count()} logical cores, torch threads: {torch.get_num_threads()}"


def load(args: argparse.Namespace, dtype: torch.dtype, device: torch.device):
    """The stock model, a `FlexLlavaProcessor` for it, the prompt and a description of the model."""
    if args.model is None:
        hidden = args.tiny_hidden
        heads = max(4, hidden // 32)
        image_size, patch_size = (336, 14) if args.tiny_geometry == "llava" else (32, 4)
        model = build_tiny_llava(
            num_layers=args.tiny_layers,
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=heads // 2,
            dtype=dtype,
            image_size=image_size,
            patch_size=patch_size,
        ).to(device)
        processor = build_tiny_processor(image_size=image_size, patch_size=patch_size)
        description = f"tiny random Llava built in code ({args.tiny_layers} layers, hidden {hidden}, {heads} heads)"
        prompt = TINY_PROMPT if args.prompt is None else args.prompt
    else:
        model = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=dtype, device_map=device)
        processor = FlexLlavaProcessor.from_llava_processor(AutoProcessor.from_pretrained(args.model))
        description = args.model
        prompt = build_prompt(processor, args.prompt or REAL_PROMPT)
    return model.eval(), processor, prompt, description


def encode_all_high_res(model: LlavaForConditionalGeneration, high_res_pixel_values: torch.Tensor) -> torch.Tensor:
    """High-res features of the stock model: the same tiles, tower, feature layer and projector as the plugin's."""

    def encode_tiles(tiles: torch.Tensor) -> torch.Tensor:
        outputs = model.model.get_image_features(
            pixel_values=tiles.to(model.dtype),
            vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
            return_dict=True,
        )
        return torch.stack(list(outputs.pooler_output))

    return encode_high_res_features(encode_tiles, high_res_pixel_values, model.config.vision_config.image_size)


def expand_image_tokens(input_ids: torch.Tensor, image_token_id: int, count: int) -> torch.Tensor:
    """A one-sample prompt whose run of image tokens is replaced by `count` image tokens."""
    ids = input_ids[0]
    positions = (ids == image_token_id).nonzero()[:, 0]
    first, last = int(positions[0]), int(positions[-1])
    image = torch.full((count,), image_token_id, dtype=ids.dtype, device=ids.device)
    return torch.cat([ids[:first], image, ids[last + 1 :]])[None]


def tensors_in(value) -> list[torch.Tensor]:
    """The tensors held by `value`, looking inside dataclasses, dicts, lists and tuples."""
    if torch.is_tensor(value):
        return [value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return tensors_in([getattr(value, field.name) for field in dataclasses.fields(value)])
    if isinstance(value, dict):
        return tensors_in(list(value.values()))
    if isinstance(value, (list, tuple)):
        return [tensor for item in value for tensor in tensors_in(item)]
    return []


def megabytes(value) -> float:
    """Total size of the tensors held by `value`, in MiB."""
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors_in(value)) / 2**20


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so wall-clock time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock(LogitsProcessor):
    """Notes when each generated token's scores are ready: the first after prefill, then one per decode step."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        synchronize(self.device)
        self.times.append(time.perf_counter())
        return scores

    def step_times(self) -> list[float]:
        """Seconds of each decode step."""
        return [later - earlier for earlier, later in pairwise(self.times)]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the hardware, versions and a markdown table."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    model, processor, prompt, description = load(args, dtype, device)
    num_layers = model.config.text_config.num_hidden_layers
    n_fa = args.n_fa if args.n_fa is not None else min(num_layers - 1, max(1, round(num_layers * 23 / 32)))
    if args.image is None:
        image = make_test_image()
    else:
        try:
            with Image.open(args.image) as opened:
                image = opened.convert("RGB")
        except OSError as error:
            raise SystemExit(f"cannot open image file {args.image!r}: {error}") from error

    flex_inputs = processor(images=image, text=prompt, return_tensors="pt").to(device, dtype=dtype)
    image_token_id = model.config.image_token_id
    low_res_tokens = int((flex_inputs["input_ids"] == image_token_id).sum())
    high_res_tokens = (processor.zoom * (processor.low_res_size // processor.patch_size)) ** 2
    low_res_inputs = {key: flex_inputs[key] for key in ("input_ids", "attention_mask", "pixel_values")}
    full_ids = expand_image_tokens(flex_inputs["input_ids"], image_token_id, high_res_tokens)
    high_res_pixel_values = flex_inputs["high_res_pixel_values"]

    def full_high_res_inputs() -> dict:
        features = encode_all_high_res(model, high_res_pixel_values)
        image_outputs = BaseModelOutputWithPooling(pooler_output=list(features))
        return {
            "input_ids": full_ids,
            "attention_mask": torch.ones_like(full_ids),
            "mm_encoder_outputs": {"image": image_outputs},
        }

    def set_patched(patched: bool) -> None:
        if patched and not is_patched(model):
            patch_model(model, n_fa=n_fa, threshold=args.threshold)
        elif not patched and is_patched(model):
            unpatch_model(model)

    def generate(key: str, clock: StepClock):
        # (c) encodes its high-res tiles inside the timed region, as a full high-res model would.
        inputs = {"a": low_res_inputs, "b": flex_inputs}[key] if key != "c" else full_high_res_inputs()
        return model.generate(
            **inputs,
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            do_sample=False,
            logits_processor=LogitsProcessorList([clock]),
            return_dict_in_generate=True,
        )

    prefill, decode, memory = ({key: [] for key in VARIANTS} for _ in range(3))
    state_memory = []  # (b)'s high-res state on the cache, part of its CPU memory figure
    with torch.inference_mode():
        for round_index in range(args.warmup + args.repeats):
            for key in VARIANTS:
                set_patched(key == "b")
                clock = StepClock(device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                synchronize(device)
                start = time.perf_counter()
                output = generate(key, clock)
                if round_index < args.warmup:
                    continue
                prefill[key].append((clock.times[0] - start) * 1e3)
                # The median step is robust to the odd stall of a shared machine; the mean would not be.
                decode[key].append(statistics.median(clock.step_times()) * 1e3)
                if device.type == "cuda":
                    memory[key].append(torch.cuda.max_memory_allocated(device) / 2**20)
                else:
                    kv = megabytes([(layer.keys, layer.values) for layer in output.cache.layers])
                    state = megabytes(getattr(output.cache, "flex_state", None))
                    memory[key].append(kv + state)
                    if key == "b":
                        state_memory.append(state)
        set_patched(True)
        trace = []
        model(**flex_inputs, flex_trace=trace)
    selected = [int(counts[0, 0]) for _, counts in trace]

    prompt_tokens = {
        "a": low_res_inputs["input_ids"].shape[1],
        "b": flex_inputs["input_ids"].shape[1],
        "c": full_ids.shape[1],
    }
    memory_name = "peak MB (with weights)" if device.type == "cuda" else "cache MB"
    print(f"hardware:     {hardware(device)}")
    print(
        f"software:     torch {torch.__version__}, transformers {transformers.__version__}, "
        f"hf_flexattention {hf_flexattention.__version__}, Python {platform.python_version()}"
    )
    print(f"model:        {description}, {str(dtype).split('.')[-1]} on {device}")
    print(
        f"flex:         n_fa={n_fa} of {num_layers} layers, threshold={args.threshold:.4f}; "
        f"{low_res_tokens} low-res and {high_res_tokens} high-res image tokens"
    )
    print(
        f"method:       greedy generate with KV cache, {args.new_tokens} new tokens; prefill = time to the first "
        f"token's scores, decode = median step; medians of {args.repeats} rounds after {args.warmup} discarded, "
        "variants interleaved"
    )
    print(
        f"selection:    (b) selected {statistics.mean(selected):.0f} of {high_res_tokens} high-res tokens per layer "
        f"on average ({statistics.mean(selected) / high_res_tokens:.1%}; min {min(selected)}, max {max(selected)}) "
        "for the first answer row"
    )
    if device.type != "cuda":
        print(
            f"memory:       on CPU, {memory_name} = keys and values of the generate cache after {args.new_tokens} "
            f"tokens, plus the high-res state that (b) keeps on it ({statistics.median(state_memory):.2f} MB: "
            "features, RoPE tables, projected high-res K/V)"
        )
    print()

    def cell(values: dict, key: str, digits: int) -> list[str]:
        value = statistics.median(values[key])
        ratios = [value / statistics.median(values[base]) for base in ("a", "c")]
        return [f"{value:.{digits}f}"] + [f"{ratio:.2f}x" for ratio in ratios]

    header = ["variant", "prompt tokens", "prefill ms", "vs (a)", "vs (c)", "decode ms/token", "vs (a)", "vs (c)"]
    header += [memory_name, "vs (a)", "vs (c)"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" if index == 0 else "---:" for index in range(len(header))) + "|")
    for key, name in VARIANTS.items():
        row = [f"({key}) {name}", str(prompt_tokens[key])]
        row += cell(prefill, key, 1) + cell(decode, key, 2) + cell(memory, key, 2)
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
