"""ditq.formats.pickles: pickles are read with weights_only=True; one holding code is refused, unrun."""

import pytest
import torch

from ditq.errors import CheckpointError
from ditq.formats.loader import load
from ditq.models import DiT, DiTConfig

TINY = DiTConfig(depth=2, hidden_size=32, num_heads=2, patch_size=2, input_size=8, num_classes=10)


def _tiny(config: DiTConfig = TINY, seed: int = 0) -> DiT:
    """A tiny DiT with every weight random (adaLN-Zero would make the output all zeros)."""
    torch.manual_seed(seed)
    model = DiT(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    return model.eval()


def test_training_checkpoint_with_code_in_its_pickle_is_refused(tmp_path):
    calls = []

    class Payload:
        def __reduce__(self):
            return (calls.append, ("ran",))

    path = tmp_path / "evil.pt"
    torch.save({"ema": _tiny().state_dict(), "args": Payload()}, path)
    with pytest.raises(CheckpointError, match="does not load") as e:
        load(path)
    assert "\n" not in str(e.value)
    assert calls == []
