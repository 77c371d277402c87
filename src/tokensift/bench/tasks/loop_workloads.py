"""Repetitive, agent-like workloads whose outputs re-use their inputs (where drafting pays off), and a
few open-ended chat prompts (where it must not cost).

Each task is a seeded generator plus a scorer, like every bench task: the data (records, code,
answers, prose) comes first, the instruction last (`prompt == context + "\\n\\n" + question`). The
score is the share of the expected output's lines or sentences the prediction reproduces exactly
(whitespace-normalised): a lossless loop method must score exactly what plain decoding scores.
Everything is offline: names from the wonderwords pools, prose from the shipped Austen novels.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from typing import Any

from tokensift.bench.corpora import austen_paragraphs, split_sentences, wonderwords
from tokensift.bench.tasks.base import Sample, Task, TokenCounter, fit_units
from tokensift.errors import TokensiftError

CITIES = ("Lisbon", "Oslo", "Quito", "Nairobi", "Hanoi", "Perth", "Tunis", "Lima", "Riga", "Porto")
STATUSES = ("open", "shipped", "paid", "returned", "pending")

OPEN_ENDED_PROMPTS = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain to a child why the sky is blue.",
    "What are three good habits for staying healthy? Explain each briefly.",
    "Describe your ideal weekend in a small town.",
    "Give some advice to someone starting to learn the piano.",
    "Why do people enjoy travelling? Give a few reasons.",
)


def _norm(text: str) -> str:
    return " ".join(text.split())


def reproduced(expected: Sequence[str], prediction: str) -> float:
    """Share of the expected lines (or sentences) found verbatim in the prediction, whitespace aside."""
    units = [_norm(u) for u in expected if _norm(u)]
    if not units:
        return 0.0
    got = _norm(prediction)
    return sum(u in got for u in units) / len(units)


def exact_match(expected: Sequence[str], prediction: str) -> bool:
    """The prediction is exactly the expected lines: blank lines and Markdown code-fence lines
    dropped, whitespace inside a line normalised, nothing missing, extra or out of order."""
    lines = [_norm(line) for line in prediction.splitlines()]
    return [x for x in lines if x and not x.startswith("```")] == [x for x in map(_norm, expected) if x]


def _name(rng: random.Random) -> str:
    return (
        f"{rng.choice(wonderwords('adjective')).capitalize()} {rng.choice(wonderwords('noun')).capitalize()}"
    )


def _identifier(rng: random.Random, taken: set[str]) -> str:
    while True:
        name = f"{rng.choice(wonderwords('verb'))}_{rng.choice(wonderwords('noun'))}".lower()
        if name.isidentifier() and name not in taken:
            taken.add(name)
            return name


def _distinct(fractions: Sequence[float], n: int) -> list[int]:
    """Indices in [0, n) picked by `fractions` of n, moved on to the next free one while n allows."""
    picked: list[int] = []
    for f in fractions:
        i = int(f * n)
        while i in picked and len(picked) < n:
            i = (i + 1) % n
        picked.append(i)
    return picked


def _output_budget(count_tokens: TokenCounter, expected: str, slack: int = 24) -> int:
    """New tokens enough for the expected output: its token count (template overhead removed) plus slack."""
    return count_tokens(expected, "") - count_tokens("", "") + slack


class _Workload(Task):
    """Common shape: `units` items of data rendered into a prompt fitted to the target length."""

    metric = "accuracy"
    max_units = 400
    slack = 24  # new tokens beyond the expected output

    def build(
        self,
        count_tokens: TokenCounter,
        length: int,
        rng: random.Random,
        depth: float | None,
        index: int,
        seed: int,
    ) -> Sample:
        items = self.items(rng, self.max_units)
        setting = self.setting(rng, items)

        def render(units: int) -> str:
            chosen = items[: max(1, units)]
            return self.context(chosen, setting) + "\n\n" + self.question(chosen, setting)

        units = max(1, fit_units(count_tokens, render, length, len(items)))
        chosen = items[:units]
        context, question = self.context(chosen, setting), self.question(chosen, setting)
        expected = self.expected(chosen, setting)
        return Sample(
            task=self.name,
            length=length,
            index=index,
            seed=seed,
            prompt=context + "\n\n" + question,
            answer=self.answer(chosen, setting),
            max_new_tokens=_output_budget(count_tokens, "\n".join(expected), self.slack),
            context=context,
            question=question,
            meta={"units": units, **{k: v for k, v in setting.items() if isinstance(v, str | int | float)}},
        )

    def score(self, sample: Sample, prediction: str) -> float:
        return reproduced(sample.answer, prediction)

    def exact(self, sample: Sample, prediction: str) -> bool:
        """Whether the prediction is the expected output exactly (see `exact_match`)."""
        return exact_match(sample.answer, prediction)

    # Subclasses: the data, per-sample settings, and how they render.
    def items(self, rng: random.Random, n: int) -> list[Any]:
        raise NotImplementedError

    def setting(self, rng: random.Random, items: list[Any]) -> dict[str, Any]:
        return {}

    def context(self, items: list[Any], setting: dict[str, Any]) -> str:
        raise NotImplementedError

    def question(self, items: list[Any], setting: dict[str, Any]) -> str:
        raise NotImplementedError

    def expected(self, items: list[Any], setting: dict[str, Any]) -> list[str]:
        raise NotImplementedError

    def answer(self, items: list[Any], setting: dict[str, Any]) -> Any:
        """What the sample keeps to score by: the expected lines, unless a workload needs more."""
        return self.expected(items, setting)


FIELDS = ("id", "name", "city", "amount", "date", "status")


class ReformatRecords(_Workload):
    """Rewrite JSON records as CSV rows, or CSV rows as JSON lines: every value is copied."""

    name = "reformat_records"
    description = "reformat JSON records as CSV (or CSV as JSON lines); scored by rows reproduced"
    source = "tokensift workload for generation loops (synthetic, seeded)"
    max_units = 120

    def items(self, rng: random.Random, n: int) -> list[dict[str, Any]]:
        return [
            {
                "id": 1000 + i,
                "name": _name(rng),
                "city": rng.choice(CITIES),
                "amount": f"{rng.uniform(5, 500):.2f}",
                "date": f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
                "status": rng.choice(STATUSES),
            }
            for i in range(n)
        ]

    def setting(self, rng: random.Random, items: list[Any]) -> dict[str, Any]:
        return {"direction": rng.choice(["json_to_csv", "csv_to_json"])}

    @staticmethod
    def _csv(record: dict[str, Any]) -> str:
        return ",".join(str(record[f]) for f in FIELDS)

    @staticmethod
    def _json(record: dict[str, Any]) -> str:
        return json.dumps(record)

    def context(self, items: list[dict[str, Any]], setting: dict[str, Any]) -> str:
        if setting["direction"] == "json_to_csv":
            return "Records (one JSON object per line):\n" + "\n".join(self._json(r) for r in items)
        return "Records (CSV):\n" + ",".join(FIELDS) + "\n" + "\n".join(self._csv(r) for r in items)

    def question(self, items: list[dict[str, Any]], setting: dict[str, Any]) -> str:
        if setting["direction"] == "json_to_csv":
            return (
                f"Convert every record above to CSV with the header {','.join(FIELDS)}, in the same "
                "order. Output only the CSV."
            )
        return (
            "Convert every CSV row above to one JSON object per line with the keys "
            f"{', '.join(FIELDS)}, in the same order. Output only the JSON lines."
        )

    def expected(self, items: list[dict[str, Any]], setting: dict[str, Any]) -> list[str]:
        if setting["direction"] == "json_to_csv":
            return [self._csv(r) for r in items]
        return [self._json(r) for r in items]


FUNCTION_TEMPLATES: tuple[Callable[[str, str, int], list[str]], ...] = (
    lambda name, noun, k: [
        f"def {name}(items, limit={k}):",
        f'    """Return the {noun} entries whose score exceeds the limit."""',
        "    result = []",
        "    for item in items:",
        "        if item.score > limit:",
        "            result.append(item)",
        "    return result",
    ],
    lambda name, noun, k: [
        f"def {name}(values):",
        f'    """Sum the {noun} values, skipping negative ones."""',
        "    total = 0",
        "    for value in values:",
        "        if value < 0:",
        "            continue",
        "        total += value",
        "    return total",
    ],
    lambda name, noun, k: [
        f"def {name}(text, width={k}):",
        f'    """Split the {noun} text into lines of at most width characters."""',
        "    lines, line = [], ''",
        "    for word in text.split():",
        "        if len(line) + len(word) + 1 > width:",
        "            lines.append(line)",
        "            line = ''",
        "        line = (line + ' ' + word).strip()",
        "    return lines + [line]",
    ],
    lambda name, noun, k: [
        f"def {name}(mapping, key, default={k}):",
        f'    """Look up the {noun} key, falling back to the default."""',
        "    if key in mapping:",
        "        return mapping[key]",
        "    return default",
    ],
)


class EditCode(_Workload):
    """Rename one function in a small Python module and print the whole module again."""

    name = "edit_code"
    description = "rename a function in a Python file and print the whole file; scored by lines reproduced"
    source = "tokensift workload for generation loops (synthetic, seeded)"
    max_units = 60

    def items(self, rng: random.Random, n: int) -> list[list[str]]:
        taken: set[str] = set()
        return [
            rng.choice(FUNCTION_TEMPLATES)(
                _identifier(rng, taken), rng.choice(wonderwords("noun")), rng.randint(2, 99)
            )
            for _ in range(n)
        ]

    def setting(self, rng: random.Random, items: list[list[str]]) -> dict[str, Any]:
        return {"target": rng.random(), "new_name": _identifier(rng, {f[0] for f in items})}

    @staticmethod
    def _old(items: list[list[str]], setting: dict[str, Any]) -> str:
        header = items[int(setting["target"] * len(items))][0]
        return header[len("def ") : header.index("(")]

    def context(self, items: list[list[str]], setting: dict[str, Any]) -> str:
        code = "\n\n\n".join("\n".join(f) for f in items)
        return f"File `tools.py`:\n```python\n{code}\n```"

    def question(self, items: list[list[str]], setting: dict[str, Any]) -> str:
        return (
            f"Rename the function `{self._old(items, setting)}` to `{setting['new_name']}`. Print the whole "
            "updated file `tools.py` and nothing else."
        )

    def expected(self, items: list[list[str]], setting: dict[str, Any]) -> list[str]:
        old, new = self._old(items, setting), setting["new_name"]
        return [line.replace(f"def {old}(", f"def {new}(") for f in items for line in f]


class SelfRefine(_Workload):
    """Third round of refining one answer: the previous version plus feedback, rewrite it in full."""

    name = "self_refine"
    description = "rewrite an answer after a round of feedback (multi-turn refinement); scored by sentences"
    source = "tokensift workload for generation loops (synthetic, seeded)"
    max_units = 80

    def items(self, rng: random.Random, n: int) -> list[str]:
        return [
            f"The {rng.choice(wonderwords('adjective'))} {rng.choice(wonderwords('noun'))} is stored in "
            f"{rng.choice(CITIES)} and costs {rng.randint(2, 90)} dollars."
            for _ in range(n)
        ]

    def setting(self, rng: random.Random, items: list[str]) -> dict[str, Any]:
        return {"first": rng.random(), "second": rng.random(), "city": rng.choice(CITIES)}

    @staticmethod
    def _fix(sentence: str, city: str) -> str:
        return (
            sentence[: sentence.index(" is stored in ")]
            + f" is stored in {city}"
            + sentence[sentence.index(" and") :]
        )

    def _versions(self, items: list[str], setting: dict[str, Any]) -> tuple[list[str], list[str], int, int]:
        first = int(setting["first"] * len(items))
        second = int(setting["second"] * len(items))
        v2 = list(items)
        v2[first] = v2[first].replace(" dollars.", " euros.")
        v3 = list(v2)
        v3[second] = self._fix(v3[second], setting["city"])
        return v2, v3, first, second

    def context(self, items: list[str], setting: dict[str, Any]) -> str:
        v2, _, first, _ = self._versions(items, setting)
        return (
            "Task: describe the inventory.\n\n"
            f"Answer, version 1:\n{' '.join(items)}\n\n"
            f"Feedback 1: the price in sentence {first + 1} is in euros, not dollars.\n\n"
            f"Answer, version 2:\n{' '.join(v2)}"
        )

    def question(self, items: list[str], setting: dict[str, Any]) -> str:
        v2, _, _, second = self._versions(items, setting)
        subject = v2[second][: v2[second].index(" is stored")]
        return (
            f"Feedback 2: {subject} is stored in {setting['city']}. Write version 3 of the "
            "answer: apply feedback 2 to version 2 and repeat everything else unchanged. "
            "Output only the answer."
        )

    def expected(self, items: list[str], setting: dict[str, Any]) -> list[str]:
        return self._versions(items, setting)[1]


class SummarizeQuote(_Workload):
    """Summarise numbered passages in one sentence, then quote one of them word for word."""

    name = "summarize_quote"
    description = "summarise numbered Austen paragraphs, then quote one verbatim; scored by quoted sentences"
    source = "tokensift workload for generation loops (Austen novels, public domain; seeded)"
    max_units = 60
    slack = 64  # the summary comes first

    def items(self, rng: random.Random, n: int) -> list[str]:
        pool = [p for p in austen_paragraphs() if 150 <= len(p) <= 700]
        start = rng.randrange(len(pool) - n)
        return pool[start : start + n]

    def setting(self, rng: random.Random, items: list[str]) -> dict[str, Any]:
        return {"pick": rng.random()}

    def context(self, items: list[str], setting: dict[str, Any]) -> str:
        return "Passages:\n\n" + "\n\n".join(f"[{i + 1}] {p}" for i, p in enumerate(items))

    def question(self, items: list[str], setting: dict[str, Any]) -> str:
        return (
            "Summarise the passages above in one sentence. Then quote passage "
            f"[{int(setting['pick'] * len(items)) + 1}] exactly, word for word."
        )

    def expected(self, items: list[str], setting: dict[str, Any]) -> list[str]:
        return split_sentences(items[int(setting["pick"] * len(items))])


class EditRecords(_Workload):
    """Apply a few field edits to JSON or CSV records and print every record again, in the same format."""

    name = "edit_records"
    description = (
        "apply 3 field edits to JSON/CSV records and print them all again; scored by rows reproduced"
    )
    source = "tokensift workload for generation loops (synthetic, seeded)"
    max_units = 120

    def items(self, rng: random.Random, n: int) -> list[dict[str, Any]]:
        return ReformatRecords().items(rng, n)

    def setting(self, rng: random.Random, items: list[Any]) -> dict[str, Any]:
        edits = []
        for _ in range(3):
            field = rng.choice(("city", "amount", "status"))
            value = {
                "city": rng.choice(CITIES),
                "amount": f"{rng.uniform(5, 500):.2f}",
                "status": rng.choice(STATUSES),
            }[field]
            edits.append((rng.random(), field, value))
        return {"format": rng.choice(["json", "csv"]), "edits": edits}

    @staticmethod
    def _edits(items: list[dict[str, Any]], setting: dict[str, Any]) -> list[tuple[int, str, str]]:
        """(record index, field, new value) of each edit."""
        rows = _distinct([f for f, _, _ in setting["edits"]], len(items))
        return [(i, field, value) for i, (_, field, value) in zip(rows, setting["edits"], strict=True)]

    @staticmethod
    def _render(records: list[dict[str, Any]], fmt: str) -> list[str]:
        if fmt == "json":
            return [json.dumps(r) for r in records]
        return [",".join(FIELDS)] + [",".join(str(r[f]) for f in FIELDS) for r in records]

    def context(self, items: list[dict[str, Any]], setting: dict[str, Any]) -> str:
        head = "Records (one JSON object per line):" if setting["format"] == "json" else "Records (CSV):"
        return head + "\n" + "\n".join(self._render(items, setting["format"]))

    def question(self, items: list[dict[str, Any]], setting: dict[str, Any]) -> str:
        edits = "; ".join(
            f"record id {items[i]['id']}: set {field} to {value}"
            for i, field, value in self._edits(items, setting)
        )
        return (
            f"Apply these edits: {edits}. Print every record again, updated, in the same format and "
            "order, and nothing else."
        )

    def expected(self, items: list[dict[str, Any]], setting: dict[str, Any]) -> list[str]:
        records = [dict(r) for r in items]
        for i, field, value in self._edits(items, setting):
            records[i][field] = value
        return self._render(records, setting["format"])


HELPER = "@HELPER"  # where the renamed function's name goes in the templates below

CALLER_TEMPLATES: tuple[Callable[[str, str, int], list[str]], ...] = (
    lambda name, noun, k: [
        f"def {name}(items):",
        f'    """Normalise every {noun} item."""',
        f"    return [{HELPER}(item) for item in items]",
    ],
    lambda name, noun, k: [
        f"def {name}(total, count={k}):",
        f'    """Average {noun} after normalising."""',
        "    if count == 0:",
        f"        return {HELPER}(0)",
        f"    return {HELPER}(total / count)",
    ],
    lambda name, noun, k: [
        f"def {name}(rows):",
        f'    """Normalise the {noun} column of each row."""',
        "    out = []",
        "    for row in rows:",
        f"        row['{noun}'] = {HELPER}(row['{noun}'], scale={k})",
        "        out.append(row)",
        "    return out",
    ],
    lambda name, noun, k: [
        f"def {name}(a, b):",
        f'    """Larger of two normalised {noun} values."""',
        f"    left, right = {HELPER}(a), {HELPER}(b)",
        "    return left if left > right else right",
    ],
)


class RenameIdentifier(_Workload):
    """Refactor: rename a helper function through a whole Python file (definition and every call)."""

    name = "rename_identifier"
    description = (
        "rename a helper through a Python file (definition and calls), print the file; scored by lines"
    )
    source = "tokensift workload for generation loops (synthetic, seeded)"
    max_units = 60

    def items(self, rng: random.Random, n: int) -> list[list[str]]:
        taken: set[str] = set()
        return [
            rng.choice(CALLER_TEMPLATES)(
                _identifier(rng, taken), rng.choice(wonderwords("noun")), rng.randint(2, 99)
            )
            for _ in range(n)
        ]

    def setting(self, rng: random.Random, items: list[list[str]]) -> dict[str, Any]:
        taken = {f[0][len("def ") : f[0].index("(")] for f in items}
        return {"old": _identifier(rng, taken), "new": _identifier(rng, taken)}

    @staticmethod
    def _lines(items: list[list[str]], name: str) -> list[str]:
        helper = [
            f"def {HELPER}(value, scale=2):",
            '    """Scale one value and round it to two decimals."""',
            "    return round(value * scale, 2)",
        ]
        lines = list(helper)
        for f in items:
            lines += ["", "", *f]
        return [line.replace(HELPER, name) for line in lines]

    def context(self, items: list[list[str]], setting: dict[str, Any]) -> str:
        return "File `utils.py`:\n```python\n" + "\n".join(self._lines(items, setting["old"])) + "\n```"

    def question(self, items: list[list[str]], setting: dict[str, Any]) -> str:
        return (
            f"Rename the function `{setting['old']}` to `{setting['new']}` everywhere in the file: its "
            "definition and every call. Print the whole updated file `utils.py` and nothing else."
        )

    def expected(self, items: list[list[str]], setting: dict[str, Any]) -> list[str]:
        return [line for line in self._lines(items, setting["new"]) if line]


class AgentLoop(_Workload):
    """An agent that prints its whole task list again after every tool result (repeating earlier outputs)."""

    name = "agent_loop"
    description = "agent turn: print the task list again with the finished task checked; scored by lines"
    source = "tokensift workload for generation loops (synthetic, seeded)"
    max_units = 60

    def items(self, rng: random.Random, n: int) -> list[str]:
        return [
            f"{rng.choice(wonderwords('verb')).lower()} the {rng.choice(wonderwords('noun'))} "
            f"in {rng.choice(CITIES)} (owner: {_name(rng)})"
            for _ in range(n)
        ]

    def setting(self, rng: random.Random, items: list[str]) -> dict[str, Any]:
        return {"picks": [rng.random() for _ in range(3)]}

    @staticmethod
    def _done(items: list[str], setting: dict[str, Any]) -> list[int]:
        """The tasks finished in turns 1, 2 and 3 (distinct where there are enough tasks)."""
        return _distinct(setting["picks"], len(items))

    @staticmethod
    def _plan(items: list[str], done: list[int]) -> list[str]:
        return [f"- [{'x' if i in done else ' '}] {i + 1}. {task}" for i, task in enumerate(items)]

    def context(self, items: list[str], setting: dict[str, Any]) -> str:
        done = self._done(items, setting)
        turns = [
            "You are an agent working through a task list. After every tool result, print the full "
            "task list again with the finished tasks checked.",
            "Task list:\n" + "\n".join(self._plan(items, [])),
        ]
        for turn in (1, 2):
            turns.append(f"Tool result: task {done[turn - 1] + 1} finished.")
            turns.append("Assistant:\n" + "\n".join(self._plan(items, done[:turn])))
        return "\n\n".join(turns)

    def question(self, items: list[str], setting: dict[str, Any]) -> str:
        return (
            f"Tool result: task {self._done(items, setting)[2] + 1} finished. Print the full task list "
            "again, updated, in the same format, and nothing else."
        )

    def expected(self, items: list[str], setting: dict[str, Any]) -> list[str]:
        return self._plan(items, self._done(items, setting))


WORKLOADS: dict[str, type[_Workload]] = {
    t.name: t
    for t in (
        ReformatRecords,
        EditCode,
        SelfRefine,
        SummarizeQuote,
        EditRecords,
        RenameIdentifier,
        AgentLoop,
    )
}


def get_workload(name: str) -> _Workload:
    if name not in WORKLOADS:
        raise TokensiftError(f"unknown workload {name!r}: known workloads are {', '.join(WORKLOADS)}")
    return WORKLOADS[name]()
