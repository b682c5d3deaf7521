"""Hook specifications: the plugin author's manual.

UNMERGE runs five stages, in this order for every manifest:

1. **trainer** — one LoRA adapter per micro-task (:func:`unmerge_trainers`);
2. **masker** — the ΔW coordinates decomposition works on, from the dictionary adapters (:func:`unmerge_maskers`);
3. **merger** — target task vectors from 2–5 adapters (:func:`unmerge_mergers`);
4. **decomposer** — each target as a combination of the dictionary's atoms (:func:`unmerge_decomposers`);
5. **metric** — scores of each decomposition (:func:`unmerge_metrics`).

Each stage has one hook. A plugin implements the hook of its stage and returns
:class:`~unmerge_core.PluginSpec` descriptors: the plugin's name, a one-line summary, a reference
URL, a pydantic model of its parameters (a subclass of :class:`~unmerge_core.PluginParams`; unknown
keys, NaN and infinities are refused before anything runs) and a ``factory`` that turns validated
parameters into the object that does the work. The hook only declares what exists, so listing plugins
never runs an algorithm. The object a factory returns is checked against its stage's Protocol
(:class:`~unmerge_core.Trainer`, :class:`~unmerge_core.Merger`, :class:`~unmerge_core.Masker`,
:class:`~unmerge_core.Decomposer`, :class:`~unmerge_core.Metric`): a missing method is a one-line
error naming the plugin and the method.

A distribution exposes its plugins through the entry-point group ``unmerge``::

    [project.entry-points.unmerge]
    my-decomposers = "my_package.plugin"

Built-in plugins are registered through the same group (see ``pyproject.toml``). Plugins import only
from ``unmerge_core`` itself (never its submodules): everything they may use is exported there.

Every hook is called with no arguments and returns a list (possibly empty) of descriptors. Implement
only the hooks of the stages you serve. A name declared twice (by two distributions) is reported
by ``unmerge plugins`` and cannot be used until one of them is uninstalled.

Rules for every plugin object: keep no state between calls unless the stage says otherwise (one
object serves every unit of work of a run, possibly from several threads); be deterministic given
the seeds you receive; raise :class:`~unmerge_core.UnmergeError` for a user mistake you detect —
anything else escaping your code (an exception, ``sys.exit``) becomes
``error: <stage> plugin '<name>': …`` and stops the run. Never write into the arrays you receive:
they are read-only.
"""

from __future__ import annotations

import pluggy

from unmerge_core.types import PluginSpec

PROJECT = "unmerge"
ENTRY_POINT_GROUP = "unmerge"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --------------------------------------------------------------------------------------------------
# 1. trainer
# --------------------------------------------------------------------------------------------------


@hookspec
def unmerge_trainers() -> list[PluginSpec]:
    """Declare trainers: plugins that produce one LoRA adapter per micro-task.

    Returns:
        Descriptors with ``stage=Stage.TRAINER``. Each ``factory(params)`` returns a
        :class:`~unmerge_core.Trainer`::

            def train(self, job: TrainJob) -> None

        ``job.task`` is the :class:`~unmerge_core.TaskInfo` (name, category, data ``source``);
        ``job.output_dir`` is an empty directory to fill with a PEFT LoRA adapter
        (``adapter_config.json`` and ``adapter_model.safetensors``; never pickle); ``job.seed`` is
        the seed to use; ``job.workspace`` is a directory shared by all jobs of the same trainer
        configuration (put a locally built base model there, for example).

        The adapter is cached under a key made of the trainer's name, its parameters and the task's
        registry entry, so ``train`` is called at most once per task and configuration; it must be
        deterministic given ``job.seed``. What it writes is read back and checked (a config whose
        rank does not match the tensors, NaN, non-float tensors are refused).

        A trainer that copies adapters from elsewhere (rather than making them from the parameters
        and the seed) also defines ``source_fingerprint(task: TaskInfo) -> Any``: a JSON-able value
        that changes when the source changes (file sizes and times, a Hub commit); it joins the cache
        key, so an adapter replaced in place is read again instead of served stale.

        A trainer whose adapters were trained on a real, loadable model declares
        ``provides=(Capability.BASE_MODEL,)``: metrics that need the model (``causal-ablation``)
        are only allowed with such trainers.

        **Optional: input statistics** (:class:`~unmerge_core.InputStatisticsTrainer`), for mergers
        that scale task vectors by activations (``scale-svd``)::

            def input_statistics(self, job: InputStatisticsJob) -> Mapping[str, InputStatistics]

        Load the base model the adapters are trained on, run it on the first ``job.max_batches``
        batches of the examples ``train`` would use for ``job.task`` with ``job.seed``, and return
        :func:`~unmerge_core.record_input_statistics` of ``job.modules`` (every one of them). Declare
        ``Capability.ACTIVATION_STATISTICS`` in ``provides``; the runner calls it once per task and
        batch count, caches the result (keyed by the trainer's configuration, the task, the seed, the
        modules and the batch count) and checks it (a module missing, a wrong width, NaN: one line).

    Example::

        import json

        import torch
        from safetensors.torch import save_file

        from unmerge_core import PluginParams, PluginSpec, Stage, TrainJob, hookimpl


        class RandomLoraParams(PluginParams):
            rank: int = 2


        class RandomLora:
            \"\"\"LoRA factors drawn from the job's seed on two 8 × 8 modules (a stand-in for training).\"\"\"

            def __init__(self, params: RandomLoraParams) -> None:
                self.params = params

            def train(self, job: TrainJob) -> None:
                gen = torch.Generator().manual_seed(job.seed)
                r, tensors = self.params.rank, {}
                for module in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"):
                    tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, 8, generator=gen)
                    tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(8, r, generator=gen)
                save_file(tensors, str(job.output_dir / "adapter_model.safetensors"))
                config = {"peft_type": "LORA", "r": r, "lora_alpha": r, "target_modules": ["q_proj", "v_proj"]}
                (job.output_dir / "adapter_config.json").write_text(json.dumps(config))


        @hookimpl
        def unmerge_trainers():
            return [PluginSpec("random-lora", Stage.TRAINER, "LoRA factors drawn at random",
                               "https://arxiv.org/abs/2106.09685", RandomLoraParams, RandomLora)]
    """


# --------------------------------------------------------------------------------------------------
# 2. masker
# --------------------------------------------------------------------------------------------------


@hookspec
def unmerge_maskers() -> list[PluginSpec]:
    """Declare maskers: plugins that choose the ΔW coordinates decomposition works on.

    Returns:
        Descriptors with ``stage=Stage.MASKER``. Each ``factory(params)`` returns a
        :class:`~unmerge_core.Masker`::

            def build_mask(self, adapters: Sequence[LoraAdapter]) -> Mask

        ``adapters`` are the dictionary (known-task) adapters, opened lazily
        (:class:`~unmerge_core.LoraAdapter`: ``module_names``, ``shapes``, ``delta(m)`` for one
        module's dense ΔW, ``lowrank(m)`` to stream it in row blocks, ``values_at(m, idx)`` for a few
        entries). Read them module by module; never hold every ΔW at once (a 7B module is 51 MB).
        :func:`~unmerge_core.common_modules` gives the modules every adapter adapts.

        Return a :class:`~unmerge_core.Mask`: sorted flat (row-major) int64 indices per module and
        each module's ``(out, in)`` shape. The same mask is applied to every dictionary atom,
        unknown task and target. An empty mask is an error.

        **Optional shared pass** (:class:`~unmerge_core.FoldingMasker`). The merge statistics
        of the fast path (below) form every dictionary adapter's ΔW too. A masker that can build its
        mask from ΔW given block of rows by block of rows lets the core form each module once for
        both::

            def fold_plan(self, adapters) -> FoldPlan | None
            # FoldPlan: .modules (the mask's modules, in order) and
            #           .fold(module, pool) -> ModuleFold (one per module, on worker threads;
            #           pool.get(shape, tag) gives the thread reusable buffers freed with the pass)

        The core then feeds, for each block of :data:`~unmerge_core.BLOCK_ROWS` rows, every adapter's
        block to ``fold.add(adapter_index, start_row, block)`` (float32, read only: the same block goes
        to the statistics), calls ``fold.candidates(start, stop)`` once the rows are complete (the
        ascending flat indices in those rows that may still be chosen: the core keeps the statistics
        adapters' values there) and finally ``fold.select()``, which must return a subset of the
        candidates. The mask assembled from the folds must equal ``build_mask``'s (the ``topk``
        masker's test checks it on random shapes); ``fold_plan`` may return ``None`` to decline
        (``topk`` does on a GPU, where it forms whole modules itself).

    Example::

        import numpy as np

        from unmerge_core import Mask, PluginParams, PluginSpec, Stage, common_modules, hookimpl


        class FirstAtomParams(PluginParams):
            per_module: int = 16


        class FirstAtomTopK:
            \"\"\"The largest |ΔW| of the first dictionary adapter, per module.\"\"\"

            def __init__(self, params: FirstAtomParams) -> None:
                self.params = params

            def build_mask(self, adapters):
                modules = common_modules(list(adapters))
                indices = {}
                for module in modules:
                    score = adapters[0].delta(module).abs().reshape(-1).numpy()
                    k = min(self.params.per_module, score.size)
                    indices[module] = np.sort(np.argpartition(score, score.size - k)[score.size - k:]).astype(np.int64)
                return Mask(indices, {m: adapters[0].shapes[m] for m in modules})


        @hookimpl
        def unmerge_maskers():
            return [PluginSpec("first-atom-topk", Stage.MASKER, "Top-k |ΔW| of the first atom per module",
                               "https://arxiv.org/abs/2106.09685", FirstAtomParams, FirstAtomTopK)]
    """


# --------------------------------------------------------------------------------------------------
# 3. merger
# --------------------------------------------------------------------------------------------------


@hookspec
def unmerge_mergers() -> list[PluginSpec]:
    """Declare mergers: plugins that combine task vectors into a target task vector.

    Returns:
        Descriptors with ``stage=Stage.MERGER``. Each ``factory(params)`` returns a
        :class:`~unmerge_core.Merger`::

            methods: Sequence[str]          # the merge methods it implements (protocol.methods)
            def merge_module(self, job: MergeJob, module: str,
                             deltas: Sequence[torch.Tensor]) -> torch.Tensor

        **The contract.** ``merge_module`` returns one module of the target's task vector — the
        merged model's weight minus the base weight, same ``(out, in)`` shape, float32. ``deltas[i]``
        is that module's ΔW of constituent ``job.tasks[i]`` (zeros where it does not adapt the
        module), ``job.weights[i]`` its weight, ``job.method`` one of ``methods``, ``job.seed`` the
        seed of every random draw (a rerun must give the same target). Task-vector methods are
        translation invariant, so evaluating them on ΔW with a zero base is exact; a method defined
        on full weights must still return ``merged − base``. A call sees one module, so memory never
        holds more than one module per constituent; calls may come from several threads.

        **Optional fast path.** Targets are only ever used on the mask's coordinates. A merger whose
        methods are element-wise once each task's own statistics are known (weighted sums, TIES's
        magnitude threshold, DARE's drop) can skip dense modules by implementing
        :class:`~unmerge_core.MaskedMerger` — all five members, or none::

            masked_methods: Collection[str]      # methods with a masked form
            statistics_methods: Collection[str]  # those needing per-(task, module) statistics
            def statistics_config(self) -> Mapping[str, Any]   # what the statistics depend on
            def module_statistics(self, delta: LowRankDelta, module: str) -> Mapping[str, float]
            def merge_masked(self, job: MergeJob, module: str, flat_indices: np.ndarray,
                             values: Sequence[np.ndarray],
                             statistics: Sequence[Mapping[str, float] | None]) -> np.ndarray

        ``module_statistics`` gets one task's ΔW of one module as a
        :class:`~unmerge_core.LowRankDelta` (``dense()`` forms it in a reused buffer;
        ``row_blocks()`` streams it without forming it, bit-identical; ``sample()`` gives a cheap
        subset for estimates) and returns a few numbers (a threshold, a norm); it is computed once per
        task and module, keyed by ``statistics_config()``, and reused by every target with the task.
        An optional ``statistics_stream(delta, module)`` returns an object with ``add(block)`` (the
        next row block of ΔW, flattened float32, in order) and ``finish() -> Mapping[str, float]``
        (equal to ``module_statistics`` of the same ΔW), or ``None`` to decline: with a masker that
        folds (above), the statistics of dictionary adapters then come from the masker's own pass
        over ΔW instead of a second one (:mod:`unmerge_core.pipeline.delta_pass`).
        ``merge_masked`` gets the mask's sorted flat indices into the module, each constituent's
        float64 ΔW there (for ``statistics_methods``: the very numbers its statistics came from) and
        its statistics, and returns the target's float64 values there. They must equal
        ``merge_module``'s result gathered at the mask, up to float rounding; a random method must
        say how it draws and keep the draw a function of ``job.seed`` and the coordinate. Methods not
        in ``masked_methods`` use ``merge_module``.

        **Optional low-rank path** (:class:`~unmerge_core.LowRankMerger`, both members or none), for
        methods that are not element-wise but can be formed from the constituents' LoRA factors
        (SVD-based merges: a sum of T rank-r task vectors has rank ≤ T·r)::

            lowrank_methods: Collection[str]
            def merge_lowrank(self, job: MergeJob, module: str, deltas: Sequence[LowRankDelta],
                              flat_indices: np.ndarray) -> np.ndarray

        ``deltas[i].a``, ``.b`` and ``.scale`` are constituent i's factors (``ΔW = b @ a · scale``;
        rank 0 where it does not adapt the module); return the target's float64 values at
        ``flat_indices`` without forming the module. Must equal ``merge_module`` there.

        **Optional full-weight methods** (:class:`~unmerge_core.BaseWeightMerger`, both or none):
        methods defined on full weights (slerp, Karcher mean) get the base model's weight of the
        module and still return ``merged − base``::

            base_methods: Collection[str]
            def merge_module_on_base(self, job: MergeJob, module: str, deltas: Sequence[torch.Tensor],
                                     base: torch.Tensor) -> torch.Tensor

        A run whose trainer provides no base model (``synthetic``) refuses these methods at
        ``unmerge validate``.

        **Optional activation-scaled methods** (:class:`~unmerge_core.ActivationMerger`, all three
        members or none), for methods that scale each task vector by its task's input statistics
        (Scale-SVD / OATS)::

            activation_methods: Collection[str]     # may be empty (e.g. set to uniform scaling)
            activation_batches: int                 # trainer batches per task to record
            def merge_module_scaled(self, job: MergeJob, module: str, deltas: Sequence[torch.Tensor],
                                    inputs: Sequence[InputStatistics]) -> torch.Tensor

        ``inputs[i]`` is what the base model's ``module`` received on constituent ``job.tasks[i]``'s
        training data (:class:`~unmerge_core.InputStatistics`: sums of x and x² per input feature over
        the tokens). The runner records them through the trainer's ``input_statistics`` before the
        targets are merged; every module of every constituent has them, or the target is an error
        naming the module. A manifest whose trainer does not declare
        ``Capability.ACTIVATION_STATISTICS`` is refused at ``unmerge validate`` for these methods.

        **Optional checks**, each used when present: ``method_tasks(method) -> (min, max | None)``
        (how many constituents a method takes — targets of that method draw their count from the
        protocol's range narrowed to it; validation refuses ranges that do not meet),
        ``check_method(method) -> str | None`` (why the method cannot run with these parameters,
        reported as one line at validate time), ``unweighted_methods`` (methods that ignore the
        target's weights; refused with ``protocol.weights = "dirichlet"``). A manifest may list
        several mergers (``[[merger]]``); each protocol method must be offered by exactly one.

    Example::

        import torch

        from unmerge_core import NoParams, PluginSpec, Stage, hookimpl


        class WeightedMean:
            \"\"\"Σ wᵢ ΔWᵢ / Σ wᵢ (mergekit's ``linear`` with ``normalize``).\"\"\"

            methods = ("weighted-mean",)

            def __init__(self, params: NoParams) -> None:
                self.params = params

            def merge_module(self, job, module, deltas):
                total = torch.zeros_like(deltas[0])
                for weight, delta in zip(job.weights, deltas):
                    total += weight * delta
                return total / sum(job.weights)


        @hookimpl
        def unmerge_mergers():
            return [PluginSpec("weighted-mean", Stage.MERGER, "Normalised weighted mean of task vectors",
                               "https://arxiv.org/abs/2212.04089", NoParams, WeightedMean)]
    """


# --------------------------------------------------------------------------------------------------
# 4. decomposer
# --------------------------------------------------------------------------------------------------


@hookspec
def unmerge_decomposers() -> list[PluginSpec]:
    """Declare decomposers: plugins that express a target as a combination of dictionary atoms.

    Returns:
        Descriptors with ``stage=Stage.DECOMPOSER``. Each ``factory(params)`` returns a
        :class:`~unmerge_core.Decomposer`::

            def decompose(self, problem: DecompositionProblem) -> Decomposition

        ``problem.dictionary`` is ``(n_coords, n_atoms)`` float64 (read-only), ``problem.target``
        ``(n_coords,)``, ``problem.atom_names`` names the columns, ``problem.groups`` maps module
        names to row slices, ``problem.seed`` seeds randomised solvers. ΔW entries are small
        (1e-4–1e-2): state penalties and tolerances relative to the data, so results do not depend
        on the absolute scale. A least-squares method can work from ``problem.normal_equations()``
        (``DᵀD``, shared by every target of a run and formed once, and this target's ``Dᵀy``): it then
        costs ``n_coords × n_atoms`` per target instead of ``n_coords × n_atoms²``.

        Return a :class:`~unmerge_core.Decomposition` with ``coefficients`` (one per atom) and the
        ``reconstruction`` (one per coordinate). Optionally set ``support`` (boolean per atom) when
        the method has its own decision rule — otherwise ``|c| > threshold`` is used
        (:meth:`~unmerge_core.Decomposition.selected`) — ``out_of_dictionary`` when it judges the
        target not (wholly) explainable by the dictionary, ``claims`` (per atom ``"exact"``, ``"retrained"``,
        ``"relative"`` or ``None``: what each attributed atom stands for; ``"relative"`` is listed but not
        counted as a claim of the skill; default ``"exact"``), and ``info`` (JSON-serialisable diagnostics;
        ``confidence``, ``p_values`` or ``layer_consistency`` per atom are shown by the reports).
        Wrong lengths, NaN/inf and non-JSON ``info`` are refused with an error naming the plugin.
        Follow scikit-learn's habits: hyper-parameters come from the params model; no state is
        kept between calls. A decomposer that wraps another (``per-layer``) declares ``wraps=True``
        and its factory receives ``(params, inner)``.

    Example::

        import numpy as np
        from pydantic import Field

        from unmerge_core import Decomposition, PluginParams, PluginSpec, Stage, hookimpl


        class ClippedLstsqParams(PluginParams):
            keep: float = Field(0.05, ge=0, le=1, description="attribute atoms with c ≥ keep × max c")


        class ClippedLstsq:
            \"\"\"Least squares, negative coefficients set to 0, small ones not attributed.\"\"\"

            def __init__(self, params: ClippedLstsqParams) -> None:
                self.params = params

            def decompose(self, problem):
                d, y = problem.dictionary, problem.target
                coef = np.clip(np.linalg.lstsq(d, y, rcond=None)[0], 0, None)
                support = coef >= self.params.keep * coef.max(initial=0.0)
                return Decomposition(coef, d @ coef, support & (coef > 0), info={"rank": int(np.linalg.matrix_rank(d))})


        @hookimpl
        def unmerge_decomposers():
            return [PluginSpec("clipped-lstsq", Stage.DECOMPOSER, "Least squares clipped at 0",
                               "https://doi.org/10.1137/1.9781611971217", ClippedLstsqParams, ClippedLstsq)]
    """


# --------------------------------------------------------------------------------------------------
# 5. metric
# --------------------------------------------------------------------------------------------------


@hookspec
def unmerge_metrics() -> list[PluginSpec]:
    """Declare metrics: plugins that score one decomposition of one target.

    Returns:
        Descriptors with ``stage=Stage.METRIC``. Each ``factory(params)`` returns a
        :class:`~unmerge_core.Metric`::

            def compute(self, evaluation: TargetEvaluation) -> Mapping[str, float | None]

        ``evaluation`` (:class:`~unmerge_core.TargetEvaluation`) holds the target's ground truth
        (``group``, ``method``, ``true_tasks``, ``true_weights``; group ``external`` when there is
        none), the dictionary's ``atom_names``, the masked ``target``, the ``decomposition``, the
        masked vectors of every task (``task_vectors``) and their ``categories``. Inside a run,
        metrics that act on models also get ``merge_job`` (how the target was made) and ``context``
        (:class:`~unmerge_core.RunContext`: adapter directories, registry entries, the mask, the
        seed, the run directory, every target, and ``target_deltas(job)`` — the target's dense ΔW
        module by module); both are ``None`` for targets the run did not make.

        Return a mapping from column name to value. Return ``None`` where the metric is undefined
        for this target (precision with nothing attributed, recall of an unknown-only target): the
        summaries average only defined values, never zeros in their place. A column named
        ``name[atom]`` is one atom's value: it is kept per target and never averaged. Use
        :meth:`~unmerge_core.Decomposition.selected` for "the atoms this decomposition attributes",
        so every metric counts the same atoms. One object scores every evaluation of a run, so a
        metric may cache (a loaded model, say), but its values must not depend on the order it is
        called in: a resumed run calls it only for the pairs not yet cached. Declare what you need
        beyond the vectors in ``requires`` (``Capability.BASE_MODEL``, ``TASK_DATA``,
        ``CONSTITUENT_VECTORS``, ``TARGET_DELTAS``): runs that cannot provide it are refused up front.

    Example::

        from unmerge_core import NoParams, PluginSpec, Stage, hookimpl


        class AttributedShare:
            \"\"\"Share of the dictionary the decomposition attributes; undefined for an empty dictionary.\"\"\"

            def __init__(self, params: NoParams) -> None:
                self.params = params

            def compute(self, evaluation):
                n = len(evaluation.atom_names)
                chosen = evaluation.decomposition.selected()
                return {"attributed_share": float(chosen.sum()) / n if n else None}


        @hookimpl
        def unmerge_metrics():
            return [PluginSpec("attributed-share", Stage.METRIC, "Share of the atoms attributed",
                               "https://arxiv.org/abs/2212.04089", NoParams, AttributedShare)]
    """


HOOKS_BY_STAGE: dict[str, str] = {
    "trainer": "unmerge_trainers",
    "merger": "unmerge_mergers",
    "masker": "unmerge_maskers",
    "decomposer": "unmerge_decomposers",
    "metric": "unmerge_metrics",
}
