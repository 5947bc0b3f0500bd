"""Cross-tokenizer KD (ULD, span-aligned) checked by hand, against a plain loop reference and token-level KD."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megadistill.losses.cross_tokenizer import SharedVocab, SpanAlignment, cross_tokenizer_loss
from megadistill.losses.logits import chunked_distill_loss
from megadistill.objectives.spec import KDSpec, LossNormalizer


def rows_with_probs(*distributions):
    """``(hidden, weight)`` with identity hidden rows, so row ``r``'s logits are ``log(distributions[r])``."""
    log_p = torch.log(torch.tensor(distributions, dtype=torch.float64))
    return torch.eye(len(distributions), dtype=torch.float64), log_p.T.contiguous()


def single_group_kd(student_probs, teacher_probs, method="uld", temperature=1.0, shared=None,
                    student_group=(0,), student_labels=(-100,)):
    """kd_sum of one group from explicit per-row student and teacher probabilities (ce_weight 0)."""
    hs, ws = rows_with_probs(*student_probs)
    ht, wt = rows_with_probs(*teacher_probs)
    alignment = SpanAlignment(torch.tensor(student_group), torch.zeros(len(teacher_probs), dtype=torch.int64), 1)
    spec = KDSpec(vocab_size=ws.shape[0], ce_weight=0.0, temperature=temperature)
    out = cross_tokenizer_loss(hs, ws, torch.tensor(student_labels), ht, wt, torch.full((len(teacher_probs),), -100),
                               alignment, spec, method, shared=shared)
    assert out.kd_tokens.item() == 1
    return out.kd_sum.item()


def test_uld_by_hand_smaller_student():
    # sorted: student 0.5 0.3 0.2, teacher 0.6 0.25 0.1 0.05 -> 0.1 + 0.05 + 0.1 + 0.05
    kd = single_group_kd([[0.2, 0.5, 0.3]], [[0.05, 0.6, 0.1, 0.25]])
    assert kd == pytest.approx(0.3, abs=1e-6)


def test_uld_by_hand_smaller_teacher():
    kd = single_group_kd([[0.05, 0.6, 0.1, 0.25]], [[0.2, 0.5, 0.3]])
    assert kd == pytest.approx(0.3, abs=1e-6)


def test_uld_by_hand_at_temperature_two():
    s, t = torch.tensor([0.2, 0.5, 0.3]), torch.tensor([0.05, 0.6, 0.1, 0.25])
    s2, t2 = s.sqrt() / s.sqrt().sum(), t.sqrt() / t.sqrt().sum()  # softmax(log p / 2)
    s_sorted = torch.cat([s2.sort(descending=True).values, torch.zeros(1)])
    expected = 4.0 * (s_sorted - t2.sort(descending=True).values).abs().sum().item()
    assert single_group_kd([s.tolist()], [t.tolist()], temperature=2.0) == pytest.approx(expected, abs=1e-6)


def test_span_chain_rule_two_tokens_against_one():
    # student rows 0 and 1 form the span; row 1 gives its label (id 1) probability 0.8: q_s = 0.8 * [0.5, 0.5]
    student = [[0.5, 0.5], [0.2, 0.8]]
    teacher = [[0.7, 0.3]]
    common = dict(method="span", student_group=(0, 0), student_labels=(0, 1))
    identity = SharedVocab(torch.tensor([0, 1]), torch.tensor([0, 1]))
    expected_kl = 0.7 * math.log(0.7 / 0.4) + 0.3 * math.log(0.3 / 0.4) - 1.0 + 0.8
    assert single_group_kd(student, teacher, shared=identity, **common) == pytest.approx(expected_kl, abs=1e-6)
    # nothing shared: sorted L1 of [0.4, 0.4] and [0.7, 0.3]
    assert single_group_kd(student, teacher, **common) == pytest.approx(0.3 + 0.1, abs=1e-6)
    # student id 0 is teacher id 1: KL part on that pair, L1 on student id 1 (0.4) vs teacher id 0 (0.7)
    crossed = SharedVocab(torch.tensor([0]), torch.tensor([1]))
    expected = 0.3 * math.log(0.3 / 0.4) - 0.3 + 0.4 + abs(0.4 - 0.7)
    assert single_group_kd(student, teacher, shared=crossed, **common) == pytest.approx(expected, abs=1e-6)


def softcap(z, cap):
    return z if cap is None else cap * torch.tanh(z / cap)


def reference_loss(hs, ws, ls, ht, wt, lt, alignment, spec, method, shared=None, normalizer=None):
    """Plain implementation: full logits, a Python loop over groups, full sorts, autograd. Returns (loss, ce, kd, G)."""
    vocab, tau = spec.vocab_size, spec.temperature
    zs = softcap(hs @ ws[:vocab].T, spec.student_softcap)
    zt = softcap(ht @ wt.T, spec.teacher_softcap).detach()
    ce = F.cross_entropy(zs, ls, ignore_index=-100, reduction="sum")
    lps, lpt = F.log_softmax(zs / tau, -1), F.log_softmax(zt / tau, -1)
    kd, groups = torch.zeros((), dtype=hs.dtype), 0
    for k in range(alignment.num_groups):
        s_rows = (alignment.student_group == k).nonzero().flatten().tolist()
        t_rows = (alignment.teacher_group == k).nonzero().flatten().tolist()
        if not s_rows:
            continue
        groups += 1
        log_qs, log_qt = lps[s_rows[0]], lpt[t_rows[0]]
        if method == "span":
            log_qs = log_qs + sum(lps[r, ls[r]] for r in s_rows[1:])
            log_qt = log_qt + sum(lpt[r, lt[r]] for r in t_rows[1:])
        matched, s_keep, t_keep = 0.0, list(range(vocab)), list(range(wt.shape[0]))
        if method == "span" and shared is not None:
            ms, mt = shared.student_ids.tolist(), shared.teacher_ids.tolist()
            p, q = log_qt[mt].exp(), log_qs[ms].exp()
            matched = (p * (log_qt[mt] - log_qs[ms]) - p + q).sum()
            s_keep = [i for i in s_keep if i not in ms]
            t_keep = [i for i in t_keep if i not in mt]
        a = log_qs[s_keep].exp().sort(descending=True).values
        b = log_qt[t_keep].exp().sort(descending=True).values
        width = max(a.numel(), b.numel())
        l1 = (F.pad(a, (0, width - a.numel())) - F.pad(b, (0, width - b.numel()))).abs().sum()
        kd = kd + tau**2 * (matched + l1)
    n_ce = (ls != -100).sum().clamp(min=1) if normalizer is None else normalizer.ce_tokens
    n_kd = max(groups, 1) if normalizer is None else normalizer.kd_tokens
    return spec.ce_weight * ce / n_ce + spec.kd_weight * kd / n_kd, ce.detach(), kd.detach(), groups


def random_alignment(n_groups, gen, max_rows=3):
    """Group ids for both sides: consecutive rows per group, unaligned (-1) rows between some groups and at the end."""
    sides = []
    for _ in range(2):
        ids = []
        for k in range(n_groups):
            if torch.rand((), generator=gen) < 0.2:
                ids.append(-1)
            ids += [k] * int(torch.randint(1, max_rows + 1, (), generator=gen))
        sides.append(torch.tensor(ids + [-1, -1]))
    return SpanAlignment(sides[0], sides[1], n_groups)


def random_case(vs, vt, seed=0, n_groups=6, padded_rows=2, dtype=torch.float32):
    """Random hidden states, heads, labels (-100 on some first/unaligned rows), alignment and a partial SharedVocab."""
    gen = torch.Generator().manual_seed(seed)
    alignment = random_alignment(n_groups, gen)
    ns, nt = alignment.student_group.numel(), alignment.teacher_group.numel()
    ls = torch.randint(0, vs, (ns,), generator=gen)
    first_or_unaligned = torch.ones(ns, dtype=torch.bool)
    first_or_unaligned[1:] = alignment.student_group[1:] != alignment.student_group[:-1]
    first_or_unaligned |= alignment.student_group < 0
    ls[first_or_unaligned & (torch.rand(ns, generator=gen) < 0.5)] = -100
    m = min(vs, vt) // 2
    shared = SharedVocab(torch.randperm(vs, generator=gen)[:m], torch.randperm(vt, generator=gen)[:m])
    return dict(
        student_hidden=torch.randn(ns, 5, generator=gen, dtype=dtype),
        student_weight=torch.randn(vs + padded_rows, 5, generator=gen, dtype=dtype),
        student_labels=ls,
        teacher_hidden=torch.randn(nt, 4, generator=gen, dtype=dtype),
        teacher_weight=2 * torch.randn(vt, 4, generator=gen, dtype=dtype),
        teacher_labels=torch.randint(0, vt, (nt,), generator=gen),
        alignment=alignment,
    ), shared


def run_both(case, spec, method, shared, normalizer=None, grad_scale=1.0):
    """(chunked output and grads, reference values and grads) on fresh leaf copies of the student tensors."""
    results = []
    for fn in (cross_tokenizer_loss, reference_loss):
        hs = case["student_hidden"].clone().requires_grad_()
        ws = case["student_weight"].clone().requires_grad_()
        args = (hs, ws, case["student_labels"], case["teacher_hidden"], case["teacher_weight"],
                case["teacher_labels"], case["alignment"], spec, method)
        if fn is cross_tokenizer_loss:
            out = fn(*args, shared=shared, normalizer=normalizer)
            values = (out.loss, out.ce_sum, out.kd_sum, int(out.kd_tokens))
        else:
            values = fn(*args, shared=shared, normalizer=normalizer)
        (values[0] * grad_scale).backward()
        results.append((values, hs.grad, ws.grad))
    return results


@pytest.mark.parametrize("method", ["uld", "span"])
@pytest.mark.parametrize("vs,vt", [(11, 17), (17, 11)])
@pytest.mark.parametrize("chunk", [1, 3, 1000])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_equals_reference(method, vs, vt, chunk, temperature):
    case, shared = random_case(vs, vt, seed=chunk + vs)
    spec = KDSpec(vocab_size=vs, ce_weight=0.6, kd_weight=1.7, temperature=temperature, chunk_size_tokens=chunk,
                  student_softcap=4.0, teacher_softcap=5.0)
    for shared_vocab in ([shared, None] if method == "span" else [None]):
        (got, g_h, g_w), (want, r_h, r_w) = run_both(case, spec, method, shared_vocab, grad_scale=2.5)
        for a, b in zip(got[:3], want[:3]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert got[3] == want[3] == 6
        torch.testing.assert_close(g_h, r_h, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(g_w, r_w, atol=1e-5, rtol=1e-5)
        assert g_w[vs:].abs().max() == 0  # padding rows of the head


def test_normalizer_divisors_and_no_grad_path():
    case, shared = random_case(9, 13, seed=3)
    spec = KDSpec(vocab_size=9, ce_weight=0.5, kd_weight=2.0, temperature=1.5, chunk_size_tokens=2)
    normalizer = LossNormalizer(ce_tokens=7.0, kd_tokens=3.5)
    (got, g_h, _), (want, r_h, _) = run_both(case, spec, "span", shared, normalizer=normalizer)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_h, r_h, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        out = cross_tokenizer_loss(*case.values(), spec, "span", shared=shared, normalizer=normalizer)
    torch.testing.assert_close(out.loss, want[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_identical_tokenizers_span_is_token_forward_kl(temperature):
    gen = torch.Generator().manual_seed(7)
    n, vocab = 12, 10
    hs = torch.randn(n, 6, generator=gen, requires_grad=True)
    ws = torch.randn(vocab + 3, 6, generator=gen, requires_grad=True)  # 3 padding rows
    ht, wt = torch.randn(n, 4, generator=gen), torch.randn(vocab, 4, generator=gen)
    labels = torch.randint(0, vocab, (n,), generator=gen)
    spec = KDSpec(vocab_size=vocab, ce_weight=0.8, kd_weight=1.4, temperature=temperature, chunk_size_tokens=5,
                  divergence="forward_kl", student_softcap=3.0, teacher_softcap=6.0)
    rows = torch.arange(n)
    out = cross_tokenizer_loss(hs, ws, labels, ht, wt, labels, SpanAlignment(rows, rows, n), spec, "span",
                               shared=SharedVocab(torch.arange(vocab), torch.arange(vocab)))
    grads = torch.autograd.grad(out.loss, [hs, ws])
    ref = chunked_distill_loss(hs, ws, labels, spec, teacher_hidden=ht, teacher_weight=wt)
    ref_grads = torch.autograd.grad(ref.loss, [hs, ws])
    for a, b in [(out.loss, ref.loss), (out.kd_sum, ref.kd_sum), (out.ce_sum, ref.ce_sum), *zip(grads, ref_grads)]:
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert out.kd_tokens.item() == ref.kd_tokens.item() == n


def test_unaligned_rows_are_excluded():
    case, shared = random_case(8, 12, seed=5)
    spec = KDSpec(vocab_size=8, temperature=2.0, chunk_size_tokens=4)
    base = cross_tokenizer_loss(*case.values(), spec, "span", shared=shared)
    unaligned_s = case["alignment"].student_group < 0
    unaligned_t = case["alignment"].teacher_group < 0
    case["student_labels"] = case["student_labels"].masked_fill(unaligned_s, -100)
    clean = cross_tokenizer_loss(*case.values(), spec, "span", shared=shared)
    case["student_hidden"] = case["student_hidden"].masked_fill(unaligned_s.unsqueeze(1), float("nan"))
    case["teacher_hidden"] = case["teacher_hidden"].masked_fill(unaligned_t.unsqueeze(1), float("nan"))
    case["teacher_labels"] = case["teacher_labels"].masked_fill(unaligned_t, -100)
    hs = case["student_hidden"].requires_grad_()
    poisoned = cross_tokenizer_loss(*case.values(), spec, "span", shared=shared)
    poisoned.loss.backward()
    assert base.kd_sum.item() == pytest.approx(clean.kd_sum.item(), abs=1e-6)  # -1 rows give no KD
    torch.testing.assert_close(poisoned.loss, clean.loss)
    assert torch.isfinite(hs.grad).all() and hs.grad[unaligned_s].abs().max() == 0


@pytest.mark.parametrize("method", ["uld", "span"])
def test_gradcheck_double(method):
    case, shared = random_case(5, 7, seed=11, n_groups=3, padded_rows=1, dtype=torch.float64)
    spec = KDSpec(vocab_size=5, ce_weight=0.7, kd_weight=1.3, temperature=1.5, chunk_size_tokens=2,
                  student_softcap=3.0)
    rest = {k: v for k, v in case.items() if k not in ("student_hidden", "student_weight")}

    def loss(hs, ws):
        return cross_tokenizer_loss(hs, ws, rest["student_labels"], rest["teacher_hidden"], rest["teacher_weight"],
                                    rest["teacher_labels"], rest["alignment"], spec, method, shared=shared).loss

    inputs = (case["student_hidden"].requires_grad_(), case["student_weight"].requires_grad_())
    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-6)


def test_kd_weight_zero_is_plain_ce():
    case, _ = random_case(8, 12, seed=2)
    spec = KDSpec(vocab_size=8, kd_weight=0.0)
    out = cross_tokenizer_loss(*case.values(), spec, "uld")
    z = case["student_hidden"] @ case["student_weight"][:8].T
    torch.testing.assert_close(out.loss, F.cross_entropy(z, case["student_labels"], ignore_index=-100))
    assert out.kd_sum.item() == 0 and out.kd_tokens.item() == 0


def call_with(**changes):
    """cross_tokenizer_loss on a valid small case with some arguments replaced."""
    case, shared = random_case(8, 12, seed=1)
    args = dict(case, spec=KDSpec(vocab_size=8), method="span", shared=shared)
    args.update(changes)
    return cross_tokenizer_loss(**args)


def test_bad_inputs_raise_value_error():
    case, _ = random_case(8, 12, seed=1)
    ns = case["student_hidden"].shape[0]
    group_s, group_t = case["alignment"].student_group, case["alignment"].teacher_group
    bad = [  # (change, what the one-line message says)
        (dict(student_weight=torch.randn(10, 4)), "student_weight .* same width"),
        (dict(teacher_weight=torch.randn(12, 5)), "teacher_weight .* same width"),
        (dict(student_labels=torch.zeros(ns - 1, dtype=torch.int64)), "student_labels must be"),
        (dict(spec=KDSpec(vocab_size=11)), "rows of student_weight"),
        (dict(student_labels=torch.full((ns,), 8)), "student label .* outside"),
        (dict(alignment=SpanAlignment(group_s[:-1], group_t, 6)), "alignment groups must be"),
        (dict(alignment=SpanAlignment(group_s, group_t, 5)), r"ids must be in \[-1, 5\)"),
        (dict(alignment=SpanAlignment(group_s.masked_fill(group_s == 2, -1), group_t, 6)), "group 2 .* one side"),
        (dict(alignment=SpanAlignment(torch.cat([group_s[:-1], group_s.new_tensor([0])]), group_t, 6)),
         "group 0 are not consecutive"),
        (dict(teacher_labels=torch.full_like(case["teacher_labels"], -100)), "teacher label of a span row -100"),
        (dict(method="kl"), "method must be one of"),
        (dict(shared=SharedVocab(torch.tensor([0, 8]), torch.tensor([0, 1]))), "SharedVocab student id 8"),
        (dict(shared=SharedVocab(torch.tensor([0, 0]), torch.tensor([0, 1]))), "repeat"),
    ]
    for change, message in bad:
        with pytest.raises(ValueError, match=message) as err:
            call_with(**change)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="two \\[M\\] tensors"):
        SharedVocab(torch.tensor([0, 1]), torch.tensor([0]))


def word_level_tokenizer(vocab, special, added=()):
    """A WordLevel PreTrainedTokenizerFast with ``special`` tokens marked special and ``added`` plain added tokens."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token=special[0])))
    tok.add_special_tokens({"additional_special_tokens": list(special)})
    tok.add_tokens(list(added))
    return tok


def test_shared_vocab_from_tokenizers():
    student = word_level_tokenizer({"<pad>": 0, "<bos>": 1, "▁a": 2, "b": 3, "<0xE0>": 4, "x": 5},
                                   special=["<pad>", "<bos>", "<mask>"], added=["<b>"])
    teacher = word_level_tokenizer({"<pad>": 0, "<bos>": 1, "<eos>": 2, "x": 3, "▁a": 4, "<0xE0>": 5, "c": 6},
                                   special=["<pad>", "<bos>", "<eos>", "<mask>"], added=["<b>"])
    shared = SharedVocab.from_tokenizers(student, teacher)
    s_b, t_b = student.convert_tokens_to_ids("<b>"), teacher.convert_tokens_to_ids("<b>")
    pairs = list(zip(shared.student_ids.tolist(), shared.teacher_ids.tolist()))
    assert pairs == [(2, 4), (4, 5), (5, 3), (s_b, t_b)]  # specials (<pad>, <bos>, <mask>) left out
    assert shared.student_ids.dtype == shared.teacher_ids.dtype == torch.int64
