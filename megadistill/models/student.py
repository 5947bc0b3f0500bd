"""Build a student from its teacher: a subset of the teacher's layers, optionally a trimmed vocabulary.

Initializing a shallower student from a subset of teacher layers follows DistilBERT (Sanh et al.,
2019, one layer out of two: ``layer_map="every:2"``) and the layer-dropping study of Sajjad et al.
(2023); with a ``VocabMap`` every token-indexed tensor (embedding, output head, MLM output bias)
is restricted as in "Load What You Need" (Abdaoui et al., 2020). A random student
(:func:`build_random_student`) has the same architecture and fresh weights. Supported layouts are
those of :mod:`megadistill.models.adapters`: decoders keeping their blocks in ``model.layers``
(Gemma 3, Llama, Qwen2, Mistral, ...) and BERT / RoBERTa / XLM-R / DistilBERT masked LMs.
"""

from __future__ import annotations

import copy
import logging

import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, PretrainedConfig, PreTrainedModel

from megadistill.models.adapters import ModelAdapter, adapter_for
from megadistill.models.teacher import count_parameters
from megadistill.models.vocab import VocabMap

logger = logging.getLogger(__name__)

SPECIAL_ID_FIELDS = (
    "bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "sep_token_id", "cls_token_id",
    "mask_token_id", "decoder_start_token_id", "forced_bos_token_id", "forced_eos_token_id",
)


def uniform_layer_map(num_teacher_layers: int, num_student_layers: int) -> list[int]:
    """Evenly spaced teacher layer indices, first and last included.

    ``uniform_layer_map(18, 6) == [0, 3, 7, 10, 14, 17]``. A one-layer student takes the last
    teacher layer (``[num_teacher_layers - 1]``), whose output the teacher's final norm and head
    were trained on.

    Raises:
        ValueError: ``num_student_layers`` is < 1 or > ``num_teacher_layers``.
    """
    if not 1 <= num_student_layers <= num_teacher_layers:
        raise ValueError(
            f"a student needs between 1 and {num_teacher_layers} layers (the teacher's depth), got {num_student_layers}"
        )
    if num_student_layers == 1:
        return [num_teacher_layers - 1]
    span, gaps = num_teacher_layers - 1, num_student_layers - 1
    # Integer round-half-up of i*span/gaps: exact, and strictly increasing since span >= gaps.
    return [(2 * i * span + gaps) // (2 * gaps) for i in range(num_student_layers)]


def parse_layer_map(spec: int | str | list[int], num_teacher_layers: int) -> list[int]:
    """Turn a layer-map spec into teacher layer indices.

    Args:
        spec: an int ``n`` (``uniform_layer_map``); ``"every:k"`` (every k-th layer counted back
            from the last, so the last is kept: 18 layers, k=3 -> ``[2, 5, ..., 17]``); or an
            explicit list of indices (also as a string ``"0,5,17"``).
        num_teacher_layers: depth of the teacher.

    Returns:
        Strictly increasing indices in ``[0, num_teacher_layers)``.

    Raises:
        ValueError: malformed spec, out-of-range or non-increasing indices.
    """
    if isinstance(spec, str):
        spec = spec.strip()
        if spec.startswith("every:"):
            step = _parse_int(spec[len("every:"):], spec)
            if step < 1:
                raise ValueError(f"layer map {spec!r}: k must be >= 1")
            return list(range(num_teacher_layers - 1, -1, -step))[::-1]
        parts = [_parse_int(p, spec) for p in spec.split(",")]
        spec = parts[0] if len(parts) == 1 else parts
    if isinstance(spec, int) and not isinstance(spec, bool):
        return uniform_layer_map(num_teacher_layers, spec)
    if not isinstance(spec, (list, tuple)):
        raise ValueError(f"layer map {spec!r} must be an int, 'every:k' or a list of ints")
    return _validated_layer_list(list(spec), num_teacher_layers)


def _parse_int(text: str, spec: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"layer map {spec!r} is not an int, 'every:k' or a comma-separated list of ints") from None


def _validated_layer_list(layers: list, num_teacher_layers: int) -> list[int]:
    if not layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise ValueError(f"layer map {layers!r} must be a non-empty list of ints")
    if layers[0] < 0 or layers[-1] >= num_teacher_layers:
        raise ValueError(f"layer map {layers} has indices outside [0, {num_teacher_layers}) (the teacher's layers)")
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise ValueError(f"layer map {layers} must be strictly increasing")
    return layers


def build_student_from_teacher(
    teacher: PreTrainedModel, layer_map: list[int], vocab_map: VocabMap | None = None
) -> PreTrainedModel:
    """A student of the teacher's class with teacher layers ``layer_map`` and a (trimmed) vocabulary.

    Student layer ``j`` is a copy of teacher layer ``layer_map[j]``; embeddings, final norm and
    the output head (for encoders the MLM transform, decoder and bias) are copied, token-indexed
    tensors restricted to ``vocab_map`` rows when given. The config is a deep copy with the depth
    field (``num_hidden_layers``; DistilBERT ``n_layers``), ``layer_types`` (per-layer attention
    kind, Gemma 3 / Qwen2), ``vocab_size`` and special-token ids (bos/eos/pad/unk/cls/sep/mask, config
    and generation config) updated. Tied embeddings stay tied. The teacher is not modified and
    shares no storage with the student.

    Args:
        teacher: a model :func:`~megadistill.models.adapters.adapter_for` supports (decoder or masked LM).
        layer_map: strictly increasing teacher layer indices (see ``parse_layer_map``).
        vocab_map: optional trimmed vocabulary; rows ``[Vt(+padding), ...] -> [Vs, ...]``.

    Returns:
        The student, in train mode, all parameters requiring grad, on the teacher's device and dtype.

    Raises:
        ValueError: unsupported layout, invalid layer map, or a configured special-token id that
        the vocab map dropped.
    """
    adapter = adapter_for(teacher)
    num_layers = _check_layout(teacher, adapter)
    layer_map = _validated_layer_list(list(layer_map), num_layers)
    _check_position_offset(teacher.config, adapter, vocab_map)
    student = _new_model(teacher, _student_config(teacher.config, adapter, layer_map, vocab_map), vocab_map)
    with torch.no_grad():
        student.load_state_dict(_student_state_dict(teacher, student, adapter, layer_map, vocab_map), strict=True)
    student.train()
    student.requires_grad_(True)
    logger.info("student from teacher layers %s: %s", layer_map, describe_parameters(teacher, student))
    return student


def build_random_student(
    template: PreTrainedModel | PretrainedConfig, seed: int, layer_map: list[int] | None = None,
    vocab_map: VocabMap | None = None,
) -> PreTrainedModel:
    """A freshly initialized student with the template's architecture (``student.init: random``).

    The config is built as in :func:`build_student_from_teacher` (depth ``len(layer_map)``,
    ``layer_types`` of those layers, trimmed vocabulary and remapped special ids), and the
    weights come from the model class's own initializer under ``torch.manual_seed(seed)`` in a
    forked RNG: the same seed gives the same weights on every rank, and the caller's RNG stream
    is left untouched. Nothing is copied from the template's weights.

    Args:
        template: the teacher model (its class is used) or a config (its ``AutoModelForCausalLM`` /
            ``AutoModelForMaskedLM`` class, by adapter family).
        seed: initialization seed.
        layer_map: teacher layers whose count (and attention kinds) the student takes; default all.
        vocab_map: optional trimmed vocabulary.

    Returns:
        The student in train mode, all parameters requiring grad; on the template model's device and
        dtype (fp32 on CPU for a config).

    Raises:
        ValueError: unsupported architecture, invalid layer map or a dropped special-token id.
    """
    config = getattr(template, "config", template)
    adapter = adapter_for(template)
    depth = getattr(config, adapter.depth_field)
    layer_map = _validated_layer_list(list(range(depth) if layer_map is None else layer_map), depth)
    student_config = _student_config(config, adapter, layer_map, vocab_map)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if isinstance(template, PreTrainedModel):
            student = _new_model(template, student_config, vocab_map)
        else:
            auto = AutoModelForMaskedLM if adapter.family == "encoder" else AutoModelForCausalLM
            student = auto.from_config(student_config, dtype=torch.float32)
    student.train()
    student.requires_grad_(True)
    return student


def _new_model(teacher: PreTrainedModel, config, vocab_map: VocabMap | None) -> PreTrainedModel:
    """A default-initialized model of the teacher's class, device and dtype, with its generation config."""
    parameter = next(teacher.parameters())
    with torch.device(parameter.device):
        student = type(teacher)(config).to(parameter.dtype)
    if getattr(teacher, "generation_config", None) is not None:  # masked LMs have none
        student.generation_config = copy.deepcopy(teacher.generation_config)
        if vocab_map is not None:
            _remap_special_ids(student.generation_config, vocab_map)
    return student


def _check_layout(teacher: PreTrainedModel, adapter: ModelAdapter) -> int:
    depth = getattr(teacher.config, adapter.depth_field)
    try:
        layers = adapter.layers(teacher)
    except (AttributeError, ValueError) as err:
        raise ValueError(f"{err}; building a student from it needs its own adapter (supported: Gemma 3, Llama, "
                         "Qwen2 and other decoder-only layouts in model.layers, BERT/RoBERTa/XLM-R/DistilBERT "
                         "masked LMs)") from None
    if len(layers) != depth:
        raise ValueError(f"{type(teacher).__name__} has {len(layers)} blocks but config.{adapter.depth_field}={depth}")
    return len(layers)


def _check_position_offset(config, adapter: ModelAdapter, vocab_map: VocabMap | None) -> None:
    """RoBERTa/XLM-R read position row ``pad_id + 1 + p``: a pad id that moves would shift every copied row."""
    pad = getattr(config, "pad_token_id", None)
    if not (adapter.position_offset and vocab_map is not None and pad is not None):
        return
    if 0 <= pad < vocab_map.teacher_vocab_size and vocab_map.teacher_to_student[pad] not in (-1, pad):
        raise ValueError(f"the vocab map moves {type(config).__name__} pad_token_id {pad} to "
                         f"{vocab_map.teacher_to_student[pad]}, which would shift the copied position embeddings "
                         "(positions start at pad_token_id + 1): keep every teacher id below the pad id")


def _student_config(teacher_config, adapter: ModelAdapter, layer_map: list[int], vocab_map: VocabMap | None):
    config = copy.deepcopy(teacher_config)
    setattr(config, adapter.depth_field, len(layer_map))
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [teacher_config.layer_types[i] for i in layer_map]
    if vocab_map is not None:
        config.vocab_size = len(vocab_map)
        _remap_special_ids(config, vocab_map)
    return config


def _remap_special_ids(config, vocab_map: VocabMap) -> None:
    """Rewrite special-token id fields (int or list of ints) from teacher to student ids in place."""
    for field in SPECIAL_ID_FIELDS:
        value = getattr(config, field, None)
        if value is None:
            continue
        ids = [value] if isinstance(value, int) else list(value)
        if any(not 0 <= i < vocab_map.teacher_vocab_size or vocab_map.teacher_to_student[i] < 0 for i in ids):
            raise ValueError(f"config {field}={value} names a token the vocab map drops: add it to always_keep")
        student = [int(vocab_map.teacher_to_student[i]) for i in ids]
        setattr(config, field, student[0] if isinstance(value, int) else student)


def _student_state_dict(teacher, student, adapter: ModelAdapter, layer_map: list[int],
                        vocab_map: VocabMap | None) -> dict[str, torch.Tensor]:
    """Student state dict filled from teacher tensors (layer keys rewritten, vocab rows restricted)."""
    source = teacher.state_dict()
    vocab_keys = vocab_state_keys(teacher, adapter)
    result = {}
    for key in student.state_dict():
        teacher_key = _teacher_key(key, adapter.layers_prefix, layer_map)
        tensor = source[teacher_key]
        if vocab_map is not None and teacher_key in vocab_keys:
            tensor = vocab_map.restrict_rows(tensor)
        result[key] = tensor
    return result


def _teacher_key(student_key: str, prefix: str, layer_map: list[int]) -> str:
    if not student_key.startswith(prefix):
        return student_key
    index, rest = student_key[len(prefix):].split(".", 1)
    return f"{prefix}{layer_map[int(index)]}.{rest}"


def vocab_state_keys(model: PreTrainedModel, adapter: ModelAdapter | None = None) -> set[str]:
    """State-dict keys of the tensors indexed by token id on dim 0 (every name of a tied tensor).

    Input embedding, output head and its bias, and for MLM heads the separate head bias
    (``cls.predictions.bias``, ``lm_head.bias``), from ``adapter.vocab_parameters``.
    """
    adapter = adapter or adapter_for(model)
    wanted = {id(t) for t in adapter.vocab_parameters(model)}
    return {name for name, p in model.named_parameters(remove_duplicate=False) if id(p) in wanted}


def describe_parameters(teacher: PreTrainedModel, student: PreTrainedModel) -> dict[str, dict[str, int] | float]:
    """Parameter counts of both models (see ``count_parameters``) and the student/teacher ratios.

    Returns:
        ``{"teacher": {...}, "student": {...}, "total_ratio": float, "non_embedding_ratio": float}``.
    """
    t, s = count_parameters(teacher), count_parameters(student)
    return {
        "teacher": t,
        "student": s,
        "total_ratio": s["total"] / t["total"],
        "non_embedding_ratio": s["non_embedding"] / max(t["non_embedding"], 1),
    }
