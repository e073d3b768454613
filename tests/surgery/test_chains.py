"""Straight chains of hand-written attention, fused into one call (``surgery/chains.py``).

The fused call must be a cost change only: for every spelling, the router receives exactly the
call the symbolic rewrite gives it (recorded, compared bit for bit), outputs equal the module's
own math, and whatever the fast path does not accept at run time is replayed through the
symbolic path (counted here), with the module's operands evaluated once, in its order."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnswap
from attnswap.backends import eager_attention
from attnswap.surgery import chains, manual, reroute


def rand(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype)


class Manual(nn.Module):
    def __init__(self, p=0.0):
        super().__init__()
        self.attn_drop = nn.Dropout(p)
        self.softmax = nn.Softmax(dim=-1)
        self.scale = 0.25
        self.log = []


def make(forward):
    return type("M", (Manual,), {"forward": forward})


def fused_chains(module: nn.Module) -> list[chains.FusedChain]:
    fn = type(module).forward
    return [c.cell_contents for c in fn.__closure__ or () if isinstance(c.cell_contents, chains.FusedChain)]


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        self.calls.append((q, k, v, attn_mask, dropout_p, scale))
        return eager_attention(q, k, v, attn_mask=attn_mask, scale=scale)


def same_calls(a: list, b: list) -> bool:
    def same(x, y):
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            return isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape and torch.equal(x, y)
        return x == y

    return len(a) == len(b) and all(same(x, y) for ca, cb in zip(a, b) for x, y in zip(ca, cb))


# -- spellings: (forward, fused?) --------------------------------------------------------------
def _scale_bias_one_line(self, q, k, v, bias):
    attn = q @ k.transpose(-2, -1) * self.scale + bias
    attn = attn.softmax(dim=-1)
    return (attn @ v).transpose(1, 2)


def _statements(self, q, k, v, bias):
    attn = (q @ k.transpose(-2, -1)) * self.scale
    attn = attn + bias
    attn = attn.softmax(-1)
    attn = self.attn_drop(attn)
    x = attn @ v
    return x


def _augmented(self, q, k, v, bias):
    attn = torch.matmul(q, k.transpose(-2, -1))
    attn *= self.scale
    attn += bias
    attn -= bias / 2
    attn = F.softmax(attn, dim=-1)
    return torch.matmul(attn, v)


def _divided_module_softmax(self, q, k, v, bias):
    attn = q.matmul(k.transpose(-2, -1)) / 8.0
    attn = self.softmax(attn)
    return attn.matmul(v)


def _reflected_scale(self, q, k, v, bias):
    attn = self.scale * (q @ k.transpose(-2, -1))
    attn = torch.softmax(attn, -1)
    return attn @ v


def _channels_first(self, q, k, v, bias):
    q, k, v = q.mT, k.mT, v.mT  # (B, H, d, N), as EfficientViT-MSRA and LeViT's conv mode hold them
    attn = (q.transpose(-2, -1) @ k) * self.scale + bias
    attn = attn.softmax(dim=-1)
    return v @ attn.transpose(-2, -1)


def _channels_first_mT(self, q, k, v, bias):
    q, k, v = q.mT, k.mT, v.mT
    attn = q.transpose(-2, -1) @ k
    attn = attn.softmax(dim=-1)
    return v @ attn.mT


def _bmm(self, q, k, v, bias):
    b, h, n, d = q.shape
    attn = torch.bmm(q.reshape(b * h, n, d), k.reshape(b * h, n, d).transpose(1, 2)) * self.scale
    attn = attn.softmax(dim=-1)
    return torch.bmm(attn, v.reshape(b * h, n, -1)).view(b, h, n, -1)


def _in_a_loop(self, q, k, v, bias):
    outs = []
    for i in range(q.shape[1]):
        attn = q[:, i] @ k[:, i].transpose(-2, -1) * self.scale + bias[:, i]
        attn = attn.softmax(dim=-1)
        outs.append(attn @ v[:, i])
    return torch.stack(outs, 1)


def _two_chains(self, q, k, v, bias):
    a1 = q @ k.transpose(-2, -1) * self.scale
    a1 = a1.softmax(-1)
    x = a1 @ v
    a2 = (q @ k.transpose(-2, -1) + bias).softmax(-1)  # one expression: the symbolic path, not a chain
    return x + a2 @ v


# not chains: the symbolic path
def _stored(self, q, k, v, bias):
    attn = (q @ k.transpose(-2, -1) * self.scale).softmax(-1)
    self.last = attn  # the probabilities are used elsewhere
    return attn @ v


def _viewed(self, q, k, v, bias):
    attn = q @ k.transpose(-2, -1)
    b, h, n, _ = attn.shape
    attn = attn.view(b, h, n, n) + bias
    attn = attn.softmax(-1)
    return attn @ v


def _probs_returned(self, q, k, v, bias):
    attn = q @ k.transpose(-2, -1)
    attn = attn.softmax(-1)
    return attn @ v, attn


SPELLINGS = {
    "scale and bias in one line": (_scale_bias_one_line, 1),
    "one statement per step, dropout": (_statements, 1),
    "augmented assignments, F.softmax": (_augmented, 1),
    "divided, nn.Softmax, .matmul": (_divided_module_softmax, 1),
    "number on the left": (_reflected_scale, 1),
    "channels first (v @ attnᵀ)": (_channels_first, 1),
    "channels first (.mT)": (_channels_first_mT, 1),
    "torch.bmm": (_bmm, 1),
    "in a loop": (_in_a_loop, 1),
    "a chain and an expression": (_two_chains, 1),
    "probabilities stored": (_stored, 0),
    "scores viewed": (_viewed, 0),
    "probabilities returned": (_probs_returned, 0),
}


def _args():
    return rand(2, 3, 6, 8), rand(2, 3, 6, 8), rand(2, 3, 6, 5), rand(1, 3, 6, 6)


def _patched(forward, backend, *, fuse=True, monkeypatch=None, p=0.0):
    if not fuse:
        monkeypatch.setattr(manual, "FUSE_CHAINS", False)
    m = make(forward)(p)
    attnswap.patch(m, backend=backend)
    if not fuse:
        monkeypatch.setattr(manual, "FUSE_CHAINS", True)
    return m


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_fused_chains_equal_the_modules_math_and_the_symbolic_rewrite(spelling, registered, monkeypatch):
    forward, fused = SPELLINGS[spelling]
    q, k, v, bias = _args()
    plain = make(forward)()
    ref = plain(q, k, v, bias)

    fast, slow = Recorder(), Recorder()
    registered("rec_fast", fast)
    registered("rec_slow", slow)
    m = _patched(forward, "rec_fast")
    unfused = _patched(forward, "rec_slow", fuse=False, monkeypatch=monkeypatch)
    assert len(fused_chains(m)) == fused and not fused_chains(unfused)

    out, out_unfused = m(q, k, v, bias), unfused(q, k, v, bias)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert same_calls(fast.calls, slow.calls) and fast.calls
    for a, b in zip(out if isinstance(out, tuple) else (out,), out_unfused if isinstance(out_unfused, tuple) else (out_unfused,)):
        assert torch.equal(a, b)
    s, s_unfused = attnswap.stats(m), attnswap.stats(unfused)
    assert (s.total_calls, s.unrouted_calls) == (s_unfused.total_calls, s_unfused.unrouted_calls)
    # returned probabilities are the module's own, counted as unrouted
    assert s.unrouted_calls == (spelling == "probabilities returned")


def test_dropout_in_training_reaches_the_router_as_the_symbolic_path_gives_it(registered, monkeypatch):
    fast, slow = Recorder(), Recorder()
    registered("rec_fast", fast)
    registered("rec_slow", slow)
    m = _patched(_augmented_dropout, "rec_fast", p=0.25).train()
    unfused = _patched(_augmented_dropout, "rec_slow", fuse=False, monkeypatch=monkeypatch, p=0.25).train()
    assert fused_chains(m)
    q, k, v, bias = _args()
    for module in (m, unfused):
        module(q, k, v, bias)
        module.attn_drop.p = 0.0
        module(q, k, v, bias)
    # dropout twice (F.dropout, then the module's) is not one attention: computed as written
    assert [c[4] for c in fast.calls] == [0.25]
    assert same_calls(fast.calls, slow.calls)
    assert attnswap.stats(m).unrouted_calls == attnswap.stats(unfused).unrouted_calls == 1


def _augmented_dropout(self, q, k, v, bias):
    attn = q @ k.transpose(-2, -1)
    attn *= self.scale
    attn = attn.softmax(dim=-1)
    attn = F.dropout(attn, 0.25, self.training)
    attn = self.attn_drop(attn)
    return attn @ v


@pytest.fixture
def replays(monkeypatch):
    """How many times fused chains fell back to the symbolic replay."""
    count = []
    original = chains.FusedChain._replay

    def counting(self, *args):
        count.append(1)
        return original(self, *args)

    monkeypatch.setattr(chains.FusedChain, "_replay", counting)
    return count


def test_what_the_fast_path_does_not_take_is_replayed_and_stays_exact(replays):
    q, k, v, bias = _args()
    m = _patched(_statements, "eager")
    plain = make(_statements)()
    m(q, k, v, bias)
    assert not replays  # the fast path took it

    # a per-head tensor factor: the symbolic path folds it into q (and still routes)
    m.scale = plain.scale = torch.rand(3, 1, 1, dtype=torch.float64)
    torch.testing.assert_close(m(q, k, v, bias), plain(q, k, v, bias), rtol=1e-12, atol=1e-12)
    assert len(replays) == 1 and attnswap.stats(m).unrouted_calls == 0

    # a bias of another dtype: the module's own math, replayed bit for bit, counted as unrouted
    m.scale = plain.scale = 0.25
    half = bias.float()
    assert torch.equal(m(q, k, v, half), plain(q, k, v, half))
    assert len(replays) == 2 and attnswap.stats(m).unrouted_calls == 1

    # a hook on the dropout module sees what the symbolic path gives it
    seen = []
    m.attn_drop.register_forward_hook(lambda mod, args, out: seen.append(type(out).__name__))
    torch.testing.assert_close(m(q, k, v, bias), plain(q, k, v, bias), rtol=1e-12, atol=1e-12)
    assert len(replays) == 3 and seen == ["Probs"]


def test_softmax_over_another_dim_is_replayed_exactly(replays):
    def other_dim(self, q, k, v, bias):
        attn = q @ k.transpose(-2, -1)
        attn = attn.softmax(dim=self.dim)
        return attn @ v

    cls = make(other_dim)
    m, plain = cls(), cls()
    m.dim = plain.dim = 2
    attnswap.patch(m, backend="eager")
    q, k, v, bias = _args()
    assert torch.equal(m(q, k, v, bias), plain(q, k, v, bias))
    assert replays and attnswap.stats(m).unrouted_calls == 1
    m.dim = plain.dim = -1  # read at call time: now the fast path takes it
    before = len(replays)
    torch.testing.assert_close(m(q, k, v, bias), plain(q, k, v, bias), rtol=1e-12, atol=1e-12)
    assert len(replays) == before


def test_operands_are_evaluated_once_in_the_modules_order():
    def logged(self, q, k, v, bias):
        attn = self.note("q", q) @ self.note("k", k).transpose(-2, -1) * self.note("scale", 0.5)
        attn = attn + self.note("bias", bias)
        attn = attn.softmax(dim=self.note("dim", -1))
        attn = self.note("drop", self.attn_drop)(attn)
        return attn @ self.note("v", v)

    def note(self, what, value):
        self.log.append(what)
        return value

    cls = type("Logged", (Manual,), {"forward": logged, "note": note})
    plain, m = cls(), cls()
    attnswap.patch(m, backend="eager")
    assert fused_chains(m)
    q, k, v, bias = _args()
    plain(q, k, v, bias)
    m(q, k, v, bias)
    assert m.log == plain.log == ["q", "k", "scale", "bias", "dim", "drop", "v"]
    m.log.clear()
    m(q, k, v, bias.float())  # replayed: still once each
    assert m.log == plain.log


def test_gradients_through_a_fused_chain_equal_the_modules():
    q, k, v, bias = (t.requires_grad_() for t in _args())
    plain = make(_channels_first)()
    m = make(_channels_first)()
    attnswap.patch(m, backend="eager")
    assert fused_chains(m)
    ref = torch.autograd.grad(plain(q, k, v, bias).square().sum(), (q, k, v, bias))
    got = torch.autograd.grad(m(q, k, v, bias).square().sum(), (q, k, v, bias))
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


FAMILIES = ["levit_128s", "levit_conv_128s", "efficientvit_m0", "efficientformer_l1"]


@pytest.mark.parametrize("name", FAMILIES)
def test_timm_chains_are_fused_and_give_the_symbolic_calls(name, registered, monkeypatch):
    timm = pytest.importorskip("timm")
    fast, slow = Recorder(), Recorder()
    registered("rec_fast", fast)
    registered("rec_slow", slow)
    plain = timm.create_model(name, pretrained=False).eval().double()
    m = timm.create_model(name, pretrained=False).eval().double()
    m.load_state_dict(plain.state_dict())
    attnswap.patch(m, backend="rec_fast")
    attention = [mod for mod in m.modules() if type(mod).__name__ in ("Attention", "AttentionDownsample", "CascadedGroupAttention")]
    assert attention and all(fused_chains(mod) for mod in attention)

    monkeypatch.setattr(manual, "FUSE_CHAINS", False)
    monkeypatch.setattr(reroute, "_cache", reroute._ClassCache(reroute.CLASS_CACHE_SIZE))
    monkeypatch.setattr(reroute, "_generated", reroute._ClassCache(reroute.CLASS_CACHE_SIZE))
    unfused = timm.create_model(name, pretrained=False).eval().double()
    unfused.load_state_dict(plain.state_dict())
    attnswap.patch(unfused, backend="rec_slow")
    assert not any(fused_chains(mod) for mod in unfused.modules() if hasattr(type(mod), "_attnswap_original_class"))

    x = torch.randn(1, 3, 224, 224, dtype=torch.float64)
    with torch.no_grad():
        ref, out, out_unfused = plain(x), m(x), unfused(x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(out, out_unfused)
    assert same_calls(fast.calls, slow.calls) and fast.calls


def test_module_hooks_anywhere_send_the_chain_through_the_symbolic_path(replays):
    q, k, v, bias = _args()
    m = _patched(_divided_module_softmax, "eager")
    plain = make(_divided_module_softmax)()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda mod, args, out: None)
    try:
        torch.testing.assert_close(m(q, k, v, bias), plain(q, k, v, bias), rtol=1e-12, atol=1e-12)
    finally:
        handle.remove()
    assert len(replays) == 1
    m(q, k, v, bias)
    assert len(replays) == 1  # hook gone: the fast path again


def test_an_argument_given_twice_raises_the_modules_own_error():
    def twice(self, q, k, v, bias):
        attn = q @ k.transpose(-2, -1)
        attn = attn.softmax(-1, dim=-1)
        return attn @ v

    m = make(twice)()
    attnswap.patch(m, backend="eager")
    assert fused_chains(m) and not fused_chains(m)[0].fast
    with pytest.raises(TypeError):
        m(*_args())


class _WritesQInPlace(nn.Module):
    def bias(self, q):
        q.mul_(2.0)  # between the scores product and @ v
        return torch.zeros((), dtype=q.dtype)

    def forward(self, q, k, v):
        attn = q @ k.transpose(-2, -1)
        attn = attn + self.bias(q)
        attn = attn.softmax(-1)
        return attn @ v


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "symbolic"])
def test_q_written_in_place_before_the_router_call_is_never_silently_used(fuse, monkeypatch):
    """The product q @ kᵀ is deferred (symbolic and fused alike): a write into q before it is
    consumed would change what the router computes, so it is refused, loudly."""
    q, k, v = rand(2, 5, 4), rand(2, 5, 4), rand(2, 5, 4)
    ref = _WritesQInPlace()(q.clone(), k, v)
    monkeypatch.setattr(manual, "FUSE_CHAINS", fuse)
    monkeypatch.setattr(reroute, "_cache", reroute._ClassCache(reroute.CLASS_CACHE_SIZE))
    monkeypatch.setattr(reroute, "_generated", reroute._ClassCache(reroute.CLASS_CACHE_SIZE))
    m = _WritesQInPlace()
    attnswap.patch(m, backend="eager")
    assert bool(fused_chains(m)) == fuse
    with pytest.raises(attnswap.AttnSwapError, match="in place between q @ kᵀ"):
        m(q.clone(), k, v)
    # without the write, the same module routes and is exact
    m.bias = lambda q: torch.zeros((), dtype=q.dtype)
    plain = _WritesQInPlace()
    plain.bias = m.bias
    torch.testing.assert_close(m(q, k, v), plain(q, k, v), rtol=1e-12, atol=1e-12)
    assert attnswap.stats(m).total_calls == 1
