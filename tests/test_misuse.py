"""A catalogue of misuse: every wrong call gets a clear AttnSwapError, and the model is unchanged.

Issue: "Bad input: a catalogue test of misuse (wrong types, unknown names, backends raising
inside, a custom backend returning the wrong shape or dtype -> clear AttnSwapError naming the
site and backend, model unchanged)."

Each table row is run by up to three tests:

- ``..._leaves_everything_unchanged``: the call raises, and the model (every module's class
  and ``__dict__`` entries, by identity; every ``state_dict`` tensor, by value; whether it
  is patched; parameter and buffer objects, by identity) and the backend registry are exactly
  as before. The API rows run from an unpatched model and from one already patched with
  ``eager`` (whose routers must survive).
- ``..._raises_a_clear_error``: the exception type, and a message that says what was wrong.
- ``..._message_says_what_to_do``: the message also says what to do instead (valid names,
  the closest name, the accepted values, an install command, the expected result).

Rows whose current behaviour falls short are ``xfail(strict=True)`` with the reason, in the
test they fail: fixing the library turns them into XPASS failures, so the mark must go.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch

import attnswap
from attnswap import auto
from attnswap.backends import eager_attention, registry
from families import build, features

SITE = "blocks.0.attn"  # the first attention site of build("vit"), where a forward fails first
NAME = "misuse_probe"  # the custom backend the forward-time rows register


# -- what "unchanged" means ------------------------------------------------------------------


def snapshot(model: torch.nn.Module) -> dict[str, Any]:
    return {
        "classes": [(name, type(m)) for name, m in model.named_modules()],
        "dicts": {name: dict(m.__dict__) for name, m in model.named_modules()},
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "tensors": {k: v for k, v in [*model.named_parameters(), *model.named_buffers()]},
        "patched": attnswap.is_patched(model),
    }


def assert_unchanged(model: torch.nn.Module, before: dict[str, Any]) -> None:
    after = snapshot(model)
    assert after["patched"] == before["patched"]
    assert after["classes"] == before["classes"], "a module's class changed"
    for name, attrs in before["dicts"].items():
        now = after["dicts"][name]
        assert now.keys() == attrs.keys(), f"{name or '<root>'}: attributes {set(now) ^ set(attrs)} added or removed"
        changed = [k for k in attrs if now[k] is not attrs[k]]
        assert not changed, f"{name or '<root>'}: attributes {changed} replaced"
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items()), "a weight or buffer changed"
    assert after["tensors"].keys() == before["tensors"].keys()
    assert all(after["tensors"][k] is v for k, v in before["tensors"].items()), "a parameter or buffer was replaced"


def registry_snapshot() -> dict[str, Any]:
    return dict(registry._backends)


def assert_registry_unchanged(before: dict[str, Any]) -> None:
    now = registry_snapshot()
    assert now.keys() == before.keys(), f"backends {set(now) ^ set(before)} added or removed"
    assert all(now[k] is before[k] for k in before), "a backend was replaced"
    str(attnswap.list_backends())  # and listing still works


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine():
    return build("vit")


@pytest.fixture
def vit(pristine):
    model, x = pristine
    return copy.deepcopy(model), x


@pytest.fixture(autouse=True)
def _fresh_tuner():
    # auto_cache rows register files with the process-wide tuner: forget them afterwards
    auto.TUNER.forget()
    yield
    auto.TUNER.forget()


@pytest.fixture
def files(tmp_path):
    """Files the auto_cache rows read."""
    (tmp_path / "garbage.json").write_text("garbage{")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "entries.json").write_text(json.dumps({"format": auto._FORMAT, "entries": [{"backend": "sdpa"}]}))
    (tmp_path / "a_dir").mkdir()
    return tmp_path


# -- the catalogue ---------------------------------------------------------------------------


@dataclass
class Misuse:
    id: str
    #: call(model, tmp_path, register): the misuse; register is the `registered` fixture
    call: Callable[..., Any]
    error: type[BaseException]
    #: regex the message must match: what was wrong
    what: str
    #: regex the message must match: what to do instead
    hint: str
    #: prepares the model before the snapshot (the misuse needs that state)
    setup: Callable[[torch.nn.Module], None] | None = None
    #: the misuse is not rejected at all (xfail everywhere)
    accepted: str = ""
    #: rejected, but with a bare Python error or a message that does not say what was wrong
    unclear: str = ""
    #: clear about what was wrong, but silent on what to do
    no_hint: str = ""
    marks: list = field(default_factory=list)


def _body_must_not_run():
    pytest.fail("the body of attnswap.patched(...) ran although patching failed")


def _patched_ctx(model, **options):
    with attnswap.patched(model, **options):
        _body_must_not_run()


def _shadow_forward(model):
    attn = model.blocks[0].attn
    attn.forward = attn.forward  # an instance attribute hides the method attnswap would reroute


def _timm_vit_class():
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer


VALID = r"Valid names: .*\beager\b.*\bsdpa\b"

API: list[Misuse] = [
    # -- the model argument
    Misuse("patch_str", lambda m, t, r: attnswap.patch("vit_base_patch16_224"), attnswap.AttnSwapError,
           r"expected a torch\.nn\.Module, got str", r"expected a torch\.nn\.Module"),
    Misuse("patch_none", lambda m, t, r: attnswap.patch(None), attnswap.AttnSwapError,
           r"got NoneType", r"expected a torch\.nn\.Module"),
    Misuse("patch_class_not_instance", lambda m, t, r: attnswap.patch(_timm_vit_class()), attnswap.AttnSwapError,
           r"got the class VisionTransformer", r"instance.*build the model"),
    Misuse("unpatch_str", lambda m, t, r: attnswap.unpatch("model"), attnswap.AttnSwapError,
           r"expected a torch\.nn\.Module, got str", r"expected a torch\.nn\.Module"),
    Misuse("stats_none", lambda m, t, r: attnswap.stats(None), attnswap.AttnSwapError,
           r"got NoneType", r"expected a torch\.nn\.Module"),
    Misuse("is_patched_int", lambda m, t, r: attnswap.is_patched(42), attnswap.AttnSwapError,
           r"got int", r"expected a torch\.nn\.Module"),
    Misuse("patched_ctx_str", lambda m, t, r: _patched_ctx("model"), attnswap.AttnSwapError,
           r"got str", r"expected a torch\.nn\.Module"),
    # -- backend
    Misuse("backend_none", lambda m, t, r: attnswap.patch(m, backend=None), attnswap.AttnSwapError,
           r"backend name must be a string, got NoneType", r"must be a string"),
    Misuse("backend_int", lambda m, t, r: attnswap.patch(m, backend=123), attnswap.AttnSwapError,
           r"backend name must be a string, got int: 123", r"must be a string"),
    Misuse("backend_list", lambda m, t, r: attnswap.patch(m, backend=["sdpa"]), attnswap.AttnSwapError,
           r"backend name must be a string, got list", r"must be a string"),
    Misuse("backend_typo", lambda m, t, r: attnswap.patch(m, backend="sdpa_mat"), attnswap.AttnSwapError,
           r"Unknown attention backend 'sdpa_mat'", r"Did you mean 'sdpa_math'\?.*" + VALID),
    Misuse("backend_alias_typo", lambda m, t, r: attnswap.patch(m, backend="flash-attn"), attnswap.AttnSwapError,
           r"Unknown attention backend 'flash-attn'", r"Did you mean 'flash'\?"),
    Misuse("backend_far_off", lambda m, t, r: attnswap.patch(m, backend="zzzz"), attnswap.AttnSwapError,
           r"Unknown attention backend 'zzzz'", VALID),
    Misuse("backend_upper_case", lambda m, t, r: attnswap.patch(m, backend="SDPA"), attnswap.AttnSwapError,
           r"Unknown attention backend 'SDPA'", r"Did you mean 'sdpa'\?"),
    Misuse("patched_ctx_unknown_backend", lambda m, t, r: _patched_ctx(m, backend="eagr"), attnswap.AttnSwapError,
           r"Unknown attention backend 'eagr'", r"Did you mean 'eager'\?"),
    # -- fallback
    Misuse("fallback_unknown", lambda m, t, r: attnswap.patch(m, backend="eager", fallback=["sdpa", "nope"]),
           attnswap.AttnSwapError, r"Unknown attention backend 'nope'", VALID),
    Misuse("fallback_typo", lambda m, t, r: attnswap.patch(m, fallback="eagr"), attnswap.AttnSwapError,
           r"Unknown attention backend 'eagr'", r"Did you mean 'eager'\?"),
    Misuse("fallback_none_item", lambda m, t, r: attnswap.patch(m, fallback=[None]), attnswap.AttnSwapError,
           r"backend name must be a string, got NoneType", r"must be a string"),
    Misuse("fallback_int", lambda m, t, r: attnswap.patch(m, fallback=123), attnswap.AttnSwapError,
           r"fallback.*int", r"name|list|sequence"),
    # -- cast
    Misuse("cast_fp8", lambda m, t, r: attnswap.patch(m, cast="fp8"), attnswap.AttnSwapError,
           r"cast='fp8' is not supported", r"use 'bf16' or 'fp16'"),
    Misuse("cast_int", lambda m, t, r: attnswap.patch(m, cast=16), attnswap.AttnSwapError,
           r"cast=16 is not supported", r"use 'bf16' or 'fp16'"),
    Misuse("cast_float32", lambda m, t, r: attnswap.patch(m, cast=torch.float32), attnswap.AttnSwapError,
           r"cast=torch\.float32 is not supported", r"use 'bf16' or 'fp16'"),
    Misuse("patched_ctx_bad_cast", lambda m, t, r: _patched_ctx(m, cast="fp8"), attnswap.AttnSwapError,
           r"cast='fp8' is not supported", r"use 'bf16' or 'fp16'"),
    # -- candidates (auto)
    Misuse("candidates_unknown", lambda m, t, r: attnswap.patch(m, backend="auto", candidates=["sdpa", "nope"]),
           attnswap.AttnSwapError, r"Unknown attention backend 'nope'", VALID),
    Misuse("candidates_int", lambda m, t, r: attnswap.patch(m, backend="auto", candidates=5), attnswap.AttnSwapError,
           r"candidates.*int", r"name|list|sequence"),
    Misuse("candidates_without_auto", lambda m, t, r: attnswap.patch(m, backend="sdpa", candidates=["nope"]),
           attnswap.AttnSwapError, r"candidates", r"backend='auto'"),
    # -- include / exclude
    Misuse("include_list_of_int", lambda m, t, r: attnswap.patch(m, include=[3]), attnswap.AttnSwapError,
           r"`include` takes module-path globs .*or classes, got int: 3", r"module-path globs .*or classes"),
    Misuse("include_int", lambda m, t, r: attnswap.patch(m, include=3), attnswap.AttnSwapError,
           r"`include`.*int", r"module-path globs .*or classes"),
    Misuse("exclude_float", lambda m, t, r: attnswap.patch(m, exclude=3.5), attnswap.AttnSwapError,
           r"`exclude`.*float", r"module-path globs .*or classes"),
    Misuse("include_module_instance", lambda m, t, r: attnswap.patch(m, include=m.blocks[0].attn),
           attnswap.AttnSwapError, r"`include`.*Attention", r"module-path globs or classes"),
    # -- strict
    Misuse("strict_unavailable_backend", lambda m, t, r: attnswap.patch(m, backend="flash", strict=True),
           attnswap.BackendUnavailable, r"'flash' is unavailable: flash_attn is not installed",
           r"pip install flash-attn",
           marks=[pytest.mark.skipif(attnswap.get_backend("flash").unavailable_reason is None,
                                     reason="flash-attn is usable here")]),
    Misuse("strict_unroutable_site", lambda m, t, r: attnswap.patch(m, strict=True), attnswap.PatchError,
           rf"cannot be routed \(nothing was patched\):\s+{re.escape(SITE)} .*instance attribute 'forward' overrides",
           r"strict=False|exclude", setup=_shadow_forward),
    # -- auto_cache
    Misuse("auto_cache_not_json", lambda m, t, r: attnswap.patch(m, backend="auto", auto_cache=t / "garbage.json"),
           attnswap.AttnSwapError, r"cannot read the auto-tuning file .*garbage\.json: Expecting value",
           r"delete it or pass another path"),
    Misuse("auto_cache_directory", lambda m, t, r: attnswap.patch(m, backend="auto", auto_cache=t / "a_dir"),
           attnswap.AttnSwapError, r"cannot read the auto-tuning file .*a_dir: .*Is a directory",
           r"delete it or pass another path"),
    Misuse("auto_cache_int", lambda m, t, r: attnswap.patch(m, backend="auto", auto_cache=5), attnswap.AttnSwapError,
           r"auto_cache.*int", r"path"),
    Misuse("auto_cache_json_not_an_object", lambda m, t, r: attnswap.patch(m, backend="auto", auto_cache=t / "list.json"),
           attnswap.AttnSwapError, r"auto-tuning file .*list\.json", r"delete it or pass another path"),
    Misuse("auto_cache_malformed_entry", lambda m, t, r: attnswap.patch(m, backend="auto", auto_cache=t / "entries.json"),
           attnswap.AttnSwapError, r"auto-tuning file .*entries\.json", r"delete it or pass another path"),
]

REGISTRY: list[Misuse] = [
    Misuse("register_not_callable", lambda m, t, r: r(NAME, 5), attnswap.AttnSwapError,
           rf"backend '{NAME}': expected a callable, got int", r"expected a callable"),
    Misuse("register_decorator_on_not_callable", lambda m, t, r: r(NAME)(5), attnswap.AttnSwapError,
           rf"backend '{NAME}': expected a callable, got int", r"expected a callable"),
    Misuse("register_name_int", lambda m, t, r: r(5, eager_attention), attnswap.AttnSwapError,
           r"invalid backend name 5", r"use a non-empty string other than 'auto'"),
    Misuse("register_name_empty", lambda m, t, r: r("", eager_attention), attnswap.AttnSwapError,
           r"invalid backend name ''", r"use a non-empty string other than 'auto'"),
    Misuse("register_name_auto", lambda m, t, r: r("auto", eager_attention), attnswap.AttnSwapError,
           r"invalid backend name 'auto'", r"use a non-empty string other than 'auto'"),
    Misuse("register_alias_name", lambda m, t, r: r("math", eager_attention), attnswap.AttnSwapError,
           r"'math' is an alias of built-in backend 'sdpa_math'", r"choose another name"),
    Misuse("register_two_argument_function", lambda m, t, r: r(NAME, lambda q, k: q), attnswap.AttnSwapError,
           r"must take \(query, key, value, \.\.\.\).*its signature is \(q, k\)", r"like scaled_dot_product_attention"),
    Misuse("register_supports_not_callable", lambda m, t, r: r(NAME, eager_attention, supports=["no"]),
           attnswap.AttnSwapError, rf"backend '{NAME}': `supports` must be callable, got list", r"must be callable"),
    Misuse("register_limits_wrong_type", lambda m, t, r: r(NAME, eager_attention, limits=5), attnswap.AttnSwapError,
           r"limits.*int", r"Limits"),
    Misuse("register_limits_dict_of_wrong_type", lambda m, t, r: r(NAME, eager_attention, limits={"cpu": "fp32"}),
           attnswap.AttnSwapError, r"limits.*'fp32'", r"Limits"),
    Misuse("register_supports_without_argument", lambda m, t, r: r(NAME, eager_attention, supports=lambda: []),
           attnswap.AttnSwapError, r"`supports` must take one argument", r"CallFacts.*reasons"),
    Misuse("unregister_unknown", lambda m, t, r: attnswap.unregister_backend("nope"), attnswap.AttnSwapError,
           r"no backend named 'nope' is registered", r"registered with register_backend|Did you mean"),
    Misuse("unregister_alias_of_builtin", lambda m, t, r: attnswap.unregister_backend("math"), attnswap.AttnSwapError,
           r"alias.*sdpa_math|built-in", r"cannot be unregistered"),
    Misuse("unregister_int", lambda m, t, r: attnswap.unregister_backend(5), attnswap.AttnSwapError,
           r"backend name must be a string, got int: 5", r"must be a string"),
    Misuse("unregister_builtin", lambda m, t, r: attnswap.unregister_backend("sdpa"), attnswap.AttnSwapError,
           r"'sdpa' is a built-in backend", r"cannot be unregistered"),
    Misuse("get_backend_unknown", lambda m, t, r: attnswap.get_backend("sdpa_flsh"), attnswap.AttnSwapError,
           r"Unknown attention backend 'sdpa_flsh'", r"Did you mean 'sdpa_flash'\?"),
    Misuse("get_backend_int", lambda m, t, r: attnswap.get_backend(5), attnswap.AttnSwapError,
           r"backend name must be a string, got int", r"must be a string"),
]


def _params(cases: list[Misuse], test: str) -> list:
    out = []
    for c in cases:
        marks = list(c.marks)
        reason = c.accepted or (c.unclear if test != "unchanged" else "") or (c.no_hint if test == "hint" else "")
        if reason:
            marks.append(pytest.mark.xfail(strict=True, reason=reason))
        out.append(pytest.param(c, id=c.id, marks=marks))
    return out


def _run(case: Misuse, model, tmp, register, *, take_snapshots: bool = False):
    if case.setup is not None:
        case.setup(model)
    before, backends = (snapshot(model), registry_snapshot()) if take_snapshots else (None, None)
    try:
        case.call(model, tmp, register)
    except Exception as exc:  # noqa: BLE001 - which exception it is, the other tests check
        return exc, before, backends
    return None, before, backends


@pytest.fixture(params=["unpatched", "patched"])
def start(request, vit):
    """The model a misuse meets: fresh, or patched with eager (whose routers must survive)."""
    model, x = vit
    if request.param == "patched":
        attnswap.patch(model, backend="eager")
        with torch.no_grad():
            model(x)
    return model


@pytest.mark.parametrize("case", _params(API, "unchanged"))
def test_api_misuse_leaves_everything_unchanged(case, start, files, registered):
    raised, before, backends = _run(case, start, files, registered, take_snapshots=True)
    assert raised is not None, "the misuse was accepted"
    assert_unchanged(start, before)
    assert_registry_unchanged(backends)


@pytest.mark.parametrize("case", _params(REGISTRY, "unchanged"))
def test_registry_misuse_leaves_everything_unchanged(case, vit, files, registered):
    model, _ = vit
    raised, before, backends = _run(case, model, files, registered, take_snapshots=True)
    assert raised is not None, "the misuse was accepted"
    assert_unchanged(model, before)
    assert_registry_unchanged(backends)


@pytest.mark.parametrize("case", _params(API + REGISTRY, "error"))
def test_misuse_raises_a_clear_error(case, vit, files, registered):
    model, _ = vit
    raised, _, _ = _run(case, model, files, registered)
    assert raised is not None, "the misuse was accepted"
    assert isinstance(raised, case.error), f"{type(raised).__name__}: {raised}"
    assert re.search(case.what, str(raised), re.S), str(raised)


@pytest.mark.parametrize("case", _params(API + REGISTRY, "hint"))
def test_misuse_message_says_what_to_do(case, vit, files, registered):
    model, _ = vit
    raised, _, _ = _run(case, model, files, registered)
    assert isinstance(raised, attnswap.AttnSwapError), f"{type(raised).__name__}: {raised}"
    assert re.search(case.hint, str(raised), re.S), str(raised)


# -- custom backends failing at forward time -------------------------------------------------


@dataclass
class Broken:
    id: str
    fn: Callable
    #: regex for what was wrong (the message must also name the backend and the site)
    what: str
    hint: str = ""
    register: dict = field(default_factory=dict)
    unclear: str = ""
    no_hint: str = ""


def _raises(q, k, v, **kw):
    raise ValueError("kernel exploded")


def _supports_raises(facts):
    raise ValueError("supports exploded")


SHAPE = r"\(2, 2, 17, 32\)"  # build("vit"): batch 2, 2 heads, 17 tokens, head dim 32
BROKEN: list[Broken] = [
    Broken("raises", _raises, r"raised at site .*: ValueError: kernel exploded", r"Fix the backend.*supports=.*falls back"),
    Broken("wrong_shape", lambda q, k, v, **kw: q[..., :1], r"returned shape \(2, 2, 17, 1\) torch\.float32",
           rf"expected {SHAPE} torch\.float32"),
    Broken("transposed", lambda q, k, v, **kw: eager_attention(q, k, v).transpose(1, 2),
           r"returned shape \(2, 17, 2, 32\)", rf"expected {SHAPE} torch\.float32"),
    Broken("wrong_dtype_float64", lambda q, k, v, **kw: eager_attention(q, k, v).double(),
           rf"returned shape {SHAPE} torch\.float64", rf"expected {SHAPE} torch\.float32"),
    Broken("wrong_dtype_float16", lambda q, k, v, **kw: eager_attention(q, k, v).half(),
           rf"returned shape {SHAPE} torch\.float16", rf"expected {SHAPE} torch\.float32"),
    Broken("returns_none", lambda q, k, v, **kw: None, r"returned NoneType", r"expected a Tensor"),
    Broken("returns_tuple", lambda q, k, v, **kw: (eager_attention(q, k, v), None), r"returned tuple",
           r"expected a Tensor"),
    Broken("returns_int", lambda q, k, v, **kw: 3, r"returned int", r"expected a Tensor"),
    Broken("supports_raises", lambda q, k, v, **kw: eager_attention(q, k, v), r"supports exploded", r"supports",
           register=dict(supports=_supports_raises)),
]


def _broken_params(test: str) -> list:
    out = []
    for b in BROKEN:
        reason = b.unclear or (b.no_hint if test == "hint" else "")
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        out.append(pytest.param(b, id=b.id, marks=marks))
    return out


def _fail_forward(case: Broken, model, x, registered):
    registered(NAME, case.fn, **case.register)
    attnswap.patch(model, backend=NAME)
    patched = snapshot(model)
    with torch.no_grad(), pytest.raises(Exception) as info:
        model(x)
    return info.value, patched


@pytest.mark.parametrize("case", _broken_params("error"))
def test_broken_backend_fails_clearly_and_the_model_recovers(case, vit, registered):
    model, x = vit
    with torch.no_grad():
        reference = features(model, x)
    original = snapshot(model)
    error, patched = _fail_forward(case, model, x, registered)
    message = str(error)
    assert isinstance(error, attnswap.AttnSwapError), f"{type(error).__name__}: {message}"
    assert f"backend '{NAME}'" in message and f"site {SITE}" in message, message
    assert re.search(case.what, message), message
    # the failed forward changed nothing: still patched, same routers, same weights
    assert_unchanged(model, patched)
    # fixing the backend (re-registering the name) is picked up by the patched model
    with pytest.warns(UserWarning, match=f"replacing the registered backend '{NAME}'"):
        registered(NAME, eager_attention)
    with torch.no_grad():
        torch.testing.assert_close(features(model, x), reference)
    # so is switching to a built-in backend
    attnswap.patch(model, backend="sdpa")
    with torch.no_grad():
        torch.testing.assert_close(features(model, x), reference)
    # and unpatching restores the model exactly
    attnswap.unpatch(model)
    assert_unchanged(model, original)


@pytest.mark.parametrize("case", _broken_params("hint"))
def test_broken_backend_message_says_what_to_do(case, vit, registered):
    model, x = vit
    error, _ = _fail_forward(case, model, x, registered)
    assert isinstance(error, attnswap.AttnSwapError), f"{type(error).__name__}: {error}"
    assert re.search(case.hint, str(error)), str(error)


def test_raising_backend_keeps_the_original_exception_as_cause(vit, registered):
    model, x = vit
    error, _ = _fail_forward(BROKEN[0], model, x, registered)
    assert isinstance(error.__cause__, ValueError) and str(error.__cause__) == "kernel exploded"


def test_raising_backend_fails_even_with_a_fallback_chain(vit, registered):
    # a backend that raises is an error, not a refusal: the chain is for calls it declines
    model, x = vit
    registered(NAME, _raises)
    attnswap.patch(model, backend=NAME, fallback=["eager"])
    with torch.no_grad(), pytest.raises(attnswap.AttnSwapError, match=f"backend '{NAME}' raised at site {SITE}"):
        model(x)


def test_failed_calls_are_not_counted_as_served(vit, registered):
    model, x = vit
    registered(NAME, lambda q, k, v, **kw: q[..., :1])
    attnswap.patch(model, backend=NAME)
    with torch.no_grad(), pytest.raises(attnswap.AttnSwapError):
        model(x)
    assert attnswap.stats(model).total_calls == 0


def test_auto_cache_in_missing_directory_is_a_clear_error(vit, tmp_path):
    # either patch() rejects the path, or the forward succeeds, or it fails with an AttnSwapError naming the file
    model, x = vit
    try:
        attnswap.patch(model, backend="auto", candidates=("sdpa", "eager"), auto_cache=tmp_path / "missing" / "tuned.json")
        with torch.no_grad():
            model(x)
    except attnswap.AttnSwapError as exc:
        assert "tuned.json" in str(exc)


# -- duplicate names -------------------------------------------------------------------------


def test_reregistering_a_name_warns_and_replaces_it_everywhere(vit, registered):
    model, x = vit
    calls = {"first": 0, "second": 0}

    def first(q, k, v, **kw):
        calls["first"] += 1
        return eager_attention(q, k, v, **kw)

    def second(q, k, v, **kw):
        calls["second"] += 1
        return eager_attention(q, k, v, **kw)

    registered(NAME, first)
    attnswap.patch(model, backend=NAME)
    with torch.no_grad():
        model(x)
    with pytest.warns(UserWarning, match=f"attnswap: replacing the registered backend '{NAME}'") as record:
        attnswap.register_backend(NAME, second)
    assert record[0].filename == __file__  # the warning points at the caller's line
    with torch.no_grad():
        model(x)
    assert calls == {"first": 2, "second": 2}
    assert attnswap.stats(model).by_backend() == {NAME: 4}
    attnswap.unregister_backend(NAME)
    assert NAME not in {b.name for b in attnswap.list_backends()}
    # a patched site whose backend is gone falls back, with the reason
    with torch.no_grad():
        model(x)
    fallback = attnswap.stats(model)[0].fallbacks[0]
    assert fallback.used == "sdpa" and "not registered" in fallback.refused[NAME][0]


def test_replacing_a_builtin_warns_and_unregistering_brings_it_back():
    original = registry._backends["eager"]
    try:
        with pytest.warns(UserWarning, match="replacing the built-in backend 'eager'"):
            attnswap.register_backend("eager", lambda q, k, v, **kw: eager_attention(q, k, v, **kw))
        assert registry._backends["eager"] is not original
        attnswap.unregister_backend("eager")
        assert registry._backends["eager"] is original
        with pytest.raises(attnswap.AttnSwapError, match="'eager' is a built-in backend and cannot be unregistered"):
            attnswap.unregister_backend("eager")
    finally:
        registry._backends["eager"] = original
        registry._replaced_builtins.pop("eager", None)
        registry._changed()
