"""Build the encoder-decoder conformance fixtures in tests/fixtures/seq2seq/.

Run by hand (never by the tests; the tests must not need torch):

    python scripts/make_seq2seq_fixtures.py

Needs torch (2.13.0) and transformers (5.x). Three tiny, randomly initialised models:

    t5_v1_1   T5 v1.1 / Flan: gated-GELU FFN, untied lm_head (no rescale), 2 encoder + 3 decoder layers
    t5_relu   the original T5: ReLU FFN, tied lm_head with the d_model^-0.5 rescale
    bart      BART: learned positions (offset 2), post-LayerNorm, layernorm_embedding, exact GELU,
              scale_embedding, final_logits_bias, forced BOS / EOS

For each, tests/fixtures/seq2seq/<name>/ holds

    config.json, generation_config.json, model.safetensors (float32, HF tensor names)
    expected.safetensors:
        input_ids (2, 20), attention_mask (2, 20)    a ragged batch of sources (row 1 has 13 real tokens)
        encoder_states (2, 20, d) float64            the encoder's output
        decoder_ids (2, 14)                          longer than T5's relative_attention_max_distance (8)
        logits (2, 14, vocab) float64                transformers' decoder logits for them
        generated (2, 1 + max_new_tokens)            transformers' greedy generate (start token included)
        buckets_* (T5)                               transformers' relative position buckets

T5's relative attention uses relative_attention_num_buckets=8 and relative_attention_max_distance=8,
so the 20-token sources and 14-token targets reach distances past max_distance (the last bucket).

The float64 reference
---------------------
``model.double()`` alone is not a float64 model: T5LayerNorm computes its variance in float32
(``hidden_states.to(torch.float32).pow(2).mean(...)``), which moves the logits by ~1e-7. While
computing the reference we patch it to keep the input dtype, as scripts/make_hf_fixtures.py does for
the llama family. T5's relative position *buckets* stay as transformers computes them (float32
logs, then a floor): they are integers the model was trained with, and minikv reproduces them
bit for bit (tests check against ``buckets_*``). BART has no float32 island: its LayerNorm, GELU
and softmax run in the model dtype. The script checks that the patched float64 logits agree with
the unpatched float32 model to float32 accuracy.

Bias and norm parameters are re-drawn away from HF's zeros/ones (as in make_hf_fixtures.py), T5's
relative bias table too (N(0, 1): large enough that a missing bias changes the logits visibly).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file
from transformers import BartConfig, BartForConditionalGeneration, GenerationConfig, T5Config, T5ForConditionalGeneration

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "seq2seq"
BATCH, SRC, TGT, MAX_NEW = 2, 20, 14, 12
SRC_LENGTHS = (20, 13)


def t5_config(gated: bool) -> T5Config:
    return T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_decoder_layers=3 if gated else 2,
                    num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=8,
                    feed_forward_proj="gated-gelu" if gated else "relu", dropout_rate=0.0, initializer_factor=2.0,
                    tie_word_embeddings=not gated, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def bart_config() -> BartConfig:
    return BartConfig(vocab_size=64, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                      decoder_attention_heads=4, encoder_ffn_dim=24, decoder_ffn_dim=20, max_position_embeddings=40, init_std=0.3,
                      scale_embedding=True, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                      activation_function="gelu", pad_token_id=1, bos_token_id=0, eos_token_id=2,
                      decoder_start_token_id=2, forced_eos_token_id=2)


def build(model_cls, config, seed: int, untie: bool = False):
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        if untie:
            # transformers 5 always ties T5's head; v1.1 checkpoints have their own. Give it one.
            model.lm_head.weight = torch.nn.Parameter(0.2 * torch.randn(model.lm_head.weight.shape, generator=gen))
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
            elif param.ndim == 1 and "norm" in name:
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
            elif "relative_attention_bias" in name:
                param.copy_(torch.randn(param.shape, generator=gen))
        if hasattr(model, "final_logits_bias"):
            model.final_logits_bias.copy_(0.5 * torch.randn(model.final_logits_bias.shape, generator=gen))
    return model


def _t5_norm_keep_dtype(self, hidden_states):
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


@contextlib.contextmanager
def float64_everywhere(model):
    patched = []
    for module in model.modules():
        if type(module).__name__ == "T5LayerNorm":
            module.forward = _t5_norm_keep_dtype.__get__(module)
            patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward


def inputs(vocab: int, start: int, pad: int, seed: int):
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(3, vocab, size=(BATCH, SRC), dtype=np.int64)
    mask = np.zeros((BATCH, SRC), dtype=np.int64)
    for b, n in enumerate(SRC_LENGTHS):
        mask[b, :n] = 1
        input_ids[b, n:] = pad
    input_ids[0, 3] = vocab - 1
    decoder_ids = rng.integers(3, vocab, size=(BATCH, TGT), dtype=np.int64)
    decoder_ids[:, 0] = start
    return input_ids, mask, decoder_ids


def run(model, input_ids, mask, decoder_ids):
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(mask),
                    decoder_input_ids=torch.from_numpy(decoder_ids), use_cache=False)
    return out.logits.numpy(), out.encoder_last_hidden_state.numpy()


def greedy(model, input_ids, mask, generation_config):
    # use_cache=False: transformers 5.24 sizes T5's decoder cache by the *encoder's* layer count, which
    # fails for num_decoder_layers != num_layers; without a cache generate recomputes (same ids).
    with torch.no_grad():
        out = model.generate(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(mask),
                             generation_config=generation_config, max_new_tokens=MAX_NEW, do_sample=False,
                             num_beams=1, use_cache=False)
    return out.numpy()


def save_checkpoint(model, folder: Path, config_dict: dict, generation_config: GenerationConfig, drop=()):
    folder.mkdir(parents=True)
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name in drop or name in tensors:
            continue
        tensors[name] = np.ascontiguousarray(tensor.detach().float().numpy())
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    (folder / "generation_config.json").write_text(
        json.dumps(generation_config.to_diff_dict(), indent=2, sort_keys=True) + "\n")


def make(name: str, seed: int) -> dict:
    folder = OUT / name
    if folder.exists():
        shutil.rmtree(folder)
    if name.startswith("t5"):
        gated = name == "t5_v1_1"
        config = t5_config(gated)
        model = build(T5ForConditionalGeneration, config, seed, untie=gated)
        config_dict = config.to_dict()
        # The keys a hub T5 config.json has (v1.1: untied, no rescale), not transformers 5's rewrite.
        config_dict["tie_word_embeddings"] = not gated
        config_dict["scale_decoder_outputs"] = not gated
        drop = ["encoder.embed_tokens.weight", "decoder.embed_tokens.weight"] + ([] if gated else ["lm_head.weight"])
        start, pad = 0, 0
    else:
        config = bart_config()
        model = build(BartForConditionalGeneration, config, seed)
        config_dict = config.to_dict()
        drop = ["model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight"]
        start, pad = 2, 1
    input_ids, mask, decoder_ids = inputs(config.vocab_size, start, pad, seed)
    logits32, _ = run(model, input_ids, mask, decoder_ids)
    model.double()
    logits_unpatched, _ = run(model, input_ids, mask, decoder_ids)
    with float64_everywhere(model):
        logits, states = run(model, input_ids, mask, decoder_ids)
        if name == "bart":
            generation_config = GenerationConfig(decoder_start_token_id=2, bos_token_id=0, eos_token_id=2,
                                                 pad_token_id=1, forced_bos_token_id=0, forced_eos_token_id=2)
        else:
            # A random model rarely says its eos; make a token it does say (row 0's first new one from the
            # 5th on) the stop token,
            # so the fixture checks that generation stops where transformers stops.
            probe = greedy(model, input_ids, mask, GenerationConfig(decoder_start_token_id=0, pad_token_id=0,
                                                                     eos_token_id=None))
            print(name, "without eos:", probe.tolist())
            new = [int(t) for i, t in enumerate(probe[0]) if i >= 5 and t not in probe[0, :i]]
            later = [int(t) for t in probe[0, 5:] if t != 0]
            eos = (new or later or [1])[0]
            generation_config = GenerationConfig(decoder_start_token_id=0, pad_token_id=0, eos_token_id=eos)
            config_dict["eos_token_id"] = eos
        generated = greedy(model, input_ids, mask, generation_config)
    gap = float(np.abs(logits - logits32).max())
    gap_unpatched = float(np.abs(logits - logits_unpatched).max())
    # The patched model computes transformers' function: float32 agrees to float32 accuracy (a random
    # model with peaked softmaxes amplifies float32 rounding to ~1e-4), the unpatched double closer.
    assert gap < 1e-3 and gap_unpatched < 1e-3, (name, gap, gap_unpatched)
    save_checkpoint(model, folder, config_dict, generation_config, drop)
    expected = {"input_ids": input_ids, "attention_mask": mask, "decoder_ids": decoder_ids, "logits": logits,
                "encoder_states": states, "generated": generated.astype(np.int64)}
    if name.startswith("t5"):
        from transformers.models.t5.modeling_t5 import T5Attention

        for label, nb, md, span in (("small", 8, 8, 40), ("default", 32, 128, 600)):
            relative = torch.arange(-span, span + 1)
            for bidirectional in (True, False):
                key = f"buckets_{label}_{'bi' if bidirectional else 'uni'}"
                expected[key] = T5Attention._relative_position_bucket(relative, bidirectional, nb, md).numpy()
    save_file(expected, str(folder / "expected.safetensors"),
              metadata={"reference": "transformers float64 (T5LayerNorm variance kept in float64)",
                        "max_abs_diff_vs_hf_float32": repr(gap),
                        "max_abs_diff_vs_hf_float64_unpatched": repr(gap_unpatched), "max_new_tokens": str(MAX_NEW),
                        "transformers": __import__("transformers").__version__, "torch": torch.__version__})
    return {"name": name, "gap_vs_float32": gap, "gap_vs_unpatched_float64": gap_unpatched,
            "generated": generated.tolist()}


def main() -> None:
    # Seeds picked so that greedy decoding does not just repeat one token (a tied head tends to).
    for name, seed in (("t5_v1_1", 0), ("t5_relu", 2), ("bart", 3)):
        print(make(name, seed))


if __name__ == "__main__":
    main()
