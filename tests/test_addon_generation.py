"""What a Generate press sends (blender_addon/core/generation.py), without Blender: the scene settings become
the protocol's generate params, and the backend's own request validation (backend/request.py, standard
library only) accepts them and reads them as meant.
"""

import dataclasses
import itertools
import json
import types

import pytest

from backend.errors import BadRequest
from backend.request import DEFAULT_SCHEDULES, GenerateRequest
from syncsphere.blender_addon.core import generation

SYNC_OPTIONS = ("sync_weight", "sync_steps", "sync_fast")


def settings(**overrides):
    """A stand-in for scene.syncsphere with the defaults of blender_addon/scene/properties.py."""
    values = dict(prompt="a harbour at dusk", style_prompt="", negative_prompt="fog", mode="WORLD", resolution="DRAFT", seed=3,
                  randomize_seed=False, steps=30, guidance=6.5, quality="BALANCED", sync_method="AUTO", window=0, stride=0,
                  device="PREFERENCES", sync_weight=20.0, sync_steps=10, sync_fast=False, syncsde_lambda=5.0,
                  mad=False, view_set="AUTO", prompt_up="", prompt_down="", hdr=True, exposure=0.0, sun_ratio=6.0,
                  use_sun_direction=False, sun_yaw=0.0, sun_pitch=45.0, memory="auto", quantize="none", custom_width=2048,
                  custom_height=1024, start_image_source="NONE", start_image_path="", strength=0.8,
                  extend_photo=False, photo_path="", photo_fov=60.0, photo_yaw=0.0, photo_pitch=0.0)
    values.update(overrides)
    return types.SimpleNamespace(**values)


def params_of(**overrides):
    return generation.generate_params(settings(**overrides), 42, model="some/model", device="cpu")


def backend_request(params, tmp_path):
    """The backend's reading of ``params``, validated as the worker validates a generate request."""
    return GenerateRequest.from_params({**params, "out": str(tmp_path / "job")}).validated()


def test_the_basic_params():
    assert params_of(quality="BEST", sync_method="MULTIDIFFUSION") == {
        "prompt": "a harbour at dusk", "negative_prompt": "fog", "layout": "equirect", "width": 1024, "height": 512,
        "steps": 30, "guidance": 6.5, "seed": 42, "model": "some/model", "device": "cpu", "memory": "auto",
        "schedule": "dense"}
    tile = params_of(mode="TILE", resolution="HIGH", window=48, stride=12)
    assert (tile["layout"], tile["width"], tile["height"], tile["window"], tile["stride"]) == ("tile", 2048, 2048, 48, 12)


def test_the_addons_defaults_are_what_the_backend_does_when_nothing_is_sent(tmp_path):
    """The defaults the settings start from (blender_addon/scene/properties.py takes them from generation) are
    the backend's own: a request without those params reads them back."""
    from syncsphere.blender_addon.core import model_list

    unsent = backend_request({"prompt": "x", "sync": "syncdiffusion"}, tmp_path)
    assert generation.DEFAULT_SYNC_WEIGHT == unsent.sync_weight  # decided by the backend from its default loss
    request = backend_request({"prompt": "x"}, tmp_path)
    assert (generation.DEFAULT_SYNCSDE_LAMBDA, generation.DEFAULT_EXPOSURE, generation.DEFAULT_SUN_RATIO) == \
        (request.syncsde_lambda, request.exposure, request.sun_ratio)
    assert {name: generation.BACKEND_DEFAULTS[name] for name in ("steps", "guidance", "memory", "sync", "model")} == \
        {"steps": request.steps, "guidance": request.guidance, "memory": request.memory, "sync": request.sync,
         "model": request.model}
    assert model_list.DEFAULT_MODEL == request.model


@pytest.mark.parametrize("memory", ["auto", "full", "low"])
def test_the_memory_mode_is_sent_and_the_backend_reads_it(memory, tmp_path):
    """Every Memory item of the settings is one of the backend's --memory modes, sent as is."""
    from backend.request import MEMORY_MODES

    assert memory in MEMORY_MODES
    params = params_of(memory=memory)
    assert params["memory"] == memory
    assert backend_request(params, tmp_path).memory == memory


def test_the_weights_choice_is_sent_only_when_quantised_and_the_backend_reads_it(tmp_path):
    """Weights: Full Precision sends nothing (the backend's default), Int8 sends ``quantize``; each item is one of
    the backend's --quantize modes."""
    from backend.request import QUANTIZE_MODES
    from syncsphere.blender_addon.core.panel_words import CONTROLS

    assert list(CONTROLS["--quantize"].values) == list(QUANTIZE_MODES)
    assert "quantize" not in params_of(quantize="none")
    params = params_of(quantize="int8")
    assert params["quantize"] == "int8" and backend_request(params, tmp_path).quantize == "int8"


@pytest.mark.parametrize("options", [{}, {"sync_weight": 5.0, "sync_steps": 0, "sync_fast": True}])
def test_multidiffusion_sends_nothing_sync_related(options, tmp_path):
    """Whatever SyncDiffusion's options are set to, MultiDiffusion sends none of them (the backend would
    refuse them) and not even ``sync``: the backend's default."""
    params = params_of(sync_method="MULTIDIFFUSION", **options)
    assert not [name for name in params if name.startswith("sync")], params
    request = backend_request(params, tmp_path)
    assert request.sync == "multidiffusion"


def test_syncdiffusion_sends_its_method_weight_and_guided_steps(tmp_path):
    params = params_of(sync_method="SYNCDIFFUSION", sync_weight=12.5, sync_steps=7)
    assert {name: value for name, value in params.items() if name.startswith("sync")} == \
        {"sync": "syncdiffusion", "sync_weight": 12.5, "sync_steps": 7}
    assert type(params["sync_weight"]) is float and type(params["sync_steps"]) is int
    request = backend_request(params, tmp_path)
    assert (request.sync, request.sync_weight, request.sync_steps) == ("syncdiffusion", 12.5, 7)
    # The exact, slow path: the model's own VAE, a second prediction, the loss at the view's size.
    assert (request.sync_decoder, request.sync_reuse_eps, request.sync_loss_size) == ("vae", False, None)


def test_syncdiffusion_with_zero_guided_steps_guides_every_step(tmp_path):
    """Guided Steps 0 means every step: sync_steps is left out (the backend's null), never sent as 0, which
    the backend would read as no guided step at all."""
    params = params_of(sync_method="SYNCDIFFUSION", sync_steps=0)
    assert "sync_steps" not in params and params["sync"] == "syncdiffusion"
    assert backend_request(params, tmp_path).sync_steps is None


def test_syncdiffusion_weight_zero_is_sent_as_zero(tmp_path):
    params = params_of(sync_method="SYNCDIFFUSION", sync_weight=0.0)
    assert params["sync_weight"] == 0.0
    assert backend_request(params, tmp_path).sync_weight == 0.0  # not replaced by the loss's default weight


def test_fast_guidance_adds_the_backends_fast_path(tmp_path):
    params = params_of(sync_method="SYNCDIFFUSION", sync_fast=True)
    assert {name: value for name, value in params.items() if name.startswith("sync")} == \
        {"sync": "syncdiffusion", "sync_weight": 20.0, "sync_steps": 10,
         "sync_decoder": "taesd", "sync_reuse_eps": True, "sync_loss_size": 256}
    request = backend_request(params, tmp_path)
    assert (request.sync_decoder, request.sync_reuse_eps, request.sync_loss_size) == ("taesd", True, 256)


def test_every_sync_method_offered_maps_to_a_backend_method(tmp_path):
    """The mapping covers the backend's methods (and only them), and each is accepted as sent, with or
    without merged attention."""
    from backend.request import SYNC_METHODS

    assert sorted(generation.SYNC_OF_METHOD.values()) == sorted(SYNC_METHODS)
    for method in generation.SYNC_OF_METHOD:
        for mad in (False, True):
            request = backend_request(params_of(sync_method=method, sync_fast=True, mad=mad), tmp_path)
            assert request.sync == generation.SYNC_OF_METHOD[method]


def test_syncsde_sends_its_method_and_pull_strength_only(tmp_path):
    """SyncSDE sends ``sync`` and ``syncsde_lambda``, and none of SyncDiffusion's options, however they are
    set: the backend refuses sync_* without --sync syncdiffusion."""
    params = params_of(sync_method="SYNCSDE", syncsde_lambda=8.5, sync_weight=12.5, sync_steps=0, sync_fast=True)
    assert {name: value for name, value in params.items() if name.startswith("sync")} == \
        {"sync": "syncsde", "syncsde_lambda": 8.5}
    assert type(params["syncsde_lambda"]) is float
    assert "fusion" not in params  # the backend refuses any fusion but auto with SyncSDE
    request = backend_request(params, tmp_path)
    assert (request.sync, request.syncsde_lambda, request.resolved_fusion) == ("syncsde", 8.5, "own")
    # The backend's own defaults for what the add-on does not offer.
    assert (request.syncsde_compose, request.syncsde_open_chain) == ("paper", False)


def test_syncsde_pull_strength_zero_is_sent_as_zero(tmp_path):
    """0 is a real choice (independent views), not "unset"."""
    params = params_of(sync_method="SYNCSDE", syncsde_lambda=0.0)
    assert params["syncsde_lambda"] == 0.0
    assert backend_request(params, tmp_path).syncsde_lambda == 0.0


@pytest.mark.parametrize("method", ["MULTIDIFFUSION", "SYNCDIFFUSION"])
def test_other_methods_never_send_the_pull_strength(method, tmp_path):
    params = params_of(sync_method=method, syncsde_lambda=9.0)
    assert not [name for name in params if name.startswith("syncsde")], params
    backend_request(params, tmp_path)


def test_the_backend_would_refuse_syncsde_and_syncdiffusion_options_crossed(tmp_path):
    """Why each method sends only its own options."""
    with pytest.raises(BadRequest, match="only applies to SyncSDE"):
        backend_request({**params_of(sync_method="SYNCDIFFUSION"), "syncsde_lambda": 8.0}, tmp_path)
    with pytest.raises(BadRequest, match="only applies to SyncDiffusion"):
        backend_request({**params_of(sync_method="SYNCSDE"), "sync_weight": 20.0}, tmp_path)


MAD_OPTIONS = ("mad_steps", "mad_blocks")


@pytest.mark.parametrize("steps,mad_steps", [(50, 15), (2, 1), (1, 1), (10, 3), (500, 150)])
def test_merged_attention_runs_for_the_first_30_percent_of_the_steps(steps, mad_steps, tmp_path):
    """The paper's 15 of 50, scaled to the steps asked for, and at least one step."""
    params = params_of(mad=True, steps=steps)
    assert {name: params[name] for name in MAD_OPTIONS if name in params} == {"mad_steps": mad_steps}
    assert type(params["mad_steps"]) is int
    request = backend_request(params, tmp_path)
    assert (request.mad_steps, request.mad_blocks) == (mad_steps, "down,mid,up")


def test_merged_attention_off_sends_nothing(tmp_path):
    params = params_of(mad=False, steps=50)
    assert not set(params) & set(MAD_OPTIONS), params
    assert backend_request(params, tmp_path).mad_steps == 0  # the backend's off


@pytest.mark.parametrize("method", ["SYNCDIFFUSION", "SYNCSDE"])
def test_merged_attention_composes_with_the_other_methods(method, tmp_path):
    params = params_of(sync_method=method, mad=True, steps=50)
    assert params["mad_steps"] == 15 and params["sync"] == generation.SYNC_OF_METHOD[method]
    request = backend_request(params, tmp_path)
    assert (request.sync, request.mad_steps) == (generation.SYNC_OF_METHOD[method], 15)


def test_the_backend_would_refuse_sync_options_with_multidiffusion(tmp_path):
    """Why MultiDiffusion sends nothing: the backend refuses any SyncDiffusion option without it."""
    with pytest.raises(BadRequest, match="only applies to SyncDiffusion"):
        backend_request({**params_of(sync_method="MULTIDIFFUSION"), "sync_weight": 20.0}, tmp_path)


VIEW_OPTIONS = ("views", "prompt_up", "prompt_down")


def test_a_world_with_the_automatic_view_set_sends_no_views(tmp_path):
    """AUTO leaves --views out: the backend picks band+poles or band once it knows the model's window."""
    params = params_of(mode="WORLD", view_set="AUTO")
    assert not set(params) & set(VIEW_OPTIONS), params
    request = backend_request(params, tmp_path)
    assert (request.layout, request.views, request.prompt_up, request.prompt_down) == ("equirect", None, "", "")


@pytest.mark.parametrize("view_set,views", [("BAND", "band"), ("BAND_POLES", "band+poles"), ("RING", "ring"),
                                            ("CUBE", "cube")])
def test_a_world_sends_the_chosen_view_set(view_set, views, tmp_path):
    params = params_of(mode="WORLD", resolution="STANDARD", view_set=view_set)
    assert params["views"] == views and "prompt_up" not in params and "prompt_down" not in params
    assert backend_request(params, tmp_path).views == views  # already the backend's canonical name


def test_every_view_set_offered_maps_to_a_backend_view_set():
    """The mapping covers the backend's view sets (and only them); AUTO is the one left out."""
    from backend.request import VIEW_SETS

    assert sorted(generation.VIEWS_OF_SET.values()) == sorted(VIEW_SETS)
    assert "AUTO" not in generation.VIEWS_OF_SET


@pytest.mark.parametrize("mode", ["TILE", "WIDE"])
def test_tiles_and_wide_images_never_send_views_or_direction_prompts(mode, tmp_path):
    """A view set and sky / ground prompts left set from a World are not sent: the backend refuses them for
    any layout but equirect."""
    params = params_of(mode=mode, view_set="BAND_POLES", prompt_up="clear blue sky", prompt_down="green meadow")
    assert not set(params) & set(VIEW_OPTIONS), params
    request = backend_request(params, tmp_path)
    assert (request.views, request.prompt_up, request.prompt_down) == (None, "", "")
    with pytest.raises(BadRequest, match="only to --layout equirect"):  # why they are left out
        backend_request({**params, "views": "band+poles"}, tmp_path)


def test_a_world_sends_its_sky_and_ground_prompts_when_set(tmp_path):
    params = params_of(mode="WORLD", view_set="BAND_POLES", prompt_up="  clear blue sky ")
    assert (params["views"], params["prompt_up"]) == ("band+poles", "clear blue sky")
    assert "prompt_down" not in params  # empty: off
    request = backend_request(params, tmp_path)
    assert (request.prompt_up, request.prompt_down) == ("clear blue sky", "")
    both = params_of(mode="WORLD", prompt_up="sky", prompt_down="cobblestones")
    assert "views" not in both and (both["prompt_up"], both["prompt_down"]) == ("sky", "cobblestones")
    assert backend_request(both, tmp_path).prompt_down == "cobblestones"


def test_blank_sky_and_ground_prompts_are_not_sent():
    params = params_of(mode="WORLD", prompt_up="   ", prompt_down="\t")
    assert "prompt_up" not in params and "prompt_down" not in params


@pytest.mark.parametrize("syncdiffusion,expected", [
    ({"loss_backbone": "vgg16 random (ImageNet weights not cached and downloads are off)", "loss_pretrained": False}, 1),
    ({"loss_backbone": "vgg16 pretrained", "loss_pretrained": True}, 0),
    (None, 0),
])
def test_a_random_loss_network_is_reported_to_the_artist(tmp_path, syncdiffusion, expected):
    metadata = tmp_path / "metadata.json"
    metadata.write_text(json.dumps({"sync": "syncdiffusion" if syncdiffusion else "multidiffusion",
                                    **({"syncdiffusion": syncdiffusion} if syncdiffusion else {})}))
    warnings = generation.result_warnings(str(metadata))
    assert len(warnings) == expected
    if expected:
        assert "random network" in warnings[0] and "online access" in warnings[0]
    assert generation.result_warnings(str(tmp_path / "missing.json")) == []


# --- Quality -------------------------------------------------------------------------------------------

QUALITIES = ("FAST", "BALANCED", "BEST")
SYNC_METHODS = ("AUTO", "MULTIDIFFUSION", "SYNCDIFFUSION", "SYNCSDE")
VIEW_SETS = ("AUTO", "BAND", "BAND_POLES", "RING", "CUBE")


def test_the_quality_table_is_the_measured_mapping_with_balanced_the_default():
    """The one table (the mapping may change with the measurements; then this test with it)."""
    assert [identifier for identifier, _, _, _ in generation.QUALITIES] == list(QUALITIES)
    assert generation.QUALITY_PARAMS == {
        "FAST": {"schedule": "shifted"},
        "BALANCED": {},  # the backend's --schedule auto: its measured default per layout
        "BEST": {"schedule": "dense"},
    }
    assert generation.DEFAULT_QUALITY == "BALANCED"
    assert generation.QUALITY_NAMES == {"FAST": "Fast", "BALANCED": "Balanced", "BEST": "Best"}
    fields = {field.name for field in dataclasses.fields(GenerateRequest)}
    for identifier, name, description, params in generation.QUALITIES:
        assert set(params) <= fields and description.strip()
    # The descriptions say what each costs.
    descriptions = {identifier: description for identifier, _, description, _ in generation.QUALITIES}
    assert "fastest" in descriptions["FAST"] and "measured" in descriptions["BALANCED"]
    assert "slowest" in descriptions["BEST"]


@pytest.mark.parametrize("quality", QUALITIES)
@pytest.mark.parametrize("mode", ["WORLD", "TILE", "WIDE"])
def test_with_the_default_advanced_settings_each_quality_sends_all_its_fields(quality, mode, tmp_path):
    params = params_of(quality=quality, mode=mode)
    assert {name: params[name] for name in generation.QUALITY_PARAMS[quality]} == generation.QUALITY_PARAMS[quality]
    request = backend_request(params, tmp_path)
    table = generation.QUALITY_PARAMS[quality]
    assert params.get("schedule") == table.get("schedule")
    assert request.resolved_schedule == expected_schedule(quality, "AUTO", mode, "AUTO", 0)
    assert request.sync == table.get("sync", "multidiffusion")
    if request.sync == "syncdiffusion":  # only the guided steps are Quality's; the weight is the backend's default
        assert (request.sync_steps, request.sync_weight) == (table["sync_steps"], generation.DEFAULT_SYNC_WEIGHT)


def expected_schedule(quality, sync_method, mode, view_set, stride):
    """The schedule the add-on promises to run (docs/blender.md, "Quality"): Quality's, dense where an Advanced
    setting needs overlapping windows; Balanced's is the backend's measured default for the layout."""
    overlapping = stride or sync_method == "SYNCSDE" or (mode == "WORLD" and view_set in ("RING", "CUBE"))
    schedule = generation.QUALITY_PARAMS[quality].get("schedule", "auto")
    if schedule == "auto":
        schedule = DEFAULT_SCHEDULES[generation.LAYOUT_OF_MODE[mode]]
    return "dense" if schedule == "shifted" and overlapping else schedule


@pytest.mark.parametrize("quality", QUALITIES)
@pytest.mark.parametrize("sync_method", SYNC_METHODS)
def test_no_combination_the_panel_offers_is_refused(quality, sync_method, tmp_path):
    """Every Quality with every Advanced choice that meets the schedule (method, view set, stride, merged
    attention) and every mode gives a request the backend's validation accepts, running the schedule and the
    method promised: Quality's schedule unless the others need overlapping windows, the Advanced method when
    one is chosen, else Quality's."""
    for mode, view_set, stride, mad, fast in itertools.product(("WORLD", "TILE", "WIDE"), VIEW_SETS, (0, 8),
                                                               (False, True), (False, True)):
        case = dict(quality=quality, sync_method=sync_method, mode=mode, view_set=view_set, stride=stride, mad=mad,
                    sync_fast=fast, resolution="STANDARD")
        params = params_of(**case)
        request = backend_request(params, tmp_path)  # raises BadRequest for a refused combination
        schedule = expected_schedule(quality, sync_method, mode, view_set, stride)
        assert request.resolved_schedule == schedule, case
        assert params.get("schedule") == (None if quality == "BALANCED" else schedule), case
        table_sync = generation.QUALITY_PARAMS[quality].get("sync", "multidiffusion")
        assert request.sync == (table_sync if sync_method == "AUTO" else generation.SYNC_OF_METHOD[sync_method]), case
        if sync_method == "AUTO" and request.sync == "syncdiffusion":
            # Quality's SyncDiffusion, never mixed with the Advanced SyncDiffusion options.
            assert (request.sync_steps, request.sync_decoder) == (generation.QUALITY_PARAMS[quality]["sync_steps"], "vae")
        assert "fusion" not in params  # the add-on never sends one, so it never meets the shifted schedule


@pytest.mark.parametrize("change,refusal", [
    ({"stride": 8}, "--stride"),
    ({"sync_method": "SYNCSDE"}, "SyncSDE"),
    ({"view_set": "RING"}, "ring view set"),
    ({"view_set": "CUBE"}, "cube view set"),
])
def test_why_those_settings_make_the_schedule_dense(change, refusal, tmp_path):
    """Each setting that turns Fast's schedule dense is one the backend refuses with an explicit shifted."""
    params = params_of(quality="FAST", **change)
    assert params["schedule"] == "dense"
    with pytest.raises(BadRequest, match=refusal):
        backend_request({**params, "schedule": "shifted"}, tmp_path)


def test_a_method_chosen_in_advanced_replaces_qualitys_and_keeps_its_schedule(tmp_path):
    """A method chosen in Advanced sends its own options, never a mix with Quality's, and the shifted schedule
    stays where the method allows it."""
    plain = params_of(quality="FAST", sync_method="MULTIDIFFUSION")
    assert plain["schedule"] == "shifted" and not [name for name in plain if name.startswith("sync")]
    own = params_of(quality="FAST", sync_method="SYNCDIFFUSION", sync_weight=12.5, sync_steps=0)
    assert own["schedule"] == "shifted"
    assert {name: value for name, value in own.items() if name.startswith("sync")} == \
        {"sync": "syncdiffusion", "sync_weight": 12.5}
    assert backend_request(own, tmp_path).sync_steps is None  # every step, as the Advanced option says


def test_the_panel_notes_when_advanced_settings_make_the_schedule_dense():
    for quality in QUALITIES:
        assert generation.schedule_note(settings(quality=quality)) is None
        assert generation.schedule_note(settings(quality=quality, sync_method="SYNCDIFFUSION")) is None
    for change in ({"stride": 8}, {"sync_method": "SYNCSDE"}, {"view_set": "CUBE"}):
        assert "Dense" in generation.schedule_note(settings(quality="FAST", **change))
        assert generation.schedule_note(settings(quality="BEST", **change)) is None  # dense anyway
    # A tile has no view set: a Ring left set from a World does not make it dense.
    assert generation.schedule_note(settings(quality="FAST", mode="TILE", view_set="RING")) is None


@pytest.mark.parametrize("metadata,summary", [
    ({"schedule": "shifted", "views_per_step": {"mean": 2.5, "min": 2, "max": 3}},
     "Shifted schedule, 2.5 views per step (2-3)"),
    ({"schedule": "dense", "views_per_step": {"mean": 16.0, "min": 16, "max": 16}}, "Dense schedule, 16 views per step"),
    ({"schedule": "shifted", "views_per_step": {"mean": 4.3333333, "min": 4, "max": 6}},
     "Shifted schedule, 4.3 views per step (4-6)"),
    ({"schedule": "dense", "views_per_step": {"mean": "?"}}, "Dense schedule"),
    ({"sync": "multidiffusion"}, ""),  # a job from before the schedules
    ([], ""),
])
def test_the_history_says_how_a_job_ran_from_its_metadata(metadata, summary, tmp_path):
    path = tmp_path / "metadata.json"
    path.write_text(json.dumps(metadata))
    assert generation.run_summary(str(path)) == summary
    assert generation.run_summary(str(tmp_path / "missing.json")) == generation.run_summary(None) == ""
