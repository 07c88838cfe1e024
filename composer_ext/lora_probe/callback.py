"""LoRAProbe: how much a finetune learns, how much it forgets, and how high-rank its weight update is, live.

"LoRA Learns Less and Forgets Less" (Biderman et al. 2024) found that LoRA learns less on the target domain
than full finetuning but keeps more of the source domain, and that full finetuning learns weight updates ΔW
whose rank is 10-100x that of typical LoRA configurations. :class:`LoRAProbe` measures both during your own
finetune, for LoRA (peft) and full finetuning alike:

* **Learning and forgetting.** At ``FIT_START`` it evaluates the ``target_evals`` (the domain being learned) and
  the ``source_evals`` (the domain that must not be forgotten); every ``every`` it evaluates them again and logs
  the change from the start: learning = target improvement, forgetting = source degradation (signed so that
  positive means "learned" / "forgot", whatever the metric's direction).
* **The spectrum of ΔW.** Every ``spectrum_every``, for each probed module, ΔW = W(now) − W(at FIT_START): for a
  peft LoRA layer the update ``scaling · B·A`` from the adapter weights (never merged into the model; its
  singular values come from the factors), for any other layer the difference from a copy of its initial weight
  (CPU by default). Per module and aggregated: the rank needed for ``energy`` of the squared singular values,
  the entropy-based effective rank, spectral, Frobenius norms and stable rank
  (:func:`composer_ext.lora_probe.spectrum.delta_w_spectrum`).

The probe observes and never steers: its evaluations run under ``torch.no_grad`` in eval mode and restore every
random generator afterwards, so a run with the probe trains bit for bit like a run without it.

Distributed: evaluations run on every rank over its shard and the metrics are reduced across ranks
(torchmetrics); spectra are computed on rank 0 from full weights gathered one FSDP unit (FSDP1) or one
parameter (FSDP2) at a time, never the whole model at once (:mod:`.gathering` says what each rank holds), and the
results are broadcast so every rank holds the same history. Under DDP nothing is gathered.

Memory: full finetuning keeps one copy of the probed modules' initial weights on rank 0 (``baseline_device``,
CPU by default): ``sum(numel × element size)`` of those weights, logged once as ``lora_probe/baseline_bytes``
(4 bytes × 0.4 M = 1.6 MB for the small GPT of ``yamls/lora_probe``; 2 GB for 0.5 B fp32 projection weights).
LoRA layers keep only their initial adapter factors (the size of the adapter). The copy is part of the
checkpointed state (each checkpoint grows by it), so a resumed run measures ΔW from the original start.
Under FSDP2 no rank keeps a whole initial weight: each rank keeps the initial rows of its own shards
(``lora_probe/baseline_bytes`` is then this rank's share, about 1 / world size), a spectrum pass gathers one module's
ΔW at a time (the largest module bounds the extra memory), and sharded checkpoints hold the initial weights as
``DTensor`` shards (full checkpoints gather them when they save).

What is written: with ``save_folder``, rank 0 rewrites ``<save_folder>/lora_probe.json`` atomically after every
probe (run name, settings, baselines, the full history). ``composer-ext report lora RUN_DIR...`` reads those
files; a RUN_DIR is any directory that contains one (searched recursively).

Logged keys (``logger.log_metrics``, step = batch):

* ``lora_probe/{source,target}/<label>/<metric>``: the metric now;
* ``lora_probe/learning/<label>/<metric>``, ``lora_probe/forgetting/<label>/<metric>``: the change from the start;
* ``lora_probe/learning``, ``lora_probe/forgetting``: the mean over target (source) evaluators of the primary
  metric (the first of ``metric_names``; by default the first metric every evaluator follows);
* ``lora_probe/delta_w/<module>/<stat>`` (``rank_at_energy``, ``effective_rank``, ``spectral_norm``,
  ``frobenius_norm``, ``stable_rank``; with ``log_modules=True``) and the aggregates
  ``lora_probe/delta_w/rank_at_energy/{mean,max,min}``, ``.../rank_fraction/mean``, ``.../effective_rank/mean``,
  ``.../stable_rank/mean``, ``.../spectral_norm/max``, ``.../frobenius_norm/total``.

The pieces live beside this module: :mod:`.discovery` (which modules), :mod:`.gathering` (full weights under
FSDP), :mod:`.tracker` (ΔW and its spectra), :mod:`.evaluation` (the evaluations), :mod:`.foundry_evals` (evaluators
from llm-foundry eval sections), :mod:`.history` (the records).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from composer.core import Callback, Evaluator, Event, State, Time
from composer.loggers import Logger
from composer.utils import dist
from torch import nn

from composer_ext.core.foundry_sections import run_tokenizer
from composer_ext.core.timing import Interval, parse_interval, time_string
from composer_ext.core.unwrap import unwrap_parallel
from composer_ext.lora_probe.discovery import find_probed_modules, module_patterns
from composer_ext.lora_probe.evaluation import EvaluatorsLike, FollowedMetrics, as_evaluator, evaluate, follow_metrics
from composer_ext.lora_probe.foundry_evals import build_section_evaluator, check_eval_section
from composer_ext.lora_probe.history import FORMAT, HISTORY_FILE, add_metrics, loggable_metrics
from composer_ext.lora_probe.spectrum import check_energy
from composer_ext.lora_probe.tracker import SPECTRUM_STATS, DeltaWTracker, check_baseline_device, summarize_spectra
from composer_ext.storage import atomic_write_json

__all__ = ['LoRAProbe', 'build_lora_probe']

log = logging.getLogger(__name__)

# The YAML key prefix of the probe's arguments when llm-foundry builds it (it passes ``train_config``).
FOUNDRY_KEY = 'callbacks.lora_probe.'


def _time_argument(value: Optional[Time]) -> str:
    """An interval as it reads back in ``__repr__``: its time string quoted, or ``None``."""
    return 'None' if value is None else repr(time_string(value))


class LoRAProbe(Callback):
    """Log learning (target improvement), forgetting (source degradation) and the spectrum of ΔW during a finetune.

    Args:
        source_evals: Composer ``Evaluator`` s (or DataLoaders / DataSpecs) of the domain the model must not
            forget, or llm-foundry eval sections (dicts ``{label, name, dataset, ...}`` as under ``eval_loader``,
            see :mod:`.foundry_evals`), built into evaluators with the run's tokenizer when the Trainer starts
            (``Event.INIT``). May be empty.
        target_evals: Evaluators (or sections) of the domain being learned. May be empty.
        every: How often to evaluate them (a Composer time: ``'100ba'``, ``'1ep'``, ``'0.1dur'``, an int for
            batches; None: only at the start and the end). Always also at ``FIT_START`` (the baseline) and
            ``FIT_END``.
        spectrum_every: How often to compute the spectra of ΔW (also at ``FIT_END``; None: only then).
        energy: Share of the squared singular values that ``rank_at_energy`` must explain, in (0, 1].
        modules: ``'auto'`` (peft LoRA layers if any, else every trainable Linear/Conv1D/convolution not tied to
            an embedding), a regular expression, or a list of them (see :func:`find_probed_modules`).
        metric_names: The metrics to follow (the first is the primary one, averaged into
            ``lora_probe/learning`` and ``lora_probe/forgetting``); default: each evaluator's own metrics, and for
            an evaluator that names none the model's language-model metrics (LanguageCrossEntropy,
            LanguagePerplexity), or for a model without such metrics all its eval metrics except in-context-learning
            ones (:func:`~composer_ext.lora_probe.evaluation.default_metric_names`); the primary one is then the
            first metric of the first evaluator that every evaluator follows (a ``ValueError`` at Trainer
            construction when the evaluators share none). Every evaluator must provide them. The choice is logged
            as hyperparameters (``lora_probe/metrics/<label>``, ``lora_probe/metrics_chosen_by/<label>``,
            ``lora_probe/primary_metric``) and recorded in ``lora_probe.json``.
        higher_is_better: ``{metric name: bool}`` for metrics that do not declare a direction; otherwise read
            from the metric (``higher_is_better``) or its name (loss/entropy/perplexity: lower is better).
        save_folder: Directory for ``lora_probe.json`` (rank 0, rewritten atomically after every probe);
            ``{run_name}`` is replaced by the run's name. None: nothing is written.
        log_modules: Also log every module's statistics (not only the aggregates).
        baseline_device: Where full-finetuning initial weights are kept: ``'cpu'`` or ``'same'`` (the weights'
            device).
        eval_subset_num_batches: Batches per evaluation for evaluators that do not set ``subset_num_batches``
            (-1: the whole dataloader).
        train_config: The run config, which llm-foundry passes to callbacks registered in
            ``llmfoundry_callbacks_with_config``: eval sections take their batch size from its
            ``device_eval_batch_size`` and ``dataset.max_seq_len`` from its ``max_seq_len`` when they have none, and
            error messages name the YAML keys (``callbacks.lora_probe.source_evals[0]``). Not kept: the completed
            sections are.

    The probe's state belongs to one run: a new ``Trainer`` on another model starts it afresh (baselines and
    history are reset at ``Event.INIT``; a checkpoint that Trainer loads restores its own). ``__repr__`` rebuilds
    the probe only from plain arguments (eval sections are plain data): evaluators appear as a placeholder
    (``<2 Evaluators: 'prose', 'code'>``).

    From an llm-foundry YAML (``llmfoundry train``), where evaluators are eval sections:

    .. code-block:: yaml

        callbacks:
          lora_probe:
            source_evals:
            - {label: prose, name: text, dataset: {local: /data/prose, split: val, max_seq_len: 128}}
            target_evals:
            - {label: code, name: text, dataset: {local: /data/code, split: val, max_seq_len: 128}}
            every: 10ba

    Tested under: single process; DDP on 2 gloo ranks (the Trainer and callback end to end); FSDP1 and FSDP2 on 2
    gloo ranks at the level of :class:`DeltaWTracker` (the gathering and spectra this callback uses). A Composer
    ``Trainer`` with ``parallelism_config={'fsdp': {...}}`` is not tested end to end here: Composer 0.32.1 wraps
    FSDP modules with ``device_id=torch.cuda.current_device()``, which needs a GPU, and the test machines have
    none.

    Example:
        .. code-block:: python

            from composer import Trainer
            from composer_ext.callbacks import LoRAProbe
            from composer_ext.data.text import build_text_evaluators

            probe = LoRAProbe(source_evals=build_text_evaluators(32, domains='prose', subset_num_batches=8),
                              target_evals=build_text_evaluators(32, domains='code', subset_num_batches=8),
                              every='100ba', spectrum_every='500ba', save_folder='runs/{run_name}/lora_probe')
            trainer = Trainer(model=model, train_dataloader=code_loader, max_duration='1000ba', callbacks=[probe])
    """

    def __init__(
        self,
        source_evals: EvaluatorsLike,
        target_evals: EvaluatorsLike,
        every: Union[str, int, Time, None] = '100ba',
        spectrum_every: Union[str, int, Time, None] = '500ba',
        energy: float = 0.9,
        modules: Union[str, Sequence[str]] = 'auto',
        *,
        metric_names: Optional[Sequence[str]] = None,
        higher_is_better: Optional[dict[str, bool]] = None,
        save_folder: Optional[str] = None,
        log_modules: bool = True,
        baseline_device: str = 'cpu',
        eval_subset_num_batches: int = -1,
        train_config: Optional[Mapping[str, Any]] = None,
    ):
        if train_config is not None and not isinstance(train_config, Mapping):
            raise ValueError(f'train_config is a {type(train_config).__name__} ({train_config!r}). Fix: pass the '
                             f'run config as a dict (llm-foundry does this for callbacks_with_config), or None.')
        # From llm-foundry, errors name the YAML keys (callbacks.lora_probe.every, ...).
        prefix = FOUNDRY_KEY if train_config is not None else ''
        self._key_prefix = prefix
        self._section_keys: dict[str, str] = {}
        self._items = {role: self._eval_items(value, role, train_config)
                       for role, value in (('source', source_evals), ('target', target_evals))}
        self._built: dict[str, Evaluator] = {}  # section label -> its Evaluator, built at INIT
        labels = self.source_labels + self.target_labels
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            raise ValueError(f'{prefix}source_evals/target_evals: the evaluator labels {duplicates} are used more '
                             f'than once (source: {self.source_labels}, target: {self.target_labels}). '
                             f'Fix: give every source and target evaluator its own label.')
        self.every = parse_interval(every, f'{prefix}every')
        self.spectrum_every = parse_interval(spectrum_every, f'{prefix}spectrum_every')
        self.energy = check_energy(energy)
        module_patterns(modules)  # a malformed pattern fails here, not at the first fit
        self.modules = modules if isinstance(modules, str) else list(modules)
        if metric_names is not None:
            if isinstance(metric_names, str) or not metric_names or \
                    not all(isinstance(m, str) and m for m in metric_names):
                raise ValueError(f"{prefix}metric_names={metric_names!r} is invalid. Fix: pass a non-empty list of "
                                 f"metric names, e.g. ['LanguageCrossEntropy'], or None for each evaluator's own "
                                 f"(a language model's LanguageCrossEntropy and LanguagePerplexity by default).")
            metric_names = list(metric_names)
        self.metric_names = metric_names
        if higher_is_better is not None and (not isinstance(higher_is_better, dict) or
                                             not all(isinstance(v, bool) for v in higher_is_better.values())):
            raise ValueError(f"higher_is_better={higher_is_better!r} is invalid. Fix: pass a dict of metric name -> "
                             f"bool, e.g. {{'LanguageCrossEntropy': False}}.")
        self.higher_is_better = dict(higher_is_better or {})
        if save_folder is not None and (not isinstance(save_folder, str) or not save_folder):
            raise ValueError(f"save_folder={save_folder!r} is invalid. Fix: pass a directory such as "
                             f"'runs/{{run_name}}/lora_probe', or None.")
        self.save_folder = save_folder
        self.log_modules = bool(log_modules)
        self.baseline_device = check_baseline_device(baseline_device)
        if isinstance(eval_subset_num_batches, bool) or not isinstance(eval_subset_num_batches, int) or \
                eval_subset_num_batches == 0 or eval_subset_num_batches < -1:
            raise ValueError(f'eval_subset_num_batches={eval_subset_num_batches!r} is invalid. Fix: use a positive '
                             f'int, or -1 for whole dataloaders.')
        self.eval_subset_num_batches = eval_subset_num_batches

        self._eval_schedule = Interval(self.every, 'every')
        self._spectrum_schedule = Interval(self.spectrum_every, 'spectrum_every')
        self.tracker: Optional[DeltaWTracker] = None
        self._followed = FollowedMetrics()
        self.primary_metric: Optional[str] = None
        self.baseline_metrics: Optional[dict[str, dict[str, float]]] = None
        self.history: list[dict[str, Any]] = []
        self._pending_tracker_state: Optional[dict] = None
        self._checkpoints: Optional[str] = None  # FSDP2: 'sharded' or 'full' (how state_dict() holds W0)
        self._model_id: Optional[int] = None
        self._spectrum_seconds: Optional[float] = None

    # -- evaluators -------------------------------------------------------------------------------------------

    def _eval_items(self, value: EvaluatorsLike, role: str, train_config: Optional[Mapping]) -> list[Any]:
        """``value`` as a list of Evaluators and checked, completed eval sections (dicts), in order."""
        if value is None:
            return []
        listed = isinstance(value, (list, tuple))
        items = list(value) if listed else [value]
        out: list[Any] = []
        for i, item in enumerate(items):
            key = f'{self._key_prefix}{role}_evals' + (f'[{i}]' if listed else '')
            if isinstance(item, Mapping):
                section = check_eval_section(item, key, train_config)
                self._section_keys.setdefault(section['label'], key)
                out.append(section)
            else:
                out.append(as_evaluator(item, key, role if len(items) == 1 else f'{role}_{i}'))
        return out

    def _role_evals(self, role: str) -> list[Any]:
        return [item if isinstance(item, Evaluator) else self._built.get(item['label'], item)
                for item in self._items[role]]

    @property
    def source_evals(self) -> list[Any]:
        """The source evaluators (an eval section appears as its dict until the Trainer has built it)."""
        return self._role_evals('source')

    @property
    def target_evals(self) -> list[Any]:
        """The target evaluators (an eval section appears as its dict until the Trainer has built it)."""
        return self._role_evals('target')

    @property
    def source_labels(self) -> list[str]:
        """The labels of the source evaluators and sections."""
        return [_label(item) for item in self._items['source']]

    @property
    def target_labels(self) -> list[str]:
        """The labels of the target evaluators and sections."""
        return [_label(item) for item in self._items['target']]

    def _build_sections(self, state: State) -> None:
        """Build the eval sections not built yet, with the run's tokenizer (``state.model``'s)."""
        pending = [item for items in self._items.values() for item in items
                   if isinstance(item, Mapping) and item['label'] not in self._built]
        if not pending:
            return
        tokenizer = run_tokenizer(state.model)
        for section in pending:
            label = section['label']
            self._built[label] = build_section_evaluator(section, tokenizer, self._section_keys[label])

    def _evaluators(self) -> list[Evaluator]:
        """Every source and target evaluator, sections built (at INIT)."""
        evaluators = self.source_evals + self.target_evals
        assert all(isinstance(e, Evaluator) for e in evaluators), 'eval sections are built at Event.INIT'
        return evaluators

    # -- set-up -----------------------------------------------------------------------------------------------

    def _resolve_metrics(self, model: nn.Module) -> None:
        """Per evaluator, copies of the model's eval metrics it follows; errors name a missing metric."""
        self._followed = follow_metrics(model, self._evaluators(), self.metric_names, self.higher_is_better,
                                        key=f'{self._key_prefix}metric_names')
        self.primary_metric = self._followed.primary

    def metric_choice(self) -> dict[str, Any]:
        """Which metrics each evaluator follows and why, as logged hyperparameters (after ``Event.INIT``)."""
        choice: dict[str, Any] = {'lora_probe/primary_metric': self.primary_metric}
        for label, metrics in self._followed.metrics.items():
            choice[f'lora_probe/metrics/{label}'] = list(metrics)
            choice[f'lora_probe/metrics_chosen_by/{label}'] = self._followed.chosen_by[label]
        return choice

    def _set_up(self, state: State) -> None:
        model = unwrap_parallel(state.model)
        if self._model_id == id(model) and self.tracker is not None:
            return
        self._resolve_metrics(model)
        self.tracker = DeltaWTracker(model, self.modules, self.energy, baseline_device=self.baseline_device)
        if self._pending_tracker_state is not None:
            self.tracker.load_state_dict(self._pending_tracker_state)
            self._pending_tracker_state = None
        self._model_id = id(model)

    def init(self, state: State, logger: Logger) -> None:
        model = unwrap_parallel(state.model)
        if self._model_id is not None and self._model_id != id(model):
            # The probe is reused by a new Trainer on another model: a new run, measured from its own start. (A
            # checkpoint loaded by that Trainer restores the original baselines after INIT, in load_state_dict.)
            self._reset()
        # Fail at Trainer construction, not after the first batch: eval sections that do not build, bad module
        # patterns, missing metrics. Sections are built here: the model (and so the run's tokenizer) exists now.
        self._build_sections(state)
        self._resolve_metrics(model)
        find_probed_modules(model, self.modules)

    def _reset(self) -> None:
        """Forget the previous run: baselines, history, and the tracker bound to the previous model."""
        self.tracker = None
        self._built = {}  # rebuilt with the new model's tokenizer
        self._followed = FollowedMetrics()
        self.primary_metric = None
        self.baseline_metrics = None
        self.history = []
        self._pending_tracker_state = None
        self._model_id = None
        self._spectrum_seconds = None

    # -- events -----------------------------------------------------------------------------------------------

    def fit_start(self, state: State, logger: Logger) -> None:
        self._build_sections(state)
        self._set_up(state)
        if self._followed.metrics:
            choice = self.metric_choice()
            logger.log_hyperparameters(choice)
            log.info('LoRAProbe follows %s', {label: (list(metrics), self._followed.chosen_by[label])
                                              for label, metrics in self._followed.metrics.items()})
        self._eval_schedule.resolve(state)
        self._spectrum_schedule.resolve(state)
        assert self.tracker is not None
        record = None
        if self.baseline_metrics is None:
            values = self._evaluate(state)
            self.baseline_metrics = values
            record = self._record(state)
            self._add_metrics(record, values)
        if not self.tracker.captured:
            # After the evaluation: under FSDP its forward pass has initialised the root before we gather.
            baseline_bytes = self.tracker.capture()
            logger.log_metrics({'lora_probe/baseline_bytes': baseline_bytes,
                                'lora_probe/modules': len(self.tracker.probed)}, step=int(state.timestamp.batch))
        if record is not None:
            self._commit(state, logger, record)

    def batch_end(self, state: State, logger: Logger) -> None:
        self._probe(state, logger, Event.BATCH_END)

    def epoch_end(self, state: State, logger: Logger) -> None:
        self._probe(state, logger, Event.EPOCH_END)

    def fit_end(self, state: State, logger: Logger) -> None:
        batch = int(state.timestamp.batch)
        record = self._record(state)
        if 'metrics' not in record and (self.source_evals or self.target_evals):
            self._add_metrics(record, self._evaluate(state))
        if 'spectrum' not in record and batch > 0:
            self._add_spectrum(record)
        self._commit(state, logger, record)

    def _probe(self, state: State, logger: Logger, event: Event) -> None:
        evaluation_due = self._eval_schedule.due(state, event) and bool(self.source_evals or self.target_evals)
        spectrum_due = self._spectrum_schedule.due(state, event)
        if not (evaluation_due or spectrum_due):
            return
        record = self._record(state)
        if evaluation_due and 'metrics' not in record:
            self._add_metrics(record, self._evaluate(state))
        if spectrum_due and 'spectrum' not in record:
            self._add_spectrum(record)
        self._commit(state, logger, record)

    # -- measuring --------------------------------------------------------------------------------------------

    def _evaluate(self, state: State) -> dict[str, dict[str, float]]:
        """Every evaluator's metrics (reduced over ranks) with the current weights, without side effects."""
        return evaluate(state, self._evaluators(), self._followed, self.eval_subset_num_batches)

    def _record(self, state: State) -> dict[str, Any]:
        """The history record of the current batch (the last one, refreshed at EPOCH_END, or a new one)."""
        timestamp = state.timestamp
        now = {'batch': int(timestamp.batch), 'sample': int(timestamp.sample), 'token': int(timestamp.token),
               'epoch': int(timestamp.epoch)}
        if self.history and self.history[-1]['batch'] == now['batch']:
            self.history[-1].update(now)
            return self.history[-1]
        self.history.append(now)
        return now

    def _add_metrics(self, record: dict[str, Any], values: dict[str, dict[str, float]]) -> None:
        assert self.baseline_metrics is not None
        add_metrics(record, values, self.baseline_metrics, self._followed.directions,
                    self.source_labels, self.primary_metric)

    def _add_spectrum(self, record: dict[str, Any]) -> None:
        assert self.tracker is not None
        start = time.perf_counter()
        spectra = self.tracker.spectra()
        record['spectrum'] = {name: {k: s[k] for k in SPECTRUM_STATS} for name, s in spectra.items()}
        record['spectrum_summary'] = summarize_spectra(spectra)
        # Wall-clock is logged, not recorded: the history must be identical across an interrupted run.
        self._spectrum_seconds = time.perf_counter() - start

    def _commit(self, state: State, logger: Logger, record: dict[str, Any]) -> None:
        values = loggable_metrics(record, self.log_modules)
        if self._spectrum_seconds is not None:
            values['lora_probe/spectrum_seconds'] = self._spectrum_seconds
            self._spectrum_seconds = None
        logger.log_metrics(values, step=record['batch'])
        self._write(state)

    # -- output -----------------------------------------------------------------------------------------------

    def history_path(self, state: State) -> Optional[Path]:
        """Where ``lora_probe.json`` is written for this run (None without ``save_folder``)."""
        if self.save_folder is None:
            return None
        return Path(self.save_folder.replace('{run_name}', str(state.run_name))) / HISTORY_FILE

    def summary(self, state: Optional[State] = None) -> dict[str, Any]:
        """Everything ``lora_probe.json`` holds: settings, modules, baselines and the history."""
        tracker = self.tracker
        adapter: dict[str, Any] = {'kind': 'full'}
        model = unwrap_parallel(state.model) if state is not None else None
        if tracker is not None and any(p.kind == 'lora' for p in tracker.probed):
            module = next(p.module for p in tracker.probed if p.kind == 'lora')
            adapter_name = module.active_adapters[0]
            adapter = {'kind': 'lora', 'r': int(module.r[adapter_name]),
                       'alpha': float(module.lora_alpha[adapter_name])}
        if model is not None:
            parameters = list(model.parameters())
            adapter['trainable_params'] = int(sum(p.numel() for p in parameters if p.requires_grad))
            adapter['total_params'] = int(sum(p.numel() for p in parameters))
        return {
            'format': FORMAT,
            'run_name': None if state is None else str(state.run_name),
            'settings': {'every': _time_argument(self.every).strip("'"), 'spectrum_every':
                         _time_argument(self.spectrum_every).strip("'"), 'energy': self.energy,
                         'modules': self.modules},
            'adapter': adapter,
            'primary_metric': self.primary_metric,
            'higher_is_better': dict(self._followed.directions),
            'evaluators': {'source': self.source_labels, 'target': self.target_labels},
            'metrics': {label: list(metrics) for label, metrics in self._followed.metrics.items()},
            'metrics_chosen_by': dict(self._followed.chosen_by),
            'modules': {p.name: {'kind': p.kind, 'shape': list(p.shape)} for p in tracker.probed} if tracker else {},
            'baseline_bytes': tracker.baseline_bytes if tracker else 0,
            'baseline_metrics': self.baseline_metrics,
            'history': self.history,
        }

    def _write(self, state: State) -> None:
        path = self.history_path(state)
        if path is None or dist.get_global_rank() != 0:
            return
        atomic_write_json(path, self.summary(state))

    # -- checkpointing ----------------------------------------------------------------------------------------

    def before_load(self, state: State, logger: Logger) -> None:
        # FSDP2: know the probed modules before a checkpoint is loaded, so that state_dict() shows the sharded
        # initial weights the (sharded) checkpoint holds; a full checkpoint gathers them when it saves.
        self._checkpoints = (state.fsdp_state_dict_type or 'full') if state.fsdp_enabled else None
        if self._checkpoints is not None:
            self._set_up(state)

    def state_dict(self) -> dict[str, Any]:
        """The baselines (metrics, initial weights), the history, the tracker's state.

        Under FSDP2 this is a collective (every rank calls it when saving, as Composer's own state dict). With
        sharded checkpoints the initial weights are ``DTensor`` shards under ``'baseline'`` and everything else is
        one opaque entry (``'records'``): torch's distributed checkpoint loads into the structure shown at load time,
        when the history is still empty, so the history must not be a structure it walks into.
        """
        tracker = self.tracker
        whole = self._checkpoints == 'full'
        tracker_state = tracker.state_dict(whole=whole) if tracker is not None else self._pending_tracker_state
        state = {'version': 1, 'baseline_metrics': copy.deepcopy(self.baseline_metrics),
                 'history': copy.deepcopy(self.history), 'tracker': tracker_state}
        if self._checkpoints != 'sharded' or tracker is None:
            return state
        baseline = tracker_state.pop('baseline') if tracker.captured else tracker.baseline_template()
        return {'version': 1, 'records': (state,), 'baseline': baseline}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if 'records' in state:  # FSDP2, a sharded checkpoint: see state_dict()
            inner = copy.copy(state['records'][0])
            if inner.get('tracker') is not None:
                inner['tracker'] = {**inner['tracker'], 'baseline': state['baseline']}
            state = inner
        if state.get('version') != 1:
            raise ValueError(f'unknown LoRAProbe state version {state.get("version")!r}. Fix: resume with the '
                             f'composer_ext version that wrote the checkpoint.')
        self.baseline_metrics = copy.deepcopy(state['baseline_metrics'])
        self.history = copy.deepcopy(state['history'])
        tracker_state = state.get('tracker')
        if self.tracker is not None and tracker_state is not None:
            self.tracker.load_state_dict(tracker_state)
        else:
            self._pending_tracker_state = tracker_state  # applied when the model is known (FIT_START)

    def __repr__(self) -> str:
        """Rebuilds the probe with ``eval`` when it has no evaluator objects (plain arguments and eval sections).

        Eval sections are written as the completed dicts the probe keeps (batch size and sequence length filled in
        from the run config), so the rebuilt probe needs no ``train_config``.
        Evaluators hold dataloaders, which have no source form: they are written as a placeholder such as
        ``<2 Evaluators: 'prose', 'code'>``, which ``eval`` rejects (a SyntaxError) rather than silently building
        a probe that measures something else. Rebuild such a probe with its evaluators passed again.
        """
        return (f'LoRAProbe(source_evals={_evaluators_repr(self._items["source"])}, '
                f'target_evals={_evaluators_repr(self._items["target"])}, every={_time_argument(self.every)}, '
                f'spectrum_every={_time_argument(self.spectrum_every)}, energy={self.energy!r}, '
                f'modules={self.modules!r}, '
                f'metric_names={self.metric_names!r}, higher_is_better={self.higher_is_better or None!r}, '
                f'save_folder={self.save_folder!r}, log_modules={self.log_modules!r}, '
                f'baseline_device={self.baseline_device!r}, eval_subset_num_batches={self.eval_subset_num_batches!r})')


def _label(item: Any) -> str:
    return item.label if isinstance(item, Evaluator) else item['label']


def _evaluators_repr(items: Sequence[Any]) -> str:
    """Sections as the plain list they are (which rebuilds), or, with any evaluator object among them, a placeholder
    naming them all (which deliberately does not rebuild)."""
    if all(isinstance(item, Mapping) for item in items):
        return repr([dict(item) for item in items])
    labels = ', '.join(repr(_label(item)) for item in items)
    return f'<{len(items)} Evaluator{"s" if len(items) > 1 else ""}: {labels}>'


def _build_evaluators(context: Any, sections: Union[dict, list], role: str) -> list[Evaluator]:
    items = sections if isinstance(sections, list) else [sections]
    evaluators: list[Evaluator] = []
    for i, section in enumerate(items):
        key = f'callbacks.lora_probe.{role}_evals' + (f'[{i}]' if isinstance(sections, list) else '')
        if not isinstance(section, dict):
            raise ValueError(f'{key} is {section!r}. Fix: write a dataloader section such as '
                             f'{{name: text_evaluators, domains: prose, batch_size: 32}}.')
        label = section.get('label')
        built = context.build_dataloader({k: v for k, v in section.items() if k != 'label'}, key)
        if isinstance(built, list):
            evaluators.extend(built)
        else:
            default = role if len(items) == 1 else f'{role}_{i}'
            evaluators.append(Evaluator(label=label or default, dataloader=built))
    return evaluators


def build_lora_probe(
    context: Any,
    source_evals: Union[dict, list],
    target_evals: Union[dict, list],
    every: Union[str, int, None] = '100ba',
    spectrum_every: Union[str, int, None] = '500ba',
    energy: float = 0.9,
    modules: Union[str, list] = 'auto',
    metric_names: Optional[list] = None,
    higher_is_better: Optional[dict] = None,
    save_folder: Optional[str] = None,
    log_modules: bool = True,
    baseline_device: str = 'cpu',
    eval_subset_num_batches: int = -1,
) -> LoRAProbe:
    """YAML builder of :class:`LoRAProbe` (``callbacks: {lora_probe: {...}}``): evaluators from dataloader sections.

    ``source_evals`` / ``target_evals`` are a dataloader section or a list of them, as in ``eval_loaders``:
    a ``*_evaluators`` builder (e.g. ``text_evaluators``) gives one evaluator per domain, labelled by domain; any
    other dataloader becomes one evaluator labelled by the section's ``label`` (default ``source`` / ``target``).

    Example:
        .. code-block:: yaml

            callbacks:
              lora_probe:
                source_evals: {name: text_evaluators, domains: prose, batch_size: 32, subset_num_batches: 8}
                target_evals: {name: text_evaluators, domains: code, batch_size: 32, subset_num_batches: 8}
                every: 50ba
                spectrum_every: 100ba
                save_folder: runs/lora_probe/{run_name}
    """
    return LoRAProbe(_build_evaluators(context, source_evals, 'source'),
                     _build_evaluators(context, target_evals, 'target'),
                     every=every, spectrum_every=spectrum_every, energy=energy, modules=modules,
                     metric_names=metric_names, higher_is_better=higher_is_better, save_folder=save_folder,
                     log_modules=log_modules, baseline_device=baseline_device,
                     eval_subset_num_batches=eval_subset_num_batches)
