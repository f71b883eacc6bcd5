"""torch.hub: hubconf.py's entry points are create_model, loadable from a checkout."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ecanfnet import WeightsError, create_model

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = ["eca_nfnet_l0", "eca_nfnet_l1", "eca_nfnet_l2", "eca_nfnet_l3"]


def test_hub_lists_the_four_architectures(monkeypatch):
    # torch.hub.list only takes GitHub repos; point its repo lookup at this checkout to run its own listing rule.
    monkeypatch.setattr(torch.hub, "_get_cache_or_reload", lambda *args, **kwargs: str(ROOT))
    assert sorted(torch.hub.list("owner/ecanfnet", trust_repo=True)) == ENTRY_POINTS
    assert "no weights were published" in torch.hub.help("owner/ecanfnet", "eca_nfnet_l3", trust_repo=True)


def test_hub_load_equals_create_model(timm_hub_folder):
    model = torch.hub.load(str(ROOT), "eca_nfnet_l0", source="local", pretrained=timm_hub_folder)
    ref = create_model(pretrained=timm_hub_folder)
    assert type(model) is type(ref) and model.name == "eca_nfnet_l0"
    assert model.pretrained_cfg == ref.pretrained_cfg and dict(model.pretrained_cfg) == dict(ref.pretrained_cfg)
    mine, theirs = model.state_dict(), ref.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(v, theirs[k]) for k, v in mine.items())


def test_hub_entry_points_pass_create_model_options(timm_hub_folder):
    model = torch.hub.load(str(ROOT), "eca_nfnet_l0", False, source="local", num_classes=5, in_chans=1,
                           global_pool="avgmax")
    assert model.stem.conv1.in_channels == 1 and model.num_classes == 5 and model.global_pool == "avgmax"
    with pytest.raises(WeightsError, match="eca_nfnet_l3 has no published checkpoint"):
        torch.hub.load(str(ROOT), "eca_nfnet_l3", source="local", pretrained=True)
    with pytest.raises(WeightsError, match="the checkpoint is eca_nfnet_l0, not the requested eca_nfnet_l1"):
        torch.hub.load(str(ROOT), "eca_nfnet_l1", source="local", pretrained=timm_hub_folder)


@pytest.mark.slow
def test_hubconf_imports_from_a_plain_checkout(tmp_path):
    """A copy of hubconf.py and src/ alone (ecanfnet not installed there) loads: hubconf puts src/ on sys.path."""
    checkout = tmp_path / "checkout"
    shutil.copytree(ROOT / "src", checkout / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(ROOT / "hubconf.py", checkout / "hubconf.py")
    code = ("import sys, torch; m = torch.hub.load(sys.argv[1], 'eca_nfnet_l2', source='local', num_classes=3); "
            "import ecanfnet; print(ecanfnet.__file__); print(m.name, m.num_classes)")
    proc = subprocess.run([sys.executable, "-c", code, str(checkout)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    where, built = proc.stdout.splitlines()
    assert Path(where).is_relative_to(checkout / "src") and built == "eca_nfnet_l2 3"
