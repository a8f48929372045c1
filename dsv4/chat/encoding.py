"""OpenAI-style messages -> the DeepSeek-V4 prompt string (docs/chat_format.md).

Same entry point, argument names and output as DeepSeek's reference `encoding_dsv4.py`, so
either can be swapped for the other. The pipeline:
  1. tool messages are folded into user turns as `<tool_result>` blocks, put back into the
     order the assistant called the tools;
  2. in thinking mode, reasoning of turns before the last user turn is dropped (unless tools
     are defined: agents keep all reasoning);
  3. each message is rendered, and a user turn that hands over to the assistant ends with
     `<｜Assistant｜>` plus `<think>` (reason now) or `</think>` (answer directly).
"""

import copy
from typing import Any

from dsv4.chat import tokens as T
from dsv4.chat.dsml import encode_tool_calls, to_json

THINKING_MODES = ("chat", "thinking")
REASONING_EFFORTS = (None, "high", "max")


class ChatFormatError(ValueError):
    """A message list the V4 format cannot express."""


def _text(content: Any) -> str:
    """Message content as text: None -> "", OpenAI content parts -> their text joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif part.get("type") == "text":
                parts.append(part.get("text") or "")
            else:
                raise ChatFormatError(f"content part of type {part.get('type')!r} is not "
                                      "supported by the text chat format; send text parts only")
        return "".join(parts)
    raise ChatFormatError(f"message content must be a string or a list of parts, got "
                          f"{type(content).__name__}")


def render_tools(tools: list[dict]) -> str:
    # OpenAI wraps each schema as {"type": "function", "function": {...}}; the prompt lists
    # the inner function objects, one JSON line each, keys in the caller's order.
    schemas = "\n".join(to_json(t.get("function", t)) for t in tools)
    return T.TOOLS_TEMPLATE.format(tool_schemas=schemas)


def merge_tool_messages(messages: list[dict]) -> list[dict]:
    """Fold `role="tool"` messages into user turns (V4 has no tool role).

    A tool result, and a user message right after tool results, join the preceding user
    turn; the parts are later rendered joined by a blank line. Returns deep copies."""
    merged: list[dict] = []
    for msg in messages:
        msg = copy.deepcopy(msg)
        role = msg.get("role")
        prev = merged[-1] if merged else None
        joinable = prev is not None and prev.get("role") == "user" and "content_blocks" in prev
        if role == "tool":
            block = {"type": "tool_result", "tool_use_id": msg.get("tool_call_id") or "",
                     "content": msg.get("content") or ""}
            if joinable:
                prev["content_blocks"].append(block)
            else:
                merged.append({"role": "user", "content_blocks": [block]})
        elif role == "user":
            block = {"type": "text", "text": _text(msg.get("content"))}
            if joinable and prev.get("task") is None:
                prev["content_blocks"].append(block)
            else:
                user = {"role": "user", "content": msg.get("content"), "content_blocks": [block]}
                user.update({k: msg[k] for k in ("task", "wo_eos", "mask") if k in msg})
                merged.append(user)
        else:
            merged.append(msg)
    return merged


def sort_tool_results(messages: list[dict]) -> list[dict]:
    """Reorder each user turn's tool results to the order of the latest assistant's calls.

    Clients may return parallel results in completion order; the model saw them called in
    order. Matching is by `tool_call_id` == call `id`; unknown ids sort first (stable).
    Works in place on already-copied messages."""
    order: dict[str, int] = {}
    for msg in messages:
        if msg.get("role") == "assistant" and msg.get("tool_calls"):
            order = {}
            for i, tc in enumerate(msg["tool_calls"]):
                tc_id = tc.get("id") or tc.get("function", {}).get("id", "")
                if tc_id:
                    order[tc_id] = i
        elif msg.get("role") == "user" and msg.get("content_blocks"):
            blocks = msg["content_blocks"]
            results = [b for b in blocks if b.get("type") == "tool_result"]
            if len(results) > 1 and order:
                results = iter(sorted(results, key=lambda b: order.get(b.get("tool_use_id", ""), 0)))
                msg["content_blocks"] = [next(results) if b.get("type") == "tool_result" else b
                                         for b in blocks]
    return messages


def last_user_index(messages: list[dict]) -> int:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") in ("user", "developer"):
            return i
    return -1


def drop_thinking_messages(messages: list[dict]) -> list[dict]:
    """What a new user turn forgets: reasoning of earlier assistant turns, and earlier
    developer messages. Tool results count as user turns here (they were merged)."""
    last = last_user_index(messages)
    kept = []
    for i, msg in enumerate(messages):
        role = msg.get("role")
        if role in ("user", "system", "tool", "latest_reminder", "direct_search_results") or i >= last:
            kept.append(msg)
        elif role == "assistant":
            kept.append({k: v for k, v in msg.items() if k != "reasoning_content"})
    return kept


def _render_user(msg: dict) -> str:
    blocks = msg.get("content_blocks")
    if not blocks:
        return T.USER + _text(msg.get("content"))
    parts = []
    for block in blocks:
        kind = block.get("type")
        if kind == "text":
            parts.append(block.get("text") or "")
        elif kind == "tool_result":
            content = block.get("content") or ""
            if isinstance(content, list):
                content = "\n\n".join(b.get("text", "") if b.get("type") == "text"
                                      else f"[Unsupported {b.get('type')}]" for b in content)
            parts.append(f"<tool_result>{content}</tool_result>")
        else:
            parts.append(f"[Unsupported {kind}]")
    return T.USER + "\n\n".join(parts)


def _render_instructions(msg: dict) -> str:
    """System (or developer) text followed by the tool list and response format, if any."""
    text = _text(msg.get("content"))
    if msg.get("tools"):
        text += "\n\n" + render_tools(msg["tools"])
    if msg.get("response_format"):
        text += "\n\n" + T.RESPONSE_FORMAT_TEMPLATE.format(schema=to_json(msg["response_format"]))
    return text


def render_message(index: int, messages: list[dict], thinking_mode: str,
                   drop_thinking: bool = True, reasoning_effort: str | None = None) -> str:
    """The prompt text of `messages[index]`, including the hand-over to the assistant that
    follows it. `messages` must already be merged (no tool role)."""
    msg = messages[index]
    role = msg.get("role")
    thinking = thinking_mode == "thinking"
    last_user = last_user_index(messages)

    out = T.REASONING_EFFORT_MAX if index == 0 and thinking and reasoning_effort == "max" else ""
    if role == "system":
        out += _render_instructions(msg)
    elif role == "developer":
        if not msg.get("content"):
            raise ChatFormatError(f"developer message {index} has no content; give it text or "
                                  "drop it")
        out += T.USER + _render_instructions(msg)
    elif role == "user":
        out += _render_user(msg)
    elif role == "latest_reminder":
        out += T.LATEST_REMINDER + _text(msg.get("content"))
    elif role == "assistant":
        # No <think> here: the user turn before already opened it. Older turns whose
        # reasoning was dropped were opened with </think> instead, so they get nothing.
        prev_task = index > 0 and messages[index - 1].get("task") is not None
        if thinking and not prev_task and (not drop_thinking or index > last_user):
            out += (msg.get("reasoning_content") or "") + T.THINK_END
        out += _text(msg.get("content"))
        if msg.get("tool_calls"):
            out += encode_tool_calls(msg["tool_calls"])
        if not msg.get("wo_eos", False):
            out += T.EOS
    else:
        raise ChatFormatError(f"message {index} has role {role!r}; expected system, developer, "
                              "user, assistant, tool or latest_reminder")

    # Hand-over: only where the assistant (or a latest reminder) comes next, or at the end.
    if index + 1 < len(messages) and messages[index + 1].get("role") not in ("assistant",
                                                                             "latest_reminder"):
        return out
    task = msg.get("task")
    if task is not None:
        if task not in T.TASK_TOKENS:
            raise ChatFormatError(f"message {index} has task {task!r}; expected one of "
                                  f"{sorted(T.TASK_TOKENS)}")
        if task == "action":
            out += T.ASSISTANT + (T.THINK_START if thinking else T.THINK_END) + T.TASK_TOKENS[task]
        else:
            out += T.TASK_TOKENS[task]
    elif role in ("user", "developer"):
        think = thinking and (not drop_thinking or index >= last_user)
        out += T.ASSISTANT + (T.THINK_START if think else T.THINK_END)
    return out


def encode_messages(messages: list[dict], thinking_mode: str, context: list[dict] | None = None,
                    drop_thinking: bool = True, add_default_bos_token: bool = True,
                    reasoning_effort: str | None = None) -> str:
    """The prompt for `messages`, continuing `context` (already-encoded earlier messages whose
    text is not repeated; BOS only comes when there is no context).

    thinking_mode: "chat" (non-think) or "thinking"; reasoning_effort: None or "high"
    (think-high, no extra text) or "max" (think-max: REASONING_EFFORT_MAX goes first).
    Tools go on the system (or developer) message as `tools`, in OpenAI format."""
    if thinking_mode not in THINKING_MODES:
        raise ChatFormatError(f"thinking_mode={thinking_mode!r}; use 'chat' or 'thinking'")
    if reasoning_effort not in REASONING_EFFORTS:
        raise ChatFormatError(f"reasoning_effort={reasoning_effort!r}; use None, 'high' or 'max'")
    context = merge_tool_messages(context or [])
    messages = merge_tool_messages(messages)
    sort_tool_results(context + messages)  # one pass: context calls order the first results
    full = context + messages

    # Agents (tools defined anywhere) keep every turn's reasoning: interleaved thinking.
    drop = drop_thinking and not any(m.get("tools") for m in full)
    if thinking_mode == "thinking" and drop:
        full = drop_thinking_messages(full)
        start = len(drop_thinking_messages(context))
    else:
        start = len(context)

    prompt = T.BOS if add_default_bos_token and not context else ""
    for i in range(start, len(full)):
        prompt += render_message(i, full, thinking_mode, drop, reasoning_effort)
    return prompt
