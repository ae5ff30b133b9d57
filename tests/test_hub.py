"""Sharing on the Hub (issue 4): model card, push, and loading back with and without the plugin.

The end-to-end tests drive the real `huggingface_hub` client against a loopback fake Hub (`tests/fake_hub.py`).
`HF_ENDPOINT` is read when huggingface_hub is imported, which this process has done already (conftest imports
transformers), so every push and load runs in a fresh Python subprocess with the fake Hub's environment. The
plugin-free load runs with `hf_flexattention` blocked by an import hook: the package is installed (editable) in this
environment, and the test must see what a machine without it sees.
"""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from hf_flexattention import FlexLlavaForConditionalGeneration, patch_model
from hf_flexattention.hub import create_model_card, push_to_hub, save_pretrained
from hf_flexattention.tiny import TINY_IMAGE_TOKEN_ID, build_tiny_llava

from .conftest import make_image
from .fake_hub import FakeHub
from .test_convert import high_res_weights, original_config, original_state_dict, write_clip, write_original


REPO = "tester/tiny-flex-llava"  # pushed with hf_flexattention.hub.push_to_hub (model + processor + card)
NATIVE_REPO = "tester/tiny-flex-native"  # pushed with model.push_to_hub / processor.push_to_hub
ADAPTER_REPO = "tester/tiny-flex-lora"  # pushed with peft_model.push_to_hub
ADAPTER_CARD_REPO = "tester/tiny-flex-lora-card"  # pushed with hf_flexattention.hub.push_to_hub(peft_model)
ORIGINAL_REPO = "tester/original-flexattn"  # the authors' format, converted from the Hub
BASE_MODEL = "tester/tiny-llava"
STOCK_REPO = "tester/tiny-llava-stock"  # the stock tiny model, for loading an adapter onto an unpatched base
REMOTE_CODE_FILES = {
    "attention.py",
    "configuration_flex_llava.py",
    "high_res.py",
    "modeling_flex.py",
    "modeling_flex_llava.py",
    "processing_flex_llava.py",
    "projections.py",
    "selection.py",
    "state.py",
}

# Installed first in the plugin-free subprocess: `import hf_flexattention` fails as if it were not installed.
BLOCK_PLUGIN = """
import importlib.abc
import sys


class BlockPlugin(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "hf_flexattention" or name.startswith("hf_flexattention."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None


sys.meta_path.insert(0, BlockPlugin())
"""

# Shared by both subprocesses: inputs of the tiny model and what they record.
COMMON = """
import sys
from pathlib import Path

import torch
from PIL import Image

work = Path(sys.argv[1])
prompts = ["USER: <image>\\nwhat is in the image ? ASSISTANT:", "USER: how many trees are there ? ASSISTANT:"]
report = {}


def run(model, inputs):
    with torch.no_grad():
        logits = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    return logits, tokens


def record_error(name, call):
    try:
        call()
        report[name] = None
    except Exception as error:
        report[name] = f"{type(error).__name__}: {error}"
"""

PUSH = """
import copy

import hf_flexattention
from hf_flexattention.adapters import load_adapter
from hf_flexattention.convert import convert_checkpoint
from hf_flexattention.hub import push_to_hub
from hf_flexattention.tiny import build_tiny_llava, build_tiny_processor
from huggingface_hub import HfApi
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForImageTextToText, AutoProcessor

model = hf_flexattention.patch_model(build_tiny_llava(), n_fa=2, threshold=0.3)
with torch.no_grad():  # "fine-tuned" hr projections, so a load that copied k/v instead would show
    for layer in model.model.language_model.layers[2:]:
        layer.self_attn.hr_k_proj.weight.mul_(1.25)
        layer.self_attn.hr_v_proj.weight.add_(0.01)
processor = build_tiny_processor()
inputs = processor(images=[Image.open(work / "image.png")], text=prompts, padding=True, return_tensors="pt")
report["inputs"] = dict(inputs)
report["logits"], report["tokens"] = run(model, inputs)
report["state"] = copy.deepcopy(model.state_dict())

push_to_hub(model, "{REPO}", processor=processor, base_model="{BASE_MODEL}")
push_to_hub(model, "{REPO}", revision="dev", tags=["my-tag"], commit_message="To a branch")
model.push_to_hub("{NATIVE_REPO}")
processor.push_to_hub("{NATIVE_REPO}")

# With the plugin imported, no trust_remote_code.
loaded = AutoModelForImageTextToText.from_pretrained("{REPO}")
report["plugin_class"] = type(loaded).__module__ + "." + type(loaded).__name__
report["plugin_logits"], report["plugin_tokens"] = run(loaded, inputs)


def plugin_processor_inputs():
    plugin_processor = AutoProcessor.from_pretrained("{REPO}")
    image = Image.open(work / "image.png")
    report["plugin_inputs"] = dict(plugin_processor(images=[image], text=prompts, padding=True, return_tensors="pt"))


record_error("plugin_processor_error", plugin_processor_inputs)

# A LoRA adapter (and trained hr projections) on the Hub model, pushed the PEFT way and through our helper.
lora = LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\\.(q_proj|v_proj)",
                  modules_to_save=["hr_k_proj", "hr_v_proj"])
peft_model = get_peft_model(AutoModelForImageTextToText.from_pretrained("{REPO}"), lora)
generator = torch.Generator().manual_seed(0)
with torch.no_grad():
    for name, parameter in peft_model.named_parameters():
        if "lora_B" in name or "modules_to_save" in name:
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
peft_model.eval()
report["peft_logits"], _ = run(peft_model, inputs)
peft_model.push_to_hub("{ADAPTER_REPO}")
push_to_hub(peft_model, "{ADAPTER_CARD_REPO}")
adapter = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained("{REPO}"), "{ADAPTER_REPO}")
report["plugin_peft_logits"], _ = run(adapter.eval(), inputs)
# The adapter card's way: onto a stock base (the same random weights, never patched), patched as recorded.
build_tiny_llava().push_to_hub("{STOCK_REPO}")
stock_base = AutoModelForImageTextToText.from_pretrained("{STOCK_REPO}")
report["stock_base_peft_logits"], _ = run(load_adapter(stock_base, "{ADAPTER_CARD_REPO}").eval(), inputs)
record_error(
    "unrecorded_adapter_error",
    lambda: load_adapter(AutoModelForImageTextToText.from_pretrained("{STOCK_REPO}"), "{ADAPTER_REPO}"),
)

# The authors' format, converted straight from the Hub.
HfApi().create_repo("{ORIGINAL_REPO}")
HfApi().upload_folder(repo_id="{ORIGINAL_REPO}", folder_path=work / "original")
convert_checkpoint("{ORIGINAL_REPO}", work / "converted", vision_tower=work / "clip", image_token_index=95)
torch.save(report, work / "report.pt")
"""

LOAD_WITHOUT_PLUGIN = """
record_error("import_error", lambda: __import__("hf_flexattention"))

from peft import PeftModel
from transformers import AutoModelForImageTextToText, AutoProcessor

record_error("no_trust_error", lambda: AutoModelForImageTextToText.from_pretrained("{REPO}"))
record_error("no_trust_processor_error", lambda: AutoProcessor.from_pretrained("{REPO}"))

model = AutoModelForImageTextToText.from_pretrained("{REPO}", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("{REPO}", trust_remote_code=True)
report["classes"] = [type(obj).__module__ + "." + type(obj).__name__ for obj in (model, model.config, processor)]
inputs = processor(images=[Image.open(work / "image.png")], text=prompts, padding=True, return_tensors="pt")
report["inputs"] = dict(inputs)
report["state"] = model.state_dict()
report["logits"], report["tokens"] = run(model, inputs)

native = AutoModelForImageTextToText.from_pretrained("{NATIVE_REPO}", trust_remote_code=True)
report["native_logits"], _ = run(native, inputs)
native_processor = AutoProcessor.from_pretrained("{NATIVE_REPO}", trust_remote_code=True)
report["native_processor_class"] = type(native_processor).__name__

base = AutoModelForImageTextToText.from_pretrained("{REPO}", trust_remote_code=True)
report["peft_logits"], _ = run(PeftModel.from_pretrained(base, "{ADAPTER_REPO}").eval(), inputs)
report["plugin_modules"] = sorted(name for name in sys.modules if name.startswith("hf_flexattention"))
torch.save(report, work / "report.pt")
"""


def run_script(hub: FakeHub, work: Path, script: str, *, block_plugin: bool = False) -> dict:
    """Run `script` in a fresh interpreter against the fake Hub (own cache, cwd `work`); return its report."""
    names = dict(
        REPO=REPO,
        NATIVE_REPO=NATIVE_REPO,
        ADAPTER_REPO=ADAPTER_REPO,
        ADAPTER_CARD_REPO=ADAPTER_CARD_REPO,
        ORIGINAL_REPO=ORIGINAL_REPO,
        BASE_MODEL=BASE_MODEL,
        STOCK_REPO=STOCK_REPO,
    )
    for name, value in names.items():
        script = script.replace("{" + name + "}", value)
    code = (BLOCK_PLUGIN if block_plugin else "") + COMMON + script
    env = hub.client_env(work / "hf_home", os.environ)
    env.update(TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    result = subprocess.run(
        [sys.executable, "-c", code, str(work)],
        cwd=work,
        env=env,
        stdin=subprocess.DEVNULL,  # transformers asks about remote code on a terminal; here it must raise
        capture_output=True,
        text=True,
        timeout=300,
    )
    if result.returncode != 0:
        pytest.fail(f"subprocess failed:\n{result.stderr[-6000:]}\nlast Hub requests: {hub.requests[-10:]}")
    return torch.load(work / "report.pt", weights_only=True)


@pytest.fixture(scope="module")
def hub():
    with FakeHub() as server:
        yield server


@pytest.fixture(scope="module")
def pushed(hub, tmp_path_factory):
    """Push everything from a process with the plugin, and load it back there (no trust_remote_code)."""
    work = tmp_path_factory.mktemp("push")
    make_image(1).save(work / "image.png")
    original = build_tiny_llava(num_layers=11)
    write_original(
        work / "original", original_state_dict(original, high_res_weights(original)), original_config(original)
    )
    write_clip(work / "clip", original, with_weights=False)
    return run_script(hub, work, PUSH) | {"work": work}


@pytest.fixture(scope="module")
def without_plugin(hub, pushed, tmp_path_factory):
    """Load everything in a process where `import hf_flexattention` fails."""
    work = tmp_path_factory.mktemp("without-plugin")
    make_image(1).save(work / "image.png")
    return run_script(hub, work, LOAD_WITHOUT_PLUGIN, block_plugin=True)


def required_imports(source: bytes) -> set[str]:
    """Top-level packages a module imports absolutely, outside `try` blocks (what transformers' check_imports
    requires to be installed before it runs remote code: imports in `try` are optional)."""
    packages = set()

    def visit(node):
        if isinstance(node, ast.Try):
            return
        if isinstance(node, ast.Import):
            packages.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            packages.add(node.module.split(".")[0])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return packages


def assert_tensors_identical(first: dict, second: dict):
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


# --- the pushed repositories ---------------------------------------------------------------------------------


def test_the_repository_holds_safetensors_config_remote_code_processor_and_card(hub, pushed):
    files = hub.files(REPO)
    assert {"config.json", "model.safetensors", "README.md", "processor_config.json", "tokenizer.json"} <= set(files)
    assert REMOTE_CODE_FILES <= set(files)
    assert not [name for name in files if name.endswith((".bin", ".pt", ".pth"))]
    assert not {"hub.py", "convert.py", "patching.py", "__init__.py"} & set(files)  # plugin-only modules stay home
    config = json.loads(files["config.json"])
    assert config["model_type"] == "flex_llava" and config["flex_n_fa"] == 2 and config["flex_threshold"] == 0.3
    assert config["auto_map"] == {
        "AutoConfig": "configuration_flex_llava.FlexLlavaConfig",
        "AutoModelForImageTextToText": "modeling_flex_llava.FlexLlavaForConditionalGeneration",
    }
    assert json.loads(files["processor_config.json"])["auto_map"]["AutoProcessor"] == (
        "processing_flex_llava.FlexLlavaProcessor"
    )
    for name in REMOTE_CODE_FILES:  # flat: relative imports of each other; nothing required from the plugin
        assert "hf_flexattention" not in required_imports(files[name]), name


def test_the_model_card(hub, pushed):
    card = ModelCard(hub.files(REPO)["README.md"].decode())
    assert card.data.library_name == "hf_flexattention"
    assert card.data.base_model == BASE_MODEL
    assert card.data.pipeline_tag == "image-text-to-text"
    assert {"hf_flexattention", "flexattention", "llava", "arxiv:2407.20228"} <= set(card.data.tags)
    text = card.text
    assert "| `flex_n_fa` | 2 FlexAttention layers (layers 2-3 of 4) |" in text
    assert "| `flex_threshold` | 0.3 |" in text and "`flex_zoom` | 3 (96 px high-res image" in text
    assert f'AutoModelForImageTextToText.from_pretrained("{REPO}")' in text and "import hf_flexattention" in text
    assert f'AutoModelForImageTextToText.from_pretrained("{REPO}", trust_remote_code=True)' in text
    assert f'AutoProcessor.from_pretrained("{REPO}", trust_remote_code=True)' in text
    assert "install and import `hf_flexattention`, or pass `trust_remote_code=True`" in text
    assert "FlexAttention for Efficient High-Resolution Vision-Language Models" in text and "2407.20228" in text
    assert "Li, Junyan and Chen, Delin and Cai, Tianle and Chen, Peihao and Hong, Yining and Chen, Zhenfang" in text


def test_a_push_to_a_branch_leaves_main_alone(hub, pushed):
    dev, main = hub.files(REPO, "dev"), hub.files(REPO)
    assert dev["model.safetensors"] == main["model.safetensors"]
    dev_card, main_card = ModelCard(dev["README.md"].decode()), ModelCard(main["README.md"].decode())
    assert "my-tag" in dev_card.data.tags and "my-tag" not in main_card.data.tags
    assert "processor_config.json" in dev  # the branch starts from main, which has the processor
    assert "If this repository holds no processor" in dev_card.text  # that push did not know


def test_model_push_to_hub_writes_the_flexattention_card(hub, pushed):
    card = ModelCard(hub.files(NATIVE_REPO)["README.md"].decode())
    assert card.data.library_name == "hf_flexattention" and "trust_remote_code=True" in card.text


def test_the_adapter_card(hub, pushed):
    files = hub.files(ADAPTER_CARD_REPO)
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "flex_attention.json"} <= set(files)
    assert "model.safetensors" not in files
    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "peft" and card.data.base_model == REPO
    assert {"hf_flexattention", "flexattention", "arxiv:2407.20228"} <= set(card.data.tags)
    assert f'load_adapter(AutoModelForImageTextToText.from_pretrained("{REPO}"), "{ADAPTER_CARD_REPO}")' in card.text
    assert "trust_remote_code=True" in card.text and "2407.20228" in card.text


# --- loading back, with the plugin ---------------------------------------------------------------------------


def test_with_the_plugin_auto_loading_needs_no_trust_remote_code(pushed):
    assert pushed["plugin_class"] == "hf_flexattention.modeling_flex_llava.FlexLlavaForConditionalGeneration"
    assert torch.equal(pushed["plugin_logits"], pushed["logits"])
    assert torch.equal(pushed["plugin_tokens"], pushed["tokens"])


def test_with_the_plugin_auto_processor_needs_no_trust_remote_code(pushed):
    assert pushed["plugin_processor_error"] is None, pushed["plugin_processor_error"]
    assert_tensors_identical(pushed["plugin_inputs"], pushed["inputs"])


def test_a_peft_adapter_round_trips_with_the_plugin(pushed):
    assert not torch.equal(pushed["peft_logits"], pushed["logits"])  # the adapter does something
    assert torch.equal(pushed["plugin_peft_logits"], pushed["peft_logits"])


def test_a_pushed_adapter_patches_a_stock_base_as_it_was_trained(pushed):
    assert torch.equal(pushed["stock_base_peft_logits"], pushed["peft_logits"])
    assert "records no FlexAttention settings" in pushed["unrecorded_adapter_error"]


def test_the_authors_checkpoint_converts_from_the_hub(pushed):
    converted = FlexLlavaForConditionalGeneration.from_pretrained(pushed["work"] / "converted")
    original = build_tiny_llava(num_layers=11)
    hd = high_res_weights(original)
    reference = patch_model(original, n_fa=2, threshold=48 / 255)
    with torch.no_grad():
        for index in (9, 10):
            reference.model.language_model.layers[index].self_attn.hr_k_proj.weight.copy_(hd[index][0])
            reference.model.language_model.layers[index].self_attn.hr_v_proj.weight.copy_(hd[index][1])
    assert converted.config.image_token_id == TINY_IMAGE_TOKEN_ID
    assert_tensors_identical(converted.state_dict(), reference.state_dict())


# --- loading back, without the plugin ------------------------------------------------------------------------


def test_the_plugin_cannot_be_imported_there(without_plugin):
    assert without_plugin["import_error"].startswith("ModuleNotFoundError")
    assert without_plugin["plugin_modules"] == []


def test_without_trust_remote_code_transformers_names_that_fix(without_plugin):
    # transformers' own message (which we cannot change) names trust_remote_code only; the model card and README
    # name both fixes (see test_the_model_card).
    for key in ("no_trust_error", "no_trust_processor_error"):
        message = without_plugin[key]
        assert message.startswith("ValueError") and "contains custom code" in message, message
        assert "trust_remote_code=True" in message


def test_remote_code_gives_identical_weights_logits_and_generate(pushed, without_plugin):
    model_class, config_class, processor_class = without_plugin["classes"]
    assert model_class.startswith("transformers_modules.") and model_class.endswith(
        ".FlexLlavaForConditionalGeneration"
    )
    assert config_class.endswith(".FlexLlavaConfig") and processor_class.endswith(".FlexLlavaProcessor")
    assert_tensors_identical(without_plugin["state"], pushed["state"])
    assert_tensors_identical(without_plugin["inputs"], pushed["inputs"])
    assert torch.equal(without_plugin["logits"], pushed["logits"])
    assert torch.equal(without_plugin["tokens"], pushed["tokens"])
    assert without_plugin["tokens"].shape[1] > pushed["inputs"]["input_ids"].shape[1]


def test_a_native_model_push_to_hub_loads_with_remote_code(pushed, without_plugin):
    assert torch.equal(without_plugin["native_logits"], pushed["logits"])
    assert without_plugin["native_processor_class"] == "FlexLlavaProcessor"


def test_a_peft_adapter_loads_on_the_remote_code_model(pushed, without_plugin):
    assert torch.equal(without_plugin["peft_logits"], pushed["peft_logits"])


# --- in process: cards and bad input (no Hub needed) ---------------------------------------------------------


def test_save_pretrained_writes_weights_processor_and_card(tmp_path, processor):
    model = patch_model(build_tiny_llava(), n_fa=1, selection="topk", topk_ratio=0.2)
    save_pretrained(model, tmp_path, processor, repo_id="me/flex")
    files = {path.name for path in tmp_path.iterdir()}
    assert {"model.safetensors", "config.json", "processor_config.json", "README.md"} <= files
    assert REMOTE_CODE_FILES <= files
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "hf_flexattention" and card.data.base_model is None
    # 0.2 of the 3x3 selection grid's 9 cells rounds to 2
    assert "(layer 3 of 4)" in card.text and "a budget of the 2 strongest of 3x3 cells per row" in card.text
    loaded = FlexLlavaForConditionalGeneration.from_pretrained(tmp_path)
    assert_tensors_identical(loaded.state_dict(), model.state_dict())


def test_model_save_pretrained_writes_the_card_but_keeps_a_users_card(tmp_path):
    model = patch_model(build_tiny_llava(), n_fa=2)
    model.save_pretrained(tmp_path / "new")
    card = ModelCard.load(tmp_path / "new" / "README.md")
    assert card.data.library_name == "hf_flexattention" and "trust_remote_code=True" in card.text
    (tmp_path / "edited").mkdir()
    (tmp_path / "edited" / "README.md").write_text("my own card")
    model.save_pretrained(tmp_path / "edited")
    assert (tmp_path / "edited" / "README.md").read_text() == "my own card"


def test_a_card_without_processor_says_how_to_build_one():
    model = patch_model(build_tiny_llava(), n_fa=2)
    text = create_model_card(model, base_model="llava-hf/llava-1.5-7b-hf", has_processor=False).text
    assert "FlexLlavaProcessor.from_llava_processor(llava_processor, zoom=3)" in text
    assert 'AutoProcessor.from_pretrained("llava-hf/llava-1.5-7b-hf")' in text
    assert create_model_card(model, base_model="/local/folder").data.base_model is None  # not a Hub id


def test_an_unpatched_model_is_refused_with_the_fix(processor):
    model = build_tiny_llava()
    for call in (
        lambda: push_to_hub(model, "me/x"),  # before any request: this process is offline
        lambda: save_pretrained(model, "unused"),
        lambda: create_model_card(model),
    ):
        with pytest.raises(TypeError, match=r"not patched with FlexAttention: call `hf_flexattention.patch_model"):
            call()
    with pytest.raises(TypeError, match="Expected a FlexAttention model"):
        push_to_hub(processor, "me/x")


def test_an_adapter_on_an_unpatched_model_is_refused_with_the_fix():
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(build_tiny_llava(), LoraConfig(target_modules=r".*language_model.*\.q_proj"))
    with pytest.raises(TypeError, match="`patch_model\\(base_model, n_fa=...\\)` before `get_peft_model`"):
        push_to_hub(peft_model, "me/x")
    flex_adapter = get_peft_model(patch_model(build_tiny_llava(), n_fa=2), LoraConfig(target_modules=r".*q_proj"))
    with pytest.raises(TypeError, match="for a PEFT adapter use"):
        create_model_card(flex_adapter)


def test_a_wrong_processor_is_refused_with_the_fix(processor):
    from transformers import LlavaProcessor

    model = patch_model(build_tiny_llava(), n_fa=2)
    stock = LlavaProcessor(image_processor=processor.image_processor, tokenizer=processor.tokenizer, patch_size=4)
    with pytest.raises(TypeError, match=r"FlexLlavaProcessor.from_llava_processor\(processor, zoom=3\)"):
        push_to_hub(model, "me/x", processor=stock)
    patch_model(model, n_fa=2, zoom=2)
    with pytest.raises(ValueError, match="zoom=3 does not match the model's flex_zoom=2"):
        push_to_hub(model, "me/x", processor=processor)
