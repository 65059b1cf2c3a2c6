"""Exact-tier tests for slt.theory (closed-form learning coefficients)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from slt import theory
from slt.theory import (
    TMS_CRITICAL_POINTS,
    dln_llc,
    dln_num_params,
    dln_subset,
    exact_quadratic_llc,
    hessian_rank_bounds,
    normal_crossing_llc,
    normal_crossing_multiplicity,
    regular_llc,
    rrr_case,
    rrr_llc,
    rrr_multiplicity,
    tanh_llc,
    tms_llc,
)

from conftest import F64, fp_tol


def _rrr_grid(max_size: int = 6):
    for n, h, m in itertools.product(range(1, max_size + 1), repeat=3):
        for r in range(min(n, h, m) + 1):
            yield n, h, m, r


def _dln_grid(max_width: int = 4, max_layers: int = 4):
    """All width vectors of length 2..max_layers+1 with entries in 1..max_width."""
    for length in range(2, max_layers + 2):
        for ws in itertools.product(range(1, max_width + 1), repeat=length):
            for r in range(min(ws) + 1):
                yield list(ws), r


# ---------------------------------------------------------------------------
# API surface
# ---------------------------------------------------------------------------


def test_all_is_explicit_and_resolvable():
    expected = {
        "regular_llc",
        "normal_crossing_llc",
        "normal_crossing_multiplicity",
        "rrr_llc",
        "rrr_multiplicity",
        "dln_llc",
        "tanh_llc",
        "tms_llc",
        "TMS_CRITICAL_POINTS",
        "hessian_rank_bounds",
        "exact_quadratic_llc",
    }
    assert expected <= set(theory.__all__)
    for name in theory.__all__:
        assert hasattr(theory, name), name


# ---------------------------------------------------------------------------
# Regular and normal crossing
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("d, expected", [(0, 0.0), (1, 0.5), (7, 3.5), (100, 50.0)])
def test_regular_llc(d, expected):
    assert regular_llc(d) == expected
    assert isinstance(regular_llc(d), float)


@pytest.mark.parametrize(
    "powers, lam, mult",
    [
        ([1], 0.5, 1),
        ([2], 0.25, 1),
        ([1, 1], 0.5, 2),
        ([1, 2], 0.25, 1),
        ([3, 1, 3], 1 / 6, 2),
        ([0, 1], 0.5, 1),  # w_0 does not appear in K: a free direction
        ([0, 0, 2, 2, 2], 0.25, 3),
        ([5, 4, 3, 2, 1], 0.1, 1),
    ],
)
def test_normal_crossing(powers, lam, mult):
    assert normal_crossing_llc(powers) == pytest.approx(lam, abs=fp_tol(F64, scale=lam))  # one rounded division
    assert normal_crossing_multiplicity(powers) == mult


def test_normal_crossing_accepts_arrays_and_tuples():
    assert normal_crossing_llc(np.array([1, 2, 2])) == 0.25
    assert normal_crossing_multiplicity((1, 2, 2)) == 2
    assert normal_crossing_llc(torch.tensor([3, 0])) == pytest.approx(1 / 6)


# ---------------------------------------------------------------------------
# Reduced-rank regression
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, h, m, r, case, lam, mult",
    [
        # case 1, N+M+H+r odd: [2*3*10 - 0 - 9]/8 + 1/8 = 52/8
        (5, 3, 5, 0, 1, 6.5, 2),
        # case 1, even: [2*4*10 - 0 - 16]/8 = 8
        (5, 4, 5, 0, 1, 8.0, 1),
        # case 1 with rank: [2*4*8 - 0 - 16]/8 = 6
        (4, 3, 4, 1, 1, 6.0, 1),
        # case 2 (M + H < N + r): (H M - H r + N r)/2 = (3*4 - 0 + 0)/2
        (8, 3, 4, 0, 2, 6.0, 1),
        (8, 2, 3, 1, 2, (2 * 3 - 2 + 8) / 2, 1),
        # case 3 (N + H < M + r): (H N - H r + M r)/2
        (4, 3, 8, 0, 3, 6.0, 1),
        (3, 2, 8, 1, 3, (2 * 3 - 2 + 8) / 2, 1),
        # case 4 (N + M < H + r): N M / 2
        (3, 8, 4, 0, 4, 6.0, 1),
        (1, 4, 2, 1, 4, 1.0, 1),
    ],
)
def test_rrr_cases(n, h, m, r, case, lam, mult):
    assert rrr_case(n, h, m, r) == case
    assert rrr_llc(n, h, m, r) == pytest.approx(lam, abs=fp_tol(F64, scale=lam))  # exact rationals, each rounded once
    assert rrr_multiplicity(n, h, m, r) == mult


def test_rrr_grid_covers_all_cases_and_is_transpose_symmetric():
    cases = {1: 0, 2: 0, 3: 0, 4: 0}
    for n, h, m, r in _rrr_grid():
        cases[rrr_case(n, h, m, r)] += 1
        assert rrr_llc(n, h, m, r) == rrr_llc(m, h, n, r)
        assert 0 <= rrr_llc(n, h, m, r) <= h * (n + m) / 2
    assert cases == {1: 387, 2: 90, 3: 90, 4: 90}


def test_rrr_full_rank_square_is_regular_dimension_of_image():
    # Full rank r = N = H = M: the rank-r matrices form an open set of
    # dimension N*M and the model is regular in that quotient: λ = N M / 2.
    for k in range(1, 8):
        assert rrr_llc(k, k, k, k) == k * k / 2


# ---------------------------------------------------------------------------
# Deep linear networks
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "widths, rank, expected",
    [
        ([5, 3, 5], 0, 6.5),
        ([10, 10, 10, 10], 0, 33.5),
        ([10, 10, 10, 10], 5, 46.0),
        ([10, 20, 20, 10], 5, 50.0),
    ],
)
def test_dln_published_examples(widths, rank, expected):
    assert dln_llc(widths, rank) == expected


@pytest.mark.parametrize(
    "widths, rank, subset",
    [
        ([5, 3, 5], 0, (0, 1, 2)),
        ([10, 20, 20, 10], 5, (0, 3)),
        ([10, 1, 1, 10], 0, (1, 2)),
    ],
)
def test_dln_subset_examples(widths, rank, subset):
    assert dln_subset(widths, rank) == subset


def test_dln_bottleneck_is_normal_crossing():
    # [10, 1, 1, 10], r = 0: K ~ |w1|^2 w2^2 |w3|^2, the scalar middle weight
    # dominates and λ = 1/2.
    assert dln_llc([10, 1, 1, 10], 0) == 0.5


@pytest.mark.parametrize("n, m", [(1, 1), (3, 5), (7, 2), (10, 10)])
def test_dln_no_hidden_layer_is_regular(n, m):
    for r in range(min(n, m) + 1):
        assert dln_llc([n, m], r) == n * m / 2


def test_dln_general_formula_handles_length_two_without_shortcut():
    # Evaluate Aoyagi's formula directly for L = 1 to check the shortcut is not hiding a bug.
    for n, m in itertools.product(range(1, 7), repeat=2):
        for r in range(min(n, m) + 1):
            ms = [n - r, m - r]
            subset = dln_subset([n, m], r)
            assert subset == (0, 1)
            total, ell = sum(ms), 1
            a = total - (math.ceil(total / ell) - 1) * ell
            lam = (r * (n + m) - r * r) / 2 + a * (ell - a) / (4 * ell) + ms[0] * ms[1] / 2
            assert lam == n * m / 2


def test_dln_one_hidden_layer_matches_rrr_on_grid():
    seen_cases = set()
    for n, h, m, r in _rrr_grid():
        seen_cases.add(rrr_case(n, h, m, r))
        assert dln_llc([n, h, m], r) == rrr_llc(n, h, m, r), (n, h, m, r)
    assert seen_cases == {1, 2, 3, 4}


def _brute_force_subsets(ms):
    return [
        subset
        for k in range(2, len(ms) + 1)
        for subset in itertools.combinations(range(len(ms)), k)
        if theory._dln_conditions(ms, subset)
    ]


def test_dln_subset_search_equals_exhaustive_search_and_is_unique():
    count = 0
    for ws, r in _dln_grid(max_width=4, max_layers=4):
        ms = [w - r for w in ws]
        candidates = _brute_force_subsets(ms)
        assert len(candidates) == 1, (ws, r, candidates)
        assert candidates[0] == dln_subset(ws, r)
        count += 1
    assert count > 1000


def test_dln_transpose_symmetry_and_below_regular_value():
    for ws, r in _dln_grid(max_width=5, max_layers=3):
        lam = dln_llc(ws, r)
        assert lam == dln_llc(ws[::-1], r), (ws, r)
        assert lam <= dln_num_params(ws) / 2, (ws, r)
        # at least the regular part from the rank-r truth
        assert lam >= (r * (ws[0] + ws[-1]) - r * r) / 2
        assert lam > 0


def test_dln_num_params():
    assert dln_num_params([5, 3, 5]) == 30
    assert dln_num_params([10, 20, 20, 10]) == 800
    assert dln_num_params([4, 7]) == 28


def test_dln_accepts_numpy_integers():
    assert dln_llc(np.array([5, 3, 5]), np.int64(0)) == 6.5


# ---------------------------------------------------------------------------
# tanh network
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "h, expected",
    [(1, 0.5), (2, 2 / 3), (3, 5 / 6), (4, 1.0), (5, 1.1), (9, 1.5), (10, 22 / 14)],
)
def test_tanh_llc(h, expected):
    assert tanh_llc(h) == pytest.approx(expected, abs=fp_tol(F64, scale=expected))  # exact rationals, each rounded once


def test_tanh_llc_below_regular():
    for h in range(1, 200):
        assert tanh_llc(h) < h  # d = 2H, d/2 = H
        assert tanh_llc(h + 1) > tanh_llc(h)


# ---------------------------------------------------------------------------
# Toy model of superposition
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        ("5-gon", 7.0),
        ("5gon", 7.0),
        ("5-gon+", 8.5),
        ("5-gon-plus", 8.5),
        ("5gon+", 8.5),
        ("5+-gon", 8.5),
        ("5-Gon⁺", 8.5),
        ("6-gon", 8.5),
        ("6gon", 8.5),
        ("hexagon", 8.5),
    ],
)
def test_tms_llc(name, expected):
    assert tms_llc(name) == expected


def test_tms_table():
    assert set(TMS_CRITICAL_POINTS) == {"5-gon", "5-gon+", "6-gon"}
    five, five_plus, six = (TMS_CRITICAL_POINTS[k] for k in ("5-gon", "5-gon+", "6-gon"))
    assert (five["l"], five["b"], five["loss"], five["llc"]) == (1.17046, -0.28230, 0.06874, 7.0)
    assert (six["l"], six["b"], six["loss"], six["llc"]) == (1.32052, -0.61813, 0.04819, 8.5)
    assert (five_plus["l"], five_plus["b"]) == (five["l"], five["b"])
    assert five_plus["dead_bias"] == pytest.approx(1 / 12)
    assert (five_plus["loss"], five_plus["llc"]) == (0.06180, 8.5)
    # Raising one dead column's bias to 1/(2n) lowers the loss by 1/(4 n^2), n = 6.
    assert five["loss"] - five_plus["loss"] == pytest.approx(1 / 144, abs=1e-4)
    for point in TMS_CRITICAL_POINTS.values():
        assert point["llc"] <= 18 / 2  # d = 2*6 + 6


def _tms_kgon_loss(k: int, l: float, b: float, n: int = 6, grid: int = 20001) -> float:
    """High-sparsity TMS loss of a regular k-gon with n - k dead columns (bias <= 0)."""
    mu = np.linspace(0.0, 1.0, grid)
    total = 0.0
    for j in range(k):
        cos = np.cos(2 * np.pi * (np.arange(k) - j) / k)
        out = np.maximum(mu[:, None] * l * l * cos[None, :] + b, 0.0)
        err = out.copy()
        err[:, j] = mu - out[:, j]
        f = (err**2).sum(axis=1)
        total += float(((f[1:] + f[:-1]) / 2 * np.diff(mu)).sum())  # trapezoid rule
    total += (n - k) / 3  # dead features are not reconstructed: ∫ μ² dμ
    return total / n


@pytest.mark.parametrize("name", ["5-gon", "6-gon"])
def test_tms_table_losses_match_the_model(name):
    p = TMS_CRITICAL_POINTS[name]
    assert _tms_kgon_loss(p["k"], p["l"], p["b"]) == pytest.approx(p["loss"], abs=2e-5)


# ---------------------------------------------------------------------------
# Hessian-rank bounds and the exact quadratic LLC
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "d, d1, expected", [(10, 4, (2.0, 3.5)), (3, 3, (1.5, 1.5)), (5, 0, (0.0, 1.25))]
)
def test_hessian_rank_bounds(d, d1, expected):
    assert hessian_rank_bounds(d, d1) == expected


def test_hessian_rank_bounds_contain_known_values():
    # K = w1^2 + w2^4: d = 2, d1 = 1, λ = 1/2 + 1/4 = 3/4 (upper bound attained).
    lo, hi = hessian_rank_bounds(2, 1)
    assert lo <= 0.75 <= hi and hi == 0.75
    # [5, 3, 5] DLN at zero: Hessian is zero at w = 0 (d1 = 0), d = 30.
    lo, hi = hessian_rank_bounds(dln_num_params([5, 3, 5]), 0)
    assert lo <= dln_llc([5, 3, 5], 0) <= hi


def test_exact_quadratic_llc_formula():
    eigs = [2.0, 0.5, 0.0, 1e-3]
    nbeta, gamma = 100.0, 3.0
    expected = 0.5 * sum(1 / (1 + gamma / (nbeta * h)) for h in eigs if h != 0)
    # the same sum of 4 terms ≤ 1, each a few rounded operations, in another form
    tol = fp_tol(F64, scale=expected, terms=len(eigs) + 3)
    assert exact_quadratic_llc(eigs, nbeta, gamma) == pytest.approx(expected, abs=tol)
    # hand value: 0.5 * (200/203 + 50/53 + 0 + 0.1/3.1)
    assert exact_quadratic_llc(eigs, nbeta, gamma) == pytest.approx(0.5 * (200 / 203 + 50 / 53 + 0.1 / 3.1), abs=tol)


def test_exact_quadratic_llc_tends_to_half_rank():
    eigs = [3.0, 1.0, 0.1, 0.0, 0.0]
    assert exact_quadratic_llc(eigs, 1000.0, 0.0) == 1.5
    values = [exact_quadratic_llc(eigs, 1000.0, g) for g in (10.0, 1.0, 1e-2, 1e-6)]
    assert all(a < b for a, b in zip(values, values[1:]))
    assert values[-1] == pytest.approx(1.5, abs=1e-6)
    hand = 0.5 * (3000 / 3010 + 1000 / 1010 + 100 / 110)
    assert values[0] == pytest.approx(hand, abs=fp_tol(F64, scale=hand, terms=len(eigs) + 3))


def test_exact_quadratic_llc_accepts_arrays_and_tensors():
    eigs = [1.0, 2.0, 0.0]
    ref = exact_quadratic_llc(eigs, 50.0, 1.0)
    assert exact_quadratic_llc(np.array(eigs), 50.0, 1.0) == pytest.approx(ref)
    assert exact_quadratic_llc(torch.tensor(eigs, dtype=torch.float64), 50.0, 1.0) == pytest.approx(ref)
    # float32 inputs: each rounded to float32 (half an ulp; every term's sensitivity to its inputs is ≤ 1)
    assert exact_quadratic_llc(torch.tensor(eigs), torch.tensor(50.0), 1.0) == pytest.approx(
        ref, abs=fp_tol(torch.float32, scale=ref, terms=2))
    assert exact_quadratic_llc([], 50.0, 1.0) == 0.0


def test_exact_quadratic_llc_saddle_direction_is_negative():
    # h = -0.01, nβ = 100, γ = 2: contribution ½ · (-1) / (-1 + 2) = -0.5
    assert exact_quadratic_llc([-0.01], 100.0, 2.0) == pytest.approx(-0.5)


def test_exact_quadratic_llc_matches_gaussian_monte_carlo():
    # The localized posterior is N(0, (nβ H + γ I)^{-1}); check E[nβ ½ wᵀHw] by sampling.
    gen = torch.Generator().manual_seed(0)
    eigs = torch.tensor([4.0, 1.0, 0.25, 0.0], dtype=torch.float64)
    nbeta, gamma = 10.0, 1.0
    std = (nbeta * eigs + gamma).rsqrt()
    w = torch.randn(400_000, 4, generator=gen, dtype=torch.float64) * std
    est = (nbeta * 0.5 * (w**2 * eigs).sum(dim=1)).mean().item()
    assert est == pytest.approx(exact_quadratic_llc(eigs, nbeta, gamma), abs=0.01)


# ---------------------------------------------------------------------------
# Invalid input
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: regular_llc(-1), "d must be an integer >= 0"),
        (lambda: regular_llc(2.0), "d must be an integer"),
        (lambda: normal_crossing_llc([]), "powers must not be empty"),
        (lambda: normal_crossing_llc([0, 0]), "at least one positive"),
        (lambda: normal_crossing_llc([1, -1]), r"powers\[1\] must be an integer >= 0"),
        (lambda: normal_crossing_llc([1.5]), r"powers\[0\] must be an integer"),
        (lambda: normal_crossing_multiplicity([]), "powers must not be empty"),
        (lambda: normal_crossing_llc("12"), "string"),
        (lambda: rrr_llc(0, 3, 5, 0), "n_in must be an integer >= 1"),
        (lambda: rrr_llc(5, -3, 5, 0), "hidden must be an integer >= 1"),
        (lambda: rrr_llc(5, 3, 0, 0), "n_out must be an integer >= 1"),
        (lambda: rrr_llc(5, 3, 5, 4), r"rank must be <= min\(n_in, hidden, n_out\) = 3"),
        (lambda: rrr_llc(5, 3, 5, -1), "rank must be an integer >= 0"),
        (lambda: rrr_multiplicity(5, 3, 5, 4), "rank must be <="),
        (lambda: rrr_llc(5, 3, 5, 1.0), "rank must be an integer"),
        (lambda: dln_llc([5, 0, 5], 0), r"widths\[1\] must be an integer >= 1"),
        (lambda: dln_llc([5], 0), "length >= 2"),
        (lambda: dln_llc([], 0), "widths must not be empty"),
        (lambda: dln_llc([5, 3, 5], 4), r"rank must be <= min\(widths\) = 3"),
        (lambda: dln_llc([5, 3.5, 5], 0), r"widths\[1\] must be an integer"),
        (lambda: dln_llc([5, 3, 5], True), "rank must be an integer"),
        (lambda: dln_llc([[5, 3], [3, 5]], 0), "one-dimensional"),
        (lambda: tanh_llc(0), "hidden must be an integer >= 1"),
        (lambda: tanh_llc(2.5), "hidden must be an integer"),
        (lambda: tms_llc("7-gon"), "known points: '5-gon', '5-gon\\+', '6-gon'"),
        (lambda: tms_llc(5), "must be a string"),
        (lambda: hessian_rank_bounds(3, 4), "hessian_rank must be <= d = 3"),
        (lambda: hessian_rank_bounds(0, 0), "d must be an integer >= 1"),
        (lambda: hessian_rank_bounds(3, -1), "hessian_rank must be an integer >= 0"),
        (lambda: exact_quadratic_llc([1.0], 0.0, 1.0), "nbeta must be > 0"),
        (lambda: exact_quadratic_llc([1.0], 10.0, -1.0), "localization must be >= 0"),
        (lambda: exact_quadratic_llc([1.0, float("nan")], 10.0, 1.0), r"hessian_eigenvalues\[1\] must be finite"),
        (lambda: exact_quadratic_llc([-1.0], 10.0, 1.0), "improper"),
        (lambda: exact_quadratic_llc([[1.0, 0.0], [0.0, 1.0]], 10.0, 1.0), "one-dimensional"),
        (lambda: exact_quadratic_llc(np.eye(2), 10.0, 1.0), "one-dimensional"),
        (lambda: exact_quadratic_llc([1j], 10.0, 1.0), "real number"),
    ],
)
def test_invalid_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
