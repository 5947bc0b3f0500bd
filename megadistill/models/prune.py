"""Reduce a trained model: drop whole layers, or keep a subset of its attention heads, MLP and hidden channels.

Depth and width pruning of an already trained model follow Minitron (Muralidharan et al., 2024,
"Compact Language Models via Pruning and Knowledge Distillation", arXiv 2407.14679): the reduced
model keeps the selected layers, heads, MLP channels and embedding channels of the original and
is then healed by distillation from it. Which indices to keep (importance scores) is decided
elsewhere; this module only takes kept indices and rewrites config and weights. Every function
returns a NEW model of the input's class, device and dtype (the input is not modified and shares
no storage with it) that ``save_pretrained`` + ``AutoModelFor{CausalLM,MaskedLM}.from_pretrained``
reload exactly. Supported layouts: decoders with ``self_attn.{q,k,v,o}_proj`` and
``mlp.{gate,up,down}_proj`` blocks in ``model.layers`` (Gemma 3, Llama, Qwen2, Mistral) for all
three widths; BERT / RoBERTa / XLM-R / DistilBERT masked LMs for depth and MLP width.
"""

from __future__ import annotations

import copy
import logging
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from megadistill.models.adapters import ModelAdapter, adapter_for
from megadistill.models.student import build_student_from_teacher, describe_parameters

__all__ = ["WidthPlan", "drop_layers", "prune_width"]

logger = logging.getLogger(__name__)

SUPPORTED = ("decoders with self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj blocks in model.layers "
             "(Gemma 3, Llama, Qwen2, Mistral); BertForMaskedLM, RobertaForMaskedLM, XLMRobertaForMaskedLM and "
             "DistilBertForMaskedLM for depth and MLP width")


def drop_layers(model: PreTrainedModel, drop: Sequence[int]) -> PreTrainedModel:
    """A copy of ``model`` without the blocks ``drop`` (Minitron depth pruning).

    The kept blocks keep their order; config depth and ``layer_types`` follow (see
    :func:`~megadistill.models.student.build_student_from_teacher`). ``drop == []`` gives an identical copy.

    Args:
        model: a decoder or masked LM that :func:`~megadistill.models.adapters.adapter_for` supports.
        drop: 0-based indices of the blocks to remove, in any order.

    Returns:
        The reduced model, in train mode with every parameter requiring grad (ready to heal).

    Raises:
        ValueError: an index that is not an int, out of range or repeated; dropping every layer;
            an unsupported layout.
    """
    adapter = adapter_for(model)
    depth = getattr(model.config, adapter.depth_field)
    dropped = _kept(drop, depth, f"drop_layers on {type(model).__name__} ({depth} layers)", allow_empty=True)
    if len(dropped) == depth:
        raise ValueError(f"drop_layers would remove all {depth} layers of {type(model).__name__}: keep at least one")
    return build_student_from_teacher(model, sorted(set(range(depth)) - set(dropped)), None)


@dataclass(frozen=True)
class WidthPlan:
    """Which channels of a model to keep; a field left None keeps that width whole.

    Hugging Face configs hold one global value per width, so every layer must keep the same number.

    Attributes:
        heads: per layer, the query-head indices to keep (``[num_layers][kept_heads]``).
        mlp: per layer, the MLP intermediate channels to keep (``[num_layers][kept_channels]``).
        hidden: the embedding / residual-stream channels to keep, one list for the whole model.
    """

    heads: list[list[int]] | None = None
    mlp: list[list[int]] | None = None
    hidden: list[int] | None = None


@dataclass(frozen=True)
class _Layout:
    """Where one family keeps its widths: index kind per tensor dim (``"q"``, ``"kv"``, ``"mlp"``, ``"hidden"``).

    ``layer_rules`` keys are relative to a block (``self_attn.q_proj.weight``), ``model_rules`` are
    full state-dict keys; tensors without a rule are copied whole.
    """

    layer_rules: dict[str, tuple[str | None, ...]]
    model_rules: dict[str, tuple[str | None, ...]]
    mlp_field: str
    widths: tuple[str, ...]


_RESIDUAL_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                   "post_feedforward_layernorm")
_DECODER = _Layout(
    layer_rules={
        **{f"self_attn.{p}.weight": (k, "hidden") for p, k in (("q_proj", "q"), ("k_proj", "kv"), ("v_proj", "kv"))},
        **{f"self_attn.{p}.bias": (k,) for p, k in (("q_proj", "q"), ("k_proj", "kv"), ("v_proj", "kv"))},
        "self_attn.o_proj.weight": ("hidden", "q"), "self_attn.o_proj.bias": ("hidden",),
        **{f"mlp.{p}.weight": ("mlp", "hidden") for p in ("gate_proj", "up_proj")},
        **{f"mlp.{p}.bias": ("mlp",) for p in ("gate_proj", "up_proj")},
        "mlp.down_proj.weight": ("hidden", "mlp"), "mlp.down_proj.bias": ("hidden",),
        **{f"{norm}.weight": ("hidden",) for norm in _RESIDUAL_NORMS},
    },
    model_rules={"model.embed_tokens.weight": (None, "hidden"), "lm_head.weight": (None, "hidden"),
                 "model.norm.weight": ("hidden",)},
    mlp_field="intermediate_size",
    widths=("heads", "mlp", "hidden"),
)
_BERT = _Layout(
    layer_rules={"intermediate.dense.weight": ("mlp", None), "intermediate.dense.bias": ("mlp",),
                 "output.dense.weight": (None, "mlp")},
    model_rules={}, mlp_field="intermediate_size", widths=("mlp",),
)
_DISTILBERT = _Layout(
    layer_rules={"ffn.lin1.weight": ("mlp", None), "ffn.lin1.bias": ("mlp",), "ffn.lin2.weight": (None, "mlp")},
    model_rules={}, mlp_field="hidden_dim", widths=("mlp",),
)


def prune_width(model: PreTrainedModel, plan: WidthPlan) -> PreTrainedModel:
    """A copy of ``model`` keeping the heads, MLP channels and hidden channels of ``plan`` (Minitron width pruning).

    Decoders: ``q_proj`` rows ``[heads*head_dim, H]`` and ``o_proj`` columns ``[H, heads*head_dim]``
    are kept per head (``head_dim`` rows each, biases with their rows). With multi-head attention the
    kept heads' K/V heads go with them; with grouped-query attention every KV head is kept and each
    group (``num_heads // num_kv_heads`` consecutive query heads) must keep the same number of query
    heads. MLP: ``gate_proj``/``up_proj`` rows and ``down_proj`` columns ``[H, I]``. Hidden: columns of
    every matrix reading the residual stream (q/k/v, gate/up, ``lm_head``), rows of those writing it
    (``o_proj``, ``down_proj``), embedding columns ``[V, H]`` and every residual-stream norm weight;
    ``q_norm``/``k_norm`` (over ``head_dim``) are unchanged. The config gets ``num_attention_heads``,
    ``num_key_value_heads``, ``intermediate_size``, ``hidden_size`` and an explicit ``head_dim`` (Llama
    and Qwen2 would otherwise recompute it as ``hidden_size // num_attention_heads``). Tied embeddings
    stay tied. Removing heads or MLP channels whose contribution is zero leaves the outputs unchanged;
    hidden pruning does not preserve them even then: RMSNorm statistics are taken over fewer channels
    and Gemma scales embeddings by ``sqrt(hidden_size)``, so the model must be healed (as in Minitron).

    Encoders (BERT / RoBERTa / XLM-R: ``intermediate.dense`` rows and ``output.dense`` columns;
    DistilBERT: ``ffn.lin1`` rows and ``ffn.lin2`` columns; config ``intermediate_size`` / ``hidden_dim``)
    take MLP pruning only.

    Args:
        model: a supported model (see the module docstring).
        plan: kept indices; each list is sorted here, so order does not matter.

    Returns:
        The pruned model, in train mode with every parameter requiring grad (ready to heal).

    Raises:
        ValueError: an unsupported layout; heads or hidden channels of an encoder; a list of the
            wrong length, or with out-of-range, repeated or no indices; different kept counts per
            layer, or per KV group.
    """
    adapter, layout = _layout_for(model)
    _check_widths(model, layout, plan)
    config, per_layer, global_index = _plan_indices(model, adapter, layout, plan)
    pruned = _empty_like(model, config)
    with torch.no_grad():
        state = _pruned_state_dict(model, pruned, adapter, layout, per_layer, global_index)
        pruned.load_state_dict(state, strict=True)
    pruned.train()
    pruned.requires_grad_(True)
    logger.info("width-pruned %s: %s", type(model).__name__, describe_parameters(model, pruned))
    return pruned


def _layout_for(model: PreTrainedModel) -> tuple[ModelAdapter, _Layout]:
    """The adapter and pruning layout of ``model``; ValueError naming the supported ones otherwise."""
    name = type(model).__name__
    try:
        adapter = adapter_for(model)
        blocks = adapter.layers(model)
    except (AttributeError, ValueError) as err:
        raise ValueError(f"cannot prune {name} ({err}): supported are {SUPPORTED}") from None
    if adapter.family == "encoder":
        return adapter, (_DISTILBERT if name == "DistilBertForMaskedLM" else _BERT)
    needed = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    modules = dict(blocks[0].named_modules()) if len(blocks) else {}
    missing = [n for n in needed if n not in modules]
    if missing:
        raise ValueError(f"cannot prune {name}: its blocks have no {', '.join(missing)}; supported are {SUPPORTED}")
    return adapter, _DECODER


def _check_widths(model: PreTrainedModel, layout: _Layout, plan: WidthPlan) -> None:
    """Encoders take MLP pruning only: fewer heads or hidden channels could not be reloaded."""
    asked = [w for w in ("heads", "mlp", "hidden") if getattr(plan, w) is not None]
    refused = [w for w in asked if w not in layout.widths]
    if refused:
        raise ValueError(
            f"cannot prune the {' and '.join(refused)} of {type(model).__name__}: Hugging Face BERT-style encoders "
            "compute the attention head size as hidden_size / num_attention_heads, so a model with fewer heads or "
            "hidden channels (and unchanged head size) could not be reloaded; use depth (drop_layers) or MLP pruning")


def _plan_indices(model, adapter: ModelAdapter, layout: _Layout, plan: WidthPlan):
    """The pruned config, per-layer ``{kind: LongTensor}`` row indices and the global ``{"hidden": ...}`` ones."""
    config = copy.deepcopy(model.config)
    depth = getattr(config, adapter.depth_field)
    per_layer: list[dict[str, torch.Tensor]] = [{} for _ in range(depth)]
    if layout is _DECODER:
        # Explicit, so that Llama/Qwen2 never recompute it as hidden_size // num_attention_heads.
        config.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if plan.heads is not None:
        _plan_heads(config, plan.heads, depth, per_layer)
    if plan.mlp is not None:
        kept = _per_layer(plan.mlp, depth, getattr(config, layout.mlp_field), "mlp", layout.mlp_field)
        for index, channels in zip(per_layer, kept):
            index["mlp"] = torch.tensor(channels)
        setattr(config, layout.mlp_field, len(kept[0]))
    global_index = {}
    if plan.hidden is not None:
        hidden = _kept(plan.hidden, config.hidden_size, "hidden")
        global_index["hidden"] = torch.tensor(hidden)
        config.hidden_size = len(hidden)
    return config, per_layer, global_index


def _plan_heads(config, plan_heads, depth: int, per_layer: list[dict[str, torch.Tensor]]) -> None:
    """Fill ``per_layer[i]["q"]`` / ``["kv"]`` (q/k/v rows to keep) and set the config's head counts in place."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    kept = _per_layer(plan_heads, depth, heads, "heads", "num_attention_heads")
    for layer, (index, layer_heads) in enumerate(zip(per_layer, kept)):
        kv = layer_heads if kv_heads == heads else _kv_groups_kept(layer_heads, heads, kv_heads, layer)
        index["q"], index["kv"] = _head_rows(layer_heads, config.head_dim), _head_rows(kv, config.head_dim)
    config.num_attention_heads = len(kept[0])
    config.num_key_value_heads = len(kept[0]) if kv_heads == heads else kv_heads


def _kv_groups_kept(kept: list[int], heads: int, kv_heads: int, layer: int) -> list[int]:
    """All KV heads, after checking that each group of ``heads // kv_heads`` query heads keeps as many of them.

    Query head ``h`` reads KV head ``h // group`` (HF ``repeat_kv``), so an uneven choice would need
    a per-group head count that no HF config can express.
    """
    group = heads // kv_heads
    counts = [sum(h // group == g for h in kept) for g in range(kv_heads)]
    for g, count in enumerate(counts):
        if count != counts[0]:
            raise ValueError(
                f"layer {layer} keeps {count} query heads in KV group {g} but {counts[0]} in group 0: with "
                f"grouped-query attention ({group} query heads per KV head) every group must keep the same number")
    return list(range(kv_heads))


def _head_rows(heads: list[int], head_dim: int) -> torch.Tensor:
    """Row indices ``[len(heads) * head_dim]`` of heads ``heads`` in a ``[num_heads * head_dim, ...]`` projection."""
    return (torch.tensor(heads)[:, None] * head_dim + torch.arange(head_dim)).flatten()


def _per_layer(lists, depth: int, size: int, what: str, field: str) -> list[list[int]]:
    """Validated sorted kept indices of every layer, all of one count (HF configs hold one global ``field``)."""
    if len(lists) != depth:
        raise ValueError(f"WidthPlan.{what} has {len(lists)} lists but the model has {depth} layers: "
                         "give one per layer")
    kept = [_kept(indices, size, f"WidthPlan.{what} of layer {i}") for i, indices in enumerate(lists)]
    for i, indices in enumerate(kept):
        if len(indices) != len(kept[0]):
            raise ValueError(f"WidthPlan.{what} keeps {len(kept[0])} in layer 0 but {len(indices)} in layer {i}: "
                             f"the config holds one global {field}, so every layer must keep the same number")
    return kept


def _kept(indices, size: int, what: str, allow_empty: bool = False) -> list[int]:
    """``indices`` sorted, after checking they are distinct ints in ``[0, size)`` (and not empty unless allowed)."""
    indices = list(indices)
    try:
        if any(isinstance(i, bool) for i in indices):
            raise TypeError
        kept = sorted(operator.index(i) for i in indices)
    except TypeError:
        raise ValueError(f"{what}: indices must be ints, got {indices!r}") from None
    if not kept and not allow_empty:
        raise ValueError(f"{what}: keep at least one index")
    if kept and (kept[0] < 0 or kept[-1] >= size):
        raise ValueError(f"{what}: indices {kept} are outside [0, {size})")
    repeated = sorted({a for a, b in zip(kept, kept[1:]) if a == b})
    if repeated:
        raise ValueError(f"{what}: indices {repeated} are listed more than once")
    return kept


def _empty_like(model: PreTrainedModel, config) -> PreTrainedModel:
    """A default-initialized model of ``model``'s class, device and dtype for ``config``, with its generation config."""
    parameter = next(model.parameters())
    with torch.device(parameter.device):
        pruned = type(model)(config).to(parameter.dtype)
    if getattr(model, "generation_config", None) is not None:  # masked LMs have none
        pruned.generation_config = copy.deepcopy(model.generation_config)
    return pruned


def _pruned_state_dict(model, pruned, adapter: ModelAdapter, layout: _Layout, per_layer: list[dict],
                       global_index: dict) -> dict[str, torch.Tensor]:
    """``pruned``'s state dict filled with the kept slices of ``model``'s tensors.

    Raises:
        ValueError: a tensor whose pruned shape no rule of the layout produces (a block of a layout
            this module does not know, e.g. a norm over all heads).
    """
    source, prefix = model.state_dict(), adapter.layers_prefix
    result = {}
    for key, target in pruned.state_dict().items():
        if key.startswith(prefix):
            layer, rest = key[len(prefix):].split(".", 1)
            kinds, index = layout.layer_rules.get(rest, ()), {**global_index, **per_layer[int(layer)]}
        else:
            kinds, index = layout.model_rules.get(key, ()), global_index
        tensor = _select(source[key], kinds, index)
        if tensor.shape != target.shape:
            raise ValueError(f"cannot prune {type(model).__name__}: {key} would be {tuple(tensor.shape)}, the pruned "
                             f"config needs {tuple(target.shape)}; supported are {SUPPORTED}")
        result[key] = tensor
    return result


def _select(tensor: torch.Tensor, kinds: tuple[str | None, ...], index: dict[str, torch.Tensor]) -> torch.Tensor:
    """``tensor`` restricted on each dim ``d`` to ``index[kinds[d]]`` where that width is pruned."""
    for dim, kind in enumerate(kinds):
        if kind in index:
            tensor = tensor.index_select(dim, index[kind].to(tensor.device))
    return tensor
