"""HeadSeg: class-agnostic segmentation masks from a diffusion UNet's own self-attention heads.

ComfyUI imports this folder as a package. Nothing here imports ComfyUI at import time, so the
pure core under ``nodes/core`` can be imported (and tested) without a ComfyUI on the path.
"""

WEB_DIRECTORY = "./js"


async def comfy_entrypoint():
    """ComfyUI V3 entry point: returns the extension that lists HeadSeg's nodes (none when another copy
    of HeadSeg was loaded first: nodes/pack_folder.py)."""
    from .nodes import pack_folder

    pack_folder.warn_unservable_folder_name()
    from .nodes.extension import HeadSegExtension, register_prompt_migration

    if pack_folder.leave_out_second_copy():
        return HeadSegExtension(node_list=[])
    register_prompt_migration()  # API prompts saved for older versions are rewired before validation
    return HeadSegExtension()
