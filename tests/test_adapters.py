"""Adapters remember the base they were trained on (issue 13.2): saved with their FlexAttention settings, loaded onto
a stock base patched accordingly, refused on a base whose layers do not match."""

import json
import logging

import pytest
import torch
from peft import LoraConfig, get_peft_model

from hf_flexattention import patch_model
from hf_flexattention.adapters import SETTINGS_FILE, adapter_settings, load_adapter, save_adapter
from hf_flexattention.hub import save_pretrained
from hf_flexattention.tiny import build_tiny_llava
from hf_flexattention.training import lora_target_modules


SETTINGS = {"n_fa": 2, "threshold": 0.3, "high_res_ramp": 4.0}


@pytest.fixture
def trained_adapter(tmp_path, single_inputs):
    """A LoRA adapter with hr projections trained in full, saved two ways; and the logits it gives."""
    peft_model = get_peft_model(
        patch_model(build_tiny_llava(), **SETTINGS),
        LoraConfig(r=4, target_modules=lora_target_modules(), modules_to_save=["hr_k_proj", "hr_v_proj"]),
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
        logits = peft_model.eval()(**single_inputs).logits
    save_adapter(peft_model, tmp_path / "recorded")
    peft_model.save_pretrained(tmp_path / "peft_only")  # PEFT's own save: no settings
    return tmp_path, logits


def test_saving_records_the_base_settings(trained_adapter, processor):
    folder, _ = trained_adapter
    record = json.loads((folder / "recorded" / SETTINGS_FILE).read_text())
    assert {name: record["flex_settings"][name] for name in SETTINGS} == SETTINGS
    assert not (folder / "peft_only" / SETTINGS_FILE).exists()
    peft_model = get_peft_model(patch_model(build_tiny_llava(), n_fa=1), LoraConfig(target_modules=r".*q_proj"))
    save_pretrained(peft_model, folder / "hub_helper")  # the Hub helpers record them too
    assert adapter_settings(folder / "hub_helper")["n_fa"] == 1


def test_an_adapter_patches_a_stock_base_as_it_was_trained(trained_adapter, single_inputs):
    folder, want = trained_adapter
    model = load_adapter(build_tiny_llava(), folder / "recorded").eval()
    base_config = model.get_base_model().config
    assert (base_config.flex_n_fa, base_config.flex_threshold, base_config.flex_high_res_ramp) == (2, 0.3, 4.0)
    with torch.no_grad():
        torch.testing.assert_close(model(**single_inputs).logits, want, atol=0, rtol=0)


def test_a_base_with_other_layers_is_refused_and_other_settings_are_logged(trained_adapter, caplog):
    folder, _ = trained_adapter
    with pytest.raises(ValueError, match=r"trained on a base with n_fa=2, this base has n_fa=3.*patch_model\(base"):
        load_adapter(patch_model(build_tiny_llava(), n_fa=3), folder / "recorded")
    with caplog.at_level(logging.WARNING):
        model = load_adapter(patch_model(build_tiny_llava(), n_fa=2, threshold=0.5), folder / "recorded")
    assert model.get_base_model().config.flex_threshold == 0.5
    assert "The adapter was trained with threshold=0.3; the base keeps its threshold=0.5." in caplog.text


def test_an_adapter_without_settings_needs_a_patched_base(trained_adapter, single_inputs):
    folder, want = trained_adapter
    with pytest.raises(ValueError, match=r"records no FlexAttention settings.*patch_model\(base, n_fa=\.\.\.\)"):
        load_adapter(build_tiny_llava(), folder / "peft_only")
    model = load_adapter(patch_model(build_tiny_llava(), **SETTINGS), folder / "peft_only").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**single_inputs).logits, want, atol=0, rtol=0)
