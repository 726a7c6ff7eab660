"""DDP: a 2-process gloo job launched by torchrun takes the same steps as 1 process on the same global batches."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import prunekit
from prunekit.batch import take
from prunekit.recover import distributed as D

torch.set_num_threads(1)
SRC = str(Path(prunekit.__file__).resolve().parents[1])


def test_shard_bounds_cover_the_batch_exactly_once():
    for n, world in [(13, 2), (8, 4), (5, 3)]:
        spans = [D.shard_bounds(n, r, world) for r in range(world)]
        assert spans[0][0] == 0 and spans[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        assert max(h - l for l, h in spans) - min(h - l for l, h in spans) <= 1
    with pytest.raises(ValueError, match="at least 4"):
        D.shard_bounds(3, 0, 4)
    batch = ({"ids": torch.arange(6), "n": 3}, [1, 2, 3, 4, 5, 6])
    part = take(batch, 2, 4)
    assert torch.equal(part[0]["ids"], torch.tensor([2, 3])) and part[1] == [3, 4] and part[0]["n"] == 3


# Setup shared by the single-process reference and every torchrun worker (imported by both).
SETUP = textwrap.dedent("""
    import json, os, sys, torch, torch.nn as nn
    torch.set_num_threads(1)
    import prunekit.data as PD
    from prunekit.recover import recover
    from prunekit.io.atomic import save_safetensors_atomic

    def mlp(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 10))

    def run(out_dir, ckpt=None):
        data = PD.load("digits", batch_size=13, limit=130)                # 10 global batches, shards of 7 + 6
        seen = []
        model = mlp(0)
        model[1].register_forward_pre_hook(lambda m, args: seen.append(int(args[0].shape[0])))
        out = recover(model, teacher=mlp(1), data=data, loss="mixed", epochs=2, lr=1e-2, quiet=True,
                      checkpoint_dir=ckpt, return_result=True)
        rank = int(os.environ.get("RANK", "0"))
        if rank == 0:
            save_safetensors_atomic(out.model.state_dict(), os.path.join(out_dir, "weights.safetensors"))
        with open(os.path.join(out_dir, f"seen-{rank}.json"), "w") as f:
            json.dump({"seen": seen, "history": out.history}, f)
""")


def _write_scripts(tmp_path: Path):
    (tmp_path / "ddp_setup.py").write_text(SETUP)
    (tmp_path / "worker.py").write_text("import sys; from ddp_setup import run; run(sys.argv[1], sys.argv[2])\n")


def test_two_gloo_processes_match_one_process(tmp_path):
    from safetensors.torch import load_file
    _write_scripts(tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(k, None)
    ref = subprocess.run([sys.executable, "-c", f"from ddp_setup import run; run({str(one)!r})"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(tmp_path / "worker.py"), str(two), str(tmp_path / "ckpt")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]

    # each process saw its own shard of every global batch (7 + 6 of 13), never the whole batch
    seen = [json.loads((two / f"seen-{r}.json").read_text()) for r in (0, 1)]
    assert set(seen[0]["seen"]) == {7} and set(seen[1]["seen"]) == {6}
    assert len(seen[0]["seen"]) == len(seen[1]["seen"]) == 20
    single = json.loads((one / "seen-0.json").read_text())
    assert set(single["seen"]) == {13}

    # same optimizer trajectory: weights and logged global losses agree
    w1, w2 = load_file(str(one / "weights.safetensors")), load_file(str(two / "weights.safetensors"))
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
    assert not torch.equal(w1["1.weight"], _init_weight())                # training happened at all
    for h1, h2 in zip(single["history"], seen[0]["history"]):
        assert h2["loss"] == pytest.approx(h1["loss"], rel=1e-5)
    # the DDP run checkpointed with one RNG file per process
    ckpt = tmp_path / "ckpt" / "checkpoints"
    latest = ckpt / json.loads((ckpt / "latest.json").read_text())["name"]
    assert (latest / "rng-rank0.json").exists() and (latest / "rng-rank1.json").exists()
    assert json.loads((latest / "state.json").read_text())["world_size"] == 2


def _init_weight():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 24))[1].weight.detach()


def _one_and_two_processes(tmp_path: Path, setup: str, strategy: str):
    """Run `setup`'s run(out_dir) once in one process and once as a 2-process gloo torchrun job (env STRATEGY);
    returns the two output directories (tmp_path/one, tmp_path/two)."""
    (tmp_path / "ddp_setup.py").write_text(setup)
    (tmp_path / "worker.py").write_text("import sys; from ddp_setup import run; run(sys.argv[1])\n")
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "STRATEGY": strategy}
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(k, None)
    ref = subprocess.run([sys.executable, "-c", f"from ddp_setup import run; run({str(one)!r})"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]
    job = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(tmp_path / "worker.py"), str(two)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert job.returncode == 0, job.stderr[-3000:]
    return one, two


FSDP_SETUP = SETUP.replace("checkpoint_dir=ckpt, return_result=True)",
                           "checkpoint_dir=ckpt, return_result=True, strategy=os.environ.get('STRATEGY', 'ddp'))")


def test_fsdp_two_processes_match_one_process(tmp_path):
    """FSDP2 (fully_shard) on 2 gloo processes: sharded parameters, same trajectory as 1 process."""
    from safetensors.torch import load_file
    one, two = _one_and_two_processes(tmp_path, FSDP_SETUP, "fsdp")
    seen = [json.loads((two / f"seen-{r}.json").read_text()) for r in (0, 1)]
    assert set(seen[0]["seen"]) == {7} and set(seen[1]["seen"]) == {6}
    w1, w2 = load_file(str(one / "weights.safetensors")), load_file(str(two / "weights.safetensors"))
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
    assert not torch.equal(w1["1.weight"], _init_weight())


def test_fsdp_option_checked():
    from prunekit.errors import ConfigError
    from prunekit.recover import Recover
    with pytest.raises(ConfigError, match="strategy"):
        Recover(strategy="zero3")


# Token-budget recovery of a causal LM (recover/tokens.py) under torchrun: every global block of 2 rows is split
# one row per process; DDP and FSDP2 take the single process's steps.
TOKEN_SETUP = textwrap.dedent("""
    import json, os, torch
    torch.set_num_threads(1)
    import transformers
    from prunekit.recover import recover
    from prunekit.io.atomic import save_safetensors_atomic

    def llama(seed):
        torch.manual_seed(seed)
        cfg = transformers.LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
        return transformers.LlamaForCausalLM(cfg)

    def run(out_dir):
        g = torch.Generator().manual_seed(5)
        docs = [torch.randint(1, 48, (5,), generator=g).repeat(3) for _ in range(24)]
        seen = []
        model = llama(0)
        model.model.embed_tokens.register_forward_pre_hook(lambda m, a: seen.append(int(a[0].shape[0])))
        out = recover(model, teacher=llama(1), data=docs, tokens=320, seq_len=16, batch_size=2, loss="mixed",
                      top_k=8, lr=5e-3, quiet=True, return_result=True, strategy=os.environ.get("STRATEGY", "ddp"))
        rank = int(os.environ.get("RANK", "0"))
        if rank == 0:
            save_safetensors_atomic(out.model.state_dict(), os.path.join(out_dir, "weights.safetensors"))
        with open(os.path.join(out_dir, f"seen-{rank}.json"), "w") as f:
            json.dump({"seen": seen, "history": out.history, "steps": out.steps}, f)
""")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_token_recovery_under_torchrun_matches_one_process(tmp_path, strategy):
    pytest.importorskip("transformers")
    from safetensors.torch import load_file
    one, two = _one_and_two_processes(tmp_path, TOKEN_SETUP, strategy)
    single = json.loads((one / "seen-0.json").read_text())
    ranks = [json.loads((two / f"seen-{r}.json").read_text()) for r in (0, 1)]
    assert set(single["seen"]) == {2} and all(set(r["seen"]) == {1} for r in ranks)      # one row per process
    assert single["steps"] == ranks[0]["steps"] == ranks[1]["steps"] == 10
    w1, w2 = load_file(str(one / "weights.safetensors")), load_file(str(two / "weights.safetensors"))
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
    for h1, h2 in zip(single["history"], ranks[0]["history"]):
        assert h2["loss"] == pytest.approx(h1["loss"], rel=1e-4)
