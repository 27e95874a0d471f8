"""Probe (issue 14 s7): the prototype momentum callback forms F̃_c from the *global* batch, in the fast suite.

``PrototypeMomentum`` all-reduces the local sums Σ y p F and weights Σ y p before P_c ← β P_c + (1 − β) F̃_c
(β = 0.7; dossier ``method-oxnet.md`` a.9, ``callbacks/prototype_momentum.py``). Only a slow two-process test
exercised that reduction; here a stand-in strategy adds a second rank's statistics, so dropping the reduction (each
rank then drifts to its own prototypes) or bending β turns this test red without starting processes.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from callbacks.prototype_momentum import PrototypeMomentum


class _Module(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("prototypes", torch.tensor([[1.0, 1.0], [0.0, 0.0], [5.0, 5.0]]))
        self.register_buffer("prototype_updates", torch.tensor([2.0, 0.0, 1.0]))
        self.prototype_stats = None


class _TwoRanks:
    """``strategy.reduce(sum)`` as on two ranks: this rank's tensor plus the other rank's."""

    def __init__(self, other: torch.Tensor) -> None:
        self.other = other
        self.calls = 0

    def reduce(self, tensor: torch.Tensor, reduce_op: str = "sum") -> torch.Tensor:
        assert reduce_op == "sum"
        self.calls += 1
        return tensor + self.other


def test_prototypes_move_to_the_global_batch_mean_with_beta_0_7():
    module = _Module()
    # this rank: class 0 with Σ y p F = (3, 0) over Σ y p = 1.5; nothing of classes 1, 2
    module.prototype_stats = (torch.tensor([[3.0, 0.0], [0.0, 0.0], [0.0, 0.0]]), torch.tensor([1.5, 0.0, 0.0]))
    # the other rank: class 0 with (0, 2) over 0.5, class 1 (first time) with (4, 8) over 2
    other = torch.tensor([[0.0, 2.0, 0.5], [4.0, 8.0, 2.0], [0.0, 0.0, 0.0]])
    strategy = _TwoRanks(other)
    trainer = SimpleNamespace(strategy=strategy, global_step=1)
    PrototypeMomentum(beta=0.7, log_every_n_steps=0).on_train_batch_end(trainer, module, None, None, 0)
    assert strategy.calls == 1
    global_mean_0 = torch.tensor([3.0, 2.0]) / 2.0  # (Σ sums) / (Σ weights) over both ranks
    want = torch.stack([0.7 * torch.tensor([1.0, 1.0]) + 0.3 * global_mean_0,  # 0.7 P + 0.3 F̃
                        torch.tensor([2.0, 4.0]),  # never set before: copied
                        torch.tensor([5.0, 5.0])])  # absent from the global batch: kept
    torch.testing.assert_close(module.prototypes, want)
    assert module.prototype_updates.tolist() == [3.0, 1.0, 1.0]
    assert module.prototype_stats is None  # consumed: a step without new statistics changes nothing
