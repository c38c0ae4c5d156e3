"""Samplers: parity with the PyPI k-diffusion package on a closed-form denoiser, reference values
of samplers.md section 8.3, and convergence / distribution checks for ComfyUI-only samplers."""
from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator

import pytest
import torch

from diffusion.sampling import schedules as sch
from diffusion.sampling.samplers import registry as S
from tests.diffusion.sampling._kdiffusion import load

SIGMA_MAX = 14.614641229333639
SIGMA_MIN = 0.029167158151720367
# per-element Gaussian data N(mu, s^2): the exact denoiser is closed-form
MU = torch.tensor([0.0, 0.5, -1.0, 2.0], dtype=torch.float64).reshape(1, 4, 1, 1)
SD = torch.tensor([1.0, 0.5, 2.0, 0.1], dtype=torch.float64).reshape(1, 4, 1, 1)


def gauss_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E[x0 | x] for x0 ~ N(MU, SD^2), x = x0 + sigma eps."""
    s2 = sigma.reshape(-1, 1, 1, 1).to(x.dtype) ** 2
    mu, var = MU.to(x.dtype), SD.to(x.dtype) ** 2
    return mu + var / (var + s2) * (x - mu)


def exact_ode_end(x0: torch.Tensor, sigma0: float, sigma1: float = 0.0) -> torch.Tensor:
    return MU + (x0 - MU) * torch.sqrt((SD ** 2 + sigma1 ** 2) / (SD ** 2 + sigma0 ** 2))


@pytest.fixture(scope="module")
def table() -> torch.Tensor:
    return sch.default_sigma_table(torch.float64)


@pytest.fixture
def float64_default() -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def start_x(sigma0: float, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return (torch.randn([batch, 4, 3, 2], generator=g, dtype=torch.float64) * sigma0
            + MU.expand(batch, 4, 1, 1))


def seq_noise(x: torch.Tensor, seed: int = 7) -> Callable[[object, object], torch.Tensor]:
    """Identical noise for both implementations: a fresh seeded sequence, one draw per call."""
    g = torch.Generator().manual_seed(seed)
    return lambda s, sn: torch.randn(x.shape, generator=g, dtype=x.dtype)


SCHEDULES = ["normal", "karras", "exponential", "simple", "sgm_uniform", "ddim_uniform", "beta",
             "kl_optimal"]
# (our name, k-diffusion function name, kwargs, stochastic)
KD_SAMPLERS = [
    ("euler", "sample_euler", {}, False),
    ("euler_ancestral", "sample_euler_ancestral", {}, True),
    ("heun", "sample_heun", {}, False),
    ("dpm_2", "sample_dpm_2", {}, False),
    ("dpm_2_ancestral", "sample_dpm_2_ancestral", {}, True),
    ("dpmpp_2s_ancestral", "sample_dpmpp_2s_ancestral", {}, True),
    ("dpmpp_sde", "sample_dpmpp_sde", {}, True),
    ("dpmpp_2m", "sample_dpmpp_2m", {}, False),
    ("dpmpp_2m_sde", "sample_dpmpp_2m_sde", {}, True),
    ("dpmpp_2m_sde_heun", "sample_dpmpp_2m_sde", {"solver_type": "heun"}, True),
    ("dpmpp_3m_sde", "sample_dpmpp_3m_sde", {}, True),
]


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("name,kd_name,kw,stochastic", KD_SAMPLERS, ids=[s[0] for s in KD_SAMPLERS])
def test_parity_with_k_diffusion(table: torch.Tensor, schedule: str, name: str, kd_name: str,
                                 kw: dict, stochastic: bool) -> None:
    kd, _ = load()
    sigmas = sch.calculate_sigmas(table, schedule, 9)
    x = start_x(float(sigmas[0]))
    extra = {"noise_sampler": seq_noise(x)} if stochastic else {}
    ours = S.SAMPLERS[name](gauss_denoiser, x.clone(), sigmas, **extra)
    extra = {"noise_sampler": seq_noise(x)} if stochastic else {}
    ref = getattr(kd, kd_name)(gauss_denoiser, x.clone(), sigmas, disable=True, **kw, **extra)
    assert ours.dtype == torch.float64
    assert (ours - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_lms_parity_before_the_final_step(table: torch.Tensor, schedule: str) -> None:
    """k-diffusion integrates the last step to 0 where ComfyUI (and we) return D: compare on the
    schedule without its trailing 0, then check the final step separately."""
    kd, _ = load()
    sigmas = sch.calculate_sigmas(table, schedule, 9)
    x = start_x(float(sigmas[0]))
    ours = S.sample_lms(gauss_denoiser, x.clone(), sigmas[:-1])
    ref = kd.sample_lms(gauss_denoiser, x.clone(), sigmas[:-1], disable=True)
    assert (ours - ref).abs().max().item() <= 1e-5
    full = S.sample_lms(gauss_denoiser, x.clone(), sigmas)
    last = gauss_denoiser(ours, sigmas[-2:-1].expand(x.shape[0]))
    assert torch.allclose(full, last, atol=1e-12)


def test_dpm_fast_and_adaptive_parity(table: torch.Tensor, float64_default: None) -> None:
    kd, _ = load()
    for n in (1, 2, 3, 7, 9, 10):
        sigmas = sch.calculate_sigmas(table, "karras", n)
        x = start_x(float(sigmas[0]))
        ours = S.sample_dpm_fast(gauss_denoiser, x.clone(), sigmas)
        smin = sigmas[-2] if n > 0 else sigmas[-1]
        ref = kd.sample_dpm_fast(gauss_denoiser, x.clone(), smin, sigmas[0], n, disable=True)
        assert (ours - ref).abs().max().item() <= 1e-5, n
    sigmas = sch.calculate_sigmas(table, "normal", 10)
    x = start_x(float(sigmas[0]))
    calls = {"ours": 0, "ref": 0}

    def counted(key: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        def f(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            calls[key] += 1
            return gauss_denoiser(x, s)
        return f

    ours = S.sample_dpm_adaptive(counted("ours"), x.clone(), sigmas)
    ref = kd.sample_dpm_adaptive(counted("ref"), x.clone(), sigmas[-2], sigmas[0], disable=True)
    assert calls["ours"] == calls["ref"] > 3
    assert (ours - ref).abs().max().item() <= 1e-5
    # eta > 0: the ancestral variant with identical noise
    ours = S.sample_dpm_fast(gauss_denoiser, x.clone(), sigmas, eta=1.0, noise_sampler=seq_noise(x))
    ref = kd.sample_dpm_fast(gauss_denoiser, x.clone(), sigmas[-2], sigmas[0], 10, eta=1.0,
                             noise_sampler=seq_noise(x), disable=True)
    assert (ours - ref).abs().max().item() <= 1e-5


def test_brownian_tree_matches_k_diffusion() -> None:
    kd, _ = load()
    x = torch.zeros([2, 4, 3, 3])
    ours = S.BrownianTreeNoiseSampler(x, 0.03, 14.6, seed=1234)
    ref = kd.BrownianTreeNoiseSampler(x, torch.tensor(0.03), torch.tensor(14.6), seed=1234)
    for a, b in [(14.6, 9.0), (9.0, 3.0), (3.0, 0.5), (0.5, 0.03)]:
        assert torch.allclose(ours(a, b), ref(torch.tensor(a), torch.tensor(b)), atol=1e-6)
    # per-image seeds: image k of the batch equals a single-image tree with seed k
    batched = S.BrownianTreeNoiseSampler(x, 0.03, 14.6, seed=[5, 6])
    single = S.BrownianTreeNoiseSampler(x[:1], 0.03, 14.6, seed=[6])
    assert torch.allclose(batched(9.0, 3.0)[1], single(9.0, 3.0)[0])
    assert not torch.allclose(batched(9.0, 3.0)[0], batched(9.0, 3.0)[1])


# --- samplers.md 8.3: one element, D = x / (1 + sigma^2), x0 = sigma_max --------------------


def toy(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return x / (1 + sigma.reshape(-1, *[1] * (x.ndim - 1)).to(x.dtype) ** 2)


def ones(s: object, sn: object) -> torch.Tensor:
    return torch.ones([1], dtype=torch.float64)


def _doc_sigmas(kind: str, n: int = 10) -> torch.Tensor:
    t = sch.default_sigma_table(torch.float64)
    return sch.calculate_sigmas(t, kind, n)


@pytest.mark.parametrize("name,kind,expected,kw", [
    ("euler", "karras", 0.8425719024, {}),
    ("euler", "normal", 0.8617023246, {}),
    ("heun", "karras", 1.0535940414, {}),
    ("heun", "normal", 1.0234228104, {}),
    ("dpm_2", "karras", 1.0295072115, {}),
    ("dpm_2", "normal", 1.0396359623, {}),
    ("lms", "karras", 0.9490989507, {}),
    ("lms", "normal", 0.9807046121, {}),
    ("dpmpp_2m", "karras", 1.0518044842, {}),
    ("dpmpp_2m", "normal", 1.1600286158, {}),
    ("euler_ancestral", "karras", 1.9113585435, {"noise_sampler": ones}),
    ("euler_ancestral", "karras", 0.8425719024, {"noise_sampler": ones, "eta": 0.0}),
    ("dpm_2_ancestral", "karras", 3.0274312683, {"noise_sampler": ones}),
    ("dpmpp_2s_ancestral", "karras", 2.4059636634, {"noise_sampler": ones}),
    ("dpmpp_sde", "karras", 2.5736335758, {"noise_sampler": ones}),
    ("dpmpp_2m_sde", "karras", 2.7220913047, {"noise_sampler": ones}),
    ("dpmpp_2m_sde_heun", "karras", 3.0833119190, {"noise_sampler": ones}),
    ("dpmpp_3m_sde", "karras", 2.9496376526, {"noise_sampler": ones}),
])
def test_reference_values(name: str, kind: str, expected: float, kw: dict) -> None:
    x = torch.tensor([SIGMA_MAX], dtype=torch.float64)
    out = S.SAMPLERS[name](toy, x, _doc_sigmas(kind), **kw)
    assert out.item() == pytest.approx(expected, abs=2e-6)


def test_discard_penultimate_reference() -> None:
    sigmas = sch.discard_penultimate(_doc_sigmas("karras", 11))
    out = S.sample_dpm_2(toy, torch.tensor([SIGMA_MAX], dtype=torch.float64), sigmas)
    assert out.item() == pytest.approx(1.0204857033, abs=2e-6)


# --- ComfyUI-only samplers: heunpp2, ddpm, lcm, uni_pc -------------------------------------


def _ode_error(name: str, steps: int, table: torch.Tensor) -> float:
    """Max error to the exact ODE solution at sigma_min (the schedule without its final 0, so the
    fixed-size last jump to 0, or UniPC's to 0.001, does not set an error floor)."""
    sigmas = sch.calculate_sigmas(table, "karras", steps + 1)[:-1]
    x = start_x(float(sigmas[0]))
    out = S.SAMPLERS[name](gauss_denoiser, x.clone(), sigmas)
    return (out - exact_ode_end(x, float(sigmas[0]), float(sigmas[-1]))).abs().max().item()


@pytest.mark.parametrize("name,min_ratio", [("uni_pc", 4.0), ("uni_pc_bh2", 4.0), ("heunpp2", 1.6),
                                            ("dpmpp_2m", 2.5), ("euler", 1.6),
                                            ("ipndm", 3.0), ("deis", 3.0)])
def test_deterministic_samplers_converge(table: torch.Tensor, name: str, min_ratio: float) -> None:
    """Error to the exact ODE solution shrinks with the method's order when steps double."""
    e10, e20, e40 = (_ode_error(name, n, table) for n in (10, 20, 40))
    assert e10 / e20 >= min_ratio and e20 / e40 >= min_ratio, (e10, e20, e40)
    assert e40 < 0.2


def test_uni_pc_variants_and_accuracy(table: torch.Tensor) -> None:
    # UniPC at 10 steps beats Euler by far on the exact ODE; bh1 and bh2 are different solvers
    assert _ode_error("uni_pc", 10, table) < _ode_error("euler", 10, table) / 5
    assert _ode_error("uni_pc", 10, table) != _ode_error("uni_pc_bh2", 10, table)
    calls = []
    sigmas = sch.calculate_sigmas(table, "karras", 8)
    S.sample_uni_pc(lambda x, s: calls.append(float(s[0])) or gauss_denoiser(x, s),
                    start_x(float(sigmas[0])), sigmas)
    assert len(calls) == 8 and calls[0] == pytest.approx(float(sigmas[0]))   # one call per step


def test_heunpp2_single_heun_step_and_evals(table: torch.Tensor) -> None:
    """Two-step schedule [s0, s1, 0]: a Heun step with weights 1 - s1/(2 s0), s1/(2 s0), then Euler."""
    sigmas = torch.tensor([4.0, 1.0, 0.0], dtype=torch.float64)
    x = torch.tensor([3.0], dtype=torch.float64)
    d = (x - toy(x, sigmas[:1])) / 4.0
    x2 = x + d * -3.0
    d2 = (x2 - toy(x2, sigmas[1:2])) / 1.0
    w2 = 1.0 / 8.0
    x1 = x + (d * (1 - w2) + d2 * w2) * -3.0
    expected = x1 + (x1 - toy(x1, sigmas[1:2])) / 1.0 * -1.0
    assert torch.allclose(S.sample_heunpp2(toy, x, sigmas), expected, atol=1e-12)


def test_lcm_closed_form() -> None:
    sigmas = torch.tensor([10.0, 2.0, 0.5, 0.0], dtype=torch.float64)
    x = torch.tensor([10.0], dtype=torch.float64)
    expected = x.clone()
    for s, sn in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        expected = expected / (1 + s * s) + (sn if sn > 0 else 0.0)
    assert torch.allclose(S.sample_lcm(toy, x, sigmas, noise_sampler=ones), expected, atol=1e-12)


@pytest.mark.parametrize("name", ["euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral",
                                  "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde", "ddpm"])
def test_stochastic_samplers_sample_the_data_distribution(table: torch.Tensor, name: str) -> None:
    """With the exact denoiser of N(0, 1) data, 4096 chains end with mean ~ 0 and variance ~ 1
    (lcm is left out: on a model that is not a consistency model it shrinks the variance)."""
    sigmas = sch.calculate_sigmas(table, "karras", 60)
    g = torch.Generator().manual_seed(3)
    x = torch.randn([1, 1, 64, 64], generator=g, dtype=torch.float64) * math.sqrt(1 + float(sigmas[0]) ** 2)
    out = S.SAMPLERS[name](toy, x, sigmas, extra_args={"seed": 11})
    assert abs(out.mean().item()) < 0.08
    assert 0.9 < out.var().item() < 1.1


def test_ddpm_one_step_is_the_posterior_mean() -> None:
    """Zero noise, one step sigma -> sigma': DDPM mean in VP space, rescaled to sigma space."""
    s, sn = 3.0, 1.0
    x = torch.tensor([2.0], dtype=torch.float64)
    zero = lambda a, b: torch.zeros([1], dtype=torch.float64)  # noqa: E731
    out = S.sample_ddpm(toy, x, torch.tensor([s, sn], dtype=torch.float64), noise_sampler=zero)
    ab, ab_prev = 1 / (1 + s * s), 1 / (1 + sn * sn)
    x_vp = x / math.sqrt(1 + s * s)
    eps = (x - toy(x, torch.tensor([s]))) / s
    x0 = (x_vp - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
    # q(x_{t-1} | x_t, x0) mean: coefficients of x0 and x_t (Ho et al. eq. 7)
    a = ab / ab_prev
    mean = (math.sqrt(ab_prev) * (1 - a) / (1 - ab)) * x0 + (math.sqrt(a) * (1 - ab_prev) / (1 - ab)) * x_vp
    assert torch.allclose(out, mean * math.sqrt(1 + sn * sn), atol=1e-10)


def test_seeded_samplers_repeat_and_differ_by_seed(table: torch.Tensor) -> None:
    sigmas = sch.calculate_sigmas(table, "karras", 6)
    x = start_x(float(sigmas[0]))
    for name in ("euler_ancestral", "dpmpp_sde", "dpmpp_2m_sde", "ddpm", "lcm"):
        a = S.SAMPLERS[name](gauss_denoiser, x.clone(), sigmas, extra_args={"seed": 5})
        b = S.SAMPLERS[name](gauss_denoiser, x.clone(), sigmas, extra_args={"seed": 5})
        c = S.SAMPLERS[name](gauss_denoiser, x.clone(), sigmas, extra_args={"seed": 6})
        assert torch.equal(a, b), name
        assert not torch.allclose(a, c), name


def test_ancestral_step_noise_is_seed_plus_one_on_cpu() -> None:
    x = torch.zeros([1, 4, 8, 8])
    noise = S.default_noise_sampler(x, seed=41)(1.0, 0.5)
    assert torch.equal(noise, torch.randn(x.shape, generator=torch.Generator().manual_seed(42)))


def test_callback_every_step_and_names() -> None:
    sigmas = _doc_sigmas("karras", 5)
    seen: list[int] = []
    S.sample_dpmpp_2m(toy, torch.tensor([SIGMA_MAX], dtype=torch.float64), sigmas,
                      callback=lambda info: seen.append(info["i"]))
    assert seen == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="unknown sampler 'euler_magic'"):
        S.get_sampler("euler_magic")
    for name in ("euler", "euler_ancestral", "heun", "heunpp2", "dpm_2", "dpm_2_ancestral", "lms", "ipndm", "ipndm_v", "deis",
                 "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m",
                 "dpmpp_2m_sde", "dpmpp_3m_sde", "ddpm", "lcm", "ddim", "uni_pc", "uni_pc_bh2"):
        assert name in S.SAMPLERS


def test_ipndm_first_steps_are_euler_then_ab2() -> None:
    """Step 1 is Euler; step 2 uses (3 d_1 - d_0) / 2 (equal-step Adams-Bashforth 2)."""
    sigmas = torch.tensor([8.0, 4.0, 2.0], dtype=torch.float64)
    x = torch.tensor([5.0], dtype=torch.float64)
    d0 = (x - toy(x, sigmas[:1])) / 8.0
    x1 = x + d0 * -4.0
    d1 = (x1 - toy(x1, sigmas[1:2])) / 4.0
    expected = x1 + (1.5 * d1 - 0.5 * d0) * -2.0
    assert torch.allclose(S.sample_ipndm(toy, x, sigmas), expected, atol=1e-12)


def test_ipndm_v_coefficients() -> None:
    """Orders 2-3 are consistent (weights sum to 1) for any step sizes; equal steps give AB2/AB3 and
    upstream's order-4 weights (which sum to 1 only for equal steps, as upstream's do)."""
    g = torch.Generator().manual_seed(0)
    sig = sorted((torch.rand(6, generator=g, dtype=torch.float64) * 10 + 0.1).tolist(), reverse=True)
    for order, i in [(2, 1), (3, 2), (3, 4)]:
        assert sum(S.ipndm_v_coefficients(sig, i, order)) == pytest.approx(1.0, abs=1e-12)
    uniform = [6.0, 5.0, 4.0, 3.0, 2.0, 1.0]
    assert [c * 12 for c in S.ipndm_v_coefficients(uniform, 2, 3)] == pytest.approx([23, -16, 5])
    assert [c * 24 for c in S.ipndm_v_coefficients(uniform, 3, 4)] == pytest.approx([57, -65, 43, -11])
    x = start_x(10.0)
    lin = torch.linspace(10, 1, 8, dtype=torch.float64)
    for order in (2, 3):      # equal steps: the same as ipndm
        assert torch.allclose(S.sample_ipndm_v(gauss_denoiser, x, lin, max_order=order),
                              S.sample_ipndm(gauss_denoiser, x, lin, max_order=order), atol=1e-12)
    assert _ode_error("ipndm_v", 40, sch.default_sigma_table(torch.float64)) < 1e-3


def test_deis_coefficients_integrate_dsigma() -> None:
    """The Lagrange weights sum to 1, so each step's coefficients sum to sigma_{i+1} - sigma_i."""
    sig = sch.calculate_sigmas(sch.default_sigma_table(torch.float64), "karras", 12).tolist()
    coeffs = S.deis_coefficients(sig[:-1], 3)
    assert coeffs[0] == []
    for i in range(1, len(coeffs)):
        assert len(coeffs[i]) == min(i + 1, 3)
        assert sum(coeffs[i]) == pytest.approx(sig[i + 1] - sig[i], rel=2e-3)


def test_prefetched_brownian_noise_equals_queries_in_order() -> None:
    """The SDE samplers' step-end noise is computed ahead in a thread: same values as asking the
    tree step by step, midpoint queries in between included."""
    x = torch.zeros(2, 4, 8, 8)
    sig = [14.6, 7.0, 3.0, 1.0, 0.3, 0.0]
    plain = S.BrownianTreeNoiseSampler(x, 0.3, 14.6, seed=7)
    ahead = S._tree_sampler(x, sig, 7)
    for a, b in zip(sig[:-1], sig[1:]):
        if b > 0:
            mid = (a * b) ** 0.5
            assert torch.equal(ahead(a, mid), plain(a, mid))
            assert torch.equal(ahead(a, b), plain(a, b))


def test_sde_sampler_repeats_with_prefetched_noise() -> None:
    def model(x: torch.Tensor, sigma: torch.Tensor, **kw: object) -> torch.Tensor:
        return x * 0.5
    sigmas = sch.karras(8, 0.03, 14.6)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 14.6
    outs = [S.SAMPLERS["dpmpp_2m_sde"](model, x.clone(), sigmas, extra_args={"seed": 3}, disable=True)
            for _ in range(2)]
    assert torch.equal(outs[0], outs[1])


def test_lms_coefficient_matches_numerical_integral_of_lagrange_basis() -> None:
    from scipy import integrate

    rng = random.Random(0)
    for _ in range(20):
        t = sorted((rng.uniform(0.03, 15.0) for _ in range(6)), reverse=True)
        for order in (1, 2, 3, 4):
            for j in range(order):
                def basis(tau: float, j: int = j, order: int = order) -> float:
                    p = 1.0
                    for k in range(order):
                        if k != j:
                            p *= (tau - t[4 - k]) / (t[4 - j] - t[4 - k])
                    return p
                expected = integrate.quad(basis, t[4], t[5], epsrel=1e-12)[0]
                assert S.lms_coefficient(order, t, 4, j) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    with pytest.raises(ValueError, match="order 4 too high"):
        S.lms_coefficient(4, [3.0, 2.0, 1.0], 1, 0)
