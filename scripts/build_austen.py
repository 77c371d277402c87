"""Build src/tokensift/bench/data/austen.json.xz from Debian's r-cran-janeaustenr package.

Jane Austen's six novels are public domain. The Debian package stores them as R serialised
character vectors (one element per line) in data/Rdata.rdb: a sequence of objects, each a 4-byte
big-endian length and a zlib stream holding R's XDR serialisation. No R is needed to read them.

    python scripts/build_austen.py            # apt-get download + extract, then convert
    python scripts/build_austen.py --deb F    # use an already downloaded .deb
"""

from __future__ import annotations

import argparse
import json
import lzma
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "tokensift" / "bench" / "data" / "austen.json.xz"
RDB = "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"
TITLES = {
    "EMMA": "Emma",
    "MANSFIELD PARK": "Mansfield Park",
    "NORTHANGER ABBEY": "Northanger Abbey",
    "Persuasion": "Persuasion",
    "PRIDE AND PREJUDICE": "Pride and Prejudice",
    "SENSE AND SENSIBILITY": "Sense and Sensibility",
}


def r_objects(data: bytes) -> list[bytes]:
    objects, offset = [], 0
    while offset < len(data):
        stream = zlib.decompressobj()
        objects.append(stream.decompress(data[offset + 4 :]))
        offset = len(data) - len(stream.unused_data)
    return objects


def r_strings(raw: bytes) -> list[str]:
    """The CHARSXP elements of a serialised STRSXP (XDR format), in order; NA becomes ''."""
    assert raw[:2] == b"X\n", "not an XDR serialisation"
    # header: "X\n", 3 versions, native encoding "UTF-8", then the STRSXP flags and its length
    count = struct.unpack(">i", raw[27:31])[0]
    lines, offset = [], 31
    for _ in range(count):
        _flags, length = struct.unpack(">ii", raw[offset : offset + 8])
        offset += 8
        if length < 0:
            lines.append("")
            continue
        lines.append(raw[offset : offset + length].decode("utf-8"))
        offset += length
    return lines


def reflow(lines: list[str]) -> str:
    """Join wrapped lines into paragraphs separated by blank lines."""
    paragraphs, current = [], []
    for line in lines:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deb", type=Path, help="path to r-cran-janeaustenr_*.deb")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        deb = args.deb
        if deb is None:
            subprocess.run(["apt-get", "download", "r-cran-janeaustenr"], cwd=tmp, check=True)
            deb = next(Path(tmp).glob("r-cran-janeaustenr_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), f"{tmp}/x"], check=True)
        version = subprocess.run(
            ["dpkg-deb", "-f", str(deb), "Version"], check=True, capture_output=True, text=True
        ).stdout.strip()
        data = (Path(tmp) / "x" / RDB).read_bytes()
    books = {}
    for raw in r_objects(data):
        lines = r_strings(raw)
        title = TITLES[lines[0]]
        books[title] = reflow(lines)
    payload = {
        "source": f"Debian r-cran-janeaustenr {version} (Project Gutenberg texts, public domain)",
        "books": dict(sorted(books.items())),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_bytes(
        lzma.compress(json.dumps(payload, ensure_ascii=False).encode(), preset=9 | lzma.PRESET_EXTREME)
    )
    chars = sum(len(b) for b in books.values())
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes): {len(books)} books, {chars} characters")


if __name__ == "__main__":
    main()
