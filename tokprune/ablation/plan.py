"""From a config to the ordered list of runs: sweeps expanded, specs validated, budgets to match marked.

Order: the unpruned baseline, then the budget reference (when some run is matched to it), then the
configured pipelines in the order written, each grid in row-major order, each pipeline with a budget knob
once per target of ``budget.targets`` (role ``swept``; the knob's value is found by calibration when the
run starts). Duplicates (same canonical pipeline and target) run once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf

from .. import strategies
from ..spec import Term, expand_sweeps, format_terms, parse_spec
from .config import AblationConfig, ConfigError

__all__ = ["Knob", "PlannedRun", "find_knob", "matched_value", "plan_runs", "resolve_swept"]


@dataclass(frozen=True)
class Knob:
    """The parameter a pipeline's budget is set through: ``param`` of term ``term`` (its strategy ``name``)."""

    term: int
    name: str
    param: str
    integer: bool

    @property
    def path(self) -> str:
        return f"{self.name}.{self.param}"


@dataclass
class PlannedRun:
    """One pipeline to evaluate. ``match`` lists ``(term index, param)`` set from the reference's budget."""

    label: str  # the spec as the user wrote it (explicit parameters only): the table's row name
    spec: str  # canonical spec (every parameter); stable, used in the run key
    role: str  # baseline | reference | matched | unmatched | swept
    match: list[tuple[int, str]] = field(default_factory=list)
    terms: list[Term] = field(default_factory=list)
    target: float | None = None  # swept: the target budget (a fraction on budget.axis)
    knob: Knob | None = None  # swept: what the calibration sets

    @property
    def budget(self) -> str:
        """How this run's token budget was set (the table's budget column)."""
        if self.role == "baseline":
            return "all tokens"
        if self.role == "swept" and self.knob is not None:
            value = self.terms[self.knob.term].params.get(self.knob.param)
            return f"target {self.target:g}: {self.knob.path}={'pending' if value is None else value}"
        if self.role == "reference":
            return "reference (adaptive)"
        if self.role == "matched":
            if any(p not in self.terms[i].params for i, p in self.match):
                return "matched (pending reference)"
            return "matched " + ", ".join(f"{self.terms[i].name}.{p}={self.terms[i].params[p]}" for i, p in self.match)
        if any({"keep", "keep_ratio"} & set(t.params) for t in self.terms):
            return "fixed (as written)"
        return "own (not matched)"


def _entry_to_spec(entry: Any, where: str) -> str:
    """A ``strategies`` entry (spec string, ``{name: ...}`` mapping, or a list of those) as spec text."""
    if OmegaConf.is_config(entry):
        entry = OmegaConf.to_container(entry, resolve=True)
    if isinstance(entry, str):
        return entry
    items = [entry] if isinstance(entry, Mapping) else entry
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{where}: expected a spec string, a {{name: ..., <param>: ...}} mapping or a list of them")
    terms = []
    for item in items:
        if isinstance(item, str):
            terms.extend(parse_spec(item))
        elif isinstance(item, Mapping) and "name" in item:
            terms.append(Term(str(item["name"]), {k: v for k, v in item.items() if k != "name"}))
        else:
            raise ConfigError(f"{where}: pipeline entry {item!r} needs a 'name' key, e.g. {{name: fastv, layer: 2}}")
    return format_terms(terms)


def _apply_sweep(text: str, sweep: Mapping[str, Mapping[str, list[Any]]]) -> str:
    if text.strip() == "none" or not sweep:
        return text
    terms = parse_spec(text)
    for term in terms:
        for param, values in sweep.get(term.name, {}).items():
            term.params[param] = list(values)
    return format_terms(terms)


def _canonical(text: str, where: str) -> str:
    try:
        return str(strategies.get(text))
    except KeyError as exc:  # UnknownStrategyError: keep its did-you-mean, say where it came from
        raise type(exc)(f"{where}: {exc}") from None
    except ValueError as exc:
        raise type(exc)(f"{where}: {exc}") from None


INT64_MAX = 2**63 - 1


def _check_terms(text: str, where: str) -> None:
    """What the registry's checks let through but cannot run: ``none`` inside a pipeline, integers past
    what a tensor holds (they would overflow only when the run starts, after the baseline)."""
    if text.strip() == "none":
        return
    terms = parse_spec(text)
    if len(terms) > 1 and any(t.name == "none" for t in terms):
        rest = format_terms([t for t in terms if t.name != "none"])
        raise ConfigError(
            f"{where}: {text!r} combines 'none' (the unpruned model, an empty pipeline) with other steps; "
            f"write {rest!r} for the pipeline, and 'none' alone for the unpruned run"
        )
    for t in terms:
        for key, value in t.params.items():
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT64_MAX:
                raise ConfigError(
                    f"{where}: {t.name}.{key}={value} does not fit a 64-bit integer; a token count is at most the "
                    f"image's tokens (e.g. 576 for LLaVA-1.5): use a smaller {key}"
                    + (" or keep_ratio" if key == "keep" else "")
                )


def _needs_match(terms: list[Term], params: Mapping[str, str]) -> list[tuple[int, str]]:
    # A budget the user set explicitly (keep=64, or keep_ratio=...) is never overridden.
    out = []
    for i, term in enumerate(terms):
        param = params.get(term.name)
        if param is not None and not ({param, "keep", "keep_ratio"} & set(term.params)):
            out.append((i, param))
    return out


def _check_match_params(params: Mapping[str, str]) -> None:
    # Caught now, not after the reference run has spent its minutes.
    for name, param in params.items():
        info = strategies.describe(name) if name in strategies.available() else None
        if info is None:
            _canonical(name, f"match_budget.params.{name}")  # raises with did-you-mean
            continue
        valid = [p.name for p in info.params]
        if param not in valid:
            raise ConfigError(
                f"match_budget.params.{name}={param!r}: {name!r} has no parameter {param!r}; valid: {', '.join(valid)}"
            )


def find_knob(terms: list[Term], knobs: Mapping[str, str]) -> Knob | None:
    """The budget knob ``knobs`` names for this pipeline (key: the strategy names joined by ``+``), or None
    when there is none or the pipeline sets its budget itself (the knob, ``keep`` or ``keep_ratio``)."""
    key = "+".join(t.name for t in terms)
    path = knobs.get(key)
    if path is None:
        return None
    name, _, param = path.rpartition(".")
    index = next((i for i, t in enumerate(terms) if t.name == (name or terms[0].name)), None)
    where = f"budget.knobs[{key!r}]={path!r}"
    if index is None:
        raise ConfigError(f"{where}: the pipeline has no strategy {name!r}; use one of {[t.name for t in terms]}")
    info = {p.name: p for p in strategies.describe(terms[index].name).params}
    if param not in info:
        raise ConfigError(f"{where}: {terms[index].name!r} has no parameter {param!r}; valid: {', '.join(info)}")
    if {param, "keep", "keep_ratio"} & set(terms[index].params):
        return None
    return Knob(index, terms[index].name, param, "int" in info[param].type and "float" not in info[param].type)


def resolve_swept(run: PlannedRun, value: int | float) -> PlannedRun:
    """``run`` with its knob set to ``value`` (found by calibration)."""
    assert run.knob is not None
    terms = [Term(t.name, dict(t.params), t.position) for t in run.terms]
    terms[run.knob.term].params[run.knob.param] = value
    text = format_terms(terms)
    return PlannedRun(text, str(strategies.get(text)), "swept", [], terms, run.target, run.knob)


def plan_runs(cfg: AblationConfig) -> list[PlannedRun]:
    """Every run of ``cfg`` in execution order (see the module docstring)."""
    _check_match_params(cfg.match_budget.params)
    for key in cfg.budget.knobs:
        for name in key.split("+"):
            if name not in strategies.available():
                _canonical(name, f"budget.knobs[{key!r}]")  # raises with did-you-mean
    for name in cfg.sweep:
        if name not in strategies.available():
            _canonical(name, f"sweep.{name}")  # raises with did-you-mean
    texts: list[tuple[str, str]] = []
    for i, entry in enumerate(cfg.strategies):
        where = f"strategies[{i}]"
        text = _entry_to_spec(entry, where)
        try:
            text = _apply_sweep(text, cfg.sweep)
            expanded = ["none"] if text.strip() == "none" else expand_sweeps(text)
        except ValueError as exc:
            raise type(exc)(f"{where}: {exc}") from None
        texts.extend((t, where) for t in expanded)
    for text, where in texts:
        _check_terms(text, where)

    ref_canon = _canonical(cfg.match_budget.reference, "match_budget.reference") if cfg.match_budget.reference else None
    runs: list[PlannedRun] = []
    seen: set[str] = set()

    def add(run: PlannedRun) -> None:
        key = f"{run.spec}@{run.target}"
        if key not in seen:
            seen.add(key)
            runs.append(run)

    if cfg.baseline:
        add(PlannedRun("none", "none", "baseline"))
    rest: list[PlannedRun] = []
    for text, where in texts:
        canon = _canonical(text, where)
        terms = [] if canon == "none" else parse_spec(text)
        match = _needs_match(terms, cfg.match_budget.params) if ref_canon else []
        if canon == "none":
            role = "baseline"
        elif canon == ref_canon:
            role = "reference"
        else:
            role = "matched" if match else "unmatched"
        knob = find_knob(terms, cfg.budget.knobs) if terms and cfg.budget.targets and role != "matched" else None
        if knob is not None and role != "reference":
            for target in cfg.budget.targets:
                rest.append(PlannedRun(format_terms(terms), canon, "swept", [], terms, float(target), knob))
            continue
        rest.append(PlannedRun(format_terms(terms) if terms else "none", canon, role, match, terms))
    if ref_canon and any(r.role == "matched" for r in rest) and ref_canon not in {r.spec for r in rest}:
        rest.insert(0, PlannedRun(cfg.match_budget.reference, ref_canon, "reference", [], parse_spec(cfg.match_budget.reference)))
    for run in sorted(rest, key=lambda r: {"baseline": 0, "reference": 1}.get(r.role, 2)):  # stable sort
        add(run)
    return runs


def matched_value(param: str, mean_kept: float, visual_total: float) -> int | float:
    """A count parameter gets round(mean kept); a ratio parameter (name ending in 'ratio') mean/total."""
    if param.endswith("ratio"):
        return round(mean_kept / visual_total, 4)
    return max(1, round(mean_kept))


def resolve_matched(run: PlannedRun, mean_kept: float, visual_total: float) -> PlannedRun:
    """``run`` with its matched parameters filled in from the reference's measured budget."""
    terms = [Term(t.name, dict(t.params), t.position) for t in run.terms]
    for i, param in run.match:
        terms[i].params[param] = matched_value(param, mean_kept, visual_total)
    text = format_terms(terms)
    return PlannedRun(text, str(strategies.get(text)), "matched", run.match, terms)
