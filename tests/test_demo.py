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
