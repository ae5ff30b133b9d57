"""Latency, memory and per-step cost of FlexAttention next to its two baselines, on the same inputs, in one run.

(a) the stock Llava model: the low-res image tokens in the sequence (576 for LLaVA-1.5);
(b) the same model patched with FlexAttention: the same prompt, plus the high-res image outside the sequence;
(c) the "full high-res" model: the stock model with all M high-res tokens in the sequence (5184 for LLaVA-1.5).

Each variant runs greedy `generate` (dynamic KV cache, or with `--compile` a static cache and compiled decoding on
both sides). Prefill is the time until the first token's scores are ready (image encoding included: the low-res
image for (a), it and the zoom x zoom high-res tiles for (b), the tiles for (c)); decode is the median time of the
further steps. Memory is the peak allocated on CUDA, or on the CPU the KV cache plus the state FlexAttention keeps.
Per decode step the table also counts host syncs and operators (`hf_flexattention.counting`): aten ops on the CPU,
CUDA kernel launches on a GPU. Warm-up rounds are discarded, variants take turns within each round, the table
reports medians over rounds, and ratios are taken within one run.

    python examples/benchmark.py                                        # a tiny model built in code (CPU)
    python examples/benchmark.py --shape tiny-llava --threads 1         # LLaVA-1.5's image geometry, small LM
    python examples/benchmark.py --shape llava-1.5-7b --batch-size 1 8  # exact 7B shapes, random weights (GPU)
    python examples/benchmark.py --shape llava-1.5-7b --compile         # static cache + torch.compile, both sides
    python examples/benchmark.py --model llava-hf/llava-1.5-7b-hf --image photo.jpg --prompt "What is written?"
"""

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time
from itertools import pairwise


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a source checkout

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import (  # noqa: E402
    CompileConfig,
    LlavaForConditionalGeneration,
    LogitsProcessor,
    LogitsProcessorList,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling  # noqa: E402

import hf_flexattention  # noqa: E402
from hf_flexattention import is_patched, patch_model, unpatch_model  # noqa: E402
from hf_flexattention.counting import decode_step_counts  # noqa: E402
from hf_flexattention.demo import DTYPES, build_prompt, make_test_image  # noqa: E402
from hf_flexattention.high_res import encode_high_res_features  # noqa: E402
from hf_flexattention.loading import apply_settings, flex_settings, load_flex_model, load_flex_processor  # noqa: E402
from hf_flexattention.shapes import SHAPES, shaped_llava_config  # noqa: E402
from hf_flexattention.tiny import build_tiny_llava, build_tiny_processor  # noqa: E402


VARIANTS = {"a": "stock, low-res tokens", "b": "FlexAttention", "c": "stock, all high-res tokens"}
REAL_PROMPT = "Describe the image in detail."
# A prompt in the tiny models' vocabulary (`hf_flexattention.tiny`).
TINY_PROMPT = "USER: <image>\nwhat color is the text on the sign ? ASSISTANT:"
# Shapes built in code: the tiny model of the tests, the same with LLaVA-1.5's image geometry (336 px / patch 14),
# and released checkpoints in their exact shapes (random weights: build them on a GPU).
TINY_SHAPES = {
    "tiny": {"num_layers": 4, "hidden_size": 32, "num_heads": 4, "num_kv_heads": 2},
    "tiny-llava": {
        "num_layers": 8,
        "hidden_size": 256,
        "num_heads": 8,
        "num_kv_heads": 8,
        "image_size": 336,
        "patch_size": 14,
    },
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see `--help`); every bad value stops here, before any model is built."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        help="a Llava checkpoint (Hub id or folder) instead of a shape built in code: a FlexAttention checkpoint "
        "keeps its trained hr projections and settings (flags override them, with a warning), a stock one is patched",
    )
    parser.add_argument(
        "--shape", choices=[*TINY_SHAPES, *SHAPES], default="tiny", help="model built in code (default: tiny)"
    )
    parser.add_argument("--image", help="image file (default: drawn test images, one per sequence)")
    parser.add_argument("--prompt", help="--model: question, or a full prompt holding <image>")
    parser.add_argument("--text-tokens", type=int, default=40, help="7B/13B shapes: non-image prompt tokens")
    parser.add_argument("--n-fa", type=int, help="FlexAttention layers (default: the released 23-of-32 share)")
    parser.add_argument("--selection", choices=("threshold", "topk"), help="default: threshold (the paper)")
    parser.add_argument("--threshold", type=float, help="threshold selection, in [0, 1) (default: 48/255)")
    parser.add_argument("--topk-ratio", type=float, help="budget: fraction of high-res tokens kept (default: 0.1)")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1], help="one table row set per batch size")
    parser.add_argument("--compile", action="store_true", help="static cache and compiled decoding on both sides")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: float16 on CUDA, else float32")
    parser.add_argument("--repeats", type=int, default=5, help="measured rounds (the median is reported)")
    parser.add_argument("--warmup-rounds", type=int, default=1, help="discarded rounds before measuring")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens generated per round (>= 4)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.new_tokens < 4 or args.repeats < 1 or args.warmup_rounds < 0 or args.text_tokens < 1:
        parser.error("need --new-tokens >= 4, --repeats >= 1, --warmup-rounds >= 0 and --text-tokens >= 1")
    if min(args.batch_size) < 1:
        parser.error(f"--batch-size must be >= 1, got {min(args.batch_size)}")
    if args.model is not None and (args.image is None) != (args.prompt is None):
        parser.error("--model takes --image FILE and --prompt TEXT together (or neither: a drawn image)")
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    if args.compile:
        problem = compiler_problem(args.device)
        if problem:
            parser.error(f"--compile needs a working torch.compile backend on {args.device}: {problem}")
    return args


def compiler_problem(device: torch.device) -> str | None:
    """Why `torch.compile` (inductor) cannot run on `device`, or None: a one-line function compiled first."""
    try:
        compiled = torch.compile(lambda x: x * 2 + 1, backend="inductor", fullgraph=True)
        compiled(torch.ones(4, device=device))
    except Exception as error:  # noqa: BLE001 (any failure means the same thing here)
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return None


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


def test_images(count: int) -> list[Image.Image]:
    """Distinct drawn images of different shapes (a batch of one image repeated would share its state)."""
    images = []
    for index in range(count):
        image = make_test_image(120 + 16 * index, 80 + 8 * (index % 3))
        noise = np.random.default_rng(index).integers(0, 24, (image.height, image.width, 3), dtype=np.uint8)
        images.append(Image.fromarray(np.asarray(image) - noise))
    return images


@dataclasses.dataclass
class Setup:
    model: LlavaForConditionalGeneration
    make_inputs: object  # batch size -> the (b) inputs
    description: str


def load(args: argparse.Namespace, dtype: torch.dtype) -> Setup:
    """The stock model and a function that builds the inputs of a batch."""
    device = args.device
    settings = {"n_fa": args.n_fa, "selection": args.selection, "threshold": args.threshold}
    settings["topk_ratio"] = args.topk_ratio
    if args.model is not None:
        model = load_flex_model(args.model, settings, families=("llava",), dtype=dtype, device_map=device)
        processor = load_flex_processor(args.model, zoom=model.config.flex_zoom)
        prompt = build_prompt(processor, args.prompt or REAL_PROMPT)
        image = None
        if args.image is not None:
            with Image.open(args.image) as opened:
                image = opened.convert("RGB")

        def make_inputs(batch: int) -> dict:
            images = [image] * batch if image is not None else test_images(batch)
            return processor(images=images, text=[prompt] * batch, return_tensors="pt").to(device, dtype=dtype)

        return Setup(model.eval(), make_inputs, args.model)

    if args.shape in TINY_SHAPES:
        shape = TINY_SHAPES[args.shape]
        model = apply_settings(build_tiny_llava(dtype=dtype, **shape).to(device), settings)
        size = shape.get("image_size", 32), shape.get("patch_size", 4)
        processor = build_tiny_processor(image_size=size[0], patch_size=size[1])
        text = model.config.text_config
        description = (
            f"{args.shape}: a random Llava built in code ({text.num_hidden_layers} layers, hidden "
            f"{text.hidden_size}, {text.num_attention_heads} heads; {size[0]} px / patch {size[1]})"
        )

        def make_inputs(batch: int) -> dict:
            inputs = processor(images=test_images(batch), text=[TINY_PROMPT] * batch, return_tensors="pt")
            return inputs.to(device, dtype=dtype)

        return Setup(model, make_inputs, description)

    config = shaped_llava_config(args.shape)
    with torch.device(device):
        model = apply_settings(LlavaForConditionalGeneration._from_config(config, dtype=dtype), settings)
    pixels_of = build_tiny_processor(image_size=336, patch_size=14)  # LLaVA-1.5's image preprocessing geometry
    generator = torch.Generator().manual_seed(0)

    def make_inputs(batch: int) -> dict:
        pixels = pixels_of(images=test_images(batch), text=[TINY_PROMPT] * batch, return_tensors="pt")
        image_token = config.image_token_id
        text = torch.randint(3, image_token, (batch, args.text_tokens), generator=generator)
        image = torch.full((batch, config.image_seq_length), image_token)
        input_ids = torch.cat([torch.ones(batch, 1, dtype=torch.long), text[:, :4], image, text[:, 4:]], dim=1)
        return {
            "input_ids": input_ids.to(device),
            "attention_mask": torch.ones_like(input_ids, device=device),
            "pixel_values": pixels["pixel_values"].to(device, dtype),
            "high_res_pixel_values": pixels["high_res_pixel_values"].to(device, dtype),
            "original_image_sizes": pixels["original_image_sizes"].to(device),
        }

    description = f"{args.shape} ({SHAPES[args.shape][0]}'s exact shapes, random weights built on {device})"
    return Setup(model.eval(), make_inputs, description)


def full_high_res_inputs(model: LlavaForConditionalGeneration, inputs: dict, high_res_tokens: int) -> dict:
    """(c): every sequence's run of image tokens replaced by its M high-res features (encoded here: timed)."""

    def encode_tiles(tiles: torch.Tensor) -> torch.Tensor:
        outputs = model.model.get_image_features(
            pixel_values=tiles.to(model.dtype),
            vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
            return_dict=True,
        )
        return torch.stack(list(outputs.pooler_output))

    features = encode_high_res_features(
        encode_tiles, inputs["high_res_pixel_values"], model.config.vision_config.image_size
    )
    ids = inputs["input_ids"]
    is_image = ids == model.config.image_token_id
    first = int(is_image[0].nonzero()[0, 0])
    count = int(is_image[0].sum())
    image = torch.full((ids.shape[0], high_res_tokens), model.config.image_token_id, device=ids.device)
    full_ids = torch.cat([ids[:, :first], image, ids[:, first + count :]], dim=1)
    return {
        "input_ids": full_ids,
        "attention_mask": torch.ones_like(full_ids),
        "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=list(features))},
    }


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


def mebibytes(value) -> float:
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


class Runner:
    """One patched model switched between stock and patched, each with its own compiled decoding when `--compile`.

    While the model runs stock, its (possibly trained) hr projections wait on the CPU, and come back when it is
    patched again with its own settings.
    """

    def __init__(self, model, args: argparse.Namespace):
        self.model, self.args = model, args
        self.settings = flex_settings(model)
        self.high_res: dict[str, torch.Tensor] = {}
        self.compiled_calls: dict[bool, object] = {}
        self.generate_kwargs = {"do_sample": False}
        if args.compile:
            config = CompileConfig(fullgraph=True, mode="reduce-overhead" if args.device.type == "cuda" else None)
            config._compile_all_devices = args.device.type != "cuda"  # generate compiles on accelerators only
            self.generate_kwargs.update(cache_implementation="static", compile_config=config)

    def use(self, patched: bool) -> None:
        model = self.model
        if patched == is_patched(model):
            return
        if hasattr(model, "_compiled_call"):  # each class gets its own compiled graph, made once
            self.compiled_calls[not patched] = model._compiled_call
            del model._compiled_call
        if patched:
            patch_model(model, **self.settings)
            unexpected = model.load_state_dict(self.high_res, strict=False).unexpected_keys
            assert not unexpected, unexpected
        else:
            self.high_res = {name: value.cpu() for name, value in model.state_dict().items() if ".hr_" in name}
            unpatch_model(model)
        if patched in self.compiled_calls:
            model._compiled_call = self.compiled_calls[patched]

    def generate(self, inputs: dict, tokens: int, clock: StepClock | None = None):
        kwargs = dict(self.generate_kwargs, max_new_tokens=tokens, min_new_tokens=tokens)
        if clock is not None:
            kwargs["logits_processor"] = LogitsProcessorList([clock])
        return self.model.generate(**inputs, return_dict_in_generate=True, **kwargs)


def measure(runner: Runner, inputs: dict, args: argparse.Namespace) -> dict[str, dict]:
    """Time and memory of each variant (medians over rounds), counts per decode step, and (b)'s selection."""
    device, model = args.device, runner.model
    high_res_tokens = inputs["high_res_pixel_values"].shape[-1] ** 2 // model.config.vision_config.patch_size**2
    low_res_inputs = {key: inputs[key] for key in ("input_ids", "attention_mask", "pixel_values")}
    results = {key: {"prefill": [], "decode": [], "memory": []} for key in VARIANTS}
    with torch.inference_mode():
        full_inputs = full_high_res_inputs(model, inputs, high_res_tokens)  # to read its prompt length
        for round_index in range(args.warmup_rounds + args.repeats):
            for key in VARIANTS:
                runner.use(key == "b")
                clock = StepClock(device)
                # The previous variant's output holds its cache (and state): freed first, or it counts in this peak.
                output = None
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                synchronize(device)
                start = time.perf_counter()
                # (c) encodes its high-res tiles inside the timed region, as a full high-res model would.
                variant_inputs = {"a": low_res_inputs, "b": inputs}.get(key) or full_high_res_inputs(
                    model, inputs, high_res_tokens
                )
                output = runner.generate(variant_inputs, args.new_tokens, clock)
                if round_index < args.warmup_rounds:
                    continue
                results[key]["prefill"].append((clock.times[0] - start) * 1e3)
                # The median step is robust to the odd stall of a shared machine; the mean would not be.
                results[key]["decode"].append(statistics.median(clock.step_times()) * 1e3)
                if device.type == "cuda":
                    results[key]["memory"].append(torch.cuda.max_memory_allocated(device) / 2**30)
                else:
                    kv = mebibytes([(layer.keys, layer.values) for layer in output.past_key_values.layers])
                    results[key]["memory"].append(kv + mebibytes(getattr(output.past_key_values, "flex_state", None)))
    print(f"  timed rounds done ({time.strftime('%X')})", file=sys.stderr, flush=True)
    variant_inputs = {"a": low_res_inputs, "b": inputs, "c": full_inputs}
    for key in VARIANTS:
        runner.use(key == "b")
        results[key]["counts"] = decode_step_counts(model, variant_inputs[key], **runner.generate_kwargs)
        results[key]["prompt"] = variant_inputs[key]["input_ids"].shape[1]
    print(f"  decode steps counted ({time.strftime('%X')})", file=sys.stderr, flush=True)
    runner.use(True)
    trace = []
    with torch.inference_mode():
        model(**inputs, flex_trace=trace)
    selected = torch.cat([counts.flatten().float() for _, counts in trace])
    results["b"]["selected"] = (selected.mean().item() / high_res_tokens, selected.min().item(), selected.max().item())
    return results


def table(all_results: dict[int, dict], cuda: bool) -> str:
    """The markdown table: one row per batch size and variant, ratios to (a) and (c) of the same batch size."""
    memory = "peak GiB" if cuda else "cache+state MiB"
    count = "kernels/step" if cuda else "aten ops/step"
    header = ["batch", "variant", "prompt tokens", "prefill ms", "vs (a)", "vs (c)", "decode ms/token"]
    header += ["vs (a)", "vs (c)", memory, "vs (a)", "vs (c)", "syncs/step", count, "vs (a)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---:"] * len(header)) + "|"]
    for batch, results in all_results.items():
        for key, name in VARIANTS.items():
            row = [str(batch), f"({key}) {name}", str(results[key]["prompt"])]
            for metric, digits in (("prefill", 1), ("decode", 2), ("memory", 2)):
                value = statistics.median(results[key][metric])
                ratios = [value / statistics.median(results[base][metric]) for base in ("a", "c")]
                row += [f"{value:.{digits}f}", *(f"{ratio:.2f}x" for ratio in ratios)]
            counts = results[key]["counts"]
            operators = counts.kernels if cuda else counts.ops
            stock = results["a"]["counts"].kernels if cuda else results["a"]["counts"].ops
            syncs = counts.syncs + (counts.device_syncs or 0)
            row += [str(syncs), str(operators), f"{operators / stock:.2f}x"]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the hardware, versions and a markdown table."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if args.device.type == "cuda" else torch.float32)
    setup = load(args, dtype)
    runner = Runner(setup.model, args)
    all_results = {}
    for batch in args.batch_size:
        start = time.perf_counter()
        all_results[batch] = measure(runner, setup.make_inputs(batch), args)
        # Progress on stderr (stdout keeps one table): a run stopped early still shows what it measured.
        print(f"batch {batch} measured in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        print(table({batch: all_results[batch]}, args.device.type == "cuda"), file=sys.stderr, flush=True)

    config = setup.model.config
    grid = config.low_res_grid
    zoom = config.flex_zoom
    selection = (
        f"threshold {config.flex_threshold:.4f}"
        if config.flex_selection == "threshold"
        else f"{config.flex_selection} (topk_ratio={config.flex_topk_ratio}, random_p={config.flex_random_p})"
    )
    print(f"hardware:  {hardware(args.device)}")
    print(
        f"software:  torch {torch.__version__}, transformers {transformers.__version__}, "
        f"hf_flexattention {hf_flexattention.__version__}, Python {platform.python_version()}"
    )
    print(f"model:     {setup.description}, {str(dtype).split('.')[-1]} on {args.device}")
    print(
        f"flex:      n_fa={config.flex_n_fa} of {config.text_config.num_hidden_layers} layers, {selection}; "
        f"{grid * grid} low-res and {(zoom * grid) ** 2} high-res image tokens per image"
    )
    decoding = "static cache, compiled decoding (torch.compile, fullgraph)" if args.compile else "dynamic KV cache"
    print(
        f"method:    greedy generate, {decoding}, {args.new_tokens} new tokens; prefill = time to the first token's "
        f"scores, decode = median step; medians of {args.repeats} rounds after {args.warmup_rounds} discarded, "
        "variants interleaved; syncs and operators counted for one decode step"
    )
    for batch, results in all_results.items():
        share, low, high = results["b"]["selected"]
        print(
            f"selection: batch {batch}: (b) selected {share:.1%} of the high-res tokens per row and layer on average "
            f"(min {low:.0f}, max {high:.0f} tokens)"
        )
    print()
    print(table(all_results, args.device.type == "cuda"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
