"""Names after the prompt, as plain Python (no bpy), tested without Blender.

A generation's World, material, images and history item are named after what was asked for, so an artist with
ten worlds can tell them apart: "a sunlit alpine valley with a lake, 360 panorama" gives the title "Sunlit
Alpine Valley Lake" (Worlds, materials, history items) and the slug "sunlit-alpine-valley-lake" (image names,
job folders). ``unique_name`` keeps a new name clear of every name already taken; nothing of the user's is ever
renamed (``blender_addon/scene/results.py`` names only the datablocks a result has just created).
"""

import os
import re

# Words that tell the prompts of one scene apart least: left out of titles and slugs when others remain.
SMALL_WORDS = frozenset({"a", "an", "the", "of", "with", "and", "at", "in", "on", "by", "for", "to", "from",
                         "into", "over", "under", "near", "360", "panorama", "panoramic", "equirectangular", "hdri"})
MAX_WORDS = 4  # at most this many of the prompt's words
MAX_CHARACTERS = 40  # and at most this many characters (a Blender name holds 63 bytes; room for " 12" and ".exr")
UNTITLED = "Untitled"


def prompt_words(prompt):
    """The words a name is made of: the prompt's first MAX_WORDS words (letters and digits, any script) that are
    not SMALL_WORDS, or its first words when all are small; [] for a prompt without words."""
    words = re.findall(r"[^\W_]+", prompt)
    telling = [word for word in words if word.lower() not in SMALL_WORDS] or words
    chosen = []
    for word in telling[:MAX_WORDS]:
        if chosen and len(" ".join(chosen + [word])) > MAX_CHARACTERS:
            break
        chosen.append(word[:MAX_CHARACTERS])
    return chosen


def prompt_title(prompt):
    """A short title for a prompt, e.g. "Sunlit Alpine Valley Lake" (words capitalised; "Untitled" for none)."""
    words = prompt_words(prompt)
    return " ".join(word[:1].upper() + word[1:] for word in words) if words else UNTITLED


def slug(title):
    """A title as a file-name-safe slug: its words in lower case joined by "-" ("Sunlit Alpine Valley Lake 2" ->
    "sunlit-alpine-valley-lake-2"; "untitled" for none)."""
    return "-".join(re.findall(r"[^\W_]+", title.lower())) or UNTITLED.lower()


def prompt_slug(prompt):
    """A short slug for a prompt: its title's (``prompt_title``), e.g. "sunlit-alpine-valley-lake"."""
    return slug(prompt_title(prompt))


def unique_name(name, taken, separator=" "):
    """``name``, or, when it is in ``taken`` (any container of names), the first of "name 2", "name 3", ... that is
    not. A file-like name keeps its extension last: "valley.exr" -> "valley-2.exr" with ``separator`` "-"."""
    if name not in taken:
        return name
    stem, extension = os.path.splitext(name)
    if not re.fullmatch(r"\.[A-Za-z0-9]{2,4}", extension):  # "Mt. Fuji" has no extension
        stem, extension = name, ""
    number = 2
    while f"{stem}{separator}{number}{extension}" in taken:
        number += 1
    return f"{stem}{separator}{number}{extension}"


def image_name(file_path, slug):
    """The name of an image loaded from a job's file: the file's name with the backend's fixed "panorama" put in
    terms of the prompt: ".../panorama.exr" -> "sunlit-alpine-valley-lake.exr", "panorama_sky.exr" ->
    "sunlit-alpine-valley-lake_sky.exr"; a file of another name keeps it."""
    return os.path.basename(file_path).replace("panorama", slug, 1)
