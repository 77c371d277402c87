"""Writing systems: the dominant Unicode script of a text, as an ISO 15924 code.

Python's `unicodedata` has no script property, but every letter's Unicode name starts with its
script ("LATIN SMALL LETTER A", "CJK UNIFIED IDEOGRAPH-4E00"), which is enough to group languages
by script the way token-premium studies do (Arnett et al., arXiv 2510.21909, report premiums by
script because byte-level tokenizers pay per UTF-8 byte, and bytes per character depend on it).
"""

from __future__ import annotations

import unicodedata
from collections import Counter

# Unicode name prefix -> ISO 15924 code. Two-word prefixes come first where one word is ambiguous.
_PREFIXES: dict[str, str] = {
    "TAI THAM": "Lana",
    "TAI VIET": "Tavt",
    "TAI LE": "Tale",
    "NEW TAI LUE": "Talu",
    "CANADIAN SYLLABICS": "Cans",
    "OL CHIKI": "Olck",
    "LATIN": "Latn",
    "CYRILLIC": "Cyrl",
    "GREEK": "Grek",
    "ARMENIAN": "Armn",
    "GEORGIAN": "Geor",
    "HEBREW": "Hebr",
    "ARABIC": "Arab",
    "SYRIAC": "Syrc",
    "THAANA": "Thaa",
    "NKO": "Nkoo",
    "DEVANAGARI": "Deva",
    "BENGALI": "Beng",
    "GURMUKHI": "Guru",
    "GUJARATI": "Gujr",
    "ORIYA": "Orya",
    "TAMIL": "Taml",
    "TELUGU": "Telu",
    "KANNADA": "Knda",
    "MALAYALAM": "Mlym",
    "SINHALA": "Sinh",
    "THAI": "Thai",
    "LAO": "Laoo",
    "TIBETAN": "Tibt",
    "MYANMAR": "Mymr",
    "KHMER": "Khmr",
    "ETHIOPIC": "Ethi",
    "CHEROKEE": "Cher",
    "MONGOLIAN": "Mong",
    "HANGUL": "Hang",
    "HIRAGANA": "Hira",
    "KATAKANA": "Kana",
    "CJK": "Hani",
    "YI": "Yiii",
    "VAI": "Vaii",
    "TIFINAGH": "Tfng",
    "ADLAM": "Adlm",
    "JAVANESE": "Java",
    "BALINESE": "Bali",
    "CHAKMA": "Cakm",
    "GRANTHA": "Gran",
    "BAMUM": "Bamu",
}

SCRIPT_NAMES: dict[str, str] = {
    "Latn": "Latin",
    "Cyrl": "Cyrillic",
    "Grek": "Greek",
    "Armn": "Armenian",
    "Geor": "Georgian",
    "Hebr": "Hebrew",
    "Arab": "Arabic",
    "Syrc": "Syriac",
    "Thaa": "Thaana",
    "Nkoo": "N'Ko",
    "Deva": "Devanagari",
    "Beng": "Bengali",
    "Guru": "Gurmukhi",
    "Gujr": "Gujarati",
    "Orya": "Oriya",
    "Taml": "Tamil",
    "Telu": "Telugu",
    "Knda": "Kannada",
    "Mlym": "Malayalam",
    "Sinh": "Sinhala",
    "Thai": "Thai",
    "Laoo": "Lao",
    "Tibt": "Tibetan",
    "Mymr": "Myanmar",
    "Khmr": "Khmer",
    "Ethi": "Ethiopic",
    "Cher": "Cherokee",
    "Cans": "Canadian Syllabics",
    "Mong": "Mongolian",
    "Hang": "Hangul",
    "Jpan": "Japanese",
    "Hani": "Han",
    "Yiii": "Yi",
    "Vaii": "Vai",
    "Tfng": "Tifinagh",
    "Adlm": "Adlam",
    "Java": "Javanese",
    "Bali": "Balinese",
    "Cakm": "Chakma",
    "Gran": "Grantha",
    "Lana": "Tai Tham",
    "Tavt": "Tai Viet",
    "Tale": "Tai Le",
    "Talu": "New Tai Lue",
    "Olck": "Ol Chiki",
    "Bamu": "Bamum",
}

# Scripts written without spaces between words (scriptio continua or spaces only between phrases), so
# whitespace-delimited "words" do not exist and tokens-per-word is not reported for them.
NO_WORD_SPACES: frozenset[str] = frozenset(
    {"Hani", "Jpan", "Thai", "Laoo", "Khmr", "Mymr", "Tibt", "Yiii", "Lana", "Tavt", "Talu", "Java", "Bali"}
)


def char_script(char: str) -> str | None:
    """ISO 15924 code of one letter, or None for non-letters and letters of unlisted scripts."""
    if not char.isalpha():
        return None
    try:
        name = unicodedata.name(char)
    except ValueError:  # unnamed in this Python's Unicode database
        return None
    for prefix, code in _PREFIXES.items():
        if name.startswith(prefix + " ") or name == prefix:
            return code
    return None


def dominant_script(text: str) -> str:
    """The script of most letters in `text`; Han mixed with kana is Japanese ("Jpan"); "Zyyy" if none."""
    counts = Counter(code for code in map(char_script, text) if code)
    if not counts:
        return "Zyyy"
    kana = counts["Hira"] + counts["Kana"]
    if kana and kana + counts["Hani"] >= 0.5 * sum(counts.values()):
        return "Jpan"
    return counts.most_common(1)[0][0]


def script_name(code: str) -> str:
    return SCRIPT_NAMES.get(code, code)
