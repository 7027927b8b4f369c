"""ComfyUI imported in-process for tests: $HEADSEG_COMFYUI on sys.path, argument parsing off, CPU mode
(benchmarks may ask for ComfyUI's own device choice instead)."""

import os
import pathlib
import sys


def import_comfyui(cpu: bool = True) -> bool:
    """Makes `comfy`, `folder_paths`, ... importable, in CPU mode unless ``cpu`` is False (then ComfyUI
    picks its device as it does when it serves); False when HEADSEG_COMFYUI names no ComfyUI."""
    path = os.environ.get("HEADSEG_COMFYUI", "")
    if not path or not (pathlib.Path(path) / "comfy").is_dir():
        return False
    if path not in sys.path:
        sys.path.insert(0, path)
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    comfy.cli_args.args.cpu = cpu  # before comfy.model_management is imported
    import comfy.model_management  # noqa: F401

    return True


def run_on_own_thread(make):
    """The result of the coroutine that ``make()`` returns, run by asyncio on a thread of its own:
    another test's event loop (Playwright's, in the browser tests) may be running on this one."""
    import asyncio
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


def quiet_executor():
    """ComfyUI's own PromptExecutor with the classic cache and a server that sends nothing (no client)."""
    import execution

    class Server:
        client_id = None

        def send_sync(self, *args, **kwargs):
            pass

    return execution.PromptExecutor(Server(), cache_type=execution.CacheType.CLASSIC, cache_args={"lru": 0, "ram": 0})


def pack_node_classes() -> list:
    """The node classes the pack's V3 entry point (headseg.comfy_entrypoint) hands ComfyUI."""
    import headseg

    async def listed():
        extension = await headseg.comfy_entrypoint()
        return await extension.get_node_list()

    return run_on_own_thread(listed)


class TextNode:
    """A test node (ComfyUI's V1 form) for prompts run through ComfyUI's own executor: the STRING of its
    widget, as a String node links it (e.g. into Load Recording's path). Register it in
    nodes.NODE_CLASS_MAPPINGS (monkeypatch.setitem) under the class_type the prompt names."""

    RETURN_TYPES = ("STRING",)
    FUNCTION = "run"
    CATEGORY = "test"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("STRING", {})}}

    def run(self, value):
        return (value,)


class TextListNode(TextNode):
    """TextNode whose widget text is split at ',' into a list output ('a,b' -> ['a', 'b']), as a node with a
    list output links paths into Load Recording: the nodes downstream run once per item."""

    OUTPUT_IS_LIST = (True,)

    def run(self, value):
        return (value.split(","),)
