"""Datasets from installed packages (prunekit.data) and the model zoo / resolver (prunekit.zoo)."""
import shutil
import sys
import types

import pytest
import torch
import torch.nn as nn

import prunekit.data as D
import prunekit.data.images as DI
import prunekit.data.text as DT
from prunekit.errors import DataError
import prunekit.zoo as Z

torch.set_num_threads(1)

needs_fmnist = pytest.mark.skipif(not (D.FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists(),
                                  reason="apt-get install dataset-fashion-mnist")


def test_batches_are_reiterable_sequences_with_partial_last_batch():
    b = D.Batches(torch.arange(10).float()[:, None], torch.arange(10), batch_size=4)
    assert len(b) == 3
    assert [len(y) for _, y in b] == [4, 4, 2]
    assert torch.equal(torch.cat([y for _, y in b]), torch.cat([y for _, y in b]))     # same order twice
    assert torch.equal(b[-1][1], torch.tensor([8, 9]))
    with pytest.raises(IndexError):
        b[3]
    with pytest.raises(DataError, match="targets have 3"):
        D.Batches(torch.zeros(4, 1), torch.zeros(3))


@needs_fmnist
def test_fashion_mnist_shapes_labels_and_normalization():
    test = D.load("fashion-mnist", split="test", batch_size=1000)
    assert test.num_examples == 10000 and len(test) == 10
    x, y = test[0]
    assert x.shape == (1000, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert set(torch.unique(y).tolist()) == set(range(10))
    assert abs(float(test.inputs.mean())) < 0.1 and 0.9 < float(test.inputs.std()) < 1.1   # standardized
    assert D.load("fashion-mnist", limit=100).num_examples == 100


def test_fashion_mnist_missing_says_which_apt_command(monkeypatch, tmp_path):
    monkeypatch.setattr(DI, "FASHION_MNIST_DIR", tmp_path)
    DI._fashion_mnist_arrays.cache_clear()
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        D.load("fashion-mnist", split="test")
    DI._fashion_mnist_arrays.cache_clear()


def test_digits_split_is_disjoint_and_complete():
    train, test = D.load("digits", split="train"), D.load("digits", split="test")
    assert train.num_examples + test.num_examples == 1797
    assert test.num_examples == 359
    x, y = train[0]
    assert x.shape == (64, 1, 8, 8) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    # no image appears in both splits
    tr = {tuple(v.flatten().tolist()) for v in train.inputs}
    assert sum(tuple(v.flatten().tolist()) in tr for v in test.inputs) < 5                # sklearn has few dups


def test_text_datasets_from_gensim():
    pol_train, pol_test = D.load("polarity"), D.load("polarity", split="test")
    assert (pol_train.num_examples, pol_test.num_examples) == (160, 40)
    texts, y = pol_train[0]
    assert isinstance(texts[0], str) and not texts[0].startswith("__label__")
    assert float(pol_test.targets.float().mean()) == 0.5
    assert set(D.load("polarity", limit=4).targets.tolist()) == {0, 1}                   # prefixes are mixed
    lee = D.load("lee", batch_size=100)
    assert lee.num_examples == 300 and isinstance(lee[0], list) and len(lee[0]) == 100
    assert D.load("lee", split="test").num_examples == 50
    docs, sim = D.lee_similarity()
    assert sim.shape == (50, 50) and torch.equal(sim, sim.T) and torch.all(sim.diagonal() == 1)
    pairs = D.load("lee-sim", batch_size=2000)
    (a, b), score = pairs[0]
    assert len(a) == len(b) == 1225 and score.shape == (1225,)
    assert a[0] == docs[0] and b[0] == docs[1] and float(score[0]) == float(sim[0, 1])


def test_austen_paragraphs_labelled_by_book():
    if shutil.which("apt-get") is None and not (DT._austen_data_dir() / "Rdata.rdb").exists():
        pytest.skip("needs apt-get to fetch r-cran-janeaustenr")
    books = D.austen_books()
    assert set(books) == set(D.AUSTEN_BOOKS)
    assert any("Dashwood" in line for line in books["sensesensibility"][:200])
    train = D.load("austen", limit=60, batch_size=60)
    texts, y = train[0]
    assert set(y.tolist()) == set(range(6))                                 # interleaved: every book early
    assert all(len(t) >= 80 for t in texts)
    first_emma = texts[y.tolist().index(D.AUSTEN_BOOKS.index("emma"))]
    assert first_emma in " ".join(books["emma"]) or "Emma" in first_emma


def test_austen_without_apt_get_explains(monkeypatch, tmp_path):
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(DT.shutil, "which", lambda tool: None)
    with pytest.raises(DataError, match="apt-get download r-cran-janeaustenr"):
        D.ensure_janeaustenr()


def test_module_function_specs_and_unknown_names(monkeypatch):
    mod = types.ModuleType("my_tiny_data")
    mod.make = lambda split, limit=None, batch_size=2: D.Batches(torch.ones(4, 3), torch.zeros(4), batch_size)
    monkeypatch.setitem(sys.modules, "my_tiny_data", mod)
    b = D.load("my_tiny_data:make", batch_size=3)
    assert len(b) == 2 and b[0][0].shape == (3, 3)
    with pytest.raises(DataError, match="did you mean 'digits'|Did you mean 'digits'"):
        D.load("digit")
    with pytest.raises(DataError, match="no attribute 'nope'"):
        D.load("my_tiny_data:nope")
    with pytest.raises(DataError, match="cannot import module"):
        D.load("no_such_module_xyz:f")


# --------------------------------------------------------------------------------------------- zoo


def test_resnet_has_residual_coupling_and_right_shapes():
    m = Z.FashionMNISTResNet().eval()
    assert m(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    identity_blocks = [b for b in m.modules() if isinstance(b, Z.BasicBlock) and isinstance(b.shortcut, nn.Identity)]
    assert len(identity_blocks) >= 2                                       # channels tied across blocks
    assert any(isinstance(mod, nn.BatchNorm2d) for mod in m.modules())


@needs_fmnist
def test_pretrained_trains_once_then_loads_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path))
    calls = []
    real = Z.train_fashion_mnist_cnn

    def tiny(**kw):
        calls.append(kw)
        return real(epochs=1, limit=256, batch_size=64)
    monkeypatch.setattr(Z, "train_fashion_mnist_cnn", tiny)
    a = Z.fashion_mnist_cnn(pretrained=True, quiet=True)
    b = Z.fashion_mnist_cnn(pretrained=True, quiet=True)
    assert len(calls) == 1                                                 # second call hit the cache
    assert (tmp_path / f"fashion_mnist_cnn-{Z.FASHION_MNIST_CNN_VERSION}.safetensors").exists()
    assert not list(tmp_path.glob("*.tmp"))                               # atomic write left no temp file
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert not torch.equal(a.fc.weight, Z.fashion_mnist_cnn(pretrained=False).fc.weight)


def test_resolve_model_forms(tmp_path, monkeypatch):
    from prunekit.io.atomic import save_safetensors_atomic
    mod = types.ModuleType("my_tiny_models")
    mod.build = lambda: nn.Linear(3, 2)
    monkeypatch.setitem(sys.modules, "my_tiny_models", mod)
    src = nn.Linear(3, 2)
    save_safetensors_atomic(src.state_dict(), tmp_path / "w.safetensors")
    m = Z.resolve_model(str(tmp_path / "w.safetensors"), factory="my_tiny_models:build")
    assert torch.equal(m.weight, src.weight)
    assert isinstance(Z.resolve_model("my_tiny_models:build"), nn.Linear)
    with pytest.raises(ValueError, match="factory"):
        Z.resolve_model(str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match="do not fit"):
        Z.resolve_model(str(tmp_path / "w.safetensors"), factory=lambda: nn.Linear(3, 4, bias=False))
    with pytest.raises(ValueError, match="cannot resolve model"):
        Z.resolve_model("not-a-model")


def test_resolve_model_loads_local_hf_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    src = transformers.LlamaForCausalLM(cfg)
    src.save_pretrained(tmp_path / "tiny")
    m = Z.resolve_model(str(tmp_path / "tiny"))
    assert type(m).__name__ == "LlamaForCausalLM"
    assert torch.equal(m.model.layers[0].self_attn.q_proj.weight, src.model.layers[0].self_attn.q_proj.weight)
