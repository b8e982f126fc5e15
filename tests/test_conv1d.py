"""GemmGradConv1d: the gradients of nn.Conv1d, its weight gradient computed as a GEMM on CPU."""

import pytest
import torch
from torch import nn

from protege.policies.nets.conv1d import GemmGradConv1d


def _grads(conv: nn.Conv1d, x: torch.Tensor, autocast: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    conv.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = conv(x)
    (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), [x.grad, *(p.grad for p in conv.parameters())]


@pytest.mark.parametrize("c_in,c_out,k,stride,bias", [(6, 8, 5, 1, True), (16, 4, 3, 2, False), (3, 5, 1, 1, True)])
@pytest.mark.parametrize("autocast", [False, True])
def test_same_outputs_and_gradients_as_conv1d(c_in, c_out, k, stride, bias, autocast):
    torch.manual_seed(0)
    ref = nn.Conv1d(c_in, c_out, k, stride, padding=k // 2, bias=bias)
    ours = GemmGradConv1d(c_in, c_out, k, stride, padding=k // 2, bias=bias)
    ours.load_state_dict(ref.state_dict())  # same parameters, same state-dict keys
    x = torch.randn(7, c_in, 11)
    (y_ref, g_ref), (y, g) = _grads(ref, x, autocast), _grads(ours, x, autocast)
    assert y.dtype == y_ref.dtype and torch.equal(y, y_ref)  # forward is the same oneDNN convolution
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-5, atol=1e-5)
    for a, b in zip(g, g_ref, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **tol)


def test_without_gradient_it_is_a_plain_conv1d():
    conv = GemmGradConv1d(4, 4, 5, padding=2)
    x = torch.randn(2, 4, 9)
    with torch.no_grad():
        assert torch.equal(conv(x), nn.functional.conv1d(x, conv.weight, conv.bias, padding=2))
    with pytest.raises(ValueError, match="dilation 1"):
        GemmGradConv1d(4, 4, 3, dilation=2)
