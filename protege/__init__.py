"""protege: robot imitation learning from demonstrations to sim and real arms."""

__version__ = "0.1.0"
