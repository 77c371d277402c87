"""Build the verse-aligned English/Spanish Bible shipped in `tokensift/audit/data/bible_nt.tsv.xz`.

Source: Debian's SWORD modules `sword-text-web` (World English Bible, public domain) and
`sword-text-sparv` (Reina-Valera 1909, public domain), fetched with `apt-get download` and unpacked
with `dpkg-deb -x`; neither SWORD nor diatheke is needed. A zText module is three files per testament:
`.bzs` (block index: offset, compressed size, size; u32 each), `.bzv` (entry index: block u32, offset
u32, size u16) and `.bzz` (zlib blocks). Entries follow the versification in order, with book and
chapter headings as entries of their own carrying OSIS `<div type="book" osisID=..>` and
`<chapter osisID=..>` milestones, which give each verse its reference; the two translations use
different versifications (NRSVA, KJV), so verses are joined on their references, not positions.

    python scripts/build_bible_corpus.py                     # New Testament, shipped (~0.5 MB)
    python scripts/build_bible_corpus.py --testament all --out ~/.cache/tokensift/audit/bible.tsv.xz
"""

from __future__ import annotations

import argparse
import html
import lzma
import re
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "src" / "tokensift" / "audit" / "data" / "bible_nt.tsv.xz"
MODULES = {  # language -> (Debian package, module directory)
    "eng": ("sword-text-web", "engWEB2015eb"),
    "spa": ("sword-text-sparv", "spaRV1909eb"),
}
_BOOK = re.compile(r'<div\b(?=[^>]*\btype="book")(?=[^>]*\bsID=)[^>]*\bosisID="([^".]+)"')  # a book starts
_BOOK_END = re.compile(r'<div\b(?=[^>]*\btype="book")[^>]*\beID=[^>]*>')  # appendices may follow it
_CHAPTER = re.compile(r'<chapter[^>]*osisID="([^".]+)\.(\d+)"')
_DROP = re.compile(r"<note\b.*?</note>|<title\b.*?</title>", re.S)
_BREAK = re.compile(r"</?(?:div|milestone|lb|lg|l|p|chapter|verse)\b[^>]*>")  # block tags: a space
_TAG = re.compile(r"<[^>]+>")  # inline tags (<w>, <transChange>, <q>, ...) wrap text without spacing


def read_ztext(directory: Path, testament: str) -> list[str]:
    """Raw entries of one testament of a zText module, in index order."""
    bzs = (directory / f"{testament}.bzs").read_bytes()
    bzv = (directory / f"{testament}.bzv").read_bytes()
    bzz = (directory / f"{testament}.bzz").read_bytes()
    blocks = [struct.unpack_from("<III", bzs, i) for i in range(0, len(bzs), 12)]
    cache: dict[int, bytes] = {}
    entries = []
    for i in range(0, len(bzv), 10):
        block, offset, size = struct.unpack_from("<IIH", bzv, i)
        if size == 0:
            entries.append("")
            continue
        if block not in cache:
            start, compressed, _ = blocks[block]
            cache[block] = zlib.decompress(bzz[start : start + compressed])
        entries.append(cache[block][offset : offset + size].decode("utf-8"))
    return entries


def verses(entries: list[str]) -> dict[str, str]:
    """Reference ("Matt.1.1") -> plain verse text, from the book and chapter milestones."""
    out: dict[str, str] = {}
    book, chapter, verse = None, 0, 0
    for entry in entries:
        if match := _BOOK.search(entry):
            book, chapter, verse = match.group(1), 0, 0
            continue
        if match := _CHAPTER.search(entry):
            book, chapter, verse = match.group(1), int(match.group(2)), 0
            continue
        if book is None or chapter == 0:
            continue
        verse += 1
        entry = _BOOK_END.split(entry, maxsplit=1)[0]
        text = " ".join(html.unescape(_TAG.sub("", _BREAK.sub(" ", _DROP.sub(" ", entry)))).split())
        if text:
            out[f"{book}.{chapter}.{verse}"] = text
    return out


def extract(workdir: Path) -> Path:
    packages = [package for package, _ in MODULES.values()]
    subprocess.run(["apt-get", "download", *packages], cwd=workdir, check=True, capture_output=True)
    root = workdir / "root"
    for deb in sorted(workdir.glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root / "usr" / "share" / "sword" / "modules" / "texts" / "ztext"


def build(ztext: Path, testaments: list[str], out: Path) -> None:
    texts = {}
    for language, (_, module) in MODULES.items():
        texts[language] = {}
        for testament in testaments:
            texts[language].update(verses(read_ztext(ztext / module, testament)))
    languages = list(MODULES)
    refs = [ref for ref in texts[languages[0]] if all(ref in texts[lang] for lang in languages[1:])]
    lines = [
        "# Verse-aligned Bible: eng = World English Bible (sword-text-web), spa = Reina-Valera 1909 "
        "(sword-text-sparv); both public domain. Built by scripts/build_bible_corpus.py.",
        "\t".join(["ref", *languages]),
        *("\t".join([ref, *(texts[lang][ref] for lang in languages)]) for ref in refs),
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(lzma.compress(("\n".join(lines) + "\n").encode("utf-8"), preset=9 | lzma.PRESET_EXTREME))
    sizes = {lang: sum(len(texts[lang][r]) for r in refs) for lang in languages}
    print(f"{out}: {len(refs)} aligned verses, characters {sizes}, {out.stat().st_size} bytes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--testament", choices=["nt", "ot", "all"], default="nt")
    parser.add_argument("--ztext", type=Path, help="an unpacked .../sword/modules/texts/ztext directory")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    testaments = ["ot", "nt"] if args.testament == "all" else [args.testament]
    if args.ztext:
        build(args.ztext, testaments, args.out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        build(extract(Path(tmp)), testaments, args.out)


if __name__ == "__main__":
    main()
