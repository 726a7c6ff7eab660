"""Token-budget recovery of causal LMs (recover/tokens.py, recover/stream.py) on a tiny random Llama."""
import copy
import itertools
import json

import pytest
import torch

import prunekit as pk
from prunekit.errors import DataError
from prunekit.recover import PackedTokens, kd_loss, topk_kd_loss
from prunekit.recover.losses import lm_loss
from prunekit.recover.stream import iter_text_files

transformers = pytest.importorskip("transformers", reason="token recovery tests use a tiny transformers Llama")
torch.set_num_threads(1)
V = 64


def tiny_llama(seed=0, layers=2):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def corpus(n=40, seed=1):
    """Token-id documents of a learnable pattern (a repeated random motif per document)."""
    g = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(n):
        motif = torch.randint(1, V, (5,), generator=g)
        docs.append(motif.repeat(4))
    return docs


def student_of(teacher, seed=3):
    s = copy.deepcopy(teacher)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in s.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return s


def test_packer_streams_without_materializing():
    pulled = []

    def endless():                                   # an infinite corpus: packing must stay lazy
        for i in itertools.count():
            pulled.append(i)
            yield torch.full((7,), i % V)
    blocks = PackedTokens(endless(), seq_len=16, batch_size=2, eos_id=0)
    it = iter(blocks)
    first = next(it)
    assert first.shape == (2, 16) and first.dtype == torch.long
    assert len(pulled) <= 32 // 8 + 1                 # only what one block needs (8 tokens per doc with EOS)
    assert first[0, :8].tolist() == [0] * 7 + [0] and first[0, 8:15].tolist() == [1] * 7


def test_packer_skip_equals_continuation_and_text_needs_tokenizer(tmp_path):
    docs = corpus()
    full = list(itertools.islice(iter(PackedTokens(docs, 8, 1, eos_id=0, repeat=False)), 6))
    tail = list(itertools.islice(PackedTokens(docs, 8, 1, eos_id=0, repeat=False).iter_from(3), 3))
    assert all(torch.equal(a, b) for a, b in zip(full[3:], tail))
    with pytest.raises(DataError, match="tokenizer"):
        next(iter(PackedTokens(["some text"], 8)))
    with pytest.raises(DataError, match="one-shot"):
        next(PackedTokens((d for d in docs), 8).iter_from(2))
    f = tmp_path / "a.txt"
    f.write_text("para one\nline two\n\npara two\n")
    assert [d for d in iter_text_files(f)] == ["para one\nline two\n", "para two\n"]


def test_topk_kd_equals_full_kd_when_k_is_vocab():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, V, generator=g), torch.randn(2, 5, V, generator=g)
    logp = torch.log_softmax(t / 2.0, -1)
    vals, idx = logp.topk(V, dim=-1)
    assert torch.allclose(topk_kd_loss(s, vals, idx, 2.0), kd_loss(s, t, 2.0), rtol=1e-5, atol=1e-6)
    v8, i8 = logp.topk(8, dim=-1)
    assert float(topk_kd_loss(s, v8, i8, 2.0)) != pytest.approx(float(kd_loss(s, t, 2.0)))
    assert float(topk_kd_loss(t, v8, i8, 2.0)) == pytest.approx(0.0, abs=1e-5)     # the teacher itself: no loss


@pytest.mark.parametrize("loss,extra", [("kd", {}), ("kd", {"top_k": 8, "hidden_weight": 0.5}),
                                        ("task", {}), ("mixed", {"grad_accum": 2})])
def test_loss_decreases(loss, extra):
    teacher = tiny_llama()
    student = student_of(teacher)
    docs = corpus()
    probe = torch.stack(docs[:4])

    def measure(m):
        with torch.no_grad():
            out = m(input_ids=probe).logits
            return float(kd_loss(out, teacher(input_ids=probe).logits, 1.0) if loss != "task" else lm_loss(out, probe))
    before = measure(student)
    r = pk.recover(student, teacher=teacher if loss != "task" else None, data=docs, tokens=2000, seq_len=20,
                   batch_size=2, loss=loss, lr=3e-3, warmup=0.1, quiet=True, return_result=True, **extra)
    assert r.status == "completed" and r.steps == -(-2000 // (40 * extra.get("grad_accum", 1)))
    assert measure(r.model) < 0.8 * before
    assert r.history[-1]["tokens"] == r.steps * 40 * extra.get("grad_accum", 1) and r.history[-1]["tok_s"] > 0


def test_teacher_untouched_and_eval_rows():
    teacher = tiny_llama()
    ref = {k: v.clone() for k, v in teacher.state_dict().items()}
    windows = pk.TokenWindows(torch.cat(corpus(8, seed=9)), length=20)
    r = pk.recover(student_of(teacher), teacher=teacher, data=corpus(), tokens=800, seq_len=20, lr=1e-3,
                   eval_data=windows, eval_every=400, quiet=True, return_result=True)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in ref.items())
    assert not any(p.grad is not None for p in teacher.parameters())
    evals = [h for h in r.history if "eval_ppl" in h]
    assert [h["tokens"] for h in evals] == [400, 800] and evals[-1]["eval_ppl"] < evals[0]["eval_ppl"] * 1.5


def test_resume_after_interruption_is_bit_identical(tmp_path):
    teacher = tiny_llama()
    docs = corpus()
    kw = dict(teacher=teacher, data=docs, tokens=1200, seq_len=20, batch_size=2, top_k=16, lr=2e-3, quiet=True,
              checkpoint_every=3)
    full = pk.recover(student_of(teacher), checkpoint_dir=str(tmp_path / "a"), **kw)
    stop = pk.recover(student_of(teacher), checkpoint_dir=str(tmp_path / "b"), return_result=True,
                      callback=lambda e: e["step"] < 7, **kw)
    assert stop.status == "stopped" and stop.steps == 7
    resumed = pk.recover(student_of(teacher), checkpoint_dir=str(tmp_path / "b"), return_result=True, **kw)
    assert resumed.steps == full_steps(1200, 40)
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


def full_steps(tokens, per_step):
    return -(-tokens // per_step)


def test_text_with_tokenizer_and_gradient_checkpointing():
    class CharTok:                                      # a tokenizer-shaped stand-in: one id per character
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [1 + ord(c) % (V - 1) for c in text]}
    teacher = tiny_llama()
    texts = ["the cat sat on the mat. " * 3, "a dog ran in the fog. " * 3] * 10
    r = pk.recover(student_of(teacher), teacher=teacher, data=texts, tokenizer=CharTok(), tokens=600, seq_len=30,
                   gradient_checkpointing=True, precision="fp32", quiet=True, return_result=True)
    assert r.status == "completed" and r.steps == 20
    on = getattr(r.model, "is_activation_checkpointing", None)
    assert (on if on is not None else r.model.is_gradient_checkpointing)


def test_options_are_checked():
    with pytest.raises(pk.errors.ConfigError, match="precision"):
        pk.Recover(tokens=100, precision="fp8")
    with pytest.raises(pk.errors.ConfigError, match="seq_len"):
        pk.Recover(tokens=100, seq_len=1)


def test_llm_recipe_runs_and_resumes_bit_identically(tmp_path):
    """The shipped LLM recipe (prune -> token recovery -> evaluate) on a tiny Llama, killed and resumed."""
    from importlib.resources import files

    from prunekit.run.pipeline import load_recipe, run_pipeline
    recipe = load_recipe(str(files("prunekit") / "recipes" / "llm_recover.yaml")).to_dict()
    recipe["stages"][2]["recover"].update(tokens=240, seq_len=20, grad_accum=1, checkpoint_every=2)
    recipe["calibration_batches"] = 2
    docs = corpus()
    train = [torch.stack(docs[i:i + 2]) for i in range(0, 16, 2)]
    val = [(torch.stack(docs[i:i + 2]), ["motif-a", "motif-b"]) for i in range(20, 28, 2)]   # tagged windows
    run = lambda out, **kw: run_pipeline(tiny_llama(), recipe, train=train, val=val, out=tmp_path / out,  # noqa: E731
                                         example_inputs={"input_ids": train[0][:1]}, quiet=True, **kw)
    full = run("a")
    assert full.status == "completed" and full.model.model.layers[0].mlp.up_proj.out_features == 48
    last = [h for h in full.history if h["kind"] == "evaluate"][-1]
    assert {r["slice"] for r in last["slices"]["slices"]} == {"motif-a", "motif-b"}    # per-slice vs dense
    assert isinstance(last["flagged"], list)
    report = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert report["slices"]["slices"] == last["slices"]["slices"]
    assert run("b", stop_after=3).status == "interrupted"           # killed after prune and recover
    done = run("b", resume=True)
    a, b = full.model.state_dict(), done.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_precomputed_teacher_equals_live_teacher_and_resumes(tmp_path):
    """pk.precompute_teacher stores top-k targets once; training from the cache gives the live top-k run's
    weights bit for bit (float32 cache), needs no teacher, and an interrupted precompute resumes."""
    teacher = tiny_llama()
    docs = corpus()
    kw = dict(tokens=1200, seq_len=20, batch_size=2, top_k=8, temperature=2.0, lr=2e-3, quiet=True, loss="kd")
    live = pk.recover(student_of(teacher), teacher=teacher, data=docs, **kw)
    cache = pk.precompute_teacher(teacher, docs, tmp_path / "c", tokens=1200, seq_len=20, batch_size=2, top_k=8,
                                  temperature=2.0, blocks_per_shard=7, quiet=True)
    assert cache.blocks == 30 and len(list((tmp_path / "c").glob("shard-*.safetensors"))) == 5
    cached = pk.recover(student_of(teacher), teacher=pk.TeacherCache(tmp_path / "c"), **kw)
    for k, v in live.state_dict().items():
        assert torch.equal(v, cached.state_dict()[k]), k
    # interrupted precompute: delete the last two shards and the manifest, run again, same files
    ref = {p.name: p.read_bytes() for p in (tmp_path / "c").glob("shard-*")}
    for name in ("shard-00003.safetensors", "shard-00004.safetensors", "manifest.json"):
        (tmp_path / "c" / name).unlink()
    with pytest.raises(DataError, match="manifest"):
        pk.TeacherCache(tmp_path / "c")
    pk.precompute_teacher(teacher, docs, tmp_path / "c", tokens=1200, seq_len=20, batch_size=2, top_k=8,
                          temperature=2.0, blocks_per_shard=7, quiet=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "c").glob("shard-*")} == ref


def test_precomputed_teacher_refuses_what_it_cannot_serve(tmp_path):
    teacher = tiny_llama()
    cache = pk.precompute_teacher(teacher, corpus(), tmp_path / "c", tokens=400, seq_len=20, batch_size=2, top_k=8,
                                  temperature=2.0, quiet=True)
    s = student_of(teacher)
    base = dict(tokens=400, seq_len=20, batch_size=2, temperature=2.0, quiet=True)
    for bad, match in [({"top_k": 4}, "top_k=8"), ({"temperature": 1.0}, "temperature"),
                       ({"seq_len": 10}, "seq_len"), ({"hidden_weight": 0.5}, "hidden")]:
        with pytest.raises(pk.errors.ConfigError, match=match):
            pk.recover(s, teacher=cache, **{**base, **bad})
    with pytest.raises(pk.errors.ConfigError, match="data=None"):
        pk.recover(s, teacher=cache, data=corpus(), **base)
    with pytest.raises(pk.errors.ConfigError, match="tokens"):
        pk.recover(s, teacher=cache, data=[torch.zeros(2, 3)], epochs=1)
    with pytest.raises(pk.errors.ConfigError, match="other settings"):
        pk.precompute_teacher(teacher, corpus(), tmp_path / "c", tokens=400, seq_len=20, batch_size=2, top_k=4,
                              quiet=True)


def test_offloaded_teacher_device_is_honoured_and_checked():
    teacher = tiny_llama()
    seen = []
    h = teacher.model.embed_tokens.register_forward_hook(lambda m, i, o: seen.append(i[0].device))
    pk.recover(student_of(teacher), teacher=teacher, data=corpus(), tokens=80, seq_len=20, quiet=True,
               teacher_device="cpu")
    h.remove()
    assert seen and all(d.type == "cpu" for d in seen)
    with pytest.raises(pk.errors.ConfigError, match="teacher_device"):
        pk.Recover(teacher_device="warp-drive")
    with pytest.raises(pk.errors.ConfigError, match="token-budget"):
        pk.recover(student_of(teacher), teacher=teacher, data=[torch.zeros(1, 4, dtype=torch.long)],
                   teacher_device="cpu")
