"""A code workload scored by running generated tests: change one function of a small Python file,
print the whole file again, and pass the tests.

`change_function` is a generation-loop workload like `edit_code` (the file comes first, the
instruction last, most output lines are copied from the prompt), but its score is behaviour, not
text: each sample carries test calls generated with it (seeded names, constants and inputs; the
expected values come from a native Python implementation of each function, not from its source
text), and `run_tests` executes the code of a prediction against them in a separate Python process
(see `run_tests` for the sandbox). A lossy generation loop that writes different but correct code
keeps its score; one that breaks the edit or a copied function loses it.

Per function: two calls check the unchanged behaviour (every function of the file but the edited
one), four check the requested change (the edited one), at least two of them on inputs where the
old and new behaviour differ, so the unedited file fails.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokensift.bench.corpora import wonderwords
from tokensift.bench.tasks.base import Sample
from tokensift.bench.tasks.loop_workloads import _identifier, _Workload, exact_match

Case = list[str]  # [call expression, repr of the expected value]


@dataclass(frozen=True)
class Function:
    """One generated function: its source before and after the requested change, the change in
    words, and test calls for the old behaviour (`keep`) and the new one (`change`)."""

    name: str
    before: tuple[str, ...]
    after: tuple[str, ...]
    request: str
    keep: tuple[tuple[str, str], ...]
    change: tuple[tuple[str, str], ...]


def _call(name: str, args: Sequence[Any]) -> str:
    return f"{name}({', '.join(map(repr, args))})"


def _function(
    name: str,
    before: list[str],
    after: list[str],
    request: str,
    old: Callable[..., Any],
    new: Callable[..., Any],
    draw: Callable[[], tuple[Any, ...]],
) -> Function:
    """The function with two tests of `old` on the first two drawn inputs, and four of `new`: three
    drawn inputs where the two behaviours differ and one where they agree (a fourth differing one
    if none agrees within the draws)."""
    keep = [draw(), draw()]
    differ: list[tuple[Any, ...]] = []
    same: list[tuple[Any, ...]] = []
    for _ in range(200):
        if len(differ) >= 3 and same:
            break
        args = draw()
        (differ if old(*args) != new(*args) else same).append(args)
    if len(differ) < 3:
        raise AssertionError(f"{name}: {request!r} shows on {len(differ)} of 200 drawn inputs")
    chosen = differ[:3] + (same[:1] or differ[3:4])
    return Function(
        name=name,
        before=tuple(before),
        after=tuple(after),
        request=request,
        keep=tuple((_call(name, a), repr(old(*a))) for a in keep),
        change=tuple((_call(name, a), repr(new(*a))) for a in chosen),
    )


def _ints(rng: random.Random, low: int, high: int, n: int) -> list[int]:
    return [rng.randint(low, high) for _ in range(n)]


def _filter(rng: random.Random, name: str, noun: str) -> Function:
    k = rng.randint(10, 60)
    before = [
        f"def {name}(values, limit={k}):",
        f'    """Filter the {noun} values by the limit."""',
        "    return [v for v in values if v > limit]",
    ]

    def old(values: list[int], limit: int = k) -> list[int]:
        return [v for v in values if v > limit]

    if rng.random() < 0.5:
        after = [*before[:2], "    return [v for v in values if v >= limit]"]
        request = f"Change `{name}` so that values equal to the limit are kept too."

        def new(values: list[int], limit: int = k) -> list[int]:
            return [v for v in values if v >= limit]

        def draw() -> tuple[Any, ...]:
            limit = k if rng.random() < 0.5 else rng.randint(10, 60)
            values = [*_ints(rng, limit - 9, limit + 9, 3), limit if rng.random() < 0.7 else limit + 1]
            rng.shuffle(values)
            return (values,) if limit == k else (values, limit)

    else:
        m = k + rng.choice((-1, 1)) * rng.randint(3, 8)
        after = [f"def {name}(values, limit={m}):", *before[1:]]
        request = f"Change the default limit of `{name}` to {m}."

        def new(values: list[int], limit: int = m) -> list[int]:
            return [v for v in values if v > limit]

        def draw() -> tuple[Any, ...]:
            return (_ints(rng, min(k, m) - 5, max(k, m) + 5, 5),)

    return _function(name, before, after, request, old, new, draw)


def _total(rng: random.Random, name: str, noun: str) -> Function:
    before = [
        f"def {name}(values):",
        f'    """Add up the {noun} values."""',
        "    total = 0",
        "    for value in values:",
        "        if value < 0:",
        "            continue",
        "        total += value",
        "    return total",
    ]

    def old(values: list[int]) -> int:
        return sum(v for v in values if v >= 0)

    if rng.random() < 0.5:
        m = rng.randint(20, 80)
        after = [*before[:4], f"        if value < 0 or value > {m}:", *before[5:]]
        request = f"Change `{name}` so that it also skips values greater than {m}."

        def new(values: list[int]) -> int:
            return sum(v for v in values if 0 <= v <= m)

    else:
        m = rng.randint(2, 9)
        after = [*before[:-1], f"    return total * {m}"]
        request = f"Change `{name}` so that it returns the total multiplied by {m}."

        def new(values: list[int]) -> int:
            return sum(v for v in values if v >= 0) * m

    def draw() -> tuple[Any, ...]:
        return (_ints(rng, -30, 100, rng.randint(1, 6)),)

    return _function(name, before, after, request, old, new, draw)


def _count_words(rng: random.Random, name: str, noun: str) -> Function:
    k = rng.randint(4, 7)
    before = [
        f"def {name}(text, min_length={k}):",
        f'    """Count the {noun} words of at least min_length characters."""',
        "    count = 0",
        "    for word in text.split():",
        "        if len(word) >= min_length:",
        "            count += 1",
        "    return count",
    ]
    pool = [w for w in wonderwords("noun") if w.isalpha()]

    def old(text: str) -> Any:
        return sum(len(w) >= k for w in text.split())

    if rng.random() < 0.5:
        after = [*before[:4], "        if len(word) >= min_length and not word[0].isupper():", *before[5:]]
        request = f"Change `{name}` so that it ignores words that start with an uppercase letter."

        def new(text: str) -> Any:
            return sum(len(w) >= k and not w[0].isupper() for w in text.split())

    else:
        after = [
            *before[:2],
            "    words = []",
            before[3],
            before[4],
            "            words.append(word)",
            "    return words",
        ]
        request = (
            f"Change `{name}` so that it returns the list of those words, in order, instead of their count."
        )

        def new(text: str) -> Any:
            return [w for w in text.split() if len(w) >= k]

    def draw() -> tuple[Any, ...]:
        words = [rng.choice(pool) for _ in range(rng.randint(3, 6))]
        return (" ".join(w.capitalize() if rng.random() < 0.4 else w for w in words),)

    return _function(name, before, after, request, old, new, draw)


def _lookup(rng: random.Random, name: str, noun: str) -> Function:
    k = rng.randint(2, 99)
    before = [
        f"def {name}(mapping, key, default={k}):",
        f'    """Look up the {noun} key, falling back to the default."""',
        "    if key in mapping:",
        "        return mapping[key]",
        "    return default",
    ]
    keys = sorted({w.lower() for w in rng.sample([w for w in wonderwords("noun") if w.isalpha()], 3)})

    def old(mapping: dict[str, Any], key: str) -> Any:
        return mapping.get(key, k)

    if rng.random() < 0.5:
        after = [*before[:2], "    if key in mapping and mapping[key] is not None:", *before[3:]]
        request = f"Change `{name}` so that a key whose stored value is None also gives the default."

        def new(mapping: dict[str, Any], key: str) -> Any:
            return mapping[key] if mapping.get(key) is not None else k

        def draw() -> tuple[Any, ...]:
            mapping = {key: None if rng.random() < 0.4 else rng.randint(0, 50) for key in keys}
            return mapping, rng.choice([*keys, "missing"])

    else:
        after = [*before[:2], "    key = key.lower()", *before[2:]]
        request = (
            f"Change `{name}` so that it ignores the case of the key (the mapping's keys are lowercase)."
        )

        def new(mapping: dict[str, Any], key: str) -> Any:
            return mapping.get(key.lower(), k)

        def draw() -> tuple[Any, ...]:
            key = rng.choice([*keys, "missing"])
            return {key: rng.randint(0, 50) for key in keys}, key.capitalize() if rng.random() < 0.6 else key

    return _function(name, before, after, request, old, new, draw)


def _clamp(rng: random.Random, name: str, noun: str) -> Function:
    low = rng.randint(0, 30)
    high = low + rng.randint(10, 40)
    before = [
        f"def {name}(value, low={low}, high={high}):",
        f'    """Keep the {noun} value between low and high."""',
        "    if value < low:",
        "        return low",
        "    if value > high:",
        "        return high",
        "    return value",
    ]

    def old(value: int) -> int:
        return min(max(value, low), high)

    if rng.random() < 0.5:
        after = [*before[:3], "        return None", before[4], "        return None", before[6]]
        request = (
            f"Change `{name}` so that a value outside the range gives None instead of the nearest bound."
        )

        def new(value: int) -> int | None:
            return value if low <= value <= high else None

        top = high

    else:
        top = high + rng.randint(5, 15)
        after = [f"def {name}(value, low={low}, high={top}):", *before[1:]]
        request = f"Change the default high bound of `{name}` to {top}."

        def new(value: int) -> int | None:
            return min(max(value, low), top)

    def draw() -> tuple[Any, ...]:
        return (rng.randint(low - 15, top + 15),)

    return _function(name, before, after, request, old, new, draw)


def _average(rng: random.Random, name: str, noun: str) -> Function:
    before = [
        f"def {name}(values):",
        f'    """Average of the {noun} values."""',
        "    if not values:",
        "        return 0",
        "    return round(sum(values) / len(values), 2)",
    ]

    def old(values: list[int]) -> float | None:
        return round(sum(values) / len(values), 2) if values else 0

    if rng.random() < 0.5:
        after = [before[0], before[1], "    values = [v for v in values if v != 0]", *before[2:]]
        request = f"Change `{name}` so that zeros are left out of the average (0 when nothing is left)."

        def new(values: list[int]) -> float | None:
            kept = [v for v in values if v != 0]
            return round(sum(kept) / len(kept), 2) if kept else 0

    else:
        after = [*before[:3], "        return None", before[4]]
        request = f"Change `{name}` so that it returns None when there are no values."

        def new(values: list[int]) -> float | None:
            return round(sum(values) / len(values), 2) if values else None

    def draw() -> tuple[Any, ...]:
        if rng.random() < 0.25:
            return ([],)
        values = _ints(rng, 1, 40, rng.randint(2, 5))
        values[rng.randrange(len(values))] = 0
        return (values,)

    return _function(name, before, after, request, old, new, draw)


def _scale(rng: random.Random, name: str, noun: str) -> Function:
    k = rng.randint(2, 9)
    before = [
        f"def {name}(values, factor={k}):",
        f'    """Scale every {noun} value by the factor."""',
        "    return [round(v * factor, 2) for v in values]",
    ]

    def old(values: list[int]) -> list[int]:
        return [v * k for v in values]

    if rng.random() < 0.5:
        after = [*before[:2], "    return [round(v * factor, 2) for v in values if v >= 0]"]
        request = f"Change `{name}` so that negative values are dropped instead of scaled."

        def new(values: list[int]) -> list[int]:
            return [v * k for v in values if v >= 0]

    else:
        m = rng.randint(1, 20)
        after = [*before[:2], f"    return [round(v * factor + {m}, 2) for v in values]"]
        request = f"Change `{name}` so that it adds {m} to every value after scaling it."

        def new(values: list[int]) -> list[int]:
            return [v * k + m for v in values]

    def draw() -> tuple[Any, ...]:
        return (_ints(rng, -20, 30, rng.randint(0, 4)),)

    return _function(name, before, after, request, old, new, draw)


TEMPLATES: tuple[Callable[[random.Random, str, str], Function], ...] = (
    _filter,
    _total,
    _count_words,
    _lookup,
    _clamp,
    _average,
    _scale,
)


# ---------------------------------------------------------------------------------------------
# Running a prediction's code against its tests

_FENCE = re.compile(r"```[^\n]*\n(.*?)(?:```|\Z)", re.S)


def extract_code(prediction: str) -> str:
    """The code of a prediction: of its Markdown code blocks (an unclosed block runs to the end, as
    in an output cut off by its token budget), the one with the most function definitions, then the
    longest (a usage example printed after the file is not the file); the whole text if it has none."""
    blocks = _FENCE.findall(prediction)
    return max(blocks, key=lambda b: (b.count("def "), len(b))) if blocks else prediction


@dataclass(frozen=True)
class TestRun:
    """The outcome of one program against its tests: how many passed, one line per failure."""

    passed: int
    total: int
    failures: tuple[str, ...] = ()
    seconds: float = 0.0
    timed_out: bool = False

    @property
    def share(self) -> float:
        return self.passed / self.total if self.total else 0.0

    @property
    def ok(self) -> bool:
        return self.total > 0 and self.passed == self.total

    def as_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "total": self.total,
            "ok": self.ok,
            "failures": list(self.failures),
            "seconds": self.seconds,
            "timed_out": self.timed_out,
        }


# Runs in the child (python -I -S): no site packages, no environment, resource limits set before the
# program loads, sockets disabled, every call under its own interval timer; results go to stdout as
# lines tagged with a per-run nonce, the program's own prints go to /dev/null.
_HARNESS = r"""
import ast, json, os, resource, signal, socket, sys

NONCE, PER_CALL, CPU, MEMORY, FILES = sys.argv[1], float(sys.argv[2]), *map(int, sys.argv[3:6])
for limit, value in [
    (resource.RLIMIT_CPU, CPU),
    (resource.RLIMIT_AS, MEMORY),
    (resource.RLIMIT_FSIZE, FILES),
    (resource.RLIMIT_NPROC, 0),  # no new processes (not enforced for root)
    (resource.RLIMIT_CORE, 0),
]:
    resource.setrlimit(limit, (value, value))
out = os.fdopen(os.dup(1), "w")
sys.stdout = sys.stderr = open(os.devnull, "w")


def report(**fields):
    out.write(NONCE + json.dumps(fields) + "\n")
    out.flush()


def refuse(*args, **kwargs):
    raise OSError("network access is disabled in the test sandbox")


socket.socket = socket.create_connection = socket.socketpair = refuse


class CallTimeout(BaseException):
    pass


def alarm(signum, frame):
    raise CallTimeout(f"no result within {PER_CALL:g} s")


def one_line(error):
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}"[:160]


signal.signal(signal.SIGALRM, alarm)
with open("cases.json") as f:
    cases = json.load(f)
namespace = {"__name__": "solution", "__builtins__": __builtins__}
try:
    signal.setitimer(signal.ITIMER_REAL, PER_CALL)
    with open("solution.py") as f:
        exec(compile(f.read(), "solution.py", "exec"), namespace)
    signal.setitimer(signal.ITIMER_REAL, 0)
except BaseException as error:
    signal.setitimer(signal.ITIMER_REAL, 0)
    report(load=one_line(error))
    sys.exit(0)
for i, (call, expected) in enumerate(cases):
    try:
        signal.setitimer(signal.ITIMER_REAL, PER_CALL)
        got = eval(call, namespace)
        signal.setitimer(signal.ITIMER_REAL, 0)
        ok = got == ast.literal_eval(expected)
        report(i=i, ok=bool(ok), error=None if ok else f"returned {repr(got)[:80]}, expected {expected}")
    except BaseException as error:
        signal.setitimer(signal.ITIMER_REAL, 0)
        report(i=i, ok=False, error=one_line(error))
"""

_MEMORY_BYTES = 1 << 30  # address space of the child
_FILE_BYTES = 1 << 20  # largest file it may write (its stdout included)


def run_tests(
    code: str, cases: Sequence[Sequence[str]], timeout: float = 10.0, per_call: float = 2.0
) -> TestRun:
    """Run `code` and then each case's call in a fresh `python -I -S` process, in an empty temporary
    directory, and count the calls whose result equals the expected value (a Python literal).

    The sandbox is for model output, not for hostile code: an empty environment, sockets replaced by
    a function that raises, limits on CPU time, address space (1 GiB), file size (1 MiB) and
    processes, each call (and the module's own top level) stopped after `per_call` seconds, and the
    whole process group killed after `timeout` seconds. A program that fails to load, raises, loops
    or is killed scores its passed calls so far (0 if it never loaded); every failure is one line.
    """
    cases = [list(c) for c in cases]
    nonce = secrets.token_hex(8)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tokensift-tests-") as tmp:
        root = Path(tmp)
        (root / "solution.py").write_text(code)
        (root / "cases.json").write_text(json.dumps(cases))
        (root / "harness.py").write_text(_HARNESS)
        stdout = root / "results.txt"
        timed_out = False
        with stdout.open("w") as out:
            limits = [str(int(timeout) + 1), str(_MEMORY_BYTES), str(_FILE_BYTES)]
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "harness.py", nonce, str(per_call), *limits],
                cwd=root,
                env={"LANG": "C.UTF-8"},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        with stdout.open(errors="replace") as f:
            text = f.read(_FILE_BYTES)
    results: dict[int, dict[str, Any]] = {}
    failures: list[str] = []
    for line in text.splitlines():
        if not line.startswith(nonce):
            continue
        try:
            entry = json.loads(line[len(nonce) :])
        except json.JSONDecodeError:
            continue
        if "load" in entry:
            failures.append(f"the code does not run: {entry['load']}")
        elif isinstance(entry.get("i"), int):
            results[entry["i"]] = entry
    missing = [call for i, (call, _) in enumerate(cases) if i not in results]
    for i, (call, _) in enumerate(cases):
        if i in results and not results[i]["ok"]:
            failures.append(f"{call}: {results[i]['error']}")
    if missing and not any(f.startswith("the code does not run") for f in failures):
        why = f"killed after {timeout:g} s" if timed_out else f"no result (exit code {proc.returncode})"
        more = f" and {len(missing) - 1} later calls" if len(missing) > 1 else ""
        failures.append(f"{missing[0]}{more}: {why}")
    passed = sum(1 for e in results.values() if e["ok"])
    return TestRun(passed, len(cases), tuple(failures), time.perf_counter() - start, timed_out)


# ---------------------------------------------------------------------------------------------
# The workload


class ChangeFunction(_Workload):
    """Change one function's behaviour in a small Python file, print the whole file, pass its tests."""

    name = "change_function"
    description = (
        "change one function of a Python file as asked and print the whole file; scored by generated "
        "tests run in a subprocess"
    )
    source = "tokensift workload for generation loops (synthetic, seeded; tests generated with it)"
    max_units = 40
    slack = 32  # a code fence and a short sentence around the file

    def items(self, rng: random.Random, n: int) -> list[Function]:
        taken: set[str] = set()
        nouns = wonderwords("noun")
        return [rng.choice(TEMPLATES)(rng, _identifier(rng, taken), rng.choice(nouns)) for _ in range(n)]

    def setting(self, rng: random.Random, items: list[Function]) -> dict[str, Any]:
        return {"target": rng.random()}

    @staticmethod
    def _target(items: list[Function], setting: dict[str, Any]) -> int:
        return int(setting["target"] * len(items))

    @staticmethod
    def _source(functions: list[tuple[str, ...]]) -> list[str]:
        lines: list[str] = []
        for f in functions:
            lines += ["", "", *f] if lines else list(f)
        return lines

    def context(self, items: list[Function], setting: dict[str, Any]) -> str:
        code = "\n".join(self._source([f.before for f in items]))
        return f"File `tools.py`:\n```python\n{code}\n```"

    def question(self, items: list[Function], setting: dict[str, Any]) -> str:
        return (
            f"{items[self._target(items, setting)].request} Print the whole updated file `tools.py` "
            "and nothing else."
        )

    def expected(self, items: list[Function], setting: dict[str, Any]) -> list[str]:
        t = self._target(items, setting)
        return self._source([f.after if i == t else f.before for i, f in enumerate(items)])

    def answer(self, items: list[Function], setting: dict[str, Any]) -> dict[str, Any]:
        """The reference file's lines, and the test calls: the edited function's change tests,
        every other function's tests of its unchanged behaviour."""
        t = self._target(items, setting)
        cases = [list(c) for i, f in enumerate(items) for c in (f.change if i == t else f.keep)]
        return {
            "code": self.expected(items, setting),
            "tests": cases,
            "target": items[t].name,
            "change_tests": len(items[t].change),
        }

    def check(self, sample: Sample, prediction: str) -> TestRun:
        """The prediction's code run against the sample's tests."""
        return run_tests(extract_code(prediction), sample.answer["tests"])

    def score(self, sample: Sample, prediction: str) -> float:
        """Share of the sample's tests the prediction's code passes."""
        return self.check(sample, prediction).share

    def exact(self, sample: Sample, prediction: str) -> bool:
        """Whether the prediction's code is the reference file exactly, blank lines and whitespace
        inside lines aside (a correct edit may differ)."""
        return exact_match(sample.answer["code"], extract_code(prediction))


CODE_WORKLOADS: dict[str, type[_Workload]] = {ChangeFunction.name: ChangeFunction}
