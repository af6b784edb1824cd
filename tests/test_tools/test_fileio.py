"""atomic_path: the target is the old file or the whole new one."""

import os

import pytest

from mmacmix.fileio import atomic_path


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    target = tmp_path / 'model.pth'
    target.write_text('old')
    with pytest.raises(RuntimeError, match='disk full'):
        with atomic_path(str(target)) as temporary:
            with open(temporary, 'w') as file:
                file.write('half of the new')
            raise RuntimeError('disk full')
    assert target.read_text() == 'old'
    assert os.listdir(tmp_path) == ['model.pth']


def test_a_finished_write_replaces_the_file_with_usual_permissions(tmp_path):
    target = tmp_path / 'sub' / 'model.onnx'
    with atomic_path(str(target)) as temporary:
        assert os.path.dirname(temporary) == str(target.parent)
        assert not target.exists()
        with open(temporary, 'w') as file:
            file.write('new')
    assert target.read_text() == 'new'
    assert os.listdir(target.parent) == ['model.onnx']
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
