"""Latents whose sides are odd (ceil-halved token grids that do not divide the image), batch of two:
recorded heads equal the float64 recomputation and the whole core pipeline runs on them."""

import pytest

from headseg.nodes import recorder
from headseg.nodes.core.pipeline import segment

from .reference import AttentionProbe
from .test_recording_sampling import assert_matches, run


@pytest.mark.parametrize("layout,latent_hw", [("SD2", (9, 13)), ("SDXL", (7, 11)), ("SD15", (5, 3))])
def test_odd_latents_batch_of_two(tiny, layout, latent_hw):
    model = tiny.build(layout, seed=3)
    patched, live = recorder.attach_recorder(model)
    with AttentionProbe(patched) as probe:
        run(tiny, patched, layout, latent_hw, batch=2)
    rec = live.snapshot()
    assert rec.batch_size == 2 and rec.image_size == (latent_hw[0] * 8, latent_hw[1] * 8)
    assert_matches(rec, probe, latent_hw)
    res = segment(rec, components=2, cluster_counts=[2, 3])
    assert tuple(res.sweep.results[3].labels.shape) == (2, latent_hw[0] * 8, latent_hw[1] * 8)
    assert len(res.masks) == 2
