"""The Save nodes fill in the %date:...% and %Node.widget% patterns of filename_prefix when queued, as
ComfyUI's own save nodes do.
"""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("node_id", ["HeadSeg_SaveLabelMaps", "HeadSeg_SaveRecording"])
def test_save_nodes_fill_in_date_and_widget_patterns_of_the_prefix_when_queued(comfy_page, node_id):
    """As ComfyUI's own save nodes: %date:...% and %Node name.widget% in filename_prefix reach the prompt
    filled in, the workflow keeps the pattern, and %width% / %height% are left to the server."""
    page = comfy_page.page
    prompt, kept, year = page.evaluate(
        """async (type) => {
          const seed = LiteGraph.createNode('HeadSeg_MultiKMeans'); app.graph.add(seed);
          seed.widgets.find((w) => w.name === 'seed').value = 17;
          const save = LiteGraph.createNode(type); app.graph.add(save);
          const prefix = save.widgets.find((w) => w.name === 'filename_prefix');
          prefix.value = 'runs/%date:yyyy%/%HeadSeg_MultiKMeans.seed%_%width%x%height%';
          const out = (await app.graphToPrompt()).output;
          return [out[String(save.id)].inputs.filename_prefix, save.serialize().widgets_values[0], new Date().getFullYear()];
        }""",
        node_id,
    )
    assert prompt == f"runs/{year}/17_%width%x%height%"
    assert kept == "runs/%date:yyyy%/%HeadSeg_MultiKMeans.seed%_%width%x%height%"
    assert comfy_page.pack_problems() == []
