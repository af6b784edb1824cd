"""torch.compile traces every ACmix backbone through the registered ops.

``fullgraph=True`` turns any graph break into an error. The ``aot_eager``
backend runs Dynamo and AOTAutograd (the ops' fake implementations and
their registered backward) without generating code, so each case takes
seconds instead of the minute a cold Inductor compile takes on two cores.

Each backbone is traced twice: as installed, and as where mmacmix was
built without its compiled CPU kernel, whose fallback warns once at
dispatch (inside the op, which Dynamo does not trace).
"""

import copy
import importlib
import warnings

import pytest
import torch

from mmacmix.models import (
    ACmixPVT,
    ACmixResNet,
    ACmixSAN,
    ACmixSwinTransformer,
)
from mmacmix.models.resnet import Bottleneck
from mmacmix.ops import native as native_module
from mmacmix.ops import native_available

# The package exports the function under the module's name: the module is
# fetched by import_module.
local_attention_module = importlib.import_module('mmacmix.ops.local_attention')


class TinyACmixResNet(ACmixResNet):
    """One block a stage: every kind of ACmix op (strides 1 and 2) at a
    fraction of the tracing time."""

    arch_settings = {14: (Bottleneck, (1, 1, 1, 1))}


# Small variants of each backbone, traced at an odd input size: ceil-mode
# strides and reflection at the borders.
SIZE = (45, 61)
BACKBONES = {
    'resnet': lambda: TinyACmixResNet(depth=14, out_indices=(1, 3)),
    'swin': lambda: ACmixSwinTransformer(
        arch=dict(embed_dims=16, depths=(2, 2), num_heads=(1, 2)),
        out_indices=(0, 1),
        drop_path_rate=0.0,
    ),
    'san': lambda: ACmixSAN(
        arch=dict(blocks=(1, 1, 1, 1, 1), kernel_sizes=(3, 3, 5, 3, 3)),
        out_indices=(0, 1),
    ),
    'pvt': lambda: ACmixPVT(
        arch=dict(
            embed_dims=(8, 16, 40, 64),
            depths=(1, 1, 1, 1),
            num_heads=(1, 2, 5, 8),
        ),
        out_indices=(0, 3),
        drop_path_rate=0.0,
    ),
}


def compiled_matches_eager(build, size=SIZE) -> None:
    torch.manual_seed(0)
    model = build()
    model.init_weights()
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(
        compiled_model, fullgraph=True, backend='aot_eager'
    )
    x = torch.randn(2, 3, *size)

    def run(module):
        outs = module(x)
        # Weighted sums, so that the gradients differ per position.
        loss = sum(
            (o * torch.linspace(0, 1, o.numel()).view_as(o)).sum()
            for o in outs
        )
        loss.backward()
        return [o.detach() for o in outs]

    # Compiled first: the fallback's one-time warning is still pending
    # when Dynamo traces the model.
    got, expected = run(compiled), run(model)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() < 1e-4 * max(1.0, b.abs().max())
    grads = dict(model.named_parameters())
    for name, parameter in compiled_model.named_parameters():
        reference = grads[name].grad
        if reference is None:
            assert parameter.grad is None, name
            continue
        error = (parameter.grad - reference).abs().max().item()
        assert error < 1e-4 * max(1.0, reference.abs().max().item()), name


def test_compiled_acmix_resnet_matches_eager_without_graph_breaks():
    compiled_matches_eager(
        lambda: ACmixResNet(depth=26, out_indices=(1, 3)), (45, 61)
    )


@pytest.mark.parametrize('name', sorted(BACKBONES))
def test_compiles_without_the_compiled_kernel(name, monkeypatch):
    torch._dynamo.reset()
    monkeypatch.setattr(local_attention_module, '_ext', None)
    monkeypatch.setattr(native_module, '_warned_ops', set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        compiled_matches_eager(BACKBONES[name])
    fallback = [
        w for w in caught if 'without its compiled extension' in str(w.message)
    ]
    # Only ACmix-ResNet runs the local attention; it warns once.
    assert len(fallback) == (name == 'resnet')
    assert not native_available()
    torch._dynamo.reset()
