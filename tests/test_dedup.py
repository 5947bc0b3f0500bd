"""Tests for megadistill.data.dedup: the compact hash set against a Python set, sentence dedup."""

from __future__ import annotations

import random

from megadistill.data.dedup import HashSet, dedup_sentences, sentence_hash


def test_hash_set_matches_python_set_across_runs_and_merges():
    rng = random.Random(0)
    values = [rng.getrandbits(64) for _ in range(3000)] * 2  # every value inserted twice
    rng.shuffle(values)
    compact, reference = HashSet(buffer_entries=7), set()  # tiny buffer: many sorted runs and merges
    for v in values:
        assert compact.add_new(v) == (v not in reference)
        reference.add(v)
    assert len(compact) == len(reference) == 3000
    assert len(compact._runs) < 12  # runs are merged log-structured, not one per flush
    assert all(v in compact for v in reference)
    assert sum(rng.getrandbits(64) in compact for _ in range(1000)) == 0


def test_dedup_sentences_keeps_first_occurrence_and_blank_lines():
    seen = HashSet()
    assert dedup_sentences("a\nb\n\nc", seen) == ("a\nb\n\nc", 0)
    assert dedup_sentences("b \nd\n\na", seen) == ("d\n", 2)  # trailing space does not make "b " new
    assert dedup_sentences("c", seen) == ("", 1)
    assert sentence_hash("x") == sentence_hash(" x ") != sentence_hash("y")
