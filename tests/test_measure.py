"""Measurement helpers: latency ordering, exact-enough memory peaks, sizes, LM speed, environment."""
import json

import pytest
import torch
import torch.nn as nn

from prunekit.measure.counts import count_params
from prunekit.measure.env import environment_info
from prunekit.batch import repeat_to_batch
from prunekit.measure.latency import measure_latency
from prunekit.measure.lm import decode_tokens_per_s, prefill_latency
from prunekit.measure.memory import peak_memory
from prunekit.measure.size import model_stats, size_on_disk


def _mlp(width):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 64))


def test_environment_info_names_machine_and_versions():
    env = environment_info()
    assert env["cpu_model"] and env["logical_cores"] >= 1 and env["torch"] == torch.__version__
    assert env["torch_threads"] == torch.get_num_threads()
    json.dumps(env)


def test_repeat_to_batch_repeats_rows_for_every_structure():
    x = torch.arange(6.0).view(3, 2)
    assert repeat_to_batch(x, 7).shape == (7, 2) and torch.equal(repeat_to_batch(x, 7)[3], x[0])
    d = repeat_to_batch({"input_ids": torch.ones(1, 5, dtype=torch.long)}, 4)
    assert d["input_ids"].shape == (4, 5)
    assert repeat_to_batch((x, x), 1)[1].shape == (1, 2)


def test_latency_interleaved_ranks_models_and_restores_threads():
    before = torch.get_num_threads()
    res = measure_latency({"big": _mlp(1024), "small": _mlp(16)}, torch.randn(1, 64), batch_sizes=(1, 8),
                          threads=1, warmup=2, reps=15)
    assert torch.get_num_threads() == before
    assert len(res["rows"]) == 4 and res["env"]["torch_threads"] == 1
    for bs in (1, 8):
        assert res.get_row("big", bs)["median_ms"] > res.get_row("small", bs)["median_ms"]
        assert res.get_row("big", bs)["iqr_ms"] >= 0
    assert res.speedup("big", "small", 8) > 1.5
    md = res.to_markdown()
    assert "| small | 8 |" in md and res["env"]["cpu_model"] in md
    json.dumps(res)


def test_peak_memory_counts_live_tensor_bytes():
    def work():
        a = torch.ones(1_000_000)        # 4 MB
        b = a * 2                        # +4 MB
        del a
        c = torch.ones(2_000_000)        # +8 MB while b is alive -> 12 MB peak
        return float(b.sum() + c.sum())

    m = peak_memory(work)
    assert 12e6 <= m["torch_peak_bytes"] < 13e6
    py = peak_memory(lambda: len(bytearray(5_000_000)))
    assert py["python_peak_bytes"] >= 5_000_000 and py["torch_peak_bytes"] < 1e6


def test_count_params_and_size_on_disk_dense_tied_and_int8():
    m = nn.Linear(100, 50)
    assert count_params(m) == 5050
    assert 5050 * 4 <= size_on_disk(m) < 5050 * 4 + 1000
    tied = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 10, bias=False))
    tied[1].weight = tied[0].weight
    assert count_params(tied) == 80 and size_on_disk(tied) < 80 * 4 + 500
    with torch.no_grad():
        m.weight[:, :50] = 0
    assert count_params(m, nonzero=True) == 2500 + int(torch.count_nonzero(m.bias))
    big = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))
    from prunekit.export.quantize import quantize_int8
    q = quantize_int8(big)
    assert count_params(q) == count_params(big)
    assert size_on_disk(q) < 0.3 * size_on_disk(big)


def test_model_stats_uses_given_mac_counter():
    m = nn.Linear(4, 3)
    s = model_stats(m, torch.randn(1, 4), macs_fn=lambda mod, x: 12)
    assert s == {"params": 15, "size_bytes": size_on_disk(m), "macs": 12}


@pytest.fixture(scope="module")
def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=128)).eval()


def test_prefill_and_decode_speed_on_tiny_lm(tiny_gpt2):
    ids = torch.randint(0, 50, (1, 16))
    pre = prefill_latency(tiny_gpt2, ids, reps=3, warmup=1)
    assert pre["median_ms"] > 0 and pre["prompt_tokens"] == 16
    dec = decode_tokens_per_s(tiny_gpt2, ids, new_tokens=8, reps=2)
    assert dec["tokens_per_s"] > 0 and dec["new_tokens"] == 8 and len(dec["all_tokens_per_s"]) == 2


def test_prefill_computes_only_the_last_logits_like_generate():
    """prefill_latency times what generate() runs first: use_cache=True and, where the forward takes it,
    logits_to_keep=1, whose logits equal the last position of a full forward."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from prunekit.measure.lm import prefill_kwargs
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)).eval()
    kw = prefill_kwargs(m)
    assert kw == {"use_cache": True, "logits_to_keep": 1}
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        last = m(input_ids=ids, **kw).logits
        full = m(input_ids=ids).logits
    assert last.shape == (2, 1, 64)
    torch.testing.assert_close(last[:, 0], full[:, -1], rtol=1e-5, atol=1e-5)
    assert prefill_latency(m, ids, reps=2, warmup=1)["logits_to_keep"] == 1
    assert prefill_kwargs(torch.nn.Linear(2, 2)) == {"use_cache": True}


def test_count_params_counts_masked_values_of_parametrized_layers():
    from torch.nn.utils import parametrize

    class Mask(nn.Module):
        def __init__(self, mask):
            super().__init__()
            self.register_buffer("mask", mask)

        def forward(self, w):
            return w * self.mask

    m = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 4))
    mask = torch.zeros(10, 10, dtype=torch.bool)
    mask[:, :3] = True
    parametrize.register_parametrization(m[0], "weight", Mask(mask))
    assert count_params(m) == 100 + 10 + 40 + 4                      # the original is not counted twice
    assert count_params(m, nonzero=True) == 30 + int(torch.count_nonzero(m[0].bias)) + count_params(m[1], nonzero=True)
