"""examples/train_visual_search.py end to end at a toy budget (the figures themselves come from the README's run)."""

import json

import pytest
import torch

from hf_flexattention import FlexLlavaForConditionalGeneration, FlexLlavaProcessor

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
    saved = tmp_path / "flex"
    assert (saved / "model.safetensors").is_file()
    task = json.loads((saved / "task.json").read_text())
    assert task["sample_kwargs"] == {"kind": "letter", "boxes": 1, "letter_clutter": 0.0, "letter_scale": 1}
    assert [r["variant"] for r in task["results"]] == ["flex", "low_res", "full_high_res"]
    assert "--save-flex" in task["command"]
    card = (saved / "README.md").read_text()
    assert "## Training and evaluation" in card and "| flex |" in card
    # Shipped inside the plugin: no remote-code copies of its modules, and no auto_map pointing at them.
    assert not list(saved.glob("*.py"))
    assert not any("auto_map" in path.read_text() for path in saved.glob("*.json"))
    model = FlexLlavaForConditionalGeneration.from_pretrained(saved)
    processor = FlexLlavaProcessor.from_pretrained(saved)
    assert model.config.flex_n_fa == 2 and processor.zoom == 3


def test_save_flex_needs_the_flex_variant(tmp_path):
    example = load_example("train_visual_search")
    with pytest.raises(SystemExit):
        example.main(["--variants", "low_res", "--save-flex", str(tmp_path / "flex")])


def test_every_variant_starts_from_the_same_weights():
    """Same seed, same initial weights (the projector re-initialised the same way in each), whatever the variant:
    the comparison measures the variants, not their initialisation."""
    example = load_example("train_visual_search")
    args = example.build_parser().parse_args([])
    processor = example.build_processor()
    image_token_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    models = {v: example.build_model(v, len(processor.tokenizer), image_token_id, args) for v in example.VARIANTS}
    reference = models["low_res"].state_dict()
    for variant, model in models.items():
        state = model.state_dict()
        for name, value in reference.items():
            assert torch.equal(state[name], value), (variant, name)
    # nn.Linear's own init (uniform in +-1/sqrt(fan_in), std 1/sqrt(3 fan_in) = 0.072 for the tower's 64 features),
    # not Llava's N(0, 0.02): see build_model. 4096 weights put the sample std within a few % of 0.072.
    linear_1 = models["low_res"].model.multi_modal_projector.linear_1.weight.detach()
    assert linear_1.abs().max() <= 64**-0.5 and abs(float(linear_1.std()) - (3 * 64) ** -0.5) < 0.006


def test_box_coverage():
    example = load_example("train_visual_search")
    selected = torch.zeros(24, 24, dtype=torch.bool)
    selected[10, 5] = True  # high-res token (row 10, column 5) covers pixels x [20, 24), y [40, 44) of a 96 px image
    assert example.box_coverage(selected.flatten(), (20, 40, 24, 44), 96) == 1.0
    assert example.box_coverage(selected.flatten(), (18, 40, 26, 44), 96) == 0.5
    assert example.box_coverage(selected.flatten(), (0, 0, 8, 8), 96) == 0.0


def test_attention_lift():
    example = load_example("train_visual_search")
    uniform = torch.full((64,), 1 / 64)
    assert example.attention_lift(uniform, (20, 40, 28, 48), 96) == pytest.approx(1.0)
    peaked = torch.zeros(8, 8)
    peaked[3, 1] = 1.0  # low-res cell (row 3, column 1) covers pixels x [12, 24), y [36, 48) of a 96 px image
    assert example.attention_lift(peaked.flatten(), (12, 36, 24, 48), 96) == pytest.approx(64.0)
    assert example.attention_lift(peaked.flatten(), (18, 36, 30, 48), 96) == pytest.approx(32.0)  # half inside
    assert example.attention_lift(peaked.flatten(), (0, 0, 8, 8), 96) == 0.0


def test_without_auto_map_drops_it_at_any_depth():
    example = load_example("train_visual_search")
    saved = {"auto_map": {"AutoProcessor": "x.Y"}, "image_processor": {"auto_map": {}, "size": 32}, "list": [{"a": 1}]}
    assert example.without_auto_map(saved) == {"image_processor": {"size": 32}, "list": [{"a": 1}]}
