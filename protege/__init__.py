"""protege: robot imitation learning from demonstrations to sim and real arms."""

from pathlib import Path

__version__ = "0.1.0"
CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # hydra configs ship inside the package
