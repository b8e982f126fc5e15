"""`Conv1d` whose weight gradient on CPU is one matrix product (im2col GEMM) instead of oneDNN's
direct convolution kernel.

Why: in Diffusion Policy's U-Net the sequences are short (horizon 16 -> 8 -> 4) and the channels
wide (up to 1024 in). oneDNN runs the bf16 weight gradient of such a convolution with its direct
`avx512_core_bf16` kernel at ~1/5 of the forward's speed (512->512 channels, width 4, batch 64:
~14 ms vs ~1.3 ms forward, `ONEDNN_VERBOSE=1`), so it took half of a training step. The same
gradient as dW = dY · cols(X)ᵀ is one (C_out x B·T) @ (B·T x C_in·k) matrix product, which the
CPU's bf16 GEMM kernels run far faster. Forward and the input gradient stay oneDNN convolutions;
parameters, state dict, export and inference are those of `nn.Conv1d` (the GEMM path only runs when
a weight gradient is recorded on CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _ConvGemmWeightGrad(torch.autograd.Function):
    """y = conv1d(x, w, b, stride, padding) (dilation 1, groups 1); dW by GEMM in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, stride: int, padding: int) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        ctx.stride, ctx.padding, ctx.has_bias = stride, padding, b is not None
        return F.conv1d(x, w, b, stride, padding)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w = ctx.saved_tensors
        (c_out, c_in, k), s, p = w.shape, ctx.stride, ctx.padding
        gx = None
        if ctx.needs_input_grad[0]:
            gx = torch.ops.aten.convolution_backward(g, x, w, None, [s], [p], [1], False, [0], 1, [True, False, False])[0]
        B, _, t_out = g.shape
        cols = F.pad(x, (p, p)).unfold(2, k, s)[:, :, :t_out]  # (B, C_in, T_out, k): the window of each output
        cols = cols.permute(1, 3, 0, 2).reshape(c_in * k, B * t_out)
        gw = (g.transpose(0, 1).reshape(c_out, B * t_out) @ cols.t()).view(c_out, c_in, k)
        gb = g.sum((0, 2)) if ctx.has_bias else None
        return gx, gw, gb, None, None


class GemmGradConv1d(nn.Conv1d):
    """`nn.Conv1d` (zero padding, dilation 1, groups 1) with the CPU weight gradient as a GEMM.

    Under CPU autocast it casts input, weight and bias to the autocast dtype itself, as autocast does
    for `conv1d`, so the arithmetic is the same as `nn.Conv1d`'s."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.dilation != (1,) or self.groups != 1 or self.padding_mode != "zeros" or isinstance(self.padding, str):
            raise ValueError(f"GemmGradConv1d: dilation 1, groups 1, integer zero padding only (got {self})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or not (torch.is_grad_enabled() and self.weight.requires_grad):
            return super().forward(x)
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
        with torch.autocast("cpu", enabled=False):
            return _ConvGemmWeightGrad.apply(cast(x), cast(self.weight), cast(self.bias), self.stride[0], self.padding[0])
