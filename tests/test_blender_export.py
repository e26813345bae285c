"""Export Cubemap in headless Blender: the built extension, installed and enabled, turns the scene's
SyncSphere World into cube map files with the real backend command, and says in one sentence why not
when it cannot. No model is needed: the World is made from an EXR this test writes."""

import os

import numpy as np
import pytest

pytest.importorskip("bpy")
pytest.importorskip("OpenEXR")  # the backend's cubemap command runs in this interpreter

from backend.sphere.geometry import FACES, equirect_to_cube_faces, faces_to_dice  # noqa: E402
from backend.products.images import read_exr, write_exr  # noqa: E402
from test_blender_generate import extension_zip, run_blender  # noqa: E402,F401  (extension_zip: a fixture)

SCRIPT = """
import importlib, traceback
W = importlib.import_module(ADDON + ".blender_addon.scene.world")
export = importlib.import_module(ADDON + ".operators.export")
# Until operators/__init__.py lists export.classes, the test registers the operator itself.
registered_here = not export.SYNCSPHERE_OT_export_cubemap.is_registered
if registered_here:
    bpy.utils.register_class(export.SYNCSPHERE_OT_export_cubemap)
report = {"registered_here": registered_here}


def run(**props):
    '''The operator's result, or the error it reported (errors raise in background mode).'''
    try:
        return sorted(bpy.ops.syncsphere.export_cubemap(**props))
    except RuntimeError as error:
        return str(error)


report["no_world"] = run()
W.apply_world(bpy.context, EXR)
report["default"] = run()
report["chosen"] = run(directory=CHOSEN, face_size=8)
python_path, prefs.python_path = prefs.python_path, ""
report["no_interpreter"] = run()
prefs.python_path = python_path
with open(EXR, "wb") as f:
    f.write(b"not an EXR any more")
report["backend_failure"] = run()
os.remove(EXR)
report["missing_image"] = run()
if registered_here:
    bpy.utils.unregister_class(export.SYNCSPHERE_OT_export_cubemap)
print(json.dumps(report))
"""


def test_export_cubemap_writes_the_faces_and_the_cross_and_explains_failures(extension_zip, tmp_path):
    image = np.random.default_rng(0).random((32, 64, 3)).astype(np.float32) * 4
    exr = tmp_path / "world" / "panorama.exr"
    exr.parent.mkdir()
    write_exr(str(exr), image)
    chosen = tmp_path / "chosen"
    script = f"EXR = {str(exr)!r}\nCHOSEN = {str(chosen)!r}\n" + SCRIPT
    report = run_blender(script, extension_zip, "no model needed", tmp_path)

    assert "not a SyncSphere world" in report["no_world"]
    assert report["default"] == ["FINISHED"] and report["chosen"] == ["FINISHED"]
    # Default: a cubemap folder next to the World's EXR, faces W/4; they are the backend's faces exactly.
    default = exr.parent / "cubemap"
    assert sorted(os.listdir(default)) == sorted([f"face_{face}.exr" for face in FACES] + ["cubemap_dice.exr"])
    faces = {face: read_exr(str(default / f"face_{face}.exr")) for face in FACES}
    expected = equirect_to_cube_faces(image, 16)
    for face in FACES:
        np.testing.assert_array_equal(faces[face], expected[face])
    np.testing.assert_array_equal(read_exr(str(default / "cubemap_dice.exr")), faces_to_dice(faces))
    # A chosen folder and face size.
    assert read_exr(str(chosen / "cubemap_dice.exr")).shape == (24, 32, 3)

    assert "No backend Python interpreter is set" in report["no_interpreter"]
    assert "Exporting the cubemap failed: Could not read the panorama" in report["backend_failure"]
    assert "no longer exists" in report["missing_image"]
    for key in ("no_world", "no_interpreter", "backend_failure", "missing_image"):
        message = report[key].strip().splitlines()
        assert len(message) == 1, report[key]  # one line: the sentence, not a traceback
