"""Full-size check against transformers: a real checkpoint's architecture with random bf16 weights.

Run by hand (needs torch + transformers, and memory for the model twice in float32):

    python scripts/check_real_configs.py gemma-3-270m --seq 600     # crosses Gemma's window of 512
    python scripts/check_real_configs.py Qwen3-0.6B --seq 64
    python scripts/check_real_configs.py Llama-3.2-1B --seq 32

For a config.json in tests/fixtures/real_configs/ (as published on the Hub), builds transformers' model
with random weights (norm gains randomised too), saves it in bfloat16, loads that folder with
transformers (float32, eager attention) and with minikv (float32), and prints the largest logit
difference on one random prompt and whether greedy generation agrees. The tiny fixtures in
tests/fixtures/hf_families prove the same properties exactly; this shows they hold at full size
(head_dim 128/256, 16-30 layers, 150k-260k vocabularies).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers

import minikv

CONFIGS = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "real_configs"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(p.stem for p in CONFIGS.glob("*.json")))
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=6)
    args = parser.parse_args(argv)

    hf_config = json.loads((CONFIGS / f"{args.name}.json").read_text())
    gemma = hf_config["model_type"] == "gemma3_text"
    config = transformers.AutoConfig.for_model(**{k: v for k, v in hf_config.items()
                                                  if k not in ("architectures", "torch_dtype", "transformers_version")})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:     # Gemma stores gains as offsets from 1
                param.copy_((0.0 if gemma else 1.0) + 0.1 * torch.randn(param.shape))
    ids = np.random.default_rng(0).integers(0, hf_config["vocab_size"], size=(1, args.seq))
    with tempfile.TemporaryDirectory() as folder:
        model.to(torch.bfloat16).save_pretrained(folder)
        del model
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                               attn_implementation="eager").eval()
        with torch.no_grad():
            expected = hf(input_ids=torch.from_numpy(ids)).logits.numpy()
            generated = hf.generate(torch.from_numpy(ids), max_new_tokens=args.new_tokens, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)[:, args.seq:].tolist()
        del hf
        start = time.perf_counter()
        ours = minikv.load(folder, dtype="float32")
        load_s = time.perf_counter() - start
        logits = ours.forward(ids)
        tokens = ours.generate(ids.tolist(), max_new_tokens=args.new_tokens, temperature=0.0).tokens
    print(f"{args.name}: {ours.n_parameters / 1e6:.0f}M parameters, prompt {args.seq} tokens; "
          f"max |minikv - transformers| float32 logits = {float(np.abs(logits - expected).max()):.2e} "
          f"(logit std {float(expected.std()):.2f}); greedy ids equal: {tokens == generated}; "
          f"minikv load {load_s:.1f} s")
    return 0 if tokens == generated else 1


if __name__ == "__main__":
    sys.exit(main())
