"""Multilevel optimisation by unrolling (spec ``multilevel.md`` §5): on quadratic bilevel and trilevel
problems with closed-form solutions, the unrolled hypergradient matches finite differences, and the
solution of the unrolled problem approaches the analytic one as T grows."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch

from unbackdoor.optim.multilevel import (
    Level,
    box_projection,
    hypergradient,
    l2_ball_projection,
    solve,
    unroll,
)

DT = torch.float64


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def finite_difference(f: Callable[[torch.Tensor], float], x: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    grad = torch.zeros_like(x)
    for j in range(x.numel()):
        e = torch.zeros_like(x)
        e.view(-1)[j] = h
        grad.view(-1)[j] = (f(x + e) - f(x - e)) / (2 * h)
    return grad


def unrolled_minimiser(levels: Sequence[Level], dim: int) -> torch.Tensor:
    """Every level here is quadratic and unprojected, so the unrolled f1 is a quadratic in x1: read its
    Hessian Q and linear term r off hypergradients (∇F(x) = Qx + r) and solve Qx = −r."""
    r = hypergradient(levels, torch.zeros(dim, dtype=DT))[1]
    q = torch.stack([hypergradient(levels, torch.eye(dim, dtype=DT)[j])[1] - r for j in range(dim)], dim=1)
    return torch.linalg.solve(q, -r)


# ----------------------------------------------------------------------------- bilevel
class Bilevel:
    """min_x ½‖y*(x) − c‖² + ρ/2‖x‖²,  y*(x) = argmin_y ½ yᵀHy − yᵀBx = H⁻¹Bx.

    Unrolled from y0 = 0 with step η: y_T = (I − (I − ηH)^T) H⁻¹ B x.
    """

    def __init__(self, m: int = 3, k: int = 4, rho: float = 0.1) -> None:
        q = _rand(k, k, seed=1)
        self.h = q @ q.T / k + torch.eye(k, dtype=DT)
        self.b = _rand(k, m, seed=2)
        self.c = _rand(k, seed=3)
        self.rho, self.m, self.k = rho, m, k
        self.eta = float(1.0 / torch.linalg.eigvalsh(self.h).max())

    def levels(self, steps: int, outer_steps: int = 0, outer_lr: float = 0.1) -> list[Level]:
        def f1(x: Sequence[torch.Tensor]) -> torch.Tensor:
            return 0.5 * ((x[1] - self.c) ** 2).sum() + 0.5 * self.rho * (x[0] ** 2).sum()

        def f2(x: Sequence[torch.Tensor]) -> torch.Tensor:
            return 0.5 * x[1] @ self.h @ x[1] - x[1] @ self.b @ x[0]

        return [Level(f1, torch.zeros(self.m, dtype=DT), outer_steps, outer_lr),
                Level(f2, torch.zeros(self.k, dtype=DT), steps, self.eta)]

    def unrolled_map(self, steps: int) -> torch.Tensor:
        contraction = torch.linalg.matrix_power(torch.eye(self.k, dtype=DT) - self.eta * self.h, steps)
        return (torch.eye(self.k, dtype=DT) - contraction) @ torch.linalg.solve(self.h, self.b)

    def analytic(self) -> torch.Tensor:
        m = torch.linalg.solve(self.h, self.b)
        return torch.linalg.solve(m.T @ m + self.rho * torch.eye(self.m, dtype=DT), m.T @ self.c)


@pytest.mark.parametrize("steps", [1, 5, 20])
def test_bilevel_hypergradient_is_exact_for_the_unrolled_problem(steps: int) -> None:
    prob = Bilevel()
    levels = prob.levels(steps)
    x = _rand(prob.m, seed=4)
    value, grad = hypergradient(levels, x)
    mt = prob.unrolled_map(steps)
    expected = mt.T @ (mt @ x - prob.c) + prob.rho * x  # ∇ of ½‖M_T x − c‖² + ρ/2‖x‖²
    assert torch.allclose(grad, expected, atol=1e-10)
    assert float(value) == pytest.approx(float(0.5 * ((mt @ x - prob.c) ** 2).sum() + 0.5 * prob.rho * x @ x))

    def f(z: torch.Tensor) -> float:
        return float(hypergradient(levels, z)[0])

    assert torch.allclose(grad, finite_difference(f, x), atol=1e-7)


def test_bilevel_unrolled_solution_approaches_the_analytic_one_as_t_grows() -> None:
    prob = Bilevel()
    target = prob.analytic()
    errors = [float((unrolled_minimiser(prob.levels(t), prob.m) - target).norm()) for t in (1, 3, 10, 30, 100)]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:], strict=False)), errors
    assert errors[0] > 0.1 and errors[-1] < 1e-6, errors


def test_solve_reaches_the_unrolled_minimiser_and_lower_level_follows() -> None:
    prob = Bilevel()
    result = solve(prob.levels(30, outer_steps=400, outer_lr=0.5))
    assert torch.allclose(result.x, unrolled_minimiser(prob.levels(30), prob.m), atol=1e-6)
    assert result.history[-1] < result.history[0]
    assert torch.allclose(result.lower[0], prob.unrolled_map(30) @ result.x, atol=1e-10)


# ----------------------------------------------------------------------------- trilevel
class Trilevel:
    """Defender / attacker / learner, all quadratic:

    * level 3 (min): f3 = ½‖x3 − A x1 − B x2‖²             → x3* = A x1 + B x2
    * level 2 (max): f2 = −½‖x3* − a‖² − γ/2‖x2‖²          → x2* = (BᵀB + γI)⁻¹Bᵀ(a − A x1)
    * level 1 (min): f1 = ½‖x3* − b‖² + ρ/2‖x1‖²           → closed form below
    """

    def __init__(self, d1: int = 2, d2: int = 3, d3: int = 4, gamma: float = 3.0, rho: float = 0.1) -> None:
        self.a_mat, self.b_mat = _rand(d3, d1, seed=5), _rand(d3, d2, seed=6)
        self.a, self.b = _rand(d3, seed=7), _rand(d3, seed=8)
        self.gamma, self.rho, self.dims = gamma, rho, (d1, d2, d3)

    def levels(self, t2: int, t3: int) -> list[Level]:
        d1, d2, d3 = self.dims

        def f1(x: Sequence[torch.Tensor]) -> torch.Tensor:
            return 0.5 * ((x[2] - self.b) ** 2).sum() + 0.5 * self.rho * (x[0] ** 2).sum()

        def f2(x: Sequence[torch.Tensor]) -> torch.Tensor:
            return -0.5 * ((x[2] - self.a) ** 2).sum() - 0.5 * self.gamma * (x[1] ** 2).sum()

        def f3(x: Sequence[torch.Tensor]) -> torch.Tensor:
            return 0.5 * ((x[2] - self.a_mat @ x[0] - self.b_mat @ x[1]) ** 2).sum()

        lr2 = float(1.0 / (torch.linalg.eigvalsh(self.b_mat.T @ self.b_mat).max() + self.gamma))
        return [Level(f1, torch.zeros(d1, dtype=DT)),
                Level(f2, torch.zeros(d2, dtype=DT), t2, lr2, sense="max"),
                Level(f3, torch.zeros(d3, dtype=DT), t3, 0.5)]

    def analytic(self) -> torch.Tensor:
        d1, d2, d3 = self.dims
        k = torch.linalg.solve(self.b_mat.T @ self.b_mat + self.gamma * torch.eye(d2, dtype=DT), self.b_mat.T)
        bkb = self.b_mat @ k
        g = (torch.eye(d3, dtype=DT) - bkb) @ self.a_mat
        h = bkb @ self.a
        return torch.linalg.solve(g.T @ g + self.rho * torch.eye(d1, dtype=DT), g.T @ (self.b - h))


@pytest.mark.parametrize(("t2", "t3"), [(1, 1), (3, 4)])
def test_trilevel_hypergradient_matches_finite_differences(t2: int, t3: int) -> None:
    prob = Trilevel()
    levels = prob.levels(t2, t3)
    x = _rand(prob.dims[0], seed=9)
    _, grad = hypergradient(levels, x)

    def f(z: torch.Tensor) -> float:
        return float(hypergradient(levels, z)[0])

    assert grad.abs().max() > 1e-3  # not trivially zero: x1 reaches f1 through both unrolled loops
    assert torch.allclose(grad, finite_difference(f, x), atol=1e-7)


def test_trilevel_attacker_ascends_and_solution_approaches_the_analytic_one() -> None:
    prob = Trilevel()
    target = prob.analytic()
    steps = [(1, 1), (4, 4), (12, 12), (30, 20)]
    errors = [float((unrolled_minimiser(prob.levels(t2, t3), prob.dims[0]) - target).norm()) for t2, t3 in steps]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:], strict=False)), errors
    assert errors[0] > 0.1 and errors[-1] < 1e-4, errors
    # the unrolled attacker ends near its best response to x1
    x1 = _rand(prob.dims[0], seed=10)
    x2 = unroll(prob.levels(40, 40), [x1])[0]
    k = torch.linalg.solve(prob.b_mat.T @ prob.b_mat + prob.gamma * torch.eye(prob.dims[1], dtype=DT), prob.b_mat.T)
    assert torch.allclose(x2, k @ (prob.a - prob.a_mat @ x1), atol=1e-4)


# ----------------------------------------------------------------------------- projections, API
def test_projections() -> None:
    box = box_projection(0.0, 1.0)
    assert torch.equal(box(torch.tensor([-0.5, 0.3, 1.7])), torch.tensor([0.0, 0.3, 1.0]))
    ball = l2_ball_projection(0.5)
    p = ball(torch.tensor([[3.0, 4.0], [0.1, 0.0], [0.0, 0.0]]))
    assert torch.allclose(p.norm(dim=1), torch.tensor([0.5, 0.1, 0.0]))
    assert torch.allclose(p[0], torch.tensor([0.3, 0.4]))
    zero = torch.zeros(1, 2, requires_grad=True)
    (grad,) = torch.autograd.grad(ball(zero).sum(), zero)
    assert torch.isfinite(grad).all()  # the norm is smoothed at zero


def test_maximising_level_projected_onto_a_ball_stays_inside() -> None:
    # the attacker wants x2 far along a; the ball keeps every row within ε
    a = torch.tensor([[3.0, 4.0], [-1.0, 0.0]], dtype=DT)

    def f2(x: Sequence[torch.Tensor]) -> torch.Tensor:
        return (x[1] * a).sum() * x[0].sum()

    levels = [Level(lambda x: (x[1] ** 2).sum(), torch.ones(1, dtype=DT)),
              Level(f2, torch.zeros(2, 2, dtype=DT), 5, 1.0, sense="max", project=l2_ball_projection(0.2))]
    (x2,) = unroll(levels, [torch.ones(1, dtype=DT)])
    assert torch.allclose(x2.norm(dim=1), torch.full((2,), 0.2, dtype=DT))
    assert torch.allclose(x2[0], 0.2 * a[0] / a[0].norm())


def test_level_validation() -> None:
    with pytest.raises(ValueError, match="sense"):
        Level(lambda x: x[0].sum(), torch.zeros(1), sense="up")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lr"):
        Level(lambda x: x[0].sum(), torch.zeros(1), lr=0)
    with pytest.raises(ValueError, match="scalar"):
        hypergradient([Level(lambda x: x[0] * 2, torch.zeros(2))], torch.zeros(2))
