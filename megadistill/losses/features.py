"""Intermediate-layer matching: hidden states, attention maps and self-attention relations.

* Hidden states: MSE or cosine between student and teacher layer outputs, the student's
  projected to the teacher's width by a learned linear map when widths differ (TinyBERT,
  Jiao et al. 2020, arXiv:1909.10351, "W_h").
* Attention maps: KL(teacher || student) of each head's attention distribution (TinyBERT
  transfers attention matrices; the KL form is MiniLM's, Wang et al. 2020, arXiv:2002.10957).
* Relations: MiniLM v2 (Wang et al. 2021, arXiv:2012.15828) splits the concatenated Q, K or V
  of a layer into ``r`` relation heads and matches ``softmax(x x^T / sqrt(d))`` by KL, which
  works for any head count and width; MiniLM v1's value relation is the V relation with
  ``r`` = the attention head count.

Layer indices follow Hugging Face ``hidden_states`` tuples: 0 is the embedding output and
``i`` the output of block ``i`` (1-based); in transformers 5 a decoder's last entry is the
final *normalized* hidden state (what the LM head reads), an encoder's the last block output
(the MLM head's transform comes after it). Layer ``i``'s attention map is ``attentions[i - 1]``.
Model layouts (decoders, BERT / RoBERTa / XLM-R / DistilBERT encoders) come from
:mod:`megadistill.models.adapters`. Plain PyTorch; no DeepSpeed import.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from megadistill.models.adapters import adapter_for

__all__ = ["FeatureDistiller", "FeatureProjector", "attention_kl", "collect_features", "feature_layer_pairs",
           "hidden_state_loss", "relation_kl", "use_eager_attention"]


def feature_layer_pairs(spec, num_student_layers: int, num_teacher_layers: int) -> list[tuple[int, int]]:
    """(student, teacher) ``hidden_states`` indices to match.

    Args:
        spec: ``"uniform"`` (TinyBERT: embeddings (0, 0) plus student layer ``m`` with teacher
            layer ``round(m * Lt / Ls)``, m = 1..Ls), ``"last:k"`` (last ``k`` student layers
            with the last ``k`` teacher layers), or a list of ``[s, t]`` pairs.
        num_student_layers, num_teacher_layers: decoder layer counts ``Ls``, ``Lt``.

    Raises:
        ValueError: an unknown spec, ``k`` outside ``[1, min(Ls, Lt)]``, or an index outside
            ``[0, Ls]`` / ``[0, Lt]``.
    """
    ls, lt = num_student_layers, num_teacher_layers
    if spec == "uniform":
        pairs = [(0, 0)] + [(m, round(m * lt / ls)) for m in range(1, ls + 1)]
    elif isinstance(spec, str) and spec.startswith("last:"):
        k = _int_or_error(spec[5:], spec)
        if not 1 <= k <= min(ls, lt):
            raise ValueError(f"feature layer map {spec!r}: k must be in [1, {min(ls, lt)}]")
        pairs = [(ls - k + i, lt - k + i) for i in range(1, k + 1)]
    elif isinstance(spec, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in spec) and spec:
        pairs = [(int(s), int(t)) for s, t in spec]
    else:
        raise ValueError(f"feature layer map {spec!r}: use 'uniform', 'last:k' or a list of [student, teacher] pairs")
    for s, t in pairs:
        if not (0 <= s <= ls and 0 <= t <= lt):
            raise ValueError(f"feature layer pair ({s}, {t}) is outside student [0, {ls}] / teacher [0, {lt}]")
    return pairs


def _int_or_error(text: str, spec: str) -> int:
    """``int(text)`` or a ``ValueError`` naming the spec."""
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"feature layer map {spec!r}: 'last:k' needs an integer k") from None


class FeatureProjector(torch.nn.Module):
    """Learned student->teacher width maps, one bias-free ``Linear(Hs, Ht)`` per matched pair.

    Args:
        num_pairs: matched layer pairs.
        student_hidden_size, teacher_hidden_size: widths ``Hs``, ``Ht``.
        project: ``auto`` (identity, no parameters, when ``Hs == Ht``) or ``always``.
            Square maps start as the identity; rectangular ones as a scaled identity-like
            (semi-orthogonal) map, so matching starts from the copied weights' geometry.

    ``forward(i, x [..., Hs]) -> [..., Ht]`` for pair ``i``.

    Raises:
        ValueError: unknown ``project``.
    """

    def __init__(self, num_pairs: int, student_hidden_size: int, teacher_hidden_size: int, project: str = "auto"):
        super().__init__()
        if project not in ("auto", "always"):
            raise ValueError(f"project must be 'auto' or 'always', got {project!r}")
        self.identity = project == "auto" and student_hidden_size == teacher_hidden_size
        self.maps = torch.nn.ModuleList()
        if not self.identity:
            for _ in range(num_pairs):
                layer = torch.nn.Linear(student_hidden_size, teacher_hidden_size, bias=False)
                torch.nn.init.eye_(layer.weight)
                self.maps.append(layer)

    def forward(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return x if self.identity else self.maps[index](x)


def hidden_state_loss(student_states: Sequence[torch.Tensor], teacher_states: Sequence[torch.Tensor],
                      projector: FeatureProjector, kind: str = "mse", mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over pairs of MSE (per hidden unit) or ``1 - cos`` between projected student and teacher states.

    Args:
        student_states: per pair ``[B, L, Hs]``; teacher_states: per pair ``[B, L, Ht]`` (detached here).
        projector: maps pair ``i``'s student states to the teacher width.
        kind: ``mse`` or ``cosine``.
        mask: ``[B, L]`` bool tokens to match (default all).

    Returns:
        fp32 scalar.

    Raises:
        ValueError: unknown ``kind`` or different numbers of student and teacher states.
    """
    if kind not in ("mse", "cosine"):
        raise ValueError(f"hidden-state loss must be mse or cosine, got {kind!r}")
    if len(student_states) != len(teacher_states) or not student_states:
        raise ValueError(f"need the same non-zero number of student and teacher states, got "
                         f"{len(student_states)} and {len(teacher_states)}")
    terms = []
    for i, (s, t) in enumerate(zip(student_states, teacher_states)):
        s32, t32 = projector(i, s).float(), t.detach().float()
        per_token = (s32 - t32).square().mean(-1) if kind == "mse" else 1.0 - F.cosine_similarity(s32, t32, dim=-1)
        terms.append(_masked_mean(per_token, mask))
    return torch.stack(terms).mean()


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` ``[B, L, ...]`` over positions where ``mask`` ``[B, L]`` is true."""
    if mask is None:
        return values.mean()
    keep = mask.bool().reshape(mask.shape + (1,) * (values.dim() - mask.dim())).expand_as(values)
    # Select, do not multiply: a NaN/inf at an excluded position must not reach the mean (NaN * 0 = NaN).
    return torch.where(keep, values, torch.zeros_like(values)).sum() / keep.sum().clamp_min(1)


def _kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dim, 0 where ``p == 0`` (masked positions) instead of NaN."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q.clamp_min(-1e4)), torch.zeros((), device=p.device)).sum(-1)


def attention_kl(student_probs: torch.Tensor, teacher_probs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) of attention distributions, mean over heads and valid query rows.

    Args:
        student_probs: ``[B, Hs, L, L]`` attention probabilities (rows sum to 1).
        teacher_probs: ``[B, Ht, L, L]``. When ``Hs != Ht`` both are averaged over heads
            first (one map per model), since heads cannot be paired.
        mask: ``[B, L]`` bool valid query positions (default all).

    Returns:
        fp32 scalar (nats per query row).
    """
    s, t = student_probs.float(), teacher_probs.detach().float()
    if s.shape[1] != t.shape[1]:
        s, t = s.mean(1, keepdim=True), t.mean(1, keepdim=True)
    rows = _kl_rows(t.clamp_min(0).log(), s.clamp_min(1e-30).log())  # [B, H, L]
    return _masked_mean(rows.transpose(1, 2), mask)


def relation_kl(student_x: torch.Tensor, teacher_x: torch.Tensor, num_relation_heads: int,
                mask: torch.Tensor | None = None, causal: bool = False,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """MiniLM v2 self-attention relation KL between student and teacher projections.

    Args:
        student_x: ``[B, L, Ds]`` (a layer's Q, K or V); teacher_x: ``[B, L, Dt]``.
        num_relation_heads: ``r``; both widths must divide by it.
        mask: ``[B, L]`` bool valid positions (keys outside are masked, queries outside ignored).
        causal: also mask future keys (decoders; False for bidirectional encoders).
        document_ids: ``[B, L]`` int64 document of each token of a packed window: keys of other
            documents are masked, as the models' own attention does.

    Returns:
        fp32 scalar: KL(teacher relation || student relation), mean over heads and valid rows.

    Raises:
        ValueError: a width not divisible by ``num_relation_heads``.
    """
    log_s = _relation_log_probs(student_x.float(), num_relation_heads, mask, causal, document_ids)
    log_t = _relation_log_probs(teacher_x.detach().float(), num_relation_heads, mask, causal, document_ids)
    return _masked_mean(_kl_rows(log_t, log_s).transpose(1, 2), mask)


def _relation_log_probs(x: torch.Tensor, heads: int, mask, causal: bool, document_ids=None) -> torch.Tensor:
    """``log softmax(x_h x_h^T / sqrt(d_h))`` per relation head: ``[B, r, L, L]``."""
    b, length, width = x.shape
    if heads < 1 or width % heads:
        raise ValueError(f"relation width {width} is not divisible by {heads} relation heads: set features.relation_heads")
    xh = x.view(b, length, heads, width // heads).transpose(1, 2)
    scores = xh @ xh.transpose(-1, -2) / math.sqrt(width // heads)
    allowed = torch.ones(length, length, dtype=torch.bool, device=x.device)
    if causal:
        allowed = allowed.tril()
    allowed = allowed.expand(b, 1, length, length)
    if mask is not None:
        allowed = allowed & mask[:, None, None, :].bool()
    if document_ids is not None:
        allowed = allowed & (document_ids[:, None, :, None] == document_ids[:, None, None, :])
    return torch.log_softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)


def use_eager_attention(model) -> None:
    """Switch a HF model to eager attention, the only kind that returns attention probabilities.

    Call once before training when attention maps are matched (it is slower and holds
    ``[B, heads, L, L]`` per layer).
    """
    model.set_attn_implementation("eager")


def _qkv_modules(model, layers: Sequence[int]) -> dict[int, dict[str, torch.nn.Module]]:
    """Q/K/V projection modules of block ``i`` (1-based) for each requested layer, from the family adapter.

    Raises:
        ValueError: a layer outside the model, or a block without Q/K/V projections.
    """
    adapter = adapter_for(model)
    found = {}
    for i in layers:
        try:
            found[i] = adapter.qkv_modules(model, i - 1)
        except ValueError as err:
            raise ValueError(f"relation {err}") from None
    return found


def collect_features(model, input_ids: torch.Tensor, *, attentions: bool = False, qkv_layers: Sequence[int] = (),
                     attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                     document_ids: torch.Tensor | None = None) -> dict:
    """One forward of the model's body returning every feature the matching losses can use.

    Args:
        model: a HF causal LM (Llama / Qwen2 / Gemma 3 layout) or masked LM (BERT / RoBERTa / XLM-R /
            DistilBERT), see :func:`megadistill.models.adapters.adapter_for`.
        input_ids: ``[B, L]`` int64.
        attentions: also return attention probabilities (needs :func:`use_eager_attention`).
        qkv_layers: blocks (1-based) whose Q/K/V projection outputs to capture (decoders ``q/k/v_proj``,
            BERT / RoBERTa ``query/key/value``, DistilBERT ``q/k/v_lin``).
        attention_mask: optional ``[B, L]`` padding mask.
        position_ids: optional ``[B, L]`` int64, restarting at each document of a packed window
            (decoders then keep attention inside documents, see :mod:`megadistill.data.packing`).
        document_ids: optional ``[B, L]`` int64 document of each token; encoders get a block-diagonal mask.

    Returns:
        ``last_hidden`` ``[B, L, H]`` (what the output projection reads: the final normed state of a
        decoder, the MLM transform of an encoder), ``hidden_states`` (tuple of ``num_layers + 1``
        ``[B, L, H]`` block outputs), ``attentions`` (tuple of ``[B, heads, L, L]`` or None),
        ``qkv`` ``{layer: {"q"|"k"|"v": [B, L, D]}}``, ``document_ids`` (as given, so relations
        stay inside documents).

    Raises:
        ValueError: attentions requested but not returned (not eager), no Q/K/V modules, or an
            unsupported architecture.
    """
    adapter = adapter_for(model)
    captured: dict[int, dict[str, torch.Tensor]] = {}
    handles = []
    for layer, modules in _qkv_modules(model, qkv_layers).items():
        captured[layer] = {}
        for name, module in modules.items():
            hook = (lambda store, key: lambda _m, _i, out: store.__setitem__(key, out))(captured[layer], name)
            handles.append(module.register_forward_hook(hook))
    extra = {} if attention_mask is None else {"attention_mask": attention_mask}
    try:
        out = adapter.body_outputs(model, input_ids, document_ids=document_ids, position_ids=position_ids,
                                   output_hidden_states=True, output_attentions=attentions, **extra)
    finally:
        for handle in handles:
            handle.remove()
    if attentions and not out.attentions:
        raise ValueError(f"{type(model).__name__} returned no attention maps: call use_eager_attention(model) first")
    return {"last_hidden": adapter.head_input(model, out.last_hidden_state), "hidden_states": out.hidden_states,
            "attentions": out.attentions if attentions else None, "qkv": captured, "document_ids": document_ids}


class FeatureDistiller(torch.nn.Module):
    """The weighted sum of hidden-state, attention-map and relation matching over layer pairs.

    Args:
        pairs: (student, teacher) ``hidden_states`` indices (:func:`feature_layer_pairs`).
        student_hidden_size, teacher_hidden_size: widths for the projector.
        hidden_weight, attention_weight, relation_weight: term weights (0 disables a term).
        hidden_kind: ``mse`` or ``cosine``.
        relations: which of ``q``, ``k``, ``v`` relations to match (MiniLM v2: all three).
        num_relation_heads: relation heads ``r`` (required when ``relation_weight > 0``).
        causal: mask future keys in relations (decoders: True; encoders: False, ``adapter.causal``).
        project: ``auto`` or ``always`` (:class:`FeatureProjector`).

    ``forward(student_feats, teacher_feats, mask=None)`` takes two :func:`collect_features`
    dicts (relations stay inside the documents of the student's ``document_ids``) and returns
    ``loss`` (differentiable fp32 scalar, already weighted) and the detached, *weighted* fp32
    terms ``hidden``, ``attention``, ``relation`` (they sum to the loss). Attention and relation
    terms use pairs with both indices >= 1.

    Raises:
        ValueError: relations requested without ``num_relation_heads``, or no usable pair.
    """

    def __init__(self, pairs, student_hidden_size: int, teacher_hidden_size: int, *, hidden_weight: float = 1.0,
                 hidden_kind: str = "mse", attention_weight: float = 0.0, relation_weight: float = 0.0,
                 relations: Sequence[str] = ("q", "k", "v"), num_relation_heads: int | None = None,
                 causal: bool = True, project: str = "auto"):
        super().__init__()
        self.pairs = [tuple(p) for p in pairs]
        self.layer_pairs = [(s, t) for s, t in self.pairs if s >= 1 and t >= 1]
        if (attention_weight > 0 or relation_weight > 0) and not self.layer_pairs:
            raise ValueError("attention/relation matching needs at least one pair of decoder layers (indices >= 1)")
        if relation_weight > 0 and not num_relation_heads:
            raise ValueError("relation matching needs num_relation_heads (features.relation_heads)")
        self.weights = (hidden_weight, attention_weight, relation_weight)
        self.hidden_kind, self.relations, self.num_relation_heads, self.causal = hidden_kind, tuple(relations), num_relation_heads, causal
        self.projector = FeatureProjector(len(self.pairs), student_hidden_size, teacher_hidden_size, project)

    @property
    def wants_attentions(self) -> bool:
        """Whether both models must return attention maps."""
        return self.weights[1] > 0

    @property
    def qkv_layers_student(self) -> list[int]:
        """Student decoder layers whose Q/K/V are captured."""
        return [s for s, _ in self.layer_pairs] if self.weights[2] > 0 else []

    @property
    def qkv_layers_teacher(self) -> list[int]:
        """Teacher decoder layers whose Q/K/V are captured."""
        return [t for _, t in self.layer_pairs] if self.weights[2] > 0 else []

    def forward(self, student_feats: dict, teacher_feats: dict, mask: torch.Tensor | None = None) -> dict:
        zero = torch.zeros((), device=student_feats["last_hidden"].device)
        terms = {"hidden": zero, "attention": zero, "relation": zero}
        if self.weights[0] > 0:
            terms["hidden"] = self.weights[0] * hidden_state_loss(
                [student_feats["hidden_states"][s] for s, _ in self.pairs],
                [teacher_feats["hidden_states"][t] for _, t in self.pairs], self.projector, self.hidden_kind, mask)
        if self.weights[1] > 0:
            terms["attention"] = self.weights[1] * torch.stack([
                attention_kl(student_feats["attentions"][s - 1], teacher_feats["attentions"][t - 1], mask)
                for s, t in self.layer_pairs]).mean()
        if self.weights[2] > 0:
            terms["relation"] = self.weights[2] * torch.stack([
                relation_kl(student_feats["qkv"][s][n], teacher_feats["qkv"][t][n], self.num_relation_heads, mask,
                            self.causal, student_feats.get("document_ids"))
                for s, t in self.layer_pairs for n in self.relations]).mean()
        loss = terms["hidden"] + terms["attention"] + terms["relation"]
        return {"loss": loss, **{k: v.detach().float() for k, v in terms.items()}}
