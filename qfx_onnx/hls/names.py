"""C++ identifiers from user-supplied names (ONNX node and tensor names, the top function name).

An ONNX name is arbitrary text: it may hold ``*/``, quotes, newlines, ``#include``, non-ASCII
characters or C++ keywords. Nothing of it reaches the generated C++ (not even a comment) except
through :meth:`Namer.name`, which keeps only ``[A-Za-z0-9_]``, never produces a reserved
identifier (leading underscore, double underscore, keyword) and never hands out the same
identifier twice.
"""

from __future__ import annotations

import re

MAX_LEN = 48

CPP_KEYWORDS = frozenset("""
alignas alignof and and_eq asm auto bitand bitor bool break case catch char char8_t char16_t
char32_t class compl concept const consteval constexpr constinit const_cast continue co_await
co_return co_yield decltype default delete do double dynamic_cast else enum explicit export extern
false float for friend goto if inline int long mutable namespace new noexcept not not_eq nullptr
operator or or_eq private protected public register reinterpret_cast requires return short signed
sizeof static static_assert static_cast struct switch template this thread_local throw true try
typedef typeid typename union unsigned using virtual void volatile wchar_t while xor xor_eq
main std hls qfx
""".split())

_BAD = re.compile(r"[^A-Za-z0-9_]+")
_UNDERSCORES = re.compile(r"_+")
_TOP_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,62}$")


def sanitize(text: str, fallback: str = "x") -> str:
    """``text`` reduced to a lower-risk C identifier fragment: ASCII letters, digits, single
    underscores, no leading/trailing underscore, at most ``MAX_LEN`` characters. Never empty."""
    s = _UNDERSCORES.sub("_", _BAD.sub("_", str(text))).strip("_")
    s = s[:MAX_LEN].rstrip("_")
    return s or fallback


class Namer:
    """Hands out unique C++ identifiers ``<prefix><sanitized text>`` (``_2``, ``_3`` ... on clashes)."""

    def __init__(self) -> None:
        self._taken: set[str] = set()

    def reserve(self, ident: str) -> None:
        self._taken.add(ident)

    def name(self, text: str, prefix: str = "") -> str:
        base = prefix + sanitize(text)
        if base[0].isdigit():
            base = "n" + base
        if base in CPP_KEYWORDS or base.startswith("ap_") or base.startswith("AP_"):
            base = "q_" + base
        ident, k = base, 2
        while ident in self._taken:
            ident, k = f"{base}_{k}", k + 1
        self._taken.add(ident)
        return ident


def top_name(text: str) -> str:
    """A valid top-function name from ``text`` (a model file stem or a user's ``--top``)."""
    s = sanitize(text, "qfx_top")
    if not s[0].isalpha():
        s = "qfx_" + s
    if s in CPP_KEYWORDS or s.startswith(("ap_", "AP_")):
        s = "qfx_" + s
    assert _TOP_RE.match(s[:63]), s
    return s[:63]
