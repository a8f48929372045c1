"""DeepSeek-V4 chat format: prompt encoding and completion parsing (docs/chat_format.md).

Drop-in for DeepSeek's reference `encoding_dsv4.py`: same function names and arguments."""

from dsv4.chat.encoding import ChatFormatError, encode_messages, render_tools
from dsv4.chat.parser import ParseEvent, StreamingParser, parse_message_from_completion_text
from dsv4.chat.tokens import BOS, EOS, SPECIAL_TOKENS

__all__ = ["encode_messages", "parse_message_from_completion_text", "StreamingParser",
           "ParseEvent", "ChatFormatError", "render_tools", "BOS", "EOS", "SPECIAL_TOKENS"]
