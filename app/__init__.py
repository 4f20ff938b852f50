"""The meshfed server: create_app(config) builds Flask + Flask-SocketIO around the round loop."""
from app.server import create_app

__all__ = ["create_app"]
