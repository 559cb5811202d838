"""Checkpoints of mmengine Runners load under torch's weights_only=True, and only those."""
import argparse
import os
import pickle

import pytest
import torch
import torch.nn as nn
from mmengine.logging.history_buffer import HistoryBuffer
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch.utils.data import Dataset

import poolformer_mm  # noqa: F401  (registers the allow-list)


class _PairsDataset(Dataset):

    def __len__(self):
        return 8

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(index)
        x = torch.randn(4, generator=generator)
        return dict(inputs=x, targets=x.sum().reshape(1))


class _TinyRegressor(BaseModel):

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, inputs, targets, mode='tensor'):
        loss = ((self.linear(inputs) - targets)**2).mean()
        return dict(loss=loss) if mode == 'loss' else [loss]


def _runner(work_dir, max_epochs, resume=False):
    return Runner(
        model=_TinyRegressor(),
        work_dir=str(work_dir),
        train_dataloader=dict(dataset=_PairsDataset(), sampler=dict(type='DefaultSampler',
                              shuffle=False), batch_size=4, num_workers=0,
                              collate_fn=dict(type='default_collate')),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
        train_cfg=dict(by_epoch=True, max_epochs=max_epochs),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=1),
                           logger=dict(type='LoggerHook', interval=1)),
        resume=resume,
        default_scope='mmengine',
        env_cfg=dict(dist_cfg=dict(backend='gloo')),
        experiment_name=f'tiny_{max_epochs}_{resume}')


def test_runner_checkpoint_resumes_with_weights_only_loading(tmp_path):
    _runner(tmp_path, max_epochs=1).train()
    checkpoint = tmp_path / 'epoch_1.pth'
    assert checkpoint.is_file()
    # The load itself is the weights_only=True default of torch >= 2.6 plus our allow-list.
    content = torch.load(checkpoint, weights_only=True)
    assert content['meta']['epoch'] == 1
    assert 'message_hub' in content

    resumed = _runner(tmp_path, max_epochs=2, resume=True)
    resumed.train()
    assert resumed.epoch == 2
    assert resumed.iter == 4  # 2 iterations per epoch, the first epoch came from the checkpoint


class _WritesMarker:
    """A pickle payload that would create a file when unpickled by an unsafe loader."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}', ))


def test_checkpoint_whose_pickle_runs_code_is_refused(tmp_path):
    marker = tmp_path / 'marker'
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': {}, 'payload': _WritesMarker(marker)}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    assert not marker.exists()


class _GetattrOf:

    def __init__(self, owner, name):
        self.owner, self.name = owner, name

    def __reduce__(self):
        return (getattr, (self.owner, self.name))


def test_allow_listed_getattr_reaches_history_buffer_statistics(tmp_path):
    path = tmp_path / 'getattr_ok.pth'
    torch.save({'method': _GetattrOf(HistoryBuffer, 'mean')}, path)
    assert torch.load(path, weights_only=True)['method'] is HistoryBuffer.mean


def test_allow_listed_getattr_refuses_anything_else(tmp_path):
    path = tmp_path / 'getattr_bad.pth'
    torch.save({'escape': _GetattrOf(HistoryBuffer, '__subclasses__')}, path)
    with pytest.raises((pickle.UnpicklingError, AttributeError), match='HistoryBuffer'):
        torch.load(path, weights_only=True)


def test_checkpoint_pickled_under_the_other_numpy_major_version_loads(tmp_path):
    """numpy 1 pickles its scalars as numpy.core.multiarray.scalar, numpy 2 as numpy._core...;
    an mmengine checkpoint's message hub holds such scalars and arrays."""
    import zipfile

    import numpy as np

    from poolformer_mm.checkpoint_io import load_from_local_weights_only
    torch.save({'meta': {'x': np.float64(2.5), 'a': np.arange(3)}}, tmp_path / 'this.pth')
    this = '_core' if hasattr(np, '_core') else 'core'
    other = 'core' if this == '_core' else '_core'
    with zipfile.ZipFile(tmp_path / 'this.pth') as src, \
            zipfile.ZipFile(tmp_path / 'other.pth', 'w') as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith('data.pkl'):
                assert f'numpy.{this}.multiarray'.encode() in data
                data = data.replace(f'numpy.{this}.multiarray'.encode(),
                                    f'numpy.{other}.multiarray'.encode())
            dst.writestr(info, data)
    loaded = load_from_local_weights_only(str(tmp_path / 'other.pth'))
    assert loaded['meta']['x'] == 2.5 and loaded['meta']['a'].tolist() == [0, 1, 2]


def test_refusal_names_the_object_the_pickle_asked_for(tmp_path):
    from poolformer_mm.checkpoint_io import load_from_local_weights_only
    marker = tmp_path / 'marker'
    torch.save({'payload': _WritesMarker(marker)}, tmp_path / 'evil.pth')
    with pytest.raises(ValueError, match=r'Loader said: .*GLOBAL (posix|os)\.system'):
        load_from_local_weights_only(str(tmp_path / 'evil.pth'))
    assert not marker.exists()


def test_timm_train_checkpoint_args_namespace_loads(tmp_path):
    """timm's train.py saves its command line as ``args``, an argparse.Namespace."""
    args = argparse.Namespace(model='poolformer_s12', lr=1e-3, epochs=300, sched='cosine',
                              input_size=None, mean=[0.485, 0.456, 0.406], model_ema=True)
    torch.save({'state_dict': {'w': torch.ones(2)}, 'args': args, 'epoch': 299}, tmp_path / 'a.pth')
    loaded = torch.load(tmp_path / 'a.pth', weights_only=True)
    assert loaded['args'] == args
    assert type(loaded['args']) is argparse.Namespace


@pytest.mark.parametrize('payload', ['function', 'object that runs code'])
def test_namespace_carrying_anything_not_allow_listed_is_refused(tmp_path, payload):
    from poolformer_mm.checkpoint_io import load_from_local_weights_only
    marker = tmp_path / 'marker'
    value = os.system if payload == 'function' else _WritesMarker(marker)
    torch.save({'args': argparse.Namespace(model='poolformer_s12', hook=value)},
               tmp_path / 'evil.pth')
    with pytest.raises(ValueError, match=r'refused to load .*said: .*(system|_WritesMarker)'):
        load_from_local_weights_only(str(tmp_path / 'evil.pth'))
    assert not marker.exists()
