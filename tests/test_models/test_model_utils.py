"""The helpers every backbone family shares (mmacmix/models/utils.py)."""

import pytest
import torch
import torch.nn.functional as F

from mmacmix.models import ACmixPVT, ACmixSAN, ACmixSwinTransformer
from mmacmix.models.utils import PatchEmbed, conv_net_init_cfg, stage_flags


@pytest.mark.parametrize(
    'proj_name, eps', [('proj', 1e-5), ('projection', 1e-6)]
)
def test_patch_embed_pads_projects_and_normalises(proj_name, eps):
    torch.manual_seed(0)
    embed = PatchEmbed(3, 8, 4, eps=eps, proj_name=proj_name)
    assert set(embed.state_dict()) == {
        f'{proj_name}.weight',
        f'{proj_name}.bias',
        'norm.weight',
        'norm.bias',
    }
    x = torch.randn(2, 3, 13, 9)
    tokens, hw_shape = embed(x)
    # Written out: zero padding at the bottom and right to multiples of 4,
    # the strided projection, a layer norm over channels.
    conv = getattr(embed, proj_name)
    padded = F.pad(x, (0, 3, 0, 3))
    maps = F.conv2d(padded, conv.weight, conv.bias, stride=4)
    expected = F.layer_norm(
        maps.flatten(2).transpose(1, 2),
        (8,),
        embed.norm.weight,
        embed.norm.bias,
        eps,
    )
    assert hw_shape == (4, 3)
    assert torch.equal(tokens, expected)


def test_backbones_keep_their_patch_embedding_names_and_eps():
    # Converted checkpoints hold these keys and were computed with these
    # epsilons: the shared PatchEmbed keeps both per family.
    swin = ACmixSwinTransformer(
        arch=dict(embed_dims=16, depths=(2,), num_heads=(2,)),
        out_indices=(0,),
    )
    assert {'patch_embed.proj.weight', 'patch_embed.norm.bias'} <= set(
        swin.state_dict()
    )
    assert swin.patch_embed.norm.eps == 1e-5
    pvt = ACmixPVT(
        arch=dict(
            embed_dims=(8, 16, 40, 64), depths=(1,) * 4, num_heads=(1, 2, 5, 8)
        )
    )
    keys = set(pvt.state_dict())
    for stage in range(4):
        assert f'layers.{stage}.0.projection.weight' in keys
        assert pvt.layers[stage][0].norm.eps == 1e-6


def test_stage_flags_accept_four_booleans_only():
    assert stage_flags('x_stages', [True, False, True, False]) == (
        True,
        False,
        True,
        False,
    )
    for flags in [(True,) * 3, 'tttt', True, None]:
        with pytest.raises(ValueError, match=r'x_stages needs one flag'):
            stage_flags('x_stages', flags)
    with pytest.raises(ValueError, match='x_stages must hold True or False'):
        stage_flags('x_stages', (1, 0, 0, 1))


def test_default_init_cfg_is_fresh_and_shared_by_the_conv_backbones():
    first, second = conv_net_init_cfg(), conv_net_init_cfg()
    assert first == second and first is not second
    first[0]['layer'] = 'Linear'
    assert conv_net_init_cfg()[0]['layer'] == 'Conv2d'
    san = ACmixSAN(
        arch=dict(blocks=(1,) * 5, kernel_sizes=(3,) * 5), out_indices=(0,)
    )
    assert san.init_cfg == conv_net_init_cfg()
