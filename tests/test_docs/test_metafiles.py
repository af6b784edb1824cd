"""The model index: every config in a metafile, every entry a config, and
the params and FLOPs there (and in the folder READMEs) equal to those
computed from the configs.

Both numbers are those of the config's backbone alone: its parameters,
and its FLOPs on one 224x224 image counted in the official form
(multiply-adds), as
``tools/analysis/get_flops.py CONFIG --backbone-only --official-form``
prints them. Counting backbones keeps this test fast (configs that share a
backbone are counted once), and they are the figures the papers compare.
Files in ``configs/_base_/`` are pieces of configs, not configs.
"""

import importlib
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
FAMILIES = sorted(
    path.name
    for path in (REPO / 'configs').iterdir()
    if path.is_dir() and not path.name.startswith('_')
)


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def metafile_models(family: str) -> list[dict]:
    return load(REPO / 'configs' / family / 'metafile.yml')['Models']


def family_configs(family: str) -> set[str]:
    return {
        str(path.relative_to(REPO))
        for path in (REPO / 'configs' / family).glob('*.py')
    }


def test_model_index_imports_every_family_metafile():
    index = load(REPO / 'model-index.yml')
    assert index['Import'] == [
        f'configs/{family}/metafile.yml' for family in FAMILIES
    ]


@pytest.mark.parametrize('family', FAMILIES)
def test_every_config_has_one_entry_and_every_entry_a_config(family):
    metafile = load(REPO / 'configs' / family / 'metafile.yml')
    collections = {item['Name'] for item in metafile['Collections']}
    for collection in metafile['Collections']:
        assert collection['README'] == f'configs/{family}/README.md'
    entries = [model['Config'] for model in metafile['Models']]
    assert len(entries) == len(set(entries)), 'a config listed twice'
    assert set(entries) == family_configs(family)
    for model in metafile['Models']:
        assert model['Name'] == Path(model['Config']).stem
        assert model['In Collection'] in collections
        assert isinstance(model['Metadata']['Parameters'], int)
        assert isinstance(model['Metadata']['FLOPs'], int)


def millions(count: int) -> str:
    return f'{count / 1e6:.2f}M'


def billions(count: int) -> str:
    return f'{count / 1e9:.2f}G'


@pytest.mark.parametrize('family', FAMILIES)
def test_the_readme_table_shows_each_config_with_its_metafile_numbers(
    family,
):
    rows = {
        line.split('](')[1].split(')')[0]: line
        for line in (REPO / 'configs' / family / 'README.md')
        .read_text()
        .splitlines()
        if line.startswith('|') and '.py)' in line
    }
    for model in metafile_models(family):
        name = Path(model['Config']).name
        assert name in rows, f'{name} has no row in the README table'
        cells = [cell.strip() for cell in rows[name].split('|')]
        metadata = model['Metadata']
        assert millions(metadata['Parameters']) in cells, rows[name]
        assert billions(metadata['FLOPs']) in cells, rows[name]


def backbone_key(backbone: dict) -> str:
    """The backbone's arguments, less those that change no count."""
    ignored = ('init_cfg', 'pretrained', 'frozen_stages', 'norm_eval')
    return repr(
        sorted((k, v) for k, v in backbone.items() if k not in ignored)
    )


_counts: dict[str, tuple[int, int]] = {}


def backbone_counts(config: str) -> tuple[int, int]:
    """Parameters and official-form FLOPs (one 224x224 image) of a
    config's backbone; configs with the same backbone are counted once."""
    from mmengine.registry import init_default_scope

    from mmacmix.analysis import analyse, official_form
    from mmacmix.apis import load_config
    from mmacmix.apis.dist import replace_sync_bn

    cfg = load_config(config)
    replace_sync_bn(cfg.model)
    backbone = cfg.model.backbone.to_dict()
    key = f'{cfg.default_scope} {backbone_key(backbone)}'
    if key not in _counts:
        init_default_scope(cfg.default_scope)
        registry = importlib.import_module(f'{cfg.default_scope}.registry')
        model = registry.MODELS.build(backbone)
        with official_form():
            result = analyse(model, (torch.randn(1, 3, 224, 224),))
        _counts[key] = (int(result['params']), int(result['flops']))
    return _counts[key]


def all_entries() -> list[dict]:
    """Every metafile entry (read at collection: one test per config, so
    that pytest-xdist spreads the counting over the workers)."""
    entries = []
    for family in FAMILIES:
        path = REPO / 'configs' / family / 'metafile.yml'
        if path.is_file():
            entries += load(path)['Models']
    return entries


@pytest.mark.parametrize('model', all_entries(), ids=lambda m: m['Name'])
def test_metafile_params_and_flops_equal_those_of_the_config(model):
    params, flops = backbone_counts(str(REPO / model['Config']))
    metadata = model['Metadata']
    assert (metadata['Parameters'], metadata['FLOPs']) == (params, flops), (
        f'{model["Config"]}: metafile {metadata["Parameters"]} params, '
        f'{metadata["FLOPs"]} FLOPs; computed {params}, {flops}'
    )
