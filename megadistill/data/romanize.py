"""Romanization (transliteration to Latin) of Indic text with the ``indic_transliteration`` package.

Source: the ``indic_transliteration`` package (``sanscript``, https://github.com/indic-transliteration);
the default target ``iso`` is ISO 15919 ("Transliteration of Devanagari and related Indic scripts
into Latin characters").

Only characters of the source script are transliterated: the text is cut into maximal runs of
source-script code points (the script's Unicode block plus the shared dandas U+0964/U+0965, with
ZWJ/ZWNJ allowed *between* such code points) and each run goes through ``sanscript``; everything
else (Latin, digits, punctuation, spaces, other scripts, joiners at a run's edge) is copied unchanged.
Before a run is transliterated:

* ZWJ/ZWNJ inside it are removed (they only control the native rendering);
* nukta letters that NFC decomposes (composition exclusions such as Bengali য় = U+09AF U+09BC)
  are recomposed where the package's table knows only the precomposed letter;
* Malayalam chillu letters (U+0D7A-U+0D7F, which the package does not map) become
  consonant + virama, their older encoding, romanized identically by ISO 15919 (ൽ -> l).

File naming convention: a romanized corpus sits beside the native one as ``<lang>_<Script>.<scheme>``
(see :func:`romanized_prefix`).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from indic_transliteration import sanscript

# ISO 15924 script code (as in FLORES-200 language codes) -> indic_transliteration source scheme.
SCRIPT_SCHEMES: dict[str, str] = {
    "Deva": "devanagari",
    "Beng": "bengali",
    "Guru": "gurmukhi",
    "Gujr": "gujarati",
    "Orya": "oriya",
    "Taml": "tamil",
    "Telu": "telugu",
    "Knda": "kannada",
    "Mlym": "malayalam",
    "Sinh": "sinhala",
}

# (ISO 639-3 language, script) whose orthography has a dedicated source scheme.
LANGUAGE_SCHEMES: dict[tuple[str, str], str] = {
    ("asm", "Beng"): "assamese",  # ৰ and ৱ; the bengali table leaves ৱ unmapped
}

# Unicode block (first, last code point) of each supported script.
SCRIPT_BLOCKS: dict[str, tuple[int, int]] = {
    "Deva": (0x0900, 0x097F),
    "Beng": (0x0980, 0x09FF),
    "Guru": (0x0A00, 0x0A7F),
    "Gujr": (0x0A80, 0x0AFF),
    "Orya": (0x0B00, 0x0B7F),
    "Taml": (0x0B80, 0x0BFF),
    "Telu": (0x0C00, 0x0C7F),
    "Knda": (0x0C80, 0x0CFF),
    "Mlym": (0x0D00, 0x0D7F),
    "Sinh": (0x0D80, 0x0DFF),
}

# Scripts found in Indic corpora that this module refuses, and why.
UNSUPPORTED_SCRIPTS: dict[str, str] = {
    "Olck": "Ol Chiki: the package's ol_chiki table is keyed on Brahmic syllables (consonant + ᱚ) and leaves "
            "about 48% of the Ol Chiki code points of SIB-200 sat_Olck untransliterated",
    "Arab": "Arabic/Perso-Arabic: the package's urdu table maps Devanagari to Urdu only; about 68% of the "
            "code points of SIB-200 urd_Arab stay untransliterated",
}

# User-facing (lower-case) target scheme names; each is an indic_transliteration roman scheme.
LATIN_SCHEMES: tuple[str, ...] = (
    "iso", "iast", "itrans", "hk", "velthuis", "slp1", "wx", "optitrans",
    "kolkata_v2", "titus", "iast_iso_m", "itrans_lowercase",
    "hk_dravidian", "itrans_dravidian", "optitrans_dravidian",
)

_SCHEME_ALIASES = {"iso15919": "iso", "iso_15919": "iso", "iso-15919": "iso", "harvard_kyoto": "hk", "harvard-kyoto": "hk"}

# (script, scheme) pairs verified to round trip exactly (native -> scheme -> native, after NFC) on every
# SIB-200 train/dev/test sentence of the script's languages that has no ASCII letter or digit and no
# ZWJ/ZWNJ (those are left as is on the way out and cannot be told apart on the way back).
LOSSLESS_PAIRS: frozenset[tuple[str, str]] = frozenset()

_DANDAS = "\u0964\u0965"
_JOINERS = "\u200c\u200d"
_MALAYALAM_CHILLUS = {"\u0d7a": "\u0d23\u0d4d", "\u0d7b": "\u0d28\u0d4d", "\u0d7c": "\u0d30\u0d4d",
                      "\u0d7d": "\u0d32\u0d4d", "\u0d7e": "\u0d33\u0d4d", "\u0d7f": "\u0d15\u0d4d",
                      "\u0d54": "\u0d2e\u0d4d", "\u0d55": "\u0d2f\u0d4d", "\u0d56": "\u0d34\u0d4d"}


@dataclass
class RomanizeStats:
    """Counters of :meth:`Romanizer.romanize` calls.

    Attributes:
        characters: code points of the input texts.
        native_characters: input code points of the source script (its Unicode block plus the dandas).
        unmapped_characters: source-script code points still present in the output (the scheme has
            no mapping for them).
        documents: texts romanized.
    """

    characters: int = 0
    native_characters: int = 0
    unmapped_characters: int = 0
    documents: int = 0

    def unmapped_fraction(self) -> float:
        """``unmapped_characters / native_characters``; 0.0 when there was no native character."""
        return self.unmapped_characters / self.native_characters if self.native_characters else 0.0

    def merge(self, other: "RomanizeStats") -> "RomanizeStats":
        """Add the counters of ``other`` to this one (in place); returns ``self``."""
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)
        return self

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain ``{name: int}`` dict (JSON-ready, summable key by key)."""
        return asdict(self)


def resolve_scheme(name: str) -> str:
    """The ``indic_transliteration`` scheme name of a Latin target scheme.

    Args:
        name: a name of :data:`LATIN_SCHEMES`, any case (``"ISO"``, ``"iast"``), or an alias
            (``iso15919``, ``harvard_kyoto``).
    Returns:
        The package's scheme name (e.g. ``"iso"`` for ISO 15919).
    Raises:
        ValueError: unknown name; the message lists the supported ones.
    """
    key = str(name).strip().lower()
    key = _SCHEME_ALIASES.get(key, key)
    if key not in LATIN_SCHEMES or key not in sanscript.SCHEMES:
        raise ValueError(f"unknown romanization scheme {name!r}; supported: {', '.join(LATIN_SCHEMES)}")
    return key


def source_scheme(script: str, language: str | None = None) -> str:
    """The ``indic_transliteration`` scheme that reads text of ``script`` (and ``language``).

    Args:
        script: ISO 15924 code as in FLORES-200 language codes (``"Deva"``, ``"Beng"``, ...).
        language: optional ISO 639-3 code; picks a dedicated table where one exists
            (:data:`LANGUAGE_SCHEMES`, e.g. ``asm`` + ``Beng`` -> ``assamese``).
    Returns:
        The package's source scheme name.
    Raises:
        ValueError: unsupported script (the message says why where known, and lists the supported ones).
    """
    if script not in SCRIPT_SCHEMES:
        reason = f" ({UNSUPPORTED_SCRIPTS[script]})" if script in UNSUPPORTED_SCRIPTS else ""
        raise ValueError(f"script {script!r} is not supported for romanization{reason}; "
                         f"supported scripts: {', '.join(SCRIPT_SCHEMES)}")
    return LANGUAGE_SCHEMES.get((language, script), SCRIPT_SCHEMES[script]) if language else SCRIPT_SCHEMES[script]


@lru_cache(maxsize=None)
def _scheme_map(source: str, target: str) -> sanscript.SchemeMap:
    """The package's ``SchemeMap`` from ``source`` to ``target`` (built once per process)."""
    return sanscript.SchemeMap(sanscript.SCHEMES[source], sanscript.SCHEMES[target])


@lru_cache(maxsize=None)
def _native_class(script: str) -> str:
    """Regex character class (without brackets) of the code points counted as ``script``."""
    first, last = SCRIPT_BLOCKS[script]
    return f"\\u{first:04x}-\\u{last:04x}{_DANDAS}"


@lru_cache(maxsize=None)
def _run_pattern(script: str) -> re.Pattern:
    """Maximal runs of ``script`` code points, with joiners allowed between two of them."""
    native = _native_class(script)
    return re.compile(f"[{native}]+(?:[{_JOINERS}]+[{native}]+)*")


@lru_cache(maxsize=None)
def _native_pattern(script: str) -> re.Pattern:
    """One code point of ``script``."""
    return re.compile(f"[{_native_class(script)}]")


@lru_cache(maxsize=None)
def _fixups(source: str) -> tuple[tuple[str, str], ...]:
    """``(find, replace)`` rewrites of a run before ``source`` reads it (see the module docstring)."""
    table = sanscript.SCHEMES[source]
    known = {v for values in table.values() if isinstance(values, dict)
             for entry in values.values() for v in ([entry] if isinstance(entry, str) else entry)}
    pairs = [(unicodedata.normalize("NFD", c), c) for c in known
             if len(c) == 1 and unicodedata.normalize("NFC", unicodedata.normalize("NFD", c)) != c]
    if source == "malayalam":
        pairs += [(chillu, plain) for chillu, plain in _MALAYALAM_CHILLUS.items() if chillu not in known]
    return tuple(sorted(pairs))


class Romanizer:
    """Transliterates text of one Indic script into one Latin scheme.

    Picklable (only strings in its attributes), so it can be sent to worker processes; the
    package's scheme tables are built lazily, once per process.

    Args:
        script: ISO 15924 code of the source text (``"Deva"``, ``"Beng"``, ... see :data:`SCRIPT_SCHEMES`).
        scheme: Latin target scheme, any case (see :data:`LATIN_SCHEMES`; ``"iso"`` is ISO 15919).
        language: optional ISO 639-3 code selecting a language-specific table (``asm`` -> ``assamese``).
    Raises:
        ValueError: unsupported script or unknown scheme (the message lists the supported ones).
    Source: the indic_transliteration package (``sanscript``).
    """

    def __init__(self, script: str, scheme: str, language: str | None = None) -> None:
        self.source = source_scheme(script, language)
        self.script, self.scheme, self.language = script, resolve_scheme(scheme), language

    def __repr__(self) -> str:
        return f"Romanizer(script={self.script!r}, scheme={self.scheme!r}, language={self.language!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Romanizer) and vars(self) == vars(other)

    def romanize(self, text: str, stats: RomanizeStats | None = None) -> str:
        """Transliterate the source-script parts of ``text``; everything else is copied unchanged.

        Args:
            text: input text (NFC expected, as ``read_documents`` yields it).
            stats: counters updated in place (one document, its characters, native and unmapped code points).
        Returns:
            The romanized text.
        """
        counts = [0, 0]  # native, unmapped

        def convert(match: re.Match) -> str:
            run = match.group()
            out = self._transliterate(run)
            counts[0] += len(run) - sum(run.count(j) for j in _JOINERS)
            counts[1] += len(_native_pattern(self.script).findall(out))
            return out

        result = _run_pattern(self.script).sub(convert, text)
        if stats is not None:
            stats.characters += len(text)
            stats.native_characters += counts[0]
            stats.unmapped_characters += counts[1]
            stats.documents += 1
        return result

    def _transliterate(self, run: str) -> str:
        """One run of source-script code points, joiners dropped and fix-ups applied, through the package."""
        for joiner in _JOINERS:
            run = run.replace(joiner, "")
        for find, replace in _fixups(self.source):
            if find in run:
                run = run.replace(find, replace)
        return sanscript.transliterate(run, scheme_map=_scheme_map(self.source, self.scheme))


def deromanize(text: str, script: str, scheme: str, language: str | None = None) -> str:
    """Inverse transliteration: Latin ``scheme`` text back to ``script``, NFC-normalized.

    Every Latin letter is read as the scheme, so English words and ASCII digits come back in the
    native script too; Malayalam chillus come back as consonant + virama.

    Args:
        text: romanized text.
        script, language: target script (ISO 15924) and optional ISO 639-3 code, as for :class:`Romanizer`.
        scheme: the Latin scheme of ``text`` (see :func:`resolve_scheme`).
    Returns:
        Native-script text in NFC.
    Raises:
        ValueError: unsupported script or unknown scheme.
    Source: the indic_transliteration package.
    """
    native = source_scheme(script, language)
    back = sanscript.transliterate(text, scheme_map=_scheme_map(resolve_scheme(scheme), native))
    return unicodedata.normalize("NFC", back)


def is_lossless(script: str, scheme: str) -> bool:
    """Whether ``script`` -> ``scheme`` -> ``script`` was verified to be exact (see :data:`LOSSLESS_PAIRS`).

    Args:
        script: ISO 15924 code; scheme: Latin scheme name, any case.
    Returns:
        True only for pairs verified on real text (SIB-200) without ASCII letters/digits and joiners.
    Raises:
        ValueError: unsupported script or unknown scheme.
    """
    source_scheme(script)
    return (script, resolve_scheme(scheme)) in LOSSLESS_PAIRS


def romanized_prefix(prefix: str | Path, scheme: str) -> Path:
    """Path of the romanized twin of a corpus: ``<prefix>.<scheme>``.

    ``corpus/hin_Deva`` + ``iast`` -> ``corpus/hin_Deva.iast`` (the scheme name canonicalized, so
    ``ISO`` and ``iso`` name the same file).

    Raises:
        ValueError: unknown scheme.
    """
    return Path(f"{prefix}.{resolve_scheme(scheme)}")
