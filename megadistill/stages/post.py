"""Post-training distillation stage: reduce a trained model, then heal it by distilling from the unreduced model.

The teacher (``teacher.path``) is the model to compress. The student is that model with
layers dropped (``post.drop_layers``: a list, or the k least important by ``post.layer_metric``),
query heads / MLP channels / hidden channels pruned to the most important ones (``post.keep_*``),
and, with ``student.trim_vocab``, its vocabulary trimmed to the training data: Minitron's
reduce-then-distill recipe (Muralidharan et al. 2024, arXiv:2407.14679). Importance comes from
``tools/importance.py`` (:mod:`megadistill.importance`). Healing uses the pre-training objective
and teacher signal (online, offline cache, or none for a "reduced + CE only" baseline), so
``hf_init/`` is the reduced model before healing and ``hf_best/`` / ``hf/`` the healed one.

Sequence-level KD (Kim and Rush 2016) is this stage (or ``pre``) trained on teacher generations
from ``tools/generate.py``; on-policy KD (GKD) replaces a ``post.on_policy`` fraction of the
micro-batches with the student's own samples (:mod:`megadistill.onpolicy`).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path

from megadistill import distributed, engine
from megadistill.config import PostConfig, RunConfig
from megadistill.generate import SamplingConfig
from megadistill.models.adapters import adapter_for
from megadistill.models.prune import WidthPlan, prune_width
from megadistill.onpolicy import OnPolicySpec, StudentSampler, on_policy_batches
from megadistill.stages import StageRun, pretrain
from megadistill.stages.build import StudentParts, build_student

log = logging.getLogger(__name__)


def dropped_layers(post: PostConfig, importance, depth: int) -> list[int]:
    """The 0-based layers ``post.drop_layers`` removes from a ``depth``-layer model, ascending.

    Raises:
        ValueError: an index outside ``[0, depth)``, a repeated index, or no layer left.
    """
    spec = post.drop_layers
    drop = sorted(spec) if isinstance(spec, list) else importance.least_important_layers(spec, post.layer_metric) if spec else []
    if len(set(drop)) != len(drop) or any(not 0 <= i < depth for i in drop):
        raise ValueError(f"post.drop_layers {spec}: indices must be distinct and in [0, {depth}) (the model's layers)")
    if len(drop) >= depth:
        raise ValueError(f"post.drop_layers removes all {depth} layers: keep at least one")
    return drop


def width_plan(post: PostConfig, importance, kept_layers: list[int]) -> WidthPlan | None:
    """The :class:`~megadistill.models.prune.WidthPlan` of ``post.keep_*`` for the kept layers, or None (no width pruning).

    Importance is indexed by the unreduced model's layers; the plan by the student's (``kept_layers`` order).
    """
    if max(post.keep_heads, post.keep_mlp, post.keep_hidden) == 0:
        return None
    heads = _rows_of(importance.top_heads(post.keep_heads), kept_layers) if post.keep_heads else None
    mlp = _rows_of(importance.top_mlp(post.keep_mlp), kept_layers) if post.keep_mlp else None
    hidden = importance.top_hidden(post.keep_hidden) if post.keep_hidden else None
    return WidthPlan(heads=heads, mlp=mlp, hidden=hidden)


def _rows_of(per_layer: list[list[int]], kept_layers: list[int]) -> list[list[int]]:
    """The rows of a per-layer selection (ranked once for every layer) for the kept layers, in student order."""
    return [per_layer[i] for i in kept_layers]


def _load_importance(post: PostConfig, depth: int):
    """The :class:`~megadistill.importance.Importance` of ``post.importance`` (None when unset), checked against the depth."""
    if not post.importance:
        return None
    from megadistill.importance import Importance

    importance = Importance.load(post.importance)
    if len(importance.layer_cosine) != depth:
        raise ValueError(f"post.importance {post.importance} scores {len(importance.layer_cosine)} layers but teacher.path "
                         f"has {depth}: compute it on the model being reduced (tools/importance.py --model <teacher.path>)")
    return importance


def reducer(post: PostConfig, keep_plain_copy: bool):
    """A ``make_student`` for :func:`megadistill.stages.pretrain.build` that reduces the teacher.

    Layers are dropped by building the student from the kept teacher layers (with the trimmed
    vocabulary, :func:`~megadistill.stages.build.build_student`), then width is pruned.
    Returns:
        ``(make_student, made)``: once called, ``make_student`` records in the dict ``made`` its
        :class:`StudentParts`, the dropped layers and (with ``keep_plain_copy``) a copy of the reduced
        model for on-policy sampling, made before any engine partitions it.
    """
    made: dict = {}

    def make_student(student_cfg, seed, teacher, tokenizer, train_sets, teacher_vocab) -> StudentParts:
        depth = getattr(teacher.config.get_text_config(), adapter_for(teacher).depth_field)
        importance = _load_importance(post, depth)
        drop = dropped_layers(post, importance, depth)
        kept = [i for i in range(depth) if i not in drop]
        parts = build_student(dataclasses.replace(student_cfg, layer_map=kept), seed, teacher, tokenizer, train_sets,
                              teacher_vocab)
        plan = width_plan(post, importance, kept)
        if plan is not None:
            parts = dataclasses.replace(parts, model=prune_width(parts.model, plan))
        log.info("reduced %d -> %d layers (dropped %s), width %s", depth, len(kept), drop, plan and {
            k: len(v[0]) if k != "hidden" else len(v) for k, v in dataclasses.asdict(plan).items() if v})
        made.update(parts=parts, dropped=drop, plain=copy.deepcopy(parts.model) if keep_plain_copy else None)
        return parts

    return make_student, made


def build(cfg: RunConfig, ds_config: dict) -> StageRun:
    """Teacher, reduced student, data, healing objective and engines of a post-training run.

    Raises:
        ValueError / FileNotFoundError: bad reduction settings, a missing or mismatched importance
            file, or anything :func:`megadistill.stages.pretrain.build` refuses.
    """
    post = cfg.post
    if post.importance and not Path(post.importance).is_file():
        raise FileNotFoundError(f"post.importance: {post.importance} not found: write it with python tools/importance.py "
                                f"--model {cfg.teacher.path} --data <train prefix> --output <dir>")
    make_student, made = reducer(post, keep_plain_copy=post.on_policy > 0)
    run = pretrain.build(cfg, ds_config, make_student, labels=("reduced", "healed"))
    run.info["reduction"] = {"dropped_layers": made["dropped"], "kept_layers": made["parts"].layer_map,
                             "keep_heads": post.keep_heads, "keep_mlp": post.keep_mlp, "keep_hidden": post.keep_hidden}
    if post.on_policy > 0:
        run.train_batches = _with_on_policy(cfg, run, made)
    return run


def _with_on_policy(cfg: RunConfig, run: StageRun, made: dict):
    """``train_batches`` with a ``post.on_policy`` fraction of micro-batches generated by the student."""
    post, parts = cfg.post, made["parts"]
    sampling = SamplingConfig(max_new_tokens=post.max_new_tokens, temperature=post.sample_temperature,
                              top_p=post.sample_top_p, seed=cfg.train.seed)
    tokenizer = parts.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampler = StudentSampler(run.engine.module.student, made["plain"], engine.copy_full_parameters,
                             tokenizer.eos_token_id, pad, sampling, parts.vocab_map, len(tokenizer))
    spec = OnPolicySpec(fraction=post.on_policy, prompt_tokens=post.prompt_tokens, sampling=sampling, seed=cfg.train.seed,
                        rank=distributed.rank(), samples_dir=Path(cfg.run_dir) / "onpolicy" if post.save_samples else None)
    corpus = run.train_batches
    log.info("on-policy KD: lambda %.2f, prompts of %d tokens, %d sampled tokens (T %.2f, top-p %.2f)", post.on_policy,
             post.prompt_tokens, post.max_new_tokens, post.sample_temperature, post.sample_top_p)
    return lambda consumed: on_policy_batches(corpus(consumed), consumed, spec, sampler)
