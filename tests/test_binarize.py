"""Tests for megadistill.data.binarize and tools/binarize.py: SIB-200 → MMIDIDX with tiny tokenizers, framing, provenance, CLI."""

from __future__ import annotations

import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from conftest import load_tool
from megadistill.data.binarize import BinarizeOptions, binarize, group_by_language
from megadistill.data.indexed import IndexedDataset, check_tokenizer_matches, read_provenance, tokenizer_sha256

REPO_ROOT = Path(__file__).resolve().parents[1]


binarize_tool = load_tool("binarize")


@pytest.fixture(scope="module")
def hin_dev(sib200_dir, tiny_tokenizer, tmp_path_factory):
    """SIB-200 hin_Deva dev split binarized once: (prefix, provenance, reference texts)."""
    from conftest import read_sib200_texts

    prefix = tmp_path_factory.mktemp("corpus") / "hin_Deva"
    meta = binarize(
        [sib200_dir / "hin_Deva" / "dev.tsv"], tiny_tokenizer, prefix, BinarizeOptions(block_bytes=2048), show_progress=False
    )
    return prefix, meta, read_sib200_texts(sib200_dir, "hin_Deva", "dev")


def test_documents_equal_tokenizer_ids_plus_eos(hin_dev, tiny_tokenizer):
    prefix, _, texts = hin_dev
    ds = IndexedDataset(prefix)
    assert len(ds) == len(texts) == 99
    assert ds.dtype.name == "uint16"
    for i, text in enumerate(texts):
        expected = tiny_tokenizer(unicodedata.normalize("NFC", text)).input_ids + [tiny_tokenizer.eos_token_id]
        assert ds[i].tolist() == expected
        assert expected[0] == tiny_tokenizer.bos_token_id


def test_provenance_counts(hin_dev, tiny_tokenizer, sib200_dir):
    prefix, meta, texts = hin_dev
    ds = IndexedDataset(prefix)
    assert read_provenance(prefix) == meta
    nfc = [unicodedata.normalize("NFC", t) for t in texts]
    assert meta["format"] == "megatron-mmidindex-v1"
    assert meta["documents"] == 99
    assert meta["tokens"] == int(ds.sizes.sum()) == ds.num_tokens
    assert meta["characters"] == sum(len(t) for t in nfc)
    assert meta["bytes_utf8"] == sum(len(t.encode("utf-8")) for t in nfc)
    assert meta["tokenizer"]["sha256"] == tokenizer_sha256(tiny_tokenizer)
    assert meta["tokenizer"]["vocab_size"] == len(tiny_tokenizer) == 700
    assert (meta["bos_id"], meta["eos_id"], meta["add_bos"]) == (2, 1, True)
    assert (meta["language"], meta["script"], meta["dtype"]) == ("hin", "Deva", "uint16")
    assert meta["dropped"] == {}
    assert meta["sources"] == [
        {"path": str(sib200_dir / "hin_Deva" / "dev.tsv"), "format": "tsv", "documents": 99, "documents_read": 99, "lines_read": 100}
    ]


def test_check_tokenizer_matches(hin_dev, tiny_tokenizer, sib200_dir):
    from conftest import build_tiny_tokenizer, read_sib200_texts

    prefix, _, _ = hin_dev
    check_tokenizer_matches(prefix, tiny_tokenizer)
    other = build_tiny_tokenizer(read_sib200_texts(sib200_dir, "hin_Deva"), vocab_size=500)
    with pytest.raises(ValueError, match="re-binarize with the teacher tokenizer"):
        check_tokenizer_matches(prefix, other)


def test_multiple_inputs_and_dropped_counts(tmp_path, tiny_tokenizer):
    first = tmp_path / "sat_Olck.txt"
    first.write_bytes(b"one\ntwo\n\n\xff\n\nthree\n")
    second = tmp_path / "more.jsonl"
    second.write_text('{"text": "four"}\n{"text": ""}\n', encoding="utf-8")
    meta = binarize([first, second], tiny_tokenizer, tmp_path / "out" / "x", show_progress=False)
    assert (meta["language"], meta["script"]) == ("sat", "Olck")
    assert meta["documents"] == 3
    assert meta["dropped"] == {"empty_document": 1, "invalid_utf8": 1}
    assert [s["documents"] for s in meta["sources"]] == [2, 1]
    ds = IndexedDataset(tmp_path / "out" / "x")
    assert ds[0].tolist() == tiny_tokenizer("one\ntwo").input_ids + [1]
    assert ds[2].tolist() == tiny_tokenizer("four").input_ids + [1]


def test_failure_keeps_previous_output(hin_dev, tmp_path, tiny_tokenizer):
    prefix, _, _ = hin_dev
    before = {p: p.read_bytes() for p in prefix.parent.iterdir()}
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\n\n\xffbroken\n")
    with pytest.raises(ValueError, match=r"bad\.txt:3: invalid UTF-8"):
        binarize([bad], tiny_tokenizer, prefix, BinarizeOptions(on_error="fail"), show_progress=False)
    assert {p: p.read_bytes() for p in prefix.parent.iterdir()} == before


def test_tokenizer_without_eos_is_rejected(tmp_path, tiny_tokenizer):
    class NoEos:
        eos_token_id = None

    with pytest.raises(ValueError, match="no EOS"):
        binarize([tmp_path / "x.txt"], NoEos(), tmp_path / "x", show_progress=False)


def _run_cli(*args):
    return subprocess.run(
        [sys.executable, "tools/binarize.py", *map(str, args)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )


def test_cli_missing_input_exits_2(tmp_path):
    missing = tmp_path / "no_such_corpus.tsv"
    result = _run_cli("--input", missing, "--tokenizer", tmp_path / "tok", "--output-prefix", tmp_path / "out")
    assert result.returncode == 2
    assert "binarize: error:" in result.stderr and "no_such_corpus.tsv" in result.stderr
    assert "Traceback" not in result.stderr


def _save_teacher_dir(tokenizer, path):
    """A tokenizer dir that ``load_tokenizer`` accepts: it wants a model dir, so add a config.json."""
    from transformers import Gemma3TextConfig

    tokenizer.save_pretrained(path)
    Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                     num_attention_heads=1, num_key_value_heads=1, head_dim=16).save_pretrained(path)
    return path


# In-process main() from here on: a subprocess pays the torch + transformers import (~8 s) again.
def test_cli_bad_input_exits_2(tmp_path, tiny_tokenizer, capsys):
    pytest.importorskip("megadistill.models.teacher")
    bad = tmp_path / "notext.tsv"
    bad.write_text("id\tsentence\n1\thello\n", encoding="utf-8")
    tok = _save_teacher_dir(tiny_tokenizer, tmp_path / "tok")
    code = binarize_tool.main(["--input", str(bad), "--tokenizer", str(tok), "--output-prefix", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "binarize: error:" in err and "notext.tsv: no 'text' column" in err
    assert not list(tmp_path.glob("out*"))


def test_cli_success(tmp_path, tiny_tokenizer, sib200_dir, capsys):
    pytest.importorskip("megadistill.models.teacher")
    tok = _save_teacher_dir(tiny_tokenizer, tmp_path / "tok")
    prefix = tmp_path / "hin_Deva"
    dev = sib200_dir / "hin_Deva" / "dev.tsv"
    code = binarize_tool.main(["--input", str(dev), "--tokenizer", str(tok), "--output-prefix", str(prefix), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert "99 documents" in out and f"{prefix}.bin" in out and "dtype uint16" in out
    assert len(IndexedDataset(prefix)) == 99
    assert read_provenance(prefix)["tokenizer"]["name"] == str(tok)
    check_tokenizer_matches(prefix, tiny_tokenizer)


# --- scale features: worker processes, dedup, mixed scripts, one dataset per language ----------

def test_worker_processes_write_identical_files(sib200_dir, tiny_tokenizer, tmp_path):
    """Two spawned tokenizer processes (blocks of 4 KB, so many blocks in flight) == in-process, byte for byte."""
    inputs = [sib200_dir / "hin_Deva" / "dev.tsv", sib200_dir / "ben_Beng" / "dev.tsv"]
    metas = {}
    for processes in (0, 2):
        options = BinarizeOptions(processes=processes, block_bytes=4096)
        metas[processes] = binarize(inputs, tiny_tokenizer, tmp_path / f"p{processes}", options, show_progress=False)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"p0{suffix}").read_bytes() == (tmp_path / f"p2{suffix}").read_bytes()
    assert metas[0]["documents"] == metas[2]["documents"] == 198
    assert metas[0]["sources"] == metas[2]["sources"]


def test_dedup_drops_repeated_sentences(tiny_tokenizer, tmp_path):
    corpus = tmp_path / "hin_Deva.txt"
    corpus.write_text("a b\nc d\n\nc d\ne f\n\na b\n\nc d\n", encoding="utf-8")
    options = BinarizeOptions(dedup=True, block_bytes=8)  # duplicates across blocks too
    meta = binarize([corpus], tiny_tokenizer, tmp_path / "out", options, show_progress=False)
    ds = IndexedDataset(tmp_path / "out")
    eos = [tiny_tokenizer.eos_token_id]
    assert [ds[i].tolist() for i in range(len(ds))] == [
        tiny_tokenizer("a b\nc d").input_ids + eos, tiny_tokenizer("e f").input_ids + eos]
    assert meta["dropped"] == {"duplicate_document": 2, "duplicate_sentence": 3}
    assert meta["documents"] == 2 and meta["sources"][0]["documents_read"] == 4
    assert meta["characters"] == len("a b\nc d") + len("e f")


def test_mixed_script_documents_are_counted_with_locations(sib200_dir, tiny_tokenizer, tmp_path):
    mixed = tmp_path / "hin_Deva.txt"
    mixed.write_text("यह हिंदी है\n\nthis is english\n\nयह हिंदी mixed है\n", encoding="utf-8")
    meta = binarize([mixed], tiny_tokenizer, tmp_path / "out", show_progress=False)
    assert meta["documents"] == 3  # kept, but reported
    assert meta["mixed_script_documents"] == {"count": 1, "examples": [f"{mixed}:3"]}


def test_output_dir_groups_inputs_by_language(sib200_dir, tmp_path):
    inputs = [str(sib200_dir / lang / "dev.tsv") for lang in ("hin_Deva", "ben_Beng")] + [str(sib200_dir / "hin_Deva" / "test.tsv")]
    groups = group_by_language(inputs, tmp_path)
    assert groups == {tmp_path / "hin_Deva": [inputs[0], inputs[2]], tmp_path / "ben_Beng": [inputs[1]]}
    indiccorp = ["/data/indiccorp/hi.txt.xz", "/data/indiccorp/as.txt", "/data/sangraha/hin/0.parquet"]
    assert group_by_language(indiccorp, tmp_path) == {
        tmp_path / "hin_Deva": [indiccorp[0], indiccorp[2]], tmp_path / "asm_Beng": [indiccorp[1]]}
    with pytest.raises(ValueError, match="no language code"):
        group_by_language(["/data/corpus.txt"], tmp_path)


def test_cli_strict_and_output_dir(tmp_path, tiny_tokenizer, sib200_dir, capsys):
    pytest.importorskip("megadistill.models.teacher")
    tok = _save_teacher_dir(tiny_tokenizer, tmp_path / "tok")
    bad = tmp_path / "sat_Olck" / "x.txt"
    bad.parent.mkdir()
    bad.write_bytes("ᱥᱟᱱᱛᱟᱲᱤ\n\n".encode() + b"\xff\n")
    code = binarize_tool.main(["--input", str(bad), "--tokenizer", str(tok), "--output-dir", str(tmp_path / "out"),
                               "--strict", "--no-progress"])
    assert code == 2 and "x.txt:3: invalid UTF-8" in capsys.readouterr().err
    assert not (tmp_path / "out" / "sat_Olck.bin").exists()
    code = binarize_tool.main(["--input", str(bad), str(sib200_dir / "hin_Deva" / "dev.tsv"), "--tokenizer", str(tok),
                               "--output-dir", str(tmp_path / "out"), "--no-progress", "--workers", "1"])
    assert code == 0
    assert read_provenance(tmp_path / "out" / "sat_Olck")["dropped"] == {"invalid_utf8": 1}
    assert len(IndexedDataset(tmp_path / "out" / "hin_Deva")) == 99


def test_romanized_twin_is_paired_document_by_document(sib200_dir, tiny_tokenizer, tmp_path):
    from megadistill.data.romanize import Romanizer

    dev = sib200_dir / "hin_Deva" / "dev.tsv"
    options = BinarizeOptions(romanize="iast", dedup=True, block_bytes=4096)
    meta = binarize([dev], tiny_tokenizer, tmp_path / "hin_Deva", options, show_progress=False)
    native, roman = IndexedDataset(tmp_path / "hin_Deva"), IndexedDataset(tmp_path / "hin_Deva.iast")
    roman_meta = read_provenance(tmp_path / "hin_Deva.iast")
    assert len(native) == len(roman) == meta["documents"] == roman_meta["documents"] == 99
    assert meta["romanized_as"] == str(tmp_path / "hin_Deva.iast")
    info = roman_meta["romanization"]
    assert info["scheme"] == "iast" and info["paired_with"] == str(tmp_path / "hin_Deva")
    assert info["native_characters"] > 0 and 0 <= info["unmapped_fraction"] < 0.01
    romanizer = Romanizer("Deva", "iast", "hin")
    from conftest import read_sib200_texts

    texts = [unicodedata.normalize("NFC", t) for t in read_sib200_texts(sib200_dir, "hin_Deva", "dev")]
    eos = [tiny_tokenizer.eos_token_id]
    for i in (0, 50, 98):  # document i of the twin is document i of the native dataset, romanized
        assert roman[i].tolist() == tiny_tokenizer(romanizer.romanize(texts[i])).input_ids + eos
        assert native[i].tolist() == tiny_tokenizer(texts[i]).input_ids + eos
    assert roman_meta["characters"] == sum(len(romanizer.romanize(t)) for t in texts)
    with pytest.raises(ValueError, match="needs the source script"):
        binarize([tmp_path / "x.txt"], tiny_tokenizer, tmp_path / "x", BinarizeOptions(romanize="iast"),
                 show_progress=False)


# --- framing: encoder (masked-LM) tokenizers, decoder edge cases -------------------------------

ENCODERS = {"bert_tokenizer": ("[CLS]", "[SEP]"), "xlmr_tokenizer": ("<s>", "</s>")}


@pytest.fixture(scope="module", params=sorted(ENCODERS))
def encoder_dev(request, sib200_dir, tmp_path_factory):
    """SIB-200 hin_Deva dev binarized with an encoder tokenizer: (tokenizer, prefix, provenance, NFC texts, frame tokens)."""
    from conftest import read_sib200_texts

    tokenizer = request.getfixturevalue(request.param)
    prefix = tmp_path_factory.mktemp(request.param) / "hin_Deva"
    meta = binarize([sib200_dir / "hin_Deva" / "dev.tsv"], tokenizer, prefix, BinarizeOptions(block_bytes=4096),
                    show_progress=False)
    texts = [unicodedata.normalize("NFC", t) for t in read_sib200_texts(sib200_dir, "hin_Deva", "dev")]
    return tokenizer, prefix, meta, texts, ENCODERS[request.param]


def test_encoder_documents_are_framed_like_the_model_expects(encoder_dev):
    tokenizer, prefix, _, texts, (first, last) = encoder_dev
    cls_id, sep_id = tokenizer.convert_tokens_to_ids([first, last])
    ds = IndexedDataset(prefix)
    assert len(ds) == len(texts) == 99
    for i, text in enumerate(texts):
        doc = ds[i].tolist()
        assert (doc[0], doc[-1]) == (cls_id, sep_id)
        assert doc[1:-1] == tokenizer(text, add_special_tokens=False).input_ids
        assert doc == tokenizer(text).input_ids  # exactly what the model saw in pre-training


def test_encoder_framing_is_recorded_and_read_back(encoder_dev):
    from megadistill.data.framing import Framing
    from megadistill.data.indexed import open_checked_datasets, read_framing

    tokenizer, prefix, meta, _, (first, last) = encoder_dev
    cls_id, sep_id = tokenizer.convert_tokens_to_ids([first, last])
    assert meta["framing"] == {"kind": "encoder", "prefix_ids": [cls_id], "suffix_ids": [sep_id]}
    assert read_provenance(prefix)["framing"] == meta["framing"]
    assert read_framing(prefix) == Framing("encoder", (cls_id,), (sep_id,)) == read_framing(IndexedDataset(prefix))
    assert meta["eos_id"] == tokenizer.eos_token_id and meta["tokens"] == IndexedDataset(prefix).num_tokens
    assert len(open_checked_datasets([prefix], tokenizer, framing_kind="encoder")) == 1
    with pytest.raises(ValueError, match="framed for encoder models .* needs decoder framing"):
        open_checked_datasets([prefix], tokenizer, framing_kind="decoder")


def test_masking_never_selects_framing_tokens(encoder_dev):
    """Packed windows of an encoder dataset, every maskable token selected: [CLS]/[SEP] stay as they are."""
    import numpy as np
    import torch

    from megadistill.data.masking import IGNORE_INDEX, MaskingConfig, MlmCollator
    from megadistill.data.packing import PackedDataset

    tokenizer, prefix, meta, _, _ = encoder_dev
    frame_ids = meta["framing"]["prefix_ids"] + meta["framing"]["suffix_ids"]
    packed = PackedDataset([IndexedDataset(prefix)], seq_len_tokens=64, seed=0)
    windows = [packed[i] for i in range(8)]  # 65 tokens each, documents cut anywhere
    collate = MlmCollator.from_tokenizer(tokenizer, MaskingConfig(mask_prob=1.0))
    batch = collate(windows, torch.Generator().manual_seed(0))
    original = torch.from_numpy(np.stack(windows).astype(np.int64))
    framed = torch.isin(original, torch.tensor(frame_ids))
    assert framed.any()  # the windows do hold framing ids
    assert (batch["labels"][framed] == IGNORE_INDEX).all() and not batch["mlm_mask"][framed].any()
    assert torch.equal(batch["teacher_input_ids"][framed], original[framed])
    assert batch["mlm_mask"][~torch.isin(original, torch.tensor(tokenizer.all_special_ids))].all()  # the rest was


def test_decoder_framing_is_recorded(hin_dev):
    from megadistill.data.framing import Framing
    from megadistill.data.indexed import read_framing

    prefix, meta, _ = hin_dev
    assert meta["framing"] == {"kind": "decoder", "prefix_ids": [2], "suffix_ids": [1]}
    assert read_framing(prefix) == Framing("decoder", (2,), (1,))


def _wordpiece_backend(post_processor=None):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<eos>", "a", "b", "##b"])}
    backend = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if post_processor is not None:
        backend.post_processor = post_processor
    return backend


@pytest.mark.parametrize("case,expected", [
    # No post-processor, but a masked-LM vocabulary: framed [CLS] ... [SEP] by hand.
    ("bare_mlm", ("encoder", (2,), (3,))),
    # A decoder whose post-processor already appends EOS: no second EOS.
    ("eos_appending", ("decoder", (), (5,))),
    # A decoder that adds nothing (Qwen style): text, then EOS.
    ("no_bos", ("decoder", (), (5,))),
])
def test_framing_for_tokenizer_cases(case, expected):
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from megadistill.data.framing import Framing, framing_for_tokenizer

    specials = dict(unk_token="[UNK]", pad_token="[PAD]")
    if case == "bare_mlm":
        tok = PreTrainedTokenizerFast(tokenizer_object=_wordpiece_backend(), cls_token="[CLS]", sep_token="[SEP]",
                                      mask_token="[MASK]", **specials)
    elif case == "eos_appending":
        post = processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", 5)])
        tok = PreTrainedTokenizerFast(tokenizer_object=_wordpiece_backend(post), eos_token="<eos>", **specials)
    else:
        tok = PreTrainedTokenizerFast(tokenizer_object=_wordpiece_backend(), eos_token="<eos>", **specials)
    assert framing_for_tokenizer(tok) == Framing(*expected)


def test_framing_for_tokenizer_refusals():
    from transformers import PreTrainedTokenizerFast

    from megadistill.data.framing import framing_for_tokenizer

    no_separator = PreTrainedTokenizerFast(tokenizer_object=_wordpiece_backend(), unk_token="[UNK]")
    with pytest.raises(ValueError, match="no EOS token .*nor SEP"):
        framing_for_tokenizer(no_separator)
    sep_unused = PreTrainedTokenizerFast(tokenizer_object=_wordpiece_backend(), unk_token="[UNK]", sep_token="[SEP]")
    with pytest.raises(ValueError, match="no EOS token and does not frame sequences"):
        framing_for_tokenizer(sep_unused)


def test_cli_binarizes_with_an_encoder_tokenizer(tmp_path, bert_tokenizer, sib200_dir, capsys):
    pytest.importorskip("megadistill.models.teacher")
    bert_tokenizer.save_pretrained(tmp_path / "bert")  # tokenizer files only: load_tokenizer accepts such a directory
    prefix = tmp_path / "hin_Deva"
    code = binarize_tool.main(["--input", str(sib200_dir / "hin_Deva" / "dev.tsv"), "--tokenizer", str(tmp_path / "bert"),
                               "--output-prefix", str(prefix), "--no-progress", "--workers", "1"])
    out = capsys.readouterr().out
    assert code == 0 and "99 documents" in out and "encoder framing [2] text [3]" in out
    check_tokenizer_matches(prefix, bert_tokenizer)
    from conftest import read_sib200_texts

    first = unicodedata.normalize("NFC", read_sib200_texts(sib200_dir, "hin_Deva", "dev")[0])
    assert IndexedDataset(prefix)[0].tolist() == bert_tokenizer(first).input_ids


# --- literal special-token text, progress and throughput, option checks ------------------------

LITERALS = "hello <eos> world <bos> x <pad> y\n\na </s> b <s> c <mask>\n\n[SEP] d [CLS] e [MASK] f <unk>\n"


@pytest.mark.parametrize("name", ["tiny_tokenizer", "bert_tokenizer", "xlmr_tokenizer"])
def test_literal_special_tokens_are_text_not_control_ids(name, request, tmp_path):
    """A document saying "<eos>" holds no EOS id inside it; a tokenizer that cannot do that gets it counted."""
    from megadistill.data.framing import control_ids

    tokenizer = request.getfixturevalue(name)
    split_before = tokenizer.backend_tokenizer.encode_special_tokens
    corpus = tmp_path / "x.txt"
    corpus.write_text(LITERALS, encoding="utf-8")
    meta = binarize([corpus], tokenizer, tmp_path / "x", show_progress=False)
    frame = meta["framing"]
    controls = control_ids(tokenizer)
    ds = IndexedDataset(tmp_path / "x")
    inside = [[i for i in ds[d].tolist()[len(frame["prefix_ids"]):-len(frame["suffix_ids"])] if i in controls]
              for d in range(len(ds))]
    special = meta["special_tokens_in_text"]
    assert special["count"] == sum(map(len, inside))  # whatever the tokenizer does, it is counted exactly
    assert special["documents"] == sum(map(bool, inside))
    assert tokenizer.backend_tokenizer.encode_special_tokens == split_before  # the caller's tokenizer is untouched
    if name == "xlmr_tokenizer":  # its Unigram vocabulary holds "<s>", "</s>", ... as pieces: not encodable as text
        assert special["count"] > 0 and not special["literal_kept_as_text"]
        assert special["examples"][0] == f"{corpus}:1"
        assert f"{special['count']:,} control ids from literal special-token text" in binarize_tool.summary(meta, tmp_path / "x")
        return
    assert special == {"count": 0, "documents": 0, "examples": [], "literal_kept_as_text": True}
    assert inside == [[], [], []]
    if tokenizer.eos_token_id is not None:
        assert tokenizer.eos_token_id not in ds[0].tolist()[len(frame["prefix_ids"]):-len(frame["suffix_ids"])]
    first = LITERALS.split("\n\n")[0]
    assert ds[0].tolist() == (frame["prefix_ids"] + tokenizer(first, add_special_tokens=False, split_special_tokens=True)
                              .input_ids + frame["suffix_ids"])


def test_progress_bar_counts_input_bytes_and_shares_the_summary_rate(hin_dev, sib200_dir, tiny_tokenizer, tmp_path,
                                                                     monkeypatch):
    import megadistill.data.binarize as binarize_module

    bars = []

    class Recorder(binarize_module.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.kwargs, self.postfixes = kwargs, []
            bars.append(self)

        def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
            self.postfixes.append(dict(ordered_dict or {}, **kwargs))
            super().set_postfix(ordered_dict, refresh, **kwargs)

    monkeypatch.setattr(binarize_module, "tqdm", Recorder)
    dev = sib200_dir / "hin_Deva" / "dev.tsv"
    prefix = tmp_path / "hin_Deva"
    meta = binarize([dev], tiny_tokenizer, prefix, BinarizeOptions(block_bytes=4096))  # the bar on (stderr is captured)
    (bar,) = bars
    assert bar.kwargs["total"] == dev.stat().st_size and bar.kwargs["unit"] == "B" and bar.kwargs["unit_scale"]
    assert bar.n == bar.total  # 100% at the end, so the ETA was meaningful
    assert meta.tokens_per_second == meta["tokens"] / meta.seconds
    last = bar.postfixes[-1]
    assert last["tokens"] == f"{meta['tokens']:,}" and last["tok/s"] == f"{meta.tokens_per_second:,.0f}"
    assert f"({last['tok/s']} tokens/s)" in binarize_tool.summary(meta, prefix)  # one number, one window
    assert read_provenance(prefix) == meta and "tokens/s" not in binarize_tool.summary(read_provenance(prefix), prefix)
    compressed = tmp_path / "hin_Deva.txt.gz"
    import gzip

    compressed.write_bytes(gzip.compress(b"one\n\ntwo\n"))
    binarize([compressed], tiny_tokenizer, tmp_path / "gz", show_progress=False)
    assert bars[-1].kwargs["total"] is None  # its decompressed size is not known up front: no total, no ETA


@pytest.mark.parametrize("flag,value", [("--workers", "0"), ("--workers", "-2"), ("--processes", "-1"),
                                        ("--block-bytes", "0")])
def test_cli_rejects_bad_counts_in_one_line(flag, value, capsys):
    with pytest.raises(SystemExit) as caught:
        binarize_tool.parse_args(["--input", "x.txt", "--tokenizer", "t", "--output-prefix", "o", flag, value])
    err = capsys.readouterr().err
    assert caught.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"binarize: error: argument {flag}: must be >= ") and f"got {value}" in err


@pytest.mark.parametrize("field,value", [("threads_per_process", 0), ("processes", -1), ("block_bytes", 0),
                                         ("max_line_bytes", -5), ("rows_per_block", 1.5)])
def test_options_name_the_bad_field(field, value, tmp_path, tiny_tokenizer):
    with pytest.raises(ValueError, match=rf"BinarizeOptions\.{field} must be an integer >= \d, got {value}"):
        binarize([tmp_path / "x.txt"], tiny_tokenizer, tmp_path / "x", BinarizeOptions(**{field: value}),
                 show_progress=False)
