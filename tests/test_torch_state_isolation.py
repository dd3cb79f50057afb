"""Process-global torch state does not leak from one test into the next (tests/conftest.py restores it).

The two tests run in file order: the first changes every setting the fixture guards, the second sees
the values the session started with. Before the fixture, importing tests/problems.py set one torch
thread for the rest of the session, and the seeded training digests of test_train_device.py changed.
"""

from __future__ import annotations

import torch

_START = {}


def test_a_test_may_change_global_torch_state():
    _START.update(threads=torch.get_num_threads(), dtype=torch.get_default_dtype(),
                  det=torch.are_deterministic_algorithms_enabled(), mm=torch.get_float32_matmul_precision())
    torch.set_num_threads(1 if _START["threads"] != 1 else 2)
    torch.set_default_dtype(torch.float64)
    torch.use_deterministic_algorithms(True)
    torch.set_float32_matmul_precision("medium" if _START["mm"] != "medium" else "high")


def test_the_next_test_sees_the_state_the_session_had():
    assert _START, "run the whole file: the first test records the starting state"
    assert torch.get_num_threads() == _START["threads"]
    assert torch.get_default_dtype() == _START["dtype"] == torch.float32
    assert torch.are_deterministic_algorithms_enabled() == _START["det"]
    assert torch.get_float32_matmul_precision() == _START["mm"]

