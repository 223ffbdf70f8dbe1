"""The fused sparse optimizers are torch optimizers (issue 16, point 4): one check of the
hyperparameters (the core's, at construction and at every step), an lr_scheduler drives the rate
the kernel uses, state_dict() round trips, step()/zero_grad() do nothing harmful."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import engram_rs as er  # noqa: E402
from engram_rs import _engram_rs  # noqa: E402
from engram_rs.torch import SparseAdam, SparseRowwiseAdagrad, SparseSGD, ops  # noqa: E402

ROWS, DIM = 32, 8


def table() -> er.HostTable:
    return er.HostTable.from_numpy(np.zeros((ROWS, DIM), np.float32))


def backward(t: er.HostTable, opt: object, rows: list[int], grad: float = 1.0) -> None:
    """One forward/backward through the host op: the fused step runs inside it."""
    b = ops.bind(t, opt)  # type: ignore[arg-type]
    anchor = torch.nn.Parameter(torch.empty(0))
    out = torch.ops.engram_rs.host_gather(anchor, torch.tensor(rows), b.handle)
    (out * grad).sum().backward()


def core_step_error(kind: str, **hp: float) -> str:
    """The message of the core's own check, raised by a step (no Python check in between)."""
    t = table()
    state = [
        er.HostTable.from_numpy(
            np.zeros((ROWS, 1 if kind == "rowwise_adagrad" else DIM), np.float32)
        )
        for _ in range({"sgd": 0, "rowwise_adagrad": 1, "adam": 2}[kind])
    ]
    args = {"lr": 0.1, "eps": 1e-8, "beta1": 0.9, "beta2": 0.999, **hp}
    with pytest.raises(ValueError) as e:
        _engram_rs.sparse_step(
            t._core,
            np.arange(2),
            np.ones((2, DIM), np.float32),
            kind,
            args["lr"],
            args["eps"],
            args["beta1"],
            args["beta2"],
            [s._core for s in state],
            1,
        )
    return str(e.value)


@pytest.mark.parametrize(
    "make, kind, hp",
    [
        (lambda: SparseAdam(eps=0), "adam", {"eps": 0.0}),
        (lambda: SparseAdam(eps=-1.0), "adam", {"eps": -1.0}),
        (lambda: SparseAdam(betas=(1.0, 0.9)), "adam", {"beta1": 1.0, "beta2": 0.9}),
        (lambda: SparseAdam(lr=float("nan")), "adam", {"lr": float("nan")}),
        (lambda: SparseRowwiseAdagrad(eps=-1.0), "rowwise_adagrad", {"eps": -1.0}),
        (lambda: SparseSGD(lr=-2.0), "sgd", {"lr": -2.0}),
    ],
)
def test_bad_hyperparameters_are_refused_when_made_in_the_cores_words(make, kind, hp) -> None:
    with pytest.raises(ValueError) as made:
        make()
    assert str(made.value) == core_step_error(kind, **hp)


def test_sparse_adam_eps_zero_message() -> None:
    with pytest.raises(
        ValueError, match=r"^SparseAdam: eps must be a finite number above 0, got 0$"
    ):
        SparseAdam(eps=0)


def test_they_are_torch_optimizers_with_one_group() -> None:
    opt = SparseAdam(lr=0.01, betas=(0.8, 0.9), eps=1e-6)
    assert isinstance(opt, torch.optim.Optimizer)
    assert len(opt.param_groups) == 1
    group = opt.param_groups[0]
    assert (group["lr"], tuple(group["betas"]), group["eps"]) == (0.01, (0.8, 0.9), 1e-6)
    assert opt.step() is None and opt.step(lambda: 3.0) == 3.0
    opt.zero_grad()
    with pytest.raises(ValueError, match="one parameter group"):
        opt.add_param_group({"params": [torch.zeros(1, requires_grad=True)]})
    # The state tables come from the core's registry.
    assert SparseAdam.state_shapes == (("exp_avg", None), ("exp_avg_sq", None))
    assert SparseRowwiseAdagrad.state_shapes == (("acc", 1),)
    assert SparseSGD.state_shapes == ()


def test_an_lr_scheduler_changes_the_step_a_host_table_receives() -> None:
    t = table()
    opt = SparseSGD(lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    deltas = []
    for _ in range(3):
        before = t.gather(np.array([3]))[0, 0]
        backward(t, opt, [3])
        deltas.append(float(before - t.gather(np.array([3]))[0, 0]))
        opt.step()
        sched.step()
    assert deltas == [1.0, 0.5, 0.25]
    assert opt.lr == 0.125


def test_a_scheduler_that_sets_a_bad_rate_is_refused_at_the_step() -> None:
    t = table()
    opt = SparseSGD(lr=1.0)
    opt.param_groups[0]["lr"] = float("nan")  # as a broken scheduler would
    with pytest.raises(ValueError, match=r"SparseSGD: lr must be a finite number >= 0, got nan"):
        backward(t, opt, [1])
    assert not t.gather(np.arange(ROWS)).any()


def test_state_dict_round_trip() -> None:
    opt = SparseAdam(lr=0.02, betas=(0.7, 0.95), eps=1e-7, nonfinite="skip", max_grad_norm=2.0)
    t = table()
    backward(t, opt, [1], grad=float("inf"))  # skipped, counted
    assert opt.skipped_steps == 1
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
    opt.step()
    sched.step()
    sd = pickle.loads(pickle.dumps(opt.state_dict()))
    fresh = SparseAdam()
    fresh.load_state_dict(sd)
    assert (fresh.lr, fresh.betas, fresh.eps) == (0.01, (0.7, 0.95), 1e-7)
    assert (fresh.skipped_steps, fresh.max_grad_norm, fresh.nonfinite) == (1, 2.0, "skip")
    assert fresh.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    # The next step of the reloaded optimizer equals the original's.
    a, b = table(), table()
    backward(a, opt, [2, 2, 5])
    backward(b, fresh, [2, 2, 5])
    np.testing.assert_array_equal(a.gather(np.arange(ROWS)), b.gather(np.arange(ROWS)))


def test_bad_state_dicts_are_refused_and_change_nothing() -> None:
    sgd = SparseSGD(lr=0.5).state_dict()
    opt = SparseAdam(lr=0.01)
    with pytest.raises(ValueError, match=r"not of a SparseAdam \(its kind is 'sgd'"):
        opt.load_state_dict(sgd)
    sd = SparseAdam(lr=0.3).state_dict()
    sd["param_groups"][0]["eps"] = 0.0
    with pytest.raises(ValueError, match=r"SparseAdam: eps must be a finite number above 0"):
        opt.load_state_dict(sd)
    sd = SparseAdam(lr=0.3).state_dict()
    del sd["param_groups"][0]["betas"]
    with pytest.raises(ValueError, match="hyperparameters are"):
        opt.load_state_dict(sd)
    assert (opt.lr, opt.eps, opt.betas) == (0.01, 1e-8, (0.9, 0.999))


def test_state_stays_callable_after_a_reload() -> None:
    opt = SparseRowwiseAdagrad(lr=0.1)
    t = table()
    backward(t, opt, [4])
    opt.load_state_dict(opt.state_dict())
    (acc,) = opt.state(t)
    assert acc is opt.state_tables(t)[0] and acc.gather(np.array([4]))[0, 0] > 0


def test_every_kind_of_the_cores_registry_is_a_class_of_that_name() -> None:
    """The core names each kind's class (its messages start with it): the Python classes agree,
    and take their hyperparameters and state layout from the same registry."""
    import engram_rs.torch as et
    from engram_rs.torch.optim import KINDS

    for kind, (name, hyper, state) in KINDS.items():
        cls = getattr(et, name)
        assert cls.kind == kind
        assert cls.hyperparameter_names == hyper and cls.state_shapes == state
