"""Fine-tune a FlexAttention Llava, LLaVA-NeXT or LLaVA-OneVision model with LoRA and `Trainer`, reload, generate.

With no arguments it runs end to end in a minute on a CPU: it builds the tiny random Llava model of
`hf_flexattention.tiny`, patches it, writes a small synthetic LLaVA-format dataset (coloured signs, "what color is
the sign ?" -> the colour word) into a temporary folder, trains a LoRA adapter with Trainer's progress bar, saves
the adapter to `--output-dir` (default `outputs/flex-llava-lora`), reloads it onto a freshly patched base model and
answers a question. Without `--model` the defaults suit that random tiny model (learning rate 1e-2, 3 epochs); with
`--model` they are `TrainingArguments`' own; the run prints which it uses. `--help` lists this script's flags,
`--help-all` every `TrainingArguments` flag as well:

    python examples/train_lora.py

`--model-type llava_next` (or `llava_onevision`) does the same with the tiny random LLaVA-NeXT (LLaVA-OneVision)
model of `hf_flexattention.tiny`: the prompt holds the base image's tokens, and the any-resolution crops made by
`FlexLlavaNextProcessor` (`FlexLlavaOnevisionProcessor`) are the high-res pool:

    python examples/train_lora.py --model-type llava_next
    python examples/train_lora.py --model-type llava_onevision

On real data (LLaVA's conversation JSON, e.g. `llava_v1_5_mix665k.json`, plus its image folder):

    python examples/train_lora.py --model llava-hf/llava-1.5-7b-hf --data data.json --image-folder images/ \\
        --output-dir llava-flex-lora --n-fa 23 --threshold 0.188 --bf16 --activation-checkpointing \\
        --per-device-train-batch-size 4 --gradient-accumulation-steps 8 --learning-rate 2e-4 --num-train-epochs 1

A `--model` checkpoint's type decides the family: `llava` / `flex_llava` (LLaVA-1.5), `llava_next` /
`flex_llava_next` (LLaVA-NeXT, e.g. llava-hf/llava-v1.6-mistral-7b-hf) or `llava_onevision` / `flex_llava_onevision`
(LLaVA-OneVision, e.g. llava-hf/llava-onevision-qwen2-7b-ov-hf); no `--zoom` for the last two: their crops are the
high-res view.

Every `TrainingArguments` flag works (`--max-steps`, `--save-steps`, `--report-to`, ...);
`--resume-from-checkpoint PATH` (or `last`) continues a run, warm-up included. The model is patched before LoRA
is added (`patch_model` refuses a PEFT model); LoRA targets the language model's attention only
(`lora_target_modules()`), and `hr_k_proj`/`hr_v_proj` are trained in full (`--high-res-projections save`, PEFT
`modules_to_save`), with LoRA (`lora`) or not at all (`frozen`). `--full` fine-tunes every language-model and
projector weight instead (vision tower frozen) and saves a complete FlexAttention checkpoint.
`HighResRampCallback` ramps the high-res blend in from 0 as the official recipe does
(`alpha = min(1, epoch * high_res_ramp)`; not the learning-rate `--warmup-steps`).

Several processes / machines. The script runs unchanged under torchrun or accelerate, which start one process
per device and let `Trainer` wrap the model in DDP (gloo on CPUs, NCCL on GPUs):

    torchrun --nproc_per_node 2 examples/train_lora.py                       # 2 CPU processes (gloo)
    torchrun --nnodes 2 --node_rank 0 --master_addr host0 --nproc_per_node 8 examples/train_lora.py ...
    accelerate launch --num_processes 8 examples/train_lora.py ...

For models that do not fit on one device per replica, shard them with DeepSpeed ZeRO or FSDP2 through `Trainer`'s
usual flags and the configs shipped beside this script (FlexAttention needs nothing special: the hr projections are
ordinary `nn.Linear`s of the decoder layers and shard with them; patching happens before sharding):

    torchrun --nproc_per_node 8 examples/train_lora.py ... --deepspeed examples/ds_zero2.json
    torchrun --nproc_per_node 8 examples/train_lora.py ... --full --deepspeed examples/ds_zero3.json
    torchrun --nproc_per_node 6 examples/train_lora.py ... --full --deepspeed examples/ds_zero3_offload.json
    torchrun --nproc_per_node 8 examples/train_lora.py ... --fsdp full_shard --fsdp-config examples/fsdp.json  # FSDP2
    accelerate launch --config_file examples/accelerate_fsdp.yaml examples/train_lora.py ...  # the same

DeepSpeed 0.19 runs ZeRO-2/3 on CPUs too (gloo): the tests run this script with `ds_zero2.json` and `ds_zero3.json`
(`--full`) on 2 CPU processes when DeepSpeed is installed. FSDP does not run on CPUs: accelerate turns it on only
for accelerator devices and would run plain DDP on CPUs, so the script refuses `--fsdp` without one. `fsdp.json` wraps
`LlamaDecoderLayer` (LLaVA-1.5/Vicuna); use `MistralDecoderLayer` / `Qwen2DecoderLayer` for those language models.
Under ZeRO-3 the base is loaded whole in each process and partitioned by `Trainer` (patching needs whole
`k_proj`/`v_proj`).

QLoRA: `--load-in-4bit` (or `--load-in-8bit`) loads `--model` with a bitsandbytes `BitsAndBytesConfig` (nf4, double
quantisation, bf16 compute on GPUs; the language model only, not the vision tower and projector), patches it (the hr
projections become full-precision copies of the dequantised `k_proj`/`v_proj`) and runs
`prepare_model_for_kbit_training` before LoRA.

The paper's authors trained the full model with DeepSpeed ZeRO-3 and CPU offload. A batch whose rows select no
high-res token still gives the hr projections a (zero) gradient, so the example runs DDP with
`ddp_find_unused_parameters=False` (no search for unused parameters, and no warning that it found none).
"""

import contextlib
import os
import sys
import tempfile
from dataclasses import dataclass, field


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a source checkout

import torch  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training  # noqa: E402
from transformers import AutoConfig, HfArgumentParser, Trainer, TrainingArguments  # noqa: E402

from hf_flexattention.adapters import load_adapter, write_adapter_settings  # noqa: E402
from hf_flexattention.data import (  # noqa: E402
    LlavaConversationCollator,
    LlavaConversationDataset,
    write_colour_dataset,
)
from hf_flexattention.loading import (  # noqa: E402
    FAMILIES,
    FAMILY_NAMES,
    FlexModel,
    FlexProcessor,
    apply_settings,
    load_flex_model,
    load_flex_processor,
)
from hf_flexattention.tiny import (  # noqa: E402
    build_tiny_llava,
    build_tiny_llava_next,
    build_tiny_llava_onevision,
    build_tiny_next_processor,
    build_tiny_onevision_processor,
    build_tiny_processor,
)
from hf_flexattention.training import HighResRampCallback, lora_target_modules  # noqa: E402


TINY_SEED = 0
MODEL_TYPES = FAMILIES
# The tiny random model of each family and the builder of its processor (without --model).
TINY_MODELS = {
    "llava": (build_tiny_llava, build_tiny_processor),
    "llava_next": (build_tiny_llava_next, build_tiny_next_processor),
    "llava_onevision": (build_tiny_llava_onevision, build_tiny_onevision_processor),
}


@dataclass
class ScriptArguments:
    """What to train and how to patch it (the `TrainingArguments` flags are accepted too)."""

    model: str | None = field(
        default=None,
        metadata={
            "help": "Llava, LLaVA-NeXT or LLaVA-OneVision checkpoint (hub id or folder); default: the tiny random "
            "model."
        },
    )
    model_type: str | None = field(
        default=None,
        metadata={
            "help": "Model family (llava: LLaVA-1.5). Picks the tiny model without "
            "--model (default llava); with --model the checkpoint's own type decides, and this must match it.",
            "choices": list(MODEL_TYPES),
        },
    )
    data: str | None = field(
        default=None, metadata={"help": "LLaVA conversation JSON; default: a synthetic dataset made in code."}
    )
    image_folder: str | None = field(
        default=None, metadata={"help": "Folder the JSON's image paths are relative to (default: the JSON's)."}
    )
    n_fa: int | None = field(
        default=None,
        metadata={"help": "FlexAttention layers at the top (default: a FlexAttention --model's own, else 23 of 32)."},
    )
    threshold: float | None = field(
        default=None, metadata={"help": "Selection threshold in [0, 1) (default: the --model's own, else 48/255)."}
    )
    zoom: int | None = field(
        default=None,
        metadata={"help": "High-res side over the vision tower's input side (LLaVA-1.5 only; default: own, else 3)."},
    )
    high_res_ramp: float | None = field(
        default=None,
        metadata={"help": "High-res blend ramp: alpha = min(1, epoch * ramp) (default: the --model's own, else 10)."},
    )
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA: load --model in 4-bit (bitsandbytes nf4)."})
    load_in_8bit: bool = field(default=False, metadata={"help": "Load --model in 8-bit (bitsandbytes LLM.int8)."})
    full: bool = field(default=False, metadata={"help": "Full fine-tuning (no LoRA); the vision tower stays frozen."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    high_res_projections: str = field(
        default="save",
        metadata={
            "help": "How hr_k_proj/hr_v_proj train with LoRA: 'save' (in full, modules_to_save), 'lora' or 'frozen'.",
            "choices": ["save", "lora", "frozen"],
        },
    )
    max_length: int = field(default=2048, metadata={"help": "Longest tokenised sample (image tokens included)."})
    padding_side: str = field(default="right", metadata={"help": "'right' or 'left'."})
    dtype: str = field(
        default="auto", metadata={"help": "Weights dtype: auto (bf16 on GPUs that have it, else fp32), float32, ..."}
    )
    tiny_samples: int = field(default=64, metadata={"help": "Size of the synthetic dataset (without --data)."})
    question: str = field(
        default="what color is the sign ?", metadata={"help": "Question asked about the first image at the end."}
    )


COMMON_TRAINING_FLAGS = (
    "--output-dir (default outputs/flex-llava-lora), --learning-rate, --num-train-epochs, --max-steps, "
    "--per-device-train-batch-size, --gradient-accumulation-steps, --bf16, --activation-checkpointing, "
    "--save-steps, --report-to, --resume-from-checkpoint PATH|last, --deepspeed, --fsdp"
)


def short_help() -> str:
    """This script's own flags, then the `TrainingArguments` flags most runs use (`--help-all` lists all ~250)."""
    script_only = HfArgumentParser(ScriptArguments, prog="train_lora.py", description=__doc__.split("\n\n")[0])
    return (
        f"{script_only.format_help()}\nTrainingArguments flags are accepted too, most often: {COMMON_TRAINING_FLAGS}."
        "\n--help-all lists every one.\n"
    )


def parse_arguments(argv: list[str] | None = None) -> tuple[ScriptArguments, TrainingArguments]:
    """Parse script and `TrainingArguments` flags; the defaults depend on whether a real `--model` is given."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = HfArgumentParser(
        (ScriptArguments, TrainingArguments), description=__doc__.split("\n\n")[0], prog="train_lora.py"
    )
    if "-h" in argv or "--help" in argv:
        print(short_help())
        raise SystemExit(0)
    if "--help-all" in argv:
        argv = ["--help"]
    tiny = not any(arg == "--model" or arg.startswith("--model=") for arg in argv)
    defaults = {
        "output_dir": os.path.join("outputs", "flex-llava-lora"),
        "per_device_train_batch_size": 4,
        "logging_steps": 10,
        "report_to": "none",
        "dataloader_pin_memory": torch.accelerator.is_available(),
        # Every trainable parameter gets a gradient at every step (a layer whose rows select no high-res token gives
        # its hr projections a zero one), so DDP need not search for unused ones (and warn that it found none).
        "ddp_find_unused_parameters": False,
    }
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available():
        # Under torchrun without GPUs, accelerate sets up gloo DDP only when told to use the CPU; otherwise every
        # process silently trains its own copy on the whole dataset.
        defaults["use_cpu"] = True
    if tiny:
        # The tiny model is random: a high learning rate and a few epochs show the loss falling within a minute.
        defaults.update(learning_rate=1e-2, num_train_epochs=3, logging_steps=5, save_strategy="no", seed=TINY_SEED)
    parser.set_defaults(**defaults)
    script_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    check_arguments(script_args, training_args)
    return script_args, training_args


def check_arguments(script_args: ScriptArguments, training_args: TrainingArguments) -> None:
    """Refuse combinations that would not do what they say."""
    if training_args.fsdp_config and not training_args.fsdp:
        raise ValueError(
            "--fsdp-config is ignored without --fsdp: pass --fsdp full_shard --fsdp-config ... to shard with FSDP2."
        )
    if training_args.fsdp and not torch.accelerator.is_available():
        raise ValueError(
            "--fsdp/--fsdp-config need GPUs (or other accelerators): accelerate turns FSDP on only for accelerator "
            "devices and would run plain DDP on CPUs. On CPUs shard with DeepSpeed instead: "
            "--deepspeed examples/ds_zero3.json."
        )
    quantized = script_args.load_in_4bit or script_args.load_in_8bit
    if script_args.load_in_4bit and script_args.load_in_8bit:
        raise ValueError("Pass one of --load-in-4bit and --load-in-8bit.")
    if quantized and script_args.model is None:
        raise ValueError("--load-in-4bit/--load-in-8bit quantise a --model checkpoint; the tiny model is in code.")
    if quantized and script_args.full:
        raise ValueError("A quantized base cannot be fine-tuned in full: drop --full to train LoRA adapters (QLoRA).")
    if quantized and (training_args.deepspeed or training_args.fsdp):
        raise ValueError("Quantized bases are trained with LoRA in data parallel here, not with DeepSpeed or FSDP.")


def describe_run(script_args: ScriptArguments, training_args: TrainingArguments) -> str:
    """One line saying what trains, with which defaults, and where the result goes."""
    family = model_type(script_args)
    tiny = "the tiny random model" if family == "llava" else f"the tiny random {FAMILY_NAMES[family]} model"
    model = script_args.model or f"{tiny} (built in code)"
    defaults = "the tiny model's" if script_args.model is None else "TrainingArguments'"
    mode = "full fine-tuning" if script_args.full else f"LoRA r={script_args.lora_r}"
    return (
        f"Training {model} with {mode}: learning rate {training_args.learning_rate:g}, "
        f"{training_args.num_train_epochs:g} epochs ({defaults} defaults unless set); writing to "
        f"{os.path.abspath(training_args.output_dir)}"
    )


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


def model_type(script_args: ScriptArguments) -> str:
    """The family to train: `--model-type`, else the tiny model's default (llava). (With `--model`, `load_base`
    checks it against the checkpoint's type.)"""
    return script_args.model_type or "llava"


def check_model_type(script_args: ScriptArguments) -> None:
    """Refuse a `--model-type` that is not the `--model` checkpoint's family (read from its config alone)."""
    if script_args.model is None or script_args.model_type is None:
        return
    checkpoint_type = AutoConfig.from_pretrained(script_args.model).model_type
    if checkpoint_type.removeprefix("flex_") != script_args.model_type:
        raise ValueError(
            f"--model-type {script_args.model_type} does not match --model {script_args.model!r}, a "
            f"{checkpoint_type!r} checkpoint: drop --model-type (the checkpoint's type decides) or pass a "
            f"{script_args.model_type} checkpoint."
        )


def load_base(script_args: ScriptArguments) -> FlexModel:
    """The patched base model (frozen LoRA base, or the model to fine-tune in full).

    A FlexAttention `--model` keeps its trained hr projections and its settings; a flag given on purpose overrides
    its setting (with a logged warning). A stock `--model`, or the tiny model of `--model-type`, is patched with the
    flags.
    """
    settings = {
        "n_fa": script_args.n_fa,
        "threshold": script_args.threshold,
        "zoom": script_args.zoom,
        "high_res_ramp": script_args.high_res_ramp,
    }
    if script_args.model is None:
        build = TINY_MODELS[model_type(script_args)][0]
        with whole_model_loading():
            return apply_settings(build(seed=TINY_SEED), settings)
    check_model_type(script_args)
    dtype = resolve_dtype(script_args.dtype)
    kwargs = {"dtype": dtype}
    if script_args.load_in_4bit or script_args.load_in_8bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=script_args.load_in_4bit,
            load_in_8bit=script_args.load_in_8bit,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            # The language model only, as LLaVA's own QLoRA recipe: the vision tower and projector stay as loaded.
            llm_int8_skip_modules=["model.vision_tower", "model.multi_modal_projector", "lm_head"],
        )
        # Each data-parallel process holds its whole quantized copy on its own device.
        # (TrainingArguments has made this process's accelerator current.)
        on_accelerator = torch.accelerator.is_available()
        kwargs["device_map"] = {"": torch.accelerator.current_device_index() if on_accelerator else "cpu"}
    # Under ZeRO-3, transformers would partition the weights while loading; patch_model needs whole k_proj/v_proj,
    # so the base is loaded whole and Trainer partitions it.
    with whole_model_loading():
        return load_flex_model(script_args.model, settings, **kwargs)


@contextlib.contextmanager
def whole_model_loading():
    """Load models unpartitioned even while a DeepSpeed ZeRO-3 `TrainingArguments` is alive."""
    from transformers.integrations import deepspeed

    config = deepspeed._hf_deepspeed_config_weak_ref() if deepspeed._hf_deepspeed_config_weak_ref else None
    deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if config is not None:
            deepspeed.set_hf_deepspeed_config(config)


def load_processor(script_args: ScriptArguments, model: FlexModel) -> FlexProcessor:
    """The processor for `model`: a `FlexLlavaProcessor` of its `flex_zoom`, or a `FlexLlavaNextProcessor` /
    `FlexLlavaOnevisionProcessor`."""
    zoom = getattr(model.config, "flex_zoom", None)  # LLaVA-NeXT and LLaVA-OneVision have none
    if script_args.model is None:
        build = TINY_MODELS[model_type(script_args)][1]
        return build() if zoom is None else build(zoom=zoom)
    return load_flex_processor(script_args.model, zoom=zoom)


def add_lora(model: FlexModel, script_args: ScriptArguments) -> PeftModel:
    """Wrap the patched model with LoRA on the language model's attention (patch first, then LoRA)."""
    modules_to_save = ["hr_k_proj", "hr_v_proj"] if script_args.high_res_projections == "save" else []
    if script_args.model is None:
        # The tiny model's random output layer caps its logits near zero (the loss could not fall below ~4.2 with
        # attention LoRA alone); a real model's lm_head already speaks the language and stays frozen.
        modules_to_save.append("lm_head")
    config = LoraConfig(
        r=script_args.lora_r,
        lora_alpha=script_args.lora_alpha,
        lora_dropout=script_args.lora_dropout,
        target_modules=lora_target_modules(include_high_res=script_args.high_res_projections == "lora"),
        modules_to_save=modules_to_save or None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def build_trainer(
    script_args: ScriptArguments, training_args: TrainingArguments, data_folder: str
) -> tuple[Trainer, LlavaConversationCollator, LlavaConversationDataset]:
    model = load_base(script_args)
    processor = load_processor(script_args, model)
    if script_args.data is None:
        data_path = write_colour_dataset(data_folder, num_samples=script_args.tiny_samples, seed=TINY_SEED)
    else:
        data_path = script_args.data
    dataset = LlavaConversationDataset(data_path, image_folder=script_args.image_folder)
    collator = LlavaConversationCollator(
        processor, max_length=script_args.max_length, padding_side=script_args.padding_side
    )
    if script_args.full:
        model.model.vision_tower.requires_grad_(False)
    else:
        if script_args.load_in_4bit or script_args.load_in_8bit:
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=training_args.activation_checkpointing
            )
        model = add_lora(model, script_args)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=processor,
        callbacks=[HighResRampCallback()],
    )
    return trainer, collator, dataset


def reload_and_generate(script_args: ScriptArguments, output_dir: str, collator, dataset) -> str:
    """Load what training saved onto a fresh base and answer `--question` about the first image of the data."""
    if script_args.full:
        with whole_model_loading():
            model = load_flex_model(output_dir)  # the saved FlexAttention checkpoint, as saved
    else:
        model = load_adapter(load_base(script_args), output_dir)  # the base patched as the adapter records
    model.eval()
    index = next((i for i in range(len(dataset)) if dataset.image_path(i) is not None), None)
    sample = dataset[index] if index is not None else None
    question = ("<image>\n" if sample is not None else "") + script_args.question
    prompt = collator.generation_prompt([{"from": "human", "value": question}])
    inputs = collator.processor(images=[sample.image] if sample else None, text=[prompt], return_tensors="pt")
    with torch.no_grad():
        # The reloaded model is whole and runs on this process alone: under a DeepSpeed ZeRO-3 run generate would
        # otherwise sync every step with the other processes (synced_gpus), which are not generating, and hang.
        output = model.generate(**inputs.to(model.device), max_new_tokens=8, do_sample=False, synced_gpus=False)
    answer = collator.processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    reference = next((turn["value"] for turn in sample.conversations if turn["from"] == "gpt"), None) if sample else ""
    print(f"\n{prompt!r} -> {answer.strip()!r} (training answer: {reference!r})")
    if script_args.model is None:
        print(
            "(The tiny model is random and trained for seconds: its answer shows the pipeline runs, not that it "
            "learned; pass --model and --data for a real fine-tune.)"
        )
    return answer


def main(argv: list[str] | None = None) -> dict:
    """Train, save, reload, generate; returns the training metrics and the answer (for tests)."""
    script_args, training_args = parse_arguments(argv)
    if training_args.process_index == 0:
        print(describe_run(script_args, training_args))
    with tempfile.TemporaryDirectory() as data_folder:
        trainer, collator, dataset = build_trainer(script_args, training_args, data_folder)
        if not script_args.full and trainer.is_world_process_zero():
            trainer.model.print_trainable_parameters()
        # `--resume-from-checkpoint last` resumes from the newest checkpoint in --output-dir.
        resume = training_args.resume_from_checkpoint
        result = trainer.train(resume_from_checkpoint=True if resume == "last" else resume)
        trainer.save_model(training_args.output_dir)  # the adapter (LoRA) or the whole model (--full); rank 0 only
        if not script_args.full and trainer.is_world_process_zero():
            write_adapter_settings(trainer.model, training_args.output_dir)  # flex_attention.json beside the adapter
        trainer.save_state()  # trainer_state.json: log history, global step, epoch
        trainer.accelerator.wait_for_everyone()
        answer = None
        if trainer.is_world_process_zero():
            answer = reload_and_generate(script_args, training_args.output_dir, collator, dataset)
        trainer.accelerator.wait_for_everyone()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"metrics": result.metrics, "losses": losses, "answer": answer}


if __name__ == "__main__":
    main()
