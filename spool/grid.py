"""``spool ablate`` grid files: parse, validate, expand into cells. No training here.

A grid is a flat set of overrides of ``TrainConfig`` (spool.train) applied with
``dataclasses.replace``: ``base`` for every run, ``grid`` axes whose cartesian product
gives the cells, ``configs`` for extra cells, ``exclude`` to drop cells, ``seeds`` and
``baselines``. ``head`` picks the head per cell; ``store`` may be a grid axis (several
feature stores of the same videos, e.g. one per backbone). Keys are train-head's option
names (``--batch-size`` -> ``batch-size`` or ``batch_size``) or TrainConfig field names;
``KEYS`` is the one table that maps them.
The ``launcher`` section says where the runs execute (``LauncherConfig``: this machine, or
one cluster job per run through submitit; ``LAUNCHER_KEYS`` maps its keys).
docs/ablate.md is the schema reference.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from spool.train import TrainConfig

BASELINES = ("mean-linear", "attentive-probe", "full", "factorized")
HEAD_NAMES = ("spool", "full", "factorized", "mean-linear", "attentive-probe")
# TrainConfig fields a head does not read: left out of its cells' names, hashes and result
# columns, so that a grid crossing head with range trains the full head once, not per range.
SPOOL_ONLY = ("lookahead", "lookback", "local_frame_range", "backend", "spatial_range")
UNUSED = {"full": SPOOL_ONLY, "factorized": SPOOL_ONLY}
CACHE_MODES = ("auto", "none", "memory", "gpu")


class GridError(ValueError):
    """A grid file that cannot run as written; the message names the key path."""


@dataclass(frozen=True)
class Option:
    field: str  # TrainConfig field
    kind: type  # int | float | bool | str
    optional: bool = False  # None (YAML null) allowed
    choices: tuple = ()
    minimum: float | None = None
    exclusive_min: bool = False  # value must be > minimum rather than >=
    invert: bool = False  # no-context: true -> context_frames = False
    axis: bool = True  # may be a grid axis / differ between cells
    words: tuple = ()  # strings allowed besides numbers ("all" for range)
    axis_only: bool = False  # only a grid axis (or an exclusion): not in base or configs


# grid key (train-head's option name without "--") -> TrainConfig field and allowed values
KEYS: dict[str, Option] = {
    "head": Option("head", str, choices=HEAD_NAMES),
    "store": Option("store", str, axis_only=True),
    "heads": Option("num_heads", int, minimum=1),
    "lookahead": Option("lookahead", int, optional=True, minimum=0),
    "lookback": Option("lookback", int, optional=True, minimum=0),
    "range": Option("local_frame_range", int, minimum=0, words=("all",)),
    "depth": Option("depth", int, minimum=1),
    "dim": Option("dim", int, optional=True, minimum=1),
    "context": Option("context_frames", bool),
    "no-context": Option("context_frames", bool, invert=True),
    "token-pool": Option("token_pool", int, minimum=1),
    "spatial-embedding": Option("spatial_embedding", bool),
    "correlation": Option("correlation_range", int, optional=True, minimum=0),  # null: off
    "correlation-token-norm": Option("correlation_token_norm", bool),
    "correlation-moments": Option("correlation_moments", bool),
    "spatial-range": Option("spatial_range", int, optional=True, minimum=0),  # null: every position
    "norm": Option("norm", str, choices=("batchnorm", "layernorm", "none")),
    "temporal-embedding": Option("temporal_embedding", bool),
    "epochs": Option("epochs", int, minimum=1),
    "batch-size": Option("batch_size", int, minimum=1),
    "lr": Option("lr", float, minimum=0.0, exclusive_min=True),
    "weight-decay": Option("weight_decay", float, minimum=0.0),
    "warmup": Option("warmup", float, minimum=0.0),
    "label-smoothing": Option("label_smoothing", float, minimum=0.0),
    "dropout": Option("dropout", float, minimum=0.0),
    "grad-clip": Option("grad_clip", float, minimum=0.0),
    "backend": Option("backend", str, choices=("auto", "flex", "blocked", "dense")),
    # every run of a grid trains on one split (drawn once), so it cannot vary between cells
    "val-fraction": Option("val_fraction", float, minimum=0.0, exclusive_min=True, axis=False),
    "val-from-train": Option("val_from_train", float, minimum=0.0, axis=False),
}
# TrainConfig field name -> grid key ("context_frames" -> "context", not "no-context")
FIELD_KEYS = {opt.field: key for key, opt in KEYS.items() if not opt.invert}
TOP_KEYS = (
    "store", "out", "base", "grid", "configs", "exclude", "seeds", "baselines",
    "split-seed", "cache", "device", "workers", "launcher",
)  # fmt: skip
# TrainConfig fields that say where or how a run executes, not what it computes (head and
# store are part of what a run computes: cell_hash adds the head and the store's fingerprint)
RUN_FIELDS = ("store", "out", "seed", "resume", "overwrite", "cache", "workers", "device", "head")

LAUNCHERS = ("local", "submitit")
CLUSTERS = ("slurm", "local")  # submitit's executors: Slurm, or processes on this machine (trying, tests)


@dataclass(frozen=True)
class LauncherConfig:
    """Where the runs of a grid execute. ``local``: in this process or ``--jobs`` worker
    processes. ``submitit``: one cluster job per run (spool.launcher), with these resources
    per job; None leaves a resource to the partition's default."""

    name: str = "local"  # "local" | "submitit"
    cluster: str = "slurm"  # submitit's executor: "slurm" | "local"
    partition: str | None = None
    gpus_per_job: int = 1
    cpus_per_job: int | None = None  # also the job's torch threads
    time_min: int = 60  # time limit of each job, minutes
    mem_gb: float | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    array_parallelism: int | None = None  # at most this many jobs of the array run at once (sbatch --array=...%N)
    setup: tuple[str, ...] = ()  # shell lines run before each job (module load ..., source .venv/bin/activate)
    slurm_options: dict[str, Any] = field(default_factory=dict)  # more sbatch options: {"mail-type": "END"}


# launcher-section key -> LauncherConfig field and allowed values (``setup`` and
# ``slurm-options`` are lists/mappings, checked by _parse_launcher)
LAUNCHER_KEYS: dict[str, Option] = {
    "name": Option("name", str, choices=LAUNCHERS),
    "cluster": Option("cluster", str, choices=CLUSTERS),
    "partition": Option("partition", str, optional=True),
    "gpus-per-job": Option("gpus_per_job", int, minimum=0),
    "cpus-per-job": Option("cpus_per_job", int, optional=True, minimum=1),
    "time": Option("time_min", int, minimum=1),
    "mem-gb": Option("mem_gb", float, optional=True, minimum=0.0, exclusive_min=True),
    "account": Option("account", str, optional=True),
    "qos": Option("qos", str, optional=True),
    "constraint": Option("constraint", str, optional=True),
    "array-parallelism": Option("array_parallelism", int, optional=True, minimum=1),
    "setup": Option("setup", list),
    "slurm-options": Option("slurm_options", dict),
}
# the command-line option that sets each launcher key
LAUNCHER_OPTIONS = {k: f"--{k}" for k in LAUNCHER_KEYS} | {"name": "--launcher", "slurm-options": "--slurm-option"}
# sbatch options that LauncherConfig or submitit set: not allowed in slurm-options
SBATCH_RESERVED = {
    "partition": "partition", "time": "time", "mem": "mem-gb", "gpus-per-node": "gpus-per-job",
    "cpus-per-task": "cpus-per-job", "account": "account", "qos": "qos", "constraint": "constraint",
    "job-name": None, "array": "array-parallelism", "output": None, "error": None, "open-mode": None,
    "signal": None, "nodes": None, "ntasks-per-node": None,
}  # fmt: skip


@dataclass(frozen=True)
class GridConfig:
    """A validated grid. ``base``, ``axes`` values, ``configs`` and ``exclude`` hold
    TrainConfig field names (``num_heads``, not ``heads``). With a store axis, ``store`` is
    its first value."""

    store: str
    out: str
    base: dict[str, Any] = field(default_factory=dict)
    axes: tuple[tuple[str, tuple], ...] = ()  # ((field, values), ...) in file order
    configs: tuple[dict[str, Any], ...] = ()
    exclude: tuple[dict[str, tuple], ...] = ()  # field -> values; a cell matching all keys is dropped
    seeds: tuple[int, ...] = (0,)
    baselines: tuple[str, ...] = ()
    split_seed: int = 0  # seed of the drawn val split shared by every run
    cache: str = "auto"
    device: str = "auto"
    workers: int = 2
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    source: str | None = None  # the grid file

    @property
    def stores(self) -> tuple[str, ...]:
        """The stores of the grid: the values of its store axis, or its one store."""
        return dict(self.axes).get("store", (self.store,))

    def to_json(self) -> dict:
        d = asdict(self)
        d["axes"] = {f: list(v) for f, v in self.axes}
        d["exclude"] = [{k: list(v) for k, v in e.items()} for e in self.exclude]
        return d


@dataclass(frozen=True)
class Cell:
    """One configuration of the grid; it runs once per seed."""

    id: str  # readable name + hash of the resolved config, the run folder's prefix
    kind: str  # "grid" | "config" | "baseline"
    head: str
    overrides: dict[str, Any]  # TrainConfig fields this cell sets on top of base
    origin: str  # where the cell comes from, for error messages ("grid cell lookahead=0, range=1")


# --- values -----------------------------------------------------------------------------


def key_name(key: str) -> str:
    """The grid key of a TrainConfig field, for columns and messages."""
    return FIELD_KEYS.get(key, key)


def _lookup(key: Any, path: str) -> tuple[str, Option]:
    if isinstance(key, str):
        k = key.replace("_", "-")
        if k in KEYS:
            return k, KEYS[k]
        if key in FIELD_KEYS:
            return FIELD_KEYS[key], KEYS[FIELD_KEYS[key]]
    names = sorted(KEYS)
    close = difflib.get_close_matches(str(key).replace("_", "-"), names + sorted(FIELD_KEYS), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise GridError(f"{path}: unknown key {key!r}{hint}; allowed: {', '.join(names)} (or the TrainConfig field names)")


def _describe(opt: Option) -> str:
    if opt.choices:
        s = " | ".join(map(str, opt.choices))
    elif opt.axis_only:
        s = "a path"
    elif opt.kind is str:
        s = "a string"
    elif opt.kind is bool:
        s = "true | false"
    else:
        s = "an integer" if opt.kind is int else "a number"
        if opt.minimum is not None:
            s += f" {'>' if opt.exclusive_min else '>='} {opt.minimum:g}"
    return s + "".join(f" | {w}" for w in opt.words) + (" | null" if opt.optional else "")


def _value(opt: Option, value: Any, path: str) -> Any:
    """The TrainConfig value of one grid value, or GridError naming the path and what is allowed."""
    bad = GridError(f"{path}: {value!r} is not allowed; expected {_describe(opt)}")
    if value is None:
        if opt.optional:
            return None
        raise bad
    if opt.kind is bool:
        if not isinstance(value, bool):
            raise bad
        return (not value) if opt.invert else value
    if isinstance(value, str) and value in opt.words:
        return value
    if opt.kind is str:
        if not isinstance(value, str) or not value or (opt.choices and value not in opt.choices):
            raise bad
        return value
    if isinstance(value, bool):
        raise bad
    if opt.kind is float and isinstance(value, str):
        try:  # PyYAML reads 1e-3 (no dot) as a string
            value = float(value)
        except ValueError:
            raise bad from None
    if opt.kind is int and not isinstance(value, int):
        raise bad
    if opt.kind is float and not isinstance(value, (int, float)):
        raise bad
    value = opt.kind(value)
    if opt.minimum is not None and (value <= opt.minimum if opt.exclusive_min else value < opt.minimum):
        raise bad
    return value


def _mapping(data: Any, path: str) -> dict:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise GridError(f"{path}: expected a mapping of option: value, got {type(data).__name__} {data!r}")
    return data


def _overrides(data: Any, path: str, *, axis: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in _mapping(data, path).items():
        name, opt = _lookup(key, path)
        if opt.axis_only:
            raise GridError(f"{path}.{key}: {name} is set at the top level, or as a grid axis "
                            f"(grid: {{{name}: [a.zarr, b.zarr]}}) to compare stores; not in {path}")  # fmt: skip
        if axis and not opt.axis:
            raise GridError(f"{path}.{key}: {name} cannot differ between runs of one grid (they share one split); set it in base")
        if opt.field in out:
            raise GridError(f"{path}.{key}: {opt.field} is set twice in {path}")
        if isinstance(value, (list, dict)):
            raise GridError(f"{path}.{key}: expected a single value ({_describe(opt)}), got {value!r}")
        out[opt.field] = _value(opt, value, f"{path}.{key}")
    return out


def _list(data: Any, path: str, *, allow_scalar: bool = False) -> list:
    if isinstance(data, list):
        return data
    if allow_scalar and data is not None and not isinstance(data, dict):
        return [data]
    raise GridError(f"{path}: expected a list, got {data!r}")


# --- parsing ----------------------------------------------------------------------------


def parse_grid(data: Any, *, source: str | None = None, **overrides) -> GridConfig:
    """A GridConfig from the parsed YAML of a grid file; every key, type and value is checked
    here (combinations that need the store's shapes are checked by spool.ablate.plan_ablation).
    ``overrides``: see ``load_grid``."""
    where = f"{source}: " if source else ""
    try:
        return _parse(_mapping(data, "grid file"), source, **overrides)
    except GridError as err:
        raise GridError(f"{where}{err}") from None


def _parse(
    data: dict, source, store_override=None, out_override=None, cache_override=None, device_override=None,
    launcher_override=None, base_override=None, seeds_override=None,
) -> GridConfig:  # fmt: skip
    for key in data:
        if key not in TOP_KEYS and str(key).replace("_", "-") not in TOP_KEYS:
            close = difflib.get_close_matches(str(key), TOP_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            options = f" ({key!r} is a train-head option: put it under base or grid)" if _is_option(key) else ""
            raise GridError(f"unknown top-level key {key!r}{hint}{options}; allowed: {', '.join(TOP_KEYS)}")
    data = {str(k).replace("_", "-"): v for k, v in data.items()}
    # the command line's --cache / --device win over the file's (what is computed stays the same)
    data.update({k: v for k, v in (("cache", cache_override), ("device", device_override)) if v is not None})

    def path_value(key):
        v = data.get(key)
        if v is not None and not isinstance(v, str):
            raise GridError(f"{key}: expected a path, got {v!r}")
        return v

    store = str(store_override) if store_override is not None else path_value("store")
    out = str(out_override) if out_override is not None else path_value("out")
    store_axis = next((k for k in _mapping(data.get("grid"), "grid") if str(k) == "store"), None)
    if store_axis is not None and store:
        given = "--store" if store_override is not None else "the top-level store"
        raise GridError(f"grid.store: the grid's stores are an axis, so {given} has no place; "
                        "give the stores in grid.store only (or drop the axis)")  # fmt: skip
    if not store and store_axis is None:
        raise GridError("store: missing; give the feature store in the grid file or on the command line")
    if not out:
        raise GridError("out: missing; give the output folder in the grid file or on the command line")

    base = _overrides(data.get("base"), "base", axis=False)
    set_by_cli = _overrides(base_override, "--set", axis=False)  # the command line's --set KEY=VALUE
    base.update(set_by_cli)  # on top of the file's base
    axes: list[tuple[str, tuple]] = []
    for key, values in _mapping(data.get("grid"), "grid").items():
        name, opt = _lookup(key, "grid")
        path = f"grid.{key}"
        if not opt.axis:
            raise GridError(f"{path}: {name} cannot be a grid axis (every run of a grid shares one split); set it in base")
        if any(f == opt.field for f, _ in axes):
            raise GridError(f"{path}: {opt.field} is already an axis")
        vals = _list(values, path)
        if not vals:
            raise GridError(f"{path}: an axis needs at least one value")
        parsed = tuple(_value(opt, v, f"{path}[{i}]") for i, v in enumerate(vals))
        if len(set(parsed)) != len(parsed):
            raise GridError(f"{path}: repeated values {vals}")
        if opt.field in base:
            where = "by --set" if opt.field in set_by_cli else "in base"
            raise GridError(f"{path}: {name} is also set {where}; keep it in one place")
        axes.append((opt.field, parsed))
    if store_axis is not None:
        store = dict(axes)["store"][0]

    configs = tuple(
        _overrides(c, f"configs[{i}]", axis=True) for i, c in enumerate(_list(data.get("configs") or [], "configs"))
    )
    axis_fields = {f for f, _ in axes}
    exclude = []
    for i, e in enumerate(_list(data.get("exclude") or [], "exclude")):
        path = f"exclude[{i}]"
        rule = {}
        for key, values in _mapping(e, path).items():
            name, opt = _lookup(key, path)
            if opt.field not in axis_fields:
                raise GridError(f"{path}.{key}: {name} is not a grid axis; exclusions match axis values ({', '.join(key_name(f) for f in axis_fields)})")
            vals = values if isinstance(values, list) else [values]
            rule[opt.field] = tuple(_value(opt, v, f"{path}.{key}") for v in vals)
        if not rule:
            raise GridError(f"{path}: an empty exclusion would drop every cell")
        exclude.append(rule)

    if seeds_override is not None:
        data["seeds"] = list(seeds_override)  # the command line's --seeds, checked as the file's
    seeds = _list(data.get("seeds", [0]), "seeds", allow_scalar=True)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise GridError(f"seeds: expected a non-empty list of integers >= 0, got {data.get('seeds')!r}")
    if len(set(seeds)) != len(seeds):
        raise GridError(f"seeds: repeated seeds {seeds}")
    baselines = _list(data.get("baselines") or [], "baselines", allow_scalar=True)
    for i, b in enumerate(baselines):
        if b not in BASELINES:
            raise GridError(f"baselines[{i}]: unknown baseline {b!r}; allowed: {', '.join(BASELINES)}")
    if len(set(baselines)) != len(baselines):
        raise GridError(f"baselines: repeated {baselines}")

    split_seed = data.get("split-seed", 0)
    if isinstance(split_seed, bool) or not isinstance(split_seed, int) or split_seed < 0:
        raise GridError(f"split-seed: expected an integer >= 0, got {split_seed!r}")
    cache = data.get("cache", "auto")
    if cache not in CACHE_MODES:
        raise GridError(f"cache: {cache!r} is not allowed; expected {' | '.join(CACHE_MODES)}")
    device = data.get("device", "auto")
    if not isinstance(device, str):
        raise GridError(f"device: expected auto, cpu, cuda, cuda:1 ..., got {device!r}")
    workers = data.get("workers", 2)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise GridError(f"workers: expected an integer >= 0, got {workers!r}")
    if not axes and not configs and not baselines:
        raise GridError("nothing to run: give grid axes, configs or baselines")
    launcher = _parse_launcher(data.get("launcher"), launcher_override or {})
    if launcher.name == "submitit" and launcher.gpus_per_job == 0 and (device.startswith("cuda") or cache == "gpu"):
        raise GridError(f"launcher.gpus-per-job: 0 GPUs per job, but device is {device!r} and cache {cache!r}; "
                        "give each job a GPU or use device: cpu")  # fmt: skip

    return GridConfig(
        store=store, out=out, base=base, axes=tuple(axes), configs=configs, exclude=tuple(exclude),
        seeds=tuple(seeds), baselines=tuple(baselines), split_seed=split_seed, cache=cache, device=device,
        workers=workers, launcher=launcher, source=source,
    )  # fmt: skip


def _parse_launcher(data: Any, overrides: dict[str, Any]) -> LauncherConfig:
    """The launcher section (a mapping, or just the launcher's name), then the command line's
    ``overrides`` (launcher keys -> values; they win, slurm-options merge key by key)."""
    if isinstance(data, str):
        data = {"name": data}
    values: dict[str, Any] = {}
    for source, mapping in (("file", _mapping(data, "launcher")), ("command line", overrides)):
        for key, value in mapping.items():
            k = str(key).replace("_", "-")
            if k not in LAUNCHER_KEYS:
                close = difflib.get_close_matches(k, sorted(LAUNCHER_KEYS), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise GridError(f"launcher: unknown key {key!r}{hint}; allowed: {', '.join(LAUNCHER_KEYS)}")
            path = f"launcher.{key}" if source == "file" else LAUNCHER_OPTIONS[k]
            opt = LAUNCHER_KEYS[k]
            if k == "setup":
                lines = _list(value, path, allow_scalar=True)
                if not all(isinstance(line, str) and line.strip() for line in lines):
                    raise GridError(f"{path}: expected shell command lines (strings), got {value!r}")
                values["setup"] = tuple(lines)
            elif k == "slurm-options":
                values["slurm_options"] = {**values.get("slurm_options", {}), **_slurm_options(value, path)}
            else:
                values[opt.field] = _value(opt, value, path)
    launcher = LauncherConfig(**values)
    if launcher.name == "local":
        given = [LAUNCHER_OPTIONS[k.replace("_", "-")] for k in overrides if k.replace("_", "-") not in ("name",)]
        if given:  # on the command line they can only mean a cluster run
            raise GridError(f"{', '.join(given)}: options of the submitit launcher; add --launcher submitit "
                            "(or launcher: submitit in the grid file)")  # fmt: skip
    return launcher


def _slurm_options(value: Any, path: str) -> dict[str, Any]:
    out = {}
    for key, v in _mapping(value, path).items():
        where = f"{path} {key}" if path.startswith("--") else f"{path}.{key}"
        k = str(key).strip().lstrip("-").replace("_", "-")
        if not k or any(c.isspace() for c in k):
            raise GridError(f"{path}: {key!r} is not an sbatch option name")
        if k in SBATCH_RESERVED:
            own = SBATCH_RESERVED[k]
            why = f"set it with launcher.{own} / {LAUNCHER_OPTIONS[own]}" if own else "submitit sets it"
            raise GridError(f"{where}: --{k} is not a free sbatch option here; {why}")
        if v is None or isinstance(v, (list, dict)) or v is False:
            raise GridError(f"{where}: expected a value (string or number) or true for a flag, got {v!r}")
        out[k] = v
    return out


def _is_option(key: Any) -> bool:
    try:
        _lookup(key, "")
        return True
    except GridError:
        return False


def load_grid(
    path, *, store_override=None, out_override=None, cache_override=None, device_override=None, launcher_override=None,
    base_override=None, seeds_override=None,
) -> GridConfig:  # fmt: skip
    """Read and validate a grid YAML file; the ``*_override`` values (the command line's, None
    for not given) replace its ``store``, ``out``, ``cache`` and ``device``; ``launcher_override``
    maps launcher keys (``partition``, ``time``, ...) given on the command line to their values;
    ``base_override`` maps options to values set on top of the file's ``base`` (``--set``);
    ``seeds_override`` replaces its ``seeds`` (``--seeds``)."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise GridError(f"{path}: grid file not found") from None
    except yaml.YAMLError as err:
        raise GridError(f"{path}: not valid YAML: {err}") from None
    return parse_grid(
        data, source=str(path), store_override=store_override, out_override=out_override,
        cache_override=cache_override, device_override=device_override, launcher_override=launcher_override,
        base_override=base_override, seeds_override=seeds_override,
    )  # fmt: skip


# --- cells ------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if v is None:
        return "none"
    return f"{v:g}" if isinstance(v, float) else str(v)


def _readable(overrides: dict[str, Any]) -> str:
    def value(k, v):
        return Path(v).stem if k == "store" else _fmt(v)  # a store by its file name, not its path

    name = "-".join(f"{key_name(k)}{value(k, v)}" for k, v in overrides.items()) or "base"
    return name[:48].rstrip("-")


def cell_head(grid: GridConfig, overrides: dict[str, Any]) -> str:
    """The head a (non-baseline) cell trains: its own ``head``, else base's, else spool."""
    return overrides.get("head", grid.base.get("head", "spool"))


def train_config(grid: GridConfig, head: str, overrides: dict[str, Any], *, seed: int = 0, out: str = "") -> TrainConfig:
    """The TrainConfig of one run: base, then the cell's overrides, via dataclasses.replace;
    ``head`` last (a baseline's head wins over a head in base)."""
    cfg = TrainConfig(store=grid.store, out=out, head=head, seed=seed, cache=grid.cache,
                      device=grid.device, workers=grid.workers, resume=True)  # fmt: skip
    return replace(replace(replace(cfg, **grid.base), **overrides), head=head)


def cell_hash(cfg: TrainConfig, fingerprint: str | None) -> str:
    """Hash of what a run computes: the head and every TrainConfig field but where and how
    it runs (and those the head does not read, ``UNUSED``), plus the store's fingerprint.
    Changing base or the store gives new run folders."""
    what = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in RUN_FIELDS}
    if what["val_from_train"] == 0.0:
        del what["val_from_train"]  # added later: the runs of grids without it keep their folders
    for name in UNUSED.get(cfg.head, ()):
        del what[name]
    what.update(head=cfg.head, store=fingerprint)
    return hashlib.sha1(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:8]


def expand(grid: GridConfig, fingerprint: str | None | dict[str, str | None] = None) -> list[Cell]:
    """Cells in run order: the grid product (first axis outermost) without exclusions, then
    ``configs``, then baselines. ``fingerprint``: of the store, or a mapping store -> fingerprint
    (a store axis). Options a cell's head does not read (``UNUSED``) are dropped from its
    overrides, and a grid cell that then repeats an earlier one is left out (the full head
    of a grid over range trains once). Raises GridError on two other cells with the same config."""
    prints = fingerprint if isinstance(fingerprint, dict) else {s: fingerprint for s in grid.stores}
    cells: list[Cell] = []
    names = [f for f, _ in grid.axes]
    product_ids = set()
    for values in itertools.product(*(v for _, v in grid.axes)) if grid.axes else ():
        ov = dict(zip(names, values))
        if any(all(ov[k] in vs for k, vs in rule.items()) for rule in grid.exclude):
            continue
        origin = "grid cell " + ", ".join(f"{key_name(k)}={_fmt(v)}" for k, v in ov.items())
        cell = _cell("grid", cell_head(grid, ov), _used(grid, ov), origin, grid, prints)
        if cell.id in product_ids:
            continue  # differs from an earlier grid cell only in options its head does not read
        product_ids.add(cell.id)
        cells.append(cell)
    # with a store axis, every config and baseline runs on each store (the backbone comparison)
    on_stores = [{"store": s} for s in grid.stores] if "store" in names else [{}]
    for i, ov in enumerate(grid.configs):
        for st in on_stores:
            ov_st = {**ov, **st}
            origin = f"configs[{i}]" + (f" on {st['store']}" if st else "")
            cells.append(_cell("config", cell_head(grid, ov_st), _used(grid, ov_st), origin, grid, prints))
    for i, b in enumerate(grid.baselines):
        for st in on_stores:
            origin = f"baselines[{i}] ({b})" + (f" on {st['store']}" if st else "")
            cells.append(_cell("baseline", b, st, origin, grid, prints))
    seen: dict[str, str] = {}
    for c in cells:
        if c.id in seen:
            raise GridError(f"{c.origin} trains the same configuration as {seen[c.id]}; drop one")
        seen[c.id] = c.origin
    if not cells:
        raise GridError("exclude drops every cell of the grid and there are no configs or baselines: nothing to run")
    return cells


def _used(grid: GridConfig, overrides: dict[str, Any]) -> dict[str, Any]:
    unused = UNUSED.get(cell_head(grid, overrides), ())
    return {k: v for k, v in overrides.items() if k not in unused}


def _cell(kind, head, overrides, origin, grid, fingerprints) -> Cell:
    cfg = train_config(grid, head, overrides)
    h = cell_hash(cfg, fingerprints.get(cfg.store))
    if kind == "baseline":
        name = "-".join([head, _readable(overrides)]) if overrides else head
    else:  # the head is named when it is not the Spool head (or it is the only thing set)
        shown = {k: v for k, v in overrides.items() if k != "head"}
        name = _readable(shown) if head == "spool" else "-".join(filter(None, [head, _readable(shown) if shown else ""]))
    return Cell(id=f"{name}-{h}", kind=kind, head=head, overrides=overrides, origin=origin)


def columns(grid: GridConfig) -> list[str]:
    """The TrainConfig fields shown per row: the grid axes, then fields the configs set."""
    cols = [f for f, _ in grid.axes]
    for ov in grid.configs:
        cols += [f for f in ov if f not in cols]
    return cols
