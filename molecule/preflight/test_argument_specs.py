"""Every role default is documented in the role's meta/argument_specs.yml, with the same value.

`ansible-doc -t role` and the role's argument validation read the specs; defaults/main.yml is
what runs. A default added to one and not the other, or changed in one only, fails here (the
check prometheus-community/ansible runs in its CI). Templated defaults are documented in words,
so only their presence is compared.

    python -m pytest molecule/preflight/test_argument_specs.py
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

ROLES = Path(__file__).resolve().parents[2] / "roles"
WITH_DEFAULTS = sorted(p.parent.parent.name for p in ROLES.glob("*/defaults/main.yml"))


def _load(role: str) -> tuple[dict[str, Any], dict[str, Any]]:
    defaults = yaml.safe_load((ROLES / role / "defaults" / "main.yml").read_text()) or {}
    specs = yaml.safe_load((ROLES / role / "meta" / "argument_specs.yml").read_text())
    return defaults, specs["argument_specs"]["main"]["options"]


@pytest.mark.parametrize("role", WITH_DEFAULTS)
def test_every_default_is_documented_with_its_value(role: str) -> None:
    defaults, options = _load(role)
    undocumented = sorted(set(defaults) - set(options))
    assert not undocumented, f"{role}: defaults without an argument spec: {undocumented}"
    for name, value in defaults.items():
        assert "default" in options[name], f"{role}: {name} has no default in its spec"
        if isinstance(value, str) and "{{" in value:
            continue
        assert options[name]["default"] == value, (
            f"{role}: {name} defaults to {value!r}, its spec says {options[name]['default']!r}")


@pytest.mark.parametrize("role", WITH_DEFAULTS)
def test_every_documented_default_exists(role: str) -> None:
    defaults, options = _load(role)
    phantom = sorted(name for name, spec in options.items()
                     if "default" in spec and name not in defaults)
    assert not phantom, f"{role}: specs give defaults that defaults/main.yml lacks: {phantom}"
