"""Build a student from its teacher: a subset of the teacher's layers, optionally a trimmed vocabulary.

Initializing a shallower student from a subset of teacher layers follows DistilBERT (Sanh et al.,
2019, every other layer) and the layer-dropping study of Sajjad et al. (2023); with a ``VocabMap``
the embedding and output rows are restricted as in "Load What You Need" (Abdaoui et al., 2020).
Supported layouts: decoder-only models keeping their blocks in ``model.layers`` (Gemma 3, Llama,
Qwen2, Mistral, ...).
"""

from __future__ import annotations

import copy
import logging

import torch
from transformers import PreTrainedModel

from megadistill.models.teacher import count_parameters
from megadistill.models.vocab import VocabMap

logger = logging.getLogger(__name__)

LAYERS_PREFIX = "model.layers."
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
    the output head are copied, their rows restricted to ``vocab_map`` when given. The config is
    a deep copy with ``num_hidden_layers``, ``layer_types`` (per-layer attention kind, Gemma 3 /
    Qwen2), ``vocab_size`` and special-token ids (config and generation config) updated. Tied
    embeddings stay tied. The teacher is not modified and shares no storage with the student.

    Args:
        teacher: a decoder-only ``PreTrainedModel`` with its blocks in ``model.layers``.
        layer_map: strictly increasing teacher layer indices (see ``parse_layer_map``).
        vocab_map: optional trimmed vocabulary; embedding rows ``[Vt(+padding), H] -> [Vs, H]``.

    Returns:
        The student, in train mode, all parameters requiring grad, on the teacher's device and dtype.

    Raises:
        ValueError: unsupported layout, invalid layer map, or a configured special-token id that
        the vocab map dropped.
    """
    num_layers = _check_layout(teacher)
    layer_map = _validated_layer_list(list(layer_map), num_layers)
    config = _student_config(teacher.config, layer_map, vocab_map)
    parameter = next(teacher.parameters())
    with torch.device(parameter.device):
        student = type(teacher)(config).to(parameter.dtype)
    if teacher.generation_config is not None:
        student.generation_config = copy.deepcopy(teacher.generation_config)
        if vocab_map is not None:
            _remap_special_ids(student.generation_config, vocab_map)
    with torch.no_grad():
        student.load_state_dict(_student_state_dict(teacher, student, layer_map, vocab_map), strict=True)
    student.train()
    student.requires_grad_(True)
    logger.info("student from teacher layers %s: %s", layer_map, describe_parameters(teacher, student))
    return student


def _check_layout(teacher: PreTrainedModel) -> int:
    layers = getattr(getattr(teacher, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) != teacher.config.num_hidden_layers:
        raise ValueError(
            f"{type(teacher).__name__} does not keep its decoder blocks in model.layers; building a student "
            "from it needs its own key mapping (supported: Gemma 3, Llama, Qwen2 and other decoder-only layouts)"
        )
    return len(layers)


def _student_config(teacher_config, layer_map: list[int], vocab_map: VocabMap | None):
    config = copy.deepcopy(teacher_config)
    config.num_hidden_layers = len(layer_map)
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


def _student_state_dict(teacher, student, layer_map: list[int], vocab_map: VocabMap | None) -> dict[str, torch.Tensor]:
    """Student state dict filled from teacher tensors (layer keys rewritten, vocab rows restricted)."""
    source = teacher.state_dict()
    vocab_keys = _vocab_keys(teacher)
    result = {}
    for key in student.state_dict():
        teacher_key = _teacher_key(key, layer_map)
        tensor = source[teacher_key]
        if vocab_map is not None and teacher_key in vocab_keys:
            tensor = vocab_map.restrict_rows(tensor)
        result[key] = tensor
    return result


def _teacher_key(student_key: str, layer_map: list[int]) -> str:
    if not student_key.startswith(LAYERS_PREFIX):
        return student_key
    index, rest = student_key[len(LAYERS_PREFIX):].split(".", 1)
    return f"{LAYERS_PREFIX}{layer_map[int(index)]}.{rest}"


def _vocab_keys(model: PreTrainedModel) -> set[str]:
    """State-dict keys of tensors indexed by token id: input embedding, output head and its bias."""
    vocab_tensors = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None:
        vocab_tensors += [t for t in (output.weight, getattr(output, "bias", None)) if t is not None]
    wanted = {id(t) for t in vocab_tensors}
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
