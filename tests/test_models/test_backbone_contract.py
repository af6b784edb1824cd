"""The backbone contract, checked for every registered backbone.

What mmdet and mmseg expect of a backbone, as timm checks every model of
its registry in one parametrised test: NCHW maps at strides 4 to 32 for
any input size, ``out_indices`` choosing them, a checked input, a gradient
on every parameter, ``with_cp`` computing the same outputs and gradients,
``frozen_stages`` and ``norm_eval`` surviving ``train()``, and a strict
reload of the saved weights through ``init_cfg``. Each backbone is built
small (:data:`SPECS`); a backbone registered without an entry there fails
:func:`test_every_registered_backbone_is_covered`.
"""

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from model_helpers import randomise
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from mmacmix.registry import MODELS

NORMS = (_BatchNorm, nn.LayerNorm, nn.GroupNorm)


def resnet_groups(model: nn.Module) -> list[list[str]]:
    return [['conv1', 'bn1']] + [[f'layer{i}'] for i in range(1, 5)]


def san_groups(model: nn.Module) -> list[list[str]]:
    # SAN's stage 0 (stride 2) belongs to the stem.
    stem = ['conv_in', 'bn_in', 'conv0', 'layer0', 'bn0']
    stages = [[f'conv{i}', f'layer{i}', f'bn{i}'] for i in range(1, 5)]
    return [stem] + stages


def swin_groups(model: nn.Module) -> list[list[str]]:
    # An output norm exists (and is frozen with its stage) for the stages
    # in out_indices.
    stages = [
        [f'layers.{i}'] + ([f'norm{i}'] if hasattr(model, f'norm{i}') else [])
        for i in range(4)
    ]
    return [['patch_embed', 'drop_after_pos']] + stages


def pvt_groups(model: nn.Module) -> list[list[str]]:
    # frozen_stages=0 freezes the first patch embedding alone; stage i
    # freezes all of layers.i (patch embedding, position, blocks, norm).
    return [['layers.0.0']] + [[f'layers.{i}'] for i in range(4)]


@dataclass
class Spec:
    """How to build one backbone small, and what it must give.

    Args:
        kwargs: Constructor arguments (besides the contract's own).
        channels: Output channels of the four stages.
        groups: Module names of the stem and of each stage, in the order
            ``frozen_stages`` freezes them.
        block: A module of stage ``i`` (0-based) that is not a norm.
        norm: A normalisation layer of stage ``i``.
        extra: Arguments that make every parameter live (no zeroed
            residual ends, no dropped paths).
        full: A full-size build and its channels, whose shapes are checked
            as well (the small build's blocks or windows differ). Defaults
            to None.
        init: How the gradient test starts: ``'init_weights'`` (the
            model's own initialisation) or ``'random'`` (``randomise``:
            distinct values, no one-hot kernel or unit norm, so that a
            permuted channel would show). Defaults to ``'init_weights'``.
    """

    kwargs: dict
    channels: tuple[int, ...]
    groups: Callable[[nn.Module], list[list[str]]]
    block: Callable[[nn.Module, int], nn.Module]
    norm: Callable[[nn.Module, int], nn.Module]
    extra: dict = field(default_factory=dict)
    full: tuple[dict, tuple[int, ...]] | None = None
    init: str = 'init_weights'


SWIN_SMALL = dict(embed_dims=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))
PVT_SMALL = dict(
    embed_dims=(8, 16, 40, 64), depths=(2, 2, 1, 1), num_heads=(1, 2, 5, 8)
)
SAN_SMALL = dict(blocks=(1, 1, 1, 1, 1), kernel_sizes=(3, 3, 3, 3, 3))

SPECS = {
    'ACmixResNet': Spec(
        dict(depth=26),
        (256, 512, 1024, 2048),
        resnet_groups,
        lambda m, i: m.res_layers[i][0],
        lambda m, i: m.res_layers[i][0].bn1,
        dict(zero_init_residual=False),
    ),
    'XVolutionResNet': Spec(
        # X-volutions in every stage, so that each stage's branch norms are
        # under the contract too.
        dict(depth=18, xvolution_stages=(True,) * 4),
        (64, 128, 256, 512),
        resnet_groups,
        lambda m, i: m.res_layers[i][0],
        lambda m, i: m.res_layers[i][0].conv1.pssa_bn,
        dict(zero_init_residual=False),
        # Bottlenecks, X-volution in stage 3 alone (the paper's choice).
        full=(dict(depth=50), (256, 512, 1024, 2048)),
    ),
    'ACmixSwinTransformer': Spec(
        dict(arch=SWIN_SMALL),
        (32, 64, 128, 256),
        swin_groups,
        lambda m, i: m.layers[i].blocks[0],
        lambda m, i: m.layers[i].blocks[0].norm1,
        dict(drop_path_rate=0.0),
        init='random',
    ),
    'ACmixPVT': Spec(
        dict(arch=PVT_SMALL),
        PVT_SMALL['embed_dims'],
        pvt_groups,
        lambda m, i: m.layers[i][1][1],
        lambda m, i: m.layers[i][1][1].norm1,
        dict(drop_path_rate=0.0),
        init='random',
    ),
    'ACmixSAN': Spec(
        dict(arch=SAN_SMALL),
        (256, 512, 1024, 2048),
        san_groups,
        lambda m, i: getattr(m, f'layer{i + 1}')[0],
        lambda m, i: getattr(m, f'layer{i + 1}')[0].bn1,
        dict(zero_init_residual=False),
        # 7x7 windows, wider than the smallest maps.
        full=(dict(arch=10), (256, 512, 1024, 2048)),
    ),
}
NAMES = sorted(SPECS)


def build(name: str, full: bool = False, **kwargs) -> nn.Module:
    """The backbone as a config builds it: through the registry."""
    torch.manual_seed(0)
    spec = SPECS[name]
    base = spec.full[0] if full else spec.kwargs
    return MODELS.build(dict(type=f'mmacmix.{name}', **base, **kwargs))


SHAPE_CASES = [(name, False) for name in NAMES] + [
    (name, True) for name in NAMES if SPECS[name].full is not None
]


def inside(name: str, modules: list[str]) -> bool:
    """Whether module or parameter ``name`` lies in one of ``modules``."""
    return any(name == m or name.startswith(f'{m}.') for m in modules)


def test_every_registered_backbone_is_covered():
    # Everything registered is an operator, built like nn.Conv2d (in and
    # out channels first), or a backbone, which must have a spec here.
    MODELS.import_from_location()
    backbones = {
        name
        for name, cls in MODELS.module_dict.items()
        if list(inspect.signature(cls).parameters)[:2]
        != ['in_channels', 'out_channels']
    }
    assert backbones == set(SPECS)


@pytest.mark.parametrize('name, full', SHAPE_CASES)
@pytest.mark.parametrize(
    'size', [(64, 64), (75, 53), (64, 95), (97, 131), (33, 47), (5, 3)]
)
def test_outputs_are_nchw_at_strides_4_to_32(name, full, size):
    spec = SPECS[name]
    channels = spec.full[1] if full else spec.channels
    model = build(name, full).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, *size))
    assert len(outs) == 4
    for stage, out in enumerate(outs):
        stride = 4 * 2**stage
        assert out.shape == (
            1,
            channels[stage],
            -(-size[0] // stride),
            -(-size[1] // stride),
        )
        assert out.is_contiguous() and torch.isfinite(out).all()


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('out_indices', [(1, 3), (0, 2, 3), (2,)])
def test_out_indices_select_stages(name, out_indices):
    model = build(name, out_indices=out_indices).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 32, 32))
    assert [o.shape[1] for o in outs] == [
        SPECS[name].channels[i] for i in out_indices
    ]
    assert [o.shape[2] for o in outs] == [32 // 4 // 2**i for i in out_indices]


@pytest.mark.parametrize('name', NAMES)
def test_stage_arguments_and_input_are_checked(name):
    # Empty out_indices are refused too (mmdet's ResNet asserts on them):
    # a backbone that returns nothing is a config mistake.
    for out_indices in [(4,), (-1,), ()]:
        with pytest.raises(ValueError, match=r'out_indices.*\[0, 4\)'):
            build(name, out_indices=out_indices)
    for frozen_stages in (-2, 5):
        with pytest.raises(ValueError, match=r'frozen_stages.*\[-1, 4\]'):
            build(name, frozen_stages=frozen_stages)
    model = build(name)
    with pytest.raises(ValueError, match=r'\(B, 3, H, W\).*\(3, 32, 32\)'):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match=r'\(B, 3, H, W\).*\(1, 1, 32, 32\)'):
        model(torch.randn(1, 1, 32, 32))


@pytest.mark.parametrize('name', NAMES)
def test_every_parameter_receives_a_gradient(name):
    model = build(name, **SPECS[name].extra)
    if SPECS[name].init == 'init_weights':
        model.init_weights()
    else:
        randomise(model)
    # An odd size: padded windows and patches, rounded-up strides.
    outs = model(torch.randn(2, 3, 45, 61))
    sum(o.square().mean() for o in outs).backward()
    silent = [
        n
        for n, p in model.named_parameters()
        if p.grad is None or not p.grad.any()
    ]
    assert not silent


@pytest.mark.parametrize('name', NAMES)
def test_with_cp_gives_the_same_outputs_and_gradients(name):
    kwargs = dict(out_indices=(1, 3), **SPECS[name].extra)
    plain = randomise(build(name, **kwargs))
    checkpointed = build(name, with_cp=True, **kwargs)
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 61, 45)
    outs, grads = [], []
    for model in (plain, checkpointed):
        out = model(x)
        sum((o * o.detach().sign()).mean() for o in out).backward()
        outs.append([o.detach() for o in out])
        grads.append({n: p.grad for n, p in model.named_parameters()})
    # Recomputing a block runs the same operations on the same inputs.
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)
    assert grads[0].keys() == grads[1].keys()
    for key, grad in grads[0].items():
        torch.testing.assert_close(
            grads[1][key], grad, atol=1e-6, rtol=1e-5, msg=key
        )


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('frozen_stages', [-1, 0, 2, 3, 4])
@pytest.mark.parametrize('norm_eval', [False, True])
def test_frozen_stages_and_norm_eval_survive_train(
    name, frozen_stages, norm_eval
):
    spec = SPECS[name]
    model = build(name, frozen_stages=frozen_stages, norm_eval=norm_eval)
    groups = spec.groups(model)
    frozen = [m for group in groups[: frozen_stages + 1] for m in group]
    for mode in (True, False, True):
        model.train(mode)
        for param_name, param in model.named_parameters():
            expected = not inside(param_name, frozen)
            assert param.requires_grad is expected, param_name
        for module_name, module in model.named_modules():
            expected = (
                mode
                and not inside(module_name, frozen)
                and not (norm_eval and isinstance(module, NORMS))
            )
            assert module.training is expected, module_name
    model.train()
    for stage in range(4):
        assert spec.block(model, stage).training is (stage >= frozen_stages)
        assert spec.norm(model, stage).training is (
            stage >= frozen_stages and not norm_eval
        )


@pytest.mark.parametrize('name', NAMES)
def test_saved_weights_reload_strictly_and_name_bad_keys(name, tmp_path):
    source = build(name, **SPECS[name].extra)
    with torch.no_grad():
        for param in source.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    state = {f'backbone.{k}': v for k, v in source.state_dict().items()}
    path = tmp_path / 'backbone.pth'
    torch.save({'state_dict': state}, path)
    init_cfg = dict(
        type='Pretrained', checkpoint=str(path), prefix='backbone.'
    )
    loaded = build(name, init_cfg=init_cfg, **SPECS[name].extra)
    loaded.init_weights()
    assert loaded.state_dict().keys() == source.state_dict().keys()
    x = torch.randn(2, 3, 37, 29)
    with torch.no_grad():
        # Train mode (batch statistics) keeps every backbone's outputs
        # finite; eval mode reads the loaded running statistics (where
        # stacked quadratic X-volutions with unit statistics may overflow,
        # equally in both).
        for mode in (True, False):
            outs = source.train(mode)(x), loaded.train(mode)(x)
            for a, b in zip(*outs, strict=True):
                assert torch.isfinite(a).all() or not mode
                torch.testing.assert_close(
                    a, b, rtol=0, atol=0, equal_nan=True
                )

    # A key missing, then one unknown: each is named.
    key = sorted(state)[len(state) // 2]
    missing = dict(state)
    missing.pop(key)
    torch.save({'state_dict': missing}, path)
    with pytest.raises(KeyError, match=key.removeprefix('backbone.')):
        build(name, init_cfg=init_cfg).init_weights()
    torch.save({'state_dict': {**state, 'backbone.extra': x}}, path)
    with pytest.raises(KeyError, match='extra'):
        build(name, init_cfg=init_cfg).init_weights()
