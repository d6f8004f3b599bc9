"""`aq-serve --engine ray`: the gateway as a Ray Serve application (app.py), one deployment per
variant (replica.py), run and followed by a driver (engine.py)."""
