"""examples/train_visual_search.py end to end at a toy budget (the figures themselves come from the README's run)."""

import json

import torch

from .conftest import load_example


def test_three_variants_train_evaluate_and_report(tmp_path, capsys):
    example = load_example("train_visual_search")
    argv = ["--train-samples", "8", "--epochs", "1", "--batch-size", "4", "--pretrain-steps", "2"]
    argv += ["--eval-samples", "2", "--timed-samples", "1", "--output-dir", str(tmp_path)]
    argv += ["--save-flex", str(tmp_path / "flex")]
    assert example.main(argv) == 0
    results = {r["variant"]: r for r in json.loads((tmp_path / "results_validation.json").read_text())["results"]}
    assert sorted(results) == ["flex", "full_high_res", "low_res"]
    for result in results.values():
        assert 0 <= result["mc_accuracy"] <= 1 and 0 <= result["free_accuracy"] <= 1
        assert result["seconds_per_sample"] > 0 and result["train_seconds"] > 0
    flex = results["flex"]
    assert sorted(flex["hit_rate"]) == ["2", "3"] and 0 < flex["selected_fraction"] <= 1
    # hf_flexattention.cost: FlexAttention sits between the low-res and the full high-res model.
    gflops = [results[v]["gflops_per_sample"] for v in ("low_res", "flex", "full_high_res")]
    assert gflops == sorted(gflops)
    assert "| flex |" in capsys.readouterr().out
    assert (tmp_path / "flex" / "model.safetensors").is_file()


def test_box_coverage():
    example = load_example("train_visual_search")
    selected = torch.zeros(24, 24, dtype=torch.bool)
    selected[10, 5] = True  # high-res token (row 10, column 5) covers pixels x [20, 24), y [40, 44) of a 96 px image
    assert example.box_coverage(selected.flatten(), (20, 40, 24, 44), 96) == 1.0
    assert example.box_coverage(selected.flatten(), (18, 40, 26, 44), 96) == 0.5
    assert example.box_coverage(selected.flatten(), (0, 0, 8, 8), 96) == 0.0
