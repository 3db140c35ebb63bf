"""The operator dashboard and REST API (FastAPI, server-rendered Jinja2 templates, no build step)."""
