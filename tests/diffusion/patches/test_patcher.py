"""ModelPatcher: recording, fp32 accumulation, bit-exact restore, clones, delta cache, attention hooks."""
from __future__ import annotations

import random

import pytest
import torch

from diffusion.demo.checkpoint import tiny_components
from diffusion.models.diffusion_model import DiffusionModel
from diffusion.patches import weight_patch as patcher_mod
from diffusion.patches.lora.weights import LoHa, LoRA
from diffusion.patches.patcher import DELTA_CACHE, ModelPatcher, WeightPatch
from tests.diffusion.patches._weights import bit_equal, snapshot


def small_module(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Conv2d(4, 8, 3), torch.nn.Linear(24, 8))
    return m.to(dtype)


def lora_for(shape: tuple[int, ...], seed: int, rank: int = 2) -> LoRA:
    g = torch.Generator().manual_seed(seed)
    out, rest = shape[0], shape[1:]
    n_in = 1
    for s in rest:
        n_in *= s
    return LoRA(up=torch.randn(out, rank, generator=g), down=torch.randn(rank, n_in, generator=g) * 0.1,
                alpha=1.0)


def test_patch_accumulates_and_unpatch_restores_bitwise():
    m = small_module()
    ref = snapshot(m)
    p = ModelPatcher(m, "cpu", "cpu")
    a, b = lora_for((24, 16), 1), lora_for((24, 16), 2)
    q = p.clone()
    assert q.add_patches({"0.weight": a, "missing.weight": a}, 0.5, "a") == ["0.weight"]
    q.add_patches({"0.weight": b, "1.weight": lora_for((8, 4, 3, 3), 3)}, -2.0, "b")
    assert bit_equal(m, ref)                           # recording touches nothing
    q.patch_model()
    want = ref["0.weight"] + 0.5 * a.delta(ref["0.weight"]) - 2.0 * b.delta(ref["0.weight"])
    assert (m[0].weight - want).abs().max() <= 1e-6
    assert not torch.equal(m[1].weight, ref["1.weight"])
    q.unpatch_model()
    assert bit_equal(m, ref)
    assert not p.patches                               # the clone's records stayed in the clone


def test_fp16_weights_accumulate_in_fp32_and_store_in_fp16():
    m = small_module(torch.float16)
    ref = snapshot(m)
    ad = lora_for((24, 16), 4)
    p = ModelPatcher(m, "cpu", "cpu")
    p.add_patches({"0.weight": ad}, 0.3, "x")
    p.patch_model()
    want = (ref["0.weight"].float() + 0.3 * ad.delta(ref["0.weight"].float())).half()
    assert m[0].weight.dtype == torch.float16
    assert torch.equal(m[0].weight.data, want)
    p.unpatch_model()
    assert bit_equal(m, ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weights_are_patched_in_row_blocks(monkeypatch, dtype):
    # 40 fp32 bytes per row of the conv weight [8, 4*3*3]... force blocks of 3 rows (a partial last one)
    monkeypatch.setattr(patcher_mod, "BLOCK_BYTES", 3 * 4 * 36)
    m = small_module(dtype)
    ref = snapshot(m)
    a, b = lora_for((8, 4, 3, 3), 5), lora_for((8, 4, 3, 3), 6, rank=3)
    lin = lora_for((24, 16), 7)
    p = ModelPatcher(m, "cpu", "cpu")

    def expected(sa: float, sb: float) -> torch.Tensor:
        w0 = ref["1.weight"].float()
        return (w0 + sa * a.delta(w0) + sb * b.delta(w0)).to(dtype)

    q = p.clone()
    q.add_patches({"1.weight": a, "0.weight": lin}, 0.8, "a")
    q.add_patches({"1.weight": b}, -0.6, "b")
    q.patch_model()
    torch.testing.assert_close(m[1].weight.data, expected(0.8, -0.6), rtol=4e-3 if dtype == torch.bfloat16 else 1e-3, atol=1e-6)
    storage = m[1].weight.data.data_ptr()
    r = p.clone()                                     # strength change: written into the same storage
    r.add_patches({"1.weight": a, "0.weight": lin}, 0.2, "a")
    r.add_patches({"1.weight": b}, -0.6, "b")
    r.patch_model()
    assert m[1].weight.data.data_ptr() == storage and m[1].weight.dtype == dtype
    torch.testing.assert_close(m[1].weight.data, expected(0.2, -0.6), rtol=4e-3 if dtype == torch.bfloat16 else 1e-3, atol=1e-6)
    assert not torch.equal(m[1].weight.data, expected(0.8, -0.6))
    r.unpatch_model()
    assert bit_equal(m, ref)


def test_strength_zero_is_an_exact_noop_and_keeps_the_fingerprint():
    m = small_module()
    ref = snapshot(m)
    p = ModelPatcher(m, "cpu", "cpu")
    q = p.clone()
    q.add_patches({"0.weight": lora_for((24, 16), 5)}, 0.0, "x")
    assert q.patch_fingerprint() == p.patch_fingerprint()
    q.patch_model()
    assert bit_equal(m, ref) and not q.is_patched()


def test_stacking_order_does_not_matter_beyond_rounding():
    m = small_module()
    a, b = lora_for((24, 16), 6), lora_for((24, 16), 7)
    p1 = ModelPatcher(m, "cpu", "cpu")
    p1.add_patches({"0.weight": a}, 0.8, "a")
    p1.add_patches({"0.weight": b}, -0.4, "b")
    p2 = ModelPatcher(m, "cpu", "cpu")
    p2.add_patches({"0.weight": b}, -0.4, "b")
    p2.add_patches({"0.weight": a}, 0.8, "a")
    w1 = p1.patch_model()[0].weight.detach().clone()
    w2 = p2.patch_model()[0].weight.detach().clone()     # switching clones re-patches from the originals
    p2.unpatch_model()
    assert (w1 - w2).abs().max() <= 1e-6
    assert p1.patch_fingerprint() != p2.patch_fingerprint()


def test_fingerprint_tracks_model_records_and_strengths():
    m, m2 = small_module(), small_module()
    ad = lora_for((24, 16), 8)
    base = ModelPatcher(m, "cpu", "cpu")
    a, b, c = base.clone(), base.clone(), base.clone()
    a.add_patches({"0.weight": ad}, 1.0, "f")
    b.add_patches({"0.weight": ad}, 1.0, "f")
    c.add_patches({"0.weight": ad}, 0.9, "f")
    assert a.patch_fingerprint() == b.patch_fingerprint()
    assert a.patch_fingerprint() != c.patch_fingerprint()
    assert base.patch_fingerprint() == base.clone().patch_fingerprint()
    assert base.patch_fingerprint() != ModelPatcher(m2, "cpu", "cpu").patch_fingerprint()
    d = base.clone()
    d.model_options["attn2_kv"] = [lambda k, v: (k, v)]
    assert d.patch_fingerprint() != base.patch_fingerprint()
    assert d.clone().patch_fingerprint() == d.patch_fingerprint()     # copied options, same content
    d.model_options["transformer_options"] = {"x": [1, 2]}
    assert d.clone().patch_fingerprint() == d.patch_fingerprint()


def test_records_are_frozen_dataclasses():
    p = ModelPatcher(small_module(), "cpu", "cpu")
    p.add_patches({"0.weight": torch.zeros(24, 16)}, 1.0, "t")
    rec = p.patches["0.weight"][0]
    assert isinstance(rec, WeightPatch)
    with pytest.raises(AttributeError):
        rec.strength = 2.0  # type: ignore[misc]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_100_random_cycles_leave_the_model_bitwise_equal(dtype: torch.dtype):
    m = small_module(dtype)
    ref = snapshot(m)
    shapes = {"0.weight": (24, 16), "1.weight": (8, 4, 3, 3), "2.weight": (8, 24)}
    g = torch.Generator().manual_seed(9)
    adapters = {k: [lora_for(s, 10 + i + 3 * j) for j in range(2)] for i, (k, s) in enumerate(shapes.items())}
    adapters["2.weight"].append(LoHa(torch.randn(8, 2, generator=g), torch.randn(2, 24, generator=g),
                                     torch.randn(8, 2, generator=g), torch.randn(2, 24, generator=g), alpha=1.0))
    rng = random.Random(0)
    base = ModelPatcher(m, "cpu", "cpu")
    for _ in range(100):
        p = base.clone()
        expected = {k: ref[k].float() for k in shapes}
        for k, ads in adapters.items():
            for ad in ads:
                if rng.random() < 0.6:
                    s = rng.choice([0.0, 1.0, -1.0, rng.uniform(-2, 2)])
                    p.add_patches({k: ad}, s, f"{k}{id(ad)}")
                    expected[k] = expected[k] + s * ad.delta(ref[k])
        p.patch_model()
        eps = torch.finfo(dtype).eps           # fp32 accumulation, one rounding to the weight's dtype
        for k in shapes:
            got = dict(m.named_parameters())[k].float()
            assert ((got - expected[k]).abs() <= 1e-5 + eps * expected[k].abs()).all()
        if rng.random() < 0.5:
            p.unpatch_model()
            assert bit_equal(m, ref)
    base.unpatch_model()
    assert bit_equal(m, ref)


def test_delta_cache_stays_within_its_byte_budget():
    cache = patcher_mod.DeltaCache(budget_bytes=3 * 32 * 32 * 4)          # three 32x32 fp32 deltas
    ts = [torch.full((32, 32), float(i)) for i in range(5)]
    for i, t in enumerate(ts):
        cache.put((i,), t)
        assert cache.nbytes <= cache.budget_bytes
    assert cache.get((0,)) is None and cache.get((1,)) is None          # least recently used went first
    assert cache.get((4,)) is ts[4] and cache.nbytes == 3 * 32 * 32 * 4
    assert cache.get((2,)) is ts[2]                                      # now the most recently used
    cache.put((5,), torch.zeros(32, 32))
    assert cache.get((2,)) is ts[2] and cache.get((3,)) is None
    cache.put((6,), torch.zeros(64, 64))                                 # larger than the budget: not kept
    assert cache.get((6,)) is None and cache.nbytes == 3 * 32 * 32 * 4


def test_strength_change_reuses_cached_deltas():
    m = small_module()
    g = torch.Generator().manual_seed(11)
    loha = LoHa(torch.randn(8, 2, generator=g), torch.randn(2, 24, generator=g), torch.randn(8, 2, generator=g),
                torch.randn(2, 24, generator=g), alpha=1.0)
    base = ModelPatcher(m, "cpu", "cpu")
    p1 = base.clone()
    p1.add_patches({"2.weight": loha}, 1.0, "h")
    p1.patch_model()
    hits = DELTA_CACHE.hits
    p2 = base.clone()
    p2.add_patches({"2.weight": loha}, 0.25, "h")
    p2.patch_model()
    assert DELTA_CACHE.hits == hits + 1
    w0 = base.clone()
    w0.patch_model()
    ref = m[2].weight.detach().clone()
    p2.patch_model()
    assert (m[2].weight - (ref + 0.25 * loha.delta(ref))).abs().max() <= 1e-6
    base.unpatch_model()


# ----------------------------------------------------------------------------------------- hooks


@pytest.fixture(scope="module")
def tiny_unet() -> DiffusionModel:
    c = tiny_components("sd1", seed=1)
    return DiffusionModel(c.unet, c.family, "eps")


def run_unet(model: DiffusionModel) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 5, 32, generator=g)
    with torch.no_grad():
        return model.apply_model(x, torch.tensor([500.0]), ctx)


def test_attn2_kv_hook_is_installed_and_removed(tiny_unet):
    base = ModelPatcher(tiny_unet, "cpu", "cpu")
    before = run_unet(tiny_unet)
    procs = {n: m.processor for n, m in tiny_unet.named_modules() if n.endswith("attn2")}
    hooked = base.clone()
    hooked.model_options["attn2_kv"] = [lambda k, v: (k * 2.0, v), lambda k, v: (k, v * 0.5)]
    hooked.patch_model()
    got = run_unet(tiny_unet)
    hooked.unpatch_model()
    assert {n: m.processor for n, m in tiny_unet.named_modules() if n.endswith("attn2")} == procs
    assert torch.equal(run_unet(tiny_unet), before)
    # the same effect by hand: to_k weights doubled, to_v weights halved (no biases in SD attn2)
    scaled = base.clone()
    for n, mod in tiny_unet.named_modules():
        if n.endswith("attn2"):
            scaled.add_patches({f"{n}.to_k.weight": mod.to_k.weight.detach().clone()}, 1.0, "x2")
            scaled.add_patches({f"{n}.to_v.weight": mod.to_v.weight.detach().clone()}, -0.5, "x.5")
    scaled.patch_model()
    want = run_unet(tiny_unet)
    scaled.unpatch_model()
    assert (got - want).abs().max() <= 1e-5
    assert (got - before).abs().max() > 1e-4


def test_identity_hook_keeps_the_output(tiny_unet):
    p = ModelPatcher(tiny_unet, "cpu", "cpu")
    before = run_unet(tiny_unet)
    p.model_options["attn2_kv"] = [lambda k, v: (k, v)]
    p.patch_model()
    assert (run_unet(tiny_unet) - before).abs().max() <= 1e-6
    p.unpatch_model()


def test_patch_model_with_an_equal_patch_set_does_no_work():
    m = small_module()
    g = torch.Generator().manual_seed(12)
    loha = LoHa(torch.randn(24, 2, generator=g), torch.randn(2, 16, generator=g), torch.randn(24, 2, generator=g),
                torch.randn(2, 16, generator=g), alpha=1.0)
    p1 = ModelPatcher(m, "cpu", "cpu")
    p1.add_patches({"0.weight": loha}, 0.5, "h")
    p1.patch_model()
    ptr, value = m[0].weight.data_ptr(), m[0].weight.detach().clone()
    calls = DELTA_CACHE.hits + DELTA_CACHE.misses
    p1.clone().patch_model()                    # same records: nothing to recompute
    assert DELTA_CACHE.hits + DELTA_CACHE.misses == calls
    assert m[0].weight.data_ptr() == ptr and torch.equal(m[0].weight.detach(), value)
    p1.unpatch_model()


def test_comfyui_style_diff_tuples_are_accepted():
    m = small_module()
    ref = snapshot(m)
    p = ModelPatcher(m, "cpu", "cpu")
    p.add_patches({"0.weight": ("diff", (torch.ones(24, 16),)), "2.weight": (torch.ones(8, 24),)}, 0.25, "plugin")
    p.patch_model()
    assert torch.equal(m[0].weight.detach(), ref["0.weight"] + 0.25)
    assert torch.equal(m[2].weight.detach(), ref["2.weight"] + 0.25)
    p.unpatch_model()
    assert bit_equal(m, ref)


def test_weight_dependent_deltas_are_cached_per_original_weight():
    from diffusion.patches.lora.weights import IA3
    ia3 = IA3(torch.linspace(-1, 1, 24))
    m1, m2 = small_module(), small_module()
    with torch.no_grad():
        m2[0].weight.mul_(3.0)
    for m in (m1, m2):
        w0 = m[0].weight.detach().clone()
        p = ModelPatcher(m, "cpu", "cpu")
        p.add_patches({"0.weight": ia3}, 0.5, "ia3")
        p.patch_model()
        assert (m[0].weight - (w0 + 0.5 * w0 * torch.linspace(-1, 1, 24)[:, None])).abs().max() <= 1e-6
        p.unpatch_model()


def test_device_names_compare_by_type_and_index():
    from diffusion.patches.patcher import same_device
    assert same_device(torch.device("cuda"), torch.device("cuda:0"))
    assert not same_device(torch.device("cuda:1"), torch.device("cuda:0"))
    assert not same_device(torch.device("cpu"), torch.device("cuda"))


def test_cache_size_counts_the_shared_module_once():
    import sys

    from graph.cache import estimate_bytes

    m = small_module()
    module_bytes = sum(t.element_size() * t.nelement() for t in m.parameters())
    base = ModelPatcher(m, "cpu", "cpu")
    ad = lora_for((24, 16), 9, rank=4)
    clone = base.clone()
    clone.add_patches({"0.weight": ad}, 0.5, "a")
    clone.add_patches({"2.weight": ad}, 0.5, "a")          # the same adapter object counts once
    adapter_bytes = (ad.up.nelement() + ad.down.nelement()) * 4
    assert estimate_bytes(base) == module_bytes
    assert estimate_bytes(clone) == adapter_bytes
    assert estimate_bytes(clone.clone()) == adapter_bytes
    pair = [base, clone]
    assert estimate_bytes(pair) == module_bytes + adapter_bytes + sys.getsizeof(pair)


def test_offload_module_unpatches_bitwise_and_patch_model_brings_it_back():
    m = small_module()
    ref = snapshot(m)
    p = ModelPatcher(m, "cpu", "cpu")
    q = p.clone()
    q.add_patches({"0.weight": lora_for((24, 16), 11)}, 0.7, "a")
    q.patch_model()
    patched = m[0].weight.detach().clone()
    assert q.is_patched() and not torch.equal(patched, ref["0.weight"])
    from diffusion.patches.patcher import offload_module
    offload_module(m, torch.device("cpu"))
    assert bit_equal(m, ref) and not q.is_patched()
    q.patch_model()
    assert torch.equal(m[0].weight, patched)


def test_make_room_offloads_least_recently_used_first_and_keeps_the_caller():
    import gc
    import weakref

    from diffusion.models import devices
    from diffusion.patches.patcher import _offloader

    dev = torch.device("cuda", 7)                     # only a key here: nothing is allocated on it
    owners = [object(), object(), object()]
    offloaded: list[int] = []
    free = {"bytes": 0}
    for i, o in enumerate(owners):
        def off(i: int = i) -> None:
            offloaded.append(i)
            free["bytes"] += 3 << 30                  # each model frees 3 GiB
        devices.mark_loaded(o, dev, 3 << 30, off)
    devices.mark_loaded(owners[0], dev, 3 << 30, devices._loaded[id(owners[0])][2])   # 0 used again: newest
    try:
        done = devices.make_room(dev, 4 << 30, keep=owners[1], free=lambda d: free["bytes"])
        # order of use is 1, 2, 0; 1 is the caller: 2 then 0 go until 4 GiB + the reserve are free
        assert offloaded == [2, 0] and done == [id(owners[2]), id(owners[0])]
        assert id(owners[1]) in devices._loaded and id(owners[2]) not in devices._loaded
        assert devices.make_room(dev, 1 << 40, free=lambda d: None) == []    # no accelerator: nothing
    finally:
        for o in owners:
            devices.mark_offloaded(o)
    # the offload callable of a module does not keep the module alive
    m = small_module()
    alive = weakref.ref(m)
    fn = _offloader(m, torch.device("cpu"))
    del m
    gc.collect()
    assert alive() is None
    fn()                                              # a dead module: nothing to do
