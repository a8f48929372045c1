"""The `｜DSML｜` tool-call markup: writing OpenAI tool calls as DSML, and reading one
complete `<｜DSML｜invoke ...>...</｜DSML｜invoke>` element back.

A parameter carries its type in `string="true|false"`: strings are written raw, every other
JSON value (number, bool, null, array, object) as compact-ish JSON (`json.dumps` defaults).
"""

import json
import re
from typing import Any

from dsv4.chat.tokens import (INVOKE_CLOSE, INVOKE_OPEN, PARAM_CLOSE, PARAM_OPEN,
                              TOOL_CALLS_CLOSE, TOOL_CALLS_OPEN)


def to_json(value: Any) -> str:
    # The reference serialises with ensure_ascii=False and default separators (", ", ": ");
    # schemas, non-string parameter values and response formats all go through here.
    return json.dumps(value, ensure_ascii=False)


def tool_call_arguments(tool_call: dict) -> dict:
    """The arguments of an OpenAI tool call as a dict, tolerant of what clients send.

    Unparseable argument text becomes a single `arguments` string parameter (as the
    reference does), so a broken historical call still renders instead of failing."""
    fn = tool_call.get("function", tool_call)
    raw = fn.get("arguments")
    if raw is None or raw == "":
        return {}
    if isinstance(raw, dict):
        return raw
    try:
        args = json.loads(raw)
    except (TypeError, ValueError):
        return {"arguments": raw}
    return args if isinstance(args, dict) else {"arguments": raw}


def encode_parameter(name: str, value: Any) -> str:
    is_str = isinstance(value, str)
    text = value if is_str else to_json(value)
    return f'{PARAM_OPEN} name="{name}" string="{"true" if is_str else "false"}">{text}{PARAM_CLOSE}'


def encode_invoke(tool_call: dict) -> str:
    fn = tool_call.get("function", tool_call)
    params = "\n".join(encode_parameter(k, v) for k, v in tool_call_arguments(tool_call).items())
    return f'{INVOKE_OPEN} name="{fn["name"]}">\n{params}\n{INVOKE_CLOSE}'


def encode_tool_calls(tool_calls: list[dict]) -> str:
    """The block an assistant turn ends with (before EOS), blank line included."""
    invokes = "\n".join(encode_invoke(tc) for tc in tool_calls)
    return f"\n\n{TOOL_CALLS_OPEN}\n{invokes}\n{TOOL_CALLS_CLOSE}"


_INVOKE_HEAD = re.compile(re.escape(INVOKE_OPEN) + r'\s+name="([^"]*)"\s*>')
_PARAM_HEAD = re.compile(re.escape(PARAM_OPEN) + r'\s+name="([^"]*)"((?:\s+[\w-]+="[^"]*")*)\s*>')
_ATTR = re.compile(r'([\w-]+)="([^"]*)"')


def _short(text: str, n: int = 80) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


def _reject(constant: str):
    raise ValueError(constant)


def _parameter_json(name: str, value: str, kind: str | None, errors: list[str]) -> str:
    """The JSON text of one parameter value, given its raw DSML text and `string=` type."""
    if kind == "true":
        return to_json(value)
    try:
        json.loads(value, parse_constant=_reject)  # NaN / Infinity are not JSON
        valid = True
    except ValueError:
        valid = False
    if kind != "false":
        how = "read as JSON" if valid else "kept as a string"
        errors.append(f"parameter {name!r}: unknown type string={kind!r}; {how}")
    elif not valid:
        errors.append(f"parameter {name!r}: string=\"false\" but value {_short(value)} is not "
                      "valid JSON; kept as a string")
    # Valid JSON is kept verbatim, as the reference does, so `{"a":1}` stays `{"a":1}`.
    return value if valid else to_json(value)


def parse_invoke(chunk: str) -> tuple[dict | None, list[str]]:
    """One complete `<｜DSML｜invoke ...>...</｜DSML｜invoke>` element -> (OpenAI tool call or
    None, problems found).

    Damage to the structure (no name, an unterminated parameter) drops the whole call: a
    call with silently missing arguments is worse than none. Damage to a single value
    (invalid JSON, unknown type, duplicate name) keeps the call and notes it."""
    errors: list[str] = []
    head = _INVOKE_HEAD.match(chunk)
    if head is None or not head.group(1):
        return None, [f"malformed invoke header {_short(chunk)}; tool call dropped"]
    name = head.group(1)
    assert chunk.endswith(INVOKE_CLOSE)
    pos, end = head.end(), len(chunk) - len(INVOKE_CLOSE)
    fields: dict[str, str] = {}
    while pos < end:
        while pos < end and chunk[pos].isspace():
            pos += 1
        if pos >= end:
            break
        param = _PARAM_HEAD.match(chunk, pos, end)
        if param is None:
            nxt = chunk.find(PARAM_OPEN, pos + 1, end)
            stop = end if nxt < 0 else nxt
            errors.append(f"tool {name!r}: unexpected text {_short(chunk[pos:stop])} ignored")
            pos = stop
            continue
        close = chunk.find(PARAM_CLOSE, param.end(), end)
        if close < 0 or PARAM_OPEN in chunk[param.end():close]:
            return None, errors + [f"tool {name!r}: unterminated parameter "
                                   f"{_short(chunk[pos:end])}; tool call dropped"]
        pname, value = param.group(1), chunk[param.end():close]
        kind = dict(_ATTR.findall(param.group(2))).get("string")
        pos = close + len(PARAM_CLOSE)
        if pname in fields:
            errors.append(f"tool {name!r}: duplicate parameter {pname!r}; first value kept")
            continue
        fields[pname] = _parameter_json(pname, value, kind, errors)
    # Assembled by hand rather than json.dumps(dict) so that valid JSON values keep the
    # model's own spelling, exactly as the reference decoder does.
    arguments = "{" + ", ".join(f"{to_json(k)}: {v}" for k, v in fields.items()) + "}"
    return {"type": "function", "function": {"name": name, "arguments": arguments}}, errors


# Tags the tool-call parser recognises between invokes.
BLOCK_TAGS = (TOOL_CALLS_OPEN, TOOL_CALLS_CLOSE, INVOKE_OPEN)
