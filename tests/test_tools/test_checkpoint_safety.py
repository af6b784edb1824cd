"""Checkpoints load without running their pickles (issue 24, item 2).

A checkpoint is a pickle: a file that names ``os.system`` in it runs that
command when it is unpickled with ``weights_only=False``. Every command
that reads a checkpoint is given such a file here, whose command would
create a marker file, and must refuse it with one line naming
``posix.system`` and ``--trust-checkpoint``, write nothing, and leave no
marker. What Runner checkpoints and the official releases hold loads by
default; anything else loads with ``--trust-checkpoint`` (shown with a
harmless ``fractions.Fraction``: nothing here ever unpickles the marker
files with trust).
"""

import io
import os
import pickle
import sys
import zipfile
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from cli_helpers import error_line, listing, run, tool
from mmengine.logging import HistoryBuffer, MessageHub
from mmengine.runner import CheckpointLoader
from mmengine.runner.checkpoint import load_from_local
from model_helpers import torchvision_resnet

from mmacmix.checkpoint import (
    UntrustedCheckpointError,
    checkpoint_safe_globals,
    read_checkpoint,
    runner_checkpoint_globals,
    trusted_checkpoints,
    unsafe_globals,
)
from mmacmix.models import ACmixResNet, XVolutionResNet
from mmacmix.models.utils import load_pretrained

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / 'configs/demo/mask-rcnn_acmix-r26_fpn_shapes.py'
SYSTEM = os.system.__module__ + '.system'  # posix.system on Linux


class _RunsCode:
    """Unpickles as ``os.system(command)``."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.fixture
def marker(tmp_path) -> Path:
    """Where the malicious files would write; must never exist."""
    return tmp_path / 'marker'


@pytest.fixture
def malicious(tmp_path, marker) -> dict[str, Path]:
    """Files that create ``marker`` when unpickled, in every format."""
    folder = tmp_path / 'files'
    folder.mkdir()
    weights = ACmixResNet(depth=26).state_dict()
    payload = {
        'state_dict': {f'backbone.{k}': v for k, v in weights.items()},
        'meta': {'epoch': 1, 'iter': 4, 'note': _RunsCode(f'touch {marker}')},
    }
    files = {'zip': folder / 'zip.pth', 'legacy': folder / 'legacy.pth'}
    torch.save(payload, files['zip'])
    torch.save(payload, files['legacy'], _use_new_zipfile_serialization=False)
    # A bare pickle of tensors needs torch.storage._load_from_bytes, itself
    # refused (it unpickles its bytes with weights_only=False): these hold
    # only the code.
    for protocol in (0, 2, 5):
        files[f'pickle{protocol}'] = folder / f'pickle{protocol}.pkl'
        with open(files[f'pickle{protocol}'], 'wb') as file:
            pickle.dump({'meta': payload['meta']}, file, protocol=protocol)
    return files


def assert_refused(code: int, err: str, marker: Path) -> None:
    assert code == 1
    line = error_line(err)
    assert f'unpickling it needs {SYSTEM}' in line
    assert '--trust-checkpoint' in line
    assert not marker.exists()


def test_reader_names_what_every_format_wants(malicious, marker):
    for name, path in malicious.items():
        assert unsafe_globals(str(path)) == [SYSTEM], name
        with pytest.raises(UntrustedCheckpointError) as error:
            read_checkpoint(str(path))
        message = str(error.value)
        assert message.startswith(f"'{path}' was not loaded: unpickling it ")
        assert f'needs {SYSTEM}, which a checkpoint of weights never ' in (
            message
        )
        assert '\n' not in message
    assert not marker.exists()


def test_train_resume_and_load_from_refuse_it(
    malicious, marker, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    before = listing(tmp_path)
    train = tool('train.py')
    args = [DEMO_CONFIG, '--work-dir', tmp_path / 'work']
    for extra in (
        ['--resume', malicious['zip']],
        ['--resume', malicious['pickle2']],
        ['--cfg-options', f'load_from={malicious["zip"]}'],
        ['--cfg-options', f'load_from={malicious["legacy"]}'],
    ):
        assert_refused(*run(train, args + extra, capsys), marker)
    assert listing(tmp_path) == before


def test_auto_resume_refuses_it(malicious, marker, tmp_path, capsys):
    work = tmp_path / 'work'
    work.mkdir()
    (work / 'iter_4.pth').write_bytes(malicious['zip'].read_bytes())
    (work / 'last_checkpoint').write_text(str(work / 'iter_4.pth'))
    before = listing(tmp_path)
    args = [DEMO_CONFIG, '--work-dir', work, '--resume']
    assert_refused(*run(tool('train.py'), args, capsys), marker)
    assert listing(tmp_path) == before


def test_test_py_refuses_it(malicious, marker, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = listing(tmp_path)
    for path in (malicious['zip'], malicious['pickle5']):
        args = [DEMO_CONFIG, path, '--work-dir', tmp_path / 'work']
        assert_refused(*run(tool('test.py'), args, capsys), marker)
    # --non-strict skips the key check, not the safety check.
    args = [DEMO_CONFIG, malicious['zip'], '--non-strict']
    assert_refused(*run(tool('test.py'), args, capsys), marker)
    assert listing(tmp_path) == before


@pytest.mark.parametrize(
    'script, extra',
    [
        ('model_converters/acmix_resnet2mmacmix.py', []),
        ('model_converters/acmix_swin2mmacmix.py', ['--keep-classifier']),
        ('model_converters/pvt2acmix.py', []),
        ('model_converters/resnet2xvolution.py', ['--depth', '50']),
    ],
)
def test_converters_refuse_it(
    script, extra, malicious, marker, tmp_path, capsys
):
    before = listing(tmp_path)
    for path in (malicious['zip'], malicious['pickle0']):
        args = [path, tmp_path / 'out.pth', *extra]
        assert_refused(*run(tool(script), args, capsys), marker)
    assert listing(tmp_path) == before


def test_export_and_reparameterize_refuse_it(
    malicious, marker, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / 'xvolution.py'
    config.write_text(
        "custom_imports = dict(imports=['mmacmix'])\n"
        "model = dict(type='mmacmix.XVolutionResNet', depth=18)\n"
    )
    before = listing(tmp_path)
    for path in (malicious['zip'], malicious['legacy']):
        for script, args in (
            ('deploy/export_onnx.py', [DEMO_CONFIG, path, 'out.onnx']),
            ('deploy/reparameterize.py', [config, path, 'out.pth']),
        ):
            assert_refused(*run(tool(script), args, capsys), marker)
    assert listing(tmp_path) == before


def test_infer_refuses_it(malicious, marker, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    image = tmp_path / 'image.png'
    cv2.imwrite(str(image), np.zeros((32, 32, 3), np.uint8))
    before = listing(tmp_path)
    for path in (malicious['zip'], malicious['pickle2']):
        args = [DEMO_CONFIG, path, image, '--out-dir', tmp_path / 'out']
        assert_refused(*run(tool('infer.py'), args, capsys), marker)
    assert listing(tmp_path) == before


def test_pretrained_init_refuses_it(malicious, marker):
    model = ACmixResNet(
        depth=26,
        init_cfg=dict(
            type='Pretrained',
            checkpoint=str(malicious['zip']),
            prefix='backbone.',
        ),
    )
    with pytest.raises(UntrustedCheckpointError, match=SYSTEM):
        model.init_weights()
    assert not marker.exists()


# What is allowed, and the switch for the rest.


def runner_like_checkpoint(model: torch.nn.Module) -> dict:
    """What MMEngine's Runner and ExactResumeHook save beyond weights."""
    hub = MessageHub('safety-test')
    for step in range(3):
        hub.update_scalar('train/loss', np.float64(0.5 + step))
    hub.update_info('keep_ckpt_ids', [2, 4])
    buffer = HistoryBuffer()
    buffer.update(1.5)
    return {
        'meta': {
            'epoch': 0,
            'iter': 4,
            'seed': 0,
            'dataset_meta': {'classes': ('circle',), 'palette': [(1, 2, 3)]},
            'host_rng_state': {
                'numpy': np.random.get_state(),
                'python': __import__('random').getstate(),
            },
        },
        'state_dict': model.state_dict(),
        'message_hub': hub.state_dict(),
        'buffer': buffer,
        'array': np.arange(6, dtype=np.int16).reshape(2, 3),
        'dtype': np.dtype('f4'),
    }


def ours_allowed() -> list:
    """Our allowed objects that torch allows now."""
    allowed = torch.serialization.get_safe_globals()
    return [entry for entry in checkpoint_safe_globals() if entry in allowed]


def test_runner_checkpoints_load_safely(tmp_path, monkeypatch):
    model = XVolutionResNet(depth=18)
    path = tmp_path / 'runner.pth'
    torch.save(runner_like_checkpoint(model), path)
    # As in a new process, before any HistoryBuffer was made: the methods
    # the file names by getattr are not registered yet.
    monkeypatch.setattr(HistoryBuffer, '_statistics_methods', {})
    # torch's default refuses them: the allowed objects are needed...
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    # ... and allowed only inside the block, by name.
    with runner_checkpoint_globals():
        assert ours_allowed()
        torch.load(path, weights_only=True)
    assert not ours_allowed()
    loaded = read_checkpoint(str(path))
    assert loaded['meta']['host_rng_state']['numpy'][0] == 'MT19937'
    assert np.array_equal(loaded['array'], np.arange(6).reshape(2, 3))
    assert loaded['array'].dtype == np.int16
    assert loaded['buffer'].current() == 1.5
    hub = loaded['message_hub']['log_scalars']['train/loss']
    assert hub.mean() == pytest.approx(1.5)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded['state_dict'][key], value), key


def test_numpy_1_names_and_yacs_configs_are_allowed(tmp_path):
    """Releases pickled under NumPy 1 and the yacs CfgNode of the official
    Swin releases, without NumPy 1 or yacs installed."""
    array = np.arange(3.0)
    stream = io.BytesIO()
    pickle.dump({'array': array, 'score': np.float64(2.5)}, stream, 2)
    old_numpy = stream.getvalue().replace(b'numpy._core', b'numpy.core')
    assert b'numpy.core.multiarray' in old_numpy
    path = tmp_path / 'old.pth'
    with zipfile.ZipFile(path, 'w') as archive:
        archive.writestr('old/data.pkl', old_numpy)
        archive.writestr('old/byteorder', 'little')
        archive.writestr('old/version', '3\n')
    loaded = read_checkpoint(str(path))
    assert np.array_equal(loaded['array'], array)
    assert loaded['score'] == 2.5


def test_getattr_gives_only_history_buffer_methods(tmp_path):
    class Getter:
        def __reduce__(self):
            return getattr, (HistoryBuffer, '__init__')

    path = tmp_path / 'getattr.pth'
    torch.save({'state_dict': {}, 'meta': Getter()}, path)
    with pytest.raises(UntrustedCheckpointError) as error:
        read_checkpoint(str(path))
    assert "needs builtins.getattr(HistoryBuffer, '__init__'), which" in str(
        error.value
    )


def test_unknown_objects_need_the_switch(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / 'fraction.pth'
    torch.save({'state_dict': {}, 'meta': {'ratio': Fraction(1, 3)}}, path)
    with pytest.raises(UntrustedCheckpointError, match='fractions.Fraction'):
        read_checkpoint(str(path))
    assert read_checkpoint(str(path), trust=True)['meta']['ratio'] == (
        Fraction(1, 3)
    )
    with trusted_checkpoints():
        assert read_checkpoint(str(path))['meta']['ratio'] == Fraction(1, 3)
        with trusted_checkpoints(False):
            with pytest.raises(UntrustedCheckpointError):
                read_checkpoint(str(path))
    with pytest.raises(UntrustedCheckpointError):
        read_checkpoint(str(path))
    # The command line's switch: past the safety check, to the key check.
    args = [DEMO_CONFIG, path, '--work-dir', tmp_path / 'work']
    code, err = run(tool('test.py'), args, capsys)
    assert 'fractions.Fraction' in error_line(err)
    code, err = run(tool('test.py'), args + ['--trust-checkpoint'], capsys)
    assert code == 1
    assert 'holds no state dict' in error_line(err)


def test_nothing_is_replaced_process_wide(tmp_path):
    """MMEngine's loader of local files is its own after a run is built."""
    assert CheckpointLoader._schemes[''] is load_from_local
    assert not ours_allowed()
    model = XVolutionResNet(depth=18)
    path = tmp_path / 'runner.pth'
    torch.save(runner_like_checkpoint(model), path)
    read_checkpoint(str(path))
    assert CheckpointLoader._schemes[''] is load_from_local
    assert not ours_allowed()


def test_pretrained_loads_a_runner_checkpoint(tmp_path):
    model = XVolutionResNet(depth=18)
    path = tmp_path / 'runner.pth'
    payload = runner_like_checkpoint(model)
    payload['state_dict'] = {
        f'backbone.{k}': v for k, v in payload['state_dict'].items()
    }
    torch.save(payload, path)
    loaded = XVolutionResNet(depth=18)
    load_pretrained(loaded, str(path), 'backbone.')
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_converters_trust_what_they_are_told_to(tmp_path, capsys):
    """--trust-checkpoint reads a file the old way, classes that cannot be
    imported included (as plain dicts), and the conversion proceeds."""
    module = tmp_path / 'gone_module.py'
    module.write_text('class Settings(dict):\n    pass\n')
    sys.path.insert(0, str(tmp_path))
    try:
        settings = __import__('gone_module').Settings(depth=18)
        payload = {'model': torchvision_resnet(18)[0], 'args': settings}
        torch.save(payload, tmp_path / 'resnet.pth')
    finally:
        sys.path.remove(str(tmp_path))
        del sys.modules['gone_module']
    module.unlink()
    converter = tool('model_converters/resnet2xvolution.py')
    args = [tmp_path / 'resnet.pth', tmp_path / 'out.pth']
    code, err = run(converter, args, capsys)
    assert code == 1
    assert 'unpickling it needs gone_module.Settings' in error_line(err)
    assert not (tmp_path / 'out.pth').exists()
    assert run(converter, args + ['--trust-checkpoint'], capsys)[0] == 0
    converted = read_checkpoint(str(tmp_path / 'out.pth'))['state_dict']
    assert torch.equal(
        converted['backbone.conv1.weight'], payload['model']['conv1.weight']
    )
