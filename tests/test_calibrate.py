"""Calibration engine: block discovery, input capture and layer-by-layer replay on tiny random HF models."""
import os

import pytest
import torch
import torch.nn as nn

import prunekit as pk

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from prunekit.batch import as_batches
from prunekit.calibrate.layerwise import capture_block_inputs, find_blocks, run_layerwise, run_whole
from prunekit.errors import CalibrationDataError
from prunekit.measure.memory import measure_peak_memory  # noqa: E402

torch.set_num_threads(1)
V = 64


def tiny(family: str) -> nn.Module:
    """Random-init 2-block models; Llama uses GQA (2 KV heads for 4 query heads)."""
    torch.manual_seed(0)
    if family == "llama":
        m = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64))
    elif family == "gpt2":
        m = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0))
    elif family == "bert":
        m = transformers.BertModel(transformers.BertConfig(
            vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64))
    elif family == "opt":
        m = transformers.OPTForCausalLM(transformers.OPTConfig(
            vocab_size=V, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
            max_position_embeddings=64, word_embed_proj_dim=32, bos_token_id=0, eos_token_id=0, pad_token_id=1))
    else:
        raise ValueError(family)
    return m.eval()


FAMILIES = ["llama", "gpt2", "bert", "opt"]
BLOCKS = {"llama": "model.layers", "gpt2": "transformer.h", "bert": "encoder.layer", "opt": "model.decoder.layers"}


def batches(n=3, b=2, t=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, V, (b, t), generator=g) for _ in range(n)]


@pytest.mark.parametrize("family", FAMILIES)
def test_find_blocks_picks_the_block_stack(family):
    name, layers = find_blocks(tiny(family))
    assert name == BLOCKS[family]
    assert len(layers) == 2


def test_find_blocks_without_module_list_raises():
    with pytest.raises(ValueError, match="whole"):
        find_blocks(nn.Sequential(nn.Linear(2, 2)))


@pytest.mark.parametrize("family", FAMILIES)
def test_layerwise_replay_matches_full_forward(family):
    """Every block must receive exactly the hidden states the full model feeds it."""
    model = tiny(family)
    data = batches()
    seen = {}

    def observe(i, _name, block):
        def hook(_m, args, kwargs):
            seen.setdefault(i, []).append((args[0] if args else kwargs["hidden_states"]).clone())
        return [block.register_forward_pre_hook(hook, with_kwargs=True)]

    run_layerwise(model, as_batches(data), observe, lambda *a: None, sequential=True)
    with torch.no_grad():
        for j, ids in enumerate(data):
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states
            for i in range(2):
                torch.testing.assert_close(seen[i][j], hs[i], rtol=1e-5, atol=1e-5)


def test_capture_records_llama_rotary_and_stops_early():
    model = tiny("llama")
    calls = []
    h = model.model.layers[1].register_forward_pre_hook(lambda *a: calls.append(1))
    buf = capture_block_inputs(model, model.model.layers[0], as_batches(batches(n=2)))
    h.remove()
    assert len(buf) == 2 and not calls                      # block 1 never ran: the forward was stopped
    args, kwargs = buf.get(0)
    cos, sin = kwargs["position_embeddings"]
    assert cos.shape[-2:] == (12, 8) and sin.shape[-2:] == (12, 8)  # (T, head_dim = 32 / 4)
    assert kwargs.get("cache") is None and not kwargs.get("use_cache")


@pytest.mark.parametrize("sequential", [True, False])
def test_sequential_feeds_updated_block_outputs(sequential):
    """With sequential=True block 1 sees the *updated* block 0's outputs; otherwise the dense ones."""
    model = tiny("llama")
    data = batches(n=1)
    with torch.no_grad():
        dense_h1 = model(input_ids=data[0], output_hidden_states=True).hidden_states[1]
    seen = {}

    def observe(i, _n, block):
        def hook(_m, args, _kwargs):
            seen[i] = args[0].clone()
        return [block.register_forward_pre_hook(hook, with_kwargs=True)]

    def update(i, _n, block):
        if i == 0:
            with torch.no_grad():
                block.mlp.down_proj.weight.mul_(3.0)

    run_layerwise(model, as_batches(data), observe, update, sequential=sequential)
    with torch.no_grad():
        new_h1 = model(input_ids=data[0], output_hidden_states=True).hidden_states[1]
    assert not torch.allclose(dense_h1, new_h1)
    torch.testing.assert_close(seen[1], new_h1 if sequential else dense_h1)


def test_disk_offload_matches_cpu(tmp_path):
    model = tiny("gpt2")
    data = as_batches([{"input_ids": ids, "attention_mask": torch.ones_like(ids)} for ids in batches()])
    results = {}
    for mode in ("cpu", "disk"):
        seen = []
        obs = lambda i, _n, b: [b.register_forward_pre_hook(lambda _m, a, k: seen.append(a[0].clone()), with_kwargs=True)]
        run_layerwise(model, data, obs, lambda *a: None, offload=mode, offload_dir=str(tmp_path))
        results[mode] = seen
    assert len(results["cpu"]) == len(results["disk"]) == 6
    for a, b in zip(results["cpu"], results["disk"]):
        assert torch.equal(a, b)
    assert not any(tmp_path.iterdir())                      # temporary activation files are cleaned up


def test_run_whole_sees_every_batch_once():
    model = tiny("bert")
    counts = []
    run_whole(model, as_batches(batches(n=4)),
              lambda *_: [model.pooler.dense.register_forward_hook(lambda *a: counts.append(1))],
              lambda *_: counts.append("update"))
    assert counts == [1, 1, 1, 1, "update"]


@pytest.mark.parametrize("bad, match", [
    (None, "required"),
    ([], "empty"),
    (torch.randint(0, 5, (2, 8)), "single tensor"),
    ("some text", "single str"),
    ([torch.randn(2, 8)], "integer token ids"),
    ([torch.randint(0, 5, (8,))], r"unsqueeze"),
    ([torch.randint(0, 5, (0, 8))], "both > 0"),
    ([[1, 2, 3]], "type list"),
    ([{"labels": [1]}], "without tensors"),
    (42, "iterable"),
])
def test_as_batches_rejects_bad_data(bad, match):
    with pytest.raises(CalibrationDataError, match=match):
        as_batches(bad)
    assert issubclass(CalibrationDataError, ValueError)


def test_as_batches_accepts_tensors_dicts_and_generators():
    ids = torch.randint(0, 5, (2, 8))
    out = as_batches(x for x in [ids, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}])
    assert out[0] == {"input_ids": ids} and set(out[1]) == {"input_ids", "attention_mask"}


def test_measure_peak_memory_sees_a_large_allocation():
    def alloc():
        t = torch.ones(64 * 1024 * 1024 // 4)               # 64 MiB, touched so it is resident
        return float(t[::4096].sum())
    result, mem = measure_peak_memory(alloc)
    assert result == 64 * 1024 * 1024 // 4 // 4096
    assert mem["rss_delta"] > 48 * 1024 * 1024


def test_positional_tuple_batches_calibrate_models_taking_a_list_of_images():
    """A batch `(images,)` means model(images) (torchvision detectors take a list of image tensors)."""
    class Det(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.h = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

        def forward(self, images):
            x = torch.relu(self.a(torch.stack(images)))
            return self.h(x + torch.relu(self.b(x)))
    torch.manual_seed(0)
    m = Det().eval()
    batch = ([torch.randn(3, 16, 16), torch.randn(3, 16, 16)],)
    r = pk.prune(m, pk.Sparse(sparsity=0.5, method="wanda"), data=[batch])
    assert r.stats["sparsity_total"] == pytest.approx(0.5, abs=0.02)
    assert (r.model.b.weight == 0).float().mean() == pytest.approx(0.5, abs=0.02)
