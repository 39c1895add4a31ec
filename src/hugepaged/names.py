"""Names are data: a process chooses its own (/proc/self/comm), so any process could
forge a log line with a newline, rewrite the terminal with an escape sequence, or break
rich's markup with `[/]`. Every face prints names through `printable` (and rich cells as
Text, never as markup)."""


def _escape(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 \
        else f"\\U{code:08x}"


def printable(text: str) -> str:
    """`text` with control and other non-printable characters written as Python-style
    escapes (\\x0a): one line, no terminal codes."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)
