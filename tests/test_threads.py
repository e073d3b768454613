"""Concurrency (issue 6): forwards from several threads on one patched model, patch/unpatch while
other threads run forwards, pinned SDPA kernels from several threads, and auto tuning from
several threads."""

import threading

import pytest
import torch

import attnswap
from attnswap.auto import TUNER
from attnswap.routing import Policy, Router
from families import build, features

THREADS = 4


def run_threads(work, n=THREADS, timeout=120):
    """Run ``work(i)`` in n threads started together; re-raise the first failure."""
    errors: list[BaseException] = []
    start = threading.Barrier(n)

    def body(i):
        try:
            start.wait()
            work(i)
        except BaseException as exc:  # noqa: BLE001 - reported to the test below
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a thread hung"
    if errors:
        raise errors[0]


def _sdp_flags():
    b = torch.backends.cuda
    return (b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.math_sdp_enabled(), b.cudnn_sdp_enabled())


@pytest.mark.parametrize("backend", ["sdpa", "sdpa_math", "sdpa_flash", "eager"])
@pytest.mark.parametrize("family", ["vit", "swin"])
def test_forwards_from_several_threads_match_one_thread(family, backend):
    model, x = build(family)
    attnswap.patch(model, backend=backend)
    inputs = [x + 0.1 * i for i in range(THREADS)]
    with torch.no_grad():
        expected = [features(model, xi) for xi in inputs]
    attnswap.stats(model, reset=True)
    results: dict[int, list[torch.Tensor]] = {}

    def work(i):
        with torch.no_grad():
            results[i] = [features(model, inputs[i]) for _ in range(5)]

    run_threads(work)
    for i in range(THREADS):
        for out in results[i]:
            torch.testing.assert_close(out, expected[i], atol=1e-6, rtol=1e-5)
    assert set(attnswap.stats(model).by_backend()) == {backend}


def test_pinned_kernels_in_several_threads_leave_the_global_flags_as_they_were():
    # sdpa_kernel's flags are process-global: unserialized pins restore each other's state and
    # can leave the process with one kernel enabled for good
    before = _sdp_flags()
    q = torch.randn(2, 2, 16, 8)
    routers = [Router(Policy(name, (), strict=True)) for name in ("sdpa_math", "sdpa_flash")]
    expected = torch.nn.functional.scaled_dot_product_attention(q, q, q)

    def work(i):
        router = routers[i % 2]
        for _ in range(300):
            torch.testing.assert_close(router.route(q, q, q), expected, atol=1e-6, rtol=1e-5)

    run_threads(work)
    assert _sdp_flags() == before
    served = {t.backend: t.calls for r in routers for t in r.tallies()}
    assert set(served) == {"sdpa_math", "sdpa_flash"}


@pytest.mark.parametrize("family", ["vit", "swin", "levit"])  # levit: hand-written attention
def test_patch_and_unpatch_while_other_threads_run_forwards(family):
    model, x = build(family)
    with torch.no_grad():
        expected = features(model, x)
    stop = threading.Event()
    forwards = [0] * THREADS

    def work(i):
        if i == 0:
            try:
                for n in range(40):
                    attnswap.patch(model, backend=("eager", "sdpa_math", "sdpa")[n % 3])
                    attnswap.unpatch(model)
            finally:
                stop.set()
            return
        with torch.no_grad():
            while not stop.is_set():
                torch.testing.assert_close(features(model, x), expected, atol=1e-5, rtol=1e-4)
                forwards[i] += 1

    run_threads(work)
    assert not attnswap.is_patched(model)
    assert sum(forwards) > 0
    with torch.no_grad():
        assert torch.equal(features(model, x), expected), "unpatched exactly as before"


def test_mha_unpatched_while_in_flight_runs_pytorchs_own_path():
    # the in-flight case made deterministic: the router disappears between the call and its use
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    attnswap.patch(model, backend="eager")
    mha = model.encoder.layers[0].self_attention
    patched_forward = type(mha).forward
    attnswap.unpatch(model)
    with torch.no_grad():
        out, _ = patched_forward(mha, *(model.encoder.layers[0].ln_1(
            torch.cat([model.class_token.expand(2, -1, -1), model._process_input(x)], dim=1)),) * 3, need_weights=False)
        ref, _ = mha(*(model.encoder.layers[0].ln_1(
            torch.cat([model.class_token.expand(2, -1, -1), model._process_input(x)], dim=1)),) * 3, need_weights=False)
    assert torch.equal(out, ref)
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_rerouted_code_whose_router_is_gone_makes_the_original_call():
    model, x = build("vit")
    with torch.no_grad():
        expected = features(model, x)
    attnswap.patch(model, backend="eager")
    attn = model.blocks[0].attn
    rerouted = type(attn).forward
    attnswap.unpatch(model)  # as if another thread unpatched between the call and the route
    with torch.no_grad():
        h = model.blocks[0].norm1(model.norm_pre(model._pos_embed(model.patch_embed(x))))
        assert torch.equal(rerouted(attn, h), attn(h))
        assert torch.equal(features(model, x), expected)


def test_auto_tunes_each_signature_once_when_threads_meet_it_together():
    TUNER.forget()
    try:
        models = [build("vit")[0] for _ in range(THREADS)]
        x = build("vit")[1]
        for m in models:
            attnswap.patch(m, backend="auto", candidates=("sdpa", "sdpa_math", "eager"))
        with torch.no_grad():
            expected = features(build("vit")[0], x)
        outs: dict[int, torch.Tensor] = {}

        def work(i):
            with torch.no_grad():
                outs[i] = features(models[i], x)

        run_threads(work)
        for out in outs.values():
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
        rows = attnswap.auto_decisions()
        assert len(rows) == len({r.call for r in rows}), "a signature was tuned twice"
        chosen = {r.call: r.chosen for r in rows}
        for m in models:  # every thread's model uses the one decision per signature
            for site in attnswap.stats(m):
                assert set(site.calls) <= set(chosen.values())
    finally:
        TUNER.forget()


def test_pinned_kernels_in_parallel_threads_each_get_their_kernel():
    """Issue 16: pins are per call, not process-wide. Threads pinning different kernels at once,
    and a thread calling plain SDPA meanwhile, each get exactly their own kernel's bits (with
    ``sdpa_kernel``'s global switch, the plain call ran under whatever pin another thread held)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 33, 16, generator=g) for _ in range(3))
    bias = torch.randn(1, 4, 33, 33, generator=g)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        flash = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    with sdpa_kernel([SDPBackend.MATH]):
        math_ = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    assert not torch.equal(flash, math_), "the two kernels must differ in their bits for this test to see a mix-up"
    assert torch.equal(plain, flash), "on CPU, SDPA picks the flash kernel for this call"
    flash_router = Router(Policy("sdpa_flash", (), strict=True))
    math_router = Router(Policy("sdpa_math", (), strict=True))
    work_of = [
        (lambda: math_router.route(q, k, v, attn_mask=bias), math_),
        (lambda: flash_router.route(q, k, v, attn_mask=bias), flash),
        (lambda: math_router.route(q, k, v, attn_mask=bias), math_),
        (lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias), plain),
    ]
    mixed: list[int] = []

    def work(i):
        call, expected = work_of[i]
        for _ in range(400):
            if not torch.equal(call(), expected):
                mixed.append(i)

    run_threads(work)
    assert not mixed, f"threads {sorted(set(mixed))} got another kernel's result ({len(mixed)} calls)"
