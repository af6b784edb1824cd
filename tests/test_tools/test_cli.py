"""Every command line fails early and clearly, and leaves nothing behind.

Each case gives a tool a bad input, in this process (a subprocess would
spend seconds importing torch and mmdet per case), and checks the exit
status, the one-line message (the path, what was found, what was
expected) and that the folder holds exactly what it held before. Covered:
the shared error exit (:mod:`mmacmix.cli`), strict checkpoint checks of
``tools/test.py`` and ``--resume`` with what the file seems to hold,
argument checks of ``--metrics-out``, the launchers, the demo and the
converters, reproducible converter output, and the shell launchers'
interpreter.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from cli_helpers import error_line, listing, run, tool
from mmengine.registry import MODELS, DefaultScope

from mmacmix.apis import check_checkpoint, load_config
from mmacmix.checkpoint import KeyMismatchError
from mmacmix.cli import exit_on_error
from mmacmix.demo import pipeline
from mmacmix.demo.__main__ import main as demo_main
from mmacmix.fileio import check_destination, check_folder
from mmacmix.models import ACmixSwinTransformer, XVolutionResNet

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / 'configs/demo/mask-rcnn_acmix-r26_fpn_shapes.py'
TINY_SWIN = dict(embed_dims=12, depths=(2, 2, 2, 2), num_heads=(1, 1, 1, 1))


# The shared error exit.


def test_expected_errors_exit_1_with_one_line(capsys, monkeypatch):
    monkeypatch.delenv('MMACMIX_DEBUG', raising=False)
    for error in (
        FileNotFoundError("checkpoint 'a.pth'\ndoes not exist"),
        ValueError('bad value'),
        KeyMismatchError('a.pth does not fit X'),
        KeyError('Nope is not in the mmacmix::model registry'),
    ):
        with pytest.raises(SystemExit) as exit_info:
            with exit_on_error():
                raise error
        assert exit_info.value.code == 1
        expected = ' '.join(str(error.args[0]).split())
        assert capsys.readouterr().err == f'error: {expected}\n'


def test_bugs_and_debug_keep_the_traceback(monkeypatch):
    monkeypatch.delenv('MMACMIX_DEBUG', raising=False)
    # A plain KeyError or TypeError is a bug, not a user error.
    for error in (KeyError('SLURM_PROCID'), TypeError('oops')):
        with pytest.raises(type(error)):
            with exit_on_error():
                raise error
    with pytest.raises(ValueError, match='bad'):
        with exit_on_error(debug=True):
            raise ValueError('bad')
    monkeypatch.setenv('MMACMIX_DEBUG', '1')
    with pytest.raises(ValueError, match='bad'):
        with exit_on_error():
            raise ValueError('bad')


def test_destinations_are_checked_before_any_work(tmp_path):
    (tmp_path / 'file').write_text('x')
    (tmp_path / 'folder').mkdir()
    with pytest.raises(IsADirectoryError, match="'.*folder' is a folder"):
        check_destination(str(tmp_path / 'folder'))
    with pytest.raises(NotADirectoryError, match="lies under '.*file'"):
        check_destination(str(tmp_path / 'file' / 'sub' / 'out.pth'))
    with pytest.raises(FileExistsError, match='--force'):
        check_destination(str(tmp_path / 'file'))
    check_destination(str(tmp_path / 'file'), force=True)
    check_destination(str(tmp_path / 'new' / 'deeper' / 'out.pth'))
    with pytest.raises(NotADirectoryError, match="'.*file' is a file"):
        check_folder(str(tmp_path / 'file'))
    with pytest.raises(NotADirectoryError, match="lies under '.*file'"):
        check_folder(str(tmp_path / 'file' / 'out'))
    check_folder(str(tmp_path / 'new' / 'out'))
    assert listing(tmp_path) == ['file', 'folder']


# tools/test.py and --resume on checkpoints that do not fit the config.


@pytest.fixture(scope='module')
def detector_state() -> dict[str, torch.Tensor]:
    """The state dict of the demo's ACmix-R26 Mask R-CNN."""
    cfg = load_config(str(DEMO_CONFIG))
    with DefaultScope.overwrite_default_scope('mmdet'):
        return MODELS.build(cfg.model).state_dict()


@pytest.fixture(scope='module')
def bad_checkpoints(tmp_path_factory, detector_state) -> dict[str, Path]:
    """Checkpoints that do not fit the demo config."""
    tmp_path = tmp_path_factory.mktemp('checkpoints')
    files = {'missing': tmp_path / 'missing.pth'}

    def save(name: str, payload) -> None:
        files[name] = tmp_path / f'{name}.pth'
        torch.save(payload, files[name])

    backbone = {
        k: v for k, v in detector_state.items() if k.startswith('backbone.')
    }
    save('backbone_only', {'state_dict': backbone})
    save('bare_backbone', {k[9:]: v for k, v in backbone.items()})
    xvolution = {
        f'backbone.{k}': v
        for k, v in XVolutionResNet(depth=18).state_dict().items()
    }
    rest = {
        k: v
        for k, v in detector_state.items()
        if not k.startswith('backbone.')
    }
    meta = dict(epoch=0, iter=4)
    save('xvolution', {'state_dict': {**xvolution, **rest}, 'meta': meta})
    save('tensor', torch.zeros(3))
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(files['backbone_only'].read_bytes()[:2000])
    files['truncated'] = truncated
    return files


@pytest.mark.parametrize(
    'name, message',
    [
        ('backbone_only', 'does not fit MaskRCNN: {heads} missing keys '),
        ('backbone_only', '0 unexpected keys []. It holds only the backbone'),
        ('backbone_only', 'model.backbone.init_cfg.prefix=backbone.'),
        ('bare_backbone', "its keys without the prefix 'backbone.'"),
        (
            'xvolution',
            'It seems to hold an X-volution ResNet detector; the model is '
            'an ACmix ResNet detector.',
        ),
        ('tensor', 'holds a Tensor, not a checkpoint dict; expected a state'),
        (
            'truncated',
            'is not a readable PyTorch checkpoint (truncated or another '
            'format: RuntimeError: PytorchStreamReader failed reading zip '
            'archive: failed finding central directory); expected a file '
            'written by torch.save',
        ),
        ('missing', "missing.pth' does not exist"),
    ],
)
def test_test_py_refuses_what_does_not_fit(
    name,
    message,
    bad_checkpoints,
    detector_state,
    tmp_path,
    capsys,
    monkeypatch,
):
    monkeypatch.chdir(tmp_path)
    heads = [k for k in detector_state if not k.startswith('backbone.')]
    message = message.format(heads=len(heads))
    checkpoint = bad_checkpoints[name]
    before = listing(tmp_path)
    code, err = run(
        tool('test.py'),
        [DEMO_CONFIG, checkpoint, '--work-dir', tmp_path / 'work'],
        capsys,
    )
    assert code == 1
    line = error_line(err)
    assert message in line
    assert str(checkpoint.name) in line
    assert listing(tmp_path) == before


def test_non_strict_skips_only_the_key_check(bad_checkpoints):
    cfg = load_config(str(DEMO_CONFIG))
    check_checkpoint(cfg, str(bad_checkpoints['backbone_only']), strict=False)
    with pytest.raises(ValueError, match='holds a Tensor'):
        check_checkpoint(cfg, str(bad_checkpoints['tensor']), strict=False)


def test_resume_needs_a_fitting_training_checkpoint(
    bad_checkpoints, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    before = listing(tmp_path)
    train = tool('train.py')
    args = [DEMO_CONFIG, '--work-dir', tmp_path / 'work', '--resume']
    code, err = run(train, args + [bad_checkpoints['backbone_only']], capsys)
    assert code == 1
    assert 'holds no training state' in error_line(err)
    # A backbone alone does not fit load_from either: the advice is to
    # start from it as pretrained weights. The load_from advice, for a file
    # that fits, is followed in test_loading.py.
    assert 'It does not fit the model either' in error_line(err)
    assert 'init_cfg.type=Pretrained' in error_line(err)
    code, err = run(train, args + [bad_checkpoints['xvolution']], capsys)
    assert code == 1
    assert 'It seems to hold an X-volution ResNet' in error_line(err)
    assert listing(tmp_path) == before


@pytest.fixture
def deployed_x_volution(tmp_path) -> tuple[Path, Path]:
    """An X-volution ResNet-18 config and a deployed checkpoint of it,
    as tools/deploy/reparameterize.py writes it."""
    config = tmp_path / 'xvolution.py'
    config.write_text(
        "custom_imports = dict(imports=['mmacmix'])\n"
        "model = dict(type='mmacmix.XVolutionResNet', depth=18)\n"
    )
    deployed = XVolutionResNet(depth=18)
    deployed.switch_to_deploy()
    checkpoint = tmp_path / 'deployed.pth'
    meta = dict(deploy=True, cfg_options=['model.deploy=True'])
    torch.save({'state_dict': deployed.state_dict(), 'meta': meta}, checkpoint)
    return config, checkpoint


def test_deployed_x_volution_is_recognised(
    deployed_x_volution, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    config, checkpoint = deployed_x_volution
    code, err = run(tool('test.py'), [config, checkpoint], capsys)
    assert code == 1
    line = error_line(err)
    assert 'does not fit XVolutionResNet' in line
    assert 'holds a re-parameterised (deployed) X-volution' in line
    # The options reparameterize.py recorded in the file (this config's
    # model is the backbone itself).
    assert 'add --cfg-options model.deploy=True' in line
    assert listing(tmp_path) == ['deployed.pth', 'xvolution.py']


# Arguments checked before any work.


def test_metrics_out_is_checked_first(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'a_file').write_text('x')
    for destination, message in (
        (tmp_path, 'is a folder; expected a file name'),
        (tmp_path / 'a_file' / 'm.json', "lies under '"),
    ):
        code, err = run(
            tool('test.py'),
            # Neither the config nor the checkpoint is read first.
            ['absent.py', 'absent.pth', '--metrics-out', destination],
            capsys,
        )
        assert code == 1
        assert f"--metrics-out '{destination}'" in error_line(err)
        assert message in error_line(err)
    assert listing(tmp_path) == ['a_file']


@pytest.mark.parametrize(
    'launcher, variables',
    [
        ('slurm', 'SLURM_PROCID, SLURM_NTASKS, SLURM_NODELIST'),
        ('pytorch', 'RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT'),
    ],
)
def test_launchers_outside_their_environment(
    launcher, variables, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    for name in variables.split(', '):
        monkeypatch.delenv(name, raising=False)
    code, err = run(
        tool('train.py'),
        [DEMO_CONFIG, '--launcher', launcher, '--work-dir', 'work'],
        capsys,
    )
    assert code == 1
    assert f'--launcher {launcher} found no {variables}' in error_line(err)
    assert listing(tmp_path) == []


@pytest.mark.parametrize(
    'args', [['--iters', '-5'], ['--tiny', '--iters', '0'], ['--iters', 'x']]
)
def test_demo_iterations_must_be_positive(args, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = run(demo_main, args, capsys)
    assert code == 2
    assert f'expected a positive integer, got {args[-1]!r}' in err
    assert listing(tmp_path) == []
    with pytest.raises(ValueError, match='positive integer, got 0'):
        pipeline.run_demo(max_iters=0)


def test_demo_folders_are_checked_first(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'a_file').write_text('x')
    for args, message in (
        (['--out-dir', 'a_file'], "output folder 'a_file' is a file"),
        (['--data-root', 'a_file/shapes'], "data folder 'a_file/shapes' lies"),
        (['--data-only', '--data-root', 'a_file'], "'a_file' is a file"),
    ):
        code, err = run(demo_main, args, capsys)
        assert code == 1
        assert message in error_line(err)
    assert listing(tmp_path) == ['a_file']


def test_demo_data_root_with_a_trailing_slash(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    roots = []

    def stop(root, spec):
        roots.append((root, spec.num_train))
        raise KeyboardInterrupt  # stop before anything is built

    monkeypatch.setattr(pipeline, 'generate_shapes_dataset', stop)
    for args in (['--tiny', '--data-root', 'data/shapes/'], ['--tiny']):
        with pytest.raises(KeyboardInterrupt):
            demo_main(args)
    with pytest.raises(KeyboardInterrupt):
        demo_main(['--data-root', 'data/shapes/'])
    tiny = pipeline.TINY_SHAPES.num_train
    full = pipeline.DEMO_SHAPES.num_train
    # --tiny never touches the full dataset, slash or not.
    assert roots == [
        ('data/shapes_tiny', tiny),
        ('data/shapes_tiny', tiny),
        ('data/shapes', full),
    ]
    assert listing(tmp_path) == []


def test_dataset_of_another_spec_is_not_offered_for_deletion(tmp_path, capsys):
    from mmacmix.datasets import ShapesSpec, generate_shapes_dataset

    root = tmp_path / 'shapes'
    generate_shapes_dataset(str(root), ShapesSpec(num_train=1, num_val=1))
    before = listing(tmp_path)
    code, err = run(
        demo_main, ['--tiny', '--data-root', root, '--out-dir', 'o'], capsys
    )
    assert code == 1
    line = error_line(err)
    assert 'holds a shapes dataset of another spec' in line
    assert 'num_train 1 instead of 8' in line
    assert 'remove' not in line and 'delete' not in line
    assert listing(tmp_path) == before


# Converter destinations and reproducible output.


def swin_release(path: Path) -> None:
    """A tiny ACmix-Swin checkpoint in the official release's format."""
    state = dict(ACmixSwinTransformer(arch=TINY_SWIN).state_dict())
    for name in ('weight', 'bias'):
        state[f'norm.{name}'] = state.pop(f'norm3.{name}')
        for stage in range(3):
            state.pop(f'norm{stage}.{name}')
    torch.save({'model': state}, path)


def test_converter_destinations_are_checked_first(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'a_file').write_text('x')
    (tmp_path / 'folder').mkdir()
    main = tool('model_converters/resnet2xvolution.py')
    for dst, message in (
        ('folder', "checkpoint 'folder' is a folder; expected a file name"),
        ('a_file/out.pth', "checkpoint 'a_file/out.pth' lies under"),
    ):
        # The source does not exist: the destination is checked first.
        code, err = run(main, ['absent.pth', dst], capsys)
        assert code == 1
        assert message in error_line(err)
    assert listing(tmp_path) == ['a_file', 'folder']


def test_converting_twice_gives_identical_bytes(tmp_path, capsys):
    from mmacmix.cli import convert_cli
    from mmacmix.models import convert_acmix_swin

    swin_release(tmp_path / 'release.pth')
    for name in ('a.pth', 'b.pth'):
        convert_cli(
            convert_acmix_swin,
            'x',
            [str(tmp_path / 'release.pth'), str(tmp_path / name)],
        )
    first = (tmp_path / 'a.pth').read_bytes()
    assert first == (tmp_path / 'b.pth').read_bytes()
    assert b'archive/data.pkl' in first  # not the temporary file's name
    assert listing(tmp_path) == ['a.pth', 'b.pth', 'release.pth']


# The shell launchers.


def fake_command(folder: Path, name: str) -> Path:
    """An executable that prints its own path and its arguments."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(f'#!/bin/sh\necho {path} "$@"\n')
    path.chmod(0o755)
    return path


def launch(
    script: str, *args: str, cwd: Path, **env: str
) -> subprocess.CompletedProcess:
    """Runs a launcher with ``env`` instead of the caller's PYTHON and
    MMACMIX_VENV, in a folder holding the config and checkpoint that the
    launchers check for (``c.py``, ``cfg.py``, ``k.pth``, ``ckpt.pth``)."""
    unset = ('PYTHON', 'MMACMIX_VENV')
    base = {k: v for k, v in os.environ.items() if k not in unset}
    for name in ('c.py', 'cfg.py', 'k.pth', 'ckpt.pth'):
        (cwd / name).touch()
    return subprocess.run(
        ['bash', str(REPO / 'tools' / script), *args],
        cwd=cwd,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_launchers_run_the_setups_python(tmp_path):
    venv_python = fake_command(tmp_path / 'venv' / 'bin', 'python')
    path_python = fake_command(tmp_path / 'path', 'python')
    other = fake_command(tmp_path / 'bin', 'other-python')
    path = f'{tmp_path / "path"}:{os.environ["PATH"]}'
    venv = str(tmp_path / 'venv')
    # The setup's environment, unless PYTHON names another interpreter...
    result = launch(
        'dist_train.sh',
        'c.py',
        '2',
        MMACMIX_VENV=venv,
        PATH=path,
        cwd=tmp_path,
    )
    assert result.stdout.startswith(f'{venv_python} -m torch.distributed')
    result = launch(
        'dist_test.sh',
        'c.py',
        'k.pth',
        '2',
        MMACMIX_VENV=venv,
        PYTHON=str(other),
        cwd=tmp_path,
    )
    assert result.stdout.startswith(f'{other} -m torch.distributed')
    # ... and python from PATH where there is no environment.
    absent = str(tmp_path / 'absent')
    result = launch(
        'dist_train.sh',
        'c.py',
        '2',
        MMACMIX_VENV=absent,
        PATH=path,
        cwd=tmp_path,
    )
    assert result.stdout.startswith(f'{path_python} -m torch.distributed')


def test_the_default_environment_is_the_repositorys_venv():
    finder = REPO / 'tools' / 'find_python.sh'
    unset = ('PYTHON', 'MMACMIX_VENV')
    result = subprocess.run(
        ['bash', '-c', f'. {finder} && echo "$python"'],
        env={k: v for k, v in os.environ.items() if k not in unset},
        capture_output=True,
        text=True,
        timeout=30,
    )
    venv_python = REPO / '.venv' / 'bin' / 'python'
    expected = str(venv_python) if venv_python.exists() else 'python'
    assert result.stdout.strip() == expected


@pytest.mark.skipif(shutil.which('srun') is not None, reason='Slurm here')
@pytest.mark.parametrize(
    'script, args',
    [
        ('slurm_train.sh', ['p', 'job', 'cfg.py']),
        ('slurm_test.sh', ['p', 'job', 'cfg.py', 'ckpt.pth']),
    ],
)
def test_slurm_scripts_outside_slurm(script, args, tmp_path):
    result = launch(script, *args, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith('error: srun not found;')
    assert result.stdout == ''


# Deployment and analysis tools.


def test_pretrained_without_prefix_is_told_to_add_it(tmp_path):
    converted = tmp_path / 'converted.pth'
    weights = XVolutionResNet(depth=18).state_dict()
    torch.save(
        {'state_dict': {f'backbone.{k}': v for k, v in weights.items()}},
        converted,
    )
    model = MODELS.build(
        dict(
            type='mmacmix.XVolutionResNet',
            depth=18,
            init_cfg=dict(type='Pretrained', checkpoint=str(converted)),
        )
    )
    with pytest.raises(KeyMismatchError) as error:
        model.init_weights()
    assert "Its keys carry the prefix 'backbone.'" in str(error.value)
    assert "prefix='backbone.'" in str(error.value)


def test_reparameterize_refuses_a_deployed_checkpoint(
    deployed_x_volution, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    config, checkpoint = deployed_x_volution
    main = tool('deploy/reparameterize.py')
    code, err = run(main, [config, checkpoint, 'out.pth'], capsys)
    assert code == 1
    assert error_line(err) == (
        f"error: '{checkpoint}' is re-parameterised (deployed) already; "
        'expected a trained checkpoint. Load it as it is, with '
        '--cfg-options model.deploy=True'
    )
    (tmp_path / 'folder').mkdir()
    code, err = run(main, [config, 'absent.pth', 'folder'], capsys)
    assert code == 1
    assert "checkpoint 'folder' is a folder" in error_line(err)
    assert listing(tmp_path) == ['deployed.pth', 'folder', 'xvolution.py']


def test_export_destination_is_checked_first(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'a_file').write_text('x')
    main = tool('deploy/export_onnx.py')
    for out, message in (
        ('.', "ONNX file '.' is a folder"),
        ('a_file/m.onnx', "ONNX file 'a_file/m.onnx' lies under"),
    ):
        code, err = run(main, ['absent.py', out], capsys)
        assert code == 1
        assert message in error_line(err)
    assert listing(tmp_path) == ['a_file']


def test_drop_in_config_exports(tmp_path, capsys):
    """mmdet's ResNet with ACmix in stage 4, built in mmdet's scope."""
    pytest.importorskip('onnxruntime')
    config = tmp_path / 'drop_in.py'
    base = REPO / 'configs/drop_in/mask-rcnn_r50-acmix-c3-c5_fpn_1x_coco.py'
    config.write_text(
        f'_base_ = {str(base)!r}\n'
        'model = dict(backbone=dict(\n'
        '    init_cfg=None, stage_with_dcn=(False, False, False, True)))\n'
    )
    out = tmp_path / 'drop_in.onnx'
    size = ['64', '64']
    code, _ = run(
        tool('deploy/export_onnx.py'),
        [config, out, '--shape', *size, '--verify-shape', *size],
        capsys,
    )
    # The graph was checked against PyTorch before it was written.
    assert code == 0
    assert out.stat().st_size > 1e6  # the weights of ResNet-50


def test_get_flops_shape_must_be_positive(capsys):
    main = tool('analysis/get_flops.py')
    for shape in (['0', '64'], ['-3', '64'], ['a', '64']):
        code, err = run(
            main,
            ['--backbone', 'mmacmix.ACmixResNet', '--shape', *shape],
            capsys,
        )
        assert code == 2
        assert f'expected a positive integer, got {shape[0]!r}' in err
    code, err = run(main, ['--backbone', 'mmacmix.Nope'], capsys)
    assert code == 1
    assert 'mmacmix.Nope is not in the' in error_line(err)
