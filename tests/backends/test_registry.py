
import pytest
import torch

import attnswap
from attnswap.backends import get_backend, list_backends, resolve_name
from attnswap.backends.base import Backend
from attnswap.backends.registry import _add
from attnswap.call import facts_of
from conftest import rand

BUILTINS = ["sdpa", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "sdpa_math", "flex", "flash", "flash3", "flash4", "xformers", "sage", "eager"]


def test_unknown_name_lists_valid_names_and_the_closest_one():
    with pytest.raises(attnswap.AttnSwapError) as info:
        resolve_name("sdpa_flsh")
    msg = str(info.value)
    assert "Unknown attention backend 'sdpa_flsh'" in msg
    assert "Did you mean 'sdpa_flash'?" in msg
    for name in BUILTINS:
        assert name in msg


def test_aliases_resolve():
    assert resolve_name("math") == "sdpa_math"
    assert resolve_name("flex_attention") == "flex"


def test_list_backends_lists_every_builtin_in_order_with_limits():
    infos = list_backends()
    assert [b.name for b in infos][: len(BUILTINS)] == BUILTINS
    flash = next(b for b in infos if b.name == "sdpa_flash")
    assert flash.limits["cuda"]["additive_mask"] is False
    assert "dropout" in flash.limits["cpu"]
    assert "sdpa_flash" in str(infos)


def test_unavailable_backend_stays_listed_with_reason():
    class Broken(Backend):
        name = "broken_for_test"
        install_hint = "pip install nothing"

        def check_available(self):
            raise OSError("libfoo.so: cannot open shared object file")

    _add(Broken())
    try:
        info = next(b for b in list_backends() if b.name == "broken_for_test")
        assert not info.available and "libfoo.so" in info.reason
        with pytest.raises(attnswap.BackendUnavailable, match="libfoo.so"):
            attnswap.patch(torch.nn.Linear(2, 2), backend="broken_for_test", strict=True)
    finally:
        attnswap.unregister_backend("broken_for_test")


def test_register_as_decorator_returns_the_function(registered):
    def mine(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale=scale)

    assert registered("mine")(mine) is mine
    backend = get_backend("mine")
    assert backend.accepts_everything, "no declared limits: every call is accepted"
    q = rand(1, 2, 3, 4)
    torch.testing.assert_close(backend(q, q, q), torch.nn.functional.scaled_dot_product_attention(q, q, q))


def test_partial_signature_refuses_calls_that_need_missing_parameters(registered):
    seen = {}

    def plain(q, k, v, scale=None):
        seen["scale"] = scale
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)

    registered("plain", plain)
    backend = get_backend("plain")
    q = rand(1, 2, 3, 4)
    reasons, _ = backend.reasons(facts_of(q, q, q, rand(3, 3), 0.1, False, None))
    assert any("takes no attn_mask" in r for r in reasons) and any("takes no dropout_p" in r for r in reasons)
    assert backend.reasons(facts_of(q, q, q, None, 0.0, False, 0.5))[0] == []
    backend(q, q, q, None, 0.0, False, 0.5, False)
    assert seen["scale"] == 0.5


def test_supports_callable_and_limits_are_honoured(registered):
    registered("small_only", lambda q, k, v, **kw: q, supports=lambda f: [] if f.head_dim <= 8 else [f"head_dim {f.head_dim} > 8"])
    q = rand(1, 1, 2, 16)
    assert get_backend("small_only").reasons(facts_of(q, q, q))[0] == ["head_dim 16 > 8"]
    registered("no_bias", lambda q, k, v, **kw: q, limits=attnswap.Limits(additive_mask=False))
    assert get_backend("no_bias").reasons(facts_of(q, q, q, rand(2, 2)))[0] == ["additive attn_mask (bias) not supported"]


def test_bad_registrations_are_refused(registered):
    with pytest.raises(attnswap.AttnSwapError, match="must take \\(query, key, value"):
        attnswap.register_backend("two_args", lambda q, k: q)
    with pytest.raises(attnswap.AttnSwapError, match="alias"):
        attnswap.register_backend("math", lambda q, k, v: q)
    with pytest.raises(attnswap.AttnSwapError, match="invalid backend name"):
        attnswap.register_backend("auto", lambda q, k, v: q)
    with pytest.raises(attnswap.AttnSwapError, match="built-in"):
        attnswap.unregister_backend("sdpa")


def test_reregistering_warns_and_replaces(registered):
    registered("twice", lambda q, k, v, **kw: q)
    with pytest.warns(UserWarning, match="replacing the registered backend 'twice'"):
        registered("twice", lambda q, k, v, **kw: k)
    q, k = rand(1, 1, 2, 2, seed=1), rand(1, 1, 2, 2, seed=2)
    assert torch.equal(get_backend("twice")(q, k, k), k)


def test_import_is_lazy_about_optional_packages():
    import subprocess
    import sys

    code = (
        "import sys, attnswap;"
        "bad = [m for m in ('flash_attn', 'xformers', 'sageattention', 'flash_attn_interface', 'triton', 'transformers', 'diffusers', 'attnswap.integrations.hf_transformers') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
