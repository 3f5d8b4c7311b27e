"""The OpenAI-compatible server (minikv/serving/server.py), driven by the official ``openai`` client.

A real uvicorn server runs in this process on a free loopback port (so the tests can look at the
engine's block accounting after a client goes away). The model is the bundled one in float64, so
"served == generated alone" is an exact text comparison (see tests/test_serving.py for why float64).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

import minikv

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
from minikv.serving.server import create_app  # noqa: E402  (needs starlette)

MODEL = "tiny-fortunes"


@pytest.fixture(scope="module")
def model():
    return minikv.load(dtype="float64")


@pytest.fixture(scope="module")
def server(model):
    app = create_app(model, block_size=8, num_blocks=160, max_num_tokens=48)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline, "the server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", app
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def alone(model, prompt, max_tokens, **options):
    options.setdefault("temperature", 0.0)
    return model.generate(prompt, max_new_tokens=max_tokens, **options).text


def wait_idle(app, timeout=30):
    """Until the engine thread has nothing left to do; then check its block accounting."""
    async_engine = app.state.engine
    deadline = time.time() + timeout
    while not (async_engine.idle.is_set() and not async_engine.engine.has_unfinished()):
        assert time.time() < deadline, "the engine did not go idle"
        time.sleep(0.02)
    async_engine.engine.check_blocks()
    return async_engine.engine


def test_models_lists_the_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_equals_generate_with_usage(client, model):
    prompt = "Once upon a time"
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
    assert out.choices[0].text == alone(model, prompt, 24)
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (16, 24, 40)


def test_streamed_completion_equals_generate(client, model):
    prompt = "The meaning of life is"
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    events = list(stream)
    text = "".join(e.choices[0].text for e in events if e.choices)
    assert text == alone(model, prompt, 30)
    assert [e.choices[0].finish_reason for e in events if e.choices][-1] == "length"
    assert events[-1].usage.completion_tokens == 30


def test_stream_is_sse_ending_in_done(server):
    url, _ = server
    with httpx.stream("POST", url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 5,
                                                             "temperature": 0, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert "".join(json.loads(line[6:])["choices"][0]["text"] for line in lines[:-1]) == \
        alone(minikv.load(dtype="float64"), "Hi", 5)


def test_concurrent_clients_each_get_their_own_text(client, model, server):
    prompts = ["Once upon", "To be, or not to be", "A", "Never trust a computer", "The cat", "Hello world!"]

    def ask(prompt):
        if len(prompt) % 2:
            return client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0).choices[0].text
        stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0, stream=True)
        return "".join(e.choices[0].text for e in stream)

    with ThreadPoolExecutor(len(prompts)) as pool:
        texts = list(pool.map(ask, prompts))
    assert texts == [alone(model, p, 20) for p in prompts]
    engine = wait_idle(server[1])
    assert engine.blocks.num_in_use == 0


def test_sampling_with_a_seed_equals_generate_and_n_answers(client, model):
    prompt = "Once upon a time"
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0.9, top_p=0.9, seed=7,
                                    n=2)
    texts = [c.text for c in sorted(out.choices, key=lambda c: c.index)]
    assert texts == [alone(model, prompt, 20, temperature=0.9, top_p=0.9, seed=7 + i) for i in range(2)]


def test_stop_string_cuts_the_text(client, model):
    prompt = "Once upon a time"
    full = alone(model, prompt, 40)
    stop = full[5:7]                     # two characters of the text: it is cut at their first occurrence
    assert len(stop) == 2
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0, stop=[stop])
    assert out.choices[0].text == full[:full.find(stop)]
    assert out.choices[0].finish_reason == "stop"
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0, stop=stop,
                                       stream=True)
    assert "".join(e.choices[0].text for e in stream) == full[:full.find(stop)]


def test_chat_without_a_template_is_a_clear_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    error = info.value.body
    assert info.value.status_code == 400 and "chat template" in error["message"]
    assert error["type"] == "invalid_request_error" and error["param"] == "messages"


def test_chat_completions_use_the_models_template(client, model, monkeypatch):
    # A stand-in template (the bundled model has none): the server must render with it, then generate.
    def template(messages, add_generation_prompt=False):
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + ("<assistant>" if add_generation_prompt else "")
        return model.tokenizer.encode(text)

    monkeypatch.setattr(model, "apply_chat_template", template, raising=False)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a fortune."}]
    want = model.generate([template(messages, True)], max_new_tokens=16, temperature=0.0).tokens[0]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == model.tokenizer.decode(want)
    assert out.usage.prompt_tokens == len(template(messages, True)) and out.usage.completion_tokens == 16
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == model.tokenizer.decode(want)
    assert chunks[-1].choices[0].finish_reason == "length"


BAD_REQUESTS = [
    # (body or raw bytes, status, param, code)
    (b"{not json", 400, None, "invalid_json"),
    (b"[1, 2]", 400, None, None),
    ({"model": MODEL, "prompt": 5}, 400, "prompt", None),
    ({"model": MODEL, "prompt": ""}, 400, "prompt", None),
    ({"model": MODEL, "prompt": [1, "a"]}, 400, "prompt", None),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens", None),
    ({"model": MODEL, "prompt": "hi", "max_tokens": "5"}, 400, "max_tokens", None),
    ({"model": MODEL, "prompt": "hi", "temperature": "hot"}, 400, "temperature", None),
    ({"model": MODEL, "prompt": "hi", "top_p": 0}, 400, "top_p", None),
    ({"model": MODEL, "prompt": "hi", "stream": "yes"}, 400, "stream", None),
    ({"model": MODEL, "prompt": "hi", "stop": [1]}, 400, "stop", None),
    ({"model": MODEL, "prompt": "hi", "seed": -1}, 400, "seed", None),
    ({"model": MODEL, "prompt": "hi", "n": 100}, 400, "n", None),
    ({"model": "gpt-4", "prompt": "hi"}, 404, "model", "model_not_found"),
    ({"prompt": "hi"}, 400, "model", None),
    ({"model": MODEL, "prompt": "x" * 600}, 400, "max_tokens", "context_length_exceeded"),
    ({"model": MODEL, "prompt": [300]}, 400, None, None),                       # a token id past the vocabulary
]


@pytest.mark.parametrize("body, status, param, code", BAD_REQUESTS)
def test_bad_requests_get_openai_error_bodies(server, body, status, param, code):
    url, app = server
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else \
        {"json": body}
    response = httpx.post(url + "/v1/completions", **kwargs)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["param"], error["code"]) == (param, code)
    assert not app.state.engine.engine.requests            # nothing was queued


def test_unknown_route_is_an_openai_404(server):
    response = httpx.get(server[0] + "/v1/nothing")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_openai_client_sees_the_error(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=0)
    assert info.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="hi")


def test_a_client_that_disconnects_mid_stream_frees_its_blocks(server, client, model):
    url, app = server
    engine = app.state.engine.engine
    before = engine.stats.generated_tokens
    with httpx.stream("POST", url + "/v1/completions", json={"model": MODEL, "prompt": "Once upon a time",
                                                             "max_tokens": 230, "temperature": 0, "stream": True}) as r:
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                break
        assert engine.blocks.num_in_use > 0                  # the request holds blocks while it streams
    # The connection is closed: the server must abort the request and give every block back.
    engine = wait_idle(app)
    assert engine.blocks.num_in_use == 0 and not engine.requests
    assert engine.stats.generated_tokens - before < 230       # (the bundled model holds 256 positions)
    # ... and it keeps serving.
    out = client.completions.create(model=MODEL, prompt="Hi", max_tokens=8, temperature=0)
    assert out.choices[0].text == alone(model, "Hi", 8)


def test_minikv_serve_binds_loopback_by_default_and_answers(tmp_path):
    import subprocess
    import sys

    from minikv.cli import build_parser

    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port) == ("127.0.0.1", 8000)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    process = subprocess.Popen([sys.executable, "-m", "minikv", "serve", "--port", str(port), "--dtype", "float64"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2)
                break
            except httpx.TransportError:
                assert process.poll() is None, process.stdout.read()
                assert time.time() < deadline, "minikv serve did not start"
                time.sleep(0.2)
        assert response.json()["data"][0]["id"] == MODEL
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        out = client.completions.create(model=MODEL, prompt="Hi", max_tokens=6, temperature=0)
        assert out.choices[0].text == alone(minikv.load(dtype="float64"), "Hi", 6)
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_a_stop_string_in_one_of_n_answers_stops_only_that_one(client, model):
    prompt = "Once upon a time"
    texts = [alone(model, prompt, 30, temperature=1.0, seed=21 + i) for i in range(2)]
    stop = texts[0][3:5]
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=1.0, seed=21, n=2,
                                    stop=stop)
    got = [c.text for c in sorted(out.choices, key=lambda c: c.index)]
    assert got == [t[:t.find(stop)] if stop in t else t for t in texts]
    assert out.choices[0].finish_reason == "stop"
