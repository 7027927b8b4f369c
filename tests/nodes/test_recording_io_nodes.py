"""Save Recording / Load Recording in-process: the file round-trips and feeds the masks with no model."""

from __future__ import annotations

import os
import shutil
import sys

import pytest
import torch

from headseg.nodes.core.recording_file import FORMAT
from headseg.tests.core.planted import nested_scene, planted_recording, small_layout

pytestmark = pytest.mark.comfy


@pytest.fixture()
def recording_files():
    """The module that lists and resolves Load Recording's files, its file list walked afresh for each test
    (tests add files between listings)."""
    from headseg.nodes import recording_files

    recording_files.forget_listing()
    yield recording_files
    recording_files.forget_listing()


@pytest.fixture()
def io_nodes(recording_files):
    """The nodes' module, the file list walked afresh for each test (see recording_files)."""
    from headseg.nodes import recording_io_nodes

    return recording_io_nodes


@pytest.fixture(scope="module")
def recording():
    return planted_recording([nested_scene(128, 192)], layout=small_layout(heads=2), d=8, seed=3)


def test_save_then_load_round_trips(io_nodes, recording_files, recording, comfy_folders):
    out = io_nodes.SaveRecording.execute(recording, "headseg/test")
    path = out.args[0]
    info = out.ui["headseg_recording"][0]
    assert path.startswith(str(comfy_folders["output"]))
    assert info["subfolder"] == "headseg" and info["filename"].endswith(".safetensors")
    assert info["heads"] == recording.num_heads and info["layers"] == len(recording.layers)

    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        assert f.metadata()["format"] == FORMAT
        assert set(f.keys()) == {k.name for k in recording.layers}

    # listed in the combo as an output-folder file, and loadable by that name or by path
    assert "headseg/" + info["filename"] + " [output]" in recording_files._recording_files()
    for loaded in (
        io_nodes.LoadRecording.execute("headseg/" + info["filename"] + " [output]", "").args[0],
        io_nodes.LoadRecording.execute("", path).args[0],
    ):
        assert loaded.image_size == recording.image_size
        assert list(loaded.layers) == list(recording.layers)
        for key, t in recording.layers.items():
            assert torch.equal(loaded.layers[key], t.to(torch.float16))

    again = io_nodes.SaveRecording.execute(recording, "headseg/test").args[0]
    assert again != path  # a counter keeps earlier files

    # the output folder's name as a relative path, without ' [output]': the error says how to reach it
    relative = "headseg/" + info["filename"]
    hint = f"; the output folder has one: write '{relative} [output]'"
    with pytest.raises(ValueError, match="^path: no such recording file") as missed:
        io_nodes.LoadRecording.execute("", relative)
    assert str(missed.value).endswith(hint)
    for elsewhere in ("headseg/none.safetensors", relative + " [temp]"):
        with pytest.raises(ValueError, match="^path: no such recording file") as missed:
            io_nodes.LoadRecording.execute("", elsewhere)
        assert "folder has one" not in str(missed.value), elsewhere
    # a `file` the workflow names that this ComfyUI lacks (a workflow shared without its recording): where
    # to put it, and the output folder's file of that name when it is there
    with pytest.raises(ValueError, match=r"^file: no such recording file: 'shared\.safetensors' in ComfyUI's "
                                         r"input folder: put the recording file there") as missed:
        io_nodes.LoadRecording.execute("shared.safetensors", "")
    assert "folder has one" not in str(missed.value)
    with pytest.raises(ValueError, match="^file: no such recording file") as missed:
        io_nodes.LoadRecording.execute(relative, "")
    assert str(missed.value).endswith(f"; the output folder has one: choose '{relative} [output]'")  # a list: no typing
    # 'file' names no temp-folder file (' [temp]' is refused): one there of that name is no choice to offer
    (comfy_folders["temp"] / "headseg").mkdir(exist_ok=True)
    shutil.copy(path, comfy_folders["temp"] / "headseg" / "temp_only.safetensors")
    with pytest.raises(ValueError, match="^file: no such recording file") as missed:
        io_nodes.LoadRecording.execute("headseg/temp_only.safetensors", "")
    assert "temp folder" not in str(missed.value)
    with pytest.raises(ValueError, match="^file: expected a file inside ComfyUI's input folder"):
        io_nodes.LoadRecording.execute("headseg/temp_only.safetensors [temp]", "")  # what it said to write
    with pytest.raises(ValueError, match=r"^file: .* in ComfyUI's output folder: put the recording file there"):
        io_nodes.LoadRecording.execute("headseg/none.safetensors [output]", "")


def test_loaded_recording_gives_masks_without_a_model(io_nodes, recording):
    from headseg.nodes.head_pca_node import HeadPCA
    from headseg.nodes.kmeans_node import MultiKMeans
    from headseg.nodes.mask_merge_node import MaskMerge
    from headseg.nodes.mask_select_node import MaskSelectAtPixel
    from headseg.nodes.upsample_nodes import Upsample

    path = io_nodes.SaveRecording.execute(recording, "r").args[0]
    rec = io_nodes.LoadRecording.execute("", path).args[0]
    feats = HeadPCA.execute(rec, "down+up", "all", 4).args[0]
    stack = Upsample.execute(feats, "bilinear", False).args[0]
    sweep = MultiKMeans.execute(stack, "2,3,4", 0).args[0]
    masks = MaskMerge.execute(sweep, 0.9, 0.0).args[0]
    chosen = MaskSelectAtPixel.execute(masks, 150, 90, 0).args[0]
    assert chosen.shape == (1, 128, 192) and chosen[0, 90, 150] == 1.0


def test_a_file_larger_than_the_free_memory_is_refused_before_it_is_read(io_nodes, recording, monkeypatch):
    """Load Recording copies the heads into memory (about the file's size): a file saved on a larger machine
    ran into torch's allocator part-way (or the server was killed); it is refused naming the input instead."""
    import os

    from headseg.nodes import memory_checks

    path = io_nodes.SaveRecording.execute(recording, "big").args[0]
    size = os.path.getsize(path)
    monkeypatch.setattr(memory_checks, "available_memory", lambda: int(size / 0.8) - 1)
    with pytest.raises(ValueError, match=r"^path: the heads of big_00001_\.safetensors, copied into memory, would "
                                         r"take 0\.0 GiB, more than 80 % of the 0\.0 GiB free\. Load it on a machine"):
        io_nodes.LoadRecording.execute("", path)
    with pytest.raises(ValueError, match=r"^file: the heads of big_00001_\.safetensors"):
        io_nodes.LoadRecording.execute("big_00001_.safetensors [output]", "")
    monkeypatch.setattr(memory_checks, "available_memory", lambda: int(size / 0.8) + 1)
    assert io_nodes.LoadRecording.execute("", path).args[0].num_heads == recording.num_heads


def test_fingerprint_follows_the_file(io_nodes, recording):
    path = io_nodes.SaveRecording.execute(recording, "fp").args[0]
    first = io_nodes.LoadRecording.fingerprint_inputs("", path)
    assert first and first == io_nodes.LoadRecording.fingerprint_inputs("", path)
    import os

    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert io_nodes.LoadRecording.fingerprint_inputs("", path) != first


def test_errors_name_the_input(io_nodes, recording_files, recording, comfy_folders):
    with pytest.raises(ValueError, match="path"):
        io_nodes.LoadRecording.execute("", str(comfy_folders["input"] / "missing.safetensors"))
    with pytest.raises(ValueError, match="file"):
        io_nodes.LoadRecording.execute(recording_files.NO_FILE, "")
    with pytest.raises(ValueError, match="file"):
        io_nodes.LoadRecording.execute("nope.safetensors", "")
    with pytest.raises(TypeError, match="recording"):
        io_nodes.SaveRecording.execute({"not": "a recording"}, "x")
    with pytest.raises(ValueError, match="filename_prefix"):
        io_nodes.SaveRecording.execute(recording, "  ")
    with pytest.raises(ValueError, match="^filename_prefix: expected"):
        io_nodes.SaveRecording.execute(recording, "rec\x00x")
    # a lone surrogate, linked: no file name holds it. '\udc80' to '\udcff' too, which os.fsencode takes (as the
    # bytes 0x80 to 0xff that Python reads from a name that is no UTF-8): the file was written under a name that
    # is no UTF-8, and Load Recording did not list it ('its name is not valid UTF-8, which a workflow cannot name')
    for prefix in ("rec\ud800x", "sub/\udfff/x", "rec\udc80x", "sub/\udcff/x"):
        with pytest.raises(ValueError, match="^filename_prefix: expected a file name prefix .* holds a character no file name can"):
            io_nodes.SaveRecording.execute(recording, prefix)
    assert not (comfy_folders["output"] / "sub").exists()  # no folder made for it
    assert not list(comfy_folders["output"].iterdir())  # nor any file
    with pytest.raises(ValueError, match="^filename_prefix 'x+': cannot write .*shorter prefix"):
        io_nodes.SaveRecording.execute(recording, "x" * 300)  # a file name longer than the OS allows
    with pytest.raises(ValueError, match="^filename_prefix 'sub/b+/c': cannot .*shorter prefix"):
        io_nodes.SaveRecording.execute(recording, "sub/" + "b" * 260 + "/c")  # a folder name too long
    with pytest.raises(ValueError, match="^filename_prefix '../evil': cannot make the file's folder or name .*inside ComfyUI's output folder"):
        io_nodes.SaveRecording.execute(recording, "../evil")
    bad = comfy_folders["input"] / "bad.safetensors"
    from safetensors.torch import save_file

    save_file({"input.1.0": torch.zeros(1, 1, 1, 1, 1)}, str(bad), metadata={"format": "other/1"})
    assert "bad.safetensors" not in recording_files._recording_files()  # not offered: not a recording
    with pytest.raises(ValueError, match="format"):
        io_nodes.LoadRecording.execute("bad.safetensors", "")


def test_file_list_follows_links_once_and_never_loops(io_nodes, recording_files, recording, comfy_folders):
    """Links back up the tree (output/a -> output, output/b -> output) would make a walk that follows
    links endless: each real folder is listed once."""
    import os
    import threading

    out = comfy_folders["output"]
    io_nodes.SaveRecording.execute(recording, "deep/rec")
    os.symlink(out, out / "a")
    os.symlink(out, out / "b")
    os.symlink(out / "deep", out / "c")
    result = []
    walker = threading.Thread(target=lambda: result.append(recording_files._recording_files()), daemon=True)
    walker.start()
    walker.join(timeout=20)  # a looping walk fails the test instead of hanging the run
    assert not walker.is_alive(), "the file list did not finish in 20 s: links are followed in a loop"
    files = result[0]
    assert files == ["deep/rec_00001_.safetensors [output]"]  # its own name, not the link's


def test_file_list_ignores_the_case_of_the_extension(io_nodes, recording_files, recording, comfy_folders):
    """A recording named *.SAFETENSORS (copied from a system that upper-cases names) is offered in
    `file`, as ComfyUI's own model lists offer it."""
    import shutil

    saved = io_nodes.SaveRecording.execute(recording, "case/rec").args[0]
    shutil.copy(saved, comfy_folders["input"] / "REC.SAFETENSORS")
    recording_files.forget_listing()
    assert "REC.SAFETENSORS" in recording_files._recording_files()
    assert io_nodes.LoadRecording.execute("REC.SAFETENSORS", "").args[0].layers.keys() == recording.layers.keys()


@pytest.mark.skipif(sys.platform != "linux", reason="named pipes and non-UTF-8 names: Linux")
def test_file_list_skips_pipes_and_names_safetensors_cannot_open(io_nodes, recording_files, recording, comfy_folders):
    """A pipe named *.safetensors would block the list (and with it ComfyUI's /object_info) forever;
    a name that is not UTF-8 would be listed but could never load."""
    import os
    import threading

    inp = comfy_folders["input"]
    os.mkfifo(inp / "pipe.safetensors")
    good = io_nodes.SaveRecording.execute(recording, "listed").args[0]
    with open(good, "rb") as fh:
        data = fh.read()
    with open(os.path.join(os.fsencode(inp), b"odd\xff.safetensors"), "wb") as fh:
        fh.write(data)
    result = []
    walker = threading.Thread(target=lambda: result.append(recording_files._recording_files()), daemon=True)
    walker.start()
    walker.join(timeout=20)
    assert not walker.is_alive(), "the file list did not finish in 20 s: it opened the pipe"
    assert os.path.basename(good) + " [output]" in result[0]
    assert not [name for name in result[0] if "pipe" in name or "odd" in name]
    with pytest.raises(ValueError, match=r"pipe\.safetensors: not a regular file"):
        io_nodes.LoadRecording.execute("", str(inp / "pipe.safetensors"))
    (comfy_folders["output"] / "a_folder.safetensors").mkdir()
    with pytest.raises(ValueError, match=r"a_folder\.safetensors: is a folder"):
        io_nodes.LoadRecording.execute("a_folder.safetensors [output]", "")


def test_fingerprint_sees_a_file_replaced_by_one_of_the_same_size_and_time(io_nodes, recording, comfy_folders):
    """`cp -p`, `touch -r` or unpacking an archive keep the time; two recordings of one layout have one size."""
    import os

    path = io_nodes.SaveRecording.execute(recording, "same").args[0]
    before = io_nodes.LoadRecording.fingerprint_inputs("", path)
    st = os.stat(path)
    other = planted_recording([nested_scene(128, 192)], layout=small_layout(heads=2), d=8, seed=4)
    fresh = io_nodes.SaveRecording.execute(other, "same").args[0]
    assert os.stat(fresh).st_size == st.st_size
    os.replace(fresh, path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert io_nodes.LoadRecording.fingerprint_inputs("", path) != before


def test_save_into_a_folder_it_cannot_make_blames_the_folder_not_the_prefix(io_nodes, recording, monkeypatch):
    import folder_paths

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "/out/newsub")

    monkeypatch.setattr(folder_paths, "get_save_image_path", refuse)  # root may write anywhere: fake it
    with pytest.raises(ValueError, match=r"^filename_prefix 'newsub/r': cannot make the file's folder or name \(PermissionError: .*\); check that ComfyUI's output folder is writable"):
        io_nodes.SaveRecording.execute(recording, "newsub/r")


def test_save_never_writes_over_a_file_saved_under_its_name_meanwhile(io_nodes, recording, comfy_folders, monkeypatch):
    """The counter is one past the highest file found; another ComfyUI saving into the same output folder (two
    GPUs, one shared folder) could write that name before this one does, and its recording was overwritten
    (and its Save Recording's path then named this one's heads). The name is now taken before writing; a name
    taken meanwhile makes the save move to the next counter."""
    from safetensors import safe_open

    place = io_nodes.output_place
    other = planted_recording([nested_scene(128, 192)], layout=small_layout(heads=3), d=8, seed=5)

    def place_then_another_save(*args, **kwargs):
        folder, name, counter, subfolder = place(*args, **kwargs)
        from headseg.nodes.core.recording_file import save_recording

        save_recording(other, f"{folder}/{name}_{counter:05}_.safetensors")  # the other ComfyUI, just then
        return folder, name, counter, subfolder

    monkeypatch.setattr(io_nodes, "output_place", place_then_another_save)
    path = io_nodes.SaveRecording.execute(recording, "shared/r").args[0]
    out = comfy_folders["output"] / "shared"
    assert sorted(p.name for p in out.iterdir()) == ["r_00001_.safetensors", "r_00002_.safetensors"]
    assert path == str(out / "r_00002_.safetensors")
    with safe_open(out / "r_00001_.safetensors", framework="pt") as f:
        assert sum(f.get_slice(k).get_shape()[1] for k in f.keys()) == other.num_heads  # the other save, kept
    assert io_nodes.LoadRecording.execute("", path).args[0].num_heads == recording.num_heads


def test_a_save_that_fails_leaves_no_file(io_nodes, comfy_folders):
    """A recording Save Recording refuses (a head whose digits float16 would lose) leaves no file under the
    name it took."""
    beyond = planted_recording([nested_scene(128, 192)], layout=small_layout(heads=2), d=8, seed=3)
    key = next(iter(beyond.layers))
    beyond.layers[key] = beyond.layers[key].float() * 1e-7
    with pytest.raises(ValueError, match=r"^recording: layer .* below float16's smallest normal"):
        io_nodes.SaveRecording.execute(beyond, "failed/r")
    assert list((comfy_folders["output"] / "failed").iterdir()) == []


def test_file_list_is_sorted_and_survives_a_missing_input_folder(io_nodes, recording_files, recording, comfy_folders):
    import shutil

    for name in ("b", "zz", "a", "m", "c"):
        io_nodes.SaveRecording.execute(recording, name)
    listed = recording_files._recording_files()
    assert listed == sorted(listed) and len(listed) == 5
    shutil.rmtree(comfy_folders["input"])
    recording_files.forget_listing()
    assert recording_files._recording_files() == listed  # the output folder's files are still offered


def test_the_file_list_is_walked_once_per_moment_and_save_recording_renews_it(io_nodes, recording_files, recording, comfy_folders, monkeypatch):
    """ComfyUI asks for the inputs several times while it checks one prompt: a walk (seconds on a large
    linked drive) is used again for 2 s; after that, or once Save Recording wrote a file, it is redone."""
    now = [1000.0]
    monkeypatch.setattr(recording_files.time, "monotonic", lambda: now[0])
    walks = []
    real = recording_files._walk_recording_files
    monkeypatch.setattr(recording_files, "_walk_recording_files", lambda *a: walks.append(a) or real(*a))
    io_nodes.SaveRecording.execute(recording, "first")
    first = recording_files._recording_files()
    _saved_at(recording, comfy_folders["input"] / "dropped-in.safetensors")  # copied in by hand
    now[0] += 1.0
    assert recording_files._recording_files() == first and len(walks) == 1  # the same moment: not walked again
    now[0] += 1.5
    assert "dropped-in.safetensors" in recording_files._recording_files() and len(walks) == 2
    io_nodes.SaveRecording.execute(recording, "second")
    assert any(name.startswith("second") for name in recording_files._recording_files()) and len(walks) == 3


def test_a_walk_of_more_files_than_a_fixed_cache_holds_reads_no_header_again(io_nodes, recording_files, recording, comfy_folders, monkeypatch):
    """Each walk (every page load, every prompt checked, on the server's event loop) asked a module cache of
    the last 4096 header answers, cleared whole when full: with more .safetensors files than that in the
    folders (a dataset of recordings, model files linked in), every walk read and parsed every header again
    (10x the walk's time at 4500 files with a workflow in each header, growing with the files). The answers
    of the files a walk found are kept for the next, however many there are, and only those."""
    import shutil

    from headseg.nodes.core import recording_file

    first = _saved_at(recording, comfy_folders["output"] / "data" / "r_00000_.safetensors")
    for n in range(1, 4200):
        shutil.copyfile(first, first.with_name(f"r_{n:05}_.safetensors"))
    reads = []
    real = recording_file._read_header
    monkeypatch.setattr(recording_file, "_read_header", lambda fh: reads.append(fh.name) or real(fh))
    assert len(recording_files._recording_files()) == 4200 and len(reads) == 4200
    recording_files.forget_listing()
    assert len(recording_files._recording_files()) == 4200 and len(reads) == 4200  # every answer known: no header read
    first.with_name("r_00007_.safetensors").write_bytes(b"not a recording now")  # a file rewritten is read again
    recording_files.forget_listing()
    assert len(recording_files._recording_files()) == 4199 and len(reads) == 4201


def test_path_may_start_with_home_and_carry_spaces(io_nodes, recording, comfy_folders, monkeypatch):
    import shutil

    saved = io_nodes.SaveRecording.execute(recording, "home").args[0]
    monkeypatch.setenv("HOME", str(comfy_folders["temp"]))
    shutil.copy(saved, comfy_folders["temp"] / "mine.safetensors")
    for path in ("~/mine.safetensors", f"  {saved}\n"):
        rec = io_nodes.LoadRecording.execute("", path).args[0]
        assert rec.image_size == recording.image_size, path
    name = "home_00001_.safetensors [output]"
    assert io_nodes.LoadRecording.execute(name, "   ").args[0].image_size == recording.image_size  # blank path: the file


def test_the_empty_list_placeholder_asks_for_a_recording(io_nodes, recording_files):
    with pytest.raises(ValueError, match="^file: no recording chosen: save one with Save Recording"):
        io_nodes.LoadRecording.execute(recording_files.NO_FILE, "")


def test_a_recording_save_refuses_is_named_by_the_recording_not_the_prefix(io_nodes):
    from headseg.nodes.core.recording import LayerKey, Recording

    faint = Recording({LayerKey("input", 1, 0): torch.full((1, 2, 8, 8, 4), 1e-7)}, (64, 64))  # float32
    with pytest.raises(ValueError, match=r"^recording: layer input\.1\.0, head 0: values at most .*below float16's") as caught:
        io_nodes.SaveRecording.execute(faint, "faint")
    assert "filename_prefix" not in str(caught.value)
    loud = Recording({LayerKey("input", 1, 0): torch.full((1, 2, 8, 8, 4), 1e6)}, (64, 64))  # float16 makes inf
    path = io_nodes.SaveRecording.execute(loud, "big").args[0]  # written in float32
    assert torch.equal(io_nodes.LoadRecording.execute("", path).args[0].layers[LayerKey("input", 1, 0)], loud.layers[LayerKey("input", 1, 0)])


def test_a_prefix_through_a_file_is_blamed_on_the_prefix(io_nodes, recording, comfy_folders):
    (comfy_folders["output"] / "afile").write_text("not a folder")
    with pytest.raises(ValueError, match=r"^filename_prefix 'afile/rec': cannot .*NotADirectoryError.*expected folder and file names"):
        io_nodes.SaveRecording.execute(recording, "afile/rec")


# --------------------------------------------------------------------- where Load Recording may read
# Like ComfyUI's LoadImage, Load Recording reads only inside ComfyUI's folders: an API prompt could
# otherwise name any file on the server (and tell from the error whether it exists).
FILE_OUTSIDE = "file: expected a file inside ComfyUI's input folder, or the output folder when marked ' [output]', got "
PATH_OUTSIDE = "path: expected a file inside ComfyUI's input, output or temp folder, got "


def _saved_at(recording, path):
    """A recording file at ``path`` (its folders made as needed)."""
    from headseg.nodes.core.recording_file import save_recording

    path.parent.mkdir(parents=True, exist_ok=True)
    save_recording(recording, path)
    return path


@pytest.fixture
def secret(recording, comfy_folders):
    """A recording file beside ComfyUI's folders (tmp/outside/secret.safetensors): inside none of them."""
    return _saved_at(recording, comfy_folders["input"].parent / "outside" / "secret.safetensors")


def _refused(io_nodes, file, path, message):
    """``message`` both from validation (a constant value) and from the run (a linked value)."""
    import re

    assert io_nodes.LoadRecording.validate_inputs(file, path) == message
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        io_nodes.LoadRecording.execute(file, path)
    assert io_nodes.LoadRecording.fingerprint_inputs(file, path) == ""


@pytest.mark.parametrize(
    "file",
    [
        "../outside/secret.safetensors",
        "sub/../../outside/secret.safetensors",
        "../outside/secret.safetensors [output]",
        "../../../../etc/passwd",
        "/etc/passwd",
        "{secret}",
        "x.safetensors [temp]",  # the temp folder is not offered for 'file'
    ],
)
def test_a_file_outside_its_folder_is_refused_by_name(io_nodes, secret, file):
    file = file.format(secret=secret)
    _refused(io_nodes, file, "", FILE_OUTSIDE + repr(file))


@pytest.mark.parametrize(
    "path",
    [
        "../outside/secret.safetensors",  # relative to the input folder
        "../../outside/secret.safetensors [output]",
        "{secret}",
        "/etc/shadow",
        "/etc/passwd [output]",
        "~/secret.safetensors",  # HOME is the outside folder here
        # a backslash separates folders on every system, as on Windows (on Linux these were names inside the
        # input folder, accepted when queued and missing at the run), and a drive is outside
        "..\\outside\\secret.safetensors",
        "sub\\..\\..\\..\\outside\\secret.safetensors [output]",
        "C:\\ComfyUI\\input\\secret.safetensors",
        "c:secret.safetensors",
    ],
)
def test_a_path_outside_comfyuis_folders_is_refused_by_name(io_nodes, secret, monkeypatch, path):
    monkeypatch.setenv("HOME", str(secret.parent))
    path = path.format(secret=secret)
    _refused(io_nodes, "", path, PATH_OUTSIDE + repr(path))


def test_a_path_outside_is_refused_without_being_looked_at(io_nodes, secret, monkeypatch):
    """The error must not depend on what exists outside: the path is not even stat'ed."""
    import builtins
    import os

    missing = secret.with_name("missing.safetensors")
    looked_at = []

    def spy_on(module, name):
        real = getattr(module, name)

        def spy(p, *args, **kwargs):
            if isinstance(p, (str, bytes, os.PathLike)) and str(secret.parent) in os.fsdecode(p):
                looked_at.append(os.fsdecode(p))
            return real(p, *args, **kwargs)

        monkeypatch.setattr(module, name, spy)

    for module, name in ((os, "stat"), (os, "lstat"), (os, "readlink"), (builtins, "open")):
        spy_on(module, name)
    messages = []
    for target in (secret, missing):
        with pytest.raises(ValueError) as caught:
            io_nodes.LoadRecording.execute("", str(target))
        messages.append(str(caught.value).replace(target.name, "NAME"))
        messages.append(io_nodes.LoadRecording.validate_inputs(str(target), "").replace(target.name, "NAME"))
    monkeypatch.undo()
    assert looked_at == []
    assert messages[0] == messages[2] and messages[1] == messages[3]  # the same whether or not it exists


def test_links_placed_in_the_folders_are_listed_and_load_like_load_image(io_nodes, recording_files, recording, secret, comfy_folders):
    """Whoever runs the server may link files or folders kept elsewhere into input/ or output/ (a shared
    drive, a Docker volume): ComfyUI's Load Image lists and loads through such links, and so does Load
    Recording. A '..' is worked out as written, so it cannot climb out through a link."""
    import os

    inp, out = comfy_folders["input"], comfy_folders["output"]
    os.symlink(secret, inp / "shared.safetensors")
    os.symlink(secret, out / "shared.safetensors")
    os.symlink(secret.parent, inp / "linked")  # a linked folder
    listed = recording_files._recording_files()
    for name in ("shared.safetensors", "linked/secret.safetensors", "shared.safetensors [output]"):
        assert name in listed, listed
    for file, path in (
        ("shared.safetensors", ""),
        ("linked/secret.safetensors", ""),
        ("shared.safetensors [output]", ""),
        ("", "linked/secret.safetensors"),
        ("", str(inp / "shared.safetensors")),
    ):
        assert io_nodes.LoadRecording.validate_inputs(file, path) is True, (file, path)
        rec = io_nodes.LoadRecording.execute(file, path).args[0]
        assert list(rec.layers) == list(recording.layers), (file, path)
    # input/linked/../outside/... is input/outside/... as written, and that is what is opened: no such
    # file (through the link, '..' would have reached the secret's folder's parent)
    with pytest.raises(ValueError, match="^path: no such recording file"):
        io_nodes.LoadRecording.execute("", "linked/../outside/secret.safetensors")
    (inp / "outside").mkdir()
    assert not (inp / "outside" / "secret.safetensors").exists()


def test_a_set_path_overrides_a_stale_file_at_validation(io_nodes, recording, comfy_folders):
    """A workflow whose file choice no longer exists or points outside, with a valid path: the path is
    what is read, so the stale file does not fail the prompt."""
    _saved_at(recording, comfy_folders["input"] / "a.safetensors")
    assert io_nodes.LoadRecording.validate_inputs("../gone.safetensors", "a.safetensors") is True
    assert io_nodes.LoadRecording.validate_inputs("../gone.safetensors", None) is True  # a linked path: checked at run time
    assert io_nodes.LoadRecording.validate_inputs("../gone.safetensors", "").startswith("file: expected a file inside")


def test_folders_are_compared_with_the_file_systems_case_rule(io_nodes, recording_files, comfy_folders, monkeypatch):
    """Where the file system folds case (Windows: os.path.normcase lowers it), C:/ComfyUI/Input/x is inside
    c:/comfyui/input; on Linux, where case matters, it is not."""
    other_case = str(comfy_folders["input"]).upper() + "/x.safetensors"
    assert io_nodes.LoadRecording.validate_inputs("", other_case).startswith("path: expected a file inside")
    monkeypatch.setattr(recording_files.os.path, "normcase", str.lower)
    assert io_nodes.LoadRecording.validate_inputs("", other_case) is True


def test_a_name_with_a_nul_character_is_named(io_nodes):
    for file, path in (("", "~root\x00"), ("", "a\x00b.safetensors"), ("a\x00b.safetensors", "")):
        name = "path" if path else "file"
        message = io_nodes.LoadRecording.validate_inputs(file, path)
        assert message.startswith(f"{name}: expected a file ") and "without NUL characters" in message, message
        with pytest.raises(ValueError, match=f"^{name}: expected a file .* without NUL characters"):
            io_nodes.LoadRecording.execute(file, path)


def test_files_in_subfolders_and_links_inside_still_load(io_nodes, recording_files, recording, comfy_folders, monkeypatch):
    import os

    import folder_paths

    inp, out, tmp = comfy_folders["input"], comfy_folders["output"], comfy_folders["temp"]
    _saved_at(recording, inp / "sub" / "deeper" / "a.safetensors")
    _saved_at(recording, out / "sub" / "b.safetensors")
    _saved_at(recording, tmp / "sub" / "c.safetensors")
    os.symlink(inp / "sub", inp / "alias")  # a link that stays inside its folder
    os.symlink(out / "sub" / "b.safetensors", out / "b-link.safetensors")
    listed = recording_files._recording_files()
    assert "sub/deeper/a.safetensors" in listed and "sub/b.safetensors [output]" in listed
    assert "b-link.safetensors [output]" in listed
    inputs = [
        ("sub/deeper/a.safetensors", ""),
        ("alias/deeper/a.safetensors", ""),
        ("sub/b.safetensors [output]", ""),
        ("sub/../sub/b.safetensors [output]", ""),  # '..' that stays inside
        ("b-link.safetensors [output]", ""),
        ("", "sub/deeper/a.safetensors"),  # relative to the input folder
        ("", "sub/b.safetensors [output]"),
        ("", str(out / "sub" / "b.safetensors")),
        ("", str(tmp / "sub" / "c.safetensors")),
        ("", "sub/c.safetensors [temp]"),
    ]
    # ComfyUI's input folder named through a link: its files by the link's path or by the real one
    os.symlink(inp, inp.parent / "input-link")
    monkeypatch.setattr(folder_paths, "get_input_directory", lambda: str(inp.parent / "input-link"))
    inputs += [
        ("", str(inp.parent / "input-link" / "sub" / "deeper" / "a.safetensors")),
        ("", str(inp / "alias" / "deeper" / "a.safetensors")),
    ]
    for file, path in inputs:
        assert io_nodes.LoadRecording.validate_inputs(file, path) is True, (file, path)
        assert io_nodes.LoadRecording.fingerprint_inputs(file, path), (file, path)
        rec = io_nodes.LoadRecording.execute(file, path).args[0]
        assert rec.image_size == recording.image_size and list(rec.layers) == list(recording.layers), (file, path)


def test_a_file_or_path_that_is_not_text_is_named(io_nodes):
    import re

    for file, path, message in (
        (123, "", "file: expected a file name (text), got int"),
        (["a.safetensors"], "", "file: expected a file name (text), got list"),
        ("", 123, "path: expected a file path (text), got int"),
    ):
        assert io_nodes.LoadRecording.validate_inputs(file, path) == message
        with pytest.raises(TypeError, match="^" + re.escape(message) + "$"):
            io_nodes.LoadRecording.execute(file, path)
        assert io_nodes.LoadRecording.fingerprint_inputs(file, path) == ""


def test_linked_values_are_checked_at_run_time_only(io_nodes, recording_files):
    """ComfyUI validates a linked input as None; the run then checks the value the link brings."""
    assert io_nodes.LoadRecording.validate_inputs(None, None) is True
    assert io_nodes.LoadRecording.validate_inputs(None, "/etc/shadow") == PATH_OUTSIDE + "'/etc/shadow'"
    assert io_nodes.LoadRecording.validate_inputs(recording_files.NO_FILE, "") is True  # asked for at run time
    assert io_nodes.LoadRecording.validate_inputs("not-saved-yet.safetensors", "") is True  # may be saved before the run


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({"file": "../../../../etc/passwd", "path": ""}, FILE_OUTSIDE + "'../../../../etc/passwd'"),
        ({"file": 123, "path": ""}, "file: expected a file name (text), got int"),
        ({"file": "", "path": "/etc/shadow"}, PATH_OUTSIDE + "'/etc/shadow'"),
    ],
)
def test_comfyuis_prompt_validation_refuses_the_api_prompt(inputs, message):
    """The review's case: an API prompt to the server, refused before anything runs."""
    from headseg.tests.nodes.test_node_options import validation_errors

    prompt = {"1": {"class_type": "HeadSeg_LoadRecording", "inputs": inputs}}
    assert validation_errors(prompt, "1") == [message]


def test_the_file_list_survives_save_recording_forgetting_it_on_another_thread(io_nodes, recording_files, recording, comfy_folders, monkeypatch):
    """The list is read on the server's thread (prompt checks, /object_info) while Save Recording forgets it
    on the execution thread: forgetting it between the reads of one check raised KeyError('at')."""
    recording_files._recording_files()  # a listing is kept
    real_monotonic = recording_files.time.monotonic

    def forget_midway():  # Save Recording on the other thread, between the check's reads
        recording_files.forget_listing()
        return real_monotonic()

    monkeypatch.setattr(recording_files.time, "monotonic", forget_midway)
    assert recording_files._recording_files() == []  # walked again, no KeyError


def test_a_walk_that_overlaps_save_recording_is_not_kept(io_nodes, recording_files, recording, comfy_folders, monkeypatch):
    """A walk that started before Save Recording wrote its file may have missed it: that list is returned
    but not kept, so the next request walks again and lists the new file."""
    real = recording_files._walk_recording_files

    def walk_while_saving(*folders):
        found = real(*folders)  # the walk ends before the file is written...
        io_nodes.SaveRecording.execute(recording, "during")  # ...and Save Recording runs meanwhile
        return found

    monkeypatch.setattr(recording_files, "_walk_recording_files", walk_while_saving)
    assert recording_files._recording_files() == []
    monkeypatch.setattr(recording_files, "_walk_recording_files", real)
    assert any(name.startswith("during") for name in recording_files._recording_files())


def test_a_listing_stored_just_after_save_recording_forgot_it_is_not_used(io_nodes, recording_files, recording, comfy_folders, monkeypatch):
    """Save Recording may forget the listing between a walk's generation check and its store: the stored
    list (which may miss the new file) is then not used by the next request."""
    real_monotonic = recording_files.time.monotonic
    calls = []

    def save_between_check_and_store():  # the store's time.monotonic() runs after the check
        calls.append(1)
        if len(calls) == 1:  # only the store reads the clock when nothing is kept yet
            io_nodes.SaveRecording.execute(recording, "between")
        return real_monotonic()

    recording_files.forget_listing()
    monkeypatch.setattr(recording_files.time, "monotonic", save_between_check_and_store)
    recording_files._recording_files()
    monkeypatch.setattr(recording_files.time, "monotonic", real_monotonic)
    assert any(name.startswith("between") for name in recording_files._recording_files())


def test_save_recording_prefix_takes_the_images_size(recording, comfy_folders):
    """%width% / %height% in filename_prefix are the sampled image's pixels, as Save Image fills them in."""
    from headseg.nodes import recording_io_nodes as io_nodes

    H, W = recording.image_size
    path = io_nodes.SaveRecording.execute(recording, "%width%x%height%/rec").args[0]
    assert path.endswith(f"/{W}x{H}/rec_00001_.safetensors") and (comfy_folders["output"] / f"{W}x{H}").is_dir()


def test_a_prompt_without_the_file_input_is_not_a_validation_traceback(io_nodes, comfy_folders):
    """An API prompt that sets only 'path' leaves 'file' out: ComfyUI reports the missing input itself and
    still calls validate_inputs with the values it has; that call must not fail with a TypeError (which
    ComfyUI shows as 'Exception when validating inner node' with a traceback, under another input)."""
    assert io_nodes.LoadRecording.validate_inputs(path="r.safetensors") is True
    assert io_nodes.LoadRecording.validate_inputs(path="/etc/passwd").startswith("path: expected a file inside")
    assert io_nodes.LoadRecording.fingerprint_inputs(path="missing.safetensors") == ""


def test_a_file_that_is_no_recording_names_the_input_that_chose_it(io_nodes, comfy_folders):
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(3)}, str(comfy_folders["input"] / "model.safetensors"))  # e.g. a LoRA
    for file, path, name in (("model.safetensors", "", "file"), ("", "model.safetensors", "path")):
        with pytest.raises(ValueError, match=f"^{name}: .*model\\.safetensors: metadata field 'format' is missing.*Save Recording writes"):
            io_nodes.LoadRecording.execute(file, path)


def test_a_prefix_outside_the_output_folder_is_refused_when_queued(io_nodes, comfy_folders):
    from headseg.nodes.label_map_nodes import SaveLabelMaps

    for node, example in ((io_nodes.SaveRecording, "headseg/recording"), (SaveLabelMaps, "headseg/labels")):
        # a lone surrogate (an API client's cut UTF-16 text) is no file name: it passed, then the run failed after
        # sampling in open() with an unnamed UnicodeEncodeError (or named, through a subfolder made first)
        for bad in ("../x", "a/../../x", str(comfy_folders["input"] / "x"), "  ", "a\x00b", "\ud800x", "a/\udfff/b", "\udc80x", "a/\udcff/b"):
            message = node.validate_inputs(filename_prefix=bad)
            assert isinstance(message, str) and message.startswith("filename_prefix"), (node, bad, message)
            assert example in message
        for good in ("x", "sub/dir/x", "a/../x", "%year%-%month%/x", None):  # None: linked, known at run time
            assert node.validate_inputs(filename_prefix=good) is True, (node, good)
        # the tooltip names each kind refused (it named blank and '../x' only, not the lone surrogate)
        tooltip = node.GET_NODE_INFO_V1()["input"]["required"]["filename_prefix"][1]["tooltip"]
        assert all(kind in tooltip for kind in ("blank", "'../x'", "lone surrogate", "Windows cannot save under", "CON", "':'", "'\\' separates folders")), (node, tooltip)
    assert not any(comfy_folders["output"].iterdir())  # validation makes no folder


# filename_prefix -> what its message names: a name Windows cannot hold is refused on every system (a workflow
# saved on Linux is run on Windows, the most common ComfyUI install, and the other way round)
WINDOWS_REFUSED = {
    "C:\\x": "drive 'C:'", "c:/x": "drive 'c:'", "D:x": "drive 'D:'",  # absolute (or drive-relative) on Windows
    "..\\x": "outside", "a\\..\\..\\x": "outside",  # a backslash is a separator there
    "CON/x": "device", "sub/nul/x": "device", "aux.x": "device", "sub/Com1.png": "device", "LPT9 .tar/x": "device",
    "COM\u00b2/x": "device", "conin$/x": "device",
    ".../x": "dots and spaces only", "a/ /x": "dots and spaces only", "a/.. /../x": "dots and spaces only",
    "CON./x": "device", "sub/nul /x": "device",  # Windows drops the trailing dots and spaces: the device
    "a<b": "'<'", "a>b": "'>'", 'a"b': "'\"'", "a|b": "'|'", "a?b": "'?'", "a*b": "'*'", "sub/a:b": "':'",
    "a\tb": "'\\t'", "sub\x1f/x": "'\\x1f'",
    "%date:yyyy-MM-dd%/x": "fill in %date:...%",  # an API prompt's unfilled pattern: the web UI fills it in
}


@pytest.mark.parametrize("bad", WINDOWS_REFUSED)
def test_a_prefix_windows_cannot_save_under_is_refused_on_every_system(io_nodes, recording, comfy_folders, bad):
    """On Linux these made a file or folder that Windows cannot hold ('a:b', a folder 'CON'), one of another
    name ('sub.' is 'sub' there) or a file name holding a backslash, where Windows writes into a folder (or
    outside the output folder: '..\\x'); they are refused when the prompt is queued, and, linked, when the node
    runs, before any file or folder is made."""
    from headseg.nodes.label_map_nodes import SaveLabelMaps

    for node, example in ((io_nodes.SaveRecording, "headseg/recording"), (SaveLabelMaps, "headseg/labels")):
        message = node.validate_inputs(filename_prefix=bad)
        assert isinstance(message, str) and message.startswith(f"filename_prefix {bad!r}: "), (node, message)
        assert WINDOWS_REFUSED[bad] in message and example in message, message
    with pytest.raises(ValueError, match=r"^filename_prefix ") as refused:
        io_nodes.SaveRecording.execute(recording, bad)
    assert WINDOWS_REFUSED[bad] in str(refused.value)
    assert not any(comfy_folders["output"].iterdir())


def test_a_backslash_in_path_is_a_folder_on_every_system(io_nodes, recording, comfy_folders):
    """A workflow from Windows names its recording 'headseg\\rec_00001_.safetensors [output]': on Linux that was a
    file name holding a backslash, missing."""
    path = io_nodes.SaveRecording.execute(recording, "headseg/rec").args[0]
    for typed in ("headseg\\rec_00001_.safetensors [output]", path.replace("/", "\\")):
        assert io_nodes.LoadRecording.validate_inputs("", typed) is True, typed
        assert io_nodes.LoadRecording.execute("", typed).args[0].num_heads == recording.num_heads
    assert io_nodes.LoadRecording.fingerprint_inputs("", "headseg\\rec_00001_.safetensors [output]")
    with pytest.raises(ValueError, match=r"the output folder has one: write 'headseg/rec_00001_\.safetensors \[output\]'$"):
        io_nodes.LoadRecording.execute("", "headseg\\rec_00001_.safetensors")


def test_a_paths_folders_lose_their_trailing_dots_and_spaces_as_a_prefixs_do(io_nodes, recording, comfy_folders):
    """Save Recording's prefix 'run. /rec' saves into the folder 'run' on every system (Windows drops a folder's
    trailing dots and spaces), but Load Recording's path 'run. /rec_00001_.safetensors' looked in a folder
    'run. ', missing: the same folder text named two folders. The path's folders now lose them too, as Windows
    reads them, so a workflow from Windows (whose files lie in 'run') finds its file on Linux; a folder of that
    very name made on Linux before (a file found only as typed) is still read."""
    saved = io_nodes.SaveRecording.execute(recording, "run. /rec").args[0]
    assert saved == str(comfy_folders["output"] / "run" / "rec_00001_.safetensors")
    for typed in ("run. /rec_00001_.safetensors [output]", "run..\\rec_00001_.safetensors [output]", f"{comfy_folders['output']}/run ./rec_00001_.safetensors"):
        assert io_nodes.LoadRecording.validate_inputs("", typed) is True, typed
        assert io_nodes.LoadRecording.execute("", typed).args[0].num_heads == recording.num_heads, typed
        assert io_nodes.LoadRecording.fingerprint_inputs("", typed).startswith(saved + ":"), typed
    with pytest.raises(ValueError, match=r"the output folder has one: write 'run/rec_00001_\.safetensors \[output\]'$"):
        io_nodes.LoadRecording.execute("", "run. /rec_00001_.safetensors")
    kept = _saved_at(recording, comfy_folders["input"] / "old." / "rec.safetensors")  # an earlier version's folder
    assert io_nodes.LoadRecording.execute("", "old./rec.safetensors").args[0].num_heads == recording.num_heads
    assert io_nodes.LoadRecording.fingerprint_inputs("", "old./rec.safetensors").startswith(str(kept) + ":")


@pytest.mark.skipif(os.sep != "/", reason="a file name holds a backslash or a drive's colon on Linux and macOS only")
def test_a_path_naming_a_real_file_whose_name_holds_a_backslash_or_a_drive_reads_it(io_nodes, recording, comfy_folders, caplog):
    """On Linux a file name may hold a backslash, or start like a drive ('c:x'): 'path' read the backslash as a
    separator and the drive as outside, so it could name neither file (only the 'file' list could). Such a
    file is read as typed when the path, read as on Windows, names no file; where it names one too, that one
    is read (the path's documented meaning: a workflow from Windows works as it did), with a log line naming
    the other."""
    import logging

    from headseg.nodes.core.recording_file import load_recording

    other = planted_recording([nested_scene(128, 192)], layout=small_layout(heads=3), d=8, seed=4)
    backslashed = _saved_at(recording, comfy_folders["input"] / "sub\\rec.safetensors")
    drive_like = _saved_at(recording, comfy_folders["output"] / "c:rec.safetensors")
    for typed, full in (("sub\\rec.safetensors", backslashed), ("c:rec.safetensors [output]", drive_like)):
        assert io_nodes.LoadRecording.validate_inputs("", typed) is True, typed
        assert io_nodes.LoadRecording.execute("", typed).args[0].num_heads == recording.num_heads
        stamp = io_nodes.LoadRecording.fingerprint_inputs("", typed)
        assert stamp.startswith(str(full) + ":"), (typed, stamp)  # the file it reads is the one it follows
    # the folder 'sub' holds a file of that name too: the path's Windows reading is read, and the other named
    _saved_at(other, comfy_folders["input"] / "sub" / "rec.safetensors")
    with caplog.at_level(logging.WARNING, logger="HeadSeg"):
        assert io_nodes.LoadRecording.execute("", "sub\\rec.safetensors").args[0].num_heads == other.num_heads
    assert f"{backslashed}" in caplog.text and "'file' list" in caplog.text, caplog.text
    assert load_recording(backslashed).num_heads == recording.num_heads  # still there, read through 'file'
    assert io_nodes.LoadRecording.execute("sub\\rec.safetensors", "").args[0].num_heads == recording.num_heads
    # a drive path naming no file of that name here stays outside, and a missing name stays missing
    assert io_nodes.LoadRecording.validate_inputs("", "c:gone.safetensors") == PATH_OUTSIDE + repr("c:gone.safetensors")
    with pytest.raises(ValueError, match=r"^path: no such recording file: 'sub\\\\gone\.safetensors'"):
        io_nodes.LoadRecording.execute("", "sub\\gone.safetensors")


def test_a_backslash_in_a_prefix_is_a_folder_on_every_system_and_names_windows_allows_are_kept(io_nodes, recording, comfy_folders):
    """'sub\\name', typed on Windows, saves into the folder 'sub' there: so it does on Linux (it was one file
    named 'sub\\name_00001_.safetensors'). Names that only look like devices, or where the counter follows the
    device name, are names Windows holds, and are kept."""
    path = io_nodes.SaveRecording.execute(recording, "sub\\name").args[0]
    assert path == str(comfy_folders["output"] / "sub" / "name_00001_.safetensors")
    assert io_nodes.LoadRecording.execute("sub/name_00001_.safetensors [output]", "").args[0].num_heads == recording.num_heads
    for good in ("CONSOLE/x", "x/CON", "nul x/y", "com10/x", "a.b/c", "x/..y", "sub\\dir\\x", "dataset/"):
        assert io_nodes.SaveRecording.validate_inputs(filename_prefix=good) is True, good
    saved = io_nodes.SaveRecording.execute(recording, "x/CON").args[0]
    assert os.path.basename(saved) == "CON_00001_.safetensors"
    # Windows drops a folder's trailing dots and spaces ('sub. ' is 'sub' there): so does every system (Linux
    # made a folder 'sub. '); the file name's start is kept, a counter follows it
    for typed, made in (("sub. /name", "sub/name_00002_"), ("a\\sub ..\\name.", "a/sub/name._00001_")):
        assert io_nodes.SaveRecording.validate_inputs(filename_prefix=typed) is True, typed
        saved = io_nodes.SaveRecording.execute(recording, typed).args[0]
        assert saved == str(comfy_folders["output"] / made) + ".safetensors"
    assert sorted(p.name for p in comfy_folders["output"].iterdir()) == ["a", "sub", "x"]


def test_a_prefix_ending_in_a_separator_keeps_its_last_name_as_the_file_names_start(io_nodes, recording, comfy_folders):
    """ComfyUI works out the prefix's path first (normpath), so a separator at its end names no folder: 'name./'
    and 'name.\\' save 'name._00001_...' in the output folder, on Windows and on Linux (Save Image too). The
    trailing dots and spaces Windows drops are a folder's, and this last name is no folder: it keeps them
    (they were dropped, making 'name_00001_...'); a folder before it still loses them."""
    made = []
    for typed in ("name./", "name.\\", "run ./", "sub. /last. \\"):
        assert io_nodes.SaveRecording.validate_inputs(filename_prefix=typed) is True, typed
        made.append(os.path.relpath(io_nodes.SaveRecording.execute(recording, typed).args[0], comfy_folders["output"]))
    assert made == [
        "name._00001_.safetensors", "name._00002_.safetensors", "run ._00001_.safetensors",
        os.path.join("sub", "last. _00001_.safetensors"),
    ]
    # the last name is the file name's start also when it is of dots and spaces only, as in ComfyUI
    assert io_nodes.SaveRecording.validate_inputs(filename_prefix="sub/.../") is True


def test_a_loaded_recording_with_a_latent_of_another_image_is_refused(recording):
    """Load Recording -> Head PCA with a LATENT connected (to order the nodes): a LATENT of another size or
    batch than the file's image would get the file's masks, so it is refused naming latent; a LATENT of
    the same shape is accepted (it cannot be told apart)."""
    from headseg.nodes.head_pca_node import HeadPCA

    H, W = recording.image_size  # 128 x 192
    same = {"samples": torch.zeros(1, 4, H // 8, W // 8)}
    assert HeadPCA.execute(recording, "down+up", "all", 4, latent=same).args[0].image_size == (H, W)
    for shape in ((1, 4, W // 8, H // 8), (2, 4, H // 8, W // 8)):
        with pytest.raises(ValueError, match=r"^latent: the recording \(from a file\) is of 1 image\(s\) of 192x128 pixels"):
            HeadPCA.execute(recording, "down+up", "all", 4, latent={"samples": torch.zeros(shape)})
    # something else linked into latent (another pack's any-type switch links anything) was taken for a
    # matching LATENT: it is named
    for bad, got in (({"x": 1}, "dict"), (torch.zeros(1, 4, H // 8, W // 8), "Tensor"),
                     ({"samples": torch.zeros(H // 8, W // 8)}, r"samples of shape \(16, 24\)")):
        with pytest.raises(ValueError, match=rf"^latent: expected a LATENT \(a dict with 'samples' of shape \[B, C, h, w\]\), got {got}"):
            HeadPCA.execute(recording, "down+up", "all", 4, latent=bad)


def test_a_linked_path_is_read_again_when_its_file_is_replaced_and_only_then(io_nodes, recording, comfy_folders):
    """ComfyUI hands fingerprint_inputs None for a linked input (e.g. path from a String node or from Save
    Recording's path output). The fingerprint looked at the unused `file` instead: a recording replaced at the
    linked path kept coming from ComfyUI's cache (the old heads' masks), while replacing the unused file
    re-ran the whole pipeline. Now it changes once when a file such a load read is replaced."""
    import os

    inp = comfy_folders["input"]
    path = io_nodes.SaveRecording.execute(recording, "linked").args[0]
    os.replace(path, inp / "rec.safetensors")
    unused = io_nodes.SaveRecording.execute(recording, "unused").args[0]
    os.replace(unused, inp / "unused.safetensors")
    fingerprint = lambda: io_nodes.LoadRecording.fingerprint_inputs("unused.safetensors", None)  # noqa: E731
    first = fingerprint()
    assert io_nodes.LoadRecording.execute("unused.safetensors", "rec.safetensors").args[0].num_heads == recording.num_heads
    assert fingerprint() == first  # nothing changed: the next prompt is served from the cache
    other = planted_recording([nested_scene(128, 192)], layout=small_layout(heads=3), d=8, seed=5)
    fresh = io_nodes.SaveRecording.execute(other, "other").args[0]
    os.replace(fresh, inp / "rec.safetensors")  # the file at the linked path replaced
    changed = fingerprint()
    assert changed != first
    assert io_nodes.LoadRecording.execute("unused.safetensors", "rec.safetensors").args[0].num_heads == other.num_heads
    assert fingerprint() == changed  # read again once, then from the cache again
    fresh = io_nodes.SaveRecording.execute(other, "again").args[0]
    os.replace(fresh, inp / "unused.safetensors")  # the file `file` names, which a linked path overrides
    assert fingerprint() == changed


def test_a_linked_file_with_a_blank_path_is_read_again_when_its_file_is_replaced(io_nodes, recording, comfy_folders):
    """`file` fed by a link (None to fingerprint_inputs) and no path: the file is only known when the node
    runs, so the fingerprint follows the files the load read, as for a linked path, instead of staying the
    same (ComfyUI would then keep serving the replaced file's recording from its cache)."""
    import os

    inp = comfy_folders["input"]
    os.replace(io_nodes.SaveRecording.execute(recording, "linked-file").args[0], inp / "rec.safetensors")
    fingerprint = lambda: io_nodes.LoadRecording.fingerprint_inputs(None, "")  # noqa: E731
    first = fingerprint()
    assert io_nodes.LoadRecording.execute("rec.safetensors", "").args[0].num_heads == recording.num_heads
    assert fingerprint() == first
    other = planted_recording([nested_scene(128, 192)], layout=small_layout(heads=3), d=8, seed=5)
    os.replace(io_nodes.SaveRecording.execute(other, "other").args[0], inp / "rec.safetensors")
    assert fingerprint() != first


def _as_node(node_id):
    """ComfyUI's executing context of node ``node_id``, which it sets around fingerprint_inputs and execute."""
    from comfy_execution.utils import CurrentNodeContext

    return CurrentNodeContext("prompt", node_id)


def test_a_file_replaced_makes_only_the_linked_loads_that_read_it_read_again(io_nodes, recording, comfy_folders):
    """Two Load Recording nodes with linked paths, each reading its own file: replacing one file used to change
    the fingerprint of every linked Load Recording (one epoch for all files), so the other node's recording and
    everything after it (PCA, k-means) ran again for a file nobody touched."""
    import os
    import shutil

    inp = comfy_folders["input"]
    source = io_nodes.SaveRecording.execute(recording, "two").args[0]
    for name in ("a.safetensors", "b.safetensors"):
        shutil.copy(source, inp / name)

    def fingerprint(node):
        with _as_node(node):
            return io_nodes.LoadRecording.fingerprint_inputs("x.safetensors", None)

    def load(node, name):
        with _as_node(node):
            return io_nodes.LoadRecording.execute("", name).args[0]

    first = {node: fingerprint(node) for node in ("1", "2")}
    assert first["1"] != first["2"]  # each node its own stamp: a cache entry of one is never the other's
    load("1", "a.safetensors"), load("2", "b.safetensors")
    assert {node: fingerprint(node) for node in ("1", "2")} == first  # nothing changed: both from the cache
    other = planted_recording([nested_scene(128, 192)], layout=small_layout(heads=3), d=8, seed=5)
    os.replace(io_nodes.SaveRecording.execute(other, "other").args[0], inp / "a.safetensors")
    changed = fingerprint("1")
    assert changed not in first.values()  # node 1 reads its replaced file again ...
    assert fingerprint("2") == first["2"]  # ... node 2, whose file is the same, is served from the cache
    assert load("1", "a.safetensors").num_heads == other.num_heads
    assert fingerprint("1") == changed
    fresh = fingerprint("3")  # a node never seen: a stamp no earlier cache entry holds
    assert fresh not in (*first.values(), changed)


def test_a_linked_load_watches_every_file_it_read_under_its_fingerprint(io_nodes, recording, comfy_folders):
    """The link may bring another path between prompts (and a list of paths brings several): the cache entry
    made for the first path still holds that file's heads, so replacing it changes the fingerprint, even
    though the node read another file since."""
    import os
    import shutil

    inp = comfy_folders["input"]
    source = io_nodes.SaveRecording.execute(recording, "paths").args[0]
    for name in ("p.safetensors", "q.safetensors"):
        shutil.copy(source, inp / name)
    with _as_node("7"):
        first = io_nodes.LoadRecording.fingerprint_inputs("x.safetensors", None)
        io_nodes.LoadRecording.execute("", "p.safetensors")
        assert io_nodes.LoadRecording.fingerprint_inputs("x.safetensors", None) == first
        io_nodes.LoadRecording.execute("", "q.safetensors")  # the link now brings another path
        other = planted_recording([nested_scene(128, 192)], layout=small_layout(heads=3), d=8, seed=5)
        os.replace(io_nodes.SaveRecording.execute(other, "other").args[0], inp / "p.safetensors")
        assert io_nodes.LoadRecording.fingerprint_inputs("x.safetensors", None) != first


def test_a_file_replaced_between_two_reads_under_one_fingerprint_gives_a_new_one(io_nodes, recording, comfy_folders):
    """Under one stamp the node may run again for another cache entry (the link's upstream changed but brings
    the same path, or a list names the file twice) after the file was replaced since the stamp was checked:
    that read took the new version as the one watched, so the stamp stayed, and the first cache entry, which
    holds the old file's heads, was served at the next prompt that asked for it."""
    import os
    import shutil

    inp = comfy_folders["input"]
    shutil.copy(io_nodes.SaveRecording.execute(recording, "race").args[0], inp / "r.safetensors")
    with _as_node("8"):
        first = io_nodes.LoadRecording.fingerprint_inputs("x.safetensors", None)
        old = io_nodes.LoadRecording.execute("", "r.safetensors").args[0]  # the cache entry of upstream 1
        assert io_nodes.LoadRecording.fingerprint_inputs("x.safetensors", None) == first  # prompt 2 checks ...
        other = planted_recording([nested_scene(128, 192)], layout=small_layout(heads=3), d=8, seed=5)
        os.replace(io_nodes.SaveRecording.execute(other, "other").args[0], inp / "r.safetensors")  # ... then
        new = io_nodes.LoadRecording.execute("", "r.safetensors").args[0]  # upstream 2 reads the new file
        assert (old.num_heads, new.num_heads) == (recording.num_heads, other.num_heads)
        # prompt 3 with upstream 1 again: its cache entry (the old heads) must not be served
        assert io_nodes.LoadRecording.fingerprint_inputs("x.safetensors", None) != first


def test_a_linked_load_that_read_too_many_files_or_was_dropped_gets_a_new_fingerprint(
    io_nodes, recording, comfy_folders, monkeypatch
):
    """Only so many files per node and so many nodes are watched; with ComfyUI's cache holding more entries
    (--cache-lru N), a file or node no longer watched could be replaced unseen, so its fingerprint is not
    handed out again."""
    import shutil

    from headseg.nodes import recording_stamps

    monkeypatch.setattr(recording_stamps, "_FILES_KEPT", 2)
    monkeypatch.setattr(recording_stamps, "_NODES_KEPT", 2)
    monkeypatch.setattr(recording_stamps, "_watches", type(recording_stamps._watches)())  # no node of an earlier test
    source = io_nodes.SaveRecording.execute(recording, "watched").args[0]
    for i in range(3):
        shutil.copy(source, comfy_folders["input"] / f"w{i}.safetensors")

    def fingerprint(node):
        with _as_node(node):
            return io_nodes.LoadRecording.fingerprint_inputs("x.safetensors", None)

    first = fingerprint("1")
    with _as_node("1"):
        for i in range(2):
            io_nodes.LoadRecording.execute("", f"w{i}.safetensors")
    assert fingerprint("1") == first  # two files watched
    with _as_node("1"):
        io_nodes.LoadRecording.execute("", "w2.safetensors")
    third = fingerprint("1")
    assert third != first  # a third file: the stamp is given up
    assert fingerprint("1") == third
    fingerprint("2"), fingerprint("3")  # two more nodes: node 1, the least recent, is dropped
    assert fingerprint("1") not in (first, third)


def test_a_linked_list_of_a_datasets_paths_is_served_from_the_cache(io_nodes, recording, comfy_folders, monkeypatch):
    """A list of paths linked into Load Recording (a dataset's recordings, one run per item through ComfyUI's own
    list mapping) reads every file under the node's one stamp. Only 64 files were watched per stamp: with 65 or
    more the node never kept its fingerprint, so queueing the same prompt again read every file, ran Head PCA
    and k-means for every item again and wrote the whole dataset's label maps a second time (70 files on a real
    server: 30 s and 140 more PNGs, where 60 files were served from the cache in 0.1 s)."""
    from headseg.nodes import recording_stamps
    from headseg.tests.support.comfy_in_process import run_on_own_thread
    import shutil

    import execution

    monkeypatch.setattr(recording_stamps, "_watches", type(recording_stamps._watches)())  # no node of an earlier test
    source = io_nodes.SaveRecording.execute(recording, "dataset").args[0]
    names = [f"d{i:03}.safetensors" for i in range(100)]
    for name in names:
        shutil.copy(source, comfy_folders["input"] / name)

    def fingerprint():
        with _as_node("4"):
            return io_nodes.LoadRecording.fingerprint_inputs("x.safetensors", None)

    first = fingerprint()
    inputs = {"file": ["x.safetensors"], "path": names}
    runs = run_on_own_thread(lambda: execution._async_map_node_over_list("p", "4", io_nodes.LoadRecording, inputs, "execute", hidden_inputs={}))
    assert len(runs) == 100
    assert fingerprint() == first  # the next queue is served from the cache
    os.replace(source, comfy_folders["input"] / names[57])  # one file of the list replaced
    assert fingerprint() != first


def test_comfyuis_executor_runs_again_only_the_linked_load_whose_file_was_replaced(
    io_nodes, recording, comfy_folders, monkeypatch
):
    """Through ComfyUI's own executor and cache: two linked Load Recording -> Save Recording chains; replacing
    one file re-runs that chain only (one new file saved), and a prompt with nothing changed re-runs none."""
    import copy
    import os
    import shutil

    import nodes as comfy_nodes

    from headseg.tests.support.comfy_in_process import TextNode, quiet_executor, run_on_own_thread

    for name, cls in (("Text", TextNode), ("HeadSeg_LoadRecording", io_nodes.LoadRecording),
                      ("HeadSeg_SaveRecording", io_nodes.SaveRecording)):
        monkeypatch.setitem(comfy_nodes.NODE_CLASS_MAPPINGS, name, cls)
    inp, out = comfy_folders["input"], comfy_folders["output"]
    source = io_nodes.SaveRecording.execute(recording, "source").args[0]
    for name in ("a.safetensors", "b.safetensors"):
        shutil.copy(source, inp / name)
    prompt = {
        "1": {"class_type": "Text", "inputs": {"value": "a.safetensors"}},
        "2": {"class_type": "HeadSeg_LoadRecording", "inputs": {"file": "", "path": ["1", 0]}},
        "3": {"class_type": "HeadSeg_SaveRecording", "inputs": {"recording": ["2", 0], "filename_prefix": "A"}},
        "4": {"class_type": "Text", "inputs": {"value": "b.safetensors"}},
        "5": {"class_type": "HeadSeg_LoadRecording", "inputs": {"file": "", "path": ["4", 0]}},
        "6": {"class_type": "HeadSeg_SaveRecording", "inputs": {"recording": ["5", 0], "filename_prefix": "B"}},
    }

    executor = quiet_executor()

    def run(prompt_id):  # a fresh prompt each time, as the server parses one per queue
        # execute_async on a thread of its own: execute's asyncio.run fails under a running event loop
        # (Playwright's, when the browser tests run in the same session)
        run_on_own_thread(lambda: executor.execute_async(copy.deepcopy(prompt), prompt_id, {}, ["3", "6"]))
        assert executor.success
        return sorted(p.name for p in out.glob("[AB]_*.safetensors"))

    assert run("p1") == ["A_00001_.safetensors", "B_00001_.safetensors"]
    assert run("p2") == ["A_00001_.safetensors", "B_00001_.safetensors"]  # all from the cache
    other = planted_recording([nested_scene(128, 192)], layout=small_layout(heads=3), d=8, seed=5)
    os.replace(io_nodes.SaveRecording.execute(other, "other").args[0], inp / "a.safetensors")
    assert run("p3") == ["A_00001_.safetensors", "A_00002_.safetensors", "B_00001_.safetensors"]
    assert run("p4") == ["A_00001_.safetensors", "A_00002_.safetensors", "B_00001_.safetensors"]


def test_a_layer_with_nan_or_inf_is_saved_loaded_and_named_and_the_others_stay_usable(io_nodes, recording, caplog):
    """A float16 overflow while sampling leaves NaN / inf in some layers: the file keeps the recording (the
    sampling is not lost), both nodes name those layers, and Head PCA refuses them by name while a
    selection without them gives masks."""
    from headseg.nodes.core.recording import Recording
    from headseg.nodes.head_pca_node import HeadPCA
    from headseg.nodes.kmeans_node import MultiKMeans
    from headseg.nodes.upsample_nodes import Upsample

    down = [k for k in recording.layers if k.position == "down"]
    layers = dict(recording.layers)
    bad = {down[0]: float("nan"), down[-1]: float("inf")}
    for key, value in bad.items():
        t = layers[key].clone()
        t[0, 1, 2, 3, 4] = value
        layers[key] = t
    rec = Recording(layers, recording.image_size, recording.model, recording.steps, recording.branch)

    with caplog.at_level("WARNING"):
        saved = io_nodes.SaveRecording.execute(rec, "nonfinite")
        path = saved.args[0]
        loaded_out = io_nodes.LoadRecording.execute("", path)
    notes = [r for r in caplog.records if "NaN or inf" in r.getMessage()]
    # logged as the pack's other nodes log, under the "HeadSeg" logger (not the root logger)
    assert [r.name for r in notes] == ["HeadSeg", "HeadSeg"]
    loaded = loaded_out.args[0]
    for key, t in rec.layers.items():  # NaN where NaN was, inf where inf was, the rest as float16
        torch.testing.assert_close(loaded.layers[key], t.to(torch.float16), equal_nan=True, rtol=0, atol=0)
    for text in (saved.ui["text"], loaded_out.ui["text"]):
        note = text[-1]
        assert all(str(key) in note for key in bad) and "positions" in note
        assert not any(str(key) in note for key in recording.layers if key not in bad)

    with pytest.raises(ValueError, match=rf"layer {down[0]!s} contains NaN or inf.*positions / levels"):
        HeadPCA.execute(loaded, "down+up", "all", 4)
    feats = HeadPCA.execute(loaded, "up", "all", 4).args[0]
    stack = Upsample.execute(feats, "bilinear", False).args[0]
    sweep = MultiKMeans.execute(stack, "2,3", 0).args[0]
    for k in (2, 3):  # every cluster of the run without the bad layers is used
        assert sweep.results[k].labels.unique().tolist() == list(range(k))


def test_a_finite_recording_gets_no_nan_note(io_nodes, recording):
    saved = io_nodes.SaveRecording.execute(recording, "finite")
    assert len(saved.ui["text"]) == 1
    assert len(io_nodes.LoadRecording.execute("", saved.args[0]).ui["text"]) == 1


@pytest.mark.parametrize("use_path", [False, True])
def test_a_file_removed_after_it_was_found_is_named_by_the_input_that_chose_it(io_nodes, recording, monkeypatch, use_path):
    out = io_nodes.SaveRecording.execute(recording, "removed")
    path, name = out.args[0], out.ui["headseg_recording"][0]["filename"]
    found = io_nodes._resolve  # finds the file; it is removed before load_recording opens it

    def resolve_then_remove(file, p):
        full, named_by = found(file, p)  # (path, the input that named it)
        os.remove(full)
        return full, named_by

    monkeypatch.setattr(io_nodes, "_resolve", resolve_then_remove)
    chosen = "path" if use_path else "file"
    args = ("", path) if use_path else (name + " [output]", "")
    with pytest.raises(ValueError, match=rf"^{chosen}: .*{name}.* was removed while the node read it"):
        io_nodes.LoadRecording.execute(*args)


@pytest.mark.parametrize("disable_metadata", [False, True])
def test_save_recording_keeps_comfyuis_prompt_and_workflow_as_save_latent_does(io_nodes, recording, comfy_folders, disable_metadata):
    """The hidden prompt and workflow as ComfyUI's executor gathers them for this output node go into the
    file's metadata as JSON strings, the keys Save Latent uses; none with --disable-metadata. The format's
    own fields win over a workflow key of the same name, and the file loads as before."""
    import json

    import execution
    from comfy.cli_args import args
    from safetensors import safe_open

    class Prompt:  # the executor's DynamicPrompt, as far as get_input_data reads it
        def get_original_prompt(self):
            return {"4": {"class_type": "HeadSeg_SaveRecording", "inputs": {"filename_prefix": "meta"}}}

    extra = {"extra_pnginfo": {"workflow": {"nodes": [4]}, "format": "not this"}}
    node = io_nodes.SaveRecording
    _, _, hidden = execution.get_input_data({"filename_prefix": "meta"}, node, "4", None, Prompt(), extra)
    before, args.disable_metadata = args.disable_metadata, disable_metadata
    try:
        path = node.PREPARE_CLASS_CLONE(hidden).execute(recording, "meta").args[0]
    finally:
        args.disable_metadata = before
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == FORMAT
    if disable_metadata:
        assert "prompt" not in meta and "workflow" not in meta
    else:
        assert json.loads(meta["prompt"])["4"]["class_type"] == "HeadSeg_SaveRecording"
        assert json.loads(meta["workflow"]) == {"nodes": [4]}
    loaded = io_nodes.LoadRecording.execute("", path).args[0]
    assert loaded.image_size == recording.image_size and list(loaded.layers) == list(recording.layers)


def test_a_workflow_too_large_for_the_files_header_is_left_out_and_the_file_still_loads(io_nodes, recording_files, recording, comfy_folders, caplog):
    """A workflow holding a picture as text (a base64 widget) reaches the file's header JSON-escaped twice
    (json.dumps, then safetensors' own JSON): over the 16 MiB of header Load Recording reads, the file was
    written, then neither listed nor loadable ('not a safetensors file'). Such metadata is left out, largest
    first, with a log line: the prompt is kept, the recording loads and is listed."""
    import json

    from safetensors import safe_open

    import execution

    prompt = {"4": {"class_type": "HeadSeg_SaveRecording", "inputs": {"filename_prefix": "big"}}}

    class Prompt:  # the executor's DynamicPrompt, as far as get_input_data reads it
        def get_original_prompt(self):
            return prompt

    extra = {"extra_pnginfo": {"workflow": {"nodes": [{"widgets_values": ['"quoted"' * (2 << 20)]}]}}}
    _, _, hidden = execution.get_input_data({"filename_prefix": "big"}, io_nodes.SaveRecording, "4", None, Prompt(), extra)
    node = io_nodes.SaveRecording.PREPARE_CLASS_CLONE(hidden)
    with caplog.at_level("WARNING", logger="HeadSeg"):
        out = node.execute(recording, "big")
    path, info = out.args[0], out.ui["headseg_recording"][0]
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    assert "workflow" not in meta and json.loads(meta["prompt"]) == prompt
    assert any("workflow" in r.getMessage() and "left out" in r.getMessage() for r in caplog.records)
    assert info["filename"] + " [output]" in recording_files._recording_files()
    loaded = io_nodes.LoadRecording.execute("", path).args[0]
    assert list(loaded.layers) == list(recording.layers)


def test_a_workflow_entry_a_file_cannot_name_is_left_out_and_no_file_is_left(io_nodes, recording, comfy_folders, caplog):
    """ComfyUI hands Save Recording every key of a prompt's extra_pnginfo, which whoever queues the prompt
    chooses. A key holding a lone surrogate ('\\ud800', from an API client that cut a UTF-16 string) has no
    UTF-8 bytes: safetensors raised an unnamed UnicodeEncodeError and the run failed. Such an entry is left
    out with a log line; the rest (non-ASCII keys UTF-8 holds too) is written and the file loads."""
    import json

    from safetensors import safe_open

    import execution

    prompt = {"4": {"class_type": "HeadSeg_SaveRecording", "inputs": {"filename_prefix": "keys"}}}

    class Prompt:  # the executor's DynamicPrompt, as far as get_input_data reads it
        def get_original_prompt(self):
            return prompt

    extra = {"extra_pnginfo": {"workflow": {"nodes": [4]}, "\ud800": {"a": 1}, "x\udfffy": 2, "\u5de5\u4f5c\u6d41": [3]}}
    _, _, hidden = execution.get_input_data({"filename_prefix": "keys"}, io_nodes.SaveRecording, "4", None, Prompt(), extra)
    node = io_nodes.SaveRecording.PREPARE_CLASS_CLONE(hidden)
    with caplog.at_level("WARNING", logger="HeadSeg"):
        path = node.execute(recording, "keys").args[0]
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["workflow"]) == {"nodes": [4]} and json.loads(meta["prompt"]) == prompt
    assert json.loads(meta["\u5de5\u4f5c\u6d41"]) == [3]  # UTF-8 holds it
    assert not any("\ud800" in key or "\udfff" in key for key in meta)
    said = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(said) == 2 and "'\\ud800'" in said[0] and "'x\\udfffy'" in said[1]
    assert {r.name for r in caplog.records if "left out" in r.getMessage()} == {"HeadSeg"}  # the pack's logger
    assert [p.name for p in (comfy_folders["output"]).glob("keys_*")] == [os.path.basename(path)]
    loaded = io_nodes.LoadRecording.execute("", path).args[0]
    assert list(loaded.layers) == list(recording.layers)


@pytest.mark.parametrize("disable_metadata", [False, True])
def test_a_loaded_recording_saved_again_keeps_its_files_prompt_and_workflow(io_nodes, recording, comfy_folders, disable_metadata):
    """Load Recording -> Save Recording (a copy under another prefix, into a dataset folder): the new file
    wrote the prompt that ran the copy (a Load Recording, a Save Recording: no seed, no model, no text) in
    place of the file's own, so the copy no longer said which prompt, seed and model made the heads. The
    copy keeps the loaded file's metadata as it is; none with --disable-metadata, as for any save."""
    import json

    import execution
    from comfy.cli_args import args
    from safetensors import safe_open

    made = {"3": {"class_type": "KSampler", "inputs": {"seed": 1234}}}

    class Prompt:  # the executor's DynamicPrompt, as far as get_input_data reads it
        def __init__(self, prompt):
            self.prompt = prompt

        def get_original_prompt(self):
            return self.prompt

    def save(rec, prefix, prompt, workflow):
        node = io_nodes.SaveRecording
        extra = {"extra_pnginfo": {"workflow": workflow}}
        _, _, hidden = execution.get_input_data({"filename_prefix": prefix}, node, "9", None, Prompt(prompt), extra)
        return node.PREPARE_CLASS_CLONE(hidden).execute(rec, prefix).args[0]

    first = save(recording, "made", made, {"nodes": ["sampler"]})
    loaded = io_nodes.LoadRecording.execute("", first).args[0]
    # a file with no metadata of its own beyond the format's (written by the core's save_recording)
    bare = io_nodes.LoadRecording.execute("", str(_saved_at(recording, comfy_folders["output"] / "bare.safetensors"))).args[0]
    copying = {"1": {"class_type": "HeadSeg_LoadRecording", "inputs": {"file": "made_00001_.safetensors [output]"}}}
    before, args.disable_metadata = args.disable_metadata, disable_metadata
    try:
        copy = save(loaded, "copy", copying, {"nodes": ["load"]})
        bare_copy = save(bare, "bare_copy", copying, {"nodes": ["load"]})
    finally:
        args.disable_metadata = before
    with safe_open(copy, framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == FORMAT
    assert meta["list_index"] == "0"  # the item it was sampled for, kept also with --disable-metadata
    if disable_metadata:
        assert "prompt" not in meta and "workflow" not in meta
    else:
        assert json.loads(meta["prompt"]) == made and json.loads(meta["workflow"]) == {"nodes": ["sampler"]}
    with safe_open(bare_copy, framework="pt") as f:  # nothing of the prompt that copied it
        assert set(f.metadata()) == {"format", "image_height", "image_width", "model", "steps", "branch"}
    again = io_nodes.LoadRecording.execute("", copy).args[0]
    assert list(again.layers) == list(recording.layers)


def test_each_item_of_a_list_is_named_in_its_recording_file(io_nodes, recording, comfy_folders):
    """A list of latents (Rebatch Latents) runs Save Recording once per item, through ComfyUI's own list
    mapping: every item's file carried the same prompt and nothing else to say which item of the list its
    heads belong to. Each file names its item (list_index); a copy saved again keeps the file's."""
    from headseg.tests.support.comfy_in_process import run_on_own_thread

    import execution
    from safetensors import safe_open

    inputs = {"recording": [recording, recording], "filename_prefix": ["items"]}
    results = run_on_own_thread(lambda: execution._async_map_node_over_list("p", "5", io_nodes.SaveRecording, inputs, "execute", hidden_inputs={}))
    paths = [out.args[0] for out in results]
    for item, path in enumerate(paths):
        with safe_open(path, framework="pt") as f:
            assert f.metadata()["list_index"] == str(item)
    loaded = io_nodes.LoadRecording.execute("", paths[1]).args[0]
    copy = io_nodes.SaveRecording.execute(loaded, "copy").args[0]
    with safe_open(copy, framework="pt") as f:
        assert f.metadata()["list_index"] == "1"


def test_a_loaded_recording_names_the_file_as_the_node_was_given_it(io_nodes, recording, comfy_folders):
    """The label maps made from a loaded recording name its file (Recording.source, Save Label Maps' 'recording'):
    the `file` choice as listed (an output-folder file with its ' [output]' mark), or the `path` as typed without
    its surrounding blanks; a `file` left beside a `path` is not the file read. A recording made while sampling
    names none."""
    _saved_at(recording, comfy_folders["output"] / "named" / "r_00001_.safetensors")
    chosen = "named/r_00001_.safetensors [output]"
    by_file = io_nodes.LoadRecording.execute(chosen, "").args[0]
    assert by_file.file == chosen and by_file.source()["file"] == chosen
    by_path = io_nodes.LoadRecording.execute("other.safetensors", f"  {chosen} ").args[0]
    assert by_path.file == chosen and by_path.source()["file"] == chosen
    assert by_file.select(positions=("up",)).source()["file"] == chosen  # Head PCA's selection keeps it
    assert "file" not in recording.source()


def _held(path) -> list[str]:
    """What of this process still holds ``path``: its open file descriptors and its memory mappings (Linux's
    /proc/self). On Windows either keeps the file from being replaced or deleted."""
    real = os.path.realpath(path)
    fds = [f"fd {fd}" for fd in os.listdir("/proc/self/fd") if os.path.realpath(f"/proc/self/fd/{fd}") == real]
    with open("/proc/self/maps", encoding="utf-8") as maps:
        mapped = [line.strip() for line in maps if line.rstrip("\n").endswith(" " + real)]
    return fds + mapped


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads Linux's /proc/self")
def test_load_recording_holds_no_handle_to_its_file_once_it_returns_or_fails(io_nodes, recording, comfy_folders):
    """On Windows a file that is open or mapped into memory cannot be replaced or deleted: Save Recording over
    it, or the user removing or replacing a damaged file, would fail while Load Recording held it. A loaded
    recording is a copy; a failed load's error (which ComfyUI's executor holds, in a reference cycle through
    its frame's traceback, until Python's cycle collector runs) held the file mapped through the layer
    tensors read before the bad one."""
    from safetensors.torch import save_file

    path = io_nodes.SaveRecording.execute(recording, "held").args[0]
    loaded = io_nodes.LoadRecording.execute("", path).args[0]
    assert _held(path) == []
    os.remove(path)  # the recording stays usable
    assert loaded.num_heads == recording.num_heads and all(t.sum().isfinite() for t in loaded.layers.values())

    # a file whose first layers are good and whose last one is not 5-D
    tensors = {k.name: t.to(torch.float16).contiguous() for k, t in recording.layers.items()}
    tensors["output.99.0"] = torch.zeros(3, 3, dtype=torch.float16)
    bad = comfy_folders["input"] / "bad_layer.safetensors"
    H, W = recording.image_size
    meta = {"format": FORMAT, "image_height": str(H), "image_width": str(W), "model": "SD2", "steps": "last", "branch": "cond"}
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(ValueError, match=r"^file: .*bad_layer\.safetensors: layer 'output\.99\.0' must be 5-D") as failed:
        io_nodes.LoadRecording.execute("bad_layer.safetensors", "")
    assert failed.value is not None  # the error is held, as ComfyUI's executor holds it
    assert _held(bad) == []


def test_a_path_past_windows_limit_is_named_so_on_windows(io_nodes, monkeypatch):
    """Where Windows' long paths are off (its default), a path of 260 characters or more fails with 'No such file
    or directory' (a folder's from 248 on): the error said to check that the output folder is writable. What
    Windows raises is made here by hand (os.name set to 'nt' for output_error only); on Linux a name, not a path,
    is too long, and the error says so."""
    from headseg.nodes import output_files

    long_file = "/o/" + "d" * 240 + "/name_00001_.safetensors"
    long_folder = "/o/" + "d" * 250
    missing_file = FileNotFoundError(2, "No such file or directory", long_file)
    missing_folder = FileNotFoundError(3, "The system cannot find the path specified", long_folder)
    assert "writable" in str(output_files.output_error(missing_file, "p", long_file, "x"))  # not Windows
    short = "/o/name_00001_.safetensors"
    cases = ((missing_file, long_file), (missing_folder, None), (FileNotFoundError(2, "gone", short), short))
    with monkeypatch.context() as windows:  # only while output_error runs: pytest itself reads os.name
        windows.setattr(output_files.os, "name", "nt")
        messages = [str(output_files.output_error(exc, "p", full, "x")) for exc, full in cases]
    assert messages[0].endswith(
        f"the path has {len(long_file)} characters, past the 259 Windows takes unless long paths are enabled: "
        "choose a shorter prefix, or enable long paths in Windows"
    ), messages[0]
    # a folder's limit is its own (248 characters fail): its message names that limit, not the 259 of a file's
    # path, which the folder's 253 characters are not past
    assert len(long_folder) < 260
    assert messages[1].endswith(
        f"the folder's path has {len(long_folder)} characters, past the 247 Windows takes for a folder unless long "
        "paths are enabled: choose a shorter prefix, or enable long paths in Windows"
    ), messages[1]
    assert "writable" in messages[2]
