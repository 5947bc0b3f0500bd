"""Sample continuations from a causal LM: the on-policy sampler, and the writer of sequence-level KD datasets.

Sequence-level KD (Kim and Rush 2016, arXiv:1606.07947) trains the student on the teacher's own
outputs rather than on the corpus: :func:`generate_dataset` takes the first ``prompt_tokens`` ids of
corpus documents, lets the teacher continue each, and writes ``prompt + continuation + EOS`` as an
indexed dataset with the tokenizer, framing and language of its source, so a training run reads it
like any binarized corpus (``data.train_prefixes``). On-policy KD (GKD, Agarwal et al. 2024,
arXiv:2306.13649) samples from the student while it trains (:mod:`megadistill.onpolicy`); both use
:func:`sample_continuations`, which samples from the model's own distribution (temperature and top-p
only: any repetition penalty or top-k in the checkpoint's ``generation_config`` is switched off).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from megadistill import __version__
from megadistill.data.framing import Framing
from megadistill.data.indexed import (IndexedDataset, IndexedDatasetWriter, open_checked_datasets, provenance_header,
                                      read_framing, read_provenance, token_dtype_for_vocab, write_provenance)
from megadistill.data.inspect import resolve_dataset
from megadistill.files import fsync_directory
from megadistill.models.teacher import state_dict_sha256

logger = logging.getLogger(__name__)

_SUFFIXES = (".bin", ".idx", ".json")  # one dataset, in commit order (.json last)

# generate() fills every option the caller leaves unset from the checkpoint's generation_config.json
# (Gemma ships top_k=64, others a repetition penalty). KD needs samples of the model's distribution,
# changed only by temperature and top-p, so everything else that reshapes it is set to its no-op.
_PLAIN_SAMPLING: dict[str, Any] = {
    "num_beams": 1, "num_return_sequences": 1, "top_k": 0, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
    "min_length": 0, "min_new_tokens": None, "typical_p": 1.0, "min_p": None, "top_h": None, "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0, "bad_words_ids": None, "sequence_bias": None, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "begin_suppress_tokens": None, "exponential_decay_length_penalty": None,
    "renormalize_logits": False, "return_dict_in_generate": False,
}


@dataclass(frozen=True)
class SamplingConfig:
    """How continuations are sampled.

    Attributes:
        max_new_tokens: most tokens sampled after each prompt (tokens, >= 1).
        temperature: softmax temperature of the sampling distribution (>= 0); 0 means greedy (argmax).
        top_p: nucleus sampling: sample from the smallest set of ids holding this probability mass
            (0 < top_p <= 1; 1 keeps the whole vocabulary). Ignored when greedy.
        seed: base seed of the sampling RNG (0 <= seed < 2**63); the same seed gives the same samples.
    Raises:
        ValueError: a field of the wrong type or out of range (the message names the field).
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 1234

    def __post_init__(self) -> None:
        _check_int("SamplingConfig.max_new_tokens", self.max_new_tokens, 1)
        _check_int("SamplingConfig.seed", self.seed, 0)
        if self.seed >= 2 ** 63:
            raise ValueError(f"SamplingConfig.seed must be < 2**63, got {self.seed}")
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"SamplingConfig.temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingConfig.top_p must be a number in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        """True when ``temperature == 0``: every step takes the most probable id."""
        return self.temperature == 0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(name: str, value: Any, low: int) -> None:
    """ValueError naming ``name`` unless ``value`` is an int (not a bool) >= ``low``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


@dataclass
class Samples:
    """Prompts with their sampled continuations.

    Attributes:
        sequences: int64 ``[B, P + N]``: the ``P`` prompt ids, then the sampled ids, then ``pad_token_id``
            after a row's first EOS (``N = max_new_tokens``).
        generated: bool ``[B, P + N]``: True at the sampled positions, from ``P`` up to and including the
            first EOS (up to ``P + N - 1`` for a row cut at ``max_new_tokens``); False on the prompt and the padding.
    """

    sequences: torch.Tensor
    generated: torch.Tensor

    @property
    def generated_tokens(self) -> torch.Tensor:
        """int64 ``[B]``: sampled tokens per row (its EOS included)."""
        return self.generated.sum(dim=1)

    @property
    def lengths(self) -> torch.Tensor:
        """int64 ``[B]``: prompt plus sampled tokens per row (the position after the last sampled token)."""
        positions = torch.arange(1, self.generated.shape[1] + 1, device=self.generated.device)
        return (self.generated * positions).amax(dim=1)


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed the CPU generator and ``device``'s for the block; restore both after (the caller's stream goes on)."""
    if device.type != "cuda":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # with no CUDA device in use, only the CPU stream matters
            yield
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    with torch.random.fork_rng(devices=[index]), torch.cuda.device(index):
        torch.default_generator.manual_seed(seed)
        torch.cuda.manual_seed(seed)  # this device only, unlike torch.manual_seed
        yield


def sample_continuations(model: torch.nn.Module, prompt_ids: torch.Tensor, sampling: SamplingConfig, *,
                         eos_token_id: int, pad_token_id: int, seed: int, synced_gpus: bool = False,
                         vocab_size: int | None = None) -> Samples:
    """Sample a continuation of every prompt with Hugging Face ``model.generate`` (batched, KV cache on).

    Sampling draws from ``softmax(logits / temperature)`` restricted to the top-p nucleus (no top-k:
    see the module docstring); ``temperature == 0`` is greedy. It runs under ``torch.no_grad`` in eval
    mode (a model that was training is put back in train mode) with the RNG seeded by ``seed`` inside
    ``torch.random.fork_rng``: the same model, prompts and seed give the same samples, and the caller's
    RNG state is as before. Samples depend on the batch (rows share the RNG stream). Used for GKD's
    on-policy batches (Agarwal et al. 2024, arXiv:2306.13649) and sequence-level KD data (Kim and Rush
    2016, arXiv:1606.07947).

    Args:
        model: a causal LM with ``generate`` (``*ForCausalLM``), on any device; the prompts are moved there.
        prompt_ids: int64 ``[B, P]``, every row ``P >= 1`` real tokens (no padding).
        sampling: :class:`SamplingConfig` (its ``seed`` is not used here: pass ``seed``).
        eos_token_id: id that ends a continuation.
        pad_token_id: id written after a row's EOS.
        seed: RNG seed of this call (0 <= seed < 2**63), e.g. derived from ``sampling.seed`` and the batch.
        synced_gpus: keep stepping until every rank finished (ZeRO-3: each forward gathers parameters
            collectively, so a rank that stopped early would hang the others); needs ``torch.distributed``.
        vocab_size: ids ``>= vocab_size`` are never sampled (padded output rows beyond the tokenizer's
            vocabulary); None samples from every output row.
    Returns:
        :class:`Samples` on the model's device, ``[B, P + max_new_tokens]`` exactly.
    Raises:
        ValueError: ``prompt_ids`` not a 2-D integer tensor with at least one column and row, or
            ``vocab_size`` < 1.
    """
    if prompt_ids.ndim != 2 or prompt_ids.shape[0] < 1 or prompt_ids.shape[1] < 1 or prompt_ids.is_floating_point():
        raise ValueError(f"prompt_ids must be an integer tensor [B, P] with B, P >= 1, got {prompt_ids.dtype} "
                         f"{tuple(prompt_ids.shape)}")
    _check_int("seed", seed, 0)
    device = next(model.parameters()).device
    prompts = prompt_ids.to(device=device, dtype=torch.long)
    kwargs = _generate_kwargs(model, sampling, eos_token_id, pad_token_id, synced_gpus, vocab_size)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _seeded(seed, device):
            out = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), **kwargs)
    finally:
        model.train(was_training)
    return _samples(out, prompts.shape[1], sampling.max_new_tokens, eos_token_id, pad_token_id)


def _generate_kwargs(model, sampling: SamplingConfig, eos: int, pad: int, synced_gpus: bool,
                     vocab_size: int | None) -> dict[str, Any]:
    """Keyword arguments of ``model.generate`` for ``sampling`` (the options this transformers version knows)."""
    from transformers import GenerationConfig

    known = GenerationConfig()
    kwargs = {key: value for key, value in _PLAIN_SAMPLING.items() if hasattr(known, key)}
    kwargs.update(do_sample=not sampling.greedy, max_new_tokens=sampling.max_new_tokens, eos_token_id=eos,
                  pad_token_id=pad, use_cache=True, synced_gpus=synced_gpus, suppress_tokens=None)
    if sampling.greedy:  # the neutral values, so generate does not warn about sampling flags it ignores
        kwargs.update(temperature=1.0, top_p=1.0)
        kwargs.pop("top_k", None)
    else:
        kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p)
    if vocab_size is not None:
        _check_int("vocab_size", vocab_size, 1)
        rows = model.config.get_text_config().vocab_size
        if rows > vocab_size:
            kwargs["suppress_tokens"] = list(range(vocab_size, rows))
    return kwargs


def _samples(out: torch.Tensor, prompt_len: int, max_new: int, eos: int, pad: int) -> Samples:
    """``generate``'s output padded to ``[B, P + max_new]`` and its mask of sampled tokens."""
    assert out.shape[1] <= prompt_len + max_new, (out.shape, prompt_len, max_new)
    sequences = out.new_full((out.shape[0], prompt_len + max_new), pad)
    sequences[:, :out.shape[1]] = out
    is_eos = (sequences[:, prompt_len:] == eos).long()
    before_first_eos = (is_eos.cumsum(dim=1) - is_eos) == 0  # no EOS strictly before: the first EOS included
    # generate stops early only once every row ended, so the columns it did not return lie past an EOS.
    generated = torch.zeros_like(sequences, dtype=torch.bool)
    generated[:, prompt_len:] = before_first_eos
    return Samples(sequences=sequences, generated=generated)


def check_output(output_prefix: str | Path, overwrite: bool = False) -> Path:
    """The output prefix, after refusing one that holds a dataset (unless ``overwrite``).

    Raises:
        FileExistsError: ``<prefix>.bin``/``.idx``/``.json`` exists and ``overwrite`` is False (names the file).
    """
    prefix = Path(output_prefix)
    existing = [Path(f"{prefix}{s}") for s in _SUFFIXES if os.path.lexists(f"{prefix}{s}")]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists: choose another output prefix, or overwrite it "
                              "(overwrite=True, --overwrite)")
    return prefix


@dataclass
class _Prompts:
    """The prompts taken from the sources and how many documents each gave or was too short."""

    ids: np.ndarray  # int64 [n, prompt_tokens]
    taken: list[int]
    skipped: list[int]


def _collect_prompts(datasets: Sequence[IndexedDataset], prompt_tokens: int, num_prompts: int | None) -> _Prompts:
    """The first ``prompt_tokens`` ids of the first documents longer than ``prompt_tokens``, sources in order."""
    rows: list[np.ndarray] = []
    taken, skipped = [0] * len(datasets), [0] * len(datasets)
    need = num_prompts if num_prompts is not None else sum(len(ds) for ds in datasets)
    for k, ds in enumerate(datasets):
        room = need - len(rows)
        if room <= 0:
            break
        docs = np.flatnonzero(ds.sizes > prompt_tokens)[:room]
        examined = int(docs[-1]) + 1 if len(docs) == room else len(ds)  # documents looked at, short ones included
        rows += [ds.get(int(i), 0, prompt_tokens) for i in docs]
        taken[k], skipped[k] = len(docs), examined - len(docs)
    ids = np.stack(rows).astype(np.int64) if rows else np.zeros((0, prompt_tokens), np.int64)
    return _Prompts(ids, taken, skipped)


def _batch_seed(seed: int, batch: int) -> int:
    """Seed of batch ``batch`` (0 <= result < 2**63), mixed from the base seed so batches draw independent streams."""
    return int(np.random.SeedSequence([seed, batch]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def _documents(samples: Samples, prompt_len: int, eos: int, suffix: tuple[int, ...]) -> tuple[list[np.ndarray], int, int]:
    """``(documents, sampled tokens, rows cut at max_new_tokens)`` of a batch: prompt + continuation + ``suffix``.

    A continuation that ended with EOS loses it before ``suffix`` (which ends with EOS) is added,
    so every document carries the source's decoder frame.
    """
    sequences = samples.sequences.cpu().numpy()
    counts = samples.generated_tokens.cpu().tolist()
    docs, cut = [], 0
    for row, n in zip(sequences, counts):
        continuation = row[prompt_len:prompt_len + n]
        if n and continuation[-1] == eos:
            continuation = continuation[:-1]
        else:
            cut += 1
        docs.append(np.concatenate([row[:prompt_len], continuation, np.asarray(suffix, dtype=row.dtype)]))
    return docs, sum(counts), cut


def generate_dataset(model: torch.nn.Module, tokenizer: Any, source_prefixes: Sequence[str | Path],
                     output_prefix: str | Path, *, prompt_tokens: int, num_prompts: int | None, batch_size: int,
                     sampling: SamplingConfig, model_name: str, progress: bool = True,
                     overwrite: bool = False) -> dict[str, Any]:
    """Write a sequence-level KD dataset (Kim and Rush 2016, arXiv:1606.07947): corpus prompts continued by ``model``.

    Prompts are the first ``prompt_tokens`` ids of the first ``num_prompts`` documents of the sources
    (in order) that are longer than ``prompt_tokens`` (shorter ones are skipped and counted). Each
    prompt batch is sampled with :func:`sample_continuations` (seed mixed from ``sampling.seed`` and
    the batch index; ids beyond ``len(tokenizer)`` never sampled). Each output document is
    ``prompt + continuation + EOS``: a continuation cut at ``max_new_tokens`` gets the EOS appended (and
    is counted), so documents carry the source's decoder frame (BOS first when the source has it)
    and pass the checks a training run makes (:func:`~megadistill.data.indexed.open_checked_datasets`).
    ``<output_prefix>.bin/.idx/.json`` are written in a hidden temporary directory beside the output
    and renamed into place (``.json`` last) only when complete: an error or an interruption leaves
    no file behind and a previous output unchanged.

    Args:
        model: the causal LM to sample (the teacher), on any device, in the dtype to sample in.
        tokenizer: the tokenizer the sources were binarized with (checked against their provenance hash).
        source_prefixes: binarized decoder datasets (a ``.bin``/``.idx``/``.json`` suffix is dropped).
        output_prefix: where to write; its parent is created.
        prompt_tokens: ids per prompt (>= 1), the frame's BOS included.
        num_prompts: how many prompts (>= 1); None takes every long enough document. Fewer are used
            when the sources run out (logged).
        batch_size: prompts per ``generate`` call (>= 1).
        sampling: :class:`SamplingConfig`.
        model_name: recorded in the provenance (the model spec given to the tool).
        progress: tqdm bar on stderr over prompts, with sampled tokens per second.
        overwrite: replace an existing dataset at ``output_prefix``.
    Returns:
        The provenance dict written to ``<output_prefix>.json``: the source's header (tokenizer, ids,
        framing, language, script), ``sources``, ``documents``, ``tokens``, ``characters`` and
        ``bytes_utf8`` (of the decoded documents, special tokens skipped), ``dtype``, ``dropped``
        (``prompt_too_short``), and ``generation``: ``model``, ``model_sha256``
        (:func:`state_dict_sha256`), ``sampling``, ``prompt_tokens``, ``source`` (per source: prefix,
        SHA-256 of its ``.json``, its documents and tokens, prompts taken and documents skipped),
        ``documents``, ``prompts_skipped``, ``cut_at_max_new_tokens``, ``tokens``, ``generated_tokens``
        (sampled ids, EOS included, appended EOS not) and ``seconds`` (sampling time).
    Raises:
        ValueError: a count below its minimum (names the argument), no source, the output among the
            sources, no document longer than ``prompt_tokens``, sources of encoder framing, another
            tokenizer or inconsistent provenance (:func:`~megadistill.data.indexed.open_checked_datasets`),
            a tokenizer whose EOS is not the frame's last id.
        FileNotFoundError: a source's ``.bin``/``.idx``/``.json`` is missing.
        FileExistsError: the output exists and ``overwrite`` is False (:func:`check_output`).
    """
    _check_int("prompt_tokens", prompt_tokens, 1)
    _check_int("batch_size", batch_size, 1)
    if num_prompts is not None:
        _check_int("num_prompts", num_prompts, 1)
    if not source_prefixes:
        raise ValueError("generate_dataset needs at least one source dataset")
    output_prefix = check_output(output_prefix, overwrite)
    prefixes = [resolve_dataset(p, f"source {i}") for i, p in enumerate(source_prefixes)]
    if output_prefix.resolve() in {p.resolve() for p in prefixes}:
        raise ValueError(f"output {output_prefix} is also a source; choose another output prefix")
    datasets = open_checked_datasets(prefixes, tokenizer, "decoder")
    framing = read_framing(prefixes[0])
    eos = _frame_eos(tokenizer, framing, prefixes[0])
    prompts = _collect_prompts(datasets, prompt_tokens, num_prompts)
    if not len(prompts.ids):
        raise ValueError(f"no document of {', '.join(map(str, prefixes))} is longer than prompt_tokens={prompt_tokens}")
    if num_prompts is not None and len(prompts.ids) < num_prompts:
        logger.warning("only %d of %d prompts: the sources have no more documents longer than %d tokens",
                       len(prompts.ids), num_prompts, prompt_tokens)
    output_prefix.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_prefix.name}.", suffix=".tmp", dir=output_prefix.parent))
    try:
        staged = staging / output_prefix.name
        run = _write_generations(model, tokenizer, prompts.ids, staged, batch_size, sampling, eos, framing, progress)
        meta = _provenance(tokenizer, framing, prefixes, prompts, run, sampling, model, model_name, prompt_tokens)
        write_provenance(staged, meta)
        _commit(staged, output_prefix, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("wrote %s: %d documents, %d tokens (%d sampled in %.1f s)", output_prefix, meta["documents"],
                meta["tokens"], run["generated_tokens"], run["seconds"])
    return meta


def _frame_eos(tokenizer: Any, framing: Framing, prefix: Path) -> int:
    """The tokenizer's EOS, which must close the sources' decoder frame; ValueError otherwise."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None or not framing.suffix_ids or framing.suffix_ids[-1] != eos:
        raise ValueError(f"{prefix}.json: documents end with {list(framing.suffix_ids)}, not with the tokenizer's EOS "
                         f"{eos}; generation stops at EOS, so the sources must be decoder data binarized with this tokenizer")
    return eos


def _write_generations(model, tokenizer, prompts: np.ndarray, staged: Path, batch_size: int, sampling: SamplingConfig,
                       eos: int, framing: Framing, progress: bool) -> dict[str, Any]:
    """Sample every prompt batch into a finalized ``staged.bin/.idx``; returns the counts and the sampling time."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    run = {"documents": 0, "tokens": 0, "generated_tokens": 0, "cut": 0, "characters": 0, "bytes_utf8": 0}
    start = time.perf_counter()
    with IndexedDatasetWriter(staged, token_dtype_for_vocab(len(tokenizer))) as writer, \
            tqdm(total=len(prompts), unit="prompt", desc=staged.name, file=sys.stderr, disable=not progress) as bar:
        for batch, first in enumerate(range(0, len(prompts), batch_size)):
            samples = sample_continuations(model, torch.from_numpy(prompts[first:first + batch_size]), sampling,
                                           eos_token_id=eos, pad_token_id=pad, seed=_batch_seed(sampling.seed, batch),
                                           vocab_size=len(tokenizer))
            docs, sampled, cut = _documents(samples, prompts.shape[1], eos, framing.suffix_ids)
            writer.add_documents(np.concatenate(docs), np.array([len(d) for d in docs]))
            texts = tokenizer.batch_decode([d.tolist() for d in docs], skip_special_tokens=True)
            run["documents"] += len(docs)
            run["tokens"] += sum(map(len, docs))
            run["generated_tokens"] += sampled
            run["cut"] += cut
            run["characters"] += sum(map(len, texts))
            run["bytes_utf8"] += sum(len(t.encode("utf-8")) for t in texts)
            bar.set_postfix({"tok/s": f"{run['generated_tokens'] / max(time.perf_counter() - start, 1e-9):,.0f}"},
                            refresh=False)
            bar.update(len(docs))
    run["seconds"] = time.perf_counter() - start
    return run


def _provenance(tokenizer, framing: Framing, prefixes: list[Path], prompts: _Prompts, run: dict, sampling: SamplingConfig,
                model, model_name: str, prompt_tokens: int) -> dict[str, Any]:
    """The output's provenance: the sources' header and language, the counts, and the ``generation`` record."""
    metas = [read_provenance(p) for p in prefixes]
    first = metas[0]
    same = {key: first.get(key) if all(m.get(key) == first.get(key) for m in metas) else None
            for key in ("language", "script", "romanization")}
    name = first["tokenizer"].get("name") if isinstance(first.get("tokenizer"), dict) else None
    header = provenance_header(tokenizer, name, framing, same["language"], same["script"])
    header["romanization"] = same["romanization"]
    skipped = sum(prompts.skipped)
    return {
        **header,
        "sources": [{"path": str(p), "format": "generated", "documents": n} for p, n in zip(prefixes, prompts.taken)],
        "documents": run["documents"],
        "tokens": run["tokens"],
        "characters": run["characters"],
        "bytes_utf8": run["bytes_utf8"],
        "dtype": token_dtype_for_vocab(len(tokenizer)).name,
        "dropped": {"prompt_too_short": skipped} if skipped else {},
        "generation": {
            "model": model_name,
            "model_sha256": state_dict_sha256(model),
            "sampling": asdict(sampling),
            "prompt_tokens": prompt_tokens,
            "source": [{"prefix": str(p), "json_sha256": hashlib.sha256(Path(f"{p}.json").read_bytes()).hexdigest(),
                        "documents": m.get("documents"), "tokens": m.get("tokens"), "prompts": n, "skipped": s}
                       for p, m, n, s in zip(prefixes, metas, prompts.taken, prompts.skipped)],
            "documents": run["documents"],
            "prompts_skipped": skipped,
            "cut_at_max_new_tokens": run["cut"],
            "tokens": run["tokens"],
            "generated_tokens": run["generated_tokens"],
            "seconds": round(run["seconds"], 3),
        },
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "megadistill_version": __version__,
    }


def _commit(staged: Path, final: Path, staging: Path) -> None:
    """Move the staged dataset to ``final``, all three files or none.

    A previous dataset there is moved aside first (its ``.json`` first, so no reader pairs an old
    provenance with new tokens) and put back if a rename fails; the new ``.json`` is renamed last.
    """
    aside = staging / "previous"
    aside.mkdir()
    moved, placed = [], []
    try:
        for suffix in reversed(_SUFFIXES):
            old = Path(f"{final}{suffix}")
            if os.path.lexists(old):
                os.replace(old, aside / old.name)
                moved.append(old)
        for suffix in _SUFFIXES:
            os.replace(Path(f"{staged}{suffix}"), Path(f"{final}{suffix}"))
            placed.append(Path(f"{final}{suffix}"))
        fsync_directory(final.parent)
    except BaseException:
        for path in placed:
            path.unlink(missing_ok=True)
        for path in moved:
            os.replace(aside / path.name, path)
        raise
