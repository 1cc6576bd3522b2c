"""Data preparation, the dynamics model, its training, agents, validation and reports."""

from research import runtime

runtime.configure()
