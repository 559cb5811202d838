"""The model zoo the OpenMMLab way: ``model-index.yml`` imports one ``metafile.yml`` per config
folder, every config (the toy ones aside) has exactly one entry there, the parameter counts the
entries state are those of the built models, and the results they state are the paper's.

Each model is built once per session from its config, with no pretrained weights to load, and
only its parameters are counted (no forward pass). Each folder's README.md names its configs.
"""
import re
from collections import Counter
from pathlib import Path

import pytest
import yaml

from poolformer_mm.analysis.complexity import build_model_without_pretrained, load_config

REPO = Path(__file__).resolve().parents[2]
INDEX = yaml.safe_load((REPO / 'model-index.yml').read_text())
METAFILES = {path: yaml.safe_load((REPO / path).read_text()) for path in INDEX['Import']}
MODELS = [model for metafile in METAFILES.values() for model in metafile['Models']]
COLLECTIONS = [c for metafile in METAFILES.values() for c in metafile['Collections']]

# The paper (arXiv 2111.11418): Table 3 (COCO val2017, 1x) and Table 4 (ADE20K, Semantic FPN).
PAPER_RESULTS = {
    'retinanet_poolformer_s12': {'box AP': 36.2},
    'retinanet_poolformer_s24': {'box AP': 38.9},
    'retinanet_poolformer_s36': {'box AP': 39.5},
    'mask_rcnn_poolformer_s12': {'box AP': 37.3, 'mask AP': 34.6},
    'mask_rcnn_poolformer_s24': {'box AP': 40.1, 'mask AP': 37.0},
    'mask_rcnn_poolformer_s36': {'box AP': 41.0, 'mask AP': 37.7},
    'fpn_poolformer_s12': {'mIoU': 37.2},
    'fpn_poolformer_s24': {'mIoU': 40.3},
    'fpn_poolformer_s36': {'mIoU': 42.0},
    'fpn_poolformer_m36': {'mIoU': 42.4},
    'fpn_poolformer_m48': {'mIoU': 42.7},
}
TASK_DATASET = {'box AP': ('Object Detection', 'COCO'),
                'mask AP': ('Instance Segmentation', 'COCO'),
                'mIoU': ('Semantic Segmentation', 'ADE20K')}


def zoo_configs():
    """Every config under configs/ except the toy ones, as ``configs/<folder>/<name>.py``."""
    return sorted(str(p.relative_to(REPO)) for p in (REPO / 'configs').rglob('*.py')
                  if 'toy' not in p.relative_to(REPO).parts)


def matches_stated(count: int, stated) -> bool:
    """``count`` equals ``stated`` at the precision it is written: 21652888 or '21.65M'."""
    if isinstance(stated, int):
        return count == stated
    number = re.fullmatch(r'(\d+)(?:\.(\d+))?([KMG])', str(stated).replace(' ', ''))
    assert number, f'parameter count {stated!r} is neither an integer nor like 21.65M'
    scale = {'K': 1e3, 'M': 1e6, 'G': 1e9}[number.group(3)]
    decimals = len(number.group(2) or '')
    return round(count / scale, decimals) == float(f'{number.group(1)}.{number.group(2) or 0}')


@pytest.fixture(scope='session')
def parameter_count():
    """``parameter_count(config)``: the built model's parameters, each config built once."""
    counts = {}

    def count(config):
        if config not in counts:
            model = build_model_without_pretrained(load_config(config))
            counts[config] = sum(p.numel() for p in model.parameters())
        return counts[config]

    return count


def test_the_index_imports_one_metafile_per_config_folder():
    folders = sorted({str(Path(config).parent) for config in zoo_configs()})
    assert INDEX['Import'] == [f'{folder}/metafile.yml' for folder in folders]


def test_every_config_is_in_the_index_exactly_once():
    listed = Counter(model['Config'] for model in MODELS)
    assert sorted(listed) == zoo_configs()
    assert [config for config, times in listed.items() if times > 1] == []


def test_every_entry_names_its_config_and_collection():
    collections = Counter(c['Name'] for c in COLLECTIONS)
    assert [name for name, times in collections.items() if times > 1] == []
    assert Counter(model['Name'] for model in MODELS).most_common(1)[0][1] == 1
    for path, metafile in METAFILES.items():
        for model in metafile['Models']:
            assert (REPO / model['Config']).is_file(), model['Config']
            assert Path(model['Config']).parent == Path(path).parent, model['Name']
            assert model['Name'] == Path(model['Config']).stem
            assert model['In Collection'] in {c['Name'] for c in metafile['Collections']}
            metadata = model['Metadata']
            assert {'Training Data', 'Training Resources', 'Parameters', 'FLOPs'} <= set(metadata)
            assert ('Epochs' in metadata) != ('Iterations' in metadata), model['Name']
        for collection in metafile['Collections']:
            assert collection['README'] == str(Path(path).parent / 'README.md')
            assert (REPO / collection['README']).is_file()
            assert collection['Paper']['URL'].startswith('https://arxiv.org/abs/')
            assert (REPO / collection['Code']['URL']).is_file()


@pytest.mark.parametrize('model', MODELS, ids=lambda model: model['Name'])
def test_stated_parameter_count_is_the_built_models(model, parameter_count):
    count = parameter_count(model['Config'])
    stated = model['Metadata']['Parameters']
    assert matches_stated(count, stated), f'{model["Name"]}: built {count:,}, stated {stated}'


def test_results_are_the_papers_and_only_for_its_models():
    stated = {}
    for model in MODELS:
        for result in model.get('Results', []):
            for metric, value in result['Metrics'].items():
                assert (result['Task'], result['Dataset']) == TASK_DATASET[metric], model['Name']
                stated.setdefault(model['Name'], {})[metric] = value
    assert stated == PAPER_RESULTS


def test_weights_when_given_are_direct_downloads():
    # Google Drive pages are not files: a checkpoint there is downloaded by hand (the READMEs)
    for model in MODELS:
        if 'Weights' in model:
            assert re.match(r'https://\S+\.(pth|pth\.tar)$', model['Weights']), model['Name']


@pytest.mark.parametrize('path', METAFILES, ids=lambda path: str(Path(path).parent))
def test_the_folders_readme_links_every_config_and_names_files_that_exist(path):
    folder = Path(path).parent
    readme = (REPO / folder / 'README.md').read_text()
    links = re.findall(r'\]\(([^)\s#]+)', readme)
    for target in links:
        if not re.match(r'[a-z]+://', target):
            assert (REPO / folder / target).exists(), f'{folder}/README.md links {target}'
    for model in METAFILES[path]['Models']:
        assert Path(model['Config']).name in links, f'{folder}/README.md: no link to {model}'
    for named in re.findall(r'\b(?:tools|configs)/[\w/.-]+\.(?:py|sh)\b', readme):
        assert (REPO / named).is_file(), f'{folder}/README.md names {named}'
