"""Read a dataset's videos, labels and splits from its official layout into one list.

``load_source(src, split_files=..., labels_file=..., fmt="auto")`` returns a
``VideoSource``: absolute paths, ``video_id`` (the posix path relative to the source
root, so ``a/000.mp4`` and ``b/000.mp4`` never collide), integer labels indexing
``class_names`` (-1 = unlabeled) and the split each video came from. Formats:

* ``folder``   ``SRC/<class>/**/<video>``; files directly in SRC are unlabeled. Video
  files are found by extension (``VIDEO_EXTENSIONS``, any case). Directories named like
  videos (``x.mp4/``) are searched, not listed, and hidden files (``._x.mp4``, macOS
  metadata) are skipped. Broken symlinks and symlink loops named like videos go to
  ``VideoSource.missing``. Ids of non-UTF-8 file names spell the bad bytes as ``\\xNN``.
* ``list``     SRC is a ``.txt``/``.csv`` list file, one ``<path> <label>`` per line
  (V-JEPA / mmaction); paths relative to the list file's folder; blank lines and
  ``#`` comments skipped; ``--labels-file`` names the classes (one per line, or JSON
  ``{"name": index}``), else they are ``"0", "1", ...``.
* ``ucf101``   SRC = ``UCF-101/``, split files ``ucfTrainTestlist/trainlist0N.txt`` /
  ``testlist0N.txt``, ``classInd.txt`` read from beside them.
* ``hmdb51``   SRC = ``hmdb51/`` (``<class>/<video>.avi``), split files
  ``testTrainMulti_7030_splits/<class>_test_splitN.txt`` (1 = train, 2 = test, 0 =
  unused, skipped). A directory given as split file means all its ``*_test_split1.txt``;
  for split 2 or 3 pass the files themselves (a shell glob ``dir/*_split2.txt``).
* ``kinetics`` SRC = video root, split files ``train.csv``/``validate.csv``/``test.csv``;
  files ``{youtube_id}_{start:06d}_{end:06d}.<ext>`` anywhere under SRC. Class names are
  the sorted labels of all given files.
* ``ssv2``     SRC = folder of ``<id>.webm``, split files
  ``something-something-v2-{train,validation,test}.json``, ``--labels-file
  something-something-v2-labels.json``; the class is the template without brackets.

Videos a split file names but that are not on disk are not fatal (datasets downloaded
from YouTube always miss some): they are logged (count and first few) and listed in
``VideoSource.missing``. Anything malformed (a bad line, an unknown class) raises
ValueError naming the file and line.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg"})
FORMATS = ("folder", "list", "ucf101", "hmdb51", "kinetics", "ssv2")

_HMDB_SPLIT = re.compile(r"^(?P<cls>.+)_test_split(?P<n>\d+)\.txt$")
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validate": "val", "validation": "val", "test": "test", "testing": "test"}


@dataclass(frozen=True)
class VideoEntry:
    path: Path  # absolute
    video_id: str  # posix path relative to the source root
    label: int  # index into VideoSource.class_names, -1 if unlabeled
    split: str | None  # "train", "val", "test" or None


@dataclass(frozen=True)
class VideoSource:
    root: Path
    format: str
    entries: list[VideoEntry]  # sorted by video_id
    class_names: list[str]
    missing: list[str] = field(default_factory=list)  # listed by a split file, not on disk


def is_video_file(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_EXTENSIONS and not path.name.startswith(".") and path.is_file()


def split_from_name(name: str) -> str | None:
    """'train', 'val' or 'test' from a split name or file name ("validate.csv" -> "val"), else None."""
    stem = name.lower()
    for word in re.split(r"[^a-z]+", stem):
        if word in _SPLIT_ALIASES:
            return _SPLIT_ALIASES[word]
    for prefix, split in (("train", "train"), ("test", "test"), ("val", "val")):  # trainlist01, testlist01
        if any(w.startswith(prefix) for w in re.split(r"[^a-z]+", stem)):
            return split
    return None


def _video_id(path: Path, root: Path) -> str:
    try:
        vid = path.relative_to(root).as_posix()
    except ValueError:  # a list file may name videos outside its folder
        vid = path.as_posix()
    # A file name that is not valid UTF-8 reaches Python with surrogate escapes, which no
    # store can hold as text; its id spells the raw bytes as \xNN (the entry keeps the real path).
    return vid.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _finish(root: Path, fmt: str, entries: Iterable[VideoEntry], class_names: list[str], missing: list[str], origin: str) -> VideoSource:
    seen: dict[str, VideoEntry] = {}
    for entry in entries:
        if entry.video_id in seen:
            raise ValueError(f"{origin}: video {entry.video_id!r} is listed twice (splits {seen[entry.video_id].split} and {entry.split}); pass each video's split file once")
        seen[entry.video_id] = entry
    if missing:
        log.warning("%s: %d listed videos are not under %s and are skipped, e.g. %s", origin, len(missing), root, ", ".join(missing[:5]))
    if not seen:
        raise ValueError(f"{origin}: no videos found under {root} (extensions {sorted(VIDEO_EXTENSIONS)}); check the path and --format")
    return VideoSource(root=root, format=fmt, entries=sorted(seen.values(), key=lambda e: e.video_id), class_names=class_names, missing=missing)


def _lines(path: Path) -> Iterable[tuple[int, str]]:
    """(line number, stripped text) of the non-blank, non-comment lines of a text file."""
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            text = line.strip()
            if text and not text.startswith("#"):
                yield number, text


# ----------------------------------------------------------------------------- folder


def load_folder(root: Path) -> VideoSource:
    root = Path(root).resolve()
    files, dangling = [], []
    for p in root.rglob("*"):
        if is_video_file(p):
            files.append(p)
        elif p.is_symlink() and p.suffix.lower() in VIDEO_EXTENSIONS and not p.exists():
            dangling.append(_video_id(p, root))  # a broken symlink or a symlink loop: reported, not lost
    class_names = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
    index = {name: i for i, name in enumerate(class_names)}
    entries = []
    for p in files:
        parts = p.relative_to(root).parts
        entries.append(VideoEntry(p, _video_id(p, root), index[parts[0]] if len(parts) > 1 else -1, None))
    return _finish(root, "folder", entries, class_names, sorted(dangling), str(root))


# ----------------------------------------------------------------------------- list file


def read_class_names(labels_file: Path) -> list[str]:
    """Class names by index from JSON ``{"name": index}`` or a text file with one name per line."""
    labels_file = Path(labels_file)
    if labels_file.suffix.lower() == ".json":
        mapping = json.loads(labels_file.read_text(encoding="utf-8"))
        if not isinstance(mapping, dict):
            raise ValueError(f"{labels_file}: expected a JSON object {{\"class name\": index}}")
        names = [""] * len(mapping)
        for name, index in mapping.items():
            i = int(index)
            if not 0 <= i < len(mapping) or names[i]:
                raise ValueError(f"{labels_file}: class {name!r} has index {index}; indices must be 0..{len(mapping) - 1}, each once")
            names[i] = name
        return names
    return [text for _, text in _lines(labels_file)]


def load_list(list_file: Path, labels_file: Path | None = None) -> VideoSource:
    list_file = Path(list_file).resolve()
    root = list_file.parent
    names = read_class_names(labels_file) if labels_file else None
    entries, missing, max_label = [], [], -1
    for number, text in _lines(list_file):
        columns = text.split(",") if "," in text else text.split()
        if len(columns) != 2:
            raise ValueError(f"{list_file}:{number}: expected '<path> <label>' (2 columns), got {len(columns)}: {text!r}; paths with spaces or commas are not supported")
        raw_path, raw_label = (c.strip() for c in columns)
        try:
            label = int(raw_label)
        except ValueError:
            raise ValueError(f"{list_file}:{number}: label {raw_label!r} is not an integer") from None
        if label < -1 or (names is not None and label >= len(names)):
            raise ValueError(f"{list_file}:{number}: label {label} is out of range" + (f" ({labels_file} names {len(names)} classes)" if names is not None else ""))
        max_label = max(max_label, label)
        path = (root / raw_path).resolve()
        if not path.is_file():
            missing.append(raw_path)
            continue
        entries.append(VideoEntry(path, _video_id(path, root), label, None))
    class_names = names if names is not None else [str(i) for i in range(max_label + 1)]
    return _finish(root, "list", entries, class_names, missing, str(list_file))


# ----------------------------------------------------------------------------- UCF101


def load_ucf101(root: Path, split_files: Sequence[Path]) -> VideoSource:
    root = Path(root).resolve()
    if not split_files:
        raise ValueError("ucf101: pass --split-file ucfTrainTestlist/trainlist01.txt and/or testlist01.txt")
    class_ind = Path(split_files[0]).parent / "classInd.txt"
    if not class_ind.is_file():
        raise ValueError(f"ucf101: {class_ind} not found; it must sit beside the split files (ucfTrainTestlist/)")
    class_names = []
    for number, text in _lines(class_ind):
        columns = text.split()
        if len(columns) != 2 or columns[0] != str(len(class_names) + 1):
            raise ValueError(f"{class_ind}:{number}: expected '<index> <class>' with index {len(class_names) + 1}, got {text!r}")
        class_names.append(columns[1])
    index = {name: i for i, name in enumerate(class_names)}
    entries, missing = [], []
    for split_file in map(Path, split_files):
        split = split_from_name(split_file.name)
        for number, text in _lines(split_file):
            columns = text.split()
            if len(columns) not in (1, 2):
                raise ValueError(f"{split_file}:{number}: expected '<class>/<video>.avi [label]', got {text!r}")
            rel = columns[0]
            folder = rel.split("/")[0]
            if folder not in index:
                raise ValueError(f"{split_file}:{number}: unknown class {folder!r} (not in {class_ind})")
            label = index[folder]
            if len(columns) == 2 and columns[1] != str(label + 1):
                raise ValueError(f"{split_file}:{number}: label {columns[1]} disagrees with folder {folder!r}, which is class {label + 1} in {class_ind}")
            path = root / rel
            if not path.is_file():
                missing.append(rel)
                continue
            entries.append(VideoEntry(path, rel, label, split))
    return _finish(root, "ucf101", entries, class_names, missing, ", ".join(map(str, split_files)))


# ----------------------------------------------------------------------------- HMDB51


def _hmdb_split_files(split_files: Sequence[Path]) -> list[Path]:
    files = []
    for split_file in map(Path, split_files):
        if split_file.is_dir():
            found = sorted(split_file.glob("*_test_split1.txt"))
            if not found:
                raise ValueError(f"hmdb51: {split_file} holds no *_test_split1.txt files")
            files.extend(found)
        else:
            files.append(split_file)
    return files


def load_hmdb51(root: Path, split_files: Sequence[Path]) -> VideoSource:
    root = Path(root).resolve()
    files = _hmdb_split_files(split_files)
    if not files:
        raise ValueError("hmdb51: pass --split-file testTrainMulti_7030_splits/ (split 1) or its <class>_test_splitN.txt files")
    parsed = []
    for split_file in files:
        match = _HMDB_SPLIT.match(split_file.name)
        if not match:
            raise ValueError(f"hmdb51: split file {split_file} is not named <class>_test_split<N>.txt")
        parsed.append((split_file, match["cls"], match["n"]))
    numbers = {n for _, _, n in parsed}
    if len(numbers) > 1:
        raise ValueError(f"hmdb51: split files mix split numbers {sorted(numbers)}; pass the files of one split")
    class_names = sorted({cls for _, cls, _ in parsed})
    index = {name: i for i, name in enumerate(class_names)}
    entries, missing = [], []
    for split_file, cls, _ in parsed:
        for number, text in _lines(split_file):
            columns = text.split()
            if len(columns) != 2 or columns[1] not in ("0", "1", "2"):
                raise ValueError(f"{split_file}:{number}: expected '<video>.avi <0|1|2>', got {text!r}")
            if columns[1] == "0":  # not used in this split
                continue
            rel = f"{cls}/{columns[0]}"
            path = root / rel
            if not path.is_file():
                missing.append(rel)
                continue
            entries.append(VideoEntry(path, rel, index[cls], "train" if columns[1] == "1" else "test"))
    return _finish(root, "hmdb51", entries, class_names, missing, f"{files[0].parent} ({len(files)} split files)")


# ----------------------------------------------------------------------------- Kinetics


def _index_by_stem(root: Path) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        if is_video_file(path):
            index.setdefault(path.stem, path)  # first in sorted order wins on duplicates
    return index


def _kinetics_stem(youtube_id: str, start: str, end: str) -> str:
    return f"{youtube_id}_{int(float(start)):06d}_{int(float(end)):06d}"


def load_kinetics(root: Path, split_files: Sequence[Path]) -> VideoSource:
    root = Path(root).resolve()
    if not split_files:
        raise ValueError("kinetics: pass --split-file train.csv / validate.csv / test.csv")
    rows = []  # (file, line, label or None, stem, split)
    for split_file in map(Path, split_files):
        file_split = split_from_name(split_file.stem)
        with open(split_file, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            required = {"youtube_id", "time_start", "time_end"}
            if not required <= set(reader.fieldnames or ()):
                raise ValueError(f"{split_file}: expected a header with {sorted(required | {'label', 'split'})}, got {reader.fieldnames}")
            for number, row in enumerate(reader, start=2):
                try:
                    stem = _kinetics_stem(row["youtube_id"], row["time_start"], row["time_end"])
                except (TypeError, ValueError):
                    raise ValueError(f"{split_file}:{number}: time_start/time_end must be numbers, got {row.get('time_start')!r}, {row.get('time_end')!r}") from None
                split = split_from_name(row.get("split") or "") or file_split
                rows.append((split_file, number, row.get("label") or None, stem, split))
    class_names = sorted({label for _, _, label, _, _ in rows if label})
    index = {name: i for i, name in enumerate(class_names)}
    videos = _index_by_stem(root)
    entries, missing = [], []
    for _, _, label, stem, split in rows:
        path = videos.get(stem)
        if path is None:
            missing.append(stem)
            continue
        entries.append(VideoEntry(path, _video_id(path, root), index[label] if label else -1, split))
    return _finish(root, "kinetics", entries, class_names, missing, ", ".join(map(str, split_files)))


# ----------------------------------------------------------------------------- Something-Something v2


def ssv2_class_name(template: str) -> str:
    """'Putting [something] on [something]' -> 'Putting something on something' (the labels-file key)."""
    return template.replace("[", "").replace("]", "")


def load_ssv2(root: Path, split_files: Sequence[Path], labels_file: Path | None) -> VideoSource:
    root = Path(root).resolve()
    if not split_files:
        raise ValueError("ssv2: pass --split-file something-something-v2-train.json / -validation.json / -test.json")
    if labels_file is None:
        raise ValueError("ssv2: pass --labels-file something-something-v2-labels.json")
    class_names = read_class_names(labels_file)
    index = {name: i for i, name in enumerate(class_names)}
    videos = {p.stem: p for p in root.iterdir() if is_video_file(p)}
    entries, missing = [], []
    for split_file in map(Path, split_files):
        split = split_from_name(split_file.stem)
        items = json.loads(split_file.read_text(encoding="utf-8"))
        if not isinstance(items, list):
            raise ValueError(f"{split_file}: expected a JSON list of {{\"id\": ..., \"template\": ...}} entries")
        for number, item in enumerate(items):
            if not isinstance(item, dict) or "id" not in item:
                raise ValueError(f"{split_file}: entry #{number} has no 'id': {item!r}")
            video = str(item["id"])
            if "template" in item:
                name = ssv2_class_name(item["template"])
                if name not in index:
                    raise ValueError(f"{split_file}: entry #{number} (id {video}) has class {name!r}, which {labels_file} does not list")
                label = index[name]
            else:  # the test split ships without labels
                label = -1
            path = videos.get(video)
            if path is None:
                missing.append(video)
                continue
            entries.append(VideoEntry(path, _video_id(path, root), label, split))
    return _finish(root, "ssv2", entries, class_names, missing, ", ".join(map(str, split_files)))


# ----------------------------------------------------------------------------- dispatch


def detect_format(src: Path, split_files: Sequence[Path] = (), labels_file: Path | None = None) -> str:
    """The format ``fmt="auto"`` picks; see the module docstring for the layouts."""
    src = Path(src)
    choices = f"pass --format with one of {', '.join(FORMATS)}"
    if src.is_file():
        if src.suffix.lower() in (".txt", ".csv") and not split_files:
            return "list"
        raise ValueError(f"cannot tell the format of {src}: a file as SRC must be a .txt/.csv list file without --split-file; {choices}")
    if not src.is_dir():
        raise ValueError(f"{src} does not exist; SRC must be a video folder or a list file")
    if not split_files:
        if labels_file is not None:
            raise ValueError(f"--labels-file {labels_file} without --split-file is ambiguous for folder {src}; {choices}")
        return "folder"
    kinds = set()
    for split_file in map(Path, split_files):
        name = split_file.name.lower()
        if re.match(r"^(train|test)list\d+\.txt$", name):
            kinds.add("ucf101")
        elif split_file.is_dir() or _HMDB_SPLIT.match(split_file.name):
            kinds.add("hmdb51")
        elif name.endswith(".csv"):
            kinds.add("kinetics")
        elif name.endswith(".json"):
            kinds.add("ssv2")
        else:
            kinds.add(f"unknown ({split_file.name})")
    if len(kinds) != 1 or next(iter(kinds)).startswith("unknown"):
        raise ValueError(f"cannot tell the format from split files {[str(s) for s in split_files]} (looks like {sorted(kinds)}); {choices}")
    return kinds.pop()


def load_source(src: Path, *, split_files: Sequence[Path] = (), labels_file: Path | None = None, fmt: str = "auto") -> VideoSource:
    """Every video of ``src`` with its label and split, in the layout ``fmt`` (``"auto"`` detects it)."""
    src = Path(src)
    split_files = [Path(s) for s in split_files]
    labels_file = Path(labels_file) if labels_file is not None else None
    for given in [*split_files, *([labels_file] if labels_file else [])]:
        if not given.exists():
            raise ValueError(f"{given} does not exist (--split-file / --labels-file)")
    if fmt == "auto":
        fmt = detect_format(src, split_files, labels_file)
    if fmt not in FORMATS:
        raise ValueError(f"unknown --format {fmt!r}; expected auto or one of {', '.join(FORMATS)}")
    if fmt != "list" and not src.is_dir():
        raise ValueError(f"--format {fmt} needs SRC to be the video folder, got {src}")
    if fmt == "folder":
        if split_files or labels_file:
            raise ValueError("--format folder takes no --split-file or --labels-file: classes come from the sub-folder names")
        return load_folder(src)
    if fmt == "list":
        return load_list(src, labels_file)
    if fmt == "ucf101":
        return load_ucf101(src, split_files)
    if fmt == "hmdb51":
        return load_hmdb51(src, split_files)
    if fmt == "kinetics":
        return load_kinetics(src, split_files)
    return load_ssv2(src, split_files, labels_file)
