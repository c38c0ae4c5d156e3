"""Schedules and the sigma table: closed-form values (samplers.md sections 1 and 3) and parity
with k-diffusion's schedule functions and DiscreteSchedule."""
from __future__ import annotations

import math

import pytest
import torch

from diffusion.sampling import schedules as sch
from tests.diffusion.sampling._kdiffusion import load


@pytest.fixture(scope="module")
def table() -> torch.Tensor:
    return sch.default_sigma_table(torch.float64)


def test_sigma_table_reference_values(table: torch.Tensor) -> None:
    assert table.shape == (1000,)
    for i, v in [(0, 0.029167158529), (1, 0.041314411908), (500, 1.618278861), (998, 14.526275635),
                 (999, 14.614641190)]:
        assert table[i].item() == pytest.approx(v, rel=1e-7)
    ac = sch.alphas_cumprod_from_betas(sch.ddpm_betas())
    assert ac[0].item() == pytest.approx(0.99915, rel=1e-6)
    assert ac[-1].item() == pytest.approx(0.0046601, rel=1e-4)
    # closed form of beta_i: linspace of square roots, squared
    b = sch.ddpm_betas()
    i = 321
    assert b[i].item() == pytest.approx((0.00085 ** 0.5 + i * (0.012 ** 0.5 - 0.00085 ** 0.5) / 999) ** 2)


def test_sigma_timestep_mapping(table: torch.Tensor) -> None:
    one = torch.tensor([1.0], dtype=torch.float64)
    assert sch.sigma_to_t(table, one).item() == 354.0                      # ComfyUI: nearest entry
    assert sch.sigma_to_t(table, one, quantize=False).item() == pytest.approx(353.8904, abs=1e-4)
    t = torch.tensor([0.0, 12.25, 500.5, 999.0], dtype=torch.float64)
    s = sch.t_to_sigma(table, t)
    assert s[0].item() == pytest.approx(table[0].item(), rel=1e-14)
    assert s[-1].item() == pytest.approx(table[-1].item(), rel=1e-14)
    expected = math.exp(0.75 * math.log(table[12].item()) + 0.25 * math.log(table[13].item()))
    assert s[1].item() == pytest.approx(expected, rel=1e-12)
    assert torch.allclose(sch.sigma_to_t(table, s, quantize=False), t, atol=1e-9)   # round trip
    assert sch.percent_to_sigma(table, 0.0) > 1e8 and sch.percent_to_sigma(table, 1.0) == 0.0
    assert sch.percent_to_sigma(table, 0.5) == pytest.approx(sch.t_to_sigma(table, torch.tensor(499.5)).item())


def test_sigma_to_t_parity_with_k_diffusion(table: torch.Tensor) -> None:
    _, ext = load()
    ds = ext.DiscreteSchedule(table, quantize=False)
    sig = torch.tensor([0.03, 0.5, 1.0, 3.3, 14.0], dtype=torch.float64)
    assert torch.allclose(sch.sigma_to_t(table, sig, quantize=False), ds.sigma_to_t(sig), atol=1e-9)
    assert torch.equal(sch.sigma_to_t(table, sig), ds.sigma_to_t(sig, quantize=True).to(table.dtype))


REFERENCE_10 = {
    "normal": [14.6146, 7.8399, 4.6092, 2.9183, 1.9502, 1.3449, 0.9324, 0.6250, 0.3687, 0.0292, 0],
    "simple": [14.6146, 8.3028, 5.0878, 3.3211, 2.2765, 1.6129, 1.1606, 0.8299, 0.5693, 0.3417, 0],
    "sgm_uniform": [14.6146, 8.3072, 5.0924, 3.3251, 2.2797, 1.6156, 1.1629, 0.8319, 0.5712, 0.3437, 0],
    "karras": [14.6146, 9.1029, 5.4784, 3.1686, 1.7494, 0.9141, 0.4469, 0.2014, 0.0819, 0.0292, 0],
    "exponential": [14.6146, 7.3249, 3.6712, 1.8400, 0.9222, 0.4622, 0.2317, 0.1161, 0.0582, 0.0292, 0],
    "ddim_uniform": [8.3907, 5.1344, 3.3478, 2.2929, 1.6237, 1.1682, 0.8357, 0.5741, 0.3462, 0.0413, 0],
    "beta": [14.6146, 11.5428, 7.3718, 4.3728, 2.6152, 1.6183, 1.0273, 0.6549, 0.3955, 0.1991, 0],
    "kl_optimal": [14.6146, 4.2324, 2.3937, 1.5971, 1.1330, 0.8152, 0.5729, 0.3725, 0.1953, 0.0292, 0],
}


@pytest.mark.parametrize("name", list(REFERENCE_10))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_schedules_10_steps(name: str, dtype: torch.dtype) -> None:
    sigmas = sch.calculate_sigmas(sch.default_sigma_table(dtype), name, 10)
    assert sigmas.dtype == dtype
    assert sigmas.tolist() == pytest.approx(REFERENCE_10[name], abs=6e-5)


@pytest.mark.parametrize("name", list(sch.SCHEDULERS))
@pytest.mark.parametrize("steps", [1, 2, 7, 20, 30])
def test_schedules_decrease_to_zero(table: torch.Tensor, name: str, steps: int) -> None:
    sigmas = sch.calculate_sigmas(table, name, steps)
    assert sigmas[-1].item() == 0.0
    assert bool((sigmas[1:] < sigmas[:-1]).all())
    if name not in ("ddim_uniform", "beta"):
        assert len(sigmas) == steps + 1
    if name != "linear_quadratic":
        assert sigmas[0].item() <= table[-1].item() + 1e-9


def test_ddim_uniform_and_beta_step_counts(table: torch.Tensor) -> None:
    # ceil(999 / c) steps with c = 1000 // n
    assert len(sch.ddim_uniform(table, 30)) - 1 == 31
    assert len(sch.ddim_uniform(table, 7)) - 1 == 8
    assert len(sch.ddim_uniform(table, 10)) - 1 == 10
    assert sch.ddim_uniform(table, 10)[0].item() == table[901].item()
    # beta drops repeated table indices: fewer steps when n approaches the table size
    assert len(sch.beta(table, 900)) - 1 < 900


def test_closed_form_formulas(table: torch.Tensor) -> None:
    smin, smax = table[0].item(), table[-1].item()
    n, rho = 12, 7.0
    k = torch.arange(n, dtype=torch.float64)
    karras = (smax ** (1 / rho) + k / (n - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    assert torch.allclose(sch.karras(n, smin, smax, dtype=torch.float64)[:-1], karras, rtol=1e-12)
    expo = torch.exp(math.log(smax) + k / (n - 1) * (math.log(smin) - math.log(smax)))
    assert torch.allclose(sch.exponential(n, smin, smax, dtype=torch.float64)[:-1], expo, rtol=1e-12)
    kl = torch.tan(k / (n - 1) * math.atan(smin) + (1 - k / (n - 1)) * math.atan(smax))
    assert torch.allclose(sch.kl_optimal(n, smin, smax, dtype=torch.float64)[:-1], kl, rtol=1e-12)
    simple = [table[999 - int(j * 1000 / n)].item() for j in range(n)]
    assert sch.simple(table, n)[:-1].tolist() == simple
    # normal: sigma(t) at t = linspace(999, 0, n), log-linear between table entries
    t = torch.linspace(999, 0, n, dtype=torch.float64)
    assert torch.allclose(sch.normal(table, n)[:-1], sch.t_to_sigma(table, t), rtol=1e-12)


def test_discard_penultimate_reference(table: torch.Tensor) -> None:
    sigmas = sch.discard_penultimate(sch.calculate_sigmas(table, "karras", 11))
    assert sigmas.tolist() == pytest.approx(
        [14.6146, 9.5583, 6.0822, 3.7513, 2.2322, 1.2741, 0.6926, 0.3552, 0.1698, 0.0744, 0], abs=6e-5)


@pytest.mark.parametrize("n", [1, 5, 10, 25])
def test_parity_with_k_diffusion_schedules(table: torch.Tensor, n: int) -> None:
    kd, ext = load()
    smin, smax = table[0].item(), table[-1].item()
    pairs = [
        (sch.normal(table, n), ext.DiscreteSchedule(table, quantize=False).get_sigmas(n)),
        (sch.karras(n, smin, smax, dtype=torch.float64), kd.get_sigmas_karras(n, smin, smax)),
        (sch.exponential(n, smin, smax, dtype=torch.float64), kd.get_sigmas_exponential(n, smin, smax)),
        (sch.polyexponential(n, smin, smax, rho=1.5, dtype=torch.float64),
         kd.get_sigmas_polyexponential(n, smin, smax, rho=1.5)),
    ]
    for ours, ref in pairs:
        assert ours.shape == ref.shape
        assert (ours - ref.to(ours.dtype)).abs().max().item() <= 1e-5


def test_unknown_scheduler_is_named(table: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="unknown scheduler 'fancy'"):
        sch.calculate_sigmas(table, "fancy", 10)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        sch.calculate_sigmas(table, "karras", 0)


def test_zero_terminal_snr_rescale(table: torch.Tensor) -> None:
    z = sch.rescale_zero_terminal_snr(table.double())
    assert z.dtype == torch.float64 and z.shape == table.shape
    assert float(z[-1]) == pytest.approx(4518.76, abs=0.01)          # samplers.md 1.3
    assert float(z[0]) == pytest.approx(float(table[0]), rel=1e-12)   # the first value is kept
    assert bool((z[1:] > z[:-1]).all())
    # sqrt(alpha_bar) is an affine map of the original one that sends its last value to 0
    old = 1.0 / torch.sqrt(1.0 + table.double() ** 2)
    new = 1.0 / torch.sqrt(1.0 + z ** 2)
    want = (old - old[-1]) * (old[0] / (old[0] - old[-1]))
    torch.testing.assert_close(new[:-1], want[:-1], rtol=1e-9, atol=1e-12)
    assert float(new[-1]) ** 2 == pytest.approx(4.8973451890853435e-08, rel=1e-9)
