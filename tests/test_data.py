"""Corpora, tokenizer, splits and batches."""

from __future__ import annotations

import pytest
import torch

from moelab.data import DOMAINS, ByteTokenizer, multidomain_corpus, stdlib_corpus


def test_byte_tokenizer_round_trip():
    tokenizer = ByteTokenizer()
    text = "def f(x): return x ** 2  # ü"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert max(tokenizer.encode(text)) < tokenizer.vocab_size


def test_stdlib_corpus_is_real_python_source_and_deterministic():
    corpus = stdlib_corpus(max_bytes=20_000)
    assert len(corpus) == 20_000
    text = corpus.tokenizer.decode(corpus.tokens)
    assert "def " in text and "import " in text
    assert torch.equal(stdlib_corpus(max_bytes=20_000).tokens, corpus.tokens)


def test_multidomain_labels_match_generated_lines():
    corpus = multidomain_corpus(5_000, seed=3)
    assert corpus.domain_names == DOMAINS and len(corpus) == len(corpus.domains) == 5_000
    text = corpus.tokenizer.decode(corpus.tokens)
    lines, start = [], 0
    for line in text.split("\n")[:-1]:
        label = corpus.domains[start].item()
        assert (corpus.domains[start:start + len(line) + 1] == label).all()
        lines.append((DOMAINS[label], line))
        start += len(line) + 1
    for domain, line in lines:
        if domain == "arithmetic":
            left, right = line.split("=")
            assert eval(left) == int(right)  # noqa: S307 - generated digits and +/- only
        elif domain == "sorting":
            values, result = line[5:].split(" : ")
            assert sorted(values.split()) == result.split()
        elif domain == "reverse":
            word, result = line[4:].split(" : ")
            assert word[::-1] == result
    assert {d for d, _ in lines} == set(DOMAINS)
    assert torch.equal(multidomain_corpus(5_000, seed=3).tokens, corpus.tokens)
    assert not torch.equal(multidomain_corpus(5_000, seed=4).tokens, corpus.tokens)


def test_batches_are_shifted_windows_and_seeded():
    corpus = multidomain_corpus(2_000)
    x, y, d = corpus.batch_with_domains(4, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == d.shape == (4, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])
    x2, _ = corpus.batch(4, 16, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)


def test_split_keeps_order_and_sizes():
    corpus = stdlib_corpus(max_bytes=1_000)
    train, val = corpus.split(0.2)
    assert len(train) == 800 and len(val) == 200
    assert torch.equal(torch.cat([train.tokens, val.tokens]), corpus.tokens)


def test_too_small_corpus_says_what_to_change():
    corpus = multidomain_corpus(50)
    with pytest.raises(ValueError, match="block_size=64 needs at least 65"):
        corpus.batch(2, 64)
    with pytest.raises(ValueError, match="val_fraction"):
        corpus.split(1.5)
    with pytest.raises(ValueError, match="no domain labels"):
        stdlib_corpus(max_bytes=500).batch_with_domains(1, 8)
