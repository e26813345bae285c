"""Per-scene SyncSphere settings (``scene.syncsphere``) and the history of generations."""

import bpy
from bpy.props import BoolProperty, CollectionProperty, EnumProperty, FloatProperty, IntProperty, PointerProperty, StringProperty
from bpy.types import PropertyGroup

from ..core.image_input import START_FROM_FILE, START_FROM_NOISE, START_FROM_WORLD
from ..core.generation import (BACKEND_DEFAULTS, CUSTOM_SIZE, DEFAULT_PHOTO_FOV, DEFAULT_STRENGTH, PHOTO_FOV_RANGE, DEFAULT_EXPOSURE, DEFAULT_QUALITY, DEFAULT_STYLE, DEFAULT_SUN_RATIO,
                               DEFAULT_SYNC_WEIGHT, DEFAULT_SYNCSDE_LAMBDA, MAX_SEED, MAX_VARIATIONS, QUALITIES, STYLES,
                               SYNC_FROM_QUALITY)

MODE_ITEMS = (
    ("WORLD", "360° World", "An equirectangular 360° image that becomes the scene's World", "WORLD", 0),
    ("TILE", "Tileable Texture", "A seamless texture on the active object's material", "TEXTURE", 1),
    ("WIDE", "Wide Image", "A wide panorama, opened in the Image Editor", "IMAGE_DATA", 2),
)
# The sizes follow the model's view size (generation.resolution): these are for 512-px models, doubled for SDXL.
RESOLUTION_ITEMS = (
    ("DRAFT", "Draft", "Fastest: 1024x512 world, 512 px tile, 2048x512 wide with 512-px models; twice that with "
     "SDXL (1024-px views)"),
    ("STANDARD", "Standard", "2048x1024 world, 1024 px tile, 3072x768 wide with 512-px models; twice that with SDXL"),
    ("HIGH", "High", "4096x2048 world, 2048 px tile, 4096x1024 wide with 512-px models; twice that with SDXL"),
    ("ULTRA", "Ultra (8K)", "8192x4096 world, 4096 px tile, 8192x2048 wide: generated at half the size and upscaled "
     "twice with the same views (the largest SyncSphere makes, whatever the model)"),
    (CUSTOM_SIZE, "Custom", "Width and Height as you type them: multiples of 8 px, at least one view, at most "
     "8192x4096 px; a 360° World twice as wide as tall"),
)
# Start from Image (core/image_input.py): noise, a file, or the image of the scene's World.
START_IMAGE_ITEMS = (
    (START_FROM_NOISE, "None", "Start from noise"),
    (START_FROM_FILE, "File", "Re-draw an image file (.png, .jpg or .exr) at the Size, keeping as much of it as "
     "Strength leaves"),
    (START_FROM_WORLD, "World's Image", "Re-draw the image of the scene's World (its Environment Texture), e.g. "
     "to remix an HDRI; your World and image are not changed"),
)
# Style presets: names, descriptions and their texts come from the one table, generation.STYLES. The numbers are
# fixed, so a saved file keeps its style when presets are added.
STYLE_ITEMS = tuple((identifier, name, description, number)
                    for number, (identifier, name, description, _, _) in enumerate(STYLES))
# Quality: names, descriptions and what each sends all come from the one table, generation.QUALITIES.
QUALITY_ITEMS = tuple((identifier, name, description, number)
                      for number, (identifier, name, description, _) in enumerate(QUALITIES))
# Only the methods the backend implements are offered, after "From Quality" (generation.SYNC_FROM_QUALITY).
# The numbers are fixed: a saved file stores the number, and "From Quality" came after the three methods.
SYNC_ITEMS = (
    (SYNC_FROM_QUALITY, "From Quality", "Let the Quality choice decide the method and its options", 3),
    ("MULTIDIFFUSION", "MultiDiffusion", "Average overlapping views every step (Bar-Tal et al., 2023). Fast; "
     "neighbouring views agree, distant parts may drift apart in style", 0),
    ("SYNCDIFFUSION", "SyncDiffusion", "Also steer every view towards one anchor view so the whole image is one "
     "coherent scene (Lee et al., 2023). Several times slower per guided step", 1),
    ("SYNCSDE", "SyncSDE", "Every view keeps its own trajectory and is pulled towards its neighbours where they "
     "overlap after each step (Lee et al., 2025). About as fast as MultiDiffusion per view; it needs overlapping "
     "windows, so it always runs every one of them (the dense schedule, as Best)", 2),
)
# Which views a 360° World denoises (generation.VIEWS_OF_SET maps them to the backend's --views). Automatic
# sends nothing and leaves the choice to the backend, which knows the canvas.
VIEW_SET_ITEMS = (
    ("AUTO", "Automatic", "Band and pole faces where the resolution allows, else the band"),
    ("BAND", "Band", "Crop windows of the panorama; the poles are stretched"),
    ("BAND_POLES", "Band + Poles", "Crop windows within ±60° plus the up and down cube faces"),
    ("RING", "Ring", "8 views 45° apart plus up and down faces, as MVDiffusion; fixed views, so every step "
     "runs all of them (the dense schedule, whatever the Quality)"),
    ("CUBE", "Cube", "The six cube faces; fixed views, so every step runs all of them (the dense schedule, "
     "whatever the Quality)"),
)
DEVICE_ITEMS = (
    ("PREFERENCES", "From Preferences", "The device chosen in the add-on preferences"),
    ("auto", "Automatic", "CUDA, then Apple Metal, then the CPU"),
    ("cuda", "CUDA", "An NVIDIA GPU"),
    ("mps", "Apple Metal", "An Apple Silicon GPU"),
    ("cpu", "CPU", "The CPU (very slow)"),
)
# How the backend uses GPU memory (its --memory; generation.generate_params sends the identifier as is).
MEMORY_ITEMS = (
    ("auto", "Auto", "Picks Full or Low from the GPU's free memory and the image size"),
    ("full", "Full", "Everything on the GPU at once: fastest, needs the most GPU memory"),
    ("low", "Low", "Slower, but fits smaller GPUs: the models moved to the CPU between stages, "
     "one view at a time and the image decoded in strips"),
)
# How the backend stores the model's weights (its --quantize; sent only when not "none").
QUANTIZE_ITEMS = (
    ("none", "Full Precision", "The weights as the model ships them"),
    ("int8", "Int8", "The UNet's or transformer's and the text encoders' weights in 8 bits: about half their GPU "
     "memory (SDXL or SD3 on an 8 GB GPU), a very slightly different image; needs torchao in the backend"),
)
# How the sun of a HDR World lights the scene (blender_addon/scene/world.py, apply_lit_world). The identifiers are
# lighting.SUN_LAMP and lighting.IN_TEXTURE.
SUN_MODE_ITEMS = (
    ("SUN_LAMP", "Sun Lamp", "A Sun light shines from the sun's direction with its size and strength, and the "
     "World lights the scene without the sun's disc (the camera still sees it): sharp, noise-free shadows "
     "in EEVEE and Cycles", "LIGHT_SUN", 0),
    ("IN_TEXTURE", "In the World Texture", "The sun's bright disc in the World lights the scene, no lamp: "
     "Cycles needs more samples for clean shadows", "WORLD", 1),
)


class SyncSphereHistoryItem(PropertyGroup):
    """One past generation: what was asked and where its files are."""

    prompt: StringProperty(name="Prompt")
    # What the item is called in the History panel, named after the prompt (names.prompt_title), unique among the
    # history's items; the World or material it made has the same name when that was free.
    title: StringProperty(name="Title")
    negative_prompt: StringProperty(name="Negative Prompt")
    style: EnumProperty(name="Style", items=STYLE_ITEMS, default=DEFAULT_STYLE)
    style_prompt: StringProperty(name="Style Prompt")
    mode: EnumProperty(name="Mode", items=MODE_ITEMS)
    resolution: EnumProperty(name="Resolution", items=RESOLUTION_ITEMS)
    custom_width: IntProperty(name="Width", default=2048)
    custom_height: IntProperty(name="Height", default=1024)
    seed: IntProperty(name="Seed", min=0)
    steps: IntProperty(name="Steps")
    guidance: FloatProperty(name="Guidance")
    # Items recorded before Quality existed ran every overlapping window: they reuse as Best.
    quality: EnumProperty(name="Quality", items=QUALITY_ITEMS, default="BEST")
    # The settings' defaults, so items recorded before these existed reuse as MultiDiffusion with the defaults
    # (and, for the view set and per-direction prompts, as Automatic without them; without merged attention).
    sync_method: EnumProperty(name="Synchronisation", items=SYNC_ITEMS, default="MULTIDIFFUSION")
    sync_weight: FloatProperty(name="Coherence Strength", default=DEFAULT_SYNC_WEIGHT)
    sync_steps: IntProperty(name="Guided Steps", default=10)
    sync_fast: BoolProperty(name="Fast Guidance", default=False)
    syncsde_lambda: FloatProperty(name="Pull Strength", default=DEFAULT_SYNCSDE_LAMBDA)
    mad: BoolProperty(name="Merged Attention", default=False)
    view_set: EnumProperty(name="View Set", items=VIEW_SET_ITEMS, default="AUTO")
    prompt_up: StringProperty(name="Sky Prompt")
    prompt_down: StringProperty(name="Ground Prompt")
    # The lighting's generation settings (items recorded before they existed: the defaults, HDR on).
    hdr: BoolProperty(name="HDR", default=True)
    exposure: FloatProperty(name="Exposure", default=DEFAULT_EXPOSURE)
    sun_ratio: FloatProperty(name="Sun Ratio", default=DEFAULT_SUN_RATIO)
    use_sun_direction: BoolProperty(name="Sun Direction", default=False)
    sun_yaw: FloatProperty(name="Sun Yaw", default=0.0)
    sun_pitch: FloatProperty(name="Sun Pitch", default=45.0)
    png_path: StringProperty(name="PNG", subtype="FILE_PATH")
    exr_path: StringProperty(name="EXR", subtype="FILE_PATH")
    # How it ran, from its metadata.json (generation.run_summary): the schedule and views per step.
    run_summary: StringProperty(name="Run")


class SyncSphereSettings(PropertyGroup):
    """What the next generation makes, and how results are shown in the scene."""

    prompt: StringProperty(name="Prompt", description="What the image shows", default="")
    # The Style menu (SYNCSPHERE_OT_apply_style, not an update callback: those crash the bpy 4.2 module at exit)
    # sets style and fills style_prompt and negative_prompt with the preset's texts; both stay editable.
    style: EnumProperty(name="Style", items=STYLE_ITEMS, default=DEFAULT_STYLE,
                        description="The style preset last picked; it filled Style Prompt and Avoid")
    style_prompt: StringProperty(name="Style Prompt", default="",
                                 description="Added after the prompt (\", \" between): the look. A style fills it; "
                                             "edit it freely")
    negative_prompt: StringProperty(name="Negative Prompt", default="",
                                    description="What the image should not show. A style fills it; edit it freely")
    mode: EnumProperty(name="Mode", items=MODE_ITEMS, default="WORLD")
    resolution: EnumProperty(name="Resolution", items=RESOLUTION_ITEMS, default="DRAFT")
    # Size = Custom: checked before any job (preflight.custom_size_problem), so the limits here only stop typos.
    custom_width: IntProperty(name="Width", description="The image's width in pixels (a multiple of 8)",
                              default=2048, min=8, max=16384, subtype="PIXEL")
    custom_height: IntProperty(name="Height", description="The image's height in pixels (a multiple of 8; half "
                               "the width for a 360° World)", default=1024, min=8, max=16384, subtype="PIXEL")
    # Start from Image (core/image_input.py): sent as the backend's init_image and strength.
    start_image_source: EnumProperty(name="Start from Image", items=START_IMAGE_ITEMS, default=START_FROM_NOISE,
                                     description="Generate from noise, or re-draw an image")
    start_image_path: StringProperty(name="Image File", subtype="FILE_PATH", default="",
                                     description="The image to start from: .png, .jpg or .exr (an EXR is "
                                                 "tone-mapped with Lighting › Exposure)")
    strength: FloatProperty(name="Strength", default=DEFAULT_STRENGTH, min=0.01, max=1.0,
                            description="How much of the start image is re-drawn: low keeps it, 1 keeps only its "
                                        "colours' layout (the last steps x strength of the Steps run)")
    # Extend Photo (World mode; core/generation.py): sent as the backend's photo, photo_fov, photo_yaw, photo_pitch.
    extend_photo: BoolProperty(name="Extend Photo", default=False,
                               description="Keep a photo where its camera saw it and paint the rest of the world "
                                           "around it")
    photo_path: StringProperty(name="Photo File", subtype="FILE_PATH", default="",
                               description="The photo to extend: .png, .jpg or .exr (an EXR is tone-mapped with "
                                           "Lighting › Exposure), any size and aspect")
    photo_fov: FloatProperty(name="Field of View", default=DEFAULT_PHOTO_FOV, min=PHOTO_FOV_RANGE[0] + 0.01,
                             max=PHOTO_FOV_RANGE[1] - 0.01, precision=1,
                             description="The photo's horizontal field of view in degrees (about 60-70 for a phone's "
                                         "main camera)")
    photo_yaw: FloatProperty(name="Yaw", default=0.0, min=-180.0, max=180.0, precision=1,
                             description="Where the camera looked, in degrees to the right of the world image's centre")
    photo_pitch: FloatProperty(name="Pitch", default=0.0, min=-90.0, max=90.0, precision=1,
                               description="How far the camera looked up, in degrees (negative: down)")
    seed: IntProperty(name="Seed", description="Random seed; the same seed and settings give the same image",
                      default=0, min=0, max=MAX_SEED)
    randomize_seed: BoolProperty(name="Randomize", description="Pick a new seed for every generation", default=True)
    variations: IntProperty(name="Variations", default=1, min=1, max=MAX_VARIATIONS,
                            description="How many images one Generate press makes, one after another: random seeds, "
                                        "or with Randomize off the Seed, Seed + 1, ... Each lands in the History; "
                                        "Cancel stops the rest")
    steps: IntProperty(name="Steps", description="Denoising steps", default=BACKEND_DEFAULTS["steps"], min=1, max=500)
    guidance: FloatProperty(name="Guidance", description="Classifier-free guidance scale",
                            default=BACKEND_DEFAULTS["guidance"], min=0.0, max=30.0)
    quality: EnumProperty(name="Quality", items=QUALITY_ITEMS, default=DEFAULT_QUALITY,
                          description="Speed against quality: which views each denoising step runs and how they "
                                      "are kept coherent (the Advanced settings can override it)")
    # The Advanced sub-panel's research controls: what Quality decides unless a method is chosen here.
    sync_method: EnumProperty(name="Synchronisation", items=SYNC_ITEMS, default=SYNC_FROM_QUALITY,
                              description="How the overlapping views are kept coherent")
    # SyncDiffusion's settings: drawn and sent (generation.generate_params) only with SyncDiffusion.
    sync_weight: FloatProperty(name="Coherence Strength", default=DEFAULT_SYNC_WEIGHT, min=0.0, soft_max=40.0,
                               description="How strongly every view is pulled towards the anchor view's look. "
                                           "0 gives MultiDiffusion's result; too high can wash out detail")
    sync_steps: IntProperty(name="Guided Steps", default=10, min=0, max=500,
                            description="Guide only the first steps, where the layout and colours are decided: "
                                        "they give most of the coherence at a fraction of the time. "
                                        "0: guide every step (slowest)")
    sync_fast: BoolProperty(name="Fast Guidance", default=False,
                            description="Approximate the guidance to make it several times faster: decode with the "
                                        "tiny autoencoder madebyollin/taesd (downloaded once, or already in the model "
                                        "cache), reuse the gradient pass's noise prediction instead of predicting again, "
                                        "and compare views at 256 px")
    # SyncSDE's setting: drawn and sent (generation.generate_params) only with SyncSDE. The backend's default is
    # the paper's value for wide images.
    syncsde_lambda: FloatProperty(name="Pull Strength", default=DEFAULT_SYNCSDE_LAMBDA, min=0.0, soft_max=20.0,
                                  description="How strongly every view is pulled towards its neighbours where "
                                              "they overlap after each step. 0: the views are denoised "
                                              "independently; higher ties them together more firmly")
    # Merged attention composes with every method, so it is drawn and sent whatever sync_method is.
    mad: BoolProperty(name="Merged Attention", default=False,
                      description="Let the attention layers see the whole panorama for the first 30% of the steps "
                                  "(MAD, Quattrini et al.; the paper's 15 of 50), which ties distant parts together. "
                                  "Needs more GPU memory, since every view runs in one batch meanwhile")
    # The 360° World's views and per-direction prompts: drawn and sent (generation.generate_params) only in
    # WORLD mode, the backend refuses them for the other layouts.
    view_set: EnumProperty(name="View Set", items=VIEW_SET_ITEMS, default="AUTO",
                           description="Which views of the panorama are denoised together")
    prompt_up: StringProperty(name="Sky Prompt", default="",
                              description="Added to the prompt of the views that look up (45° or more above the "
                                          "horizon), e.g. \"clear blue sky\". Empty: off. The backend refuses it "
                                          "when no view looks up, as with Band on a short image")
    prompt_down: StringProperty(name="Ground Prompt", default="",
                                description="Added to the prompt of the views that look down (45° or more below "
                                            "the horizon), e.g. \"green meadow\". Empty: off. The backend refuses it "
                                            "when no view looks down, as with Band on a short image")
    window: IntProperty(name="Window", description="View size in latent pixels; 0: the model's own size",
                        default=0, min=0, max=256)
    stride: IntProperty(name="Stride", description="Distance between overlapping views in latent pixels; "
                                                   "0: the backend's choice (window / 8 where views overlap). "
                                                   "Set, every step runs every overlapping view (the dense "
                                                   "schedule, whatever the Quality)",
                        default=0, min=0, max=256)
    device: EnumProperty(name="Device", items=DEVICE_ITEMS, default="PREFERENCES")
    memory: EnumProperty(name="Memory", items=MEMORY_ITEMS, default=BACKEND_DEFAULTS["memory"],
                         description="How the backend uses GPU memory; choose Low if a job runs out of memory")
    quantize: EnumProperty(name="Weights", items=QUANTIZE_ITEMS, default=BACKEND_DEFAULTS["quantize"],
                           description="How the backend stores the model's weights; Int8 fits larger models into "
                           "less GPU memory")

    # The world's rotation and strength, and a texture's tiling, are not copied here: the panel draws the
    # SyncSphere nodes' own sockets, so they are live, undoable and saved with the World or material.
    # (Property update callbacks would also crash the bpy 4.2 module at exit.)
    hide_from_camera: BoolProperty(name="Hide from Camera", default=False,
                                   description="The world lights the scene but the camera sees a plain background")
    face_camera: BoolProperty(name="Face the Camera", default=False,
                              description="Rotate the world so the image centre is in front of the active camera")
    # Not sent: how a running World job is shown (blender_addon/scene/preview.py, follow_job).
    preview_in_world: BoolProperty(name="Live Preview in World", default=False,
                                   description="While a 360° World generates, show its preview as the scene's World "
                                               "in the viewport (a temporary World; yours comes back when the job ends)")

    # Lighting (the Lighting sub-panel, 360° World only). hdr ... sun_pitch are sent to the backend
    # (generation.generate_params) when they differ from its defaults; sun_mode is how a result is applied.
    hdr: BoolProperty(name="HDR", default=True,
                      description="Make the World a HDR image: linear values, with the sun (or other lights) "
                                  "expanded into bright discs that cast real shadows, and a Sun lamp or the "
                                  "texture lighting the scene. Off: the plain image, lit like an overcast day")
    exposure: FloatProperty(name="Exposure", default=DEFAULT_EXPOSURE, soft_min=-5.0, soft_max=5.0,
                            description="Scale the HDR image by 2^EV (0: as generated)")
    sun_ratio: FloatProperty(name="Sun Ratio", default=DEFAULT_SUN_RATIO, min=0.1, soft_max=20.0,
                             description="How much brighter the sun's direct light is than the sky's, on a "
                                         "surface facing the sun. Clear days are about 3-10; higher gives "
                                         "darker shadows")
    use_sun_direction: BoolProperty(name="Sun Direction", default=False,
                                    description="Ask for the sun in this direction: the views that see it are "
                                                "prompted with the sun, and if the image still has none there, "
                                                "one is placed there. Off: wherever the image puts it")
    sun_yaw: FloatProperty(name="Yaw", default=0.0, min=-180.0, max=180.0,
                           description="Degrees right of the image centre (the middle of the panorama)")
    sun_pitch: FloatProperty(name="Pitch", default=45.0, min=-90.0, max=90.0,
                             description="Degrees above the horizon")
    sun_mode: EnumProperty(name="Sun", items=SUN_MODE_ITEMS, default="SUN_LAMP",
                           description="How the sun of a HDR World lights the scene; applies to the next "
                                       "World applied, or to this one with Update Lighting")

    history: CollectionProperty(type=SyncSphereHistoryItem)
    history_index: IntProperty(name="History", default=0)


classes = (SyncSphereHistoryItem, SyncSphereSettings)


def register():
    """Register the property groups and attach the settings to every Scene as ``scene.syncsphere``."""
    for cls in classes:
        bpy.utils.register_class(cls)
    bpy.types.Scene.syncsphere = PointerProperty(type=SyncSphereSettings)


def unregister():
    """Remove ``scene.syncsphere`` and unregister the property groups."""
    del bpy.types.Scene.syncsphere
    for cls in reversed(classes):
        bpy.utils.unregister_class(cls)
