import json
import pathlib
import re

import pytest

from hf_flexattention.demo import main
from hf_flexattention.visual_search import SHIPPED_MODEL, make_sample


def test_demo_defaults_to_the_shipped_model(tmp_path, capsys):
    """No arguments: the shipped model on a visual-search test image; question, answer, truth, time, pictures."""
    output = tmp_path / "selection.png"
    assert main(["--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "visual-search model shipped in the package" in printed
    assert re.search(r"^answer: +'[a-z]+'$", printed, flags=re.MULTILINE), printed
    assert re.search(r"^truth: +'[a-z]' \((right|wrong)\)$", printed, flags=re.MULTILINE), printed
    assert "(this model answers 63.0% of 200 test samples right; the low-res model trained alike, 10.5%" in printed
    assert re.search(r"^generate: +\d+ tokens in [0-9.]+ ms", printed, flags=re.MULTILINE), printed
    selections = re.findall(r"^ +layer +(\d+): +(\d+) / 576 \( *[0-9.]+%\)$", printed, flags=re.MULTILINE)
    assert [int(layer) for layer, _ in selections] == [2, 3], printed
    assert output.is_file() and (tmp_path / "selection_layers.png").is_file()


def test_demo_asks_the_shipped_model_about_a_given_image(tmp_path, capsys):
    image = tmp_path / "canvas.png"
    make_sample("validation", 3, **json.loads((SHIPPED_MODEL / "task.json").read_text())["sample_kwargs"]).image.save(
        image
    )
    argv = ["--image", str(image), "--prompt", "what letter is in the red box ?", "--output", str(tmp_path / "p.png")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"image:      {image} (96x96)" in printed
    assert "truth:" not in printed  # only a generated sample has a known answer


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--sample", "-1"], "--sample must be >= 0"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
        (["--model", "some/checkpoint"], "--model needs --image FILE and --prompt TEXT"),
        (["--image", "missing.png"], "cannot open image file 'missing.png'"),
    ],
)
def test_demo_refuses_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err


def test_the_readme_laptop_quick_start_runs(capsys):
    """The README's CPU quick start, run as written."""
    readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("Try everything on a laptop") :]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    exec(compile(code, "README.md", "exec"), {})
    assert len(capsys.readouterr().out.split()) == 8  # eight generated words
