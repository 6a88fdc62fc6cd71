"""Shared fixtures. Tests run in float64 where they compare numbers (tolerances explained inline)."""
import pytest
import torch


@pytest.fixture
def f64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
