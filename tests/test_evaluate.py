"""Per-slice evaluation and slice comparison: metrics are right, a destroyed class is flagged, noise is not."""
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from prunekit.errors import CompareError, MetricError
from prunekit.evaluate import EvalResult, TokenWindows, compare_slices, from_callable
from prunekit.evaluate.core import evaluate

N_CLASSES, PER_CLASS, DIM = 6, 60, 6


def _blobs(per_class=PER_CLASS, seed=0, small_class=None):
    """Well separated Gaussian blobs: an identity linear layer classifies them ~97% right."""
    g = torch.Generator().manual_seed(seed)
    counts = [per_class] * N_CLASSES
    if small_class is not None:
        counts[small_class] = 6
    y = torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])
    x = F.one_hot(y, DIM).float() * 3.0 + torch.randn(len(y), DIM, generator=g) * 0.8
    return x, y


def _identity_classifier():
    m = nn.Linear(DIM, N_CLASSES)
    with torch.no_grad():
        m.weight.copy_(torch.eye(DIM))
        m.bias.zero_()
    return m


def _destroy(model, cls):
    """Copy of the classifier that can never predict class `cls`."""
    m = _identity_classifier()
    m.load_state_dict(model.state_dict())
    with torch.no_grad():
        m.weight[cls].zero_()
        m.bias[cls] = -100.0
    return m


class NoisyLogits(nn.Module):
    """Adds seeded Gaussian noise to the logits: degrades every class alike in expectation (pure noise)."""

    def __init__(self, inner, std, seed):
        super().__init__()
        self.inner, self.std, self.g = inner, std, torch.Generator().manual_seed(seed)

    def forward(self, x):
        out = self.inner(x)
        return out + torch.randn(out.shape, generator=self.g) * self.std


def test_accuracy_overall_and_per_class_match_manual():
    x, y = _blobs()
    model = _identity_classifier()
    res = evaluate(model, (x, y), metric="accuracy", batch_size=50)
    pred = model(x).argmax(1)
    assert res.value == pytest.approx((pred == y).float().mean().item())
    assert set(res.slices) == set(range(N_CLASSES))
    for k in range(N_CLASSES):
        assert res.slices[k]["n"] == PER_CLASS
        assert res.slices[k]["value"] == pytest.approx((pred[y == k] == k).float().mean().item())
    assert res.rows.shape == (N_CLASSES * PER_CLASS, 1)


def test_destroyed_class_is_flagged():
    x, y = _blobs()
    dense = _identity_classifier()
    ref = evaluate(dense, (x, y))
    res = evaluate(_destroy(dense, 3), (x, y), reference=ref, n_boot=400)
    cmp = res.comparison
    assert cmp.flagged == [3]
    row = next(r for r in cmp.rows if r["slice"] == 3)
    assert row["drop"] > 0.9 and row["excess_ci"][0] > 0
    assert "**flagged**" in cmp.to_markdown()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pure_noise_flags_nothing(seed):
    x, y = _blobs(seed=seed)
    dense = _identity_classifier()
    ref = evaluate(dense, (x, y))
    res = evaluate(NoisyLogits(dense, std=2.0, seed=seed), (x, y), reference=ref, n_boot=400, seed=seed)
    assert res.comparison.overall["drop"] > 0.05  # the noise does hurt overall...
    assert res.comparison.flagged == []          # ...but no class more than the others


def test_tiny_slice_is_never_flagged():
    x, y = _blobs(small_class=2)
    dense = _identity_classifier()
    ref = evaluate(dense, (x, y))
    cmp = compare_slices(ref, evaluate(_destroy(dense, 2), (x, y)), n_boot=300)
    row = next(r for r in cmp.rows if r["slice"] == 2)
    assert row["n"] == 6 and row["drop"] > 0.8
    assert row["status"] == "too few to judge" and cmp.flagged == []


def test_min_slice_size_is_configurable():
    x, y = _blobs(small_class=2)
    dense = _identity_classifier()
    cmp = compare_slices(evaluate(dense, (x, y)), evaluate(_destroy(dense, 2), (x, y)), n_boot=300,
                         min_slice_size=5)
    assert cmp.flagged == [2]


def test_user_tags_and_slice_function():
    x, y = _blobs()
    model = _identity_classifier()
    tags = ["even" if int(k) % 2 == 0 else "odd" for k in y]
    by_list = evaluate(model, (x, y), slices=tags)
    by_fn = evaluate(model, (x, y), slices=lambda ex: "even" if int(ex[1]) % 2 == 0 else "odd")
    assert set(by_list.slices) == {"even", "odd"}
    for t in ("even", "odd"):
        assert by_list.slices[t]["value"] == pytest.approx(by_fn.slices[t]["value"])
        assert by_list.slices[t]["n"] == N_CLASSES * PER_CLASS // 2
    with pytest.raises(MetricError, match="one tag per example"):
        evaluate(model, (x, y), slices=tags[:-1])


def test_user_metric_callable_per_example_scores():
    x, y = _blobs()
    model = _identity_classifier()

    def neg_loss(m, batch):
        return -F.cross_entropy(m(batch[0]), batch[1], reduction="none")

    res = evaluate(model, (x, y), metric=neg_loss)
    assert res.metric == "neg_loss" and res.higher_is_better
    assert res.value == pytest.approx(-F.cross_entropy(model(x), y).item(), rel=1e-5)
    assert set(res.slices) == set(range(N_CLASSES))  # labels found in batch[1]
    lower = evaluate(model, (x, y), metric=from_callable(lambda m, b: -neg_loss(m, b), "loss", False))
    assert not lower.higher_is_better and lower.value == pytest.approx(-res.value, rel=1e-5)


class TinyLM(nn.Module):
    def __init__(self, vocab=17, dim=8):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.out = nn.Embedding(vocab, dim), nn.Linear(dim, vocab)

    def forward(self, ids):
        return self.out(self.emb(ids))


def test_perplexity_windows_match_manual_and_record_length():
    ids = torch.randint(0, 17, (205,), generator=torch.Generator().manual_seed(0))
    model = TinyLM()
    data = TokenWindows(ids, length=20, batch_size=4)
    res = evaluate(model, data, metric="perplexity")
    w = ids[:200].view(10, 20)
    logits = model(w)
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, 17), w[:, 1:].reshape(-1))
    assert res.value == pytest.approx(math.exp(nll.item()), rel=1e-5)
    assert res.meta["window_length"] == 20 and res.meta["stride"] == 20
    assert res.n == 10 and not res.higher_is_better and list(res.slices) == ["all"]


def test_embedding_similarity_is_pearson_of_cosines():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, 8, generator=g), torch.randn(50, 8, generator=g)
    cos = F.cosine_similarity(a, b)
    gold = cos * 5 + 1  # a linear map of the cosine: perfect correlation
    res = evaluate(nn.Identity(), (a, b, gold), metric="embedding_similarity", batch_size=16)
    assert res.value == pytest.approx(1.0, abs=1e-6)
    shuffled = evaluate(nn.Identity(), (a, b, gold.flip(0)), metric="embedding_similarity")
    assert abs(shuffled.value) < 0.5


def test_to_dict_is_json_and_round_trips():
    x, y = _blobs()
    dense = _identity_classifier()
    ref = evaluate(dense, (x, y))
    res = evaluate(_destroy(dense, 1), (x, y), reference=ref, n_boot=200)
    d = json.loads(json.dumps(res.to_dict(), allow_nan=False))
    assert d["comparison"]["flagged"] == ["1"]
    back = EvalResult.from_dict(d)
    assert back.value == pytest.approx(res.value)
    assert back.slices[1]["value"] == pytest.approx(res.slices[1]["value"])
    assert compare_slices(EvalResult.from_dict(ref.to_dict()), back, n_boot=200).flagged == [1]


def test_compare_refuses_unpaired_results():
    x, y = _blobs()
    m = _identity_classifier()
    with pytest.raises(CompareError, match="same data"):
        compare_slices(evaluate(m, (x, y)), evaluate(m, (x[:-10], y[:-10])))


def _scored(scores, tags):
    """Evaluate a fixed per-example score vector (stands in for a model's correctness on each example)."""
    idx = torch.arange(len(scores))
    return evaluate(nn.Identity(), (idx, tags), metric=lambda m, b: scores[b[0]])


@pytest.mark.parametrize("seed", [1, 2])
def test_noise_above_2x_threshold_is_not_flagged_by_the_interval(seed):
    """Random 4% flips: some 30-example slices drop > 2x the mean by chance; the CI rule must stop them."""
    g = torch.Generator().manual_seed(seed)
    tags = torch.arange(600) % 20
    ref_s = (torch.rand(600, generator=g) < 0.95).double()
    pru_s = ref_s * (torch.rand(600, generator=g) >= 0.04).double()
    cmp = compare_slices(_scored(ref_s, tags), _scored(pru_s, tags), n_boot=400, seed=seed)
    over_threshold = [r["slice"] for r in cmp.rows if r["drop"] > cmp.params["threshold"]]
    assert over_threshold, "test setup: noise should push at least one slice over the 2x threshold"
    assert cmp.flagged == []
    damaged = pru_s.clone()
    damaged[tags == 7] = 0.0
    assert compare_slices(_scored(ref_s, tags), _scored(damaged, tags), n_boot=400, seed=seed).flagged == [7]
