"""The HTTP server against the official `openai` client, live on 127.0.0.1.

The real engine with the tiny random model serves chat / stream / completions / errors / concurrency /
disconnects (greedy, compared token for token with `dsv4.generate` seeing KV in the paged pool's FP8
formats). Tool calls and reasoning need a model that writes DSML: a scripted engine (same public API as
`dsv4.engine.Engine`) replays canned completions token by token through the real tokenizer, so the
server's parsing path is the one tested."""

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from dsv4 import kernels
from dsv4.chat import encode_messages
from dsv4.config import preset
from dsv4.engine import Engine, EngineConfig, Event, SamplingParams, Usage
from dsv4.engine.text import TextStream
from dsv4.generate import generate
from dsv4.server import create_app
from dsv4.server.app import _reasoning_mode
from dsv4.server.protocol import ChatCompletionRequest
from dsv4.tokenizer import load_tokenizer

from conftest import random_model

KEY = "test-key"


class LiveServer:
    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def model():
    return random_model(preset("tiny"))


@pytest.fixture(scope="module")
def live(model, tok):
    engine = Engine(model, EngineConfig(prefill_chunk=128, max_batch=32), decode=tok.decode).start()
    server = LiveServer(create_app(engine, tok, "tiny", api_key=KEY))
    yield server, engine
    server.stop()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live[0].url + "/v1", api_key=KEY, max_retries=0)


def fp8_generate(model, ids, params, **kw):
    """Greedy decoding as the engine's default paged FP8 pool computes it (KV rounded through its formats)."""
    with kernels.simulate_fp8_kv():
        return generate(model, ids, params, **kw)


def expected(model, tok, messages, n, mode="chat"):
    """What greedy decoding of the rendered prompt gives, without the server."""
    ids = [t % 512 for t in tok.encode(encode_messages(messages, thinking_mode=mode))]
    out = fp8_generate(model, ids, SamplingParams(max_new_tokens=n), stop_ids={1})
    return ids, out


def wait_for(cond, timeout=30):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


def test_chat_matches_greedy_decoding(client, model, tok):
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=8, temperature=0,
                                       logprobs=True, top_logprobs=2)
    ids, out = expected(model, tok, MSGS, 8)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == tok.decode([t for t in out if t != 1])
    assert r.choices[0].finish_reason == ("stop" if out[-1] == 1 else "length")
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(out)
    assert len(r.choices[0].logprobs.content) == len(out)
    assert all(len(lp.top_logprobs) == 2 for lp in r.choices[0].logprobs.content)


def test_chat_stream_equals_non_stream(client):
    kw = dict(model="tiny", messages=MSGS, max_tokens=10, temperature=0)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_completions_models_health_metrics(client, live, model, tok):
    r = client.completions.create(model="tiny", prompt=[5, 6, 7, 8], max_tokens=6, temperature=0, logprobs=1)
    out = fp8_generate(model, [5, 6, 7, 8], SamplingParams(max_new_tokens=6))
    assert r.choices[0].text == tok.decode(out) and r.usage.completion_tokens == 6
    assert len(r.choices[0].logprobs.token_logprobs) == 6
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=[5, 6, 7, 8], max_tokens=6, temperature=0, stream=True) if c.choices)
    assert streamed == r.choices[0].text
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(live[0].url + "/health").json() == {"status": "ok"}
    metrics = httpx.get(live[0].url + "/metrics").text
    assert "# TYPE dsv4_generation_tokens_total counter" in metrics
    assert any(line.startswith("dsv4_requests_running ") for line in metrics.splitlines())
    assert any(line.startswith("dsv4_kv_pool_tokens ") for line in metrics.splitlines())  # the paged pool


def test_errors_are_openai_json(client, live):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=MSGS)
    assert e.value.body["code"] == "model_not_found"
    for bad in ({"messages": [{"role": "wizard", "content": "x"}]}, {"messages": []},
                {"messages": MSGS, "temperature": 7}, {"messages": MSGS, "n": 2},
                {"messages": MSGS, "tool_choice": {"type": "function", "function": {"name": "nope"}},
                 "tools": [{"type": "function", "function": {"name": "f"}}]}):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="tiny", **bad)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=10 ** 6)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=live[0].url + "/v1", api_key="wrong", max_retries=0).models.list()
    r = httpx.post(live[0].url + "/v1/chat/completions", content=b"{not json",
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(live[0].url + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and "error" in r.json()
    assert httpx.get(live[0].url + "/health").status_code == 200  # still serving


def test_32_concurrent_requests(live, model, tok):
    prompts = [[{"role": "user", "content": f"Count to {i}."}] for i in range(4)]
    want = [tok.decode([t for t in expected(model, tok, p, 6)[1] if t != 1]) for p in prompts]

    async def run():
        c = openai.AsyncOpenAI(base_url=live[0].url + "/v1", api_key=KEY, max_retries=0)
        rs = await asyncio.gather(*(c.chat.completions.create(model="tiny", messages=prompts[i % 4], max_tokens=6,
                                                              temperature=0) for i in range(32)))
        await c.close()
        return rs

    rs = asyncio.run(run())
    assert [r.choices[0].message.content for r in rs] == [want[i % 4] for i in range(32)]
    assert live[1].stats()["running"] == 0


def test_disconnect_frees_the_slot(live):
    server, engine = live
    before = engine.stats()["finished"].get("cancelled", 0)
    # /v1/completions has no stop token, so only the disconnect can end these requests early.
    body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 20000, "stream": True}
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}) as h:
        with h.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            next(lines)
    # Non-streaming: the client gives up, the server notices and cancels.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json={**body, "stream": False}, timeout=1.0,
                   headers={"Authorization": f"Bearer {KEY}"})
    wait_for(lambda: engine.stats()["finished"].get("cancelled", 0) == before + 2)
    wait_for(lambda: engine.stats()["running"] == 0 and engine.stats()["kv_reserved_bytes"] == 0)


def test_reasoning_mode_mapping():
    def mode(**kw):
        return _reasoning_mode(ChatCompletionRequest(model="m", messages=MSGS, **kw), "off")

    assert mode() == ("chat", None)
    assert mode(reasoning_effort="high") == mode(reasoning_effort="low") == ("thinking", "high")
    assert mode(reasoning_effort="max") == mode(reasoning_effort="xhigh") == ("thinking", "max")
    assert mode(reasoning_effort="none") == mode(thinking={"type": "disabled"}) == ("chat", None)
    assert mode(thinking={"type": "enabled"}) == mode(chat_template_kwargs={"thinking": True}) == ("thinking", "high")
    assert _reasoning_mode(ChatCompletionRequest(model="m", messages=MSGS), "max") == ("thinking", "max")


# ---------------------------------------------------------------------- scripted engine: tools, reasoning
class ScriptedEngine:
    """The engine's public API, replaying a canned completion (ending in EOS) one token at a time."""

    def __init__(self, tok):
        self.tok, self.vocab_size, self.max_context = tok, tok.vocab_size, 65536
        self.completion, self.prompts = "", []

    def submit(self, prompt_ids, params, on_event=None, request_id=None):
        self.prompts.append(self.tok.decode(prompt_ids))
        ids = self.tok.encode(self.completion)
        text, cancelled = TextStream(self.tok.decode, params.stop), threading.Event()

        def run():
            for t in ids:
                if cancelled.is_set():
                    return on_event(Event("r", finish_reason="cancelled", usage=Usage(len(prompt_ids), 0, 0)))
                if t == self.tok.eos_id:
                    return on_event(Event("r", [t], text.finish(), finish_reason="stop", stop_reason=t,
                                          usage=Usage(len(prompt_ids), len(ids), 0)))
                on_event(Event("r", [t], text.add(t)))
            on_event(Event("r", [], text.finish(), finish_reason="length", usage=Usage(len(prompt_ids), len(ids), 0)))
        threading.Thread(target=run, daemon=True).start()
        return type("Handle", (), {"cancel": lambda self: cancelled.set()})()

    def shutdown(self):
        pass


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string"}, "days": {"type": "integer"}}}}}]
CALL = ('\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n'
        '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="days" string="false">2</｜DSML｜parameter>\n'
        '</｜DSML｜invoke>\n</｜DSML｜tool_calls><｜end▁of▁sentence｜>')


@pytest.fixture(scope="module")
def scripted(tok):
    engine = ScriptedEngine(tok)
    server = LiveServer(create_app(engine, tok, "dsv4"))
    yield engine, openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    server.stop()


def test_tool_calls_parsed(scripted):
    engine, c = scripted
    engine.completion = "The user wants weather.</think>Checking." + CALL
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    r = c.chat.completions.create(model="dsv4", messages=msgs, tools=TOOLS, reasoning_effort="high")
    m = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls"
    assert m.content == "Checking." and m.model_extra["reasoning_content"] == "The user wants weather."
    assert [(t.function.name, json.loads(t.function.arguments)) for t in m.tool_calls] == \
        [("get_weather", {"city": "Paris", "days": 2})]
    assert m.tool_calls[0].id.startswith("call_")
    prompt = engine.prompts[-1]
    assert prompt.endswith("<｜User｜>Weather in Paris?<｜Assistant｜><think>") and "get_weather" in prompt

    chunks = list(c.chat.completions.create(model="dsv4", messages=msgs, tools=TOOLS, reasoning_effort="high",
                                            stream=True))
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    content = "".join(d.content or "" for d in deltas)
    reasoning = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
    calls = [tc for d in deltas for tc in d.tool_calls or []]
    assert content == "Checking." and reasoning == "The user wants weather."
    assert "DSML" not in content + reasoning
    assert [(tc.index, tc.function.name, json.loads(tc.function.arguments)) for tc in calls] == \
        [(0, "get_weather", {"city": "Paris", "days": 2})]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_turn_round_trip_and_choices(scripted):
    engine, c = scripted
    engine.completion = "It is 21C.<｜end▁of▁sentence｜>"
    msgs = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {
                "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "21C"}]
    r = c.chat.completions.create(model="dsv4", messages=msgs, tools=TOOLS)
    assert r.choices[0].message.content == "It is 21C." and r.choices[0].finish_reason == "stop"
    assert engine.prompts[-1].endswith("<tool_result>21C</tool_result><｜Assistant｜></think>")
    # tool_choice="none": tools are not offered and a call the model writes anyway is not returned.
    engine.completion = "Sure." + CALL
    r = c.chat.completions.create(model="dsv4", messages=msgs[:1], tools=TOOLS, tool_choice="none")
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content == "Sure."
    assert "get_weather" not in engine.prompts[-1]
    # A named tool_choice starts the call in the prompt; the model continues it.
    engine.completion = CALL.split('name="get_weather">\n', 1)[1]
    r = c.chat.completions.create(model="dsv4", messages=msgs[:1], tools=TOOLS, reasoning_effort="high",
                                  tool_choice={"type": "function", "function": {"name": "get_weather"}})
    forced = '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n'
    assert engine.prompts[-1].endswith('<｜Assistant｜></think>' + forced)
    assert json.loads(r.choices[0].message.tool_calls[0].function.arguments) == {"city": "Paris", "days": 2}


def test_reasoning_modes_reach_the_prompt(scripted):
    engine, c = scripted
    engine.completion = "Thinking hard.</think>Blue.<｜end▁of▁sentence｜>"
    r = c.chat.completions.create(model="dsv4", messages=MSGS, reasoning_effort="max")
    assert r.choices[0].message.content == "Blue." and r.choices[0].message.model_extra["reasoning_content"] == \
        "Thinking hard."
    assert "Reasoning Effort: Absolute maximum" in engine.prompts[-1] and engine.prompts[-1].endswith("<think>")
    engine.completion = "Blue.<｜end▁of▁sentence｜>"
    r = c.chat.completions.create(model="dsv4", messages=MSGS, extra_body={"thinking": {"type": "disabled"}})
    assert r.choices[0].message.content == "Blue." and engine.prompts[-1].endswith("</think>")
    assert "reasoning_content" not in (r.choices[0].message.model_extra or {})
    # Reasoning sent back in an earlier assistant turn is dropped at the new user turn (no tools).
    msgs = MSGS + [{"role": "assistant", "content": "Red.", "reasoning_content": "Hmm."},
                   {"role": "user", "content": "Another?"}]
    c.chat.completions.create(model="dsv4", messages=msgs, reasoning_effort="high")
    assert "Hmm." not in engine.prompts[-1] and engine.prompts[-1].endswith("Another?<｜Assistant｜><think>")


def test_dsv4_serve_command(tmp_path):
    """`dsv4 serve` end to end: a subprocess on a free port, one chat request, clean stop."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "dsv4.cli", "serve", "--model", "tiny", "--port", str(port),
                             "--prefix-dir", str(tmp_path), "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: proc.poll() is not None or _up(f"http://127.0.0.1:{port}/health"), timeout=60)
        assert proc.poll() is None, proc.stdout.read().decode()
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        r = c.chat.completions.create(model="tiny", messages=MSGS, max_tokens=4, temperature=0)
        assert r.usage.completion_tokens <= 4
    finally:
        proc.terminate()
        proc.wait(30)


def _up(url):
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
