"""What a newcomer meets first: the public API's signatures and docstrings, typo'd keywords, the CLI's
defaults and --version, the licence and py.typed, and the bundled model's usable length."""

import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import minikv
from minikv.generate import Stream

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    return minikv.load()


def keyword_options(function) -> set[str]:
    params = inspect.signature(function).parameters
    return {name for name, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)} - {"self", "model", "prompt"}


@pytest.mark.parametrize("method", ["generate", "stream"])
def test_generate_and_stream_name_every_option_of_minikv_generate(method):
    """An IDE shows Transformer.generate's parameters: every option minikv.generate takes must be one."""
    wanted = keyword_options(Stream.__init__) | {"block_size", "num_blocks", "window"}
    have = keyword_options(getattr(minikv.Transformer, method))
    missing = wanted - have
    assert not missing, f"add {sorted(missing)} to Transformer.{method}'s parameters (and its docstring)"
    doc = inspect.getdoc(minikv.Transformer.generate)
    for name in wanted:
        assert re.search(rf"\b{name}\b", doc), f"Transformer.generate's docstring does not explain {name}"


@pytest.mark.parametrize("function, words", [
    (minikv.load, ["path", "dtype", "backend", "attention", "bundled", "256"]),
    (minikv.Transformer.new_cache, ["kind", "batch_size", "max_seq_len", "dtype", "block_size", "num_blocks",
                                    "window"]),
    (minikv.Transformer.stream, ["TokenEvent", "output"]),
])
def test_public_functions_document_every_option(function, words):
    doc = inspect.getdoc(function)
    assert len(doc.splitlines()) > 5, f"{function.__qualname__} has a one-line docstring"
    for word in words:
        assert word in doc, f"{function.__qualname__}'s docstring does not mention {word}"


@pytest.mark.parametrize("typo, nearest", [("temprature", "temperature"), ("top_kk", "top_k"),
                                           ("max_new_token", "max_new_tokens"), ("blocksize", "block_size")])
@pytest.mark.parametrize("method", ["generate", "stream"])
def test_a_typo_names_the_nearest_option(model, method, typo, nearest):
    with pytest.raises(minikv.UnknownOptionError, match=rf"{typo}'; did you mean {nearest}\?"):
        getattr(model, method)("Hi", **{typo: 1})


def test_unknown_option_error_is_both_a_minikv_error_and_a_type_error(model):
    with pytest.raises(TypeError) as caught:
        model.generate("Hi", zzz=1)
    assert isinstance(caught.value, minikv.MinikvError)
    assert "valid options:" in str(caught.value) and "temperature" in str(caught.value)   # nothing close: list them


def test_options_left_out_take_minikv_generates_defaults(model):
    """Transformer.generate forwards only what it is given: the same tokens as minikv.generate.generate."""
    from minikv.generate import generate

    assert model.generate("Once upon").tokens == generate(model, "Once upon").tokens
    assert len(model.generate("Once upon").tokens[0]) == 50        # the documented default
    sampled = dict(temperature=0.9, top_p=0.9, seed=4, max_new_tokens=12)
    assert model.generate("Once upon", **sampled).tokens == generate(model, "Once upon", **sampled).tokens


def test_new_cache_option_for_another_kind_is_refused(model):
    with pytest.raises(minikv.ConfigError, match="block_size=4 applies to cache='paged', not cache='static'"):
        model.new_cache("static", block_size=4)
    assert model.new_cache("paged", block_size=4).block_size == 4


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "minikv", *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)


def test_cli_version_and_defaults_in_help():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"minikv {minikv.__version__}"
    pyproject = (ROOT / "pyproject.toml").read_text()   # (tomllib is Python 3.11+; minikv supports 3.10)
    assert f'\nversion = "{minikv.__version__}"\n' in pyproject
    help_text = " ".join(run_cli("generate", "--help").stdout.split())
    # The API's defaults: the checkpoint's generation_config.json, else greedy and 50 tokens.
    for option, default in [("--max-new-tokens", "generation_config.json's, else 50"),
                            ("--temperature", "generation_config.json, else greedy"), ("--cache", "static"),
                            ("--top-p", "generation_config.json's, else off")]:
        assert re.search(rf"{option} .*?\(default: [^)]*{re.escape(default)}\)", help_text), (option, help_text)
    assert "(default: None)" not in help_text


def test_cli_generate_defaults_are_the_apis(model):
    """With no options the CLI prints exactly what model.generate(prompt) makes (greedy, 50 tokens)."""
    result = run_cli("generate", "The early bird")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "The early bird" + model.generate("The early bird").text + "\n"


def test_licence_and_py_typed_ship():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '\nlicense = { text = "MIT" }\n' in pyproject
    licence = (ROOT / "LICENSE").read_text()
    assert licence.startswith("MIT License") and "Permission is hereby granted, free of charge" in licence
    assert (ROOT / "minikv" / "py.typed").exists()
    package_data = pyproject.split("[tool.setuptools.package-data]")[1].split("\n[")[0]
    assert '"py.typed"' in package_data


@pytest.mark.parametrize("folder", ["tiny-fortunes", "tiny-fortunes-draft"])
def test_bundled_model_configs_state_the_length_they_were_trained_on(folder):
    """Trained on 256-byte windows: a config must not promise more (they said 512)."""
    folder = minikv.BUNDLED_MODEL.parent / folder
    training = (folder / "TRAINING.md").read_text()
    context = int(re.search(r"^\| context \| (\d+) \|", training, re.M).group(1))
    config = json.loads((folder / "config.json").read_text())
    assert config["max_position_embeddings"] == context == 256


def test_the_bundled_model_refuses_and_reports_more_than_it_can_use(model):
    assert model.config.max_position_embeddings == 256
    with pytest.raises(minikv.SequenceTooLongError):
        model.generate("x" * 200, max_new_tokens=60)
    info = run_cli("info")
    assert "max positions 256" in info.stdout and "256-byte windows" in info.stdout
