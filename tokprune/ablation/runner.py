"""The ablation runner: load once, then evaluate each planned pipeline, flushing each finished run.

``run_ablation(cfg)`` is what ``tokprune run`` calls. Resumable: runs whose key (a hash of the run's
resolved config) is already in ``results.jsonl`` are skipped; a matched run's key includes its matched
value, so it is computed from the reference's recorded budget first; a swept run's key includes its
calibrated knob value, found again from ``calibration.json`` (see :mod:`.calibrate`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .. import strategies
from ..errors import TokpruneError
from . import plan as planning
from . import preflight
from .calibrate import Calibration, Calibrator, axis_value, search
from .config import AblationConfig, ConfigError, to_container, to_yaml, vision_positions_arg
from .datasets import Dataset, EvalSample, load_dataset
from .distributed import Dist
from .distributed import init as init_dist
from .loading import build_prompts, load_model, model_fingerprint, resolve_device, resolve_model_path
from .measure import GenerateTimer, PeakMemory, Timing
from .metrics import run_metrics
from .preflight import OutputError
from .provenance import adapter_source, versions
from .results import ROW_KEYS, append_result, load_results, run_key

__all__ = ["OutputError", "RunOutcome", "Session", "run_ablation"]

RESULTS_FILE = "results.jsonl"
CALIBRATION_FILE = "calibration.json"


@dataclass
class RunOutcome:
    """What ``run_ablation`` returns: the rows of this study (in plan order) and where files went."""

    rows: list[dict[str, Any]]
    output_dir: Path
    skipped: int = 0  # runs found already recorded
    files: dict[str, Path] = field(default_factory=dict)
    reused: int = 0  # targets whose calibration landed on the run of an earlier target


# ------------------------------------------------------------------------------------------ evaluation


def _per_sample(stats: Any, b: int) -> list[dict[str, Any]]:
    """Per-sample numbers from the adapter's PruneStats, scalar diagnostics included.

    ``visual_kept`` here is the visual tokens the *last* decoder layer processed (after every stage, so
    LLM-stage strategies count too); the adapter's own count after the vision stage is ``visual_after_vision``.
    """
    if stats is None:
        return [{} for _ in range(b)]
    records = stats.to_records()
    final = stats.layer_visual[:, -1].tolist()
    out = []
    for rec, last in zip(records, final):
        rec = {k: v for k, v in rec.items() if v is None or isinstance(v, (bool, int, float, str))}
        rec["visual_after_vision"] = rec.pop("visual_kept")
        rec["visual_kept"] = int(last)
        out.append(rec)
    return out


@dataclass
class Session:
    """A loaded model and dataset shared by every run of a study."""

    cfg: AblationConfig
    model: Any
    processor: Any
    dataset: Dataset
    device: torch.device
    dist: Dist
    progress: bool = True
    warm: bool = False
    calibration: Dataset | None = None  # the split budget knobs are calibrated on
    #: Recorded in every row and part of each run's identity (``engine: vllm`` is tokprune.integrations.vllm_engine).
    engine = "transformers"
    gallery = True  # the kept-token gallery draws this session's transformers model

    def check_runs(self, runs: Sequence[planning.PlannedRun]) -> None:
        """Fail now, not an hour into a sweep, on a pipeline this model cannot run."""
        _check_patchable(self, runs)

    def engine_versions(self) -> dict[str, Any]:
        """Versions of the engine beyond the stack's (none for transformers: already in :func:`versions`)."""
        return {}

    def evaluate(self, pipeline: Any, desc: str) -> tuple[list[dict[str, Any]], list[Timing], float | None, str]:
        """This rank's share of the dataset under ``pipeline``: records, batch timings, peak MB, memory kind."""
        from tqdm.auto import tqdm

        import tokprune

        cfg = self.cfg
        indices = self.dist.shard(len(self.dataset.samples))
        records: list[dict[str, Any]] = []
        timings: list[Timing] = []
        timer = GenerateTimer(self.model, cuda=self.device.type == "cuda")
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        bar = tqdm(total=len(indices), desc=desc, unit="q", leave=False, disable=not self.progress, dynamic_ncols=True)
        handle = tokprune.patch(
            self.model,
            pipeline,
            vision_positions=vision_positions_arg(cfg.positions.vision),
            llm_positions=cfg.positions.llm,
            question_end=self.processor.tokenizer,  # the question ends at the "ASSISTANT:" marker
            budget_scope=cfg.budget_scope,
        )
        try:
            with PeakMemory(self.device) as peak:
                for start in range(0, len(indices), cfg.batch_size):
                    batch = indices[start : start + cfg.batch_size]
                    samples = [self.dataset.samples[i] for i in batch]
                    preds, new_tokens, timing = self._generate(samples, timer)
                    timings.append(timing)
                    stats = _per_sample(handle.stats, len(batch))
                    for i, sample, pred, n_new, st in zip(batch, samples, preds, new_tokens, stats):
                        records.append(self._record(i, sample, pred, n_new, st))
                    bar.update(len(batch))
        finally:
            handle.remove()
            bar.close()
        return records, timings, peak.mb, peak.kind

    def warm_up(self) -> None:
        """One untimed batch, so one-off costs (lazy init, allocator growth) do not land on the first run."""
        if self.warm:
            return
        first = self.dataset.samples[: min(self.cfg.batch_size, len(self.dataset.samples))]
        self._generate(first, GenerateTimer(self.model, cuda=self.device.type == "cuda"))
        self.warm = True

    def inputs(self, samples: Sequence[EvalSample]) -> Any:
        """The processor's batch (prompts, pixel values) for ``samples``, on the model's device and dtype."""
        questions = [s.question + self.cfg.dataset.prompt_suffix for s in samples]
        if self.dataset.inputs is not None:
            built = self.dataset.inputs(self.processor.tokenizer, samples, questions)
            return {k: v.to(self.device, self.model.dtype) if v.is_floating_point() else v.to(self.device)
                    for k, v in built.items()}
        inputs = self.processor(
            text=build_prompts(self.processor, questions),
            images=[[s.load_image()] for s in samples],  # per sample: SmolVLM's processor needs the nesting
            return_tensors="pt",
            padding=True,
        ).to(self.device)
        if "pixel_values" in inputs and self.model.dtype != inputs["pixel_values"].dtype:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    def _generate(self, samples: Sequence[EvalSample], timer: GenerateTimer) -> tuple[list[str], list[int], Timing]:
        cfg = self.cfg
        inputs = self.inputs(samples)
        with torch.inference_mode(), timer.measure() as timing:
            out = self.model.generate(**inputs, max_new_tokens=cfg.max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1] :]
        pad = self.processor.tokenizer.pad_token_id
        counts = [int((row != pad).sum()) if pad is not None else int(row.numel()) for row in new]
        texts = self.processor.batch_decode(new, skip_special_tokens=True)
        return [t.strip() for t in texts], counts, timing

    def _record(self, index: int, sample: EvalSample, pred: str, n_new: int, stats: dict[str, Any]) -> dict[str, Any]:
        scorer = self.dataset.scorer
        return {
            "index": index,
            "question_id": sample.question_id,
            "qtype": sample.qtype,
            "prediction": pred,
            "normalized": scorer.normalize(pred, sample),
            "score": scorer.score(pred, sample),
            "new_tokens": n_new,
            **stats,
        }


# ---------------------------------------------------------------------------------------- provenance


def resolved_run_config(
    cfg: AblationConfig, spec: str, device: torch.device, dataset: Dataset, fingerprint: str
) -> dict[str, Any]:
    """Everything that can change a run's numbers; its hash is the run's key for resume."""
    full = to_container(cfg)
    return {
        "model": cfg.model,
        "model_fingerprint": fingerprint,
        "dataset": {**full["dataset"], "n": len(dataset.samples)},
        "dataset_fingerprint": dataset.fingerprint,
        "spec": spec,
        "positions": full["positions"],
        **_budget_scope(cfg),
        "batch_size": cfg.batch_size,
        "max_new_tokens": cfg.max_new_tokens,
        "dtype": cfg.dtype,
        "device": device.type,
        "attn_implementation": cfg.attn_implementation,
        "seed": cfg.seed,
        "limit": cfg.limit,
        # Only when not the default: the keys of earlier (transformers) runs stay valid.
        **({"engine": cfg.engine} if cfg.engine != "transformers" else {}),
    }


# ------------------------------------------------------------------------------------------- the loop


def _summary_line(row: dict[str, Any]) -> str:
    m = row["metrics"]

    def f(key: str, fmt: str) -> str:
        return format(m[key], fmt) if m.get(key) is not None else "-"

    return (
        f"[{row['label']}] acc {f('accuracy', '.3f')}  agree {f('agreement', '.3f')}  "
        f"visual {f('visual_kept_mean', '.1f')}/{f('visual_total', '.0f')}  FLOPs {f('flops_rel', '.1%')}  "
        f"prefill {f('prefill_ms', '.1f')} ms  decode {f('decode_ms_per_token', '.1f')} ms/tok  {row['wall_s']:.1f} s"
    )


def _execute(
    session: Session, run: planning.PlannedRun, resolved: dict[str, Any], baseline: list[dict[str, Any]] | None
) -> dict[str, Any]:
    pipeline = strategies.get(run.spec)
    t0 = time.perf_counter()
    records, timings, peak_mb, peak_kind = session.evaluate(pipeline, run.label)
    wall = time.perf_counter() - t0
    # Gather every rank's share; all ranks then compute identical metrics.
    gathered = session.dist.all_gather((records, timings, peak_mb, wall))
    records = sorted((r for part in gathered for r in part[0]), key=lambda r: r["index"])
    timings = [t for part in gathered for t in part[1]]
    metrics = run_metrics(records, [session.dataset.samples[r["index"]] for r in records], session.dataset.scorer, timings, baseline)
    metrics["peak_mem_mb"] = max(part[2] for part in gathered)
    return {
        "key": run_key(resolved),
        "label": run.label,
        "spec": run.spec,
        "engine": session.engine,
        "role": run.role,
        "budget": run.budget,
        "target": run.target,
        "knob": run.knob.path if run.knob is not None else None,
        "resolved": resolved,
        "config": to_container(session.cfg),
        "metrics": metrics,
        "wall_s": max(part[3] for part in gathered),
        "env": {
            "device": str(session.device),
            "world_size": session.dist.world_size,
            "torch_threads": torch.get_num_threads(),
            "peak_memory": peak_kind,
            "scorer": session.dataset.scorer.name,
            "dataset_skipped_rows": session.dataset.skipped,
        },
        "versions": {**versions(pipeline), **session.engine_versions(), "adapter": adapter_source(session.model)},
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "predictions": records,
    }


def load_calibration(cfg: AblationConfig) -> Dataset:
    """The calibration split: ``calibration.split`` of the shapes benchmark, or ``calibration.path`` (by
    default ``dataset.path``: only token counts are read from it, never answers)."""
    calib_cfg = replace(cfg.dataset, split=cfg.calibration.split, path=cfg.calibration.path or cfg.dataset.path)
    return load_dataset(calib_cfg, cfg.calibration.limit)


def open_session(cfg: AblationConfig, dist: Dist, progress: bool = True) -> Session:
    """Load the dataset (first: its errors are cheap to find) and the model once for every run."""
    if cfg.engine == "vllm":
        from ..integrations.vllm_engine import open_vllm_session

        return open_vllm_session(cfg, dist, progress)
    device = resolve_device(cfg.device, dist)
    dataset = load_dataset(cfg.dataset, cfg.limit)
    calibration = load_calibration(cfg) if cfg.budget.targets else None
    model, processor = _load_checked(cfg, device)
    preflight.screen_questions(dataset, processor, model, cfg.dataset.prompt_suffix, cfg.dataset.skip_bad_rows)
    if calibration is not None:
        preflight.screen_questions(calibration, processor, model, cfg.dataset.prompt_suffix, cfg.dataset.skip_bad_rows)
    return Session(cfg, model, processor, dataset, device, dist, progress and dist.is_main, calibration=calibration)


def _load_checked(cfg: AblationConfig, device: torch.device) -> tuple[Any, Any]:
    """:func:`load_model`, its failures as one error naming the checkpoint (complete files checked first)."""
    path = resolve_model_path(cfg.model)
    preflight.check_checkpoint(path)
    with preflight.loading_model(path):
        return load_model(cfg, device)


def _with_budget(run: planning.PlannedRun, reference: dict[str, Any] | None) -> planning.PlannedRun:
    """A matched run with its budget filled in from the reference's recorded metrics."""
    if run.role != "matched":
        return run
    if reference is None:
        raise TokpruneError(f"run {run.label!r} is matched to a reference that did not run")
    m = reference["metrics"]
    if m.get("visual_kept_mean") is None or not m.get("visual_total"):
        raise TokpruneError(f"the reference run {reference['label']!r} reports no kept visual tokens")
    return planning.resolve_matched(run, m["visual_kept_mean"], m["visual_total"])


def run_ablation(
    cfg: AblationConfig,
    progress: bool = True,
    echo: Callable[[str], None] | None = print,
    session: Session | None = None,
) -> RunOutcome:
    """Run (or resume) the study ``cfg``; returns its rows in plan order and writes results, table, plot."""
    runs = planning.plan_runs(cfg)  # validates every spec before anything is loaded
    if cfg.engine == "vllm":
        from ..integrations.vllm_engine import check_study

        check_study(cfg, runs)  # vLLM importable, every spec one the plugin serves: before any work
    if cfg.plot:
        from .report import check_plotting

        check_plotting()  # the plot is part of the output: say now, not after the runs, that it cannot be drawn
    lock = None
    dist = session.dist if session is not None else init_dist(cfg.device)
    try:
        out_dir = Path(cfg.output_dir)
        if dist.is_main:  # before the model loads: an unwritable folder is found in a second
            try:
                out_dir.mkdir(parents=True, exist_ok=True)
                lock = _lock_output_dir(out_dir)
            except OSError as exc:
                raise OutputError(
                    f"cannot write to output_dir={str(out_dir)!r} ({exc.strerror or exc}); "
                    "choose a writable folder, e.g. output_dir=runs/mine"
                ) from None
            preflight.check_output(out_dir, RESULTS_FILE, len(runs), cfg.limit)
            preflight.write_config(out_dir / "config.yaml", to_yaml(cfg))
        session = session or open_session(cfg, dist, progress)
        rows, skipped, reused = _run_all(session, runs, out_dir / RESULTS_FILE, echo)
        files: dict[str, Path] = {"results": out_dir / RESULTS_FILE, "config": out_dir / "config.yaml"}
        if dist.is_main:
            from .report import write_reports

            try:
                files.update(write_reports(rows, out_dir, plot=cfg.plot, tolerance=cfg.budget.tolerance))
                if cfg.plot and cfg.gallery.images and session.gallery and session.dataset.inputs is None:
                    from .gallery import write_gallery

                    gallery = write_gallery(session, rows, out_dir / "kept.png")
                    files.update({"gallery": gallery} if gallery is not None else {})
                elif cfg.plot and cfg.gallery.images and echo is not None:
                    why = (f"engine={session.engine} (it draws the transformers model's kept tokens)" if not session.gallery
                           else f"dataset {session.dataset.name} (it draws one image per question)")
                    echo(f"gallery: not drawn on {why}")
            except OSError as exc:
                raise OutputError(
                    f"every run is recorded in {str(out_dir / RESULTS_FILE)!r}, but writing the report failed "
                    f"({exc.strerror or exc}); free space (or fix permissions) and rerun the command: it only "
                    "writes the report"
                ) from None
        return RunOutcome(rows, out_dir, skipped, files, reused)
    finally:
        if lock is not None:
            lock.close()  # closing the descriptor releases the flock
        dist.close()


def _run_all(
    session: Session, runs: Sequence[planning.PlannedRun], results_path: Path, echo: Callable[[str], None] | None
) -> tuple[list[dict[str, Any]], int, int]:
    """The loop over runs: skip recorded ones, execute and flush the rest, one at a time."""
    from tqdm.auto import tqdm

    dist = session.dist
    say = (lambda msg: tqdm.write(msg)) if (dist.is_main and echo is not None) else (lambda msg: None)
    if session.dataset.skipped:
        say(f"dataset: skipped {len(session.dataset.skipped)} bad rows: " + "; ".join(session.dataset.skipped[:5]))
    recorded = load_results(results_path, required=ROW_KEYS) if dist.is_main else None
    done = dist.broadcast({r["key"]: r for r in recorded} if recorded is not None else None)
    session.check_runs(runs)
    fingerprint = model_fingerprint(session.cfg.model)
    rows: list[dict[str, Any]] = []
    skipped = reused = 0
    executed: set[str] = set()
    baseline: list[dict[str, Any]] | None = None
    reference: dict[str, Any] | None = None
    bar = tqdm(total=len(runs), desc="runs", unit="run", disable=not session.progress, dynamic_ncols=True)
    calibrator: Calibrator | None = None
    for run in runs:
        run = _with_budget(run, reference)
        calibration = None
        if run.role == "swept":
            if calibrator is None:
                calibrator = _calibrator(session, results_path.parent, fingerprint)
            run, calibration = _calibrate(session, calibrator, run)
        resolved = resolved_run_config(session.cfg, run.spec, session.device, session.dataset, fingerprint)
        row = done.get(run_key(resolved))
        if row is not None and row["key"] in executed:
            reused += 1  # another target calibrated to the same setting (e.g. a budget out of reach)
            say(f"[{run.label}] target {run.target:g} lands on the run of an earlier target; reused")
        elif row is not None:
            skipped += 1
            say(f"[{run.label}] already recorded in {results_path}; skipped")
        else:
            session.warm_up()
            row = _execute(session, run, resolved, baseline)
            if calibration is not None:
                row["calibration"] = {"axis": session.cfg.budget.axis, **asdict(calibration)}
            if dist.is_main:
                try:
                    append_result(results_path, row)
                except OSError as exc:
                    raise OutputError(
                        f"cannot record run {run.label!r} in {str(results_path)!r} ({exc.strerror or exc}); the runs "
                        "recorded before it are intact: free space (or fix permissions) and rerun the command to resume"
                    ) from None
            done[row["key"]] = row  # another target that lands on the same setting reuses this run
            executed.add(row["key"])
            dist.barrier()  # nobody starts the next run before rank 0 has flushed this one
            say(_summary_line(row))
        row = {**row, "label": run.label, "role": run.role, "budget": run.budget, "target": run.target,
               "knob": run.knob.path if run.knob is not None else None}
        if calibration is not None:
            row["calibration"] = {"axis": session.cfg.budget.axis, **asdict(calibration)}
        if run.role == "baseline":
            baseline = row["predictions"]
        if run.role == "reference":
            reference = row
        rows.append(row)
        bar.update(1)
    bar.close()
    _fill_agreement(rows, baseline)
    return rows, skipped, reused


def _calibrator(session: Session, out_dir: Path, fingerprint: str) -> Calibrator:
    cfg = session.cfg
    if session.calibration is None:  # a session opened elsewhere (tests, notebooks): load the split now
        session.calibration = load_calibration(cfg)
    identity = {
        "model_fingerprint": fingerprint, "calibration": to_container(cfg)["calibration"],
        "dataset": session.calibration.name, "n": len(session.calibration.samples),
        "dataset_fingerprint": session.calibration.fingerprint,
        "positions": to_container(cfg)["positions"], "dtype": cfg.dtype, "prompt_suffix": cfg.dataset.prompt_suffix,
        **_budget_scope(cfg),
    }
    # Only rank 0 writes the cache; every rank measures the same numbers.
    path = out_dir / CALIBRATION_FILE if session.dist.is_main else None
    return Calibrator(session, session.calibration.samples, path, identity)


def _calibrate(session: Session, calibrator: Calibrator, run: planning.PlannedRun) -> tuple[planning.PlannedRun, Calibration]:
    """``run`` with its knob set so its mean budget on ``budget.axis`` lands on its target (calibration split)."""
    cfg = session.cfg.budget
    knob = run.knob
    assert knob is not None and run.target is not None
    if knob.integer:
        base = calibrator.measure("none")
        low, high = 1.0, round(base["visual_total_sum"] / len(calibrator.samples))
    elif knob.param in cfg.ranges:
        low, high = cfg.ranges[knob.param]
    else:
        raise ConfigError(
            f"budget knob {knob.path} is a float: give its search range, e.g. budget.ranges.{knob.param}=[0.1,10]"
        )

    def measure(value: int | float) -> float:
        return axis_value(cfg.axis, calibrator.measure(planning.resolve_swept(run, value).spec))

    found = search(measure, low, high, run.target, cfg.tolerance, knob.integer, cfg.max_steps)
    if not knob.integer:
        found = replace(found, value=float(f"{found.value:.4g}"))  # a readable label; re-measured below
        budget = measure(found.value)
        found = replace(found, budget=budget, reachable=abs(budget - run.target) <= cfg.tolerance)
    calibrator.save()
    return planning.resolve_swept(run, found.value), found


def _lock_output_dir(out_dir: Path) -> Any:
    """An exclusive lock on ``out_dir`` for this study: two invocations sharing a results file would
    both run the missing runs and record them twice."""
    import fcntl

    fh = (out_dir / ".lock").open("w")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise TokpruneError(
            f"another 'tokprune run' is writing to {str(out_dir)!r}; wait for it, or use another output_dir"
        ) from None
    return fh


def _check_patchable(session: Session, runs: Sequence[planning.PlannedRun]) -> None:
    """Patch and unpatch once per pipeline before the first run, so a pipeline the model cannot run
    (an LLM layer past the last one, a signal the tower lacks) fails now, not an hour into a sweep."""
    import tokprune

    for run in runs:
        tokprune.patch(
            session.model, run.spec, question_end=session.processor.tokenizer, budget_scope=session.cfg.budget_scope
        ).remove()


def _budget_scope(cfg: AblationConfig) -> dict[str, str]:
    """The budget scope as a run-identity key, only when not the default: the keys of earlier runs stay valid."""
    return {} if cfg.budget_scope == "image" else {"budget_scope": cfg.budget_scope}


def _fill_agreement(rows: list[dict[str, Any]], baseline: list[dict[str, Any]] | None) -> None:
    # Rows recorded before their baseline existed (baseline=false earlier) get agreement from this study's.
    from .metrics import agreement

    for row in rows:
        if row["metrics"].get("agreement") is None and baseline is not None:
            row["metrics"] = {**row["metrics"], "agreement": agreement(row["predictions"], baseline)}
