"""PrefixReplay: replaying the blocks before a perturbed layer gives exactly the recomputed deltas."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from specprune.data import load_data
from specprune.evaluation import Evaluator
from specprune.layers import select_layers
from specprune.models import load_model
from specprune.prefix import PrefixReplay, find_blocks
from specprune.sensitivity import patched_weight, probe_delta
from specprune.toy import tiny_model


def _forwards(model: nn.Module) -> int:
    return sum("forward" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_replayed_deltas_equal_recomputed(kind, tiny_dirs, small_text_file):
    loaded = load_model(str(tiny_dirs[kind]))
    model = loaded.model.eval()
    batches = load_data([small_text_file], loaded.tokenizer, samples=4, seq_len=16, batch_size=2)
    layers = select_layers(model)
    ev = Evaluator(model, batches)
    replay = PrefixReplay(model, layers)
    with replay.recording():
        assert ev.delta(model, "probe") == 0.0
    assert replay.enabled and len(replay.blocks) == 2
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    n_fwd = _forwards(model)
    skipped_any = False
    for lay in layers:
        w = lay.weight_matrix().detach().clone()
        new_w = w + 0.05 * w.abs().mean() * torch.randn_like(w)
        with patched_weight(lay, new_w):
            plain = ev.delta(model, "probe")
        replayed = probe_delta(lay, new_w, ev, model, replay)
        assert replayed == plain, lay.name
        assert _forwards(model) == n_fwd  # every replaced forward restored
        skipped_any |= bool(replay.skipped(lay.name))
        # never the block that holds the layer, never a block that ran after it
        for i in replay.skipped(lay.name):
            assert not any(m is lay.module for m in replay.blocks[i].modules())
    assert skipped_any
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_tied_weights_and_models_without_blocks():
    model = tiny_model("gpt2")  # GPT-2 ties lm_head to the token embedding
    layers = select_layers(model)
    assert model.lm_head.weight is model.transformer.wte.weight
    replay = PrefixReplay(model, layers)
    x = torch.randint(3, 100, (2, 8))
    with replay.recording(), torch.inference_mode():
        model(input_ids=x)
    assert replay.skipped("lm_head") == []  # its weight also feeds the first block
    assert replay.skipped("transformer.h.1.mlp.c_fc") == [0]

    flat = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    assert find_blocks(flat, ["0", "2"]) is None
    r = PrefixReplay(flat, select_layers(flat))
    assert not r.enabled and r.skipped("2") == []


def test_recording_over_budget_switches_replay_off(tiny_dirs, small_text_file):
    loaded = load_model(str(tiny_dirs["llama"]))
    model = loaded.model.eval()
    batches = load_data([small_text_file], loaded.tokenizer, samples=2, seq_len=16, batch_size=2)
    ev = Evaluator(model, batches)
    replay = PrefixReplay(model, select_layers(model), max_bytes=1024)
    with replay.recording():
        ev.delta(model, "probe")
    assert not replay.enabled and replay.bytes == 0
    assert replay.skipped("lm_head") == []


def test_blocks_with_foreign_hooks_are_not_replayed():
    model = tiny_model("llama")
    handle = model.model.layers[0].register_forward_hook(lambda mod, args, out: None)
    try:
        replay = PrefixReplay(model, select_layers(model))
        assert not replay.enabled and replay.skipped("lm_head") == []
    finally:
        handle.remove()
    assert PrefixReplay(model, select_layers(model)).enabled
