"""Each dataset layout, from official-format sample files in tests/fixtures/ and real tiny videos."""

import logging
import shutil
from pathlib import Path

import pytest

from spool.decode import read_video
from spool.sources import FORMATS, detect_format, load_source, split_from_name, ssv2_class_name

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def real_video(tiny_mp4):
    """A real tiny video per extension, copied wherever a layout needs a file."""
    return {
        ".mp4": tiny_mp4(8, 16),
        ".avi": tiny_mp4(8, 16, codec="mpeg4", ext="avi"),
        ".webm": tiny_mp4(8, 16, codec="libvpx-vp9", ext="webm"),
    }


def place(root: Path, rel_paths, real_video) -> None:
    for rel in rel_paths:
        dst = root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(real_video[dst.suffix.lower()] if dst.suffix.lower() in real_video else real_video[".mp4"], dst)


def layout(tmp_path, name, videos, real_video):
    """tmp copy of tests/fixtures/<name> (the annotation files) plus the videos under tmp/videos."""
    shutil.copytree(FIXTURES / name, tmp_path / "ann")
    place(tmp_path / "videos", videos, real_video)
    return tmp_path / "ann", tmp_path / "videos"


def summary(source):
    return [(e.video_id, source.class_names[e.label] if e.label >= 0 else None, e.split) for e in source.entries]


# ----------------------------------------------------------------------------- folder


def test_folder_classes_from_subfolders(tmp_path, real_video):
    place(tmp_path, ["b/000.mp4", "a/000.mp4", "a/deeper/001.MP4", "c/x.avi", "b/.hidden.mp4", "b/notes.txt", "b/clip.mp4/inner.webm"], real_video)
    source = load_source(tmp_path)
    assert source.format == "folder" and source.root == tmp_path.resolve()
    assert source.class_names == ["a", "b", "c"]
    assert summary(source) == [
        ("a/000.mp4", "a", None),
        ("a/deeper/001.MP4", "a", None),
        ("b/000.mp4", "b", None),  # same file name as a/000.mp4: the id keeps them apart
        ("b/clip.mp4/inner.webm", "b", None),  # a folder named like a video is searched, not listed
        ("c/x.avi", "c", None),
    ]
    assert all(e.path.is_absolute() and e.path.is_file() for e in source.entries)


def test_folder_without_class_folders_is_unlabeled(tmp_path, real_video):
    place(tmp_path, ["v1.mp4", "v0.webm"], real_video)
    source = load_source(tmp_path)
    assert source.class_names == [] and [(e.video_id, e.label) for e in source.entries] == [("v0.webm", -1), ("v1.mp4", -1)]


def test_empty_folder_says_what_was_looked_for(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="no videos found"):
        load_source(tmp_path)


# ----------------------------------------------------------------------------- list


def test_list_file(tmp_path, real_video, caplog):
    shutil.copytree(FIXTURES / "list", tmp_path, dirs_exist_ok=True)
    place(tmp_path, ["videos/a/000.mp4", "videos/b/000.mp4", "videos/b/001.mp4"], real_video)
    with caplog.at_level(logging.WARNING):
        source = load_source(tmp_path / "train_list.txt")
    assert source.format == "list" and source.class_names == ["0", "1", "2"]
    assert [(e.video_id, e.label) for e in source.entries] == [("videos/a/000.mp4", 0), ("videos/b/000.mp4", 2), ("videos/b/001.mp4", 1)]
    assert source.missing == ["videos/missing.mp4"] and "1 listed videos" in caplog.text
    named = load_source(tmp_path / "train_list.txt", labels_file=tmp_path / "classes.txt")
    assert named.class_names == ["cat", "dog", "bird"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("videos/a/000.mp4", r"bad\.txt:3: expected '<path> <label>' \(2 columns\), got 1"),
        ("videos/a/000.mp4 1 extra", r"bad\.txt:3: .*got 3"),
        ("videos/a/000.mp4 cat", r"bad\.txt:3: label 'cat' is not an integer"),
        ("videos/a/000.mp4 -5", r"bad\.txt:3: label -5 is out of range"),
    ],
)
def test_list_file_bad_lines_name_file_and_line(tmp_path, line, message):
    (tmp_path / "bad.txt").write_text(f"x.mp4 0\n\n{line}\n")
    with pytest.raises(ValueError, match=message):
        load_source(tmp_path / "bad.txt")


def test_list_file_label_beyond_labels_file(tmp_path):
    (tmp_path / "l.txt").write_text("x.mp4 3\n")
    (tmp_path / "names.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match=r"l\.txt:1: label 3 is out of range \(.*names\.txt names 2 classes\)"):
        load_source(tmp_path / "l.txt", labels_file=tmp_path / "names.txt")


# ----------------------------------------------------------------------------- UCF101

UCF_VIDEOS = [
    "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi",
    "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c02.avi",
    "ApplyLipstick/v_ApplyLipstick_g08_c01.avi",
    "Archery/v_Archery_g08_c01.avi",
    "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi",
    "ApplyLipstick/v_ApplyLipstick_g01_c01.avi",
    "Archery/v_Archery_g01_c01.avi",
]


def test_ucf101(tmp_path, real_video):
    ann, videos = layout(tmp_path, "ucf101", UCF_VIDEOS, real_video)
    lists = ann / "ucfTrainTestlist"
    source = load_source(videos, split_files=[lists / "trainlist01.txt", lists / "testlist01.txt"])
    assert source.format == "ucf101" and source.class_names == ["ApplyEyeMakeup", "ApplyLipstick", "Archery"]
    assert summary(source) == [
        ("ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi", "ApplyEyeMakeup", "test"),
        ("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi", "ApplyEyeMakeup", "train"),
        ("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c02.avi", "ApplyEyeMakeup", "train"),
        ("ApplyLipstick/v_ApplyLipstick_g01_c01.avi", "ApplyLipstick", "test"),
        ("ApplyLipstick/v_ApplyLipstick_g08_c01.avi", "ApplyLipstick", "train"),
        ("Archery/v_Archery_g01_c01.avi", "Archery", "test"),
        ("Archery/v_Archery_g08_c01.avi", "Archery", "train"),
    ]
    # the files are real videos
    assert read_video(source.entries[0].path, frames=2, size=16, decoder="pyav").num_frames == 8
    only_test = load_source(videos, split_files=[lists / "testlist01.txt"])
    assert {e.split for e in only_test.entries} == {"test"} and len(only_test.entries) == 3


def test_ucf101_unknown_class_and_wrong_label(tmp_path, real_video):
    ann, videos = layout(tmp_path, "ucf101", UCF_VIDEOS, real_video)
    lists = ann / "ucfTrainTestlist"
    (lists / "testlist02.txt").write_text("Archery/v_Archery_g01_c01.avi\r\nBowling/v_Bowling_g01_c01.avi\r\n")
    with pytest.raises(ValueError, match=r"testlist02\.txt:2: unknown class 'Bowling'"):
        load_source(videos, split_files=[lists / "testlist02.txt"])
    (lists / "trainlist02.txt").write_text("Archery/v_Archery_g08_c01.avi 1\r\n")
    with pytest.raises(ValueError, match=r"trainlist02\.txt:1: label 1 disagrees with folder 'Archery'"):
        load_source(videos, split_files=[lists / "trainlist02.txt"])


# ----------------------------------------------------------------------------- HMDB51

HMDB_VIDEOS = [
    "brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0.avi",
    "brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_1.avi",
    "brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_2.avi",
    "cartwheel/Bodenturnen_2004_cartwheel_f_cm_np1_le_bad_0.avi",
    "cartwheel/Bodenturnen_2004_cartwheel_f_cm_np1_ri_med_1.avi",
    "sword_exercise/Blade_Of_Fury_-_Scene_1_sword_exercise_f_cm_np1_ri_bad_0.avi",
    "sword_exercise/Blade_Of_Fury_-_Scene_1_sword_exercise_f_cm_np1_ri_bad_1.avi",
]


def test_hmdb51_directory_means_split1(tmp_path, real_video):
    ann, videos = layout(tmp_path, "hmdb51", HMDB_VIDEOS, real_video)
    source = load_source(videos, split_files=[ann / "testTrainMulti_7030_splits"])
    assert source.format == "hmdb51" and source.class_names == ["brush_hair", "cartwheel", "sword_exercise"]
    assert summary(source) == [
        ("brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0.avi", "brush_hair", "train"),
        ("brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_1.avi", "brush_hair", "test"),
        ("cartwheel/Bodenturnen_2004_cartwheel_f_cm_np1_le_bad_0.avi", "cartwheel", "train"),
        ("cartwheel/Bodenturnen_2004_cartwheel_f_cm_np1_ri_med_1.avi", "cartwheel", "test"),
        ("sword_exercise/Blade_Of_Fury_-_Scene_1_sword_exercise_f_cm_np1_ri_bad_0.avi", "sword_exercise", "train"),
    ]  # id 0 = unused in split 1: ..._goo_2 and ..._bad_1 are left out


def test_hmdb51_split2_files(tmp_path, real_video):
    ann, videos = layout(tmp_path, "hmdb51", HMDB_VIDEOS, real_video)
    splits = ann / "testTrainMulti_7030_splits"
    source = load_source(videos, split_files=sorted(splits.glob("*_split2.txt")))
    assert source.class_names == ["brush_hair", "cartwheel"]
    assert [e.split for e in source.entries] == ["test", "train", "train", "test", "train"]
    with pytest.raises(ValueError, match="mix split numbers"):
        load_source(videos, split_files=[splits / "brush_hair_test_split1.txt", splits / "cartwheel_test_split2.txt"])


# ----------------------------------------------------------------------------- Kinetics

KINETICS_VIDEOS = [
    "train/abseiling/---QUuC4vJs_000003_000013.mp4",
    "train/air drumming/--nQbRBEz2s_000104_000114.mp4",
    "train/abseiling/-3B32lodo2M_000059_000069.mp4",
    "val/0wR5jVB-WPk_000417_000427.mp4",
    "val/0AbCdEfGhIj_000012_000022.mkv",
    "test/1tEsTvIdEo0_000005_000015.mp4",
]


def test_kinetics(tmp_path, real_video, caplog):
    ann, videos = layout(tmp_path, "kinetics", KINETICS_VIDEOS, real_video)
    with caplog.at_level(logging.WARNING):
        source = load_source(videos, split_files=[ann / "train.csv", ann / "validate.csv", ann / "test.csv"])
    assert source.format == "kinetics"
    assert source.class_names == ["abseiling", "air drumming", "playing cards"]
    assert summary(source) == [
        ("test/1tEsTvIdEo0_000005_000015.mp4", None, "test"),
        ("train/abseiling/---QUuC4vJs_000003_000013.mp4", "abseiling", "train"),
        ("train/abseiling/-3B32lodo2M_000059_000069.mp4", "abseiling", "train"),
        ("train/air drumming/--nQbRBEz2s_000104_000114.mp4", "air drumming", "train"),
        ("val/0AbCdEfGhIj_000012_000022.mkv", "playing cards", "val"),
        ("val/0wR5jVB-WPk_000417_000427.mp4", "abseiling", "val"),
    ]
    assert source.missing == ["zzMISSING01_000000_000010", "zzMISSING02_000030_000040"]
    assert "2 listed videos are not under" in caplog.text and "zzMISSING01_000000_000010" in caplog.text


def test_kinetics_bad_header(tmp_path, real_video):
    ann, videos = layout(tmp_path, "kinetics", KINETICS_VIDEOS, real_video)
    (ann / "train.csv").write_text("label,id,start,end\nabseiling,x,1,2\n")
    with pytest.raises(ValueError, match=r"train\.csv: expected a header with"):
        load_source(videos, split_files=[ann / "train.csv"])


# ----------------------------------------------------------------------------- SSv2

SSV2_VIDEOS = ["78687.webm", "42326.webm", "100904.webm", "74225.webm", "116154.webm", "1420.webm", "29052.webm"]


def test_ssv2(tmp_path, real_video):
    ann, videos = layout(tmp_path, "ssv2", SSV2_VIDEOS, real_video)
    splits = [ann / f"something-something-v2-{s}.json" for s in ("train", "validation", "test")]
    source = load_source(videos, split_files=splits, labels_file=ann / "something-something-v2-labels.json")
    assert source.format == "ssv2"
    assert source.class_names == ["Approaching something with your camera", "Holding something next to something", "Putting something on a surface"]
    assert summary(source) == [
        ("100904.webm", "Approaching something with your camera", "train"),
        ("116154.webm", "Holding something next to something", "val"),
        ("1420.webm", None, "test"),
        ("29052.webm", None, "test"),
        ("42326.webm", "Putting something on a surface", "train"),
        ("74225.webm", "Putting something on a surface", "val"),
        ("78687.webm", "Holding something next to something", "train"),
    ]
    assert read_video(source.entries[0].path, frames=2, size=16, decoder="pyav").num_frames == 8


def test_ssv2_unknown_template_and_missing_labels_file(tmp_path, real_video):
    ann, videos = layout(tmp_path, "ssv2", SSV2_VIDEOS, real_video)
    bad = ann / "something-something-v2-train.json"
    bad.write_text('[{"id": "78687", "template": "Holding [something] next to [something]"}, {"id": "42326", "template": "Dropping [something]"}]')
    with pytest.raises(ValueError, match=r"train\.json: entry #1 \(id 42326\) has class 'Dropping something'"):
        load_source(videos, split_files=[bad], labels_file=ann / "something-something-v2-labels.json")
    with pytest.raises(ValueError, match="--labels-file"):
        load_source(videos, split_files=[ann / "something-something-v2-test.json"])


# ----------------------------------------------------------------------------- detection and helpers


def test_detect_format(tmp_path):
    shutil.copytree(FIXTURES, tmp_path / "f")
    f = tmp_path / "f"
    assert detect_format(tmp_path) == "folder"
    assert detect_format(f / "list" / "train_list.txt") == "list"
    assert detect_format(tmp_path, [f / "ucf101/ucfTrainTestlist/trainlist01.txt"]) == "ucf101"
    assert detect_format(tmp_path, [f / "hmdb51/testTrainMulti_7030_splits"]) == "hmdb51"
    assert detect_format(tmp_path, [f / "hmdb51/testTrainMulti_7030_splits/cartwheel_test_split2.txt"]) == "hmdb51"
    assert detect_format(tmp_path, [f / "kinetics/validate.csv"]) == "kinetics"
    assert detect_format(tmp_path, [f / "ssv2/something-something-v2-test.json"]) == "ssv2"
    for ambiguous in ([f / "kinetics/train.csv", f / "ssv2/something-something-v2-test.json"], [f / "list/classes.txt"]):
        with pytest.raises(ValueError, match="pass --format with one of " + ", ".join(FORMATS)):
            detect_format(tmp_path, ambiguous)


def test_bad_options_name_the_option(tmp_path):
    with pytest.raises(ValueError, match="--format 'youtube'"):
        load_source(tmp_path, fmt="youtube")
    with pytest.raises(ValueError, match="does not exist"):
        load_source(tmp_path, split_files=[tmp_path / "nope.csv"])


def test_split_from_name_and_ssv2_class_name():
    assert [split_from_name(n) for n in ("trainlist01.txt", "testlist03.txt", "validate", "something-something-v2-validation", "train", "val", "misc")] == [
        "train",
        "test",
        "val",
        "val",
        "train",
        "val",
        None,
    ]
    assert ssv2_class_name("Putting [something] on [something]") == "Putting something on something"
