"""Perplexity pruning end to end through the YAMLs and the CLI (reference run -> score -> select -> train on the
selection), exact resume of a run on a selection, the command-line errors, and (slow) the Composer launcher and
the tiny reproduction."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from composer_ext.cli import main as cli
from composer_ext.config import load_config
from composer_ext.data.mds import MDSDataset
from composer_ext.perplexity_pruning.reference_split import ReferenceSplit
from composer_ext.perplexity_pruning.score_index import STATUS_REFERENCE, STATUS_SCORED, ScoreIndex
from composer_ext.perplexity_pruning.scoring import load_reference_model, score_mds
from composer_ext.perplexity_pruning.selected_dataset import SelectedDataset, build_selected_text_dataloader
from composer_ext.perplexity_pruning.selection import read_selection
from composer_ext.runner import build_trainer, run
from composer_ext.testing import KillAt, Killed
from tests.conftest import ROOT, load_example
from tests.test_perplexity_pruning import DOMAINS, write_mds

YAMLS = ROOT / 'yamls' / 'perplexity_pruning'
TINY = ['model.n_layer=1', 'model.n_embd=32', 'model.n_head=2', 'train_loader.batch_size=8', 'progress_bar=false',
        'log_to_console=false', 'scheduler.t_warmup=1ba']

pytestmark = pytest.mark.usefixtures('one_torch_thread')




@pytest.fixture(scope='module')
def small_mds(tmp_path_factory, corpus):
    samples = []
    for domain in DOMAINS:
        data = MDSDataset(corpus.path(domain, 'train'))
        samples.extend(data[i] for i in range(100, 160))
    return write_mds(tmp_path_factory.mktemp('mds') / 'data', samples)


def test_every_perplexity_pruning_yaml_validates():
    paths = sorted(YAMLS.glob('*.yaml'))
    assert {p.name for p in paths} >= {'reference.yaml', 'pruned.yaml', 'random_baseline.yaml'}
    for path in paths:
        config = load_config(path)
        assert config.train_loader['name'] in ('reference_text', 'selected_text'), path


@pytest.fixture(scope='module')
def pipeline(tmp_path_factory, small_mds):
    """reference.yaml (4 batches) -> `composer-ext score` -> `composer-ext select --band medium`."""
    work = tmp_path_factory.mktemp('pipeline')
    reference = run(str(YAMLS / 'reference.yaml'), (
        f'variables.data={small_mds}', f'variables.split_file={work}/split.json', 'max_duration=4ba',
        'eval_interval=4ba', 'eval_loaders.0.subset_num_batches=1', f'save_folder={work}/reference', *TINY))
    reference.trainer.close()
    scores, selection = work / 'scores', work / 'selection_medium'
    assert cli(['score', '--model', f'{work}/reference/latest-rank0.pt', '--data', str(small_mds), '--out',
                str(scores), '--no-progress']) == 0
    assert cli(['select', '--scores', str(scores), '--band', 'medium', '--keep', '0.5', '--out', str(selection),
                '--write-mds', str(work / 'pruned_mds')]) == 0
    return SimpleNamespace(work=work, data=small_mds, scores=scores, selection=selection, reference=reference)


def test_reference_run_score_select_and_train_on_the_selection(pipeline):
    work = pipeline.work
    split = ReferenceSplit.load(work / 'split.json')
    assert split.fraction == 0.25 and split.num_samples == 180
    trained_on = load_reference_model(work / 'reference' / 'latest-rank0.pt').trained_on
    assert trained_on['kind'] == 'reference_split' and trained_on['part'] == 'reference'
    # The checkpoint names its 45 training samples itself, and the split file (whose ids are saved beside it).
    assert trained_on['ids'] == split.reference_ids.tolist()
    assert Path(trained_on['split_file']) == (work / 'split.json').resolve() and (work / 'split.ids.npy').is_file()

    # The checkpoint's record keeps the reference model's own training samples out of the scores.
    index = ScoreIndex(pipeline.scores)
    assert np.all(index.status[split.reference_ids] == STATUS_REFERENCE)
    assert np.all(index.status[split.remainder_ids] == STATUS_SCORED)
    assert index.meta['reference']['source'] == 'checkpoint' and index.meta['model']['kind'] == 'composer_checkpoint'

    record, ids = read_selection(pipeline.selection)
    assert len(ids) == record['num_selected'] and abs(len(ids) - 0.5 * 135) <= 1
    assert not np.isin(ids, split.reference_ids).any()
    report = json.loads((pipeline.selection / 'report.json').read_text())
    assert report['counts'] == {'samples': 180, 'candidates': 135, 'selected': len(ids), 'excluded_reference': 45,
                                'too_short': 0}
    assert set(report['composition']) == set(DOMAINS) and report['kl_after_before'] >= 0
    assert sum(v['after'] for v in report['composition'].values()) == len(ids)
    assert {band: len(rows) for band, rows in report['examples'].items()} == {'low': 3, 'medium': 3, 'high': 3}
    assert all(row['text'] and row['uid'] for rows in report['examples'].values() for row in rows)
    low, high = report['thresholds']['perplexity_low'], report['thresholds']['perplexity_high']
    assert np.all((index.perplexity[ids] >= low) & (index.perplexity[ids] <= high))
    assert (pipeline.selection / 'report.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    # Per domain, every domain keeps (about) half of its samples, so the mix barely moves.
    assert cli(['select', '--scores', str(pipeline.scores), '--band', 'high', '--keep', '0.5', '--per-domain',
                '--out', str(work / 'per_domain'), '--examples', '0']) == 0
    per_domain = json.loads((work / 'per_domain' / 'report.json').read_text())
    assert all(abs(v['kept_fraction'] - 0.5) < 0.05 for v in per_domain['composition'].values())
    assert per_domain['kl_after_before'] < 1e-3 and set(per_domain['thresholds']) == set(DOMAINS)
    copy = MDSDataset(work / 'pruned_mds')
    assert [copy[i]['uid'] for i in range(len(copy))] == [index.uids[i] for i in ids]

    # Train on the selection; that checkpoint records the selection, so scoring with it leaves those samples out.
    pruned = run(str(YAMLS / 'pruned.yaml'), (f'variables.selection={pipeline.selection}', 'max_duration=4ba',
                                              'eval_interval=4ba', 'eval_loaders.0.subset_num_batches=1',
                                              f'save_folder={work}/pruned', 'save_interval=4ba', *TINY))
    assert pruned.trainer.state.timestamp.batch.value == 4
    assert 0 < pruned.eval_metrics['metrics/code/LanguageCrossEntropy'] < 9
    pruned.trainer.close()
    trained_on = load_reference_model(work / 'pruned' / 'latest-rank0.pt').trained_on
    assert trained_on['kind'] == 'selection' and trained_on['band'] == 'medium'
    rescored = score_mds(work / 'pruned' / 'latest-rank0.pt', pipeline.data, work / 'rescored', progress=False)
    assert np.array_equal(np.flatnonzero(rescored.status == STATUS_REFERENCE), ids)


def _weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.state.model.state_dict().items()}


def test_training_on_a_selection_resumes_bit_for_bit(pipeline, tmp_path):
    # 67 selected samples at batch 8 = 8 batches per epoch: the kill at 5 and the end at 11 straddle an epoch.
    overrides = (f'variables.selection={pipeline.selection}', 'max_duration=11ba', 'eval_loaders=null',
                 'eval_interval=1', *TINY)
    full = build_trainer(load_config(YAMLS / 'pruned.yaml', overrides))
    full.fit()
    expected = _weights(full)
    full.close()
    killed = build_trainer(load_config(YAMLS / 'pruned.yaml', (*overrides, f'save_folder={tmp_path}',
                                                                'save_interval=5ba')))
    killed.engine.state.callbacks.append(KillAt(5))
    with pytest.raises(Killed):
        killed.fit()
    killed.close()
    resumed = build_trainer(load_config(YAMLS / 'pruned.yaml', (*overrides, f'load_path={tmp_path}/ep0-ba5-rank0.pt')))
    resumed.fit()
    assert resumed.state.timestamp.batch.value == 11 and resumed.state.timestamp.epoch.value == 1
    for name, value in _weights(resumed).items():
        assert torch.equal(value, expected[name]), name
    resumed.close()


def test_a_selection_refuses_other_data_and_another_tokenizer(pipeline, tmp_path, corpus):
    from composer_ext.data.tokenizer import train_tokenizer
    other = write_mds(tmp_path / 'other', [MDSDataset(corpus.path('legal', 'train'))[i] for i in range(40)])
    with pytest.raises(ValueError, match=r'selection=.* was made for .*not for data=.*Fix: pass the data that was'):
        SelectedDataset.from_selection(pipeline.selection, data=other)
    texts = [MDSDataset(corpus.path('prose', 'train'))[i]['text'] for i in range(200)]
    foreign = train_tokenizer(texts, tmp_path / 'tokenizer', vocab_size=512)
    with pytest.raises(ValueError, match=r'tokenizer mismatch: selection=.*Fix: train with the tokenizer'):
        build_selected_text_dataloader(8, str(pipeline.selection), context=SimpleNamespace(tokenizer=foreign))
    spec = build_selected_text_dataloader(8, str(pipeline.selection), check_tokenizer=False,
                                          context=SimpleNamespace(tokenizer=foreign))
    assert len(spec.dataloader) == 8


@pytest.mark.parametrize('argv,message', [
    (['--band', 'medium', '--keep', '1.5'], r"keep=1.5 is outside \(0, 1\]"),
    (['--band', 'medium', '--keep', '0'], r'keep=0.0 is outside \(0, 1\]'),
    (['--band', 'middle', '--keep', '0.5'], r"band='middle' is not a band"),
])
def test_select_errors_exit_2_with_the_fix(pipeline, tmp_path, capsys, argv, message):
    assert cli(['select', '--scores', str(pipeline.scores), '--out', str(tmp_path / 'sel'), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith('composer-ext select: error: ') and 'Fix:' in err
    assert __import__('re').search(message, err)
    assert not (tmp_path / 'sel').exists()


def test_missing_or_incomplete_inputs_exit_2(pipeline, tmp_path, capsys):
    assert cli(['select', '--scores', str(tmp_path / 'none'), '--band', 'low', '--keep', '0.5', '--out',
                str(tmp_path / 'sel')]) == 2
    assert 'does not exist. Fix: write a score index first' in capsys.readouterr().err
    assert cli(['select', '--scores', str(pipeline.scores), '--band', 'low', '--keep', '0.5', '--out',
                str(pipeline.selection)]) == 2
    assert 'already exists. Fix: choose a new path or pass --overwrite' in capsys.readouterr().err
    assert cli(['score', '--model', str(tmp_path / 'nope.pt'), '--data', str(pipeline.data), '--out',
                str(tmp_path / 's')]) == 2
    assert 'is neither a Composer checkpoint file nor a HuggingFace directory' in capsys.readouterr().err
    assert cli(['score', '--model', f'{pipeline.work}/reference/latest-rank0.pt', '--data', str(tmp_path),
                '--out', str(tmp_path / 's')]) == 2
    assert 'is not an MDS directory (no index.json)' in capsys.readouterr().err


def test_score_cli_reports_unrecorded_training_data_and_scores_only_max_tokens(pipeline, tmp_path, capsys, tokenizer):
    from composer_ext.models import small_gpt
    torch.manual_seed(0)
    hf = tmp_path / 'hf'
    small_gpt(n_layer=1, n_embd=32, n_head=2, n_positions=32, tokenizer=tokenizer).model.save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    assert cli(['score', '--model', str(hf), '--data', str(pipeline.data), '--out', str(tmp_path / 'scores'),
                '--max-tokens', '16', '--no-progress']) == 0
    err = capsys.readouterr().err
    assert 'composer-ext score: warning: nothing records which samples trained the reference model' in err
    index = ScoreIndex(tmp_path / 'scores')
    assert index.meta['identity']['max_tokens'] == 16 and index.num_tokens.max() == 15
    assert np.all(index.status == STATUS_SCORED)  # nothing to leave out: the warning said so


@pytest.mark.slow
@pytest.mark.distributed
def test_score_under_the_composer_launcher_equals_one_process(pipeline, tmp_path, cli_env):
    launcher = Path(sys.executable).with_name('composer')
    model = f'{pipeline.work}/reference/latest-rank0.pt'
    proc = subprocess.run([str(launcher), '-n', '2', '--stderr', str(tmp_path / 'rank{rank}.err'), '-m',
                           'composer_ext.cli', 'score', '--model', model, '--data', str(pipeline.data), '--out',
                           str(tmp_path / 'scores'), '--no-progress'], cwd=ROOT, env=cli_env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    launched, single = ScoreIndex(tmp_path / 'scores'), ScoreIndex(pipeline.scores)
    assert np.array_equal(launched.mean_nll, single.mean_nll, equal_nan=True)
    assert np.array_equal(launched.status, single.status)


@pytest.mark.slow
def test_tiny_reproduction_drops_corrupted_documents_and_beats_random(tmp_path):
    """The README's reproduction (about 15 minutes on 2 CPU cores)."""
    reproduce = load_example('perplexity_pruning')
    results = reproduce.main(['--out', str(tmp_path), '--bands', 'medium,random', '--threads', '1'])
    medium = results['selections']['medium']
    assert medium['corrupted_dropped_fraction'] > 0.75
    runs = results['final_runs']
    assert runs['medium']['mean'] < runs['random']['mean']
