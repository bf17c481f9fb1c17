"""``llmarch serve``: the continuous-batching scheduler against one-request generation for every
cache kind, prefix reuse, and the OpenAI-compatible HTTP API driven by the official client."""

import json
import shutil
import socket
import threading
import time
from http.client import HTTPConnection
from pathlib import Path

import pytest
import torch
from oracle import VOCAB
from tiny_tokenizer import tiny_tokenizer

import llmarch
from llmarch.inference.generate import GenerationConfig, generate
from llmarch.serving.scheduler import Scheduler

SRC = Path(__file__).resolve().parents[1] / "src"
# the tiny character tokenizer knows a-z, space, '.' and ','
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }}.{% endfor %}"
                 "{% if add_generation_prompt %}assistant {% endif %}")


def tiny_checkpoint(src: Path, dest: Path) -> Path:
    """A copy of a tiny HF checkpoint with the character tokenizer and a chat template."""
    shutil.copytree(src, dest, dirs_exist_ok=True)
    tiny_tokenizer().backend.save(str(dest / "tokenizer.json"))
    (dest / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "add_bos_token": True,
         "chat_template": CHAT_TEMPLATE}))
    return dest


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_reference):
    """arch -> (llmarch model, checkpoint directory with tokenizer and chat template)."""
    cache = {}

    def get(arch: str):
        if arch not in cache:
            d = tiny_checkpoint(tiny_reference(arch)[0], tmp_path_factory.mktemp(arch))
            cache[arch] = (llmarch.from_pretrained(d), d)
        return cache[arch]

    return get


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run_all(scheduler: Scheduler, requests: list[tuple[list[int], GenerationConfig]]) -> list[list[int]]:
    """Submit every request at once, step the scheduler by hand; each one's tokens."""
    out = [[] for _ in requests]
    done = [False] * len(requests)

    def emitter(i):
        def emit(ev):
            if ev.token is not None:
                out[i].append(ev.token)
            done[i] = done[i] or ev.finish_reason is not None
        return emit

    for i, (prompt, config) in enumerate(requests):
        scheduler.submit(prompt, config, emitter(i))
    for _ in range(10_000):
        if all(done):
            return out
        scheduler.step()
    raise AssertionError("the scheduler did not finish")


# ----------------------------------------------------------------------------------------
# the scheduler
# ----------------------------------------------------------------------------------------

# full buffers, sliding rings (window 4), chunked rings (chunk 5), MLA latents, KV sharing
@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "llama4_text", "deepseek_v3", "gemma3n"])
def test_continuous_batching_matches_one_request_at_a_time(tiny, arch):
    """Sequences of different lengths that join and leave at different steps (3 rows for 6
    requests, prompts longer than the prefill chunk, windows shorter than the prompts) get
    the tokens each gets alone."""
    model = tiny(arch)[0]
    lengths, news = [3, 11, 7, 1, 9, 5], [9, 4, 12, 6, 3, 10]
    requests = [(_prompt(n, s), GenerationConfig(max_new_tokens=m, ignore_eos=True))
                for s, (n, m) in enumerate(zip(lengths, news))]
    scheduler = Scheduler(model, None, slots=3, context=40, prefill_chunk=4)
    got = run_all(scheduler, requests)
    assert [len(t) for t in got] == news
    assert got == [generate(model, None, p, c).token_ids[0] for p, c in requests]
    assert scheduler.active == 0 and scheduler.decoding == 0


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "llama4_text", "deepseek_v3", "gemma3n"])
def test_prompts_arriving_together_are_prefilled_in_one_forward(tiny, arch, monkeypatch):
    """Four prompts of different lengths (right-padded to the longest, padding at position -1)
    are one prefill forward, and each still gets the tokens it gets alone; a fifth whose chunk
    would take the padded batch past prefill_chunk waits for the next turn."""
    model = tiny(arch)[0]
    lengths, news = [3, 1, 4, 2, 9], [5, 7, 3, 6, 4]
    requests = [(_prompt(n, 20 + s), GenerationConfig(max_new_tokens=m, ignore_eos=True))
                for s, (n, m) in enumerate(zip(lengths, news))]
    shapes = []
    real = model.forward
    monkeypatch.setattr(model, "forward", lambda ids, **kw: shapes.append(tuple(ids.shape)) or real(ids, **kw))
    scheduler = Scheduler(model, None, slots=5, context=40, prefill_chunk=16)
    got = run_all(scheduler, requests)
    monkeypatch.undo()
    assert shapes[0] == (4, 4)  # rows 1-4 together; 5 x 9 columns would exceed 16 tokens
    assert shapes[1] == (1, 9) or shapes[1][1] == 1 and shapes[2] == (1, 9)
    assert got == [generate(model, None, p, c).token_ids[0] for p, c in requests]
    assert scheduler.active == 0 and scheduler.decoding == 0


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "deepseek_v3"])
def test_prefix_reuse_skips_the_shared_prefix_and_changes_nothing(tiny, arch, monkeypatch):
    model = tiny(arch)[0]
    config = GenerationConfig(max_new_tokens=5, ignore_eos=True)
    system = _prompt(20, 7)
    first, second = system + _prompt(3, 8), system + _prompt(6, 9)
    scheduler = Scheduler(model, None, slots=2, context=64, prefill_chunk=8)
    run_all(scheduler, [(first, config)])
    fed = []
    real = model.forward
    monkeypatch.setattr(model, "forward", lambda ids, **kw: fed.append(ids.shape[1]) or real(ids, **kw))
    got = run_all(scheduler, [(second, config)])
    monkeypatch.undo()
    assert got == [generate(model, None, second, config).token_ids[0]]
    window = model.config.sliding_window if "sliding" in model.config.layer_types else None
    if window is not None and len(first) + config.max_new_tokens - 1 > window:
        # the rings wrapped past the shared prefix: it cannot be continued, all of it is recomputed
        assert scheduler.reused_tokens == 0 and sum(fed[:-4]) == len(second)
    else:
        assert scheduler.reused_tokens == 20
        assert sum(fed) - (config.max_new_tokens - 1) == len(second) - 20  # only the new tokens were prefilled


# ----------------------------------------------------------------------------------------
# the HTTP API, through the official openai client
# ----------------------------------------------------------------------------------------

KEY = "sesame"
STEP_DELAY = 0.005  # seconds added to each decode step: streams last long enough to watch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``create_app`` on uvicorn in a thread, on a free loopback port."""

    def __init__(self, model, tokenizer, api_key=KEY, **scheduler_options):
        import uvicorn

        from llmarch.serving.app import create_app

        self.scheduler = Scheduler(model, tokenizer, **scheduler_options)
        real = self.scheduler.decode
        self.scheduler.decode = lambda: (time.sleep(STEP_DELAY), real())
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = create_app(self.scheduler, "tiny", api_key)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)

    def client(self, **kw):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0, timeout=60, **kw)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def served(tiny):
    pytest.importorskip("openai")
    from llmarch.checkpoints.tokenizer import Tokenizer

    model, d = tiny("llama")
    tokenizer = Tokenizer.from_file(d)
    server = Server(model, tokenizer, slots=8, context=model.config.max_position_embeddings, max_queue=64)
    yield server, model, tokenizer
    server.close()


def alone(model, tokenizer, prompt, max_tokens: int, **kw):
    """What one-request generation (llmarch.inference.generate) answers, greedy."""
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
    return generate(model, tokenizer, [ids], GenerationConfig(max_new_tokens=max_tokens, **kw))


def chat_ids(tokenizer, messages) -> list[int]:
    return tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)


def test_models_completion_and_usage(served):
    server, model, tokenizer = served
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["tiny"]
    r = client.completions.create(model="tiny", prompt="the cat sat", max_tokens=12, temperature=0)
    ref = alone(model, tokenizer, "the cat sat", 12)
    assert r.choices[0].text == ref.text
    assert r.choices[0].finish_reason == {"length": "length", "eos": "stop"}[ref.finish_reasons[0]]
    assert r.usage.prompt_tokens == len(tokenizer.encode("the cat sat"))
    assert r.usage.completion_tokens == len(ref.token_ids[0])
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_completion_uses_the_chat_template(served):
    server, model, tokenizer = served
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    r = server.client().chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    prompt = chat_ids(tokenizer, messages)
    ref = alone(model, tokenizer, prompt, 10)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == len(ref.token_ids[0])


def test_streamed_chat_arrives_before_the_end(served):
    server, model, tokenizer = served
    messages = [{"role": "user", "content": "tell a story"}]
    stream = server.client().chat.completions.create(model="tiny", messages=messages, max_tokens=60, temperature=0,
                                                     stream=True, stream_options={"include_usage": True})
    arrivals, pieces, finish, use = [], [], None, None
    for chunk in stream:
        arrivals.append(time.perf_counter())
        if chunk.usage is not None:
            use = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    ref = alone(model, tokenizer, chat_ids(tokenizer, messages), 60)
    assert "".join(pieces) == ref.text and finish == {"length": "length", "eos": "stop"}[ref.finish_reasons[0]]
    assert use.completion_tokens == len(ref.token_ids[0])
    if len(ref.token_ids[0]) > 20:
        assert arrivals[-1] - arrivals[1] > 10 * STEP_DELAY  # the first text came well before the last


def test_stop_strings(served):
    server, model, tokenizer = served
    full = alone(model, tokenizer, "abc", 40).text
    stop = next(full[i : i + 2] for i in range(3, len(full) - 2) if full[i : i + 2] not in full[: i + 1])
    r = server.client().completions.create(model="tiny", prompt="abc", max_tokens=40, temperature=0, stop=[stop])
    assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"


def test_seeded_sampling_repeats(served):
    client = served[0].client()
    ask = {"model": "tiny", "prompt": "once", "max_tokens": 15, "temperature": 0.9, "top_p": 0.9, "seed": 3}
    assert client.completions.create(**ask).choices[0].text == client.completions.create(**ask).choices[0].text


def test_bad_requests_get_openai_errors_and_the_server_stays_up(served):
    import openai

    server, model, _ = served
    client = server.client()
    context = model.config.max_position_embeddings
    cases = [
        (400, "context_length_exceeded", {"prompt": "abc", "max_tokens": context}),
        (400, "invalid_type", {"prompt": "abc", "max_tokens": "many"}),
        (400, "invalid_type", {"prompt": "abc", "temperature": "hot"}),
        (400, "invalid_value", {"prompt": "abc", "top_p": 0}),
        (400, "invalid_type", {"prompt": ""}),
        (404, "model_not_found", {"prompt": "abc", "model": "gpt-5"}),
    ]
    for status, code, fields in cases:
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(**{"model": "tiny", **fields})
        assert (e.value.status_code, e.value.response.json()["error"]["code"]) == (status, code), fields
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[])
    assert e.value.response.json()["error"]["param"] == "messages"
    with pytest.raises(openai.AuthenticationError) as e:
        _wrong_key(server).models.list()
    assert e.value.response.json()["error"]["code"] == "invalid_api_key"
    assert http(server, "GET", "/v1/models", key=None)[0] == 401
    assert http(server, "GET", "/health", key=None)[1]["status"] == "ok"  # health needs no key
    status, answer = http(server, "POST", "/v1/completions", b"{not json")
    assert status == 400 and "error" in answer
    assert http(server, "GET", "/v1/nothing")[0] == 404
    assert client.completions.create(model="tiny", prompt="abc", max_tokens=2).usage.completion_tokens >= 1


def http(server, method: str, path: str, body=None, key: str | None = KEY) -> tuple[int, dict]:
    """(status, JSON answer) of a plain HTTP request (``body``: bytes as they are, else JSON)."""
    import urllib.error
    import urllib.request

    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data, method=method,
                                 headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _wrong_key(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)


def _concurrently(fn, args: list) -> list:
    out = [None] * len(args)

    def work(i):
        out[i] = fn(args[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


def test_greedy_answer_is_the_same_alone_and_among_16(served):
    server, model, tokenizer = served
    client = server.client()
    prompts = ["the same question"] + [f"other {'ab' * i} prompt" for i in range(15)]

    def ask(p):
        return client.completions.create(model="tiny", prompt=p, max_tokens=20, temperature=0).choices[0].text

    lone = ask(prompts[0])
    together = _concurrently(ask, prompts)
    assert together[0] == lone == alone(model, tokenizer, prompts[0], 20).text
    assert together[1:] == [alone(model, tokenizer, p, 20).text for p in prompts[1:]]


def _stream_text(client, prompt: str, max_tokens: int) -> str:
    stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True)
    return "".join(c.choices[0].text for c in stream if c.choices)


def test_load_32_streaming_clients_then_queue_full(served):
    server, model, tokenizer = served
    client = server.client()
    jobs = [("abcdefghij"[: 1 + i % 10] * (1 + i % 4), 5 + (i * 7) % 40) for i in range(32)]
    t0 = time.monotonic()
    got = _concurrently(lambda job: _stream_text(client, *job), jobs)
    assert time.monotonic() - t0 < 120
    assert got == [alone(model, tokenizer, p, n).text for p, n in jobs]  # every output complete
    assert server.scheduler.active == 0

    # queue full: hold the scheduler, fill its queue, the next request is refused with 503
    scheduler = server.scheduler
    gate = threading.Event()
    real = scheduler.step
    scheduler.step = lambda: (gate.wait(), real())
    limit, scheduler.max_queue = scheduler.max_queue, 2
    try:
        held = [threading.Thread(target=_stream_text, args=(client, "abc", 5)) for _ in range(2)]
        for t in held:
            t.start()
        deadline = time.monotonic() + 10
        while scheduler.active < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        status, answer = http(server, "POST", "/v1/completions", {"model": "tiny", "prompt": "abc"})
        assert status == 503 and answer["error"]["code"] == "server_overloaded"
    finally:
        gate.set()
        scheduler.step, scheduler.max_queue = real, limit
    for t in held:
        t.join(30)
    assert client.completions.create(model="tiny", prompt="abc", max_tokens=3).choices[0].text is not None


def test_a_client_that_disconnects_frees_its_sequence(served):
    server, model, _ = served
    seqs = []
    real = server.scheduler.submit
    server.scheduler.submit = lambda *a: seqs.append(real(*a)) or seqs[-1]
    try:
        body = {"model": "tiny", "prompt": "abc", "max_tokens": model.config.max_position_embeddings - 10,
                "temperature": 0, "stream": True}
        conn = HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("POST", "/v1/completions", json.dumps(body), {"Authorization": f"Bearer {KEY}"})
        r = conn.getresponse()
        assert r.status == 200 and r.readline().startswith(b"data: ")  # the first token, then hang up
        conn.close()
    finally:
        server.scheduler.submit = real
    deadline = time.monotonic() + 10
    while http(server, "GET", "/health")[1]["active"]:
        assert time.monotonic() < deadline, "the abandoned sequence still runs"
        time.sleep(0.02)
    assert seqs[0].out.finish_reason == "cancelled"


def test_a_non_streamed_client_that_disconnects_frees_its_sequence(served):
    """A plain (non-streamed) request whose client hangs up is cancelled, not computed to the end."""
    server, model, _ = served
    seqs = []
    real_submit, real_step = server.scheduler.submit, server.scheduler.step
    server.scheduler.submit = lambda *a: seqs.append(real_submit(*a)) or seqs[-1]

    def slow_step():  # 20 ms a step: the full answer would take seconds
        time.sleep(0.02)
        real_step()

    server.scheduler.step = slow_step
    try:
        body = {"model": "tiny", "prompt": "abc", "max_tokens": model.config.max_position_embeddings - 10,
                "temperature": 0}
        conn = HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("POST", "/v1/completions", json.dumps(body), {"Authorization": f"Bearer {KEY}"})
        deadline = time.monotonic() + 10
        while not (seqs and seqs[0].out is not None and seqs[0].out.ids):  # generating
            assert time.monotonic() < deadline
            time.sleep(0.01)
        conn.close()  # hang up before the answer
        deadline = time.monotonic() + 10
        while http(server, "GET", "/health")[1]["active"]:
            assert time.monotonic() < deadline, "the abandoned sequence still runs"
            time.sleep(0.02)
    finally:
        server.scheduler.submit, server.scheduler.step = real_submit, real_step
    assert seqs[0].out.finish_reason == "cancelled"
    assert len(seqs[0].out.ids) < body["max_tokens"]


def test_the_scheduler_makes_int8_layers_batch_invariant(tiny):
    """A request's tokens must not depend on its batch: with an int8-quantised model the
    scheduler has every int8 layer use int8 activations at any row count, so one row alone and
    the same row among 16 are bit-identical (the weight-only kernel used for one row and the
    int8-activation path used for many differ in the last bits), and greedy decoding of a
    request alone equals it among others."""
    import copy

    from llmarch.inference.quant import Int8Linear, native_rows, quantize

    model = quantize(copy.deepcopy(tiny("llama")[0]), "int8")
    layer = next(m for m in model.modules() if isinstance(m, Int8Linear))
    rows = max(16, native_rows(layer))  # past the few-row kernel (on a CPU without AVX-512 it takes up to 47)
    x = torch.randn(rows, layer.in_features, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        assert not torch.equal(layer(x[:1]), layer(x)[:1])  # the two kernels, as loaded
        Scheduler(model, None, slots=4, context=40)
        assert torch.equal(layer(x[:1]), layer(x)[:1])
    config = GenerationConfig(max_new_tokens=8, ignore_eos=True)
    prompts = [_prompt(n, 40 + n) for n in (5, 9, 3, 7)]
    alone = [run_all(Scheduler(model, None, slots=4, context=40), [(p, config)])[0] for p in prompts]
    assert run_all(Scheduler(model, None, slots=4, context=40), [(p, config) for p in prompts]) == alone


def test_the_scheduler_keeps_int4_layers_on_one_kernel(tiny):
    """int4 layers likewise: the native kernel serves few rows and torch's many, so the
    scheduler keeps them on torch's at every row count; a row alone and among 16 are then
    bit-identical, and greedy decoding of a request alone equals it among others."""
    import copy

    from llmarch.inference.quant import Int4Linear, quantize

    model = quantize(copy.deepcopy(tiny("llama")[0]), "int4", group_size=32)
    layer = next(m for m in model.modules() if isinstance(m, Int4Linear))
    x = torch.randn(16, layer.in_features, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        Scheduler(model, None, slots=4, context=40)
        assert not layer.native
        assert torch.equal(layer(x[:1]), layer(x)[:1])
    config = GenerationConfig(max_new_tokens=8, ignore_eos=True)
    prompts = [_prompt(n, 40 + n) for n in (5, 9, 3, 7)]
    alone = [run_all(Scheduler(model, None, slots=4, context=40), [(p, config)])[0] for p in prompts]
    assert run_all(Scheduler(model, None, slots=4, context=40), [(p, config) for p in prompts]) == alone
