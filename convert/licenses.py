"""A model's license as its model card states it: read from a local card or a Hub repo's, to carry into MQwen's."""

from __future__ import annotations

import os
from pathlib import Path

import huggingface_hub
from huggingface_hub import ModelCard

LICENSE_FIELDS = ("license", "license_name", "license_link")


def read_card_license(readme: str | os.PathLike) -> dict[str, str]:
    """The license fields of a model card file, or {} when there is no card or no license in it."""
    if not Path(readme).is_file():
        return {}
    try:
        data = ModelCard.load(readme).data.to_dict()
    except Exception:  # no README, or one without front matter
        return {}
    return {key: data[key] for key in LICENSE_FIELDS if data.get(key)}


def fetch_hub_license(repo_id: str) -> dict[str, str]:
    """The license fields of a Hub repo's model card; {} when offline or absent."""
    try:  # looked up on the module when called, so tests can stand in a local Hub for it
        return read_card_license(huggingface_hub.hf_hub_download(repo_id, "README.md"))
    except Exception:
        return {}
