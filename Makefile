# The README's two commands. Both create/refresh .venv/ first (scripts/setup.sh).
.PHONY: setup demo test
setup:
	bash scripts/setup.sh
demo: setup
	.venv/bin/pace-llm demo
test: setup
	.venv/bin/python -m pytest -q
