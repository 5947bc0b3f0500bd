"""Sampling continuations (seeding, greedy vs an argmax loop, the generated mask) and sequence-level KD datasets."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import free_port
from megadistill import generate
from megadistill.data.binarize import binarize
from megadistill.data.indexed import IndexedDataset, open_checked_datasets, read_provenance
from megadistill.data.inspect import validate
from megadistill.generate import (SamplingConfig, check_output, generate_dataset, sample_continuations,
                                  state_dict_sha256)
from megadistill.models.teacher import load_teacher
from tools import generate as generate_tool

EOS, PAD, BOS = 1, 0, 2
P, N = 6, 8  # prompt ids, sampled ids


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_tokenizer, sib200_dir):
    """A tiny Llama (6 padded output rows beyond the tokenizer) saved with its tokenizer, and two Hindi sources.

    ``data/short``: 4 documents, the 1st and 3rd too short for a 6-token prompt; ``data/hin``: SIB-200 dev (99).
    """
    root = tmp_path_factory.mktemp("generate")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tiny_tokenizer) + 6, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    LlamaForCausalLM(cfg).save_pretrained(root / "model")
    tiny_tokenizer.save_pretrained(root / "model")
    _, tokenizer = load_teacher(root / "model")
    long_text = "भारत एक विशाल देश है और यहाँ बहुत सी भाषाएँ बोली जाती हैं"
    short = root / "text" / "hin_Deva" / "short.txt"
    short.parent.mkdir(parents=True)
    short.write_text(f"है\n\n{long_text}\n\nहाँ\n\n{long_text} और भी\n", encoding="utf-8")
    binarize([short], tokenizer, root / "data" / "short", show_progress=False)
    binarize([sib200_dir / "hin_Deva" / "dev.tsv"], tokenizer, root / "data" / "hin", show_progress=False)
    return root


@pytest.fixture(scope="module")
def teacher(workspace):
    """``(model, tokenizer)`` as the tool loads them (eval mode, frozen)."""
    return load_teacher(workspace / "model")


def prompts(batch=4, seed=0, vocab=700):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (batch, P), generator=g)


def sample(model, ids, seed=1, **sampling):
    return sample_continuations(model, ids, SamplingConfig(max_new_tokens=N, **sampling), eos_token_id=EOS,
                                pad_token_id=PAD, seed=seed)


# --------------------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("field, value", [("max_new_tokens", 0), ("max_new_tokens", True), ("temperature", -0.5),
                                          ("temperature", float("inf")), ("top_p", 0.0), ("top_p", 1.5),
                                          ("seed", -1), ("seed", 1.5)])
def test_sampling_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"SamplingConfig.{field}"):
        SamplingConfig(**{field: value})


def test_same_seed_same_samples_other_seed_other_samples_and_caller_rng_untouched(teacher):
    model, _ = teacher
    ids = prompts()
    state = torch.get_rng_state()
    first = sample(model, ids, seed=11)
    assert torch.equal(torch.get_rng_state(), state)
    again = sample(model, ids, seed=11)
    other = sample(model, ids, seed=12)
    assert first.sequences.shape == first.generated.shape == (4, P + N)
    assert first.sequences.dtype == torch.int64 and first.generated.dtype == torch.bool
    assert torch.equal(first.sequences, again.sequences) and torch.equal(first.generated, again.generated)
    assert not torch.equal(first.sequences, other.sequences)
    assert torch.equal(first.sequences[:, :P], ids)


def test_greedy_equals_an_argmax_loop_over_the_model_logits(teacher):
    model, _ = teacher
    ids = prompts(batch=3, seed=1)
    got = sample(model, ids, temperature=0.0)
    reference = ids.clone()
    with torch.no_grad():
        for _ in range(N):
            reference = torch.cat([reference, model(reference).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got.sequences[got.generated], reference[got.generated])
    assert torch.equal(got.sequences[:, :P], ids)


def eos_biased(model, bias: float):
    """A copy of ``model`` whose output projection adds ``bias`` to the EOS logit."""
    import copy

    biased = copy.deepcopy(model)
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[EOS] = bias
    biased.lm_head = head
    return biased


def test_generated_mask_runs_from_the_prompt_to_the_first_eos(teacher):
    model, _ = teacher
    ids = prompts(batch=16, seed=2)
    samples = sample(eos_biased(model, 4.5), ids, seed=3)  # EOS about 1 step in 9: rows end at varying steps
    ended = 0
    for row, mask in zip(samples.sequences, samples.generated):
        hits = (row[P:] == EOS).nonzero()
        last = P + int(hits[0]) if len(hits) else P + N - 1
        expected = torch.zeros(P + N, dtype=torch.bool)
        expected[P:last + 1] = True
        assert torch.equal(mask, expected)
        assert (row[last + 1:] == PAD).all()
        ended += bool(len(hits)) and last < P + N - 1
    assert 2 <= ended <= 14  # some rows stopped early, others ran to max_new_tokens
    assert torch.equal(samples.lengths, P + samples.generated.sum(1))
    # EOS at once for every row: generate stops after one step, the output is still [B, P + N].
    first = sample(eos_biased(model, 1e4), ids, temperature=0.0)
    assert first.sequences.shape == (16, P + N)
    assert (first.sequences[:, P] == EOS).all() and (first.sequences[:, P + 1:] == PAD).all()
    assert first.generated.sum().item() == 16 and first.generated[:, P].all()


def test_train_mode_is_restored_and_padded_rows_are_never_sampled(teacher):
    model, _ = teacher
    model.train()
    try:
        samples = sample_continuations(model, prompts(), SamplingConfig(max_new_tokens=N, temperature=2.0),
                                       eos_token_id=EOS, pad_token_id=PAD, seed=5, vocab_size=40)
        assert model.training
    finally:
        model.eval()
    assert (samples.sequences[samples.generated] < 40).all()


def test_synced_gpus_samples_the_same_with_one_rank(teacher):
    import torch.distributed as dist

    model, _ = teacher
    ids = prompts(seed=4)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        synced = sample_continuations(model, ids, SamplingConfig(max_new_tokens=N), eos_token_id=EOS,
                                      pad_token_id=PAD, seed=9, synced_gpus=True)
    finally:
        dist.destroy_process_group()
    assert torch.equal(synced.sequences, sample(model, ids, seed=9).sequences)


def test_bad_prompts_are_refused(teacher):
    with pytest.raises(ValueError, match="prompt_ids"):
        sample(teacher[0], torch.zeros(4, dtype=torch.long))


# --------------------------------------------------------------------------------------- datasets


SAMPLING = SamplingConfig(max_new_tokens=N, temperature=1.0, top_p=0.9, seed=7)


def run_generate(teacher, workspace, out, **kwargs):
    model, tokenizer = teacher
    options = dict(prompt_tokens=P, num_prompts=10, batch_size=4, sampling=SAMPLING, model_name="tiny", progress=False)
    options.update(kwargs)
    return generate_dataset(model, tokenizer, [workspace / "data" / "short", workspace / "data" / "hin"], out, **options)


def files(prefix: Path) -> list[Path]:
    return [Path(f"{prefix}{s}") for s in (".bin", ".idx", ".json")]


def test_dataset_round_trips_and_passes_the_training_checks(teacher, workspace, tmp_path):
    model, tokenizer = teacher
    out = tmp_path / "gen"
    meta = run_generate(teacher, workspace, out)
    ds = IndexedDataset(out)
    short, hin = IndexedDataset(workspace / "data" / "short"), IndexedDataset(workspace / "data" / "hin")
    sources = [short[1], short[3]] + [d for d in hin if len(d) > P][:8]
    assert len(ds) == 10 and meta == read_provenance(out)
    for doc, source in zip(ds, sources):
        assert doc[:P].tolist() == source[:P].tolist() and doc[0] == BOS
        assert doc[-1] == EOS and EOS not in doc[:-1].tolist() and P + 1 <= len(doc) <= P + N + 1
    gen = meta["generation"]
    cut = sum(len(d) == P + N + 1 for d in ds)
    assert gen["cut_at_max_new_tokens"] == cut and gen["documents"] == meta["documents"] == 10
    assert gen["generated_tokens"] == sum(len(d) - P for d in ds) - cut
    assert meta["tokens"] == gen["tokens"] == ds.num_tokens
    assert gen["prompts_skipped"] == 2 and meta["dropped"] == {"prompt_too_short": 2}
    assert [(s["prompts"], s["skipped"]) for s in gen["source"]] == [(2, 2), (8, 0)]
    assert gen["sampling"] == dataclasses.asdict(SAMPLING) and gen["model"] == "tiny" and gen["prompt_tokens"] == P
    assert gen["model_sha256"] == state_dict_sha256(model) == state_dict_sha256(load_teacher(workspace / "model")[0])
    source_meta = read_provenance(workspace / "data" / "hin")
    for key in ("tokenizer", "framing", "bos_id", "eos_id", "add_bos", "language", "script", "dtype"):
        assert meta[key] == source_meta[key], key
    open_checked_datasets([out, workspace / "data" / "hin"], tokenizer, "decoder")  # as a training run does
    assert validate(out, check_ids=True) == []
    # Same seed, same bytes.
    run_generate(teacher, workspace, tmp_path / "again")
    assert Path(f"{out}.bin").read_bytes() == Path(f"{tmp_path / 'again'}.bin").read_bytes()


def test_existing_output_is_refused_unless_overwrite(teacher, workspace, tmp_path):
    out = tmp_path / "gen"
    run_generate(teacher, workspace, out, num_prompts=3)
    with pytest.raises(FileExistsError, match=r"gen\.bin exists.*overwrite"):
        run_generate(teacher, workspace, out)
    meta = run_generate(teacher, workspace, out, num_prompts=5, overwrite=True)
    assert meta["documents"] == len(IndexedDataset(out)) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen.bin", "gen.idx", "gen.json"]


def test_error_midway_leaves_no_file_and_the_previous_output_intact(teacher, workspace, tmp_path, monkeypatch):
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("sampler broke")
        return real(*args, **kwargs)

    real = generate.sample_continuations
    monkeypatch.setattr(generate, "sample_continuations", failing)
    with pytest.raises(RuntimeError, match="sampler broke"):
        run_generate(teacher, workspace, tmp_path / "gen")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(generate, "sample_continuations", real)
    run_generate(teacher, workspace, tmp_path / "gen", num_prompts=3)
    before = [p.read_bytes() for p in files(tmp_path / "gen")]
    monkeypatch.setattr(generate, "sample_continuations", failing)
    calls.clear()
    with pytest.raises(RuntimeError, match="sampler broke"):
        run_generate(teacher, workspace, tmp_path / "gen", overwrite=True)
    assert [p.read_bytes() for p in files(tmp_path / "gen")] == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen.bin", "gen.idx", "gen.json"]


def test_bad_arguments_are_refused(teacher, workspace, tmp_path):
    with pytest.raises(ValueError, match="prompt_tokens"):
        run_generate(teacher, workspace, tmp_path / "gen", prompt_tokens=0)
    with pytest.raises(ValueError, match="longer than prompt_tokens=1000"):
        run_generate(teacher, workspace, tmp_path / "gen", prompt_tokens=1000)
    with pytest.raises(FileNotFoundError, match="missing"):
        generate_dataset(*teacher, [tmp_path / "missing"], tmp_path / "gen", prompt_tokens=P, num_prompts=2,
                         batch_size=2, sampling=SAMPLING, model_name="tiny", progress=False)
    assert check_output(tmp_path / "gen") == tmp_path / "gen" and list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ tool


def test_tool_end_to_end(workspace, tmp_path, capsys):
    out = tmp_path / "gen"
    args = ["--model", str(workspace / "model"), "--data", str(workspace / "data" / "hin"), "--output", str(out),
            "--prompt-tokens", "4", "--max-new-tokens", "6", "--num-prompts", "5", "--batch-size", "2",
            "--temperature", "1.0", "--top-p", "0.95", "--seed", "3", "--no-progress", "--device", "cpu"]
    assert generate_tool.main(args) == 0
    printed = capsys.readouterr().out
    assert "5 documents" in printed and "tokens/s" in printed and f"{out}.json" in printed
    meta = read_provenance(out)
    assert meta["generation"]["sampling"] == {"max_new_tokens": 6, "temperature": 1.0, "top_p": 0.95, "seed": 3}
    assert len(IndexedDataset(out)) == 5
    assert generate_tool.main(args) == 2  # exists
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "gen.bin exists" in err and "--overwrite" in err
    assert generate_tool.main(args[:3] + [str(tmp_path / "nope")] + args[4:] + ["--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope" in err and "not found" in err
    assert generate_tool.main(args + ["--overwrite", "--top-p", "0"]) == 2
    assert "SamplingConfig.top_p" in capsys.readouterr().err
