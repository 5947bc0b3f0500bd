"""Importance on a calibration set (megadistill.importance, megadistill.plots, tools/importance.py) on tiny models.

* a hand-made MHA Llama: an exact-identity layer scores 0 by both layer metrics and is the least
  important; a head with zero V rows, an MLP channel with zero gate/up rows and a hidden channel with
  zero norm weights score 0 and are never kept first;
* block cosine matches ``output_hidden_states``; base and skip losses match CE computed from the HF
  model and from ``build_student_from_teacher`` without that layer (packed Gemma 3 windows);
* the same inputs give the same JSON; save/load round trip; bad files name the field;
* encoders (BERT, DistilBERT) on MLM batches; every hook removed after an error;
* the PNG opens; the tool writes both files and prints the table.
"""

from __future__ import annotations

import copy
import json
import math
import re

import matplotlib.image
import pytest
import torch
from transformers import (AutoTokenizer, BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM,
                          Gemma3ForCausalLM, LlamaConfig, LlamaForCausalLM)

from conftest import load_tool, save_tiny_gemma_teacher
from megadistill.data.binarize import binarize
from megadistill.data.collate import IGNORE_INDEX
from megadistill.importance import FORMAT, Importance, calibration_batches, compute_importance
from megadistill.models.student import build_student_from_teacher
from megadistill.plots import plot_layer_importance

IDENTITY_LAYER, ZERO_HEAD, ZERO_CHANNEL, ZERO_HIDDEN = 2, (1, 2), (0, 5), 7


@pytest.fixture(scope="module")
def handmade():
    """A 4-layer MHA Llama (4 heads of 8) with layer 2 an exact identity, head 2 of layer 1 silent (zero V rows),
    MLP channel 5 of layer 0 dead (zero gate/up rows) and hidden channel 7 zeroed by every residual norm; labels
    are the model's own argmax, so skipping any working layer raises the loss. Returns (model, batches, importance)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=4, initializer_range=0.2)
    model = LlamaForCausalLM(cfg).eval()
    layers = model.model.layers
    with torch.no_grad():
        layers[IDENTITY_LAYER].self_attn.o_proj.weight.zero_()
        layers[IDENTITY_LAYER].mlp.down_proj.weight.zero_()
        layer, head = ZERO_HEAD
        layers[layer].self_attn.v_proj.weight[head * 8:(head + 1) * 8].zero_()
        layer, channel = ZERO_CHANNEL
        layers[layer].mlp.gate_proj.weight[channel].zero_()
        layers[layer].mlp.up_proj.weight[channel].zero_()
        for block in layers:
            block.input_layernorm.weight[ZERO_HIDDEN] = 0.0
            block.post_attention_layernorm.weight[ZERO_HIDDEN] = 0.0
        ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
        labels = model(input_ids=ids).logits.argmax(-1)
    batches = [{"input_ids": ids[:2], "labels": labels[:2]}, {"input_ids": ids[2:], "labels": labels[2:]}]
    return model, batches, compute_importance(model, batches)


def test_identity_layer_is_least_important_by_both_metrics(handmade):
    _, _, imp = handmade
    assert abs(imp.layer_cosine[IDENTITY_LAYER]) < 1e-6 and imp.layer_skip_loss[IDENTITY_LAYER] == 0.0
    others = [i for i in range(4) if i != IDENTITY_LAYER]
    assert min(imp.layer_cosine[i] for i in others) > 0.1 and min(imp.layer_skip_loss[i] for i in others) > 0.1
    assert imp.least_important_layers(1) == imp.least_important_layers(1, "skip_loss") == [IDENTITY_LAYER]
    assert imp.least_important_layers(0) == [] and imp.ranked_layers("cosine")[0] == IDENTITY_LAYER


def test_silent_head_dead_channel_and_zeroed_hidden_channel_score_zero(handmade):
    _, _, imp = handmade
    layer, head = ZERO_HEAD
    assert [len(row) for row in imp.heads] == [4] * 4 and [len(row) for row in imp.mlp] == [48] * 4
    assert len(imp.hidden) == 32
    assert imp.heads[layer][head] == 0.0 and min(v for h, v in enumerate(imp.heads[layer]) if h != head) > 0
    assert head not in imp.top_heads(3)[layer] and imp.top_heads(4)[layer] == [0, 1, 2, 3]
    layer, channel = ZERO_CHANNEL
    assert imp.mlp[layer][channel] == 0.0 and channel not in imp.top_mlp(47)[layer]
    assert imp.hidden[ZERO_HIDDEN] == 0.0 and ZERO_HIDDEN not in imp.top_hidden(31)
    assert all(v > 0 for i, v in enumerate(imp.hidden) if i != ZERO_HIDDEN)


def test_bad_counts_and_metrics_are_refused(handmade):
    _, _, imp = handmade
    for call in (lambda: imp.least_important_layers(1, "magnitude"), lambda: imp.least_important_layers(5),
                 lambda: imp.least_important_layers(-1), lambda: imp.top_heads(0), lambda: imp.top_heads(5),
                 lambda: imp.top_mlp(1.5), lambda: imp.top_hidden(True), lambda: imp.ranked_layers("x")):
        with pytest.raises(ValueError):
            call()


def test_hooks_are_removed_and_mode_restored_after_an_error(handmade):
    model, batches, _ = handmade
    model.train()
    bad = {"input_ids": torch.full((1, 16), 999), "labels": torch.zeros(1, 16, dtype=torch.long)}
    try:
        with pytest.raises(IndexError):
            compute_importance(model, [batches[0], bad])
        assert model.training
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    finally:
        model.eval()
    broken = copy.deepcopy(model)
    del broken.model.layers[1].mlp.down_proj  # hooks of layer 0 are registered before layer 1 fails
    with pytest.raises(ValueError, match="no mlp.down_proj"):
        compute_importance(broken, batches)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in broken.modules())
    with pytest.raises(ValueError, match="labels"):
        compute_importance(model, [{"input_ids": batches[0]["input_ids"]}])
    with pytest.raises(ValueError, match="no calibration batches"):
        compute_importance(model, [])


@pytest.fixture(scope="module")
def gemma(tmp_path_factory, tiny_tokenizer, sib200_dir):
    """A saved 4-layer tiny Gemma 3 (the conftest teacher), SIB-200 Hindi dev binarized with it, its calibration set."""
    root = tmp_path_factory.mktemp("importance")
    save_tiny_gemma_teacher(root / "model", tiny_tokenizer)
    tok = AutoTokenizer.from_pretrained(root / "model")
    binarize([sib200_dir / "hin_Deva" / "dev.tsv"], tok, root / "hin", show_progress=False)
    model = Gemma3ForCausalLM.from_pretrained(root / "model", dtype=torch.float32).eval()
    calib = calibration_batches([root / "hin"], tok, num_documents=12, seq_len_tokens=32, micro_batch_size=4, seed=3)
    return root, model, tok, calib


def test_calibration_batches_are_packed_next_token_windows(gemma):
    root, _, tok, calib = gemma
    assert calib.meta["documents"] == 12 and calib.meta["objective"] == "clm" and calib.meta["seed"] == 3
    shapes = [tuple(b["input_ids"].shape) for b in calib.batches]
    assert all(s[1] == 32 for s in shapes) and all(s[0] == 4 for s in shapes[:-1]) and len(shapes) >= 2
    first = calib.batches[0]
    assert set(first) == {"input_ids", "labels", "document_ids", "position_ids"}
    assert torch.equal(first["labels"][:, :-1], first["input_ids"][:, 1:])  # labels are the next token
    again = calibration_batches([root / "hin"], tok, 12, 32, 4, seed=3)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(calib, again))
    first_docs = calibration_batches([root / "hin"], tok, 12, 32, 4, seed=None)
    assert not torch.equal(first_docs.batches[0]["input_ids"], first["input_ids"])
    assert calibration_batches([root / "hin"], tok, 10_000, 32, 4, seed=3).meta["documents"] == 99
    with pytest.raises(ValueError, match="fewer than seq_len_tokens"):
        calibration_batches([root / "hin"], tok, 1, 4096, 4, seed=3)


def _ce(model, batches) -> float:
    """Mean next-token CE of ``model(...).logits`` over every label != -100 of ``batches`` (the reference)."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            logits = model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits
            nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1).double(), b["labels"].flatten(),
                                                     ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((b["labels"] != IGNORE_INDEX).sum())
    return nll / count


def test_losses_and_cosine_match_references(gemma):
    _, model, _, calib = gemma
    imp = compute_importance(model, calib)
    assert imp.base_loss == pytest.approx(_ce(model, calib.batches), rel=1e-5)
    for layer in (1, 3):
        student = build_student_from_teacher(model, [i for i in range(4) if i != layer]).eval()
        assert imp.base_loss + imp.layer_skip_loss[layer] == pytest.approx(_ce(student, calib.batches), rel=1e-5)
    cos_sum, tokens = torch.zeros(3, dtype=torch.float64), 0
    with torch.no_grad():
        for b in calib:
            hs = model.model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False,
                             output_hidden_states=True).hidden_states  # hs[i] = input of layer i (last one is normed)
            for i in range(3):
                cos_sum[i] += torch.nn.functional.cosine_similarity(hs[i], hs[i + 1], dim=-1).double().sum()
            tokens += b["input_ids"].numel()
    assert imp.layer_cosine[:3] == pytest.approx((1 - cos_sum / tokens).tolist(), abs=1e-6)
    assert imp.meta["data"]["tokens"] == tokens and len(imp.meta["model"]["sha256"]) == 64


def test_deterministic_and_round_trip(gemma, tmp_path):
    _, model, _, calib = gemma
    meta = {"model": {"path": "tiny"}, "data": calib.meta}
    first, second = compute_importance(model, calib, meta), compute_importance(model, calib, meta)
    first.save(tmp_path / "a.json")
    second.save(tmp_path / "b.json")
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()
    loaded = Importance.load(tmp_path / "a.json")
    assert loaded == first
    assert loaded.meta["format"] == FORMAT and loaded.meta["data"]["prefixes"] == calib.meta["prefixes"]
    assert loaded.meta["model"]["path"] == "tiny" and loaded.top_heads(1) == first.top_heads(1)
    first.hidden[0] = float("nan")
    with pytest.raises(ValueError, match="field 'hidden' holds a non-finite value"):
        first.save(tmp_path / "c.json")
    assert not (tmp_path / "c.json").exists()


@pytest.mark.parametrize("field, mutate", [
    ("heads", lambda d: d.pop("heads")),
    ("meta.format", lambda d: d["meta"].update(format="other-1")),
    ("layer_skip_loss", lambda d: d["layer_skip_loss"].pop()),
    ("mlp[0]", lambda d: d["mlp"][0].__setitem__(0, "high")),
    ("base_loss", lambda d: d.update(base_loss=None)),
])
def test_load_names_the_bad_field(handmade, tmp_path, field, mutate):
    path = handmade[2].save(tmp_path / "importance.json")
    data = json.loads(path.read_text())
    mutate(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"{path}: field '{re.escape(field)}'"):
        Importance.load(path)


def test_load_refuses_non_json_and_missing_files(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(ValueError, match="x.json: not valid JSON"):
        Importance.load(tmp_path / "x.json")
    with pytest.raises(FileNotFoundError, match="tools/importance.py"):
        Importance.load(tmp_path / "missing.json")


def test_encoders_are_scored_on_masked_batches(bert_tokenizer, sib200_dir, tmp_path):
    binarize([sib200_dir / "hin_Deva" / "dev.tsv"], bert_tokenizer, tmp_path / "hin", show_progress=False)
    calib = calibration_batches([tmp_path / "hin"], bert_tokenizer, 8, 32, 4, seed=5)
    assert calib.meta["objective"] == "mlm" and calib.meta["mask_prob"] == 0.15
    labelled = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in calib)
    assert 0 < labelled < 0.5 * sum(b["input_ids"].numel() for b in calib)
    torch.manual_seed(0)
    vocab = len(bert_tokenizer)
    models = [BertForMaskedLM(BertConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=24, max_position_embeddings=64)),
              DistilBertForMaskedLM(DistilBertConfig(vocab_size=vocab, dim=16, n_layers=2, n_heads=2, hidden_dim=12,
                                                     max_position_embeddings=64))]
    for model, channels in zip(models, (24, 12)):
        imp = compute_importance(model, calib)
        assert [len(r) for r in imp.heads] == [2, 2] and [len(r) for r in imp.mlp] == [channels] * 2
        assert len(imp.hidden) == 16 and len(imp.layer_skip_loss) == 2 and math.isfinite(imp.base_loss)
        assert all(v > 0 for row in imp.heads + imp.mlp for v in row)
    bert = models[0].eval()
    nll = 0.0
    with torch.no_grad():
        for b in calib:
            out = bert(input_ids=b["input_ids"], position_ids=b["position_ids"],
                       attention_mask=(b["document_ids"][:, :, None] == b["document_ids"][:, None, :])[:, None]).logits
            nll += torch.nn.functional.cross_entropy(out.flatten(0, 1), b["labels"].flatten(), reduction="sum").item()
    assert compute_importance(bert, calib).base_loss == pytest.approx(nll / labelled, rel=1e-5)


def test_layer_plot_is_a_png(handmade, tmp_path):
    imp = handmade[2]
    imp.meta["model"]["path"] = "/some/where/tiny-llama"
    path = plot_layer_importance(imp, tmp_path / "plots" / "layers.png")
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert [p.name for p in path.parent.iterdir()] == ["layers.png"]  # no temporary file left


def test_tool_writes_json_and_png_and_prints_the_table(gemma, tmp_path, capsys):
    root = gemma[0]
    tool = load_tool("importance")
    out = tmp_path / "imp"
    rc = tool.main(["--model", str(root / "model"), "--data", str(root / "hin"), "--documents", "8", "--seq-len", "32",
                    "--micro-batch-size", "4", "--seed", "1234", "--output", str(out), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    imp = Importance.load(out / "importance.json")
    assert len(imp.layer_cosine) == 4 and imp.meta["data"]["documents"] == 8 and imp.meta["data"]["seed"] == 1234
    assert imp.meta["model"]["path"] == str(root / "model")
    assert matplotlib.image.imread(out / "importance_layers.png").size > 0
    assert "least important first by 1-cos" in printed and "skip-loss" in printed
    assert tool.main(["--model", str(root / "model"), "--data", str(tmp_path / "nope"), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope" in err
