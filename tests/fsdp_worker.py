"""Train the tiny patched model for a few steps, sharded with FSDP2 when started by torchrun, else in one process.

Run by tests/test_sharded_training.py: `python tests/fsdp_worker.py OUT` (the single-process reference) and
`torchrun --nproc_per_node 2 tests/fsdp_worker.py OUT` (2 CPU processes, gloo). For each of LoRA and full fine-tuning
it writes `OUT/<mode>/losses.json` (the global batch's loss at every step) and the trained weights as a plain
checkpoint (`save_pretrained`: the adapter, or the whole FlexAttention model).

Sharding is FSDP2's `fully_shard`, wrapped as accelerate's FSDP2 plugin does with `transformer_layer_cls_to_wrap`:
each language-model decoder layer (its hr projections shard with it), then the root. Each process takes its share
of every global batch of 4; its loss is weighted by its share of the global batch's supervised tokens, so the
gradient FSDP averages over processes is the gradient of the global batch's token-mean loss, as in one process.
"""

import json
import os
import sys


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

from hf_flexattention import patch_model  # noqa: E402
from hf_flexattention.adapters import write_adapter_settings  # noqa: E402
from hf_flexattention.data import LlavaConversationCollator, LlavaConversationDataset, write_colour_dataset  # noqa: E402
from hf_flexattention.tiny import build_tiny_llava, build_tiny_processor  # noqa: E402
from hf_flexattention.training import lora_target_modules  # noqa: E402


GLOBAL_BATCH = 4
STEPS = 3


def build(mode: str):
    model = patch_model(build_tiny_llava(), n_fa=2)
    if mode == "lora":
        config = LoraConfig(
            r=4, lora_alpha=8, target_modules=lora_target_modules(), modules_to_save=["hr_k_proj", "hr_v_proj"]
        )
        return get_peft_model(model, config)
    model.model.vision_tower.requires_grad_(False)
    return model


def shard(model) -> None:
    from torch.distributed.fsdp import fully_shard

    for module in model.modules():
        if type(module).__name__ == "LlamaDecoderLayer":
            fully_shard(module)
    fully_shard(model)


def train(mode: str, output: str, dataset, collator, rank: int, world: int) -> None:
    torch.manual_seed(0)
    model = build(mode).train()
    if world > 1:
        shard(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(STEPS):
        samples = [dataset[step * GLOBAL_BATCH + i] for i in range(GLOBAL_BATCH)]
        share = GLOBAL_BATCH // world
        local = collator(samples[rank * share : (rank + 1) * share])
        # Supervised tokens: labels shifted by one, as the loss counts them.
        counts = [int((collator(samples[i : i + 1])["labels"][:, 1:] != -100).sum()) for i in range(GLOBAL_BATCH)]
        local_tokens, total_tokens = sum(counts[rank * share : (rank + 1) * share]), sum(counts)
        loss = model(**local).loss * local_tokens / total_tokens
        (loss * world).backward()  # FSDP averages gradients over processes: times world, they sum
        optimizer.step()
        optimizer.zero_grad()
        logged = loss.detach().clone()
        if world > 1:
            dist.all_reduce(logged)
        losses.append(float(logged))

    folder = os.path.join(output, mode)
    if world > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # The full, unsharded state dict, gathered on rank 0 (what accelerate's FSDP2 save does).
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state_dict = get_model_state_dict(model, options=options)
    else:
        state_dict = model.state_dict()
    if rank == 0:
        model.save_pretrained(folder, state_dict=state_dict)
        if mode == "lora":
            write_adapter_settings(model, folder)
        with open(os.path.join(folder, "losses.json"), "w") as file:
            json.dump(losses, file)
    if world > 1:
        dist.barrier()


def main() -> None:
    output = sys.argv[1]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo")
    data_folder = os.path.join(output, f"data-{rank}")
    dataset = LlavaConversationDataset(write_colour_dataset(data_folder, num_samples=GLOBAL_BATCH * STEPS, seed=0))
    collator = LlavaConversationCollator(build_tiny_processor())
    for mode in ("lora", "full"):
        train(mode, output, dataset, collator, rank, world)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
