"""Configuration: validation errors name the bad key; env overrides; the documented example is complete."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from pydantic import BaseModel

from dicom_node.config import NodeConfig, load_config
from dicom_node.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "config.example.toml"


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "node.toml"
    p.write_text(text)
    return p


def test_defaults_are_valid() -> None:
    cfg = load_config()
    assert cfg.node.ae_title == "SPINEMED"
    assert cfg.model.backend == "demo"
    assert {r.name for r in cfg.routing.rules} == {"spine MR", "spine CT", "spine radiograph"}


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[node]\nport = 70000\n", "node.port"),
        ("[node]\nae_titel = 'X'\n", "node.ae_titel: unknown key"),
        ("[node]\nae_title = 'A\\\\B'\n", "node.ae_title"),
        ("[node]\nae_title = 'ABCDEFGHIJKLMNOPQ'\n", "node.ae_title"),
        ("[[destinations]]\nname='p'\nae_title='P'\nhost='h'\nport=0\n", "destinations.0.port"),
        (
            "[[destinations]]\nname='p'\nae_title='P'\nhost='h'\nport=104\n"
            "[[destinations]]\nname='p'\nae_title='Q'\nhost='h'\nport=105\n",
            "duplicate name",
        ),
        ("[model]\nbackend = 'gpt'\n", "model.backend"),
        ("[completeness]\nquiet_seconds = 100\nforce_seconds = 10\n", "force_seconds"),
        (
            "[[routing.rules]]\nname='x'\nmodalities=['MR']\ndescription_patterns=['(']\n",
            "routing.rules.0.description_patterns",
        ),
        ("[output]\nuid_prefix = '1.2.x.'\n", "output.uid_prefix"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, text))
    assert needle in str(info.value)
    assert str(tmp_path / "node.toml") in str(info.value)


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path, "[node\nport = 1\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_env_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, "[node]\nport = 1234\nae_title = 'FROMFILE'\n")
    monkeypatch.setenv("SPINEMED_NODE__PORT", "4321")
    cfg = load_config(path)
    assert cfg.node.port == 4321
    assert cfg.node.ae_title == "FROMFILE"
    monkeypatch.setenv("SPINEMED_NODE__PORT", "not-a-port")
    with pytest.raises(ConfigError, match=r"node\.port"):
        load_config(path)


def _keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    out: set[str] = set()
    for name, field in model.model_fields.items():
        ann = field.annotation
        if getattr(ann, "__origin__", None) is dict:  # a mapping with the site's own keys: one documented key
            out.add(f"{prefix}{name}")
            continue
        inner = getattr(ann, "__args__", (ann,))
        sub = next((a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if sub is not None:
            out |= _keys(sub, f"{prefix}{name}.")
        else:
            out.add(f"{prefix}{name}")
    return out


def _flatten(d: object, prefix: str = "") -> set[str]:
    out: set[str] = set()
    if isinstance(d, dict):
        for k, v in d.items():
            out |= (
                _flatten(v, f"{prefix}{k}.")
                if isinstance(v, dict | list)
                and v
                and not (isinstance(v, list) and not isinstance(v[0], dict))
                else {f"{prefix}{k}"}
            )
    elif isinstance(d, list):
        for item in d:
            out |= _flatten(item, prefix)
    return out


def test_example_config_documents_every_key() -> None:
    cfg = load_config(EXAMPLE)  # it is valid
    assert cfg.destinations, "the example shows a destination"
    # optional keys are documented commented-out ("#key = value"): read them too
    text = re.sub(r"(?m)^#(?=[a-z][a-z0-9_]*\s*=)", "", EXAMPLE.read_text())
    documented = _flatten(tomllib.loads(text))
    documented |= {".".join(k.split(".")[:n]) for k in documented for n in range(1, k.count(".") + 1)}
    expected = _keys(NodeConfig)
    missing = sorted(k for k in expected if k not in documented)
    assert not missing, f"keys not documented in docs/config.example.toml: {missing}"


def test_site_codes_are_validated_and_applied(tmp_path: Path) -> None:
    """``[output.codes]`` maps our concepts to a site's codes: unknown keys are refused at load, the
    mapping is used by the outputs and the reader, and a new pipeline with no mapping restores ours."""
    from pydicom.sr.coding import Code

    from dicom_node.work.pipeline import Pipeline
    from inference.findings import FindingType
    from sr_templates.codes import FINDING_CODES, finding_for_code, procedure_code

    base = f'[node]\ndata_dir = "{tmp_path / "d"}"\n'
    bad = tmp_path / "bad.toml"
    bad.write_text(base + '[output.codes]\n"finding.tumour" = { scheme = "SCT", value = "1", meaning = "x" }\n')
    with pytest.raises(ConfigError, match=r"finding\.tumour"):
        load_config(bad)
    good = tmp_path / "good.toml"
    good.write_text(base + '[output.codes]\n'
                    '"finding.modic_change" = { scheme = "99MYHOSP", value = "MODIC-1", meaning = "Modic change" }\n'
                    '"procedure.MR.lumbar" = { scheme = "99MYHOSP", value = "MRLS", meaning = "MR L-spine" }\n')
    default = FINDING_CODES[FindingType.MODIC_CHANGE]
    try:
        Pipeline(load_config(good))
        site = Code("MODIC-1", "99MYHOSP", "Modic change")
        assert FINDING_CODES[FindingType.MODIC_CHANGE] == site
        assert finding_for_code(site) is FindingType.MODIC_CHANGE
        assert procedure_code("MR", "lumbar").value == "MRLS"
    finally:
        Pipeline(NodeConfig(node={"data_dir": tmp_path / "d"}))  # no mapping: our codes again
    assert FINDING_CODES[FindingType.MODIC_CHANGE] == default
