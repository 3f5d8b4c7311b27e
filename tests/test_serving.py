"""The serving engine (minikv/serving): continuous batching, prefix caching, preemption.

The one property that matters: **served == generated alone**. Requests arrive at random steps,
with random prompts (many sharing prefixes, so blocks are shared), token budgets, block sizes and
pool sizes (small pools force preemption); every request's greedy tokens must equal
``model.generate(prompt, temperature=0.0)`` of that prompt alone, token for token, and after every
step the block accounting must match the live block tables (ref counts = table entries, never
negative, every block free, cached or in use); at the end every block is free or cached.

float64 fixtures: the engine attends a prefill chunk at a time (and each decode row alone) where
generate runs the prompt as one matrix, so logits differ by round-off (~1e-15); greedy argmax is
then identical unless two logits tie to 1e-15, which random weights do not produce.

Deliberately broken variants (a hash without its parent, sharing without copy-on-write) are run
through the same checks and must be caught.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minikv
from hf_fixtures import FIXTURE_ROOT, FIXTURES, model_for
from minikv.errors import CacheMismatchError, CacheOverflowError, InvalidInputError, SamplingError, SequenceTooLongError
from minikv.serving import BlockManager, Engine, block_hash

_reference: dict = {}


def generated_alone(model, prompt, max_tokens, **options):
    """model.generate of one prompt alone (memoised: hypothesis asks for the same ones often)."""
    key = (id(model), tuple(prompt), max_tokens, repr(sorted(options.items())))
    if key not in _reference:
        _reference[key] = model.generate([list(prompt)], max_new_tokens=max_tokens, temperature=0.0,
                                         **options).tokens[0]
    return _reference[key]


def run(engine, arrivals, check_each_step=True):
    """arrivals: [(step, prompt, max_tokens)]. Adds each request at its step, steps until all are done;
    returns {request_id: tokens} and the ids in arrival order."""
    pending = sorted(enumerate(arrivals), key=lambda item: item[1][0])
    ids, tokens, step = {}, {}, 0
    while pending or engine.has_unfinished():
        while pending and pending[0][1][0] <= step:
            index, (_, prompt, max_tokens) = pending.pop(0)
            ids[index] = engine.add_request(prompt, max_tokens)
            tokens[ids[index]] = []
        for out in engine.step():
            assert out.index == 0
            tokens[out.request_id] += out.new_token_ids
        if check_each_step:
            engine.check_blocks()
        step += 1
        assert step < 10_000, "the engine made no progress"
    return [tokens[ids[i]] for i in range(len(arrivals))]


@st.composite
def workloads(draw):
    vocab = 90
    base = draw(st.lists(st.integers(0, vocab - 1), min_size=24, max_size=24))
    requests = []
    for _ in range(draw(st.integers(1, 5))):
        shared = draw(st.integers(0, 24))                  # a prefix of the common text, then its own tokens
        own = draw(st.lists(st.integers(0, vocab - 1), min_size=0 if shared else 1, max_size=8))
        requests.append((draw(st.integers(0, 6)), base[:shared] + own, draw(st.integers(1, 8))))
    return requests


@settings(max_examples=25, deadline=None)
@given(workload=workloads(), block_size=st.sampled_from([1, 2, 3, 4, 8]), budget=st.integers(1, 24),
       spare_blocks=st.integers(0, 12), prefix_caching=st.booleans(), name=st.sampled_from(["llama_gqa", "gpt2"]))
def test_served_equals_generated_alone(workload, block_size, budget, spare_blocks, prefix_caching, name):
    model = model_for(name)
    # The pool: just enough for the largest request alone (then preemption is frequent), plus spare blocks.
    needed = max(-(-(len(prompt) + max_tokens - 1) // block_size) for _, prompt, max_tokens in workload)
    engine = Engine(model, num_blocks=needed + spare_blocks, block_size=block_size, max_num_tokens=budget,
                    prefix_caching=prefix_caching)
    served = run(engine, workload)
    for (_, prompt, max_tokens), tokens in zip(workload, served):
        assert tokens == generated_alone(model, prompt, max_tokens)
    assert engine.blocks.num_in_use == 0                        # everything free or cached: no leak
    assert all(count == 0 for count in engine.blocks.ref_count)
    if not prefix_caching:
        assert engine.blocks.num_cached == 0 and engine.blocks.stats.cached_tokens == 0


@settings(max_examples=12, deadline=None)
@given(prompts=st.lists(st.lists(st.integers(0, 89), min_size=1, max_size=11), min_size=1, max_size=3),
       n=st.integers(1, 3), block_size=st.sampled_from([2, 3, 4]), budget=st.integers(2, 16),
       spare_blocks=st.integers(0, 6), seed=st.integers(0, 1000))
def test_sampled_answers_equal_generate_with_their_seeds(prompts, n, block_size, budget, spare_blocks, seed):
    # n answers per request share the prompt's blocks (copy-on-write on the partial one); answer i draws
    # from default_rng(seed + i), as generate(seed=seed + i) does, preempted or not.
    model = model_for("llama_gqa")
    max_tokens = 6
    needed = max(-(-(len(p) + max_tokens - 1) // block_size) for p in prompts)
    engine = Engine(model, num_blocks=needed + spare_blocks, block_size=block_size, max_num_tokens=budget)
    ids = [engine.add_request(p, max_tokens, temperature=1.0, seed=seed + 10 * k, n=n, stop_token_ids=[])
           for k, p in enumerate(prompts)]
    answers = {(r, i): [] for r in ids for i in range(n)}
    while engine.has_unfinished():
        for out in engine.step():
            answers[(out.request_id, out.index)] += out.new_token_ids
        engine.check_blocks()
    for k, (r, p) in enumerate(zip(ids, prompts)):
        for i in range(n):
            want = model.generate([p], max_new_tokens=max_tokens, temperature=1.0, seed=seed + 10 * k + i,
                                  stop_tokens=[]).tokens[0]
            assert answers[(r, i)] == want
    assert engine.blocks.num_in_use == 0


@pytest.mark.parametrize("name", FIXTURES)
def test_every_fixture_family_served_exactly(name):
    # gpt2 (learned positions), GQA/MQA, qkv bias, Mistral with a sliding window narrower than the prompts.
    model = model_for(name)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, model.config.vocab_size, size=n).tolist() for n in (3, 11, 17, 6)]
    engine = Engine(model, num_blocks=12, block_size=4, max_num_tokens=7)
    served = run(engine, [(i, p, 9) for i, p in enumerate(prompts)])
    assert served == [generated_alone(model, p, 9) for p in prompts]
    assert engine.stats.preemptions > 0                         # 12 blocks of 4 cannot hold all four


@pytest.mark.parametrize("name", ["llama_gqa", "mistral_window"])
def test_served_on_numba_equals_generated_alone(name):
    # The numba backend's ragged attention (its tiled kernel on prefill chunks, its split-K kernel on decode
    # rows, reassociated sums) against numpy's generate: GQA, and a window narrower than the prompts.
    pytest.importorskip("numba")
    model = minikv.load(FIXTURE_ROOT / name, dtype="float64", backend="numba")
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, model.config.vocab_size, size=n).tolist() for n in (3, 11, 17, 6)]
    engine = Engine(model, num_blocks=40, block_size=4, max_num_tokens=9)
    served = run(engine, [(i, p, 9) for i, p in enumerate(prompts)])
    assert served == [generated_alone(model_for(name), p, 9) for p in prompts]


def _serve_recording_logits(model, prompts, max_tokens, max_num_tokens):
    """Serve ``prompts`` greedily; returns each step's logits (the rows that sampled) and the tokens."""
    engine = Engine(model, num_blocks=64, block_size=4, max_num_tokens=max_num_tokens)
    forward, steps = model.forward, []
    model.forward = lambda *args, **kwargs: steps.append(forward(*args, **kwargs)) or steps[-1]
    try:
        tokens = run(engine, [(0, p, max_tokens) for p in prompts])
    finally:
        del model.forward
    return steps, tokens


@pytest.mark.parametrize("lengths, budget", [((2, 9, 5, 13, 4, 7), 24), ((90, 3, 40, 6), 128), ((150, 60, 9), 256)])
def test_compiled_step_serves_ragged_rows_like_the_generic_path(lengths, budget):
    """float32 on numba: the compiled decode step takes every serving step (decode rows of many sequences
    and prompt chunks, each row attending by its own length; here up to 219 rows), with register-tiled
    products from TILED_FROM_ROWS rows on; every step's logits equal the numpy engine's (float32 round-off)
    and it took every step."""
    pytest.importorskip("numba")
    from minikv.backends import numba_decode

    reference, compiled = minikv.load(), minikv.load(backend="numba")
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, reference.config.vocab_size, size=n).tolist() for n in lengths]
    rows_taken = []
    step = compiled._decode_step

    def counting(ids, *args):
        logits = step(ids, *args)
        rows_taken.append(ids.shape[0] if logits is not None else 0)
        return logits

    compiled._decode_step = counting
    expected, expected_tokens = _serve_recording_logits(reference, prompts, 6, max_num_tokens=budget)
    got, tokens = _serve_recording_logits(compiled, prompts, 6, max_num_tokens=budget)
    assert tokens == expected_tokens
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)
    assert max(rows_taken) >= numba_decode.TILED_FROM_ROWS                 # tiles ran
    assert sum(1 for r in rows_taken if r > 0) == len(got)                # every step


@pytest.mark.parametrize("name", ["mistral_window", "llama_gqa"])
def test_compiled_step_serves_fixture_models_like_the_generic_path(name):
    """The same on the transformers fixtures in float32: a sliding window narrower than the prompts (each
    prompt row attends only within its window) and GQA; every step by the compiled step."""
    pytest.importorskip("numba")
    reference = minikv.load(FIXTURE_ROOT / name, dtype="float32")
    compiled = minikv.load(FIXTURE_ROOT / name, dtype="float32", backend="numba")
    assert compiled._decode_step is not None
    taken = []
    step = compiled._decode_step
    compiled._decode_step = lambda ids, *args: (lambda out: taken.append(out is not None) or out)(step(ids, *args))
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, reference.config.vocab_size, size=n).tolist() for n in (3, 11, 17, 6)]
    expected, expected_tokens = _serve_recording_logits(reference, prompts, 5, max_num_tokens=20)
    got, tokens = _serve_recording_logits(compiled, prompts, 5, max_num_tokens=20)
    assert tokens == expected_tokens and len(got) == len(expected) and all(taken)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)


def test_store_refuses_segments_that_are_not_runs_of_consecutive_positions():
    # The ragged attention trusts the segments: a chunk's rows must be positions p, p+1, ... of one sequence.
    store = Engine(model_for("llama_gqa"), num_blocks=8, block_size=4).store
    tables = np.zeros((4, 2), dtype=np.int32)
    store.bind(np.array([3, 4, 5, 0]), tables, np.array([0, 3, 4]))          # a chunk of 3, then a decode
    for positions, segments in (([3, 4, 6, 0], [0, 3, 4]),                 # a gap inside a chunk
                                ([3, 4, 5, 0], [0, 4]),                    # two sequences as one segment
                                ([3, 4, 5, 0], [0, 3]),                    # rows left out
                                ([3, 4, 5, 0], [0, 3, 3, 4])):             # an empty segment
        with pytest.raises(CacheMismatchError, match="segments"):
            store.bind(np.array(positions), tables, np.array(segments))
    assert store.lengths.tolist() == [3, 4, 5, 0]                           # the refused binds changed nothing


def test_stop_tokens_end_a_request_like_generate():
    model = model_for("llama_gqa")
    prompt = [5, 6, 7, 8, 9]
    free_run = generated_alone(model, prompt, 12, stop_tokens=[])
    stop = free_run[4]
    engine = Engine(model, block_size=4)
    rid = engine.add_request(prompt, 12, stop_token_ids=[stop])
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert [t for o in outs for t in o.new_token_ids] == generated_alone(model, prompt, 12, stop_tokens=[stop])
    assert outs[-1].finish_reason == "stop" and outs[-1].request_id == rid
    assert len([t for o in outs for t in o.new_token_ids]) == free_run.index(stop)


def test_prefix_cache_shares_blocks_and_recomputes_only_the_rest():
    model = model_for("llama_gqa")
    system = list(range(10, 42))                          # 32 tokens = 8 full blocks of 4
    engine = Engine(model, block_size=4, num_blocks=64)
    first = engine.generate([system + [50, 51]], 6)
    assert engine.blocks.stats.cached_tokens == 0
    scheduled = engine.stats.scheduled_tokens
    second = engine.generate([system + [60, 61, 62]], 6)
    assert first[0] == generated_alone(model, system + [50, 51], 6)
    assert second[0] == generated_alone(model, system + [60, 61, 62], 6)
    # The second prompt's 8 full system blocks came from the cache: only 3 prompt tokens + 5 decodes ran.
    assert engine.blocks.stats.cached_tokens == 32
    assert engine.stats.scheduled_tokens - scheduled == 3 + 5
    assert 0 < engine.blocks.stats.hit_rate < 1


def test_a_prompt_found_whole_recomputes_its_last_token_by_copy_on_write():
    model = model_for("llama_gqa")
    prompt = list(range(20, 36))                          # 16 tokens = 4 full blocks
    engine = Engine(model, block_size=4, num_blocks=32)
    engine.generate([prompt], 5)
    cached_block = engine.blocks.by_hash[next(reversed(engine.blocks.by_hash))]
    snapshot = [pool[cached_block].copy() for pool in engine.store.k_pool]
    again = engine.generate([prompt], 5)
    assert again[0] == generated_alone(model, prompt, 5)
    assert engine.blocks.stats.cow_copies >= 1
    # The hashed block was copied, not written: its K/V are bit for bit what they were.
    assert all((pool[cached_block] == old).all() for pool, old in zip(engine.store.k_pool, snapshot))
    engine.check_blocks()


def test_lru_evicts_the_least_recently_released_block():
    blocks = BlockManager(num_blocks=4, block_size=2)

    class Seq:
        def __init__(self, tokens):
            self.token_ids, self.num_computed, self.block_table, self.block_hashes = tokens, 0, [], []

    old, new = Seq([1, 2, 3]), Seq([7, 8, 9])
    for seq in (old, new):
        blocks.write_blocks(seq, 3)
        seq.num_computed = 3
        blocks.register_full_blocks(seq)
        blocks.release(seq)
    assert blocks.num_cached == 2 and blocks.num_available == 4
    # Two free blocks, then the cached ones, oldest first: old's full block is evicted, new's kept.
    grab = Seq([0] * 7)
    blocks.write_blocks(grab, 7 - 1)
    assert blocks.stats.evictions == 1
    assert block_hash(None, [7, 8]) in blocks.by_hash and block_hash(None, [1, 2]) not in blocks.by_hash
    blocks.check([grab.block_table])


def test_parallel_sampling_forks_share_the_prompt_and_copy_on_write():
    # n answers of one prompt: the children share the prompt's blocks, the partial last one included;
    # answer i must equal generate(prompt, temperature=1, seed=seed + i) alone.
    model = model_for("llama_gqa")
    prompt = [3, 1, 4, 1, 5, 9, 2]                         # 7 tokens: the last block (of 4) is partial
    engine = Engine(model, block_size=4, num_blocks=32)
    rid = engine.add_request(prompt, 10, temperature=1.0, seed=11, n=3, stop_token_ids=[])
    answers = {0: [], 1: [], 2: []}
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id == rid
            answers[out.index] += out.new_token_ids
        engine.check_blocks()
    for i in range(3):
        assert answers[i] == model.generate([prompt], max_new_tokens=10, temperature=1.0, seed=11 + i,
                                            stop_tokens=[]).tokens[0]
    assert engine.blocks.stats.cow_copies >= 2
    assert len({tuple(a) for a in answers.values()}) > 1


# ---------------------------------------------------------------- broken variants are caught

def test_a_hash_without_its_parent_is_caught():
    # With h_i = sha256(tokens_i) alone, the block "y" at position 4..7 of the last prompt matches the
    # block "y" computed at positions 0..3 of another prompt: K/V with the wrong positions and context.
    model = model_for("llama_gqa")
    x, y, q = [11, 12, 13, 14], [21, 22, 23, 24], [31, 32, 33, 34]
    workload = [(0, x + q + [5], 4), (0, y + q + [6], 4), (3, x + y + [7], 8)]
    want = [generated_alone(model, p, m) for _, p, m in workload]

    def served(broken):
        engine = Engine(model, block_size=4, num_blocks=64)
        if broken:
            engine.blocks.hash_of = lambda parent, tokens: block_hash(None, tokens)
        return run(engine, workload)

    assert served(broken=False) == want
    assert served(broken=True) != want


def test_sharing_without_copy_on_write_is_caught():
    # Without copy-on-write, the n answers write their different tokens into the same slot of the
    # shared partial block, and all but the last writer attend to a token they never sampled.
    model = model_for("llama_gqa")
    prompt = [3, 1, 4, 1, 5, 9, 2]

    def answers(broken):
        engine = Engine(model, block_size=4, num_blocks=32)
        if broken:
            engine.blocks._blocks_to_copy = lambda seq, n_new: []
        engine.add_request(prompt, 10, temperature=1.0, seed=11, n=3, stop_token_ids=[])
        out = {0: [], 1: [], 2: []}
        while engine.has_unfinished():
            for o in engine.step():
                out[o.index] += o.new_token_ids
        return out

    want = {i: model.generate([prompt], max_new_tokens=10, temperature=1.0, seed=11 + i,
                              stop_tokens=[]).tokens[0] for i in range(3)}
    assert answers(broken=False) == want
    assert answers(broken=True) != want


def test_negative_ref_counts_are_refused():
    blocks = BlockManager(num_blocks=2, block_size=2)

    class Seq:
        token_ids, num_computed, block_table, block_hashes = [1, 2], 0, [], []

    seq = Seq()
    blocks.write_blocks(seq, 2)
    table = list(seq.block_table)
    blocks.release(seq)
    seq.block_table = table                               # a double free
    with pytest.raises(AssertionError, match="negative"):
        blocks.release(seq)


# ---------------------------------------------------------------- requests at the door, abort

def test_bad_requests_are_refused_and_change_nothing():
    model = model_for("llama_gqa")
    engine = Engine(model, block_size=4, num_blocks=8)
    bad = [
        (dict(prompt_ids=[]), InvalidInputError),
        (dict(prompt_ids=[1, 1000]), InvalidInputError),
        (dict(prompt_ids=[1, 2.0]), InvalidInputError),
        (dict(prompt_ids=[1], max_tokens=0), InvalidInputError),
        (dict(prompt_ids=[1], max_tokens=True), InvalidInputError),
        (dict(prompt_ids=[1] * 60, max_tokens=10), SequenceTooLongError),
        (dict(prompt_ids=[1] * 30, max_tokens=5), CacheOverflowError),       # 34 positions > 8 blocks of 4
        (dict(prompt_ids=[1], temperature=-1.0), SamplingError),
        (dict(prompt_ids=[1], top_p=1.5), SamplingError),
        (dict(prompt_ids=[1], seed=-3), InvalidInputError),
        (dict(prompt_ids=[1], n=0), InvalidInputError),
    ]
    for kwargs, error in bad:
        with pytest.raises(error):
            engine.add_request(**kwargs)
    assert not engine.has_unfinished() and engine.requests == {}
    engine.add_request([1, 2], 3)
    with pytest.raises(InvalidInputError, match="in use"):
        engine.add_request([1, 2], 3, request_id="req-0")


def test_abort_gives_the_blocks_back_and_the_others_go_on():
    model = model_for("llama_gqa")
    engine = Engine(model, block_size=4, num_blocks=40, prefix_caching=False)
    keep = engine.add_request([1, 2, 3, 4, 5], 12)
    gone = engine.add_request([6, 7, 8, 9, 10, 11], 12)
    tokens = {keep: [], gone: []}
    for _ in range(3):
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    assert engine.blocks.num_in_use > 0
    engine.abort(gone)
    engine.check_blocks()
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    assert tokens[keep] == generated_alone(model, [1, 2, 3, 4, 5], 12)
    assert engine.blocks.num_in_use == 0 and engine.blocks.num_available == 40


def test_bundled_model_float32_batch_equals_alone():
    # The bundled model as served by default (float32): continuous batching of text prompts.
    model = minikv.load()
    texts = ["Once upon a time", "The meaning of life is", "Hi", "To be, or not to be"]
    prompts = [model.tokenizer.encode(t) for t in texts]
    engine = Engine(model, block_size=8, max_num_tokens=16)
    assert engine.generate(prompts, 12) == [model.generate(p, max_new_tokens=12, temperature=0.0).tokens[0]
                                            for p in prompts]
    assert engine.store.k_pool[0].dtype == np.float32


def test_forward_logit_rows_are_those_rows_of_last_only():
    model = model_for("llama_gqa")
    ids = np.array([[1, 2, 3], [4, 5, 0], [6, 0, 0]])
    n_new = np.array([3, 2, 1])
    every = model.forward(ids, n_new=n_new, last_only=True)
    some = model.forward(ids, n_new=n_new, last_only=True, logit_rows=np.array([2, 0]))
    assert np.array_equal(some, every[[2, 0]])
    for bad in (np.array([3]), np.array([[0]]), np.array([0.0])):
        with pytest.raises(InvalidInputError, match="logit_rows"):
            model.forward(ids, n_new=n_new, last_only=True, logit_rows=bad)
    with pytest.raises(InvalidInputError, match="last_only"):
        model.forward(ids, n_new=n_new, logit_rows=np.array([0]))


def test_serving_benchmark_quick_run(tmp_path):
    # The benchmark script runs end to end (small model, 4 requests, no transformers); times not asserted.
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.serving", "--quick", "--no-peer", "--out", str(tmp_path)],
                          cwd=repo, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "serving.json").read_text())
    for runs in report["backends"].values():            # numpy, and numba where installed
        assert [len(t) for t in runs["engine"]["4"]["tokens"]] == [len(t) for t in runs["one_at_a_time"]["tokens"]]
    assert report["shared_prefix"]["with_cache"]["hit_rate"] > 0
    assert (tmp_path / "serving.md").read_text().startswith("## Serving")


def test_abort_of_one_answer_leaves_the_others():
    model = model_for("llama_gqa")
    engine = Engine(model, block_size=4, num_blocks=40)
    prompt = [3, 1, 4, 1, 5, 9, 2]
    rid = engine.add_request(prompt, 8, temperature=1.0, seed=4, n=3, stop_token_ids=[])
    answers = {0: [], 1: [], 2: []}
    for out in engine.step() + engine.step():
        answers[out.index] += out.new_token_ids
    engine.abort(rid, 1)
    engine.check_blocks()
    while engine.has_unfinished():
        for out in engine.step():
            assert out.index != 1
            answers[out.index] += out.new_token_ids
    for i in (0, 2):
        assert answers[i] == model.generate([prompt], max_new_tokens=8, temperature=1.0, seed=4 + i,
                                            stop_tokens=[]).tokens[0]
    assert len(answers[1]) == 2 and not engine.requests and engine.blocks.num_in_use == 0
