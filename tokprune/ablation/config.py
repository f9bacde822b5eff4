"""The ablation config: omegaconf structured dataclasses, loading, dotlist overrides and validation.

The dataclass defaults *are* the main job (``tokprune run`` with no arguments); ``configs/default.yaml``
spells them out for reading and editing. Every error names the key, the bad value and the valid choices.
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigKeyError,
    GrammarParseError,
    InterpolationResolutionError,
    OmegaConfBaseException,
    ValidationError,
)

from ..errors import TokpruneError

__all__ = [
    "AXES",
    "DEFAULT_STRATEGIES",
    "BudgetConfig",
    "CalibrationConfig",
    "EMBEDDED_MODEL",
    "AblationConfig",
    "ConfigError",
    "DatasetConfig",
    "GalleryConfig",
    "MatchBudgetConfig",
    "PositionsConfig",
    "load_config",
    "to_container",
]

EMBEDDED_MODEL = "tiny-llava-shapes"
REFERENCE_METHOD = "cls_knee+text_interact"
# Each method with its reference's defaults: topk ranks like VTC-CLS (head-mean CLS attention), PruMerge
# and the reference method use PruMerge's single-head surrogate (their code's default).
DEFAULT_STRATEGIES = (
    "none",
    REFERENCE_METHOD,
    # the readings docs/reference-method.md names as switches of stage 1's score (default: cls_attn)
    "cls_knee(score=cls_attn_mean)+text_interact",
    "cls_knee(score=cls_sim)+text_interact",
    "cls_knee",
    "prumerge",
    "prumerge_plus",
    "fastv",
    "fastv(layer=1)",  # K=2 cannot go below 50% equivalent tokens on a 4-layer LLM; K=1 reaches 25%
    "topk(score=cls_attn_mean)",
    "random",
    "downsample",  # VTC-Bench's baseline: the patch grid pooled to the budget
    "dart",
    "divprune",
    # PyramidDrop's default schedule is for 32-layer LLMs; the embedded model has 4 decoder layers
    "pyramiddrop(layer=(1, 2, 3), keep_ratio=(0.5, 0.25, 0.125))",
    "vispruner",
    "cdpruner",
)
AXES = ("equiv_tokens", "flops", "kept_tokens")
# How each built-in pipeline reaches a budget: "param" (of its only strategy) or "strategy.param".
DEFAULT_KNOBS = {
    "topk": "keep",
    "random": "keep",
    "downsample": "keep",
    "fastv": "keep",
    "cls_knee": "min_keep",
    "prumerge": "iqr_factor",
    "prumerge_plus": "iqr_factor",
    REFERENCE_METHOD: "cls_knee.min_keep",
    "dart": "keep",
    "divprune": "keep",
    "vispruner": "keep",
    "cdpruner": "keep",
    # pyramiddrop's budget is a schedule (a tuple): it runs as written, at its own budget
}

DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
POSITION_MODES = ("keep", "compact")
# positions.vision also takes "method": each vision step's reference choice (PruningStrategy.positions(): the
# authors' code renumbers for divprune, cdpruner, vispruner, prumerge, prumerge_plus), keep for the others.
VISION_POSITION_MODES = ("method", *POSITION_MODES)


def vision_positions_arg(value: str) -> str | None:
    """The ``vision_positions`` argument of :func:`tokprune.patch` for a ``positions.vision`` config value."""
    return None if value == "method" else value
ENGINES = ("transformers", "vllm")
BUDGET_SCOPES = ("image", "tile", "frame")  # tokprune.adapters.BUDGET_SCOPES, without importing the adapters
DATASETS = ("shapes", "jsonl", "clips")
SCORERS = ("auto", "shapes", "exact", "vqa", "yesno")
SHAPES_SPLITS = ("test", "val")
#: The shapes benchmark builds its questions' images (96x96 RGB, ~28 KB each) in memory when it loads.
SHAPES_MAX_LIMIT = 100_000
MAX_SEARCH_STEPS = 64
#: Keys holding paths: ``~`` is expanded in them, as in ``model``.
PATH_KEYS = (("output_dir",), ("dataset", "path"), ("dataset", "image_folder"), ("calibration", "path"))


class ConfigError(TokpruneError, ValueError):
    """A config key that does not exist, or a value outside its valid choices."""


@dataclass
class DatasetConfig:
    """What to evaluate on: the embedded shapes benchmark, or a local JSONL file (LLaVA eval format)."""

    name: str = "shapes"  # shapes | jsonl | clips (the embedded video benchmark, or a clips file with path)
    split: str = "test"  # shapes and the embedded clips only
    path: str | None = None  # jsonl: the questions file; clips: a clips file (default: the embedded clips)
    image_folder: str | None = None  # jsonl: images resolve against this (default: the file's folder)
    scorer: str = "auto"  # auto picks shapes / yesno / vqa / exact from the data
    prompt_suffix: str = ""  # appended to every question, e.g. "\nAnswer the question using a single word or phrase."
    skip_bad_rows: bool = False  # count and skip bad rows instead of failing on the first one


@dataclass
class PositionsConfig:
    """Position ids of kept tokens per stage: ``keep`` their original ids, or ``compact`` (renumber).

    The vision stage defaults to ``method``: what each method's reference code does (faithful by default).
    """

    vision: str = "method"
    llm: str = "keep"


@dataclass
class MatchBudgetConfig:
    """Fixed-budget baselines matched to the reference method's measured mean kept visual tokens.

    The ``reference`` run goes first; then, for every other run whose pipeline contains a strategy named in
    ``params`` and does not set that parameter itself, the parameter is set to round(mean kept visual
    tokens of the reference). Strategies not listed (adaptive ones such as prumerge) keep their own budget.
    """

    reference: str | None = None  # e.g. cls_knee+text_interact; the main job sweeps budgets instead
    params: dict[str, str] = field(
        default_factory=lambda: {
            "topk": "keep",
            "random": "keep",
            "downsample": "keep",
            "fastv": "keep",
            "dart": "keep",
            "divprune": "keep",
            "vispruner": "keep",
            "cdpruner": "keep",
        }
    )


@dataclass
class BudgetConfig:
    """The budget sweep: every pipeline with a knob runs once per target budget.

    ``targets`` are fractions of the visual tokens on the ``equiv_tokens`` (visual tokens averaged over
    the LLM layers) and ``kept_tokens`` (visual tokens of the last layer) axes, or of the unpruned
    prefill FLOPs on ``flops``. A pipeline reaches a target through its knob (``knobs``: pipeline ->
    ``param`` or ``strategy.param``), set by a search on the calibration split: the value whose mean
    budget is closest to the target, within ``tolerance`` when reachable. Pipelines that set their knob
    (or ``keep``/``keep_ratio``) themselves, and pipelines without a knob, run as written.
    """

    axis: str = "equiv_tokens"
    targets: list[float] = field(default_factory=lambda: [0.07, 0.14, 0.28, 0.5])
    tolerance: float = 0.01  # |obtained - target| on the calibration split, in the targets' unit
    knobs: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_KNOBS))
    # Search range of float knobs (searched on a log scale); integer knobs search [1, visual tokens].
    ranges: dict[str, list[float]] = field(default_factory=lambda: {"iqr_factor": [0.02, 50.0]})
    max_steps: int = 6  # measurements per target after the range's two ends


@dataclass
class CalibrationConfig:
    """The split knobs are calibrated on (only kept-token counts and FLOPs are read: no answers)."""

    split: str = "val"  # shapes: val | test (the report split is dataset.split)
    path: str | None = None  # jsonl: a questions file of the calibration split
    limit: int = 32  # first N questions


@dataclass
class GalleryConfig:
    """The study's ``kept.png``: ``images`` test images (round-robin over question types) by every method,
    each at its run nearest the budget ``target`` (a fraction, as ``budget.targets``); ``images=0``: none."""

    target: float = 0.28
    images: int = 4


@dataclass
class AblationConfig:
    """One ablation study: a model, a dataset and a list (or grid) of pruning pipelines."""

    model: str = EMBEDDED_MODEL  # an embedded model name or a local HF directory (llava-hf layout)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    strategies: list[Any] = field(default_factory=lambda: list(DEFAULT_STRATEGIES))
    # Explicit grid: {strategy: {param: [values]}} applied to every listed pipeline containing the strategy.
    # The default runs the random control with three seeds (the table shows their mean and range).
    sweep: dict[str, dict[str, list[Any]]] = field(default_factory=lambda: {"random": {"seed": [0, 1, 2]}})
    baseline: bool = True  # always run the unpruned model first (the table's first row, agreement's reference)
    match_budget: MatchBudgetConfig = field(default_factory=MatchBudgetConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    positions: PositionsConfig = field(default_factory=PositionsConfig)
    # What a vision budget counts on tiled images (LLaVA-NeXT): image (base + tiles pooled) | tile (each
    # tower pass its own budget, as VisionZip's and VisionPruner's code); on videos (Qwen2.5-VL, Qwen3-VL):
    # image (one budget per video) | frame (each frame its own); families without tiles or videos take image.
    budget_scope: str = "image"
    batch_size: int = 64  # identical answers to smaller batches (batch == solo); ~30% less CPU time here
    max_new_tokens: int = 3
    dtype: str = "float32"
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun: cuda -> cuda:LOCAL_RANK)
    attn_implementation: str = "sdpa"
    engine: str = "transformers"  # transformers | vllm (the tokprune vLLM plugin; docs/serving.md)
    seed: int = 0
    limit: int | None = 500  # first N questions of the dataset; null for all (shapes: unlimited, set N)
    output_dir: str = "runs/default"
    plot: bool = True
    gallery: GalleryConfig = field(default_factory=GalleryConfig)  # kept.png beside curves.png (with plot)


def _choices(key: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"invalid value {value!r} for config key {key!r}.{_close(value, valid)} Valid: {', '.join(valid)}")


def _close(value: Any, valid: Any) -> str:
    close = difflib.get_close_matches(str(value), [str(v) for v in valid], n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def validate(cfg: AblationConfig) -> None:
    """Range and choice checks omegaconf's types cannot express."""
    _choices("dtype", cfg.dtype, DTYPES)
    _choices("attn_implementation", cfg.attn_implementation, ATTN_IMPLEMENTATIONS)
    _choices("positions.vision", cfg.positions.vision, VISION_POSITION_MODES)
    _choices("positions.llm", cfg.positions.llm, POSITION_MODES)
    _choices("budget_scope", cfg.budget_scope, BUDGET_SCOPES)
    _choices("engine", cfg.engine, ENGINES)
    _choices("dataset.name", cfg.dataset.name, DATASETS)
    _choices("dataset.scorer", cfg.dataset.scorer, SCORERS)
    if not (cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:")):
        raise ConfigError(f"invalid value {cfg.device!r} for config key 'device'. Valid: auto, cpu, cuda, cuda:N")
    for key in ("batch_size", "max_new_tokens"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"config key {key!r} must be >= 1, got {getattr(cfg, key)}")
    if cfg.limit is not None and cfg.limit < 1:
        raise ConfigError(f"config key 'limit' must be >= 1 or null (all questions), got {cfg.limit}")
    if not 0 <= cfg.seed < 2**63:
        raise ConfigError(f"config key 'seed' must be an integer in [0, 2**63), got {cfg.seed}")
    for key in ("model", "output_dir", "dtype", "device", "attn_implementation", "budget_scope"):
        if not str(getattr(cfg, key)).strip():
            raise ConfigError(f"config key {key!r} is an empty string ''; give it a value (see configs/default.yaml)")
    if cfg.dataset.name in ("shapes", "clips"):
        _choices("dataset.split", cfg.dataset.split, SHAPES_SPLITS)
        if cfg.dataset.scorer not in ("auto", "shapes"):
            raise ConfigError(
                f"dataset.scorer={cfg.dataset.scorer!r} does not apply to the {cfg.dataset.name} benchmark; use auto"
            )
    if cfg.dataset.name == "jsonl":
        if not cfg.dataset.path:
            raise ConfigError("dataset.name=jsonl needs dataset.path=<questions.jsonl>")
        if cfg.dataset.scorer == "shapes":
            raise ConfigError("dataset.scorer=shapes applies only to dataset.name=shapes; use auto, exact, vqa or yesno")
    _choices("budget.axis", cfg.budget.axis, AXES)
    for t in cfg.budget.targets:
        if not 0 < t <= 1:
            raise ConfigError(f"budget.targets must be fractions in (0, 1], got {t} (e.g. budget.targets=[0.07,0.14,0.28,0.5])")
    # NaN fails every comparison: each check is written so that NaN lands on the error.
    if not 0 < cfg.budget.tolerance < 1:
        raise ConfigError(
            f"budget.tolerance must be a finite number in (0, 1) (the targets' unit), got {cfg.budget.tolerance}"
        )
    if not 0 <= cfg.budget.max_steps <= MAX_SEARCH_STEPS:
        raise ConfigError(
            f"budget.max_steps must be an integer in [0, {MAX_SEARCH_STEPS}] (measurements per target), "
            f"got {cfg.budget.max_steps}"
        )
    for name, bounds in cfg.budget.ranges.items():
        if len(bounds) != 2 or not 0 < bounds[0] < bounds[1] < math.inf:
            raise ConfigError(
                f"budget.ranges.{name} must be [low, high], finite, with 0 < low < high, got {list(bounds)}"
            )
    if not 0 < cfg.gallery.target <= 1:
        raise ConfigError(f"gallery.target must be a fraction in (0, 1], got {cfg.gallery.target} (e.g. gallery.target=0.28)")
    if cfg.gallery.images < 0:
        raise ConfigError(f"config key 'gallery.images' must be >= 0 (0: no gallery), got {cfg.gallery.images}")
    if cfg.calibration.limit < 1:
        raise ConfigError(f"config key 'calibration.limit' must be >= 1, got {cfg.calibration.limit}")
    if cfg.dataset.name == "clips" and cfg.dataset.path is None:
        _choices("calibration.split", cfg.calibration.split, SHAPES_SPLITS)
        if cfg.limit is None:
            raise ConfigError("limit=null: the clip benchmark has no end (its generator is unlimited); set limit=N")
    if cfg.dataset.name == "shapes":
        _choices("calibration.split", cfg.calibration.split, SHAPES_SPLITS)
        if cfg.limit is None:
            raise ConfigError("limit=null: the shapes benchmark has no end (its generator is unlimited); set limit=N")
        for key, n in (("limit", cfg.limit), ("calibration.limit", cfg.calibration.limit)):
            if n > SHAPES_MAX_LIMIT:
                raise ConfigError(
                    f"{key}={n} on the shapes benchmark would build {n} images in memory (about "
                    f"{n * 28 / 1e6:,.1f} GB) before the first run; use {key} <= {SHAPES_MAX_LIMIT} (e.g. {key}=500)"
                )
        if cfg.dataset.path is not None:
            raise ConfigError(
                f"dataset.path={cfg.dataset.path!r} is set but dataset.name='shapes' (the embedded benchmark) would "
                "ignore it; add dataset.name=jsonl to evaluate that file"
            )
    if not cfg.strategies and not cfg.baseline:
        raise ConfigError("nothing to run: 'strategies' is empty and baseline=false")


def _schema_at(dotted: str) -> Any:
    """The dataclass type owning ``dotted``'s last component (for listing valid keys)."""
    obj: Any = AblationConfig
    for part in dotted.split(".")[:-1]:
        sub = {f.name: f for f in fields(obj)}.get(part)
        if sub is None or not isinstance(sub.default_factory, type) or not is_dataclass(sub.default_factory):  # type: ignore[arg-type]
            return None
        obj = sub.default_factory
    return obj


def _reraise(exc: OmegaConfBaseException, origin: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None) or "?"
    if isinstance(exc, ConfigKeyError):
        owner = _schema_at(str(key))
        valid = [f.name for f in fields(owner)] if owner is not None else []
        leaf = str(key).split(".")[-1]
        prefix = str(key).rsplit(".", 1)[0] + "." if "." in str(key) else ""
        hint = _close(leaf, valid).replace("'", f"'{prefix}", 1) if prefix else _close(leaf, valid)
        listing = f" Valid keys{' under ' + prefix[:-1] if prefix else ''}: {', '.join(valid)}" if valid else ""
        return ConfigError(f"unknown config key {key!r} ({origin}).{hint}{listing}")
    if isinstance(exc, ValidationError):
        msg = str(exc).splitlines()[0]
        return ConfigError(f"bad value for config key {key!r} ({origin}): {msg}")
    if isinstance(exc, (InterpolationResolutionError, GrammarParseError)):
        msg = str(exc).splitlines()[0]
        return ConfigError(
            f"cannot resolve the interpolation in config key {key!r} ({origin}): {msg}; refer to an existing key (${{model}}) "
            "or to an environment variable that is set (${oc.env:NAME,default})"
        )
    return ConfigError(f"config error at {key!r} ({origin}): {str(exc).splitlines()[0]}")


def _split_top_level(text: str) -> list[str]:
    """Split ``a(x=1, y=2), b`` at commas outside brackets and quotes."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip().strip("\"'") for p in parts if p.strip()]


def _parse_overrides(overrides: list[str]) -> DictConfig:
    """Dotlist overrides; ``strategies=`` gets its own parser because specs contain commas and brackets."""
    plain, strategies = [], None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. batch_size=8, strategies=[topk,fastv])")
        key, value = item.split("=", 1)
        if key.strip() == "strategies":
            value = value.strip()
            if value.startswith("[") and value.endswith("]"):
                strategies = _split_top_level(value[1:-1])
            else:
                strategies = [value.strip("\"'")] if value else []
        else:
            plain.append(item)
    try:
        node = OmegaConf.from_dotlist(plain)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"malformed override in {plain}: {str(exc).splitlines()[0]}") from None
    if strategies is not None:
        node.strategies = strategies
    return node


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> AblationConfig:
    """Defaults, then the YAML file at ``path`` (if any), then dotlist ``overrides``; validated."""
    schema = OmegaConf.structured(AblationConfig)
    layers: list[tuple[str, Any]] = []
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {str(p)!r}")
        try:
            layers.append((str(p), OmegaConf.load(p)))
        except Exception as exc:  # yaml errors carry the line and column
            raise ConfigError(f"cannot parse config file {str(p)!r}: {exc}") from None
        # A single spec string is a one-element list (saves brackets in files).
        if isinstance(layers[-1][1], DictConfig) and isinstance(layers[-1][1].get("strategies"), str):
            layers[-1][1].strategies = [layers[-1][1].strategies]
    if overrides:
        layers.append(("command line", _parse_overrides(list(overrides))))
    merged = schema
    for origin, layer in layers:
        if not isinstance(layer, DictConfig):
            raise ConfigError(
                f"{origin}: a config must be a mapping of keys (model: ..., strategies: [...]), "
                f"got a {type(layer).__name__.replace('Config', '').lower()}; see configs/default.yaml"
            )
        try:
            merged = OmegaConf.merge(merged, layer)
            if "sweep" in layer:  # a grid given replaces the default one (merging could not remove entries)
                merged.sweep = layer.sweep
        except OmegaConfBaseException as exc:
            raise _reraise(exc, origin) from None
    try:
        cfg: AblationConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:  # interpolations resolve here: ${missing}, ${oc.env:UNSET}
        raise _reraise(exc, " or ".join(origin for origin, _ in layers) or "defaults") from None
    _expand_user(cfg)
    validate(cfg)
    return cfg


def _expand_user(cfg: AblationConfig) -> None:
    """``~`` in the path keys means the home folder, as on the shell (``model`` expands it when it loads)."""
    for path in PATH_KEYS:
        owner = cfg
        for part in path[:-1]:
            owner = getattr(owner, part)
        value = getattr(owner, path[-1])
        if isinstance(value, str) and value.startswith("~"):
            setattr(owner, path[-1], os.path.expanduser(value))


def to_container(cfg: AblationConfig) -> dict[str, Any]:
    """Plain-dict form of a config (what results files store)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def to_yaml(cfg: AblationConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
