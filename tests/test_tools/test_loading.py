"""Every path that loads weights checks them strictly, and every hint about
loading works when followed (issue 25, items 1, 3 and 5).

Each case runs a command as a user would (its ``main``, in this process),
checks the exit status, the one-line message and that nothing was
written, then applies what the message suggests and checks that the
command gets past that error. Training itself is replaced by what a run
does before its first iteration (initialise the weights, then load or
resume), so each case takes seconds.
"""

import re
import socket
import urllib.error
from pathlib import Path

import mmengine.config.config
import pytest
import torch
from cli_helpers import error_line, listing, run, tool
from mmdet.models.backbones import ResNet
from mmengine.runner import CheckpointLoader
from mmengine.runner.checkpoint import load_from_local
from model_helpers import torchvision_resnet

import mmacmix.deploy
from mmacmix.apis import (
    CheckedRunner,
    FlushDenormalHook,
    add_project_hooks,
    build_model,
    build_runner,
    load_config,
)
from mmacmix.apis.hooks import flushing_denormals
from mmacmix.checkpoint import (
    DownloadError,
    KeyMismatchError,
    fetch_pretrained,
    resolve_url,
)
from mmacmix.models import ACmixResNet, XVolutionResNet
from mmacmix.models.utils import load_pretrained

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / 'configs/demo/mask-rcnn_acmix-r26_fpn_shapes.py'
DROP_IN = REPO / 'configs/drop_in/mask-rcnn_r50-acmix-c3-c5_fpn_1x_coco.py'
# The demo detector with an X-volution ResNet-18 backbone.
XVOLUTION_CONFIG = f"""
_base_ = {str(DEMO_CONFIG)!r}
model = dict(
    backbone=dict(_delete_=True, type='mmacmix.XVolutionResNet', depth=18,
                  out_indices=(1, 2, 3)),
    neck=dict(in_channels=[128, 256, 512]))
"""


def suggested(line: str, after: str, until: str) -> list[str]:
    """The words the message suggests between ``after`` and the regular
    expression ``until``."""
    match = re.search(re.escape(after) + '(.*?)' + until, line)
    assert match, line
    return match.group(1).split()


@pytest.fixture
def up_to_training(monkeypatch):
    """``runner.train()`` does, of what precedes the first iteration, what
    touches the weights: the backbone's ``init_weights`` if it loads
    pretrained weights (the random init of the rest is skipped for time),
    then ``load_from`` or ``resume``. ``runner.test()`` only loads."""

    def start(self):
        if 'Pretrained' in str(self.model.backbone.init_cfg):
            self.model.backbone.init_weights()
        self.load_or_resume()
        return self.model

    def start_test(self):
        self.load_or_resume()
        return {}

    monkeypatch.setattr(CheckedRunner, 'train', start)
    monkeypatch.setattr(CheckedRunner, 'test', start_test)
    # The Runner formats its config with yapf three times (seconds); these
    # tests read none of the copies it writes.
    monkeypatch.setattr(
        mmengine.config.config, 'FormatCode', lambda text, **_: (text, None)
    )


@pytest.fixture(scope='module')
def detector() -> torch.nn.Module:
    return build_model(load_config(str(DEMO_CONFIG)))


def assert_same(module: torch.nn.Module, state: dict, prefix: str = ''):
    own = module.state_dict()
    for key, value in state.items():
        assert torch.equal(own[prefix + key], value), key


def test_foreign_checkpoint_through_load_from(
    tmp_path, capsys, monkeypatch, up_to_training
):
    monkeypatch.chdir(tmp_path)
    foreign = tmp_path / 'resnet18.pth'
    torch.save(torchvision_resnet(18)[0], foreign)
    before = listing(tmp_path)
    train = tool('train.py')
    args = [DEMO_CONFIG, '--work-dir', tmp_path / 'work']
    load_from = ['--cfg-options', f'load_from={foreign}']
    code, err = run(train, args + load_from, capsys)
    assert code == 1
    line = error_line(err)
    assert f'{foreign} does not fit MaskRCNN: ' in line
    assert (
        'It seems to hold a plain ResNet classifier; the model is an ACmix '
        'ResNet detector. No converter makes ACmix ResNet weights from it '
        '(tools/model_converters/acmix_resnet2mmacmix.py reads the official '
        'ACmix-ResNet ImageNet weights): train from scratch without it'
    ) in line
    assert listing(tmp_path) == before
    # Followed: without the file the run starts.
    assert run(train, args, capsys)[0] == 0
    # --non-strict: what fits is loaded (nothing here), as MMEngine does.
    code, _ = run(train, args + load_from + ['--non-strict'], capsys)
    assert code == 0


def test_resume_advice_for_weights_without_training_state(
    tmp_path, capsys, monkeypatch, detector, up_to_training
):
    monkeypatch.chdir(tmp_path)
    weights = tmp_path / 'weights.pth'
    torch.save({'state_dict': detector.state_dict()}, weights)
    train = tool('train.py')
    args = [DEMO_CONFIG, '--work-dir', tmp_path / 'work']
    before = listing(tmp_path)
    code, err = run(train, args + ['--resume', weights], capsys)
    assert code == 1
    line = error_line(err)
    assert 'holds no training state' in line
    option = suggested(line, 'use --cfg-options ', ' instead of --resume')
    assert option == [f'load_from={weights}']
    assert listing(tmp_path) == before
    code, _ = run(train, args + ['--cfg-options', *option], capsys)
    assert code == 0
    assert_same(run.result.model, detector.state_dict())


@pytest.mark.parametrize('prefixed', [True, False])
def test_backbone_alone_hints_work(
    prefixed, tmp_path, capsys, monkeypatch, detector, up_to_training
):
    """tools/test.py and --resume with a backbone (keys with or without
    ``backbone.``): the suggested pretrained weights then load."""
    monkeypatch.chdir(tmp_path)
    backbone = detector.backbone.state_dict()
    prefix = 'backbone.' if prefixed else ''
    path = tmp_path / 'backbone.pth'
    torch.save(
        {'state_dict': {prefix + k: v for k, v in backbone.items()}}, path
    )
    before = listing(tmp_path)
    work = ['--work-dir', tmp_path / 'work']
    code, err = run(tool('test.py'), [DEMO_CONFIG, path, *work], capsys)
    assert code == 1
    line = error_line(err)
    command = suggested(
        line, 'start from it as pretrained backbone weights: ', ';'
    )
    assert command[:3] == ['tools/train.py', str(DEMO_CONFIG), '--cfg-options']
    assert ('model.backbone.init_cfg.prefix=backbone.' in command) == prefixed
    code, err = run(
        tool('train.py'), [DEMO_CONFIG, '--resume', path, *work], capsys
    )
    assert code == 1
    assert 'holds no training state' in error_line(err)
    assert 'It does not fit the model either' in error_line(err)
    assert ' '.join(command) in error_line(err)
    assert listing(tmp_path) == before
    code, _ = run(tool('train.py'), command[1:] + work, capsys)
    assert code == 0
    assert_same(run.result.model.backbone, backbone)


def test_plain_resnet_converter_hint_works(
    tmp_path, capsys, monkeypatch, up_to_training
):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / 'xvolution.py'
    config.write_text(XVOLUTION_CONFIG)
    foreign = tmp_path / 'resnet18.pth'
    torch.save(torchvision_resnet(18)[0], foreign)
    work = ['--work-dir', tmp_path / 'work']
    load_from = ['--cfg-options', f'load_from={foreign}']
    code, err = run(tool('train.py'), [config, *load_from, *work], capsys)
    assert code == 1
    line = error_line(err)
    convert = suggested(line, 'Convert it with ', ' and start from OUT')
    assert convert == [
        'tools/model_converters/resnet2xvolution.py',
        'FILE',
        'OUT',
    ]
    command = suggested(line, 'and start from OUT: ', '$')
    converted = tmp_path / 'converted.pth'
    converter = tool(convert[0].removeprefix('tools/'))
    assert run(converter, [foreign, converted], capsys)[0] == 0
    command = [w.replace('=OUT', f'={converted}') for w in command]
    code, _ = run(tool('train.py'), command[1:] + work, capsys)
    assert code == 0
    loaded = run.result.model.backbone.state_dict()
    assert torch.equal(
        loaded['conv1.weight'], torch.load(foreign)['conv1.weight']
    )


def test_deploy_hints_work(tmp_path, capsys, monkeypatch, up_to_training):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / 'xvolution.py'
    config.write_text(
        "custom_imports = dict(imports=['mmacmix'])\n"
        "model = dict(type='mmacmix.XVolutionResNet', depth=18)\n"
    )
    trained = XVolutionResNet(depth=18)
    torch.save({'state_dict': trained.state_dict()}, tmp_path / 'trained.pth')
    trained.switch_to_deploy()
    torch.save({'state_dict': trained.state_dict()}, tmp_path / 'deployed.pth')
    test = tool('test.py')
    before = listing(tmp_path)
    work = ['--work-dir', tmp_path / 'work']
    code, err = run(test, [config, 'deployed.pth', *work], capsys)
    assert code == 1
    options = suggested(error_line(err), 'add --cfg-options ', r'\.$')
    assert options == ['model.deploy=True']
    code, err = run(
        test, [config, 'trained.pth', *work, '--cfg-options', *options], capsys
    )
    assert code == 1
    assert 'drop deploy=True' in error_line(err)
    assert listing(tmp_path) == before
    code, _ = run(
        test,
        [config, 'deployed.pth', *work, '--cfg-options', *options],
        capsys,
    )
    assert code == 0
    code, _ = run(test, [config, 'trained.pth', *work], capsys)
    assert code == 0


def test_pretrained_prefix_hints_work(tmp_path):
    model = ACmixResNet(depth=26)
    state = model.state_dict()
    whole = tmp_path / 'whole.pth'
    torch.save(
        {'state_dict': {f'backbone.{k}': v for k, v in state.items()}}, whole
    )
    bare = tmp_path / 'bare.pth'
    torch.save(state, bare)
    with pytest.raises(KeyMismatchError) as error:
        load_pretrained(ACmixResNet(depth=26), str(whole))
    assert "load it with prefix='backbone.'" in str(error.value)
    loaded = ACmixResNet(depth=26)
    load_pretrained(loaded, str(whole), 'backbone.')
    assert_same(loaded, state)
    with pytest.raises(KeyMismatchError) as error:
        load_pretrained(ACmixResNet(depth=26), str(bare), 'backbone.')
    assert (
        'give one of these as prefix, or none if the file holds this '
        'module alone' in str(error.value)
    )
    loaded = ACmixResNet(depth=26)
    load_pretrained(loaded, str(bare), None)
    assert_same(loaded, state)


@pytest.fixture
def offline(tmp_path_factory, monkeypatch):
    """No network, and an empty download cache."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path_factory.mktemp('torch')))
    calls = []

    def fail(url, path, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError(
            socket.gaierror(-2, 'Name or service not known')
        )

    monkeypatch.setattr(torch.hub, 'download_url_to_file', fail)
    return calls


def test_export_names_the_url_it_needs(tmp_path, capsys, monkeypatch, offline):
    monkeypatch.chdir(tmp_path)
    url = resolve_url('torchvision://resnet50')
    exported = []
    # Exporting itself is tested in test_cli.py and test_export.py.
    monkeypatch.setattr(
        mmacmix.deploy,
        'export_onnx',
        lambda model, *a, **k: exported.append(model) or {},
    )
    main = tool('deploy/export_onnx.py')
    before = listing(tmp_path)
    code, err = run(main, [DROP_IN, 'out.onnx'], capsys)
    assert code == 1
    line = error_line(err)
    assert line.startswith(
        f'error: torchvision://resnet50 ({url}), the init_cfg of the '
        'backbone, could not be downloaded ([Errno -2] Name or service '
        'not known): pass a CHECKPOINT to export, or --cfg-options '
        'model.backbone.init_cfg=None to export random weights'
    )
    assert offline == [url]
    assert not exported
    assert listing(tmp_path) == before
    options = suggested(line, 'or --cfg-options ', ' to export')
    code, _ = run(
        main, [DROP_IN, 'out.onnx', '--cfg-options', *options], capsys
    )
    assert code == 0
    [model] = exported
    assert type(model) is ResNet
    assert 'Pretrained' not in str(model.init_cfg)  # mmdet's default init
    assert offline == [url]


def test_a_cached_download_is_read_offline(offline):
    cfg = load_config(str(DROP_IN))
    with pytest.raises(DownloadError) as error:
        fetch_pretrained(cfg.model)
    cached = Path(error.value.path)
    assert str(error.value).endswith(f'copy that file to {cached}')
    torch.save(ResNet(depth=50).state_dict(), cached)
    fetch_pretrained(cfg.model)  # the copy is read, nothing downloaded
    assert len(offline) == 1


# build_runner builds; the project's hooks are named in the config.


def test_build_runner_only_builds(tmp_path):
    cfg = load_config(str(DEMO_CONFIG), work_dir=str(tmp_path / 'work'))
    flushing = flushing_denormals()
    runner = build_runner(cfg)
    assert flushing_denormals() == flushing
    assert CheckpointLoader._schemes[''] is load_from_local
    names = {type(hook).__name__ for hook in runner.hooks}
    assert 'CheckpointHook' in names
    assert not names & {'AtomicCheckpointHook', 'ExactResumeHook'}
    assert cfg.default_hooks.checkpoint.type == 'CheckpointHook'

    assert add_project_hooks(cfg) is cfg
    add_project_hooks(cfg)  # naming them twice adds nothing
    assert cfg.default_hooks.checkpoint.type == 'mmacmix.AtomicCheckpointHook'
    assert [hook['type'] for hook in cfg.custom_hooks] == [
        'mmacmix.ExactResumeHook',
        'mmacmix.FlushDenormalHook',
    ]
    runner = build_runner(cfg)
    names = [type(hook).__name__ for hook in runner.hooks]
    for name in (
        'AtomicCheckpointHook',
        'ExactResumeHook',
        'FlushDenormalHook',
    ):
        assert names.count(name) == 1, names
    assert 'CheckpointHook' not in names


def test_flush_denormal_hook_restores_the_setting():
    if not torch.set_flush_denormal(True):
        pytest.skip('this CPU cannot flush denormals')
    hook = FlushDenormalHook()
    try:
        for before in (False, True):
            torch.set_flush_denormal(before)
            hook.before_run(None)
            assert flushing_denormals()
            hook.after_run(None)
            assert flushing_denormals() == before
    finally:
        torch.set_flush_denormal(True)  # as conftest.py sets it


def test_build_model_builds_what_the_runner_builds():
    """The one model-from-config builder: the config's scope, SyncBN as BN
    (no process group outside a run), the data preprocessor set beside
    the model as mmpretrain configs do, nothing initialised."""
    cfg = dict(
        default_scope='mmpretrain',
        model=dict(
            type='ImageClassifier',
            backbone=dict(
                type='mmacmix.ACmixResNet',
                depth=26,
                norm_cfg=dict(type='SyncBN'),
                init_cfg=dict(type='Pretrained', checkpoint='absent.pth'),
            ),
            neck=dict(type='GlobalAveragePooling'),
        ),
        data_preprocessor=dict(mean=[1.0, 2.0, 3.0], std=[4.0, 5.0, 6.0]),
    )
    model = build_model(cfg)
    assert type(model).__name__ == 'ImageClassifier'
    norms = [
        type(m).__name__ for m in model.modules() if 'Norm' in type(m).__name__
    ]
    assert norms and 'SyncBatchNorm' not in norms
    assert model.data_preprocessor.mean.flatten().tolist() == [1.0, 2.0, 3.0]
    backbone = build_model(cfg, 'backbone')
    assert type(backbone) is ACmixResNet
    assert backbone.state_dict().keys() == model.backbone.state_dict().keys()


def test_launchers_of_other_packages_get_the_checked_runner(
    tmp_path, detector, monkeypatch
):
    """``runner_type='mmacmix.CheckedRunner'``: what mmdet's tools/train.py
    (``mim train``) builds with its own RUNNERS registry loads as ours."""
    from mmdet.registry import RUNNERS
    from mmengine.registry import DefaultScope

    monkeypatch.setattr(
        mmengine.config.config, 'FormatCode', lambda text, **_: (text, None)
    )
    cfg = load_config(str(DEMO_CONFIG), work_dir=str(tmp_path / 'work'))
    cfg.runner_type = 'mmacmix.CheckedRunner'
    with DefaultScope.overwrite_default_scope('mmdet'):
        runner = RUNNERS.build(cfg)
    assert type(runner) is CheckedRunner
    weights = tmp_path / 'weights.pth'
    torch.save({'state_dict': detector.state_dict()}, weights)
    runner.load_checkpoint(str(weights))
    assert_same(runner.model, detector.state_dict())
    backbone = tmp_path / 'backbone.pth'
    torch.save(detector.backbone.state_dict(), backbone)
    with pytest.raises(KeyMismatchError, match='holds the backbone alone'):
        runner.load_checkpoint(str(backbone))
