"""Quantized bases (issue 12): bitsandbytes 4-bit/8-bit language models, QLoRA, and what patch_model refuses.

The tiny model is quantised here by bitsandbytes' CPU backend (0.50). Its hidden size is 64 rather than the usual
32: bitsandbytes' CPU 4-bit inference kernel needs layers with a multiple of 32 output features (k_proj has 2 heads
of 16 here). Every test runs on the CPU, and again on CUDA where a GPU is present (bitsandbytes' CUDA kernels).
"""

import os

import pytest
import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from torch import nn
from transformers import BitsAndBytesConfig, LlavaForConditionalGeneration, Trainer, TrainingArguments

from hf_flexattention import patch_model
from hf_flexattention.adapters import load_adapter, save_adapter
from hf_flexattention.data import LlavaConversationCollator, LlavaConversationDataset, write_colour_dataset
from hf_flexattention.quantization import dequantized_weight, high_res_projection, quantization_method
from hf_flexattention.tiny import build_tiny_llava, build_tiny_processor
from hf_flexattention.training import HighResRampCallback, lora_target_modules


bnb = pytest.importorskip("bitsandbytes", reason="the `quantization` extra (bitsandbytes) is not installed")

HIDDEN = 64
QUANTIZATIONS = {
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "fp4-double": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": True},
    "int8": {"load_in_8bit": True},
}
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bitsandbytes' CUDA path)")
DEVICES = ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)]


pytestmark = pytest.mark.usefixtures("quiet_and_single_threaded")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny64")
    build_tiny_llava(hidden_size=HIDDEN).save_pretrained(path)
    return path


def load_quantized(checkpoint, kind, device="cpu", dtype=torch.float32, **config):
    """The tiny checkpoint loaded with a `BitsAndBytesConfig` (fp32 compute unless said: exact comparisons)."""
    quantization = BitsAndBytesConfig(**QUANTIZATIONS[kind], bnb_4bit_compute_dtype=dtype, **config)
    model = LlavaForConditionalGeneration.from_pretrained(
        checkpoint, quantization_config=quantization, device_map=device, dtype=dtype
    )
    # Train mode: in eval mode without gradients bitsandbytes' CPU backend computes 4-bit layers with another
    # kernel (bf16 on CPUs with AVX512-BF16); training mode uses the dequantise-then-matmul path in fp32.
    return model.train()


def dequantised_twin(quantized, device):
    """The unquantized tiny model with every quantized layer's weight replaced by its dequantised weight: what the
    quantized model computes, as plain `nn.Linear`s (the reference for a patched quantized model)."""
    twin = build_tiny_llava(hidden_size=HIDDEN).to(device).train()
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
                twin.get_submodule(name).weight.copy_(dequantized_weight(module))
    return twin


def flex_attention_layers(model):
    return model.model.language_model.layers[2:]


# ----- hr projections of quantized layers -------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", list(QUANTIZATIONS))
def test_hr_projections_are_dequantised_copies(checkpoint, kind, device):
    model = load_quantized(checkpoint, kind, device)
    assert quantization_method(model) == "bitsandbytes"
    patch_model(model, n_fa=2)
    x = torch.randn(5, HIDDEN, device=device)
    for layer in flex_attention_layers(model):
        attention = layer.self_attn
        for name, source in (("hr_k_proj", attention.k_proj), ("hr_v_proj", attention.v_proj)):
            projection = getattr(attention, name)
            assert type(projection) is nn.Linear and projection.weight.dtype == torch.float32
            assert not projection.weight.requires_grad  # like the quantized weight it copies
            if kind == "int8":
                # The plain LLM.int8 dequantisation: row-wise int8 codes times their absmax over 127.
                expected = source.weight.data.float() * source.weight.SCB.float()[:, None] / 127
                torch.testing.assert_close(projection.weight, expected, atol=1e-7, rtol=1e-6)
            with torch.no_grad():
                if kind == "int8" and device == "cuda":
                    assert_within_int8_activation_error(projection, source, x)
                    continue
                # In training mode bitsandbytes computes x @ dequantised(W).T in fp32 (4-bit: dequantize_4bit;
                # 8-bit on CPU/without int8 tensor cores: the same dequantised weight), so the copy gives the same
                # numbers up to the summation order of two fp32 matmuls (~1e-7 on values of ~1).
                torch.testing.assert_close(projection(x), source(x), atol=1e-5, rtol=1e-5)


def assert_within_int8_activation_error(projection: nn.Linear, source: nn.Module, x: torch.Tensor) -> None:
    """LLM.int8 on CUDA also quantises the activations (after a cast to fp16, each row to int8 by its absmax; outlier
    columns stay fp16) and multiplies the int8 codes exactly: it differs from x @ dequantised(W).T by at most the
    activations' rounding (half an int8 step, plus fp16's 2^-11 on x and on W) times |W|, plus fp16's rounding of
    the output. The copy computes x @ dequantised(W).T itself, in fp32."""
    reference = x @ projection.weight.T
    torch.testing.assert_close(projection(x), reference, atol=1e-6, rtol=1e-5)
    half_step = x.abs().amax(-1, keepdim=True) / 127 / 2
    bound = (half_step + x.abs() * 2**-10) @ projection.weight.abs().T + reference.abs() * 2**-10 + 1e-5
    error = (source(x).float() - reference).abs()
    assert (error <= bound).all(), f"max error {error.max():.3g}, max bound {bound.max():.3g}"


def test_4bit_copy_is_within_quantisation_error_of_the_original(checkpoint):
    """Sanity against the unquantized weights: the copy is nf4's approximation of them, not packed bytes."""
    original = build_tiny_llava(hidden_size=HIDDEN)
    model = patch_model(load_quantized(checkpoint, "nf4"), n_fa=2)
    for index in (2, 3):
        copy = model.model.language_model.layers[index].self_attn.hr_k_proj.weight
        reference = original.model.language_model.layers[index].self_attn.k_proj.weight
        # nf4 has 16 levels per 64-value block scaled by the block's absmax: a relative error of ~10% of the
        # weights' scale; an unrelated or byte-copied matrix would be off by ~140% (or not the right shape).
        relative = (copy - reference).norm() / reference.norm()
        assert 0 < relative < 0.15, relative


@pytest.mark.skipif(
    not bnb.functional.has_avx512bf16(),
    reason="bitsandbytes repacks 4-bit weights for inference only on CPUs with AVX512-BF16",
)
def test_patching_after_cpu_inference_dequantises_the_repacked_weights(checkpoint, processor):
    """bitsandbytes repacks a 4-bit weight in place at the first no-grad eval forward on the CPU."""
    reference = patch_model(load_quantized(checkpoint, "nf4"), n_fa=2)
    model = load_quantized(checkpoint, "nf4").eval()
    with torch.no_grad():
        model(**processor(text=["USER: how many trees ? ASSISTANT:"], return_tensors="pt"))
    k_proj = model.model.language_model.layers[3].self_attn.k_proj
    assert k_proj.weight.quant_state.packing_format_for_cpu  # the case this test is about happened
    patch_model(model, n_fa=2)
    model.train()  # the fp32 dequantise-then-matmul path, to compare with the copies
    x = torch.randn(5, HIDDEN)
    for expected, actual in zip(flex_attention_layers(reference), flex_attention_layers(model), strict=True):
        attention = actual.self_attn
        with torch.no_grad():
            # The copy is what the layer now computes (exact up to fp32 summation order, as above)...
            torch.testing.assert_close(attention.hr_k_proj(x), attention.k_proj(x), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(attention.hr_v_proj(x), attention.v_proj(x), atol=1e-5, rtol=1e-5)
        # ... which is not bit for bit what it computed before inference: the repacking rounds the blocks' absmax
        # scales to bf16 (8 significant bits, relative error <= 2**-9), and undoing it keeps that rounding.
        for name in ("hr_k_proj", "hr_v_proj"):
            before = getattr(expected.self_attn, name).weight
            torch.testing.assert_close(getattr(attention, name).weight, before, atol=0, rtol=2**-8)


# No (int8, cuda) case: LLM.int8 on CUDA quantises the activations of every quantized layer (base layers included), so
# no model with plain layers computes its numbers; what the plugin owns there, the hr copies, is pinned by
# `test_hr_projections_are_dequantised_copies` (exact dequantised weights, outputs within the activation error bound).
@pytest.mark.parametrize(
    ("kind", "device"), [("nf4", "cpu"), pytest.param("nf4", "cuda", marks=NEEDS_CUDA), ("int8", "cpu")]
)
def test_patched_quantized_model_matches_its_dequantised_twin(checkpoint, batch_inputs, kind, device):
    """The whole FlexAttention forward, high-res rows included, against the same model written with plain layers."""
    model = patch_model(load_quantized(checkpoint, kind, device), n_fa=2)
    twin = patch_model(dequantised_twin(model, device), n_fa=2)
    inputs = batch_inputs.to(device)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    trace = []
    with torch.no_grad():
        expected = twin(**inputs, labels=labels)
        actual = model(**inputs, labels=labels, flex_trace=trace)
    assert all(int((counts > 0).sum()) > 0 for _, counts in trace)  # the high-res path ran
    # Both are fp32 computations on the same weights; bitsandbytes dequantises inside each layer and the twin holds
    # the dequantised weights, so only matmul summation order differs (~1e-6 relative through 4 layers).
    torch.testing.assert_close(actual.logits, expected.logits, atol=1e-4, rtol=1e-4)


# ----- order of prepare_model_for_kbit_training and patching ------------------------------------------------------


def test_patching_before_or_after_prepare_model_for_kbit_training_gives_the_same_model(checkpoint):
    # bf16 weights: prepare_model_for_kbit_training casts every unquantized bf16 weight (hr copies included) to fp32.
    first = prepare_model_for_kbit_training(
        patch_model(load_quantized(checkpoint, "nf4", dtype=torch.bfloat16), n_fa=2)
    )
    second = patch_model(
        prepare_model_for_kbit_training(load_quantized(checkpoint, "nf4", dtype=torch.bfloat16)), n_fa=2
    )
    for model in (first, second):
        projection = model.model.language_model.layers[3].self_attn.hr_v_proj
        assert projection.weight.dtype == torch.float32 and not projection.weight.requires_grad
    first_state, second_state = first.state_dict(), second.state_dict()
    assert first_state.keys() == second_state.keys()
    for name, value in first_state.items():
        assert torch.equal(value, second_state[name]), name


# ----- QLoRA end to end -------------------------------------------------------------------------------------------


def test_qlora_recipe_trains_reloads_and_generates(checkpoint, tmp_path, processor):
    """4-bit base, patch, prepare_model_for_kbit_training, LoRA, Trainer and ramp, adapter round trip, generate."""
    data = LlavaConversationDataset(write_colour_dataset(tmp_path / "data", num_samples=24, seed=0))
    collator = LlavaConversationCollator(build_tiny_processor())
    base = prepare_model_for_kbit_training(patch_model(load_quantized(checkpoint, "nf4"), n_fa=2))
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=lora_target_modules(),
        # The tiny model's random lm_head caps its logits near zero (see test_training.py); the hr copies are
        # full-precision, so they train in full as the official recipe does.
        modules_to_save=["hr_k_proj", "hr_v_proj", "lm_head"],
    )
    model = get_peft_model(base, lora)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_steps=18,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        dataloader_pin_memory=False,
        seed=0,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=data, data_collator=collator, callbacks=[HighResRampCallback()]
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["high_res_alpha"] for entry in trainer.state.log_history if "loss" in entry][-1] == 1.0
    # Seeded run, as in test_training.py: ~4.5 at first, well under 3.5 by the end; 0.8 nats is far above the
    # step-to-step noise.
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.8, losses
    trained_hr = model.base_model.model.model.language_model.layers[3].self_attn.hr_k_proj
    assert any("modules_to_save" in name for name, _ in trained_hr.named_parameters())

    save_adapter(model, tmp_path / "adapter")
    reloaded = load_adapter(load_quantized(checkpoint, "nf4"), tmp_path / "adapter")  # patched as recorded
    model.eval()
    reloaded.eval()
    prompt = processor(images=None, text=["USER: what color is the sign ? ASSISTANT:"], return_tensors="pt")
    with torch.no_grad():
        # Same 4-bit base weights, same adapter weights, same kernels: identical.
        assert torch.equal(reloaded(**prompt).logits, model(**prompt).logits)
    generated = [m.generate(**prompt, max_new_tokens=4, do_sample=False) for m in (model, reloaded)]
    assert torch.equal(*generated) and generated[0].shape[1] > prompt["input_ids"].shape[1]


# ----- what patch_model refuses -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["gptq", "awq", "hqq", "torchao", "fp8"])
def test_other_quantisation_methods_are_refused(method):
    model = build_tiny_llava()
    # What a GPTQ/AWQ/... model carries (its saved config's quantization_config); the layers need not be quantized
    # for the check, which runs before anything changes.
    model.config.quantization_config = {"quant_method": method, "bits": 4}
    with pytest.raises(ValueError, match=rf"'{method}'-quantized model: it supports no quantisation, or bitsandbytes"):
        patch_model(model, n_fa=2)
    assert type(model) is LlavaForConditionalGeneration  # unchanged


def test_an_unknown_projection_module_is_refused():
    class QuantLinear(nn.Module):  # a GPTQ-style layer: packed integer weights, no float `weight`
        def __init__(self):
            super().__init__()
            self.in_features, self.out_features = 32, 16
            self.register_buffer("qweight", torch.zeros(4, 16, dtype=torch.int32))
            self.weight = self.qweight
            self.bias = None

    with pytest.raises(ValueError, match="QuantLinear k_proj/v_proj: FlexAttention supports no quantisation"):
        high_res_projection(QuantLinear())


def test_patching_a_sharded_model_asks_to_patch_first(tmp_path):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    store = dist.FileStore(os.path.join(tmp_path, "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = build_tiny_llava()
        for layer in model.model.language_model.layers:
            fully_shard(layer)
        with pytest.raises(ValueError, match=r"already sharded by FSDP2 \(fully_shard\).*`patch_model` on the whole"):
            patch_model(model, n_fa=2)
    finally:
        dist.destroy_process_group()


def test_example_trains_qlora_on_a_4bit_checkpoint(checkpoint, tmp_path):
    from tests.conftest import load_example

    build_tiny_processor().save_pretrained(checkpoint)  # a --model folder has its processor
    train_lora = load_example("train_lora")
    output = tmp_path / "out"
    args = ["--model", str(checkpoint), "--load-in-4bit", "--output-dir", str(output), "--max-steps", "3"]
    args += ["--tiny-samples", "8", "--use-cpu", "--report-to", "none", "--logging-steps", "1"]
    result = train_lora.main(args)
    assert len(result["losses"]) == 3 and isinstance(result["answer"], str)
    assert (output / "adapter_model.safetensors").exists() and (output / "flex_attention.json").exists()
    with pytest.raises(ValueError, match="cannot be fine-tuned in full"):
        train_lora.parse_arguments(["--model", str(checkpoint), "--load-in-4bit", "--full"])
