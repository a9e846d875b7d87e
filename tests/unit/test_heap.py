"""The CLI process's collector settings (specprune.heap): active only after the entry point enables
them, never in library use, and off with SPECPRUNE_GC_FREEZE=0."""

from __future__ import annotations

import gc

import pytest
from torch import nn

from specprune import heap
from specprune.models import load_model


@pytest.fixture
def fresh_heap(monkeypatch):
    thresholds, frozen = gc.get_threshold(), gc.get_freeze_count()
    monkeypatch.setattr(heap, "_enabled", False)
    monkeypatch.setattr(heap, "_thresholds", None)
    yield thresholds
    gc.unfreeze()
    gc.set_threshold(*thresholds)
    assert frozen == 0  # nothing else in the test process had frozen objects


def test_library_use_leaves_the_collector_alone(fresh_heap):
    load_model(nn.Linear(3, 2))
    heap.settle()
    assert gc.get_threshold() == fresh_heap and gc.get_freeze_count() == 0


def test_cli_process_defers_full_collections_until_a_model_is_loaded(fresh_heap, monkeypatch):
    monkeypatch.delenv("SPECPRUNE_GC_FREEZE", raising=False)
    heap.enable()
    assert heap.enabled()
    assert gc.get_threshold()[:2] == fresh_heap[:2] and gc.get_threshold()[2] > 10**6
    gc.collect(0)  # young collections still run
    freezes = []
    real_freeze = gc.freeze
    monkeypatch.setattr(gc, "freeze", lambda: (freezes.append(1), real_freeze())[1])
    load_model(nn.Linear(3, 2))  # settles: what is alive now is frozen, the thresholds are back
    assert freezes == [1] and gc.get_freeze_count() > 0 and gc.get_threshold() == fresh_heap
    garbage = [[]]
    garbage[0].append(garbage)  # a cycle made after the freeze is still collected
    del garbage
    # a second load freezes nothing more (frozen objects may still be freed by reference counting, so
    # the freeze count itself can drop: CI once saw it fall by 2 between the two loads)
    load_model(nn.Linear(3, 2))
    assert freezes == [1] and gc.collect() >= 1


@pytest.mark.parametrize("value", ["0", "off", "false"])
def test_turned_off_by_the_environment(fresh_heap, monkeypatch, value):
    monkeypatch.setenv("SPECPRUNE_GC_FREEZE", value)
    heap.enable()
    heap.settle()
    assert not heap.enabled() and gc.get_threshold() == fresh_heap and gc.get_freeze_count() == 0


@pytest.mark.parametrize("distributed", [False, True])
def test_the_entry_point_enables_it_except_in_a_torchrun_rank(fresh_heap, monkeypatch, distributed):
    import signal

    import specprune.cli.app as cli
    import specprune.distributed as dist

    monkeypatch.delenv("SPECPRUNE_GC_FREEZE", raising=False)
    monkeypatch.setattr(dist, "init_from_env", lambda: distributed)
    monkeypatch.setattr(dist, "shutdown", lambda: None)
    monkeypatch.setattr(cli, "app", lambda: None)
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        cli.main()
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    assert heap.enabled() is not distributed
    assert (gc.get_threshold() == fresh_heap) is distributed
