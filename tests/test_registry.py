"""mmdet and mmseg build mmacmix classes by scoped name, like any plugin."""

import subprocess
import sys
import textwrap

from mmacmix.models import ACmix, ACmixResNet
from mmacmix.registry import MODELS


def test_registry_is_a_child_of_mmengine_models():
    from mmengine.registry import MODELS as ROOT

    assert MODELS.parent is ROOT and ROOT.children['mmacmix'] is MODELS
    assert MODELS.get('ACmixResNet') is ACmixResNet
    assert MODELS.get('ACmix') is ACmix


def test_mmdet_and_mmseg_build_by_scoped_name_without_importing_us():
    # A fresh interpreter: mmengine must find mmacmix from the scope prefix
    # alone, as it does for a config without custom_imports.
    script = textwrap.dedent("""
        from mmengine.registry import DefaultScope
        from mmdet.registry import MODELS as DET
        from mmseg.registry import MODELS as SEG
        import sys
        assert 'mmacmix' not in sys.modules
        cfg = dict(type='mmacmix.ACmixResNet', depth=26, out_indices=(3,))
        for scope, registry in (('mmdet', DET), ('mmseg', SEG)):
            with DefaultScope.overwrite_default_scope(scope):
                model = registry.build(cfg)
            print(scope, type(model).__module__, type(model).__name__)
    """)
    out = subprocess.run(
        [sys.executable, '-c', script],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split('\n')
    assert out[:2] == [
        'mmdet mmacmix.models.acmix_resnet ACmixResNet',
        'mmseg mmacmix.models.acmix_resnet ACmixResNet',
    ]


def test_hooks_build_by_scoped_name_without_importing_us():
    # What a config run by `mim train` relies on: MMEngine's HOOKS finds
    # both hooks from the scope prefix, and the checkpoint hook keeps the
    # arguments of the CheckpointHook it stands in for.
    script = textwrap.dedent("""
        import sys
        from mmengine.registry import HOOKS
        assert 'mmacmix' not in sys.modules
        resume = HOOKS.build(dict(type='mmacmix.ExactResumeHook'))
        checkpoint = HOOKS.build(dict(
            type='mmacmix.AtomicCheckpointHook', interval=7, by_epoch=False,
            max_keep_ckpts=2))
        print(type(resume).__module__, type(resume).__name__)
        print(type(checkpoint).__name__, checkpoint.interval,
              checkpoint.by_epoch, checkpoint.max_keep_ckpts)
    """)
    out = subprocess.run(
        [sys.executable, '-c', script],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split('\n')
    assert out[:2] == [
        'mmacmix.apis.hooks ExactResumeHook',
        'AtomicCheckpointHook 7 False 2',
    ]
