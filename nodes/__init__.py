"""HeadSeg nodes: ``core`` holds the pure torch maths; the other modules adapt it to ComfyUI."""
