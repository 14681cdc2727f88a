"""serve: the Ray Serve application that serves a model dir over HTTP (started as serve.app:app)."""
