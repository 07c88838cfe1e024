"""The teacher's own input to and output of each block: computed on the fly, or cached once on disk.

The training signal of a student block is local: ``MSE(student_block(h_in), h_out)`` where ``h_in`` and
``h_out`` are what the frozen teacher feeds into and gets out of that block. No block ever sees another
student's output, so all blocks are independent and can train in any order on any rank.

*On the fly* (:class:`TeacherActivations`), every step runs the teacher under ``no_grad`` with hooks on the
block and stops the forward pass as soon as the deepest requested block has produced its output, so a block
near the input costs only a short teacher prefix. Hooks clone what they capture: an in-place ReLU right after
a bare conv block (torchvision's VGG) would otherwise turn the captured pre-activation target into its ReLU.

*On disk* (:class:`ActivationCache`), one teacher pass over the dataset writes every block's ``(input,
output)`` pairs to two ``.npy`` files per block (through :func:`composer_ext.storage.atomic_dir`), so later
epochs read them instead of recomputing the prefix. :func:`estimate_activation_bytes` gives the size first:
``num_samples x (input elements + output elements) x bytes per element``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from composer_ext.blockwise.discovery import BlockTrace, get_submodule, run_model
from composer_ext.storage import atomic_dir

__all__ = ['ActivationCache', 'TeacherActivations', 'autocast', 'batch_to_device', 'estimate_activation_bytes']

_CACHE_DTYPES = {'float32': (np.float32, torch.float32), 'float16': (np.float16, torch.float16)}


class _StopForward(Exception):
    """Raised from a hook once every requested block has produced its output: the rest of the teacher is skipped."""


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """``torch.autocast`` on ``device`` with ``dtype``, or no autocast at all when ``dtype`` is ``None``."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def batch_to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a (nested tuple/list/dict) batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(batch_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: batch_to_device(v, device) for k, v in batch.items()}
    return batch


class TeacherActivations:
    """Capture the frozen teacher's ``(input, output)`` of some blocks on a batch, stopping after the last one.

    Args:
        teacher: The teacher network; it is put in eval mode and must not require gradients to be useful.
        paths: Block paths to capture.
        autocast_dtype: Run the teacher under ``torch.autocast`` with this dtype (GPU mixed precision), or
            ``None`` for full precision. Captured tensors are returned as float32.

    Example:
        >>> from composer_ext.models import small_vgg
        >>> teacher = small_vgg(widths=[8, 16])
        >>> taps = TeacherActivations(teacher, ['module.features.1'])
        >>> inputs, outputs = taps((torch.randn(4, 1, 8, 8), None))['module.features.1']
        >>> tuple(inputs.shape), tuple(outputs.shape)
        ((4, 8, 8, 8), (4, 8, 8, 8))
    """

    def __init__(self, teacher: nn.Module, paths: Sequence[str], autocast_dtype: Optional[torch.dtype] = None):
        self.teacher = teacher
        self.paths = list(paths)
        self.modules = {path: get_submodule(teacher, path, argument='paths') for path in self.paths}
        self.autocast_dtype = autocast_dtype
        self.device = next(teacher.parameters()).device
        teacher.eval()

    def __call__(self, batch: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if self.teacher.training:
            self.teacher.eval()
        captured: dict[str, list] = {path: [None, None] for path in self.paths}
        remaining = set(self.paths)

        def pre_hook(path):
            def hook(_module, inputs):
                captured[path][0] = inputs[0].detach().float().clone()
            return hook

        def post_hook(path):
            def hook(_module, _inputs, output):
                output = output[0] if isinstance(output, (tuple, list)) else output
                captured[path][1] = output.detach().float().clone()
                remaining.discard(path)
                if not remaining:
                    raise _StopForward
            return hook

        handles = []
        for path, module in self.modules.items():
            handles.append(module.register_forward_pre_hook(pre_hook(path)))
            handles.append(module.register_forward_hook(post_hook(path)))
        batch = batch_to_device(batch, self.device)
        try:
            with torch.no_grad(), autocast(self.device, self.autocast_dtype):
                run_model(self.teacher, batch)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        if remaining:
            raise ValueError(f'blocks {sorted(remaining)} did not run in the teacher\'s forward pass. Fix: choose '
                             f'modules that the forward pass calls.')
        return {path: (captured[path][0], captured[path][1]) for path in self.paths}


def estimate_activation_bytes(trace: BlockTrace, num_samples: int, dtype: str = 'float32') -> int:
    """Disk bytes of one block's cached teacher activations: ``N x (in + out elements) x element size``."""
    if dtype not in _CACHE_DTYPES:
        raise ValueError(f'dtype={dtype!r} is not a cache dtype. Fix: use one of {list(_CACHE_DTYPES)}.')
    return int(num_samples) * (trace.input_numel + trace.output_numel) * np.dtype(_CACHE_DTYPES[dtype][0]).itemsize


class ActivationCache:
    """One block's teacher ``(input, output)`` for every sample of a dataset, as two memory-mapped ``.npy`` files.

    Build the caches of several blocks in one teacher pass with :meth:`build`; read batches by sample index
    with :meth:`batch`. A cache whose ``meta.json`` fingerprint differs from the requested one is rebuilt.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._arrays: Optional[tuple[np.ndarray, np.ndarray]] = None

    def __repr__(self) -> str:
        return f'ActivationCache({str(self.folder)!r})'

    def matches(self, fingerprint: dict) -> bool:
        meta = self.folder / 'meta.json'
        return meta.exists() and json.loads(meta.read_text()).get('fingerprint') == fingerprint

    def batch(self, indices: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached ``(inputs, outputs)`` of the samples ``indices``, as float32 tensors on ``device``."""
        if self._arrays is None:
            self._arrays = (np.load(self.folder / 'inputs.npy', mmap_mode='r'),
                            np.load(self.folder / 'outputs.npy', mmap_mode='r'))
        order = np.asarray(indices, dtype=np.int64)
        sorted_positions = np.argsort(order, kind='stable')
        rows = order[sorted_positions]  # sorted reads from the memory map, then back to the requested order
        inverse = np.empty_like(sorted_positions)
        inverse[sorted_positions] = np.arange(len(order))
        tensors = []
        for array in self._arrays:
            values = torch.from_numpy(np.ascontiguousarray(array[rows][inverse]))
            tensors.append(values.to(device=device, dtype=torch.float32))
        return tensors[0], tensors[1]

    def remove(self) -> None:
        self._arrays = None
        shutil.rmtree(self.folder, ignore_errors=True)

    @classmethod
    def build(cls, folders: dict[str, Path], teacher: nn.Module, traces: dict[str, BlockTrace], dataset: Any,
              batch_size: int, fingerprints: dict[str, dict], dtype: str = 'float32', num_workers: int = 0,
              autocast_dtype: Optional[torch.dtype] = None, progress: bool = False) -> dict[str, 'ActivationCache']:
        """Cache the blocks ``folders`` names in one pass over ``dataset`` (in index order).

        Caches that already match their fingerprint are reused; the others are written to a temporary
        directory and renamed into place only when complete.
        """
        from tqdm.auto import tqdm

        if dtype not in _CACHE_DTYPES:
            raise ValueError(f'cache_dtype={dtype!r} is not a cache dtype. Fix: use one of {list(_CACHE_DTYPES)}.')
        caches = {path: cls(folder) for path, folder in folders.items()}
        todo = [path for path, cache in caches.items() if not cache.matches(fingerprints[path])]
        if not todo:
            return caches
        for path in todo:
            folder = caches[path].folder
            for stale in folder.parent.glob(f'.{folder.name}.tmp-*'):
                shutil.rmtree(stale, ignore_errors=True)
        np_dtype = _CACHE_DTYPES[dtype][0]
        n = len(dataset)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        taps = TeacherActivations(teacher, todo, autocast_dtype=autocast_dtype)
        with contextlib.ExitStack() as stack:
            tmp = {path: stack.enter_context(atomic_dir(caches[path].folder)) for path in todo}
            arrays = {}
            for path in todo:
                trace = traces[path]
                arrays[path] = (
                    np.lib.format.open_memmap(tmp[path] / 'inputs.npy', mode='w+', dtype=np_dtype,
                                              shape=(n, *trace.input_shape)),
                    np.lib.format.open_memmap(tmp[path] / 'outputs.npy', mode='w+', dtype=np_dtype,
                                              shape=(n, *trace.output_shape)),
                )
            start = 0
            for batch in tqdm(loader, desc='caching teacher activations', disable=not progress, leave=False):
                captured = taps(batch)
                stop = start + len(next(iter(captured.values()))[0])
                for path in todo:
                    inputs, outputs = captured[path]
                    arrays[path][0][start:stop] = inputs.cpu().numpy().astype(np_dtype)
                    arrays[path][1][start:stop] = outputs.cpu().numpy().astype(np_dtype)
                start = stop
            for path in todo:
                for array in arrays[path]:
                    array.flush()
                del arrays[path]
                (tmp[path] / 'meta.json').write_text(json.dumps({'fingerprint': fingerprints[path], 'num_samples': n,
                                                                 'dtype': dtype}, sort_keys=True))
        return caches
