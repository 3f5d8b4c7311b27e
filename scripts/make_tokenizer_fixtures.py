"""Build the tokenizer / chat-template / generation-config fixtures in tests/fixtures/chat/.

Run by hand (the tests never need torch or transformers):

    python scripts/make_tokenizer_fixtures.py

Needs torch, transformers (5.x), tokenizers and jinja2. For each fixture it trains a small BPE with
the `tokenizers` library on the corpus below, saves it with transformers (PreTrainedTokenizerFast
.save_pretrained), sets the tokenizer class a real checkpoint of that style names, loads the folder
back with AutoTokenizer and records what transformers does, in expected.json:

    encode    AutoTokenizer(folder)(text)["input_ids"] for several texts (special-token text included)
    decode    tokenizer.decode(ids, skip_special_tokens=...)
    chat      tokenizer.apply_chat_template(messages, add_generation_prompt=..., tokenize=True) ids
    refused   conversations the template itself refuses (raise_exception)
    generate  (fixtures with a model) greedy ids of a tiny random LlamaForCausalLM (float32), from a text
              prompt and from a chat prompt, stopping at a generation_config.json stop id

Fixtures:
    chatml   Qwen2-style: byte-level BPE with Qwen2's pre-tokenizer, tokenizer_class Qwen2Tokenizer, no BOS,
             a ChatML template inline in tokenizer_config.json (default system message, tools via tojson);
             a model and generation_config.json with do_sample=false and a list of stop ids.
    llama3   Llama-3-style: byte-level BPE whose tokenizer.json post-processor adds <|begin_of_text|>,
             tokenizer_class PreTrainedTokenizerFast, the template in chat_template.jinja (as transformers 5
             saves it; bos_token, date_string/strftime_now); a model; sampling defaults in generation_config.json.
    spm      Llama-2/Mistral-style: Metaspace BPE, tokenizer_class LlamaTokenizer, post-processor "<s> $A",
             add_bos_token and add_eos_token true in tokenizer_config.json (transformers 5 ignores both when
             tokenizer.json exists: the expected ids show it), an [INST] template that refuses
             non-alternating roles. transformers 5 rebuilds a LlamaTokenizer from tokenizer.json's vocab and
             merges with its own pipeline (byte_fallback on), so a character outside this small vocabulary
             would be dropped by transformers but be <unk> for tokenizer.json; real Llama/Mistral vocabularies
             hold all 256 byte tokens, and the corpus holds every ASCII character, so the two agree here.

The stop id of each model fixture is a token its greedy run actually produces (found by a first run
without stop ids), so stopping is exercised; each greedy step's top-1/top-2 logit margin is checked to
exceed 1e-3, so float32 transformers and minikv cannot disagree on a near tie.
"""

from __future__ import annotations

import json
import shutil
import string
from pathlib import Path

import numpy as np
import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "chat"

CORPUS = """Once upon a time there was a small model that wanted to talk.
It read every fortune it could find, and it learned that the cache remembers what attention forgets.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!
How vexingly quick daft zebras jump; the five boxing wizards jump quickly.
You are a helpful assistant. What is the capital of France? The capital of France is Paris.
Tell me a joke about keys, values and queries. Why did the query attend to the key? It had a value.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 1024 3.14159 2026-11-29.
Unicode: café, naïve, Zürich, smörgåsbord, 東京, 😀 and 🚀 travel far.
def forward(x):\n    return attention(q, k, v) + x\n
It's what you'd expect: we're here, they've gone, I'm sure it'll work.
""" + string.printable + "\n"     # every ASCII character is in each vocabulary (see the note on spm above)

TEXTS = [
    "Hello world",
    "The cache remembers what attention forgets.",
    "  leading spaces and trailing  ",
    "Unicode: café 東京 😀",
    "line one\nline two\n\nline four",
    "",
    "It's 3.14159, isn't it?",
]

QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

CHATML_TEMPLATE = """{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}
{{- messages[0].content + '\\n\\n' }}
{%- endif %}
{{- 'You may call these tools:\\n' }}
{%- for tool in tools %}
{{- tool | tojson + '\\n' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- else %}
{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'system' %}
        {%- if not loop.first %}
            {{- raise_exception('a system message must come first') }}
        {%- endif %}
    {%- elif message.role in ['user', 'assistant'] %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- else %}
        {{- raise_exception('unknown role: ' + message.role) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if date_string is not defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
{%- endif %}
{%- if messages[0].role == 'system' %}
    {%- set system_message = messages[0].content | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + message.content | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

INST_TEMPLATE = """{{- bos_token }}
{%- for message in messages %}
    {%- if (message.role == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message.role == 'user' %}
        {{- '[INST] ' + message.content + ' [/INST]' }}
    {%- elif message.role == 'assistant' %}
        {{- ' ' + message.content + eos_token }}
    {%- endif %}
{%- endfor %}
"""

CONVERSATIONS = [
    ([{"role": "user", "content": "Hello!"}], True, {}),
    ([{"role": "user", "content": "Hello!"}], False, {}),
    ([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is the capital of France?"},
      {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Japan? 東京?"}], True, {}),
    ([{"role": "system", "content": "  Be kind.  "}, {"role": "user", "content": "Tell me a joke"}], True, {}),
]

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city <b>now</b> — café",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def train_bpe(pre_tokenizer, decoder, normalizer, specials, vocab_size, alphabet=()) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None if alphabet else "<unk>"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoder
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=list(alphabet),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines(keepends=True) * 4, trainer)
    return tok


def save_tokenizer(folder: Path, tok: Tokenizer, tokenizer_class: str, template: str, inline_template: bool,
                   config_extra: dict, **special) -> None:
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **special)
    fast.chat_template = template
    fast.save_pretrained(folder, save_jinja_files=not inline_template)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = tokenizer_class
    config.update(config_extra)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def record_tokenizer(folder: Path, conversations, tools_conversation: bool, template_kwargs: dict,
                     refused=()) -> dict:
    hf = AutoTokenizer.from_pretrained(folder)
    specials = [t for t in hf.all_special_tokens]
    texts = TEXTS + ["".join(specials[:2]) + " text between " + specials[-1] + "x"]
    encode = [{"text": t, "ids": hf(t)["input_ids"]} for t in texts]
    decode = []
    for item in encode[:4] + encode[-1:]:
        ids = item["ids"] + hf.convert_tokens_to_ids(specials[:1])
        for skip in (False, True):
            decode.append({"ids": ids, "skip_special_tokens": skip, "text": hf.decode(ids, skip_special_tokens=skip)})
    chat = []
    for messages, add_generation_prompt, _ in conversations:
        ids = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                     return_dict=False, **template_kwargs)
        chat.append({"messages": messages, "add_generation_prompt": add_generation_prompt,
                     "kwargs": template_kwargs, "ids": ids})
    if tools_conversation:
        messages = conversations[2][0]
        ids = hf.apply_chat_template(messages, tools=TOOLS, add_generation_prompt=True, tokenize=True,
                                     return_dict=False)
        chat.append({"messages": messages, "add_generation_prompt": True, "kwargs": {}, "tools": TOOLS, "ids": ids})
    refusals = []
    for messages, needle in refused:
        try:
            hf.apply_chat_template(messages, tokenize=True, return_dict=False)
        except Exception as exc:  # jinja2's TemplateError
            assert needle in str(exc), exc
            refusals.append({"messages": messages, "error": needle})
        else:
            raise AssertionError(f"transformers accepted {messages}")
    return {"tokenizer_class": type(hf).__name__, "encode": encode, "decode": decode, "chat": chat,
            "refused": refusals}


def greedy(model, ids: list[int], max_new_tokens: int, eos=None) -> tuple[list[int], float]:
    # An explicit all-ones mask: without it generate masks every token equal to pad_token_id (here a BOS).
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=0,
                         output_scores=True, return_dict_in_generate=True)
    margins = [float(torch.topk(s[0], 2).values.diff().abs()) for s in out.scores]
    return out.sequences[0, len(ids):].tolist(), min(margins)


def add_model(folder: Path, seed: int, prompts: list[list[int]], stop_base: list[int], do_sample: dict) -> list[dict]:
    """A tiny random LLaMA with this folder's vocabulary; generation_config.json's stop ids are
    stop_base + one token the greedy run of the first prompt produces (not its first token)."""
    hf_tok = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(hf_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.2, tie_word_embeddings=False, bos_token_id=hf_tok.bos_token_id,
                         eos_token_id=stop_base[0])
    model = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        free_run, margin = greedy(model, prompts[0], 24)
    candidates = [t for i, t in enumerate(free_run) if i >= 3 and t not in free_run[:i] and t not in stop_base]
    assert candidates, f"seed {seed}: greedy run {free_run} repeats itself; pick another seed"
    stop = stop_base + [candidates[0]]
    records = []
    with torch.no_grad():
        for ids in prompts:
            new, margin = greedy(model, ids, 24, eos=stop)
            assert margin > 1e-3, f"seed {seed}: a near tie ({margin:.2e}) in the greedy run; pick another seed"
            records.append({"prompt_ids": ids, "max_new_tokens": 24, "ids": new, "min_margin": margin})
    assert any(r["ids"][-1] in stop for r in records), "no run stopped at a stop id"
    model.save_pretrained(folder, safe_serialization=True)
    generation = {"bos_token_id": hf_tok.bos_token_id, "eos_token_id": stop, **do_sample}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return records


def make_chatml() -> None:
    folder = OUT / "chatml"
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = train_bpe(pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                                             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
                    decoders.ByteLevel(), normalizers.NFC(), specials, 420, pre_tokenizers.ByteLevel.alphabet())
    tok.post_processor = processors.ByteLevel(trim_offsets=False)     # as Qwen2's tokenizer.json: adds nothing
    save_tokenizer(folder, tok, "Qwen2Tokenizer", CHATML_TEMPLATE, inline_template=True,
                   config_extra={"bos_token": None, "clean_up_tokenization_spaces": False},
                   eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
                   extra_special_tokens=["<|im_start|>", "<|im_end|>"])
    expected = record_tokenizer(folder, CONVERSATIONS, True, {},
                                refused=[([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
                                          "a system message must come first"),
                                         ([{"role": "tool", "content": "42"}], "unknown role: tool")])
    hf = AutoTokenizer.from_pretrained(folder)
    im_end, endoftext = hf.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    prompts = [expected["chat"][0]["ids"], expected["chat"][2]["ids"], hf("The cache")["input_ids"]]
    expected["generate"] = add_model(folder, 7, prompts, [im_end, endoftext], {"do_sample": False,
                                                                              "temperature": 0.7, "top_p": 0.8})
    write_expected(folder, expected)


def make_llama3() -> None:
    folder = OUT / "llama3"
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = train_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel(), None, specials, 400,
                    pre_tokenizers.ByteLevel.alphabet())
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                                      special_tokens=[("<|begin_of_text|>", bos)]),
    ])
    save_tokenizer(folder, tok, "PreTrainedTokenizerFast", LLAMA3_TEMPLATE, inline_template=False,
                   config_extra={"clean_up_tokenization_spaces": True},
                   bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                   extra_special_tokens=["<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>"])
    expected = record_tokenizer(folder, CONVERSATIONS, False, {"date_string": "26 Jul 2024"})
    hf = AutoTokenizer.from_pretrained(folder)
    eot, end = hf.convert_tokens_to_ids(["<|eot_id|>", "<|end_of_text|>"])
    prompts = [hf("Once upon a time")["input_ids"], expected["chat"][0]["ids"]]
    expected["generate"] = add_model(folder, 3, prompts, [end, eot],
                                     {"do_sample": True, "temperature": 0.6, "top_p": 0.9})
    write_expected(folder, expected)


def make_spm() -> None:
    folder = OUT / "spm"
    specials = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]
    tok = train_bpe(pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False),
                    decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)]),
                    None, specials, 380)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B:1",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    save_tokenizer(folder, tok, "LlamaTokenizer", INST_TEMPLATE, inline_template=True,
                   config_extra={"add_bos_token": True, "add_eos_token": True, "legacy": False},
                   bos_token="<s>", eos_token="</s>", unk_token="<unk>", extra_special_tokens=["[INST]", "[/INST]"])
    conversations = [CONVERSATIONS[0], ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                                         {"role": "user", "content": "Bye"}], False, {})]
    expected = record_tokenizer(folder, conversations, False, {},
                                refused=[([{"role": "assistant", "content": "first"}], "must alternate")])
    write_expected(folder, expected)


def write_expected(folder: Path, expected: dict) -> None:
    expected = {"transformers_version": transformers.__version__, **expected}
    (folder / "expected.json").write_text(json.dumps(expected, indent=1, ensure_ascii=False) + "\n")
    sizes = {p.name: p.stat().st_size for p in sorted(folder.iterdir())}
    print(folder.relative_to(ROOT), expected["tokenizer_class"], sizes)


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    np.random.seed(0)
    make_chatml()
    make_llama3()
    make_spm()


if __name__ == "__main__":
    main()
