"""HeadSeg: class-agnostic segmentation masks from a diffusion UNet's own self-attention heads.

ComfyUI imports this folder as a package. Nothing here imports ComfyUI at import time, so the
pure core under ``nodes/core`` can be imported (and tested) without a ComfyUI on the path.
"""

import logging

WEB_DIRECTORY = "./js"


async def comfy_entrypoint():
    """ComfyUI V3 entry point: returns the extension that lists HeadSeg's nodes (none when another copy
    of HeadSeg was loaded first: nodes/pack_folder.py)."""
    from .nodes import pack_folder

    pack_folder.warn_unservable_folder_name()
    try:
        from .nodes.extension import HeadSegExtension, register_output_links, register_prompt_migration
    except Exception as error:
        # ComfyUI's own line for a failing V3 entry point has the error's text alone, without the file
        logging.error(pack_folder.load_failure_message(error), exc_info=True)
        raise
    if pack_folder.leave_out_second_copy():
        return HeadSegExtension(node_list=[])
    register_prompt_migration()  # API prompts saved for older versions are rewired before validation
    register_output_links()  # each node learns which of its outputs the prompt reads (nodes/output_links.py)
    return HeadSegExtension()
