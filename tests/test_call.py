import pytest
import torch

from attnswap.call import MASK_ADDITIVE, MASK_BOOL, MASK_NONE, facts_of, to_4d
from conftest import rand


def test_facts_read_every_property_of_the_call():
    q, k, v = rand(2, 4, 5, 8), rand(2, 2, 7, 8), rand(2, 2, 7, 16)
    f = facts_of(q, k, v, None, 0.1, False, 0.5, True)
    assert (f.q_len, f.kv_len, f.head_dim, f.v_head_dim, f.q_heads, f.kv_heads) == (5, 7, 8, 16, 4, 2)
    assert f.grouped_heads and f.enable_gqa and not f.kv_batch_broadcast
    assert f.mask_kind == MASK_NONE and f.dropout_p == 0.1 and f.scale == 0.5
    assert f.dtype == torch.float64 and f.device_type == "cpu" and not f.needs_grad


def test_facts_mask_kinds_and_grad():
    q = rand(1, 2, 3, 4, requires_grad=True)
    assert facts_of(q, q, q, torch.ones(3, 3, dtype=torch.bool)).mask_kind == MASK_BOOL
    add = facts_of(q, q, q, rand(2, 3, 3, requires_grad=True))
    assert add.mask_kind == MASK_ADDITIVE and add.mask_shape == (2, 3, 3) and add.mask_requires_grad
    assert add.needs_grad
    with torch.no_grad():
        assert not facts_of(q, q, q).needs_grad


def test_describe_names_what_matters():
    q = rand(2, 3, 5, 8)
    text = facts_of(q, q, q, rand(3, 5, 5), 0.0, False, 1.0).describe()
    assert "query(2, 3, 5, 8)" in text and "additive attn_mask(3, 5, 5)" in text and "scale=1" in text


@pytest.mark.parametrize(
    "qshape,mshape",
    [((5, 8), (5, 5)), ((6, 5, 8), (6, 5, 5)), ((6, 5, 8), (5, 5)), ((2, 3, 4, 5, 8), (2, 3, 4, 5, 5)),
     ((2, 3, 4, 5, 8), (4, 5, 5)), ((2, 3, 4, 5, 8), (1, 3, 1, 5, 5)), ((2, 3, 4, 5, 8), None)],
)
def test_to_4d_keeps_sdpa_semantics(qshape, mshape):
    q, k, v = rand(*qshape, seed=1), rand(*qshape, seed=2), rand(*qshape, seed=3)
    m = None if mshape is None else rand(*mshape, seed=4)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m)
    q4, k4, v4, m4, restore = to_4d(q, k, v, m)
    assert q4.dim() == 4 and (m4 is None or m4.dim() == 4)
    out = restore(torch.nn.functional.scaled_dot_product_attention(q4, k4, v4, attn_mask=m4))
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected)
    facts4 = facts_of(q, k, v, m).as_4d()
    assert facts4.q_shape == tuple(q4.shape)
    assert m4 is None or facts4.mask_shape == tuple(m4.shape)


def test_to_4d_is_a_view_for_contiguous_inputs():
    q = rand(2, 3, 4, 5, 8)
    q4, *_ = to_4d(q, q, q, None)
    assert q4.data_ptr() == q.data_ptr() and q4._base is not None


def test_broadcast_agrees_with_torch():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from attnswap.call import broadcast

    shape = st.lists(st.sampled_from([1, 2, 3]), max_size=4).map(tuple)

    @settings(max_examples=300, deadline=None)
    @given(st.lists(shape, min_size=1, max_size=3))
    def check(shapes):
        try:
            expected = tuple(torch.broadcast_shapes(*shapes))
        except RuntimeError:
            expected = None
        assert broadcast(*shapes) == expected

    check()
