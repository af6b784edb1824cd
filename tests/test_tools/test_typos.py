"""A typo in a config or a name gets the closest accepted names.

Each case runs a command in this process (as tests/test_tools/test_cli.py
does), checks the exit status, the one-line message and that nothing was
written, then applies the suggestion and checks that the command gets
past that error. Covered: unknown registry types (a wrong case, the
missing ``mmacmix.`` scope, mmdet's own builder), unknown backbone
arguments, config syntax errors (the config and a ``_base_`` of it), and
``python -m mmacmix.configs``.
"""

from pathlib import Path

import pytest
import torch
from test_cli import DEMO_CONFIG, error_line, listing, run, tool

from mmacmix import configs
from mmacmix.registry import (
    MODELS,
    accepted_arguments,
    closest,
    closest_types,
)


def write_config(folder: Path, backbone: str, name='typo.py') -> Path:
    """The demo's Mask R-CNN config with ``backbone`` merged in."""
    config = folder / name
    config.write_text(
        f'_base_ = {str(DEMO_CONFIG)!r}\n'
        f'model = dict(backbone=dict({backbone}))\n'
    )
    return config


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    """A checkpoint that fits no model: tools/test.py reads it, then
    builds the config's model to check it."""
    path = tmp_path / 'weights.pth'
    torch.save({'state_dict': {'weight': torch.zeros(1)}}, path)
    return path


def test_closest_ignores_case_and_puts_exact_matches_first():
    names = ['ACmixResNet', 'ACmixSAN', 'XVolutionResNet', 'ResNet']
    assert closest('acmixresnet', names) == ['ACmixResNet']
    assert closest('XvolutionResnet', names)[0] == 'XVolutionResNet'
    assert closest('Completely', names) == []


def test_missing_scope_is_suggested_with_the_scope():
    from mmdet.registry import MODELS as MMDET_MODELS
    from mmengine.registry import DefaultScope

    with DefaultScope.overwrite_default_scope('mmdet'):
        assert closest_types('ACmixResNet', MMDET_MODELS)[0] == (
            'mmacmix.ACmixResNet'
        )
        # mmdet's own names stay without a scope in an mmdet config.
        assert closest_types('MaskRCN', MMDET_MODELS)[0] == 'MaskRCNN'


@pytest.mark.parametrize(
    'typo, fixed, message',
    [
        (
            "type='mmacmix.ACmixResnet', depth=26",
            "type='mmacmix.ACmixResNet', depth=26",
            'error: mmacmix.ACmixResnet is not in the mmacmix::model '
            'registry; did you mean mmacmix.ACmixResNet?',
        ),
        (
            "type='ACmixResNet', depth=26",
            "type='mmacmix.ACmixResNet', depth=26",
            'error: ACmixResNet is not in the mmdet::model registry; did you '
            'mean mmacmix.ACmixResNet?',
        ),
        (
            'out_indice=(0, 1, 2, 3)',
            'out_indices=(0, 1, 2, 3)',
            "error: mmacmix.ACmixResNet has no argument 'out_indice'; did "
            'you mean out_indices?',
        ),
    ],
)
def test_config_typos_get_the_closest_name(
    typo, fixed, message, checkpoint, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, typo)
    before = listing(tmp_path)
    test_py = tool('test.py')
    code, err = run(test_py, [config, checkpoint], capsys)
    assert code == 1
    assert error_line(err) == message
    assert listing(tmp_path) == before
    # Following the suggestion: the model builds, and the next check (the
    # checkpoint's keys) is what fails now.
    write_config(tmp_path, fixed)
    code, err = run(test_py, [config, checkpoint], capsys)
    assert code == 1
    assert 'does not fit MaskRCNN' in error_line(err)
    assert listing(tmp_path) == before


def test_mmdet_building_our_scoped_type_gets_the_suggestion():
    """Outside our commands too: mmdet's builder, as mmdet's own tools
    use it, raises our registry's message."""
    from mmdet.registry import MODELS as MMDET_MODELS
    from mmengine.registry import DefaultScope

    with DefaultScope.overwrite_default_scope('mmdet'):
        with pytest.raises(KeyError) as error:
            MMDET_MODELS.build(dict(type='mmacmix.ACmixResnet', depth=26))
        assert 'did you mean mmacmix.ACmixResNet?' in str(error.value)
        assert 'mmacmix.ACmixResnet' not in MMDET_MODELS
        assert 'mmacmix.ACmixResNet' in MMDET_MODELS
    assert 'ACmixResnet' not in MODELS


def test_arguments_follow_kwargs_to_the_base_class():
    from mmacmix.models import ACmixResNet

    accepted = accepted_arguments(ACmixResNet)
    # ACmixResNet's own, then those it hands on to its base classes.
    for name in ('acmix_stages', 'depth', 'out_indices', 'init_cfg'):
        assert name in accepted
    assert 'kwargs' not in accepted and 'self' not in accepted


def test_get_flops_backbone_typo(capsys):
    main = tool('analysis/get_flops.py')
    code, err = run(main, ['--backbone', 'mmacmix.ACmixSwin'], capsys)
    assert code == 1
    assert error_line(err) == (
        'error: mmacmix.ACmixSwin is not in the mmacmix::model registry; '
        'did you mean mmacmix.ACmixSwinTransformer?'
    )


@pytest.mark.parametrize('in_base', [False, True])
def test_config_syntax_error_names_the_file_and_line(
    in_base, checkpoint, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    broken = tmp_path / ('base.py' if in_base else 'broken.py')
    broken.write_text(
        f'_base_ = {str(DEMO_CONFIG)!r}\n'
        'model = dict(\n'
        '    backbone=dict(depth=26]\n'
        ')\n'
    )
    config = broken
    if in_base:
        config = tmp_path / 'child.py'
        config.write_text("_base_ = './base.py'\n")
    before = listing(tmp_path)
    code, err = run(tool('test.py'), [config, checkpoint], capsys)
    assert code == 1
    assert error_line(err) == (
        f"error: config '{broken}', line 3: closing parenthesis ']' does "
        "not match opening parenthesis '(': backbone=dict(depth=26]"
    )
    assert listing(tmp_path) == before
    # Mended as the message says, the config is read and the model built.
    broken.write_text(broken.read_text().replace('26]', '26)'))
    code, err = run(tool('test.py'), [config, checkpoint], capsys)
    assert code == 1
    assert 'does not fit MaskRCNN' in error_line(err)


def test_syntax_error_outside_a_config_keeps_its_traceback(tmp_path):
    from mmacmix.cli import exit_on_error

    with pytest.raises(SyntaxError):
        with exit_on_error():
            compile('x = (', str(tmp_path / 'absent.py'), 'exec')


# python -m mmacmix.configs


def test_configs_list_shows_every_shipped_config(capsys):
    root = configs.config_root()
    expected = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob('*.py')
        if '_base_' not in p.parts
    )
    configs.main(['--list'])
    assert capsys.readouterr().out.split() == expected
    configs.main(['--list', 'upernet'])
    listed = capsys.readouterr().out.split()
    assert listed == [name for name in expected if 'upernet' in name]
    assert 'demo/acmix-r26_upernet_shapes.py' in listed


def test_configs_help_is_help_not_a_name(capsys):
    with pytest.raises(SystemExit) as exit_info:
        configs.main(['--help'])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith('usage: python -m mmacmix.configs')
    assert '--list' in out


@pytest.mark.parametrize(
    'name, suggestion',
    [
        (
            'demo/mask-rcnn_acmix-r26_fpn_shape.py',
            'demo/mask-rcnn_acmix-r26_fpn_shapes.py',
        ),
        (
            'mask-rcnn_acmix-r50_fpn_1x_coc',
            'acmix_resnet/mask-rcnn_acmix-r50_fpn_1x_coco.py',
        ),
    ],
)
def test_configs_near_miss_gets_suggestions(name, suggestion, capsys):
    code, err = run(configs.main, [name], capsys)
    assert code == 1
    line = error_line(err)
    assert f'error: {name!r} is not one config under ' in line
    assert f'did you mean {suggestion}' in line
    assert '--list shows them all' in line
    # The suggestion is a name the command accepts.
    configs.main([suggestion])
    printed = capsys.readouterr().out.strip()
    assert printed == str(configs.config_root() / suggestion)


def test_configs_example_in_messages_is_a_config():
    """The example that 'give its path below configs/' shows exists."""
    assert Path(configs.find_config(configs.EXAMPLE)).is_file()


def test_train_typo_fails_before_the_work_folder(tmp_path, capsys):
    """tools/train.py builds the model before the Runner: a typo is one
    line, and no work folder (nor its log) is made."""
    config = write_config(tmp_path, 'out_indice=(0, 1, 2, 3)')
    before = listing(tmp_path)
    code, err = run(
        tool('train.py'), [config, '--work-dir', tmp_path / 'work'], capsys
    )
    assert code == 1
    assert error_line(err) == (
        "error: mmacmix.ACmixResNet has no argument 'out_indice'; did you "
        'mean out_indices?'
    )
    assert listing(tmp_path) == before
