"""Prefect flows: thin orchestration over the steps in `pipeline`."""
