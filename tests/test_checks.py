"""The shared argument checkers of slt._checks."""

import math

import numpy as np
import pytest
import torch

from slt._checks import check_int, check_real


@pytest.mark.parametrize("value", [3, np.int64(3), np.uint8(3)])
def test_check_int_accepts_python_and_numpy_integers(value):
    out = check_int("k", value, 1)
    assert out == 3 and type(out) is int


def test_check_int_without_minimum():
    assert check_int("k", -5) == -5
    with pytest.raises(ValueError, match=r"^k must be an integer, got 2\.5$"):
        check_int("k", 2.5)


@pytest.mark.parametrize("value", [True, 3.0, "3", None, torch.tensor(3), 0])
def test_check_int_rejects(value):
    with pytest.raises(ValueError, match=r"^num_chains must be an integer >= 1, got "):
        check_int("num_chains", value, 1)


@pytest.mark.parametrize(
    "value", [0.5, 1, np.float32(0.5), np.int64(2), torch.tensor(0.5), np.array(0.5), torch.tensor([0.5])]
)
def test_check_real_accepts_reals_and_scalar_tensors(value):
    out = check_real("x", value, positive=True)
    assert out == float(value) and type(out) is float


@pytest.mark.parametrize("value", [True, 1j, np.complex128(1j), "0.5", None, torch.ones(2), torch.tensor(True)])
def test_check_real_rejects_non_reals(value):
    with pytest.raises(ValueError, match=r"^x must be a real number, got "):
        check_real("x", value)


@pytest.mark.parametrize(
    "value, kwargs, need",
    [
        (math.nan, {}, "finite"),
        (math.inf, {}, "finite"),
        (10**400, {}, "finite"),
        (0.0, {"positive": True}, "positive and finite"),
        (-1, {"positive": True}, "positive and finite"),
        (math.inf, {"positive": True}, "positive and finite"),
        (-1e-9, {"nonnegative": True}, "non-negative and finite"),
    ],
)
def test_check_real_rejects_bad_values(value, kwargs, need):
    with pytest.raises(ValueError, match=f"^x must be {need}, got "):
        check_real("x", value, **kwargs)


def test_check_real_bounds():
    assert check_real("x", -2.5) == -2.5
    assert check_real("x", 0, nonnegative=True) == 0.0
    with pytest.raises(TypeError, match="at most one"):
        check_real("x", 1.0, positive=True, nonnegative=True)
