"""The Flower components of launch/flower_app (see its pyproject.toml)."""

from fedjax_cv.deploy import flower

server = flower.server_app()
client = flower.client_app()
