# The README's two commands. Both create/refresh .venv/ first (scripts/setup.sh).
.PHONY: setup demo test lint
setup:
	bash scripts/setup.sh
demo: setup
	.venv/bin/pace-llm demo
test: setup lint
	.venv/bin/python -m pytest -q
# ruff's lint and format rules are in pyproject.toml; `.venv/bin/ruff format .` applies the format
lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
