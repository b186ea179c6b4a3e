"""Stages hub_push, card, space: Hub I/O, the repo push, the model card, the demo Space."""
