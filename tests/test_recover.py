"""recover(): distillation, task loss, features, parametrized masks, LoRA, schedule, non-finite guard."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.parametrize as P

import prunekit.data as D
from prunekit.config import config_from_dict
from prunekit.errors import ConfigError, RecoveryDiverged
from prunekit.recover import Recover, kd_loss, lr_at, recover

torch.set_num_threads(1)


def mlp(hidden=32, seed=0, bn=False):
    torch.manual_seed(seed)
    layers = [nn.Flatten(), nn.Linear(64, hidden)] + ([nn.BatchNorm1d(hidden)] if bn else []) + [nn.ReLU(),
                                                                                                 nn.Linear(hidden, 10)]
    return nn.Sequential(*layers)


@pytest.fixture(scope="module")
def digits():
    return D.load("digits", batch_size=32, limit=256)


@pytest.fixture(scope="module")
def teacher(digits):
    return recover(mlp(seed=1), data=digits, epochs=8, lr=2e-2, quiet=True).eval()


def agreement(a, b, batches):
    with torch.no_grad():
        return sum(int((a(x).argmax(1) == b(x).argmax(1)).sum()) for x, _ in batches) / batches.num_examples


def kd_to(student, teacher, batches, T=2.0):
    with torch.no_grad():
        return sum(float(kd_loss(student(x), teacher(x), T)) for x, _ in batches) / len(batches)


def test_kd_loss_is_zero_for_equal_logits_and_scaled_by_t_squared():
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    assert float(kd_loss(t, t, 3.0)) == pytest.approx(0.0, abs=1e-6)
    manual = (F.softmax(t / 4, -1) * (F.log_softmax(t / 4, -1) - F.log_softmax(s / 4, -1))).sum(-1).mean() * 16
    assert float(kd_loss(s, t, 4.0)) == pytest.approx(float(manual), rel=1e-5)
    with pytest.raises(ValueError, match="one shape"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 4), 1.0)


def test_task_loss_alone_learns_digits(digits):
    before = mlp(seed=2)
    acc0 = agreement(before, lambda x: torch.zeros(len(x), 10).scatter_(1, torch.zeros(len(x), 1).long(), 1), digits)
    model = recover(mlp(seed=2), data=digits, epochs=8, lr=2e-2, quiet=True)
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in digits) / digits.num_examples
    assert correct > 0.85 > acc0


def test_distillation_without_labels_moves_student_to_teacher(digits, teacher):
    unlabelled = [x for x, _ in digits]                                   # inputs alone
    student = mlp(hidden=16, seed=3)
    kd_before = kd_to(student, teacher, digits)
    recover(student, teacher=teacher, data=unlabelled, epochs=10, lr=3e-2, quiet=True)
    assert kd_to(student, teacher, digits) < 0.1 * kd_before
    assert agreement(student, teacher, digits) > 0.9


def test_mixed_loss_and_wrong_combinations(digits, teacher):
    r = recover(mlp(seed=4), teacher=teacher, data=digits, loss="mixed", alpha=0.3, epochs=2, lr=1e-2,
                quiet=True, return_result=True)
    assert r.status == "completed" and r.steps == 2 * len(digits)
    assert r.history[1]["loss"] < r.history[0]["loss"]
    with pytest.raises(ConfigError, match="teacher"):
        recover(mlp(), data=digits, loss="kd", quiet=True)
    with pytest.raises(ConfigError, match="Did you mean 'epochs'"):
        recover(mlp(), teacher=teacher, data=digits, epoch=2)
    with pytest.raises(ValueError, match="same object"):
        recover(teacher, teacher=teacher, data=digits)


def test_feature_loss_with_learned_projection_when_widths_differ(digits, teacher):
    feats = {"2": "2"}                                                     # ReLU outputs: 16 vs 32 wide
    plain = recover(mlp(hidden=16, seed=5), teacher=teacher, data=digits, epochs=1, lr=1e-2, quiet=True,
                    return_result=True)
    student = mlp(hidden=16, seed=5)
    r = recover(student, teacher=teacher, data=digits, features=feats, feature_weight=5.0, epochs=3, lr=1e-2,
                quiet=True, return_result=True)
    assert r.status == "completed" and r.history[-1]["loss"] < r.history[0]["loss"]
    assert r.history[0]["loss"] > plain.history[0]["loss"] + 0.01          # the feature term is in the loss
    assert not any(n.startswith("projections") for n, _ in student.named_parameters())  # not left on the model
    with pytest.raises(ValueError, match="no modules"):
        recover(mlp(), teacher=teacher, data=digits, features=["nope"], quiet=True)


def test_make_projection_kinds():
    from prunekit.recover.losses import make_projection
    assert isinstance(make_projection(torch.zeros(2, 8, 4, 4), torch.zeros(2, 8, 4, 4), "x"), nn.Identity)
    conv = make_projection(torch.zeros(2, 5, 4, 4), torch.zeros(2, 8, 4, 4), "x")
    assert isinstance(conv, nn.Conv2d) and conv(torch.zeros(2, 5, 4, 4)).shape == (2, 8, 4, 4)
    lin = make_projection(torch.zeros(2, 7, 5), torch.zeros(2, 7, 9), "x")
    assert isinstance(lin, nn.Linear) and lin(torch.zeros(2, 7, 5)).shape == (2, 7, 9)
    with pytest.raises(ValueError, match="more than the channel"):
        make_projection(torch.zeros(2, 5, 4, 4), torch.zeros(2, 8, 2, 2), "x")


class ZeroMask(nn.Module):
    """A parametrization that zeros entries (what an unstructured-pruning mask looks like)."""

    def __init__(self, mask):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w):
        return w * self.mask


def test_parametrized_masks_stay_enforced(digits, teacher):
    student = copy.deepcopy(teacher)
    mask = (torch.rand_like(student[1].weight) > 0.5).float()
    P.register_parametrization(student[1], "weight", ZeroMask(mask))
    before = student[1].weight.detach().clone()
    recover(student, teacher=teacher, data=digits, epochs=2, lr=1e-2, loss="task", quiet=True)
    assert P.is_parametrized(student[1], "weight")
    w = student[1].weight.detach()
    assert torch.all(w[mask == 0] == 0)                                    # masked entries still zero
    assert not torch.allclose(w[mask == 1], before[mask == 1])            # the rest trained


def test_lr_schedule_warms_up_then_decays():
    cfg = Recover(lr=1.0, warmup=0.1)
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))                 # monotone cosine decay
    assert lrs[-1] < 0.01 and lrs[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))


def test_recover_config_round_trip_and_validation():
    cfg = Recover(epochs=3, lr=1e-3, features={"layer1": "layer1"}, lora={"r": 4, "target_modules": ["q_proj"]})
    again = config_from_dict(cfg.to_dict())
    assert again == cfg
    with pytest.raises(ConfigError, match="alpha"):
        Recover(alpha=1.5)
    with pytest.raises(ConfigError, match="loss"):
        Recover(loss="mse")


def test_nan_loss_stops_and_keeps_last_good_weights(digits):
    model = mlp(bn=True, seed=6)
    bad = list(digits)[:4]
    bad[2] = (torch.full_like(bad[2][0], float("nan")), bad[2][1])        # step 3 sees NaN inputs
    seen = {}

    def cb(ev):
        if ev["step"] == 2:
            seen.update({k: v.clone() for k, v in model.state_dict().items()})
    with pytest.raises(RecoveryDiverged, match="non-finite") as info:
        recover(model, data=bad, epochs=1, lr=1e-2, shuffle=False, callback=cb, quiet=True)
    assert info.value.result.status == "diverged" and info.value.result.steps == 2
    for k, v in model.state_dict().items():                                # params AND BN running stats
        assert torch.equal(v, seen[k]), k
    with pytest.warns(RuntimeWarning, match="non-finite"):
        r = recover(mlp(seed=6), data=bad, epochs=1, lr=1e-2, shuffle=False, on_nonfinite="stop", quiet=True,
                    return_result=True)
    assert r.status == "diverged" and all(torch.isfinite(p).all() for p in r.model.parameters())


def test_lora_on_tiny_llama_is_merged_back():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    teacher = transformers.LlamaForCausalLM(cfg).eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(0, 64, (16, 12))
    batches = [{"input_ids": ids[i:i + 4], "attention_mask": torch.ones(4, 12, dtype=torch.long)}
               for i in range(0, 16, 4)]
    q0 = student.model.layers[0].self_attn.q_proj.weight.detach().clone()
    k0 = student.model.layers[0].self_attn.k_proj.weight.detach().clone()

    def kd():
        with torch.no_grad():
            return sum(float(kd_loss(student(**b).logits, teacher(**b).logits, 2.0)) for b in batches)
    before = kd()
    out = recover(student, teacher=teacher, data=batches, epochs=6, lr=1e-2, quiet=True,
                  lora={"r": 4, "target_modules": ["q_proj", "v_proj"]})
    assert type(out).__name__ == "LlamaForCausalLM"
    assert not any("lora" in k for k in out.state_dict())
    assert not torch.equal(out.model.layers[0].self_attn.q_proj.weight, q0)   # adapter merged into q_proj
    assert torch.equal(out.model.layers[0].self_attn.k_proj.weight, k0)       # not targeted: untouched
    student = out
    assert kd() < before


def test_progress_bar_is_silent_when_not_a_tty(digits, capsys):
    recover(mlp(seed=7), data=digits, epochs=1, lr=1e-2, quiet=False)
    err = capsys.readouterr().err                                          # pytest's capture is not a TTY
    assert "recover epoch" not in err
