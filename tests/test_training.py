"""Fine-tuning (issue 3, DESIGN.md 2.7 and 4.7): warm-up callback, gradient checkpointing, PEFT, Trainer, DDP."""

import json
import logging
import os
import subprocess
import sys
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import Trainer, TrainingArguments

from hf_flexattention import (
    FlexLlavaForConditionalGeneration,
    FlexLlavaNextForConditionalGeneration,
    FlexLlavaOnevisionForConditionalGeneration,
    is_patched,
    patch_model,
)
from hf_flexattention.adapters import load_adapter
from hf_flexattention.data import LlavaConversationCollator, LlavaConversationDataset, write_colour_dataset
from hf_flexattention.tiny import build_tiny_llava, build_tiny_processor
from hf_flexattention.training import (
    HighResRampCallback,
    find_flex_model,
    lora_target_modules,
    set_training_progress,
)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HIGH_RES = ["hr_k_proj", "hr_v_proj"]


pytestmark = pytest.mark.usefixtures("quiet_and_single_threaded")


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("colour")
    write_colour_dataset(folder, num_samples=40, seed=0)
    return folder


@pytest.fixture(scope="module")
def dataset(data_folder):
    return LlavaConversationDataset(os.path.join(data_folder, "data.json"))


@pytest.fixture(scope="module")
def image_dataset(data_folder):
    """16 samples, all with an image: every step then has high-res rows (and computes an alpha)."""
    with open(os.path.join(data_folder, "data.json")) as file:
        records = [record for record in json.load(file) if "image" in record][:16]
    return LlavaConversationDataset(records, image_folder=data_folder)


@pytest.fixture(scope="module")
def collator():
    return LlavaConversationCollator(build_tiny_processor())


@pytest.fixture(scope="module")
def batch(dataset, collator):
    """Three samples: two with images (one multi-turn), one text-only."""
    return collator([dataset[1], dataset[2], dataset[4]])


def flex_model(**patch_kwargs):
    return patch_model(build_tiny_llava(), **{"n_fa": 2, **patch_kwargs})


def lora_model(include_high_res=False, modules_to_save=tuple(HIGH_RES), init_lora_weights=True, **patch_kwargs):
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=lora_target_modules(include_high_res=include_high_res),
        modules_to_save=list(modules_to_save) or None,
        init_lora_weights=init_lora_weights,
    )
    return get_peft_model(flex_model(**patch_kwargs), config)


def training_args(path, **overrides):
    values = {
        "output_dir": str(path),
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "use_cpu": True,
        "dataloader_pin_memory": False,
        "seed": 0,
    }
    values.update(overrides)
    return TrainingArguments(**values)


def logged_losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def record_alpha(model):
    """Record the warm-up alpha at every forward of the patched model inside `model`."""
    flex = find_flex_model(model)
    seen = []
    flex.register_forward_pre_hook(lambda module, args: seen.append(module._flex_alpha()))
    return seen


def high_res_rows(model, batch):
    """How many high-res rows each FlexAttention layer had (the forward must exercise the high-res path)."""
    trace = []
    with torch.no_grad():
        model(**batch, flex_trace=trace)
    return [int((counts > 0).sum()) for _, counts in trace]


def flex_trainer(model, args, dataset, collator) -> Trainer:
    return Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        callbacks=[HighResRampCallback()],
    )


# ----- LoRA targets ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("include_high_res", [False, True])
def test_lora_targets_only_the_language_model(include_high_res):
    model = lora_model(include_high_res=include_high_res, modules_to_save=())
    wrapped = [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    assert wrapped and not any("vision_tower" in name or "multi_modal_projector" in name for name in wrapped)
    suffixes = {name.rsplit(".", 1)[1] for name in wrapped}
    expected = {"q_proj", "k_proj", "v_proj", "o_proj"} | (set(HIGH_RES) if include_high_res else set())
    assert suffixes == expected
    # 4 projections in each of the 4 layers, plus 2 hr projections in each of the 2 FlexAttention layers.
    assert len(wrapped) == 16 + (4 if include_high_res else 0)


@pytest.mark.parametrize("include_high_res", [False, True])
def test_patch_then_lora_trains_the_adapters_and_hr_projections(batch, include_high_res):
    model = lora_model(include_high_res=include_high_res, modules_to_save=() if include_high_res else HIGH_RES)
    model.train()
    assert all(rows > 0 for rows in high_res_rows(model, batch))
    model(**batch).loss.backward()
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert not any("vision_tower" in name for name in trainable)
    for layer in (2, 3):  # the FlexAttention layers
        for projection in HIGH_RES:
            prefix = f"layers.{layer}.self_attn.{projection}."
            grads = {name: p.grad for name, p in trainable.items() if prefix in name}
            assert grads, f"{prefix} is not trainable"
            # LoRA starts with B = 0, so A gets a zero gradient at the first step but B does not; modules_to_save
            # copies get a full gradient.
            assert any(grad is not None and grad.abs().sum() > 0 for grad in grads.values()), prefix
    lora_grads = [p.grad for name, p in trainable.items() if "lora_B" in name and "layers.3.self_attn.q_proj" in name]
    assert lora_grads and lora_grads[0].abs().sum() > 0


def test_get_peft_model_warns_nothing_a_user_cannot_act_on():
    """PEFT 0.21 reads the deprecated `is_gradient_checkpointing` in every `get_peft_model`."""
    model = flex_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_peft_model(model, LoraConfig(target_modules=lora_target_modules()))


def test_lora_then_patch_asks_to_patch_first():
    model = get_peft_model(build_tiny_llava(), LoraConfig(target_modules=lora_target_modules()))
    # Also the model inside the PeftModel: its attention already holds LoRA layers.
    for candidate in (model, model.get_base_model()):
        with pytest.raises(ValueError, match="patch_model` on the base Llava model first"):
            patch_model(candidate, n_fa=2)


def perturbed_adapter_model():
    """A LoRA model whose adapter and trainable hr copies are not the identity (as after training)."""
    model = lora_model(init_lora_weights=False)  # random A and B instead of B = 0
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad and any(p in name for p in HIGH_RES):
                parameter.add_(0.05 * torch.randn_like(parameter))
    return model.eval()


def test_adapter_round_trip_is_bit_identical(tmp_path, batch):
    model = perturbed_adapter_model()
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(flex_model(), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, expected)
        base_only = flex_model()(**batch).logits
    assert not torch.allclose(base_only, expected)  # the adapter changed something worth reloading

    prompt = {key: value[:1] for key, value in batch.items() if key != "labels"}
    keep = prompt["attention_mask"][0].bool()
    prompt["input_ids"], prompt["attention_mask"] = prompt["input_ids"][:, keep], prompt["attention_mask"][:, keep]
    generated = [m.generate(**prompt, max_new_tokens=4, do_sample=False) for m in (model, reloaded)]
    assert torch.equal(*generated)


def test_merge_and_unload_gives_a_plain_patched_model(batch):
    model = perturbed_adapter_model()
    with torch.no_grad():
        expected = model(**batch).logits
    merged = model.merge_and_unload()
    assert type(merged) is FlexLlavaForConditionalGeneration and is_patched(merged)
    assert not any(isinstance(module, BaseTunerLayer) for module in merged.modules())
    assert isinstance(merged.model.language_model.layers[3].self_attn.hr_k_proj, torch.nn.Linear)
    with torch.no_grad():
        actual = merged(**batch).logits
    # Merging computes (W + s*B@A) x instead of W x + s*B(A x): the same math rounded in another order, fp32
    # differences of ~1e-7 relative on logits of magnitude ~1. 1e-5 leaves room for that; a lost adapter or hr
    # copy would move logits by >1e-2 (checked above in the round-trip test: the base alone differs).
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


# ----- warm-up ----------------------------------------------------------------------------------------------------


def test_without_the_callback_alpha_is_one_and_alpha_zero_is_the_plain_model(batch):
    model = flex_model().train()
    seen = record_alpha(model)
    with torch.no_grad():
        full = model(**batch).logits
        set_training_progress(model, 0.0)
        blended_out = model(**batch).logits
        low_res_only = {k: v for k, v in batch.items() if k not in ("high_res_pixel_values", "original_image_sizes")}
        plain = model(**low_res_only).logits
        model.eval()  # outside training the progress is ignored
        evaluated = model(**batch).logits
    assert seen == [1.0, 0.0, 0.0, 1.0]  # recorded at every forward, also the low-res one
    # alpha = 0 writes the plain attention output back into the high-res rows: the same values, exactly.
    assert torch.equal(blended_out, plain)
    assert not torch.allclose(full, plain)
    assert torch.equal(evaluated, full)


def test_ramp_callback_alpha_values_and_logs(tmp_path, image_dataset, collator):
    # 16 image samples, batch 1, 2 accumulation steps: 8 optimizer steps per epoch, epoch k/8 before step k.
    model = flex_model(high_res_ramp=2.0)
    seen = record_alpha(model)
    args = training_args(
        tmp_path, per_device_train_batch_size=1, gradient_accumulation_steps=2, num_train_epochs=1, logging_steps=1
    )
    trainer = flex_trainer(model, args, image_dataset, collator)
    trainer.train()
    steps = len(image_dataset) // 2
    expected = [min(1.0, k / steps * 2.0) for k in range(steps)]  # 0, 0.25, 0.5, 0.75, 1, 1, 1, 1
    # Both micro-batches of an optimizer step share its alpha. Exact: k/8*2 is exact in binary floating point.
    assert seen == [alpha for alpha in expected for _ in range(2)]
    logged = [entry["high_res_alpha"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged == expected  # each step's alpha beside its loss
    assert expected[:5] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert model.flex_training_progress is None  # cleared at the end: alpha 1 again


def test_a_ramp_that_never_reaches_one_is_called_out(tmp_path, image_dataset, collator, caplog):
    """0.03 is a learning-rate warmup ratio, not a blend ramp: alpha would stay near 0.03 for the whole run."""
    model = flex_model(high_res_ramp=0.03)
    args = training_args(tmp_path, max_steps=1)
    with caplog.at_level(logging.WARNING):
        flex_trainer(model, args, image_dataset, collator).train()
    assert "flex_high_res_ramp=0.03 over 1 epoch(s): alpha only reaches 0.03 by the end of training" in caplog.text


def test_find_flex_model_unwraps_wrappers():
    model = flex_model()
    peft_model = get_peft_model(model, LoraConfig(target_modules=lora_target_modules()))

    class DataParallelLike(torch.nn.Module):  # DDP / accelerate keep the wrapped model as `.module`
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert find_flex_model(model) is model
    assert find_flex_model(peft_model) is model
    assert find_flex_model(DataParallelLike(peft_model)) is model
    with pytest.raises(ValueError, match="patch_model"):
        find_flex_model(build_tiny_llava())


def test_resuming_continues_the_alpha_and_the_loss_curve(tmp_path, image_dataset, collator):
    # 16 samples, batch 2: 8 steps per epoch; a ramp of 2 ramps alpha over the first 4 steps, across the resume point.
    def run(output_dir, resume=None):
        model = lora_model(high_res_ramp=2.0)
        seen = record_alpha(model)
        args = training_args(output_dir, max_steps=6, save_strategy="steps", save_steps=3)
        trainer = flex_trainer(model, args, image_dataset, collator)
        trainer.train(resume_from_checkpoint=resume)
        return logged_losses(trainer), seen

    losses, alphas = run(tmp_path / "full")
    assert alphas == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    resumed_losses, resumed_alphas = run(tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-3"))
    assert resumed_alphas == alphas[3:]
    # The resumed log history starts with the checkpoint's 3 entries. The checkpoint restores weights, optimizer,
    # scheduler, RNG and data position, so the same batches go through the same fp32 computation; 1e-6 only
    # absorbs a summation-order difference in Trainer's loss bookkeeping.
    assert len(resumed_losses) == 6
    assert resumed_losses[3:] == pytest.approx(losses[3:], abs=1e-6)


# ----- gradient checkpointing --------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(batch, use_reentrant):
    def loss_and_grads(checkpointing):
        model = flex_model().train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
            assert model.is_activation_checkpointing
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    loss, grads = loss_and_grads(False)
    gc_loss, gc_grads = loss_and_grads(True)
    assert all(rows > 0 for rows in high_res_rows(flex_model().train(), batch))
    # The recompute replays the same fp32 ops on the same inputs (selections are stored per layer, so layers re-run
    # in reverse order read the forward's selection): equal in practice; the tolerance only guards against a
    # kernel choosing another reduction order for the replay.
    torch.testing.assert_close(gc_loss, loss, atol=1e-6, rtol=1e-6)
    assert gc_grads.keys() == grads.keys()
    hr_grads = [name for name in grads if "hr_k_proj" in name or "hr_v_proj" in name]
    assert len(hr_grads) == 4 and all(grads[name].abs().sum() > 0 for name in hr_grads)
    for name in grads:
        torch.testing.assert_close(gc_grads[name], grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_gradient_checkpointing_in_trainer_gives_the_same_run(tmp_path, dataset, collator):
    def run(checkpointing):
        model = lora_model()
        args = training_args(tmp_path / str(checkpointing), max_steps=4, gradient_checkpointing=checkpointing)
        trainer = flex_trainer(model, args, dataset, collator)
        trainer.train()
        assert find_flex_model(model).is_activation_checkpointing == checkpointing
        trained = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
        return logged_losses(trainer), trained

    losses, weights = run(False)
    gc_losses, gc_weights = run(True)
    # As in the direct test above, over 4 optimizer steps (Adam amplifies nothing at this scale).
    assert gc_losses == pytest.approx(losses, abs=1e-5)
    for name in weights:
        torch.testing.assert_close(gc_weights[name], weights[name], atol=1e-5, rtol=1e-5, msg=name)


# ----- training --------------------------------------------------------------------------------------------------


def test_lora_training_lowers_the_loss(tmp_path, dataset, collator):
    # lm_head trains too: the tiny model's random output layer caps its logits near zero (attention LoRA alone
    # cannot take the loss far below log(vocab) = 4.56).
    model = lora_model(modules_to_save=HIGH_RES + ["lm_head"])
    args = training_args(tmp_path, max_steps=36, per_device_train_batch_size=4)
    trainer = flex_trainer(model, args, dataset, collator)
    trainer.train()
    losses = logged_losses(trainer)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    # Seeded run: ~4.4 at first, ~1.5 at the end. A margin of 1 nat is far above step-to-step noise (~0.3).
    assert last < first - 1.0, losses


def run_example(args, timeout=120, nproc=None, tmp_path=None):
    command = [sys.executable, os.path.join(REPO, "examples", "train_lora.py"), *args]
    if nproc is not None:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), *command[1:]]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=REPO)
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_example_trains_saves_reloads_and_generates(tmp_path):
    sys.path.insert(0, os.path.join(REPO, "examples"))
    try:
        import train_lora
    finally:
        sys.path.pop(0)
    output = tmp_path / "out"
    result = train_lora.main(["--output-dir", str(output), "--max-steps", "6", "--tiny-samples", "12"])
    assert (output / "adapter_model.safetensors").exists() and (output / "adapter_config.json").exists()
    assert result["losses"]  # logged every 5 steps by the example's tiny defaults
    assert isinstance(result["answer"], str)
    with open(output / "trainer_state.json") as file:
        assert json.load(file)["global_step"] == 6
    assert (output / "flex_attention.json").exists()  # the adapter records the base's FlexAttention settings


@pytest.mark.parametrize(
    "family, name, model_class",
    [
        ("llava_next", "LLaVA-NeXT", FlexLlavaNextForConditionalGeneration),
        ("llava_onevision", "LLaVA-OneVision", FlexLlavaOnevisionForConditionalGeneration),
    ],
)
def test_example_trains_any_resolution_models_saves_reloads_and_generates(tmp_path, capsys, family, name, model_class):
    sys.path.insert(0, os.path.join(REPO, "examples"))
    try:
        import train_lora
    finally:
        sys.path.pop(0)
    output = tmp_path / "out"
    argv = ["--model-type", family, "--output-dir", str(output), "--max-steps", "6", "--tiny-samples", "12"]
    result = train_lora.main(argv)
    assert f"Training the tiny random {name} model (built in code)" in capsys.readouterr().out
    assert (output / "adapter_model.safetensors").exists() and (output / "adapter_config.json").exists()
    assert result["losses"] and isinstance(result["answer"], str)
    with open(output / "trainer_state.json") as file:
        state = json.load(file)
    assert state["global_step"] == 6
    # The ramp callback ran: alpha = min(1, epoch * high_res_ramp) was logged (1 at the logged epoch 1.67).
    assert [entry["high_res_alpha"] for entry in state["log_history"] if "high_res_alpha" in entry]
    with open(output / "flex_attention.json") as file:
        recorded = json.load(file)["flex_settings"]
    # An any-resolution base: the released share of the tiny model's 4 layers, and no zoom (Llava's settings have
    # one).
    assert recorded["n_fa"] == 3 and "zoom" not in recorded
    script_args, _ = train_lora.parse_arguments(argv)
    reloaded = load_adapter(train_lora.load_base(script_args), output)
    assert type(reloaded.get_base_model()) is model_class


def test_example_says_what_it_does(tmp_path, capsys):
    sys.path.insert(0, os.path.join(REPO, "examples"))
    try:
        import train_lora
    finally:
        sys.path.pop(0)
    with pytest.raises(SystemExit) as exit_info:
        train_lora.parse_arguments(["--help"])
    help_text = capsys.readouterr().out
    assert exit_info.value.code == 0 and len(help_text.splitlines()) < 80
    assert "--high-res-ramp" in help_text and "--help-all lists every one" in help_text
    script_args, training_args = train_lora.parse_arguments([])
    line = train_lora.describe_run(script_args, training_args)
    assert "learning rate 0.01, 3 epochs (the tiny model's defaults unless set)" in line
    assert line.endswith(os.path.abspath(os.path.join("outputs", "flex-llava-lora")))
    script_args, training_args = train_lora.parse_arguments(["--model", "llava-hf/llava-1.5-7b-hf"])
    assert "learning rate 5e-05" in train_lora.describe_run(script_args, training_args)


@pytest.mark.slow
def test_example_runs_under_torchrun_with_two_cpu_processes(tmp_path):
    output = tmp_path / "out"
    result = run_example(
        ["--output-dir", str(output), "--max-steps", "4", "--tiny-samples", "16", "--logging-steps", "1"],
        nproc=2,
        tmp_path=tmp_path,
    )
    with open(output / "trainer_state.json") as file:
        state = json.load(file)
    # Real DDP: 2 processes x batch 4 cover the 16 samples in 2 steps, so 4 steps are 2 epochs (a single process,
    # or two processes training separately, would be at epoch 1).
    assert state["global_step"] == 4 and state["epoch"] == pytest.approx(2.0)
    assert (output / "adapter_model.safetensors").exists()
    assert result.stdout.count("(training answer:") == 1  # only rank 0 reloads and generates
    assert "find_unused_parameters=True was specified" not in result.stderr  # no warning a user cannot act on


def test_unused_high_res_projections_still_get_a_gradient(processor):
    """DDP without find_unused_parameters hangs if a step leaves a trainable parameter without a gradient."""
    model = patch_model(build_tiny_llava(), n_fa=2).train()
    batch = processor(text=["USER: how many trees ? ASSISTANT: two"], return_tensors="pt")
    model(**batch, labels=batch["input_ids"]).loss.backward()
    for layer in model.model.language_model.layers[2:]:
        for projection in (layer.self_attn.hr_k_proj, layer.self_attn.hr_v_proj):
            assert projection.weight.grad is not None
            assert not projection.weight.grad.any()


def test_each_layer_projects_the_union_of_the_answer_rows_only(processor):
    """Padding slots of the packed rows are not answer rows: in a batch, a sequence with one supervised token
    projects what it projects alone, not the selections of its padding slots (README, "How it stays cheap")."""
    from tests.conftest import make_image

    model = patch_model(build_tiny_llava(), n_fa=2)
    projected = []
    for layer in model.model.language_model.layers[2:]:
        layer.self_attn.hr_k_proj.register_forward_hook(lambda m, args, out: projected.append(args[0].shape[1]))
    prompts = ["USER: <image>\nwhat is in the image ? ASSISTANT: a", "USER: <image>\nwhat color ? ASSISTANT: red"]
    inputs = processor(images=[make_image(1), make_image(2)], text=prompts, padding=True, return_tensors="pt")
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[0, -1:] = inputs["input_ids"][0, -1:]  # one supervised token
    labels[1, -12:] = inputs["input_ids"][1, -12:]  # twelve

    def union_widths(batch, batch_labels):
        projected.clear()
        model(**batch, labels=batch_labels).loss.backward()
        return list(projected)

    alone = [union_widths({k: v[i : i + 1] for k, v in inputs.items()}, labels[i : i + 1]) for i in range(2)]
    together = union_widths(inputs, labels)
    assert alone[0] != alone[1]  # the two sequences' unions differ, so the check below means something
    assert together == [max(a, b) for a, b in zip(alone[0], alone[1], strict=True)]


@pytest.mark.slow
@pytest.mark.parametrize(
    "config, mode", [("ds_zero2.json", []), ("ds_zero3.json", ["--full"])], ids=["zero2-lora", "zero3-full"]
)
def test_example_runs_under_deepspeed_on_two_cpu_processes(tmp_path, config, mode):
    """The shipped DeepSpeed configs through `Trainer` (gloo). DeepSpeed is an optional extra (`.[deepspeed]`: a
    source build), so this runs where it is installed; CI does not install it."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install -e '.[deepspeed]')")
    args = ["--max-steps", "3", "--tiny-samples", "16", "--logging-steps", "1", "--use-cpu", *mode]
    runs = {}
    for name, extra in (("deepspeed", ["--deepspeed", os.path.join(REPO, "examples", config)]), ("ddp", [])):
        output = tmp_path / name
        result = run_example(["--output-dir", str(output), *args, *extra], timeout=600, nproc=2, tmp_path=tmp_path)
        assert result.stdout.count("(training answer:") == 1  # rank 0 reloaded what was saved and generated
        with open(output / "trainer_state.json") as file:
            runs[name] = [entry["loss"] for entry in json.load(file)["log_history"] if "loss" in entry]
    # The same data, weights and updates as DDP: the same losses at every step, up to the logged rounding (the log
    # keeps 4 significant digits) and the order in which the two reduce gradients (~1e-6 relative).
    assert len(runs["deepspeed"]) == len(runs["ddp"]) == 3
    assert runs["deepspeed"] == pytest.approx(runs["ddp"], abs=1e-3)
