"""Importance of a trained model's layers, heads, MLP channels and hidden channels on a calibration set.

Which parts of a model to remove before healing it by distillation (``stage: post``) is decided by
scores measured here from forward passes alone (no gradients), as in Minitron (Muralidharan et al.
2024, "Compact Language Models via Pruning and Knowledge Distillation", arXiv:2407.14679):

* layers, two ways: block influence, ``1 - mean cos(layer input, layer output)`` over tokens (ShortGPT,
  Men et al. 2024, arXiv:2403.03853: a block that barely turns its input is nearly an identity), and
  skip loss, the increase of the cross-entropy when the block is replaced by the identity (Minitron's
  "LM loss" depth metric; negative when the model does better without it);
* query heads: mean L2 norm of each head's attention output (what the output projection reads);
* MLP channels: mean ``|activation|`` entering the down projection;
* hidden (embedding) channels: mean ``|x|`` of the normed residual stream entering attention and MLP.

Activations are hooked in one pass over the calibration batches; the skip losses take one more pass
per layer. Decoders are scored on next-token CE; masked-LM encoders on MLM CE at the 15% positions of a
fixed seeded mask (:func:`calibration_batches`), and their activation statistics see those masked inputs.
The result is an :class:`Importance`, saved as JSON (``format: megadistill-importance-1``), which
:mod:`megadistill.stages.post` reads to choose what :mod:`megadistill.models.prune` keeps.
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from megadistill.data.batches import ClmBatches, MlmBatches
from megadistill.data.collate import IGNORE_INDEX
from megadistill.data.indexed import open_checked_datasets, read_framing
from megadistill.data.masking import MaskingConfig, MlmCollator
from megadistill.data.packing import PackedDataset
from megadistill.files import atomic_write_text
from megadistill.losses.logits import auto_chunk_size_tokens
from megadistill.models.adapters import ModelAdapter, adapter_for
from megadistill.models.teacher import state_dict_sha256

__all__ = ["FORMAT", "CalibrationSet", "Importance", "calibration_batches", "compute_importance",
           "format_layer_table"]

FORMAT = "megadistill-importance-1"
"""``meta["format"]`` of every importance file this module writes and reads."""
LAYER_METRICS = ("cosine", "skip_loss")
BATCH_KEYS = ("input_ids", "labels", "document_ids", "position_ids", "attention_mask")


@dataclass
class Importance:
    """Importance scores of one model on one calibration set (higher = more important everywhere).

    Attributes:
        layer_cosine: per layer, ``1 - mean cos(input, output)`` over valid tokens (ShortGPT block influence), in [0, 2].
        layer_skip_loss: per layer, CE with that layer replaced by the identity minus :attr:`base_loss`, nats/token.
        base_loss: CE of the full model, nats/token (next token; masked LMs: masked positions).
        heads: ``[num_layers][num_heads]`` mean L2 norm of each query head's attention output.
        mlp: ``[num_layers][intermediate_size]`` mean ``|activation|`` at the input of the down projection.
        hidden: ``[hidden_size]`` mean ``|x|`` of the normed residual stream.
        meta: ``{"format", "model": {"path", "sha256"}, "data": {"prefixes", "sha256", "documents", "tokens", "seed", ...}}``.
    """

    layer_cosine: list[float]
    layer_skip_loss: list[float]
    base_loss: float
    heads: list[list[float]]
    mlp: list[list[float]]
    hidden: list[float]
    meta: dict = field(default_factory=dict)

    def least_important_layers(self, k: int, metric: str = "cosine") -> list[int]:
        """The ``k`` layers with the lowest score of ``metric`` (``"cosine"`` or ``"skip_loss"``), ascending indices.

        Ties go to the lower index. Raises:
            ValueError: ``metric`` unknown, or ``k`` not an int in ``[0, num_layers]``.
        """
        scores = self._layer_scores(metric)
        return sorted(_ranked(scores, _count(k, len(scores), "layers", allow_zero=True), lowest=True))

    def top_heads(self, k: int) -> list[list[int]]:
        """Per layer the ``k`` heads of highest importance, ascending indices. ValueError for ``k`` outside ``[1, heads]``."""
        return [sorted(_ranked(row, _count(k, len(row), f"heads of layer {i}"), lowest=False))
                for i, row in enumerate(self.heads)]

    def top_mlp(self, k: int) -> list[list[int]]:
        """Per layer the ``k`` MLP channels of highest importance, ascending. ValueError for ``k`` outside ``[1, channels]``."""
        return [sorted(_ranked(row, _count(k, len(row), f"MLP channels of layer {i}"), lowest=False))
                for i, row in enumerate(self.mlp)]

    def top_hidden(self, k: int) -> list[int]:
        """The ``k`` hidden channels of highest importance, ascending. ValueError for ``k`` outside ``[1, hidden_size]``."""
        return sorted(_ranked(self.hidden, _count(k, len(self.hidden), "hidden channels"), lowest=False))

    def ranked_layers(self, metric: str = "cosine") -> list[int]:
        """Every layer, least important first by ``metric`` (ties: lower index first). ValueError for a bad metric."""
        return _ranked(self._layer_scores(metric), len(self.layer_cosine), lowest=True)

    def _layer_scores(self, metric: str) -> list[float]:
        if metric not in LAYER_METRICS:
            raise ValueError(f"layer metric {metric!r} is not one of {', '.join(LAYER_METRICS)}")
        return self.layer_cosine if metric == "cosine" else self.layer_skip_loss

    def save(self, path: str | Path) -> Path:
        """Write as JSON, one field a line (temp file + ``os.replace``). Returns ``path``.

        Raises:
            ValueError: a field holds NaN or infinity (JSON has no such numbers), naming the field.
        """
        lines = []
        for name, value in asdict(self).items():
            try:
                lines.append(f"{json.dumps(name)}: {json.dumps(value, allow_nan=False, ensure_ascii=False)}")
            except ValueError:
                raise ValueError(f"importance field '{name}' holds a non-finite value; not writing {path}") from None
        return atomic_write_text(path, "{\n" + ",\n".join(lines) + "\n}\n")

    @classmethod
    def load(cls, path: str | Path) -> Importance:
        """Read a file written by :meth:`save`, checking every field.

        Raises:
            FileNotFoundError: no such file (says how to write one).
            ValueError: not JSON, another ``meta.format``, or a missing / malformed field
                (``<path>: field '<name>' ...``).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no importance file; write one with python tools/importance.py "
                                    "--model <model> --data <prefix> --output <dir>")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
        return cls(**_checked_fields(data, path))


def _ranked(scores: Sequence[float], k: int, lowest: bool) -> list[int]:
    """Indices of the ``k`` lowest (or highest) scores, in rank order; ties broken by the lower index."""
    order = sorted(range(len(scores)), key=lambda i: (scores[i] if lowest else -scores[i], i))
    return order[:k]


def _count(k, size: int, what: str, allow_zero: bool = False) -> int:
    """``k`` as an int after checking ``1 (or 0) <= k <= size``."""
    low = 0 if allow_zero else 1
    try:
        if isinstance(k, bool):
            raise TypeError
        k = operator.index(k)
    except TypeError:
        raise ValueError(f"the number of {what} to select must be an int, got {k!r}") from None
    if not low <= k <= size:
        raise ValueError(f"cannot select {k} {what}: choose between {low} and {size}")
    return k


def _checked_fields(data: dict, path: Path) -> dict:
    """The constructor arguments in ``data``; ValueError naming the file and the first bad field."""
    def bad(name: str, problem: str) -> ValueError:
        return ValueError(f"{path}: field '{name}' {problem}; recompute it with python tools/importance.py")

    meta = data.get("meta")
    if not isinstance(meta, dict):
        raise bad("meta", "is missing or not an object")
    if meta.get("format") != FORMAT:
        raise bad("meta.format", f"is {meta.get('format')!r}, expected {FORMAT!r}")
    fields = {"meta": meta}
    for name in ("layer_cosine", "layer_skip_loss", "hidden"):
        fields[name] = _numbers(data.get(name), name, bad)
    fields["base_loss"] = _numbers([data.get("base_loss")], "base_loss", bad)[0]
    depth = len(fields["layer_cosine"])
    if len(fields["layer_skip_loss"]) != depth:
        raise bad("layer_skip_loss", f"has {len(fields['layer_skip_loss'])} entries but layer_cosine {depth}")
    for name in ("heads", "mlp"):
        rows = data.get(name)
        if not isinstance(rows, list) or len(rows) != depth:
            raise bad(name, f"must be a list of {depth} lists (one per layer)")
        fields[name] = [_numbers(row, f"{name}[{i}]", bad) for i, row in enumerate(rows)]
    return fields


def _numbers(values, name: str, bad) -> list[float]:
    """``values`` as floats after checking it is a non-empty list of finite numbers."""
    if not isinstance(values, list) or not values:
        raise bad(name, "is missing or not a non-empty list of numbers")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        raise bad(name, "holds a value that is not a finite number")
    return [float(v) for v in values]


# ------------------------------------------------------------------------------------- calibration data


@dataclass
class CalibrationSet:
    """Calibration micro-batches and where they come from.

    Attributes:
        batches: dicts of CPU int64 tensors ``input_ids``, ``labels``, ``document_ids``, ``position_ids`` ``[B, L]``.
        meta: ``{"prefixes", "documents", "seed", "seq_len_tokens", "micro_batch_size", "objective", ...}``
            (``compute_importance`` adds the token count and hash).
    """

    batches: list[dict]
    meta: dict

    def __iter__(self) -> Iterator[dict]:
        return iter(self.batches)


class _Documents:
    """Documents ``picks`` (``(dataset, index)`` pairs) of several indexed datasets, as one dataset."""

    def __init__(self, datasets: Sequence, picks: list[tuple[int, int]]):
        self.datasets, self.picks = datasets, picks
        self.sizes = np.array([datasets[d].sizes[i] for d, i in picks], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.picks)

    def __getitem__(self, k: int) -> np.ndarray:
        d, i = self.picks[k]
        return self.datasets[d][i]


def calibration_batches(prefixes: Sequence[str | Path], tokenizer, num_documents: int, seq_len_tokens: int,
                        micro_batch_size: int, seed: int | None = 1234, kind: str | None = None,
                        mask_prob: float = 0.15) -> CalibrationSet:
    """Micro-batches of ``num_documents`` documents of the corpus, packed into windows of ``seq_len_tokens``.

    The documents are a seeded sample (``seed=None``: the first ones) of all documents of the
    datasets, read in corpus order, packed without shuffling (:class:`~megadistill.data.packing.PackedDataset`)
    and batched in order (the last micro-batch may be smaller). Decoders get next-token batches
    (:class:`~megadistill.data.batches.ClmBatches`: labels already shifted); encoders get masked-LM batches
    (:class:`~megadistill.data.batches.MlmBatches`): ``mask_prob`` of the tokens selected, 80/10/10, with a
    mask fixed by ``(seed, window)``, labels only at selected positions. Attention stays inside documents.

    Args:
        prefixes: indexed datasets binarized with ``tokenizer``.
        tokenizer: the model's tokenizer (checked against the datasets' provenance).
        num_documents: documents to use (all of them when the corpus has fewer).
        seq_len_tokens: tokens per window ``L``.
        micro_batch_size: windows per batch ``B``.
        seed: document sample and MLM mask seed.
        kind: ``"decoder"`` or ``"encoder"`` (the model's family, refusing data framed for the other);
            None follows the datasets' framing.
        mask_prob: encoders: fraction of tokens masked.

    Raises:
        FileNotFoundError / ValueError: as :func:`~megadistill.data.indexed.open_checked_datasets`; ValueError
            for counts below 1 or documents holding fewer than ``seq_len_tokens + 1`` tokens.
    """
    for name, value in (("num_documents", num_documents), ("seq_len_tokens", seq_len_tokens),
                        ("micro_batch_size", micro_batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"calibration {name} must be a positive int, got {value!r}")
    if not prefixes:
        raise ValueError("calibration needs at least one dataset prefix")
    datasets = open_checked_datasets(prefixes, tokenizer, kind)
    kind = kind or read_framing(prefixes[0]).kind
    picks = [(d, i) for d, ds in enumerate(datasets) for i in range(len(ds))]
    if seed is not None:
        order = np.random.default_rng(seed).permutation(len(picks))[:num_documents]
        picks = [picks[j] for j in sorted(order.tolist())]
    documents = _Documents(datasets, picks[:num_documents])
    total = int(documents.sizes.sum())
    if total < seq_len_tokens + 1:
        raise ValueError(f"calibration: {len(documents)} documents of {', '.join(map(str, prefixes))} hold {total} "
                         f"tokens, fewer than seq_len_tokens + 1 = {seq_len_tokens + 1}: use more documents or a "
                         "shorter sequence length")
    packed = PackedDataset([documents], seq_len_tokens, shuffle=False)
    if kind == "encoder":
        collator = MlmCollator.from_tokenizer(tokenizer, MaskingConfig(mask_prob=mask_prob))
        make = MlmBatches(packed, collator, seed or 0, static_mask=True)
    else:
        make = ClmBatches(packed)
    starts = range(0, len(packed), micro_batch_size)
    batches = [_keep(make(list(range(s, min(s + micro_batch_size, len(packed)))))) for s in starts]
    meta = {"prefixes": [str(p) for p in prefixes], "documents": len(documents), "seed": seed,
            "seq_len_tokens": seq_len_tokens, "micro_batch_size": micro_batch_size,
            "objective": "mlm" if kind == "encoder" else "clm"}
    if kind == "encoder":
        meta["mask_prob"] = mask_prob
    return CalibrationSet(batches, meta)


def _keep(batch: dict) -> dict:
    """Only the tensors the model reads (windows, teacher ids and counts are dropped)."""
    return {k: batch[k] for k in BATCH_KEYS if k in batch}


# ------------------------------------------------------------------------------------- computation


@dataclass(frozen=True)
class _Probes:
    """Where one family's block exposes what is measured (paths relative to a block).

    Attributes:
        attention_output: module whose INPUT is the per-head attention output ``[B, L, heads * head_dim]``.
        mlp_input: module whose INPUT is the MLP activation ``[B, L, intermediate]``.
        norms: modules whose OUTPUT is the normed residual stream ``[B, L, H]`` (first found of each tuple).
    """

    attention_output: str
    mlp_input: str
    norms: tuple[tuple[str, ...], ...]


_DECODER_PROBES = _Probes("self_attn.o_proj", "mlp.down_proj",
                          (("input_layernorm",), ("pre_feedforward_layernorm", "post_attention_layernorm")))
_BERT_PROBES = _Probes("attention.output.dense", "output.dense", (("attention.output.LayerNorm",), ("output.LayerNorm",)))
_DISTILBERT_PROBES = _Probes("attention.out_lin", "ffn.lin2", (("sa_layer_norm",), ("output_layer_norm",)))


def _probes_for(model, adapter: ModelAdapter) -> _Probes:
    if adapter.family == "decoder":
        return _DECODER_PROBES
    return _DISTILBERT_PROBES if type(model).__name__ == "DistilBertForMaskedLM" else _BERT_PROBES


def _module(block: torch.nn.Module, path: str, model) -> torch.nn.Module:
    """``block.<path>``; ValueError naming the model when the block has no such module."""
    module = dict(block.named_modules()).get(path)
    if module is None:
        raise ValueError(f"cannot score {type(model).__name__}: its blocks have no {path} "
                         f"(supported: {_DECODER_PROBES.attention_output}-style decoders, BERT/RoBERTa/XLM-R, DistilBERT)")
    return module


def _norm(block, candidates: tuple[str, ...], model) -> torch.nn.Module:
    """The first of ``candidates`` the block has (Gemma's pre-MLP norm is ``pre_feedforward_layernorm``)."""
    modules = dict(block.named_modules())
    for name in candidates:
        if name in modules:
            return modules[name]
    return _module(block, candidates[0], model)


class _Sums:
    """Float64 CPU running sums of the activation statistics over valid tokens."""

    def __init__(self, depth: int):
        self.cosine = [0.0] * depth
        self.heads: list[torch.Tensor | None] = [None] * depth
        self.mlp: list[torch.Tensor | None] = [None] * depth
        self.hidden: torch.Tensor | None = None
        self.norms = 0
        self.tokens = 0
        self.valid: torch.Tensor | None = None  # [B, L] bool of the batch being run

    def add(self, rows: list, index: int, values: torch.Tensor) -> None:
        """``rows[index] += values[valid].sum(0)`` for ``values`` ``[B, L, C]``."""
        total = values[self.valid].float().sum(0).double().cpu()
        rows[index] = total if rows[index] is None else rows[index] + total


def _first(value) -> torch.Tensor:
    """The hidden state of a layer's input args or output (a tensor, or a tuple starting with one)."""
    return value[0] if isinstance(value, (tuple, list)) else value


def _layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _remove(handles: list) -> None:
    """Remove every hook of ``handles`` and empty the list."""
    while handles:
        handles.pop().remove()


def _add_stat_hooks(model, adapter: ModelAdapter, sums: _Sums, handles: list) -> None:
    """Register the activation hooks of every block, appending each handle to ``handles`` as it is made
    (so the caller removes those already registered when a later block lacks a module)."""
    probes, text = _probes_for(model, adapter), model.config.get_text_config()
    heads = text.num_attention_heads
    for i, block in enumerate(adapter.layers(model)):
        def on_block(module, args, kwargs, output, i=i):
            cos = torch.nn.functional.cosine_similarity(_layer_input(args, kwargs).float(), _first(output).float(), dim=-1)
            sums.cosine[i] += float(cos[sums.valid].double().sum())

        def on_attention(module, args, i=i):
            x = args[0]
            sums.add(sums.heads, i, x.reshape(*x.shape[:-1], heads, x.shape[-1] // heads).float().norm(dim=-1))

        def on_mlp(module, args, i=i):
            sums.add(sums.mlp, i, args[0].abs())

        def on_norm(module, args, output):
            total = output[sums.valid].float().abs().sum(0).double().cpu()
            sums.hidden = total if sums.hidden is None else sums.hidden + total

        handles.append(block.register_forward_hook(on_block, with_kwargs=True))
        handles.append(_module(block, probes.attention_output, model).register_forward_pre_hook(on_attention))
        handles.append(_module(block, probes.mlp_input, model).register_forward_pre_hook(on_mlp))
        for candidates in probes.norms:
            handles.append(_norm(block, candidates, model).register_forward_hook(on_norm))
    sums.norms = len(probes.norms)


def _skip_hook(module, args, kwargs, output):
    """Make a block an identity: its output becomes its input hidden state, in the form the block returns."""
    hidden = _layer_input(args, kwargs)
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _checked_batches(batches: Iterable[dict]) -> list[dict]:
    """``batches`` as a list, after checking each has ``input_ids`` and ``labels`` of one ``[B, L]`` shape."""
    batches = list(batches)
    if not batches:
        raise ValueError("compute_importance got no calibration batches")
    for n, batch in enumerate(batches):
        missing = [k for k in ("input_ids", "labels") if k not in batch]
        if missing:
            raise ValueError(f"calibration batch {n} has no {', '.join(missing)}")
        shape = batch["input_ids"].shape
        for key in BATCH_KEYS:
            if key in batch and (batch[key].dim() != 2 or batch[key].shape != shape):
                raise ValueError(f"calibration batch {n}: {key} has shape {tuple(batch[key].shape)}, "
                                 f"input_ids {tuple(shape)} (both must be [B, L])")
    return batches


def _batch_nll(model, adapter: ModelAdapter, batch: dict, device, sums: _Sums | None) -> tuple[float, int]:
    """Summed CE (nats) and count of the labelled tokens of one batch; sets ``sums.valid`` first when given."""
    tensors = {k: v.to(device) for k, v in batch.items() if k in BATCH_KEYS}
    if sums is not None:
        mask = tensors.get("attention_mask")
        sums.valid = mask.bool() if mask is not None else torch.ones_like(tensors["input_ids"], dtype=torch.bool)
        sums.tokens += int(sums.valid.sum())
    extra = {"attention_mask": tensors["attention_mask"]} if "attention_mask" in tensors else {}
    out = adapter.body_outputs(model, tensors["input_ids"], document_ids=tensors.get("document_ids"),
                               position_ids=tensors.get("position_ids"), **extra)
    labels = tensors["labels"]
    selected = labels != IGNORE_INDEX
    hidden = adapter.head_input(model, out.last_hidden_state)[selected]
    return _nll_sum(model, adapter, hidden, labels[selected]), int(selected.sum())


def _nll_sum(model, adapter: ModelAdapter, hidden: torch.Tensor, labels: torch.Tensor) -> float:
    """``sum_t -log softmax(softcap(hidden_t @ W.T + b))[label_t]`` in fp32, in token chunks (no full ``[T, V]`` logits)."""
    from megadistill.models.teacher import output_softcap

    weight, bias = adapter.output_weight(model).float(), adapter.output_bias(model)
    cap = output_softcap(model.config)
    chunk = auto_chunk_size_tokens(weight.shape[0])
    total = 0.0
    for start in range(0, hidden.shape[0], chunk):
        logits = torch.nn.functional.linear(hidden[start:start + chunk].float(), weight,
                                            None if bias is None else bias.float())
        if cap:
            logits = cap * torch.tanh(logits / cap)
        total += float(torch.nn.functional.cross_entropy(logits, labels[start:start + chunk], reduction="sum").double())
    return total


def _mean_loss(model, adapter, batches: list[dict], device, sums: _Sums | None = None) -> float:
    """Mean CE over every labelled token of ``batches``, nats/token."""
    nll, count = 0.0, 0
    for batch in batches:
        batch_nll, batch_count = _batch_nll(model, adapter, batch, device, sums)
        nll, count = nll + batch_nll, count + batch_count
    if count == 0:
        raise ValueError("the calibration batches hold no labelled token (every label is -100)")
    return nll / count


def _tokens_sha256(batches: list[dict]) -> str:
    """SHA-256 (hex) of the int64 ``input_ids`` and ``labels`` of every batch, in order."""
    digest = hashlib.sha256()
    for batch in batches:
        for key in ("input_ids", "labels"):
            digest.update(batch[key].detach().cpu().to(torch.int64).contiguous().numpy())
    return digest.hexdigest()


def compute_importance(model, batches: Iterable[dict], meta: dict | None = None) -> Importance:
    """Score every layer, query head, MLP channel and hidden channel of ``model`` on ``batches`` (Minitron, ShortGPT).

    One pass with forward hooks collects, over the valid tokens (``attention_mask``, else all):
    block cosine (input vs output), per-head L2 norm at the attention output projection's input
    (decoder ``o_proj``; BERT ``attention.output.dense``; DistilBERT ``attention.out_lin``), ``|x|`` at
    the MLP down projection's input (``mlp.down_proj``; ``output.dense``; ``ffn.lin2``) and ``|x|`` after
    the residual-stream norms (decoder ``input_layernorm`` and the pre-MLP norm, ``pre_feedforward_layernorm``
    in Gemma 3, ``post_attention_layernorm`` in Llama; encoder ``attention.output.LayerNorm`` and
    ``output.LayerNorm`` / DistilBERT ``sa_layer_norm`` and ``output_layer_norm``), averaged over the norms.
    Then one pass per layer with that block's output replaced by its input (a temporary forward hook)
    gives the skip losses. CE is fp32 over all output rows, with the final-logit softcap, in token chunks.
    Cost: ``depth + 1`` forward passes over the batches, no backward.

    Args:
        model: a HF model :func:`~megadistill.models.adapters.adapter_for` supports, on any device.
        batches: dicts of CPU tensors, ``input_ids`` and ``labels`` int64 ``[B, L]`` (``-100`` = not scored;
            decoders: labels already shifted to the next token, as :func:`~megadistill.data.collate.collate_clm`
            makes them), optional ``document_ids`` / ``position_ids`` / ``attention_mask`` ``[B, L]``. Read
            ``depth + 1`` times, so an iterator is first turned into a list.
        meta: merged into :attr:`Importance.meta` (e.g. ``{"model": {"path": ...}, "data": CalibrationSet.meta}``);
            ``format``, ``model.sha256``, ``data.sha256`` (of the ids and labels) and ``data.tokens`` are set here.

    Returns:
        The :class:`Importance`. The model is back in its former train/eval mode with no hook left, also
        after an error; the same model and batches give the same numbers.

    Raises:
        ValueError: no batches, a batch without ``input_ids``/``labels`` or with mismatched shapes, no labelled
            token, or a block layout this module does not know.
    """
    batches = _checked_batches(batches)
    adapter = adapter_for(model)
    blocks = adapter.layers(model)
    device, was_training = _device(model), model.training
    sums = _Sums(len(blocks))
    model.eval()
    handles: list = []
    try:
        with torch.no_grad():
            _add_stat_hooks(model, adapter, sums, handles)
            base = _mean_loss(model, adapter, batches, device, sums)
            _remove(handles)
            skip = []
            for block in blocks:
                handles.append(block.register_forward_hook(_skip_hook, with_kwargs=True))
                skip.append(_mean_loss(model, adapter, batches, device) - base)
                _remove(handles)
    finally:
        _remove(handles)
        model.train(was_training)
    return _importance(sums, base, skip, _meta(model, batches, meta, sums.tokens))


def _importance(sums: _Sums, base: float, skip: list[float], meta: dict) -> Importance:
    """Means of the running sums as an :class:`Importance`."""
    n = max(sums.tokens, 1)
    return Importance(
        layer_cosine=[1.0 - c / n for c in sums.cosine],
        layer_skip_loss=skip,
        base_loss=base,
        heads=[(row / n).tolist() for row in sums.heads],
        mlp=[(row / n).tolist() for row in sums.mlp],
        hidden=(sums.hidden / (n * len(sums.cosine) * sums.norms)).tolist(),
        meta=meta,
    )


def _meta(model, batches: list[dict], meta: dict | None, tokens: int) -> dict:
    """``meta`` with the format, model hash and data hash / token count filled in."""
    meta = json.loads(json.dumps(meta or {}))  # a JSON-safe deep copy
    meta["format"] = FORMAT
    meta["model"] = {"path": None, **meta.get("model", {}), "sha256": state_dict_sha256(model)}
    meta["data"] = {**meta.get("data", {}), "sha256": _tokens_sha256(batches), "tokens": tokens}
    return meta


def format_layer_table(importance: Importance) -> str:
    """A plain-text table: layer, ``1 - cos``, skip loss (nats/token), then the layers least important first."""
    lines = [f"base loss {importance.base_loss:.4f} nats/token", f"{'layer':>5}  {'1-cos':>8}  {'skip-loss':>10}"]
    for i, (cos, skip) in enumerate(zip(importance.layer_cosine, importance.layer_skip_loss)):
        lines.append(f"{i:>5}  {cos:>8.4f}  {skip:>+10.4f}")
    for metric, label in (("cosine", "1-cos"), ("skip_loss", "skip-loss")):
        lines.append(f"least important first by {label}: {importance.ranked_layers(metric)}")
    return "\n".join(lines)
