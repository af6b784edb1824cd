"""torch.compile traces ACmix through the registered local-attention op.

``fullgraph=True`` turns any graph break into an error. The ``aot_eager``
backend runs Dynamo and AOTAutograd (the op's fake implementation and its
registered backward) without generating code, so the test takes seconds
instead of the minute a cold Inductor compile takes on two cores.
"""

import copy

import torch

from mmacmix.models import ACmixResNet


def test_compiled_acmix_resnet_matches_eager_without_graph_breaks():
    torch.manual_seed(0)
    model = ACmixResNet(depth=26, out_indices=(1, 3))
    model.init_weights()
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(
        compiled_model, fullgraph=True, backend='aot_eager'
    )
    # An odd size: ceil-mode strides and reflection at the borders.
    x = torch.randn(2, 3, 45, 61)

    def run(module):
        outs = module(x)
        # Weighted sums, so that the gradients differ per position.
        loss = sum(
            (o * torch.linspace(0, 1, o.numel()).view_as(o)).sum()
            for o in outs
        )
        loss.backward()
        return [o.detach() for o in outs]

    expected, got = run(model), run(compiled)
    for a, b in zip(got, expected):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() < 1e-4 * max(1.0, b.abs().max())
    grads = dict(model.named_parameters())
    for name, parameter in compiled_model.named_parameters():
        reference = grads[name].grad
        error = (parameter.grad - reference).abs().max().item()
        assert error < 1e-4 * max(1.0, reference.abs().max().item()), name
