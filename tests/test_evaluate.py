"""`python -m hf_flexattention.evaluate`: benchmark layouts, protocols, scoring, resume and bad input (tiny model)."""

import base64
import io
import itertools
import json

import datasets
import pytest
import torch

from hf_flexattention import evaluate as evaluate_module
from hf_flexattention import patch_model, unpatch_model
from hf_flexattention.benchmarks import ImageProblem, load_benchmark, magnifier_options, open_image
from hf_flexattention.evaluate import evaluate, main, predictions_path
from hf_flexattention.protocols import (
    SHORT_ANSWER,
    build_prompt,
    generate_answers,
    parse_choice,
    score_options,
)
from hf_flexattention.tiny import build_tiny_llava, build_tiny_processor

from .conftest import make_image


VSTAR_OPTIONS = {
    "direct_attributes": ["red", "green sign", "blue", "black white"],
    "relative_position": ["left", "right of the car"],
}


def flex_model():
    return patch_model(build_tiny_llava(), n_fa=2)


def make_vstar(root, per_category=3):
    """V* Bench's published layout: <category>/<name>.json (correct option first) beside <name>.jpg."""
    for category, options in VSTAR_OPTIONS.items():
        (root / category).mkdir(parents=True)
        for index in range(per_category):
            name = f"sa_{index}"
            make_image(index, 50 + 10 * index, 40).save(root / category / f"{name}.jpg")
            annotation = {"target_object": ["sign"], "bbox": [[1, 2, 3, 4]], "question": "what color is the sign ?"}
            (root / category / f"{name}.json").write_text(json.dumps({**annotation, "options": options}))
    return root


def make_textvqa(root, answers):
    """TextVQA's layout: TextVQA_0.5.1_val.json ({"data": [...]}) and train_images/<image_id>.jpg."""
    (root / "train_images").mkdir(parents=True)
    data = []
    for index, human in enumerate(answers):
        make_image(10 + index).save(root / "train_images" / f"img{index}.jpg")
        data.append(
            {
                "question": "what does the sign say ?",
                "image_id": f"img{index}",
                "image_classes": ["sign"],
                "question_id": 100 + index,
                "answers": human,
                "set_name": "val",
            }
        )
    (root / "TextVQA_0.5.1_val.json").write_text(json.dumps({"dataset_name": "textvqa", "data": data}))
    return root


MAGNIFIER_ROWS = [
    ("m0", "What color is the small sign? A. red, B. green, C. blue, D. black", "B"),
    ("m1", "What is on the left? A. a car, B. a tree, C. a dog, D. a house", "D"),
    ("m2", "How many signs are there? A. one, B. two, C. three, D. four", "A"),
]


def jpeg_bytes(seed):
    buffer = io.BytesIO()
    make_image(seed).save(buffer, format="JPEG")
    return buffer.getvalue()


def make_magnifier_parquet(root):
    """The Hub's layout (Otter-AI/MagnifierBench): parquet with id, instruction, answer, images."""
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "instruction": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "images": datasets.Sequence(datasets.Image()),
        }
    )
    rows = {
        "id": [row[0] for row in MAGNIFIER_ROWS],
        "instruction": [row[1] for row in MAGNIFIER_ROWS],
        "answer": [row[2] for row in MAGNIFIER_ROWS],
        "images": [[{"bytes": jpeg_bytes(index), "path": None}] for index in range(len(MAGNIFIER_ROWS))],
    }
    (root / "data").mkdir(parents=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(root / "data" / "test-00000-of-00001.parquet"))
    return root


def make_magnifier_mimic_it(root):
    """The authors' MIMIC-IT pair: data_instructions.json and images.json (base64)."""
    root.mkdir(parents=True)
    data = {
        item_id: {"instruction": instruction, "answer": answer, "image_ids": [f"img_{item_id}"], "rel_ins_ids": []}
        for item_id, instruction, answer in MAGNIFIER_ROWS
    }
    images = {
        f"img_{row[0]}": base64.b64encode(jpeg_bytes(index)).decode() for index, row in enumerate(MAGNIFIER_ROWS)
    }
    (root / "data_instructions.json").write_text(json.dumps({"meta": {}, "data": data}))
    (root / "images.json").write_text(json.dumps(images))
    return root


# --- VQA accuracy ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("Two dogs.", "2 dogs"),  # number word, trailing period
        ("The Coca-Cola", "coca cola"),  # article; a hyphen inside a word becomes a space
        ("coca - cola", "coca cola"),  # a mark touching a space is deleted
        ("an apple, a pear", "apple pear"),  # articles and commas
        ("1,000 people", "1000 people"),
        ("3.5 km.", "3.5 km"),  # a period before a digit stays
        ("dont", "don't"),
        ("couldnt've", "couldn't've"),
        ("It's NONE", "it 's 0"),
        ("yes!", "yes"),
        ("  Hello\tWorld\n", "hello world"),
    ],
)
def test_vqa_normalisation(raw, normal):
    from hf_flexattention.vqa_accuracy import normalize_answer

    assert normalize_answer(raw) == normal


def brute_force_vqa_accuracy(prediction, answers):
    """The definition written out: every subset of n-1 answers, min(matches / 3, 1), averaged."""
    from hf_flexattention.vqa_accuracy import normalize_answer

    predicted = normalize_answer(prediction)
    subsets = list(itertools.combinations([normalize_answer(a) for a in answers], len(answers) - 1))
    return sum(min(subset.count(predicted) / 3, 1) for subset in subsets) / len(subsets)


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        ("two", ["2"] * 4 + ["x"] * 6, 1.0),
        ("two", ["2"] * 3 + ["x"] * 7, 0.9),
        ("The two.", ["2"] * 2 + ["x"] * 8, 0.6),
        ("2", ["two"] + ["x"] * 9, 0.3),
        ("2", ["x"] * 10, 0.0),
        ("stop", ["stop", "STOP!", "stop", "x"], 0.75),  # fewer than 10 answers: n-1 of n
        ("stop", ["stop"], 0.0),  # a single answer leaves empty subsets
    ],
)
def test_vqa_accuracy_against_the_definition(prediction, answers, expected):
    from hf_flexattention.vqa_accuracy import vqa_accuracy

    assert vqa_accuracy(prediction, answers) == pytest.approx(expected)
    assert vqa_accuracy(prediction, answers) == pytest.approx(brute_force_vqa_accuracy(prediction, answers))


def test_vqa_accuracy_refuses_no_answers():
    from hf_flexattention.vqa_accuracy import vqa_accuracy

    with pytest.raises(ValueError, match="at least one human answer"):
        vqa_accuracy("yes", [])


# --- letters and options --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("B", 1),
        ("(c)", 2),
        ("D.", 3),
        ("The answer is C.", 2),
        ("Answer: (B)", 1),
        ("B. green", 1),
        ("I think (D) is right", 3),
        ("green", 1),  # the text of exactly one option
        ("A red car", 0),  # "A" as an article is not a letter, but the option text "red car" is
        ("E", None),  # not an option
        ("green or blue", None),  # two options named
        ("no idea", None),
    ],
)
def test_parse_choice(text, expected):
    assert parse_choice(text, ["red car", "green", "blue", "black"]) == expected


def test_magnifier_options_split():
    question, options = magnifier_options("What is it? A. a red car, B. 3.5, C. x, y, D. none")
    assert question == "What is it?"
    assert options == ["a red car", "3.5", "x, y", "none"]
    with pytest.raises(ValueError, match="does not list options"):
        magnifier_options("What is it? B. x, A. y")


# --- layouts ---------------------------------------------------------------------------------------------------------


def test_vstar_layout_loads_with_the_correct_option_first(tmp_path):
    dataset = load_benchmark("vstar", str(make_vstar(tmp_path / "vstar", per_category=2)))
    assert dataset["id"] == [
        "direct_attributes/sa_0",
        "direct_attributes/sa_1",
        "relative_position/sa_0",
        "relative_position/sa_1",
    ]
    assert dataset[0]["options"] == VSTAR_OPTIONS["direct_attributes"]
    assert dataset[2]["category"] == "relative_position"


def test_textvqa_and_both_magnifier_layouts_load(tmp_path):
    textvqa = load_benchmark("textvqa", str(make_textvqa(tmp_path / "textvqa", [["a"] * 10, ["b"] * 7])))
    assert textvqa["id"] == ["100", "101"] and len(textvqa[1]["answers"]) == 7
    parquet = load_benchmark("magnifier", str(make_magnifier_parquet(tmp_path / "magnifier")))
    mimic_it = load_benchmark("magnifier", str(make_magnifier_mimic_it(tmp_path / "mimic")))
    for dataset in (parquet, mimic_it):
        assert dataset["id"] == ["m0", "m1", "m2"]
        assert dataset["answer"] == ["B", "D", "A"]
        assert dataset[0]["options"] == ["red", "green", "blue", "black"]
        assert dataset[1]["question"] == "What is on the left?"
    assert parquet[0]["image"]["bytes"] == mimic_it[0]["image"]["bytes"]
    assert open_image(mimic_it[0]).size == (60, 40)


def test_an_item_with_two_images_is_skipped_as_not_one_image(tmp_path):
    root = make_magnifier_mimic_it(tmp_path / "mimic")
    instructions = json.loads((root / "data_instructions.json").read_text())
    instructions["data"]["m1"]["image_ids"] = ["img_m1", "img_m0"]
    (root / "data_instructions.json").write_text(json.dumps(instructions))
    dataset = load_benchmark("magnifier", str(root))
    with pytest.raises(ImageProblem) as problem:
        open_image(dataset[1])
    assert problem.value.reason == "not one image"


@pytest.mark.parametrize(
    ("task", "build", "expected"),
    [
        ("vstar", lambda root: (root / "images").mkdir(parents=True), "expected the folders"),
        ("textvqa", lambda root: (root / "train_images").mkdir(parents=True), "TextVQA_0.5.1_val.json"),
        ("magnifier", lambda root: root.mkdir(parents=True), "parquet files"),
    ],
)
def test_a_folder_in_the_wrong_layout_says_what_was_expected_and_found(tmp_path, task, build, expected):
    root = tmp_path / "data"
    build(root)
    with pytest.raises(ValueError, match=expected) as error:
        load_benchmark(task, str(root))
    assert "found" in str(error.value)


def test_an_unknown_hub_id_offline_says_what_to_pass(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="neither a folder nor a Hub dataset"):
        load_benchmark("vstar", "nobody/no-such-benchmark")


def test_malformed_annotations_are_refused(tmp_path):
    root = make_vstar(tmp_path / "vstar", per_category=1)
    (root / "direct_attributes" / "sa_0.json").write_text(json.dumps({"question": "q", "options": "red"}))
    with pytest.raises(ValueError, match="sa_0.json is not a V\\* Bench annotation"):
        load_benchmark("vstar", str(root))
    textvqa = make_textvqa(tmp_path / "textvqa", [["a"] * 10])
    (textvqa / "TextVQA_0.5.1_val.json").write_text(json.dumps({"data": [{"question": "q"}]}))
    with pytest.raises(ValueError, match="lacks the fields"):
        load_benchmark("textvqa", str(textvqa))


# --- protocols -------------------------------------------------------------------------------------------------------


def test_likelihood_scores_match_a_hand_computed_loss(processor):
    """One padded forward over every option of two questions equals each option's own teacher-forced loss."""
    model = flex_model()
    images = [make_image(3), make_image(4, width=40, height=70)]
    prompts = [build_prompt(processor, f"what color is the sign ?\n{SHORT_ANSWER}")] * 2
    options = [["red", "green sign", "blue"], ["left", "right of the car"]]
    scores, selected = score_options(model, processor, prompts, options, images)

    for prompt, choices, image, item_scores in zip(prompts, options, images, scores, strict=True):
        prompt_length = processor(images=image, text=prompt, return_tensors="pt")["input_ids"].shape[1]
        losses = []
        for choice, (total, count) in zip(choices, item_scores, strict=True):
            inputs = processor(images=image, text=f"{prompt} {choice}", return_tensors="pt")
            labels = inputs["input_ids"].clone()
            labels[:, :prompt_length] = -100
            with torch.no_grad():
                loss = model(**inputs, labels=labels).loss.item()  # mean cross-entropy over the option's tokens
            assert count == inputs["input_ids"].shape[1] - prompt_length
            # fp32; the batched forward differs only by padding and summation order.
            assert -total / count == pytest.approx(loss, abs=1e-4)
            losses.append(loss)
        ranked = sorted(range(len(choices)), key=lambda k: -item_scores[k][0] / item_scores[k][1])
        assert ranked == sorted(range(len(choices)), key=lambda k: losses[k])
    assert all(0.0 < fraction <= 1.0 for fraction in selected)

    # The high-res rows changed the answer's likelihood: the stock path scores differently.
    stock, stock_selected = score_options(model, processor, prompts, options, images, high_res=False)
    assert stock_selected == [None, None]
    assert any(abs(a[0] - b[0]) > 1e-3 for a, b in zip(scores[0] + scores[1], stock[0] + stock[1], strict=True))


def test_generate_answers_match_one_prompt_at_a_time(processor):
    model = flex_model()
    images = [make_image(5), make_image(6, width=30, height=80)]
    prompts = [build_prompt(processor, "what is in the image ?"), build_prompt(processor, "red ?")]
    answers, selected = generate_answers(model, processor, prompts, images, max_new_tokens=4)
    for prompt, image, answer in zip(prompts, images, answers, strict=True):
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert answer == processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    assert all(0.0 < fraction <= 1.0 for fraction in selected)


# --- full runs -------------------------------------------------------------------------------------------------------


def read_records(output):
    lines = predictions_path(output).read_text().splitlines()
    return json.loads(lines[0])["run"], [json.loads(line) for line in lines[1:]]


def test_full_vstar_run_with_baseline_counts_skipped_items(tmp_path, processor):
    root = make_vstar(tmp_path / "vstar")
    (root / "relative_position" / "sa_2.jpg").unlink()  # missing
    (root / "direct_attributes" / "sa_1.jpg").write_bytes(b"not an image")  # unreadable
    dataset = load_benchmark("vstar", str(root))
    model = flex_model()
    output = tmp_path / "out" / "vstar.json"
    summary = evaluate(
        model, processor, dataset, task="vstar", protocol="likelihood", output=output, baseline=True, batch_size=2
    )
    assert json.loads(output.read_text()) == summary
    _, records = read_records(output)
    assert len(records) == 12  # 6 items, 2 variants
    for variant in ("flexattention", "stock"):
        mine = [record for record in records if record["variant"] == variant]
        overall = summary["results"][variant]["groups"]["overall"]
        assert overall["items"] == 6 and overall["scored"] == 4 and overall["skipped"] == 2
        assert overall["skipped_reasons"] == {"missing image": 1, "unreadable image": 1}
        correct = sum(record.get("correct", 0.0) for record in mine)
        assert overall["accuracy"] == pytest.approx(correct / 6)  # skipped items stay in the denominator
        assert overall["accuracy_of_scored"] == pytest.approx(correct / 4)
        assert summary["results"][variant]["groups"]["relative_position"]["items"] == 3
        assert summary["results"][variant]["complete"]
    assert summary["results"]["flexattention"]["groups"]["overall"]["mean_selected_fraction"] > 0
    assert summary["results"]["stock"]["groups"]["overall"]["mean_selected_fraction"] is None
    assert summary["versions"]["datasets"] == datasets.__version__

    # The stock rows are those of the unpatched model.
    stock_model = unpatch_model(flex_model())
    item = dataset[0]
    prompt = build_prompt(processor, f"{item['question']}\n{SHORT_ANSWER}")
    from PIL import Image

    scores, _ = score_options(stock_model, processor, [prompt], [item["options"]], [Image.open(item["image"]["path"])])
    stock_record = next(r for r in records if r["variant"] == "stock" and r["id"] == item["id"])
    assert stock_record["option_logprob_sums"] == pytest.approx([total for total, _ in scores[0]], abs=1e-5)


def test_generation_protocols_on_vstar_and_magnifier(tmp_path, processor):
    vstar = load_benchmark("vstar", str(make_vstar(tmp_path / "vstar", per_category=2)))
    summary = evaluate(
        flex_model(),
        processor,
        vstar,
        task="vstar",
        protocol="generation",
        output=tmp_path / "g.json",
        limit=3,
        max_new_tokens=4,
    )
    assert summary["items"] == 3
    _, records = read_records(tmp_path / "g.json")
    for record in records:
        order = record["shown_order"]
        assert sorted(order) == list(range(len(order)))
        assert record["target"] == "ABCD"[order.index(0)]  # where the published first (correct) option was shown
        assert record["correct"] == float(record["parsed"] == record["target"])
    magnifier = load_benchmark("magnifier", str(make_magnifier_parquet(tmp_path / "magnifier")))
    summary = evaluate(
        flex_model(),
        processor,
        magnifier,
        task="magnifier",
        protocol="generation",
        output=tmp_path / "m.json",
        max_new_tokens=4,
    )
    _, records = read_records(tmp_path / "m.json")
    assert [record["target"] for record in records] == ["B", "D", "A"]
    assert summary["results"]["flexattention"]["groups"]["overall"]["unparsed"] == sum(
        record["parsed"] is None for record in records
    )


def test_resume_after_an_interruption_gives_the_uninterrupted_result(tmp_path, processor, monkeypatch):
    dataset = load_benchmark("vstar", str(make_vstar(tmp_path / "vstar")))
    kwargs = {"task": "vstar", "protocol": "likelihood", "batch_size": 2, "baseline": True}
    evaluate(flex_model(), processor, dataset, output=tmp_path / "full.json", **kwargs)

    answered = []
    real_answer = evaluate_module._answer

    def interrupted(*args):
        if len(answered) == 4:  # the whole flexattention pass, then one stock batch
            raise KeyboardInterrupt
        answered.append([item["id"] for item in args[2]])
        return real_answer(*args)

    monkeypatch.setattr(evaluate_module, "_answer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate(flex_model(), processor, dataset, output=tmp_path / "part.json", **kwargs)
    assert not (tmp_path / "part.json").exists()
    with open(predictions_path(tmp_path / "part.json"), "a") as file:
        file.write('{"variant": "stock", "id": "relative_pos')  # a line cut off by the interruption

    answered.clear()
    monkeypatch.setattr(evaluate_module, "_answer", lambda *args: answered.append(args[2]) or real_answer(*args))
    summary = evaluate(flex_model(), processor, dataset, output=tmp_path / "part.json", resume=True, **kwargs)
    assert [item["id"] for batch in answered for item in batch] == [
        "direct_attributes/sa_2",
        "relative_position/sa_0",
        "relative_position/sa_1",
        "relative_position/sa_2",
    ]  # only the stock items not yet written
    full = {(r["variant"], r["id"]): r for r in read_records(tmp_path / "full.json")[1]}
    part = {(r["variant"], r["id"]): r for r in read_records(tmp_path / "part.json")[1]}
    assert full.keys() == part.keys()
    for key, record in full.items():
        assert part[key]["option_logprob_sums"] == pytest.approx(record["option_logprob_sums"], abs=1e-5)
        assert part[key]["correct"] == record["correct"]
    assert summary["results"]["stock"]["complete"]


def test_resume_refuses_other_settings(tmp_path, processor):
    dataset = load_benchmark("vstar", str(make_vstar(tmp_path / "vstar", per_category=1)))
    evaluate(flex_model(), processor, dataset, task="vstar", protocol="likelihood", output=tmp_path / "r.json")
    with pytest.raises(ValueError, match="protocol: 'likelihood' then, 'generation' now"):
        evaluate(
            flex_model(),
            processor,
            dataset,
            task="vstar",
            protocol="generation",
            output=tmp_path / "r.json",
            resume=True,
        )


def test_command_line_textvqa_run(tmp_path, capsys):
    model_dir = tmp_path / "model"
    flex_model().save_pretrained(model_dir)
    build_tiny_processor().save_pretrained(model_dir)
    data = make_textvqa(tmp_path / "textvqa", [["stop"] * 10, ["w5"] * 3 + ["x"] * 7, ["a"] * 4])
    (data / "train_images" / "img1.jpg").unlink()
    output = tmp_path / "textvqa.json"
    argv = ["--task", "textvqa", "--data", str(data), "--model", str(model_dir), "--output", str(output)]
    assert main([*argv, "--max-new-tokens", "3", "--baseline"]) == 0
    printed = capsys.readouterr().out
    assert "| flexattention | overall |" in printed and "| stock | overall |" in printed
    summary = json.loads(output.read_text())
    overall = summary["results"]["flexattention"]["groups"]["overall"]
    assert (overall["items"], overall["scored"], overall["skipped"]) == (3, 2, 1)
    assert overall["not_10_answers"] == 1
    assert overall["skipped_ids"] == ["101"]
    _, records = read_records(output)
    for record in records:
        if "answer" in record:
            human = {"100": ["stop"] * 10, "102": ["a"] * 4}[record["id"]]
            assert record["correct"] == brute_force_vqa_accuracy(record["answer"], human)
    assert summary["flex_settings"]["n_fa"] == 2 and summary["model"] == str(model_dir)

    # Run again: the output exists.
    with pytest.raises(SystemExit):
        main(argv)
    err = capsys.readouterr().err
    assert "already exist" in err and "--resume" in err and "--overwrite" in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--limit", "0"], "--limit must be at least 1"),
        (["--protocol", "likelihood", "--task", "textvqa"], "supports --protocol generation"),
        (["--resume", "--overwrite"], "not allowed with argument"),
        (["--batch-size", "0"], "--batch-size and --max-new-tokens must be at least 1"),
    ],
)
def test_command_line_refuses_bad_options(tmp_path, capsys, extra, message):
    argv = ["--task", "vstar", "--data", str(tmp_path), "--model", "unused", "--output", str(tmp_path / "o.json")]
    with pytest.raises(SystemExit):
        main([*argv, *extra])
    assert message in capsys.readouterr().err


def test_command_line_reports_a_wrong_layout(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "readme.txt").write_text("hi")
    argv = ["--task", "vstar", "--data", str(tmp_path / "data"), "--model", "unused"]
    with pytest.raises(SystemExit):
        main([*argv, "--output", str(tmp_path / "o.json")])
    err = capsys.readouterr().err
    assert "direct_attributes" in err and "readme.txt" in err


def test_a_model_without_an_image_token_is_refused(tmp_path, processor):
    dataset = load_benchmark("vstar", str(make_vstar(tmp_path / "vstar", per_category=1)))
    model = flex_model()
    model.config.image_token_id = None
    with pytest.raises(ValueError, match="image token"):
        evaluate(model, processor, dataset, task="vstar", protocol="likelihood", output=tmp_path / "o.json")
    with pytest.raises(ValueError, match="limit must be at least 1"):
        evaluate(
            flex_model(), processor, dataset, task="vstar", protocol="likelihood", output=tmp_path / "o.json", limit=0
        )
