"""Tokenizers, chat templates and generation configs against transformers (tests/fixtures/chat, made by
scripts/make_tokenizer_fixtures.py), and the multi-turn ChatSession that keeps its KV cache.

What is proven here
-------------------
* ``tokenizer.encode(text)`` equals ``AutoTokenizer(folder)(text)["input_ids"]`` (BOS from the
  tokenizer.json post-processor; transformers 5 ignores add_bos_token/add_eos_token then), decode too.
* ``apply_chat_template`` ids equal transformers' for every recorded conversation (system messages,
  a default system prompt, tools through tojson, template variables, chat_template.jinja and inline
  templates); a template's raise_exception is a ChatTemplateError; the sandbox refuses escapes.
* greedy generation from a text prompt and from a chat equals transformers' ``generate``, stopping at
  a generation_config.json stop id; generation_config.json supplies stop ids and sampling defaults,
  explicit arguments win.
* a ChatSession turn gives the tokens a fresh generation of the whole conversation gives, while
  prefilling only the new turn (and a deliberately broken variant that forgets the cache differs);
  when the template re-renders history differently it re-prefills and says so.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import minikv
from minikv.chat import ChatSession, apply_chat_template, render_chat, run_repl
from minikv.errors import CacheOverflowError, ChatTemplateError, ConfigError, InvalidInputError
from minikv.generation_config import GenerationConfig
from minikv.tokenizer import ByteTokenizer, HFTokenizer

ROOT = Path(__file__).resolve().parents[1]
CHAT = ROOT / "tests" / "fixtures" / "chat"
NAMES = ("chatml", "llama3", "spm")


def expected(name):
    return json.loads((CHAT / name / "expected.json").read_text())


_models = {}


def model_for(name, dtype="float64"):
    if (name, dtype) not in _models:
        _models[(name, dtype)] = minikv.load(CHAT / name, dtype=dtype)
    return _models[(name, dtype)]


# ---------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("name", NAMES)
def test_encode_adds_special_tokens_as_transformers_does(name):
    tok = HFTokenizer(CHAT / name)
    for item in expected(name)["encode"]:
        assert tok.encode(item["text"]) == item["ids"], item["text"]


def test_bos_comes_from_the_post_processor_and_add_bos_token_is_ignored_like_transformers_5():
    llama3, spm, chatml = (HFTokenizer(CHAT / n) for n in ("llama3", "spm", "chatml"))
    assert llama3.encode("Hello world")[0] == llama3.token_id("<|begin_of_text|>")
    assert llama3.encode("Hello world", add_special_tokens=False)[0] != llama3.token_id("<|begin_of_text|>")
    # spm's tokenizer_config.json says add_eos_token: true; transformers 5 adds no EOS, nor do we.
    ids = spm.encode("Hello world")
    assert ids[0] == spm.token_id("<s>") and ids[-1] != spm.token_id("</s>")
    assert chatml.encode("Hello world") == chatml.encode("Hello world", add_special_tokens=False)


@pytest.mark.parametrize("name", NAMES)
def test_decode_with_and_without_special_tokens(name):
    tok = HFTokenizer(CHAT / name)
    for item in expected(name)["decode"]:
        assert tok.decode(item["ids"], skip_special_tokens=item["skip_special_tokens"]) == item["text"]


def test_a_corrupt_tokenizer_file_is_a_checkpoint_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(minikv.CheckpointError, match="tokenizer.json"):
        HFTokenizer(tmp_path)


# ---------------------------------------------------------------- chat templates


@pytest.mark.parametrize("name", NAMES)
def test_chat_template_ids_equal_transformers(name):
    tok = HFTokenizer(CHAT / name)
    records = expected(name)["chat"]
    assert records
    for item in records:
        ids = apply_chat_template(tok, item["messages"], add_generation_prompt=item["add_generation_prompt"],
                                  tools=item.get("tools"), **item["kwargs"])
        assert ids == item["ids"], item


def test_the_template_file_wins_and_the_inline_template_is_read():
    assert not (CHAT / "chatml" / "chat_template.jinja").exists()       # inline in tokenizer_config.json
    assert "<|im_start|>" in HFTokenizer(CHAT / "chatml").chat_template
    assert (CHAT / "llama3" / "chat_template.jinja").exists()           # transformers 5's file
    assert HFTokenizer(CHAT / "llama3").chat_template == (CHAT / "llama3" / "chat_template.jinja").read_text()


@pytest.mark.parametrize("name", NAMES)
def test_a_template_that_refuses_the_messages_is_a_chat_template_error(name):
    tok = HFTokenizer(CHAT / name)
    for item in expected(name)["refused"]:
        with pytest.raises(ChatTemplateError, match=item["error"].replace("/", ".").replace(".", r"\.")[:20]):
            apply_chat_template(tok, item["messages"])


def test_tojson_keeps_non_ascii_and_html_and_strftime_now_is_today():
    tok = ByteTokenizer()
    tok.chat_template = "{{ messages[0] | tojson }}|{{ strftime_now('%Y-%m-%d') }}"
    before = datetime.now()
    text = render_chat(tok, [{"role": "user", "content": "<b>café</b> & 'x'"}])
    after = datetime.now()
    assert text.split("|")[0] == '{"role": "user", "content": "<b>café</b> & \'x\'"}'
    assert text.split("|")[1] in {before.strftime("%Y-%m-%d"), after.strftime("%Y-%m-%d")}


@pytest.mark.parametrize("template", ["{{ ''.__class__.__mro__ }}", "{% set x = [] %}{{ x.append(1) }}",
                                      "{{ messages.pop() }}"])
def test_the_sandbox_refuses_escapes_and_mutation(template):
    tok = ByteTokenizer()
    tok.chat_template = template
    with pytest.raises(ChatTemplateError):
        render_chat(tok, [{"role": "user", "content": "hi"}])


def test_a_template_that_does_not_parse_is_a_chat_template_error():
    tok = ByteTokenizer()
    tok.chat_template = "{% for m in messages %}"
    with pytest.raises(ChatTemplateError, match="does not parse"):
        render_chat(tok, [{"role": "user", "content": "hi"}])


def test_no_template_is_a_chat_template_error_naming_the_files():
    model = minikv.load()
    with pytest.raises(ChatTemplateError, match="chat_template.jinja"):
        model.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(ChatTemplateError, match="no chat template"):
        ChatSession(model)


@pytest.mark.parametrize("messages", [[], "hi", [{"content": "no role"}], [("user", "hi")]])
def test_bad_messages_are_refused(messages):
    with pytest.raises(InvalidInputError, match="message"):
        apply_chat_template(HFTokenizer(CHAT / "chatml"), messages)


def test_none_values_are_dropped_as_transformers_does():
    tok = HFTokenizer(CHAT / "chatml")
    with_none = [{"role": "user", "content": "Hello!", "tool_calls": None}]
    assert apply_chat_template(tok, with_none, True) == expected("chatml")["chat"][0]["ids"]


# ---------------------------------------------------------------- generation config and greedy ids


def test_greedy_from_a_text_prompt_equals_transformers_with_its_bos():
    model = model_for("llama3")
    record = expected("llama3")["generate"][0]
    assert model.tokenizer.encode("Once upon a time") == record["prompt_ids"]     # BOS included
    # llama3's generation_config.json samples (do_sample true); temperature=0.0 passed explicitly wins.
    out = model.generate("Once upon a time", max_new_tokens=record["max_new_tokens"], temperature=0.0)
    stop = record["ids"][-1]
    assert stop in model.generation_config.eos_token_ids
    assert out.tokens[0] + [stop] == record["ids"] and out.finish_reasons == ["stop"]


@pytest.mark.parametrize("name", ["chatml", "llama3"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_greedy_ids_equal_transformers_and_stop_at_a_generation_config_stop_id(name, dtype):
    model = model_for(name, dtype)
    stops = set(model.generation_config.eos_token_ids)
    assert not stops <= set(model.config.eos_token_ids)           # the stop list is generation_config.json's
    stopped = 0
    for record in expected(name)["generate"]:
        out = model.generate([record["prompt_ids"]], max_new_tokens=record["max_new_tokens"], temperature=0.0)
        if out.finish_reasons[0] == "stop":
            stopped += 1
            assert record["ids"][-1] in stops
            assert out.tokens[0] + [record["ids"][-1]] == record["ids"]
        else:
            assert out.tokens[0] == record["ids"] and len(record["ids"]) == record["max_new_tokens"]
    assert stopped >= 1


def test_chat_generation_equals_transformers():
    model = model_for("chatml")
    conversation = expected("chatml")["chat"][0]
    record = expected("chatml")["generate"][0]
    assert model.apply_chat_template(conversation["messages"], add_generation_prompt=True) == record["prompt_ids"]
    out = model.chat(conversation["messages"], max_new_tokens=record["max_new_tokens"])   # greedy by its config
    assert out.tokens[0] + [record["ids"][-1]] == record["ids"]
    assert out.text == model.tokenizer.decode(out.tokens[0]) and isinstance(out.text, str)


def test_generation_config_supplies_defaults_and_explicit_arguments_win():
    chatml, llama3 = model_for("chatml"), model_for("llama3")
    # chatml: do_sample false -> greedy although the file gives temperature 0.7.
    s = chatml.stream("Hi", max_new_tokens=2)
    assert s.params.is_greedy and s.stop_tokens.tolist() == list(chatml.generation_config.eos_token_ids)
    # llama3: do_sample true, temperature 0.6, top_p 0.9, no top_k -> transformers' top_k 50.
    s = llama3.stream("Hi", max_new_tokens=2)
    assert (s.params.temperature, s.params.top_p, s.params.top_k) == (0.6, 0.9, 50)
    s = llama3.stream("Hi", max_new_tokens=2, temperature=1.2, top_k=None, top_p=None, stop_tokens=[])
    assert (s.params.temperature, s.params.top_p, s.params.top_k) == (1.2, None, None)
    assert s.stop_tokens.tolist() == []


def test_max_new_tokens_and_repetition_penalty_from_the_file(tmp_path):
    config = GenerationConfig.from_dict({"max_new_tokens": 3, "repetition_penalty": 1.3, "eos_token_id": 5})
    assert config.defaults() == {"stop_tokens": [5], "temperature": 0.0, "repetition_penalty": 1.3,
                                 "max_new_tokens": 3}
    assert GenerationConfig.from_dict({"do_sample": True, "top_k": 0, "top_p": 1.0}).defaults() == {
        "temperature": 1.0, "top_k": None, "top_p": None, "min_p": None}


@pytest.mark.parametrize("field, value", [("eos_token_id", "2"), ("eos_token_id", [1, -2]), ("temperature", -1),
                                          ("top_p", 1.5), ("top_k", 2.5), ("do_sample", "yes"),
                                          ("max_new_tokens", 0)])
def test_a_bad_generation_config_is_a_config_error_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        GenerationConfig.from_dict({field: value})


def test_an_unreadable_generation_config_is_a_config_error(tmp_path):
    (tmp_path / "generation_config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        GenerationConfig.from_json(tmp_path / "generation_config.json")


# ---------------------------------------------------------------- save -> load round trip


def test_save_writes_tokenizer_files_and_generation_config(tmp_path):
    for name in ("chatml", "llama3"):
        model = model_for(name)
        folder = model.save(tmp_path / name)
        for file in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            assert (folder / file).read_text() == (CHAT / name / file).read_text()
        back = minikv.load(folder, dtype="float64")
        conversation = expected(name)["chat"][0]
        assert back.apply_chat_template(conversation["messages"], add_generation_prompt=True,
                                        **conversation["kwargs"]) == conversation["ids"]
        assert back.generation_config == model.generation_config
        assert back.stream("Hi", max_new_tokens=1).stop_tokens.tolist() == list(model.generation_config.eos_token_ids)
    assert (tmp_path / "llama3" / "chat_template.jinja").exists()


# ---------------------------------------------------------------- ChatSession: the cache kept across turns


class TemplatedBytes(ByteTokenizer):
    """The bundled byte-level model with a chat template: a reply re-reads as the same bytes, so the
    cached ids are always a prefix of the next prompt."""

    chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
                     "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture
def bytes_model():
    model = minikv.load()
    model.tokenizer = TemplatedBytes()
    return model


def fresh_reply(model, messages, **options):
    ids = model.apply_chat_template(messages, add_generation_prompt=True)
    return model.generate([ids], **options).tokens[0]


def run_turns(session, texts):
    replies = []
    for text in texts:
        "".join(session.send(text))
        replies.append(session.last_turn)
    return replies


def test_each_turn_prefills_only_the_new_tokens_and_equals_a_fresh_generation(bytes_model):
    session = ChatSession(bytes_model, system="Be brief.", max_new_tokens=12, max_seq_len=512)
    for turn, text in enumerate(["Hello there", "Tell me more", "Why?"], start=1):
        history = list(session.messages)
        prompt_ids = bytes_model.apply_chat_template(history + [{"role": "user", "content": text}], True)
        reply = "".join(session.send(text))
        stats = session.last_turn
        assert stats.turn == turn and stats.rewound == 0
        assert stats.reused + stats.prefilled == len(prompt_ids)
        if turn > 1:
            assert stats.reused > 0 and stats.prefilled < len(prompt_ids)
        assert int(session.cache.lengths[0]) == len(session.cached_ids) == stats.cache_positions
        expected_tokens = fresh_reply(bytes_model, history + [{"role": "user", "content": text}], max_new_tokens=12)
        assert session.last_tokens == expected_tokens
        assert session.messages[-1] == {"role": "assistant", "content": reply}


_bundled = {}


@settings(max_examples=8, deadline=None)
@given(texts=st.lists(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=12),
                      min_size=1, max_size=3),
       max_new_tokens=st.integers(1, 6))
def test_property_every_turn_equals_a_fresh_generation_of_the_whole_conversation(texts, max_new_tokens):
    if "model" not in _bundled:
        _bundled["model"] = minikv.load()
        _bundled["model"].tokenizer = TemplatedBytes()
    model = _bundled["model"]
    session = ChatSession(model, max_new_tokens=max_new_tokens, max_seq_len=256)
    for text in texts:
        history = session.messages + [{"role": "user", "content": text}]
        reply = "".join(session.send(text))
        assert session.last_tokens == fresh_reply(model, history, max_new_tokens=max_new_tokens)
        assert reply == model.tokenizer.decode(session.last_tokens)
        assert int(session.cache.lengths[0]) == len(session.cached_ids)
        # every sampled token but the last was fed back (no stop ids: each reply runs to max_new_tokens)
        assert session.cached_ids == model.apply_chat_template(history, True) + session.last_tokens[:-1]
        assert session.last_turn.rewound == 0


def test_a_repetition_penalty_counts_the_cached_turns_as_a_fresh_run_does(bytes_model):
    session = ChatSession(bytes_model, max_new_tokens=16, max_seq_len=512, repetition_penalty=1.5)
    for text in ["Hello there", "Tell me more"]:
        history = session.messages + [{"role": "user", "content": text}]
        "".join(session.send(text))
        assert session.last_tokens == fresh_reply(bytes_model, history, max_new_tokens=16, repetition_penalty=1.5)
    assert session.last_turn.reused > 0


def test_cached_tokens_must_match_what_the_cache_holds(bytes_model):
    cache = bytes_model.new_cache("static", max_seq_len=64)
    bytes_model.forward(np.array([[72, 105]]), cache=cache)
    with pytest.raises(InvalidInputError, match="cached_tokens"):
        bytes_model.stream([[33]], cache=cache, cached_tokens=[[72]], max_new_tokens=2)
    with pytest.raises(InvalidInputError, match="no cache given"):
        bytes_model.stream([[33]], cache="none", cached_tokens=[[]], max_new_tokens=2)


def test_the_kept_cache_gives_the_full_prompt_logits_and_a_broken_variant_that_forgets_it_does_not(bytes_model):
    session = ChatSession(bytes_model, max_new_tokens=12, max_seq_len=512)
    run_turns(session, ["Hello there"])
    messages = session.messages + [{"role": "user", "content": "Tell me more"}]
    ids = bytes_model.apply_chat_template(messages, add_generation_prompt=True)
    suffix = np.array([ids[len(session.cached_ids):]])
    full = bytes_model.forward(np.array([ids]))[0, -1]
    kept = bytes_model.forward(suffix, cache=session.cache)[0, -1]      # what the session's next turn computes
    forgetful = bytes_model.forward(suffix)[0, -1]                      # the suffix without the cache
    assert np.abs(kept - full).max() < 1e-4                             # float32
    assert np.abs(forgetful - full).max() > 1e-2


def test_a_template_that_rewrites_history_rewinds_to_the_common_prefix_and_says_so(bytes_model):
    class Rewriting(ByteTokenizer):
        # Only the last user message is shown in full: earlier turns re-render differently.
        chat_template = ("{% for m in messages %}{% if loop.last %}<{{ m.role }}>{{ m.content }}\n"
                         "{% else %}<{{ m.role }}>.\n{% endif %}{% endfor %}<assistant>")

    bytes_model.tokenizer = Rewriting()
    session = ChatSession(bytes_model, max_new_tokens=8, max_seq_len=512)
    first, = run_turns(session, ["Hello there"])
    held = list(session.cached_ids)
    history = session.messages + [{"role": "user", "content": "Again"}]
    ids = bytes_model.apply_chat_template(history, True)
    common = next(i for i, (a, b) in enumerate(zip(held, ids)) if a != b)
    assert common == len(b"<user>")
    second, = run_turns(session, ["Again"])
    assert first.rewound == 0 and (second.reused, second.rewound) == (common, len(held) - common)
    assert second.prefilled == len(ids) - common
    assert f"{len(held) - common} cached tokens rewound" in str(second)
    assert session.last_tokens == fresh_reply(bytes_model, history, max_new_tokens=8)


def test_a_refused_turn_that_would_rewind_changes_nothing(bytes_model):
    class Rewriting(ByteTokenizer):
        chat_template = ("{% for m in messages %}{% if loop.last %}<{{ m.role }}>{{ m.content }}\n"
                         "{% else %}<{{ m.role }}>.\n{% endif %}{% endfor %}<assistant>")

    bytes_model.tokenizer = Rewriting()
    session, control = (ChatSession(bytes_model, max_new_tokens=8, max_seq_len=64) for _ in range(2))
    run_turns(session, ["Hello there"])
    run_turns(control, ["Hello there"])
    with pytest.raises(CacheOverflowError):
        "".join(session.send("y" * 70))                      # would rewind, then does not fit
    assert session.cached_ids == control.cached_ids and (session.cache.lengths == control.cache.lengths).all()
    a, b = run_turns(session, ["Again"])[0], run_turns(control, ["Again"])[0]
    assert session.last_tokens == control.last_tokens and (a.reused, a.rewound) == (b.reused, b.rewound)


@pytest.mark.parametrize("option", ["cache", "stream", "cached_tokens"])
def test_a_session_refuses_cache_options_it_owns(bytes_model, option):
    with pytest.raises(InvalidInputError, match=option):
        ChatSession(bytes_model, **{option: "static"})


def test_a_turn_that_does_not_fit_changes_nothing(bytes_model):
    session = ChatSession(bytes_model, max_new_tokens=8, max_seq_len=64)
    run_turns(session, ["Hi"])
    before = (list(session.messages), list(session.cached_ids), session.cache.lengths.copy())
    with pytest.raises(CacheOverflowError, match="max_seq_len"):
        "".join(session.send("x" * 80))
    assert (session.messages, session.cached_ids) == before[:2]
    assert (session.cache.lengths == before[2]).all()
    run_turns(session, ["Hi again"])            # the conversation goes on from where it was
    assert session.last_turn.reused > 0


def test_session_with_a_real_tokenizer_equals_fresh_generation():
    model = model_for("chatml")
    session = ChatSession(model, max_new_tokens=6, max_seq_len=256)
    for text in ["Hello!", "And of Japan?"]:
        history = list(session.messages)
        "".join(session.send(text))
        fresh = fresh_reply(model, history + [{"role": "user", "content": text}], max_new_tokens=6)
        assert session.last_tokens == fresh
        assert session.messages[-1]["content"] == model.tokenizer.decode(fresh, skip_special_tokens=True)
        assert session.last_turn.reused + session.last_turn.prefilled == len(
            model.apply_chat_template(history + [{"role": "user", "content": text}], True))
        assert int(session.cache.lengths[0]) == len(session.cached_ids)


def test_repl_streams_replies_and_prints_stats_with_prefix_reuse(bytes_model):
    stdin = io.StringIO("Hello there\n\nTell me more\n/reset\nHi\n/exit\nnot read\n")
    stdout, stderr = io.StringIO(), io.StringIO()
    assert run_repl(bytes_model, stdin, stdout, stderr, max_new_tokens=10, max_seq_len=512) == 0
    assert stdout.getvalue().count("assistant> ") == 3
    stats = [line for line in stderr.getvalue().splitlines() if line.startswith("[turn")]
    assert len(stats) == 3
    assert "turn 1: 0 tokens reused" in stats[0] and "turn 2: 0 tokens reused" not in stats[1]
    assert "[conversation cleared]" in stderr.getvalue()
    assert "turn 3: 0 tokens reused" in stats[2]          # after /reset nothing is cached


def run_cli(*args, stdin=""):
    return subprocess.run([sys.executable, "-m", "minikv", *args], input=stdin, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def test_minikv_chat_command_keeps_the_cache_across_turns():
    result = run_cli("chat", "--model", str(CHAT / "chatml"), "--max-new-tokens", "5", stdin="Hello!\nAnd you?\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("assistant> ") == 2
    turns = [line for line in result.stderr.splitlines() if line.startswith("[turn")]
    assert len(turns) == 2 and "tok/s" in turns[1]


def test_minikv_generate_samples_as_the_generation_config_says():
    # chatml's generation_config.json: do_sample false -> greedy, although no --temperature is given
    # (a checkpoint without one gets model.generate's default, greedy too; the point is the file is read).
    record = expected("chatml")["generate"][2]
    tokenizer = HFTokenizer(CHAT / "chatml")
    assert tokenizer.encode("The cache") == record["prompt_ids"]
    result = run_cli("generate", "The cache", "--model", str(CHAT / "chatml"), "--max-new-tokens", "24")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "The cache" + tokenizer.decode(record["ids"]) + "\n"


def test_minikv_info_shows_the_tokenizer_template_and_generation_config():
    result = run_cli("info", "--model", str(CHAT / "llama3"))
    assert result.returncode == 0, result.stderr
    stops = list(model_for("llama3").generation_config.eos_token_ids)
    assert "chat template: yes" in result.stdout and f"stop ids {stops}" in result.stdout
    assert "temperature 0.6" in result.stdout and "top_p 0.9" in result.stdout
    assert "chat template: no" in run_cli("info").stdout


def test_minikv_chat_without_a_template_is_one_line_and_exit_2():
    result = run_cli("chat", stdin="hi\n")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "ChatTemplateError" in line
