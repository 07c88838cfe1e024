"""`composer-ext report lora` on hand-written histories: comparable runs only, visible Pareto marks, rank 0 writes."""

import argparse
import json

import pytest

from composer_ext.config import ConfigError
from composer_ext.lora_probe import report

METRIC = 'LanguageCrossEntropy'


def _history(folder, name, learning, forgetting, energy=0.9, kind='full', rank=40.0):
    """A minimal lora_probe.json as LoRAProbe writes it: start, one probe, the final point (learning, forgetting)."""
    points = [(0, 0.0, 0.0), (5, learning / 2, forgetting / 2), (10, learning, forgetting)]
    history = [{'batch': batch, 'sample': batch * 8, 'token': 0, 'epoch': 0,
                'metrics': {'source': {}, 'target': {}},
                'learning': {'code': {METRIC: lrn}}, 'forgetting': {'prose': {METRIC: fgt}},
                'learning_mean': lrn, 'forgetting_mean': fgt} for batch, lrn, fgt in points]
    history[-1]['spectrum_summary'] = {'rank_at_energy/mean': rank, 'rank_at_energy/max': rank + 2,
                                       'effective_rank/mean': rank / 2}
    adapter = {'kind': 'full'} if kind == 'full' else {'kind': 'lora', 'r': 16, 'alpha': 32.0}
    summary = {'format': report.FORMAT, 'run_name': name, 'settings': {'energy': energy}, 'adapter': adapter,
               'primary_metric': METRIC, 'modules': {'h.0.attn.c_attn': {}, 'h.0.mlp.c_fc': {}}, 'history': history}
    path = folder / name / 'lora_probe.json'
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(summary))
    return path


def test_runs_measured_at_different_energies_are_rejected(tmp_path):
    _history(tmp_path, 'ft_full', 0.5, 0.4, energy=0.9)
    _history(tmp_path, 'ft_lora', 0.3, 0.1, energy=0.99, kind='lora', rank=8.0)
    with pytest.raises(ConfigError, match=r"different energies \(energy=0\.9: \['ft_full'\], energy=0\.99: "
                                          r"\['ft_lora'\]\).*Fix: report runs probed with the same"):
        report.lora_report([tmp_path], tmp_path / 'out')
    assert not (tmp_path / 'out').exists()


def test_pareto_optimal_runs_are_ringed_also_on_black_full_finetuning_squares(tmp_path):
    import matplotlib.pyplot as plt
    _history(tmp_path, 'ft_full', 0.5, 0.4)                                   # learns most: optimal
    _history(tmp_path, 'ft_lora_good', 0.3, 0.1, kind='lora', rank=8.0)       # forgets least: optimal
    _history(tmp_path, 'ft_lora_bad', 0.2, 0.3, kind='lora', rank=8.0)        # dominated by ft_lora_good
    runs = report.load_runs([tmp_path])
    assert dict(zip([r.name for r in runs], report.pareto_optimal(runs))) == {
        'ft_full': True, 'ft_lora_bad': False, 'ft_lora_good': True}
    figure = report._figure(runs)
    rings = [line for line in figure.axes[0].lines if line.get_markerfacecolor() == 'none']
    assert sorted((float(r.get_xdata()[0]), float(r.get_ydata()[0])) for r in rings) == [(0.3, 0.1), (0.5, 0.4)]
    full_marker = next(line for line in figure.axes[0].lines if line.get_marker() == 's')
    assert full_marker.get_markerfacecolor() == 'black'
    assert all(ring.get_markeredgecolor() != 'black' and ring.get_markersize() > full_marker.get_markersize()
               for ring in rings)  # a ring wider than the marker, in a colour that shows on black
    assert [t.get_text() for t in figure.axes[0].get_legend().get_texts()].count('Pareto-optimal') == 1
    plt.close(figure)


def test_only_rank_zero_writes_and_prints_but_every_rank_checks(tmp_path, monkeypatch, capsys):
    _history(tmp_path / 'runs', 'ft_full', 0.5, 0.4)
    args = argparse.Namespace(run_dirs=[str(tmp_path / 'runs')], out=str(tmp_path / 'out'), metric=None)
    # Patch the rank rather than setting RANK: an earlier test in this process may have started torch.distributed.
    from composer.utils import dist
    monkeypatch.setattr(dist, 'get_global_rank', lambda: 1)
    assert report.cli_main(args) == 0
    assert not (tmp_path / 'out').exists() and capsys.readouterr().out == ''
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ConfigError, match='holds no lora_probe.json'):
        report.cli_main(argparse.Namespace(run_dirs=[str(tmp_path / 'empty')], out=str(tmp_path / 'x'), metric=None))
    assert not (tmp_path / 'x').exists()
    monkeypatch.setattr(dist, 'get_global_rank', lambda: 0)
    assert report.cli_main(args) == 0
    assert '| ft_full | full |' in capsys.readouterr().out
    assert (tmp_path / 'out' / 'pareto.png').exists() and (tmp_path / 'out' / 'table.md').exists()
