"""Sharded training (issue 12): FSDP2 on 2 CPU processes (gloo) matches one process, and its checkpoints reload.

tests/fsdp_worker.py trains LoRA and full fine-tuning for 3 steps, once in a single process and once sharded over 2
torchrun processes (each decoder layer, with its hr projections, then the root, `fully_shard`ed as accelerate's FSDP2
plugin wraps with `transformer_layer_cls_to_wrap`). `Trainer` itself cannot run FSDP on CPUs: accelerate 1.15 turns
FSDP on only for accelerator devices and runs plain DDP on CPUs (README, "Several processes"), which
examples/train_lora.py refuses.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from peft import PeftModel

from hf_flexattention import FlexLlavaForConditionalGeneration, patch_model
from hf_flexattention.adapters import load_adapter
from hf_flexattention.data import LlavaConversationCollator, LlavaConversationDataset, write_colour_dataset
from hf_flexattention.tiny import build_tiny_llava, build_tiny_processor


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "fsdp_worker.py")


def run_worker(output, nproc=None):
    command = [sys.executable, WORKER, str(output)]
    if nproc is not None:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), *command[1:]]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=REPO)
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=output)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    single, sharded = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("fsdp")
    run_worker(single)
    run_worker(sharded, nproc=2)
    return single, sharded


def losses(folder):
    with open(folder / "losses.json") as file:
        return json.load(file)


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    folder = tmp_path_factory.mktemp("batch")
    dataset = LlavaConversationDataset(write_colour_dataset(folder, num_samples=8, seed=1))
    return LlavaConversationCollator(build_tiny_processor())([dataset[i] for i in range(4)])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_fsdp_on_two_processes_matches_one_process(runs, mode):
    single, sharded = runs
    expected, actual = losses(single / mode), losses(sharded / mode)
    assert len(actual) == 3 and actual[-1] < actual[0]  # it trained
    # Same global batches and the same token-weighted loss; only fp32 reduction order differs (two half-batch
    # matmuls, padded to their own length, and an all-reduce instead of one pass): ~1e-7 relative per step,
    # amplified little by 3 Adam steps. 1e-5 absolute on losses of ~4.5.
    assert actual == pytest.approx(expected, abs=1e-5)


@pytest.mark.slow
def test_a_full_checkpoint_saved_under_fsdp_reloads_into_a_plain_patched_model(runs, batch):
    single, sharded = runs
    reference = FlexLlavaForConditionalGeneration.from_pretrained(single / "full").eval()
    model = FlexLlavaForConditionalGeneration.from_pretrained(sharded / "full").eval()
    with open(sharded / "full" / "config.json") as file:
        config = json.load(file)
    # Saved as the FlexAttention class, not FSDP2's on-the-fly FSDPFlexLlava... subclass (remote code intact).
    assert config["architectures"] == ["FlexLlavaForConditionalGeneration"]
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_flex_llava.FlexLlavaForConditionalGeneration"
    assert not any(name.startswith("_fsdp") for name in os.listdir(sharded / "full"))
    trained_hr = model.model.language_model.layers[3].self_attn.hr_k_proj.weight
    initial_hr = patch_model(build_tiny_llava(), n_fa=2).model.language_model.layers[3].self_attn.hr_k_proj.weight
    assert not torch.allclose(trained_hr, initial_hr)  # the trained hr projections were gathered and saved
    with torch.no_grad():
        # As the losses above: the same training up to fp32 reduction order.
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_a_lora_adapter_saved_under_fsdp_reloads_onto_a_stock_base(runs, batch):
    single, sharded = runs
    reference = load_adapter(build_tiny_llava(), single / "lora").eval()
    model = load_adapter(build_tiny_llava(), sharded / "lora").eval()  # patched as the adapter records
    assert isinstance(model, PeftModel)
    with torch.no_grad():
        base = patch_model(build_tiny_llava(), n_fa=2)(**batch).logits
        actual, expected = model(**batch).logits, reference(**batch).logits
    assert not torch.allclose(actual, base, atol=1e-3)  # the adapter (and trained hr copies) changed the model
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


# ----- examples/train_lora.py with the shipped configs --------------------------------------------------------------


def test_example_refuses_fsdp_on_cpus():
    from tests.conftest import load_example

    if torch.accelerator.is_available():
        pytest.skip("FSDP runs on this machine's accelerator; the refusal is for CPU-only machines")
    train_lora = load_example("train_lora")
    with pytest.raises(ValueError, match="accelerate turns FSDP on only for accelerator devices"):
        train_lora.parse_arguments(
            ["--fsdp", "full_shard", "--fsdp-config", os.path.join(REPO, "examples", "fsdp.json")]
        )
    with pytest.raises(ValueError, match="--fsdp-config is ignored without --fsdp"):
        train_lora.parse_arguments(["--fsdp-config", os.path.join(REPO, "examples", "fsdp.json")])
