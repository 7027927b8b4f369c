"""End-to-end fixtures: a live ComfyUI with the pack and the random-weight SD2.1 checkpoint.

Every test module here sets ``pytestmark = pytest.mark.server``. The example workflows are
converted from UI to API format and run once per session (``workflow_runs``), with these
substitutions:

* Load Checkpoint -> the random-weight SD2.1-architecture test checkpoint;
* Load Image -> a generated test picture placed in the server's input folder, SIDE x SIDE pixels;
* the 512x512 of Empty Latent Image and Image Scale -> SIDE x SIDE (helpers.py, HEADSEG_E2E_SIDE, default
  256), and Mask Select At Pixel's pixel moved with it, to keep CPU time down (one 512x512 step with CFG
  is ~27 s on 2 cores; at 256x256 that step and the VAE decode take under a third of their time at 512;
  every head is recorded at either size);
* every KSampler's ``steps`` is capped at HEADSEG_E2E_STEPS (default 1) to keep CPU time down
  (the recording holds the last step either way);
* a MaskToImage -> SaveImage probe is attached to every MASK output of the HeadSeg nodes, so the
  test can read the MASK tensors' size back as PNGs;
* the explore workflow also gets a Save Recording node (recording round trip).

The explore workflow samples with another seed than the text-to-image one on purpose: ComfyUI
reuses cached nodes across prompts and reports no UI output for them, so each workflow must run
its own HeadSeg nodes for the per-workflow checks.
"""

from __future__ import annotations

import json

import pytest

from headseg.tests.e2e.helpers import TEST_IMAGE, make_test_picture, prepare, workflow_files
from headseg.tests.support.server import comfy_server  # noqa: F401  (the shared server fixture)


class WorkflowRuns(dict):
    log_start: int = 0
    log_end: int = 0


@pytest.fixture(scope="session")
def test_picture(comfy_server):  # noqa: F811
    path = comfy_server.input_dir / TEST_IMAGE
    make_test_picture(path)
    return path


@pytest.fixture(scope="session")
def workflow_runs(comfy_server, test_picture):  # noqa: F811
    """name -> (api prompt, RunResult) for every example workflow, each run once per session.

    ``workflow_runs.log_start`` / ``log_end``: the server log's length before and after these runs (other
    tests provoke errors on purpose, before or after them).
    """
    runs = WorkflowRuns()
    runs.log_start = comfy_server.log_mark()  # earlier test modules may have provoked errors on purpose
    for path in workflow_files():
        ui = json.loads(path.read_text())
        api = prepare(comfy_server.api_from_ui(ui), comfy_server, add_save_recording="explore" in path.stem)
        result = comfy_server.run(api, timeout=900)
        print(f"[e2e] {path.stem}: {'ok' if result.ok else 'FAILED'} in {result.seconds:.0f} s")
        runs[path.stem] = (api, result)
    runs.log_end = comfy_server.log_mark()
    return runs
