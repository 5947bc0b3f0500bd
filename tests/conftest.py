"""Shared test fixtures: the SIB-200 data directory and a tiny Gemma-like BPE tokenizer.

The SIB-200 copy lives outside the project (``../shared/data/sib200`` beside the
checkout); set ``MEGADISTILL_SIB200`` to point elsewhere.
"""

from __future__ import annotations

import contextlib
import csv
import os
import subprocess
from pathlib import Path

import pytest

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>"]
BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a rendezvous of spawned or launched ranks)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_sib200() -> Path:
    """Return the SIB-200 directory, or raise ``FileNotFoundError`` saying how to fix it."""
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "sib200"
    path = Path(os.environ.get("MEGADISTILL_SIB200", default))
    if not (path / "hin_Deva" / "train.tsv").is_file():
        raise FileNotFoundError(
            f"SIB-200 data not found at {path}: put ../shared/data/sib200 beside the checkout "
            "or set MEGADISTILL_SIB200=/path/to/sib200"
        )
    return path


@pytest.fixture(scope="session")
def sib200_dir() -> Path:
    """Path of the SIB-200 directory (``<lang>_<Script>/{train,dev,test}.tsv``)."""
    return find_sib200()


def read_sib200_texts(sib200: Path, lang: str = "hin_Deva", split: str = "train") -> list[str]:
    """The ``text`` column of one SIB-200 split, in file order."""
    with open(sib200 / lang / f"{split}.tsv", encoding="utf-8", newline="") as f:
        return [row["text"] for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


def build_tiny_tokenizer(texts: list[str], vocab_size: int = 700):
    """A Gemma-like BPE tokenizer (byte fallback, ``▁`` for spaces, BOS prepended).

    Ids: 0 ``<pad>``, 1 ``<eos>``, 2 ``<bos>``, 3 ``<unk>``, 4..259 byte tokens, then merges.
    Returns a ``transformers.PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS + BYTE_TOKENS)
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split("▁", "merged_with_next")
    tok.train_from_iterator(texts, trainer)
    vocab = tok.get_vocab()
    merges = [tuple(m) for m in __import__("json").loads(tok.to_str())["model"]["merges"]]
    # Rebuild so that byte tokens are ordinary vocabulary entries, as in Gemma's tokenizer.json.
    final = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    final.normalizer = tok.normalizer
    final.pre_tokenizer = tok.pre_tokenizer
    final.add_special_tokens(SPECIAL_TOKENS)
    final.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    final.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=final, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def save_tiny_gemma_teacher(directory: Path, tokenizer) -> Path:
    """Save a 4-layer Gemma 3 teacher (hidden 64, seed 0) with ``tokenizer`` into ``directory`` (for launcher runs)."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=32,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        bos_token_id=2, eos_token_id=1, pad_token_id=0,
    )
    Gemma3ForCausalLM(cfg).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_tokenizer(sib200_dir):
    """Tiny BPE tokenizer trained on SIB-200 Hindi + English train text (about 700 ids)."""
    texts = read_sib200_texts(sib200_dir, "hin_Deva") + read_sib200_texts(sib200_dir, "eng_Latn")
    return build_tiny_tokenizer(texts)


BERT_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # ids 0..4
XLMR_SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # ids 0..4 (XLM-R's order, <mask> moved up)


def build_bert_tokenizer(texts: list[str], vocab_size: int = 800, directory: Path | None = None):
    """A BERT-style WordPiece tokenizer (``[CLS] text [SEP]``) from a ``vocab.txt`` written for ``texts``.

    Vocabulary: ids 0..4 ``[PAD] [UNK] [CLS] [SEP] [MASK]``, then every non-space character of
    the texts and its ``##`` continuation (so no word of the texts becomes ``[UNK]``), then the
    most frequent longer words (BERT pre-tokenization) up to ``vocab_size``. Case and accents are
    kept (lower-casing with accent stripping would drop Indic vowel signs). ``vocab.txt`` goes to
    ``directory`` (a temporary folder when None). Returns a ``transformers.BertTokenizerFast``.
    """
    import collections
    import tempfile

    from tokenizers import pre_tokenizers
    from transformers import BertTokenizerFast

    chars = sorted({c for text in texts for c in text if not c.isspace()})
    vocab = BERT_SPECIAL_TOKENS + chars + [f"##{c}" for c in chars]
    split = pre_tokenizers.BertPreTokenizer().pre_tokenize_str
    words = collections.Counter(word for text in texts for word, _ in split(text) if len(word) > 1)
    vocab += [word for word, _ in words.most_common(max(vocab_size - len(vocab), 0))]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(directory or tmp) / "vocab.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(vocab) + "\n", encoding="utf-8")
        return BertTokenizerFast(vocab=str(path), do_lower_case=False, strip_accents=False)


def build_xlmr_tokenizer(texts: list[str], vocab_size: int = 800):
    """An XLM-R-style Unigram tokenizer (``<s> text </s>``, ``▁`` word starts) trained on ``texts``.

    Ids 0..4 ``<s> <pad> </s> <unk> <mask>``; bos = cls = ``<s>``, eos = sep = ``</s>``; the
    post-processor is the TemplateProcessing ``<s> $A </s>`` of ``XLMRobertaTokenizerFast``.
    Characters absent from ``texts`` become ``<unk>``. Returns a ``transformers.XLMRobertaTokenizerFast``.
    """
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import XLMRobertaTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    tok.train_from_iterator(texts, trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=XLMR_SPECIAL_TOKENS,
                                                           unk_token="<unk>"))
    vocab = [tuple(entry) for entry in json.loads(tok.to_str())["model"]["vocab"]]
    return XLMRobertaTokenizerFast(vocab=vocab)  # its own pre-tokenizer and post-processor, as in XLM-R


@pytest.fixture(scope="session")
def bert_tokenizer(sib200_dir, tmp_path_factory):
    """BERT-style WordPiece tokenizer (800 ids) for SIB-200 Hindi + English train text; encoder framing."""
    texts = read_sib200_texts(sib200_dir, "hin_Deva") + read_sib200_texts(sib200_dir, "eng_Latn")
    return build_bert_tokenizer(texts, directory=tmp_path_factory.mktemp("bert_vocab"))


@pytest.fixture(scope="session")
def xlmr_tokenizer(sib200_dir):
    """XLM-R-style Unigram tokenizer (800 ids) trained on 300 Hindi + 300 English SIB-200 train sentences."""
    texts = read_sib200_texts(sib200_dir, "hin_Deva")[:300] + read_sib200_texts(sib200_dir, "eng_Latn")[:300]
    return build_xlmr_tokenizer(texts)


@pytest.fixture(scope="session")
def cache_workspace(tmp_path_factory, tiny_tokenizer, sib200_dir):
    """A tiny Llama teacher directory (peaked predictions) and binarized Hindi dev text, for the teacher-cache tests."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from megadistill.data.binarize import binarize

    root = tmp_path_factory.mktemp("cache")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)  # peaked predictions, so top-p keeps a varying number of entries
    model.save_pretrained(root / "teacher")
    tiny_tokenizer.save_pretrained(root / "teacher")
    tok = AutoTokenizer.from_pretrained(root / "teacher")
    texts = sib200_dir / "hin_Deva" / "dev.tsv"  # 99 sentences: a few dozen windows of 16 tokens
    binarize([texts], tok, root / "data" / "hin", show_progress=False)
    return root


@pytest.fixture
def single_process(monkeypatch):
    """Environment of a one-process job, restored afterwards (the tool runs in this process)."""
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1").items():
        monkeypatch.setenv(key, value)


@contextlib.contextmanager
def small_tmpfs(path: Path, size: int | str):
    """Mount a tmpfs of ``size`` (bytes, or mount syntax such as ``"256k"``) on ``path`` for the block.

    Yields True when mounted (tests run as root in CI), False where mounting is not permitted: the
    caller then injects the same fault (a patched write raising ENOSPC) instead of skipping.
    """
    path.mkdir(parents=True, exist_ok=True)
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                 capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        mounted = False
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def remount_tmpfs(path: Path, options: str) -> None:
    """Remount the tmpfs at ``path`` with ``options`` (``size=8m``, ``ro``)."""
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True, capture_output=True, timeout=30)


def load_tool(name: str):
    """Import ``tools/<name>.py`` by file path as module ``tools_<name>`` (works under bare ``pytest`` too)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(f"tools_{name}", Path(__file__).resolve().parents[1] / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
