"""Tests for megadistill.data.romanize(_corpus) and tools/romanize.py, on real SIB-200 sentences (CPU, a few seconds)."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import unicodedata
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import pytest
from indic_transliteration import sanscript

from conftest import load_tool
from megadistill.data.romanize import (
    LANGUAGE_SCHEMES,
    LATIN_SCHEMES,
    LOSSLESS_PAIRS,
    SCRIPT_BLOCKS,
    SCRIPT_SCHEMES,
    UNSUPPORTED_SCRIPTS,
    RomanizeStats,
    Romanizer,
    deromanize,
    is_lossless,
    resolve_scheme,
    romanized_prefix,
    round_trip_hazard,
)
from megadistill.data import romanize_corpus
from megadistill.data.romanize_corpus import tsv_field
from megadistill.data.sources import read_documents

REPO_ROOT = Path(__file__).resolve().parents[1]


romanize_tool = load_tool("romanize")


def nfc_texts(sib200: Path, lang: str, split: str = "dev") -> list[str]:
    """The SIB-200 ``text`` column of one split, NFC-normalized as ``read_documents`` yields it."""
    from conftest import read_sib200_texts

    return [unicodedata.normalize("NFC", t) for t in read_sib200_texts(sib200, lang, split)]


def languages_of(sib200: Path, script: str) -> list[str]:
    """SIB-200 directories written in ``script`` (``hin_Deva``, ``mar_Deva``, ...)."""
    return sorted(p.name for p in sib200.iterdir() if p.is_dir() and p.name.endswith(f"_{script}"))


# --------------------------------------------------------------------------- tables and names


def test_tables_name_existing_package_schemes():
    assert set(SCRIPT_BLOCKS) == set(SCRIPT_SCHEMES)
    for name in list(SCRIPT_SCHEMES.values()) + list(LANGUAGE_SCHEMES.values()):
        assert name in sanscript.SCHEMES and not sanscript.SCHEMES[name].is_roman, name
    for name in LATIN_SCHEMES:
        assert name in sanscript.SCHEMES and sanscript.SCHEMES[name].is_roman, name
    assert not set(UNSUPPORTED_SCRIPTS) & set(SCRIPT_SCHEMES)
    assert {"Deva", "Beng", "Taml", "Orya", "Gujr", "Guru", "Knda", "Mlym", "Telu"} <= set(SCRIPT_SCHEMES)


def test_resolve_scheme_is_case_insensitive_and_lists_names_when_unknown():
    assert resolve_scheme("ISO") == resolve_scheme("iso") == resolve_scheme("iso15919") == "iso"
    assert resolve_scheme(" IAST ") == "iast" and resolve_scheme("Harvard_Kyoto") == "hk"
    with pytest.raises(ValueError, match=r"unknown romanization scheme 'devanagari'.*supported: iso, iast"):
        resolve_scheme("devanagari")  # a package scheme, but not a Latin one
    with pytest.raises(ValueError, match="unknown romanization scheme"):
        Romanizer("Deva", "klingon")


def test_unknown_and_unsupported_scripts_are_refused_with_the_supported_list():
    with pytest.raises(ValueError, match=r"'Olck' is not supported.*Ol Chiki.*supported scripts: Deva, Beng"):
        Romanizer("Olck", "iso")
    with pytest.raises(ValueError, match=r"'Arab' is not supported.*supported scripts: Deva"):
        Romanizer("Arab", "iso")
    with pytest.raises(ValueError, match=r"'Xyzw' is not supported for romanization; supported scripts: Deva"):
        deromanize("ka", "Xyzw", "iso")
    with pytest.raises(ValueError, match="Olck"):
        is_lossless("Olck", "iso")


def test_romanized_prefix_naming_convention():
    assert romanized_prefix("corpus/hin_Deva", "iast") == Path("corpus/hin_Deva.iast")
    assert romanized_prefix(Path("c/tam_Taml"), "ISO") == Path("c/tam_Taml.iso")
    with pytest.raises(ValueError, match="unknown romanization scheme"):
        romanized_prefix("corpus/hin_Deva", "nope")


# --------------------------------------------------------------------------- romanize and its counters


def test_non_source_characters_are_left_unchanged_and_not_counted():
    text = "DNA 800, ऎ தமிழ் «x» 😀 a\u200db"  # Latin, digits, punctuation, Devanagari, Tamil, emoji, joiner
    stats = RomanizeStats()
    assert Romanizer("Beng", "iso").romanize(text, stats) == text
    assert stats == RomanizeStats(characters=len(text), native_characters=0, unmapped_characters=0, documents=1)
    assert stats.unmapped_fraction() == 0.0
    mixed = "WHO ने 2019 में कहा"
    out = Romanizer("Deva", "iso").romanize(mixed)
    assert out == "WHO nē 2019 mēṁ kahā"
    assert Romanizer("Deva", "iso").romanize("नमस्ते\nदुनिया\tक  ख") == "namastē\nduniyā\tka  kha"


def test_unmapped_source_characters_are_counted():
    text = unicodedata.normalize("NFC", "DNA 800 ऑफ़िस है।")  # candra O: no IAST letter; danda -> |
    stats = RomanizeStats()
    out = Romanizer("Deva", "iast").romanize(text, stats)
    assert out == "DNA 800 ऑfisa hai|"
    native = sum(0x0900 <= ord(c) <= 0x097F for c in text)
    assert (stats.characters, stats.native_characters, stats.unmapped_characters) == (len(text), native, 1)
    assert stats.unmapped_fraction() == pytest.approx(1 / native)
    iso = RomanizeStats()
    assert Romanizer("Deva", "ISO").romanize(text, iso) == "DNA 800 ôfisa hai।"  # ISO 15919 keeps the danda
    assert iso.unmapped_characters == 1
    total = RomanizeStats().merge(stats).merge(iso)
    assert total.as_dict() == {"characters": 2 * len(text), "native_characters": 2 * native,
                               "unmapped_characters": 2, "documents": 2}


def test_fixups_nukta_chillus_joiners_first_reading_and_language_tables():
    nfc = lambda s: unicodedata.normalize("NFC", s)  # noqa: E731
    assert nfc("য়") == "\u09af\u09bc"  # NFC decomposes it; the package's table only has U+09DF
    assert Romanizer("Beng", "iso").romanize(nfc("সময়")) == "samaẏa"
    assert Romanizer("Guru", "iso").romanize(nfc("ਜ਼ਮੀਨ")) == "zamīna"
    assert Romanizer("Mlym", "iso").romanize("അവൻ കേരളത്തിൽ") == "avan kēraḷattil"
    assert Romanizer("Knda", "iso").romanize("ಬೋರ್ಡ್\u200c ಅನ್ನು a\u200cb") == "bōrḍ annu a\u200cb"
    assert Romanizer("Beng", "iso").romanize("বাংলা ভাষা") == "bāṁlā bhāṣā"  # ব read as ब (b), not व (v)
    assert Romanizer("Taml", "iso").romanize("கடல் பச்சை") == "kaṭal paccai"  # not ghaḍhal bhajhjhai
    assert Romanizer("Sinh", "iso").romanize("ශ්\u200dරී ලංකාව") == "śrī laṁkāva"
    assert Romanizer("Beng", "iso").romanize("ৱ") == "ৱ"  # the bengali table has no ৱ ...
    assert Romanizer("Beng", "iso", language="asm").romanize("ৱ") == "va"  # ... the assamese one does


def test_unmapped_fraction_on_sib200_dev_iso(sib200_dir):
    """Regression bounds from the measured SIB-200 dev numbers (most of what is left is the danda ISO keeps)."""
    measured = {}
    for lang_dir in sorted(p.name for p in sib200_dir.iterdir() if p.is_dir()):
        lang, script = lang_dir.split("_")
        if script not in SCRIPT_SCHEMES:
            continue
        stats, romanizer = RomanizeStats(), Romanizer(script, "iso", lang)
        for text in nfc_texts(sib200_dir, lang_dir):
            romanizer.romanize(text, stats)
        measured[lang_dir] = stats
        assert stats.documents == 99 and stats.native_characters > 0.7 * stats.characters
        assert stats.unmapped_fraction() < 0.015, (lang_dir, stats)
    assert {"hin_Deva", "tam_Taml", "ben_Beng", "asm_Beng", "mal_Mlym"} <= set(measured)
    for lang_dir in ("tam_Taml", "tel_Telu", "kan_Knda", "mar_Deva"):
        assert measured[lang_dir].unmapped_characters == 0


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("script,scheme", sorted(LOSSLESS_PAIRS))
def test_lossless_pairs_round_trip_on_sib200_dev(sib200_dir, script, scheme):
    assert is_lossless(script, scheme) and is_lossless(script, scheme.upper())
    checked = 0
    for lang_dir in languages_of(sib200_dir, script):
        lang = lang_dir.split("_")[0]
        romanizer = Romanizer(script, scheme, lang)
        for text in nfc_texts(sib200_dir, lang_dir):
            if round_trip_hazard(text, script, scheme, lang) is None:
                assert deromanize(romanizer.romanize(text), script, scheme, lang) == text
                checked += 1
    assert checked >= 35  # hazard-free real sentences exist in every claimed pair's dev split


@pytest.mark.parametrize("scheme", ["iso", "iast", "hk", "itrans", "slp1"])
def test_hindi_round_trips_on_hazard_free_sentences(sib200_dir, scheme):
    romanizer, checked = Romanizer("Deva", scheme), 0
    for text in nfc_texts(sib200_dir, "hin_Deva"):
        if round_trip_hazard(text, "Deva", scheme) is None:
            assert deromanize(romanizer.romanize(text), "Deva", scheme) == text
            checked += 1
    assert checked >= 20


def test_known_ambiguities_are_not_claimed_lossless():
    iso = Romanizer("Deva", "iso")
    assert deromanize(iso.romanize("जइसे"), "Deva", "iso") == "जैसे"  # a + i hiatus reads back as ai
    assert round_trip_hazard("जइसे", "Deva", "iso").startswith("independent vowel")
    assert deromanize(iso.romanize("याद्हत"), "Deva", "iso") == "याधत"  # d + h vs dh (kas_Deva dev)
    assert round_trip_hazard("याद्हत", "Deva", "iso") is None  # not a text hazard: the scheme is lossy
    assert not is_lossless("Deva", "iso") and not is_lossless("Deva", "iast") and not is_lossless("Deva", "hk")
    assert deromanize(Romanizer("Deva", "slp1").romanize("है."), "Deva", "slp1") == "है।"  # . is slp1's danda
    assert "'.'" in round_trip_hazard("है.", "Deva", "slp1")
    assert round_trip_hazard("DNA", "Deva", "iso").startswith("'D'")
    assert deromanize(Romanizer("Mlym", "iso").romanize("അവൻ"), "Mlym", "iso") == "അവന്"
    assert not is_lossless("Mlym", "iso") and not is_lossless("Guru", "iso")


# --------------------------------------------------------------------------- pickling / workers


def test_romanizer_pickles_and_works_in_a_worker_process():
    romanizer = Romanizer("Taml", "ISO")
    assert all(isinstance(v, (str, type(None))) for v in vars(romanizer).values())
    clone = pickle.loads(pickle.dumps(romanizer))
    assert clone == romanizer and hash(clone) == hash(romanizer)
    assert clone.romanize("தமிழ் நாடு") == romanizer.romanize("தமிழ் நாடு") == "tamiḻ nāṭu"
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        assert pool.submit(romanizer.romanize, "தமிழ் நாடு").result(timeout=60) == "tamiḻ nāṭu"


# --------------------------------------------------------------------------- CLI


def test_cli_writes_paired_tsv_and_reports(sib200_dir, tmp_path, capsys):
    inputs = [str(sib200_dir / "hin_Deva" / "dev.tsv"), str(sib200_dir / "tam_Taml" / "dev.tsv")]
    out = tmp_path / "out" / "dev.iso.tsv"
    assert romanize_tool.main(["--input", *inputs, "--scheme", "ISO", "--output", str(out), "--paired"]) == 0
    lines = out.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "source\tline\tnative\tromanized" and len(lines) == 1 + 2 * 99
    expected = [(lang, t) for lang in ("hin_Deva", "tam_Taml") for t in nfc_texts(sib200_dir, lang)]
    for line, (lang, text) in zip(lines[1:], expected):
        source, number, native, romanized = line.split("\t")
        assert source.endswith(f"{lang}/dev.tsv") and int(number) >= 2
        assert native == tsv_field(text)
        assert romanized == tsv_field(Romanizer(lang[-4:], "iso", lang[:3]).romanize(text))
    romanized_back = [d.text for d in read_documents(out, text_field="romanized")]
    assert len(romanized_back) == 198 and romanized_back[0] == lines[1].split("\t")[3]
    report = capsys.readouterr().out
    assert f"wrote {out} (198 documents, scheme iso)" in report
    assert "hin_Deva" in report and "tam_Taml" in report and "fraction" in report
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary file left


def test_cli_jsonl_keeps_multiline_documents_and_tsv_flattens_them(tmp_path, capsys):
    corpus = tmp_path / "hin_Deva" / "sample.txt"  # IndicCorp layout: sentences, blank line between documents
    corpus.parent.mkdir()
    corpus.write_text("पहला वाक्य।\nदूसरा\tवाक्य।\n\nतीसरा वाक्य।\n", encoding="utf-8")
    jsonl, tsv = tmp_path / "o.jsonl", tmp_path / "o.tsv"
    assert romanize_tool.main(["--input", str(corpus), "--scheme", "hk", "--output", str(jsonl), "--paired"]) == 0
    records = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]
    assert [r["native"] for r in records] == ["पहला वाक्य।\nदूसरा\tवाक्य।", "तीसरा वाक्य।"]
    assert records[0]["romanized"] == "pahalA vAkya|\ndUsarA\tvAkya|" and records[0]["line"] == 1
    assert romanize_tool.main(["--input", str(corpus), "--scheme", "hk", "--output", str(tsv)]) == 0
    assert tsv.read_text(encoding="utf-8").splitlines() == [
        "source\tline\ttext", f"{corpus}\t1\tpahalA vAkya| dUsarA vAkya|", f"{corpus}\t4\ttIsarA vAkya|"]
    capsys.readouterr()


@pytest.mark.parametrize("case,message", [
    ("scheme", "unknown romanization scheme 'klingon'"),
    ("script", "'Olck' is not supported"),
    ("suffix", "output must end with .tsv or .jsonl"),
    ("missing", "input file not found"),
    ("no_script", "cannot tell the script"),
])
def test_cli_refuses_bad_input_with_exit_2(sib200_dir, tmp_path, capsys, case, message):
    source, out, extra = sib200_dir / "hin_Deva" / "dev.tsv", tmp_path / "out.tsv", []
    if case == "missing":
        source = sib200_dir / "hin_Deva" / "nope.tsv"
    elif case == "no_script":
        source = tmp_path / "plain.tsv"
        source.write_text("text\nनमस्ते\n", encoding="utf-8")
    elif case == "suffix":
        out = tmp_path / "out.csv"
    elif case == "script":
        extra = ["--script", "Olck"]
    scheme = "klingon" if case == "scheme" else "iso"
    assert romanize_tool.main(["--input", str(source), "--scheme", scheme, "--output", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("romanize: error: ") and message in err and err.count("\n") == 1
    assert not out.exists()


def test_cli_never_leaves_a_half_written_output(sib200_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "dev.tsv"
    out.write_text("old content\n", encoding="utf-8")
    real_read = romanize_corpus.read_documents

    def failing_read(path, **kwargs):
        for i, doc in enumerate(real_read(path, **kwargs)):
            if i == 50:
                raise ValueError(f"{path}:{doc.line}: simulated failure mid-way")
            yield doc

    monkeypatch.setattr(romanize_corpus, "read_documents", failing_read)
    argv = ["--input", str(sib200_dir / "hin_Deva" / "dev.tsv"), "--scheme", "iso", "--output", str(out), "--paired"]
    assert romanize_tool.main(argv) == 2
    assert "simulated failure mid-way" in capsys.readouterr().err
    assert out.read_text(encoding="utf-8") == "old content\n"  # untouched: the new file was never renamed
    assert [p.name for p in tmp_path.iterdir()] == ["dev.tsv"]  # and its temporary file is gone


def test_cli_runs_as_a_script_from_the_checkout(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "romanize.py"), "--input", "x.tsv",
                           "--scheme", "nope", "--output", str(tmp_path / "o.tsv")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("romanize: error: unknown romanization scheme 'nope'") and proc.stderr.count("\n") == 1
