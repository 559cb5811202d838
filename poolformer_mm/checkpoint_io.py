"""Safe checkpoint I/O: what importing ``poolformer_mm`` changes in torch and mmengine, and why.

:func:`register_safe_checkpoint_io` (called on import) changes three things for the whole
process, since mmengine's Runner, its ``Pretrained`` initialiser and the upstream tools all load
and save through mmengine's module-level registries:

1. **torch's weights-only allow-list** gains exactly what an mmengine 0.10.7 Runner checkpoint
   holds besides tensors (``HistoryBuffer``, numpy arrays, dtypes and scalars, ``getattr`` only
   for ``HistoryBuffer``'s own methods) and ``argparse.Namespace`` (the ``args`` of a timm
   ``train.py`` checkpoint). torch >= 2.6 loads with ``weights_only=True``, so without them
   ``--resume`` and ``tools/test.py`` fail (open-mmlab/mmengine#1597); allowing a few globals
   instead of turning the check off keeps a malicious checkpoint from running code. Every load
   here allows them again for its own call, as another library (timm) may take entries off.
2. **mmengine's checkpoint loaders**, one per scheme (local paths, ``http(s)://``,
   ``torchvision://``, ``open-mmlab://``, ``mmcls://``, ``s3://``; ``pavi://`` is refused):
   mmengine's own unpickle arbitrary code (a bare ``torch.load`` on torch < 2.6, and its
   ``load_url``). Ours fetch the bytes as mmengine does and unpickle with ``weights_only=True``;
   ``.safetensors`` files (timm's weights on the Hugging Face Hub) are read by ``safetensors``.
   A URL is looked for in ``checkpoints/`` (in the working directory), then in the torch hub
   cache, and only then downloaded into that cache with a timeout: without network, one error
   names the URL and both places within seconds.
3. **mmengine's local file backend** writes in place, so a killed job leaves a truncated
   ``epoch_N.pth``. Ours writes a temporary file in the same folder (mode as the umask gives) and
   renames it over the target, atomically on POSIX: a reader sees the old or the new file.
"""
import argparse
import contextlib
import hashlib
import http.client
import io
import os
import os.path as osp
import pickle
import re
import secrets
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import BinaryIO, Optional, Union
from urllib.parse import urlparse

import numpy as np
import torch
from mmengine.dist import barrier, get_dist_info
from mmengine.fileio.backends import LocalBackend, register_backend
from mmengine.logging import print_log
from mmengine.logging.history_buffer import HistoryBuffer
from mmengine.runner import checkpoint as mm_checkpoint
from mmengine.runner.checkpoint import CheckpointLoader
from tqdm import tqdm

from .utils.errors import CheckpointUnavailableError, InvalidInputError

# Temporary files of an interrupted write are named '.<target>.incomplete-<random>.tmp'.
INCOMPLETE_MARK = '.incomplete-'


# ------------------------------------------------------------------ 1. weights-only allow-list
def _history_buffer_getattr(obj, name):
    """Stand-in for ``builtins.getattr`` while unpickling: pickle stores ``HistoryBuffer``'s
    statistics methods as ``getattr(HistoryBuffer, 'min')``; only such lookups are allowed."""
    if obj is HistoryBuffer and callable(vars(HistoryBuffer).get(name)):
        return getattr(obj, name)
    raise AttributeError(f'checkpoint asks for attribute {name!r} of {obj!r}; only methods of '
                         'mmengine HistoryBuffer may be looked up while loading a checkpoint')


def mmengine_checkpoint_globals() -> list:
    """The globals an mmengine 0.10.7 Runner checkpoint needs under ``weights_only=True``."""
    core = getattr(np, '_core', None) or np.core  # numpy 2 renamed numpy.core to numpy._core
    found = [HistoryBuffer, (_history_buffer_getattr, 'builtins.getattr'),
             core.multiarray._reconstruct, core.multiarray.scalar, np.ndarray, np.dtype]
    # checkpoints pickled under the other numpy major version name the functions the other way
    for module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
        found += [(core.multiarray._reconstruct, f'{module}._reconstruct'),
                  (core.multiarray.scalar, f'{module}.scalar')]
    # every concrete dtype class (Float64DType ...): plain type objects that run no code
    dtype_classes = getattr(np, 'dtypes', None)
    if dtype_classes is not None:
        found += [getattr(dtype_classes, n) for n in dir(dtype_classes) if n.endswith('DType')]
    return found


def timm_checkpoint_globals() -> list:
    """The globals a timm ``train.py`` checkpoint needs besides tensors: its ``args``. torch
    fills an allow-listed class's ``__dict__`` through the same restricted unpickler, so a
    Namespace carrying anything not allow-listed is still refused."""
    return [argparse.Namespace]


@contextlib.contextmanager
def allowed_checkpoint_globals():
    """Allow both lists of globals for the loads inside this context, whatever another library
    did to torch's process-wide allow-list; on exit only the entries added here are removed."""
    present = torch.serialization.get_safe_globals()
    missing = [entry for entry in mmengine_checkpoint_globals() + timm_checkpoint_globals()
               if entry not in present]
    with torch.serialization.safe_globals(missing):
        yield


# ----------------------------------------------------------------------------- 2. the loaders
def _torch_load_weights_only(source: Union[str, BinaryIO], name: str, map_location=None):
    """``torch.load(source, weights_only=True)`` with one clear error for a refused file."""
    try:
        with warnings.catch_warnings():
            # bytes that are not a checkpoint read as an odd pickle protocol: the error says so
            warnings.filterwarnings('ignore', message='Detected pickle protocol')
            with allowed_checkpoint_globals():
                return torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        lines = str(err).splitlines()
        # torch's first line is generic; the one naming the refused object says what it was
        named = next((line.strip() for line in lines[1:] if 'GLOBAL' in line or
                      'Unsupported' in line), lines[0] if lines else '')
        raise InvalidInputError(
            f"refused to load '{name}': its pickle asks for something other than tensors and the "
            'allow-listed mmengine and timm objects, so it could run code when loaded (or it is '
            'not a checkpoint). Only load it if you trust its source, and convert it to a plain '
            f'state dict. Loader said: {named}') from None
    except Exception as err:
        # bytes that are not a checkpoint fail the restricted unpickler in many ways (IndexError,
        # KeyError, EOFError, RuntimeError ...); every one means the same to the user
        first_line = (str(err).splitlines() or [''])[0]
        raise InvalidInputError(f"'{name}' is not a readable PyTorch checkpoint (truncated, or "
                                f'another kind of file): {type(err).__name__}: {first_line}'
                                ) from None


def is_safetensors_file(path: str) -> bool:
    """Whether ``path`` starts as a safetensors file does (an 8-byte little-endian header length
    that fits in the file, then ``{``), so a ``.pth`` that is really safetensors is found too."""
    with open(path, 'rb') as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b'{':
        return False
    return int.from_bytes(head[:8], 'little') <= osp.getsize(path) - 8


def load_weights_only(path: str, name: Optional[str] = None, map_location=None):
    """A local checkpoint file read without running code: safetensors (by extension or
    header) through ``safetensors``, anything else through ``torch.load(weights_only=True)``.
    ``name`` is what messages call the file (its URL, for a downloaded one)."""
    name = name or path
    if not (path.endswith('.safetensors') or is_safetensors_file(path)):
        return _torch_load_weights_only(path, name, map_location)
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:  # an environment installed before it became a dependency
        raise ImportError(f"reading '{name}' needs the safetensors package, a dependency of "
                          'poolformer-mm: pip install safetensors') from None
    device = map_location if isinstance(map_location, (str, torch.device)) else 'cpu'
    try:
        return load_file(path, device=str(device))
    except (SafetensorError, OSError, ValueError) as err:
        raise InvalidInputError(
            f"'{name}' is not a readable safetensors file (truncated or corrupt: "
            f'{str(err).splitlines()[0]}); download it again') from None


def load_from_local_weights_only(filename: str, map_location=None):
    # (mmengine logs "Loads checkpoint by <name minus 'load_from_'> backend")
    """A local checkpoint, read with ``weights_only=True`` (or as safetensors)."""
    filename = osp.expanduser(filename)
    check_checkpoint_path(filename)
    return load_weights_only(filename, filename, map_location)


def is_remote_checkpoint(path: str) -> bool:
    """Whether ``path`` names a checkpoint through a scheme (URL, ``open-mmlab://`` ...)."""
    return CheckpointLoader._get_checkpoint_loader(str(path)) is not load_from_local_weights_only


def check_checkpoint_path(path: str, what: str = 'checkpoint') -> None:
    """Raise :class:`~poolformer_mm.utils.errors.CheckpointUnavailableError` (a FileNotFoundError)
    naming ``what`` when ``path`` is neither a file nor a scheme."""
    if is_remote_checkpoint(path) or osp.isfile(osp.expanduser(path)):
        return
    if osp.isdir(osp.expanduser(path)):
        raise CheckpointUnavailableError(f"{what} '{path}' is a folder: give the checkpoint "
                                         'file in it (e.g. its latest iter_N.pth or epoch_N.pth)')
    raise CheckpointUnavailableError(f"{what} '{path}' not found")


# ------------------------------------------------------------------- URLs: where they are kept
# Where (relative to the working directory) the README tells users to download weights.
LOCAL_CHECKPOINT_DIR = 'checkpoints'
# Seconds one network operation (connect, each read) may block: no network fails in seconds, a
# slow but live download keeps going.
DOWNLOAD_TIMEOUT_S = 20
# Hugging Face Hub file URLs: <host>/<owner>/<repo>/resolve/<revision>/<file>; their file names
# (model.safetensors, pytorch_model.bin) are the same for every model.
_HF_RESOLVE_URL = re.compile(r'^/(?P<owner>[^/]+)/(?P<repo>[^/]+)/resolve/(?P<revision>[^/]+)/'
                             r'(?:.+/)?(?P<file>[^/]+)$')
_HF_GENERIC_NAME = re.compile(r'^(?:pytorch_)?model(?P<ext>\.[A-Za-z]+)$')


def checkpoint_file_name(url: str) -> str:
    """The file name ``url`` is kept under, in ``checkpoints/`` and in the torch hub cache.

    That is the URL's own file name, except for the Hugging Face Hub's per-model files:
    ``.../timm/convformer_s18.sail_in1k/resolve/main/model.safetensors`` is kept as
    ``convformer_s18.sail_in1k.safetensors``, another owner's or revision's as
    ``<owner>--<repo>--<revision>.safetensors``, so that two models' weights never collide.
    """
    path = urlparse(url).path
    name = osp.basename(path)
    if not name:
        raise InvalidInputError(f"checkpoint URL '{url}' does not end in a file name")
    hub = _HF_RESOLVE_URL.match(path)
    generic = _HF_GENERIC_NAME.match(name)
    if hub and generic:
        if (hub['owner'], hub['revision']) == ('timm', 'main'):  # the name earlier versions gave
            return hub['repo'] + generic['ext']
        return f"{hub['owner']}--{hub['repo']}--{hub['revision']}{generic['ext']}"
    return name


def local_checkpoint_path(url: str) -> str:
    """Where a user may put ``url``'s file by hand: ``checkpoints/<name>`` in the working
    directory (the tools run from the repository)."""
    return osp.join(LOCAL_CHECKPOINT_DIR, checkpoint_file_name(url))


def _hub_folder() -> str:
    return osp.join(torch.hub.get_dir(), 'checkpoints')


def cached_checkpoint_path(url: str) -> str:
    """Where ``url`` is kept in the torch hub cache: ``<hash of the URL>-<file name>`` (two URLs
    of one file name never share a file), or the plain name earlier versions used, if present."""
    folder = _hub_folder()
    name = checkpoint_file_name(url)
    if osp.isfile(osp.join(folder, name)):
        return osp.join(folder, name)
    return osp.join(folder, f'{hashlib.sha256(url.encode()).hexdigest()[:8]}-{name}')


def _unavailable(url: str, reason: str) -> CheckpointUnavailableError:
    return CheckpointUnavailableError(
        f"checkpoint '{url}' is not available here: {reason}. Without network access, download "
        f"it elsewhere and put it at '{osp.abspath(local_checkpoint_path(url))}' (checkpoints/ "
        f"in the directory you run from) or at '{_hub_folder()}/{checkpoint_file_name(url)}' "
        '(the torch hub cache; set TORCH_HOME to move it), or give the local file path instead '
        'of the URL')


@contextlib.contextmanager
def _replaced_atomically(target: Union[str, Path]):
    """Yield a temporary path in ``target``'s folder, renamed over ``target`` when the block
    succeeds and removed otherwise."""
    folder = osp.dirname(osp.abspath(target))
    os.makedirs(folder, exist_ok=True)
    tmp_path = osp.join(folder, f'.{osp.basename(target)}{INCOMPLETE_MARK}'
                        f'{secrets.token_hex(4)}.tmp')
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if osp.exists(tmp_path):
            os.remove(tmp_path)


def _download(url: str, dst: str, timeout: float) -> None:
    """Stream ``url`` to ``dst``, kept only once complete and readable as a checkpoint."""
    request = urllib.request.Request(url, headers={'User-Agent': 'poolformer-mm'})
    with _replaced_atomically(dst) as tmp_path:
        with urllib.request.urlopen(request, timeout=timeout) as response, \
                open(tmp_path, 'wb') as f:
            expected = response.headers.get('Content-Length')
            expected = int(expected) if expected and expected.isdigit() else None
            received = 0
            with tqdm(total=expected, unit='B', unit_scale=True, unit_divisor=1024,
                      disable=not os.isatty(2)) as progress:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    received += len(chunk)
                    progress.update(len(chunk))
            # http.client returns a short body without an error when the connection drops
            if expected is not None and received != expected:
                raise OSError(f'connection closed after {received} of {expected} bytes')
        # a server that sends no length, or too small a one, ends a cut body without a sign
        load_weights_only(tmp_path, url, map_location='cpu')


def download_checkpoint(url: str) -> str:
    """Download ``url`` into the torch hub cache unless it is there already; return the path.
    In a distributed job the first process of each machine downloads while the others wait;
    failing, :class:`~poolformer_mm.utils.errors.CheckpointUnavailableError` names the URL and
    where to put the file."""
    cached = cached_checkpoint_path(url)
    rank, world_size = get_dist_info()
    # (mmengine's get_local_rank needs a local process group, which its launchers do not make)
    local_rank = int(os.environ.get('LOCAL_RANK', rank)) if world_size > 1 else 0
    if local_rank == 0 and not osp.isfile(cached):
        print_log(f'Downloading {url} to {cached}', logger='current')
        try:
            _download(url, cached, DOWNLOAD_TIMEOUT_S)
        except InvalidInputError as err:
            raise InvalidInputError(f'{err} (downloaded from the URL; nothing was kept)') from None
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as err:
            # URLError wraps DNS and connection errors (its reason says which), socket timeouts
            # are OSErrors, an HTTPError's text has the status code; HTTPExceptions are a cut
            # chunked body (IncompleteRead) or a reply that is not HTTP (BadStatusLine)
            reason = err if isinstance(err, urllib.error.HTTPError) else (
                getattr(err, 'reason', None) or err)
            if isinstance(err, http.client.HTTPException):
                reason = f'the connection broke, or the reply is not HTTP: {err!r}'
            raise _unavailable(url, f'could not download it ({reason})') from None
    if world_size > 1:
        barrier()
    if not osp.isfile(cached):
        raise _unavailable(url, f"it was not downloaded to '{cached}' (a multi-machine job "
                           'needs the torch hub cache on every machine)')
    return cached


def load_from_http_weights_only(url: str, map_location=None):
    """An ``http(s)://`` checkpoint, read weights-only from ``checkpoints/<name>`` if the user
    put it there, else from the torch hub cache's copy, downloaded if missing."""
    path = local_checkpoint_path(url)
    if osp.isfile(path):
        print_log(f"Using the local copy '{path}' of {url}", logger='current')
    else:
        path = download_checkpoint(url)
    try:
        return load_weights_only(path, url, map_location)
    except ValueError as err:
        raise InvalidInputError(f"{err} (read from '{path}'; delete that file to download it "
                                'again)') from None


def load_from_model_zoo_weights_only(filename: str, map_location=None):
    """``torchvision://NAME`` (``modelzoo://``), ``open-mmlab://NAME`` (``openmmlab://``) or
    ``mmcls://NAME`` (an mmcls classifier's backbone, as mmengine returns it): the file mmengine
    lists for NAME, read weights-only."""
    scheme, name = filename.split('://', 1)
    if scheme in ('torchvision', 'modelzoo'):
        urls, owner = mm_checkpoint.get_torchvision_models(), 'torchvision has'
    elif scheme == 'mmcls':
        urls, owner = mm_checkpoint.get_mmcls_models(), 'mmcls lists'
    else:
        name = mm_checkpoint.get_deprecated_model_names().get(name, name)
        urls, owner = mm_checkpoint.get_external_models(), 'OpenMMLab lists'
    if name not in urls:
        raise KeyError(f"'{filename}': {owner} no model weights named '{name}'")
    if urls[name].startswith(('http://', 'https://')):
        checkpoint = load_from_http_weights_only(urls[name], map_location)
    else:  # open-mmlab:// names some files in mmengine's home
        checkpoint = load_from_local_weights_only(
            osp.join(mm_checkpoint._get_mmengine_home(), urls[name]), map_location)
    return mm_checkpoint._process_mmcls_checkpoint(checkpoint) if scheme == 'mmcls' else checkpoint


def refuse_pavi(filename: str, map_location=None):
    """``pavi://PATH``: refused with what to do (mmengine's loader would unpickle it unchecked,
    and no pavi server is at hand to test a safe one against)."""
    raise CheckpointUnavailableError(f"'{filename}': pavi:// checkpoints are not read here; "
                                     "download the file with pavi's client and give its path")


def load_from_ceph_weights_only(filename: str, map_location=None, backend: str = 'petrel'):
    """``s3://`` / ``petrel://`` objects, read through mmengine's file backend, weights-only."""
    file_backend = mm_checkpoint.get_file_backend(filename, backend_args={'backend': backend})
    with io.BytesIO(file_backend.get(filename)) as buffer:
        return _torch_load_weights_only(buffer, filename, map_location)


# Every prefix mmengine 0.10.7 registers, mapped to the loader that replaces its own.
SAFE_LOADERS = {
    '': load_from_local_weights_only,
    ('http://', 'https://'): load_from_http_weights_only,
    ('modelzoo://', 'torchvision://', 'open-mmlab://', 'openmmlab://', 'mmcls://'):
        load_from_model_zoo_weights_only,
    'pavi://': refuse_pavi,
    (r'(\S+\:)?s3://', r'(\S+\:)?petrel://'): load_from_ceph_weights_only,
}


# ----------------------------------------------------------------------- 3. atomic writing
class AtomicLocalBackend(LocalBackend):
    """mmengine's local backend, but ``put``/``put_text`` replace the target atomically."""

    def put(self, obj: bytes, filepath: Union[str, Path]) -> None:
        self._replace(filepath, obj)

    def put_text(self, obj: str, filepath: Union[str, Path], encoding: str = 'utf-8') -> None:
        self._replace(filepath, obj.encode(encoding))

    @staticmethod
    def _replace(filepath: Union[str, Path], data: bytes) -> None:
        with _replaced_atomically(filepath) as tmp_path:
            # 0o666 minus the umask, as open(..., 'wb') would give (mkstemp would force 0600)
            fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(fd, 'wb') as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())


def remove_incomplete_writes(folder: str) -> list:
    """Delete the temporary files that writes killed before their rename left in ``folder``."""
    removed = []
    if osp.isdir(folder):
        for name in os.listdir(folder):
            if name.startswith('.') and INCOMPLETE_MARK in name and name.endswith('.tmp'):
                os.remove(osp.join(folder, name))
                removed.append(name)
    return sorted(removed)


def register_safe_checkpoint_io() -> None:
    """Make the three changes of this module's docstring (idempotent)."""
    torch.serialization.add_safe_globals(mmengine_checkpoint_globals() +
                                         timm_checkpoint_globals())
    for prefixes, loader in SAFE_LOADERS.items():
        CheckpointLoader.register_scheme(prefixes=prefixes, loader=loader, force=True)
    register_backend('local', AtomicLocalBackend, force=True, prefixes='')
