"""Every hint a command prints works when followed.

Each test makes a command print its hint, applies the change the hint
suggests and checks that the command then gets past that error (to the
next step of its work, where a stand-in stops it, or to its end). Hints
about loading checkpoints are tested with the checkpoint checks; the
others are here or next to their command: the shell launchers' in
test_launchers.py, the typo suggestions and ``python -m mmacmix.configs``
in test_typos.py, the demo's refusals in tests/test_demo.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_cli import DEMO_CONFIG, error_line, listing, run, tool

from mmacmix.cli import convert_cli
from mmacmix.datasets import ShapesSpec, generate_shape_crops
from mmacmix.demo import __main__ as demo_command
from mmacmix.demo import pipeline


class Reached(Exception):
    """Raised by a stand-in for the next step of a command's work."""


@pytest.fixture
def runner_stops(monkeypatch):
    """tools/train.py stops where it would build the Runner."""
    from mmacmix.apis import runner

    def stop(*args, **kwargs):
        raise Reached

    monkeypatch.setattr(runner, 'build_runner', stop)


def test_run_without_launcher(tmp_path, capsys, monkeypatch, runner_stops):
    monkeypatch.chdir(tmp_path)
    for name in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'):
        monkeypatch.delenv(name, raising=False)
    args = [DEMO_CONFIG, '--work-dir', 'work']
    train = tool('train.py')
    code, err = run(train, [*args, '--launcher', 'pytorch'], capsys)
    assert code == 1
    assert 'Run without --launcher for a single process.' in error_line(err)
    with pytest.raises(Reached):
        train([str(arg) for arg in args])
    assert listing(tmp_path) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason='--amp runs here')
def test_drop_amp(tmp_path, capsys, monkeypatch, runner_stops):
    monkeypatch.chdir(tmp_path)
    args = [DEMO_CONFIG, '--work-dir', 'work']
    train = tool('train.py')
    code, err = run(train, [*args, '--amp'], capsys)
    assert code == 1
    assert 'Drop --amp to train in float32 on the CPU.' in error_line(err)
    with pytest.raises(Reached):
        train([str(arg) for arg in args])
    assert listing(tmp_path) == []


def identity(checkpoint):
    return checkpoint['state_dict']


def test_a_folder_as_destination_gets_an_example_that_works(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    source = tmp_path / 'source.pth'
    torch.save({'state_dict': {'w': torch.ones(2)}}, source)
    (tmp_path / 'out').mkdir()
    main = lambda argv: convert_cli(identity, 'convert', argv)  # noqa: E731
    code, err = run(main, [source, 'out'], capsys)
    assert code == 1
    line = error_line(err)
    assert line.endswith('expected a file name, e.g. out/NAME')
    example = line.rsplit('e.g. ', 1)[1].replace('NAME', 'converted.pth')
    code, err = run(main, [source, example], capsys)
    assert code == 0, err
    saved = torch.load(tmp_path / example, weights_only=True)
    assert torch.equal(saved['state_dict']['backbone.w'], torch.ones(2))


def test_pretrain_iters_needs_pretrain(tmp_path, capsys, monkeypatch):
    from mmacmix.demo import comparison

    monkeypatch.chdir(tmp_path)
    code, err = run(demo_command.main, ['--pretrain-iters', '5'], capsys)
    assert code == 2
    assert err.splitlines()[-1].endswith(
        'error: --pretrain-iters needs --pretrain'
    )

    def stop(root, spec):
        raise Reached

    monkeypatch.setattr(comparison, 'generate_shapes_dataset', stop)
    with pytest.raises(Reached):
        demo_command.main(['--pretrain-iters', '5', '--pretrain'])
    assert listing(tmp_path) == []


def test_give_either_config_or_backbone(capsys):
    main = tool('analysis/get_flops.py')
    code, err = run(main, [], capsys)
    assert code == 2
    assert 'give either CONFIG or --backbone TYPE [KEY=VALUE ...]' in err
    result = main(
        [
            '--backbone',
            'mmacmix.ACmixResNet',
            'depth=26',
            '--shape',
            '32',
            '32',
        ]
    )
    assert result['params'] > 0


SMALL = ShapesSpec(num_train=2, num_val=1, image_size=(64, 64))


def test_generate_the_dataset_first(tmp_path, capsys, monkeypatch):
    """Crops need the dataset; `python -m mmacmix.demo --data-only`
    (here with a smaller dataset) makes it."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as error:
        generate_shape_crops('shapes')
    message = str(error.value)
    assert message.endswith(
        'generate it first (python -m mmacmix.demo --data-only)'
    )
    monkeypatch.setattr(demo_command, 'DEMO_SHAPES', SMALL)
    demo_command.main(['--data-only', '--data-root', 'shapes'])
    crops = generate_shape_crops('shapes')
    assert len(Path(crops, 'meta', 'val.txt').read_text().splitlines()) > 0


def test_delete_crops_of_another_margin(tmp_path):
    from mmacmix.datasets import generate_shapes_dataset

    root = generate_shapes_dataset(str(tmp_path / 'shapes'), SMALL)
    crops = generate_shape_crops(root, margin=0.1)
    with pytest.raises(FileExistsError) as error:
        generate_shape_crops(root, margin=0.3)
    assert str(error.value).endswith(
        'holds crops of another margin or dataset; delete it to generate '
        'them again'
    )
    shutil.rmtree(crops)
    assert generate_shape_crops(root, margin=0.3) == crops
    spec = json.loads(Path(crops, 'spec.json').read_text())
    assert spec['margin'] == 0.3


def test_choose_another_data_folder(tmp_path, capsys, monkeypatch):
    from mmacmix.datasets import generate_shapes_dataset

    monkeypatch.chdir(tmp_path)
    generate_shapes_dataset('other_spec', SMALL)
    args = ['--tiny', '--out-dir', 'out']
    code, err = run(
        demo_command.main, [*args, '--data-root', 'other_spec'], capsys
    )
    assert code == 1
    assert error_line(err).endswith('; choose another folder')
    reached = []

    def stop(cfg, *rest, **kwargs):
        reached.append(cfg.train_dataloader.dataset.data_root)
        raise Reached

    monkeypatch.setattr(pipeline, 'train_and_evaluate', stop)
    with pytest.raises(Reached):
        demo_command.main([*args, '--data-root', 'another'])
    assert reached == ['another/coco/']
    # The failed run left no output folder; the new dataset is whole.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        'another',
        'other_spec',
    ]
