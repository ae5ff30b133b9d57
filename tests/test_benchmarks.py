"""The benchmark and cost command lines: bad input stops before any work with a message naming the fix; each runs
end to end on a tiny model and prints its table."""

import pytest

from hf_flexattention import cost

from .conftest import load_example


@pytest.fixture(scope="module")
def benchmark():
    return load_example("benchmark")


@pytest.fixture(scope="module")
def benchmark_training():
    return load_example("benchmark_training")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--shape", "llava-9b"], "invalid choice: 'llava-9b'"),
        (["--batch-size", "1", "0"], "--batch-size must be >= 1, got 0"),
        (["--new-tokens", "2"], "--new-tokens >= 4"),
        (["--model", "some/model", "--image", "x.png"], "--image FILE and --prompt TEXT together"),
    ],
)
def test_benchmark_refuses_bad_input_before_any_work(benchmark, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_benchmark_refuses_compile_without_a_working_backend(benchmark, capsys, monkeypatch):
    monkeypatch.setattr(benchmark, "compiler_problem", lambda device: "CppCompileError: no C++ compiler")
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--compile"])
    assert "--compile needs a working torch.compile backend on cpu: CppCompileError" in capsys.readouterr().err


def test_benchmark_runs_and_prints_its_table(benchmark, capsys):
    assert (
        benchmark.main(["--repeats", "1", "--warmup-rounds", "0", "--new-tokens", "4", "--batch-size", "1", "2"]) == 0
    )
    out = capsys.readouterr().out
    assert "hardware:  CPU" in out and "transformers 5.24" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "variant" not in line]
    assert len(rows) == 6  # two batch sizes x three variants
    flex = [line for line in rows if "FlexAttention" in line]
    assert all(" | 1 | " in line for line in flex)  # syncs per decode step: the stock step's one


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--shape", "scaled-9b"], "invalid choice"),
        (["--modes", "qlora"], "--modes takes lora and/or full"),
        (["--batch-size", "0"], "--batch-size, --answer-words, --rounds >= 1"),
    ],
)
def test_training_benchmark_refuses_bad_input(benchmark_training, capsys, argv, message):
    with pytest.raises(SystemExit):
        benchmark_training.parse_args(argv)
    assert message in capsys.readouterr().err


def test_training_benchmark_runs(benchmark_training, capsys):
    results = benchmark_training.main(["--shape", "tiny", "--rounds", "1", "--warmup-rounds", "0", "--modes", "full"])
    assert [result["mode"] for result in results] == ["full"]
    assert 0 < results[0]["projected"] <= 1
    assert "| full |" in capsys.readouterr().out


def test_cost_command_prints_the_7b_table(capsys):
    assert cost.main(["--shape", "llava-1.5-7b"]) == 0
    out = capsys.readouterr().out
    assert "7.06B parameters (+772M for n_fa=23)" in out and "(b) FlexAttention | 616 |" in out


def test_cost_command_refuses_bad_input(capsys):
    with pytest.raises(SystemExit):
        cost.main(["--batch-size", "0"])
    assert "--batch-size >= 1" in capsys.readouterr().err


# ----- LLaVA-NeXT: stock (crops in the sequence) against FlexAttention-NeXT (crops as the pool) ---------------------


@pytest.mark.parametrize("shape", ["tiny-next", "tiny-onevision"])
def test_next_benchmark_runs_both_variants_on_the_same_image(capsys, shape):
    benchmark_next = load_example("benchmark_next")
    argv = ["--shape", shape, "--new-tokens", "4", "--repeats", "1", "--threads", "1", "--text-tokens", "8"]
    assert benchmark_next.main(argv) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| (")]
    assert len(rows) == 2
    prompt_tokens = [int(row.split("|")[2]) for row in rows]
    syncs = [int(row.split("|")[6]) for row in rows]
    # The tiny 64x64 image on a 2x2 grid: stock holds 64 base + 16x16 crop + 16 newline tokens, FlexAttention the base
    # (OneVision's anyres_max_9 leaves a 2x2 grid unshrunk).
    assert prompt_tokens == [64 + 256 + 16 + 8, 64 + 8]
    assert syncs[1] == syncs[0]  # the FlexAttention decode step adds no host sync


def test_next_benchmark_refuses_bad_input(capsys):
    benchmark_next = load_example("benchmark_next")
    with pytest.raises(SystemExit):
        benchmark_next.main(["--new-tokens", "2"])
    assert "--new-tokens >= 4" in capsys.readouterr().err
