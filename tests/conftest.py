import os
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `import omnivmed` makes the flat remote-code files one package (see omnivmed.py)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import omnivmed_tools  # noqa: E402 (after the offline switches)


def tiny_config_dict(**overrides):
    """A few-hundred-thousand-parameter OmniV-Med config: 2-layer tower (patch 4) and 2-layer Qwen2."""
    config = dict(
        text_config=dict(
            model_type="qwen2",
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            vocab_size=320,
            max_position_embeddings=1024,
            rms_norm_eps=1e-6,
        ),
        vision_config=dict(
            hidden_size=48, num_attention_heads=2, num_hidden_layers=2, intermediate_size=96, patch_size=4
        ),
        image_token_id=5,
        vision_start_token_id=6,
        vision_end_token_id=7,
        frame_token_id=8,
    )
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


@pytest.fixture
def tiny_config():
    from omnivmed.configuration_omnivmed import OmniVMedConfig

    return OmniVMedConfig(**tiny_config_dict())


@pytest.fixture(scope="session")
def repo_root():
    return ROOT


def write_moving_square(path: Path, n_frames: int = 13, size: int = 112) -> Path:
    """A Motion-JPEG clip at 1 fps written by PyAV: a textured still scene with a bright square moving across it, so
    pruning keeps a few blocks per frame and its reference matters."""
    import numpy as np

    scene = (np.random.default_rng(3).random((size, size, 3)) * 0.3 + 0.3).astype(np.float32)

    def frames():
        for i in range(n_frames):
            frame = scene.copy()
            x = 7 * i % (size - 20)
            frame[40:60, x : x + 20] = 0.95
            yield (frame * 255).astype(np.uint8)

    omnivmed_tools.write_mjpeg(path, frames(), fps=1)
    return path


@pytest.fixture(scope="session")
def square_clip(tmp_path_factory):
    return write_moving_square(tmp_path_factory.mktemp("stream") / "square.avi")
