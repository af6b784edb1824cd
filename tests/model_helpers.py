"""Model test helpers: distinct random weights for any backbone, and for
X-volution written-out references, norms with real statistics, small ops
and torchvision-style ResNets.

Shared by tests/test_models (the backbone contract, the X-volution op, the
backbones, the converters) and tests/test_tools (the converter CLI, the
reparameterize tool); pytest puts this folder on ``sys.path`` (it holds the
root conftest.py).
"""

import torch
import torch.nn.functional as F

from mmacmix.models import XVolution, XVolutionResNet


def randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Distinct random values everywhere: no one-hot kernel, no unit norm,
    no zeroed residual end, rates away from 0.5."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith(('rate1', 'rate2')):
                param.copy_(0.3 + 0.6 * torch.rand(1, generator=generator))
            elif 'norm' in name and name.endswith('weight'):
                param.copy_(1 + 0.2 * noise)
            else:
                param.copy_(0.2 * noise)
    return model


TRAINING_KEYS = {
    'conv.weight',
    'pssa.weight',
    *(
        f'{norm}.{name}'
        for norm in ('conv_bn', 'pssa_bn')
        for name in (
            'weight',
            'bias',
            'running_mean',
            'running_var',
            'num_batches_tracked',
        )
    ),
}
DEPLOY_KEYS = {'weight', 'dynamic_weight', 'bias'}


def randomize_norms(module: torch.nn.Module, seed: int = 0) -> None:
    """Gives every batch norm non-trivial statistics and affine terms."""
    generator = torch.Generator().manual_seed(seed)
    for norm in module.modules():
        if isinstance(norm, torch.nn.modules.batchnorm._BatchNorm):
            size = norm.num_features
            with torch.no_grad():
                norm.running_mean.copy_(torch.randn(size, generator=generator))
                norm.running_var.copy_(
                    torch.rand(size, generator=generator) * 1.5 + 0.5
                )
                norm.weight.copy_(torch.randn(size, generator=generator))
                norm.bias.copy_(torch.randn(size, generator=generator))


def reference(op: XVolution, x: torch.Tensor) -> torch.Tensor:
    """The training form in eval mode, written pixel by pixel.

    conv: sum over taps of W[o, c, t] x[c, p + L t]; PSSA: sum over taps
    (the 8 neighbours at distance L and the pixel itself) and channels of
    A[o, c * 9 + t] x[c, p] x[c, p + L t]; zero outside the map; each
    branch through its batch norm (eval), then summed.
    """
    _, channels, height, width = x.shape
    step, dist = op.stride, op.dilation
    out_h, out_w = -(-height // step), -(-width // step)
    kernel = op.conv.weight
    pssa = op.pssa.weight.reshape(op.out_channels, channels, 9)
    conv = x.new_zeros(x.shape[0], op.out_channels, out_h, out_w)
    attn = torch.zeros_like(conv)
    for i in range(out_h):
        for j in range(out_w):
            y, xx = i * step, j * step
            centre = x[:, :, y, xx]
            for tap in range(9):
                dy, dx = tap // 3 - 1, tap % 3 - 1
                yy, xs = y + dy * dist, xx + dx * dist
                if not (0 <= yy < height and 0 <= xs < width):
                    continue
                other = x[:, :, yy, xs]
                conv[:, :, i, j] += other @ kernel[:, :, dy + 1, dx + 1].T
                attn[:, :, i, j] += (centre * other) @ pssa[:, :, tap].T
    if op.conv.bias is not None:
        conv = conv + op.conv.bias.reshape(1, -1, 1, 1)
    return eval_norm(op.conv_bn, conv) + eval_norm(op.pssa_bn, attn)


def eval_norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A batch norm in eval mode, written out with its running statistics."""
    return F.batch_norm(
        x,
        norm.running_mean,
        norm.running_var,
        norm.weight,
        norm.bias,
        False,
        0.0,
        norm.eps,
    )


def calibrate(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Random norm scales and shifts, then running statistics measured on
    ``x``: non-trivial, yet the magnitudes a trained network has (random
    statistics blow up through stacked quadratic PSSA branches)."""
    generator = torch.Generator().manual_seed(0)
    for norm in model.modules():
        if isinstance(norm, torch.nn.modules.batchnorm._BatchNorm):
            size = norm.num_features
            norm.momentum = None  # running statistics = those of x
            with torch.no_grad():
                norm.weight.copy_(torch.rand(size, generator=generator) + 0.5)
                norm.bias.copy_(torch.randn(size, generator=generator) * 0.1)
    with torch.no_grad():
        model.train()(x)
    model.eval()


def random_op(dtype=torch.float32, **kwargs) -> XVolution:
    torch.manual_seed(0)
    op = XVolution(**{'in_channels': 5, 'out_channels': 4, **kwargs})
    if kwargs.get('attention') == 'global':
        # Logits of order one: the softmax is neither flat nor one-hot.
        with torch.no_grad():
            op.attn.qkv.weight.mul_(4)
    randomize_norms(op)
    return op.to(dtype).eval()


def torchvision_resnet(
    depth: int, seed: int = 0
) -> tuple[dict, torch.nn.Module]:
    """A torchvision-style ResNet state dict (with ``fc``) and the model."""
    torch.manual_seed(seed)
    plain = XVolutionResNet(depth=depth, xvolution_stages=(False,) * 4)
    calibrate(plain, torch.randn(2, 3, 32, 32))
    state = dict(plain.state_dict())
    width = plain.out_channels[-1]
    state['fc.weight'] = torch.randn(1000, width)
    state['fc.bias'] = torch.randn(1000)
    return state, plain.eval()
