"""Run directories: pickle-free atomic checkpoints, bit-identical resume after a crash or SIGKILL."""
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import prunekit
import prunekit.data as D
from prunekit.errors import RunError
from prunekit.recover import recover
from prunekit.recover.resume import resume
from prunekit.run.directory import Run, optimizer_state_from_files, optimizer_state_to_files, rng_state, set_rng_state

torch.set_num_threads(1)
SRC = str(Path(prunekit.__file__).resolve().parents[1])


def net(seed=0):
    """BatchNorm (buffers) + Dropout (RNG) make resume exactness non-trivial."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 24), nn.BatchNorm1d(24), nn.ReLU(), nn.Dropout(0.2),
                         nn.Linear(24, 10))


@pytest.fixture(scope="module")
def data():
    return D.load("digits", batch_size=32, limit=192)                    # 6 batches per epoch


@pytest.fixture(scope="module")
def teacher(data):
    return recover(net(seed=1), data=data, epochs=2, lr=1e-2, quiet=True).eval()


OPTS = dict(epochs=3, lr=1e-2, quiet=True)


def assert_same_weights(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k} differs"


class Crash(Exception):
    pass


def test_optimizer_state_round_trips_without_pickle():
    model = nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    for _ in range(3):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
    tensors, plain = optimizer_state_to_files(opt)
    json.dumps(plain)                                                      # the non-tensor half is pure JSON
    assert all(isinstance(v, torch.Tensor) for v in tensors.values())
    opt2 = torch.optim.AdamW(nn.Linear(4, 3).parameters(), lr=0.5)
    opt2.load_state_dict(optimizer_state_from_files(tensors, plain))
    for (i, s1), s2 in zip(opt.state_dict()["state"].items(), opt2.state_dict()["state"].values()):
        for key in s1:
            assert torch.equal(s1[key], s2[key]), (i, key)
    assert opt2.param_groups[0]["lr"] == 0.1 and opt2.param_groups[0]["betas"] == (0.9, 0.999)


def test_rng_state_round_trip_through_json():
    state = json.loads(json.dumps(rng_state()))
    a = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_crash_after_epoch_1_then_resume_is_bit_identical(tmp_path, data, teacher):
    straight = recover(net(), teacher=teacher, data=data, **OPTS)

    def crash_after_first_epoch(ev):
        if ev["event"] == "epoch_end" and ev["epoch"] == 0:
            raise Crash()
    with pytest.raises(Crash):
        recover(net(), teacher=teacher, data=data, checkpoint_dir=tmp_path, callback=crash_after_first_epoch, **OPTS)
    assert json.loads((tmp_path / "checkpoints" / "latest.json").read_text())["step"] == len(data)
    resumed = recover(net(seed=99), teacher=teacher, data=data, checkpoint_dir=tmp_path, **OPTS)  # init ignored
    assert_same_weights(straight, resumed)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["epoch"] for r in metrics["history"]] == [0, 1, 2] and metrics["final"]["status"] == "completed"
    assert "resume at step 6" in (tmp_path / "run.log").read_text()
    assert (tmp_path / "config.yaml").exists() and json.loads((tmp_path / "config.json").read_text())["recover"]


def test_resume_helper_uses_stored_config(tmp_path, data, teacher):
    opts = dict(epochs=2, lr=5e-3, checkpoint_every=4, quiet=True)
    straight = recover(net(), teacher=teacher, data=data, **opts)

    def crash_mid_epoch(ev):
        if ev["event"] == "step" and ev["step"] == 9:                      # epoch 2, after checkpoint at step 8
            raise Crash()
    with pytest.raises(Crash):
        recover(net(), teacher=teacher, data=data, checkpoint_dir=tmp_path, callback=crash_mid_epoch, **opts)
    assert json.loads((tmp_path / "checkpoints" / "latest.json").read_text())["step"] == 8
    resumed = resume(tmp_path, net(), teacher=teacher, data=data, quiet=True)
    assert_same_weights(straight, resumed)


def test_resume_with_changed_config_is_refused(tmp_path, data, teacher):
    recover(net(), teacher=teacher, data=data, checkpoint_dir=tmp_path, epochs=1, quiet=True)
    with pytest.raises(RunError, match="lr: stored"):
        recover(net(), teacher=teacher, data=data, checkpoint_dir=tmp_path, epochs=1, lr=0.5, quiet=True)


WORKER = textwrap.dedent("""
    import os, signal, sys, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from test_runs import net, OPTS
    import prunekit.data as D
    from prunekit.recover import recover
    from prunekit.zoo import _load_safetensors_into
    data = D.load("digits", batch_size=32, limit=192)
    teacher = _load_safetensors_into(net(seed=1), {teacher!r}).eval()

    def kill_mid_epoch(ev):
        if ev["event"] == "step" and ev["step"] == 10:        # epoch 2, batch 4 of 6: no clean shutdown at all
            os.kill(os.getpid(), signal.SIGKILL)
    recover(net(), teacher=teacher, data=data, checkpoint_dir={run!r}, checkpoint_every=3, callback=kill_mid_epoch,
            **OPTS)
""")


def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path, data, teacher):
    from prunekit.io.atomic import save_safetensors_atomic
    save_safetensors_atomic(teacher.state_dict(), tmp_path / "teacher.safetensors")
    run = tmp_path / "run"
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(Path(__file__).parent), teacher=str(tmp_path / "teacher.safetensors"),
                                    run=str(run)))
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert json.loads((run / "checkpoints" / "latest.json").read_text())["step"] == 9
    # a torn write from a kill during a checkpoint must be ignored
    (run / "checkpoints" / "step-00000012.tmp").mkdir()
    (run / "checkpoints" / "step-00000012.tmp" / "model.safetensors").write_bytes(b"\0garbage")
    resumed = recover(net(), teacher=teacher, data=data, checkpoint_dir=run, checkpoint_every=3, **OPTS)
    straight = recover(net(), teacher=teacher, data=data, **OPTS)
    assert_same_weights(straight, resumed)
    assert not (run / "checkpoints" / "step-00000012.tmp").exists()       # cleaned up when step 12 was saved
    assert len(list((run / "checkpoints").glob("step-*"))) == 2            # older checkpoints pruned


def test_latest_pointing_nowhere_is_reported(tmp_path):
    r = Run(tmp_path)
    (tmp_path / "checkpoints" / "latest.json").write_text(json.dumps({"name": "step-00000005", "step": 5}))
    with pytest.raises(RunError, match="missing or incomplete"):
        r.latest_checkpoint()


def test_resume_by_dataset_name_needs_no_data_argument(tmp_path):
    opts = dict(epochs=2, lr=1e-2, max_steps=30, checkpoint_every=10, quiet=True)
    straight = recover(net(), data="digits", **opts)                       # 23 batches/epoch, task loss

    def crash(ev):
        if ev["step"] == 25:
            raise Crash()
    with pytest.raises(Crash):
        recover(net(), data="digits", checkpoint_dir=tmp_path, callback=crash, **opts)
    assert json.loads((tmp_path / "config.json").read_text())["data"] == "digits"
    assert_same_weights(straight, resume(tmp_path, net(), quiet=True))


def test_lora_run_resumes_bit_identically(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    teacher = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (16, 12))
    batches = [{"input_ids": ids[i:i + 4], "attention_mask": torch.ones(4, 12, dtype=torch.long)}
               for i in range(0, 16, 4)]

    def student():
        s = transformers.LlamaForCausalLM(cfg)
        s.load_state_dict(teacher.state_dict())
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in s.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        return s
    opts = dict(epochs=3, lr=1e-2, quiet=True, lora={"r": 4, "target_modules": ["q_proj", "v_proj"]})
    straight = recover(student(), teacher=teacher, data=batches, **opts)

    def crash(ev):
        if ev["event"] == "epoch_end" and ev["epoch"] == 0:
            raise Crash()
    with pytest.raises(Crash):
        recover(student(), teacher=teacher, data=batches, checkpoint_dir=tmp_path, callback=crash, **opts)
    resumed = recover(student(), teacher=teacher, data=batches, checkpoint_dir=tmp_path, **opts)
    assert type(resumed).__name__ == "LlamaForCausalLM"
    assert_same_weights(straight, resumed)


def test_metrics_json_keeps_sections_written_by_others(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"summary": {"metric": "accuracy", "rows": []}}))
    r = Run(tmp_path)
    r.log_metrics(3, loss=0.5)
    r.log_metrics(6, loss=0.25)
    r.log_metrics(6, loss=0.2)                                             # a resumed attempt replaces step 6
    r.set_final(status="completed")
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["summary"] == {"metric": "accuracy", "rows": []}
    assert m["history"] == [{"step": 3, "loss": 0.5}, {"step": 6, "loss": 0.2}]
    assert m["final"] == {"status": "completed"}
