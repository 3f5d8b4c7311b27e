# Source of lessons/07_real_checkpoints.ipynb (build with: python lessons/_build.py)

# %% [markdown]
# # Lesson 7: real checkpoints
#
# **What it teaches:** what a Hugging Face checkpoint folder holds, how its tensor names map to minikv's,
# how to check an implementation against `transformers` (stored logits, float64 and float32), and what
# the bundled model's attention heads learned. **What it assumes:** lessons 1-3 (lesson 3 builds the
# transformer block this lesson runs by hand), lesson 2's RoPE conventions.
#
# A Hugging Face checkpoint is a folder: `config.json` (the architecture) and `model.safetensors` (the
# weights, by name). minikv reads it with NumPy only (safetensors, never pickle) and must compute the
# **same logits** as Hugging Face `transformers`. In this lesson you will
#
# 1. open a checkpoint folder and see how its names map to minikv's;
# 2. compare minikv's logits with logits stored from `transformers` for three tiny architectures that
#    ship with minikv (LLaMA with GQA, Mistral with a sliding window, GPT-2), in float64 and float32;
# 3. run the bundled model **layer by layer by hand** and look at what its attention heads attend to;
# 4. run a real pretrained checkpoint, if you have one on disk (nothing is downloaded).

# %%
import json
import tempfile
from pathlib import Path

import numpy as np
import matplotlib.pyplot as plt
from safetensors.numpy import load_file

import minikv
from minikv import attention, layers
from minikv.checkpoint import tensor_table
from minikv.exercises import check

%matplotlib inline

# Tiny random checkpoints, saved by transformers, ship with minikv (about 130 KB each; t5_v1_1 is lesson 8's).
EXAMPLES = Path(minikv.__file__).parent / "data" / "hf-examples"
print(sorted(p.name for p in EXAMPLES.iterdir() if p.is_dir()))

# %% [markdown]
# ## 1. What is in a checkpoint folder

# %%
folder = EXAMPLES / "llama_gqa"
for path in sorted(folder.iterdir()):
    print(f"{path.name:<25} {path.stat().st_size:>8,} bytes")
hf_config = json.loads((folder / "config.json").read_text())
print({key: hf_config[key] for key in ["model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                       "num_key_value_heads", "vocab_size", "rms_norm_eps"]})

model = minikv.load(folder, dtype="float64")
print(model)
print(model.config)

# %% [markdown]
# Hugging Face and minikv name tensors differently. The translation lives in one table,
# `minikv.checkpoint.tensor_table(config)`. For GPT-2, whose `Conv1D` stores weights as (in, out) and fuses
# q, k and v into one `c_attn`, a row can also transpose and split:

# %%
def show_table(config, first=6):
    print("| Hugging Face name | minikv name(s) | transpose |\n|---|---|---|")
    for row in tensor_table(config)[:first]:
        print(f"| `{row.hf}` | {', '.join(f'`{n}`' for n in row.ours)} | {'yes' if row.transpose else ''} |")

show_table(model.config)
print()
show_table(minikv.load(EXAMPLES / "gpt2").config, first=8)

# %% [markdown]
# ## 2. Same logits as `transformers`
#
# Each example folder holds `expected.safetensors`: two rows of 11 token ids and the logits `transformers`
# computed for them in float64 (by `scripts/make_hf_fixtures.py`, which needs torch; minikv does not). We
# load every example in float64 and in float32 and measure the largest difference. (minikv's test suite
# does the same for three more: LLaMA with one K/V head and tied embeddings, Qwen2 with q/k/v biases,
# Mistral without a window.)

# %%
results = []
for name in ["gpt2", "llama_gqa", "mistral_window"]:             # the decoder-only ones (t5_v1_1 is lesson 8's)
    expected = load_file(str(EXAMPLES / name / "expected.safetensors"))
    row = {"name": name}
    for dtype in ["float64", "float32"]:
        example_model = minikv.load(EXAMPLES / name, dtype=dtype)
        logits = example_model.forward(expected["input_ids"])
        assert logits.dtype == np.dtype(dtype)
        row[dtype] = float(np.abs(logits - expected["logits"]).max())
    row["top1"] = float((logits.argmax(-1) == expected["logits"].argmax(-1)).mean())
    row["type"] = example_model.config.model_type
    results.append(row)

print("| example | model_type | max error float64 | max error float32 | top-1 agreement (float32) |")
print("|---|---|---|---|---|")
for r in results:
    print(f"| {r['name']} | {r['type']} | {r['float64']:.1e} | {r['float32']:.1e} | {r['top1']:.0%} |")
assert all(r["float64"] < 1e-10 and r["float32"] < 1e-4 for r in results)

plt.figure(figsize=(7, 3.5))
x = np.arange(len(results))
plt.bar(x - 0.2, [r["float64"] for r in results], width=0.4, label="float64")
plt.bar(x + 0.2, [r["float32"] for r in results], width=0.4, label="float32")
plt.xticks(x, [r["name"] for r in results], rotation=20)
plt.yscale("log")
plt.ylabel("max |minikv - transformers|")
plt.title("logits against stored transformers logits")
plt.legend()
plt.show()

# %% [markdown]
# float64 agrees to round-off (about 1e-14): the computation is the same, operation for operation. float32
# agrees to about 1e-5, the size of float32 rounding accumulated over two layers. A wrong convention (see
# lesson 2) would show errors of order 1.
#
# ## 3. The bundled model, layer by layer, and its attention patterns
#
# `model.forward` hides the attention weights (it never needs them). To look at them we run the model's
# pieces ourselves, as lesson 3 did block by hand, with the weights the model laid out at load time:
#
# * `model.embed`: the embedding table; each layer's `attn_norm`, `qkv` (the q, k and v projections fused
#   side by side), `o`, `mlp_norm`, `mlp_in` (gate and up side by side) and `mlp_down`;
# * `model.rope_cos`, `model.rope_sin`: the RoPE tables.
#
# A trick gets the weights out of `attention.naive` without a special function: **attention with V = the
# identity matrix returns the attention weights themselves** (row `i` of `P @ I` is row `i` of `P`).

# %%
tiny = minikv.load()
cfg = tiny.config
prompt = "The early bird catches the worm, but the second mouse gets the cheese."
ids = np.array([tiny.tokenizer.encode(prompt)])
seq = ids.shape[1]
H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

x = layers.embedding(tiny.embed, ids)                                   # (1, seq, d)
cos, sin = tiny.rope_cos[:seq][None, None], tiny.rope_sin[:seq][None, None]
identity = np.broadcast_to(np.eye(seq, dtype=x.dtype), (1, KV, seq, seq))
weights_per_layer = []
for layer in tiny.layers:
    h = layers.rms_norm(x, layer.attn_norm, cfg.norm_eps)
    qkv = layers.linear(h, layer.qkv)                                   # (1, seq, (H + 2 KV) hd)
    q = qkv[..., :H * hd].reshape(1, seq, H, hd).transpose(0, 2, 1, 3)
    k = qkv[..., H * hd:(H + KV) * hd].reshape(1, seq, KV, hd).transpose(0, 2, 1, 3)
    v = qkv[..., (H + KV) * hd:].reshape(1, seq, KV, hd).transpose(0, 2, 1, 3)
    q = minikv.rope.apply_rope(q, cos, sin, cfg.rope_convention)
    k = minikv.rope.apply_rope(k, cos, sin, cfg.rope_convention)
    weights_per_layer.append(attention.naive(q, k, identity)[0])       # (H, seq, seq): the weights
    out = attention.naive(q, k, v)                                      # (1, H, seq, hd)
    x = x + layers.linear(out.transpose(0, 2, 1, 3).reshape(1, seq, H * hd), layer.o)
    h = layers.rms_norm(x, layer.mlp_norm, cfg.norm_eps)
    gate_up = layers.linear(h, layer.mlp_in)
    gate, up = gate_up[..., :cfg.intermediate_size], gate_up[..., cfg.intermediate_size:]
    x = x + layers.linear(layers.swiglu(gate, up), layer.mlp_down)
logits_by_hand = layers.rms_norm(x, tiny.final_norm, cfg.norm_eps) @ tiny.lm_head

difference = np.abs(logits_by_hand - tiny.forward(ids)).max()
print(f"max |by hand - model.forward| = {difference:.1e}")
assert difference < 1e-4
attn = np.stack(weights_per_layer)                                      # (layers, heads, seq, seq)
print("attention weights:", attn.shape)

# %%
fig, axes = plt.subplots(cfg.n_layers, H, figsize=(1.6 * H, 1.6 * cfg.n_layers))
for li in range(cfg.n_layers):
    for hi in range(H):
        ax = axes[li, hi]
        ax.imshow(attn[li, hi] ** 0.5, cmap="viridis")                  # sqrt: small weights visible
        ax.set_xticks([])
        ax.set_yticks([])
        if li == 0:
            ax.set_title(f"head {hi}", fontsize=8)
        if hi == 0:
            ax.set_ylabel(f"layer {li}", fontsize=8)
fig.suptitle(f"attention weights of the bundled model (rows: queries, columns: keys), {seq} tokens")
plt.tight_layout()
plt.show()

# %% [markdown]
# Trained models grow heads of a few recognisable kinds: **previous-token heads** (a bright line just
# below the diagonal), **fixed-offset heads** more generally (a line further below it), heads that pile
# onto the **first token** (an "attention sink": somewhere to put weight when nothing is relevant; large
# models with a BOS token show it strongly) and heads that look at the **current token** itself. Rather
# than trust the eye, measure: per head, the mean weight on each.

# %%
rows_idx = np.arange(1, seq)
previous = attn[:, :, rows_idx, rows_idx - 1].mean(-1)                  # (layers, heads)
first = attn[:, :, rows_idx, 0].mean(-1)
itself = attn[:, :, rows_idx, rows_idx].mean(-1)

fig, axes = plt.subplots(1, 3, figsize=(12, 3))
for ax, (title, values) in zip(axes, [("on the previous token", previous), ("on the first token", first),
                                      ("on itself", itself)]):
    image = ax.imshow(values, cmap="magma", vmin=0, vmax=1)
    ax.set_title(f"mean weight {title}", fontsize=9)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
plt.colorbar(image, ax=axes, shrink=0.8)
plt.show()
for title, values in [("previous-token", previous), ("first-token", first), ("current-token", itself)]:
    layer_i, head_i = np.unravel_index(values.argmax(), values.shape)
    print(f"strongest {title} head: layer {layer_i}, head {head_i} (mean weight {values[layer_i, head_i]:.2f})")

# Fixed-offset heads: the mean weight each head puts on the key `offset` positions back.
offsets = np.arange(0, 6)
by_offset = np.stack([attn[:, :, np.arange(o, seq), np.arange(0, seq - o)].mean(-1) for o in offsets], -1)
print("\n| layer | head | favourite offset | mean weight there |\n|---|---|---|---|")
for layer_i, head_i in zip(*np.nonzero(by_offset.max(-1) > 0.5)):
    best = by_offset[layer_i, head_i].argmax()
    print(f"| {layer_i} | {head_i} | {offsets[best]} back | {by_offset[layer_i, head_i, best]:.2f} |")

# %% [markdown]
# ## 4. A real checkpoint, if you have one
#
# Everything above runs on tiny models that ship with minikv. The same `minikv.load` reads a real
# pretrained checkpoint folder (float32 or float16 safetensors, a `tokenizer.json`). This cell never
# downloads anything: it uses the folder in the environment variable `MINIKV_CHECKPOINT` if you set one,
# or else the first of a few small models already in your local Hugging Face cache. To get one (about
# 550 MB), run `huggingface-cli download openai-community/gpt2` (needs `pip install huggingface_hub`),
# then rerun this cell.

# %%
import os

CANDIDATES = ["openai-community/gpt2", "HuggingFaceTB/SmolLM2-135M", "Qwen/Qwen2.5-0.5B"]

def local_checkpoint():
    """A checkpoint folder on this machine, or None. Never touches the network."""
    if os.environ.get("MINIKV_CHECKPOINT"):
        return Path(os.environ["MINIKV_CHECKPOINT"])
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    for repo_id in CANDIDATES:
        try:
            return Path(snapshot_download(repo_id, local_files_only=True))   # raises if not cached
        except Exception:
            continue
    return None

folder = local_checkpoint()
if folder is None:
    print("No checkpoint found locally (set MINIKV_CHECKPOINT=/path/to/folder, or download one as above); "
          "skipping this section.")
else:
    try:
        real = minikv.load(folder)
    except minikv.MinikvError as error:            # e.g. bfloat16 weights, an unsupported architecture
        print(f"{folder} could not be loaded: {error}")
    else:
        print(real)
        result = real.generate("The meaning of life is", max_new_tokens=20, temperature=0.0)
        print(repr(result.text))
        print(result.stats)

# %% [markdown]
# ## Exercises
#
# Each exercise cell has a stub between `# --- your solution ---` and `# --- check ---`: replace the
# `...` (or the `raise NotImplementedError`) with your code and run the cell. The check prints
# `exercise N: not solved yet` while the stub is there, `exercise N: correct` when your answer passes,
# and stops with a `WrongAnswer` naming the failed check otherwise. Solutions:
# [`solutions/07_real_checkpoints.py`](solutions/07_real_checkpoints.py).
#
# **Exercise 1.** Check two facts about the attention weights you computed: every row sums to 1, and no
# query puts any weight on a later key (causality).

# %%
# --- your solution ---
row_sums = ...         # attn summed over the keys: (layers, heads, seq)
above_diagonal = ...   # (seq, seq) bool: True where the key comes after the query
# --- check ---
with check(1, row_sums, above_diagonal):
    assert np.allclose(row_sums, 1.0, atol=1e-5)
    assert np.all(attn[..., above_diagonal] == 0.0)

# %% [markdown]
# **Exercise 2.** The `mistral_window` example has `sliding_window = 4` in its config: query `i` sees only
# keys `i-3 .. i`. Show that the config field matters: run it with the window disabled (the same weights in
# a `minikv.Transformer` whose config has `sliding_window=None`, via `config.replace`) and measure the
# error against the stored logits; then with the default (the config's window).

# %%
name = "mistral_window"
expected = load_file(str(EXAMPLES / name / "expected.safetensors"))
windowed = minikv.load(EXAMPLES / name, dtype="float64")
print("sliding_window from config.json:", windowed.config.sliding_window)

# --- your solution ---
error_with_window = ...      # max |logits - expected| with the config's window
error_without_window = ...   # the same weights with sliding_window=None
# --- check ---
with check(2, error_with_window, error_without_window):
    print(f"with the window: {error_with_window:.1e}; window ignored: {error_without_window:.1e}")
    assert error_with_window < 1e-10 < 1e-3 < error_without_window

# %% [markdown]
# **Exercise 3.** Save the bundled model as a Hugging Face folder with `model.save(path)` (float32), load the
# folder back with `minikv.load(path)`, and check the logits are **bit-for-bit** identical. Then look at the
# file names in the folder.

# %%
check_ids = np.array([tiny.tokenizer.encode("Round trip.")])

# --- your solution ---
files = ...   # sorted file names in the folder model.save wrote
same = ...    # True if the reloaded model's logits equal tiny.forward's exactly
# --- check ---
with check(3, files, same) as exercise:
    assert "config.json" in files and "model.safetensors" in files
    assert same
    exercise.note = str(files)
