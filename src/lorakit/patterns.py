"""Regular expressions from configs and adapter files, bounded before they are ever matched.

Python's ``re`` backtracks, with no time limit: a pattern such as ``(a+)+$`` takes time
exponential in the length of the text it fails to match, and ``.*.*.*.*.*.*.*x`` a high power
of it. Target patterns come from adapter files (``adapter_config.json``), so a server that loads
adapters it did not write would hang on one. Every pattern is therefore checked when a
``LoraConfig`` is built, from code or from a file, by walking its parse tree:

* no repeated part (``+``, ``*``, ``{2,}``, ``{0,9}``: any quantifier that allows more than one)
  inside another repeated part, no optional part inside one, and no alternation inside one:
  these are where the exponential cases live (``(a+)+``, ``(a?){30}``, ``(a|aa)*``);
* a bounded product of the choices the remaining parts leave: an unbounded part (``.*``,
  ``\\d+``) counts as :data:`PATH_LENGTH` choices (about the length of a module path), a part
  repeated at most h times as h + 1, an optional part (``?``) as 2, and their product must stay
  within :data:`MAX_CHOICES` (four unbounded parts, or ``a?`` written 24 times, are the limit);
* at most :data:`MAX_LENGTH` characters.

Within these limits a match against a module path costs at most a few milliseconds. The
patterns PEFT users write (``.*\\.(q_proj|v_proj)$``, ``model\\.layers\\.\\d+\\.self_attn\\.
(q|k|v|o)_proj``, ``.*decoder.*(SelfAttention|EncDecAttention).*(q|k|v|o)$``) are far inside
them; an alternation of single characters (``(q|k|v)``) is a character class and is fine anywhere.
"""

from __future__ import annotations

import math
import re

try:  # Python 3.11+
    from re import _parser as sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse

MAX_LENGTH = 1000
PATH_LENGTH = 64
MAX_CHOICES = PATH_LENGTH**4

_C = sre_parse  # the opcodes live in the parser's namespace in every supported version
_REPEATS = {_C.MAX_REPEAT, _C.MIN_REPEAT, getattr(_C, "POSSESSIVE_REPEAT", _C.MAX_REPEAT)}
_ADVICE = "; write a simpler pattern or list the module names instead"


def pattern_problem(pattern: str) -> str | None:
    """Why matching ``pattern`` could take unbounded time, or None when it is safe.

    ``pattern`` must already compile (``re.compile`` raised nothing).
    """
    if len(pattern) > MAX_LENGTH:
        return f"is {len(pattern):,} characters long (at most {MAX_LENGTH:,}){_ADVICE}"
    try:
        parsed = sre_parse.parse(pattern)
    except (re.error, RecursionError, OverflowError) as exc:  # pragma: no cover - compiled
        return f"cannot be parsed: {exc}"
    choices: list[int] = []
    try:
        problem = _walk(parsed, None, choices)
    except RecursionError:
        problem = "is nested too deeply"
    if problem:
        return problem + _ADVICE
    total = math.prod(choices)
    if total > MAX_CHOICES:
        return (
            f"has {len(choices)} repeated or optional parts; together they could make one match "
            f"try about {total:.1e} ways (at most {MAX_CHOICES:.1e}, four parts like .* or "
            f"\\d+){_ADVICE}"
        )
    return None


def _walk(items, repeat: str | None, choices: list[int]) -> str | None:
    """The first unsafe construct under ``items``; ``repeat`` is the quantifier of the repeated
    part they are inside (None at the top). Each quantified part found appends to ``choices``
    the number of ways it can match (see the module docstring)."""
    for op, arg in items:
        if op in _REPEATS:
            low, high, body = arg
            if repeat is not None:
                return (
                    f"repeats a part ({_quantifier(low, high)}) inside a part repeated by "
                    f"{repeat}: nested repetition, like (a+)+, backtracks exponentially"
                )
            if high == _C.MAXREPEAT:
                choices.append(PATH_LENGTH)
            else:
                choices.append(min(high, PATH_LENGTH) + 1)
            problem = _walk(body, _quantifier(low, high) if high > 1 else None, choices)
        elif op is _C.BRANCH:
            if repeat is not None:
                return (
                    f"has an alternation inside a part repeated by {repeat}: overlapping "
                    "alternatives, like (a|aa)+, backtrack exponentially"
                )
            problem = _first(_walk(branch, repeat, choices) for branch in arg[1])
        elif op is _C.GROUPREF_EXISTS:
            if repeat is not None:
                return f"has a conditional group inside a part repeated by {repeat}"
            _, yes, no = arg
            problem = _first(_walk(b, repeat, choices) for b in (yes, no) if b is not None)
        elif op is _C.SUBPATTERN:
            problem = _walk(arg[-1], repeat, choices)
        elif op in (_C.ASSERT, _C.ASSERT_NOT):
            problem = _walk(arg[1], repeat, choices)
        elif op is getattr(_C, "ATOMIC_GROUP", None):
            problem = _walk(arg, repeat, choices)
        else:  # literals, classes, anchors, back-references: one step each
            problem = None
        if problem:
            return problem
    return None


def _first(problems) -> str | None:
    return next((p for p in problems if p), None)


def _quantifier(low: int, high: int) -> str:
    if high == _C.MAXREPEAT:
        return {0: "*", 1: "+"}.get(low, f"{{{low},}}")
    if (low, high) == (0, 1):
        return "?"
    return f"{{{low}}}" if low == high else f"{{{low},{high}}}"
