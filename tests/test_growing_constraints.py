"""GEMProjector's constraints over continual learning: none at first, one more per finished
task (add_constraint / remove_constraint), saved and resumed across a task boundary; and
the defaults as the papers ran them."""

import copy
import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradsurgery import GEMProjector
from gradsurgery.functional import gem_project
from tests.helpers import flat_grad, memory_loss, mlp, set_flat_grad, task_loss
from tests.sync_guard import no_host_sync

OPTIMIZERS = {
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.1),
}


def grow_step(opt: GEMProjector, net: torch.nn.Module, step: int) -> None:
    """One step whose constraint named ``"k"`` is memory loss ``k``."""
    opt.zero_grad()
    task_loss(net, step).backward()
    for name in opt.row_names:
        with opt.constraint(name):
            memory_loss(net, step, int(name)).backward()
    opt.step()


def by_hand(net, inner, step: int, names, margin: float) -> None:
    inner.zero_grad()
    g = flat_grad(net, task_loss(net, step))
    if names:
        J = torch.stack([flat_grad(net, memory_loss(net, step, int(n))) for n in names])
        g = gem_project(g, J, margin)
    set_flat_grad(net, g)
    inner.step()


def exact(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("make", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_no_constraint_steps_the_inner_optimizer_exactly(make):
    net, ref = mlp(), mlp()
    opt = GEMProjector(make(net.parameters()), 0.5, constraints=0)
    ref_opt = make(ref.parameters())
    for step in range(5):
        opt.zero_grad()
        task_loss(net, step).backward()
        opt.step()
        ref_opt.zero_grad()
        task_loss(ref, step).backward()
        ref_opt.step()
        assert exact(net, ref)
        assert not opt.last_stats.projected
    assert opt.last_stats.to_dict()["gem/change_norm"] == 0.0


def test_no_constraint_without_validation_needs_no_host_sync_and_changes_nothing():
    net, ref = mlp(), mlp()
    opt = GEMProjector(torch.optim.SGD(net.parameters(), lr=0.1), constraints=0, validate=False)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for step in range(3):
        with no_host_sync():
            opt.zero_grad()
            task_loss(net, step).backward()
            opt.apply_surgery()
        opt.step()
        ref_opt.zero_grad()
        task_loss(ref, step).backward()
        ref_opt.step()
        assert exact(net, ref)


@pytest.mark.parametrize("make", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
@pytest.mark.parametrize("margin", [0.0, 0.5])
def test_constraints_added_per_task_project_as_by_hand(make, margin):
    net, ref = mlp(), mlp()
    opt = GEMProjector(make(net.parameters()), margin, constraints=[])
    ref_opt = make(ref.parameters())
    projected = 0
    for task in range(4):
        for step in range(3 * task, 3 * task + 3):
            grow_step(opt, net, step)
            by_hand(ref, ref_opt, step, opt.row_names, margin)
            projected += int(opt.last_stats.projected)
            torch.testing.assert_close(list(net.parameters()), list(ref.parameters()))
        opt.add_constraint(str(task))
    assert opt.row_names == ("0", "1", "2", "3") and opt.bank.rows == 5
    assert projected > 0


def test_removing_a_constraint_keeps_the_others_rows():
    net, ref = mlp(), mlp()
    opt = GEMProjector(torch.optim.SGD(net.parameters(), lr=0.1), 0.0, constraints=["0", "1", "2"])
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt.zero_grad()
    task_loss(net, 0).backward()
    rows = opt.bank.blocks[0].clone()
    opt.remove_constraint("1")  # between steps: the stale rows move with their names
    assert opt.row_names == ("0", "2")
    torch.testing.assert_close(opt.bank.blocks[0], rows[[0, 1, 3]], rtol=0, atol=0)
    for name in ("0", "2"):
        with opt.constraint(name):
            memory_loss(net, 0, int(name)).backward()
    opt.step()
    by_hand(ref, ref_opt, 0, ("0", "2"), 0.0)
    torch.testing.assert_close(list(net.parameters()), list(ref.parameters()))
    opt.remove_constraint(0)
    opt.remove_constraint("2")
    assert opt.row_names == () and opt.bank.rows == 1


def test_the_task_gradient_survives_adding_a_constraint():
    net = mlp()
    opt = GEMProjector(torch.optim.SGD(net.parameters(), lr=0.1), 0.0, constraints=0)
    opt.zero_grad()
    task_loss(net, 0).backward()
    grads = [p.grad.clone() for p in net.parameters()]
    opt.add_constraint("0")
    assert all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), grads, strict=True))
    assert opt.bank.blocks[0][0].data_ptr() == net[0].weight.grad.data_ptr()


def test_a_parameter_without_gradient_is_still_not_stepped_after_adding_a_constraint():
    # Regression: the rebuilt buffer must carry which parameters a backward pass reached,
    # or AdamW's weight decay would move a parameter that got no gradient.
    net = mlp()
    unused = torch.nn.Parameter(torch.ones(3))
    opt = GEMProjector(
        torch.optim.AdamW([*net.parameters(), unused], lr=0.1, weight_decay=0.5), 0.0, constraints=0
    )
    opt.zero_grad()
    opt.add_constraint("0")
    grow_step(opt, net, 0)
    assert torch.equal(unused, torch.ones(3))


@pytest.mark.parametrize("where", ["constraint", "apply_surgery"])
def test_changing_the_constraints_mid_step_is_refused_and_changes_nothing(where):
    net = mlp()
    opt = GEMProjector(torch.optim.SGD(net.parameters(), lr=0.1), 0.0, constraints=["0"])
    opt.zero_grad()
    task_loss(net, 0).backward()
    with opt.constraint("0"):
        memory_loss(net, 0, 0).backward()
    if where == "apply_surgery":
        opt.apply_surgery()
    bank, grads = opt.bank, [p.grad.clone() for p in net.parameters()]
    saved = opt.state_dict()
    other = GEMProjector(torch.optim.SGD(mlp().parameters(), lr=0.1), 0.0, constraints=["0", "1"])
    with pytest.raises(RuntimeError, match="cannot change in the middle of a step"):
        opt.add_constraint("1")
    with pytest.raises(RuntimeError, match="cannot change in the middle of a step"):
        opt.remove_constraint("0")
    with pytest.raises(RuntimeError, match="cannot change in the middle of a step"):
        opt.load_state_dict(other.state_dict())
    opt.load_state_dict(saved)  # the same set: nothing to rebuild
    assert opt.bank is bank and opt.row_names == ("0",)
    assert all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), grads, strict=True))
    opt.step()
    opt.add_constraint("1")  # between steps
    assert opt.row_names == ("0", "1")


def test_bad_names_and_solvers_are_refused_before_anything_changes():
    net = mlp()
    opt = GEMProjector(
        torch.optim.SGD(net.parameters(), lr=0.1), 0.0, constraints=["0"], solver="closed_form"
    )
    bank = opt.bank
    with pytest.raises(ValueError, match="exactly one"):
        opt.add_constraint("1")
    with pytest.raises(ValueError, match="unique"):
        opt.add_constraint("0")
    with pytest.raises(ValueError, match="non-empty names"):
        opt.add_constraint("")
    with pytest.raises(ValueError, match="unknown constraint"):
        opt.remove_constraint("7")
    assert opt.bank is bank and opt.row_names == ("0",)
    opt.remove_constraint("0")
    with pytest.raises(ValueError, match="add one with add_constraint"):
        opt.constraint()


@pytest.mark.parametrize("save_at", [6, 8])  # right at the task boundary, and inside task 1
def test_resume_across_a_task_boundary_is_bit_identical(save_at):
    def run(net, opt, steps):
        for step in steps:
            grow_step(opt, net, step)
            if step % 6 == 5:  # a task ends: its memory becomes a constraint
                opt.add_constraint(str(step // 6))

    net = mlp()
    opt = GEMProjector(torch.optim.AdamW(net.parameters(), lr=0.01), 0.5, constraints=0)
    run(net, opt, range(save_at))
    buffer = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buffer)
    run(net, opt, range(save_at, 14))

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_net = mlp(seed=1)
    resumed_net.load_state_dict(saved["model"])
    resumed = GEMProjector(torch.optim.AdamW(resumed_net.parameters(), lr=0.01), 0.5, constraints=0)
    resumed.load_state_dict(saved["opt"])
    assert resumed.row_names == ("0",) and resumed.bank.rows == 2
    run(resumed_net, resumed, range(save_at, 14))
    assert resumed.row_names == opt.row_names == ("0", "1")
    assert exact(net, resumed_net)


def test_a_copy_keeps_its_constraints():
    net = mlp()
    opt = GEMProjector(torch.optim.SGD(net.parameters(), lr=0.1), 0.0, constraints=0)
    opt.add_constraint("0")
    net2, opt2 = copy.deepcopy((net, opt))
    grow_step(opt, net, 0)
    grow_step(opt2, net2, 0)
    assert opt2.row_names == ("0",) and exact(net, net2)


@given(
    ops=st.lists(st.tuples(st.booleans(), st.integers(0, 5)), min_size=1, max_size=8),
    margin=st.sampled_from([0.0, 0.5]),
)
@settings(max_examples=25, deadline=None)
def test_any_sequence_of_additions_and_removals_projects_onto_the_current_set(ops, margin):
    net, ref = mlp(), mlp()
    opt = GEMProjector(torch.optim.SGD(net.parameters(), lr=0.05), margin, constraints=0)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    for step, (add, k) in enumerate(ops):
        if add and str(k) not in opt.row_names:
            opt.add_constraint(str(k))
        elif not add and str(k) in opt.row_names:
            opt.remove_constraint(str(k))
        assert opt.bank.rows == 1 + len(opt.row_names)
        grow_step(opt, net, step)
        by_hand(ref, ref_opt, step, opt.row_names, margin)
        torch.testing.assert_close(list(net.parameters()), list(ref.parameters()))


def test_agem_as_its_paper_runs_it_is_one_constraint_on_a_mixed_batch():
    # Chaudhry et al. (2019): g̃ = g − (gᵀg_ref / g_refᵀg_ref) g_ref when gᵀg_ref < 0, where
    # g_ref is the gradient of one batch drawn across the whole memory; no margin.
    net = mlp()
    opt = GEMProjector(torch.optim.SGD(net.parameters(), lr=1.0), mode="agem", constraints="memory")
    assert opt.margin == 0.0
    opt.zero_grad()
    g = flat_grad(net, task_loss(net, 0)).double()
    ref = flat_grad(net, memory_loss(net, 0, 0) + memory_loss(net, 0, 1)).double()
    assert g @ ref < 0  # the projection is exercised
    expected = g - (g @ ref) / (ref @ ref) * ref
    task_loss(net, 0).backward()
    with opt.constraint():
        (memory_loss(net, 0, 0) + memory_loss(net, 0, 1)).backward()
    opt.apply_surgery()
    got = torch.cat([p.grad.flatten() for p in net.parameters()]).double()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_the_default_margin_is_the_original_codes_for_gem_and_none_for_agem():
    params = mlp().parameters
    assert GEMProjector(torch.optim.SGD(params(), lr=0.1)).margin == 0.5
    assert GEMProjector(torch.optim.SGD(params(), lr=0.1), mode="agem").margin == 0.0
    assert GEMProjector(torch.optim.SGD(params(), lr=0.1), margin=0.0).margin == 0.0
