"""The backbone is found from mmdet and mmseg scopes through custom_imports; the converter works."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from poolformer_mm.models import PoolFormer

REPO = Path(__file__).resolve().parents[2]

BUILD_FROM_SCOPE = textwrap.dedent('''
    import sys
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    assert 'poolformer_mm' not in sys.modules
    cfg = Config.fromfile(sys.argv[1])          # runs custom_imports
    init_default_scope(cfg.default_scope)
    if cfg.default_scope == 'mmdet':
        from mmdet.registry import MODELS
    else:
        from mmseg.registry import MODELS
    backbone = MODELS.build(cfg.backbone)
    print(type(backbone).__module__, type(backbone).__name__,
          sum(p.numel() for p in backbone.parameters()))
''')


@pytest.mark.slow
@pytest.mark.parametrize('scope', ['mmdet', 'mmseg'])
def test_backbone_is_built_from_downstream_scope_via_custom_imports(tmp_path, scope):
    config = tmp_path / f'{scope}_cfg.py'
    config.write_text(textwrap.dedent(f'''
        custom_imports = dict(imports=['poolformer_mm'], allow_failed_imports=False)
        default_scope = '{scope}'
        backbone = dict(type='PoolFormer', arch='s12')
    '''))
    result = subprocess.run([sys.executable, '-c', BUILD_FROM_SCOPE, str(config)],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-3:] == [
        'poolformer_mm.models.backbones.poolformer', 'PoolFormer', '11403200']


@pytest.mark.slow
def test_converter_writes_a_backbone_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = PoolFormer('s12')
    src = tmp_path / 'detector.pth'
    torch.save({'state_dict': {'backbone.' + k: v for k, v in model.state_dict().items()}}, src)
    dst = tmp_path / 'backbone.pth'
    result = subprocess.run(
        [sys.executable, str(REPO / 'tools/model_converters/convert_poolformer.py'), str(src),
         str(dst), '--arch', 's12'], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'poolformer_mm layout' in result.stdout
    converted = torch.load(dst, weights_only=True)
    assert converted.keys() == model.state_dict().keys()
    assert all(torch.equal(converted[k], v) for k, v in model.state_dict().items())


@pytest.mark.slow
def test_converter_refuses_a_checkpoint_of_another_arch(tmp_path):
    src = tmp_path / 's12.pth'
    torch.save(PoolFormer('s12').state_dict(), src)
    result = subprocess.run(
        [sys.executable, str(REPO / 'tools/model_converters/convert_poolformer.py'), str(src),
         str(tmp_path / 'out.pth'), '--arch', 's24'], capture_output=True, text=True)
    assert result.returncode != 0
    assert 'different block structure' in result.stderr
    assert not (tmp_path / 'out.pth').exists()
