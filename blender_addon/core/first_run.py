"""The first run, as plain Python (no bpy): what an artist must do before Generate can work, in order.

Before the first image two things must be in place: a backend Python (the process that runs Stable Diffusion;
``backend_command``, ``backend_setup``) and the model Generate uses (the preferences' Default Model, installed
in the model cache; ``model_list``). ``first_run_steps`` turns what is known of both into the steps still to do,
in the order the artist needs them: the backend first (without it nothing can be listed or downloaded), then the
model, with its size and the download's progress, then Generate. ``panels/first_run.py`` draws them at the top
of the main panel; with nothing left to do it draws nothing.
"""

import dataclasses

from .backend_command import interpreter_error
from .model_list import DEFAULT_MODEL, format_size, looks_like_path

# What downloading a model fetches, for the models whose size is known before anything is downloaded (the
# files the engine loads; backend/engine/model_manager.py: "Stable Diffusion 2 base is about 5.2 GB").
# fp16 weights are half of that: every weight is 2 bytes instead of 4, and the configs are tiny.
DOWNLOAD_BYTES = {DEFAULT_MODEL: 5_200_000_000}

# Where Blender's online access is switched on, for the steps that download.
ONLINE_ACCESS = "Preferences > System > Network > Allow Online Access"


@dataclasses.dataclass(frozen=True)
class Action:
    """A button of a step: the operator ``operator`` (its bl_idname), labelled ``text`` with ``icon``, its
    ``properties`` ((name, value) pairs) set before it runs."""

    operator: str
    text: str
    icon: str
    properties: tuple = ()


@dataclasses.dataclass(frozen=True)
class Step:
    """One thing to do before Generate works.

    title: "1. Set up the backend", numbered in order. text: one or more sentences saying what and why.
    actions: the buttons that do it. enabled: False while an earlier step must be done first (shown, greyed).
    progress: 0..1 while it runs (a download), else None; progress_text: the bar's text ("1.2 / 5.2 GB").
    problem: the sentence of the last attempt's failure, or "".
    """

    title: str
    text: str
    actions: tuple = ()
    enabled: bool = True
    progress: float | None = None
    progress_text: str = ""
    problem: str = ""


def download_size_text(model_id, fp16=False):
    """"about 5.2 GB" (about 2.6 GB with ``fp16``) for a model in DOWNLOAD_BYTES, else "" (not known before it
    starts)."""
    size = DOWNLOAD_BYTES.get(model_id)
    if size is None:
        return ""
    return f"about {format_size(size // 2 if fp16 else size)}"


def first_run_steps(*, python, online, listed, listing_error, models, model, download, fp16=False, addon_module=""):
    """The steps still to do before Generate works, in order; [] when there are none.

    python: the backend Python set in the preferences ("" when none), usable when
        ``backend_command.interpreter_error`` finds nothing wrong with it. online: Blender's online access is on. listed / listing_error / models: what
        ``model_list`` knows of the installed models (``has_listed``, ``listing_error``, ``cached_models``).
    model: the model Generate uses (the preferences' Default Model). download: ``model_list.current_download()``.
    fp16: the preferences' fp16 box, which the Download operator follows. addon_module: the add-on's module
        name, for the button that opens its preferences.
    """
    steps = []
    backend_problem = interpreter_error(python)
    if backend_problem is not None:
        steps.append(_backend_step(python, backend_problem, online, addon_module))
    model_step = _model_step(backend_ready=backend_problem is None, online=online, listed=listed,
                             listing_error=listing_error, models=models, model=model.strip(), download=download,
                             fp16=fp16)
    if model_step is not None:
        steps.append(model_step)
    if not steps:
        return []
    steps.append(Step("Generate", "Then type a prompt and press Generate."))
    return [dataclasses.replace(step, title=f"{number}. {step.title}") for number, step in enumerate(steps, 1)]


def _backend_step(python, problem, online, addon_module):
    """Set Up Backend, or choose a Python in the preferences: ``problem`` says what is wrong with ``python``."""
    if not python.strip():  # nothing set yet: the usual first run
        text = ("SyncSphere runs Stable Diffusion in a Python of its own. Set Up Backend installs one (several GB), "
                "or choose a Python that has the backend's requirements in the preferences.")
    else:
        text = f"{problem}. Set Up Backend installs one, or choose another in the preferences."
    if not online:
        text += f" Setting it up downloads, so it needs {ONLINE_ACCESS}."
    actions = (Action("syncsphere.setup_backend", "Set Up Backend", "IMPORT"),)
    if addon_module:
        actions += (Action("preferences.addon_show", "Preferences", "PREFERENCES", (("module", addon_module),)),)
    return Step("Set up the backend", text, actions)


def _model_step(*, backend_ready, online, listed, listing_error, models, model, download, fp16):
    """The model step, or None when the model is installed, is a local path (not downloadable), or the models
    are still being listed."""
    if not model or looks_like_path(model):
        return None
    size = download_size_text(model, fp16)
    sized = f"{model} ({size})" if size else model
    if not backend_ready:
        return Step("Download a model", f"Then the model Generate uses, {sized}: its download is offered here once "
                                        "the backend is set up.", enabled=False)
    if not listed:
        if not listing_error:
            return None  # listed in the background right now (operators/models.py)
        return Step("Find the installed models", f"The installed models could not be listed: {listing_error}",
                    (Action("syncsphere.refresh_models", "Try Again", "FILE_REFRESH"),))
    installed = {entry.id: entry for entry in models}
    entry = installed.get(model)
    if entry is not None and entry.complete:
        return None
    if download is not None and not download.finished:
        if download.model_id == model:
            return Step("Download a model", f"Downloading {sized}, the model Generate uses.",
                        (Action("syncsphere.cancel_model_download", "Cancel", "CANCEL"),),
                        progress=download.fraction, progress_text=download.status_text())
        return Step("Download a model", f"{download.model_id} is downloading; {model}'s download can start once it "
                                        "has finished (one at a time).",
                    progress=download.fraction, progress_text=download.status_text())
    if entry is not None:  # partial: an interrupted download, resumed where it stopped
        text = f"{model} is partly downloaded ({entry.state_text}): Resume fetches the rest."
        button = "Resume"
    else:
        text = f"Download {sized}, the model Generate uses."
        button = "Download"
    others = [other for other in models if other.complete and other.id != model]
    if others:
        text += " Or pick an installed model in the Model menu below."
    if not online:
        text += f" Downloading needs {ONLINE_ACCESS}."
    failed = download is not None and download.model_id == model and download.state == "error"
    return Step("Download a model", text,
                (Action("syncsphere.download_model", button, "IMPORT", (("model_id", model),)),),
                problem=download.error if failed else "")
