"""The oneDNN GEMM path of the dense linears (model.cpu_gemm) against torch's F.linear."""
import pytest
import torch
import torch.nn.functional as F

from moe_dist.model import MoETransformerLM
from moe_dist.model.gemm import Linear, linear, onednn_available

pytestmark = pytest.mark.skipif(not onednn_available(), reason="no oneDNN in this torch")


@pytest.mark.parametrize("rows", [0, 5, 64, 150])  # none (oneDNN refuses those), below, at and above OneDNNGemm.ROWS
@pytest.mark.parametrize("bias", [False, True])
def test_onednn_linear_equals_f_linear(rows, bias):
    torch.manual_seed(0)
    x = torch.randn(2, rows, 24, requires_grad=True)
    w = torch.randn(40, 24, requires_grad=True)
    b = torch.randn(40, requires_grad=True) if bias else None
    g = torch.randn(2, rows, 40)
    leaves = [t for t in (x, w, b) if t is not None]
    ours = [linear(x, w, b, "onednn"), *torch.autograd.grad(linear(x, w, b, "onednn"), leaves, g)]
    ref = [F.linear(x, w, b), *torch.autograd.grad(F.linear(x, w, b), leaves, g)]
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-4)  # sums of ~300 products of size ~1


def test_model_on_onednn_equals_model_on_torch():
    """Every dense linear of the model (attention, dense FFN, shared experts, LM head) follows
    model.cpu_gemm; logits and all gradients match torch's matmuls."""
    kw = dict(d_model=32, n_head=4, vocab_size=97, max_seq_len=80, d_ff=48, n_layer=3, n_experts=4, top_k=2,
              first_k_dense=1, n_shared_experts=1, qkv_bias=True, grouped_mm="loop")
    ids = torch.randint(0, 97, (2, 80))
    outs = {}
    for gemm in ("torch", "onednn"):
        torch.manual_seed(0)
        model = MoETransformerLM(cpu_gemm=gemm, **kw)
        assert {m.gemm for m in model.modules() if isinstance(m, Linear)} == {gemm}
        logits = model(ids)
        logits.square().mean().backward()
        outs[gemm] = (logits.detach(), {n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(outs["onednn"][0], outs["torch"][0], rtol=1e-5, atol=1e-5)
    for name, grad in outs["torch"][1].items():
        torch.testing.assert_close(outs["onednn"][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_onednn_isa_limit_is_read():
    from moe_dist.model.gemm import _avx512_allowed

    assert _avx512_allowed("") and _avx512_allowed("AVX512_CORE") and _avx512_allowed("ALL")
    assert _avx512_allowed("AVX512_CORE_AMX") and _avx512_allowed("AVX10_1_512")
    assert not _avx512_allowed("AVX2") and not _avx512_allowed("avx2_vnni") and not _avx512_allowed("SSE41")
