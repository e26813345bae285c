"""The main panel's picture of a running job (issue 21): the backend's latest preview of the canvas, drawn under
the progress bar while the job runs. Thin: the image is ``blender_addon/scene/preview.py``'s."""

from ..blender_addon.core import session
from ..blender_addon.scene.preview import preview_image


def draw_preview(layout, context):
    """While a job runs and has sent a preview, its picture as a large icon with the step it shows; nothing
    before the first preview of the job (the image may still hold an earlier job's)."""
    job = session.current_job()
    image = preview_image()
    if job is None or job.finished or not job.preview_count or image is None:
        return
    preview = image.preview_ensure()
    layout.template_icon(icon_value=preview.icon_id, scale=8.0)
    layout.label(text=f"Preview of step {job.preview_step}/{job.preview_total}")
