"""Romanization (transliteration to Latin) of Indic text with the ``indic_transliteration`` package.

Source: the ``indic_transliteration`` package (``sanscript``, https://github.com/indic-transliteration);
the default target ``iso`` is ISO 15919 ("Transliteration of Devanagari and related Indic scripts
into Latin characters").

Only characters of the source script are transliterated: the text is cut into runs of
source-script code points (the script's Unicode block plus the shared dandas U+0964/U+0965; the
spaces, tabs and newlines between them, which the package leaves as they are, and the ZWJ/ZWNJ
next to them) and each run goes through ``sanscript``; everything else (Latin, digits,
punctuation, other scripts) is copied unchanged. Before a run is transliterated:

* its ZWJ/ZWNJ are removed (they only control the native rendering);
* nukta letters that NFC decomposes (composition exclusions such as Bengali য় = U+09AF U+09BC)
  are recomposed where the package's table knows only the precomposed letter;
* Malayalam chillu letters (U+0D7A-U+0D7F, which the package does not map) become
  consonant + virama, their older encoding, romanized identically by ISO 15919 (ൽ -> l).

A native letter that the package's Devanagari-keyed table gives for several Devanagari letters
is read as the first of them (Tamil க -> ka, not gha; Bengali ব -> ba, not va), as in ISO 15919.

File naming convention: a romanized corpus sits beside the native one as ``<lang>_<Script>.<scheme>``
(see :func:`romanized_prefix`).
"""

from __future__ import annotations

import copy
import re
import unicodedata
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from indic_transliteration import sanscript

from megadistill.data.scripts import SCRIPT_RANGES

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
    "Sinh": "sinhala",  # supported by the package; not measured here (no SIB-200 sin_Sinh copy)
}

# (ISO 639-3 language, script) whose orthography has a dedicated source scheme.
LANGUAGE_SCHEMES: dict[tuple[str, str], str] = {
    ("asm", "Beng"): "assamese",  # ৰ and ৱ; the bengali table leaves ৱ unmapped
}

# Main Unicode block (first, last code point) of each supported script (from megadistill.data.scripts).
SCRIPT_BLOCKS: dict[str, tuple[int, int]] = {
    script: SCRIPT_RANGES[script][0]
    for script in ("Deva", "Beng", "Guru", "Gujr", "Orya", "Taml", "Telu", "Knda", "Mlym", "Sinh")
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

# (script, scheme) pairs for which native -> scheme -> native (deromanize, NFC) gave back every SIB-200
# train/dev/test sentence of the script's languages that has no round-trip hazard (see
# round_trip_hazard), with at least 400 such sentences. Measured with indic_transliteration 2.3.82;
# hazard-free sentences that came back exact, out of all: Deva/slp1 2459 of 8032 (all 8 Deva
# languages); Orya/iso 472, iast 465, hk 467, wx 471, kolkata_v2 459, titus 459, iast_iso_m 439,
# hk_dravidian 465 of 1004; Taml/iso 732, hk 735 of 1004; Telu/iso 593, hk 596 of 1004.
# Not lossless on hazard-free text (first counterexample): Deva/iso, iast, hk (द्ह -> ध in kas_Deva;
# exact on hin, mar, npi, san, awa: e.g. hin_Deva iso 617 of 617, iast 499 of 499, hk 499 of 499),
# Beng (ৎ -> ত্), Gujr/Knda iso (જ્હ -> ઝ), Guru (ੱ, ੰ), Mlym (chillus come back as consonant + virama).
LOSSLESS_PAIRS: frozenset[tuple[str, str]] = frozenset(
    [("Deva", "slp1")]
    + [("Orya", s) for s in ("iso", "iast", "hk", "wx", "kolkata_v2", "titus", "iast_iso_m", "hk_dravidian")]
    + [("Taml", "iso"), ("Taml", "hk"), ("Telu", "iso"), ("Telu", "hk")]
)

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
            no mapping for them; ``iso`` keeps the dandas ``।``/``॥`` on purpose, and they count here).
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
    return sanscript.SchemeMap(_reading_scheme(source), sanscript.SCHEMES[target])


@lru_cache(maxsize=None)
def _reading_scheme(name: str):
    """The package's scheme ``name``; for a native script, each consonant read as its *first* Devanagari key.

    The package keys its tables on Devanagari, so a letter standing for several (Tamil க for
    क ख ग घ, Bengali ব for ब व) would be read as the last one (க -> gha, ব -> va); ISO 15919
    reads the first (க -> ka, ব -> ba).
    """
    scheme = sanscript.SCHEMES[name]
    if scheme.is_roman:
        return scheme
    scheme, seen = copy.deepcopy(scheme), set()
    for group in ("consonants", "extra_consonants"):
        entries = scheme.get(group, {})
        for key, value in list(entries.items()):
            if value in seen:
                del entries[key]
            elif value:
                seen.add(value)
    return scheme


@lru_cache(maxsize=None)
def _native_class(script: str) -> str:
    """Regex character class (without brackets) of the code points counted as ``script``."""
    first, last = SCRIPT_BLOCKS[script]
    return f"\\u{first:04x}-\\u{last:04x}{_DANDAS}"


@lru_cache(maxsize=None)
def _run_pattern(script: str) -> re.Pattern:
    """Runs of ``script`` code points: joiners next to them and spaces, tabs, newlines between them included."""
    native = _native_class(script)
    return re.compile(f"[{_JOINERS}]*[{native}](?:[{native}{_JOINERS} \\t\\n]*[{native}])?[{_JOINERS}]*")


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

    def __hash__(self) -> int:
        return hash((self.script, self.scheme, self.language))

    def romanize(self, text: str, stats: RomanizeStats | None = None) -> str:
        """Transliterate the source-script parts of ``text``; everything else is copied unchanged.

        Args:
            text: input text (NFC expected, as ``read_documents`` yields it).
            stats: counters updated in place (one document, its characters, native and unmapped code points).
        Returns:
            The romanized text.
        """
        counts = [0, 0]  # native, unmapped
        native = _native_pattern(self.script)

        def convert(match: re.Match) -> str:
            out = self.transliterate_run(match.group())
            counts[0] += len(native.findall(match.group()))
            counts[1] += len(native.findall(out))
            return out

        result = _run_pattern(self.script).sub(convert, text)
        if stats is not None:
            stats.characters += len(text)
            stats.native_characters += counts[0]
            stats.unmapped_characters += counts[1]
            stats.documents += 1
        return result

    def transliterate_run(self, run: str) -> str:
        """Transliterate one run of source-script text (see the module docstring): joiners dropped, fix-ups applied.

        Args:
            run: source-script code points, possibly with spaces/tabs/newlines and joiners.
        Returns:
            The package's output for the run (unmapped code points stay as they are).
        """
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


@lru_cache(maxsize=None)
def _letter_classes(source: str) -> tuple[dict[str, str], str]:
    """``({code point: class}, independent a)`` of a source table.

    Classes: ``consonant``, ``vowel`` (independent), ``matra`` (vowel sign), ``virama``, ``nukta``.
    """
    table = sanscript.SCHEMES[source]
    classes: dict[str, str] = {}
    for group, kind in (("consonants", "consonant"), ("extra_consonants", "consonant"), ("vowels", "vowel"),
                        ("vowel_marks", "matra"), ("candra", "matra"), ("virama", "virama")):
        for value in table.get(group, {}).values():
            classes.update({ch: "nukta" for ch in value if "NUKTA" in unicodedata.name(ch, "")})
            if len(value) == 1:
                classes.setdefault(value, kind)
    return classes, table["vowels"]["अ"]


@lru_cache(maxsize=4096)
def _reads_back_changed(char: str, scheme: str, source: str) -> bool:
    """Whether ``char``, left as is by romanization, is changed by the way back (``'`` -> avagraha, ``a`` -> अ)."""
    return sanscript.transliterate(char, scheme_map=_scheme_map(scheme, source)) != char


def round_trip_hazard(text: str, script: str, scheme: str, language: str | None = None) -> str | None:
    """Why ``deromanize(romanize(text)) == text`` is not to be expected for ``text``, or None.

    The hazards are properties of the text (not ambiguities of one scheme's letters): characters
    outside the source script that the way back reads as the scheme (ASCII letters and digits,
    ``'`` for the avagraha, ``|`` or ``.`` for the dandas in some schemes); ZWJ/ZWNJ (dropped);
    combining signs the scheme leaves unmapped; a vowel sign, virama or nukta not after a
    consonant (malformed); an independent vowel right after a consonant, nukta, virama or the
    independent a (जइसे reads back as जैसे, अउर as और, स्ओ as सो: no scheme here writes
    ISO 15919's ``:`` separator).
    Pairs in :data:`LOSSLESS_PAIRS` round trip exactly on SIB-200 text free of these hazards.

    Args:
        text: native-script text (NFC); script, scheme, language: as for :class:`Romanizer`.
    Returns:
        A short description of the first hazard found, or None.
    Raises:
        ValueError: unsupported script or unknown scheme.
    """
    romanizer = Romanizer(script, scheme, language)
    native = _native_pattern(script)
    for ch in dict.fromkeys(text):
        if ch in _JOINERS:
            return f"joiner U+{ord(ch):04X} (dropped by romanization)"
        if not native.match(ch) and _reads_back_changed(ch, romanizer.scheme, romanizer.source):
            return f"{ch!r} is read back as {romanizer.scheme} text"
    for match in _run_pattern(script).finditer(text):
        run = match.group()
        signs = [ch for ch in native.findall(romanizer.transliterate_run(run)) if unicodedata.category(ch) in ("Mn", "Mc")]
        if signs:
            return f"sign {signs[0]!r} (U+{ord(signs[0]):04X}) has no {romanizer.scheme} mapping"
        problem = _sequence_hazard(run, romanizer.source)
        if problem:
            return problem
    return None


def _sequence_hazard(run: str, source: str) -> str | None:
    """A sign not after a consonant, or an independent vowel right after a consonant, nukta, virama or a, in ``run``."""
    classes, independent_a = _letter_classes(source)
    previous = None
    for ch in run:
        kind = classes.get(ch, "other")
        if kind in ("matra", "virama", "nukta") and previous not in ("consonant", "nukta"):
            return f"sign {ch!r} not after a consonant in {run!r}"
        if kind == "vowel" and previous in ("consonant", "nukta", "virama", "a"):
            return f"independent vowel {ch!r} right after a consonant or a in {run!r}"
        previous = "a" if ch == independent_a else kind
    return None


def is_lossless(script: str, scheme: str) -> bool:
    """Whether ``script`` -> ``scheme`` -> ``script`` was verified to be exact (see :data:`LOSSLESS_PAIRS`).

    Args:
        script: ISO 15924 code; scheme: Latin scheme name, any case.
    Returns:
        True for the pairs of :data:`LOSSLESS_PAIRS`: exact round trip verified on real text (SIB-200)
        free of round-trip hazards (:func:`round_trip_hazard`). No pair round trips arbitrary text:
        ASCII letters, digits and some punctuation come back in the native script.
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
