"""The score index: per-sample reference-model scores of one MDS directory, in a sidecar directory.

Written by ``composer-ext score`` (:func:`composer_ext.perplexity_pruning.scoring.score_mds`), read by
``composer-ext select``. Array position = global sample id of the MDS directory (see :mod:`composer_ext.data.mds`)::

    SCORES_DIR/
      meta.json            what was scored and how: model, tokenizer, data fingerprints, scoring settings,
                           which samples were excluded because they trained the reference model
      shards/00007.npz     one shard's scores, written atomically ...
      shards/00007.json    ... then its completion marker (the npz's SHA-256 and the shard file's SHA-256)
      mean_nll.npy         float64, mean token negative log-likelihood in nats (NaN where not scored)
      perplexity.npy       float64, exp(mean_nll)
      num_tokens.npy       int64, scored (target) tokens: padding and context-only tokens are not counted
      status.npy           int8, 0 scored / 1 excluded (trained the reference model) / 2 fewer than 2 tokens
      domain.npy           int16 codes into index.json's "domains" (the MDS ``domain`` column)
      uid.npy              the MDS ``uid`` column (when present)
      index.json           written last: the arrays' SHA-256s and a summary. No index.json = not complete.

Every file is written atomically (:mod:`composer_ext.storage`), and only ``index.json`` makes the index
complete, so a killed scorer never leaves something that reads as a finished index; rerunning it resumes
from the shards whose markers are present.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from composer_ext.core.provenance import bytes_sha256, json_sha256
from composer_ext.data.mds import MDSDataset
from composer_ext.storage import atomic_write_bytes, atomic_write_json, npz_bytes

__all__ = ['FORMAT', 'STATUS_SCORED', 'STATUS_REFERENCE', 'STATUS_TOO_SHORT', 'ScoreIndex', 'ScoreIndexError',
           'ScoreIndexWriter']

FORMAT = 'composer_ext.score_index/v1'
STATUS_SCORED, STATUS_REFERENCE, STATUS_TOO_SHORT = 0, 1, 2
STATUS_NAMES = {STATUS_SCORED: 'scored', STATUS_REFERENCE: 'excluded_reference', STATUS_TOO_SHORT: 'too_short'}
_ARRAYS = ('mean_nll', 'perplexity', 'num_tokens', 'status', 'domain')
_SHARD_ARRAYS = ('nll_sum', 'num_tokens', 'status', 'domain', 'uid')


class ScoreIndexError(ValueError):
    """A score index that is missing, incomplete, corrupted, or describes other data / another model."""


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


class ScoreIndex:
    """A complete score index, loaded and verified (every array's SHA-256 against ``index.json``).

    Args:
        path: The ``--out`` directory of ``composer-ext score``.

    Raises:
        ScoreIndexError: the directory is missing, scoring has not finished, or a file was altered.

    Example:
        .. code-block:: python

            from composer_ext.perplexity_pruning.score_index import ScoreIndex
            scores = ScoreIndex('runs/ppl/scores')
            scores.perplexity[scores.scored]       # perplexities of the scored samples
            scores.domains                         # the domain of every sample
    """

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ScoreIndexError(f'scores={str(path)!r} does not exist. Fix: write a score index first with '
                                  f'`composer-ext score --model CKPT --data MDS_DIR --out {path}`.')
        index_file = self.path / 'index.json'
        if not index_file.exists():
            done = len(list((self.path / 'shards').glob('[0-9]*.json'))) if (self.path / 'shards').is_dir() else 0
            meta = self.path / 'meta.json'
            if not meta.exists():
                raise ScoreIndexError(f'scores={str(path)!r} is not a score index (no index.json, no meta.json). '
                                      f'Fix: pass the --out directory of `composer-ext score`.')
            total = json.loads(meta.read_text())['data']['num_shards']
            raise ScoreIndexError(f'scores={str(path)!r} is incomplete: scoring stopped after {done} of {total} '
                                  f'shards. Fix: rerun the same `composer-ext score` command; it resumes there.')
        self.index = json.loads(index_file.read_text())
        if self.index.get('format') != FORMAT:
            raise ScoreIndexError(f'{index_file} has format {self.index.get("format")!r}, not {FORMAT!r}. Fix: '
                                  f'rescore with this version of composer_ext (--overwrite).')
        self.meta = json.loads((self.path / 'meta.json').read_text())
        self.num_samples = int(self.index['num_samples'])
        arrays = {}
        for name, digest in self.index['arrays'].items():
            data = (self.path / f'{name}.npy').read_bytes() if (self.path / f'{name}.npy').exists() else b''
            if bytes_sha256(data) != digest:
                raise ScoreIndexError(f'{self.path / (name + ".npy")} is missing or does not match index.json '
                                      f'(altered after scoring). Fix: rescore with --overwrite.')
            arrays[name] = np.load(io.BytesIO(data), allow_pickle=False)
            if len(arrays[name]) != self.num_samples:
                raise ScoreIndexError(f'{name}.npy has {len(arrays[name])} entries, index.json says '
                                      f'{self.num_samples}. Fix: rescore with --overwrite.')
        self.mean_nll: np.ndarray = arrays['mean_nll']
        self.perplexity: np.ndarray = arrays['perplexity']
        self.num_tokens: np.ndarray = arrays['num_tokens']
        self.status: np.ndarray = arrays['status']
        self.domain_codes: np.ndarray = arrays['domain']
        self.uids: Optional[np.ndarray] = arrays.get('uid')
        self.domain_names: list[str] = list(self.index['domains'])

    @property
    def scored(self) -> np.ndarray:
        """Boolean mask of the samples that have a score (status 0)."""
        return self.status == STATUS_SCORED

    @property
    def domains(self) -> np.ndarray:
        """The domain name of every sample (``''`` when the data has no ``domain`` column)."""
        return np.asarray(self.domain_names, dtype=object)[self.domain_codes]

    @property
    def data_path(self) -> str:
        return self.meta['data']['path']

    @property
    def data_index_fingerprint(self) -> str:
        return self.meta['data']['index_fingerprint']

    @property
    def data_content_fingerprint(self) -> str:
        return self.index['data_content_fingerprint']

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.meta['tokenizer']['fingerprint']

    def check_data(self, data, content: bool = False) -> None:
        """Raise :class:`ScoreIndexError` unless ``data`` (an MDS path or MDSDataset) is the data scored.

        Args:
            data: The MDS directory (or :class:`~composer_ext.data.mds.MDSDataset`).
            content: Also hash every shard file and compare it with the SHA-256 recorded when that shard was
                scored (one read of the data), so a shard whose bytes changed, even at the same size (which the
                MDS ``index.json`` does not notice), is refused. Without it only ``index.json`` is compared.
        """
        mds = data if isinstance(data, MDSDataset) else MDSDataset(data)
        if mds.index_fingerprint != self.data_index_fingerprint or len(mds) != self.num_samples:
            raise ScoreIndexError(
                f'the score index {str(self.path)!r} does not describe data={str(mds.path)!r}: it scored '
                f'{self.num_samples} samples of {self.data_path!r} (fingerprint {self.data_index_fingerprint[:12]}), '
                f'the data has {len(mds)} samples (fingerprint {mds.index_fingerprint[:12]}). Fix: score this data '
                f'with `composer-ext score --data {mds.path} --out NEW_DIR`, or pass the data that was scored.')
        if not content:
            return
        hashes = [mds.shard_sha256(shard) for shard in range(mds.num_shards)]
        if mds.content_fingerprint(hashes) == self.data_content_fingerprint:
            return
        fix = (f'Fix: rerun the `composer-ext score` command that wrote {self.path} (same --model and settings, '
               f'--data {mds.path}): it rescores the changed shards and keeps the others; or restore the data that '
               f'was scored.')
        for shard, digest in enumerate(hashes):
            marker_file = self.path / 'shards' / f'{shard:05d}.json'
            scored = json.loads(marker_file.read_text()).get('shard_sha256') if marker_file.exists() else None
            if scored is not None and scored != digest:
                raise ScoreIndexError(
                    f'shard {shard} of data={str(mds.path)!r} ({mds.shard_file(shard).name}) changed since it was '
                    f'scored: its SHA-256 is {digest[:12]}, the scores are of {scored[:12]} (same index.json, so the '
                    f'same size). Its scores describe other samples. {fix}')
        raise ScoreIndexError(f'data={str(mds.path)!r} changed since it was scored (its content fingerprint is not '
                              f'the one in {self.path / "index.json"}). {fix}')

    def summary(self) -> dict[str, Any]:
        return dict(self.index['summary'])

    def __repr__(self) -> str:
        return f'ScoreIndex({str(self.path)!r})'


class ScoreIndexWriter:
    """Writes a score index shard by shard, resumably (used by
    :func:`composer_ext.perplexity_pruning.scoring.score_mds`).

    Args:
        path: The output directory.
        meta: What is being scored (``identity`` must match on resume; the rest is informational).
        num_shards: Shards of the MDS directory.
    """

    def __init__(self, path: Union[str, Path], meta: dict, num_shards: int):
        self.path = Path(path)
        self.meta = meta
        self.num_shards = num_shards
        self.shards_dir = self.path / 'shards'

    # --- rank 0: set up or verify, and list what is left -------------------------------------------------

    def prepare(self, overwrite: bool = False, shard_sha256=None) -> Optional[list[int]]:
        """Create the directory and ``meta.json``, or verify that an existing one scored the same thing.

        With ``shard_sha256`` (``shard -> hex``), also list the :meth:`pending` shards and, when there are
        any, remove ``index.json``: a complete index of the old scores must not outlive the start of a
        rescore (a run killed before it finalizes would otherwise leave the old index reading as complete).

        Returns:
            The pending shards, or None without ``shard_sha256``.
        """
        meta_file = self.path / 'meta.json'
        if overwrite and self.path.exists():
            if not meta_file.exists() and any(self.path.iterdir()):
                raise ScoreIndexError(f'out={str(self.path)!r} exists and is not a score index; --overwrite only '
                                      f'replaces score indexes. Fix: choose another --out.')
            shutil.rmtree(self.path)
        if self.path.exists() and not meta_file.exists() and any(self.path.iterdir()):
            raise ScoreIndexError(f'out={str(self.path)!r} exists, is not empty and is not a score index. Fix: '
                                  f'choose a new or empty --out directory.')
        if meta_file.exists():
            old = json.loads(meta_file.read_text())
            differences = [key for key in sorted(set(old.get('identity', {})) | set(self.meta['identity']))
                           if old.get('identity', {}).get(key) != self.meta['identity'].get(key)]
            if differences:
                key = differences[0]
                raise ScoreIndexError(
                    f'out={str(self.path)!r} holds scores of a different scoring run ({len(differences)} setting(s) '
                    f'differ, e.g. {key}: {old.get("identity", {}).get(key)!r} there, '
                    f'{self.meta["identity"].get(key)!r} now). Fix: pass a new --out, rerun with the original '
                    f'settings to resume, or add --overwrite to discard the old scores.')
        else:
            atomic_write_json(meta_file, self.meta)
        self.shards_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.shards_dir.glob('.*.tmp-*'):  # left by a process killed mid-write
            stale.unlink(missing_ok=True)
        if shard_sha256 is None:
            return None
        left = self.pending(shard_sha256)
        if left:
            (self.path / 'index.json').unlink(missing_ok=True)
        return left

    def marker(self, shard: int) -> Optional[dict]:
        """The completion marker of ``shard`` if its npz is present and matches, else None."""
        marker_file = self.shards_dir / f'{shard:05d}.json'
        npz_file = self.shards_dir / f'{shard:05d}.npz'
        if not marker_file.exists() or not npz_file.exists():
            return None
        marker = json.loads(marker_file.read_text())
        if marker.get('npz_sha256') != bytes_sha256(npz_file.read_bytes()):
            return None
        return marker

    def pending(self, shard_sha256) -> list[int]:
        """Shards without a valid marker, or whose data file changed since (``shard_sha256(shard)`` -> hex)."""
        left = []
        for shard in range(self.num_shards):
            marker = self.marker(shard)
            if marker is None or marker['shard_sha256'] != shard_sha256(shard):
                left.append(shard)
        return left

    # --- any rank: one shard ---------------------------------------------------------------------------

    def write_shard(self, shard: int, start: int, shard_sha256: str, nll_sum: np.ndarray, num_tokens: np.ndarray,
                    status: np.ndarray, domain: list[str], uid: Optional[list[str]]) -> None:
        arrays = {'nll_sum': np.asarray(nll_sum, np.float64), 'num_tokens': np.asarray(num_tokens, np.int64),
                  'status': np.asarray(status, np.int8), 'domain': np.asarray(domain, dtype=np.str_)}
        if uid is not None:
            arrays['uid'] = np.asarray(uid, dtype=np.str_)
        data = npz_bytes(arrays)
        atomic_write_bytes(self.shards_dir / f'{shard:05d}.npz', data)
        atomic_write_json(self.shards_dir / f'{shard:05d}.json', {
            'shard': shard, 'start': start, 'samples': len(arrays['status']), 'shard_sha256': shard_sha256,
            'npz_sha256': bytes_sha256(data)})

    # --- rank 0: merge ---------------------------------------------------------------------------------

    def finalize(self) -> ScoreIndex:
        """Merge the shards into the index arrays and write ``index.json`` (last)."""
        parts, hashes = [], []
        for shard in range(self.num_shards):
            marker = self.marker(shard)
            if marker is None:
                raise ScoreIndexError(f'shard {shard} of {self.path} has no valid completion marker; cannot '
                                      f'finalize. Fix: rerun `composer-ext score` to score it.')
            with np.load(self.shards_dir / f'{shard:05d}.npz', allow_pickle=False) as npz:
                parts.append({name: npz[name] for name in _SHARD_ARRAYS if name in npz.files})
            hashes.append(marker['shard_sha256'])
        nll_sum = np.concatenate([p['nll_sum'] for p in parts])
        num_tokens = np.concatenate([p['num_tokens'] for p in parts])
        status = np.concatenate([p['status'] for p in parts])
        with np.errstate(invalid='ignore', divide='ignore'):
            mean_nll = np.where(status == STATUS_SCORED, nll_sum / np.maximum(num_tokens, 1), np.nan)
        perplexity = np.exp(mean_nll)
        domain_strings = np.concatenate([p['domain'] for p in parts])
        domain_names, domain_codes = np.unique(domain_strings, return_inverse=True)
        arrays = {'mean_nll': mean_nll, 'perplexity': perplexity, 'num_tokens': num_tokens, 'status': status,
                  'domain': domain_codes.astype(np.int16 if len(domain_names) < 2**15 else np.int32)}
        if all('uid' in p for p in parts):
            arrays['uid'] = np.concatenate([p['uid'] for p in parts])
        digests = {}
        for name, array in arrays.items():
            data = _npy_bytes(array)
            atomic_write_bytes(self.path / f'{name}.npy', data)
            digests[name] = bytes_sha256(data)
        # a list of strings: the same digest as before json_sha256 existed (sorting keys changes nothing here)
        content = json_sha256([self.meta['data']['index_fingerprint'], hashes])
        scored = status == STATUS_SCORED
        summary = {
            'samples': int(len(status)),
            'scored': int(scored.sum()),
            'excluded_reference': int((status == STATUS_REFERENCE).sum()),
            'too_short': int((status == STATUS_TOO_SHORT).sum()),
            'scored_tokens': int(num_tokens[scored].sum()),
            'mean_nll': float(nll_sum[scored].sum() / max(int(num_tokens[scored].sum()), 1)) if scored.any()
            else None,
            'median_perplexity': float(np.median(perplexity[scored])) if scored.any() else None,
        }
        atomic_write_json(self.path / 'index.json', {
            'format': FORMAT, 'num_samples': int(len(status)), 'arrays': digests,
            'domains': [str(d) for d in domain_names], 'data_content_fingerprint': content, 'summary': summary})
        return ScoreIndex(self.path)
