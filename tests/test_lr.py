"""The learning-rate schedule: CMX's WarmUpPolyLR, and the authors' lr-after-step offset."""
import pytest
import torch

from smmcl.engine.lr import WarmUpPolyLR, lr_for_step, set_lr


def formula(k, base=6e-5, power=0.9, total=100, warmup=10):
    return base * k / warmup if k < warmup else base * (1 - k / total) ** power


@pytest.mark.parametrize('k', [0, 1, 5, 9, 10, 11, 50, 99, 100])
def test_warmup_then_poly_matches_the_formula(k):
    policy = WarmUpPolyLR(6e-5, 0.9, total_iters=100, warmup_steps=10)
    assert policy.get_lr(k) == pytest.approx(formula(k), rel=1e-12, abs=0)


def test_schedule_shape():
    policy = WarmUpPolyLR(1.0, 0.9, total_iters=100, warmup_steps=10)
    assert policy.get_lr(0) == 0.0  # warm-up starts at 0
    assert policy.get_lr(5) == 0.5
    assert policy.get_lr(10) == pytest.approx(0.9 ** 0.9)  # first poly value, below the peak
    assert policy.get_lr(100) == 0.0
    lrs = [policy.get_lr(k) for k in range(10, 101)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))  # strictly decreasing after warm-up
    no_warmup = WarmUpPolyLR(1.0, 1.0, total_iters=4, warmup_steps=0)
    assert [no_warmup.get_lr(k) for k in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_authors_loop_runs_step_k_with_lr_of_k_minus_1():
    """Replays CMX's loop (lr written after optimizer.step() from current_idx) and records the lr
    every step actually ran with."""
    base, niters, nepochs = 0.1, 3, 4
    policy = WarmUpPolyLR(base, 0.9, nepochs * niters, niters * 1)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=base)
    used = []
    for epoch in range(1, nepochs + 1):
        for idx in range(niters):
            used.append(optimizer.param_groups[0]['lr'])
            param.grad = torch.ones(1)
            optimizer.step()
            set_lr(optimizer, policy.get_lr((epoch - 1) * niters + idx))
    expected = [base] + [formula(k, base, 0.9, nepochs * niters, niters) for k in range(nepochs * niters - 1)]
    assert used == pytest.approx(expected, rel=1e-12, abs=0)
    assert used == pytest.approx([lr_for_step(policy, k) for k in range(nepochs * niters)], rel=1e-12, abs=0)
    assert used[0] == base and used[1] == 0.0  # step 0 runs with the base lr, step 1 with lr(0) = 0
