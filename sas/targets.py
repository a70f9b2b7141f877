"""Which module names a ``targets`` entry picks, with a time limit on regexes (they may come from an
untrusted ``adapter_config.json``). A leaf: ``sas.config`` checks regexes with it, ``sas.model`` and
``sas.io`` match names with it."""
from __future__ import annotations

import functools
import json
import subprocess
import sys
from typing import List

# Python's re backtracks, so a pattern such as "(.*.*.*.*)*Z" (e.g. from an untrusted adapter_config.json)
# can run for ever, and compiling can be as slow: each case-insensitive "[\u0100-\U0010ffff]" costs about
# 7-12 ms (10 kB of them took 24 s here), and an 11 MiB pattern of other kinds took 24-31 s. Regex targets
# are therefore compiled and matched in a child interpreter that is killed after this many seconds; module
# names are few and short, so a sane pattern takes milliseconds (the child's start, about 50 ms, dominates)
# and any pattern gives an answer or an error in bounded time.
REGEX_TIME_LIMIT_S = 5.0
_FULLMATCH_SCRIPT = """
import json, re, sys
request = json.load(sys.stdin)
try:
    compiled = re.compile(request["pattern"])
except (re.error, RecursionError, OverflowError, MemoryError) as exc:  # deep nesting overflows the parser
    json.dump({"error": str(exc) or type(exc).__name__}, sys.stdout)
else:
    json.dump({"matches": [compiled.fullmatch(n) is not None for n in request["names"]]}, sys.stdout)
"""
# Patterns shown in errors are cut to this many characters: an untrusted config may hold megabytes.
_SHOWN_PATTERN_CHARS = 200


def _shown(pattern: str) -> str:
    if len(pattern) <= _SHOWN_PATTERN_CHARS:
        return repr(pattern)
    return f"{pattern[:_SHOWN_PATTERN_CHARS]!r}... ({len(pattern):,} characters)"


def regex_fullmatches(pattern: str, names: List[str]) -> List[bool]:
    """``[re.fullmatch(pattern, n) is not None for n in names]``, compiled and matched within
    :data:`REGEX_TIME_LIMIT_S`; an invalid or too slow pattern raises ``ValueError``."""
    request = json.dumps({"pattern": pattern, "names": names})
    try:
        done = subprocess.run([sys.executable, "-I", "-S", "-c", _FULLMATCH_SCRIPT], input=request,
                              capture_output=True, text=True, timeout=REGEX_TIME_LIMIT_S)
    except subprocess.TimeoutExpired:
        work = f"matching {len(names)} module names" if names else "compiling"
        raise ValueError(f"targets regex {_shown(pattern)} did not finish {work} within {REGEX_TIME_LIMIT_S:g} s "
                         f"(catastrophic backtracking or a pattern too large); use a simpler regex or a list "
                         f"of names") from None
    if done.returncode != 0:
        raise RuntimeError(f"matching targets regex {_shown(pattern)} failed in {sys.executable}: "
                           f"{done.stderr.strip()[-2000:]}")
    answer = json.loads(done.stdout)
    if "error" in answer:
        raise ValueError(f"targets is not a valid regex ({answer['error']}): {_shown(pattern)}")
    return answer["matches"]


@functools.lru_cache(maxsize=64)
def check_regex(pattern: str) -> None:
    """Raise ``ValueError`` unless ``pattern`` compiles within :data:`REGEX_TIME_LIMIT_S`.

    Cached for patterns that passed, so building many configs with one pattern starts one child.
    """
    regex_fullmatches(pattern, [])


def matches(name: str, target: str) -> bool:
    """Whether the module ``name`` is ``target`` exactly or ends with ``"." + target`` (a dotted suffix)."""
    return name == target or name.endswith("." + target)
