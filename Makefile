# The README's two commands. Both create/refresh .venv/ first (scripts/setup.sh).
.PHONY: setup demo test
setup:
	bash scripts/setup.sh
demo: setup
	.venv/bin/python launch/demo.py
test: setup
	.venv/bin/python -m pytest -q
