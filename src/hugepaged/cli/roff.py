"""roff for the manual pages: escaping and one tagged paragraph (man(7)'s .TP)."""


def esc(text: str) -> str:
    return text.replace("\\", "\\\\").replace("-", "\\-")


def tp(term: str, body: str) -> str:
    return f".TP\n\\fB{esc(term)}\\fR\n{esc(body)}\n"
