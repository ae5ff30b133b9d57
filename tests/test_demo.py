import pathlib
import re

from hf_flexattention.demo import main


def test_demo_runs_tiny_model_and_reports_selection(capsys):
    assert main([]) == 0
    output = capsys.readouterr().out

    assert re.search(r"^answer: +'[^']+'$", output, flags=re.MULTILINE), output
    assert re.search(r"^generate: +8 tokens in [0-9.]+ s", output, flags=re.MULTILINE), output
    selections = re.findall(r"^ +layer +(\d+): +(\d+) / 576 \( *[0-9.]+%\)$", output, flags=re.MULTILINE)
    # The tiny language model has 4 layers and the demo patches the top 2 with FlexAttention.
    assert [int(layer) for layer, _ in selections] == [2, 3], output
    assert all(0 <= int(count) <= 576 for _, count in selections)


def test_the_readme_laptop_quick_start_runs(capsys):
    """The README's CPU quick start, run as written."""
    readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("Try everything on a laptop") :]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    exec(compile(code, "README.md", "exec"), {})
    assert len(capsys.readouterr().out.split()) == 8  # eight generated words
